//! The only way shards talk: one documented message enum over glommio's
//! bounded, lock-free channel mesh (docs/ARCHITECTURE.md, "The shape").
//!
//! Publishes travel in batches (one mesh message per read of the publisher's
//! socket, not one per PUBLISH), as an `Arc` so that every peer gets the same
//! batch. A full channel makes the sending connection wait, which stops it
//! reading its socket, which lets TCP push back on the publisher.
//! Control messages (take-over, stats) are sent from detached tasks so that a
//! shard's receiving loop never waits on another shard (no mesh deadlock);
//! those of the outbox go through one queue per peer ([`Control`]), so they
//! arrive in the order they were made even when the channel is full.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

use bytestring::ByteString;
use glommio::channels::channel_mesh::Senders;
use log::warn;

use crate::observe::counters::Counters;
use crate::protocol::message::Message;
use crate::router::shared::{MemberUpdate, SharedDelivery};
use crate::session::SessionState;

/// The mesh's sending half as every task of a shard holds it.
pub type MeshSenders = Rc<Senders<ShardMsg>>;

/// A message from one shard to another.
#[derive(Debug)]
pub enum ShardMsg {
    /// Publishes received by the sending shard, in the order received,
    /// with (that shard, the shard sequence number of the first: the
    /// receiver records how far it routed each shard's publishes, for a
    /// session moving to another node, cluster::positions); with (shard,
    /// token): answer that shard [`ShardMsg::Applied`] once routed (its
    /// retained publishes then wait for their acks,
    /// `shard::held_acks::HeldAcks`).
    Publish(Arc<Vec<Message>>, (usize, u64), Option<(usize, u64)>),
    /// To a publisher's shard: the batch of its barrier `token` is applied.
    Applied {
        /// The barrier's token on the receiving shard.
        token: u64,
    },
    /// To a client id's home shard: a connection on `new_shard` wants the
    /// session of `client_id`.
    Claim {
        /// The client id.
        client_id: ByteString,
        /// Where the new connection is.
        new_shard: usize,
        /// The claim's id on `new_shard`.
        token: u64,
        /// The new connection's CleanSession flag.
        clean_session: bool,
    },
    /// From the home shard to the shard holding the session: close the old
    /// connection and hand the session to `to_shard`.
    Evict {
        /// The client id.
        client_id: ByteString,
        /// The claim (its token on the receiving shard) that owned the id
        /// and loses it; only that claim or its session is evicted, never a
        /// newer one made there meanwhile. None: whichever claim of the
        /// receiving shard owns the id (sent by a shard to itself only).
        victim: Option<u64>,
        /// Where the new connection is.
        to_shard: usize,
        /// The claim's id on `to_shard`.
        token: u64,
        /// The new connection's CleanSession flag (1: discard the state).
        clean_session: bool,
    },
    /// To the claiming shard: the claim is granted, with the previous session
    /// state when there is one to resume.
    Claimed {
        /// The claim's id on the receiving shard.
        token: u64,
        /// The state to resume, if any.
        state: Option<Box<SessionState>>,
        /// With a state: how far the sending shard had routed each shard's
        /// publishes when it took the state (what the state holds). The
        /// receiver keeps for the claim what it routed beyond that, which
        /// reached no copy of the session (`Shard::claim_answered_after`).
        routed: Option<Box<Seen>>,
        /// With a state whose filters the sending shard lent
        /// (`cluster::link::Control::Lend`): the number of the last NATS
        /// batch the state holds (the claim waits for the lend's batches).
        lent: Option<u64>,
    },
    /// To the home shard: the session of `client_id` on `shard` ended.
    Release {
        /// The client id.
        client_id: ByteString,
        /// The shard it was on.
        shard: usize,
        /// The token of the claim it was attached under.
        token: u64,
    },
    /// From a shared subscription member's shard to every other: the
    /// member joined, changed or left its group (`router::shared`).
    SharedMember(MemberUpdate),
    /// To the shard of shared subscription members: the messages the
    /// publishing shard chose them for, in the order published.
    SharedPublish(Vec<SharedDelivery>),
    /// To a publisher's shard: `count` shared deliveries of its barrier
    /// `token` (`SharedDelivery::barrier`) are settled on the sending shard
    /// and what they wrote there is durable (persistence on: the
    /// publisher's PUBACK or PUBREC waits for it).
    SharedDurable {
        /// The barrier's token on the receiving shard.
        token: u64,
        /// How many of its deliveries this answers.
        count: usize,
    },
    /// To shard 0: this shard's counters, for `$SYS`.
    Stats {
        /// The sending shard.
        shard: usize,
        /// Its counters (boxed: the largest variant by far, sent once per
        /// `sys_interval`).
        counters: Box<Counters>,
    },
}

/// Most batches a shard routed ahead of one still missing (the mesh or the
/// bridge's queue can take two concurrent sends of one shard in the other
/// order) that [`Seen`] remembers; beyond it the gap is taken as routed.
const MAX_AHEAD: usize = 64;

/// How far one shard routed each shard's messages: per shard, the first
/// shard sequence number not yet routed with all before it, and the
/// batches routed beyond a gap. Shard sequence numbers start at 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Per shard, the first sequence number not routed (all below it are).
    next: Vec<u64>,
    /// Batches routed beyond a gap: (shard, first, last).
    ahead: Vec<(usize, u64, u64)>,
}

impl Seen {
    /// Nothing routed of any of `shards` shards.
    pub fn new(shards: usize) -> Self {
        Seen {
            next: vec![1; shards],
            ahead: Vec::new(),
        }
    }

    /// The `len` messages of `shard` from sequence number `first` on are
    /// routed.
    pub fn mark(&mut self, shard: usize, first: u64, len: usize) {
        if len == 0 {
            return;
        }
        if shard >= self.next.len() {
            self.next.resize(shard + 1, 1);
        }
        let last = first + len as u64 - 1;
        let next = &mut self.next[shard];
        if last < *next {
            return;
        }
        if first > *next {
            self.ahead.push((shard, first, last));
            if self.ahead.len() > MAX_AHEAD {
                // Taken as routed: the oldest gap is a batch lost.
                let (s, _, l) = self.ahead.remove(0);
                self.next[s] = self.next[s].max(l + 1);
                self.absorb(s);
            }
            return;
        }
        *next = last + 1;
        self.absorb(shard);
    }

    /// Moves what became contiguous from `ahead` into `next`.
    fn absorb(&mut self, shard: usize) {
        loop {
            let next = self.next[shard];
            let Some(at) = self
                .ahead
                .iter()
                .position(|&(s, f, _)| s == shard && f <= next)
            else {
                return;
            };
            let (_, _, last) = self.ahead.swap_remove(at);
            self.next[shard] = next.max(last + 1);
        }
    }

    /// Whether message `seq` of `shard` is routed.
    pub fn routed(&self, shard: usize, seq: u64) -> bool {
        self.next.get(shard).is_some_and(|&n| seq < n)
            || self
                .ahead
                .iter()
                .any(|&(s, f, l)| s == shard && (f..=l).contains(&seq))
    }

    /// The highest sequence number of `shard` routed (0: none).
    #[cfg(test)]
    pub fn high(&self, shard: usize) -> u64 {
        let contiguous = self.next.get(shard).map_or(0, |n| n - 1);
        self.ahead
            .iter()
            .filter(|a| a.0 == shard)
            .map(|a| a.2)
            .fold(contiguous, u64::max)
    }

    /// Whether everything `other` routed is routed here (a run of
    /// `other` found here only in pieces counts as not: the caller waits
    /// a little longer).
    pub fn covers(&self, other: &Seen) -> bool {
        let holds = |shard: usize, first: u64, last: u64| {
            first > last
                || self.next.get(shard).is_some_and(|&n| last < n)
                || self.ahead.iter().any(|&(s, f, l)| {
                    s == shard && f <= first.max(self.first_missing(shard)) && last <= l
                })
        };
        other
            .next
            .iter()
            .enumerate()
            .all(|(shard, &next)| holds(shard, 1, next - 1))
            && other.ahead.iter().all(|&(s, f, l)| holds(s, f, l))
    }

    /// The first sequence number of `shard` not routed.
    pub fn first_missing(&self, shard: usize) -> u64 {
        self.next.get(shard).copied().unwrap_or(1)
    }
}

/// Sends `msg` to `peer` from a detached task, so the caller never waits.
pub fn send_detached(mesh: &MeshSenders, peer: usize, msg: ShardMsg) {
    let mesh = mesh.clone();
    glommio::spawn_local(async move {
        if mesh.send_to(peer, msg).await.is_err() {
            warn!("mesh: shard {peer} is gone, control message dropped");
        }
    })
    .detach();
}

/// The outbox's control messages waiting for their peer's channel: one FIFO
/// per peer, drained by at most one detached task at a time. One task per
/// message would not keep their order: when the channel is full, the tasks
/// wait, and the one woken first sends first, so a shared subscription
/// member's `Leave` could overtake its `Join` and leave a stale member in
/// the peer's replica.
#[derive(Default)]
pub struct Control {
    /// Per peer: the messages not yet sent, oldest first, and whether a
    /// task is draining them.
    queues: RefCell<Vec<(VecDeque<ShardMsg>, bool)>>,
}

impl Control {
    /// Queues `msg` for `peer`: true when no task drains that peer's queue,
    /// so the caller must start one.
    fn push(&self, peer: usize, msg: ShardMsg) -> bool {
        let mut queues = self.queues.borrow_mut();
        if queues.len() <= peer {
            queues.resize_with(peer + 1, Default::default);
        }
        let (queue, draining) = &mut queues[peer];
        queue.push_back(msg);
        !std::mem::replace(draining, true)
    }

    /// The next message for `peer`, oldest first; None when its queue is
    /// empty, and then its draining task ends.
    fn next(&self, peer: usize) -> Option<ShardMsg> {
        let mut queues = self.queues.borrow_mut();
        let (queue, draining) = queues.get_mut(peer)?;
        let next = queue.pop_front();
        if next.is_none() {
            *draining = false;
        }
        next
    }
}

/// Sends `msg` to `peer` after every message sent to it before through
/// `control`, from a detached task, so the caller never waits.
pub fn send_ordered(mesh: &MeshSenders, control: &Rc<Control>, peer: usize, msg: ShardMsg) {
    if !control.push(peer, msg) {
        return;
    }
    let mesh = mesh.clone();
    let control = control.clone();
    glommio::spawn_local(async move {
        while let Some(msg) = control.next(peer) {
            if mesh.send_to(peer, msg).await.is_err() {
                warn!("mesh: shard {peer} is gone, control message dropped");
            }
        }
    })
    .detach();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message told apart by `token`.
    fn applied(token: u64) -> ShardMsg {
        ShardMsg::Applied { token }
    }

    /// The token of an [`applied`] message.
    fn token(msg: Option<ShardMsg>) -> Option<u64> {
        match msg {
            Some(ShardMsg::Applied { token }) => Some(token),
            _ => None,
        }
    }

    /// A shard's position follows batches in order, remembers one routed
    /// beyond a gap until the gap fills, and says what it routed; one
    /// position covers another only for everything that one routed.
    #[test]
    fn a_position_follows_batches_also_out_of_order() {
        let mut seen = Seen::new(2);
        assert!(!seen.routed(0, 1));
        seen.mark(0, 1, 3);
        assert!(seen.routed(0, 3) && !seen.routed(0, 4));
        // 7..=8 before 4..=6.
        seen.mark(0, 7, 2);
        assert!(seen.routed(0, 7) && !seen.routed(0, 5));
        assert_eq!(seen.high(0), 8);
        let before = seen.clone();
        seen.mark(0, 4, 3);
        assert!((1..=8).all(|s| seen.routed(0, s)));
        assert!(seen.ahead.is_empty(), "absorbed");
        assert!(seen.covers(&before) && !before.covers(&seen));
        // Another shard, an empty batch, a batch again.
        seen.mark(1, 1, 0);
        assert!(!seen.routed(1, 1));
        seen.mark(1, 1, 1);
        seen.mark(0, 2, 2);
        assert!(seen.routed(1, 1) && !seen.routed(0, 9));
        // A shard beyond the count grows it.
        seen.mark(5, 1, 1);
        assert!(seen.routed(5, 1));
        assert!(seen.covers(&Seen::new(3)));
        assert!(!Seen::new(3).covers(&seen));
    }

    /// Too many batches beyond a gap: the gap is taken as routed (a batch
    /// lost), so the position goes on.
    #[test]
    fn a_gap_that_never_fills_is_given_up() {
        let mut seen = Seen::new(1);
        for i in 0..=MAX_AHEAD as u64 {
            seen.mark(0, 2 + i, 1);
        }
        assert!(seen.routed(0, 2 + MAX_AHEAD as u64));
        assert!(seen.ahead.len() <= MAX_AHEAD);
        assert_eq!(seen.first_missing(0), 2 + MAX_AHEAD as u64 + 1);
    }

    #[test]
    fn one_task_per_peer_drains_its_messages_in_the_order_they_were_queued() {
        let control = Control::default();
        assert!(control.push(1, applied(1)), "the first starts a task");
        assert!(!control.push(1, applied(2)), "the task is running");
        assert!(control.push(0, applied(10)), "another peer, its own task");
        assert_eq!(token(control.next(1)), Some(1));
        assert!(!control.push(1, applied(3)), "queued behind 2");
        assert_eq!(token(control.next(1)), Some(2));
        assert_eq!(token(control.next(1)), Some(3));
        assert_eq!(token(control.next(1)), None, "drained: the task ends");
        assert!(control.push(1, applied(4)), "so the next one starts a task");
        assert_eq!(token(control.next(0)), Some(10));
    }
}
