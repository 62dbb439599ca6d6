//! The shard's side of the NATS bridge (cluster module, docs/design/cluster.md):
//! handing this shard's publishes to the bridge, and routing what other
//! nodes published.
//!
//! A message from another node is routed with the filter whose NATS
//! subscription carried it: NATS sends one copy per matching subscription
//! of the node, so a session takes a message only through the smallest
//! (byte order) of its own filters that match the topic, at the highest
//! QoS granted among them; one copy, as for a local publish. Messages on
//! the escaped subject (no filter) are matched in full. Either way they go
//! through the route, never the publish: they are never handed on again.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::cluster::link::ToShard;
use crate::protocol::message::{Encoded, Message};
use crate::protocol::topic;
use crate::protocol::v3::QoS;
use crate::session::link::{CloseReason, TICKS_PER_SEC};
use crate::shard::{Ctx, Shard, offer, read_allowed};

impl Ctx {
    /// Hands this step's publishes to the bridge, waiting at most the
    /// cluster's `stall` for room (a full queue pushes back on the
    /// publisher like a full mesh channel); then the batch is dropped for
    /// the cluster only and counted.
    pub(crate) async fn forward_to_cluster(&self, batch: Arc<Vec<Message>>) {
        let Some((queue, stall)) = self
            .shard
            .borrow()
            .cluster
            .as_ref()
            .map(|c| (c.ends.publish.clone(), c.stall))
        else {
            return;
        };
        let n = batch.len() as u64;
        let sent = match queue.try_send(batch) {
            Ok(()) => true,
            Err(async_channel::TrySendError::Full(batch)) => {
                glommio::timer::timeout(stall, async { Ok(queue.send(batch).await.is_ok()) })
                    .await
                    .unwrap_or(false)
            }
            Err(async_channel::TrySendError::Closed(_)) => false,
        };
        let mut shard = self.shard.borrow_mut();
        if sent {
            shard.stats.cluster_sent += n;
        } else {
            shard.stats.cluster_send_dropped += n;
        }
    }
}

/// Messages from the bridge handled in one turn before the subscribers'
/// sockets are written: what waited in the queue while the shard was busy
/// goes out in one write per subscriber (as a local burst read in one
/// piece does), not one write per NATS message; the bound keeps one turn
/// short (the mesh and the connections are served between turns).
const DRAIN_PER_TURN: usize = 64;

/// Receives what the bridge sends this shard until the bridge ends.
pub async fn receive_from_bridge(ctx: Ctx, from_bridge: async_channel::Receiver<ToShard>) {
    while let Ok(first) = from_bridge.recv().await {
        {
            let mut shard = ctx.shard.borrow_mut();
            let mut next = Some(first);
            let mut handled = 0;
            while let Some(msg) = next.take() {
                match msg {
                    ToShard::Deliver(batch) => {
                        shard.stats.cluster_received += batch.len() as u64;
                        for (filter, message) in &batch {
                            shard.route_from_cluster(filter.as_deref(), message);
                        }
                    }
                    ToShard::Retained(message) => shard.retained.apply(&message),
                    ToShard::TakenOver(client_id, at) => {
                        // What was routed to the connection goes out first.
                        shard.flush_dirty();
                        shard.taken_over_elsewhere(&client_id, at);
                    }
                }
                handled += 1;
                if handled < DRAIN_PER_TURN {
                    next = from_bridge.try_recv().ok();
                }
            }
            shard.flush_dirty();
        }
        glommio::yield_if_needed().await;
    }
    log::debug!("shard {}: cluster bridge queue closed", ctx.id);
}

impl Shard {
    /// `client_id` connected on another node at Unix time `at_ms`: its
    /// connection here closes (as a take-over) if it is older, and its
    /// session goes, persistent or not: the state does not move across
    /// nodes yet, and two nodes must not both queue for it. A connection
    /// that may be later (an announcement overtaken by the client's next
    /// connect) stays: the connect time here is known to a keep-alive tick
    /// (100 ms), so two connects within a tick both stay; and the hosts'
    /// clocks must agree to better than the time between two connects.
    pub fn taken_over_elsewhere(&mut self, client_id: &str, at_ms: u64) {
        let Some(key) = self.session_key(client_id) else {
            return;
        };
        let tick_ms = u64::from(1000 / TICKS_PER_SEC);
        if let Some(link) = self
            .sessions
            .get(key as usize)
            .and_then(|s| s.link.as_ref())
        {
            let age_ms = u64::from(self.now_ticks().saturating_sub(link.connected_at)) * tick_ms;
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            // The latest this connection can have been made.
            if now_ms.saturating_sub(age_ms) >= at_ms {
                return;
            }
        }
        let Some(session) = self.remove_session(key) else {
            return;
        };
        if let Some(mut link) = session.link {
            log::debug!("client {client_id} connected to another node: connection closed");
            link.close(CloseReason::TakenOver);
        }
        self.release(&session.client_id, session.claim);
        self.stats.cluster_taken_over += 1;
    }

    /// Delivers a message from another node to this shard's subscribers of
    /// `filter` (`None`: every matching subscriber); never stored as
    /// retained (the bucket's watch does that) and never handed on.
    pub fn route_from_cluster(&mut self, filter: Option<&str>, message: &Message) {
        let Some(filter) = filter else {
            let unretained = Message {
                retain: false,
                ..message.clone()
            };
            // The escaped subject's messages: one copy each, matched here.
            // The RETAIN flag is cleared, so that the route does not store
            // it (Retain As Published sees 0 on this rare path).
            self.route(&unretained);
            return;
        };
        let Shard {
            router,
            sessions,
            stats,
            limits,
            batch,
            auth,
            ..
        } = self;
        let mut dirty = Vec::new();
        let mut encoded = Encoded::new(message, batch);
        // The ACL's read rules apply as for a local publish.
        let mut reads = None;
        router.for_each_subscriber(filter, |key, _| {
            let Some(session) = sessions.get_mut(key as usize) else {
                return;
            };
            // One copy per session: through its smallest matching filter.
            let mut smallest: Option<&str> = None;
            let mut granted = QoS::AtMostOnce;
            for (own, qos) in &session.state.subscriptions {
                if topic::filter_matches(own, &message.topic) {
                    if smallest.is_none_or(|s| own.as_ref() < s) {
                        smallest = Some(own.as_ref());
                    }
                    granted = granted.max(*qos);
                }
            }
            if smallest != Some(filter)
                || !read_allowed(session, &mut reads, auth, &message.topic, stats)
            {
                return;
            }
            if offer(session, &mut encoded, key, granted, limits, stats) {
                dirty.push(key);
            }
        });
        for key in dirty {
            self.mark_dirty(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::shard::testing::{self, attach_client};

    /// A message on `topic`.
    fn message(topic: &str, payload: &'static [u8]) -> Message {
        Message::new(
            topic.into(),
            Bytes::from_static(payload),
            QoS::AtLeastOnce,
            false,
        )
    }

    #[test]
    fn a_session_takes_a_message_once_through_its_smallest_matching_filter() {
        let mut shard = testing::shard();
        let mut both = attach_client(&mut shard, "both", "a/#", QoS::AtMostOnce, None);
        shard.subscribe(
            both.key,
            crate::protocol::v3::Subscribe {
                packet_id: 2,
                filters: vec![("a/+".into(), QoS::AtLeastOnce)],
            },
            None,
        );
        let mut plain = attach_client(&mut shard, "plain", "a/b", QoS::AtMostOnce, None);
        shard.flush_dirty();
        let _ = both.publishes();
        // NATS sends one copy per subscription of the node: `a/#`, `a/+`, `a/b`.
        let m = message("a/b", b"x");
        for filter in ["a/#", "a/+", "a/b"] {
            shard.route_from_cluster(Some(filter), &m);
        }
        shard.flush_dirty();
        let got = both.publishes();
        assert_eq!(got.len(), 1, "one copy for the session with two filters");
        assert_eq!(got[0].2, QoS::AtLeastOnce, "the highest QoS granted");
        assert_eq!(plain.publishes().len(), 1);
        assert!(shard.take_remote_batch().is_none(), "never handed on");
    }

    #[test]
    fn a_connect_elsewhere_ends_an_older_connection_here_but_not_a_newer_one() {
        let mut shard = testing::shard();
        let client = attach_client(&mut shard, "x", "t", QoS::AtMostOnce, None);
        // Announced as made before this connection: stays.
        shard.taken_over_elsewhere("x", 0);
        assert!(shard.session_key("x").is_some());
        // Made later (a second from now): this one closes and goes.
        let later = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64 + 1000)
            .unwrap();
        shard.taken_over_elsewhere("x", later);
        assert!(shard.session_key("x").is_none());
        assert!(shard.sessions.get(client.key as usize).is_none());
        assert_eq!(shard.stats.cluster_taken_over, 1);
        shard.taken_over_elsewhere("unknown", later);
        assert_eq!(shard.stats.cluster_taken_over, 1);
    }

    #[test]
    fn an_escaped_message_is_matched_in_full_and_never_stored_as_retained() {
        let mut shard = testing::shard();
        let mut sub = attach_client(&mut shard, "s", "#", QoS::AtMostOnce, None);
        shard.flush_dirty();
        let m = Message {
            retain: true,
            ..message("a b", b"y")
        };
        shard.route_from_cluster(None, &m);
        shard.flush_dirty();
        assert_eq!(sub.publishes().len(), 1);
        assert_eq!(shard.retained.len(), 0);
    }
}
