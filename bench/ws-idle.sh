#!/usr/bin/env bash
# Idle memory of MQTT.js subscribers over ws:// or wss:// (or mqtt://, mqtts://):
# RSS growth per connection of fanmq (1 shard) and FlashMQ (1 thread), in
# the same run, alternating rounds.
#
#   bench/ws-idle.sh TRANSPORT COUNT [ROUNDS] [HOLD_S]
#
# TRANSPORT: ws, wss, mqtt or mqtts. Needs `npm ci` in tests/node, a release build
# (cargo build --release -p fanmq) and FLASHMQ_BIN (skipped when unset).
# Broker on CPU 0, clients on CPU 1. For each broker and round it prints
# RSS before the clients, after all COUNT subscribed and HOLD_S seconds
# idle, the peak (VmHWM), and the growth per connection.
#
# MESSAGES=M then publishes M QoS 0 messages of 64 B (mosquitto_pub over
# plain TCP, one connection) to every subscriber, as fast as it goes, or
# PACE=R per second, and prints the broker's CPU-seconds per delivery
# (utime + stime from /proc, until the clients got all COUNT x M).
set -euo pipefail
transport=${1:?transport: ws, wss, mqtt or mqtts}
count=${2:?count}
rounds=${3:-1}
hold=${4:-10}
root=$(cd "$(dirname "$0")/.." && pwd)
fanmq=${FANMQ_BIN:-$root/target/release/fanmq}
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
ulimit -n 20000
# Below the ephemeral range (32768+), where other tests' clients take ports.
port=$((10000 + RANDOM % 20000))
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1 \
  -addext subjectAltName=IP:127.0.0.1 -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
case $transport in
  ws) url="ws://127.0.0.1:$port/mqtt" ;;
  wss) url="wss://127.0.0.1:$port/mqtt" ;;
  mqtt) url="mqtt://127.0.0.1:$port" ;;
  mqtts) url="mqtts://127.0.0.1:$port" ;;
  *) echo "unknown transport $transport" >&2; exit 2 ;;
esac

kib() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/status"; }

start_fanmq() {
  local listeners="listen = [\"127.0.0.1:$port\"]"
  if [ "$transport" != mqtt ]; then
    # fanmq's config calls the MQTT-over-TLS list tls_listen.
    listeners="listen = [\"127.0.0.1:$((port + 1))\"]
${transport/mqtts/tls}_listen = [\"127.0.0.1:$port\"]"
  fi
  cat > "$work/fanmq.toml" <<TOML
$listeners
certfile = "$work/cert.pem"
keyfile = "$work/key.pem"
shards = 1
http_listen = "127.0.0.1:$((port + 2))"
max_connections_per_ip = 0
max_connection_rate_per_ip = 0
max_connection_rate = 0
TOML
  taskset -c 0 "$fanmq" --config "$work/fanmq.toml" > "$work/fanmq.log" 2>&1 &
  echo $!
}

start_flashmq() {
  local protocol=mqtt tls=""
  case $transport in ws | wss) protocol=websockets ;; esac
  case $transport in wss | mqtts) tls="fullchain $work/cert.pem
  privkey $work/key.pem" ;; esac
  cat > "$work/flashmq.conf" <<CONF
thread_count 1
rlimit_nofile 20000
allow_anonymous true
listen {
  port $port
  protocol $protocol
  $tls
}
listen {
  port $((port + 1))
  protocol mqtt
}
CONF
  taskset -c 0 "$FLASHMQ_BIN" --config-file "$work/flashmq.conf" > "$work/flashmq.log" 2>&1 &
  echo $!
}

measure() {
  local broker=$1 pid
  pid=$("start_$broker")
  pids+=("$pid")
  sleep 2
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "$broker did not start:" >&2; cat "$work/$broker.log" >&2; exit 1
  fi
  local before hwm_before after hwm
  before=$(kib "$pid" VmRSS)
  hwm_before=$(kib "$pid" VmHWM)
  mkfifo "$work/hold"
  local messages=${MESSAGES:-0}
  taskset -c 1 node "$root/tests/node/ws_idle.mjs" "$url" "$count" "idle/$broker" \
    $((count * messages)) \
    < "$work/hold" > "$work/node.out" 2>&1 &
  local node=$!
  pids+=("$node")
  exec 3> "$work/hold"
  local waited=0
  until grep -q '^ready' "$work/node.out"; do
    if grep -q '^error' "$work/node.out" || [ $waited -ge 1200 ]; then
      echo "$broker: clients failed: $(cat "$work/node.out")" >&2; exit 1
    fi
    sleep 0.1; waited=$((waited + 1))
  done
  sleep "$hold"
  after=$(kib "$pid" VmRSS)
  hwm=$(kib "$pid" VmHWM)
  if [ "$messages" -gt 0 ]; then fan_out "$broker" "$pid" "$messages"; fi
  exec 3>&-
  wait "$node" || true
  rm -f "$work/hold"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  printf '%-8s %-5s %6d clients: RSS %7d -> %7d KiB, %6d B/conn; peak %7d KiB, %6d B/conn\n' \
    "$broker" "$transport" "$count" "$before" "$after" $(( (after - before) * 1024 / count )) \
    "$hwm" $(( (hwm - hwm_before) * 1024 / count ))
}

# Broker CPU ticks (utime + stime) so far.
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

fan_out() {
  local broker=$1 pid=$2 messages=$3 before spent payload waited=0
  payload=$(head -c 64 /dev/zero | tr '\0' x)
  before=$(ticks "$pid")
  for ((i = 0; i < messages; i++)); do
    echo "$payload"
    if [ -n "${PACE:-}" ]; then sleep "$(awk -v r="$PACE" 'BEGIN { print 1 / r }')"; fi
  done | taskset -c 1 mosquitto_pub -p $((port + 1)) -t "idle/$broker" -q 0 -l
  until grep -q '^received' "$work/node.out"; do
    if [ $waited -ge 1200 ]; then echo "$broker: not all messages arrived" >&2; exit 1; fi
    sleep 0.1; waited=$((waited + 1))
  done
  spent=$(( $(ticks "$pid") - before ))
  local hz
  hz=$(getconf CLK_TCK)
  printf '%-8s %-5s %6d clients x %d msgs%s: broker CPU %d ticks (1/%d s), %s deliveries per broker CPU-s\n' \
    "$broker" "$transport" "$count" "$messages" "${PACE:+ at $PACE/s}" "$spent" "$hz" \
    "$(awk -v d=$((count * messages)) -v t="$spent" -v hz="$hz" 'BEGIN { if (t == 0) print "inf"; else printf "%.0f", d * hz / t }')"
}

for ((round = 1; round <= rounds; round++)); do
  measure fanmq
  if [ -n "${FLASHMQ_BIN:-}" ]; then measure flashmq; fi
done
