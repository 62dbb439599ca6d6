"""fanmq over TLS and WebSocket with Eclipse paho-mqtt (Python).

Usage: python3 paho_transports.py HOST TCP_PORT TLS_PORT WS_PORT CAFILE
Each check subscribes over one transport and publishes over another (TCP,
TLS, WebSocket), and checks that every message arrives once, in order.
Prints one line per check and ends with "N passed, M failed"; exits non-zero
on any failure. Every wait is bounded.
"""

import queue
import ssl
import sys
import uuid

import paho.mqtt.client as mqtt

import checks

HOST = sys.argv[1]
TCP_PORT, TLS_PORT, WS_PORT = (int(p) for p in sys.argv[2:5])
CAFILE = sys.argv[5]
TIMEOUT = 10.0
MESSAGES = 50


def client(transport_name):
    """A connected paho client over "tcp", "tls" or "ws"."""
    transport = "websockets" if transport_name == "ws" else "tcp"
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"paho-{transport_name}-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv311,
        transport=transport,
    )
    c.inbox = queue.Queue()
    c.connacks = queue.Queue()
    c.on_message = lambda cl, ud, msg: cl.inbox.put(msg)
    c.on_connect = lambda cl, ud, flags, rc, props: cl.connacks.put(rc)
    port = {"tcp": TCP_PORT, "tls": TLS_PORT, "ws": WS_PORT}[transport_name]
    if transport_name == "tls":
        c.tls_set(ca_certs=CAFILE, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    if transport_name == "ws":
        c.ws_set_options(path="/mqtt")
    c.connect(HOST, port, keepalive=30)
    c.loop_start()
    rc = c.connacks.get(timeout=TIMEOUT)
    assert rc == 0, f"CONNACK {rc} over {transport_name}"
    return c


def wait_subscribed(sub, pub, topic):
    """Publishes markers until the subscriber sees one (its SUBSCRIBE is
    then active), and drains them."""
    while True:
        pub.publish(topic, b"marker", qos=0)
        try:
            msg = sub.inbox.get(timeout=0.5)
        except queue.Empty:
            continue
        if msg.payload == b"marker":
            break
    while True:
        try:
            sub.inbox.get(timeout=0.3)
        except queue.Empty:
            return


def check(sub_over, pub_over, qos):
    sub = client(sub_over)
    pub = client(pub_over)
    try:
        topic = f"interop/transports/{uuid.uuid4().hex}"
        sub.subscribe(topic, qos)
        wait_subscribed(sub, pub, topic)
        for i in range(MESSAGES):
            pub.publish(topic, str(i).encode(), qos=qos)
        got = [sub.inbox.get(timeout=TIMEOUT).payload.decode() for _ in range(MESSAGES)]
        assert got == [str(i) for i in range(MESSAGES)], f"got {got}"
        try:
            extra = sub.inbox.get(timeout=0.3)
            raise AssertionError(f"duplicate {extra.payload!r}")
        except queue.Empty:
            pass
    finally:
        for c in (sub, pub):
            c.disconnect()
            c.loop_stop()


def main():
    pairs = [
        ("ws", "tcp", 0),
        ("ws", "tls", 1),
        ("tls", "ws", 1),
        ("tls", "tcp", 2),
        ("tcp", "ws", 2),
    ]
    checks.run(
        (
            f"paho: subscribe over {sub_over}, publish over {pub_over}, QoS {qos}",
            lambda sub_over=sub_over, pub_over=pub_over, qos=qos: check(sub_over, pub_over, qos),
        )
        for sub_over, pub_over, qos in pairs
    )


if __name__ == "__main__":
    main()
