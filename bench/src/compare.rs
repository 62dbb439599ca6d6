//! Broker processes for `--compare` (and `raw`): start a broker command on a
//! free port, pinned to the broker CPUs, wait until it accepts, and stop it
//! (SIGTERM, then SIGKILL) when the run is over, also on error (`Drop`).
//!
//! Named peers get a generated config: `mosquitto` (no per-connection log
//! lines, which would cost it CPU in every connect; queue limits raised so
//! that a burst to 10k subscribers is not dropped by configuration),
//! `rumqttd`, `fanmq` (binary from `$FANMQ_BIN`, else `fanmq` on PATH; one
//! shard), `fanmq:N` (the same with N shards), `flashmq` (binary from
//! `$FLASHMQ_BIN`, else `flashmq` on PATH, as `bench/peers.sh` builds it;
//! one thread), `flashmq:N` (N threads) and `raw` (this binary's
//! forwarder). Anything else is a shell command with
//! `{port}`, run with `exec` so its PID is the broker's, optionally after a
//! label: `LABEL=command`.
//!
//! For WebSocket subscribers (`--transport ws`) a broker also gets a
//! WebSocket listener on a second free port ([`Broker::ws_port`]): fanmq
//! by `--ws-listen`, FlashMQ by a `protocol websockets` listener; a custom
//! command by `{ws_port}`. The other named peers have none here (Debian's
//! Mosquitto is built without WebSocket).

use crate::net;
use crate::procfs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// How long a broker may take to start accepting.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a broker may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("{0}")]
    Net(#[from] net::NetError),
    #[error("writing config {0}: {1}")]
    Config(PathBuf, std::io::Error),
    #[error("starting {0:?}: {1}")]
    Spawn(String, std::io::Error),
    #[error("{0:?} exited before accepting connections (log: {1})")]
    Exited(String, PathBuf),
    #[error("{0:?} did not accept connections within {1:?} (log: {2})")]
    NotReady(String, Duration, PathBuf),
    #[error(
        "{0:?}: no WebSocket listener for this peer (fanmq, flashmq or a command with {{ws_port}})"
    )]
    NoWebSocket(String),
}

/// A started broker.
pub struct Broker {
    pub label: String,
    pub port: u16,
    /// The WebSocket listener's port, when one was asked for.
    pub ws_port: Option<u16>,
    pub raw: bool,
    child: Child,
}

impl Broker {
    /// The broker's PID (the exec'd command itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts `spec` (see the module doc) with its files in `dir`, with a
    /// WebSocket listener too when `ws`.
    ///
    /// # Errors
    /// The command could not start, exited, or never accepted; `ws` for a
    /// peer without WebSocket.
    pub fn start(
        spec: &str,
        cpus: Option<&[usize]>,
        dir: &Path,
        max_queued: u64,
        ws: bool,
    ) -> Result<Broker, CompareError> {
        let port = net::free_port()?;
        let ws_port = if ws { Some(net::free_port()?) } else { None };
        let (label, shell, raw) = command_for(spec, port, ws_port, dir, max_queued)?;
        let log = dir.join(format!(
            "{}-{port}.log",
            label.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        ));
        let log_file =
            std::fs::File::create(&log).map_err(|e| CompareError::Config(log.clone(), e))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| CompareError::Config(log.clone(), e))?;
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(format!("exec {shell}"))
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        if let Some(cpus) = cpus {
            let cpus = cpus.to_vec();
            // SAFETY: the closure only calls sched_setaffinity (async-signal-safe).
            unsafe {
                cmd.pre_exec(move || {
                    procfs::set_affinity(0, &cpus).map_err(|e| std::io::Error::other(e.to_string()))
                });
            }
        }
        let child = cmd
            .spawn()
            .map_err(|e| CompareError::Spawn(shell.clone(), e))?;
        let mut broker = Broker {
            label,
            port,
            ws_port,
            raw,
            child,
        };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(_)) = broker.child.try_wait() {
                return Err(CompareError::Exited(shell, log));
            }
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                // Raw forwarder: a connection that says nothing is closed
                // harmlessly. Give the broker a moment to settle; one that
                // exited meanwhile (it could not bind: another process took
                // the port, and answered) is not the broker measured.
                std::thread::sleep(Duration::from_millis(100));
                if let Ok(Some(_)) = broker.child.try_wait() {
                    return Err(CompareError::Exited(shell, log));
                }
                return Ok(broker);
            }
            if Instant::now() > deadline {
                return Err(CompareError::NotReady(shell, START_TIMEOUT, log));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// fanmq's connection limits, all off: a load test opens every client from
/// 127.0.0.1 at once, which the per-IP count, the per-IP rate and the global
/// rate limit would refuse or slow (the other load tests pass the same).
const FANMQ_LOAD_FLAGS: &str =
    "--max-connections-per-ip 0 --max-connection-rate-per-ip 0 --max-connection-rate 0";

/// `(label, shell command, raw)` for a spec, with a WebSocket listener on
/// `ws_port` if given.
fn command_for(
    spec: &str,
    port: u16,
    ws_port: Option<u16>,
    dir: &Path,
    max_queued: u64,
) -> Result<(String, String, bool), CompareError> {
    let no_ws = || match ws_port {
        Some(_) => Err(CompareError::NoWebSocket(spec.to_owned())),
        None => Ok(()),
    };
    // fanmq's WebSocket listener, as an option.
    let fanmq_ws = ws_port
        .map(|p| format!(" --ws-listen 127.0.0.1:{p}"))
        .unwrap_or_default();
    // A custom command's `{port}` and `{ws_port}`.
    let fill = |cmd: &str| -> Result<String, CompareError> {
        if ws_port.is_some() && !cmd.contains("{ws_port}") {
            return Err(CompareError::NoWebSocket(spec.to_owned()));
        }
        let ws = ws_port.map(|p| p.to_string()).unwrap_or_default();
        Ok(cmd
            .replace("{port}", &port.to_string())
            .replace("{ws_port}", &ws))
    };
    let write = |name: &str, text: String| -> Result<PathBuf, CompareError> {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| CompareError::Config(path.clone(), e))?;
        Ok(path)
    };
    Ok(match spec.trim() {
        "raw" => {
            no_ws()?;
            let exe = std::env::current_exe().map_err(|e| CompareError::Spawn("self".into(), e))?;
            (
                "raw".into(),
                format!("{} raw-server --listen 127.0.0.1:{port}", exe.display()),
                true,
            )
        }
        "mosquitto" => {
            no_ws()?;
            let conf = write(
                &format!("mosquitto-{port}.conf"),
                mosquitto_conf(port, max_queued),
            )?;
            (
                "mosquitto".into(),
                format!("mosquitto -c {}", conf.display()),
                false,
            )
        }
        "rumqttd" => {
            no_ws()?;
            let conf = write(&format!("rumqttd-{port}.toml"), rumqttd_conf(port))?;
            (
                "rumqttd".into(),
                format!("rumqttd -q --config {}", conf.display()),
                false,
            )
        }
        "fanmq" => {
            let bin = std::env::var("FANMQ_BIN").unwrap_or_else(|_| "fanmq".into());
            (
                "fanmq".into(),
                format!(
                    "{bin} --listen 127.0.0.1:{port}{fanmq_ws} --shards 1 --http-listen off {FANMQ_LOAD_FLAGS}"
                ),
                false,
            )
        }
        // `fanmq:N`: fanmq with N shards (the multi-core comparison).
        other
            if other
                .strip_prefix("fanmq:")
                .is_some_and(|n| n.parse::<u32>().is_ok()) =>
        {
            let shards = other.trim_start_matches("fanmq:");
            let bin = std::env::var("FANMQ_BIN").unwrap_or_else(|_| "fanmq".into());
            (
                format!("fanmq-{shards}-shards"),
                format!(
                    "{bin} --listen 127.0.0.1:{port}{fanmq_ws} --shards {shards} --http-listen off {FANMQ_LOAD_FLAGS}"
                ),
                false,
            )
        }
        "flashmq" => flashmq(1, port, ws_port, &write)?,
        // `flashmq:N`: FlashMQ with N threads.
        other
            if other
                .strip_prefix("flashmq:")
                .is_some_and(|n| n.parse::<u32>().is_ok_and(|n| n > 0)) =>
        {
            let threads = other.trim_start_matches("flashmq:");
            // Checked just above.
            let n = threads.parse::<u32>().unwrap_or(1);
            flashmq(n, port, ws_port, &write)?
        }
        // `LABEL=command`: a shell command under a short label (e.g. two
        // builds of one broker side by side).
        other
            if other.split_once('=').is_some_and(|(label, cmd)| {
                !label.is_empty() && !label.contains(' ') && cmd.contains(' ')
            }) =>
        {
            let (label, cmd) = other.split_once('=').unwrap_or(("", other));
            (label.to_owned(), fill(cmd)?, false)
        }
        other => (other.to_owned(), fill(other)?, false),
    })
}

/// Mosquitto: loopback listener, anonymous, no connection log lines, queues
/// large enough for the run (`max_queued_messages` counts per client).
pub fn mosquitto_conf(port: u16, max_queued: u64) -> String {
    format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\n\
         max_queued_messages {max_queued}\npersistence false\n\
         connection_messages false\nlog_dest stderr\nlog_type error\nlog_type warning\n"
    )
}

/// `(label, command, raw)` of FlashMQ with `threads` threads on `port`
/// (and WebSocket on `ws_port`), its config written by `write`.
fn flashmq(
    threads: u32,
    port: u16,
    ws_port: Option<u16>,
    write: &dyn Fn(&str, String) -> Result<PathBuf, CompareError>,
) -> Result<(String, String, bool), CompareError> {
    let conf = write(
        &format!("flashmq-{port}.conf"),
        flashmq_conf(port, ws_port, threads, procfs::nofile_hard()),
    )?;
    let bin = std::env::var("FLASHMQ_BIN").unwrap_or_else(|_| "flashmq".into());
    let label = if threads == 1 {
        "flashmq".to_owned()
    } else {
        format!("flashmq-{threads}-threads")
    };
    Ok((
        label,
        format!("{bin} --config-file {}", conf.display()),
        false,
    ))
}

/// FlashMQ (syntax of its `flashmq.conf`): `threads` threads, anonymous,
/// one loopback listener. `rlimit_nofile` is FlashMQ's own setrlimit
/// (default 1000000), which fails above the hard limit `nofile_hard`, so it
/// is the hard limit. `log_level warning`: no log line per connection
/// (FlashMQ logs every accept and login at `notice`), as for Mosquitto.
/// No `storage_dir`: nothing persisted, as for the other peers. With
/// `ws_port`, a second listener there speaks `websockets`.
pub fn flashmq_conf(port: u16, ws_port: Option<u16>, threads: u32, nofile_hard: u64) -> String {
    let listen = |port: u16, protocol: &str| {
        format!(
            "listen {{\n  port {port}\n  protocol {protocol}\n  inet_protocol ip4\n\
             \x20 inet4_bind_address 127.0.0.1\n}}\n"
        )
    };
    let mut conf = format!(
        "thread_count {threads}\nrlimit_nofile {nofile_hard}\nallow_anonymous true\n\
         log_level warning\n{}",
        listen(port, "mqtt")
    );
    if let Some(ws_port) = ws_port {
        conf.push_str(&listen(ws_port, "websockets"));
    }
    conf
}

/// rumqttd 0.20: one v4 listener on loopback, limits raised for fan-out.
pub fn rumqttd_conf(port: u16) -> String {
    format!(
        r#"id = 0

[router]
id = 0
max_connections = 1000000
max_outgoing_packet_count = 100000
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = 1000
    dynamic_filters = true
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_and_custom_specs() {
        let dir = std::env::temp_dir();
        let (label, cmd, raw) = command_for("mosquitto", 4242, None, &dir, 1000).unwrap();
        assert_eq!(label, "mosquitto");
        assert!(cmd.starts_with("mosquitto -c ") && !raw);
        let (_, cmd, raw) = command_for("raw", 4242, None, &dir, 1000).unwrap();
        assert!(cmd.contains("raw-server --listen 127.0.0.1:4242") && raw);
        let (label, cmd, _) = command_for("fanmq:2", 4242, None, &dir, 1000).unwrap();
        assert_eq!(label, "fanmq-2-shards");
        assert!(
            cmd.contains("--listen 127.0.0.1:4242 --shards 2 --http-listen off"),
            "{cmd}"
        );
        // Both fanmq specs turn the per-IP and global connection limits off:
        // every load-test client connects from 127.0.0.1 at once.
        for spec in ["fanmq", "fanmq:2"] {
            let (_, cmd, _) = command_for(spec, 4242, None, &dir, 1000).unwrap();
            assert!(
                cmd.ends_with(
                    "--max-connections-per-ip 0 --max-connection-rate-per-ip 0 --max-connection-rate 0"
                ),
                "{cmd}"
            );
        }
        let (label, cmd, _) = command_for("mybroker -p {port}", 4242, None, &dir, 1000).unwrap();
        assert_eq!(
            (label.as_str(), cmd.as_str()),
            ("mybroker -p {port}", "mybroker -p 4242")
        );
        let (label, cmd, _) =
            command_for("before=mybroker -p {port} --x=1", 4242, None, &dir, 1000).unwrap();
        assert_eq!(
            (label.as_str(), cmd.as_str()),
            ("before", "mybroker -p 4242 --x=1")
        );
        assert!(mosquitto_conf(4242, 5).contains("listener 4242 127.0.0.1"));
        let (label, cmd, raw) = command_for("flashmq", 4242, None, &dir, 1000).unwrap();
        assert_eq!(label, "flashmq");
        assert!(cmd.contains(" --config-file ") && cmd.ends_with("flashmq-4242.conf") && !raw);
        let (label, _, _) = command_for("flashmq:2", 4242, None, &dir, 1000).unwrap();
        assert_eq!(label, "flashmq-2-threads");
        let conf = flashmq_conf(4242, None, 2, 20_000);
        for line in [
            "thread_count 2",
            "rlimit_nofile 20000",
            "allow_anonymous true",
            "port 4242",
        ] {
            assert!(conf.contains(line), "{line}: {conf}");
        }
        // `flashmq:0` is no peer: a shell command of that name.
        assert_eq!(
            command_for("flashmq:0", 4242, None, &dir, 1000).unwrap().0,
            "flashmq:0"
        );
    }

    #[test]
    fn websocket_listeners_for_fanmq_flashmq_and_commands_only() {
        let dir = std::env::temp_dir();
        let (_, cmd, _) = command_for("fanmq", 4242, Some(4243), &dir, 1000).unwrap();
        assert!(
            cmd.contains("--listen 127.0.0.1:4242 --ws-listen 127.0.0.1:4243 "),
            "{cmd}"
        );
        let conf = flashmq_conf(4242, Some(4243), 1, 20_000);
        assert!(conf.contains("port 4242\n  protocol mqtt\n"), "{conf}");
        assert!(
            conf.contains("port 4243\n  protocol websockets\n"),
            "{conf}"
        );
        assert!(!flashmq_conf(4242, None, 1, 20_000).contains("websockets"));
        let (_, cmd, _) = command_for(
            "b=mybroker -p {port} -w {ws_port}",
            4242,
            Some(4243),
            &dir,
            1000,
        )
        .unwrap();
        assert_eq!(cmd, "mybroker -p 4242 -w 4243");
        for spec in ["mosquitto", "rumqttd", "raw", "mybroker -p {port}"] {
            assert!(
                matches!(
                    command_for(spec, 4242, Some(4243), &dir, 1000),
                    Err(CompareError::NoWebSocket(_))
                ),
                "{spec}"
            );
        }
    }
}
