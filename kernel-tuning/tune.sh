#!/usr/bin/env bash
# tune.sh: check or apply the kernel settings fanmq needs for N connections.
#
#   tune.sh check  [--target-connections N] [--pid PID] [--strict]
#       Prints current vs recommended for every setting, and the fanmq
#       process's own limits. Exits 1 when a setting caps the target (it would
#       stop connection N from being accepted), 0 otherwise (--strict: also 1
#       when a setting is merely below its recommendation).
#   tune.sh apply  [--target-connections N] [--conf FILE] [--net-only] [--pid PID]
#       Writes the sysctl file (default /etc/sysctl.d/99-fanmq.conf) and loads
#       it by writing /proc/sys. A value already better than the recommendation
#       is kept, never lowered. --net-only touches only the net.* settings that
#       every network namespace has its own copy of (use it in tests, inside
#       `ip netns exec`); global settings (fs.*, netdev_max_backlog, tcp_mem,
#       conntrack) are then left alone and left out of the file. In a network
#       namespace other than PID 1's, global settings are never written.
#   tune.sh render [--target-connections N]
#       Prints the sysctl file with the plain recommendations for N (no
#       current values taken into account). kernel-tuning/99-fanmq.conf is
#       `tune.sh render` for N = 1000000.
#
# The arithmetic behind every value is in kernel-tuning/README.md.
set -euo pipefail

readonly DEFAULT_TARGET=1000000
readonly DEFAULT_CONF=/etc/sysctl.d/99-fanmq.conf
# File descriptors the broker needs besides one per connection: listeners per
# shard, io_uring rings, eventfds, timers, the log. Generous on purpose.
readonly FD_HEADROOM=4096
# File handles the rest of the host needs besides the broker.
readonly HOST_FILES=65536
# Measured here with measure_socket_memory.py (kernel 6.18, x86-64): slab
# bytes of one idle TCP socket (tcp_sock + socket inode + file + dentry + poll
# entry), TIME_WAIT mini-socket, one conntrack entry (nf_conntrack slab object).
readonly SOCK_BYTES=3740
readonly TW_BYTES=256
readonly CT_BYTES=256

# The settings, in file order. Scope: "netns" = each network namespace has
# its own value; "global" = one value for the host (fs.* and a few net.*).
readonly KEYS=(
    fs.file-max
    fs.nr_open
    net.core.somaxconn
    net.ipv4.tcp_max_syn_backlog
    net.core.netdev_max_backlog
    net.ipv4.ip_local_port_range
    net.ipv4.tcp_mem
    net.ipv4.tcp_rmem
    net.ipv4.tcp_wmem
    net.ipv4.tcp_fin_timeout
    net.ipv4.tcp_tw_reuse
    net.ipv4.tcp_max_tw_buckets
    net.netfilter.nf_conntrack_max
    net.netfilter.nf_conntrack_buckets
)

scope() {
    case "$1" in
        net.core.somaxconn|net.ipv4.tcp_max_syn_backlog|net.ipv4.ip_local_port_range|\
        net.ipv4.tcp_rmem|net.ipv4.tcp_wmem|net.ipv4.tcp_fin_timeout|net.ipv4.tcp_tw_reuse|\
        net.ipv4.tcp_max_tw_buckets) echo netns ;;
        *) echo global ;;
    esac
}

# Settings that only exist while a kernel module is loaded: their sysctl.d
# lines start with "-" so that loading the file does not fail without it.
optional() {
    case "$1" in net.netfilter.*) return 0 ;; *) return 1 ;; esac
}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() { echo "tune.sh: error: $*" >&2; exit 2; }

cmd=""
target=$DEFAULT_TARGET
conf=$DEFAULT_CONF
pid=""
net_only=0
strict=0

[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in
    check|apply|render) cmd=$1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown command: $1" ;;
esac
while [ $# -gt 0 ]; do
    case "$1" in
        --target-connections) [ $# -ge 2 ] || die "$1 needs a number"; target=$2; shift 2 ;;
        --target-connections=*) target=${1#*=}; shift ;;
        --conf) [ $# -ge 2 ] || die "$1 needs a file"; conf=$2; shift 2 ;;
        --conf=*) conf=${1#*=}; shift ;;
        --pid) [ $# -ge 2 ] || die "$1 needs a process id"; pid=$2; shift 2 ;;
        --pid=*) pid=${1#*=}; shift ;;
        --net-only) net_only=1; shift ;;
        --strict) strict=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
case "$target" in ''|*[!0-9]*) die "--target-connections must be a positive integer" ;; esac
if [ "$target" -lt 1 ] || [ "$target" -gt 100000000 ]; then
    die "--target-connections must be 1..100000000"
fi
if [ -n "$pid" ]; then
    case "$pid" in *[!0-9]*) die "--pid must be a process id" ;; esac
fi

page=$(getconf PAGESIZE 2>/dev/null || echo 4096)
mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
mem_pages=$(( mem_kb * 1024 / page ))

# ---- arithmetic helpers -------------------------------------------------------
pow2ceil() { local v=1; while [ "$v" -lt "$1" ]; do v=$(( v * 2 )); done; echo "$v"; }
max() { if [ "$1" -ge "$2" ]; then echo "$1"; else echo "$2"; fi; }
min() { if [ "$1" -le "$2" ]; then echo "$1"; else echo "$2"; fi; }
clamp() { min "$(max "$1" "$2")" "$3"; }
roundup() { echo $(( ($1 + $2 - 1) / $2 * $2 )); }
# human BYTES: 1.5 GiB style.
human() {
    awk -v b="$1" 'BEGIN { split("B KiB MiB GiB TiB", u, " "); i = 1;
        while (b >= 1024 && i < 5) { b /= 1024; i++ }
        if (i == 1) printf "%d B", b; else printf "%.1f %s", b, u[i] }'
}

# ---- the recommendations for $target --------------------------------------------
fds=$(( target + FD_HEADROOM ))
rec_nr_open=$(max 1048576 "$(pow2ceil "$fds")")
rec_file_max=$(( 2 * rec_nr_open ))
rec_backlog=$(clamp "$(pow2ceil $(( target / 16 )))" 4096 65535)
rec_netdev=$(clamp "$(pow2ceil $(( target / 64 )))" 1000 65536)
rec_tw=$(max 262144 "$(pow2ceil "$target")")
rec_ct=$(max 262144 "$(roundup $(( target + target / 4 )) 65536)")
rec_mem_low=$(( target / 2 ))
rec_mem_pressure=$target
rec_mem_max=$(( target * 2 ))

# rec KEY: the plain recommendation (what `render` writes).
rec() {
    case "$1" in
        fs.file-max) echo "$rec_file_max" ;;
        fs.nr_open) echo "$rec_nr_open" ;;
        net.core.somaxconn|net.ipv4.tcp_max_syn_backlog) echo "$rec_backlog" ;;
        net.core.netdev_max_backlog) echo "$rec_netdev" ;;
        net.ipv4.ip_local_port_range) echo "10240 65535" ;;
        net.ipv4.tcp_mem) echo "$rec_mem_low $rec_mem_pressure $rec_mem_max" ;;
        net.ipv4.tcp_rmem) echo "4096 16384 6291456" ;;
        net.ipv4.tcp_wmem) echo "4096 16384 4194304" ;;
        net.ipv4.tcp_fin_timeout) echo 15 ;;
        net.ipv4.tcp_tw_reuse) echo 1 ;;
        net.ipv4.tcp_max_tw_buckets) echo "$rec_tw" ;;
        net.netfilter.nf_conntrack_max|net.netfilter.nf_conntrack_buckets) echo "$rec_ct" ;;
        *) die "no recommendation for $1" ;;
    esac
}

# comment KEY: the lines above KEY in the file: what, why, memory at $target.
comment() {
    local n=$target
    case "$1" in
        fs.file-max) cat <<EOF
# Host-wide cap on open file handles (every socket is one). Needs the broker's
# $fds (N + $FD_HEADROOM) plus the rest of the host; 2 x fs.nr_open leaves room.
# A cap, not an allocation: a handle costs ~200 B only while open, counted in
# the socket's $SOCK_BYTES B below.
EOF
        ;;
        fs.nr_open) cat <<EOF
# Largest RLIMIT_NOFILE a process may get: the ceiling for the unit's
# LimitNOFILE (1048576). One fd per connection + $FD_HEADROOM spare = $fds,
# rounded up to a power of two. A cap, no memory of its own.
EOF
        ;;
        net.core.somaxconn) cat <<EOF
# Cap on every listener's accept queue (the broker asks for its configured
# backlog, this clamps it). After a restart all $n clients reconnect at once;
# N/16 per queue (max 65535) absorbs the burst while shards accept. Queued
# connections cost a full socket (~$SOCK_BYTES B) each: $(human $(( rec_backlog * SOCK_BYTES ))) per full queue.
EOF
        ;;
        net.ipv4.tcp_max_syn_backlog) cat <<EOF
# Half-open connections (SYN received, handshake not done) per listener;
# beyond it SYN cookies take over (tcp_syncookies=1, the default). Same size as
# the accept queue. A request_sock is ~320 B: $(human $(( rec_backlog * 320 ))) when full.
EOF
        ;;
        net.core.netdev_max_backlog) cat <<EOF
# Packets queued per CPU between the NIC and the TCP stack. 1000 (default)
# drops packets in a reconnect storm of $n clients; N/64 (max 65536).
# At most $(human $(( rec_netdev * 2048 ))) per CPU, only while the queue is full.
EOF
        ;;
        net.ipv4.ip_local_port_range) cat <<EOF
# Source ports for outgoing connections: load generators and bridges, not the
# broker's inbound clients. 55296 ports per (source IP, destination) pair:
# $n client connections to one broker address need $(( (n + 55295) / 55296 )) source IP(s).
# Starts at 10240 so ephemeral ports never take 1883/8883. No memory.
EOF
        ;;
        net.ipv4.tcp_mem) cat <<EOF
# Host-wide TCP buffer memory, in $page-byte pages: low, pressure, max. An idle
# socket uses none; one with any data queued (a fan-out message not yet ACKed)
# charges at least one page (measured: 100 B queued = 1 page). So pressure = 1
# page per connection ($(human $(( rec_mem_pressure * page ))) at $n), max = 2 pages ($(human $(( rec_mem_max * page )))).
# A cap, used only by data in flight; keep max below half the host's RAM.
EOF
        ;;
        net.ipv4.tcp_rmem) cat <<EOF
# Per-socket receive buffer: min, default, max (bytes). Subscribers send
# little (PINGREQ, PUBACK), so a 16 KiB starting window is enough; autotuning
# still grows publishers' buffers up to max. Idle sockets hold none; worst
# case if every socket filled its default: $(human $(( n * 16384 ))) (tcp_mem caps it).
EOF
        ;;
        net.ipv4.tcp_wmem) cat <<EOF
# Per-socket send buffer: min, default, max (bytes); the kernel's defaults.
# A slow subscriber fills 16 KiB, then the broker's own bounded queue takes
# over (it drops QoS 0 for that client only). Idle sockets hold none; worst
# case if every socket filled its default: $(human $(( n * 16384 ))) (tcp_mem caps it).
EOF
        ;;
        net.ipv4.tcp_fin_timeout) cat <<EOF
# Seconds an orphaned connection waits in FIN_WAIT_2 for the peer's FIN.
# 60 (default) keeps sockets of vanished clients for a minute after the broker
# closes them (take-over, kicks); 15 frees them sooner. As TIME_WAIT-sized
# mini-sockets: $(human $(( n * TW_BYTES ))) if all $n closed at once.
EOF
        ;;
        net.ipv4.tcp_tw_reuse) cat <<EOF
# Reuse a TIME_WAIT port for a new outgoing connection when TCP timestamps
# make it safe (1; default 2 = loopback only). Matters for load generators
# and bridges opening many connections; the broker's listener is unaffected.
# No memory.
EOF
        ;;
        net.ipv4.tcp_max_tw_buckets) cat <<EOF
# TIME_WAIT sockets kept at once. When the broker stops it closes all $n
# connections; above this cap the kernel drops TIME_WAIT state and logs
# "time wait bucket table overflow". $TW_BYTES B each: $(human $(( rec_tw * TW_BYTES ))) at the cap, for 60 s.
EOF
        ;;
        net.netfilter.nf_conntrack_max) cat <<EOF
# Connection-tracking entries, only when nf_conntrack is loaded (a stateful
# firewall, Docker, NAT). A full table drops new SYNs: "nf_conntrack: table
# full, dropping packet". N x 1.25, ~$CT_BYTES B per tracked connection:
# $(human $(( n * CT_BYTES ))) at $n. The "-" makes a missing module no error; the
# value is host-wide and can only be set outside network namespaces.
EOF
        ;;
        net.netfilter.nf_conntrack_buckets) cat <<EOF
# Conntrack hash table size (1 bucket per entry, the kernel's own ratio, so
# lookups stay short at $n connections). 8 B per bucket: $(human $(( rec_ct * 8 ))).
# If the module loads after sysctl.d ran at boot, run tune.sh apply again.
EOF
        ;;
    esac
}

# ---- reading the live kernel ------------------------------------------------------
proc_path() { echo "/proc/sys/${1//.//}"; }
# current KEY: value with single spaces, or empty when the key does not exist here.
current() {
    local p
    p=$(proc_path "$1")
    [ -r "$p" ] || { echo ""; return 0; }
    tr -s ' \t' '  ' <"$p" | sed 's/ *$//'
}

# in_child_netns: true inside a network namespace other than the host's.
in_child_netns() {
    local self init
    self=$(readlink /proc/self/ns/net 2>/dev/null || true)
    init=$(readlink /proc/1/ns/net 2>/dev/null || true)
    if [ -n "$self" ] && [ -n "$init" ]; then
        [ "$self" != "$init" ]
        return
    fi
    # PID 1's namespace unreadable (containers, sandboxes): the kernel
    # registers net.core.netdev_max_backlog in the initial namespace only.
    [ -d /proc/sys/net/core ] && [ ! -e /proc/sys/net/core/netdev_max_backlog ]
}

# want KEY CUR: what apply writes: the recommendation, unless CUR is already
# better (never lower a cap someone raised, never shrink a wider port range).
want() {
    local key=$1 cur=$2 r
    r=$(rec "$key")
    [ -n "$cur" ] || { echo "$r"; return 0; }
    # shellcheck disable=SC2086
    set -- $cur
    case "$key" in
        net.ipv4.ip_local_port_range)
            if [ "$1" -le 10240 ] && [ "$2" -ge 65535 ]; then echo "$cur"; else echo "$r"; fi ;;
        net.ipv4.tcp_mem)
            # Never plan more than 25/40/50 % of RAM for TCP buffers.
            local lo pr mx
            lo=$(max "$1" "$(min "$rec_mem_low" $(( mem_pages / 4 )))")
            pr=$(max "$2" "$(min "$rec_mem_pressure" $(( mem_pages * 2 / 5 )))")
            mx=$(max "$3" "$(min "$rec_mem_max" $(( mem_pages / 2 )))")
            echo "$lo $(max "$pr" "$lo") $(max "$mx" "$(max "$pr" "$lo")")" ;;
        net.ipv4.tcp_rmem|net.ipv4.tcp_wmem)
            local rs
            # shellcheck disable=SC2206
            rs=($r)
            echo "${rs[0]} ${rs[1]} $(max "$3" "${rs[2]}")" ;;
        net.ipv4.tcp_fin_timeout) min "$1" "$r" ;;
        net.ipv4.tcp_tw_reuse) echo "$r" ;;
        *) max "$1" "$r" ;;
    esac
}

# judge KEY CUR: prints "STATUS|reason". STATUS is ok, tune (below the
# recommendation; hurts under load) or cap (stops the target being reached).
judge() {
    local key=$1 cur=$2
    if [ -z "$cur" ]; then
        if optional "$key"; then echo "n/a|nf_conntrack not loaded: nothing tracks connections"
        elif [ "$(scope "$key")" = global ] && in_child_netns; then echo "n/a|global setting, not visible in this network namespace"
        else echo "n/a|not present in this kernel"; fi
        return 0
    fi
    # shellcheck disable=SC2086
    set -- $cur
    case "$key" in
        fs.file-max)
            if [ "$1" -lt $(( fds + HOST_FILES )) ]; then echo "cap|below $(( fds + HOST_FILES )): the host runs out of file handles before $target connections"
            elif [ "$1" -lt "$rec_file_max" ]; then echo "tune|enough for the target, little spare"
            else echo "ok|"; fi ;;
        fs.nr_open)
            if [ "$1" -lt "$fds" ]; then echo "cap|below $fds: LimitNOFILE cannot be raised to $target connections + $FD_HEADROOM"
            else echo "ok|"; fi ;;
        net.core.somaxconn|net.ipv4.tcp_max_syn_backlog|net.core.netdev_max_backlog)
            if [ "$1" -lt "$(rec "$key")" ]; then echo "tune|below $(rec "$key"): connections dropped in reconnect storms"
            else echo "ok|"; fi ;;
        net.ipv4.tcp_max_tw_buckets)
            if [ "$1" -lt "$(rec "$key")" ]; then echo "tune|below $(rec "$key"): TIME_WAIT state dropped when the broker closes all connections"
            else echo "ok|"; fi ;;
        net.ipv4.ip_local_port_range)
            if [ $(( $2 - $1 + 1 )) -lt 55296 ]; then echo "tune|$(( $2 - $1 + 1 )) ports: limits outgoing connections per destination (load generators)"
            else echo "ok|"; fi ;;
        net.ipv4.tcp_mem)
            if [ "$3" -lt "$target" ]; then echo "tune|max below 1 page per connection: sends stall under a fan-out burst"
            elif [ "$2" -lt "$rec_mem_pressure" ]; then echo "tune|pressure below 1 page per connection"
            else echo "ok|"; fi ;;
        net.ipv4.tcp_rmem|net.ipv4.tcp_wmem)
            if [ "$2" -gt 16384 ]; then echo "tune|default $2 B per socket: more memory per socket than mostly idle connections need"
            else echo "ok|"; fi ;;
        net.ipv4.tcp_fin_timeout)
            if [ "$1" -gt "$(rec "$key")" ]; then echo "tune|orphaned sockets linger $1 s"
            else echo "ok|"; fi ;;
        net.ipv4.tcp_tw_reuse)
            if [ "$1" != 1 ]; then echo "tune|TIME_WAIT ports not reused for outgoing connections"
            else echo "ok|"; fi ;;
        net.netfilter.nf_conntrack_max)
            if [ "$1" -lt "$target" ]; then echo "cap|conntrack table full before $target connections: new SYNs dropped"
            elif [ "$1" -lt "$rec_ct" ]; then echo "tune|below N x 1.25"
            else echo "ok|"; fi ;;
        net.netfilter.nf_conntrack_buckets)
            if [ "$1" -lt $(( rec_ct / 4 )) ]; then echo "tune|long hash chains at $target connections"
            else echo "ok|"; fi ;;
        *) echo "ok|" ;;
    esac
}

# ---- the fanmq process's own limits ------------------------------------------------
n_cap=0
n_tune=0

find_pid() {
    [ -n "$pid" ] && { echo "$pid"; return 0; }
    local p=""
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        p=$(systemctl show -p MainPID --value fanmq 2>/dev/null || true)
        [ "$p" = 0 ] && p=""
    fi
    if [ -z "$p" ] && command -v pgrep >/dev/null 2>&1; then
        p=$(pgrep -x -o fanmq 2>/dev/null || true)
    fi
    echo "$p"
}

check_process() {
    local p soft hard mlock_soft
    p=$(find_pid)
    echo
    if [ -n "$p" ]; then
        [ -r "/proc/$p/limits" ] || { echo "process $p: no /proc/$p/limits (not running?)"; n_cap=$(( n_cap + 1 )); return 0; }
        read -r soft hard < <(awk '/^Max open files/ {print $4, $5}' "/proc/$p/limits")
        read -r mlock_soft < <(awk '/^Max locked memory/ {print $4}' "/proc/$p/limits")
        echo "process $p ($(cat "/proc/$p/comm" 2>/dev/null || echo '?')): open files soft $soft, hard $hard; locked memory $mlock_soft"
    elif [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1 \
        && systemctl cat fanmq >/dev/null 2>&1; then
        hard=$(systemctl show -p LimitNOFILE --value fanmq)
        soft=$(systemctl show -p LimitNOFILESoft --value fanmq)
        mlock_soft=$(systemctl show -p LimitMEMLOCK --value fanmq)
        echo "fanmq.service (not running): LimitNOFILE $hard (soft $soft), LimitMEMLOCK $mlock_soft"
    else
        echo "fanmq: no running process and no fanmq.service known to systemd: process limits not checked"
        echo "  (give --pid PID; the unit sets LimitNOFILE=1048576, LimitMEMLOCK=infinity)"
        return 0
    fi
    case "$hard" in unlimited|infinity) hard=9223372036854775807 ;; esac
    if [ "$hard" -lt "$fds" ]; then
        echo "WARNING: open-file limit $hard < $fds needed for $target connections: the broker"
        echo "  refuses connections past ~$(( hard > FD_HEADROOM ? hard - FD_HEADROOM : 0 )). Raise it:"
        echo "  systemctl edit fanmq  ->  [Service] LimitNOFILE=$(pow2ceil "$fds")   (fs.nr_open must be >= it)"
        n_cap=$(( n_cap + 1 ))
    elif [ -n "$p" ] && [ "$soft" != "$hard" ]; then
        echo "note: soft limit $soft < hard $hard; the broker raises its soft limit to the hard one at start"
    fi
    case "$mlock_soft" in
        unlimited|infinity) ;;
        *) echo "WARNING: locked-memory limit $mlock_soft: io_uring may fail to register buffers (unit: LimitMEMLOCK=infinity)"
           n_tune=$(( n_tune + 1 )) ;;
    esac
}

do_check() {
    local key cur verdict status reason
    n_cap=0
    n_tune=0
    printf 'fanmq kernel check: target %d connections, %s RAM, %d CPUs\n' \
        "$target" "$(human $(( mem_kb * 1024 )))" "$(nproc)"
    printf '%-36s %-26s %-26s %s\n' SETTING CURRENT RECOMMENDED STATUS
    for key in "${KEYS[@]}"; do
        cur=$(current "$key")
        verdict=$(judge "$key" "$cur")
        status=${verdict%%|*}
        reason=${verdict#*|}
        printf '%-36s %-26s %-26s %s%s\n' "$key" "${cur:--}" "$(rec "$key")" "$status" "${reason:+: $reason}"
        case "$status" in
            cap) n_cap=$(( n_cap + 1 )) ;;
            tune) n_tune=$(( n_tune + 1 )) ;;
        esac
    done
    if [ $(( rec_mem_max * page )) -gt $(( mem_kb * 1024 / 2 )) ]; then
        echo "WARNING: $target connections with a message in flight each need up to $(human $(( rec_mem_max * page ))) of TCP buffers," \
            "more than half of this host's RAM; plus $(human $(( target * SOCK_BYTES ))) kernel socket memory (see README.md)"
        n_tune=$(( n_tune + 1 ))
    fi
    check_process
    echo
    echo "summary: $n_cap setting(s) cap the target of $target connections, $n_tune below recommendation"
    if [ "$n_cap" -gt 0 ]; then
        echo "fix: tune.sh apply --target-connections $target (as root), and the process limit above"
        return 1
    fi
    if [ "$strict" -eq 1 ] && [ "$n_tune" -gt 0 ]; then return 1; fi
    return 0
}

# ---- writing ---------------------------------------------------------------------
# render_file MODE: the sysctl file. MODE "rec" = plain recommendations, "want"
# = what apply writes (current values taken into account); $sel_keys chosen.
render_file() {
    local mode=$1 key val
    cat <<EOF
# /etc/sysctl.d/99-fanmq.conf: kernel settings for fanmq, sized for
# $target connections (kernel-tuning/tune.sh --target-connections $target).
# Every value has its reason and the memory it implies at $target connections;
# the arithmetic is in kernel-tuning/README.md. Regenerate it, sized for your
# load, with:   tune.sh apply --target-connections N
# (apply never lowers a value the host already has higher).
# Loaded at boot by systemd-sysctl; now by: sysctl -p /etc/sysctl.d/99-fanmq.conf
EOF
    for key in "${sel_keys[@]}"; do
        if [ "$mode" = rec ]; then val=$(rec "$key"); else val=$(want "$key" "$(current "$key")"); fi
        echo
        comment "$key"
        if optional "$key"; then echo "-$key = $val"; else echo "$key = $val"; fi
    done
}

select_keys() {
    local key
    sel_keys=()
    for key in "${KEYS[@]}"; do
        if [ "$cmd" = apply ] && [ "$(scope "$key")" = global ]; then
            if [ "$net_only" -eq 1 ]; then continue; fi
            if in_child_netns; then
                echo "skip $key: global setting, not written from inside a network namespace" >&2
                continue
            fi
        fi
        sel_keys+=("$key")
    done
}

do_apply() {
    local key val cur p tmp failed=0
    [ "$(id -u)" -eq 0 ] || die "apply needs root"
    select_keys
    tmp=$(mktemp)
    # shellcheck disable=SC2064
    trap "rm -f '$tmp'" EXIT
    render_file want >"$tmp"
    mkdir -p "$(dirname "$conf")"
    install -m 0644 "$tmp" "$conf"
    echo "wrote $conf (${#sel_keys[@]} settings for $target connections)"
    for key in "${sel_keys[@]}"; do
        p=$(proc_path "$key")
        cur=$(current "$key")
        val=$(awk -v k="$key" '{ sub(/^-/, "") } $1 == k { sub(/^[^=]*= */, ""); print; exit }' "$conf")
        if [ ! -e "$p" ]; then
            echo "skip $key: not present here ($(judge "$key" "" | cut -d'|' -f2))"
            continue
        fi
        if [ "$cur" = "$val" ]; then
            echo "keep $key = $cur"
            continue
        fi
        if printf '%s\n' "$val" 2>/dev/null >"$p"; then
            echo "set  $key: $cur -> $(current "$key")"
        elif optional "$key"; then
            echo "skip $key: cannot be written here (host-wide; set it from the initial network namespace)"
        else
            echo "FAILED to set $key = $val" >&2
            failed=1
        fi
    done
    echo
    do_check || true
    return "$failed"
}

case "$cmd" in
    check) do_check ;;
    apply) do_apply ;;
    render) sel_keys=("${KEYS[@]}"); render_file rec ;;
esac
