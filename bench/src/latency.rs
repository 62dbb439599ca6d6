//! The `latency` scenario: issue 3's latency target, measured.
//!
//! > At half of the broker's maximum rate, p99 publish→subscriber ≤
//! > 1.2 × subscribers ÷ max deliveries/s, and no backlog growth.
//!
//! 1. **Find the maximum sustained rate R_max** for the N subscribers with
//!    open-loop paced steps (one send per message, [`crate::publisher`]):
//!    start at `--start-rate`, double while sustained (halve while not, if
//!    even the start is too fast), then bisect (geometric midpoint) between
//!    the highest sustained and the lowest unsustained rate until they are
//!    within `--precision` of each other, for at most `--max-steps` steps of
//!    `--step-duration` seconds each ([`RateSearch`]).
//! 2. **A step is sustained** ([`judge`]) when the publisher kept its
//!    schedule (every planned message went out within the step's limit),
//!    every subscriber counted at the step's start received every message
//!    (nothing lost, no connection broke), and the lag did not grow
//!    ([`lag_trend`]).
//! 3. **The lag** of message k is when its *last* subscriber got it minus
//!    when it was *due* (its send time plus the publisher's slip behind
//!    schedule, so a broker that stops reading cannot hide its backlog in
//!    our socket). It grows when the median lag of the last tenth of the
//!    step's messages exceeds the median of the first tenth by more than the
//!    tolerance: the largest of [`GROWTH_FLOOR_MS`], [`GROWTH_SLOPE`] of the
//!    time between the two tenths, and [`GROWTH_REL`] of the first tenth's
//!    lag. Medians of tenths, not a fitted slope: one scheduler hiccup does
//!    not fail a step, a queue that fills at a steady overload does (a rate
//!    ε above capacity adds ε·t of lag). The relative term is there because
//!    a broker that coalesces (one write per subscriber carries every
//!    message queued for it) runs at a lag of about one pass over all its
//!    subscribers, hundreds of ms at 10k, which swings with the CPU it gets;
//!    on this shared 2-core host a 20 ms tolerance failed steps at a tenth of
//!    the rate another run sustained. A false failure would *understate*
//!    R_max and so *loosen* the bound in the broker's favour; a missed small
//!    overload overstates R_max by at most the bisection step, which only
//!    tightens the bound.
//! 4. **Measure at R_max / 2** for `--duration` seconds: p50/p99/p999/max
//!    publish→subscriber (the fan-out figures of the run), the bound
//!    1.2 × N ÷ (R_max × N) ([`bound_us`]), whether p99 meets it, and the
//!    same lag trend over the whole run (backlog growth), with the broker's
//!    CPU-seconds and the load generator's own CPU.
//!
//! Every step says whether the load generator was saturated; when it was at
//! the first rate that failed, R_max is of broker and generator together on
//! this host, a lower bound for the broker, and the result says so.
//!
//! Bounded: at most `--max-steps` steps, each at most `--step-duration` ×
//! [`STEP_SLACK`] + `--drain-timeout` seconds, plus a wait of at most
//! [`SETTLE_LIMIT_S`] for a backlog to clear and a reconnect of shed
//! subscribers (at most `--connect-timeout`); then one run of at most
//! `--duration` × [`STEP_SLACK`] + `--drain-timeout`. Traffic goes where
//! every scenario's does (loopback unless `--host` says otherwise).

use crate::cli::Opts;
use crate::fleet::{Fleet, FleetError};
use crate::phase;
use crate::procfs;
use crate::progress::Progress;
use crate::protocol::{Command, Event, WorkerReport};
use crate::result::{FanoutFigures, GeneratorUsage, LagTrend, LatencyFigures, LatencyStep};
use crate::stats;
use crate::target::{CpuWindow, Phase, ScenarioError, Target};
use std::time::Duration;

/// Issue 3's factor: p99 ≤ 1.2 × N ÷ max deliveries/s, i.e. 1.2 times the
/// time the broker needs to fan one message out to all N at its maximum.
pub const BOUND_FACTOR: f64 = 1.2;

/// Fewest messages a step publishes: 5 per tenth for the lag medians.
pub const MIN_STEP_MSGS: u64 = 50;

/// Highest rate the search tries (msg/s): far above what one publisher
/// connection sends at one `send` per message, so only a broker and
/// generator that keep up with everything stop the doubling here.
pub const MAX_RATE: f64 = 5_000_000.0;

/// A step (or the final run) may take this many times its schedule to
/// publish; a publisher still behind then has failed to keep the rate.
pub const STEP_SLACK: f64 = 1.5;

/// Lag growth always tolerated (ms): above the scheduling noise of a busy
/// 2-core host, below any backlog worth the name.
pub const GROWTH_FLOOR_MS: f64 = 20.0;

/// Lag growth tolerated per second between the first and last tenth: a
/// queue growing at 1% of the elapsed time is a 1% overload.
pub const GROWTH_SLOPE: f64 = 0.01;

/// Lag growth tolerated relative to the first tenth's lag: the lag may not
/// double (see the module doc for why a relative term is needed).
pub const GROWTH_REL: f64 = 1.0;

/// A step whose messages did not all arrive leaves a backlog in the broker;
/// the next step starts once no old message arrived for this long (s)...
pub const SETTLE_QUIET_S: f64 = 1.0;

/// ... or, if the backlog never clears, the search stops after this (s).
pub const SETTLE_LIMIT_S: f64 = 60.0;

/// Other processes using more than this fraction of the broker's CPUs
/// during a phase make the result say the host was contended: the broker
/// was short of CPU it would have had on a quiet host.
pub const CONTENDED: f64 = 0.2;

/// The fraction of the broker's `ncpus` CPUs that other processes used:
/// those CPUs' busy fraction minus the broker's own share of them.
pub fn others_share(
    cpus_busy: Option<f64>,
    broker_cores: Option<f64>,
    ncpus: usize,
) -> Option<f64> {
    let (busy, cores) = (cpus_busy?, broker_cores?);
    Some((busy - cores / ncpus.max(1) as f64).max(0.0))
}

/// The lag trend of `lags_ns` (one per message, in publish order, 0 = not
/// received by every subscriber and left out) for messages published over
/// `span_s` seconds; `None` with fewer than 10 lags.
pub fn lag_trend(lags_ns: &[u64], span_s: f64) -> Option<LagTrend> {
    let lags: Vec<u64> = lags_ns.iter().copied().filter(|&l| l > 0).collect();
    if lags.len() < 10 {
        return None;
    }
    let tenth = lags.len() / 10;
    let median_ms = |part: &[u64]| -> f64 {
        let mut v = part.to_vec();
        v.sort_unstable();
        v[v.len() / 2] as f64 / 1e6
    };
    let first_ms = median_ms(&lags[..tenth]);
    let last_ms = median_ms(&lags[lags.len() - tenth..]);
    let growth_ms = last_ms - first_ms;
    // The tenths' centres are 0.9 of the span apart.
    let tolerance_ms = GROWTH_FLOOR_MS
        .max(GROWTH_SLOPE * 0.9 * span_s * 1000.0)
        .max(GROWTH_REL * first_ms);
    Some(LagTrend {
        messages: lags.len() as u64,
        first_ms,
        last_ms,
        growth_ms,
        tolerance_ms,
        grows: growth_ms > tolerance_ms,
    })
}

/// What a step did, as far as the verdict goes.
#[derive(Debug, Clone, Default)]
pub struct StepOutcome {
    pub planned: u64,
    pub published: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    /// Subscriber connections that broke during the step.
    pub broken: u64,
    pub lag: Option<LagTrend>,
}

/// Whether a step was sustained: `Ok` or the reason it was not.
///
/// # Errors
/// The first reason the step was not sustained, as text for the results.
pub fn judge(s: &StepOutcome) -> Result<(), String> {
    if s.published < s.planned {
        return Err(format!(
            "publisher fell behind ({} of {} sent in time)",
            s.published, s.planned
        ));
    }
    if s.broken > 0 {
        return Err(format!("{} subscriber connection(s) broke", s.broken));
    }
    if s.lost > 0 || s.delivered < s.expected {
        return Err(format!(
            "{} lost, {} of {} delivered",
            s.lost, s.delivered, s.expected
        ));
    }
    match &s.lag {
        None => Err("too few messages to judge the lag".into()),
        Some(l) if l.grows => Err(format!(
            "lag grew {:.1} ms (tolerance {:.1})",
            l.growth_ms, l.tolerance_ms
        )),
        Some(_) => Ok(()),
    }
}

/// Issue 3's bound in µs: 1.2 × N ÷ max deliveries/s.
pub fn bound_us(subscribers: u64, max_deliveries_per_s: f64) -> f64 {
    BOUND_FACTOR * subscribers as f64 / max_deliveries_per_s * 1e6
}

/// The rate search: doubling (or halving) to bracket the maximum, then
/// bisection. Knows nothing about brokers: it is told each step's verdict.
#[derive(Debug, Clone)]
pub struct RateSearch {
    /// Highest sustained rate so far.
    lo: Option<f64>,
    /// Lowest unsustained rate so far.
    hi: Option<f64>,
    /// Rates below this are not tried (too few messages per step).
    floor: f64,
    /// Rates above this are not tried.
    cap: f64,
    /// Stop when `hi / lo ≤ 1 + precision`.
    precision: f64,
}

/// Why the search stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchEnd {
    /// `hi / lo` within the precision.
    Converged,
    /// Doubling would pass the cap: everything up to it was sustained.
    Cap,
    /// Halving would go below the floor: nothing was sustained.
    Floor,
}

impl RateSearch {
    pub fn new(floor: f64, cap: f64, precision: f64) -> Self {
        Self {
            lo: None,
            hi: None,
            floor,
            cap,
            precision,
        }
    }

    /// Records the verdict of a step at `rate`; returns the next rate to
    /// try, or why the search is over.
    ///
    /// # Errors
    /// Not an error: `Err` is the end of the search.
    pub fn next(&mut self, rate: f64, sustained: bool) -> Result<f64, SearchEnd> {
        if sustained {
            self.lo = Some(self.lo.map_or(rate, |l| l.max(rate)));
        } else {
            self.hi = Some(self.hi.map_or(rate, |h| h.min(rate)));
        }
        match (self.lo, self.hi) {
            (Some(lo), Some(hi)) if hi / lo <= 1.0 + self.precision => Err(SearchEnd::Converged),
            (Some(lo), Some(hi)) => Ok((lo * hi).sqrt()),
            (Some(lo), None) if lo * 2.0 > self.cap => Err(SearchEnd::Cap),
            (Some(lo), None) => Ok(lo * 2.0),
            (None, Some(hi)) if hi / 2.0 < self.floor => Err(SearchEnd::Floor),
            (None, Some(hi)) => Ok(hi / 2.0),
            (None, None) => Err(SearchEnd::Floor), // unreachable: one was set.
        }
    }

    /// The highest sustained rate.
    pub fn max_sustained(&self) -> Option<f64> {
        self.lo
    }

    /// The lowest rate that was not sustained.
    pub fn lowest_failed(&self) -> Option<f64> {
        self.hi
    }
}

/// Checks the latency options.
///
/// # Errors
/// A start rate too low for [`MIN_STEP_MSGS`] per step, or a bad number.
pub fn validate(o: &Opts) -> Result<(), ScenarioError> {
    let bad = |what: &str| Err(ScenarioError::Invalid(what.into()));
    if !(o.step_duration.is_finite() && o.step_duration > 0.0) {
        return bad("--step-duration must be positive");
    }
    if !(o.start_rate.is_finite() && o.start_rate > 0.0) {
        return bad("--start-rate must be positive");
    }
    if !(o.precision.is_finite() && o.precision > 0.0) {
        return bad("--precision must be positive");
    }
    if o.max_rate.is_some_and(|r| !r.is_finite() || r <= 0.0) {
        return bad("--max-rate must be positive");
    }
    if o.start_rate * o.step_duration < MIN_STEP_MSGS as f64 {
        return Err(ScenarioError::Invalid(format!(
            "--start-rate × --step-duration must be at least {MIN_STEP_MSGS} messages (the lag trend needs them)"
        )));
    }
    Ok(())
}

/// What [`run`] hands back to the scenario.
#[derive(Debug, Default)]
pub struct Outcome {
    pub figures: LatencyFigures,
    /// The fan-out figures of the run at R_max / 2.
    pub fanout: Option<FanoutFigures>,
    /// Broker CPU window of the run at R_max / 2.
    pub window: CpuWindow,
    /// Generator CPU of the run at R_max / 2 (and its saturation note).
    pub generator: Option<(GeneratorUsage, Option<String>)>,
    pub notes: Vec<String>,
    /// R_max / 2 and the messages planned at it.
    pub rate: Option<f64>,
    pub planned: u64,
    /// Sequence number after the last message sent (for `Finish`).
    pub finish_seq: u64,
}

/// Where the coordinator and its workers stand between phases.
struct Cursor {
    /// Next sequence number.
    seq: u64,
    /// Each worker's CPU-seconds at the last report.
    worker_cpu: Vec<f64>,
    /// Subscribers ready after the last phase.
    ready: u64,
    /// The subscribers the scenario connected.
    wanted: u64,
}

/// One measured phase (a search step or the final run): its figures.
struct Measured {
    fanout: FanoutFigures,
    outcome: StepOutcome,
    window: CpuWindow,
    generator: (GeneratorUsage, Option<String>),
    /// Everything delivered: nothing of it can still be in flight.
    clean: bool,
    /// The broker's CPUs busy with anything over the phase (fraction).
    broker_cpus_busy: Option<f64>,
}

/// Runs the search and the measured run. The fleet is connected; `ready`
/// subscribers are up; `worker_cpu` is each worker's CPU-seconds so far.
///
/// # Errors
/// A worker or the publisher failed.
pub fn run(
    fleet: &mut Fleet,
    o: &Opts,
    t: &Target,
    ready: u64,
    worker_cpu: &[f64],
    progress: &Progress,
) -> Result<Outcome, ScenarioError> {
    let mut out = Outcome::default();
    let mut cur = Cursor {
        seq: 0,
        worker_cpu: worker_cpu.to_vec(),
        ready,
        wanted: ready,
    };
    out.figures.subscribers = ready;
    let ncpus = o
        .broker_cpus
        .as_deref()
        .and_then(|l| procfs::parse_cpu_list(l).ok())
        .map_or(1, |c| c.len());
    let mut search = RateSearch::new(
        MIN_STEP_MSGS as f64 / o.step_duration,
        MAX_RATE,
        o.precision,
    );
    let mut end = None;
    if let Some(r) = o.max_rate {
        out.figures.search = "given by --max-rate".into();
        out.figures.max_rate = Some(r);
    } else {
        let mut rate = o.start_rate;
        for step in 0..o.max_steps {
            if !prepare(fleet, o, &mut cur, progress, &mut out.notes)? {
                break;
            }
            progress.println(&format!(
                "step {}: {rate:.1} msg/s to {} subscribers",
                step + 1,
                cur.ready
            ));
            let m = measure(fleet, o, t, &mut cur, rate, o.step_duration, progress)?;
            let verdict = judge(&m.outcome);
            let (g, _) = &m.generator;
            out.figures.steps.push(LatencyStep {
                rate,
                planned: m.outcome.planned,
                published: m.outcome.published,
                subscribers: m.fanout.expected / m.fanout.published.max(1),
                delivered: m.outcome.delivered,
                expected: m.outcome.expected,
                lost: m.outcome.lost,
                broken: m.outcome.broken,
                lag: m.outcome.lag.clone(),
                p99_us: m.fanout.latency.p99_us,
                broker_cores_busy: m
                    .window
                    .map(|(a, b, w)| (b - a) / (w as f64 / 1e9).max(1e-9)),
                broker_cpus_busy: m.broker_cpus_busy,
                generator_busy: g.cpu_s / g.wall_s.max(1e-9) / g.cpus.max(1) as f64,
                generator_saturated: g.saturated,
                sustained: verdict.is_ok(),
                why: verdict.clone().err().unwrap_or_default(),
            });
            progress.println(&format!(
                "step {}: {rate:.1} msg/s {}",
                step + 1,
                match &verdict {
                    Ok(()) => "sustained".to_owned(),
                    Err(why) => format!("not sustained: {why}"),
                }
            ));
            if !m.clean && !settle(fleet, progress)? {
                out.notes.push(format!(
                    "search stopped: the broker was still delivering old messages {SETTLE_LIMIT_S} s after a step"
                ));
                break;
            }
            match search.next(rate, verdict.is_ok()) {
                Ok(next) => rate = next,
                Err(e) => {
                    end = Some(e);
                    break;
                }
            }
        }
        out.figures.max_rate = search.max_sustained();
        out.figures.failed_rate = search.lowest_failed();
        out.figures.search = match end {
            Some(SearchEnd::Converged) => format!("converged to {:.0}%", o.precision * 100.0),
            Some(SearchEnd::Cap) => format!("sustained up to the cap of {MAX_RATE} msg/s"),
            Some(SearchEnd::Floor) => "nothing sustained down to the floor".into(),
            None => format!("stopped after {} step(s)", out.figures.steps.len()),
        };
        out.figures.limited_by = limited_by(&out.figures);
        let worst = out
            .figures
            .steps
            .iter()
            .filter_map(|s| {
                others_share(s.broker_cpus_busy, s.broker_cores_busy, ncpus).map(|o| (o, s.rate))
            })
            .filter(|&(o, _)| o > CONTENDED)
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((share, at)) = worst {
            out.notes.push(format!(
                "host contended: other processes used up to {:.0}% of the broker's CPUs during the search (step at {at:.1} msg/s); R_max may be understated: rerun on a quiet host",
                share * 100.0
            ));
        }
        if let Some(hi) = out.figures.failed_rate
            && out
                .figures
                .steps
                .iter()
                .any(|s| s.rate == hi && s.generator_saturated)
        {
            out.notes.push(format!(
                "the load generator was saturated at {hi:.1} msg/s, the first rate not sustained: R_max is of broker and generator together on this host, a lower bound for the broker"
            ));
        }
    }
    let Some(max_rate) = out.figures.max_rate else {
        out.notes
            .push("no rate was sustained: nothing measured at half of it".into());
        out.finish_seq = cur.seq;
        return Ok(out);
    };
    let n = cur.wanted;
    let max_dps = max_rate * n as f64;
    out.figures.max_deliveries_per_s = Some(max_dps);
    out.figures.bound_us = Some(bound_us(n, max_dps));
    let rate = max_rate / 2.0;
    out.figures.rate = Some(rate);
    out.rate = Some(rate);
    if !prepare(fleet, o, &mut cur, progress, &mut out.notes)? {
        out.finish_seq = cur.seq;
        return Ok(out);
    }
    progress.println(&format!(
        "measuring at R_max / 2 = {rate:.1} msg/s for {} s",
        o.duration
    ));
    let m = measure(fleet, o, t, &mut cur, rate, o.duration, progress)?;
    let verdict = judge(&m.outcome);
    out.planned = m.outcome.planned;
    out.figures.p99_us = Some(m.fanout.latency.p99_us);
    out.figures.meets_bound = out.figures.bound_us.map(|b| m.fanout.latency.p99_us <= b);
    out.figures.lag = m.outcome.lag.clone();
    out.figures.sustained = Some(verdict.is_ok());
    let cores = m
        .window
        .map(|(a, b, w)| (b - a) / (w as f64 / 1e9).max(1e-9));
    if let Some(share) = others_share(m.broker_cpus_busy, cores, ncpus).filter(|&o| o > CONTENDED) {
        out.notes.push(format!(
            "host contended: other processes used {:.0}% of the broker's CPUs during the run at R_max / 2: rerun on a quiet host",
            share * 100.0
        ));
    }
    if let Err(why) = verdict {
        out.notes
            .push(format!("the run at R_max / 2 was not sustained: {why}"));
    }
    out.fanout = Some(m.fanout);
    out.window = m.window;
    out.generator = Some(m.generator);
    out.finish_seq = cur.seq;
    Ok(out)
}

/// What limited the search, judged at the first rate not sustained.
fn limited_by(f: &LatencyFigures) -> String {
    let Some(step) = f
        .failed_rate
        .and_then(|hi| f.steps.iter().find(|s| s.rate == hi))
    else {
        return "nothing (no rate failed)".into();
    };
    if step.generator_saturated {
        "the load generator (saturated): R_max is a lower bound for the broker".into()
    } else if step
        .broker_cores_busy
        .is_some_and(|c| c >= phase::SATURATED)
    {
        "the broker's CPU".into()
    } else if let Some(busy) = step.broker_cpus_busy.filter(|&b| b >= phase::SATURATED) {
        format!(
            "the broker's CPUs, {:.0}% busy, but only {} cores of that by the broker: other processes on this host took the rest (rerun on a quiet host)",
            busy * 100.0,
            fmt_cores(step.broker_cores_busy)
        )
    } else if step.published < step.planned {
        "the publisher's schedule (the broker stopped reading, or the publisher fell behind)".into()
    } else {
        "neither CPU saturated (latency, not throughput, failed the step)".into()
    }
}

fn fmt_cores(c: Option<f64>) -> String {
    c.map_or("–".into(), |c| format!("{c:.2}"))
}

/// Before a phase: reconnects subscribers the broker shed. Returns `false`
/// (with a note) when fewer than wanted are back.
fn prepare(
    fleet: &mut Fleet,
    o: &Opts,
    cur: &mut Cursor,
    progress: &Progress,
    notes: &mut Vec<String>,
) -> Result<bool, ScenarioError> {
    if cur.ready >= cur.wanted {
        return Ok(true);
    }
    progress.println(&format!(
        "reconnecting {} subscriber(s) the broker closed",
        cur.wanted - cur.ready
    ));
    fleet.send_all(&Command::Repair)?;
    let back = fleet.gather(
        "reconnect",
        Duration::from_secs_f64(o.connect_timeout),
        progress,
        |e| match e {
            Event::Connected(s) => Some(s.ready),
            _ => None,
        },
        |_| false,
    )?;
    cur.ready = back.into_iter().flatten().sum();
    if cur.ready < cur.wanted {
        notes.push(format!(
            "stopped: only {} of {} subscribers could reconnect after a step",
            cur.ready, cur.wanted
        ));
        return Ok(false);
    }
    Ok(true)
}

/// Waits until no message of an earlier phase arrived for
/// [`SETTLE_QUIET_S`]; `false` if that did not happen within
/// [`SETTLE_LIMIT_S`].
fn settle(fleet: &mut Fleet, progress: &Progress) -> Result<bool, ScenarioError> {
    let quiet_ns = (SETTLE_QUIET_S * 1e9) as u64;
    let mut last = u64::MAX;
    let mut since = stats::monotonic_ns();
    let waited = fleet.gather::<()>(
        "backlog to clear",
        Duration::from_secs_f64(SETTLE_LIMIT_S),
        progress,
        |_| None,
        |p| {
            let now = stats::monotonic_ns();
            if p.stale + p.delivered != last {
                last = p.stale + p.delivered;
                since = now;
            }
            now - since > quiet_ns
        },
    );
    match waited {
        Ok(_) => Ok(true),
        Err(FleetError::Timeout(..)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Publishes at `rate` for `seconds`, collects the workers' reports (which
/// starts their next phase) and computes the phase's figures.
fn measure(
    fleet: &mut Fleet,
    o: &Opts,
    t: &Target,
    cur: &mut Cursor,
    rate: f64,
    seconds: f64,
    progress: &Progress,
) -> Result<Measured, ScenarioError> {
    let planned = ((rate * seconds).ceil() as u64).max(MIN_STEP_MSGS);
    let stride = planned.div_ceil(phase::TRACK_MSGS).max(1);
    // Start the phase: numbering, tracking stride and timeline; the report
    // of the (empty) time since the last phase is dropped.
    let start = stats::monotonic_ns();
    step(fleet, cur, stride, start, progress)?;
    let self0 = procfs::self_cpu_seconds();
    let cpu0 = cur.worker_cpu.clone();
    let phase = Phase {
        msgs: planned,
        rate: Some(rate),
        first_seq: cur.seq,
        track_stride: stride,
        limit_ns: ((seconds * STEP_SLACK + o.drain_timeout) * 1e9) as u64,
    };
    let broker_cpus = o
        .broker_cpus
        .as_deref()
        .and_then(|l| procfs::parse_cpu_list(l).ok());
    let ticks = |c: &Option<Vec<usize>>| c.as_deref().and_then(|c| procfs::cpus_ticks(c).ok());
    let ticks0 = ticks(&broker_cpus);
    let run = phase::publish_phase(fleet, o, t, cur.ready, &phase, progress)?;
    let (published, window) = (run.published, run.window);
    let broker_cpus_busy = ticks0
        .zip(ticks(&broker_cpus))
        .filter(|((_, t0), (_, t1))| t1 > t0)
        .map(|((b0, t0), (b1, t1))| (b1 - b0) as f64 / (t1 - t0) as f64);
    cur.seq += published.sent;
    let reports = step(fleet, cur, 1, stats::monotonic_ns(), progress)?;
    let wall_s = (stats::monotonic_ns() - start) as f64 / 1e9;
    let workers: Vec<f64> = reports
        .iter()
        .zip(&cpu0)
        .map(|(r, c0)| r.cpu_s - c0)
        .collect();
    let generator = phase::generator_usage(o, &workers, procfs::self_cpu_seconds() - self0, wall_s);
    let (mut fanout, last) = phase::fanout_figures(&reports, published.sent);
    fanout.broker_rss = run.broker_rss;
    fanout.rss_period_ms = phase::RSS_PERIOD.as_millis() as u64;
    // Lag = last arrival after the stamp + the stamp's slip behind schedule.
    let lags: Vec<u64> = last
        .iter()
        .zip(&published.slip_ns)
        .map(|(&l, &slip)| if l > 0 { l + slip } else { 0 })
        .collect();
    let span_s = published.sent as f64 / rate;
    let outcome = StepOutcome {
        planned,
        published: published.sent,
        expected: fanout.expected,
        delivered: fanout.delivered,
        lost: fanout.lost,
        broken: fanout.errors.values().sum(),
        lag: lag_trend(&lags, span_s),
    };
    let clean = fanout.delivered >= fanout.expected && fanout.lost == 0;
    Ok(Measured {
        fanout,
        outcome,
        window,
        generator,
        clean,
        broker_cpus_busy,
    })
}

/// Sends `Step` to every worker: they report the phase that ends here and
/// start the next one at `cur.seq`. Updates the cursor from the reports.
fn step(
    fleet: &mut Fleet,
    cur: &mut Cursor,
    stride: u64,
    timeline_start_ns: u64,
    progress: &Progress,
) -> Result<Vec<WorkerReport>, ScenarioError> {
    fleet.send_all(&Command::Step {
        published: cur.seq,
        next_first_seq: cur.seq,
        track_stride: stride,
        timeline_start_ns,
    })?;
    let reports = fleet.gather_reports("step reports", progress)?;
    // Counters restart with the new phase.
    for p in &mut fleet.progress {
        p.delivered = 0;
        p.stale = 0;
    }
    cur.worker_cpu = reports.iter().map(|r| r.cpu_s).collect();
    cur.ready = reports.iter().map(|r| r.ready).sum();
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_doubles_then_bisects_to_the_precision() {
        // A broker that sustains up to 700 msg/s, searched from 100.
        let capacity = 700.0;
        let mut s = RateSearch::new(10.0, 1e6, 0.1);
        let mut rate = 100.0;
        let mut tried = vec![];
        let end = loop {
            tried.push(rate);
            match s.next(rate, rate <= capacity) {
                Ok(r) => rate = r,
                Err(e) => break e,
            }
        };
        assert_eq!(end, SearchEnd::Converged);
        assert_eq!(&tried[..4], &[100.0, 200.0, 400.0, 800.0]);
        let (lo, hi) = (s.max_sustained().unwrap(), s.lowest_failed().unwrap());
        assert!(lo <= capacity && capacity < hi, "{lo} {hi}");
        assert!(hi / lo <= 1.1);
        // Bisection steps are geometric midpoints strictly inside.
        assert!((tried[4] - (400.0f64 * 800.0).sqrt()).abs() < 1e-9);
        assert!(tried.len() <= 8, "{tried:?}");
    }

    #[test]
    fn search_halves_when_the_start_is_too_fast_and_stops_at_the_floor() {
        let mut s = RateSearch::new(10.0, 1e6, 0.1);
        assert_eq!(s.next(100.0, false), Ok(50.0));
        assert_eq!(s.next(50.0, false), Ok(25.0));
        assert_eq!(s.next(25.0, false), Ok(12.5));
        assert_eq!(s.next(12.5, false), Err(SearchEnd::Floor));
        assert_eq!(s.max_sustained(), None);
        let mut s = RateSearch::new(10.0, 1e6, 0.1);
        assert_eq!(s.next(100.0, false), Ok(50.0));
        assert_eq!(s.next(50.0, true), Ok((5000.0f64).sqrt()));
    }

    #[test]
    fn search_stops_at_the_cap() {
        let mut s = RateSearch::new(1.0, 300.0, 0.1);
        assert_eq!(s.next(100.0, true), Ok(200.0));
        assert_eq!(s.next(200.0, true), Err(SearchEnd::Cap));
        assert_eq!(s.max_sustained(), Some(200.0));
    }

    #[test]
    fn flat_lag_does_not_grow_a_ramp_does() {
        // 1000 messages over 10 s, lag 5 ms ± 1 ms noise, one spike late.
        let mut flat: Vec<u64> = (0..1000u64)
            .map(|k| 5_000_000 + (k * 7919 % 2000) * 1000 - 1_000_000)
            .collect();
        flat[990] = 400_000_000;
        let t = lag_trend(&flat, 10.0).unwrap();
        assert!(!t.grows, "{t:?}");
        assert!(t.growth_ms.abs() < 2.0, "{t:?}");
        assert_eq!(t.messages, 1000);
        // Tolerance: 1% of 9 s = 90 ms (above the 20 ms floor).
        assert!((t.tolerance_ms - 90.0).abs() < 1e-9, "{t:?}");
        // A 2% overload over 10 s: the queue adds 20 ms of lag per second.
        let ramp: Vec<u64> = (0..1000u64).map(|k| 5_000_000 + k * 200_000).collect();
        let t = lag_trend(&ramp, 10.0).unwrap();
        assert!(t.grows, "{t:?}");
        assert!((t.growth_ms - 180.0).abs() < 1.0, "{t:?}");
    }

    #[test]
    fn a_coalescing_broker_may_swing_but_not_double() {
        // 10k subscribers: a lag of ~300 ms that swings by half is noise...
        let swing: Vec<u64> = (0..500u64)
            .map(|k| if k < 250 { 300_000_000 } else { 450_000_000 })
            .collect();
        let t = lag_trend(&swing, 5.0).unwrap();
        assert!(!t.grows && (t.tolerance_ms - 300.0).abs() < 1e-9, "{t:?}");
        // ... a lag that triples over the step is a backlog.
        let ramp: Vec<u64> = (0..500u64).map(|k| 300_000_000 + k * 1_200_000).collect();
        let t = lag_trend(&ramp, 5.0).unwrap();
        assert!(t.grows, "{t:?}");
    }

    #[test]
    fn lag_trend_skips_missing_and_needs_ten() {
        assert_eq!(lag_trend(&[1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0], 1.0), None);
        let short = lag_trend(&[1_000_000; 10], 0.1).unwrap();
        assert_eq!(short.tolerance_ms, GROWTH_FLOOR_MS);
        assert_eq!(short.growth_ms, 0.0);
    }

    #[test]
    fn bound_is_factor_times_one_message_fan_out_time() {
        // 10k subscribers, max 1000 msg/s = 10M deliveries/s: fanning one
        // message out takes 1 ms, the bound is 1.2 ms.
        assert!((bound_us(10_000, 10_000_000.0) - 1200.0).abs() < 1e-9);
        assert!((bound_us(1, 1.0) - 1.2e6).abs() < 1e-6);
    }

    #[test]
    fn others_share_of_the_broker_cpus() {
        // CPU 0 fully busy, the broker used 0.19 of it: others took 81%.
        let o = others_share(Some(1.0), Some(0.19), 1).unwrap();
        assert!((o - 0.81).abs() < 1e-9);
        // Two CPUs half busy, all of it the broker's (one core's worth).
        assert_eq!(others_share(Some(0.5), Some(1.0), 2), Some(0.0));
        // Tick rounding may put the broker above its CPUs: never negative.
        assert_eq!(others_share(Some(0.9), Some(0.95), 1), Some(0.0));
        assert_eq!(others_share(None, Some(1.0), 1), None);
    }

    #[test]
    fn judge_reasons() {
        let ok = StepOutcome {
            planned: 100,
            published: 100,
            expected: 1000,
            delivered: 1000,
            lag: lag_trend(&[1_000_000; 100], 1.0),
            ..StepOutcome::default()
        };
        assert_eq!(judge(&ok), Ok(()));
        let behind = StepOutcome {
            published: 90,
            ..ok.clone()
        };
        assert!(
            judge(&behind)
                .unwrap_err()
                .contains("publisher fell behind")
        );
        let lost = StepOutcome {
            lost: 1,
            delivered: 999,
            ..ok.clone()
        };
        assert!(judge(&lost).unwrap_err().contains("1 lost"));
        let broken = StepOutcome {
            broken: 2,
            ..ok.clone()
        };
        assert!(judge(&broken).unwrap_err().contains("broke"));
        let ramp: Vec<u64> = (0..100u64).map(|k| 1_000_000 + k * 10_000_000).collect();
        let grows = StepOutcome {
            lag: lag_trend(&ramp, 1.0),
            ..ok.clone()
        };
        assert!(judge(&grows).unwrap_err().contains("lag grew"));
        let none = StepOutcome { lag: None, ..ok };
        assert!(judge(&none).is_err());
    }
}
