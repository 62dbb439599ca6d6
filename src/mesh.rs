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
