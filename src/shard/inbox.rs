//! The shard's side of the mesh: what it does with each [`ShardMsg`] another
//! shard sends it.
//!
//! Publish batches already queued behind the one received are routed before
//! the flush, up to [`MAX_UNFLUSHED_BYTES`]: a shard that is still writing
//! one batch to its subscribers while the publisher's shard hands on the
//! next ones (a publisher faster than this shard's writes, each of its
//! reads one small batch) finds them waiting. Routed together, each run of
//! them is matched once and each subscriber gets one write for all of them,
//! as on the publisher's own shard, where one step reads up to 256 KiB.

use std::future::Future;
use std::pin::pin;
use std::rc::Rc;

use glommio::channels::channel_mesh::Receivers;
use log::debug;

use crate::mesh::{self, ShardMsg};
use crate::protocol::message::Message;
use crate::shard::{Ctx, READ_BUFFER_SIZE, Shard};
use crate::store::journal::Journal;

/// Topic and payload bytes of publish batches routed before one flush, when
/// each batch was already queued as the one before it was routed: what one
/// step of the publisher's connection reads at most (4 reads of
/// [`READ_BUFFER_SIZE`]), so a subscriber's write from another shard is
/// never larger than one from the publisher's own, and a peer that never
/// stops cannot hold back what it sent.
const MAX_UNFLUSHED_BYTES: usize = 4 * READ_BUFFER_SIZE;

/// The topic and payload bytes of `batch` (what its frames cost to write).
fn batch_bytes(batch: &[Message]) -> usize {
    batch.iter().map(|m| m.topic.len() + m.payload.len()).sum()
}

/// Receives everything `peer` sends to this shard until the mesh closes.
pub async fn receive_from(ctx: Ctx, peer: usize, receivers: Rc<Receivers<ShardMsg>>) {
    // Bytes of the publish batches routed but not yet flushed.
    let mut unflushed = 0;
    loop {
        let next = futures_lite::future::poll_fn(|cx| {
            let polled = pin!(receivers.recv_from(peer)).poll(cx);
            if polled.is_pending() && unflushed > 0 {
                // Nothing more queued: what was routed goes out now, and
                // the task waits as it would have (one waker, registered by
                // the poll above).
                ctx.shard.borrow_mut().flush_dirty();
                unflushed = 0;
            }
            polled
        })
        .await;
        let Ok(Some(msg)) = next else {
            if unflushed > 0 {
                ctx.shard.borrow_mut().flush_dirty();
            }
            break;
        };
        if unflushed > 0 && !matches!(msg, ShardMsg::Publish(_, _, None)) {
            // Anything else acts on what was routed: written first.
            ctx.shard.borrow_mut().flush_dirty();
            unflushed = 0;
        }
        match msg {
            ShardMsg::Publish(batch, from, None) => {
                {
                    let mut shard = ctx.shard.borrow_mut();
                    shard.route_batch_from(&batch, from);
                    // At least 1: an empty batch is routed too.
                    unflushed += batch_bytes(&batch).max(1);
                    if unflushed >= MAX_UNFLUSHED_BYTES {
                        shard.flush_dirty();
                        unflushed = 0;
                    }
                }
                glommio::yield_if_needed().await;
            }
            ShardMsg::Publish(batch, from, Some((shard, token))) => {
                let unsynced = {
                    let mut shard = ctx.shard.borrow_mut();
                    shard.route_batch_from(&batch, from);
                    shard.flush_dirty();
                    shard.unsynced_journals()
                };
                // With persistence, a shard answers once its journals
                // hold what the batch made it write (the publisher's
                // PUBACK waits for that), without holding up the mesh.
                answer_when_durable(&ctx, unsynced, vec![(shard, ShardMsg::Applied { token })]);
                glommio::yield_if_needed().await;
            }
            ShardMsg::SharedPublish(deliveries) => {
                let (settled, unsynced) = {
                    let mut shard = ctx.shard.borrow_mut();
                    shard.deliver_shared(deliveries);
                    let settled = std::mem::take(&mut shard.shared_settled);
                    (settled, shard.unsynced_journals())
                };
                ctx.send_outbox();
                // The publishers' acks wait for what the members' sessions
                // wrote here (a persistent member's queue), as for a batch.
                answer_when_durable(&ctx, unsynced, durable_answers(settled));
            }
            other => {
                ctx.shard.borrow_mut().handle_control(other);
                ctx.send_outbox();
            }
        }
    }
    debug!("mesh channel from shard {peer} closed");
}

/// One [`ShardMsg::SharedDurable`] per barrier among `settled` (publishing
/// shard, token), counting its deliveries, in the order first seen.
fn durable_answers(settled: Vec<(usize, u64)>) -> Vec<(usize, ShardMsg)> {
    let mut counts: Vec<((usize, u64), usize)> = Vec::new();
    for barrier in settled {
        match counts.iter_mut().find(|(b, _)| *b == barrier) {
            Some((_, count)) => *count += 1,
            None => counts.push((barrier, 1)),
        }
    }
    counts
        .into_iter()
        .map(|((shard, token), count)| (shard, ShardMsg::SharedDurable { token, count }))
        .collect()
}

/// Sends `answers` once every journal of `unsynced` is durable up to its
/// LSN (at once when there is none), from a detached task: the mesh loop
/// and the other shards never wait for this shard's disk. An answer to
/// this shard itself (a shared delivery passed back here after a
/// take-over) is applied here: the mesh has no channel to oneself.
fn answer_when_durable(
    ctx: &Ctx,
    unsynced: Vec<(Rc<Journal>, u64)>,
    answers: Vec<(usize, ShardMsg)>,
) {
    if answers.is_empty() {
        return;
    }
    let send = |ctx: &Ctx, answers: Vec<(usize, ShardMsg)>| {
        for (shard, msg) in answers {
            if shard == ctx.id {
                ctx.shard.borrow_mut().handle_control(msg);
                // What it answered in turn (a claim whose session's drop
                // waited for this, `Shard::journal_handed_over_drops`).
                ctx.send_outbox();
            } else {
                mesh::send_detached(&ctx.mesh, shard, msg);
            }
        }
    };
    if unsynced.is_empty() {
        send(ctx, answers);
        return;
    }
    let ctx = ctx.clone();
    glommio::spawn_local(async move {
        for (journal, lsn) in unsynced {
            journal.wait_acked(lsn).await;
        }
        send(&ctx, answers);
    })
    .detach();
}

impl Shard {
    /// This shard's journals that hold records not yet durable, each with
    /// its end: what an answer about what was just routed waits for.
    pub fn unsynced_journals(&self) -> Vec<(Rc<Journal>, u64)> {
        self.retain_journal
            .iter()
            .chain(&self.session_journal)
            .filter(|j| j.acked_lsn() < j.end_lsn())
            .map(|j| (j.clone(), j.end_lsn()))
            .collect()
    }

    /// A control message from another shard.
    pub fn handle_control(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Publish(batch, from, applied) => {
                self.route_batch_from(&batch, from);
                self.flush_dirty();
                if let Some((shard, token)) = applied {
                    self.outbox.push((shard, ShardMsg::Applied { token }));
                }
            }
            ShardMsg::Applied { token } => self.held_acks.applied(token),
            ShardMsg::Claim {
                client_id,
                new_shard,
                token,
                clean_session,
            } => self.home_claim(client_id, new_shard, token, clean_session),
            ShardMsg::Evict {
                client_id,
                victim,
                to_shard,
                token,
                clean_session,
            } => self.evict(&client_id, victim, to_shard, token, clean_session),
            ShardMsg::Claimed {
                token,
                state,
                routed,
                lent,
            } => self.claim_answered_after(token, state.map(|s| *s), routed.map(|r| *r), lent),
            ShardMsg::Release {
                client_id,
                shard,
                token,
            } => self.home_release(&client_id, shard, token),
            ShardMsg::SharedMember(update) => self.shared_member_update(update),
            ShardMsg::SharedPublish(deliveries) => self.deliver_shared(deliveries),
            ShardMsg::SharedDurable { token, count } => {
                self.held_acks.applied_many(token, count);
                let _ = self.journal_handed_over_drops();
            }
            ShardMsg::Stats { shard, counters } => {
                if let Some(slot) = self.all_stats.get_mut(shard) {
                    *slot = *counters;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::{Bytes, BytesMut};
    use bytestring::ByteString;
    use glommio::channels::channel_mesh::MeshBuilder;

    use super::*;
    use crate::config::Config;
    use crate::net::fd;
    use crate::net::poller::Poller;
    use crate::observe::counters::Counters;
    use crate::protocol::message::Message;
    use crate::protocol::v3::{self as codec, Packet, QoS};
    use crate::session::link::Link;
    use crate::shard::testing::{self, attach_client};

    #[test]
    fn settled_shared_deliveries_are_answered_once_per_barrier_with_their_count() {
        let answers = durable_answers(vec![(0, 4), (2, 1), (0, 4), (0, 5)]);
        let got: Vec<(usize, u64, usize)> = answers
            .into_iter()
            .filter_map(|(shard, msg)| match msg {
                ShardMsg::SharedDurable { token, count } => Some((shard, token, count)),
                _ => None,
            })
            .collect();
        assert_eq!(got, vec![(0, 4, 2), (2, 1, 1), (0, 5, 1)]);
    }

    #[test]
    fn a_publish_batch_from_another_shard_is_delivered_and_flushed_here() {
        let mut shard = testing::shard_with(1, 2, Config::default());
        let mut client = attach_client(&mut shard, "c", "t/#", QoS::AtMostOnce, None);
        shard.flush_dirty();
        let batch = Arc::new(vec![
            Message {
                topic: ByteString::from("t/1"),
                payload: Bytes::from_static(b"a"),
                qos: QoS::AtMostOnce,
                retain: false,
                retain_stamp: 0,
                properties: None,
            },
            Message {
                topic: ByteString::from("t/2"),
                payload: Bytes::from_static(b"b"),
                qos: QoS::AtMostOnce,
                retain: true,
                retain_stamp: 1,
                properties: None,
            },
        ]);
        shard.handle_control(ShardMsg::Publish(batch, (1, 1), None));
        let got = client.publishes();
        assert_eq!(got.len(), 2, "flushed within the same step");
        assert_eq!(shard.retained.len(), 1, "the retained replica applied");
        assert!(
            shard.take_remote_batch().is_none(),
            "a forwarded publish is never forwarded again"
        );
    }

    #[test]
    fn stats_from_another_shard_replace_its_last_snapshot() {
        let mut shard = testing::shard_with(0, 2, Config::default());
        for bytes_sent in [5, 7] {
            let counters = Counters {
                bytes_sent,
                ..Counters::default()
            };
            shard.handle_control(ShardMsg::Stats {
                shard: 1,
                counters: Box::new(counters),
            });
        }
        assert_eq!(shard.all_stats[1].bytes_sent, 7);
        // A shard index out of range is ignored, not a panic.
        shard.handle_control(ShardMsg::Stats {
            shard: 9,
            counters: Box::default(),
        });
    }

    /// `n` QoS 0 messages to `topic`, payloads `first..first + n`.
    fn burst(topic: &str, first: usize, n: usize) -> Arc<Vec<Message>> {
        let message = |i: usize| {
            Message::new(
                ByteString::from(topic),
                Bytes::from(i.to_string()),
                QoS::AtMostOnce,
                false,
            )
        };
        Arc::new((first..first + n).map(message).collect())
    }

    /// Shard 0 queues `msgs` for shard 1 before shard 1's [`receive_from`]
    /// starts; returns what shard 1's subscriber to `t` read, one record
    /// per write (its socket is a SOCK_SEQPACKET one), once it has the
    /// five messages of the bursts (or after 5 s).
    fn writes_to_a_subscriber_on_shard_1(msgs: Vec<ShardMsg>) -> Vec<Vec<u8>> {
        let mesh = MeshBuilder::<ShardMsg, _>::full(2, 8);
        let (queued_tx, queued_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let sender_mesh = mesh.clone();
        let sender = glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let (senders, _receivers) = sender_mesh.join().await.expect("joined");
                for msg in msgs {
                    senders.send_to(1, msg).await.expect("queued");
                }
                queued_tx.send(()).expect("told");
                // The channel stays open until shard 1 has read.
                while done_rx.try_recv().is_err() {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
            })
            .expect("shard 0");
        let receiver = glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let (senders, receivers) = mesh.join().await.expect("joined");
                let (poller, _from_watcher) = Poller::start(1, None).expect("poller");
                let ctx = Ctx {
                    shard: Rc::new(RefCell::new(testing::shard_with(1, 2, Config::default()))),
                    mesh: Rc::new(senders),
                    id: 1,
                    nr_shards: 2,
                    poller: Rc::new(poller),
                };
                let (ours, peer) = fd::seqpacket_pair().expect("socket pair");
                let peer = UnixStream::from(peer);
                peer.set_nonblocking(true).expect("non-blocking");
                {
                    let mut shard = ctx.shard.borrow_mut();
                    let link = Link::new(shard.new_conn_id(), ours.as_raw_fd(), 0, 0);
                    testing::attach_with_link(&mut shard, "sub", link, "t", QoS::AtMostOnce);
                    shard.flush_dirty();
                }
                let mut record = [0u8; 4096];
                let suback = (&peer).read(&mut record).expect("the SUBACK");
                assert_eq!(record[0] >> 4, 9, "a SUBACK, {suback} bytes");
                queued_rx.recv().expect("all queued");
                let _task = glommio::spawn_local(receive_from(ctx.clone(), 0, Rc::new(receivers)));
                let mut writes: Vec<Vec<u8>> = Vec::new();
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while publishes(&writes).len() < 5 && std::time::Instant::now() < deadline {
                    match (&peer).read(&mut record) {
                        Ok(n) => writes.push(record[..n].to_vec()),
                        Err(_) => glommio::timer::sleep(Duration::from_millis(1)).await,
                    }
                }
                done_tx.send(()).expect("told");
                writes
            })
            .expect("shard 1");
        sender.join().expect("shard 0 ran");
        receiver.join().expect("shard 1 ran")
    }

    /// The payloads of the PUBLISH packets in `writes`, in order.
    fn publishes(writes: &[Vec<u8>]) -> Vec<String> {
        let mut bytes = BytesMut::from(&writes.concat()[..]);
        let mut payloads = Vec::new();
        while let Ok(Some(Packet::Publish(p))) = codec::decode(&mut bytes, usize::MAX) {
            payloads.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
        payloads
    }

    #[test]
    fn publish_batches_queued_behind_one_another_reach_a_subscriber_in_one_write() {
        let stats = || ShardMsg::Stats {
            shard: 0,
            counters: Box::default(),
        };
        // Two batches, then nothing (the flush when the channel is empty),
        // or then a control message (the flush before it is handled).
        for then_control in [false, true] {
            let mut msgs = vec![
                ShardMsg::Publish(burst("t", 0, 3), (0, 1), None),
                ShardMsg::Publish(burst("t", 3, 2), (0, 4), None),
            ];
            if then_control {
                msgs.push(stats());
            }
            let writes = writes_to_a_subscriber_on_shard_1(msgs);
            assert_eq!(
                publishes(&writes),
                ["0", "1", "2", "3", "4"],
                "all, in order"
            );
            assert_eq!(
                writes.len(),
                1,
                "one write for both batches ({then_control})"
            );
        }
    }
}
