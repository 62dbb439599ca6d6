//! Statistics: the payload stamp, per-subscriber sequence checks, latency
//! histograms and the deliveries-over-time series.
//!
//! Latency is measured with one clock on one host: the publisher writes
//! `CLOCK_MONOTONIC` nanoseconds into the payload, every subscriber (in any
//! worker process) reads the same clock on receipt. Histograms travel between
//! processes as `(value, count)` pairs ([`HistPairs`]), which is lossless at
//! the histogram's precision.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Bytes of the stamp at the front of every bench payload: send time (u64 ns)
/// then sequence number (u64). `--payload` must be at least this.
pub const STAMP_LEN: usize = 16;

/// Histogram precision: 3 significant digits (0.1% error) is far finer than
/// the run-to-run noise of any figure we report.
const SIGFIG: u8 = 3;

/// Largest latency a histogram holds: 10 minutes in ns, longer than any
/// bounded run; larger values are clamped (and would show as the max).
const MAX_LATENCY_NS: u64 = 600_000_000_000;

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("histogram: {0}")]
    Hist(String),
}

/// `CLOCK_MONOTONIC` in nanoseconds: shared by every process on the host,
/// so a publisher and subscribers in different processes compare directly.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The clock that stamps payloads and times their arrival.
///
/// One host: `CLOCK_MONOTONIC`, immune to clock steps. Several load hosts
/// (`--part`): `CLOCK_REALTIME`, the one clock that NTP keeps in step across
/// hosts; a latency then includes the offset between the publisher's and the
/// subscriber's clocks (chrony on one LAN: tens of µs), and a step of the
/// clock during the run shows as a latency jump.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Clock {
    #[default]
    Monotonic,
    Realtime,
}

impl Clock {
    /// Now, in nanoseconds of this clock.
    pub fn now_ns(self) -> u64 {
        match self {
            Clock::Monotonic => monotonic_ns(),
            Clock::Realtime => realtime_ns(),
        }
    }
}

/// `CLOCK_REALTIME` in nanoseconds since the Unix epoch (0 before 1970).
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Writes the send time and sequence number into the front of `payload`.
pub fn stamp(payload: &mut [u8], sent_ns: u64, seq: u64) {
    payload[..8].copy_from_slice(&sent_ns.to_le_bytes());
    payload[8..16].copy_from_slice(&seq.to_le_bytes());
}

/// Reads `(sent_ns, seq)` back; `None` if the payload is not a bench payload.
pub fn read_stamp(payload: &[u8]) -> Option<(u64, u64)> {
    let sent = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    let seq = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((sent, seq))
}

/// A new latency histogram (ns).
pub fn new_hist() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, SIGFIG).expect("valid histogram bounds")
}

/// Records `value_ns`, clamped into the histogram's range.
pub fn record(hist: &mut Histogram<u64>, value_ns: u64) {
    let _ = hist.record(value_ns.clamp(1, MAX_LATENCY_NS));
}

/// A histogram as `(value, count)` pairs, for pipes and JSON.
pub type HistPairs = Vec<(u64, u64)>;

/// Flattens a histogram into pairs.
pub fn to_pairs(hist: &Histogram<u64>) -> HistPairs {
    hist.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds pairs (from another process) into `hist`.
///
/// # Errors
/// Only if a value is outside the histogram's range (a corrupt report).
pub fn add_pairs(hist: &mut Histogram<u64>, pairs: &[(u64, u64)]) -> Result<(), StatsError> {
    for &(v, n) in pairs {
        hist.record_n(v.clamp(1, MAX_LATENCY_NS), n)
            .map_err(|e| StatsError::Hist(format!("{e:?}")))?;
    }
    Ok(())
}

/// The latency figures we report, in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    /// CDF points `(percentile 0..100, latency µs)` for plots.
    pub cdf: Vec<(f64, f64)>,
}

/// Percentiles at which the CDF is sampled for plots: dense in the tail,
/// where brokers differ.
const CDF_POINTS: [f64; 16] = [
    1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.995, 99.999,
    99.9999, 100.0,
];

/// Summarizes a histogram.
pub fn summarize(hist: &Histogram<u64>) -> Latency {
    if hist.is_empty() {
        return Latency::default();
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    Latency {
        count: hist.len(),
        p50_us: us(hist.value_at_quantile(0.50)),
        p99_us: us(hist.value_at_quantile(0.99)),
        p999_us: us(hist.value_at_quantile(0.999)),
        max_us: us(hist.max()),
        mean_us: hist.mean() / 1000.0,
        cdf: CDF_POINTS
            .iter()
            .map(|&p| (p, us(hist.value_at_quantile(p / 100.0))))
            .collect(),
    }
}

/// Checks one subscriber's stream of sequence numbers: loss, duplicates and
/// order, exactly, at constant cost while nothing goes wrong.
///
/// A gap (a sequence number above the next expected one) is remembered as a
/// missing range. A later arrival inside a missing range is *out of order*
/// (and fills the hole); any other arrival below the next expected number is a
/// *duplicate*. What is still missing at the end, plus everything after the
/// last arrival up to the number published, is *lost*.
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    /// The next sequence number expected in order.
    next: u64,
    /// Missing half-open ranges `[from, to)`, ascending; usually empty.
    missing: Vec<(u64, u64)>,
    /// Deliveries counted, duplicates included.
    pub received: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
}

impl SeqTracker {
    /// A tracker for a phase whose first message has sequence number
    /// `first` (the latency scenario's steps continue the numbering).
    pub fn starting_at(first: u64) -> Self {
        Self {
            next: first,
            ..Self::default()
        }
    }

    /// Accounts one arrival.
    pub fn on_seq(&mut self, seq: u64) {
        self.received += 1;
        if seq == self.next {
            self.next += 1;
        } else if seq > self.next {
            // Merge with the last missing range when adjacent.
            match self.missing.last_mut() {
                Some(last) if last.1 == self.next => last.1 = seq,
                _ => self.missing.push((self.next, seq)),
            }
            self.next = seq + 1;
        } else {
            let hole = self
                .missing
                .iter()
                .position(|&(from, to)| from <= seq && seq < to);
            match hole {
                Some(i) => {
                    self.out_of_order += 1;
                    let (from, to) = self.missing[i];
                    match (seq == from, seq + 1 == to) {
                        (true, true) => {
                            self.missing.remove(i);
                        }
                        (true, false) => self.missing[i].0 = seq + 1,
                        (false, true) => self.missing[i].1 = seq,
                        (false, false) => {
                            self.missing[i].1 = seq;
                            self.missing.insert(i + 1, (seq + 1, to));
                        }
                    }
                }
                None => self.duplicates += 1,
            }
        }
    }

    /// Messages lost out of the phase's sequence numbers up to `published`
    /// (exclusive; `0..published` for a tracker from `default()`).
    pub fn lost(&self, published: u64) -> u64 {
        let holes: u64 = self
            .missing
            .iter()
            .map(|&(from, to)| to.min(published).saturating_sub(from))
            .sum();
        holes + published.saturating_sub(self.next)
    }
}

/// Deliveries counted per fixed time bucket since a common start, for the
/// deliveries/s-over-time plot.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    start_ns: u64,
    bucket_ns: u64,
    pub counts: Vec<u64>,
}

/// At most this many buckets are kept (an hour at 100 ms): bounded memory.
pub const MAX_BUCKETS: usize = 36_000;

impl Timeline {
    /// A timeline starting at `start_ns` with buckets of `bucket_ns`.
    pub fn new(start_ns: u64, bucket_ns: u64) -> Self {
        Self {
            start_ns,
            bucket_ns: bucket_ns.max(1),
            counts: Vec::new(),
        }
    }

    /// Counts `n` deliveries at `now_ns` (all frames of one read: one
    /// division per read, not per frame).
    pub fn add_n(&mut self, now_ns: u64, n: u64) {
        let i = (now_ns.saturating_sub(self.start_ns) / self.bucket_ns) as usize;
        if i >= MAX_BUCKETS || n == 0 {
            return;
        }
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += n;
    }
}

/// Element-wise sum of two series (timelines from several workers).
pub fn add_series(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

/// Element-wise max of two series (per-message last arrival from workers).
pub fn max_series(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a = (*a).max(*b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_roundtrip() {
        let mut p = [0u8; 64];
        stamp(&mut p, 123_456_789, 42);
        assert_eq!(read_stamp(&p), Some((123_456_789, 42)));
        assert_eq!(read_stamp(&p[..15]), None);
    }

    #[test]
    fn seq_in_order_has_no_loss() {
        let mut t = SeqTracker::default();
        (0..100).for_each(|s| t.on_seq(s));
        assert_eq!((t.lost(100), t.duplicates, t.out_of_order), (0, 0, 0));
        assert_eq!(t.lost(110), 10, "tail never arrived");
    }

    #[test]
    fn seq_gaps_dups_and_reordering() {
        let mut t = SeqTracker::default();
        for s in [0, 1, 5, 6, 3, 3, 9, 2, 1] {
            t.on_seq(s);
        }
        // Missing: 4, 7, 8. Out of order: 3, 2. Duplicates: second 3, last 1.
        assert_eq!(t.lost(10), 3);
        assert_eq!(t.out_of_order, 2);
        assert_eq!(t.duplicates, 2);
        assert_eq!(t.received, 9);
    }

    #[test]
    fn seq_hole_split_in_the_middle() {
        let mut t = SeqTracker::default();
        for s in [0, 10, 5, 4, 6, 1, 9] {
            t.on_seq(s);
        }
        // Missing 2,3,7,8.
        assert_eq!(t.lost(11), 4);
        assert_eq!(t.out_of_order, 5);
        assert_eq!(t.duplicates, 0);
    }

    #[test]
    fn seq_starting_later_counts_only_its_phase() {
        let mut t = SeqTracker::starting_at(1000);
        for s in [1000, 1001, 1003] {
            t.on_seq(s);
        }
        assert_eq!(t.lost(1005), 2, "1002 and 1004");
        assert_eq!((t.duplicates, t.out_of_order), (0, 0));
    }

    #[test]
    fn hist_pairs_roundtrip_and_summary() {
        let mut h = new_hist();
        for v in 1..=10_000u64 {
            record(&mut h, v * 1000);
        }
        let mut h2 = new_hist();
        add_pairs(&mut h2, &to_pairs(&h)).unwrap();
        let (a, b) = (summarize(&h), summarize(&h2));
        assert_eq!(a.count, 10_000);
        assert_eq!(a.p50_us, b.p50_us);
        assert!((a.p99_us - 9900.0).abs() / 9900.0 < 0.002, "{}", a.p99_us);
        assert!((b.max_us - 10_000.0).abs() / 10_000.0 < 0.002);
        assert_eq!(a.cdf.len(), CDF_POINTS.len());
    }

    #[test]
    fn timeline_and_series() {
        let mut t = Timeline::new(1_000, 100);
        t.add_n(1_050, 1);
        t.add_n(1_250, 1);
        t.add_n(500, 1); // before start: bucket 0
        assert_eq!(t.counts, vec![2, 0, 1]);
        t.add_n(1_150, 3);
        t.add_n(1_150, 0);
        assert_eq!(t.counts, vec![2, 3, 1]);
        let mut s = vec![1, 1];
        add_series(&mut s, &[1, 2, 3]);
        assert_eq!(s, vec![2, 3, 3]);
        max_series(&mut s, &[5]);
        assert_eq!(s, vec![5, 3, 3]);
    }
}
