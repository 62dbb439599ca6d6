//! The `[cluster]` table and the `--cluster-nats` / `--node-name` flags:
//! fanmq nodes joined through NATS (docs/design/cluster.md, §11). Without a
//! NATS URL there is no cluster and nothing of it runs.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;

/// Default root of every subject and bucket name: several fanmq clusters can
/// share one NATS account under different names.
pub const DEFAULT_CLUSTER_NAME: &str = "fanmq";
/// Default capacity of the queue from the shards to the bridge thread, and
/// of each queue from the bridge to a shard, in batches: as the mesh's, bursts
/// pass without stalling a publisher.
pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;
/// Default longest a publisher's connection waits for room in the queue to
/// the bridge before the cluster copy of its batch is dropped (local and
/// other-shard delivery are done by then): a slow NATS never stalls local
/// delivery for long.
pub const DEFAULT_STALL_MS: u64 = 100;
/// Default number of replicas of the retained bucket: 1 works with a single
/// nats-server; a three-server NATS cluster wants 3.
pub const DEFAULT_KV_REPLICAS: usize = 1;
/// Default time after which a node not heard from (its heartbeat every
/// 2 s) is taken for dead, and its sessions may be taken fresh: five missed
/// beats, failover in about 10 s (docs/design/cluster.md §9).
pub const DEFAULT_NODE_TTL_MS: u64 = 10_000;
/// Shortest `node_ttl_ms`: two heartbeats (a single late beat must not
/// declare a node dead).
pub const MIN_NODE_TTL_MS: u64 = 4_000;
/// Default longest wait for the owning node's answer to a take-over
/// request, well within the 10 s a CONNECT waits for its claim.
pub const DEFAULT_TAKEOVER_TIMEOUT_MS: u64 = 2_000;
/// Longest node name: it is a subject token and a KV key; a host name is at
/// most 64 bytes on Linux.
pub const MAX_NODE_NAME_LEN: usize = 64;

/// How the node proves itself to NATS: at most one method (async-nats'
/// `token`, `user_and_password`, `nkey`, `credentials_file`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials (a NATS server without authorization).
    None,
    /// A token (`authorization { token: ... }`).
    Token(String),
    /// A user and password.
    UserPassword(String, String),
    /// A file holding an nkey seed (`SU...`).
    NkeySeedFile(PathBuf),
    /// A `.creds` file (JWT and nkey seed), as `nsc` writes them.
    CredsFile(PathBuf),
}

/// What a node does with a CONNECT while it is cut off from NATS
/// (docs/design/cluster.md §9, "Split brain").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionMode {
    /// Grant it as a fresh session this node does not register: service
    /// goes on, but one client id may then be live on two nodes.
    Serve,
    /// Refuse it with CONNACK 0x03 (Server unavailable): no duplicate
    /// client id, no new connections until NATS is back.
    Fence,
}

/// The cluster settings after defaults, file and flags were merged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:4222`, `tls://...`); several for a
    /// NATS cluster's seeds.
    pub nats_urls: Vec<String>,
    /// This node's name, unique in the cluster, `[A-Za-z0-9_-]`.
    pub node_name: String,
    /// Root of subjects and bucket names ([`DEFAULT_CLUSTER_NAME`]).
    pub name: String,
    /// Credentials.
    pub auth: NatsAuth,
    /// CA certificates (PEM) the NATS server's certificate must chain to.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for NATS servers that verify clients.
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// Refuse a NATS connection without TLS.
    pub tls_required: bool,
    /// Capacity of the queues between shards and bridge, in batches.
    pub queue_capacity: usize,
    /// Longest a publisher waits for the queue to the bridge.
    pub stall: Duration,
    /// Replicas of the retained and sessions buckets.
    pub kv_replicas: usize,
    /// A node not heard from for this long is dead: its client ids are
    /// taken fresh.
    pub node_ttl: Duration,
    /// Longest wait for an owning node's answer to a take-over request.
    pub takeover_timeout: Duration,
    /// CONNECTs while the NATS link is down.
    pub partition_mode: PartitionMode,
}

/// The `[cluster]` table of the file: every key optional.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCluster {
    nats_urls: Option<Vec<String>>,
    node_name: Option<String>,
    name: Option<String>,
    token: Option<String>,
    user: Option<String>,
    password: Option<String>,
    nkey_seed_file: Option<PathBuf>,
    creds_file: Option<PathBuf>,
    tls_ca_file: Option<PathBuf>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    tls_required: Option<bool>,
    queue_capacity: Option<usize>,
    stall_ms: Option<u64>,
    kv_replicas: Option<usize>,
    node_ttl_ms: Option<u64>,
    takeover_timeout_ms: Option<u64>,
    partition_mode: Option<PartitionMode>,
}

/// An invalid cluster setting.
fn invalid<T>(key: &'static str, why: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid {
        key,
        why: why.into(),
    })
}

/// Whether `name` may be a node or cluster name: a subject token and a
/// bucket-name part, so `[A-Za-z0-9_-]`, not empty.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NODE_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// This machine's host name made a valid node name (every other byte
/// becomes `-`); "fanmq" when there is none.
pub fn default_node_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let host = if rc == 0 { &buf[..len] } else { &[][..] };
    let name: String = host
        .iter()
        .take(MAX_NODE_NAME_LEN)
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                char::from(b)
            } else {
                '-'
            }
        })
        .collect();
    if name.is_empty() {
        DEFAULT_CLUSTER_NAME.to_string()
    } else {
        name
    }
}

/// Merges the `[cluster]` table with the flags (`--cluster-nats` replaces
/// the file's URLs, `--node-name` its name); `None` without any URL.
///
/// # Errors
/// Names outside `[A-Za-z0-9_-]`, two authentication methods, half a client
/// certificate, zero capacities.
pub(super) fn merge(
    file: Option<FileCluster>,
    flag_urls: &[String],
    flag_node_name: Option<&str>,
) -> Result<Option<ClusterConfig>, ConfigError> {
    let file = file.unwrap_or_default();
    let nats_urls = if flag_urls.is_empty() {
        file.nats_urls.unwrap_or_default()
    } else {
        flag_urls.to_vec()
    };
    if nats_urls.is_empty() {
        return Ok(None);
    }
    if nats_urls.iter().any(|u| u.trim().is_empty()) {
        return invalid("cluster.nats_urls", "a NATS URL must not be empty");
    }
    let node_name = match flag_node_name.map(str::to_string).or(file.node_name) {
        Some(name) => name,
        None => default_node_name(),
    };
    if !valid_name(&node_name) {
        return invalid(
            "cluster.node_name",
            format!("{node_name:?}: 1 to {MAX_NODE_NAME_LEN} bytes of A-Z a-z 0-9 _ -"),
        );
    }
    let name = file
        .name
        .unwrap_or_else(|| DEFAULT_CLUSTER_NAME.to_string());
    if !valid_name(&name) {
        return invalid("cluster.name", format!("{name:?}: A-Z a-z 0-9 _ - only"));
    }
    let mut methods = Vec::new();
    if let Some(token) = file.token {
        methods.push(NatsAuth::Token(token));
    }
    match (file.user, file.password) {
        (None, None) => {}
        (Some(user), Some(password)) => methods.push(NatsAuth::UserPassword(user, password)),
        _ => return invalid("cluster.user", "user and password go together"),
    }
    if let Some(path) = file.nkey_seed_file {
        methods.push(NatsAuth::NkeySeedFile(path));
    }
    if let Some(path) = file.creds_file {
        methods.push(NatsAuth::CredsFile(path));
    }
    if methods.len() > 1 {
        return invalid(
            "cluster.token",
            "at most one of token, user/password, nkey_seed_file, creds_file",
        );
    }
    let auth = methods.pop().unwrap_or(NatsAuth::None);
    let tls_client = match (file.tls_cert_file, file.tls_key_file) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some((cert, key)),
        _ => {
            return invalid(
                "cluster.tls_cert_file",
                "tls_cert_file and tls_key_file go together",
            );
        }
    };
    let queue_capacity = file.queue_capacity.unwrap_or(DEFAULT_QUEUE_CAPACITY);
    if queue_capacity == 0 {
        return invalid("cluster.queue_capacity", "must be at least 1");
    }
    let kv_replicas = file.kv_replicas.unwrap_or(DEFAULT_KV_REPLICAS);
    if !(1..=5).contains(&kv_replicas) {
        return invalid("cluster.kv_replicas", "must be between 1 and 5 (JetStream)");
    }
    let node_ttl_ms = file.node_ttl_ms.unwrap_or(DEFAULT_NODE_TTL_MS);
    if node_ttl_ms < MIN_NODE_TTL_MS {
        return invalid(
            "cluster.node_ttl_ms",
            format!("must be at least {MIN_NODE_TTL_MS} (two heartbeats)"),
        );
    }
    let takeover_timeout_ms = file
        .takeover_timeout_ms
        .unwrap_or(DEFAULT_TAKEOVER_TIMEOUT_MS);
    if !(1..=5_000).contains(&takeover_timeout_ms) {
        return invalid(
            "cluster.takeover_timeout_ms",
            "must be between 1 and 5000 (a CONNECT waits at most 10 s)",
        );
    }
    Ok(Some(ClusterConfig {
        nats_urls,
        node_name,
        name,
        auth,
        tls_ca_file: file.tls_ca_file,
        tls_client,
        tls_required: file.tls_required.unwrap_or(false),
        queue_capacity,
        stall: Duration::from_millis(file.stall_ms.unwrap_or(DEFAULT_STALL_MS)),
        kv_replicas,
        node_ttl: Duration::from_millis(node_ttl_ms),
        takeover_timeout: Duration::from_millis(takeover_timeout_ms),
        partition_mode: file.partition_mode.unwrap_or(PartitionMode::Serve),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `[cluster]` table from TOML text.
    fn table(text: &str) -> FileCluster {
        toml::from_str(text).expect("valid [cluster] table")
    }

    #[test]
    fn no_url_means_no_cluster() {
        assert_eq!(merge(None, &[], Some("a")).unwrap(), None);
        assert_eq!(
            merge(Some(table("node_name = \"a\"")), &[], None).unwrap(),
            None
        );
    }

    #[test]
    fn flags_replace_the_file_and_defaults_fill_the_rest() {
        let file = table("nats_urls = [\"nats://f:4222\"]\nnode_name = \"file\"\ntoken = \"t\"");
        let c = merge(Some(file), &["nats://flag:4222".into()], Some("flag-1"))
            .unwrap()
            .unwrap();
        assert_eq!(c.nats_urls, vec!["nats://flag:4222".to_string()]);
        assert_eq!(c.node_name, "flag-1");
        assert_eq!(c.name, DEFAULT_CLUSTER_NAME);
        assert_eq!(c.auth, NatsAuth::Token("t".into()));
        assert_eq!(c.queue_capacity, DEFAULT_QUEUE_CAPACITY);
        assert_eq!(c.stall, Duration::from_millis(DEFAULT_STALL_MS));
        assert_eq!(c.node_ttl, Duration::from_millis(DEFAULT_NODE_TTL_MS));
        assert_eq!(c.partition_mode, PartitionMode::Serve);
        let fence = table("partition_mode = \"fence\"\nnode_ttl_ms = 5000");
        let c = merge(Some(fence), &["nats://x:4222".into()], Some("n"))
            .unwrap()
            .unwrap();
        assert_eq!(c.partition_mode, PartitionMode::Fence);
        assert_eq!(c.node_ttl, Duration::from_millis(5000));
    }

    #[test]
    fn bad_names_two_auth_methods_and_half_pairs_are_refused() {
        let urls = ["nats://x:4222".to_string()];
        for name in ["", "a.b", "a b", "a*", &"n".repeat(65)] {
            assert!(merge(None, &urls, Some(name)).is_err(), "{name:?}");
        }
        for text in [
            "token = \"t\"\nuser = \"u\"\npassword = \"p\"",
            "user = \"u\"",
            "tls_cert_file = \"c.pem\"",
            "queue_capacity = 0",
            "kv_replicas = 0",
            "name = \"a.b\"",
            "node_ttl_ms = 1000",
            "takeover_timeout_ms = 0",
        ] {
            assert!(
                merge(Some(table(text)), &urls, Some("n")).is_err(),
                "{text}"
            );
        }
    }

    #[test]
    fn an_unknown_partition_mode_is_refused() {
        assert!(toml::from_str::<FileCluster>("partition_mode = \"ignore\"").is_err());
    }

    #[test]
    fn the_default_node_name_is_a_valid_name() {
        assert!(valid_name(&default_node_name()));
    }
}
