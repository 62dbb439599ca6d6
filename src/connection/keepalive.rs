//! The keep-alive sweep (§3.1.2.10): closes silent connections, parks idle
//! ones still in their task, ends offline sessions past their Session
//! Expiry Interval, and gathers the shard's session gauges.

use std::time::Duration;

use log::debug;

use crate::session::link::{CloseReason, SessionKey, TICKS_PER_SEC, Waiter};
use crate::shard::Ctx;
use crate::shard::sys::SessionTotals;

/// A plain connection still waiting in its task ([`Wire::Fresh`]: the
/// client sent nothing after CONNECT) is woken to park once it has been
/// silent this long: a second, so that the keep-alive sweep (every half
/// second) parks such clients within 1.5 s and never a client in the middle
/// of its first exchange.
pub(super) const PARK_AFTER_TICKS: u32 = TICKS_PER_SEC;

/// Closes connections silent for more than 1.5 × their keep-alive
/// (§3.1.2.10), checking every `period`; wakes plain connections idle in
/// their task for [`PARK_AFTER_TICKS`] so that they park.
pub async fn keep_alive_sweeper(ctx: Ctx, period: Duration) {
    loop {
        glommio::timer::sleep(period).await;
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

/// What one sweep did.
enum Swept {
    /// The shard is shutting down: the sweeper ends.
    ShuttingDown,
    /// Nothing for the other shards.
    Quiet,
    /// Sessions expired or delayed wills were published.
    Published,
}

/// One pass over the shard's sessions (see [`keep_alive_sweeper`]); also
/// ends offline sessions past their Session Expiry Interval and publishes
/// the delayed wills that are due.
fn sweep(ctx: &Ctx) -> Swept {
    {
        let mut shard = ctx.shard.borrow_mut();
        if shard.shutting_down {
            return Swept::ShuttingDown;
        }
        let now = shard.now_ticks();
        // The sweep walks every session anyway: it also gathers the queue
        // totals for the admin figures, which it then publishes.
        let mut totals = SessionTotals::default();
        let mut expired = Vec::new();
        let mut wills = Vec::new();
        let mut dropped = 0;
        for (key, session) in shard.sessions.iter_mut() {
            totals.count(session);
            dropped += session.take_unreported_drops();
            let Some(link) = &mut session.link else {
                if session.has_expired(now) {
                    expired.push(key as SessionKey);
                } else if session
                    .state
                    .flows
                    .as_ref()
                    .is_some_and(|f| f.delayed_will.as_ref().is_some_and(|w| w.0 <= now))
                {
                    wills.push(key as SessionKey);
                }
                continue;
            };
            let limit = u32::from(link.keep_alive) * TICKS_PER_SEC * 3 / 2;
            let silent = now.saturating_sub(link.last_seen);
            if link.keep_alive > 0 && silent > limit {
                debug!("client {}: keep-alive timeout", session.client_id);
                link.close(CloseReason::KeepAliveTimeout);
            } else if silent >= PARK_AFTER_TICKS
                && !link.is_framed()
                && matches!(link.waiter, Waiter::Task(_))
            {
                // A plain connection idle in its task: it parks when woken.
                link.wake();
            }
        }
        shard.stats.publish_dropped += dropped;
        shard.refresh_gauges(totals);
        let moves_ended = shard.end_old_moves(now);
        if expired.is_empty() && wills.is_empty() {
            return if moves_ended {
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
