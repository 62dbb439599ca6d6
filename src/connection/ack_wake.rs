//! Waking a subscriber that owes acknowledgements once per batch of them.
//!
//! A QoS 1 subscriber that acknowledges each message in its own write (paho,
//! MQTT.js, mosquitto_sub) sends the broker one 4-byte PUBACK per message.
//! Woken for each, the connection's task pays a completion of glommio's poll,
//! a `recv`, a new poll and a pass through the executor for 4 bytes. While
//! the client owes several, its socket's receive low-water mark
//! (SO_RCVLOWAT) is raised so that the kernel reports it readable only once
//! the acknowledgements of up to `acks_per_wake` messages (4 bytes each,
//! [`ACK_BYTES`]) have arrived: one wake-up reads them all.
//!
//! It is raised only while the client owes at least a quarter of its
//! inflight window ([`crate::session::REFILL_SHARE`]; at least 2): a fan-out
//! burst, a full window being refilled. A client that owes one or two now
//! and then (a paced subscriber, a client that publishes as well) is woken
//! by every byte, as before.
//!
//! The mark never asks for more bytes than the acknowledgements the client
//! owes: every PUBACK, PUBREC and PUBCOMP is at least 4 bytes (3.1.1 and
//! 5.0 alike), so a client that acknowledges everything it was sent always
//! reaches it, and the last acknowledgements of a burst are read as soon as
//! they are all in. What a client sends besides (a PINGREQ, a SUBSCRIBE, a
//! DISCONNECT) while it still owes acknowledgements, or a client that
//! acknowledges slowly, waits at most [`ACK_PATIENCE`]: the wait on
//! glommio's stream has that read timeout while the mark is raised, and
//! when it passes the mark goes back to 1 and whatever arrived is read. A
//! closing peer is reported whatever the mark. The mark is 1 whenever the
//! connection leaves glommio's stream (a parked socket, watched through
//! epoll, has no timeout to bound the wait).
//!
//! The first wait: a parked connection that the shard sends QoS 1/2
//! messages gets its task back at once (`Shard::flush_dirty`), before the
//! client has acknowledged anything. Its task keeps the mark at 1 until it
//! has read something from the client (`Reading::heard`): a client reads
//! the burst before it acknowledges it, which under load takes longer than
//! [`ACK_PATIENCE`], and a mark that times out before the first
//! acknowledgement only adds a wake-up and two system calls. The first
//! acknowledgements wake it (usually together, being written back to back),
//! and the mark is raised for the rest.

use std::os::fd::AsRawFd;
use std::time::Duration;

use glommio::net::TcpStream;
use log::debug;

use crate::net::fd;
use crate::session::REFILL_SHARE;

/// The smallest acknowledgement of a QoS 1/2 message in bytes: a 3.1.1
/// PUBACK, PUBREC or PUBCOMP, and a 5.0 one with its Reason Code left out
/// (Success); longer ones only reach the mark earlier.
pub(super) const ACK_BYTES: u32 = 4;

/// How long a connection waits, with its mark raised, before it reads
/// whatever arrived: the bound on how late a packet of a client that still
/// owes acknowledgements is read (a keep-alive is counted in seconds).
pub(super) const ACK_PATIENCE: Duration = Duration::from_millis(50);

/// The receive low-water mark, in bytes, for a connection that owes `owed`
/// acknowledgements with an inflight window of `window`, read for up to
/// `per_wake` at once: 1 (every byte wakes it) when it owes less than a
/// quarter of its window or fewer than 2, or batching is off (`per_wake` 1).
pub(super) fn low_water(owed: usize, window: usize, per_wake: usize) -> u32 {
    let batch = owed.min(per_wake);
    if batch < 2 || owed < window / REFILL_SHARE {
        return 1;
    }
    u32::try_from(batch).map_or(u32::MAX, |b| b.saturating_mul(ACK_BYTES))
}

/// Sets the mark of `tcp`, whose mark is `current` (0 or 1: the kernel's
/// default), to `want`, with the read timeout that bounds a raised mark.
/// A lower mark is always set (the client may owe fewer acknowledgements
/// than the mark asks for); a higher one only once it at least doubles the
/// current one, which spares a system call per wake-up when the number owed
/// moves by a few. Returns false when the system refused (the mark stays as
/// it was).
pub(super) fn apply(tcp: &TcpStream, current: &mut u32, want: u32) -> bool {
    let now = (*current).max(1);
    if want == now || (want > now && want < now.saturating_mul(2)) {
        return true;
    }
    if let Err(e) = fd::set_receive_low_water(tcp.as_raw_fd(), want) {
        debug!("socket {}: SO_RCVLOWAT refused ({e})", tcp.as_raw_fd());
        return false;
    }
    // Only `Some(0)` is refused, never passed here.
    let timeout = (want > 1).then_some(ACK_PATIENCE);
    let _ = tcp.set_read_timeout(timeout);
    *current = want;
    true
}

/// Puts the mark of socket `raw` back to the kernel's default when it is
/// raised (`current` over 1): before the connection waits through epoll,
/// where no timeout bounds the wait.
pub(super) fn reset(raw: std::os::fd::RawFd, current: &mut u32) {
    if *current > 1 {
        if let Err(e) = fd::set_receive_low_water(raw, 1) {
            debug!("socket {raw}: SO_RCVLOWAT refused ({e})");
        }
        *current = 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_asks_for_no_more_than_the_acknowledgements_owed() {
        assert_eq!(low_water(0, 100, 64), 1);
        assert_eq!(low_water(25, 100, 64), 100, "a quarter of the window");
        assert_eq!(low_water(50, 100, 64), 200, "a burst of 50");
        assert_eq!(low_water(100, 100, 64), 256, "a full window: 64 at once");
        assert_eq!(low_water(65_535, 65_535, 1024), 4096);
        assert_eq!(low_water(2, 8, 64), 8, "a small window: from 2 owed");
    }

    #[test]
    fn a_client_owing_under_a_quarter_of_its_window_is_woken_by_every_byte() {
        assert_eq!(low_water(1, 1, 64), 1, "one PUBACK: any byte wakes");
        assert_eq!(low_water(1, 4, 64), 1);
        assert_eq!(low_water(24, 100, 64), 1);
        assert_eq!(low_water(3, 100, 64), 1, "a paced or publishing client");
    }

    #[test]
    fn one_ack_per_wake_turns_it_off() {
        for owed in [0, 2, 100, 65_535] {
            assert_eq!(low_water(owed, 100, 1), 1);
        }
    }
}
