//! Broker figures for the admin HTTP listener: per-shard atomics, summed on
//! read, rendered as Prometheus text or JSON.
//!
//! Shards count in their own plain [`Counters`] (no atomics on the data
//! path). Every keep-alive sweep (see
//! [`crate::connection::keep_alive_sweeper`], every
//! [`REFRESH_PERIOD`]) a shard copies its counters, plus the queue totals the
//! sweep gathered while it walked its sessions anyway, into its own
//! [`ShardGauges`] with relaxed stores. The HTTP thread only loads those
//! atomics and sums them: scraping never blocks or slows a shard, and figures
//! are at most one sweep period old.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::session::Session;
use crate::shard::Shard;
use crate::sys::{Counters, add_all};

/// How stale the figures may be: the keep-alive sweep period, which is when
/// shards refresh their [`ShardGauges`].
pub const REFRESH_PERIOD: Duration = crate::broker::KEEP_ALIVE_SWEEP;

/// A shard whose gauges were not refreshed for this long is reported as not
/// ready by `/health` (it is stuck or gone).
pub const HEALTH_STALE_AFTER: Duration = Duration::from_secs(5);

/// The kinds of client listener, the `listener` label of the connection
/// metrics. Adding a transport is one variant here plus one entry in
/// [`LISTENER_KINDS`] and [`ListenerKind::label`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ListenerKind {
    /// Plain MQTT over TCP.
    Mqtt = 0,
    /// MQTT over TLS.
    Tls = 1,
    /// MQTT over WebSocket.
    Ws = 2,
    /// MQTT over WebSocket over TLS.
    Wss = 3,
}

/// Number of listener kinds (the length of the per-listener arrays).
pub const NR_LISTENER_KINDS: usize = 4;

/// Every listener kind, in label order.
pub const LISTENER_KINDS: [ListenerKind; NR_LISTENER_KINDS] = [
    ListenerKind::Mqtt,
    ListenerKind::Tls,
    ListenerKind::Ws,
    ListenerKind::Wss,
];

impl ListenerKind {
    /// The Prometheus / JSON label value (the transport's name in the
    /// config keys and the start-up line).
    pub fn label(self) -> &'static str {
        match self {
            ListenerKind::Mqtt => "mqtt",
            ListenerKind::Tls => "tls",
            ListenerKind::Ws => "ws",
            ListenerKind::Wss => "wss",
        }
    }

    /// Index into the per-listener arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Declares [`Figures`] (plain numbers, one shard's or the sum) and its
/// atomic mirror [`ShardGauges`] from one list of scalar fields.
macro_rules! figures {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// One shard's figures, or the broker's once summed.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
        pub struct Figures {
            $($(#[$doc])* pub $name: u64,)*
            /// Connected clients by listener kind (gauge).
            pub clients_by_listener: [u64; NR_LISTENER_KINDS],
            /// Connections accepted by listener kind.
            pub accepted_by_listener: [u64; NR_LISTENER_KINDS],
            /// PUBLISH packets received by QoS (0, 1, 2).
            pub publish_received_by_qos: [u64; 3],
            /// Deliveries by the QoS they are sent at (0, 1, 2).
            pub publish_sent_by_qos: [u64; 3],
        }

        /// One shard's figures as atomics: written by the shard (relaxed
        /// stores, every [`REFRESH_PERIOD`]), read by the HTTP thread.
        #[derive(Debug, Default)]
        pub struct ShardGauges {
            $($name: AtomicU64,)*
            /// See [`Figures::clients_by_listener`].
            clients_by_listener: [AtomicU64; NR_LISTENER_KINDS],
            /// See [`Figures::accepted_by_listener`].
            accepted_by_listener: [AtomicU64; NR_LISTENER_KINDS],
            /// See [`Figures::publish_received_by_qos`].
            publish_received_by_qos: [AtomicU64; 3],
            /// See [`Figures::publish_sent_by_qos`].
            publish_sent_by_qos: [AtomicU64; 3],
            /// Milliseconds since the broker started at the last refresh
            /// (`/health`: a shard that stops refreshing is stuck).
            heartbeat_ms: AtomicU64,
            /// True while the shard accepts connections.
            accepting: AtomicBool,
        }

        impl ShardGauges {
            /// Stores a shard's figures.
            fn store(&self, f: &Figures) {
                $(self.$name.store(f.$name, Ordering::Relaxed);)*
                store_all(&self.clients_by_listener, &f.clients_by_listener);
                store_all(&self.accepted_by_listener, &f.accepted_by_listener);
                store_all(&self.publish_received_by_qos, &f.publish_received_by_qos);
                store_all(&self.publish_sent_by_qos, &f.publish_sent_by_qos);
            }

            /// Loads the figures last stored.
            pub fn load(&self) -> Figures {
                Figures {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                    clients_by_listener: load_all(&self.clients_by_listener),
                    accepted_by_listener: load_all(&self.accepted_by_listener),
                    publish_received_by_qos: load_all(&self.publish_received_by_qos),
                    publish_sent_by_qos: load_all(&self.publish_sent_by_qos),
                }
            }
        }

        impl Figures {
            /// Adds another shard's figures (`retained` is a replica on
            /// every shard: the largest is kept, not the sum).
            pub fn add(&mut self, other: &Figures) {
                let retained = self.retained.max(other.retained);
                $(self.$name += other.$name;)*
                self.retained = retained;
                add_all(&mut self.clients_by_listener, &other.clients_by_listener);
                add_all(&mut self.accepted_by_listener, &other.accepted_by_listener);
                add_all(&mut self.publish_received_by_qos, &other.publish_received_by_qos);
                add_all(&mut self.publish_sent_by_qos, &other.publish_sent_by_qos);
            }
        }
    };
}

figures! {
    /// Live client connections (sessions with a connection).
    clients_connected,
    /// Of those: connections parked, with no task ([`crate::park`]).
    clients_parked,
    /// Sessions, live or parked.
    sessions,
    /// Subscriptions.
    subscriptions,
    /// Retained messages (each shard holds a full replica).
    retained,
    /// PUBLISH packets queued for live clients, not yet written.
    queued_messages,
    /// Bytes queued for live clients, not yet written.
    queued_bytes,
    /// The largest queue of one client on the shard, in bytes: a slow
    /// subscriber shows here first.
    max_client_queue_bytes,
    /// QoS 1/2 messages waiting for a free slot in an inflight window.
    pending_messages,
    /// TCP connections accepted.
    connections_accepted,
    /// Connections closed at once because `max_connections` was reached.
    connections_refused,
    /// Accept calls that failed.
    accept_errors,
    /// MQTT packets received.
    messages_received,
    /// PUBLISH packets received.
    publish_received,
    /// PUBLISH packets queued to subscribers (deliveries).
    publish_sent,
    /// PUBLISH packets dropped, every reason.
    publish_dropped,
    /// Of those: publishes to `$SYS` topics by clients.
    dropped_sys_topic,
    /// Of those: QoS 2 publishes over `max_awaiting_rel`.
    dropped_qos2_overflow,
    /// Bytes received.
    bytes_received,
    /// Bytes sent.
    bytes_sent,
    /// Connections closed for malformed packets or protocol violations.
    protocol_errors,
    /// CONNECTs refused by authentication (`password_file`, anonymous).
    auth_failed,
    /// CONNECTs refused with CONNACK 1, 2 or 3.
    connect_refused,
    /// Log lines about clients left out by the rate limit
    /// ([`crate::log_limit`]).
    log_lines_suppressed,
    /// PUBLISH packets from clients the ACL denied (acknowledged, dropped).
    publish_denied,
    /// Subscription filters the ACL denied (SUBACK 0x80).
    subscribe_denied,
    /// Connections closed after accept: `max_connections_per_ip` reached.
    connections_ip_limited,
    /// Connections closed after accept: `max_connection_rate` reached.
    connections_rate_limited,
    /// Filters refused by `max_subscriptions_per_client` or
    /// `max_topic_levels` (SUBACK 0x80).
    subscriptions_refused,
    /// Clients disconnected for not reading while their shard was over its
    /// share of `max_queued_bytes_total`.
    clients_shed,
}

/// Stores every value of `values` into `slots`.
fn store_all<const N: usize>(slots: &[AtomicU64; N], values: &[u64; N]) {
    for (slot, v) in slots.iter().zip(values) {
        slot.store(*v, Ordering::Relaxed);
    }
}

/// Loads every slot.
fn load_all<const N: usize>(slots: &[AtomicU64; N]) -> [u64; N] {
    std::array::from_fn(|i| slots[i].load(Ordering::Relaxed))
}

impl Figures {
    /// Publishes dropped because a client's queue was full (every drop that
    /// is not counted under another reason).
    pub fn dropped_queue_full(&self) -> u64 {
        self.publish_dropped
            .saturating_sub(self.dropped_sys_topic)
            .saturating_sub(self.dropped_qos2_overflow)
    }
}

/// What a shard's periodic pass over its sessions gathers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionTotals {
    /// Sessions with a live connection.
    pub connected: u64,
    /// Of those: connections parked ([`crate::park`]).
    pub parked: u64,
    /// PUBLISH packets queued for live clients.
    pub queued_messages: u64,
    /// Bytes queued for live clients.
    pub queued_bytes: u64,
    /// The largest single queue, in bytes.
    pub max_queue_bytes: u64,
    /// QoS 1/2 messages waiting for a slot in an inflight window.
    pending_messages: u64,
}

impl SessionTotals {
    /// Counts one session.
    pub fn count(&mut self, session: &Session) {
        if let Some(link) = &session.link {
            self.connected += 1;
            self.parked += u64::from(link.is_parked());
        }
        let bytes = session.out.bytes() as u64;
        self.queued_messages += session.out.publishes() as u64;
        self.queued_bytes += bytes;
        self.max_queue_bytes = self.max_queue_bytes.max(bytes);
        if let Some(flows) = &session.state.flows {
            self.pending_messages += flows.pending.len() as u64;
        }
    }
}

/// Every shard's gauges, shared by the shards (each writes its own) and the
/// HTTP thread (reads all).
#[derive(Debug)]
pub struct BrokerGauges {
    /// One per shard, by shard index.
    pub shards: Vec<ShardGauges>,
    /// When the broker started (uptime, heartbeats).
    pub started: Instant,
}

impl BrokerGauges {
    /// Gauges for `nr_shards` shards, all zero.
    pub fn new(nr_shards: usize) -> BrokerGauges {
        BrokerGauges {
            shards: (0..nr_shards).map(|_| ShardGauges::default()).collect(),
            started: Instant::now(),
        }
    }

    /// Refreshes shard `shard`'s gauges from its counters and the totals of
    /// its latest pass over its sessions.
    pub fn refresh(&self, shard: &Shard, totals: &SessionTotals) {
        let Some(gauges) = self.shards.get(shard.id) else {
            return;
        };
        gauges.store(&figures_of(&shard.stats, shard, totals));
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        gauges.heartbeat_ms.store(ms, Ordering::Relaxed);
        gauges
            .accepting
            .store(!shard.shutting_down, Ordering::Relaxed);
    }

    /// Every shard's figures, by shard index.
    pub fn per_shard(&self) -> Vec<Figures> {
        self.shards.iter().map(ShardGauges::load).collect()
    }

    /// True when every shard accepts connections and refreshed its gauges
    /// within [`HEALTH_STALE_AFTER`].
    pub fn healthy(&self) -> bool {
        let now = self.started.elapsed();
        self.shards.iter().all(|g| {
            let beat = Duration::from_millis(g.heartbeat_ms.load(Ordering::Relaxed));
            g.accepting.load(Ordering::Relaxed) && now.saturating_sub(beat) < HEALTH_STALE_AFTER
        })
    }

    /// A snapshot of everything, for JSON and Prometheus.
    pub fn stats(&self) -> Stats {
        let shards = self.per_shard();
        let mut total = Figures::default();
        for f in &shards {
            total.add(f);
        }
        Stats {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            timestamp_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            refresh_ms: u64::try_from(REFRESH_PERIOD.as_millis()).unwrap_or(u64::MAX),
            listeners: LISTENER_KINDS.iter().map(|k| k.label()).collect(),
            dropped_queue_full: total.dropped_queue_full(),
            total,
            shards,
        }
    }
}

/// A shard's figures from its counters and its latest session pass.
fn figures_of(stats: &Counters, shard: &Shard, totals: &SessionTotals) -> Figures {
    Figures {
        clients_connected: totals.connected,
        clients_parked: totals.parked,
        sessions: shard.sessions.len() as u64,
        subscriptions: shard.router.len() as u64,
        retained: shard.retained.len() as u64,
        queued_messages: totals.queued_messages,
        queued_bytes: totals.queued_bytes,
        max_client_queue_bytes: totals.max_queue_bytes,
        pending_messages: totals.pending_messages,
        connections_accepted: stats.connections_accepted,
        connections_refused: stats.connections_refused,
        accept_errors: stats.accept_errors,
        messages_received: stats.messages_received,
        publish_received: stats.publish_received,
        publish_sent: stats.publish_sent(),
        publish_dropped: stats.publish_dropped,
        dropped_sys_topic: stats.dropped_sys_topic,
        dropped_qos2_overflow: stats.dropped_qos2_overflow,
        bytes_received: stats.bytes_received,
        bytes_sent: stats.bytes_sent,
        protocol_errors: stats.protocol_errors,
        auth_failed: stats.auth_failed,
        connect_refused: stats.connect_refused,
        // Read on the shard's own thread: the count is per thread.
        log_lines_suppressed: crate::log_limit::suppressed_total(),
        publish_denied: stats.publish_denied,
        subscribe_denied: stats.subscribe_denied,
        connections_ip_limited: stats.connections_ip_limited,
        connections_rate_limited: stats.connections_rate_limited,
        subscriptions_refused: stats.subscriptions_refused,
        clients_shed: stats.clients_shed,
        clients_by_listener: stats.clients_by_listener,
        accepted_by_listener: stats.accepted_by_listener,
        publish_received_by_qos: stats.publish_received_by_qos,
        publish_sent_by_qos: stats.publish_sent_by_qos,
    }
}

/// The broker's figures as `/api/v1/stats` returns them.
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    /// fanmq's version.
    pub version: &'static str,
    /// Seconds since start.
    pub uptime_seconds: f64,
    /// When this snapshot was taken, Unix milliseconds.
    pub timestamp_ms: u64,
    /// How stale the figures may be, in milliseconds.
    pub refresh_ms: u64,
    /// Listener label values, in the order of the per-listener arrays.
    pub listeners: Vec<&'static str>,
    /// Publishes dropped because a client's queue was full.
    pub dropped_queue_full: u64,
    /// Every shard summed.
    pub total: Figures,
    /// Each shard's own figures, by shard index.
    pub shards: Vec<Figures>,
}

/// Label set of a per-shard metric.
type ShardLabel = Vec<(&'static str, String)>;

/// Renders `stats` in the Prometheus text exposition format.
pub fn render_prometheus(stats: &Stats) -> String {
    let mut registry = Registry::with_prefix("fanmq");
    let t = &stats.total;
    registry.register(
        "build",
        "fanmq build information",
        Info::new(vec![("version", stats.version.to_string())]),
    );
    gauge_f(
        &mut registry,
        "uptime_seconds",
        "Seconds since the broker started",
        stats.uptime_seconds,
    );
    let by_listener =
        |registry: &mut Registry, name, help, values: &[u64; NR_LISTENER_KINDS], counter| {
            let labels = LISTENER_KINDS
                .iter()
                .zip(values)
                .map(|(k, v)| (vec![("listener", k.label().to_string())], *v));
            family(registry, name, help, labels, counter);
        };
    by_listener(
        &mut registry,
        "connections",
        "Connected MQTT clients by listener",
        &t.clients_by_listener,
        false,
    );
    by_listener(
        &mut registry,
        "connections_accepted",
        "TCP connections accepted by listener",
        &t.accepted_by_listener,
        true,
    );
    let scalar = |registry: &mut Registry, name, help, v: u64, counter| {
        if counter {
            let c = Counter::<u64>::default();
            c.inc_by(v);
            registry.register(name, help, c);
        } else {
            let g = Gauge::<i64>::default();
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
            registry.register(name, help, g);
        }
    };
    scalar(
        &mut registry,
        "connections_refused",
        "Connections closed at once because max_connections was reached",
        t.connections_refused,
        true,
    );
    scalar(
        &mut registry,
        "accept_errors",
        "Failed accept calls",
        t.accept_errors,
        true,
    );
    scalar(
        &mut registry,
        "sessions",
        "Sessions, live or parked",
        t.sessions,
        false,
    );
    scalar(
        &mut registry,
        "subscriptions",
        "Subscriptions",
        t.subscriptions,
        false,
    );
    scalar(
        &mut registry,
        "retained_messages",
        "Retained messages",
        t.retained,
        false,
    );
    scalar(
        &mut registry,
        "packets_received",
        "MQTT packets received",
        t.messages_received,
        true,
    );
    family(
        &mut registry,
        "messages_received",
        "PUBLISH packets received, by QoS",
        (0..3).map(|q| (vec![("qos", q.to_string())], t.publish_received_by_qos[q])),
        true,
    );
    family(
        &mut registry,
        "messages_delivered",
        "PUBLISH packets queued to subscribers (deliveries), by the QoS sent at",
        (0..3).map(|q| (vec![("qos", q.to_string())], t.publish_sent_by_qos[q])),
        true,
    );
    family(
        &mut registry,
        "messages_dropped",
        "PUBLISH packets dropped, by reason",
        [
            (
                vec![("reason", "queue_full".to_string())],
                t.dropped_queue_full(),
            ),
            (
                vec![("reason", "sys_topic".to_string())],
                t.dropped_sys_topic,
            ),
            (
                vec![("reason", "qos2_overflow".to_string())],
                t.dropped_qos2_overflow,
            ),
        ],
        true,
    );
    scalar(
        &mut registry,
        "bytes_received",
        "Bytes received from clients",
        t.bytes_received,
        true,
    );
    scalar(
        &mut registry,
        "bytes_sent",
        "Bytes sent to clients",
        t.bytes_sent,
        true,
    );
    scalar(
        &mut registry,
        "protocol_errors",
        "Connections closed for malformed packets or protocol violations",
        t.protocol_errors,
        true,
    );
    scalar(
        &mut registry,
        "auth_failures",
        "CONNECTs refused by authentication (CONNACK 5)",
        t.auth_failed,
        true,
    );
    scalar(
        &mut registry,
        "connect_refused",
        "CONNECTs refused with CONNACK 1, 2 or 3 (protocol version, client identifier, server unavailable)",
        t.connect_refused,
        true,
    );
    scalar(
        &mut registry,
        "log_lines_suppressed",
        "Log lines about clients not written: at most one per kind per shard every 10 s",
        t.log_lines_suppressed,
        true,
    );
    scalar(
        &mut registry,
        "publish_denied",
        "PUBLISH packets from clients denied by the ACL (acknowledged, dropped)",
        t.publish_denied,
        true,
    );
    scalar(
        &mut registry,
        "subscribe_denied",
        "Subscription filters denied by the ACL (SUBACK 0x80)",
        t.subscribe_denied,
        true,
    );
    scalar(
        &mut registry,
        "connections_ip_limited",
        "Connections closed after accept because max_connections_per_ip was reached",
        t.connections_ip_limited,
        true,
    );
    scalar(
        &mut registry,
        "connections_rate_limited",
        "Connections closed after accept because max_connection_rate was reached",
        t.connections_rate_limited,
        true,
    );
    scalar(
        &mut registry,
        "subscriptions_refused",
        "Filters refused by max_subscriptions_per_client or max_topic_levels (SUBACK 0x80)",
        t.subscriptions_refused,
        true,
    );
    scalar(
        &mut registry,
        "clients_shed",
        "Non-reading clients disconnected while over max_queued_bytes_total",
        t.clients_shed,
        true,
    );
    let per_shard = |registry: &mut Registry, name, help, get: fn(&Figures) -> u64, counter| {
        let labels = stats
            .shards
            .iter()
            .enumerate()
            .map(|(i, f)| (vec![("shard", i.to_string())], get(f)));
        family(registry, name, help, labels, counter);
    };
    per_shard(
        &mut registry,
        "shard_connections",
        "Connected clients per shard",
        |f| f.clients_connected,
        false,
    );
    per_shard(
        &mut registry,
        "shard_subscriptions",
        "Subscriptions per shard",
        |f| f.subscriptions,
        false,
    );
    per_shard(
        &mut registry,
        "shard_messages_received",
        "PUBLISH packets received per shard",
        |f| f.publish_received,
        true,
    );
    per_shard(
        &mut registry,
        "shard_messages_delivered",
        "Deliveries per shard",
        |f| f.publish_sent,
        true,
    );
    per_shard(
        &mut registry,
        "shard_queued_messages",
        "PUBLISH packets queued for live clients per shard",
        |f| f.queued_messages,
        false,
    );
    per_shard(
        &mut registry,
        "shard_queued_bytes",
        "Bytes queued for live clients per shard",
        |f| f.queued_bytes,
        false,
    );
    per_shard(
        &mut registry,
        "shard_max_client_queue_bytes",
        "Largest single client queue per shard, in bytes",
        |f| f.max_client_queue_bytes,
        false,
    );
    per_shard(
        &mut registry,
        "shard_clients_parked",
        "Connections parked (idle, no task) per shard",
        |f| f.clients_parked,
        false,
    );
    per_shard(
        &mut registry,
        "shard_pending_messages",
        "QoS 1/2 messages waiting for an inflight slot per shard",
        |f| f.pending_messages,
        false,
    );
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}

/// Registers one metric family with the given label sets and values.
fn family(
    registry: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (ShardLabel, u64)>,
    counter: bool,
) {
    if counter {
        let fam = Family::<ShardLabel, Counter>::default();
        for (labels, v) in values {
            fam.get_or_create(&labels).inc_by(v);
        }
        registry.register(name, help, fam);
    } else {
        let fam = Family::<ShardLabel, Gauge>::default();
        for (labels, v) in values {
            fam.get_or_create(&labels)
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
        registry.register(name, help, fam);
    }
}

/// Registers one floating-point gauge.
fn gauge_f(registry: &mut Registry, name: &str, help: &str, v: f64) {
    let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    g.set(v);
    registry.register(name, help, g);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Stats {
        let gauges = BrokerGauges::new(2);
        let a = Figures {
            clients_connected: 3,
            retained: 4,
            publish_received: 5,
            publish_received_by_qos: [2, 3, 0],
            publish_dropped: 7,
            dropped_sys_topic: 1,
            clients_by_listener: [2, 1, 0, 0],
            ..Figures::default()
        };
        gauges.shards[0].store(&a);
        gauges.shards[1].store(&a);
        gauges.stats()
    }

    #[test]
    fn figures_sum_over_shards_and_retained_is_a_replica() {
        let stats = sample();
        assert_eq!(stats.total.clients_connected, 6);
        assert_eq!(stats.total.retained, 4);
        assert_eq!(stats.total.publish_received_by_qos, [4, 6, 0]);
        assert_eq!(stats.dropped_queue_full, 12);
        assert_eq!(stats.shards.len(), 2);
    }

    #[test]
    fn prometheus_text_has_the_usual_names_and_labels() {
        let text = render_prometheus(&sample());
        for line in [
            "fanmq_connections{listener=\"mqtt\"} 4",
            "fanmq_connections{listener=\"tls\"} 2",
            "fanmq_connections{listener=\"wss\"} 0",
            "fanmq_messages_received_total{qos=\"0\"} 4",
            "fanmq_messages_received_total{qos=\"1\"} 6",
            "fanmq_messages_dropped_total{reason=\"queue_full\"} 12",
            "fanmq_messages_dropped_total{reason=\"sys_topic\"} 2",
            "fanmq_shard_connections{shard=\"1\"} 3",
            "fanmq_retained_messages 4",
            "# TYPE fanmq_uptime_seconds gauge",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.contains(&format!(
            "fanmq_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn health_needs_every_shard_refreshed_and_accepting() {
        let gauges = BrokerGauges::new(2);
        assert!(!gauges.healthy());
        for g in &gauges.shards {
            g.accepting.store(true, Ordering::Relaxed);
        }
        assert!(gauges.healthy());
        gauges.shards[1].accepting.store(false, Ordering::Relaxed);
        assert!(!gauges.healthy());
    }
}
