#!/usr/bin/env bash
# test_install.sh: systemd/install.sh into a temporary prefix.
#   --dry-run changes nothing; a real install puts every file in place with
#   the right mode; a second install keeps an edited config; --uninstall
#   removes what it installed (keeping an edited config unless --purge).
# Never touches / : every run uses --prefix (which also skips the user and
# systemctl) and --no-user.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

install_sh="$REPO_DIR/systemd/install.sh"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
prefix="$scratch/root"
mkdir -p "$prefix"

# A stand-in binary: install.sh copies it, never runs it.
bin="$scratch/fanmq-bin"
printf '#!/bin/sh\necho fanmq test stand-in\n' >"$bin"
chmod 755 "$bin"
# The sample config from the repo root; a placeholder when it is not there yet.
config="$REPO_DIR/fanmq.toml"
if [ ! -f "$config" ]; then
    config="$scratch/fanmq.toml"
    printf '# placeholder config for test_install.sh\n[log]\nlevel = "info"\n' >"$config"
fi
args=(--prefix "$prefix" --no-user --binary "$bin" --config "$config")

# tree DIR: everything under DIR with type, mode, size and content hash.
tree() {
    (cd "$1" && find . -printf '%y %m %s %p\n' | sort && find . -type f -exec sha256sum {} + | sort)
}

check "install.sh is executable" test -x "$install_sh"
check "install.sh --help exits 0" bash -c "'$install_sh' --help >/dev/null"
if command -v shellcheck >/dev/null 2>&1; then
    check "shellcheck install.sh" shellcheck "$install_sh"
else
    skip "shellcheck not installed (apt-get install shellcheck)"
fi
check "an unknown option is refused" bash -c "! '$install_sh' --bogus >/dev/null 2>&1"

# ---- dry run --------------------------------------------------------------------
before=$(tree "$prefix")
out=$("$install_sh" "${args[@]}" --dry-run 2>&1)
check_eq "--dry-run leaves the prefix untouched" "$before" "$(tree "$prefix")"
check "--dry-run says it changed nothing" grep -q "nothing was changed" <<<"$out"
check "--dry-run lists the binary install" grep -q "would run: install -m 0755 .*usr/bin/fanmq" <<<"$out"
check "--dry-run lists the unit install" grep -q "lib/systemd/system/fanmq.service" <<<"$out"
check "--dry-run lists the config install" grep -q "etc/fanmq/fanmq.toml" <<<"$out"
check "--dry-run lists the sysctl install" grep -q "etc/sysctl.d/99-fanmq.conf" <<<"$out"
check "--dry-run skips the user under a prefix" grep -q "skip creating user fanmq" <<<"$out"
check "--dry-run skips systemctl under a prefix" grep -q "skip systemctl" <<<"$out"
# Without --binary, a dry run says it would build, and still builds nothing.
out=$("$install_sh" --prefix "$prefix" --no-user --config "$config" --dry-run 2>&1)
check "--dry-run without --binary would run cargo build" grep -q "would run: cargo build --release" <<<"$out"
check_eq "... and still leaves the prefix untouched" "$before" "$(tree "$prefix")"

# ---- real install -----------------------------------------------------------------
out=$("$install_sh" "${args[@]}" 2>&1) && rc=0 || rc=$?
check_eq "install exits 0" 0 "$rc"
check "install says what it did" grep -q "fanmq installed under $prefix" <<<"$out"
for f in usr/bin/fanmq:755 lib/systemd/system/fanmq.service:644 etc/fanmq/fanmq.toml:644 \
    etc/sysctl.d/99-fanmq.conf:644; do
    path=${f%%:*}
    mode=${f##*:}
    if [ -f "$prefix/$path" ]; then
        check_eq "$path has mode $mode" "$mode" "$(file_mode "$prefix/$path")"
    else
        fail "$path was not installed"
    fi
done
check_eq "etc/fanmq is mode 755" 755 "$(file_mode "$prefix/etc/fanmq")"
check "binary is the one given" cmp -s "$bin" "$prefix/usr/bin/fanmq"
check "unit is systemd/fanmq.service" cmp -s "$REPO_DIR/systemd/fanmq.service" "$prefix/lib/systemd/system/fanmq.service"
check "config is the sample" cmp -s "$config" "$prefix/etc/fanmq/fanmq.toml"
check "sysctl file is kernel-tuning/99-fanmq.conf" cmp -s "$REPO_DIR/kernel-tuning/99-fanmq.conf" "$prefix/etc/sysctl.d/99-fanmq.conf"
check_eq "nothing else was installed" \
    "./etc/fanmq/fanmq.toml ./etc/sysctl.d/99-fanmq.conf ./lib/systemd/system/fanmq.service ./usr/bin/fanmq" \
    "$(cd "$prefix" && find . -type f | sort | tr '\n' ' ' | sed 's/ $//')"

# ---- second install keeps the admin's config --------------------------------------
echo '# edited by the admin' >>"$prefix/etc/fanmq/fanmq.toml"
edited=$(sha256sum <"$prefix/etc/fanmq/fanmq.toml")
out=$("$install_sh" "${args[@]}" 2>&1) && rc=0 || rc=$?
check_eq "second install exits 0" 0 "$rc"
check_eq "second install keeps the edited config" "$edited" "$(sha256sum <"$prefix/etc/fanmq/fanmq.toml")"
check "second install says it kept the config" grep -q "keep existing .*fanmq.toml" <<<"$out"

# ---- uninstall ----------------------------------------------------------------------
before=$(tree "$prefix")
"$install_sh" "${args[@]}" --uninstall --dry-run >/dev/null 2>&1
check_eq "--uninstall --dry-run changes nothing" "$before" "$(tree "$prefix")"
out=$("$install_sh" "${args[@]}" --uninstall 2>&1) && rc=0 || rc=$?
check_eq "uninstall exits 0" 0 "$rc"
check "uninstall removed the binary" test ! -e "$prefix/usr/bin/fanmq"
check "uninstall removed the unit" test ! -e "$prefix/lib/systemd/system/fanmq.service"
check "uninstall removed the unchanged sysctl file" test ! -e "$prefix/etc/sysctl.d/99-fanmq.conf"
check "uninstall kept the edited config" test -f "$prefix/etc/fanmq/fanmq.toml"
check "uninstall says why it kept the config" grep -q "keep .*fanmq.toml" <<<"$out"
"$install_sh" "${args[@]}" --uninstall --purge >/dev/null 2>&1
check "uninstall --purge removed the edited config" test ! -e "$prefix/etc/fanmq/fanmq.toml"
check "uninstall --purge removed the empty /etc/fanmq" test ! -e "$prefix/etc/fanmq"
check_eq "no file left in the prefix" "" "$(find "$prefix" -type f)"

# An unchanged install is removed completely by a plain --uninstall.
"$install_sh" "${args[@]}" >/dev/null 2>&1
"$install_sh" "${args[@]}" --uninstall >/dev/null 2>&1
check_eq "install + uninstall leaves no file" "" "$(find "$prefix" -type f)"

# ---- errors -------------------------------------------------------------------------
check "a missing --binary is an error" \
    bash -c "! '$install_sh' --prefix '$prefix' --no-user --binary '$scratch/nope' --config '$config' >/dev/null 2>&1"
check "a missing config is an error" \
    bash -c "! '$install_sh' --prefix '$prefix' --no-user --binary '$bin' --config '$scratch/nope.toml' >/dev/null 2>&1"
check "--purge without --uninstall is an error" \
    bash -c "! '$install_sh' ${args[*]} --purge >/dev/null 2>&1"
check_eq "failed runs installed nothing" "" "$(find "$prefix" -type f)"

summary
