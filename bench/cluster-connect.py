#!/usr/bin/env python3
"""CONNECT latency with session ownership in the cluster (docs/design/cluster.md
§9, §13): one nats-server -js, a single node S without [cluster] and two
cluster nodes A and B of one shard each.

- new clean ids: CONNECT to CONNACK of 200 new client ids per round, three
  rounds, S and A alternating (on A each costs a KV create, and the
  DISCONNECT a delete);
- moves: one persistent session (CleanSession 0) connecting to B and A in
  turn, 100 times: each is a take-over across nodes (KV read, request to
  the owner, its state back, compare-and-set), Session Present 1 each time.

Prints the median and the 99th percentile. Raw MQTT 3.1.1 over sockets.

Usage: bench/cluster-connect.py [NATS_SERVER] [FANMQ]
(defaults: nats-server on PATH, target/release/fanmq). Every process it starts
is killed at the end.
"""

import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

# Rounds of new client ids, and ids per round.
ROUNDS, IDS = 3, 200
# Moves of the persistent session between A and B.
MOVES = 100
# Longest wait for a CONNACK, in seconds (a claim waits at most 10 s).
CONNACK_TIMEOUT = 15
# Time a cluster node is given after connecting to NATS to open its buckets.
SETTLE = 1.5


def connect_packet(client_id, clean):
    """An MQTT 3.1.1 CONNECT, keep-alive 60 s."""
    flags = 0x02 if clean else 0x00
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + b"\x00\x3c"
    body += len(client_id).to_bytes(2, "big") + client_id.encode()
    return bytes([0x10, len(body)]) + body


def connect_time(port, client_id, clean=True):
    """Seconds from CONNECT to an accepting CONNACK, and its Session Present."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(CONNACK_TIMEOUT)
    started = time.perf_counter()
    s.sendall(connect_packet(client_id, clean))
    connack = s.recv(4)
    took = time.perf_counter() - started
    assert connack[:2] == b"\x20\x02" and connack[3] == 0, connack
    s.sendall(b"\xe0\x00")  # DISCONNECT
    s.close()
    return took, connack[2]


def start_nats(binary):
    """nats-server -js on a free port with a temporary store: (process, port)."""
    store = tempfile.mkdtemp()
    nats = subprocess.Popen(
        [binary, "-js", "-a", "127.0.0.1", "-p", "-1", "-sd", store],
        stderr=subprocess.PIPE,
        text=True,
    )
    port = None
    for line in nats.stderr:
        m = re.search(r"Listening for client connections on 127.0.0.1:(\d+)", line)
        if m:
            port = int(m.group(1))
        if "Server is ready" in line:
            return nats, port
    raise RuntimeError("nats-server did not start")


def start_node(fanmq, name, nats_port):
    """A fanmq node of one shard (a cluster node when nats_port is set):
    (process, MQTT port)."""
    config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    if nats_port:
        config.write(
            f'[cluster]\nnats_urls = ["nats://127.0.0.1:{nats_port}"]\nnode_name = "{name}"\n'
        )
    config.close()
    node = subprocess.Popen(
        [fanmq, "--listen", "127.0.0.1:0", "--http-listen", "off", "--shards", "1"]
        + ["--config", config.name, "--log-level", "info"],
        stderr=subprocess.PIPE,
        text=True,
    )
    port, up = None, not nats_port
    for line in node.stderr:
        m = re.search(r"listening on 127.0.0.1:(\d+)", line)
        if m:
            port = int(m.group(1))
        up = up or "connected to NATS" in line
        if port and up:
            if nats_port:
                time.sleep(SETTLE)
            return node, port
    raise RuntimeError(f"node {name} did not start")


def report(label, seconds):
    """Prints the median and 99th percentile of `seconds`, in ms."""
    seconds = sorted(seconds)
    p99 = seconds[int(len(seconds) * 0.99)]
    print(
        f"{label}: median {statistics.median(seconds) * 1e3:.2f} ms, "
        f"p99 {p99 * 1e3:.2f} ms (n={len(seconds)})"
    )


def main():
    nats_binary = sys.argv[1] if len(sys.argv) > 1 else shutil.which("nats-server")
    fanmq = sys.argv[2] if len(sys.argv) > 2 else "target/release/fanmq"
    processes = []
    try:
        nats, nats_port = start_nats(nats_binary)
        processes.append(nats)
        ports = {}
        for name, port in [("s", None), ("a", nats_port), ("b", nats_port)]:
            node, ports[name] = start_node(fanmq, name, port)
            processes.append(node)
        single, cluster = [], []
        for r in range(ROUNDS):
            for i in range(IDS):
                single.append(connect_time(ports["s"], f"s{r}-{i}")[0])
                cluster.append(connect_time(ports["a"], f"c{r}-{i}")[0])
        report("single node, new clean id", single)
        report("cluster node, new clean id", cluster)
        connect_time(ports["a"], "mover", clean=False)
        moves = []
        for i in range(MOVES):
            took, present = connect_time(ports["b" if i % 2 == 0 else "a"], "mover", clean=False)
            assert present == 1, "Session Present 1 after each move"
            moves.append(took)
        report("persistent session moving to the other node", moves)
    finally:
        for p in processes:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
