//! fanmq nodes joined through NATS (docs/design/cluster.md; README,
//! "Running a cluster").
//!
//! Core NATS carries messages between nodes, JetStream KV buckets the
//! retained messages and which node owns each client id ([`ownership`];
//! the session images a node keeps a while for racing and retrying claims:
//! [`kept`]). One thread per node, `fanmq-cluster`, runs the NATS
//! client on tokio ([`bridge`]); shards talk to it only through the queues of
//! [`link`] (what waits for room in a full one: [`backlog`]). A message published on a node is delivered there as today and
//! handed to the bridge once, by the shard it entered on; the bridge
//! publishes it once on the subject of its topic ([`subject`], [`headers`]).
//! Each node subscribes once per distinct filter over all its shards, and
//! hands what it receives to the shards with subscribers, which route it
//! without ever handing it on. Without a `[cluster]` NATS URL none of this
//! runs.

pub mod backlog;
pub mod bridge;
pub mod headers;
pub mod kept;
pub mod link;
pub mod ownership;
pub mod positions;
pub mod received;
pub mod retained;
pub mod subject;
pub mod tail;

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use log::error;

use crate::cluster::link::{ClusterStatus, ShardEnds};
use crate::config::cluster::ClusterConfig;

/// Bytes a retained value holds besides the payload and topic at most
/// (fixed fields, origin, lengths; the properties are bounded by the packet).
const VALUE_OVERHEAD: usize = 1024;

/// Why the cluster link could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The bridge's tokio runtime could not start.
    #[error("cannot start the cluster thread's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The bridge thread could not be spawned.
    #[error("cannot spawn the cluster thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A NATS URL does not parse.
    #[error("invalid NATS URL {0:?}: {1}")]
    Url(String, String),
    /// A credentials or nkey file is unreadable or invalid.
    #[error("cannot read NATS credentials {path}: {source}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The NATS client refused its options.
    #[error("cannot set up the NATS connection: {0}")]
    Connect(String),
    /// A KV record could not be read from its stream's leader.
    #[error("KV leader read failed: {0}")]
    LeaderRead(#[source] async_nats::jetstream::stream::LastRawMessageError),
    /// A KV leader read got no answer in time (the stream is electing a
    /// leader: the request waits for one).
    #[error("KV leader read unanswered within {0:?}")]
    LeaderReadTimeout(std::time::Duration),
}

/// A started cluster link: each shard's queue ends, the shared status, and
/// the bridge thread.
pub struct Cluster {
    /// Each shard's ends, by shard index.
    pub ends: Vec<ShardEnds>,
    /// Figures and view, shared with the shards and the admin API.
    pub status: Arc<ClusterStatus>,
    /// The `fanmq-cluster` thread; ends once `status.shutdown` is set.
    pub thread: JoinHandle<()>,
}

/// Starts the bridge thread for `nr_shards` shards. It connects in the
/// background (a NATS server down at start is retried, and the node serves
/// its local clients meanwhile).
///
/// # Errors
/// The thread cannot be spawned.
pub fn start(
    config: &ClusterConfig,
    nr_shards: usize,
    max_packet_size: usize,
) -> Result<Cluster, ClusterError> {
    let status = Arc::new(ClusterStatus::new(
        config.node_name.clone(),
        config.nats_urls.clone(),
    ));
    let (publish, publish_rx) = async_channel::bounded(config.queue_capacity);
    let (interest, interest_rx) = async_channel::unbounded();
    let (to_shards, ends): (Vec<_>, Vec<_>) = (0..nr_shards)
        .map(|_| {
            let (to_shard, from_bridge) = async_channel::bounded(config.queue_capacity);
            let ends = ShardEnds {
                publish: publish.clone(),
                interest: interest.clone(),
                from_bridge,
            };
            (to_shard, ends)
        })
        .unzip();
    let setup = bridge::BridgeSetup {
        config: config.clone(),
        max_value_size: max_packet_size + VALUE_OVERHEAD,
        publish: publish_rx,
        interest: interest_rx,
        to_shards,
        status: status.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("fanmq-cluster".to_string())
        .spawn(move || {
            if let Err(e) = bridge::run(setup) {
                error!("cluster: {e}; this node serves its local clients only");
            }
        })
        .map_err(ClusterError::Thread)?;
    Ok(Cluster {
        ends,
        status,
        thread,
    })
}
