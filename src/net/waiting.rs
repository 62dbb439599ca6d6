//! Accepted sockets whose client has not written yet: each is its socket
//! and a few fields, its readiness watched by the shard's epoll instance
//! ([`crate::net::poller`]), until its first bytes arrive.
//!
//! A connection task that waits for CONNECT holds its handshake's state and
//! a glommio poll source (kilobytes, kept by the allocator afterwards):
//! paid by every accepted socket at once when all clients reconnect after a
//! restart, long before their CONNECT arrives. Here a waiting socket costs
//! an entry in [`Waiting`] and an epoll registration; its task is created
//! only once it is readable (a plain MQTT socket's, only once its whole
//! first packet is in [`WaitingSocket::rx`]). A socket that stays silent,
//! or sends only part of its CONNECT, for the connect timeout is closed by
//! [`Waiting::expire`].

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::time::Instant;

use bytes::BytesMut;

use crate::net::admission::{ConnectionSlot, IpKey};
use crate::net::transport::Acceptor;

/// The bit that marks a poller token as a waiting socket's (the
/// connection layer's tokens start with a session key, which stays far
/// below 2^31).
const WAITING: u64 = 1 << 63;

/// One accepted socket waiting for its first bytes.
pub struct WaitingSocket {
    /// The socket (taken from glommio's accepted stream).
    pub fd: OwnedFd,
    /// How the listener it came in on turns it into a stream.
    pub acceptor: Acceptor,
    /// Its place under `max_connections`.
    pub slot: ConnectionSlot,
    /// The source address `slot` is counted under (0: not counted).
    pub ip_key: IpKey,
    /// When it was accepted: the connect timeout counts from here.
    pub accepted_at: Instant,
    /// The bytes of its first packet read so far, while it is not whole
    /// (plain MQTT listeners, whose CONNECT is read here with `recv`; empty
    /// and unallocated for the others, and until the first bytes).
    pub rx: BytesMut,
    /// The last `recv` of its bytes took less than the read buffer holds:
    /// the socket was drained then, so its connection task waits (arms
    /// epoll, which reports what arrived since) without a `recv` that
    /// would find nothing.
    pub drained: bool,
    /// Its socket is in the shard's epoll set (it was armed once): the
    /// next arming modifies that registration instead of adding one. A
    /// socket whose first bytes were there at its accept never is.
    pub registered: bool,
    /// Tells this entry from a later one at the same slab index (the low
    /// 31 bits of an accept counter), so that a stale token or deadline
    /// matches nothing.
    generation: u32,
}

/// A shard's waiting sockets, and their deadlines in accept order (the
/// connect timeout is the same for all, so the oldest is due first).
#[derive(Default)]
pub struct Waiting {
    /// The waiting sockets, by the index in their token.
    sockets: slab::Slab<WaitingSocket>,
    /// (deadline, index, generation) of every socket added, oldest first;
    /// entries of sockets that left already are skipped when due.
    deadlines: VecDeque<(Instant, usize, u32)>,
    /// Sockets added so far (their generations).
    added: u32,
}

impl Waiting {
    /// Adds an accepted socket, due to close at `deadline`; returns the
    /// token to arm the poller with.
    pub fn insert(
        &mut self,
        fd: OwnedFd,
        acceptor: Acceptor,
        slot: ConnectionSlot,
        ip_key: IpKey,
        accepted_at: Instant,
        deadline: Instant,
    ) -> u64 {
        let generation = self.added & 0x7FFF_FFFF;
        self.added = self.added.wrapping_add(1);
        let index = self.sockets.insert(WaitingSocket {
            fd,
            acceptor,
            slot,
            ip_key,
            accepted_at,
            rx: BytesMut::new(),
            drained: false,
            registered: false,
            generation,
        });
        self.deadlines.push_back((deadline, index, generation));
        WAITING | (u64::from(generation) << 32) | index as u64
    }

    /// Whether `token` is a waiting socket's (rather than a connection's).
    pub fn is_token(token: u64) -> bool {
        token & WAITING != 0
    }

    /// The socket `token` names, still in the table (it became ready, and
    /// its first packet is read into it). None when it has already closed
    /// (timed out) and the slot was reused.
    pub fn get_mut(&mut self, token: u64) -> Option<&mut WaitingSocket> {
        let (index, generation) = Self::split(token);
        self.sockets
            .get_mut(index)
            .filter(|s| s.generation == generation)
    }

    /// Takes the socket `token` names out of the table: it became ready
    /// (or closed). None as for [`Waiting::get_mut`].
    pub fn take(&mut self, token: u64) -> Option<WaitingSocket> {
        let (index, generation) = Self::split(token);
        if self.sockets.get(index)?.generation != generation {
            return None;
        }
        self.sockets.try_remove(index)
    }

    /// A token's slab index and generation.
    fn split(token: u64) -> (usize, u32) {
        let index = (token & u64::from(u32::MAX)) as usize;
        let generation = ((token & !WAITING) >> 32) as u32;
        (index, generation)
    }

    /// Closes the sockets whose deadline is at or before `now` (the client
    /// sent no whole first packet within the connect timeout); returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut closed = 0;
        while let Some(&(deadline, index, generation)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            if self
                .sockets
                .get(index)
                .is_some_and(|s| s.generation == generation)
            {
                // Dropped: the socket closes (leaving the epoll set), the
                // slot gives its place back.
                if let Some(socket) = self.sockets.try_remove(index) {
                    socket.slot.release(socket.ip_key);
                }
                closed += 1;
            }
        }
        if self.is_empty() {
            // Give the memory of a storm back.
            self.deadlines = VecDeque::new();
            self.sockets = slab::Slab::new();
        }
        closed
    }

    /// Closes every waiting socket (the broker stops).
    pub fn clear(&mut self) {
        for socket in self.sockets.drain() {
            socket.slot.release(socket.ip_key);
        }
        self.deadlines = VecDeque::new();
    }

    /// How many sockets wait.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    use crate::net::admission::ConnectionCounts;
    use crate::net::transport::Transport;

    fn socket() -> OwnedFd {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        OwnedFd::from(a)
    }

    fn add(waiting: &mut Waiting, counts: &Arc<ConnectionCounts>, deadline: Instant) -> u64 {
        counts
            .total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        waiting.insert(
            socket(),
            Acceptor::new(Transport::Mqtt, None, 1024),
            ConnectionSlot(counts.clone()),
            0,
            Instant::now(),
            deadline,
        )
    }

    #[test]
    fn a_ready_socket_is_taken_once_and_its_token_is_not_a_connections() {
        let counts = Arc::new(ConnectionCounts::default());
        let mut waiting = Waiting::default();
        let token = add(
            &mut waiting,
            &counts,
            Instant::now() + Duration::from_secs(5),
        );
        assert!(Waiting::is_token(token));
        assert!(!Waiting::is_token(crate::net::poller::token(7, 9)));
        assert!(waiting.take(token).is_some());
        assert!(waiting.take(token).is_none());
        assert!(waiting.is_empty());
    }

    #[test]
    fn silent_sockets_close_at_their_deadline_and_give_their_place_back() {
        let counts = Arc::new(ConnectionCounts::default());
        let mut waiting = Waiting::default();
        let now = Instant::now();
        let early = add(&mut waiting, &counts, now);
        let late = add(&mut waiting, &counts, now + Duration::from_secs(60));
        assert_eq!(waiting.expire(now), 1);
        assert_eq!(counts.total.load(std::sync::atomic::Ordering::Relaxed), 1);
        // The closed one's token matches nothing, even after its index is
        // reused by a new socket.
        let reused = add(&mut waiting, &counts, now + Duration::from_secs(60));
        assert!(waiting.take(early).is_none());
        assert!(waiting.take(reused).is_some());
        assert!(waiting.take(late).is_some());
        assert!(waiting.is_empty());
    }
}
