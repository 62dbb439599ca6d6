#!/bin/sh
# Instruction count per delivery of one fanmq fan-out burst, under
# `valgrind --tool=callgrind` (no hardware counters needed): the broker runs
# with instrumentation off while the subscribers connect; it is switched on
# (`callgrind_control -i on`) when the bench logs "connected N of N", zeroed
# a second before publishing starts, and the counters are dumped (`callgrind_control -d`) after the bench has drained.
# Usage: bench/callgrind-fanout.sh OUTDIR LABEL SUBS MSGS -- [fanmq-bench fanout options]
# Prints "LABEL Ir=<instructions> deliveries=<n> Ir/delivery=<x>".
# FANMQ_ARGS (optional) is added to the broker's command line, e.g.
# FANMQ_ARGS="--config ack.toml" for a persistence mode (with
# `--clean-session false --qos 1` among the bench options); FANMQ_BIN
# (optional) is the broker binary (default target/release/fanmq). SETTLE
# (optional, seconds, default 0) waits that long after the bench before the
# dump, so that the subscribers' last acknowledgements (QoS 1/2), which the
# broker reads after the bench saw its last delivery, are counted too.
set -eu
out=$1 label=$2 subs=$3 msgs=$4
shift 5
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
mkdir -p "$out"
valgrind --tool=callgrind --instr-atstart=no \
  --callgrind-out-file="$out/$label.%p" \
  "${FANMQ_BIN:-target/release/fanmq}" --listen 127.0.0.1:$port --shards 1 --http-listen off \
  --max-connections-per-ip 0 --max-connection-rate-per-ip 0 --max-connection-rate 0 \
  ${FANMQ_ARGS:-} >"$out/$label.broker.log" 2>&1 &
vg=$!
trap 'kill $vg 2>/dev/null || true' EXIT
i=0
until python3 -c "import socket;socket.create_connection(('127.0.0.1',$port),1)" 2>/dev/null; do
  i=$((i+1)); [ $i -lt 120 ] || { echo "broker did not start"; exit 1; }; sleep 0.5
done
# Publishing starts at a fixed time (--start-at) after the connections, so
# that it never begins before callgrind takes the "on" command; the counters
# are zeroed just before it (-z), so the idle wait is not counted.
start=$(( $(date +%s) + 8 ))
target/release/fanmq-bench fanout --port $port --subs "$subs" --msgs "$msgs" \
  --start-at $start --drain-timeout 2 --out "$out/$label.json" "$@" 2>&1 | tee "$out/$label.bench.log" |
  while IFS= read -r line; do
    case $line in
      *"connected $subs of $subs"*)
        callgrind_control -i on $vg >/dev/null 2>&1
        ( sleep $(( start - $(date +%s) - 1 )); callgrind_control -z $vg >/dev/null 2>&1 ) & ;;
    esac
  done
sleep "${SETTLE:-0}"
callgrind_control -d $vg >/dev/null 2>&1
kill -TERM $vg; wait $vg || true
trap - EXIT
file=$out/$label.$vg.1
ir=$(grep '^summary:\|^totals:' "$file" | head -1 | awk '{print $2}')
del=$(python3 -c "import json;d=json.load(open('$out/$label.json'));r=d['runs'][0] if 'runs' in d else d;print(r['fanout']['delivered'])" 2>/dev/null || echo '?')
echo "$label Ir=$ir deliveries=$del Ir/delivery=$(python3 -c "print(round($ir/$del,1))" 2>/dev/null || echo '?')"
