//! The shard's deadlines: keep-alive, parking and offline sessions, each a
//! timer wheel (`session::wheel`), so that the keep-alive sweep costs what
//! is due, not a walk over every session.
//!
//! - **Keep-alive** (§3.1.2.10): one entry per connection with a keep-alive,
//!   due when it has been silent for more than 1.5 × its keep-alive. A packet
//!   only moves `Link::last_seen`; the entry moves to the new deadline when
//!   it fires (lazy re-arm). The entry is removed with the link.
//! - **Parking**: one entry per new plain connection, due
//!   `PARK_AFTER_TICKS` after it attached: if it still waits in its task
//!   then, it is woken so that it parks. Connections resumed from parking
//!   park by themselves at their next wait and need none.
//! - **Offline sessions**: one entry per offline session with a Session
//!   Expiry Interval or a delayed will, due at the earlier of the two.
//!
//! A wheel keeps one entry per session key. Park and offline entries are not
//! removed when their session changes: when one fires it checks the session
//! it names (its tag is the connection id's low half, or the tick the
//! session went offline) and is dropped if that is no longer its session;
//! the next entry for the key replaces it anyway.

use crate::session::link::{SessionKey, TICKS_PER_SEC};
use crate::session::wheel::Wheel;
use crate::session::{SESSION_NEVER_EXPIRES, Session};
use crate::shard::Shard;

/// A plain connection still waiting in its task after CONNECT (the client
/// sent nothing more) is woken to park once it has been silent this long:
/// a second, so that the sweep (every half second) parks such clients
/// within 1.5 s and never a client in the middle of its first exchange.
pub const PARK_AFTER_TICKS: u32 = TICKS_PER_SEC;

/// The shard's three wheels (see the module documentation).
#[derive(Debug)]
pub struct Timers {
    /// Keep-alive deadlines of live connections.
    pub keep_alive: Wheel,
    /// When new plain connections should have parked.
    pub park: Wheel,
    /// Session expiry and delayed wills of offline sessions.
    pub offline: Wheel,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            keep_alive: Wheel::new(0),
            park: Wheel::new(0),
            offline: Wheel::new(0),
        }
    }
}

/// The tag of a connection's entries: the low half of its id (ids are never
/// reused, so a later connection on the same key has another tag for 2^32
/// connections).
pub fn conn_tag(conn_id: u64) -> u32 {
    conn_id as u32
}

/// When offline `session` next needs the sweep: its expiry or its delayed
/// will, whichever comes first; None when neither (it never expires).
pub fn offline_deadline(session: &Session) -> Option<u32> {
    let expiry = (session.session_expiry != SESSION_NEVER_EXPIRES).then(|| {
        let ticks = u64::from(session.session_expiry) * u64::from(TICKS_PER_SEC);
        let at = u64::from(session.offline_since) + ticks;
        u32::try_from(at).unwrap_or(u32::MAX)
    });
    let will = session
        .state
        .flows
        .as_ref()
        .and_then(|f| f.delayed_will.as_ref().map(|w| w.0));
    match (expiry, will) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Shard {
    /// Session `key` was just inserted: arms its connection's keep-alive
    /// and park entries, or, offline, its expiry entry.
    pub(super) fn arm_timers(&mut self, key: SessionKey) {
        let Some(session) = self.sessions.get_mut(key as usize) else {
            return;
        };
        let Some(link) = session.link.as_mut() else {
            if let Some(due) = offline_deadline(session) {
                let tag = session.offline_since;
                self.timers.offline.insert(key, due, tag);
            }
            return;
        };
        let tag = conn_tag(link.conn_id);
        match link.keep_alive_deadline() {
            Some(due) => self.timers.keep_alive.insert(key, due, tag),
            None => {
                self.timers.keep_alive.remove(key, tag);
            }
        }
        if !link.is_framed() {
            let due = link.last_seen.saturating_add(PARK_AFTER_TICKS);
            self.timers.park.insert(key, due, tag);
        }
    }

    /// The link of session `key` is going: removes its keep-alive entry.
    pub(super) fn disarm_link(&mut self, key: SessionKey) {
        let Some(link) = self.link_of(key) else {
            return;
        };
        self.timers.keep_alive.remove(key, conn_tag(link.conn_id));
    }

    /// Session `key` went offline, or its delayed will was set: arms (or
    /// moves) its offline entry.
    pub(super) fn arm_offline(&mut self, key: SessionKey) {
        let Some(session) = self.sessions.get(key as usize) else {
            return;
        };
        if session.link.is_some() {
            return;
        }
        if let Some(due) = offline_deadline(session) {
            let tag = session.offline_since;
            self.timers.offline.insert(key, due, tag);
        }
    }
}
