#!/usr/bin/env bash
# install.sh: install (or remove) fanmq as a systemd service.
#
# What it installs, under PREFIX (default /):
#   usr/bin/fanmq                        the broker binary            0755
#   lib/systemd/system/fanmq.service     the unit                     0644
#   etc/fanmq/fanmq.toml                 the config (never overwritten) 0644
#   etc/sysctl.d/99-fanmq.conf           kernel tuning (never overwritten) 0644
# and, only when PREFIX is /: the system user "fanmq" (no login shell), then
# `systemctl daemon-reload` and `systemctl enable --now fanmq` when systemd is
# PID 1. Every action is printed; --dry-run prints them and changes nothing.
#
# Usage: install.sh [--binary PATH] [--config FILE] [--prefix DIR] [--dry-run]
#                   [--no-user] [--no-systemctl] [--uninstall [--purge]]
set -euo pipefail

readonly SERVICE=fanmq
readonly FANMQ_USER=fanmq
readonly STATE_DIR=/var/lib/fanmq

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/.." && pwd)

usage() {
    cat <<EOF
Usage: $(basename "$0") [options]

Install fanmq as a systemd service (or remove it with --uninstall).

Options:
  --binary PATH     install this fanmq binary instead of building one with
                    'cargo build --release --locked' in $repo_dir
  --config FILE     config to install as etc/fanmq/fanmq.toml when none exists
                    (default: $repo_dir/fanmq.toml)
  --prefix DIR      install under DIR instead of / (for packaging and tests);
                    with a prefix other than /, no user is created and
                    systemctl is not run
  --dry-run         print every action, change nothing
  --no-user         do not create (or, with --purge, delete) the fanmq user
  --no-systemctl    do not run systemctl (daemon-reload, enable/disable)
  --uninstall       stop and disable the service, remove what install put
                    there; an edited config is kept (removed if unchanged)
  --purge           with --uninstall: also remove the config, the sysctl file
                    whatever its content, $STATE_DIR and the fanmq user
  -h, --help        this text
EOF
}

binary=""
config_src="$repo_dir/fanmq.toml"
prefix="/"
dry_run=0
manage_user=1
manage_systemctl=1
uninstall=0
purge=0

die() { echo "install.sh: error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --binary) [ $# -ge 2 ] || die "--binary needs a path"; binary=$2; shift 2 ;;
        --binary=*) binary=${1#*=}; shift ;;
        --config) [ $# -ge 2 ] || die "--config needs a file"; config_src=$2; shift 2 ;;
        --config=*) config_src=${1#*=}; shift ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#*=}; shift ;;
        --dry-run) dry_run=1; shift ;;
        --no-user) manage_user=0; shift ;;
        --no-systemctl) manage_systemctl=0; shift ;;
        --uninstall) uninstall=1; shift ;;
        --purge) purge=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

[ "$purge" -eq 0 ] || [ "$uninstall" -eq 1 ] || die "--purge only goes with --uninstall"

# Normalise the prefix: "/" stays "/", "DIR/" becomes absolute "DIR".
if [ "$prefix" != "/" ]; then
    prefix=${prefix%/}
    case "$prefix" in /*) ;; *) prefix="$PWD/$prefix" ;; esac
fi
# root: the path prefix to put in front of absolute install paths ("" for /).
if [ "$prefix" = "/" ]; then root=""; else root=$prefix; fi

bin_dst="$root/usr/bin/fanmq"
unit_dst="$root/lib/systemd/system/$SERVICE.service"
conf_dir="$root/etc/fanmq"
conf_dst="$conf_dir/fanmq.toml"
sysctl_dst="$root/etc/sysctl.d/99-fanmq.conf"
unit_src="$script_dir/fanmq.service"
sysctl_src="$repo_dir/kernel-tuning/99-fanmq.conf"

# A user and systemctl belong to a real system, never to a staging prefix.
if [ -n "$root" ]; then
    manage_user=0
    manage_systemctl=0
fi

systemd_running() {
    # sd_booted(3): systemd is PID 1 iff /run/systemd/system/ exists.
    [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]
}

# say: what is being done (or would be, in a dry run).
say() {
    if [ "$dry_run" -eq 1 ]; then echo "[dry-run] would $*"; else echo "$*"; fi
}

# note: information, not an action (printed the same in a dry run).
note() { echo "$*"; }

# act: print a command, then run it unless this is a dry run.
act() {
    local shown
    shown=$(printf '%q ' "$@")
    if [ "$dry_run" -eq 1 ]; then
        echo "[dry-run] would run: ${shown% }"
    else
        echo "+ ${shown% }"
        "$@"
    fi
}

need_root() {
    if [ "$dry_run" -eq 0 ] && [ "$(id -u)" -ne 0 ] && [ -z "$root" ]; then
        die "installing into / needs root (try sudo, or --prefix DIR)"
    fi
}

# install_new SRC DST MODE: install a file that must not replace an existing
# one (config, sysctl tuning the admin may have changed).
install_new() {
    local src=$1 dst=$2 mode=$3
    if [ -e "$dst" ]; then
        note "keep existing $dst (not overwritten)"
        if ! cmp -s "$src" "$dst"; then
            echo "  note: it differs from $src; compare them after an upgrade"
        fi
        return 0
    fi
    act install -m "$mode" "$src" "$dst"
}

do_install() {
    need_root
    [ -f "$unit_src" ] || die "unit not found: $unit_src"
    [ -f "$sysctl_src" ] || die "sysctl file not found: $sysctl_src"
    if [ ! -e "$conf_dst" ]; then
        [ -f "$config_src" ] || die "config not found: $config_src (give --config FILE)"
    fi

    # 1. The binary: given, or built here.
    if [ -n "$binary" ]; then
        if [ ! -f "$binary" ] || [ ! -x "$binary" ]; then die "not an executable file: $binary"; fi
    else
        command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (rustup) or give --binary PATH"
        binary="${CARGO_TARGET_DIR:-$repo_dir/target}/release/fanmq"
        act cargo build --release --locked --bin fanmq --manifest-path "$repo_dir/Cargo.toml"
        [ "$dry_run" -eq 1 ] || [ -x "$binary" ] || die "cargo build did not produce $binary"
    fi

    # 2. The user the service runs as.
    if [ "$manage_user" -eq 1 ]; then
        if getent passwd "$FANMQ_USER" >/dev/null; then
            note "keep existing user $FANMQ_USER"
        else
            act useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
                --shell /usr/sbin/nologin --comment "fanmq MQTT broker" "$FANMQ_USER"
        fi
    else
        note "skip creating user $FANMQ_USER (prefix $prefix or --no-user)"
    fi

    # 3. Files.
    act install -d -m 0755 "$root/usr/bin" "$root/lib/systemd/system" "$conf_dir" "$root/etc/sysctl.d"
    act install -m 0755 "$binary" "$bin_dst"
    act install -m 0644 "$unit_src" "$unit_dst"
    install_new "$config_src" "$conf_dst" 0644
    install_new "$sysctl_src" "$sysctl_dst" 0644
    note "leave kernel settings as they are: $sysctl_dst applies at next boot;" \
        "to apply now, sized for your load: $repo_dir/kernel-tuning/tune.sh apply --target-connections N"

    # The unit's ExecReload runs /bin/kill (Debian: package procps).
    if [ -z "$root" ] && [ ! -x /bin/kill ]; then
        echo "warning: /bin/kill is missing, so 'systemctl reload fanmq' will fail: apt-get install procps"
    fi

    # 4. systemd.
    if [ "$manage_systemctl" -eq 1 ] && systemd_running; then
        act systemctl daemon-reload
        act systemctl enable --now "$SERVICE"
        note "check it with: systemctl status $SERVICE; journalctl -u $SERVICE"
    else
        note "skip systemctl (prefix $prefix, --no-systemctl, or systemd is not PID 1);" \
            "on the target system run: systemctl daemon-reload && systemctl enable --now $SERVICE"
    fi
    if [ "$dry_run" -eq 1 ]; then
        echo "dry run: nothing was changed"
    else
        echo "fanmq installed under $prefix"
    fi
}

# remove FILE: delete a file we installed, if it is there.
remove() {
    if [ -e "$1" ] || [ -L "$1" ]; then act rm -f "$1"; else note "skip $1 (not there)"; fi
}

# remove_if_pristine FILE ORIGINAL WHAT: delete an admin-editable file only when
# it still equals what we shipped, or with --purge.
remove_if_pristine() {
    local f=$1 orig=$2 what=$3
    [ -e "$f" ] || { note "skip $f (not there)"; return 0; }
    if [ "$purge" -eq 1 ] || { [ -f "$orig" ] && cmp -s "$f" "$orig"; }; then
        act rm -f "$f"
    else
        note "keep $f: $what was changed since install (--purge removes it)"
    fi
}

do_uninstall() {
    need_root
    if [ "$manage_systemctl" -eq 1 ] && systemd_running; then
        act systemctl disable --now "$SERVICE"
    else
        note "skip systemctl disable --now $SERVICE (prefix $prefix, --no-systemctl, or systemd is not PID 1)"
    fi
    remove "$bin_dst"
    remove "$unit_dst"
    remove_if_pristine "$conf_dst" "$config_src" "the config"
    remove_if_pristine "$sysctl_dst" "$sysctl_src" "the sysctl file (tune.sh apply rewrites it)"
    if [ -d "$conf_dir" ]; then
        if [ "$dry_run" -eq 1 ]; then
            say "remove $conf_dir if empty"
        elif rmdir "$conf_dir" 2>/dev/null; then
            echo "removed empty $conf_dir"
        fi
    fi
    if [ "$purge" -eq 1 ]; then
        if [ -d "$root$STATE_DIR" ]; then act rm -rf "$root$STATE_DIR"; fi
        if [ "$manage_user" -eq 1 ] && getent passwd "$FANMQ_USER" >/dev/null; then
            act userdel "$FANMQ_USER"
        fi
    fi
    if [ "$manage_systemctl" -eq 1 ] && systemd_running; then
        act systemctl daemon-reload
    fi
    note "leave the running kernel's sysctl values as they are (they reset at reboot)"
    if [ "$dry_run" -eq 1 ]; then
        echo "dry run: nothing was changed"
    else
        echo "fanmq removed from $prefix"
    fi
}

if [ "$uninstall" -eq 1 ]; then do_uninstall; else do_install; fi
