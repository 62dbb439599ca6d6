//! What the broker reads from and sets on the host at start-up: the
//! open-file limit, `net.core.somaxconn`, logging, and systemd's readiness
//! protocol.

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

/// One warning line for each setting that caps another (DESIGN.md; issue 4).
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
