#!/usr/bin/env bash
# test_tune.sh: kernel-tuning/tune.sh check/apply/render.
# apply runs only inside a network namespace this test creates (unique name,
# deleted on exit) and only with --net-only, so the host is never changed:
# net.* values are per namespace, fs.* and the other host-wide values are
# only read. The test checks that the host's values are the same afterwards.
# Needs: root, iproute2 (ip netns).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

tune="$REPO_DIR/kernel-tuning/tune.sh"
scratch=$(mktemp -d)
ns="fanmq-test-$$-$RANDOM"
ns_made=0
holder_pid=""
cleanup() {
    if [ -n "$holder_pid" ]; then kill "$holder_pid" 2>/dev/null || true; fi
    if [ "$ns_made" -eq 1 ]; then ip netns del "$ns" 2>/dev/null || true; fi
    rm -rf "$scratch"
}
trap cleanup EXIT

# The per-namespace settings apply --net-only writes, and every setting.
netns_keys="net.core.somaxconn net.ipv4.tcp_max_syn_backlog net.ipv4.ip_local_port_range
    net.ipv4.tcp_rmem net.ipv4.tcp_wmem net.ipv4.tcp_fin_timeout net.ipv4.tcp_tw_reuse
    net.ipv4.tcp_max_tw_buckets"
all_keys="fs.file-max fs.nr_open $netns_keys net.core.netdev_max_backlog net.ipv4.tcp_mem
    net.netfilter.nf_conntrack_max net.netfilter.nf_conntrack_buckets"
val() { local p="/proc/sys/${1//.//}"; if [ -r "$p" ]; then tr -s ' \t' '  ' <"$p"; else echo "-"; fi; }
snapshot() { local k; for k in $all_keys; do echo "$k=$(val "$k")"; done; }
in_ns() { ip netns exec "$ns" "$@"; }

# ---- no privileges needed ----------------------------------------------------------
check "tune.sh is executable" test -x "$tune"
if command -v shellcheck >/dev/null 2>&1; then
    check "shellcheck tune.sh" shellcheck "$tune"
else
    skip "shellcheck not installed (apt-get install shellcheck)"
fi
"$tune" render >"$scratch/rendered.conf"
check "kernel-tuning/99-fanmq.conf is exactly 'tune.sh render' (1M connections)" \
    diff -u "$REPO_DIR/kernel-tuning/99-fanmq.conf" "$scratch/rendered.conf"
uncommented=$(awk '/^[^#]/ && NF && prev !~ /^#/ { print NR } { prev = $0 }' "$REPO_DIR/kernel-tuning/99-fanmq.conf")
check "every setting in 99-fanmq.conf has a comment above it${uncommented:+ (lines $uncommented)}" test -z "$uncommented"
for k in $all_keys; do
    check "99-fanmq.conf sets $k" grep -qE "^-?$k = " "$REPO_DIR/kernel-tuning/99-fanmq.conf"
done
setting() { sed -n "s/^-\{0,1\}$2 = //p" "$1"; }
"$tune" render --target-connections 100000 >"$scratch/100k.conf"
"$tune" render --target-connections 3000000 >"$scratch/3m.conf"
check_eq "100k: somaxconn scales down to 8192" 8192 "$(setting "$scratch/100k.conf" net.core.somaxconn)"
check_eq "100k: fs.nr_open stays at the kernel default 1048576" 1048576 "$(setting "$scratch/100k.conf" fs.nr_open)"
check_eq "100k: tcp_mem is N/2 N 2N pages" "50000 100000 200000" "$(setting "$scratch/100k.conf" net.ipv4.tcp_mem)"
check_eq "3M: fs.nr_open scales up to 4194304" 4194304 "$(setting "$scratch/3m.conf" fs.nr_open)"
check_eq "3M: fs.file-max is 2 x nr_open" 8388608 "$(setting "$scratch/3m.conf" fs.file-max)"
check_eq "3M: somaxconn capped at 65535" 65535 "$(setting "$scratch/3m.conf" net.core.somaxconn)"
check_eq "3M: conntrack max is N x 1.25 rounded up" 3801088 "$(setting "$scratch/3m.conf" net.netfilter.nf_conntrack_max)"
check "a bad target is a usage error (exit 2)" \
    bash -c "'$tune' check --target-connections 12x >/dev/null 2>&1; [ \$? -eq 2 ]"
check "an unknown command is a usage error (exit 2)" \
    bash -c "'$tune' frobnicate >/dev/null 2>&1; [ \$? -eq 2 ]"

if [ "$(id -u)" -ne 0 ] || ! command -v ip >/dev/null 2>&1; then
    skip "not root or no iproute2: network namespace tests"
    summary
    exit $?
fi

# ---- the process limit check (reads /proc/PID/limits, changes nothing) ---------------
bash -c 'ulimit -n 1000; exec sleep 60' &
holder_pid=$!
sleep 0.2
out=$("$tune" check --target-connections 100000 --pid "$holder_pid" 2>&1) && rc=0 || rc=$?
check_eq "check --pid with a 1000-fd process exits 1 (caps 100k)" 1 "$rc"
check "check --pid reports the process's open-file limits" grep -q "open files soft 1000, hard 1000" <<<"$out"
check "check --pid warns and says how to raise LimitNOFILE" grep -q "LimitNOFILE=131072" <<<"$out"
kill "$holder_pid" 2>/dev/null || true
wait "$holder_pid" 2>/dev/null || true
holder_pid=""

# ---- check and apply inside a network namespace ------------------------------------------
host_before=$(snapshot)
if ! ip netns add "$ns" 2>"$scratch/netns.err"; then
    skip "cannot create a network namespace here: $(cat "$scratch/netns.err")"
    summary
    exit $?
fi
ns_made=1
ok "created network namespace $ns"

target=100000
out=$(in_ns "$tune" check --target-connections "$target" 2>&1) && rc=0 || rc=$?
check "check runs in the namespace (exit 0 or 1, got $rc)" test "$rc" -le 1
for k in $all_keys; do
    check "check prints a row for $k" grep -q "^$k " <<<"$out"
done
check "check prints a summary" grep -q "^summary: " <<<"$out"
check "check sees it is in a namespace (host-wide netdev_max_backlog not visible)" \
    grep -q "^net.core.netdev_max_backlog .*global setting, not visible in this network namespace" <<<"$out"
check "check reads fs.nr_open inside the namespace" \
    grep -q "^fs.nr_open  *$(val fs.nr_open) " <<<"$out"
# A fresh namespace has somaxconn 4096 < 8192: below recommendation, so --strict fails.
check_eq "fresh namespace starts at the kernel default somaxconn" 4096 "$(in_ns cat /proc/sys/net/core/somaxconn)"
in_ns "$tune" check --target-connections "$target" --strict >/dev/null 2>&1 && rc=0 || rc=$?
check_eq "check --strict exits 1 before apply" 1 "$rc"

# Someone already raised tcp_max_syn_backlog above the recommendation: apply keeps it.
in_ns sh -c 'echo 100000 > /proc/sys/net/ipv4/tcp_max_syn_backlog'
conf="$scratch/sysctl.d/99-fanmq.conf"
out=$(in_ns "$tune" apply --net-only --target-connections "$target" --conf "$conf" 2>&1) && rc=0 || rc=$?
check_eq "apply --net-only exits 0" 0 "$rc"
check "apply wrote the conf file" test -f "$conf"
check_eq "conf file mode 644" 644 "$(file_mode "$conf")"
check_eq "conf file has exactly the 8 per-namespace settings" \
    "$(tr -s ' \n' '\n' <<<"$netns_keys" | sed '/^$/d' | sort)" "$(sed -n 's/^\([a-z][^ ]*\) = .*/\1/p' "$conf" | sort)"
check "conf file has no fs.* line" bash -c "! grep -q '^-\\{0,1\\}fs\\.' '$conf'"
check "conf file lines are commented" grep -q "^# Cap on every listener's accept queue" "$conf"

check_eq "namespace: somaxconn set" 8192 "$(in_ns cat /proc/sys/net/core/somaxconn)"
check_eq "namespace: tcp_max_syn_backlog kept (already higher)" 100000 "$(in_ns cat /proc/sys/net/ipv4/tcp_max_syn_backlog)"
check_eq "namespace: ip_local_port_range set" "10240 65535" "$(in_ns cat /proc/sys/net/ipv4/ip_local_port_range | tr -s '\t' ' ')"
check_eq "namespace: tcp_fin_timeout set" 15 "$(in_ns cat /proc/sys/net/ipv4/tcp_fin_timeout)"
check_eq "namespace: tcp_tw_reuse set" 1 "$(in_ns cat /proc/sys/net/ipv4/tcp_tw_reuse)"
check_eq "namespace: tcp_max_tw_buckets set" 262144 "$(in_ns cat /proc/sys/net/ipv4/tcp_max_tw_buckets)"
check_eq "namespace: tcp_rmem default lowered to 16384" 16384 "$(in_ns cat /proc/sys/net/ipv4/tcp_rmem | awk '{print $2}')"
check_eq "conf file records the kept value" 100000 "$(setting "$conf" net.ipv4.tcp_max_syn_backlog)"
for k in $netns_keys; do
    check "after apply, check says $k ok" bash -c "grep -q '^$k .* ok\$' <<<\"\$1\"" _ \
        "$(in_ns "$tune" check --target-connections "$target" 2>&1 || true)"
done
out=$(in_ns "$tune" apply --net-only --target-connections "$target" --conf "$conf" 2>&1) && rc=0 || rc=$?
check_eq "a second apply exits 0" 0 "$rc"
check "a second apply changes nothing (all kept)" bash -c "! grep -q '^set ' <<<\"\$1\"" _ "$out"

# ---- the host is untouched --------------------------------------------------------------
host_after=$(snapshot)
check_eq "host values of every setting unchanged" "$host_before" "$host_after"
check "no command is a usage error" bash -c "'$tune' >/dev/null 2>&1; [ \$? -eq 2 ]"

summary
