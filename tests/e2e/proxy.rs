//! The PROXY protocol on a listener (`--proxy-listen`, `proxy_protocol =
//! true`): raw v1 and v2 headers followed by MQTT on the same socket, the
//! client's address from the header in the admin API, the logs and
//! `max_connections_per_ip`; connections without a valid header refused;
//! and HAProxy (`send-proxy`, `send-proxy-v2`) in front of two brokers with
//! mosquitto clients and TLS passed through.

use std::io::Write;
use std::net::{Ipv6Addr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::admin::{get_json, total, wait_stats};
use crate::common::{Broker, CONNACK_OK, ConnectBuilder, Raw, TIMEOUT, unique};
use crate::tls::Pki;
use crate::websocket::{ws_over, ws_read, ws_send};

/// A v1 header for a TCP4 client.
fn v1(client: &str, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {client} 192.0.2.1 {port} 1883\r\n").into_bytes()
}

/// The v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A v2 LOCAL header without addresses (a balancer's health check).
const V2_LOCAL: [u8; 16] = *b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";

/// A v2 PROXY header for a TCP over IPv6 client, with two TLVs (AWS's VPC
/// endpoint id and a NOOP of `padding` bytes), written by `ppp`'s builder
/// (the unit tests build their headers by hand).
fn v2_tcp6(client: Ipv6Addr, port: u16, padding: usize) -> Vec<u8> {
    use ppp::v2::{Builder, Command, IPv6, Protocol, Type, Version};
    let server: Ipv6Addr = "2001:db8::1".parse().unwrap();
    let addresses = IPv6::new(client, server, port, 1883);
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, addresses)
        .write_tlv(0xEA, b"\x01vpc-1")
        .and_then(|b| b.write_tlv(Type::NoOp, &vec![0; padding]))
        .and_then(Builder::build)
        .expect("a v2 header")
}

/// A broker with a plain listener (`broker.port`) and a PROXY protocol one.
fn proxied_broker(config: &str) -> (Broker, u16) {
    let broker = Broker::builder()
        .arg("--proxy-listen")
        .arg("127.0.0.1:0")
        .config(config)
        .start();
    let port = broker.port_of("mqtt+proxy");
    assert_ne!(port, broker.port);
    (broker, port)
}

/// Sends `header` then CONNECT for `client_id` (in one write or two) and
/// returns the client if CONNACK 0 came back, None if the broker closed.
fn connect_behind(port: u16, header: &[u8], client_id: &str, one_write: bool) -> Option<Raw> {
    let mut raw = Raw::tcp(port);
    let connect = ConnectBuilder::new(client_id).bytes();
    if one_write {
        raw.send_lossy(&[header, &connect].concat());
    } else {
        // The header in two pieces, then CONNECT on its own.
        let (a, b) = header.split_at(header.len() / 2);
        raw.send_lossy(a);
        std::thread::sleep(Duration::from_millis(30));
        raw.send_lossy(b);
        std::thread::sleep(Duration::from_millis(30));
        raw.send_lossy(&connect);
    }
    raw.accepted()
}

/// `count` clients from `client` (source ports from `first_port`) behind
/// `port`, each of which must get in.
fn hold(port: u16, client: &str, first_port: u16, count: u16, prefix: &str) -> Vec<Raw> {
    (0..count)
        .map(|i| {
            let header = v1(client, first_port + i);
            connect_behind(port, &header, &format!("{prefix}-{i}"), true)
                .unwrap_or_else(|| panic!("{client} connection {i} was refused"))
        })
        .collect()
}

/// The `peer` the admin API shows for `client_id`.
fn admin_peer(broker: &Broker, client_id: &str) -> String {
    let info = get_json(broker, &format!("/api/v1/clients/{client_id}"));
    info["peer"]
        .as_str()
        .unwrap_or_else(|| panic!("no peer in {info}"))
        .to_string()
}

#[test]
fn the_header_address_is_what_the_admin_api_and_the_logs_see() {
    let (mut broker, port) = proxied_broker("");
    let id = unique();

    // v1 TCP4, header and CONNECT in one write.
    let v1_id = format!("pp-v1-{id}");
    let mut a = connect_behind(port, &v1("203.0.113.7", 40001), &v1_id, true).expect("v1");
    assert_eq!(admin_peer(&broker, &v1_id), "203.0.113.7:40001");
    broker
        .wait_log(
            |l| l.contains(&format!("203.0.113.7:40001: client {v1_id} connected")),
            TIMEOUT,
        )
        .expect("the log line names the header's client");

    // v2 PROXY over IPv6 with TLVs, the header in pieces.
    let v2_id = format!("pp-v2-{id}");
    let client: Ipv6Addr = "2001:db8:7::7".parse().unwrap();
    let mut b = connect_behind(port, &v2_tcp6(client, 40002, 0), &v2_id, false).expect("v2");
    assert_eq!(admin_peer(&broker, &v2_id), "[2001:db8:7::7]:40002");
    // TLVs of 1 KiB (HAProxy's TLS details can be long): still read whole.
    let long_id = format!("pp-long-{id}");
    let header = v2_tcp6(client, 40003, 1024);
    assert!(header.len() > 1024);
    let mut long = connect_behind(port, &header, &long_id, true).expect("long v2");
    assert_eq!(admin_peer(&broker, &long_id), "[2001:db8:7::7]:40003");
    long.ping();

    // v2 LOCAL (a balancer's own connection) and v1 UNKNOWN: the socket's
    // own peer address.
    let local_id = format!("pp-local-{id}");
    let c = connect_behind(port, &V2_LOCAL, &local_id, true).expect("LOCAL");
    let own = c.stream.local_addr().unwrap().to_string();
    assert_eq!(admin_peer(&broker, &local_id), own);
    let unknown_id = format!("pp-unknown-{id}");
    let d = connect_behind(port, b"PROXY UNKNOWN\r\n", &unknown_id, true).expect("UNKNOWN");
    let own = d.stream.local_addr().unwrap().to_string();
    assert_eq!(admin_peer(&broker, &unknown_id), own);

    // They are ordinary clients: a publish from one reaches another.
    let topic = format!("pp/{id}");
    assert_eq!(b.subscribe(1, &[(&topic, 0)]), vec![0]);
    a.send(&crate::common::publish(
        topic.as_bytes(),
        b"via the balancer",
        0,
        false,
        false,
        0,
    ));
    assert_eq!(&b.expect_publish().payload[..], b"via the balancer");
    // The plain listener of the same broker needs no header.
    broker.assert_healthy();
}

#[test]
fn a_proxy_listener_refuses_connections_without_a_valid_header() {
    let (mut broker, port) = proxied_broker("proxy_protocol_timeout_secs = 1");
    let id = unique();

    // A client that talks MQTT at once: closed without a word.
    let mut direct = Raw::tcp(port);
    direct.send_lossy(&ConnectBuilder::new(&format!("direct-{id}")).bytes());
    direct.expect_closed_silently();
    broker
        .wait_log(|l| l.contains("no PROXY protocol header"), TIMEOUT)
        .expect("a log line for the refused connection");
    // A broken header: v1 with a bad address, v2 with version 1.
    let broken = connect_behind(port, b"PROXY TCP4 300.1.1.1 192.0.2.1 1 2\r\n", "b1", true);
    assert!(broken.is_none(), "a bad v1 header was accepted");
    let mut bad_v2 = V2_LOCAL;
    bad_v2[12] = 0x10;
    assert!(connect_behind(port, &bad_v2, "b2", true).is_none());
    // Longer than 4 KiB (a v2 length of 65535): refused at once.
    let mut long = V2_SIGNATURE.to_vec();
    long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    let mut raw = Raw::tcp(port);
    raw.send_lossy(&long);
    raw.expect_closed_silently();
    // A header that never ends: closed after proxy_protocol_timeout_secs.
    let started = Instant::now();
    let mut silent = Raw::tcp(port);
    silent.send_lossy(b"PROXY TCP4 203.0.113.7");
    silent.expect_closed_silently();
    assert!(started.elapsed() >= Duration::from_millis(900));

    let stats = wait_stats(&broker, |s| total(s, "connections_proxy_refused") >= 5);
    assert_eq!(total(&stats, "connections_proxy_refused"), 5, "{stats}");
    // A good header still gets in, and the broker is fine.
    let mut ok = connect_behind(port, &v1("203.0.113.9", 1), &format!("ok-{id}"), true)
        .expect("a valid header after the refusals");
    ok.ping();
    broker.assert_healthy();
}

#[test]
fn max_connections_per_ip_counts_the_header_address() {
    // Loopback is exempt (the default): every socket here comes from
    // 127.0.0.1, so only the header's address can be limited.
    let (mut broker, port) = proxied_broker("max_connections_per_ip = 2");
    let id = unique();
    let held = hold(port, "203.0.113.7", 1000, 2, &format!("ip7-{id}"));
    let third = connect_behind(port, &v1("203.0.113.7", 1002), &format!("ip7-{id}-2"), true);
    assert!(
        third.is_none(),
        "a third connection from 203.0.113.7 got in"
    );
    broker
        .wait_log(
            |l| l.contains("max_connections_per_ip (2) reached for 203.0.113.7"),
            TIMEOUT,
        )
        .expect("the refusal names the header's address");
    // Another client behind the same balancer, and a loopback one named by
    // the header (exempt), still get in.
    let mut other = connect_behind(port, &v1("203.0.113.8", 1), &format!("ip8-{id}"), true)
        .expect("another address");
    other.ping();
    let looped = hold(port, "127.0.0.5", 2000, 3, &format!("lo-{id}"));
    // One of 203.0.113.7's connections ends: its place is free again.
    drop(held);
    drop(looped);
    let deadline = Instant::now() + TIMEOUT;
    let mut again = loop {
        if let Some(raw) = connect_behind(
            port,
            &v1("203.0.113.7", 1003),
            &format!("ip7-{id}-again"),
            true,
        ) {
            break raw;
        }
        assert!(
            Instant::now() < deadline,
            "the per-address count was never freed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    again.ping();
    broker.assert_healthy();
}

#[test]
fn a_websocket_listener_reads_the_header_before_the_upgrade() {
    let mut broker = Broker::builder()
        .config("ws_listen = [{ address = \"127.0.0.1:0\", proxy_protocol = true }]")
        .start();
    let port = broker.port_of("ws+proxy");
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    socket.write_all(&v1("203.0.113.20", 5000)).unwrap();
    let mut ws = ws_over(socket, port, "mqtt");
    let id = format!("pp-ws-{}", unique());
    ws_send(&mut ws, &ConnectBuilder::new(&id).bytes());
    assert_eq!(ws_read(&mut ws, 4), CONNACK_OK);
    assert_eq!(admin_peer(&broker, &id), "203.0.113.20:5000");
    // Without the header, the upgrade request itself is refused.
    let mut raw = Raw::tcp(port);
    raw.send_lossy(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n");
    raw.expect_closed_silently();
    broker.assert_healthy();
}

/// A free loopback port (bound and released; HAProxy binds it next).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HAProxy process, killed when dropped.
struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `program` runs here (CI installs haproxy; a developer's machine
/// may lack it).
fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Starts HAProxy with `config` (written to `dir`) and waits until every
/// port of `ports` accepts connections.
fn start_haproxy(dir: &Path, config: &str, ports: &[u16]) -> Haproxy {
    let path = dir.join("haproxy.cfg");
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(config.as_bytes()))
        .expect("write haproxy.cfg");
    let check = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&path)
        .output()
        .expect("run haproxy -c");
    assert!(check.status.success(), "haproxy -c: {check:?}\n{config}");
    let child = Command::new("haproxy")
        .arg("-db") // foreground, no daemon
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start haproxy");
    let haproxy = Haproxy(child);
    let deadline = Instant::now() + TIMEOUT;
    for port in ports {
        while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "haproxy is not listening on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    haproxy
}

/// Runs mosquitto_sub as `client_id` for one message on `topic` through
/// `port`, with extra arguments (TLS).
fn mosquitto_sub(port: u16, client_id: &str, topic: &str, extra: &[&std::ffi::OsStr]) -> Child {
    Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic])
        .args(["-q", "1", "-C", "1", "-W", "10", "-i", client_id])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mosquitto_sub")
}

/// mosquitto_pub of one QoS 1 message through `port`.
fn mosquitto_pub(port: u16, topic: &str, message: &str, extra: &[&std::ffi::OsStr]) {
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic])
        .args(["-q", "1", "-m", message])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run mosquitto_pub");
    assert!(out.status.success(), "mosquitto_pub: {out:?}");
}

/// Waits until `client_id` shows in `broker`'s admin API (a subscriber is
/// connected and subscribed before the publish).
fn wait_connected(broker: &Broker, client_id: &str) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let answer =
            crate::admin::http(broker, "GET", &format!("/api/v1/clients/{client_id}"), None);
        if answer.status == 200 && answer.body.contains("\"subscriptions\":1") {
            return;
        }
        assert!(Instant::now() < deadline, "{client_id} never subscribed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn haproxy_in_front_of_two_brokers_with_send_proxy_v2_and_send_proxy() {
    if !installed("haproxy") {
        assert!(
            std::env::var_os("CI").is_none(),
            "haproxy is missing but CI installs it"
        );
        eprintln!("haproxy not installed: skipped");
        return;
    }
    let pki = Pki::new();
    // Node 1: plain MQTT behind send-proxy-v2. Node 2: plain MQTT behind
    // send-proxy (v1) and TLS behind send-proxy-v2 (HAProxy passes TLS
    // through: the header comes before the ClientHello).
    let (mut node1, node1_proxy) =
        proxied_broker("max_connections_per_ip = 2\nlimits_exempt_loopback = false");
    let tls_config = format!(
        "tls_listen = [{{ address = \"127.0.0.1:0\", proxy_protocol = true }}]\n\
         certfile = {:?}\nkeyfile = {:?}\n",
        pki.path("server.pem"),
        pki.path("server.key"),
    );
    let (mut node2, node2_proxy) = proxied_broker(&tls_config);
    let node2_tls = node2.port_of("tls+proxy");
    let (front1, front2, front2_tls) = (free_port(), free_port(), free_port());
    let config = format!(
        "global\n  maxconn 100\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend mqtt_v2\n  bind 127.0.0.1:{front1}\n  default_backend node1\n\
         backend node1\n  server n1 127.0.0.1:{node1_proxy} send-proxy-v2\n\
         frontend mqtt_v1\n  bind 127.0.0.1:{front2}\n  default_backend node2\n\
         backend node2\n  server n2 127.0.0.1:{node2_proxy} send-proxy check check-send-proxy inter 500ms\n\
         frontend mqtts\n  bind 127.0.0.1:{front2_tls}\n  default_backend node2_tls\n\
         backend node2_tls\n  server n2t 127.0.0.1:{node2_tls} send-proxy-v2\n"
    );
    let _haproxy = start_haproxy(
        pki.path("").as_path(),
        &config,
        &[front1, front2, front2_tls],
    );
    let id = unique();

    // Raw clients from 127.0.0.2 through HAProxy (which connects from
    // 127.0.0.1): each node sees 127.0.0.2 and the client's source port.
    let through = |front: u16, source: &str, client_id: &str| {
        let mut raw = Raw::tcp_from(front, source.parse().unwrap());
        raw.send_lossy(&ConnectBuilder::new(client_id).bytes());
        raw.accepted()
    };
    let mut held = Vec::new();
    for (node, front, name) in [(&node1, front1, "v2"), (&node2, front2, "v1")] {
        let client_id = format!("ha-{name}-{id}");
        let mut raw = through(front, "127.0.0.2", &client_id).expect("through haproxy");
        let own = raw.stream.local_addr().unwrap().to_string();
        assert_eq!(
            admin_peer(node, &client_id),
            own,
            "behind send-proxy {name}"
        );
        raw.ping();
        held.push(raw);
    }
    // max_connections_per_ip = 2 on node 1 counts each client behind
    // HAProxy, not HAProxy: a second client from 127.0.0.2 gets in, a third
    // does not, one from 127.0.0.3 does.
    held.push(through(front1, "127.0.0.2", &format!("ha-v2b-{id}")).expect("second"));
    assert!(
        through(front1, "127.0.0.2", &format!("ha-v2c-{id}")).is_none(),
        "a third client from 127.0.0.2 got in"
    );
    held.push(through(front1, "127.0.0.3", &format!("ha-3-{id}")).expect("another address"));
    drop(held);

    // mosquitto clients through each frontend: subscribe and publish.
    for (node, front, extra) in [
        (&node1, front1, Vec::new()),
        (&node2, front2, Vec::new()),
        (
            &node2,
            front2_tls,
            vec!["--cafile".into(), pki.path("ca.pem").into_os_string()],
        ),
    ] {
        let topic = format!("ha/{front}/{id}");
        let extra: Vec<&std::ffi::OsStr> = extra
            .iter()
            .map(|s: &std::ffi::OsString| s.as_os_str())
            .collect();
        let client_id = format!("sub-{front}-{id}");
        let sub = mosquitto_sub(front, &client_id, &topic, &extra);
        wait_connected(node, &client_id);
        mosquitto_pub(front, &topic, "through haproxy", &extra);
        let out = sub.wait_with_output().expect("mosquitto_sub output");
        assert!(out.status.success(), "mosquitto_sub via {front}: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "through haproxy"
        );
    }
    // Relayed clients all came with a header.
    let stats = get_json(&node1, "/api/v1/stats");
    assert_eq!(total(&stats, "connections_proxy_refused"), 0, "{stats}");
    node1.assert_healthy();
    node2.assert_healthy();
}
