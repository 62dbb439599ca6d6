#!/usr/bin/env bash
# test_systemd.sh: the real thing, under a real systemd. Boots a minimal
# Debian in a container (debootstrap + systemd-nspawn --boot, private
# network: only the container's own loopback is used), runs install.sh in it
# (user, files, daemon-reload, enable --now), and checks that fanmq.service
# becomes active only once it accepts MQTT connections (Type=notify), runs as
# user fanmq with no capabilities, NoNewPrivileges and a seccomp filter that
# still lets io_uring work, answers CONNECT with CONNACK, reloads on
# `systemctl reload` (SIGHUP), restarts after a crash, stops cleanly, and that
# install.sh --uninstall --purge removes it all.
#
# Opt-in (downloads ~100 MB of Debian packages, takes minutes):
#   FANMQ_TEST_SYSTEMD=1 tests/deploy/test_systemd.sh
# Needs root, debootstrap, systemd-container (apt-get install debootstrap
# systemd-container) and a release binary (FANMQ_BINARY, default
# target/release/fanmq; built with cargo when missing).
# FANMQ_TEST_ROOTFS=DIR reuses (or creates and keeps) a debootstrapped tree.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [ "${FANMQ_TEST_SYSTEMD:-0}" != 1 ]; then
    skip "opt-in: FANMQ_TEST_SYSTEMD=1 boots a Debian container with systemd-nspawn"
    summary
    exit $?
fi
for tool in debootstrap systemd-nspawn nsenter; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        skip "$tool not installed (apt-get install debootstrap systemd-container)"
        summary
        exit $?
    fi
done
if [ "$(id -u)" -ne 0 ]; then
    skip "needs root"
    summary
    exit $?
fi

scratch=$(mktemp -d)
rootfs=${FANMQ_TEST_ROOTFS:-$scratch/rootfs}
nspawn_pid=""
cleanup() {
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        kill -TERM "$nspawn_pid" 2>/dev/null || true   # nspawn shuts the container down
        for _ in $(seq 1 30); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 1; done
        kill -KILL "$nspawn_pid" 2>/dev/null || true
        wait "$nspawn_pid" 2>/dev/null || true
    fi
    rm -rf "$scratch"
}
trap cleanup EXIT

binary=${FANMQ_BINARY:-$REPO_DIR/target/release/fanmq}
if [ ! -x "$binary" ]; then
    echo "# building $binary"
    (cd "$REPO_DIR" && cargo build --release --locked --bin fanmq) >"$scratch/build.log" 2>&1 \
        || { fail "cargo build --release failed"; tail -20 "$scratch/build.log"; summary; exit 1; }
fi

if [ ! -x "$rootfs/lib/systemd/systemd" ]; then
    echo "# debootstrap bookworm into $rootfs"
    if debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps,passwd \
        bookworm "$rootfs" http://deb.debian.org/debian >"$scratch/debootstrap.log" 2>&1; then
        ok "debootstrap a minimal Debian 12"
    else
        fail "debootstrap failed"
        tail -20 "$scratch/debootstrap.log"
        summary
        exit 1
    fi
fi
echo fanmqtest >"$rootfs/etc/hostname"
rm -rf "$rootfs/root/fanmq"
mkdir -p "$rootfs/root/fanmq"
cp -r "$REPO_DIR/systemd" "$REPO_DIR/kernel-tuning" "$rootfs/root/fanmq/"
cp "$REPO_DIR/fanmq.toml" "$rootfs/root/fanmq/fanmq.toml" 2>/dev/null \
    || printf '# placeholder\n' >"$rootfs/root/fanmq/fanmq.toml"
cp "$binary" "$rootfs/root/fanmq/fanmq-bin"

systemd-nspawn -D "$rootfs" --boot --private-network --register=no --keep-unit \
    --console=passive --machine="fanmqtest$$" >"$scratch/nspawn.log" 2>&1 &
nspawn_pid=$!
# The container's PID 1 is nspawn's child.
leader=""
for _ in $(seq 1 30); do
    leader=$(pgrep -P "$nspawn_pid" | head -1 || true)
    [ -n "$leader" ] && break
    sleep 1
done
in_ct() { nsenter -t "$leader" -a "$@"; }
state=""
for _ in $(seq 1 60); do
    state=$(in_ct systemctl is-system-running 2>/dev/null || true)
    case "$state" in running|degraded) break ;; esac
    sleep 1
done
if ! case "$state" in running|degraded) true ;; *) false ;; esac; then
    fail "container did not boot (state '$state')"
    tail -20 "$scratch/nspawn.log"
    summary
    exit 1
fi
ok "container booted with systemd as PID 1 ($state)"

# ---- install.sh on a systemd host -------------------------------------------------------
out=$(in_ct /root/fanmq/systemd/install.sh --binary /root/fanmq/fanmq-bin 2>&1) && rc=0 || rc=$?
check_eq "install.sh exits 0" 0 "$rc"
check "install.sh created the user" grep -q '^+ useradd --system' <<<"$out"
check "install.sh ran daemon-reload" grep -q '^+ systemctl daemon-reload' <<<"$out"
check "install.sh ran enable --now" grep -q '^+ systemctl enable --now fanmq' <<<"$out"
check_eq "fanmq.service enabled" enabled "$(in_ct systemctl is-enabled fanmq)"
check_eq "fanmq.service active" active "$(in_ct systemctl is-active fanmq)"
journal() { in_ct journalctl -u fanmq -o cat --no-pager; }
# ready_before_started: the broker's "started:" line (logged once every shard
# listens, right before READY=1) comes before systemd's "Started fanmq.service".
ready_before_started() {
    local j s t
    j=$(journal)
    s=$(grep -n "started:" <<<"$j" | head -1 | cut -d: -f1)
    t=$(grep -n "^Started fanmq.service" <<<"$j" | head -1 | cut -d: -f1)
    [ -n "$s" ] && [ -n "$t" ] && [ "$s" -lt "$t" ]
}
check "Type=notify: systemd logs 'Started' only after the broker listens" ready_before_started

pid=$(in_ct systemctl show -p MainPID --value fanmq)
status=$(in_ct cat "/proc/$pid/status")
check_eq "runs as user fanmq" "$(in_ct id -u fanmq)" "$(awk '/^Uid:/ {print $2}' <<<"$status")"
check_eq "no effective capabilities" 0000000000000000 "$(awk '/^CapEff:/ {print $2}' <<<"$status")"
check_eq "empty capability bounding set" 0000000000000000 "$(awk '/^CapBnd:/ {print $2}' <<<"$status")"
check_eq "NoNewPrivs" 1 "$(awk '/^NoNewPrivs:/ {print $2}' <<<"$status")"
check_eq "seccomp filter active" 2 "$(awk '/^Seccomp:/ {print $2}' <<<"$status")"
check_eq "state dir owned by fanmq, 0750" "fanmq 750" "$(in_ct stat -c '%U %a' /var/lib/fanmq)"
# The packaged config keeps persistence in the state directory: the broker
# holds its LOCK and has made its retained journal there, as user fanmq.
check "persistence uses the state dir (LOCK, FORMAT)" in_ct test -f /var/lib/fanmq/LOCK -a -f /var/lib/fanmq/FORMAT
check_eq "retained journal dir owned by fanmq" fanmq "$(in_ct stat -c '%U' /var/lib/fanmq/retained)"

# MQTT 3.1.1 CONNECT (clean session, empty client id) -> CONNACK 20 02 00 00.
connack() {
    in_ct bash -c 'exec 3<>/dev/tcp/127.0.0.1/1883 || exit 1
        printf "\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00" >&3
        timeout 3 head -c 4 <&3 | od -An -tx1 | tr -s " " | sed "s/^ //"'
}
check_eq "CONNECT gets CONNACK (io_uring works under the filter)" "20 02 00 00" "$(connack || true)"

in_ct systemctl reload fanmq && rc=0 || rc=$?
check_eq "systemctl reload exits 0" 0 "$rc"
sleep 1
check "reload reached the broker (SIGHUP logged)" grep -q SIGHUP <<<"$(journal)"
check_eq "still the same process after reload" "$pid" "$(in_ct systemctl show -p MainPID --value fanmq)"

in_ct kill -KILL "$pid"
for _ in $(seq 1 15); do
    new=$(in_ct systemctl show -p MainPID --value fanmq)
    [ "$new" != 0 ] && [ "$new" != "$pid" ] && [ "$(in_ct systemctl is-active fanmq)" = active ] && break
    sleep 1
done
check_eq "Restart=on-failure restarted it after SIGKILL" 1 "$(in_ct systemctl show -p NRestarts --value fanmq)"
check_eq "CONNACK after the restart" "20 02 00 00" "$(connack || true)"

if limits=$(in_ct /root/fanmq/kernel-tuning/tune.sh check --target-connections 1000 2>&1); then :; fi
check "tune.sh check finds the service's process" grep -q "^process [0-9]* (fanmq)" <<<"$limits"
score=$(in_ct systemd-analyze security fanmq --no-pager 2>&1 | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
check "systemd-analyze security fanmq <= 2.0 (have '${score:-?}')" awk -v s="${score:-99}" 'BEGIN { exit !(s <= 2.0) }'

in_ct systemctl stop fanmq
check_eq "graceful stop: Result=success" success "$(in_ct systemctl show -p Result --value fanmq)"
check_eq "graceful stop: exit status 0" 0 "$(in_ct systemctl show -p ExecMainStatus --value fanmq)"

out=$(in_ct /root/fanmq/systemd/install.sh --uninstall --purge 2>&1) && rc=0 || rc=$?
check_eq "install.sh --uninstall --purge exits 0" 0 "$rc"
check_not "user fanmq removed" in_ct getent passwd fanmq
check_not "unit removed" in_ct test -e /lib/systemd/system/fanmq.service
check_not "binary removed" in_ct test -e /usr/bin/fanmq
check_not "no longer enabled" in_ct test -e /etc/systemd/system/multi-user.target.wants/fanmq.service

summary
