#!/usr/bin/env bash
# How a shared subscription group spreads over nodes (docs/design/cluster.md,
# "What is built", shared subscriptions): one nats-server -js, two fanmq
# nodes A and B of one shard each, MEMBERS_A members of `$share/g/skew` on A
# and MEMBERS_B on B (mosquitto_sub), MESSAGES QoS 1 messages published with
# mosquitto_pub on A, then MESSAGES on B. Prints what each member got; with
# members weighted, each gets about MESSAGES / (MEMBERS_A + MEMBERS_B).
#
# Usage: bench/cluster-shared.sh [MESSAGES] [MEMBERS_A] [MEMBERS_B]
# Needs: FANMQ (default target/release/fanmq, else target/debug/fanmq),
# nats-server (or NATS_SERVER=...), mosquitto_pub/mosquitto_sub. Every
# process it starts is killed on exit, and each has a timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
MA=${2:-1}
MB=${3:-9}
BIN=${FANMQ:-target/release/fanmq}
[ -x "$BIN" ] || BIN=target/debug/fanmq
NATS=${NATS_SERVER:-nats-server}
D=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$D"' EXIT
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
NP=$(free)
timeout 300 "$NATS" -js -a 127.0.0.1 -p "$NP" -sd "$D/js" >/dev/null 2>&1 &
sleep 1
declare -A PORT
for n in a b; do
  PORT[$n]=$(free)
  printf 'http_listen = "127.0.0.1:%s"\n[cluster]\nnats_urls = ["nats://127.0.0.1:%s"]\nnode_name = "%s"\n' \
    "$(free)" "$NP" "$n" >"$D/$n.toml"
  timeout 300 "$BIN" --config "$D/$n.toml" --listen "127.0.0.1:${PORT[$n]}" --shards 1 >"$D/$n.log" 2>&1 &
done
sleep 2
for n in a b; do
  count=$([ "$n" = a ] && echo "$MA" || echo "$MB")
  for i in $(seq 1 "$count"); do
    # shellcheck disable=SC2016 # a literal $share topic filter
    timeout 120 mosquitto_sub -p "${PORT[$n]}" -t '$share/g/skew' -q 1 -W 100 -i "m-$n$i" >"$D/m-$n$i" &
  done
done
sleep 2
for side in a b; do
  seq 1 "$N" | sed "s/^/$side-/" | timeout 120 mosquitto_pub -p "${PORT[$side]}" -t skew -q 1 -l
  sleep 2
  line="published on $side:"
  total=0
  for f in "$D"/m-*; do
    got=$(grep -c "^$side-" "$f" || true)
    total=$((total + got))
    line="$line ${f##*/m-}=$got"
  done
  echo "$line total=$total of $N"
done
