"""fanmq interoperability checks with Eclipse paho-mqtt (Python).

Usage: python3 paho_checks.py HOST PORT
Prints one line per check and ends with "N passed, M failed"; exits non-zero
on any failure. Every wait is bounded.
"""

import queue
import socket
import struct
import sys
import time
import uuid

import paho.mqtt.client as mqtt

import checks

HOST, PORT = sys.argv[1], int(sys.argv[2])
TIMEOUT = 10.0


def client(client_id, clean_session=True, userdata=None):
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean_session,
        protocol=mqtt.MQTTv311,
    )
    c.inbox = queue.Queue()
    c.connacks = queue.Queue()
    c.on_message = lambda cl, ud, msg: cl.inbox.put(msg)
    c.on_connect = lambda cl, ud, flags, rc, props: cl.connacks.put((flags, rc))
    return c


def connect(c):
    c.connect(HOST, PORT, keepalive=30)
    c.loop_start()
    flags, rc = c.connacks.get(timeout=TIMEOUT)
    assert rc == 0, f"CONNACK {rc}"
    return flags


def subscribe(c, topic, qos):
    result, mid = c.subscribe(topic, qos)
    assert result == mqtt.MQTT_ERR_SUCCESS
    # A marker round trip proves the subscription is active.
    checks.marker_round_trip(c)


def receive(c, n):
    return checks.receive(c, n, TIMEOUT)


def check_persistent_session():
    cid = f"paho-persist-{uuid.uuid4().hex[:8]}"
    sub = client(cid, clean_session=False)
    connect(sub)
    subscribe(sub, "paho/persist", 1)
    sub.disconnect()
    sub.loop_stop()
    pub = client(f"paho-pub-{uuid.uuid4().hex[:8]}")
    connect(pub)
    for i in range(10):
        pub.publish("paho/persist", f"{i}".encode(), qos=1).wait_for_publish(TIMEOUT)
    pub.disconnect()
    pub.loop_stop()
    sub2 = client(cid, clean_session=False)
    flags = connect(sub2)
    assert flags.session_present, "session present flag not set"
    got = receive(sub2, 10)
    assert [m.payload.decode() for m in got] == [str(i) for i in range(10)], got
    sub2.disconnect()
    sub2.loop_stop()


def raw_connect_with_will(client_id, will_topic, will_payload):
    """A raw MQTT 3.1.1 CONNECT with a will, returning the socket."""
    def s(b):
        return struct.pack("!H", len(b)) + b
    var = s(b"MQTT") + bytes([4, 0x04 | 0x02 | (1 << 3)]) + struct.pack("!H", 30)
    body = var + s(client_id.encode()) + s(will_topic.encode()) + s(will_payload)
    sock = socket.create_connection((HOST, PORT), timeout=TIMEOUT)
    sock.sendall(bytes([0x10, len(body)]) + body)
    connack = sock.recv(4)
    assert connack == b"\x20\x02\x00\x00", connack
    return sock


def check_will_on_abrupt_close():
    watcher = client(f"paho-will-watch-{uuid.uuid4().hex[:8]}")
    connect(watcher)
    subscribe(watcher, "paho/will", 1)
    sock = raw_connect_with_will(f"paho-dying-{uuid.uuid4().hex[:8]}", "paho/will", b"gone")
    sock.close()  # no DISCONNECT
    got = receive(watcher, 1)
    assert got[0].payload == b"gone" and got[0].qos == 1, got
    watcher.disconnect()
    watcher.loop_stop()


def check_qos2_round_trip():
    sub = client(f"paho-q2-sub-{uuid.uuid4().hex[:8]}")
    connect(sub)
    subscribe(sub, "paho/q2", 2)
    pub = client(f"paho-q2-pub-{uuid.uuid4().hex[:8]}")
    connect(pub)
    for i in range(20):
        pub.publish("paho/q2", f"{i}".encode(), qos=2).wait_for_publish(TIMEOUT)
    got = receive(sub, 20)
    assert [m.payload.decode() for m in got] == [str(i) for i in range(20)]
    assert all(m.qos == 2 for m in got)
    for c in (sub, pub):
        c.disconnect()
        c.loop_stop()


def check_shared_subscription_v5_and_v311():
    """One $share group with a paho MQTTv5 member and a paho MQTTv311
    member: every message reaches exactly one of them, both get some."""
    group = f"$share/paho-{uuid.uuid4().hex[:8]}/paho/shared"
    v5 = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"paho-sh5-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    v5.inbox = queue.Queue()
    v5.connacks = queue.Queue()
    v5.on_message = lambda cl, ud, msg: cl.inbox.put(msg)
    v5.on_connect = lambda cl, ud, flags, rc, props: cl.connacks.put((flags, rc))
    v3 = client(f"paho-sh3-{uuid.uuid4().hex[:8]}")
    members = (v5, v3)
    for c in members:
        connect(c)
        subscribe(c, group, 1)
    pub = client(f"paho-sh-pub-{uuid.uuid4().hex[:8]}")
    connect(pub)
    sent = [str(i) for i in range(40)]
    for p in sent:
        pub.publish("paho/shared", p.encode(), qos=1).wait_for_publish(TIMEOUT)
    got = {id(c): [] for c in members}
    deadline = time.monotonic() + TIMEOUT
    while sum(len(g) for g in got.values()) < len(sent):
        assert time.monotonic() < deadline, f"got {[len(g) for g in got.values()]}"
        for c in members:
            try:
                msg = c.inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if not msg.topic.startswith("marker/"):
                got[id(c)].append(msg.payload.decode())
    everything = sorted(p for g in got.values() for p in g)
    assert everything == sorted(sent), everything
    assert all(got.values()), "a member got nothing"
    for c in (*members, pub):
        c.disconnect()
        c.loop_stop()


def main():
    checks.run(
        (check.__name__, check)
        for check in (
            check_persistent_session,
            check_will_on_abrupt_close,
            check_qos2_round_trip,
            check_shared_subscription_v5_and_v311,
        )
    )

main()
