//! Runs a scenario as the command line asks: once against `--host:--port`,
//! or with `--compare` against each broker command in turn, alternating
//! A B A B for `--rounds`; then prints the tables and writes the results.

use crate::cli::Opts;
use crate::compare::{Broker, BrokerOption, Setup, WsListener};
use crate::net;
use crate::procfs;
use crate::protocol::{TlsTask, Transport};
use crate::report;
use crate::result::{self, ResultFile, RunResult};
use crate::scenario::{self, Kind};
use crate::target::Target;
use crate::tls;

/// Runs it. `raw` is the `raw` subcommand: compare against the forwarder.
///
/// # Errors
/// Bad options, a broker that does not start, or a failed run (as text: this
/// is the top level).
pub fn run(kind: Kind, mut o: Opts, raw: bool) -> Result<(), String> {
    scenario::validate(&o).map_err(|e| e.to_string())?;
    if o.part.is_some() && (kind != Kind::Fanout || raw) {
        return Err("--part splits a fan-out over load hosts: fanout only".into());
    }
    if raw {
        if o.qos != 0 {
            return Err("raw forwards bytes: QoS 0 only".into());
        }
        if o.compare.is_empty() {
            o.compare = vec!["raw".into()];
        }
        if !o.transport.is_tcp() {
            return Err("raw forwards bytes: --transport tcp only".into());
        }
    }
    if let Some(list) = &o.client_cpus {
        let cpus = procfs::parse_cpu_list(list).map_err(|e| e.to_string())?;
        procfs::set_affinity(0, &cpus).map_err(|e| e.to_string())?;
        log::info!("load generator pinned to CPUs {list}");
    }
    let broker_cpus = match &o.broker_cpus {
        Some(list) => {
            log::info!("brokers pinned to CPUs {list}");
            Some(procfs::parse_cpu_list(list).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    let mut runs: Vec<RunResult> = Vec::new();
    if o.compare.is_empty() {
        if !o.broker_options.is_empty() {
            return Err(
                "--broker-option sets up the brokers --compare starts: add --compare".into(),
            );
        }
        let listeners = if o.nodes.is_empty() {
            listeners_of(&o)?
        } else {
            nodes_of("--nodes", &o.nodes)?
        };
        let addr = match &o.publish_node {
            Some(node) => nodes_of("--publish-node", std::slice::from_ref(node))?[0],
            None => *listeners.first().ok_or("--host names no address")?,
        };
        if !listeners.iter().all(net::is_loopback) && o.host.is_none() && o.nodes.is_empty() {
            return Err(format!("{addr} is not loopback; name it with --host"));
        }
        // WebSocket subscribers go to --ws-port on the same hosts; the
        // publisher stays on plain TCP (`addr`).
        let listeners = match (o.transport, o.ws_port) {
            (Transport::Tcp, _) => listeners,
            (_, Some(ws_port)) if o.nodes.is_empty() => {
                let mut ws = listeners;
                ws.iter_mut().for_each(|l| l.set_port(ws_port));
                ws.dedup();
                ws
            }
            (_, _) => {
                return Err(
                    "--transport ws and wss need --compare, or --ws-port without --nodes".into(),
                );
            }
        };
        let tls = match (o.transport, &o.ca_file) {
            (Transport::Wss, Some(ca_file)) => Some(TlsTask {
                ca_pem: std::fs::read_to_string(ca_file)
                    .map_err(|e| format!("--ca-file {ca_file}: {e}"))?,
                // The name the certificate must be valid for: the first
                // --host as written.
                server_name: o
                    .host
                    .as_deref()
                    .and_then(|h| h.split(',').map(str::trim).next())
                    .unwrap_or("127.0.0.1")
                    .to_owned(),
            }),
            (Transport::Wss, None) => {
                return Err("--transport wss needs --compare, or --ca-file".into());
            }
            _ => None,
        };
        let target = Target {
            addr,
            listeners,
            pids: o.broker_pid.clone(),
            label: o.label.clone().unwrap_or_else(|| addr.to_string()),
            raw: false,
            tls,
        };
        let r = scenario::run(kind, &o, &target, 0).map_err(|e| e.to_string())?;
        println!("{}", result::run_table(&r));
        runs.push(r);
    } else {
        if o.host.is_some() || !o.ports.is_empty() || !o.nodes.is_empty() {
            return Err(
                "--compare starts brokers on this host: drop --host, --ports and --nodes".into(),
            );
        }
        let dir = std::env::temp_dir().join(format!("fanmq-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (ws, tls) = match o.transport {
            Transport::Tcp => (None, None),
            Transport::Ws => (Some(WsListener::Plain), None),
            Transport::Wss => {
                // One certificate for the run, made now; the subscribers
                // trust it alone.
                let files = tls::test_certificate(&dir).map_err(|e| e.to_string())?;
                let ca_pem = std::fs::read_to_string(&files.cert)
                    .map_err(|e| format!("{}: {e}", files.cert.display()))?;
                let tls = TlsTask {
                    ca_pem,
                    server_name: "127.0.0.1".into(),
                };
                (Some(WsListener::Tls(files)), Some(tls))
            }
        };
        let setup = Setup {
            max_queued: max_queued(kind, &o),
            ws,
            options: o
                .broker_options
                .iter()
                .map(|text| BrokerOption::parse(text))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?,
        };
        for round in 0..o.rounds.max(1) {
            for spec in &o.compare {
                let broker = Broker::start(spec, broker_cpus.as_deref(), &dir, &setup)
                    .map_err(|e| e.to_string())?;
                log::info!(
                    "round {round}: {} on port {} (pid {})",
                    broker.label,
                    broker.port,
                    broker.pid()
                );
                let addr = ([127, 0, 0, 1], broker.port).into();
                // WebSocket subscribers go to the WebSocket listener; the
                // publisher stays on plain TCP.
                let subscribe_to = broker.ws_port.map_or(addr, |p| ([127, 0, 0, 1], p).into());
                let target = Target {
                    addr,
                    listeners: vec![subscribe_to],
                    pids: vec![broker.pid()],
                    label: broker.label.clone(),
                    raw: broker.raw,
                    tls: tls.clone(),
                };
                let r = scenario::run(kind, &o, &target, round).map_err(|e| e.to_string())?;
                drop(broker);
                println!("{}", result::run_table(&r));
                runs.push(r);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        if o.compare.len() > 1 {
            println!("{}", result::compare_table(&runs));
        }
    }
    let file = ResultFile {
        command: report::command_line(),
        host: host_facts(),
        runs,
    };
    if let Some(out) = &o.out {
        report::write_results(&file, out, o.plots).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Every (address, port) of `--host` × (`--ports` or `--port`).
fn listeners_of(o: &Opts) -> Result<Vec<std::net::SocketAddr>, String> {
    let host = o.host.clone().unwrap_or_else(|| "127.0.0.1".into());
    let ports = if o.ports.is_empty() {
        vec![o.port]
    } else {
        o.ports.clone()
    };
    let mut listeners = Vec::new();
    for h in host.split(',').map(str::trim).filter(|h| !h.is_empty()) {
        for &port in &ports {
            listeners.push(net::resolve(h, port).map_err(|e| e.to_string())?);
        }
    }
    Ok(listeners)
}

/// The `--nodes` list (or `--publish-node`, named by `option` in errors),
/// each `HOST:PORT` (an IPv6 host in brackets: `[::1]:1883`).
fn nodes_of(option: &str, nodes: &[String]) -> Result<Vec<std::net::SocketAddr>, String> {
    nodes
        .iter()
        .map(|n| {
            let (host, port) = n
                .trim()
                .rsplit_once(':')
                .ok_or_else(|| format!("{option}: {n:?} is not HOST:PORT"))?;
            let port: u16 = port
                .parse()
                .map_err(|_| format!("{option}: {n:?} has no valid port"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            net::resolve(host, port).map_err(|e| e.to_string())
        })
        .collect()
}

/// Messages a started peer may queue per client (Mosquitto's
/// `max_queued_messages`): the whole run for `fanout`, so a burst is not
/// dropped by configuration. The latency search overloads the broker on
/// purpose, briefly: a generous fixed queue lets an overload show as lag
/// growth (what it is) rather than as configured drops.
fn max_queued(kind: Kind, o: &crate::cli::Opts) -> u64 {
    /// Per-client queue for the latency scenario's peers.
    const LATENCY_MAX_QUEUED: u64 = 100_000;
    if kind == Kind::Latency {
        LATENCY_MAX_QUEUED
    } else {
        o.msgs + 1000
    }
}

/// CPUs and kernel, recorded with every result.
fn host_facts() -> String {
    // Online CPUs of the host (not of our affinity mask, which --client-cpus
    // may have narrowed).
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    format!("{cpus} CPUs ({model}), Linux {}", kernel.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_host_port_pairs_in_order() {
        let nodes = ["127.0.0.1:1883".to_owned(), " [::1]:1884".to_owned()];
        let addrs = nodes_of("--nodes", &nodes).expect("valid nodes");
        assert_eq!(addrs[0], "127.0.0.1:1883".parse().expect("addr"));
        assert_eq!(addrs[1], "[::1]:1884".parse().expect("addr"));
        for bad in ["127.0.0.1", "127.0.0.1:port", "127.0.0.1:70000"] {
            let err = nodes_of("--nodes", &[bad.to_owned()]).expect_err(bad);
            assert!(err.contains("--nodes"), "{bad}: {err}");
            let err = nodes_of("--publish-node", &[bad.to_owned()]).expect_err(bad);
            assert!(err.contains("--publish-node"), "{bad}: {err}");
        }
    }
}
