//! The keep-alive sweep (§3.1.2.10): closes silent connections, parks idle
//! ones still in their task, ends offline sessions past their Session
//! Expiry Interval, publishes delayed wills, closes accepted sockets that
//! sent nothing within the connect timeout, and refreshes the shard's
//! gauges. It looks only at what is due in the shard's timer wheels
//! (`shard::timers`), never at every session: an idle shard of a million
//! connections does a few comparisons per sweep.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use log::debug;

use crate::session::link::{CloseReason, SessionKey, Waiter};
use crate::shard::timers::{PARK_AFTER_TICKS, conn_tag, offline_deadline};
use crate::shard::{Ctx, Shard};

/// Closes connections silent for more than 1.5 × their keep-alive
/// (§3.1.2.10), checking every `period`; wakes plain connections idle in
/// their task for [`PARK_AFTER_TICKS`] so that they park. Returns once
/// `shutdown` is set (checked on the same tick, so an idle shard wakes only
/// for this timer: twice a second).
pub async fn keep_alive_sweeper(ctx: Ctx, period: Duration, shutdown: Arc<AtomicBool>) {
    let mut memory = MemoryReturn::default();
    loop {
        glommio::timer::sleep(period).await;
        if shutdown.load(Ordering::SeqCst) {
            return;
        }
        memory.after_sweep(
            ctx.shard.borrow().stats.connections_accepted,
            crate::session::link::live_links(),
        );
        match sweep(&ctx) {
            Swept::ShuttingDown => return,
            Swept::Quiet => {}
            Swept::Published => {
                // Expired sessions and delayed wills: tell the other shards.
                ctx.send_outbox();
                ctx.forward_publishes().await;
            }
        }
    }
}

/// Accepted connections after which, once accepts pause for a sweep, the
/// shard hands the allocator's free pages back to the system: a connect
/// storm's handshakes leave megabytes free in the heap that glibc keeps
/// (it trims only the top of a heap), which RSS would show for good.
const TRIM_AFTER_ACCEPTS: u64 = 1000;

/// When the shard last gave memory back ([`MemoryReturn::after_sweep`]).
#[derive(Default)]
struct MemoryReturn {
    /// `connections_accepted` and the connected clients at the previous
    /// sweep.
    before: (u64, u64),
    /// `connections_accepted` when memory was last given back.
    trimmed_at: u64,
}

impl MemoryReturn {
    /// Gives the heap's free pages back (`malloc_trim`) once at least
    /// [`TRIM_AFTER_ACCEPTS`] connections came since the last time and
    /// neither the accepted nor the connected count changed since the
    /// previous sweep (the storm is over: every accepted socket has sent its
    /// CONNECT or gone). A walk over the allocator's free lists:
    /// milliseconds at most, once per storm.
    fn after_sweep(&mut self, accepted: u64, connected: u64) {
        let quiet = (accepted, connected) == self.before;
        self.before = (accepted, connected);
        if quiet && accepted.saturating_sub(self.trimmed_at) >= TRIM_AFTER_ACCEPTS {
            self.trimmed_at = accepted;
            // glibc's malloc only: mimalloc and jemalloc (features of the
            // binary, src/main.rs) give free pages back by themselves after a
            // delay, and glibc's heap then holds almost nothing.
            #[cfg(all(
                target_env = "gnu",
                not(any(feature = "mimalloc", feature = "jemalloc"))
            ))]
            // SAFETY: malloc_trim only releases free memory; callable from any thread.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

/// What one sweep did.
enum Swept {
    /// The shard is shutting down: the sweeper ends.
    ShuttingDown,
    /// Nothing for the other shards.
    Quiet,
    /// Sessions expired or delayed wills were published.
    Published,
}

/// One sweep (see [`keep_alive_sweeper`]): fires what is due in the
/// shard's wheels, then refreshes the figures.
fn sweep(ctx: &Ctx) -> Swept {
    {
        let mut shard = ctx.shard.borrow_mut();
        if shard.shutting_down {
            return Swept::ShuttingDown;
        }
        // The acknowledgements and sends gathered since the last step
        // record (`Shard::flush_dirty` writes it when due): on disk within
        // a sweep even when the shard is idle.
        shard.journal_done();
        // Drops of ended sessions whose shared backlog's new shards did
        // not answer in time (a claim's answer may then wait in the
        // outbox).
        let dropped = shard.journal_handed_over_drops();
        let now = shard.now_ticks();
        let silent = shard.waiting.expire(std::time::Instant::now());
        if silent > 0 {
            debug!(
                "{silent} accepted sockets sent no whole CONNECT within the connect timeout: closed"
            );
        }
        let (expired, wills) = fire_due(&mut shard, now);
        let totals = shard.session_totals();
        shard.refresh_gauges(totals);
        let moves_ended = shard.end_old_moves(now);
        if expired.is_empty() && wills.is_empty() {
            return if moves_ended || dropped {
                Swept::Published
            } else {
                Swept::Quiet
            };
        }
        shard.end_expired_sessions(&expired);
        shard.publish_due_wills(&wills);
    }
    Swept::Published
}

/// Fires the entries of the shard's wheels due at `now`: closes silent
/// connections, wakes new ones to park, and returns the offline sessions
/// that expired and those whose delayed will is due.
fn fire_due(shard: &mut Shard, now: u32) -> (Vec<SessionKey>, Vec<SessionKey>) {
    let Shard {
        sessions, timers, ..
    } = shard;
    timers.keep_alive.expire(now, |key, tag| {
        let link = sessions
            .get_mut(key as usize)
            .and_then(|s| s.link.as_mut())
            .filter(|l| conn_tag(l.conn_id) == tag)?;
        // Re-armed since (a packet arrived): the entry moves there.
        let due = link.keep_alive_deadline()?;
        if now < due {
            return Some(due);
        }
        debug!("connection {}: keep-alive timeout", link.conn_id);
        link.close(CloseReason::KeepAliveTimeout);
        None
    });
    timers.park.expire(now, |key, tag| {
        let link = sessions
            .get_mut(key as usize)
            .and_then(|s| s.link.as_mut())
            .filter(|l| conn_tag(l.conn_id) == tag)?;
        match link.waiter {
            // Parked, or closing: nothing more to do.
            Waiter::Parked(_) => None,
            _ if link.close.is_some() => None,
            // Busy: look again a second after its latest packet.
            Waiter::Running => Some(now.saturating_add(PARK_AFTER_TICKS)),
            Waiter::Task(_) => {
                let due = link.last_seen.saturating_add(PARK_AFTER_TICKS);
                if now < due {
                    return Some(due);
                }
                // A plain connection idle in its task: it parks when woken
                // (or, out of descriptors, waits again and is woken later).
                link.wake();
                Some(now.saturating_add(PARK_AFTER_TICKS))
            }
        }
    });
    let mut expired = Vec::new();
    let mut wills = Vec::new();
    timers.offline.expire(now, |key, tag| {
        let session = sessions
            .get(key as usize)
            .filter(|s| s.link.is_none() && s.offline_since == tag)?;
        if session.has_expired(now) {
            expired.push(key);
            return None;
        }
        if session
            .state
            .flows
            .as_ref()
            .is_some_and(|f| f.delayed_will.as_ref().is_some_and(|w| w.0 <= now))
        {
            wills.push(key);
            // Looked at again next sweep, once the will has left: for its
            // expiry.
            return Some(now.saturating_add(1));
        }
        offline_deadline(session)
    });
    (expired, wills)
}
