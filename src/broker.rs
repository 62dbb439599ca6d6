//! Starting and stopping the broker: the shard pool, the mesh, the listeners.
//!
//! [`start`] binds every listener (one SO_REUSEPORT socket per shard), starts
//! one glommio executor per shard pinned to its CPU, joins the channel mesh,
//! and returns once every shard accepts connections. [`Broker::shutdown`]
//! stops accepting, closes client connections and lets the shards end;
//! [`Broker::wait`] joins them. The binary's `main` and the end-to-end tests
//! both go through here, so tests run the real broker on port 0.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use glommio::channels::channel_mesh::{MeshBuilder, Senders};
use glommio::{LocalExecutorPoolBuilder, PoolPlacement, PoolThreadHandles};
use log::{debug, info, warn};

use crate::admin;
use crate::cluster::{self, link::ClusterLink, link::ClusterStatus, link::ShardEnds};
use crate::config::{Config, KEEP_ALIVE_SWEEP};
use crate::connection;
use crate::connection::park;
use crate::listener::{self, ListenerSet};
use crate::mesh::ShardMsg;
use crate::net::admission::ConnectionCounts;
use crate::net::poller::{Poller, PollerError};
use crate::net::transport::{Acceptor, TlsCerts, TlsSettings, Transport, TransportError};
use crate::observe::metrics::BrokerGauges;
use crate::security::auth::{self, Auth};
use crate::session::link::CloseReason;
use crate::shard::query::{self, ShardRequest};
use crate::shard::registry::home_shard;
use crate::shard::sys::SessionTotals;
use crate::shard::{self, Ctx, Shard, inbox};
use crate::store::journal::{self, Journal};
use crate::store::record::unix_ms_now;
use crate::store::startup::{self, Found, SessionsLoad};
use crate::store::{LoadedSession, RetainedState, Store, StoreError};

/// How long shutdown waits for client connections to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// io_uring submission-queue depth of each shard's main ring. Every idle
/// connection keeps one poll request in the kernel, and the kernel finds a
/// request to cancel (glommio cancels its preemption timer on every loop) by
/// scanning a hash table whose size follows the ring's depth: with glommio's
/// default of 128 it has 8 buckets, so each loop scanned ~N/8 polls (22% of
/// the CPU at 15k connections). 4096 gives the kernel's maximum of 256 buckets.
const RING_DEPTH: usize = 4096;

/// How long [`start`] waits for every shard to be ready, counted from the
/// last step of start-up any shard made (`StartWatch::progress`): a shard
/// that hangs fails the start, a long load of a large store does not.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors starting or running the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A listener could not be set up.
    #[error(transparent)]
    Listener(#[from] listener::ListenerError),
    /// `--cpus` names a CPU the process may not run on.
    #[error("CPU {0} is not in this process's affinity mask (see taskset / CPUAffinity=)")]
    CpuNotAllowed(usize),
    /// The executor pool failed to start.
    #[error("cannot start the shard executors: {0}")]
    Executor(#[source] glommio::GlommioError<()>),
    /// A shard failed.
    #[error("shard failed: {0}")]
    Shard(#[from] ShardError),
    /// A shard's thread ended abnormally (glommio reports its panic).
    #[error("a shard's thread failed: {0}")]
    ShardThread(#[source] glommio::GlommioError<()>),
    /// The admin HTTP listener could not be set up.
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    /// Shards did not all become ready in time.
    #[error("shards did not start within {0:?}")]
    StartTimeout(Duration),
    /// The cluster thread could not start.
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    /// The TLS certificates could not be loaded.
    #[error(transparent)]
    Tls(#[from] TransportError),
    /// The password or ACL file is unreadable or invalid.
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    /// The persistence directory cannot be used.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why one shard could not run.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The shard could not join the channel mesh.
    #[error("cannot join the shard mesh: {0}")]
    Mesh(#[source] glommio::GlommioError<()>),
    /// The shard's epoll instance or watcher thread could not start.
    #[error("shard {shard}: {source}")]
    Poller {
        /// The shard.
        shard: usize,
        /// Why.
        #[source]
        source: PollerError,
    },
    /// The shard could not load its persistent sessions.
    #[error("shard {shard}: {source}")]
    Store {
        /// The shard.
        shard: usize,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// Another shard stopped before it handed this one the sessions it
    /// loaded for it (its own error is the one to read).
    #[error("shard {shard}: shard {peer} stopped while the sessions were loaded")]
    PeerStopped {
        /// The shard.
        shard: usize,
        /// The shard that stopped.
        peer: usize,
    },
    /// A shard panicked before it was ready (the panic message is logged
    /// above it).
    #[error("a shard panicked while it started")]
    Panicked,
    /// This shard failed to start; [`start`] reports why.
    #[error("the shard did not start (the start-up error says why)")]
    NotStarted,
}

/// A running broker.
pub struct Broker {
    /// The addresses actually listened on (port 0 resolved).
    pub listen_addrs: Vec<SocketAddr>,
    /// The CPU each shard is pinned to.
    pub shard_cpus: Vec<usize>,
    /// Set to stop the broker.
    shutdown: Arc<AtomicBool>,
    /// The shard threads.
    handles: PoolThreadHandles<Result<(), ShardError>>,
    /// Every listener with its transport and bound address (port 0
    /// resolved), plain MQTT ones included, in the order configured.
    pub transport_addrs: Vec<(Transport, SocketAddr)>,
    /// The bound addresses of the listeners that expect a PROXY protocol
    /// header.
    pub proxy_addrs: Vec<SocketAddr>,
    /// The TLS certificates, when a TLS or WSS listener is configured;
    /// [`TlsCerts::reload`] swaps them (SIGHUP).
    pub tls: Option<Arc<TlsCerts>>,
    /// Password file and ACL, shared with the shards; reloaded on SIGHUP.
    pub auth: Arc<Auth>,
    /// The admin HTTP listener's address, when it runs.
    pub http_addr: Option<SocketAddr>,
    /// The admin HTTP listener's accept thread.
    http_thread: Option<std::thread::JoinHandle<()>>,
    /// The persistence directory, locked while the broker runs.
    _store: Option<Store>,
    /// The cluster bridge's status and thread, when `[cluster]` is set.
    cluster: Option<(Arc<ClusterStatus>, std::thread::JoinHandle<()>)>,
}

/// A cloneable handle that stops the broker.
#[derive(Clone, Debug)]
pub struct ShutdownHandle(Arc<AtomicBool>);

impl ShutdownHandle {
    /// Begins a graceful shutdown.
    pub fn shutdown(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Broker {
    /// A handle that stops this broker from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// Begins a graceful shutdown.
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }

    /// Waits for every shard to end.
    ///
    /// # Errors
    /// A shard that failed or panicked.
    pub fn wait(self) -> Result<(), BrokerError> {
        let results = self.handles.join_all();
        if let Some((status, thread)) = self.cluster {
            // The shards are gone: nothing more to hand to NATS.
            status.shutdown.store(true, Ordering::SeqCst);
            let _ = thread.join();
        }
        if let (Some(thread), Some(addr)) = (self.http_thread, self.http_addr) {
            // The shards ended, so shutdown is set; the admin accept blocks:
            // wake it so it sees that. A panic there only ended the API.
            admin::wake(addr);
            let _ = thread.join();
        }
        for result in results {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(BrokerError::Shard(e)),
                Err(e) => return Err(BrokerError::ShardThread(e)),
            }
        }
        Ok(())
    }
}

/// The CPUs shards run on: `--cpus` (checked against the affinity mask) or
/// the process's affinity mask, so taskset and systemd's CPUAffinity= hold.
///
/// # Errors
/// A requested CPU outside the mask.
pub fn choose_cpus(config: &Config) -> Result<Vec<usize>, BrokerError> {
    let allowed: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    match &config.cpus {
        Some(list) => {
            if let Some(&cpu) = list
                .iter()
                .find(|c| !allowed.is_empty() && !allowed.contains(c))
            {
                return Err(BrokerError::CpuNotAllowed(cpu));
            }
            Ok(list.clone())
        }
        None if allowed.is_empty() => {
            Ok((0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect())
        }
        None => Ok(allowed),
    }
}

/// Starts the broker and returns once every shard accepts connections.
///
/// # Errors
/// Listeners that cannot be bound, CPUs outside the affinity mask, executor
/// start-up failures.
pub fn start(config: Config) -> Result<Broker, BrokerError> {
    let auth = Arc::new(Auth::load(&config)?);
    let cpus = choose_cpus(&config)?;
    let nr_shards = config.shards.unwrap_or(cpus.len()).max(1);
    // The retained messages are read once, here, on a thread per shard
    // (at most one per CPU the shards get); the sessions by every shard,
    // its own directories on its own executor (load_sessions).
    let (store, persisted) = match (&config.persistence, &config.persistence_location) {
        (true, Some(dir)) => {
            let store = Store::open(dir)?;
            let retained = store.load_retained(nr_shards.min(cpus.len()).max(1))?;
            let persisted = Persisted {
                retained,
                store: store.dir.clone(),
                sessions: Arc::new(SessionsLoad::new(nr_shards)),
            };
            (Some(store), Some(Arc::new(persisted)))
        }
        _ => (None, None),
    };
    let shard_cpus: Vec<usize> = (0..nr_shards).map(|i| cpus[i % cpus.len()]).collect();
    let tls = match TlsSettings::from_config(&config) {
        Some(settings) if config.uses_tls() => Some(Arc::new(TlsCerts::load(settings)?)),
        _ => None,
    };
    let mut sets: Vec<(Acceptor, ListenerSet)> = Vec::new();
    // In the order of config::LISTEN_LISTS.
    for (list, (transport, addrs)) in [
        (Transport::Mqtt, &config.listen),
        (Transport::Tls, &config.tls_listen),
        (Transport::Ws, &config.ws_listen),
        (Transport::Wss, &config.wss_listen),
    ]
    .into_iter()
    .enumerate()
    {
        for (index, addr) in addrs.iter().enumerate() {
            let certs = transport.uses_tls().then(|| tls.clone()).flatten();
            let acceptor = Acceptor::new(transport, certs, config.max_packet_size)
                .with_proxy_protocol(config.expects_proxy_header(list, index));
            sets.push((acceptor, listener::bind(*addr, nr_shards, config.backlog)?));
        }
    }
    let transport_addrs: Vec<(Transport, SocketAddr)> =
        sets.iter().map(|(a, s)| (a.transport, s.addr)).collect();
    let proxy_addrs: Vec<SocketAddr> = sets
        .iter()
        .filter(|(a, _)| a.proxy_protocol)
        .map(|(_, s)| s.addr)
        .collect();
    let listen_addrs: Vec<SocketAddr> = transport_addrs
        .iter()
        .filter(|(t, _)| *t == Transport::Mqtt)
        .map(|(_, a)| *a)
        .collect();
    let listener_fds: Arc<Vec<(Acceptor, SocketAddr, Vec<i32>)>> = Arc::new(
        sets.into_iter()
            .map(|(acceptor, s)| (acceptor, s.addr, s.fds))
            .collect(),
    );

    let config = Arc::new(config);
    let shutdown = Arc::new(AtomicBool::new(false));
    let watch = Arc::new(StartWatch::default());
    let connections = Arc::new(ConnectionCounts::default());
    let mesh = MeshBuilder::<ShardMsg, _>::full(nr_shards, config.mesh_capacity);
    // One message from every shard to every other: sends never wait.
    let load_mesh = MeshBuilder::<SessionsFound, _>::full(nr_shards, 1);
    let pinned = Arc::new(shard_cpus.clone());
    let gauges = Arc::new(BrokerGauges::new(nr_shards));
    let (admin_senders, admin_receivers): (Vec<_>, Vec<_>) = (0..nr_shards)
        .map(|_| async_channel::bounded(query::REQUEST_QUEUE))
        .unzip();
    let admin_receivers = Arc::new(admin_receivers);
    let cluster = match &config.cluster {
        Some(settings) => Some(cluster::start(settings, nr_shards, config.max_packet_size)?),
        None => None,
    };
    let cluster_status = cluster.as_ref().map(|c| c.status.clone());
    let cluster_ends = cluster.as_ref().map(|c| {
        let stall = config.cluster.as_ref().map(|s| s.stall).unwrap_or_default();
        (Arc::new(c.ends.clone()), c.status.clone(), stall)
    });
    let admin_state = admin::AdminState {
        gauges: gauges.clone(),
        shards: admin_senders,
        auth: admin::ApiCredentials {
            token: config.http_auth_token.clone(),
            basic: config.http_basic_auth.clone(),
        },
        cluster: cluster_status,
    };
    let http_listen = config.http_listen;

    let shard_main = {
        let shutdown = shutdown.clone();
        let watch = watch.clone();
        let auth = auth.clone();
        move || {
            run_shard(ShardSetup {
                config,
                mesh,
                load_mesh,
                listener_fds,
                pinned,
                shutdown,
                watch,
                connections,
                auth,
                gauges,
                admin_receivers,
                persisted,
                cluster: cluster_ends.clone(),
            })
        }
    };
    let handles = LocalExecutorPoolBuilder::new(PoolPlacement::Unbound(nr_shards))
        .name("fanmq-shard")
        .ring_depth(RING_DEPTH)
        .on_all_shards(shard_main)
        .map_err(BrokerError::Executor)?;

    let mut since = Instant::now();
    let mut progress = 0;
    while watch.ready.load(Ordering::SeqCst) < nr_shards {
        // Every shard has ended or is ready, and one failed: nothing more
        // will come (a shard waiting for a failed one fails too).
        let ended = watch.failures() > 0
            && watch.failures() + watch.ready.load(Ordering::SeqCst) >= nr_shards;
        if ended || since.elapsed() > START_TIMEOUT {
            shutdown.store(true, Ordering::SeqCst);
            if let Some(c) = &cluster {
                c.status.shutdown.store(true, Ordering::SeqCst);
            }
            return Err(watch
                .first_cause()
                .map_or(BrokerError::StartTimeout(START_TIMEOUT), BrokerError::Shard));
        }
        let now = watch.progress.load(Ordering::SeqCst);
        if now != progress {
            (progress, since) = (now, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (http_addr, http_thread) = match http_listen {
        Some(addr) => match admin::start(addr, admin_state, shutdown.clone()) {
            Ok(server) => (Some(server.addr), Some(server.thread)),
            Err(e) => {
                shutdown.store(true, Ordering::SeqCst);
                if let Some(c) = &cluster {
                    c.status.shutdown.store(true, Ordering::SeqCst);
                }
                return Err(e.into());
            }
        },
        None => (None, None),
    };
    Ok(Broker {
        listen_addrs,
        shard_cpus,
        shutdown,
        handles,
        transport_addrs,
        proxy_addrs,
        tls,
        auth,
        http_addr,
        http_thread,
        _store: store,
        cluster: cluster.map(|c| (c.status, c.thread)),
    })
}

/// What every shard's thread starts with.
struct ShardSetup {
    config: Arc<Config>,
    mesh: MeshBuilder<ShardMsg, glommio::channels::channel_mesh::Full>,
    /// The mesh that hands every shard the sessions the others loaded for
    /// it, at start-up only.
    load_mesh: MeshBuilder<SessionsFound, glommio::channels::channel_mesh::Full>,
    listener_fds: Arc<Vec<(Acceptor, SocketAddr, Vec<i32>)>>,
    pinned: Arc<Vec<usize>>,
    shutdown: Arc<AtomicBool>,
    /// How far the shards got in starting.
    watch: Arc<StartWatch>,
    connections: Arc<ConnectionCounts>,
    auth: Arc<Auth>,
    /// Every shard's admin gauges (each shard refreshes its own).
    gauges: Arc<BrokerGauges>,
    /// Each shard's admin request channel, by shard index.
    admin_receivers: Arc<Vec<async_channel::Receiver<ShardRequest>>>,
    /// What persistence loaded (persistence on).
    persisted: Option<Arc<Persisted>>,
    /// Each shard's ends of the cluster bridge's queues, the shared status
    /// and the publish stall; `None` for a single node.
    cluster: Option<(Arc<Vec<ShardEnds>>, Arc<ClusterStatus>, Duration)>,
}

/// What persistence loaded at start, for every shard.
struct Persisted {
    /// The retained messages, and where shard 0's journal goes on.
    retained: RetainedState,
    /// The store directory, where each shard loads its sessions.
    store: std::path::PathBuf,
    /// The sessions' load, shared by the shards.
    sessions: Arc<SessionsLoad>,
}

/// What a shard hands every other at start-up: the sessions it found whose
/// home is there, and where its directories' segments end.
struct SessionsFound {
    /// Per client id what the sender's directories hold.
    found: Vec<Found>,
    /// Where a new segment of the sender's directories may start.
    next_base: u64,
}

/// How far the shards got in starting, watched by [`start`].
#[derive(Default)]
struct StartWatch {
    /// Shards that accept connections.
    ready: AtomicUsize,
    /// Bumped at every step of a shard's start-up: the start-up timeout
    /// counts from the latest.
    progress: AtomicUsize,
    /// Why shards failed to start, in the order they did.
    failed: std::sync::Mutex<Vec<ShardError>>,
}

impl StartWatch {
    /// One more step made.
    fn step(&self) {
        self.progress.fetch_add(1, Ordering::SeqCst);
    }

    /// Records why a shard cannot start; the error to return from it.
    fn fail(&self, error: ShardError) -> ShardError {
        warn!("{error}");
        self.lock().push(error);
        ShardError::NotStarted
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ShardError>> {
        self.failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Shards that failed to start.
    fn failures(&self) -> usize {
        self.lock().len()
    }

    /// The first failure that is not only another's: the one to report.
    fn first_cause(&self) -> Option<ShardError> {
        let mut failed = std::mem::take(&mut *self.lock());
        let cause = failed
            .iter()
            .position(|e| !matches!(e, ShardError::PeerStopped { .. }))
            .unwrap_or(0);
        (!failed.is_empty()).then(|| failed.swap_remove(cause))
    }
}

/// Records a panic of its shard's start-up (dropped while panicking, before
/// [`StartGuard::started`]).
struct StartGuard {
    /// Where it is recorded.
    watch: Arc<StartWatch>,
    /// Set once the shard is ready.
    started: bool,
}

impl StartGuard {
    fn started(&mut self) {
        self.started = true;
        self.watch.ready.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if !self.started && std::thread::panicking() {
            self.watch.lock().push(ShardError::Panicked);
        }
    }
}

/// Loads this shard's persistent sessions: reads its own session journal
/// directories (on this shard's executor, while the other shards read
/// theirs), hands every session found to its client id's home shard (so
/// the registry needs no entry for it) and takes those of its own from
/// every other shard, keeps per client id the newest, and writes them into
/// a new segment of its own (the start-up compaction; the last shard to
/// finish removes the older segments). Returns the sessions and where its
/// session journal goes on.
///
/// # Errors
/// A journal that cannot be read or written, a shard that stopped before
/// it handed over its part.
async fn load_sessions(
    id: usize,
    nr_shards: usize,
    persisted: &Persisted,
    mesh: &(
        Senders<SessionsFound>,
        glommio::channels::channel_mesh::Receivers<SessionsFound>,
    ),
    watch: &StartWatch,
) -> Result<(Vec<LoadedSession>, u64), ShardError> {
    let started = Instant::now();
    let store_error = |source| ShardError::Store { shard: id, source };
    let now = unix_ms_now();
    let mut found: Vec<Vec<Found>> = (0..nr_shards).map(|_| Vec::new()).collect();
    let mut part = startup::LoadPart::default();
    let mut next_base = 0;
    for dir in startup::session_dirs(&persisted.store, id, nr_shards).map_err(store_error)? {
        let read = startup::read_sessions(&persisted.store, &dir, now).map_err(store_error)?;
        next_base = read.next_base.max(next_base);
        part.read.extend(read.segments);
        part.records += read.records;
        for f in read.found {
            found[home_shard(&f.client_id, nr_shards)].push(f);
        }
        watch.step();
    }
    let read_in = started.elapsed();
    let (senders, receivers) = mesh;
    let mut mine = std::mem::take(&mut found[id]);
    for (peer, found) in found.into_iter().enumerate().filter(|(p, _)| *p != id) {
        let share = SessionsFound { found, next_base };
        if senders.send_to(peer, share).await.is_err() {
            return Err(ShardError::PeerStopped { shard: id, peer });
        }
    }
    for peer in (0..nr_shards).filter(|&p| p != id) {
        match receivers.recv_from(peer).await {
            Ok(Some(share)) => {
                next_base = next_base.max(share.next_base);
                mine.extend(share.found);
            }
            _ => return Err(ShardError::PeerStopped { shard: id, peer }),
        }
    }
    watch.step();
    let handed_in = started.elapsed();
    let mut picked = startup::pick(mine);
    let (path, base) = startup::write_compacted(
        &persisted.store,
        id,
        nr_shards,
        next_base,
        &mut picked.sessions,
    )
    .map_err(store_error)?;
    info!(
        "shard {id}: persistence: read {} records of {} segments in {read_in:?}, had the other shards' sessions after {handed_in:?}; {} persistent sessions are this shard's ({} expired while the broker was down; {} ending: expired, loaded to end right after the start), written again in {:?}",
        part.records,
        part.read.len(),
        picked.sessions.len(),
        picked.expired,
        picked.ending,
        started.elapsed().saturating_sub(handed_in)
    );
    part.written = Some(path);
    part.sessions = picked.sessions.len();
    part.expired = picked.expired;
    part.ending = picked.ending;
    persisted.sessions.finished(part);
    watch.step();
    Ok((picked.sessions, base))
}

/// One shard, from joining the mesh to the end of its shutdown.
async fn run_shard(mut setup: ShardSetup) -> Result<(), ShardError> {
    let nr_shards = setup.pinned.len();
    let watch = setup.watch.clone();
    // Declared before the meshes, so dropped after them: a peer waiting on
    // this shard sees it stopped, and the panic is recorded, either way.
    let mut guard = StartGuard {
        watch: watch.clone(),
        started: false,
    };
    // Each stage logged (debug): a start that times out
    // (`BrokerError::StartTimeout`) shows where each shard stopped.
    debug!("a shard's executor runs: joining the mesh");
    let (senders, receivers) = match setup.mesh.join().await {
        Ok(joined) => joined,
        Err(e) => return Err(watch.fail(ShardError::Mesh(e))),
    };
    let id = senders.peer_id();
    debug!("shard {id}: in the mesh, joining the load mesh");
    let load_mesh = match setup.load_mesh.join().await {
        Ok(joined) => joined,
        Err(e) => return Err(watch.fail(ShardError::Mesh(e))),
    };
    debug!("shard {id}: in the load mesh");
    // Pinned before the load, so what it allocates is the shard's own
    // memory (first touch on its NUMA node).
    let cpu = setup.pinned[id];
    if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
        warn!("shard {id}: cannot pin to CPU {cpu}");
    }
    let persisted = setup.persisted.take();
    let sessions = match &persisted {
        Some(persisted) => {
            match load_sessions(id, nr_shards, persisted, &load_mesh, &watch).await {
                Ok(loaded) => Some(loaded),
                Err(e) => return Err(watch.fail(e)),
            }
        }
        None => None,
    };
    drop(load_mesh);
    let (poller, from_watcher) = match Poller::start(id, Some(cpu)) {
        Ok(started) => started,
        Err(source) => return Err(watch.fail(ShardError::Poller { shard: id, source })),
    };
    let ctx = Ctx {
        shard: Rc::new(RefCell::new(Shard::new(
            id,
            nr_shards,
            setup.config.clone(),
            setup.auth.clone(),
        ))),
        mesh: Rc::new(senders),
        id,
        nr_shards,
        poller: Rc::new(poller),
    };
    // The journals stop after the connections have ended, so that what
    // their ends journal (images, wills cleared) is written.
    let store_stop = Arc::new(AtomicBool::new(false));
    let commit = persisted
        .as_ref()
        .map(|state| load_persisted(&ctx, &setup.config, state, sessions, &store_stop))
        .unwrap_or_default();
    // Every replica holds the retained messages now: the loaded list goes
    // with the last shard's reference, not at exit, and on a thread of its
    // own, so that this shard does not wait for a million reference
    // counts before it serves (every message lives on in the replicas).
    if let Some(last) = persisted.and_then(Arc::into_inner) {
        let dropped = std::thread::Builder::new()
            .name("fanmq-load-drop".to_string())
            .spawn(move || drop(last));
        if let Err(e) = dropped {
            debug!("shard {id}: the loaded store is dropped here ({e})");
        }
    }
    glommio::spawn_local(park::receive_ready(ctx.clone(), from_watcher)).detach();
    glommio::spawn_local(park::Unparker::new(ctx.clone())).detach();
    {
        let mut shard = ctx.shard.borrow_mut();
        shard.gauges = setup.gauges.clone();
        // First figures at once, so /health is ready with the shard.
        shard.refresh_gauges(SessionTotals::default());
    }
    if let Some((ends, status, stall)) = &setup.cluster
        && let Some(ends) = ends.get(id)
    {
        let link = ClusterLink::new(id, ends.clone(), status.clone(), *stall);
        ctx.shard.borrow_mut().cluster = Some(link);
        // The sessions restored from the store above are claimed again in
        // the cluster (or dropped here if another node owns them now).
        ctx.shard.borrow().reassert_restored();
        glommio::spawn_local(shard::cluster::receive_from_bridge(
            ctx.clone(),
            ends.from_bridge.clone(),
        ))
        .detach();
    }
    if let Some(requests) = setup.admin_receivers.get(id) {
        glommio::spawn_local(query::serve_requests(ctx.clone(), requests.clone())).detach();
    }
    let receivers = Rc::new(receivers);
    for peer in (0..nr_shards).filter(|&p| p != id) {
        glommio::spawn_local(inbox::receive_from(ctx.clone(), peer, receivers.clone())).detach();
    }
    if !setup.config.sys_interval.is_zero() {
        glommio::spawn_local(shard::sys::sys_task(ctx.clone(), setup.config.sys_interval)).detach();
    }
    let mut accept_tasks = Vec::new();
    for (acceptor, addr, fds) in setup.listener_fds.iter() {
        let fd = fds[id];
        accept_tasks.push(
            glommio::spawn_local(listener::accept_loop(
                ctx.clone(),
                fd,
                *addr,
                acceptor.clone(),
                setup.connections.clone(),
            ))
            .detach(),
        );
    }
    debug!("shard {id} ready on CPU {cpu}");
    guard.started();

    // The keep-alive sweep also watches the shutdown flag, on its own tick
    // (every KEEP_ALIVE_SWEEP): an idle shard has that one timer (and the
    // `$SYS` one), and SIGTERM takes effect within half a second.
    connection::keep_alive_sweeper(ctx.clone(), KEEP_ALIVE_SWEEP, setup.shutdown.clone()).await;
    {
        let mut shard = ctx.shard.borrow_mut();
        shard.begin_shutdown();
        for (_, session) in shard.sessions.iter_mut() {
            if let Some(link) = &mut session.link {
                link.close(CloseReason::Shutdown);
            }
        }
    }
    for task in accept_tasks {
        let _ = task.await;
    }
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while setup.connections.total() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    store_stop.store(true, Ordering::SeqCst);
    for task in commit {
        task.await;
    }
    info!("shard {id} stopped");
    Ok(())
}

/// Gives this shard what persistence loaded: every shard applies the
/// retained messages to its own replica and restores its persistent
/// sessions; shard 0 starts the retained journal (a new segment after the
/// loaded snapshot and log, which stay: nothing is rewritten before the
/// listeners open), every shard its session journal. Returns their commit tasks.
fn load_persisted(
    ctx: &Ctx,
    config: &Config,
    persisted: &Persisted,
    sessions: Option<(Vec<LoadedSession>, u64)>,
    shutdown: &Arc<AtomicBool>,
) -> Vec<glommio::task::JoinHandle<()>> {
    let state = &persisted.retained;
    let started = Instant::now();
    let unix_now = unix_ms_now();
    let mut shard = ctx.shard.borrow_mut();
    let mut tasks = Vec::new();
    if let Some((sessions, base)) = sessions {
        let dir = crate::store::shard_dir(&persisted.store, ctx.id);
        let (restored, queued) = shard.restore_sessions(&sessions, unix_now);
        info!(
            "shard {}: persistence: {restored} persistent sessions ({queued} queued messages) restored in {:?}",
            ctx.id,
            started.elapsed()
        );
        let journal = Rc::new(Journal::new(
            &dir,
            u16::try_from(ctx.id).unwrap_or(u16::MAX),
            u16::try_from(ctx.nr_shards).unwrap_or(u16::MAX),
            base,
            config.persistence_sync,
            config.persistence_sync_interval,
            Vec::new(),
            Arc::default(),
        ));
        shard.session_journal = Some(journal.clone());
        tasks.push(
            glommio::spawn_local(crate::shard::held_out::release_loop(
                ctx.clone(),
                journal.clone(),
                shutdown.clone(),
            ))
            .detach(),
        );
        tasks.push(glommio::spawn_local(journal::commit_loop(journal, shutdown.clone())).detach());
    }
    shard.store_failing = Some(state.failing.clone());
    let retained_from = Instant::now();
    // Expired ones are left out (deadlines counted from `started`, taken
    // with `unix_now`); each shard starts at its own place in the shared
    // list (for_shard).
    let live = state
        .for_shard(ctx.id, ctx.nr_shards)
        .filter_map(|(stamp, stored)| stored.to_message(*stamp, started, unix_now));
    shard.retained.restore(live);
    let retained_in = retained_from.elapsed();
    let commit = (ctx.id == 0).then(|| {
        let journal = Rc::new(Journal::new(
            &state.dir,
            crate::store::frame::RETAINED_SHARD,
            u16::try_from(ctx.nr_shards).unwrap_or(u16::MAX),
            state.next_base,
            config.persistence_sync,
            config.persistence_sync_interval,
            Vec::new(),
            state.failing.clone(),
        ));
        // The loaded snapshot and log stay as they are (no rewrite before
        // serving): the journal goes on in a new segment after them, and
        // its running snapshots remove them (store::snapshot).
        journal.continue_log(state.log_from, state.snapshot);
        shard.retain_journal = Some(journal.clone());
        glommio::spawn_local(journal::commit_loop(journal, shutdown.clone())).detach()
    });
    tasks.extend(commit);
    info!(
        "shard {}: persistence: {} retained messages loaded in {retained_in:?} (the shard's whole load of the store: {:?})",
        ctx.id,
        shard.retained.len(),
        started.elapsed()
    );
    drop(shard);
    shard::snapshot::spawn_snapshots(&ctx.shard, config.persistence_snapshot_log_bytes, shutdown);
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_that_panics_while_starting_is_recorded_and_its_cause_comes_first() {
        let watch = Arc::new(StartWatch::default());
        // A peer that saw it stop records its part first.
        let _ = watch.fail(ShardError::PeerStopped { shard: 0, peer: 1 });
        let panicking = {
            let watch = watch.clone();
            std::thread::spawn(move || {
                let _guard = StartGuard {
                    watch,
                    started: false,
                };
                panic!("loading");
            })
        };
        assert!(panicking.join().is_err());
        let ready = {
            let watch = watch.clone();
            std::thread::spawn(move || {
                let mut guard = StartGuard {
                    watch,
                    started: false,
                };
                guard.started();
            })
        };
        ready.join().unwrap();
        assert_eq!(
            watch.failures(),
            2,
            "a guard dropped without a panic records nothing"
        );
        assert_eq!(watch.ready.load(Ordering::SeqCst), 1);
        assert!(matches!(watch.first_cause(), Some(ShardError::Panicked)));
    }
}
