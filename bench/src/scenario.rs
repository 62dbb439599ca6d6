//! The scenarios, run by the coordinator against one broker: connect the
//! subscribers through the worker processes, do the scenario's phase, read
//! the broker's and our own CPU around it, and turn the workers' reports
//! into a [`RunResult`]. The latency scenario's search is in
//! [`crate::latency`]; both publish through [`crate::phase`].

use crate::cli::Opts;
use crate::fleet::{Fleet, FleetError};
use crate::latency;
use crate::net;
use crate::phase::{BUCKET_NS, TRACK_MSGS, cpu_of, fanout_figures, generator_usage, publish_phase};
use crate::procfs;
use crate::progress::Progress;
use crate::protocol::{Command, ConnectSummary, Event, WorkerTask};
use crate::publisher::Published;
use crate::result::{BrokerUsage, ConnectFigures, IdleFigures, Params, RunResult, StormFigures};
use crate::stats;
use crate::target::{CpuWindow, Phase, ScenarioError, Target};
use std::collections::BTreeMap;
use std::time::Duration;

/// File descriptors a worker keeps for itself (pipes, epoll, stdio).
const FD_RESERVE: u64 = 64;

/// Which scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Fanout,
    Connect,
    Idle,
    Storm,
    Latency,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Fanout => "fanout",
            Kind::Connect => "connect",
            Kind::Idle => "idle",
            Kind::Storm => "storm",
            Kind::Latency => "latency",
        }
    }
}

/// Checks options that clap cannot.
///
/// # Errors
/// A filter that does not match the topic, a topic too long, QoS > 0 with raw.
pub fn validate(o: &Opts) -> Result<(), ScenarioError> {
    let filter = o.filter.as_deref().unwrap_or(&o.topic);
    if !crate::mqtt::topic_matches(filter, &o.topic) {
        return Err(ScenarioError::Invalid(format!(
            "filter {filter:?} does not match topic {:?}: subscribers would receive nothing",
            o.topic
        )));
    }
    if o.topic.len() > 1024 || o.topic.contains(['+', '#']) {
        return Err(ScenarioError::Invalid(
            "topic must be short and without wildcards".into(),
        ));
    }
    if (o.payload as usize) < stats::STAMP_LEN {
        return Err(ScenarioError::Invalid(format!(
            "--payload must be at least {} bytes (timestamp and sequence number)",
            stats::STAMP_LEN
        )));
    }
    if o.rate.is_some_and(|r| !r.is_finite() || r <= 0.0) {
        return Err(ScenarioError::Invalid("--rate must be positive".into()));
    }
    latency::validate(o)?;
    Ok(())
}

/// The number of worker processes and connections per worker.
fn plan_workers(o: &Opts) -> (usize, u64) {
    // SAFETY: zeroed rlimit is a valid out-parameter.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    let hard = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_max
    } else {
        1024
    };
    let per_worker = o
        .conns_per_worker
        .min(hard.saturating_sub(FD_RESERVE))
        .max(1);
    let needed = o.subs.div_ceil(per_worker).max(1) as usize;
    let workers = o.workers.unwrap_or(needed).max(1);
    (workers, o.subs.div_ceil(workers as u64))
}

fn rss_of(pid: Option<u32>) -> Option<u64> {
    pid.and_then(|p| procfs::rss_bytes(p).ok())
}

/// Runs one scenario against one broker.
///
/// # Errors
/// The workers or the publisher failed; connection failures are results.
pub fn run(kind: Kind, o: &Opts, t: &Target, round: u32) -> Result<RunResult, ScenarioError> {
    let (workers, per_worker) = plan_workers(o);
    let filter = o.filter.clone().unwrap_or_else(|| o.topic.clone());
    let sources = if net::is_loopback(&t.addr) && t.addr.is_ipv4() {
        net::loopback_sources(o.subs.div_ceil(o.conns_per_addr.max(1)) as usize)
    } else {
        Vec::new()
    };
    let timeline_start = stats::monotonic_ns();
    let mut tasks = Vec::new();
    let mut first = 0;
    for w in 0..workers {
        let count = per_worker.min(o.subs - first);
        if count == 0 {
            break;
        }
        tasks.push(WorkerTask {
            worker: w,
            target: t.addr.to_string(),
            first_index: first,
            count,
            client_prefix: format!("fmb-{}-{round}-", std::process::id()),
            filter: filter.clone(),
            qos: o.qos,
            keep_alive_s: o.keep_alive,
            raw: t.raw,
            source_addrs: sources.clone(),
            conns_per_addr: o.conns_per_addr,
            max_pending: (o.max_pending / workers).max(1),
            handshake_timeout_ms: o.handshake_timeout_ms,
            timeline_start_ns: timeline_start,
            bucket_ns: BUCKET_NS,
            track_msgs: TRACK_MSGS,
        });
        first += count;
    }
    let mut result = RunResult {
        scenario: kind.name().into(),
        broker: t.label.clone(),
        round,
        params: Params {
            subs: o.subs,
            topic: o.topic.clone(),
            filter,
            qos: o.qos,
            payload: o.payload as usize,
            rate: o.rate,
            msgs: o.msgs,
            workers: tasks.len(),
            broker_cpus: o.broker_cpus.clone(),
            client_cpus: o.client_cpus.clone(),
        },
        ..RunResult::default()
    };
    let progress = Progress::new(&format!("{} vs {}", kind.name(), t.label));
    let rss_before = rss_of(t.pid);
    let sock_before = procfs::sockstat().unwrap_or_default();
    let mut fleet = Fleet::spawn(&tasks)?;

    // Connect phase (every scenario).
    let cpu0 = cpu_of(t.pid);
    let (connect, summaries) = connect_phase(&mut fleet, o, &progress)?;
    let cpu1 = cpu_of(t.pid);
    if let (Some(a), Some(b)) = (cpu0, cpu1)
        && connect.connected > 0
    {
        result.connect = Some(ConnectFigures {
            broker_cpu_us_per_conn: Some((b - a) * 1e6 / connect.connected as f64),
            ..connect
        });
    } else {
        result.connect = Some(connect);
    }
    let ready = result.connect.as_ref().map_or(0, |c| c.connected);
    if ready < o.subs {
        result.notes.push(format!(
            "only {ready} of {} subscribers connected; see connect failures",
            o.subs
        ));
    }
    let gen_cpu0: Vec<f64> = summaries.iter().map(|s| s.cpu_s).collect();
    let self_cpu0 = procfs::self_cpu_seconds();
    let wall0 = stats::monotonic_ns();
    let mut published = 0;
    // Sequence number after the last message of the final phase.
    let mut finish_seq = 0;
    let mut broker_window: CpuWindow = None;
    // The latency scenario measures its generator over its final run.
    let mut generator = None;

    match kind {
        Kind::Connect => {
            if let (Some(a), Some(b)) = (cpu0, cpu1) {
                let wall = summaries.iter().map(|s| s.ended_ns).max().unwrap_or(0)
                    - summaries.iter().map(|s| s.started_ns).min().unwrap_or(0);
                broker_window = Some((a, b, wall));
            }
        }
        Kind::Latency => {
            let out = latency::run(&mut fleet, o, t, ready, &gen_cpu0, &progress)?;
            result.fanout = out.fanout;
            result.latency = Some(out.figures);
            result.notes.extend(out.notes);
            result.params.rate = out.rate;
            result.params.msgs = out.planned;
            broker_window = out.window;
            generator = out.generator;
            finish_seq = out.finish_seq;
        }
        Kind::Fanout => {
            let (pubd, window) = fanout_phase(&mut fleet, o, t, ready, &progress)?;
            published = pubd.sent;
            finish_seq = pubd.sent;
            broker_window = window;
            if pubd.sent < o.msgs {
                result.notes.push(format!(
                    "published {} of {} messages before the time limit",
                    pubd.sent, o.msgs
                ));
            }
        }
        Kind::Idle => {
            let c0 = cpu_of(t.pid);
            let w0 = stats::monotonic_ns();
            let hold = Duration::from_secs_f64(o.hold);
            let end = std::time::Instant::now() + hold.min(Duration::from_secs_f64(o.duration));
            fleet.gather::<()>(
                "idle hold",
                hold + Duration::from_secs(5),
                &progress,
                |_| None,
                |_| std::time::Instant::now() >= end,
            )?;
            let c1 = cpu_of(t.pid);
            let wall = stats::monotonic_ns() - w0;
            let sock_after = procfs::sockstat().unwrap_or_default();
            let rss_after = rss_of(t.pid);
            let n = ready.max(1) as f64;
            result.idle = Some(IdleFigures {
                held: fleet.total().ready,
                hold_s: wall as f64 / 1e9,
                broker_rss_before: rss_before,
                broker_rss_after: rss_after,
                broker_rss_per_conn: rss_before
                    .zip(rss_after)
                    .map(|(a, b)| (b as f64 - a as f64) / n),
                sockstat_before: sock_before,
                sockstat_after: sock_after,
                kernel_mem_per_conn: ((sock_after.tcp_mem_bytes + sock_after.slab_bytes) as f64
                    - (sock_before.tcp_mem_bytes + sock_before.slab_bytes) as f64)
                    / n,
                broker_idle_cpu_us_per_conn_s: c0
                    .zip(c1)
                    .map(|(a, b)| (b - a) * 1e6 / n / (wall as f64 / 1e9)),
            });
            if let (Some(a), Some(b)) = (c0, c1) {
                broker_window = Some((a, b, wall));
            }
        }
        Kind::Storm => {
            let c0 = cpu_of(t.pid);
            let w0 = stats::monotonic_ns();
            fleet.send_all(&Command::Drop)?;
            let dropped: u64 = fleet
                .gather(
                    "drop",
                    Duration::from_secs(30),
                    &progress,
                    |e| match e {
                        Event::Dropped { closed } => Some(closed),
                        _ => None,
                    },
                    |_| false,
                )?
                .into_iter()
                .flatten()
                .sum();
            fleet.send_all(&Command::Connect)?;
            let limit = Duration::from_secs_f64(o.duration.min(o.connect_timeout));
            let back = fleet.gather(
                "reconnect",
                limit,
                &progress,
                |e| match e {
                    Event::Connected(s) => Some(s),
                    _ => None,
                },
                |_| false,
            );
            let w1 = stats::monotonic_ns();
            let c1 = cpu_of(t.pid);
            let mut storm = StormFigures {
                dropped,
                seconds: (w1 - w0) as f64 / 1e9,
                broker_cpu_s: c0.zip(c1).map(|(a, b)| b - a),
                ..StormFigures::default()
            };
            match back {
                Ok(back) => {
                    for s in back.into_iter().flatten() {
                        storm.back += s.ready;
                        storm.failed += s.failed;
                        for (k, v) in s.errors {
                            *storm.errors.entry(k).or_default() += v;
                        }
                    }
                }
                Err(FleetError::Timeout(..)) => {
                    storm.back = fleet.total().ready;
                    result
                        .notes
                        .push("storm: not all back within the time limit".into());
                }
                Err(e) => return Err(e.into()),
            }
            result.storm = Some(storm);
            if let (Some(a), Some(b)) = (c0, c1) {
                broker_window = Some((a, b, w1 - w0));
            }
        }
    }

    // Final reports.
    fleet.send_all(&Command::Finish {
        published: finish_seq,
    })?;
    let reports = fleet.gather_reports("reports", &progress)?;
    drop(fleet);
    let wall_s = (stats::monotonic_ns() - wall0) as f64 / 1e9;

    // Generator CPU over the measured phase.
    let (usage, note) = match generator {
        Some(g) => g,
        None => {
            let workers: Vec<f64> = reports
                .iter()
                .zip(&gen_cpu0)
                .map(|(r, c0)| r.cpu_s - c0)
                .collect();
            generator_usage(o, &workers, procfs::self_cpu_seconds() - self_cpu0, wall_s)
        }
    };
    result.generator = usage;
    result.notes.extend(note);

    if kind == Kind::Fanout {
        result.fanout = Some(fanout_figures(&reports, published).0);
    }
    if let (Some(pid), Some((a, b, wall))) = (t.pid, broker_window) {
        let cpu = b - a;
        result.broker_usage = Some(BrokerUsage {
            pid,
            cpu_s: cpu,
            wall_s: wall as f64 / 1e9,
            cores_busy: cpu / (wall as f64 / 1e9).max(1e-9),
            rss_bytes: rss_of(Some(pid)).unwrap_or(0),
            deliveries_per_cpu_s: result
                .fanout
                .as_ref()
                .filter(|_| cpu > 0.0)
                .map(|f| f.delivered as f64 / cpu),
        });
    }
    Ok(result)
}

/// Opens every connection; returns the figures and each worker's summary.
fn connect_phase(
    fleet: &mut Fleet,
    o: &Opts,
    progress: &Progress,
) -> Result<(ConnectFigures, Vec<ConnectSummary>), ScenarioError> {
    fleet.send_all(&Command::Connect)?;
    let summaries: Vec<ConnectSummary> = fleet
        .gather(
            "connections",
            Duration::from_secs_f64(o.connect_timeout),
            progress,
            |e| match e {
                Event::Connected(s) => Some(s),
                _ => None,
            },
            |_| false,
        )?
        .into_iter()
        .flatten()
        .collect();
    let mut hist = stats::new_hist();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let (mut ready, mut failed) = (0, 0);
    for s in &summaries {
        ready += s.ready;
        failed += s.failed;
        for (k, v) in &s.errors {
            *errors.entry(k.clone()).or_default() += v;
        }
        // Pairs come from our own workers' histograms: always in range.
        let _ = stats::add_pairs(&mut hist, &s.latency);
    }
    let start = summaries.iter().map(|s| s.started_ns).min().unwrap_or(0);
    let end = summaries.iter().map(|s| s.ended_ns).max().unwrap_or(0);
    let seconds = (end.saturating_sub(start)) as f64 / 1e9;
    progress.println(&format!(
        "connected {ready} of {} in {seconds:.2} s ({failed} failed)",
        o.subs
    ));
    Ok((
        ConnectFigures {
            attempted: o.subs,
            connected: ready,
            failed,
            errors,
            seconds,
            conns_per_s: ready as f64 / seconds.max(1e-9),
            broker_cpu_us_per_conn: None,
            latency: stats::summarize(&hist),
        },
        summaries,
    ))
}

/// The fan-out scenario's one phase: `--msgs` at `--rate` (or burst) within
/// `--duration`.
fn fanout_phase(
    fleet: &mut Fleet,
    o: &Opts,
    t: &Target,
    ready: u64,
    progress: &Progress,
) -> Result<(Published, CpuWindow), ScenarioError> {
    let phase = Phase {
        msgs: o.msgs,
        rate: o.rate,
        first_seq: 0,
        track_stride: 1,
        limit_ns: (o.duration * 1e9) as u64,
    };
    publish_phase(fleet, o, t, ready, &phase, progress)
}
