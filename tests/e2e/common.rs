//! Shared helpers: a real broker process on a free port, raw MQTT bytes, a raw
//! client that reads packets, and a `rumqttc` client driven on its own thread.

use std::collections::{HashSet, VecDeque};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rumqttc::{Client, ConnAck, Event, MqttOptions, Packet, Publish, QoS, SubscribeReasonCode};

/// How long any awaited event may take. Generous: tests run in parallel on
/// two cores with a debug build.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`BrokerBuilder::start`] waits for the listening line: longer
/// than the broker's own 30 s start-up timeout (`broker::START_TIMEOUT`),
/// so that a shard that hangs at start fails with the broker's error,
/// which names the step, and not with a blind "did not start". A cluster
/// node's shards took over 10 s once in a CI dry run on a loaded host.
pub const START_WAIT: Duration = Duration::from_secs(40);

/// Lines the broker wrote to stderr, and whether it has exited.
#[derive(Default)]
struct Log {
    lines: Vec<String>,
    closed: bool,
}

/// How to start a broker.
pub struct BrokerBuilder {
    shards: usize,
    config: String,
    nofile: Option<u64>,
    env: Vec<(String, std::ffi::OsString)>,
    affinity: Option<Vec<usize>>,
    http: bool,
    args: Vec<String>,
}

impl BrokerBuilder {
    /// Runs the admin HTTP listener (default, on a free port) or not
    /// (`--http-listen off`).
    pub fn http(mut self, on: bool) -> Self {
        self.http = on;
        self
    }

    /// Number of shards (default 2; 0: no `--shards` flag, the broker's default).
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards;
        self
    }

    /// TOML text for `--config` (e.g. `"sys_interval_secs = 1"`).
    pub fn config(mut self, toml: &str) -> Self {
        self.config = toml.to_string();
        self
    }

    /// One more command-line argument (after the harness's own).
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    /// Sets an environment variable for the broker process.
    pub fn env(mut self, key: &str, value: impl Into<std::ffi::OsString>) -> Self {
        self.env.push((key.to_string(), value.into()));
        self
    }

    /// Runs the broker with this CPU affinity mask, as `taskset -c` would.
    pub fn affinity(mut self, cpus: &[usize]) -> Self {
        self.affinity = Some(cpus.to_vec());
        self
    }

    /// Start the broker with `RLIMIT_NOFILE` soft and hard set to `limit`.
    pub fn nofile(mut self, limit: u64) -> Self {
        self.nofile = Some(limit);
        self
    }

    /// Starts the broker and waits for its listening line.
    pub fn start(self) -> Broker {
        let config_file = if self.config.is_empty() {
            None
        } else {
            let mut file = tempfile::NamedTempFile::new().expect("temp config file");
            file.write_all(self.config.as_bytes())
                .expect("write config");
            file.flush().expect("flush config");
            Some(file)
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fanmq"));
        cmd.args(["--listen", "127.0.0.1:0", "--log-level", "debug"]);
        // Brokers run in parallel: the admin HTTP listener on a free port too.
        let http = if self.http { "127.0.0.1:0" } else { "off" };
        cmd.args(["--http-listen", http]);
        if self.shards > 0 {
            cmd.arg("--shards").arg(self.shards.to_string());
        }
        cmd.env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(file) = &config_file {
            cmd.arg("--config").arg(file.path());
        }
        cmd.args(&self.args);
        for (key, value) in &self.env {
            cmd.env(key, value);
        }
        if let Some(cpus) = self.affinity.clone() {
            set_affinity_before_exec(&mut cmd, cpus);
        }
        if let Some(limit) = self.nofile {
            // SAFETY: setrlimit is async-signal-safe; the closure touches
            // nothing else between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let rl = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("start the fanmq binary");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new((Mutex::new(Log::default()), Condvar::new()));
        let writer = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (lock, cvar) = &*writer;
                lock.lock().unwrap().lines.push(line);
                cvar.notify_all();
            }
            let (lock, cvar) = &*writer;
            lock.lock().unwrap().closed = true;
            cvar.notify_all();
        });
        let mut broker = Broker {
            child,
            port: 0,
            listeners: Vec::new(),
            log,
            _config: config_file,
            http_port: 0,
        };
        let line = broker
            .wait_log(|l| l.contains(" listening on "), START_WAIT)
            .unwrap_or_else(|| panic!("broker did not start:\n{}", broker.log_text()));
        broker.port =
            parse_port(&line).unwrap_or_else(|| panic!("no port in the start-up line: {line}"));
        broker.listeners = parse_listeners(&line);
        if !self.http {
            return broker;
        }
        let line = broker
            .wait_log(|l| l.contains("admin HTTP on http://"), TIMEOUT)
            .unwrap_or_else(|| panic!("no admin HTTP line:\n{}", broker.log_text()));
        broker.http_port = parse_http_port(&line)
            .unwrap_or_else(|| panic!("no port in the admin HTTP line: {line}"));
        broker
    }
}

/// Makes `cmd` run with the CPU affinity mask `cpus` (as `taskset -c`).
pub fn set_affinity_before_exec(cmd: &mut Command, cpus: Vec<usize>) {
    // SAFETY: sched_setaffinity is async-signal-safe; the closure only
    // builds a cpu_set_t on the stack and makes that one call.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &cpu in &cpus {
                libc::CPU_SET(cpu, &mut set);
            }
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Every listener in `... listening on 127.0.0.1:P1, tls 127.0.0.1:P2,
/// ws 127.0.0.1:P3, open files ...`: (transport, port), plain MQTT ones
/// named "mqtt".
fn parse_listeners(line: &str) -> Vec<(String, u16)> {
    let Some(start) = line.find(" listening on ") else {
        return Vec::new();
    };
    let rest = &line[start + " listening on ".len()..];
    let rest = rest.split(", open files").next().unwrap_or(rest);
    rest.split(", ")
        .filter_map(|item| {
            let (name, addr) = item.split_once(' ').unwrap_or(("mqtt", item));
            let port = addr.rsplit(':').next()?.parse().ok()?;
            Some((name.to_string(), port))
        })
        .collect()
}

/// Port from `... listening on 127.0.0.1:PORT, ...`.
fn parse_port(line: &str) -> Option<u16> {
    let rest = &line[line.find(" listening on ")? + " listening on ".len()..];
    let addr = rest.split([',', ' ']).next()?;
    addr.rsplit(':').next()?.parse().ok()
}

/// Port from `... admin HTTP on http://127.0.0.1:PORT/ ...`.
fn parse_http_port(line: &str) -> Option<u16> {
    let rest = &line[line.find("http://")? + "http://".len()..];
    let addr = rest.split('/').next()?;
    addr.rsplit(':').next()?.parse().ok()
}

/// How many of the broker's last log lines a failing test prints: enough
/// for the steps of one test, bounded for those that connect thousands of
/// clients.
const FAILURE_LOG_LINES: usize = 1000;

/// A running broker process; killed when dropped (also when a test panics,
/// which then prints the end of its log).
pub struct Broker {
    child: Child,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// Every listener: (transport as the log names it: "mqtt", "tls",
    /// "ws", "wss"; port on 127.0.0.1).
    pub listeners: Vec<(String, u16)>,
    log: Arc<(Mutex<Log>, Condvar)>,
    _config: Option<tempfile::NamedTempFile>,
    /// The admin HTTP listener's port (127.0.0.1).
    pub http_port: u16,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // The test failed: its report (the test's captured output)
            // shows what the broker logged, at debug level, which on a CI
            // machine is all there is to read of a failure.
            let log = self.log.0.lock().unwrap_or_else(PoisonError::into_inner);
            let skipped = log.lines.len().saturating_sub(FAILURE_LOG_LINES);
            eprintln!("--- broker log ({skipped} earlier lines left out) ---");
            for line in &log.lines[skipped..] {
                eprintln!("{line}");
            }
            eprintln!("--- end of broker log ---");
        }
    }
}

impl Broker {
    /// A broker with 2 shards and the default configuration.
    pub fn start() -> Broker {
        Broker::builder().start()
    }

    /// A builder: 2 shards, no config file.
    pub fn builder() -> BrokerBuilder {
        BrokerBuilder {
            shards: 2,
            config: String::new(),
            nofile: None,
            env: Vec::new(),
            affinity: None,
            http: true,
            args: Vec::new(),
        }
    }

    /// The port of the first listener of `transport` ("mqtt", "tls", "ws",
    /// "wss"); panics when there is none.
    pub fn port_of(&self, transport: &str) -> u16 {
        self.listeners
            .iter()
            .find(|(name, _)| name == transport)
            .map(|(_, port)| *port)
            .unwrap_or_else(|| panic!("no {transport} listener in {:?}", self.listeners))
    }

    /// The `--config` file, when the broker was started with one.
    pub fn config_path(&self) -> Option<&std::path::Path> {
        self._config.as_ref().map(|f| f.path())
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything logged so far, one line each.
    pub fn log_text(&self) -> String {
        self.log.0.lock().unwrap().lines.join("\n")
    }

    /// Waits until a log line satisfies `pred`; returns it, or None on timeout
    /// or when the broker exited first.
    pub fn wait_log(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        self.wait_log_count(pred, 1, timeout)
            .and_then(|mut v| v.pop())
    }

    /// Waits until `count` log lines satisfy `pred`; returns them all.
    pub fn wait_log_count(
        &self,
        pred: impl Fn(&str) -> bool,
        count: usize,
        timeout: Duration,
    ) -> Option<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.log;
        let mut log = lock.lock().unwrap();
        loop {
            let found: Vec<String> = log.lines.iter().filter(|l| pred(l)).cloned().collect();
            if found.len() >= count {
                return Some(found);
            }
            let now = Instant::now();
            if log.closed || now >= deadline {
                return None;
            }
            log = cvar.wait_timeout(log, deadline - now).unwrap().0;
        }
    }

    /// The shards of the first `count` connections of `client_id`, in order,
    /// from the debug line `client ID connected on shard N`.
    pub fn shards_of(&self, client_id: &str, count: usize) -> Vec<usize> {
        let needle = format!(": client {client_id} connected on shard ");
        let lines = self
            .wait_log_count(|l| l.contains(&needle), count, TIMEOUT)
            .unwrap_or_else(|| {
                panic!(
                    "no {count} connect lines for {client_id}:\n{}",
                    self.log_text()
                )
            });
        lines
            .iter()
            .take(count)
            .map(|l| {
                let rest = &l[l.find(&needle).unwrap() + needle.len()..];
                rest.split(' ').next().unwrap().parse().unwrap()
            })
            .collect()
    }

    /// The shard of the (only or first) connection of `client_id`.
    pub fn shard_of(&self, client_id: &str) -> usize {
        self.shards_of(client_id, 1)[0]
    }

    /// Panics if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("broker exited ({status}):\n{}", self.log_text());
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal to the broker.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// The broker is up and a fresh client can subscribe, publish and
    /// receive its own message.
    pub fn assert_healthy(&mut self) {
        self.assert_running();
        let id = format!("healthy-{}", unique());
        let mut client = Mqtt::connect(self.port, &id);
        let topic = format!("healthy/{id}");
        assert_eq!(
            client.subscribe(&topic, QoS::AtLeastOnce),
            vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
        );
        client.publish(&topic, QoS::AtLeastOnce, false, b"ok");
        let p = client.expect_publish();
        assert_eq!(p.topic, topic);
        assert_eq!(&p.payload[..], b"ok");
        self.assert_running();
    }
}

/// A process-wide counter for unique names.
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------
// Raw packet builders.

/// The Remaining Length encoding of `len` (§2.2.3).
pub fn remaining_length(mut len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            return out;
        }
    }
}

/// A whole packet: first byte, Remaining Length, body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    out.extend(remaining_length(body.len()));
    out.extend_from_slice(body);
    out
}

/// A length-prefixed string or binary field.
pub fn string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// A will message for [`ConnectBuilder`].
#[derive(Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
}

/// CONNECT, MQTT 3.1.1 by default.
#[derive(Clone)]
pub struct ConnectBuilder {
    pub protocol_name: Vec<u8>,
    pub level: u8,
    pub client_id: Vec<u8>,
    pub clean_session: bool,
    pub keep_alive: u16,
    pub will: Option<Will>,
    pub username: Option<Vec<u8>>,
    pub password: Option<Vec<u8>>,
    /// Extra bits OR-ed into the connect flags (e.g. the reserved bit 0).
    pub extra_flags: u8,
}

impl ConnectBuilder {
    pub fn new(client_id: &str) -> Self {
        ConnectBuilder {
            protocol_name: b"MQTT".to_vec(),
            level: 4,
            client_id: client_id.as_bytes().to_vec(),
            clean_session: true,
            keep_alive: 60,
            will: None,
            username: None,
            password: None,
            extra_flags: 0,
        }
    }

    pub fn clean_session(mut self, clean: bool) -> Self {
        self.clean_session = clean;
        self
    }

    pub fn keep_alive(mut self, secs: u16) -> Self {
        self.keep_alive = secs;
        self
    }

    pub fn will(mut self, topic: &str, payload: &[u8], qos: u8, retain: bool) -> Self {
        self.will = Some(Will {
            topic: topic.to_string(),
            payload: payload.to_vec(),
            qos,
            retain,
        });
        self
    }

    pub fn protocol(mut self, name: &[u8], level: u8) -> Self {
        self.protocol_name = name.to_vec();
        self.level = level;
        self
    }

    /// The packet bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut flags = self.extra_flags;
        if self.clean_session {
            flags |= 0x02;
        }
        if let Some(will) = &self.will {
            flags |= 0x04 | (will.qos << 3);
            if will.retain {
                flags |= 0x20;
            }
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        let mut body = string(&self.protocol_name);
        body.push(self.level);
        body.push(flags);
        body.extend(self.keep_alive.to_be_bytes());
        body.extend(string(&self.client_id));
        if let Some(will) = &self.will {
            body.extend(string(will.topic.as_bytes()));
            body.extend(string(&will.payload));
        }
        if let Some(username) = &self.username {
            body.extend(string(username));
        }
        if let Some(password) = &self.password {
            body.extend(string(password));
        }
        packet(0x10, &body)
    }
}

/// SUBSCRIBE with `(filter, requested QoS)` pairs.
pub fn subscribe(packet_id: u16, filters: &[(&[u8], u8)]) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    for (filter, qos) in filters {
        body.extend(string(filter));
        body.push(*qos);
    }
    packet(0x82, &body)
}

/// UNSUBSCRIBE.
pub fn unsubscribe(packet_id: u16, filters: &[&[u8]]) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    for filter in filters {
        body.extend(string(filter));
    }
    packet(0xa2, &body)
}

/// PUBLISH (packet id used only when QoS > 0).
pub fn publish(topic: &[u8], payload: &[u8], qos: u8, retain: bool, dup: bool, id: u16) -> Vec<u8> {
    let first = 0x30 | (u8::from(dup) << 3) | (qos << 1) | u8::from(retain);
    let mut body = string(topic);
    if qos > 0 {
        body.extend(id.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(first, &body)
}

/// A two-byte-id acknowledgement (PUBACK 0x40, PUBREC 0x50, PUBREL 0x62,
/// PUBCOMP 0x70).
pub fn ack(first: u8, packet_id: u16) -> Vec<u8> {
    let [hi, lo] = packet_id.to_be_bytes();
    vec![first, 2, hi, lo]
}

pub const PINGREQ: [u8; 2] = [0xc0, 0];
pub const PINGRESP: [u8; 2] = [0xd0, 0];
pub const DISCONNECT: [u8; 2] = [0xe0, 0];
/// CONNACK: accepted, no session present.
pub const CONNACK_OK: [u8; 4] = [0x20, 2, 0, 0];
/// CONNACK: accepted, session present.
pub const CONNACK_SESSION: [u8; 4] = [0x20, 2, 1, 0];

// ---------------------------------------------------------------------------
// Raw client.

/// A whole MQTT packet out of the front of `buf`, if there is one.
pub fn take_packet(buf: &mut Vec<u8>) -> Option<RawPacket> {
    let mut len = 0usize;
    let mut shift = 0;
    let mut at = 1;
    loop {
        let byte = *buf.get(at)?;
        len |= ((byte & 0x7f) as usize) << shift;
        shift += 7;
        at += 1;
        if byte & 0x80 == 0 {
            break;
        }
        assert!(at <= 5, "broker sent a bad remaining length");
    }
    if buf.len() < at + len {
        return None;
    }
    let first = buf[0];
    let body = buf[at..at + len].to_vec();
    buf.drain(..at + len);
    Some(RawPacket { first, body })
}

/// One packet as read from the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawPacket {
    /// The first byte (type and flags).
    pub first: u8,
    /// Everything after the Remaining Length.
    pub body: Vec<u8>,
}

impl RawPacket {
    /// The packet type (high nibble).
    pub fn kind(&self) -> u8 {
        self.first >> 4
    }

    /// The whole packet's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        packet(self.first, &self.body)
    }

    /// This PUBLISH's fields; panics when it is not a PUBLISH.
    pub fn publish(&self) -> RawPublish {
        assert_eq!(self.kind(), 3, "not a PUBLISH: {self:?}");
        let qos = (self.first >> 1) & 3;
        let len = u16::from_be_bytes([self.body[0], self.body[1]]) as usize;
        let topic = String::from_utf8(self.body[2..2 + len].to_vec()).unwrap();
        let mut at = 2 + len;
        let mut packet_id = 0;
        if qos > 0 {
            packet_id = u16::from_be_bytes([self.body[at], self.body[at + 1]]);
            at += 2;
        }
        RawPublish {
            dup: self.first & 0x08 != 0,
            qos,
            retain: self.first & 0x01 != 0,
            topic,
            packet_id,
            payload: self.body[at..].to_vec(),
        }
    }
}

/// A decoded PUBLISH.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawPublish {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    pub topic: String,
    pub packet_id: u16,
    pub payload: Vec<u8>,
}

/// A TCP connection speaking raw bytes.
pub struct Raw {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// A bare TCP connection (nothing sent).
    pub fn tcp(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("TCP connect");
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and sends `connect`; does not read the answer.
    pub fn send_connect(port: u16, connect: &ConnectBuilder) -> Raw {
        let mut raw = Raw::tcp(port);
        raw.send(&connect.bytes());
        raw
    }

    /// Connects with `connect` and returns the client and its CONNACK bytes.
    pub fn connect_with(port: u16, connect: &ConnectBuilder) -> (Raw, Vec<u8>) {
        let mut raw = Raw::send_connect(port, connect);
        let connack = raw.expect_packet();
        assert_eq!(connack.kind(), 2, "expected CONNACK, got {connack:?}");
        (raw, connack.bytes())
    }

    /// Connects as a clean-session 3.1.1 client and asserts CONNACK accepted.
    pub fn connect(port: u16, client_id: &str) -> Raw {
        let (raw, connack) = Raw::connect_with(port, &ConnectBuilder::new(client_id));
        assert_eq!(connack, CONNACK_OK);
        raw
    }

    /// Writes bytes (a failed write panics).
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to broker");
    }

    /// Writes bytes, ignoring errors (the broker may already have closed).
    pub fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Subscribes and returns the SUBACK's return codes.
    pub fn subscribe(&mut self, packet_id: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        let filters: Vec<(&[u8], u8)> = filters.iter().map(|(f, q)| (f.as_bytes(), *q)).collect();
        self.send(&subscribe(packet_id, &filters));
        let suback = self.expect_packet();
        assert_eq!(suback.kind(), 9, "expected SUBACK, got {suback:?}");
        assert_eq!(&suback.body[..2], &packet_id.to_be_bytes());
        suback.body[2..].to_vec()
    }

    /// Sends PINGREQ and asserts the next packet is PINGRESP.
    pub fn ping(&mut self) {
        self.send(&PINGREQ);
        let p = self.expect_packet();
        assert_eq!(p.bytes(), PINGRESP, "expected PINGRESP");
    }

    /// A whole packet out of the buffer, if there is one.
    fn take_packet(&mut self) -> Option<RawPacket> {
        take_packet(&mut self.buf)
    }

    /// The next packet, or Ok(None) on timeout; Err when the socket closed.
    pub fn read_packet(&mut self, timeout: Duration) -> Result<Option<RawPacket>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.take_packet() {
                return Ok(Some(p));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(deadline - now)).unwrap();
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("closed (EOF)".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("closed ({e})")),
            }
        }
    }

    /// The client, after CONNECT was sent, if CONNACK 0 comes back; None if
    /// the broker closes the socket instead (a refusal at accept).
    pub fn accepted(mut self) -> Option<Raw> {
        match self.read_packet(TIMEOUT) {
            Ok(Some(p)) => {
                assert_eq!(p.bytes(), CONNACK_OK, "unexpected answer to CONNECT");
                Some(self)
            }
            Ok(None) => panic!("no CONNACK and no close within {TIMEOUT:?}"),
            Err(_) => None,
        }
    }

    /// The next packet; panics on timeout or close.
    pub fn expect_packet(&mut self) -> RawPacket {
        match self.read_packet(TIMEOUT) {
            Ok(Some(p)) => p,
            Ok(None) => panic!("no packet within {TIMEOUT:?}"),
            Err(e) => panic!("connection {e} while waiting for a packet"),
        }
    }

    /// The next packet, which must be a PUBLISH.
    pub fn expect_publish(&mut self) -> RawPublish {
        self.expect_packet().publish()
    }

    /// Asserts the broker closes the connection (EOF or reset) within
    /// [`TIMEOUT`]; returns the bytes that arrived before the close.
    pub fn expect_closed(mut self) -> Vec<u8> {
        let mut received = std::mem::take(&mut self.buf);
        expect_closed_stream(&mut self.stream, &mut received);
        received
    }

    /// Asserts the broker closes the connection without sending anything.
    pub fn expect_closed_silently(self) {
        let bytes = self.expect_closed();
        assert!(bytes.is_empty(), "broker sent {bytes:?} before closing");
    }

    /// Closes with a TCP reset (SO_LINGER 0): an abrupt socket error.
    pub fn reset(self) {
        socket2::SockRef::from(&self.stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(self.stream);
    }

    /// Closes the socket (FIN) without DISCONNECT.
    pub fn close(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Asserts `stream` is closed by the peer within [`TIMEOUT`] (read returns 0,
/// or the connection is reset); what arrives before goes into `received`.
pub fn expect_closed_stream(stream: &mut TcpStream, received: &mut Vec<u8>) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let now = Instant::now();
        assert!(
            now < deadline,
            "broker did not close the connection within {TIMEOUT:?}"
        );
        stream.set_read_timeout(Some(deadline - now)).unwrap();
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                return;
            }
            Err(e) => panic!("unexpected read error: {e}"),
        }
    }
}

/// Asserts the broker closes `stream` within [`TIMEOUT`].
pub fn expect_closed(stream: &mut TcpStream) {
    expect_closed_stream(stream, &mut Vec::new());
}

// ---------------------------------------------------------------------------
// rumqttc client.

/// A `rumqttc` sync client whose event loop runs on its own thread.
pub struct Mqtt {
    pub client: Client,
    events: Receiver<Result<Event, String>>,
    /// Publishes that arrived while waiting for something else.
    backlog: VecDeque<Publish>,
}

impl Mqtt {
    /// Options for a client of the broker on `port`.
    pub fn options(port: u16, client_id: &str) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(64 * 1024, 64 * 1024);
        options
    }

    /// A clean-session client; waits for CONNACK accepted.
    pub fn connect(port: u16, client_id: &str) -> Mqtt {
        Mqtt::connect_with(Mqtt::options(port, client_id)).0
    }

    /// Connects with `options`; waits for CONNACK (panics on refusal).
    pub fn connect_with(options: MqttOptions) -> (Mqtt, ConnAck) {
        match Mqtt::try_connect(options) {
            Ok(ok) => ok,
            Err(e) => panic!("rumqttc connect failed: {e}"),
        }
    }

    /// Connects with `options`; Err with the reason when it fails.
    pub fn try_connect(options: MqttOptions) -> Result<(Mqtt, ConnAck), String> {
        let (client, mut connection) = Client::new(options, 64);
        let (tx, events) = channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                let stop = event.is_err();
                if tx.send(event.map_err(|e| e.to_string())).is_err() || stop {
                    break;
                }
            }
        });
        let mut mqtt = Mqtt {
            client,
            events,
            backlog: VecDeque::new(),
        };
        let connack = mqtt.wait_for(|p| match p {
            Packet::ConnAck(c) => Some(c.clone()),
            _ => None,
        })?;
        Ok((mqtt, connack))
    }

    /// Waits for an incoming packet `pick` accepts; publishes seen meanwhile
    /// are kept for [`Mqtt::recv_publish`].
    pub fn wait_for<T>(&mut self, pick: impl Fn(&Packet) -> Option<T>) -> Result<T, String> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("timed out after {TIMEOUT:?}"));
            }
            match self.events.recv_timeout(deadline - now) {
                Ok(Ok(Event::Incoming(packet))) => {
                    if let Some(t) = pick(&packet) {
                        return Ok(t);
                    }
                    if let Packet::Publish(p) = packet {
                        self.backlog.push_back(p);
                    }
                }
                Ok(Ok(Event::Outgoing(_))) => {}
                Ok(Err(e)) => return Err(e),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err("event loop ended".into()),
            }
        }
    }

    /// Subscribes to one filter; returns the SUBACK's return codes.
    pub fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
        self.client
            .subscribe(filter, qos)
            .expect("subscribe request");
        self.wait_for(|p| match p {
            Packet::SubAck(s) => Some(s.return_codes.clone()),
            _ => None,
        })
        .unwrap_or_else(|e| panic!("no SUBACK: {e}"))
    }

    /// Subscribes to several filters in one SUBSCRIBE.
    pub fn subscribe_many(&mut self, filters: &[(&str, QoS)]) -> Vec<SubscribeReasonCode> {
        let filters: Vec<rumqttc::SubscribeFilter> = filters
            .iter()
            .map(|(f, q)| rumqttc::SubscribeFilter::new(f.to_string(), *q))
            .collect();
        self.client
            .subscribe_many(filters)
            .expect("subscribe request");
        self.wait_for(|p| match p {
            Packet::SubAck(s) => Some(s.return_codes.clone()),
            _ => None,
        })
        .unwrap_or_else(|e| panic!("no SUBACK: {e}"))
    }

    /// Unsubscribes and waits for UNSUBACK.
    pub fn unsubscribe(&mut self, filter: &str) {
        self.client
            .unsubscribe(filter)
            .expect("unsubscribe request");
        self.wait_for(|p| matches!(p, Packet::UnsubAck(_)).then_some(()))
            .unwrap_or_else(|e| panic!("no UNSUBACK: {e}"));
    }

    /// Queues a publish (rumqttc sends it from its event loop).
    pub fn publish(&self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .expect("publish request");
    }

    /// Publishes at QoS 1 and waits for its PUBACK (the client has nothing
    /// else in flight).
    pub fn publish_acked(&mut self, topic: &str, retain: bool, payload: &[u8]) {
        self.publish(topic, QoS::AtLeastOnce, retain, payload);
        self.wait_for(|p| matches!(p, Packet::PubAck(_)).then_some(()))
            .unwrap_or_else(|e| panic!("no PUBACK: {e}"));
    }

    /// The next publish, or None after `timeout`.
    pub fn recv_publish(&mut self, timeout: Duration) -> Option<Publish> {
        if let Some(p) = self.backlog.pop_front() {
            return Some(p);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            match self.events.recv_timeout(deadline - now) {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => return Some(p),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("client connection failed: {e}"),
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => panic!("event loop ended"),
            }
        }
    }

    /// Every publish that arrives until the broker closes the connection
    /// (one taken over: no panic); panics after [`TIMEOUT`].
    pub fn publishes_until_closed(&mut self) -> Vec<Publish> {
        let mut got: Vec<Publish> = self.backlog.drain(..).collect();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => got.push(p),
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => return got,
                Err(RecvTimeoutError::Timeout) => panic!("the connection was not closed"),
            }
        }
    }

    /// The next publish; panics after [`TIMEOUT`].
    pub fn expect_publish(&mut self) -> Publish {
        self.recv_publish(TIMEOUT)
            .unwrap_or_else(|| panic!("no publish within {TIMEOUT:?}"))
    }

    /// Every publish up to and including the first on `marker`.
    pub fn collect_until(&mut self, marker: &str) -> Vec<Publish> {
        let mut got = Vec::new();
        loop {
            let p = self
                .recv_publish(TIMEOUT)
                .unwrap_or_else(|| panic!("marker {marker} not received; got {:?}", topics(&got)));
            let done = p.topic == marker;
            got.push(p);
            if done {
                return got;
            }
        }
    }

    /// Sends DISCONNECT and waits until the event loop has written it.
    pub fn disconnect(self) {
        self.client.disconnect().expect("disconnect request");
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            match self.events.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) | Ok(Err(_)) => return,
                Err(RecvTimeoutError::Disconnected) => return,
                _ => {}
            }
        }
        panic!("DISCONNECT not sent");
    }

    /// [`Mqtt::disconnect`], returning the publishes that arrived before
    /// the DISCONNECT went (unread ones, and those rumqttc acknowledged
    /// meanwhile), in order.
    pub fn disconnect_collecting(mut self) -> Vec<Publish> {
        self.client.disconnect().expect("disconnect request");
        let mut got: Vec<Publish> = self.backlog.drain(..).collect();
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            match self.events.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => got.push(p),
                Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) | Ok(Err(_)) => return got,
                Err(RecvTimeoutError::Disconnected) => return got,
                _ => {}
            }
        }
        panic!("DISCONNECT not sent");
    }
}

impl Drop for Mqtt {
    /// The event loop holds its own request sender, so dropping the client
    /// alone would leave it running: ask it to disconnect; the broker's
    /// close then ends the event thread.
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
    }
}

/// The topics of `publishes`, for messages.
pub fn topics(publishes: &[Publish]) -> Vec<String> {
    publishes.iter().map(|p| p.topic.clone()).collect()
}

/// Connects clients `prefix-0`, `prefix-1`, ... until at least `min` are
/// connected and both shards 0 and 1 hold at least one (at most `max`).
/// Returns them with their shards.
pub fn connect_spread(broker: &Broker, prefix: &str, min: usize, max: usize) -> Vec<(Mqtt, usize)> {
    let mut clients = Vec::new();
    let mut shards = HashSet::new();
    for i in 0..max {
        let id = format!("{prefix}-{i}");
        let client = Mqtt::connect(broker.port, &id);
        let shard = broker.shard_of(&id);
        shards.insert(shard);
        clients.push((client, shard));
        if clients.len() >= min && shards.len() == 2 {
            return clients;
        }
    }
    panic!("{max} connections all landed on shards {shards:?}");
}

// ---------------------------------------------------------------------------
// Hostile-client helpers (tests/e2e/hostile.rs).

impl Raw {
    /// A bare TCP connection to the broker from source address `source`
    /// (e.g. 127.0.0.2: every 127.0.0.0/8 address is local on Linux).
    pub fn tcp_from(port: u16, source: std::net::IpAddr) -> Raw {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&std::net::SocketAddr::new(source, 0).into())
            .expect("bind the source address");
        let target: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        socket.connect(&target.into()).expect("TCP connect");
        let stream: TcpStream = socket.into();
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: Vec::new(),
        }
    }
}

/// The resident memory of process `pid` in KiB (VmRSS in /proc/PID/status).
pub fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

/// What a session got of one publisher's numbered stream (`0..count`)
/// over the connections it moved through: the check of every test that
/// moves a session while publishing (between shards, between nodes). A
/// number that comes again on a later connection was in flight at a move
/// (resent with DUP, as MQTT allows for QoS 1) and is not counted twice.
#[derive(Debug, Default)]
pub struct Numbered {
    /// Numbers that never came.
    pub missing: Vec<usize>,
    /// Numbers that came twice on one connection.
    pub twice: Vec<usize>,
    /// Pairs of first arrivals out of order: a number before a smaller one.
    pub inversions: Vec<(usize, usize)>,
}

impl Numbered {
    /// Checks `got`, each number with the connection it came on, in the
    /// order received; numbers at or past `count` are not the stream's.
    pub fn of(got: &[(usize, usize)], count: usize) -> Numbered {
        // The connection each number first came on.
        let mut seen: Vec<Option<usize>> = vec![None; count];
        let mut order = Vec::new();
        let mut twice = Vec::new();
        for &(n, connection) in got {
            let Some(first) = seen.get_mut(n) else {
                panic!("{n} is past the stream's {count} numbers");
            };
            match *first {
                Some(on) if on < connection => {}
                Some(_) => twice.push(n),
                None => {
                    *first = Some(connection);
                    order.push(n);
                }
            }
        }
        Numbered {
            missing: (0..count).filter(|&n| seen[n].is_none()).collect(),
            twice,
            inversions: order
                .windows(2)
                .filter(|w| w[0] > w[1])
                .map(|w| (w[0], w[1]))
                .collect(),
        }
    }

    /// What came around the first missing number (`margin` either side,
    /// plus as many as are missing), with its connection: for a failure's
    /// message.
    pub fn around(&self, got: &[(usize, usize)], margin: usize) -> Vec<(usize, usize)> {
        let Some(&first) = self.missing.first() else {
            return Vec::new();
        };
        got.iter()
            .copied()
            .filter(|&(n, _)| n + margin >= first && n <= first + margin + self.missing.len())
            .collect()
    }

    /// Asserts that nothing came twice on one connection and nothing out
    /// of order; `what` names the stream in the failure.
    pub fn assert_once_in_order(&self, what: &str) {
        assert!(
            self.twice.is_empty(),
            "{what}: received twice on one connection: {:?}",
            self.twice
        );
        assert!(
            self.inversions.is_empty(),
            "{what}: out of order (a number before a smaller one): {:?}",
            self.inversions
        );
    }
}

/// [`Numbered`] finds each fault of a moved stream: a gap, a repeat on one
/// connection, an inversion; a resend on the next connection is none.
#[test]
fn numbered_finds_what_a_move_got_wrong() {
    let got = [(0, 0), (1, 0), (1, 1), (3, 1), (2, 1), (3, 1), (5, 2)];
    let stream = Numbered::of(&got, 6);
    assert_eq!(stream.missing, [4]);
    assert_eq!(stream.twice, [3]);
    assert_eq!(stream.inversions, [(3, 2)]);
    assert_eq!(stream.around(&got, 1), [(3, 1), (3, 1), (5, 2)]);
    let clean = Numbered::of(&[(0, 0), (1, 0), (1, 1), (2, 1)], 3);
    assert!(clean.missing.is_empty() && clean.twice.is_empty() && clean.inversions.is_empty());
}
