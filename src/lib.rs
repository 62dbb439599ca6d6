//! fanmq: an MQTT 3.1.1 broker for massive fan-out.
//!
//! One pinned glommio executor per core (a *shard*) owns its listener socket
//! (SO_REUSEPORT), its connections, its sessions, its subscription router and
//! its replica of the retained store. Shards talk only over glommio's bounded
//! channel mesh. A PUBLISH decoded on one shard is delivered to that shard's
//! subscribers, then handed once (in a batch) to every other shard, which
//! delivers it to its own. Outgoing frames are encoded once per shard and
//! shared as `Bytes`; each subscriber is flushed with one vectored send of
//! everything queued for it.
//!
//! The map, in data-path order:
//! - [`broker`]: start the shard pool, join the mesh, shut down gracefully.
//! - [`listener`]: SO_REUSEPORT sockets, the accept loop, connection limits.
//! - [`admission`]: per-address connection counts, connection-rate bucket.
//! - [`connection`]: one client: read ► decode ► act ► write, keep-alive.
//! - [`park`]: idle plain connections without a task, woken through epoll.
//! - [`codec`]: MQTT 3.1.1 / 3.1 packets, decode and encode.
//! - [`session`]: the session state machine: QoS flows, inflight, queues.
//! - [`shard`]: what one core owns; routing and flushing.
//! - [`session_index`]: a shard's sessions by client id.
//! - [`router`], [`topic`]: the subscription trie, topic validation/matching.
//! - [`retain`]: retained messages.
//! - [`registry`]: client-id home shards and take-over across shards.
//! - [`mesh`]: the messages shards exchange.
//! - [`message`], [`outqueue`]: a message, its shared frames, the write queue.
//! - [`sys`]: counters and `$SYS` topics.
//! - [`transport`]: TLS and WebSocket streams, certificate reload.
//! - [`config`], [`os`]: configuration; host limits, logging, systemd.
//! - [`auth`], [`password`], [`acl`]: `password_file`, `acl_file`,
//!   `allow_anonymous` (Mosquitto-compatible); [`passwd`]: `fanmq passwd`.
//! - [`admin`], [`admin_query`], [`metrics`]: the admin HTTP listener
//!   (Prometheus, JSON API, dashboard) on its own thread, the shard side of
//!   its queries, and the per-shard figures it sums.
//! - `fuzzing`: the `cargo fuzz` targets' entry points (see `fuzz/`).

pub mod acl;
pub mod admin;
pub mod admin_query;
pub mod admission;
pub mod auth;
pub mod broker;
pub mod codec;
pub mod config;
pub mod connection;
#[doc(hidden)]
pub mod fuzzing;
pub mod listener;
pub mod log_limit;
pub mod mesh;
pub mod message;
pub mod metrics;
pub mod os;
pub mod outqueue;
pub mod park;
pub mod passwd;
pub mod password;
pub mod registry;
pub mod retain;
pub mod router;
pub mod session;
pub mod session_index;
pub mod shard;
pub mod sys;
#[cfg(test)]
mod test_rng;
pub mod topic;
pub mod transport;
