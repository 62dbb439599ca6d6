#!/usr/bin/env bash
# The benchmark on real remote paths, on this host: a fan-out split over two
# "load hosts" (issue 17), each a network namespace with several source
# addresses, against fanmq in a third namespace with its own address and two
# listeners. Traffic stays on the veth pairs between the namespaces.
#
#   broker ns  10.77.0.1 (on lo), listeners :1883 and :1884, admin :18083
#     vb1 10.77.1.1/24  <-veth->  load ns 1: vh1 10.77.1.8-11/24
#     vb2 10.77.2.1/24  <-veth->  load ns 2: vh2 10.77.2.8-11/24
#
# Part 2 only subscribes; part 1 subscribes, waits (--wait-subscribers) until
# the broker's /api/v1/stats counts every part's subscriptions, publishes;
# `fanmq-bench merge` makes the one result. Checks: nothing lost or
# duplicated over all subscribers, every source address and both listeners
# used, and plans past the host's limits refused naming the limit.
#
# Bounded: 2 x SUBS_PER_PART subscribers (default 9000), 20 messages, every
# command under `timeout`; the trap kills what it started and deletes the
# namespaces, also on failure. Needs root and `ip netns`; outside CI
# (CI != true) it skips without them, in CI it fails.
#
# Usage: bench/netns-test.sh [SUBS_PER_PART]
#        (after cargo build --release -p fanmq -p fanmq-bench)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bench="${FANMQ_BENCH_BIN:-$root/target/release/fanmq-bench}"
fanmq="${FANMQ_BIN:-$root/target/release/fanmq}"
per_part="${1:-9000}"
subs=$((2 * per_part))
msgs=20

skip() {
  if [ "${CI:-}" = true ]; then
    echo "netns test: cannot run: $1 (CI=true, so this fails)" >&2
    exit 1
  fi
  echo "netns test: skipped: $1"
  exit 0
}
[ "$(id -u)" = 0 ] || skip "not root"
command -v ip >/dev/null || skip "no ip command (iproute2)"
for bin in "$bench" "$fanmq"; do
  [ -x "$bin" ] || { echo "netns test: $bin missing: build it first" >&2; exit 1; }
done

tag="fmb$$"
br="$tag-br" l1="$tag-l1" l2="$tag-l2"
out="$(mktemp -d)"
broker_pid=""
cleanup() {
  local rc=$?
  set +e
  if [ -n "$broker_pid" ]; then
    kill "$broker_pid" 2>/dev/null
    wait "$broker_pid" 2>/dev/null
  fi
  for ns in "$l1" "$l2" "$br"; do
    if ip netns list 2>/dev/null | grep -qw "$ns"; then
      # Anything still running in it (a part after a failure): stop it.
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
      ip netns del "$ns" 2>/dev/null
    fi
  done
  rm -rf "$out"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$br" 2>/dev/null || skip "ip netns add failed (no network namespaces here)"
ip netns add "$l1"
ip netns add "$l2"
ip -n "$br" link set lo up
ip -n "$br" addr add 10.77.0.1/32 dev lo
for k in 1 2; do
  ns="$tag-l$k"
  ip link add "vb$k" netns "$br" type veth peer name "vh$k" netns "$ns"
  ip -n "$br" addr add "10.77.$k.1/24" dev "vb$k"
  ip -n "$br" link set "vb$k" up
  ip -n "$ns" link set lo up
  for a in 8 9 10 11; do ip -n "$ns" addr add "10.77.$k.$a/24" dev "vh$k"; done
  ip -n "$ns" link set "vh$k" up
  ip -n "$ns" route add 10.77.0.1/32 via "10.77.$k.1"
done

# An admin API off loopback needs credentials: a token for this run only.
token="netns-test-$$-$RANDOM"
printf 'http_auth_token = "%s"\n' "$token" >"$out/fanmq.toml"
ip netns exec "$br" "$fanmq" --config "$out/fanmq.toml" --listen 10.77.0.1:1883 \
  --listen 10.77.0.1:1884 --http-listen 10.77.0.1:18083 \
  --max-connections-per-ip 0 --max-connection-rate-per-ip 0 --max-connection-rate 0 --log-level warn >"$out/broker.log" 2>&1 &
broker_pid=$!
for _ in $(seq 100); do
  ip netns exec "$l1" bash -c 'exec 3<>/dev/tcp/10.77.0.1/1883' 2>/dev/null && break
  kill -0 "$broker_pid" 2>/dev/null || { cat "$out/broker.log" >&2; exit 1; }
  sleep 0.1
done

listeners="1883,1884"
common=(fanout --host 10.77.0.1 --ports "$listeners" --subs "$subs" --msgs "$msgs"
  --connect-timeout 60 --duration 60 --drain-timeout 5)
echo "netns test: 2 parts x $per_part subscribers, 4 source addresses each, 2 listeners"
timeout 150 ip netns exec "$l2" "$bench" "${common[@]}" --part 2/2 \
  --source-addrs 10.77.2.8-10.77.2.11 --out "$out/part2.json" >"$out/part2.log" 2>&1 &
part2=$!
timeout 150 ip netns exec "$l1" "$bench" "${common[@]}" --part 1/2 \
  --source-addrs 10.77.1.8/30 --wait-subscribers "$subs" \
  --stats-url http://10.77.0.1:18083/api/v1/stats --stats-token "$token" --out "$out/part1.json" >"$out/part1.log" 2>&1 ||
  { tail -30 "$out/part1.log" >&2; exit 1; }
wait "$part2" || { tail -30 "$out/part2.log" >&2; exit 1; }
"$bench" merge "$out/part1.json" "$out/part2.json" --out "$out/merged.json" --plots >"$out/merged.md"
for f in merged.json merged-latency.svg merged-rate.svg; do
  [ -s "$out/$f" ] || { echo "netns test: merge wrote no $f" >&2; exit 1; }
done

python3 - "$out" "$subs" "$msgs" <<'PY'
import json, sys
out, subs, msgs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
run = json.load(open(f"{out}/merged.json"))["runs"][0]
f, c = run["fanout"], run["connect"]
want_src = {f"10.77.{k}.{a}" for k in (1, 2) for a in (8, 9, 10, 11)}
want_dst = {"10.77.0.1:1883", "10.77.0.1:1884"}
fail = []
if c["connected"] != subs:
    fail.append(f"connected {c['connected']} of {subs}: {c['errors']}")
if f["expected"] != subs * msgs or f["delivered"] != f["expected"]:
    fail.append(f"delivered {f['delivered']} of {f['expected']} (want {subs * msgs})")
if f["lost"] or f["duplicates"] or f["out_of_order"]:
    fail.append(f"lost {f['lost']}, duplicates {f['duplicates']}, out of order {f['out_of_order']}")
if set(c["by_source"]) != want_src or min(c["by_source"].values()) == 0:
    fail.append(f"source addresses used: {c['by_source']}")
if set(c["by_target"]) != want_dst:
    fail.append(f"broker listeners used: {c['by_target']}")
per_sub = [
    json.load(open(f"{out}/part{k}.json"))["runs"][0]["generator"]["rss_per_subscriber"]
    for k in (1, 2)
]
print(
    f"netns test: 2 parts, {c['connected']} subscribers over {len(c['by_source'])} source "
    f"addresses ({min(c['by_source'].values())}-{max(c['by_source'].values())} each) and "
    f"{len(c['by_target'])} listeners; delivered {f['delivered']} of {f['expected']}, lost "
    f"{f['lost']}, {f['deliveries_per_s']:.0f} deliveries/s, p99 {f['latency']['p99_us']:.0f} us; "
    f"generator RSS per subscriber {per_sub[0]:.0f} / {per_sub[1]:.0f} B"
)
if fail:
    sys.exit("netns test: " + "; ".join(fail))
PY

# Plans past this host's limits are refused before any connection opens.
refused() { # what the message must name, then the bench options
  local limit=$1
  shift
  if timeout 30 ip netns exec "$l1" "$bench" fanout --host 10.77.0.1 --ports "$listeners" \
    --msgs 1 "$@" >"$out/refused.log" 2>&1; then
    echo "netns test: a plan past $limit ran" >&2
    exit 1
  fi
  if ! grep -q "refused: the plan does not fit" "$out/refused.log" ||
    ! grep -q "$limit" "$out/refused.log"; then
    cat "$out/refused.log" >&2
    exit 1
  fi
  echo "netns test: refused, naming $limit: $(grep -o "${limit}[^;]*" "$out/refused.log" | head -1)"
}
refused "ephemeral ports" --source-addrs 10.77.1.8-10.77.1.11 --subs 300000
refused "RLIMIT_NOFILE" --source-addrs 10.77.1.8-10.77.1.11 --subs 30000 --workers 1
refused "not configured" --source-addrs 10.77.1.8-10.77.1.12 --subs 10
echo "netns test: passed"
