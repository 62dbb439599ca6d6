//! Running under systemd: the sd_notify readiness protocol (Type=notify) and
//! SIGHUP reload (ExecReload).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use crate::common::{Broker, Raw};

/// Reads one notification datagram.
fn notification(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_is_notified_once_listeners_accept_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut broker = Broker::builder()
        .env("NOTIFY_SOCKET", path.as_os_str())
        .start();
    let ready = notification(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "got {ready:?}");
    // Ready means accepting: a client connects at once on every shard.
    for i in 0..4 {
        let _client = Raw::connect(broker.port, &format!("notify-{i}"));
    }
    broker.signal(libc::SIGTERM);
    let stopping = notification(&socket);
    assert!(
        stopping.lines().any(|l| l == "STOPPING=1"),
        "got {stopping:?}"
    );
    let status = broker.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(status.success(), "{status:?}");
}

#[test]
fn sighup_rereads_the_log_level() {
    let mut broker = Broker::builder().config("log_level = \"debug\"").start();
    let path = broker.config_path().expect("config file").to_path_buf();
    std::fs::write(&path, "log_level = \"warn\"\n").unwrap();
    broker.signal(libc::SIGHUP);
    let line = broker.wait_log(
        |l| l.contains("SIGHUP: log level set to warn"),
        Duration::from_secs(10),
    );
    assert!(line.is_some(), "no reload line in:\n{}", broker.log_text());
    // Still serving after the reload.
    broker.assert_healthy();
}
