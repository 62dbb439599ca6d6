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
//! for the session for [`HOLD_AFTER_GRANT`] ([`delivered_highs`]); and
//! one that reaches A later than B (A's route from its origin the
//! slower) is in the tail all the same: B names with its request, per
//! origin, the first number it collected itself, and A answers once it
//! has that one too ([`missing_firsts`], at most [`FIRST_WAIT`]); an
//! origin whose first came to B during the request B names in a second
//! request ([`uncovered`]), A collecting on until then.
//!
//! Shared subscriptions: both nodes hold the session's shares meanwhile
//! (so the group keeps a member), every message NATS gives either node
//! for them is the session's, the old owner drains its queue
//! subscriptions before it answers, and the new owner delivers both
//! nodes' in order per origin ([`merge_shared`]).
//!
//! Not covered: QoS 0 (an offline session keeps none), a tail over
//! [`MAX_TAIL`], and, with several NATS servers, a message that reached
//! A only after its first answer of an origin B had nothing of by then,
//! or after A gave up waiting (counted: `cluster_tails_behind`); shared
//! subscriptions with several NATS servers are not covered by that wait
//! nor by the doubles window; if A does not answer in time B attaches
//! what it has (counted: `cluster_tails_missed`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytestring::ByteString;

use crate::cluster::bridge::{Bridge, Shared, drain_shares};
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
    /// The session's shared subscriptions (the whole `$share/...` filter),
    /// QoS granted: while the collector collects, every message NATS gives
    /// this node for one of them is the session's ([`Collector::offer_shared`]).
    pub shares: Vec<(ByteString, QoS)>,
    /// What was collected through `filters`, in the order it came.
    pub entries: Vec<(Origin, Message)>,
    /// What was collected through `shares`, in the order it came: NATS
    /// gave each to this node alone, so it is merged as its own
    /// ([`merge_shared`]), not by the rule of `entries` ([`merge`]).
    pub shared: Vec<(Origin, Message)>,
    /// Bytes of `entries` as [`encode_tail`] writes them.
    bytes: usize,
    /// Set when a message did not fit: nothing more is collected.
    pub overflowed: bool,
    /// Per origin node, the highest sequence number kept (also of
    /// entries already sent): what a tail request's firsts are checked
    /// against ([`missing_firsts`]).
    highest: HashMap<u64, u64>,
    /// Set once the collector answered a tail request and kept
    /// collecting for a second one ([`AGAIN_HEADER`]): this node's own
    /// messages (cluster::positions) were in the first answer.
    answered: bool,
}

impl Collector {
    /// An empty collector for `client_id` with the session's `filters`.
    pub fn new(client_id: ByteString, filters: Vec<(ByteString, QoS)>) -> Self {
        Collector {
            client_id,
            filters,
            shares: Vec::new(),
            entries: Vec::new(),
            shared: Vec::new(),
            bytes: 0,
            overflowed: false,
            highest: HashMap::new(),
            answered: false,
        }
    }

    /// The collector with the session's shared subscriptions `shares`.
    #[must_use]
    pub fn sharing(mut self, shares: Vec<(ByteString, QoS)>) -> Self {
        self.shares = shares;
        self
    }

    /// `message`, of `origin`, came on a queue subscription of the shared
    /// subscription `share`, which this node holds for the session: kept
    /// as [`Collector::offer`] keeps it, at the QoS granted for `share`.
    pub fn offer_shared(&mut self, share: &str, origin: Origin, message: &Message) {
        let granted = self.shares.iter().find(|s| s.0 == share).map(|s| s.1);
        if let Some(kept) = granted.and_then(|granted| self.keep(granted, message)) {
            self.shared.push((origin, kept));
        }
    }

    /// `message`, of `origin`, came on the NATS subscription of `filter`:
    /// kept (at the QoS the session takes it) if the session takes it
    /// through that filter ([`takes`]) and it is QoS 1 or 2.
    pub fn offer(&mut self, filter: &str, origin: Origin, message: &Message) {
        if let Some(granted) = takes(&self.filters, filter, &message.topic)
            && let Some(kept) = self.keep(granted, message)
        {
            self.push_plain(origin, kept);
        }
    }

    /// `message`, of `origin`, came on the escaped subject (its topic in a
    /// header, `cluster::headers`): kept as [`Collector::offer`] keeps it
    /// if any of the session's filters matches its topic ([`takes_any`]),
    /// as the shards match that subject's messages in full.
    pub fn offer_escaped(&mut self, origin: Origin, message: &Message) {
        if let Some(granted) = takes_any(&self.filters, &message.topic)
            && let Some(kept) = self.keep(granted, message)
        {
            self.push_plain(origin, kept);
        }
    }

    /// Adds `kept`, of `origin`, to the plain entries and to how far each
    /// origin came (`highest`, for the new owner's firsts: shared entries
    /// do not count, the two nodes get disjoint parts of them).
    fn push_plain(&mut self, origin: Origin, kept: Message) {
        let high = self.highest.entry(origin.node).or_insert(origin.seq);
        *high = (*high).max(origin.seq);
        self.entries.push((origin, kept));
    }

    /// `message` as kept, at the lower of its QoS and `granted`, if that is
    /// QoS 1 or 2 and it fits (counted in the bound).
    fn keep(&mut self, granted: QoS, message: &Message) -> Option<Message> {
        if self.overflowed || message.qos == QoS::AtMostOnce {
            return None;
        }
        let qos = message.qos.min(granted);
        if qos == QoS::AtMostOnce {
            return None;
        }
        let size = entry_size(message);
        if self.bytes + size > MAX_TAIL {
            log::warn!(
                "cluster: tail of {:?} over {MAX_TAIL} bytes: later messages of its move are lost",
                self.client_id
            );
            self.overflowed = true;
            return None;
        }
        self.bytes += size;
        let mut kept = message.clone();
        kept.qos = qos;
        kept.retain = false;
        Some(kept)
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
    let first = firsts(&direct);
    tail.into_iter()
        .filter(|(origin, _)| first.get(&origin.node).is_none_or(|&f| origin.seq < f))
        .chain(direct)
        .map(|(_, message)| message)
        .collect()
}

/// What the new owner delivers, in order, of the entries that came
/// through the session's shared subscriptions to the old owner (`tail`)
/// and to itself (`direct`): all of them, each origin's in the order of
/// its sequence numbers. NATS gave each message of a queue group to one
/// node only, so the two are disjoint (the plain rule of [`merge`] would
/// drop the old owner's after the new owner's first); while both nodes
/// held the group for the session each got a part of every origin's
/// stream, in turns. The order across origins is the order of their
/// places in `tail` then `direct`: each place of an origin takes that
/// origin's next number.
pub fn merge_shared(tail: Vec<(Origin, Message)>, direct: Vec<(Origin, Message)>) -> Vec<Message> {
    let mut all: Vec<(Origin, Message)> = tail.into_iter().chain(direct).collect();
    let places: Vec<u64> = all.iter().map(|(o, _)| o.node).collect();
    // Per origin, its entries by sequence number, lowest last (popped first).
    all.sort_by_key(|(o, _)| (o.node, std::cmp::Reverse(o.seq)));
    let mut per_origin: HashMap<u64, Vec<Message>> = HashMap::new();
    for (origin, message) in all {
        per_origin.entry(origin.node).or_default().push(message);
    }
    places
        .into_iter()
        .filter_map(|node| per_origin.get_mut(&node).and_then(Vec::pop))
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
    let first = firsts(direct);
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

/// Per origin node, the sequence number of the first of `entries` from
/// it (each origin's messages come in order).
pub fn firsts(entries: &[(Origin, Message)]) -> HashMap<u64, u64> {
    let mut first: HashMap<u64, u64> = HashMap::new();
    for (origin, _) in entries {
        first.entry(origin.node).or_insert(origin.seq);
    }
    first
}

/// Of the new owner's `firsts` (per origin, the first number it collected
/// itself), those the old owner's collector (per origin, the `highest`
/// number it kept) has not reached yet: an origin whose first it has not
/// kept. Each origin's messages reach the old owner in order, and the
/// first is one of the session's (the old owner collects it too), so once
/// it has it, it has every one of that origin below it: the merge then has
/// no hole between the tail and what the new owner got itself. `own`, the
/// old owner's own origin, never comes to it through NATS (its messages
/// are in the tail by their positions, cluster::positions): left out.
pub fn missing_firsts(
    highest: &HashMap<u64, u64>,
    firsts: &HashMap<u64, u64>,
    own: u64,
) -> Vec<Origin> {
    let mut missing: Vec<Origin> = firsts
        .iter()
        .filter(|&(&node, &first)| node != own && highest.get(&node).is_none_or(|&h| h < first))
        .map(|(&node, &seq)| Origin { node, seq })
        .collect();
    missing.sort_by_key(|o| o.node);
    missing
}

/// The new owner's firsts (per origin, [`firsts`] of what it collected
/// itself, `direct`) that the old owner's `tail` does not reach and that it
/// did not name in its request already (`asked`: the old owner waited for
/// those, or gave up, counted): an origin whose first here came after the
/// request. A message of it between the tail's last and that first may
/// have reached the old owner only after it answered (a NATS cluster of
/// several servers, the old owner's route from that origin the slower):
/// the new owner asks again for these ([`missing_firsts`] on the old
/// owner). The old owner's own origin (`old`, from its cover, if named)
/// is left out: its messages are in the tail by position.
pub fn uncovered(
    tail: &[(Origin, Message)],
    direct: &[(Origin, Message)],
    asked: &HashMap<u64, u64>,
    old: Option<u64>,
) -> HashMap<u64, u64> {
    let mut highest: HashMap<u64, u64> = HashMap::new();
    for (origin, _) in tail {
        let high = highest.entry(origin.node).or_insert(origin.seq);
        *high = (*high).max(origin.seq);
    }
    let mut left = firsts(direct);
    left.retain(|node, first| {
        Some(*node) != old
            && !asked.contains_key(node)
            && highest.get(node).is_none_or(|h| h < first)
    });
    left
}

/// Whether `tail` has an origin, other than those of `skip` (the new
/// owner's own and the old owner's, whose messages are sorted by
/// position), of which `direct` has nothing: the new owner then asks
/// again for what the old owner collected since its answer, which may
/// have reached the new owner only before its subscriptions were live.
pub fn tail_only(
    tail: &[(Origin, Message)],
    direct: &[(Origin, Message)],
    skip: &[Option<u64>],
) -> bool {
    let here = firsts(direct);
    tail.iter()
        .any(|(o, _)| !here.contains_key(&o.node) && !skip.contains(&Some(o.node)))
}

/// [`FIRST_HEADER`]'s value: `<node, 16 hex>.<seq>` per origin (as
/// `Fanmq-O`), comma-separated.
pub fn firsts_header(firsts: &HashMap<u64, u64>) -> String {
    let mut origins: Vec<(&u64, &u64)> = firsts.iter().collect();
    origins.sort();
    let values: Vec<String> = origins
        .into_iter()
        .map(|(&node, &seq)| Origin { node, seq }.to_header())
        .collect();
    values.join(",")
}

/// Reads [`firsts_header`]'s value (an origin that does not read is left
/// out: a newer node's form, or none).
pub fn of_firsts_header(value: &str) -> HashMap<u64, u64> {
    value
        .split(',')
        .filter_map(|origin| Origin::of_header(origin.trim()))
        .map(|origin| (origin.node, origin.seq))
        .collect()
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

/// The message id of a tail entry's record (unused there, 0) that marks
/// an entry collected through a shared subscription ([`Collector::shared`]).
/// An older node reads the id of no tail entry, and so takes such an entry
/// for a plain one: its merge may leave some out, as before shared
/// subscriptions were collected.
const SHARED_ENTRY: u64 = 1;

/// A tail as the old owner sends it: per entry, the origin's node and
/// sequence number (u64 LE each), then a message record, whose message id
/// is [`SHARED_ENTRY`] for the entries of `shared`, 0 for those of
/// `entries` (first).
pub fn encode_tail(entries: &[(Origin, Message)], shared: &[(Origin, Message)]) -> Bytes {
    let (now, unix_now) = (Instant::now(), unix_ms_now());
    let mut out = Vec::new();
    let plain = entries.iter().map(|e| (e, 0));
    for ((origin, message), mid) in plain.chain(shared.iter().map(|e| (e, SHARED_ENTRY))) {
        out.extend_from_slice(&origin.node.to_le_bytes());
        out.extend_from_slice(&origin.seq.to_le_bytes());
        let stored = StoredMessage::of(message, now, unix_now);
        put_record(&mut out, &Record::Message(mid, stored));
    }
    Bytes::from(out)
}

/// A tail's entries: plain ones, and those collected through shared
/// subscriptions.
pub type Entries = (Vec<(Origin, Message)>, Vec<(Origin, Message)>);

/// Reads what [`encode_tail`] wrote (messages expired meanwhile left out):
/// the plain entries and the shared ones.
///
/// # Errors
/// Bytes that are no tail.
pub fn decode_tail(mut bytes: &[u8]) -> Result<Entries, TailError> {
    let (now, unix_now) = (Instant::now(), unix_ms_now());
    let (mut entries, mut shared) = (Vec::new(), Vec::new());
    while !bytes.is_empty() {
        let (node, rest) = bytes
            .split_first_chunk::<8>()
            .ok_or(TailError::Layout("origin cut short"))?;
        let (seq, rest) = rest
            .split_first_chunk::<8>()
            .ok_or(TailError::Layout("origin cut short"))?;
        let (Record::Message(mid, stored), rest) = take_record(rest)? else {
            return Err(TailError::Layout("a record other than a message"));
        };
        let origin = Origin {
            node: u64::from_le_bytes(*node),
            seq: u64::from_le_bytes(*seq),
        };
        if let Some(mut message) = stored.to_message(0, now, unix_now) {
            message.qos = stored.qos;
            match mid {
                SHARED_ENTRY => shared.push((origin, message)),
                _ => entries.push((origin, message)),
            }
        }
        bytes = rest;
    }
    Ok((entries, shared))
}

/// The plain (not shared) subscriptions of a session image (the store's
/// session image record first, as `shard::cluster` encodes it): filter
/// and QoS granted.
///
/// # Errors
/// Bytes that are no session image.
pub fn image_filters(image: &[u8]) -> Result<Vec<(ByteString, QoS)>, TailError> {
    image_subscriptions(image, false)
}

/// The shared subscriptions of a session image, as [`image_filters`]
/// reads the plain ones: the whole `$share/...` filter and QoS granted.
///
/// # Errors
/// Bytes that are no session image.
pub fn image_shares(image: &[u8]) -> Result<Vec<(ByteString, QoS)>, TailError> {
    image_subscriptions(image, true)
}

/// The subscriptions of a session image that are shared (`shares`) or
/// plain.
fn image_subscriptions(image: &[u8], shares: bool) -> Result<Vec<(ByteString, QoS)>, TailError> {
    let first = records(first_record(image)?)?;
    let Some(Record::SessionImage(session)) = first.into_iter().next() else {
        return Err(TailError::Layout("no session image first"));
    };
    Ok(session
        .subscriptions
        .into_iter()
        .filter(|s| shared::is_shared(&s.filter) == shares)
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

/// Whether `shard` of the interest table is a pseudo shard
/// ([`PSEUDO_SHARDS`]): a hold of a moving session's, which counts as no
/// member of a shared subscription's group (it asks for no queue
/// subscription of its own).
pub(super) fn is_pseudo(shard: usize) -> bool {
    shard >= PSEUDO_SHARDS
}

/// Longest the old owner waits for every shard to have a hand-over's mark
/// (their queues from the bridge drained up to it) before the take-over
/// goes on; a shard slower than that may give the session a message its
/// collector also has.
const MARK_WAIT: Duration = Duration::from_millis(500);

/// The header of a tail answer when the old owner collected nothing for
/// the session (no collector: an older node, none held, or it expired).
const NO_TAIL_HEADER: &str = "Fanmq-Tail-None";

/// Longest the old owner waits, before it answers a tail request, until
/// its collector has the first message the new owner collected itself of
/// each origin the request names ([`FIRST_HEADER`], [`missing_firsts`]):
/// with a NATS cluster of several servers a publisher's server can reach
/// the old owner by a slower route than the new owner, and what came
/// between the old owner's last and the new owner's first would be in
/// neither. Routes of one NATS cluster differ by milliseconds; 300 ms
/// leaves room for a loaded one, and the old owner's waits for one move
/// (this, twice at most, and `COVER_WAIT`'s 500 ms) stay within the new
/// owner's `takeover_timeout_ms` (2 s by default) for the tail. Beyond,
/// it answers with what it has, counted (`cluster_tails_behind`) and
/// logged.
pub const FIRST_WAIT: Duration = Duration::from_millis(300);

/// The header of a tail request naming, per origin, the first sequence
/// number the new owner collected itself ([`firsts_header`]); an older
/// old owner ignores it and answers at once, as before.
const FIRST_HEADER: &str = "Fanmq-Tail-First";

/// The header (`1`) of a first tail request from a node that may ask
/// again ([`uncovered`]): the old owner answers and keeps collecting,
/// and says so with [`OPEN_HEADER`]; the new owner asks again (without
/// this header: the old owner then closes its collector) or says it is
/// done (a request without a reply subject). An older old owner ignores
/// it and closes at its answer.
const AGAIN_HEADER: &str = "Fanmq-Tail-Again";

/// The header (`1`) of a tail answer whose collector stays open for a
/// second request ([`AGAIN_HEADER`]).
const OPEN_HEADER: &str = "Fanmq-Tail-Open";

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

/// A lend's claim, and what the session's state holds of NATS
/// ([`Moving::lend`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Lend {
    /// The claim's shard.
    pub(super) shard: usize,
    /// The claim's token there.
    pub(super) token: u64,
    /// The number of the last NATS batch the state holds
    /// (cluster::received).
    pub(super) after: u64,
    /// Whether the escaped subject's batches were sent (once per lend:
    /// several of its filters may hold that subject).
    pub(super) escaped: bool,
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
    /// The client id of each forwarded pseudo shard that holds shared
    /// subscriptions: what NATS gives this node for them goes to the
    /// claim's shard named for that session ([`Moving::shared_target`]),
    /// which keeps it for the attaching claim, as `forward` does a plain
    /// subscription's messages.
    named: HashMap<usize, ByteString>,
    /// The old owner's collector of each session it handed over, until
    /// its tail is asked for.
    handed: HashMap<ByteString, usize>,
    /// The pseudo shard of each session's lend (`Control::Lend`): one per
    /// session, that of its latest move inside the node, which its state
    /// went with; an older one would forward to a shard the session left
    /// and give a claim there what the session got already.
    lent: HashMap<ByteString, usize>,
    /// Each lend's claim (its shard's token) and the number of the last
    /// NATS batch the session's state holds (`Control::Lend`), by pseudo
    /// shard: what [`ToShard::Lent`] names and brings.
    lends: HashMap<usize, Lend>,
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

    /// The active collector holding the shared subscription `share`, if
    /// any: it takes every message NATS gives this node for `share`
    /// (the old owner's from its mark, the new owner's until its grant),
    /// rather than the shards' members. Each is the session's own: NATS
    /// gave it to this node alone.
    pub(super) fn shared_collector(&self, share: &str) -> Option<usize> {
        self.collectors
            .iter()
            .find(|(_, (c, active))| *active && c.shares.iter().any(|s| s.0 == share))
            .map(|(&shard, _)| shard)
    }

    /// `message`, of `origin`, came for the shared subscription `share`:
    /// collected by the collector of pseudo shard `shard`.
    pub(super) fn offer_shared(
        &mut self,
        shard: usize,
        share: &str,
        origin: Origin,
        message: &Message,
    ) {
        if let Some((collector, true)) = self.collectors.get_mut(&shard) {
            collector.offer_shared(share, origin, message);
        }
    }

    /// Where a shared subscription's message for `shard` of the interest
    /// table goes: a real shard to one of its members, a forwarded pseudo
    /// shard to the claim's shard named for its session (None: to no
    /// shard).
    pub(super) fn shared_target(&self, shard: usize) -> Option<(usize, Option<ByteString>)> {
        let to = self.target(shard)?;
        Some((to, self.named.get(&shard).cloned()))
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
    /// attaching there; its shares' messages named for the session, as
    /// after a new owner's grant): what it collected, in the order it
    /// came, then what came through the shares (this node's alone: NATS
    /// gave each to one member).
    fn collected_for(&mut self, pseudo: usize, shard: usize) -> Vec<(Origin, Message)> {
        self.forward.insert(pseudo, shard);
        let Some((collector, _)) = self.collectors.remove(&pseudo) else {
            return Vec::new();
        };
        if !collector.shares.is_empty() {
            self.named.insert(pseudo, collector.client_id.clone());
        }
        let mut collected = collector.entries;
        collected.extend(collector.shared);
        collected
    }

    /// Opens a pseudo shard that holds `filters` for real shard `shard`,
    /// where what they bring goes: a claim there takes the persistent
    /// session `client_id` over from a shard of this node
    /// (`Control::Lend`); no collector. Returns it and the session's
    /// previous lend, which the caller closes.
    pub(super) fn lend(
        &mut self,
        client_id: ByteString,
        (shard, token): (usize, u64),
        after: u64,
        filters: &[ByteString],
    ) -> (usize, Option<usize>) {
        let pseudo = self.new_pseudo();
        self.holds.insert(pseudo, filters.to_vec());
        self.forward.insert(pseudo, shard);
        self.lends.insert(
            pseudo,
            Lend {
                shard,
                token,
                after,
                escaped: false,
            },
        );
        (pseudo, self.lent.insert(client_id, pseudo))
    }

    /// The lend of pseudo shard `pseudo`, if it is one still open.
    pub(super) fn lend_of(&self, pseudo: usize) -> Option<Lend> {
        self.lends.get(&pseudo).copied()
    }

    /// The lend of pseudo shard `pseudo` holds the escaped subject now:
    /// whether that is new (its batches are then to be sent, once).
    pub(super) fn lend_escaped(&mut self, pseudo: usize) -> bool {
        self.lends
            .get_mut(&pseudo)
            .is_some_and(|l| !std::mem::replace(&mut l.escaped, true))
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

    /// A pseudo shard not given out before.
    fn new_pseudo(&mut self) -> usize {
        self.next += 1;
        PSEUDO_SHARDS + self.next
    }

    /// Opens `collector` (collecting at once if `active`): its pseudo
    /// shard.
    fn open(&mut self, collector: Collector, active: bool) -> usize {
        let shard = self.new_pseudo();
        let held = collector.filters.iter().chain(&collector.shares);
        self.holds
            .insert(shard, held.map(|f| f.0.clone()).collect());
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
    b.moving.named.remove(&shard);
    b.moving.delivered.remove(&shard);
    b.moving.lends.remove(&shard);
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
/// Never dropped, and in order with the deliveries (a full queue: behind
/// its backlog, cluster::backlog): what the bridge read before the mark
/// reaches the shard before it, what it read after (collected), after.
fn mark(b: &Bridge, client_id: &ByteString) -> async_channel::Receiver<()> {
    let (done, marked) = async_channel::bounded(1);
    for shard in 0..b.to_shards.len() {
        let handing = ToShard::Handing {
            client_id: client_id.clone(),
            on: true,
            done: Some(done.clone()),
        };
        b.to_shards.control(shard, handing);
    }
    marked
}

/// Tells every shard that the hand-over of `client_id` ended: never
/// dropped (a full queue: behind its backlog), or a later session of the
/// id here would take nothing from NATS.
fn unmark(b: &Bridge, client_id: &ByteString) {
    for shard in 0..b.to_shards.len() {
        let handing = ToShard::Handing {
            client_id: client_id.clone(),
            on: false,
            done: None,
        };
        b.to_shards.control(shard, handing);
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
    let shares = image_shares(&image).ok()?;
    if filters.is_empty() && shares.is_empty() {
        return None;
    }
    let collector = Collector::new(client_id.clone(), filters.clone()).sharing(shares.clone());
    let shard = bridge.borrow_mut().moving.open(collector, false);
    // Held already (the session's own): the bridge answers at once, unless
    // its interest queue is behind a NATS server's confirmation. The
    // shares' queue subscriptions stay while the session's membership
    // leaves with its eviction.
    let held: Vec<_> = filters.into_iter().chain(shares).collect();
    hold(bridge, shard, &held, Instant::now() + MARK_WAIT).await;
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
/// when it has nothing), once it has the firsts the request names, and
/// stops collecting, or collects on for a second request
/// ([`answer_tail`]).
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
    while let Some(request) = futures_lite::StreamExt::next(&mut requests).await {
        // One task per request: one that waits for the new owner's firsts
        // holds up no other move's.
        tokio::task::spawn_local(answer_tail(bridge.clone(), client.clone(), request));
    }
}

/// Answers one tail `request` (its payload the client id) for
/// [`serve_tails`]: once the collector has the first message the new
/// owner got itself of each origin the request names ([`FIRST_HEADER`],
/// at most [`FIRST_WAIT`]), with what it collected since its last answer
/// (and, at the first, this node's own messages the session lacks); then
/// closes the collector, unless the request asks to keep it for a second
/// one ([`AGAIN_HEADER`]). A request without a reply subject closes it:
/// the new owner needs nothing more.
async fn answer_tail(bridge: Shared, client: async_nats::Client, request: async_nats::Message) {
    let Ok(id) = std::str::from_utf8(&request.payload) else {
        return;
    };
    let header = |name: &str| {
        let value = request.headers.as_ref()?.get(name)?;
        Some(value.as_str().to_owned())
    };
    let firsts = header(FIRST_HEADER)
        .map(|v| of_firsts_header(&v))
        .unwrap_or_default();
    let keep = header(AGAIN_HEADER).is_some();
    // What the server sent before the request was read before it: the
    // subscriptions' readers hand it to the collector before it is read.
    let_readers_run().await;
    let shard = bridge.borrow().moving.handed.get(id).copied();
    let Some(reply) = request.reply.clone() else {
        if let Some(shard) = shard {
            bridge.borrow_mut().moving.handed.remove(id);
            close(&bridge, shard);
        }
        return;
    };
    if let Some(shard) = shard {
        wait_for_firsts(&bridge, id, shard, &firsts).await;
        // What NATS gave this node for the session's shares up to its
        // leaving the groups is collected, the rest goes to the new
        // owner's membership (bridge::drain_shares): before the first
        // answer, which so has every shared entry (a second answer has
        // none; a share drained already is not held any more).
        let shares = bridge.borrow().moving.collectors.get(&shard).map(|c| {
            let shares = c.0.shares.iter();
            shares.map(|s| s.0.clone()).collect::<Vec<_>>()
        });
        drain_shares(&bridge, shard, &shares.unwrap_or_default()).await;
    }
    let taken = shard.and_then(|shard| take_answer(&bridge, id, shard, keep));
    let sent = match taken {
        Some((mut c, first)) => {
            // This node's own messages the session lacks, and up to
            // where (cluster::positions): in the first answer only.
            let cover = if first {
                positions::own_tail(&bridge, id, &c.filters, &mut c.entries).await
            } else {
                None
            };
            log::debug!(
                "cluster: tail of {id:?}: {} messages, {} shared{}{}",
                c.entries.len(),
                c.shared.len(),
                if c.overflowed { ", overflowed" } else { "" },
                if keep { ", collecting on" } else { "" }
            );
            let mut headers = async_nats::HeaderMap::new();
            if let Some(cover) = cover {
                let value = cover.to_header();
                headers.insert(positions::COVER_HEADER, value.as_str());
            }
            if keep {
                headers.insert(OPEN_HEADER, "1");
            }
            let tail = encode_tail(&c.entries, &c.shared);
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

/// Waits until the collector of pseudo shard `shard` (for `id`) has
/// every origin's first of `firsts` ([`missing_firsts`]), at most
/// [`FIRST_WAIT`]; then lets the readers run (the first came on one
/// subscription, an earlier message of its origin may still be in
/// another's queue). Beyond the bound, counted (`cluster_tails_behind`)
/// and logged. A collector gone or full ends the wait: nothing more comes
/// to it.
async fn wait_for_firsts(bridge: &Shared, id: &str, shard: usize, firsts: &HashMap<u64, u64>) {
    if firsts.is_empty() {
        return;
    }
    let by = Instant::now() + FIRST_WAIT;
    loop {
        let missing = {
            let b = bridge.borrow();
            match b.moving.collectors.get(&shard) {
                Some((c, _)) if !c.overflowed => missing_firsts(&c.highest, firsts, b.origin),
                _ => return,
            }
        };
        if missing.is_empty() {
            let_readers_run().await;
            return;
        }
        if Instant::now() >= by {
            let named: Vec<String> = missing.iter().map(|o| o.to_header()).collect();
            log::info!(
                "cluster: tail of {id:?} answered without the first messages the new node got itself of {}: what came before them here is lost for it",
                named.join(", ")
            );
            let status = bridge.borrow().status.clone();
            status
                .figures
                .cluster_tails_behind
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// What the answer to a tail request for `id` sends of the collector of
/// pseudo shard `shard` (None: it is gone, or another hand-over of the id
/// took its place meanwhile): the collector itself, closed, or with
/// `keep`, a copy of it with the entries collected since the last answer,
/// the collector going on; and whether it is its first answer.
fn take_answer(bridge: &Shared, id: &str, shard: usize, keep: bool) -> Option<(Collector, bool)> {
    let mut b = bridge.borrow_mut();
    if b.moving.handed.get(id) != Some(&shard) {
        return None;
    }
    if keep {
        let (c, _) = b.moving.collectors.get_mut(&shard)?;
        let first = !c.answered;
        c.answered = true;
        c.bytes = 0;
        let mut sent = Collector::new(c.client_id.clone(), c.filters.clone());
        sent.entries = std::mem::take(&mut c.entries);
        sent.shared = std::mem::take(&mut c.shared);
        sent.overflowed = c.overflowed;
        return Some((sent, first));
    }
    b.moving.handed.remove(id);
    drop(b);
    let c = close(bridge, shard)?;
    let first = !c.answered;
    Some((c, first))
}

/// The headers of a tail request naming `firsts` ([`FIRST_HEADER`]), and
/// with `again`, [`AGAIN_HEADER`].
fn request_headers(firsts: &HashMap<u64, u64>, again: bool) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    if !firsts.is_empty() {
        headers.insert(FIRST_HEADER, firsts_header(firsts).as_str());
    }
    if again {
        headers.insert(AGAIN_HEADER, "1");
    }
    headers
}

/// Per origin, the first number the collector of pseudo shard `shard`
/// holds ([`firsts`]; empty without one).
fn collected_firsts(bridge: &Shared, shard: usize) -> HashMap<u64, u64> {
    let b = bridge.borrow();
    b.moving
        .collectors
        .get(&shard)
        .map(|c| firsts(&c.0.entries))
        .unwrap_or_default()
}

/// Whether a tail answer has header `name`.
fn has_header(msg: &async_nats::Message, name: &str) -> bool {
    msg.headers.as_ref().is_some_and(|h| h.get(name).is_some())
}

/// The new owner, granted `client_id` with `image` from node `owner`
/// (claim `(shard, deadline)`): holds the session's filters (once the
/// server has them, what they bring is collected), asks the old owner
/// for its tail (naming the first message of each origin collected here;
/// a second time for the origins whose first came during the first
/// request, [`uncovered`]), and returns the image with the merge of both
/// queued
/// ([`merge`]); from then on the holds' messages go to `shard`, for
/// the attaching session, for [`HOLD_AFTER_GRANT`]. Without the old
/// owner's tail in time, only what was collected here (counted).
pub(super) async fn complete(
    bridge: &Shared,
    client_id: &ByteString,
    (owner, shard, token, deadline): (&str, usize, u64, Instant),
    image: Bytes,
) -> Bytes {
    let (Ok(filters), Ok(shares)) = (image_filters(&image), image_shares(&image)) else {
        return image;
    };
    if filters.is_empty() && shares.is_empty() {
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
    let sharing = !shares.is_empty();
    let collector = Collector::new(client_id.clone(), filters.clone()).sharing(shares.clone());
    let pseudo = bridge.borrow_mut().moving.open(collector, true);
    // The shares' queue subscriptions too: this node is in the groups
    // before the old owner leaves them.
    let held: Vec<_> = filters.iter().cloned().chain(shares).collect();
    hold(bridge, pseudo, &held, deadline).await;
    let left = deadline.saturating_duration_since(Instant::now());
    // What this node publishes from here on reaches the old owner after
    // the request: the claim's shard has it (cluster::positions).
    let before = bridge
        .borrow_mut()
        .local
        .watch(client_id, token, Instant::now());
    let (subject, payload) = (
        tail_subject(&root, owner),
        Bytes::copy_from_slice(client_id.as_bytes()),
    );
    let answered_by = tokio::time::Instant::now() + timeout.min(left);
    // The first message of each origin collected here so far: the old
    // owner answers once it has them too (FIRST_WAIT).
    let asked = collected_firsts(bridge, pseudo);
    let request = request_headers(&asked, true);
    let asked_for = client.request_with_headers(subject.clone(), request, payload.clone());
    let answer = tokio::time::timeout_at(answered_by, asked_for).await;
    // What the server sent before the answer was read before it: let the
    // subscriptions' readers hand it to the collector first.
    let_readers_run().await;
    let mut cover = None;
    let mut open = false;
    let tail = match answer {
        Ok(Ok(msg)) if !has_header(&msg, NO_TAIL_HEADER) => {
            cover = positions::cover_of(msg.headers.as_ref());
            open = has_header(&msg, OPEN_HEADER);
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
    let (mut tail, mut tail_shared) = match tail {
        Some((plain, shared)) => (Some(plain), shared),
        None => (None, Vec::new()),
    };
    if open {
        // Origins whose first here came after the request: the old owner
        // may have answered before it had what came before them.
        // And origins of the tail with none here yet: what the old owner
        // got of them since its answer may have reached this node before
        // its subscriptions; the merge takes it (what comes here again
        // after, the doubles' guard drops).
        let (again, unseen) = match &tail {
            Some(tail) => {
                let b = bridge.borrow();
                let direct = b.moving.collectors.get(&pseudo).map(|c| &c.0.entries[..]);
                let direct = direct.unwrap_or(&[]);
                let old = cover.map(|c| c.node);
                let skip = [Some(b.origin), old];
                (
                    uncovered(tail, direct, &asked, old),
                    tail_only(tail, direct, &skip),
                )
            }
            None => (HashMap::new(), false),
        };
        if again.is_empty() && !unseen {
            // Nothing more: the old owner closes its collector.
            if let Err(e) = client.publish(subject, payload).await {
                log::debug!("cluster: end of the tail of {client_id:?} not sent: {e}");
            }
        } else {
            let request = request_headers(&again, false);
            let asked_for = client.request_with_headers(subject, request, payload);
            let answer = tokio::time::timeout_at(answered_by, asked_for).await;
            let_readers_run().await;
            match (answer, tail.as_mut()) {
                (Ok(Ok(msg)), Some(tail)) if !has_header(&msg, NO_TAIL_HEADER) => {
                    match decode_tail(&msg.payload) {
                        Ok((more, more_shared)) => {
                            tail.extend(more);
                            tail_shared.extend(more_shared);
                        }
                        Err(e) => log::debug!("cluster: tail of {client_id:?}: {e}"),
                    }
                }
                (Ok(Err(e)), _) => {
                    log::debug!("cluster: rest of the tail of {client_id:?} from {owner}: {e}");
                }
                _ => log::debug!("cluster: no rest of the tail of {client_id:?} from {owner}"),
            }
        }
    }
    // No await from here to the grant in the shard's queue: what the holds
    // bring after this goes to the shard, behind the grant.
    let (mut tail, (mut direct, direct_shared)) = (tail, {
        let mut b = bridge.borrow_mut();
        let collector = b.moving.collectors.remove(&pseudo).map(|c| c.0);
        b.moving.forward.insert(pseudo, shard);
        if sharing {
            b.moving.named.insert(pseudo, client_id.clone());
        }
        collector.map(|c| (c.entries, c.shared)).unwrap_or_default()
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
        "cluster: move of {client_id:?} from {owner}: tail {:?}, here {:?}, shared {:?} and {:?} (count, lowest, highest)",
        span(&tail),
        span(&direct),
        span(&tail_shared),
        span(&direct_shared)
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
    let mut merged = merge(tail, direct);
    merged.extend(merge_shared(tail_shared, direct_shared));
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
        let (lent, before) = moving.lend("c".into(), (3, 70), 12, &filters);
        assert!(lent >= PSEUDO_SHARDS && before.is_none());
        let lend = Lend {
            shard: 3,
            token: 70,
            after: 12,
            escaped: false,
        };
        assert_eq!(moving.lend_of(lent), Some(lend), "its claim and position");
        assert_eq!(moving.lend_of(1), None, "a real shard");
        assert!(moving.lend_escaped(lent), "the escaped subject, once");
        assert!(!moving.lend_escaped(lent));
        assert_eq!(
            moving.holds.get(&lent).map(Vec::as_slice),
            Some(&filters[..])
        );
        assert_eq!(moving.target(lent), Some(3));
        assert_eq!(moving.target(1), Some(1));
        assert!(!moving.reads_origins());
        // The session's next move replaces it: one lend per session.
        let (next, before) = moving.lend("c".into(), (1, 71), 20, &filters);
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
        let (lent, _) = moving.lend("c".into(), (3, 70), 0, &filters);
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

    /// The old owner answers once its collector has kept the new
    /// owner's first of each origin named (each origin comes in order, so
    /// then it has every one below it); an origin it has not reached yet
    /// is missing, its own origin never (it never comes through NATS).
    #[test]
    fn the_old_owner_waits_for_the_new_owners_first_of_each_origin() {
        let mut c = Collector::new("x".into(), vec![("t".into(), QoS::AtLeastOnce)]);
        for (node, seq) in [(1, 4), (1, 6), (2, 3)] {
            let (origin, message) = entry(node, seq);
            c.offer("t", origin, &message);
        }
        // Own origin 4: left out whatever it names.
        let firsts = HashMap::from([(1, 7), (2, 3), (3, 1), (4, 100)]);
        let missing = missing_firsts(&c.highest, &firsts, 4);
        assert_eq!(
            missing,
            [Origin { node: 1, seq: 7 }, Origin { node: 3, seq: 1 }]
        );
        for (node, seq) in [(1, 8), (3, 2)] {
            let (origin, message) = entry(node, seq);
            c.offer("t", origin, &message);
        }
        assert!(missing_firsts(&c.highest, &firsts, 4).is_empty());
        // What was sent already still counts (a second answer's wait).
        c.entries.clear();
        assert!(missing_firsts(&c.highest, &firsts, 4).is_empty());
        assert!(missing_firsts(&c.highest, &HashMap::new(), 4).is_empty());
    }

    /// A numbered stream of one origin, 1..=20; the old owner collected
    /// from 4 on (its mark), the new owner from 10 on. Answering at 6, as
    /// before, the merge lost 7 to 9 (they reached the old owner after
    /// its answer); waiting until it has 10, every number once, in order.
    #[test]
    fn a_tail_that_reaches_the_new_owners_first_leaves_no_hole() {
        let direct: Vec<_> = (10..=20).map(|n| entry(1, n)).collect();
        let numbers = |merged: Vec<Message>| -> Vec<u64> {
            payloads(&merged)
                .iter()
                .map(|p| p.split_once(':').unwrap().1.parse().unwrap())
                .collect()
        };
        let early: Vec<_> = (4..=6).map(|n| entry(1, n)).collect();
        let got = numbers(merge(early, direct.clone()));
        assert_eq!(
            got,
            [4, 5, 6].into_iter().chain(10..=20).collect::<Vec<_>>()
        );
        let waited: Vec<_> = (4..=11).map(|n| entry(1, n)).collect();
        let mut c = Collector::new("x".into(), vec![("t".into(), QoS::AtLeastOnce)]);
        for (origin, message) in &waited {
            c.offer("t", *origin, message);
        }
        assert!(missing_firsts(&c.highest, &firsts(&direct), 9).is_empty());
        let got = numbers(merge(waited, direct));
        assert_eq!(got, (4..=20).collect::<Vec<_>>());
    }

    /// Asked again: the origins whose first here the request did not name
    /// and the tail does not reach; not one the tail reaches, one named
    /// (the old owner waited for it), nor the old owner's own (its
    /// messages are in the tail by position). Two answers make one tail:
    /// the merge of both has no hole and nothing twice.
    #[test]
    fn an_origin_first_seen_after_the_request_is_asked_for_again() {
        // Origin 1: named in the request. Origin 2: the tail has 20..=22,
        // the first here is 21. Origin 3: the tail has 5, here from 9.
        // Origin 4: the tail has none. Origin 7: the old owner's own.
        let tail = vec![entry(2, 20), entry(2, 21), entry(2, 22), entry(3, 5)];
        let direct = vec![
            entry(1, 50),
            entry(2, 21),
            entry(3, 9),
            entry(4, 2),
            entry(7, 30),
        ];
        let asked = HashMap::from([(1, 50)]);
        let again = uncovered(&tail, &direct, &asked, Some(7));
        assert_eq!(again, HashMap::from([(3, 9), (4, 2)]));
        assert_eq!(uncovered(&tail, &direct, &asked, None).len(), 3);
        // Every origin of the tail is here: no second request for that.
        assert!(!tail_only(&tail, &direct, &[Some(7)]));
        // Origin 5 only in the tail: asked again (unless it is skipped,
        // the old or the new owner's own).
        let with_five = [tail.clone(), vec![entry(5, 1)]].concat();
        assert!(tail_only(&with_five, &direct, &[Some(7)]));
        assert!(!tail_only(&with_five, &direct, &[Some(7), Some(5)]));
        // The second answer: what the old owner collected after its first,
        // up to the firsts asked for (and beyond: left out by the merge).
        let mut both = tail;
        both.extend([
            entry(3, 6),
            entry(3, 8),
            entry(4, 1),
            entry(3, 9),
            entry(4, 2),
        ]);
        let direct: Vec<_> = direct
            .into_iter()
            .filter(|(o, _)| o.node != 1 && o.node != 7)
            .collect();
        let direct = after_hand_over(&both, direct);
        let got = payloads(&merge(both, direct));
        assert_eq!(
            got,
            ["2:20", "3:5", "3:6", "3:8", "4:1", "2:21", "3:9", "4:2"]
        );
    }

    /// The firsts' header reads back; an origin that does not read is
    /// left out.
    #[test]
    fn the_firsts_header_reads_back() {
        let firsts = HashMap::from([(0x3f2a_9c0d_11e2_b4c5, 1234), (1, 7)]);
        let value = firsts_header(&firsts);
        assert_eq!(value, "0000000000000001.7,3f2a9c0d11e2b4c5.1234");
        assert_eq!(of_firsts_header(&value), firsts);
        assert_eq!(
            of_firsts_header("zz.1,0000000000000002.x, 0000000000000003.4"),
            HashMap::from([(3, 4)])
        );
        assert!(of_firsts_header("").is_empty());
    }

    /// A tail reads back as it was written; bytes that are no tail are
    /// refused.
    #[test]
    fn a_tail_reads_back() {
        let mut two = message("a/b", "two");
        two.qos = QoS::ExactlyOnce;
        let entries = vec![entry(5, 1), (Origin { node: 6, seq: 2 }, two)];
        let bytes = encode_tail(&entries, &[]);
        let (back, shared) = decode_tail(&bytes).unwrap();
        assert!(shared.is_empty());
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].0, Origin { node: 5, seq: 1 });
        assert_eq!(back[1].0, Origin { node: 6, seq: 2 });
        assert_eq!(back[1].1.qos, QoS::ExactlyOnce);
        assert_eq!(&back[1].1.topic[..], "a/b");
        assert_eq!(&back[1].1.payload[..], b"two");
        assert!(decode_tail(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_tail(&[1, 2, 3]).is_err());
        assert!(decode_tail(&[]).unwrap().0.is_empty());
    }

    /// A tail's shared entries read back as shared, its plain ones as
    /// plain, each in order; without shared entries the bytes are those
    /// of a tail of before (an entry's message id 0), and a reader that
    /// ignores the id (an older node) reads every entry.
    #[test]
    fn a_tails_shared_entries_read_back_as_shared() {
        let plain = vec![entry(5, 1), entry(5, 3)];
        let shared = vec![entry(5, 2), entry(7, 9)];
        let bytes = encode_tail(&plain, &shared);
        let (back, back_shared) = decode_tail(&bytes).unwrap();
        let seqs = |e: &[(Origin, Message)]| e.iter().map(|e| e.0.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&back), [1, 3]);
        assert_eq!(seqs(&back_shared), [2, 9]);
        assert_eq!(back_shared[1].0.node, 7);
        // Shared entries' records differ from plain ones in the id only.
        let all_plain = encode_tail(&[plain.clone(), shared.clone()].concat(), &[]);
        assert_eq!(bytes.len(), all_plain.len());
        assert_ne!(bytes, all_plain);
        let (back, back_shared) = decode_tail(&all_plain).unwrap();
        assert_eq!((back.len(), back_shared.len()), (4, 0));
    }

    /// The old owner's and the new owner's shared entries are disjoint
    /// (NATS gave each to one node): all of them are delivered, each
    /// origin's in order of its numbers, where the plain merge would drop
    /// the tail's after the new owner's first.
    #[test]
    fn shared_entries_of_both_owners_are_all_delivered_in_order_per_origin() {
        // Origin 1 alternated between the nodes while both held the
        // group; origin 2 reached the old owner only, origin 3 the new.
        let tail = vec![entry(1, 1), entry(2, 5), entry(1, 3), entry(1, 4)];
        let direct = vec![entry(1, 2), entry(3, 1), entry(1, 5), entry(2, 6)];
        let got = payloads(&merge_shared(tail.clone(), direct.clone()));
        assert_eq!(
            got,
            ["1:1", "2:5", "1:2", "1:3", "1:4", "3:1", "1:5", "2:6"]
        );
        // The plain rule would have lost 1:3 and 1:4.
        assert_eq!(merge(tail, direct).len(), 6);
        assert!(merge_shared(vec![], vec![]).is_empty());
        assert_eq!(payloads(&merge_shared(vec![entry(4, 2)], vec![])), ["4:2"]);
    }

    /// A collector with shares keeps a shared subscription's QoS 1/2
    /// messages apart from its plain ones, at the QoS granted for that
    /// share; nothing for a share it does not hold, nor QoS 0.
    #[test]
    fn a_collector_keeps_a_shares_messages_apart() {
        let filters = vec![(ByteString::from("a/#"), QoS::AtLeastOnce)];
        let shares = vec![(ByteString::from("$share/g/a/#"), QoS::AtLeastOnce)];
        let mut c = Collector::new("x".into(), filters).sharing(shares);
        let o = |seq| Origin { node: 3, seq };
        let mut two = message("a/b", "two");
        two.qos = QoS::ExactlyOnce;
        c.offer_shared("$share/g/a/#", o(1), &two);
        c.offer_shared("$share/h/a/#", o(2), &message("a/b", "other group"));
        let mut zero = message("a/b", "zero");
        zero.qos = QoS::AtMostOnce;
        c.offer_shared("$share/g/a/#", o(3), &zero);
        c.offer("a/#", o(4), &message("a/b", "plain"));
        let got: Vec<(u64, QoS)> = c.shared.iter().map(|(o, m)| (o.seq, m.qos)).collect();
        assert_eq!(got, [(1, QoS::AtLeastOnce)]);
        assert_eq!(c.entries.len(), 1);
        // The bridge finds the active collector of a share only.
        let mut moving = Moving::default();
        let pseudo = moving.open(c, false);
        assert_eq!(moving.shared_collector("$share/g/a/#"), None);
        moving.collectors.get_mut(&pseudo).unwrap().1 = true;
        assert_eq!(moving.shared_collector("$share/g/a/#"), Some(pseudo));
        assert_eq!(moving.shared_collector("$share/h/a/#"), None);
        assert_eq!(moving.holds[&pseudo].len(), 2, "plain and shared held");
        // Forwarded after the grant, named for the session.
        moving.collectors.clear();
        moving.forward.insert(pseudo, 1);
        moving.named.insert(pseudo, "x".into());
        assert_eq!(moving.shared_target(pseudo), Some((1, Some("x".into()))));
        assert_eq!(moving.shared_target(0), Some((0, None)));
        assert_eq!(moving.shared_target(pseudo + 1), None);
    }
}
