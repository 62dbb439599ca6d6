"""fanmq interoperability checks with Eclipse paho-mqtt 2.x (Python) speaking
MQTT 5.0: CONNECT and CONNACK properties, subscription options and
identifiers, and the PUBLISH properties a 5.0 subscriber must get unchanged.

Usage: python3 paho_v5.py HOST PORT
Prints one line per check and ends with "N passed, M failed"; exits non-zero
on any failure. Every wait is bounded. The broker runs with 2 shards, and
each check uses several subscribers so that both shards deliver.
"""

import queue
import sys
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

import checks

HOST, PORT = sys.argv[1], int(sys.argv[2])
TIMEOUT = 10.0
# Subscribers per check: with SO_REUSEPORT spreading connections over the
# 2 shards, 4 leave both without one with probability 1/8; the publisher
# is on one of them, so most runs cross shards in every check.
SUBSCRIBERS = 4


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def client(client_id):
    """An MQTT 5.0 paho client whose callbacks fill queues."""
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )
    c.inbox = queue.Queue()
    c.connacks = queue.Queue()
    c.subacks = queue.Queue()
    c.on_message = lambda cl, ud, msg: cl.inbox.put(msg)
    c.on_connect = lambda cl, ud, flags, rc, props: cl.connacks.put((flags, rc, props))
    c.on_subscribe = lambda cl, ud, mid, rcs, props: cl.subacks.put(rcs)
    c.disconnects = queue.Queue()
    c.on_disconnect = lambda cl, ud, flags, rc, props: cl.disconnects.put(rc)
    return c


def connect(c, clean_start=True, properties=None):
    """Connects and waits for CONNACK Success; returns (flags, properties)."""
    c.connect(HOST, PORT, keepalive=30, clean_start=clean_start, properties=properties)
    c.loop_start()
    flags, rc, props = c.connacks.get(timeout=TIMEOUT)
    assert not rc.is_failure, f"CONNACK {rc}"
    return flags, props


def stop(*clients, properties=None):
    """Sends DISCONNECT (with `properties`), waits until it is written and
    the connection closed, then stops the network thread."""
    for c in clients:
        c.disconnect(properties=properties)
        c.disconnects.get(timeout=TIMEOUT)
        c.loop_stop()


def subscribe(c, topic, options, properties=None):
    """Subscribes, checks the SUBACK grants the QoS, then makes sure the
    subscription is active with a marker round trip."""
    c.subscribe([(topic, options)], properties=properties)
    codes = c.subacks.get(timeout=TIMEOUT)
    assert [rc.value for rc in codes] == [options.QoS], f"SUBACK {codes}"
    checks.marker_round_trip(c)
    c.subacks.get(timeout=TIMEOUT)  # the marker's


def receive(c, n):
    """The next `n` messages that are not markers."""
    return checks.receive(c, n, TIMEOUT)


def until(c, topic):
    """Every non-marker message up to and including the first on `topic`."""
    got = []
    while True:
        msg = receive(c, 1)[0]
        got.append(msg)
        if msg.topic == topic:
            return got


def check_connect_and_connack_properties():
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 60
    props.ReceiveMaximum = 5
    props.MaximumPacketSize = 65536
    props.TopicAliasMaximum = 4
    props.RequestProblemInformation = 1
    props.UserProperty = [("client", "paho")]
    cid = unique("paho5-connect")
    c = client(cid)
    flags, ack = connect(c, properties=props)
    assert not flags.session_present
    assert ack.TopicAliasMaximum == 10, ack
    assert ack.ReceiveMaximum == 100, ack
    assert ack.RetainAvailable == 1 and ack.WildcardSubscriptionAvailable == 1, ack
    assert ack.SubscriptionIdentifierAvailable == 1, ack
    assert not hasattr(ack, "ResponseInformation"), "not configured, not sent"
    subscribe(c, "paho5/kept", SubscribeOptions(qos=1))
    stop(c)
    # The Session Expiry Interval kept the session: it is present, with its
    # subscription, when the client comes back without Clean Start.
    c = client(cid)
    flags, _ = connect(c, clean_start=False, properties=props)
    assert flags.session_present, "session present"
    pub = client(unique("paho5-connect-pub"))
    connect(pub)
    pub.publish("paho5/kept", b"still here", qos=1).wait_for_publish(TIMEOUT)
    assert receive(c, 1)[0].payload == b"still here"
    # Session Expiry Interval 0 on DISCONNECT ends the session now.
    end = Properties(PacketTypes.DISCONNECT)
    end.SessionExpiryInterval = 0
    stop(c, properties=end)
    c = client(cid)
    flags, _ = connect(c, clean_start=False)
    assert not flags.session_present, "ended by DISCONNECT"
    stop(c, pub)


def check_publish_properties_reach_v5_subscribers():
    subs = [client(unique("paho5-props-sub")) for _ in range(SUBSCRIBERS)]
    for s in subs:
        connect(s)
        subscribe(s, "paho5/props", SubscribeOptions(qos=1))
    pub = client(unique("paho5-props-pub"))
    connect(pub)
    props = Properties(PacketTypes.PUBLISH)
    props.PayloadFormatIndicator = 1
    props.MessageExpiryInterval = 120
    props.ContentType = "application/json"
    props.ResponseTopic = "paho5/reply/1"
    props.CorrelationData = b"\x00\x01corr"
    props.UserProperty = [("a", "1"), ("b", "2"), ("a", "3")]
    for qos in (0, 1, 2):
        pub.publish("paho5/props", b'{"n": 1}', qos=qos, properties=props).wait_for_publish(TIMEOUT)
    for s in subs:
        for qos, msg in zip((0, 1, 2), receive(s, 3)):
            assert msg.payload == b'{"n": 1}'
            p = msg.properties
            assert p.PayloadFormatIndicator == 1, (qos, p)
            assert 0 < p.MessageExpiryInterval <= 120, (qos, p)
            assert p.ContentType == "application/json", (qos, p)
            assert p.ResponseTopic == "paho5/reply/1", (qos, p)
            assert p.CorrelationData == b"\x00\x01corr", (qos, p)
            # User properties in order, duplicates kept (§3.3.2.3.7).
            assert p.UserProperty == [("a", "1"), ("b", "2"), ("a", "3")], (qos, p)
    stop(pub, *subs)


def check_request_response_round_trip():
    requester = client(unique("paho5-requester"))
    connect(requester)
    reply_to = f"paho5/reply/{uuid.uuid4().hex[:8]}"
    subscribe(requester, reply_to, SubscribeOptions(qos=1))
    responders = [client(unique("paho5-responder")) for _ in range(2)]
    for r in responders:
        connect(r)
        subscribe(r, "paho5/service", SubscribeOptions(qos=1))
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reply_to
    props.CorrelationData = b"req-7"
    requester.publish("paho5/service", b"ping", qos=1, properties=props).wait_for_publish(TIMEOUT)
    for r in responders:
        request = receive(r, 1)[0]
        answer = Properties(PacketTypes.PUBLISH)
        answer.CorrelationData = request.properties.CorrelationData
        r.publish(request.properties.ResponseTopic, b"pong", qos=1, properties=answer)
    for msg in receive(requester, 2):
        assert msg.topic == reply_to and msg.payload == b"pong", msg.topic
        assert msg.properties.CorrelationData == b"req-7", msg.properties
    stop(requester, *responders)


def check_subscription_options_and_identifiers():
    c = client(unique("paho5-options"))
    connect(c)
    other = client(unique("paho5-options-other"))
    connect(other)
    # No Local: the client's own publication is not sent back to it.
    subscribe(c, "paho5/nolocal", SubscribeOptions(qos=1, noLocal=True))
    c.publish("paho5/nolocal", b"mine", qos=1).wait_for_publish(TIMEOUT)
    other.publish("paho5/nolocal", b"theirs", qos=1).wait_for_publish(TIMEOUT)
    assert [m.payload for m in receive(c, 1)] == [b"theirs"]
    # Subscription Identifiers: every matching one comes with the message.
    for filter_, identifier in (("paho5/id/#", 7), ("paho5/id/+", 9)):
        props = Properties(PacketTypes.SUBSCRIBE)
        props.SubscriptionIdentifier = identifier
        subscribe(c, filter_, SubscribeOptions(qos=1), properties=props)
    other.publish("paho5/id/x", b"both", qos=1).wait_for_publish(TIMEOUT)
    msg = receive(c, 1)[0]
    assert sorted(msg.properties.SubscriptionIdentifier) == [7, 9], msg.properties
    # Retain Handling 2: no retained message at SUBSCRIBE; Retain As
    # Published: a live retained publish keeps RETAIN.
    other.publish("paho5/rap", b"stored", qos=1, retain=True).wait_for_publish(TIMEOUT)
    subscribe(c, "paho5/rap", SubscribeOptions(qos=1, retainAsPublished=True, retainHandling=2))
    subscribe(c, "paho5/end", SubscribeOptions(qos=1))
    other.publish("paho5/rap", b"live", qos=1, retain=True).wait_for_publish(TIMEOUT)
    other.publish("paho5/end", b"end", qos=1).wait_for_publish(TIMEOUT)
    got = until(c, "paho5/end")
    assert [(m.payload, m.retain) for m in got if m.topic == "paho5/rap"] == [(b"live", True)], [
        (m.topic, m.payload, m.retain) for m in got
    ]
    # Clear the retained message for later runs.
    other.publish("paho5/rap", b"", qos=1, retain=True).wait_for_publish(TIMEOUT)
    stop(c, other)


def check_shared_subscription_identifier_and_retain_as_published():
    """A member of a $share group that also has an overlapping plain
    subscription gets two copies: the group's with its identifier and RETAIN
    as published, the plain one's with its own identifier, RETAIN cleared."""
    c = client(unique("paho5-shared-id"))
    connect(c)
    other = client(unique("paho5-shared-id-pub"))
    connect(other)
    topic = f"paho5/shared-id/{uuid.uuid4().hex[:8]}"
    for filter_, identifier, rap in ((f"$share/g/{topic}", 5, True), (topic, 11, False)):
        props = Properties(PacketTypes.SUBSCRIBE)
        props.SubscriptionIdentifier = identifier
        subscribe(c, filter_, SubscribeOptions(qos=1, retainAsPublished=rap), properties=props)
    other.publish(topic, b"both", qos=1, retain=True).wait_for_publish(TIMEOUT)
    got = sorted((m.properties.SubscriptionIdentifier, m.retain) for m in receive(c, 2))
    assert got == [([5], True), ([11], False)], got
    # Clear the retained message.
    other.publish(topic, b"", qos=1, retain=True).wait_for_publish(TIMEOUT)
    stop(c, other)


def main():
    checks.run(
        (check.__name__, check)
        for check in (
            check_connect_and_connack_properties,
            check_publish_properties_reach_v5_subscribers,
            check_request_response_round_trip,
            check_subscription_options_and_identifiers,
            check_shared_subscription_identifier_and_retain_as_published,
        )
    )


main()
