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
//! queues is written once per shard (`Record::Message`) with the stamps of
//! the sessions that took it (`Record::Queue`, 9 bytes a subscriber), and an
//! image lists what the session had not had acknowledged when it was
//! taken (at connect, disconnect and subscription changes). After a restart
//! those messages are resent from the pending queue with new packet ids:
//! QoS 1 may come twice (allowed), QoS 2 sent before the crash may too.

use std::num::NonZeroU32;
use std::time::Instant;

use bytestring::ByteString;

use crate::protocol::Version;
use crate::protocol::message::Message;
use crate::protocol::v5::{RetainHandling, SubscriptionOptions};
use crate::router::SharedFilter;
use crate::session::link::TICKS_PER_SEC;
use crate::session::{SESSION_NEVER_EXPIRES, Session, SessionState};
use crate::shard::{SessionKey, Shard};
use crate::store::LoadedSession;
use crate::store::record::{
    Record, StoredMessage, StoredSession, StoredSubscription, next_stamp, unix_ms_now,
};

/// QoS 1/2 messages `session` holds (in flight and pending): one more
/// after an offer means it took the message.
pub(super) fn queued_count(session: &Session) -> usize {
    session
        .state
        .flows
        .as_deref()
        .map_or(0, |f| f.inflight.len() + f.pending.len())
}

/// The QoS 1/2 messages `session` has not had acknowledged, oldest first:
/// in flight, then pending (what its image lists).
pub(super) fn unacknowledged(session: &Session) -> impl Iterator<Item = &Message> {
    session
        .state
        .flows
        .as_deref()
        .into_iter()
        .flat_map(|flows| {
            flows
                .inflight
                .iter()
                .map(|f| &f.message)
                .chain(flows.pending.iter())
        })
}

impl Shard {
    /// Journals the image of session `key` if it is persistent (and
    /// persistence is on): first a message record for each QoS 1/2 message
    /// it has not had acknowledged, then the image naming them.
    pub fn journal_session(&mut self, key: SessionKey) {
        let (Some(journal), Some(session)) = (
            self.session_journal.clone(),
            self.sessions.get(key as usize),
        ) else {
            return;
        };
        if session.clean_session {
            return;
        }
        let now = Instant::now();
        let unix_now = unix_ms_now();
        let mut queued = Vec::new();
        for message in unacknowledged(session) {
            let mid = next_stamp();
            journal.append(&Record::Message(
                mid,
                StoredMessage::of(message, now, unix_now),
            ));
            queued.push((mid, message.qos));
        }
        let image = StoredSession {
            queued,
            ..self.image_of(session)
        };
        self.persist_stamps.insert(key, image.stamp);
        self.needed_lsns[1] = journal.append(&Record::SessionImage(image));
    }

    /// Journals `message` once and the sessions that just queued it
    /// (`persist_refs`, gathered by `Shard::route`).
    pub(super) fn journal_queued(&mut self, message: &Message) {
        let refs = std::mem::take(&mut self.persist_refs);
        let Some(journal) = &self.session_journal else {
            return;
        };
        let mid = next_stamp();
        journal.append(&Record::Message(
            mid,
            StoredMessage::of(message, Instant::now(), unix_ms_now()),
        ));
        self.needed_lsns[1] = journal.append(&Record::Queue(mid, refs));
    }

    /// Journals that the persistent session of `client_id` ended here.
    pub fn journal_drop(&mut self, client_id: &str) {
        if let Some(journal) = &self.session_journal {
            self.needed_lsns[1] = journal.append(&Record::SessionDrop(
                next_stamp(),
                ByteString::from(client_id),
            ));
        }
    }

    /// `session` as stored now, without its queue.
    pub(super) fn image_of(&self, session: &Session) -> StoredSession {
        let offline_since_unix_ms = if session.is_online() {
            0
        } else {
            let ticks = self.now_ticks().saturating_sub(session.offline_since);
            unix_ms_now().saturating_sub(u64::from(ticks) * 1000 / u64::from(TICKS_PER_SEC))
        };
        let extras = session
            .state
            .flows
            .as_deref()
            .map(|f| f.subscription_options.as_slice())
            .unwrap_or_default();
        let subscriptions = session
            .state
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
            .collect();
        StoredSession {
            stamp: next_stamp(),
            client_id: ByteString::from(&*session.client_id),
            protocol_level: if session.version == Version::V5 { 5 } else { 4 },
            expiry_interval: session.session_expiry,
            offline_since_unix_ms,
            subscriptions,
            queued: Vec::new(),
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
                for (_, stored, qos) in &loaded.queued {
                    let Some(mut message) = stored.to_message(0, started, now_unix_ms) else {
                        continue;
                    };
                    message.qos = *qos;
                    message.retain = false;
                    flows.pending_bytes += message.wire_len();
                    flows.pending.push_back(message);
                    messages += 1;
                }
            }
            let key = self.insert_session(session);
            self.persist_stamps.insert(key, s.stamp);
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
                let options = SubscriptionOptions {
                    qos: sub.qos,
                    no_local: sub.no_local,
                    retain_as_published: sub.retain_as_published,
                    retain_handling: RetainHandling::SendAtSubscribe,
                };
                session.set_subscription_options(filter, &options, NonZeroU32::new(sub.identifier));
            }
        }
        (stored.len(), messages)
    }
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
}
