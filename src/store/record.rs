//! The records of the store's logs and how their bodies are laid out
//! (docs/design/persistence.md §4.2): plain data that knows messages,
//! never sessions or shards. This version stores the retained messages and
//! the persistent sessions' subscriptions (a whole image per change, keyed
//! by client id and ordered by [`next_stamp`]), the messages they queued
//! (stored once per shard, named by id), and the steps of their QoS 1/2
//! flows ([`Record::Sent`], [`Record::Flow`]; replayed by the `flows`
//! module). The flow records name an image by its [`Alias`], a per-shard
//! u32 the image carries, not by its 8-byte stamp (segment format 2); the
//! format 1 records that named it by stamp are still read
//! ([`Record::Legacy`]). Format 3 adds one kind, the ordered record of a
//! shard step's acknowledgements and sends ([`Record::Steps`]); an older
//! fanmq refuses a format 3 segment (frame::FORMAT_VERSION).
//!
//! Little-endian; strings are u16 length + bytes (MQTT topics and client ids
//! fit), payloads u32 length + bytes. [`Record::decode`] reads any bytes
//! without panicking (fuzzed by the `store_load` target).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use bytestring::ByteString;

use crate::protocol::message::{Message, MessageProperties};
use crate::protocol::v3::QoS;
use crate::protocol::v5::{Properties, Property};

/// Record kinds, as written in a frame's `kind` byte.
pub mod kind {
    /// A persistent session as it is now (its subscriptions), replacing
    /// every earlier record of its client id with a lower stamp.
    pub const SESSION_IMAGE: u8 = 0x01;
    /// A persistent session ended (expired, or discarded by a clean start).
    pub const SESSION_DROP: u8 = 0x02;
    /// A QoS 1/2 message that persistent sessions of this shard queued,
    /// written once per shard however many queued it.
    pub const MESSAGE: u8 = 0x05;
    /// The persistent sessions (by image stamp) that queued a message.
    pub const QUEUE: u8 = 0x06;
    /// A retained message stored or replaced.
    pub const RETAIN: u8 = 0x20;
    /// A retained message deleted.
    pub const RETAIN_DELETE: u8 = 0x21;
    /// Persistent sessions (by image stamp) sent a message: its packet id
    /// and QoS (an outgoing message in flight, awaiting PUBACK or PUBREC).
    pub const SENT: u8 = 0x07;
    /// An outgoing message's flow ended (PUBACK, PUBCOMP, a refusing PUBREC).
    pub const DONE: u8 = 0x08;
    /// An outgoing QoS 2 message was PUBREC'd: PUBREL sent, PUBCOMP awaited.
    pub const PUBRECD: u8 = 0x09;
    /// An incoming QoS 2 packet id was PUBREC'd: awaiting its PUBREL.
    pub const AWAIT_REL: u8 = 0x0A;
    /// An incoming QoS 2 packet id was released (PUBREL).
    pub const RELEASED: u8 = 0x0B;
    /// A persistent session's will, owed if its connection ends without
    /// DISCONNECT (or already waiting for its Will Delay).
    pub const WILL: u8 = 0x0C;
    /// A persistent session has no will any more (none at CONNECT, a
    /// DISCONNECT, or it was published).
    pub const WILL_CLEAR: u8 = 0x0D;
    /// Outgoing messages' flows ended ([`DONE`]) for many sessions at once:
    /// the acknowledgements of one step of a shard, 10 bytes each.
    pub const DONE_MANY: u8 = 0x0E;
    /// A [`WILL`] with an MQTT 5.0 Message Expiry Interval: the same body,
    /// then the interval (u32 seconds). A will without one is still
    /// written as [`WILL`], so older records and wills without an expiry
    /// read as before.
    pub const WILL_EXPIRING: u8 = 0x0F;
    // Format 2 (frame::FORMAT_VERSION 2): the records above that name a
    // session by its image stamp (QUEUE, SENT, DONE..RELEASED, DONE_MANY)
    // are only read; these name it by the alias its image carries.
    /// [`SESSION_IMAGE`] with the image's alias first (u32).
    pub const SESSION_IMAGE_ALIASED: u8 = 0x10;
    /// [`QUEUE`] by alias: 5 bytes a subscriber.
    pub const QUEUED: u8 = 0x11;
    /// [`SENT`] by alias: 7 bytes a session.
    pub const SENT_TO: u8 = 0x12;
    /// [`DONE_MANY`] by alias: 6 bytes an acknowledgement.
    pub const ACKED: u8 = 0x13;
    /// A [`DONE`], [`PUBRECD`], [`AWAIT_REL`] or [`RELEASED`] step by
    /// alias: the step's old kind byte, alias, packet id (16 bytes framed).
    pub const STEP: u8 = 0x14;
    // Format 3 (frame::FORMAT_VERSION 3).
    /// The acknowledgements and the messages sent from their queues of
    /// many sessions in one step of a shard, in order, as one record
    /// ([`super::Record::Steps`]): 9 bytes for a session that had one
    /// message acknowledged and sent the next, instead of an [`ACKED`] and a
    /// [`SENT_TO`] record of its own (19 + 16 bytes framed).
    pub const STEPS: u8 = 0x15;
}

/// MQTT 5.0 property identifiers of the forwarded properties (§2.2.2.2),
/// written as they are on the wire.
mod property_id {
    /// Payload Format Indicator (a byte).
    pub const PAYLOAD_FORMAT: u8 = 0x01;
    /// Content Type (a string).
    pub const CONTENT_TYPE: u8 = 0x03;
    /// Response Topic (a string).
    pub const RESPONSE_TOPIC: u8 = 0x08;
    /// Correlation Data (binary).
    pub const CORRELATION_DATA: u8 = 0x09;
    /// User Property (two strings).
    pub const USER_PROPERTY: u8 = 0x26;
}

/// Why a record body could not be read: the frame's checksum held, so this
/// is a bug or a format this fanmq does not know.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// The body ended early.
    #[error("record body ends early")]
    Truncated,
    /// Bytes left after the body.
    #[error("record body has {0} bytes too many")]
    Trailing(usize),
    /// A kind this fanmq does not know.
    #[error("unknown record kind {0:#04x}")]
    UnknownKind(u8),
    /// A field out of range (QoS 3, bad UTF-8, unknown property).
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

/// A message as stored: what a `Message` holds, with its MQTT 5.0 expiry as
/// a wall-clock deadline (an `Instant` means nothing after a restart).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// QoS it was published with.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Unix milliseconds when it expires; 0: never.
    pub expires_unix_ms: u64,
    /// Topic name.
    pub topic: ByteString,
    /// MQTT 5.0 properties forwarded with it (empty for 3.1.1).
    pub properties: Properties,
    /// Payload.
    pub payload: Bytes,
}

/// A persistent session as stored: what brings it back, offline, with its
/// subscriptions, after a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSession {
    /// When the image was taken ([`next_stamp`]): the highest stamp of a
    /// client id wins, across every shard's log.
    pub stamp: u64,
    /// Client identifier.
    pub client_id: ByteString,
    /// Protocol level of its last connection: 5 for MQTT 5.0, else 4.
    pub protocol_level: u8,
    /// Session Expiry Interval in seconds (`u32::MAX`: never).
    pub expiry_interval: u32,
    /// Unix milliseconds when it went offline; 0 while it was online.
    pub offline_since_unix_ms: u64,
    /// Its subscriptions in order.
    pub subscriptions: Vec<StoredSubscription>,
    /// The QoS 1/2 messages it had not had acknowledged when the image was
    /// taken (in flight first, then pending), oldest first: a message id
    /// ([`Record::Message`], earlier in the log) and the QoS to deliver at.
    pub queued: Vec<(u64, QoS)>,
    /// The image's [`Alias`] in its shard's journal, which the flow records
    /// after it name; 0: none (written as a format 1 image, as the cluster's
    /// take-over images are).
    pub alias: Alias,
}

/// One subscription of a [`StoredSession`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSubscription {
    /// Topic filter.
    pub filter: ByteString,
    /// Granted QoS.
    pub qos: QoS,
    /// MQTT 5.0 No Local.
    pub no_local: bool,
    /// MQTT 5.0 Retain As Published.
    pub retain_as_published: bool,
    /// MQTT 5.0 Subscription Identifier (0: none).
    pub identifier: u32,
}

/// Bits of a stored subscription's options byte (QoS in bits 0-1).
mod options {
    /// No Local.
    pub const NO_LOCAL: u8 = 0x04;
    /// Retain As Published.
    pub const RETAIN_AS_PUBLISHED: u8 = 0x08;
}

/// The last stamp handed out by [`next_stamp`].
static LAST_STAMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A stamp for a session record: wall-clock nanoseconds, but always above
/// every stamp handed out or loaded before ([`seen_stamp`]), so records
/// made one after another on any shard are ordered even if the clock
/// steps back. One atomic, touched at connect, disconnect and
/// subscribe time only.
pub fn next_stamp() -> u64 {
    use std::sync::atomic::Ordering;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let mut last = LAST_STAMP.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST_STAMP.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// Makes [`next_stamp`] hand out only stamps above `stamp` (a loaded one).
pub fn seen_stamp(stamp: u64) {
    LAST_STAMP.fetch_max(stamp, std::sync::atomic::Ordering::Relaxed);
}

/// The last alias handed out by [`next_alias`].
static LAST_ALIAS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A fresh [`Alias`] for an image about to be written: one counter for the
/// process (so unique in every shard's journal), above every alias loaded
/// ([`seen_alias`]), never 0.
pub fn next_alias() -> Alias {
    use std::sync::atomic::Ordering;
    loop {
        let alias = LAST_ALIAS.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        if alias != 0 {
            return alias;
        }
    }
}

/// Makes [`next_alias`] hand out only aliases above `alias` (a loaded one).
pub fn seen_alias(alias: Alias) {
    LAST_ALIAS.fetch_max(alias, std::sync::atomic::Ordering::Relaxed);
}

/// A step of a persistent session's QoS 1/2 flows that a small record
/// keeps (docs/design/persistence.md §4.2): the session's image alias and a
/// packet id, 16 bytes with the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowStep {
    /// [`kind::DONE`]: the outgoing message with the id is acknowledged.
    Done,
    /// [`kind::PUBRECD`]: the outgoing QoS 2 message with the id was
    /// PUBREC'd; a restart resends PUBREL, not the PUBLISH.
    PubRecd,
    /// [`kind::AWAIT_REL`]: an incoming QoS 2 id awaits PUBREL, so a
    /// PUBLISH with it is a duplicate.
    AwaitRel,
    /// [`kind::RELEASED`]: the incoming QoS 2 id was released.
    Released,
}

impl FlowStep {
    /// The record kind that keeps this step.
    pub fn kind(self) -> u8 {
        match self {
            FlowStep::Done => kind::DONE,
            FlowStep::PubRecd => kind::PUBRECD,
            FlowStep::AwaitRel => kind::AWAIT_REL,
            FlowStep::Released => kind::RELEASED,
        }
    }

    /// The step a record kind keeps, if it is one.
    pub fn of_kind(kind: u8) -> Option<FlowStep> {
        Some(match kind {
            kind::DONE => FlowStep::Done,
            kind::PUBRECD => FlowStep::PubRecd,
            kind::AWAIT_REL => FlowStep::AwaitRel,
            kind::RELEASED => FlowStep::Released,
            _ => return None,
        })
    }
}

/// A persistent session's will as stored ([`kind::WILL`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredWill {
    /// [`next_stamp`] when written: the highest stamp of a client id wins,
    /// across every shard's log.
    pub stamp: u64,
    /// The session's client id.
    pub client_id: ByteString,
    /// MQTT 5.0 Will Delay Interval in seconds (0: at once).
    pub delay: u32,
    /// Unix milliseconds when it is due (its connection ended and the delay
    /// runs); 0 while its connection was open.
    pub due_unix_ms: u64,
    /// The will, without an expiry (counted from its publication).
    pub message: StoredMessage,
    /// Its MQTT 5.0 Message Expiry Interval in seconds, counted from its
    /// publication (None: it never expires; [`kind::WILL_EXPIRING`]).
    pub expiry_interval: Option<u32>,
}

/// A session image's short name in its shard's journal: given to each image
/// written (the journal's `next_alias`, counting up from above every alias
/// loaded at start, 0 never), so that the flow records after it take 4
/// bytes to name the session instead of the 8 of its stamp. Unique within
/// one journal directory (the loader maps it back to the stamp, in log
/// order); wrapping after 2^32 images is harmless, since a snapshot gives
/// every live image a fresh one and the load reads at most two snapshots'
/// worth of log.
pub type Alias = u32;

/// One session's share of a [`Record::Sent`]: its image's alias, the packet
/// id the message went out with, and the QoS it was sent at (7 bytes).
pub type SentRef = (Alias, u16, QoS);

/// One entry of a [`Record::Steps`], for one session (9 bytes when it
/// sends, 7 when it only acknowledges): first its `done` packet id's flow
/// ended (0: none), then the record's `message`-th message (1-based; 0:
/// none) went in flight to it with packet id `sent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepEntry {
    /// The alias of the session's image.
    pub alias: Alias,
    /// Packet id acknowledged (PUBACK, PUBCOMP, a refusing PUBREC); 0: none.
    pub done: u16,
    /// 1-based index into the record's messages of the message sent; 0:
    /// none (a record names at most 255 messages; the writer starts another
    /// when it would need more).
    pub message: u8,
    /// The packet id that message went out with (not 0 when it was sent).
    pub sent: u16,
}

/// The format 1 records that named a session by its image stamp, read from
/// segments written before format 2 (never written any more; the tests
/// write them as an older fanmq did).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Legacy {
    /// [`kind::QUEUE`]: message id, (image stamp, QoS) each (9 bytes).
    Queue(u64, Vec<(u64, QoS)>),
    /// [`kind::SENT`]: message id, (image stamp, packet id, QoS) each (11
    /// bytes).
    Sent(u64, Vec<(u64, u16, QoS)>),
    /// [`kind::DONE`] ..= [`kind::RELEASED`]: a step, image stamp, packet id.
    Flow(FlowStep, u64, u16),
    /// [`kind::DONE_MANY`]: (image stamp, packet id) each (10 bytes).
    DoneMany(Vec<(u64, u16)>),
}

/// One record of a log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// [`kind::SESSION_IMAGE`].
    SessionImage(StoredSession),
    /// [`kind::SESSION_DROP`]: stamp and client id.
    SessionDrop(u64, ByteString),
    /// [`kind::MESSAGE`]: message id ([`next_stamp`]) and message.
    Message(u64, StoredMessage),
    /// [`kind::QUEUED`]: message id, then each session (its latest image's
    /// alias) that queued it with the QoS it gets: 5 bytes a subscriber.
    Queue(u64, Vec<(Alias, QoS)>),
    /// [`kind::RETAIN`]: stamp and message.
    Retain(u64, StoredMessage),
    /// [`kind::RETAIN_DELETE`]: stamp and topic.
    RetainDelete(u64, ByteString),
    /// [`kind::SENT_TO`]: message id, then each session that has it in
    /// flight now (taken from its queue if it was there).
    Sent(u64, Vec<SentRef>),
    /// [`kind::STEP`]: a [`FlowStep`] of the session with the image alias,
    /// for a packet id.
    Flow(FlowStep, Alias, u16),
    /// [`kind::WILL`].
    Will(StoredWill),
    /// [`kind::WILL_CLEAR`]: stamp and client id.
    WillClear(u64, ByteString),
    /// [`kind::ACKED`]: (image alias, packet id) of each outgoing message
    /// acknowledged.
    DoneMany(Vec<(Alias, u16)>),
    /// [`kind::STEPS`]: the messages (id, QoS sent at) that went in flight
    /// in one step of the shard, each once, then each session's entry in
    /// the order the steps happened (a packet id acknowledged can be sent
    /// again in the same step, so the order is kept).
    Steps(Vec<(u64, QoS)>, Vec<StepEntry>),
    /// A format 1 record (read only).
    Legacy(Legacy),
}

/// Bytes `record` takes in a log, framed (tests of the record sizes).
#[cfg(test)]
pub fn framed_len(record: &Record) -> usize {
    let mut out = Vec::new();
    crate::store::frame::append_record(&mut out, record.kind(), |b| record.encode_body(b));
    out.len()
}

/// Unix milliseconds now.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl StoredMessage {
    /// `message` as stored, its expiry counted from (`now`, `now_unix_ms`).
    pub fn of(message: &Message, now: Instant, now_unix_ms: u64) -> StoredMessage {
        let extra = message.properties.as_deref();
        let expires_unix_ms = extra.and_then(|p| p.expires_at).map_or(0, |at| {
            let left = at.saturating_duration_since(now);
            now_unix_ms
                .saturating_add(u64::try_from(left.as_millis()).unwrap_or(u64::MAX))
                .max(1)
        });
        StoredMessage {
            qos: message.qos,
            retain: message.retain,
            expires_unix_ms,
            topic: message.topic.clone(),
            properties: extra.map(|p| p.forwarded.clone()).unwrap_or_default(),
            payload: message.payload.clone(),
        }
    }

    /// The message again, stamped `stamp`, or `None` once it has expired.
    pub fn to_message(&self, stamp: u64, now: Instant, now_unix_ms: u64) -> Option<Message> {
        let expires_at = match self.expires_unix_ms {
            0 => None,
            at if at <= now_unix_ms => return None,
            at => Some(now + Duration::from_millis(at - now_unix_ms)),
        };
        let properties = (expires_at.is_some() || !self.properties.is_empty()).then(|| {
            Arc::new(MessageProperties {
                forwarded: self.properties.clone(),
                expires_at,
            })
        });
        Some(Message {
            topic: self.topic.clone(),
            payload: self.payload.clone(),
            qos: self.qos,
            retain: self.retain,
            retain_stamp: stamp,
            properties,
        })
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.qos as u8);
        out.push(u8::from(self.retain));
        out.extend_from_slice(&self.expires_unix_ms.to_le_bytes());
        put_str(out, &self.topic);
        let forwarded: Vec<&Property> = self
            .properties
            .iter()
            .filter(|p| property_bytes(p).is_some())
            .collect();
        put_u16(out, u16::try_from(forwarded.len()).unwrap_or(u16::MAX));
        for property in forwarded.into_iter().take(usize::from(u16::MAX)) {
            if let Some((id, first, second)) = property_bytes(property) {
                out.push(id);
                put_bin(out, first);
                if let Some(second) = second {
                    put_bin(out, second);
                }
            }
        }
        put_bin(out, &self.payload);
    }

    fn decode(r: &mut Reader<'_>) -> Result<StoredMessage, RecordError> {
        let qos = QoS::from_u8(r.u8()?).ok_or(RecordError::Invalid("QoS"))?;
        let retain = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(RecordError::Invalid("RETAIN flag")),
        };
        let expires_unix_ms = r.u64()?;
        let topic = r.str()?;
        let mut properties = Properties::new();
        for _ in 0..r.u16()? {
            let id = r.u8()?;
            let property = match id {
                property_id::PAYLOAD_FORMAT => match r.bin()? {
                    [0] => Property::PayloadFormatIndicator(false),
                    [1] => Property::PayloadFormatIndicator(true),
                    _ => return Err(RecordError::Invalid("Payload Format Indicator")),
                },
                property_id::CONTENT_TYPE => Property::ContentType(r.bin_str()?),
                property_id::RESPONSE_TOPIC => Property::ResponseTopic(r.bin_str()?),
                property_id::CORRELATION_DATA => {
                    Property::CorrelationData(Bytes::copy_from_slice(r.bin()?))
                }
                property_id::USER_PROPERTY => Property::UserProperty(r.bin_str()?, r.bin_str()?),
                _ => return Err(RecordError::Invalid("property")),
            };
            properties.push(property);
        }
        let payload = Bytes::copy_from_slice(r.bin()?);
        Ok(StoredMessage {
            qos,
            retain,
            expires_unix_ms,
            topic,
            properties,
            payload,
        })
    }
}

/// A forwarded property as stored: its identifier, its value, and the
/// second value of a User Property.
type StoredProperty<'a> = (u8, &'a [u8], Option<&'a [u8]>);

/// The stored form of a forwarded property; `None` for a property that is
/// never forwarded.
fn property_bytes(property: &Property) -> Option<StoredProperty<'_>> {
    /// Payload Format Indicator values as stored.
    const FORMAT: [&[u8]; 2] = [&[0], &[1]];
    Some(match property {
        Property::PayloadFormatIndicator(utf8) => (
            property_id::PAYLOAD_FORMAT,
            FORMAT[usize::from(*utf8)],
            None,
        ),
        Property::ContentType(v) => (property_id::CONTENT_TYPE, v.as_bytes(), None),
        Property::ResponseTopic(v) => (property_id::RESPONSE_TOPIC, v.as_bytes(), None),
        Property::CorrelationData(v) => (property_id::CORRELATION_DATA, &v[..], None),
        Property::UserProperty(k, v) => {
            (property_id::USER_PROPERTY, k.as_bytes(), Some(v.as_bytes()))
        }
        _ => return None,
    })
}

impl Record {
    /// The record of a retained update (`message.retain`): stored, or a
    /// delete for an empty payload; `None` for `$SYS` topics, which the
    /// broker makes again after a restart.
    pub fn of_retained(message: &Message) -> Option<Record> {
        if message.topic.starts_with("$SYS") {
            return None;
        }
        let stamp = message.retain_stamp;
        Some(if message.payload.is_empty() {
            Record::RetainDelete(stamp, message.topic.clone())
        } else {
            Record::Retain(
                stamp,
                StoredMessage::of(message, Instant::now(), unix_ms_now()),
            )
        })
    }

    /// The record's kind byte.
    pub fn kind(&self) -> u8 {
        match self {
            Record::SessionImage(s) if s.alias == 0 => kind::SESSION_IMAGE,
            Record::SessionImage(_) => kind::SESSION_IMAGE_ALIASED,
            Record::SessionDrop(..) => kind::SESSION_DROP,
            Record::Message(..) => kind::MESSAGE,
            Record::Queue(..) => kind::QUEUED,
            Record::Retain(..) => kind::RETAIN,
            Record::RetainDelete(..) => kind::RETAIN_DELETE,
            Record::Sent(..) => kind::SENT_TO,
            Record::Flow(..) => kind::STEP,
            Record::Will(will) if will.expiry_interval.is_some() => kind::WILL_EXPIRING,
            Record::Will(_) => kind::WILL,
            Record::WillClear(..) => kind::WILL_CLEAR,
            Record::DoneMany(_) => kind::ACKED,
            Record::Steps(..) => kind::STEPS,
            Record::Legacy(Legacy::Queue(..)) => kind::QUEUE,
            Record::Legacy(Legacy::Sent(..)) => kind::SENT,
            Record::Legacy(Legacy::Flow(step, ..)) => step.kind(),
            Record::Legacy(Legacy::DoneMany(_)) => kind::DONE_MANY,
        }
    }

    /// Appends the record's body to `out`.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Record::SessionImage(s) => {
                if s.alias != 0 {
                    out.extend_from_slice(&s.alias.to_le_bytes());
                }
                out.extend_from_slice(&s.stamp.to_le_bytes());
                put_str(out, &s.client_id);
                out.push(s.protocol_level);
                out.extend_from_slice(&s.expiry_interval.to_le_bytes());
                out.extend_from_slice(&s.offline_since_unix_ms.to_le_bytes());
                let n = u32::try_from(s.subscriptions.len()).unwrap_or(u32::MAX);
                out.extend_from_slice(&n.to_le_bytes());
                for sub in s.subscriptions.iter().take(n as usize) {
                    let mut byte = sub.qos as u8;
                    if sub.no_local {
                        byte |= options::NO_LOCAL;
                    }
                    if sub.retain_as_published {
                        byte |= options::RETAIN_AS_PUBLISHED;
                    }
                    out.push(byte);
                    out.extend_from_slice(&sub.identifier.to_le_bytes());
                    put_str(out, &sub.filter);
                }
                put_refs(out, &s.queued);
            }
            Record::Message(mid, message) => {
                out.extend_from_slice(&mid.to_le_bytes());
                message.encode(out);
            }
            Record::Queue(mid, refs) => {
                out.extend_from_slice(&mid.to_le_bytes());
                put_list(out, refs, |out, (alias, qos)| {
                    out.extend_from_slice(&alias.to_le_bytes());
                    out.push(*qos as u8);
                });
            }
            Record::SessionDrop(stamp, client_id) => {
                out.extend_from_slice(&stamp.to_le_bytes());
                put_str(out, client_id);
            }
            Record::Retain(stamp, message) => {
                out.extend_from_slice(&stamp.to_le_bytes());
                message.encode(out);
            }
            Record::RetainDelete(stamp, topic) => {
                out.extend_from_slice(&stamp.to_le_bytes());
                put_str(out, topic);
            }
            Record::Sent(mid, refs) => {
                out.extend_from_slice(&mid.to_le_bytes());
                put_list(out, refs, |out, (alias, packet_id, qos)| {
                    out.extend_from_slice(&alias.to_le_bytes());
                    put_u16(out, *packet_id);
                    out.push(*qos as u8);
                });
            }
            Record::Flow(step, alias, packet_id) => {
                out.push(step.kind());
                out.extend_from_slice(&alias.to_le_bytes());
                put_u16(out, *packet_id);
            }
            Record::Will(will) => {
                out.extend_from_slice(&will.stamp.to_le_bytes());
                put_str(out, &will.client_id);
                out.extend_from_slice(&will.delay.to_le_bytes());
                out.extend_from_slice(&will.due_unix_ms.to_le_bytes());
                will.message.encode(out);
                if let Some(interval) = will.expiry_interval {
                    out.extend_from_slice(&interval.to_le_bytes());
                }
            }
            Record::WillClear(stamp, client_id) => {
                out.extend_from_slice(&stamp.to_le_bytes());
                put_str(out, client_id);
            }
            Record::DoneMany(done) => put_list(out, done, |out, (alias, packet_id)| {
                out.extend_from_slice(&alias.to_le_bytes());
                put_u16(out, *packet_id);
            }),
            Record::Steps(messages, entries) => {
                // At most 255 messages (StepEntry::message); the writer
                // never gives more, a count cut here would only lose sends.
                let n = messages.len().min(usize::from(u8::MAX));
                out.push(n as u8);
                for (mid, qos) in &messages[..n] {
                    out.extend_from_slice(&mid.to_le_bytes());
                    out.push(*qos as u8);
                }
                put_list(out, entries, |out, e| {
                    out.extend_from_slice(&e.alias.to_le_bytes());
                    put_u16(out, e.done);
                    out.push(e.message);
                    if e.message != 0 {
                        put_u16(out, e.sent);
                    }
                });
            }
            Record::Legacy(legacy) => legacy.encode_body(out),
        }
    }

    /// Reads a record of `kind` from `body`.
    ///
    /// # Errors
    /// A body that does not hold a whole record of that kind.
    pub fn decode(kind: u8, body: &[u8]) -> Result<Record, RecordError> {
        let mut r = Reader(body);
        let record = match kind {
            kind::SESSION_IMAGE | kind::SESSION_IMAGE_ALIASED => {
                let alias = if kind == kind::SESSION_IMAGE {
                    0
                } else {
                    match r.u32()? {
                        0 => return Err(RecordError::Invalid("alias 0")),
                        alias => alias,
                    }
                };
                let stamp = r.u64()?;
                let client_id = r.str()?;
                let protocol_level = r.u8()?;
                let expiry_interval = r.u32()?;
                let offline_since_unix_ms = r.u64()?;
                let n = r.u32()?;
                let mut subscriptions = Vec::new();
                for _ in 0..n {
                    let byte = r.u8()?;
                    if byte & !(3 | options::NO_LOCAL | options::RETAIN_AS_PUBLISHED) != 0 {
                        return Err(RecordError::Invalid("subscription options"));
                    }
                    let qos = QoS::from_u8(byte & 3).ok_or(RecordError::Invalid("QoS"))?;
                    let identifier = r.u32()?;
                    subscriptions.push(StoredSubscription {
                        filter: r.str()?,
                        qos,
                        no_local: byte & options::NO_LOCAL != 0,
                        retain_as_published: byte & options::RETAIN_AS_PUBLISHED != 0,
                        identifier,
                    });
                }
                let queued = r.refs()?;
                Record::SessionImage(StoredSession {
                    stamp,
                    client_id,
                    protocol_level,
                    expiry_interval,
                    offline_since_unix_ms,
                    subscriptions,
                    queued,
                    alias,
                })
            }
            kind::MESSAGE => Record::Message(r.u64()?, StoredMessage::decode(&mut r)?),
            kind::QUEUE => Record::Legacy(Legacy::Queue(r.u64()?, r.refs()?)),
            kind::QUEUED => {
                let mid = r.u64()?;
                Record::Queue(mid, r.list(5, |r| Ok((r.u32()?, r.qos()?)))?)
            }
            kind::SENT_TO => {
                let mid = r.u64()?;
                Record::Sent(mid, r.list(7, |r| r.sent_ref(Reader::u32))?)
            }
            kind::ACKED => Record::DoneMany(r.list(6, |r| Ok((r.u32()?, r.u16()?)))?),
            kind::STEPS => r.steps()?,
            kind::STEP => {
                let step = FlowStep::of_kind(r.u8()?).ok_or(RecordError::Invalid("flow step"))?;
                Record::Flow(step, r.u32()?, r.u16()?)
            }
            kind::SESSION_DROP => Record::SessionDrop(r.u64()?, r.str()?),
            kind::RETAIN => Record::Retain(r.u64()?, StoredMessage::decode(&mut r)?),
            kind::RETAIN_DELETE => Record::RetainDelete(r.u64()?, r.str()?),
            kind::SENT => {
                let mid = r.u64()?;
                Record::Legacy(Legacy::Sent(mid, r.list(11, |r| r.sent_ref(Reader::u64))?))
            }
            kind::WILL | kind::WILL_EXPIRING => Record::Will(StoredWill {
                stamp: r.u64()?,
                client_id: r.str()?,
                delay: r.u32()?,
                due_unix_ms: r.u64()?,
                message: StoredMessage::decode(&mut r)?,
                expiry_interval: if kind == kind::WILL_EXPIRING {
                    Some(r.u32()?)
                } else {
                    None
                },
            }),
            kind::WILL_CLEAR => Record::WillClear(r.u64()?, r.str()?),
            kind::DONE_MANY => {
                Record::Legacy(Legacy::DoneMany(r.list(10, |r| Ok((r.u64()?, r.u16()?)))?))
            }
            other => match FlowStep::of_kind(other) {
                Some(step) => Record::Legacy(Legacy::Flow(step, r.u64()?, r.u16()?)),
                None => return Err(RecordError::UnknownKind(other)),
            },
        };
        if !r.0.is_empty() {
            return Err(RecordError::Trailing(r.0.len()));
        }
        Ok(record)
    }
}

/// A u16 little-endian.
fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A string: u16 length + bytes (cut at 65,535 bytes, which MQTT strings
/// never exceed).
fn put_str(out: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
    put_u16(out, bytes.len() as u16);
    out.extend_from_slice(bytes);
}

/// A list of (id u64, QoS u8): u32 count, then the pairs.
fn put_refs(out: &mut Vec<u8>, refs: &[(u64, QoS)]) {
    let n = u32::try_from(refs.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_le_bytes());
    for (id, qos) in refs.iter().take(n as usize) {
        out.extend_from_slice(&id.to_le_bytes());
        out.push(*qos as u8);
    }
}

/// A list: u32 count, then what `item` writes for each.
fn put_list<T>(out: &mut Vec<u8>, items: &[T], mut item: impl FnMut(&mut Vec<u8>, &T)) {
    let n = u32::try_from(items.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_le_bytes());
    for i in items.iter().take(n as usize) {
        item(out, i);
    }
}

impl Legacy {
    /// The format 1 body, as an older fanmq wrote it.
    fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Legacy::Queue(mid, refs) => {
                out.extend_from_slice(&mid.to_le_bytes());
                put_refs(out, refs);
            }
            Legacy::Sent(mid, refs) => {
                out.extend_from_slice(&mid.to_le_bytes());
                put_list(out, refs, |out, (stamp, packet_id, qos)| {
                    out.extend_from_slice(&stamp.to_le_bytes());
                    put_u16(out, *packet_id);
                    out.push(*qos as u8);
                });
            }
            Legacy::Flow(_, stamp, packet_id) => {
                out.extend_from_slice(&stamp.to_le_bytes());
                put_u16(out, *packet_id);
            }
            Legacy::DoneMany(done) => put_list(out, done, |out, (stamp, packet_id)| {
                out.extend_from_slice(&stamp.to_le_bytes());
                put_u16(out, *packet_id);
            }),
        }
    }
}

/// Binary data: u32 length + bytes.
fn put_bin(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&bytes[..len as usize]);
}

/// Reads a record body front to back.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.0.len() < n {
            return Err(RecordError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, RecordError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, RecordError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, RecordError> {
        let mut v = [0u8; 8];
        v.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(v))
    }

    fn str(&mut self) -> Result<ByteString, RecordError> {
        let len = usize::from(self.u16()?);
        utf8(self.take(len)?)
    }

    fn bin(&mut self) -> Result<&'a [u8], RecordError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn refs(&mut self) -> Result<Vec<(u64, QoS)>, RecordError> {
        self.list(9, |r| Ok((r.u64()?, r.qos()?)))
    }

    fn qos(&mut self) -> Result<QoS, RecordError> {
        QoS::from_u8(self.u8()?).ok_or(RecordError::Invalid("QoS"))
    }

    /// A u32 count, then that many items of at least `min` bytes each.
    fn list<T>(
        &mut self,
        min: usize,
        mut item: impl FnMut(&mut Self) -> Result<T, RecordError>,
    ) -> Result<Vec<T>, RecordError> {
        let n = self.u32()?;
        let mut items = Vec::with_capacity((n as usize).min(self.0.len() / min));
        for _ in 0..n {
            items.push(item(self)?);
        }
        Ok(items)
    }

    /// One session's share of a sent record: who (read by `who`), packet
    /// id, QoS; a packet id 0 or QoS 0 is refused.
    fn sent_ref<W>(
        &mut self,
        who: impl FnOnce(&mut Self) -> Result<W, RecordError>,
    ) -> Result<(W, u16, QoS), RecordError> {
        let who = who(self)?;
        let packet_id = self.u16()?;
        let qos = self.qos()?;
        if packet_id == 0 || qos == QoS::AtMostOnce {
            return Err(RecordError::Invalid("sent packet id or QoS"));
        }
        Ok((who, packet_id, qos))
    }

    /// A [`kind::STEPS`] body: the message count u8 and the messages
    /// (id u64, QoS u8, never 0), then a list of entries; an entry that
    /// does nothing, names a message the record lacks or sends packet id 0
    /// is refused.
    fn steps(&mut self) -> Result<Record, RecordError> {
        let n = self.u8()?;
        let mut messages = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let mid = self.u64()?;
            match self.qos()? {
                QoS::AtMostOnce => return Err(RecordError::Invalid("sent QoS")),
                qos => messages.push((mid, qos)),
            }
        }
        let entries = self.list(7, |r| {
            let alias = r.u32()?;
            let done = r.u16()?;
            let message = r.u8()?;
            let sent = if message == 0 { 0 } else { r.u16()? };
            if message > n || (message != 0 && sent == 0) || (message == 0 && done == 0) {
                return Err(RecordError::Invalid("step entry"));
            }
            Ok(StepEntry {
                alias,
                done,
                message,
                sent,
            })
        })?;
        Ok(Record::Steps(messages, entries))
    }

    fn bin_str(&mut self) -> Result<ByteString, RecordError> {
        let bytes = self.bin()?;
        utf8(bytes)
    }
}

/// `bytes` as a string, or an error for invalid UTF-8.
fn utf8(bytes: &[u8]) -> Result<ByteString, RecordError> {
    std::str::from_utf8(bytes)
        .map(ByteString::from)
        .map_err(|_| RecordError::Invalid("UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::XorShift;

    fn stored() -> StoredMessage {
        let mut properties = Properties::new();
        properties.push(Property::PayloadFormatIndicator(true));
        properties.push(Property::ContentType(ByteString::from("text/plain")));
        properties.push(Property::ResponseTopic(ByteString::from("r/t")));
        properties.push(Property::CorrelationData(Bytes::from_static(b"\x00\x01")));
        properties.push(Property::UserProperty(
            ByteString::from("k"),
            ByteString::from("v"),
        ));
        StoredMessage {
            qos: QoS::ExactlyOnce,
            retain: true,
            expires_unix_ms: 0,
            topic: ByteString::from("a/b"),
            properties,
            payload: Bytes::from_static(b"payload"),
        }
    }

    fn samples() -> Vec<Record> {
        vec![
            Record::SessionImage(StoredSession {
                stamp: 99,
                client_id: ByteString::from("c1"),
                protocol_level: 5,
                expiry_interval: 3600,
                offline_since_unix_ms: 1234,
                subscriptions: vec![
                    StoredSubscription {
                        filter: ByteString::from("a/#"),
                        qos: QoS::AtLeastOnce,
                        no_local: true,
                        retain_as_published: false,
                        identifier: 7,
                    },
                    StoredSubscription {
                        filter: ByteString::from("b"),
                        qos: QoS::ExactlyOnce,
                        no_local: false,
                        retain_as_published: true,
                        identifier: 0,
                    },
                ],
                queued: vec![(5, QoS::AtLeastOnce), (6, QoS::ExactlyOnce)],
                alias: 3,
            }),
            Record::SessionImage(StoredSession {
                stamp: 98,
                client_id: ByteString::from("c0"),
                protocol_level: 4,
                expiry_interval: 0,
                offline_since_unix_ms: 0,
                subscriptions: Vec::new(),
                queued: Vec::new(),
                alias: 0,
            }),
            Record::Message(5, stored()),
            Record::Queue(5, vec![(99, QoS::AtLeastOnce), (100, QoS::ExactlyOnce)]),
            Record::SessionDrop(100, ByteString::from("c1")),
            Record::Retain(7 << 16, stored()),
            Record::RetainDelete(8 << 16, ByteString::from("a/b")),
            Record::Sent(
                5,
                vec![(99, 1, QoS::AtLeastOnce), (100, 65535, QoS::ExactlyOnce)],
            ),
            Record::Flow(FlowStep::Done, 99, 1),
            Record::Flow(FlowStep::PubRecd, 100, 65535),
            Record::Flow(FlowStep::AwaitRel, 99, 7),
            Record::Flow(FlowStep::Released, 99, 7),
            Record::Will(StoredWill {
                stamp: 101,
                client_id: ByteString::from("c1"),
                delay: 30,
                due_unix_ms: 5000,
                message: stored(),
                expiry_interval: None,
            }),
            Record::Will(StoredWill {
                stamp: 103,
                client_id: ByteString::from("c2"),
                delay: 0,
                due_unix_ms: 0,
                message: stored(),
                expiry_interval: Some(90),
            }),
            Record::WillClear(102, ByteString::from("c1")),
            Record::DoneMany(vec![(99, 1), (100, 65535)]),
            Record::Steps(
                vec![(5, QoS::AtLeastOnce), (6, QoS::ExactlyOnce)],
                vec![
                    StepEntry {
                        alias: 99,
                        done: 1,
                        message: 1,
                        sent: 1,
                    },
                    StepEntry {
                        alias: 100,
                        done: 65535,
                        message: 0,
                        sent: 0,
                    },
                    StepEntry {
                        alias: 101,
                        done: 0,
                        message: 2,
                        sent: 9,
                    },
                ],
            ),
            Record::Legacy(Legacy::Queue(5, vec![(99, QoS::AtLeastOnce)])),
            Record::Legacy(Legacy::Sent(5, vec![(99, 1, QoS::ExactlyOnce)])),
            Record::Legacy(Legacy::Flow(FlowStep::Done, 99, 1)),
            Record::Legacy(Legacy::Flow(FlowStep::PubRecd, 99, 2)),
            Record::Legacy(Legacy::Flow(FlowStep::AwaitRel, 99, 3)),
            Record::Legacy(Legacy::Flow(FlowStep::Released, 99, 4)),
            Record::Legacy(Legacy::DoneMany(vec![(99, 1), (100, 65535)])),
        ]
    }

    /// A format 1 record as fanmq 1 framed it: bytes written by hand from
    /// the format 1 layout, not by this fanmq's encoder.
    #[test]
    fn format_1_records_written_by_an_older_fanmq_are_read() {
        let stamp = 0x0102_0304_0506_0708u64.to_le_bytes();
        let mut sent = vec![9, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        sent.extend_from_slice(&stamp);
        sent.extend_from_slice(&[7, 0, 1]);
        assert_eq!(
            Record::decode(kind::SENT, &sent),
            Ok(Record::Legacy(Legacy::Sent(
                9,
                vec![(0x0102_0304_0506_0708, 7, QoS::AtLeastOnce)]
            )))
        );
        let mut done = vec![2, 0, 0, 0];
        for pid in [7u8, 8] {
            done.extend_from_slice(&stamp);
            done.extend_from_slice(&[pid, 0]);
        }
        assert_eq!(
            Record::decode(kind::DONE_MANY, &done),
            Ok(Record::Legacy(Legacy::DoneMany(vec![
                (0x0102_0304_0506_0708, 7),
                (0x0102_0304_0506_0708, 8)
            ])))
        );
        let mut step = stamp.to_vec();
        step.extend_from_slice(&[5, 0]);
        assert_eq!(
            Record::decode(kind::PUBRECD, &step),
            Ok(Record::Legacy(Legacy::Flow(
                FlowStep::PubRecd,
                0x0102_0304_0506_0708,
                5
            )))
        );
        let mut queue = vec![9, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        queue.extend_from_slice(&stamp);
        queue.push(2);
        assert_eq!(
            Record::decode(kind::QUEUE, &queue),
            Ok(Record::Legacy(Legacy::Queue(
                9,
                vec![(0x0102_0304_0506_0708, QoS::ExactlyOnce)]
            )))
        );
        // A format 1 image: stamp, client id "c", level 4, expiry 60,
        // online, no subscriptions, nothing queued.
        let mut image = stamp.to_vec();
        image.extend_from_slice(&[1, 0, b'c', 4, 60, 0, 0, 0]);
        image.extend_from_slice(&[0; 8]);
        image.extend_from_slice(&[0; 8]);
        let Ok(Record::SessionImage(read)) = Record::decode(kind::SESSION_IMAGE, &image) else {
            panic!("a format 1 image is read");
        };
        assert_eq!(
            (read.stamp, read.alias, read.expiry_interval),
            (0x0102_0304_0506_0708, 0, 60)
        );
    }

    #[test]
    fn every_record_round_trips() {
        for record in samples() {
            let mut body = Vec::new();
            record.encode_body(&mut body);
            assert_eq!(Record::decode(record.kind(), &body), Ok(record.clone()));
            if !body.is_empty() {
                let short = Record::decode(record.kind(), &body[..body.len() - 1]);
                assert!(short.is_err(), "{record:?} cut short");
            }
            body.push(0);
            assert_eq!(
                Record::decode(record.kind(), &body),
                Err(RecordError::Trailing(1))
            );
        }
        assert_eq!(
            Record::decode(0x55, &[]),
            Err(RecordError::UnknownKind(0x55))
        );
    }

    #[test]
    fn flow_records_are_small_and_refuse_a_zero_packet_id_or_qos_0() {
        let framed = framed_len;
        let one = Record::Sent(1, vec![(2, 3, QoS::AtLeastOnce)]);
        let two = Record::Sent(1, vec![(2, 3, QoS::AtLeastOnce), (4, 5, QoS::ExactlyOnce)]);
        assert_eq!(framed(&two) - framed(&one), 7, "bytes a session");
        assert_eq!(framed(&Record::Flow(FlowStep::Done, 2, 3)), 16);
        let done = |n| framed(&Record::DoneMany(vec![(2, 3); n]));
        assert_eq!(done(2) - done(1), 6, "bytes an acknowledgement");
        let queue = |n| framed(&Record::Queue(1, vec![(2, QoS::AtLeastOnce); n]));
        assert_eq!(queue(2) - queue(1), 5, "bytes a queued reference");
        // Format 1 took 11 + 10 bytes per subscriber of a sent message.
        let legacy_one = Record::Legacy(Legacy::Sent(1, vec![(2, 3, QoS::AtLeastOnce); 1]));
        let legacy_two = Record::Legacy(Legacy::Sent(1, vec![(2, 3, QoS::AtLeastOnce); 2]));
        assert_eq!(framed(&legacy_two) - framed(&legacy_one), 11);
        for bad in [(2, 0, QoS::AtLeastOnce), (2, 3, QoS::AtMostOnce)] {
            let mut body = Vec::new();
            Record::Sent(1, vec![bad]).encode_body(&mut body);
            assert!(Record::decode(kind::SENT_TO, &body).is_err(), "{bad:?}");
            let mut body = Vec::new();
            Record::Legacy(Legacy::Sent(1, vec![(2, bad.1, bad.2)])).encode_body(&mut body);
            assert!(Record::decode(kind::SENT, &body).is_err(), "{bad:?}");
        }
        let mut step = Vec::new();
        Record::Flow(FlowStep::Done, 2, 3).encode_body(&mut step);
        step[0] = 0x55;
        assert!(
            Record::decode(kind::STEP, &step).is_err(),
            "an unknown step"
        );
    }

    #[test]
    fn stamps_only_grow_and_stay_above_loaded_ones() {
        let a = next_stamp();
        let b = next_stamp();
        assert!(b > a);
        seen_stamp(u64::MAX / 2);
        assert!(next_stamp() > u64::MAX / 2);
    }

    #[test]
    fn expiry_is_kept_as_a_wall_clock_deadline() {
        let now = Instant::now();
        let mut message = Message::new(
            ByteString::from("t"),
            Bytes::from_static(b"x"),
            QoS::AtLeastOnce,
            true,
        );
        message.properties = Some(Arc::new(MessageProperties {
            forwarded: Properties::new(),
            expires_at: Some(now + Duration::from_secs(10)),
        }));
        let s = StoredMessage::of(&message, now, 1_000_000);
        assert_eq!(s.expires_unix_ms, 1_010_000);
        let back = s.to_message(5, now, 1_004_000).expect("not yet expired");
        assert_eq!(
            back.properties.and_then(|p| p.expires_at),
            Some(now + Duration::from_secs(6))
        );
        assert_eq!(s.to_message(5, now, 1_010_000), None, "expired at load");
        let plain = StoredMessage::of(
            &Message::new(ByteString::from("t"), Bytes::new(), QoS::AtMostOnce, false),
            now,
            1,
        );
        assert_eq!(
            plain.to_message(0, now, 2).map(|m| m.properties),
            Some(None)
        );
    }

    /// A will record as fanmq wrote it before wills kept their Message
    /// Expiry Interval (kind 0x0C, byte for byte) reads as a will that
    /// never expires; a will without an expiry is still written so, and one
    /// with an expiry is the same body plus the interval as kind 0x0F.
    #[test]
    fn an_older_will_record_reads_and_the_expiry_is_a_new_kind() {
        let mut old = Vec::new();
        old.extend_from_slice(&7u64.to_le_bytes());
        old.extend_from_slice(&[2, 0, b'c', b'1']);
        old.extend_from_slice(&30u32.to_le_bytes());
        old.extend_from_slice(&5000u64.to_le_bytes());
        // The message: QoS 1, not retained, no expiry, topic "w", no
        // properties, payload "bye".
        old.extend_from_slice(&[1, 0]);
        old.extend_from_slice(&0u64.to_le_bytes());
        old.extend_from_slice(&[1, 0, b'w', 0, 0]);
        old.extend_from_slice(&3u32.to_le_bytes());
        old.extend_from_slice(b"bye");
        let will = StoredWill {
            stamp: 7,
            client_id: ByteString::from("c1"),
            delay: 30,
            due_unix_ms: 5000,
            message: StoredMessage {
                qos: QoS::AtLeastOnce,
                retain: false,
                expires_unix_ms: 0,
                topic: ByteString::from("w"),
                properties: Properties::new(),
                payload: Bytes::from_static(b"bye"),
            },
            expiry_interval: None,
        };
        assert_eq!(
            Record::decode(kind::WILL, &old),
            Ok(Record::Will(will.clone()))
        );
        let record = Record::Will(will.clone());
        let mut body = Vec::new();
        record.encode_body(&mut body);
        assert_eq!((record.kind(), &body), (kind::WILL, &old), "unchanged");
        let expiring = Record::Will(StoredWill {
            expiry_interval: Some(60),
            ..will
        });
        let mut body = Vec::new();
        expiring.encode_body(&mut body);
        assert_eq!(expiring.kind(), kind::WILL_EXPIRING);
        assert_eq!(body[..old.len()], old[..]);
        assert_eq!(body[old.len()..], 60u32.to_le_bytes());
        assert_eq!(Record::decode(kind::WILL_EXPIRING, &body), Ok(expiring));
    }

    #[test]
    fn random_bodies_never_panic() {
        let mut rng = XorShift(0xC0FF_EE11);
        let mut encoded: Vec<(u8, Vec<u8>)> = samples()
            .iter()
            .map(|r| {
                let mut b = Vec::new();
                r.encode_body(&mut b);
                (r.kind(), b)
            })
            .collect();
        for _ in 0..5000 {
            let kinds = [
                1u8, 2, 5, 6, 7, 8, 9, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F, 0x10, 0x11, 0x12, 0x13,
                0x14, 0x15, 0x20, 0x21,
            ];
            let kind = match (rng.next() % 24) as usize {
                i if i < kinds.len() => kinds[i],
                _ => rng.next() as u8,
            };
            let len = (rng.next() % 64) as usize;
            let body: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let _ = Record::decode(kind, &body);
            // And valid bodies with bytes flipped.
            let pick = (rng.next() % encoded.len() as u64) as usize;
            let (k, b) = &mut encoded[pick];
            if !b.is_empty() {
                let at = (rng.next() % b.len() as u64) as usize;
                b[at] ^= rng.next() as u8;
            }
            let _ = Record::decode(*k, b);
        }
    }
}
