//! Parked connections (`src/park.rs`): idle plain-TCP clients hold no task
//! and wake through the shard's epoll watcher. Each test first waits until
//! the admin stats say the clients are parked, then checks that a parked
//! client behaves like any other: it gets every message, its PINGREQ,
//! SUBSCRIBE and UNSUBSCRIBE are answered, keep-alive, take-over, a vanishing
//! client's will and shutdown all still work.

use std::time::Duration;

use rumqttc::QoS;

use crate::admin::{total, wait_stats};
use crate::common::{
    Broker, CONNACK_OK, ConnectBuilder, Mqtt, Raw, ack, publish, subscribe, unique, unsubscribe,
};

/// Waits until at least `count` connections are parked.
fn wait_parked(broker: &Broker, count: u64) {
    wait_stats(broker, |s| total(s, "clients_parked") >= count);
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
        publisher.send(&publish(
            topic.as_bytes(),
            &[id],
            1,
            false,
            false,
            u16::from(id),
        ));
        assert_eq!(publisher.expect_packet().bytes(), ack(0x40, u16::from(id)));
    }
    let first = subscriber.expect_publish();
    let second = subscriber.expect_publish();
    assert_eq!((first.payload, second.payload), (vec![1], vec![2]));
    // The first PUBACK wakes it (through the watcher); it still owes the
    // second, so it stays in its task: only the publisher is parked.
    subscriber.send(&ack(0x40, first.packet_id));
    subscriber.ping();
    wait_stats(&broker, |s| total(s, "clients_parked") == 1);
    // Owing nothing, it parks again, and a parked subscriber still gets
    // the next message.
    subscriber.send(&ack(0x40, second.packet_id));
    subscriber.ping();
    wait_parked(&broker, 2);
    publisher.send(&publish(topic.as_bytes(), b"3", 1, false, false, 3));
    assert_eq!(publisher.expect_packet().bytes(), ack(0x40, 3));
    let third = subscriber.expect_publish();
    assert_eq!(third.payload, b"3");
    subscriber.send(&ack(0x40, third.packet_id));
    subscriber.ping();
    wait_parked(&broker, 2);
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
