//! The bridge's queues to the shards, and what waits for room in them
//! (docs/design/cluster.md §3).
//!
//! The bridge never waits on one shard (NATS would soon take the node for
//! a slow consumer): a delivery from NATS is one `try_send`, and a full
//! queue drops it for that shard, counted (`cluster_deliver_dropped`).
//! What must not be dropped, a *control* (a claim's grant
//! `ToShard::Claimed`, the hand-over marks `ToShard::Handing`, a take-over
//! request `ToShard::Takeover`), waits for room in the shard's
//! [`Backlog`], which a task of its own hands on in order as the shard
//! makes room. While that backlog holds anything, every later item for
//! the shard, deliveries too, goes behind it: nothing the bridge hands a
//! shard passes what it handed before. Before, a grant waited in a task
//! of its own and a delivery of the moving session's filters could take
//! the room first: the shard routed it before the claim held the session,
//! which lost it; a mark could be passed, or dropped, the same way.
//!
//! When no backlog waits (the shard keeps up), a delivery costs one flag
//! check more than the `try_send`.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::cluster::link::{ClusterStatus, ToShard};

/// Each shard's queue from the bridge and its backlog. Cloned cheaply
/// (one `Rc`): the task that drains a backlog holds a clone.
#[derive(Clone)]
pub(super) struct ToShards(Rc<Queues>);

/// What [`ToShards`] shares.
struct Queues {
    /// Each shard's queue, by shard index.
    queues: Vec<async_channel::Sender<ToShard>>,
    /// Each shard's backlog, by shard index.
    backlogs: Vec<RefCell<Backlog>>,
    /// Most delivery batches one backlog keeps: the queue's own capacity
    /// (`queue_capacity`). A delivery past it is dropped as one meeting a
    /// full queue: the shard is then behind by two queues, and the bridge
    /// keeps no more for it than the queue itself holds.
    max_batches: usize,
    /// Shared figures (the deliveries dropped).
    status: Arc<ClusterStatus>,
}

/// What waits for room in one shard's queue, in the order the bridge
/// handed it on. Controls are never dropped (a claim's grant, a
/// hand-over's marks and request: as many as claims and hand-overs under
/// way); deliveries at most [`Queues::max_batches`].
#[derive(Default)]
struct Backlog {
    /// The items waiting, oldest first.
    waiting: VecDeque<Waiting>,
    /// How many of them are deliveries.
    batches: usize,
    /// Whether a task drains the backlog: from the first item in until it
    /// found none left. The item it waits for room for is out of
    /// `waiting` meanwhile, and nothing may pass it either.
    draining: bool,
}

/// One item of a [`Backlog`].
struct Waiting {
    /// What goes to the shard.
    item: ToShard,
    /// For a control: dropped once the item is in the queue (or the shard
    /// is gone), which closes the receiver [`ToShards::control`] returned.
    queued: Option<async_channel::Sender<()>>,
}

impl ToShards {
    /// The queues `queues`, by shard index, whose backlogs keep at most
    /// `max_batches` deliveries each (the queues' capacity).
    pub(super) fn new(
        queues: Vec<async_channel::Sender<ToShard>>,
        max_batches: usize,
        status: Arc<ClusterStatus>,
    ) -> Self {
        let backlogs = queues.iter().map(|_| RefCell::default()).collect();
        ToShards(Rc::new(Queues {
            queues,
            backlogs,
            max_batches,
            status,
        }))
    }

    /// How many shards.
    pub(super) fn len(&self) -> usize {
        self.0.queues.len()
    }

    /// Whether shard `shard` has a queue.
    pub(super) fn has(&self, shard: usize) -> bool {
        shard < self.0.queues.len()
    }

    /// Every shard's queue itself, by shard index, for what needs no order
    /// with the rest (the retained bucket's updates, awaited).
    pub(super) fn queues(&self) -> &[async_channel::Sender<ToShard>] {
        &self.0.queues
    }

    /// Hands a batch of messages from NATS to shard `shard` without
    /// waiting: behind its backlog if one waits (at most
    /// [`Queues::max_batches`]), else into its queue; a full queue, or a
    /// full backlog, drops it for that shard only, counted.
    pub(super) fn deliver(&self, shard: usize, batch: ToShard) {
        let q = &*self.0;
        let (Some(queue), Some(backlog)) = (q.queues.get(shard), q.backlogs.get(shard)) else {
            return;
        };
        let mut backlog = backlog.borrow_mut();
        let dropped = if !backlog.draining {
            match queue.try_send(batch) {
                Ok(()) => return,
                Err(e) => e.into_inner(),
            }
        } else if backlog.batches < q.max_batches {
            backlog.batches += 1;
            backlog.waiting.push_back(Waiting {
                item: batch,
                queued: None,
            });
            return;
        } else {
            batch
        };
        q.status
            .figures
            .cluster_deliver_dropped
            .fetch_add(batch_len(&dropped), Ordering::Relaxed);
    }

    /// Hands control `item` to shard `shard`, never dropped while the shard
    /// runs: into its queue at once if no backlog waits and there is room
    /// (None), else behind its backlog: the receiver returned then closes
    /// once the item is in the queue (or the shard is gone).
    pub(super) fn control(
        &self,
        shard: usize,
        item: ToShard,
    ) -> Option<async_channel::Receiver<()>> {
        let (queue, backlog) = (self.0.queues.get(shard)?, self.0.backlogs.get(shard)?);
        let mut backlog = backlog.borrow_mut();
        let item = if backlog.draining {
            item
        } else {
            match queue.try_send(item) {
                Err(async_channel::TrySendError::Full(item)) => item,
                // In the queue, or the shard is gone.
                _ => return None,
            }
        };
        let (queued, in_queue) = async_channel::bounded(1);
        backlog.waiting.push_back(Waiting {
            item,
            queued: Some(queued),
        });
        if !backlog.draining {
            backlog.draining = true;
            tokio::task::spawn_local(drain(self.clone(), shard));
        }
        Some(in_queue)
    }
}

/// Hands shard `shard`'s backlog to its queue, oldest first, each item
/// once the shard made room for it, until none is left; the shard gone,
/// drops what is left.
async fn drain(to: ToShards, shard: usize) {
    let q = &*to.0;
    let (Some(queue), Some(backlog)) = (q.queues.get(shard), q.backlogs.get(shard)) else {
        return;
    };
    loop {
        let next = {
            let mut backlog = backlog.borrow_mut();
            let next = backlog.waiting.pop_front();
            match &next {
                Some(w) if w.queued.is_none() => backlog.batches -= 1,
                Some(_) => {}
                None => backlog.draining = false,
            }
            next
        };
        let Some(Waiting { item, queued }) = next else {
            return;
        };
        if queue.send(item).await.is_err() {
            let mut backlog = backlog.borrow_mut();
            let left = backlog.waiting.drain(..).filter(|w| w.queued.is_none());
            let dropped: u64 = left.map(|w| batch_len(&w.item)).sum();
            q.status
                .figures
                .cluster_deliver_dropped
                .fetch_add(dropped, Ordering::Relaxed);
            *backlog = Backlog::default();
            return;
        }
        drop(queued);
    }
}

/// The messages a delivery carries (1 for anything else).
fn batch_len(batch: &ToShard) -> u64 {
    (match batch {
        ToShard::Deliver { messages, .. } | ToShard::DeliverExcept { messages, .. } => {
            messages.len()
        }
        ToShard::DeliverShared(batch) | ToShard::DeliverSharedFor { batch, .. } => batch.len(),
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
        (ToShards::new(senders, capacity, status), receivers)
    }

    /// A delivery of one QoS 1 message on `topic` for filter `#`.
    fn delivery(topic: &str) -> ToShard {
        ToShard::Deliver {
            filter: Some(ByteString::from("#")),
            seq: 1,
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

    /// The deliveries dropped, counted.
    fn dropped(to: &ToShards) -> u64 {
        to.0.status
            .figures
            .cluster_deliver_dropped
            .load(Ordering::Relaxed)
    }

    /// What the shard reads next from `from`, `n` items, letting the
    /// bridge hand on more after each.
    async fn read_next(from: &async_channel::Receiver<ToShard>, n: usize) -> Vec<String> {
        let mut got = Vec::new();
        for _ in 0..n {
            got.push(read(from.recv().await.expect("an item")));
            settle().await;
        }
        got
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
            assert_eq!(dropped(&to), 0);
        });
    }

    /// A mark that meets a full queue keeps its place between the
    /// deliveries before and after it: what the bridge read before the
    /// mark is the session's, what it read after is the collector's.
    #[test]
    fn a_mark_waiting_for_room_keeps_its_place_between_deliveries() {
        local(async {
            let (to, from) = queues(2, 1);
            to.deliver(0, delivery("before"));
            let mark = |on| ToShard::Handing {
                client_id: ByteString::from("c"),
                on,
                done: None,
            };
            assert!(to.control(1, mark(true)).is_none(), "room on shard 1");
            assert!(to.control(0, mark(true)).is_some(), "shard 0 is full");
            to.deliver(0, delivery("after"));
            to.deliver(1, delivery("other shard"));
            settle().await;
            let read_0 = read_next(&from[0], 3).await;
            assert_eq!(read_0, ["before", "mark c true", "after"]);
            // Shard 1 had room: its mark went straight in, its delivery
            // met the queue full (capacity 1) and was dropped.
            assert_eq!(read(from[1].try_recv().expect("shard 1")), "mark c true");
            assert!(from[1].try_recv().is_err());
            assert_eq!(dropped(&to), 1);
        });
    }

    /// A backlog keeps at most the queue's capacity of deliveries (past it
    /// they are dropped, counted), and every control; once drained, a
    /// delivery is one `try_send` again.
    #[test]
    fn a_full_backlog_drops_deliveries_never_controls() {
        local(async {
            let (to, from) = queues(1, 1);
            to.deliver(0, delivery("queued"));
            assert!(to.control(0, grant(1)).is_some());
            to.deliver(0, delivery("kept"));
            to.deliver(0, delivery("dropped"));
            assert!(to.control(0, grant(2)).is_some(), "behind the backlog");
            assert_eq!(dropped(&to), 1);
            let got = read_next(&from[0], 4).await;
            assert_eq!(got, ["queued", "grant 1", "kept", "grant 2"]);
            assert!(!to.0.backlogs[0].borrow().draining, "drained");
            to.deliver(0, delivery("straight"));
            assert!(to.control(0, grant(3)).is_some(), "full again");
            assert_eq!(read(from[0].try_recv().expect("straight")), "straight");
            settle().await;
            assert_eq!(read(from[0].try_recv().expect("grant")), "grant 3");
            assert_eq!(dropped(&to), 1);
        });
    }

    /// A closed queue (the shard stopped) ends the backlog: what waited is
    /// dropped, and each control's receiver closes.
    #[test]
    fn a_stopped_shard_drops_its_backlog() {
        local(async {
            let (to, mut from) = queues(1, 1);
            to.deliver(0, delivery("queued"));
            let grant = to.control(0, grant(1)).expect("full");
            to.deliver(0, delivery("waiting"));
            settle().await;
            drop(from.pop());
            settle().await;
            assert!(grant.recv().await.is_err());
            assert!(!to.0.backlogs[0].borrow().draining);
            assert_eq!(to.0.backlogs[0].borrow().batches, 0);
            assert_eq!(dropped(&to), 1, "the delivery that waited");
        });
    }
}
