#!/usr/bin/env bash
# test_deb.sh: build the Debian package with `cargo deb` and check it with
# dpkg-deb --info / --contents / --control / --extract.
# Needs: cargo-deb (`cargo install cargo-deb`), dpkg-deb. Skipped without cargo-deb.
# The package metadata is the [package.metadata.deb] table of the root
# Cargo.toml; the package is built in place (reusing target/).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

if ! cargo deb --version >/dev/null 2>&1; then
    skip "cargo-deb not installed (cargo install cargo-deb --locked)"
    summary
    exit $?
fi
if ! command -v dpkg-deb >/dev/null 2>&1; then
    skip "dpkg-deb not installed (apt-get install dpkg)"
    summary
    exit $?
fi

build_dir=$REPO_DIR
target_dir=${CARGO_TARGET_DIR:-$REPO_DIR/target}
config_src="$build_dir/fanmq.toml"

mkdir -p "$scratch/out"
if (cd "$build_dir" && CARGO_TARGET_DIR=$target_dir cargo deb -p fanmq --locked --fast \
    -o "$scratch/out") >"$scratch/build.log" 2>&1; then
    ok "cargo deb built the package"
else
    fail "cargo deb failed:"
    tail -30 "$scratch/build.log"
    summary
    exit 1
fi
grep -i 'warning' "$scratch/build.log" | grep -v '^\s*Compiling' >"$scratch/warnings" || true
check "cargo deb printed no packaging warning$(head -3 "$scratch/warnings" | tr '\n' ' ')" test ! -s "$scratch/warnings"
deb=$(find "$scratch/out" -name 'fanmq_*.deb' | head -1)
check "one fanmq_*.deb in the output (${deb##*/})" test -n "$deb" -a -f "$deb"

# ---- dpkg-deb --info ---------------------------------------------------------------
field() { dpkg-deb --field "$deb" "$1"; }
check_eq "Package" fanmq "$(field Package)"
check_eq "Architecture" "$(dpkg --print-architecture)" "$(field Architecture)"
check_eq "Version from Cargo.toml" \
    "$(sed -n 's/^version = "\(.*\)"/\1/p' "$build_dir/Cargo.toml" | head -1)-1" "$(field Version)"
check_eq "Section" net "$(field Section)"
check "Maintainer set" test -n "$(field Maintainer)"
check "Depends on libc6 (found by shlibdeps)" grep -q 'libc6' <<<"$(field Depends)"
check "Depends on passwd (useradd in postinst)" grep -q 'passwd' <<<"$(field Depends)"
check "Depends on procps (/bin/kill for ExecReload)" grep -q 'procps' <<<"$(field Depends)"
check "Description mentions fan-out" grep -qi 'fan-out' <<<"$(field Description)"
info=$(dpkg-deb --info "$deb")
for s in conffiles postinst postrm prerm; do
    check "control archive has $s" grep -qE "^ +[0-9]+ bytes, +[0-9]+ lines +\*? +$s( |\$)" <<<"$info"
done

# ---- dpkg-deb --contents -----------------------------------------------------------------
contents=$(dpkg-deb --contents "$deb")
# has_file MODE PATH...: one of the paths is in the package with this mode,
# owned by root (dpkg-deb shows root/root or 0/0).
has_file() {
    local mode=$1 p
    shift
    for p in "$@"; do
        if awk -v m="$mode" -v p="./$p" '$1 == m && ($2 == "root/root" || $2 == "0/0") && $6 == p { f = 1 } END { exit !f }' <<<"$contents"; then
            return 0
        fi
    done
    return 1
}
check "usr/bin/fanmq, -rwxr-xr-x root/root" has_file -rwxr-xr-x usr/bin/fanmq
check "systemd unit, -rw-r--r-- root/root" has_file -rw-r--r-- usr/lib/systemd/system/fanmq.service lib/systemd/system/fanmq.service
check "etc/fanmq/fanmq.toml, -rw-r--r-- root/root" has_file -rw-r--r-- etc/fanmq/fanmq.toml
check "etc/sysctl.d/99-fanmq.conf, -rw-r--r-- root/root" has_file -rw-r--r-- etc/sysctl.d/99-fanmq.conf
check "usr/sbin/fanmq-tune, -rwxr-xr-x root/root" has_file -rwxr-xr-x usr/sbin/fanmq-tune
check_not "no file under home, root, tmp or var" grep -qE ' \./(home|root|tmp|var)/' <<<"$contents"

# ---- the files themselves ------------------------------------------------------------------
dpkg-deb --extract "$deb" "$scratch/root"
dpkg-deb --control "$deb" "$scratch/control"
unit=$(find "$scratch/root" -path '*/systemd/system/fanmq.service' | head -1)
check "packaged unit is systemd/fanmq.service" cmp -s "$REPO_DIR/systemd/fanmq.service" "$unit"
check "packaged sysctl file is kernel-tuning/99-fanmq.conf" \
    cmp -s "$REPO_DIR/kernel-tuning/99-fanmq.conf" "$scratch/root/etc/sysctl.d/99-fanmq.conf"
check "packaged config is the repository's fanmq.toml" cmp -s "$config_src" "$scratch/root/etc/fanmq/fanmq.toml"
check "packaged fanmq-tune is kernel-tuning/tune.sh" cmp -s "$REPO_DIR/kernel-tuning/tune.sh" "$scratch/root/usr/sbin/fanmq-tune"
check "packaged binary is an ELF executable" test "$(head -c 4 "$scratch/root/usr/bin/fanmq" | od -An -c | tr -d ' ')" = '177ELF'
check "packaged binary runs (--help)" bash -c "'$scratch/root/usr/bin/fanmq' --help >/dev/null 2>&1"
check "packaged fanmq-tune runs (render)" bash -c "'$scratch/root/usr/sbin/fanmq-tune' render >/dev/null"

conffiles=$(cat "$scratch/control/conffiles")
check "conffile /etc/fanmq/fanmq.toml" grep -qx /etc/fanmq/fanmq.toml <<<"$conffiles"
check "conffile /etc/sysctl.d/99-fanmq.conf" grep -qx /etc/sysctl.d/99-fanmq.conf <<<"$conffiles"

postinst="$scratch/control/postinst"
check "postinst is valid sh" sh -n "$postinst"
check "postinst creates the system user fanmq" \
    grep -q 'useradd --system --user-group --home-dir /var/lib/fanmq' "$postinst"
check "postinst gives it no login shell" grep -q -- '--shell /usr/sbin/nologin' "$postinst"
check "postinst enables fanmq.service (cargo-deb systemd snippet)" grep -q 'deb-systemd-helper enable fanmq.service' "$postinst"
# shellcheck disable=SC2016 # literal shell text in the generated script
check "postinst starts fanmq.service only when systemd runs" grep -q 'deb-systemd-invoke $_dh_action fanmq.service' "$postinst"
user_line=$(grep -n 'useradd' "$postinst" | head -1 | cut -d: -f1)
start_line=$(grep -n 'deb-systemd-invoke' "$postinst" | head -1 | cut -d: -f1)
check "postinst creates the user before it starts the service (lines ${user_line:-?} < ${start_line:-?})" \
    test "${user_line:-999999}" -lt "${start_line:-0}"
check_not "postinst has no leftover debhelper token" grep -q '#DEBHELPER#' "$postinst"
check "postrm is valid sh" sh -n "$scratch/control/postrm"
check "postrm removes the user on purge" grep -q 'userdel fanmq' "$scratch/control/postrm"
check "postrm removes /var/lib/fanmq on purge" grep -q 'rm -rf /var/lib/fanmq' "$scratch/control/postrm"
check "prerm stops the service" grep -q 'deb-systemd-invoke stop fanmq.service' "$scratch/control/prerm"

summary
