//! What shards and the bridge thread send each other, and the state both
//! sides and the admin API read (docs/design/cluster.md §3).
//!
//! Three queues, all `async-channel` (runtime-agnostic: the shards are on
//! glommio, the bridge on tokio): one bounded queue of publish batches from
//! every shard to the bridge; one unbounded queue of interest changes (a
//! change must never be lost, and there is at most one per subscription);
//! and one bounded queue per shard from the bridge, which the bridge only
//! `try_send`s messages into, so that one busy shard never stops it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ahash::AHashMap;
use bytestring::ByteString;
use serde::Serialize;

use crate::cluster::positions::Seen;
use crate::observe::counters::Counters;
use crate::protocol::message::Message;
use crate::router::shared;

/// Most members of one shared subscription group a shard reports to the
/// bridge, and most queue subscriptions per subject a node holds for the
/// group: NATS picks among queue subscriptions, so a node holding one per
/// member (up to this) gets a share of the group's messages in proportion
/// to its members (docs/design/cluster.md §7).
pub const MAX_SHARE_WEIGHT: u32 = 16;

/// A change of a shard's interest in a filter.
#[derive(Debug)]
pub struct Interest {
    /// The shard.
    pub shard: usize,
    /// The MQTT filter.
    pub filter: ByteString,
    /// True: the filter got its first subscriber on the shard; false: it
    /// lost its last. For a shared subscription (the whole `$share/...`
    /// string) also each further member up to [`MAX_SHARE_WEIGHT`], and
    /// each member gone below it.
    pub add: bool,
    /// For an addition: dropped by the bridge once the NATS server holds
    /// the node's interest in the filter (or at once: the node holds it
    /// already, the link is down), which lets the SUBACK go
    /// (docs/design/cluster.md §6).
    pub ready: Option<async_channel::Sender<()>>,
}

/// A batch of a shard's publishes for the bridge.
#[derive(Debug)]
pub struct Outgoing {
    /// The messages, the same batch the other shards got.
    pub messages: Arc<Vec<Message>>,
    /// Set when acknowledgements of retained publishes in the batch wait
    /// for the retained bucket: the bridge answers `true` once the bucket
    /// holds every retained message of the batch, `false` when it cannot
    /// say so (a KV error, the link down in `fence` mode); a dropped
    /// sender means the same as `false`.
    pub stored: Option<async_channel::Sender<bool>>,
    /// The shard that sent it.
    pub shard: usize,
    /// The shard sequence number of its first message (cluster::positions).
    pub first: u64,
}

/// From a shard to the bridge, besides publishes: never dropped.
#[derive(Debug)]
pub enum Control {
    /// A filter's first or last subscriber on a shard.
    Interest(Interest),
    /// A persistent session leaves a shard's router for a claim on shard
    /// `shard` of this node (another shard, or the same one when it
    /// reconnects there), sent before the old shard's interest removals:
    /// the bridge holds `filters` for `shard` a while (a pseudo shard
    /// forwarding to it), so that the node's NATS interest does not lapse
    /// until the claim attaches and adds its own (docs/design/cluster.md
    /// §9, "Moves inside one node").
    Lend {
        /// The session's client id (a session has one lend: the next
        /// replaces it).
        client_id: ByteString,
        /// The claim's shard.
        shard: usize,
        /// The claim's token there: the lend's batches are named for it
        /// ([`ToShard::Lent`]).
        token: u64,
        /// The number of the last NATS batch whose messages the session's
        /// state holds ([`ToShard::Deliver::seq`]): the lend brings every
        /// later batch of its filters (cluster::received).
        after: u64,
        /// The session's filters (no shared subscription: its group keeps
        /// its members, `Shard::shared_moved`).
        filters: Vec<ByteString>,
    },
    /// A CONNECT on this node claims a client id in the cluster's
    /// sessions bucket (docs/design/cluster.md §9).
    Claim(ClaimRequest),
    /// The session of claim `token` on `shard` ended here (a clean session,
    /// or an expired one): its record goes, unless another claim owns it.
    Released {
        /// The client id.
        client_id: ByteString,
        /// The shard of the claim.
        shard: usize,
        /// The claim's token there.
        token: u64,
    },
    /// The subscriptions of a persistent session owned by claim `token` of
    /// `shard` changed (or it attached): its record of subscriptions in
    /// the cluster is rewritten, so that another node can give them back
    /// if this node dies (docs/design/cluster.md §9).
    Subscriptions {
        /// The client id.
        client_id: ByteString,
        /// The shard of the claim.
        shard: usize,
        /// The claim's token there.
        token: u64,
        /// A session image of the subscriptions alone (shard cluster
        /// encoding); None: over the record's bound, the record goes.
        image: Option<bytes::Bytes>,
    },
    /// The cluster's answer to claim `token` of `shard`, a grant with a
    /// session state, came after that claim's connection stopped waiting
    /// for it (`CLAIM_TIMEOUT`): nobody on the shard took the state. The bridge keeps it for the next claim
    /// of the id, here or on the node that asks this one for it
    /// (docs/design/cluster.md §9), and releases the record if nobody
    /// claims the id in time and nothing stays here (`held`).
    Unclaimed {
        /// The client id.
        client_id: ByteString,
        /// The shard of the claim.
        shard: usize,
        /// The claim's token there.
        token: u64,
        /// The late answer: `Granted` with an image, or `Recovered`.
        answer: ClaimAnswer,
        /// Whether a session of that claim stays on the shard (a copy the
        /// node held before, kept offline when the claim gave up): the
        /// record then names a session that is held, and stays.
        held: bool,
    },
    /// A persistent session restored from the store at start-up: the
    /// bridge re-asserts its record (created if absent, taken back from an
    /// earlier run of this node, or, if another node owns the id now, the
    /// local copy is dropped).
    Restored {
        /// The client id.
        client_id: ByteString,
        /// The shard that holds it.
        shard: usize,
        /// The session's claim token there.
        token: u64,
        /// Its subscriptions, as in [`Control::Subscriptions`].
        image: Option<bytes::Bytes>,
    },
    /// The state of `client_id` that a hand-over to another node takes
    /// (`ToShard::Takeover`'s claim got it) holds what the shard that took
    /// it had routed, `seen`: the rest of this node's messages are not in
    /// its image (cluster::positions).
    Seen {
        /// The client id.
        client_id: ByteString,
        /// What the shard had routed.
        seen: Seen,
    },
    /// A batch of `shard` (`len` messages from shard sequence number
    /// `first` on) that never reached the publish queue (full for the
    /// cluster's `stall`): the bridge takes it as done, so that no tail
    /// waits for it.
    Unsent {
        /// The shard.
        shard: usize,
        /// Its first shard sequence number.
        first: u64,
        /// Its length.
        len: usize,
    },
}

/// A claim of a client id in the cluster, made by a connection on this
/// node once the id is its own on the node.
#[derive(Debug)]
pub struct ClaimRequest {
    /// The client id.
    pub client_id: ByteString,
    /// The CONNECT's CleanSession / Clean Start: a previous owner's state
    /// is dropped rather than sent.
    pub clean_session: bool,
    /// The shard of the node's claim.
    pub shard: usize,
    /// The node's claim token there (the session's `claim`). The answer
    /// goes to that shard's queue as [`ToShard::Claimed`].
    pub token: u64,
    /// When the bridge stops working on the claim and answers
    /// [`ClaimAnswer::Unavailable`]: every KV call and the wait on the
    /// previous owner are cut off there, so that the answer reaches the
    /// shard while its connection still waits (the shard sets it from the
    /// start of the CONNECT's claim: one deadline for the whole claim).
    pub deadline: Instant,
    /// Set by the shard once the claim lost the id on the node before the
    /// cluster answered it (a later CONNECT here, or another node's
    /// take-over, superseded it): its connection is gone, so the bridge
    /// stops working on it ([`Withdrawn`]).
    pub withdrawn: Withdrawn,
}

/// Whether a claim the bridge is deciding ([`ClaimRequest`]) still holds
/// its id on the node: an atomic shared by the claim's shard, which sets
/// it when the claim is superseded there, and the bridge, which reads it
/// before each step that would take the id for the claim (a write of the
/// record, a take-over request to another node, a grant). Read by the
/// bridge after the record it read, it is set for every supersession that
/// came before that record: another node's take-over here supersedes the
/// claim before this node hands the session over, hence before that node
/// writes the record that names it. Without it the claim went on, took
/// the session back from the node it had just moved to, and gave it to
/// no connection (docs/design/cluster.md, "What is built").
#[derive(Debug, Clone, Default)]
pub struct Withdrawn(Arc<AtomicBool>);

impl Withdrawn {
    /// A claim that holds its id.
    pub fn new() -> Self {
        Self::default()
    }

    /// For the shard: the claim lost its id on the node.
    pub fn withdraw(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// For the bridge: whether the claim lost its id on the node.
    pub fn is_withdrawn(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The bridge's answer to a [`ClaimRequest`].
#[derive(Debug)]
pub enum ClaimAnswer {
    /// The id is this node's: with the session image the previous owner
    /// node sent (shard cluster encoding), if it had one.
    Granted(Option<bytes::Bytes>),
    /// The id is this node's; its owner node is dead, and left the
    /// subscriptions of its session (a session image without messages):
    /// attached unless the node holds a copy of its own.
    Recovered(bytes::Bytes),
    /// No decision in time (the owner did not answer, JetStream is down),
    /// or the link is down in `fence` mode: CONNACK 0x03.
    Unavailable,
}

/// From the bridge to one shard.
#[derive(Debug)]
pub enum ToShard {
    /// Messages from other nodes that one NATS subscription got, in order,
    /// the same batch every interested shard gets. The shard delivers them
    /// only to the subscribers of the subscription's filter, once per
    /// session, a run of QoS 0 messages to one topic at a time
    /// (docs/design/cluster.md §6).
    Deliver {
        /// The MQTT filter of the subscription (`None`: the escaped
        /// subject, matched in full).
        filter: Option<ByteString>,
        /// The batch's number, the same for every shard that gets it and
        /// rising in every shard's queue (cluster::received): how far a
        /// session's state holds what NATS brought, for its moves inside
        /// the node.
        seq: u64,
        /// The messages.
        messages: Arc<Vec<Message>>,
    },
    /// [`ToShard::Deliver`] of a batch some of whose messages a session
    /// that moved to this node got already (with a NATS cluster of
    /// several servers, from the old owner's tail: cluster::tail's
    /// `Delivered`): each of those is not given to that session again,
    /// neither kept for its attaching claim nor routed to it.
    DeliverExcept {
        /// The MQTT filter of the subscription (`None`: the escaped
        /// subject).
        filter: Option<ByteString>,
        /// The batch's number (as [`ToShard::Deliver::seq`]).
        seq: u64,
        /// The messages.
        messages: Arc<Vec<Message>>,
        /// (index in `messages`, client id) of each message a session got
        /// already, in order of index.
        except: Vec<(usize, ByteString)>,
    },
    /// Messages NATS gave this node for a shared subscription (the whole
    /// `$share/...` filter), each to one member of the group on the shard.
    DeliverShared(Vec<(ByteString, Message)>),
    /// Messages NATS gave this node for shared subscriptions of session
    /// `client_id`, which moved here and holds them through the bridge
    /// until its own membership does (`cluster::tail`): each to that
    /// session, kept for it while its claim attaches
    /// (`Shard::deliver_shared_for`).
    DeliverSharedFor {
        /// The moving session.
        client_id: ByteString,
        /// (share, message) as for `DeliverShared`.
        batch: Vec<(ByteString, Message)>,
    },
    /// The bridge holds plain filter `filter` for the claim `token` of this
    /// shard from now on (a lend, [`Control::Lend`]): `batches` are that
    /// filter's batches NATS brought after the last one the session's state
    /// holds, up to now (those the old shard got after it let the session
    /// go, and those this shard got before this), in order; every later
    /// batch of the filter comes to this shard after this. The claim keeps
    /// them all for the session (docs/design/cluster.md §9, "Moves inside
    /// one node"). Sent as a control item: never dropped, in order with
    /// the deliveries.
    Lent {
        /// The claim's token on this shard.
        token: u64,
        /// The lent filter (None: the escaped subject, which some of the
        /// lent filters hold).
        filter: Option<ByteString>,
        /// Its batches since the state's last, oldest first.
        batches: Vec<Arc<Vec<Message>>>,
        /// Whether the bridge still held all of them (false: a move slower
        /// than its ring, cluster::received, may miss some).
        whole: bool,
    },
    /// A retained message (empty payload: a delete) from the cluster's
    /// bucket, stamped with its revision: applied to the shard's replica,
    /// never delivered.
    Retained(Message),
    /// The cluster's answer to the shard's claim `token`
    /// ([`ClaimRequest`]). It comes in this queue, not beside it, so that
    /// what the bridge sends after a grant (a take-over by another node, a
    /// message for the session) finds the claim granted and attaching,
    /// with the state it got, before its connection has attached it
    /// (docs/design/cluster.md §9).
    Claimed {
        /// The claim's token on the shard.
        token: u64,
        /// The answer.
        answer: ClaimAnswer,
        /// For a session that moved here from another node: what this node
        /// had published when it asked the old owner for the tail (in the
        /// image or the tail); the shard keeps, for the attaching session,
        /// the messages it routed before this grant that it has not
        /// (cluster::positions). Boxed: rare, and this queue's every
        /// message is as large as its largest kind.
        published: Option<Box<Seen>>,
    },
    /// The session of the client id, if on this shard, is being handed to
    /// another node (`on`): it takes no more messages from NATS, which the
    /// bridge collects for it from now on (cluster::tail); or the
    /// hand-over ended (`on` false).
    Handing {
        /// The client id.
        client_id: ByteString,
        /// Whether the hand-over starts (true) or ended.
        on: bool,
        /// Dropped once the shard has it: the bridge asks the shards to
        /// hand the session over only once every shard has the mark, so
        /// that what each routed to the session before it is in the image.
        done: Option<async_channel::Sender<()>>,
    },
    /// Another node takes the client id over: end its session here (the
    /// connection closes as a take-over) and answer with its image.
    Takeover {
        /// The client id.
        client_id: ByteString,
        /// The new CONNECT's CleanSession / Clean Start.
        clean_session: bool,
        /// Where the answer goes.
        answer: async_channel::Sender<HandOver>,
        /// Whether the bridge still waits for the answer: the shard hands
        /// the session over only if it does, and keeps it otherwise.
        ticket: Ticket,
    },
}

/// The agreement between the bridge and a shard on one take-over request
/// ([`ToShard::Takeover`]): the bridge waits for the shard's answer a
/// bounded time only, and the shard may be about to hand the session over
/// just as it gives up. Exactly one of the two moves the ticket on: the
/// shard with [`Ticket::answer`] (the bridge then takes its answer, and
/// the session leaves the shard) or the bridge with [`Ticket::give_up`]
/// (the shard then keeps the session: handing it over to nobody would
/// lose it, and the other node refuses the CONNECT rather than start
/// without it). So a session ends on one node, never on none or two.
#[derive(Debug, Clone, Default)]
pub struct Ticket(Arc<AtomicU8>);

impl Ticket {
    /// The bridge waits for the shard.
    const WAITING: u8 = 0;
    /// The bridge stopped waiting before the shard answered.
    const GIVEN_UP: u8 = 1;
    /// The shard answered while the bridge waited.
    const ANSWERED: u8 = 2;

    /// A ticket for a new request: the bridge waits.
    pub fn new() -> Self {
        Self::default()
    }

    /// For the shard, before it hands the session over: true when the
    /// bridge still waits (it now takes the answer, whatever its clock
    /// says); false when it gave up (the shard keeps the session).
    pub fn answer(&self) -> bool {
        self.0
            .compare_exchange(
                Self::WAITING,
                Self::ANSWERED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// For the bridge, when its wait ran out: true when it gave up before
    /// the shard answered (the shard keeps the session); false when the
    /// shard answered first (its answer is on the way: wait for it).
    pub fn give_up(&self) -> bool {
        self.0
            .compare_exchange(
                Self::WAITING,
                Self::GIVEN_UP,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }
}

/// A shard's answer to [`ToShard::Takeover`].
#[derive(Debug, PartialEq, Eq)]
pub enum HandOver {
    /// The session ended here (with persistence: its end is on disk): its
    /// image (None: no state to move, or `clean_session`).
    Moved(Option<Vec<u8>>),
    /// Its end could not be made durable in time (the disk stalls) or the
    /// shard's claim was not answered in time: the session (if any) stays
    /// here as the claim `token` of the shard, and the other node refuses
    /// the CONNECT as server unavailable rather than start an empty
    /// session while this node's disk still holds the old one.
    Unavailable {
        /// The shard's claim that holds the id now (0: not known, the
        /// shard did not answer).
        token: u64,
    },
}

/// One shard's ends of its queues.
#[derive(Clone, Debug)]
pub struct ShardEnds {
    /// Publish batches to the bridge (shared by every shard).
    pub publish: async_channel::Sender<Outgoing>,
    /// Interest changes and connects to the bridge (shared by every shard).
    pub interest: async_channel::Sender<Control>,
    /// What the bridge sends this shard.
    pub from_bridge: async_channel::Receiver<ToShard>,
}

/// A shard's side of the cluster, kept in the shard.
#[derive(Debug)]
pub struct ClusterLink {
    /// The queues.
    pub ends: ShardEnds,
    /// The figures shared with the bridge and the admin API.
    pub status: Arc<ClusterStatus>,
    /// Longest a publisher waits for room in the publish queue.
    pub stall: Duration,
    /// This shard's subscriptions per filter: the bridge hears of a filter
    /// when its count leaves or reaches zero.
    counts: AHashMap<ByteString, u32>,
    /// This shard's index.
    shard: usize,
    /// Turn among this shard's members of a group, for messages from NATS.
    pub share_turn: usize,
}

impl ClusterLink {
    /// Shard `shard`'s link.
    pub fn new(shard: usize, ends: ShardEnds, status: Arc<ClusterStatus>, stall: Duration) -> Self {
        ClusterLink {
            ends,
            status,
            stall,
            counts: AHashMap::new(),
            shard,
            share_turn: 0,
        }
    }

    /// A subscription to `filter` was added on this shard. The first one
    /// on the shard returns what closes once the NATS server holds the
    /// node's interest in it (the bridge drops its sender); `None`: the
    /// shard had the filter already.
    pub fn subscribed(&mut self, filter: &str) -> Option<async_channel::Receiver<()>> {
        let count = self.counts.entry(ByteString::from(filter)).or_insert(0);
        *count += 1;
        if *count > 1 {
            if *count <= MAX_SHARE_WEIGHT && shared::is_shared(filter) {
                self.tell(filter, true, None);
            }
            return None;
        }
        let (ready, readied) = async_channel::bounded(1);
        self.tell(filter, true, Some(ready));
        Some(readied)
    }

    /// A subscription to `filter` was removed on this shard.
    pub fn unsubscribed(&mut self, filter: &str) {
        let Some(count) = self.counts.get_mut(filter) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            self.counts.remove(filter);
            self.tell(filter, false, None);
        } else if *count < MAX_SHARE_WEIGHT && shared::is_shared(filter) {
            self.tell(filter, false, None);
        }
    }

    /// Shard `shard`'s link to no bridge, and the queue of what it sends
    /// the bridge besides publishes (for tests).
    #[cfg(test)]
    pub fn for_tests(shard: usize) -> (ClusterLink, async_channel::Receiver<Control>) {
        let (publish, _) = async_channel::bounded(1);
        let (interest, changes) = async_channel::unbounded();
        let (_, from_bridge) = async_channel::bounded(1);
        let ends = ShardEnds {
            publish,
            interest,
            from_bridge,
        };
        let status = Arc::new(ClusterStatus::new("a".into(), vec![]));
        let link = ClusterLink::new(shard, ends, status, Duration::from_millis(1));
        (link, changes)
    }

    /// Distinct filters subscribed on this shard.
    #[cfg(test)]
    pub fn filters(&self) -> usize {
        self.counts.len()
    }

    /// Asks the bridge for `client_id` in the cluster for claim `token` of
    /// this shard; the answer comes in the shard's queue
    /// ([`ToShard::Claimed`]) before `deadline` ([`ClaimRequest::deadline`]);
    /// the shard sets `withdrawn` once the claim is superseded here.
    /// False: the bridge is gone, no answer comes.
    pub fn claim(
        &self,
        client_id: &str,
        clean_session: bool,
        (token, withdrawn): (u64, &Withdrawn),
        deadline: Instant,
    ) -> bool {
        let request = Control::Claim(ClaimRequest {
            client_id: ByteString::from(client_id),
            clean_session,
            shard: self.shard,
            token,
            deadline,
            withdrawn: withdrawn.clone(),
        });
        let sent = self.ends.interest.try_send(request).is_ok();
        if !sent {
            log::debug!("cluster bridge gone: claim of {client_id:?} not sent");
        }
        sent
    }

    /// The session of claim `token` of this shard ended: its record in the
    /// cluster goes.
    pub fn released(&self, client_id: &str, token: u64) {
        let released = Control::Released {
            client_id: ByteString::from(client_id),
            shard: self.shard,
            token,
        };
        if self.ends.interest.try_send(released).is_err() {
            log::debug!("cluster bridge gone: release of {client_id:?} not sent");
        }
    }

    /// The grant `answer` of claim `token` of this shard, which brought a
    /// session state, came after the claim stopped waiting
    /// ([`Control::Unclaimed`]; `held`: a session of the claim stays on the
    /// shard).
    pub fn unclaimed(&self, client_id: &str, token: u64, answer: ClaimAnswer, held: bool) {
        self.send(Control::Unclaimed {
            client_id: ByteString::from(client_id),
            shard: self.shard,
            token,
            answer,
            held,
        });
    }

    /// The subscriptions of the persistent session of claim `token` of
    /// this shard are now `image` (None: too many to keep in the cluster);
    /// `restored`: it came back from the store at start-up, and its record
    /// is to be re-asserted.
    pub fn subscriptions(
        &self,
        client_id: &str,
        token: u64,
        image: Option<bytes::Bytes>,
        restored: bool,
    ) {
        let (client_id, shard) = (ByteString::from(client_id), self.shard);
        self.send(if restored {
            Control::Restored {
                client_id,
                shard,
                token,
                image,
            }
        } else {
            Control::Subscriptions {
                client_id,
                shard,
                token,
                image,
            }
        });
    }

    /// The state of `client_id` that this shard's claim for a hand-over
    /// to another node got holds what its shards routed up to `seen`
    /// ([`Control::Seen`]).
    pub fn evicted(&self, client_id: &str, seen: Seen) {
        self.send(Control::Seen {
            client_id: ByteString::from(client_id),
            seen,
        });
    }

    /// This shard's batch of `len` messages from shard sequence number
    /// `first` on never reached the publish queue ([`Control::Unsent`]).
    pub fn unsent(&self, first: u64, len: usize) {
        self.send(Control::Unsent {
            shard: self.shard,
            first,
            len,
        });
    }

    /// The persistent session `client_id`, with the plain (not shared)
    /// filters `filters`, leaves this shard's router for a claim on shard `to` of this node:
    /// told before the removals of the filters this shard loses, in the
    /// same queue, so the bridge holds them for `to` first
    /// ([`Control::Lend`]). Nothing when there are none.
    /// `(to, token)`: the claim; `after`: the number of the last NATS batch
    /// the state holds. Whether it was told (a lend's batches then come
    /// for the claim, `ToShard::Lent`).
    pub fn lend(
        &self,
        client_id: &str,
        (to, token): (usize, u64),
        after: u64,
        filters: Vec<ByteString>,
    ) -> bool {
        if filters.is_empty() {
            return false;
        }
        self.send(Control::Lend {
            client_id: ByteString::from(client_id),
            shard: to,
            token,
            after,
            filters,
        });
        true
    }

    /// Sends `control` to the bridge (the queue is unbounded: never full).
    fn send(&self, control: Control) {
        if let Err(e) = self.ends.interest.try_send(control) {
            log::debug!("cluster bridge gone: {:?} not sent", e.into_inner());
        }
    }

    /// Sends an interest change (the queue is unbounded: never full): an
    /// addition (`add`, with its `ready` sender if it waits), or a removal.
    fn tell(&self, filter: &str, add: bool, ready: Option<async_channel::Sender<()>>) {
        let change = Control::Interest(Interest {
            shard: self.shard,
            filter: ByteString::from(filter),
            add,
            ready,
        });
        if self.ends.interest.try_send(change).is_err() {
            log::debug!("cluster bridge gone: interest change for {filter:?} dropped");
        }
    }
}

/// What the admin API shows of the cluster beyond the figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClusterView {
    /// Other nodes heard from (their heartbeat), with the Unix time in
    /// milliseconds they were last heard.
    pub nodes: BTreeMap<String, u64>,
    /// The NATS subjects this node subscribes to.
    pub subjects: Vec<String>,
    /// The NATS server the node is connected to, when connected.
    pub server: Option<String>,
}

/// Declares [`ClusterStatus`]'s figures and the copy into [`Counters`].
macro_rules! status_figures {
    ($( $name:ident: $doc:literal; )*) => {
        /// The bridge's figures: written by the bridge thread, read by the
        /// shards (which copy them into their counters for `/metrics`) and
        /// the admin API.
        #[derive(Debug, Default)]
        pub struct StatusFigures {
            $( #[doc = $doc] pub $name: AtomicU64, )*
        }

        impl StatusFigures {
            /// Copies every figure into the counters of the same name.
            pub fn fill(&self, c: &mut Counters) {
                $( c.$name = self.$name.load(Ordering::Relaxed); )*
            }
        }
    };
}

status_figures! {
    cluster_link_up: "1 while the NATS connection is up";
    cluster_connects: "NATS connections made (the first and every reconnect)";
    cluster_subscriptions: "NATS subscriptions held for MQTT filters";
    cluster_published: "Messages published to NATS";
    cluster_publish_dropped: "Messages not published to NATS (link down, or an error)";
    cluster_deliver_dropped: "Messages from NATS dropped for a shard whose queue was full";
    cluster_received_invalid: "Messages from NATS that are no fanmq message (subject or headers)";
    cluster_slow_consumer: "Slow-consumer events of the NATS client (messages it dropped)";
    cluster_kv_errors: "Failed operations on the retained and sessions buckets";
    cluster_claims: "Client ids claimed in the sessions bucket by this node's CONNECTs";
    cluster_takeovers: "Sessions this node took over from another node, with their state";
    cluster_claims_unavailable: "Claims refused with CONNACK 0x03 (no owner answer, KV down, fence)";
    cluster_unregistered: "CONNECTs granted without a record while the link was down (serve)";
    cluster_reasserted: "Records re-asserted after a NATS outage or at start-up";
    cluster_reassert_lost: "Sessions dropped on re-assertion: another node owns the id";
    cluster_recovered: "Sessions whose subscriptions were recovered from a dead node's record";
    cluster_claim_states_kept: "Session states kept for a claim that ended without giving them to its connection";
    cluster_claim_states_given: "Kept session states given to a later claim here or to another node";
    cluster_subscription_records: "Subscriptions records of persistent sessions written";
    cluster_tails_merged: "Sessions moved here with the old node's tail of what was published during the move";
    cluster_tails_missed: "Sessions moved here without the old node's tail (no answer in time, or none collected): what was published during the move is lost for them";
    cluster_tails_short: "Tails of sessions moved away that may lack messages published on this node (its ring of recent publishes no longer reached back, or the session's shard's position was not known)";
    cluster_tails_behind: "Tails of sessions moved away answered before this node had the first message the new node got itself of each origin (a slower route, over 300 ms): what came before it is lost for the session";
    cluster_nodes: "Other nodes heard within the node timeout";
    cluster_suback_unconfirmed: "SUBACKs of a new filter sent without the NATS server's confirmation (link down, no answer in time)";
    cluster_retained_unconfirmed: "Retained QoS 1/2 publishes acknowledged while the link was down (serve): held by this node only";
    cluster_retained_refused: "Retained QoS 1/2 publishes not acknowledged: the retained bucket did not confirm them in time";
}

/// The cluster's state, shared by the bridge, the shards and the admin API.
#[derive(Debug)]
pub struct ClusterStatus {
    /// This node's name.
    pub node_name: String,
    /// The NATS URLs configured.
    pub urls: Vec<String>,
    /// Counters and gauges.
    pub figures: StatusFigures,
    /// Nodes and subjects (written on interest changes and heartbeats,
    /// never on the data path).
    pub view: Mutex<ClusterView>,
    /// Set when the broker stops: the bridge ends.
    pub shutdown: AtomicBool,
    /// NATS client errors since the link was last up: only the first is
    /// logged as a warning (a server down is retried forever).
    pub errors_since_up: AtomicU64,
}

impl ClusterStatus {
    /// A status for `node_name` connecting to `urls`, link down.
    pub fn new(node_name: String, urls: Vec<String>) -> Self {
        ClusterStatus {
            node_name,
            urls,
            figures: StatusFigures::default(),
            view: Mutex::new(ClusterView::default()),
            shutdown: AtomicBool::new(false),
            errors_since_up: AtomicU64::new(0),
        }
    }

    /// Whether the NATS connection is up.
    pub fn link_up(&self) -> bool {
        self.figures.cluster_link_up.load(Ordering::Relaxed) == 1
    }

    /// The status as `/api/v1/cluster` returns it.
    pub fn to_json(&self) -> serde_json::Value {
        let view = self
            .view
            .lock()
            .map(|v| v.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone());
        let mut figures = Counters::default();
        self.figures.fill(&mut figures);
        serde_json::json!({
            "node": self.node_name,
            "nats_urls": self.urls,
            "link": if self.link_up() { "up" } else { "down" },
            "server": view.server,
            "nodes": view.nodes,
            "subjects": view.subjects,
            "connects": figures.cluster_connects,
            "subscriptions": figures.cluster_subscriptions,
            "published": figures.cluster_published,
            "publish_dropped": figures.cluster_publish_dropped,
            "deliver_dropped": figures.cluster_deliver_dropped,
            "received_invalid": figures.cluster_received_invalid,
            "slow_consumer": figures.cluster_slow_consumer,
            "kv_errors": figures.cluster_kv_errors,
            "claims": figures.cluster_claims,
            "takeovers": figures.cluster_takeovers,
            "claims_unavailable": figures.cluster_claims_unavailable,
            "unregistered": figures.cluster_unregistered,
            "reasserted": figures.cluster_reasserted,
            "reassert_lost": figures.cluster_reassert_lost,
            "recovered": figures.cluster_recovered,
            "claim_states_kept": figures.cluster_claim_states_kept,
            "claim_states_given": figures.cluster_claim_states_given,
            "subscription_records": figures.cluster_subscription_records,
            "tails_merged": figures.cluster_tails_merged,
            "tails_missed": figures.cluster_tails_missed,
            "tails_short": figures.cluster_tails_short,
            "tails_behind": figures.cluster_tails_behind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whoever moves a take-over's ticket first wins: the shard's answer
    /// after the bridge gave up is refused (the shard keeps the session),
    /// the bridge's giving up after the shard answered is refused (the
    /// bridge takes the answer); a ticket moves once.
    #[test]
    fn a_takeover_ticket_moves_once_to_whichever_side_comes_first() {
        let answered = Ticket::new();
        assert!(answered.answer());
        assert!(!answered.give_up(), "answered: the bridge takes it");
        assert!(!answered.answer(), "once");
        let given_up = Ticket::new();
        assert!(given_up.give_up());
        assert!(!given_up.answer(), "given up: the shard keeps it");
        assert!(!given_up.give_up(), "once");
        // A copy is the same ticket (one travels to the shard).
        let ticket = Ticket::new();
        assert!(ticket.clone().give_up());
        assert!(!ticket.answer());
    }

    /// The shard (one thread) and the bridge (another) racing on the same
    /// ticket: always exactly one of them wins, and both see the same end.
    #[test]
    fn a_takeover_ticket_raced_from_two_threads_has_exactly_one_winner() {
        let (mut answers, mut give_ups) = (0, 0);
        for _ in 0..2000 {
            let ticket = Ticket::new();
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let shard = {
                let (ticket, barrier) = (ticket.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    ticket.answer()
                })
            };
            barrier.wait();
            let gave_up = ticket.give_up();
            let answered = shard.join().unwrap();
            assert_ne!(answered, gave_up, "exactly one wins");
            answers += usize::from(answered);
            give_ups += usize::from(gave_up);
        }
        assert_eq!(answers + give_ups, 2000);
    }

    /// Shard `shard`'s link, and what it sends the bridge.
    fn link_of(shard: usize) -> (ClusterLink, async_channel::Receiver<Control>) {
        ClusterLink::for_tests(shard)
    }

    #[test]
    fn the_bridge_hears_of_a_filter_at_its_first_and_last_subscriber_only() {
        let (mut link, changes) = link_of(3);
        let first = link.subscribed("a/#");
        assert!(first.is_some(), "the first subscriber waits for the bridge");
        for _ in 0..2 {
            assert!(link.subscribed("a/#").is_none(), "the others do not");
        }
        assert!(link.subscribed("b").is_some());
        link.unsubscribed("a/#");
        link.unsubscribed("a/#");
        assert_eq!(link.filters(), 2);
        link.unsubscribed("a/#");
        link.unsubscribed("never");
        let got: Vec<(usize, String, bool)> = std::iter::from_fn(|| changes.try_recv().ok())
            .filter_map(|c| match c {
                Control::Interest(i) => Some((i.shard, i.filter.to_string(), i.add)),
                _ => None,
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (3, "a/#".into(), true),
                (3, "b".into(), true),
                (3, "a/#".into(), false)
            ]
        );
    }

    #[test]
    fn a_shared_subscription_reports_each_member_up_to_the_weight_cap() {
        let (mut link, changes) = link_of(0);
        let over = MAX_SHARE_WEIGHT as usize + 4;
        let waits = (0..over)
            .filter(|_| link.subscribed("$share/g/t").is_some())
            .count();
        assert_eq!(waits, 1, "only the first member's SUBACK waits");
        for _ in 0..over {
            link.unsubscribed("$share/g/t");
        }
        let got: Vec<bool> = std::iter::from_fn(|| changes.try_recv().ok())
            .filter_map(|c| match c {
                Control::Interest(i) => Some(i.add),
                _ => None,
            })
            .collect();
        let cap = MAX_SHARE_WEIGHT as usize;
        assert_eq!(got.len(), 2 * cap);
        assert!(got[..cap].iter().all(|&add| add));
        assert!(got[cap..].iter().all(|&add| !add));
        assert_eq!(link.filters(), 0);
    }
}
