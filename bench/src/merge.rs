//! `fanmq-bench merge PART.json...`: one run out of the parts of a fan-out
//! split over load hosts (`--part K/N`), with the same table, JSON and plots
//! as a run from one host.
//!
//! Nothing is averaged: the parts' workers' raw reports go through the same
//! [`phase::fanout_figures`] a single host uses, so latency histograms merge
//! as histograms (every recorded value counted once), the publish→last-
//! subscriber latency takes the latest arrival over all parts, deliveries
//! and losses add up. Two things differ from one host:
//!
//! - **Clocks.** Parts stamp with the wall clock; each part's timeline
//!   starts on a bucket boundary of it, so timelines are shifted by whole
//!   buckets to the earliest part's start. Connect phases are timed on each
//!   host's own clock: the merged connect time is the longest part's.
//! - **Expectations.** Parts 2..N count loss against `--msgs`, the messages
//!   part 1 planned; when part 1 published fewer, the merged run says so.
//!   A `--shared-group` run expects each message once over every part's
//!   subscribers together ([`phase::shared_figures`]): the parts' deliveries
//!   add up to the messages, and any beyond them are duplicates.

use crate::cli::MergeOpts;
use crate::phase;
use crate::protocol::ConnectSummary;
use crate::report::{self, ReportError};
use crate::result::{self, GeneratorUsage, Params, PartRecord, ResultError, ResultFile, RunResult};
use crate::stats;

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Result(#[from] ResultError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("{0}: not the results of one part (one run made with --part K/N)")]
    NotAPart(String),
    #[error("the parts do not make one run: {0}")]
    Mismatch(String),
}

/// Loads the parts, merges them, prints the table and writes the outputs.
///
/// # Errors
/// A file that is not a part, parts of different runs, or an output that
/// cannot be written.
pub fn run(o: &MergeOpts) -> Result<(), MergeError> {
    let mut runs = Vec::new();
    let mut hosts = Vec::new();
    for path in &o.parts {
        let file = ResultFile::load(path)?;
        match file.runs.as_slice() {
            [run] if run.part.is_some() => runs.push(run.clone()),
            _ => return Err(MergeError::NotAPart(path.clone())),
        }
        if !hosts.contains(&file.host) {
            hosts.push(file.host);
        }
    }
    let merged = merge(&runs)?;
    println!("{}", result::run_table(&merged));
    let file = ResultFile {
        command: report::command_line(),
        host: hosts.join(" | "),
        runs: vec![merged],
    };
    if let Some(out) = &o.out {
        report::write_results(&file, out, o.plots)?;
    }
    Ok(())
}

/// The parameters that must agree for parts to be one run.
fn run_key(r: &RunResult) -> String {
    let p = &r.params;
    format!(
        "{} subs {} topic {} filter {} qos {} payload {} rate {:?} msgs {}",
        r.scenario, p.subs, p.topic, p.filter, p.qos, p.payload, p.rate, p.msgs
    )
}

/// True for a `--shared-group` run; results written before
/// [`Params::shared_group`] existed show it in the filter (`$share/...`).
fn is_shared(p: &Params) -> bool {
    p.shared_group.is_some() || p.filter.starts_with("$share/")
}

/// Merges the parts `runs` (each with its [`PartRecord`]) into one run.
///
/// # Errors
/// [`MergeError::Mismatch`]: a part missing or twice, parts of different
/// runs, or a run without its part record.
pub fn merge(runs: &[RunResult]) -> Result<RunResult, MergeError> {
    let mismatch = |what: String| Err(MergeError::Mismatch(what));
    let mut parts: Vec<(&RunResult, &PartRecord)> = Vec::new();
    for r in runs {
        let Some(rec) = &r.part else {
            return mismatch(format!("a run of {} has no part record", r.broker));
        };
        parts.push((r, rec));
    }
    parts.sort_by_key(|(_, rec)| rec.part.index);
    let Some(&(first, first_rec)) = parts.first() else {
        return mismatch("no parts".into());
    };
    let of = first_rec.part.of;
    let indices: Vec<u64> = parts.iter().map(|(_, rec)| rec.part.index).collect();
    if parts.iter().any(|(_, rec)| rec.part.of != of) || indices != (1..=of).collect::<Vec<_>>() {
        return mismatch(format!(
            "expected parts 1..{of} of {of} once each, got {indices:?}"
        ));
    }
    let key = run_key(first);
    if let Some((other, _)) = parts.iter().find(|(r, _)| run_key(r) != key) {
        return mismatch(format!("{key} versus {}", run_key(other)));
    }
    // Part 1 published: its count is every part's expectation.
    let published = first.fanout.as_ref().map_or(0, |f| f.published);
    let base = parts
        .iter()
        .map(|(_, rec)| rec.timeline_start_ns)
        .min()
        .unwrap_or(0);
    let bucket_ns = first
        .fanout
        .as_ref()
        .map_or(phase::BUCKET_NS, |f| f.bucket_ms.saturating_mul(1_000_000))
        .max(1);
    // Parts of one run start within the connect timeout of each other; a
    // shift past a timeline's length means files of different runs.
    let latest = parts
        .iter()
        .map(|(_, rec)| rec.timeline_start_ns)
        .max()
        .unwrap_or(0);
    if (latest - base) / bucket_ns >= stats::MAX_BUCKETS as u64 {
        return mismatch(format!(
            "the parts' timelines start {:.0} s apart",
            (latest - base) as f64 / 1e9
        ));
    }
    let mut reports = Vec::new();
    let mut connects: Vec<ConnectSummary> = Vec::new();
    let mut merged = RunResult {
        scenario: first.scenario.clone(),
        broker: first.broker.clone(),
        params: first.params.clone(),
        broker_usage: first.broker_usage.clone(),
        notes: vec![format!("merged from {of} parts (fanmq-bench merge)")],
        ..RunResult::default()
    };
    merged.params.workers = 0;
    let mut generator = GeneratorUsage::default();
    for (r, rec) in &parts {
        merged.params.workers += r.params.workers;
        let shift = ((rec.timeline_start_ns - base) / bucket_ns) as usize;
        for rep in &rec.reports {
            let mut rep = rep.clone();
            rep.timeline.splice(0..0, std::iter::repeat_n(0, shift));
            reports.push(rep);
        }
        // Each host's connect phase on its own clock, starting at 0.
        let start = rec.connects.iter().map(|c| c.started_ns).min().unwrap_or(0);
        connects.extend(rec.connects.iter().map(|c| ConnectSummary {
            started_ns: c.started_ns - start,
            ended_ns: c.ended_ns.saturating_sub(start),
            ..c.clone()
        }));
        let g = &r.generator;
        generator.cpu_s += g.cpu_s;
        generator.wall_s = generator.wall_s.max(g.wall_s);
        generator.cpus += g.cpus;
        generator.max_process_busy = generator.max_process_busy.max(g.max_process_busy);
        generator.saturated |= g.saturated;
        let p = rec.part;
        merged.notes.extend(
            r.notes
                .iter()
                .map(|n| format!("part {}/{}: {n}", p.index, p.of)),
        );
    }
    if published < first.params.msgs {
        merged.notes.push(format!(
            "part 1 published {published} of {} messages; parts 2..{of} counted the rest as lost",
            first.params.msgs
        ));
    }
    phase::add_generator_memory(&mut generator, &connects);
    merged.generator = generator;
    merged.connect = Some(phase::connect_figures(&connects, first.params.subs));
    let mut fanout = phase::fanout_figures(&reports, published).0;
    if is_shared(&first.params) {
        phase::shared_figures(&mut fanout);
        merged.notes.push(phase::SHARED_NOTE.into());
    }
    if let Some(b) = merged.broker_usage.as_mut() {
        b.deliveries_per_cpu_s = (b.cpu_s > 0.0).then(|| fanout.delivered as f64 / b.cpu_s);
    }
    merged.fanout = Some(fanout);
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Part;
    use crate::protocol::WorkerReport;
    use crate::result::{FanoutFigures, Params};
    use crate::stats::Clock;

    /// Part `index` of 2: `subs` subscribers that each got 10 messages at
    /// `latency_ns`, its timeline starting `start_bucket` buckets in.
    fn part(index: u64, subs: u64, latency_ns: u64, start_bucket: u64) -> RunResult {
        let mut h = stats::new_hist();
        for _ in 0..subs * 10 {
            stats::record(&mut h, latency_ns);
        }
        let report = WorkerReport {
            delivered: subs * 10,
            counted: subs,
            ready: subs,
            latency: stats::to_pairs(&h),
            last_arrival: vec![latency_ns; 10],
            timeline: vec![subs * 10],
            first_delivery_ns: 1_000,
            last_delivery_ns: 1_000_000_000,
            ..WorkerReport::default()
        };
        let connect = ConnectSummary {
            ready: subs,
            started_ns: 5_000_000_000 * index,
            ended_ns: 5_000_000_000 * index + 1_000_000_000,
            by_source: [(format!("10.77.{index}.10"), subs)].into(),
            ..ConnectSummary::default()
        };
        RunResult {
            scenario: "fanout".into(),
            broker: "b".into(),
            params: Params {
                subs: 2 * subs,
                msgs: 10,
                workers: 1,
                ..Params::default()
            },
            fanout: Some(FanoutFigures {
                published: 10,
                bucket_ms: 100,
                ..FanoutFigures::default()
            }),
            part: Some(PartRecord {
                part: Part { index, of: 2 },
                publisher: index == 1,
                clock: Clock::Realtime,
                timeline_start_ns: start_bucket * phase::BUCKET_NS,
                connects: vec![connect],
                reports: vec![report],
            }),
            ..RunResult::default()
        }
    }

    #[test]
    fn parts_merge_as_histograms_and_line_up_their_timelines() {
        // Half the deliveries at 1 ms, half at 3 ms: an average of the
        // parts' percentiles would say 2 ms; the merged histogram does not.
        let m = merge(&[part(2, 100, 3_000_000, 11), part(1, 100, 1_000_000, 10)]).unwrap();
        let f = m.fanout.as_ref().unwrap();
        assert_eq!((f.delivered, f.expected, f.lost), (2000, 2000, 0));
        assert!((f.latency.p50_us - 1000.0).abs() < 2.0, "{:?}", f.latency);
        assert!((f.latency.p99_us - 3000.0).abs() < 4.0, "{:?}", f.latency);
        assert!(
            (f.latency_last.max_us - 3000.0).abs() < 4.0,
            "{:?}",
            f.latency_last
        );
        // Part 2 started a bucket later: its deliveries land in bucket 1.
        assert_eq!(f.timeline, vec![10_000.0, 10_000.0]);
        let c = m.connect.as_ref().unwrap();
        assert_eq!((c.attempted, c.connected), (200, 200));
        assert_eq!(c.by_source.len(), 2);
        // Each host's connect phase took 1 s on its own clock.
        assert!((c.seconds - 1.0).abs() < 1e-9, "{}", c.seconds);
        assert_eq!(m.params.workers, 2);
    }

    #[test]
    fn a_shared_group_run_counts_each_message_once_over_the_parts() {
        // 10 messages to one group of 2 × 20 members: part 1's members got
        // 6 of them, part 2's 4. Counted per subscriber, that would be 390
        // lost of 400 expected.
        let shared = |index, got: u64| {
            let mut r = part(index, 20, 1_000_000, 10);
            r.params.shared_group = Some("g".into());
            let rec = r.part.as_mut().unwrap();
            rec.reports[0].delivered = got;
            rec.reports[0].lost = 20 * 10 - got;
            rec.reports[0].subs_with_loss = 20;
            r
        };
        let m = merge(&[shared(1, 6), shared(2, 4)]).unwrap();
        let f = m.fanout.as_ref().unwrap();
        assert_eq!(
            (
                f.expected,
                f.delivered,
                f.lost,
                f.duplicates,
                f.subs_with_loss
            ),
            (10, 10, 0, 0, 0)
        );
        assert!(m.notes.iter().any(|n| n == phase::SHARED_NOTE));
        // A message that two parts' members both got.
        let m = merge(&[shared(1, 6), shared(2, 5)]).unwrap();
        let f = m.fanout.as_ref().unwrap();
        assert_eq!((f.lost, f.duplicates), (0, 1));
        // An older results file: the filter says it.
        let mut old = shared(1, 6);
        old.params.shared_group = None;
        old.params.filter = "$share/g/bench/t".into();
        assert!(is_shared(&old.params));
    }

    #[test]
    fn refuses_parts_that_are_not_one_run() {
        let twice = merge(&[part(1, 10, 1, 0), part(1, 10, 1, 0)]).unwrap_err();
        assert!(twice.to_string().contains("expected parts 1..2"), "{twice}");
        let missing = merge(&[part(2, 10, 1, 0)]).unwrap_err();
        assert!(missing.to_string().contains("got [2]"), "{missing}");
        let mut other = part(2, 10, 1, 0);
        other.params.msgs = 11;
        let differ = merge(&[part(1, 10, 1, 0), other]).unwrap_err();
        assert!(differ.to_string().contains("msgs 10 versus"), "{differ}");
        // Timelines an hour apart (36,000 buckets): not one run.
        let apart = merge(&[part(1, 10, 1, 0), part(2, 10, 1, 36_000)]).unwrap_err();
        assert!(apart.to_string().contains("3600 s apart"), "{apart}");
    }
}
