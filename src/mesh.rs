//! The only way shards talk: one documented message enum over glommio's
//! bounded, lock-free channel mesh (docs/ARCHITECTURE.md, "The shape").
//!
//! Publishes travel in batches (one mesh message per read of the publisher's
//! socket, not one per PUBLISH), as an `Arc` so that every peer gets the same
//! batch. A full channel makes the sending connection wait, which stops it
//! reading its socket, which lets TCP push back on the publisher.
//! Control messages (take-over, stats) are sent from detached tasks so that a
//! shard's receiving loop never waits on another shard (no mesh deadlock).

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
    /// Publishes received by the sending shard, in the order received; with
    /// (shard, token): answer that shard [`ShardMsg::Applied`] once routed
    /// (its retained publishes then wait for their acks,
    /// `shard::held_acks::HeldAcks`).
    Publish(Arc<Vec<Message>>, Option<(usize, u64)>),
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
