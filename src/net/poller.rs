//! A shard's epoll instance and its watcher thread: how sockets without a
//! task (parked connections) are waited on.
//!
//! Waiting on a socket the glommio way costs, per socket, a task and a poll
//! source (about 500 bytes, allocated by glommio for every wait). A socket
//! armed here costs an epoll registration. A *watcher* thread per shard
//! sleeps in `epoll_wait` and sends the tokens of the sockets that became
//! ready over a `SOCK_SEQPACKET` socket pair to the shard, which reads them
//! like any other socket. The watcher never touches shard state: it waits and
//! forwards tokens, so fan-out still takes no lock. Arming is one-shot: a
//! ready socket is reported once, then only after it is armed again.
//!
//! This module knows sockets and tokens only; what a token means (a session
//! key and a connection id) is the connection layer's business.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use glommio::net::UnixStream;
use log::{debug, warn};

use crate::net::fd;

/// Ready sockets the watcher takes from one `epoll_wait` and sends to the
/// shard in one message (8 bytes each: 2 KiB, well under a socket pair's
/// buffer, so a send never splits).
pub const WATCH_BATCH: usize = 256;

/// The token of the watcher's own end of the socket pair: when the shard's
/// end closes (the shard stopped), the watcher sees a hang-up on it and
/// exits. No connection has it: session keys stay far below `u32::MAX`.
const STOP: u64 = u64::MAX;

/// Errors starting a shard's poller.
#[derive(Debug, thiserror::Error)]
pub enum PollerError {
    /// `epoll_create1` failed.
    #[error("cannot create the shard's epoll instance: {0}")]
    Epoll(io::Error),
    /// `socketpair` failed.
    #[error("cannot create the watcher's socket pair: {0}")]
    SocketPair(io::Error),
    /// The watcher thread could not start.
    #[error("cannot start the watcher thread: {0}")]
    Thread(io::Error),
    /// `epoll_ctl` refused a socket.
    #[error("cannot watch a socket: {0}")]
    Watch(io::Error),
}

/// What a waiting connection needs its socket to become: readable (it waits
/// for the client's packets), writable (its queue did not fit the socket's
/// send buffer), or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest {
    /// Wake when the client sent something (or closed).
    pub read: bool,
    /// Wake when the socket takes more bytes.
    pub write: bool,
}

impl Interest {
    /// The epoll event mask: one-shot, so a ready socket is reported once
    /// and then only after it is armed again (by the next wait).
    fn events(self) -> u32 {
        let mut events = libc::EPOLLONESHOT as u32;
        if self.read {
            events |= libc::EPOLLIN as u32;
        }
        if self.write {
            events |= libc::EPOLLOUT as u32;
        }
        events
    }
}

/// The token a connection's socket is registered with: its session key (a
/// `SessionKey`) and the low half of its connection id, so a token that arrives after the
/// connection ended (or its key was reused) matches nothing.
pub fn token(key: u32, conn_id: u64) -> u64 {
    (u64::from(key) << 32) | (conn_id & u64::from(u32::MAX))
}

/// The session key and the connection id's low half in a token.
pub fn split_token(token: u64) -> (u32, u32) {
    ((token >> 32) as u32, token as u32)
}

/// A shard's epoll instance, which the watcher thread waits on.
#[derive(Debug)]
pub struct Poller {
    /// The epoll instance (shared with the watcher thread, which only
    /// waits on it).
    epoll: Arc<OwnedFd>,
}

impl Poller {
    /// Creates the epoll instance and starts its watcher thread, pinned to
    /// `cpu` (the shard's). Returns the poller and the shard's end of the
    /// socket pair, for [`receive_ready`].
    ///
    /// # Errors
    /// The system refusing an epoll instance, a socket pair or a thread.
    pub fn start(shard: usize, cpu: Option<usize>) -> Result<(Poller, UnixStream), PollerError> {
        let epoll = Arc::new(fd::epoll_create().map_err(PollerError::Epoll)?);
        let (shard_end, watcher_end) = fd::seqpacket_pair().map_err(PollerError::SocketPair)?;
        // The watcher learns that the shard stopped from a hang-up on its
        // own end (reported whatever the mask).
        fd::epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            watcher_end.as_raw_fd(),
            STOP,
            0,
        )
        .map_err(PollerError::Watch)?;
        let watched = epoll.clone();
        std::thread::Builder::new()
            .name(format!("fanmq-watch-{shard}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    // Beside its shard: the wake-ups it sends stay on one core.
                    core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
                }
                watch(&watched, &watcher_end);
            })
            .map_err(PollerError::Thread)?;
        // SAFETY: `shard_end` is an owned socket, handed over to glommio
        // (which makes it non-blocking and closes it when dropped).
        let stream =
            unsafe { UnixStream::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(shard_end)) };
        Ok((Poller { epoll }, stream))
    }

    /// Arms `fd` to be reported once with `token` when it becomes ready as
    /// `interest` says. `new`: the socket was never registered (its first
    /// wait), so it is added in one call; otherwise its registration is
    /// re-armed (added after all if it is missing).
    ///
    /// # Errors
    /// `epoll_ctl` failing (the socket is gone, or the system is out of
    /// memory for the registration).
    pub fn arm(&self, fd: RawFd, token: u64, interest: Interest, new: bool) -> io::Result<()> {
        let events = interest.events();
        let epoll = self.epoll.as_raw_fd();
        if new {
            return fd::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, token, events);
        }
        match fd::epoll_ctl(epoll, libc::EPOLL_CTL_MOD, fd, token, events) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                fd::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, token, events)
            }
            other => other,
        }
    }

    /// Removes `fd` from the epoll instance, so that a registration armed
    /// earlier does not report it again: a connection that waits on
    /// glommio's stream from now on (acknowledgements owed, see
    /// `connection::live`), or an accepted socket that waited for its first
    /// bytes and is handed to glommio (a descriptor duplicated later keeps
    /// the open file, and with it a stale registration, alive). A socket
    /// that was never registered is not an error.
    ///
    /// # Errors
    /// `epoll_ctl` failing for another reason (the socket is closed).
    pub fn forget(&self, fd: RawFd) -> io::Result<()> {
        match fd::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, 0, 0) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
    }
}

/// The watcher thread: waits for ready sockets and sends their tokens to
/// the shard, one message per batch, until the shard's end closes.
fn watch(epoll: &OwnedFd, to_shard: &OwnedFd) {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; WATCH_BATCH];
    let mut message = Vec::with_capacity(WATCH_BATCH * 8);
    loop {
        let n = match fd::epoll_wait(epoll, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!("watcher: epoll_wait failed: {e}; parked connections no longer wake");
                return;
            }
        };
        message.clear();
        for event in &events[..n] {
            let token = event.u64;
            if token == STOP {
                return;
            }
            message.extend_from_slice(&token.to_ne_bytes());
        }
        loop {
            match fd::send(to_shard, &message) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("watcher: shard gone ({e}), stopping");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::AsyncReadExt;

    #[test]
    fn token_round_trips_key_and_connection() {
        let t = token(7, 0x1_2345_6789);
        assert_eq!(split_token(t), (7, 0x2345_6789));
        assert_ne!(t, STOP);
    }

    #[test]
    fn interest_asks_for_what_the_connection_waits_for() {
        let oneshot = libc::EPOLLONESHOT as u32;
        let read = Interest {
            read: true,
            write: false,
        };
        assert_eq!(read.events(), oneshot | libc::EPOLLIN as u32);
        let both = Interest {
            read: true,
            write: true,
        };
        assert_eq!(
            both.events(),
            oneshot | libc::EPOLLIN as u32 | libc::EPOLLOUT as u32
        );
    }

    /// A parked socket armed for reading is reported once, with its token,
    /// through the watcher and the socket pair, when its peer writes.
    #[test]
    fn watcher_reports_an_armed_socket_once() {
        use std::io::Write;
        let ex = glommio::LocalExecutorBuilder::default()
            .spawn(|| async move {
                let (poller, mut from_watcher) = Poller::start(0, None).expect("poller");
                let (mut peer, ours) = std::os::unix::net::UnixStream::pair().expect("pair");
                let read = Interest {
                    read: true,
                    write: false,
                };
                poller.arm(ours.as_raw_fd(), 42, read, true).expect("arm");
                peer.write_all(b"x").expect("write");
                let mut message = [0u8; 64];
                let n = from_watcher.read(&mut message).await.expect("read");
                assert_eq!(n, 8);
                assert_eq!(u64::from_ne_bytes(message[..8].try_into().unwrap()), 42);
                // One-shot: the second write is not reported with the old
                // token; the next report is the re-armed one.
                peer.write_all(b"y").expect("write");
                poller
                    .arm(ours.as_raw_fd(), 43, read, false)
                    .expect("re-arm");
                let n = from_watcher.read(&mut message).await.expect("read");
                assert_eq!(u64::from_ne_bytes(message[..n].try_into().unwrap()), 43);
                // Forgotten while armed: it is no longer registered (so it
                // can be added anew), and forgetting it twice is no error.
                let mut drained = [0u8; 2];
                std::io::Read::read_exact(&mut &ours, &mut drained).expect("drain");
                poller
                    .arm(ours.as_raw_fd(), 44, read, false)
                    .expect("re-arm");
                poller.forget(ours.as_raw_fd()).expect("forget");
                poller.forget(ours.as_raw_fd()).expect("forget twice");
                peer.write_all(b"z").expect("write");
                poller
                    .arm(ours.as_raw_fd(), 45, read, true)
                    .expect("add anew");
                let n = from_watcher.read(&mut message).await.expect("read");
                assert_eq!(u64::from_ne_bytes(message[..n].try_into().unwrap()), 45);
            })
            .expect("executor");
        ex.join().expect("join");
    }
}
