//! The scenarios, run by the coordinator against one broker: connect the
//! subscribers through the worker processes, do the scenario's phase, read
//! the broker's and our own CPU around it, and turn the workers' reports
//! into a [`RunResult`]. The latency scenario's search is in
//! [`crate::latency`]; both publish through [`crate::phase`].

use crate::capacity;
use crate::cli::{Handshake, Opts};
use crate::fleet::{Fleet, FleetError};
use crate::latency;
use crate::net;
use crate::part;
use crate::phase::{
    self, BUCKET_NS, TRACK_MSGS, cpu_of, fanout_figures, generator_usage, publish_phase,
};
use crate::procfs;
use crate::progress::Progress;
use crate::protocol::{Command, ConnectSummary, Event, WorkerTask};
use crate::result::{
    BrokerUsage, ConnectFigures, IdleFigures, Params, PartRecord, RunResult, StormFigures,
};
use crate::stats;
use crate::target::{CpuWindow, Phase, ScenarioError, Target};
use std::time::Duration;

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
    if o.publisher_protocol == crate::mqtt::Protocol::Mixed {
        return Err(ScenarioError::Invalid(
            "--publisher-protocol is 4 or 5 (mixed is for subscribers)".into(),
        ));
    }
    part::validate(o)?;
    latency::validate(o)?;
    Ok(())
}

/// The broker's RSS, summed over its processes (`None` without a pid, or
/// once one of them is gone).
fn rss_of(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| procfs::rss_bytes(p).ok()).sum()
}

/// The broker's peak RSS (VmHWM), summed over its processes: with several
/// nodes an upper bound of their peak together, since each peaked when it
/// did.
fn peak_rss_of(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| procfs::peak_rss_bytes(p).ok()).sum()
}

/// (`after` − `before`) ÷ `conns` in bytes, when both were read.
fn growth_per_conn(before: Option<u64>, after: Option<u64>, conns: u64) -> Option<f64> {
    before
        .zip(after)
        .map(|(a, b)| (b as f64 - a as f64) / conns.max(1) as f64)
}

/// Runs one scenario against one broker.
///
/// # Errors
/// The workers or the publisher failed; connection failures are results.
pub fn run(kind: Kind, o: &Opts, t: &Target, round: u32) -> Result<RunResult, ScenarioError> {
    // This host's share of the subscribers (all of them without --part).
    let (first_index, end_index) = o.part.map_or((0, o.subs), |p| p.share(o.subs));
    let subs = end_index - first_index;
    let publishes = o.part.is_none_or(|p| p.publishes());
    let limits = capacity::Limits::of_this_host();
    let (workers, per_worker) =
        capacity::plan_workers(subs, o.conns_per_worker, o.workers, limits.nofile_hard);
    let filter = o.filter.clone().unwrap_or_else(|| o.topic.clone());
    let filter = match &o.shared_group {
        Some(group) => format!("$share/{group}/{filter}"),
        None => filter,
    };
    let sources: Vec<String> = if !o.source_addrs.is_empty() {
        let ips = net::parse_sources(&o.source_addrs)?;
        let missing = net::unconfigured(&ips);
        if !missing.is_empty() {
            return Err(capacity::CapacityError::Unconfigured(missing).into());
        }
        ips.iter().map(ToString::to_string).collect()
    } else if net::is_loopback(&t.addr) && t.addr.is_ipv4() {
        net::loopback_sources(subs.div_ceil(o.conns_per_addr.max(1)) as usize)
    } else {
        Vec::new()
    };
    let need = capacity::Need {
        conns: subs + u64::from(publishes && matches!(kind, Kind::Fanout | Kind::Latency)),
        sources: sources.len() as u64,
        targets: t.listeners.len() as u64,
        workers,
        per_worker,
    };
    let fits = capacity::check(&need, &limits)?;
    log::info!("{fits}");
    let clock = phase::stamp_clock(o);
    // Bucket 0 starts on a multiple of the bucket width, so the timelines
    // of parts on other hosts (wall clock) line up bucket for bucket.
    let timeline_start = clock.now_ns() / BUCKET_NS * BUCKET_NS;
    let client_prefix = match o.part {
        // The index is global: ids stay unique over all parts.
        Some(p) => format!("fmb-part{}-{round}-", p.of),
        None => format!("fmb-{}-{round}-", std::process::id()),
    };
    let mut tasks = Vec::new();
    let mut first = first_index;
    for w in 0..workers as usize {
        let count = per_worker.min(end_index - first);
        if count == 0 {
            break;
        }
        tasks.push(WorkerTask {
            worker: w,
            targets: t.listeners.iter().map(ToString::to_string).collect(),
            first_index: first,
            count,
            client_prefix: client_prefix.clone(),
            filter: filter.clone(),
            qos: o.qos,
            protocol: o.protocol,
            topic_alias_max: o.topic_alias_max,
            keep_alive_s: o.keep_alive,
            persistent: !o.clean_session,
            raw: t.raw,
            transport: o.transport,
            tls: t.tls.clone(),
            source_addrs: sources.clone(),
            // The storm opens every socket at once, each sending SUBSCRIBE
            // once its CONNACK is in (as MQTT.js does).
            max_pending: if kind == Kind::Storm {
                count as usize
            } else {
                (o.connect_in_flight / workers as usize).max(1)
            },
            pipeline: kind != Kind::Storm && o.handshake == Handshake::Pipelined,
            coalesce_acks: o.coalesce_acks,
            handshake_timeout_ms: o.handshake_timeout_ms,
            reconnect_ms: o
                .reconnect_ms
                .unwrap_or(if kind == Kind::Storm { 1000 } else { 0 }),
            timeline_start_ns: timeline_start,
            bucket_ns: BUCKET_NS,
            track_msgs: TRACK_MSGS,
            clock,
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
            protocol: o.protocol,
            publisher_protocol: o.publisher_protocol,
            topic_alias_max: o.topic_alias_max,
            payload: o.payload as usize,
            rate: o.rate,
            msgs: o.msgs,
            workers: tasks.len(),
            shared_group: o.shared_group.clone(),
            broker_cpus: o.broker_cpus.clone(),
            client_cpus: o.client_cpus.clone(),
            transport: o.transport,
        },
        notes: vec![fits],
        ..RunResult::default()
    };
    let progress = Progress::new(&format!("{} vs {}", kind.name(), t.label));
    // The peak (VmHWM) counts from here: a broker measured before (an
    // earlier round, --broker-pid) would otherwise report its old peak.
    for &pid in &t.pids {
        if let Err(e) = procfs::reset_peak_rss(pid) {
            result.notes.push(format!(
                "broker {pid}: peak RSS not reset ({e}): it counts from the broker's start"
            ));
        }
    }
    let rss_before = rss_of(&t.pids);
    let sock_before = procfs::sockstat().unwrap_or_default();
    let mut fleet = Fleet::spawn(&tasks)?;

    // Connect phase (every scenario).
    let cpu0 = cpu_of(&t.pids);
    let (connect, summaries) = connect_phase(&mut fleet, o, subs, &progress)?;
    let cpu1 = cpu_of(&t.pids);
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
    if ready < subs {
        result.notes.push(format!(
            "only {ready} of {subs} subscribers connected; see connect failures"
        ));
    }
    let gen_cpu0: Vec<f64> = summaries.iter().map(|s| s.cpu_s).collect();
    let self_cpu0 = procfs::self_cpu_seconds();
    let wall0 = stats::monotonic_ns();
    let mut published = 0;
    // Sequence number after the last message of the final phase.
    let mut finish_seq = 0;
    let mut broker_window: CpuWindow = None;
    // Each broker process's share of the window (fan-out).
    let mut cpu_each_s = Vec::new();
    // The broker's RSS over the fan-out phase.
    let mut broker_rss = Vec::new();
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
        Kind::Fanout if !publishes => {
            part::receive_only(&mut fleet, o, ready, &progress)?;
            // A part that only subscribes expects every planned message.
            published = o.msgs;
            finish_seq = o.msgs;
        }
        Kind::Fanout => {
            part::before_publishing(&mut fleet, o, &progress, &mut result.notes)?;
            let run = fanout_phase(&mut fleet, o, t, ready, &progress)?;
            let pubd = run.published;
            published = pubd.sent;
            finish_seq = pubd.sent;
            broker_window = run.window;
            cpu_each_s = run.cpu_each_s;
            broker_rss = run.broker_rss;
            if pubd.sent < o.msgs {
                result.notes.push(format!(
                    "published {} of {} messages before the time limit",
                    pubd.sent, o.msgs
                ));
            }
        }
        Kind::Idle => {
            if o.settle > 0.0 {
                // Connect-time work that ends by itself (a broker parking
                // its new connections, say) stays out of the window.
                hold_connections(
                    &mut fleet,
                    "idle settle",
                    Duration::from_secs_f64(o.settle),
                    &progress,
                )?;
            }
            let c0 = cpu_of(&t.pids);
            let w0 = stats::monotonic_ns();
            let hold = Duration::from_secs_f64(o.hold).min(Duration::from_secs_f64(o.duration));
            hold_connections(&mut fleet, "idle hold", hold, &progress)?;
            let c1 = cpu_of(&t.pids);
            let wall = stats::monotonic_ns() - w0;
            let sock_after = procfs::sockstat().unwrap_or_default();
            let rss_after = rss_of(&t.pids);
            let peak_after = peak_rss_of(&t.pids);
            let n = ready.max(1) as f64;
            result.idle = Some(IdleFigures {
                held: fleet.total().ready,
                hold_s: wall as f64 / 1e9,
                broker_rss_before: rss_before,
                broker_rss_after: rss_after,
                broker_rss_per_conn: rss_before
                    .zip(rss_after)
                    .map(|(a, b)| (b as f64 - a as f64) / n),
                broker_peak_rss_after: peak_after,
                broker_peak_rss_per_conn: growth_per_conn(rss_before, peak_after, ready),
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
            let c0 = cpu_of(&t.pids);
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
            let c1 = cpu_of(&t.pids);
            let peak_after = peak_rss_of(&t.pids);
            let mut storm = StormFigures {
                dropped,
                seconds: (w1 - w0) as f64 / 1e9,
                broker_cpu_s: c0.zip(c1).map(|(a, b)| b - a),
                // The connect phase above was the first storm.
                open_seconds: result.connect.as_ref().map_or(0.0, |c| c.seconds),
                broker_peak_rss_after: peak_after,
                broker_peak_rss_per_conn: growth_per_conn(rss_before, peak_after, subs),
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
    if let Some(p) = o.part {
        result.params.workers = tasks.len();
        result.notes.push(format!(
            "part {}/{} on this host: subscribers {first_index}..{end_index} of {}{}",
            p.index,
            p.of,
            o.subs,
            if publishes { ", and the publisher" } else { "" }
        ));
    }

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
        let mut figures = fanout_figures(&reports, published).0;
        figures.broker_rss = broker_rss;
        figures.rss_period_ms = phase::RSS_PERIOD.as_millis() as u64;
        if o.shared_group.is_some() {
            phase::shared_figures(&mut figures);
            result.notes.push(phase::SHARED_NOTE.into());
        }
        result.fanout = Some(figures);
    }
    phase::add_generator_memory(&mut result.generator, &summaries);
    if let Some(part) = o.part {
        result.part = Some(PartRecord {
            part,
            publisher: publishes,
            clock,
            timeline_start_ns: timeline_start,
            connects: summaries,
            reports,
        });
    }
    if let (Some(&pid), Some((a, b, wall))) = (t.pids.first(), broker_window) {
        let cpu = b - a;
        result.broker_usage = Some(BrokerUsage {
            pid,
            pids: if t.pids.len() > 1 {
                t.pids.clone()
            } else {
                Vec::new()
            },
            cpu_s: cpu,
            cpu_each_s: if t.pids.len() > 1 {
                cpu_each_s
            } else {
                Vec::new()
            },
            wall_s: wall as f64 / 1e9,
            cores_busy: cpu / (wall as f64 / 1e9).max(1e-9),
            rss_bytes: rss_of(&t.pids).unwrap_or(0),
            deliveries_per_cpu_s: result
                .fanout
                .as_ref()
                .filter(|_| cpu > 0.0)
                .map(|f| f.delivered as f64 / cpu),
        });
    }
    Ok(result)
}

/// Keeps the connections open for `time`, the workers answering pings and
/// reporting progress.
fn hold_connections(
    fleet: &mut Fleet,
    what: &'static str,
    time: Duration,
    progress: &Progress,
) -> Result<(), FleetError> {
    let end = std::time::Instant::now() + time;
    fleet.gather::<()>(
        what,
        time + Duration::from_secs(5),
        progress,
        |_| None,
        |_| std::time::Instant::now() >= end,
    )?;
    Ok(())
}

/// Opens every connection; returns the figures and each worker's summary.
fn connect_phase(
    fleet: &mut Fleet,
    o: &Opts,
    subs: u64,
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
    let figures = phase::connect_figures(&summaries, subs);
    progress.println(&format!(
        "connected {} of {subs} in {:.2} s ({} failed)",
        figures.connected, figures.seconds, figures.failed
    ));
    Ok((figures, summaries))
}

/// The fan-out scenario's one phase: `--msgs` at `--rate` (or burst) within
/// `--duration`.
fn fanout_phase(
    fleet: &mut Fleet,
    o: &Opts,
    t: &Target,
    ready: u64,
    progress: &Progress,
) -> Result<phase::PhaseRun, ScenarioError> {
    let phase = Phase {
        msgs: o.msgs,
        rate: o.rate,
        first_seq: 0,
        track_stride: 1,
        limit_ns: (o.duration * 1e9) as u64,
    };
    publish_phase(fleet, o, t, ready, &phase, progress)
}
