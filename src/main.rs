//! The `fanmq` binary: parse flags and config, set up logging, run the broker
//! until SIGTERM or SIGINT; SIGHUP re-reads the log level, the password file,
//! the ACL file and the TLS certificates. `fanmq passwd ...` manages a
//! password file instead.

use std::process::ExitCode;

use clap::Parser;
use log::{error, info, warn};

use fanmq::broker;
use fanmq::cli::{Cli, Command};
use fanmq::config::Config;
use fanmq::config::os;
use fanmq::security::passwd;

// The global allocator: glibc's malloc unless built with the `mimalloc` or
// the `jemalloc` feature (both allocators return freed memory to the
// system after a delay of their own). What each measured, in fan-out CPU
// and in storm and idle memory: bench/results/allocator.md.
#[cfg(all(feature = "mimalloc", feature = "jemalloc"))]
compile_error!("the features `mimalloc` and `jemalloc` each choose the allocator: enable one");

/// mimalloc as the global allocator (feature `mimalloc`).
#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// jemalloc as the global allocator (feature `jemalloc`).
#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Passwd(args)) = &cli.command {
        return match passwd::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fanmq passwd: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(&cli.flags) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fanmq: {e}");
            return ExitCode::from(2);
        }
    };
    os::init_logging(&config.log_level);
    let nofile = match os::raise_nofile_limit() {
        Ok(limit) => Some(limit),
        Err(e) => {
            warn!("cannot read or raise the open-file limit: {e}");
            None
        }
    };
    for warning in os::consistency_warnings(
        config.max_connections,
        config.backlog,
        nofile,
        os::somaxconn(),
    ) {
        warn!("{warning}");
    }
    info!(
        "queued-bytes budget (max_queued_bytes_total): {} MiB over all shards{}",
        config.max_queued_bytes_total >> 20,
        os::memory_limit().map_or_else(String::new, |m| format!(" (memory limit {} MiB)", m >> 20)),
    );
    let config_file = config.config_file.clone();
    // Installed before the broker starts: a signal that arrives meanwhile
    // waits in `signals` for the loop below. The main thread then sleeps
    // until a signal comes (no polling: an idle broker wakes for nothing).
    let mut signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ]) {
        Ok(signals) => signals,
        Err(e) => {
            error!("cannot install the signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let broker = match broker::start(config) {
        Ok(broker) => broker,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // Plain MQTT listeners by address, the others as "tls ADDR", "ws ADDR",
    // "wss ADDR", each with its bound port (tests listen on port 0); those
    // that expect a PROXY protocol header as "mqtt+proxy ADDR", "tls+proxy
    // ADDR", ...
    let listeners: Vec<String> = broker
        .transport_addrs
        .iter()
        .map(|(transport, addr)| {
            let proxy = broker.proxy_addrs.contains(addr);
            match transport {
                fanmq::net::transport::Transport::Mqtt if !proxy => addr.to_string(),
                other if proxy => format!("{}+proxy {addr}", other.name()),
                other => format!("{} {addr}", other.name()),
            }
        })
        .collect();
    let files = nofile.map_or("unknown".to_string(), |l| {
        format!("soft {} (was {}) hard {}", l.soft, l.soft_before, l.hard)
    });
    info!(
        "fanmq {} started: {} shards on CPUs {:?}, listening on {}, open files {files}",
        env!("CARGO_PKG_VERSION"),
        broker.shard_cpus.len(),
        broker.shard_cpus,
        listeners.join(", "),
    );
    // Every listener, TLS and WebSocket ones included.
    let all_listeners: Vec<std::net::SocketAddr> = broker
        .transport_addrs
        .iter()
        .map(|(_, addr)| *addr)
        .collect();
    for warning in broker.auth.startup_warnings(&all_listeners) {
        warn!("{warning}");
    }
    match broker.http_addr {
        Some(addr) => info!(
            "admin HTTP on http://{addr}/ (dashboard /, Prometheus /metrics, JSON /api/v1/stats)"
        ),
        None => info!("admin HTTP off"),
    }
    os::notify_systemd(sd_notify::NotifyState::Ready);
    for signal in signals.forever() {
        if signal != signal_hook::consts::SIGHUP {
            break;
        }
        reload_log_level(config_file.as_deref());
        reload_tls(broker.tls.as_deref());
        broker.auth.reload();
    }
    info!("shutting down");
    os::notify_systemd(sd_notify::NotifyState::Stopping);
    broker.shutdown();
    match broker.wait() {
        Ok(()) => {
            info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGHUP: re-read the TLS certificate, key and CA files for new
/// connections; a bad file keeps the old certificates.
fn reload_tls(tls: Option<&fanmq::net::transport::TlsCerts>) {
    let Some(tls) = tls else {
        return;
    };
    match tls.reload() {
        Ok(()) => info!(
            "SIGHUP: TLS certificates reloaded from {}",
            tls.certfile().display()
        ),
        Err(e) => error!("SIGHUP: TLS certificates not reloaded, keeping the old ones: {e}"),
    }
}

/// SIGHUP: re-read the log level from the config file.
fn reload_log_level(path: Option<&std::path::Path>) {
    let Some(path) = path else {
        info!("SIGHUP: no config file to re-read");
        return;
    };
    match Config::reload_log_level(path) {
        Ok(Some(level)) => {
            // Logged before it applies, so the line shows whatever the level.
            warn!("SIGHUP: log level set to {level}");
            os::set_log_level(&level);
        }
        Ok(None) => info!("SIGHUP: config file sets no log level"),
        Err(e) => warn!("SIGHUP: {e}"),
    }
}
