# lib.sh: shared helpers for the tests in tests/deploy/ (sourced, not run).
# Each test counts its checks with ok/fail and ends with summary, which prints
# the closing line "N passed, M failed[, K skipped]" and sets the exit status.
# shellcheck shell=bash

DEPLOY_TESTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$DEPLOY_TESTS_DIR/../.." && pwd)
export DEPLOY_TESTS_DIR REPO_DIR

n_passed=0
n_failed=0
n_skipped=0

ok() { n_passed=$((n_passed + 1)); echo "ok   - $*"; }
fail() { n_failed=$((n_failed + 1)); echo "FAIL - $*"; }
skip() { n_skipped=$((n_skipped + 1)); echo "skip - $*"; }

# check DESCRIPTION COMMAND...: ok when COMMAND succeeds.
check() {
    local desc=$1
    shift
    if "$@"; then ok "$desc"; else fail "$desc"; fi
}

# check_not DESCRIPTION COMMAND...: ok when COMMAND fails.
check_not() {
    local desc=$1
    shift
    if "$@"; then fail "$desc"; else ok "$desc"; fi
}

# check_eq DESCRIPTION EXPECTED ACTUAL
check_eq() {
    if [ "$2" = "$3" ]; then ok "$1"; else fail "$1: expected '$2', got '$3'"; fi
}

# file_mode PATH: octal permission bits, e.g. 644.
file_mode() { stat -c %a "$1"; }

summary() {
    local line="$n_passed passed, $n_failed failed"
    [ "$n_skipped" -eq 0 ] || line="$line, $n_skipped skipped"
    echo "$line"
    [ "$n_failed" -eq 0 ]
}
