# shellcheck shell=bash
# Shell helpers of the scripts that start brokers and measure them
# (bench/cluster-cpu.sh, bench/cluster-fanout.sh, bench/cluster-qos1.sh):
# sourced, not run.
# The sourcing script calls `start_run` (or sets `work`, a temporary
# directory, and `pids`, every process it started, killed on exit, and
# installs `cleanup` on EXIT itself).

# Sets up a run: `broker_pin` and `client_pin` (taskset prefixes from
# BROKER_CPUS and CLIENT_CPUS, empty without), `work` (a temporary
# directory), `out_dir` (OUT_DIR, default under `work`) and an empty
# `pids`, and installs `cleanup` on EXIT. Call it from the script's top
# level, not in a subshell.
start_run() {
    # shellcheck disable=SC2034 # used by the sourcing script
    broker_pin=() client_pin=()
    # shellcheck disable=SC2034
    [ -n "${BROKER_CPUS:-}" ] && broker_pin=(taskset -c "$BROKER_CPUS")
    # shellcheck disable=SC2034
    [ -n "${CLIENT_CPUS:-}" ] && client_pin=(taskset -c "$CLIENT_CPUS")
    work=$(mktemp -d)
    out_dir=${OUT_DIR:-$work/out}
    mkdir -p "$out_dir"
    pids=()
    trap cleanup EXIT
}

# Kills every process in `pids` and removes `work`.
cleanup() {
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# CPU ticks (user + system) of a process; `getconf CLK_TCK` per second.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# The process `timeout` runs (its only child), whose CPU is measured; fails
# when it does not appear within 20 s (a loaded host can take more than 5).
child_of() {
    local child=""
    for _ in $(seq 200); do
        child=$(pgrep -P "$1" | head -n 1) && [ -n "$child" ] && break
        sleep 0.1
    done
    [ -n "$child" ] || { echo "no child of $1" >&2; return 1; }
    echo "$child"
}

# Waits until something accepts on 127.0.0.1:$1 (at most 10 s), else exits.
wait_port() {
    for _ in $(seq 100); do
        python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$1" \
            2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    exit 1
}
