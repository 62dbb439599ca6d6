//! The hand-over window of a session moving between nodes
//! (docs/design/cluster.md §9, "The hand-over window").
//!
//! Without this, a persistent session moving from node A to node B misses
//! what other nodes publish between A's hand-over (A stops holding its
//! subscriptions) and B's grant. So:
//!
//! 1. Every QoS 1/2 message a node publishes on NATS carries its origin:
//!    the node's incarnation and a sequence number, one per node, counted
//!    by the bridge in the order it publishes (`headers::Origin`). NATS
//!    keeps one connection's messages in order to each subscriber.
//! 2. A, asked to hand a session over, first holds the NATS subscriptions
//!    of the session's filters itself and collects what they bring for it
//!    (a [`Collector`]), then tells every shard to stop giving the session
//!    messages from NATS (`ToShard::Handing`): what reached the session
//!    before that mark is in the image it hands over, what came after is
//!    collected, each once.
//! 3. B, once it has the image and won the record, holds the same
//!    subscriptions, waits until the server has them, collects what they
//!    bring, and only then asks A for what A collected (the *tail*,
//!    `<root>.c.<node>.tail`). A answers and drops its collector.
//! 4. B merges ([`merge`]): per origin, the tail's messages below the
//!    first sequence number B got itself, then B's own; appends them to the
//!    image's queue; and hands the image to the claim's shard. From then
//!    on its subscriptions' messages go to that shard (which keeps them
//!    for the attaching session) until the session's own subscriptions
//!    hold them.
//! 5. If B's write of the record never lands, a claim of A takes the
//!    session back from the copy A kept ([`reclaim`]): A's collector,
//!    open for that up to [`COLLECT_FOR`], and A's own messages go back
//!    to the session instead of to B.
//!
//! Messages published on A or B themselves never come back through NATS
//! to their node: their local delivery is shard to shard. A adds its own
//! to the tail from its ring of recent publishes and B takes its own from
//! the claim's shard at the grant, by their positions (cluster::positions;
//! the tail answer's `Fanmq-Tail-Cover` header names up to where A's own
//! are in it).
//!
//! Topics on the escaped subject are collected as the others (their
//! topic travels in a header). With a NATS cluster of several servers a
//! message of the tail that reaches B again after the merge is dropped
//! for the session for [`HOLD_AFTER_GRANT`] ([`delivered_highs`]).
//!
//! Not covered: QoS 0 (an offline session keeps none), shared
//! subscriptions, a tail over [`MAX_TAIL`], and, with several NATS
//! servers, a message that reached A only after it answered; if A does
//! not answer in time B attaches what it has (counted:
//! `cluster_tails_missed`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytestring::ByteString;

use crate::cluster::bridge::{Bridge, Shared};
use crate::cluster::headers::Origin;
use crate::cluster::link::{Interest, ToShard};
use crate::cluster::positions;
use crate::protocol::message::Message;
use crate::protocol::topic;
use crate::protocol::v3::QoS;
use crate::router::shared;
use crate::store::record::{Record, RecordError, StoredMessage, unix_ms_now};

/// Most bytes of messages one collector holds (as [`encode_tail`] writes
/// them): the tail travels as one NATS reply, under NATS's default
/// `max_payload` (1 MiB). Beyond it the collector stops, and what came
/// after is lost for the session (logged).
pub const MAX_TAIL: usize = 1_000_000;

/// How long the old owner collects for a session it handed over, unless
/// the new owner asks for the tail first (right after its compare-and-set,
/// well within its claim's 8 s deadline) or a claim of the old owner takes
/// the session back ([`reclaim`]): that claim comes when the new owner's
/// write never landed, `ownership::HANDED_SETTLE` (2 s) to 60 s
/// (the old owner's copy of the state for racers) after the hand-over,
/// and gives the session what was collected. 60 s, so the collector
/// covers that whole window; it costs only where a hand-over's tail is
/// never asked for (a cut-off or lost new owner): at most [`MAX_TAIL`]
/// per session, and its filters held on NATS that long.
pub const COLLECT_FOR: Duration = Duration::from_secs(60);

/// How long the new owner keeps the session's subscriptions held for the
/// claim's shard after its grant: the connection attaches the session
/// (whose own subscriptions then hold them) within the claim's 10 s.
pub const HOLD_AFTER_GRANT: Duration = Duration::from_secs(10);

/// Why a tail cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// A record is cut short or invalid.
    #[error("tail: {0}")]
    Record(#[from] RecordError),
    /// The bytes are not a tail.
    #[error("tail: {0}")]
    Layout(&'static str),
}

/// The messages collected for one session while it moves, each with its
/// origin, bounded by [`MAX_TAIL`].
#[derive(Debug)]
pub struct Collector {
    /// The client id.
    pub client_id: ByteString,
    /// The session's subscriptions (shared ones left out): filter, QoS
    /// granted.
    pub filters: Vec<(ByteString, QoS)>,
    /// What was collected, in the order it came.
    pub entries: Vec<(Origin, Message)>,
    /// Bytes of `entries` as [`encode_tail`] writes them.
    bytes: usize,
    /// Set when a message did not fit: nothing more is collected.
    pub overflowed: bool,
}

impl Collector {
    /// An empty collector for `client_id` with the session's `filters`.
    pub fn new(client_id: ByteString, filters: Vec<(ByteString, QoS)>) -> Self {
        Collector {
            client_id,
            filters,
            entries: Vec::new(),
            bytes: 0,
            overflowed: false,
        }
    }

    /// `message`, of `origin`, came on the NATS subscription of `filter`:
    /// kept (at the QoS the session takes it) if the session takes it
    /// through that filter ([`takes`]) and it is QoS 1 or 2.
    pub fn offer(&mut self, filter: &str, origin: Origin, message: &Message) {
        if let Some(granted) = takes(&self.filters, filter, &message.topic) {
            self.keep(granted, origin, message);
        }
    }

    /// `message`, of `origin`, came on the escaped subject (its topic in a
    /// header, `cluster::headers`): kept as [`Collector::offer`] keeps it
    /// if any of the session's filters matches its topic ([`takes_any`]),
    /// as the shards match that subject's messages in full.
    pub fn offer_escaped(&mut self, origin: Origin, message: &Message) {
        if let Some(granted) = takes_any(&self.filters, &message.topic) {
            self.keep(granted, origin, message);
        }
    }

    /// Keeps `message`, of `origin`, at the lower of its QoS and `granted`,
    /// if that is QoS 1 or 2 and it fits.
    fn keep(&mut self, granted: QoS, origin: Origin, message: &Message) {
        if self.overflowed || message.qos == QoS::AtMostOnce {
            return;
        }
        let qos = message.qos.min(granted);
        if qos == QoS::AtMostOnce {
            return;
        }
        let size = entry_size(message);
        if self.bytes + size > MAX_TAIL {
            log::warn!(
                "cluster: tail of {:?} over {MAX_TAIL} bytes: later messages of its move are lost",
                self.client_id
            );
            self.overflowed = true;
            return;
        }
        self.bytes += size;
        let mut kept = message.clone();
        kept.qos = qos;
        kept.retain = false;
        self.entries.push((origin, kept));
    }
}

/// The QoS at which a session of `filters` takes a message on `topic`
/// through any of them (the highest granted among those that match), or
/// None: for the escaped subject, which the node receives once whatever
/// its filters.
pub fn takes_any(filters: &[(ByteString, QoS)], topic: &str) -> Option<QoS> {
    filters
        .iter()
        .filter(|(own, _)| topic::filter_matches(own, topic))
        .map(|&(_, qos)| qos)
        .max()
}

/// The QoS at which a session of `filters` takes a message on `topic` that
/// came on the NATS subscription of `filter`, or None: NATS sends one copy
/// per matching subscription of the node, so a session takes it through
/// the smallest (byte order) of its filters that match the topic only, at
/// the highest QoS granted among them (the rule of `shard::cluster`'s
/// routing).
pub fn takes(filters: &[(ByteString, QoS)], filter: &str, topic: &str) -> Option<QoS> {
    let mut smallest: Option<&str> = None;
    let mut granted = QoS::AtMostOnce;
    for (own, qos) in filters {
        let own: &str = own;
        if topic::filter_matches(own, topic) {
            if smallest.is_none_or(|s| own < s) {
                smallest = Some(own);
            }
            granted = granted.max(*qos);
        }
    }
    (smallest == Some(filter)).then_some(granted)
}

/// What the new owner delivers, in order, of the old owner's `tail` and
/// what it got itself (`direct`) since it held the subscriptions: per
/// origin, the tail's messages with a sequence number below the first one
/// it got directly (all of them if it got none of that origin), then its
/// own. Each origin's messages reach both nodes in the same order, and
/// the new owner got every one from its first on, so nothing is given
/// twice or left out.
pub fn merge(tail: Vec<(Origin, Message)>, direct: Vec<(Origin, Message)>) -> Vec<Message> {
    let mut first: HashMap<u64, u64> = HashMap::new();
    for (origin, _) in &direct {
        first.entry(origin.node).or_insert(origin.seq);
    }
    tail.into_iter()
        .filter(|(origin, _)| first.get(&origin.node).is_none_or(|&f| origin.seq < f))
        .chain(direct)
        .map(|(_, message)| message)
        .collect()
}

/// `direct` less the messages the old owner gave the session before its
/// hand-over's mark: per origin, those below the first sequence number of
/// that origin in `tail`. The old owner collected every message of that
/// origin from its mark on, in order, so one below the first it
/// collected reached it before the mark, and the session then (it is in
/// the image). The new owner gets such a message only when it came to
/// it by a slower route than to the old owner (a NATS cluster of several
/// servers); it would be delivered twice.
pub fn after_hand_over(
    tail: &[(Origin, Message)],
    mut direct: Vec<(Origin, Message)>,
) -> Vec<(Origin, Message)> {
    let mut first: HashMap<u64, u64> = HashMap::new();
    for (origin, _) in tail {
        let f = first.entry(origin.node).or_insert(origin.seq);
        *f = (*f).min(origin.seq);
    }
    if !first.is_empty() {
        direct.retain(|(o, _)| first.get(&o.node).is_none_or(|&f| o.seq >= f));
    }
    direct
}

/// Per origin, the highest sequence number of what [`merge`] delivers of
/// `tail` (the same rule: the tail's messages below the first of `direct`
/// of their origin, all of them without one). A message of that origin
/// at or below it that comes again later was delivered: in the merge, or
/// by the old owner before its mark (below the tail's first): [`Delivered`].
/// The new owner's own (`direct`) do not count: one of them does not
/// come again (it came on its one NATS subscription), and one between
/// them that a reader had not handed on before the merge (the session's
/// filters on several subscriptions) is not one the merge delivered.
pub fn delivered_highs(
    tail: &[(Origin, Message)],
    direct: &[(Origin, Message)],
) -> HashMap<u64, u64> {
    let mut first: HashMap<u64, u64> = HashMap::new();
    for (origin, _) in direct {
        first.entry(origin.node).or_insert(origin.seq);
    }
    let mut highs: HashMap<u64, u64> = HashMap::new();
    let taken = tail
        .iter()
        .filter(|(o, _)| first.get(&o.node).is_none_or(|&f| o.seq < f));
    for (origin, _) in taken {
        let high = highs.entry(origin.node).or_insert(origin.seq);
        *high = (*high).max(origin.seq);
    }
    highs
}

/// Bytes one entry takes in a tail.
fn entry_size(message: &Message) -> usize {
    // Origin, record kind and length, the stored message's fixed fields,
    // and about what it takes on the wire (topic, properties, payload).
    16 + 5 + 16 + message.wire_len()
}

/// Appends one record as session images (`shard::cluster`) and tails hold
/// it: kind, body length (u32 LE), body.
pub fn put_record(out: &mut Vec<u8>, record: &Record) {
    let mut body = Vec::new();
    record.encode_body(&mut body);
    out.push(record.kind());
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&body);
}

/// The record [`put_record`] wrote at the start of `bytes`, and what
/// follows it.
fn take_record(bytes: &[u8]) -> Result<(Record, &[u8]), TailError> {
    let [kind, rest @ ..] = bytes else {
        return Err(TailError::Layout("record cut short"));
    };
    let (len, rest) = rest
        .split_first_chunk::<4>()
        .ok_or(TailError::Layout("record length cut short"))?;
    let len = u32::from_le_bytes(*len) as usize;
    let body = rest
        .get(..len)
        .ok_or(TailError::Layout("record body cut short"))?;
    Ok((Record::decode(*kind, body)?, &rest[len..]))
}

/// The records of `bytes` as [`put_record`] writes them.
///
/// # Errors
/// A record cut short or invalid.
pub fn records(mut bytes: &[u8]) -> Result<Vec<Record>, TailError> {
    let mut records = Vec::new();
    while !bytes.is_empty() {
        let (record, rest) = take_record(bytes)?;
        records.push(record);
        bytes = rest;
    }
    Ok(records)
}

/// A tail as the old owner sends it: per entry, the origin's node and
/// sequence number (u64 LE each), then a message record.
pub fn encode_tail(entries: &[(Origin, Message)]) -> Bytes {
    let (now, unix_now) = (Instant::now(), unix_ms_now());
    let mut out = Vec::new();
    for (origin, message) in entries {
        out.extend_from_slice(&origin.node.to_le_bytes());
        out.extend_from_slice(&origin.seq.to_le_bytes());
        let stored = StoredMessage::of(message, now, unix_now);
        put_record(&mut out, &Record::Message(0, stored));
    }
    Bytes::from(out)
}

/// Reads what [`encode_tail`] wrote (messages expired meanwhile left out).
///
/// # Errors
/// Bytes that are no tail.
pub fn decode_tail(mut bytes: &[u8]) -> Result<Vec<(Origin, Message)>, TailError> {
    let (now, unix_now) = (Instant::now(), unix_ms_now());
    let mut entries = Vec::new();
    while !bytes.is_empty() {
        let (node, rest) = bytes
            .split_first_chunk::<8>()
            .ok_or(TailError::Layout("origin cut short"))?;
        let (seq, rest) = rest
            .split_first_chunk::<8>()
            .ok_or(TailError::Layout("origin cut short"))?;
        let (Record::Message(_, stored), rest) = take_record(rest)? else {
            return Err(TailError::Layout("a record other than a message"));
        };
        let origin = Origin {
            node: u64::from_le_bytes(*node),
            seq: u64::from_le_bytes(*seq),
        };
        if let Some(mut message) = stored.to_message(0, now, unix_now) {
            message.qos = stored.qos;
            entries.push((origin, message));
        }
        bytes = rest;
    }
    Ok(entries)
}

/// The plain (not shared) subscriptions of a session image (the store's
/// session image record first, as `shard::cluster` encodes it): filter
/// and QoS granted.
///
/// # Errors
/// Bytes that are no session image.
pub fn image_filters(image: &[u8]) -> Result<Vec<(ByteString, QoS)>, TailError> {
    let first = records(first_record(image)?)?;
    let Some(Record::SessionImage(session)) = first.into_iter().next() else {
        return Err(TailError::Layout("no session image first"));
    };
    Ok(session
        .subscriptions
        .into_iter()
        .filter(|s| !shared::is_shared(&s.filter))
        .map(|s| (s.filter, s.qos))
        .collect())
}

/// The bytes of the first record of `image`.
fn first_record(image: &[u8]) -> Result<&[u8], TailError> {
    let len = image
        .get(1..5)
        .and_then(|l| <[u8; 4]>::try_from(l).ok())
        .map(u32::from_le_bytes)
        .ok_or(TailError::Layout("record length cut short"))? as usize;
    image
        .get(..5 + len)
        .ok_or(TailError::Layout("record body cut short"))
}

/// `image` with `messages` queued after the messages it has (each at its
/// own QoS).
///
/// # Errors
/// Bytes that are no session image.
pub fn append_to_image(image: &[u8], messages: &[Message]) -> Result<Bytes, TailError> {
    if messages.is_empty() {
        return Ok(Bytes::copy_from_slice(image));
    }
    let head = first_record(image)?;
    let rest = &image[head.len()..];
    let Some(Record::SessionImage(mut session)) = records(head)?.into_iter().next() else {
        return Err(TailError::Layout("no session image first"));
    };
    let first = session.queued.iter().map(|q| q.0).max().unwrap_or(0) + 1;
    let (now, unix_now) = (Instant::now(), unix_ms_now());
    let mut added = Vec::new();
    for (mid, message) in (first..).zip(messages) {
        let stored = StoredMessage::of(message, now, unix_now);
        put_record(&mut added, &Record::Message(mid, stored));
        session.queued.push((mid, message.qos));
    }
    let mut out = Vec::with_capacity(image.len() + added.len() + 16 * messages.len());
    put_record(&mut out, &Record::SessionImage(session));
    out.extend_from_slice(rest);
    out.extend_from_slice(&added);
    Ok(Bytes::from(out))
}

/// The first index of the *pseudo shards* a collector or a hold is known
/// by in the bridge's interest table: beyond every real shard, so a
/// delivery to one goes to no shard's queue (`bridge::deliver`), unless it
/// is forwarded to the claim's shard ([`Moving::forward`]).
const PSEUDO_SHARDS: usize = 1 << 40;

/// Longest the old owner waits for every shard to have a hand-over's mark
/// (their queues from the bridge drained up to it) before the take-over
/// goes on; a shard slower than that may give the session a message its
/// collector also has.
const MARK_WAIT: Duration = Duration::from_millis(500);

/// The header of a tail answer when the old owner collected nothing for
/// the session (no collector: an older node, none held, or it expired).
const NO_TAIL_HEADER: &str = "Fanmq-Tail-None";

/// What a session that moved here got of the merge
/// ([`delivered_highs`]), for [`HOLD_AFTER_GRANT`] after its grant: a
/// message of its filters that comes again (with a NATS cluster of
/// several servers, a message of the old owner's tail can reach this node
/// after its answer, by another route) from an origin at or below the
/// highest number the merge delivered of it is not given to the session
/// again, neither kept for the attaching claim nor, once attached,
/// through its own subscriptions: the bridge names it to the session's
/// shard with the batch ([`ToShard::DeliverExcept`]). Nodes and sessions
/// without a move in the last [`HOLD_AFTER_GRANT`] pay one empty check
/// per batch.
#[derive(Debug)]
struct Delivered {
    /// The client id.
    client_id: ByteString,
    /// The session's plain filters when it moved: what it takes.
    filters: Vec<ByteString>,
    /// The claim's shard, where the session attaches.
    shard: usize,
    /// Per origin node, the highest sequence number delivered.
    highs: HashMap<u64, u64>,
}

/// Sessions moving to or from this node, in the bridge.
#[derive(Debug, Default)]
pub(super) struct Moving {
    /// What the sessions that moved here within [`HOLD_AFTER_GRANT`] got
    /// of their merges, by pseudo shard (ended with it).
    delivered: HashMap<usize, Delivered>,
    /// The last pseudo shard given out, less [`PSEUDO_SHARDS`].
    next: usize,
    /// The collectors, by pseudo shard, and whether each collects yet.
    collectors: HashMap<usize, (Collector, bool)>,
    /// The filters each pseudo shard holds.
    holds: HashMap<usize, Vec<ByteString>>,
    /// Pseudo shards whose messages go to a real shard: the new owner's
    /// holds after the grant, for the claim's shard.
    forward: HashMap<usize, usize>,
    /// The old owner's collector of each session it handed over, until
    /// its tail is asked for.
    handed: HashMap<ByteString, usize>,
    /// The pseudo shard of each session's lend (`Control::Lend`): one per
    /// session, that of its latest move inside the node, which its state
    /// went with; an older one would forward to a shard the session left
    /// and give a claim there what the session got already.
    lent: HashMap<ByteString, usize>,
    /// The latest subscriptions image of each persistent session this
    /// node owns (as it writes the subscriptions record): the filters a
    /// hand-over collects for.
    subscribed: HashMap<ByteString, Bytes>,
}

impl Moving {
    /// Whether any collector is open.
    pub(super) fn collecting(&self) -> bool {
        !self.collectors.is_empty()
    }

    /// Whether the readers read each message's origin: a collector is
    /// open, or a session that moved here recently is guarded against
    /// doubles ([`Delivered`]).
    pub(super) fn reads_origins(&self) -> bool {
        self.collecting() || !self.delivered.is_empty()
    }

    /// `messages` (with their `origins`) came on the escaped subject,
    /// which the (pseudo) shards `shards` need: each collecting one there
    /// gets what its session takes.
    pub(super) fn offer_escaped(
        &mut self,
        shards: impl Iterator<Item = usize>,
        messages: &[Message],
        origins: &[Option<Origin>],
    ) {
        for shard in shards.filter(|&s| s >= PSEUDO_SHARDS) {
            let Some((collector, true)) = self.collectors.get_mut(&shard) else {
                continue;
            };
            for (message, origin) in messages.iter().zip(origins) {
                if let Some(origin) = origin {
                    collector.offer_escaped(*origin, message);
                }
            }
        }
    }

    /// Of `messages` (with their `origins`) for shard `shard`, those a
    /// session that moved here got already ([`Delivered`]): (index in
    /// `messages`, client id), in order of index; mostly empty.
    pub(super) fn doubles(
        &self,
        shard: usize,
        messages: &[Message],
        origins: &[Option<Origin>],
    ) -> Vec<(usize, ByteString)> {
        let mut doubles = Vec::new();
        for moved in self.delivered.values().filter(|d| d.shard == shard) {
            for (i, (message, origin)) in messages.iter().zip(origins).enumerate() {
                let Some(origin) = origin else {
                    continue;
                };
                if moved
                    .highs
                    .get(&origin.node)
                    .is_some_and(|&h| origin.seq <= h)
                    && moved
                        .filters
                        .iter()
                        .any(|f| topic::filter_matches(f, &message.topic))
                {
                    doubles.push((i, moved.client_id.clone()));
                }
            }
        }
        doubles.sort_by_key(|d| d.0);
        doubles
    }

    /// The shard a delivery to `shard` of the interest table goes to: a
    /// real one itself, a pseudo one where it is forwarded.
    pub(super) fn target(&self, shard: usize) -> Option<usize> {
        if shard < PSEUDO_SHARDS {
            Some(shard)
        } else {
            self.forward.get(&shard).copied()
        }
    }

    /// `messages` (with their `origins`) came on the NATS subscription of
    /// `filter`, which the (pseudo) shards `shards` hold: each collecting
    /// one there gets what its session takes.
    pub(super) fn offer(
        &mut self,
        shards: &std::collections::BTreeSet<usize>,
        filter: &str,
        messages: &[Message],
        origins: &[Option<Origin>],
    ) {
        for shard in shards.range(PSEUDO_SHARDS..) {
            let Some((collector, true)) = self.collectors.get_mut(shard) else {
                continue;
            };
            for (message, origin) in messages.iter().zip(origins) {
                if let Some(origin) = origin {
                    collector.offer(filter, *origin, message);
                }
            }
        }
    }

    /// The subscriptions of `client_id`, owned here, are now `image`
    /// (None: unknown or gone).
    pub(super) fn subscribed(&mut self, client_id: &ByteString, image: Option<Bytes>) {
        match image {
            Some(image) => self.subscribed.insert(client_id.clone(), image),
            None => self.subscribed.remove(client_id),
        };
    }

    /// A claim of this node for `client_id`, on shard `shard`, was granted
    /// with the session's state `image`: until that shard attaches it and
    /// reports its subscriptions, `image`'s first record stands for them
    /// (a hand-over asked for meanwhile then collects for the session's
    /// filters: without, it collected nothing and its tail was lost). A
    /// shard's report is newer: never replaced.
    pub(super) fn granted(&mut self, client_id: &ByteString, image: &[u8]) {
        if self.subscribed.contains_key(client_id) {
            return;
        }
        if let Ok(head) = first_record(image) {
            self.subscribed
                .insert(client_id.clone(), Bytes::copy_from_slice(head));
        }
    }

    /// The collector of the hand-over of `client_id`, if one waits for a
    /// tail request ([`hand_over_ended`]): its pseudo shard, taken out
    /// (nobody asks for that tail any more), and the session's filters.
    fn take_handed(&mut self, client_id: &str) -> Option<(usize, Vec<(ByteString, QoS)>)> {
        let pseudo = self.handed.remove(client_id)?;
        let filters = self.collectors.get(&pseudo).map(|c| c.0.filters.clone());
        Some((pseudo, filters.unwrap_or_default()))
    }

    /// The collector of pseudo shard `pseudo` stops collecting, and from
    /// now on what its holds bring goes to shard `shard` (for a claim
    /// attaching there): what it collected, in the order it came.
    fn collected_for(&mut self, pseudo: usize, shard: usize) -> Vec<(Origin, Message)> {
        self.forward.insert(pseudo, shard);
        self.collectors
            .remove(&pseudo)
            .map(|c| c.0.entries)
            .unwrap_or_default()
    }

    /// Opens a pseudo shard that holds `filters` for real shard `shard`,
    /// where what they bring goes: a claim there takes the persistent
    /// session `client_id` over from a shard of this node
    /// (`Control::Lend`); no collector. Returns it and the session's
    /// previous lend, which the caller closes.
    pub(super) fn lend(
        &mut self,
        client_id: ByteString,
        shard: usize,
        filters: &[ByteString],
    ) -> (usize, Option<usize>) {
        self.next += 1;
        let pseudo = PSEUDO_SHARDS + self.next;
        self.holds.insert(pseudo, filters.to_vec());
        self.forward.insert(pseudo, shard);
        (pseudo, self.lent.insert(client_id, pseudo))
    }

    /// Real shard `shard` holds `filter` itself now: the lends for it that
    /// hold `filter` let it go (returned: their pseudo shards, for the
    /// caller to remove their interest), so that a lend lasts only while
    /// the claim's shard needs it (what it brings also reaches any other
    /// claim attaching there, which may have got it from its own old
    /// shard). Only lends whose own addition of it was applied (`applied`,
    /// by pseudo shard; one still queued behind the shard's keeps it, and
    /// removes it at its end). Nothing to walk unless a lend is open.
    pub(super) fn held_by(
        &mut self,
        shard: usize,
        filter: &str,
        applied: impl Fn(usize) -> bool,
    ) -> Vec<usize> {
        if self.lent.is_empty() {
            return Vec::new();
        }
        let mut released = Vec::new();
        for &pseudo in self.lent.values() {
            if self.forward.get(&pseudo) != Some(&shard) || !applied(pseudo) {
                continue;
            }
            let Some(holds) = self.holds.get_mut(&pseudo) else {
                continue;
            };
            let before = holds.len();
            holds.retain(|f| f != filter);
            if holds.len() < before {
                released.push(pseudo);
            }
        }
        released
    }

    /// The lend `pseudo` of `client_id` ends: whether it was still the
    /// session's (else a later one replaced it, and closed it).
    pub(super) fn lend_ended(&mut self, client_id: &str, pseudo: usize) -> bool {
        if self.lent.get(client_id) != Some(&pseudo) {
            return false;
        }
        self.lent.remove(client_id);
        true
    }

    /// Opens `collector` (collecting at once if `active`): its pseudo
    /// shard.
    fn open(&mut self, collector: Collector, active: bool) -> usize {
        self.next += 1;
        let shard = PSEUDO_SHARDS + self.next;
        self.holds.insert(
            shard,
            collector.filters.iter().map(|f| f.0.clone()).collect(),
        );
        self.collectors.insert(shard, (collector, active));
        shard
    }
}

/// The subject node `node` serves tail requests on.
pub fn tail_subject(root: &str, node: &str) -> String {
    format!("{root}.c.{node}.tail")
}

/// Holds `filters` for pseudo shard `shard` through the bridge's interest
/// queue (in order with the shards' changes), waiting until the NATS
/// server holds them, at most until `by`.
async fn hold(bridge: &Shared, shard: usize, filters: &[(ByteString, QoS)], by: Instant) {
    let Some(queue) = bridge.borrow().interest_queue.clone() else {
        return;
    };
    let mut waits = Vec::new();
    for (filter, _) in filters {
        let (ready, readied) = async_channel::bounded::<()>(1);
        let change = Interest {
            shard,
            filter: filter.clone(),
            add: true,
            ready: Some(ready),
        };
        if queue.send(change).await.is_ok() {
            waits.push(readied);
        }
    }
    let _ = tokio::time::timeout_at(by.into(), async {
        for w in waits {
            // Closed once the server holds it: nothing is ever sent.
            let _ = w.recv().await;
        }
    })
    .await;
}

/// Ends pseudo shard `shard`: its collector (returned) and its holds.
pub(super) fn close(bridge: &Shared, shard: usize) -> Option<Collector> {
    let mut b = bridge.borrow_mut();
    let collector = b.moving.collectors.remove(&shard).map(|c| c.0);
    b.moving.forward.remove(&shard);
    b.moving.delivered.remove(&shard);
    let filters = b.moving.holds.remove(&shard).unwrap_or_default();
    if let Some(queue) = &b.interest_queue {
        for filter in filters {
            let _ = queue.try_send(Interest {
                shard,
                filter,
                add: false,
                ready: None,
            });
        }
    }
    collector
}

/// Tells every shard that `client_id` is being handed over: a shard
/// holding its session stops giving it messages from NATS, which the
/// collector has from now on. What closes once every shard has the mark.
fn mark(b: &Bridge, client_id: &ByteString) -> async_channel::Receiver<()> {
    let (done, marked) = async_channel::bounded(1);
    for queue in &b.to_shards {
        let handing = ToShard::Handing {
            client_id: client_id.clone(),
            on: true,
            done: Some(done.clone()),
        };
        if queue.try_send(handing).is_err() {
            log::warn!(
                "cluster: a shard's queue is full: the hand-over of {client_id:?} may give messages twice"
            );
        }
    }
    marked
}

/// Tells every shard that the hand-over of `client_id` ended: never
/// dropped (waiting for room in a full queue), or a later session of the
/// id here would take nothing from NATS.
fn unmark(b: &Bridge, client_id: &ByteString) {
    for queue in &b.to_shards {
        let handing = ToShard::Handing {
            client_id: client_id.clone(),
            on: false,
            done: None,
        };
        if let Err(async_channel::TrySendError::Full(handing)) = queue.try_send(handing) {
            let queue = queue.clone();
            tokio::task::spawn_local(async move {
                let _ = queue.send(handing).await;
            });
        }
    }
}

/// The old owner, before its shard hands `client_id` over (not for a
/// clean start): opens a collector for the session's filters, holds them,
/// and marks the session handed on every shard; its pseudo shard, for
/// [`hand_over_ended`]. None: nothing to collect.
pub(super) async fn collect_for_hand_over(
    bridge: &Shared,
    client_id: &ByteString,
    clean: bool,
) -> Option<usize> {
    if clean {
        return None;
    }
    let image = bridge.borrow().moving.subscribed.get(client_id).cloned()?;
    let filters = image_filters(&image).ok()?;
    if filters.is_empty() {
        return None;
    }
    let shard = bridge
        .borrow_mut()
        .moving
        .open(Collector::new(client_id.clone(), filters.clone()), false);
    // Held already (the session's own): the bridge answers at once, unless
    // its interest queue is behind a NATS server's confirmation.
    hold(bridge, shard, &filters, Instant::now() + MARK_WAIT).await;
    // From here on the collector has what NATS brings, and the shards
    // stop giving it to the session: nothing in both, nothing in neither.
    let marked = {
        let mut b = bridge.borrow_mut();
        if let Some(c) = b.moving.collectors.get_mut(&shard) {
            c.1 = true;
        }
        mark(&b, client_id)
    };
    // The session's shard routed what came before the mark to it before
    // the take-over evicts it: in its image.
    let _ = tokio::time::timeout(MARK_WAIT, marked.recv()).await;
    Some(shard)
}

/// The old owner's hand-over of `client_id` ended: `moved` (the image is
/// on its way), its collector waits for the new owner's tail request, at
/// most [`COLLECT_FOR`]; else it goes.
pub(super) fn hand_over_ended(
    bridge: &Shared,
    client_id: &ByteString,
    shard: Option<usize>,
    moved: bool,
) {
    unmark(&bridge.borrow(), client_id);
    if moved {
        // No longer this node's.
        bridge.borrow_mut().moving.subscribed(client_id, None);
    }
    let Some(shard) = shard else {
        return;
    };
    if !moved {
        close(bridge, shard);
        return;
    }
    let older = bridge
        .borrow_mut()
        .moving
        .handed
        .insert(client_id.clone(), shard);
    if let Some(older) = older {
        close(bridge, older);
    }
    let (bridge, client_id) = (bridge.clone(), client_id.clone());
    tokio::task::spawn_local(async move {
        tokio::time::sleep(COLLECT_FOR).await;
        let mine = bridge.borrow().moving.handed.get(&client_id) == Some(&shard);
        if mine {
            bridge.borrow_mut().moving.handed.remove(&client_id);
            if close(&bridge, shard).is_some() {
                log::debug!("cluster: nobody asked for the tail of {client_id:?}");
            }
        }
    });
}

/// A claim of this node on shard `shard` (token `token`) took back
/// `client_id`, whose session this node handed over and whose new owner
/// never wrote the record: it wrote it itself (`ownership::HandedAway`),
/// with `image`, the copy of the state kept for racers (None: a fresh
/// session). The hand-over's collector, still open ([`COLLECT_FOR`]), has
/// what NATS brought for the session from the mark on, and this node's
/// ring what it published itself that the session's shard had not routed
/// (cluster::positions, as for a tail answer): both are appended to the
/// image's queue, in the order they came; from then on what the
/// collector's holds bring goes to `shard`, for the attaching session,
/// for [`HOLD_AFTER_GRANT`] (by then its own subscriptions hold them), and
/// what this node publishes after goes to the claim with its grant
/// (`Local::watch`). No await from the collector's end to the grant in
/// `shard`'s queue (the caller sends it). Without a collector (its time
/// passed), the image as it is.
pub(super) async fn reclaim(
    bridge: &Shared,
    client_id: &ByteString,
    (shard, token): (usize, u64),
    image: Option<Bytes>,
) -> Option<Bytes> {
    let handed = bridge.borrow_mut().moving.take_handed(client_id);
    let Some((pseudo, filters)) = handed else {
        return image;
    };
    let Some(image) = image else {
        close(bridge, pseudo);
        return None;
    };
    let mut own = Vec::new();
    positions::own_tail(bridge, client_id, &filters, &mut own).await;
    // Up to the cover own_tail read (no await since): in `own`; after it,
    // the claim's shard catches up at the grant. What the readers hand on
    // from here goes to the claim's shard, behind the grant.
    let collected = {
        let mut b = bridge.borrow_mut();
        b.local.watch(client_id, token, Instant::now());
        b.moving.collected_for(pseudo, shard)
    };
    {
        let bridge = bridge.clone();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(HOLD_AFTER_GRANT).await;
            close(&bridge, pseudo);
        });
    }
    log::debug!(
        "cluster: {client_id:?} taken back with {} messages collected since its hand-over and {} of this node's own",
        collected.len(),
        own.len()
    );
    let messages: Vec<Message> = collected.into_iter().chain(own).map(|(_, m)| m).collect();
    match append_to_image(&image, &messages) {
        Ok(appended) => Some(appended),
        Err(e) => {
            log::debug!("cluster: image of {client_id:?}: {e}");
            Some(image)
        }
    }
}

/// Yields to the bridge's other tasks a few times, so that the
/// subscriptions' readers (tasks of this thread) hand what the NATS client
/// read before the message in hand to the collectors: async-nats reads one
/// connection in order but gives each subscription its own queue, and a
/// tail request or answer would otherwise close or merge a collector ahead
/// of messages read before it.
async fn let_readers_run() {
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
}

/// Serves the tail requests of the nodes this one handed sessions to:
/// answers with what it collected (empty, marked [`NO_TAIL_HEADER`],
/// when it has nothing) and stops collecting.
pub(super) async fn serve_tails(bridge: Shared) {
    let (client, subject) = {
        let b = bridge.borrow();
        (b.client.clone(), tail_subject(&b.root, &b.node))
    };
    let mut requests = match client.subscribe(subject.clone()).await {
        Ok(sub) => sub,
        Err(e) => {
            log::warn!(
                "cluster: cannot subscribe to {subject}: sessions moving away lose their tail: {e}"
            );
            return;
        }
    };
    while let Some(msg) = futures_lite::StreamExt::next(&mut requests).await {
        let (Some(reply), Ok(id)) = (msg.reply, std::str::from_utf8(&msg.payload)) else {
            continue;
        };
        // What the server sent before the request was read before it: the
        // subscriptions' readers hand it to the collector before it closes.
        let_readers_run().await;
        let shard = bridge.borrow_mut().moving.handed.remove(id);
        let collector = shard.and_then(|shard| close(&bridge, shard));
        let sent = match collector {
            Some(mut c) => {
                // This node's own messages the session lacks, and up to
                // where (cluster::positions).
                let cover = positions::own_tail(&bridge, id, &c.filters, &mut c.entries).await;
                log::debug!(
                    "cluster: tail of {id:?}: {} messages{}",
                    c.entries.len(),
                    if c.overflowed { ", overflowed" } else { "" }
                );
                let mut headers = async_nats::HeaderMap::new();
                if let Some(cover) = cover {
                    let value = positions::cover_header(cover);
                    headers.insert(positions::COVER_HEADER, value.as_str());
                }
                let tail = encode_tail(&c.entries);
                client.publish_with_headers(reply, headers, tail).await
            }
            None => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(NO_TAIL_HEADER, "1");
                client
                    .publish_with_headers(reply, headers, Bytes::new())
                    .await
            }
        };
        if let Err(e) = sent {
            log::debug!("cluster: tail of {id:?} not sent: {e}");
        }
    }
}

/// The new owner, granted `client_id` with `image` from node `owner`
/// (claim `(shard, deadline)`): holds the session's filters (once the
/// server has them, what they bring is collected), asks the old owner
/// for its tail, and returns the image with the merge of both queued
/// ([`merge`]); from then on the holds' messages go to `shard`, for
/// the attaching session, for [`HOLD_AFTER_GRANT`]. Without the old
/// owner's tail in time, only what was collected here (counted).
pub(super) async fn complete(
    bridge: &Shared,
    client_id: &ByteString,
    (owner, shard, token, deadline): (&str, usize, u64, Instant),
    image: Bytes,
) -> Bytes {
    let Ok(filters) = image_filters(&image) else {
        return image;
    };
    if filters.is_empty() {
        return image;
    }
    let (client, root, timeout, status) = {
        let b = bridge.borrow();
        (
            b.client.clone(),
            b.root.clone(),
            b.takeover_timeout,
            b.status.clone(),
        )
    };
    let pseudo = bridge
        .borrow_mut()
        .moving
        .open(Collector::new(client_id.clone(), filters.clone()), true);
    hold(bridge, pseudo, &filters, deadline).await;
    let left = deadline.saturating_duration_since(Instant::now());
    // What this node publishes from here on reaches the old owner after
    // the request: the claim's shard has it (cluster::positions).
    let before = bridge
        .borrow_mut()
        .local
        .watch(client_id, token, Instant::now());
    let asked = client.request(
        tail_subject(&root, owner),
        Bytes::copy_from_slice(client_id.as_bytes()),
    );
    let answer = tokio::time::timeout(timeout.min(left), asked).await;
    // What the server sent before the answer was read before it: let the
    // subscriptions' readers hand it to the collector first.
    let_readers_run().await;
    let mut cover = None;
    let tail = match answer {
        Ok(Ok(msg))
            if msg
                .headers
                .as_ref()
                .is_none_or(|h| h.get(NO_TAIL_HEADER).is_none()) =>
        {
            cover = positions::cover_of(msg.headers.as_ref());
            decode_tail(&msg.payload)
                .map_err(|e| log::debug!("cluster: tail of {client_id:?}: {e}"))
                .ok()
        }
        Ok(Ok(_)) => None,
        Ok(Err(e)) => {
            log::debug!("cluster: tail of {client_id:?} from {owner}: {e}");
            None
        }
        Err(_) => None,
    };
    // No await from here to the grant in the shard's queue: what the holds
    // bring after this goes to the shard, behind the grant.
    let (mut tail, mut direct) = (tail, {
        let mut b = bridge.borrow_mut();
        let collector = b.moving.collectors.remove(&pseudo).map(|c| c.0);
        b.moving.forward.insert(pseudo, shard);
        collector.map(|c| c.entries).unwrap_or_default()
    });
    let own = (bridge.borrow().origin, before, cover);
    let mut none = Vec::new();
    positions::sort_tail(own, tail.as_mut().unwrap_or(&mut none), &mut direct);
    {
        let bridge = bridge.clone();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(HOLD_AFTER_GRANT).await;
            close(&bridge, pseudo);
        });
    }
    let f = &status.figures;
    match &tail {
        Some(_) => f.cluster_tails_merged.fetch_add(1, Ordering::Relaxed),
        None => {
            log::info!(
                "cluster: no tail of {client_id:?} from node {owner}: what was published between its hand-over and the subscriptions here is lost for it"
            );
            f.cluster_tails_missed.fetch_add(1, Ordering::Relaxed)
        }
    };
    let tail = tail.unwrap_or_default();
    let span = |entries: &[(Origin, Message)]| {
        let seqs = entries.iter().map(|e| e.0.seq);
        (entries.len(), seqs.clone().min(), seqs.max())
    };
    log::debug!(
        "cluster: move of {client_id:?} from {owner}: tail {:?}, here {:?} (count, lowest, highest)",
        span(&tail),
        span(&direct)
    );
    let direct = after_hand_over(&tail, direct);
    let highs = delivered_highs(&tail, &direct);
    if !highs.is_empty() {
        let moved = Delivered {
            client_id: client_id.clone(),
            filters: filters.iter().map(|f| f.0.clone()).collect(),
            shard,
            highs,
        };
        bridge.borrow_mut().moving.delivered.insert(pseudo, moved);
    }
    let merged = merge(tail, direct);
    match append_to_image(&image, &merged) {
        Ok(appended) => appended,
        Err(e) => {
            log::debug!("cluster: image of {client_id:?}: {e}");
            image
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A QoS 1 message on `topic` with payload `payload`.
    fn message(topic: &str, payload: &str) -> Message {
        Message::new(
            topic.into(),
            Bytes::from(payload.to_string()),
            QoS::AtLeastOnce,
            false,
        )
    }

    /// An entry of origin `node`, number `seq`, payload `"<node>:<seq>"`.
    fn entry(node: u64, seq: u64) -> (Origin, Message) {
        (Origin { node, seq }, message("t", &format!("{node}:{seq}")))
    }

    fn payloads(messages: &[Message]) -> Vec<String> {
        messages
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect()
    }

    /// Per origin the tail gives what came before the first message the
    /// new owner got itself; an origin it got nothing of comes from the
    /// tail alone; its own follow, each message once, in order per origin.
    #[test]
    fn the_merge_takes_the_tail_up_to_the_first_direct_message_of_each_origin() {
        // Origin 1: the tail has 4..=9, the new owner got 7.. itself.
        // Origin 2: the tail has 20, 21; the new owner got none of it.
        // Origin 3: only the new owner has it.
        let tail = vec![
            entry(1, 4),
            entry(2, 20),
            entry(1, 5),
            entry(1, 6),
            entry(1, 7),
            entry(2, 21),
            entry(1, 8),
            entry(1, 9),
        ];
        let direct = vec![
            entry(1, 7),
            entry(3, 1),
            entry(1, 8),
            entry(1, 9),
            entry(1, 10),
        ];
        let got = payloads(&merge(tail, direct));
        assert_eq!(
            got,
            [
                "1:4", "2:20", "1:5", "1:6", "2:21", "1:7", "3:1", "1:8", "1:9", "1:10"
            ]
        );
        // Nothing collected directly: the tail as it is; no tail: the
        // direct ones as they are.
        assert_eq!(payloads(&merge(vec![entry(1, 1)], vec![])), ["1:1"]);
        assert_eq!(payloads(&merge(vec![], vec![entry(1, 2)])), ["1:2"]);
        // The new owner got everything the tail has: nothing from it.
        let got = merge(
            vec![entry(1, 3), entry(1, 4)],
            vec![entry(1, 3), entry(1, 4)],
        );
        assert_eq!(payloads(&got), ["1:3", "1:4"]);
    }

    /// What the new owner got of an origin below the first message of
    /// the tail from that origin reached the old owner before its mark
    /// (the session had it there): left out. An origin the tail does not
    /// have is kept whole.
    #[test]
    fn what_came_before_the_old_owners_mark_is_left_out_of_the_direct_ones() {
        let tail = vec![entry(1, 6), entry(1, 7)];
        let direct = vec![entry(1, 4), entry(1, 5), entry(1, 6), entry(2, 1)];
        let kept = after_hand_over(&tail, direct);
        let got: Vec<(u64, u64)> = kept.iter().map(|(o, _)| (o.node, o.seq)).collect();
        assert_eq!(got, [(1, 6), (2, 1)]);
        // Merged: each of origin 1 once, from 6 on (7, the new owner gets
        // itself after 6: nothing of the tail delivered, it is not named a
        // double when it comes).
        assert!(!delivered_highs(&tail, &kept).contains_key(&1));
        assert_eq!(payloads(&merge(tail, kept)), ["1:6", "2:1"]);
        let direct = vec![entry(1, 4)];
        assert_eq!(after_hand_over(&[], direct).len(), 1, "no tail: all kept");
    }

    /// The highest number delivered per origin is that of the merge's
    /// messages from the tail: those below the first direct one; a tail
    /// entry the merge leaves out (the new owner has it from its own)
    /// does not count, nor do the direct ones.
    #[test]
    fn the_highest_delivered_is_that_of_the_merge() {
        // Origin 1: tail 4..=9, direct from 7 to 8: the merge gives 4..=6
        // of the tail. Origin 2: tail only. Origin 3: direct only.
        let tail = vec![
            entry(1, 4),
            entry(1, 5),
            entry(1, 6),
            entry(1, 7),
            entry(1, 8),
            entry(1, 9),
            entry(2, 20),
        ];
        let direct = vec![entry(1, 7), entry(1, 8), entry(3, 1)];
        let highs = delivered_highs(&tail, &direct);
        assert_eq!(highs, HashMap::from([(1, 6), (2, 20)]));
        assert!(delivered_highs(&[], &[]).is_empty());
    }

    /// A moved session's window names, of a batch for its shard, the
    /// messages of its filters from an origin at or below the highest
    /// delivered: a message of the tail that came again by another route
    /// (on the code before, delivered twice). Other shards, other topics,
    /// later numbers, messages without an origin and other origins are
    /// not named; the window ends with its pseudo shard.
    /// A lend (`Control::Lend`) is a pseudo shard that holds the filters
    /// and whose messages go to the claim's shard, which real shards'
    /// messages still reach; it reads no origins (no cost per message);
    /// the session's next lend replaces it, and it ends once.
    #[test]
    fn a_lend_holds_filters_for_the_claims_shard() {
        let mut moving = Moving::default();
        let filters = [ByteString::from("a/#"), ByteString::from("b")];
        let (lent, before) = moving.lend("c".into(), 3, &filters);
        assert!(lent >= PSEUDO_SHARDS && before.is_none());
        assert_eq!(
            moving.holds.get(&lent).map(Vec::as_slice),
            Some(&filters[..])
        );
        assert_eq!(moving.target(lent), Some(3));
        assert_eq!(moving.target(1), Some(1));
        assert!(!moving.reads_origins());
        // The session's next move replaces it: one lend per session.
        let (next, before) = moving.lend("c".into(), 1, &filters);
        assert_eq!((next != lent, before), (true, Some(lent)));
        assert!(!moving.lend_ended("c", lent), "replaced");
        assert!(moving.lend_ended("c", next));
        assert!(!moving.lend_ended("c", next), "once");
    }

    /// A lend lets a filter go once the claim's shard holds it itself
    /// and the lend's own addition was applied (other shards' adds, and
    /// other filters, leave it).
    #[test]
    fn a_lend_lets_a_filter_go_once_its_shard_holds_it() {
        let mut moving = Moving::default();
        assert!(moving.held_by(3, "a/#", |_| true).is_empty(), "no lend");
        let filters = [ByteString::from("a/#"), ByteString::from("b")];
        let (lent, _) = moving.lend("c".into(), 3, &filters);
        assert!(
            moving.held_by(1, "a/#", |_| true).is_empty(),
            "another shard"
        );
        let queued = moving.held_by(3, "a/#", |_| false);
        assert!(queued.is_empty(), "its addition not applied yet: kept");
        assert_eq!(moving.held_by(3, "a/#", |p| p == lent), [lent]);
        assert!(moving.held_by(3, "a/#", |_| true).is_empty(), "let go once");
        let left = moving.holds.get(&lent).map(Vec::as_slice);
        assert_eq!(left, Some(&filters[1..]));
    }

    #[test]
    fn a_message_a_moved_session_got_already_is_named_for_its_shard() {
        let mut moving = Moving::default();
        let pseudo = moving.open(
            Collector::new("s".into(), vec![("a/#".into(), QoS::AtLeastOnce)]),
            true,
        );
        moving.delivered.insert(
            pseudo,
            Delivered {
                client_id: "s".into(),
                filters: vec!["a/#".into()],
                shard: 1,
                highs: HashMap::from([(7, 10)]),
            },
        );
        assert!(moving.reads_origins());
        let messages = vec![
            message("a/x", "9"),
            message("b/x", "other topic"),
            message("a/x", "10"),
            message("a/x", "11"),
            message("a/x", "no origin"),
            message("a/x", "other origin"),
        ];
        let o = |node, seq| Some(Origin { node, seq });
        let origins = vec![o(7, 9), o(7, 9), o(7, 10), o(7, 11), None, o(8, 1)];
        let named = moving.doubles(1, &messages, &origins);
        assert_eq!(named, [(0, "s".into()), (2, "s".into())]);
        assert!(moving.doubles(0, &messages, &origins).is_empty());
        moving.collectors.clear();
        moving.delivered.remove(&pseudo);
        assert!(!moving.reads_origins());
        assert!(moving.doubles(1, &messages, &origins).is_empty());
    }

    /// A session image of `client_id` with `filters` (QoS 1 each) and
    /// one queued message, `"queued"`.
    fn image(client_id: &str, filters: &[&str]) -> Bytes {
        use crate::store::record::{StoredSession, StoredSubscription};
        let session = StoredSession {
            stamp: 0,
            client_id: client_id.into(),
            protocol_level: 4,
            expiry_interval: 0,
            offline_since_unix_ms: 0,
            subscriptions: filters
                .iter()
                .map(|f| StoredSubscription {
                    filter: (*f).into(),
                    qos: QoS::AtLeastOnce,
                    no_local: false,
                    retain_as_published: false,
                    identifier: 0,
                })
                .collect(),
            queued: vec![(1, QoS::AtLeastOnce)],
            alias: 0,
        };
        let mut out = Vec::new();
        put_record(&mut out, &Record::SessionImage(session));
        let stored = StoredMessage::of(&message("a/x", "queued"), Instant::now(), unix_ms_now());
        put_record(&mut out, &Record::Message(1, stored));
        Bytes::from(out)
    }

    /// A take-back of a session this node handed over ([`reclaim`])
    /// takes the hand-over's collector from the tail requests (once) with
    /// the session's filters; it collects until the claim's step, which
    /// takes what it gathered, in the order it came, and sends what its
    /// pseudo shard gets from then on to the claim's shard; appended to
    /// the kept image, that is the image's queue after its own. Before,
    /// the collector was left for a tail request that never came, and
    /// what it gathered was lost for the session.
    #[test]
    fn a_take_back_gives_the_session_what_the_hand_overs_collector_gathered() {
        let filters = vec![(ByteString::from("a/#"), QoS::AtLeastOnce)];
        let mut moving = Moving::default();
        let pseudo = moving.open(Collector::new("s".into(), filters.clone()), true);
        moving.handed.insert("s".into(), pseudo);
        let shards = std::collections::BTreeSet::from([0, pseudo]);
        let o = |seq| Some(Origin { node: 1, seq });
        let batch = |n: &str| vec![message("a/x", n)];
        moving.offer(&shards, "a/#", &batch("1"), &[o(1)]);
        assert_eq!(moving.target(pseudo), None, "a collector goes nowhere");
        assert!(moving.take_handed("other").is_none());
        assert_eq!(moving.take_handed("s"), Some((pseudo, filters)));
        assert!(moving.take_handed("s").is_none(), "no tail request gets it");
        // Still collecting while the claim waits for its own messages.
        moving.offer(&shards, "a/#", &batch("2"), &[o(2)]);
        let collected = moving.collected_for(pseudo, 1);
        let collected: Vec<Message> = collected.into_iter().map(|(_, m)| m).collect();
        assert_eq!(payloads(&collected), ["1", "2"]);
        assert!(!moving.collecting());
        assert_eq!(moving.target(pseudo), Some(1), "to the claim's shard");
        moving.offer(&shards, "a/#", &batch("3"), &[o(3)]);
        assert!(
            moving.collected_for(pseudo, 1).is_empty(),
            "forwarded, not collected"
        );
        let appended = append_to_image(&image("s", &["a/#"]), &collected).unwrap();
        let messages: Vec<String> = records(&appended)
            .unwrap()
            .into_iter()
            .filter_map(|r| match r {
                Record::Message(_, m) => Some(String::from_utf8_lossy(&m.payload).into_owned()),
                _ => None,
            })
            .collect();
        assert_eq!(messages, ["queued", "1", "2"]);
        let Some(Record::SessionImage(session)) = records(&appended).unwrap().into_iter().next()
        else {
            panic!("a session image first");
        };
        assert_eq!(session.queued.len(), 3, "queued in the image's order");
    }

    /// A grant with a session's state stands for its subscriptions until
    /// its shard reports them: a hand-over asked for before then collects
    /// for the image's filters (before, it found none, collected nothing,
    /// and its tail was lost: 1 to 4 numbers in
    /// `a_session_taken_back_by_its_owner_after_its_hand_over_misses_nothing_published_meanwhile`).
    /// The image's messages are not kept; a shard's report is never
    /// replaced.
    #[test]
    fn a_grants_state_gives_the_session_filters_until_its_shard_reports_them() {
        let mut moving = Moving::default();
        let id = ByteString::from("s");
        let granted = image("s", &["a/#", "b"]);
        moving.granted(&id, &granted);
        let kept = moving.subscribed[&id].clone();
        assert!(kept.len() < granted.len(), "the first record alone");
        let filters: Vec<String> = image_filters(&kept)
            .unwrap()
            .into_iter()
            .map(|f| f.0.to_string())
            .collect();
        assert_eq!(filters, ["a/#", "b"]);
        let reported = image("s", &["c"]);
        moving.subscribed(&id, Some(reported.clone()));
        moving.granted(&id, &granted);
        assert_eq!(moving.subscribed[&id], reported, "the shard's report stays");
        moving.granted(&"t".into(), b"no image");
        assert!(!moving.subscribed.contains_key("t"));
    }

    /// On the escaped subject a collector keeps what any of the
    /// session's filters matches (at the highest QoS granted among
    /// them), as the shards match it in full; on the code before it
    /// kept nothing of that subject.
    #[test]
    fn a_collector_keeps_an_escaped_topic_its_session_takes() {
        let filters = vec![
            (ByteString::from("a/#"), QoS::AtLeastOnce),
            (ByteString::from("a/b b"), QoS::ExactlyOnce),
        ];
        let mut moving = Moving::default();
        let pseudo = moving.open(Collector::new("x".into(), filters), true);
        let mut two = message("a/b b", "two");
        two.qos = QoS::ExactlyOnce;
        let messages = vec![two, message("c d", "not taken")];
        let o = |seq| Some(Origin { node: 1, seq });
        // Real shards are passed over; the pseudo shard collects.
        moving.offer_escaped([0, pseudo].into_iter(), &messages, &[o(1), o(2)]);
        let c = &moving.collectors[&pseudo].0;
        let got: Vec<(u64, QoS)> = c.entries.iter().map(|(o, m)| (o.seq, m.qos)).collect();
        assert_eq!(got, [(1, QoS::ExactlyOnce)]);
    }

    /// A collector keeps QoS 1/2 messages the session takes through the
    /// subscription they came on (at the QoS granted), once; nothing beyond
    /// its byte bound.
    #[test]
    fn a_collector_keeps_what_the_session_takes_through_that_subscription() {
        let filters = vec![
            (ByteString::from("a/#"), QoS::AtLeastOnce),
            (ByteString::from("a/b"), QoS::ExactlyOnce),
            (ByteString::from("c"), QoS::AtMostOnce),
        ];
        let mut c = Collector::new("x".into(), filters);
        let o = |seq| Origin { node: 9, seq };
        let mut two = message("a/b", "two");
        two.qos = QoS::ExactlyOnce;
        // `a/b` matches both filters: taken through the smallest (`a/#`),
        // at the highest QoS granted.
        c.offer("a/#", o(1), &two);
        c.offer("a/b", o(1), &two);
        c.offer("a/#", o(2), &message("a/c", "one"));
        c.offer("c", o(3), &message("c", "granted 0"));
        let mut zero = message("a/c", "zero");
        zero.qos = QoS::AtMostOnce;
        c.offer("a/#", o(4), &zero);
        let got: Vec<(u64, QoS)> = c.entries.iter().map(|(o, m)| (o.seq, m.qos)).collect();
        assert_eq!(got, [(1, QoS::ExactlyOnce), (2, QoS::AtLeastOnce)]);
        // Full: nothing more.
        let big = message("a/c", &"x".repeat(MAX_TAIL));
        c.offer("a/#", o(5), &big);
        c.offer("a/#", o(6), &message("a/c", "after"));
        assert!(c.overflowed);
        assert_eq!(c.entries.len(), 2);
    }

    /// A tail reads back as it was written; bytes that are no tail are
    /// refused.
    #[test]
    fn a_tail_reads_back() {
        let mut two = message("a/b", "two");
        two.qos = QoS::ExactlyOnce;
        let entries = vec![entry(5, 1), (Origin { node: 6, seq: 2 }, two)];
        let bytes = encode_tail(&entries);
        let back = decode_tail(&bytes).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].0, Origin { node: 5, seq: 1 });
        assert_eq!(back[1].0, Origin { node: 6, seq: 2 });
        assert_eq!(back[1].1.qos, QoS::ExactlyOnce);
        assert_eq!(&back[1].1.topic[..], "a/b");
        assert_eq!(&back[1].1.payload[..], b"two");
        assert!(decode_tail(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_tail(&[1, 2, 3]).is_err());
        assert!(decode_tail(&[]).unwrap().is_empty());
    }
}
