//! Command line: one subcommand per scenario, shared options in [`Opts`].

use clap::{Args, Parser, Subcommand};

/// fanmq's fan-out benchmark and load generator.
///
/// Every scenario is bounded (connection count and time limit) and talks to
/// loopback unless `--host` names another broker explicitly.
#[derive(Debug, Parser)]
#[command(name = "fanmq-bench", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// The scenarios and tools.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// N subscribers, one publisher: deliveries/s, latency, loss, broker CPU.
    Fanout(Opts),
    /// Open N connections (TCP + CONNECT + SUBSCRIBE) as fast as accepted.
    Connect(Opts),
    /// Hold N idle subscribers: broker RSS and kernel memory per connection.
    Idle(Opts),
    /// Drop all N subscribers at once and reconnect them.
    Storm(Opts),
    /// Issue 3's latency target: find the highest message rate R_max the
    /// broker sustains to N subscribers (open-loop steps: doubling, then
    /// bisecting; sustained = nothing lost and the publish→last-subscriber
    /// lag does not grow), then publish at R_max / 2 for --duration seconds
    /// and report p50/p99/p999/max publish→subscriber against the bound
    /// 1.2 × N ÷ (R_max × N), the backlog growth, broker and generator CPU.
    Latency(Opts),
    /// The same fan-out through the bench's own plain TCP forwarder: the
    /// ceiling. Runs paced (`--rate`) or burst.
    Raw(Opts),
    /// Regenerate bench/RESULTS.md and bench/plots/*.svg from results JSON.
    Report(ReportOpts),
    /// Internal: a worker process (commands on stdin, events on stdout).
    #[command(hide = true)]
    Worker,
    /// Internal: the raw forwarder process.
    #[command(hide = true)]
    RawServer {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
}

/// Options shared by the scenarios.
#[derive(Debug, Clone, Args)]
pub struct Opts {
    /// Subscribers (connections) to open.
    #[arg(long, default_value_t = 100)]
    pub subs: u64,
    /// Broker host. Without it the target is 127.0.0.1: the bench sends
    /// nothing off this host unless told to explicitly.
    #[arg(long)]
    pub host: Option<String>,
    /// Broker port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Topic the publisher publishes to.
    #[arg(long, default_value = "bench/fanout")]
    pub topic: String,
    /// Filter subscribers subscribe with (e.g. `bench/+`, `#`); default: the
    /// topic itself. Must match the topic.
    #[arg(long)]
    pub filter: Option<String>,
    /// QoS of the publishes and the subscriptions.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Payload bytes (≥ 16: send timestamp and sequence number).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(16..=1_048_576))]
    pub payload: u64,
    /// Messages per second (open loop, one send per message); without it the
    /// publisher sends as fast as TCP takes it (burst). Latency: not used
    /// (the search sets the rate; see --start-rate, --max-rate).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Messages to publish. Latency: not used (rate × duration).
    #[arg(long, default_value_t = 200)]
    pub msgs: u64,
    /// Hard time limit in seconds for the measured phase (publishing and
    /// draining, holding idle, reconnecting). Latency: how long the run at
    /// R_max / 2 publishes.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Latency: seconds each step of the rate search publishes.
    #[arg(long, default_value_t = 5.0)]
    pub step_duration: f64,
    /// Latency: the first rate the search tries (msg/s); it doubles from
    /// there while sustained, halves while not.
    #[arg(long, default_value_t = 100.0)]
    pub start_rate: f64,
    /// Latency: most steps of the rate search.
    #[arg(long, default_value_t = 16)]
    pub max_steps: u32,
    /// Latency: stop bisecting when the lowest failed rate is within this
    /// fraction above the highest sustained one.
    #[arg(long, default_value_t = 0.1)]
    pub precision: f64,
    /// Latency: skip the search and take this as R_max (msg/s), e.g. to
    /// measure every broker at half of the same rate.
    #[arg(long)]
    pub max_rate: Option<f64>,
    /// After the last publish, stop when nothing arrived for this long (s).
    #[arg(long, default_value_t = 5.0)]
    pub drain_timeout: f64,
    /// Time limit in seconds for opening all connections.
    #[arg(long, default_value_t = 120.0)]
    pub connect_timeout: f64,
    /// Idle: seconds to hold the connections.
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
    /// MQTT keep-alive (s); a PINGREQ goes out after half of it.
    #[arg(long, default_value_t = 60)]
    pub keep_alive: u16,
    /// Broker process to measure (CPU from /proc/PID/stat, RSS).
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Label of the broker in results (default: its address).
    #[arg(long)]
    pub label: Option<String>,
    /// Worker processes (default: enough for the open-file limit).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Most connections per worker process (also capped by RLIMIT_NOFILE).
    #[arg(long, default_value_t = 15_000)]
    pub conns_per_worker: u64,
    /// Connections per source address 127.0.0.x (loopback targets only).
    #[arg(long, default_value_t = 20_000)]
    pub conns_per_addr: u64,
    /// Handshakes in flight at once, over all workers. Keep it below the
    /// broker's listen backlog (Mosquitto listens with 100): an overflowing
    /// accept queue turns into 1 s SYN retransmits, which would measure the
    /// kernel's retry timer, not the broker.
    #[arg(long, default_value_t = 64)]
    pub max_pending: usize,
    /// A handshake slower than this (ms) counts as failed.
    #[arg(long, default_value_t = 30_000)]
    pub handshake_timeout_ms: u64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub out: Option<String>,
    /// Start each broker command and run the same scenario against each,
    /// alternating (A B A B ...). `{port}` is replaced by a free port. Named
    /// peers: `mosquitto`, `rumqttd`, `fanmq` (binary from $FANMQ_BIN or
    /// PATH; 1 shard), `fanmq:N` (N shards), `raw` (the bench's own forwarder).
    #[arg(long, num_args = 1..)]
    pub compare: Vec<String>,
    /// Rounds of the comparison.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// CPUs for the brokers started by --compare (e.g. `0`).
    #[arg(long)]
    pub broker_cpus: Option<String>,
    /// CPUs for the load generator (e.g. `1`).
    #[arg(long)]
    pub client_cpus: Option<String>,
    /// Also write SVG plots next to --out (latency CDF, deliveries/s).
    #[arg(long)]
    pub plots: bool,
}

/// Options of `report`.
#[derive(Debug, Clone, Args)]
pub struct ReportOpts {
    /// Folder of results JSON files.
    #[arg(long, default_value = "bench/results")]
    pub results: String,
    /// Markdown file to write.
    #[arg(long, default_value = "bench/RESULTS.md")]
    pub markdown: String,
    /// Folder for the SVG plots.
    #[arg(long, default_value = "bench/plots")]
    pub plots: String,
}
