//! End-to-end: the real `fanmq-bench` binary runs tiny fan-outs against a
//! real broker process and the results file must show zero loss.
//!
//! - Mosquitto (Debian package `mosquitto`; `bench/peers.sh` installs it),
//!   started on a free port (never 1883) and killed even when the test fails.
//! - fanmq, from `$FANMQ_BIN`, else the `fanmq` binary that `cargo test
//!   --workspace` builds next to this one; skipped with a printed reason when
//!   neither exists.
//! - FlashMQ, from `$FLASHMQ_BIN`, else the one `bench/peers.sh` builds;
//!   skipped with a printed reason when neither exists.
//! - the bench's own `raw` forwarder, and `--compare` between two brokers.
//! - the `latency` scenario against fanmq: a tiny rate search through
//!   `--compare fanmq`, and the measured run alone with `--max-rate`.

use serde_json::Value;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BENCH: &str = env!("CARGO_BIN_EXE_fanmq-bench");

/// A broker process that is killed when the test ends, passing or not.
struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Starts `program args` and waits until `port` accepts.
fn start(program: &str, args: &[String], port: u16) -> Broker {
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    let broker = Broker(child);
    let mut broker = broker;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{program} did not accept on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A broker that could not bind exits; then what answered was another.
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        matches!(broker.0.try_wait(), Ok(None)),
        "{program} exited after start (port {port} taken by another process?)"
    );
    broker
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs the bench with `args` plus `--out`, returns the parsed results.
fn bench(args: &[&str]) -> Value {
    bench_with(args, &[])
}

/// [`bench`] with extra environment variables.
fn bench_with(args: &[&str], env: &[(&str, &str)]) -> Value {
    let out = std::env::temp_dir().join(format!(
        "fmb-e2e-{}-{}.json",
        std::process::id(),
        free_port()
    ));
    let status = Command::new(BENCH)
        .args(args)
        .envs(env.iter().copied())
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .expect("running fanmq-bench");
    assert!(status.success(), "fanmq-bench {args:?} failed");
    let text = std::fs::read_to_string(&out).expect("results file");
    let _ = std::fs::remove_file(&out);
    serde_json::from_str(&text).expect("results JSON")
}

/// Checks every fan-out run in `results` delivered everything exactly once.
fn assert_no_loss(results: &Value, subs: u64, msgs: u64) {
    let runs = results["runs"].as_array().expect("runs");
    assert!(!runs.is_empty());
    for run in runs {
        let f = &run["fanout"];
        let who = &run["broker"];
        assert_eq!(run["connect"]["connected"], subs, "{who}: connected");
        assert_eq!(f["published"], msgs, "{who}: published");
        assert_eq!(f["delivered"], subs * msgs, "{who}: delivered; run: {run}");
        assert_eq!(f["lost"], 0, "{who}: lost");
        assert_eq!(f["duplicates"], 0, "{who}: duplicates");
        assert_eq!(f["out_of_order"], 0, "{who}: out of order");
        assert!(f["latency"]["p99_us"].as_f64().unwrap() > 0.0);
    }
}

/// The options of a fanout of 100 messages to 50 subscribers.
const TINY_FANOUT: [&str; 7] = [
    "fanout",
    "--subs",
    "50",
    "--msgs",
    "100",
    "--duration",
    "30",
];

/// A fanout of 100 messages to 50 subscribers against the broker on
/// `port` (plus `extra` options), checked for zero loss; returns the results.
fn tiny_fanout(port: &str, extra: &[&str]) -> Value {
    let mut args = TINY_FANOUT.to_vec();
    args.extend_from_slice(&["--port", port]);
    args.extend_from_slice(extra);
    let r = bench(&args);
    assert_no_loss(&r, 50, 100);
    r
}

#[test]
fn fanout_against_mosquitto_loses_nothing() {
    if !have("mosquitto") {
        println!("SKIPPED: mosquitto not installed (run bench/peers.sh)");
        return;
    }
    let port = free_port();
    let broker = start("mosquitto", &["-p".into(), port.to_string()], port);
    let pid = broker.0.id().to_string();
    let port = port.to_string();
    // Paced, QoS 0, exact topic, with broker CPU.
    let r = tiny_fanout(&port, &["--rate", "500", "--broker-pid", &pid]);
    assert!(r["runs"][0]["broker_usage"]["cpu_s"].as_f64().is_some());
    // Burst, QoS 1, wildcard filter.
    tiny_fanout(&port, &["--qos", "1", "--filter", "bench/+"]);
    // QoS 2 with '#', two worker processes. Paced: Mosquitto 2.0.11 never
    // sends the QoS 2 messages it queued beyond its inflight window (20) in a
    // burst or faster than it gets PUBCOMPs back (seen here even at 1000/s
    // to 50 subscribers); the bench reports that as loss.
    tiny_fanout(
        &port,
        &[
            "--qos",
            "2",
            "--filter",
            "#",
            "--workers",
            "2",
            "--rate",
            "100",
        ],
    );
}

/// The fanmq binary: `$FANMQ_BIN`, else the one `cargo test --workspace`
/// builds next to the bench; `None` (the caller skips) when neither exists.
fn fanmq_bin() -> Option<String> {
    let sibling = std::path::Path::new(BENCH).with_file_name("fanmq");
    match std::env::var("FANMQ_BIN") {
        Ok(bin) => Some(bin),
        Err(_) if sibling.exists() => Some(sibling.to_string_lossy().into_owned()),
        Err(_) => {
            println!("SKIPPED: no fanmq binary (set FANMQ_BIN or run cargo test --workspace)");
            None
        }
    }
}

/// Starts fanmq (one shard) on port 0 and returns it with the port it
/// reports in its start-up line: no other process can hold that port (a
/// port picked free beforehand may be taken by a parallel test's broker).
fn start_fanmq(bin: &str) -> (Broker, u16) {
    start_fanmq_shards(bin, 1)
}

/// [`start_fanmq`] with `shards` shards.
fn start_fanmq_shards(bin: &str, shards: u32) -> (Broker, u16) {
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--http-listen", "off"])
        .arg("--shards")
        .arg(shards.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
    let stderr = child.stderr.take().expect("piped stderr");
    let broker = Broker(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        // Reads the log to its end, so the broker never blocks on a full pipe.
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(port) = started_port(&line) {
                let _ = tx.send(port);
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("fanmq printed no start-up line within 10 s");
    (broker, port)
}

/// The port in fanmq's start-up line (`... listening on 127.0.0.1:PORT, ...`).
fn started_port(line: &str) -> Option<u16> {
    let rest = &line[line.find(" listening on ")? + " listening on ".len()..];
    rest.split([',', ' '])
        .next()?
        .rsplit(':')
        .next()?
        .parse()
        .ok()
}

#[test]
fn fanout_against_fanmq_loses_nothing() {
    let Some(bin) = fanmq_bin() else { return };
    let (_broker, port) = start_fanmq(&bin);
    let port = port.to_string();
    tiny_fanout(&port, &[]);
    tiny_fanout(&port, &["--qos", "1"]);
    // The kinder generator of before: acks coalesced, SUBSCRIBE after
    // CONNACK, one handshake at a time.
    tiny_fanout(
        &port,
        &[
            "--qos",
            "1",
            "--coalesce-acks",
            "--handshake",
            "sequential",
            "--connect-in-flight",
            "1",
        ],
    );
}

/// `--publish-node`: the publisher connects there, not to the first of
/// `--nodes` (a dead port there fails the run; the subscribers on the
/// broker's port do not help it), and `cpu_each_s` holds each
/// `--broker-pid`'s share of the broker CPU.
#[test]
fn the_publisher_goes_to_the_publish_node_and_each_node_cpu_is_reported() {
    let Some(bin) = fanmq_bin() else { return };
    let (broker, port) = start_fanmq(&bin);
    let node = format!("127.0.0.1:{port}");
    let pid = broker.0.id().to_string();
    let pids = format!("{pid},{pid}");
    let r = tiny_fanout(
        &port.to_string(),
        &[
            "--nodes",
            &node,
            "--publish-node",
            &node,
            "--broker-pid",
            &pids,
        ],
    );
    let usage = &r["runs"][0]["broker_usage"];
    let each: Vec<f64> = usage["cpu_each_s"]
        .as_array()
        .expect("cpu_each_s with two pids")
        .iter()
        .map(|c| c.as_f64().expect("seconds"))
        .collect();
    assert_eq!(each.len(), 2, "{usage}");
    let sum: f64 = each.iter().sum();
    let total = usage["cpu_s"].as_f64().expect("cpu_s");
    assert!((sum - total).abs() < 1e-6, "{each:?} against {total}");
    // Nothing listens on `dead`: the publisher cannot connect.
    let dead = format!("127.0.0.1:{}", free_port());
    let status = Command::new(BENCH)
        .args(TINY_FANOUT)
        .args([
            "--nodes",
            &node,
            "--publish-node",
            &dead,
            "--drain-timeout",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running fanmq-bench");
    assert!(
        !status.success(),
        "a run whose publisher cannot connect succeeded"
    );
}

/// MQTT 5.0 subscribers (all, and half of them) and publisher against
/// fanmq, with and without Topic Alias Maximum: nothing lost, the protocol
/// in the results, and the aliased deliveries fewer bytes each.
#[test]
fn v5_and_mixed_fanout_against_fanmq_with_and_without_topic_aliases() {
    let Some(bin) = fanmq_bin() else { return };
    let (_broker, port) = start_fanmq(&bin);
    let port = port.to_string();
    let topic = "bench/a/long/enough/topic/for/an/alias/to/pay";
    let plain = tiny_fanout(&port, &["--protocol", "5", "--topic", topic]);
    let run = &plain["runs"][0];
    assert_eq!(run["params"]["protocol"], "5");
    assert_eq!(run["fanout"]["aliased"], 0, "no alias without the maximum");
    let aliased = tiny_fanout(
        &port,
        &[
            "--protocol",
            "5",
            "--publisher-protocol",
            "5",
            "--topic-alias-max",
            "8",
            "--qos",
            "1",
            "--topic",
            topic,
        ],
    );
    let a = &aliased["runs"][0];
    assert_eq!(a["params"]["publisher_protocol"], "5");
    assert_eq!(a["fanout"]["aliased"], 50 * 100);
    assert_eq!(a["fanout"]["alias_only"], 50 * 99, "the topic once each");
    let bytes = |r: &Value| r["fanout"]["bytes_per_delivery"].as_f64().unwrap();
    assert!(
        bytes(a) + 30.0 < bytes(run),
        "aliased {} B vs {} B per delivery",
        bytes(a),
        bytes(run)
    );
    let mixed = tiny_fanout(&port, &["--protocol", "mixed", "--topic-alias-max", "8"]);
    assert_eq!(mixed["runs"][0]["params"]["protocol"], "mixed");
    assert_eq!(mixed["runs"][0]["fanout"]["aliased"], 25 * 100);
}

/// FlashMQ through `--compare flashmq` (1 thread) and `flashmq:2`: the
/// binary from `$FLASHMQ_BIN`, else the one `bench/peers.sh` builds;
/// skipped with a printed reason when neither exists.
#[test]
fn fanout_against_flashmq_loses_nothing() {
    let built = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/flashmq/build/flashmq");
    let bin = match std::env::var("FLASHMQ_BIN") {
        Ok(bin) => bin,
        Err(_) if std::path::Path::new(built).exists() => built.to_owned(),
        Err(_) => {
            println!("SKIPPED: no FlashMQ binary (set FLASHMQ_BIN or run bench/peers.sh)");
            return;
        }
    };
    let r = bench_with(
        &[
            "fanout",
            "--subs",
            "50",
            "--msgs",
            "100",
            "--qos",
            "1",
            "--duration",
            "30",
            "--compare",
            "flashmq",
            "flashmq:2",
        ],
        &[("FLASHMQ_BIN", &bin)],
    );
    assert_no_loss(&r, 50, 100);
    assert_eq!(r["runs"][1]["broker"], "flashmq-2-threads");
}

/// WebSocket subscribers (`--transport ws`) through `--compare fanmq`, and
/// FlashMQ too when its binary is there: the subscribers reach the brokers'
/// WebSocket listeners (which refuse plain MQTT), QoS 0 pipelined and QoS 1
/// sequential with keep-alive pings, nothing lost.
#[test]
fn websocket_fanout_against_fanmq_and_flashmq_loses_nothing() {
    websocket_fanout_loses_nothing("ws");
}

/// The same over TLS (`--transport wss`): the brokers' listeners speak TLS
/// with the certificate the bench made for the run, which the subscribers
/// check.
#[test]
fn secure_websocket_fanout_against_fanmq_and_flashmq_loses_nothing() {
    websocket_fanout_loses_nothing("wss");
}

/// A tiny fan-out over `transport` (`ws` or `wss`) against fanmq and
/// FlashMQ (when built), QoS 0 and QoS 1 with pings: nothing lost.
fn websocket_fanout_loses_nothing(transport: &str) {
    let Some(bin) = fanmq_bin() else { return };
    let built = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/flashmq/build/flashmq");
    let flashmq = std::env::var("FLASHMQ_BIN").ok().or_else(|| {
        std::path::Path::new(built)
            .exists()
            .then(|| built.to_owned())
    });
    let mut env = vec![("FANMQ_BIN", bin.as_str())];
    let mut compare = vec!["fanmq"];
    match &flashmq {
        Some(flashmq) => {
            env.push(("FLASHMQ_BIN", flashmq));
            compare.push("flashmq");
        }
        None => println!("FlashMQ SKIPPED: set FLASHMQ_BIN or run bench/peers.sh"),
    }
    for extra in [
        &[][..],
        &[
            "--qos",
            "1",
            "--handshake",
            "sequential",
            "--keep-alive",
            "2",
        ][..],
    ] {
        let mut args = TINY_FANOUT.to_vec();
        args.extend_from_slice(&["--transport", transport]);
        args.extend_from_slice(extra);
        args.push("--compare");
        args.extend_from_slice(&compare);
        let r = bench_with(&args, &env);
        assert_no_loss(&r, 50, 100);
        let runs = r["runs"].as_array().unwrap();
        assert_eq!(runs.len(), compare.len());
        for run in runs {
            assert_eq!(run["params"]["transport"], transport, "{}", run["broker"]);
        }
    }
}

/// `--broker-option` reaches the broker: fanmq started with
/// `max_connections = 20` from its option refuses the connections past 20
/// of 50, and accepts all 50 without it.
#[test]
fn broker_options_reach_fanmq() {
    let Some(bin) = fanmq_bin() else { return };
    let env = [("FANMQ_BIN", bin.as_str())];
    let connect = |extra: &[&str]| {
        let mut args = vec!["connect", "--subs", "50", "--compare", "fanmq"];
        args.extend_from_slice(extra);
        let r = bench_with(&args, &env);
        r["runs"][0]["connect"].clone()
    };
    let limited = connect(&["--broker-option", "fanmq:max_connections=20"]);
    assert_eq!(limited["connected"], 20, "{limited}");
    assert_eq!(limited["failed"], 30, "{limited}");
    let unlimited = connect(&[]);
    assert_eq!(unlimited["connected"], 50, "{unlimited}");
}

/// Checks a latency run's measured run at R_max / 2 (in `fanout`): every
/// message to every subscriber, and the verdict consistent with the figures.
fn assert_latency_run(run: &Value, subs: u64) {
    let who = &run["broker"];
    assert_eq!(run["scenario"], "latency", "{who}");
    let l = &run["latency"];
    let max_rate = l["max_rate"].as_f64().expect("max_rate");
    let rate = l["rate"].as_f64().expect("rate");
    assert_eq!(rate, max_rate / 2.0);
    assert_eq!(l["subscribers"], subs);
    let dps = l["max_deliveries_per_s"].as_f64().unwrap();
    assert!((dps - max_rate * subs as f64).abs() < 1e-6);
    // 1.2 × N ÷ (R_max × N) seconds, in µs.
    let bound = l["bound_us"].as_f64().unwrap();
    assert!((bound - 1.2e6 / max_rate).abs() < 1e-6, "{bound}");
    let f = &run["fanout"];
    let planned = (rate * 1.0).ceil().max(50.0) as u64;
    assert_eq!(f["published"], planned, "{who}: published");
    assert_eq!(f["delivered"], planned * subs, "{who}: delivered; {run}");
    assert_eq!(f["lost"], 0, "{who}: lost");
    assert_eq!(f["duplicates"], 0, "{who}: duplicates");
    let p99 = f["latency"]["p99_us"].as_f64().unwrap();
    assert!(p99 > 0.0);
    assert_eq!(l["p99_us"].as_f64(), Some(p99));
    assert_eq!(l["meets_bound"].as_bool(), Some(p99 <= bound));
    let lag = &l["lag"];
    assert!(lag["messages"].as_u64().unwrap() > 0);
    assert_eq!(
        lag["grows"].as_bool(),
        Some(lag["growth_ms"].as_f64() > lag["tolerance_ms"].as_f64())
    );
    assert!(run["broker_usage"]["cpu_s"].as_f64().is_some());
    assert!(run["generator"]["cpu_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn latency_against_fanmq_searches_then_measures_without_loss() {
    let Some(bin) = fanmq_bin() else { return };
    // The search, through --compare (which starts fanmq itself): three
    // steps of 0.5 s from 100 msg/s, then 1 s at half the highest sustained.
    let r = bench_with(
        &[
            "latency",
            "--subs",
            "20",
            "--start-rate",
            "100",
            "--step-duration",
            "0.5",
            "--max-steps",
            "3",
            "--duration",
            "1",
            "--compare",
            "fanmq",
        ],
        &[("FANMQ_BIN", &bin)],
    );
    let run = &r["runs"][0];
    let l = &run["latency"];
    let steps = l["steps"].as_array().expect("steps");
    assert!(!steps.is_empty() && steps.len() <= 3, "{l}");
    let mut best: Option<f64> = None;
    for s in steps {
        let rate = s["rate"].as_f64().unwrap();
        assert!(s["published"].as_u64() <= s["planned"].as_u64());
        if s["sustained"] == true {
            assert_eq!(s["lost"], 0);
            assert_eq!(s["delivered"], s["expected"]);
            assert_eq!(s["published"], s["planned"]);
            assert_eq!(s["lag"]["grows"], false);
            best = Some(best.map_or(rate, |b: f64| b.max(rate)));
        } else {
            assert!(!s["why"].as_str().unwrap().is_empty());
        }
    }
    // R_max is the highest sustained step; a machine too busy to sustain
    // even 100 msg/s to 20 subscribers measures nothing, and says so.
    assert_eq!(l["max_rate"].as_f64(), best, "{l}");
    match best {
        Some(_) => assert_latency_run(run, 20),
        None => assert!(run["notes"].to_string().contains("no rate was sustained")),
    }

    // The measured run alone, at half of a given R_max: deterministic.
    let (broker, port) = start_fanmq(&bin);
    let pid = broker.0.id().to_string();
    let port = port.to_string();
    let r = bench(&[
        "latency",
        "--port",
        &port,
        "--broker-pid",
        &pid,
        "--subs",
        "20",
        "--max-rate",
        "200",
        "--duration",
        "1",
    ]);
    let run = &r["runs"][0];
    assert_eq!(run["latency"]["steps"].as_array().map(Vec::len), Some(0));
    assert_eq!(run["latency"]["search"], "given by --max-rate");
    assert_latency_run(run, 20);
}

#[test]
fn raw_forwarder_paced_and_burst() {
    let r = bench(&[
        "raw",
        "--subs",
        "50",
        "--msgs",
        "100",
        "--rate",
        "500",
        "--duration",
        "30",
    ]);
    assert_no_loss(&r, 50, 100);
    let r = bench(&["raw", "--subs", "50", "--msgs", "1000", "--duration", "30"]);
    assert_no_loss(&r, 50, 1000);
    assert!(
        r["runs"][0]["broker_usage"]["deliveries_per_cpu_s"].is_number()
            || r["runs"][0]["broker_usage"]["cpu_s"] == 0.0
    );
}

#[test]
fn compare_runs_each_broker_and_connect_idle_storm_work() {
    if !have("mosquitto") {
        println!("SKIPPED: mosquitto not installed (run bench/peers.sh)");
        return;
    }
    let r = bench(&[
        "fanout",
        "--subs",
        "20",
        "--msgs",
        "50",
        "--compare",
        "mosquitto",
        "raw",
        "--rounds",
        "2",
        "--duration",
        "30",
    ]);
    assert_no_loss(&r, 20, 50);
    let brokers: Vec<&str> = r["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["broker"].as_str().unwrap())
        .collect();
    assert_eq!(brokers, ["mosquitto", "raw", "mosquitto", "raw"]);
    let r = bench(&["connect", "--subs", "200", "--compare", "mosquitto"]);
    assert_eq!(r["runs"][0]["connect"]["connected"], 200);
    assert!(r["runs"][0]["connect"]["broker_cpu_us_per_conn"].is_number());
    let r = bench(&[
        "idle",
        "--subs",
        "200",
        "--hold",
        "1",
        "--compare",
        "mosquitto",
    ]);
    assert_eq!(r["runs"][0]["idle"]["held"], 200);
    assert!(r["runs"][0]["idle"]["broker_rss_per_conn"].is_number());
    // The peak over the RSS before the first connection: at least the
    // growth that is still there after the hold.
    let idle = &r["runs"][0]["idle"];
    assert!(
        idle["broker_peak_rss_per_conn"].as_f64().unwrap()
            >= idle["broker_rss_per_conn"].as_f64().unwrap(),
        "{idle}"
    );
    let r = bench(&["storm", "--subs", "200", "--compare", "mosquitto"]);
    let storm = &r["runs"][0]["storm"];
    assert_eq!(storm["back"], 200);
    assert!(storm["open_seconds"].as_f64().unwrap() > 0.0, "{storm}");
    assert!(storm["broker_peak_rss_per_conn"].is_number(), "{storm}");
}

#[test]
fn refuses_a_filter_that_does_not_match() {
    let status = Command::new(BENCH)
        .args(["fanout", "--topic", "a/b", "--filter", "c/+", "--subs", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success());
}

/// A split run's path on loopback, without namespaces (bench/netns-test.sh
/// does it across them): one part of one, from four 127.0.0.x source
/// addresses, merged. The merged run must show what the part showed, and
/// every source address must have been used.
#[test]
fn one_part_from_four_source_addresses_merges_to_its_own_figures() {
    let Some(bin) = fanmq_bin() else { return };
    let (_broker, port) = start_fanmq(&bin);
    let dir = std::env::temp_dir().join(format!("fmb-e2e-part-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let part = dir.join("part1.json");
    let merged = dir.join("merged.json");
    let run = |args: &[&str]| {
        let status = Command::new(BENCH)
            .args(args)
            .stdout(Stdio::null())
            .status()
            .expect("running fanmq-bench");
        assert!(status.success(), "fanmq-bench {args:?} failed");
    };
    run(&[
        "fanout",
        "--port",
        &port.to_string(),
        "--subs",
        "40",
        "--msgs",
        "50",
        "--duration",
        "30",
        "--part",
        "1/1",
        "--source-addrs",
        "127.0.0.2-127.0.0.5",
        "--out",
        part.to_str().unwrap(),
    ]);
    run(&[
        "merge",
        part.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
        "--plots",
    ]);
    let load = |p: &std::path::Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(p).expect("results file")).expect("JSON")
    };
    let (part, merged_v) = (load(&part), load(&merged));
    assert_no_loss(&merged_v, 40, 50);
    let (p, m) = (&part["runs"][0], &merged_v["runs"][0]);
    assert_eq!(p["fanout"]["delivered"], m["fanout"]["delivered"]);
    assert_eq!(
        p["fanout"]["latency"]["count"],
        m["fanout"]["latency"]["count"]
    );
    let sources = m["connect"]["by_source"].as_object().expect("by_source");
    let used: Vec<&String> = sources.keys().collect();
    assert_eq!(used, ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]);
    assert!(sources.values().all(|n| n == 10), "{sources:?}");
    assert!(dir.join("merged-latency.svg").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `--shared-group` run split in two parts that run at once (part 1
/// publishes at `--start-at`), merged: each message counted once over both
/// parts' members, none lost or duplicated, and both parts' members had
/// some (fanmq with two shards, so the group spans them).
#[test]
fn a_shared_group_run_in_two_parts_merges_to_each_message_once() {
    let Some(bin) = fanmq_bin() else { return };
    let (_broker, port) = start_fanmq_shards(&bin, 2);
    let dir = std::env::temp_dir().join(format!("fmb-e2e-shared-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let start_at = format!(
        "{:.3}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
            + 4.0
    );
    let port = port.to_string();
    let part_file = |k: u32| dir.join(format!("part{k}.json"));
    let spawn = |k: u32| {
        let (file, part) = (part_file(k), format!("{k}/2"));
        Command::new(BENCH)
            .args([
                "fanout",
                "--port",
                &port,
                "--subs",
                "40",
                "--msgs",
                "50",
                "--qos",
                "1",
                "--shared-group",
                "g",
                "--duration",
                "20",
                "--drain-timeout",
                "1",
                "--part",
                &part,
                "--start-at",
                &start_at,
                "--out",
            ])
            .arg(&file)
            .stdout(Stdio::null())
            .spawn()
            .expect("running fanmq-bench")
    };
    let (mut one, mut two) = (spawn(1), spawn(2));
    for child in [&mut one, &mut two] {
        assert!(child.wait().expect("fanmq-bench").success());
    }
    let merged = dir.join("merged.json");
    let status = Command::new(BENCH)
        .args(["merge"])
        .arg(part_file(1))
        .arg(part_file(2))
        .arg("--out")
        .arg(&merged)
        .stdout(Stdio::null())
        .status()
        .expect("running fanmq-bench merge");
    assert!(status.success());
    let load = |p: &std::path::Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(p).expect("results file")).expect("JSON")
    };
    for k in [1, 2] {
        let part = load(&part_file(k));
        let delivered = part["runs"][0]["fanout"]["delivered"].as_u64().unwrap();
        assert!(delivered > 0, "part {k}'s members got nothing");
    }
    let run = &load(&merged)["runs"][0];
    let f = &run["fanout"];
    assert_eq!(run["params"]["shared_group"], "g", "{run}");
    assert_eq!(run["connect"]["connected"], 40);
    assert_eq!(
        (&f["published"], &f["expected"], &f["delivered"]),
        (&50.into(), &50.into(), &50.into()),
        "{f}"
    );
    assert_eq!(
        (&f["lost"], &f["duplicates"]),
        (&0.into(), &0.into()),
        "{f}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
