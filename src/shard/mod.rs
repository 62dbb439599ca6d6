//! What one core owns: its sessions, its subscription router, its replica of
//! the retained store, its share of the client-id registry and its counters.
//!
//! A shard is single-threaded (one pinned glommio executor), so its state lives
//! in one `Rc<RefCell<Shard>>` shared by the shard's tasks; no borrow is ever
//! held across an `.await`. The publish path is synchronous from decode to
//! write: a connection task decodes a whole read of publishes, [`Shard::route`]
//! enqueues `Bytes` handles to every matching subscriber and marks it dirty,
//! then [`Shard::flush_dirty`] writes each dirty subscriber once with a
//! vectored send of everything queued.

pub mod cluster;
pub mod held_acks;
pub mod held_out;
pub mod inbox;
pub mod index;
pub mod lend;
pub mod persist;
pub mod persist_will;
pub mod query;
pub mod registry;
pub mod run;
pub mod shared;
pub mod snapshot;
pub mod subscribe;
pub mod sys;
#[cfg(test)]
pub mod testing;
pub mod timers;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytestring::ByteString;
use log::debug;

use crate::cluster::positions::{Routed, Seen};
use crate::config::Config;
use crate::mesh::{self, MeshSenders, ShardMsg};
use crate::net::poller::Poller;
use crate::observe::counters::Counters;
use crate::observe::metrics::BrokerGauges;
use crate::protocol::message::{Batch, Encoded, Message};
use crate::protocol::v3::QoS;
use crate::router::Router;
use crate::router::retain::RetainStore;
use crate::router::shared::{self as share, SharedDelivery, SharedGroups};
use crate::security::acl::Who;
use crate::security::auth::{Auth, ReadChecker};
use crate::session::link::{CloseReason, TICKS_PER_SEC};
use crate::session::outqueue::Flushed;
use crate::session::{Delivery, Limits, Session};
use crate::shard::held_acks::{APPLY_TIMEOUT, HeldAcks};
use crate::shard::index::SessionIndex;
use crate::shard::registry::Registry;
use crate::shard::sys::SessionTotals;
use crate::store::journal::Journal;
use crate::store::record::Record;

pub use crate::session::link::SessionKey;

/// Size of the shard's read buffer, shared by all its connections (a read
/// is processed before the next one starts, so one buffer serves all; an idle
/// connection holds none).
pub const READ_BUFFER_SIZE: usize = 64 * 1024;

/// May `session` receive a message on `topic`: the per-delivery check of
/// sessions with a partly covered subscription ([`Session::read_check`]).
pub fn may_read(auth: &Auth, session: &Session, topic: &str) -> bool {
    let who = Who {
        client_id: &session.client_id,
        username: session.read_check_username(),
    };
    auth.can_read(who, topic)
}

/// Entries at which a step's record of acknowledgements and sends
/// (`Shard::persist_step`) is written at the end of a step: one connection's
/// read is one step, so the record gathers many sessions' steps, each
/// subscriber then costs its entry, not a record of its own.
const STEP_RECORD_ENTRIES: usize = 4096;
/// Age at which that record is written at the end of a step anyway: nothing
/// waits for it (a QoS 2 send is written at once), and a crash before it is
/// written resends those QoS 1 messages, which QoS 1 allows.
const STEP_RECORD_AGE: Duration = Duration::from_millis(10);

/// One core's broker state.
pub struct Shard {
    /// This shard's index in the mesh (0-based).
    pub id: usize,
    /// Number of shards.
    pub nr_shards: usize,
    /// The configuration, shared read-only by all shards.
    pub config: Arc<Config>,
    /// Per-client limits derived from the configuration.
    pub limits: Limits,
    /// Sessions on this shard, live or offline (CleanSession = 0, no connection).
    /// Boxed: the slab's spare capacity (up to half of it after a doubling)
    /// then costs a pointer per slot, not a whole session.
    pub sessions: slab::Slab<Box<Session>>,
    /// Sessions by client id: 4 bytes per entry, hashed by the session's own
    /// client id (see [`crate::shard::index`]); look up with
    /// [`Shard::session_key`].
    pub by_client_id: SessionIndex,
    /// This shard's subscriptions.
    pub router: Router<SessionKey>,
    /// This shard's replica of the retained messages.
    pub retained: RetainStore,
    /// This shard's replica of every shared subscription group
    /// ([`crate::shard::shared`]).
    pub shared: SharedGroups,
    /// Messages published here for shared subscription members on other
    /// shards, by shard, sent with the step's publishes.
    shared_out: Vec<Vec<SharedDelivery>>,
    /// The barriers (publishing shard, token) of the shared deliveries
    /// from other shards settled here since the mesh task last took them:
    /// answered with `ShardMsg::SharedDurable` once the journal holds what
    /// they wrote (`shard::inbox`).
    pub shared_settled: Vec<(usize, u64)>,
    /// The latest persistent sessions taken over from this shard, newest
    /// last, at most `shared::MOVES_KEPT`: a shared delivery chosen for one
    /// of them that arrives after it left follows it to its new shard.
    moved: std::collections::VecDeque<shared::Moved>,
    /// How many of `moved` still hold back a `Leave`: zero (almost always)
    /// skips them on every membership update.
    moves_waiting: usize,
    /// Client ids homed on this shard, and claims waiting for an answer.
    pub registry: Registry,
    /// Acks of retained publishes waiting for every replica.
    pub held_acks: HeldAcks,
    /// SUBACKs of this step that wait for the cluster's NATS subscriptions
    /// (`Ctx::release_subacks`).
    pub held_subacks: Vec<subscribe::HeldSuback>,
    /// The journal of retained updates (persistence on, shard 0 only).
    pub retain_journal: Option<Rc<Journal>>,
    /// This shard's journal of persistent sessions (persistence on).
    pub session_journal: Option<Rc<Journal>>,
    /// The alias (`store::record::Alias`) of each journalled persistent
    /// session's latest image, which the records of messages queued for it
    /// name (empty without persistence, so the fan-out path checks one
    /// length).
    pub persist_stamps: ahash::AHashMap<SessionKey, crate::store::record::Alias>,
    /// The latest `Record::Will` journalled for each persistent session
    /// that has one, by client id: what a snapshot carries forward, since
    /// the will of a connected client lives with its connection, not its
    /// session (empty without persistence).
    pub persist_wills: ahash::AHashMap<bytestring::ByteString, Record>,
    /// Scratch: the journalled sessions that queued the message being
    /// routed, with the QoS each gets it at.
    persist_refs: Vec<(crate::store::record::Alias, QoS)>,
    /// Scratch: the journalled sessions that sent the message being routed
    /// at once (in flight, not queued), with packet id and QoS.
    persist_sent: Vec<crate::store::record::SentRef>,
    /// Scratch: those of them that sent it at QoS 2, whose PUBLISH waits
    /// for the record of its packet id.
    persist_hold: Vec<SessionKey>,
    /// Acknowledgements of journalled sessions' outgoing messages and the
    /// messages their queues sent in their place, journalled as one
    /// ordered record (`Shard::journal_done`) before any other flow record,
    /// image or drop, and at the end of a step once it holds
    /// [`STEP_RECORD_ENTRIES`] or is [`STEP_RECORD_AGE`] old (the keep-alive
    /// sweep writes the rest).
    persist_step: crate::store::flows::StepBatch,
    /// Expired persistent sessions whose drop record waits until the
    /// shards their shared backlog went to journalled it
    /// (`Shard::journal_drop_after`).
    drops_waiting: Vec<persist::DropWaiting>,
    /// Connections whose packets wait for the session journal, released by
    /// `held_out::release_loop`.
    pub held_out: held_out::HeldOut,
    /// Accepted sockets whose client has not written yet (no task until
    /// then; `crate::net::waiting`).
    pub waiting: crate::net::waiting::Waiting,
    /// The LSNs that what this shard routed since the last
    /// `Ctx::forward_publishes` appended up to, in the retained and the
    /// session journal: what the held acks wait for (0: nothing).
    pub needed_lsns: [u64; 2],
    /// Set while the retained journal cannot write (persistence on, every
    /// shard): retained QoS 1/2 publishes are refused, not acknowledged.
    pub store_failing: Option<Arc<AtomicBool>>,
    /// Sessions with queued frames to flush at the end of this step.
    dirty: Vec<SessionKey>,
    /// This step's QoS 0 frames, encoded once each (per protocol version
    /// and Topic Alias variant, each kind in its own lane) and shared by
    /// every subscriber as ranges; sealed into one chunk when the step ends
    /// (see [`crate::session::outqueue`]).
    batch: Batch,
    /// Publishes received on this shard, to hand to the other shards.
    remote_batch: Vec<Message>,
    /// The shard sequence number the next message handed on gets (from
    /// 1): each batch carries its first, for a session moving to another
    /// node (cluster::positions).
    handed_on: u64,
    /// How far this shard routed each other shard's publishes (its own:
    /// up to `handed_on`, plus `remote_batch`, routed as they came).
    positions: Seen,
    /// In a cluster or with more than one shard, the batches this shard
    /// routed lately, for a session moving here from another node
    /// (`Shard::catch_up`) or another shard (`Shard::claim_answered_after`).
    routed: Routed,
    /// The frames of the run being routed, 3.1.1 (index 0) and 5.0
    /// ([`Shard::route_run`], [`Shard::route_run_from_cluster`]): scratch
    /// kept for its allocation.
    run_frames: run::RunFrames,
    /// The sessions of a run from another node that take it message by
    /// message, with the QoS granted to each
    /// ([`Shard::route_run_from_cluster`]): scratch kept for its allocation.
    cluster_others: Vec<(SessionKey, QoS)>,
    /// Client ids whose sessions the bridge is handing to another node
    /// (`ToShard::Handing`): a session here takes no messages from NATS
    /// meanwhile, the bridge collects them for its new node
    /// (cluster::tail).
    cluster_handing: ahash::AHashSet<ByteString>,
    /// The number of the last batch from NATS this shard took
    /// (`ToShard::Deliver::seq`, 0: none): what a session this shard
    /// lets go to a claim of the node holds of NATS (the lend's position,
    /// `Shard::lend_interest`).
    nats_seq: u64,
    /// The run of publishes a connection's read is collecting
    /// ([`Shard::publish_run`]): scratch kept for its allocation.
    pub run: Vec<Message>,
    /// Control messages to send once the current borrow ends.
    pub outbox: Vec<(usize, ShardMsg)>,
    /// The outbox's per-peer queues once sent ([`Ctx::send_outbox`]),
    /// which keep its messages in order towards each peer.
    pub control: Rc<mesh::Control>,
    /// This shard's counters.
    pub stats: Counters,
    /// The gauges of the latest pass over the sessions (keep-alive sweep).
    pub session_totals: SessionTotals,
    /// Keep-alive, parking and offline-session deadlines ([`timers`]).
    pub timers: timers::Timers,
    /// Latest counters of every shard (shard 0 only), for `$SYS`.
    pub all_stats: Vec<Counters>,
    /// The shared read buffer (see [`READ_BUFFER_SIZE`]).
    pub read_buf: Box<[u8]>,
    /// Scratch iovec array for vectored writes, reused by every flush.
    pub iovecs: Vec<libc::iovec>,
    /// Next connection id; ids are never reused, so a connection task can tell
    /// whether the session at its slab key is still its own.
    next_conn_id: u64,
    /// Next id for a generated client id.
    next_generated_id: u64,
    /// When the shard started (keep-alive clock and `$SYS` uptime).
    pub started: Instant,
    /// Set once shutdown begins: no new connections or sessions.
    pub shutting_down: bool,
    /// Tasks waiting for shutdown to begin (the accept loops), woken by
    /// [`Shard::begin_shutdown`]: they need no timer of their own.
    shutdown_waiters: Vec<std::task::Waker>,
    /// Connections ended by [`Shard::shed`] whose tasks have not yet seen
    /// it (so they close with [`CloseReason::Shed`], not as a take-over).
    pub shed_conns: Vec<u64>,
    /// Password file and ACL, shared by all shards (lock-free reads).
    pub auth: Arc<Auth>,
    /// Every shard's admin gauges; this shard refreshes its own entry
    /// (see [`crate::observe::metrics`]). The broker shares one set with the HTTP
    /// thread; a shard made alone (tests) has its own.
    pub gauges: Arc<BrokerGauges>,
    /// The shard's side of the NATS bridge (`shard::cluster`); `None` for
    /// a single node.
    pub cluster: Option<crate::cluster::link::ClusterLink>,
}

/// Whether `session` may read a message on `topic` (the ACL's read rules,
/// checked only for sessions that need it; `reads` is made at the first
/// such session of a fan-out); a refusal is counted.
pub(crate) fn read_allowed<'a>(
    session: &Session,
    reads: &mut Option<ReadChecker<'a>>,
    auth: &Auth,
    topic: &'a str,
    stats: &mut Counters,
) -> bool {
    if !session.read_check {
        return true;
    }
    let reads = reads.get_or_insert_with(|| auth.read_checker(topic));
    let who = Who {
        client_id: &session.client_id,
        username: session.read_check_username(),
    };
    if reads.can_read(who) {
        return true;
    }
    stats.read_denied += 1;
    false
}

/// Offers the message of `encoded` to `session` (key `key`) at QoS
/// `granted`, through the delivery of its protocol version, and counts the
/// outcome in `stats`; a session that queued something goes on the
/// `dirty` list (to be flushed).
pub(crate) fn offer(
    session: &mut Session,
    encoded: &mut Encoded<'_>,
    key: SessionKey,
    granted: QoS,
    limits: &Limits,
    stats: &mut Counters,
    dirty: &mut Vec<SessionKey>,
) {
    let qos = encoded.message.qos;
    // One delivery path for both versions unless a 5.0 subscription has
    // options (No Local, Retain As Published, Subscription Identifiers).
    let delivery = if session.needs_subscription_options() {
        session.deliver_v5(encoded, key, granted, limits)
    } else {
        session.deliver(encoded, granted, limits)
    };
    match delivery {
        Delivery::Queued => {
            stats.publish_sent_by_qos[qos.min(granted) as usize] += 1;
            if !session.dirty {
                session.dirty = true;
                dirty.push(key);
            }
        }
        Delivery::Pending | Delivery::Skipped => {}
        Delivery::Dropped => stats.publish_dropped += 1,
    }
}

/// A shard's state plus its mesh senders, as each of its tasks holds them.
#[derive(Clone)]
pub struct Ctx {
    /// The shard's state.
    pub shard: Rc<RefCell<Shard>>,
    /// Senders to every other shard.
    pub mesh: MeshSenders,
    /// This shard's index.
    pub id: usize,
    /// Number of shards.
    pub nr_shards: usize,
    /// The shard's epoll instance, which parked connections wait on
    /// (`connection::park`).
    pub poller: Rc<Poller>,
}

impl Ctx {
    /// Sends queued control messages from detached tasks, in order per peer.
    pub fn send_outbox(&self) {
        let (outbox, control) = {
            let mut shard = self.shard.borrow_mut();
            (std::mem::take(&mut shard.outbox), shard.control.clone())
        };
        for (peer, msg) in outbox {
            mesh::send_ordered(&self.mesh, &control, peer, msg);
        }
    }

    /// Hands this shard's new publishes to every other shard, waiting while a
    /// peer's channel is full (back-pressure on the publisher). With held
    /// acks of retained publishes, waits until every shard applied them
    /// (and, in a cluster, the retained bucket holds them), then sends the
    /// acks ([`HeldAcks`]). SUBACKs held for the cluster go first
    /// (`Ctx::release_subacks`).
    pub async fn forward_publishes(&self) {
        self.release_subacks().await;
        let (batch, held, durable, shared, passed_on) = {
            let mut shard = self.shard.borrow_mut();
            let held = shard.held_acks.take();
            // What this shard's journals must hold before the acks go:
            // what the publishes since the last time appended.
            let needed = std::mem::take(&mut shard.needed_lsns);
            let durable: Vec<(Rc<Journal>, u64)> = [&shard.retain_journal, &shard.session_journal]
                .into_iter()
                .zip(needed)
                .filter_map(|(journal, lsn)| Some((journal.clone()?, lsn)))
                .filter(|(journal, lsn)| journal.acked_lsn() < *lsn)
                .collect();
            let shared = shard.take_shared_out();
            if held.is_empty() && shard.held_acks.has_open() {
                // Deliveries passed on at once for publishes whose acks
                // do not wait (QoS 0, a will): their answers count for
                // nothing.
                let token = shard.held_acks.start(0);
                shard.held_acks.forget(token);
            }
            let passed_on = shard.held_acks.has_open();
            (
                shard.take_numbered_batch(),
                held,
                durable,
                shared,
                passed_on,
            )
        };
        let persistent = self.shard.borrow().store_failing.is_some();
        let peers = if batch.is_some() && !held.is_empty() {
            self.nr_shards - 1
        } else {
            0
        };
        // With persistence, held acks wait for each shared delivery too: a
        // persistent member on another shard keeps it in that shard's
        // journal, which answers once that is durable.
        let shared_waited = if persistent && !held.is_empty() {
            shared.iter().map(|(_, d)| d.len()).sum()
        } else {
            0
        };
        // Deliveries passed on at once (`Shard::route_shared`) joined this
        // step's barrier already, counted.
        let barrier = (peers + shared_waited > 0 || passed_on).then(|| {
            self.shard
                .borrow_mut()
                .held_acks
                .start(peers + shared_waited)
        });
        for (peer, mut deliveries) in shared {
            let count = deliveries.len();
            if shared_waited > 0 {
                for delivery in &mut deliveries {
                    delivery.barrier = barrier.map(|token| (self.id, token));
                }
            }
            if self
                .mesh
                .send_to(peer, ShardMsg::SharedPublish(deliveries))
                .await
                .is_err()
            {
                debug!("mesh: shard {peer} is gone, shared deliveries not forwarded");
                if let (Some(token), true) = (barrier, shared_waited > 0) {
                    self.shard.borrow_mut().held_acks.applied_many(token, count);
                }
            }
        }
        if let Some((batch, first)) = &batch {
            for peer in (0..self.nr_shards).filter(|&p| p != self.id) {
                let applied = barrier.filter(|_| peers > 0).map(|token| (self.id, token));
                let msg = ShardMsg::Publish(batch.clone(), (self.id, *first), applied);
                if self.mesh.send_to(peer, msg).await.is_err() {
                    debug!("mesh: shard {peer} is gone, publishes not forwarded");
                    if let (Some(token), true) = (barrier, peers > 0) {
                        self.shard.borrow_mut().held_acks.applied(token);
                    }
                }
            }
        }
        // Held acks of retained publishes wait for the cluster's bucket too.
        let stored = match batch {
            Some((batch, first)) => {
                let retained = !held.is_empty()
                    && self.shard.borrow().cluster.is_some()
                    && batch.iter().any(|m| m.retain && m.qos != QoS::AtMostOnce);
                let stored = self.forward_to_cluster((batch, first), retained).await;
                retained.then_some(stored)
            }
            None => None,
        };
        if let Some(token) = barrier {
            let applied = std::future::poll_fn(|cx| {
                self.shard.borrow_mut().held_acks.poll_applied(token, cx)
            });
            let waited = glommio::timer::timeout(APPLY_TIMEOUT, async {
                applied.await;
                Ok(())
            })
            .await;
            if waited.is_err() {
                self.shard.borrow_mut().held_acks.forget(token);
                if persistent {
                    self.refuse_held(held, "the retained store did not confirm it");
                    return;
                }
                log::warn!(
                    "shards did not apply a retained publish in {APPLY_TIMEOUT:?}, acknowledged anyway"
                );
            }
        }
        if let Some(stored) = stored
            && !self.retained_stored(stored).await
        {
            // Counted by `retained_stored`.
            log::warn!(
                "cluster: a retained QoS 1/2 publish not stored in the retained bucket in time; closing its connection unacknowledged"
            );
            self.close_held(held);
            return;
        }
        for (journal, lsn) in durable {
            let waited = glommio::timer::timeout(APPLY_TIMEOUT, async {
                journal.wait_acked(lsn).await;
                Ok(())
            })
            .await;
            if waited.is_err() {
                self.refuse_held(held, "its journal write did not complete");
                return;
            }
        }
        if held.is_empty() {
            return;
        }
        let mut shard = self.shard.borrow_mut();
        for (key, conn_id, ack) in held {
            if let Some(session) = shard.session_for(key, conn_id) {
                session.queue_frame(&ack);
                shard.mark_dirty(key);
            }
        }
        shard.flush_dirty();
    }
}

impl Ctx {
    /// Held acks whose publishes persistence could not store in
    /// [`APPLY_TIMEOUT`]: never sent (an acknowledgement the disk cannot back
    /// is a lie); their connections close, so the clients resend after
    /// reconnecting.
    fn refuse_held(&self, held: Vec<(SessionKey, u64, Box<[u8]>)>, why: &str) {
        log::warn!(
            "persistence: a retained QoS 1/2 publish not acknowledged in {APPLY_TIMEOUT:?} ({why}); closing its connection"
        );
        self.shard.borrow_mut().stats.store_refused += held.len() as u64;
        self.close_held(held);
    }

    /// Closes the connections of `held` acks, which are never sent: the
    /// clients send their publishes again after reconnecting.
    fn close_held(&self, held: Vec<(SessionKey, u64, Box<[u8]>)>) {
        let mut shard = self.shard.borrow_mut();
        for (key, conn_id, _) in held {
            if let Some(link) = shard
                .session_for(key, conn_id)
                .and_then(|s| s.link.as_mut())
            {
                link.close(CloseReason::StoreUnavailable);
            }
        }
    }
}

impl Shard {
    /// True while persistence is on and cannot store retained updates (full
    /// disk): a retained QoS 1/2 publish is refused, not acknowledged.
    pub fn store_refuses(&self) -> bool {
        self.store_failing
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Relaxed))
    }

    /// A fresh shard.
    pub fn new(id: usize, nr_shards: usize, config: Arc<Config>, auth: Arc<Auth>) -> Shard {
        let limits = Limits {
            max_inflight: config.max_inflight_messages,
            max_queued_messages: config.max_queued_messages,
            max_queued_bytes: config.max_queued_bytes,
            max_awaiting_rel: config.max_awaiting_rel,
            max_queued_bytes_shard: config.max_queued_bytes_total / nr_shards.max(1),
        };
        let strategy = config.shared_subscription_strategy;
        Shard {
            id,
            nr_shards,
            config,
            limits,
            sessions: slab::Slab::new(),
            by_client_id: SessionIndex::default(),
            router: Router::new(),
            retained: RetainStore::default(),
            shared: SharedGroups::new(strategy),
            shared_out: (0..nr_shards).map(|_| Vec::new()).collect(),
            shared_settled: Vec::new(),
            moved: std::collections::VecDeque::new(),
            moves_waiting: 0,
            registry: Registry::default(),
            held_acks: HeldAcks::default(),
            held_subacks: Vec::new(),
            retain_journal: None,
            session_journal: None,
            persist_stamps: ahash::AHashMap::new(),
            persist_wills: ahash::AHashMap::new(),
            persist_refs: Vec::new(),
            persist_sent: Vec::new(),
            persist_hold: Vec::new(),
            persist_step: crate::store::flows::StepBatch::default(),
            drops_waiting: Vec::new(),
            held_out: held_out::HeldOut::default(),
            waiting: crate::net::waiting::Waiting::default(),
            needed_lsns: [0; 2],
            store_failing: None,
            dirty: Vec::new(),
            batch: Batch::default(),
            remote_batch: Vec::new(),
            handed_on: 1,
            positions: Seen::new(nr_shards),
            routed: Routed::default(),
            run_frames: Default::default(),
            cluster_others: Vec::new(),
            cluster_handing: ahash::AHashSet::new(),
            nats_seq: 0,
            run: Vec::new(),
            outbox: Vec::new(),
            control: Rc::default(),
            stats: Counters::default(),
            session_totals: SessionTotals::default(),
            timers: timers::Timers::default(),
            all_stats: vec![Counters::default(); nr_shards],
            read_buf: vec![0u8; READ_BUFFER_SIZE].into_boxed_slice(),
            iovecs: Vec::with_capacity(3 * crate::session::outqueue::MAX_IOVECS_PER_WRITE),
            next_conn_id: 1,
            next_generated_id: 1,
            started: Instant::now(),
            shutting_down: false,
            shutdown_waiters: Vec::new(),
            shed_conns: Vec::new(),
            auth,
            gauges: Arc::new(BrokerGauges::new(nr_shards)),
            cluster: None,
        }
    }

    /// Begins the shutdown: sets `shutting_down` and wakes the tasks
    /// waiting for it ([`Shard::poll_shutdown`]).
    pub fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        // Sockets that never sent CONNECT just close.
        self.waiting.clear();
        for waker in self.shutdown_waiters.drain(..) {
            waker.wake();
        }
    }

    /// Ready once the shutdown has begun; until then `cx`'s task is woken
    /// when it does.
    pub fn poll_shutdown(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.shutting_down {
            return std::task::Poll::Ready(());
        }
        if !self
            .shutdown_waiters
            .iter()
            .any(|w| w.will_wake(cx.waker()))
        {
            self.shutdown_waiters.push(cx.waker().clone());
        }
        std::task::Poll::Pending
    }

    /// A new connection id.
    pub fn new_conn_id(&mut self) -> u64 {
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        id
    }

    /// A client id for a client that sent an empty one with CleanSession = 1
    /// (§3.1.3.1); unique across shards because it names the shard.
    pub fn generate_client_id(&mut self) -> ByteString {
        let n = self.next_generated_id;
        self.next_generated_id += 1;
        match &self.cluster {
            // Process ids repeat across hosts: the node's name keeps the
            // id unique in the cluster.
            Some(link) => ByteString::from(format!(
                "fanmq-{}-{}-{}-{n}",
                link.status.node_name,
                std::process::id(),
                self.id
            )),
            None => ByteString::from(format!("fanmq-{}-{}-{n}", std::process::id(), self.id)),
        }
    }

    /// Time since the shard started in keep-alive ticks
    /// ([`crate::session::link::TICKS_PER_SEC`]).
    pub fn now_ticks(&self) -> u32 {
        let ticks = self.started.elapsed().as_millis() / u128::from(1000 / TICKS_PER_SEC);
        u32::try_from(ticks).unwrap_or(u32::MAX)
    }

    /// The session at `key` if it still belongs to connection `conn_id`.
    pub fn session_for(&mut self, key: SessionKey, conn_id: u64) -> Option<&mut Session> {
        self.sessions
            .get_mut(key as usize)
            .filter(|s| s.link.as_ref().is_some_and(|l| l.conn_id == conn_id))
            .map(|s| &mut **s)
    }

    /// A PUBLISH from a client of this shard (or a will, or `$SYS`): delivered
    /// here now, and queued for the other shards.
    pub fn publish(&mut self, message: Message) {
        self.publish_from(message, None);
    }

    /// [`Shard::publish`] of a client's PUBLISH: `origin` is its session
    /// (MQTT 5.0 No Local). A retained message is stamped here, where it
    /// enters the broker (`RetainStore::stamp`), so every replica orders
    /// it the same.
    pub fn publish_from(&mut self, mut message: Message, origin: Option<SessionKey>) {
        if message.retain {
            message.retain_stamp = self.retained.stamp(self.id);
        }
        self.route_from(&message, origin);
        if !self.shared.is_empty() && !self.shares_through_cluster(&message.topic) {
            self.route_shared(&message, origin);
        }
        if self.nr_shards > 1 || self.cluster.is_some() {
            self.remote_batch.push(message);
        }
    }

    /// Delivers a message to this shard's matching subscribers and applies it
    /// to the retained store (the tests' way in; the broker routes through
    /// [`Shard::publish_from`], [`Shard::route_batch`] and
    /// [`Shard::route_from_cluster`]).
    #[cfg(test)]
    pub fn route(&mut self, message: &Message) {
        self.route_from(message, None);
    }

    /// [`Shard::route`] of a message published by session `origin` of this
    /// shard. MQTT 5.0 subscribers go through [`Session::deliver_v5`]
    /// (subscription options): one version check per delivery. A session
    /// with a subscription the ACL covers only partly
    /// ([`Session::read_check`]) gets the message only if the ACL lets it
    /// read the topic: one flag test per delivery for the others.
    fn route_from(&mut self, message: &Message, origin: Option<SessionKey>) {
        self.route_matching(message, origin, false);
    }

    /// [`Shard::route_from`], leaving out the sessions that take runs
    /// ([`run::takes_runs`]) when `skip_run_takers`: they got the message
    /// already with the rest of its run ([`Shard::route_run`]).
    fn route_matching(
        &mut self,
        message: &Message,
        origin: Option<SessionKey>,
        skip_run_takers: bool,
    ) {
        self.queue_for_attaching(None, message, false);
        if message.retain {
            self.retained.apply(message);
            if let Some(journal) = &self.retain_journal
                && let Some(record) = Record::of_retained(message)
            {
                self.needed_lsns[0] = journal.append(&record);
            }
        }
        let Shard {
            router,
            sessions,
            dirty,
            stats,
            limits,
            batch,
            persist_stamps,
            persist_refs,
            persist_sent,
            persist_hold,
            auth,
            ..
        } = self;
        let mut keepers =
            persist::Keepers::new(persist_stamps, persist_refs, persist_sent, persist_hold);
        let mut encoded = Encoded::new(message, batch);
        encoded.origin = origin;
        // Made at the first session with read checks only.
        let mut reads: Option<ReadChecker<'_>> = None;
        router.for_each_match(&message.topic, |key, granted| {
            let Some(session) = sessions.get_mut(key as usize) else {
                return;
            };
            if skip_run_takers && run::takes_runs(session, key, persist_stamps) {
                return;
            }
            if !read_allowed(session, &mut reads, auth, &message.topic, stats) {
                return;
            }
            keepers.offer(session, key, |session| {
                offer(session, &mut encoded, key, granted, limits, stats, dirty);
            });
        });
        if let Some(mid) = keepers.mid() {
            self.journal_queued(message, mid);
        }
    }

    /// The connection of session `key`, if it is online.
    pub(super) fn link_of(&self, key: SessionKey) -> Option<&crate::session::link::Link> {
        self.sessions
            .get(key as usize)
            .and_then(|s| s.link.as_ref())
    }

    /// Puts a session on the list to flush (it queued something).
    pub fn mark_dirty(&mut self, key: SessionKey) {
        if let Some(session) = self.sessions.get_mut(key as usize)
            && !session.dirty
        {
            session.dirty = true;
            self.dirty.push(key);
        }
    }

    /// Writes every dirty session's queue with one vectored send each. A
    /// session whose socket is full is handed to its connection task, which
    /// waits for the socket to become writable; so is every TLS or
    /// WebSocket session (a framed link, [`crate::session::link::framed_fd`]),
    /// whose bytes only its task may write. A parked plain connection that
    /// owes acknowledgements once written to is woken, so that its task
    /// reads them (see the comment at the wake).
    pub fn flush_dirty(&mut self) {
        if self
            .persist_step
            .due(Instant::now(), STEP_RECORD_ENTRIES, STEP_RECORD_AGE)
        {
            self.journal_done();
        }
        let dirty = std::mem::take(&mut self.dirty);
        if !self.batch.is_empty() {
            // End of the step: every session with ranges of the batch is on
            // the dirty list; give them the sealed chunk before any write.
            let (chunk, bases) = self.batch.seal();
            for &key in &dirty {
                if let Some(session) = self.sessions.get_mut(key as usize) {
                    session.out.seal(&chunk, &bases);
                }
            }
        }
        let durable = self.session_journal.as_ref().map(|j| j.acked_lsn());
        for &key in &dirty {
            let Some(session) = self.sessions.get_mut(key as usize) else {
                continue;
            };
            session.dirty = false;
            let owes_acks = session.awaits_acks();
            let Some(link) = session.link.as_mut() else {
                continue;
            };
            if self.held_out.holds(key, link.conn_id, durable) {
                continue;
            }
            if link.blocked {
                continue;
            }
            if link.is_framed() {
                // TLS / WebSocket: only the connection task may write.
                link.blocked = true;
                link.wake();
                continue;
            }
            match session.out.flush(link.fd, &mut self.iovecs) {
                Ok((n, Flushed::All)) => {
                    self.stats.bytes_sent += n as u64;
                    if owes_acks && link.is_parked() {
                        // QoS 1/2 messages went to a parked connection: it
                        // gets its task back now, which reads the
                        // acknowledgements on glommio's stream (io_uring,
                        // batched by `acks_per_wake`). Left parked, its
                        // first PUBACK would wake the watcher thread (a
                        // context switch there and back) only to resume it
                        // then.
                        link.wake();
                    }
                }
                Ok((n, Flushed::WouldBlock)) => {
                    self.stats.bytes_sent += n as u64;
                    link.blocked = true;
                    link.wake();
                }
                Err(e) => {
                    debug!("write to {} failed: {e}", session.client_id);
                    link.close(CloseReason::Io);
                }
            }
        }
        // Keep the list's allocation for the next step.
        let mut dirty = dirty;
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
        // Once per step, not per delivery: is the shard over its share of
        // `max_queued_bytes_total`?
        if self.limits.shard_over_budget() {
            self.shed();
        }
    }

    /// The shard is over its share of `max_queued_bytes_total`: disconnects
    /// the clients that do not read (their socket's send buffer is full),
    /// largest queue first, until the shard is back under its share. Their
    /// queues are freed at once, so the next step does not shed again for
    /// the same bytes. This is stage 2 of the shedding order (README,
    /// "Security"); stage 0 is each client's own queue limit (QoS 0 dropped
    /// at a full queue), stage 1 refuses to park QoS 1/2 for offline
    /// sessions while over budget ([`Limits::shard_over_budget`]).
    pub fn shed(&mut self) {
        let budget = self.limits.max_queued_bytes_shard;
        // A TLS or WebSocket link is "blocked" whenever it has something to
        // write (its own task writes it), so for those a queue of at least
        // half the client's limit is the sign that it does not keep up.
        let framed_stalled = self.limits.max_queued_bytes / 2;
        let mut stalled: Vec<(usize, SessionKey)> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.link.as_ref().is_some_and(|l| {
                    l.blocked && (!l.is_framed() || s.out.bytes() >= framed_stalled)
                }) && !s.out.is_empty()
            })
            .map(|(key, s)| (s.out.bytes(), key as SessionKey))
            .collect();
        stalled.sort_unstable_by_key(|&(bytes, _)| std::cmp::Reverse(bytes));
        let before = self.stats.clients_shed;
        for (bytes, key) in stalled {
            if crate::session::outqueue::shard_queued_bytes() <= budget {
                break;
            }
            let Some(session) = self.sessions.get_mut(key as usize) else {
                continue;
            };
            let Some(link) = session.link.as_mut() else {
                continue;
            };
            debug!(
                "client {} shed: not reading, {bytes} bytes queued",
                session.client_id
            );
            // End the connection now, as its teardown would (the session is
            // kept offline or removed and its queue freed), so no more messages
            // are queued to it; the woken connection task finds its session
            // gone and closes the socket with a reset.
            let conn_id = link.conn_id;
            link.close(CloseReason::Shed);
            self.shed_conns.push(conn_id);
            self.end_connection(key, conn_id);
            self.stats.clients_shed += 1;
        }
        let shed = self.stats.clients_shed - before;
        if shed > 0 {
            log::info!(
                "shard {} over its share of max_queued_bytes_total ({budget} bytes): disconnected {shed} clients that do not read",
                self.id
            );
        }
    }

    /// True when publishes wait to be handed to other shards.
    pub fn has_remote_batch(&self) -> bool {
        !self.remote_batch.is_empty() || self.has_shared_out()
    }

    /// The publishes to hand to other shards, if any.
    #[cfg(test)]
    pub fn take_remote_batch(&mut self) -> Option<Arc<Vec<Message>>> {
        self.take_numbered_batch().map(|(batch, _)| batch)
    }

    /// [`Shard::take_remote_batch`], with the shard sequence number of its
    /// first message.
    pub fn take_numbered_batch(&mut self) -> Option<(Arc<Vec<Message>>, u64)> {
        if self.remote_batch.is_empty() {
            return None;
        }
        let first = self.handed_on;
        let len = self.remote_batch.len();
        self.handed_on += len as u64;
        self.positions.mark(self.id, first, len);
        let batch = Arc::new(std::mem::take(&mut self.remote_batch));
        if self.keeps_routed() {
            self.routed.push(Instant::now(), (self.id, first), &batch);
        }
        Some((batch, first))
    }

    /// Routes a batch from another shard ([`Shard::route_batch`]):
    /// `(shard, first)`, the shard and its first message's shard sequence
    /// number, which this shard has routed from then on.
    pub fn route_batch_from(&mut self, messages: &Arc<Vec<Message>>, (shard, first): (usize, u64)) {
        self.route_batch(messages);
        self.positions.mark(shard, first, messages.len());
        if self.keeps_routed() {
            self.routed.push(Instant::now(), (shard, first), messages);
        }
    }

    /// Whether this shard keeps the batches it routes lately
    /// ([`Shard::routed`]): in a cluster, and with more than one shard (a
    /// session moving here between shards takes from them what its old
    /// shard had not routed, `Shard::claim_answered_after`).
    fn keeps_routed(&self) -> bool {
        self.nr_shards > 1 || self.cluster.is_some()
    }

    /// What this shard has routed of every shard's publishes, its own
    /// included (routed as they came).
    pub fn seen(&self) -> Seen {
        let mut seen = self.positions.clone();
        seen.mark(self.id, self.handed_on, self.remote_batch.len());
        seen
    }

    /// May the client of session `key`, with user name `username`, publish
    /// to `topic`? Always true without an ACL file.
    pub fn may_publish(&self, key: SessionKey, username: Option<&str>, topic: &str) -> bool {
        if !self.auth.acl_enabled() {
            return true;
        }
        let Some(session) = self.sessions.get(key as usize) else {
            return false;
        };
        let who = Who {
            client_id: &session.client_id,
            username,
        };
        self.auth.can_publish(who, topic)
    }

    /// The session with `client_id` on this shard, live or offline.
    pub fn session_key(&self, client_id: &str) -> Option<SessionKey> {
        self.by_client_id.get(&self.sessions, client_id)
    }

    /// Inserts a session and its subscriptions.
    pub fn insert_session(&mut self, session: Session) -> SessionKey {
        let key = self.sessions.insert(Box::new(session)) as SessionKey;
        if let Some(session) = self.sessions.get_mut(key as usize) {
            let mut shares = Vec::new();
            for (filter, qos) in &mut session.state.subscriptions {
                if share::is_shared(filter) {
                    shares.push((ByteString::from(&**filter), *qos));
                    continue;
                }
                // Share this shard's copy of the filter (a session taken over
                // from another shard drops its copy of that shard's).
                *filter = self.router.subscribe_shared(filter, key, *qos).1;
                if let Some(link) = &mut self.cluster {
                    link.subscribed(filter);
                }
            }
            for (share, qos) in shares {
                if let Some(link) = &mut self.cluster {
                    link.subscribed(&share);
                }
                self.shared_join(key, share, qos);
            }
        }
        self.by_client_id.insert(&self.sessions, key);
        self.journal_session(key);
        self.share_subscriptions(key);
        self.arm_timers(key);
        crate::session::note_backlog();
        key
    }

    /// Removes a session and its subscriptions, returning it.
    pub fn remove_session(&mut self, key: SessionKey) -> Option<Session> {
        self.remove_session_to(key, None)
            .map(|(session, _)| session)
    }

    /// [`Shard::remove_session`]; `moving_to`: the shard of the connection
    /// that takes the persistent session over, with its state. Its shared
    /// memberships then stay in the other shards' replicas, offline, until
    /// its new shard announces them (`Shard::shared_moved`), so that no
    /// message published meanwhile finds its group without it.
    ///
    /// `moving_to` names the claim (shard, token); the position of a lend
    /// of the session's filters ([`Shard::lend_interest`]) comes back with
    /// the session, for the claim's answer.
    pub fn remove_session_to(
        &mut self,
        key: SessionKey,
        moving_to: Option<(usize, u64)>,
    ) -> Option<(Session, Option<u64>)> {
        self.disarm_link(key);
        let session = *self.sessions.try_remove(key as usize)?;
        self.persist_stamps.remove(&key);
        // Before this shard drops its interest in them.
        let lent = moving_to.and_then(|claim| {
            self.lend_interest(&session.client_id, claim, &session.state, self.nats_seq)
        });
        let moving_to = moving_to.map(|(to, _)| to);
        for (filter, _) in &session.state.subscriptions {
            self.drop_filter(key, filter, moving_to.is_none());
        }
        self.by_client_id
            .remove(&self.sessions, &session.client_id, key);
        if let Some(to) = moving_to {
            self.shared_moved(key, &session, to);
        }
        Some((session, lent))
    }

    /// The connection `conn_id` of session `key` ended: a CleanSession = 1
    /// session is discarded (and its home shard told), a persistent one is
    /// kept offline with its subscriptions and unacknowledged messages.
    pub fn end_connection(&mut self, key: SessionKey, conn_id: u64) {
        let now = self.now_ticks();
        let Some(session) = self.session_for(key, conn_id) else {
            return;
        };
        if session.clean_session {
            if let Some(session) = self.remove_session(key) {
                self.pass_on_shared_backlog(&session.state);
                self.release(&session.client_id, session.claim);
            }
        } else {
            self.disarm_link(key);
            let Some(session) = self.sessions.get_mut(key as usize) else {
                return;
            };
            session.detach();
            session.offline_since = now;
            self.arm_offline(key);
            self.journal_session(key);
            if !self.shared.is_empty() {
                self.shared_refresh(key);
            }
        }
    }

    /// Ends the offline sessions `expired` whose Session Expiry Interval
    /// has passed (§4.1), found by the keep-alive sweep in its offline
    /// wheel ([`timers`]). Their home
    /// shards are told through the outbox.
    pub fn end_expired_sessions(&mut self, expired: &[SessionKey]) {
        for &key in expired {
            if let Some(mut session) = self.remove_session(key) {
                debug!("client {}: session expired", session.client_id);
                // Its shared backlog goes to other members first, and the
                // drop is written once their shards hold it: a `kill -9`
                // in between keeps the messages with the session.
                let handed = self.hand_over_shared_backlog(&session.state);
                self.journal_drop_after(&session.client_id, handed, None);
                // A will still waiting for its delay goes when its session
                // ends (§3.1.3.2.2).
                if let Some(will) = session.take_due_will(u32::MAX) {
                    self.stats.publish_received += 1;
                    self.publish(will);
                }
                self.release(&session.client_id, session.claim);
            }
        }
    }

    /// Keeps `will` in offline session `key` until `delay` seconds from
    /// now (MQTT 5.0 Will Delay Interval), or until its session ends.
    pub fn delay_will(&mut self, key: SessionKey, will: Message, delay: u32) {
        let due = self
            .now_ticks()
            .saturating_add(delay.saturating_mul(TICKS_PER_SEC));
        let due_unix_ms = crate::store::record::unix_ms_now() + u64::from(delay) * 1000;
        self.journal_will(key, Some((&will, delay)), due_unix_ms);
        if let Some(session) = self.sessions.get_mut(key as usize) {
            session.delay_will(due, will);
            self.arm_offline(key);
        }
    }

    /// Publishes the delayed wills of sessions `due` (found by the
    /// keep-alive sweep).
    pub fn publish_due_wills(&mut self, due: &[SessionKey]) {
        let now = self.now_ticks();
        for &key in due {
            let will = self
                .sessions
                .get_mut(key as usize)
                .and_then(|s| s.take_due_will(now));
            if let Some(will) = will {
                self.stats.publish_received += 1;
                self.publish(will);
                self.journal_will(key, None, 0);
            }
        }
        self.flush_dirty();
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{self, attach, attach_client};
    use super::*;
    use crate::protocol::v3::QoS;
    use bytes::Bytes;

    /// A message on `topic` at `qos`.
    fn message(topic: &str, payload: &str, qos: QoS, retain: bool) -> Message {
        Message {
            topic: ByteString::from(topic),
            payload: Bytes::from(payload.to_string()),
            qos,
            retain,
            retain_stamp: 0,
            properties: None,
        }
    }

    #[test]
    fn route_queues_to_matching_subscribers_and_flush_writes_each_once() {
        let mut shard = testing::shard();
        let mut a = attach_client(&mut shard, "a", "score/+", QoS::AtMostOnce, None);
        let mut b = attach_client(&mut shard, "b", "score/#", QoS::AtLeastOnce, None);
        let mut other = attach_client(&mut shard, "c", "news/#", QoS::AtMostOnce, None);
        shard.flush_dirty(); // the SUBACKs
        shard.route(&message("score/1", "1-0", QoS::AtLeastOnce, false));
        shard.route(&message("score/1", "2-0", QoS::AtMostOnce, false));
        assert_eq!(shard.stats.publish_sent_by_qos, [3, 1, 0]);
        shard.flush_dirty();
        let got_a = a.publishes();
        assert_eq!(
            got_a,
            vec![
                ("score/1".into(), b"1-0".to_vec(), QoS::AtMostOnce),
                ("score/1".into(), b"2-0".to_vec(), QoS::AtMostOnce),
            ],
            "granted QoS 0 downgrades the QoS 1 publish"
        );
        let got_b = b.publishes();
        assert_eq!(got_b.len(), 2);
        assert_eq!(got_b[0].2, QoS::AtLeastOnce);
        assert!(other.publishes().is_empty());
        assert!(shard.dirty.is_empty(), "every dirty session was flushed");
        assert!(shard.stats.bytes_sent > 0);
    }

    #[test]
    fn a_retained_publish_is_stored_and_given_to_later_subscribers() {
        let mut shard = testing::shard();
        shard.route(&message("price/x", "9", QoS::AtMostOnce, true));
        assert_eq!(shard.retained.len(), 1);
        let mut late = attach_client(&mut shard, "late", "price/#", QoS::AtMostOnce, None);
        shard.flush_dirty();
        assert_eq!(
            late.publishes(),
            vec![("price/x".into(), b"9".to_vec(), QoS::AtMostOnce)]
        );
    }

    #[test]
    fn publish_keeps_a_remote_batch_only_with_other_shards() {
        let mut alone = testing::shard();
        alone.publish(message("t", "x", QoS::AtMostOnce, false));
        assert!(alone.take_remote_batch().is_none());
        let mut two = testing::shard_with(0, 2, Config::default());
        two.publish(message("t", "x", QoS::AtMostOnce, false));
        two.publish(message("t", "y", QoS::AtMostOnce, false));
        let batch = two.take_remote_batch().expect("a batch for shard 1");
        assert_eq!(batch.len(), 2, "one mesh message for the whole read");
        assert!(two.take_remote_batch().is_none());
    }

    #[test]
    fn a_full_socket_hands_the_session_to_its_task_and_the_rest_still_gets_written() {
        let mut shard = testing::shard();
        let mut slow = attach_client(&mut shard, "slow", "t", QoS::AtMostOnce, Some(4096));
        let mut fast = attach_client(&mut shard, "fast", "t", QoS::AtMostOnce, None);
        shard.flush_dirty();
        let payload = "x".repeat(1000);
        for _ in 0..200 {
            shard.route(&message("t", &payload, QoS::AtMostOnce, false));
            shard.flush_dirty();
            let _ = fast.publishes();
        }
        let slow_link = shard.sessions[slow.key as usize].link.as_ref().unwrap();
        assert!(slow_link.blocked, "the socket filled: its task writes now");
        assert!(!shard.sessions[slow.key as usize].out.is_empty());
        assert!(
            !shard.sessions[fast.key as usize]
                .link
                .as_ref()
                .unwrap()
                .blocked
        );
        // The slow client reads: it gets a prefix of what was queued, in order.
        assert!(!slow.publishes().is_empty());
    }

    #[test]
    fn over_its_share_of_queued_bytes_the_shard_sheds_the_clients_that_do_not_read() {
        let config = Config {
            max_queued_bytes_total: 64 * 1024,
            max_queued_bytes: 1 << 20,
            max_queued_messages: 100_000,
            ..Config::default()
        };
        let mut shard = testing::shard_with(0, 1, config);
        let stalled = attach_client(&mut shard, "stalled", "t", QoS::AtMostOnce, Some(4096));
        let mut reading = attach_client(&mut shard, "reading", "t", QoS::AtMostOnce, None);
        shard.flush_dirty();
        let payload = "x".repeat(1000);
        for _ in 0..400 {
            shard.route(&message("t", &payload, QoS::AtMostOnce, false));
            shard.flush_dirty();
            let _ = reading.publishes();
            if shard.stats.clients_shed > 0 {
                break;
            }
        }
        assert_eq!(shard.stats.clients_shed, 1);
        assert!(
            shard.sessions.get(stalled.key as usize).is_none(),
            "the stalled clean session is gone"
        );
        assert!(shard.sessions.get(reading.key as usize).is_some());
        assert!(shard.shed_conns.len() == 1);
        assert!(crate::session::outqueue::shard_queued_bytes() <= 64 * 1024);
    }

    #[test]
    fn subscribe_refuses_invalid_filters_and_counts_the_limits() {
        let config = Config {
            max_topic_levels: 2,
            ..Config::default()
        };
        let mut shard = testing::shard_with(0, 1, config);
        let key = attach(&mut shard, "c", "a/b", QoS::AtMostOnce);
        assert_eq!(shard.router.len(), 1);
        let _ = attach(&mut shard, "d", "a/b/c", QoS::AtMostOnce);
        assert_eq!(shard.stats.subscriptions_refused, 1);
        let _ = attach(&mut shard, "e", "a/#/b", QoS::AtMostOnce);
        assert_eq!(
            shard.router.len(),
            1,
            "neither the deep nor the invalid filter"
        );
        assert!(shard.remove_session(key).is_some());
        assert_eq!(shard.router.len(), 0, "removing a session unsubscribes it");
    }
}
