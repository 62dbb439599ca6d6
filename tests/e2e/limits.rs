//! Limits, back-pressure, resource exhaustion and shutdown.

use std::time::{Duration, Instant};

use rumqttc::QoS;

use crate::common::*;

#[test]
fn packet_over_max_packet_size_closes_the_connection() {
    let mut broker = Broker::builder().config("max_packet_size = 1024\n").start();
    let mut raw = Raw::connect(broker.port, "big");
    // Just under the limit is fine.
    raw.send(&publish(b"big/t", &[b'x'; 900], 1, false, false, 1));
    assert_eq!(raw.expect_packet().bytes(), ack(0x40, 1));
    raw.send_lossy(&publish(b"big/t", &[b'x'; 2000], 1, false, false, 2));
    raw.expect_closed_silently();
    broker.assert_healthy();
}

#[test]
fn socket_that_never_sends_connect_is_closed() {
    let mut broker = Broker::builder()
        .config("connect_timeout_secs = 1\n")
        .start();
    let start = Instant::now();
    let silent = Raw::tcp(broker.port);
    silent.expect_closed_silently();
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "closed after {elapsed:?}, before the connect timeout"
    );
    // Half a CONNECT is not a CONNECT either.
    let mut partial = Raw::tcp(broker.port);
    partial.send(&ConnectBuilder::new("slowpoke").bytes()[..5]);
    partial.expect_closed_silently();
    broker.assert_healthy();
}

#[test]
fn max_connections_refuses_the_next_one() {
    let broker = Broker::builder().config("max_connections = 5\n").start();
    let mut clients: Vec<Raw> = (0..5)
        .map(|i| Raw::connect(broker.port, &format!("c{i}")))
        .collect();
    let mut sixth = Raw::tcp(broker.port);
    sixth.send_lossy(&ConnectBuilder::new("c5").bytes());
    sixth.expect_closed_silently();
    for client in clients.iter_mut() {
        client.ping();
    }
    // One leaves: a new client gets in once the broker has noticed.
    clients.pop().unwrap().close();
    let deadline = Instant::now() + TIMEOUT;
    let mut replacement = loop {
        let mut raw = Raw::send_connect(broker.port, &ConnectBuilder::new("c6"));
        match raw.read_packet(TIMEOUT) {
            Ok(Some(p)) => {
                assert_eq!(p.bytes(), CONNACK_OK);
                break raw;
            }
            Ok(None) => panic!("no CONNACK and no close"),
            Err(_) => assert!(Instant::now() < deadline, "slot never freed"),
        }
    };
    replacement.ping();
}

#[test]
fn slow_subscriber_does_not_hold_back_others() {
    const TOTAL: usize = 5000;
    const BATCH: usize = 500;
    let broker = Broker::builder()
        .config("sys_interval_secs = 1\nmax_queued_messages = 2000\nmax_queued_bytes = 16777216\n")
        .start();
    // Subscribes, then never reads nor acknowledges anything.
    let mut slow = Raw::connect(broker.port, "slow");
    assert_eq!(slow.subscribe(1, &[("flood/t", 1)]), vec![1]);
    let mut healthy = Mqtt::connect(broker.port, "healthy");
    healthy.subscribe("flood/t", QoS::AtLeastOnce);
    let publisher = Mqtt::connect(broker.port, "flooder");
    let mut payload = vec![b'.'; 1024];
    for start in (0..TOTAL).step_by(BATCH) {
        for i in start..start + BATCH {
            payload[..8].copy_from_slice(format!("{i:08}").as_bytes());
            publisher.publish("flood/t", QoS::AtLeastOnce, false, &payload);
        }
        for i in start..start + BATCH {
            let p = healthy
                .recv_publish(TIMEOUT)
                .unwrap_or_else(|| panic!("healthy subscriber stuck at message {i}"));
            assert_eq!(&p.payload[..8], format!("{i:08}").as_bytes());
            assert_eq!(p.payload.len(), 1024);
        }
    }
    let mut sys = Mqtt::connect(broker.port, "sys");
    sys.subscribe("$SYS/broker/publish/messages/dropped", QoS::AtMostOnce);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let p = sys
            .recv_publish(left)
            .expect("dropped count never became positive");
        let dropped: u64 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
        if dropped > 0 {
            assert!(dropped <= TOTAL as u64, "dropped {dropped}");
            break;
        }
    }
    drop(slow);
}

#[test]
fn running_out_of_file_descriptors_is_survived() {
    let mut broker = Broker::builder().nofile(64).start();
    let mut sockets = Vec::new();
    for i in 0..100 {
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", broker.port)) else {
            continue;
        };
        use std::io::Write;
        let _ = stream.write_all(&ConnectBuilder::new(&format!("fd{i}")).bytes());
        sockets.push(stream);
    }
    broker
        .wait_log(|l| l.contains("out of file descriptors"), TIMEOUT)
        .unwrap_or_else(|| panic!("no EMFILE warning:\n{}", broker.log_text()));
    broker.assert_running();
    // Not spinning while out of descriptors: well under one core's worth.
    let cpu = cpu_seconds(broker.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_seconds(broker.pid()) - cpu;
    assert!(
        used < 0.5,
        "broker used {used:.2} s of CPU in 1 s while out of fds"
    );
    broker.assert_running();
    drop(sockets);
    // Recovery: once descriptors are free again, clients get in.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let options = Mqtt::options(broker.port, "after");
        match Mqtt::try_connect(options) {
            Ok((mut client, _)) => {
                client.subscribe("fd/t", QoS::AtLeastOnce);
                client.publish("fd/t", QoS::AtLeastOnce, false, b"back");
                assert_eq!(&client.expect_publish().payload[..], b"back");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no recovery: {e}"),
        }
    }
    broker.assert_healthy();
}

/// User plus system CPU seconds of process `pid`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // Fields 14 and 15 (utime, stime), counted from the state (field 3).
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn sigterm_exits_zero_within_5_seconds() {
    let mut broker = Broker::start();
    let mut client = Raw::connect(broker.port, "bystander");
    client.ping();
    broker.signal(libc::SIGTERM);
    let status = broker
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running 5 s after SIGTERM:\n{}", broker.log_text()));
    assert!(status.success(), "exit status {status}");
    expect_closed(&mut client.stream);
}
