//! The shard's side of persistent sessions (docs/design/persistence.md):
//! a persistent session's image goes into this shard's session journal
//! when it attaches, goes offline or changes its subscriptions, a drop when
//! it ends; at start the sessions loaded for this shard come back offline.
//!
//! An image is the whole session as the journal keeps it today (client id,
//! version, expiry, subscriptions with their options), stamped
//! (`store::record::next_stamp`): across every shard's log the highest
//! stamp of a client id wins, so a session that moved to another shard
//! (take-over) is found where it went. The offline queue and the messages
//! in flight are journalled too: a QoS 1/2 message a persistent session
//! queues is written once per shard (`Record::Message`) with the image
//! aliases of the sessions that took it (`Record::Queue`, 5 bytes a
//! subscriber; each image carries a fresh alias, `store::record::Alias`,
//! which the flow records name instead of its 8-byte stamp), and an
//! image lists what the session had not had acknowledged when it was
//! taken (at connect, disconnect and subscription changes). Its QoS 1/2
//! flows follow as small records (`store::flows`): sent with a packet id,
//! PUBREC'd, done, incoming QoS 2 ids awaiting PUBREL or released; after a
//! restart the messages in flight come back with their packet ids and
//! phase, and are resent with them on reconnect.

use std::num::NonZeroU32;
use std::time::Instant;

use bytestring::ByteString;

use crate::protocol::Version;
use crate::protocol::message::Message;
use crate::protocol::v5::{RetainHandling, SubscriptionOptions};
use crate::router::SharedFilter;
use crate::session::link::TICKS_PER_SEC;
use crate::session::{Inflight, Phase, SESSION_NEVER_EXPIRES, Session, SessionState};
use crate::shard::held_acks::APPLY_TIMEOUT;
use crate::shard::{SessionKey, Shard};
use crate::store::record::{
    FlowStep, Record, StoredMessage, StoredSession, StoredSubscription, next_alias, next_stamp,
    unix_ms_now,
};
use crate::store::{LoadedSession, flows};

/// QoS 1/2 messages `session` holds (in flight and pending): one more
/// after an offer means it took the message.
pub(super) fn queued_count(session: &Session) -> usize {
    session
        .state
        .flows
        .as_deref()
        .map_or(0, |f| f.inflight.len() + f.pending.len())
}

/// A journalled session (image alias `stamp`) just kept a message that is
/// journalled as `mid`: sent at once (the newest in flight, which then
/// carries `mid` and counts as journalled) goes into `sent`, queued (the
/// newest pending) into `refs`. True when it was sent at once at QoS 2:
/// its PUBLISH then waits for the record (`Shard::hold_out`).
pub(super) fn note_kept(
    session: &mut Session,
    stamp: crate::store::record::Alias,
    mid: u64,
    refs: &mut Vec<(crate::store::record::Alias, crate::protocol::v3::QoS)>,
    sent: &mut Vec<crate::store::record::SentRef>,
) -> bool {
    let Some(flows) = session.state.flows.as_deref_mut() else {
        return false;
    };
    if let Some(last) = flows.pending.back() {
        // Queued: the window was closed or others waited before it.
        refs.push((stamp, last.qos));
        // The first stored one: the older entries are not (0).
        let pending = flows.pending.len();
        flows.pending_stored.resize(pending, 0);
        if let Some(id) = flows.pending_stored.back_mut() {
            *id = mid;
        }
    } else if let Some(last) = flows.inflight.back_mut() {
        last.stored = mid;
        if !last.journalled {
            flows.unjournalled = flows.unjournalled.saturating_sub(1);
        }
        last.journalled = true;
        sent.push((stamp, last.packet_id, last.message.qos));
        return last.message.qos == crate::protocol::v3::QoS::ExactlyOnce;
    }
    false
}

/// The journalled sessions that keep one message being routed, gathered
/// as it is offered to each session ([`Keepers::offer`]) into the shard's
/// scratch lists (`persist_refs`, `persist_sent`, `persist_hold`): what
/// [`Shard::journal_queued`] then writes once, under the message's id
/// ([`Keepers::mid`]). Every way a QoS 1/2 message reaches a session goes
/// through one (a local publish, a batch from another shard, a shared
/// subscription's member, a message from another node), so a message a
/// journalled session keeps is always on its shard's disk.
pub(super) struct Keepers<'a> {
    /// The image alias of each journalled session (empty without
    /// persistence: one length test per offer).
    stamps: &'a ahash::AHashMap<SessionKey, crate::store::record::Alias>,
    /// The sessions that queued the message, with its QoS for each.
    refs: &'a mut Vec<(crate::store::record::Alias, crate::protocol::v3::QoS)>,
    /// The sessions that sent it at once, with packet id and QoS.
    sent: &'a mut Vec<crate::store::record::SentRef>,
    /// Those of them that sent it at QoS 2: their PUBLISH waits for the
    /// record (`Shard::hold_out`).
    hold: &'a mut Vec<SessionKey>,
    /// The message's id in the journal, taken at the first keeper.
    mid: Option<u64>,
}

impl<'a> Keepers<'a> {
    /// Gathers into the shard's scratch lists, which must be empty (the
    /// previous message's records took them).
    pub(super) fn new(
        stamps: &'a ahash::AHashMap<SessionKey, crate::store::record::Alias>,
        refs: &'a mut Vec<(crate::store::record::Alias, crate::protocol::v3::QoS)>,
        sent: &'a mut Vec<crate::store::record::SentRef>,
        hold: &'a mut Vec<SessionKey>,
    ) -> Keepers<'a> {
        Keepers {
            stamps,
            refs,
            sent,
            hold,
            mid: None,
        }
    }

    /// Offers the message to `session` (key `key`) through `deliver`, and
    /// notes the session when it is journalled and kept the message
    /// (one more QoS 1/2 message in flight or pending); `deliver`'s
    /// answer.
    pub(super) fn offer<R>(
        &mut self,
        session: &mut Session,
        key: SessionKey,
        deliver: impl FnOnce(&mut Session) -> R,
    ) -> R {
        let tracked = if self.stamps.is_empty() {
            None
        } else {
            self.stamps.get(&key).copied()
        };
        let Some(stamp) = tracked else {
            return deliver(session);
        };
        let before = queued_count(session);
        let answer = deliver(session);
        if queued_count(session) > before {
            let mid = *self.mid.get_or_insert_with(next_stamp);
            if note_kept(session, stamp, mid, self.refs, self.sent) {
                self.hold.push(key);
            }
        }
        answer
    }

    /// The message's id in the journal when a journalled session kept it
    /// (then [`Shard::journal_queued`] must write it); None: nothing to
    /// write.
    pub(super) fn mid(&self) -> Option<u64> {
        self.mid
    }
}

/// A persistent session's end (expired, or ended by a clean start) whose
/// drop record waits for the shards its shared backlog went to
/// ([`Shard::journal_drop_after`]).
#[derive(Debug)]
pub struct DropWaiting {
    /// The session's client id.
    client_id: ByteString,
    /// The drop's stamp, taken when the session ended.
    stamp: u64,
    /// The barrier of the deliveries to other shards
    /// (`HeldAcks::new_barrier`).
    token: u64,
    /// When the session ended: after [`APPLY_TIMEOUT`] the drop is
    /// written anyway.
    since: Instant,
    /// The claim (shard, token) whose clean start ended the session,
    /// answered once the drop is durable (its CONNACK waits for that).
    answer: Option<(usize, u64)>,
}

pub(super) fn stored_subscriptions(state: &SessionState) -> Vec<StoredSubscription> {
    let extras = state
        .flows
        .as_deref()
        .map(|f| f.subscription_options.as_slice())
        .unwrap_or_default();
    state
        .subscriptions
        .iter()
        .map(|(filter, qos)| {
            let extra = extras.iter().find(|e| e.filter == *filter);
            StoredSubscription {
                filter: ByteString::from(&**filter),
                qos: *qos,
                no_local: extra.is_some_and(|e| e.no_local),
                retain_as_published: extra.is_some_and(|e| e.retain_as_published),
                identifier: extra.and_then(|e| e.identifier).map_or(0, NonZeroU32::get),
            }
        })
        .collect()
}

/// Gives `session`'s subscription `filter` the MQTT 5.0 options `sub` was
/// stored with.
pub(super) fn set_stored_options(
    session: &mut Session,
    filter: SharedFilter,
    sub: &StoredSubscription,
) {
    let options = SubscriptionOptions {
        qos: sub.qos,
        no_local: sub.no_local,
        retain_as_published: sub.retain_as_published,
        retain_handling: RetainHandling::SendAtSubscribe,
    };
    session.set_subscription_options(filter, &options, NonZeroU32::new(sub.identifier));
}

impl Shard {
    /// Journals the image of session `key` if it is persistent (and
    /// persistence is on): first a message record for each QoS 1/2 message
    /// it has not had acknowledged, then the image naming them.
    pub fn journal_session(&mut self, key: SessionKey) {
        let Some(journal) = self.session_journal.clone() else {
            return;
        };
        let now = Instant::now();
        let unix_now = unix_ms_now();
        let store = |message: &Message| {
            let mid = next_stamp();
            journal.append(&Record::Message(
                mid,
                StoredMessage::of(message, now, unix_now),
            ));
            mid
        };
        let Some((image, tail, _)) = self.image_with_flows(key, store) else {
            return;
        };
        // The step's records so far name the session's older image.
        if let Some(step) = self.persist_step.take() {
            journal.append(&step);
        }
        self.persist_stamps.insert(key, image.alias);
        self.needed_lsns[1] = journal.append(&Record::SessionImage(image));
        for record in tail {
            self.needed_lsns[1] = journal.append(&record);
        }
        // What the connection is sent next waits for the image: the
        // CONNACK of a persistent session (its subscriptions and queue are
        // on disk before Session Present is promised), a SUBACK or UNSUBACK
        // (a granted subscription survives a crash right after it), QoS 2
        // packets resent at a reconnect (the records of their packet ids).
        // An offline session has no connection to hold.
        self.hold_out(key, self.needed_lsns[1]);
    }

    /// The image of persistent session `key` (None: no such session, or a
    /// clean one) and the records that follow it (its flows in flight and
    /// its incoming QoS 2 ids, [`flows::image_tail`]), each of its queued
    /// and in-flight messages written by `store`, which returns the id it
    /// wrote it under: the session's entries then carry that id (the
    /// records after this image name messages by it). True as the third
    /// when a QoS 2 message is in flight. Shared by the journal
    /// ([`Shard::journal_session`]) and the snapshots (shard/snapshot.rs).
    pub(super) fn image_with_flows(
        &mut self,
        key: SessionKey,
        mut store: impl FnMut(&Message) -> u64,
    ) -> Option<(StoredSession, Vec<Record>, bool)> {
        let session = self.sessions.get(key as usize)?;
        if session.clean_session {
            return None;
        }
        let mut image = self.image_of(session);
        image.alias = next_alias();
        let session = self.sessions.get_mut(key as usize)?;
        let mut inflight = Vec::new();
        let mut awaiting_rel: &[u16] = &[];
        if let Some(flows) = session.state.flows.as_deref_mut() {
            for f in &mut flows.inflight {
                f.stored = store(&f.message);
                image.queued.push((f.stored, f.message.qos));
                f.journalled = true;
                inflight.push((
                    f.stored,
                    f.packet_id,
                    f.message.qos,
                    f.phase == Phase::AwaitPubComp,
                ));
            }
            flows.unjournalled = 0;
            let pending = flows.pending.len();
            flows.pending_stored.resize(pending, 0);
            for (message, id) in flows.pending.iter().zip(flows.pending_stored.iter_mut()) {
                *id = store(message);
                image.queued.push((*id, message.qos));
            }
            awaiting_rel = &flows.awaiting_rel;
        }
        let qos2 = inflight
            .iter()
            .any(|f| f.2 == crate::protocol::v3::QoS::ExactlyOnce);
        let tail = flows::image_tail(image.alias, inflight, awaiting_rel);
        Some((image, tail, qos2))
    }

    /// Journals `message` once, as `mid`, and the sessions that just
    /// queued it (`persist_refs`) or sent it at once (`persist_sent`),
    /// gathered by `Shard::route` ([`note_kept`]).
    pub(super) fn journal_queued(&mut self, message: &Message, mid: u64) {
        let refs = std::mem::take(&mut self.persist_refs);
        let sent = std::mem::take(&mut self.persist_sent);
        let Some(journal) = &self.session_journal else {
            return;
        };
        // What the sessions did before this message comes before it (a
        // packet id acknowledged may go out again here; an acknowledgement
        // is on disk once a later publish's records are).
        if let Some(step) = self.persist_step.take() {
            journal.append(&step);
        }
        journal.append(&Record::Message(
            mid,
            StoredMessage::of(message, Instant::now(), unix_ms_now()),
        ));
        // The lists go back (emptied) after their records, so the next
        // message does not grow them again from nothing: one subscriber
        // costs its entry, not its share of the reallocations.
        if !refs.is_empty() {
            let record = Record::Queue(mid, refs);
            self.needed_lsns[1] = journal.append(&record);
            if let Record::Queue(_, mut refs) = record {
                refs.clear();
                self.persist_refs = refs;
            }
        }
        if !sent.is_empty() {
            let record = Record::Sent(mid, sent);
            let lsn = journal.append(&record);
            self.needed_lsns[1] = lsn;
            if let Record::Sent(_, mut sent) = record {
                sent.clear();
                self.persist_sent = sent;
            }
            for key in std::mem::take(&mut self.persist_hold) {
                self.hold_out(key, lsn);
            }
        }
    }

    /// Journals a step of a journalled session's QoS flows (an
    /// acknowledgement received or an incoming QoS 2 id seen or released),
    /// and the messages that went in flight since ([`Shard::journal_sent`]).
    /// An incoming id's record is what the PUBREC or PUBCOMP then waits for
    /// (`Shard::queue_ack` holds it until the journal is durable): else a
    /// restart would deliver a resent PUBLISH again, or drop the client's
    /// next message with a reused id as a duplicate.
    pub fn journal_step(&mut self, key: SessionKey, step: FlowStep, packet_id: u16) {
        let (Some(journal), Some(&stamp)) = (&self.session_journal, self.persist_stamps.get(&key))
        else {
            return;
        };
        if step == FlowStep::Done {
            // Nothing waits for it: one record for the step's (§4.2).
            self.persist_step.done(stamp, packet_id);
            self.journal_sent(key);
            return;
        }
        // After the step's records so far: one of them may have sent the
        // packet id this step is about.
        if let Some(step) = self.persist_step.take() {
            journal.append(&step);
        }
        let lsn = journal.append(&Record::Flow(step, stamp, packet_id));
        match step {
            FlowStep::AwaitRel | FlowStep::Released => self.needed_lsns[1] = lsn,
            // The PUBREL (queued) waits: a restart that lost the record would
            // resend the PUBLISH the client already released.
            FlowStep::PubRecd => self.hold_out(key, lsn),
            FlowStep::Done => {}
        }
        self.journal_sent(key);
    }

    /// Journals the acknowledgements and sends gathered since the last call
    /// as one ordered record (at the end of a step, and before any other
    /// flow record, so that a reused packet id is never ended by an older
    /// ack); the LSN after it (0: nothing written).
    pub fn journal_done(&mut self) -> u64 {
        match (&self.session_journal, self.persist_step.take()) {
            (Some(journal), Some(step)) => journal.append(&step),
            _ => 0,
        }
    }

    /// Gathers the packet ids of a journalled session's messages that went
    /// in flight without a record yet (from its pending queue after an
    /// acknowledgement or a reconnect, or a retained message at subscribe
    /// time, which is first stored itself) into the step's record
    /// ([`Shard::journal_done`]); a QoS 2 one is journalled at once, and
    /// its PUBLISH waits for it. Scans its window only while
    /// `Flows::unjournalled` says an entry there has no record yet.
    pub fn journal_sent(&mut self, key: SessionKey) {
        let Some(&stamp) = self.persist_stamps.get(&key) else {
            return;
        };
        // The count, not a walk of the window: most acknowledgements find
        // every message in flight journalled already.
        let unjournalled = self
            .sessions
            .get(key as usize)
            .and_then(|s| s.state.flows.as_deref())
            .is_some_and(|f| f.unjournalled > 0);
        if !unjournalled {
            return;
        }
        let Some(journal) = &self.session_journal else {
            return;
        };
        let Some(flows) = self
            .sessions
            .get_mut(key as usize)
            .and_then(|s| s.state.flows.as_deref_mut())
        else {
            return;
        };
        let mut qos2 = false;
        for f in flows.inflight.iter_mut().filter(|f| !f.journalled) {
            if f.stored == 0 {
                f.stored = next_stamp();
                journal.append(&Record::Message(
                    f.stored,
                    StoredMessage::of(&f.message, Instant::now(), unix_ms_now()),
                ));
            }
            f.journalled = true;
            let full = self
                .persist_step
                .sent(stamp, f.stored, f.packet_id, f.message.qos);
            if let Some(full) = full {
                journal.append(&full);
            }
            qos2 |= f.message.qos == crate::protocol::v3::QoS::ExactlyOnce;
        }
        flows.unjournalled = 0;
        if qos2 {
            let lsn = self.journal_done();
            self.hold_out(key, lsn);
        }
    }

    /// Journals that the persistent session of `client_id` ended here;
    /// the LSN a CONNACK that ended it must wait for (0: no journal).
    pub fn journal_drop(&mut self, client_id: &str) -> u64 {
        self.persist_wills.remove(client_id);
        self.append_drop(client_id, next_stamp())
    }

    /// Writes the drop record of `client_id` stamped `stamp`; its LSN (0:
    /// no journal).
    fn append_drop(&mut self, client_id: &str, stamp: u64) -> u64 {
        let Some(journal) = &self.session_journal else {
            return 0;
        };
        if let Some(step) = self.persist_step.take() {
            journal.append(&step);
        }
        let lsn = journal.append(&Record::SessionDrop(stamp, ByteString::from(client_id)));
        self.needed_lsns[1] = lsn;
        lsn
    }

    /// [`Shard::journal_drop`] of a session whose shared backlog went to
    /// members on other shards under barrier `handed`
    /// (`Shard::hand_over_shared_backlog`; None: at once): the record waits
    /// until every one of those shards journalled what it kept
    /// ([`Shard::journal_handed_over_drops`]), so that a `kill -9` before
    /// then finds the session, backlog and all, still on this shard's disk.
    /// Its stamp is taken now: a later image of the same client id (a new
    /// session) stays the newer one whenever the drop is written. With
    /// `answer`, the claim (shard, token) whose clean start ended the
    /// session is answered once the drop is durable
    /// ([`Shard::answer_claim_after`]).
    pub(super) fn journal_drop_after(
        &mut self,
        client_id: &str,
        handed: Option<u64>,
        answer: Option<(usize, u64)>,
    ) {
        let Some(token) = handed else {
            let lsn = self.journal_drop(client_id);
            if let Some((shard, claim)) = answer {
                self.answer_claim_after(lsn, shard, claim);
            }
            return;
        };
        self.persist_wills.remove(client_id);
        self.drops_waiting.push(DropWaiting {
            client_id: ByteString::from(client_id),
            stamp: next_stamp(),
            token,
            since: Instant::now(),
            answer,
        });
    }

    /// Writes the drop records of [`Shard::journal_drop_after`] whose
    /// shared backlog the other shards have journalled, and those that
    /// waited [`APPLY_TIMEOUT`] (a shard that does not answer in that time
    /// is stuck or gone: its share is lost to a `kill -9` then, as it
    /// would be without the wait). Called when a shard answers
    /// (`ShardMsg::SharedDurable`) and by the keep-alive sweep; true when
    /// it wrote one (a claim answer may wait in the outbox).
    pub fn journal_handed_over_drops(&mut self) -> bool {
        if self.drops_waiting.is_empty() {
            return false;
        }
        let before = self.drops_waiting.len();
        let now = Instant::now();
        for waiting in std::mem::take(&mut self.drops_waiting) {
            let passed = self.held_acks.passed(waiting.token);
            if !passed && now.duration_since(waiting.since) < APPLY_TIMEOUT {
                self.drops_waiting.push(waiting);
                continue;
            }
            if !passed {
                self.held_acks.forget(waiting.token);
                log::warn!(
                    "persistence: the shared messages of ended session {} were not journalled by their new members' shards in {APPLY_TIMEOUT:?}; its end is written anyway",
                    waiting.client_id
                );
            }
            let lsn = self.append_drop(&waiting.client_id, waiting.stamp);
            if let Some((shard, claim)) = waiting.answer {
                self.answer_claim_after(lsn, shard, claim);
            }
        }
        self.drops_waiting.len() < before
    }

    /// `session` as stored now, without its queue.
    pub(super) fn image_of(&self, session: &Session) -> StoredSession {
        let offline_since_unix_ms = if session.is_online() {
            0
        } else {
            let ticks = self.now_ticks().saturating_sub(session.offline_since);
            unix_ms_now().saturating_sub(u64::from(ticks) * 1000 / u64::from(TICKS_PER_SEC))
        };
        let subscriptions = stored_subscriptions(&session.state);
        StoredSession {
            stamp: next_stamp(),
            client_id: ByteString::from(&*session.client_id),
            protocol_level: if session.version == Version::V5 { 5 } else { 4 },
            expiry_interval: session.session_expiry,
            offline_since_unix_ms,
            subscriptions,
            queued: Vec::new(),
            alias: 0,
        }
    }

    /// Brings back the persistent sessions loaded for this shard (before
    /// its journal is attached: the start-up compaction already wrote
    /// them), offline, with their subscriptions, their queued messages (in
    /// the pending queue: resent with new packet ids) and what is left of
    /// their expiry. Returns how many sessions and messages.
    pub fn restore_sessions(
        &mut self,
        stored: &[LoadedSession],
        now_unix_ms: u64,
    ) -> (usize, usize) {
        let now = self.now_ticks();
        let started = Instant::now();
        let mut messages = 0;
        for loaded in stored {
            let s = &loaded.session;
            if self.session_key(&s.client_id).is_some() {
                continue;
            }
            let mut session = Session::new(s.client_id.clone(), false, SessionState::default());
            session.version = if s.protocol_level == 5 {
                Version::V5
            } else {
                Version::V3
            };
            session.session_expiry = if s.expiry_interval == SESSION_NEVER_EXPIRES {
                SESSION_NEVER_EXPIRES
            } else {
                let gone = now_unix_ms.saturating_sub(s.offline_since_unix_ms) / 1000;
                s.expiry_interval
                    .saturating_sub(u32::try_from(gone).unwrap_or(u32::MAX))
                    .max(1)
            };
            session.offline_since = now;
            for sub in &s.subscriptions {
                session.subscribe(SharedFilter::from(&*sub.filter), sub.qos);
            }
            if !loaded.queued.is_empty() {
                let flows = session.state.flows.get_or_insert_with(Box::default);
                for (mid, stored, qos) in &loaded.queued {
                    let Some(mut message) = stored.to_message(0, started, now_unix_ms) else {
                        continue;
                    };
                    message.qos = *qos;
                    message.retain = false;
                    flows.pending_bytes += message.wire_len();
                    flows.pending.push_back(message);
                    flows.pending_stored.push_back(*mid);
                    messages += 1;
                }
            }
            messages += restore_flows(&mut session, &loaded.flows, started, true);
            if let Some(will) = &loaded.will {
                super::persist_will::restore_will(&mut session, will, now, now_unix_ms, started);
                self.persist_wills
                    .insert(will.client_id.clone(), Record::Will(will.clone()));
            }
            let key = self.insert_session(session);
            self.persist_stamps.insert(key, s.alias);
            let Some(session) = self.sessions.get_mut(key as usize) else {
                continue;
            };
            let filters: Vec<_> = session
                .state
                .subscriptions
                .iter()
                .map(|(f, _)| f.clone())
                .collect();
            for (sub, filter) in s.subscriptions.iter().zip(filters) {
                set_stored_options(session, filter, sub);
            }
        }
        (stored.len(), messages)
    }
}

/// Puts a loaded session's outgoing messages in flight back with their
/// packet ids and phase (resent with DUP, or PUBREL, when it reconnects:
/// `Session::reattach`) and its incoming QoS 2 ids awaiting PUBREL.
/// Returns how many messages are in flight. A message past its expiry
/// still completes its flow: the client may hold its packet id.
/// `journalled`: the message ids are this shard's journal's (a restart);
/// else (a session image from another node) they mean nothing here, and
/// each entry is journalled anew if the session is kept
/// (`Flows::unjournalled`).
pub(super) fn restore_flows(
    session: &mut Session,
    loaded: &flows::LoadedFlows,
    now: Instant,
    journalled: bool,
) -> usize {
    if loaded.inflight.is_empty() && loaded.awaiting_rel.is_empty() {
        return 0;
    }
    let flows = session.state.flows.get_or_insert_with(Box::default);
    for f in &loaded.inflight {
        let mut stored = f.message.clone();
        stored.expires_unix_ms = 0;
        let Some(mut message) = stored.to_message(0, now, unix_ms_now()) else {
            continue;
        };
        message.qos = f.qos;
        message.retain = false;
        let phase = match (f.qos, f.pubrecd) {
            (crate::protocol::v3::QoS::ExactlyOnce, true) => Phase::AwaitPubComp,
            (crate::protocol::v3::QoS::ExactlyOnce, false) => Phase::AwaitPubRec,
            _ => Phase::AwaitPubAck,
        };
        flows.free_ids.reserve(f.packet_id);
        flows.inflight.push_back(Inflight {
            packet_id: f.packet_id,
            message,
            phase,
            stored: if journalled { f.mid } else { 0 },
            journalled,
        });
        if !journalled {
            flows.unjournalled = flows.unjournalled.saturating_add(1);
        }
    }
    flows.awaiting_rel.extend(&loaded.awaiting_rel);
    loaded.inflight.len()
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config::{Config, SyncMode};
    use crate::protocol::v3::QoS;
    use crate::shard::testing;
    use crate::store::journal::Journal;

    #[test]
    fn restored_sessions_keep_subscriptions_options_and_the_rest_of_their_expiry() {
        let mut shard = testing::shard_with(0, 1, Config::default());
        let now = 10_000_000;
        let queued_message = |payload: &'static [u8], expires_unix_ms| StoredMessage {
            qos: QoS::ExactlyOnce,
            retain: true,
            expires_unix_ms,
            topic: ByteString::from("a/b"),
            properties: Default::default(),
            payload: bytes::Bytes::from_static(payload),
        };
        let stored = vec![LoadedSession {
            session: StoredSession {
                stamp: 1,
                alias: 1,
                client_id: ByteString::from("back"),
                protocol_level: 5,
                expiry_interval: 100,
                offline_since_unix_ms: now - 40_000,
                subscriptions: vec![StoredSubscription {
                    filter: ByteString::from("a/+"),
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: false,
                    identifier: 9,
                }],
                queued: Vec::new(),
            },
            queued: vec![
                (10, queued_message(b"one", 0), QoS::AtLeastOnce),
                (11, queued_message(b"expired", now - 1), QoS::AtLeastOnce),
                (12, queued_message(b"two", now + 60_000), QoS::ExactlyOnce),
            ],
            flows: Default::default(),
            will: None,
        }];
        assert_eq!(shard.restore_sessions(&stored, now), (1, 2));
        assert_eq!(shard.persist_stamps.len(), 1, "its image stamp is known");
        let key = shard.session_key("back").expect("restored");
        let session = &shard.sessions[key as usize];
        assert!(!session.is_online() && !session.clean_session);
        assert_eq!(session.version, Version::V5);
        assert_eq!(
            session.session_expiry, 60,
            "100 s less the 40 s it was offline"
        );
        assert_eq!(shard.router.len(), 1);
        let pending: Vec<_> = session
            .state
            .flows
            .as_ref()
            .map(|f| {
                f.pending
                    .iter()
                    .map(|m| (m.payload.clone(), m.qos, m.retain))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            pending,
            vec![
                (bytes::Bytes::from_static(b"one"), QoS::AtLeastOnce, false),
                (bytes::Bytes::from_static(b"two"), QoS::ExactlyOnce, false)
            ],
            "queued in order, at their QoS, RETAIN cleared, the expired one left out"
        );
        // Its image says the same (the stamp aside).
        let image = shard.image_of(&shard.sessions[key as usize]);
        assert_eq!(image.subscriptions, stored[0].session.subscriptions);
        assert_eq!(image.expiry_interval, 60);
    }

    #[test]
    fn only_persistent_sessions_are_journalled() {
        let mut shard = testing::shard_with(0, 1, Config::default());
        let dir = tempfile::tempdir().unwrap();
        let journal = Rc::new(Journal::new(
            dir.path(),
            0,
            1,
            0,
            SyncMode::Ack,
            Duration::from_secs(1),
            Vec::new(),
            Arc::default(),
        ));
        shard.session_journal = Some(journal.clone());
        let clean = testing::attach(&mut shard, "clean", "t", QoS::AtLeastOnce);
        let before = journal.end_lsn();
        shard.journal_session(clean);
        assert_eq!(
            journal.end_lsn(),
            before,
            "a clean session is never written"
        );
        shard.sessions[clean as usize].clean_session = false;
        shard.journal_session(clean);
        assert!(journal.end_lsn() > before);
    }

    /// A shard with a session journal (never written: the test reads what
    /// is pending) and an online persistent session subscribed to "t".
    fn journalled_shard() -> (Shard, Rc<Journal>, SessionKey, crate::store::record::Alias) {
        let mut shard = testing::shard_with(0, 1, Config::default());
        let journal = testing::unwritten_journal(&mut shard);
        let key = testing::attach(&mut shard, "kept", "t", QoS::ExactlyOnce);
        shard.sessions[key as usize].clean_session = false;
        shard.journal_session(key);
        let stamp = shard.persist_stamps[&key];
        (shard, journal, key, stamp)
    }

    /// The flows that replaying `records` gives the session with image
    /// alias `stamp`, as the
    /// loader does: (mid, packet id, QoS, PUBREC'd) in flight, then the
    /// incoming ids awaiting PUBREL.
    fn replayed(
        records: &[Record],
        stamp: crate::store::record::Alias,
    ) -> (Vec<(u16, QoS, bool)>, Vec<u16>) {
        let mut messages = ahash::AHashMap::new();
        let mut events = Vec::new();
        for record in records {
            match record {
                Record::Message(mid, m) => {
                    messages.insert(*mid, m.clone());
                }
                Record::Sent(mid, refs) => events.extend(
                    refs.iter()
                        .filter(|r| r.0 == stamp)
                        .map(|r| flows::FlowEvent::Sent(*mid, r.1, r.2)),
                ),
                Record::Flow(step, s, id) if *s == stamp => {
                    events.push(flows::FlowEvent::Step(*step, *id))
                }
                Record::DoneMany(done) => events.extend(
                    done.iter()
                        .filter(|d| d.0 == stamp)
                        .map(|d| flows::FlowEvent::Step(FlowStep::Done, d.1)),
                ),
                Record::Steps(messages, entries) => events.extend(
                    flows::steps_events(messages, entries)
                        .filter(|e| e.0 == stamp)
                        .map(|e| e.1),
                ),
                _ => {}
            }
        }
        let (_, loaded) = flows::replay(&[], &events, |mid| messages.get(&mid));
        (
            loaded
                .inflight
                .iter()
                .map(|f| (f.packet_id, f.qos, f.pubrecd))
                .collect(),
            loaded.awaiting_rel,
        )
    }

    #[test]
    fn a_publish_sent_at_once_its_pubrec_its_ack_and_incoming_ids_are_journalled() {
        let (mut shard, journal, key, stamp) = journalled_shard();
        let message = |payload: &'static [u8]| {
            Message::new(
                ByteString::from("t"),
                bytes::Bytes::from_static(payload),
                QoS::ExactlyOnce,
                false,
            )
        };
        shard.publish(message(b"one"));
        shard.publish(message(b"two"));
        let records = journal.pending_records();
        let sent: Vec<_> = records
            .iter()
            .filter_map(|r| match r {
                Record::Sent(_, refs) => Some(refs.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            sent,
            vec![
                vec![(stamp, 1, QoS::ExactlyOnce)],
                vec![(stamp, 2, QoS::ExactlyOnce)]
            ],
            "7 bytes a session, the message stored once"
        );
        assert_eq!(
            replayed(&records, stamp),
            (
                vec![(1, QoS::ExactlyOnce, false), (2, QoS::ExactlyOnce, false)],
                vec![]
            )
        );
        let session = &mut shard.sessions[key as usize];
        assert!(session.on_pubrec(1));
        shard.journal_step(key, FlowStep::PubRecd, 1);
        let limits = shard.limits;
        assert!(shard.sessions[key as usize].on_pubrec_refused(2, &limits));
        shard.journal_step(key, FlowStep::Done, 2);
        let before = shard.needed_lsns[1];
        shard.journal_step(key, FlowStep::AwaitRel, 9);
        // The step's acknowledgements go as one record at its end.
        shard.flush_dirty();
        assert!(
            shard.needed_lsns[1] > before,
            "the PUBREC of an incoming id waits for its record"
        );
        assert_eq!(
            replayed(&journal.pending_records(), stamp),
            (vec![(1, QoS::ExactlyOnce, true)], vec![9])
        );
        // A new image (reconnect, take-over) writes the flows again.
        shard.sessions[key as usize]
            .state
            .flows
            .as_mut()
            .unwrap()
            .awaiting_rel = vec![9];
        shard.journal_session(key);
        let stamp = shard.persist_stamps[&key];
        // Only the records after the new image name its alias.
        assert_eq!(
            replayed(&journal.pending_records(), stamp),
            (vec![(1, QoS::ExactlyOnce, true)], vec![9])
        );
    }

    /// Publishes two QoS 1 messages to "t".
    fn publish_two(shard: &mut Shard) {
        for payload in [&b"one"[..], b"two"] {
            shard.publish(Message::new(
                ByteString::from("t"),
                bytes::Bytes::copy_from_slice(payload),
                QoS::AtLeastOnce,
                false,
            ));
        }
    }

    #[test]
    fn a_message_queued_offline_goes_in_flight_under_the_id_it_was_stored_with() {
        let (mut shard, journal, key, stamp) = journalled_shard();
        shard.sessions[key as usize].detach();
        publish_two(&mut shard);
        let queued: Vec<u64> = journal
            .pending_records()
            .iter()
            .filter_map(|r| match r {
                Record::Queue(mid, refs) if refs == &vec![(stamp, QoS::AtLeastOnce)] => Some(*mid),
                _ => None,
            })
            .collect();
        assert_eq!(queued.len(), 2);
        // Back online: the window takes both from the queue.
        let limits = shard.limits;
        let session = &mut shard.sessions[key as usize];
        session.link = Some(crate::session::link::test_link());
        session.reattach(&limits);
        shard.journal_sent(key);
        shard.journal_done();
        let sent: Vec<(u64, u16)> = journal
            .pending_records()
            .iter()
            .filter_map(|r| match r {
                Record::Steps(messages, entries) => Some(flows::steps_events(messages, entries)),
                _ => None,
            })
            .flatten()
            .filter_map(|(alias, event)| match event {
                flows::FlowEvent::Sent(mid, packet_id, _) if alias == stamp => {
                    Some((mid, packet_id))
                }
                _ => None,
            })
            .collect();
        assert_eq!(sent, vec![(queued[0], 1), (queued[1], 2)]);
    }

    /// Sessions whose full window had a message acknowledged and sent the
    /// next from their queues in one step: one ordered record names the
    /// message once and each session with 9 bytes (the format 2 records
    /// took 5 + 19 + 28 bytes a session, an early `DoneMany` of one ack and
    /// a `Sent` of its own); replayed, each has the next message in flight.
    #[test]
    fn a_step_that_sends_queued_messages_of_many_sessions_is_one_record() {
        let (mut shard, journal, first, first_alias) = journalled_shard();
        let second = testing::attach(&mut shard, "kept2", "t", QoS::AtLeastOnce);
        shard.sessions[second as usize].clean_session = false;
        shard.journal_session(second);
        let second_alias = shard.persist_stamps[&second];
        for key in [first, second] {
            shard.sessions[key as usize].receive_maximum = 1;
        }
        publish_two(&mut shard);
        let before = journal.pending_records().len();
        let limits = shard.limits;
        for key in [first, second] {
            assert!(shard.sessions[key as usize].on_puback(1, &limits));
            shard.journal_step(key, FlowStep::Done, 1);
        }
        shard.journal_done();
        let records = journal.pending_records();
        let step = &records[before..];
        assert_eq!(step.len(), 1, "one record for the step: {step:?}");
        let Record::Steps(messages, entries) = &step[0] else {
            panic!("{step:?}");
        };
        assert_eq!(messages.len(), 1, "the message named once");
        assert_eq!(
            entries
                .iter()
                .map(|e| (e.alias, e.done, e.message, e.sent))
                .collect::<Vec<_>>(),
            vec![(first_alias, 1, 1, 2), (second_alias, 1, 1, 2)]
        );
        for alias in [first_alias, second_alias] {
            assert_eq!(
                replayed(&records, alias),
                (vec![(2, QoS::AtLeastOnce, false)], vec![]),
                "the second message in flight, the first done"
            );
        }
    }

    #[test]
    fn restored_flows_are_resent_with_their_packet_ids_dup_and_pubrel() {
        let mut shard = testing::shard_with(0, 1, Config::default());
        let body = |payload: &'static [u8]| StoredMessage {
            qos: QoS::ExactlyOnce,
            retain: false,
            expires_unix_ms: 1,
            topic: ByteString::from("a/b"),
            properties: Default::default(),
            payload: bytes::Bytes::from_static(payload),
        };
        let inflight = |mid, packet_id, qos, pubrecd| flows::LoadedInflight {
            mid,
            message: body(b"x"),
            qos,
            packet_id,
            pubrecd,
        };
        let stored = vec![LoadedSession {
            session: StoredSession {
                stamp: 1,
                alias: 1,
                client_id: ByteString::from("back"),
                protocol_level: 4,
                expiry_interval: SESSION_NEVER_EXPIRES,
                offline_since_unix_ms: 0,
                subscriptions: Vec::new(),
                queued: Vec::new(),
            },
            queued: Vec::new(),
            flows: flows::LoadedFlows {
                inflight: vec![
                    inflight(5, 300, QoS::AtLeastOnce, false),
                    inflight(6, 301, QoS::ExactlyOnce, false),
                    inflight(7, 302, QoS::ExactlyOnce, true),
                ],
                awaiting_rel: vec![44],
            },
            will: None,
        }];
        assert_eq!(shard.restore_sessions(&stored, 1000), (1, 3));
        let key = shard.session_key("back").expect("restored");
        let session = &mut shard.sessions[key as usize];
        let flows = session.state.flows.as_deref().unwrap();
        let phases: Vec<_> = flows
            .inflight
            .iter()
            .map(|f| (f.packet_id, f.phase, f.stored, f.journalled))
            .collect();
        assert_eq!(
            phases,
            vec![
                (300, Phase::AwaitPubAck, 5, true),
                (301, Phase::AwaitPubRec, 6, true),
                (302, Phase::AwaitPubComp, 7, true)
            ],
            "expired bodies still complete their flows"
        );
        assert_eq!(flows.awaiting_rel, vec![44]);
        let limits = shard.limits;
        assert_eq!(
            session.on_publish_qos2(44, &limits),
            crate::session::Qos2Receipt::Duplicate,
            "a PUBLISH resent after the restart is not delivered again"
        );
    }
}
