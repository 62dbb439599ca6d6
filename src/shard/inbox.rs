//! The shard's side of the mesh: what it does with each [`ShardMsg`] another
//! shard sends it.

use std::rc::Rc;

use glommio::channels::channel_mesh::Receivers;
use log::debug;

use crate::mesh::ShardMsg;
use crate::shard::{Ctx, Shard};

/// Receives everything `peer` sends to this shard until the mesh closes.
pub async fn receive_from(ctx: Ctx, peer: usize, receivers: Rc<Receivers<ShardMsg>>) {
    while let Ok(Some(msg)) = receivers.recv_from(peer).await {
        match msg {
            ShardMsg::Publish(batch) => {
                {
                    let mut shard = ctx.shard.borrow_mut();
                    for message in batch.iter() {
                        shard.route(message);
                    }
                    shard.flush_dirty();
                }
                glommio::yield_if_needed().await;
            }
            other => {
                ctx.shard.borrow_mut().handle_control(other);
                ctx.send_outbox();
            }
        }
    }
    debug!("mesh channel from shard {peer} closed");
}

impl Shard {
    /// A control message from another shard.
    pub fn handle_control(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Publish(batch) => {
                for message in batch.iter() {
                    self.route(message);
                }
                self.flush_dirty();
            }
            ShardMsg::Claim {
                client_id,
                new_shard,
                token,
                clean_session,
            } => self.home_claim(client_id, new_shard, token, clean_session),
            ShardMsg::Evict {
                client_id,
                to_shard,
                token,
                clean_session,
            } => self.evict(&client_id, to_shard, token, clean_session),
            ShardMsg::Claimed { token, state } => self.claim_answered(token, state.map(|s| *s)),
            ShardMsg::Release { client_id, shard } => self.home_release(&client_id, shard),
            ShardMsg::Stats { shard, counters } => {
                if let Some(slot) = self.all_stats.get_mut(shard) {
                    *slot = *counters;
                }
            }
        }
    }
}
