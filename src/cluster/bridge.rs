//! The bridge thread, `fanmq-cluster`: one tokio `current_thread` runtime
//! with a `LocalSet` running the NATS client (async-nats is tokio-only) and
//! the tasks between it and the shards (docs/design/cluster.md §3).
//!
//! - **publish**: batches from the shards' queue, each message published
//!   once on its subject (the data connection has no echo, so this node never
//!   gets its own messages back); retained ones also go to the bucket;
//! - **interest**: per distinct MQTT filter, the shards interested and the
//!   NATS subscriptions held (subscribed for the first shard, dropped after
//!   the last), one reader task per subscription that hands messages to the
//!   interested shards with `try_send` (behind what waits in a shard's
//!   backlog, cluster::backlog);
//! - **retained**: a watch of the bucket, every change sent to every shard;
//! - **heartbeat**: `<root>.n.<node>` every [`HEARTBEAT`], and the other
//!   nodes' heard, for `/api/v1/cluster`.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv::{self, Operation};
use async_nats::{Client, ConnectOptions, Event, ServerAddr};
use bytes::Bytes;
use bytestring::ByteString;
use futures_lite::StreamExt;
use log::{debug, info, warn};
use tokio::task::JoinHandle;

use crate::cluster::backlog::ToShards;
use crate::cluster::headers::Origin;
use crate::cluster::link::{ClusterStatus, Control, Interest, MAX_SHARE_WEIGHT, Outgoing, ToShard};
use crate::cluster::{
    ClusterError, headers, ownership, positions, received, retained, subject, tail,
};
use crate::config::cluster::{ClusterConfig, NatsAuth, PartitionMode};
use crate::protocol::message::Message;
use crate::protocol::topic;
use crate::protocol::v3::QoS;
use crate::router::shared;

/// How often the node says it is alive, and how often the bridge checks
/// the shutdown flag.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// Most messages of one subscription handed to a shard in one batch.
const DELIVER_BATCH: usize = 256;
/// Wait before retrying the retained bucket after an error (the link is
/// down, JetStream not ready).
const KV_RETRY: Duration = Duration::from_secs(1);
/// Longest the interest task waits for the server to confirm new
/// subscriptions (a round trip, `confirm`) before going on to the next changes;
/// their SUBACKs then go unconfirmed.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Most interest changes applied before one confirmation of them all: a
/// storm of new filters costs one round trip per this many.
const INTEREST_BATCH: usize = 256;
/// Commands the NATS client queues before a publish waits: far above the
/// default 2,048, so that bursts pass (design §3).
const CLIENT_CAPACITY: usize = 65_536;

/// Longest the bridge holds a session's filters for the claim of the
/// node's shard that takes the session over from another shard or its own
/// ([`Control::Lend`]; each filter goes earlier, once that shard holds it
/// itself: `tail::Moving::held_by`): as long as a connection waits for its
/// claim's answers (the shards' claim timeout, 10 s), after which it
/// attached, or gave up. Only a move inside the node opens one: one pseudo
/// shard per session, its filters' entries in the interest table.
const LEND_HOLD: Duration = Duration::from_secs(10);

/// What the bridge thread starts with.
pub struct BridgeSetup {
    /// The settings.
    pub config: ClusterConfig,
    /// Largest retained value the bucket must hold: `max_packet_size` plus
    /// the value's own fields.
    pub max_value_size: usize,
    /// Publish batches from every shard.
    pub publish: async_channel::Receiver<Outgoing>,
    /// Interest changes and connects from every shard.
    pub interest: async_channel::Receiver<Control>,
    /// Each shard's queue, by shard index.
    pub to_shards: Vec<async_channel::Sender<ToShard>>,
    /// Shared figures.
    pub status: Arc<ClusterStatus>,
}

/// One MQTT filter the node holds NATS subscriptions for.
struct Held {
    /// The shards with a subscriber.
    shards: BTreeSet<usize>,
    /// The reader task of each NATS subscription (aborting it drops the
    /// subscriber, which unsubscribes).
    readers: Vec<JoinHandle<()>>,
    /// The subjects subscribed.
    subjects: Vec<String>,
    /// Whether the filter also needs the escaped subject.
    escaped: bool,
    /// For a shared subscription: the shard that gets the next message
    /// NATS gave this node (round robin over `shards`).
    turn: usize,
    /// For a shared subscription: the members each shard reported (at most
    /// [`MAX_SHARE_WEIGHT`] each); empty for a plain filter.
    weights: HashMap<usize, u32>,
    /// For a shared subscription: the queue subscriptions held beyond the
    /// first per subject (one reader per subject each), so that the node
    /// holds one per member, up to [`MAX_SHARE_WEIGHT`]: NATS picks among
    /// them all.
    extra: Vec<Vec<JoinHandle<()>>>,
    /// For a shared subscription: tells its readers to drain their queue
    /// subscriptions ([`drain_shares`]).
    drain: Option<tokio::sync::watch::Sender<bool>>,
}

impl Held {
    /// Queue subscriptions per subject the group's members ask for.
    fn copies_wanted(&self) -> usize {
        self.weights
            .values()
            .sum::<u32>()
            .clamp(1, MAX_SHARE_WEIGHT) as usize
    }

    /// Drops the extra copies beyond what the members ask for.
    fn trim_copies(&mut self, status: &ClusterStatus) {
        while 1 + self.extra.len() > self.copies_wanted() {
            let Some(copy) = self.extra.pop() else {
                break;
            };
            drop_readers(status, copy);
        }
    }
}

/// Ends NATS subscriptions (aborting a reader drops its subscriber, which
/// unsubscribes) and counts them gone.
fn drop_readers(status: &ClusterStatus, readers: Vec<JoinHandle<()>>) {
    status
        .figures
        .cluster_subscriptions
        .fetch_sub(readers.len() as u64, Ordering::Relaxed);
    for reader in readers {
        reader.abort();
    }
}

/// The bridge's tables, shared by its tasks (one thread: `Rc<RefCell>`).
pub(super) struct Bridge {
    /// The NATS client (data connection, no echo).
    pub(super) client: Client,
    /// The queue connection (echo on): the queue subscriptions of shared
    /// subscriptions only, since this node's own publishes must reach its
    /// own members through the queue group (design §7).
    queue_client: Client,
    /// Subject root.
    pub(super) root: String,
    /// This node's name.
    pub(super) node: String,
    /// This node's incarnation: random at each start, so that a record of an
    /// earlier run of the node is not taken for this one's.
    pub(super) incarnation: String,
    /// The same as a number: the node of the origin of every message this
    /// node publishes (`headers::Origin`).
    pub(super) origin: u64,
    /// Sessions moving to or from this node (cluster::tail).
    pub(super) moving: tail::Moving,
    /// This node's recent publishes and their positions, for sessions
    /// moving while clients of this node publish (cluster::positions).
    pub(super) local: positions::Local,
    /// The numbers of the batches NATS brought and the recent ones, for
    /// sessions moving inside this node (cluster::received).
    received: received::Received,
    /// The queue of interest changes the bridge applies in order (set once
    /// `interest_loop` runs): a moving session's holds go through it too.
    pub(super) interest_queue: Option<async_channel::Sender<Interest>>,
    /// The other nodes heard (heartbeats), and when.
    pub(super) nodes: HashMap<String, Instant>,
    /// When the bridge started: a node not heard since is taken for dead
    /// only once `node_ttl` has passed.
    pub(super) started: Instant,
    /// A node not heard for this long is dead.
    pub(super) node_ttl: Duration,
    /// Longest wait for an owner's answer to a take-over request.
    pub(super) takeover_timeout: Duration,
    /// CONNECTs while the link is down.
    pub(super) partition_mode: PartitionMode,
    /// The sessions bucket, once it is there.
    pub(super) sessions: Option<kv::Store>,
    /// The client ids this node owns in the sessions bucket: the claim that
    /// holds each (shard, token) and the record's revision.
    pub(super) owned: HashMap<ByteString, ownership::Owned>,
    /// Ownership beyond `owned`: the subscriptions bucket, ids granted
    /// without a record, state handed over to racing nodes.
    pub(super) ownership: ownership::Tables,
    /// Held filters.
    filters: HashMap<ByteString, Held>,
    /// The shards interested in the escaped subject, with how many of their
    /// filters need it; and its reader.
    escaped: (HashMap<usize, usize>, Option<JoinHandle<()>>),
    /// Each shard's queue.
    pub(super) to_shards: ToShards,
    /// Shared figures.
    pub(super) status: Arc<ClusterStatus>,
    /// Retained updates this node wrote whose echo from the watch is still
    /// due, by key: the watch skips those (the shards hold them already).
    own_writes: HashMap<String, u32>,
    /// The topic of each key seen in the bucket (a delete carries only the
    /// key).
    topics: HashMap<String, ByteString>,
}

/// The bridge as its tasks hold it.
pub(super) type Shared = Rc<RefCell<Bridge>>;

/// A retained update for the bucket (`value` None: a delete).
struct RetainedWrite {
    /// The bucket's key of the topic.
    key: String,
    /// The value, or None to delete the key.
    value: Option<Bytes>,
    /// Where the outcome goes when a held acknowledgement waits for it:
    /// `false` on an error; `true` after the batch's last write (`last`),
    /// since writes are made in order.
    stored: Option<(async_channel::Sender<bool>, bool)>,
}

/// Runs the bridge until the broker stops: the body of the `fanmq-cluster`
/// thread.
///
/// # Errors
/// The tokio runtime cannot start, or the NATS options are invalid
/// (unreadable credentials file, bad URL).
pub fn run(setup: BridgeSetup) -> Result<(), ClusterError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClusterError::Runtime)?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve(setup))
}

/// The NATS options from the settings.
async fn options(
    config: &ClusterConfig,
    status: &Arc<ClusterStatus>,
    queue: bool,
) -> Result<ConnectOptions, ClusterError> {
    let events = status.clone();
    let mut options = ConnectOptions::new()
        .retry_on_initial_connect()
        .client_capacity(CLIENT_CAPACITY);
    options = if queue {
        // Its link state is the data connection's to the same servers;
        // only its errors are logged.
        options
            .name(format!("fanmq {} queue", config.node_name))
            .event_callback(|event| async move {
                debug!("cluster: NATS queue connection: {event}");
            })
    } else {
        options
            .name(format!("fanmq {}", config.node_name))
            .no_echo()
            .event_callback(move |event| {
                let status = events.clone();
                async move { on_event(&status, event) }
            })
    };
    options = match &config.auth {
        NatsAuth::None => options,
        NatsAuth::Token(token) => options.token(token.clone()),
        NatsAuth::UserPassword(user, password) => {
            options.user_and_password(user.clone(), password.clone())
        }
        NatsAuth::NkeySeedFile(path) => {
            let seed =
                std::fs::read_to_string(path).map_err(|source| ClusterError::Credentials {
                    path: path.clone(),
                    source,
                })?;
            options.nkey(seed.trim().to_string())
        }
        NatsAuth::CredsFile(path) => {
            options
                .credentials_file(path)
                .await
                .map_err(|source| ClusterError::Credentials {
                    path: path.clone(),
                    source,
                })?
        }
    };
    if let Some(ca) = &config.tls_ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &config.tls_client {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if config.tls_required {
        options = options.require_tls(true);
    }
    Ok(options)
}

/// What the NATS client reports: link state, reconnects, slow consumers,
/// in the log and the figures.
fn on_event(status: &ClusterStatus, event: Event) {
    let f = &status.figures;
    match event {
        Event::Connected => {
            status.errors_since_up.store(0, Ordering::Relaxed);
            let n = f.cluster_connects.fetch_add(1, Ordering::Relaxed);
            f.cluster_link_up.store(1, Ordering::Relaxed);
            if n == 0 {
                info!("cluster: connected to NATS");
            } else {
                warn!("cluster: reconnected to NATS (subscriptions restored by the client)");
            }
        }
        Event::Disconnected => {
            f.cluster_link_up.store(0, Ordering::Relaxed);
            warn!(
                "cluster: NATS link down, serving local clients only and reconnecting with backoff"
            );
        }
        Event::SlowConsumer(sid) => {
            f.cluster_slow_consumer.fetch_add(1, Ordering::Relaxed);
            warn!("cluster: NATS subscription {sid} is a slow consumer: messages dropped");
        }
        Event::Closed => {
            f.cluster_link_up.store(0, Ordering::Relaxed);
            info!("cluster: NATS connection closed");
        }
        Event::ClientError(e) => {
            if status.errors_since_up.fetch_add(1, Ordering::Relaxed) == 0 {
                warn!(
                    "cluster: cannot reach NATS ({e}): serving local clients only, retrying with backoff"
                );
            } else {
                debug!("cluster: NATS: {e}");
            }
        }
        other => warn!("cluster: NATS: {other}"),
    }
}

/// Connects and runs every task until shutdown.
async fn serve(setup: BridgeSetup) -> Result<(), ClusterError> {
    let config = setup.config;
    let status = setup.status;
    let addrs = config
        .nats_urls
        .iter()
        .map(|u| {
            u.parse::<ServerAddr>()
                .map_err(|e| ClusterError::Url(u.clone(), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let client = options(&config, &status, false)
        .await?
        .connect(addrs.clone())
        .await
        .map_err(|e| ClusterError::Connect(e.to_string()))?;
    let queue_client = options(&config, &status, true)
        .await?
        .connect(addrs)
        .await
        .map_err(|e| ClusterError::Connect(e.to_string()))?;
    info!(
        "cluster: node {} joining through NATS {}",
        config.node_name,
        config.nats_urls.join(", ")
    );
    let origin = fastrand::u64(..);
    let bridge: Shared = Rc::new(RefCell::new(Bridge {
        client: client.clone(),
        queue_client: queue_client.clone(),
        root: config.name.clone(),
        node: config.node_name.clone(),
        incarnation: format!("{origin:016x}"),
        origin,
        moving: tail::Moving::default(),
        local: positions::Local::default(),
        received: received::Received::default(),
        interest_queue: None,
        nodes: HashMap::new(),
        started: Instant::now(),
        node_ttl: config.node_ttl,
        takeover_timeout: config.takeover_timeout,
        partition_mode: config.partition_mode,
        sessions: None,
        owned: HashMap::new(),
        ownership: ownership::Tables::default(),
        filters: HashMap::new(),
        escaped: (HashMap::new(), None),
        to_shards: ToShards::new(setup.to_shards, config.queue_capacity, status.clone()),
        status: status.clone(),
        own_writes: HashMap::new(),
        topics: HashMap::new(),
    }));
    let (puts, put_queue) = async_channel::unbounded::<RetainedWrite>();
    let tasks = [
        tokio::task::spawn_local(publish_loop(
            bridge.clone(),
            setup.publish,
            puts,
            config.node_name.clone(),
        )),
        tokio::task::spawn_local(interest_loop(bridge.clone(), setup.interest)),
        tokio::task::spawn_local(retained_loop(
            bridge.clone(),
            put_queue,
            config.kv_replicas,
            setup.max_value_size,
        )),
        tokio::task::spawn_local(heartbeat_loop(bridge.clone(), config.node_name.clone())),
        tokio::task::spawn_local(ownership::sessions_loop(bridge.clone(), config.kv_replicas)),
        tokio::task::spawn_local(ownership::serve_takeovers(bridge.clone())),
        tokio::task::spawn_local(tail::serve_tails(bridge.clone())),
    ];
    while !status.shutdown.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for task in tasks {
        task.abort();
    }
    // Whatever was published goes out before the connection closes.
    let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
    status.figures.cluster_link_up.store(0, Ordering::Relaxed);
    info!("cluster: bridge stopped");
    Ok(())
}

/// Publishes every message of every batch once.
async fn publish_loop(
    bridge: Shared,
    batches: async_channel::Receiver<Outgoing>,
    puts: async_channel::Sender<RetainedWrite>,
    node: String,
) {
    let (client, root, status, node_origin) = {
        let b = bridge.borrow();
        (b.client.clone(), b.root.clone(), b.status.clone(), b.origin)
    };
    let f = &status.figures;
    let published = bridge.borrow().local.published();
    while let Ok(Outgoing {
        messages: batch,
        stored,
        shard,
        first,
    }) = batches.recv().await
    {
        let now = Instant::now();
        // Kept a while, numbered: the sequence number of the last QoS 1/2
        // message before this batch (each stamped one counts, published
        // or not, so the ring numbers them alike).
        let mut seq = bridge.borrow_mut().local.took(&batch, (shard, first), now);
        let mut writes = Vec::new();
        for message in batch.iter() {
            // `$SYS` is per node.
            if message.topic == "$SYS" || message.topic.starts_with("$SYS/") {
                continue;
            }
            if message.qos != QoS::AtMostOnce {
                seq += 1;
            }
            if message.retain {
                let value = if message.payload.is_empty() {
                    None
                } else {
                    retained::encode(message, &node, now)
                };
                let key = retained::key(&message.topic);
                if value.is_some() || message.payload.is_empty() {
                    writes.push(RetainedWrite {
                        key,
                        value,
                        stored: None,
                    });
                }
            }
            if !status.link_up() {
                f.cluster_publish_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let origin = Origin {
                node: node_origin,
                seq,
            };
            let Some(out) = headers::encode(&root, message, now, origin) else {
                continue;
            };
            let sent = match out.headers {
                Some(h) => {
                    client
                        .publish_with_headers(out.subject, h, out.payload)
                        .await
                }
                None => client.publish(out.subject, out.payload).await,
            };
            // In the client's queue, ahead of anything sent after it.
            published.set(seq);
            match sent {
                Ok(()) => f.cluster_published.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    debug!("cluster: publish failed: {e}");
                    f.cluster_publish_dropped.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
        bridge.borrow_mut().local.done(shard, first, batch.len());
        queue_retained(&bridge, &puts, writes, stored);
    }
}

/// Queues one batch's retained writes, in order. Held acknowledgements
/// waiting for them (`stored`) are answered after the last write, or at
/// once: `true` with nothing to write; with the link down, `true` in
/// `serve` mode (the node holds the messages, the bucket may never: counted)
/// and `false` in `fence` mode (never acknowledged).
fn queue_retained(
    bridge: &Shared,
    puts: &async_channel::Sender<RetainedWrite>,
    mut writes: Vec<RetainedWrite>,
    stored: Option<async_channel::Sender<bool>>,
) {
    if let Some(answer) = stored {
        let b = bridge.borrow();
        let n = writes.len();
        if n == 0 {
            let _ = answer.try_send(true);
        } else if !b.status.link_up() {
            let serve = b.partition_mode == PartitionMode::Serve;
            if serve {
                b.status
                    .figures
                    .cluster_retained_unconfirmed
                    .fetch_add(1, Ordering::Relaxed);
            }
            let _ = answer.try_send(serve);
        } else {
            for (i, write) in writes.iter_mut().enumerate() {
                write.stored = Some((answer.clone(), i + 1 == n));
            }
        }
    }
    for write in writes {
        let _ = puts.try_send(write);
    }
}

/// Hands every interest change, in order, to [`apply_interest`], and starts
/// every claim of a client id at once, in a task of its own (a claim must
/// not wait behind subscriptions that wait for a NATS server that is down,
/// nor behind a slow owner's answer); releases are applied at once.
async fn interest_loop(bridge: Shared, changes: async_channel::Receiver<Control>) {
    let (interest, in_order) = async_channel::unbounded();
    bridge.borrow_mut().interest_queue = Some(interest.clone());
    tokio::task::spawn_local(apply_interest(bridge.clone(), in_order));
    while let Ok(change) = changes.recv().await {
        match change {
            Control::Interest(change) => {
                let _ = interest.send(change).await;
            }
            Control::Lend {
                client_id,
                shard,
                token,
                after,
                filters,
            } => {
                lend(
                    &bridge,
                    &interest,
                    (client_id, shard, token),
                    after,
                    filters,
                )
                .await
            }
            Control::Claim(request) => ownership::start_claim(&bridge, request),
            Control::Released {
                client_id,
                shard,
                token,
            } => ownership::released(&bridge, client_id, shard, token),
            Control::Subscriptions {
                client_id,
                shard,
                token,
                image,
            } => ownership::subscriptions(&bridge, &client_id, shard, token, image),
            Control::Restored {
                client_id,
                shard,
                token,
                image,
            } => ownership::restored(&bridge, client_id, shard, token, image),
            Control::Unclaimed {
                client_id,
                shard,
                token,
                answer,
                held,
            } => ownership::unclaimed(&bridge, client_id, (shard, token), answer, held),
            Control::Seen { client_id, seen } => {
                bridge
                    .borrow_mut()
                    .local
                    .evicted(client_id, seen, Instant::now());
            }
            Control::Unsent { shard, first, len } => {
                bridge.borrow_mut().local.done(shard, first, len);
            }
        }
    }
}

/// Holds `filters` for shard `shard` (a claim there, `token`, takes the
/// persistent session `client_id` over from a shard of this node, whose
/// state holds NATS's batches up to number `after`, [`Control::Lend`])
/// for [`LEND_HOLD`]: a pseudo shard whose messages go to `shard`
/// ([`tail::Moving::lend`]; as each filter's addition is applied, the
/// batches since `after` go first, [`lent_since`]), added in the interest queue (`interest`)
/// before the old shard's removals that come after the lend, so that the
/// node's NATS subscriptions do not lapse while no router of the node has
/// the session; each filter's removal comes after the claim's shard's own
/// addition of it ([`apply_interest`]), the rest when the session's next
/// move replaces the lend (after that one's additions) or at the end.
async fn lend(
    bridge: &Shared,
    interest: &async_channel::Sender<Interest>,
    (client_id, shard, token): (ByteString, usize, u64),
    after: u64,
    filters: Vec<ByteString>,
) {
    let lent = bridge
        .borrow_mut()
        .moving
        .lend(client_id.clone(), (shard, token), after, &filters);
    let (pseudo, replaced) = lent;
    for filter in filters {
        let add = Interest {
            shard: pseudo,
            filter,
            add: true,
            ready: None,
        };
        let _ = interest.send(add).await;
    }
    if let Some(replaced) = replaced {
        tail::close(bridge, replaced);
    }
    let bridge = bridge.clone();
    tokio::task::spawn_local(async move {
        tokio::time::sleep(LEND_HOLD).await;
        let ended = bridge.borrow_mut().moving.lend_ended(&client_id, pseudo);
        if ended {
            tail::close(&bridge, pseudo);
        }
    });
}

/// The addition of `filter` for `shard` was applied: if `shard` is a
/// lend's pseudo shard, its claim's shard gets the filter's batches since
/// those the session's state holds, then (after this, in its queue) every
/// later one ([`ToShard::Lent`], cluster::received); the escaped subject's
/// too, once, when the filter is the lend's first to hold it.
fn lent_since(b: &mut Bridge, shard: usize, filter: &ByteString) {
    let Some(lend) = b.moving.lend_of(shard) else {
        return;
    };
    let escaped = b.filters.get(filter).is_some_and(|h| h.escaped);
    let mut lent = vec![Some(filter.clone())];
    if escaped && b.moving.lend_escaped(shard) {
        lent.push(None);
    }
    for filter in lent {
        let (batches, whole) = b.received.since(filter.as_deref(), lend.after);
        let marker = ToShard::Lent {
            token: lend.token,
            filter,
            batches,
            whole,
        };
        // In order with the deliveries, never dropped (cluster::backlog).
        let _ = b.to_shards.control(lend.shard, marker);
    }
}

/// Which NATS connections got new subscriptions that a flush must confirm.
#[derive(Clone, Copy, Debug, Default)]
struct ToFlush {
    /// The data connection (plain subscriptions, the escaped subject).
    data: bool,
    /// The queue connection (shared subscriptions).
    queue: bool,
}

/// Applies the interest changes one after the other, what is queued at
/// once (up to [`INTEREST_BATCH`]) before one confirmation per connection that
/// got new subscriptions: the server holds them once it answered the request
/// sent after them. Then the additions' `ready` senders are dropped, which
/// lets their SUBACKs go: at once while the link is down (the client
/// subscribes again on reconnect) or when nothing new was subscribed, at
/// most [`FLUSH_TIMEOUT`] later otherwise.
async fn apply_interest(bridge: Shared, changes: async_channel::Receiver<Interest>) {
    while let Ok(first) = changes.recv().await {
        let mut ready = Vec::new();
        let mut flush = ToFlush::default();
        let mut next = Some(first);
        let mut applied = 0;
        while let Some(change) = next.take() {
            if change.add {
                // A lend to that shard for the filter ends: it holds it.
                let lent = {
                    let mut b = bridge.borrow_mut();
                    let Bridge {
                        filters, moving, ..
                    } = &mut *b;
                    let held = filters.get(&change.filter);
                    let applied = |p: usize| held.is_some_and(|h| h.shards.contains(&p));
                    moving.held_by(change.shard, &change.filter, applied)
                };
                let filter = change.filter.clone();
                let shard = change.shard;
                let new = add_interest(&bridge, shard, change.filter).await;
                // No await from here to the marker: what NATS brings of the
                // filter from now on reaches the claim's shard after it.
                lent_since(&mut bridge.borrow_mut(), shard, &filter);
                for pseudo in lent {
                    remove_interest(&bridge, pseudo, &filter);
                }
                flush.data |= new.data;
                flush.queue |= new.queue;
                ready.extend(change.ready);
            } else {
                remove_interest(&bridge, change.shard, &change.filter);
            }
            applied += 1;
            if applied < INTEREST_BATCH {
                next = changes.try_recv().ok();
            }
        }
        refresh_view(&bridge);
        if ready.is_empty() {
            continue;
        }
        let (client, queue_client, status) = {
            let b = bridge.borrow();
            (b.client.clone(), b.queue_client.clone(), b.status.clone())
        };
        let confirmed = if !status.link_up() {
            false
        } else {
            let mut confirmed = true;
            for (wanted, client) in [(flush.data, client), (flush.queue, queue_client)] {
                if wanted {
                    confirmed &= confirm(&client).await;
                }
            }
            confirmed
        };
        if !confirmed {
            status
                .figures
                .cluster_suback_unconfirmed
                .fetch_add(ready.len() as u64, Ordering::Relaxed);
        }
        drop(ready);
    }
}

/// Confirms that the server holds every subscription `client` sent before:
/// a request on a fresh inbox subject nobody subscribes to, which the
/// server answers itself ("no responders") once it read it, hence after
/// the subscriptions sent before it on the same connection; at most
/// [`FLUSH_TIMEOUT`]; whether it did. (async-nats' `flush` only writes the
/// socket: a SUBACK sent on it could reach the client before the server
/// had read the subscription, and a message another node published at
/// once was missed.)
async fn confirm(client: &Client) -> bool {
    let probe = client.request(client.new_inbox(), Bytes::new());
    match tokio::time::timeout(FLUSH_TIMEOUT, probe).await {
        // An answer of any kind comes from the server after it read the
        // request, and so every subscription before it.
        Ok(Ok(_)) => true,
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => true,
        Ok(Err(e)) => {
            debug!("cluster: no confirmation of new subscriptions: {e}");
            false
        }
        Err(_) => {
            debug!("cluster: no confirmation of new subscriptions within {FLUSH_TIMEOUT:?}");
            false
        }
    }
}

/// Shard `shard` got its first subscriber of `filter`: subscribes what the
/// node does not hold yet; the connections that got new subscriptions.
async fn add_interest(bridge: &Shared, shard: usize, filter: ByteString) -> ToFlush {
    if let Some(flush) = add_member(bridge, shard, &filter).await {
        return flush;
    }
    // Another shard holds it already: only the escaped subject may be new.
    let held = {
        let mut b = bridge.borrow_mut();
        let found = b.filters.get_mut(&filter).map(|held| {
            let new = held.shards.insert(shard);
            new && held.escaped
        });
        if found == Some(true) {
            add_escaped(&mut b, shard);
        }
        found
    };
    if let Some(needs_escaped) = held {
        let data = needs_escaped && ensure_escaped_reader(bridge).await;
        return ToFlush { data, queue: false };
    }
    let root = bridge.borrow().root.clone();
    let share = match shared::parse(&filter) {
        shared::Parsed::Shared {
            name,
            filter: inner,
        } => Some((name, inner)),
        _ => None,
    };
    let (subjects, escaped, readers, queued) = match share {
        Some((group, inner)) => {
            // A queue subscription per subject, the escaped one included
            // (a message NATS gives this node there is matched here).
            let (mut subjects, escaped) = subject::filter_subjects(&root, inner);
            if escaped {
                subjects.push(subject::escaped_subject(&root));
            }
            let queue = subject::queue_group(&root, group, inner);
            let (drain, _) = tokio::sync::watch::channel(false);
            let readers = queue_readers(bridge, &subjects, &queue, &filter, inner, &drain).await;
            (subjects, false, readers, Some(drain))
        }
        None => {
            let (subjects, escaped) = subject::filter_subjects(&root, &filter);
            let client = bridge.borrow().client.clone();
            let mut readers = Vec::with_capacity(subjects.len());
            for s in &subjects {
                match client.subscribe(s.clone()).await {
                    Ok(sub) => readers.push(tokio::task::spawn_local(read_subscription(
                        bridge.clone(),
                        Some(filter.clone()),
                        sub,
                    ))),
                    Err(e) => warn!("cluster: cannot subscribe to {s}: {e}"),
                }
            }
            (subjects, escaped, readers, None)
        }
    };
    {
        let mut b = bridge.borrow_mut();
        b.status
            .figures
            .cluster_subscriptions
            .fetch_add(readers.len() as u64, Ordering::Relaxed);
        if escaped {
            add_escaped(&mut b, shard);
        }
        b.filters.insert(
            filter.clone(),
            Held {
                shards: BTreeSet::from([shard]),
                readers,
                subjects,
                escaped,
                turn: 0,
                // A moving session's hold is no member (`tail::is_pseudo`).
                weights: if queued.is_some() && !tail::is_pseudo(shard) {
                    HashMap::from([(shard, 1)])
                } else {
                    HashMap::new()
                },
                extra: Vec::new(),
                drain: queued.clone(),
            },
        );
    }
    if escaped {
        ensure_escaped_reader(bridge).await;
    }
    ToFlush {
        data: queued.is_none(),
        queue: queued.is_some(),
    }
}

/// One more member on shard `shard` of the shared subscription `share`
/// the node holds already: one more queue subscription per subject while
/// the members ask for more ([`MAX_SHARE_WEIGHT`] at most). None: not a
/// shared subscription the node holds.
async fn add_member(bridge: &Shared, shard: usize, share: &ByteString) -> Option<ToFlush> {
    let shared::Parsed::Shared {
        name,
        filter: inner,
    } = shared::parse(share)
    else {
        return None;
    };
    let (subjects, queue, drain) = {
        let mut b = bridge.borrow_mut();
        let root = b.root.clone();
        let held = b.filters.get_mut(share)?;
        held.shards.insert(shard);
        if tail::is_pseudo(shard) {
            // A moving session's hold: no member, no copy of its own.
            return Some(ToFlush::default());
        }
        *held.weights.entry(shard).or_insert(0) += 1;
        if 1 + held.extra.len() >= held.copies_wanted() {
            return Some(ToFlush::default());
        }
        let queue = subject::queue_group(&root, name, inner);
        let (drain, _) = tokio::sync::watch::channel(false);
        (
            held.subjects.clone(),
            queue,
            held.drain.clone().unwrap_or(drain),
        )
    };
    let readers = queue_readers(bridge, &subjects, &queue, share, inner, &drain).await;
    let mut b = bridge.borrow_mut();
    b.status
        .figures
        .cluster_subscriptions
        .fetch_add(readers.len() as u64, Ordering::Relaxed);
    let status = b.status.clone();
    match b.filters.get_mut(share) {
        Some(held) => {
            held.extra.push(readers);
            held.trim_copies(&status);
        }
        None => drop_readers(&status, readers),
    }
    Some(ToFlush {
        data: false,
        queue: true,
    })
}

/// Queue subscriptions of the shared subscription `share` (Topic Filter
/// `inner`) in NATS queue group `queue`, one per subject, each with its
/// reader task, which drains its subscription when `drain` says so.
async fn queue_readers(
    bridge: &Shared,
    subjects: &[String],
    queue: &str,
    share: &ByteString,
    inner: &str,
    drain: &tokio::sync::watch::Sender<bool>,
) -> Vec<JoinHandle<()>> {
    let client = bridge.borrow().queue_client.clone();
    let mut readers = Vec::with_capacity(subjects.len());
    for s in subjects {
        match client.queue_subscribe(s.clone(), queue.to_string()).await {
            Ok(sub) => readers.push(tokio::task::spawn_local(read_queue_subscription(
                bridge.clone(),
                share.clone(),
                ByteString::from(inner),
                sub,
                drain.subscribe(),
            ))),
            Err(e) => warn!("cluster: cannot subscribe to {s} in queue {queue}: {e}"),
        }
    }
    readers
}

/// Shard `shard` has one more filter that needs the escaped subject.
fn add_escaped(b: &mut Bridge, shard: usize) {
    *b.escaped.0.entry(shard).or_insert(0) += 1;
}

/// Subscribes the escaped subject if nobody reads it yet; whether it did.
async fn ensure_escaped_reader(bridge: &Shared) -> bool {
    let (client, subject) = {
        let b = bridge.borrow();
        if b.escaped.1.is_some() {
            return false;
        }
        (b.client.clone(), subject::escaped_subject(&b.root))
    };
    match client.subscribe(subject.clone()).await {
        Ok(sub) => {
            let reader = tokio::task::spawn_local(read_subscription(bridge.clone(), None, sub));
            let mut b = bridge.borrow_mut();
            b.status
                .figures
                .cluster_subscriptions
                .fetch_add(1, Ordering::Relaxed);
            if let Some(old) = b.escaped.1.replace(reader) {
                old.abort();
                b.status
                    .figures
                    .cluster_subscriptions
                    .fetch_sub(1, Ordering::Relaxed);
            }
            true
        }
        Err(e) => {
            warn!("cluster: cannot subscribe to {subject}: {e}");
            false
        }
    }
}

/// Shard `shard` lost its last subscriber of `filter`.
fn remove_interest(bridge: &Shared, shard: usize, filter: &str) {
    let mut b = bridge.borrow_mut();
    let status = b.status.clone();
    let Some(held) = b.filters.get_mut(filter) else {
        return;
    };
    if let Some(weight) = held.weights.get_mut(&shard) {
        // A shared subscription: one member fewer on the shard.
        *weight -= 1;
        if *weight > 0 {
            held.trim_copies(&status);
            return;
        }
        held.weights.remove(&shard);
        held.trim_copies(&status);
    }
    if !held.shards.remove(&shard) {
        return;
    }
    let escaped = held.escaped;
    let gone = held
        .shards
        .is_empty()
        .then(|| b.filters.remove(filter))
        .flatten();
    if let Some(held) = gone {
        let extra = held.extra.into_iter().flatten();
        drop_readers(&status, held.readers.into_iter().chain(extra).collect());
    }
    if escaped {
        let left = b.escaped.0.get_mut(&shard).map(|n| {
            *n -= 1;
            *n
        });
        if left == Some(0) {
            b.escaped.0.remove(&shard);
        }
        if b.escaped.0.is_empty()
            && let Some(reader) = b.escaped.1.take()
        {
            reader.abort();
            b.status
                .figures
                .cluster_subscriptions
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Copies the subjects held into the admin view.
fn refresh_view(bridge: &Shared) {
    let b = bridge.borrow();
    let mut subjects: Vec<String> = b
        .filters
        .values()
        .flat_map(|h| h.subjects.iter().cloned())
        .collect();
    if b.escaped.1.is_some() {
        subjects.push(subject::escaped_subject(&b.root));
    }
    subjects.sort();
    if let Ok(mut view) = b.status.view.lock() {
        view.subjects = subjects;
    }
}

/// The next batch of one NATS subscription: what is there already after
/// the first message, decoded, at most [`DELIVER_BATCH`], and, while a
/// session moving to or from this node is collected for or guarded
/// against doubles ([`tail::Moving::reads_origins`]), each message's
/// origin (else none); None
/// when the subscription ended. Messages that are no fanmq message are
/// dropped and counted.
async fn next_batch(
    bridge: &Shared,
    sub: &mut async_nats::Subscriber,
) -> Option<(Vec<Message>, Vec<Option<Origin>>)> {
    let first = sub.next().await?;
    let (root, collecting) = {
        let b = bridge.borrow();
        (b.root.clone(), b.moving.reads_origins())
    };
    let now = Instant::now();
    let mut batch = Vec::with_capacity(8);
    let mut origins = Vec::new();
    let mut next = Some(first);
    while let Some(msg) = next.take() {
        if collecting {
            origins.push(headers::origin(msg.headers.as_ref()));
        }
        match headers::decode(
            &root,
            msg.subject.as_str(),
            msg.headers.as_ref(),
            msg.payload,
            now,
        ) {
            Ok(message) => batch.push(message),
            Err(e) => {
                origins.truncate(batch.len());
                debug!("cluster: dropped a message on {}: {e}", msg.subject);
                bridge
                    .borrow()
                    .status
                    .figures
                    .cluster_received_invalid
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        if batch.len() < DELIVER_BATCH {
            next = futures_lite::future::poll_once(sub.next()).await.flatten();
        }
    }
    Some((batch, origins))
}

/// Reads one NATS subscription and hands its messages to the shards with
/// a subscriber of `filter` (`None`: the escaped subject, every shard with
/// a filter that needs it), in batches of what is already there.
async fn read_subscription(
    bridge: Shared,
    filter: Option<ByteString>,
    mut sub: async_nats::Subscriber,
) {
    while let Some((batch, origins)) = next_batch(&bridge, &mut sub).await {
        if batch.is_empty() {
            continue;
        }
        let messages = Arc::new(batch);
        let mut b = bridge.borrow_mut();
        let seq = b
            .received
            .number(filter.as_ref(), &messages, Instant::now());
        let mut shards: Vec<usize> = match &filter {
            Some(f) => b
                .filters
                .get(f)
                .map(|h| h.shards.iter().copied().collect())
                .unwrap_or_default(),
            None => b.escaped.0.keys().copied().collect(),
        };
        if !origins.is_empty() {
            let Bridge {
                filters, moving, ..
            } = &mut *b;
            match &filter {
                Some(f) => {
                    if let Some(held) = filters.get(f) {
                        moving.offer(&held.shards, f, &messages, &origins);
                    }
                }
                None => moving.offer_escaped(shards.iter().copied(), &messages, &origins),
            }
        }
        // A moving session's holds count as pseudo shards: forwarded to a
        // real one, or to none; each shard gets the batch once.
        shards = shards
            .into_iter()
            .filter_map(|s| b.moving.target(s))
            .collect();
        shards.sort_unstable();
        shards.dedup();
        for shard in shards {
            // A session that moved here got some of them already (mostly
            // none: one empty check).
            let except = if origins.is_empty() {
                Vec::new()
            } else {
                b.moving.doubles(shard, &messages, &origins)
            };
            let batch = if except.is_empty() {
                ToShard::Deliver {
                    filter: filter.clone(),
                    seq,
                    messages: messages.clone(),
                }
            } else {
                ToShard::DeliverExcept {
                    filter: filter.clone(),
                    seq,
                    messages: messages.clone(),
                    except,
                }
            };
            deliver(&b, shard, batch);
        }
    }
}

/// Reads one queue subscription of the shared subscription `share` (whose
/// Topic Filter is `filter`): NATS gave each message to this node alone,
/// so each goes to one shard with a member, in turn, which picks one of
/// its members; while a moving session's collector holds `share`
/// ([`tail::Moving::shared_collector`]), each QoS 1/2 message goes to it
/// instead, and a new owner's hold forwarded after its grant names the
/// session to the claim's shard ([`ToShard::DeliverSharedFor`]). Once
/// `drain` says so, unsubscribes and reads what the server sent before it
/// processed that, then ends ([`drain_shares`]).
async fn read_queue_subscription(
    bridge: Shared,
    share: ByteString,
    filter: ByteString,
    mut sub: async_nats::Subscriber,
    mut drain: tokio::sync::watch::Receiver<bool>,
) {
    let mut draining = false;
    loop {
        let next = tokio::select! {
            next = next_batch(&bridge, &mut sub) => next,
            changed = drain.changed(), if !draining => {
                draining = true;
                if changed.is_ok() && *drain.borrow() {
                    // UNSUB, then a PING: the stream ends at the PONG, after
                    // everything the server sent before the UNSUB (the
                    // vendored async-nats': as released it ended earlier and
                    // dropped those, vendor/async-nats/README.fanmq.md).
                    if let Err(e) = sub.drain().await {
                        debug!("cluster: cannot drain a queue subscription of {share}: {e}");
                        return;
                    }
                }
                continue;
            }
        };
        let Some((batch, origins)) = next else {
            return;
        };
        let mut b = bridge.borrow_mut();
        let collector = if origins.is_empty() {
            None
        } else {
            b.moving.shared_collector(&share)
        };
        let Bridge {
            filters, moving, ..
        } = &mut *b;
        let Some(held) = filters.get_mut(&share) else {
            continue;
        };
        // Each shard once, named for a moving session when a forwarded hold
        // targets it (the named session first, else another member there):
        // one batch per shard, in the order NATS gave them.
        let mut shards: Vec<(usize, Option<ByteString>)> = Vec::new();
        for (to, named) in held.shards.iter().filter_map(|&s| moving.shared_target(s)) {
            match shards.iter_mut().find(|(s, _)| *s == to) {
                Some(known) => known.1 = known.1.take().or(named),
                None => shards.push((to, named)),
            }
        }
        // Each shard's batch, by its place in `shards`.
        let mut per_shard: Vec<Vec<(ByteString, Message)>> = vec![Vec::new(); shards.len()];
        for (i, message) in batch.into_iter().enumerate() {
            // The escaped subject carries every unmappable topic.
            if !topic::filter_matches(&filter, &message.topic) {
                continue;
            }
            if let (Some(pseudo), Some(Some(origin))) = (collector, origins.get(i))
                && message.qos != QoS::AtMostOnce
            {
                moving.offer_shared(pseudo, &share, *origin, &message);
                continue;
            }
            let Some(batch) = per_shard.get_mut(held.turn % shards.len().max(1)) else {
                continue;
            };
            held.turn = held.turn.wrapping_add(1);
            batch.push((share.clone(), message));
        }
        for ((shard, named), batch) in shards.into_iter().zip(per_shard) {
            if batch.is_empty() {
                continue;
            }
            let batch = match named {
                Some(client_id) => ToShard::DeliverSharedFor { client_id, batch },
                None => ToShard::DeliverShared(batch),
            };
            deliver(&b, shard, batch);
        }
    }
}

/// The old owner answers pseudo shard `pseudo`'s tail request: each of
/// `shares` (the moving session's shared subscriptions) that only that
/// hold keeps on this node leaves its group here: its readers unsubscribe
/// and read, into the still open collector, what the server sent before
/// (at most [`FLUSH_TIMEOUT`], then they are ended), and the node no
/// longer holds it. From the server's UNSUB on NATS gives the group's
/// messages to the new owner's membership, which is live since before the
/// request: each reaches one of the two. A member that joined on this node
/// meanwhile subscribes anew; another pseudo shard's hold of it ends (a
/// hold forwarded to a claim's shard of a session that left again: it
/// would take messages for no member). A share that a real shard here
/// holds too keeps its subscriptions (this node still has members).
pub(super) async fn drain_shares(bridge: &Shared, pseudo: usize, shares: &[ByteString]) {
    let mut readers = Vec::new();
    {
        let b = bridge.borrow();
        for share in shares {
            let Some(held) = b.filters.get(share) else {
                continue;
            };
            let only = held
                .shards
                .iter()
                .all(|&s| s == pseudo || tail::is_pseudo(s));
            if let (true, Some(drain)) = (only && held.weights.is_empty(), &held.drain) {
                let _ = drain.send(true);
                readers.push(share.clone());
            }
        }
    }
    let mut tasks = Vec::new();
    for share in &readers {
        let mut b = bridge.borrow_mut();
        if let Some(held) = b.filters.get_mut(share) {
            tasks.append(&mut held.readers);
            tasks.extend(held.extra.drain(..).flatten());
        }
    }
    let status = bridge.borrow().status.clone();
    let ended = tokio::time::timeout(FLUSH_TIMEOUT, async {
        for task in &mut tasks {
            let _ = task.await;
        }
    })
    .await;
    if ended.is_err() {
        debug!("cluster: a queue subscription did not drain within {FLUSH_TIMEOUT:?}");
    }
    drop_readers(&status, tasks);
    // No longer held here; a member that joined meanwhile subscribes anew.
    let mut b = bridge.borrow_mut();
    for share in readers {
        let Some(held) = b.filters.remove(&share) else {
            continue;
        };
        let Some(queue) = &b.interest_queue else {
            continue;
        };
        for (&shard, &weight) in &held.weights {
            for _ in 0..weight {
                let _ = queue.try_send(Interest {
                    shard,
                    filter: share.clone(),
                    add: true,
                    ready: None,
                });
            }
        }
    }
}

/// Hands a batch to one shard without waiting (cluster::backlog).
fn deliver(b: &Bridge, shard: usize, batch: ToShard) {
    b.to_shards.deliver(shard, batch);
}

/// The retained bucket: writes this node's retained updates in order, and
/// mirrors every other node's into every shard. Restarts after errors.
async fn retained_loop(
    bridge: Shared,
    puts: async_channel::Receiver<RetainedWrite>,
    replicas: usize,
    max_value_size: usize,
) {
    let (client, root, status) = {
        let b = bridge.borrow();
        (b.client.clone(), b.root.clone(), b.status.clone())
    };
    let name = retained::bucket(&root);
    let store = open_bucket(&client, &status, &name, replicas, max_value_size).await;
    info!("cluster: retained messages in bucket {name}");
    // Ends with the bridge's runtime.
    tokio::task::spawn_local(write_retained(bridge.clone(), store.clone(), puts));
    loop {
        if let Err(e) = watch_retained(&bridge, &store).await {
            status
                .figures
                .cluster_kv_errors
                .fetch_add(1, Ordering::Relaxed);
            debug!("cluster: retained watch ended: {e}");
        }
        tokio::time::sleep(KV_RETRY).await;
    }
}

/// Opens KV bucket `name`, creating it when it is not there, retrying
/// after errors until it is (the link is down, JetStream not ready).
pub(super) async fn open_bucket(
    client: &Client,
    status: &ClusterStatus,
    name: &str,
    replicas: usize,
    max_value_size: usize,
) -> kv::Store {
    let context = async_nats::jetstream::new(client.clone());
    loop {
        match context.get_key_value(name.to_string()).await {
            Ok(store) => return store,
            Err(e) => {
                debug!("cluster: bucket {name} not found ({e}), creating it");
                if let Err(e) = create_bucket(client, name, replicas, max_value_size).await {
                    status
                        .figures
                        .cluster_kv_errors
                        .fetch_add(1, Ordering::Relaxed);
                    debug!("cluster: bucket {name} not ready: {e}");
                    tokio::time::sleep(KV_RETRY).await;
                }
            }
        }
    }
}

/// Creates the bucket's stream as a KV bucket is made (`KV_<bucket>`,
/// one message per key, rollups, direct get), with a plain JetStream API
/// request of only the fields nats-server 2.9 knows: async-nats' own
/// `create_key_value` sends newer fields and cannot read 2.9's answer.
async fn create_bucket(
    client: &Client,
    bucket: &str,
    replicas: usize,
    max_value_size: usize,
) -> Result<(), String> {
    let config = serde_json::json!({
        "name": format!("KV_{bucket}"),
        "subjects": [format!("$KV.{bucket}.>")],
        "max_msgs_per_subject": 1,
        "max_msg_size": max_value_size,
        "discard": "new",
        "allow_rollup_hdrs": true,
        "deny_delete": true,
        "allow_direct": true,
        "storage": "file",
        "num_replicas": replicas,
    });
    let answer = client
        .request(
            format!("$JS.API.STREAM.CREATE.KV_{bucket}"),
            Bytes::from(config.to_string()),
        )
        .await
        .map_err(|e| e.to_string())?;
    let answer: serde_json::Value =
        serde_json::from_slice(&answer.payload).map_err(|e| e.to_string())?;
    match answer.get("error") {
        None => Ok(()),
        Some(error) => Err(error.to_string()),
    }
}

/// Writes retained updates to the bucket, one after the other (the order
/// of one topic's updates is the order they were published). An update
/// that fails (the link is down, JetStream is not ready) is kept, the
/// latest per key, and written again once the link is up, every
/// [`KV_RETRY`] while some are left, before the updates that come after
/// (design §8: across an outage the side that writes last wins); without
/// that, a retained message changed on this node while NATS was
/// unreachable never reached the bucket, nor the other nodes.
async fn write_retained(
    bridge: Shared,
    store: kv::Store,
    puts: async_channel::Receiver<RetainedWrite>,
) {
    // Failed updates to write again, the latest per key, in key order.
    let mut unsent: BTreeMap<String, Option<Bytes>> = BTreeMap::new();
    let status = bridge.borrow().status.clone();
    loop {
        let write = if unsent.is_empty() {
            puts.recv().await.ok()
        } else {
            match tokio::time::timeout(KV_RETRY, puts.recv()).await {
                Ok(write) => write.ok(),
                // Nothing new within KV_RETRY: retry what is left.
                Err(_) => {
                    if status.link_up() {
                        write_again(&bridge, &store, &mut unsent).await;
                    }
                    continue;
                }
            }
        };
        let Some(RetainedWrite { key, value, stored }) = write else {
            return;
        };
        if status.link_up() && !unsent.is_empty() {
            write_again(&bridge, &store, &mut unsent).await;
        }
        let done = if status.link_up() {
            put_retained(&bridge, &store, &key, value.clone()).await
        } else {
            // A put now would wait for its timeout, holding up the rest.
            Err("the NATS link is down".to_string())
        };
        if let Some((answer, last)) = stored
            && (done.is_err() || last)
        {
            let _ = answer.try_send(done.is_ok());
        }
        match done {
            Ok(()) => {
                unsent.remove(&key);
            }
            Err(e) => {
                debug!("cluster: retained update not stored, kept to write again: {e}");
                unsent.insert(key, value);
            }
        }
    }
}

/// Writes the updates of `unsent` again, in key order, until one fails
/// (it and those after it stay).
async fn write_again(
    bridge: &Shared,
    store: &kv::Store,
    unsent: &mut BTreeMap<String, Option<Bytes>>,
) {
    let mut written = 0;
    while let Some((key, value)) = unsent.pop_first() {
        if let Err(e) = put_retained(bridge, store, &key, value.clone()).await {
            debug!("cluster: retained update still not stored: {e}");
            unsent.insert(key, value);
            break;
        }
        written += 1;
    }
    if written > 0 {
        info!("cluster: {written} retained updates made while the bucket was unreachable written");
    }
}

/// Puts `value` under `key` in the retained bucket (None: deletes it),
/// noting it as this node's own write, so the watch skips its echo; a
/// failure is counted.
async fn put_retained(
    bridge: &Shared,
    store: &kv::Store,
    key: &str,
    value: Option<Bytes>,
) -> Result<(), String> {
    *bridge
        .borrow_mut()
        .own_writes
        .entry(key.to_string())
        .or_insert(0) += 1;
    let done = match value {
        Some(value) => store
            .put(key, value)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        None => store.delete(key).await.map_err(|e| e.to_string()),
    };
    if done.is_err() {
        let mut b = bridge.borrow_mut();
        b.status
            .figures
            .cluster_kv_errors
            .fetch_add(1, Ordering::Relaxed);
        if let Some(n) = b.own_writes.get_mut(key) {
            *n = n.saturating_sub(1);
        }
    }
    done
}

/// Mirrors the bucket into every shard: its current values first, then
/// every change, until the watch fails.
async fn watch_retained(bridge: &Shared, store: &kv::Store) -> Result<(), String> {
    let mut watch = store
        .watch_with_history(">")
        .await
        .map_err(|e| e.to_string())?;
    while let Some(entry) = watch.next().await {
        let entry = entry.map_err(|e| e.to_string())?;
        let now = Instant::now();
        let message = {
            let mut b = bridge.borrow_mut();
            if let Some(n) = b.own_writes.get_mut(&entry.key) {
                // This node's own update: its shards hold it already.
                *n -= 1;
                if *n == 0 {
                    b.own_writes.remove(&entry.key);
                }
                if entry.operation == Operation::Put
                    && let Ok(d) = retained::decode(&entry.value, now)
                {
                    b.topics.insert(entry.key.clone(), d.message.topic);
                }
                continue;
            }
            match entry.operation {
                Operation::Put => match retained::decode(&entry.value, now) {
                    Ok(d) => {
                        b.topics.insert(entry.key.clone(), d.message.topic.clone());
                        d.message
                    }
                    Err(e) => {
                        debug!("cluster: retained value {} invalid: {e}", entry.key);
                        continue;
                    }
                },
                Operation::Delete | Operation::Purge => match b.topics.remove(&entry.key) {
                    Some(topic) => Message::new(topic, Bytes::new(), QoS::AtMostOnce, true),
                    None => continue,
                },
            }
        };
        let message = Message {
            retain_stamp: retained::stamp(entry.revision),
            ..message
        };
        let queues = bridge.borrow().to_shards.queues().to_vec();
        for queue in queues {
            // Awaited: a retained update must reach every replica.
            let _ = queue.send(ToShard::Retained(message.clone())).await;
        }
    }
    Err("watch ended".to_string())
}

/// Says this node is alive and lists the others heard.
async fn heartbeat_loop(bridge: Shared, node: String) {
    let (client, root, status) = {
        let b = bridge.borrow();
        (b.client.clone(), b.root.clone(), b.status.clone())
    };
    let prefix = format!("{root}.n.");
    let mut heard = match client.subscribe(format!("{prefix}*")).await {
        Ok(sub) => Some(sub),
        Err(e) => {
            warn!("cluster: cannot subscribe to heartbeats: {e}");
            None
        }
    };
    let incarnation = Bytes::from(bridge.borrow().incarnation.clone());
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        let beat = async {
            tick.tick().await;
            None
        };
        let heard_one = async {
            match heard.as_mut() {
                Some(sub) => sub.next().await,
                None => std::future::pending().await,
            }
        };
        match futures_lite::future::or(heard_one, beat).await {
            Some(msg) => {
                if let Some(name) = msg.subject.strip_prefix(prefix.as_str())
                    && name != node
                {
                    bridge
                        .borrow_mut()
                        .nodes
                        .insert(name.to_string(), Instant::now());
                }
            }
            None => {
                if status.link_up()
                    && let Err(e) = client
                        .publish(format!("{prefix}{node}"), incarnation.clone())
                        .await
                {
                    debug!("cluster: heartbeat not sent: {e}");
                }
                let mut b = bridge.borrow_mut();
                let ttl = b.node_ttl;
                b.nodes.retain(|_, at| at.elapsed() < ttl);
                let wall = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                let nodes = b
                    .nodes
                    .iter()
                    .map(|(name, at)| {
                        let ago = wall.saturating_sub(at.elapsed());
                        (name.clone(), u64::try_from(ago.as_millis()).unwrap_or(0))
                    })
                    .collect();
                status
                    .figures
                    .cluster_nodes
                    .store(b.nodes.len() as u64, Ordering::Relaxed);
                if let Ok(mut view) = status.view.lock() {
                    view.nodes = nodes;
                    view.server = status.link_up().then(|| {
                        let info = client.server_info();
                        format!("{}:{} ({})", info.host, info.port, info.server_name)
                    });
                }
            }
        }
    }
}
