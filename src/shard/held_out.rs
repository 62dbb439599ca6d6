//! Packets that wait for the session journal (docs/design/persistence.md
//! §5.2): a QoS 2 PUBLISH to a persistent session leaves only once the
//! record of its packet id is durable (else a restart would resend it under
//! another id, a second delivery), a PUBREL once its PUBREC'd record is
//! (else a restart would resend the PUBLISH the client already released).
//!
//! Such a packet sets its connection's `Link::out_hold` to the LSN it
//! needs; `Shard::flush_dirty` then writes nothing of that connection's
//! queue (the order stays) and lists the session here; [`release_loop`],
//! one task per shard beside the journal's commit task, waits until the
//! journal is durable that far and flushes them. QoS 1, QoS 0, clean
//! sessions and persistence off never wait.

use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Poll, Waker};
use std::time::Duration;

use crate::session::link::{Link, SessionKey};
use crate::shard::Shard;
use crate::store::journal::Journal;

/// How often the release task checks for the broker stopping while it
/// waits.
const STOP_POLL: Duration = Duration::from_millis(50);

/// The sessions whose packets wait for the journal.
#[derive(Debug, Default)]
pub struct HeldOut {
    /// Their keys (a key may be listed twice; each release checks).
    keys: Vec<SessionKey>,
    /// The release task, waiting for a first key.
    waker: Option<Waker>,
}

impl HeldOut {
    /// Whether `link`'s queue must still wait, `durable` being what the
    /// journal has made durable (`None`: no journal): lists `key` if so,
    /// else clears the hold.
    pub fn holds(&mut self, key: SessionKey, link: &mut Link, durable: Option<u64>) -> bool {
        if durable.is_none_or(|d| d >= link.out_hold) {
            link.out_hold = 0;
            return false;
        }
        self.keys.push(key);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
        true
    }

    /// True when none is listed.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl Shard {
    /// The packets queued for session `key`'s connection wait until the
    /// session journal is durable up to `lsn` (nothing while offline: a
    /// reconnect queues its packets again).
    pub fn hold_out(&mut self, key: SessionKey, lsn: u64) {
        if let Some(link) = self
            .sessions
            .get_mut(key as usize)
            .and_then(|s| s.link.as_mut())
        {
            link.out_hold = link.out_hold.max(lsn);
        }
    }

    /// The highest LSN a listed session waits for (0: none).
    fn held_out_target(&self) -> u64 {
        self.held_out
            .keys
            .iter()
            .filter_map(|&key| self.sessions.get(key as usize)?.link.as_ref())
            .map(|link| link.out_hold)
            .max()
            .unwrap_or(0)
    }

    /// Flushes the listed sessions whose hold `durable` covers (a framed or
    /// blocked connection's task is woken to write), keeps the others.
    pub fn release_held_out(&mut self, durable: u64) {
        let keys = std::mem::take(&mut self.held_out.keys);
        let mut kept = Vec::new();
        for key in keys {
            let Some(link) = self
                .sessions
                .get_mut(key as usize)
                .and_then(|s| s.link.as_mut())
            else {
                continue;
            };
            if link.out_hold > durable {
                kept.push(key);
                continue;
            }
            link.out_hold = 0;
            if link.blocked {
                link.wake();
            }
            self.mark_dirty(key);
        }
        self.held_out.keys.extend(kept);
        self.flush_dirty();
    }
}

/// Releases the shard's held packets as `journal` becomes durable, until
/// `stop` is set.
pub async fn release_loop(shard: Rc<RefCell<Shard>>, journal: Rc<Journal>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        // `try_borrow`: while start-up still holds the shard, wait a round.
        let listed = poll_fn(|cx| match shard.try_borrow_mut() {
            Ok(mut shard) if shard.held_out.is_empty() => {
                shard.held_out.waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Ok(_) => Poll::Ready(()),
            Err(_) => Poll::Pending,
        });
        if glommio::timer::timeout(STOP_POLL, async {
            listed.await;
            Ok(())
        })
        .await
        .is_err()
        {
            continue;
        }
        let Some(target) = shard.try_borrow().ok().map(|s| s.held_out_target()) else {
            continue;
        };
        let _ = glommio::timer::timeout(STOP_POLL, async {
            journal.wait_acked(target).await;
            Ok(())
        })
        .await;
        if let Ok(mut shard) = shard.try_borrow_mut() {
            shard.release_held_out(journal.acked_lsn());
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::protocol::message::Message;
    use crate::protocol::v3::QoS;
    use crate::shard::testing;

    #[test]
    fn a_qos_2_publish_to_a_journalled_session_waits_for_its_record_and_qos_1_does_not() {
        let mut shard = testing::shard_with(0, 1, Config::default());
        let journal = testing::unwritten_journal(&mut shard);
        let mut client = testing::attach_client(&mut shard, "held", "t", QoS::ExactlyOnce, None);
        shard.sessions[client.key as usize].clean_session = false;
        shard.journal_session(client.key);
        shard.flush_dirty();
        let _ = client.publishes();
        let message = |qos| {
            Message::new(
                bytestring::ByteString::from("t"),
                bytes::Bytes::from_static(b"x"),
                qos,
                false,
            )
        };
        shard.publish(message(QoS::AtLeastOnce));
        shard.flush_dirty();
        assert_eq!(client.publishes().len(), 1, "QoS 1 never waits");
        shard.publish(message(QoS::ExactlyOnce));
        shard.publish(message(QoS::AtLeastOnce));
        shard.flush_dirty();
        assert!(client.publishes().is_empty(), "held, and what follows too");
        assert!(!shard.held_out.is_empty());
        let hold = shard.sessions[client.key as usize]
            .link
            .as_ref()
            .map_or(0, |l| l.out_hold);
        assert!(
            hold > 0 && hold < journal.end_lsn(),
            "the QoS 2 record's end"
        );
        // Durable short of it: still held.
        shard.release_held_out(hold - 1);
        assert!(client.publishes().is_empty());
        shard.release_held_out(hold);
        let got: Vec<QoS> = client.publishes().into_iter().map(|p| p.2).collect();
        assert_eq!(got, vec![QoS::ExactlyOnce, QoS::AtLeastOnce], "in order");
        assert!(shard.held_out.is_empty());
    }
}
