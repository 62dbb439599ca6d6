#!/usr/bin/env bash
# Fan-out over a cluster of fanmq nodes joined through NATS (issue: scale-out
# past one process), against one node alone, on one host:
#   cluster: one nats-server -js and NODES fanmq nodes of one shard each;
#            `fanmq-bench fanout --nodes` spreads SUBS subscribers over the
#            nodes round-robin (from 20 loopback source addresses, so no pair
#            runs out of ephemeral ports) and publishes MSGS QoS 0 messages
#            on the first node; every other node gets each message once from
#            NATS and fans it out to its own subscribers.
#   single:  one fanmq node without [cluster] and SINGLE_SUBS subscribers.
# The bench measures the nodes' CPU together (--broker-pid with every node's
# pid) and waits until all of them hold their subscriptions (--stats-url with
# every node's admin API); nats-server's CPU is read from /proc over the
# cluster run (subscribing, publishing and draining).
# Prints deliveries per broker CPU-second for both and nats-server's CPU per
# message published and per message it delivered to a node. The bench's JSON
# results go to OUT_DIR (default: a temporary directory, removed) as
# fanout-cluster-<NODES>x<SUBS/NODES>.json and fanout-cluster-single-<SINGLE_SUBS>.json,
# with what this script measured beside the first as a .md note
# (`fanmq-bench report` puts both into bench/RESULTS.md when OUT_DIR is
# bench/results).
#
# Usage: bench/cluster-fanout.sh [NODES] [SUBS] [MSGS] [SINGLE_SUBS]
#   defaults: 6 nodes, 90000 subscribers, 200 messages, 15000 (one node).
# PERSIST=off|ack|interval runs the persistence cost over the cluster
# (issue 13) instead: the publisher alone on the first node
# (`fanmq-bench fanout --publish-node`), the SUBS subscribers spread over
# nodes 2..NODES with CleanSession 0 (persistent sessions) and QoS 1, MSGS
# QoS 1 messages, so every delivery crosses NATS; every node with
# persistence off (`off`) or on in its own directory under the temporary
# directory with `persistence_sync` ack or interval. No single-node run
# (SINGLE_SUBS is not used). It prints deliveries per broker CPU-second of
# the receiving nodes and of all nodes (their CPU over the burst, from the
# bench's `cpu_each_s`) and, on, the bytes the receiving nodes' persistence
# directories hold after the run and the bytes they wrote to the disk
# (`write_bytes` of /proc/PID/io over the whole run, connects included) per
# delivery. JSON: fanout-cluster-persist-<PERSIST>-<NODES>x<SUBS/(NODES-1)>.json
# with a .md note. Alternate the modes over runs of the script to compare.
# PROFILE_DIR=DIR records a `perf record -g` profile of the second node (one
# that receives from NATS) over the cluster run and of the single node over
# its run, as DIR/receiving-node.perf.data and DIR/single-node.perf.data
# (`perf report -i FILE`; needs perf and kernel.perf_event_paranoid <= 1).
# BROKER_CPUS and CLIENT_CPUS (taskset lists, e.g. 0 and 1) pin the nodes
# and nats-server, and the bench; FANMQ picks another fanmq binary (a
# before/after comparison alternates runs of the script with each).
# Needs: target/release/fanmq and target/release/fanmq-bench
# (`cargo build --release --workspace`), nats-server (or NATS_SERVER=...),
# RLIMIT_NOFILE above SUBS / NODES + 100 per node. Every process it starts
# is killed on exit, and each runs under a timeout.
set -euo pipefail
cd "$(dirname "$0")/.."

nodes=${1:-6}
subs=${2:-90000}
msgs=${3:-200}
single_subs=${4:-15000}
fanmq=${FANMQ:-target/release/fanmq}
bench=${FANMQ_BENCH:-target/release/fanmq-bench}
nats=${NATS_SERVER:-$(command -v nats-server)}
persist=${PERSIST:-}
case "$persist" in
    "" | off | ack | interval) ;;
    *) echo "PERSIST must be off, ack or interval, not $persist" >&2; exit 1 ;;
esac
if [ -n "$persist" ] && [ "$nodes" -lt 2 ]; then
    echo "PERSIST needs at least 2 nodes (the publisher's and a receiving one)" >&2
    exit 1
fi
# Wall-clock bound of every process this script starts (s).
limit=900
# taskset prefixes of the brokers (nodes, nats-server) and of the bench,
# the work and output directories, the processes to kill at exit.
. bench/procs.sh
start_run

hz=$(getconf CLK_TCK)

# With PROFILE_DIR, starts `perf record` on pid $1 into PROFILE_DIR/$2.perf.data
# and sets `perf_pid`; stop_profile ends it (SIGINT: perf writes its file).
perf_pid=""
start_profile() {
    [ -n "${PROFILE_DIR:-}" ] || return 0
    mkdir -p "$PROFILE_DIR"
    timeout "$limit" perf record -q -g -e cpu-clock -p "$1" -o "$PROFILE_DIR/$2.perf.data" >/dev/null 2>&1 &
    perf_pid=$!
    pids+=("$perf_pid")
}
stop_profile() {
    [ -n "$perf_pid" ] || return 0
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" 2>/dev/null || true
    perf_pid=""
}

for f in "$fanmq" "$bench" "$nats"; do
    [ -x "$f" ] || { echo "missing $f (cargo build --release --workspace; nats-server)" >&2; exit 1; }
done

# Starts a node: name, MQTT port, admin port, extra flags. Sets `node_pid`
# to the node's pid (a global, not printed: a `$(start_node ...)` subshell
# would lose what it adds to `pids`, and cleanup would leave the node running).
node_pid=""
start_node() {
    local name=$1 port=$2 http=$3
    shift 3
    timeout "$limit" "${broker_pin[@]}" "$fanmq" --listen "127.0.0.1:$port" --http-listen "127.0.0.1:$http" \
        --shards 1 --max-connections-per-ip 0 --max-connection-rate-per-ip 0 --max-connection-rate 0 --log-level warn \
        "$@" >"$work/$name.log" 2>&1 &
    pids+=("$!")
    node_pid=$(child_of "$!")
    pids+=("$node_pid")
    wait_port "$port"
}

bench_flags=(--msgs "$msgs" --drain-timeout 30 --connect-timeout 300
             --source-addrs 127.0.0.10-127.0.0.29)
# PERSIST: persistent QoS 1 subscribers, QoS 1 messages.
[ -n "$persist" ] && bench_flags+=(--qos 1 --clean-session false)

# The cluster.
nats_port=$(free_port)
timeout "$limit" "${broker_pin[@]}" "$nats" -js -a 127.0.0.1 -p "$nats_port" -sd "$work/js" >"$work/nats.log" 2>&1 &
pids+=("$!")
nats_pid=$(child_of "$!")
pids+=("$nats_pid")
wait_port "$nats_port"
# Bytes node $1 (a pid) wrote to the disk so far (/proc/PID/io write_bytes:
# pages it dirtied, written back since or not).
disk_written() { awk '/^write_bytes:/ { print $2 }' "/proc/$1/io"; }
# Bytes of the files under directory $1 (0 when there is none).
dir_bytes() {
    [ -d "$1" ] || { echo 0; return; }
    find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }'
}
node_list=() pid_list=() url_list=()
for i in $(seq "$nodes"); do
    port=$(free_port); http=$(free_port)
    store=()
    if [ -n "$persist" ] && [ "$persist" != off ]; then
        mkdir -p "$work/store-n$i"
        printf 'persistence_sync = "%s"\n' "$persist" >"$work/n$i.toml"
        store=(--persistence-dir "$work/store-n$i" --config "$work/n$i.toml")
    fi
    start_node "n$i" "$port" "$http" --cluster-nats "nats://127.0.0.1:$nats_port" --node-name "n$i" \
        "${store[@]}"
    node_list+=("127.0.0.1:$port"); pid_list+=("$node_pid"); url_list+=("http://127.0.0.1:$http/api/v1/stats")
done
join() { local IFS=,; echo "$*"; }
if [ -n "$persist" ]; then
    # The subscribers on nodes 2..NODES, the publisher alone on the first.
    cluster_stem="fanout-cluster-persist-${persist}-${nodes}x$((subs / (nodes - 1)))"
    targets=(--nodes "$(join "${node_list[@]:1}")" --publish-node "${node_list[0]}")
else
    cluster_stem="fanout-cluster-${nodes}x$((subs / nodes))"
    targets=(--nodes "$(join "${node_list[@]}")")
fi
single_stem="fanout-cluster-single-${single_subs}"
n0=$(ticks "$nats_pid")
node_ticks0=() node_disk0=()
for pid in "${pid_list[@]}"; do
    node_ticks0+=("$(ticks "$pid")"); node_disk0+=("$(disk_written "$pid")")
done
start_profile "${pid_list[1]:-${pid_list[0]}}" receiving-node
timeout "$limit" "${client_pin[@]}" "$bench" fanout --subs "$subs" "${bench_flags[@]}" \
    "${targets[@]}" --broker-pid "$(join "${pid_list[@]}")" \
    --stats-url "$(join "${url_list[@]}")" --wait-subscribers "$subs" \
    --label "fanmq-${nodes}-nodes${persist:+-persist-$persist}" --out "$out_dir/$cluster_stem.json"
n1=$(ticks "$nats_pid")
stop_profile
# Bytes each node wrote to the disk over the run, and what its persistence
# directory holds after it (0 without one).
node_disk=() node_store=()
for i in "${!pid_list[@]}"; do
    node_disk+=("$(( $(disk_written "${pid_list[$i]}") - node_disk0[i] ))")
    node_store+=("$(dir_bytes "$work/store-n$((i + 1))")")
done
# Each node's CPU over the run (s): the publisher's node also reads the
# publisher and sends to NATS, the others only receive and fan out.
node_cpu=()
for i in "${!pid_list[@]}"; do
    node_cpu+=("$(awk -v a="${node_ticks0[$i]}" -v b="$(ticks "${pid_list[$i]}")" -v hz="$hz" \
        'BEGIN { printf "%.2f", (b - a) / hz }')")
done
for pid in "${pid_list[@]}" "$nats_pid"; do kill "$pid" 2>/dev/null || true; done

if [ -n "$persist" ]; then
    python3 - "$out_dir" "$cluster_stem" "$nodes" "$msgs" "$persist" "$*" "$(join "${node_cpu[@]}")" \
        "$(join "${node_disk[@]}")" "$(join "${node_store[@]}")" <<'EOF'
import json, sys
out, stem, nodes, msgs, mode, args = sys.argv[1:7]
nodes, msgs = int(nodes), int(msgs)
node_cpu, disk, store = (sys.argv[i].split(",") for i in (7, 8, 9))
with open(f"{out}/{stem}.json") as f:
    r = json.load(f)["runs"][0]
f, b = r["fanout"], r["broker_usage"]
each = b["cpu_each_s"]
recv = sum(each[1:])
delivered = f["delivered"]
receivers = "node 2" if nodes == 2 else f"nodes 2-{nodes}"
lines = [f"`PERSIST={mode} bench/cluster-fanout.sh {args}`".replace(" `", "`"), ""]
lines.append(f"- persistence {mode}, {nodes} nodes: publisher on node 1, persistent QoS 1 "
             f"subscribers on {receivers}, QoS 1 messages: {delivered} of {f['expected']} "
             f"delivered, lost {f['lost']}")
lines.append(f"- broker CPU over the burst (s), each node: "
             + ", ".join(f"{c:.3f}" for c in each))
lines.append(f"- deliveries per broker CPU-s: receiving nodes {delivered / recv:.0f}, "
             f"all nodes {delivered / b['cpu_s']:.0f}")
recv_disk = sum(int(d) for d in disk[1:])
recv_store = sum(int(s) for s in store[1:])
lines.append(f"- receiving nodes, per delivery: {recv_store / delivered:.1f} bytes in their "
             f"persistence directories after the run, {recv_disk / delivered:.1f} bytes written "
             f"to the disk over the run (write_bytes, connects included); node 1 wrote "
             f"{int(disk[0])} bytes")
lines.append("- CPU of each node over the whole run (s; the first holds the publisher): "
             + ", ".join(node_cpu))
text = "\n".join(lines) + "\n"
print(text, end="")
with open(f"{out}/{stem}.md", "w") as fh:
    fh.write(text)
EOF
    exit 0
fi

# One node alone.
port=$(free_port); http=$(free_port)
start_node single "$port" "$http"
single_pid=$node_pid
start_profile "$single_pid" single-node
timeout "$limit" "${client_pin[@]}" "$bench" fanout --subs "$single_subs" "${bench_flags[@]}" \
    --nodes "127.0.0.1:$port" --broker-pid "$single_pid" --label "fanmq-1-node" \
    --out "$out_dir/$single_stem.json"
stop_profile

python3 - "$out_dir" "$cluster_stem" "$single_stem" "$nodes" "$msgs" "$hz" "$n0" "$n1" "$*" "$(join "${node_cpu[@]}")" <<'EOF'
import json, sys
out, cluster, single = sys.argv[1:4]
nodes, msgs, hz, n0, n1 = map(int, sys.argv[4:9])
args = sys.argv[9]
node_cpu = sys.argv[10].split(",")
def run(name):
    with open(f"{out}/{name}.json") as f:
        return json.load(f)["runs"][0]
c, s = run(cluster), run(single)
lines = [f"`bench/cluster-fanout.sh {args}`".replace(" `", "`"), ""]
for label, r in ((f"{nodes} nodes", c), ("1 node", s)):
    f, b = r["fanout"], r["broker_usage"]
    lines.append(f"- {label}: {f['delivered']} of {f['expected']} delivered, lost {f['lost']}; "
                 f"broker CPU {b['cpu_s']:.3f} s; {b['deliveries_per_cpu_s']:.0f} deliveries per broker CPU-s")
ratio = c["broker_usage"]["deliveries_per_cpu_s"] / s["broker_usage"]["deliveries_per_cpu_s"]
nats_s = (n1 - n0) / hz
lines.append("- CPU of each node over the cluster run (s; the first holds the publisher): "
             + ", ".join(node_cpu))
lines.append(f"- {nodes} nodes ÷ 1 node, deliveries per broker CPU-s: {ratio:.2f}")
lines.append(f"- nats-server CPU over the cluster run (connect, publish, drain): {nats_s:.2f} s; "
             f"per message published {nats_s * 1e6 / msgs:.1f} µs, per message delivered to a node "
             f"{nats_s * 1e6 / (msgs * (nodes - 1)):.1f} µs")
text = "\n".join(lines) + "\n"
print(text, end="")
with open(f"{out}/{cluster}.md", "w") as f:
    f.write(text)
EOF
