//! Runs: consecutive QoS 0 publishes to one topic, routed together.
//!
//! A burst from one publisher is mostly the same topic again and again. Routed
//! one message at a time, every message walks the topic's subscribers, and
//! with 10k subscribers each message touches 10k sessions that no longer sit
//! in the cache: in a profile of a 500-message burst to 10k subscribers,
//! `Session::deliver` and the router's callback took 30% of the broker's
//! CPU, more than the sends. A run is matched once, its frames are encoded
//! once, adjacent, into the step's batch, and each subscriber gets the whole
//! run with one check of its queue limits and one queue entry
//! ([`Session::deliver_qos0_run`]).
//!
//! Only sessions for which a run is the same as its messages one by one
//! take runs ([`takes_runs`]): online or offline sessions, MQTT 3.1.1 or
//! 5.0, whose QoS 0 deliveries need nothing per subscriber
//! ([`Session::plain_delivery`]), without read checks and not tracked by
//! persistence. Each version gets the run framed once per shard
//! ([`RunFrames`]): one encoding for every 3.1.1 taker, one for every 5.0
//! taker. The others (a server Topic Alias, subscription options besides
//! QoS, read checks, persistent sessions) get each message of the run
//! through the usual path, after the run's takers, so every session still
//! sees its messages in the order published.

use crate::observe::counters::Counters;
use crate::protocol::Version;
use crate::protocol::message::{Batch, BatchRange, Encoded, Message};
use crate::protocol::v3::QoS;
use crate::session::link::SessionKey;
use crate::session::{Limits, Session};
use crate::shard::Shard;

/// Whether `message` may be part of a run: QoS 0 and not retained (a
/// retained message updates the retained store and its journal one by one).
pub fn runs(message: &Message) -> bool {
    message.qos == QoS::AtMostOnce && !message.retain
}

/// Whether `session` (key `key`) takes a run as a whole: its deliveries
/// need nothing per subscriber ([`Session::plain_delivery`]), it has no
/// read checks and it is not tracked by persistence (`persist_stamps`).
pub fn takes_runs(
    session: &Session,
    key: SessionKey,
    persist_stamps: &ahash::AHashMap<SessionKey, crate::store::record::Alias>,
) -> bool {
    session.plain_delivery()
        && !session.read_check
        && (persist_stamps.is_empty() || !persist_stamps.contains_key(&key))
}

/// `messages` cut, in order, into maximal runs of consecutive messages to
/// one topic that [`runs`] allows, and single messages between them.
pub fn split_runs(messages: &[Message]) -> impl Iterator<Item = &[Message]> {
    split_by(messages, |m| runs(m).then_some(RunKind::AtMostOnce))
}

/// What a run of messages from another node is made of
/// ([`split_cluster_runs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunKind {
    /// QoS 0 messages that [`runs`] allows: framed once for the sessions
    /// that take runs ([`RunFrames`]).
    AtMostOnce,
    /// QoS 1/2 messages: each subscriber gets its own packet id per
    /// message, so they are offered one by one, but to subscribers matched
    /// once for the whole run.
    Acknowledged,
}

/// `messages` from another node cut, in order, into maximal runs of
/// consecutive messages to one topic of one [`RunKind`], and single
/// messages between them (QoS 0 ones that [`runs`] does not allow). The
/// RETAIN flag does not split a QoS 1/2 run: a message from another node
/// is never stored as retained here.
pub fn split_cluster_runs(messages: &[Message]) -> impl Iterator<Item = &[Message]> {
    split_by(messages, |m| {
        if m.qos != QoS::AtMostOnce {
            Some(RunKind::Acknowledged)
        } else {
            runs(m).then_some(RunKind::AtMostOnce)
        }
    })
}

/// `messages` cut, in order, into maximal runs of consecutive messages to
/// one topic of one kind (`kind`; None: alone).
fn split_by(
    messages: &[Message],
    kind: impl Fn(&Message) -> Option<RunKind>,
) -> impl Iterator<Item = &[Message]> {
    let mut rest = messages;
    std::iter::from_fn(move || {
        let first = rest.first()?;
        let len = match kind(first) {
            Some(k) => rest
                .iter()
                .take_while(|m| m.topic == first.topic && kind(m) == Some(k))
                .count(),
            None => 1,
        };
        let (run, after) = rest.split_at(len);
        rest = after;
        Some(run)
    })
}

/// A run's QoS 0 frames, encoded once per shard and protocol version by
/// the first taker of that version and shared by the others: 3.1.1 at
/// index 0, 5.0 at index 1.
#[derive(Debug, Default)]
pub struct RunFrames([VersionFrames; 2]);

impl RunFrames {
    /// Forgets the previous run's frames (they lie in an earlier step's
    /// batch); the allocations are kept.
    pub(super) fn clear(&mut self) {
        for version in &mut self.0 {
            version.clear();
        }
    }

    /// Offers `run` to `session` (key `key`), which takes runs
    /// ([`takes_runs`]), encoding the run for its version first when no
    /// taker of that version has yet; counts what was queued and dropped,
    /// and marks the session dirty when something was queued.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn deliver(
        &mut self,
        run: &[Message],
        session: &mut Session,
        key: SessionKey,
        batch: &mut Batch,
        limits: &Limits,
        stats: &mut Counters,
        dirty: &mut Vec<SessionKey>,
    ) {
        let version = &mut self.0[usize::from(session.version == Version::V5)];
        version.encode(run, session.version, batch);
        let (queued, dropped) = version.deliver(session, limits);
        stats.publish_sent_by_qos[0] += queued as u64;
        stats.publish_dropped += dropped as u64;
        if queued > 0 && !session.dirty {
            session.dirty = true;
            dirty.push(key);
        }
    }
}

/// A run's QoS 0 frames for one protocol version ([`RunFrames`]).
#[derive(Debug, Default)]
struct VersionFrames {
    /// Where each message's frame lies in the step's batch, in order;
    /// empty until encoded.
    ranges: Vec<BatchRange>,
    /// The union of `ranges` ([`union`]).
    whole: Option<BatchRange>,
    /// The length of the largest frame, for the Maximum Packet Size.
    largest: u32,
}

impl VersionFrames {
    /// Forgets the previous run's frames (they lie in an earlier step's
    /// batch); the allocation is kept.
    fn clear(&mut self) {
        self.ranges.clear();
        self.whole = None;
        self.largest = 0;
    }

    /// Encodes `run` for `version` into `batch`, unless already done.
    fn encode(&mut self, run: &[Message], version: Version, batch: &mut Batch) {
        if !self.ranges.is_empty() {
            return;
        }
        // Adjacent in the version's lane: nothing else is appended
        // meanwhile.
        self.ranges.extend(
            run.iter()
                .map(|message| Encoded::new(message, batch).qos0_frame(version)),
        );
        self.whole = union(&self.ranges);
        self.largest = self.ranges.iter().map(|r| r.len).max().unwrap_or(0);
    }

    /// Offers the run to `session` ([`Session::deliver_qos0_run`]).
    fn deliver(&self, session: &mut Session, limits: &Limits) -> (usize, usize) {
        session.deliver_qos0_run(&self.ranges, self.whole, self.largest, limits)
    }
}

/// The union of `ranges` when they are adjacent in one lane, in order.
pub(super) fn union(ranges: &[BatchRange]) -> Option<BatchRange> {
    let first = *ranges.first()?;
    let mut whole = first;
    for range in &ranges[1..] {
        if range.lane != whole.lane || range.start != whole.start + whole.len {
            return None;
        }
        whole.len += range.len;
    }
    Some(whole)
}

impl Shard {
    /// Routes `messages`, in order: each maximal run of consecutive
    /// messages to one topic that [`runs`] allows goes through
    /// [`Shard::route_run`], the others through [`Shard::route`]. For a batch
    /// from another shard.
    pub fn route_batch(&mut self, messages: &[Message]) {
        for run in split_runs(messages) {
            self.route_run(run, None);
        }
    }

    /// Publishes `run` from session `origin` of this shard (consecutive
    /// PUBLISH packets of one read, each allowed by [`runs`], all to one
    /// topic) as [`Shard::publish_from`] publishes each: routed here, and
    /// queued for the other shards. Empties `run` (its allocation is kept).
    pub fn publish_run(&mut self, run: &mut Vec<Message>, origin: Option<SessionKey>) {
        if run.len() == 1 || !self.shared.is_empty() {
            // Shared subscriptions choose a member per message, after the
            // plain subscribers of that message: one by one.
            for message in run.drain(..) {
                self.publish_from(message, origin);
            }
            return;
        }
        self.route_run(run, origin);
        if self.nr_shards > 1 || self.cluster.is_some() {
            self.remote_batch.append(run);
        } else {
            run.clear();
        }
    }

    /// Delivers `run` (messages allowed by [`runs`], all to one topic) to
    /// this shard's matching subscribers: the router is walked once for
    /// the takers of runs; the other sessions get the messages one by one
    /// afterwards ([`Shard::route_matching`]).
    pub fn route_run(&mut self, run: &[Message], origin: Option<SessionKey>) {
        let [first, ..] = run else {
            return;
        };
        if run.len() == 1 {
            self.route_from(first, origin);
            return;
        }
        debug_assert!(run.iter().all(|m| runs(m) && m.topic == first.topic));
        let Shard {
            router,
            sessions,
            dirty,
            stats,
            limits,
            batch,
            persist_stamps,
            run_frames,
            ..
        } = self;
        let mut frames = std::mem::take(run_frames);
        frames.clear();
        let mut others = false;
        router.for_each_match(&first.topic, |key, _granted| {
            let Some(session) = sessions.get_mut(key as usize) else {
                return;
            };
            if !takes_runs(session, key, persist_stamps) {
                others = true;
                return;
            }
            frames.deliver(run, session, key, batch, limits, stats, dirty);
        });
        self.run_frames = frames;
        if others {
            for message in run {
                self.route_matching(message, origin, true);
            }
        } else {
            // `route_matching` keeps each for the sessions attaching here;
            // without it, this does.
            for message in run {
                self.queue_for_attaching(None, message, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use bytestring::ByteString;

    use super::*;
    use crate::config::Config;
    use crate::shard::testing::{self, attach_client, payloads};

    /// A QoS 0 message on `topic`.
    fn message(topic: &str, payload: &str) -> Message {
        Message::new(
            ByteString::from(topic),
            Bytes::from(payload.to_owned()),
            QoS::AtMostOnce,
            false,
        )
    }

    /// Makes the session `key` of `shard` an MQTT 5.0 one.
    fn make_v5(shard: &mut Shard, key: SessionKey) -> &mut Session {
        let session = shard.sessions.get_mut(key as usize).expect("session");
        session.version = Version::V5;
        session
    }

    /// How many entries the out queue of session `key` has.
    fn entries(shard: &Shard, key: SessionKey) -> Option<usize> {
        shard.sessions.get(key as usize).map(|s| s.out.entries())
    }

    #[test]
    fn a_run_reaches_takers_of_both_versions_and_the_others_in_order_and_is_counted() {
        let mut shard = testing::shard();
        let mut plain = attach_client(&mut shard, "plain", "t/#", QoS::AtMostOnce, None);
        let mut v5 = attach_client(&mut shard, "v5", "t/1", QoS::AtLeastOnce, None);
        make_v5(&mut shard, v5.key);
        let mut with_id = attach_client(&mut shard, "id", "t/+", QoS::AtMostOnce, None);
        let options = crate::protocol::v5::SubscriptionOptions {
            qos: QoS::AtMostOnce,
            no_local: false,
            retain_as_published: false,
            retain_handling: crate::protocol::v5::RetainHandling::SendAtSubscribe,
        };
        // A Subscription Identifier: every frame its own, message by message.
        make_v5(&mut shard, with_id.key).set_subscription_options(
            crate::router::SharedFilter::from("t/+"),
            &options,
            std::num::NonZeroU32::new(7),
        );
        shard.flush_dirty(); // the SUBACKs
        let run: Vec<Message> = (0..5).map(|i| message("t/1", &i.to_string())).collect();
        shard.route_run(&run, None);
        assert_eq!(shard.stats.publish_sent_by_qos, [15, 0, 0]);
        assert_eq!(entries(&shard, plain.key), Some(1), "the run is one entry");
        assert_eq!(entries(&shard, v5.key), Some(1), "for 5.0 too");
        assert_eq!(entries(&shard, with_id.key), Some(5), "one by one");
        shard.flush_dirty();
        let want: Vec<String> = (0..5).map(|i| i.to_string()).collect();
        assert_eq!(payloads(&plain.publishes()), want);
        let got = v5.publishes();
        // Read as 3.1.1: the 5.0 frame's empty properties (one 0 byte)
        // come first in the payload.
        let want_v5: Vec<String> = want.iter().map(|p| format!("\0{p}")).collect();
        assert_eq!(payloads(&got), want_v5, "the 5.0 session too, in order");
        assert!(
            got.iter()
                .all(|(t, _, q)| t == "t/1" && *q == QoS::AtMostOnce)
        );
        // Properties of 2 bytes: Subscription Identifier (0x0B) 7.
        let want_id: Vec<String> = want.iter().map(|p| format!("\x02\x0b\x07{p}")).collect();
        assert_eq!(payloads(&with_id.publishes()), want_id);
    }

    #[test]
    fn sessions_with_anything_per_delivery_do_not_take_runs() {
        let mut shard = testing::shard();
        let plain = testing::attach(&mut shard, "plain", "t", QoS::AtMostOnce);
        let v5 = testing::attach(&mut shard, "v5", "t", QoS::AtMostOnce);
        make_v5(&mut shard, v5).max_packet_size = 16;
        let aliased = testing::attach(&mut shard, "aliased", "t", QoS::AtMostOnce);
        make_v5(&mut shard, aliased).server_aliases =
            crate::session::alias::ServerAliases::new(4, 16);
        let checked = testing::attach(&mut shard, "checked", "t", QoS::AtMostOnce);
        if let Some(session) = shard.sessions.get_mut(checked as usize) {
            session.check_reads(None);
        }
        let takes = |key| {
            shard
                .sessions
                .get(key as usize)
                .is_some_and(|s| takes_runs(s, key, &shard.persist_stamps))
        };
        assert!(takes(plain) && takes(v5));
        assert!(!takes(aliased), "server Topic Aliases");
        assert!(!takes(checked), "read checks");
    }

    #[test]
    fn a_run_longer_than_the_queue_limit_queues_what_fits_and_counts_the_rest() {
        let config = Config {
            max_queued_messages: 3,
            ..Config::default()
        };
        let mut shard = testing::shard_with(0, 1, config);
        let mut client = attach_client(&mut shard, "c", "t", QoS::AtMostOnce, None);
        shard.flush_dirty();
        let run: Vec<Message> = (0..5).map(|i| message("t", &i.to_string())).collect();
        shard.route_run(&run, None);
        assert_eq!(shard.stats.publish_sent_by_qos[0], 3);
        assert_eq!(shard.stats.publish_dropped, 2);
        shard.flush_dirty();
        assert_eq!(payloads(&client.publishes()), ["0", "1", "2"]);
    }

    #[test]
    fn a_batch_routes_runs_and_single_messages_in_the_order_given() {
        let mut shard = testing::shard_with(1, 2, Config::default());
        let mut client = attach_client(&mut shard, "c", "#", QoS::AtLeastOnce, None);
        shard.flush_dirty();
        let mut retained = message("u", "r");
        retained.retain = true;
        let mut qos1 = message("t", "q");
        qos1.qos = QoS::AtLeastOnce;
        let batch = vec![
            message("t", "a"),
            message("t", "b"),
            retained,
            message("t", "c"),
            qos1,
            message("u", "d"),
            message("u", "e"),
        ];
        shard.route_batch(&batch);
        assert_eq!(shard.retained.len(), 1, "the retained one applied");
        shard.flush_dirty();
        let got = client.publishes();
        assert_eq!(payloads(&got), ["a", "b", "r", "c", "q", "d", "e"]);
        assert_eq!(got[4].2, QoS::AtLeastOnce);
        assert!(shard.take_remote_batch().is_none(), "never passed on again");
    }

    #[test]
    fn a_published_run_goes_to_the_other_shards_whole_and_leaves_the_buffer_empty() {
        let mut shard = testing::shard_with(0, 2, Config::default());
        let mut client = attach_client(&mut shard, "c", "t", QoS::AtMostOnce, None);
        shard.flush_dirty();
        let mut run: Vec<Message> = (0..4).map(|i| message("t", &i.to_string())).collect();
        shard.publish_run(&mut run, None);
        assert!(run.is_empty());
        let remote = shard.take_remote_batch().map(|b| b.len());
        assert_eq!(remote, Some(4));
        shard.flush_dirty();
        assert_eq!(payloads(&client.publishes()), ["0", "1", "2", "3"]);
    }

    #[test]
    fn messages_from_another_node_split_into_runs_of_one_topic_and_one_kind() {
        let at = |topic: &str, qos, retain| {
            let mut m = message(topic, "");
            m.qos = qos;
            m.retain = retain;
            m
        };
        let (zero, one, two) = (QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce);
        let messages = [
            at("t", zero, false),
            at("t", zero, false),
            at("t", one, false),
            at("t", two, false),
            at("t", one, true),
            at("u", one, false),
            at("u", zero, true),
            at("u", zero, false),
            at("u", one, false),
        ];
        let lens: Vec<usize> = split_cluster_runs(&messages)
            .map(<[Message]>::len)
            .collect();
        // QoS 0, QoS 1/2 whatever the RETAIN flag, another topic, a
        // retained QoS 0 alone, then a QoS 0 and a QoS 1 one each.
        assert_eq!(lens, [2, 3, 1, 1, 1, 1]);
        let local: Vec<usize> = split_runs(&messages).map(<[Message]>::len).collect();
        assert_eq!(
            local,
            [2, 1, 1, 1, 1, 1, 1, 1],
            "a local burst: QoS 0 runs only"
        );
    }

    fn range(start: u32, len: u32) -> BatchRange {
        BatchRange {
            lane: 0,
            start,
            len,
        }
    }

    #[test]
    fn the_union_of_adjacent_ranges_is_one_range_and_a_gap_has_none() {
        assert_eq!(union(&[range(0, 5), range(5, 3)]), Some(range(0, 8)));
        assert_eq!(union(&[range(0, 5), range(6, 3)]), None);
        assert_eq!(union(&[]), None);
        let other_lane = BatchRange {
            lane: 1,
            start: 5,
            len: 3,
        };
        assert_eq!(union(&[range(0, 5), other_lane]), None);
    }
}
