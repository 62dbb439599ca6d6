//! Publish/subscribe basics, filters, shards, ordering and `$SYS`.

use std::collections::HashMap;
use std::time::Instant;

use rumqttc::{QoS, SubscribeReasonCode};

use crate::common::*;

#[test]
fn publish_subscribe_at_qos_0_1_2() {
    let broker = Broker::start();
    let mut sub = Mqtt::connect(broker.port, "sub");
    let publisher = Mqtt::connect(broker.port, "pub");
    for (topic, qos) in [
        ("t/0", QoS::AtMostOnce),
        ("t/1", QoS::AtLeastOnce),
        ("t/2", QoS::ExactlyOnce),
    ] {
        assert_eq!(
            sub.subscribe(topic, qos),
            vec![SubscribeReasonCode::Success(qos)]
        );
    }
    for (topic, qos) in [
        ("t/0", QoS::AtMostOnce),
        ("t/1", QoS::AtLeastOnce),
        ("t/2", QoS::ExactlyOnce),
    ] {
        publisher.publish(topic, qos, false, topic.as_bytes());
        let p = sub.expect_publish();
        assert_eq!(p.topic, topic);
        assert_eq!(p.qos, qos);
        assert_eq!(&p.payload[..], topic.as_bytes());
        assert!(!p.retain);
        assert!(!p.dup);
    }
}

#[test]
fn suback_grants_the_requested_qos() {
    let broker = Broker::start();
    let mut raw = Raw::connect(broker.port, "raw");
    assert_eq!(
        raw.subscribe(7, &[("a/0", 0), ("a/1", 1), ("a/2", 2)]),
        vec![0, 1, 2]
    );
    let mut client = Mqtt::connect(broker.port, "rumqttc");
    assert_eq!(
        client.subscribe_many(&[("b/1", QoS::AtLeastOnce), ("b/2", QoS::ExactlyOnce)]),
        vec![
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::ExactlyOnce)
        ]
    );
}

#[test]
fn unsubscribe_stops_delivery() {
    let broker = Broker::start();
    let mut sub = Mqtt::connect(broker.port, "sub");
    let publisher = Mqtt::connect(broker.port, "pub");
    sub.subscribe("u/a", QoS::AtLeastOnce);
    sub.subscribe("u/end", QoS::AtLeastOnce);
    publisher.publish("u/a", QoS::AtLeastOnce, false, b"before");
    assert_eq!(&sub.expect_publish().payload[..], b"before");
    sub.unsubscribe("u/a");
    publisher.publish("u/a", QoS::AtLeastOnce, false, b"after");
    publisher.publish("u/end", QoS::AtLeastOnce, false, b"marker");
    let got = sub.collect_until("u/end");
    assert_eq!(topics(&got), vec!["u/end"], "delivered after UNSUBSCRIBE");

    // Raw: UNSUBACK carries the packet id.
    let mut raw = Raw::connect(broker.port, "raw");
    raw.subscribe(1, &[("u/raw", 0)]);
    raw.send(&unsubscribe(0x1234, &[b"u/raw"]));
    assert_eq!(raw.expect_packet().bytes(), vec![0xb0, 2, 0x12, 0x34]);
}

#[test]
fn pingreq_gets_pingresp() {
    let broker = Broker::start();
    let mut raw = Raw::connect(broker.port, "pinger");
    for _ in 0..3 {
        raw.send(&PINGREQ);
        assert_eq!(raw.expect_packet().bytes(), PINGRESP);
    }
}

#[test]
fn single_and_multi_level_wildcards() {
    let broker = Broker::start();
    let mut plus = Mqtt::connect(broker.port, "plus");
    let mut hash = Mqtt::connect(broker.port, "hash");
    let publisher = Mqtt::connect(broker.port, "pub");
    plus.subscribe("w/+/x", QoS::AtLeastOnce);
    plus.subscribe("end", QoS::AtLeastOnce);
    hash.subscribe("w/a/#", QoS::AtLeastOnce);
    hash.subscribe("end", QoS::AtLeastOnce);
    for topic in [
        "w/a/x", "w/b/x", "w/a/y/z", "w/a", "w/b/y", "w/a/x/y", "x/a/x",
    ] {
        publisher.publish(topic, QoS::AtLeastOnce, false, b"m");
    }
    publisher.publish("end", QoS::AtLeastOnce, false, b"m");
    assert_eq!(
        topics(&plus.collect_until("end")),
        vec!["w/a/x", "w/b/x", "end"]
    );
    assert_eq!(
        topics(&hash.collect_until("end")),
        vec!["w/a/x", "w/a/y/z", "w/a", "w/a/x/y", "end"]
    );
}

#[test]
fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let broker = Broker::start();
    let mut wild = Mqtt::connect(broker.port, "wild");
    let mut dollar = Mqtt::connect(broker.port, "dollar");
    let publisher = Mqtt::connect(broker.port, "pub");
    wild.subscribe("#", QoS::AtLeastOnce);
    wild.subscribe("+/x", QoS::AtLeastOnce);
    wild.subscribe("+/+", QoS::AtLeastOnce);
    dollar.subscribe("$app/#", QoS::AtLeastOnce);
    dollar.subscribe("end/x", QoS::AtLeastOnce);
    publisher.publish("$app/x", QoS::AtLeastOnce, false, b"d");
    publisher.publish("end/x", QoS::AtLeastOnce, false, b"m");
    assert_eq!(
        topics(&dollar.collect_until("end/x")),
        vec!["$app/x", "end/x"]
    );
    assert_eq!(
        topics(&wild.collect_until("end/x")),
        vec!["end/x"],
        "a filter starting with a wildcard matched a $ topic"
    );
}

#[test]
fn overlapping_subscriptions_deliver_once_at_the_highest_qos() {
    let broker = Broker::start();
    let mut sub = Mqtt::connect(broker.port, "sub");
    let publisher = Mqtt::connect(broker.port, "pub");
    sub.subscribe("o/#", QoS::AtMostOnce);
    sub.subscribe("o/+", QoS::ExactlyOnce);
    sub.subscribe("o/x", QoS::AtLeastOnce);
    publisher.publish("o/x", QoS::ExactlyOnce, false, b"two");
    publisher.publish("o/x", QoS::AtLeastOnce, false, b"one");
    publisher.publish("o/end", QoS::AtLeastOnce, false, b"m");
    let got = sub.collect_until("o/end");
    let summary: Vec<(String, QoS, Vec<u8>)> = got
        .iter()
        .map(|p| (p.topic.clone(), p.qos, p.payload.to_vec()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("o/x".to_string(), QoS::ExactlyOnce, b"two".to_vec()),
            ("o/x".to_string(), QoS::AtLeastOnce, b"one".to_vec()),
            ("o/end".to_string(), QoS::AtLeastOnce, b"m".to_vec()),
        ]
    );
}

#[test]
fn qos_is_downgraded_to_the_granted_qos() {
    let broker = Broker::start();
    let mut raw = Raw::connect(broker.port, "raw-sub");
    assert_eq!(
        raw.subscribe(1, &[("d/0", 0), ("d/1", 1), ("d/2", 2)]),
        vec![0, 1, 2]
    );
    let publisher = Mqtt::connect(broker.port, "pub");
    for topic in ["d/0", "d/1", "d/2"] {
        publisher.publish(topic, QoS::ExactlyOnce, false, b"x");
    }
    let p0 = raw.expect_publish();
    assert_eq!((p0.topic.as_str(), p0.qos), ("d/0", 0));
    let p1 = raw.expect_publish();
    assert_eq!((p1.topic.as_str(), p1.qos), ("d/1", 1));
    raw.send(&ack(0x40, p1.packet_id));
    let p2 = raw.expect_publish();
    assert_eq!((p2.topic.as_str(), p2.qos), ("d/2", 2));

    // And a QoS 0 publish stays QoS 0 for a QoS 2 subscription.
    publisher.publish("d/2", QoS::AtMostOnce, false, b"y");
    raw.send(&ack(0x50, p2.packet_id));
    let mut next = raw.expect_packet();
    if next.kind() == 6 {
        assert_eq!(next.bytes(), ack(0x62, p2.packet_id));
        raw.send(&ack(0x70, p2.packet_id));
        next = raw.expect_packet();
    }
    let p = next.publish();
    assert_eq!(
        (p.topic.as_str(), p.qos, p.payload),
        ("d/2", 0, b"y".to_vec())
    );
}

#[test]
fn delivery_crosses_shards() {
    let broker = Broker::start();
    let publisher = Mqtt::connect(broker.port, "xs-pub");
    let pub_shard = broker.shard_of("xs-pub");
    let mut subs = connect_spread(&broker, "xs-sub", 16, 64);
    assert!(
        subs.iter().any(|(_, s)| *s != pub_shard),
        "no subscriber on a shard other than the publisher's"
    );
    for (sub, _) in subs.iter_mut() {
        sub.subscribe("xs/t", QoS::AtLeastOnce);
    }
    for i in 0..3u8 {
        publisher.publish("xs/t", QoS::AtLeastOnce, false, &[i]);
    }
    for (i, (sub, shard)) in subs.iter_mut().enumerate() {
        for n in 0..3u8 {
            let p = sub.recv_publish(TIMEOUT).unwrap_or_else(|| {
                panic!(
                    "subscriber {i} on shard {shard} missed message {n} (publisher on {pub_shard})"
                )
            });
            assert_eq!(&p.payload[..], &[n]);
        }
    }
}

#[test]
fn one_publisher_reaches_every_subscriber_in_order() {
    const COUNT: usize = 500;
    let broker = Broker::start();
    let mut subs = connect_spread(&broker, "ord-sub", 8, 64);
    for (sub, _) in subs.iter_mut() {
        sub.subscribe("ord/t", QoS::AtLeastOnce);
    }
    let publisher = Mqtt::connect(broker.port, "ord-pub");
    for i in 0..COUNT {
        publisher.publish("ord/t", QoS::AtLeastOnce, false, i.to_string().as_bytes());
    }
    for (n, (sub, shard)) in subs.iter_mut().enumerate() {
        for i in 0..COUNT {
            let p = sub.recv_publish(TIMEOUT).unwrap_or_else(|| {
                panic!("subscriber {n} (shard {shard}) got only {i} of {COUNT}")
            });
            assert_eq!(
                std::str::from_utf8(&p.payload).unwrap(),
                i.to_string(),
                "subscriber {n} (shard {shard}) out of order"
            );
        }
    }
}

#[test]
fn a_qos0_burst_in_one_write_reaches_every_subscriber_whole_and_in_order() {
    // 600 PUBLISH packets of ~700 bytes written at once: ~420 KiB, more
    // than the four 64 KiB reads one step takes, over two topics, so the
    // broker's runs of one topic end at a topic change, at a read's end
    // and at a step's end; subscribers on both shards.
    const COUNT: usize = 600;
    let broker = Broker::start();
    let mut subs = connect_spread(&broker, "qos0-burst-sub", 4, 64);
    for (sub, _) in subs.iter_mut() {
        sub.subscribe("burst/#", QoS::AtMostOnce);
    }
    let mut publisher = Raw::connect(broker.port, "qos0-burst-pub");
    let filler = vec![b'x'; 700];
    let mut burst = Vec::new();
    for i in 0..COUNT {
        // Runs of 50 per topic.
        let topic = if (i / 50) % 2 == 0 {
            "burst/a"
        } else {
            "burst/b"
        };
        let mut payload = i.to_string().into_bytes();
        payload.push(b' ');
        payload.extend_from_slice(&filler);
        burst.extend_from_slice(&publish(topic.as_bytes(), &payload, 0, false, false, 0));
    }
    publisher.send(&burst);
    for (n, (sub, shard)) in subs.iter_mut().enumerate() {
        for i in 0..COUNT {
            let p = sub.recv_publish(TIMEOUT).unwrap_or_else(|| {
                panic!("subscriber {n} (shard {shard}) got only {i} of {COUNT}")
            });
            let want = if (i / 50) % 2 == 0 {
                "burst/a"
            } else {
                "burst/b"
            };
            assert_eq!(p.topic, want, "subscriber {n} (shard {shard})");
            let text = String::from_utf8_lossy(&p.payload);
            assert_eq!(
                text.split(' ').next(),
                Some(i.to_string().as_str()),
                "subscriber {n} (shard {shard}) out of order"
            );
            assert_eq!(p.payload.len(), i.to_string().len() + 1 + filler.len());
        }
    }
    // The publisher is still served after its burst.
    publisher.ping();
}

/// Reads `$SYS` publishes into `latest` until `done` holds for it.
fn wait_sys(
    observer: &mut Mqtt,
    latest: &mut HashMap<String, String>,
    what: &str,
    done: impl Fn(&HashMap<String, String>) -> bool,
) {
    let deadline = Instant::now() + TIMEOUT;
    while !done(latest) {
        let left = deadline.saturating_duration_since(Instant::now());
        let p = observer
            .recv_publish(left)
            .unwrap_or_else(|| panic!("$SYS never showed {what}; last values: {latest:#?}"));
        latest.insert(
            p.topic.clone(),
            String::from_utf8_lossy(&p.payload).into_owned(),
        );
    }
}

#[test]
fn sys_topics_use_mosquitto_names_and_count_clients() {
    let broker = Broker::builder().config("sys_interval_secs = 1\n").start();
    let mut observer = Mqtt::connect(broker.port, "sys-observer");
    let observer_shard = broker.shard_of("sys-observer");
    observer.subscribe("$SYS/broker/#", QoS::AtMostOnce);
    // Enough clients that both shards hold some.
    let mut others = Vec::new();
    let mut shards = std::collections::HashSet::from([observer_shard]);
    for i in 0..64 {
        let id = format!("sys-client-{i}");
        others.push(Mqtt::connect(broker.port, &id));
        shards.insert(broker.shard_of(&id));
        if others.len() >= 3 && shards.len() == 2 {
            break;
        }
    }
    assert_eq!(shards.len(), 2);
    let connected = (others.len() + 1).to_string();
    let mut latest = HashMap::new();
    wait_sys(&mut observer, &mut latest, "all clients connected", |m| {
        m.get("$SYS/broker/clients/connected") == Some(&connected)
    });
    for topic in [
        "$SYS/broker/version",
        "$SYS/broker/uptime",
        "$SYS/broker/clients/total",
        "$SYS/broker/subscriptions/count",
        "$SYS/broker/messages/received",
        "$SYS/broker/publish/messages/received",
        "$SYS/broker/publish/messages/sent",
        "$SYS/broker/publish/messages/dropped",
        "$SYS/broker/bytes/received",
        "$SYS/broker/bytes/sent",
    ] {
        wait_sys(&mut observer, &mut latest, topic, |m| m.contains_key(topic));
    }
    assert!(latest["$SYS/broker/version"].starts_with("fanmq "));
    assert!(latest["$SYS/broker/uptime"].ends_with(" seconds"));
    let at_least = |topic: &'static str, n: u64| {
        move |m: &HashMap<String, String>| {
            m.get(topic)
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|v| v >= n)
        }
    };
    wait_sys(
        &mut observer,
        &mut latest,
        "the subscription",
        at_least("$SYS/broker/subscriptions/count", 1),
    );
    wait_sys(
        &mut observer,
        &mut latest,
        "bytes received",
        at_least("$SYS/broker/bytes/received", 1),
    );

    // Two clients leave: the count follows.
    let remaining = others.len() - 2;
    others.truncate(remaining);
    let connected = (remaining + 1).to_string();
    wait_sys(&mut observer, &mut latest, "two clients gone", |m| {
        m.get("$SYS/broker/clients/connected") == Some(&connected)
    });
}

#[test]
fn sys_topics_are_not_matched_by_leading_wildcards() {
    // One shard: the $SYS publish and the marker are ordered.
    let broker = Broker::builder()
        .shards(1)
        .config("sys_interval_secs = 1\n")
        .start();
    let mut wild = Mqtt::connect(broker.port, "wild");
    wild.subscribe("#", QoS::AtMostOnce);
    wild.subscribe("+/broker/#", QoS::AtMostOnce);
    let mut observer = Mqtt::connect(broker.port, "observer");
    observer.subscribe("$SYS/broker/uptime", QoS::AtMostOnce);
    // The retained value, then at least one live update after `wild` subscribed.
    observer.expect_publish();
    let live = observer.expect_publish();
    assert!(!live.retain, "live $SYS update should not carry RETAIN");
    wild.publish("end", QoS::AtLeastOnce, false, b"m");
    assert_eq!(topics(&wild.collect_until("end")), vec!["end"]);
}

#[test]
fn clients_cannot_publish_to_sys() {
    let broker = Broker::builder().shards(1).start();
    let mut client = Mqtt::connect(broker.port, "intruder");
    client.subscribe("$SYS/fake/#", QoS::AtLeastOnce);
    client.subscribe("end", QoS::AtLeastOnce);
    // Acknowledged (QoS 1 flow completes) but dropped.
    client.publish_acked("$SYS/fake/x", true, b"evil");
    client.publish("end", QoS::AtLeastOnce, false, b"m");
    assert_eq!(topics(&client.collect_until("end")), vec!["end"]);
    // Not stored as retained either: SUBACK, then PINGRESP, nothing between.
    let mut raw = Raw::connect(broker.port, "late");
    raw.subscribe(1, &[("$SYS/fake/#", 1)]);
    raw.ping();
}
