//! The load generator behaves like the clients users run (shared/BENCH.md,
//! "Behave like the clients users run"), checked on the wire against a
//! scripted broker in this test: one subscriber, `idle` scenario, loopback.
//!
//! - By default CONNECT and SUBSCRIBE arrive before any CONNACK is sent;
//!   `--handshake sequential` sends SUBSCRIBE only after CONNACK.
//! - By default every PUBACK is its own write (its own TCP data segment,
//!   counted by the kernel in `tcpi_data_segs_in` on our end);
//!   `--coalesce-acks` writes the acks of one read together.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BENCH: &str = env!("CARGO_BIN_EXE_fanmq-bench");

/// QoS 1 publishes the scripted broker sends in one write.
const PUBLISHES: u16 = 20;

/// How long the script waits for a SUBSCRIBE before it sends CONNACK: far
/// more than a pipelined client needs (both are one write).
const EARLY_SUBSCRIBE_WAIT: Duration = Duration::from_millis(500);

/// The bench process, killed when the test ends, passing or not.
struct Bench(Child);

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the scripted broker saw.
struct Seen {
    /// SUBSCRIBE arrived before CONNACK was sent.
    subscribe_before_connack: bool,
    /// TCP data segments that carried the PUBLISHES acknowledgements.
    ack_segments: u32,
}

/// Reads one whole MQTT packet (fixed header, remaining length < 128);
/// `None` on timeout.
fn read_packet(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).ok()?;
    assert!(head[1] < 128, "the bench's handshake packets are short");
    let mut body = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut body).ok()?;
    let mut p = head.to_vec();
    p.extend_from_slice(&body);
    Some(p)
}

/// Data segments received so far on `s` (`tcpi_data_segs_in`).
fn data_segs_in(s: &TcpStream) -> u32 {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket and a buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO");
    info.tcpi_data_segs_in
}

/// Runs one QoS 1 subscriber (`idle`, plus `extra`) against the script.
fn run(extra: &[&str]) -> Seen {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port().to_string();
    let mut args = vec![
        "idle", "--port", &port, "--subs", "1", "--qos", "1", "--hold", "2",
    ];
    args.extend_from_slice(extra);
    let _bench = Bench(
        Command::new(BENCH)
            .args(&args)
            .stdout(Stdio::null())
            .spawn()
            .expect("running fanmq-bench"),
    );
    let (mut s, _) = listener.accept().expect("accept");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let connect = read_packet(&mut s).expect("CONNECT");
    assert_eq!(connect[0] >> 4, 1, "CONNECT first");
    s.set_read_timeout(Some(EARLY_SUBSCRIBE_WAIT)).unwrap();
    let early = read_packet(&mut s);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[0x20, 2, 0, 0]).unwrap(); // CONNACK, accepted
    let subscribe = match early.clone() {
        Some(p) => p,
        None => read_packet(&mut s).expect("SUBSCRIBE after CONNACK"),
    };
    assert_eq!(subscribe[0], 0x82, "SUBSCRIBE");
    s.write_all(&[0x90, 3, subscribe[2], subscribe[3], 1])
        .unwrap(); // SUBACK, QoS 1 granted
    // Give the client time to read SUBACK, then send every publish at once.
    std::thread::sleep(Duration::from_millis(200));
    let before = data_segs_in(&s);
    let topic = b"bench/fanout";
    let mut burst = Vec::new();
    for id in 1..=PUBLISHES {
        burst.extend_from_slice(&[0x32, (2 + topic.len() + 2 + 16) as u8, 0]);
        burst.push(topic.len() as u8);
        burst.extend_from_slice(topic);
        burst.extend_from_slice(&id.to_be_bytes());
        burst.extend_from_slice(&[0u8; 16]);
    }
    s.write_all(&burst).unwrap();
    let mut acks = vec![0u8; 4 * usize::from(PUBLISHES)];
    s.read_exact(&mut acks)
        .expect("every PUBACK within the read timeout");
    for (k, ack) in acks.chunks(4).enumerate() {
        let id = (k + 1) as u16;
        assert_eq!(ack, [0x40, 2, (id >> 8) as u8, id as u8], "PUBACK {id}");
    }
    Seen {
        subscribe_before_connack: early.is_some(),
        ack_segments: data_segs_in(&s) - before,
    }
}

#[test]
fn pipelined_handshake_and_one_write_per_ack_by_default() {
    let seen = run(&[]);
    assert!(
        seen.subscribe_before_connack,
        "SUBSCRIBE waited for CONNACK"
    );
    // One segment per ack; a few may merge in the kernel (autocorking),
    // never most of them.
    assert!(
        seen.ack_segments >= u32::from(PUBLISHES) / 2,
        "{} segments for {PUBLISHES} acks",
        seen.ack_segments
    );
}

#[test]
fn sequential_handshake_and_coalesced_acks_on_request() {
    let seen = run(&["--handshake", "sequential", "--coalesce-acks"]);
    assert!(!seen.subscribe_before_connack, "SUBSCRIBE before CONNACK");
    // All publishes came in one write: one or two reads, one write each.
    assert!(
        seen.ack_segments <= 3,
        "{} segments for {PUBLISHES} coalesced acks",
        seen.ack_segments
    );
}
