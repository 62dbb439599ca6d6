//! Command line: one subcommand per scenario, shared options in [`Opts`].

use clap::{Args, Parser, Subcommand};

use crate::mqtt::Protocol;
use crate::protocol::Transport;

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
    /// Open all N sockets at once, each sending CONNECT, then SUBSCRIBE once
    /// its CONNACK arrived (as MQTT.js does): time until all are subscribed
    /// and the broker's peak RSS growth per connection; then drop them all
    /// at once and reconnect them the same way.
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
    /// Merge the results of a run split over load hosts (`--part K/N`,
    /// one JSON per part) into one run: the same table, JSON and plots as a
    /// single-host run, histograms merged (not averaged).
    Merge(MergeOpts),
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
    /// Broker host, or several addresses of it, comma-separated. Without it
    /// the target is 127.0.0.1: the bench sends nothing off this host unless
    /// told to explicitly.
    #[arg(long)]
    pub host: Option<String>,
    /// Broker port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// The nodes of a fanmq cluster (or any set of brokers that route to
    /// each other), as `HOST:PORT`, comma-separated, instead of --host and
    /// --port: subscribers are spread over them round-robin and the
    /// publisher connects to the first. Give every node's process with
    /// --broker-pid to measure the cluster's CPU, and every node's stats
    /// URL with --stats-url for --wait-subscribers.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["host", "ports"])]
    pub nodes: Vec<String>,
    /// With --nodes: the node (`HOST:PORT`) the publisher connects to
    /// instead of the first of --nodes. It gets no subscribers unless it is
    /// also in --nodes, so every delivery crosses from it to another node
    /// (the cost of messages that arrive from the cluster).
    #[arg(long, requires = "nodes")]
    pub publish_node: Option<String>,
    /// Several broker listener ports, comma-separated (e.g. `1883,1884`),
    /// instead of `--port`: subscribers are spread over every (source
    /// address, broker address:port) pair, and each pair has its own range
    /// of ephemeral ports. The publisher uses the first.
    #[arg(long, value_delimiter = ',')]
    pub ports: Vec<u16>,
    /// Source addresses to connect the subscribers from, configured on this
    /// host's interfaces, comma-separated: addresses, ranges
    /// (`10.0.0.10-10.0.0.29`) or CIDR blocks (`10.0.1.0/28`, every address
    /// of it). Default: 127.0.0.x for a loopback broker, else the kernel's
    /// choice (one address: one range of ephemeral ports per broker port).
    #[arg(long, value_delimiter = ',')]
    pub source_addrs: Vec<String>,
    /// This load host's share when several run the same command: part K of
    /// N (`--part 2/5`) opens subscribers K of N of --subs (client ids stay
    /// unique). Part 1 also publishes; the others only subscribe and expect
    /// --msgs messages. Payloads are stamped with the wall clock (hosts in
    /// step by NTP). Fan-out only; `merge` combines the parts' --out files.
    #[arg(long, value_parser = parse_part)]
    pub part: Option<Part>,
    /// Wall-clock time to start publishing, as Unix seconds or
    /// `2026-12-01T23:00:00Z` (UTC): every part subscribes, then part 1
    /// waits for it. Parts 2..N end at most --duration after it.
    #[arg(long, value_parser = parse_start_at)]
    pub start_at: Option<f64>,
    /// Before publishing, poll the broker's `/api/v1/stats` (fanmq) until
    /// it holds this many subscriptions, for at most --connect-timeout
    /// seconds: part 1 then starts when every part is subscribed.
    #[arg(long)]
    pub wait_subscribers: Option<u64>,
    /// The stats URL for --wait-subscribers (plain HTTP). Default:
    /// `http://HOST:18083/api/v1/stats` (the broker's --http-listen).
    /// Several, comma-separated (one per node of a cluster, `--nodes`): the
    /// subscriptions they report are added up.
    #[arg(long, value_delimiter = ',')]
    pub stats_url: Vec<String>,
    /// Bearer token for --stats-url, when the admin API asks for one.
    #[arg(long)]
    pub stats_token: Option<String>,
    /// Topic the publisher publishes to.
    #[arg(long, default_value = "bench/fanout")]
    pub topic: String,
    /// Filter subscribers subscribe with (e.g. `bench/+`, `#`); default: the
    /// topic itself. Must match the topic.
    #[arg(long)]
    pub filter: Option<String>,
    /// Fan-out: subscribers join the shared subscription group NAME
    /// (`$share/NAME/<filter>`), so each message is delivered once over all
    /// of them, not once per subscriber: the expected deliveries are the
    /// messages, and loss is messages less deliveries.
    #[arg(long, value_name = "NAME")]
    pub shared_group: Option<String>,
    /// MQTT version of the subscribers: `4` (3.1.1), `5`, or `mixed` (half
    /// of them each, alternating).
    #[arg(long, value_enum, default_value_t = Protocol::V311)]
    pub protocol: Protocol,
    /// MQTT version of the publisher: `4` (3.1.1) or `5`.
    #[arg(long, value_enum, default_value_t = Protocol::V311)]
    pub publisher_protocol: Protocol,
    /// Topic Alias Maximum in the MQTT 5.0 subscribers' CONNECT: the
    /// aliases the broker may use towards each (0: none, the property left
    /// out). With it, a broker that assigns aliases sends a repeated topic
    /// as a 3-byte alias; `bytes_per_delivery` in the results shows it.
    #[arg(long, default_value_t = 0)]
    pub topic_alias_max: u16,
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
    /// Idle: seconds to wait after the last subscription before the
    /// measured hold begins, so that work a broker does once per new
    /// connection shortly after it (fanmq parks its connections within
    /// 1.5 s) is not counted as idle CPU. 0: the hold starts at once.
    #[arg(long, default_value_t = 0.0)]
    pub settle: f64,
    /// MQTT keep-alive (s); a PINGREQ goes out after half of it.
    #[arg(long, default_value_t = 60)]
    pub keep_alive: u16,
    /// CleanSession flag of the subscribers' CONNECT: `--clean-session
    /// false` makes their sessions persistent (MQTT 3.1.1 §3.1.2.4), so a
    /// broker with persistence on journals their subscriptions and QoS 1/2
    /// queues. 3.1.1 subscribers only: an MQTT 5.0 one sends no Session
    /// Expiry Interval, so its session still ends with the connection.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub clean_session: bool,
    /// Broker process to measure (CPU from /proc/PID/stat, RSS). Several,
    /// comma-separated (every node of a cluster, `--nodes`): their CPU and
    /// RSS are added up.
    #[arg(long, value_delimiter = ',')]
    pub broker_pid: Vec<u32>,
    /// Label of the broker in results (default: its address).
    #[arg(long)]
    pub label: Option<String>,
    /// Worker processes (default: enough for the open-file limit).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Most connections per worker process (also capped by RLIMIT_NOFILE).
    #[arg(long, default_value_t = 15_000)]
    pub conns_per_worker: u64,
    /// Connections per source address 127.0.0.x (loopback targets without
    /// --source-addrs): sets how many 127.0.0.x addresses are used.
    #[arg(long, default_value_t = 20_000)]
    pub conns_per_addr: u64,
    /// Handshakes (TCP connect to SUBACK) in flight at once, over all
    /// workers: 200 by default, as a fleet of devices reconnecting does.
    /// `1` opens one connection at a time (sequential). Connections not yet
    /// accepted wait in the broker's listen backlog (Mosquitto listens with
    /// 100): one that overflows it turns into a 1 s SYN retransmit, which
    /// the connect latency then shows. The `storm` ignores it: it opens
    /// every socket at once.
    #[arg(long, visible_alias = "max-pending", default_value_t = 200)]
    pub connect_in_flight: usize,
    /// How a subscriber opens its session: `pipelined` writes CONNECT and
    /// SUBSCRIBE together without waiting for CONNACK (as many clients
    /// do); `sequential` sends SUBSCRIBE once CONNACK arrived (as MQTT.js
    /// does; what the `storm` always does).
    #[arg(long, value_enum, default_value_t = Handshake::Pipelined)]
    pub handshake: Handshake,
    /// What carries the subscribers' MQTT: `tcp`, `ws` (MQTT over
    /// WebSocket, path `/mqtt`, subprotocol `mqtt`, each packet one binary
    /// frame, as MQTT.js in a browser) or `wss` (the same over TLS). The
    /// publisher always uses plain TCP. With --compare, fanmq and FlashMQ
    /// get a WebSocket listener on a second free port (for `wss` with a
    /// self-signed certificate made for the run); otherwise give it with
    /// --ws-port (and --ca-file for `wss`).
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    pub transport: Transport,
    /// The broker's WebSocket port for `--transport ws` or `wss` without
    /// --compare (the publisher still connects to --port).
    #[arg(long)]
    pub ws_port: Option<u16>,
    /// PEM file with the certificates the broker's must chain to, for
    /// `--transport wss` without --compare; the certificate must be valid
    /// for the first --host (default 127.0.0.1).
    #[arg(long)]
    pub ca_file: Option<String>,
    /// Write the acknowledgements (PUBACK, PUBREC, PUBCOMP) of one read in
    /// one write. Default: each its own write, as paho, MQTT.js and
    /// mosquitto_sub do; coalescing is kinder to the broker than real
    /// clients are (fewer, larger reads).
    #[arg(long)]
    pub coalesce_acks: bool,
    /// A handshake slower than this (ms) counts as failed.
    #[arg(long, default_value_t = 30_000)]
    pub handshake_timeout_ms: u64,
    /// Try a failed handshake (refused, closed by the broker before SUBACK,
    /// timed out) again after this many ms, as clients reconnect (MQTT.js
    /// waits 1000 ms), until --handshake-timeout-ms after the phase began;
    /// 0: a failure is final.
    /// Default: 1000 for the `storm` (a broker's connection-rate limits
    /// refuse part of it, and real clients come back), 0 otherwise.
    #[arg(long)]
    pub reconnect_ms: Option<u64>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub out: Option<String>,
    /// Start each broker command and run the same scenario against each,
    /// alternating (A B A B ...). `{port}` is replaced by a free port. Named
    /// peers: `mosquitto`, `rumqttd`, `fanmq` (binary from $FANMQ_BIN or
    /// PATH; 1 shard), `fanmq:N` (N shards), `raw` (the bench's own forwarder).
    /// Any other is a shell command, labelled `LABEL=command` if wanted.
    #[arg(long, num_args = 1..)]
    pub compare: Vec<String>,
    /// An option for the brokers --compare starts, `PEER:KEY=VALUE`
    /// (repeatable): PEER is `fanmq` (for every `fanmq:N` too), `flashmq`
    /// (every `flashmq:N`) or `mosquitto`, KEY and VALUE in that broker's
    /// own configuration syntax: for fanmq a key of its TOML file
    /// (`fanmq:max_queued_messages=20000`; a string value in quotes), for
    /// FlashMQ and Mosquitto a line `KEY VALUE` of their config file
    /// (`flashmq:max_qos_msg_pending_messages=20000`). It is written into
    /// the generated config after the bench's own lines (Mosquitto and
    /// FlashMQ take the last value of a key; fanmq's flags, such as its
    /// listeners and `--shards`, win over its file).
    #[arg(long = "broker-option", value_name = "PEER:KEY=VALUE")]
    pub broker_options: Vec<String>,
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

/// How a subscriber's CONNECT and SUBSCRIBE go out (`--handshake`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Handshake {
    /// CONNECT and SUBSCRIBE in one write, before CONNACK.
    Pipelined,
    /// SUBSCRIBE after CONNACK.
    Sequential,
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

/// Options of `merge`.
#[derive(Debug, Clone, Args)]
pub struct MergeOpts {
    /// The parts' results files (`--out` of each `--part K/N` run).
    #[arg(required = true)]
    pub parts: Vec<String>,
    /// Write the merged results as JSON to this file.
    #[arg(long)]
    pub out: Option<String>,
    /// Also write SVG plots next to --out (latency CDF, deliveries/s).
    #[arg(long)]
    pub plots: bool,
}

/// Part K of N of a run split over load hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Part {
    /// K: which part this is, 1-based.
    pub index: u64,
    /// N: how many parts the run has.
    pub of: u64,
}

impl Part {
    /// The global indices `[first, end)` of this part's share of `subs`
    /// subscribers: shares differ by at most one.
    pub fn share(self, subs: u64) -> (u64, u64) {
        let at = |k: u64| (u128::from(subs) * u128::from(k) / u128::from(self.of)) as u64;
        (at(self.index - 1), at(self.index))
    }

    /// Part 1 publishes; the others only subscribe.
    pub fn publishes(self) -> bool {
        self.index == 1
    }
}

/// Parses `K/N` with 1 ≤ K ≤ N.
///
/// # Errors
/// Not two numbers, or K outside 1..=N.
pub fn parse_part(s: &str) -> Result<Part, String> {
    let bad = || format!("{s:?}: expected K/N with 1 <= K <= N, e.g. 2/5");
    let (k, n) = s.split_once('/').ok_or_else(bad)?;
    let (index, of) = (
        k.trim().parse::<u64>().map_err(|_| bad())?,
        n.trim().parse::<u64>().map_err(|_| bad())?,
    );
    if index == 0 || index > of {
        return Err(bad());
    }
    Ok(Part { index, of })
}

/// Parses a wall-clock time: Unix seconds (`1764630000`, fractions
/// allowed) or UTC `YYYY-MM-DDTHH:MM:SS[.frac]Z`; returns Unix seconds.
///
/// # Errors
/// Neither form.
pub fn parse_start_at(s: &str) -> Result<f64, String> {
    if let Ok(secs) = s.parse::<f64>() {
        return if secs.is_finite() && secs > 0.0 {
            Ok(secs)
        } else {
            Err(format!("{s:?}: not a time"))
        };
    }
    let bad = || format!("{s:?}: expected Unix seconds or YYYY-MM-DDTHH:MM:SSZ (UTC)");
    let t = s.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = t.split_once('T').ok_or_else(bad)?;
    let num = |v: &str| v.parse::<i64>().map_err(|_| bad());
    let d: Vec<&str> = date.split('-').collect();
    let h: Vec<&str> = time.split(':').collect();
    let ([y, mo, da], [hh, mi, ss]) = (d.as_slice(), h.as_slice()) else {
        return Err(bad());
    };
    let (y, mo, da) = (num(y)?, num(mo)?, num(da)?);
    let (hh, mi) = (num(hh)?, num(mi)?);
    let ss: f64 = ss.parse().map_err(|_| bad())?;
    if !(1..=12).contains(&mo)
        || !(1..=31).contains(&da)
        || hh > 23
        || mi > 59
        || !(0.0..61.0).contains(&ss)
    {
        return Err(bad());
    }
    let days = days_from_civil(y, mo, da);
    Ok((days * 86_400 + hh * 3600 + mi * 60) as f64 + ss)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_share_every_subscriber_once() {
        let parts: Vec<(u64, u64)> = (1..=3)
            .map(|k| parse_part(&format!("{k}/3")).unwrap().share(10))
            .collect();
        assert_eq!(parts, vec![(0, 3), (3, 6), (6, 10)]);
        assert!(parse_part("1/3").unwrap().publishes());
        assert!(!parse_part("2/3").unwrap().publishes());
        for bad in ["0/2", "3/2", "2", "a/b", "1/0"] {
            assert!(parse_part(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_publish_node_needs_nodes() {
        let parse =
            |args: &[&str]| Cli::try_parse_from(["fanmq-bench", "fanout"].iter().chain(args));
        let Ok(Cli {
            cmd: Cmd::Fanout(o),
            ..
        }) = parse(&[
            "--nodes",
            "127.0.0.1:2,127.0.0.1:3",
            "--publish-node",
            "127.0.0.1:1",
        ])
        else {
            panic!("--publish-node with --nodes is refused");
        };
        assert_eq!(o.publish_node.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(o.nodes, ["127.0.0.1:2", "127.0.0.1:3"]);
        assert!(parse(&["--publish-node", "127.0.0.1:1"]).is_err());
    }

    #[test]
    fn start_at_as_unix_seconds_or_utc() {
        assert_eq!(parse_start_at("1764630000"), Ok(1_764_630_000.0));
        assert_eq!(parse_start_at("1970-01-01T00:00:00Z"), Ok(0.0));
        // `date -u -d 2026-12-01T23:00:00Z +%s`
        assert_eq!(parse_start_at("2026-12-01T23:00:00Z"), Ok(1_796_166_000.0));
        assert_eq!(
            parse_start_at("2024-02-29T12:30:15.5Z"),
            Ok(1_709_209_815.5)
        );
        for bad in ["2026-12-01 23:00:00", "2026-13-01T00:00:00Z", "-5", "soon"] {
            assert!(parse_start_at(bad).is_err(), "{bad}");
        }
    }
}
