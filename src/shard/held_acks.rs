//! Acknowledgements of retained QoS 1/2 publishes, held back until every
//! shard's replica of the retained store applied them (so that once a
//! publisher has its PUBACK or PUBREC, a SUBSCRIBE on any shard gets the
//! message as retained).

use std::task::{Context, Poll, Waker};
use std::time::Duration;

use ahash::AHashMap;

use crate::session::link::SessionKey;
use crate::shard::Shard;

/// How long a publisher's held acknowledgements wait for the other shards
/// to apply its retained publish ([`HeldAcks`]) before they go anyway (a
/// shard that does not answer in that time is stuck or shutting down).
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Acknowledgements of retained publishes, held until every other shard's
/// replica applied them, so that once a publisher has its PUBACK (or PUBREC)
/// a SUBSCRIBE on any shard gets the message as retained. The connection
/// holds the acks of its read ([`HeldAcks::hold`]; the acks after a held one
/// in that read wait behind it, keeping their order, §4.6), the forwarding
/// of that read's publishes sends them with a request to be told once
/// applied, and the acks go out when every shard has answered
/// ([`crate::shard::Ctx::forward_publishes`]). The connection reads nothing
/// more meanwhile. Only retained QoS 1/2 publishes wait: a mesh round trip.
#[derive(Debug, Default)]
pub struct HeldAcks {
    /// Acks of this step held back: session, connection, PUBACK or PUBREC;
    /// in the order the publishes were received.
    held: Vec<(SessionKey, u64, Box<[u8]>)>,
    /// Forwarded batches not yet applied by every other shard: token to the
    /// number of shards still to answer and the task waiting for them.
    barriers: AHashMap<u64, (usize, Option<Waker>)>,
    /// Next barrier token.
    next_token: u64,
    /// The barrier of the current step that shared deliveries passed on
    /// at once carry (`Shard::route_shared`: they go through the outbox,
    /// before the step's barrier is started), counting them already;
    /// [`HeldAcks::start`] takes it as the step's barrier.
    open: Option<u64>,
}

impl HeldAcks {
    /// Whether an ack of session `key` is held in this step (so the next
    /// must wait behind it).
    pub fn holds(&self, key: SessionKey) -> bool {
        self.held.iter().any(|&(k, _, _)| k == key)
    }

    /// Holds `ack` for connection `conn_id` of session `key`.
    pub fn hold(&mut self, key: SessionKey, conn_id: u64, ack: Box<[u8]>) {
        self.held.push((key, conn_id, ack));
    }

    /// Whether acks of this step are held (the read must end in
    /// `Ctx::forward_publishes`, which sends them).
    pub fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// This step's held acks, to send once the step's publishes are applied
    /// everywhere.
    pub fn take(&mut self) -> Vec<(SessionKey, u64, Box<[u8]>)> {
        std::mem::take(&mut self.held)
    }

    /// A barrier that `shards` other shards must answer, besides the
    /// deliveries that joined it already ([`HeldAcks::join_open`]); its
    /// token.
    pub fn start(&mut self, shards: usize) -> u64 {
        let token = self.open.take().unwrap_or_else(|| self.new_token());
        self.barriers.entry(token).or_insert((0, None)).0 += shards;
        token
    }

    /// One more answer for the current step's barrier, started now if it
    /// is not yet (`Ctx::forward_publishes` takes it over with
    /// [`HeldAcks::start`]); its token. An answer that comes before the
    /// step's barrier is started counts all the same.
    pub fn join_open(&mut self) -> u64 {
        let token = match self.open {
            Some(token) => token,
            None => {
                let token = self.new_token();
                self.open = Some(token);
                token
            }
        };
        self.barriers.entry(token).or_insert((0, None)).0 += 1;
        token
    }

    /// Whether deliveries of the current step joined a barrier not yet
    /// started ([`HeldAcks::join_open`]).
    pub fn has_open(&self) -> bool {
        self.open.is_some()
    }

    /// A barrier of its own, outside the steps' (a session's end whose
    /// drop record waits for the shards its shared backlog went to,
    /// `Shard::journal_drop_after`), with no answer to wait for yet
    /// ([`HeldAcks::join`] adds them); its token.
    pub fn new_barrier(&mut self) -> u64 {
        let token = self.new_token();
        self.barriers.insert(token, (0, None));
        token
    }

    /// One more answer for barrier `token` to wait for.
    pub fn join(&mut self, token: u64) {
        self.barriers.entry(token).or_insert((0, None)).0 += 1;
    }

    /// Whether every answer barrier `token` waits for came (then the
    /// barrier is forgotten): [`HeldAcks::poll_applied`] for those that
    /// nothing polls.
    pub fn passed(&mut self, token: u64) -> bool {
        match self.barriers.get(&token) {
            Some((0, _)) | None => {
                self.barriers.remove(&token);
                true
            }
            Some(_) => false,
        }
    }

    /// A fresh barrier token.
    fn new_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    /// One shard applied the batch of barrier `token` (or cannot).
    pub fn applied(&mut self, token: u64) {
        self.applied_many(token, 1);
    }

    /// `count` answers of barrier `token` came at once (shared deliveries
    /// settled on one shard, [`crate::mesh::ShardMsg::SharedDurable`]).
    pub fn applied_many(&mut self, token: u64, count: usize) {
        if let Some((left, waker)) = self.barriers.get_mut(&token) {
            *left = left.saturating_sub(count);
            if *left == 0
                && let Some(waker) = waker.take()
            {
                waker.wake();
            }
        }
    }

    /// Ready (and forgotten) once every shard answered barrier `token`.
    pub fn poll_applied(&mut self, token: u64, cx: &Context<'_>) -> Poll<()> {
        match self.barriers.get_mut(&token) {
            Some((0, _)) | None => {
                self.barriers.remove(&token);
                Poll::Ready(())
            }
            Some((_, waker)) => {
                *waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Stops waiting for barrier `token` (timed out).
    pub fn forget(&mut self, token: u64) {
        self.barriers.remove(&token);
    }
}

impl Shard {
    /// Queues `ack` (a PUBACK, PUBREC or PUBCOMP of any protocol version) for
    /// connection `conn_id` of session `key`, or holds it until the read's
    /// publishes are applied on every shard: when it acknowledges a retained
    /// publish (`retained`) that goes to other shards, or when an earlier
    /// ack of this session in this read is held (acks keep the order of the
    /// publishes, §4.6). With persistence every ack waits: until each
    /// shard's journals hold what the read's publishes made them write (a
    /// retained update on shard 0, the messages persistent sessions queued
    /// on any shard). In a cluster a retained publish's ack also waits for
    /// the cluster's retained bucket. A held ack always has a remote batch
    /// or this shard's journals to wait for, and `Ctx::forward_publishes`
    /// releases it at the end of the read.
    pub fn queue_ack(&mut self, key: SessionKey, conn_id: u64, ack: &[u8], retained: bool) {
        // A refusal (MQTT 5.0 reason 0x80 or above) acknowledges nothing
        // stored: it never waits for the disk.
        let refusal = ack.len() >= 5 && ack[4] >= 0x80;
        let persistence = self.session_journal.is_some() && !refusal;
        let behind_replicas =
            (retained || persistence) && self.nr_shards > 1 && self.has_remote_batch();
        let behind_disk = persistence;
        // In a cluster a retained publish waits for the retained bucket
        // (`Ctx::retained_stored`): a node that dies after the ack loses
        // nothing the others cannot read.
        let behind_cluster = retained && !refusal && self.cluster.is_some();
        if behind_replicas || behind_disk || behind_cluster || self.held_acks.holds(key) {
            self.held_acks.hold(key, conn_id, Box::from(ack));
            return;
        }
        if let Some(session) = self.session_for(key, conn_id) {
            session.queue_frame(ack);
            self.mark_dirty(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::{Context, Poll, Waker};

    use super::HeldAcks;

    #[test]
    fn a_barrier_is_passed_once_every_answer_it_counts_came() {
        let mut acks = HeldAcks::default();
        let cx = Context::from_waker(Waker::noop());
        // One peer's batch and three shared deliveries (two on one shard,
        // answered at once, one passed on to a third).
        let token = acks.start(1 + 3);
        acks.applied(token);
        assert_eq!(acks.poll_applied(token, &cx), Poll::Pending);
        acks.applied_many(token, 2);
        assert_eq!(acks.poll_applied(token, &cx), Poll::Pending, "one left");
        acks.applied_many(token + 1, 1);
        assert_eq!(
            acks.poll_applied(token, &cx),
            Poll::Pending,
            "another barrier's answer counts for that one only"
        );
        acks.applied_many(token, 1);
        assert_eq!(acks.poll_applied(token, &cx), Poll::Ready(()));
    }

    #[test]
    fn deliveries_passed_on_before_the_step_starts_its_barrier_count_in_it() {
        let mut acks = HeldAcks::default();
        let cx = Context::from_waker(Waker::noop());
        let token = acks.join_open();
        assert_eq!(acks.join_open(), token, "one barrier per step");
        // One of the two answers before the step's barrier is started.
        acks.applied_many(token, 1);
        assert_eq!(acks.start(1), token, "the step's barrier is that one");
        assert!(!acks.has_open());
        acks.applied(token);
        assert_eq!(acks.poll_applied(token, &cx), Poll::Pending, "one left");
        acks.applied_many(token, 1);
        assert_eq!(acks.poll_applied(token, &cx), Poll::Ready(()));
        assert_ne!(acks.start(0), token, "the next step's is a new one");
    }
}
