//! Parked connections (`src/park.rs`): idle plain-TCP clients hold no task
//! and wake through the shard's epoll watcher. Each test first waits until
//! the admin stats say the clients are parked, then checks that a parked
//! client behaves like any other: it gets every message, its PINGREQ,
//! SUBSCRIBE and UNSUBSCRIBE are answered, keep-alive, take-over, a vanishing
//! client's will and shutdown all still work.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use async_tungstenite::tungstenite::{Message, WebSocket};
use rumqttc::QoS;

use crate::admin::{total, wait_stats};
use crate::common::{
    Broker, CONNACK_OK, ConnectBuilder, Mqtt, PINGREQ, PINGRESP, Raw, RawPacket, ack, publish,
    subscribe, take_packet, unique, unsubscribe,
};
use crate::tls::Pki;
use crate::websocket::{ws_over, ws_upgrade};

/// Waits until at least `count` connections are parked.
fn wait_parked(broker: &Broker, count: u64) {
    wait_stats(broker, |s| total(s, "clients_parked") >= count);
}

/// `publisher` publishes `payload` to `topic` at QoS 1 under packet id
/// `id` and waits for its PUBACK.
fn publish_acked(publisher: &mut Raw, topic: &str, id: u16, payload: &[u8]) {
    publisher.send(&publish(topic.as_bytes(), payload, 1, false, false, id));
    assert_eq!(publisher.expect_packet().bytes(), ack(0x40, id));
}

/// A client subscribed to `topic` at `qos` (to see wills arrive).
fn watching(broker: &Broker, topic: &str, qos: u8) -> Raw {
    let mut watcher = Raw::connect(broker.port, &format!("park-watch-{}", unique()));
    assert_eq!(watcher.subscribe(1, &[(topic, qos)]), vec![qos]);
    watcher
}

#[test]
fn parked_subscribers_get_every_message_and_answers() {
    let broker = Broker::start();
    let topic = format!("park/{}", unique());
    let mut subscribers: Vec<Raw> = (0..20)
        .map(|i| {
            let mut raw = Raw::connect(broker.port, &format!("park-sub-{i}-{}", unique()));
            assert_eq!(raw.subscribe(1, &[(&topic, 1)]), vec![1]);
            raw
        })
        .collect();
    wait_parked(&broker, 20);

    let mut publisher = Mqtt::connect(broker.port, &format!("park-pub-{}", unique()));
    for i in 0..10u8 {
        if i % 2 == 0 {
            publisher.publish(&topic, QoS::AtMostOnce, false, &[i]);
        } else {
            publisher.publish_acked(&topic, false, &[i]);
        }
    }
    for raw in &mut subscribers {
        for i in 0..10u8 {
            let p = raw.expect_publish();
            assert_eq!(p.payload, vec![i], "message {i} out of order or lost");
            if p.qos == 1 {
                raw.send(&ack(0x40, p.packet_id));
            }
        }
    }
    // They park again once they have nothing to do; then their packets
    // wake them through the watcher.
    wait_parked(&broker, 20);
    for raw in &mut subscribers {
        raw.ping();
    }
    let first = &mut subscribers[0];
    first.send(&unsubscribe(7, &[topic.as_bytes()]));
    let unsuback = first.expect_packet();
    assert_eq!(unsuback.kind(), 11, "expected UNSUBACK, got {unsuback:?}");
    assert_eq!(unsuback.body, vec![0, 7]);
    let other = format!("{topic}/other");
    assert_eq!(first.subscribe(8, &[(&other, 0)]), vec![0]);
    publisher.publish_acked(&other, false, b"x");
    assert_eq!(first.expect_publish().payload, b"x");
}

/// A subscriber that owes acknowledgements (QoS 1 messages in flight to
/// it) is not parked once it is running: it waits in its task on glommio's
/// stream, so each PUBACK does not cost a wake-up through the watcher
/// thread. It parks again once it owes none, and loses nothing either way.
#[test]
fn a_subscriber_owing_acknowledgements_parks_only_once_it_owes_none() {
    let broker = Broker::start();
    let topic = format!("park/owed/{}", unique());
    let mut subscriber = Raw::connect(broker.port, &format!("park-owed-{}", unique()));
    assert_eq!(subscriber.subscribe(1, &[(&topic, 1)]), vec![1]);
    let mut publisher = Raw::connect(broker.port, &format!("park-owed-pub-{}", unique()));
    wait_parked(&broker, 2);

    for id in 1..=2u8 {
        publish_acked(&mut publisher, &topic, u16::from(id), &[id]);
    }
    let first = subscriber.expect_publish();
    let second = subscriber.expect_publish();
    assert_eq!((first.payload, second.payload), (vec![1], vec![2]));
    // Sent QoS 1 messages, it got its task back at once; after the first
    // PUBACK it still owes the second, so it stays in its task: only the
    // publisher is parked.
    subscriber.send(&ack(0x40, first.packet_id));
    subscriber.ping();
    wait_stats(&broker, |s| total(s, "clients_parked") == 1);
    // Owing nothing, it parks again, and a parked subscriber still gets
    // the next message.
    subscriber.send(&ack(0x40, second.packet_id));
    subscriber.ping();
    wait_parked(&broker, 2);
    publish_acked(&mut publisher, &topic, 3, b"3");
    let third = subscriber.expect_publish();
    assert_eq!(third.payload, b"3");
    subscriber.send(&ack(0x40, third.packet_id));
    subscriber.ping();
    wait_parked(&broker, 2);
}

/// A parked subscriber that the broker sends QoS 1 messages gets its task
/// back when they are written, before it acknowledges anything: its
/// PUBACKs are read by the shard on glommio's stream, not reported through
/// the epoll watcher thread (a context switch there and back per
/// subscriber and burst). Acknowledged, it parks again and loses nothing.
#[test]
fn a_parked_subscriber_sent_qos1_messages_is_unparked_before_it_acknowledges() {
    let broker = Broker::start();
    let topic = format!("park/unpark/{}", unique());
    let mut subscriber = Raw::connect(broker.port, &format!("park-unpark-{}", unique()));
    assert_eq!(subscriber.subscribe(1, &[(&topic, 1)]), vec![1]);
    wait_parked(&broker, 1);
    // The publisher leaves again, so that the only connection the gauges
    // count is the subscriber.
    let mut publisher = Raw::connect(broker.port, &format!("park-unpark-pub-{}", unique()));
    for id in 1..=3u8 {
        publish_acked(&mut publisher, &topic, u16::from(id), &[id]);
    }
    publisher.close();
    let ids: Vec<u16> = (1..=3u8)
        .map(|id| {
            let p = subscriber.expect_publish();
            assert_eq!(p.payload, vec![id]);
            p.packet_id
        })
        .collect();
    // Not one PUBACK sent yet, and it is not parked (before, it stayed
    // parked until its first PUBACK woke it through the watcher).
    wait_stats(&broker, |s| {
        total(s, "clients_connected") == 1 && total(s, "clients_parked") == 0
    });
    // Its PINGREQ is answered: until the client has sent something, any
    // byte wakes its task (`ack_wake`, the first wait).
    subscriber.ping();
    for id in ids {
        subscriber.send(&ack(0x40, id));
    }
    subscriber.ping();
    wait_parked(&broker, 1);
    // Parked again, it gets the next message (and nothing else first).
    let mut publisher = Raw::connect(broker.port, &format!("park-unpark-pub2-{}", unique()));
    publish_acked(&mut publisher, &topic, 4, b"4");
    let fourth = subscriber.expect_publish();
    assert_eq!((fourth.dup, &fourth.payload[..]), (false, &b"4"[..]));
    subscriber.send(&ack(0x40, fourth.packet_id));
    subscriber.ping();
}

/// Clients that write SUBSCRIBE with CONNECT, before CONNACK (pipelined,
/// as many do) park at once, without the wait on glommio's stream, and get
/// every message like the others.
#[test]
fn pipelined_subscribers_park_and_get_every_message() {
    let broker = Broker::start();
    let topic = format!("park/pipelined/{}", unique());
    let mut subscribers: Vec<Raw> = (0..20)
        .map(|i| {
            let id = format!("park-pipe-{i}-{}", unique());
            let mut raw = Raw::send_connect(broker.port, &ConnectBuilder::new(&id));
            raw.send(&subscribe(1, &[(topic.as_bytes(), 1)]));
            let connack = raw.expect_packet();
            assert_eq!(
                (connack.kind(), connack.body.as_slice()),
                (2, &CONNACK_OK[2..])
            );
            let suback = raw.expect_packet();
            assert_eq!((suback.kind(), suback.body.as_slice()), (9, &[0, 1, 1][..]));
            raw
        })
        .collect();
    wait_parked(&broker, 20);
    let mut publisher = Mqtt::connect(broker.port, &format!("park-pipe-pub-{}", unique()));
    for i in 0..5u8 {
        publisher.publish_acked(&topic, false, &[i]);
    }
    for raw in &mut subscribers {
        for i in 0..5u8 {
            let p = raw.expect_publish();
            assert_eq!(p.payload, vec![i], "message {i} out of order or lost");
            raw.send(&ack(0x40, p.packet_id));
        }
    }
    wait_parked(&broker, 20);
}

/// A client that writes CONNECT and SUBSCRIBE together gets CONNACK and
/// SUBACK in one write of the broker's (one `sendmsg`, one segment on
/// loopback): its first read returns both. (When the CONNACK went out
/// before the SUBSCRIBE was handled, in a write of its own, that read
/// returned the CONNACK alone.)
#[test]
fn a_pipelined_subscribe_is_answered_in_the_connacks_write() {
    let broker = Broker::start();
    let topic = format!("park/one-write/{}", unique());
    let mut expected = CONNACK_OK.to_vec();
    expected.extend_from_slice(&[0x90, 3, 0, 1, 0]);
    for i in 0..10 {
        let id = format!("park-one-write-{i}-{}", unique());
        let mut raw = Raw::tcp(broker.port);
        let mut bytes = ConnectBuilder::new(&id).bytes();
        bytes.extend_from_slice(&subscribe(1, &[(topic.as_bytes(), 0)]));
        raw.send(&bytes);
        raw.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut first = [0u8; 64];
        let n = raw.stream.read(&mut first).expect("CONNACK");
        assert_eq!(&first[..n], &expected[..], "client {i}'s first read");
    }
}

#[test]
fn a_silent_parked_client_is_closed_on_keep_alive_and_its_will_published() {
    let broker = Broker::start();
    let will_topic = format!("park/will/{}", unique());
    let mut watcher = watching(&broker, &will_topic, 0);
    let connect = ConnectBuilder::new(&format!("park-ka-{}", unique()))
        .keep_alive(1)
        .will(&will_topic, b"gone", 0, false);
    let (silent, _) = Raw::connect_with(broker.port, &connect);
    wait_parked(&broker, 2);
    // Silent for more than 1.5 × 1 s: the sweep closes it.
    silent.expect_closed_silently();
    assert_eq!(watcher.expect_publish().payload, b"gone");
}

#[test]
fn a_parked_client_that_vanishes_publishes_its_will() {
    let broker = Broker::start();
    let will_topic = format!("park/will/{}", unique());
    let mut watcher = watching(&broker, &will_topic, 1);
    let connect = ConnectBuilder::new(&format!("park-rst-{}", unique())).will(
        &will_topic,
        b"reset",
        1,
        false,
    );
    let (client, _) = Raw::connect_with(broker.port, &connect);
    wait_parked(&broker, 2);
    client.reset();
    let will = watcher.expect_publish();
    assert_eq!(will.payload, b"reset");
    watcher.send(&ack(0x40, will.packet_id));
    wait_stats(&broker, |s| total(s, "clients_connected") == 1);
}

#[test]
fn a_parked_client_is_taken_over() {
    let broker = Broker::start();
    let id = format!("park-takeover-{}", unique());
    let topic = format!("park/takeover/{}", unique());
    let mut old = Raw::connect(broker.port, &id);
    assert_eq!(old.subscribe(1, &[(&topic, 0)]), vec![0]);
    wait_parked(&broker, 1);
    let mut new = Raw::connect(broker.port, &id);
    old.expect_closed();
    assert_eq!(new.subscribe(1, &[(&topic, 0)]), vec![0]);
    let publisher = Mqtt::connect(broker.port, &format!("park-pub-{}", unique()));
    publisher.publish(&topic, QoS::AtMostOnce, false, b"to the new one");
    assert_eq!(new.expect_publish().payload, b"to the new one");
}

#[test]
fn parked_clients_are_closed_when_the_broker_stops() {
    let mut broker = Broker::start();
    let clients: Vec<Raw> = (0..10)
        .map(|i| Raw::connect(broker.port, &format!("park-stop-{i}-{}", unique())))
        .collect();
    wait_parked(&broker, 10);
    broker.signal(libc::SIGTERM);
    let status = broker
        .wait_exit(Duration::from_secs(10))
        .expect("broker did not stop within 10 s with parked clients");
    assert!(status.success(), "broker exited with {status}");
    for client in clients {
        client.expect_closed();
    }
}

/// A parked client's PINGREQs are answered from the shard's poller path
/// (counted in `pingreq_parked`), without unparking it; they keep it
/// alive past 1.5 × its keep-alive; once it falls silent, keep-alive still
/// closes it.
#[test]
fn a_parked_clients_pings_are_answered_parked_and_keep_alive_still_closes_it() {
    let broker = Broker::start();
    let connect = ConnectBuilder::new(&format!("park-ping-{}", unique())).keep_alive(2);
    let (mut client, connack) = Raw::connect_with(broker.port, &connect);
    assert_eq!(connack, CONNACK_OK);
    // Five pings 800 ms apart span 4 s, more than 1.5 × 2 s: only the
    // pings keep the connection open.
    for round in 1..=5u64 {
        wait_parked(&broker, 1);
        std::thread::sleep(Duration::from_millis(800));
        client.ping();
        wait_stats(&broker, |s| total(s, "pingreq_parked") >= round);
    }
    wait_parked(&broker, 1);
    client.expect_closed_silently();
    wait_stats(&broker, |s| total(s, "clients_connected") == 0);
}

/// Accepted sockets that have not written yet hold no task
/// (`connections_waiting`); each is served once its CONNECT arrives, and
/// a pipelined SUBSCRIBE behind it is answered too.
#[test]
fn accepted_sockets_wait_without_a_task_until_their_connect() {
    let broker = Broker::start();
    let mut sockets: Vec<Raw> = (0..30).map(|_| Raw::tcp(broker.port)).collect();
    wait_stats(&broker, |s| total(s, "connections_waiting") == 30);
    for (i, raw) in sockets.iter_mut().enumerate() {
        let id = format!("park-wait-{i}-{}", unique());
        raw.send(&ConnectBuilder::new(&id).bytes());
        assert_eq!(raw.expect_packet().bytes(), CONNACK_OK);
        assert_eq!(raw.subscribe(1, &[("park/waiting", 0)]), vec![0]);
    }
    wait_stats(&broker, |s| {
        total(s, "connections_waiting") == 0 && total(s, "clients_connected") == 30
    });
    for raw in &mut sockets {
        raw.ping();
    }
}

/// A socket accepted before its client wrote: the `waiting`th one
/// (`connections_waiting` goes from `waiting - 1` to `waiting`; the figures
/// are refreshed twice a second, so both are waited for).
fn waiting_socket(broker: &Broker, waiting: u64) -> Raw {
    wait_stats(broker, |s| total(s, "connections_waiting") == waiting - 1);
    let raw = Raw::tcp(broker.port);
    wait_stats(broker, |s| total(s, "connections_waiting") == waiting);
    raw
}

/// A CONNECT that arrives in pieces is read by the shard into the waiting
/// socket's entry: the socket still waits without a task (it is still
/// counted in `connections_waiting` once its first bytes are received)
/// until the packet is whole; then it is answered, and the connection
/// subscribes, gets a message, and parks.
#[test]
fn a_connect_in_pieces_waits_without_a_task_until_it_is_whole() {
    let broker = Broker::start();
    let mut raw = waiting_socket(&broker, 1);
    let received = total(&wait_stats(&broker, |_| true), "bytes_received");
    let connect = ConnectBuilder::new(&format!("park-pieces-{}", unique())).bytes();
    // The fixed header's first byte alone, then up to the middle.
    let cuts = [1, connect.len() / 2, connect.len()];
    let mut sent = 0;
    for &cut in &cuts[..2] {
        raw.send(&connect[sent..cut]);
        sent = cut;
        let stats = wait_stats(&broker, |s| {
            total(s, "bytes_received") >= received + sent as u64
        });
        assert_eq!(
            total(&stats, "connections_waiting"),
            1,
            "a socket with {sent} of its CONNECT's {} bytes left the waiting set: {stats}",
            connect.len()
        );
    }
    raw.send(&connect[sent..]);
    assert_eq!(raw.expect_packet().bytes(), CONNACK_OK);
    let topic = format!("park/pieces/{}", unique());
    assert_eq!(raw.subscribe(1, &[(&topic, 0)]), vec![0]);
    let publisher = Mqtt::connect(broker.port, &format!("park-pieces-pub-{}", unique()));
    publisher.publish(&topic, QoS::AtMostOnce, false, b"whole");
    assert_eq!(raw.expect_publish().payload, b"whole");
    wait_stats(&broker, |s| {
        total(s, "connections_waiting") == 0 && total(s, "clients_parked") >= 1
    });
}

/// CONNECT, SUBSCRIBE and a PUBLISH to the subscribed topic in one segment
/// from a socket that waited: all three are handled, in order, and the
/// client gets its own message.
#[test]
fn connect_subscribe_and_publish_in_one_segment_from_a_waiting_socket() {
    let broker = Broker::start();
    let mut raw = waiting_socket(&broker, 1);
    let topic = format!("park/segment/{}", unique());
    let mut segment = ConnectBuilder::new(&format!("park-segment-{}", unique())).bytes();
    segment.extend(subscribe(1, &[(topic.as_bytes(), 0)]));
    segment.extend(publish(topic.as_bytes(), b"mine", 0, false, false, 0));
    raw.send(&segment);
    assert_eq!(raw.expect_packet().bytes(), CONNACK_OK);
    assert_eq!(raw.expect_packet().bytes(), vec![0x90, 3, 0, 1, 0]);
    assert_eq!(raw.expect_publish().payload, b"mine");
    wait_parked(&broker, 1);
    raw.ping();
}

/// A waiting socket's first bytes that are not a CONNECT close it without
/// an answer (§3.1.0-1, §4.8); a CONNECT of an unknown protocol level is
/// refused with its CONNACK; the broker and a client already connected go
/// on.
#[test]
fn a_waiting_socket_whose_first_bytes_are_not_a_connect_is_closed() {
    let broker = Broker::start();
    let topic = format!("park/garbage/{}", unique());
    let mut bystander = watching(&broker, &topic, 0);
    let errors = total(&wait_stats(&broker, |_| true), "protocol_errors");
    let not_connects: [&[u8]; 3] = [b"GET / HTTP/1.1\r\n\r\n", &PINGREQ, &[0x00, 0x00]];
    for (i, bytes) in not_connects.iter().enumerate() {
        let mut raw = waiting_socket(&broker, 1);
        raw.send(bytes);
        raw.expect_closed_silently();
        wait_stats(&broker, |s| {
            total(s, "protocol_errors") == errors + i as u64 + 1
                && total(s, "connections_waiting") == 0
        });
    }
    // Refused with the CONNACK of the version it can read (§3.1.2.2).
    for (level, connack) in [(9, vec![0x20, 3, 0, 0x84, 0]), (2, vec![0x20, 2, 0, 1])] {
        let mut raw = waiting_socket(&broker, 1);
        raw.send(&ConnectBuilder::new("lvl").protocol(b"MQTT", level).bytes());
        assert_eq!(raw.expect_closed(), connack, "protocol level {level}");
    }
    let publisher = Mqtt::connect(broker.port, &format!("park-garbage-pub-{}", unique()));
    publisher.publish(&topic, QoS::AtMostOnce, false, b"still here");
    assert_eq!(bystander.expect_publish().payload, b"still here");
}

/// A socket that never sends its CONNECT, and one that sends only part of
/// it, are closed at the connect timeout (and leave the waiting set).
#[test]
fn waiting_sockets_without_a_whole_connect_close_at_the_connect_timeout() {
    let broker = Broker::builder()
        .config("connect_timeout_secs = 1\n")
        .start();
    let silent = waiting_socket(&broker, 1);
    let mut partial = waiting_socket(&broker, 2);
    let connect = ConnectBuilder::new(&format!("park-partial-{}", unique())).bytes();
    partial.send(&connect[..connect.len() - 1]);
    silent.expect_closed_silently();
    partial.expect_closed_silently();
    wait_stats(&broker, |s| total(s, "connections_waiting") == 0);
    let mut fine = waiting_socket(&broker, 1);
    fine.send(&connect);
    assert_eq!(fine.expect_packet().bytes(), CONNACK_OK);
}

/// A connection that waited for its CONNECT parks after CONNACK; its
/// PINGREQs are answered parked (`pingreq_parked`) and keep it alive past
/// 1.5 × its keep-alive; once it is silent, keep-alive closes it.
#[test]
fn a_connection_that_waited_for_its_connect_is_pinged_parked_and_expires() {
    let broker = Broker::start();
    let mut raw = waiting_socket(&broker, 1);
    let pings = total(&wait_stats(&broker, |_| true), "pingreq_parked");
    raw.send(
        &ConnectBuilder::new(&format!("park-waited-ka-{}", unique()))
            .keep_alive(2)
            .bytes(),
    );
    assert_eq!(raw.expect_packet().bytes(), CONNACK_OK);
    for round in 1..=5u64 {
        wait_parked(&broker, 1);
        std::thread::sleep(Duration::from_millis(800));
        raw.ping();
        wait_stats(&broker, |s| total(s, "pingreq_parked") >= pings + round);
    }
    raw.expect_closed_silently();
    wait_stats(&broker, |s| total(s, "clients_connected") == 0);
}

// TLS and WebSocket connections park too (`src/net/framing.rs`).

/// A raw MQTT client over one of the framed transports.
enum Framed {
    /// MQTT over TLS.
    Tls(Box<TlsStream>),
    /// MQTT over WebSocket.
    Ws(Box<WebSocket<TcpStream>>),
    /// MQTT over WebSocket over TLS.
    Wss(Box<WebSocket<TlsStream>>),
}

/// A bare rustls client stream.
type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A framed client and the bytes it received but has not decoded yet.
struct FramedClient {
    /// The connection.
    conn: Framed,
    /// Received bytes not yet taken as packets.
    buf: Vec<u8>,
}

impl FramedClient {
    /// Connects over `transport` ("tls", "ws", "wss") and sends `connect`;
    /// expects CONNACK 0.
    fn connect(broker: &Broker, pki: &Pki, transport: &str, connect: &ConnectBuilder) -> Self {
        let port = broker.port_of(transport);
        let tls = || crate::tls::connect_tls(port, &pki.ca_pem, rustls::DEFAULT_VERSIONS).0;
        let conn = match transport {
            "tls" => Framed::Tls(Box::new(tls())),
            "ws" => Framed::Ws(Box::new(ws_over(
                TcpStream::connect(("127.0.0.1", port)).unwrap(),
                port,
                "mqtt",
            ))),
            _ => Framed::Wss(Box::new(ws_upgrade(tls(), port, "mqtt"))),
        };
        let mut client = FramedClient {
            conn,
            buf: Vec::new(),
        };
        client.send(&connect.bytes());
        assert_eq!(client.expect_packet().bytes(), CONNACK_OK);
        client
    }

    /// Sends MQTT bytes (one WebSocket message).
    fn send(&mut self, bytes: &[u8]) {
        match &mut self.conn {
            Framed::Tls(tls) => {
                tls.write_all(bytes).unwrap();
                tls.flush().unwrap();
            }
            Framed::Ws(ws) => ws.send(Message::binary(bytes.to_vec())).unwrap(),
            Framed::Wss(ws) => ws.send(Message::binary(bytes.to_vec())).unwrap(),
        }
    }

    /// The TCP socket underneath (to write bytes the transport would not).
    fn socket(&mut self) -> &mut TcpStream {
        match &mut self.conn {
            Framed::Tls(tls) => &mut tls.sock,
            Framed::Ws(ws) => ws.get_mut(),
            Framed::Wss(ws) => &mut ws.get_mut().sock,
        }
    }

    /// The next packet; None once the broker closed the connection (or
    /// nothing came within the socket's read timeout).
    fn read_packet(&mut self) -> Option<RawPacket> {
        loop {
            if let Some(p) = take_packet(&mut self.buf) {
                return Some(p);
            }
            match &mut self.conn {
                Framed::Tls(tls) => {
                    let mut chunk = [0u8; 4096];
                    match tls.read(&mut chunk) {
                        Ok(n) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                        _ => return None,
                    }
                }
                Framed::Ws(ws) => match ws.read() {
                    Ok(Message::Binary(data)) => self.buf.extend_from_slice(&data),
                    Ok(Message::Ping(_) | Message::Pong(_)) => {}
                    _ => return None,
                },
                Framed::Wss(ws) => match ws.read() {
                    Ok(Message::Binary(data)) => self.buf.extend_from_slice(&data),
                    Ok(Message::Ping(_) | Message::Pong(_)) => {}
                    _ => return None,
                },
            }
        }
    }

    /// The next packet, which must come.
    fn expect_packet(&mut self) -> RawPacket {
        self.read_packet().expect("a packet, not a close")
    }

    /// Subscribes to `topic` at `qos`; expects its SUBACK.
    fn subscribe(&mut self, topic: &str, qos: u8) {
        self.send(&subscribe(1, &[(topic.as_bytes(), qos)]));
        let suback = self.expect_packet();
        assert_eq!(suback.kind(), 9, "expected SUBACK, got {suback:?}");
        assert_eq!(suback.body, vec![0, 1, qos]);
    }

    /// True once the broker closed the connection.
    fn closed(&mut self) -> bool {
        self.read_packet().is_none()
    }
}

/// A broker with TLS, WS and WSS listeners, `shards` shards (None: the
/// default).
fn framed_broker(pki: &Pki, shards: Option<usize>) -> Broker {
    let config = format!(
        "{}\nws_listen = [\"127.0.0.1:0\"]\nwss_listen = [\"127.0.0.1:0\"]\n",
        pki.config("")
    );
    let builder = Broker::builder().config(&config);
    match shards {
        Some(n) => builder.shards(n),
        None => builder,
    }
    .start()
}

/// One subscriber to `topic` at QoS 1 over each of mqtts://, ws:// and
/// wss://, client ids tagged with `tag`.
fn framed_subscribers(broker: &Broker, pki: &Pki, topic: &str, tag: &str) -> Vec<FramedClient> {
    ["tls", "ws", "wss"]
        .iter()
        .map(|transport| {
            let id = format!("park-{tag}{transport}-{}", unique());
            let mut c = FramedClient::connect(broker, pki, transport, &ConnectBuilder::new(&id));
            c.subscribe(topic, 1);
            c
        })
        .collect()
}

/// Parked mqtts://, ws:// and wss:// subscribers get messages (QoS 0 and
/// 1), their PINGREQs answered, after idling parked, and park again.
#[test]
fn parked_tls_and_websocket_subscribers_get_messages_and_ping_answers() {
    let pki = Pki::new();
    let broker = framed_broker(&pki, None);
    let topic = format!("park/framed/{}", unique());
    let mut clients = framed_subscribers(&broker, &pki, &topic, "");
    wait_parked(&broker, 3);
    // A while parked, then a message of each QoS.
    std::thread::sleep(Duration::from_secs(2));
    let mut publisher = Mqtt::connect(broker.port, &format!("park-pub-{}", unique()));
    publisher.publish(&topic, QoS::AtMostOnce, false, b"zero");
    publisher.publish_acked(&topic, false, b"one");
    for client in &mut clients {
        let p = client.expect_packet().publish();
        assert_eq!(p.payload, b"zero");
        let p = client.expect_packet().publish();
        assert_eq!((p.payload.as_slice(), p.qos), (&b"one"[..], 1));
        client.send(&ack(0x40, p.packet_id));
    }
    wait_parked(&broker, 3);
    for client in &mut clients {
        client.send(&PINGREQ);
        assert_eq!(client.expect_packet().bytes(), PINGRESP);
    }
    wait_parked(&broker, 3);
    publisher.publish_acked(&topic, false, b"again");
    for client in &mut clients {
        let p = client.expect_packet().publish();
        assert_eq!(p.payload, b"again");
        client.send(&ack(0x40, p.packet_id));
    }
}

/// A parked TLS or WebSocket client that says goodbye in its transport's
/// terms (close_notify, a close frame), sends bytes that are not its
/// transport's (garbage under TLS, a text or unmasked frame), or goes
/// silent past its keep-alive is closed, its will published; the broker
/// and the other clients go on.
#[test]
fn parked_tls_and_websocket_clients_that_close_or_misbehave_are_closed() {
    let pki = Pki::new();
    let mut broker = framed_broker(&pki, None);
    let will_topic = format!("park/framed-will/{}", unique());
    let mut watcher = watching(&broker, &will_topic, 0);
    let cases: [(&str, &str, u16); 7] = [
        ("tls", "close_notify", 60),
        ("tls", "garbage", 60),
        ("tls", "silent", 1),
        ("ws", "text", 60),
        ("ws", "unmasked", 60),
        ("wss", "close", 60),
        ("wss", "silent", 1),
    ];
    let mut clients: Vec<FramedClient> = cases
        .iter()
        .map(|(transport, how, keep_alive)| {
            let id = format!("park-{transport}-{how}-{}", unique());
            let connect = ConnectBuilder::new(&id).keep_alive(*keep_alive).will(
                &will_topic,
                format!("{transport} {how}").as_bytes(),
                0,
                false,
            );
            FramedClient::connect(&broker, &pki, transport, &connect)
        })
        .collect();
    wait_parked(&broker, cases.len() as u64);
    for ((_, how, _), client) in cases.iter().zip(&mut clients) {
        match (&mut client.conn, *how) {
            (Framed::Tls(tls), "close_notify") => {
                tls.conn.send_close_notify();
                tls.flush().unwrap();
            }
            (Framed::Ws(ws), "text") => ws.send(Message::text("not binary")).unwrap(),
            (Framed::Wss(ws), "close") => ws.close(None).unwrap(),
            // A whole application-data record that does not decrypt.
            (_, "garbage") => client
                .socket()
                .write_all(&[0x17, 3, 3, 0, 5, 1, 2, 3, 4, 5])
                .unwrap(),
            // A binary frame without the mask a client must set.
            (_, "unmasked") => client.socket().write_all(&[0x82, 2, 0xc0, 0]).unwrap(),
            _ => {}
        }
    }
    let mut wills: Vec<String> = (0..cases.len())
        .map(|_| String::from_utf8(watcher.expect_publish().payload).unwrap())
        .collect();
    wills.sort();
    let mut expected: Vec<String> = cases.iter().map(|(t, h, _)| format!("{t} {h}")).collect();
    expected.sort();
    assert_eq!(wills, expected);
    for client in &mut clients {
        assert!(client.closed(), "the broker kept a misbehaving client");
    }
    // The others lose nothing.
    let mut publisher = Mqtt::connect(broker.port, &format!("park-pub-{}", unique()));
    publisher.publish_acked(&will_topic, false, b"still here");
    assert_eq!(watcher.expect_publish().payload, b"still here");
    broker.assert_healthy();
}

/// TLS and WebSocket subscribers that owe PUBACKs wait through the poller
/// (they have no glommio stream to wait on) and park: the shard goes on
/// serving everyone else while they do not acknowledge, and their late
/// PUBACKs are taken.
#[test]
fn framed_subscribers_owing_acknowledgements_park_and_the_shard_goes_on() {
    let pki = Pki::new();
    let mut broker = framed_broker(&pki, Some(1));
    let topic = format!("park/framed-owed/{}", unique());
    let mut clients = framed_subscribers(&broker, &pki, &topic, "owed-");
    let mut publisher = Mqtt::connect(broker.port, &format!("park-owed-pub-{}", unique()));
    publisher.publish_acked(&topic, false, b"owed");
    let owed: Vec<u16> = clients
        .iter_mut()
        .map(|c| {
            let p = c.expect_packet().publish();
            assert_eq!((p.payload.as_slice(), p.qos), (&b"owed"[..], 1));
            p.packet_id
        })
        .collect();
    // Nothing acknowledged yet: they park all the same.
    wait_parked(&broker, 3);
    let other = format!("park/framed-other/{}", unique());
    let mut plain = Mqtt::connect(broker.port, &format!("park-owed-plain-{}", unique()));
    plain.subscribe(&other, QoS::AtLeastOnce);
    publisher.publish_acked(&other, false, b"served");
    assert_eq!(plain.expect_publish().payload.as_ref(), b"served");
    for (client, id) in clients.iter_mut().zip(owed) {
        client.send(&PINGREQ);
        assert_eq!(client.expect_packet().bytes(), PINGRESP);
        client.send(&ack(0x40, id));
    }
    // Acknowledged: the next message is a new one, not the old one again.
    publisher.publish_acked(&topic, false, b"next");
    for client in &mut clients {
        assert_eq!(client.expect_packet().publish().payload, b"next");
    }
    broker.assert_healthy();
}
