#!/usr/bin/env bash
# Benchmark smoke test for CI: a small fan-out (500 subscribers, 200 messages,
# QoS 0 burst and QoS 1 paced) against fanmq, Mosquitto and the raw forwarder
# in one run, each bounded to a minute. Fails if fanmq loses or duplicates a
# message. Full runs are made by hand (see bench/RESULTS.md).
#
# Usage: bench/smoke.sh   (after cargo build --release -p fanmq -p fanmq-bench)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bench="$root/target/release/fanmq-bench"
export FANMQ_BIN="${FANMQ_BIN:-$root/target/release/fanmq}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

peers=(fanmq raw)
command -v mosquitto >/dev/null && peers+=(mosquitto)

run() { # name, extra args...
  local name=$1
  shift
  "$bench" fanout --subs 500 --msgs 200 --duration 60 --compare "${peers[@]}" \
    --broker-cpus 0 --client-cpus 1 --out "$out/$name.json" "$@" | tail -8
  python3 - "$out/$name.json" <<'PY'
import json, sys
runs = [r for r in json.load(open(sys.argv[1]))["runs"] if r["broker"] == "fanmq"]
if not runs:
    sys.exit("no fanmq run in the results")
for r in runs:
    f = r["fanout"]
    print(f"fanmq: delivered {f['delivered']} of {f['expected']}, lost {f['lost']}, "
          f"duplicates {f['duplicates']}, out of order {f['out_of_order']}")
    if f["delivered"] != f["expected"] or f["lost"] or f["duplicates"] or f["out_of_order"]:
        sys.exit("fanmq lost, duplicated or reordered messages")
PY
}

run burst-qos0 --qos 0
run paced-qos1 --qos 1 --rate 200
echo "bench smoke: 2 passed, 0 failed"
