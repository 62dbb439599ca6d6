//! Fuzzing entry points (the `cargo fuzz` targets in `fuzz/` call these),
//! kept in the crate so that they can drive crate-private code and so that
//! `cargo test` replays the committed corpus as regression tests.
//!
//! - [`decode`]: the packet decoder on arbitrary bytes, whole and split into
//!   arbitrary chunks: it never panics, both ways give the same packets and
//!   the same error, and every decoded packet consumed exactly the frame
//!   length its fixed header announced.
//! - [`session`]: a shard with a few clients, driven by an arbitrary
//!   sequence of operations: bytes from a client (decoded and acted on
//!   exactly as a connection does), broker publishes, each step ended by a
//!   flush into real (non-blocking, socketpair) sockets that may be full,
//!   writes when a full socket drains, reads by the peers, disconnects. It never panics, and after every step the shard's
//!   queued-byte count ([`crate::session::outqueue::shard_queued_bytes`]) equals the
//!   sum of its queues.
//! - [`proxy_header`]: the PROXY protocol header parser on arbitrary bytes
//!   (the checks are its own, [`crate::net::proxy::check_parse`]).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;

use crate::config::Config;
use crate::connection;
use crate::protocol::Version;
use crate::protocol::message::Message;
use crate::protocol::v3::{self as codec, QoS};
use crate::security::auth::Auth;
use crate::session::Session;
use crate::session::link::Link;
use crate::session::outqueue::{self, Flushed};
use crate::shard::{SessionKey, Shard};

/// Largest packet the decode target allows, so that large announced
/// lengths meet both "too large" and "incomplete".
const FUZZ_MAX_PACKET_SIZE: usize = 4096;

/// Clients of the session target's shard.
const CLIENTS: usize = 4;

/// Topics the session target publishes to and subscribes with, so that the
/// random traffic actually matches.
const TOPICS: [&str; 6] = ["a", "a/b", "a/+", "#", "a/b/c", "$SYS/x"];

/// Runs the decode target on `data` (see the module doc).
///
/// # Panics
/// When the decoder breaks one of its promises (that is the point).
pub fn decode(data: &[u8]) {
    let Some((&split_seed, stream)) = data.split_first() else {
        return;
    };
    let max = 2 + usize::from(split_seed) * 16;
    let max = max.min(FUZZ_MAX_PACKET_SIZE);
    let whole = decode_all(stream, max, |_| stream.len());
    // The same bytes arriving in chunks of 1 to 8 bytes.
    let split = decode_all(stream, max, |at| 1 + (at * 7 + usize::from(split_seed)) % 8);
    assert_eq!(whole, split, "split stream decoded differently");
}

/// Decodes `stream` as it arrives in chunks of `chunk(at)` bytes, until an
/// error; returns the packets (as debug text) and the error.
fn decode_all(
    stream: &[u8],
    max: usize,
    chunk: impl Fn(usize) -> usize,
) -> (Vec<String>, Option<String>) {
    let mut buf = BytesMut::new();
    let mut at = 0;
    let mut packets = Vec::new();
    loop {
        let before = buf.len();
        let announced = codec::peek_frame_len(&buf, max);
        match codec::decode(&mut buf, max) {
            Ok(Some(packet)) => {
                let frame = announced.ok().flatten().unwrap_or(usize::MAX);
                assert_eq!(before - buf.len(), frame, "consumed bytes");
                packets.push(format!("{packet:?}"));
                continue;
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "an incomplete packet consumed bytes");
            }
            Err(e) => return (packets, Some(format!("{e:?}"))),
        }
        if at >= stream.len() {
            return (packets, None);
        }
        let n = chunk(at).clamp(1, stream.len() - at);
        buf.extend_from_slice(&stream[at..at + n]);
        at += n;
    }
}

/// One client of the session target.
struct Client {
    /// Its session's key and its connection id, while connected.
    key: SessionKey,
    conn_id: u64,
    /// Bytes received and not yet decoded.
    rx: BytesMut,
    /// The broker's end of the socket pair (the session writes here).
    broker_end: OwnedFd,
    /// The client's end, read by the "peer reads" operation.
    peer_end: OwnedFd,
}

/// Runs the session target on `data` (see the module doc).
///
/// # Panics
/// When the shard's accounting breaks (that is the point).
pub fn session(data: &[u8]) {
    run_session(data);
}

/// [`session`], returning the shard's counters at the end.
fn run_session(data: &[u8]) -> crate::observe::counters::Counters {
    let base = outqueue::shard_queued_bytes();
    let stats = {
        let config = Config {
            max_inflight_messages: 2,
            max_queued_messages: 8,
            max_queued_bytes: 2048,
            max_awaiting_rel: 2,
            max_subscriptions_per_client: 3,
            max_topic_levels: 3,
            max_packet_size: 1024,
            // A small budget, so that shedding happens too.
            max_queued_bytes_total: 1024,
            ..Config::default()
        };
        let mut shard = Shard::new(0, 1, Arc::new(config), Arc::new(Auth::open()));
        let mut clients: Vec<Option<Client>> = (0..CLIENTS).map(|_| None).collect();
        let mut ops = data.iter().copied();
        while let Some(op) = ops.next() {
            let i = usize::from(op >> 4) % CLIENTS;
            match op & 0x0f {
                0 => connect(&mut shard, &mut clients[i], i, op & 0x80 != 0),
                1 => {
                    let len = usize::from(ops.next().unwrap_or(0) % 64);
                    let bytes: Vec<u8> = ops.by_ref().take(len).collect();
                    feed(&mut shard, &mut clients[i], &bytes);
                }
                2 => {
                    let topic = TOPICS[usize::from(ops.next().unwrap_or(0)) % TOPICS.len()];
                    let qos = ops.next().unwrap_or(0);
                    shard.publish(Message {
                        topic: ByteString::from_static(topic),
                        payload: Bytes::from(vec![b'x'; usize::from(qos >> 2)]),
                        qos: QoS::from_u8(qos % 3).unwrap_or(QoS::AtMostOnce),
                        retain: qos & 0x80 != 0,
                        retain_stamp: 0,
                        properties: None,
                    });
                }
                3 => {
                    let _ = shard.snapshot();
                }
                4 => writable(&mut shard, &clients[i]),
                5 => peer_reads(&clients[i]),
                6 => disconnect(&mut shard, &mut clients[i]),
                7 => {
                    // A valid SUBSCRIBE, so that routing gets exercised.
                    let filter = TOPICS[usize::from(ops.next().unwrap_or(0)) % TOPICS.len()];
                    let mut packet = vec![0x82, 0, 0, 1];
                    packet.extend_from_slice(&(filter.len() as u16).to_be_bytes());
                    packet.extend_from_slice(filter.as_bytes());
                    packet.push(ops.next().unwrap_or(0) % 3);
                    packet[1] = (packet.len() - 2) as u8;
                    feed(&mut shard, &mut clients[i], &packet);
                }
                _ => {}
            }
            // The broker ends every step (a read, a mesh batch) with a
            // flush, which seals the step's shared batch: do the same.
            shard.flush_dirty();
            check_accounting(&shard, base);
        }
        shard.flush_dirty();
        check_accounting(&shard, base);
        shard.stats
    };
    // Every queue is gone: the count is back where it started.
    assert_eq!(outqueue::shard_queued_bytes(), base, "queued bytes leaked");
    stats
}

/// The shard's queued-byte count equals the sum of its queues.
fn check_accounting(shard: &Shard, base: usize) {
    let sum: usize = shard.sessions.iter().map(|(_, s)| s.out.bytes()).sum();
    assert_eq!(
        outqueue::shard_queued_bytes() - base,
        sum,
        "queued-byte count drifted"
    );
}

/// A client connects (CleanSession from `clean`), as the handshake's
/// `attach` does, with a fresh non-blocking socket pair.
fn connect(shard: &mut Shard, slot: &mut Option<Client>, i: usize, clean: bool) {
    if slot.is_some() {
        return;
    }
    let Ok((broker_end, peer_end)) = socket_pair() else {
        return;
    };
    let client_id = ByteString::from(format!("fuzz-{i}"));
    // A persistent session kept offline earlier comes back with its state.
    let state = shard
        .session_key(&client_id)
        .and_then(|key| shard.remove_session(key))
        .map(|s| s.state);
    let session_present = state.is_some() && !clean;
    let conn_id = shard.new_conn_id();
    let mut session = Session::new(client_id, clean, state.unwrap_or_default());
    // The last client speaks MQTT 5.0: its bytes go through the 5.0 decoder
    // and dispatch, and its frames are encoded in 5.0.
    if i == CLIENTS - 1 {
        session.version = Version::V5;
    }
    session.link = Some(Link::new(conn_id, broker_end.as_raw_fd(), 0, 0));
    session.queue_control(&codec::connack(session_present, codec::CONNACK_ACCEPTED));
    let limits = shard.limits;
    session.reattach(&limits);
    let key = shard.insert_session(session);
    shard.mark_dirty(key);
    *slot = Some(Client {
        key,
        conn_id,
        rx: BytesMut::new(),
        broker_end,
        peer_end,
    });
}

/// Bytes from a client: decoded and handled as a connection does; an error
/// ends the connection.
fn feed(shard: &mut Shard, slot: &mut Option<Client>, bytes: &[u8]) {
    let Some(client) = slot.as_mut() else {
        return;
    };
    client.rx.extend_from_slice(bytes);
    if connection::process(shard, client.key, client.conn_id, &mut client.rx, &mut None).is_err() {
        disconnect(shard, slot);
    }
}

/// The connection task's job when a session's socket was full: write what
/// the socket takes now.
fn writable(shard: &mut Shard, slot: &Option<Client>) {
    let Some(client) = slot else {
        return;
    };
    let Some(session) = shard.session_for(client.key, client.conn_id) else {
        return;
    };
    let Some(link) = session.link.as_mut() else {
        return;
    };
    if let Ok((_, Flushed::All)) = session.out.flush(link.fd, &mut Vec::new()) {
        link.blocked = false;
    }
}

/// The client reads (and discards) whatever its socket holds.
fn peer_reads(slot: &Option<Client>) {
    let Some(client) = slot else {
        return;
    };
    let mut buf = [0u8; 4096];
    loop {
        let n = crate::net::fd::recv(client.peer_end.as_raw_fd(), &mut buf).unwrap_or(0);
        if n == 0 {
            return;
        }
    }
}

/// The connection ends, as the teardown does (the socket closes after).
fn disconnect(shard: &mut Shard, slot: &mut Option<Client>) {
    if let Some(client) = slot.take() {
        shard.end_connection(client.key, client.conn_id);
        shard.shed_conns.retain(|&c| c != client.conn_id);
        drop(client.broker_end);
        drop(client.peer_end);
    }
}

/// A non-blocking Unix stream socket pair with small buffers, so that
/// "socket full" happens often.
fn socket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = std::os::unix::net::UnixStream::pair()?;
    a.set_nonblocking(true)?;
    b.set_nonblocking(true)?;
    socket2::SockRef::from(&a).set_send_buffer_size(4096)?;
    Ok((OwnedFd::from(a), OwnedFd::from(b)))
}

/// The MQTT 5.0 decoder on `data`, whole and in chunks: the `decode_v5`
/// target's entry point (the checks are the codec's own,
/// `crate::protocol::v5::fuzz::decode`, which its randomized unit tests run
/// too).
pub fn decode_v5(data: &[u8]) {
    crate::protocol::v5::fuzz::decode(data);
}

/// The PROXY protocol header parser on `data`: the `proxy_header` target's
/// entry point.
pub fn proxy_header(data: &[u8]) {
    crate::net::proxy::check_parse(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Every committed corpus input (and every crash input added there as a
    /// regression test) of `target`, run through `run`.
    fn replay(target: &str, run: fn(&[u8])) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            run(&std::fs::read(&path).unwrap());
            count += 1;
        }
        assert!(count > 0, "empty corpus in {}", dir.display());
    }

    #[test]
    fn decode_corpus_replays() {
        replay("decode", decode);
    }

    #[test]
    fn decode_v5_corpus_replays() {
        replay("decode_v5", decode_v5);
    }

    #[test]
    fn session_corpus_replays() {
        replay("session", session);
    }

    #[test]
    fn proxy_header_corpus_replays() {
        replay("proxy_header", proxy_header);
    }

    #[test]
    fn session_sheds_non_readers_in_a_flood() {
        // Clients 0 and 1 subscribe to "#" at QoS 0, the broker publishes a
        // lot, nobody reads: over the 1024-byte budget the larger queue goes.
        let mut ops = vec![0x80, 0x90, 0x07, 3, 0, 0x17, 3, 0];
        for _ in 0..200 {
            ops.extend_from_slice(&[0x02, 0x00, 0xfc]);
        }
        ops.extend_from_slice(&[0x04, 0x05, 0x14, 0x15, 0x06, 0x16]);
        let stats = run_session(&ops);
        assert!(stats.clients_shed >= 1, "nobody shed: {stats:?}");
        assert!(stats.publish_dropped > 0);
    }
}
