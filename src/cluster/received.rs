//! The batches NATS brought lately, numbered, for a persistent session
//! moving inside one node while other nodes publish on its topics
//! (docs/design/cluster.md §9, "Moves inside one node").
//!
//! The bridge numbers every batch a NATS subscription brings (one number
//! per batch, the same for every shard that gets it: each shard's queue
//! sees them rising), and each shard remembers the number of the last
//! batch it took (`ToShard::Deliver::seq`). A session the old shard lets
//! go holds what NATS brought up to that number; the old shard tells it to
//! the bridge with the lend (`Control::Lend::after`). Once the lend holds
//! a filter for the claim's shard, the bridge sends that shard, in its
//! queue and before any later batch of the filter, the filter's batches
//! numbered after it ([`Received::since`]): those the old shard got after
//! the session had gone, and those the claim's shard got before the lend
//! (the escaped subject's once, with the first lent filter that holds it).
//! So the claim takes every batch of its filters once, in order: from the
//! lend on, as they come.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytestring::ByteString;

use crate::cluster::positions;
use crate::protocol::message::Message;
use crate::protocol::v3::QoS;

/// One batch of a plain filter's NATS subscription, or of the escaped
/// subject.
#[derive(Debug)]
struct Got {
    /// Its number.
    seq: u64,
    /// The subscription's filter (None: the escaped subject).
    filter: Option<ByteString>,
    /// The batch (the shards' own `Arc`).
    messages: Arc<Vec<Message>>,
    /// When it came.
    at: Instant,
    /// Its topics' and payloads' bytes.
    bytes: usize,
}

/// The bridge's numbering of NATS batches and its ring of the recent ones
/// that a moving session may need: those with a QoS 1/2 message (a claim
/// keeps no QoS 0 message), of plain filters and of the escaped subject,
/// bounded as the ring of this node's own publishes ([`positions::prune`]:
/// 3 s, 32 MiB; the newest always stays).
#[derive(Debug, Default)]
pub struct Received {
    /// The last number given (0: none yet; batches count from 1).
    last: u64,
    /// The batches kept, oldest first.
    batches: VecDeque<Got>,
    /// Bytes (topics and payloads) of `batches`.
    bytes: usize,
    /// The highest number let go of a batch that was kept.
    pruned: u64,
}

impl Received {
    /// A NATS subscription of `filter` (None: the escaped subject) brought
    /// `messages` at `now`: the batch's number.
    pub fn number(
        &mut self,
        filter: Option<&ByteString>,
        messages: &Arc<Vec<Message>>,
        now: Instant,
    ) -> u64 {
        self.last += 1;
        let seq = self.last;
        if messages.iter().all(|m| m.qos == QoS::AtMostOnce) {
            return seq;
        }
        let bytes = messages
            .iter()
            .map(|m| m.topic.len() + m.payload.len())
            .sum();
        self.bytes += bytes;
        self.batches.push_back(Got {
            seq,
            filter: filter.cloned(),
            messages: messages.clone(),
            at: now,
            bytes,
        });
        let pruned = &mut self.pruned;
        let ring = (&mut self.batches, &mut self.bytes);
        positions::prune(ring, now, |g| (g.at, g.bytes), |g| *pruned = g.seq);
        seq
    }

    /// The batches of `filter` (None: the escaped subject) numbered after
    /// `after`, oldest first, and whether the ring still reached back to
    /// all of them.
    pub fn since(&self, filter: Option<&str>, after: u64) -> (Vec<Arc<Vec<Message>>>, bool) {
        let batches = self
            .batches
            .iter()
            .filter(|g| g.seq > after && g.filter.as_deref() == filter)
            .map(|g| g.messages.clone())
            .collect();
        (batches, self.pruned <= after)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::cluster::positions::RING_AGE;

    /// One message on `topic` at `qos`, its payload `payload`.
    fn batch(topic: &str, payload: &'static str, qos: QoS) -> Arc<Vec<Message>> {
        Arc::new(vec![Message::new(
            ByteString::from(topic),
            Bytes::from_static(payload.as_bytes()),
            qos,
            false,
        )])
    }

    /// The payloads of `batches`, in order.
    fn payloads(batches: &[Arc<Vec<Message>>]) -> Vec<String> {
        batches
            .iter()
            .flat_map(|b| b.iter())
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect()
    }

    /// Every batch gets the next number, whatever its filter; a lend gets
    /// the batches of its filter after the state's last, in order.
    #[test]
    fn a_lend_gets_its_filters_batches_after_the_states_last() {
        let mut received = Received::default();
        let now = Instant::now();
        let (a, b) = (ByteString::from("a/#"), ByteString::from("b/#"));
        assert_eq!(
            received.number(Some(&a), &batch("a/1", "1", QoS::AtLeastOnce), now),
            1
        );
        assert_eq!(
            received.number(Some(&b), &batch("b/1", "x", QoS::AtLeastOnce), now),
            2
        );
        assert_eq!(
            received.number(None, &batch("a.1", "e", QoS::AtLeastOnce), now),
            3
        );
        assert_eq!(
            received.number(Some(&a), &batch("a/1", "2", QoS::AtLeastOnce), now),
            4
        );
        assert_eq!(
            received.number(Some(&a), &batch("a/1", "3", QoS::ExactlyOnce), now),
            5
        );
        let (since, whole) = received.since(Some("a/#"), 1);
        assert_eq!(payloads(&since), ["2", "3"]);
        assert!(whole);
        let (since, _) = received.since(Some("a/#"), 0);
        assert_eq!(payloads(&since), ["1", "2", "3"]);
        assert!(
            received.since(Some("a/#"), 5).0.is_empty(),
            "nothing after the last"
        );
        assert!(
            received.since(Some("c/#"), 0).0.is_empty(),
            "another filter's"
        );
        let (escaped, _) = received.since(None, 0);
        assert_eq!(payloads(&escaped), ["e"], "the escaped subject's");
    }

    /// Batches of QoS 0 messages alone are numbered but not kept: a claim
    /// keeps none of them.
    #[test]
    fn a_qos0_batch_is_numbered_but_not_kept() {
        let mut received = Received::default();
        let now = Instant::now();
        let a = ByteString::from("a/#");
        received.number(Some(&a), &batch("a/1", "0", QoS::AtMostOnce), now);
        assert_eq!(
            received.number(Some(&a), &batch("a/1", "1", QoS::AtLeastOnce), now),
            2
        );
        let (since, whole) = received.since(Some("a/#"), 0);
        assert_eq!(payloads(&since), ["1"]);
        assert!(whole);
    }

    /// Past [`RING_AGE`] a batch is let go (the newest stays): a lend from
    /// before it is told that some may be missing.
    #[test]
    fn a_batch_older_than_the_ring_is_let_go_and_a_lend_from_before_is_not_whole() {
        let mut received = Received::default();
        let start = Instant::now();
        let a = ByteString::from("a/#");
        received.number(Some(&a), &batch("a/1", "1", QoS::AtLeastOnce), start);
        received.number(Some(&a), &batch("a/1", "2", QoS::AtLeastOnce), start);
        let later = start + RING_AGE + Duration::from_millis(1);
        received.number(Some(&a), &batch("a/1", "3", QoS::AtLeastOnce), later);
        let (since, whole) = received.since(Some("a/#"), 0);
        assert_eq!(payloads(&since), ["3"]);
        assert!(!whole, "1 and 2 are gone");
        let (since, whole) = received.since(Some("a/#"), 2);
        assert_eq!(payloads(&since), ["3"]);
        assert!(whole, "nothing after 2 is gone");
    }
}
