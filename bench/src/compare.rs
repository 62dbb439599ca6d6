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
//! command by `{ws_port}`. With `--transport wss` that listener speaks TLS
//! with the run's test certificate ([`WsListener::Tls`]): fanmq's
//! `--wss-listen` with `--certfile` and `--keyfile`, FlashMQ's `fullchain`
//! and `privkey`, a custom command's `{certfile}` and `{keyfile}`. The
//! other named peers have none here (Debian's Mosquitto is built without
//! WebSocket).
//!
//! `--broker-option PEER:KEY=VALUE` ([`BrokerOption`]) adds a setting to
//! the config a named peer is started with: a TOML file for fanmq (given
//! with `--config`), a config line for FlashMQ and Mosquitto that replaces
//! the bench's own line of that key.

use crate::net;
use crate::procfs;
use crate::tls::CertFiles;
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
    #[error("--broker-option {0:?}: {1} (PEER:KEY=VALUE, PEER one of fanmq, flashmq, mosquitto)")]
    BadOption(String, &'static str),
}

/// The WebSocket listener a broker gets for WebSocket subscribers.
#[derive(Debug, Clone)]
pub enum WsListener {
    /// `ws://`.
    Plain,
    /// `wss://`, with this certificate and key.
    Tls(CertFiles),
}

/// The named peers a `--broker-option` can be given to: those whose config
/// the bench writes.
const OPTION_PEERS: [&str; 3] = ["fanmq", "flashmq", "mosquitto"];

/// One `--broker-option PEER:KEY=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerOption {
    /// `fanmq`, `flashmq` or `mosquitto`: every spec of that broker
    /// (`fanmq:2` too) gets it.
    pub peer: String,
    /// The key, in that broker's config syntax.
    pub key: String,
    /// The value as that broker's config writes it (for fanmq a TOML
    /// value: a string in quotes).
    pub value: String,
}

impl BrokerOption {
    /// Parses `PEER:KEY=VALUE`.
    ///
    /// # Errors
    /// Another form, a peer whose config the bench does not write, or a key
    /// or value that would not stay one config line.
    pub fn parse(text: &str) -> Result<BrokerOption, CompareError> {
        let bad = |why| CompareError::BadOption(text.to_owned(), why);
        let (peer, setting) = text.split_once(':').ok_or_else(|| bad("no PEER:"))?;
        let (key, value) = setting.split_once('=').ok_or_else(|| bad("no KEY=VALUE"))?;
        let (peer, key, value) = (peer.trim(), key.trim(), value.trim());
        if !OPTION_PEERS.contains(&peer) {
            return Err(bad("not a peer whose config the bench writes"));
        }
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(bad("KEY must be letters, digits and _"));
        }
        if value.is_empty() || value.contains(['\n', '\r']) {
            return Err(bad("VALUE must be one non-empty line"));
        }
        Ok(BrokerOption {
            peer: peer.to_owned(),
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }
}

/// What every broker of a comparison is started with, besides its port.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// Messages a peer may queue per client (Mosquitto's
    /// `max_queued_messages`), so that a run is not dropped by its config.
    pub max_queued: u64,
    /// A WebSocket listener (WebSocket subscribers), or none.
    pub ws: Option<WsListener>,
    /// The `--broker-option`s.
    pub options: Vec<BrokerOption>,
}

impl Setup {
    /// The options for `peer` (`fanmq`, `flashmq`, `mosquitto`), as
    /// `(key, value)`.
    fn options_for(&self, peer: &str) -> Vec<(&str, &str)> {
        self.options
            .iter()
            .filter(|o| o.peer == peer)
            .map(|o| (o.key.as_str(), o.value.as_str()))
            .collect()
    }
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

    /// Starts `spec` (see the module doc) with its files in `dir`, as
    /// `setup` says.
    ///
    /// # Errors
    /// The command could not start, exited, or never accepted; a WebSocket
    /// listener for a peer without WebSocket.
    pub fn start(
        spec: &str,
        cpus: Option<&[usize]>,
        dir: &Path,
        setup: &Setup,
    ) -> Result<Broker, CompareError> {
        let port = net::free_port()?;
        let ws_port = match setup.ws {
            Some(_) => Some(net::free_port()?),
            None => None,
        };
        let (label, shell, raw) = command_for(spec, port, ws_port, dir, setup)?;
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

/// `(label, shell command, raw)` for a spec, with the WebSocket listener
/// of `setup` on `ws_port`.
fn command_for(
    spec: &str,
    port: u16,
    ws_port: Option<u16>,
    dir: &Path,
    setup: &Setup,
) -> Result<(String, String, bool), CompareError> {
    let ws = ws_port.zip(setup.ws.as_ref());
    let no_ws = || match ws {
        Some(_) => Err(CompareError::NoWebSocket(spec.to_owned())),
        None => Ok(()),
    };
    let cert = match ws {
        Some((_, WsListener::Tls(files))) => Some(files),
        _ => None,
    };
    // fanmq's WebSocket listener, as flags.
    let fanmq_ws = match ws {
        None => String::new(),
        Some((p, WsListener::Plain)) => format!(" --ws-listen 127.0.0.1:{p}"),
        Some((p, WsListener::Tls(files))) => format!(
            " --wss-listen 127.0.0.1:{p} --certfile {} --keyfile {}",
            files.cert.display(),
            files.key.display()
        ),
    };
    // A custom command's `{port}`, `{ws_port}`, `{certfile}` and `{keyfile}`.
    let fill = |cmd: &str| -> Result<String, CompareError> {
        if ws.is_some() && !cmd.contains("{ws_port}") {
            return Err(CompareError::NoWebSocket(spec.to_owned()));
        }
        let ws = ws_port.map(|p| p.to_string()).unwrap_or_default();
        let (certfile, keyfile) = cert
            .map(|f| (f.cert.display().to_string(), f.key.display().to_string()))
            .unwrap_or_default();
        Ok(cmd
            .replace("{port}", &port.to_string())
            .replace("{ws_port}", &ws)
            .replace("{certfile}", &certfile)
            .replace("{keyfile}", &keyfile))
    };
    let write = |name: &str, text: String| -> Result<PathBuf, CompareError> {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| CompareError::Config(path.clone(), e))?;
        Ok(path)
    };
    // fanmq's `--broker-option`s: a TOML file, under its flags.
    let fanmq_options = setup.options_for("fanmq");
    let fanmq_config = if fanmq_options.is_empty() {
        String::new()
    } else {
        let toml: String = fanmq_options
            .iter()
            .map(|(key, value)| format!("{key} = {value}\n"))
            .collect();
        let path = write(&format!("fanmq-{port}.toml"), toml)?;
        format!(" --config {}", path.display())
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
                with_options(
                    &mosquitto_conf(port, setup.max_queued),
                    &setup.options_for("mosquitto"),
                ),
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
                    "{bin}{fanmq_config} --listen 127.0.0.1:{port}{fanmq_ws} --shards 1 --http-listen off {FANMQ_LOAD_FLAGS}"
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
                    "{bin}{fanmq_config} --listen 127.0.0.1:{port}{fanmq_ws} --shards {shards} --http-listen off {FANMQ_LOAD_FLAGS}"
                ),
                false,
            )
        }
        "flashmq" => flashmq(1, port, ws, setup, &write)?,
        // `flashmq:N`: FlashMQ with N threads.
        other
            if other
                .strip_prefix("flashmq:")
                .is_some_and(|n| n.parse::<u32>().is_ok_and(|n| n > 0)) =>
        {
            let threads = other.trim_start_matches("flashmq:");
            // Checked just above.
            let n = threads.parse::<u32>().unwrap_or(1);
            flashmq(n, port, ws, setup, &write)?
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
/// (and a WebSocket listener at `ws`), its config written by `write`.
fn flashmq(
    threads: u32,
    port: u16,
    ws: Option<(u16, &WsListener)>,
    setup: &Setup,
    write: &dyn Fn(&str, String) -> Result<PathBuf, CompareError>,
) -> Result<(String, String, bool), CompareError> {
    let conf = write(
        &format!("flashmq-{port}.conf"),
        with_options(
            &flashmq_conf(port, ws, threads, procfs::nofile_hard()),
            &setup.options_for("flashmq"),
        ),
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
/// `ws`, a second listener there speaks `websockets` (over TLS with the
/// certificate of [`WsListener::Tls`]).
pub fn flashmq_conf(
    port: u16,
    ws: Option<(u16, &WsListener)>,
    threads: u32,
    nofile_hard: u64,
) -> String {
    let listen = |port: u16, protocol: &str, tls: &str| {
        format!(
            "listen {{\n  port {port}\n  protocol {protocol}\n  inet_protocol ip4\n\
             \x20 inet4_bind_address 127.0.0.1\n{tls}}}\n"
        )
    };
    let mut conf = format!(
        "thread_count {threads}\nrlimit_nofile {nofile_hard}\nallow_anonymous true\n\
         log_level warning\n{}",
        listen(port, "mqtt", "")
    );
    match ws {
        None => {}
        Some((ws_port, WsListener::Plain)) => {
            conf.push_str(&listen(ws_port, "websockets", ""));
        }
        Some((ws_port, WsListener::Tls(files))) => {
            let tls = format!(
                "  fullchain {}\n  privkey {}\n",
                files.cert.display(),
                files.key.display()
            );
            conf.push_str(&listen(ws_port, "websockets", &tls));
        }
    }
    conf
}

/// `conf`, a config of `KEY VALUE` lines and `{ }` blocks (Mosquitto's and
/// FlashMQ's syntax), with `options` set at the top level: each replaces
/// the line of its key outside any block, or is added at the end.
pub fn with_options(conf: &str, options: &[(&str, &str)]) -> String {
    let mut depth = 0usize;
    let mut out = String::new();
    for line in conf.lines() {
        let key = line.split_whitespace().next().unwrap_or("");
        if depth > 0 || !options.iter().any(|(k, _)| *k == key) {
            out.push_str(line);
            out.push('\n');
        }
        depth += line.matches('{').count();
        depth = depth.saturating_sub(line.matches('}').count());
    }
    for (key, value) in options {
        out.push_str(&format!("{key} {value}\n"));
    }
    out
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

    /// A setup without WebSocket or options.
    fn plain() -> Setup {
        Setup {
            max_queued: 1000,
            ..Setup::default()
        }
    }

    /// A setup with a plain WebSocket listener.
    fn ws_plain() -> Setup {
        Setup {
            ws: Some(WsListener::Plain),
            ..plain()
        }
    }

    #[test]
    fn named_and_custom_specs() {
        let dir = std::env::temp_dir();
        let (label, cmd, raw) = command_for("mosquitto", 4242, None, &dir, &plain()).unwrap();
        assert_eq!(label, "mosquitto");
        assert!(cmd.starts_with("mosquitto -c ") && !raw);
        let (_, cmd, raw) = command_for("raw", 4242, None, &dir, &plain()).unwrap();
        assert!(cmd.contains("raw-server --listen 127.0.0.1:4242") && raw);
        let (label, cmd, _) = command_for("fanmq:2", 4242, None, &dir, &plain()).unwrap();
        assert_eq!(label, "fanmq-2-shards");
        assert!(
            cmd.contains("--listen 127.0.0.1:4242 --shards 2 --http-listen off"),
            "{cmd}"
        );
        // Both fanmq specs turn the per-IP and global connection limits off:
        // every load-test client connects from 127.0.0.1 at once.
        for spec in ["fanmq", "fanmq:2"] {
            let (_, cmd, _) = command_for(spec, 4242, None, &dir, &plain()).unwrap();
            assert!(
                cmd.ends_with(
                    "--max-connections-per-ip 0 --max-connection-rate-per-ip 0 --max-connection-rate 0"
                ),
                "{cmd}"
            );
        }
        let (label, cmd, _) =
            command_for("mybroker -p {port}", 4242, None, &dir, &plain()).unwrap();
        assert_eq!(
            (label.as_str(), cmd.as_str()),
            ("mybroker -p {port}", "mybroker -p 4242")
        );
        let (label, cmd, _) = command_for(
            "before=mybroker -p {port} --x=1",
            4242,
            None,
            &dir,
            &plain(),
        )
        .unwrap();
        assert_eq!(
            (label.as_str(), cmd.as_str()),
            ("before", "mybroker -p 4242 --x=1")
        );
        assert!(mosquitto_conf(4242, 5).contains("listener 4242 127.0.0.1"));
        let (label, cmd, raw) = command_for("flashmq", 4242, None, &dir, &plain()).unwrap();
        assert_eq!(label, "flashmq");
        assert!(cmd.contains(" --config-file ") && cmd.ends_with("flashmq-4242.conf") && !raw);
        let (label, _, _) = command_for("flashmq:2", 4242, None, &dir, &plain()).unwrap();
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
            command_for("flashmq:0", 4242, None, &dir, &plain())
                .unwrap()
                .0,
            "flashmq:0"
        );
    }

    #[test]
    fn websocket_listeners_for_fanmq_flashmq_and_commands_only() {
        let dir = std::env::temp_dir();
        let (_, cmd, _) = command_for("fanmq", 4242, Some(4243), &dir, &ws_plain()).unwrap();
        assert!(
            cmd.contains("--listen 127.0.0.1:4242 --ws-listen 127.0.0.1:4243 "),
            "{cmd}"
        );
        let conf = flashmq_conf(4242, Some((4243, &WsListener::Plain)), 1, 20_000);
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
            &ws_plain(),
        )
        .unwrap();
        assert_eq!(cmd, "mybroker -p 4242 -w 4243");
        for spec in ["mosquitto", "rumqttd", "raw", "mybroker -p {port}"] {
            assert!(
                matches!(
                    command_for(spec, 4242, Some(4243), &dir, &ws_plain()),
                    Err(CompareError::NoWebSocket(_))
                ),
                "{spec}"
            );
        }
    }

    #[test]
    fn secure_websocket_listeners_use_the_test_certificate() {
        let dir = std::env::temp_dir();
        let files = CertFiles {
            cert: "/t/cert.pem".into(),
            key: "/t/key.pem".into(),
        };
        let setup = Setup {
            ws: Some(WsListener::Tls(files.clone())),
            ..plain()
        };
        let (_, cmd, _) = command_for("fanmq:2", 4242, Some(4243), &dir, &setup).unwrap();
        assert!(
            cmd.contains(
                "--listen 127.0.0.1:4242 --wss-listen 127.0.0.1:4243 \
                 --certfile /t/cert.pem --keyfile /t/key.pem --shards 2"
            ),
            "{cmd}"
        );
        let tls = WsListener::Tls(files);
        let conf = flashmq_conf(4242, Some((4243, &tls)), 1, 20_000);
        assert!(
            conf.contains(
                "port 4243\n  protocol websockets\n  inet_protocol ip4\n  \
                 inet4_bind_address 127.0.0.1\n  fullchain /t/cert.pem\n  privkey /t/key.pem\n}"
            ),
            "{conf}"
        );
        assert!(conf.contains(
            "port 4242\n  protocol mqtt\n  inet_protocol ip4\n  inet4_bind_address 127.0.0.1\n}"
        ));
        let (_, cmd, _) = command_for(
            "b=mybroker -w {ws_port} --cert {certfile} --key {keyfile}",
            4242,
            Some(4243),
            &dir,
            &setup,
        )
        .unwrap();
        assert_eq!(cmd, "mybroker -w 4243 --cert /t/cert.pem --key /t/key.pem");
    }

    #[test]
    fn broker_options_reach_the_peers_config() {
        let dir = std::env::temp_dir().join(format!("fanmq-bench-opts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let options = [
            "fanmq:max_queued_messages=20000",
            "fanmq: log_level = \"warn\"",
            "flashmq:max_qos_msg_pending_messages=5000",
            "mosquitto:max_queued_messages=7",
        ];
        let setup = Setup {
            options: options
                .iter()
                .map(|o| BrokerOption::parse(o).unwrap())
                .collect(),
            ..plain()
        };
        // fanmq: a TOML file given with --config, before the flags (which
        // win over it).
        let (_, cmd, _) = command_for("fanmq:2", 4242, None, &dir, &setup).unwrap();
        let toml = dir.join("fanmq-4242.toml");
        assert!(
            cmd.contains(&format!(" --config {} --listen", toml.display())),
            "{cmd}"
        );
        assert_eq!(
            std::fs::read_to_string(&toml).unwrap(),
            "max_queued_messages = 20000\nlog_level = \"warn\"\n"
        );
        // Mosquitto: the bench's own max_queued_messages line replaced.
        command_for("mosquitto", 4242, None, &dir, &setup).unwrap();
        let conf = std::fs::read_to_string(dir.join("mosquitto-4242.conf")).unwrap();
        assert_eq!(conf.matches("max_queued_messages").count(), 1, "{conf}");
        assert!(conf.ends_with("max_queued_messages 7\n"), "{conf}");
        // FlashMQ: added at the top level.
        command_for("flashmq:2", 4242, None, &dir, &setup).unwrap();
        let conf = std::fs::read_to_string(dir.join("flashmq-4242.conf")).unwrap();
        assert!(
            conf.ends_with("}\nmax_qos_msg_pending_messages 5000\n"),
            "{conf}"
        );
        // Without options fanmq gets no config file.
        let (_, cmd, _) = command_for("fanmq", 4242, None, &dir, &plain()).unwrap();
        assert!(!cmd.contains("--config"), "{cmd}");
        for bad in [
            "max_queued_messages=1",
            "rumqttd:x=1",
            "fanmq:max_queued_messages",
            "fanmq:a b=1",
            "fanmq:x=",
        ] {
            assert!(
                matches!(BrokerOption::parse(bad), Err(CompareError::BadOption(..))),
                "{bad}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn options_replace_top_level_lines_only() {
        let conf = "a 1\nlisten {\n  a 2\n}\nb 3\n";
        assert_eq!(
            with_options(conf, &[("a", "9"), ("c", "4")]),
            "listen {\n  a 2\n}\nb 3\na 9\nc 4\n"
        );
    }
}
