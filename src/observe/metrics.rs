//! Broker figures for the admin HTTP listener: per-shard atomics, summed on
//! read, rendered as Prometheus text or JSON.
//!
//! Shards count in their own plain [`Counters`] (no atomics on the data
//! path). Every keep-alive sweep (every [`REFRESH_PERIOD`]) a shard completes
//! its counters with the gauges of its latest pass over its sessions and
//! stores them into its own [`AtomicCounters`] with relaxed stores
//! ([`BrokerGauges::store`]). The HTTP thread only loads those atomics and
//! sums them: scraping never blocks or slows a shard, and figures are at
//! most one sweep period old. What is exported, and under which name, is the
//! counter table's ([`crate::observe::counters`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::config::KEEP_ALIVE_SWEEP;
use crate::net::transport::Transport;
use crate::observe::counters::{AtomicCounters, Counters, Kind, LABELED, SCALARS};

/// How stale the figures may be: the keep-alive sweep period, which is when
/// shards refresh their gauges.
pub const REFRESH_PERIOD: Duration = KEEP_ALIVE_SWEEP;

/// A shard whose gauges were not refreshed for this long is reported as not
/// ready by `/health` (it is stuck or gone).
pub const HEALTH_STALE_AFTER: Duration = Duration::from_secs(5);

/// One shard's figures as the HTTP thread reads them.
#[derive(Debug, Default)]
pub struct ShardGauges {
    /// The shard's counters, as of its last refresh.
    counters: AtomicCounters,
    /// Milliseconds since the broker started at the last refresh
    /// (`/health`: a shard that stops refreshing is stuck).
    heartbeat_ms: AtomicU64,
    /// True while the shard accepts connections.
    accepting: AtomicBool,
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

    /// Stores shard `shard`'s figures (completed with its gauges) and
    /// whether it accepts connections.
    pub fn store(&self, shard: usize, counters: &Counters, accepting: bool) {
        let Some(gauges) = self.shards.get(shard) else {
            return;
        };
        gauges.counters.store(counters);
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        gauges.heartbeat_ms.store(ms, Ordering::Relaxed);
        gauges.accepting.store(accepting, Ordering::Relaxed);
    }

    /// Every shard's figures, by shard index.
    pub fn per_shard(&self) -> Vec<Counters> {
        self.shards.iter().map(|g| g.counters.load()).collect()
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
        let mut total = Counters::default();
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
            listeners: Transport::ALL.iter().map(|t| t.name()).collect(),
            dropped_queue_full: total.dropped_queue_full,
            total,
            shards,
        }
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
    /// Publishes dropped because a client's queue was full (the same as
    /// `total.dropped_queue_full`; kept where API users read it before).
    pub dropped_queue_full: u64,
    /// Every shard summed.
    pub total: Counters,
    /// Each shard's own figures, by shard index.
    pub shards: Vec<Counters>,
}

/// Label set of a metric.
type Labels = Vec<(&'static str, String)>;

/// Renders `stats` in the Prometheus text exposition format: every row of the
/// counter table that has a Prometheus name, broker-wide and per shard, plus
/// the build, the uptime and the drops by reason.
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
    for row in SCALARS {
        if let Some(name) = row.prometheus {
            scalar(&mut registry, name, row.help, (row.get)(t), row.kind);
        }
    }
    for row in LABELED {
        if let Some(name) = row.prometheus {
            let values = (row.get)(t)
                .iter()
                .enumerate()
                .map(|(i, v)| (vec![(row.label, (row.value)(i).to_string())], *v));
            family(&mut registry, name, row.help, values, row.kind);
        }
    }
    family(
        &mut registry,
        "messages_dropped",
        "PUBLISH packets dropped, by reason",
        [
            ("queue_full", t.dropped_queue_full),
            ("sys_topic", t.dropped_sys_topic),
            ("qos2_overflow", t.dropped_qos2_overflow),
        ]
        .map(|(reason, v)| (vec![("reason", reason.to_string())], v)),
        Kind::Counter,
    );
    for row in SCALARS {
        if let Some(name) = row.per_shard {
            let values = stats
                .shards
                .iter()
                .enumerate()
                .map(|(i, f)| (vec![("shard", i.to_string())], (row.get)(f)));
            family(&mut registry, name, row.help, values, row.kind);
        }
    }
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}

/// Registers one unlabelled counter or gauge.
fn scalar(registry: &mut Registry, name: &str, help: &str, v: u64, kind: Kind) {
    match kind {
        Kind::Counter => {
            let c = Counter::<u64>::default();
            c.inc_by(v);
            registry.register(name, help, c);
        }
        Kind::Gauge => {
            let g = Gauge::<i64>::default();
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
            registry.register(name, help, g);
        }
    }
}

/// Registers one metric family with the given label sets and values.
fn family(
    registry: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels, u64)>,
    kind: Kind,
) {
    if kind == Kind::Counter {
        let fam = Family::<Labels, Counter>::default();
        for (labels, v) in values {
            fam.get_or_create(&labels).inc_by(v);
        }
        registry.register(name, help, fam);
    } else {
        let fam = Family::<Labels, Gauge>::default();
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
        let mut a = Counters {
            clients_connected: 3,
            retained: 4,
            publish_received: 5,
            publish_received_by_qos: [2, 3, 0],
            publish_dropped: 7,
            dropped_sys_topic: 1,
            clients_by_listener: [2, 1, 0, 0],
            ..Counters::default()
        };
        a.complete();
        gauges.store(0, &a, true);
        gauges.store(1, &a, true);
        gauges.stats()
    }

    #[test]
    fn figures_sum_over_shards_and_retained_is_a_replica() {
        let stats = sample();
        assert_eq!(stats.total.clients_connected, 6);
        assert_eq!(stats.total.retained, 4);
        assert_eq!(stats.total.publish_received_by_qos, [4, 6, 0]);
        assert_eq!(stats.total.dropped_queue_full, 12);
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
