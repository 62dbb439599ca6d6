#!/usr/bin/env bash
# Broker CPU per message, local against cross-node (docs/design/cluster.md,
# §13): one nats-server -js, two fanmq nodes A and B of one shard each, one
# mosquitto_pub on A publishing MESSAGES QoS 0 messages of 64 bytes as fast as
# it can, and SUBSCRIBERS mosquitto_sub subscribers of the topic:
#   local: every subscriber on A (no NATS involved: the topic has no
#          subscriber on B, so A publishes to NATS and nobody receives it);
#   cross: every subscriber on B (A publishes each message to NATS once, B
#          receives it once and fans it out).
#   single: a third node S without [cluster], publisher and subscribers on
#          it: fanmq as before, for comparison.
# Reports the CPU time (user + system, /proc/PID/stat) of A, B, S and
# nats-server over each run, per message published.
#
# Usage: bench/cluster-cpu.sh [MESSAGES] [SUBSCRIBERS]
# Needs: target/release/fanmq, nats-server (or NATS_SERVER=...),
# mosquitto_pub/mosquitto_sub. Every process it starts is killed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

messages=${1:-50000}
subscribers=${2:-10}
fanmq=${FANMQ:-target/release/fanmq}
nats=${NATS_SERVER:-$(command -v nats-server)}
work=$(mktemp -d)
pids=()
. bench/procs.sh
trap cleanup EXIT

hz=$(getconf CLK_TCK)

nats_port=$(free_port)
timeout 600 "$nats" -js -a 127.0.0.1 -p "$nats_port" -sd "$work/js" >"$work/nats.log" 2>&1 &
pids+=("$!")
nats_pid=$(child_of "$!")
for _ in $(seq 100); do grep -q "Server is ready" "$work/nats.log" && break; sleep 0.1; done

start_node() { # name port [cluster flags]
    local name=$1 port=$2
    shift 2
    timeout 600 "$fanmq" --listen "127.0.0.1:$port" --http-listen off --shards 1 \
        --log-level warn "$@" >"$work/$name.log" 2>&1 &
    echo "$!"
}
port_a=$(free_port); port_b=$(free_port); port_s=$(free_port)
timeout_a=$(start_node a "$port_a" --cluster-nats "nats://127.0.0.1:$nats_port" --node-name a)
timeout_b=$(start_node b "$port_b" --cluster-nats "nats://127.0.0.1:$nats_port" --node-name b)
timeout_s=$(start_node s "$port_s")
pids+=("$timeout_a" "$timeout_b" "$timeout_s")
pid_a=$(child_of "$timeout_a"); pid_b=$(child_of "$timeout_b"); pid_s=$(child_of "$timeout_s")
# Killing `timeout` leaves its child running: the children are killed too.
pids+=("$nats_pid" "$pid_a" "$pid_b" "$pid_s")
sleep 1

payload=$(head -c 64 /dev/zero | tr '\0' x)
# The messages, one per line for mosquitto_pub -l (yes ends on SIGPIPE).
(yes "$payload" || true) | head -n "$messages" >"$work/messages"
run() { # label publisher-port subscriber-port
    local label=$1 pub_port=$2 port=$3 subs=()
    for _ in $(seq "$subscribers"); do
        timeout 300 mosquitto_sub -p "$port" -t "bench/$label" -C "$messages" -q 0 -W 60 >/dev/null &
        subs+=("$!"); pids+=("$!")
    done
    sleep 1 # the subscriptions reach NATS (cross) before the first publish
    local a0 b0 s0 n0 t0
    a0=$(ticks "$pid_a"); b0=$(ticks "$pid_b"); s0=$(ticks "$pid_s"); n0=$(ticks "$nats_pid")
    t0=$(date +%s.%N)
    timeout 300 mosquitto_pub -p "$pub_port" -t "bench/$label" -l -q 0 <"$work/messages"
    local ok=0
    for pid in "${subs[@]}"; do
        if wait "$pid"; then ok=$((ok + 1)); fi
    done
    local a1 b1 s1 n1 t1
    a1=$(ticks "$pid_a"); b1=$(ticks "$pid_b"); s1=$(ticks "$pid_s"); n1=$(ticks "$nats_pid")
    t1=$(date +%s.%N)
    python3 - "$label" "$messages" "$subscribers" "$ok" "$hz" \
        "$a0" "$a1" "$b0" "$b1" "$s0" "$s1" "$n0" "$n1" "$t0" "$t1" <<'EOF'
import sys
label, m, s, ok, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
a0, a1, b0, b1, s0, s1, n0, n1 = map(int, sys.argv[6:14])
t0, t1 = map(float, sys.argv[14:16])
us = lambda d: d / hz * 1e6 / m
print(f"{label}: {m} messages x {s} subscribers ({ok} got all) in {t1 - t0:.2f} s; "
      f"CPU per message: A {us(a1 - a0):.2f} us, B {us(b1 - b0):.2f} us, "
      f"S {us(s1 - s0):.2f} us, nats-server {us(n1 - n0):.2f} us")
EOF
}
run single "$port_s" "$port_s"
run local "$port_a" "$port_a"
run cross "$port_a" "$port_b"
