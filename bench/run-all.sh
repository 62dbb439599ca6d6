#!/usr/bin/env bash
# The full benchmark behind bench/RESULTS.md: every scenario of
# ../shared/BENCH.md at 10k-15k connections, fanmq side by side with
# FlashMQ, Mosquitto, rumqttd and the raw TCP forwarder in the same run
# (A B A B), broker on CPU 0 and load generator on CPU 1 (FlashMQ with 1
# thread there, and 1 and 2 in the multi-core run). Writes bench/results/*.json
# and bench/plots/*.svg, then regenerates bench/RESULTS.md.
#
# Usage: bench/run-all.sh          (after bench/peers.sh; takes ~50 minutes)
# Every run is bounded by --duration; traffic stays on 127.0.0.1.
# A peer that is not installed (FlashMQ not built, no mosquitto or rumqttd
# on PATH) is left out of every comparison, with a message saying so.
#
# `$(peers ...)` is split into --compare's arguments on purpose (specs
# hold no spaces).
# shellcheck disable=SC2046
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cargo build --release -p fanmq -p fanmq-bench
target="${CARGO_TARGET_DIR:-$root/target}"
export FANMQ_BIN="$target/release/fanmq"
# FlashMQ as bench/peers.sh builds it, unless FLASHMQ_BIN names another.
export FLASHMQ_BIN="${FLASHMQ_BIN:-$root/bench/peers/flashmq/build/flashmq}"
bench="$target/release/fanmq-bench"
results="$root/bench/results"
mkdir -p "$results"
pin=(--broker-cpus 0 --client-cpus 1)

# Whether peer $1 (a --compare spec) can be started here.
installed() {
  case $1 in
    flashmq | flashmq:*) [ -x "$FLASHMQ_BIN" ] ;;
    mosquitto | rumqttd) command -v "$1" >/dev/null ;;
    *) true ;; # fanmq (built above), raw (the bench's own).
  esac
}
for peer in flashmq mosquitto rumqttd; do
  if ! installed "$peer"; then
    echo "run-all: $peer is not installed (see bench/peers.sh): left out of every comparison" >&2
  fi
done

# The installed ones of the peers $@, as --compare's arguments.
peers() {
  local peer
  for peer in "$@"; do
    if installed "$peer"; then printf '%s ' "$peer"; fi
  done
}

run() { # name, args...
  local name=$1
  shift
  echo "=== $name"
  "$bench" "$@" --out "bench/results/$name.json" --plots | tail -12
}

# --drain-timeout 30: FlashMQ on one core handles the whole burst before it
# writes its first delivery, more than the default 5 s after the last
# publish at 10k subscribers; with 5 s it would count as losing everything.
run fanout-burst-10k fanout --subs 10000 --msgs 500 --duration 120 --rounds 2 --drain-timeout 30 \
  --compare $(peers fanmq flashmq mosquitto rumqttd raw) "${pin[@]}"
run fanout-paced-10k fanout --subs 10000 --msgs 100 --rate 20 --duration 60 --rounds 2 \
  --compare $(peers fanmq flashmq mosquitto rumqttd raw) "${pin[@]}"
run fanout-qos1-10k fanout --subs 10000 --msgs 50 --qos 1 --duration 120 --rounds 2 --drain-timeout 30 \
  --compare $(peers fanmq flashmq mosquitto rumqttd) "${pin[@]}"
run fanout-filter-10k fanout --subs 10000 --msgs 500 --filter 'bench/+' --duration 120 --rounds 2 --drain-timeout 30 \
  --compare $(peers fanmq flashmq mosquitto rumqttd) "${pin[@]}"
# Browser-style subscribers: MQTT over WebSocket, plain and over TLS (the
# bench's own test certificate), against FlashMQ's websockets listener.
for transport in ws wss; do
  run fanout-$transport-burst-10k fanout --transport $transport --subs 10000 --msgs 100 --rounds 2 \
    --drain-timeout 30 --compare $(peers fanmq flashmq) "${pin[@]}"
  run fanout-$transport-paced-10k fanout --transport $transport --subs 10000 --msgs 100 --rate 20 \
    --rounds 2 --compare $(peers fanmq flashmq) "${pin[@]}"
done
run idle-15k idle --subs 15000 --hold 10 --compare $(peers fanmq flashmq mosquitto rumqttd raw) "${pin[@]}"
run connect-1k connect --subs 1000 --rounds 3 --compare $(peers fanmq flashmq mosquitto rumqttd) "${pin[@]}"
run connect-15k connect --subs 15000 --rounds 3 --compare $(peers fanmq flashmq mosquitto rumqttd) "${pin[@]}"
run storm-10k storm --subs 10000 --compare $(peers fanmq flashmq mosquitto rumqttd) "${pin[@]}"
# Multi-core: the same burst with 1 and 2 shards (FlashMQ: threads); broker and generator share
# both CPUs, so compare the broker's CPU-seconds per delivery.
run multicore-burst-10k fanout --subs 10000 --msgs 500 --duration 120 --rounds 2 --drain-timeout 30 \
  --compare $(peers fanmq:1 fanmq:2 flashmq flashmq:2) --broker-cpus 0,1 --client-cpus 0,1
# Issue 3's latency target: find fanmq's max sustained rate R_max for N
# subscribers (open-loop steps of 5 s, doubling then bisecting to 10%, at most
# 16 steps), then 60 s at R_max / 2: p99 against 1.2 x N / (R_max x N) and
# the backlog growth. About 2-3 minutes per broker. Each broker is measured
# at half of its own maximum. At 10k subscribers Mosquitto's maximum (~4
# msg/s) is below the search's floor (50 messages per 5 s step), so 10k is
# fanmq alone.
run latency-1k latency --subs 1000 --duration 60 \
  --compare $(peers fanmq flashmq mosquitto rumqttd) "${pin[@]}"
run latency-10k latency --subs 10000 --duration 60 --compare fanmq "${pin[@]}"
# Issue 15's fixed-rate latency: 100 msg/s to 10k subscribers for 30 s, p99
# publish→subscriber against the plain forwarder's and FlashMQ's in the same run.
run fanout-rate100-10k fanout --subs 10000 --msgs 3000 --rate 100 --duration 60 --rounds 2 \
  --compare $(peers fanmq flashmq raw) "${pin[@]}"
# The write-up's own test: 1 message per second for 60 s to 10k subscribers
# (p99 publish→last subscriber, broker CPU per message).
run writeup-1msgs-10k fanout --subs 10000 --msgs 60 --rate 1 --duration 90 \
  --compare $(peers fanmq flashmq mosquitto raw) "${pin[@]}"
# The soak: 15k subscribers, fanmq's R_max searched, then 10 minutes at
# R_max / 2; the broker's RSS is sampled every second (`-rss.svg`) and must
# stay flat.
run soak-15k latency --subs 15000 --duration 600 --compare fanmq "${pin[@]}"

cargo run -q -p fanmq-bench --release -- report
