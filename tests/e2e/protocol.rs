//! Protocol violations and malformed bytes, sent raw. Each one closes only
//! the offending connection: a bystander connected before and a fresh
//! client after both keep working.

use crate::common::*;

/// Starts a broker with a connected bystander, runs `offend` on a new TCP
/// connection, asserts the broker closes it, then checks the bystander and a
/// new client. Returns what the offender received before the close.
fn closes_only_the_offender(offend: impl FnOnce(&mut Raw)) -> Vec<u8> {
    let mut broker = Broker::start();
    let mut bystander = Raw::connect(broker.port, "bystander");
    let mut offender = Raw::tcp(broker.port);
    offend(&mut offender);
    let received = offender.expect_closed();
    bystander.ping();
    broker.assert_healthy();
    received
}

/// Like [`closes_only_the_offender`] after a valid CONNECT, and nothing but
/// the CONNACK may come back.
fn connected_then_closed(bytes: &[u8]) {
    let received = closes_only_the_offender(|raw| {
        raw.send(&ConnectBuilder::new("offender").bytes());
        assert_eq!(raw.expect_packet().bytes(), CONNACK_OK);
        raw.send_lossy(bytes);
    });
    assert!(received.is_empty(), "got {received:?} before the close");
}

/// A CONNECT that must be refused by closing, with nothing sent back.
fn connect_refused_silently(connect: &[u8]) {
    let received = closes_only_the_offender(|raw| raw.send_lossy(connect));
    assert!(received.is_empty(), "got {received:?} before the close");
}

#[test]
fn first_packet_not_connect_closes() {
    connect_refused_silently(&PINGREQ);
    connect_refused_silently(&subscribe(1, &[(b"a", 0)]));
    connect_refused_silently(&publish(b"a", b"x", 0, false, false, 0));
}

#[test]
fn second_connect_closes() {
    connected_then_closed(&ConnectBuilder::new("offender").bytes());
}

#[test]
fn unknown_protocol_levels_get_a_refusing_connack_then_closed() {
    // A level above MQTT 5's: MQTT 5's CONNACK 0x84 Unsupported Protocol
    // Version (level 5 itself is accepted, see `mqtt5`).
    let received = closes_only_the_offender(|raw| {
        raw.send(&ConnectBuilder::new("lvl").protocol(b"MQTT", 9).bytes())
    });
    assert_eq!(received, vec![0x20, 3, 0, 0x84, 0]);
    // Below it: 3.1.1's CONNACK 1.
    let received = closes_only_the_offender(|raw| {
        raw.send(&ConnectBuilder::new("lvl").protocol(b"MQTT", 2).bytes())
    });
    assert_eq!(received, vec![0x20, 2, 0, 1]);
    // Known names with the other name's level.
    for (name, level) in [(&b"MQIsdp"[..], 4), (&b"MQTT"[..], 3)] {
        let received = closes_only_the_offender(|raw| {
            raw.send(&ConnectBuilder::new("lvl").protocol(name, level).bytes())
        });
        assert_eq!(received, vec![0x20, 2, 0, 1]);
    }
}

#[test]
fn mqtt_3_1_mqisdp_level_3_is_accepted() {
    let broker = Broker::start();
    let connect = ConnectBuilder::new("old-timer").protocol(b"MQIsdp", 3);
    let (mut raw, connack) = Raw::connect_with(broker.port, &connect);
    assert_eq!(connack, CONNACK_OK);
    assert_eq!(raw.subscribe(1, &[("v31/t", 1)]), vec![1]);
    raw.send(&publish(b"v31/t", b"hi", 0, false, false, 0));
    let p = raw.expect_publish();
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("v31/t", &b"hi"[..]));
    raw.ping();
}

#[test]
fn bad_protocol_name_closes() {
    connect_refused_silently(&ConnectBuilder::new("x").protocol(b"MQTX", 4).bytes());
    connect_refused_silently(&ConnectBuilder::new("x").protocol(b"mqtt", 4).bytes());
}

#[test]
fn reserved_connect_flag_closes() {
    let mut connect = ConnectBuilder::new("x");
    connect.extra_flags = 0x01;
    connect_refused_silently(&connect.bytes());
}

#[test]
fn password_without_username_closes() {
    let mut connect = ConnectBuilder::new("x");
    connect.password = Some(b"secret".to_vec());
    connect_refused_silently(&connect.bytes());
}

#[test]
fn invalid_remaining_length_closes() {
    // Five length bytes: the fourth still has its continuation bit set.
    connected_then_closed(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]);
}

#[test]
fn invalid_remaining_length_in_first_packet_closes() {
    connect_refused_silently(&[0x10, 0x80, 0x80, 0x80, 0x80, 0x01]);
}

#[test]
fn reserved_fixed_header_flags_close() {
    // SUBSCRIBE must have flags 0b0010.
    let mut sub = subscribe(1, &[(b"a", 0)]);
    sub[0] = 0x80;
    connected_then_closed(&sub);
}

#[test]
fn reserved_flags_on_pingreq_close() {
    connected_then_closed(&[0xc1, 0]);
}

#[test]
fn server_only_packet_types_close() {
    connected_then_closed(&[0x20, 2, 0, 0]); // CONNACK
    connected_then_closed(&[0x90, 3, 0, 1, 0]); // SUBACK
    connected_then_closed(&[0xd0, 0]); // PINGRESP
}

#[test]
fn bad_utf8_in_topic_closes() {
    connected_then_closed(&publish(&[b'a', 0xff, 0xfe], b"x", 0, false, false, 0));
}

#[test]
fn nul_in_topic_closes() {
    connected_then_closed(&publish(b"a\0b", b"x", 0, false, false, 0));
}

#[test]
fn wildcard_in_publish_topic_closes() {
    connected_then_closed(&publish(b"a/+/b", b"x", 0, false, false, 0));
    connected_then_closed(&publish(b"a/#", b"x", 1, false, false, 1));
}

#[test]
fn invalid_filter_gets_0x80_and_the_valid_one_is_granted() {
    let broker = Broker::start();
    let mut raw = Raw::connect(broker.port, "subscriber");
    assert_eq!(
        raw.subscribe(5, &[("a/#/b", 1), ("a/b", 1), ("a+/c", 0), ("a/+", 2)]),
        vec![0x80, 1, 0x80, 2]
    );
    // The connection stays up and the valid filters work.
    raw.send(&publish(b"a/b", b"x", 1, false, false, 9));
    let mut got = [raw.expect_packet(), raw.expect_packet()];
    got.sort_by_key(|p| p.kind() == 3);
    assert_eq!(got[0].bytes(), ack(0x40, 9));
    let p = got[1].publish();
    assert_eq!((p.topic.as_str(), p.qos), ("a/b", 1));
}

#[test]
fn qos_3_publish_closes() {
    connected_then_closed(&[0x36, 5, 0, 1, b'a', 0, 1]);
}

#[test]
fn dup_on_qos0_publish_closes() {
    connected_then_closed(&publish(b"a", b"x", 0, false, true, 0));
}

#[test]
fn garbage_closes() {
    connect_refused_silently(b"GET / HTTP/1.1\r\nHost: fanmq\r\n\r\n");
}
