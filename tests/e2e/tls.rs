//! MQTT over TLS: certificates made at test time (rcgen), clients written by
//! others (rumqttc over rustls, mosquitto_sub/mosquitto_pub over OpenSSL, a
//! bare rustls client), client-certificate verification, a slow handshake
//! that must not stall other clients, certificate reload on SIGHUP, and
//! garbage on the TLS port.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rumqttc::{MqttOptions, QoS, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::common::*;

/// A test CA, certificates it signed, and their PEM files in a temporary
/// directory (removed when dropped).
pub struct Pki {
    /// Where the PEM files are.
    pub dir: tempfile::TempDir,
    /// The CA, for signing.
    ca: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate (PEM).
    pub ca_pem: String,
}

impl Pki {
    /// A rumqttc client over TLS to `port` trusting this CA, without a
    /// client certificate; waits for CONNACK (panics on refusal).
    pub fn client(&self, port: u16, client_id: &str) -> (Mqtt, rumqttc::ConnAck) {
        Mqtt::connect_with(tls_options(port, client_id, &self.ca_pem, None))
    }

    /// A fresh CA (ca.pem) and a server certificate for 127.0.0.1 and
    /// localhost with CN "server-one" (server.pem, server.key).
    pub fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "fanmq test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_pem = ca.pem();
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca,
            ca_pem,
        };
        std::fs::write(pki.path("ca.pem"), &pki.ca_pem).unwrap();
        pki.write("server", "server-one", true);
        pki
    }

    /// A file in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A certificate with Common Name `cn` signed by the CA (for a server:
    /// valid for 127.0.0.1 and localhost), as PEM (certificate, key).
    pub fn issue(&self, cn: &str, server: bool) -> (String, String) {
        let names: Vec<String> = if server {
            vec!["127.0.0.1".into(), "localhost".into()]
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Issues a certificate and writes it to `name.pem` / `name.key`.
    pub fn write(&self, name: &str, cn: &str, server: bool) -> (String, String) {
        let (cert, key) = self.issue(cn, server);
        std::fs::write(self.path(&format!("{name}.pem")), &cert).unwrap();
        std::fs::write(self.path(&format!("{name}.key")), &key).unwrap();
        (cert, key)
    }

    /// Config lines: a TLS listener on port 0 with the server certificate.
    pub fn config(&self, extra: &str) -> String {
        self.listener_config("tls_listen", extra)
    }

    /// Broker config with one `listener_key` (`tls_listen`, `wss_listen`)
    /// listener on a free loopback port using the server certificate, plus
    /// `extra`.
    pub fn listener_config(&self, listener_key: &str, extra: &str) -> String {
        format!(
            "{listener_key} = [\"127.0.0.1:0\"]\ncertfile = {:?}\nkeyfile = {:?}\n{extra}\n",
            self.path("server.pem"),
            self.path("server.key"),
        )
    }
}

/// A self-signed client certificate (no CA vouches for it): (cert, key) PEM.
fn self_signed_client(cn: &str) -> (String, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// rumqttc options for a TLS client trusting `ca_pem`, with an optional
/// client certificate (cert, key PEM).
pub fn tls_options(
    port: u16,
    client_id: &str,
    ca_pem: &str,
    client: Option<(String, String)>,
) -> MqttOptions {
    let mut options = Mqtt::options(port, client_id);
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca: ca_pem.as_bytes().to_vec(),
        alpn: None,
        client_auth: client.map(|(cert, key)| (cert.into_bytes(), key.into_bytes())),
    }));
    options
}

/// A bare rustls client's handshake with the broker: the server's leaf
/// certificate (DER) and the protocol version agreed.
fn handshake(
    port: u16,
    ca_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> (Vec<u8>, rustls::ProtocolVersion) {
    let (_, leaf, version) = connect_tls(port, ca_pem, versions);
    (leaf, version)
}

/// A TLS connection made with a bare rustls client: the stream, the
/// server's leaf certificate (DER) and the protocol version agreed.
pub fn connect_tls(
    port: u16,
    ca_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> (
    rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    Vec<u8>,
    rustls::ProtocolVersion,
) {
    let socket = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tls_over(socket, ca_pem, versions)
}

/// A rustls client handshake over an already connected `socket`.
fn tls_over(
    mut socket: TcpStream,
    ca_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> (
    rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    Vec<u8>,
    rustls::ProtocolVersion,
) {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut socket).expect("TLS handshake");
    }
    let leaf = conn.peer_certificates().expect("server certificate")[0].to_vec();
    let version = conn.protocol_version().expect("version");
    (rustls::StreamOwned::new(conn, socket), leaf, version)
}

/// The DER of the first certificate in a PEM text.
fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[test]
fn tls_clients_exchange_qos0_and_qos1_with_plain_tcp_clients() {
    let pki = Pki::new();
    let mut broker = Broker::builder().config(&pki.config("")).start();
    let tls = broker.port_of("tls");
    assert_ne!(tls, broker.port);
    let id = unique();

    // TLS subscriber, plain publisher.
    let (mut secure, _) = pki.client(tls, &format!("tls-sub-{id}"));
    let topic = format!("tls/{id}/down");
    assert_eq!(
        secure.subscribe(&topic, QoS::AtLeastOnce),
        vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let mut plain = Mqtt::connect(broker.port, &format!("plain-{id}"));
    plain.publish(&topic, QoS::AtMostOnce, false, b"zero");
    plain.publish_acked(&topic, false, b"one");
    let first = secure.expect_publish();
    let second = secure.expect_publish();
    assert_eq!(
        (&first.payload[..], first.qos),
        (&b"zero"[..], QoS::AtMostOnce)
    );
    assert_eq!(
        (&second.payload[..], second.qos),
        (&b"one"[..], QoS::AtLeastOnce)
    );

    // Plain subscriber, TLS publisher (QoS 1 acknowledged over TLS).
    let up = format!("tls/{id}/up");
    plain.subscribe(&up, QoS::AtLeastOnce);
    secure.publish(&up, QoS::AtMostOnce, false, b"zero");
    secure.publish_acked(&up, false, b"one");
    let payloads: Vec<Vec<u8>> = (0..2)
        .map(|_| plain.expect_publish().payload.to_vec())
        .collect();
    assert_eq!(payloads, vec![b"zero".to_vec(), b"one".to_vec()]);

    // A burst larger than one TLS record and than the socket's buffer.
    let burst = format!("tls/{id}/burst");
    secure.subscribe(&burst, QoS::AtMostOnce);
    let payload = vec![7u8; 30_000];
    // 20 × 30 kB: well under max_queued_bytes, so nothing may be dropped.
    for _ in 0..20 {
        plain.publish(&burst, QoS::AtMostOnce, false, &payload);
    }
    plain.publish_acked(&burst, false, b"end");
    for _ in 0..20 {
        assert_eq!(secure.expect_publish().payload[..], payload[..]);
    }
    assert_eq!(&secure.expect_publish().payload[..], b"end");
    broker.assert_healthy();
}

#[test]
fn tls_1_2_and_1_3_are_offered() {
    let pki = Pki::new();
    let broker = Broker::builder().config(&pki.config("")).start();
    let tls = broker.port_of("tls");
    let (_, v13) = handshake(tls, &pki.ca_pem, &[&rustls::version::TLS13]);
    assert_eq!(v13, rustls::ProtocolVersion::TLSv1_3);
    let (_, v12) = handshake(tls, &pki.ca_pem, &[&rustls::version::TLS12]);
    assert_eq!(v12, rustls::ProtocolVersion::TLSv1_2);
}

#[test]
fn mosquitto_clients_talk_over_tls() {
    let pki = Pki::new();
    let mut broker = Broker::builder().config(&pki.config("")).start();
    let tls = broker.port_of("tls").to_string();
    let id = unique();
    let ca = pki.path("ca.pem");

    // mosquitto_sub over TLS receives a retained message published over TCP.
    let topic = format!("tls/{id}/retained");
    let mut plain = Mqtt::connect(broker.port, &format!("plain-{id}"));
    plain.publish_acked(&topic, true, b"hello over tls");
    let out = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &tls,
            "-t",
            &topic,
            "-C",
            "1",
            "-W",
            "10",
        ])
        .arg("--cafile")
        .arg(&ca)
        .stdin(Stdio::null())
        .output()
        .expect("run mosquitto_sub");
    assert!(out.status.success(), "mosquitto_sub: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello over tls"
    );

    // mosquitto_pub over TLS reaches a plain subscriber.
    let topic = format!("tls/{id}/pub");
    plain.subscribe(&topic, QoS::AtLeastOnce);
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &tls, "-t", &topic, "-q", "1"])
        .args(["-m", "from mosquitto_pub"])
        .arg("--cafile")
        .arg(&ca)
        .stdin(Stdio::null())
        .status()
        .expect("run mosquitto_pub");
    assert!(status.success());
    assert_eq!(&plain.expect_publish().payload[..], b"from mosquitto_pub");
    broker.assert_healthy();
}

#[test]
fn client_certificates_are_required_and_verified() {
    let pki = Pki::new();
    let config = pki.config(&format!(
        "cafile = {:?}\nrequire_certificate = true",
        pki.path("ca.pem")
    ));
    let mut broker = Broker::builder().config(&config).start();
    let tls = broker.port_of("tls");
    let id = unique();

    // Signed by the CA: accepted, and its CN is the connection's identity.
    let alice = pki.issue("alice", false);
    let (mut client, _) = Mqtt::connect_with(tls_options(
        tls,
        &format!("alice-{id}"),
        &pki.ca_pem,
        Some(alice),
    ));
    assert!(
        broker
            .wait_log(
                |l| l.contains(&format!("client alice-{id} connected")),
                TIMEOUT
            )
            .expect("connect logged")
            .contains("TLS identity \"alice\""),
    );
    let topic = format!("tls/{id}/cert");
    client.subscribe(&topic, QoS::AtLeastOnce);
    client.publish_acked(&topic, false, b"mine");
    assert_eq!(&client.expect_publish().payload[..], b"mine");

    // No certificate, or one no CA vouches for: the handshake fails.
    let none = Mqtt::try_connect(tls_options(tls, &format!("none-{id}"), &pki.ca_pem, None));
    assert!(none.is_err(), "a client without certificate got in");
    let forged = Mqtt::try_connect(tls_options(
        tls,
        &format!("forged-{id}"),
        &pki.ca_pem,
        Some(self_signed_client("alice")),
    ));
    assert!(forged.is_err(), "a self-signed client certificate got in");

    // The accepted client lost nothing.
    client.publish_acked(&topic, false, b"still here");
    assert_eq!(&client.expect_publish().payload[..], b"still here");
    broker.assert_healthy();
}

#[test]
fn a_slow_tls_handshake_does_not_stall_other_clients() {
    let pki = Pki::new();
    let mut broker = Broker::builder()
        .shards(1)
        .config(&pki.config("connect_timeout_secs = 2"))
        .start();
    let tls = broker.port_of("tls");
    let id = unique();

    // One client opens TCP and sends nothing, another one byte of a
    // ClientHello, on the one shard every client shares.
    let mut silent = TcpStream::connect(("127.0.0.1", tls)).unwrap();
    let mut partial = TcpStream::connect(("127.0.0.1", tls)).unwrap();
    partial.write_all(&[0x16]).unwrap();

    let (mut client, _) = pki.client(tls, &format!("fast-{id}"));
    let topic = format!("tls/{id}/fast");
    client.subscribe(&topic, QoS::AtLeastOnce);
    let mut plain = Mqtt::connect(broker.port, &format!("plain-{id}"));
    plain.publish_acked(&topic, false, b"not stalled");
    assert_eq!(&client.expect_publish().payload[..], b"not stalled");

    // Both stalled handshakes are closed by the connect timeout.
    let started = Instant::now();
    expect_closed_stream(&mut silent, &mut Vec::new());
    expect_closed_stream(&mut partial, &mut Vec::new());
    assert!(started.elapsed() < Duration::from_secs(8));
    assert!(
        broker
            .wait_log(|l| l.contains("tls: no handshake within"), TIMEOUT)
            .is_some()
    );
    broker.assert_healthy();
}

#[test]
fn certificates_are_reloaded_on_sighup_and_a_bad_file_keeps_the_old_ones() {
    let pki = Pki::new();
    let broker = Broker::builder().config(&pki.config("")).start();
    let tls = broker.port_of("tls");
    let one = std::fs::read_to_string(pki.path("server.pem")).unwrap();
    let (leaf, _) = handshake(tls, &pki.ca_pem, rustls::DEFAULT_VERSIONS);
    assert_eq!(leaf, der(&one));

    // A client connected before the reload keeps its connection.
    let id = unique();
    let (mut before, _) = pki.client(tls, &format!("before-{id}"));

    let (two, _) = pki.write("server", "server-two", true);
    broker.signal(libc::SIGHUP);
    assert!(
        broker
            .wait_log(|l| l.contains("TLS certificates reloaded"), TIMEOUT)
            .is_some()
    );
    let (leaf, _) = handshake(tls, &pki.ca_pem, rustls::DEFAULT_VERSIONS);
    assert_eq!(leaf, der(&two), "new connections get the new certificate");

    std::fs::write(pki.path("server.pem"), "not a certificate").unwrap();
    broker.signal(libc::SIGHUP);
    assert!(
        broker
            .wait_log(|l| l.contains("TLS certificates not reloaded"), TIMEOUT)
            .is_some()
    );
    let (leaf, _) = handshake(tls, &pki.ca_pem, rustls::DEFAULT_VERSIONS);
    assert_eq!(leaf, der(&two), "a bad file keeps the old certificate");

    let topic = format!("tls/{id}/reload");
    before.subscribe(&topic, QoS::AtLeastOnce);
    before.publish_acked(&topic, false, b"kept");
    assert_eq!(&before.expect_publish().payload[..], b"kept");
}

#[test]
fn garbage_on_the_tls_port_is_closed_and_the_broker_stays_up() {
    let pki = Pki::new();
    let mut broker = Broker::builder().config(&pki.config("")).start();
    let tls = broker.port_of("tls");
    let id = unique();
    let (mut client, _) = pki.client(tls, &format!("bystander-{id}"));
    let topic = format!("tls/{id}/garbage");
    client.subscribe(&topic, QoS::AtLeastOnce);

    // Plain MQTT, HTTP and random bytes on the TLS port.
    let garbage: [&[u8]; 3] = [
        &ConnectBuilder::new("plain-on-tls").bytes(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        &[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    ];
    for bytes in garbage {
        let mut socket = TcpStream::connect(("127.0.0.1", tls)).unwrap();
        socket.write_all(bytes).unwrap();
        let mut received = Vec::new();
        expect_closed_stream(&mut socket, &mut received);
        // At most a TLS alert came back, never an MQTT packet.
        assert!(received.is_empty() || received[0] == 0x15, "{received:?}");
    }
    let mut plain = Mqtt::connect(broker.port, &format!("plain-{id}"));
    plain.publish_acked(&topic, false, b"after garbage");
    assert_eq!(&client.expect_publish().payload[..], b"after garbage");
    broker.assert_healthy();
}

#[test]
fn a_tls_client_gets_its_connack_refusal() {
    // Refusals are written through the TLS stream too: CONNACK 2 for an
    // empty client id with CleanSession 0 (§3.1.3.1).
    let pki = Pki::new();
    let mut broker = Broker::builder().config(&pki.config("")).start();
    let tls = broker.port_of("tls");
    let (mut stream, _, _) = connect_tls(tls, &pki.ca_pem, rustls::DEFAULT_VERSIONS);
    stream
        .write_all(&ConnectBuilder::new("").clean_session(false).bytes())
        .unwrap();
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 2]);
    let mut rest = Vec::new();
    // The broker closes after the refusal (without close_notify: an error
    // or an end of stream, both fine; never more bytes).
    let _ = stream.read_to_end(&mut rest);
    assert!(rest.is_empty());
    broker.assert_healthy();
}

#[test]
fn the_certificate_identity_is_the_username_for_authentication_and_acls() {
    // use_identity_as_username: the client certificate's CN logs the client
    // in (no password file entry needed) and is the ACL's user name.
    let pki = Pki::new();
    let acl = pki.path("acl");
    std::fs::write(&acl, "user alice\ntopic readwrite alice/#\n").unwrap();
    let config = pki.config(&format!(
        "cafile = {:?}\nrequire_certificate = true\nuse_identity_as_username = true\n\
         allow_anonymous = false\nacl_file = {:?}",
        pki.path("ca.pem"),
        acl
    ));
    let mut broker = Broker::builder().config(&config).start();
    let tls = broker.port_of("tls");
    let id = unique();

    let (mut alice, _) = Mqtt::connect_with(tls_options(
        tls,
        &format!("alice-{id}"),
        &pki.ca_pem,
        Some(pki.issue("alice", false)),
    ));
    assert_eq!(
        alice.subscribe_many(&[("alice/in", QoS::AtLeastOnce), ("bob/in", QoS::AtLeastOnce)]),
        vec![
            rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce),
            rumqttc::SubscribeReasonCode::Failure,
        ],
        "the ACL applies to the certificate's CN"
    );
    alice.publish_acked("alice/in", false, b"for alice");
    assert_eq!(&alice.expect_publish().payload[..], b"for alice");

    // Without a certificate there is no identity: an anonymous plain TCP
    // client is refused with CONNACK 5.
    let (_, connack) = Raw::connect_with(broker.port, &ConnectBuilder::new("anon"));
    assert_eq!(connack, [0x20, 2, 0, 5]);
    broker.assert_running();
}

#[test]
fn max_connections_counts_tls_and_websocket_connections_too() {
    let pki = Pki::new();
    let config = pki.config("max_connections = 1\nws_listen = [\"127.0.0.1:0\"]");
    let mut broker = Broker::builder().config(&config).start();
    let (mut only, _) = pki.client(broker.port_of("tls"), "the-only-one");
    // Every other listener now accepts and closes at once.
    for port in [broker.port_of("tls"), broker.port_of("ws"), broker.port] {
        let mut socket = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut received = Vec::new();
        expect_closed_stream(&mut socket, &mut received);
        assert!(received.is_empty(), "{received:?}");
    }
    only.subscribe("only/t", QoS::AtLeastOnce);
    only.publish_acked("only/t", false, b"alone");
    assert_eq!(&only.expect_publish().payload[..], b"alone");
    broker.assert_running();
}

#[test]
fn sys_topics_count_tls_clients_and_reach_them() {
    let pki = Pki::new();
    let broker = Broker::builder()
        .config(&pki.config("sys_interval_secs = 1"))
        .start();
    let (mut client, _) = pki.client(broker.port_of("tls"), "sys-reader");
    client.subscribe("$SYS/broker/clients/connected", QoS::AtMostOnce);
    // The first update may predate this client; wait for one that counts it.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let p = client
            .recv_publish(deadline.saturating_duration_since(Instant::now()))
            .expect("a $SYS update");
        if &p.payload[..] == b"1" {
            break;
        }
    }
}

#[test]
fn a_tls_subscriber_that_reads_slowly_gets_whole_packets_in_order() {
    // The subscriber's socket buffers are tiny and it reads nothing until
    // the flood is over, so the broker's TLS writes must wait for the socket
    // (the framed write path's pending case). What arrives must be whole
    // packets in order (the broker may drop whole messages past
    // max_queued_bytes, never parts of one).
    // One shard, so the PUBACK of the last publish means every publish is
    // already queued for the subscriber, before the PINGRESP.
    let pki = Pki::new();
    let broker = Broker::builder().shards(1).config(&pki.config("")).start();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], broker.port_of("tls")).into();
    socket.connect(&addr.into()).unwrap();
    let (mut stream, _, _) = tls_over(socket.into(), &pki.ca_pem, rustls::DEFAULT_VERSIONS);
    stream
        .write_all(&ConnectBuilder::new("slow-tls").bytes())
        .unwrap();
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).unwrap();
    assert_eq!(connack, CONNACK_OK);
    stream.write_all(&subscribe(1, &[(b"slow", 0)])).unwrap();
    let mut suback = [0u8; 5];
    stream.read_exact(&mut suback).unwrap();

    let mut plain = Mqtt::connect(broker.port, "slow-tls-pub");
    let payload = publish_slow_flood(&mut plain);
    // PINGRESP is queued after everything the broker kept for us.
    stream.write_all(&PINGREQ).unwrap();
    let mut last = None;
    let mut received = 0;
    loop {
        let mut head = [0u8; 1];
        stream.read_exact(&mut head).unwrap();
        if head[0] == 0xd0 {
            let mut zero = [0u8; 1];
            stream.read_exact(&mut zero).unwrap();
            assert_eq!(zero, [0]);
            break;
        }
        assert_eq!(
            head[0], 0x30,
            "a packet boundary after {received} publishes"
        );
        let mut len = 0usize;
        let mut shift = 0;
        loop {
            let mut b = [0u8; 1];
            stream.read_exact(&mut b).unwrap();
            len |= usize::from(b[0] & 0x7f) << shift;
            shift += 7;
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).unwrap();
        check_slow_publish(&body, &payload, &mut last);
        received += 1;
    }
    // Some arrived; not all, or the socket never filled and the test did
    // not exercise the waiting writes it is about.
    assert!(received > 0 && received < 200, "{received} publishes");
}

#[test]
fn metrics_count_connections_per_transport() {
    let pki = Pki::new();
    let broker = Broker::builder()
        .config(&pki.config("ws_listen = [\"127.0.0.1:0\"]"))
        .start();
    let (_secure, _) = pki.client(broker.port_of("tls"), "metrics-tls");
    let _plain = Mqtt::connect(broker.port, "metrics-plain");
    let url = format!("http://127.0.0.1:{}/metrics", broker.http_port);
    let expected = [
        "fanmq_connections{listener=\"mqtt\"} 1",
        "fanmq_connections{listener=\"tls\"} 1",
        "fanmq_connections{listener=\"ws\"} 0",
        "fanmq_connections_accepted_total{listener=\"tls\"} 1",
    ];
    // Shards refresh their figures every 500 ms.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = ureq::get(&url)
            .call()
            .expect("GET /metrics")
            .body_mut()
            .read_to_string()
            .expect("metrics text");
        if expected.iter().all(|line| text.lines().any(|l| l == *line)) {
            break;
        }
        assert!(Instant::now() < deadline, "{expected:?} not all in\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The admin API finds a TLS client's address like a plain one's.
    let url = format!(
        "http://127.0.0.1:{}/api/v1/clients/metrics-tls",
        broker.http_port
    );
    let body = ureq::get(&url)
        .call()
        .expect("GET client")
        .body_mut()
        .read_to_string()
        .expect("client JSON");
    let client: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert!(
        client["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{body}"
    );
}

/// The slow-reader tests' flood: 200 QoS 0 publishes to `slow` of a 30 kB
/// payload numbered in its first 4 bytes, then a QoS 1 publish to
/// `slow-done` whose PUBACK says they were all taken. Returns the payload.
pub fn publish_slow_flood(plain: &mut Mqtt) -> Vec<u8> {
    let payload: Vec<u8> = (0..30_000u32).map(|i| (i % 251) as u8).collect();
    for n in 0..200u32 {
        let mut numbered = payload.clone();
        numbered[..4].copy_from_slice(&n.to_be_bytes());
        plain.publish("slow", QoS::AtMostOnce, false, &numbered);
    }
    plain.publish_acked("slow-done", false, b"");
    payload
}

/// Checks one PUBLISH body (after the fixed header) of the slow-reader
/// tests: topic `slow`, a payload that is `payload` with its first 4 bytes
/// replaced by a number, whole, and numbered after `last`.
pub fn check_slow_publish(body: &[u8], payload: &[u8], last: &mut Option<u32>) {
    assert_eq!(&body[..6], b"\x00\x04slow");
    let n = u32::from_be_bytes(body[6..10].try_into().unwrap());
    assert_eq!(&body[10..], &payload[4..], "publish {n} is whole");
    assert!(last.is_none_or(|l| n > l), "publish {n} after {last:?}");
    *last = Some(n);
}

#[test]
fn mosquitto_v5_clients_talk_over_tls() {
    let pki = Pki::new();
    let mut broker = Broker::builder().config(&pki.config("")).start();
    let tls = broker.port_of("tls").to_string();
    let ca = pki.path("ca.pem");
    let mut plain = Mqtt::connect(broker.port, "plain-v3");
    plain.publish_acked("tls5/retained", true, b"to a v5 client over tls");
    let out = Command::new("mosquitto_sub")
        .args([
            "-V",
            "5",
            "-h",
            "127.0.0.1",
            "-p",
            &tls,
            "-t",
            "tls5/retained",
        ])
        .args(["-C", "1", "-W", "10", "-F", "%r %p"])
        .arg("--cafile")
        .arg(&ca)
        .stdin(Stdio::null())
        .output()
        .expect("run mosquitto_sub");
    assert!(out.status.success(), "mosquitto_sub: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1 to a v5 client over tls",
        "retained, over MQTT 5.0 and TLS"
    );
    plain.subscribe("tls5/pub", QoS::AtLeastOnce);
    let status = Command::new("mosquitto_pub")
        .args(["-V", "5", "-h", "127.0.0.1", "-p", &tls, "-t", "tls5/pub"])
        .args(["-q", "2", "-m", "from a v5 client over tls"])
        .arg("--cafile")
        .arg(&ca)
        .stdin(Stdio::null())
        .status()
        .expect("run mosquitto_pub");
    assert!(status.success());
    assert_eq!(
        &plain.expect_publish().payload[..],
        b"from a v5 client over tls"
    );
    broker.assert_healthy();
}
