"""The runner shared by the interop scripts: runs named checks, prints
"ok   - NAME" or "FAIL - NAME: error" for each, then "N passed, M failed",
and exits non-zero when any failed (every failing check is reported).
Also the waits the paho scripts share, for clients whose `inbox` queue
their on_message callback fills."""

import queue
import sys
import time
import uuid


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


def marker_round_trip(c):
    """Subscribes `c` to a fresh marker topic and publishes to it until the
    marker comes back: every subscription made before is then active.
    Other messages that arrive meanwhile are dropped."""
    marker = f"marker/{uuid.uuid4().hex}"
    c.subscribe(marker, 0)
    while True:
        c.publish(marker, b"m", qos=0)
        try:
            msg = c.inbox.get(timeout=0.5)
        except queue.Empty:
            continue
        if msg.topic == marker:
            return


def receive(c, n, timeout):
    """The next `n` messages of `c` that are not markers, within `timeout`
    seconds."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"got {len(got)} of {n}: {[m.topic for m in got]}"
        msg = c.inbox.get(timeout=left)
        if not msg.topic.startswith("marker/"):
            got.append(msg)
    return got
