//! Persistence (`persistence = true`): retained messages survive a restart
//! and `kill -9`; damaged files, a full disk and an unusable directory never
//! lose an acknowledged message nor stop the broker from starting.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;

/// A 2-shard broker with persistence in `dir` and `extra` TOML.
fn start(dir: &Path, extra: &str) -> Broker {
    Broker::builder()
        .http(false)
        .config(&format!(
            "persistence = true\npersistence_location = \"{}\"\n{extra}",
            dir.display()
        ))
        .start()
}

/// Kills the broker with SIGKILL and waits for it to be gone.
fn kill_9(mut broker: Broker) {
    broker.signal(libc::SIGKILL);
    assert!(
        broker.wait_exit(TIMEOUT).is_some(),
        "still running after SIGKILL"
    );
}

/// The retained messages matching `filter` that a new subscriber gets, by
/// topic, and the shard it was on. It subscribes at QoS 0, so that every
/// one is queued with the SUBACK, before the PINGRESP (at QoS 1 the
/// inflight window would hold some back).
fn retained(broker: &Broker, filter: &str) -> (usize, BTreeMap<String, Vec<u8>>) {
    let id = format!("probe-{}", unique());
    let mut raw = Raw::connect(broker.port, &id);
    let shard = broker.shard_of(&id);
    assert_eq!(raw.subscribe(1, &[(filter, 0)]), vec![0]);
    raw.send(&PINGREQ);
    let mut got = BTreeMap::new();
    loop {
        let p = raw.expect_packet();
        if p.bytes() == PINGRESP {
            return (shard, got);
        }
        let p = p.publish();
        assert!(p.retain, "a retained message has RETAIN set: {p:?}");
        got.insert(p.topic, p.payload);
    }
}

/// What new subscribers on each of the 2 shards get as retained for
/// `filter` (connects until both shards were seen).
fn retained_on_both_shards(broker: &Broker, filter: &str) -> [BTreeMap<String, Vec<u8>>; 2] {
    let mut seen: [Option<BTreeMap<String, Vec<u8>>>; 2] = [None, None];
    for _ in 0..64 {
        let (shard, got) = retained(broker, filter);
        seen[shard] = Some(got);
        if let [Some(a), Some(b)] = &seen {
            return [a.clone(), b.clone()];
        }
    }
    panic!("64 connections never reached both shards");
}

/// Publishes QoS 1 messages with payload n from a raw 3.1.1 client, 8 in
/// flight, until the connection breaks: retained to `stream/<n>`, or else
/// all to `q1/s`. Returns the shared list of acknowledged numbers and the
/// highest number sent.
fn publish_stream(port: u16, retain: bool) -> (Arc<Mutex<Vec<u16>>>, Arc<Mutex<u16>>) {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let sent = Arc::new(Mutex::new(0u16));
    let mut raw = Raw::connect(port, &format!("stream-pub-{}", unique()));
    let (acked_in, sent_in) = (acked.clone(), sent.clone());
    std::thread::spawn(move || {
        let mut next = 1u16;
        let mut window = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while next < u16::MAX && Instant::now() < deadline {
            while window < 8 {
                let n = next.to_string();
                let topic = if retain {
                    format!("stream/{n}")
                } else {
                    "q1/s".to_string()
                };
                raw.send_lossy(&publish(
                    topic.as_bytes(),
                    n.as_bytes(),
                    1,
                    retain,
                    false,
                    next,
                ));
                *sent_in.lock().unwrap() = next;
                next += 1;
                window += 1;
            }
            match raw.read_packet(TIMEOUT) {
                Ok(Some(p)) if p.kind() == 4 => {
                    let id = u16::from_be_bytes([p.body[0], p.body[1]]);
                    acked_in.lock().unwrap().push(id);
                    window -= 1;
                }
                Ok(Some(p)) => panic!("unexpected packet {p:?}"),
                Ok(None) | Err(_) => return,
            }
        }
    });
    (acked, sent)
}

/// Runs [`publish_stream`] against `broker` and kills it with SIGKILL once
/// `after` publishes were acknowledged; returns the acknowledged numbers
/// and the highest number sent.
fn kill_9_during_a_stream(broker: Broker, retain: bool, after: usize) -> (Vec<u16>, u16) {
    let (acked, sent) = publish_stream(broker.port, retain);
    let started = Instant::now();
    while acked.lock().unwrap().len() < after {
        assert!(
            started.elapsed() < TIMEOUT * 3,
            "publishes not acknowledged"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    kill_9(broker);
    let acked = acked.lock().unwrap().clone();
    let sent = *sent.lock().unwrap();
    (acked, sent)
}

/// The kill -9 test for one `persistence_sync` mode: every retained QoS 1
/// publish that was PUBACKed is retained after the restart, on both shards,
/// and nothing that was never sent is.
fn every_acknowledged_retained_message_survives_kill_9(sync: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = format!("persistence_sync = \"{sync}\"\npersistence_sync_interval_ms = 200");
    let broker = start(dir.path(), &config);
    let (acked, sent) = kill_9_during_a_stream(broker, true, 200);
    let broker = start(dir.path(), &config);
    for got in retained_on_both_shards(&broker, "stream/#") {
        for n in &acked {
            assert_eq!(
                got.get(&format!("stream/{n}")).map(Vec::as_slice),
                Some(n.to_string().as_bytes()),
                "acknowledged retained message {n} lost ({sync}; {} acked, {} retained)",
                acked.len(),
                got.len()
            );
        }
        for (topic, payload) in &got {
            let n: u16 = topic["stream/".len()..].parse().unwrap();
            assert!(n <= sent, "{topic} was never sent");
            assert_eq!(payload, n.to_string().as_bytes());
        }
    }
    assert!(
        broker.log_text().contains("retained messages loaded in"),
        "start-up log says what each shard loaded:\n{}",
        broker.log_text()
    );
}

#[test]
fn acknowledged_retained_messages_survive_kill_9_with_ack_sync() {
    every_acknowledged_retained_message_survives_kill_9("ack");
}

#[test]
fn acknowledged_retained_messages_survive_kill_9_with_interval_sync() {
    every_acknowledged_retained_message_survives_kill_9("interval");
}

/// Enough retained messages for the start to read their journal on two
/// threads (`store::parallel` takes a second thread from 32,768 records
/// on): with the QoS 1 one that ends them, 40,001.
const MANY_RETAINED: usize = 40_000;

#[test]
fn many_retained_messages_load_on_two_threads_and_both_shards_hold_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start(dir.path(), "");
    let mut raw = Raw::connect(broker.port, "many-retainer");
    let mut batch = Vec::new();
    for n in 0..MANY_RETAINED {
        let (topic, payload) = (format!("many/{n}"), n.to_string());
        batch.extend(publish(
            topic.as_bytes(),
            payload.as_bytes(),
            0,
            true,
            false,
            0,
        ));
        if batch.len() >= 64 * 1024 {
            raw.send(&batch);
            batch.clear();
        }
    }
    // One connection's updates reach shard 0's journal in order: the
    // PUBACK of a QoS 1 one after them says they are all written.
    batch.extend(publish(b"many/last", b"last", 1, true, false, 1));
    raw.send(&batch);
    assert_eq!(raw.expect_packet().bytes(), ack(0x40, 1));
    drop(raw);
    broker.signal(libc::SIGTERM);
    assert!(broker.wait_exit(TIMEOUT).is_some_and(|s| s.success()));
    drop(broker);
    // Room for all of them in a subscriber's queue (1,000 by default).
    let broker = start(dir.path(), "max_queued_messages = 100000");
    let all = MANY_RETAINED + 1;
    assert!(
        broker
            .wait_log(
                |l| l.contains(&format!("{all} retained messages from {all} records"))
                    && l.contains("on 2 threads"),
                TIMEOUT
            )
            .is_some(),
        "the journal read on two threads:\n{}",
        broker.log_text()
    );
    for shard in 0..2 {
        let line = broker.wait_log(
            |l| {
                l.contains(&format!(
                    "shard {shard}: persistence: {all} retained messages loaded in"
                ))
            },
            TIMEOUT,
        );
        assert!(
            line.is_some(),
            "shard {shard}'s line:\n{}",
            broker.log_text()
        );
    }
    for got in retained_on_both_shards(&broker, "many/#") {
        assert_eq!(got.len(), all);
        for n in [0, 1, MANY_RETAINED / 2, MANY_RETAINED - 1] {
            assert_eq!(
                got.get(&format!("many/{n}")),
                Some(&n.to_string().into_bytes())
            );
        }
        assert_eq!(got.get("many/last").map(Vec::as_slice), Some(&b"last"[..]));
    }
}

#[test]
fn retained_updates_and_deletes_survive_restarts_that_rewrite_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start(dir.path(), "");
    let mut client = Mqtt::connect(broker.port, "retainer");
    client.publish_acked("keep/a", true, b"first");
    client.publish_acked("keep/a", true, b"second");
    client.publish_acked("keep/b", true, b"b");
    client.publish_acked("keep/b", true, b"");
    client.disconnect();
    // A graceful stop this time (SIGTERM).
    broker.signal(libc::SIGTERM);
    assert!(broker.wait_exit(TIMEOUT).is_some_and(|s| s.success()));
    drop(broker);
    let files = |dir: &Path| -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(dir.join("retained"))
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| (e.path(), std::fs::read(e.path()).unwrap()))
            .collect();
        files.sort();
        files
    };
    for _ in 0..2 {
        let before = files(dir.path());
        let broker = start(dir.path(), "");
        let expected = BTreeMap::from([("keep/a".to_string(), b"second".to_vec())]);
        assert_eq!(
            retained_on_both_shards(&broker, "keep/#"),
            [expected.clone(), expected]
        );
        assert!(
            broker
                .wait_log(|l| l.contains("1 retained messages from"), TIMEOUT)
                .is_some(),
            "start-up line with what was loaded:\n{}",
            broker.log_text()
        );
        // A retained delete acknowledged: the journal wrote and synced.
        let mut client = Mqtt::connect(broker.port, "retainer");
        client.publish_acked("keep-sync/x", true, b"");
        drop(client);
        kill_9(broker);
        // The start rewrote nothing: the files it loaded are as they were,
        // and its journal went on in one new segment after them.
        let after = files(dir.path());
        assert_eq!(after.len(), before.len() + 1, "{after:?}");
        assert!(
            before.iter().all(|f| after.contains(f)),
            "loaded files unchanged"
        );
    }
}

/// Appends garbage to every file under `dir`.
fn append_garbage(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            append_garbage(&path);
            continue;
        }
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(b"\x13\x00\x00\x00garbage\xff\xfe after the end")
            .unwrap();
    }
}

#[test]
fn garbage_appended_to_every_file_starts_and_serves_what_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path(), "");
    let mut client = Mqtt::connect(broker.port, "garbage-pub");
    client.publish_acked("junk/a", true, b"a");
    client.publish_acked("junk/b", true, b"b");
    drop(client);
    kill_9(broker);
    append_garbage(dir.path());
    let mut broker = start(dir.path(), "");
    let both = BTreeMap::from([
        ("junk/a".to_string(), b"a".to_vec()),
        ("junk/b".to_string(), b"b".to_vec()),
    ]);
    assert_eq!(
        retained_on_both_shards(&broker, "junk/#"),
        [both.clone(), both.clone()]
    );
    assert!(
        broker.log_text().contains("is damaged at byte"),
        "the damage is logged:\n{}",
        broker.log_text()
    );
    let aside = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("corrupt-"))
        .count();
    assert!(
        aside >= 1,
        "the damaged files are set aside in corrupt-<ms>/"
    );
    broker.assert_healthy();
    // The journal goes on after the damage.
    let mut client = Mqtt::connect(broker.port, "garbage-pub");
    client.publish_acked("junk/c", true, b"c");
    drop(client);
    kill_9(broker);
    let broker = start(dir.path(), "");
    let mut all = both;
    all.insert("junk/c".to_string(), b"c".to_vec());
    assert_eq!(
        retained_on_both_shards(&broker, "junk/#"),
        [all.clone(), all]
    );
}

/// Runs the broker binary on 2 shards with `args` and returns its stderr;
/// it must exit, non-zero, within `TIMEOUT` (killed, and the test failed,
/// if it hangs).
fn start_fails(args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fanmq"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "off",
            "--shards",
            "2",
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fanmq");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "still starting after {TIMEOUT:?} with {args:?}:\n{}",
                reader.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = reader.join().unwrap_or_default();
    assert!(!status.success(), "started with {args:?}:\n{stderr}");
    stderr
}

#[test]
fn an_unusable_or_locked_directory_or_a_newer_format_is_a_clear_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let stderr = start_fails(&["--persistence-dir", missing.to_str().unwrap()]);
    assert!(
        stderr.contains("persistence_location") && stderr.contains("missing"),
        "{stderr}"
    );
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let stderr = start_fails(&["--persistence-dir", file.to_str().unwrap()]);
    assert!(stderr.contains("not a directory"), "{stderr}");
    let mut config = tempfile::NamedTempFile::new().unwrap();
    writeln!(config, "persistence = true").unwrap();
    let stderr = start_fails(&["--config", config.path().to_str().unwrap()]);
    assert!(stderr.contains("persistence_location"), "{stderr}");

    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let broker = start(&store, "");
    let stderr = start_fails(&["--persistence-dir", store.to_str().unwrap()]);
    assert!(stderr.contains("in use by another fanmq"), "{stderr}");
    kill_9(broker);

    std::fs::write(store.join("FORMAT"), "fanmq-store 99\n").unwrap();
    let stderr = start_fails(&["--persistence-dir", store.to_str().unwrap()]);
    assert!(stderr.contains("newer fanmq"), "{stderr}");
}

/// A segment header of a format newer than this fanmq's
/// (store::frame::Header: magic, version, shard, shards, pad, base LSN,
/// CRC-32C of the 24 bytes before it, pad).
fn newer_segment_header(shard: u16) -> Vec<u8> {
    let mut out = b"FANMQLOG".to_vec();
    out.extend_from_slice(&u16::MAX.to_le_bytes());
    out.extend_from_slice(&shard.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&0u64.to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out
}

#[test]
fn a_shard_directory_that_cannot_be_loaded_fails_the_start_clearly_and_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // Sessions on both shards, so both directories have segments.
    let broker = start(dir.path(), "");
    for i in 0..8 {
        let id = format!("damaged-{i}");
        let (mut client, _) = persistent(broker.port, &id);
        until_journalled(&mut client, &id);
    }
    kill_9(broker);

    // Shard 1 finds a segment it must not read: shard 0, which waits for
    // shard 1's sessions, must not hang, and the error names the file.
    let shard_1 = dir.path().join("shard-1");
    std::fs::write(
        shard_1.join("log-ffffffffffff0000.fml"),
        newer_segment_header(1),
    )
    .unwrap();
    let stderr = start_fails(&["--persistence-dir", dir.path().to_str().unwrap()]);
    assert!(
        stderr.contains("newer fanmq") && stderr.contains("log-ffffffffffff0000.fml"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("did not start within"),
        "an error, not the start-up timeout:\n{stderr}"
    );
    std::fs::remove_file(shard_1.join("log-ffffffffffff0000.fml")).unwrap();

    // Shard 0's directory is a file: it reads nothing there, and cannot
    // write its sessions into it.
    let shard_0 = dir.path().join("shard-0");
    std::fs::rename(&shard_0, dir.path().join("aside")).unwrap();
    std::fs::write(&shard_0, b"not a directory").unwrap();
    let stderr = start_fails(&["--persistence-dir", dir.path().to_str().unwrap()]);
    assert!(stderr.contains("shard-0"), "{stderr}");
    assert!(!stderr.contains("did not start within"), "{stderr}");

    // Put right, the sessions are all there.
    std::fs::remove_file(&shard_0).unwrap();
    std::fs::rename(dir.path().join("aside"), &shard_0).unwrap();
    let broker = start(dir.path(), "");
    let loaded = broker
        .wait_log(|l| l.contains("persistent sessions from"), TIMEOUT)
        .expect("the start-up log");
    assert!(
        loaded.contains("persistence: 8 persistent sessions from"),
        "{loaded}"
    );
    kill_9(broker);
}

/// Mounts a tmpfs of `size` on `dir`; false (with the reason printed) where
/// that is not permitted (not root).
pub(crate) fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .output();
    match out {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!(
                "skipped: cannot mount a tmpfs ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("skipped: cannot run mount ({e})");
            false
        }
    }
}

/// Unmounts the tmpfs when the test ends, however it ends.
pub(crate) struct Unmount(pub(crate) std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// An MQTT 5.0 CONNECT in raw bytes: clean start, keep-alive 60.
fn connect_v5(client_id: &str) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.extend([5, 0x02, 0, 60, 0]);
    body.extend(string(client_id.as_bytes()));
    packet(0x10, &body)
}

/// A retained MQTT 5.0 QoS 1 PUBLISH without properties.
fn retained_v5_qos1(topic: &str, packet_id: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic.as_bytes());
    body.extend(packet_id.to_be_bytes());
    body.push(0);
    body.extend(payload);
    packet(0x33, &body)
}

#[test]
fn a_full_disk_refuses_retained_qos_1_until_space_frees() {
    let dir = tempfile::tempdir().unwrap();
    if !mount_tmpfs(dir.path(), "256k") {
        if std::env::var_os("CI").is_some() {
            panic!("CI runs as root: the tmpfs must mount");
        }
        return;
    }
    let _unmount = Unmount(dir.path().to_path_buf());
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let mut broker = start(&store, "");
    let mut client = Mqtt::connect(broker.port, "full-pub");
    client.publish_acked("full/before", true, b"stored");
    // Fill the file system.
    let filler = dir.path().join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while file.write_all(&chunk).is_ok() {}
    drop(file);
    // A retained QoS 0 update needs new pages: the journal cannot write it.
    client.publish(
        "full/zero",
        rumqttc::QoS::AtMostOnce,
        true,
        &[7u8; 16 * 1024],
    );
    assert!(
        broker
            .wait_log(|l| l.contains("persistence: cannot write"), TIMEOUT)
            .is_some(),
        "the failing journal is logged once:\n{}",
        broker.log_text()
    );
    // 5.0: PUBACK 0x97 Quota exceeded.
    let mut v5 = Raw::tcp(broker.port);
    v5.send(&connect_v5("full-v5"));
    assert_eq!(v5.expect_packet().kind(), 2);
    v5.send(&retained_v5_qos1("full/v5", 1, b"x"));
    assert_eq!(v5.expect_packet().bytes(), vec![0x40, 3, 0, 1, 0x97]);
    // 3.1.1: no PUBACK; the connection closes, so the client resends.
    let mut v3 = Raw::connect(broker.port, "full-v3");
    v3.send(&publish(b"full/v3", b"x", 1, true, false, 1));
    let before_close = v3.expect_closed();
    assert!(
        !before_close.starts_with(&[0x40]),
        "no PUBACK for what was not stored: {before_close:?}"
    );
    // Everything else goes on: non-retained QoS 1, clean subscribers.
    broker.assert_healthy();
    // Space frees: the journal writes what it held and acknowledges again.
    std::fs::remove_file(&filler).unwrap();
    let started = Instant::now();
    loop {
        v5.send(&retained_v5_qos1("full/v5", 2, b"after"));
        let reply = v5.expect_packet().bytes();
        if reply == vec![0x40, 2, 0, 2] {
            break;
        }
        assert_eq!(reply, vec![0x40, 3, 0, 2, 0x97]);
        assert!(started.elapsed() < TIMEOUT, "did not recover");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        broker
            .wait_log(|l| l.contains("acknowledgements resume"), TIMEOUT)
            .is_some()
    );
    drop(client);
    drop(v5);
    kill_9(broker);
    let broker = start(&store, "");
    let got = retained_on_both_shards(&broker, "full/#");
    for got in got {
        assert_eq!(
            got.get("full/before").map(Vec::as_slice),
            Some(&b"stored"[..])
        );
        assert_eq!(got.get("full/v5").map(Vec::as_slice), Some(&b"after"[..]));
        assert_eq!(got.get("full/zero").map(Vec::len), Some(16 * 1024));
        assert!(!got.contains_key("full/v3"), "refused, never stored");
    }
    kill_9(broker);
}

/// Connects `id` as a persistent (CleanSession 0) rumqttc client; returns
/// it and whether CONNACK said Session Present.
fn persistent(port: u16, id: &str) -> (Mqtt, bool) {
    let mut options = Mqtt::options(port, id);
    options.set_clean_session(false);
    let (client, connack) = Mqtt::connect_with(options);
    (client, connack.session_present)
}

/// Waits until this client's shard has journalled what it did so far: a
/// retained QoS 1 PUBACK waits for that shard's journals (as the CONNACK
/// and SUBACK of a persistent session do; this also covers what came
/// after them).
fn until_journalled(client: &mut Mqtt, id: &str) {
    client.publish_acked(&format!("marks/{id}"), true, b"m");
}

#[test]
fn persistent_sessions_keep_their_subscriptions_across_kill_9_on_both_shards() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path(), "");
    // Persistent subscribers until both shards hold some.
    let mut ids = Vec::new();
    let mut shards_seen = [false; 2];
    for n in 0..64 {
        let id = format!("keep-sub-{n}-{}", unique());
        let (mut client, present) = persistent(broker.port, &id);
        assert!(!present);
        shards_seen[broker.shard_of(&id)] = true;
        assert_eq!(
            client.subscribe("kept/t", rumqttc::QoS::AtLeastOnce),
            vec![rumqttc::SubscribeReasonCode::Success(
                rumqttc::QoS::AtLeastOnce
            )]
        );
        until_journalled(&mut client, &id);
        client.disconnect();
        ids.push(id);
        if ids.len() >= 4 && shards_seen == [true, true] {
            break;
        }
    }
    assert_eq!(shards_seen, [true, true], "subscribers on both shards");
    // One that unsubscribed, one whose session a clean start ended.
    let (mut gone, _) = persistent(broker.port, "keep-unsubscribed");
    gone.subscribe("kept/t", rumqttc::QoS::AtLeastOnce);
    gone.unsubscribe("kept/t");
    until_journalled(&mut gone, "keep-unsubscribed");
    gone.disconnect();
    let (mut ended, _) = persistent(broker.port, "keep-ended");
    ended.subscribe("kept/t", rumqttc::QoS::AtLeastOnce);
    until_journalled(&mut ended, "keep-ended");
    ended.disconnect();
    let mut clean = Mqtt::connect(broker.port, "keep-ended");
    until_journalled(&mut clean, "keep-ended");
    clean.disconnect();
    kill_9(broker);

    let broker = start(dir.path(), "");
    assert!(
        broker
            .wait_log(|l| l.contains("queued messages) restored in"), TIMEOUT)
            .is_some(),
        "start-up log says what each shard restored:\n{}",
        broker.log_text()
    );
    // Published while they are offline: queued for every kept session.
    let mut publisher = Mqtt::connect(broker.port, "keep-pub");
    publisher.publish_acked("kept/t", false, b"after restart");
    for id in &ids {
        let (mut client, present) = persistent(broker.port, id);
        assert!(present, "{id}: session present after the restart");
        let p = client.expect_publish();
        assert_eq!(
            (p.topic.as_str(), &p.payload[..]),
            ("kept/t", &b"after restart"[..])
        );
        client.disconnect();
    }
    let (mut gone, present) = persistent(broker.port, "keep-unsubscribed");
    assert!(present);
    assert!(
        gone.recv_publish(Duration::from_millis(300)).is_none(),
        "an unsubscribed filter stays unsubscribed"
    );
    let (_ended, present) = persistent(broker.port, "keep-ended");
    assert!(!present, "a clean start ended the session for good");
}

/// The CONNACK and SUBACK of a persistent session leave only once its image
/// is durable: a `kill -9` right after them keeps the session (Session
/// Present after the restart) and the granted subscription, on both
/// shards, with nothing else waited for in between.
#[test]
fn a_session_and_a_subscription_survive_a_kill_9_right_after_connack_and_suback() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path(), "");
    let mut subscribed = Vec::new();
    let mut connected = Vec::new();
    let mut shards_seen = [false; 2];
    for n in 0..64 {
        let id = format!("acked-{n}-{}", unique());
        let (mut client, present) = persistent(broker.port, &id);
        assert!(!present);
        shards_seen[broker.shard_of(&id)] = true;
        if n % 2 == 0 {
            assert_eq!(
                client.subscribe("acked/t", rumqttc::QoS::AtLeastOnce),
                vec![rumqttc::SubscribeReasonCode::Success(
                    rumqttc::QoS::AtLeastOnce
                )]
            );
            subscribed.push((id, client));
        } else {
            connected.push((id, client));
        }
        if subscribed.len() >= 4 && connected.len() >= 4 && shards_seen == [true, true] {
            break;
        }
    }
    assert_eq!(shards_seen, [true, true], "sessions on both shards");
    // At once after the last SUBACK: no PUBACK or other wait in between.
    kill_9(broker);

    let broker = start(dir.path(), "");
    let mut publisher = Mqtt::connect(broker.port, "acked-pub");
    publisher.publish_acked("acked/t", false, b"after restart");
    for (id, _) in &connected {
        let (client, present) = persistent(broker.port, id);
        assert!(present, "{id}: the session its CONNACK promised is there");
        drop(client);
    }
    for (id, _) in &subscribed {
        let (mut client, present) = persistent(broker.port, id);
        assert!(present, "{id}: session present after the restart");
        let p = client.expect_publish();
        assert_eq!(
            (p.topic.as_str(), &p.payload[..]),
            ("acked/t", &b"after restart"[..]),
            "{id}: the subscription its SUBACK granted"
        );
    }
}

/// A persistent member of `share` on a shard `wanted` accepts (fresh ids
/// from `prefix` until one lands there), subscribed, journalled and
/// offline; its client id.
fn offline_member(
    broker: &Broker,
    prefix: &str,
    share: &str,
    wanted: impl Fn(usize) -> bool,
) -> String {
    (0..64)
        .map(|n| format!("{prefix}-{n}-{}", unique()))
        .find(|id| {
            let (mut client, _) = persistent(broker.port, id);
            let there = wanted(broker.shard_of(id));
            if there {
                client.subscribe(share, rumqttc::QoS::AtLeastOnce);
                until_journalled(&mut client, id);
            }
            client.disconnect();
            there
        })
        .expect("64 connections never reached the wanted shard")
}

/// A persistent member of a shared group keeps what the group gave it on
/// disk, as a plain subscriber does: offline on the publisher's shard, it
/// gets every PUBACKed message after a `kill -9`, in order.
#[test]
fn a_persistent_shared_member_gets_its_acknowledged_messages_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path(), "");
    let mut publisher = Mqtt::connect(broker.port, "share-kill-pub");
    let home = broker.shard_of("share-kill-pub");
    // A member on the publisher's shard.
    let member = offline_member(&broker, "share-kill-member", "$share/g/sk/#", |s| s == home);
    for n in 0..20 {
        publisher.publish_acked("sk/t", false, format!("m{n}").as_bytes());
    }
    kill_9(broker);

    let broker = start(dir.path(), "");
    let (mut client, present) = persistent(broker.port, &member);
    assert!(present, "the member's session");
    let got: Vec<String> = (0..20)
        .map(|_| String::from_utf8_lossy(&client.expect_publish().payload).into_owned())
        .collect();
    let expected: Vec<String> = (0..20).map(|n| format!("m{n}")).collect();
    assert_eq!(got, expected, "every acknowledged message, in order");
}

/// An MQTT 5.0 CONNECT with Clean Start 0 and Session Expiry `expiry`.
fn connect_v5_expiring(client_id: &str, expiry: u32) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.extend([5, 0x00, 0, 60, 5, 0x11]);
    body.extend(expiry.to_be_bytes());
    body.extend(string(client_id.as_bytes()));
    packet(0x10, &body)
}

/// Connects a raw MQTT 5.0 client with Session Expiry `expiry`; returns it
/// and whether CONNACK said Session Present.
fn v5_session(port: u16, id: &str, expiry: u32) -> (Raw, bool) {
    let mut raw = Raw::tcp(port);
    raw.send(&connect_v5_expiring(id, expiry));
    let connack = raw.expect_packet().bytes();
    assert_eq!((connack[0], connack[3]), (0x20, 0), "CONNACK Success");
    (raw, connack[2] == 1)
}

/// A shared member whose session expires hands its backlog to a member
/// on the other shard; a `kill -9` right after loses none of it: the
/// expired session's drop is written only once the other shard has
/// journalled what it took, so after the restart either that member has
/// it or the expired session comes back with it and hands it on again.
#[test]
fn an_expired_shared_members_backlog_handed_to_the_other_shard_survives_kill_9() {
    const N: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path(), "");
    // MQTT 5.0, Session Expiry 1 s, Receive Maximum 1: one message in
    // flight, never acknowledged, the others wait in its queue.
    let gone = format!("handover-gone-{}", unique());
    let mut body = string(b"MQTT");
    body.extend([5, 0x00, 0, 60, 8, 0x11, 0, 0, 0, 1, 0x21, 0, 1]);
    body.extend(string(gone.as_bytes()));
    let mut raw = Raw::tcp(broker.port);
    raw.send(&packet(0x10, &body));
    assert_eq!(raw.expect_packet().kind(), 2, "CONNACK");
    let mut subscribe = vec![0, 1, 0];
    subscribe.extend(string(b"$share/g/ho/#"));
    subscribe.push(1);
    raw.send(&packet(0x82, &subscribe));
    assert_eq!(raw.expect_packet().kind(), 9, "SUBACK");
    let mut publisher = Mqtt::connect(broker.port, "handover-pub");
    for n in 0..N {
        publisher.publish_acked("ho/t", false, n.to_string().as_bytes());
    }
    // Read as 3.1.1: the 5.0 frame's empty properties come first.
    assert_eq!(
        raw.expect_publish().payload,
        b"\x000",
        "the first in flight"
    );
    // The other member, persistent and offline on the other shard.
    let gone_shard = broker.shard_of(&gone);
    let member = offline_member(&broker, "handover-member", "$share/g/ho/#", |s| {
        s != gone_shard
    });
    // DISCONNECT: offline for 1 s, then expired.
    raw.send(&[0xe0, 0]);
    raw.expect_closed();
    let expired = format!("client {gone}: session expired");
    assert!(
        broker.wait_log(|l| l.contains(&expired), TIMEOUT).is_some(),
        "{}",
        broker.log_text()
    );
    kill_9(broker);

    let broker = start(dir.path(), "");
    let (mut client, present) = persistent(broker.port, &member);
    assert!(present, "the member's session");
    let mut first_seen: Vec<usize> = Vec::new();
    while first_seen.len() < N {
        let Some(p) = client.recv_publish(TIMEOUT) else {
            panic!(
                "{} of {N} messages: {first_seen:?}\n{}",
                first_seen.len(),
                broker.log_text()
            );
        };
        let n: usize = String::from_utf8_lossy(&p.payload).parse().unwrap();
        if !first_seen.contains(&n) {
            first_seen.push(n);
        }
    }
    assert_eq!(
        first_seen,
        (0..N).collect::<Vec<_>>(),
        "every acknowledged message, in order"
    );
}

#[test]
fn session_expiry_is_honoured_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path(), "");
    for (id, expiry) in [("expiry-short", 1u32), ("expiry-long", 3600)] {
        let (mut raw, present) = v5_session(broker.port, id, expiry);
        assert!(!present);
        // SUBSCRIBE packet id 1, no properties, "exp/t" at QoS 1.
        let mut body = vec![0, 1, 0];
        body.extend(string(b"exp/t"));
        body.push(1);
        raw.send(&packet(0x82, &body));
        assert_eq!(raw.expect_packet().kind(), 9, "SUBACK");
        // A retained QoS 1 PUBACK waits for this shard's journal.
        raw.send(&retained_v5_qos1(&format!("marks/{id}"), 2, b"m"));
        assert_eq!(raw.expect_packet().bytes(), vec![0x40, 2, 0, 2]);
        raw.send(&[0xe0, 0]);
        raw.expect_closed();
    }
    // A graceful stop, so that the images the DISCONNECTs wrote (when each
    // went offline) are on disk; after a kill -9 an image not yet written
    // makes the session count as offline from the restart instead.
    let mut broker = broker;
    broker.signal(libc::SIGTERM);
    assert!(broker.wait_exit(TIMEOUT).is_some_and(|s| s.success()));
    drop(broker);
    // Longer than the short session's expiry while the broker is down.
    std::thread::sleep(Duration::from_millis(1500));
    let broker = start(dir.path(), "");
    let (_short, present) = v5_session(broker.port, "expiry-short", 1);
    assert!(!present, "expired while the broker was down");
    let (_long, present) = v5_session(broker.port, "expiry-long", 3600);
    assert!(present, "still within its expiry");
    assert!(
        broker
            .log_text()
            .contains("1 expired while the broker was down"),
        "{}",
        broker.log_text()
    );
}

/// Persistent subscribers to `filter` (QoS 2, then offline) until both
/// shards hold some (at least `at_least`); their client ids.
fn offline_subscribers(
    broker: &Broker,
    prefix: &str,
    filter: &str,
    at_least: usize,
) -> Vec<String> {
    let mut ids = Vec::new();
    let mut shards_seen = [false; 2];
    for n in 0..64 {
        let id = format!("{prefix}-{n}-{}", unique());
        let (mut client, _) = persistent(broker.port, &id);
        shards_seen[broker.shard_of(&id)] = true;
        assert_eq!(
            client.subscribe(filter, rumqttc::QoS::ExactlyOnce),
            vec![rumqttc::SubscribeReasonCode::Success(
                rumqttc::QoS::ExactlyOnce
            )]
        );
        until_journalled(&mut client, &id);
        client.disconnect();
        ids.push(id);
        if ids.len() >= at_least && shards_seen == [true, true] {
            return ids;
        }
    }
    panic!("64 connections never reached both shards");
}

#[test]
fn every_acknowledged_qos_1_message_reaches_every_persistent_subscriber_after_kill_9() {
    qos_1_stream_to_offline_subscribers_survives_kill_9("ack");
}

#[test]
fn with_interval_sync_too_no_acknowledged_qos_1_message_is_lost_to_kill_9() {
    qos_1_stream_to_offline_subscribers_survives_kill_9("interval");
}

/// Persistent subscribers on both shards go offline; a QoS 1 stream is
/// killed with SIGKILL; after the restart each subscriber gets every
/// PUBACKed message, in order (duplicates allowed, nothing never sent).
fn qos_1_stream_to_offline_subscribers_survives_kill_9(sync: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = format!("persistence_sync = \"{sync}\"");
    let broker = start(dir.path(), &config);
    let ids = offline_subscribers(&broker, "q1-sub", "q1/#", 3);
    let (acked, sent) = kill_9_during_a_stream(broker, false, 300);
    let broker = start(dir.path(), &config);
    let mut marker = Mqtt::connect(broker.port, "q1-marker");
    marker.publish_acked("q1/end", false, b"end");
    for id in &ids {
        let (mut client, present) = persistent(broker.port, id);
        assert!(present, "{id}: session present");
        let got: Vec<u16> = client
            .collect_until("q1/end")
            .iter()
            .filter(|p| p.topic == "q1/s")
            .map(|p| String::from_utf8_lossy(&p.payload).parse().unwrap())
            .collect();
        let mut first_seen = Vec::new();
        for n in &got {
            assert!(*n <= sent, "{id}: {n} was never sent");
            if !first_seen.contains(n) {
                first_seen.push(*n);
            }
        }
        assert!(
            first_seen.windows(2).all(|w| w[0] < w[1]),
            "{id}: in publish order: {first_seen:?}"
        );
        for n in &acked {
            assert!(
                first_seen.contains(n),
                "{id}: acknowledged message {n} lost ({} acked, {} received)",
                acked.len(),
                first_seen.len()
            );
        }
        client.disconnect();
    }
}

#[test]
fn qos_2_is_delivered_once_across_a_kill_9_between_pubrec_and_pubrel() {
    qos_2_across_a_kill_9_between_pubrec_and_pubrel("q2", false);
}

#[test]
fn a_qos_2_publish_resent_after_a_kill_9_between_pubrec_and_pubrel_is_delivered_once() {
    qos_2_across_a_kill_9_between_pubrec_and_pubrel("q2dup", true);
}

/// A persistent publisher's QoS 2 PUBLISH is PUBREC'd, the broker is
/// killed with SIGKILL and restarted; the publisher reconnects and sends
/// PUBREL (§4.3.3), after resending the PUBLISH with DUP when `resend` (a
/// client that lost the PUBREC, §4.4). Persistent subscribers on both
/// shards get it exactly once, and the packet id is free again.
fn qos_2_across_a_kill_9_between_pubrec_and_pubrel(prefix: &str, resend: bool) {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path(), "");
    let filter = format!("{prefix}/#");
    let ids = offline_subscribers(&broker, &format!("{prefix}-sub"), &filter, 2);
    let [once, next, end] = ["once", "next", "end"].map(|t| format!("{prefix}/{t}"));
    let publisher = ConnectBuilder::new(&format!("{prefix}-pub")).clean_session(false);
    let (mut raw, _) = Raw::connect_with(broker.port, &publisher);
    raw.send(&publish(
        once.as_bytes(),
        b"exactly once",
        2,
        false,
        false,
        7,
    ));
    // PUBREC: the message is durable for every subscriber, and so is the
    // publisher's packet id 7, awaiting PUBREL.
    assert_eq!(raw.expect_packet().bytes(), ack(0x50, 7));
    kill_9(broker);
    let broker = start(dir.path(), "");
    let (mut raw, connack) = Raw::connect_with(broker.port, &publisher);
    assert_eq!(connack, CONNACK_SESSION, "the publisher's session is back");
    if resend {
        raw.send(&publish(
            once.as_bytes(),
            b"exactly once",
            2,
            false,
            true,
            7,
        ));
        assert_eq!(raw.expect_packet().bytes(), ack(0x50, 7), "PUBREC again");
    }
    raw.send(&ack(0x62, 7));
    assert_eq!(raw.expect_packet().bytes(), ack(0x70, 7), "PUBCOMP");
    // Id 7 is free again: a new message with it is delivered.
    raw.send(&publish(next.as_bytes(), b"next", 2, false, false, 7));
    assert_eq!(raw.expect_packet().bytes(), ack(0x50, 7));
    raw.send(&ack(0x62, 7));
    assert_eq!(raw.expect_packet().bytes(), ack(0x70, 7));
    let mut marker = Mqtt::connect(broker.port, &format!("{prefix}-marker"));
    marker.publish_acked(&end, false, b"end");
    for id in &ids {
        let (mut client, present) = persistent(broker.port, id);
        assert!(present);
        let got = client.collect_until(&end);
        let topics: Vec<&str> = got.iter().map(|p| p.topic.as_str()).collect();
        assert_eq!(topics, [&once, &next, &end], "{id}: exactly once each");
        assert_eq!(&got[0].payload[..], b"exactly once");
        assert_eq!(got[0].qos, rumqttc::QoS::ExactlyOnce);
        client.disconnect();
    }
}

/// A client on the other shard than `other_id`'s connection: connects
/// fresh ids until one lands there; its id.
fn on_other_shard(broker: &Broker, prefix: &str, other_id: &str) -> (Mqtt, String) {
    let other = broker.shard_of(other_id);
    for n in 0..64 {
        let id = format!("{prefix}-{n}-{}", unique());
        let client = Mqtt::connect(broker.port, &id);
        if broker.shard_of(&id) != other {
            return (client, id);
        }
        client.disconnect();
    }
    panic!("64 connections never reached the other shard");
}

/// A persistent session taken over by a connection on the other shard
/// moves there with its on-disk state: after a `kill -9` it comes back
/// once, as that shard left it (its new subscription, not the one the old
/// shard's journal still holds an image with), and the store loads one
/// session of its id.
#[test]
fn a_session_taken_over_on_the_other_shard_comes_back_once_as_it_was_there_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path(), "");
    let id = format!("moving-{}", unique());
    let (mut client, present) = persistent(broker.port, &id);
    assert!(!present);
    // The SUBACK of a persistent session waits for its image on disk.
    client.subscribe("moving/old", rumqttc::QoS::AtLeastOnce);
    let first = broker.shard_of(&id);
    // Reconnect (a take-over each time) until a connection lands on the
    // other shard.
    let mut connections = 1;
    let mut moved = loop {
        assert!(
            connections < 64,
            "64 connections never reached the other shard"
        );
        let (again, present) = persistent(broker.port, &id);
        connections += 1;
        assert!(present, "taken over with its state");
        if broker.shards_of(&id, connections)[connections - 1] != first {
            break again;
        }
    };
    drop(client);
    moved.unsubscribe("moving/old");
    moved.subscribe("moving/new", rumqttc::QoS::AtLeastOnce);
    kill_9(broker);

    let broker = start(dir.path(), "");
    let loaded = broker
        .wait_log(|l| l.contains("persistent sessions from"), TIMEOUT)
        .expect("the start-up log");
    assert!(
        loaded.contains("persistence: 1 persistent sessions from"),
        "one session of the id: {loaded}"
    );
    let (mut back, present) = persistent(broker.port, &id);
    assert!(present, "its session came back");
    let mut publisher = Mqtt::connect(broker.port, "moving-pub");
    publisher.publish_acked("moving/old", false, b"old");
    publisher.publish_acked("moving/new", false, b"new");
    let p = back.expect_publish();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("moving/new", &b"new"[..]),
        "only the subscription it had on the shard it moved to"
    );
    assert!(back.recv_publish(Duration::from_millis(300)).is_none());
    kill_9(broker);
}

/// A raw persistent (CleanSession 0) MQTT 3.1.1 client `id`; asserts
/// CONNACK's Session Present is `present`.
fn raw_persistent(port: u16, id: &str, present: bool) -> Raw {
    let (raw, connack) = Raw::connect_with(port, &ConnectBuilder::new(id).clean_session(false));
    let expected = if present { CONNACK_SESSION } else { CONNACK_OK };
    assert_eq!(connack, expected, "{id}: CONNACK");
    raw
}

/// Reads `n` packets: (kind, DUP, packet id, topic) each, PUBLISH topics
/// only ("" for others).
fn next_packets(raw: &mut Raw, n: usize) -> Vec<(u8, bool, u16, String)> {
    (0..n)
        .map(|_| {
            let p = raw.expect_packet();
            if p.kind() == 3 {
                let publish = p.publish();
                (3, publish.dup, publish.packet_id, publish.topic)
            } else {
                let id = u16::from_be_bytes([p.body[0], p.body[1]]);
                (p.kind(), false, id, String::new())
            }
        })
        .collect()
}

/// Publishes QoS 1 `topic` from the raw client `raw` (subscribed to it)
/// with packet id `id`, and returns the packet id its own copy came with:
/// the PUBACK waits until the journal holds everything the client's shard
/// appended before (one file, written in order).
fn journalled_by_own_publish(raw: &mut Raw, v5: bool, topic: &str, id: u16) -> u16 {
    if v5 {
        let mut body = string(topic.as_bytes());
        body.extend(id.to_be_bytes());
        body.push(0);
        body.extend_from_slice(b"mark");
        raw.send(&packet(0x32, &body));
    } else {
        raw.send(&publish(topic.as_bytes(), b"mark", 1, false, false, id));
    }
    let got = next_packets(raw, 2);
    assert!(
        got.contains(&(4, false, id, String::new())),
        "PUBACK: {got:?}"
    );
    got.iter()
        .find(|p| p.0 == 3 && p.3 == topic)
        .unwrap_or_else(|| panic!("its own copy: {got:?}"))
        .2
}

/// A raw persistent subscriber `id` of MQTT 5.0 (`v5`, Session Expiry
/// 3600 s) or 3.1.1 (CleanSession 0); asserts Session Present is
/// `present`.
fn raw_subscriber(port: u16, id: &str, v5: bool, present: bool) -> Raw {
    if !v5 {
        return raw_persistent(port, id, present);
    }
    let (raw, was_present) = v5_session(port, id, 3600);
    assert_eq!(was_present, present, "{id}: Session Present");
    raw
}

#[test]
fn unacknowledged_outgoing_messages_are_resent_with_their_packet_ids_after_kill_9() {
    outgoing_flows_survive_kill_9(false);
}

#[test]
fn with_mqtt_5_unacknowledged_outgoing_messages_are_resent_with_their_packet_ids_after_kill_9() {
    outgoing_flows_survive_kill_9(true);
}

/// A persistent raw subscriber (MQTT 5.0 when `v5`, else 3.1.1) gets QoS
/// 1 and QoS 2 messages from a publisher on the other shard and
/// acknowledges none but one PUBREC; after `kill -9` and a restart, the
/// same packet ids come again (PUBLISH with DUP, PUBREL for the PUBREC'd
/// one); once acknowledged, a second `kill -9` does not bring them back.
fn outgoing_flows_survive_kill_9(v5: bool) {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path(), "");
    let sub_id = format!("inflight-sub-{v5}-{}", unique());
    let mut sub = raw_subscriber(broker.port, &sub_id, v5, false);
    if v5 {
        // SUBSCRIBE packet id 1, no properties, "inf/#" at QoS 2.
        let mut body = vec![0, 1, 0];
        body.extend(string(b"inf/#"));
        body.push(2);
        sub.send(&packet(0x82, &body));
        let suback = sub.expect_packet();
        assert_eq!((suback.kind(), suback.body[3]), (9, 2), "SUBACK QoS 2");
    } else {
        assert_eq!(sub.subscribe(1, &[("inf/#", 2)]), vec![2]);
    }
    // The publisher on the other shard: its acks wait for the subscriber's
    // shard's journal (docs/design/persistence.md §5.3).
    let (publisher, _) = on_other_shard(&broker, "inflight-pub", &sub_id);
    let qos = [
        ("inf/one", rumqttc::QoS::AtLeastOnce),
        ("inf/two", rumqttc::QoS::ExactlyOnce),
        ("inf/three", rumqttc::QoS::ExactlyOnce),
    ];
    for (topic, qos) in qos {
        publisher.publish(topic, qos, false, topic.as_bytes());
    }
    let sent = next_packets(&mut sub, 3);
    let topics: Vec<&str> = sent.iter().map(|p| p.3.as_str()).collect();
    assert_eq!(topics, ["inf/one", "inf/two", "inf/three"]);
    assert!(sent.iter().all(|p| p.0 == 3 && !p.1), "{sent:?}");
    let [one, two, three] = [sent[0].2, sent[1].2, sent[2].2];
    // "three" is PUBREC'd: the broker releases it and waits for PUBCOMP.
    sub.send(&ack(0x50, three));
    assert_eq!(sub.expect_packet().bytes(), ack(0x62, three), "PUBREL");
    let mark = journalled_by_own_publish(&mut sub, v5, "inf/mark", 100);
    kill_9(broker);

    let broker = start(dir.path(), "");
    let mut sub = raw_subscriber(broker.port, &sub_id, v5, true);
    // Resent in order with the same packet ids (§4.4): PUBLISH with DUP,
    // PUBREL for the one past PUBREC.
    assert_eq!(
        next_packets(&mut sub, 4),
        vec![
            (3, true, one, "inf/one".to_string()),
            (3, true, two, "inf/two".to_string()),
            (6, false, three, String::new()),
            (3, true, mark, "inf/mark".to_string()),
        ]
    );
    sub.send(&ack(0x40, one));
    sub.send(&ack(0x70, three));
    sub.send(&ack(0x40, mark));
    sub.send(&ack(0x50, two));
    assert_eq!(sub.expect_packet().bytes(), ack(0x62, two), "PUBREL");
    sub.send(&ack(0x70, two));
    sub.ping();
    let last = journalled_by_own_publish(&mut sub, v5, "inf/last", 101);
    kill_9(broker);

    // Acknowledged before the second kill -9: gone, only the last one comes
    // again.
    let broker = start(dir.path(), "");
    let mut sub = raw_subscriber(broker.port, &sub_id, v5, true);
    assert_eq!(
        next_packets(&mut sub, 1),
        vec![(3, true, last, "inf/last".to_string())]
    );
    sub.send(&ack(0x40, last));
    sub.ping();
    drop(broker);
}

#[test]
fn sessions_resume_after_a_restart_with_another_shard_count() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path(), "");
    let ids = offline_subscribers(&broker, "reshard", "reshard/#", 4);
    kill_9(broker);
    let mut earlier = Vec::new();
    for shards in [3, 1, 2] {
        let broker = Broker::builder()
            .http(false)
            .shards(shards)
            .config(&format!(
                "persistence = true\npersistence_location = \"{}\"",
                dir.path().display()
            ))
            .start();
        let mut publisher = Mqtt::connect(broker.port, "reshard-pub");
        publisher.publish_acked("reshard/t", false, format!("{shards}").as_bytes());
        publisher.disconnect();
        for id in &ids {
            let (mut client, present) = persistent(broker.port, id);
            assert!(present, "{id}: session present with {shards} shards");
            // A message acknowledged just before the previous kill -9 may
            // come again (QoS 1; README "Persistence"), before this one.
            loop {
                let p = client.expect_publish();
                let round: usize = String::from_utf8_lossy(&p.payload).parse().unwrap();
                if round == shards {
                    break;
                }
                assert!(earlier.contains(&round), "{id}: {round} never sent");
            }
            client.disconnect();
        }
        kill_9(broker);
        earlier.push(shards);
    }
}

/// An MQTT 5.0 CONNECT with Clean Start 0, Session Expiry 3600 s and a
/// retained QoS 1 will to `topic` with Will Delay `delay` seconds.
fn connect_v5_with_will(client_id: &str, topic: &str, payload: &[u8], delay: u32) -> Vec<u8> {
    connect_v5_will(client_id, topic, payload, delay, None)
}

/// [`connect_v5_with_will`] with the will's Message Expiry Interval
/// `expiry` seconds, when given.
fn connect_v5_will(
    client_id: &str,
    topic: &str,
    payload: &[u8],
    delay: u32,
    expiry: Option<u32>,
) -> Vec<u8> {
    let mut body = string(b"MQTT");
    // Will flag, will QoS 1, will retain; Clean Start 0.
    body.extend([5, 0x2C, 0, 60, 5, 0x11]);
    body.extend(3600u32.to_be_bytes());
    body.extend(string(client_id.as_bytes()));
    // Will properties: Will Delay Interval (5 bytes), Message Expiry
    // Interval (5 more).
    body.extend([if expiry.is_some() { 10 } else { 5 }, 0x18]);
    body.extend(delay.to_be_bytes());
    if let Some(expiry) = expiry {
        body.push(0x02);
        body.extend(expiry.to_be_bytes());
    }
    body.extend(string(topic.as_bytes()));
    body.extend(string(payload));
    packet(0x10, &body)
}

#[test]
fn wills_of_persistent_sessions_are_published_after_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path(), "");
    // Persistent sessions on both shards: a QoS 1 PUBACK to their filter
    // waits until every shard's journal holds what came before.
    offline_subscribers(&broker, "will-sync", "wsync/#", 2);
    let mut syncer = Mqtt::connect(broker.port, "will-syncer");
    // Connected when the broker dies: its will is owed (§3.1.2.5).
    let open = ConnectBuilder::new("will-open").clean_session(false).will(
        "wills/open",
        b"open gone",
        1,
        true,
    );
    let (_open, connack) = Raw::connect_with(broker.port, &open);
    assert_eq!(connack, CONNACK_OK);
    // Offline with its Will Delay running (MQTT 5.0): due 3 s after it left.
    let mut delayed = Raw::tcp(broker.port);
    delayed.send(&connect_v5_with_will(
        "will-delayed",
        "wills/delayed",
        b"delayed gone",
        3,
    ));
    assert_eq!(delayed.expect_packet().kind(), 2, "CONNACK");
    delayed.reset();
    syncer.publish_acked("wsync/x", false, b"sync");
    kill_9(broker);

    let broker = start(dir.path(), "");
    let mut watcher = Mqtt::connect(broker.port, "will-watcher");
    watcher.subscribe("wills/#", rumqttc::QoS::AtLeastOnce);
    let mut got = BTreeMap::new();
    while got.len() < 2 {
        let p = watcher.expect_publish();
        got.insert(p.topic.clone(), p.payload.to_vec());
    }
    assert_eq!(
        got,
        BTreeMap::from([
            ("wills/delayed".to_string(), b"delayed gone".to_vec()),
            ("wills/open".to_string(), b"open gone".to_vec()),
        ])
    );
}

/// Bytes of every file under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                dir_bytes(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

/// Publishes `count` QoS 1 messages from `client` (as many in flight as
/// rumqttc allows), topic and payload from `message(n)`, and waits for
/// every PUBACK.
fn publish_all(
    client: &mut Mqtt,
    count: usize,
    retain: bool,
    message: impl Fn(usize) -> (String, Vec<u8>),
) {
    for n in 0..count {
        let (topic, payload) = message(n);
        client.publish(&topic, rumqttc::QoS::AtLeastOnce, retain, &payload);
    }
    for _ in 0..count {
        client
            .wait_for(|p| matches!(p, rumqttc::Packet::PubAck(_)).then_some(()))
            .unwrap_or_else(|e| panic!("no PUBACK: {e}"));
    }
}

/// With a small `persistence_snapshot_log_bytes`, a stream of QoS 1
/// messages to online persistent subscribers (who acknowledge them) and of
/// retained messages replacing each other makes several snapshots while
/// the broker runs, and the directory stays bounded however many messages
/// went through; after a kill -9, with each journal's newest snapshot torn,
/// the messages held for offline persistent subscribers (published before
/// every snapshot) and every retained message are back.
#[test]
fn snapshots_while_running_bound_the_directory_and_lose_nothing_to_kill_9() {
    /// The threshold under test.
    const THRESHOLD: u64 = 64 * 1024;
    /// Rounds of publishing; the directory is measured after each.
    const ROUNDS: usize = 10;
    /// QoS 1 messages to the online subscribers per round.
    const PER_ROUND: usize = 800;
    /// Retained publishes per round, over [`TOPICS`] topics.
    const RETAINED_PER_ROUND: usize = 100;
    /// Retained topics.
    const TOPICS: usize = 25;
    /// Messages held for the offline subscribers.
    const HELD: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let config = format!("persistence_snapshot_log_bytes = {THRESHOLD}");
    // HTTP on this time: the metrics count the snapshots.
    let broker = Broker::builder()
        .config(&format!(
            "persistence = true\npersistence_location = \"{}\"\n{config}",
            dir.path().display()
        ))
        .start();
    let offline = offline_subscribers(&broker, "snap-held", "held/#", 2);
    let mut online = Vec::new();
    let mut shards_seen = [false; 2];
    for n in 0..64 {
        let id = format!("snap-online-{n}-{}", unique());
        let (mut client, _) = persistent(broker.port, &id);
        client.subscribe("flow/#", rumqttc::QoS::AtLeastOnce);
        shards_seen[broker.shard_of(&id)] = true;
        online.push(client);
        if online.len() >= 2 && shards_seen == [true, true] {
            break;
        }
    }
    assert_eq!(
        shards_seen,
        [true, true],
        "online subscribers on both shards"
    );
    let mut publisher = Mqtt::connect(broker.port, "snap-pub");
    publish_all(&mut publisher, HELD, false, |n| {
        (format!("held/{n}"), format!("held {n}").into_bytes())
    });
    let payload = vec![b'x'; 512];
    let mut sizes = Vec::new();
    let mut last_retained = BTreeMap::new();
    for round in 0..ROUNDS {
        publish_all(&mut publisher, PER_ROUND, false, |n| {
            (format!("flow/{round}/{n}"), payload.clone())
        });
        publish_all(&mut publisher, RETAINED_PER_ROUND, true, |n| {
            let topic = format!("ret/{}", n % TOPICS);
            (
                topic,
                format!("{round} {n} {}", "r".repeat(400)).into_bytes(),
            )
        });
        for n in RETAINED_PER_ROUND - TOPICS..RETAINED_PER_ROUND {
            last_retained.insert(
                format!("ret/{}", n % TOPICS),
                format!("{round} {n} {}", "r".repeat(400)).into_bytes(),
            );
        }
        // Every online subscriber has had (and acknowledged) the round.
        let marker = format!("flow/end/{round}");
        publisher.publish_acked(&marker, false, b"end");
        for client in &mut online {
            let got = client.collect_until(&marker);
            assert!(got.len() > PER_ROUND, "round {round}: {}", got.len());
        }
        sizes.push(dir_bytes(dir.path()));
    }
    let snapshots = broker
        .log_text()
        .lines()
        .filter(|l| l.contains("persistence: snapshot") && l.contains("written"))
        .count();
    assert!(
        snapshots >= 6,
        "several snapshots of each journal ({snapshots}):\n{}",
        broker.log_text()
    );
    // What went through the logs: each flow message once on both shards'
    // logs, each retained publish once on the retained log.
    let logged = (ROUNDS * (PER_ROUND * 2 * payload.len() + RETAINED_PER_ROUND * 400)) as u64;
    // Three journals (retained, two shards), each at most two snapshots and
    // the log since the older one, with room for what one round leaves
    // unacknowledged in flight.
    let bound = 3 * (4 * THRESHOLD + 256 * 1024);
    assert!(
        logged > 4 * bound,
        "the test writes far more than the bound"
    );
    for (round, size) in sizes.iter().enumerate() {
        assert!(
            *size <= bound,
            "after round {round} the directory holds {size} bytes (bound {bound}; sizes {sizes:?})"
        );
    }
    let stats = crate::admin::wait_stats(&broker, |s| {
        crate::admin::total(s, "store_snapshots") >= snapshots as u64
    });
    assert!(
        crate::admin::total(&stats, "store_log_bytes") <= bound,
        "log since the last snapshots: {stats}"
    );
    for client in online {
        client.disconnect();
    }
    kill_9(broker);
    // Tear each journal's newest snapshot in half (as a disk error would):
    // the load falls back to the snapshot before it and the log after that.
    let mut torn = 0;
    for journal in std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
    {
        let mut snaps: Vec<_> = std::fs::read_dir(journal.path())
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "fms"))
            .collect();
        snaps.sort();
        if let Some(newest) = snaps.last() {
            let data = std::fs::read(newest).unwrap();
            std::fs::write(newest, &data[..data.len() / 2]).unwrap();
            torn += 1;
        }
    }
    assert_eq!(torn, 3, "a snapshot in each journal");
    let broker = start(dir.path(), &config);
    assert_eq!(
        retained_on_both_shards(&broker, "ret/#"),
        [last_retained.clone(), last_retained],
        "every retained message, as last published"
    );
    let mut marker = Mqtt::connect(broker.port, "snap-marker");
    marker.publish_acked("held/end", false, b"end");
    for id in &offline {
        let (mut client, present) = persistent(broker.port, id);
        assert!(present, "{id}: session present");
        let got: Vec<String> = client
            .collect_until("held/end")
            .iter()
            .map(|p| String::from_utf8_lossy(&p.payload).to_string())
            .collect();
        let expected: Vec<String> = (0..HELD)
            .map(|n| format!("held {n}"))
            .chain(["end".to_string()])
            .collect();
        assert_eq!(got, expected, "{id}: every held message, in order");
        client.disconnect();
    }
}

/// Queue limits that let offline subscribers keep [`sync_load`]'s messages.
const LOAD_QUEUES: &str = "max_queued_bytes = 1073741824\nmax_queued_messages = 1000000";

/// Keeps both shards' journals writing and syncing (offline persistent
/// subscribers to `load/#` on both, from [`offline_subscribers`]): two
/// publishers of 256 KiB QoS 1 messages, 8 in flight each, until their
/// connection ends; returns once both had 20 acknowledged. A record
/// appended meanwhile waits for the sync in progress before it is written.
fn sync_load(port: u16) {
    let acked = Arc::new(Mutex::new([0usize; 2]));
    for n in 0..2 {
        let mut raw = Raw::connect(port, &format!("load-pub-{n}-{}", unique()));
        let acked = acked.clone();
        std::thread::spawn(move || {
            let payload = vec![b'x'; 256 * 1024];
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut next = 1u16;
            let mut window = 0;
            while Instant::now() < deadline {
                while window < 8 {
                    raw.send_lossy(&publish(b"load/t", &payload, 1, false, false, next));
                    next = next.checked_add(1).unwrap_or(1);
                    window += 1;
                }
                match raw.read_packet(TIMEOUT) {
                    Ok(Some(p)) if p.kind() == 4 => {
                        window -= 1;
                        acked.lock().unwrap()[n] += 1;
                    }
                    _ => return,
                }
            }
        });
    }
    let started = Instant::now();
    while acked.lock().unwrap().iter().any(|&a| a < 20) {
        assert!(started.elapsed() < TIMEOUT, "the load is not acknowledged");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A clean start that ends a stored persistent session (MQTT 3.1.1 Clean
/// Session 1, or MQTT 5.0 Clean Start 0 with Session Expiry 0, which
/// resumes the session for this connection only) gets its CONNACK only
/// once the session's drop is durable: a `kill -9` right after those
/// CONNACKs, while both shards' journals are busy syncing a QoS 1 stream,
/// never brings the old sessions (their subscription and queued messages)
/// back.
#[test]
fn a_connect_that_ends_a_stored_session_survives_a_kill_9_right_after_its_connack() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path(), LOAD_QUEUES);
    offline_subscribers(&broker, "drop-load", "load/#", 2);
    let ids: Vec<String> = (0..16).map(|n| format!("drop-{n}-{}", unique())).collect();
    for id in &ids {
        let (mut client, _) = persistent(broker.port, id);
        client.subscribe("dropped/t", rumqttc::QoS::AtLeastOnce);
        until_journalled(&mut client, id);
        client.disconnect();
    }
    let mut publisher = Mqtt::connect(broker.port, "drop-pub");
    for n in 0..3 {
        publisher.publish_acked("dropped/t", false, format!("old {n}").as_bytes());
    }
    sync_load(broker.port);
    // All at once: 3.1.1 clean sessions, and a quarter MQTT 5.0 sessions
    // that end with their connection.
    let mut raws: Vec<(Raw, bool)> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| {
            if n % 4 != 3 {
                (
                    Raw::send_connect(broker.port, &ConnectBuilder::new(id)),
                    false,
                )
            } else {
                let mut raw = Raw::tcp(broker.port);
                raw.send(&connect_v5_expiring(id, 0));
                (raw, true)
            }
        })
        .collect();
    for (raw, v5) in &mut raws {
        let connack = raw.expect_packet().bytes();
        if *v5 {
            assert_eq!(&connack[..4], &[0x20, connack[1], 1, 0], "resumed for now");
        } else {
            assert_eq!(connack, CONNACK_OK);
        }
    }
    kill_9(broker);

    let broker = start(dir.path(), LOAD_QUEUES);
    for id in &ids {
        let mut raw = raw_persistent(broker.port, id, false);
        // Nothing queued comes before the answer to a ping: the old
        // session, its subscription and its queue are gone.
        raw.ping();
    }
}

/// A persistent member of a shared group on the other shard than the
/// publisher keeps what the group gave it in its own shard's journal, and
/// the publisher's PUBACK waits for that shard's disk: every PUBACKed
/// message arrives after a `kill -9`, in order, while that shard's journal
/// is kept busy.
#[test]
fn a_persistent_shared_member_on_the_other_shard_gets_its_acknowledged_messages_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path(), "");
    offline_subscribers(&broker, "xshare-load", "q1/#", 2);
    let mut publisher = Mqtt::connect(broker.port, "xshare-kill-pub");
    let home = broker.shard_of("xshare-kill-pub");
    let member = offline_member(&broker, "xshare-kill-member", "$share/g/xsk/#", |s| {
        s != home
    });
    let (acked, _) = publish_stream(broker.port, false);
    let started = Instant::now();
    while acked.lock().unwrap().len() < 50 {
        assert!(
            started.elapsed() < TIMEOUT,
            "the stream is not acknowledged"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for n in 0..30 {
        publisher.publish_acked("xsk/t", false, format!("m{n}").as_bytes());
    }
    kill_9(broker);

    let broker = start(dir.path(), "");
    let (mut client, present) = persistent(broker.port, &member);
    assert!(present, "the member's session");
    let got: Vec<String> = (0..30)
        .map(|_| String::from_utf8_lossy(&client.expect_publish().payload).into_owned())
        .collect();
    let expected: Vec<String> = (0..30).map(|n| format!("m{n}")).collect();
    assert_eq!(got, expected, "every acknowledged message, in order");
}

/// An MQTT 5.0 CONNECT with Clean Start 0, Session Expiry 3600 s and a
/// retained QoS 1 will "gone" to `topic` with Will Delay `delay` and
/// Message Expiry Interval `expiry` seconds.
fn connect_v5_with_expiring_will(client_id: &str, topic: &str, delay: u32, expiry: u32) -> Vec<u8> {
    connect_v5_will(client_id, topic, b"gone", delay, Some(expiry))
}

/// An MQTT 5.0 will keeps its Message Expiry Interval across a `kill -9`,
/// counted from its publication: a will owed because its connection was
/// open is published after the restart with its whole interval; one whose
/// Will Delay was running when the broker died, and came due while it was
/// down, has lost the time since it was due. Read by a `rumqttc::v5`
/// client as retained messages.
#[test]
fn a_wills_message_expiry_survives_a_kill_9_and_counts_the_time_down() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path(), "");
    offline_subscribers(&broker, "wexp-sync", "wexp-sync/#", 2);
    let mut syncer = Mqtt::connect(broker.port, "wexp-syncer");
    let mut open = Raw::tcp(broker.port);
    open.send(&connect_v5_with_expiring_will(
        "wexp-open",
        "wexp/open",
        0,
        100,
    ));
    assert_eq!(open.expect_packet().kind(), 2, "CONNACK");
    let mut delayed = Raw::tcp(broker.port);
    delayed.send(&connect_v5_with_expiring_will(
        "wexp-delayed",
        "wexp/delayed",
        1,
        100,
    ));
    assert_eq!(delayed.expect_packet().kind(), 2, "CONNACK");
    delayed.reset();
    let delay_started = Instant::now();
    // Every shard's journal holds what came before this PUBACK.
    syncer.publish_acked("wexp-sync/x", false, b"sync");
    kill_9(broker);
    // Down for 3 s: the delayed will came due 1 s after it left, so at
    // least 2 s of its 100 pass while the broker is down.
    std::thread::sleep(Duration::from_secs(3));

    let broker = start(dir.path(), "");
    let restarted = Instant::now();
    // Published at start (due 0 and delay 0, or due while down): retained.
    let mut got = BTreeMap::new();
    let started = Instant::now();
    while got.len() < 2 {
        assert!(started.elapsed() < TIMEOUT, "wills not published: {got:?}");
        let mut watcher = crate::mqtt5::V5::connect(broker.port, &format!("wexp-w-{}", unique()));
        watcher.subscribe("wexp/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce);
        while let Some(p) = watcher.recv_publish(Duration::from_millis(300)) {
            let topic = String::from_utf8_lossy(&p.topic).into_owned();
            let left = p.properties.and_then(|p| p.message_expiry_interval);
            got.insert(topic, (left, Instant::now()));
        }
    }
    let (open_left, open_at) = got["wexp/open"];
    let open_left = u64::from(open_left.expect("the open will's expiry is kept"));
    // Published at most `open_at - restarted` after the restart, with 100 s.
    let since_start = open_at.duration_since(restarted).as_secs();
    assert!(
        open_left <= 100 && open_left + since_start + 1 >= 100,
        "the whole interval from its publication: {open_left} s left"
    );
    let (delayed_left, delayed_at) = got["wexp/delayed"];
    let delayed_left = u64::from(delayed_left.expect("the delayed will's expiry is kept"));
    let since_due = delayed_at.duration_since(delay_started).as_secs();
    assert!(
        delayed_left <= 98 && delayed_left + since_due + 1 >= 100 - 1,
        "the time since it was due counts: {delayed_left} s left, {since_due} s since its delay began"
    );
}

/// The CONNACK of a clean start that ends a stored session waits for the
/// session's drop to be written, however long that takes: with the disk
/// full (a 256 KiB tmpfs, as root; CI is) and the session's journal
/// holding a message it cannot write, no CONNACK comes; once space frees,
/// it does, and a `kill -9` right after it leaves the session ended.
#[test]
fn a_clean_start_on_a_full_disk_gets_its_connack_only_once_the_old_session_is_ended_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    if !mount_tmpfs(dir.path(), "256k") {
        if std::env::var_os("CI").is_some() {
            panic!("CI runs as root: the tmpfs must mount");
        }
        return;
    }
    let _unmount = Unmount(dir.path().to_path_buf());
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let broker = start(&store, "");
    let id = "full-drop";
    let (mut client, _) = persistent(broker.port, id);
    client.subscribe("full-drop/t", rumqttc::QoS::AtLeastOnce);
    until_journalled(&mut client, id);
    client.disconnect();
    let filler = dir.path().join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while file.write_all(&chunk).is_ok() {}
    drop(file);
    // Queued for the offline session: its journal cannot write the body,
    // nor what comes after it.
    let mut publisher = Raw::connect(broker.port, "full-drop-pub");
    publisher.send(&publish(
        b"full-drop/t",
        &[7u8; 16 * 1024],
        1,
        false,
        false,
        1,
    ));
    assert!(
        broker
            .wait_log(|l| l.contains("persistence: cannot write"), TIMEOUT)
            .is_some(),
        "the journal cannot write:\n{}",
        broker.log_text()
    );
    let mut clean = Raw::send_connect(broker.port, &ConnectBuilder::new(id));
    // The journal retries every second, and fails while the disk is full.
    assert_eq!(
        clean
            .read_packet(Duration::from_millis(1500))
            .map(|p| p.map(|p| p.bytes())),
        Ok(None),
        "no CONNACK while the session's end is not on disk"
    );
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(clean.expect_packet().bytes(), CONNACK_OK);
    kill_9(broker);

    let broker = start(&store, "");
    let mut raw = raw_persistent(broker.port, id, false);
    raw.ping();
    kill_9(broker);
}
