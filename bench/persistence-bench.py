#!/usr/bin/env python3
"""Persistence cost: QoS 1 publisher throughput with persistence off, on with
persistence_sync = "interval", and on with "ack" (README, "Persistence").

Starts the broker binary (argument 1) itself for each mode, on a free port,
with its persistence directory in a temporary directory on the file system
of --dir (default: the system's temporary directory; name the disk in any
figure you report). One raw MQTT 3.1.1 publisher sends N retained (and then
N non-retained) QoS 1 publishes, at most WINDOW unacknowledged, to TOPICS
topics, and counts PUBACKs per second. Then prints the journal's bytes per
retained update, and the session journals' bytes per message queued for
many offline persistent subscribers.

  bench/persistence-bench.py target/release/fanmq [--n 20000] [--window 1,100] [--topics 1000]
"""

import argparse
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time


def string(b):
    return struct.pack(">H", len(b)) + b


def remaining(n):
    out = b""
    while True:
        d = n % 128
        n //= 128
        if n:
            d |= 0x80
        out += bytes([d])
        if not n:
            return out


def packet(first, body):
    return bytes([first]) + remaining(len(body)) + body


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(port, cid, clean=True):
    deadline = time.time() + 10
    while True:
        try:
            c = socket.create_connection(("127.0.0.1", port))
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    flags = 2 if clean else 0
    body = string(b"MQTT") + bytes([4, flags]) + struct.pack(">H", 60) + string(cid)
    c.sendall(packet(0x10, body))
    assert c.recv(4)[0] == 0x20
    return c


def run(port, n, window, topics, retain):
    """Sends n QoS 1 publishes with at most window in flight; PUBACKs/s."""
    c = connect(port, b"persist-bench-%d" % time.time_ns())
    payload = b"x" * 64
    first = 0x33 if retain else 0x32
    sent = acked = 0
    buf = b""
    t0 = time.time()
    while acked < n:
        batch = []
        while sent < n and sent - acked < window:
            pid = sent % 65535 + 1
            topic = b"bench/%d" % (sent % topics)
            batch.append(packet(first, string(topic) + struct.pack(">H", pid) + payload))
            sent += 1
        if batch:
            c.sendall(b"".join(batch))
        data = c.recv(1 << 16)
        if not data:
            raise SystemExit("connection closed")
        buf += data
        while len(buf) >= 4:
            assert buf[0] == 0x40, buf[:4]
            buf = buf[4:]
            acked += 1
    elapsed = time.time() - t0
    c.close()
    return n / elapsed


def stop(broker):
    """Stops the broker process (SIGTERM, then SIGKILL after 10 s)."""
    broker.terminate()
    try:
        broker.wait(timeout=10)
    except subprocess.TimeoutExpired:
        broker.kill()
        broker.wait()


def journal_bytes(store):
    """Bytes of every shard's session journal under the store directory."""
    total = 0
    for d in os.listdir(store):
        if d.startswith("shard-"):
            for f in os.listdir(os.path.join(store, d)):
                total += os.path.getsize(os.path.join(store, d, f))
    return total


def fanout_bytes(binary, shards, subscribers, messages, tmpdir):
    """Disk bytes per queued message and per subscriber: `subscribers`
    persistent sessions subscribe and go offline, one publisher sends
    `messages` QoS 1 messages (64-byte payload) that every one queues."""
    scratch = tempfile.mkdtemp(prefix="fanmq-persist-bench-", dir=tmpdir)
    store = os.path.join(scratch, "store")
    os.mkdir(store)
    port = free_port()
    broker = subprocess.Popen(
        [binary, "--listen", f"127.0.0.1:{port}", "--http-listen", "off", "--shards",
         str(shards), "--log-level", "warn", "--persistence-dir", store],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for i in range(subscribers):
            c = connect(port, b"fan-sub-%d" % i, clean=False)
            body = struct.pack(">H", 1) + string(b"fan/t") + b"\x01"
            c.sendall(packet(0x82, body))
            assert c.recv(5)[0] == 0x90
            c.sendall(b"\xe0\x00")
            c.close()
        time.sleep(0.5)  # the images of the last disconnects reach the disk
        before = journal_bytes(store)
        c = connect(port, b"fan-pub")
        for n in range(messages):
            c.sendall(packet(0x32, string(b"fan/t") + struct.pack(">H", n + 1) + b"x" * 64))
            assert c.recv(4)[0] == 0x40
        c.close()
        grown = journal_bytes(store) - before
        print(f"fan-out: {subscribers} offline persistent subscribers, {messages} QoS 1 messages "
              f"(64-byte payload, 5-byte topic): {grown} bytes, {grown / messages:.0f} bytes per "
              f"message, {grown / messages / subscribers:.1f} bytes per subscriber per message")
    finally:
        stop(broker)
        shutil.rmtree(scratch, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--window", default="1,100")
    ap.add_argument("--topics", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=100)
    args = ap.parse_args()
    windows = [int(w) for w in args.window.split(",")]
    for mode in ["off", "interval", "ack"]:
        scratch = tempfile.mkdtemp(prefix="fanmq-persist-bench-", dir=args.dir)
        port = free_port()
        cmd = [args.binary, "--listen", f"127.0.0.1:{port}", "--http-listen", "off",
               "--shards", str(args.shards), "--log-level", "warn"]
        config = os.path.join(scratch, "fanmq.toml")
        if mode != "off":
            store = os.path.join(scratch, "store")
            os.mkdir(store)
            with open(config, "w") as f:
                f.write(f'persistence = true\npersistence_location = "{store}"\n'
                        f'persistence_sync = "{mode}"\n')
            cmd += ["--config", config]
        broker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for retain in [True, False]:
                for window in windows:
                    rate = run(port, args.n if window > 1 else min(args.n, 2000),
                               window, args.topics, retain)
                    kind = "retained" if retain else "plain"
                    print(f"{mode:8} {kind:8} window {window:4}: {rate:10.0f} PUBACKs/s", flush=True)
            if mode != "off":
                size = sum(os.path.getsize(os.path.join(store, "retained", f))
                           for f in os.listdir(os.path.join(store, "retained")))
                updates = sum(args.n if w > 1 else min(args.n, 2000) for w in windows)
                print(f"{mode:8} journal: {size} bytes for {updates} retained updates "
                      f"({size / updates:.1f} bytes each, 64-byte payload, ~10-byte topic)")
        finally:
            stop(broker)
            shutil.rmtree(scratch, ignore_errors=True)
    fanout_bytes(args.binary, args.shards, args.subscribers, args.messages, args.dir)


if __name__ == "__main__":
    main()
