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

use std::time::Instant;

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
                let mut stored = StoredMessage::of(message, Instant::now(), unix_ms_now());
                stored.expires_unix_ms = 0;
                Record::Will(StoredWill {
                    stamp: next_stamp(),
                    client_id,
                    delay,
                    due_unix_ms,
                    message: stored,
                })
            }
            None => Record::WillClear(next_stamp(), client_id),
        };
        journal.append(&record);
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
/// the module documentation), `now_ticks` and `now_unix_ms` being now.
pub(super) fn restore_will(
    session: &mut Session,
    will: &StoredWill,
    now_ticks: u32,
    now_unix_ms: u64,
    now: Instant,
) {
    let Some(message) = will.message.to_message(0, now, now_unix_ms) else {
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
}
