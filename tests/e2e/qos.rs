//! QoS 1 and 2 flows in both directions, checked on the wire.

use rumqttc::QoS;

use crate::common::*;

#[test]
fn qos1_publish_is_acknowledged_with_its_packet_id() {
    let broker = Broker::start();
    let mut raw = Raw::connect(broker.port, "raw-pub");
    raw.send(&publish(b"q1/t", b"x", 1, false, false, 0x0102));
    assert_eq!(raw.expect_packet().bytes(), ack(0x40, 0x0102));
}

#[test]
fn qos2_duplicate_before_pubrel_is_delivered_once() {
    let broker = Broker::start();
    let mut sub = Mqtt::connect(broker.port, "sub");
    sub.subscribe("q2/t", QoS::ExactlyOnce);
    sub.subscribe("q2/end", QoS::AtLeastOnce);
    let mut raw = Raw::connect(broker.port, "raw-pub");

    raw.send(&publish(b"q2/t", b"one", 2, false, false, 7));
    assert_eq!(raw.expect_packet().bytes(), ack(0x50, 7), "PUBREC");
    // The client did not see PUBREC, say, and sends it again with DUP.
    raw.send(&publish(b"q2/t", b"one", 2, false, true, 7));
    assert_eq!(raw.expect_packet().bytes(), ack(0x50, 7), "PUBREC again");
    raw.send(&ack(0x62, 7));
    assert_eq!(raw.expect_packet().bytes(), ack(0x70, 7), "PUBCOMP");
    // Released: the same id now names a new message.
    raw.send(&publish(b"q2/t", b"two", 2, false, false, 7));
    assert_eq!(raw.expect_packet().bytes(), ack(0x50, 7));
    raw.send(&ack(0x62, 7));
    assert_eq!(raw.expect_packet().bytes(), ack(0x70, 7));
    raw.send(&publish(b"q2/end", b"m", 1, false, false, 8));
    assert_eq!(raw.expect_packet().bytes(), ack(0x40, 8));

    let got: Vec<(String, Vec<u8>)> = sub
        .collect_until("q2/end")
        .iter()
        .map(|p| (p.topic.clone(), p.payload.to_vec()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("q2/t".into(), b"one".to_vec()),
            ("q2/t".into(), b"two".to_vec()),
            ("q2/end".into(), b"m".to_vec()),
        ]
    );
}

#[test]
fn pubrel_gets_pubcomp() {
    let broker = Broker::start();
    let mut raw = Raw::connect(broker.port, "raw");
    raw.send(&publish(b"q2/t", b"x", 2, false, false, 300));
    assert_eq!(raw.expect_packet().bytes(), ack(0x50, 300));
    raw.send(&ack(0x62, 300));
    assert_eq!(raw.expect_packet().bytes(), ack(0x70, 300));
    // A PUBREL for an id the broker does not hold is still completed
    // (the PUBCOMP may have been lost).
    raw.send(&ack(0x62, 301));
    assert_eq!(raw.expect_packet().bytes(), ack(0x70, 301));
    raw.ping();
}

#[test]
fn qos2_outgoing_flow_pubrec_pubrel_pubcomp() {
    let broker = Broker::start();
    let mut raw = Raw::connect(broker.port, "raw-sub");
    assert_eq!(raw.subscribe(1, &[("q2/out", 2)]), vec![2]);
    let publisher = Mqtt::connect(broker.port, "pub");
    for payload in [b"a", b"b"] {
        publisher.publish("q2/out", QoS::ExactlyOnce, false, payload);
        let p = raw.expect_publish();
        assert_eq!((p.qos, p.dup, &p.payload[..]), (2, false, &payload[..]));
        assert_ne!(p.packet_id, 0);
        raw.send(&ack(0x50, p.packet_id));
        assert_eq!(
            raw.expect_packet().bytes(),
            ack(0x62, p.packet_id),
            "PUBREL"
        );
        raw.send(&ack(0x70, p.packet_id));
    }
    raw.ping();
}

#[test]
fn unacknowledged_qos1_is_redelivered_with_dup_after_reconnect() {
    let broker = Broker::start();
    let connect = ConnectBuilder::new("redeliver").clean_session(false);
    let (mut raw, connack) = Raw::connect_with(broker.port, &connect);
    assert_eq!(connack, CONNACK_OK);
    assert_eq!(raw.subscribe(1, &[("rd/t", 1)]), vec![1]);
    let mut publisher = Mqtt::connect(broker.port, "pub");
    publisher.publish_acked("rd/t", false, b"m1");
    let first = raw.expect_publish();
    assert_eq!(
        (first.qos, first.dup, &first.payload[..]),
        (1, false, &b"m1"[..])
    );
    // No PUBACK: the connection drops.
    raw.close();

    let (mut raw, connack) = Raw::connect_with(broker.port, &connect);
    assert_eq!(connack, CONNACK_SESSION);
    let again = raw.expect_publish();
    assert_eq!(
        again,
        RawPublish {
            dup: true,
            ..first.clone()
        }
    );
    raw.send(&ack(0x40, again.packet_id));
    raw.send(&DISCONNECT);
    raw.expect_closed();

    // Acknowledged: not redelivered the next time; the next message is new.
    let (mut raw, connack) = Raw::connect_with(broker.port, &connect);
    assert_eq!(connack, CONNACK_SESSION);
    publisher.publish_acked("rd/t", false, b"m2");
    let next = raw.expect_publish();
    assert_eq!((next.dup, &next.payload[..]), (false, &b"m2"[..]));
}

#[test]
fn qos0_then_qos1_in_one_read_reach_a_qos1_subscriber_intact() {
    // Regression: the QoS 0 frame's batch range was left unsealed behind
    // the QoS 1 frame of the same step, and the subscriber's stream was
    // corrupted (the QoS 1 frame's tail sent twice).
    let broker = Broker::start();
    let mut sub = Raw::connect(broker.port, "mixed-sub");
    sub.subscribe(1, &[("mixed/t", 1)]);
    let mut publisher = Raw::connect(broker.port, "mixed-pub");
    let mut both = publish(b"mixed/t", b"zero", 0, false, false, 0);
    both.extend(publish(b"mixed/t", b"one", 1, false, false, 1));
    publisher.send(&both);
    assert_eq!(publisher.expect_packet().bytes(), ack(0x40, 1));
    let zero = sub.expect_publish();
    assert_eq!((zero.qos, &zero.payload[..]), (0, &b"zero"[..]));
    let one = sub.expect_publish();
    assert_eq!((one.qos, &one.payload[..]), (1, &b"one"[..]));
    // Nothing else was sent: the next packet is the answer to a ping.
    sub.ping();
}

#[test]
fn a_qos1_burst_past_the_window_reaches_each_subscriber_whole_whatever_its_ack_order() {
    // One shard, a window of 2: the burst's first two messages go out in
    // the fan-out (shared packets in the step's batch), the rest wait in
    // each subscriber's pending queue and go out one PUBACK at a time
    // (shared between the subscribers that send them under the same id).
    let broker = Broker::builder()
        .shards(1)
        .config("max_inflight_messages = 2\n")
        .start();
    let connect_a = ConnectBuilder::new("burst-a").clean_session(false);
    let (mut a, connack) = Raw::connect_with(broker.port, &connect_a);
    assert_eq!(connack, CONNACK_OK);
    assert_eq!(a.subscribe(1, &[("burst/t", 1)]), vec![1]);
    let mut b = Raw::connect(broker.port, "burst-b");
    assert_eq!(b.subscribe(1, &[("burst/t", 1)]), vec![1]);
    let mut c = Raw::connect(broker.port, "burst-c");
    assert_eq!(
        c.subscribe(1, &[("burst/t", 1), ("burst/pre", 1)]),
        vec![1, 1]
    );
    let mut publisher = Raw::connect(broker.port, "burst-pub");
    // `c` used id 1 already: its ids run one ahead of the others'.
    publisher.send(&publish(b"burst/pre", b"m0", 1, false, false, 100));
    assert_eq!(publisher.expect_packet().bytes(), ack(0x40, 100));
    let pre = c.expect_publish();
    assert_eq!((pre.packet_id, &pre.payload[..]), (1, &b"m0"[..]));
    c.send(&ack(0x40, 1));

    let burst: Vec<u8> = (1..=5u16)
        .flat_map(|i| publish(b"burst/t", format!("m{i}").as_bytes(), 1, false, false, i))
        .collect();
    publisher.send(&burst);
    for i in 1..=5 {
        assert_eq!(publisher.expect_packet().bytes(), ack(0x40, i));
    }
    let expect = |raw: &mut Raw, id: u16, i: u16| {
        let p = raw.expect_publish();
        let want = RawPublish {
            dup: false,
            qos: 1,
            retain: false,
            topic: "burst/t".into(),
            packet_id: id,
            payload: format!("m{i}").into_bytes(),
        };
        assert_eq!(p, want);
    };
    // The window: m1 and m2.
    for i in 1..=2 {
        expect(&mut a, i, i);
        expect(&mut b, i, i);
        expect(&mut c, i + 1, i);
    }
    // `a` acknowledges out of order, after an id it was never sent
    // (ignored); `b` in order; `c` last first. Each freed slot takes the
    // next pending message under the next id of the session's lap.
    a.send(&ack(0x40, 999));
    a.send(&ack(0x40, 2));
    expect(&mut a, 3, 3);
    b.send(&ack(0x40, 1));
    expect(&mut b, 3, 3);
    c.send(&ack(0x40, 3));
    expect(&mut c, 4, 3);
    a.send(&ack(0x40, 1));
    expect(&mut a, 4, 4);
    a.send(&ack(0x40, 3));
    expect(&mut a, 5, 5);
    b.send(&ack(0x40, 2));
    b.send(&ack(0x40, 3));
    expect(&mut b, 4, 4);
    expect(&mut b, 5, 5);
    c.send(&ack(0x40, 2));
    c.send(&ack(0x40, 4));
    expect(&mut c, 5, 4);
    expect(&mut c, 6, 5);
    // An acknowledged id is done: acknowledging it again changes nothing.
    b.send(&ack(0x40, 3));
    for (raw, ids) in [(&mut b, [4, 5]), (&mut c, [5, 6])] {
        for id in ids {
            raw.send(&ack(0x40, id));
        }
        // Nothing else was sent: the next packet is the answer to a ping.
        raw.ping();
    }

    // `a` drops with m5 unacknowledged: it comes again, with DUP, under
    // its id, and nothing else does.
    a.send(&ack(0x40, 4));
    a.ping();
    a.close();
    let (mut a, connack) = Raw::connect_with(broker.port, &connect_a);
    assert_eq!(connack, CONNACK_SESSION);
    let again = a.expect_publish();
    assert_eq!(
        (again.dup, again.packet_id, &again.payload[..]),
        (true, 5, &b"m5"[..])
    );
    a.send(&ack(0x40, 5));
    a.ping();
}

/// The `n` QoS 1 PUBLISH packets "m1".."m{n}" to `topic`, ids 1..=n.
fn qos1_burst(topic: &[u8], n: u16) -> Vec<u8> {
    (1..=n)
        .flat_map(|i| publish(topic, format!("m{i}").as_bytes(), 1, false, false, i))
        .collect()
}

#[test]
fn a_pingreq_from_a_subscriber_that_owes_acknowledgements_is_answered_within_the_patience() {
    // A window of 8: a subscriber that owes 7 acknowledgements has its
    // socket's low-water mark at 28 bytes, so its 2-byte PINGREQ wakes
    // nothing; the patience (50 ms) has it read and answered anyway.
    let broker = Broker::builder()
        .shards(1)
        .config("max_inflight_messages = 8\n")
        .start();
    let connect = ConnectBuilder::new("owes").clean_session(false);
    let (mut sub, _) = Raw::connect_with(broker.port, &connect);
    assert_eq!(sub.subscribe(1, &[("owes/t", 1)]), vec![1]);
    let mut publisher = Raw::connect(broker.port, "owes-pub");
    publisher.send(&qos1_burst(b"owes/t", 9));
    for i in 1..=9 {
        assert_eq!(publisher.expect_packet().bytes(), ack(0x40, i));
    }
    for i in 1..=8u16 {
        let p = sub.expect_publish();
        assert_eq!((p.packet_id, p.payload), (i, format!("m{i}").into_bytes()));
    }
    let before = crate::admin::wait_stats(&broker, |_| true);
    let received = crate::admin::total(&before, "packets_received");
    assert_eq!(crate::admin::total(&before, "ack_patience_expired"), 0);
    // Once the broker has read the first PUBACK (1 of 8 free: m9 waits),
    // its wait asks for the 7 owed.
    sub.send(&ack(0x40, 1));
    crate::admin::wait_stats(&broker, |s| {
        crate::admin::total(s, "packets_received") > received
    });
    sub.ping();
    crate::admin::wait_stats(&broker, |s| {
        crate::admin::total(s, "ack_patience_expired") >= 1
    });
    // The other seven, each in its own write: together they reach the
    // mark; the second freed slot lets m9 go.
    for i in 2..=8 {
        sub.send(&ack(0x40, i));
    }
    let p = sub.expect_publish();
    assert_eq!((p.packet_id, &p.payload[..]), (9, &b"m9"[..]));
    sub.send(&ack(0x40, 9));
    sub.ping();
    sub.close();
    // Every acknowledgement was taken: nothing is redelivered.
    let (mut sub, connack) = Raw::connect_with(broker.port, &connect);
    assert_eq!(connack, CONNACK_SESSION);
    sub.ping();
}

#[test]
fn a_rumqttc_subscriber_acking_one_by_one_gets_a_burst_that_ends_on_a_partial_batch() {
    // 150 messages: a full window of 100, refilled by quarters, read 64
    // acknowledgements at a time, ending on a batch of fewer. The client
    // acknowledges each message by itself (manual acks, one request each).
    const N: u16 = 150;
    let broker = Broker::builder().shards(1).start();
    let mut options = Mqtt::options(broker.port, "one-by-one");
    options.set_clean_session(false);
    options.set_manual_acks(true);
    let (mut sub, _) = Mqtt::connect_with(options);
    sub.subscribe("obo/t", QoS::AtLeastOnce);
    let mut publisher = Raw::connect(broker.port, "obo-pub");
    publisher.send(&qos1_burst(b"obo/t", N));
    for i in 1..=N {
        assert_eq!(publisher.expect_packet().bytes(), ack(0x40, i));
    }
    let before = crate::admin::wait_stats(&broker, |_| true);
    let received = crate::admin::total(&before, "packets_received");
    for i in 1..=N {
        let p = sub.expect_publish();
        assert_eq!(p.payload, format!("m{i}").into_bytes(), "in order, once");
        assert!(!p.dup);
        sub.client.ack(&p).expect("ack request");
    }
    // The broker reads every PUBACK and the DISCONNECT after them (a
    // take-over by the next connection before that would discard what
    // it had not read yet).
    sub.disconnect();
    crate::admin::wait_stats(&broker, |s| {
        // Every PUBACK, then the DISCONNECT.
        crate::admin::total(s, "packets_received") > received + u64::from(N)
    });
    let connect = ConnectBuilder::new("one-by-one").clean_session(false);
    let (mut again, connack) = Raw::connect_with(broker.port, &connect);
    assert_eq!(connack, CONNACK_SESSION);
    // Nothing is redelivered: the next packet is the answer to a ping.
    again.ping();
}
