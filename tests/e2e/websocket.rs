//! MQTT over WebSocket (and WSS): a WebSocket client from tungstenite that
//! splits and joins packets across frames, bad upgrades and frames, and
//! MQTT.js in Node and in headless Chromium (and MQTT.js speaking MQTT 5.0,
//! over TCP and WebSocket).
//!
//! The MQTT.js tests need `npm ci` in tests/node and Debian's chromium, so
//! they are `#[ignore]`d in a plain `cargo test`; `.ci/run` installs both
//! and runs them with `cargo test --test e2e websocket::mqtt_js -- --ignored`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::client::IntoClientRequest;
use async_tungstenite::tungstenite::http::HeaderValue;
use async_tungstenite::tungstenite::{self, Message, WebSocket};
use rumqttc::QoS;

use crate::common::*;
use crate::tls::Pki;

/// Config lines for a WebSocket listener on port 0.
const WS: &str = "ws_listen = [\"127.0.0.1:0\"]";

/// A WebSocket client of the broker's WS listener offering `subprotocol`.
fn ws_connect(port: u16, subprotocol: &str) -> WebSocket<TcpStream> {
    let socket = TcpStream::connect(("127.0.0.1", port)).unwrap();
    ws_over(socket, port, subprotocol)
}

/// The WebSocket upgrade over an already connected `socket`.
pub(crate) fn ws_over(socket: TcpStream, port: u16, subprotocol: &str) -> WebSocket<TcpStream> {
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    ws_upgrade(socket, port, subprotocol)
}

/// The WebSocket upgrade over any connected stream (TCP, TLS).
pub(crate) fn ws_upgrade<S: Read + Write>(socket: S, port: u16, subprotocol: &str) -> WebSocket<S> {
    let mut request = format!("ws://127.0.0.1:{port}/mqtt")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(subprotocol).unwrap(),
    );
    let (ws, response) = tungstenite::client(request, socket).expect("WebSocket upgrade");
    assert_eq!(
        response.headers().get("Sec-WebSocket-Protocol").unwrap(),
        subprotocol.split(',').next().unwrap().trim()
    );
    ws
}

/// Reads binary messages until `len` bytes arrived; returns them.
pub(crate) fn ws_read(ws: &mut WebSocket<TcpStream>, len: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < len {
        match ws.read().expect("WebSocket read") {
            Message::Binary(data) => got.extend_from_slice(&data),
            other => panic!("unexpected WebSocket message {other:?}"),
        }
    }
    got
}

/// Sends one binary message.
pub(crate) fn ws_send(ws: &mut WebSocket<TcpStream>, bytes: &[u8]) {
    ws.send(Message::binary(bytes.to_vec())).unwrap();
}

/// True once the broker ended the WebSocket connection (close frame, end of
/// stream or reset) within [`TIMEOUT`].
fn ws_closed(ws: &mut WebSocket<TcpStream>) -> bool {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Close(_)) => return true,
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
    false
}

/// Sends raw bytes to the WS port and returns everything received until
/// the broker closed the connection.
fn raw_exchange(port: u16, bytes: &[u8]) -> String {
    let mut socket = TcpStream::connect(("127.0.0.1", port)).unwrap();
    socket.write_all(bytes).unwrap();
    let mut received = Vec::new();
    expect_closed_stream(&mut socket, &mut received);
    String::from_utf8_lossy(&received).into_owned()
}

#[test]
fn packets_may_span_frames_and_frames_may_hold_several_packets() {
    let mut broker = Broker::builder().config(WS).start();
    let port = broker.port_of("ws");
    let mut ws = ws_connect(port, "mqtt");
    // CONNECT in two frames.
    let connect = ConnectBuilder::new("ws-split").bytes();
    ws_send(&mut ws, &connect[..3]);
    ws_send(&mut ws, &connect[3..]);
    assert_eq!(ws_read(&mut ws, 4), CONNACK_OK);
    // SUBSCRIBE and PINGREQ in one frame.
    let mut two = subscribe(1, &[(b"ws/t", 1)]);
    two.extend_from_slice(&PINGREQ);
    ws_send(&mut ws, &two);
    let mut expected = vec![0x90, 3, 0, 1, 1];
    expected.extend_from_slice(&PINGRESP);
    assert_eq!(ws_read(&mut ws, expected.len()), expected);

    // A publish over TCP reaches the WebSocket client, and back.
    let mut plain = Mqtt::connect(broker.port, "ws-plain");
    plain.subscribe("ws/back", QoS::AtLeastOnce);
    plain.publish_acked("ws/t", false, b"over ws");
    let publish_bytes = ws_read(&mut ws, 2);
    let mut all = publish_bytes.clone();
    all.extend(ws_read(
        &mut ws,
        usize::from(publish_bytes[1]) + 2 - all.len(),
    ));
    assert_eq!(&all[all.len() - 7..], b"over ws");
    ws_send(&mut ws, &ack(0x40, u16::from_be_bytes([all[8], all[9]])));
    ws_send(
        &mut ws,
        &publish(b"ws/back", b"from ws", 0, false, false, 0),
    );
    assert_eq!(&plain.expect_publish().payload[..], b"from ws");

    // MQTT 3.1's subprotocol name is accepted too.
    let mut old = ws_connect(port, "mqttv3.1");
    ws_send(&mut old, &ConnectBuilder::new("ws-v31").bytes());
    assert_eq!(ws_read(&mut old, 4), CONNACK_OK);
    broker.assert_healthy();
}

#[test]
fn bad_upgrades_and_text_frames_are_closed_and_the_broker_stays_up() {
    // MQTT bytes on the WebSocket port are no HTTP request: the broker
    // closes them at its connect timeout, which must come well within the
    // test's own wait for the close (both were 10 s: a race under load).
    let mut broker = Broker::builder()
        .config(&format!("{WS}\nconnect_timeout_secs = 2"))
        .start();
    let port = broker.port_of("ws");
    let mut bystander = ws_connect(port, "mqtt");
    ws_send(&mut bystander, &ConnectBuilder::new("ws-bystander").bytes());
    assert_eq!(ws_read(&mut bystander, 4), CONNACK_OK);
    ws_send(&mut bystander, &subscribe(1, &[(b"ws/bad", 0)]));
    assert_eq!(ws_read(&mut bystander, 5), [0x90, 3, 0, 1, 0]);

    // Not a WebSocket request at all.
    let plain_http = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(!plain_http.contains(" 101 "), "{plain_http}");
    // MQTT straight onto the WebSocket port.
    let mqtt = raw_exchange(port, &ConnectBuilder::new("raw-on-ws").bytes());
    assert!(!mqtt.contains(" 101 "), "{mqtt}");
    // A valid upgrade without the MQTT subprotocol: 400.
    let upgrade = |protocol: &str| {
        format!(
            "GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{protocol}\r\n"
        )
    };
    let wrong = raw_exchange(port, upgrade("Sec-WebSocket-Protocol: chat\r\n").as_bytes());
    assert!(wrong.starts_with("HTTP/1.1 400"), "{wrong}");
    let none = raw_exchange(port, upgrade("").as_bytes());
    assert!(none.starts_with("HTTP/1.1 400"), "{none}");

    // A text frame after CONNECT closes the connection (§6.0: binary only).
    let mut texter = ws_connect(port, "mqtt");
    ws_send(&mut texter, &ConnectBuilder::new("ws-texter").bytes());
    assert_eq!(ws_read(&mut texter, 4), CONNACK_OK);
    texter.send(Message::text("PINGREQ")).unwrap();
    assert!(
        ws_closed(&mut texter),
        "a text frame did not close the connection"
    );

    // The bystander lost nothing.
    let mut plain = Mqtt::connect(broker.port, "ws-bad-pub");
    plain.publish_acked("ws/bad", false, b"still here");
    let got = ws_read(&mut bystander, 2);
    let mut all = got.clone();
    all.extend(ws_read(&mut bystander, usize::from(got[1]) + 2 - all.len()));
    assert_eq!(&all[all.len() - 10..], b"still here");
    broker.assert_healthy();
}

#[test]
fn websocket_messages_are_bounded_by_max_packet_size() {
    let mut broker = Broker::builder()
        .config(&format!("{WS}\nmax_packet_size = 1024"))
        .start();
    let port = broker.port_of("ws");
    let mut ws = ws_connect(port, "mqtt");
    ws_send(&mut ws, &ConnectBuilder::new("ws-big").bytes());
    assert_eq!(ws_read(&mut ws, 4), CONNACK_OK);
    // One 5000-byte message (several valid small packets) is over the limit.
    let mut big = Vec::new();
    while big.len() < 5000 {
        big.extend_from_slice(&PINGREQ);
    }
    let _ = ws.send(Message::binary(big));
    assert!(
        ws_closed(&mut ws),
        "an oversized message did not close the connection"
    );
    broker.assert_healthy();
}

#[test]
fn a_silent_websocket_handshake_is_closed_without_stalling_others() {
    let mut broker = Broker::builder()
        .shards(1)
        .config(&format!("{WS}\nconnect_timeout_secs = 2"))
        .start();
    let port = broker.port_of("ws");
    let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut partial = TcpStream::connect(("127.0.0.1", port)).unwrap();
    partial.write_all(b"GET /mqtt HTTP/1.1\r\n").unwrap();
    let mut ws = ws_connect(port, "mqtt");
    ws_send(&mut ws, &ConnectBuilder::new("ws-quick").bytes());
    assert_eq!(ws_read(&mut ws, 4), CONNACK_OK);
    expect_closed_stream(&mut silent, &mut Vec::new());
    expect_closed_stream(&mut partial, &mut Vec::new());
    assert!(
        broker
            .wait_log(|l| l.contains("ws: no handshake within"), TIMEOUT)
            .is_some()
    );
    broker.assert_healthy();
}

/// A Node script from tests/node, killed when dropped; its stdout lines
/// arrive on a channel.
struct NodeScript {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl NodeScript {
    /// Runs `node tests/node/SCRIPT ARGS...`.
    fn start(script: &str, args: &[&str]) -> NodeScript {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/node");
        assert!(
            dir.join("node_modules/mqtt").is_dir(),
            "run `npm ci` in tests/node first (see .ci/run)"
        );
        let mut child = Command::new("node")
            .arg(dir.join(script))
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run node");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        NodeScript {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line starting with `prefix`; panics on an "error" line,
    /// an early exit or after `timeout`.
    fn expect_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(line) => {
                    assert!(!line.starts_with("error"), "{line} (after {:?})", self.seen);
                    self.seen.push(line);
                }
                Err(_) => panic!("no {prefix:?} line; got {:?}", self.seen),
            }
        }
    }

    /// Waits for the script to exit; true when it succeeded.
    fn wait_success(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for NodeScript {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// mosquitto_pub over plain TCP, QoS 1.
fn mosquitto_pub(port: u16, topic: &str, message: &str) {
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-t", topic, "-m", message])
        .stdin(Stdio::null())
        .status()
        .expect("run mosquitto_pub");
    assert!(status.success());
}

/// A Node script subscribes at `url`; mosquitto_pub publishes over TCP;
/// the script must print the message and exit 0.
fn node_receives(broker: &Broker, script: &str, url: &str, extra: &[&str], start: Duration) {
    let topic = format!("node/{}", unique());
    let mut args = vec![url, topic.as_str()];
    args.extend_from_slice(extra);
    let mut node = NodeScript::start(script, &args);
    node.expect_line("subscribed", start);
    let payload = format!("hello {script}");
    mosquitto_pub(broker.port, &topic, &payload);
    let line = node.expect_line("message", TIMEOUT);
    assert_eq!(line, format!("message {topic} {payload}"));
    assert!(node.wait_success(TIMEOUT), "{script} did not exit cleanly");
}

#[test]
#[ignore = "needs `npm ci` in tests/node; run by .ci/run"]
fn mqtt_js_in_node_receives_over_websocket() {
    let mut broker = Broker::builder().config(WS).start();
    let url = format!("ws://127.0.0.1:{}/mqtt", broker.port_of("ws"));
    node_receives(&broker, "ws_sub.mjs", &url, &[], TIMEOUT);
    broker.assert_healthy();
}

#[test]
#[ignore = "needs `npm ci` in tests/node and chromium; run by .ci/run"]
fn mqtt_js_in_chromium_receives_over_websocket() {
    let mut broker = Broker::builder().config(WS).start();
    let url = format!("ws://127.0.0.1:{}/mqtt", broker.port_of("ws"));
    node_receives(
        &broker,
        "ws_browser.mjs",
        &url,
        &[],
        Duration::from_secs(40),
    );
    broker.assert_healthy();
}

#[test]
#[ignore = "needs `npm ci` in tests/node; run by .ci/run"]
fn mqtt_js_in_node_receives_over_secure_websocket() {
    let pki = Pki::new();
    let config = pki.listener_config("wss_listen", "");
    let mut broker = Broker::builder().config(&config).start();
    let url = format!("wss://127.0.0.1:{}/mqtt", broker.port_of("wss"));
    let ca = pki.path("ca.pem");
    node_receives(
        &broker,
        "ws_sub.mjs",
        &url,
        &[ca.to_str().unwrap()],
        TIMEOUT,
    );
    broker.assert_healthy();
}

/// MQTT.js speaking MQTT 5.0 at `url`: a publisher and a subscriber on
/// different shards; the user properties, content type, response topic,
/// correlation data and the subscription's identifier reach the subscriber.
fn mqtt_js_v5_round_trip(broker: &Broker, url: &str) {
    let topic = format!("node5/{}", unique());
    let admin = format!("http://127.0.0.1:{}", broker.http_port);
    let mut node = NodeScript::start("v5_roundtrip.mjs", &[url, &admin, &topic]);
    node.expect_line("subscribed", TIMEOUT);
    let line = node.expect_line("message", TIMEOUT);
    assert_eq!(
        line,
        format!(
            "message {topic} hello v5 {{\"userProperties\":{{\"k\":\"v\",\"n\":[\"1\",\"2\"]}},\
             \"contentType\":\"text/plain\",\"responseTopic\":\"{topic}/reply\",\
             \"correlationData\":\"c-1\",\"subscriptionIdentifier\":5}}"
        )
    );
    assert!(
        node.wait_success(TIMEOUT),
        "v5_roundtrip.mjs did not exit cleanly"
    );
}

#[test]
#[ignore = "needs `npm ci` in tests/node; run by .ci/run"]
fn mqtt_js_v5_round_trip_with_properties_over_tcp_across_shards() {
    let mut broker = Broker::start();
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    mqtt_js_v5_round_trip(&broker, &url);
    broker.assert_healthy();
}

#[test]
#[ignore = "needs `npm ci` in tests/node; run by .ci/run"]
fn mqtt_js_v5_round_trip_with_properties_over_websocket_across_shards() {
    let mut broker = Broker::builder().config(WS).start();
    let url = format!("ws://127.0.0.1:{}/mqtt", broker.port_of("ws"));
    mqtt_js_v5_round_trip(&broker, &url);
    broker.assert_healthy();
}

#[test]
fn wss_carries_mqtt_over_websocket_over_tls() {
    // Without Node: a raw TLS connection, a WebSocket upgrade by hand, one
    // CONNECT frame, the CONNACK frame back.
    let pki = Pki::new();
    let config = pki.listener_config("wss_listen", "");
    let mut broker = Broker::builder().config(&config).start();
    let port = broker.port_of("wss");
    let (mut tls, _, _) = crate::tls::connect_tls(port, &pki.ca_pem, rustls::DEFAULT_VERSIONS);
    tls.write_all(
        b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Protocol: mqtt\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tls.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("ec-WebSocket-Protocol: mqtt")
            || head.contains("ec-websocket-protocol: mqtt"),
        "{head}"
    );
    // A masked binary frame with CONNECT (client frames must be masked).
    let connect = ConnectBuilder::new("wss-raw").bytes();
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x82, 0x80 | connect.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(connect.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    tls.write_all(&frame).unwrap();
    let mut reply = [0u8; 6];
    tls.read_exact(&mut reply).unwrap();
    assert_eq!(reply[..2], [0x82, 4], "one unmasked binary frame");
    assert_eq!(reply[2..], CONNACK_OK);
    broker.assert_healthy();
}

#[test]
fn a_burst_of_large_publishes_reaches_a_websocket_subscriber_whole() {
    let mut broker = Broker::builder().config(WS).start();
    let mut ws = ws_connect(broker.port_of("ws"), "mqtt");
    ws_send(&mut ws, &ConnectBuilder::new("ws-burst").bytes());
    assert_eq!(ws_read(&mut ws, 4), CONNACK_OK);
    ws_send(&mut ws, &subscribe(1, &[(b"ws/burst", 0)]));
    assert_eq!(ws_read(&mut ws, 5), [0x90, 3, 0, 1, 0]);
    let mut plain = Mqtt::connect(broker.port, "ws-burst-pub");
    let payload: Vec<u8> = (0..30_000u32).map(|i| (i % 251) as u8).collect();
    // 20 × 30 kB: under max_queued_bytes, so nothing may be dropped.
    for _ in 0..20 {
        plain.publish("ws/burst", QoS::AtMostOnce, false, &payload);
    }
    plain.publish_acked("ws/burst", false, b"end");
    // Each PUBLISH: 0x30, a 3-byte remaining length, topic (2 + 8), payload.
    let frame_len = 1 + 3 + 10 + payload.len();
    let bytes = ws_read(&mut ws, 20 * frame_len + 2 + 10 + 3);
    for i in 0..20 {
        let frame = &bytes[i * frame_len..(i + 1) * frame_len];
        assert_eq!(frame[0], 0x30, "publish {i} starts at its header");
        assert_eq!(&frame[4..14], b"\x00\x08ws/burst");
        assert_eq!(&frame[14..], &payload[..], "publish {i} is whole");
    }
    assert!(bytes.ends_with(b"end"));
    broker.assert_healthy();
}

#[test]
fn a_websocket_subscriber_that_reads_slowly_gets_whole_packets_in_order() {
    // As the TLS test of the same name: tiny socket buffers, nothing read
    // until the flood is over, so the broker's WebSocket writes must wait.
    // One shard, so the PUBACK of the last publish means every publish is
    // already queued for the subscriber (across shards they would still be
    // on their way, and the PINGRESP could overtake them).
    let mut broker = Broker::builder().shards(1).config(WS).start();
    let port = broker.port_of("ws");
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    socket.connect(&addr.into()).unwrap();
    let mut ws = ws_over(socket.into(), port, "mqtt");
    ws_send(&mut ws, &ConnectBuilder::new("slow-ws").bytes());
    assert_eq!(ws_read(&mut ws, 4), CONNACK_OK);
    ws_send(&mut ws, &subscribe(1, &[(b"slow", 0)]));
    assert_eq!(ws_read(&mut ws, 5), [0x90, 3, 0, 1, 0]);

    let mut plain = Mqtt::connect(broker.port, "slow-ws-pub");
    let payload = crate::tls::publish_slow_flood(&mut plain);
    ws_send(&mut ws, &PINGREQ);
    // Each PUBLISH: 0x30, a 3-byte remaining length, topic (2 + 4), payload.
    let frame_len = 1 + 3 + 6 + payload.len();
    let mut bytes = Vec::new();
    let mut last = None;
    let mut received = 0;
    loop {
        while bytes.len() < 2 || (bytes[0] == 0x30 && bytes.len() < frame_len) {
            bytes.extend(ws_read(&mut ws, 1));
        }
        if bytes[0] == 0xd0 {
            assert_eq!(bytes, PINGRESP, "PINGRESP is the last packet");
            break;
        }
        let frame: Vec<u8> = bytes.drain(..frame_len).collect();
        assert_eq!(
            frame[0], 0x30,
            "a packet boundary after {received} publishes"
        );
        crate::tls::check_slow_publish(&frame[4..], &payload, &mut last);
        received += 1;
    }
    assert!(received > 0 && received < 200, "{received} publishes");
    broker.assert_healthy();
}

#[test]
fn mqtt_5_over_websocket_and_its_take_over_disconnect() {
    let broker = Broker::builder().config(WS).start();
    let port = broker.port_of("ws");
    let mut ws = ws_connect(port, "mqtt");
    // CONNECT (level 5, clean start, no properties), SUBSCRIBE QoS 1.
    let mut body = string(b"MQTT");
    body.extend([5, 0x02, 0, 60, 0]);
    body.extend(string(b"ws5"));
    ws_send(&mut ws, &packet(0x10, &body));
    // One WebSocket message holds the whole CONNACK (with its properties).
    let connack = ws_read(&mut ws, 2);
    assert_eq!(connack[0], 0x20);
    assert_eq!(connack.len(), 2 + usize::from(connack[1]));
    assert_eq!(connack[3], 0, "CONNACK Success");
    let mut body = vec![0, 1, 0];
    body.extend(string(b"ws5/t"));
    body.push(1);
    ws_send(&mut ws, &packet(0x82, &body));
    assert_eq!(ws_read(&mut ws, 6), vec![0x90, 4, 0, 1, 0, 1]);
    let publisher = Mqtt::connect(broker.port, "ws5-pub");
    publisher.publish("ws5/t", QoS::AtLeastOnce, false, b"hi");
    // The MQTT 5.0 PUBLISH: packet id 1, then no properties.
    let mut expected = vec![0x32, 12];
    expected.extend(string(b"ws5/t"));
    expected.extend([0, 1, 0]);
    expected.extend(b"hi");
    assert_eq!(ws_read(&mut ws, expected.len()), expected);
    // Taken over from a TCP connection: DISCONNECT 0x8E, then the close.
    let mut raw = Raw::tcp(broker.port);
    let mut body = string(b"MQTT");
    body.extend([5, 0x02, 0, 60, 0]);
    body.extend(string(b"ws5"));
    raw.send(&packet(0x10, &body));
    assert_eq!(raw.expect_packet().kind(), 2);
    assert_eq!(ws_read(&mut ws, 3), vec![0xe0, 1, 0x8e]);
    assert!(ws_closed(&mut ws));
}
