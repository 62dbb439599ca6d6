//! Persistent and clean sessions, take-over, client id rules.

use rumqttc::QoS;

use crate::common::*;

#[test]
fn persistent_session_queues_qos1_while_offline() {
    let broker = Broker::start();
    let connect = ConnectBuilder::new("persist").clean_session(false);
    let (mut raw, connack) = Raw::connect_with(broker.port, &connect);
    assert_eq!(connack, CONNACK_OK, "no session yet");
    assert_eq!(raw.subscribe(1, &[("ps/t", 1)]), vec![1]);
    raw.send(&DISCONNECT);
    raw.expect_closed();

    let mut publisher = Mqtt::connect(broker.port, "pub");
    for payload in [b"q1", b"q2", b"q3"] {
        publisher.publish_acked("ps/t", false, payload);
    }

    let (mut raw, connack) = Raw::connect_with(broker.port, &connect);
    assert_eq!(connack, CONNACK_SESSION);
    for payload in [b"q1", b"q2", b"q3"] {
        let p = raw.expect_publish();
        assert_eq!(
            (p.topic.as_str(), p.qos, &p.payload[..]),
            ("ps/t", 1, &payload[..])
        );
        raw.send(&ack(0x40, p.packet_id));
    }
    // The subscription survived too: live messages keep coming.
    publisher.publish_acked("ps/t", false, b"live");
    assert_eq!(raw.expect_publish().payload, b"live");
}

#[test]
fn persistent_session_with_rumqttc_reports_session_present() {
    let broker = Broker::start();
    let mut options = Mqtt::options(broker.port, "rumqttc-persist");
    options.set_clean_session(false);
    let (mut client, connack) = Mqtt::connect_with(options.clone());
    assert!(!connack.session_present);
    client.subscribe("rp/t", QoS::AtLeastOnce);
    client.disconnect();
    let mut publisher = Mqtt::connect(broker.port, "pub");
    publisher.publish_acked("rp/t", false, b"while away");
    let (mut client, connack) = Mqtt::connect_with(options);
    assert!(connack.session_present);
    let p = client.expect_publish();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("rp/t", &b"while away"[..])
    );
}

#[test]
fn clean_session_discards_state() {
    let broker = Broker::start();
    let persistent = ConnectBuilder::new("cs").clean_session(false);
    let (mut raw, _) = Raw::connect_with(broker.port, &persistent);
    assert_eq!(raw.subscribe(1, &[("cs/t", 1)]), vec![1]);
    raw.send(&DISCONNECT);
    raw.expect_closed();
    let mut publisher = Mqtt::connect(broker.port, "pub");
    publisher.publish_acked("cs/t", false, b"old");

    // Clean session 1: no session present, old messages and subscriptions gone.
    let (mut raw, connack) = Raw::connect_with(broker.port, &ConnectBuilder::new("cs"));
    assert_eq!(connack, CONNACK_OK);
    assert_eq!(raw.subscribe(1, &[("cs/end", 1)]), vec![1]);
    publisher.publish_acked("cs/t", false, b"new");
    publisher.publish_acked("cs/end", false, b"m");
    let p = raw.expect_publish();
    assert_eq!(p.topic, "cs/end", "got {p:?} before the marker");
    raw.send(&ack(0x40, p.packet_id));
    raw.send(&DISCONNECT);
    raw.expect_closed();

    // A clean session ends with its connection.
    let (_raw, connack) = Raw::connect_with(broker.port, &persistent);
    assert_eq!(connack, CONNACK_OK);
}

#[test]
fn take_over_closes_the_first_connection() {
    let broker = Broker::start();
    let first = Raw::connect(broker.port, "dup-id");
    let mut second = Raw::connect(broker.port, "dup-id");
    first.expect_closed();
    second.ping();
    assert_eq!(second.subscribe(1, &[("t", 0)]), vec![0]);
}

#[test]
fn take_over_across_shards_moves_the_session() {
    let broker = Broker::start();
    let connect = ConnectBuilder::new("mover").clean_session(false);
    let (mut current, connack) = Raw::connect_with(broker.port, &connect);
    assert_eq!(connack, CONNACK_OK);
    assert_eq!(current.subscribe(1, &[("mv/t", 1)]), vec![1]);
    let mut shard = broker.shard_of("mover");
    let mut publisher = Mqtt::connect(broker.port, "pub");
    for attempt in 2..=40 {
        let (mut next, connack) = Raw::connect_with(broker.port, &connect);
        assert_eq!(
            connack, CONNACK_SESSION,
            "take-over {attempt} lost the session"
        );
        let next_shard = broker.shards_of("mover", attempt)[attempt - 1];
        current.expect_closed();
        // The subscription moved with the session.
        publisher.publish_acked("mv/t", false, format!("{attempt}").as_bytes());
        let mut p = next.expect_publish();
        let previous = format!("{}", attempt - 1);
        if attempt > 2 && p.payload == previous.as_bytes() {
            // The old connection's PUBACK of the previous message was still
            // unread in its socket when this CONNECT took the session over
            // (two sockets, no order between them): the message comes again,
            // with DUP set (§4.4), before the new one.
            assert!(p.dup, "message {previous} sent again without DUP");
            next.send(&ack(0x40, p.packet_id));
            p = next.expect_publish();
        }
        assert_eq!(p.payload, format!("{attempt}").as_bytes());
        next.send(&ack(0x40, p.packet_id));
        if next_shard != shard {
            return;
        }
        current = next;
        shard = next_shard;
    }
    panic!("40 connections of one client id all landed on shard {shard}");
}

#[test]
fn empty_client_id_with_clean_session_is_accepted() {
    let broker = Broker::start();
    let (mut raw, connack) = Raw::connect_with(broker.port, &ConnectBuilder::new(""));
    assert_eq!(connack, CONNACK_OK);
    assert_eq!(raw.subscribe(1, &[("anon/t", 1)]), vec![1]);
    raw.send(&publish(b"anon/t", b"me", 1, false, false, 2));
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(raw.expect_packet());
    }
    assert!(got.contains(&RawPacket {
        first: 0x40,
        body: vec![0, 2]
    }));
    assert!(
        got.iter()
            .any(|p| p.kind() == 3 && p.publish().payload == b"me")
    );
    // Two anonymous clients get different ids: neither takes the other over.
    let (mut other, connack) = Raw::connect_with(broker.port, &ConnectBuilder::new(""));
    assert_eq!(connack, CONNACK_OK);
    other.ping();
    raw.ping();
}

#[test]
fn empty_client_id_without_clean_session_is_rejected() {
    let mut broker = Broker::start();
    let (raw, connack) =
        Raw::connect_with(broker.port, &ConnectBuilder::new("").clean_session(false));
    assert_eq!(connack, vec![0x20, 2, 0, 2]);
    raw.expect_closed();
    broker.assert_healthy();
}

/// How many times [`moving_between_shards_while_publishing`] moves the
/// session from one shard to the other (every move alternates, so half of
/// them go to the publisher's shard and half away from it).
const SHARD_MOVES: usize = 8;

/// Most reconnections tried for [`SHARD_MOVES`] moves: each lands on the
/// other shard about every second time (SO_REUSEPORT hashes the source
/// port).
const MOST_RECONNECTS: usize = 100;

/// A persistent session subscribed at QoS 1 moves between the two shards
/// of one broker, [`SHARD_MOVES`] times, while a client of the same broker
/// publishes numbered QoS 1 messages, each PUBACKed before the next. Every
/// number must arrive, in order, none twice on one connection (one in
/// flight at a move may come again on the next connection, with DUP).
/// `take_over`: the new connection takes the session over while the old
/// one is still open; else the old one disconnects first.
fn moving_between_shards_while_publishing(take_over: bool) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let broker = Broker::start();
    let u = unique();
    let id = format!("shard-mover-{u}");
    let topic = format!("smv/{u}");
    let persistent = |id: &str| {
        let mut options = Mqtt::options(broker.port, id);
        options.set_clean_session(false);
        Mqtt::connect_with(options)
    };
    let (mut sub, _) = persistent(&id);
    sub.subscribe(&format!("{topic}/#"), QoS::AtLeastOnce);
    let mut connections = 1;
    let mut on = broker.shard_of(&id);
    let publisher_id = format!("shard-mover-pub-{u}");
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (port, stop, topic, publisher_id) = (
            broker.port,
            stop.clone(),
            format!("{topic}/n"),
            publisher_id.clone(),
        );
        std::thread::spawn(move || {
            let mut publisher = Mqtt::connect(port, &publisher_id);
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) || n < 3000 {
                publisher.publish_acked(&topic, false, n.to_string().as_bytes());
                n += 1;
            }
            n
        })
    };
    let publisher_shard = broker.shard_of(&publisher_id);
    let number = |p: &rumqttc::Publish| -> usize {
        std::str::from_utf8(&p.payload)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a number: {p:?}"))
    };
    // (number, connection) in the order received.
    let mut got: Vec<(usize, usize)> = Vec::new();
    // (from shard, to shard) of each move.
    let mut moves: Vec<(usize, usize)> = Vec::new();
    for connection in 0..MOST_RECONNECTS {
        if moves.len() >= SHARD_MOVES {
            break;
        }
        for _ in 0..25 {
            let p = sub.recv_publish(TIMEOUT).expect("the stream goes on");
            got.push((number(&p), connection));
        }
        let next = if take_over {
            let (next, connack) = persistent(&id);
            for p in sub.publishes_until_closed() {
                got.push((number(&p), connection));
            }
            assert!(connack.session_present, "the session was taken over");
            next
        } else {
            for p in sub.disconnect_collecting() {
                got.push((number(&p), connection));
            }
            let (next, connack) = persistent(&id);
            assert!(connack.session_present, "the session was resumed");
            next
        };
        sub = next;
        connections += 1;
        let now_on = broker.shards_of(&id, connections)[connections - 1];
        if now_on != on {
            moves.push((on, now_on));
        }
        on = now_on;
    }
    assert!(
        moves.len() >= SHARD_MOVES,
        "{MOST_RECONNECTS} reconnections moved the session only {} times",
        moves.len()
    );
    stop.store(true, Ordering::Relaxed);
    let published = publisher.join().expect("the publisher published");
    let last_connection = connections - 1;
    while !got.iter().any(|&(n, _)| n == published - 1) {
        let p = sub
            .recv_publish(TIMEOUT)
            .unwrap_or_else(|| panic!("stream stopped at {:?}", got.last()));
        got.push((number(&p), last_connection));
    }
    let stream = Numbered::of(&got, published);
    assert!(
        stream.missing.is_empty(),
        "{} of {published} lost at {} moves (from, to) {moves:?}, publisher on shard {publisher_shard}: {:?}\naround (number, connection): {:?}",
        stream.missing.len(),
        moves.len(),
        stream.missing,
        stream.around(&got, 5)
    );
    stream.assert_once_in_order("the moving session");
}

/// [`moving_between_shards_while_publishing`], the old connection
/// disconnecting before the new one connects.
#[test]
fn reconnecting_on_the_other_shard_while_publishing_loses_nothing() {
    moving_between_shards_while_publishing(false);
}

/// [`moving_between_shards_while_publishing`], the new connection taking
/// the session over while the old one is open.
#[test]
fn taking_over_on_the_other_shard_while_publishing_loses_nothing() {
    moving_between_shards_while_publishing(true);
}
