//! What the broker reads from and sets on the host at start-up: the
//! open-file limit, `net.core.somaxconn`, the memory it may use, logging,
//! and systemd's readiness protocol.

use std::io::{IsTerminal, Write};

use log::{LevelFilter, warn};

/// The open-file limit before and after [`raise_nofile_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    /// Soft limit found at start.
    pub soft_before: u64,
    /// Soft limit now.
    pub soft: u64,
    /// Hard limit (the most the soft limit can be raised to).
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: every connection is a
/// descriptor, and the default soft limit (often 1024) would cap the broker
/// far below what the host allows.
pub fn raise_nofile_limit() -> std::io::Result<NofileLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let soft_before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(NofileLimit {
        soft_before,
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// `net.core.somaxconn`, the kernel's cap on a listen backlog, if readable.
pub fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The memory this process may use, in bytes: the host's RAM, or less when
/// its cgroup caps it (a container's limit, systemd's `MemoryMax=`; cgroup
/// v2 `memory.max` or v1 `memory.limit_in_bytes`). None when neither can be
/// read.
pub fn memory_limit() -> Option<u64> {
    let ram = physical_memory();
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| {
            cgroup_memory_files(&text)
                .iter()
                .find_map(|file| std::fs::read_to_string(file).ok())
        })
        .and_then(|text| parse_memory_max(&text));
    match (ram, cgroup) {
        (Some(ram), Some(cap)) => Some(ram.min(cap)),
        (ram, cap) => ram.or(cap),
    }
}

/// Total RAM from `sysinfo(2)`.
fn physical_memory() -> Option<u64> {
    // SAFETY: sysinfo only writes into the zeroed struct we own.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the pointer is to a live, writable struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return None;
    }
    info.totalram.checked_mul(u64::from(info.mem_unit))
}

/// The files that may hold the process's cgroup memory cap, most specific
/// first, from `/proc/self/cgroup`: cgroup v2's `memory.max` (the `0::PATH`
/// line) and v1's `memory.limit_in_bytes` (the line naming the `memory`
/// controller), each under its own cgroup and under the mount's root (in a
/// cgroup namespace the listed path may not exist below the mount).
fn cgroup_memory_files(proc_self_cgroup: &str) -> Vec<String> {
    let mut files = Vec::new();
    for line in proc_self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let path = path.trim().trim_end_matches('/');
        if controllers.is_empty() {
            files.push(format!("/sys/fs/cgroup{path}/memory.max"));
        } else if controllers.split(',').any(|c| c == "memory") {
            files.push(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"));
            files.push("/sys/fs/cgroup/memory/memory.limit_in_bytes".to_string());
        }
    }
    files
}

/// A cgroup memory cap: a byte count, or None for v2's "max" (no limit;
/// v1 writes a huge number instead, which the `min` with RAM absorbs).
fn parse_memory_max(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// One warning line for each setting that caps another (README, "Kernel tuning").
pub fn consistency_warnings(
    max_connections: usize,
    backlog: u32,
    nofile: Option<NofileLimit>,
    somaxconn: Option<u32>,
) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some(limit) = nofile
        && (limit.soft as usize) < max_connections
    {
        warnings.push(format!(
            "max_connections is {max_connections} but the open-file limit is {}: at most about that many clients can connect (raise LimitNOFILE, see kernel-tuning/)",
            limit.soft
        ));
    }
    if let Some(cap) = somaxconn
        && cap < backlog
    {
        warnings.push(format!(
            "listen backlog {backlog} is capped by net.core.somaxconn = {cap}: reconnect storms may overflow it (see kernel-tuning/)"
        ));
    }
    warnings
}

/// Sets up logging to stderr: `RUST_LOG` wins over `level`. Under systemd
/// (stderr is the journal) each line carries its syslog priority as `<N>`
/// and no timestamp or colour, which journald turns into levels.
pub fn init_logging(level: &str) {
    let mut builder = env_logger::Builder::new();
    builder.parse_filters(level);
    if let Ok(filters) = std::env::var("RUST_LOG") {
        builder.parse_filters(&filters);
    }
    if std::env::var_os("JOURNAL_STREAM").is_some() && !std::io::stderr().is_terminal() {
        builder.format(|buf, record| {
            let priority = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(buf, "<{priority}>{}", record.args())
        });
    }
    // A second initialisation (tests) keeps the first logger.
    let _ = builder.try_init();
}

/// Applies a new log level at run time (SIGHUP). `RUST_LOG` per-module
/// filters stay; the global maximum follows `level`.
pub fn set_log_level(level: &str) {
    match level.parse::<LevelFilter>() {
        Ok(filter) => log::set_max_level(filter),
        Err(_) => warn!("log level {level:?} is not one of error, warn, info, debug, trace"),
    }
}

/// Tells systemd (Type=notify) that the broker is ready, or stopping.
pub fn notify_systemd(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        warn!("sd_notify failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_memory_files_and_caps_parse() {
        assert_eq!(
            cgroup_memory_files("0::/system.slice/fanmq.service\n"),
            ["/sys/fs/cgroup/system.slice/fanmq.service/memory.max"]
        );
        assert_eq!(cgroup_memory_files("0::/\n"), ["/sys/fs/cgroup/memory.max"]);
        assert_eq!(
            cgroup_memory_files("5:cpu,cpuacct:/a\n4:memory:/docker/x\n"),
            [
                "/sys/fs/cgroup/memory/docker/x/memory.limit_in_bytes",
                "/sys/fs/cgroup/memory/memory.limit_in_bytes"
            ]
        );
        assert!(cgroup_memory_files("garbage\n").is_empty());
        assert_eq!(parse_memory_max("1073741824\n"), Some(1 << 30));
        assert_eq!(parse_memory_max("max\n"), None);
    }

    #[test]
    fn memory_limit_is_known_on_linux() {
        let limit = memory_limit().expect("sysinfo works on Linux");
        assert!(limit >= 64 << 20, "memory limit {limit} B");
    }

    #[test]
    fn nofile_soft_limit_is_raised_to_hard() {
        let limit = raise_nofile_limit().unwrap();
        assert_eq!(limit.soft, limit.hard);
        assert!(limit.soft_before <= limit.soft);
    }

    #[test]
    fn warnings_name_the_capping_setting() {
        let nofile = NofileLimit {
            soft_before: 1024,
            soft: 1024,
            hard: 1024,
        };
        let w = consistency_warnings(100_000, 4096, Some(nofile), Some(128));
        assert_eq!(w.len(), 2);
        assert!(w[0].contains("open-file limit is 1024"));
        assert!(w[1].contains("somaxconn = 128"));
        assert!(consistency_warnings(10, 64, Some(nofile), Some(128)).is_empty());
    }
}
