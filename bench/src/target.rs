//! What a scenario runs against and in what steps: the broker under test
//! ([`Target`]), one publishing phase ([`Phase`]), the broker CPU window
//! around a phase ([`CpuWindow`]) and the scenarios' error ([`ScenarioError`]).
//!
//! A leaf below [`crate::scenario`] and [`crate::latency`], which both use
//! these types (LAYOUT.md item 7: no import circle in the bench).

use crate::capacity::CapacityError;
use crate::fleet::FleetError;
use crate::net::NetError;
use crate::protocol::TlsTask;
use crate::publisher::PublishError;
use crate::stats_api::StatsApiError;
use std::net::SocketAddr;

/// Broker CPU seconds before and after a phase, and its wall time (ns).
pub type CpuWindow = Option<(f64, f64, u64)>;

/// Everything that can go wrong in a scenario.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Capacity(#[from] CapacityError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    StatsApi(#[from] StatsApiError),
    #[error("publisher thread panicked")]
    PublisherPanic,
    #[error("{0}")]
    Invalid(String),
}

/// The broker under test.
#[derive(Debug, Clone)]
pub struct Target {
    /// Where the publisher connects: the first of `listeners` (over TCP
    /// with `--transport ws` or `wss`: the broker's plain listener).
    pub addr: SocketAddr,
    /// Every broker address:port the subscribers spread over.
    pub listeners: Vec<SocketAddr>,
    /// The broker's processes on this host (several: the nodes of a
    /// cluster, `--nodes` with `--broker-pid` for each): their CPU and RSS
    /// are read from `/proc` and summed. Empty: not measured.
    pub pids: Vec<u32>,
    /// The broker's name in the results.
    pub label: String,
    /// The bench's raw forwarder rather than an MQTT broker.
    pub raw: bool,
    /// How the subscribers check the broker's certificate
    /// (`--transport wss`).
    pub tls: Option<TlsTask>,
}

/// One publishing phase.
#[derive(Debug, Clone)]
pub struct Phase {
    /// Messages to publish.
    pub msgs: u64,
    /// Messages per second; `None` = burst.
    pub rate: Option<f64>,
    /// Sequence number of the first message.
    pub first_seq: u64,
    /// The publisher records the schedule slip of every n-th message.
    pub track_stride: u64,
    /// Hard limit for publishing and draining (ns).
    pub limit_ns: u64,
}
