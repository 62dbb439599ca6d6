#!/usr/bin/env bash
# Client interoperability: fanmq against mosquitto_pub / mosquitto_sub (Debian
# mosquitto-clients) and Python paho-mqtt. Starts the release broker on free
# ports with 2 shards (plain MQTT, TLS with a certificate made here by
# openssl, WebSocket), runs every check, stops the broker (also on failure)
# and prints "N passed, M failed".
#
# Usage: tests/interop/run.sh [path/to/fanmq]
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${1:-$root/target/release/fanmq}"
work="$(mktemp -d)"
broker_pid=""

cleanup() {
  if [ -n "$broker_pid" ] && kill -0 "$broker_pid" 2>/dev/null; then
    kill -KILL "$broker_pid" 2>/dev/null || true
  fi
  jobs -p | xargs -r kill 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok   - $1"; }
fail() { failed=$((failed + 1)); echo "FAIL - $1${2:+: $2}"; }

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$work/key.pem" -out "$work/cert.pem" -days 1 -subj /CN=localhost \
  -addext subjectAltName=IP:127.0.0.1,DNS:localhost 2>/dev/null
"$bin" --listen 127.0.0.1:0 --shards 2 --http-listen off --log-level info \
  --tls-listen 127.0.0.1:0 --certfile "$work/cert.pem" --keyfile "$work/key.pem" \
  --ws-listen 127.0.0.1:0 2>"$work/broker.log" &
broker_pid=$!
port=""
for _ in $(seq 1 100); do
  port="$(grep -o 'listening on 127.0.0.1:[0-9]*' "$work/broker.log" | head -1 | cut -d: -f2 || true)"
  [ -n "$port" ] && break
  sleep 0.1
done
if [ -z "$port" ]; then
  cat "$work/broker.log"
  echo "0 passed, 1 failed"
  exit 1
fi
tls_port="$(grep -o 'tls 127.0.0.1:[0-9]*' "$work/broker.log" | head -1 | cut -d: -f2 || true)"
ws_port="$(grep -o 'ws 127.0.0.1:[0-9]*' "$work/broker.log" | head -1 | cut -d: -f2 || true)"
echo "# fanmq on port $port, TLS $tls_port, WebSocket $ws_port (pid $broker_pid)"

sub() { mosquitto_sub -h 127.0.0.1 -p "$port" "$@"; }
# Every client runs under a timeout, so a hung client fails the run instead
# of hanging it.
pub() { timeout 10 mosquitto_pub -h 127.0.0.1 -p "$port" "$@"; }

# Waits until a background mosquitto_sub has subscribed: it prints nothing
# until then, so we publish a retained marker per check and wait for it.
wait_for_line() { # file pattern
  for _ in $(seq 1 100); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  return 1
}

# 1. mosquitto_pub -> mosquitto_sub, each QoS, order kept.
for qos in 0 1 2; do
  out="$work/sub$qos.txt"
  timeout 20 mosquitto_sub -h 127.0.0.1 -p "$port" -t "interop/q$qos/#" -t "ready/q$qos" -q "$qos" -C 101 -v >"$out" &
  spid=$!
  for _ in $(seq 1 50); do pub -t "ready/q$qos" -m go -q 1; wait_for_line "$out" "ready/q$qos" && break; done
  # mosquitto_pub 2.0.11 -l sometimes never exits once stdin ends, after it
  # sent every line (a race in the client: mosquitto issue 1448, seen here
  # in CI with all 100 messages delivered and the connection still open).
  # The timeout ends it; what the check asserts is what the subscriber got.
  seq 1 100 | timeout 20 mosquitto_pub -h 127.0.0.1 -p "$port" -t "interop/q$qos/n" -q "$qos" -l || true
  if wait "$spid"; then
    got="$(grep -c "^interop/q$qos/n " "$out" || true)"
    expected="$(seq 1 100 | sed "s|^|interop/q$qos/n |")"
    if [ "$got" = 100 ] && [ "$(grep "^interop/q$qos/n " "$out")" = "$expected" ]; then
      pass "mosquitto_pub/sub QoS $qos: 100 messages in order"
    else
      fail "mosquitto_pub/sub QoS $qos" "got $got"
    fi
  else
    fail "mosquitto_pub/sub QoS $qos" "subscriber timed out"
  fi
done

# 2. Retained message with the retain flag on SUBSCRIBE, then deleted.
pub -t interop/retained -m kept -r -q 1
line="$(timeout 5 mosquitto_sub -h 127.0.0.1 -p "$port" -t interop/retained -C 1 -F '%r %t %p' || true)"
[ "$line" = "1 interop/retained kept" ] && pass "retained delivered with RETAIN=1" || fail "retained" "$line"
pub -t interop/retained -m '' -r -n 2>/dev/null || pub -t interop/retained -r -n
pub -t interop/after -m marker -r
line="$(timeout 5 mosquitto_sub -h 127.0.0.1 -p "$port" -t interop/retained -t interop/after -C 1 -F '%t' || true)"
[ "$line" = "interop/after" ] && pass "retained deleted by an empty payload" || fail "retained delete" "$line"

# 3. MQTT 3.1 (MQIsdp) clients.
pub -V mqttv31 -t interop/v31 -m old -r
line="$(timeout 5 mosquitto_sub -V mqttv31 -h 127.0.0.1 -p "$port" -t interop/v31 -C 1 || true)"
[ "$line" = "old" ] && pass "MQTT 3.1 (MQIsdp) publish and subscribe" || fail "MQTT 3.1" "$line"

# 4. MQTT 5.0 clients, with a user property forwarded to a 5.0 subscriber
#    and the plain message to a 3.1.1 one.
pub -V mqttv5 -t interop/v5 -m five -r -q 1 -D publish user-property k v
line="$(timeout 5 mosquitto_sub -V mqttv5 -h 127.0.0.1 -p "$port" -t interop/v5 -C 1 -F '%r %p %P' || true)"
[ "$line" = "1 five k:v" ] && pass "MQTT 5.0 publish and subscribe, user property forwarded" || fail "MQTT 5.0" "$line"
line="$(timeout 5 mosquitto_sub -h 127.0.0.1 -p "$port" -t interop/v5 -C 1 || true)"
[ "$line" = "five" ] && pass "MQTT 5.0 publish, 3.1.1 subscriber" || fail "MQTT 5.0 to 3.1.1" "$line"

# 5. $SYS topics (published every sys_interval, retained).
line="$(timeout 15 mosquitto_sub -h 127.0.0.1 -p "$port" -t '$SYS/broker/version' -C 1 || true)"
case "$line" in fanmq*) pass "\$SYS/broker/version: $line" ;; *) fail "\$SYS/broker/version" "$line" ;; esac

# 6. paho-mqtt: persistent session, offline QoS 1 queue, will, QoS 2.
if python3 "$here/paho_checks.py" 127.0.0.1 "$port" >"$work/paho.txt" 2>&1; then
  pass "paho-mqtt checks ($(tail -1 "$work/paho.txt"))"
else
  cat "$work/paho.txt"
  fail "paho-mqtt checks"
fi

# 6b. paho-mqtt speaking MQTT 5.0: CONNECT/CONNACK properties, session
#     expiry, subscription options and identifiers, PUBLISH properties,
#     request/response.
if python3 "$here/paho_v5.py" 127.0.0.1 "$port" >"$work/paho_v5.txt" 2>&1; then
  pass "paho-mqtt MQTT 5.0 checks ($(tail -1 "$work/paho_v5.txt"))"
else
  cat "$work/paho_v5.txt"
  fail "paho-mqtt MQTT 5.0 checks"
fi

# 7. TLS: mosquitto_sub over TLS gets what mosquitto_pub sends in plain.
out="$work/tls.txt"
timeout 20 mosquitto_sub -h 127.0.0.1 -p "$tls_port" --cafile "$work/cert.pem" \
  -t interop/tls -t ready/tls -C 11 >"$out" &
spid=$!
for _ in $(seq 1 50); do pub -t ready/tls -m go; wait_for_line "$out" go && break; done
for i in $(seq 1 10); do pub -t interop/tls -m "t$i" -q 1; done
if wait "$spid" && [ "$(grep '^t' "$out" | tr '\n' ' ')" = "$(seq -f 't%g' 1 10 | tr '\n' ' ')" ]; then
  pass "mosquitto_sub --cafile over TLS: 10 messages in order"
else
  fail "mosquitto_sub over TLS" "$(tr '\n' ' ' <"$out")"
fi

# 8. paho-mqtt over WebSocket and TLS, mixed with plain TCP.
if python3 "$here/paho_transports.py" 127.0.0.1 "$port" "$tls_port" "$ws_port" "$work/cert.pem" >"$work/paho_transports.txt" 2>&1; then
  pass "paho-mqtt over TLS and WebSocket ($(tail -1 "$work/paho_transports.txt"))"
else
  cat "$work/paho_transports.txt"
  fail "paho-mqtt over TLS and WebSocket"
fi

# 9. SIGTERM: graceful exit with status 0.
kill -TERM "$broker_pid"
status=0
timeout 10 tail --pid="$broker_pid" -f /dev/null || true
wait "$broker_pid" || status=$?
broker_pid=""
[ "$status" = 0 ] && pass "SIGTERM: exit status 0" || fail "SIGTERM" "exit status $status"

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
