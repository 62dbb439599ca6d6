#!/bin/bash
# Counts a broker's system calls (or any perf events) per connection while
# fanmq-bench opens N pipelined CONNECT+SUBSCRIBE connections to it
# (bench/results/connect-syscalls.md).
#
#   bench/connect-syscalls.sh LABEL N BROKER-COMMAND...
#
# `{port}` in BROKER-COMMAND is replaced by a free port. The broker runs on
# CPU 0, the load generator on CPU 1. Two `perf stat -p` (all the broker's
# threads) count: one stopped when the bench logs all N connected (the
# connect phase), one over the whole run (the clients' closes too). Output:
# per-connection counts of each, and the raw files in $OUT (default
# /tmp/connect-syscalls). EVENTS overrides the events counted (default
# syscalls:sys_enter_*), BENCH the fanmq-bench binary.
set -u
LABEL=$1; N=$2; shift 2
OUT=${OUT:-/tmp/connect-syscalls}
EVENTS=${EVENTS:-syscalls:sys_enter_*}
BENCH=${BENCH:-target/release/fanmq-bench}
mkdir -p "$OUT"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CMD="${*//\{port\}/$PORT}"
# shellcheck disable=SC2086 # the command is split into words on purpose
taskset -c 0 $CMD > "$OUT/$LABEL-broker.log" 2>&1 &
BROKER=$!
sleep 1.5
perf stat -e "$EVENTS" -p $BROKER -o "$OUT/$LABEL-connect.txt" 2>/dev/null &
CONNECT_PHASE=$!
perf stat -e "$EVENTS" -p $BROKER -o "$OUT/$LABEL-all.txt" 2>/dev/null &
WHOLE_RUN=$!
sleep 1
taskset -c 1 "$BENCH" idle --subs "$N" --port "$PORT" --hold 4 --settle 0 > "$OUT/$LABEL-bench.log" 2>&1 &
LOAD=$!
until grep -q "connected $N of $N" "$OUT/$LABEL-bench.log"; do
    sleep 0.05
    kill -0 $LOAD 2>/dev/null || break
done
kill -INT $CONNECT_PHASE
wait $LOAD
sleep 1
kill -INT $WHOLE_RUN
sleep 0.5
kill $BROKER
wait 2>/dev/null
for phase in connect all; do
    echo "== $LABEL $phase (per connection, N=$N)"
    awk -v n="$N" '$2 ~ /:/ { gsub(",", "", $1); if ($1 + 0 > 0) { total += $1; name = $2; sub(/.*:(sys_enter_)?/, "", name); printf "%-16s %8.2f\n", name, $1 / n } }
        END { printf "%-16s %8.2f\n", "TOTAL", total / n }' "$OUT/$LABEL-$phase.txt"
done
