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
//!   writes when a full socket drains, reads by the peers, disconnects;
//!   and MQTT 5.0: CONNECTs with properties (Session Expiry, Receive
//!   Maximum, Maximum Packet Size, Topic Alias Maximum, through the 5.0
//!   decoder), SUBSCRIBEs with Subscription Options and a Subscription
//!   Identifier (shared filters among them), PUBLISHes with Topic Aliases
//!   and properties. It never panics, and after every step the shard's
//!   queued-byte count ([`crate::session::outqueue::shard_queued_bytes`]) equals the
//!   sum of its queues.
//! - [`store_load`]: the persistence loader's reading of a segment on
//!   arbitrary bytes (with and without a valid header): it never panics, and
//!   the records it keeps, framed again, are exactly the valid prefix it
//!   reported.
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

/// Filters the session target's MQTT 5.0 SUBSCRIBEs use: its topics and
/// shared subscriptions over them.
const FILTERS_V5: [&str; 9] = [
    "a",
    "a/b",
    "a/+",
    "#",
    "$SYS/x",
    "$share/g/a/+",
    "$share/g/#",
    "$share/h/a",
    "$share/g/",
];

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
    /// The connection's rarely used state (its Topic Alias table from the
    /// client among it), kept between packets as a connection keeps it.
    rare: Option<Box<crate::session::link::Rare>>,
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
                8 => connect_v5(&mut shard, &mut clients[i], i, &mut ops),
                9 => {
                    let packet = subscribe_v5(&mut ops);
                    feed(&mut shard, &mut clients[i], &packet);
                }
                10 => {
                    let packet = publish_v5(&mut ops);
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
    session.queue_control(&codec::connack(session_present, codec::CONNACK_ACCEPTED));
    attach(shard, slot, session, conn_id, (broker_end, peer_end));
}

/// Attaches `session` (connection `conn_id`) to its socket pair
/// `(broker end, peer end)`, as the handshake's `attach` does: redelivery,
/// the shard's slab, a flush to come.
fn attach(
    shard: &mut Shard,
    slot: &mut Option<Client>,
    mut session: Session,
    conn_id: u64,
    (broker_end, peer_end): (OwnedFd, OwnedFd),
) {
    session.link = Some(Link::new(conn_id, broker_end.as_raw_fd(), 0, 0));
    let limits = shard.limits;
    session.reattach(&limits);
    let key = shard.insert_session(session);
    shard.mark_dirty(key);
    *slot = Some(Client {
        key,
        conn_id,
        rx: BytesMut::new(),
        rare: None,
        broker_end,
        peer_end,
    });
}

/// A client connects with an MQTT 5.0 CONNECT whose properties come from
/// `ops`: the packet goes through the 5.0 decoder, and the session gets
/// what the handshake's `attach` takes from it (Clean Start, Session Expiry
/// Interval, Receive Maximum, Maximum Packet Size, Topic Alias Maximum).
fn connect_v5(
    shard: &mut Shard,
    slot: &mut Option<Client>,
    i: usize,
    ops: &mut impl Iterator<Item = u8>,
) {
    if slot.is_some() {
        return;
    }
    let mut next = || ops.next().unwrap_or(0);
    let (flags, which) = (next(), next());
    let clean_start = flags & 1 != 0;
    let mut properties = Vec::new();
    if which & 1 != 0 {
        // Session Expiry Interval: 0, a few seconds or never.
        let expiry = [0u32, 5, u32::MAX][usize::from(next()) % 3];
        properties.push(0x11);
        properties.extend(expiry.to_be_bytes());
    }
    if which & 2 != 0 {
        // Receive Maximum 1..=4 (0 is a protocol error: refused below).
        properties.push(0x21);
        properties.extend(u16::from(next() % 5).to_be_bytes());
    }
    if which & 4 != 0 {
        // Maximum Packet Size: small, so that deliveries are dropped.
        properties.push(0x27);
        properties.extend((u32::from(next()) * 4).to_be_bytes());
    }
    if which & 8 != 0 {
        // Topic Alias Maximum 0..=3: the broker's aliases towards it.
        properties.push(0x22);
        properties.extend(u16::from(next() % 4).to_be_bytes());
    }
    let client_id = format!("fuzz-{i}");
    let mut body = Vec::new();
    push_string(&mut body, "MQTT");
    body.extend([5, if clean_start { 0x02 } else { 0 }, 0, 60]);
    push_varint(&mut body, properties.len());
    body.extend(&properties);
    push_string(&mut body, &client_id);
    let mut rx = BytesMut::from(&packet_bytes(0x10, &body)[..]);
    let Ok(Some(crate::protocol::v5::Packet::Connect(connect))) =
        crate::protocol::v5::decode(&mut rx, FUZZ_MAX_PACKET_SIZE)
    else {
        return;
    };
    let Ok((broker_end, peer_end)) = socket_pair() else {
        return;
    };
    let props = &connect.properties;
    let expiry = props.session_expiry_interval().unwrap_or(0);
    let state = shard
        .session_key(&connect.client_id)
        .and_then(|key| shard.remove_session(key))
        .map(|s| s.state)
        .filter(|_| !connect.clean_start);
    let conn_id = shard.new_conn_id();
    let mut session = Session::new(connect.client_id, expiry == 0, state.unwrap_or_default());
    session.version = Version::V5;
    session.protocol_level = crate::protocol::v5::PROTOCOL_VERSION;
    session.session_expiry = expiry;
    session.receive_maximum = props.receive_maximum().map_or(u16::MAX, u16::from);
    session.max_packet_size = props.maximum_packet_size().map_or(u32::MAX, u32::from);
    session.server_aliases = crate::session::alias::ServerAliases::new(
        props.topic_alias_maximum().unwrap_or(0),
        shard.config.server_topic_aliases,
    );
    attach(shard, slot, session, conn_id, (broker_end, peer_end));
}

/// An MQTT 5.0 SUBSCRIBE from `ops`: one filter of [`FILTERS_V5`] with
/// arbitrary Subscription Options (reserved bits and Retain Handling 3
/// included: Protocol Errors) and, sometimes, a Subscription Identifier.
fn subscribe_v5(ops: &mut impl Iterator<Item = u8>) -> Vec<u8> {
    let mut next = || ops.next().unwrap_or(0);
    let (filter, options, id) = (next(), next(), next());
    let mut body = vec![0, 2];
    let mut properties = Vec::new();
    if id != 0 {
        properties.push(0x0b);
        push_varint(&mut properties, usize::from(id) * 131);
    }
    push_varint(&mut body, properties.len());
    body.extend(&properties);
    push_string(
        &mut body,
        FILTERS_V5[usize::from(filter) % FILTERS_V5.len()],
    );
    body.push(options);
    packet_bytes(0x82, &body)
}

/// An MQTT 5.0 PUBLISH from `ops`: QoS, RETAIN and DUP from one byte; the
/// topic from [`TOPICS`] or empty with a Topic Alias (setting or using
/// one, or an invalid one); and properties: Message Expiry Interval,
/// Payload Format Indicator (with a payload that is UTF-8 or not), Content
/// Type, Response Topic, Correlation Data, a User Property, and a
/// Subscription Identifier (not allowed from a client).
fn publish_v5(ops: &mut impl Iterator<Item = u8>) -> Vec<u8> {
    let mut next = || ops.next().unwrap_or(0);
    let (flags, topic, alias, which) = (next(), next(), next(), next());
    let qos = (flags >> 1) & 3;
    let mut body = Vec::new();
    // Alias byte: bit 7 clear sends the topic, bit 6 set adds the alias.
    let name = if alias & 0x80 == 0 {
        TOPICS[usize::from(topic) % TOPICS.len()]
    } else {
        ""
    };
    push_string(&mut body, name);
    if qos > 0 {
        body.extend([0, 1 + topic % 4]);
    }
    let mut properties = Vec::new();
    if alias & 0xc0 != 0 {
        properties.push(0x23);
        properties.extend(u16::from(alias & 0x0f).to_be_bytes());
    }
    if which & 1 != 0 {
        properties.push(0x02);
        properties.extend(u32::from(which >> 4).to_be_bytes());
    }
    if which & 2 != 0 {
        properties.extend([0x01, 1]);
    }
    if which & 4 != 0 {
        properties.push(0x03);
        push_string(&mut properties, "text/plain");
        properties.push(0x08);
        push_string(&mut properties, "a/b");
    }
    if which & 8 != 0 {
        properties.push(0x09);
        push_string(&mut properties, "id");
        properties.push(0x26);
        push_string(&mut properties, "k");
        push_string(&mut properties, "v");
    }
    if which & 0x80 != 0 {
        properties.extend([0x0b, 1]);
    }
    push_varint(&mut body, properties.len());
    body.extend(&properties);
    // A payload that is UTF-8, or not (0xff never is).
    body.extend(if which & 0x40 != 0 {
        &b"\xff"[..]
    } else {
        b"hi"
    });
    packet_bytes(0x30 | (flags & 0x0f), &body)
}

/// A whole packet: `first` byte, Remaining Length, `body`.
fn packet_bytes(first: u8, body: &[u8]) -> Vec<u8> {
    let mut packet = vec![first];
    push_varint(&mut packet, body.len());
    packet.extend_from_slice(body);
    packet
}

/// Appends `s` as an MQTT UTF-8 string (length-prefixed).
fn push_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends `n` as an MQTT Variable Byte Integer.
fn push_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Bytes from a client: decoded and handled as a connection does; an error
/// ends the connection.
fn feed(shard: &mut Shard, slot: &mut Option<Client>, bytes: &[u8]) {
    let Some(client) = slot.as_mut() else {
        return;
    };
    client.rx.extend_from_slice(bytes);
    if connection::process(
        shard,
        client.key,
        client.conn_id,
        &mut client.rx,
        &mut client.rare,
    )
    .is_err()
    {
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

/// The `store_load` target's entry point (see the module doc).
///
/// # Panics
/// When the loader breaks one of its promises.
pub fn store_load(data: &[u8]) {
    use crate::store::frame::{self, HEADER_LEN, Header};
    let _ = Header::decode(data);
    let body = data.get(HEADER_LEN..).unwrap_or_default();
    for body in [body, data] {
        let (records, valid, bad) = crate::store::read_records(body);
        assert!(valid <= body.len());
        if let Some((offset, _)) = bad {
            assert_eq!(
                offset, valid,
                "damage is reported where the valid prefix ends"
            );
        }
        let mut again = Vec::new();
        for record in &records {
            frame::append_record(&mut again, record.kind(), |out| record.encode_body(out));
        }
        assert_eq!(
            again,
            body[..valid],
            "records frame again to the prefix read"
        );
    }
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
    fn store_load_corpus_replays() {
        replay("store_load", store_load);
    }

    #[test]
    fn session_corpus_replays() {
        replay("session", session);
    }

    #[test]
    fn proxy_header_corpus_replays() {
        replay("proxy_header", proxy_header);
    }

    /// A v5 session: client 3 connects with properties, joins a shared
    /// group and subscribes with Retain As Published and an identifier;
    /// client 2 publishes setting, then using, a Topic Alias.
    const MQTT5_OPS: [u8; 25] = [
        0x38, 0x01, 0x0f, 0x01, 0x03, 0xc8, 0x03, // CONNECT v5, 4 properties
        0x39, 5, 0x01, 1, // SUBSCRIBE $share/g/a/+, QoS 1, id 131
        0x39, 2, 0x09, 2, // SUBSCRIBE a/+, QoS 1 + RAP, id 262
        0x28, 0x01, 0x00, // CONNECT v5, no properties
        0x2a, 0x03, 1, 0x41, 0x1f, // PUBLISH a/b QoS 1 RETAIN, alias 1, props
        0x2a, 0x02, // PUBLISH QoS 1 (continued below)
    ];

    #[test]
    fn session_speaks_mqtt5_with_shared_subscriptions_and_aliases() {
        let mut ops = MQTT5_OPS.to_vec();
        ops.extend([1, 0xc1, 0, 0x35]); // ... by alias 1 alone; client 3 reads
        let stats = run_session(&ops);
        assert_eq!(stats.protocol_errors, 0, "{stats:?}");
        assert_eq!(stats.publish_received, 2, "{stats:?}");
        assert_eq!(stats.shared_deliveries, 2, "{stats:?}");
        // Each message makes a shared copy and a plain one: two in flight
        // (`max_inflight_messages` 2), two pending.
        assert_eq!(stats.publish_sent_by_qos[1], 2, "{stats:?}");
        // The same ops are in the committed corpus.
        let corpus =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/session/mqtt5_shared_alias");
        assert_eq!(std::fs::read(corpus).unwrap(), ops);
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
