//! Packets that wait for the session journal (docs/design/persistence.md
//! §5.2): a QoS 2 PUBLISH to a persistent session leaves only once the
//! record of its packet id is durable (else a restart would resend it under
//! another id, a second delivery), a PUBREL once its PUBREC'd record is
//! (else a restart would resend the PUBLISH the client already released).
//!
//! Such a packet holds its session's connection at the LSN it needs
//! ([`HeldOut`], kept by the shard so that a connection pays nothing for
//! it); `Shard::flush_dirty` and the connection task then write nothing of
//! that connection's queue (the order stays), and [`release_loop`], one
//! task per shard beside the journal's commit task, waits until the
//! journal is durable that far and flushes it. QoS 1, QoS 0, clean
//! sessions and persistence off never wait.
//!
//! A connection that ends a stored persistent session (a clean start, on
//! this shard or another) waits the same way for the session's drop
//! record: the answer to its claim is held here ([`HeldOut::answers`])
//! until the drop is durable, so its CONNACK (Session Present 0) never
//! leaves before a `kill -9` could still bring the old session back.

use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Poll, Waker};
use std::time::Duration;

use crate::session::link::SessionKey;
use crate::shard::{Ctx, Shard};
use crate::store::journal::Journal;

/// How often the release task checks for the broker stopping while it
/// waits.
const STOP_POLL: Duration = Duration::from_millis(50);

/// The connections whose packets wait for the journal.
#[derive(Debug, Default)]
pub struct HeldOut {
    /// Per session key: its connection's id and the LSN it waits for.
    holds: ahash::AHashMap<SessionKey, (u64, u64)>,
    /// Answers to claims that ended a persistent session here, waiting for
    /// its drop record: (LSN, the claim's shard, its token), in the order
    /// made.
    answers: Vec<(u64, usize, u64)>,
    /// The release task, waiting for a first hold.
    waker: Option<Waker>,
}

impl HeldOut {
    /// Whether the queue of connection `conn_id` of session `key` must
    /// still wait, `durable` being what the journal has made durable
    /// (`None`: no journal); a hold it covers is dropped.
    pub fn holds(&mut self, key: SessionKey, conn_id: u64, durable: Option<u64>) -> bool {
        if self.holds.is_empty() {
            return false;
        }
        match self.holds.get(&key) {
            Some(&(conn, lsn)) if conn == conn_id && durable.is_some_and(|d| d < lsn) => true,
            Some(_) => {
                self.holds.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Whether connection `conn_id` of session `key` is held (its task
    /// must not write).
    pub fn waits(&self, key: SessionKey, conn_id: u64) -> bool {
        !self.holds.is_empty() && self.holds.get(&key).is_some_and(|h| h.0 == conn_id)
    }

    /// True when no connection and no claim answer is held.
    pub fn is_empty(&self) -> bool {
        self.holds.is_empty() && self.answers.is_empty()
    }
}

impl Shard {
    /// The packets queued for session `key`'s connection wait until the
    /// session journal is durable up to `lsn` (nothing while offline: a
    /// reconnect queues its packets again).
    pub fn hold_out(&mut self, key: SessionKey, lsn: u64) {
        let Some(conn_id) = self.link_of(key).map(|link| link.conn_id) else {
            return;
        };
        let hold = self.held_out.holds.entry(key).or_insert((conn_id, 0));
        *hold = (conn_id, hold.1.max(lsn));
        if let Some(waker) = self.held_out.waker.take() {
            waker.wake();
        }
    }

    /// Answers the claim `token` of `shard` (which gets no state: a clean
    /// start) once the session journal is durable up to `lsn`, the record
    /// of the session drop its claim caused: at once without a journal or
    /// when it already is.
    pub fn answer_claim_after(&mut self, lsn: u64, shard: usize, token: u64) {
        let durable = self
            .session_journal
            .as_ref()
            .is_none_or(|journal| journal.acked_lsn() >= lsn);
        if durable {
            self.answer_claim(shard, token, None, None);
            return;
        }
        self.held_out.answers.push((lsn, shard, token));
        if let Some(waker) = self.held_out.waker.take() {
            waker.wake();
        }
    }

    /// The highest LSN a held connection or claim answer waits for (0:
    /// none).
    fn held_out_target(&self) -> u64 {
        let answers = self.held_out.answers.iter().map(|a| a.0);
        self.held_out
            .holds
            .values()
            .map(|h| h.1)
            .chain(answers)
            .max()
            .unwrap_or(0)
    }

    /// Flushes the held connections whose hold `durable` covers (a framed
    /// or blocked connection's task is woken to write), keeps the others.
    pub fn release_held_out(&mut self, durable: u64) {
        let answers = std::mem::take(&mut self.held_out.answers);
        let (due, waiting): (Vec<_>, Vec<_>) = answers.into_iter().partition(|a| a.0 <= durable);
        self.held_out.answers = waiting;
        for (_, shard, token) in due {
            self.answer_claim(shard, token, None, None);
        }
        let due: Vec<(SessionKey, u64)> = self
            .held_out
            .holds
            .iter()
            .filter(|(_, h)| h.1 <= durable)
            .map(|(&key, h)| (key, h.0))
            .collect();
        for (key, conn_id) in due {
            self.held_out.holds.remove(&key);
            let Some(link) = self
                .sessions
                .get_mut(key as usize)
                .and_then(|s| s.link.as_mut())
                .filter(|l| l.conn_id == conn_id)
            else {
                continue;
            };
            if link.blocked {
                link.wake();
            }
            self.mark_dirty(key);
        }
        self.flush_dirty();
    }
}

/// Releases the shard's held packets and claim answers as `journal`
/// becomes durable, until `stop` is set.
pub async fn release_loop(ctx: Ctx, journal: Rc<Journal>, stop: Arc<AtomicBool>) {
    let shard = &ctx.shard;
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
        // Claim answers to other shards.
        ctx.send_outbox();
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
        // The image holds what follows too (a SUBACK, a CONNACK) until it
        // is durable.
        assert_eq!(shard.held_out_target(), journal.end_lsn());
        shard.release_held_out(journal.end_lsn());
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
        let hold = shard.held_out_target();
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
