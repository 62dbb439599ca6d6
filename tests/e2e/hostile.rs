//! Hostile clients: per-address and rate limits, subscription and topic
//! caps, client-id length, the queued-memory budget and slowloris cases.
//! Every test keeps a *witness* (a subscriber and a publisher connected
//! before the attack) and asserts it loses nothing, and that the broker is
//! still healthy afterwards.

use std::io::Write;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use rumqttc::QoS;

use crate::common::*;

/// A subscriber and a publisher that were there before the hostile client,
/// on a topic of their own.
struct Witness {
    subscriber: Mqtt,
    publisher: Mqtt,
    topic: String,
    /// Messages sent so far (each carries its sequence number).
    sent: usize,
}

impl Witness {
    fn new(port: u16) -> Witness {
        let n = unique();
        let topic = format!("witness/{n}");
        let mut subscriber = Mqtt::connect(port, &format!("witness-sub-{n}"));
        subscriber.subscribe(&topic, QoS::AtLeastOnce);
        let publisher = Mqtt::connect(port, &format!("witness-pub-{n}"));
        Witness {
            subscriber,
            publisher,
            topic,
            sent: 0,
        }
    }

    /// Publishes `count` QoS 1 messages and asserts every one arrives, in order.
    fn check(&mut self, count: usize) {
        let first = self.sent;
        for i in first..first + count {
            self.publisher.publish(
                &self.topic,
                QoS::AtLeastOnce,
                false,
                format!("{i}").as_bytes(),
            );
        }
        self.sent += count;
        for i in first..first + count {
            let p = self
                .subscriber
                .recv_publish(TIMEOUT)
                .unwrap_or_else(|| panic!("witness lost message {i}"));
            assert_eq!(p.topic, self.topic);
            assert_eq!(&p.payload[..], format!("{i}").as_bytes(), "out of order");
        }
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Connects from `source` and returns the client if CONNACK 0 came back,
/// None if the broker closed the socket without a word.
fn try_connect_from(port: u16, source: IpAddr, client_id: &str) -> Option<Raw> {
    let mut raw = Raw::tcp_from(port, source);
    raw.send_lossy(&ConnectBuilder::new(client_id).bytes());
    raw.accepted()
}

#[test]
fn connections_per_ip_are_capped_while_other_addresses_connect() {
    let mut broker = Broker::builder()
        .config("max_connections_per_ip = 3\nlimits_exempt_loopback = false\n")
        .start();
    // The witness comes from 127.0.0.1: an address of its own.
    let mut witness = Witness::new(broker.port);
    let mut held: Vec<Raw> = (0..3)
        .map(|i| {
            try_connect_from(broker.port, ip("127.0.0.2"), &format!("ip2-{i}"))
                .expect("within the per-address limit")
        })
        .collect();
    // The fourth from 127.0.0.2 is closed right after accept, without a word.
    let mut fourth = Raw::tcp_from(broker.port, ip("127.0.0.2"));
    fourth.send_lossy(&ConnectBuilder::new("ip2-3").bytes());
    fourth.expect_closed_silently();
    broker
        .wait_log(
            |l| l.contains("max_connections_per_ip (3) reached for 127.0.0.2"),
            TIMEOUT,
        )
        .expect("a log line for the refused connection");
    // Another address still gets in, and everyone already connected works.
    let mut other = try_connect_from(broker.port, ip("127.0.0.3"), "ip3").expect("other address");
    other.ping();
    for raw in held.iter_mut() {
        raw.ping();
    }
    witness.check(20);
    // A connection from 127.0.0.2 ends: its slot is free again.
    held.pop().unwrap().close();
    let deadline = Instant::now() + TIMEOUT;
    let mut again = loop {
        if let Some(raw) = try_connect_from(broker.port, ip("127.0.0.2"), "ip2-again") {
            break raw;
        }
        assert!(Instant::now() < deadline, "the slot was never freed");
        std::thread::sleep(Duration::from_millis(50));
    };
    again.ping();
    witness.check(20);
    broker.assert_healthy();
}

#[test]
fn connection_rate_is_limited_by_a_token_bucket() {
    // One shard: the whole rate and burst are its share.
    let mut broker = Broker::builder()
        .shards(1)
        .config(
            "max_connection_rate = 2\nconnection_rate_burst = 5\nlimits_exempt_loopback = false\n",
        )
        .start();
    // The witness is from loopback 127.0.0.1 too, so it spends 2 tokens.
    let mut witness = Witness::new(broker.port);
    let start = Instant::now();
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..30 {
        match try_connect_from(broker.port, ip("127.0.0.4"), &format!("rate-{i}")) {
            Some(raw) => accepted.push(raw),
            None => refused += 1,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // At most a full bucket (5: it may have refilled since the witness
    // connected) plus 2 per second since.
    let allowed = 5 + (2.0 * elapsed).ceil() as usize;
    assert!(
        accepted.len() <= allowed,
        "{} accepted in {elapsed:.2} s, at most {allowed} allowed",
        accepted.len()
    );
    assert!(refused > 0, "nothing refused");
    broker
        .wait_log(|l| l.contains("max_connection_rate reached"), TIMEOUT)
        .expect("a log line for the refused connections");
    witness.check(20);
    for raw in accepted.iter_mut() {
        raw.ping();
    }
    // The bucket refills: after a pause a new connection gets in.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        try_connect_from(broker.port, ip("127.0.0.5"), "after-pause").is_some(),
        "the bucket did not refill"
    );
    witness.check(20);
    broker.assert_running();
}

/// One address over `max_connection_rate_per_ip` is refused while another
/// address still connects: the per-address bucket stops one hostile source
/// without taking the listener's tokens from anyone else.
#[test]
fn connection_rate_per_address_refuses_one_address_while_another_connects() {
    // One shard: the whole per-address rate and burst are its share.
    let mut broker = Broker::builder()
        .shards(1)
        .config(
            "max_connection_rate_per_ip = 1\nconnection_rate_per_ip_burst = 3\nlimits_exempt_loopback = false\n",
        )
        .start();
    // The witness comes from 127.0.0.1: an address (and a bucket) of its own.
    let mut witness = Witness::new(broker.port);
    let start = Instant::now();
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..20 {
        match try_connect_from(broker.port, ip("127.0.0.6"), &format!("flood-{i}")) {
            Some(raw) => accepted.push(raw),
            None => refused += 1,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // At most its burst (3) plus 1 per second since it began.
    let allowed = 3 + elapsed.ceil() as usize;
    assert!(
        accepted.len() <= allowed,
        "{} accepted from one address in {elapsed:.2} s, at most {allowed} allowed",
        accepted.len()
    );
    assert!(refused > 0, "nothing refused");
    broker
        .wait_log(
            |l| l.contains("max_connection_rate_per_ip reached for 127.0.0.6"),
            TIMEOUT,
        )
        .expect("a log line for the refused connections");
    // Another address has its own bucket: its burst gets in at once.
    let mut others: Vec<Raw> = (0..3)
        .map(|i| {
            try_connect_from(broker.port, ip("127.0.0.7"), &format!("other-{i}"))
                .expect("another address still connects")
        })
        .collect();
    for raw in others.iter_mut().chain(accepted.iter_mut()) {
        raw.ping();
    }
    witness.check(20);
    broker.assert_healthy();
}

#[test]
fn subscriptions_per_client_are_capped() {
    let mut broker = Broker::builder()
        .config("max_subscriptions_per_client = 3\n")
        .start();
    let mut witness = Witness::new(broker.port);
    let mut greedy = Raw::connect(broker.port, "greedy");
    assert_eq!(
        greedy.subscribe(1, &[("g/1", 1), ("g/2", 0), ("g/3", 1), ("g/4", 1)]),
        vec![1, 0, 1, 0x80]
    );
    // Replacing an existing subscription is not a new one.
    assert_eq!(greedy.subscribe(2, &[("g/2", 1)]), vec![1]);
    assert_eq!(greedy.subscribe(3, &[("g/5", 0)]), vec![0x80]);
    // The granted ones work, the refused one does not exist.
    let publisher = Mqtt::connect(broker.port, "g-pub");
    publisher.publish("g/4", QoS::AtMostOnce, false, b"refused");
    publisher.publish("g/2", QoS::AtMostOnce, false, b"granted");
    let p = greedy.expect_publish();
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("g/2", &b"granted"[..]));
    // After an unsubscribe there is room again.
    greedy.send(&unsubscribe(4, &[b"g/1"]));
    assert_eq!(greedy.expect_packet().bytes(), ack(0xb0, 4));
    assert_eq!(greedy.subscribe(5, &[("g/4", 0)]), vec![0]);
    witness.check(20);
    broker.assert_healthy();
}

#[test]
fn topic_levels_are_capped() {
    let mut broker = Broker::builder().config("max_topic_levels = 4\n").start();
    let mut witness = Witness::new(broker.port);
    let mut deep = Raw::connect(broker.port, "deep");
    assert_eq!(
        deep.subscribe(1, &[("a/b/c/d", 0), ("a/b/c/d/e", 0), ("a/+/+/+/#", 0)]),
        vec![0, 0x80, 0x80]
    );
    // Four levels publish fine; five close the publisher's connection.
    deep.send(&publish(b"a/b/c/d", b"ok", 0, false, false, 0));
    assert_eq!(deep.expect_publish().payload, b"ok");
    deep.send_lossy(&publish(b"a/b/c/d/e", b"deep", 0, false, false, 0));
    deep.expect_closed_silently();
    // A will topic deeper than the limit refuses the CONNECT.
    let will = Raw::send_connect(
        broker.port,
        &ConnectBuilder::new("deep-will").will("w/x/y/z/deep", b"", 0, false),
    );
    will.expect_closed_silently();
    witness.check(20);
    broker.assert_healthy();
}

#[test]
fn long_client_ids_get_connack_identifier_rejected() {
    let mut broker = Broker::builder().config("max_client_id_len = 30\n").start();
    let mut witness = Witness::new(broker.port);
    let (long, connack) = Raw::connect_with(broker.port, &ConnectBuilder::new(&"x".repeat(31)));
    assert_eq!(connack, [0x20, 2, 0, 2], "CONNACK 2, identifier rejected");
    long.expect_closed_silently();
    let mut ok = Raw::connect(broker.port, &"y".repeat(30));
    ok.ping();
    witness.check(20);
    broker.assert_healthy();
}

#[test]
fn default_client_id_limit_is_256_bytes() {
    let mut broker = Broker::start();
    let (long, connack) = Raw::connect_with(broker.port, &ConnectBuilder::new(&"x".repeat(257)));
    assert_eq!(connack, [0x20, 2, 0, 2]);
    long.expect_closed_silently();
    Raw::connect(broker.port, &"y".repeat(256)).ping();
    broker.assert_healthy();
}

#[test]
fn half_open_sockets_are_closed_and_others_unaffected() {
    let mut broker = Broker::builder()
        .config("connect_timeout_secs = 1\n")
        .start();
    let mut witness = Witness::new(broker.port);
    // Many sockets that connect and then say nothing.
    let silent: Vec<Raw> = (0..200).map(|_| Raw::tcp(broker.port)).collect();
    // A client past CONNECT that vanishes without a FIN (the peer host
    // died): keep-alive 1 s, then nothing; its will tells the witness.
    let mut watcher = Mqtt::connect(broker.port, "half-open-watcher");
    watcher.subscribe("half-open/will", QoS::AtLeastOnce);
    let mut vanished = Raw::connect_with(
        broker.port,
        &ConnectBuilder::new("vanished")
            .keep_alive(1)
            .will("half-open/will", b"gone", 1, false),
    )
    .0;
    vanished.ping();
    witness.check(50);
    for raw in silent {
        raw.expect_closed_silently();
    }
    let will = watcher.expect_publish();
    assert_eq!(&will.payload[..], b"gone");
    vanished.expect_closed_silently();
    witness.check(50);
    broker.assert_healthy();
}

#[test]
fn connect_sent_one_byte_per_second_is_closed_at_the_connect_timeout() {
    let mut broker = Broker::builder()
        .config("connect_timeout_secs = 2\n")
        .start();
    let mut witness = Witness::new(broker.port);
    let port = broker.port;
    let trickler = std::thread::spawn(move || {
        let mut raw = Raw::tcp(port);
        let connect = ConnectBuilder::new("trickle").bytes();
        let start = Instant::now();
        let mut sent = 0;
        for byte in &connect {
            if raw.stream.write_all(&[*byte]).is_err() {
                break;
            }
            sent += 1;
            // Each byte alone: the broker must not restart its clock.
            std::thread::sleep(Duration::from_secs(1));
            raw.stream
                .set_read_timeout(Some(Duration::from_millis(1)))
                .unwrap();
            let mut buf = [0u8; 8];
            match std::io::Read::read(&mut raw.stream, &mut buf) {
                Ok(0) => break,
                Ok(n) => panic!("broker answered a partial CONNECT: {:?}", &buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        (start.elapsed(), sent, connect.len())
    });
    // Meanwhile every other client is served.
    while !trickler.is_finished() {
        witness.check(5);
        std::thread::sleep(Duration::from_millis(100));
    }
    let (elapsed, sent, total) = trickler.join().unwrap();
    assert!(sent < total, "the whole CONNECT got through ({sent} bytes)");
    assert!(
        elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(6),
        "closed after {elapsed:?}, expected at the 2 s connect timeout"
    );
    witness.check(20);
    broker.assert_healthy();
}

/// Publishes `total` QoS 1 messages of `size` bytes (numbered in their first
/// 8 bytes) to `topic`, in batches of `batch`, and checks that `reader`
/// gets every one, in order, before the next batch goes out.
fn publish_and_read_in_order(
    publisher: &Mqtt,
    reader: &mut Mqtt,
    topic: &str,
    (total, batch, size): (usize, usize, usize),
) {
    let mut payload = vec![b'.'; size];
    for start in (0..total).step_by(batch) {
        let end = (start + batch).min(total);
        for i in start..end {
            payload[..8].copy_from_slice(format!("{i:08}").as_bytes());
            publisher.publish(topic, QoS::AtLeastOnce, false, &payload);
        }
        for i in start..end {
            let p = reader
                .recv_publish(TIMEOUT)
                .unwrap_or_else(|| panic!("reader stuck at message {i}"));
            assert_eq!(
                &p.payload[..8],
                format!("{i:08}").as_bytes(),
                "out of order"
            );
        }
    }
}

#[test]
fn never_reading_subscriber_is_shed_while_a_reader_gets_all_10k() {
    const TOTAL: usize = 10_000;
    let mut broker = Broker::start();
    let mut stalled = Raw::connect(broker.port, "never-reads");
    assert_eq!(stalled.subscribe(1, &[("flood/10k", 0)]), vec![0]);
    // Its kernel receive buffer as small as it goes, so the kernel cannot
    // hold all 10 MiB for it.
    socket2::SockRef::from(&stalled.stream)
        .set_recv_buffer_size(4096)
        .unwrap();
    let mut reader = Mqtt::connect(broker.port, "reads");
    reader.subscribe("flood/10k", QoS::AtLeastOnce);
    let publisher = Mqtt::connect(broker.port, "flood-pub");
    let rss_before = vm_rss_kib(broker.pid());
    publish_and_read_in_order(&publisher, &mut reader, "flood/10k", (TOTAL, 500, 1024));
    // 10 MiB went to the non-reader; the broker holds at most its queue
    // limit (1 MiB) and the kernel the socket buffers.
    let grown = vm_rss_kib(broker.pid()).saturating_sub(rss_before);
    assert!(grown < 16 * 1024, "broker RSS grew by {grown} KiB");
    // The non-reader was shed: it got far fewer than the 10k messages.
    let mut got = 0;
    while let Ok(Some(p)) = stalled.read_packet(Duration::from_millis(500)) {
        if p.kind() == 3 {
            got += 1;
        }
    }
    assert!(got < TOTAL, "the non-reader got all {got}");
    broker.assert_healthy();
}

#[test]
fn queued_memory_budget_disconnects_non_readers_first() {
    const TOTAL: usize = 4000;
    // 1 MiB for the whole broker (512 KiB per shard); each client may queue
    // 8 MiB, so it is the budget, not the client's limit, that acts.
    let mut broker = Broker::builder()
        .config(
            "max_queued_bytes_total = 1048576\nmax_queued_bytes = 8388608\nmax_queued_messages = 100000\nsys_interval_secs = 1\n",
        )
        .start();
    let stalled: Vec<Raw> = (0..2)
        .map(|i| {
            let mut raw = Raw::connect(broker.port, &format!("budget-stalled-{i}"));
            assert_eq!(raw.subscribe(1, &[("budget/t", 0)]), vec![0]);
            // Its kernel receive buffer as small as it goes.
            socket2::SockRef::from(&raw.stream)
                .set_recv_buffer_size(4096)
                .unwrap();
            raw
        })
        .collect();
    let mut reader = Mqtt::connect(broker.port, "budget-reader");
    reader.subscribe("budget/t", QoS::AtLeastOnce);
    let publisher = Mqtt::connect(broker.port, "budget-pub");
    publish_and_read_in_order(&publisher, &mut reader, "budget/t", (TOTAL, 200, 4096));
    // Both non-readers were disconnected; the reader was not.
    for raw in stalled {
        raw.expect_closed();
    }
    broker
        .wait_log(
            |l| l.contains("over its share of max_queued_bytes_total"),
            TIMEOUT,
        )
        .expect("a shed log line");
    let mut sys = Mqtt::connect(broker.port, "budget-sys");
    sys.subscribe("$SYS/broker/clients/shed", QoS::AtMostOnce);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let p = sys.recv_publish(left).expect("no shed count");
        let shed: u64 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
        if shed >= 2 {
            break;
        }
    }
    reader.publish("budget/t", QoS::AtLeastOnce, false, b"still here");
    assert_eq!(&reader.expect_publish().payload[..], b"still here");
    broker.assert_healthy();
}

#[test]
fn publishes_to_own_subscription_in_one_read_do_not_stall_the_shard() {
    // Regression (found by the `session` fuzz target): acknowledgements
    // between two QoS 0 deliveries of one step left a batch range unsealed
    // and the shard looped forever in its write.
    let mut broker = Broker::builder().shards(1).start();
    let mut witness = Witness::new(broker.port);
    let mut echo = Raw::connect(broker.port, "echo");
    assert_eq!(echo.subscribe(1, &[("echo/t", 0)]), vec![0]);
    let mut both = publish(b"echo/t", b"one", 1, false, false, 1);
    both.extend(publish(b"echo/t", b"two", 1, false, false, 2));
    echo.send(&both);
    let mut acks = Vec::new();
    let mut payloads = Vec::new();
    for _ in 0..4 {
        let p = echo.expect_packet();
        match p.kind() {
            4 => acks.push(p.bytes()),
            3 => payloads.push(p.publish().payload),
            other => panic!("unexpected packet type {other}"),
        }
    }
    assert_eq!(acks, vec![ack(0x40, 1), ack(0x40, 2)]);
    assert_eq!(payloads, vec![b"one".to_vec(), b"two".to_vec()]);
    witness.check(20);
    broker.assert_healthy();
}
