#!/usr/bin/env bash
# run_all.sh: run every tests/deploy/test_*.sh, then print the total as
# "N passed, M failed[, K skipped]". Exits 1 when any check failed or a test
# script exited non-zero. Run as root (test_tune.sh needs ip netns; without
# root it skips those checks). Usage: tests/deploy/run_all.sh [test_name ...]
set -euo pipefail

dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ $# -gt 0 ]; then
    tests=()
    for t in "$@"; do tests+=("$dir/${t%.sh}.sh"); done
else
    tests=("$dir"/test_*.sh)
fi

total_passed=0
total_failed=0
total_skipped=0
broken=()
for t in "${tests[@]}"; do
    name=$(basename "$t")
    echo "=== $name"
    log=$(mktemp)
    if bash "$t" 2>&1 | tee "$log"; then rc=0; else rc=${PIPESTATUS[0]}; fi
    last=$(tail -n 1 "$log")
    rm -f "$log"
    if [[ $last =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed(,\ ([0-9]+)\ skipped)?$ ]]; then
        total_passed=$((total_passed + BASH_REMATCH[1]))
        total_failed=$((total_failed + BASH_REMATCH[2]))
        total_skipped=$((total_skipped + ${BASH_REMATCH[4]:-0}))
    else
        total_failed=$((total_failed + 1))
        echo "FAIL - $name ended without a summary line (exit $rc)"
    fi
    if [ "$rc" -ne 0 ]; then broken+=("$name"); fi
done

echo "=== deploy tests: ${#tests[@]} scripts${broken[*]:+, failing: ${broken[*]}}"
line="$total_passed passed, $total_failed failed"
[ "$total_skipped" -eq 0 ] || line="$line, $total_skipped skipped"
echo "$line"
[ "$total_failed" -eq 0 ] && [ ${#broken[@]} -eq 0 ]
