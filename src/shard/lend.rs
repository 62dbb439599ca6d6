//! What a claim of a persistent session moving inside a cluster node
//! (between two shards, or reconnecting on one) keeps of the bridge's
//! lend of its filters (docs/design/cluster.md §9, "Moves inside one
//! node"; cluster::received).
//!
//! The old shard lets the session go with the number of the last NATS
//! batch its state holds; the bridge then holds each of the session's
//! plain filters for the claim's shard and, as it does, sends that shard
//! the filter's batches since that number (`ToShard::Lent`), before any
//! later one. The claim takes them, and each later batch of a lent
//! filter, once and in order:
//!
//! - **before its state comes** (over the mesh, from the old shard) it
//!   keeps the lent batches here, then the state takes them after its
//!   catch-up;
//! - **with its state** (attaching) it takes the lent batches at once, and
//!   a filter's batches as they come only once its lend began: those that
//!   came before are among the lent ones;
//! - its connection attaches only once every filter's lend began (at most
//!   `LEND_WAIT`), so the session never misses the batches that only the
//!   lend brings.

use std::sync::Arc;

use bytestring::ByteString;

use crate::cluster::positions::RING_BYTES;
use crate::cluster::subject;
use crate::protocol::message::Message;
use crate::router::shared;
use crate::session::SessionState;

/// A claim's part of the lend of its session's filters.
#[derive(Debug, Default)]
pub struct ClaimLend {
    /// Once the state came: the number of the last NATS batch it holds
    /// (`ToShard::Deliver::seq`). Then the claim expects a lend for each
    /// of its plain filters.
    pub after: Option<u64>,
    /// The filters whose lend began (`ToShard::Lent` came; None: the
    /// escaped subject, which a wildcard filter, or one that cannot be a
    /// subject, also holds).
    started: Vec<Option<ByteString>>,
    /// Before the state came: the lent filters' batches, in the order they
    /// came, with their filter.
    kept: Vec<(Option<ByteString>, Arc<Vec<Message>>)>,
    /// Bytes (topics and payloads) of `kept`, at most [`RING_BYTES`] (as
    /// the bridge's ring of them).
    bytes: usize,
}

impl ClaimLend {
    /// The lend of `filter` began.
    pub fn start(&mut self, filter: Option<ByteString>) {
        if !self.started.contains(&filter) {
            self.started.push(filter);
        }
    }

    /// Whether the lend of `filter` began.
    pub fn started(&self, filter: Option<&str>) -> bool {
        self.started.iter().any(|f| f.as_deref() == filter)
    }

    /// Whether a message NATS brought through `filter` (None: the escaped
    /// subject) is the attaching claim's to take as it comes: not while the
    /// claim waits for that filter's lend, which brings it. (No escaped
    /// topic matches a session none of whose filters holds that subject:
    /// its lend never comes, and nothing is left out.)
    pub fn takes(&self, filter: Option<&str>) -> bool {
        self.after.is_none() || self.started(filter)
    }

    /// Keeps `batch` of `filter` until the state comes: false when over
    /// the bound (not kept).
    pub fn keep(&mut self, filter: Option<&ByteString>, batch: &Arc<Vec<Message>>) -> bool {
        let bytes: usize = batch.iter().map(|m| m.topic.len() + m.payload.len()).sum();
        if self.bytes + bytes > RING_BYTES {
            return false;
        }
        self.bytes += bytes;
        self.kept.push((filter.cloned(), batch.clone()));
        true
    }

    /// What was kept before the state came, taken.
    pub fn take_kept(&mut self) -> Vec<(Option<ByteString>, Arc<Vec<Message>>)> {
        self.bytes = 0;
        std::mem::take(&mut self.kept)
    }

    /// Whether the claim, with `state`, still waits for the lend of one of
    /// its plain filters, or of the escaped subject that one of them holds.
    pub fn waits(&self, state: &SessionState) -> bool {
        let mut plain = state
            .subscriptions
            .iter()
            .map(|(f, _)| &**f)
            .filter(|f| !shared::is_shared(f));
        self.after.is_some()
            && plain.any(|f| !self.started(Some(f)) || (holds_escaped(f) && !self.started(None)))
    }
}

/// Whether the NATS interest in `filter` also holds the escaped subject
/// (cluster::subject).
fn holds_escaped(filter: &str) -> bool {
    subject::filter_subjects("", filter).1
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::protocol::v3::QoS;

    /// A batch of one QoS 1 message on `topic`.
    fn batch(topic: &str) -> Arc<Vec<Message>> {
        Arc::new(vec![Message::new(
            ByteString::from(topic),
            Bytes::from_static(b"x"),
            QoS::AtLeastOnce,
            false,
        )])
    }

    /// A claim with its state waits for the lend of each plain filter
    /// (shared ones stay with their group) and takes a filter's messages
    /// as they come only once its lend began; without a state, or without
    /// a lend, it waits for nothing.
    #[test]
    fn a_claim_with_its_state_waits_for_each_plain_filters_lend() {
        let mut state = SessionState::default();
        for f in ["a/+/c", "b", "$share/g/c"] {
            state.subscriptions.push((f.into(), QoS::AtLeastOnce));
        }
        let mut lend = ClaimLend::default();
        assert!(!lend.waits(&state), "no state yet");
        assert!(lend.takes(Some("a/+/c")), "no lend expected");
        lend.after = Some(7);
        assert!(lend.waits(&state));
        assert!(!lend.takes(Some("a/+/c")), "the lend brings it");
        lend.start(Some("a/+/c".into()));
        assert!(lend.takes(Some("a/+/c")));
        assert!(!lend.takes(Some("b")));
        lend.start(Some("b".into()));
        assert!(lend.waits(&state), "the escaped subject's is still to come");
        assert!(!lend.takes(None));
        lend.start(None);
        assert!(lend.takes(None));
        assert!(!lend.waits(&state), "the shared one is not lent");
    }

    /// What is kept before the state comes is taken once, in order, and
    /// bounded.
    #[test]
    fn kept_batches_are_taken_once_in_order_and_bounded() {
        let mut lend = ClaimLend::default();
        let filter = ByteString::from("a/#");
        let filter = Some(&filter);
        assert!(lend.keep(filter, &batch("a/1")));
        assert!(lend.keep(filter, &batch("a/2")));
        let topics: Vec<String> = lend
            .take_kept()
            .iter()
            .map(|(_, b)| b[0].topic.to_string())
            .collect();
        assert_eq!(topics, ["a/1", "a/2"]);
        assert!(lend.take_kept().is_empty(), "once");
        let large = Arc::new(vec![Message::new(
            ByteString::from("a/3"),
            Bytes::from(vec![0u8; RING_BYTES]),
            QoS::AtLeastOnce,
            false,
        )]);
        assert!(!lend.keep(filter, &large), "over the bound");
        assert!(lend.keep(filter, &batch("a/4")), "room for a small one");
    }
}
