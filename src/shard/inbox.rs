//! The shard's side of the mesh: what it does with each [`ShardMsg`] another
//! shard sends it.

use std::rc::Rc;

use glommio::channels::channel_mesh::Receivers;
use log::debug;

use crate::mesh::{self, ShardMsg};
use crate::shard::{Ctx, Shard};
use crate::store::journal::Journal;

/// Receives everything `peer` sends to this shard until the mesh closes.
pub async fn receive_from(ctx: Ctx, peer: usize, receivers: Rc<Receivers<ShardMsg>>) {
    while let Ok(Some(msg)) = receivers.recv_from(peer).await {
        match msg {
            ShardMsg::Publish(batch, applied) => {
                let unsynced = {
                    let mut shard = ctx.shard.borrow_mut();
                    shard.route_batch(&batch);
                    shard.flush_dirty();
                    shard.unsynced_journals()
                };
                if let Some((shard, token)) = applied {
                    // With persistence, a shard answers once its journals
                    // hold what the batch made it write (the publisher's
                    // PUBACK waits for that), without holding up the mesh.
                    answer_when_durable(&ctx, unsynced, vec![(shard, ShardMsg::Applied { token })]);
                }
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
            ShardMsg::Publish(batch, applied) => {
                self.route_batch(&batch);
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
            ShardMsg::Claimed { token, state } => self.claim_answered(token, state.map(|s| *s)),
            ShardMsg::Release {
                client_id,
                shard,
                token,
            } => self.home_release(&client_id, shard, token),
            ShardMsg::SharedMember(update) => self.shared_member_update(update),
            ShardMsg::SharedPublish(deliveries) => self.deliver_shared(deliveries),
            ShardMsg::SharedDurable { token, count } => self.held_acks.applied_many(token, count),
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
    use std::sync::Arc;

    use bytes::Bytes;
    use bytestring::ByteString;

    use super::*;
    use crate::config::Config;
    use crate::observe::counters::Counters;
    use crate::protocol::message::Message;
    use crate::protocol::v3::QoS;
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
        shard.handle_control(ShardMsg::Publish(batch, None));
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
}
