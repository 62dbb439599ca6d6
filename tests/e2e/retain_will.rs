//! Retained messages and will messages.

use std::time::{Duration, Instant};

use rumqttc::QoS;

use crate::common::*;

/// Subscribes a fresh raw client to `filter` at `qos` and returns it with
/// the publishes it got before the PINGRESP that follows the SUBACK:
/// retained messages are queued with the SUBACK, so a PINGRESP arriving
/// first means there is none.
fn probe(port: u16, filter: &str, qos: u8) -> (Raw, Vec<RawPublish>) {
    let mut raw = Raw::connect(port, &format!("probe-{}", unique()));
    assert_eq!(raw.subscribe(1, &[(filter, qos)]), vec![qos]);
    raw.send(&PINGREQ);
    let mut got = Vec::new();
    loop {
        let p = raw.expect_packet();
        if p.bytes() == PINGRESP {
            return (raw, got);
        }
        let p = p.publish();
        if p.qos > 0 {
            raw.send(&ack(0x40, p.packet_id));
        }
        got.push(p);
    }
}

/// The retained message a new subscriber to `topic` gets, if any.
fn retained_on(port: u16, topic: &str) -> Option<RawPublish> {
    let got = probe(port, topic, 1).1;
    assert!(got.len() <= 1, "more than one retained message: {got:?}");
    got.into_iter().next()
}

/// Waits until a new subscriber to `filter` gets `expected` as the retained
/// payload, with RETAIN set (None: no retained message), and returns that
/// subscriber. Retained stores on other shards are updated over the mesh, so
/// the first probes may see the previous state, and a live publish racing
/// the SUBSCRIBE arrives without RETAIN.
fn subscriber_with_retained(
    port: u16,
    filter: &str,
    qos: u8,
    expected: Option<&[u8]>,
) -> (Raw, Option<RawPublish>) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (raw, got) = probe(port, filter, qos);
        let seen: Vec<(&[u8], bool)> = got.iter().map(|p| (&p.payload[..], p.retain)).collect();
        if seen == expected.map(|e| (e, true)).into_iter().collect::<Vec<_>>() {
            return (raw, got.into_iter().next());
        }
        assert!(
            Instant::now() < deadline,
            "retained on {filter}: expected {expected:?}, got {got:?}"
        );
    }
}

/// [`subscriber_with_retained`] at QoS 1, returning only the message.
fn eventually_retained(port: u16, topic: &str, expected: Option<&[u8]>) -> Option<RawPublish> {
    subscriber_with_retained(port, topic, 1, expected).1
}

#[test]
fn retained_messages_are_stored_replaced_and_deleted() {
    let broker = Broker::start();
    let mut publisher = Mqtt::connect(broker.port, "pub");
    publisher.publish_acked("r/t", true, b"v1");
    let p = eventually_retained(broker.port, "r/t", Some(b"v1")).unwrap();
    assert!(p.retain, "retained delivery must set RETAIN");
    assert_eq!((p.topic.as_str(), p.qos), ("r/t", 1));

    publisher.publish_acked("r/t", true, b"v2");
    let p = eventually_retained(broker.port, "r/t", Some(b"v2")).unwrap();
    assert!(p.retain);

    // Matched through a wildcard too, at the lower of the two QoS.
    let (mut raw, p) = subscriber_with_retained(broker.port, "r/#", 0, Some(b"v2"));
    let p = p.unwrap();
    assert_eq!(
        (p.topic.as_str(), p.qos, p.retain, &p.payload[..]),
        ("r/t", 0, true, &b"v2"[..])
    );

    // Normal forwarding to an existing subscriber clears RETAIN.
    publisher.publish_acked("r/t", true, b"v3");
    let p = raw.expect_publish();
    assert_eq!((p.retain, &p.payload[..]), (false, &b"v3"[..]));

    // An empty retained payload deletes it (and is forwarded as usual).
    publisher.publish_acked("r/t", true, b"");
    let p = raw.expect_publish();
    assert_eq!((p.retain, p.payload.len()), (false, 0));
    eventually_retained(broker.port, "r/t", None);
    // Other retained topics are unaffected.
    publisher.publish_acked("r/u", true, b"kept");
    eventually_retained(broker.port, "r/u", Some(b"kept"));
    assert!(retained_on(broker.port, "r/t").is_none());
}

#[test]
fn retained_qos0_is_delivered_with_retain_on_subscribe() {
    let broker = Broker::start();
    let publisher = Mqtt::connect(broker.port, "pub");
    publisher.publish("r0/t", QoS::AtMostOnce, true, b"zero");
    let p = eventually_retained(broker.port, "r0/t", Some(b"zero")).unwrap();
    assert_eq!((p.qos, p.retain), (0, true));
}

/// A watcher subscribed to `topic` at QoS 1.
fn watcher(broker: &Broker, topic: &str) -> Mqtt {
    let mut w = Mqtt::connect(broker.port, &format!("watcher-{}", unique()));
    w.subscribe(topic, QoS::AtLeastOnce);
    w
}

#[test]
fn will_is_published_when_the_socket_closes_abruptly() {
    let mut broker = Broker::start();
    let mut watch = watcher(&broker, "will/#");
    // FIN without DISCONNECT.
    let (fin, _) = Raw::connect_with(
        broker.port,
        &ConnectBuilder::new("fin").will("will/fin", b"fin gone", 1, false),
    );
    fin.close();
    let p = watch.expect_publish();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.qos),
        ("will/fin", &b"fin gone"[..], QoS::AtLeastOnce)
    );
    // A TCP reset, with a retained will.
    let (rst, _) = Raw::connect_with(
        broker.port,
        &ConnectBuilder::new("rst").will("will/rst", b"rst gone", 1, true),
    );
    rst.reset();
    let p = watch.expect_publish();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("will/rst", &b"rst gone"[..])
    );
    assert!(
        !p.retain,
        "forwarded to an existing subscriber without RETAIN"
    );
    let p = eventually_retained(broker.port, "will/rst", Some(b"rst gone")).unwrap();
    assert!(p.retain);
    broker.assert_healthy();
}

#[test]
fn will_is_published_on_keep_alive_timeout() {
    let mut broker = Broker::start();
    let mut watch = watcher(&broker, "ka/will");
    let start = Instant::now();
    let (silent, _) = Raw::connect_with(
        broker.port,
        &ConnectBuilder::new("silent")
            .keep_alive(1)
            .will("ka/will", b"timed out", 0, false),
    );
    silent.expect_closed_silently();
    let closed_after = start.elapsed();
    assert!(
        closed_after >= Duration::from_secs(1),
        "closed after {closed_after:?}, before the keep-alive could expire"
    );
    let p = watch.expect_publish();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("ka/will", &b"timed out"[..])
    );
    broker.assert_healthy();
}

#[test]
fn keep_alive_is_kept_by_pings() {
    let broker = Broker::start();
    let (mut raw, _) = Raw::connect_with(broker.port, &ConnectBuilder::new("pinger").keep_alive(2));
    // Pinging every 250 ms for longer than 1.5 × keep-alive keeps it open.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(250));
        raw.ping();
    }
}

#[test]
fn will_is_published_on_protocol_violation() {
    let mut broker = Broker::start();
    let mut watch = watcher(&broker, "pv/will");
    let (mut bad, _) = Raw::connect_with(
        broker.port,
        &ConnectBuilder::new("bad").will("pv/will", b"violated", 1, false),
    );
    bad.send(&[0x36, 3, 0, 1, b'x']); // PUBLISH with QoS 3
    bad.expect_closed();
    let p = watch.expect_publish();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("pv/will", &b"violated"[..])
    );
    broker.assert_healthy();
}

#[test]
fn no_will_after_disconnect() {
    // One shard: the will, had it been published, precedes the marker.
    let broker = Broker::builder().shards(1).start();
    let mut watch = watcher(&broker, "nw/#");
    let (mut polite, _) = Raw::connect_with(
        broker.port,
        &ConnectBuilder::new("polite").will("nw/will", b"should not", 1, false),
    );
    polite.send(&DISCONNECT);
    polite.expect_closed_silently();
    watch.publish("nw/end", QoS::AtLeastOnce, false, b"m");
    assert_eq!(topics(&watch.collect_until("nw/end")), vec!["nw/end"]);
}
