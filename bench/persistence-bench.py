#!/usr/bin/env python3
"""Persistence cost (README "Persistence", bench/RESULTS.md "Persistence").

Starts the broker binary (argument 1) itself for each run, on a free port,
with its persistence directory in a temporary directory on the file system
of --dir (default: the system's temporary directory; name the disk in any
figure you report). Sections, chosen with --only (comma-separated):

  throughput  one raw MQTT 3.1.1 publisher sends N retained (then N plain)
              QoS 1 publishes, at most WINDOW unacknowledged, to TOPICS
              topics: PUBACKs/s and broker CPU-seconds with persistence off,
              "interval" and "ack", alternating in each of --rounds rounds,
              medians; and the journal's bytes per retained update
  bytes       the session journals' bytes per message queued for many
              offline persistent subscribers (per message, per subscriber)
  fanout      `fanmq-bench fanout --qos 1 --clean-session false` to
              --fanout-subs online persistent subscribers: deliveries per
              broker CPU-second, off / ack / interval, --rounds rounds
  restart     exec to first CONNACK, and the start-up log, after SIGTERM and
              after kill -9, with --restart-retained retained messages and
              with --restart-sessions sessions holding --queued messages;
              with --restart-compare OTHER, the same session stores
              restarted by the binary and OTHER in turn (--compare-shards)
  kill9       a persistent subscriber offline, --kill-n acknowledged QoS 1
              messages for it and --kill-n acknowledged retained messages,
              kill -9, restart: what was lost, for fanmq (ack, interval) and
              Mosquitto with its defaults (autosave_interval 1800 s)

  bench/persistence-bench.py target/release/fanmq [--only throughput,bytes] [--rounds 3]
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
    t0 = time.time()
    publish_many(port, n, lambda i: b"bench/%d" % (i % topics), retain, window)
    return n / (time.time() - t0)


def cpu_seconds(pid):
    """User + system CPU seconds the process `pid` used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


# CPUs the brokers run on (--broker-cpus; empty: any).
BROKER_CPUS = ""


def start_broker(binary, shards, mode, scratch, log_path=None, extra=""):
    """Starts fanmq on a free port with persistence `mode` ("off", "interval",
    "ack") in scratch/store; returns (process, port, store)."""
    port = free_port()
    cmd = [binary, "--listen", f"127.0.0.1:{port}", "--http-listen", "off",
           "--shards", str(shards), "--log-level", "info" if log_path else "warn",
           # A load test: no per-address or global connection limits.
           "--max-connections-per-ip", "0", "--max-connection-rate-per-ip", "0",
           "--max-connection-rate", "0"]
    store = os.path.join(scratch, "store")
    os.makedirs(store, exist_ok=True)
    config = os.path.join(scratch, "fanmq.toml")
    with open(config, "w") as f:
        if mode != "off":
            f.write(f'persistence = true\npersistence_location = "{store}"\n'
                    f'persistence_sync = "{mode}"\n')
        f.write(extra)
    cmd += ["--config", config]
    if BROKER_CPUS:
        cmd = ["taskset", "-c", BROKER_CPUS] + cmd
    err = open(log_path, "w") if log_path else subprocess.DEVNULL
    broker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    return broker, port, store


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def throughput(args):
    """QoS 1 PUBACKs/s and PUBACKs per broker CPU-second per mode, modes
    alternating within each round; medians over the rounds."""
    windows = [int(w) for w in args.window.split(",")]
    figures = {}
    for rnd in range(args.rounds):
        for mode in ["off", "interval", "ack"]:
            scratch = tempfile.mkdtemp(prefix="fanmq-persist-bench-", dir=args.dir)
            extra = (f"persistence_snapshot_log_bytes = {args.snapshot_bytes}\n"
                     if args.snapshot_bytes and mode != "off" else "")
            broker, port, store = start_broker(args.binary, args.shards, mode, scratch,
                                               extra=extra)
            try:
                connect(port, b"probe").close()
                for retain in [True, False]:
                    for window in windows:
                        n = args.n if window > 1 else min(args.n, 2000)
                        cpu0 = cpu_seconds(broker.pid)
                        rate = run(port, n, window, args.topics, retain)
                        cpu = cpu_seconds(broker.pid) - cpu0
                        kind = "retained" if retain else "plain"
                        figures.setdefault((kind, window, mode), []).append(
                            (rate, n / cpu if cpu > 0 else float("inf")))
                        print(f"round {rnd} {mode:8} {kind:8} window {window:4}: {rate:10.0f} "
                              f"PUBACKs/s, broker CPU {cpu:.2f} s", flush=True)
                if mode != "off" and rnd == 0:
                    rdir = os.path.join(store, "retained")
                    size = sum(os.path.getsize(os.path.join(rdir, f)) for f in os.listdir(rdir))
                    updates = sum(args.n if w > 1 else min(args.n, 2000) for w in windows)
                    print(f"{mode:8} retained journal now: {size} bytes after {updates} retained "
                          f"updates to {args.topics} topics ({size / updates:.1f} bytes per update"
                          f", 64-byte payload, ~10-byte topic; snapshots while running: "
                          f"{args.snapshot_bytes or 'default threshold'})")
            finally:
                stop(broker)
                shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nmedians of {args.rounds} rounds (PUBACKs/s | PUBACKs per broker CPU-s):")
    print("| QoS 1 publish | off | interval | ack | ack / off (per CPU-s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind in ["retained", "plain"]:
        for window in windows:
            row = [figures[(kind, window, m)] for m in ["off", "interval", "ack"]]
            rates = [median([r for r, _ in f]) for f in row]
            per_cpu = [median([c for _, c in f]) for f in row]
            cells = " | ".join(f"{r:,.0f} / {c:,.0f}" for r, c in zip(rates, per_cpu))
            print(f"| {kind}, {window} in flight | {cells} | {per_cpu[2] / per_cpu[0]:.2f} |")


def fanout_cpu(args):
    """QoS 1 fan-out to --fanout-subs online persistent (CleanSession 0)
    subscribers with `fanmq-bench fanout`: deliveries per broker CPU-second
    with persistence off, interval and ack, alternating, several rounds."""
    import json
    per_cpu = {}
    modes = args.fanout_modes.split(",")
    for rnd in range(args.rounds):
        for mode in modes:
            scratch = tempfile.mkdtemp(prefix="fanmq-persist-bench-", dir=args.dir)
            # `MODE@BINARY`: that mode with another build (before and after
            # a change, in the same run).
            sync, _, binary = mode.partition("@")
            broker, port, store = start_broker(binary or args.binary, args.shards, sync, scratch)
            out = os.path.join(scratch, "result.json")
            try:
                connect(port, b"probe").close()
                cmd = ["taskset", "-c", args.client_cpus, args.fanout_bench, "fanout",
                       "--subs", str(args.fanout_subs), "--msgs", str(args.fanout_msgs),
                       "--qos", "1", "--clean-session", "false", "--port", str(port),
                       "--broker-pid", str(broker.pid), "--label", f"fanmq-{sync}",
                       "--duration", "120", "--drain-timeout", str(args.fanout_drain),
                       "--out", out]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=300)
                with open(out) as f:
                    result = json.load(f)
                runs = result if isinstance(result, list) else result.get("runs", [result])
                r = runs[0]
                figure = find_key(r, "deliveries_per_cpu_s")
                lost = find_key(r, "lost")
                per_cpu.setdefault(mode, []).append(figure)
                disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store)
                           for f in fs)
                per_sub = disk / (args.fanout_msgs * args.fanout_subs)
                print(f"round {rnd} {mode:8}: {figure:,.0f} deliveries per broker CPU-s, "
                      f"lost {lost}, {disk} bytes on disk ({per_sub:.1f} per subscriber per "
                      f"message, images included)", flush=True)
            finally:
                stop(broker)
                shutil.rmtree(scratch, ignore_errors=True)
    off = median(per_cpu["off"]) if "off" in per_cpu else None
    for mode in modes:
        m = median(per_cpu[mode])
        print(f"fan-out QoS 1 to {args.fanout_subs} online persistent subscribers, {mode:8}: "
              f"median {m:,.0f} deliveries per broker CPU-s"
              + (f" ({m / off:.2f} of off)" if off else ""))
        if off and mode != "off":
            # Each round against the off run just before it: the host's
            # drift between rounds cancels out.
            ratios = [v / o for v, o in zip(per_cpu[mode], per_cpu["off"])]
            print(f"    {mode} / off per round: " + " / ".join(f"{r:.2f}" for r in ratios)
                  + f", median {median(ratios):.2f}")


def find_key(obj, key):
    """The first value of `key` anywhere in a JSON object."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = find_key(v, key)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for v in obj:
            found = find_key(v, key)
            if found is not None:
                return found
    return None


def wait_ready(port, timeout=600):
    """Seconds until the broker on `port` answers a CONNECT with CONNACK."""
    t0 = time.time()
    while True:
        try:
            connect(port, b"ready-probe").close()
            return time.time() - t0
        except (OSError, AssertionError, IndexError):
            if time.time() - t0 > timeout:
                raise
            time.sleep(0.01)


def wait_shards_loaded(log_path, shards, t0, timeout=600):
    """Seconds since `t0` (the exec) until each of `shards` shards logged
    its "retained messages loaded" line (the last of its start)."""
    while True:
        with open(log_path) as f:
            done = sum(1 for l in f if "retained messages loaded" in l)
        if done >= shards:
            return time.time() - t0
        if time.time() - t0 > timeout:
            raise SystemExit(f"only {done} of {shards} shards loaded in {timeout} s")
        time.sleep(0.01)


def persistence_lines(log_path):
    with open(log_path) as f:
        return [l.rstrip() for l in f if "persistence" in l and (
            "loaded" in l or "restored" in l or "sessions from" in l or "messages from" in l
            or "written again" in l)]


def restart_time(args, build, what):
    """Builds state with `build(port)`, stops the broker (SIGTERM; then also
    kill -9 after a rebuild), starts it again and reports exec → first
    CONNACK and what the start-up log says."""
    for how in ["SIGTERM", "kill -9"]:
        scratch = tempfile.mkdtemp(prefix="fanmq-persist-bench-", dir=args.dir)
        try:
            broker, port, store = start_broker(args.binary, args.shards, "interval", scratch)
            wait_ready(port)
            build(port)
            if how == "SIGTERM":
                stop(broker)
            else:
                time.sleep(1.5)  # one interval sync: what kill -9 keeps anyway
                broker.kill()
                broker.wait()
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store)
                       for f in fs)
            log_path = os.path.join(scratch, "restart.log")
            t0 = time.time()
            broker, port, _ = start_broker(args.binary, args.shards, "interval", scratch, log_path)
            wait_ready(port)
            ready = time.time() - t0
            # With several shards the first CONNACK may come from a shard
            # that finished while another still loads: wait for every
            # shard's last start-up line too.
            loaded = wait_shards_loaded(log_path, args.shards, t0)
            cpu = cpu_seconds(broker.pid)
            print(f"restart after {how} with {what} ({args.shards} shards): {size} bytes on disk, "
                  f"exec to first CONNACK {ready:.2f} s, to every shard loaded {loaded:.2f} s, "
                  f"broker CPU {cpu:.2f} s; start-up log:")
            for line in persistence_lines(log_path):
                print("    " + line)
            stop(broker)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def publish_many(port, n, topic_of, retain, window=1000, payload=b"x" * 64):
    """Publishes n QoS 1 messages, window in flight; waits for every PUBACK."""
    c = connect(port, b"builder-%d" % time.time_ns())
    first = 0x33 if retain else 0x32
    sent = acked = 0
    buf = b""
    while acked < n:
        batch = []
        while sent < n and sent - acked < window:
            batch.append(packet(first, string(topic_of(sent)) + struct.pack(">H", sent % 65535 + 1)
                                + payload))
            sent += 1
        if batch:
            c.sendall(b"".join(batch))
        data = c.recv(1 << 16)
        if not data:
            raise SystemExit("connection closed")
        buf += data
        k = len(buf) // 4
        assert all(b == 0x40 for b in buf[0:4 * k:4]), buf[:4]
        acked += k
        buf = buf[4 * k:]
    c.close()


def persistent_subscribers(port, count, filt, prefix=b"rs-sub-", qos=1):
    """`count` CleanSession 0 sessions subscribe to `filt` and disconnect,
    500 connections at a time (CONNECT, SUBSCRIBE, DISCONNECT in one write)."""
    done = 0
    while done < count:
        socks = []
        for i in range(done, min(count, done + 500)):
            c = socket.create_connection(("127.0.0.1", port))
            body = string(b"MQTT") + bytes([4, 0]) + struct.pack(">H", 60) + string(prefix + b"%d" % i)
            sub = packet(0x82, struct.pack(">H", 1) + string(filt) + bytes([qos]))
            c.sendall(packet(0x10, body) + sub + b"\xe0\x00")
            socks.append(c)
        for c in socks:
            c.settimeout(30)
            while c.recv(4096):
                pass
            c.close()
        done += len(socks)


def restarts(args):
    n = args.restart_retained
    restart_time(args, lambda port: publish_many(port, n, lambda i: b"r/%d" % i, True),
                 f"{n} retained messages (64-byte payloads)")
    s, q = args.restart_sessions, args.queued

    def build(port):
        persistent_subscribers(port, s, b"q/t")
        publish_many(port, q, lambda i: b"q/t", False, window=10)
    restart_time(args, build, f"{s} persistent sessions holding {q} queued QoS 1 messages each")


def restart_compare(args):
    """`--restart-compare OTHER`: one store per shard count (--compare-shards)
    of --restart-sessions sessions holding --queued messages each (or, with
    --compare-what retained, of --restart-retained retained messages), built by
    the binary (argument 1) and stopped with SIGTERM; then, --rounds times,
    the binary and OTHER each restart a fresh copy of it (their order
    alternating by round): wall time from exec to every shard loaded, and
    the broker's CPU-seconds by then, medians and per-round ratios."""
    binaries = [args.binary, args.restart_compare]
    s, q, n = args.restart_sessions, args.queued, args.restart_retained
    for shards in [int(x) for x in args.compare_shards.split(",")]:
        scratch = tempfile.mkdtemp(prefix="fanmq-persist-bench-", dir=args.dir)
        try:
            broker, port, store = start_broker(args.binary, shards, "interval", scratch)
            try:
                wait_ready(port)
                if args.compare_what == "retained":
                    publish_many(port, n, lambda i: b"r/%d" % i, True)
                    what = f"{n} retained messages (64-byte payloads)"
                else:
                    persistent_subscribers(port, s, b"q/t")
                    publish_many(port, q, lambda i: b"q/t", False, window=10)
                    what = f"{s} persistent sessions holding {q} queued QoS 1 messages each"
            finally:
                stop(broker)
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store)
                       for f in fs)
            print(f"restart of {what}, {shards} shards, {size} bytes on disk, "
                  f"{args.rounds} rounds:")
            figures = {b: [] for b in binaries}
            for rnd in range(args.rounds):
                for b in (binaries if rnd % 2 == 0 else binaries[::-1]):
                    run_dir = tempfile.mkdtemp(prefix="fanmq-restart-", dir=args.dir)
                    try:
                        shutil.copytree(store, os.path.join(run_dir, "store"))
                        log_path = os.path.join(run_dir, "restart.log")
                        t0 = time.time()
                        broker, port, _ = start_broker(b, shards, "interval", run_dir, log_path)
                        try:
                            wait_ready(port)
                            loaded = wait_shards_loaded(log_path, shards, t0)
                            cpu = cpu_seconds(broker.pid)
                        finally:
                            stop(broker)
                        figures[b].append((loaded, cpu))
                        print(f"    round {rnd + 1} {b}: every shard loaded {loaded:.2f} s, "
                              f"broker CPU {cpu:.2f} s")
                        if rnd == 0:
                            for line in persistence_lines(log_path):
                                if args.compare_what == "retained" or "retained" not in line:
                                    print("        " + line)
                    finally:
                        shutil.rmtree(run_dir, ignore_errors=True)
            for b in binaries:
                print(f"  {b}: median load {median([f[0] for f in figures[b]]):.2f} s, "
                      f"median CPU {median([f[1] for f in figures[b]]):.2f} s")
            for i, what in [(0, "load wall"), (1, "CPU")]:
                ratios = [x[i] / y[i] for x, y in zip(figures[binaries[0]], figures[binaries[1]])
                          if y[i] > 0]
                if not ratios:
                    continue
                print(f"  {what} {binaries[0]} / {binaries[1]} per round: "
                      + " / ".join(f"{r:.2f}" for r in ratios) + f", median {median(ratios):.2f}")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def mosquitto_start(binary, scratch, port):
    """Mosquitto with persistence in scratch/mstore and its other defaults
    (autosave_interval 1800 s, max_queued_messages 1000)."""
    conf = os.path.join(scratch, "mosquitto.conf")
    store = os.path.join(scratch, "mstore")
    os.makedirs(store, exist_ok=True)
    with open(conf, "w") as f:
        f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                f"persistence_location {store}/\n")
    return subprocess.Popen([binary, "-c", conf], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def drain(port, cid, filt=None, idle=2.0):
    """Connects `cid` (CleanSession 0; subscribes to filt when given) and
    returns the payloads of every PUBLISH that arrives until `idle` seconds
    pass without one, acknowledging QoS 1."""
    c = connect(port, cid, clean=False)
    if filt:
        c.sendall(packet(0x82, struct.pack(">H", 1) + string(filt) + b"\x01"))
    c.settimeout(idle)
    buf = b""
    got = []
    while True:
        try:
            data = c.recv(1 << 16)
        except socket.timeout:
            break
        if not data:
            break
        buf += data
        while len(buf) >= 2:
            mult, length, i = 1, 0, 1
            while i < len(buf):
                length += (buf[i] & 0x7F) * mult
                mult *= 128
                i += 1
                if not buf[i - 1] & 0x80:
                    break
            else:
                break
            if len(buf) < i + length:
                break
            first, body = buf[0], buf[i:i + length]
            buf = buf[i + length:]
            if first >> 4 == 3:
                tlen = struct.unpack(">H", body[:2])[0]
                topic = body[2:2 + tlen]
                rest = body[2 + tlen:]
                if (first >> 1) & 3:
                    pid = rest[:2]
                    rest = rest[2:]
                    c.sendall(b"\x40\x02" + pid)
                got.append((topic, rest))
    c.close()
    return got


def kill9(args):
    """The same kill -9 run against fanmq (ack and interval) and Mosquitto
    (its defaults: autosave_interval 1800 s): a persistent subscriber goes
    offline, a publisher sends --kill-n QoS 1 messages to it and
    --kill-n retained QoS 1 messages, each acknowledged; kill -9; restart;
    count what of the acknowledged is missing."""
    n = args.kill_n
    for broker_kind in ["fanmq ack", "fanmq interval", "mosquitto"]:
        scratch = tempfile.mkdtemp(prefix="fanmq-persist-bench-", dir=args.dir)
        try:
            def start():
                if broker_kind == "mosquitto":
                    port = free_port()
                    return mosquitto_start(args.mosquitto, scratch, port), port
                mode = broker_kind.split()[1]
                p, port, _ = start_broker(args.binary, args.shards, mode, scratch)
                return p, port
            broker, port = start()
            wait_ready(port)
            drain(port, b"k9-sub", b"k9/t", idle=0.5)
            publish_many(port, n, lambda i: b"k9/t", False, window=100)
            # Retained: n topics.
            publish_many(port, n, lambda i: b"k9/r/%d" % i, True, window=100)
            broker.kill()
            broker.wait()
            if broker_kind == "mosquitto":
                broker = mosquitto_start(args.mosquitto, scratch, port)
            else:
                mode = broker_kind.split()[1]
                # Same directory: start_broker reuses scratch/store.
                broker, port, _ = start_broker(args.binary, args.shards, mode, scratch)
            wait_ready(port)
            queued = drain(port, b"k9-sub")
            retained = drain(port, b"k9-probe-%d" % time.time_ns(), b"k9/r/#")
            got_q = sum(1 for t, _ in queued if t == b"k9/t")
            got_r = len({t for t, _ in retained if t.startswith(b"k9/r/")})
            print(f"kill -9, {broker_kind:15}: of {n} acknowledged QoS 1 messages queued for an "
                  f"offline persistent subscriber {n - min(got_q, n)} lost ({got_q} delivered); of "
                  f"{n} acknowledged retained messages {n - got_r} lost", flush=True)
            stop(broker)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--only", default="throughput,bytes",
                    help="comma-separated: throughput, bytes, fanout, restart, kill9")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--window", default="1,100")
    ap.add_argument("--topics", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=100)
    ap.add_argument("--fanout-bench", default="target/release/fanmq-bench")
    ap.add_argument("--fanout-subs", type=int, default=10000)
    ap.add_argument("--fanout-msgs", type=int, default=50)
    ap.add_argument("--fanout-modes", default="off,ack,interval",
                    help="persistence modes of the fanout section, in the order each round runs "
                         "them; MODE@BINARY runs that mode with another build")
    ap.add_argument("--fanout-drain", type=float, default=5.0,
                    help="fanmq-bench --drain-timeout of the fanout section (s)")
    ap.add_argument("--client-cpus", default="1")
    ap.add_argument("--broker-cpus", default="")
    ap.add_argument("--snapshot-bytes", type=int, default=0,
                    help="persistence_snapshot_log_bytes for the throughput runs (0: default)")
    ap.add_argument("--restart-retained", type=int, default=1000000)
    ap.add_argument("--restart-sessions", type=int, default=15000)
    ap.add_argument("--queued", type=int, default=100)
    ap.add_argument("--kill-n", type=int, default=1000)
    ap.add_argument("--mosquitto", default="/usr/sbin/mosquitto")
    ap.add_argument("--restart-compare", default=None, metavar="OTHER",
                    help="with --only restart: restart the same session stores with the "
                         "binary and OTHER, alternating (restart_compare)")
    ap.add_argument("--compare-shards", default="1,2",
                    help="comma-separated shard counts for --restart-compare")
    ap.add_argument("--compare-what", default="sessions", choices=["sessions", "retained"],
                    help="the store --restart-compare restarts")
    args = ap.parse_args()
    only = args.only.split(",")
    global BROKER_CPUS
    BROKER_CPUS = args.broker_cpus
    if "throughput" in only:
        throughput(args)
    if "bytes" in only:
        fanout_bytes(args.binary, args.shards, args.subscribers, args.messages, args.dir)
    if "fanout" in only:
        fanout_cpu(args)
    if "restart" in only:
        if args.restart_compare:
            restart_compare(args)
        else:
            restarts(args)
    if "kill9" in only:
        kill9(args)


if __name__ == "__main__":
    main()
