//! The bridge's queues to the shards (docs/design/cluster.md §3).
//!
//! The bridge never waits on one shard: a delivery from NATS is one
//! `try_send`, and a full queue drops it for that shard. What must not be
//! dropped (a claim's grant, `ToShard::Claimed`) waits for room in a task
//! of its own.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::cluster::link::{ClusterStatus, ToShard};

/// Each shard's queue from the bridge. Cloned cheaply.
#[derive(Clone)]
pub(super) struct ToShards {
    /// Each shard's queue, by shard index.
    queues: Vec<async_channel::Sender<ToShard>>,
    /// Shared figures (the deliveries dropped).
    status: Arc<ClusterStatus>,
}

impl ToShards {
    /// The queues `queues`, by shard index.
    pub(super) fn new(
        queues: Vec<async_channel::Sender<ToShard>>,
        status: Arc<ClusterStatus>,
    ) -> Self {
        ToShards { queues, status }
    }

    /// How many shards.
    pub(super) fn len(&self) -> usize {
        self.queues.len()
    }

    /// Shard `shard`'s queue itself.
    pub(super) fn queue(&self, shard: usize) -> Option<&async_channel::Sender<ToShard>> {
        self.queues.get(shard)
    }

    /// Every shard's queue, by shard index.
    pub(super) fn queues(&self) -> &[async_channel::Sender<ToShard>] {
        &self.queues
    }

    /// Hands a batch of messages from NATS to shard `shard` without
    /// waiting: a full queue drops it for that shard only, counted.
    pub(super) fn deliver(&self, shard: usize, batch: ToShard) {
        let Some(queue) = self.queues.get(shard) else {
            return;
        };
        let n = batch_len(&batch);
        if queue.try_send(batch).is_err() {
            self.status
                .figures
                .cluster_deliver_dropped
                .fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Hands `item` to shard `shard`, never dropped while the shard runs:
    /// at once if its queue has room, else from a task that waits for room
    /// (None: it is in the queue). The receiver returned then closes once
    /// the item is in the queue (or the shard is gone).
    pub(super) fn control(
        &self,
        shard: usize,
        item: ToShard,
    ) -> Option<async_channel::Receiver<()>> {
        let queue = self.queues.get(shard)?;
        let Err(async_channel::TrySendError::Full(item)) = queue.try_send(item) else {
            return None;
        };
        let (queued, in_queue) = async_channel::bounded::<()>(1);
        let queue = queue.clone();
        tokio::task::spawn_local(async move {
            let _ = queue.send(item).await;
            drop(queued);
        });
        Some(in_queue)
    }
}

/// The messages a delivery carries (1 for anything else).
fn batch_len(batch: &ToShard) -> u64 {
    (match batch {
        ToShard::Deliver { messages, .. } | ToShard::DeliverExcept { messages, .. } => {
            messages.len()
        }
        ToShard::DeliverShared(batch) => batch.len(),
        _ => 1,
    }) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::link::ClaimAnswer;
    use crate::protocol::message::Message;
    use crate::protocol::v3::QoS;
    use bytes::Bytes;
    use bytestring::ByteString;

    /// Queues of `capacity` to `shards` shards, and their receiving ends.
    fn queues(shards: usize, capacity: usize) -> (ToShards, Vec<async_channel::Receiver<ToShard>>) {
        let (senders, receivers) = (0..shards)
            .map(|_| async_channel::bounded(capacity))
            .unzip();
        let status = Arc::new(ClusterStatus::new("a".into(), Vec::new()));
        (ToShards::new(senders, status), receivers)
    }

    /// A delivery of one QoS 1 message on `topic` for filter `#`.
    fn delivery(topic: &str) -> ToShard {
        ToShard::Deliver {
            filter: Some(ByteString::from("#")),
            messages: Arc::new(vec![Message::new(
                ByteString::from(topic),
                Bytes::new(),
                QoS::AtLeastOnce,
                false,
            )]),
        }
    }

    /// A grant of claim `token`, fresh.
    fn grant(token: u64) -> ToShard {
        ToShard::Claimed {
            token,
            answer: ClaimAnswer::Granted(None),
            published: None,
        }
    }

    /// What the shard reads: the topic of a delivery, `grant <token>`,
    /// `mark <id> <on>`.
    fn read(item: ToShard) -> String {
        match item {
            ToShard::Deliver { messages, .. } => messages[0].topic.to_string(),
            ToShard::Claimed { token, .. } => format!("grant {token}"),
            ToShard::Handing { client_id, on, .. } => format!("mark {client_id} {on}"),
            _ => "other".to_string(),
        }
    }

    /// Runs `test` on a tokio runtime of one thread with a `LocalSet`, as
    /// the bridge's.
    fn local(test: impl Future<Output = ()>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        tokio::task::LocalSet::new().block_on(&runtime, test);
    }

    /// Lets the bridge's tasks run until each waits.
    async fn settle() {
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
    }

    /// A grant that meets a full queue reaches the shard before a delivery
    /// the bridge hands on after it (the session's messages then find the
    /// claim attaching and are kept for it), and the delivery is not
    /// dropped for waiting behind it. Before, the grant waited in a task of
    /// its own while the delivery took the room the shard made first: the
    /// shard routed it before the claim held the session's filters, and
    /// the moving session lost it.
    #[test]
    fn a_grant_waiting_for_room_goes_before_a_later_delivery() {
        local(async {
            let (to, from) = queues(1, 1);
            to.deliver(0, delivery("before"));
            let in_queue = to.control(0, grant(7)).expect("the queue is full");
            settle().await;
            // The shard reads one: room for one more.
            assert_eq!(read(from[0].try_recv().expect("first")), "before");
            to.deliver(0, delivery("after"));
            settle().await;
            assert_eq!(read(from[0].recv().await.expect("second")), "grant 7");
            assert!(in_queue.recv().await.is_err(), "closed once queued");
            settle().await;
            assert_eq!(read(from[0].recv().await.expect("third")), "after");
            assert_eq!(
                to.status
                    .figures
                    .cluster_deliver_dropped
                    .load(Ordering::Relaxed),
                0
            );
        });
    }
}
