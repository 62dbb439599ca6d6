//! Authentication and ACLs: password files made by the real
//! `mosquitto_passwd` and by `fanmq passwd`, CONNACK 5 refusals, ACL checks
//! on PUBLISH and SUBSCRIBE (`pattern` with `%c`/`%u`), wills, SIGHUP reload,
//! and the `$SYS` counters.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rumqttc::{QoS, SubscribeReasonCode};

use crate::common::{Broker, ConnectBuilder, Mqtt, Raw, TIMEOUT, topics, unique};

/// CONNACK "not authorised" (what Mosquitto 2.x answers every refusal with).
const CONNACK_NOT_AUTHORISED: [u8; 4] = [0x20, 0x02, 0x00, 0x05];
/// CONNACK accepted, no session present.
const CONNACK_ACCEPTED: [u8; 4] = [0x20, 0x02, 0x00, 0x00];

/// Runs `mosquitto_passwd -b` (creating the file with `-c` when `create`).
fn mosquitto_passwd(file: &Path, create: bool, user: &str, password: &str) {
    let mut cmd = Command::new("mosquitto_passwd");
    if create {
        cmd.arg("-c");
    }
    let status = cmd
        .arg("-b")
        .arg(file)
        .args([user, password])
        .stdout(Stdio::null())
        .status()
        .expect("run mosquitto_passwd (Debian package mosquitto)");
    assert!(status.success(), "mosquitto_passwd failed");
}

/// Runs `fanmq passwd` with `args`; panics unless it succeeds.
fn fanmq_passwd(args: &[&str], file: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_fanmq"))
        .arg("passwd")
        .args(&args[..args.len() - 2])
        .arg(file)
        .args(&args[args.len() - 2..])
        .output()
        .expect("run fanmq passwd");
    assert!(
        out.status.success(),
        "fanmq passwd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A raw CONNECT with optional credentials; returns the client and CONNACK.
fn raw_connect(port: u16, id: &str, user: Option<&str>, password: Option<&str>) -> (Raw, Vec<u8>) {
    let mut connect = ConnectBuilder::new(id);
    connect.username = user.map(|u| u.as_bytes().to_vec());
    connect.password = password.map(|p| p.as_bytes().to_vec());
    Raw::connect_with(port, &connect)
}

/// A `rumqttc` client logged in as `user`; panics when refused.
fn login(port: u16, id: &str, user: &str, password: &str) -> Mqtt {
    let mut options = Mqtt::options(port, id);
    options.set_credentials(user, password);
    Mqtt::connect_with(options).0
}

/// bob (who may read everything) subscribed to `#` at `qos` and to the
/// `$SYS` filter `sys` at QoS 0 (a `$` topic needs its own filter); both
/// granted.
fn bob_watching(port: u16, qos: QoS, sys: &str) -> Mqtt {
    let mut bob = login(port, "bob-watch", "bob", "b");
    assert_eq!(
        bob.subscribe_many(&[("#", qos), (sys, QoS::AtMostOnce)]),
        vec![
            SubscribeReasonCode::Success(qos),
            SubscribeReasonCode::Success(QoS::AtMostOnce)
        ]
    );
    bob
}

/// `rumqttc` is refused (its error names the refusal).
fn login_refused(port: u16, user: &str, password: &str) -> String {
    let mut options = Mqtt::options(port, &format!("refused-{}", unique()));
    options.set_credentials(user, password);
    match Mqtt::try_connect(options) {
        Ok(_) => panic!("{user} with password {password:?} was accepted"),
        Err(e) => e,
    }
}

/// A logged-in client can publish to itself and receive it: the broker is up
/// and still serves clients.
fn assert_serving(broker: &mut Broker, user: &str, password: &str) {
    broker.assert_running();
    let id = format!("healthy-{}", unique());
    let mut client = login(broker.port, &id, user, password);
    let topic = format!("{user}/healthy/{id}");
    assert_eq!(
        client.subscribe(&topic, QoS::AtLeastOnce),
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    client.publish(&topic, QoS::AtLeastOnce, false, b"ok");
    assert_eq!(client.expect_publish().topic, topic);
}

/// The broker's config text for these files.
fn config(password_file: Option<&Path>, acl_file: Option<&Path>, extra: &str) -> String {
    let mut text = String::from("sys_interval_secs = 1\n");
    if let Some(p) = password_file {
        text.push_str(&format!("password_file = {:?}\n", p.display().to_string()));
    }
    if let Some(p) = acl_file {
        text.push_str(&format!("acl_file = {:?}\n", p.display().to_string()));
    }
    text.push_str(extra);
    text
}

/// Waits until a retained `$SYS` topic carries a value `ok` accepts.
pub(crate) fn wait_sys(client: &mut Mqtt, topic: &str, ok: impl Fn(u64) -> bool) -> u64 {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while std::time::Instant::now() < deadline {
        if let Some(p) = client.recv_publish(Duration::from_secs(2))
            && p.topic == topic
        {
            let value: u64 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
            if ok(value) {
                return value;
            }
        }
    }
    panic!("{topic} never reached the expected value");
}

#[test]
fn mosquitto_passwd_file_accepts_right_passwords_and_refuses_with_connack_5() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    mosquitto_passwd(&file, true, "alice", "secret");
    mosquitto_passwd(&file, false, "bob", "b0b pass");
    let mut broker = Broker::builder()
        .config(&config(Some(&file), None, ""))
        .start();
    let port = broker.port;

    // Real clients with the right password.
    let mut watcher = login(port, "watcher", "alice", "secret");
    let _bob = login(port, "bob-1", "bob", "b0b pass");
    let ok = Command::new("mosquitto_pub")
        .args([
            "-p",
            &port.to_string(),
            "-h",
            "127.0.0.1",
            "-u",
            "alice",
            "-P",
            "secret",
        ])
        .args(["-t", "t", "-m", "x", "-q", "1"])
        .status()
        .expect("run mosquitto_pub");
    assert!(ok.success(), "mosquitto_pub with the right password failed");
    let refused = Command::new("mosquitto_pub")
        .args([
            "-p",
            &port.to_string(),
            "-h",
            "127.0.0.1",
            "-u",
            "alice",
            "-P",
            "wrong",
        ])
        .args(["-t", "t", "-m", "x"])
        .stderr(Stdio::piped())
        .output()
        .expect("run mosquitto_pub");
    assert!(!refused.status.success(), "wrong password accepted");
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .to_lowercase()
            .contains("refused"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let e = login_refused(port, "alice", "Secret");
    assert!(e.contains("NotAuthorized"), "{e}");

    // Raw: the CONNACK code byte for each refusal, then the socket closes.
    for (user, password) in [
        (Some("alice"), Some("wrong")),
        (Some("nobody"), Some("secret")),
        (Some("alice"), None),
        (None, None),
    ] {
        let (raw, connack) = raw_connect(port, "raw", user, password);
        assert_eq!(connack, CONNACK_NOT_AUTHORISED, "{user:?} {password:?}");
        raw.expect_closed();
        broker.assert_running();
    }
    let (_raw, connack) = raw_connect(port, "raw-ok", Some("alice"), Some("secret"));
    assert_eq!(connack, CONNACK_ACCEPTED);

    // Refusals are logged (peer, client id, user; never the password; at
    // most one line per shard every 10 s, src/observe/log_limit.rs) and all
    // counted in $SYS: 1 mosquitto_pub + 1 rumqttc + 4 raw. The first
    // refusal (mosquitto_pub's, user alice) is the first of its shard, so
    // it is logged; the other shard may log another one of the six.
    let line = broker
        .wait_log(
            |l| {
                l.contains(") refused: ")
                    && l.contains("CONNACK 5")
                    && l.contains("(user \"alice\")")
            },
            TIMEOUT,
        )
        .expect("refusal log line");
    assert!(line.contains("127.0.0.1:"), "{line}");
    assert!(line.contains(" (user \"alice\") refused"), "{line}");
    assert!(!broker.log_text().contains("wrong\""), "password logged");
    assert_eq!(
        watcher.subscribe("$SYS/broker/clients/auth_failed", QoS::AtMostOnce),
        vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    wait_sys(&mut watcher, "$SYS/broker/clients/auth_failed", |v| v == 6);
    assert_serving(&mut broker, "bob", "b0b pass");
}

#[test]
fn fanmq_passwd_file_is_accepted_and_anonymous_can_be_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    fanmq_passwd(&["-c", "-b", "carol", "c4rol"], &file);
    fanmq_passwd(&["-b", "-I", "5000", "dave", "d4ve"], &file);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("carol:$7$101$") && text.contains("dave:$7$5000$"),
        "{text}"
    );
    // mosquitto_passwd reads and edits the file fanmq passwd wrote.
    mosquitto_passwd(&file, false, "erin", "3rin");
    let edited = std::fs::read_to_string(&file).unwrap();
    assert!(
        edited.starts_with(&text),
        "mosquitto_passwd rewrote our entries: {edited}"
    );
    let mut broker = Broker::builder()
        .config(&config(Some(&file), None, "allow_anonymous = true\n"))
        .start();
    let port = broker.port;
    let _carol = login(port, "carol-1", "carol", "c4rol");
    // 5000 iterations: verified off the shard, same outcome.
    let _dave = login(port, "dave-1", "dave", "d4ve");
    let _erin = login(port, "erin-1", "erin", "3rin");
    let (raw, connack) = raw_connect(port, "d", Some("dave"), Some("D4ve"));
    assert_eq!(connack, CONNACK_NOT_AUTHORISED);
    raw.expect_closed();
    // allow_anonymous = true: no user name is fine, a wrong password is not.
    let (_anon, connack) = raw_connect(port, "anon", None, None);
    assert_eq!(connack, CONNACK_ACCEPTED);
    login_refused(port, "carol", "nope");
    assert_serving(&mut broker, "carol", "c4rol");
}

#[test]
fn a_broken_password_file_stops_the_start_and_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    mosquitto_passwd(&file, true, "alice", "secret");
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("bob:$7$101$truncated\n");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fanmq"))
        .args(["--listen", "127.0.0.1:0", "--password-file"])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_remove("RUST_LOG")
        .output()
        .expect("run fanmq");
    assert!(!out.status.success(), "started with a broken password file");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("password file line 2"), "{stderr}");
}

/// Files for the ACL tests: users alice, bob, anonymous allowed.
struct AclSetup {
    _dir: tempfile::TempDir,
    passwd: PathBuf,
    acl: PathBuf,
}

const ACL: &str = "\
# anonymous clients
topic read public/#

user alice
topic readwrite alice/#
topic deny alice/secret

user bob
topic read #
topic read $SYS/#

pattern write devices/%c/status
pattern readwrite users/%u/#
";

fn acl_setup(acl: &str) -> AclSetup {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    mosquitto_passwd(&passwd, true, "alice", "a");
    mosquitto_passwd(&passwd, false, "bob", "b");
    let acl_path = dir.path().join("acl");
    std::fs::write(&acl_path, acl).unwrap();
    AclSetup {
        _dir: dir,
        passwd,
        acl: acl_path,
    }
}

#[test]
fn acl_drops_denied_publishes_after_their_puback_and_refuses_filters_in_suback() {
    let files = acl_setup(ACL);
    let mut broker = Broker::builder()
        .config(&config(
            Some(&files.passwd),
            Some(&files.acl),
            "allow_anonymous = true\n",
        ))
        .start();
    let port = broker.port;
    // bob reads everything (but $-topics need their own entry).
    let mut bob = bob_watching(port, QoS::AtLeastOnce, "$SYS/broker/publish/#");

    // alice, client id dev1: QoS 1 publishes, each PUBACKed, denied ones
    // dropped, the others delivered in order.
    let mut alice = login(port, "dev1", "alice", "a");
    for topic in [
        "alice/a",
        "alice/secret",        // deny entry
        "bob/x",               // not granted
        "devices/dev1/status", // pattern %c
        "devices/dev2/status", // another client's
        "users/alice/out",     // pattern %u
        "users/bob/out",       // another user's
        "public/x",            // anonymous section only
        "alice/end",
    ] {
        alice.publish_acked(topic, false, b"m");
    }
    let got = bob.collect_until("alice/end");
    let got: Vec<String> = topics(&got)
        .into_iter()
        .filter(|t| !t.starts_with("$SYS"))
        .collect();
    assert_eq!(
        got,
        [
            "alice/a",
            "devices/dev1/status",
            "users/alice/out",
            "alice/end"
        ]
    );

    // SUBSCRIBE: 0x80 for each filter nothing of which is readable, the
    // others granted (a filter over a denied topic too, as in Mosquitto).
    assert_eq!(
        alice.subscribe_many(&[
            ("alice/#", QoS::AtLeastOnce),            // overlaps the deny: granted
            ("alice/inbox/+", QoS::AtLeastOnce),      // covered
            ("users/alice/#", QoS::AtMostOnce),       // pattern %u
            ("users/bob/#", QoS::AtMostOnce),         // another user's
            ("public/#", QoS::AtMostOnce),            // anonymous section only
            ("devices/dev1/status", QoS::AtMostOnce), // write-only pattern
        ]),
        vec![
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::AtMostOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
        ]
    );
    // The granted ones work.
    bob.client
        .publish("alice/inbox/1", QoS::AtLeastOnce, false, b"hi".to_vec())
        .unwrap();
    // bob may not write there (read-only): dropped. alice's own write is not.
    alice.publish_acked("alice/inbox/2", false, b"hi");
    let p = alice.expect_publish();
    assert_eq!(p.topic, "alice/inbox/2");

    // Anonymous (raw): public/# readable, not writable; QoS 1 still PUBACKed;
    // "#" granted (public/# is in it), "alice/#" refused (nothing in it).
    let (mut anon, connack) = raw_connect(port, "anon-1", None, None);
    assert_eq!(connack, CONNACK_ACCEPTED);
    assert_eq!(
        anon.subscribe(1, &[("public/#", 1), ("#", 0), ("alice/#", 0)]),
        vec![1, 0, 0x80]
    );
    anon.send(&crate::common::publish(
        b"public/x",
        b"no",
        1,
        false,
        false,
        7,
    ));
    let ack = anon.expect_packet();
    assert_eq!(
        ack.bytes(),
        crate::common::ack(0x40, 7),
        "PUBACK for a denied publish"
    );
    alice.publish_acked("alice/end2", false, b"m");
    assert_eq!(
        topics(&bob.collect_until("alice/end2"))
            .into_iter()
            .filter(|t| !t.starts_with("$SYS"))
            .collect::<Vec<_>>(),
        ["alice/inbox/2", "alice/end2"]
    );

    // Counters: alice's 5, bob's and anon's 1 each (deterministic, where the
    // absence of a delivery across connections is not).
    wait_sys(&mut bob, "$SYS/broker/publish/messages/denied", |v| v == 7);
    assert_serving(&mut broker, "alice", "a");
}

#[test]
fn acl_checks_wills_when_they_are_published() {
    let files = acl_setup(ACL);
    let broker = Broker::builder()
        .config(&config(Some(&files.passwd), Some(&files.acl), ""))
        .start();
    let port = broker.port;
    let mut bob = bob_watching(port, QoS::AtMostOnce, "$SYS/broker/publish/messages/denied");
    for (topic, allowed) in [("alice/secret", false), ("alice/gone", true)] {
        let id = format!("will-{}", unique());
        let mut connect = ConnectBuilder::new(&id).will(topic, b"bye", 0, false);
        connect.username = Some(b"alice".to_vec());
        connect.password = Some(b"a".to_vec());
        let (raw, connack) = Raw::connect_with(port, &connect);
        assert_eq!(connack, CONNACK_ACCEPTED);
        raw.reset();
        if allowed {
            let got = bob.collect_until(topic);
            assert!(
                !topics(&got).contains(&"alice/secret".to_string()),
                "{got:?}"
            );
        }
    }
    // The denied will was counted, not delivered.
    wait_sys(&mut bob, "$SYS/broker/publish/messages/denied", |v| v == 1);
}

#[test]
fn sighup_reloads_the_password_and_acl_files_and_keeps_them_when_broken() {
    let files = acl_setup("user alice\ntopic read a/#\n");
    let mut broker = Broker::builder()
        .config(&config(Some(&files.passwd), Some(&files.acl), ""))
        .start();
    let port = broker.port;
    let mut alice = login(port, "alice-1", "alice", "a");
    assert_eq!(
        alice.subscribe("b/#", QoS::AtMostOnce),
        vec![SubscribeReasonCode::Failure]
    );
    login_refused(port, "carol", "c");

    // New user and a wider ACL, then SIGHUP.
    mosquitto_passwd(&files.passwd, false, "carol", "c");
    std::fs::write(&files.acl, "user alice\ntopic read a/#\ntopic read b/#\n").unwrap();
    broker.signal(libc::SIGHUP);
    broker
        .wait_log(
            |l| l.contains("ACL file") && l.contains("reloaded"),
            TIMEOUT,
        )
        .expect("reload logged");
    let _carol = login(port, "carol-1", "carol", "c");
    // The existing connection's next SUBSCRIBE sees the new ACL.
    assert_eq!(
        alice.subscribe("b/#", QoS::AtMostOnce),
        vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );

    // Broken files: errors logged, the previous data stays in force.
    std::fs::write(&files.acl, "user alice\nbogus line\n").unwrap();
    std::fs::write(&files.passwd, "carol\n").unwrap();
    broker.signal(libc::SIGHUP);
    broker
        .wait_log(|l| l.contains("previous ACL file stays in force"), TIMEOUT)
        .expect("ACL error logged");
    broker
        .wait_log(
            |l| l.contains("previous password file stays in force"),
            TIMEOUT,
        )
        .expect("password error logged");
    let _carol2 = login(port, "carol-2", "carol", "c");
    assert_eq!(
        alice.subscribe("b/x", QoS::AtMostOnce),
        vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    broker.assert_running();
}

/// Kills the broker process it holds when dropped (also on a failed assert).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn anonymous_access_on_a_public_listener_is_warned_about_at_start() {
    use std::io::BufRead;
    // Loopback first: warnings follow the listeners' order, so a warning for
    // it would come before the one for 0.0.0.0.
    let child = Command::new(env!("CARGO_BIN_EXE_fanmq"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "0.0.0.0:0",
            "--shards",
            "1",
        ])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fanmq");
    let mut child = KillOnDrop(child);
    let stderr = child.0.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut warnings = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no warning for 0.0.0.0; got {warnings:?}"));
        if line.contains("anonymous clients are accepted on") {
            warnings.push(line.clone());
            if line.contains("0.0.0.0:") {
                break;
            }
        }
    }
    assert_eq!(warnings.len(), 1, "loopback warned about: {warnings:?}");
    drop(child);
}

#[test]
fn denied_qos2_and_retained_publishes_complete_their_flow_and_leave_nothing() {
    use crate::common::{ack, publish};
    let files = acl_setup(ACL);
    // One shard: the retained store then has a single replica to inspect.
    let broker = Broker::builder()
        .shards(1)
        .config(&config(Some(&files.passwd), Some(&files.acl), ""))
        .start();
    let port = broker.port;
    let (mut alice, connack) = raw_connect(port, "dev1", Some("alice"), Some("a"));
    assert_eq!(connack, CONNACK_ACCEPTED);
    // QoS 2 to a denied topic: PUBREC, PUBREL, PUBCOMP as usual.
    alice.send(&publish(b"alice/secret", b"q2", 2, true, false, 9));
    assert_eq!(alice.expect_packet().bytes(), ack(0x50, 9), "PUBREC");
    alice.send(&ack(0x62, 9));
    assert_eq!(alice.expect_packet().bytes(), ack(0x70, 9), "PUBCOMP");
    // A retained QoS 1 to an allowed topic, for comparison.
    alice.send(&publish(b"alice/kept", b"r", 1, true, false, 10));
    assert_eq!(alice.expect_packet().bytes(), ack(0x40, 10), "PUBACK");
    // bob reads both topics: only the allowed message was retained. The
    // retained messages follow the SUBACK in filter order, so a retained
    // alice/secret would come first.
    let (mut bob, connack) = raw_connect(port, "bob-1", Some("bob"), Some("b"));
    assert_eq!(connack, CONNACK_ACCEPTED);
    assert_eq!(
        bob.subscribe(1, &[("alice/secret", 0), ("alice/kept", 0)]),
        vec![0, 0]
    );
    let first = bob.expect_publish();
    assert_eq!((first.topic.as_str(), first.retain), ("alice/kept", true));
    alice.ping();
    bob.ping();
}

/// Mosquitto's read semantics: a wildcard over a denied topic is granted and
/// only the denied topic's messages are withheld.
const PARTIAL_ACL: &str = "\
# anonymous clients: everything but secret/x
topic readwrite #
topic deny secret/x

user admin
topic readwrite #

user dev
pattern read devices/%c/status
";

#[test]
fn acl_wildcards_over_a_denied_topic_are_granted_and_withhold_only_it() {
    use crate::common::connect_spread;
    let files = acl_setup(PARTIAL_ACL);
    let broker = Broker::builder()
        .config(&config(None, Some(&files.acl), ""))
        .start();
    let port = broker.port;
    // admin (no password file: any password) writes everything, retained
    // messages first: acknowledged once every shard holds them.
    let mut admin = login(port, "admin-1", "admin", "x");
    admin.publish_acked("secret/x", true, b"hidden");
    admin.publish_acked("r/ok", true, b"kept");
    // Anonymous subscribers on both shards: "+/+" is granted, the denied
    // topic alone refused (3.1.1: 0x80).
    let mut subscribers = connect_spread(&broker, "wild", 2, 16);
    for (client, _) in &mut subscribers {
        assert_eq!(
            client.subscribe_many(&[("+/+", QoS::AtLeastOnce), ("secret/x", QoS::AtMostOnce)]),
            vec![
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure
            ]
        );
    }
    for (topic, qos) in [
        ("secret/x", QoS::AtLeastOnce),
        ("a/b", QoS::AtLeastOnce),
        ("secret/x", QoS::AtMostOnce),
        ("secret/y", QoS::AtMostOnce),
        ("x/end", QoS::AtLeastOnce),
    ] {
        admin.publish(topic, qos, false, b"m");
    }
    for (client, shard) in &mut subscribers {
        let got = client.collect_until("x/end");
        let retained: Vec<String> = got
            .iter()
            .filter(|p| p.retain)
            .map(|p| p.topic.clone())
            .collect();
        assert_eq!(
            retained,
            ["r/ok"],
            "retained secret/x withheld (shard {shard})"
        );
        let live: Vec<String> = got
            .iter()
            .filter(|p| !p.retain)
            .map(|p| p.topic.clone())
            .collect();
        assert_eq!(live, ["a/b", "secret/y", "x/end"], "shard {shard}");
    }
    // admin's own "+/+" is fully covered: it gets secret/x.
    assert_eq!(
        admin.subscribe("+/+", QoS::AtLeastOnce),
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    admin.publish("secret/x", QoS::AtLeastOnce, false, b"m");
    let got: Vec<String> = topics(&admin.collect_until("secret/x"));
    assert!(got.contains(&"secret/x".to_string()), "{got:?}");

    // Patterns: dev's "devices/+/status" covers other clients' devices too;
    // granted, and each message is read-checked with its own client id.
    let mut dev = login(port, "d1", "dev", "x");
    assert_eq!(
        dev.subscribe("devices/+/status", QoS::AtLeastOnce),
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    admin.publish_acked("devices/d2/status", false, b"other");
    admin.publish_acked("devices/d1/status", false, b"own");
    let got = dev.collect_until("devices/d1/status");
    assert_eq!(topics(&got), ["devices/d1/status"]);
}
