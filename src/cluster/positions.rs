//! Positions of this node's own publishes, for a session moving between
//! nodes while a client of the old or the new node publishes on its topics
//! (docs/design/cluster.md §9, "Publishes on the two nodes themselves").
//!
//! A local publish reaches the node's sessions shard to shard over the
//! mesh, never through NATS, so the collectors of `cluster::tail` never see
//! it. So every shard counts the messages it hands on (its *shard
//! sequence*: each batch it sends the other shards and the bridge carries
//! its first, `mesh::ShardMsg::Publish`, `link::Outgoing`), and every shard
//! keeps how far it routed each shard's messages ([`Seen`]). Then:
//!
//! - **Old owner A.** The claim the hand-over makes on A reports to the
//!   bridge the [`Seen`] its state came with, that of the shard that took
//!   it (`link::Control::Seen`): what that shard routed is in the image,
//!   the rest is not. The bridge keeps its recent
//!   outgoing batches ([`Local`], a ring bounded by [`RING_AGE`] and
//!   [`RING_BYTES`]), and answers the new owner's tail request with the
//!   ring's messages the session takes and its shard had not routed, each
//!   with the origin the bridge stamped on it, and, in a header
//!   ([`COVER_HEADER`]), the last sequence number it had published: the new
//!   owner drops what it got itself of A's origin up to there (in the image
//!   or the tail already). Before it answers, the bridge waits until it has
//!   published every message the shard had routed ([`Local::covers`]), so
//!   that what comes after the cover is in neither.
//! - **New owner B.** What B published before its tail request reached A
//!   before the request (one connection: the request and B's data go on
//!   B's data connection, and A's tail subscription shares A's data
//!   connection with its data subscriptions): it is in A's image or tail.
//!   So B's bridge notes, when it asks, the positions it had published
//!   ([`Local::watch`]) and sends them with the grant
//!   (`link::ToShard::Claimed`), and drops its own messages after them
//!   from A's tail ([`sort_tail`]). The claim's shard keeps a ring of the
//!   batches it routed lately ([`Routed`]): when the grant makes the claim
//!   attaching, it keeps for it every QoS 1/2 message it routed that was
//!   not published then ([`Routed::missed`]), after the image, in the order
//!   routed; what it routes from then on is kept for the claim as it
//!   comes (`Shard::queue_for_attaching`). One step of that shard: in
//!   order, each once.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytestring::ByteString;

use crate::cluster::bridge::Shared;
use crate::cluster::headers::Origin;
use crate::cluster::tail;
pub use crate::mesh::Seen;
use crate::protocol::message::Message;
use crate::protocol::topic;
use crate::protocol::v3::QoS;

/// How long the bridge and each shard (cluster mode) keep a batch: the old
/// owner's bridge reads back from its shard's eviction to the new owner's
/// tail request (a compare-and-set, the image's reply, the new owner's
/// subscriptions and its request: milliseconds), the new owner's shard
/// from its tail request to its grant (at most `takeover_timeout_ms`, 2 s
/// by default, later); 3 s covers both with a margin.
pub const RING_AGE: Duration = Duration::from_secs(3);

/// Most bytes (topics and payloads) of the batches one ring holds: a ring
/// holds clones of batches the shards share anyway (the bridge's and the
/// shards' rings the same ones), but keeps them alive; at 32 MiB a node
/// publishing faster than about 10 MiB/s keeps less than [`RING_AGE`] (a
/// move then counts `cluster_tails_short`). The newest batch is always
/// kept.
pub const RING_BYTES: usize = 32 << 20;

/// How long the bridge keeps a shard's [`Seen`] of a hand-over for the
/// tail request or a claim here taking the session back: longer than the
/// ring reaches back ([`RING_AGE`]), past which the position serves
/// nothing.
const SEEN_KEPT: Duration = Duration::from_secs(10);

/// How long the new owner keeps what it had published when it asked for
/// a tail, for the grant: longer than a claim lasts.
const WATCH_KEPT: Duration = Duration::from_secs(20);

/// Longest the old owner waits, before it answers a tail request, for its
/// publish loop to have published every message the session's shard had
/// routed (a queue of batches behind): beyond, the answer goes, counted.
pub const COVER_WAIT: Duration = Duration::from_millis(500);

/// The header of a tail answer naming the old owner's origin and the last
/// sequence number it had published when it answered: `<node, 16
/// hex>.<seq>` (as `Fanmq-O`).
pub const COVER_HEADER: &str = "Fanmq-Tail-Cover";

/// Lets go of the oldest of a ring's `batches` (their bytes counted in
/// `bytes`) while it holds more than [`RING_BYTES`] or the oldest is older
/// than [`RING_AGE`] at `now`; the newest always stays. `kept`: a batch's
/// time and bytes; `gone`: sees each batch let go.
pub(super) fn prune<T>(
    (batches, bytes): (&mut VecDeque<T>, &mut usize),
    now: Instant,
    kept: impl Fn(&T) -> (Instant, usize),
    mut gone: impl FnMut(&T),
) {
    while batches.len() > 1
        && let Some(oldest) = batches.front()
        && (*bytes > RING_BYTES || now.duration_since(kept(oldest).0) > RING_AGE)
    {
        let Some(oldest) = batches.pop_front() else {
            break;
        };
        *bytes -= kept(&oldest).1;
        gone(&oldest);
    }
}

/// Whether the bridge stamps `message` with an origin sequence number:
/// QoS 1 and 2, `$SYS` left out (it never leaves the node). The publish
/// loop and the ring count the same messages.
pub fn stamped(message: &Message) -> bool {
    message.qos != QoS::AtMostOnce
        && !(message.topic == "$SYS" || message.topic.starts_with("$SYS/"))
}

/// The QoS at which a session of `filters` takes a message published on
/// this node on `topic` (any matching filter: one copy at the highest QoS
/// granted among them, as a local publish routes it), or None.
pub fn takes_local(filters: &[(ByteString, QoS)], topic: &str) -> Option<QoS> {
    filters
        .iter()
        .filter(|(f, _)| topic::filter_matches(f, topic))
        .map(|(_, q)| *q)
        .max()
}

/// `message` as the session of `filters` takes it (QoS 1/2 only, retain
/// cleared as a collector clears it), or None.
fn kept(filters: &[(ByteString, QoS)], message: &Message) -> Option<Message> {
    let qos = message.qos.min(takes_local(filters, &message.topic)?);
    if qos == QoS::AtMostOnce {
        return None;
    }
    let mut kept = message.clone();
    kept.qos = qos;
    kept.retain = false;
    Some(kept)
}

/// One batch the bridge published.
#[derive(Debug)]
struct Sent {
    /// The batch (the shards' own `Arc`).
    messages: Arc<Vec<Message>>,
    /// The shard it came from.
    shard: usize,
    /// The shard sequence number of its first message.
    first: u64,
    /// The node's origin sequence number before its first stamped message.
    before: u64,
    /// When the bridge took it.
    at: Instant,
    /// Its topics' and payloads' bytes.
    bytes: usize,
}

impl Sent {
    /// Each message with its shard sequence number and, if stamped, its
    /// origin sequence number.
    fn numbered(&self) -> impl Iterator<Item = (u64, Option<u64>, &Message)> {
        let mut node = self.before;
        (self.first..)
            .zip(self.messages.iter())
            .map(move |(seq, m)| {
                let stamped = stamped(m).then(|| {
                    node += 1;
                    node
                });
                (seq, stamped, m)
            })
    }
}

/// The bridge's record of this node's own publishes (see the module doc).
#[derive(Debug, Default)]
pub struct Local {
    /// The batches published lately ([`RING_AGE`], [`RING_BYTES`]),
    /// oldest first.
    ring: Routed,
    /// The origin sequence number of the last stamped message taken.
    assigned: u64,
    /// The last origin sequence number the publish loop handed to the NATS
    /// client (in its queue, ahead of anything sent after).
    published: Rc<Cell<u64>>,
    /// The batches the publish loop finished (or the shards gave up on).
    done: Option<Seen>,
    /// Each handed-over session's [`Seen`]: what its state holds.
    seen: HashMap<ByteString, (Seen, Instant)>,
    /// For each claim of a session moving here (client id, token): what
    /// this node had published when it asked for the tail, and when.
    watched: Vec<(ByteString, u64, Seen, Instant)>,
}

impl Local {
    /// What the publish loop updates after each publish.
    pub fn published(&self) -> Rc<Cell<u64>> {
        self.published.clone()
    }

    /// The publish loop took batch `messages` of `shard` (its first shard
    /// sequence number `first`), at `now`: kept in the ring. The origin
    /// sequence number before its first stamped message.
    pub fn took(
        &mut self,
        messages: &Arc<Vec<Message>>,
        (shard, first): (usize, u64),
        now: Instant,
    ) -> u64 {
        let before = self.assigned;
        let mut bytes = 0;
        for m in messages.iter() {
            self.assigned += u64::from(stamped(m));
            bytes += m.topic.len() + m.payload.len();
        }
        self.ring.keep(Sent {
            messages: messages.clone(),
            shard,
            first,
            before,
            at: now,
            bytes,
        });
        before
    }

    /// The `len` messages of `shard` from `first` on are published (or the
    /// shard could not hand them over).
    pub fn done(&mut self, shard: usize, first: u64, len: usize) {
        self.done
            .get_or_insert_with(|| Seen::new(shard + 1))
            .mark(shard, first, len);
    }

    /// Whether every message `seen` routed is published.
    pub fn covers(&self, seen: &Seen) -> bool {
        let empty = Seen::new(0);
        self.done.as_ref().unwrap_or(&empty).covers(seen)
    }

    /// The state of `client_id` handed over holds what was routed up to
    /// `seen`.
    pub fn evicted(&mut self, client_id: ByteString, seen: Seen, now: Instant) {
        self.seen
            .retain(|_, (_, at)| now.duration_since(*at) < SEEN_KEPT);
        self.seen.insert(client_id, (seen, now));
    }

    /// The [`Seen`] of the hand-over of `client_id`, taken.
    pub fn take_seen(&mut self, client_id: &str) -> Option<Seen> {
        self.seen.remove(client_id).map(|(seen, _)| seen)
    }

    /// The old owner's own messages for the tail of a session of `filters`
    /// whose shard had routed `seen`, up to origin sequence number `cover`:
    /// each with its origin sequence number; and whether the ring still
    /// reached back far enough.
    pub fn tail(
        &self,
        filters: &[(ByteString, QoS)],
        seen: &Seen,
        cover: u64,
    ) -> (Vec<(u64, Message)>, bool) {
        let whole = self
            .ring
            .pruned
            .iter()
            .enumerate()
            .all(|(shard, &pruned)| pruned < seen.first_missing(shard));
        let mut out = Vec::new();
        for sent in &self.ring.batches {
            for (seq, node, m) in sent.numbered() {
                let Some(node) = node.filter(|&n| n <= cover) else {
                    continue;
                };
                if seen.routed(sent.shard, seq) {
                    continue;
                }
                if let Some(kept) = kept(filters, m) {
                    out.push((node, kept));
                }
            }
        }
        (out, whole)
    }

    /// A session moving here for claim `token` asks for its tail now:
    /// what this node published so far reached the old owner before the
    /// request (one connection), so it is in the image or the tail; what
    /// it publishes from now on is not. Notes, for the grant
    /// ([`Local::take_watched`]), the positions published so far: every
    /// batch done, and of the one being published, its messages up to the
    /// last one published. Returns the last origin sequence number
    /// published.
    pub fn watch(&mut self, client_id: &ByteString, token: u64, now: Instant) -> u64 {
        let after = self.published.get();
        let mut published = self.done.clone().unwrap_or_else(|| Seen::new(0));
        if let Some(current) = self.ring.batches.back() {
            let upto = current
                .numbered()
                .take_while(|(_, node, _)| node.is_none_or(|n| n <= after))
                .count();
            published.mark(current.shard, current.first, upto);
        }
        self.watched
            .retain(|w| now.duration_since(w.3) < WATCH_KEPT && w.0 != *client_id);
        self.watched
            .push((client_id.clone(), token, published, now));
        after
    }

    /// What [`Local::watch`] noted for claim `token` of `client_id`, taken.
    pub fn take_watched(&mut self, client_id: &str, token: u64) -> Option<Seen> {
        let at = self
            .watched
            .iter()
            .position(|w| w.0 == client_id && w.1 == token)?;
        Some(self.watched.swap_remove(at).2)
    }
}

/// The old owner answers the tail request for `client_id`, whose
/// collector (`filters`, `entries`) it closed: adds this node's own
/// messages the session's shard had not routed ([`Local::tail`]), once the
/// publish loop published everything that shard had routed (at most
/// [`COVER_WAIT`]), and returns the cover to name in [`COVER_HEADER`]:
/// this node's origin and the last sequence number it published (None:
/// the shard's position is not known, the tail is what it was before).
/// Within [`MAX_TAIL`](crate::cluster::tail::MAX_TAIL) with the entries
/// there are.
pub(super) async fn own_tail(
    bridge: &Shared,
    client_id: &str,
    filters: &[(ByteString, QoS)],
    entries: &mut Vec<(Origin, Message)>,
) -> Option<Origin> {
    let status = bridge.borrow().status.clone();
    let short = |why: &str| {
        log::info!(
            "cluster: tail of {client_id:?} may lack messages published on this node: {why}"
        );
        status
            .figures
            .cluster_tails_short
            .fetch_add(1, Ordering::Relaxed);
    };
    let Some(seen) = bridge.borrow_mut().local.take_seen(client_id) else {
        short("the position of its shard is not known");
        return None;
    };
    let by = Instant::now() + COVER_WAIT;
    while !bridge.borrow().local.covers(&seen) {
        if Instant::now() >= by {
            short("what its shard routed is not all published yet");
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let b = bridge.borrow();
    let cover = b.local.published.get();
    let (own, whole) = b.local.tail(filters, &seen, cover);
    if !whole {
        short("the ring of recent publishes no longer reaches back");
    }
    let mut bytes: usize = entries.iter().map(|(_, m)| entry_size(m)).sum();
    for (seq, message) in own {
        bytes += entry_size(&message);
        if bytes > tail::MAX_TAIL {
            short("over the tail's bound");
            break;
        }
        let origin = Origin {
            node: b.origin,
            seq,
        };
        entries.push((origin, message));
    }
    Some(Origin {
        node: b.origin,
        seq: cover,
    })
}

/// Bytes one entry takes in a tail (as `tail::encode_tail` writes it,
/// about: origin, record kind and length, the stored message's fixed
/// fields, and what it takes on the wire).
fn entry_size(message: &Message) -> usize {
    16 + 5 + 16 + message.wire_len()
}

/// What the tail's cover (`headers`, [`COVER_HEADER`]) says, if any.
pub fn cover_of(headers: Option<&async_nats::HeaderMap>) -> Option<Origin> {
    Origin::of_header(headers?.get(COVER_HEADER)?.as_str())
}

/// The new owner, its tail of the old owner's at hand (`tail`, this node's
/// origin `own`; `before`: the last sequence number it had published when
/// it asked, [`Local::watch`]), and what it collected itself (`direct`):
/// drops what it collected of the old owner's origin up to the tail's
/// `cover` (in the image or the tail), and this node's own messages after
/// `before` from the tail (the claim's shard has them: [`Routed`]).
pub fn sort_tail(
    (own, before, cover): (u64, u64, Option<Origin>),
    tail: &mut Vec<(Origin, Message)>,
    direct: &mut Vec<(Origin, Message)>,
) {
    if let Some(cover) = cover {
        direct.retain(|(o, _)| o.node != cover.node || o.seq > cover.seq);
    }
    tail.retain(|(o, _)| o.node != own || o.seq <= before);
}

/// The batches one shard routed lately, its own and the other shards',
/// each with its shard and first shard sequence number, for a session
/// the cluster grants a claim of this shard: what this node published
/// after the tail request and the shard routed before the grant reached no
/// copy of the session, and is taken from here ([`Routed::missed`]); and,
/// with more than one shard, for a session another shard of the node hands
/// this one, what this shard routed that the other had not
/// (`Shard::claim_answered_after`). Bounded as the bridge's ring.
#[derive(Debug, Default)]
pub struct Routed {
    /// The batches, in the order routed (own ones when handed on), as the
    /// bridge's ring holds them (`before` unused).
    batches: VecDeque<Sent>,
    /// Bytes (topics and payloads) of `batches`.
    bytes: usize,
    /// Per shard, the highest shard sequence number that left.
    pruned: Vec<u64>,
}

impl Routed {
    /// This shard routed `batch` of `shard` from shard sequence number
    /// `first` on, at `now`.
    pub fn push(&mut self, now: Instant, (shard, first): (usize, u64), batch: &Arc<Vec<Message>>) {
        let bytes = batch.iter().map(|m| m.topic.len() + m.payload.len()).sum();
        self.keep(Sent {
            messages: batch.clone(),
            shard,
            first,
            before: 0,
            at: now,
            bytes,
        });
    }

    /// Keeps `sent`, and lets go of the oldest batches beyond
    /// [`RING_BYTES`] or [`RING_AGE`] (the newest always stays).
    fn keep(&mut self, sent: Sent) {
        let now = sent.at;
        self.bytes += sent.bytes;
        self.batches.push_back(sent);
        let pruned = &mut self.pruned;
        let ring = (&mut self.batches, &mut self.bytes);
        prune(
            ring,
            now,
            |s| (s.at, s.bytes),
            |oldest| {
                if oldest.shard >= pruned.len() {
                    pruned.resize(oldest.shard + 1, 0);
                }
                let last = oldest.first + oldest.messages.len() as u64 - 1;
                pruned[oldest.shard] = pruned[oldest.shard].max(last);
            },
        );
    }

    /// The QoS 1/2 messages routed here that `published` (what the bridge
    /// had published when the tail was asked for) has not, in the order
    /// routed, then those of `current` (this shard's own, routed and not
    /// handed on yet: shard, first shard sequence number, messages); and
    /// whether the ring still reached back to every one of them.
    pub fn missed<'a>(
        &'a self,
        published: &Seen,
        current: (usize, u64, &'a [Message]),
    ) -> (Vec<&'a Message>, bool) {
        let whole = self
            .pruned
            .iter()
            .enumerate()
            .all(|(shard, &pruned)| pruned < published.first_missing(shard));
        let batches = self
            .batches
            .iter()
            .map(|b| (b.shard, b.first, b.messages.as_slice()))
            .chain(std::iter::once(current));
        let mut out = Vec::new();
        for (shard, first, batch) in batches {
            for (seq, m) in (first..).zip(batch) {
                if m.qos != QoS::AtMostOnce && !published.routed(shard, seq) {
                    out.push(m);
                }
            }
        }
        (out, whole)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn message(topic: &str, qos: QoS, payload: &str) -> Message {
        Message::new(topic.into(), Bytes::from(payload.to_string()), qos, false)
    }

    fn payload(m: &Message) -> String {
        String::from_utf8_lossy(&m.payload).into_owned()
    }

    /// The old owner's tail of its own messages: the QoS 1/2 ones the
    /// session takes, up to the cover, that its shard had not routed, each
    /// with the origin sequence number the publish loop gave it (QoS 0 and
    /// `$SYS` get none).
    #[test]
    fn the_ring_gives_what_the_shard_had_not_routed_up_to_the_cover() {
        let mut local = Local::default();
        let now = Instant::now();
        let one = Arc::new(vec![
            message("a/1", QoS::AtLeastOnce, "a"),
            message("a/1", QoS::AtMostOnce, "zero"),
            message("$SYS/x", QoS::AtLeastOnce, "sys"),
            message("b", QoS::AtLeastOnce, "other topic"),
        ]);
        let before = local.took(&one, (0, 1), now);
        assert_eq!(before, 0);
        let two = Arc::new(vec![
            message("a/2", QoS::ExactlyOnce, "b"),
            message("a/3", QoS::AtLeastOnce, "c"),
        ]);
        let before = local.took(&two, (1, 1), now);
        assert_eq!(before, 2, "a and `other topic` stamped");
        let filters = vec![(ByteString::from("a/#"), QoS::AtLeastOnce)];
        // Shard 1's first message routed, none of shard 0's.
        let mut seen = Seen::new(2);
        seen.mark(1, 1, 1);
        let (got, whole) = local.tail(&filters, &seen, 4);
        assert!(whole);
        let got: Vec<(u64, String, QoS)> =
            got.iter().map(|(n, m)| (*n, payload(m), m.qos)).collect();
        assert_eq!(
            got,
            [
                (1, "a".to_string(), QoS::AtLeastOnce),
                (4, "c".to_string(), QoS::AtLeastOnce)
            ]
        );
        // The cover stops it.
        let (got, _) = local.tail(&filters, &seen, 3);
        assert_eq!(got.len(), 1);
    }

    /// The ring forgets batches older than its age (the newest stays) and
    /// then says it no longer reaches back to what the shard had not
    /// routed.
    #[test]
    fn an_aged_ring_says_it_no_longer_reaches_back() {
        let mut local = Local::default();
        let start = Instant::now();
        let batch = Arc::new(vec![message("t", QoS::AtLeastOnce, "1")]);
        local.took(&batch, (0, 1), start);
        local.took(&batch, (0, 2), start + RING_AGE + Duration::from_millis(1));
        assert_eq!(local.ring.batches.len(), 1);
        let filters = vec![(ByteString::from("t"), QoS::AtLeastOnce)];
        let (got, whole) = local.tail(&filters, &Seen::new(1), 9);
        assert!(!whole, "message 1 of shard 0 is gone");
        assert_eq!(got.len(), 1);
        let mut seen = Seen::new(1);
        seen.mark(0, 1, 1);
        assert!(local.tail(&filters, &seen, 9).1, "routed: not needed");
    }

    /// The done positions cover a shard's once every batch it routed was
    /// published, in whatever order.
    #[test]
    fn the_bridge_covers_a_position_once_it_published_all_it_routed() {
        let mut local = Local::default();
        let mut seen = Seen::new(2);
        seen.mark(0, 1, 2);
        seen.mark(1, 1, 1);
        assert!(!local.covers(&seen));
        local.done(1, 1, 1);
        local.done(0, 2, 1);
        assert!(!local.covers(&seen));
        local.done(0, 1, 1);
        assert!(local.covers(&seen));
    }

    /// A session moving here asks for its tail: the bridge notes what it
    /// had published then (the batches done, and of the one being
    /// published the messages up to the last published); the claim's shard
    /// later takes, of what it routed, the QoS 1/2 messages published
    /// after that, in the order routed, its own not yet handed on last.
    #[test]
    fn a_watch_notes_what_was_published_and_the_shard_takes_the_rest() {
        let mut local = Local::default();
        let now = Instant::now();
        let done = Arc::new(vec![message("w/1", QoS::AtLeastOnce, "done")]);
        local.took(&done, (0, 1), now);
        local.done(0, 1, 1);
        let current = Arc::new(vec![
            message("w/1", QoS::AtLeastOnce, "published"),
            message("w/1", QoS::AtMostOnce, "zero"),
            message("w/1", QoS::AtLeastOnce, "not yet"),
        ]);
        local.took(&current, (1, 1), now);
        local.published().set(2);
        let id = ByteString::from("s");
        assert_eq!(local.watch(&id, 7, now), 2);
        assert!(local.take_watched("s", 8).is_none(), "another claim");
        let published = local.take_watched("s", 7).expect("noted");
        assert!(local.take_watched("s", 7).is_none(), "taken");
        assert!(published.routed(0, 1) && published.routed(1, 1) && published.routed(1, 2));
        assert!(!published.routed(1, 3));
        // The claim's shard (shard 0) routed all of it, then its own.
        let mut routed = Routed::default();
        routed.push(now, (0, 1), &done);
        routed.push(now, (1, 1), &current);
        let own = [message("w/2", QoS::ExactlyOnce, "own")];
        let (missed, whole) = routed.missed(&published, (0, 2, &own));
        assert!(whole);
        let got: Vec<String> = missed.iter().map(|m| payload(m)).collect();
        assert_eq!(got, ["not yet", "own"]);
        // The tail's messages of this node after the watch go (the shard
        // has them), the old owner's up to its cover too (image or tail).
        let o = |node, seq| Origin { node, seq };
        let mut tail = vec![
            (o(1, 2), message("t", QoS::AtLeastOnce, "mine")),
            (o(1, 3), message("t", QoS::AtLeastOnce, "mine, later")),
            (o(5, 9), message("t", QoS::AtLeastOnce, "old owner's")),
        ];
        let mut direct = vec![
            (o(5, 9), message("t", QoS::AtLeastOnce, "again")),
            (o(5, 10), message("t", QoS::AtLeastOnce, "after the cover")),
        ];
        sort_tail((1, 2, Some(o(5, 9))), &mut tail, &mut direct);
        let names = |v: &[(Origin, Message)]| v.iter().map(|(_, m)| payload(m)).collect::<Vec<_>>();
        assert_eq!(names(&tail), ["mine", "old owner's"]);
        assert_eq!(names(&direct), ["after the cover"]);
    }

    /// A shard's ring says when it no longer reaches back to a message
    /// published after the watch.
    #[test]
    fn an_aged_shard_ring_says_so() {
        let mut routed = Routed::default();
        let start = Instant::now();
        let batch = Arc::new(vec![message("t", QoS::AtLeastOnce, "1")]);
        routed.push(start, (1, 1), &batch);
        routed.push(start + RING_AGE + Duration::from_millis(1), (1, 2), &batch);
        let (missed, whole) = routed.missed(&Seen::new(2), (0, 1, &[]));
        assert!(!whole);
        assert_eq!(missed.len(), 1);
    }
}
