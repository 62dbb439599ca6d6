//! How many connections this load host can open, said before the run, and
//! the refusal of a plan that cannot fit, naming the limit.
//!
//! The limits, in the order a large run meets them:
//!
//! - **Ephemeral ports**: each (source address, broker address:port) pair
//!   has its own range (`net.ipv4.ip_local_port_range`, 28,232 ports by
//!   default): the bench binds the source address with
//!   `IP_BIND_ADDRESS_NO_PORT`, so the kernel picks the port per 4-tuple.
//!   Pairs × range is the most connections this host can open to the broker.
//! - **Open files per process**: a worker holds at most its `RLIMIT_NOFILE`
//!   hard limit of sockets, less [`FD_RESERVE`]; root can raise the hard
//!   limit up to `fs.nr_open`. The bench spreads subscribers over as many
//!   workers as that needs; only a fixed `--workers` can be too few.
//! - **Open files on the host**: `fs.file-max` less what is open now.
//! - **Memory**: [`BYTES_PER_SUBSCRIBER`] (the generator's own, measured) plus
//!   [`KERNEL_BYTES_PER_SOCKET`] per subscriber and [`WORKER_BYTES`] per
//!   worker process, against `MemAvailable`.

use std::fmt::Write as _;

/// File descriptors a worker keeps for itself (pipes, epoll, stdio).
pub const FD_RESERVE: u64 = 64;

/// The generator's user-space memory per idle subscriber: its `Conn`
/// (state, two empty buffers, the sequence checker) and its share of the
/// connection table: 175 B measured at 15,000 in one worker (`idle`), 208-219
/// B at 9,000 (`bench/netns-test.sh`, one worker per
/// part; the results' "generator RSS per subscriber"), rounded up. See
/// docs/BENCHMARKING.md.
pub const BYTES_PER_SUBSCRIBER: u64 = 256;

/// Kernel memory of one idle client-side TCP socket (socket, inode, file,
/// epoll item; no buffered data): half of what `fanmq-bench idle` measures
/// for both ends of a loopback connection (8,367 B at 15,000 connections on
/// the 2-vCPU dev VM), rounded up to 4.5 KiB. Data queued in a socket
/// during a burst comes on top (bounded by `net.ipv4.tcp_rmem`).
pub const KERNEL_BYTES_PER_SOCKET: u64 = 4608;

/// RSS of a worker process before it opens anything (binary, heap, the
/// 64 KiB read buffer): about 4 MiB measured, doubled for margin.
pub const WORKER_BYTES: u64 = 8 << 20;

/// What the plan needs from this host.
#[derive(Debug, Clone, PartialEq)]
pub struct Need {
    /// Connections this host opens (its subscribers, plus the publisher).
    pub conns: u64,
    /// Source addresses (0: one, the kernel's choice).
    pub sources: u64,
    /// Broker address:port pairs.
    pub targets: u64,
    /// Worker processes.
    pub workers: u64,
    /// The most subscribers one worker holds (its open files).
    pub per_worker: u64,
}

/// This host's limits; `None` where the kernel did not say.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Size of `net.ipv4.ip_local_port_range`.
    pub ports_per_pair: u64,
    /// `RLIMIT_NOFILE` hard limit of this process (workers inherit it).
    pub nofile_hard: u64,
    /// `fs.nr_open`: the highest the hard limit can be raised to.
    pub nr_open: Option<u64>,
    /// `fs.file-max` less the files open on the host now.
    pub files_free: Option<u64>,
    /// `MemAvailable` in bytes.
    pub mem_available: Option<u64>,
}

/// The worker processes for `subs` subscribers: `(workers, per worker)`.
/// Each holds at most `--conns-per-worker` and its open-file limit less
/// [`FD_RESERVE`]; a given `--workers` is taken as it is (and [`check`]
/// refuses it when too few).
pub fn plan_workers(
    subs: u64,
    conns_per_worker: u64,
    workers: Option<usize>,
    nofile_hard: u64,
) -> (u64, u64) {
    let per_worker = conns_per_worker
        .min(nofile_hard.saturating_sub(FD_RESERVE))
        .max(1);
    let workers = workers
        .map_or_else(|| subs.div_ceil(per_worker), |w| w as u64)
        .max(1);
    (workers, subs.div_ceil(workers))
}

impl Limits {
    /// Reads this host's limits.
    pub fn of_this_host() -> Limits {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let ports_per_pair = read("/proc/sys/net/ipv4/ip_local_port_range")
            .and_then(|t| parse_port_range(&t))
            .unwrap_or(DEFAULT_PORTS);
        let nr_open = read("/proc/sys/fs/nr_open").and_then(|t| t.trim().parse().ok());
        let files_free = read("/proc/sys/fs/file-nr").and_then(|t| parse_file_nr(&t));
        let mem_available = read("/proc/meminfo").and_then(|t| parse_mem_available(&t));
        Limits {
            ports_per_pair,
            nofile_hard: crate::procfs::nofile_hard(),
            nr_open,
            files_free,
            mem_available,
        }
    }
}

/// The Linux default range 32768-60999, when the file cannot be read.
const DEFAULT_PORTS: u64 = 28_232;

/// `ip_local_port_range` ("LOW HIGH") as a count.
fn parse_port_range(text: &str) -> Option<u64> {
    let mut it = text.split_whitespace().map(|v| v.parse::<u64>().ok());
    let (lo, hi) = (it.next()??, it.next()??);
    (hi >= lo).then(|| hi - lo + 1)
}

/// `fs.file-nr` ("allocated unused max") as the files still free.
fn parse_file_nr(text: &str) -> Option<u64> {
    let v: Vec<u64> = text
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let [allocated, unused, max] = v.as_slice() else {
        return None;
    };
    Some(max.saturating_sub(allocated.saturating_sub(*unused)))
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
fn parse_mem_available(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum CapacityError {
    #[error("refused: the plan does not fit on this load host: {}", .0.join("; "))]
    DoesNotFit(Vec<String>),
    #[error("refused: the plan does not fit on this load host: source address(es) not configured on this host's interfaces: {}", list(.0))]
    Unconfigured(Vec<std::net::IpAddr>),
}

fn list(ips: &[std::net::IpAddr]) -> String {
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks `need` against `limits`; returns what the host allows, in one
/// line for the log and the results, or the limits the plan exceeds.
///
/// # Errors
/// [`CapacityError::DoesNotFit`], naming each limit exceeded and what would
/// lift it.
pub fn check(need: &Need, limits: &Limits) -> Result<String, CapacityError> {
    let mut over = Vec::new();
    let sources = need.sources.max(1);
    let pairs = sources * need.targets.max(1);
    let by_ports = pairs * limits.ports_per_pair;
    if need.conns > by_ports {
        over.push(format!(
            "ephemeral ports: {sources} source address(es) × {} broker address:port(s) × {} ports (net.ipv4.ip_local_port_range) = {by_ports} connections, {} wanted: add --source-addrs or broker --ports, or widen ip_local_port_range",
            need.targets.max(1),
            limits.ports_per_pair,
            need.conns
        ));
    }
    let per_process = limits.nofile_hard.saturating_sub(FD_RESERVE);
    if need.per_worker > per_process {
        let ceiling = limits.nr_open.map_or(String::new(), |n| {
            format!(" (fs.nr_open {n} is as far as root can raise it)")
        });
        over.push(format!(
            "open files per process: {} subscribers per worker, RLIMIT_NOFILE hard limit {} allows {per_process}: drop --workers or raise the limit{ceiling}",
            need.per_worker, limits.nofile_hard
        ));
    }
    let files = need.conns + need.workers * FD_RESERVE;
    if let Some(free) = limits.files_free
        && files > free
    {
        over.push(format!(
            "open files on the host: {files} needed, fs.file-max leaves {free}: raise fs.file-max"
        ));
    }
    let memory =
        need.conns * (BYTES_PER_SUBSCRIBER + KERNEL_BYTES_PER_SOCKET) + need.workers * WORKER_BYTES;
    if let Some(avail) = limits.mem_available
        && memory > avail
    {
        over.push(format!(
            "memory: {} MiB needed ({} B per subscriber in the generator and the kernel, {} MiB per worker), {} MiB available (MemAvailable)",
            memory >> 20,
            BYTES_PER_SUBSCRIBER + KERNEL_BYTES_PER_SOCKET,
            WORKER_BYTES >> 20,
            avail >> 20
        ));
    }
    if !over.is_empty() {
        return Err(CapacityError::DoesNotFit(over));
    }
    let mut s = format!(
        "capacity of this load host: {sources} source address(es) × {} broker address:port(s) × {} ephemeral ports = {by_ports} connections; {} worker(s) of up to {per_process} sockets (RLIMIT_NOFILE)",
        need.targets.max(1),
        limits.ports_per_pair,
        need.workers
    );
    if let Some(avail) = limits.mem_available {
        let _ = write!(
            s,
            "; memory {} of {} MiB available",
            memory >> 20,
            avail >> 20
        );
    }
    let _ = write!(s, "; this run opens {}", need.conns);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            ports_per_pair: 28_232,
            nofile_hard: 20_000,
            nr_open: Some(1_048_576),
            files_free: Some(1_000_000),
            mem_available: Some(4 << 30),
        }
    }

    #[test]
    fn proc_files_parse() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(28_232));
        assert_eq!(parse_port_range("1024 65535"), Some(64_512));
        assert_eq!(parse_port_range("9 1"), None);
        assert_eq!(
            parse_file_nr("3000\t0\t9223372036854775807\n"),
            Some(9_223_372_036_854_772_807)
        );
        assert_eq!(
            parse_mem_available("MemTotal: 8 kB\nMemAvailable:    2048 kB\n"),
            Some(2 << 20)
        );
    }

    #[test]
    fn workers_follow_the_open_file_limit() {
        assert_eq!(plan_workers(100_000, 15_000, None, 20_000), (7, 14_286));
        assert_eq!(plan_workers(100_000, 15_000, None, 1_064), (100, 1_000));
        assert_eq!(plan_workers(30_000, 15_000, Some(1), 20_000), (1, 30_000));
        assert_eq!(plan_workers(0, 15_000, None, 20_000), (1, 0));
    }

    #[test]
    fn a_plan_that_fits_says_how_much_fits() {
        let need = Need {
            conns: 9_001,
            sources: 4,
            targets: 2,
            workers: 1,
            per_worker: 9_000,
        };
        let s = check(&need, &limits()).unwrap();
        assert!(s.contains("4 source address(es) × 2 broker address:port(s) × 28232 ephemeral ports = 225856 connections"), "{s}");
        assert!(s.contains("this run opens 9001"), "{s}");
    }

    #[test]
    fn each_limit_is_named() {
        let err = |need: Need, l: Limits| check(&need, &l).unwrap_err().to_string();
        let ports = err(
            Need {
                conns: 60_000,
                sources: 0,
                targets: 2,
                workers: 4,
                per_worker: 15_000,
            },
            limits(),
        );
        assert!(
            ports.contains("ephemeral ports: 1 source address(es) × 2")
                && ports.contains("56464 connections"),
            "{ports}"
        );
        let nofile = err(
            Need {
                conns: 30_000,
                sources: 4,
                targets: 1,
                workers: 1,
                per_worker: 30_000,
            },
            limits(),
        );
        assert!(
            nofile.contains("RLIMIT_NOFILE hard limit 20000")
                && nofile.contains("fs.nr_open 1048576"),
            "{nofile}"
        );
        assert!(!nofile.contains("ephemeral"), "{nofile}");
        let files = err(
            Need {
                conns: 30_000,
                sources: 4,
                targets: 1,
                workers: 2,
                per_worker: 15_000,
            },
            Limits {
                files_free: Some(10_000),
                ..limits()
            },
        );
        assert!(files.contains("fs.file-max"), "{files}");
        let memory = err(
            Need {
                conns: 1_000_000,
                sources: 40,
                targets: 1,
                workers: 67,
                per_worker: 15_000,
            },
            limits(),
        );
        assert!(
            memory.contains("memory:") && memory.contains("MemAvailable"),
            "{memory}"
        );
    }
}
