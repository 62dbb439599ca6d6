#!/usr/bin/env bash
# Installs the peer brokers fanmq is compared with (see shared/BENCH.md):
#   - Mosquitto, Debian package `mosquitto` (apt-get; needs root);
#   - rumqttd, `cargo install rumqttd` (a few minutes on 2 cores).
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
