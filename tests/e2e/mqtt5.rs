//! MQTT 5.0 end to end: `rumqttc::v5` clients, `mosquitto_pub` /
//! `mosquitto_sub -V 5`, and raw bytes, against the real broker with two
//! shards, side by side with MQTT 3.1.1 clients.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnectReturnCode, DisconnectReasonCode, Filter, Packet, PubAckReason, PubRecReason,
    Publish, PublishProperties, RetainForwardRule, SubscribeReasonCode, UnsubAckReason,
};
use rumqttc::v5::{Client, ConnectionError, Event, MqttOptions};

use crate::common::*;

/// How long a test waits for what it expects.
const WAIT: Duration = Duration::from_secs(10);

/// A `rumqttc::v5` sync client whose event loop runs on its own thread.
pub(crate) struct V5 {
    pub(crate) client: Client,
    events: Receiver<Result<Event, String>>,
    /// Publishes that arrived while waiting for something else.
    backlog: VecDeque<Publish>,
}

impl V5 {
    /// Options for a clean-start client of the broker on `port`.
    pub(crate) fn options(port: u16, client_id: &str) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options
    }

    /// A clean-start client; waits for CONNACK Success.
    pub(crate) fn connect(port: u16, client_id: &str) -> V5 {
        V5::connect_with(V5::options(port, client_id)).0
    }

    /// Connects with `options`; waits for CONNACK (panics on refusal).
    pub(crate) fn connect_with(options: MqttOptions) -> (V5, ConnAck) {
        V5::try_connect(options).unwrap_or_else(|e| panic!("MQTT 5 connect failed: {e}"))
    }

    /// Connects with `options`; Err with the reason when it fails.
    fn try_connect(options: MqttOptions) -> Result<(V5, ConnAck), String> {
        let (client, mut connection) = Client::new(options, 256);
        let (tx, events) = channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                let stop = event.is_err();
                let event = event.map_err(|e| match e {
                    ConnectionError::ConnectionRefused(code) => format!("refused: {code:?}"),
                    other => other.to_string(),
                });
                if tx.send(event).is_err() || stop {
                    break;
                }
            }
        });
        let mut v5 = V5 {
            client,
            events,
            backlog: VecDeque::new(),
        };
        let connack = v5.wait_for(|p| match p {
            Packet::ConnAck(c) => Some(c.clone()),
            _ => None,
        })?;
        Ok((v5, connack))
    }

    /// Waits for an incoming packet `pick` accepts; publishes seen meanwhile
    /// are kept for [`V5::recv_publish`].
    fn wait_for<T>(&mut self, pick: impl Fn(&Packet) -> Option<T>) -> Result<T, String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("timed out after {WAIT:?}"));
            }
            match self.events.recv_timeout(deadline - now) {
                Ok(Ok(Event::Incoming(packet))) => {
                    if let Some(t) = pick(&packet) {
                        return Ok(t);
                    }
                    if let Packet::Publish(p) = packet {
                        self.backlog.push_back(p);
                    }
                }
                Ok(Ok(Event::Outgoing(_))) => {}
                Ok(Err(e)) => return Err(e),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err("event loop ended".into()),
            }
        }
    }

    /// Subscribes with `filter` (options included); returns the SUBACK's
    /// reason codes.
    fn subscribe_filter(&mut self, filter: Filter) -> Vec<SubscribeReasonCode> {
        self.client
            .subscribe_many(vec![filter])
            .expect("subscribe request");
        self.wait_for(|p| match p {
            Packet::SubAck(s) => Some(s.return_codes.clone()),
            _ => None,
        })
        .unwrap_or_else(|e| panic!("no SUBACK: {e}"))
    }

    /// Subscribes to one filter at `qos`.
    pub(crate) fn subscribe(&mut self, filter: &str, qos: QoS5) -> Vec<SubscribeReasonCode> {
        self.subscribe_filter(Filter::new(filter, qos))
    }

    /// Unsubscribes from `filter`; returns the UNSUBACK's reason codes.
    pub(crate) fn unsubscribe(&mut self, filter: &str) -> Vec<UnsubAckReason> {
        self.client
            .unsubscribe(filter)
            .expect("unsubscribe request");
        self.wait_for(|p| match p {
            Packet::UnsubAck(u) => Some(u.reasons.clone()),
            _ => None,
        })
        .unwrap_or_else(|e| panic!("no UNSUBACK: {e}"))
    }

    /// Queues a publish.
    fn publish(&self, topic: &str, qos: QoS5, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .expect("publish request");
    }

    /// The next publish, or None after `timeout`.
    pub(crate) fn recv_publish(&mut self, timeout: Duration) -> Option<Publish> {
        if let Some(p) = self.backlog.pop_front() {
            return Some(p);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            match self.events.recv_timeout(deadline - now) {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => return Some(p),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("client connection failed: {e}"),
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => panic!("event loop ended"),
            }
        }
    }

    /// The next publish; panics after [`WAIT`].
    pub(crate) fn expect_publish(&mut self) -> Publish {
        self.recv_publish(WAIT)
            .unwrap_or_else(|| panic!("no publish within {WAIT:?}"))
    }

    /// Every publish up to and including the first on `marker`.
    fn collect_until(&mut self, marker: &str) -> Vec<Publish> {
        let mut got = Vec::new();
        loop {
            let p = self
                .recv_publish(WAIT)
                .unwrap_or_else(|| panic!("marker {marker} not received"));
            let done = p.topic == marker.as_bytes();
            got.push(p);
            if done {
                return got;
            }
        }
    }
}

impl Drop for V5 {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
    }
}

/// The topic of a received publish, as text.
fn topic_of(p: &Publish) -> String {
    String::from_utf8_lossy(&p.topic).into_owned()
}

/// An MQTT 5.0 CONNECT in raw bytes: clean start, keep-alive 60, no
/// properties.
fn connect_v5(client_id: &str) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.extend([5, 0x02, 0, 60, 0]);
    body.extend(string(client_id.as_bytes()));
    packet(0x10, &body)
}

/// A raw MQTT 5.0 client past CONNACK.
pub(crate) fn raw_v5(port: u16, client_id: &str) -> Raw {
    let mut raw = Raw::tcp(port);
    raw.send(&connect_v5(client_id));
    let connack = raw.expect_packet();
    assert_eq!(connack.kind(), 2, "CONNACK");
    assert_eq!(connack.bytes()[3], 0, "CONNACK Success");
    raw
}

#[test]
fn v5_connack_announces_the_broker_limits() {
    let broker = Broker::builder()
        .config("max_inflight_messages = 7\nmax_packet_size = 5000\nmax_keepalive = 100\n")
        .start();
    let mut options = V5::options(broker.port, "");
    options.set_keep_alive(Duration::from_secs(200));
    let (_client, connack) = V5::connect_with(options);
    assert_eq!(connack.code, ConnectReturnCode::Success);
    assert!(!connack.session_present);
    let p = connack.properties.expect("CONNACK properties");
    assert_eq!(p.receive_max, Some(7));
    assert_eq!(p.max_packet_size, Some(5000));
    assert_eq!(p.server_keep_alive, Some(100), "capped at max_keepalive");
    assert!(
        p.assigned_client_identifier
            .is_some_and(|id| id.starts_with("fanmq-")),
        "an empty client id is assigned one"
    );
    assert_eq!(p.shared_subscription_available, Some(1));
    assert_eq!(p.retain_available, Some(1));
    assert_eq!(p.wildcard_subscription_available, Some(1));
    assert_eq!(p.max_qos, None, "QoS 2 is supported");
}

#[test]
fn v3_and_v5_subscribers_get_the_same_messages_across_shards() {
    let broker = Broker::start();
    let mut v3_subs = Vec::new();
    let mut v5_subs = Vec::new();
    // Two of each, so that each version has a subscriber on each shard
    // (SO_REUSEPORT spreads connections; the test needs at least one
    // subscriber per version that is on another shard than the publisher:
    // with two each, the chance that both are on its shard is 1/4, so it
    // also holds with fewer; what matters is that all get everything).
    for n in 0..2 {
        let mut s = Mqtt::connect(broker.port, &format!("v3-{n}"));
        s.subscribe("mix/#", rumqttc::QoS::ExactlyOnce);
        v3_subs.push(s);
        let mut s = V5::connect(broker.port, &format!("v5-{n}"));
        assert_eq!(
            s.subscribe("mix/#", QoS5::ExactlyOnce),
            vec![SubscribeReasonCode::Success(QoS5::ExactlyOnce)]
        );
        v5_subs.push(s);
    }
    let v5_pub = V5::connect(broker.port, "v5-pub");
    let v3_pub = Mqtt::connect(broker.port, "v3-pub");
    for (n, qos) in [QoS5::AtMostOnce, QoS5::AtLeastOnce, QoS5::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        v5_pub.publish(&format!("mix/5/{n}"), qos, false, b"from v5");
        let qos3 = [
            rumqttc::QoS::AtMostOnce,
            rumqttc::QoS::AtLeastOnce,
            rumqttc::QoS::ExactlyOnce,
        ][n];
        v3_pub.publish(&format!("mix/3/{n}"), qos3, false, b"from v3");
    }
    // The two publishers' messages are not ordered with each other: each
    // subscriber must get all 6 (and no more).
    for s in &mut v5_subs {
        let got: Vec<Publish> = (0..6).map(|_| s.expect_publish()).collect();
        let mut topics: Vec<(String, QoS5, Vec<u8>)> = got
            .iter()
            .map(|p| (topic_of(p), p.qos, p.payload.to_vec()))
            .collect();
        topics.sort_by(|a, b| a.0.cmp(&b.0));
        assert!(s.recv_publish(Duration::from_millis(100)).is_none());
        assert!(topics.contains(&("mix/5/2".into(), QoS5::ExactlyOnce, b"from v5".to_vec())));
        assert!(topics.contains(&("mix/3/1".into(), QoS5::AtLeastOnce, b"from v3".to_vec())));
        assert!(topics.contains(&("mix/3/0".into(), QoS5::AtMostOnce, b"from v3".to_vec())));
    }
    for s in &mut v3_subs {
        let got: Vec<_> = (0..6).map(|_| s.expect_publish()).collect();
        let p = got.iter().find(|p| p.topic == "mix/5/2").expect("v5 QoS 2");
        assert_eq!(p.qos, rumqttc::QoS::ExactlyOnce);
        assert_eq!(&p.payload[..], b"from v5");
    }
}

#[test]
fn v5_qos_1_and_2_round_trips_have_success_reason_codes() {
    let broker = Broker::start();
    let mut client = V5::connect(broker.port, "rt");
    client.subscribe("rt/#", QoS5::ExactlyOnce);
    client.publish("rt/1", QoS5::AtLeastOnce, false, b"one");
    let ack = client
        .wait_for(|p| match p {
            Packet::PubAck(a) => Some(a.reason),
            _ => None,
        })
        .expect("PUBACK");
    assert_eq!(ack, PubAckReason::Success);
    client.publish("rt/2", QoS5::ExactlyOnce, false, b"two");
    let rec = client
        .wait_for(|p| match p {
            Packet::PubRec(r) => Some(r.reason),
            _ => None,
        })
        .expect("PUBREC");
    assert_eq!(rec, PubRecReason::Success);
    client
        .wait_for(|p| matches!(p, Packet::PubComp(_)).then_some(()))
        .expect("PUBCOMP");
    let got: Vec<String> = [client.expect_publish(), client.expect_publish()]
        .iter()
        .map(topic_of)
        .collect();
    assert!(got.contains(&"rt/1".to_string()) && got.contains(&"rt/2".to_string()));
}

#[test]
fn a_take_over_tells_the_old_v5_client_0x8e() {
    let broker = Broker::start();
    let mut old = raw_v5(broker.port, "twice");
    let _new = V5::connect(broker.port, "twice");
    let disconnect = old.expect_packet();
    assert_eq!(disconnect.bytes(), vec![0xe0, 1, 0x8e], "DISCONNECT 0x8E");
    old.expect_closed();
}

#[test]
fn malformed_v5_packets_get_a_disconnect_with_the_decoders_reason() {
    let broker = Broker::start();
    let mut bystander = V5::connect(broker.port, "bystander");
    bystander.subscribe("still/here", QoS5::AtLeastOnce);
    // A PUBLISH with the Payload Format Indicator twice: a protocol error
    // (§2.2.2.2).
    let mut body = string(b"t");
    body.extend([4, 0x01, 0, 0x01, 1]);
    body.extend(b"x");
    let mut raw = raw_v5(broker.port, "dup-prop");
    raw.send(&packet(0x30, &body));
    assert_eq!(raw.expect_packet().bytes(), vec![0xe0, 1, 0x82]);
    raw.expect_closed();
    // A PUBLISH with a Session Expiry Interval, a property it may not carry:
    // malformed.
    let mut body = string(b"t");
    body.extend([5, 0x11, 0, 0, 0, 1]);
    let mut raw = raw_v5(broker.port, "bad-prop");
    raw.send(&packet(0x30, &body));
    assert_eq!(raw.expect_packet().bytes(), vec![0xe0, 1, 0x81]);
    raw.expect_closed();
    // The broker and the other client are unaffected.
    let publisher = V5::connect(broker.port, "after");
    publisher.publish("still/here", QoS5::AtLeastOnce, false, b"ok");
    assert_eq!(&bystander.expect_publish().payload[..], b"ok");
}

#[test]
fn a_bad_v5_connect_gets_a_connack_with_the_reason() {
    let broker = Broker::start();
    // Unknown levels: 3.x-style CONNACK 1 below 5, MQTT 5's 0x84 above.
    let mut raw = Raw::tcp(broker.port);
    raw.send(&ConnectBuilder::new("lvl").protocol(b"MQTT", 6).bytes());
    assert_eq!(raw.expect_packet().bytes(), vec![0x20, 3, 0, 0x84, 0]);
    raw.expect_closed();
    // An Authentication Method: extended authentication is not supported.
    let mut body = string(b"MQTT");
    body.extend([5, 0x02, 0, 60, 8, 0x15]);
    body.extend(string(b"SCRAM"));
    body.extend(string(b"id"));
    let mut raw = Raw::tcp(broker.port);
    raw.send(&packet(0x10, &body));
    assert_eq!(raw.expect_packet().bytes(), vec![0x20, 3, 0, 0x8c, 0]);
    raw.expect_closed();
}

#[test]
fn mosquitto_v5_clients_talk_to_v5_and_v3_clients() {
    if std::process::Command::new("mosquitto_pub")
        .arg("--help")
        .output()
        .is_err()
    {
        eprintln!("mosquitto_pub not installed: skipped");
        return;
    }
    let broker = Broker::start();
    let port = broker.port.to_string();
    let mut v5 = V5::connect(broker.port, "v5-sub");
    v5.subscribe("cli/#", QoS5::AtLeastOnce);
    let mut v3 = Mqtt::connect(broker.port, "v3-sub");
    v3.subscribe("cli/#", rumqttc::QoS::AtLeastOnce);
    let mut sub = std::process::Command::new("mosquitto_sub")
        .args(["-V", "5", "-h", "127.0.0.1", "-p", &port, "-t", "cli/#"])
        .args(["-q", "1", "-C", "1", "-W", "10", "-F", "%t %p"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    // mosquitto_sub has no "subscribed" signal: publish until it has one.
    let deadline = Instant::now() + WAIT;
    let mut n = 0;
    let output = loop {
        let status = std::process::Command::new("mosquitto_pub")
            .args(["-V", "5", "-h", "127.0.0.1", "-p", &port, "-q", "1"])
            .args(["-t", &format!("cli/{n}"), "-m", "hello"])
            .args(["-D", "publish", "user-property", "k", "v"])
            .status()
            .expect("mosquitto_pub");
        assert!(status.success());
        n += 1;
        if let Ok(Some(_)) = sub.try_wait() {
            break sub.wait_with_output().expect("mosquitto_sub output");
        }
        assert!(Instant::now() < deadline, "mosquitto_sub got nothing");
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.starts_with("cli/") && text.trim_end().ends_with("hello"),
        "{text}"
    );
    let p = v5.expect_publish();
    assert_eq!(&p.payload[..], b"hello");
    let properties = p.properties.expect("publish properties");
    assert_eq!(properties.user_properties, vec![("k".into(), "v".into())]);
    assert_eq!(&v3.expect_publish().payload[..], b"hello");
}

#[test]
fn v5_properties_are_forwarded_to_v5_subscribers_only() {
    let broker = Broker::start();
    let mut v5 = V5::connect(broker.port, "props-v5");
    v5.subscribe("props", QoS5::AtLeastOnce);
    let mut v3 = Mqtt::connect(broker.port, "props-v3");
    v3.subscribe("props", rumqttc::QoS::AtLeastOnce);
    let publisher = V5::connect(broker.port, "props-pub");
    let properties = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("text/plain".into()),
        response_topic: Some("reply/here".into()),
        correlation_data: Some(Bytes::from_static(b"\x01\x02")),
        user_properties: vec![("a".into(), "1".into()), ("b".into(), "2".into())],
        ..Default::default()
    };
    for qos in [QoS5::AtMostOnce, QoS5::AtLeastOnce] {
        publisher
            .client
            .publish_with_properties("props", qos, false, b"p".to_vec(), properties.clone())
            .expect("publish");
        let got = v5.expect_publish();
        let p = got.properties.expect("forwarded properties");
        assert_eq!(p.payload_format_indicator, Some(1));
        assert_eq!(p.content_type.as_deref(), Some("text/plain"));
        assert_eq!(p.response_topic.as_deref(), Some("reply/here"));
        assert_eq!(p.correlation_data.as_deref(), Some(&b"\x01\x02"[..]));
        assert_eq!(p.user_properties, properties.user_properties);
        let plain = v3.expect_publish();
        assert_eq!(&plain.payload[..], b"p");
    }
}

/// An MQTT 5.0 SUBSCRIBE of one filter with `options` (QoS in bits 0-1),
/// without properties.
pub(crate) fn subscribe_v5(packet_id: u16, filter: &str, options: u8) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    body.push(0);
    body.extend(string(filter.as_bytes()));
    body.push(options);
    packet(0x82, &body)
}

/// An MQTT 5.0 QoS 1 PUBLISH without properties.
fn publish_v5_qos1(topic: &str, packet_id: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic.as_bytes());
    body.extend(packet_id.to_be_bytes());
    body.push(0);
    body.extend(payload);
    packet(0x32, &body)
}

#[test]
fn v5_reason_codes_for_invalid_and_denied_filters_and_publishes() {
    // rumqttc ends its connection at a failing SUBACK: raw bytes here.
    let acl = tempfile::NamedTempFile::new().expect("acl file");
    std::fs::write(
        acl.path(),
        "topic readwrite open/#\ntopic deny open/secret\n",
    )
    .expect("write acl");
    let broker = Broker::builder()
        .config(&format!("acl_file = {:?}\n", acl.path()))
        .start();
    let mut raw = raw_v5(broker.port, "subacks");
    for (id, filter, code) in [
        (1u8, "open/x", 1u8),
        (2, "closed/x", 0x87),
        (3, "open/#/x", 0x8f),
        // Over the denied topic: granted, open/secret withheld per message.
        (4, "open/+", 1),
        (5, "open/secret", 0x87),
    ] {
        raw.send(&subscribe_v5(u16::from(id), filter, 1));
        assert_eq!(
            raw.expect_packet().bytes(),
            vec![0x90, 4, 0, id, 0, code],
            "SUBACK for {filter}"
        );
    }
    // A denied publish is acknowledged with 0x87 Not authorized, an
    // allowed one with the short Success form.
    raw.send(&publish_v5_qos1("closed/x", 7, b"no"));
    assert_eq!(raw.expect_packet().bytes(), vec![0x40, 3, 0, 7, 0x87]);
    raw.send(&publish_v5_qos1("open/y/z", 8, b"yes"));
    assert_eq!(raw.expect_packet().bytes(), vec![0x40, 2, 0, 8]);
    // UNSUBACK: Success, then No subscription existed.
    let mut body = vec![0, 9, 0];
    body.extend(string(b"open/x"));
    body.extend(string(b"never"));
    raw.send(&packet(0xa2, &body));
    assert_eq!(raw.expect_packet().bytes(), vec![0xb0, 5, 0, 9, 0, 0, 0x11]);
}

#[test]
fn a_v5_disconnect_with_will_publishes_the_will() {
    let broker = Broker::start();
    let mut watcher = V5::connect(broker.port, "watcher");
    watcher.subscribe("will/+", QoS5::AtLeastOnce);
    for (id, reason) in [
        ("normal", DisconnectReasonCode::NormalDisconnection),
        ("with-will", DisconnectReasonCode::DisconnectWithWillMessage),
    ] {
        let mut connect = string(b"MQTT");
        // Will flag, will QoS 1, clean start.
        connect.extend([5, 0x0e, 0, 60, 0]);
        connect.extend(string(id.as_bytes()));
        connect.push(0); // will properties
        connect.extend(string(format!("will/{id}").as_bytes()));
        connect.extend(string(b"gone"));
        let mut raw = Raw::tcp(broker.port);
        raw.send(&packet(0x10, &connect));
        assert_eq!(raw.expect_packet().kind(), 2);
        raw.send(&[0xe0, 1, reason as u8]);
        raw.expect_closed();
    }
    let marker = V5::connect(broker.port, "marker");
    marker.publish("will/end", QoS5::AtLeastOnce, false, b"");
    let got: Vec<String> = watcher
        .collect_until("will/end")
        .iter()
        .map(topic_of)
        .collect();
    assert_eq!(got, vec!["will/with-will", "will/end"]);
}

/// An MQTT 5.0 QoS 0 PUBLISH with a Topic Alias (and `topic`, possibly
/// empty).
fn publish_v5_alias(topic: &str, alias: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic.as_bytes());
    body.extend([3, 0x23]);
    body.extend(alias.to_be_bytes());
    body.extend(payload);
    packet(0x30, &body)
}

#[test]
fn v5_topic_aliases_from_the_client_up_to_the_maximum() {
    let broker = Broker::builder().config("max_topic_alias = 2\n").start();
    let mut sub = V5::connect(broker.port, "alias-sub");
    sub.subscribe("alias/#", QoS5::AtMostOnce);
    let mut raw = raw_v5(broker.port, "alias-pub");
    raw.send(&publish_v5_alias("alias/a", 1, b"set"));
    raw.send(&publish_v5_alias("", 1, b"used"));
    raw.send(&publish_v5_alias("alias/b", 1, b"changed"));
    raw.send(&publish_v5_alias("", 1, b"again"));
    let got: Vec<(String, Vec<u8>)> = (0..4)
        .map(|_| {
            let p = sub.expect_publish();
            (topic_of(&p), p.payload.to_vec())
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("alias/a".to_string(), b"set".to_vec()),
            ("alias/a".to_string(), b"used".to_vec()),
            ("alias/b".to_string(), b"changed".to_vec()),
            ("alias/b".to_string(), b"again".to_vec()),
        ],
        "subscribers get the topic, never the alias"
    );
    // An alias not set yet, and one over the maximum: 0x94.
    raw.send(&publish_v5_alias("", 2, b"unset"));
    assert_eq!(raw.expect_packet().bytes(), vec![0xe0, 1, 0x94]);
    raw.expect_closed();
    let mut raw = raw_v5(broker.port, "alias-over");
    raw.send(&publish_v5_alias("alias/c", 3, b"over"));
    assert_eq!(raw.expect_packet().bytes(), vec![0xe0, 1, 0x94]);
    raw.expect_closed();
}

/// An MQTT 5.0 CONNECT with keep-alive 60, Clean Start as `clean`, and
/// `properties` (already encoded, at most 127 bytes).
fn connect_v5_with(client_id: &str, clean: bool, properties: &[u8]) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.extend([5, if clean { 0x02 } else { 0x00 }, 0, 60]);
    body.push(u8::try_from(properties.len()).unwrap());
    body.extend(properties);
    body.extend(string(client_id.as_bytes()));
    packet(0x10, &body)
}

/// The Topic Alias Maximum property (0x22) for a CONNECT.
fn topic_alias_maximum(maximum: u16) -> Vec<u8> {
    let mut property = vec![0x22];
    property.extend(maximum.to_be_bytes());
    property
}

/// A raw MQTT 5.0 client past CONNACK, connected with `connect`.
fn raw_v5_with(port: u16, connect: &[u8]) -> Raw {
    let mut raw = Raw::tcp(port);
    raw.send(connect);
    let connack = raw.expect_packet();
    assert_eq!(
        (connack.kind(), connack.bytes()[3]),
        (2, 0),
        "CONNACK Success"
    );
    raw
}

/// A raw clean-start MQTT 5.0 client past CONNACK that allows `maximum`
/// Topic Aliases from the broker.
fn raw_v5_aliased(port: u16, client_id: &str, maximum: u16) -> Raw {
    raw_v5_with(
        port,
        &connect_v5_with(client_id, true, &topic_alias_maximum(maximum)),
    )
}

/// Connects clients `{prefix}-0`, `{prefix}-1`, ... with `connect` until one
/// is on another shard than `shard`; returns it and its client id.
fn on_other_shard<T>(
    broker: &Broker,
    prefix: &str,
    shard: usize,
    mut connect: impl FnMut(&str) -> T,
) -> (T, String) {
    for i in 0..64 {
        let id = format!("{prefix}-{i}");
        let client = connect(&id);
        if broker.shard_of(&id) != shard {
            return (client, id);
        }
    }
    panic!("64 connections of {prefix} all on shard {shard}");
}

/// An MQTT 5.0 PUBLISH as the wire has it: (topic, packet id or 0,
/// properties without their length, payload).
fn v5_publish_parts(p: &RawPacket) -> (String, u16, Vec<u8>, Vec<u8>) {
    assert_eq!(p.kind(), 3, "not a PUBLISH: {p:?}");
    let body = &p.body;
    let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let topic = String::from_utf8(body[2..2 + len].to_vec()).unwrap();
    let mut at = 2 + len;
    let mut packet_id = 0;
    if (p.first >> 1) & 3 > 0 {
        packet_id = u16::from_be_bytes([body[at], body[at + 1]]);
        at += 2;
    }
    let properties_len = usize::from(body[at]);
    assert!(properties_len < 128, "short properties in these tests");
    let properties = body[at + 1..at + 1 + properties_len].to_vec();
    let payload = body[at + 1 + properties_len..].to_vec();
    (topic, packet_id, properties, payload)
}

#[test]
fn server_topic_aliases_are_resolved_by_a_rumqttc_client_across_shards() {
    let broker = Broker::start();
    let publisher = V5::connect(broker.port, "sa-pub");
    let pub_shard = broker.shard_of("sa-pub");
    let (mut sub, _) = on_other_shard(&broker, "sa-sub", pub_shard, |id| {
        let mut options = V5::options(broker.port, id);
        options.set_topic_alias_max(Some(3));
        V5::connect_with(options).0
    });
    sub.subscribe("alias/server/side/#", QoS5::AtLeastOnce);
    // Five topics over at most three aliases: aliases are set, used and
    // taken over by other topics.
    let topics: Vec<String> = (0..5)
        .map(|t| format!("alias/server/side/a/rather/long/topic/name/{t}"))
        .collect();
    const COUNT: usize = 60;
    for n in 0..COUNT {
        let qos = if n % 2 == 0 {
            QoS5::AtMostOnce
        } else {
            QoS5::AtLeastOnce
        };
        publisher.publish(&topics[(n / 2) % 5], qos, false, n.to_string().as_bytes());
    }
    let mut got: Vec<(usize, String)> = (0..COUNT)
        .map(|_| {
            let p = sub.expect_publish();
            let n: usize = String::from_utf8_lossy(&p.payload).parse().unwrap();
            (n, topic_of(&p))
        })
        .collect();
    got.sort();
    let expected: Vec<(usize, String)> = (0..COUNT)
        .map(|n| (n, topics[(n / 2) % 5].clone()))
        .collect();
    assert_eq!(got, expected, "every message with its own topic");
    assert!(sub.recv_publish(Duration::from_millis(100)).is_none());
}

#[test]
fn server_topic_aliases_on_the_wire_and_none_without_the_clients_maximum() {
    let broker = Broker::start();
    let mut publisher = raw_v5(broker.port, "sw-pub");
    let pub_shard = broker.shard_of("sw-pub");
    let (mut aliased, _) = on_other_shard(&broker, "sw-aliased", pub_shard, |id| {
        raw_v5_aliased(broker.port, id, 3)
    });
    let (mut plain, _) =
        on_other_shard(&broker, "sw-plain", pub_shard, |id| raw_v5(broker.port, id));
    for sub in [&mut aliased, &mut plain] {
        sub.send(&subscribe_v5(1, "wire/#", 1));
        assert_eq!(sub.expect_packet().bytes(), vec![0x90, 4, 0, 1, 0, 1]);
    }
    let topic = "wire/a/topic/long/enough/to/be/worth/an/alias";
    for n in 0..3u8 {
        publisher.send(&packet(
            0x30,
            &[string(topic.as_bytes()), vec![0, n]].concat(),
        ));
    }
    publisher.send(&publish_v5_qos1(topic, 7, b"q1"));
    assert_eq!(publisher.expect_packet().bytes(), vec![0x40, 2, 0, 7]);
    // The first carries topic and alias, the later ones the alias alone.
    let first = aliased.expect_packet();
    let (t, _, properties, payload) = v5_publish_parts(&first);
    assert_eq!((t.as_str(), payload), (topic, vec![0]));
    assert_eq!(properties.len(), 3, "one Topic Alias: {properties:?}");
    assert_eq!(properties[0], 0x23);
    let alias = u16::from_be_bytes([properties[1], properties[2]]);
    assert!(
        (1..=3).contains(&alias),
        "alias {alias} within the maximum 3"
    );
    for n in 1..3u8 {
        let later = aliased.expect_packet();
        assert_eq!(
            v5_publish_parts(&later),
            (String::new(), 0, properties.clone(), vec![n])
        );
        assert!(later.bytes().len() + topic.len() == first.bytes().len());
    }
    let qos1 = aliased.expect_packet();
    let (t, packet_id, p, payload) = v5_publish_parts(&qos1);
    assert_eq!((t.as_str(), &p, payload), ("", &properties, b"q1".to_vec()));
    aliased.send(&ack(0x40, packet_id));
    // A client that did not allow aliases gets every topic, never an alias.
    for n in 0..3u8 {
        assert_eq!(
            v5_publish_parts(&plain.expect_packet()),
            (topic.to_string(), 0, vec![], vec![n])
        );
    }
    let (t, packet_id, p, _) = v5_publish_parts(&plain.expect_packet());
    assert_eq!((t.as_str(), p), (topic, vec![]));
    plain.send(&ack(0x40, packet_id));
}

#[test]
fn server_topic_aliases_0_turns_them_off() {
    let broker = Broker::builder()
        .config("server_topic_aliases = 0\n")
        .start();
    let mut publisher = raw_v5(broker.port, "so-pub");
    let pub_shard = broker.shard_of("so-pub");
    let (mut sub, _) = on_other_shard(&broker, "so-sub", pub_shard, |id| {
        raw_v5_aliased(broker.port, id, 10)
    });
    sub.send(&subscribe_v5(1, "off/#", 0));
    assert_eq!(sub.expect_packet().bytes(), vec![0x90, 4, 0, 1, 0, 0]);
    for n in 0..3u8 {
        publisher.send(&packet(0x30, &[string(b"off/t"), vec![0, n]].concat()));
    }
    for n in 0..3u8 {
        assert_eq!(
            v5_publish_parts(&sub.expect_packet()),
            ("off/t".to_string(), 0, vec![], vec![n])
        );
    }
}

#[test]
fn a_message_sent_again_after_a_reconnect_has_its_topic_not_an_alias() {
    let broker = Broker::start();
    let mut publisher = raw_v5(broker.port, "sr-pub");
    let pub_shard = broker.shard_of("sr-pub");
    let mut properties = vec![0x11, 0, 0, 0, 60];
    properties.extend(topic_alias_maximum(5));
    let (mut sub, id) = on_other_shard(&broker, "sr-sub", pub_shard, |id| {
        raw_v5_with(broker.port, &connect_v5_with(id, false, &properties))
    });
    sub.send(&subscribe_v5(1, "again/#", 1));
    assert_eq!(sub.expect_packet().bytes(), vec![0x90, 4, 0, 1, 0, 1]);
    let topic = "again/the/same/topic";
    for n in 1..=2u16 {
        publisher.send(&publish_v5_qos1(topic, n, &[n as u8]));
        assert_eq!(publisher.expect_packet().bytes(), vec![0x40, 2, 0, n as u8]);
    }
    let (t1, _, alias, _) = v5_publish_parts(&sub.expect_packet());
    let (t2, _, alias2, _) = v5_publish_parts(&sub.expect_packet());
    assert_eq!((t1.as_str(), t2.as_str()), (topic, ""));
    assert_eq!(alias.len(), 3);
    assert_eq!(alias, alias2);
    // Gone without acknowledging either; back on a new connection, which
    // knows no alias: both again with DUP and their topic.
    sub.reset();
    let mut sub = raw_v5_with(broker.port, &connect_v5_with(&id, false, &properties));
    for n in 1..=2u8 {
        let p = sub.expect_packet();
        assert_eq!(p.first & 0x08, 0x08, "DUP");
        let (t, packet_id, props, payload) = v5_publish_parts(&p);
        assert_eq!((t.as_str(), props, payload), (topic, vec![], vec![n]));
        sub.send(&ack(0x40, packet_id));
    }
    // A new message sets the alias again, with the topic.
    publisher.send(&publish_v5_qos1(topic, 3, b"new"));
    let (t, packet_id, props, _) = v5_publish_parts(&sub.expect_packet());
    assert_eq!((t.as_str(), props.len(), props[0]), (topic, 3, 0x23));
    sub.send(&ack(0x40, packet_id));
}

#[test]
fn a_v5_payload_that_breaks_its_format_indicator_gets_0x99() {
    let broker = Broker::start();
    let mut raw = raw_v5(broker.port, "pfi");
    let mut body = string(b"pfi");
    body.extend([0, 5, 2, 0x01, 1]);
    body.extend([0xff, 0xfe]);
    raw.send(&packet(0x32, &body));
    assert_eq!(raw.expect_packet().bytes(), vec![0x40, 3, 0, 5, 0x99]);
    // QoS 2: PUBREC 0x99, the flow ends there; the connection stays.
    let mut body = string(b"pfi");
    body.extend([0, 6, 2, 0x01, 1]);
    body.extend([0xc3, 0x28]);
    raw.send(&packet(0x34, &body));
    assert_eq!(raw.expect_packet().bytes(), vec![0x50, 3, 0, 6, 0x99]);
    // A valid UTF-8 payload with the indicator is accepted.
    let mut body = string(b"pfi");
    body.extend([0, 7, 2, 0x01, 1]);
    body.extend("é".as_bytes());
    raw.send(&packet(0x32, &body));
    assert_eq!(raw.expect_packet().bytes(), vec![0x40, 2, 0, 7]);
    // QoS 0 has no acknowledgement to carry the reason: DISCONNECT 0x99,
    // this connection only; nothing reaches a subscriber.
    let mut sub = V5::connect(broker.port, "pfi-sub");
    sub.subscribe("pfi", QoS5::AtMostOnce);
    let mut body = string(b"pfi");
    body.extend([2, 0x01, 1]);
    body.push(0xff);
    raw.send(&packet(0x30, &body));
    assert_eq!(raw.expect_packet().bytes(), vec![0xe0, 1, 0x99]);
    raw.expect_closed();
    let mut other = raw_v5(broker.port, "pfi-2");
    let mut body = string(b"pfi");
    body.extend([0, 8, 0]);
    body.extend(b"after");
    other.send(&packet(0x32, &body));
    assert_eq!(other.expect_packet().bytes(), vec![0x40, 2, 0, 8]);
    let got = sub.expect_publish();
    assert_eq!(
        &got.payload[..],
        b"after",
        "the invalid QoS 0 was not forwarded"
    );
}

/// An MQTT 5.0 CONNECT without Clean Start, with a Session Expiry Interval
/// of `expiry` seconds.
fn connect_v5_persistent(client_id: &str, expiry: u32) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.extend([5, 0x00, 0, 60, 5, 0x11]);
    body.extend(expiry.to_be_bytes());
    body.extend(string(client_id.as_bytes()));
    packet(0x10, &body)
}

/// Connects `client_id` persistently; returns the client and whether the
/// CONNACK said Session Present.
fn resume_v5(port: u16, client_id: &str, expiry: u32) -> (Raw, bool) {
    let mut raw = Raw::tcp(port);
    raw.send(&connect_v5_persistent(client_id, expiry));
    let connack = raw.expect_packet().bytes();
    assert_eq!((connack[0], connack[3]), (0x20, 0), "CONNACK Success");
    (raw, connack[2] == 1)
}

/// Ends a raw MQTT 5.0 connection with a normal DISCONNECT.
fn disconnect_v5(mut raw: Raw) {
    raw.send(&[0xe0, 0]);
    raw.expect_closed();
}

#[test]
fn a_v5_session_outlives_its_connection_for_its_expiry_interval_only() {
    let broker = Broker::start();
    let (mut raw, present) = resume_v5(broker.port, "persist", 2);
    assert!(!present);
    raw.send(&subscribe_v5(1, "exp/t", 1));
    assert_eq!(raw.expect_packet().bytes(), vec![0x90, 4, 0, 1, 0, 1]);
    disconnect_v5(raw);
    let mut publisher = raw_v5(broker.port, "exp-pub");
    publisher.send(&publish_v5_qos1("exp/t", 1, b"queued"));
    assert_eq!(publisher.expect_packet().bytes(), vec![0x40, 2, 0, 1]);
    // Within the interval: the session is there, with the message.
    let (mut raw, present) = resume_v5(broker.port, "persist", 2);
    assert!(present, "session present within its expiry interval");
    // The raw reader parses 3.1.1: the empty properties' length byte comes
    // first.
    assert_eq!(&raw.expect_publish().payload[..], b"\0queued");
    disconnect_v5(raw);
    // After it: gone (the sweep says so in the log).
    broker
        .wait_log(|l| l.contains("client persist: session expired"), WAIT)
        .expect("the session expires");
    let (raw, present) = resume_v5(broker.port, "persist", 0);
    assert!(!present, "no session after its expiry interval");
    disconnect_v5(raw);
    // 3.1.1 CleanSession = 0 maps to "never expires": still there.
    let mut options = Mqtt::options(broker.port, "v3-persist");
    options.set_clean_session(false);
    let (v3, _) = Mqtt::connect_with(options.clone());
    v3.disconnect();
    let (_v3, connack) = Mqtt::connect_with(options);
    assert!(connack.session_present);
}

/// A QoS 1 PUBLISH with a Message Expiry Interval of `secs`.
fn publish_v5_expiring(topic: &str, packet_id: u16, secs: u32, payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic.as_bytes());
    body.extend(packet_id.to_be_bytes());
    body.extend([5, 0x02]);
    body.extend(secs.to_be_bytes());
    body.extend(payload);
    packet(0x32, &body)
}

#[test]
fn a_queued_message_expires_and_the_rest_of_its_interval_is_forwarded() {
    let broker = Broker::start();
    let (mut raw, _) = resume_v5(broker.port, "offline", 60);
    raw.send(&subscribe_v5(1, "mei/t", 1));
    raw.expect_packet();
    disconnect_v5(raw);
    let mut publisher = raw_v5(broker.port, "mei-pub");
    publisher.send(&publish_v5_expiring("mei/t", 1, 1, b"short"));
    publisher.expect_packet();
    publisher.send(&publish_v5_expiring("mei/t", 2, 100, b"long"));
    publisher.expect_packet();
    let published = Instant::now();
    // The short one's second passes while the subscriber is away.
    std::thread::sleep(Duration::from_millis(1100).saturating_sub(published.elapsed()));
    let mut options = V5::options(broker.port, "offline");
    options.set_clean_start(false);
    let (mut sub, connack) = V5::connect_with(options);
    assert!(connack.session_present);
    let p = sub.expect_publish();
    assert_eq!(&p.payload[..], b"long", "the expired message is not sent");
    let left = p
        .properties
        .and_then(|p| p.message_expiry_interval)
        .expect("the interval left");
    assert!((98..=100).contains(&left), "{left}");
    assert!(sub.recv_publish(Duration::from_millis(200)).is_none());
}

#[test]
fn the_clients_receive_maximum_bounds_what_is_in_flight_to_it() {
    let broker = Broker::start();
    let mut options = V5::options(broker.port, "slow-acker");
    options.set_manual_acks(true);
    options.set_receive_maximum(Some(2));
    let (mut sub, _) = V5::connect_with(options);
    sub.subscribe("burst", QoS5::AtLeastOnce);
    let mut publisher = raw_v5(broker.port, "burster");
    for id in 1..=10u16 {
        publisher.send(&publish_v5_qos1("burst", id, &id.to_be_bytes()));
        publisher.expect_packet();
    }
    let first = sub.expect_publish();
    let second = sub.expect_publish();
    assert!(
        sub.recv_publish(Duration::from_millis(300)).is_none(),
        "no third before an acknowledgement"
    );
    sub.client.ack(&first).expect("ack");
    let third = sub.expect_publish();
    assert_eq!(&third.payload[..], &3u16.to_be_bytes());
    assert!(sub.recv_publish(Duration::from_millis(300)).is_none());
    sub.client.ack(&second).expect("ack");
    sub.client.ack(&third).expect("ack");
    let got: Vec<Publish> = (0..2).map(|_| sub.expect_publish()).collect();
    assert_eq!(&got[1].payload[..], &5u16.to_be_bytes());
}

#[test]
fn nothing_larger_than_the_clients_maximum_packet_size_is_sent() {
    let broker = Broker::start();
    let mut body = string(b"MQTT");
    body.extend([5, 0x02, 0, 60, 5, 0x27, 0, 0, 0, 30]);
    body.extend(string(b"small-client"));
    let mut sub = Raw::tcp(broker.port);
    sub.send(&packet(0x10, &body));
    assert_eq!(sub.expect_packet().kind(), 2);
    sub.send(&subscribe_v5(1, "mps/#", 1));
    sub.expect_packet();
    let publisher = V5::connect(broker.port, "mps-pub");
    publisher.publish("mps/big", QoS5::AtMostOnce, false, &[b'x'; 40]);
    publisher.publish("mps/big", QoS5::AtLeastOnce, false, &[b'x'; 40]);
    publisher.publish("mps/end", QoS5::AtMostOnce, false, b"ok");
    let p = sub.expect_publish();
    assert_eq!(p.topic, "mps/end", "the large ones were dropped");
}

/// Clients `{prefix}-0`, `{prefix}-1`, ... made by `connect` until one is
/// on each of the broker's two shards; returns those two.
fn one_on_each_shard<T>(
    broker: &Broker,
    prefix: &str,
    mut connect: impl FnMut(&str) -> T,
) -> Vec<T> {
    let mut found: [Option<T>; 2] = [None, None];
    for i in 0..64 {
        let id = format!("{prefix}-{i}");
        let client = connect(&id);
        found[broker.shard_of(&id)].get_or_insert(client);
        if found.iter().all(Option::is_some) {
            return found.into_iter().flatten().collect();
        }
    }
    panic!("64 connections of {prefix} all on one shard");
}

/// The raw MQTT 5.0 PUBLISH packets `raw` receives up to and including
/// the first on `marker`, as [`v5_publish_parts`] splits them.
fn raw_v5_until(raw: &mut Raw, marker: &str) -> Vec<(String, u16, Vec<u8>, Vec<u8>)> {
    let mut got = Vec::new();
    loop {
        let parts = v5_publish_parts(&raw.expect_packet());
        let done = parts.0 == marker;
        got.push(parts);
        if done {
            return got;
        }
    }
}

/// The payloads of `publishes`, as text.
fn payloads_of<'a>(publishes: impl IntoIterator<Item = &'a [u8]>) -> Vec<String> {
    publishes
        .into_iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect()
}

#[test]
fn a_burst_to_one_topic_reaches_every_kind_of_subscriber_in_order_with_its_own_properties() {
    // The publisher's QoS 0 burst to one topic, in one write, is routed as
    // a run (`shard::run`) on both shards: 3.1.1 and plain 5.0 subscribers
    // take it whole, each version framed once per shard; a subscriber
    // with a Subscription Identifier or with Topic Aliases from the broker
    // needs its own frames, and one with a small Maximum Packet Size gets
    // only the frames that fit. One subscriber of each kind on each shard.
    let mut broker = Broker::start();
    const COUNT: usize = 40;
    // Even messages are short (a 15-byte 5.0 frame), odd ones long (55).
    let payload = |n: usize| {
        let long = if n % 2 == 1 {
            "x".repeat(40)
        } else {
            String::new()
        };
        format!("m{n:02}{long}")
    };
    let mut v3 = one_on_each_shard(&broker, "run-v3", |id| Mqtt::connect(broker.port, id));
    let mut v5 = one_on_each_shard(&broker, "run-v5", |id| V5::connect(broker.port, id));
    let mut with_id = one_on_each_shard(&broker, "run-id", |id| V5::connect(broker.port, id));
    // Maximum Packet Size (0x27) 30 bytes.
    let small_max = [0x27, 0, 0, 0, 30];
    let mut small = one_on_each_shard(&broker, "run-small", |id| {
        raw_v5_with(broker.port, &connect_v5_with(id, true, &small_max))
    });
    let mut aliased = one_on_each_shard(&broker, "run-alias", |id| {
        raw_v5_aliased(broker.port, id, 4)
    });
    for s in &mut v3 {
        s.subscribe("run/#", rumqttc::QoS::AtMostOnce);
    }
    for s in &mut v5 {
        s.subscribe("run/#", QoS5::AtMostOnce);
    }
    for s in &mut with_id {
        s.subscribe_with_id("run/#", 7);
    }
    for raw in small.iter_mut().chain(&mut aliased) {
        raw.send(&subscribe_v5(1, "run/#", 0));
        assert_eq!(raw.expect_packet().kind(), 9, "SUBACK");
    }
    let mut publisher = Raw::connect(broker.port, "run-pub");
    let mut burst = Vec::new();
    for n in 0..COUNT {
        burst.extend(publish(b"run/t", payload(n).as_bytes(), 0, false, false, 0));
    }
    burst.extend(publish(b"run/end", b"end", 0, false, false, 0));
    publisher.send(&burst);

    let want: Vec<String> = (0..COUNT).map(payload).chain(["end".into()]).collect();
    for s in &mut v3 {
        let got = s.collect_until("run/end");
        assert_eq!(payloads_of(got.iter().map(|p| &p.payload[..])), want);
    }
    for s in &mut v5 {
        let got = s.collect_until("run/end");
        assert_eq!(payloads_of(got.iter().map(|p| &p.payload[..])), want);
        for p in &got {
            assert_eq!(p.qos, QoS5::AtMostOnce);
            assert_eq!(
                p.properties.clone().unwrap_or_default(),
                PublishProperties::default()
            );
        }
    }
    let identified = PublishProperties {
        subscription_identifiers: vec![7],
        ..PublishProperties::default()
    };
    for s in &mut with_id {
        let got = s.collect_until("run/end");
        assert_eq!(payloads_of(got.iter().map(|p| &p.payload[..])), want);
        for p in &got {
            assert_eq!(p.properties.as_ref(), Some(&identified), "every message");
        }
    }
    let short: Vec<String> = want.iter().step_by(2).cloned().collect();
    assert_eq!(short.last().map(String::as_str), Some("end"));
    for raw in &mut small {
        let got = raw_v5_until(raw, "run/end");
        assert_eq!(
            payloads_of(got.iter().map(|p| &p.3[..])),
            short,
            "only the frames within the Maximum Packet Size"
        );
        assert!(got.iter().all(|p| p.1 == 0 && p.2.is_empty()));
    }
    for raw in &mut aliased {
        let got = raw_v5_until(raw, "run/end");
        assert_eq!(payloads_of(got.iter().map(|p| &p.3[..])), want);
        let (first, rest) = got[..COUNT].split_first().expect("the burst");
        assert_eq!(first.0, "run/t", "the topic with its new alias");
        assert_eq!(first.2.len(), 3, "one property: {:?}", first.2);
        assert_eq!(first.2[0], 0x23, "Topic Alias");
        for p in rest {
            assert_eq!((p.0.as_str(), &p.2), ("", &first.2), "the alias alone");
        }
    }
    broker.assert_healthy();
}

#[test]
fn more_unreleased_qos_2_than_the_receive_maximum_is_0x93() {
    let broker = Broker::builder()
        .config("max_inflight_messages = 2\n")
        .start();
    let mut raw = raw_v5(broker.port, "greedy");
    for id in 1..=3u16 {
        let mut body = string(b"q2");
        body.extend(id.to_be_bytes());
        body.extend([0, b'x']);
        raw.send(&packet(0x34, &body));
        if id < 3 {
            assert_eq!(raw.expect_packet().bytes(), vec![0x50, 2, 0, id as u8]);
        }
    }
    assert_eq!(raw.expect_packet().bytes(), vec![0xe0, 1, 0x93]);
    raw.expect_closed();
}

impl V5 {
    /// Subscribes to `filter` with Subscription Identifier `id`.
    fn subscribe_with_id(&mut self, filter: &str, id: usize) -> Vec<SubscribeReasonCode> {
        self.subscribe_filter_with_id(Filter::new(filter, QoS5::AtLeastOnce), id)
    }

    /// Subscribes with `filter` (options included) and Subscription
    /// Identifier `id`.
    pub(crate) fn subscribe_filter_with_id(
        &mut self,
        filter: Filter,
        id: usize,
    ) -> Vec<SubscribeReasonCode> {
        let properties = rumqttc::v5::mqttbytes::v5::SubscribeProperties {
            id: Some(id),
            user_properties: Vec::new(),
        };
        self.client
            .subscribe_many_with_properties(vec![filter], properties)
            .expect("subscribe request");
        self.wait_for(|p| match p {
            Packet::SubAck(s) => Some(s.return_codes.clone()),
            _ => None,
        })
        .unwrap_or_else(|e| panic!("no SUBACK: {e}"))
    }
}

#[test]
fn no_local_keeps_a_clients_own_publications_from_it() {
    let broker = Broker::start();
    let mut client = V5::connect(broker.port, "talker");
    let mut filter = Filter::new("room/#", QoS5::AtLeastOnce);
    filter.nolocal = true;
    client.subscribe_filter(filter);
    let other = V5::connect(broker.port, "listener-pub");
    client.publish("room/mine", QoS5::AtLeastOnce, false, b"self");
    other.publish("room/theirs", QoS5::AtLeastOnce, false, b"other");
    let p = client.expect_publish();
    assert_eq!(
        topic_of(&p),
        "room/theirs",
        "its own publication is not echoed"
    );
    assert!(client.recv_publish(Duration::from_millis(200)).is_none());
}

#[test]
fn retain_handling_and_retain_as_published() {
    let broker = Broker::start();
    let publisher = V5::connect(broker.port, "retainer");
    publisher.publish("keep/a", QoS5::AtLeastOnce, true, b"kept");
    let mut probe = V5::connect(broker.port, "probe");
    probe.subscribe("keep/a", QoS5::AtLeastOnce);
    assert_eq!(&probe.expect_publish().payload[..], b"kept", "stored");
    // Retain Handling 2: no retained message at subscribe.
    let mut never = V5::connect(broker.port, "never");
    let mut filter = Filter::new("keep/#", QoS5::AtLeastOnce);
    filter.retain_forward_rule = RetainForwardRule::Never;
    filter.preserve_retain = true;
    never.subscribe_filter(filter.clone());
    // Retain Handling 1: only for a new subscription.
    let mut once = V5::connect(broker.port, "once");
    let mut filter1 = Filter::new("keep/#", QoS5::AtLeastOnce);
    filter1.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
    once.subscribe_filter(filter1.clone());
    assert!(once.expect_publish().retain, "new: sent, RETAIN set");
    once.subscribe_filter(filter1);
    // Retain As Published: a live retained publish keeps RETAIN for
    // `never`, and is cleared for `once`.
    publisher.publish("keep/b", QoS5::AtLeastOnce, true, b"live");
    let p = never.expect_publish();
    assert_eq!((topic_of(&p).as_str(), p.retain), ("keep/b", true));
    let p = once.expect_publish();
    assert_eq!(
        (topic_of(&p).as_str(), p.retain),
        ("keep/b", false),
        "the second subscribe sent no retained message"
    );
}

#[test]
fn every_matching_subscription_identifier_comes_with_the_message() {
    let broker = Broker::start();
    let mut client = V5::connect(broker.port, "ids");
    client.subscribe_with_id("sensors/+/temp", 7);
    client.subscribe_with_id("sensors/#", 300);
    client.subscribe("sensors/x/temp", QoS5::AtLeastOnce);
    let mut plain = Mqtt::connect(broker.port, "ids-v3");
    plain.subscribe("sensors/#", rumqttc::QoS::AtLeastOnce);
    let publisher = V5::connect(broker.port, "ids-pub");
    publisher.publish("sensors/x/temp", QoS5::AtLeastOnce, false, b"21");
    publisher.publish("sensors/x/hum", QoS5::AtMostOnce, false, b"40");
    let p = client.expect_publish();
    let mut ids = p.properties.expect("properties").subscription_identifiers;
    ids.sort();
    assert_eq!(ids, vec![7, 300], "one message, both identifiers");
    let p = client.expect_publish();
    assert_eq!(
        p.properties.expect("properties").subscription_identifiers,
        vec![300]
    );
    assert_eq!(&plain.expect_publish().payload[..], b"21");
    assert_eq!(&plain.expect_publish().payload[..], b"40");
}

/// An MQTT 5.0 CONNECT without Clean Start, Session Expiry Interval 60 s,
/// and a QoS 1 will to `will/<client_id>` delayed by `delay` seconds with
/// a Content Type and a User Property.
fn connect_v5_with_delayed_will(client_id: &str, delay: u32) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.extend([5, 0x0c, 0, 60, 5, 0x11, 0, 0, 0, 60]);
    body.extend(string(client_id.as_bytes()));
    let mut will_properties = vec![0x18];
    will_properties.extend(delay.to_be_bytes());
    will_properties.push(0x03);
    will_properties.extend(string(b"text/plain"));
    will_properties.push(0x26);
    will_properties.extend(string(b"why"));
    will_properties.extend(string(b"lost"));
    body.push(will_properties.len() as u8);
    body.extend(will_properties);
    body.extend(string(format!("will/{client_id}").as_bytes()));
    body.extend(string(b"gone"));
    packet(0x10, &body)
}

#[test]
fn a_delayed_will_waits_and_is_not_sent_when_the_client_is_back() {
    let broker = Broker::start();
    let mut watcher = V5::connect(broker.port, "will-watcher");
    watcher.subscribe("will/#", QoS5::AtLeastOnce);
    // Back within the delay: no will.
    let mut raw = Raw::tcp(broker.port);
    raw.send(&connect_v5_with_delayed_will("back", 2));
    assert_eq!(raw.expect_packet().kind(), 2);
    raw.reset();
    let (raw, present) = resume_v5(broker.port, "back", 60);
    assert!(present);
    // Gone for good: the will comes after its delay, with its properties.
    let mut lost = Raw::tcp(broker.port);
    lost.send(&connect_v5_with_delayed_will("lost", 1));
    assert_eq!(lost.expect_packet().kind(), 2);
    lost.reset();
    let closed = Instant::now();
    let p = watcher.expect_publish();
    assert!(
        closed.elapsed() >= Duration::from_millis(900),
        "{:?}",
        closed.elapsed()
    );
    assert_eq!(topic_of(&p), "will/lost", "not will/back: it came back");
    let properties = p.properties.expect("will properties");
    assert_eq!(properties.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        properties.user_properties,
        vec![("why".into(), "lost".into())]
    );
    disconnect_v5(raw);
    let marker = V5::connect(broker.port, "will-marker");
    marker.publish("will/end", QoS5::AtLeastOnce, false, b"");
    assert_eq!(topic_of(&watcher.expect_publish()), "will/end");
}

#[test]
fn a_silent_v5_client_gets_disconnect_0x8d() {
    let broker = Broker::start();
    let mut raw = Raw::tcp(broker.port);
    let mut body = string(b"MQTT");
    body.extend([5, 0x02, 0, 1, 0]);
    body.extend(string(b"silent"));
    raw.send(&packet(0x10, &body));
    assert_eq!(raw.expect_packet().kind(), 2);
    // Keep-alive 1 s: closed after 1.5 s of silence, with the reason.
    assert_eq!(raw.expect_packet().bytes(), vec![0xe0, 1, 0x8d]);
    raw.expect_closed();
}

#[test]
fn a_packet_over_max_packet_size_is_disconnect_0x95() {
    let broker = Broker::builder().config("max_packet_size = 100\n").start();
    let mut raw = raw_v5(broker.port, "big");
    raw.send(&publish_v5_qos1("big", 1, &[b'x'; 200]));
    assert_eq!(raw.expect_packet().bytes(), vec![0xe0, 1, 0x95]);
    raw.expect_closed();
}

#[test]
fn qos_2_past_max_awaiting_rel_gets_pubrec_0x97() {
    let broker = Broker::builder().config("max_awaiting_rel = 1\n").start();
    let mut raw = raw_v5(broker.port, "hoarder");
    for (id, expected) in [(1u8, vec![0x50, 2, 0, 1]), (2, vec![0x50, 3, 0, 2, 0x97])] {
        let mut body = string(b"q2");
        body.extend([0, id, 0, b'x']);
        raw.send(&packet(0x34, &body));
        assert_eq!(raw.expect_packet().bytes(), expected);
    }
}

#[test]
fn shutdown_tells_v5_clients_0x8b() {
    let mut broker = Broker::start();
    let mut raw = raw_v5(broker.port, "stayer");
    broker.signal(libc::SIGTERM);
    assert_eq!(raw.expect_packet().bytes(), vec![0xe0, 1, 0x8b]);
    raw.expect_closed();
    broker.wait_exit(WAIT).expect("the broker exits");
}

#[test]
fn a_pubrel_for_an_unknown_packet_id_gets_pubcomp_0x92() {
    let broker = Broker::start();
    let mut raw = raw_v5(broker.port, "releaser");
    raw.send(&[0x62, 2, 0, 9]);
    assert_eq!(raw.expect_packet().bytes(), vec![0x70, 3, 0, 9, 0x92]);
    let mut body = string(b"q2");
    body.extend([0, 10, 0, b'x']);
    raw.send(&packet(0x34, &body));
    assert_eq!(raw.expect_packet().bytes(), vec![0x50, 2, 0, 10]);
    raw.send(&[0x62, 2, 0, 10]);
    assert_eq!(raw.expect_packet().bytes(), vec![0x70, 2, 0, 10]);
}

#[test]
fn a_publish_to_a_wildcard_topic_is_disconnect_0x90() {
    let broker = Broker::start();
    let mut raw = raw_v5(broker.port, "wild");
    let mut body = string(b"a/+");
    body.push(0);
    raw.send(&packet(0x30, &body));
    assert_eq!(raw.expect_packet().bytes(), vec![0xe0, 1, 0x90]);
    raw.expect_closed();
}

/// A clean-start client asking for Response Information (or not).
fn connect_asking_response_information(port: u16, client_id: &str, ask: bool) -> (V5, ConnAck) {
    let mut options = V5::options(port, client_id);
    options.set_request_response_info(ask.then_some(1));
    V5::connect_with(options)
}

/// The Response Information of a CONNACK.
fn response_information(connack: &ConnAck) -> Option<String> {
    connack
        .properties
        .as_ref()
        .and_then(|p| p.response_information.clone())
}

#[test]
fn response_information_only_when_asked_for_and_configured() {
    let broker = Broker::builder()
        .config("response_information = \"reply/%c/\"\n")
        .start();
    let (_asks, connack) = connect_asking_response_information(broker.port, "rr-asks", true);
    assert_eq!(
        response_information(&connack).as_deref(),
        Some("reply/rr-asks/")
    );
    let (_silent, connack) = connect_asking_response_information(broker.port, "rr-silent", false);
    assert_eq!(response_information(&connack), None, "not asked for");
    let plain = Broker::start();
    let (_asks, connack) = connect_asking_response_information(plain.port, "rr-asks", true);
    assert_eq!(response_information(&connack), None, "not configured");
}

#[test]
fn a_request_and_its_response_carry_response_topic_and_correlation_data_across_shards() {
    let broker = Broker::builder()
        .config("response_information = \"reply/%c/\"\n")
        .start();
    let (mut requester, connack) = connect_asking_response_information(broker.port, "req-1", true);
    let base = response_information(&connack).expect("Response Information");
    let response_topic = format!("{base}answer");
    requester.subscribe(&response_topic, QoS5::AtLeastOnce);
    // The responder on the other shard.
    let requester_shard = broker.shard_of("req-1");
    let mut responder = (0..16)
        .find_map(|i| {
            let id = format!("svc-{i}");
            let client = V5::connect(broker.port, &id);
            (broker.shard_of(&id) != requester_shard).then_some(client)
        })
        .expect("a responder on the other shard");
    responder.subscribe("svc/request", QoS5::AtLeastOnce);
    let request = PublishProperties {
        response_topic: Some(response_topic.clone()),
        correlation_data: Some(Bytes::from_static(b"id-42")),
        ..Default::default()
    };
    requester
        .client
        .publish_with_properties(
            "svc/request",
            QoS5::AtLeastOnce,
            false,
            b"2+2".to_vec(),
            request,
        )
        .expect("publish");
    let got = responder.expect_publish();
    let props = got.properties.expect("request properties");
    let reply_to = props.response_topic.expect("Response Topic");
    assert_eq!(reply_to, response_topic);
    assert_eq!(props.correlation_data.as_deref(), Some(&b"id-42"[..]));
    let response = PublishProperties {
        correlation_data: props.correlation_data,
        ..Default::default()
    };
    responder
        .client
        .publish_with_properties(reply_to, QoS5::AtLeastOnce, false, b"4".to_vec(), response)
        .expect("publish");
    let answer = requester.expect_publish();
    assert_eq!(topic_of(&answer), response_topic);
    assert_eq!(&answer.payload[..], b"4");
    let props = answer.properties.expect("response properties");
    assert_eq!(props.correlation_data.as_deref(), Some(&b"id-42"[..]));
}
