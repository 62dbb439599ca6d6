//! Start-up: shards follow the CPU affinity mask, `--cpus` outside it is
//! refused, and log lines carry syslog priorities under journald.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{Broker, set_affinity_before_exec};

/// The CPU the single-CPU tests pin to: the last one, so the test proves the
/// broker follows the mask rather than starting at CPU 0.
fn last_cpu() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
}

#[test]
fn shards_default_to_the_cpus_of_the_affinity_mask() {
    let cpu = last_cpu();
    let broker = Broker::builder().shards(0).affinity(&[cpu]).start();
    let line = broker
        .wait_log(|l| l.contains(" started: "), Duration::from_secs(10))
        .expect("start-up line");
    assert!(
        line.contains(&format!("1 shards on CPUs [{cpu}]")),
        "start-up line: {line}"
    );
    assert!(line.contains("open files soft"), "start-up line: {line}");
}

#[test]
fn cpus_outside_the_affinity_mask_are_refused() {
    let allowed = last_cpu();
    let outside = if allowed == 0 { 1 } else { 0 };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fanmq"));
    cmd.args(["--listen", "127.0.0.1:0", "--cpus", &outside.to_string()])
        .args(["--http-listen", "off"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    set_affinity_before_exec(&mut cmd, vec![allowed]);
    let out = cmd.output().expect("run fanmq");
    assert!(!out.status.success(), "started on a CPU outside its mask");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "CPU {outside} is not in this process's affinity mask"
        )),
        "stderr: {stderr}"
    );
}

#[test]
fn journald_lines_carry_syslog_priorities() {
    let broker = Broker::builder()
        .config("max_connections = 100000000")
        .env("JOURNAL_STREAM", "8:12345")
        .start();
    let started = broker
        .wait_log(|l| l.contains(" started: "), Duration::from_secs(10))
        .expect("start-up line");
    assert!(started.starts_with("<6>fanmq "), "info line: {started}");
    // The open-file limit is below 100M connections: a warning at priority 4.
    let warning = broker
        .wait_log(
            |l| l.contains("max_connections is"),
            Duration::from_secs(10),
        )
        .expect("limit warning");
    assert!(warning.starts_with("<4>"), "warning line: {warning}");
    assert!(!started.contains('\u{1b}'), "no colour codes: {started}");
}

/// The number before `marker` in `line` (e.g. "6026 MiB").
fn mib_before(line: &str, marker: &str) -> u64 {
    let head = &line[..line.find(marker).expect("marker in line")];
    let digits = head.rsplit(' ').next().expect("a number before the marker");
    digits.parse().expect("MiB figure")
}

#[test]
fn queued_bytes_budget_defaults_to_a_quarter_of_memory_and_follows_the_config() {
    let broker = Broker::start();
    let line = broker
        .wait_log(
            |l| l.contains("queued-bytes budget"),
            Duration::from_secs(10),
        )
        .expect("budget line");
    let budget = mib_before(&line, " MiB over all shards");
    let limit = mib_before(&line, " MiB)");
    // MemTotal, unless a cgroup caps the test below it.
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemTotal");
    assert!(limit <= total_kib / 1024 + 1, "line: {line}");
    assert!(budget.abs_diff(limit / 4) <= 1, "line: {line}");

    let configured = Broker::builder()
        .config("max_queued_bytes_total = 104857600")
        .start();
    let line = configured
        .wait_log(
            |l| l.contains("queued-bytes budget"),
            Duration::from_secs(10),
        )
        .expect("budget line");
    assert_eq!(
        mib_before(&line, " MiB over all shards"),
        100,
        "line: {line}"
    );
}
