//! The retained message store (§3.3.1.3), one replica per shard.
//!
//! Every PUBLISH reaches every shard (locally or over the mesh), so each shard
//! applies retained updates to its own copy and answers SUBSCRIBE from it
//! without asking anyone. A retained QoS 1/2 publish is acknowledged only
//! once every replica holds it (`shard::held_acks`).
//!
//! # One order for every replica
//!
//! Replicas receive updates in different orders: each applies its own
//! publishers' at once and the others' later, so two publishers on different
//! shards racing on one topic used to leave the replicas disagreeing. Every
//! retained update now carries a stamp ([`RetainStore::stamp`]: a Lamport
//! clock and the shard's id, unique and totally ordered) and a replica keeps,
//! per topic, the update with the highest stamp, whatever order they came
//! in; so all replicas end with the same message. A delete (empty payload)
//! is kept as a stamped tombstone for [`TOMBSTONE_TTL`], so that an older
//! update still on its way does not bring the topic back on some replicas.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use bytestring::ByteString;

use crate::protocol::message::Message;
use crate::protocol::topic;

/// How long a deleted topic's tombstone is kept: far longer than an update
/// spends on the mesh (a batch waits at most for a full channel, and a
/// retained QoS 1/2 publisher for [`APPLY_TIMEOUT`]), so an older update
/// cannot arrive after it is gone.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(60);

/// Bits of a stamp that hold the shard id (up to 65,536 shards); the Lamport
/// clock has the 48 above (2.8e14 retained updates).
const STAMP_SHARD_BITS: u32 = 16;

/// Retained messages by topic.
#[derive(Debug, Default)]
pub struct RetainStore {
    /// The retained message of each topic with the highest stamp, or a
    /// tombstone (empty payload) for a recent delete.
    messages: AHashMap<ByteString, Message>,
    /// Tombstones made, oldest first: when, topic, stamp (a later update
    /// may have replaced one in `messages` already).
    tombstones: VecDeque<(Instant, ByteString, u64)>,
    /// Tombstones in `messages` now (not retained messages: `len` leaves
    /// them out).
    tombstones_held: usize,
    /// The Lamport clock: the highest clock seen in any stamp.
    clock: u64,
}

impl RetainStore {
    /// A stamp for a retained update received on shard `shard`: later than
    /// every update this replica has seen, unique across shards.
    pub fn stamp(&mut self, shard: usize) -> u64 {
        self.clock += 1;
        (self.clock << STAMP_SHARD_BITS) | (shard as u64 & ((1 << STAMP_SHARD_BITS) - 1))
    }

    /// Stores, replaces or (empty payload, §3.3.1.3) deletes a retained
    /// message, unless this replica already holds a later update of the topic.
    pub fn apply(&mut self, message: &Message) {
        self.apply_at(message, Instant::now());
    }

    /// Loads `messages` (live retained messages, at most one per topic, as
    /// a start-up load gives them) into the store with room reserved for
    /// all of them at once (the iterator's upper bound): as [`RetainStore::apply`] of each, without its
    /// second look-up and its clones. A message with an empty payload (a
    /// delete) goes through `apply`.
    pub fn restore(&mut self, messages: impl IntoIterator<Item = Message>) {
        let messages = messages.into_iter();
        let (least, most) = messages.size_hint();
        self.messages.reserve(most.unwrap_or(least));
        for message in messages {
            if message.payload.is_empty() {
                self.apply(&message);
                continue;
            }
            self.clock = self.clock.max(message.retain_stamp >> STAMP_SHARD_BITS);
            match self.messages.entry(message.topic.clone()) {
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(message);
                }
                std::collections::hash_map::Entry::Occupied(mut held) => {
                    if held.get().retain_stamp <= message.retain_stamp {
                        if held.get().payload.is_empty() {
                            self.tombstones_held -= 1;
                        }
                        held.insert(message);
                    }
                }
            }
        }
    }

    /// [`RetainStore::apply`] at time `now` (drops expired tombstones first).
    fn apply_at(&mut self, message: &Message, now: Instant) {
        while let Some((made, _, _)) = self.tombstones.front()
            && now.saturating_duration_since(*made) >= TOMBSTONE_TTL
        {
            if let Some((_, topic, stamp)) = self.tombstones.pop_front()
                && self
                    .messages
                    .get(&topic)
                    .is_some_and(|m| m.retain_stamp == stamp && m.payload.is_empty())
            {
                self.messages.remove(&topic);
                self.tombstones_held -= 1;
            }
        }
        self.clock = self.clock.max(message.retain_stamp >> STAMP_SHARD_BITS);
        if self
            .messages
            .get(&message.topic)
            .is_some_and(|held| held.retain_stamp > message.retain_stamp)
        {
            return;
        }
        let tombstone = message.payload.is_empty();
        let replaced = if tombstone && message.retain_stamp == 0 {
            // Unstamped (never from a client's publish): a plain delete.
            self.messages.remove(&message.topic)
        } else {
            if tombstone {
                self.tombstones
                    .push_back((now, message.topic.clone(), message.retain_stamp));
                self.tombstones_held += 1;
            }
            self.messages.insert(message.topic.clone(), message.clone())
        };
        if replaced.is_some_and(|m| m.payload.is_empty()) {
            self.tombstones_held -= 1;
        }
    }

    /// Calls `f` for every retained message matching `filter`.
    pub fn for_each_match(&self, filter: &str, mut f: impl FnMut(&Message)) {
        if !filter.contains(['+', '#']) {
            if let Some(m) = self.messages.get(filter)
                && !m.payload.is_empty()
            {
                f(m);
            }
            return;
        }
        for m in self.messages.values() {
            if !m.payload.is_empty() && topic::filter_matches(filter, &m.topic) {
                f(m);
            }
        }
    }

    /// Every message the store holds, tombstones (empty payloads) included,
    /// in no order (a snapshot of the replica).
    pub fn messages(&self) -> impl Iterator<Item = &Message> {
        self.messages.values()
    }

    /// Number of retained messages (tombstones not counted).
    pub fn len(&self) -> usize {
        self.messages.len() - self.tombstones_held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::v3::QoS;
    use bytes::Bytes;

    fn m(topic: &'static str, payload: &'static [u8]) -> Message {
        Message {
            topic: ByteString::from_static(topic),
            payload: Bytes::from_static(payload),
            qos: QoS::AtLeastOnce,
            retain: true,
            retain_stamp: 0,
            properties: None,
        }
    }

    fn matches(store: &RetainStore, filter: &str) -> Vec<Bytes> {
        let mut got = Vec::new();
        store.for_each_match(filter, |m| got.push(m.payload.clone()));
        got.sort();
        got
    }

    #[test]
    fn store_replace_delete() {
        let mut s = RetainStore::default();
        s.apply(&m("a/b", b"1"));
        s.apply(&m("a/c", b"2"));
        s.apply(&m("a/b", b"3"));
        assert_eq!(matches(&s, "a/b"), vec![Bytes::from_static(b"3")]);
        assert_eq!(matches(&s, "a/+").len(), 2);
        s.apply(&m("a/b", b""));
        assert_eq!(matches(&s, "a/#"), vec![Bytes::from_static(b"2")]);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn wildcards_do_not_match_dollar_topics() {
        let mut s = RetainStore::default();
        s.apply(&m("$SYS/x", b"1"));
        assert!(matches(&s, "#").is_empty());
        assert_eq!(matches(&s, "$SYS/#").len(), 1);
    }
}

/// Replicas that get the same stamped updates in different orders end equal.
#[cfg(test)]
mod order_tests {
    use super::*;
    use crate::protocol::v3::QoS;
    use crate::test_rng::XorShift;
    use bytes::Bytes;

    /// A retained update of `topic` with `payload`, stamped on `shard`.
    fn update(
        store: &mut RetainStore,
        shard: usize,
        topic: &'static str,
        payload: &'static [u8],
    ) -> Message {
        Message {
            topic: ByteString::from_static(topic),
            payload: Bytes::from_static(payload),
            qos: QoS::AtMostOnce,
            retain: true,
            retain_stamp: store.stamp(shard),
            properties: None,
        }
    }

    /// What a replica holds, sorted.
    fn held(store: &RetainStore) -> Vec<(String, Bytes)> {
        let mut got = Vec::new();
        store.for_each_match("#", |m| got.push((m.topic.to_string(), m.payload.clone())));
        got.sort();
        got
    }

    #[test]
    fn replicas_agree_whatever_order_updates_arrive_in() {
        let mut rng = XorShift(0x5eed);
        for _ in 0..200 {
            // Two shards each stamp a few updates of two topics (deletes too).
            let mut origin = [RetainStore::default(), RetainStore::default()];
            let mut updates = Vec::new();
            for _ in 0..6 {
                let shard = (rng.next() % 2) as usize;
                let topic = ["t/a", "t/b"][(rng.next() % 2) as usize];
                let payload: &'static [u8] = [&b"1"[..], b"2", b""][(rng.next() % 3) as usize];
                let m = update(&mut origin[shard], shard, topic, payload);
                origin[shard].apply(&m);
                updates.push(m);
            }
            // Two replicas apply them all, each in its own random order.
            let replicas: Vec<Vec<(String, Bytes)>> = (0..2)
                .map(|_| {
                    let mut order = updates.clone();
                    for i in (1..order.len()).rev() {
                        order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
                    }
                    let mut replica = RetainStore::default();
                    for m in &order {
                        replica.apply(m);
                    }
                    assert_eq!(replica.len(), held(&replica).len());
                    held(&replica)
                })
                .collect();
            assert_eq!(replicas[0], replicas[1], "{updates:?}");
        }
    }

    #[test]
    fn a_restore_holds_what_applying_each_message_holds() {
        let mut rng = XorShift(0x4e57);
        for _ in 0..200 {
            let mut origin = [RetainStore::default(), RetainStore::default()];
            let mut updates = Vec::new();
            for _ in 0..8 {
                let shard = (rng.next() % 2) as usize;
                let topic = ["t/a", "t/b", "t/c"][(rng.next() % 3) as usize];
                let payload: &'static [u8] = [&b"1"[..], b"2", b""][(rng.next() % 3) as usize];
                let m = update(&mut origin[shard], shard, topic, payload);
                origin[shard].apply(&m);
                updates.push(m);
            }
            for i in (1..updates.len()).rev() {
                updates.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            let mut applied = RetainStore::default();
            for m in &updates {
                applied.apply(m);
            }
            let mut restored = RetainStore::default();
            restored.restore(updates.clone());
            assert_eq!(held(&restored), held(&applied), "{updates:?}");
            assert_eq!(restored.len(), applied.len());
            assert_eq!(restored.stamp(0), applied.stamp(0), "the same clock");
        }
    }

    #[test]
    fn a_tombstone_outlives_late_updates_then_goes() {
        let mut store = RetainStore::default();
        let t0 = Instant::now();
        let old = update(&mut store, 1, "t", b"old");
        let delete = update(&mut store, 0, "t", b"");
        store.apply_at(&delete, t0);
        store.apply_at(&old, t0);
        assert!(held(&store).is_empty(), "an older update came back");
        assert_eq!(store.len(), 0);
        // Past its TTL, the next update drops the tombstone.
        let other = update(&mut store, 0, "u", b"x");
        store.apply_at(&other, t0 + TOMBSTONE_TTL);
        assert_eq!(store.messages.len(), 1);
        assert_eq!(store.len(), 1);
    }
}
