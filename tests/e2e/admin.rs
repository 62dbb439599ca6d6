//! The admin HTTP listener, through a real HTTP client (`ureq`): Prometheus
//! `/metrics` and `/api/v1/stats` match what real MQTT clients did, the
//! client and subscription API, disconnect, `/health`, authentication, and
//! bad requests that must not hurt the broker.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde_json::Value;

use crate::common::{Broker, Mqtt, TIMEOUT};

/// An HTTP answer: status and body.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: String,
}

impl Answer {
    /// The body as JSON.
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One request to the broker's admin listener.
pub(crate) fn http(
    broker: &Broker,
    method: &str,
    path: &str,
    authorization: Option<&str>,
) -> Answer {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(TIMEOUT))
        .build()
        .into();
    let url = format!("http://127.0.0.1:{}{path}", broker.http_port);
    let response = match method {
        "GET" => {
            let mut r = agent.get(&url);
            if let Some(a) = authorization {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        "DELETE" => {
            let mut r = agent.delete(&url);
            if let Some(a) = authorization {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        other => panic!("method {other} not used here"),
    };
    let mut response = response.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    Answer {
        status: response.status().as_u16(),
        body: response
            .body_mut()
            .read_to_string()
            .unwrap_or_else(|e| panic!("{method} {path} body: {e}")),
    }
}

/// `GET path` without credentials, asserting 200; the body as JSON.
pub(crate) fn get_json(broker: &Broker, path: &str) -> Value {
    let a = http(broker, "GET", path, None);
    assert_eq!(a.status, 200, "GET {path}: {}", a.body);
    a.json()
}

/// Polls `/api/v1/stats` until `done` accepts it (figures are refreshed
/// every half second); panics with the last stats after [`TIMEOUT`].
pub(crate) fn wait_stats(broker: &Broker, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let stats = get_json(broker, "/api/v1/stats");
        if done(&stats) {
            return stats;
        }
        assert!(Instant::now() < deadline, "stats never matched: {stats}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A figure of the stats' total.
pub(crate) fn total(stats: &Value, key: &str) -> u64 {
    stats["total"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no total.{key} in {stats}"))
}

/// The value of the sample `name{labels}` in Prometheus text, checking that
/// every sample line is `name[{labels}] number`.
pub(crate) fn sample(text: &str, series: &str) -> f64 {
    let mut found = None;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(
            name.starts_with("fanmq_") && (!name.contains('{') || name.ends_with('}')),
            "bad series {name:?}"
        );
        if name == series {
            found = Some(value);
        }
    }
    found.unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

#[test]
fn metrics_and_stats_match_what_clients_did() {
    let broker = Broker::start();
    let mut subscribers: Vec<Mqtt> = (0..4)
        .map(|i| Mqtt::connect(broker.port, &format!("adm-sub-{i}")))
        .collect();
    for s in &mut subscribers {
        s.subscribe("adm/#", QoS::AtLeastOnce);
    }
    let mut publisher = Mqtt::connect(broker.port, "adm-pub");
    for i in 0..3 {
        publisher.publish(&format!("adm/q0/{i}"), QoS::AtMostOnce, false, b"x");
    }
    for i in 0..2 {
        publisher.publish_acked(&format!("adm/q1/{i}"), false, b"yy");
    }
    for s in &mut subscribers {
        for _ in 0..5 {
            s.expect_publish();
        }
    }
    let stats = wait_stats(&broker, |s| {
        total(s, "clients_connected") == 5 && total(s, "publish_sent") == 20
    });
    assert_eq!(total(&stats, "publish_received"), 5);
    assert_eq!(
        stats["total"]["publish_received_by_qos"],
        serde_json::json!([3, 2, 0])
    );
    assert_eq!(
        stats["total"]["publish_sent_by_qos"],
        serde_json::json!([12, 8, 0])
    );
    assert_eq!(total(&stats, "subscriptions"), 4);
    assert_eq!(stats["total"]["clients_by_listener"][0], 5);
    assert_eq!(stats["listeners"][0], "mqtt");
    assert_eq!(stats["shards"].as_array().map(Vec::len), Some(2));
    let per_shard: u64 = stats["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["clients_connected"].as_u64().unwrap())
        .sum();
    assert_eq!(per_shard, 5);

    let metrics = http(&broker, "GET", "/metrics", None);
    assert_eq!(metrics.status, 200);
    let text = metrics.body;
    assert_eq!(sample(&text, "fanmq_connections{listener=\"mqtt\"}"), 5.0);
    assert_eq!(
        sample(&text, "fanmq_messages_received_total{qos=\"0\"}"),
        3.0
    );
    assert_eq!(
        sample(&text, "fanmq_messages_received_total{qos=\"1\"}"),
        2.0
    );
    // 3 QoS 0 and 2 QoS 1 publishes to 4 QoS 1 subscribers.
    assert_eq!(
        sample(&text, "fanmq_messages_delivered_total{qos=\"0\"}"),
        12.0
    );
    assert_eq!(
        sample(&text, "fanmq_messages_delivered_total{qos=\"1\"}"),
        8.0
    );
    assert_eq!(sample(&text, "fanmq_subscriptions"), 4.0);
    assert!(sample(&text, "fanmq_connections_accepted_total{listener=\"mqtt\"}") >= 5.0);
    assert!(sample(&text, "fanmq_bytes_received_total") > 0.0);
    assert!(sample(&text, "fanmq_uptime_seconds") > 0.0);
    assert_eq!(
        sample(
            &text,
            &format!(
                "fanmq_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    let shard_sum = sample(&text, "fanmq_shard_connections{shard=\"0\"}")
        + sample(&text, "fanmq_shard_connections{shard=\"1\"}");
    assert_eq!(shard_sum, 5.0);

    // A client leaving shows in the figures too.
    publisher.disconnect();
    wait_stats(&broker, |s| total(s, "clients_connected") == 4);
}

#[test]
fn each_client_shows_the_mqtt_version_it_connected_with() {
    use crate::common::{ConnectBuilder, Raw, packet, string};
    let broker = Broker::start();
    let _v311 = Mqtt::connect(broker.port, "proto-4");
    let (_v31, connack) = Raw::connect_with(
        broker.port,
        &ConnectBuilder::new("proto-3").protocol(b"MQIsdp", 3),
    );
    assert_eq!(connack, [0x20, 2, 0, 0], "MQTT 3.1 accepted");
    let mut v5 = Raw::tcp(broker.port);
    let mut connect = string(b"MQTT");
    connect.extend([5, 0x02, 0, 60, 0]);
    connect.extend(string(b"proto-5"));
    v5.send(&packet(0x10, &connect));
    assert_eq!(v5.expect_packet().kind(), 2, "MQTT 5.0 CONNACK");
    for (id, level) in [("proto-3", 3), ("proto-4", 4), ("proto-5", 5)] {
        let client = get_json(&broker, &format!("/api/v1/clients/{id}"));
        assert_eq!(client["protocol_version"], level, "{client}");
    }
    let list = get_json(&broker, "/api/v1/clients");
    let mut levels: Vec<u64> = list["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["protocol_version"].as_u64().unwrap())
        .collect();
    levels.sort_unstable();
    assert_eq!(levels, [3, 4, 5], "{list}");
}

#[test]
fn clients_paging_one_client_and_disconnect() {
    let mut broker = Broker::start();
    let mut clients: Vec<Mqtt> = (0..5)
        .map(|i| Mqtt::connect(broker.port, &format!("page-{i}")))
        .collect();
    clients[1].subscribe("page/one", QoS::AtMostOnce);
    wait_stats(&broker, |s| total(s, "clients_connected") == 5);

    let mut seen = Vec::new();
    for offset in [0, 2, 4] {
        let page = get_json(&broker, &format!("/api/v1/clients?limit=2&offset={offset}"));
        assert_eq!(page["total"], 5, "{page}");
        let list = page["clients"].as_array().unwrap();
        assert_eq!(list.len(), if offset == 4 { 1 } else { 2 }, "{page}");
        seen.extend(
            list.iter()
                .map(|c| c["client_id"].as_str().unwrap().to_string()),
        );
    }
    seen.sort();
    let expected: Vec<String> = (0..5).map(|i| format!("page-{i}")).collect();
    assert_eq!(seen, expected);
    let empty = get_json(&broker, "/api/v1/clients?offset=99");
    assert_eq!(empty["clients"].as_array().map(Vec::len), Some(0));

    let one = get_json(&broker, "/api/v1/clients/page-1");
    assert_eq!(one["client_id"], "page-1");
    assert_eq!(one["connected"], true);
    assert_eq!(one["subscriptions"], 1);
    assert_eq!(
        one["shard"].as_u64(),
        Some(broker.shard_of("page-1") as u64)
    );
    assert!(
        one["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{one}"
    );
    let since = one["connected_since"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        since <= now && since + 60 > now,
        "connected_since {since}, now {now}"
    );
    assert_eq!(
        http(&broker, "GET", "/api/v1/clients/nobody", None).status,
        404
    );

    // DELETE disconnects the client: rumqttc sees the connection end.
    let gone = http(&broker, "DELETE", "/api/v1/clients/page-1", None);
    assert_eq!(gone.status, 200, "{}", gone.body);
    let mut victim = clients.remove(1);
    let err = victim
        .wait_for(|_| None::<()>)
        .expect_err("no packet is picked: only an error ends the wait");
    assert!(
        !err.starts_with("timed out"),
        "client saw no disconnect: {err}"
    );
    assert_eq!(
        http(&broker, "DELETE", "/api/v1/clients/nobody", None).status,
        404
    );
    wait_stats(&broker, |s| total(s, "clients_connected") == 4);
    assert_eq!(
        http(&broker, "GET", "/api/v1/clients/page-1", None).status,
        404
    );
    // The others lost nothing.
    for c in &mut clients {
        c.subscribe("page/all", QoS::AtMostOnce);
    }
    clients[0].publish("page/all", QoS::AtMostOnce, false, b"still here");
    for c in &mut clients {
        assert_eq!(&c.expect_publish().payload[..], b"still here");
    }
    broker.assert_running();
}

#[test]
fn subscriptions_by_topic() {
    let broker = Broker::start();
    let mut a = Mqtt::connect(broker.port, "subs-a");
    let mut b = Mqtt::connect(broker.port, "subs-b");
    let mut c = Mqtt::connect(broker.port, "subs-c");
    a.subscribe("s/+/x", QoS::AtLeastOnce);
    b.subscribe("s/#", QoS::AtMostOnce);
    c.subscribe("other", QoS::AtMostOnce);
    let matching = get_json(&broker, "/api/v1/subscriptions?topic=s%2F1%2Fx");
    assert_eq!(matching["total"], 2, "{matching}");
    let mut found: Vec<(String, String, u64)> = matching["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["client_id"].as_str().unwrap().to_string(),
                s["filter"].as_str().unwrap().to_string(),
                s["qos"].as_u64().unwrap(),
            )
        })
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            ("subs-a".to_string(), "s/+/x".to_string(), 1),
            ("subs-b".to_string(), "s/#".to_string(), 0)
        ]
    );
    let all = get_json(&broker, "/api/v1/subscriptions?limit=1");
    assert_eq!(all["total"], 3);
    assert_eq!(all["subscriptions"].as_array().map(Vec::len), Some(1));
    let wildcard = http(&broker, "GET", "/api/v1/subscriptions?topic=s%2F%23", None);
    assert_eq!(wildcard.status, 400, "{}", wildcard.body);
}

#[test]
fn health_and_authentication() {
    // Basic credentials: "admin:pw" in base64.
    let broker = Broker::builder()
        .config(
            "http_auth_token = \"s3cret\"\nhttp_basic_user = \"admin\"\nhttp_basic_password = \"pw\"",
        )
        .start();
    let health = http(&broker, "GET", "/health", None);
    assert_eq!(health.status, 200, "{}", health.body);
    assert_eq!(health.json()["status"], "ok");
    let page = http(&broker, "GET", "/", None);
    assert_eq!(page.status, 200);
    for path in ["/metrics", "/api/v1/stats", "/api/v1/clients"] {
        assert_eq!(http(&broker, "GET", path, None).status, 401, "{path}");
        assert_eq!(
            http(&broker, "GET", path, Some("Bearer wrong")).status,
            401,
            "{path}"
        );
        assert_eq!(
            http(&broker, "GET", path, Some("Bearer s3cret")).status,
            200,
            "{path}"
        );
        assert_eq!(
            http(&broker, "GET", path, Some("Basic YWRtaW46cHc=")).status,
            200,
            "{path}"
        );
    }
    assert_eq!(
        http(&broker, "DELETE", "/api/v1/clients/x", None).status,
        401
    );
}

#[test]
fn bad_requests_get_errors_and_the_broker_stays_up() {
    let mut broker = Broker::start();
    let mut client = Mqtt::connect(broker.port, "bad-http");
    client.subscribe("bad/http", QoS::AtMostOnce);
    assert_eq!(http(&broker, "GET", "/nope", None).status, 404);
    assert_eq!(
        http(&broker, "GET", "/api/v1/clients?limit=abc", None).status,
        400
    );
    assert_eq!(
        http(&broker, "GET", "/api/v1/clients?limit=100000", None).status,
        400
    );
    assert_eq!(
        http(&broker, "GET", "/api/v1/clients?colour=red", None).status,
        400
    );
    assert_eq!(
        http(&broker, "GET", "/api/v1/clients/%FF", None).status,
        400
    );
    assert_eq!(http(&broker, "DELETE", "/api/v1/stats", None).status, 405);

    // A silent connection does not hold up the next request.
    let mut silent = TcpStream::connect(("127.0.0.1", broker.http_port)).unwrap();
    silent.write_all(b"GET /health HT").unwrap();
    assert_eq!(http(&broker, "GET", "/health", None).status, 200);

    // A huge request head: refused with 431 (or the connection closed).
    let status = raw_request(&broker, &{
        let mut r = b"GET /api/v1/clients?".to_vec();
        r.extend(std::iter::repeat_n(b'a', 200 * 1024));
        r.extend_from_slice(b" HTTP/1.1\r\n\r\n");
        r
    });
    assert!(
        matches!(status.as_deref(), Some("431") | None),
        "{status:?}"
    );
    // Garbage instead of HTTP.
    let status = raw_request(&broker, b"\x10\x00garbage\r\n\r\n");
    assert!(
        matches!(status.as_deref(), Some("400") | None),
        "{status:?}"
    );
    drop(silent);

    // The broker and its clients are unaffected.
    assert_eq!(http(&broker, "GET", "/health", None).status, 200);
    client.publish("bad/http", QoS::AtMostOnce, false, b"ok");
    assert_eq!(&client.expect_publish().payload[..], b"ok");
    broker.assert_running();
}

/// Sends raw bytes to the admin listener; the status code of the answer,
/// or None when the connection closed without one.
fn raw_request(broker: &Broker, bytes: &[u8]) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", broker.http_port)).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    // The server may answer and close before taking it all.
    let _ = stream.write_all(bytes);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    answer
        .strip_prefix("HTTP/1.1 ")
        .map(|rest| rest.chars().take(3).collect())
}

#[test]
fn off_and_non_loopback_without_auth() {
    let out = Command::new(env!("CARGO_BIN_EXE_fanmq"))
        .args(["--listen", "127.0.0.1:0", "--http-listen", "0.0.0.0:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run fanmq");
    assert_eq!(
        out.status.code(),
        Some(2),
        "started without auth on 0.0.0.0"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("http_auth_token"), "stderr: {stderr}");

    let broker = Broker::builder()
        .config("http_listen = \"127.0.0.1:0\"")
        .http(false)
        .start();
    broker
        .wait_log(|l| l.contains("admin HTTP off"), TIMEOUT)
        .expect("no 'admin HTTP off' line");
}

#[test]
fn sigterm_also_stops_the_admin_listener() {
    let mut broker = Broker::start();
    assert_eq!(http(&broker, "GET", "/health", None).status, 200);
    broker.signal(libc::SIGTERM);
    let status = broker
        .wait_exit(TIMEOUT)
        .unwrap_or_else(|| panic!("still running after SIGTERM:\n{}", broker.log_text()));
    assert!(status.success(), "exit status {status}");
    assert!(
        TcpStream::connect(("127.0.0.1", broker.http_port)).is_err(),
        "the admin port still accepts"
    );
}
