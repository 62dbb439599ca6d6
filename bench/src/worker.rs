//! A worker process: one single-threaded `mio` (epoll) event loop holding a
//! share of the subscriber connections.
//!
//! # Why a plain epoll loop
//! The load generator must cost far less per delivery than any broker, or it
//! measures itself. A delivery here is: one `recv` into a shared 64 KiB
//! scratch buffer (many frames per call when the broker coalesces), an
//! allocation-free frame parse ([`crate::mqtt::parse`]), a histogram record
//! and a sequence check. The clock is read once per `recv`, not per frame:
//! every frame of one read arrived at the same moment as far as the
//! application can tell, and `clock_gettime` was a third of the worker's
//! CPU at 1000 subscribers in a burst (perf, this 2-vCPU VM) when it was
//! read per frame; the deliveries timeline is likewise counted per read. No task, no waker, no future, no per-connection
//! buffer while idle (a partial frame is kept only between reads). An async
//! runtime adds per-readiness task wake-ups and per-connection futures on top
//! of the same epoll/io_uring readiness; glommio would also work but buys
//! nothing for a client that never blocks on anything but the socket, and
//! separate processes give us what threads would (more cores) plus what they
//! cannot (a fresh open-file limit each).
//!
//! # Past the open-file limit
//! A worker raises its soft `RLIMIT_NOFILE` to the hard limit and holds at
//! most that many sockets; the coordinator spreads connections over as many
//! workers as needed; connection `i` goes to (source address, broker
//! address) pair `i` mod the pairs (each pair has its own ephemeral port
//! range, see [`crate::capacity`]). Connections that
//! fail are counted by reason, never retried silently.

use crate::conn::{Conn, State};
use crate::mqtt::{self, Frame};
use crate::net;
use crate::procfs;
use crate::protocol::{
    Command, ConnectSummary, Event, Progress, WorkerReport, WorkerTask, pair_of,
};
use crate::stats::{self, SeqTracker, Timeline};
use crate::tls::{self, TlsConn};
use crate::ws::WsConn;
use hdrhistogram::Histogram;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use std::collections::BTreeMap;
use std::io::{self, BufRead, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Token of the stdin pipe (commands from the coordinator).
const STDIN: Token = Token(usize::MAX);

/// Read buffer shared by all connections: large enough that a coalesced
/// burst from the broker is drained in few calls.
const SCRATCH: usize = 64 * 1024;

/// How often progress goes to the coordinator.
const PROGRESS_EVERY_NS: u64 = 250_000_000;

/// How often handshake timeouts and keep-alives are checked.
const SWEEP_EVERY_NS: u64 = 500_000_000;

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("reading the task from stdin: {0}")]
    Task(String),
    #[error("bad target address {0:?}")]
    Target(String),
    #[error("no target address")]
    NoTarget,
    #[error("bad source address {0:?}")]
    Source(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("event loop: {0}")]
    Io(#[from] io::Error),
    #[error("writing to the coordinator: {0}")]
    Pipe(String),
}

/// The worker's whole state.
struct Worker {
    task: WorkerTask,
    targets: Vec<SocketAddr>,
    sources: Vec<IpAddr>,
    poll: Poll,
    conns: Vec<Conn>,
    scratch: Vec<u8>,
    /// The MQTT bytes unframed from one WebSocket read (`--transport ws`;
    /// reused, empty between reads).
    unframed: Vec<u8>,
    /// The plaintext decrypted from one TLS read (`--transport wss`;
    /// reused, empty between reads).
    decrypted: Vec<u8>,
    /// The TLS client configuration all of this worker's connections
    /// share (`--transport wss`).
    tls_config: Option<Arc<rustls::ClientConfig>>,
    /// Next connection to open in this connect phase.
    cursor: usize,
    /// Handshakes in flight.
    pending: usize,
    /// Connections whose failed handshake waits to be tried again
    /// (`reconnect_ms`), in the order they failed (so by retry time).
    retries: std::collections::VecDeque<usize>,
    /// Connect phase running (answer with `Connected` when it ends).
    connecting: bool,
    phase_started_ns: u64,
    connected: u64,
    ready: u64,
    failed: u64,
    connect_errors: BTreeMap<String, u64>,
    /// Connections established in this connect phase, by local address
    /// and by broker address (see [`ConnectSummary`]).
    by_source: BTreeMap<IpAddr, u64>,
    by_target: BTreeMap<SocketAddr, u64>,
    /// RSS before the connection table was allocated (B).
    rss_start_bytes: u64,
    run_errors: BTreeMap<String, u64>,
    connect_latency: Histogram<u64>,
    latency: Histogram<u64>,
    /// The part of `latency`, `delivered` and `publish_bytes` that went to
    /// MQTT 5.0 subscribers (the per-version split of a `mixed` run).
    v5_latency: Histogram<u64>,
    v5_delivered: u64,
    v5_publish_bytes: u64,
    /// Per tracked message of the phase: the largest latency seen here.
    last_arrival: Vec<u64>,
    timeline: Timeline,
    delivered: u64,
    foreign: u64,
    /// Bytes of this phase's delivered PUBLISH frames (see
    /// [`WorkerReport::publish_bytes`]).
    publish_bytes: u64,
    /// Delivered PUBLISH frames with a Topic Alias, and with the alias alone.
    aliased: u64,
    alias_only: u64,
    /// Publishes from an earlier phase (sequence number below `first_seq`).
    stale: u64,
    /// Sequence number of the current phase's first message.
    first_seq: u64,
    /// Track publish→last-subscriber latency for every `stride`-th message.
    stride: u64,
    first_delivery_ns: u64,
    last_delivery_ns: u64,
    out: io::Stdout,
}

/// Entry point of `fanmq-bench worker`: reads the task and commands from
/// stdin, runs until `Finish` or until stdin closes.
///
/// # Errors
/// A bad task, or the event loop or the pipe to the coordinator failed.
pub fn run() -> Result<(), WorkerError> {
    let mut line = String::new();
    io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| WorkerError::Task(e.to_string()))?;
    let task: WorkerTask =
        serde_json::from_str(&line).map_err(|e| WorkerError::Task(e.to_string()))?;
    procfs::raise_nofile();
    let targets = task
        .targets
        .iter()
        .map(|t| t.parse().map_err(|_| WorkerError::Target(t.clone())))
        .collect::<Result<Vec<SocketAddr>, _>>()?;
    if targets.is_empty() {
        return Err(WorkerError::NoTarget);
    }
    let sources = task
        .source_addrs
        .iter()
        .map(|s| s.parse().map_err(|_| WorkerError::Source(s.clone())))
        .collect::<Result<Vec<IpAddr>, _>>()?;
    let tls_config = match &task.tls {
        Some(t) => Some(tls::client_config(&t.ca_pem)?),
        None => None,
    };
    let rss_start_bytes = procfs::rss_bytes(std::process::id()).unwrap_or(0);
    let conns = (0..task.count).map(|_| Conn::new()).collect();
    let mut w = Worker {
        timeline: Timeline::new(task.timeline_start_ns, task.bucket_ns),
        task,
        targets,
        sources,
        poll: Poll::new()?,
        conns,
        scratch: vec![0; SCRATCH],
        unframed: Vec::new(),
        decrypted: Vec::new(),
        tls_config,
        cursor: 0,
        pending: 0,
        retries: std::collections::VecDeque::new(),
        connecting: false,
        phase_started_ns: 0,
        connected: 0,
        ready: 0,
        failed: 0,
        connect_errors: BTreeMap::new(),
        by_source: BTreeMap::new(),
        by_target: BTreeMap::new(),
        rss_start_bytes,
        run_errors: BTreeMap::new(),
        connect_latency: stats::new_hist(),
        latency: stats::new_hist(),
        v5_latency: stats::new_hist(),
        v5_delivered: 0,
        v5_publish_bytes: 0,
        last_arrival: Vec::new(),
        delivered: 0,
        foreign: 0,
        publish_bytes: 0,
        aliased: 0,
        alias_only: 0,
        stale: 0,
        first_seq: 0,
        stride: 1,
        first_delivery_ns: 0,
        last_delivery_ns: 0,
        out: io::stdout(),
    };
    w.event_loop()
}

/// Sets O_NONBLOCK on stdin so commands can be read from the event loop.
fn stdin_nonblocking() {
    // SAFETY: fcntl on fd 0 with valid flags.
    unsafe {
        let flags = libc::fcntl(0, libc::F_GETFL);
        libc::fcntl(0, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

impl Worker {
    fn send(&mut self, event: &Event) -> Result<(), WorkerError> {
        let mut line = serde_json::to_vec(event).map_err(|e| WorkerError::Pipe(e.to_string()))?;
        line.push(b'\n');
        self.out
            .write_all(&line)
            .and_then(|()| self.out.flush())
            .map_err(|e| WorkerError::Pipe(e.to_string()))
    }

    fn progress(&self) -> Progress {
        Progress {
            connected: self.connected,
            ready: self.ready,
            failed: self.failed,
            delivered: self.delivered,
            stale: self.stale,
        }
    }

    fn event_loop(&mut self) -> Result<(), WorkerError> {
        stdin_nonblocking();
        self.poll
            .registry()
            .register(&mut SourceFd(&0), STDIN, Interest::READABLE)?;
        let mut events = Events::with_capacity(1024);
        let mut stdin_buf: Vec<u8> = Vec::new();
        let mut last_progress = 0u64;
        let mut last_sweep = 0u64;
        loop {
            self.open_more();
            let timeout = Duration::from_millis(if self.connecting { 10 } else { 100 });
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            for ev in events.iter() {
                if ev.token() == STDIN {
                    continue;
                }
                let i = ev.token().0;
                if ev.is_writable() {
                    self.on_writable(i);
                }
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    self.on_readable(i);
                }
            }
            // Commands: checked every iteration (cheap: one failed read).
            let mut chunk = [0u8; 4096];
            loop {
                match io::stdin().lock().read(&mut chunk) {
                    Ok(0) => return Ok(()), // coordinator gone: stop.
                    Ok(n) => stdin_buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            while let Some(nl) = stdin_buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = stdin_buf.drain(..=nl).collect();
                let cmd: Command = serde_json::from_slice(&line)
                    .map_err(|e| WorkerError::Task(format!("bad command: {e}")))?;
                if self.command(cmd)? {
                    return Ok(());
                }
            }
            let now = stats::monotonic_ns();
            if now - last_sweep > SWEEP_EVERY_NS {
                last_sweep = now;
                self.sweep(now);
            }
            if self.connecting
                && self.cursor == self.conns.len()
                && self.pending == 0
                && self.retries.is_empty()
            {
                self.connecting = false;
                let summary = ConnectSummary {
                    ready: self.ready,
                    failed: self.failed,
                    errors: self.connect_errors.clone(),
                    latency: stats::to_pairs(&self.connect_latency),
                    started_ns: self.phase_started_ns,
                    ended_ns: now,
                    cpu_s: procfs::self_cpu_seconds(),
                    by_source: count_strings(&self.by_source),
                    by_target: count_strings(&self.by_target),
                    rss_start_bytes: self.rss_start_bytes,
                    rss_bytes: procfs::rss_bytes(std::process::id()).unwrap_or(0),
                };
                self.send(&Event::Connected(summary))?;
            }
            if now - last_progress > PROGRESS_EVERY_NS {
                last_progress = now;
                let p = self.progress();
                self.send(&Event::Progress(p))?;
            }
        }
    }

    /// Starts a connect phase: opening connections from the first one
    /// again, with fresh failure and latency counts.
    fn start_connecting(&mut self) {
        self.connecting = true;
        self.cursor = 0;
        self.pending = 0;
        self.retries.clear();
        self.failed = 0;
        self.connect_errors.clear();
        self.by_source.clear();
        self.by_target.clear();
        self.connect_latency.reset();
        self.phase_started_ns = stats::monotonic_ns();
    }

    /// Handles one command; `true` means exit.
    fn command(&mut self, cmd: Command) -> Result<bool, WorkerError> {
        match cmd {
            Command::Connect => {
                self.connected = 0;
                self.ready = 0;
                self.start_connecting();
            }
            Command::Drop => {
                let mut closed = 0;
                for c in &mut self.conns {
                    if let Some(mut s) = c.stream.take() {
                        let _ = self.poll.registry().deregister(&mut s);
                        closed += 1;
                    }
                    c.state = State::Idle;
                    c.clear_transport();
                }
                self.connected = 0;
                self.ready = 0;
                self.send(&Event::Dropped { closed })?;
            }
            Command::Repair => {
                // Like Connect, but the subscribed connections stay: only
                // idle or failed ones are opened again (see `open_more`).
                self.start_connecting();
            }
            Command::Finish { published } => {
                let report = self.report(published);
                self.send(&Event::Report(Box::new(report)))?;
                return Ok(true);
            }
            Command::Step {
                published,
                next_first_seq,
                track_stride,
                timeline_start_ns,
            } => {
                let report = self.report(published);
                self.send(&Event::Report(Box::new(report)))?;
                self.new_phase(next_first_seq, track_stride, timeline_start_ns);
            }
        }
        Ok(false)
    }

    /// Starts a new measured phase: every delivery figure starts over, and
    /// the connections subscribed now are the ones counted.
    fn new_phase(&mut self, first_seq: u64, stride: u64, timeline_start_ns: u64) {
        self.first_seq = first_seq;
        self.stride = stride.max(1);
        for c in &mut self.conns {
            c.seq = SeqTracker::starting_at(first_seq);
            c.counted = c.state == State::Ready;
        }
        self.latency.reset();
        self.v5_latency.reset();
        self.v5_delivered = 0;
        self.v5_publish_bytes = 0;
        self.last_arrival = Vec::new();
        self.timeline = Timeline::new(timeline_start_ns, self.task.bucket_ns);
        self.delivered = 0;
        self.foreign = 0;
        self.publish_bytes = 0;
        self.aliased = 0;
        self.alias_only = 0;
        self.stale = 0;
        self.first_delivery_ns = 0;
        self.last_delivery_ns = 0;
        self.run_errors.clear();
    }

    fn report(&mut self, published: u64) -> WorkerReport {
        let mut r = WorkerReport {
            delivered: self.delivered,
            foreign: self.foreign,
            stale: self.stale,
            ready: self.ready,
            latency: stats::to_pairs(&self.latency),
            last_arrival: std::mem::take(&mut self.last_arrival),
            timeline: self.timeline.counts.clone(),
            first_delivery_ns: self.first_delivery_ns,
            last_delivery_ns: self.last_delivery_ns,
            errors: self.run_errors.clone(),
            cpu_s: procfs::self_cpu_seconds(),
            publish_bytes: self.publish_bytes,
            aliased: self.aliased,
            alias_only: self.alias_only,
            v5_delivered: self.v5_delivered,
            v5_latency: stats::to_pairs(&self.v5_latency),
            v5_publish_bytes: self.v5_publish_bytes,
            ..WorkerReport::default()
        };
        for c in &self.conns {
            if !c.counted {
                continue; // never subscribed: counted as a connect failure.
            }
            r.counted += 1;
            let lost = c.seq.lost(published);
            r.lost += lost;
            r.subs_with_loss += u64::from(lost > 0);
            r.duplicates += c.seq.duplicates;
            r.out_of_order += c.seq.out_of_order;
        }
        r
    }

    /// Starts connects while under the in-flight cap: the next ones of the
    /// phase, then the failed ones whose retry time has come.
    fn open_more(&mut self) {
        while self.connecting
            && self.cursor < self.conns.len()
            && self.pending < self.task.max_pending
        {
            let i = self.cursor;
            self.cursor += 1;
            if !matches!(self.conns[i].state, State::Idle | State::Failed) {
                continue; // Repair: this one is up (or on its way).
            }
            self.start_one(i);
        }
        if self.retries.is_empty() || !self.connecting {
            return;
        }
        let now = stats::monotonic_ns();
        while self.pending < self.task.max_pending {
            let Some(&i) = self.retries.front() else {
                break;
            };
            if self.conns[i].retry_at_ns > now {
                break;
            }
            self.retries.pop_front();
            self.conns[i].retry_at_ns = 0;
            self.start_one(i);
        }
    }

    /// Starts the TCP connect of connection `i`.
    fn start_one(&mut self, i: usize) {
        let (target, source) = self.pair(i);
        let now = stats::monotonic_ns();
        match net::start_connect(target, source) {
            Ok(mut stream) => {
                let reg = self.poll.registry().register(
                    &mut stream,
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                );
                let c = &mut self.conns[i];
                c.started_ns = now;
                c.state = State::Connecting;
                c.stream = Some(stream);
                self.pending += 1;
                if let Err(e) = reg {
                    self.fail(i, &net::error_kind(&e));
                }
            }
            Err(e) => {
                self.conns[i].state = State::Connecting;
                self.pending += 1;
                self.fail(i, &net::error_kind(&e));
            }
        }
    }

    /// The broker address and source address of connection `i`.
    fn pair(&self, i: usize) -> (SocketAddr, Option<IpAddr>) {
        let (s, t) = pair_of(i as u64, self.sources.len(), self.targets.len());
        (self.targets[t], self.sources.get(s).copied())
    }

    /// Gives up on connection `i`, counting why.
    fn fail(&mut self, i: usize, why: &str) {
        let c = &mut self.conns[i];
        let in_handshake = matches!(
            c.state,
            State::Connecting | State::WaitUpgrade | State::WaitConnAck | State::WaitSubAck
        );
        if let Some(mut s) = c.stream.take() {
            let _ = self.poll.registry().deregister(&mut s);
            if c.state != State::Connecting {
                self.connected = self.connected.saturating_sub(1);
            }
        }
        let now = stats::monotonic_ns();
        let reconnect_ns = self.task.reconnect_ms * 1_000_000;
        // Retries stop --handshake-timeout-ms after the phase began, so that
        // a phase the broker never lets finish still ends.
        let in_time =
            now + reconnect_ns < self.phase_started_ns + self.task.handshake_timeout_ms * 1_000_000;
        if in_handshake && self.connecting && reconnect_ns > 0 && in_time {
            // Tried again later, as a client reconnects; counted apart.
            self.pending = self.pending.saturating_sub(1);
            *self
                .connect_errors
                .entry(format!("retried after: {why}"))
                .or_default() += 1;
            let retry_at_ns = now + reconnect_ns;
            let c = &mut self.conns[i];
            c.state = State::Idle;
            c.clear_transport();
            c.retry_at_ns = retry_at_ns;
            self.retries.push_back(i);
            return;
        }
        if in_handshake {
            self.pending = self.pending.saturating_sub(1);
            self.failed += 1;
            *self.connect_errors.entry(why.to_owned()).or_default() += 1;
        } else if c.state == State::Ready {
            self.ready = self.ready.saturating_sub(1);
            *self.run_errors.entry(why.to_owned()).or_default() += 1;
        }
        c.state = State::Failed;
        c.clear_transport();
    }

    fn on_writable(&mut self, i: usize) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        if c.state == State::Connecting {
            let Some(stream) = c.stream.as_ref() else {
                return;
            };
            match stream.take_error() {
                Ok(Some(e)) | Err(e) => return self.fail(i, &net::error_kind(&e)),
                Ok(None) => {}
            }
            let peer = match stream.peer_addr() {
                Ok(peer) => peer,
                // A spurious wake-up: still connecting.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => return self.fail(i, &net::error_kind(&e)),
            };
            // The addresses as the kernel has them, not as we asked.
            *self.by_target.entry(peer).or_default() += 1;
            if let Ok(local) = stream.local_addr() {
                *self.by_source.entry(local.ip()).or_default() += 1;
            }
            self.connected += 1;
            if let (Some(config), Some(t)) = (&self.tls_config, &self.task.tls) {
                // The ClientHello goes out on the flush below; what is
                // queued meanwhile waits for the handshake.
                match TlsConn::start(config, &t.server_name) {
                    Ok(tls) => c.tls = Some(Box::new(tls)),
                    Err(e) => return self.fail(i, &e.to_string()),
                }
            }
            if self.task.transport.is_websocket() && !self.task.raw {
                // CONNECT goes out once the upgrade is answered.
                let c = &mut self.conns[i];
                c.ws = Some(Box::new(WsConn::start(&peer.to_string(), &mut c.unsent)));
                c.state = State::WaitUpgrade;
            } else {
                c.state = State::WaitConnAck;
                if let Err(e) = self.queue_hello(i) {
                    return self.fail(i, &e);
                }
            }
        }
        self.flush(i);
    }

    /// Queues connection `i`'s first bytes: CONNECT (and SUBSCRIBE right
    /// behind it when pipelined), or the raw forwarder's hello.
    fn queue_hello(&mut self, i: usize) -> Result<(), String> {
        let c = &mut self.conns[i];
        if self.task.raw {
            c.unsent.push(b'S');
            return Ok(());
        }
        let task = &self.task;
        let index = task.first_index + i as u64;
        let id = format!("{}{index}", task.client_prefix);
        queue_mqtt(c, |out| {
            if task.protocol.v5_for(index) {
                mqtt::encode_connect_v5(&id, task.keep_alive_s, true, task.topic_alias_max, out)?;
            } else {
                mqtt::encode_connect(&id, task.keep_alive_s, !task.persistent, out)?;
            }
            // Pipelined: SUBSCRIBE right behind CONNECT, in the same
            // write, before any CONNACK.
            if task.pipeline {
                encode_subscribe(task, index, out)?;
            }
            Ok::<(), mqtt::MqttError>(())
        })
        .map_err(|e| e.to_string())
    }

    /// Writes what is unsent (encrypted first over TLS); fails the
    /// connection on a socket or TLS error.
    fn flush(&mut self, i: usize) {
        let c = &mut self.conns[i];
        let Some(stream) = c.stream.as_mut() else {
            return;
        };
        if let Some(tls) = c.tls.as_mut() {
            match tls.flush(&mut c.unsent, stream) {
                Ok(true) => c.last_send_ns = stats::monotonic_ns(),
                Ok(false) => {}
                Err(e) => return self.fail(i, &e.to_string()),
            }
        }
        while !c.unsent.is_empty() {
            match stream.write(&c.unsent) {
                Ok(n) => {
                    c.unsent.drain(..n);
                    c.last_send_ns = stats::monotonic_ns();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail(i, &net::error_kind(&e)),
            }
        }
        if c.unsent.is_empty() && c.unsent.capacity() > 0 {
            c.unsent = Vec::new(); // idle connections keep no buffer.
        }
    }

    fn on_readable(&mut self, i: usize) {
        loop {
            let Some(c) = self.conns.get_mut(i) else {
                return;
            };
            if matches!(c.state, State::Idle | State::Failed | State::Connecting) {
                return;
            }
            let Some(stream) = c.stream.as_mut() else {
                return;
            };
            let n = match stream.read(&mut self.scratch) {
                Ok(0) => return self.fail(i, "closed by broker"),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.fail(i, &net::error_kind(&e)),
            };
            // One clock read per recv: the arrival time of all its frames.
            let now = self.task.clock.now_ns();
            let scratch = std::mem::take(&mut self.scratch);
            let mut decrypted = std::mem::take(&mut self.decrypted);
            let bytes = match self.conns[i].tls.as_mut() {
                None => Ok(&scratch[..n]),
                Some(tls) => tls
                    .receive(&scratch[..n], &mut decrypted)
                    .map(|()| &decrypted[..])
                    .map_err(|e| e.to_string()),
            };
            let result = bytes.and_then(|bytes| {
                if self.conns[i].ws.is_some() {
                    self.consume_ws(i, bytes, now)
                } else {
                    self.consume_bytes(i, bytes, now)
                }
            });
            decrypted.clear();
            self.decrypted = decrypted;
            self.scratch = scratch;
            if let Err(why) = result {
                return self.fail(i, &why);
            }
            if n < self.scratch.len() {
                break; // drained (edge-triggered: a short read means empty).
            }
        }
        self.flush(i);
    }

    /// Handles the MQTT bytes `bytes` read at `now` after what was left
    /// from the previous read (`Conn::partial`, parsed straight from
    /// `bytes` when nothing was), keeping what does not make a whole packet.
    fn consume_bytes(&mut self, i: usize, bytes: &[u8], now: u64) -> Result<(), String> {
        let mut data = std::mem::take(&mut self.conns[i].partial);
        if data.is_empty() {
            let used = self.consume(i, bytes, now)?;
            self.conns[i].partial.extend_from_slice(&bytes[used..]);
        } else {
            data.extend_from_slice(bytes);
            let used = self.consume(i, &data, now)?;
            data.drain(..used);
            self.conns[i].partial = data;
        }
        Ok(())
    }

    /// Handles `wire`, bytes read at `now` from a WebSocket connection:
    /// the upgrade's answer (then CONNECT goes out), frames, and the MQTT
    /// bytes they carry.
    fn consume_ws(&mut self, i: usize, wire: &[u8], now: u64) -> Result<(), String> {
        let mut unframed = std::mem::take(&mut self.unframed);
        let c = &mut self.conns[i];
        let Some(ws) = c.ws.as_mut() else {
            return Err("no WebSocket state".into());
        };
        let upgrading = ws.upgrading();
        let mut result = ws
            .receive(wire, &mut unframed, &mut c.unsent)
            .map_err(|e| e.to_string());
        if result.is_ok() && upgrading && !ws.upgrading() {
            c.state = State::WaitConnAck;
            result = self.queue_hello(i);
        }
        if result.is_ok() && !unframed.is_empty() {
            result = self.consume_bytes(i, &unframed, now);
        }
        unframed.clear();
        self.unframed = unframed;
        result
    }

    /// Handles every whole frame in `data`, read at `now`; returns the bytes
    /// used.
    fn consume(&mut self, i: usize, data: &[u8], now: u64) -> Result<usize, String> {
        let delivered_before = self.delivered;
        let r = self.consume_frames(i, data, now);
        let n = self.delivered - delivered_before;
        if n > 0 {
            self.timeline.add_n(now, n);
            if self.first_delivery_ns == 0 {
                self.first_delivery_ns = now;
            }
            self.last_delivery_ns = now;
        }
        r
    }

    fn consume_frames(&mut self, i: usize, data: &[u8], now: u64) -> Result<usize, String> {
        let mut at = 0;
        if self.conns[i].state == State::WaitConnAck && self.task.raw {
            match data.first() {
                None => return Ok(0),
                Some(b'K') => {
                    at = 1;
                    self.became_ready(i);
                }
                Some(_) => return Err("raw forwarder: bad hello".into()),
            }
        }
        let v5 = self.task.protocol.v5_for(self.task.first_index + i as u64);
        loop {
            let (frame, used) = match mqtt::parse_as(&data[at..], v5) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(at),
                Err(e) => return Err(format!("protocol error: {e}")),
            };
            at += used;
            if let Frame::Publish {
                alias: Some(_),
                topic,
                ..
            } = frame
            {
                self.aliased += 1;
                self.alias_only += u64::from(topic.is_empty());
            }
            let delivered = self.delivered;
            self.on_frame(i, frame, now)?;
            if self.delivered > delivered {
                self.publish_bytes += used as u64;
                if v5 {
                    self.v5_publish_bytes += used as u64;
                }
            }
        }
    }

    fn became_ready(&mut self, i: usize) {
        let now = stats::monotonic_ns();
        let c = &mut self.conns[i];
        c.state = State::Ready;
        c.seq = SeqTracker::starting_at(self.first_seq);
        c.counted = true;
        self.pending = self.pending.saturating_sub(1);
        self.ready += 1;
        stats::record(&mut self.connect_latency, now.saturating_sub(c.started_ns));
    }

    fn on_frame(&mut self, i: usize, frame: Frame<'_>, now: u64) -> Result<(), String> {
        let state = self.conns[i].state;
        match frame {
            Frame::ConnAck { code } if state == State::WaitConnAck => {
                if code != 0 {
                    return Err(format!("CONNACK refused (code {code})"));
                }
                let c = &mut self.conns[i];
                c.state = State::WaitSubAck;
                if !self.task.pipeline {
                    let index = self.task.first_index + i as u64;
                    queue_mqtt(c, |out| encode_subscribe(&self.task, index, out))
                        .map_err(|e| e.to_string())?;
                }
            }
            Frame::SubAck { codes, .. } if state == State::WaitSubAck => {
                // 0x80 in 3.1.1; every 5.0 failure reason is 0x80 or more.
                if codes.iter().any(|&code| code >= 0x80) {
                    return Err("SUBACK failure".into());
                }
                self.became_ready(i);
            }
            Frame::Publish {
                qos, pkid, payload, ..
            } => {
                match stats::read_stamp(payload) {
                    // An earlier phase's message, late: not this phase's
                    // (still acknowledged below).
                    Some((_, seq)) if seq < self.first_seq => self.stale += 1,
                    Some((sent, seq)) => {
                        self.delivered += 1;
                        let lat = now.saturating_sub(sent);
                        stats::record(&mut self.latency, lat);
                        if self.task.protocol.v5_for(self.task.first_index + i as u64) {
                            self.v5_delivered += 1;
                            stats::record(&mut self.v5_latency, lat);
                        }
                        let c = &mut self.conns[i];
                        c.seq.on_seq(seq);
                        // Slot of a tracked message (no division when
                        // every message is tracked, the usual case).
                        let k = seq - self.first_seq;
                        let slot = match self.stride {
                            1 => Some(k),
                            n if k.is_multiple_of(n) => Some(k / n),
                            _ => None,
                        };
                        if let Some(slot) = slot.filter(|&s| s < self.task.track_msgs) {
                            let s = slot as usize;
                            if self.last_arrival.len() <= s {
                                self.last_arrival.resize(s + 1, 0);
                            }
                            self.last_arrival[s] = self.last_arrival[s].max(lat);
                        }
                    }
                    None => {
                        self.foreign += 1;
                        self.delivered += 1;
                    }
                }
                match qos {
                    1 => self.ack(i, mqtt::kind::PUBACK, pkid)?,
                    2 => self.ack(i, mqtt::kind::PUBREC, pkid)?,
                    _ => {}
                }
            }
            Frame::Ack {
                kind: mqtt::kind::PUBREL,
                pkid,
            } => self.ack(i, mqtt::kind::PUBCOMP, pkid)?,
            _ => {} // PINGRESP and anything unexpected: ignored.
        }
        Ok(())
    }

    /// Queues an acknowledgement and, unless acknowledgements are coalesced,
    /// writes it now in its own `write` (as real clients do: each ack is a
    /// separate segment the broker must read).
    ///
    /// # Errors
    /// The write failed: the connection is already failed and counted.
    fn ack(&mut self, i: usize, kind: u8, pkid: u16) -> Result<(), String> {
        queue_mqtt(&mut self.conns[i], |out| mqtt::encode_ack(kind, pkid, out));
        if self.task.coalesce_acks {
            return Ok(()); // written after the whole read, in one write.
        }
        self.flush(i);
        if self.conns[i].stream.is_none() {
            return Err("acknowledgement write failed".into());
        }
        Ok(())
    }

    /// Handshake timeouts and keep-alive pings.
    fn sweep(&mut self, now: u64) {
        let timeout_ns = self.task.handshake_timeout_ms * 1_000_000;
        let ping_ns = u64::from(self.task.keep_alive_s) * 500_000_000;
        for i in 0..self.conns.len() {
            let c = &mut self.conns[i];
            match c.state {
                State::Connecting | State::WaitUpgrade | State::WaitConnAck | State::WaitSubAck
                    if now.saturating_sub(c.started_ns) > timeout_ns =>
                {
                    self.fail(i, "handshake timeout");
                }
                State::Ready
                    if ping_ns > 0
                        && !self.task.raw
                        && now.saturating_sub(c.last_send_ns) > ping_ns =>
                {
                    queue_mqtt(c, |out| out.extend_from_slice(&mqtt::PINGREQ));
                    self.flush(i);
                }
                _ => {}
            }
        }
    }
}

/// Appends the MQTT bytes `encode` writes to `c`'s unsent bytes: as they
/// are over TCP, in one binary frame over WebSocket.
fn queue_mqtt<R>(c: &mut Conn, encode: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    match c.ws.as_mut() {
        None => encode(&mut c.unsent),
        Some(ws) => {
            let mut packet = Vec::new();
            let result = encode(&mut packet);
            if !packet.is_empty() {
                ws.send(&packet, &mut c.unsent);
            }
            result
        }
    }
}

/// Appends subscriber `index`'s SUBSCRIBE (packet id 1) in its version.
fn encode_subscribe(
    task: &WorkerTask,
    index: u64,
    out: &mut Vec<u8>,
) -> Result<(), mqtt::MqttError> {
    if task.protocol.v5_for(index) {
        mqtt::encode_subscribe_v5(1, &task.filter, task.qos, out)
    } else {
        mqtt::encode_subscribe(1, &task.filter, task.qos, out)
    }
}

/// A count map with string keys, for the coordinator's JSON.
fn count_strings<K: std::fmt::Display>(m: &BTreeMap<K, u64>) -> BTreeMap<String, u64> {
    m.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}
