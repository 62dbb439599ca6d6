//! Per-shard counters and the `$SYS/broker/...` topics (Mosquitto's names).
//!
//! Each shard counts in its own [`Counters`] (no atomics on the hot path).
//! Every `sys_interval` each shard sends a snapshot to shard 0, which sums the
//! latest snapshot of every shard and publishes the totals as retained QoS 0
//! messages, so a client subscribing to `$SYS/#` gets them at once.

use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;

use crate::codec::QoS;
use crate::mesh::{self, ShardMsg};
use crate::message::Message;
use crate::shard::{Ctx, Shard};

/// Counters and gauges of one shard (or, summed, of the broker).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Live client connections (gauge, set when a snapshot is taken).
    pub clients_connected: u64,
    /// Sessions, live or parked (gauge).
    pub clients_total: u64,
    /// Subscriptions (gauge).
    pub subscriptions: u64,
    /// Retained messages held (gauge; every shard has a full replica, so the
    /// sum uses shard 0's).
    pub retained: u64,
    /// TCP connections accepted.
    pub connections_accepted: u64,
    /// Connections closed at once because `max_connections` was reached.
    pub connections_refused: u64,
    /// Accept calls that failed (e.g. out of file descriptors).
    pub accept_errors: u64,
    /// MQTT packets received.
    pub messages_received: u64,
    /// PUBLISH packets received.
    pub publish_received: u64,
    /// PUBLISH packets queued to subscribers, by the QoS they are sent at
    /// (0, 1, 2): the same one add per delivery as a single counter, indexed
    /// by the delivered QoS. [`Counters::publish_sent`] is their sum.
    pub publish_sent_by_qos: [u64; 3],
    /// PUBLISH packets dropped (queue full, `$SYS` publish, QoS 2 overflow).
    pub publish_dropped: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Connections closed for malformed packets or protocol violations.
    pub protocol_errors: u64,
    /// Connections closed right after accept: their address already had
    /// `max_connections_per_ip`.
    pub connections_ip_limited: u64,
    /// Connections closed right after accept: the listener was over
    /// `max_connection_rate`.
    pub connections_rate_limited: u64,
    /// SUBSCRIBE filters refused (0x80) by `max_subscriptions_per_client`
    /// or `max_topic_levels`.
    pub subscriptions_refused: u64,
    /// Clients disconnected because their shard was over its share of
    /// `max_queued_bytes_total` and they were not reading.
    pub clients_shed: u64,
    /// Bytes queued to clients (gauge, per-client count; see
    /// `max_queued_bytes_total`).
    pub queued_bytes: u64,
    /// CONNECTs refused with CONNACK 1, 2 or 3 (protocol version, client
    /// identifier, server unavailable).
    pub connect_refused: u64,
    /// CONNECTs refused by authentication (CONNACK 5: anonymous refused,
    /// unknown user, wrong password).
    pub auth_failed: u64,
    /// PUBLISH packets (and wills) dropped because the ACL denies them.
    pub publish_denied: u64,
    /// Topic filters refused in SUBACK because the ACL denies them.
    pub subscribe_denied: u64,
    /// Of `publish_dropped`: publishes to `$SYS` topics by clients.
    pub dropped_sys_topic: u64,
    /// Of `publish_dropped`: QoS 2 publishes over `max_awaiting_rel`.
    pub dropped_qos2_overflow: u64,
    /// PUBLISH packets received, by QoS (counted per publish received, not
    /// per delivery).
    pub publish_received_by_qos: [u64; 3],
    /// Connected clients by listener kind (gauge kept by the connection
    /// tasks: +1 after CONNECT, -1 when the connection ends).
    pub clients_by_listener: [u64; crate::metrics::NR_LISTENER_KINDS],
    /// TCP connections accepted, by listener kind.
    pub accepted_by_listener: [u64; crate::metrics::NR_LISTENER_KINDS],
}

impl Counters {
    /// PUBLISH packets queued to subscribers, every QoS.
    pub fn publish_sent(&self) -> u64 {
        self.publish_sent_by_qos.iter().sum()
    }

    /// Adds another shard's counters (gauges too; see `retained`).
    pub fn add(&mut self, other: &Counters) {
        self.clients_connected += other.clients_connected;
        self.clients_total += other.clients_total;
        self.subscriptions += other.subscriptions;
        self.connections_accepted += other.connections_accepted;
        self.connections_refused += other.connections_refused;
        self.accept_errors += other.accept_errors;
        self.messages_received += other.messages_received;
        self.publish_received += other.publish_received;
        self.publish_dropped += other.publish_dropped;
        self.bytes_received += other.bytes_received;
        self.bytes_sent += other.bytes_sent;
        self.protocol_errors += other.protocol_errors;
        self.connections_ip_limited += other.connections_ip_limited;
        self.connections_rate_limited += other.connections_rate_limited;
        self.subscriptions_refused += other.subscriptions_refused;
        self.clients_shed += other.clients_shed;
        self.queued_bytes += other.queued_bytes;
        self.auth_failed += other.auth_failed;
        self.connect_refused += other.connect_refused;
        self.publish_denied += other.publish_denied;
        self.subscribe_denied += other.subscribe_denied;
        self.dropped_sys_topic += other.dropped_sys_topic;
        self.dropped_qos2_overflow += other.dropped_qos2_overflow;
        add_all(
            &mut self.publish_received_by_qos,
            &other.publish_received_by_qos,
        );
        add_all(&mut self.publish_sent_by_qos, &other.publish_sent_by_qos);
        add_all(&mut self.clients_by_listener, &other.clients_by_listener);
        add_all(&mut self.accepted_by_listener, &other.accepted_by_listener);
    }
}

/// Adds `other` to `sum` element-wise (per-QoS and per-listener counters).
pub(crate) fn add_all<const N: usize>(sum: &mut [u64; N], other: &[u64; N]) {
    for (s, o) in sum.iter_mut().zip(other) {
        *s += o;
    }
}

impl Shard {
    /// This shard's counters with the gauges filled in.
    pub fn snapshot(&self) -> Counters {
        let mut c = self.stats;
        c.clients_connected = self.connected() as u64;
        c.clients_total = self.sessions.len() as u64;
        c.subscriptions = self.router.len() as u64;
        c.retained = self.retained.len() as u64;
        c.queued_bytes = crate::outqueue::shard_queued_bytes() as u64;
        c
    }
}

/// The `$SYS` topics and values for broker-wide totals.
pub fn sys_messages(total: &Counters, uptime: Duration) -> Vec<(&'static str, String)> {
    vec![
        (
            "$SYS/broker/version",
            format!("fanmq {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "$SYS/broker/uptime",
            format!("{} seconds", uptime.as_secs()),
        ),
        (
            "$SYS/broker/clients/connected",
            total.clients_connected.to_string(),
        ),
        ("$SYS/broker/clients/total", total.clients_total.to_string()),
        (
            "$SYS/broker/clients/disconnected",
            total
                .clients_total
                .saturating_sub(total.clients_connected)
                .to_string(),
        ),
        (
            "$SYS/broker/subscriptions/count",
            total.subscriptions.to_string(),
        ),
        (
            "$SYS/broker/retained messages/count",
            total.retained.to_string(),
        ),
        (
            "$SYS/broker/messages/received",
            total.messages_received.to_string(),
        ),
        (
            "$SYS/broker/publish/messages/received",
            total.publish_received.to_string(),
        ),
        (
            "$SYS/broker/publish/messages/sent",
            total.publish_sent().to_string(),
        ),
        (
            "$SYS/broker/publish/messages/dropped",
            total.publish_dropped.to_string(),
        ),
        (
            "$SYS/broker/bytes/received",
            total.bytes_received.to_string(),
        ),
        ("$SYS/broker/bytes/sent", total.bytes_sent.to_string()),
        (
            "$SYS/broker/connections/refused",
            total.connections_refused.to_string(),
        ),
        (
            "$SYS/broker/connections/refused/per_ip",
            total.connections_ip_limited.to_string(),
        ),
        (
            "$SYS/broker/connections/refused/rate",
            total.connections_rate_limited.to_string(),
        ),
        (
            "$SYS/broker/subscriptions/refused",
            total.subscriptions_refused.to_string(),
        ),
        ("$SYS/broker/clients/shed", total.clients_shed.to_string()),
        ("$SYS/broker/queued/bytes", total.queued_bytes.to_string()),
        (
            "$SYS/broker/clients/auth_failed",
            total.auth_failed.to_string(),
        ),
        (
            "$SYS/broker/publish/messages/denied",
            total.publish_denied.to_string(),
        ),
        (
            "$SYS/broker/subscriptions/denied",
            total.subscribe_denied.to_string(),
        ),
    ]
}

/// Every `interval`: send this shard's snapshot to shard 0; on shard 0, sum
/// and publish the `$SYS` topics.
pub async fn sys_task(ctx: Ctx, interval: Duration) {
    loop {
        glommio::timer::sleep(interval).await;
        if !publish_sys(&ctx) {
            return;
        }
        ctx.forward_publishes().await;
    }
}

/// One `$SYS` round (see [`sys_task`]); false once the shard shuts down.
fn publish_sys(ctx: &Ctx) -> bool {
    let mut shard = ctx.shard.borrow_mut();
    if shard.shutting_down {
        return false;
    }
    let snapshot = shard.snapshot();
    if shard.id != 0 {
        let id = shard.id;
        drop(shard);
        mesh::send_detached(
            &ctx.mesh,
            0,
            ShardMsg::Stats {
                shard: id,
                counters: Box::new(snapshot),
            },
        );
        return true;
    }
    shard.all_stats[0] = snapshot;
    let mut total = Counters::default();
    for c in &shard.all_stats {
        total.add(c);
    }
    total.retained = snapshot.retained;
    let uptime = shard.started.elapsed();
    for (topic, value) in sys_messages(&total, uptime) {
        shard.publish(Message {
            topic: ByteString::from_static(topic),
            payload: Bytes::from(value),
            qos: QoS::AtMostOnce,
            retain: true,
            retain_stamp: 0,
        });
    }
    shard.flush_dirty();
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_and_topics_use_mosquitto_names() {
        let a = Counters {
            clients_connected: 2,
            clients_total: 3,
            bytes_sent: 10,
            ..Counters::default()
        };
        let mut total = Counters::default();
        total.add(&a);
        total.add(&a);
        assert_eq!(total.clients_connected, 4);
        assert_eq!(total.bytes_sent, 20);
        let msgs = sys_messages(&total, Duration::from_secs(5));
        let get = |t: &str| msgs.iter().find(|(k, _)| *k == t).map(|(_, v)| v.clone());
        assert_eq!(get("$SYS/broker/clients/connected").as_deref(), Some("4"));
        assert_eq!(
            get("$SYS/broker/clients/disconnected").as_deref(),
            Some("2")
        );
        assert_eq!(get("$SYS/broker/uptime").as_deref(), Some("5 seconds"));
    }
}
