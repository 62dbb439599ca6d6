//! The application message as it moves through the broker, and its outgoing
//! frames encoded once per shard.
//!
//! A [`Message`] is what a publisher sent (topic, payload, QoS, retain flag). It
//! is cheap to clone: the topic and payload are reference-counted `Bytes`, so a
//! message handed to another shard or kept in a subscriber's queue moves a
//! refcount, not the payload.
//!
//! [`Encoded`] caches the wire form of one message for one fan-out on one shard:
//! every QoS 0 subscriber gets a clone of the same frame, every QoS 1/2
//! subscriber gets the same head (fixed header + topic) and payload with its own
//! packet id written between them (see `session::outqueue::OutFrame`).
//!
//! Sessions, the router and the queues are version-neutral: one [`Message`]
//! serves MQTT 3.1.1 and MQTT 5.0 subscribers alike, and [`Encoded`] keeps one
//! frame per (protocol [`Version`], QoS). An MQTT 5.0 QoS 1/2 PUBLISH has its
//! packet id between the topic and the properties, so its shared head ends
//! after the topic and its shared "payload" frame is the properties followed
//! by the payload (copied once per shard, as the 3.1.1 payload is).
//!
//! A Topic Alias the broker assigned (§3.3.2.3.4) makes a per-subscriber
//! variant of the MQTT 5.0 frame: the alias property, and an empty topic once
//! the client knows the alias. Aliases are chosen from the topic
//! ([`Encoded::alias_for`]), so every subscriber on a shard with the same
//! alias limit gets the same alias for a topic and the variants of one
//! message stay few (one with the topic, one without, per distinct limit):
//! each is encoded once and shared like the plain form ([`AliasUse`] is the
//! key).

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use smallvec::SmallVec;
use std::num::NonZeroU16;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::protocol::Version;
use crate::protocol::v3::{self as codec, QoS};
use crate::protocol::v5::{self, Properties, Property, PublishHeader};

/// Encoded bytes shared by the queues of one shard.
pub type Frame = Rc<[u8]>;

/// Lanes of a shard's [`Batch`]: one per kind of QoS 0 frame (3.1.1, 5.0
/// plain, 5.0 with a Topic Alias).
pub const LANES: usize = 4;

/// The lane of MQTT 3.1.1 frames.
const LANE_V3: u8 = 0;

/// The lane of MQTT 5.0 frames without a Topic Alias.
const LANE_V5: u8 = 1;

/// The lane of MQTT 5.0 frames with a Topic Alias (every variant).
const LANE_V5_ALIASED: u8 = 2;

/// The lane of whole QoS 1/2 PUBLISH packets ([`Encoded::publish`]):
/// subscribers whose packet ids go in step get a burst's messages under
/// the same ids, so the packets they share lie back to back here, and
/// each subscriber's burst is one queue entry and one iovec, as with QoS 0.
const LANE_WHOLE: u8 = 3;

/// QoS 1/2 PUBLISH packets encoded whole, each for one packet id, that
/// one fan-out keeps per wire form ([`Encoded::publish`]): subscribers
/// that receive a message with the same packet id share one frame (at a
/// burst to subscribers that acknowledge as fast as each other, all of
/// them: each session hands out its ids in the same order). A delivery
/// with another id gets the shared head and payload instead. The packets
/// lie in the step's batch ([`LANE_WHOLE`]).
const WHOLE_PUBLISHES: usize = 4;

/// A QoS 1/2 PUBLISH for one subscriber ([`Encoded::publish`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Publish {
    /// The whole packet, its packet id included, shared by every
    /// subscriber given that id: where it lies in the step's batch.
    Whole(BatchRange),
    /// The fixed header and topic, and what follows the packet id (the
    /// payload; with MQTT 5.0, the properties and the payload): the
    /// subscriber writes its packet id between them.
    Parts(Frame, Frame),
}

/// Where one frame lies in the shard's [`Batch`] of this step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchRange {
    /// The lane it was appended to (below [`LANES`]).
    pub lane: u8,
    /// Its first byte in that lane.
    pub start: u32,
    /// Its length in bytes.
    pub len: u32,
}

/// The frames a shard encodes in one step (QoS 0 frames, and whole QoS
/// 1/2 packets shared by the subscribers given the same packet id), one
/// buffer ("lane") per kind of frame, sealed into one shared chunk at the
/// end of the step.
///
/// Why lanes: a subscriber's consecutive frames of one step extend one
/// queue entry only when they are adjacent in the batch
/// (`session::outqueue::OutQueue::push_batch`). With one buffer, a step
/// that serves both 3.1.1 and 5.0 subscribers interleaves their frames
/// (3.1.1 frame of message 1, 5.0 frame of message 1, 3.1.1 frame of
/// message 2, ...), so every subscriber got one entry and one iovec per
/// message instead of one per step. With a lane per kind, each kind's
/// frames stay back to back.
#[derive(Debug, Default)]
pub struct Batch {
    /// The frames of each lane, in the order they were encoded.
    lanes: [BytesMut; LANES],
    /// The shard's numbers for topics delivered with a server Topic Alias
    /// (kept across steps, see [`TopicNumbers`]).
    topics: TopicNumbers,
}

/// How many topics a shard's [`TopicNumbers`] keeps before it starts over:
/// a fan-out broker aliases a few hot topics; a shard that sees more forgets
/// them all at once (about 100 bytes each, so at most a few hundred KB).
const TOPIC_NUMBERS_KEPT: usize = 4096;

/// The next topic number to give, in the whole process (0 is never given:
/// it means "none"). Process-wide, so that no two [`TopicNumbers`] give the
/// same number to different topics; taken once per topic a shard sees, never
/// per delivery.
static NEXT_TOPIC_NUMBER: AtomicU64 = AtomicU64::new(1);

/// One number per topic that a shard delivered with a server Topic Alias,
/// so that a connection can remember the topic its alias stands for as a
/// number held inline (`session::alias::ServerAliases`) and check a
/// repeated topic with one comparison, without reading its own copy of the
/// topic. A number is never given to two topics (numbers only grow; when
/// the map starts over, forgotten topics get new numbers, and a
/// connection holding an old one only misses its shortcut).
#[derive(Debug, Default)]
struct TopicNumbers {
    /// The number of each topic seen since the map last started over.
    numbers: ahash::AHashMap<Box<str>, u64>,
}

impl TopicNumbers {
    /// The number of `topic`, given now if it has none.
    fn number(&mut self, topic: &str) -> u64 {
        if let Some(&number) = self.numbers.get(topic) {
            return number;
        }
        if self.numbers.len() >= TOPIC_NUMBERS_KEPT {
            self.numbers.clear();
        }
        let number = NEXT_TOPIC_NUMBER.fetch_add(1, Ordering::Relaxed);
        self.numbers.insert(Box::from(topic), number);
        number
    }
}

impl Batch {
    /// True when nothing was encoded in this step.
    pub fn is_empty(&self) -> bool {
        self.lanes.iter().all(BytesMut::is_empty)
    }

    /// Bytes encoded in this step, over every lane.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lanes.iter().map(BytesMut::len).sum()
    }

    /// Ends the step: the lanes back to back as one shared chunk, and where
    /// each lane starts in it (what `OutQueue::seal` adds to a range's
    /// start). The lanes are empty afterwards, their memory kept.
    pub fn seal(&mut self) -> (Frame, [u32; LANES]) {
        let mut bases = [0u32; LANES];
        let mut at = 0usize;
        for (base, lane) in bases.iter_mut().zip(&self.lanes) {
            *base = u32::try_from(at).unwrap_or(u32::MAX);
            at += lane.len();
        }
        let [first, rest @ ..] = &mut self.lanes;
        for lane in rest.iter_mut() {
            first.extend_from_slice(lane);
            lane.clear();
        }
        let chunk = Frame::from(&first[..]);
        first.clear();
        (chunk, bases)
    }

    /// Appends what `encode` writes to `lane` and returns where it lies.
    fn append(&mut self, lane: u8, encode: impl FnOnce(&mut BytesMut)) -> BatchRange {
        let Some(buf) = self.lanes.get_mut(usize::from(lane)) else {
            return BatchRange {
                lane,
                start: 0,
                len: 0,
            };
        };
        let start = buf.len();
        encode(buf);
        let len = buf.len() - start;
        BatchRange {
            lane,
            start: u32::try_from(start).unwrap_or(u32::MAX),
            len: u32::try_from(len).unwrap_or(0),
        }
    }
}

/// Seeds of the topic hash that picks a server Topic Alias: fixed, so that
/// every subscriber of a shard gets the same alias for a topic (the frames
/// stay shared), and arbitrary (nothing depends on the values).
const ALIAS_HASH: ahash::RandomState = ahash::RandomState::with_seeds(
    0x243f_6a88_85a3_08d3,
    0x1319_8a2e_0370_7344,
    0xa409_3822_299f_31d0,
    0x082e_fa98_ec4e_6c89,
);

/// How one MQTT 5.0 delivery uses a Topic Alias the broker assigned
/// (§3.3.2.3.4): the key of a frame variant in [`Encoded`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AliasUse {
    /// The alias, 1 to the client's Topic Alias Maximum.
    pub alias: NonZeroU16,
    /// True when this connection already maps the alias to this topic: the
    /// PUBLISH carries an empty topic. False: topic and alias, which (re)sets
    /// the mapping.
    pub known: bool,
}

/// An application message (MQTT 3.1.1 §3.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The topic name it was published to (already validated).
    pub topic: ByteString,
    /// The application payload, shared between every queue that holds it.
    pub payload: Bytes,
    /// The QoS it was published with (or, in a subscriber's queue, the QoS it
    /// will be delivered with after the downgrade to the granted QoS).
    pub qos: QoS,
    /// The RETAIN flag as the publisher set it.
    pub retain: bool,
    /// Where a retained message stands in the order every replica agrees on
    /// (`router::retain::RetainStore::stamp`); 0 when not retained or not
    /// stamped (only the shard that received it stamps it). 8 bytes, past
    /// the padding: a message is 80 bytes, not 72.
    pub retain_stamp: u64,
    /// MQTT 5.0 PUBLISH properties to forward, boxed behind an `Arc` (the
    /// message crosses shards): `None` for every message without any, so a
    /// 3.1.1 message costs one pointer more and nothing per delivery.
    pub properties: Option<Arc<MessageProperties>>,
}

/// What an MQTT 5.0 publisher said besides topic and payload, kept with the
/// message for its MQTT 5.0 subscribers (3.1.1 subscribers get the plain
/// message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageProperties {
    /// Properties forwarded unchanged (§3.3.2.3): Payload Format Indicator,
    /// Content Type, Response Topic, Correlation Data, User Properties, in the
    /// publisher's order. Never a Topic Alias (resolved on receipt), a
    /// Subscription Identifier (added per subscriber) or the Message Expiry
    /// Interval (written from `expires_at` as what is left, §3.3.2.3.3).
    pub forwarded: Properties,
    /// When the message expires (its Message Expiry Interval after receipt);
    /// a queued or retained message past it is not delivered (§3.3.2.3.3).
    pub expires_at: Option<Instant>,
}

impl MessageProperties {
    /// What of a PUBLISH's (or Will's) properties goes on with the message
    /// (§3.3.2.3): Payload Format Indicator, Content Type, Response Topic,
    /// Correlation Data and User Properties unchanged, the Message Expiry
    /// Interval as a deadline counted from `now`; None when there is none
    /// of them (no allocation).
    pub fn of(properties: &Properties, now: Instant) -> Option<Arc<MessageProperties>> {
        let mut forwarded = Properties::new();
        let mut expires_at = None;
        for property in properties.iter() {
            match property {
                Property::PayloadFormatIndicator(_)
                | Property::ContentType(_)
                | Property::ResponseTopic(_)
                | Property::CorrelationData(_)
                | Property::UserProperty(..) => forwarded.push(property.clone()),
                Property::MessageExpiryInterval(secs) => {
                    expires_at = Some(now + std::time::Duration::from_secs(u64::from(*secs)));
                }
                _ => {}
            }
        }
        if forwarded.is_empty() && expires_at.is_none() {
            return None;
        }
        Some(Arc::new(MessageProperties {
            forwarded,
            expires_at,
        }))
    }
}

impl Message {
    /// A message without MQTT 5.0 properties.
    pub fn new(topic: ByteString, payload: Bytes, qos: QoS, retain: bool) -> Message {
        Message {
            topic,
            payload,
            qos,
            retain,
            retain_stamp: 0,
            properties: None,
        }
    }

    /// True once the message's Message Expiry Interval has passed (never
    /// for a message without one; the clock is read only for one with).
    pub fn is_expired(&self) -> bool {
        self.properties
            .as_ref()
            .and_then(|p| p.expires_at)
            .is_some_and(|at| at <= Instant::now())
    }

    /// The properties an MQTT 5.0 subscriber gets with this message now: the
    /// forwarded ones plus the Message Expiry Interval left (rounded up, so
    /// a live message never says 0). Empty for a message without any.
    pub fn v5_properties(&self, now: Instant) -> Properties {
        let Some(extra) = self.properties.as_deref() else {
            return Properties::new();
        };
        let mut properties = extra.forwarded.clone();
        if let Some(at) = extra.expires_at {
            let left = at.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            properties.push(Property::MessageExpiryInterval(
                u32::try_from(secs.max(1)).unwrap_or(u32::MAX),
            ));
        }
        properties
    }

    /// Bytes this message occupies on the wire as a PUBLISH with a packet id
    /// (used to account queued bytes against a client's limit).
    pub fn wire_len(&self) -> usize {
        let remaining = 2 + self.topic.len() + 2 + self.payload.len();
        1 + codec::remaining_length_len(remaining) + remaining
    }

    /// Encodes a complete PUBLISH frame for a subscriber speaking `version`
    /// (alone: a retained message on SUBSCRIBE, a redelivery with DUP, a
    /// message from the pending queue).
    pub fn encode_whole(
        &self,
        version: Version,
        qos: QoS,
        retain: bool,
        dup: bool,
        packet_id: u16,
    ) -> Frame {
        if version == Version::V5 {
            let properties = self.v5_properties(Instant::now());
            let header = PublishHeader {
                topic: &self.topic,
                qos,
                retain,
                dup,
                properties: &properties,
            };
            let mut out = BytesMut::new();
            report_unencodable_v5(v5::encode_publish(
                &header,
                packet_id,
                &self.payload,
                &mut out,
            ));
            return Frame::from(&out[..]);
        }
        let mut out = BytesMut::with_capacity(self.wire_len());
        let encoded = codec::encode_publish(
            &self.topic,
            qos,
            retain,
            dup,
            packet_id,
            &self.payload,
            &mut out,
        );
        report_unencodable(encoded);
        Frame::from(&out[..])
    }
}

/// The wire forms of one message for one fan-out on one shard, each encoded on
/// first use and then shared by every subscriber that needs it.
///
/// Normal forwarding always clears RETAIN (§3.3.1.3), so only the QoS and
/// the subscriber's protocol version vary. The MQTT 5.0 forms live in a box
/// of their own ([`EncodedV5`]), allocated only when an MQTT 5.0 subscriber
/// matches, so a 3.1.1-only fan-out costs what it did.
pub struct Encoded<'a> {
    /// The message being fanned out.
    pub message: &'a Message,
    /// The publisher's session key when it is on this shard (for MQTT 5.0
    /// No Local); None for messages from other shards, wills and `$SYS`.
    pub origin: Option<u32>,
    /// The shard's batch of this step, where QoS 0 frames go.
    batch: &'a mut Batch,
    /// Where the QoS 0 frame without a Topic Alias lies in the shard's
    /// batch of this step, once encoded: index 0 for 3.1.1, 1 for 5.0. Kept
    /// here, not in [`V5Forms`], so that the per-subscriber lookup is the
    /// same indexed load for both versions.
    qos0: [Option<BatchRange>; 2],
    /// Fixed header + topic for QoS 1 and QoS 2 deliveries: index 0 is QoS 1.
    heads: [Option<Frame>; 2],
    /// The payload as a shard-local frame, for QoS 1 and 2 deliveries.
    payload: Option<Frame>,
    /// Whole QoS 1/2 PUBLISH packets without a Topic Alias, at most
    /// [`WHOLE_PUBLISHES`]: (form: QoS 1 or 2, 3.1.1 or 5.0; packet id;
    /// where the packet lies in the batch).
    whole: SmallVec<[(u8, u16, BatchRange); WHOLE_PUBLISHES]>,
    /// The MQTT 5.0 forms, once an MQTT 5.0 subscriber needed one: the plain
    /// one and those with a Topic Alias, each encoded once.
    v5: Option<Box<V5Forms>>,
    /// The hash of the topic that picks its Topic Alias, once computed.
    topic_hash: Option<u64>,
    /// The last alias computed ([`Encoded::alias_for`]), with the maximum
    /// it was computed for: most subscribers of a shard share one maximum,
    /// so the division is done once per message.
    last_alias: Option<(NonZeroU16, NonZeroU16)>,
    /// The topic's number on this shard ([`Encoded::topic_number`]), 0
    /// until asked for.
    topic_number: u64,
    /// The last aliased QoS 0 frame range for a connection that does not
    /// know the alias yet (index 0) and for one that does (index 1), with
    /// the alias: the frame of most aliased deliveries without a search of
    /// [`V5Forms::aliased`].
    aliased_qos0: [Option<(NonZeroU16, BatchRange)>; 2],
}

/// The MQTT 5.0 wire forms of one message for one fan-out on one shard
/// (the plain QoS 0 frame's range is in [`Encoded::qos0`]).
#[derive(Default)]
struct V5Forms {
    /// Without a Topic Alias (QoS 1/2): found without a search.
    plain: EncodedV5,
    /// With a Topic Alias, one per [`AliasUse`] (usually one or two).
    aliased: SmallVec<[EncodedV5; 2]>,
}

/// One MQTT 5.0 wire form of one message for one fan-out on one shard.
#[derive(Default)]
struct EncodedV5 {
    /// The Topic Alias this form carries (None: the plain form).
    alias: Option<AliasUse>,
    /// Where the QoS 0 frame lies in the shard's batch (aliased forms only).
    qos0: Option<BatchRange>,
    /// Fixed header + topic for QoS 1 and QoS 2 (index 0 is QoS 1); the
    /// packet id follows, then [`EncodedV5::tail`].
    heads: [Option<Frame>; 2],
    /// Properties (with their length) and payload: what follows the packet
    /// id of a QoS 1/2 PUBLISH, the same for both QoS.
    tail: Option<Frame>,
}

impl<'a> Encoded<'a> {
    /// Ends the step in the middle of this fan-out (tests that write a
    /// session's queue between deliveries): seals the batch
    /// ([`Batch::seal`]) and forgets the ranges encoded in it, so that the
    /// next delivery encodes its frame again, in the next step's batch.
    #[cfg(test)]
    pub fn seal(&mut self) -> (Frame, [u32; LANES]) {
        self.qos0 = [None, None];
        self.whole.clear();
        self.aliased_qos0 = [None, None];
        self.v5 = None;
        self.batch.seal()
    }

    /// Starts an empty cache for `message`, encoding into `batch`.
    pub fn new(message: &'a Message, batch: &'a mut Batch) -> Self {
        Encoded {
            message,
            origin: None,
            batch,
            qos0: [None, None],
            heads: [None, None],
            payload: None,
            whole: SmallVec::new(),
            v5: None,
            topic_hash: None,
            last_alias: None,
            topic_number: 0,
            aliased_qos0: [None, None],
        }
    }

    /// The Topic Alias of this message's topic for a client that accepts
    /// `maximum` (at least 1) aliases from the broker: 1 + the topic's hash
    /// modulo `maximum`, the same for every such client (see the module
    /// documentation). Two topics may get the same alias; the connection's
    /// table then keeps the latest (session::alias).
    #[inline]
    pub fn alias_for(&mut self, maximum: NonZeroU16) -> NonZeroU16 {
        match self.last_alias {
            Some((max, alias)) if max == maximum => alias,
            _ => self.compute_alias(maximum),
        }
    }

    /// [`Encoded::alias_for`] for a maximum other than the last one.
    #[inline(never)]
    fn compute_alias(&mut self, maximum: NonZeroU16) -> NonZeroU16 {
        let message = self.message;
        let hash = *self
            .topic_hash
            .get_or_insert_with(|| ALIAS_HASH.hash_one(message.topic.as_bytes()));
        let index = u16::try_from(hash % u64::from(maximum.get())).unwrap_or(0);
        let alias = NonZeroU16::MIN.saturating_add(index);
        self.last_alias = Some((maximum, alias));
        alias
    }

    /// The number of this message's topic on this shard (never 0): the
    /// same for every message on the same topic (unless the shard's
    /// numbering started over in between), different for every other
    /// topic. Looked up once per message, then one load.
    #[inline]
    pub fn topic_number(&mut self) -> u64 {
        if self.topic_number == 0 {
            self.topic_number = self.batch.topics.number(&self.message.topic);
        }
        self.topic_number
    }

    /// The QoS 0 frame's range in the shard's batch of this step for a
    /// subscriber speaking `version`: encoded (appended) the first time,
    /// then shared by every subscriber of that version. Inlined: after the
    /// first subscriber it is one load and test, for either version.
    #[inline]
    pub fn qos0_frame(&mut self, version: Version) -> BatchRange {
        let slot = usize::from(version == Version::V5);
        if let Some(range) = self.qos0[slot] {
            return range;
        }
        self.encode_qos0(version)
    }

    /// Encodes the QoS 0 frame without a Topic Alias for `version` into its
    /// lane (the first subscriber of that version in this fan-out).
    #[inline(never)]
    fn encode_qos0(&mut self, version: Version) -> BatchRange {
        let message = self.message;
        let range = if version == Version::V5 {
            let properties = message.v5_properties(Instant::now());
            let header = publish_header(message, QoS::AtMostOnce, &properties, None);
            self.batch.append(LANE_V5, |batch| {
                report_unencodable_v5(v5::encode_publish(&header, 0, &message.payload, batch));
            })
        } else {
            self.batch.append(LANE_V3, |batch| {
                report_unencodable(codec::encode_publish(
                    &message.topic,
                    QoS::AtMostOnce,
                    false,
                    false,
                    0,
                    &message.payload,
                    batch,
                ));
            })
        };
        self.qos0[usize::from(version == Version::V5)] = Some(range);
        range
    }

    /// The shared head (fixed header and topic) of a QoS 1 or 2 PUBLISH for
    /// a subscriber speaking `version`; the caller writes its own packet id
    /// and then [`Encoded::payload`].
    pub fn head(&mut self, version: Version, qos: QoS) -> Frame {
        if version == Version::V5 {
            return self.v5_publish(qos, None).0;
        }
        let message = self.message;
        let slot = if qos == QoS::ExactlyOnce { 1 } else { 0 };
        self.heads[slot]
            .get_or_insert_with(|| {
                let mut out = BytesMut::with_capacity(8 + message.topic.len());
                let encoded = codec::encode_publish_head(
                    &message.topic,
                    qos,
                    false,
                    false,
                    message.payload.len(),
                    &mut out,
                );
                report_unencodable(encoded);
                Frame::from(&out[..])
            })
            .clone()
    }

    /// What follows the packet id of a QoS 1/2 PUBLISH for a subscriber
    /// speaking `version`, copied once per shard into a shard-local frame:
    /// the payload (3.1.1), or the properties and the payload (5.0).
    pub fn payload(&mut self, version: Version) -> Frame {
        if version == Version::V5 {
            return self.v5_publish(QoS::AtLeastOnce, None).1;
        }
        let message = self.message;
        self.payload
            .get_or_insert_with(|| Frame::from(&message.payload[..]))
            .clone()
    }

    /// A QoS 1 or 2 PUBLISH without a Topic Alias with `packet_id` for a
    /// subscriber speaking `version`: the whole packet, encoded once for
    /// every subscriber given the same id (up to [`WHOLE_PUBLISHES`] ids
    /// per form), else the shared head and payload ([`Encoded::head`],
    /// [`Encoded::payload`]). One piece to write instead of three, and no
    /// copy of the payload per subscriber.
    pub fn publish(&mut self, version: Version, qos: QoS, packet_id: u16) -> Publish {
        let form = u8::from(qos == QoS::ExactlyOnce) | (u8::from(version == Version::V5) << 1);
        if let Some(&(_, _, range)) = self
            .whole
            .iter()
            .find(|(f, id, _)| *f == form && *id == packet_id)
        {
            return Publish::Whole(range);
        }
        let head = self.head(version, qos);
        let payload = self.payload(version);
        if self.whole.len() == WHOLE_PUBLISHES {
            return Publish::Parts(head, payload);
        }
        let range = self.batch.append(LANE_WHOLE, |batch| {
            batch.reserve(head.len() + 2 + payload.len());
            batch.extend_from_slice(&head);
            batch.extend_from_slice(&packet_id.to_be_bytes());
            batch.extend_from_slice(&payload);
        });
        self.whole.push((form, packet_id, range));
        Publish::Whole(range)
    }

    /// The MQTT 5.0 QoS 0 frame with Topic Alias `alias`: its range in the
    /// shard's batch, encoded the first time, then shared by every
    /// subscriber that uses the alias the same way.
    #[inline]
    pub fn qos0_frame_aliased(&mut self, alias: AliasUse) -> BatchRange {
        match self.aliased_qos0[usize::from(alias.known)] {
            Some((last, range)) if last == alias.alias => range,
            _ => self.find_qos0_aliased(alias),
        }
    }

    /// [`Encoded::qos0_frame_aliased`] for another alias than the last one:
    /// the form's range, encoded the first time.
    #[inline(never)]
    fn find_qos0_aliased(&mut self, alias: AliasUse) -> BatchRange {
        let message = self.message;
        if let Some(range) = self.v5_form(Some(alias)).qos0 {
            self.aliased_qos0[usize::from(alias.known)] = Some((alias.alias, range));
            return range;
        }
        let properties = v5_properties(message, Some(alias));
        let header = publish_header(message, QoS::AtMostOnce, &properties, Some(alias));
        let range = self.batch.append(LANE_V5_ALIASED, |batch| {
            report_unencodable_v5(v5::encode_publish(&header, 0, &message.payload, batch));
        });
        self.v5_form(Some(alias)).qos0 = Some(range);
        self.aliased_qos0[usize::from(alias.known)] = Some((alias.alias, range));
        range
    }

    /// The MQTT 5.0 head and tail of a QoS 1 or 2 PUBLISH with Topic Alias
    /// `alias` (as [`Encoded::head`] and [`Encoded::payload`]): the head
    /// (with the topic or without) shared by every subscriber that uses the
    /// alias the same way, the tail (properties with the alias, payload) by
    /// every one that uses it at all.
    pub fn aliased_publish(&mut self, qos: QoS, alias: AliasUse) -> (Frame, Frame) {
        self.v5_publish(qos, Some(alias))
    }

    /// The MQTT 5.0 form with Topic Alias `alias` (None: the plain one),
    /// added empty on first use.
    fn v5_form(&mut self, alias: Option<AliasUse>) -> &mut EncodedV5 {
        let forms = self.v5.get_or_insert_with(Box::default);
        if alias.is_none() {
            return &mut forms.plain;
        }
        let aliased = &mut forms.aliased;
        let at = match aliased.iter().position(|form| form.alias == alias) {
            Some(at) => at,
            None => {
                aliased.push(EncodedV5 {
                    alias,
                    ..EncodedV5::default()
                });
                aliased.len() - 1
            }
        };
        &mut aliased[at]
    }

    /// The MQTT 5.0 head for `qos` (1 or 2) and the tail shared by both,
    /// with Topic Alias `alias` or without, encoded on first use:
    /// `encode_publish_head` writes fixed header, topic, a packet id slot
    /// and the properties; the head is what comes before the slot, the tail
    /// what comes after it, then the payload.
    fn v5_publish(&mut self, qos: QoS, alias: Option<AliasUse>) -> (Frame, Frame) {
        let message = self.message;
        let v5 = self.v5_form(alias);
        let slot = if qos == QoS::ExactlyOnce { 1 } else { 0 };
        if let (Some(head), Some(tail)) = (&v5.heads[slot], &v5.tail) {
            return (head.clone(), tail.clone());
        }
        let properties = v5_properties(message, alias);
        let header = publish_header(message, qos, &properties, alias);
        let mut out = BytesMut::new();
        let at = match v5::encode_publish_head(&header, message.payload.len(), &mut out) {
            Ok(Some(at)) => at,
            Ok(None) => 0,
            Err(e) => {
                log::error!("cannot encode an outgoing PUBLISH: {e}");
                0
            }
        };
        let head = Frame::from(out.get(..at).unwrap_or(&[]));
        let tail = v5.tail.get_or_insert_with(|| {
            let props = out.get(at + 2..).unwrap_or(&[]);
            let mut tail = Vec::with_capacity(props.len() + message.payload.len());
            tail.extend_from_slice(props);
            tail.extend_from_slice(&message.payload);
            Frame::from(tail)
        });
        let tail = tail.clone();
        v5.heads[slot] = Some(head.clone());
        (head, tail)
    }
}

/// The properties of a forwarded MQTT 5.0 PUBLISH: the message's, plus the
/// Topic Alias when the delivery uses one.
fn v5_properties(message: &Message, alias: Option<AliasUse>) -> Properties {
    let mut properties = message.v5_properties(Instant::now());
    if let Some(alias) = alias {
        properties.push(Property::TopicAlias(alias.alias));
    }
    properties
}

/// The header of a forwarded MQTT 5.0 PUBLISH: RETAIN cleared (§3.3.1.3),
/// never DUP; the topic left out when the client knows its alias.
fn publish_header<'m>(
    message: &'m Message,
    qos: QoS,
    properties: &'m Properties,
    alias: Option<AliasUse>,
) -> PublishHeader<'m> {
    let topic = if alias.is_some_and(|a| a.known) {
        ""
    } else {
        &message.topic
    };
    PublishHeader {
        topic,
        qos,
        retain: false,
        dup: false,
        properties,
    }
}

/// As [`report_unencodable`], for the MQTT 5.0 encoder.
fn report_unencodable_v5(result: Result<(), v5::EncodeError>) {
    if let Err(e) = result {
        log::error!("cannot encode an outgoing MQTT 5.0 PUBLISH: {e}");
    }
}

/// Encoding a message cannot fail: its topic and payload come from a decoded
/// packet no larger than `max_packet_size` (far below MQTT's 256 MiB limit),
/// and forwarding never makes a packet larger. Should that ever break, the
/// frame stays empty (nothing is sent) and the error is logged.
fn report_unencodable(result: Result<(), codec::EncodeError>) {
    if let Err(e) = result {
        log::error!("cannot encode an outgoing PUBLISH: {e}");
    }
}
