#!/bin/sh
# Kernel-side counts per delivery of one fanmq fan-out burst, for builds and
# shard counts side by side: each round starts every variant in turn (A B A B
# ...), runs one `fanmq-bench fanout` burst against it and counts, with
# `perf stat -p` over the publish phase only (attached once all subscribers
# are connected), the broker's sendmsg calls, context switches, madvise and
# munmap calls and TLB flushes. The bench's own figure (deliveries per
# broker CPU-s, `--broker-pid`) comes with each line. Needs perf with the
# syscalls and tlb tracepoints (root).
# Usage: bench/perf-fanout.sh OUTDIR ROUNDS SUBS MSGS LABEL=BIN:SHARDS... -- [fanmq-bench fanout options]
# Env: BROKER_CPUS (taskset list for the broker, default 0,1); BROKER_FLAGS
# (more fanmq flags, e.g. `--max-queued-messages 4000` for bursts past the
# default queue limit of 1000 messages).
# Prints "round LABEL deliveries cpu_s per_cpu_s sendmsg/delivery ctxsw madvise munmap tlb_flush".
set -eu
out=$1 rounds=$2 subs=$3 msgs=$4
shift 4
specs=""
while [ $# -gt 0 ] && [ "$1" != "--" ]; do specs="$specs $1"; shift; done
[ $# -gt 0 ] && shift
cpus=${BROKER_CPUS:-0,1}
events=syscalls:sys_enter_sendmsg,context-switches,syscalls:sys_enter_madvise,syscalls:sys_enter_munmap,tlb:tlb_flush
mkdir -p "$out"
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
count() { awk -F, -v e="$2" '$3 == e { print $1 }' "$1"; }
r=0
while [ $r -lt "$rounds" ]; do
  for spec in $specs; do
    label=${spec%%=*} rest=${spec#*=}
    bin=${rest%:*} shards=${rest##*:}
    port=$(free_port)
    taskset -c "$cpus" "$bin" --listen 127.0.0.1:$port --shards "$shards" --http-listen off \
      --max-connections-per-ip 0 --max-connection-rate-per-ip 0 --max-connection-rate 0 \
      ${BROKER_FLAGS:-} >"$out/$label.$r.broker.log" 2>&1 &
    broker=$!
    i=0
    until python3 -c "import socket;socket.create_connection(('127.0.0.1',$port),1)" 2>/dev/null; do
      i=$((i+1)); [ $i -lt 120 ] || { echo "$label: broker did not start"; kill $broker; exit 1; }; sleep 0.5
    done
    # Publishing starts at a fixed time (--start-at), after perf is attached.
    start=$(( $(date +%s) + 6 ))
    stat=$out/$label.$r.perf
    target/release/fanmq-bench fanout --port $port --subs "$subs" --msgs "$msgs" \
      --start-at $start --broker-pid $broker --out "$out/$label.$r.json" "$@" \
      >"$out/$label.$r.bench.log" 2>&1 &
    bench=$!
    until grep -q "connected $subs of $subs" "$out/$label.$r.bench.log" 2>/dev/null; do
      kill -0 $bench 2>/dev/null || break; sleep 0.2
    done
    perf stat -x, -e "$events" -p $broker -o "$stat" &
    perf=$!
    wait $bench || true
    kill -INT $perf; wait $perf || true
    kill -TERM $broker; wait $broker || true
    python3 - "$out/$label.$r.json" "$r" "$label" \
      "$(count "$stat" syscalls:sys_enter_sendmsg)" "$(count "$stat" context-switches)" \
      "$(count "$stat" syscalls:sys_enter_madvise)" "$(count "$stat" syscalls:sys_enter_munmap)" \
      "$(count "$stat" tlb:tlb_flush)" <<'EOF'
import json, sys
path, rnd, label, sends, switches, madvise, munmap, tlb = sys.argv[1:]
run = json.load(open(path))["runs"][0]
delivered = run["fanout"]["delivered"]
usage = run["broker_usage"]
print(rnd, label, delivered, round(usage["cpu_s"], 3), "%.2fM" % (usage["deliveries_per_cpu_s"] / 1e6),
      "%.4f" % (int(sends or 0) / max(delivered, 1)), switches, madvise, munmap, tlb, flush=True)
EOF
  done
  r=$((r+1))
done
