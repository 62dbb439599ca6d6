#!/usr/bin/env bash
# Installs the peer brokers fanmq is compared with (see shared/BENCH.md):
#   - Mosquitto, Debian package `mosquitto` (apt-get; needs root);
#   - rumqttd, `cargo install rumqttd` (a few minutes on 2 cores);
#   - FlashMQ, built from source (see below).
# Idempotent: skips what is already installed. The Debian package's systemd
# unit is not started here; the bench starts its own brokers on free ports.
#
# rumqttd 0.20's Cargo.lock pins metrics 0.22.1, which newer rustc rejects
# (E0521), so it is installed without --locked.
set -euo pipefail

if ! command -v mosquitto >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto
fi
echo "mosquitto: $(command -v mosquitto)"

if ! command -v rumqttd >/dev/null; then
    cargo install rumqttd --version 0.20.0 -j "${JOBS:-1}"
fi
echo "rumqttd: $(command -v rumqttd)"

# FlashMQ: no package here, so it is built from source with cmake into
# bench/peers/flashmq (ignored by git), from FLASHMQ_SRC: a source tarball
# (e.g. ../shared/peers/flashmq-*.tar.gz), a source directory, or, when
# unset, a clone of its public repository (needs the network). Needs
# cmake, g++ and libssl-dev (installed with apt-get when missing). About 8
# minutes on 2 cores. The bench finds it through FLASHMQ_BIN:
#   export FLASHMQ_BIN=$PWD/bench/peers/flashmq/build/flashmq
# FLASHMQ_SKIP=1 skips it.
FLASHMQ_REPO=https://github.com/halfgaar/FlashMQ.git
here="$(cd "$(dirname "$0")" && pwd)"
peers="$here/peers"
flashmq_bin="$peers/flashmq/build/flashmq"
if [ "${FLASHMQ_SKIP:-0}" = 1 ]; then
    echo "flashmq: skipped (FLASHMQ_SKIP=1)"
elif [ -x "$flashmq_bin" ]; then
    echo "flashmq: $flashmq_bin"
else
    need=()
    command -v cmake >/dev/null || need+=(cmake)
    command -v g++ >/dev/null || need+=(g++)
    [ -e /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
    if [ ${#need[@]} -gt 0 ]; then
        if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
    fi
    src="${FLASHMQ_SRC:-}"
    if [ -n "$src" ] && [ ! -e "$src" ]; then
        echo "FLASHMQ_SRC=$src: no such tarball or directory" >&2
        exit 1
    fi
    mkdir -p "$peers"
    rm -rf "$peers/flashmq"
    if [ -z "$src" ]; then
        git clone --depth 1 "$FLASHMQ_REPO" "$peers/flashmq"
    elif [ -d "$src" ]; then
        cp -a "$src" "$peers/flashmq"
        rm -rf "$peers/flashmq/build" # a build of another path: cmake refuses it.
    elif [ -f "$src" ]; then
        # The tarball's top folder is `flashmq` (or any single folder).
        mkdir -p "$peers/flashmq"
        tar xzf "$src" -C "$peers/flashmq" --strip-components=1
    else
        echo "FLASHMQ_SRC=$src: neither a tarball nor a directory" >&2
        exit 1
    fi
    mkdir -p "$peers/flashmq/build"
    (cd "$peers/flashmq/build" &&
        cmake -DCMAKE_BUILD_TYPE=Release .. >/dev/null &&
        make -j "${JOBS:-2}" flashmq)
    echo "flashmq: $flashmq_bin"
fi
