//! Log lines a client can trigger, rate-limited per kind (issue #16).
//!
//! A client must not be able to make the broker write unbounded logs (fill a
//! disk or a journald quota): every log line that a client's packets or
//! connections trigger (protocol errors, refusals, denials, drops, limits)
//! goes through [`limited!`], which writes at most one line per
//! [`LogKind`] per [`LOG_INTERVAL`] on each shard and says on the next line
//! how many were left out meanwhile. The events themselves are still counted
//! in full by their own counters ([`crate::observe::counters::Counters`]); the lines left
//! out are counted too (`fanmq_log_lines_suppressed_total`).
//!
//! The state is per thread: a shard is one thread, so this costs no atomics
//! and no borrow of the shard at call sites that already hold one.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

/// At most one line per kind per shard in this interval: 20k bad packets
/// cost a handful of lines, and an operator still learns within seconds
/// that it happens (the next line carries the count left out).
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What a rate-limited line is about; the names follow the MQTT 3.1.1
/// specification or the configuration key of the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogKind {
    /// A malformed packet or protocol violation closed a connection (§4.8).
    ProtocolError,
    /// CONNACK 1, 2 or 3: protocol version, identifier rejected, server
    /// unavailable (§3.2.2.3).
    ConnectRefused,
    /// CONNACK 5: not authorized (password file, anonymous).
    NotAuthorized,
    /// A PUBLISH or will denied by the ACL, or sent to `$SYS`.
    PublishDenied,
    /// A QoS 2 PUBLISH over `max_awaiting_rel`, dropped.
    MaxAwaitingRel,
    /// A SUBSCRIBE topic filter refused (SUBACK 0x80): invalid, over a
    /// limit, or denied by the ACL.
    SubscribeRefused,
    /// A new connection closed at once: `max_connections` reached.
    MaxConnections,
    /// A new connection closed at once: `max_connection_rate` reached.
    MaxConnectionRate,
    /// A new connection closed at once: `max_connections_per_ip` reached.
    MaxConnectionsPerIp,
    /// A new connection closed at once: `max_connection_rate_per_ip` reached.
    MaxConnectionRatePerIp,
    /// A retained QoS 1/2 PUBLISH refused: persistence cannot store it.
    StoreRefused,
    /// A connection on a `proxy_protocol` listener closed: no valid PROXY
    /// protocol header in time.
    ProxyProtocol,
    /// An accept call failed (out of descriptors or memory).
    AcceptFailed,
}

/// Number of [`LogKind`]s.
const KINDS: usize = LogKind::AcceptFailed as usize + 1;

/// This thread's (shard's) rate-limit state.
#[derive(Debug, Default)]
struct Limiter {
    /// When each kind last wrote a line.
    last: [Option<Instant>; KINDS],
    /// Lines of each kind left out since its last line.
    suppressed: [u64; KINDS],
}

thread_local! {
    /// This shard's limiter (a shard is one thread).
    static LIMITER: RefCell<Limiter> = RefCell::new(Limiter::default());
    /// Lines left out on this shard so far, every kind.
    static SUPPRESSED_TOTAL: Cell<u64> = const { Cell::new(0) };
}

/// Whether a line of `kind` may be written now: Some(lines of that kind left
/// out since the last one) if so; None (and counted) if not.
pub fn allow(kind: LogKind) -> Option<u64> {
    allow_at(kind, Instant::now())
}

/// [`allow`] at time `now`.
fn allow_at(kind: LogKind, now: Instant) -> Option<u64> {
    LIMITER.with_borrow_mut(|l| {
        let i = kind as usize;
        if l.last[i].is_some_and(|t| now.saturating_duration_since(t) < LOG_INTERVAL) {
            l.suppressed[i] += 1;
            SUPPRESSED_TOTAL.with(|c| c.set(c.get() + 1));
            return None;
        }
        l.last[i] = Some(now);
        Some(std::mem::take(&mut l.suppressed[i]))
    })
}

/// Lines left out on this shard so far (a counter for the metrics).
pub fn suppressed_total() -> u64 {
    SUPPRESSED_TOTAL.with(Cell::get)
}

/// The tail of a line after some were left out: empty, or the count.
#[derive(Debug, Clone, Copy)]
pub struct Suppressed(pub u64);

impl std::fmt::Display for Suppressed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0 => Ok(()),
            n => write!(
                f,
                " ({n} more like this not logged in the last {LOG_INTERVAL:?})"
            ),
        }
    }
}

/// `limited!(kind, level, format, args...)`: logs at `level` (a `log`
/// macro name: `debug`, `info`, `warn`) unless a line of `kind` was written
/// on this shard in the last [`LOG_INTERVAL`] (see the module docs). The
/// arguments are only evaluated when the line is written.
macro_rules! limited {
    ($kind:expr, $level:ident, $($arg:tt)+) => {
        if let Some(suppressed) = $crate::observe::log_limit::allow($kind) {
            log::$level!(
                "{}{}",
                format_args!($($arg)+),
                $crate::observe::log_limit::Suppressed(suppressed)
            );
        }
    };
}
pub(crate) use limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_per_interval_with_the_count_left_out() {
        let t0 = Instant::now();
        assert_eq!(allow_at(LogKind::MaxAwaitingRel, t0), Some(0));
        for _ in 0..20_000 {
            assert_eq!(allow_at(LogKind::MaxAwaitingRel, t0), None);
        }
        // Another kind has its own budget.
        assert_eq!(allow_at(LogKind::ProtocolError, t0), Some(0));
        assert_eq!(suppressed_total(), 20_000);
        let later = t0 + LOG_INTERVAL;
        assert_eq!(allow_at(LogKind::MaxAwaitingRel, later), Some(20_000));
        assert_eq!(allow_at(LogKind::MaxAwaitingRel, later), None);
        assert_eq!(Suppressed(0).to_string(), "");
        assert_eq!(
            Suppressed(3).to_string(),
            " (3 more like this not logged in the last 10s)"
        );
    }
}
