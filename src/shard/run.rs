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
//! take runs ([`takes_runs`]): online or offline 3.1.1 sessions without read
//! checks and not tracked by persistence. The others (MQTT 5.0 sessions:
//! Topic Aliases, subscription options, maximum packet size; read checks;
//! persistent sessions) get each message of the run through the usual path,
//! after the run's takers, so every session still sees its messages in
//! the order published.

use crate::protocol::Version;
use crate::protocol::message::{BatchRange, Encoded, Message};
use crate::protocol::v3::QoS;
use crate::session::Session;
use crate::session::link::SessionKey;
use crate::shard::Shard;

/// Whether `message` may be part of a run: QoS 0 and not retained (a
/// retained message updates the retained store and its journal one by one).
pub fn runs(message: &Message) -> bool {
    message.qos == QoS::AtMostOnce && !message.retain
}

/// Whether `session` (key `key`) takes a run as a whole: a 3.1.1 session
/// (nothing per delivery but the queue limits) without read checks and not
/// tracked by persistence (`persist_stamps`).
pub fn takes_runs(
    session: &Session,
    key: SessionKey,
    persist_stamps: &ahash::AHashMap<SessionKey, crate::store::record::Alias>,
) -> bool {
    session.version != Version::V5
        && !session.read_check
        && (persist_stamps.is_empty() || !persist_stamps.contains_key(&key))
}

/// `messages` cut, in order, into maximal runs of consecutive messages to
/// one topic that [`runs`] allows, and single messages between them.
pub fn split_runs(messages: &[Message]) -> impl Iterator<Item = &[Message]> {
    let mut rest = messages;
    std::iter::from_fn(move || {
        let first = rest.first()?;
        let len = if runs(first) {
            rest.iter()
                .take_while(|m| runs(m) && m.topic == first.topic)
                .count()
        } else {
            1
        };
        let (run, after) = rest.split_at(len);
        rest = after;
        Some(run)
    })
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
            run_ranges,
            ..
        } = self;
        let mut ranges = std::mem::take(run_ranges);
        ranges.clear();
        let mut others = false;
        router.for_each_match(&first.topic, |key, _granted| {
            let Some(session) = sessions.get_mut(key as usize) else {
                return;
            };
            if !takes_runs(session, key, persist_stamps) {
                others = true;
                return;
            }
            if ranges.is_empty() {
                // The first taker: encode the run, adjacent in the 3.1.1
                // lane (nothing else is appended meanwhile).
                for message in run {
                    ranges.push(Encoded::new(message, batch).qos0_frame(Version::V3));
                }
            }
            let (queued, dropped) = session.deliver_qos0_run(&ranges, union(&ranges), limits);
            stats.publish_sent_by_qos[0] += queued as u64;
            stats.publish_dropped += dropped as u64;
            if queued > 0 && !session.dirty {
                session.dirty = true;
                dirty.push(key);
            }
        });
        self.run_ranges = ranges;
        if others {
            for message in run {
                self.route_matching(message, origin, true);
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

    #[test]
    fn a_run_reaches_takers_and_the_others_in_order_and_is_counted() {
        let mut shard = testing::shard();
        let mut plain = attach_client(&mut shard, "plain", "t/#", QoS::AtMostOnce, None);
        let mut v5 = attach_client(&mut shard, "v5", "t/1", QoS::AtLeastOnce, None);
        if let Some(session) = shard.sessions.get_mut(v5.key as usize) {
            // An MQTT 5.0 session does not take runs: message by message.
            session.version = Version::V5;
        }
        shard.flush_dirty(); // the SUBACKs
        let run: Vec<Message> = (0..5).map(|i| message("t/1", &i.to_string())).collect();
        shard.route_run(&run, None);
        assert_eq!(shard.stats.publish_sent_by_qos, [10, 0, 0]);
        let entries = shard
            .sessions
            .get(plain.key as usize)
            .map(|s| s.out.entries());
        assert_eq!(entries, Some(1), "the whole run is one queue entry");
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
