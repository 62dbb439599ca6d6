"""The runner shared by the interop scripts: runs named checks, prints
"ok   - NAME" or "FAIL - NAME: error" for each, then "N passed, M failed",
and exits non-zero when any failed (every failing check is reported)."""

import sys


def run(checks):
    """Runs `checks`, pairs of (name, function without arguments), and exits."""
    passed = failed = 0
    for name, check in checks:
        try:
            check()
            passed += 1
            print(f"ok   - {name}")
        except Exception as e:  # report every failing check, then fail
            failed += 1
            print(f"FAIL - {name}: {e!r}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
