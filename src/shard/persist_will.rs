//! Wills of persistent sessions across a restart (docs/design/persistence.md
//! §6 item 6). A persistent session's will is journalled at CONNECT
//! (`Record::Will`, due 0: owed if the connection ends without DISCONNECT),
//! again when its connection ends and the MQTT 5.0 Will Delay starts (with
//! the wall-clock time it is due), and cleared (`Record::WillClear`) when a
//! CONNECT has none, a DISCONNECT or a graceful shutdown discards it, or it
//! is published. At start a will still owed comes back as the session's
//! delayed will, published by the keep-alive sweep: a session whose
//! connection was open when the broker died lost it without DISCONNECT, so
//! its will goes after its Will Delay counted from the start (at once,
//! within a sweep, for 3.1.1), unless the client reconnects first; one whose
//! delay was running goes when it was due (at once if that passed). Clean
//! sessions' wills are not journalled (two records per connection).
//!
//! An MQTT 5.0 will's Message Expiry Interval is kept with it
//! (`StoredWill::expiry_interval`, record kind `WILL_EXPIRING`) and counted
//! from its publication, as without a restart: from the wall-clock time it
//! was due when its delay was running (so time spent down counts, and a
//! will whose lifetime ended while the broker was down is not published),
//! else from the end of its delay after the start.

use std::time::{Duration, Instant};

use crate::protocol::message::Message;
use crate::session::Session;
use crate::session::link::{SessionKey, TICKS_PER_SEC};
use crate::shard::Shard;
use crate::store::record::{Record, StoredMessage, StoredWill, next_stamp, unix_ms_now};

impl Shard {
    /// Journals the will of journalled persistent session `key`: `will`
    /// (the message and its Will Delay in seconds) due at `due_unix_ms` (0:
    /// its connection is open), or none.
    pub fn journal_will(
        &mut self,
        key: SessionKey,
        will: Option<(&Message, u32)>,
        due_unix_ms: u64,
    ) {
        let (Some(journal), Some(session)) =
            (&self.session_journal, self.sessions.get(key as usize))
        else {
            return;
        };
        if !self.persist_stamps.contains_key(&key) {
            return;
        }
        let client_id = bytestring::ByteString::from(&*session.client_id);
        let record = match will {
            Some((message, delay)) => {
                let (now, now_unix_ms) = (Instant::now(), unix_ms_now());
                let mut stored = StoredMessage::of(message, now, now_unix_ms);
                stored.expires_unix_ms = 0;
                // The message's expiry counts from its publication: now
                // while the connection is open, else when it is due.
                let published =
                    now + Duration::from_millis(due_unix_ms.saturating_sub(now_unix_ms));
                let expiry_interval = message
                    .properties
                    .as_deref()
                    .and_then(|p| p.expires_at)
                    .map(|at| {
                        let ms = at.saturating_duration_since(published).as_millis();
                        u32::try_from(ms.saturating_add(500) / 1000).unwrap_or(u32::MAX)
                    });
                Record::Will(StoredWill {
                    stamp: next_stamp(),
                    client_id,
                    delay,
                    due_unix_ms,
                    message: stored,
                    expiry_interval,
                })
            }
            None => Record::WillClear(next_stamp(), client_id),
        };
        // The CONNACK that accepted the will waits for it, as for the image.
        let lsn = journal.append(&record);
        self.needed_lsns[1] = self.needed_lsns[1].max(lsn);
        self.hold_out(key, lsn);
        match &record {
            Record::Will(will) => {
                self.persist_wills
                    .insert(will.client_id.clone(), record.clone());
            }
            Record::WillClear(_, client_id) => {
                self.persist_wills.remove(client_id);
            }
            _ => {}
        }
    }

    /// True when session `key` holds a will waiting for its delay.
    pub fn has_delayed_will(&self, key: SessionKey) -> bool {
        self.sessions
            .get(key as usize)
            .and_then(|s| s.state.flows.as_ref())
            .is_some_and(|f| f.delayed_will.is_some())
    }
}

/// Gives restored session `session` its stored will as a delayed will (see
/// the module documentation), `now_ticks` and `now_unix_ms` being now. Its
/// Message Expiry Interval counts from when it is published: when it was
/// due, or the end of its delay counted from now for one whose connection
/// was open; one already expired is dropped.
pub(super) fn restore_will(
    session: &mut Session,
    will: &StoredWill,
    now_ticks: u32,
    now_unix_ms: u64,
    now: Instant,
) {
    let mut stored = will.message.clone();
    if let Some(interval) = will.expiry_interval {
        let published_unix_ms = match will.due_unix_ms {
            0 => now_unix_ms.saturating_add(u64::from(will.delay) * 1000),
            due => due,
        };
        stored.expires_unix_ms = published_unix_ms
            .saturating_add(u64::from(interval) * 1000)
            .max(1);
    }
    let Some(message) = stored.to_message(0, now, now_unix_ms) else {
        return;
    };
    let left_s = match will.due_unix_ms {
        0 => u64::from(will.delay),
        due => due.saturating_sub(now_unix_ms).div_ceil(1000),
    };
    let left = u32::try_from(left_s).unwrap_or(u32::MAX);
    session.delay_will(
        now_ticks.saturating_add(left.saturating_mul(TICKS_PER_SEC)),
        message,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::protocol::v3::QoS;
    use crate::shard::testing;
    use bytestring::ByteString;

    #[test]
    fn a_persistent_sessions_will_is_journalled_and_comes_back_delayed() {
        let mut shard = testing::shard_with(0, 1, Config::default());
        let journal = testing::unwritten_journal(&mut shard);
        let key = testing::attach(&mut shard, "w", "t", QoS::AtLeastOnce);
        let will = Message::new(
            ByteString::from("gone/w"),
            bytes::Bytes::from_static(b"bye"),
            QoS::AtLeastOnce,
            true,
        );
        shard.journal_will(key, Some((&will, 5)), 0);
        assert!(
            journal.pending_records().is_empty(),
            "a clean session's is not"
        );
        shard.sessions[key as usize].clean_session = false;
        shard.journal_session(key);
        shard.journal_will(key, Some((&will, 5)), 0);
        shard.journal_will(key, None, 0);
        let wills: Vec<_> = journal
            .pending_records()
            .into_iter()
            .filter_map(|r| match r {
                Record::Will(w) => Some((w.client_id, w.delay, w.message.topic)),
                Record::WillClear(_, id) => Some((id, 0, ByteString::new())),
                _ => None,
            })
            .collect();
        assert_eq!(
            wills,
            vec![
                (ByteString::from("w"), 5, ByteString::from("gone/w")),
                (ByteString::from("w"), 0, ByteString::new())
            ]
        );
        // Back after a restart: owed (its connection was open), it waits its
        // delay from now; one whose delay ran waits what is left.
        let stored = StoredWill {
            stamp: 1,
            client_id: ByteString::from("w"),
            delay: 5,
            due_unix_ms: 0,
            message: StoredMessage::of(&will, Instant::now(), 1),
            expiry_interval: None,
        };
        let session = &mut shard.sessions[key as usize];
        restore_will(session, &stored, 100, 10_000, Instant::now());
        assert_eq!(session.take_due_will(100 + 5 * TICKS_PER_SEC - 1), None);
        let back = session.take_due_will(100 + 5 * TICKS_PER_SEC).expect("due");
        assert_eq!((back.topic.as_ref(), back.retain), ("gone/w", true));
        let running = StoredWill {
            due_unix_ms: 12_000,
            ..stored
        };
        restore_will(session, &running, 100, 10_000, Instant::now());
        assert!(session.take_due_will(100 + 2 * TICKS_PER_SEC).is_some());
    }

    /// The Message Expiry Interval of the will `message`, as a connection
    /// builds it at `sent_at`.
    fn expiring(seconds: u64, sent_at: Instant) -> Message {
        let mut message = Message::new(
            ByteString::from("gone/e"),
            bytes::Bytes::from_static(b"bye"),
            QoS::AtLeastOnce,
            false,
        );
        message.properties = Some(std::sync::Arc::new(
            crate::protocol::message::MessageProperties {
                forwarded: Default::default(),
                expires_at: Some(sent_at + Duration::from_secs(seconds)),
            },
        ));
        message
    }

    /// The seconds of expiry a will published at `at` carries.
    fn left_at(will: &Message, at: Instant) -> Option<u64> {
        let expires = will.properties.as_deref()?.expires_at?;
        Some(expires.saturating_duration_since(at).as_secs())
    }

    #[test]
    fn a_wills_message_expiry_is_kept_and_counts_from_its_publication() {
        let mut shard = testing::shard_with(0, 1, Config::default());
        let journal = testing::unwritten_journal(&mut shard);
        let key = testing::attach(&mut shard, "e", "t", QoS::AtLeastOnce);
        shard.sessions[key as usize].clean_session = false;
        shard.journal_session(key);
        let now = Instant::now();
        // At CONNECT (due 0) and when its 10 s delay starts (due then).
        shard.journal_will(key, Some((&expiring(60, now), 10)), 0);
        let due = unix_ms_now() + 10_000;
        shard.journal_will(
            key,
            Some((&expiring(60, now + Duration::from_secs(10)), 10)),
            due,
        );
        let wills: Vec<StoredWill> = journal
            .pending_records()
            .into_iter()
            .filter_map(|r| match r {
                Record::Will(w) => Some(w),
                _ => None,
            })
            .collect();
        assert_eq!(
            wills.iter().map(|w| w.expiry_interval).collect::<Vec<_>>(),
            vec![Some(60), Some(60)],
            "the interval, not the instant"
        );
        let (owed, running) = (&wills[0], &wills[1]);
        let session = &mut shard.sessions[key as usize];
        // Owed after a crash: published 10 s after the start, 60 s to live.
        let start = Instant::now();
        restore_will(session, owed, 100, 1_000_000, start);
        let will = session
            .take_due_will(100 + 10 * TICKS_PER_SEC)
            .expect("due after its delay");
        assert_eq!(left_at(&will, start + Duration::from_secs(10)), Some(60));
        // Its delay was running and the broker was down 30 s past its due
        // time: published at once, with 30 of its 60 s left.
        restore_will(session, running, 100, running.due_unix_ms + 30_000, start);
        let will = session.take_due_will(100).expect("due at once");
        assert_eq!(left_at(&will, start), Some(30), "time spent down counts");
        // Down past its whole lifetime: not published.
        restore_will(session, running, 100, running.due_unix_ms + 61_000, start);
        assert_eq!(session.take_due_will(u32::MAX), None, "expired while down");
        // A will without an expiry has none after a restart either.
        let plain = StoredWill {
            expiry_interval: None,
            ..running.clone()
        };
        restore_will(session, &plain, 100, plain.due_unix_ms + 61_000, start);
        let will = session.take_due_will(100).expect("never expires");
        assert_eq!(will.properties.and_then(|p| p.expires_at), None);
    }
}
