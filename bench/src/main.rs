//! `fanmq-bench`: fanmq's fan-out benchmark and load generator.
//!
//! See `shared/BENCH.md` for how we measure. Map of the crate:
//!
//! | module | concern |
//! | --- | --- |
//! | [`cli`] | command line |
//! | [`runner`] | one scenario against one broker, or `--compare` over several |
//! | [`scenario`] | the scenarios: connect, fan-out, idle, storm |
//! | [`latency`] | the latency scenario: rate search, lag trend, bound |
//! | [`phase`] | one publishing phase and its fan-out figures (both of the above) |
//! | [`target`] | the broker under test, a phase, the scenarios' error |
//! | [`fleet`] / [`worker`] / [`protocol`] | subscriber connections in worker processes (mio event loops) |
//! | [`publisher`] | the paced or burst publisher |
//! | [`rawserver`] | the plain TCP forwarder, the ceiling |
//! | [`compare`] | starting and stopping broker processes |
//! | [`mqtt`] | the minimal client codec |
//! | [`stats`] | payload stamp, sequence checks, histograms |
//! | [`procfs`] | CPU, RSS, socket memory, limits, pinning |
//! | [`net`] | sockets, source addresses |
//! | [`ws`] / [`tls`] | the subscribers' WebSocket and TLS transports (`--transport ws`, `wss`) |
//! | [`capacity`] | how many connections this load host allows; refusing plans that do not fit |
//! | [`part`] / [`stats_api`] / [`merge`] | a fan-out split over load hosts: `--part K/N`, `--start-at`, `--wait-subscribers`, `merge` |
//! | [`result`] / [`report`] / [`plot`] | JSON, Markdown, SVG |
//! | [`progress`] | live progress |

mod capacity;
mod cli;
mod compare;
mod conn;
mod fleet;
mod latency;
mod merge;
mod mqtt;
mod net;
mod part;
mod phase;
mod plot;
mod procfs;
mod progress;
mod protocol;
mod publisher;
mod rawserver;
mod report;
mod result;
mod runner;
mod scenario;
mod stats;
mod stats_api;
mod target;
mod tls;
mod worker;
mod ws;

use clap::Parser;
use cli::{Cli, Cmd};
use std::process::ExitCode;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let outcome = match cli.cmd {
        Cmd::Worker => worker::run().map_err(|e| e.to_string()),
        Cmd::RawServer { listen } => rawserver::run(listen).map_err(|e| e.to_string()),
        Cmd::Report(o) => report::run(&o).map_err(|e| e.to_string()),
        Cmd::Merge(o) => merge::run(&o).map_err(|e| e.to_string()),
        Cmd::Fanout(o) => runner::run(scenario::Kind::Fanout, o, false),
        Cmd::Connect(o) => runner::run(scenario::Kind::Connect, o, false),
        Cmd::Idle(o) => runner::run(scenario::Kind::Idle, o, false),
        Cmd::Storm(o) => runner::run(scenario::Kind::Storm, o, false),
        Cmd::Latency(o) => runner::run(scenario::Kind::Latency, o, false),
        Cmd::Raw(o) => runner::run(scenario::Kind::Fanout, o, true),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
