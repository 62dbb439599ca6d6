//! Results: the JSON a run writes (`--out`), and the Markdown tables made
//! from it (on stdout after a run, and in `bench/RESULTS.md`).
//!
//! One file is a [`ResultFile`]: the command line that produced it and its
//! runs (one per broker per round). Everything a table or plot shows is in
//! the file, so `fanmq-bench report` can regenerate them without rerunning.

use crate::cli::Part;
use crate::mqtt::Protocol;
use crate::procfs::SockStat;
use crate::protocol::{ConnectSummary, Transport, WorkerReport};
use crate::stats::{Clock, Latency};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
}

/// One results file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResultFile {
    /// The exact command line, so anyone can rerun it.
    pub command: String,
    /// Host facts: CPUs, kernel; to judge whether figures compare.
    pub host: String,
    pub runs: Vec<RunResult>,
}

/// One scenario run against one broker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunResult {
    pub scenario: String,
    /// Broker label (the peer name or command).
    pub broker: String,
    pub round: u32,
    pub params: Params,
    pub connect: Option<ConnectFigures>,
    pub fanout: Option<FanoutFigures>,
    pub idle: Option<IdleFigures>,
    pub storm: Option<StormFigures>,
    /// The latency scenario: the rate search and the verdict; the run at
    /// half the maximum rate is in `fanout`.
    #[serde(default)]
    pub latency: Option<LatencyFigures>,
    pub broker_usage: Option<BrokerUsage>,
    pub generator: GeneratorUsage,
    /// Anything a reader must know (saturation, failures, lower bounds).
    pub notes: Vec<String>,
    /// A part of a run split over load hosts (`--part K/N`): what `merge`
    /// needs to combine it with the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<PartRecord>,
}

/// One part of a split run, as `merge` needs it: the workers' own reports
/// (histograms as `(value, count)` pairs, so parts merge as histograms, not
/// as averaged percentiles) and their connect summaries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartRecord {
    pub part: Part,
    /// This part published (part 1).
    pub publisher: bool,
    /// The clock of the stamps and of the times below (the wall clock).
    pub clock: Clock,
    /// Bucket 0 of the reports' timelines, in that clock (ns).
    pub timeline_start_ns: u64,
    /// Each worker's connect summary (its connect latency histogram).
    pub connects: Vec<ConnectSummary>,
    /// Each worker's final report (its delivery latency histogram, last
    /// arrivals, timeline, loss counts).
    pub reports: Vec<WorkerReport>,
}

/// The parameters of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Params {
    pub subs: u64,
    pub topic: String,
    pub filter: String,
    pub qos: u8,
    /// MQTT version of the subscribers (`4`, `5` or `mixed`).
    #[serde(default)]
    pub protocol: Protocol,
    /// MQTT version of the publisher (`4` or `5`).
    #[serde(default)]
    pub publisher_protocol: Protocol,
    /// Topic Alias Maximum in the MQTT 5.0 subscribers' CONNECT (0: none).
    #[serde(default)]
    pub topic_alias_max: u16,
    pub payload: usize,
    /// Messages per second; `None` = burst.
    pub rate: Option<f64>,
    pub msgs: u64,
    pub workers: usize,
    /// The ShareName of a `--shared-group` run (all subscribers in one
    /// shared subscription group: each message expected once over all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_group: Option<String>,
    pub broker_cpus: Option<String>,
    pub client_cpus: Option<String>,
    /// What carried the subscribers' MQTT (absent: TCP).
    #[serde(default, skip_serializing_if = "Transport::is_tcp")]
    pub transport: Transport,
}

/// Connect phase figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectFigures {
    pub attempted: u64,
    pub connected: u64,
    pub failed: u64,
    /// Why the rest did not connect.
    pub errors: BTreeMap<String, u64>,
    pub seconds: f64,
    pub conns_per_s: f64,
    /// Broker CPU µs per CONNECT+SUBSCRIBE (with `--broker-pid`).
    pub broker_cpu_us_per_conn: Option<f64>,
    /// TCP connect → SUBACK.
    pub latency: Latency,
    /// Connections established by source address, as the kernel bound
    /// them: how evenly `--source-addrs` was used.
    #[serde(default)]
    pub by_source: BTreeMap<String, u64>,
    /// Connections established by broker address:port (`--ports`).
    #[serde(default)]
    pub by_target: BTreeMap<String, u64>,
}

/// Fan-out figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FanoutFigures {
    pub published: u64,
    /// published × subscribers.
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub subs_with_loss: u64,
    /// First publish → last delivery.
    pub seconds: f64,
    pub deliveries_per_s: f64,
    /// Publish → each subscriber.
    pub latency: Latency,
    /// Publish → the last subscriber, per message.
    pub latency_last: Latency,
    /// Deliveries per second, one value per bucket.
    pub timeline: Vec<f64>,
    pub bucket_ms: u64,
    /// Subscriber connections that broke during the run, by reason.
    pub errors: BTreeMap<String, u64>,
    /// Bytes of the delivered PUBLISH packets, whole frames.
    #[serde(default)]
    pub publish_bytes: u64,
    /// `publish_bytes` ÷ `delivered`: what one delivery takes on the wire
    /// (MQTT framing included, TCP/IP not).
    #[serde(default)]
    pub bytes_per_delivery: f64,
    /// Deliveries that carried a Topic Alias (MQTT 5.0), and of those, how
    /// many with the alias alone (an empty topic).
    #[serde(default)]
    pub aliased: u64,
    #[serde(default)]
    pub alias_only: u64,
    /// The same figures per subscriber protocol version (`"4"`, `"5"`),
    /// for a run with MQTT 5.0 subscribers (`--protocol 5` or `mixed`): in
    /// a mixed run, whether one version's subscribers get their messages
    /// later or in more bytes than the other's. Empty for a 3.1.1 run.
    #[serde(default)]
    pub by_version: BTreeMap<String, VersionFigures>,
    /// The broker's RSS (bytes, summed over its processes) every
    /// `rss_period_ms` while the phase published and delivered: flat in a
    /// steady run (the soak), growing where memory leaks or queues build.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub broker_rss: Vec<u64>,
    /// Period of `broker_rss` (ms).
    #[serde(default)]
    pub rss_period_ms: u64,
}

/// Fan-out figures of the subscribers of one protocol version.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VersionFigures {
    pub delivered: u64,
    /// `delivered` ÷ the run's `seconds` (the whole run's first to last
    /// delivery).
    pub deliveries_per_s: f64,
    pub bytes_per_delivery: f64,
    /// Publish → each subscriber of this version.
    pub latency: Latency,
}

/// Idle figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdleFigures {
    pub held: u64,
    pub hold_s: f64,
    pub broker_rss_before: Option<u64>,
    pub broker_rss_after: Option<u64>,
    pub broker_rss_per_conn: Option<f64>,
    /// The broker's peak RSS (`VmHWM`, reset before the first connection
    /// where allowed) after the hold: what a user provisions for.
    #[serde(default)]
    pub broker_peak_rss_after: Option<u64>,
    /// (peak after the hold − RSS before the first connection) ÷ held.
    #[serde(default)]
    pub broker_peak_rss_per_conn: Option<f64>,
    pub sockstat_before: SockStat,
    pub sockstat_after: SockStat,
    /// Kernel memory per connection: TCP buffers plus slab (socket
    /// structures), both ends of a loopback connection (the broker's and the
    /// client's socket), system-wide delta.
    pub kernel_mem_per_conn: f64,
    /// Broker CPU while idle, per connection per second (keep-alive cost).
    pub broker_idle_cpu_us_per_conn_s: Option<f64>,
}

/// Storm figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StormFigures {
    pub dropped: u64,
    pub back: u64,
    pub failed: u64,
    /// Drop → all back and subscribed.
    pub seconds: f64,
    pub errors: BTreeMap<String, u64>,
    pub broker_cpu_s: Option<f64>,
    /// The first storm: every socket opened at once → all subscribed.
    #[serde(default)]
    pub open_seconds: f64,
    /// The broker's peak RSS (`VmHWM`) after both storms.
    #[serde(default)]
    pub broker_peak_rss_after: Option<u64>,
    /// (peak after both storms − RSS before the first connection) ÷
    /// subscribers.
    #[serde(default)]
    pub broker_peak_rss_per_conn: Option<f64>,
}

/// The latency scenario's figures (see `crate::latency`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencyFigures {
    /// Subscribers counted in the search (N).
    pub subscribers: u64,
    /// Every step of the rate search, in the order run.
    pub steps: Vec<LatencyStep>,
    /// How the search ended: converged, step budget used, cap reached,
    /// nothing sustained, or the rate was given (`--max-rate`).
    pub search: String,
    /// The highest sustained message rate found (R_max, msg/s).
    pub max_rate: Option<f64>,
    /// The lowest rate that was not sustained, if one was tried.
    pub failed_rate: Option<f64>,
    /// What stopped the first rate that was not sustained: the broker, the
    /// load generator (then R_max is a lower bound for the broker), or
    /// neither CPU-bound.
    pub limited_by: String,
    /// R_max × N.
    pub max_deliveries_per_s: Option<f64>,
    /// The rate of the measured run: R_max / 2.
    pub rate: Option<f64>,
    /// 1.2 × N ÷ max deliveries/s, in µs (issue 3's target).
    pub bound_us: Option<f64>,
    /// p99 publish→subscriber of the run at R_max / 2, in µs.
    pub p99_us: Option<f64>,
    /// p99 ≤ bound.
    pub meets_bound: Option<bool>,
    /// Lag trend of the run at R_max / 2 (backlog growth).
    pub lag: Option<LagTrend>,
    /// The run at R_max / 2 delivered everything and its lag did not grow.
    pub sustained: Option<bool>,
}

/// One step of the rate search: an open-loop run at `rate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencyStep {
    /// Messages per second.
    pub rate: f64,
    /// Messages the step should publish (rate × step duration).
    pub planned: u64,
    pub published: u64,
    /// Subscribers counted (subscribed at the step's start).
    pub subscribers: u64,
    pub delivered: u64,
    pub expected: u64,
    pub lost: u64,
    /// Subscriber connections that broke during the step.
    pub broken: u64,
    /// Publish→last-subscriber lag trend (with the publisher's slip).
    pub lag: Option<LagTrend>,
    /// p99 publish→subscriber (µs).
    pub p99_us: f64,
    /// Broker CPU over the step, in cores.
    pub broker_cores_busy: Option<f64>,
    /// The broker's CPUs (`--broker-cpus`) busy with anything, broker or
    /// not, as a fraction: near 1 with the broker itself below that means
    /// other processes took its cores.
    #[serde(default)]
    pub broker_cpus_busy: Option<f64>,
    /// Load generator CPU over the step, as a fraction of its CPUs.
    pub generator_busy: f64,
    pub generator_saturated: bool,
    pub sustained: bool,
    /// Why the step was not sustained (empty when it was).
    pub why: String,
}

/// The lag trend of a run: medians of the first and last tenth of its
/// messages (publish→last subscriber, plus the publisher's slip); computed
/// by [`crate::latency::lag_trend`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LagTrend {
    /// Messages with a lag (every subscriber's arrival seen).
    pub messages: u64,
    /// Median lag of the first tenth (ms).
    pub first_ms: f64,
    /// Median lag of the last tenth (ms).
    pub last_ms: f64,
    /// `last_ms - first_ms`.
    pub growth_ms: f64,
    /// Growth allowed: max([`crate::latency::GROWTH_FLOOR_MS`], [`crate::latency::GROWTH_SLOPE`] × time
    /// between the tenths, [`crate::latency::GROWTH_REL`] × `first_ms`).
    pub tolerance_ms: f64,
    /// `growth_ms > tolerance_ms`: the backlog grows.
    pub grows: bool,
}

/// The broker's resource use over the measured phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BrokerUsage {
    /// The broker's process (the first node's, with several).
    pub pid: u32,
    /// Every node's process when the broker was several (`--nodes`): CPU
    /// and RSS are their sums. Empty for one process (and in older files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pids: Vec<u32>,
    pub cpu_s: f64,
    /// With several processes (`pids`), each one's share of `cpu_s` in
    /// their order: which node of a cluster did the work (fan-out only;
    /// empty for one process, other scenarios and older files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_each_s: Vec<f64>,
    pub wall_s: f64,
    /// cpu_s / wall_s: 1.0 = one core busy.
    pub cores_busy: f64,
    pub rss_bytes: u64,
    /// Fan-out only: deliveries per broker CPU-second.
    pub deliveries_per_cpu_s: Option<f64>,
}

/// The load generator's own resource use.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GeneratorUsage {
    pub cpu_s: f64,
    pub wall_s: f64,
    /// CPUs the generator may use.
    pub cpus: usize,
    /// Busiest single process as a fraction of one core.
    pub max_process_busy: f64,
    /// A process of the generator was near 100%: figures are lower bounds.
    pub saturated: bool,
    /// The worker processes' RSS after the connect phase (B).
    #[serde(default)]
    pub rss_bytes: u64,
    /// Their RSS growth over the connect phase per subscriber held (B):
    /// what the generator itself costs per idle subscriber (the kernel's
    /// socket memory is not in it).
    #[serde(default)]
    pub rss_per_subscriber: Option<f64>,
}

impl ResultFile {
    /// Reads a results file.
    ///
    /// # Errors
    /// Unreadable or not a results file.
    pub fn load(path: &str) -> Result<Self, ResultError> {
        let text = std::fs::read_to_string(path).map_err(|source| ResultError::Io {
            path: path.into(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ResultError::Json {
            path: path.into(),
            source,
        })
    }

    /// Writes it as pretty JSON.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save(&self, path: &str) -> Result<(), ResultError> {
        let text = serde_json::to_string_pretty(self).map_err(|source| ResultError::Json {
            path: path.into(),
            source,
        })?;
        std::fs::write(path, text + "\n").map_err(|source| ResultError::Io {
            path: path.into(),
            source,
        })
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

/// A rate as typed (`20`) when whole, else to one decimal (R_max / 2).
fn fmt_rate(r: f64) -> String {
    if r.fract() == 0.0 {
        format!("{r}")
    } else {
        format!("{r:.1}")
    }
}

fn fmt_bytes(v: Option<u64>) -> String {
    v.map_or("–".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
}

/// How evenly connections spread: the count of keys and the fewest and
/// most connections one had.
fn spread(m: &BTreeMap<String, u64>) -> String {
    let (lo, hi) = (m.values().min(), m.values().max());
    match (lo, hi) {
        (Some(lo), Some(hi)) => format!("{} addresses, {lo} to {hi} each", m.len()),
        _ => "–".into(),
    }
}

fn fmt_errors(e: &BTreeMap<String, u64>) -> String {
    if e.is_empty() {
        return "–".into();
    }
    e.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The headline figure of a run (higher is better unless noted), used for
/// the comparison ratios: `(name, value, higher_is_better)`.
pub fn headline(run: &RunResult) -> Vec<(&'static str, f64, bool)> {
    let mut v = Vec::new();
    let cpu = run.broker_usage.as_ref();
    if let Some(f) = &run.fanout {
        v.push(("deliveries/s", f.deliveries_per_s, true));
        if let Some(d) = cpu.and_then(|c| c.deliveries_per_cpu_s) {
            v.push(("deliveries per broker CPU-s", d, true));
        }
        v.push(("p99 µs", f.latency.p99_us, false));
        v.push(("lost", f.lost as f64, false));
    }
    if run.storm.is_none()
        && let Some(c) = &run.connect
        && run.scenario == "connect"
    {
        v.push(("connections/s", c.conns_per_s, true));
        if let Some(us) = c.broker_cpu_us_per_conn {
            v.push(("broker CPU µs/conn", us, false));
        }
        v.push(("connect p99 µs", c.latency.p99_us, false));
    }
    if let Some(i) = &run.idle {
        if let Some(b) = i.broker_rss_per_conn {
            v.push(("broker RSS B/conn", b, false));
        }
        if let Some(b) = i.broker_peak_rss_per_conn {
            v.push(("broker peak RSS B/conn", b, false));
        }
        v.push(("kernel B/conn", i.kernel_mem_per_conn, false));
        if let Some(us) = i.broker_idle_cpu_us_per_conn_s {
            v.push(("broker idle CPU µs/conn-s", us, false));
        }
    }
    if let Some(s) = &run.storm {
        v.push(("seconds until all subscribed", s.open_seconds, false));
        v.push(("seconds to reconnect", s.seconds, false));
        if let Some(b) = s.broker_peak_rss_per_conn {
            v.push(("broker peak RSS B/conn", b, false));
        }
    }
    if let Some(l) = &run.latency {
        if let Some(r) = l.max_rate {
            v.push(("max sustained msg/s (R_max)", r, true));
        }
        if let Some(b) = l.bound_us {
            v.push(("bound 1.2·N÷max deliveries/s µs", b, false));
            if let Some(p) = l.p99_us {
                v.push(("p99 ÷ bound at R_max/2 (≤ 1 meets it)", p / b, false));
            }
        }
        if let Some(g) = l.lag.as_ref() {
            v.push(("lag growth at R_max/2 ms", g.growth_ms, false));
        }
    }
    v
}

/// The Markdown table of one run's figures.
pub fn run_table(run: &RunResult) -> String {
    let mut s = String::new();
    let p = &run.params;
    let load = if run.fanout.is_some() {
        let mode = p
            .rate
            .map_or("burst".to_owned(), |r| format!("paced {}/s", fmt_rate(r)));
        format!(
            ", filter `{}`, QoS {}, {} B payload, {mode}, {} messages",
            p.filter, p.qos, p.payload, p.msgs
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        s,
        "**{}** vs **{}** (round {}): {} subscribers{load}, {} worker(s), broker CPUs {}, client CPUs {}\n",
        run.scenario,
        run.broker,
        run.round,
        p.subs,
        p.workers,
        p.broker_cpus.as_deref().unwrap_or("any"),
        p.client_cpus.as_deref().unwrap_or("any"),
    );
    let _ = writeln!(s, "| figure | value |\n| --- | --- |");
    let mut row = |k: &str, v: String| {
        let _ = writeln!(s, "| {k} | {v} |");
    };
    if let Some(c) = &run.connect {
        row(
            "connected / attempted",
            format!("{} / {}", c.connected, c.attempted),
        );
        row("connect failures", fmt_errors(&c.errors));
        row("connections/s", format!("{:.0}", c.conns_per_s));
        row(
            "broker CPU µs per connection",
            fmt_opt(c.broker_cpu_us_per_conn, 1),
        );
        row(
            "connect latency p50 / p99 / max (µs)",
            format!(
                "{:.0} / {:.0} / {:.0}",
                c.latency.p50_us, c.latency.p99_us, c.latency.max_us
            ),
        );
        if c.by_source.len() > 1 || c.by_target.len() > 1 {
            row("connections by source address", spread(&c.by_source));
            row("connections by broker address", spread(&c.by_target));
        }
    }
    if let Some(f) = &run.fanout {
        row("published", f.published.to_string());
        row(
            "delivered / expected",
            format!("{} / {}", f.delivered, f.expected),
        );
        row(
            "lost / duplicates / out of order",
            format!("{} / {} / {}", f.lost, f.duplicates, f.out_of_order),
        );
        row("subscribers with loss", f.subs_with_loss.to_string());
        row("deliveries/s", format!("{:.0}", f.deliveries_per_s));
        row(
            "latency publish→subscriber p50 / p99 / p999 / max (µs)",
            format!(
                "{:.0} / {:.0} / {:.0} / {:.0}",
                f.latency.p50_us, f.latency.p99_us, f.latency.p999_us, f.latency.max_us
            ),
        );
        row(
            "latency publish→last subscriber p50 / p99 / p999 / max (µs)",
            format!(
                "{:.0} / {:.0} / {:.0} / {:.0}",
                f.latency_last.p50_us,
                f.latency_last.p99_us,
                f.latency_last.p999_us,
                f.latency_last.max_us
            ),
        );
        if !f.errors.is_empty() {
            row("subscriber errors", fmt_errors(&f.errors));
        }
        // Only for runs with MQTT 5.0 subscribers, so that the sections of
        // older 3.1.1 results stay as they were.
        if !f.by_version.is_empty() {
            row(
                "PUBLISH bytes per delivery (with a Topic Alias / alias alone)",
                format!(
                    "{:.1} ({} / {})",
                    f.bytes_per_delivery, f.aliased, f.alias_only
                ),
            );
        }
        if let Some(d) = rss_drift(&f.broker_rss) {
            row(
                &format!(
                    "broker RSS over the run, every {} ms: first tenth / last tenth (medians) / max",
                    f.rss_period_ms
                ),
                format!(
                    "{} / {} / {} ({:+.1}%)",
                    fmt_bytes(Some(d.first)),
                    fmt_bytes(Some(d.last)),
                    fmt_bytes(Some(d.max)),
                    d.growth() * 100.0
                ),
            );
        }
        for (version, v) in &f.by_version {
            let name = if version == "4" { "3.1.1" } else { "5.0" };
            row(
                &format!(
                    "MQTT {name} subscribers: delivered, deliveries/s, p50 / p99 µs, bytes per delivery"
                ),
                format!(
                    "{}, {:.0}, {:.0} / {:.0}, {:.1}",
                    v.delivered,
                    v.deliveries_per_s,
                    v.latency.p50_us,
                    v.latency.p99_us,
                    v.bytes_per_delivery
                ),
            );
        }
    }
    if let Some(i) = &run.idle {
        row("held idle", format!("{} for {:.0} s", i.held, i.hold_s));
        row(
            "broker RSS before / after",
            format!(
                "{} / {}",
                fmt_bytes(i.broker_rss_before),
                fmt_bytes(i.broker_rss_after)
            ),
        );
        row(
            "broker RSS per connection (B)",
            fmt_opt(i.broker_rss_per_conn, 0),
        );
        row(
            "broker peak RSS after / per connection (B)",
            format!(
                "{} / {}",
                fmt_bytes(i.broker_peak_rss_after),
                fmt_opt(i.broker_peak_rss_per_conn, 0)
            ),
        );
        row(
            "kernel memory (TCP buffers + slab) per connection, both ends (B)",
            format!("{:.0}", i.kernel_mem_per_conn),
        );
        row(
            "broker idle CPU µs per connection-second",
            fmt_opt(i.broker_idle_cpu_us_per_conn_s, 3),
        );
    }
    if let Some(st) = &run.storm {
        row(
            "dropped / back / failed",
            format!("{} / {} / {}", st.dropped, st.back, st.failed),
        );
        row(
            "seconds from all sockets opened at once to all subscribed",
            format!("{:.3}", st.open_seconds),
        );
        row(
            "seconds until all back and subscribed",
            format!("{:.3}", st.seconds),
        );
        row(
            "broker peak RSS after / per connection (B)",
            format!(
                "{} / {}",
                fmt_bytes(st.broker_peak_rss_after),
                fmt_opt(st.broker_peak_rss_per_conn, 0)
            ),
        );
        row("reconnect failures", fmt_errors(&st.errors));
        row("broker CPU-s for the storm", fmt_opt(st.broker_cpu_s, 3));
    }
    if let Some(l) = &run.latency {
        latency_rows(l, &mut row);
    }
    if let Some(b) = &run.broker_usage {
        if b.pids.is_empty() {
            row("broker CPU-s (pid)", format!("{:.3} ({})", b.cpu_s, b.pid));
        } else {
            row(
                "broker CPU-s, all nodes (pids)",
                format!("{:.3} ({:?})", b.cpu_s, b.pids),
            );
        }
        row("broker cores busy", format!("{:.2}", b.cores_busy));
        row("broker RSS", fmt_bytes(Some(b.rss_bytes)));
        if let Some(d) = b.deliveries_per_cpu_s {
            row(
                "**deliveries per broker CPU-second**",
                format!("**{d:.0}**"),
            );
        }
    }
    let g = &run.generator;
    row(
        "load generator CPU-s / busiest process",
        format!(
            "{:.3} / {:.0}% of a core{}",
            g.cpu_s,
            g.max_process_busy * 100.0,
            if g.saturated {
                " (SATURATED: figures are lower bounds)"
            } else {
                ""
            }
        ),
    );
    if let Some(b) = g.rss_per_subscriber {
        row(
            "load generator RSS / per subscriber",
            format!("{} / {b:.0} B", fmt_bytes(Some(g.rss_bytes))),
        );
    }
    for n in &run.notes {
        let _ = writeln!(s, "\n> {n}");
    }
    if let Some(l) = &run.latency
        && !l.steps.is_empty()
    {
        s.push_str(&steps_table(l));
    }
    s
}

/// The latency verdict rows (the run at R_max / 2 is the fan-out above).
fn latency_rows(l: &LatencyFigures, row: &mut impl FnMut(&str, String)) {
    let yes_no = |b: Option<bool>| match b {
        Some(true) => "**yes**",
        Some(false) => "**no**",
        None => "–",
    };
    row(
        "max sustained rate R_max (msg/s), search",
        format!("{} ({})", fmt_opt(l.max_rate, 1), l.search),
    );
    row(
        "first rate not sustained (msg/s)",
        fmt_opt(l.failed_rate, 1),
    );
    row("limited by", l.limited_by.clone());
    row(
        "max deliveries/s = R_max × N",
        format!(
            "{} (N = {})",
            fmt_opt(l.max_deliveries_per_s, 0),
            l.subscribers
        ),
    );
    row("measured at R_max / 2 (msg/s)", fmt_opt(l.rate, 1));
    row(
        "p99 publish→subscriber / bound 1.2 × N ÷ max deliveries/s (µs)",
        format!("{} / {}", fmt_opt(l.p99_us, 0), fmt_opt(l.bound_us, 0)),
    );
    row("p99 ≤ bound", yes_no(l.meets_bound).into());
    if let Some(g) = &l.lag {
        row(
            "lag first / last tenth, growth (tolerance) (ms)",
            format!(
                "{:.1} / {:.1}, {:+.1} ({:.1})",
                g.first_ms, g.last_ms, g.growth_ms, g.tolerance_ms
            ),
        );
    }
    row(
        "sustained at R_max / 2 (no loss, no backlog growth)",
        yes_no(l.sustained).into(),
    );
}

/// The rate search, one row per step.
fn steps_table(l: &LatencyFigures) -> String {
    let mut s = String::from(
        "\nRate search (open loop; a step is sustained when every subscriber got every message and the publish→last-subscriber lag did not grow):\n\n\
         | msg/s | published / planned | delivered / expected | lost | lag first → last tenth (ms) | growth / tolerance (ms) | p99 µs | broker cores (its CPUs busy) | generator busy | sustained |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for st in &l.steps {
        let (lag, growth) = st.lag.as_ref().map_or(("–".into(), "–".into()), |g| {
            (
                format!("{:.1} → {:.1}", g.first_ms, g.last_ms),
                format!("{:+.1} / {:.1}", g.growth_ms, g.tolerance_ms),
            )
        });
        let _ = writeln!(
            s,
            "| {:.1} | {} / {} | {} / {} | {} | {lag} | {growth} | {:.0} | {}{} | {:.0}%{} | {} |",
            st.rate,
            st.published,
            st.planned,
            st.delivered,
            st.expected,
            st.lost,
            st.p99_us,
            fmt_opt(st.broker_cores_busy, 2),
            st.broker_cpus_busy
                .map_or(String::new(), |b| format!(" ({:.0}%)", b * 100.0)),
            st.generator_busy * 100.0,
            if st.generator_saturated {
                " (saturated)"
            } else {
                ""
            },
            if st.sustained {
                "yes".to_owned()
            } else {
                format!("no: {}", st.why)
            },
        );
    }
    s
}

/// The comparison table: per broker the median of each headline figure over
/// its rounds, and its ratio to the first broker's.
pub fn compare_table(runs: &[RunResult]) -> String {
    let mut brokers: Vec<&str> = Vec::new();
    for r in runs {
        if !brokers.contains(&r.broker.as_str()) {
            brokers.push(&r.broker);
        }
    }
    let Some(base) = brokers.first().copied() else {
        return String::new();
    };
    let median = |broker: &str, name: &str| -> Option<f64> {
        let mut v: Vec<f64> = runs
            .iter()
            .filter(|r| r.broker == broker)
            .flat_map(headline)
            .filter(|(n, _, _)| *n == name)
            .map(|(_, v, _)| v)
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    };
    let names: Vec<&'static str> = runs
        .iter()
        .find(|r| r.broker == base)
        .map(|r| headline(r).into_iter().map(|(n, _, _)| n).collect())
        .unwrap_or_default();
    let rounds = runs.iter().map(|r| r.round).max().unwrap_or(0) + 1;
    let mut s =
        format!("Comparison (median of {rounds} round(s), ratio = broker ÷ {base}):\n\n| figure |");
    for b in &brokers {
        let _ = write!(s, " {b} |");
    }
    for b in brokers.iter().skip(1) {
        let _ = write!(s, " {b} ÷ {base} |");
    }
    s.push_str("\n| --- |");
    for _ in 0..brokers.len() * 2 - 1 {
        s.push_str(" ---: |");
    }
    s.push('\n');
    for name in names {
        let _ = write!(s, "| {name} |");
        let base_v = median(base, name);
        for b in &brokers {
            let m = median(b, name);
            // Figures below 1 (idle CPU per connection-second) need more
            // than one decimal.
            let decimals = if m.is_some_and(|v| v.abs() < 1.0) {
                3
            } else {
                1
            };
            let _ = write!(s, " {} |", fmt_opt(m, decimals));
        }
        for b in brokers.iter().skip(1) {
            let ratio = match (median(b, name), base_v) {
                (Some(v), Some(bv)) if bv != 0.0 => Some(v / bv),
                _ => None,
            };
            let _ = write!(s, " {} |", fmt_opt(ratio, 2));
        }
        s.push('\n');
    }
    s
}

/// Fewest RSS samples for [`rss_drift`]: a burst over in a second or two
/// says nothing about whether memory stays flat.
const RSS_DRIFT_MIN_SAMPLES: usize = 10;

/// How a long run's broker RSS moved: the median of its first tenth of
/// samples against the median of its last tenth, and the maximum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RssDrift {
    pub first: u64,
    pub last: u64,
    pub max: u64,
}

impl RssDrift {
    /// (last − first) ÷ first: the soak's "stays flat" figure.
    pub fn growth(&self) -> f64 {
        (self.last as f64 - self.first as f64) / (self.first.max(1) as f64)
    }
}

/// The drift of `samples`, or `None` for fewer than
/// [`RSS_DRIFT_MIN_SAMPLES`].
pub fn rss_drift(samples: &[u64]) -> Option<RssDrift> {
    if samples.len() < RSS_DRIFT_MIN_SAMPLES {
        return None;
    }
    let tenth = samples.len() / 10;
    let median = |part: &[u64]| {
        let mut v = part.to_vec();
        v.sort_unstable();
        v[v.len() / 2]
    };
    Some(RssDrift {
        first: median(&samples[..tenth]),
        last: median(&samples[samples.len() - tenth..]),
        max: samples.iter().copied().max().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn rss_drift_compares_the_first_and_last_tenth_and_needs_ten_samples() {
        assert_eq!(rss_drift(&[1; 9]), None);
        let flat: Vec<u64> = (0..100).map(|i| 1000 + i % 3).collect();
        let d = rss_drift(&flat).unwrap();
        assert!(d.growth().abs() < 0.01, "{d:?}");
        let ramp: Vec<u64> = (0..100).map(|i| 1000 + 10 * i).collect();
        let d = rss_drift(&ramp).unwrap();
        assert_eq!((d.first, d.last, d.max), (1050, 1950, 1990));
        assert!((d.growth() - 0.857).abs() < 0.001, "{d:?}");
    }
    use super::*;

    fn run(broker: &str, round: u32, dps: f64) -> RunResult {
        RunResult {
            scenario: "fanout".into(),
            broker: broker.into(),
            round,
            fanout: Some(FanoutFigures {
                deliveries_per_s: dps,
                ..FanoutFigures::default()
            }),
            ..RunResult::default()
        }
    }

    #[test]
    fn compare_uses_medians_and_ratios() {
        let runs = vec![
            run("a", 0, 100.0),
            run("b", 0, 300.0),
            run("a", 1, 110.0),
            run("b", 1, 330.0),
            run("a", 2, 90.0),
            run("b", 2, 100.0),
        ];
        let t = compare_table(&runs);
        assert!(t.contains("| deliveries/s | 100.0 | 300.0 | 3.00 |"), "{t}");
    }

    #[test]
    fn latency_rows_and_headline() {
        let mut r = run("fanmq", 0, 1.0);
        r.scenario = "latency".into();
        r.latency = Some(LatencyFigures {
            subscribers: 10,
            max_rate: Some(1000.0),
            bound_us: Some(1200.0),
            p99_us: Some(600.0),
            meets_bound: Some(true),
            steps: vec![LatencyStep {
                rate: 1000.0,
                sustained: true,
                ..LatencyStep::default()
            }],
            ..LatencyFigures::default()
        });
        let t = run_table(&r);
        assert!(t.contains("| p99 ≤ bound | **yes** |"), "{t}");
        assert!(t.contains("Rate search"), "{t}");
        let h = headline(&r);
        assert!(h.contains(&("p99 ÷ bound at R_max/2 (≤ 1 meets it)", 0.5, false)));
        assert!(h.contains(&("max sustained msg/s (R_max)", 1000.0, true)));
    }

    #[test]
    fn run_table_mentions_saturation() {
        let mut r = run("a", 0, 1.0);
        r.generator.saturated = true;
        assert!(run_table(&r).contains("SATURATED"));
    }
}
