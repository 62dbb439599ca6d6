#!/usr/bin/env bash
# The receiving node's CPU per QoS 1 delivery that arrives from another
# node, against the same QoS 1 fan-out published on a node alone, in one
# run (docs/design/cluster.md, "Delivery by filter"):
#   cluster: one nats-server -js and two fanmq nodes A and B of one shard
#            each; SUBS QoS 1 subscribers on B, the publisher alone on A
#            (`fanmq-bench fanout --publish-node`), MSGS QoS 1 messages
#            published as fast as TCP takes them: every delivery crosses
#            NATS, and B's CPU over the burst is the receiving node's cost.
#   local:   one fanmq node without [cluster], the same SUBS subscribers
#            and the publisher on it.
# The subscribers acknowledge each message with a write of its own, as
# real clients do (the bench's default, no --coalesce-acks);
# CLEAN_SESSION=false makes their sessions persistent (persistence off);
# QOS=2 publishes and subscribes at QoS 2 instead.
# For each binary of FANMQ (a comma-separated list, default
# target/release/fanmq; e.g. main's and a branch's, alternated in one
# run) and each of ROUNDS rounds it prints B's and the single node's CPU
# per delivery (µs) and their ratio, and writes the bench's JSON to
# OUT_DIR (default: a temporary directory, removed) as
# qos1-<round>-<binary index>-{cluster,local}.json.
# PROFILE_DIR=DIR records `perf record -g` of B over each cluster run
# (DIR/receiving-<round>-<i>.perf.data) and of the single node
# (DIR/local-<round>-<i>.perf.data); SYSCALLS=1 counts B's and the single
# node's system calls over the runs (`perf stat -e 'syscalls:sys_enter_*'`,
# the counts above 1000 into OUT_DIR/syscalls-*.txt); URING=1 counts their
# io_uring requests by opcode (tracepoint io_uring:io_uring_submit_req,
# OUT_DIR/uring-*.txt): the sends and reads glommio makes. Both count the
# whole run, connects included.
#
# Usage: bench/cluster-qos1.sh [SUBS] [MSGS] [ROUNDS]
#   defaults: 10000 subscribers, 200 messages, 1 round.
# BROKER_CPUS and CLIENT_CPUS (taskset lists) pin the brokers and
# nats-server, and the bench. Needs target/release/fanmq-bench (or
# FANMQ_BENCH=...), nats-server (or NATS_SERVER=...), RLIMIT_NOFILE above
# SUBS + 100. Every process it starts is killed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

subs=${1:-10000}
msgs=${2:-200}
rounds=${3:-1}
IFS=, read -r -a binaries <<<"${FANMQ:-target/release/fanmq}"
bench=${FANMQ_BENCH:-target/release/fanmq-bench}
nats=${NATS_SERVER:-$(command -v nats-server)}
# Wall-clock bound of every process this script starts (s).
limit=600
# taskset prefixes of the brokers (nodes, nats-server) and of the bench,
# the work and output directories, the processes to kill at exit.
. bench/procs.sh
start_run

for f in "${binaries[@]}" "$bench" "$nats"; do
    [ -x "$f" ] || { echo "missing $f" >&2; exit 1; }
done


# Starts node $2 of binary $1 on MQTT port $3, admin port $4, extra flags;
# sets `node_pid`.
node_pid=""
start_node() {
    local bin=$1 name=$2 port=$3 http=$4
    shift 4
    timeout "$limit" "${broker_pin[@]}" "$bin" --listen "127.0.0.1:$port" --http-listen "127.0.0.1:$http" \
        --shards 1 --max-connections-per-ip 0 --max-connection-rate-per-ip 0 --max-connection-rate 0 \
        --log-level warn "$@" >"$work/$name.log" 2>&1 &
    pids+=("$!")
    node_pid=$(child_of "$!")
    pids+=("$node_pid")
    wait_port "$port"
}

# Starts the profile or syscall count of pid $1 named $2; `watch_pids`.
watch_pids=()
start_watch() {
    if [ -n "${PROFILE_DIR:-}" ]; then
        mkdir -p "$PROFILE_DIR"
        timeout "$limit" perf record -q -g -e cpu-clock -p "$1" -o "$PROFILE_DIR/$2.perf.data" \
            >/dev/null 2>&1 &
        watch_pids+=("$!"); pids+=("$!")
    fi
    if [ -n "${URING:-}" ]; then
        timeout "$limit" perf record -q -e io_uring:io_uring_submit_req -p "$1" -o "$work/$2.uring" \
            >/dev/null 2>&1 &
        watch_pids+=("$!"); pids+=("$!")
    fi
    if [ -n "${SYSCALLS:-}" ]; then
        timeout "$limit" perf stat -e 'syscalls:sys_enter_*' -p "$1" -o "$work/$2.stat" \
            >/dev/null 2>&1 &
        watch_pids+=("$!"); pids+=("$!")
    fi
}
stop_watch() {
    for p in "${watch_pids[@]}"; do kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    [ -n "${SYSCALLS:-}" ] && [ -f "$work/$1.stat" ] &&
        awk '$1 ~ /^[0-9,]+$/ { n = $1; gsub(",", "", n); if (n + 0 > 1000) print n, $2 }' \
            "$work/$1.stat" | sort -rn >"$out_dir/syscalls-$1.txt"
    [ -n "${URING:-}" ] && [ -f "$work/$1.uring" ] &&
        perf script -i "$work/$1.uring" 2>/dev/null | grep -o 'opcode [A-Z_]*' | sort | uniq -c |
            sort -rn >"$out_dir/uring-$1.txt"
    watch_pids=()
}

bench_flags=(--subs "$subs" --msgs "$msgs" --qos "${QOS:-1}" --drain-timeout 30 --connect-timeout 300
             --source-addrs 127.0.0.10-127.0.0.29)
# CLEAN_SESSION=false: persistent (CleanSession 0) subscribers.
[ -n "${CLEAN_SESSION:-}" ] && bench_flags+=(--clean-session "$CLEAN_SESSION")
summary=()
for round in $(seq "$rounds"); do
    for i in "${!binaries[@]}"; do
        bin=${binaries[$i]}
        tag="$round-$i"
        # The cluster: publisher on A, subscribers on B.
        nats_port=$(free_port)
        timeout "$limit" "${broker_pin[@]}" "$nats" -js -a 127.0.0.1 -p "$nats_port" -sd "$work/js-$tag" \
            >"$work/nats-$tag.log" 2>&1 &
        pids+=("$!"); nats_pid=$(child_of "$!"); pids+=("$nats_pid")
        wait_port "$nats_port"
        pa=$(free_port); ha=$(free_port); pb=$(free_port); hb=$(free_port)
        start_node "$bin" "a-$tag" "$pa" "$ha" --cluster-nats "nats://127.0.0.1:$nats_port" --node-name a
        pid_a=$node_pid
        start_node "$bin" "b-$tag" "$pb" "$hb" --cluster-nats "nats://127.0.0.1:$nats_port" --node-name b
        pid_b=$node_pid
        start_watch "$pid_b" "receiving-$tag"
        timeout "$limit" "${client_pin[@]}" "$bench" fanout "${bench_flags[@]}" \
            --nodes "127.0.0.1:$pb" --publish-node "127.0.0.1:$pa" --broker-pid "$pid_b,$pid_a" \
            --stats-url "http://127.0.0.1:$hb/api/v1/stats" --wait-subscribers "$subs" \
            --label "cluster-$i" --out "$out_dir/qos1-$tag-cluster.json" >"$work/bench-$tag-c.log" 2>&1 ||
            { cat "$work/bench-$tag-c.log" >&2; exit 1; }
        stop_watch "receiving-$tag"
        for p in "$pid_a" "$pid_b" "$nats_pid"; do kill "$p" 2>/dev/null || true; done
        # One node alone.
        ps=$(free_port); hs=$(free_port)
        start_node "$bin" "s-$tag" "$ps" "$hs"
        pid_s=$node_pid
        start_watch "$pid_s" "local-$tag"
        timeout "$limit" "${client_pin[@]}" "$bench" fanout "${bench_flags[@]}" \
            --nodes "127.0.0.1:$ps" --broker-pid "$pid_s" --label "local-$i" \
            --out "$out_dir/qos1-$tag-local.json" >"$work/bench-$tag-l.log" 2>&1 ||
            { cat "$work/bench-$tag-l.log" >&2; exit 1; }
        stop_watch "local-$tag"
        kill "$pid_s" 2>/dev/null || true
        line=$(python3 - "$out_dir" "$tag" "$bin" <<'EOF'
import json, sys
out, tag, binary = sys.argv[1:4]
def run(kind):
    with open(f"{out}/qos1-{tag}-{kind}.json") as f:
        return json.load(f)["runs"][0]
c, l = run("cluster"), run("local")
cf, lf = c["fanout"], l["fanout"]
b = c["broker_usage"]["cpu_each_s"][0]
s = l["broker_usage"]["cpu_s"]
cu = b * 1e6 / max(cf["delivered"], 1)
lu = s * 1e6 / max(lf["delivered"], 1)
print(f"round {tag.split('-')[0]} {binary}: receiving node {cu:.2f} us/delivery "
      f"({cf['delivered']}/{cf['expected']}, lost {cf['lost']}), local {lu:.2f} us/delivery "
      f"({lf['delivered']}/{lf['expected']}, lost {lf['lost']}), ratio {cu / lu:.2f}")
EOF
)
        echo "$line"
        summary+=("$line")
    done
done
printf '%s\n' "${summary[@]}" >"$out_dir/summary.txt"
