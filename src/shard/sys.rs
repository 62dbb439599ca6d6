//! The shard's part of `$SYS` and of the admin figures: its snapshot of
//! counters and gauges, and the `$SYS` task (every `sys_interval` each shard
//! sends its snapshot to shard 0, which sums them and publishes the totals,
//! see [`crate::observe::sys`]).

use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;

use crate::mesh::{self, ShardMsg};
use crate::observe::counters::Counters;
use crate::observe::sys::sys_messages;
use crate::protocol::message::Message;
use crate::protocol::v3::QoS;
use crate::session::Session;
use crate::shard::{Ctx, Shard};

/// The shard's session gauges that no counter in [`Counters`] keeps: the
/// connection counts, kept up to date as links and parked connections come
/// and go (`session::link::live_links`), and the queue figures, counted by a
/// walk over the sessions only while something may be queued
/// ([`Shard::session_totals`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionTotals {
    /// Sessions with a live connection.
    pub connected: u64,
    /// Of those: connections parked (`connection::park`).
    pub parked: u64,
    /// PUBLISH packets queued for live clients.
    pub queued_messages: u64,
    /// The largest single queue, in bytes.
    pub max_queue_bytes: u64,
    /// QoS 1/2 messages waiting for a slot in an inflight window.
    pub pending_messages: u64,
}

impl SessionTotals {
    /// Counts one session's queues.
    pub fn count_queues(&mut self, session: &Session) {
        self.queued_messages += session.out.publishes() as u64;
        self.max_queue_bytes = self.max_queue_bytes.max(session.out.bytes() as u64);
        if let Some(flows) = &session.state.flows {
            self.pending_messages += flows.pending.len() as u64;
        }
    }

    /// True when a queue figure is not 0.
    fn any_queued(&self) -> bool {
        self.queued_messages > 0 || self.max_queue_bytes > 0 || self.pending_messages > 0
    }
}

impl Shard {
    /// The session gauges now. The connection counts cost nothing; the
    /// queue figures need a walk over the sessions, done only when a queue
    /// may hold something: bytes queued on this shard
    /// (`outqueue::shard_queued_bytes`), a message that may have entered a
    /// pending queue since the last walk (`session::note_backlog`), or a
    /// last walk that found something (it may be gone now). Otherwise every
    /// queue is empty and the figures are 0. The walk also hands the drops
    /// only sessions saw to `publish_dropped` (they happen only where a
    /// pending queue held something).
    pub fn session_totals(&mut self) -> SessionTotals {
        let mut totals = SessionTotals {
            connected: crate::session::link::live_links(),
            parked: crate::session::link::parked_connections(),
            ..SessionTotals::default()
        };
        let noted = crate::session::take_backlog_note();
        if crate::session::outqueue::shard_queued_bytes() == 0
            && !noted
            && !self.session_totals.any_queued()
        {
            return totals;
        }
        let mut dropped = 0;
        for (_, session) in self.sessions.iter_mut() {
            totals.count_queues(session);
            dropped += session.take_unreported_drops();
        }
        self.stats.publish_dropped += dropped;
        totals
    }

    /// This shard's counters with the gauges filled in: those of its latest
    /// sweep ([`SessionTotals`], one sweep old at most)
    /// and those it keeps itself. The same figures feed `$SYS` and the admin
    /// listener, so the two agree.
    pub fn snapshot(&self) -> Counters {
        let totals = &self.session_totals;
        let mut c = self.stats;
        c.clients_connected = totals.connected;
        c.clients_parked = totals.parked;
        c.connections_waiting = self.waiting.len() as u64;
        c.queued_messages = totals.queued_messages;
        c.max_client_queue_bytes = totals.max_queue_bytes;
        c.pending_messages = totals.pending_messages;
        c.sessions = self.sessions.len() as u64;
        // A shared subscription is a subscription too (as Mosquitto counts
        // it): this shard's own memberships.
        c.subscriptions = (self.router.len() + self.shared.members_of(self.id)) as u64;
        c.retained = self.retained.len() as u64;
        c.shared_groups = self.shared.groups() as u64;
        c.shared_members = self.shared.members() as u64;
        c.queued_bytes = crate::session::outqueue::shard_queued_bytes() as u64;
        // Read on the shard's own thread: the count is per thread.
        c.log_lines_suppressed = crate::observe::log_limit::suppressed_total();
        for journal in self.retain_journal.iter().chain(&self.session_journal) {
            let s = journal.stats();
            c.store_records_written += s.records;
            c.store_bytes_written += s.bytes_written;
            c.store_fsyncs += s.fsyncs;
            c.store_write_errors += s.write_errors;
            c.store_snapshots += s.snapshots;
            c.store_log_bytes += journal.log_bytes_since_snapshot();
        }
        c.store_disk_full = u64::from(self.store_refuses());
        if let Some(link) = &self.cluster {
            link.status.figures.fill(&mut c);
        }
        c.complete();
        c
    }

    /// Records the session gauges of a sweep and refreshes this shard's
    /// admin gauges.
    pub fn refresh_gauges(&mut self, totals: SessionTotals) {
        self.session_totals = totals;
        let snapshot = self.snapshot();
        self.gauges.store(self.id, &snapshot, !self.shutting_down);
    }
}

/// Every `interval`: send this shard's snapshot to shard 0; on shard 0, sum
/// and publish the `$SYS` topics.
pub async fn sys_task(ctx: Ctx, interval: Duration) {
    loop {
        glommio::timer::sleep(interval).await;
        if !publish_sys(&ctx) {
            return;
        }
        ctx.forward_publishes().await;
    }
}

/// One `$SYS` round (see [`sys_task`]); false once the shard shuts down.
fn publish_sys(ctx: &Ctx) -> bool {
    let mut shard = ctx.shard.borrow_mut();
    if shard.shutting_down {
        return false;
    }
    let snapshot = shard.snapshot();
    if shard.id != 0 {
        let id = shard.id;
        drop(shard);
        mesh::send_detached(
            &ctx.mesh,
            0,
            ShardMsg::Stats {
                shard: id,
                counters: Box::new(snapshot),
            },
        );
        return true;
    }
    shard.all_stats[0] = snapshot;
    let mut total = Counters::default();
    for c in &shard.all_stats {
        total.add(c);
    }
    let uptime = shard.started.elapsed();
    for (topic, value) in sys_messages(&total, uptime) {
        shard.publish(Message {
            topic: ByteString::from_static(topic),
            payload: Bytes::from(value),
            qos: QoS::AtMostOnce,
            retain: true,
            retain_stamp: 0,
            properties: None,
        });
    }
    shard.flush_dirty();
    true
}
