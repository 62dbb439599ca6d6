//! Typed configuration: a TOML file (every key optional) overridden by
//! command-line flags. Every default is a documented constant here, and the
//! commented sample `fanmq.toml` at the repository root mirrors them.

pub mod cluster;
pub mod os;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// How often each shard sweeps for keep-alive timeouts (and refreshes its
/// admin gauges, `observe::metrics::REFRESH_PERIOD`). Half a second:
/// a keep-alive timeout (1.5 × keep-alive, §3.1.2.10) is then noticed within
/// 0.5 s, and figures are at most that old.
pub const KEEP_ALIVE_SWEEP: Duration = Duration::from_millis(500);

/// Default listener: all IPv4 addresses on MQTT's registered port.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:1883";
/// Default connection cap: far above one host's typical need and below the
/// 1,048,576 open files our systemd unit grants (a few are kept for logs and
/// the io_uring rings).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1_000_000;
/// Default largest packet accepted (fixed header included). 1 MiB, as EMQX:
/// big enough for any telemetry or command message, small enough that one
/// client cannot make a shard buffer hundreds of MiB (the 3.1.1 maximum is
/// 256 MiB).
pub const DEFAULT_MAX_PACKET_SIZE: usize = 1024 * 1024;
/// Default listen backlog: deep enough for a reconnect storm of many
/// thousands per second (the kernel caps it at `net.core.somaxconn`).
pub const DEFAULT_BACKLOG: u32 = 4096;
/// Seconds a new socket has to send its CONNECT before it is closed, so
/// half-open or silent sockets cannot hold file descriptors.
pub const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 10;
/// QoS 1/2 messages in flight per client (Mosquitto's
/// `max_inflight_messages`, whose default is 20). 100, not 20: a subscriber
/// that acknowledges every message in its own write (paho, MQTT.js,
/// mosquitto_sub) frees one slot per PUBACK, so a window of 20 turns a
/// burst into a wake-up, a read and a write per few acknowledgements. With
/// 10k such subscribers and a burst of 50 messages, 100 in flight gave
/// 1.5-2.2x the deliveries per broker CPU-second of 20 (`fanmq-bench fanout
/// --qos 1`, one shard on its own CPU, loopback, alternating runs). The
/// messages beyond the window wait in the pending queue anyway, so a wider
/// window costs no more broker memory, only earlier use of the kernel's
/// socket buffers. FlashMQ allows 512 (and 64 KiB).
pub const DEFAULT_MAX_INFLIGHT: usize = 100;
/// Messages queued per client (outgoing QoS 0 queue; QoS 1/2 pending queue);
/// Mosquitto's `max_queued_messages`.
pub const DEFAULT_MAX_QUEUED_MESSAGES: usize = 1000;
/// Bytes queued per client, with the same split. 1 MiB bounds a stalled
/// subscriber's memory; a 100k-subscriber host must still budget for how many
/// subscribers can stall at once (see README, "Limits").
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 1024 * 1024;
/// Unreleased QoS 2 messages received per client (EMQX's `max_awaiting_rel`).
pub const DEFAULT_MAX_AWAITING_REL: usize = 100;
/// Acknowledgements a subscriber that owes many (QoS 1/2 messages in flight
/// to it) is read for at once: its socket's receive low-water mark is set
/// so that the kernel wakes the broker once that many (4 bytes each) or all
/// it owes have arrived, not at every PUBACK a client writes on its own,
/// with a patience of 50 ms after which whatever arrived is read. 64 is
/// more than a quarter of the default window of 100 (when the window is
/// refilled), so a full window is woken for about once per refill; 1 turns
/// it off (a wake-up per acknowledgement, as before).
pub const DEFAULT_ACKS_PER_WAKE: usize = 64;
/// The largest `acks_per_wake`: 4 KiB of acknowledgements, far under any
/// socket receive buffer (the kernel caps the mark at half of it).
pub const MAX_ACKS_PER_WAKE: usize = 1024;
/// Largest keep-alive, in seconds, an MQTT 5.0 client may use (Mosquitto's
/// `max_keepalive`): a client asking for more, or for 0 (none), is told this
/// value as Server Keep Alive in CONNACK (§3.2.2.3.14). 65535, the largest
/// MQTT can say, as Mosquitto: only a client without keep-alive is changed.
pub const DEFAULT_MAX_KEEPALIVE: u16 = u16::MAX;
/// Highest Topic Alias an MQTT 5.0 client may use towards the broker
/// (Topic Alias Maximum in CONNACK, §3.2.2.3.8), Mosquitto's
/// `max_topic_alias` default. Each costs the connection one stored topic;
/// 0 turns topic aliases off.
pub const DEFAULT_MAX_TOPIC_ALIAS: u16 = 10;
/// Topic Aliases the broker itself uses towards an MQTT 5.0 client that
/// allows them (its CONNECT's Topic Alias Maximum, §3.1.2.11.8), at most:
/// the connection keeps one copied topic per alias in use, so this bounds
/// that memory, and 16 covers a fan-out subscriber's few hot topics. 0
/// turns server topic aliases off.
pub const DEFAULT_SERVER_TOPIC_ALIASES: u16 = 16;
/// Seconds between `$SYS` updates; Mosquitto's `sys_interval` default.
pub const DEFAULT_SYS_INTERVAL_SECS: u64 = 10;
/// Batches of publishes that one shard may have queued towards another
/// before the publisher's shard waits (and so stops reading its publisher).
pub const DEFAULT_MESH_CAPACITY: usize = 1024;

/// How a message for a shared subscription group chooses its one member
/// (`shared_subscription_strategy`, EMQX's names). Members that cannot take
/// the message are skipped in every strategy.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SharedStrategy {
    /// Each member in turn (per publishing shard): the default, as EMQX's.
    #[default]
    RoundRobin,
    /// A member drawn at random for each message.
    Random,
    /// The member chosen by a hash of the publisher's client id: one
    /// publisher's messages all go to the same member while the group's
    /// members stay the same.
    HashClientid,
}
/// Default log level when neither `--log-level` nor `RUST_LOG` says.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Default `allow_anonymous` when no `password_file` is set: true, so a
/// broker without any authentication configured works out of the box (the
/// start-up log warns when such a broker listens beyond loopback).
pub const DEFAULT_ALLOW_ANONYMOUS_WITHOUT_PASSWORD_FILE: bool = true;
/// Default `allow_anonymous` when a `password_file` is set: false, since
/// configuring passwords means clients must log in (Mosquitto 2.x refuses
/// anonymous clients by default too).
pub const DEFAULT_ALLOW_ANONYMOUS_WITH_PASSWORD_FILE: bool = false;
/// Default address of the admin HTTP listener (metrics, API, dashboard):
/// loopback only, EMQX's dashboard port. `off` (or empty) disables it.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:18083";

// Transports (TLS, WebSocket; see `net::transport`). Every transport other
// than plain MQTT is off by default: it needs certificates (TLS, WSS) or is a
// deliberate choice (WS), and the tests run many brokers at once on port 0,
// so no fixed port may be bound unless configured.

/// Default TLS listeners (`tls_listen`): none. MQTT over TLS's registered
/// port is 8883 ([`CONVENTIONAL_TLS_PORT`]).
pub const DEFAULT_TLS_LISTEN: &[SocketAddr] = &[];
/// Default MQTT-over-WebSocket listeners (`ws_listen`): none; conventionally
/// port 8083 ([`CONVENTIONAL_WS_PORT`]).
pub const DEFAULT_WS_LISTEN: &[SocketAddr] = &[];
/// Default MQTT-over-WebSocket-over-TLS listeners (`wss_listen`): none;
/// conventionally port 8084 ([`CONVENTIONAL_WSS_PORT`]).
pub const DEFAULT_WSS_LISTEN: &[SocketAddr] = &[];
/// IANA's port for MQTT over TLS (documentation and the sample config).
pub const CONVENTIONAL_TLS_PORT: u16 = 8883;
/// The usual port of MQTT over WebSocket (EMQX, HiveMQ).
pub const CONVENTIONAL_WS_PORT: u16 = 8083;
/// The usual port of MQTT over secure WebSocket (EMQX, HiveMQ).
pub const CONVENTIONAL_WSS_PORT: u16 = 8084;
/// Seconds a connection on a `proxy_protocol` listener has to send its
/// PROXY protocol header before it is closed (EMQX's `proxy_protocol_timeout`
/// default). A balancer sends the header at once, in its first packet; the
/// connect timeout starts once the header is read.
pub const DEFAULT_PROXY_PROTOCOL_TIMEOUT_SECS: u64 = 3;
/// Default for `require_certificate`: TLS clients need no certificate, as in
/// Mosquitto.
pub const DEFAULT_REQUIRE_CERTIFICATE: bool = false;
/// Default for `use_identity_as_username`: off, as in Mosquitto.
pub const DEFAULT_USE_IDENTITY_AS_USERNAME: bool = false;

// Hostile-client limits (README, "Security").

/// Connections held at once from one source address (an IPv4 address, or an
/// IPv6 /64, which one host usually owns whole). 4096: many clients share
/// one address behind a NAT (a carrier-grade NAT puts thousands of phones
/// behind one IPv4 address, and browsers and phones are where a fan-out
/// reaches its millions), while one host still holds at most 0.4% of the
/// default `max_connections`. Loopback is exempt by default
/// ([`DEFAULT_LIMITS_EXEMPT_LOOPBACK`]). 0: no limit.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 4096;
/// New connections per second accepted from one source address (a token
/// bucket per address, refilled at this rate). This, not the listener's
/// rate, is what stops one hostile address: at about 100 µs of broker CPU
/// per CONNECT+SUBSCRIBE, 200/s is 2% of one core, and its refused
/// connections take none of the listener's tokens from honest clients. A
/// full NAT address ([`DEFAULT_MAX_CONNECTIONS_PER_IP`] clients) is back
/// within (4096 - 400) / 200 ≈ 19 s after a restart. 0: no limit.
pub const DEFAULT_MAX_CONNECTION_RATE_PER_IP: u32 = 200;
/// Connections one address may open in one burst above its rate (its
/// bucket's size): a device gateway reconnecting its fleet at once.
pub const DEFAULT_CONNECTION_RATE_PER_IP_BURST: u32 = 400;
/// New connections per second accepted on one listen address, all sources
/// together (a token bucket refilled at this rate). 40,000/s brings
/// [`DEFAULT_MAX_CONNECTIONS`] clients back within (1,000,000 - 40,000) /
/// 40,000 = 24 s after a restart (2000/s, the earlier default, took more
/// than 8 minutes), so the broker's CPU, not this limit, sets how fast a
/// fleet returns; it still caps a flood from many addresses at once.
/// 0: no limit.
pub const DEFAULT_MAX_CONNECTION_RATE: u32 = 40_000;
/// Connections a listener accepts in one burst above the rate (the token
/// bucket's size): one second's worth.
pub const DEFAULT_CONNECTION_RATE_BURST: u32 = 40_000;
/// Loopback clients (127.0.0.0/8, ::1) are exempt from the per-address and
/// rate limits: they are local processes (benchmarks, bridges, health
/// checks), not remote attackers.
pub const DEFAULT_LIMITS_EXEMPT_LOOPBACK: bool = true;
/// Subscriptions one client may hold; SUBSCRIBE beyond it gets 0x80 for the
/// extra filters. 1000 is plenty for a device, and bounds the router memory
/// one client can claim. 0: no limit.
pub const DEFAULT_MAX_SUBSCRIPTIONS_PER_CLIENT: usize = 1000;
/// Levels in a Topic Name or Topic Filter. Deeper PUBLISH topics close the
/// connection, deeper filters get SUBACK 0x80. 32 is far beyond real topic
/// trees and bounds the router's per-match recursion. 0: no limit.
pub const DEFAULT_MAX_TOPIC_LEVELS: usize = 32;
/// Longest client id in bytes; longer ones get CONNACK 2 (identifier
/// rejected). MQTT requires 23 to be allowed (§3.1.3.1); 256 fits UUIDs,
/// hostnames and cloud thing names, and bounds what a session keeps per id.
pub const DEFAULT_MAX_CLIENT_ID_LEN: usize = 256;
/// Default bytes queued to clients by all shards together (each shard gets
/// an equal share), as a fraction of the memory the broker may use
/// ([`crate::config::os::memory_limit`]: RAM, or the cgroup's cap in a container or
/// under systemd's `MemoryMax=`): a quarter, so that queued messages cannot
/// push a small VM (1 GB for 100k subscribers) into the OOM killer while
/// connections, the kernel's socket buffers and the rest keep the other
/// three quarters. When a shard is over its share it disconnects the
/// non-reading clients with the largest queues first (README, "Security").
/// Counted per client, so frames shared by many queues count many times: an
/// upper bound of the memory really held.
pub const DEFAULT_QUEUED_BYTES_TOTAL_DIVISOR: u64 = 4;
/// The default budget when the memory limit cannot be read: 8 GiB.
pub const DEFAULT_MAX_QUEUED_BYTES_TOTAL_FALLBACK: usize = 8 << 30;

/// Default `max_queued_bytes_total`: a quarter of the memory limit (see
/// [`DEFAULT_QUEUED_BYTES_TOTAL_DIVISOR`]).
pub fn default_max_queued_bytes_total() -> usize {
    crate::config::os::memory_limit()
        .map(|bytes| bytes / DEFAULT_QUEUED_BYTES_TOTAL_DIVISOR)
        .and_then(|bytes| usize::try_from(bytes).ok())
        .unwrap_or(DEFAULT_MAX_QUEUED_BYTES_TOTAL_FALLBACK)
}

/// Whether persistence is on by default: no disk I/O unless asked (tests
/// run many brokers; Mosquitto's default too).
pub const DEFAULT_PERSISTENCE: bool = false;

/// Period of the `fdatasync` in `persistence_sync = "interval"` mode: what a
/// power loss may take.
pub const DEFAULT_PERSISTENCE_SYNC_INTERVAL_MS: u64 = 1000;

/// Bytes of a shard's log since its last snapshot past which the shard
/// writes a new snapshot while it runs (`persistence_snapshot_log_bytes`):
/// bounds the disk a long-running broker uses (about twice this plus two
/// snapshots per shard) and the log replayed at start. A snapshot is also
/// put off until the log is larger than the previous snapshot, so that
/// snapshots never write more than the log they replace. Mosquitto's peer
/// is `autosave_interval` (1800 s), a timer that rewrites the whole
/// database.
pub const DEFAULT_PERSISTENCE_SNAPSHOT_LOG_BYTES: u64 = 256 * 1024 * 1024;

/// When what persistence writes is durable, and so when the QoS 1/2
/// acknowledgements that need it go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Acknowledge once it is on disk (`fdatasync`, one per batch): it
    /// survives a power loss.
    #[default]
    Ack,
    /// Acknowledge once written to the kernel (survives `kill -9`), sync every
    /// `persistence_sync_interval_ms` (a power loss may take that much).
    Interval,
}

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid setting {key}: {why}")]
    Invalid {
        /// The key or flag.
        key: &'static str,
        /// Why.
        why: String,
    },
}

/// The command-line flags that override the configuration file: each
/// overrides the file's key of the same name. The binary's `Cli`
/// (`crate::cli`) flattens them beside its subcommands.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct Flags {
    /// TOML configuration file (see the commented sample fanmq.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to accept MQTT connections on; repeat for several listeners.
    /// Replaces the default 0.0.0.0:1883. Port 0 picks a free port.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Vec<SocketAddr>,
    /// Address to accept MQTT connections on from a load balancer that
    /// sends the PROXY protocol header (v1 or v2) first; repeatable. Joins
    /// --listen's listeners (together they replace the file's `listen`).
    #[arg(long, value_name = "ADDR:PORT")]
    pub proxy_listen: Vec<SocketAddr>,
    /// Number of shards (one pinned thread each). Default: one per CPU the
    /// process may run on (its affinity mask, or --cpus).
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// CPUs to pin shards to, e.g. "0-3,6". Must lie within the process's
    /// affinity mask. Default: that mask.
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<String>,
    /// Most client connections held at once (all shards together).
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Largest MQTT packet accepted, in bytes; larger ones close the connection.
    #[arg(long, value_name = "BYTES")]
    pub max_packet_size: Option<usize>,
    /// Log level: error, warn, info, debug, trace (RUST_LOG, when set, wins).
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Most connections from one IPv4 address or IPv6 /64 (0: no limit).
    #[arg(long, value_name = "N")]
    pub max_connections_per_ip: Option<usize>,
    /// New connections per second per listen address (0: no limit).
    #[arg(long, value_name = "N")]
    pub max_connection_rate: Option<u32>,
    /// New connections per second from one IPv4 address or IPv6 /64, on each
    /// listen address (0: no limit).
    #[arg(long, value_name = "N")]
    pub max_connection_rate_per_ip: Option<u32>,
    /// Address to accept MQTT over TLS on (conventionally port 8883);
    /// repeatable. Needs --certfile and --keyfile.
    #[arg(long, value_name = "ADDR:PORT")]
    pub tls_listen: Vec<SocketAddr>,
    /// Address to accept MQTT over WebSocket on (conventionally port 8083);
    /// repeatable.
    #[arg(long, value_name = "ADDR:PORT")]
    pub ws_listen: Vec<SocketAddr>,
    /// Address to accept MQTT over secure WebSocket on (conventionally port
    /// 8084); repeatable. Needs --certfile and --keyfile.
    #[arg(long, value_name = "ADDR:PORT")]
    pub wss_listen: Vec<SocketAddr>,
    /// PEM file with the server's certificate chain (TLS and WSS).
    #[arg(long, value_name = "FILE")]
    pub certfile: Option<PathBuf>,
    /// PEM file with the server's private key (TLS and WSS).
    #[arg(long, value_name = "FILE")]
    pub keyfile: Option<PathBuf>,
    /// PEM file with the CA certificates that client certificates must chain to.
    #[arg(long, value_name = "FILE")]
    pub cafile: Option<PathBuf>,
    /// Password file in mosquitto_passwd format (see `fanmq passwd`);
    /// clients with a user name must match an entry.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// ACL file in Mosquitto's acl_file syntax; without one everything is
    /// allowed.
    #[arg(long, value_name = "FILE")]
    pub acl_file: Option<PathBuf>,
    /// Whether clients without a user name may connect. Default: true
    /// without a password file, false with one.
    #[arg(long, value_name = "BOOL")]
    pub allow_anonymous: Option<bool>,
    /// Admin HTTP listener (Prometheus /metrics, JSON API, dashboard), or
    /// "off". Default 127.0.0.1:18083. Port 0 picks a free port.
    #[arg(long, value_name = "ADDR:PORT|off")]
    pub http_listen: Option<String>,
    /// Keep retained messages and persistent sessions in DIR across
    /// restarts and crashes (turns `persistence` on; overrides
    /// `persistence_location`).
    #[arg(long, value_name = "DIR")]
    pub persistence_dir: Option<PathBuf>,
    /// NATS server URL that joins this node to a cluster (repeatable, for a
    /// NATS cluster's seeds); replaces `[cluster] nats_urls`. Without any,
    /// fanmq is a single node.
    #[arg(long, value_name = "URL")]
    pub cluster_nats: Vec<String>,
    /// This node's name in the cluster (default: the host name).
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
}

/// The configuration file's schema: every key optional.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<Vec<ListenEntry>>,
    shards: Option<usize>,
    cpus: Option<String>,
    max_connections: Option<usize>,
    max_packet_size: Option<usize>,
    backlog: Option<u32>,
    connect_timeout_secs: Option<u64>,
    max_inflight_messages: Option<usize>,
    max_queued_messages: Option<usize>,
    max_queued_bytes: Option<usize>,
    max_awaiting_rel: Option<usize>,
    acks_per_wake: Option<usize>,
    max_keepalive: Option<u16>,
    max_topic_alias: Option<u16>,
    response_information: Option<String>,
    server_topic_aliases: Option<u16>,
    sys_interval_secs: Option<u64>,
    mesh_capacity: Option<usize>,
    shared_subscription_strategy: Option<SharedStrategy>,
    log_level: Option<String>,
    max_connections_per_ip: Option<usize>,
    max_connection_rate: Option<u32>,
    connection_rate_burst: Option<u32>,
    max_connection_rate_per_ip: Option<u32>,
    connection_rate_per_ip_burst: Option<u32>,
    limits_exempt_loopback: Option<bool>,
    max_subscriptions_per_client: Option<usize>,
    max_topic_levels: Option<usize>,
    max_client_id_len: Option<usize>,
    max_queued_bytes_total: Option<usize>,
    tls_listen: Option<Vec<ListenEntry>>,
    ws_listen: Option<Vec<ListenEntry>>,
    wss_listen: Option<Vec<ListenEntry>>,
    proxy_protocol_timeout_secs: Option<u64>,
    certfile: Option<PathBuf>,
    keyfile: Option<PathBuf>,
    cafile: Option<PathBuf>,
    require_certificate: Option<bool>,
    use_identity_as_username: Option<bool>,
    password_file: Option<PathBuf>,
    acl_file: Option<PathBuf>,
    allow_anonymous: Option<bool>,
    http_listen: Option<String>,
    http_auth_token: Option<String>,
    http_basic_user: Option<String>,
    http_basic_password: Option<String>,
    persistence: Option<bool>,
    persistence_location: Option<PathBuf>,
    persistence_sync: Option<SyncMode>,
    persistence_sync_interval_ms: Option<u64>,
    persistence_snapshot_log_bytes: Option<u64>,
    cluster: Option<cluster::FileCluster>,
}

/// One entry of a listen list (`listen`, `tls_listen`, `ws_listen`,
/// `wss_listen`): an address, or a table with the listener's options.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(untagged)]
enum ListenEntry {
    /// `"0.0.0.0:1883"`.
    Address(SocketAddr),
    /// `{ address = "0.0.0.0:1883", proxy_protocol = true }`.
    Table(ListenTable),
}

/// A listener with options.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct ListenTable {
    /// Where to listen.
    address: SocketAddr,
    /// Connections start with a PROXY protocol header (v1 or v2).
    #[serde(default)]
    proxy_protocol: bool,
}

impl ListenEntry {
    /// The address and whether it expects a PROXY protocol header.
    fn split(self) -> (SocketAddr, bool) {
        match self {
            ListenEntry::Address(address) => (address, false),
            ListenEntry::Table(t) => (t.address, t.proxy_protocol),
        }
    }
}

/// Index of each listen list in [`Config::proxy_protocol`] (the order of
/// the transports in the net layer's `Transport::ALL`).
pub const LISTEN_LISTS: [&str; 4] = ["listen", "tls_listen", "ws_listen", "wss_listen"];

/// The broker's settings after defaults, file and flags were merged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Addresses to accept MQTT connections on.
    pub listen: Vec<SocketAddr>,
    /// Shards to run; `None`: one per allowed CPU.
    pub shards: Option<usize>,
    /// CPUs to pin to; `None`: the process's affinity mask.
    pub cpus: Option<Vec<usize>>,
    /// Most client connections at once, all shards together.
    pub max_connections: usize,
    /// Largest packet accepted, in bytes.
    pub max_packet_size: usize,
    /// Listen backlog per shard socket.
    pub backlog: u32,
    /// Time a new socket has to send CONNECT.
    pub connect_timeout: Duration,
    /// QoS 1/2 messages in flight per client.
    pub max_inflight_messages: usize,
    /// Messages queued per client (see `session::Limits`).
    pub max_queued_messages: usize,
    /// Bytes queued per client.
    pub max_queued_bytes: usize,
    /// Unreleased incoming QoS 2 messages per client.
    pub max_awaiting_rel: usize,
    /// Acknowledgements read at once from a subscriber that owes many (see
    /// [`DEFAULT_ACKS_PER_WAKE`]); 1: every one as it arrives.
    pub acks_per_wake: usize,
    /// Largest keep-alive an MQTT 5.0 client gets, in seconds (see
    /// [`DEFAULT_MAX_KEEPALIVE`]).
    pub max_keepalive: u16,
    /// Highest Topic Alias an MQTT 5.0 client may send (see
    /// [`DEFAULT_MAX_TOPIC_ALIAS`]).
    pub max_topic_alias: u16,
    /// The Response Information an MQTT 5.0 CONNACK carries when the
    /// CONNECT asks for it (Request Response Information = 1, §3.1.2.11.7):
    /// the base of the Response Topics the client may use; `%c` is replaced
    /// by the client id. `None` (the default, as EMQX's empty
    /// `response_information`): never sent.
    pub response_information: Option<String>,
    /// Most Topic Aliases the broker assigns towards one MQTT 5.0 client
    /// (see [`DEFAULT_SERVER_TOPIC_ALIASES`]); 0: none.
    pub server_topic_aliases: u16,
    /// Interval of `$SYS` updates; zero disables them.
    pub sys_interval: Duration,
    /// Capacity of each mesh channel, in batches.
    pub mesh_capacity: usize,
    /// How a shared subscription group's member is chosen per message.
    pub shared_subscription_strategy: SharedStrategy,
    /// Log level filter (env_logger syntax).
    pub log_level: String,
    /// The file this came from, re-read on SIGHUP.
    pub config_file: Option<PathBuf>,
    /// Connections at once per IPv4 address or IPv6 /64; 0: no limit.
    pub max_connections_per_ip: usize,
    /// New connections per second per listen address; 0: no limit.
    pub max_connection_rate: u32,
    /// Token-bucket size of the connection rate limit.
    pub connection_rate_burst: u32,
    /// New connections per second per IPv4 address or IPv6 /64, on each
    /// listen address; 0: no limit.
    pub max_connection_rate_per_ip: u32,
    /// Token-bucket size of the per-address connection rate limit.
    pub connection_rate_per_ip_burst: u32,
    /// Loopback clients skip the per-address and rate limits.
    pub limits_exempt_loopback: bool,
    /// Subscriptions per client; 0: no limit.
    pub max_subscriptions_per_client: usize,
    /// Levels per Topic Name or Topic Filter; 0: no limit.
    pub max_topic_levels: usize,
    /// Longest client id in bytes.
    pub max_client_id_len: usize,
    /// Bytes queued to clients, all shards together; 0: no limit.
    pub max_queued_bytes_total: usize,
    /// Addresses to accept MQTT over TLS on.
    pub tls_listen: Vec<SocketAddr>,
    /// Addresses to accept MQTT over WebSocket on.
    pub ws_listen: Vec<SocketAddr>,
    /// Addresses to accept MQTT over WebSocket over TLS on.
    pub wss_listen: Vec<SocketAddr>,
    /// Which listeners expect a PROXY protocol header: per listen list, in
    /// the order of [`LISTEN_LISTS`], one flag per address of that list
    /// (missing flags are false; see [`Config::expects_proxy_header`]).
    pub proxy_protocol: [Vec<bool>; 4],
    /// Time a connection on a PROXY protocol listener has to send the header.
    pub proxy_protocol_timeout: Duration,
    /// The server's certificate chain (PEM), re-read on SIGHUP.
    pub certfile: Option<PathBuf>,
    /// The server's private key (PEM), re-read on SIGHUP.
    pub keyfile: Option<PathBuf>,
    /// CA certificates (PEM) client certificates are verified against.
    pub cafile: Option<PathBuf>,
    /// TLS clients must present a certificate signed by `cafile`.
    pub require_certificate: bool,
    /// The client certificate's Common Name is the client's username
    /// (checked by the authentication step).
    pub use_identity_as_username: bool,
    /// Password file (mosquitto_passwd format), re-read on SIGHUP; `None`:
    /// user names are not checked.
    pub password_file: Option<PathBuf>,
    /// ACL file (Mosquitto syntax), re-read on SIGHUP; `None`: everything
    /// is allowed.
    pub acl_file: Option<PathBuf>,
    /// `allow_anonymous` as configured; `None`: the default that depends on
    /// `password_file` (see [`Config::allow_anonymous`]).
    pub allow_anonymous: Option<bool>,
    /// Admin HTTP listener address; `None`: disabled.
    pub http_listen: Option<SocketAddr>,
    /// Bearer token the admin API requires (`Authorization: Bearer ...`).
    pub http_auth_token: Option<String>,
    /// User and password the admin API accepts with HTTP basic auth.
    pub http_basic_auth: Option<(String, String)>,
    /// Whether retained messages are kept on disk.
    pub persistence: bool,
    /// The directory persistence writes to (required when it is on).
    pub persistence_location: Option<PathBuf>,
    /// When what persistence writes counts as stored.
    pub persistence_sync: SyncMode,
    /// Sync period in [`SyncMode::Interval`].
    pub persistence_sync_interval: Duration,
    /// Log bytes per shard since its last snapshot that start a new one
    /// ([`DEFAULT_PERSISTENCE_SNAPSHOT_LOG_BYTES`]).
    pub persistence_snapshot_log_bytes: u64,
    /// The NATS cluster this node joins; `None`: a single node.
    pub cluster: Option<cluster::ClusterConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![DEFAULT_LISTEN.parse().expect("constant address parses")],
            shards: None,
            cpus: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_packet_size: DEFAULT_MAX_PACKET_SIZE,
            backlog: DEFAULT_BACKLOG,
            connect_timeout: Duration::from_secs(DEFAULT_CONNECT_TIMEOUT_SECS),
            max_inflight_messages: DEFAULT_MAX_INFLIGHT,
            max_queued_messages: DEFAULT_MAX_QUEUED_MESSAGES,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            max_awaiting_rel: DEFAULT_MAX_AWAITING_REL,
            acks_per_wake: DEFAULT_ACKS_PER_WAKE,
            max_keepalive: DEFAULT_MAX_KEEPALIVE,
            max_topic_alias: DEFAULT_MAX_TOPIC_ALIAS,
            response_information: None,
            server_topic_aliases: DEFAULT_SERVER_TOPIC_ALIASES,
            sys_interval: Duration::from_secs(DEFAULT_SYS_INTERVAL_SECS),
            mesh_capacity: DEFAULT_MESH_CAPACITY,
            shared_subscription_strategy: SharedStrategy::default(),
            log_level: DEFAULT_LOG_LEVEL.to_string(),
            config_file: None,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            max_connection_rate: DEFAULT_MAX_CONNECTION_RATE,
            connection_rate_burst: DEFAULT_CONNECTION_RATE_BURST,
            max_connection_rate_per_ip: DEFAULT_MAX_CONNECTION_RATE_PER_IP,
            connection_rate_per_ip_burst: DEFAULT_CONNECTION_RATE_PER_IP_BURST,
            limits_exempt_loopback: DEFAULT_LIMITS_EXEMPT_LOOPBACK,
            max_subscriptions_per_client: DEFAULT_MAX_SUBSCRIPTIONS_PER_CLIENT,
            max_topic_levels: DEFAULT_MAX_TOPIC_LEVELS,
            max_client_id_len: DEFAULT_MAX_CLIENT_ID_LEN,
            max_queued_bytes_total: default_max_queued_bytes_total(),
            tls_listen: DEFAULT_TLS_LISTEN.to_vec(),
            ws_listen: DEFAULT_WS_LISTEN.to_vec(),
            wss_listen: DEFAULT_WSS_LISTEN.to_vec(),
            proxy_protocol: Default::default(),
            proxy_protocol_timeout: Duration::from_secs(DEFAULT_PROXY_PROTOCOL_TIMEOUT_SECS),
            certfile: None,
            keyfile: None,
            cafile: None,
            require_certificate: DEFAULT_REQUIRE_CERTIFICATE,
            use_identity_as_username: DEFAULT_USE_IDENTITY_AS_USERNAME,
            password_file: None,
            acl_file: None,
            allow_anonymous: None,
            http_listen: Some(
                DEFAULT_HTTP_LISTEN
                    .parse()
                    .expect("constant address parses"),
            ),
            http_auth_token: None,
            http_basic_auth: None,
            persistence: DEFAULT_PERSISTENCE,
            persistence_location: None,
            persistence_sync: SyncMode::default(),
            persistence_sync_interval: Duration::from_millis(DEFAULT_PERSISTENCE_SYNC_INTERVAL_MS),
            persistence_snapshot_log_bytes: DEFAULT_PERSISTENCE_SNAPSHOT_LOG_BYTES,
            cluster: None,
        }
    }
}

impl Config {
    /// Merges defaults, the config file named by `flags.config` and the flags.
    ///
    /// # Errors
    /// An unreadable or invalid file, or an out-of-range value.
    pub fn load(cli: &Flags) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let mut config = Config::default();
        config.config_file = cli.config.clone();
        if let Some(v) = file.listen {
            (config.listen, config.proxy_protocol[0]) =
                v.into_iter().map(ListenEntry::split).unzip();
        }
        if !cli.listen.is_empty() || !cli.proxy_listen.is_empty() {
            let plain = cli.listen.iter().map(|a| (*a, false));
            let proxied = cli.proxy_listen.iter().map(|a| (*a, true));
            (config.listen, config.proxy_protocol[0]) = plain.chain(proxied).unzip();
        }
        config.shards = cli.shards.or(file.shards);
        if let Some(list) = cli.cpus.as_deref().or(file.cpus.as_deref()) {
            config.cpus = Some(parse_cpu_list(list)?);
        }
        set(
            &mut config.max_connections,
            file.max_connections,
            cli.max_connections,
        );
        set(
            &mut config.max_packet_size,
            file.max_packet_size,
            cli.max_packet_size,
        );
        set(&mut config.backlog, file.backlog, None);
        if let Some(s) = file.connect_timeout_secs {
            config.connect_timeout = Duration::from_secs(s);
        }
        set(
            &mut config.max_inflight_messages,
            file.max_inflight_messages,
            None,
        );
        set(
            &mut config.max_queued_messages,
            file.max_queued_messages,
            None,
        );
        set(&mut config.max_queued_bytes, file.max_queued_bytes, None);
        set(&mut config.max_awaiting_rel, file.max_awaiting_rel, None);
        set(&mut config.acks_per_wake, file.acks_per_wake, None);
        set(&mut config.max_keepalive, file.max_keepalive, None);
        set(&mut config.max_topic_alias, file.max_topic_alias, None);
        config.response_information = file.response_information.filter(|s| !s.is_empty());
        set(
            &mut config.server_topic_aliases,
            file.server_topic_aliases,
            None,
        );
        if let Some(s) = file.sys_interval_secs {
            config.sys_interval = Duration::from_secs(s);
        }
        set(&mut config.mesh_capacity, file.mesh_capacity, None);
        set(
            &mut config.shared_subscription_strategy,
            file.shared_subscription_strategy,
            None,
        );
        set(&mut config.log_level, file.log_level, cli.log_level.clone());
        set(
            &mut config.max_connections_per_ip,
            file.max_connections_per_ip,
            cli.max_connections_per_ip,
        );
        set(
            &mut config.max_connection_rate,
            file.max_connection_rate,
            cli.max_connection_rate,
        );
        set(
            &mut config.connection_rate_burst,
            file.connection_rate_burst,
            None,
        );
        set(
            &mut config.max_connection_rate_per_ip,
            file.max_connection_rate_per_ip,
            cli.max_connection_rate_per_ip,
        );
        set(
            &mut config.connection_rate_per_ip_burst,
            file.connection_rate_per_ip_burst,
            None,
        );
        set(
            &mut config.limits_exempt_loopback,
            file.limits_exempt_loopback,
            None,
        );
        set(
            &mut config.max_subscriptions_per_client,
            file.max_subscriptions_per_client,
            None,
        );
        set(&mut config.max_topic_levels, file.max_topic_levels, None);
        set(&mut config.max_client_id_len, file.max_client_id_len, None);
        set(
            &mut config.max_queued_bytes_total,
            file.max_queued_bytes_total,
            None,
        );
        let [_, tls_proxy, ws_proxy, wss_proxy] = &mut config.proxy_protocol;
        for (slot, proxy, file, flag) in [
            (
                &mut config.tls_listen,
                tls_proxy,
                file.tls_listen,
                &cli.tls_listen,
            ),
            (
                &mut config.ws_listen,
                ws_proxy,
                file.ws_listen,
                &cli.ws_listen,
            ),
            (
                &mut config.wss_listen,
                wss_proxy,
                file.wss_listen,
                &cli.wss_listen,
            ),
        ] {
            if let Some(v) = file {
                (*slot, *proxy) = v.into_iter().map(ListenEntry::split).unzip();
            }
            if !flag.is_empty() {
                *slot = flag.clone();
                *proxy = vec![false; flag.len()];
            }
        }
        if let Some(s) = file.proxy_protocol_timeout_secs {
            config.proxy_protocol_timeout = Duration::from_secs(s);
        }
        config.certfile = cli.certfile.clone().or(file.certfile);
        config.keyfile = cli.keyfile.clone().or(file.keyfile);
        config.cafile = cli.cafile.clone().or(file.cafile);
        set(
            &mut config.require_certificate,
            file.require_certificate,
            None,
        );
        set(
            &mut config.use_identity_as_username,
            file.use_identity_as_username,
            None,
        );
        config.password_file = cli.password_file.clone().or(file.password_file);
        config.acl_file = cli.acl_file.clone().or(file.acl_file);
        config.allow_anonymous = cli.allow_anonymous.or(file.allow_anonymous);
        if let Some(v) = cli.http_listen.as_deref().or(file.http_listen.as_deref()) {
            config.http_listen = parse_http_listen(v)?;
        }
        config.http_auth_token = file.http_auth_token;
        config.http_basic_auth = match (file.http_basic_user, file.http_basic_password) {
            (None, None) => None,
            (Some(user), Some(password)) => Some((user, password)),
            _ => {
                return Err(ConfigError::Invalid {
                    key: "http_basic_user",
                    why: "http_basic_user and http_basic_password go together".to_string(),
                });
            }
        };
        set(&mut config.persistence, file.persistence, None);
        config.persistence_location = file.persistence_location;
        if let Some(dir) = &cli.persistence_dir {
            config.persistence = true;
            config.persistence_location = Some(dir.clone());
        }
        set(&mut config.persistence_sync, file.persistence_sync, None);
        set(
            &mut config.persistence_snapshot_log_bytes,
            file.persistence_snapshot_log_bytes,
            None,
        );
        if let Some(ms) = file.persistence_sync_interval_ms {
            config.persistence_sync_interval = Duration::from_millis(ms);
        }
        config.cluster = cluster::merge(file.cluster, &cli.cluster_nats, cli.node_name.as_deref())?;
        config.validate()?;
        Ok(config)
    }

    /// Whether clients without a user name may connect: the explicit
    /// setting, else [`DEFAULT_ALLOW_ANONYMOUS_WITHOUT_PASSWORD_FILE`] or
    /// [`DEFAULT_ALLOW_ANONYMOUS_WITH_PASSWORD_FILE`].
    pub fn allow_anonymous(&self) -> bool {
        self.allow_anonymous
            .unwrap_or(if self.password_file.is_some() {
                DEFAULT_ALLOW_ANONYMOUS_WITH_PASSWORD_FILE
            } else {
                DEFAULT_ALLOW_ANONYMOUS_WITHOUT_PASSWORD_FILE
            })
    }

    /// Re-reads only the log level from the config file (SIGHUP).
    ///
    /// # Errors
    /// An unreadable or invalid file.
    pub fn reload_log_level(path: &Path) -> Result<Option<String>, ConfigError> {
        Ok(read_file(path)?.log_level)
    }

    /// Checks ranges and consistency.
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, why: &str| {
            Err(ConfigError::Invalid {
                key,
                why: why.to_string(),
            })
        };
        if self.listen.is_empty() {
            return invalid("listen", "at least one listener is needed");
        }
        if self.shards == Some(0) {
            return invalid("shards", "must be at least 1");
        }
        if self.max_connections == 0 {
            return invalid("max_connections", "must be at least 1");
        }
        // Smallest useful packet: a CONNECT with a short client id.
        if self.max_packet_size < 64 || self.max_packet_size > 268_435_460 {
            return invalid("max_packet_size", "must be between 64 and 268435460 bytes");
        }
        if self.max_inflight_messages == 0 || self.max_inflight_messages > 65_535 {
            return invalid("max_inflight_messages", "must be between 1 and 65535");
        }
        if self.acks_per_wake == 0 || self.acks_per_wake > MAX_ACKS_PER_WAKE {
            return invalid("acks_per_wake", "must be between 1 and 1024");
        }
        if self.max_queued_messages == 0 || self.max_queued_bytes == 0 {
            return invalid("max_queued_messages", "queue limits must be at least 1");
        }
        if self.mesh_capacity == 0 {
            return invalid("mesh_capacity", "must be at least 1");
        }
        if self.proxy_protocol_timeout.is_zero() {
            return invalid("proxy_protocol_timeout_secs", "must be at least 1");
        }
        if self.max_connection_rate > 0 && self.connection_rate_burst == 0 {
            return invalid("connection_rate_burst", "must be at least 1");
        }
        if self.max_connection_rate_per_ip > 0 && self.connection_rate_per_ip_burst == 0 {
            return invalid("connection_rate_per_ip_burst", "must be at least 1");
        }
        // §3.1.3.1: the server MUST allow client ids of 1 to 23 bytes.
        if self.max_client_id_len < 23 || self.max_client_id_len > 65_535 {
            return invalid("max_client_id_len", "must be between 23 and 65535");
        }
        if self.http_auth_token.as_deref().is_some_and(str::is_empty) {
            return invalid("http_auth_token", "must not be empty");
        }
        if self
            .http_basic_auth
            .as_ref()
            .is_some_and(|(u, p)| u.is_empty() || u.contains(':') || p.is_empty())
        {
            return invalid(
                "http_basic_user",
                "user (without ':') and password must not be empty",
            );
        }
        if self.persistence && self.persistence_location.is_none() {
            return invalid(
                "persistence_location",
                "persistence = true needs a directory (persistence_location or --persistence-dir)",
            );
        }
        if self.persistence_snapshot_log_bytes == 0 {
            return invalid("persistence_snapshot_log_bytes", "must be at least 1");
        }
        if self.persistence_sync_interval.is_zero() {
            return invalid("persistence_sync_interval_ms", "must be at least 1");
        }
        if let Some(addr) = self.http_listen
            && !addr.ip().is_loopback()
            && self.http_auth_token.is_none()
            && self.http_basic_auth.is_none()
        {
            return Err(ConfigError::Invalid {
                key: "http_listen",
                why: format!(
                    "{addr} is not a loopback address: set http_auth_token or \
                     http_basic_user/http_basic_password, or bind 127.0.0.1"
                ),
            });
        }
        self.validate_tls()
    }

    /// Whether entry `index` of listen list `list` (an index into
    /// [`LISTEN_LISTS`]) expects a PROXY protocol header.
    pub fn expects_proxy_header(&self, list: usize, index: usize) -> bool {
        self.proxy_protocol
            .get(list)
            .and_then(|flags| flags.get(index))
            .copied()
            .unwrap_or(false)
    }

    /// True when a TLS or WSS listener is configured (certificates needed).
    pub fn uses_tls(&self) -> bool {
        !self.tls_listen.is_empty() || !self.wss_listen.is_empty()
    }

    /// Checks the TLS keys: certificates where a listener needs them, a CA
    /// where client certificates are required.
    fn validate_tls(&self) -> Result<(), ConfigError> {
        let invalid = |key, why: &str| {
            Err(ConfigError::Invalid {
                key,
                why: why.to_string(),
            })
        };
        if self.uses_tls() && (self.certfile.is_none() || self.keyfile.is_none()) {
            return invalid(
                "tls_listen",
                "a TLS or WSS listener needs certfile and keyfile",
            );
        }
        if self.require_certificate && self.cafile.is_none() {
            return invalid(
                "require_certificate",
                "needs cafile, the CA client certificates must chain to",
            );
        }
        if self.use_identity_as_username && !self.require_certificate {
            return invalid(
                "use_identity_as_username",
                "needs require_certificate = true (as in Mosquitto)",
            );
        }
        Ok(())
    }
}

/// Parses `http_listen`: an address, or `off` / empty to disable.
///
/// # Errors
/// Anything else.
pub fn parse_http_listen(value: &str) -> Result<Option<SocketAddr>, ConfigError> {
    let value = value.trim();
    if value.is_empty() || value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|_| ConfigError::Invalid {
        key: "http_listen",
        why: format!("{value:?} is not ADDR:PORT or off"),
    })
}

/// Overrides `slot` with the file's value, then with the flag's.
fn set<T>(slot: &mut T, file: Option<T>, flag: Option<T>) {
    if let Some(v) = flag.or(file) {
        *slot = v;
    }
}

/// Reads and parses a config file.
fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

/// Parses a CPU list as taskset and systemd write it: "0-3,6,8-9".
///
/// # Errors
/// Anything else, or an empty list.
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>, ConfigError> {
    let bad = || ConfigError::Invalid {
        key: "cpus",
        why: format!("{list:?} is not a CPU list like 0-3,6"),
    };
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: usize = a.trim().parse().map_err(|_| bad())?;
                let b: usize = b.trim().parse().map_err(|_| bad())?;
                if a > b || b - a > 4096 {
                    return Err(bad());
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().map_err(|_| bad())?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.is_empty() {
        return Err(bad());
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,6").unwrap(), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse_cpu_list("2, 1,2").unwrap(), vec![1, 2]);
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("a").is_err());
    }

    #[test]
    fn defaults_without_file_or_flags() {
        let c = Config::load(&Flags::default()).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.listen[0].port(), 1883);
    }

    #[test]
    fn flags_override_the_file() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "listen = [\"127.0.0.1:1999\"]\nmax_connections = 10\nmax_packet_size = 4096\nmax_queued_messages = 7"
        )
        .unwrap();
        let cli = Flags {
            config: Some(f.path().to_path_buf()),
            max_connections: Some(20),
            ..Flags::default()
        };
        let c = Config::load(&cli).unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:1999".parse().unwrap()]);
        assert_eq!(c.max_connections, 20);
        assert_eq!(c.max_packet_size, 4096);
        assert_eq!(c.max_queued_messages, 7);
    }

    #[test]
    fn shared_subscription_strategy_takes_emqx_names() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "shared_subscription_strategy = \"hash_clientid\"").unwrap();
        let cli = Flags {
            config: Some(f.path().to_path_buf()),
            ..Flags::default()
        };
        let c = Config::load(&cli).unwrap();
        assert_eq!(c.shared_subscription_strategy, SharedStrategy::HashClientid);
        assert_eq!(
            Config::default().shared_subscription_strategy,
            SharedStrategy::RoundRobin
        );
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "shared_subscription_strategy = \"sticky\"").unwrap();
        let cli = Flags {
            config: Some(f.path().to_path_buf()),
            ..Flags::default()
        };
        assert!(matches!(Config::load(&cli), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "no_such_key = 1").unwrap();
        let cli = Flags {
            config: Some(f.path().to_path_buf()),
            ..Flags::default()
        };
        assert!(matches!(Config::load(&cli), Err(ConfigError::Parse { .. })));
        let cli = Flags {
            shards: Some(0),
            ..Flags::default()
        };
        assert!(matches!(
            Config::load(&cli),
            Err(ConfigError::Invalid { .. })
        ));
    }

    #[test]
    fn acks_per_wake_defaults_to_64_and_takes_1_to_1024() {
        let load = |toml: &str| {
            let mut f = tempfile::NamedTempFile::new().unwrap();
            writeln!(f, "{toml}").unwrap();
            Config::load(&Flags {
                config: Some(f.path().to_path_buf()),
                ..Flags::default()
            })
        };
        assert_eq!(load("").unwrap().acks_per_wake, DEFAULT_ACKS_PER_WAKE);
        assert_eq!(load("acks_per_wake = 1").unwrap().acks_per_wake, 1);
        assert_eq!(load("acks_per_wake = 1024").unwrap().acks_per_wake, 1024);
        for bad in ["acks_per_wake = 0", "acks_per_wake = 1025"] {
            assert!(
                matches!(load(bad), Err(ConfigError::Invalid { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            load("acks_per_wake = -1"),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn persistence_keys_flag_and_checks() {
        let load = |toml: &str, flag: Option<&str>| {
            let mut f = tempfile::NamedTempFile::new().unwrap();
            writeln!(f, "{toml}").unwrap();
            Config::load(&Flags {
                config: Some(f.path().to_path_buf()),
                persistence_dir: flag.map(PathBuf::from),
                ..Flags::default()
            })
        };
        let off = load("", None).unwrap();
        assert!(!off.persistence);
        assert_eq!(off.persistence_sync, SyncMode::Ack);
        assert_eq!(off.persistence_sync_interval, Duration::from_millis(1000));
        assert_eq!(
            off.persistence_snapshot_log_bytes,
            DEFAULT_PERSISTENCE_SNAPSHOT_LOG_BYTES
        );
        let on = load(
            "persistence = true\npersistence_location = \"/x\"\npersistence_sync = \"interval\"\npersistence_sync_interval_ms = 250\npersistence_snapshot_log_bytes = 4096",
            None,
        )
        .unwrap();
        assert!(on.persistence);
        assert_eq!(on.persistence_location, Some(PathBuf::from("/x")));
        assert_eq!(on.persistence_sync, SyncMode::Interval);
        assert_eq!(on.persistence_sync_interval, Duration::from_millis(250));
        assert_eq!(on.persistence_snapshot_log_bytes, 4096);
        let flag = load("persistence_location = \"/x\"", Some("/y")).unwrap();
        assert!(flag.persistence, "--persistence-dir turns it on");
        assert_eq!(flag.persistence_location, Some(PathBuf::from("/y")));
        for bad in [
            "persistence = true",
            "persistence_sync_interval_ms = 0",
            "persistence_snapshot_log_bytes = 0",
        ] {
            assert!(
                matches!(load(bad, None), Err(ConfigError::Invalid { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            load("persistence_sync = \"never\"", None),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn http_listen_off_default_and_auth_rules() {
        assert_eq!(parse_http_listen("off").unwrap(), None);
        assert_eq!(parse_http_listen("").unwrap(), None);
        assert!(parse_http_listen("nope").is_err());
        let c = Config::load(&Flags::default()).unwrap();
        assert_eq!(c.http_listen.unwrap().port(), 18083);
        let open = Flags {
            http_listen: Some("0.0.0.0:0".into()),
            ..Flags::default()
        };
        assert!(matches!(
            Config::load(&open),
            Err(ConfigError::Invalid {
                key: "http_listen",
                ..
            })
        ));
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "http_auth_token = \"s3cret\"").unwrap();
        let with_token = Flags {
            config: Some(f.path().to_path_buf()),
            ..open.clone()
        };
        let c = Config::load(&with_token).unwrap();
        assert_eq!(c.http_auth_token.as_deref(), Some("s3cret"));
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "http_basic_user = \"admin\"").unwrap();
        let half = Flags {
            config: Some(f.path().to_path_buf()),
            ..Flags::default()
        };
        assert!(Config::load(&half).is_err());
    }

    #[test]
    fn tls_keys_are_checked() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "tls_listen = [\"127.0.0.1:0\"]").unwrap();
        let cli = Flags {
            config: Some(f.path().to_path_buf()),
            ..Flags::default()
        };
        assert!(matches!(
            Config::load(&cli),
            Err(ConfigError::Invalid {
                key: "tls_listen",
                ..
            })
        ));
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "certfile = \"c.pem\"\nkeyfile = \"k.pem\"\nrequire_certificate = true\nws_listen = [\"127.0.0.1:8083\"]"
        )
        .unwrap();
        let cli = Flags {
            config: Some(f.path().to_path_buf()),
            wss_listen: vec!["127.0.0.1:0".parse().unwrap()],
            ..Flags::default()
        };
        assert!(matches!(
            Config::load(&cli),
            Err(ConfigError::Invalid {
                key: "require_certificate",
                ..
            })
        ));
        let cli = Flags {
            cafile: Some("ca.pem".into()),
            ..cli
        };
        let c = Config::load(&cli).unwrap();
        assert_eq!(c.ws_listen, vec!["127.0.0.1:8083".parse().unwrap()]);
        assert_eq!(c.wss_listen, vec!["127.0.0.1:0".parse().unwrap()]);
        assert!(c.require_certificate && c.uses_tls());
    }

    #[test]
    fn hostile_client_limits_load_and_are_checked() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "max_connections_per_ip = 3\nmax_connection_rate = 0\nlimits_exempt_loopback = false\n\
             max_subscriptions_per_client = 7\nmax_topic_levels = 4\nmax_client_id_len = 30\n\
             max_queued_bytes_total = 1048576"
        )
        .unwrap();
        let cli = Flags {
            config: Some(f.path().to_path_buf()),
            max_connection_rate: Some(5),
            ..Flags::default()
        };
        let c = Config::load(&cli).unwrap();
        assert_eq!(c.max_connections_per_ip, 3);
        assert_eq!(c.max_connection_rate, 5, "the flag wins");
        assert_eq!(c.connection_rate_burst, DEFAULT_CONNECTION_RATE_BURST);
        assert!(!c.limits_exempt_loopback);
        assert_eq!(c.max_subscriptions_per_client, 7);
        assert_eq!(c.max_topic_levels, 4);
        assert_eq!(c.max_client_id_len, 30);
        assert_eq!(c.max_queued_bytes_total, 1 << 20);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "max_client_id_len = 22").unwrap();
        let cli = Flags {
            config: Some(f.path().to_path_buf()),
            ..Flags::default()
        };
        assert!(
            matches!(Config::load(&cli), Err(ConfigError::Invalid { key, .. }) if key == "max_client_id_len"),
            "MQTT requires 23-byte client ids to be allowed"
        );
    }

    #[test]
    fn listeners_may_expect_a_proxy_protocol_header() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "listen = [\"127.0.0.1:1883\", {{ address = \"127.0.0.1:1884\", proxy_protocol = true }}]\n\
             ws_listen = [{{ address = \"127.0.0.1:8083\" }}]\n\
             proxy_protocol_timeout_secs = 5"
        )
        .unwrap();
        let file = Flags {
            config: Some(f.path().to_path_buf()),
            ..Flags::default()
        };
        let c = Config::load(&file).unwrap();
        assert_eq!(c.listen.len(), 2);
        assert!(!c.expects_proxy_header(0, 0));
        assert!(c.expects_proxy_header(0, 1));
        assert_eq!(c.ws_listen, vec!["127.0.0.1:8083".parse().unwrap()]);
        assert!(!c.expects_proxy_header(2, 0));
        assert!(!c.expects_proxy_header(1, 0), "no TLS listener");
        assert_eq!(c.proxy_protocol_timeout, Duration::from_secs(5));
        // The flags replace the file's plain listeners: --listen ones first.
        let flags = Flags {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            proxy_listen: vec!["127.0.0.1:0".parse().unwrap()],
            ..file
        };
        let c = Config::load(&flags).unwrap();
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.proxy_protocol[0], vec![false, true]);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "listen = [{{ address = \"127.0.0.1:1884\", proxy = true }}]"
        )
        .unwrap();
        let typo = Flags {
            config: Some(f.path().to_path_buf()),
            ..Flags::default()
        };
        assert!(matches!(
            Config::load(&typo),
            Err(ConfigError::Parse { .. })
        ));
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "proxy_protocol_timeout_secs = 0").unwrap();
        let zero = Flags {
            config: Some(f.path().to_path_buf()),
            ..Flags::default()
        };
        assert!(matches!(
            Config::load(&zero),
            Err(ConfigError::Invalid {
                key: "proxy_protocol_timeout_secs",
                ..
            })
        ));
    }

    #[test]
    fn the_sample_config_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fanmq.toml");
        let cli = Flags {
            config: Some(path),
            ..Flags::default()
        };
        let c = Config::load(&cli).unwrap();
        assert_eq!(c.max_queued_messages, DEFAULT_MAX_QUEUED_MESSAGES);
        // The packaged config keeps state in the unit's StateDirectory.
        assert!(c.persistence);
        assert_eq!(
            c.persistence_location.as_deref(),
            Some(Path::new("/var/lib/fanmq"))
        );
    }

    /// The connection limits' defaults are what README's "Security" table
    /// and the sample fanmq.toml say.
    #[test]
    fn the_connection_limit_defaults_are_what_the_readme_says() {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
                .unwrap();
        let row = |key: &str| {
            readme
                .lines()
                .find(|l| l.starts_with("| ") && l.contains(&format!("| `{key}`")))
                .unwrap_or_else(|| panic!("no README row for {key}"))
                .split(" | ")
                .nth(2)
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            row("max_connections_per_ip"),
            DEFAULT_MAX_CONNECTIONS_PER_IP.to_string()
        );
        assert_eq!(
            row("max_connection_rate_per_ip"),
            format!(
                "{DEFAULT_MAX_CONNECTION_RATE_PER_IP}/s, burst {DEFAULT_CONNECTION_RATE_PER_IP_BURST}"
            )
        );
        assert_eq!(
            row("max_connection_rate"),
            format!("{DEFAULT_MAX_CONNECTION_RATE}/s, burst {DEFAULT_CONNECTION_RATE_BURST}")
        );
        // And the sample config states the same values.
        let sample = Config::load(&Flags {
            config: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("fanmq.toml")),
            ..Flags::default()
        })
        .unwrap();
        let defaults = Config::default();
        assert_eq!(
            sample.max_connections_per_ip,
            defaults.max_connections_per_ip
        );
        assert_eq!(
            (
                sample.max_connection_rate_per_ip,
                sample.connection_rate_per_ip_burst
            ),
            (
                defaults.max_connection_rate_per_ip,
                defaults.connection_rate_per_ip_burst
            )
        );
        assert_eq!(
            (sample.max_connection_rate, sample.connection_rate_burst),
            (defaults.max_connection_rate, defaults.connection_rate_burst)
        );
        // One restart brings max_connections clients back within 30 s.
        let seconds = (defaults.max_connections as u64)
            .saturating_sub(u64::from(defaults.connection_rate_burst))
            / u64::from(defaults.max_connection_rate);
        assert!(seconds <= 30, "{seconds} s to reconnect max_connections");
    }

    #[test]
    fn the_container_image_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("container/fanmq.toml");
        let cli = Flags {
            config: Some(path),
            ..Flags::default()
        };
        let c = Config::load(&cli).unwrap();
        assert_eq!(c.listen, vec!["0.0.0.0:1883".parse().unwrap()]);
        assert_eq!(c.ws_listen, vec!["0.0.0.0:8083".parse().unwrap()]);
    }
}
