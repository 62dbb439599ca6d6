//! fanmq: an MQTT 5.0 and 3.1.1 broker for massive fan-out.
//!
//! One pinned glommio executor per core (a *shard*) owns its listener socket
//! (SO_REUSEPORT), its connections, its sessions, its subscription router and
//! its replica of the retained store. Shards talk only over glommio's bounded
//! channel mesh. A PUBLISH decoded on one shard is delivered to that shard's
//! subscribers, then handed once (in a batch) to every other shard, which
//! delivers it to its own. Outgoing frames are encoded once per shard and
//! shared as shard-local reference-counted frames; each subscriber is
//! flushed with one vectored send of everything queued for it.
//!
//! The map, top floor first (a module imports only modules below it; see
//! docs/ARCHITECTURE.md, "Layers", checked by `.ci/layers.py`):
//! - [`cli`]: the binary's flags and subcommands.
//! - `broker`: start the shard pool, join the mesh, shut down gracefully.
//! - `listener`: SO_REUSEPORT sockets, the accept loop, connection limits.
//! - `admin`: the admin HTTP listener (Prometheus, JSON API, dashboard) on
//!   its own thread.
//! - `connection`: one client: handshake, the live task (read ► decode ►
//!   dispatch ► flush), keep-alive, parked connections.
//! - `shard`: what one core owns; routing and flushing, the mesh inbox,
//!   client-id registry and take-over, `$SYS`, the admin queries.
//! - `mesh`: the messages shards exchange.
//! - `session`: the session state machine (QoS flows, inflight, queues),
//!   its link to a connection, the write queue.
//! - `observe`: the one counter table, `$SYS` and Prometheus rendering.
//! - `router`: the subscription trie and the retained store.
//! - `net`: socket system calls, epoll and its watcher, transports (TLS,
//!   WebSocket), admission limits.
//! - `security`: `password_file`, `acl_file`, `allow_anonymous`
//!   (Mosquitto-compatible) and `fanmq passwd`.
//! - `store`: persistence (`persistence`, `persistence_location`): the
//!   journals of retained messages and persistent sessions, their record
//!   format and start-up load.
//! - `protocol`: MQTT 3.1.1 / 3.1 packets (`protocol::v3`), topics, the
//!   application message and its encoded frames.
//! - [`config`]: configuration, every default; host limits, logging, systemd.
//! - `cluster`: nodes joined through NATS (`[cluster]`, `--cluster-nats`).
//! - `fuzzing`: the `cargo fuzz` targets' entry points (see `fuzz/`).

pub(crate) mod admin;
pub mod broker;
pub mod cli;
pub(crate) mod cluster;
pub mod config;
pub(crate) mod connection;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod listener;
pub(crate) mod mesh;
pub mod net;
pub(crate) mod observe;
pub(crate) mod protocol;
pub(crate) mod router;
pub mod security;
pub(crate) mod session;
pub(crate) mod shard;
pub(crate) mod store;
#[cfg(test)]
mod test_rng;
