#!/usr/bin/env bash
# test_container.sh: stage the image's files (container/rootfs.sh), build the
# image with `podman build` (Containerfile) and check it without running a
# container (this host cannot): `podman image inspect` for the ports, user,
# volume, entrypoint and command; `podman create` + `podman export` for the
# files; the staged binary runs with only the staged libraries (chroot).
# Needs: podman, a built binary (FANMQ_BIN, default target/release/fanmq).
# Skipped without them, except under CI (CI set), where both must be there.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

binary=${FANMQ_BIN:-${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/fanmq}
missing=""
command -v podman >/dev/null 2>&1 || missing="podman (apt-get install podman)"
[ -x "$binary" ] || missing="${missing:+$missing, }$binary (cargo build --release)"
if [ -n "$missing" ]; then
    if [ -n "${CI:-}" ]; then fail "missing under CI: $missing"; else skip "missing: $missing"; fi
    summary
    exit $?
fi

scratch=$(mktemp -d)
tag="localhost/fanmq-test:$$"
container=""
cleanup() {
    [ -z "$container" ] || podman rm -f "$container" >/dev/null 2>&1 || true
    podman rmi -f "$tag" >/dev/null 2>&1 || true
    rm -rf "$scratch"
}
trap cleanup EXIT

if command -v shellcheck >/dev/null 2>&1; then
    check "shellcheck container/rootfs.sh" shellcheck "$REPO_DIR/container/rootfs.sh"
else
    skip "shellcheck not installed (apt-get install shellcheck)"
fi

# ---- stage ----------------------------------------------------------------------
if "$REPO_DIR/container/rootfs.sh" --binary "$binary" --out "$scratch/ctx" >"$scratch/stage.log" 2>&1; then
    ok "rootfs.sh staged the files ($(tail -1 "$scratch/stage.log"))"
else
    fail "rootfs.sh failed: $(cat "$scratch/stage.log")"
    summary
    exit 1
fi
root=$scratch/ctx/root
check "the staged binary has no debug info left" \
    bash -c "! readelf -S '$root/usr/bin/fanmq' 2>/dev/null | grep -q '\.debug_info'"
if [ "$(id -u)" -eq 0 ]; then
    # Only the staged libraries exist inside the chroot: --help proves the
    # binary loads with them (a chroot is no container: nothing is isolated).
    check "the staged binary runs with the staged libraries only" \
        bash -c "chroot '$root' /usr/bin/fanmq --help | grep -q 'Usage: fanmq'"
else
    skip "chroot check needs root"
fi

# ---- build ----------------------------------------------------------------------
if timeout 300 podman build -q -t "$tag" -f "$REPO_DIR/Containerfile" "$scratch/ctx" \
    >"$scratch/build.log" 2>&1; then
    ok "podman build made the image"
else
    fail "podman build failed: $(tail -20 "$scratch/build.log")"
    summary
    exit 1
fi

# ---- podman image inspect -------------------------------------------------------------
inspect() { podman image inspect "$tag" --format "$1"; }
# shellcheck disable=SC2016 # a Go template, not shell
ports=$(inspect '{{range $p, $v := .Config.ExposedPorts}}{{$p}} {{end}}')
for port in 1883 8883 8083 8084 18083; do
    check "EXPOSE $port" grep -qw "$port/tcp" <<<"$ports"
done
check_eq "entrypoint" "[/usr/bin/fanmq]" "$(inspect '{{.Config.Entrypoint}}')"
check_eq "command" "[--config /etc/fanmq/fanmq.toml]" "$(inspect '{{.Config.Cmd}}')"
check_eq "runs as fanmq (1883), not root" "1883:1883" "$(inspect '{{.Config.User}}')"
check "/var/lib/fanmq is a volume" grep -q '/var/lib/fanmq' <<<"$(inspect '{{.Config.Volumes}}')"
size=$(inspect '{{.Size}}')
check "the image is small: $((size / 1000000)) MB < 100 MB" test "$size" -lt 100000000

# ---- the image's files (podman create does not start anything) ---------------------------
if container=$(podman create "$tag" 2>"$scratch/create.log"); then
    ok "podman create"
else
    fail "podman create failed: $(cat "$scratch/create.log")"
    summary
    exit 1
fi
podman export "$container" | tar --numeric-owner -tvf - >"$scratch/files"
has() { grep -qE " $1\$" "$scratch/files"; }
for f in usr/bin/fanmq etc/fanmq/fanmq.toml etc/passwd etc/group etc/nsswitch.conf \
    lib64/ld-linux-x86-64.so.2 lib/x86_64-linux-gnu/libc.so.6; do
    check "the image holds /$f" has "$f"
done
check "the binary is executable" grep -qE '^-rwxr-xr-x .* usr/bin/fanmq$' "$scratch/files"
check "/var/lib/fanmq belongs to fanmq" grep -qE '^d[rwx-]+ 1883/1883 .* var/lib/fanmq/$' "$scratch/files"
check "/var/lib belongs to root" grep -qE '^d[rwx-]+ 0/0 .* var/lib/$' "$scratch/files"
check "no shell in the image" bash -c "! grep -qE ' (bin|usr/bin)/(ba)?sh\$' '$scratch/files'"
check "passwd names the user fanmq" bash -c "podman export '$container' | tar -xOf - etc/passwd | grep -q '^fanmq:x:1883:1883:'"
check "the config is the container's (listens on 0.0.0.0)" \
    bash -c "podman export '$container' | tar -xOf - etc/fanmq/fanmq.toml | grep -q '^listen = \[\"0.0.0.0:1883\"\]'"

# ---- compose.yaml and its HAProxy config (not started: no containers here) -----
compose_check() {
    python3 - "$REPO_DIR/compose.yaml" <<'PY'
import sys, yaml
c = yaml.safe_load(open(sys.argv[1]))
s = c["services"]
assert set(s) == {"nats", "fanmq1", "fanmq2", "fanmq3", "haproxy"}, set(s)
assert "-js" in s["nats"]["command"], s["nats"]
for n in ("fanmq1", "fanmq2", "fanmq3"):
    cmd = s[n]["command"]
    assert cmd[cmd.index("--cluster-nats") + 1] == "nats://nats:4222", cmd
    assert cmd[cmd.index("--node-name") + 1] == n, cmd
    assert "--proxy-listen" in cmd, cmd
    assert s[n]["ulimits"]["nofile"]["hard"] >= 1048576, s[n]
PY
}
if python3 -c 'import yaml' 2>/dev/null; then
    check "compose.yaml: nats -js, three fanmq nodes with cluster flags, haproxy" compose_check
else
    skip "python3-yaml missing: compose.yaml not checked"
fi
if command -v haproxy >/dev/null 2>&1; then
    check "haproxy -c container/haproxy.cfg" haproxy -q -c -f "$REPO_DIR/container/haproxy.cfg"
    check "HAProxy sends PROXY v2 to all three nodes" \
        test "$(grep -c 'send-proxy-v2' "$REPO_DIR/container/haproxy.cfg")" -eq 3
else
    skip "haproxy not installed: container/haproxy.cfg not checked"
fi

summary
