//! What the kernel says about processes: CPU time and RSS from `/proc/PID`,
//! socket memory from `/proc/net/sockstat`, our own CPU from `getrusage`,
//! the open-file limit, and CPU pinning.

use serde::{Deserialize, Serialize};
use std::fs;

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("unexpected format in {0}")]
    Format(String),
    #[error("bad CPU list {0:?} (expected e.g. 0 or 0,2-3)")]
    CpuList(String),
    #[error("{0}: {1}")]
    Os(&'static str, std::io::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

fn read(path: &str) -> Result<String, ProcError> {
    fs::read_to_string(path).map_err(|source| ProcError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Clock ticks per second for `/proc/PID/stat` times.
fn ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// A process's CPU time in seconds (all its threads, user and system).
///
/// Taken from the scheduler's own nanosecond count of each thread
/// (`/proc/PID/task/*/schedstat`), summed: `/proc/PID/stat`'s utime+stime
/// move in clock ticks (10 ms), which at 1000 connections is 10 µs per
/// connection, too coarse for the connect figures. A thread that exited
/// takes its count with it; when the sum falls more than a tick below
/// `/proc/PID/stat`'s total (which keeps exited threads'), or schedstat is
/// missing, the tick count is used.
///
/// # Errors
/// The process is gone or the files are not as documented in proc(5).
pub fn cpu_seconds(pid: u32) -> Result<f64, ProcError> {
    let ticks = stat_cpu_seconds(pid)?;
    match schedstat_cpu_seconds(pid) {
        Some(precise) if precise + 1.0 / ticks_per_s() >= ticks => Ok(precise),
        _ => Ok(ticks),
    }
}

/// utime+stime of all threads from `/proc/PID/stat`, in seconds.
fn stat_cpu_seconds(pid: u32) -> Result<f64, ProcError> {
    let path = format!("/proc/{pid}/stat");
    let text = read(&path)?;
    // The command name (field 2) may contain spaces: fields after the last ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| ProcError::Format(path.clone()))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': field 3 is index 0, so utime (14) is 11, stime (15) is 12.
    let get = |i: usize| -> Result<f64, ProcError> {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .ok_or_else(|| ProcError::Format(path.clone()))
    };
    Ok((get(11)? + get(12)?) / ticks_per_s())
}

/// The sum of the live threads' run time (first field of each
/// `/proc/PID/task/TID/schedstat`, nanoseconds), in seconds; None when a
/// file is missing or not a number.
fn schedstat_cpu_seconds(pid: u32) -> Option<f64> {
    let mut ns: u64 = 0;
    for entry in fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = entry.ok()?.path().join("schedstat");
        let text = fs::read_to_string(path).ok()?;
        ns += parse_schedstat_ns(&text)?;
    }
    Some(ns as f64 / 1e9)
}

/// The run time (nanoseconds) in a `schedstat` line: "run wait slices".
fn parse_schedstat_ns(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// A process's resident set size in bytes (`VmRSS` in `/proc/PID/status`).
///
/// # Errors
/// The process is gone or has no `VmRSS` line (a zombie).
pub fn rss_bytes(pid: u32) -> Result<u64, ProcError> {
    status_bytes(pid, "VmRSS:")
}

/// A process's peak resident set size in bytes (`VmHWM` in
/// `/proc/PID/status`): since it started, or since [`reset_peak_rss`].
///
/// # Errors
/// The process is gone or has no `VmHWM` line (a zombie).
pub fn peak_rss_bytes(pid: u32) -> Result<u64, ProcError> {
    status_bytes(pid, "VmHWM:")
}

/// Resets a process's `VmHWM` to its current RSS (writes `5` to
/// `/proc/PID/clear_refs`, Linux ≥ 4.0; needs the right to ptrace it), so
/// that a peak read later is this run's, not one of an earlier run against
/// the same broker.
///
/// # Errors
/// Not allowed, or the process is gone: the peak then counts from the
/// broker's start.
pub fn reset_peak_rss(pid: u32) -> Result<(), ProcError> {
    let path = format!("/proc/{pid}/clear_refs");
    fs::write(&path, "5").map_err(|source| ProcError::Write { path, source })
}

/// Samples the broker's RSS (summed over its processes) every `period` on a
/// thread of its own while a phase runs, so a long run (the soak) shows
/// whether memory stays flat, not only where it ended.
pub struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<u64>>,
}

impl RssSampler {
    /// Starts sampling `pids` (nothing is sampled without any); the first
    /// sample is taken at once.
    pub fn start(pids: &[u32], period: std::time::Duration) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pids = pids.to_vec();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut samples = Vec::new();
                // Slices of the period, so `finish` returns within one.
                const SLICE: std::time::Duration = std::time::Duration::from_millis(20);
                let mut next = std::time::Instant::now();
                while !pids.is_empty() && !stop.load(Ordering::Relaxed) {
                    if std::time::Instant::now() >= next {
                        match pids.iter().map(|&p| rss_bytes(p).ok()).sum::<Option<u64>>() {
                            Some(rss) => samples.push(rss),
                            // A process is gone: nothing more to sample.
                            None => break,
                        }
                        next += period;
                    }
                    std::thread::sleep(SLICE.min(period));
                }
                samples
            })
        };
        RssSampler { stop, thread }
    }

    /// Stops sampling and returns the samples in order (bytes), one per
    /// period since [`RssSampler::start`].
    pub fn finish(self) -> Vec<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// A `kB` field of `/proc/PID/status`, in bytes.
fn status_bytes(pid: u32, field: &str) -> Result<u64, ProcError> {
    let path = format!("/proc/{pid}/status");
    let text = read(&path)?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or(ProcError::Format(path))
}

/// The TCP line of `/proc/net/sockstat`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct SockStat {
    /// TCP sockets in use (both ends of a loopback connection count).
    pub tcp_inuse: u64,
    /// TCP socket buffer memory in bytes (`mem` is in pages).
    pub tcp_mem_bytes: u64,
    /// Kernel slab memory in bytes (`Slab:` in `/proc/meminfo`): where the
    /// socket structures themselves live (sockstat's `mem` counts only
    /// buffered data, which is zero for an idle socket). System-wide, so
    /// only a delta over a quiet period means anything.
    #[serde(default)]
    pub slab_bytes: u64,
}

/// Reads `/proc/net/sockstat` (this network namespace).
///
/// # Errors
/// The file is missing or not in the documented format.
pub fn sockstat() -> Result<SockStat, ProcError> {
    let mut s = parse_sockstat(&read("/proc/net/sockstat")?)?;
    s.slab_bytes = read("/proc/meminfo")?
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024);
    Ok(s)
}

fn parse_sockstat(text: &str) -> Result<SockStat, ProcError> {
    let line = text
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .ok_or_else(|| ProcError::Format("sockstat".into()))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let value = |key: &str| -> Option<u64> {
        let i = words.iter().position(|w| *w == key)?;
        words.get(i + 1)?.parse().ok()
    };
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    Ok(SockStat {
        tcp_inuse: value("inuse").unwrap_or(0),
        tcp_mem_bytes: value("mem").unwrap_or(0) * page,
        slab_bytes: 0,
    })
}

/// Busy and total clock ticks of `cpus` summed, from `/proc/stat` (busy =
/// everything but idle and iowait, by any process): tells a broker short
/// of CPU because others ran on its cores from one that was not.
///
/// # Errors
/// `/proc/stat` is unreadable or a listed CPU has no line.
pub fn cpus_ticks(cpus: &[usize]) -> Result<(u64, u64), ProcError> {
    parse_cpus_ticks(&read("/proc/stat")?, cpus)
}

fn parse_cpus_ticks(text: &str, cpus: &[usize]) -> Result<(u64, u64), ProcError> {
    let (mut busy, mut total) = (0, 0);
    for &cpu in cpus {
        let name = format!("cpu{cpu}");
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .ok_or_else(|| ProcError::Format(format!("/proc/stat: no {name}")))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...
        let sum: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        busy += sum.saturating_sub(idle);
        total += sum;
    }
    Ok((busy, total))
}

/// This process's own user+system CPU seconds (all threads).
pub fn self_cpu_seconds() -> f64 {
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer, RUSAGE_SELF always exists.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// This process's `RLIMIT_NOFILE` (soft and hard), `None` if unreadable.
fn nofile_limit() -> Option<libc::rlimit> {
    // SAFETY: zeroed rlimit is a valid out-parameter.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim)
}

/// The hard `RLIMIT_NOFILE`: the most sockets one worker can hold (1024,
/// the usual default, if unreadable).
pub fn nofile_hard() -> u64 {
    nofile_limit().map_or(1024, |l| l.rlim_max)
}

/// Raises the soft open-file limit to the hard limit; returns the new soft
/// limit. Each socket is one file, so this bounds connections per process.
pub fn raise_nofile() -> u64 {
    let Some(mut lim) = nofile_limit() else {
        return 1024;
    };
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: valid pointer; raising soft to hard is always allowed.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    lim.rlim_cur
}

/// Parses a CPU list like `0`, `1,3` or `0-2,5`.
///
/// # Errors
/// Anything else.
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>, ProcError> {
    let bad = || ProcError::CpuList(list.to_owned());
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.trim().is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                );
                if a > b {
                    return Err(bad());
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.trim().parse().map_err(|_| bad())?),
        }
    }
    if cpus.is_empty() || cpus.iter().any(|&c| c >= libc::CPU_SETSIZE as usize) {
        return Err(bad());
    }
    Ok(cpus)
}

/// Pins process `pid` (0 = this one) to `cpus`; children inherit it.
///
/// # Errors
/// The kernel refused (e.g. a CPU that does not exist).
pub fn set_affinity(pid: i32, cpus: &[usize]) -> Result<(), ProcError> {
    // SAFETY: zeroed cpu_set_t is an empty set; CPU_SET indices are checked
    // by `parse_cpu_list`.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(ProcError::Os(
            "sched_setaffinity",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_run_time_is_the_first_field() {
        assert_eq!(
            parse_schedstat_ns("345540298 25245960 161\n"),
            Some(345_540_298)
        );
        assert_eq!(parse_schedstat_ns(""), None);
        assert_eq!(parse_schedstat_ns("x 1 2"), None);
    }

    #[test]
    fn own_cpu_time_agrees_with_the_ticks() {
        let pid = std::process::id();
        let before = cpu_seconds(pid).expect("cpu");
        let ticks_before = stat_cpu_seconds(pid).expect("stat");
        // Spin until the kernel's tick count says 100 ms more (or 10 s pass).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut x = 0u64;
        while stat_cpu_seconds(pid).expect("stat") < ticks_before + 0.1
            && std::time::Instant::now() < deadline
        {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        let after = cpu_seconds(pid).expect("cpu");
        let ticks = stat_cpu_seconds(pid).expect("stat");
        assert!(
            after - before >= 0.08,
            "spun 100 ms of CPU, measured {}",
            after - before
        );
        assert!(
            (after - ticks).abs() < 0.05,
            "schedstat {after} vs stat {ticks}"
        );
    }

    #[test]
    fn own_stat_and_rss() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(rss_bytes(pid).unwrap() > 100_000);
        // After a reset the peak is the RSS then, not zero.
        reset_peak_rss(pid).unwrap();
        assert!(peak_rss_bytes(pid).unwrap() > 100_000);
    }

    #[test]
    fn the_sampler_reads_rss_until_finished_and_nothing_without_pids() {
        let pid = std::process::id();
        let sampler = RssSampler::start(&[pid], std::time::Duration::from_millis(10));
        std::thread::sleep(std::time::Duration::from_millis(100));
        let samples = sampler.finish();
        assert!(samples.len() >= 2, "{samples:?}");
        assert!(samples.iter().all(|&b| b > 100_000), "{samples:?}");
        let none = RssSampler::start(&[], std::time::Duration::from_millis(10)).finish();
        assert!(none.is_empty());
    }

    #[test]
    fn sockstat_format() {
        let s = parse_sockstat(
            "sockets: used 5\nTCP: inuse 3 orphan 0 tw 1 alloc 4 mem 7\nUDP: inuse 0 mem 0\n",
        )
        .unwrap();
        assert_eq!(s.tcp_inuse, 3);
        assert!(s.tcp_mem_bytes >= 7 * 4096);
        assert!(sockstat().is_ok());
    }

    #[test]
    fn stat_ticks() {
        let text =
            "cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 10 1 5 80 4 0 0 0 0 0\ncpu1 1 0 1 8 0 0 0 0 0 0\n";
        assert_eq!(parse_cpus_ticks(text, &[0]).unwrap(), (16, 100));
        assert_eq!(parse_cpus_ticks(text, &[0, 1]).unwrap(), (18, 110));
        assert!(parse_cpus_ticks(text, &[2]).is_err());
        assert!(cpus_ticks(&[0]).is_ok());
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0").unwrap(), vec![0]);
        assert_eq!(parse_cpu_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpu_list("2-1").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert!(parse_cpu_list("").is_err());
    }
}
