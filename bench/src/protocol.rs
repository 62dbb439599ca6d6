//! What the coordinator and its worker processes say to each other.
//!
//! The coordinator re-executes its own binary as `fanmq-bench worker`, writes
//! one [`WorkerTask`] then [`Command`]s as JSON lines to the worker's stdin,
//! and reads [`Event`]s as JSON lines from its stdout. A worker exits when
//! its stdin closes, so a crashed or killed coordinator leaves no workers.
//! Control messages are few (a handful per run, progress 4× a second), so
//! JSON costs nothing that matters and keeps the protocol readable.

use crate::mqtt::Protocol;
use crate::stats::{Clock, HistPairs};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One worker's share of the subscribers and how to connect them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerTask {
    /// Worker number, for logs and client ids.
    pub worker: usize,
    /// Broker addresses `host:port` (already resolved): connection `i` of
    /// this worker goes to pair `i % (sources × targets)` of
    /// [`pair_of`].
    pub targets: Vec<String>,
    /// Global index of this worker's first connection (client ids, source
    /// address choice).
    pub first_index: u64,
    /// How many connections this worker opens.
    pub count: u64,
    /// Client id prefix; the id is `{prefix}{index}`.
    pub client_prefix: String,
    /// Topic filter every subscriber subscribes to.
    pub filter: String,
    /// Subscription QoS.
    pub qos: u8,
    /// MQTT version of the subscribers (by global index for `mixed`).
    #[serde(default)]
    pub protocol: Protocol,
    /// Topic Alias Maximum in the MQTT 5.0 subscribers' CONNECT (0: none).
    #[serde(default)]
    pub topic_alias_max: u16,
    /// MQTT keep-alive in seconds; PINGREQ after half of it without a send.
    pub keep_alive_s: u16,
    /// Subscribers connect with CleanSession = 0 (`--clean-session false`).
    #[serde(default)]
    pub persistent: bool,
    /// Talk to the bench's own `raw` forwarder instead of an MQTT broker.
    pub raw: bool,
    /// What carries the subscribers' MQTT (`--transport`).
    #[serde(default)]
    pub transport: Transport,
    /// How the subscribers check the broker's certificate
    /// (`--transport wss`); None for the other transports.
    #[serde(default)]
    pub tls: Option<TlsTask>,
    /// Source addresses to bind before connect; empty = kernel's choice.
    pub source_addrs: Vec<String>,
    /// Handshakes in flight at once (TCP connect to SUBACK), this worker's
    /// share of `--connect-in-flight`; the storm sets it to `count` (every
    /// socket at once).
    pub max_pending: usize,
    /// CONNECT and SUBSCRIBE written together, without waiting for CONNACK
    /// (what many clients do); `false`: SUBSCRIBE once CONNACK arrived
    /// (MQTT.js, and the storm).
    #[serde(default)]
    pub pipeline: bool,
    /// Acknowledgements of one read written together in one `write`;
    /// `false` (the default, as paho, MQTT.js and mosquitto_sub do): every
    /// PUBACK, PUBREC and PUBCOMP is its own `write` the moment its packet
    /// is parsed.
    #[serde(default)]
    pub coalesce_acks: bool,
    /// A handshake (TCP + CONNECT + SUBSCRIBE) taking longer fails.
    pub handshake_timeout_ms: u64,
    /// A handshake that failed (refused, closed by the broker, timed out)
    /// is tried again after this many milliseconds, as clients reconnect
    /// (MQTT.js waits 1000 ms); 0: it stays failed.
    #[serde(default)]
    pub reconnect_ms: u64,
    /// Monotonic time of bucket 0 of the deliveries timeline.
    pub timeline_start_ns: u64,
    /// Width of a timeline bucket.
    pub bucket_ns: u64,
    /// Per-message "last arrival" is tracked for at most this many messages
    /// of a phase (bounded memory: 8 bytes per message).
    pub track_msgs: u64,
    /// The clock of the payload stamps, read on every arrival; the
    /// timeline's and first/last delivery's times are in it too.
    pub clock: Clock,
}

/// What carries the subscribers' MQTT (`--transport`); the publisher
/// always uses plain TCP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// MQTT over TCP.
    #[default]
    Tcp,
    /// MQTT over WebSocket (MQTT 3.1.1 §6), path `/mqtt`, subprotocol
    /// `mqtt`, as MQTT.js in a browser.
    Ws,
    /// MQTT over WebSocket over TLS (`wss://`), as MQTT.js in a browser
    /// on an `https://` page.
    Wss,
}

impl Transport {
    /// True for plain TCP (the default, left out of result files).
    pub fn is_tcp(&self) -> bool {
        *self == Transport::Tcp
    }

    /// True for the WebSocket transports (`ws` and `wss`): the subscribers
    /// go to the broker's WebSocket listener.
    pub fn is_websocket(&self) -> bool {
        matches!(self, Transport::Ws | Transport::Wss)
    }
}

/// How the subscribers check the broker's certificate (`--transport wss`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsTask {
    /// PEM of the certificates the broker's must chain to (the test
    /// certificate of a broker `--compare` started, else `--ca-file`).
    pub ca_pem: String,
    /// The name (or address) the broker's certificate must be valid for.
    pub server_name: String,
}

/// The (source index, target index) of pair `k` of `sources × targets`
/// pairs: consecutive connections go to consecutive targets, then the next
/// source, so every pair gets an equal share (±1) and none runs out of
/// ephemeral ports before the others.
pub fn pair_of(k: u64, sources: usize, targets: usize) -> (usize, usize) {
    let targets = targets.max(1) as u64;
    let k = k % (sources.max(1) as u64 * targets);
    ((k / targets) as usize, (k % targets) as usize)
}

/// Coordinator → worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Open (or re-open) every connection; answered by [`Event::Connected`].
    Connect,
    /// Close every connection at once; answered by [`Event::Dropped`].
    Drop,
    /// Stop and report; `published` is the sequence number after the last
    /// one the publisher sent (to count the ones never received). Answered
    /// by [`Event::Report`].
    Finish { published: u64 },
    /// Report the phase so far like [`Command::Finish`], then start a new
    /// phase (the latency scenario's steps): counters, histograms and
    /// sequence checks start over, expecting sequence numbers from
    /// `next_first_seq` on (older ones still arriving are counted as stale
    /// and otherwise ignored); publish→last-subscriber latency is kept for
    /// every `track_stride`-th message; the timeline restarts at
    /// `timeline_start_ns`. Answered by [`Event::Report`].
    Step {
        published: u64,
        next_first_seq: u64,
        track_stride: u64,
        timeline_start_ns: u64,
    },
    /// Open again every connection that is not subscribed (the broker shed
    /// or closed it); the others stay as they are. Answered by
    /// [`Event::Connected`] with the totals.
    Repair,
}

/// Worker → coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Event {
    /// Counters so far, sent about 4 times a second.
    Progress(Progress),
    /// The connect phase is over: every connection is up or failed.
    Connected(ConnectSummary),
    /// All connections closed.
    Dropped { closed: u64 },
    /// Final figures.
    Report(Box<WorkerReport>),
    /// The worker cannot go on.
    Fatal(String),
}

/// Live counters.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Progress {
    /// TCP connections established.
    pub connected: u64,
    /// Connections subscribed and ready.
    pub ready: u64,
    /// Connections that failed.
    pub failed: u64,
    /// Messages received.
    pub delivered: u64,
    /// Messages of an earlier phase received in this one (the latency
    /// scenario waits for these to stop before its next step).
    pub stale: u64,
}

/// The outcome of one connect phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectSummary {
    pub ready: u64,
    pub failed: u64,
    /// Why connections failed, counted by kind.
    pub errors: BTreeMap<String, u64>,
    /// TCP connect start → SUBACK (ns).
    pub latency: HistPairs,
    /// When the phase started and ended (monotonic ns).
    pub started_ns: u64,
    pub ended_ns: u64,
    /// The worker's own CPU seconds so far.
    pub cpu_s: f64,
    /// Connections established in this phase by local address, as the
    /// kernel bound them (every source address should be there).
    #[serde(default)]
    pub by_source: BTreeMap<String, u64>,
    /// The same by broker address:port, as the kernel connected them.
    #[serde(default)]
    pub by_target: BTreeMap<String, u64>,
    /// The worker's RSS before it allocated its connections (B): the
    /// baseline of the generator's memory per subscriber.
    #[serde(default)]
    pub rss_start_bytes: u64,
    /// The worker's RSS at the end of the phase (B).
    #[serde(default)]
    pub rss_bytes: u64,
}

/// A worker's final figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Subscribers that lost at least one message.
    pub subs_with_loss: u64,
    /// Payloads without a bench stamp (not ours).
    pub foreign: u64,
    /// Publishes of an earlier phase that arrived in this one (ignored).
    pub stale: u64,
    /// Connections subscribed when the report was made.
    pub ready: u64,
    /// Subscribers counted in this phase (subscribed at its start or during
    /// it): each should have received every message of the phase.
    pub counted: u64,
    /// Publish → this subscriber (ns).
    pub latency: HistPairs,
    /// Per tracked message of the phase (every `track_stride`-th from the
    /// phase's first sequence number): the largest latency seen here (ns),
    /// 0 = none.
    pub last_arrival: Vec<u64>,
    /// Deliveries per timeline bucket.
    pub timeline: Vec<u64>,
    pub first_delivery_ns: u64,
    pub last_delivery_ns: u64,
    /// Connections the broker closed or that broke after subscribing.
    pub errors: BTreeMap<String, u64>,
    /// The worker's own CPU seconds, total.
    pub cpu_s: f64,
    /// Bytes of the PUBLISH packets received in this phase, whole frames
    /// (fixed header to payload): over `delivered`, the bytes a delivery
    /// takes on the wire.
    #[serde(default)]
    pub publish_bytes: u64,
    /// PUBLISH packets of this phase that carried a Topic Alias, and of
    /// those, how many came with an empty topic (the alias alone).
    #[serde(default)]
    pub aliased: u64,
    #[serde(default)]
    pub alias_only: u64,
    /// The MQTT 5.0 subscribers' part of `delivered`, `latency` and
    /// `publish_bytes` (all of it with `--protocol 5`, about half with
    /// `mixed`, none with `4`).
    #[serde(default)]
    pub v5_delivered: u64,
    #[serde(default)]
    pub v5_latency: HistPairs,
    #[serde(default)]
    pub v5_publish_bytes: u64,
}
