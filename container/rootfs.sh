#!/usr/bin/env bash
# rootfs.sh: stage the files of the fanmq container image (see Containerfile)
# from a binary built on this host: the binary (debug info stripped), the
# shared libraries it loads (found with ldd, dynamic loader included), a
# default config, a passwd/group with the user fanmq (uid/gid 1883) and an
# nsswitch.conf. No base image is needed: the image is FROM scratch.
#
# Usage: container/rootfs.sh [--binary FILE] [--out DIR]
#   --binary FILE  the fanmq binary (default target/release/fanmq)
#   --out DIR      where to stage (default target/container; wiped first):
#                  DIR/root is the image's /, DIR/data its /var/lib/fanmq
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
binary=$repo/target/release/fanmq
out=$repo/target/container

usage() { sed -n '2,13s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
while [ $# -gt 0 ]; do
    case $1 in
        --binary) binary=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "rootfs.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
if [ ! -x "$binary" ]; then
    echo "rootfs.sh: no binary at $binary (cargo build --release --locked)" >&2
    exit 1
fi

rm -rf "$out"
root=$out/root
# var/lib stays root's; only var/lib/fanmq (data/) belongs to fanmq.
mkdir -p "$root/usr/bin" "$root/etc/fanmq" "$root/var/lib" "$out/data"
# Debug info (the release profile keeps line tables for profiling) is not
# needed to run; stripping it keeps the image small.
if command -v objcopy >/dev/null 2>&1; then
    objcopy --strip-debug "$binary" "$root/usr/bin/fanmq"
else
    cp "$binary" "$root/usr/bin/fanmq"
fi
chmod 755 "$root/usr/bin/fanmq"

# Every shared library the binary loads, at the path the loader looks for it
# (ldd prints "name => /path (addr)" and the loader as "/path (addr)").
libs=$(ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
for lib in $libs; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done

install -m 644 "$repo/container/fanmq.toml" "$root/etc/fanmq/fanmq.toml"
printf 'root:x:0:0:root:/:/sbin/nologin\nfanmq:x:1883:1883:fanmq:/var/lib/fanmq:/sbin/nologin\n' \
    >"$root/etc/passwd"
printf 'root:x:0:\nfanmq:x:1883:\n' >"$root/etc/group"
# Host names (a NATS URL, say) through /etc/hosts, then DNS; glibc has both
# built in since 2.34, so no libnss_* module is needed.
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$root/etc/nsswitch.conf"
chmod 644 "$root/etc/passwd" "$root/etc/group" "$root/etc/nsswitch.conf"
echo "staged $(du -sh "$root" | cut -f1) in $root ($(echo "$libs" | wc -w) libraries)"
