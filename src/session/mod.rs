//! The MQTT session (§3.1.2.4): what the broker keeps for one client id.
//!
//! A session owns the client's subscriptions, its QoS 1/2 messages in flight in
//! both directions, the messages waiting for a free slot in the inflight window
//! (also while the client is offline, for CleanSession = 0), and the outgoing
//! queue of the live connection. It is pure state: no sockets, no timers. The
//! shard calls it; the connection task writes what it queued.
//!
//! Every queue is bounded ([`Limits`]). When a limit is hit:
//! - QoS 0 to a live client whose outgoing queue is full: dropped and counted
//!   (a slow subscriber never slows the others, and never grows memory).
//! - QoS 1/2 when the inflight window is full: kept in the pending queue, which
//!   is bounded by messages and bytes; when that is full the message is dropped
//!   and counted, as Mosquitto does with `max_queued_messages`.
//! - QoS 0 to an offline client: not queued (Mosquitto's default,
//!   `queue_qos0_messages false`).
//! - QoS 1/2 to an offline client while the shard is over its share of
//!   `max_queued_bytes_total`: dropped and counted (see
//!   `shard::Shard::shed` for the rest of the shedding order).
//!
//! The state that survives the connection ([`SessionState`]) is `Send`, so it
//! can move to another shard on take-over.

pub mod alias;
pub mod link;
pub mod outqueue;
pub mod packet_ids;
pub mod publish_cache;
pub mod wheel;

use std::cell::Cell;
use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::Arc;

use bytestring::ByteString;
use smallvec::SmallVec;

use crate::protocol::Version;
use crate::protocol::message::{
    AliasUse, BatchRange, Encoded, Message, MessageProperties, Publish,
};
use crate::protocol::topic;
use crate::protocol::v3::{self as codec, PacketId, QoS};
use crate::protocol::v5::{Property, SubscriptionOptions};
use crate::router::SharedFilter;
use crate::router::shared;
use crate::session::alias::{AliasState, ServerAliases};
use crate::session::link::Link;
use crate::session::outqueue::{Frame, OutFrame, OutQueue};
use crate::session::packet_ids::PacketIds;

/// A session's subscriptions: (Topic Filter, granted QoS), in subscription
/// order. The filter is the router's shared copy ([`SharedFilter`], 16 bytes),
/// so an entry is 24 bytes and owns no string. The fan-out case is one
/// subscription per client, so one entry lives inline in the session (the
/// array is 32 bytes, 8 more than an empty `Vec`) and a client with one
/// subscription allocates nothing for it; a `Vec` would allocate room for 4
/// entries on the first push. More subscriptions move to the heap.
pub type Subscriptions = SmallVec<[(SharedFilter, QoS); 1]>;

thread_local! {
    /// Set when a QoS 1/2 message may have entered a pending queue on this
    /// shard since [`take_backlog_note`] (see [`note_backlog`]).
    static BACKLOG_NOTED: Cell<bool> = const { Cell::new(false) };
}

/// A message may have entered a pending queue on this shard (queued, or
/// arrived with a session): the next sweep counts the queues again. Only
/// then, or while the last count found something queued, does the sweep
/// walk the sessions for the queue gauges (an idle shard walks nothing).
pub fn note_backlog() {
    BACKLOG_NOTED.with(|c| c.set(true));
}

/// Whether [`note_backlog`] was called since the last call, clearing it.
pub fn take_backlog_note() -> bool {
    BACKLOG_NOTED.with(|c| c.replace(false))
}

/// Session Expiry Interval meaning "the session never ends" (§3.1.2.11.2),
/// what a 3.1.1 CleanSession = 0 session gets.
pub const SESSION_NEVER_EXPIRES: u32 = u32::MAX;

/// A session whose inflight window is full while messages wait in its
/// pending queue refills it only once `1 / REFILL_SHARE` of the window is
/// free (25 of the default 100), not one message per acknowledgement: a
/// subscriber that acknowledges each message in its own write then gets one
/// write carrying a quarter of a window of PUBLISH packets, not one write
/// per PUBACK. Three quarters of the window stay in flight meanwhile, so
/// the socket never runs dry while the client is acknowledging. Only when
/// and how much is refilled changes: the pending queue's order is kept
/// (a new message waits behind it), and the window is never exceeded.
pub const REFILL_SHARE: usize = 4;

/// The smallest window refilled in batches ([`REFILL_SHARE`]): a window
/// under 8 (a client with a small Receive Maximum, a configured
/// `max_inflight_messages` of a few) is refilled at each acknowledgement
/// as before, since waiting for a quarter of it would leave it nearly
/// empty.
pub const MIN_BATCHED_WINDOW: usize = 8;

/// The per-client bounds, from the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// QoS 1/2 PUBLISH packets sent to the client and not yet acknowledged.
    pub max_inflight: usize,
    /// PUBLISH packets queued for the client: the outgoing queue (QoS 0) and,
    /// separately, the pending queue (QoS 1/2) each hold at most this many.
    pub max_queued_messages: usize,
    /// Bytes queued for the client, with the same split as messages.
    pub max_queued_bytes: usize,
    /// QoS 2 PUBLISH packets received from the client and not yet released by
    /// PUBREL; more are refused (EMQX's `max_awaiting_rel`), so a client
    /// cannot grow this set without bound.
    pub max_awaiting_rel: usize,
    /// This shard's share of `max_queued_bytes_total` (0: no limit). While
    /// the shard's queued bytes are over it, QoS 1/2 messages are no longer
    /// queued for offline sessions (shedding stage 1, README "Security").
    pub max_queued_bytes_shard: usize,
}

impl Limits {
    /// True while this shard is over its share of `max_queued_bytes_total`.
    pub fn shard_over_budget(&self) -> bool {
        self.max_queued_bytes_shard > 0
            && crate::session::outqueue::shard_queued_bytes() > self.max_queued_bytes_shard
    }
}

/// Where an outgoing QoS 1/2 PUBLISH is in its flow (§4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[expect(
    clippy::enum_variant_names,
    reason = "each names the packet awaited (PUBACK, PUBREC, PUBCOMP)"
)]
pub enum Phase {
    /// QoS 1: PUBLISH sent, waiting for PUBACK.
    AwaitPubAck,
    /// QoS 2: PUBLISH sent, waiting for PUBREC.
    AwaitPubRec,
    /// QoS 2: PUBREL sent, waiting for PUBCOMP.
    AwaitPubComp,
}

/// An outgoing QoS 1/2 message that is not yet acknowledged.
#[derive(Clone, Debug)]
pub struct Inflight {
    /// The packet id it was sent with.
    pub packet_id: PacketId,
    /// The message, at the QoS it is delivered with, kept for redelivery.
    pub message: Message,
    /// Where its flow is.
    pub phase: Phase,
    /// With persistence, the id of the message's record in the shard's
    /// session journal (`store::record::Record::Message`); 0: not stored.
    pub stored: u64,
    /// With persistence, whether the journal knows this packet id and
    /// phase (a `Sent` record was appended for it).
    pub journalled: bool,
}

/// The part of a session that outlives a connection and moves between shards.
#[derive(Clone, Debug, Default)]
pub struct SessionState {
    /// Topic filters and their granted QoS, in subscription order.
    pub subscriptions: Subscriptions,
    /// QoS 1/2 flows, allocated on first use: a subscriber that only ever
    /// gets QoS 0 (the common fan-out case) does not pay ~100 bytes for them.
    pub flows: Option<Box<Flows>>,
}

impl SessionState {
    /// The options of the shared subscription `share` (the whole
    /// `$share/...` filter) that change its copies: (Retain As Published,
    /// Subscription Identifier).
    fn shared_extras(&self, share: &str) -> (bool, Option<NonZeroU32>) {
        self.flows
            .as_deref()
            .and_then(|f| f.subscription_options.iter().find(|e| &*e.filter == share))
            .map_or((false, None), |e| (e.retain_as_published, e.identifier))
    }

    /// Keeps, in this state's pending queue, the copy of `message` for its
    /// shared subscription `share`: the state of a session between two
    /// shards (taken over, granted to the new connection, not yet attached),
    /// for a copy chosen for it before the take-over and passed on by its
    /// old shard. At the subscription's granted QoS, with its Subscription
    /// Identifier and Retain As Published (as [`Session::deliver_shared`]),
    /// within the pending queue's limits: [`Delivery::Pending`] when kept,
    /// [`Delivery::Skipped`] at QoS 0 (nothing is promised to a session
    /// without a connection) or without that subscription,
    /// [`Delivery::Dropped`] when the queue is full.
    pub fn keep_shared(&mut self, message: &Message, share: &str, limits: &Limits) -> Delivery {
        let Some(granted) = self
            .subscriptions
            .iter()
            .find(|(filter, _)| &**filter == share)
            .map(|(_, qos)| *qos)
        else {
            return Delivery::Skipped;
        };
        let qos = message.qos.min(granted);
        if qos == QoS::AtMostOnce {
            return Delivery::Skipped;
        }
        let (retain_as_published, identifier) = self.shared_extras(share);
        let kept = Message {
            qos,
            retain: retain_as_published && message.retain,
            ..with_identifiers(message, identifier.as_slice())
        };
        self.keep_pending(kept, limits)
    }

    /// The MQTT 5.0 options that this state's non-shared subscriptions
    /// matching `topic` give one copy of a message on it (§3.3.4: one copy
    /// per session, with the Subscription Identifier of every matching
    /// subscription; §3.8.3.1: RETAIN kept if any of them has Retain As
    /// Published). A shared subscription's copy is a separate one, sent
    /// through its group ([`Session::deliver_shared`]).
    pub fn copy_options(&self, topic: &str) -> CopyOptions {
        let mut options = CopyOptions {
            no_local_only: true,
            retain_as_published: false,
            identifiers: SmallVec::new(),
        };
        let extras = self
            .flows
            .as_deref()
            .map_or(&[][..], |f| &f.subscription_options[..]);
        for (filter, _) in &self.subscriptions {
            if shared::is_shared(filter) || !topic::filter_matches(filter, topic) {
                continue;
            }
            match extras.iter().find(|e| e.filter == *filter) {
                Some(extras) => {
                    options.no_local_only &= extras.no_local;
                    options.retain_as_published |= extras.retain_as_published;
                    options.identifiers.extend(extras.identifier);
                }
                None => options.no_local_only = false,
            }
        }
        options
    }

    /// Keeps, in this state's pending queue, the copy of `message` for a
    /// plain subscription granted `granted`: the state of a session the
    /// cluster granted to a connection of this node that has not attached
    /// it yet, for a message that reached its shard meanwhile. As
    /// [`SessionState::keep_shared`]: at the granted QoS, with the options
    /// of the subscriptions it matches ([`SessionState::copy_options`]:
    /// Subscription Identifiers, Retain As Published), as
    /// [`Session::deliver_v5`] sends it to a connected session. No Local
    /// does not apply: the session has no key on this shard to be a
    /// publisher's, and a message from another node carries no origin (as
    /// for a connected session). The options stay in the message when the
    /// client attaches with MQTT 3.1.1 (its frames leave the identifiers
    /// out).
    pub fn keep(&mut self, message: &Message, granted: QoS, limits: &Limits) -> Delivery {
        let qos = message.qos.min(granted);
        if qos == QoS::AtMostOnce {
            return Delivery::Skipped;
        }
        let options = self.copy_options(&message.topic);
        let kept = Message {
            qos,
            retain: options.retain_as_published && message.retain,
            ..with_identifiers(message, &options.identifiers)
        };
        self.keep_pending(kept, limits)
    }

    /// Puts `kept` in the pending queue of this state (of a session not
    /// attached anywhere), within the queue's limits.
    fn keep_pending(&mut self, kept: Message, limits: &Limits) -> Delivery {
        let len = kept.wire_len();
        let flows = self.flows.get_or_insert_with(Box::default);
        if limits.shard_over_budget()
            || flows.pending.len() >= limits.max_queued_messages
            || flows.pending_bytes + len > limits.max_queued_bytes
        {
            return Delivery::Dropped;
        }
        flows.pending_bytes += len;
        flows.pending.push_back(kept);
        Delivery::Pending
    }
}

impl SessionState {
    /// The QoS 1/2 messages this state holds that came through one of its
    /// shared subscriptions and that its client has not taken yet, oldest
    /// first, each with that subscription (the whole `$share/...` filter):
    /// what the shard passes to another member of the group when the
    /// session ends (§4.8.2: "If the Client's Session terminates before the
    /// Client reconnects, the Server SHOULD send the Application Message to
    /// another Client that is subscribed to the same Shared Subscription").
    ///
    /// In flight awaiting PUBACK or PUBREC, or pending; not a QoS 2 message
    /// whose PUBREC came (the client owns it), nor one past its Message
    /// Expiry Interval. Each is as published on the member's side: its
    /// Subscription Identifiers (the member's) are taken off.
    ///
    /// A queued message does not record the subscription it came through,
    /// so that no delivery pays for it; this tells it by topic instead: one
    /// that matches a shared subscription of the session and none of its
    /// non-shared ones can only have come through the group (retained
    /// messages are not sent on a shared subscribe). One that also matches
    /// a non-shared subscription stays with the session: it may be that
    /// subscription's copy, and passing it on could duplicate it.
    pub fn shared_backlog(&self) -> Vec<(SharedFilter, Message)> {
        let Some(flows) = self.flows.as_deref() else {
            return Vec::new();
        };
        if !self.subscriptions.iter().any(|(f, _)| shared::is_shared(f)) {
            return Vec::new();
        }
        let untaken = flows
            .inflight
            .iter()
            .filter(|f| f.phase != Phase::AwaitPubComp)
            .map(|f| &f.message)
            .chain(flows.pending.iter());
        let mut backlog = Vec::new();
        for message in untaken {
            if message.is_expired() {
                continue;
            }
            if let (Some(share), false) = matching(&self.subscriptions, &message.topic) {
                backlog.push((share.clone(), without_identifiers(message)));
            }
        }
        backlog
    }

    /// Takes out of the pending queue the messages that can only have come
    /// through the shared subscription `share` (the whole `$share/...`
    /// filter), which the client has just unsubscribed from: those that
    /// match its filter and none of the session's remaining subscriptions
    /// (told by topic, as [`SessionState::shared_backlog`] tells them),
    /// oldest first, without the member's Subscription Identifiers. They
    /// were never sent, so the shard may give them to another member of
    /// the group (§4.8.2). The messages in flight stay: the Server MUST
    /// complete the delivery of a QoS 1 or 2 message it has started to send
    /// (MQTT-3.10.4-3). One past its Message Expiry Interval is dropped.
    pub fn take_shared_pending(&mut self, share: &str) -> Vec<Message> {
        let shared::Parsed::Shared { filter: inner, .. } = shared::parse(share) else {
            return Vec::new();
        };
        let Some(flows) = self.flows.as_deref_mut().filter(|f| !f.pending.is_empty()) else {
            return Vec::new();
        };
        let only_through_share = |message: &Message| {
            topic::filter_matches(inner, &message.topic)
                && matching(&self.subscriptions, &message.topic) == (None, false)
        };
        let stored = std::mem::take(&mut flows.pending_stored);
        let mut taken = Vec::new();
        for (i, message) in std::mem::take(&mut flows.pending).into_iter().enumerate() {
            if only_through_share(&message) {
                flows.pending_bytes -= message.wire_len();
                if !message.is_expired() {
                    taken.push(without_identifiers(&message));
                }
                continue;
            }
            if !stored.is_empty() {
                // Kept exactly as long as `pending` when not empty.
                flows
                    .pending_stored
                    .push_back(stored.get(i).copied().unwrap_or(0));
            }
            flows.pending.push_back(message);
        }
        taken
    }
}

/// What of `subscriptions` a message on `topic` matches: the first shared
/// subscription (the whole `$share/...` filter) whose filter matches, and
/// whether a non-shared one does.
fn matching<'s>(subscriptions: &'s Subscriptions, topic: &str) -> (Option<&'s SharedFilter>, bool) {
    let mut share = None;
    let mut plain = false;
    for (filter, _) in subscriptions {
        match shared::parse(filter) {
            shared::Parsed::Shared { filter: inner, .. } => {
                if share.is_none() && topic::filter_matches(inner, topic) {
                    share = Some(filter);
                }
            }
            _ => plain |= topic::filter_matches(filter, topic),
        }
    }
    (share, plain)
}

impl Flows {
    /// The next packet id not in flight (§2.3.1: non-zero, unique among
    /// the client's unacknowledged messages), in order and wrapping after
    /// 65,535 ([`PacketIds`]). None only when all 65,535 are in flight,
    /// which a window of at most 65,535 (the largest Receive Maximum,
    /// §3.2.2.3.3) never allows.
    pub fn next_packet_id(&mut self) -> Option<PacketId> {
        if let Some(id) = self.free_ids.take() {
            return Some(id);
        }
        self.free_ids
            .new_lap(self.inflight.iter().map(|f| f.packet_id));
        self.free_ids.take()
    }
}

/// A session's QoS 1/2 state.
#[derive(Clone, Debug, Default)]
pub struct Flows {
    /// Outgoing QoS 1/2 messages not yet acknowledged, oldest first.
    pub inflight: VecDeque<Inflight>,
    /// QoS 1/2 messages waiting for a slot in the inflight window.
    pub pending: VecDeque<Message>,
    /// Wire bytes of `pending`, for the byte limit.
    pub pending_bytes: usize,
    /// With persistence, the journal's message id of each entry of
    /// `pending`, in the same order (0: not stored), so that a message
    /// keeps its id when it goes in flight: either empty (nothing stored,
    /// persistence off: no cost) or exactly as long as `pending`.
    pub pending_stored: VecDeque<u64>,
    /// Packet ids of QoS 2 messages received and not yet released (PUBREL).
    pub awaiting_rel: Vec<PacketId>,
    /// The packet id counter for outgoing messages
    /// ([`Flows::next_packet_id`]): picking an id costs O(1) and walks
    /// `inflight` only once per 65,535 ids.
    pub free_ids: PacketIds,
    /// MQTT 5.0 options of the subscriptions that have any besides their
    /// QoS (No Local, Retain As Published, a Subscription Identifier),
    /// kept here so that a session without them (every 3.1.1 session, most
    /// 5.0 ones) pays nothing; a subscription not listed has none.
    pub subscription_options: Vec<SubscriptionExtras>,
    /// An MQTT 5.0 will waiting for its Will Delay Interval while the
    /// session is offline: (when it is due, in keep-alive ticks; the will).
    /// Boxed: almost no session has one.
    pub delayed_will: Option<Box<(u32, Message)>>,
    /// Messages dropped when they left the pending queue (over an MQTT 5.0
    /// client's Maximum Packet Size), where the session has no counters:
    /// the keep-alive sweep adds them to the shard's `publish_dropped`.
    pub unreported_drops: u32,
    /// Set once a subscription was granted that the ACL covers only partly
    /// (`security::acl::Coverage::Partial`): every message offered to the
    /// session is then checked for read access first, under this identity.
    /// Kept here, with the session, so that messages queued while it is
    /// offline are checked too.
    pub read_check: Option<ReadCheck>,
    /// With persistence, at least the number of `inflight` entries not
    /// yet journalled (`Inflight::journalled` false; never fewer): the
    /// shard looks for them after each of the session's steps only while
    /// it is not 0, so an acknowledgement does not walk the whole window
    /// (cold memory at a large fan-out) to find that every entry is
    /// journalled already (shard/persist.rs, `Shard::journal_sent`).
    pub unjournalled: u32,
}

/// The client identity a session's per-delivery read checks use
/// ([`Flows::read_check`]); the client id is the session's own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadCheck {
    /// The user name the ACL sees (the CONNECT's, or the TLS identity), of
    /// the latest connection.
    pub username: Option<ByteString>,
}

/// The MQTT 5.0 options of one subscription that change its deliveries
/// (§3.8.3.1, §3.8.2.1.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionExtras {
    /// The subscription's Topic Filter (the router's shared copy).
    pub filter: SharedFilter,
    /// No Local: not the client's own publications.
    pub no_local: bool,
    /// Retain As Published: RETAIN as the publisher set it, not cleared.
    pub retain_as_published: bool,
    /// The Subscription Identifier, sent with every message it matches.
    pub identifier: Option<NonZeroU32>,
}

/// What the subscriptions of one session that match a topic give the
/// session's copy of a message on it ([`SessionState::copy_options`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyOptions {
    /// Every matching subscription has No Local: the copy is skipped when
    /// the session published the message itself.
    pub no_local_only: bool,
    /// Some matching subscription has Retain As Published: RETAIN as the
    /// publisher set it.
    pub retain_as_published: bool,
    /// The Subscription Identifiers of the matching subscriptions (§3.3.4:
    /// all of them on the one copy), in subscription order.
    pub identifiers: SmallVec<[NonZeroU32; 2]>,
}

/// What happened to a message offered to a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Queued on the live connection: the shard must flush it.
    Queued,
    /// Kept in the pending queue (window full or client offline).
    Pending,
    /// Not queued: QoS 0 to an offline client (not a loss, nothing promised).
    Skipped,
    /// Dropped because a limit was hit: counted as a dropped message.
    Dropped,
}

/// What to do with a received QoS 2 PUBLISH.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos2Receipt {
    /// First time this packet id is seen: deliver it, then send PUBREC.
    New,
    /// Already received and not yet released: send PUBREC only (§4.3.3).
    Duplicate,
    /// Too many unreleased QoS 2 messages: drop it (no PUBREC).
    Refused,
}

/// One client id's session on this shard.
#[derive(Debug)]
pub struct Session {
    /// The client identifier (§3.1.3.1), the session's own copy: a
    /// `Box<str>` is 16 bytes and one allocation of the id's length. The
    /// `ByteString` the codec made (32 bytes, and once cloned a second,
    /// shared header of 24 bytes) is dropped with the handshake; the shard's
    /// index by client id reads this copy (`shard::index`), so it
    /// must not change while the session is in the shard's slab.
    pub client_id: Box<str>,
    /// CleanSession flag of the connection that owns it (§3.1.2.4).
    pub clean_session: bool,
    /// The token of the claim it was attached under
    /// (`shard::registry`): the home shard names it to evict exactly this
    /// session, and its release names it, so that neither touches a newer
    /// session or claim of the same id.
    pub claim: u64,
    /// The protocol of the connection that owns it: how its frames are
    /// encoded (the session's last connection's, while offline).
    pub version: Version,
    /// The Protocol Level of that connection's CONNECT: 3 (MQTT 3.1), 4
    /// (3.1.1) or 5 (5.0), for the admin API (fits in padding).
    pub protocol_level: u8,
    /// Session Expiry Interval in seconds (§3.1.2.11.2, §3.14.2.2.2): how
    /// long the session outlives its connection; 0 exactly when
    /// `clean_session`, [`SESSION_NEVER_EXPIRES`] for ever (3.1.1's
    /// CleanSession = 0). The keep-alive sweep ends offline sessions whose
    /// interval has passed (`shard::Shard::expire_sessions`).
    pub session_expiry: u32,
    /// When the session went offline, in keep-alive ticks
    /// ([`crate::session::link::TICKS_PER_SEC`]); meaningless while online.
    pub offline_since: u32,
    /// The client's Receive Maximum (MQTT 5.0, §3.1.2.11.3): never more
    /// QoS 1/2 messages in flight to it than this, nor than
    /// `max_inflight_messages`; 65,535 for 3.1.1. Fits in padding.
    pub receive_maximum: u16,
    /// The client's Maximum Packet Size (MQTT 5.0, §3.1.2.11.4): a PUBLISH
    /// larger than this is not sent but dropped and counted
    /// (MQTT-3.1.2-25); checked only for MQTT 5.0 sessions.
    pub max_packet_size: u32,
    /// The Topic Aliases the broker assigned on the live connection (MQTT
    /// 5.0, server to client): none until the connection allows them, and
    /// forgotten with the connection (aliases are per connection).
    pub server_aliases: ServerAliases,
    /// State that survives the connection.
    pub state: SessionState,
    /// Frames for the live connection; empty while offline.
    pub out: OutQueue,
    /// The live connection, if any.
    pub link: Option<Link>,
    /// True while this session is on the shard's list of sessions to flush.
    pub dirty: bool,
    /// True when [`Flows::read_check`] is set: the one flag the fan-out
    /// tests per delivery, so that sessions without a partly covered
    /// subscription pay one branch (fits in padding).
    pub read_check: bool,
}

impl Session {
    /// A session for `client_id`, with the state it had (or a fresh one).
    pub fn new(client_id: ByteString, clean_session: bool, state: SessionState) -> Session {
        Session {
            client_id: Box::from(&*client_id),
            clean_session,
            claim: 0,
            version: Version::V3,
            protocol_level: codec::PROTOCOL_LEVEL_V311,
            session_expiry: if clean_session {
                0
            } else {
                SESSION_NEVER_EXPIRES
            },
            offline_since: 0,
            receive_maximum: u16::MAX,
            max_packet_size: u32::MAX,
            server_aliases: ServerAliases::NONE,
            out: OutQueue::default(),
            link: None,
            dirty: false,
            read_check: state.flows.as_ref().is_some_and(|f| f.read_check.is_some()),
            state,
        }
    }

    /// From now on every message offered to this session is checked for
    /// read access under `username` (it has a subscription the ACL covers
    /// only partly); a later call, from a new connection, updates the
    /// identity.
    pub fn check_reads(&mut self, username: Option<ByteString>) {
        self.flows().read_check = Some(ReadCheck { username });
        self.read_check = true;
    }

    /// The user name of the per-delivery read checks, if the session has
    /// them ([`Session::check_reads`]).
    pub fn read_check_username(&self) -> Option<&str> {
        self.state
            .flows
            .as_ref()
            .and_then(|f| f.read_check.as_ref())
            .and_then(|r| r.username.as_deref())
    }

    /// True while a connection is attached.
    pub fn is_online(&self) -> bool {
        self.link.is_some()
    }

    /// Adds or replaces a subscription; true when the filter is new.
    /// `filter` is the router's shared copy ([`crate::router::Router::subscribe_shared`]).
    pub fn subscribe(&mut self, filter: SharedFilter, qos: QoS) -> bool {
        let subscriptions = &mut self.state.subscriptions;
        if let Some(entry) = subscriptions.iter_mut().find(|(f, _)| *f == filter) {
            entry.1 = qos;
            return false;
        }
        if subscriptions.len() == subscriptions.capacity() {
            // Grow by a quarter (at least one), not by doubling: clients
            // rarely add many, and every spare entry costs 24 bytes for the
            // session's life; still geometric, so a client with thousands of
            // filters does not copy its array on every SUBSCRIBE.
            subscriptions.reserve_exact((subscriptions.len() / 4).max(1));
        }
        subscriptions.push((filter, qos));
        true
    }

    /// Records the MQTT 5.0 options of the subscription to `filter`
    /// (replacing earlier ones): kept only when there is one besides QoS.
    pub fn set_subscription_options(
        &mut self,
        filter: SharedFilter,
        options: &SubscriptionOptions,
        identifier: Option<NonZeroU32>,
    ) {
        if let Some(flows) = self.state.flows.as_mut() {
            flows.subscription_options.retain(|e| e.filter != filter);
        }
        if options.no_local || options.retain_as_published || identifier.is_some() {
            self.flows().subscription_options.push(SubscriptionExtras {
                filter,
                no_local: options.no_local,
                retain_as_published: options.retain_as_published,
                identifier,
            });
        }
    }

    /// Removes a subscription; true when it existed.
    pub fn unsubscribe(&mut self, filter: &str) -> bool {
        if let Some(flows) = self.state.flows.as_mut() {
            flows.subscription_options.retain(|e| &*e.filter != filter);
        }
        let subscriptions = &mut self.state.subscriptions;
        let before = subscriptions.len();
        subscriptions.retain(|(f, _)| &**f != filter);
        if subscriptions.len() != before {
            // Back inline (or to a tight array) once most are gone.
            let len = subscriptions.len();
            if subscriptions.spilled()
                && (len <= subscriptions.inline_size() || subscriptions.capacity() > 2 * len)
            {
                subscriptions.shrink_to_fit();
            }
            return true;
        }
        false
    }

    /// Offers a message matched by a subscription granted `granted`, forwarded
    /// with RETAIN cleared and its QoS downgraded to `granted` (§3.3.5).
    pub fn deliver(
        &mut self,
        encoded: &mut Encoded<'_>,
        granted: QoS,
        limits: &Limits,
    ) -> Delivery {
        let message = encoded.message;
        let qos = message.qos.min(granted);
        if qos == QoS::AtMostOnce {
            if !self.is_online() {
                return Delivery::Skipped;
            }
            let alias = self.alias_use(encoded);
            let range = match alias {
                Some(alias) => encoded.qos0_frame_aliased(alias),
                None => encoded.qos0_frame(self.version),
            };
            let len = range.len;
            if self.too_large(len as usize) {
                return Delivery::Dropped;
            }
            if self.out.publishes() >= limits.max_queued_messages
                || self.out.bytes() + len as usize > limits.max_queued_bytes
            {
                return Delivery::Dropped;
            }
            self.out.push_batch(range);
            self.remember_alias(alias, encoded);
            return Delivery::Queued;
        }
        let forwarded = Message {
            topic: message.topic.clone(),
            payload: message.payload.clone(),
            qos,
            retain: false,
            retain_stamp: 0,
            properties: message.properties.clone(),
        };
        if self.window_open(limits) && self.pending_is_empty() {
            let alias = self.alias_use(encoded);
            let delivery = self.start_inflight(forwarded, Some((&mut *encoded, alias)), 0);
            if delivery == Delivery::Queued {
                self.remember_alias(alias, encoded);
            }
            return delivery;
        }
        self.queue_pending(forwarded, limits)
    }

    /// True when a QoS 0 delivery to this session is its version's frame
    /// of the message as every such session gets it, so that a shard may
    /// encode a run of messages once for all of them
    /// ([`Session::deliver_qos0_run`]). What [`Session::deliver`] and
    /// [`Session::deliver_v5`] do per subscriber for a QoS 0 message, and
    /// how each case reads here:
    ///
    /// - a Topic Alias from the broker (`server_aliases`, MQTT 5.0 only):
    ///   a frame of its own, and a table to keep: not plain;
    /// - a subscription option besides QoS (No Local, Retain As Published,
    ///   a Subscription Identifier: [`Session::needs_subscription_options`]):
    ///   a copy of its own or none: not plain;
    /// - the Maximum Packet Size (MQTT 5.0): a test of the frame's length,
    ///   which the run path makes as `deliver` does: still plain;
    /// - the queue limits: the same tests, made by the run path too;
    /// - offline: QoS 0 is skipped on both paths.
    ///
    /// The Message Expiry Interval is not per subscriber: the remaining
    /// interval is written when the shard encodes the frame. Always true
    /// for a 3.1.1 session (it has none of these).
    #[inline]
    pub fn plain_delivery(&self) -> bool {
        self.server_aliases.maximum().is_none() && !self.needs_subscription_options()
    }

    /// [`Session::deliver`] of a *run*: QoS 0 messages to one topic, framed
    /// for this session's version at `ranges` of the step's batch, in order
    /// (`whole`: their union when they are adjacent, as the run's encoding
    /// leaves them; `largest`: the length of the largest). For a session
    /// with [`Session::plain_delivery`] only. The Maximum Packet Size and
    /// the queue limits apply per message as in `deliver`: when the whole
    /// run fits (the usual case), it is queued as one entry with one check;
    /// otherwise message by message, the rest dropped. Returns the messages
    /// queued and dropped; an offline session skips them all (QoS 0 is
    /// never kept for an offline session).
    pub fn deliver_qos0_run(
        &mut self,
        ranges: &[BatchRange],
        whole: Option<BatchRange>,
        largest: u32,
        limits: &Limits,
    ) -> (usize, usize) {
        debug_assert!(self.plain_delivery());
        if !self.is_online() {
            return (0, 0);
        }
        if let Some(whole) = whole
            && !self.too_large(largest as usize)
            && self.out.publishes() + ranges.len() <= limits.max_queued_messages
            && self.out.bytes() + whole.len as usize <= limits.max_queued_bytes
        {
            self.out
                .push_batch_run(whole, u32::try_from(ranges.len()).unwrap_or(u32::MAX));
            return (ranges.len(), 0);
        }
        let mut queued = 0;
        for &range in ranges {
            if !self.too_large(range.len as usize)
                && self.out.publishes() < limits.max_queued_messages
                && self.out.bytes() + range.len as usize <= limits.max_queued_bytes
            {
                self.out.push_batch(range);
                queued += 1;
            }
        }
        (queued, ranges.len() - queued)
    }

    /// The Topic Alias this delivery of `encoded` uses, when the connection
    /// takes aliases from the broker (never for 3.1.1: its table is empty).
    #[inline]
    fn alias_use(&mut self, encoded: &mut Encoded<'_>) -> Option<AliasUse> {
        let maximum = self.server_aliases.maximum()?;
        let alias = encoded.alias_for(maximum);
        let number = encoded.topic_number();
        let known = self
            .server_aliases
            .state(alias, number, &encoded.message.topic)
            == AliasState::Known;
        Some(AliasUse { alias, known })
    }

    /// Records an alias that a just queued PUBLISH set for `topic` (nothing
    /// for one already known or no alias): only once the frame is queued,
    /// so a dropped frame never leaves the client without a mapping that
    /// later frames rely on.
    fn remember_alias(&mut self, alias: Option<AliasUse>, encoded: &mut Encoded<'_>) {
        if let Some(AliasUse {
            alias,
            known: false,
        }) = alias
        {
            let number = encoded.topic_number();
            self.server_aliases
                .remember(alias, number, &encoded.message.topic);
        }
    }

    /// True when a subscription of this session has an MQTT 5.0 option
    /// besides QoS (No Local, Retain As Published, a Subscription
    /// Identifier). Inlined, one pointer test for most sessions.
    #[inline]
    pub fn has_subscription_options(&self) -> bool {
        self.state
            .flows
            .as_deref()
            .is_some_and(|f| !f.subscription_options.is_empty())
    }

    /// True when this session's deliveries need [`Session::deliver_v5`]:
    /// an MQTT 5.0 session with [`Session::has_subscription_options`] (a
    /// 3.1.1 connection of a session that had them ignores them, as its
    /// frames cannot carry them). Otherwise an MQTT 5.0 subscriber takes
    /// the 3.1.1 subscriber's path, [`Session::deliver`].
    #[inline]
    pub fn needs_subscription_options(&self) -> bool {
        self.version == Version::V5 && self.has_subscription_options()
    }

    /// [`Session::deliver`] for an MQTT 5.0 session: the same, unless the
    /// matching subscriptions have options besides QoS. Then No Local skips
    /// the client's own publication (`origin` is the publisher's session
    /// when it is on this shard, and `key` this session's), Retain As
    /// Published keeps RETAIN, and the Subscription Identifiers go with the
    /// message, encoded for this client alone.
    pub fn deliver_v5(
        &mut self,
        encoded: &mut Encoded<'_>,
        key: u32,
        granted: QoS,
        limits: &Limits,
    ) -> Delivery {
        if !self.has_subscription_options() {
            return self.deliver(encoded, granted, limits);
        }
        let message = encoded.message;
        let CopyOptions {
            no_local_only,
            retain_as_published,
            identifiers,
        } = self.state.copy_options(&message.topic);
        if no_local_only && encoded.origin == Some(key) {
            return Delivery::Skipped;
        }
        let retain = retain_as_published && message.retain;
        if !retain && identifiers.is_empty() {
            return self.deliver(encoded, granted, limits);
        }
        let qos = message.qos.min(granted);
        let forwarded = Message {
            qos,
            retain,
            ..with_identifiers(message, &identifiers)
        };
        self.deliver_alone(forwarded, limits)
    }

    /// Offers the copy of a message that the shared subscription `share`
    /// (the whole `$share/{ShareName}/{filter}`, §4.8.2) chose this session
    /// for, at its granted QoS: a copy of its own, apart from any that the
    /// session's non-shared subscriptions get, so it carries this
    /// subscription's Subscription Identifier alone (§3.3.4: each of several
    /// copies carries the identifier of the subscription it is sent for),
    /// and RETAIN as published when the subscription has Retain As
    /// Published (§3.8.3.1), cleared otherwise. No Local cannot be set on a
    /// shared subscription (MQTT-3.8.3-4). MQTT 5.0 sessions only; the
    /// rest is [`Session::deliver`].
    pub fn deliver_shared(
        &mut self,
        encoded: &mut Encoded<'_>,
        share: &str,
        granted: QoS,
        limits: &Limits,
    ) -> Delivery {
        if self.version != Version::V5 {
            return self.deliver(encoded, granted, limits);
        }
        let message = encoded.message;
        let (retain_as_published, identifier) = self.state.shared_extras(share);
        let retain = retain_as_published && message.retain;
        if !retain && identifier.is_none() {
            return self.deliver(encoded, granted, limits);
        }
        let forwarded = Message {
            qos: message.qos.min(granted),
            retain,
            ..with_identifiers(message, identifier.as_slice())
        };
        self.deliver_alone(forwarded, limits)
    }

    /// Offers a retained message on a new subscription: RETAIN set (§3.3.1.3),
    /// encoded for this client alone, with the Subscription Identifiers of
    /// the new subscription (MQTT 5.0 sessions only).
    pub fn deliver_retained(
        &mut self,
        message: &Message,
        granted: QoS,
        identifiers: &[NonZeroU32],
        limits: &Limits,
    ) -> Delivery {
        if message.is_expired() {
            // Retained past its Message Expiry Interval (§3.3.2.3.3).
            return Delivery::Skipped;
        }
        let qos = message.qos.min(granted);
        let message = if identifiers.is_empty() || self.version != Version::V5 {
            message.clone()
        } else {
            with_identifiers(message, identifiers)
        };
        let forwarded = Message {
            qos,
            retain: true,
            ..message
        };
        self.deliver_alone(forwarded, limits)
    }

    /// Queues `forwarded` (QoS and RETAIN as they are to be sent) encoded
    /// for this client alone.
    fn deliver_alone(&mut self, forwarded: Message, limits: &Limits) -> Delivery {
        let qos = forwarded.qos;
        if qos == QoS::AtMostOnce {
            if !self.is_online() {
                return Delivery::Skipped;
            }
            let frame = forwarded.encode_whole(self.version, qos, forwarded.retain, false, 0);
            if self.too_large(frame.len()) {
                return Delivery::Dropped;
            }
            if self.out.publishes() >= limits.max_queued_messages
                || self.out.bytes() + frame.len() > limits.max_queued_bytes
            {
                return Delivery::Dropped;
            }
            self.out.push(OutFrame::whole(frame));
            return Delivery::Queued;
        }
        if self.window_open(limits) && self.pending_is_empty() {
            return self.start_inflight(forwarded, None, 0);
        }
        self.queue_pending(forwarded, limits)
    }

    /// The QoS 1/2 state, allocated on first use.
    fn flows(&mut self) -> &mut Flows {
        self.state.flows.get_or_insert_with(Box::default)
    }

    /// True when QoS 1/2 messages sent to the client wait for its
    /// acknowledgement (PUBACK, PUBREC, PUBCOMP): its connection is about
    /// to read them, so it stays in its task rather than parking.
    #[inline]
    pub fn awaits_acks(&self) -> bool {
        self.state
            .flows
            .as_deref()
            .is_some_and(|f| !f.inflight.is_empty())
    }

    /// True when no QoS 1/2 message waits for the window.
    fn pending_is_empty(&self) -> bool {
        self.state
            .flows
            .as_ref()
            .is_none_or(|f| f.pending.is_empty())
    }

    /// The inflight window: at most this many QoS 1/2 messages unacknowledged,
    /// the smaller of `max_inflight_messages` and the client's Receive
    /// Maximum (MQTT-3.3.4-9).
    pub fn window(&self, limits: &Limits) -> usize {
        limits.max_inflight.min(usize::from(self.receive_maximum))
    }

    /// QoS 1/2 messages in flight to the client, unacknowledged.
    pub fn inflight_len(&self) -> usize {
        self.state.flows.as_ref().map_or(0, |f| f.inflight.len())
    }

    /// True when a QoS 1/2 message may be sent now.
    fn window_open(&self, limits: &Limits) -> bool {
        self.is_online()
            && self.inflight_len() < self.window(limits)
            && self.out.bytes() < limits.max_queued_bytes
    }

    /// True when an acknowledgement that just freed a slot should move
    /// pending messages into the window now ([`REFILL_SHARE`]): always for a
    /// window under [`MIN_BATCHED_WINDOW`], otherwise once a
    /// `1 / REFILL_SHARE` share of it is free.
    fn refill_due(&self, limits: &Limits) -> bool {
        let window = self.window(limits);
        window < MIN_BATCHED_WINDOW
            || window.saturating_sub(self.inflight_len()) >= window / REFILL_SHARE
    }

    /// Puts a QoS 1/2 message in the pending queue, or drops it when full.
    fn queue_pending(&mut self, message: Message, limits: &Limits) -> Delivery {
        if !self.is_online() && limits.shard_over_budget() {
            return Delivery::Dropped;
        }
        let len = message.wire_len();
        let flows = self.flows();
        if flows.pending.len() >= limits.max_queued_messages
            || flows.pending_bytes + len > limits.max_queued_bytes
        {
            return Delivery::Dropped;
        }
        flows.pending_bytes += len;
        flows.pending.push_back(message);
        if !flows.pending_stored.is_empty() {
            flows.pending_stored.push_back(0);
        }
        note_backlog();
        Delivery::Pending
    }

    /// True when a packet of `len` bytes is over an MQTT 5.0 client's
    /// Maximum Packet Size (3.1.1 has none: only the version is checked).
    fn too_large(&self, len: usize) -> bool {
        self.version == Version::V5 && len > self.max_packet_size as usize
    }

    /// Assigns a packet id, records the message as in flight and queues its
    /// PUBLISH (from the fan-out's shared encodings `shared` with the
    /// delivery's Topic Alias when there are: the whole packet shared by
    /// every subscriber given this packet id, or the shared head and
    /// payload): [`Delivery::Queued`], or [`Delivery::Dropped`] when the
    /// PUBLISH is over the client's Maximum Packet Size.
    fn start_inflight(
        &mut self,
        message: Message,
        shared: Option<(&mut Encoded<'_>, Option<AliasUse>)>,
        stored: u64,
    ) -> Delivery {
        let Some(packet_id) = self.flows().next_packet_id() else {
            // All 65,535 ids in flight: a window never that large allows.
            return Delivery::Dropped;
        };
        let parts = |(head, payload): (Frame, Frame)| OutFrame::Publish {
            head,
            packet_id: packet_id.to_be_bytes(),
            payload,
        };
        let frame = match shared {
            Some((encoded, Some(alias))) => parts(encoded.aliased_publish(message.qos, alias)),
            Some((encoded, None)) => match encoded.publish(self.version, message.qos, packet_id) {
                Publish::Whole(range) => {
                    // In the step's batch: after this session's previous
                    // message when that one lies just before it.
                    if self.too_large(range.len as usize) {
                        return Delivery::Dropped;
                    }
                    self.push_inflight(packet_id, message, stored);
                    self.out.push_batch(range);
                    return Delivery::Queued;
                }
                Publish::Parts(head, payload) => parts((head, payload)),
            },
            // Alone (from the pending queue, retained on SUBSCRIBE): the
            // frame another session sent this message with under this id,
            // when there was one.
            None => OutFrame::whole(publish_cache::publish(&message, self.version, packet_id)),
        };
        if self.too_large(frame.len()) {
            return Delivery::Dropped;
        }
        self.push_inflight(packet_id, message, stored);
        self.out.push(frame);
        Delivery::Queued
    }

    /// Records `message`, just queued under `packet_id`, as in flight.
    fn push_inflight(&mut self, packet_id: PacketId, message: Message, stored: u64) {
        let phase = if message.qos == QoS::ExactlyOnce {
            Phase::AwaitPubRec
        } else {
            Phase::AwaitPubAck
        };
        let flows = self.flows();
        flows.inflight.push_back(Inflight {
            packet_id,
            message,
            phase,
            stored,
            journalled: false,
        });
        flows.unjournalled = flows.unjournalled.saturating_add(1);
    }

    /// Moves pending messages into the inflight window while it has room;
    /// one whose Message Expiry Interval has passed meanwhile is dropped
    /// (§3.3.2.3.3). Returns true when something was queued.
    pub fn fill_window(&mut self, limits: &Limits) -> bool {
        let mut queued = false;
        while self.window_open(limits) {
            let Some(flows) = self.state.flows.as_mut() else {
                break;
            };
            let Some(message) = flows.pending.pop_front() else {
                break;
            };
            let stored = flows.pending_stored.pop_front().unwrap_or(0);
            flows.pending_bytes -= message.wire_len();
            if message.is_expired() {
                continue;
            }
            // One over the client's Maximum Packet Size is dropped here,
            // counted by the next keep-alive sweep.
            match self.start_inflight(message, None, stored) {
                Delivery::Queued => queued = true,
                _ => {
                    let flows = self.flows();
                    flows.unreported_drops = flows.unreported_drops.saturating_add(1);
                }
            }
        }
        queued
    }

    /// Position of the inflight message with `packet_id` in `phase`.
    fn inflight_position(&self, packet_id: PacketId, phase: Phase) -> Option<usize> {
        self.state
            .flows
            .as_ref()?
            .inflight
            .iter()
            .position(|f| f.packet_id == packet_id && f.phase == phase)
    }

    /// PUBACK received: the QoS 1 message is done. False for an unknown id
    /// (ignored, as Mosquitto does).
    pub fn on_puback(&mut self, packet_id: PacketId, limits: &Limits) -> bool {
        self.finish(packet_id, Phase::AwaitPubAck, limits)
    }

    /// Ends the flow of the inflight message with `packet_id` in `phase`
    /// and lets a pending message take its slot; false when there is none.
    fn finish(&mut self, packet_id: PacketId, phase: Phase, limits: &Limits) -> bool {
        let Some(i) = self.inflight_position(packet_id, phase) else {
            return false;
        };
        self.flows().inflight.remove(i);
        if self.refill_due(limits) {
            self.fill_window(limits);
        }
        true
    }

    /// PUBREC received: answer PUBREL and wait for PUBCOMP (§4.3.3). An unknown
    /// id still gets a PUBREL, so the client can finish its side.
    pub fn on_pubrec(&mut self, packet_id: PacketId) -> bool {
        self.queue_control(&codec::pubrel(packet_id));
        match self.inflight_position(packet_id, Phase::AwaitPubRec) {
            Some(i) => {
                if let Some(f) = self.flows().inflight.get_mut(i) {
                    f.phase = Phase::AwaitPubComp;
                }
                true
            }
            None => false,
        }
    }

    /// PUBREC with a failure Reason Code received (MQTT 5.0): the client
    /// refused the QoS 2 message, whose flow ends without PUBREL (§4.3.3).
    pub fn on_pubrec_refused(&mut self, packet_id: PacketId, limits: &Limits) -> bool {
        self.finish(packet_id, Phase::AwaitPubRec, limits)
    }

    /// PUBCOMP received: the QoS 2 message is done.
    pub fn on_pubcomp(&mut self, packet_id: PacketId, limits: &Limits) -> bool {
        self.finish(packet_id, Phase::AwaitPubComp, limits)
    }

    /// A QoS 2 PUBLISH with `packet_id` arrived: deliver it only the first
    /// time, until PUBREL releases the id (exactly once, §4.3.3).
    pub fn on_publish_qos2(&mut self, packet_id: PacketId, limits: &Limits) -> Qos2Receipt {
        let flows = self.flows();
        if flows.awaiting_rel.contains(&packet_id) {
            return Qos2Receipt::Duplicate;
        }
        if flows.awaiting_rel.len() >= limits.max_awaiting_rel {
            return Qos2Receipt::Refused;
        }
        flows.awaiting_rel.push(packet_id);
        Qos2Receipt::New
    }

    /// Releases the received QoS 2 packet id `packet_id` (PUBREL); false
    /// when it was not awaiting release (MQTT 5.0 answers PUBCOMP 0x92).
    pub fn release(&mut self, packet_id: PacketId) -> bool {
        let Some(flows) = self.state.flows.as_mut() else {
            return false;
        };
        let before = flows.awaiting_rel.len();
        flows.awaiting_rel.retain(|&id| id != packet_id);
        flows.awaiting_rel.len() != before
    }

    /// Queues a small control packet.
    pub fn queue_control(&mut self, packet: &[u8]) {
        self.out.push(OutFrame::control(packet));
    }

    /// Queues a packet of any size: inline when it is small enough
    /// ([`OutFrame::control`]), in a frame of its own otherwise (MQTT 5.0
    /// CONNACK, SUBACK, UNSUBACK and acknowledgements with a reason code).
    pub fn queue_frame(&mut self, packet: &[u8]) {
        if packet.len() <= 4 {
            self.queue_control(packet);
        } else {
            self.out.push(OutFrame::whole(Frame::from(packet)));
        }
    }

    /// A connection (re)attached: resend unacknowledged messages with DUP set
    /// (§4.4), then move pending messages into the window.
    pub fn reattach(&mut self, limits: &Limits) {
        let inflight = self.state.flows.as_ref().map(|f| &f.inflight);
        for f in inflight.into_iter().flatten() {
            let frame = match f.phase {
                Phase::AwaitPubAck | Phase::AwaitPubRec => OutFrame::whole(f.message.encode_whole(
                    self.version,
                    f.message.qos,
                    f.message.retain,
                    true,
                    f.packet_id,
                )),
                Phase::AwaitPubComp => OutFrame::control(&codec::pubrel(f.packet_id)),
            };
            self.out.push(frame);
        }
        self.fill_window(limits);
    }

    /// True when the session has been offline for longer than its Session
    /// Expiry Interval at `now` (keep-alive ticks).
    pub fn has_expired(&self, now: u32) -> bool {
        self.link.is_none()
            && self.session_expiry != SESSION_NEVER_EXPIRES
            && u64::from(now.saturating_sub(self.offline_since))
                >= u64::from(self.session_expiry) * u64::from(crate::session::link::TICKS_PER_SEC)
    }

    /// The drops since the last call that only the session saw
    /// ([`Flows::unreported_drops`]).
    pub fn take_unreported_drops(&mut self) -> u64 {
        self.state
            .flows
            .as_mut()
            .map_or(0, |f| u64::from(std::mem::take(&mut f.unreported_drops)))
    }

    /// Keeps `will` until tick `due` (an MQTT 5.0 Will Delay Interval).
    pub fn delay_will(&mut self, due: u32, will: Message) {
        self.flows().delayed_will = Some(Box::new((due, will)));
    }

    /// The offline session's delayed will, when it is due at `now` (ticks).
    pub fn take_due_will(&mut self, now: u32) -> Option<Message> {
        let flows = self.state.flows.as_mut()?;
        if flows.delayed_will.as_ref().is_some_and(|w| w.0 <= now) {
            return flows.delayed_will.take().map(|w| w.1);
        }
        None
    }

    /// The connection went away: forget its queue, keep the session state.
    pub fn detach(&mut self) {
        self.link = None;
        self.out.clear();
        self.server_aliases.clear();
        self.dirty = false;
    }
}

/// `message` with `identifiers` added to its properties (MQTT 5.0
/// Subscription Identifiers, §3.3.2.3.8), for one subscriber.
fn with_identifiers(message: &Message, identifiers: &[NonZeroU32]) -> Message {
    if identifiers.is_empty() {
        return message.clone();
    }
    let mut properties = message
        .properties
        .as_deref()
        .cloned()
        .unwrap_or(MessageProperties {
            forwarded: Default::default(),
            expires_at: None,
        });
    for &id in identifiers {
        properties
            .forwarded
            .push(Property::SubscriptionIdentifier(id));
    }
    Message {
        properties: Some(Arc::new(properties)),
        ..message.clone()
    }
}

/// `message` without the Subscription Identifiers a member's copy carries
/// (the copy for another member gets that member's own).
fn without_identifiers(message: &Message) -> Message {
    let Some(properties) = message.properties.as_deref() else {
        return message.clone();
    };
    if !properties
        .forwarded
        .iter()
        .any(|p| matches!(p, Property::SubscriptionIdentifier(_)))
    {
        return message.clone();
    }
    let mut kept = MessageProperties {
        forwarded: Default::default(),
        expires_at: properties.expires_at,
    };
    for property in properties.forwarded.iter() {
        if !matches!(property, Property::SubscriptionIdentifier(_)) {
            kept.forwarded.push(property.clone());
        }
    }
    let empty = kept.forwarded.is_empty() && kept.expires_at.is_none();
    Message {
        properties: (!empty).then(|| Arc::new(kept)),
        ..message.clone()
    }
}

/// The PUBACK/PUBREC answer to a received PUBLISH (none for QoS 0).
pub fn ack_for_publish(qos: QoS, packet_id: PacketId) -> Option<[u8; 4]> {
    match qos {
        QoS::AtMostOnce => None,
        QoS::AtLeastOnce => Some(codec::puback(packet_id)),
        QoS::ExactlyOnce => Some(codec::pubrec(packet_id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::Batch;
    use crate::session::link::test_link;
    use bytes::Bytes;

    const LIMITS: Limits = Limits {
        max_inflight: 2,
        max_queued_messages: 3,
        max_queued_bytes: 1 << 20,
        max_awaiting_rel: 2,
        max_queued_bytes_shard: 0,
    };

    fn msg(qos: QoS, payload: &'static [u8]) -> Message {
        Message {
            topic: ByteString::from_static("a/b"),
            payload: Bytes::from_static(payload),
            qos,
            retain: true,
            retain_stamp: 0,
            properties: None,
        }
    }

    fn online() -> Session {
        let mut s = Session::new(ByteString::from_static("c"), false, SessionState::default());
        s.link = Some(test_link());
        s
    }

    /// Ends the step of `enc` (sealing its batch into `s`'s queue), then
    /// drains the queue as [`written`] does.
    fn sealed(enc: &mut Encoded<'_>, s: &mut Session) -> Vec<u8> {
        let (chunk, bases) = enc.seal();
        s.out.seal(&chunk, &bases);
        written(s)
    }

    /// Drains the out queue into one byte vector.
    fn written(s: &mut Session) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(chunk) = s.out.front_chunk() {
            let n = chunk.len();
            all.extend_from_slice(chunk);
            s.out.advance(n);
        }
        all
    }

    #[test]
    fn qos0_is_forwarded_with_retain_cleared_and_shared() {
        let m = msg(QoS::AtMostOnce, b"hi");
        let mut batch = Batch::default();
        let mut enc = Encoded::new(&m, &mut batch);
        let mut a = online();
        let mut b = online();
        assert_eq!(
            a.deliver(&mut enc, QoS::ExactlyOnce, &LIMITS),
            Delivery::Queued
        );
        assert_eq!(
            b.deliver(&mut enc, QoS::AtMostOnce, &LIMITS),
            Delivery::Queued
        );
        drop(enc);
        let (chunk, bases) = batch.seal();
        a.out.seal(&chunk, &bases);
        b.out.seal(&chunk, &bases);
        let wa = written(&mut a);
        assert_eq!(wa, written(&mut b));
        assert_eq!(wa, b"\x30\x07\x00\x03a/bhi");
    }

    #[test]
    fn v3_and_v5_subscribers_share_the_payload_and_get_their_own_frames() {
        let m = msg(QoS::AtLeastOnce, b"x");
        let mut batch = Batch::default();
        let mut enc = Encoded::new(&m, &mut batch);
        let mut v3 = online();
        let mut v5 = online();
        v5.version = Version::V5;
        let mut v5_qos0 = online();
        v5_qos0.version = Version::V5;
        v3.deliver(&mut enc, QoS::AtLeastOnce, &LIMITS);
        v5.deliver(&mut enc, QoS::AtLeastOnce, &LIMITS);
        v5_qos0.deliver(&mut enc, QoS::AtMostOnce, &LIMITS);
        drop(enc);
        let (chunk, bases) = batch.seal();
        for s in [&mut v3, &mut v5, &mut v5_qos0] {
            s.out.seal(&chunk, &bases);
        }
        assert_eq!(written(&mut v3), b"\x32\x08\x00\x03a/b\x00\x01x");
        // 5.0: the packet id, then the (empty) properties, then the payload.
        assert_eq!(written(&mut v5), b"\x32\x09\x00\x03a/b\x00\x01\x00x");
        assert_eq!(written(&mut v5_qos0), b"\x30\x07\x00\x03a/b\x00x");
        // A redelivery is encoded in the session's version too.
        v5.detach();
        v5.link = Some(test_link());
        v5.reattach(&LIMITS);
        assert_eq!(written(&mut v5), b"\x3a\x09\x00\x03a/b\x00\x01\x00x");
    }

    #[test]
    fn qos1_subscribers_given_the_same_packet_id_share_one_whole_publish() {
        let m = msg(QoS::AtLeastOnce, b"x");
        let mut batch = Batch::default();
        let mut enc = Encoded::new(&m, &mut batch);
        let (mut a, mut b, mut c) = (online(), online(), online());
        // Id 1 is in flight to `c` from an earlier connection: it gets 2.
        c.flows().free_ids.reserve(1);
        for s in [&mut a, &mut b, &mut c] {
            assert_eq!(
                s.deliver(&mut enc, QoS::AtLeastOnce, &LIMITS),
                Delivery::Queued
            );
        }
        drop(enc);
        let (chunk, bases) = batch.seal();
        for s in [&mut a, &mut b, &mut c] {
            s.out.seal(&chunk, &bases);
        }
        let whole = b"\x32\x08\x00\x03a/b\x00\x01x";
        // One piece to write, the same frame for both.
        let (fa, fb) = (a.out.front_chunk(), b.out.front_chunk());
        assert_eq!(fa, Some(&whole[..]));
        assert_eq!(fa.map(<[u8]>::as_ptr), fb.map(<[u8]>::as_ptr));
        assert_eq!(
            c.out.front_chunk(),
            Some(&b"\x32\x08\x00\x03a/b\x00\x02x"[..])
        );
        assert_eq!(written(&mut a), whole);
        assert_eq!(written(&mut b), whole);
    }

    #[test]
    fn a_step_for_both_versions_keeps_each_subscribers_frames_in_one_entry() {
        // Two messages in one step to a 3.1.1 and a 5.0 subscriber: each
        // version's frames lie in their own lane of the batch, so each
        // subscriber's two frames merge into one entry (one iovec).
        let (m1, m2) = (msg(QoS::AtMostOnce, b"1"), msg(QoS::AtMostOnce, b"2"));
        let mut batch = Batch::default();
        let mut v3 = online();
        let mut v5 = online();
        v5.version = Version::V5;
        for m in [&m1, &m2] {
            let mut enc = Encoded::new(m, &mut batch);
            v3.deliver(&mut enc, QoS::AtMostOnce, &LIMITS);
            v5.deliver(&mut enc, QoS::AtMostOnce, &LIMITS);
        }
        assert_eq!((v3.out.entries(), v5.out.entries()), (1, 1));
        let (chunk, bases) = batch.seal();
        v3.out.seal(&chunk, &bases);
        v5.out.seal(&chunk, &bases);
        assert_eq!(
            written(&mut v3),
            b"\x30\x06\x00\x03a/b1\x30\x06\x00\x03a/b2"
        );
        assert_eq!(
            written(&mut v5),
            b"\x30\x07\x00\x03a/b\x001\x30\x07\x00\x03a/b\x002"
        );
    }

    #[test]
    fn plain_delivery_is_false_for_server_aliases_and_subscription_options_only() {
        assert!(online().plain_delivery(), "3.1.1");
        let v5 = online_with(Version::V5, u32::MAX);
        assert!(v5.plain_delivery(), "5.0 without anything per subscriber");
        let small = online_with(Version::V5, 10);
        assert!(
            small.plain_delivery(),
            "the run path checks each frame's size"
        );
        assert!(!online_v5(4).plain_delivery(), "server Topic Aliases");
        let options = |no_local, retain_as_published| SubscriptionOptions {
            qos: QoS::AtMostOnce,
            no_local,
            retain_as_published,
            retain_handling: crate::protocol::v5::RetainHandling::SendAtSubscribe,
        };
        for (option, identifier) in [
            (options(true, false), None),
            (options(false, true), None),
            (options(false, false), NonZeroU32::new(7)),
        ] {
            let mut s = online();
            s.version = Version::V5;
            s.subscribe(SharedFilter::from("a/+"), QoS::AtMostOnce);
            s.set_subscription_options(SharedFilter::from("a/+"), &option, identifier);
            assert!(!s.plain_delivery(), "{option:?} {identifier:?}");
            // The same state under a 3.1.1 connection: its frames carry no
            // options, so its deliveries are plain.
            s.version = Version::V3;
            assert!(s.plain_delivery());
        }
        // Retain Handling alone keeps nothing per delivery.
        let mut s = online();
        s.version = Version::V5;
        let handling = SubscriptionOptions {
            retain_handling: crate::protocol::v5::RetainHandling::DoNotSend,
            ..options(false, false)
        };
        s.set_subscription_options(SharedFilter::from("a/+"), &handling, None);
        assert!(s.plain_delivery());
    }

    /// An online session of `version` with Maximum Packet Size `max`.
    fn online_with(version: Version, max: u32) -> Session {
        let mut s = online();
        s.version = version;
        s.max_packet_size = max;
        s
    }

    /// What a session [`online_with`] `version` and `max` writes and the
    /// (queued, dropped) counts when `messages` (QoS 0) reach it as one run
    /// ([`Session::deliver_qos0_run`]) and, to another such session, one by
    /// one ([`Session::deliver`]).
    fn run_and_one_by_one(
        (version, max): (Version, u32),
        messages: &[Message],
        limits: &Limits,
    ) -> [(Vec<u8>, usize, usize); 2] {
        let mut by_run = online_with(version, max);
        let mut batch = Batch::default();
        let ranges: Vec<BatchRange> = messages
            .iter()
            .map(|m| Encoded::new(m, &mut batch).qos0_frame(version))
            .collect();
        let whole = ranges.iter().skip(1).try_fold(ranges[0], |w, r| {
            (w.lane == r.lane && w.start + w.len == r.start).then_some(BatchRange {
                len: w.len + r.len,
                ..w
            })
        });
        assert!(whole.is_some(), "a run's frames are adjacent");
        let largest = ranges.iter().map(|r| r.len).max().unwrap_or(0);
        let (queued, dropped) = by_run.deliver_qos0_run(&ranges, whole, largest, limits);
        let (chunk, bases) = batch.seal();
        by_run.out.seal(&chunk, &bases);
        let run = (written(&mut by_run), queued, dropped);

        let mut alone = online_with(version, max);
        let mut batch = Batch::default();
        let (mut queued, mut dropped) = (0, 0);
        for m in messages {
            match alone.deliver(&mut Encoded::new(m, &mut batch), QoS::AtMostOnce, limits) {
                Delivery::Queued => queued += 1,
                Delivery::Dropped => dropped += 1,
                other => panic!("{other:?}"),
            }
        }
        let (chunk, bases) = batch.seal();
        alone.out.seal(&chunk, &bases);
        [run, (written(&mut alone), queued, dropped)]
    }

    #[test]
    fn a_run_to_a_plain_session_is_what_its_messages_one_by_one_are() {
        let payloads: [&'static [u8]; 5] = [b"1", b"22222222", b"3", b"44444444", b"5"];
        let messages: Vec<Message> = payloads
            .iter()
            .map(|p| Message {
                retain: false,
                ..msg(QoS::AtMostOnce, p)
            })
            .collect();
        let roomy = Limits {
            max_queued_messages: 10,
            ..LIMITS
        };
        let (v3, v5) = ((Version::V3, u32::MAX), (Version::V5, u32::MAX));
        // A 5.0 frame of a one-byte payload on `a/b` is 9 bytes, of an
        // eight-byte payload 16: the long ones are over 10.
        let small = (Version::V5, 10);
        let cases = [
            ("3.1.1", v3, roomy, 0),
            ("5.0", v5, roomy, 0),
            ("5.0, Maximum Packet Size 10", small, roomy, 2),
            ("3.1.1, queue of 3", v3, LIMITS, 2),
            ("5.0, queue of 3", v5, LIMITS, 2),
        ];
        for (name, session, limits, dropped) in cases {
            let [run, alone] = run_and_one_by_one(session, &messages, &limits);
            assert_eq!(run, alone, "{name}");
            assert_eq!(run.2, dropped, "{name}");
            assert_eq!(run.1 + run.2, messages.len(), "{name}");
        }
        // Maximum Packet Size 10: the short ones arrive, in order.
        let [(bytes, ..), _] = run_and_one_by_one(small, &messages, &LIMITS);
        assert_eq!(
            bytes,
            b"\x30\x07\x00\x03a/b\x001\x30\x07\x00\x03a/b\x003\x30\x07\x00\x03a/b\x005"
        );
    }

    /// An online MQTT 5.0 session that takes `maximum` aliases from the
    /// broker.
    fn online_v5(maximum: u16) -> Session {
        let mut s = online();
        s.version = Version::V5;
        s.server_aliases = ServerAliases::new(maximum, 16);
        s
    }

    /// Delivers `m` to every session in one step and returns what each
    /// would write, and the batch's length (to see what was shared).
    fn one_step(m: &Message, sessions: &mut [&mut Session], granted: QoS) -> (Vec<Vec<u8>>, usize) {
        let mut batch = Batch::default();
        let mut enc = Encoded::new(m, &mut batch);
        for s in sessions.iter_mut() {
            assert_eq!(s.deliver(&mut enc, granted, &LIMITS), Delivery::Queued);
        }
        drop(enc);
        let len = batch.len();
        let (chunk, bases) = batch.seal();
        let frames = sessions
            .iter_mut()
            .map(|s| {
                s.out.seal(&chunk, &bases);
                written(s)
            })
            .collect();
        (frames, len)
    }

    #[test]
    fn a_server_alias_is_set_once_then_used_alone_and_the_frames_stay_shared() {
        // Maximum 1: every topic maps to alias 1.
        let m = msg(QoS::AtMostOnce, b"hi");
        let (mut a, mut b) = (online_v5(1), online_v5(1));
        let (frames, batch) = one_step(&m, &mut [&mut a, &mut b], QoS::AtMostOnce);
        let first = b"\x30\x0b\x00\x03a/b\x03\x23\x00\x01hi";
        assert_eq!(frames, vec![first.to_vec(), first.to_vec()]);
        assert_eq!(batch, first.len(), "one frame for both subscribers");
        let (frames, batch) = one_step(&m, &mut [&mut a, &mut b], QoS::AtMostOnce);
        let later = b"\x30\x08\x00\x00\x03\x23\x00\x01hi";
        assert_eq!(frames, vec![later.to_vec(), later.to_vec()]);
        assert_eq!(batch, later.len());
        // QoS 1: the shared head without the topic, the packet id, the
        // tail with the alias.
        let m1 = msg(QoS::AtLeastOnce, b"x");
        let (frames, _) = one_step(&m1, &mut [&mut a], QoS::AtLeastOnce);
        assert_eq!(frames[0], b"\x32\x09\x00\x00\x00\x01\x03\x23\x00\x01x");
        // Another topic takes the alias over, with its topic; the first
        // topic then comes with its topic again.
        let other = Message {
            topic: ByteString::from_static("c"),
            ..msg(QoS::AtMostOnce, b"hi")
        };
        let (frames, _) = one_step(&other, &mut [&mut a], QoS::AtMostOnce);
        assert_eq!(frames[0], b"\x30\x09\x00\x01c\x03\x23\x00\x01hi");
        let (frames, _) = one_step(&m, &mut [&mut a], QoS::AtMostOnce);
        assert_eq!(frames[0], first);
    }

    #[test]
    fn no_alias_without_the_clients_maximum_or_for_3_1_1() {
        let m = msg(QoS::AtMostOnce, b"hi");
        let (mut v5, mut v3) = (online_v5(0), online());
        for _ in 0..2 {
            let (frames, _) = one_step(&m, &mut [&mut v5, &mut v3], QoS::AtMostOnce);
            assert_eq!(frames[0], b"\x30\x08\x00\x03a/b\x00hi");
            assert_eq!(frames[1], b"\x30\x07\x00\x03a/bhi");
        }
    }

    #[test]
    fn a_dropped_frame_sets_no_alias_and_a_new_connection_starts_without() {
        let m = msg(QoS::AtMostOnce, b"hi");
        let mut s = online_v5(4);
        s.max_packet_size = 5;
        let mut batch = Batch::default();
        let mut enc = Encoded::new(&m, &mut batch);
        assert_eq!(
            s.deliver(&mut enc, QoS::AtMostOnce, &LIMITS),
            Delivery::Dropped
        );
        drop(enc);
        s.max_packet_size = u32::MAX;
        let (frames, _) = one_step(&m, &mut [&mut s], QoS::AtMostOnce);
        assert_eq!(&frames[0][..7], b"\x30\x0b\x00\x03a/b", "the topic, still");
        // A QoS 1 message in flight is sent again after a reconnect with its
        // topic and no alias (the new connection knows none).
        let m1 = msg(QoS::AtLeastOnce, b"x");
        let (frames, _) = one_step(&m1, &mut [&mut s], QoS::AtLeastOnce);
        assert_eq!(&frames[0][..4], b"\x32\x09\x00\x00", "aliased");
        s.detach();
        s.link = Some(test_link());
        s.server_aliases = ServerAliases::new(4, 16);
        s.reattach(&LIMITS);
        assert_eq!(written(&mut s), b"\x3a\x09\x00\x03a/b\x00\x01\x00x");
    }

    #[test]
    fn the_v5_clients_limits_bound_what_it_is_sent() {
        let m = msg(QoS::AtLeastOnce, b"payload");
        let mut batch = Batch::default();
        let mut enc = Encoded::new(&m, &mut batch);
        let mut s = online();
        s.version = Version::V5;
        s.receive_maximum = 1;
        assert_eq!(
            s.deliver(&mut enc, QoS::AtLeastOnce, &LIMITS),
            Delivery::Queued
        );
        assert_eq!(
            s.deliver(&mut enc, QoS::AtLeastOnce, &LIMITS),
            Delivery::Pending,
            "its Receive Maximum, not max_inflight (2)"
        );
        // The pending one turns out over its Maximum Packet Size: dropped
        // when it leaves the queue, counted by the sweep.
        s.max_packet_size = 10;
        assert!(s.on_puback(1, &LIMITS));
        assert_eq!(s.take_unreported_drops(), 1);
        assert_eq!(s.take_unreported_drops(), 0);
        assert_eq!(
            s.deliver(&mut enc, QoS::AtMostOnce, &LIMITS),
            Delivery::Dropped
        );
    }

    #[test]
    fn qos0_is_dropped_when_the_queue_is_full_and_skipped_offline() {
        let m = msg(QoS::AtMostOnce, b"x");
        let mut batch = Batch::default();
        let mut enc = Encoded::new(&m, &mut batch);
        let mut s = online();
        for _ in 0..3 {
            assert_eq!(
                s.deliver(&mut enc, QoS::AtMostOnce, &LIMITS),
                Delivery::Queued
            );
        }
        assert_eq!(
            s.deliver(&mut enc, QoS::AtMostOnce, &LIMITS),
            Delivery::Dropped
        );
        s.detach();
        assert_eq!(
            s.deliver(&mut enc, QoS::AtMostOnce, &LIMITS),
            Delivery::Skipped
        );
    }

    #[test]
    fn qos_is_downgraded_to_the_granted_qos() {
        let m = msg(QoS::ExactlyOnce, b"x");
        let mut batch = Batch::default();
        let mut enc = Encoded::new(&m, &mut batch);
        let mut s = online();
        s.deliver(&mut enc, QoS::AtLeastOnce, &LIMITS);
        assert_eq!(s.flows().inflight[0].phase, Phase::AwaitPubAck);
        assert_eq!(sealed(&mut enc, &mut s), b"\x32\x08\x00\x03a/b\x00\x01x");
    }

    #[test]
    fn qos1_flow_window_and_pending() {
        let m = msg(QoS::AtLeastOnce, b"x");
        let mut batch = Batch::default();
        let mut enc = Encoded::new(&m, &mut batch);
        let mut s = online();
        assert_eq!(
            s.deliver(&mut enc, QoS::AtLeastOnce, &LIMITS),
            Delivery::Queued
        );
        assert_eq!(
            s.deliver(&mut enc, QoS::AtLeastOnce, &LIMITS),
            Delivery::Queued
        );
        assert_eq!(
            s.deliver(&mut enc, QoS::AtLeastOnce, &LIMITS),
            Delivery::Pending
        );
        sealed(&mut enc, &mut s);
        assert!(!s.on_puback(7, &LIMITS), "unknown id is ignored");
        assert!(s.on_puback(1, &LIMITS));
        // The pending message took the free slot with a new packet id.
        assert_eq!(written(&mut s), b"\x32\x08\x00\x03a/b\x00\x03x");
        assert!(s.on_puback(2, &LIMITS));
        assert!(s.on_puback(3, &LIMITS));
        assert!(s.flows().inflight.is_empty() && s.flows().pending.is_empty());
        assert_eq!(s.flows().pending_bytes, 0);
    }

    /// Limits with a window of `window` and room for 1,000 pending.
    fn window_of(window: usize) -> Limits {
        Limits {
            max_inflight: window,
            max_queued_messages: 1000,
            ..LIMITS
        }
    }

    /// Offers `n` QoS 1 messages (payloads "0", "1", ...) to `s`, one step
    /// each, and drains what they queued.
    fn offer(s: &mut Session, n: usize, limits: &Limits) {
        const DIGITS: [&[u8]; 10] = [b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9"];
        for i in 0..n {
            let m = msg(QoS::AtLeastOnce, DIGITS[i % 10]);
            let mut batch = Batch::default();
            let mut enc = Encoded::new(&m, &mut batch);
            s.deliver(&mut enc, QoS::AtLeastOnce, limits);
            sealed(&mut enc, s);
        }
    }

    /// The packet ids in flight, oldest first.
    fn inflight_ids(s: &mut Session) -> Vec<PacketId> {
        s.flows().inflight.iter().map(|f| f.packet_id).collect()
    }

    #[test]
    fn a_full_window_is_refilled_only_once_a_quarter_of_it_is_free() {
        let limits = window_of(100);
        let mut s = online();
        offer(&mut s, 150, &limits);
        assert_eq!(s.inflight_len(), 100);
        assert_eq!(s.flows().pending.len(), 50);
        // 24 PUBACKs free 24 slots: nothing is sent yet.
        for id in 1..=24 {
            assert!(s.on_puback(id, &limits));
            assert!(s.out.is_empty(), "no refill after PUBACK {id}");
        }
        assert_eq!(s.inflight_len(), 76);
        // The 25th frees a quarter: 25 PUBLISH packets go in one write.
        assert!(s.on_puback(25, &limits));
        assert_eq!(s.inflight_len(), 100);
        assert_eq!(s.flows().pending.len(), 25);
        let bytes = written(&mut s);
        assert_eq!(bytes.len(), 25 * 10, "25 PUBLISH packets of 10 bytes");
        // In order: the oldest pending message ("0" of the second hundred)
        // first, with the next packet ids (101...).
        assert_eq!(&bytes[..10], b"\x32\x08\x00\x03a/b\x00\x650");
        assert_eq!(&bytes[240..], b"\x32\x08\x00\x03a/b\x00\x7d4");
        assert_eq!(
            inflight_ids(&mut s)[75..],
            (101..=125).collect::<Vec<_>>()[..]
        );
    }

    #[test]
    fn a_message_offered_while_a_refill_waits_queues_behind_the_pending_ones() {
        let limits = window_of(8);
        let mut s = online();
        offer(&mut s, 9, &limits);
        assert!(s.on_puback(1, &limits));
        // 1 of 8 free (under a quarter): the new message must not overtake
        // the pending one.
        offer(&mut s, 1, &limits);
        assert!(s.out.is_empty());
        assert_eq!(s.flows().pending.len(), 2);
        assert!(s.on_puback(2, &limits));
        assert_eq!(written(&mut s).len(), 2 * 10);
        let payloads: Vec<u8> = s
            .flows()
            .inflight
            .iter()
            .map(|f| f.message.payload[0])
            .collect();
        assert_eq!(payloads, b"23456780");
    }

    #[test]
    fn a_window_under_eight_is_refilled_at_each_acknowledgement() {
        for window in 1..MIN_BATCHED_WINDOW {
            let limits = window_of(window);
            let mut s = online();
            offer(&mut s, window + 3, &limits);
            for id in 1..=3 {
                assert!(s.on_puback(id as PacketId, &limits));
                assert_eq!(s.inflight_len(), window, "window {window}, PUBACK {id}");
                assert_eq!(written(&mut s).len(), 10, "one PUBLISH per PUBACK");
            }
        }
    }

    #[test]
    fn a_batched_refill_never_exceeds_the_receive_maximum() {
        // max_inflight_messages 100, the client's Receive Maximum 12: the
        // window is 12 and its quarter 3.
        let limits = window_of(100);
        let mut s = online();
        s.version = Version::V5;
        s.receive_maximum = 12;
        offer(&mut s, 40, &limits);
        let mut acked = 0;
        let mut most = 0;
        let mut id: PacketId = 1;
        while acked < 40 {
            assert!(s.on_puback(id, &limits), "PUBACK {id}");
            acked += 1;
            id += 1;
            written(&mut s);
            most = most.max(s.inflight_len());
            assert!(s.inflight_len() <= 12);
            // Until the pending queue is empty, the window never falls
            // below three quarters.
            if !s.flows().pending.is_empty() {
                assert!(s.inflight_len() > 12 - 3, "{} in flight", s.inflight_len());
            }
        }
        assert_eq!(most, 12);
        assert!(s.flows().inflight.is_empty() && s.flows().pending.is_empty());
    }

    #[test]
    fn qos2_completions_refill_in_batches_too() {
        let limits = window_of(8);
        let mut s = online();
        let m = msg(QoS::ExactlyOnce, b"x");
        for _ in 0..12 {
            let mut batch = Batch::default();
            let mut enc = Encoded::new(&m, &mut batch);
            s.deliver(&mut enc, QoS::ExactlyOnce, &limits);
            sealed(&mut enc, &mut s);
        }
        assert_eq!((s.inflight_len(), s.flows().pending.len()), (8, 4));
        for id in 1..=2 {
            assert!(s.on_pubrec(id));
            assert_eq!(written(&mut s), codec::pubrel(id), "PUBREL at once");
        }
        assert!(s.on_pubcomp(1, &limits));
        assert!(s.out.is_empty(), "1 of 8 free: no refill");
        assert!(s.on_pubcomp(2, &limits));
        assert_eq!(s.inflight_len(), 8);
        assert_eq!(written(&mut s).len(), 2 * 10, "two PUBLISH packets at once");
    }

    #[test]
    fn a_qos1_burst_to_sessions_in_step_is_one_queue_entry_each() {
        let (m1, m2) = (msg(QoS::AtLeastOnce, b"1"), msg(QoS::AtLeastOnce, b"2"));
        let (mut a, mut b) = (online(), online());
        let mut batch = Batch::default();
        for m in [&m1, &m2] {
            let mut enc = Encoded::new(m, &mut batch);
            for s in [&mut a, &mut b] {
                assert_eq!(
                    s.deliver(&mut enc, QoS::AtLeastOnce, &LIMITS),
                    Delivery::Queued
                );
            }
        }
        let (chunk, bases) = batch.seal();
        for s in [&mut a, &mut b] {
            s.out.seal(&chunk, &bases);
            // Both packets back to back in the batch: one entry, one iovec.
            assert_eq!(s.out.entries(), 1);
            assert_eq!(
                written(s),
                b"\x32\x08\x00\x03a/b\x00\x011\x32\x08\x00\x03a/b\x00\x022"
            );
        }
    }

    #[test]
    fn sessions_that_take_a_pending_message_under_the_same_id_share_its_frame() {
        publish_cache::clear();
        let (m1, m2, m3) = (
            msg(QoS::AtLeastOnce, b"1"),
            msg(QoS::AtLeastOnce, b"2"),
            msg(QoS::AtLeastOnce, b"3"),
        );
        let (mut a, mut b, mut c) = (online(), online(), online());
        // Id 1 is in flight to `c` from an earlier connection: its ids run
        // one ahead of the others'.
        c.flows().free_ids.reserve(1);
        let mut batch = Batch::default();
        for m in [&m1, &m2, &m3] {
            let mut enc = Encoded::new(m, &mut batch);
            for s in [&mut a, &mut b, &mut c] {
                s.deliver(&mut enc, QoS::AtLeastOnce, &LIMITS);
            }
        }
        let (chunk, bases) = batch.seal();
        for s in [&mut a, &mut b] {
            s.out.seal(&chunk, &bases);
            assert_eq!(s.flows().pending.len(), 1, "window of 2: m3 waits");
            assert_eq!(
                written(s),
                b"\x32\x08\x00\x03a/b\x00\x011\x32\x08\x00\x03a/b\x00\x022"
            );
        }
        c.out.seal(&chunk, &bases);
        written(&mut c);
        // Out of order: `b` acknowledges its second message first.
        assert!(a.on_puback(1, &LIMITS));
        assert!(b.on_puback(2, &LIMITS));
        assert!(c.on_puback(2, &LIMITS));
        let (fa, fb, fc) = (
            a.out.front_chunk(),
            b.out.front_chunk(),
            c.out.front_chunk(),
        );
        let whole = b"\x32\x08\x00\x03a/b\x00\x033";
        assert_eq!(fa, Some(&whole[..]));
        assert_eq!(
            fa.map(<[u8]>::as_ptr),
            fb.map(<[u8]>::as_ptr),
            "m3 under id 3: one frame for both"
        );
        assert_eq!(fc, Some(&b"\x32\x08\x00\x03a/b\x00\x043"[..]));
        // Each session's id 3 (c's 4) is in flight until its PUBACK; a's
        // freed id 1 is not handed out again in this lap.
        assert_eq!(written(&mut a), whole);
        assert_eq!(written(&mut b), whole);
        assert!(!a.on_puback(1, &LIMITS), "already acknowledged");
        assert!(a.on_puback(3, &LIMITS) && a.on_puback(2, &LIMITS));
        assert!(a.flows().inflight.is_empty());
        let mut enc = Encoded::new(&m1, &mut batch);
        a.deliver(&mut enc, QoS::AtLeastOnce, &LIMITS);
        drop(enc);
        let (chunk, bases) = batch.seal();
        a.out.seal(&chunk, &bases);
        assert_eq!(written(&mut a), b"\x32\x08\x00\x03a/b\x00\x041");
    }

    #[test]
    fn pending_is_bounded() {
        let m = msg(QoS::AtLeastOnce, b"x");
        let mut batch = Batch::default();
        let mut enc = Encoded::new(&m, &mut batch);
        let mut s = online();
        s.detach();
        for _ in 0..3 {
            assert_eq!(
                s.deliver(&mut enc, QoS::AtLeastOnce, &LIMITS),
                Delivery::Pending
            );
        }
        assert_eq!(
            s.deliver(&mut enc, QoS::AtLeastOnce, &LIMITS),
            Delivery::Dropped
        );
    }

    #[test]
    fn qos2_outgoing_flow() {
        let m = msg(QoS::ExactlyOnce, b"x");
        let mut batch = Batch::default();
        let mut enc = Encoded::new(&m, &mut batch);
        let mut s = online();
        s.deliver(&mut enc, QoS::ExactlyOnce, &LIMITS);
        sealed(&mut enc, &mut s);
        assert!(
            !s.on_pubcomp(1, &LIMITS),
            "PUBCOMP before PUBREC is ignored"
        );
        assert!(s.on_pubrec(1));
        assert_eq!(written(&mut s), codec::pubrel(1).to_vec());
        assert_eq!(s.flows().inflight[0].phase, Phase::AwaitPubComp);
        assert!(s.on_pubcomp(1, &LIMITS));
        assert!(s.flows().inflight.is_empty());
    }

    #[test]
    fn qos2_incoming_is_delivered_once_until_released() {
        let mut s = online();
        assert_eq!(s.on_publish_qos2(5, &LIMITS), Qos2Receipt::New);
        assert_eq!(s.on_publish_qos2(5, &LIMITS), Qos2Receipt::Duplicate);
        assert_eq!(s.on_publish_qos2(6, &LIMITS), Qos2Receipt::New);
        assert_eq!(s.on_publish_qos2(7, &LIMITS), Qos2Receipt::Refused);
        assert!(s.release(5), "PUBREL releases it");
        assert!(!s.release(5), "once");
        assert_eq!(s.on_publish_qos2(5, &LIMITS), Qos2Receipt::New);
    }

    #[test]
    fn reattach_redelivers_with_dup_and_pubrel() {
        let m = msg(QoS::ExactlyOnce, b"x");
        let mut batch = Batch::default();
        let mut enc = Encoded::new(&m, &mut batch);
        let mut s = online();
        s.deliver(&mut enc, QoS::ExactlyOnce, &LIMITS);
        s.deliver(&mut enc, QoS::ExactlyOnce, &LIMITS);
        written(&mut s);
        s.on_pubrec(1);
        s.detach();
        s.deliver(&mut enc, QoS::AtLeastOnce, &LIMITS); // pending while offline
        s.link = Some(test_link());
        s.reattach(&LIMITS);
        let mut expected = codec::pubrel(1).to_vec();
        expected.extend_from_slice(b"\x3c\x08\x00\x03a/b\x00\x02x"); // DUP, QoS 2
        assert_eq!(written(&mut s), expected);
        // The pending message waits: the window (2) is full.
        assert_eq!(s.flows().pending.len(), 1);
        s.on_pubcomp(1, &LIMITS);
        assert_eq!(written(&mut s), b"\x32\x08\x00\x03a/b\x00\x03x");
    }

    /// An online MQTT 5.0 session subscribed to `$share/g/a/+` at `qos`
    /// with Subscription Identifier 9, and to `a/plain` at QoS 1.
    fn member_of_a_share(qos: QoS) -> Session {
        let mut s = online();
        s.version = Version::V5;
        let share = SharedFilter::from("$share/g/a/+");
        s.subscribe(share.clone(), qos);
        let options = SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: crate::protocol::v5::RetainHandling::SendAtSubscribe,
        };
        s.set_subscription_options(share, &options, NonZeroU32::new(9));
        s.subscribe(SharedFilter::from("a/plain"), QoS::AtLeastOnce);
        s
    }

    #[test]
    fn the_shared_backlog_is_what_only_a_share_matched_and_the_client_has_not_taken() {
        let mut s = member_of_a_share(QoS::ExactlyOnce);
        let mut batch = Batch::default();
        let on = |topic: &'static str, payload| Message {
            topic: ByteString::from_static(topic),
            ..msg(QoS::ExactlyOnce, payload)
        };
        // 1: PUBREC came (the client owns it); 2: awaiting PUBREC; 3 and 4
        // pending (the window of 2 is full); "a/plain" matches the plain
        // subscription too: it may be that one's copy.
        let limits = Limits {
            max_inflight: 2,
            ..LIMITS
        };
        for (topic, payload) in [
            ("a/b", b"1"),
            ("a/b", b"2"),
            ("a/b", b"3"),
            ("a/plain", b"4"),
        ] {
            let m = on(topic, payload);
            let mut enc = Encoded::new(&m, &mut batch);
            let got = s.deliver_shared(&mut enc, "$share/g/a/+", QoS::ExactlyOnce, &limits);
            assert_ne!(got, Delivery::Dropped);
        }
        assert!(s.on_pubrec(1));
        let backlog = s.state.shared_backlog();
        let payloads: Vec<&[u8]> = backlog.iter().map(|(_, m)| &m.payload[..]).collect();
        assert_eq!(payloads, [b"2", b"3"]);
        for (filter, m) in &backlog {
            assert_eq!(&**filter, "$share/g/a/+");
            assert!(m.properties.is_none(), "identifier 9 taken off: {m:?}");
        }
    }

    #[test]
    fn unsubscribing_a_share_takes_out_the_pending_messages_only_it_matched() {
        let mut s = member_of_a_share(QoS::AtLeastOnce);
        s.subscribe(SharedFilter::from("$share/h/a/other"), QoS::AtLeastOnce);
        let mut batch = Batch::default();
        // 1 in flight (the window of 1 is full), the rest pending; the
        // stored ids of persistence go with them.
        let limits = Limits {
            max_inflight: 1,
            max_queued_messages: 10,
            ..LIMITS
        };
        let messages = [
            ("a/b", b"1"),
            ("a/b", b"2"),
            ("a/plain", b"3"),
            ("a/other", b"4"),
            ("a/b", b"5"),
        ];
        for (topic, payload) in messages {
            let m = Message {
                topic: ByteString::from_static(topic),
                ..msg(QoS::AtLeastOnce, payload)
            };
            let mut enc = Encoded::new(&m, &mut batch);
            let got = s.deliver_shared(&mut enc, "$share/g/a/+", QoS::AtLeastOnce, &limits);
            assert_ne!(got, Delivery::Dropped);
        }
        s.flows().pending_stored = VecDeque::from([12, 13, 14, 15]);
        assert!(s.unsubscribe("$share/g/a/+"));
        let taken = s.state.take_shared_pending("$share/g/a/+");
        let payloads: Vec<&[u8]> = taken.iter().map(|m| &m.payload[..]).collect();
        // "a/plain" and "a/other" match other subscriptions: they may be
        // their copies, so they stay.
        assert_eq!(payloads, [b"2", b"5"]);
        assert!(
            taken.iter().all(|m| m.properties.is_none()),
            "identifier 9 taken off"
        );
        let flows = s.flows();
        let left: Vec<&[u8]> = flows.pending.iter().map(|m| &m.payload[..]).collect();
        assert_eq!(left, [b"3", b"4"]);
        assert_eq!(flows.pending_stored, [13, 14], "each id with its message");
        let bytes: usize = flows.pending.iter().map(Message::wire_len).sum();
        assert_eq!(flows.pending_bytes, bytes);
        assert_eq!(flows.inflight.len(), 1, "the one in flight completes here");
        assert!(s.state.take_shared_pending("$share/g/a/+").is_empty());
        assert!(
            s.state.take_shared_pending("a/plain").is_empty(),
            "not a share"
        );
    }

    #[test]
    fn a_shared_copy_carries_its_own_identifier_and_retain_as_published() {
        let m = msg(QoS::AtLeastOnce, b"x");
        let mut s = online();
        s.version = Version::V5;
        let options = |retain_as_published| SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: false,
            retain_as_published,
            retain_handling: crate::protocol::v5::RetainHandling::SendAtSubscribe,
        };
        let plain = SharedFilter::from("a/#");
        let share = SharedFilter::from("$share/g/a/b");
        s.subscribe(plain.clone(), QoS::AtLeastOnce);
        s.set_subscription_options(plain, &options(false), NonZeroU32::new(3));
        s.subscribe(share.clone(), QoS::AtLeastOnce);
        s.set_subscription_options(share, &options(true), NonZeroU32::new(9));
        let mut batch = Batch::default();
        let mut enc = Encoded::new(&m, &mut batch);
        // The group's copy: identifier 9 alone, RETAIN kept.
        let shared = s.deliver_shared(&mut enc, "$share/g/a/b", QoS::AtLeastOnce, &LIMITS);
        assert_eq!(shared, Delivery::Queued);
        assert_eq!(
            sealed(&mut enc, &mut s),
            b"\x33\x0b\x00\x03a/b\x00\x01\x02\x0b\x09x"
        );
        // The non-shared copy: identifier 3 alone, RETAIN cleared.
        assert_eq!(
            s.deliver_v5(&mut enc, 1, QoS::AtLeastOnce, &LIMITS),
            Delivery::Queued
        );
        assert_eq!(
            sealed(&mut enc, &mut s),
            b"\x32\x0b\x00\x03a/b\x00\x02\x02\x0b\x03x"
        );
        // A 3.1.1 connection of the same session: no properties, RETAIN
        // cleared (packet id 3: 2 is still in flight).
        s.version = Version::V3;
        s.on_puback(1, &LIMITS);
        let v3 = s.deliver_shared(&mut enc, "$share/g/a/b", QoS::AtLeastOnce, &LIMITS);
        assert_eq!(v3, Delivery::Queued);
        assert_eq!(sealed(&mut enc, &mut s), b"\x32\x08\x00\x03a/b\x00\x03x");
    }

    #[test]
    fn retained_delivery_sets_retain() {
        let m = msg(QoS::AtLeastOnce, b"x");
        let mut s = online();
        s.deliver_retained(&m, QoS::AtMostOnce, &[], &LIMITS);
        assert_eq!(written(&mut s), b"\x31\x06\x00\x03a/bx");
        s.deliver_retained(&m, QoS::ExactlyOnce, &[], &LIMITS);
        assert_eq!(written(&mut s), b"\x33\x08\x00\x03a/b\x00\x01x");
    }

    #[test]
    fn packet_ids_skip_ids_in_flight_and_wrap_after_65535() {
        let mut s = online();
        let limits = Limits {
            max_inflight: 3,
            ..LIMITS
        };
        s.flows().free_ids.reserve(2);
        let m = msg(QoS::AtLeastOnce, b"x");
        for _ in 0..2 {
            s.deliver_retained(&m, QoS::AtLeastOnce, &[], &limits);
        }
        let ids: Vec<PacketId> = s.flows().inflight.iter().map(|f| f.packet_id).collect();
        assert_eq!(ids, [1, 3], "2 is in flight from an earlier connection");
        // Acknowledged at once, 65,532 more: 1 and 3 are still in flight
        // when the counter wraps, so it skips them.
        for _ in 4..=u16::MAX {
            s.deliver_retained(&m, QoS::AtLeastOnce, &[], &limits);
            let id = s.flows().inflight.back().map(|f| f.packet_id);
            assert!(s.on_puback(id.unwrap_or(0), &limits));
        }
        s.deliver_retained(&m, QoS::AtLeastOnce, &[], &limits);
        let ids: Vec<PacketId> = s.flows().inflight.iter().map(|f| f.packet_id).collect();
        assert_eq!(ids, [1, 3, 2]);
    }

    #[test]
    fn subscriptions_replace_and_remove() {
        let mut s = online();
        let f = SharedFilter::from("a/+");
        assert!(s.subscribe(f.clone(), QoS::AtMostOnce));
        assert!(!s.subscribe(f.clone(), QoS::ExactlyOnce));
        assert_eq!(s.state.subscriptions[..], [(f.clone(), QoS::ExactlyOnce)]);
        assert!(s.unsubscribe("a/+"));
        assert!(!s.unsubscribe("a/+"));
    }

    #[test]
    fn one_subscription_is_inline_and_more_grow_by_a_quarter() {
        let mut s = online();
        assert!(s.subscribe(SharedFilter::from("a"), QoS::AtMostOnce));
        assert!(
            !s.state.subscriptions.spilled(),
            "one subscription: no heap"
        );
        for (n, f) in ["b", "c", "d", "e"].into_iter().enumerate() {
            assert!(s.subscribe(SharedFilter::from(f), QoS::AtLeastOnce));
            // Up to 4 entries, a quarter is less than one: one at a time.
            assert_eq!(s.state.subscriptions.capacity(), n + 2);
        }
        for f in ["b", "c", "d", "e"] {
            assert!(s.unsubscribe(f));
        }
        assert!(!s.state.subscriptions.spilled(), "back inline");
        assert_eq!(
            s.state.subscriptions[..],
            [(SharedFilter::from("a"), QoS::AtMostOnce)]
        );
        // The inline array costs 8 bytes over an empty `Vec`.
        assert_eq!(std::mem::size_of::<Subscriptions>(), 32);
    }
}
