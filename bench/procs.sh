# Shell helpers of the scripts that start brokers and measure them
# (bench/cluster-cpu.sh, bench/cluster-fanout.sh): sourced, not run.
# The sourcing script sets `work` (a temporary directory) and `pids` (every
# process it started, killed on exit) and installs `cleanup` on EXIT.

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
# when it does not appear within 5 s.
child_of() {
    local child=""
    for _ in $(seq 50); do
        child=$(pgrep -P "$1" | head -n 1) && [ -n "$child" ] && break
        sleep 0.1
    done
    [ -n "$child" ] || { echo "no child of $1" >&2; return 1; }
    echo "$child"
}
