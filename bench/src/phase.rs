//! One publishing phase and its figures, shared by the `fanout` scenario
//! ([`crate::scenario`]) and the `latency` scenario's steps
//! ([`crate::latency`]): publish while the workers count deliveries
//! ([`publish_phase`]), merge the workers' reports into the fan-out figures
//! ([`fanout_figures`]), and the load generator's CPU over the phase
//! ([`generator_usage`]); also the connect phase's figures
//! ([`connect_figures`]) and the generator's memory. `merge` builds a split
//! run's figures with the same functions.

use crate::cli::Opts;
use crate::fleet::{Fleet, FleetError};
use crate::mqtt::Protocol;
use crate::procfs;
use crate::progress::Progress;
use crate::protocol::{ConnectSummary, WorkerReport};
use crate::publisher::{self, Plan, Published};
use crate::result::{ConnectFigures, FanoutFigures, GeneratorUsage, VersionFigures};
use crate::stats::{self, Clock};
use crate::target::{CpuWindow, Phase, ScenarioError, Target};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Width of a deliveries-timeline bucket.
pub const BUCKET_NS: u64 = 100_000_000;

/// A generator process busier than this fraction of a core is saturated.
pub const SATURATED: f64 = 0.9;

/// Messages of a phase whose publish→last-subscriber latency is tracked
/// (8 B each per worker); later messages still count in every other figure.
/// The latency scenario tracks every n-th message instead when its run is
/// longer.
pub const TRACK_MSGS: u64 = 2_000_000;

/// The broker's CPU seconds so far, summed over its processes (`None`
/// without a pid, or once one of them is gone).
pub fn cpu_of(pids: &[u32]) -> Option<f64> {
    cpu_each(pids).map(|each| each.iter().sum())
}

/// Each of the broker's processes' CPU seconds so far, in the order of
/// `pids` (`None` without a pid, or once one of them is gone).
pub fn cpu_each(pids: &[u32]) -> Option<Vec<f64>> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| procfs::cpu_seconds(p).ok()).collect()
}

/// The load generator's CPU use over a phase of `wall_s` seconds: each
/// worker process's CPU-seconds and the coordinator's own (publisher thread
/// included); with a note when it was saturated.
pub fn generator_usage(
    o: &Opts,
    workers: &[f64],
    coordinator: f64,
    wall_s: f64,
) -> (GeneratorUsage, Option<String>) {
    let wall_s = wall_s.max(1e-9);
    let mut gen_cpu = coordinator;
    let mut busiest = coordinator / wall_s;
    let mut subscriber_busiest: f64 = 0.0;
    for d in workers {
        gen_cpu += d;
        busiest = busiest.max(d / wall_s);
        subscriber_busiest = subscriber_busiest.max(d / wall_s);
    }
    let client_cpus = o
        .client_cpus
        .as_deref()
        .and_then(|l| procfs::parse_cpu_list(l).ok())
        .map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get()),
            |c| c.len(),
        );
    let total_busy = gen_cpu / wall_s / client_cpus as f64;
    let usage = GeneratorUsage {
        cpu_s: gen_cpu,
        wall_s,
        cpus: client_cpus,
        max_process_busy: busiest,
        saturated: subscriber_busiest > SATURATED || total_busy > SATURATED,
        ..GeneratorUsage::default()
    };
    let note = usage.saturated.then(|| {
        format!(
            "the load generator was saturated (busiest subscriber process {:.0}% of a core, all processes {:.0}% of {} CPU(s)): throughput figures are lower bounds",
            subscriber_busiest * 100.0,
            total_busy * 100.0,
            client_cpus
        )
    });
    (usage, note)
}

/// Period of the broker RSS samples taken while a phase publishes.
pub const RSS_PERIOD: Duration = Duration::from_secs(1);

/// What one publishing phase did.
pub struct PhaseRun {
    pub published: Published,
    /// The broker CPU window (before, after, wall ns).
    pub window: CpuWindow,
    /// Each broker process's CPU seconds over the window, in the order of
    /// `--broker-pid` (empty when not measured): with several nodes, which
    /// of them did the work.
    pub cpu_each_s: Vec<f64>,
    /// The broker's RSS every [`RSS_PERIOD`] over the phase (bytes).
    pub broker_rss: Vec<u64>,
}

/// Publishes `phase` to `ready` subscribers and waits for the deliveries:
/// until all arrived, nothing arrived for `--drain-timeout` after the last
/// publish, or the phase's limit passed. Returns what was published, the
/// broker CPU window and its RSS over the phase.
///
/// # Errors
/// A worker failed, or the publisher could not connect.
pub fn publish_phase(
    fleet: &mut Fleet,
    o: &Opts,
    t: &Target,
    ready: u64,
    phase: &Phase,
    progress: &Progress,
) -> Result<PhaseRun, ScenarioError> {
    let plan = Plan {
        target: t.addr,
        topic: o.topic.clone(),
        qos: o.qos,
        payload: o.payload as usize,
        msgs: phase.msgs,
        rate: phase.rate,
        raw: t.raw,
        v5: o.publisher_protocol == Protocol::V5,
        client_id: format!("fmb-{}-pub", std::process::id()),
        first_seq: phase.first_seq,
        track_stride: phase.track_stride,
        track_msgs: TRACK_MSGS,
        clock: stamp_clock(o),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let c0 = cpu_each(&t.pids);
    let w0 = stats::monotonic_ns();
    let sampler = procfs::RssSampler::start(&t.pids, RSS_PERIOD);
    let deadline = w0 + phase.limit_ns;
    let handle = {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || {
            let r = publisher::run(&plan, &stop, deadline);
            done.store(true, Ordering::Relaxed);
            r
        })
    };
    let waited = await_deliveries(
        fleet,
        o,
        expected(o, ready, phase.msgs),
        deadline,
        progress,
        |_| done.load(Ordering::Relaxed),
    );
    stop.store(true, Ordering::Relaxed);
    let c1 = cpu_each(&t.pids);
    let w1 = stats::monotonic_ns();
    let broker_rss = sampler.finish();
    waited?;
    let published = handle.join().map_err(|_| ScenarioError::PublisherPanic)??;
    progress.println(&format!(
        "published {} of {} messages",
        published.sent, phase.msgs
    ));
    let (window, cpu_each_s) = match c0.zip(c1) {
        Some((a, b)) => {
            let each = a.iter().zip(&b).map(|(x, y)| y - x).collect();
            (Some((a.iter().sum(), b.iter().sum(), w1 - w0)), each)
        }
        None => (None, Vec::new()),
    };
    Ok(PhaseRun {
        published,
        window,
        cpu_each_s,
        broker_rss,
    })
}

/// Waits until `expected` deliveries arrived, the monotonic `deadline_ns`
/// passed, or nothing arrived for `--drain-timeout` once `sent_all` says
/// everything is on its way (the publisher finished; a part that only
/// subscribes: its first delivery arrived).
///
/// # Errors
/// A worker failed; running out of time is not an error.
pub fn await_deliveries(
    fleet: &mut Fleet,
    o: &Opts,
    expected: u64,
    deadline_ns: u64,
    progress: &Progress,
    sent_all: impl Fn(&crate::protocol::Progress) -> bool,
) -> Result<(), ScenarioError> {
    let drain_ns = (o.drain_timeout * 1e9) as u64;
    let mut last_count = 0;
    let mut last_change = stats::monotonic_ns();
    let waited = fleet.gather::<()>(
        "deliveries",
        Duration::from_nanos(deadline_ns.saturating_sub(last_change)) + Duration::from_secs(5),
        progress,
        |_| None,
        |p| {
            let now = stats::monotonic_ns();
            if p.delivered != last_count {
                last_count = p.delivered;
                last_change = now;
            }
            p.delivered >= expected
                || now > deadline_ns
                || (sent_all(p) && now - last_change > drain_ns)
        },
    );
    match waited {
        Ok(_) | Err(FleetError::Timeout(..)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The connect phase's figures from the workers' summaries of it, for
/// `attempted` subscribers. Its duration runs from the first worker's start
/// to the last one's end: summaries of one host share its monotonic clock
/// (`merge` shifts each part's to start at 0, since hosts do not).
pub fn connect_figures(summaries: &[ConnectSummary], attempted: u64) -> ConnectFigures {
    let mut hist = stats::new_hist();
    let mut f = ConnectFigures {
        attempted,
        ..ConnectFigures::default()
    };
    for s in summaries {
        f.connected += s.ready;
        f.failed += s.failed;
        add_counts(&mut f.errors, &s.errors);
        add_counts(&mut f.by_source, &s.by_source);
        add_counts(&mut f.by_target, &s.by_target);
        // Pairs come from our own workers' histograms: always in range.
        let _ = stats::add_pairs(&mut hist, &s.latency);
    }
    let start = summaries.iter().map(|s| s.started_ns).min().unwrap_or(0);
    let end = summaries.iter().map(|s| s.ended_ns).max().unwrap_or(0);
    f.seconds = end.saturating_sub(start) as f64 / 1e9;
    f.conns_per_s = f.connected as f64 / f.seconds.max(1e-9);
    f.latency = stats::summarize(&hist);
    f
}

/// Adds the counts of `from` into `into`, key by key.
pub fn add_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// The generator's memory after the connect phase: the workers' RSS, and
/// its growth over the subscribers they hold (bytes per idle subscriber).
pub fn add_generator_memory(g: &mut GeneratorUsage, summaries: &[ConnectSummary]) {
    let ready: u64 = summaries.iter().map(|s| s.ready).sum();
    g.rss_bytes = summaries.iter().map(|s| s.rss_bytes).sum();
    let growth: u64 = summaries
        .iter()
        .map(|s| s.rss_bytes.saturating_sub(s.rss_start_bytes))
        .sum();
    g.rss_per_subscriber = (ready > 0).then(|| growth as f64 / ready as f64);
}

/// The clock of the payload stamps: the wall clock when the run is split
/// over load hosts (`--part`), else the monotonic one (see [`Clock`]).
pub fn stamp_clock(o: &Opts) -> Clock {
    if o.part.is_some() {
        Clock::Realtime
    } else {
        Clock::Monotonic
    }
}

/// The deliveries `msgs` messages make to `ready` subscribers: one per
/// subscriber, or one in all for a shared group (`--shared-group`).
pub fn expected(o: &Opts, ready: u64, msgs: u64) -> u64 {
    if o.shared_group.is_some() {
        msgs
    } else {
        ready * msgs
    }
}

/// The note a `--shared-group` run's results carry.
pub const SHARED_NOTE: &str = "shared group: each message is expected once over all subscribers";

/// Fan-out figures of a shared group (`--shared-group`): each message is
/// expected once over all subscribers, so the per-subscriber sequence gaps
/// the workers count as lost are not losses; loss is messages less
/// deliveries. Duplicates and order are checked per subscriber; deliveries
/// beyond the messages are duplicates too (a message given to two members,
/// which no single subscriber sees, e.g. members in different parts of a
/// split run).
pub fn shared_figures(f: &mut FanoutFigures) {
    f.expected = f.published;
    f.lost = f.published.saturating_sub(f.delivered);
    f.subs_with_loss = 0;
    f.duplicates = f.duplicates.max(f.delivered.saturating_sub(f.published));
}

/// Merges the workers' reports of one phase into the fan-out figures, and
/// returns with them the publish→last-subscriber latency per tracked
/// message (ns, 0 = never arrived).
pub fn fanout_figures(reports: &[WorkerReport], published: u64) -> (FanoutFigures, Vec<u64>) {
    let mut hist = stats::new_hist();
    let mut v5_hist = stats::new_hist();
    let (mut v5_delivered, mut v5_bytes) = (0, 0);
    let mut last = Vec::new();
    let mut timeline = Vec::new();
    let counted: u64 = reports.iter().map(|r| r.counted).sum();
    let mut f = FanoutFigures {
        published,
        expected: published * counted,
        bucket_ms: BUCKET_NS / 1_000_000,
        ..FanoutFigures::default()
    };
    let (mut first, mut end) = (u64::MAX, 0);
    for r in reports {
        f.delivered += r.delivered;
        f.lost += r.lost;
        f.duplicates += r.duplicates;
        f.out_of_order += r.out_of_order;
        f.subs_with_loss += r.subs_with_loss;
        f.publish_bytes += r.publish_bytes;
        f.aliased += r.aliased;
        f.alias_only += r.alias_only;
        let _ = stats::add_pairs(&mut hist, &r.latency);
        let _ = stats::add_pairs(&mut v5_hist, &r.v5_latency);
        v5_delivered += r.v5_delivered;
        v5_bytes += r.v5_publish_bytes;
        stats::max_series(&mut last, &r.last_arrival);
        stats::add_series(&mut timeline, &r.timeline);
        if r.first_delivery_ns > 0 {
            first = first.min(r.first_delivery_ns);
        }
        end = end.max(r.last_delivery_ns);
        add_counts(&mut f.errors, &r.errors);
    }
    let mut last_hist = stats::new_hist();
    for &l in last.iter().take(published as usize) {
        if l > 0 {
            stats::record(&mut last_hist, l);
        }
    }
    // Rate over first → last delivery (the publish stamp of the first
    // message is within its latency of the first delivery).
    if end > first {
        f.seconds = (end - first) as f64 / 1e9;
        f.deliveries_per_s = f.delivered as f64 / f.seconds;
    }
    let lead = timeline.iter().position(|&c| c > 0).unwrap_or(0);
    f.timeline = timeline[lead..]
        .iter()
        .map(|&c| c as f64 * 1e9 / BUCKET_NS as f64)
        .collect();
    if f.delivered > 0 {
        f.bytes_per_delivery = f.publish_bytes as f64 / f.delivered as f64;
    }
    f.latency_last = stats::summarize(&last_hist);
    if v5_delivered > 0 {
        let mut v3_hist = hist.clone();
        // The 5.0 histogram is a part of the whole one: never fails.
        let _ = v3_hist.subtract(&v5_hist);
        let split = [
            (
                "4",
                f.delivered - v5_delivered,
                f.publish_bytes - v5_bytes,
                &v3_hist,
            ),
            ("5", v5_delivered, v5_bytes, &v5_hist),
        ];
        for (version, delivered, bytes, h) in split {
            if delivered == 0 {
                continue;
            }
            let figures = VersionFigures {
                delivered,
                deliveries_per_s: if f.seconds > 0.0 {
                    delivered as f64 / f.seconds
                } else {
                    0.0
                },
                bytes_per_delivery: bytes as f64 / delivered as f64,
                latency: stats::summarize(h),
            };
            f.by_version.insert(version.to_owned(), figures);
        }
    }
    f.latency = stats::summarize(&hist);
    (f, last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_group_expects_each_message_once_over_all_subscribers() {
        let mut f = FanoutFigures {
            published: 100,
            expected: 100 * 50,
            delivered: 98,
            lost: 4_900,
            subs_with_loss: 50,
            ..FanoutFigures::default()
        };
        shared_figures(&mut f);
        assert_eq!((f.expected, f.lost, f.subs_with_loss), (100, 2, 0));
        // Two members got the same message: more deliveries than messages.
        let mut twice = FanoutFigures {
            published: 100,
            delivered: 103,
            ..FanoutFigures::default()
        };
        shared_figures(&mut twice);
        assert_eq!((twice.lost, twice.duplicates), (0, 3));
    }

    #[test]
    fn broker_cpu_is_summed_over_its_processes() {
        assert_eq!(cpu_of(&[]), None);
        let me = std::process::id();
        // Burn a little CPU so that the figure is above zero.
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert_ne!(x, 1);
        let one = cpu_of(&[me]).expect("own CPU");
        let two = cpu_of(&[me, me]).expect("own CPU twice");
        // Read after `one`, so at least twice it (CPU time only grows).
        assert!(one > 0.0 && two >= 2.0 * one, "{one} {two}");
        // A process that is gone makes the sum unknown, not smaller.
        assert_eq!(cpu_of(&[me, u32::MAX]), None);
        assert_eq!(cpu_each(&[me, u32::MAX]), None);
        assert_eq!(cpu_each(&[]), None);
        let each = cpu_each(&[me, me]).expect("own CPU twice");
        assert_eq!(each.len(), 2);
        // In the order read, each at least `one`.
        assert!(each[0] >= one && each[1] >= each[0], "{one} {each:?}");
    }
}
