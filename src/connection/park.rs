//! Parked connections: a plain TCP client with nothing to do holds no task.
//!
//! Most connections of a fan-out broker are subscribers that never send
//! anything but a PINGREQ now and then. Waiting on a socket the glommio way
//! costs, per connection, a task (about 300 bytes with the connection's
//! state) and a poll source (about 500 bytes, allocated by glommio for every
//! wait). A *parked* connection has neither: it is its socket plus a few
//! fields in its session's [`Link`](crate::connection::Link) ([`Parked`]),
//! and its socket is registered, one-shot, with the shard's epoll instance.
//! The shard keeps writing to a parked connection's socket directly, as it
//! writes to every plain connection.
//!
//! A *watcher* thread per shard sleeps in `epoll_wait` and sends the tokens
//! of the sockets that became ready over a `SOCK_SEQPACKET` socket pair to the
//! shard, whose [`receive_ready`] task gives each its connection task back
//! (see [`crate::connection::resume`]); the task runs until the connection
//! has nothing to do again and parks it anew. The watcher never touches shard
//! state: it waits and forwards tokens, so fan-out still takes no lock. Its
//! cost is a thread wake-up per batch of ready sockets, paid only by
//! connections that were idle; a connection that is busy keeps its task.
//!
//! The shard itself wakes a parked connection (to close it, or to write when
//! its socket was full) with [`wake_later`]: the connection goes on this
//! shard's wake list and the [`Unparker`] task resumes it.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures_lite::AsyncReadExt;
use glommio::net::UnixStream;
use log::{debug, warn};

use crate::connection::{self, ConnectionSlot, Rare};
use crate::net::admission::IpKey;
use crate::observe::metrics::ListenerKind;
use crate::shard::{Ctx, SessionKey};

/// Ready sockets the watcher takes from one `epoll_wait` and sends to the
/// shard in one message (8 bytes each: 2 KiB, well under a socket pair's
/// buffer, so a send never splits).
const WATCH_BATCH: usize = 256;

/// The token of the watcher's own end of the socket pair: when the shard's
/// end closes (the shard stopped), the watcher sees a hang-up on it and
/// exits. No connection has it: session keys stay far below `u32::MAX`.
const STOP: u64 = u64::MAX;

/// Errors of the parking machinery.
#[derive(Debug, thiserror::Error)]
pub enum ParkError {
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

/// A parked connection: what its task held that the session's link does
/// not already have. 32 bytes, kept inside the [`Link`](crate::connection::Link),
/// in place of the task (~300 bytes) and glommio's poll source (~500 bytes)
/// it replaces.
#[derive(Debug)]
pub struct Parked {
    /// The socket (`Link::fd` is the same descriptor, for the shard's
    /// writes). Closed when a parked connection is dropped unresumed (the
    /// broker stops).
    pub fd: Option<OwnedFd>,
    /// The session's slab key on this shard.
    pub key: SessionKey,
    /// The source address the connection is counted under (0: none).
    pub ip_key: IpKey,
    /// The listener it came in on.
    pub listener: ListenerKind,
    /// Its place under `max_connections`.
    pub slot: Option<ConnectionSlot>,
    /// Its will and ACL identity, if any.
    pub rare: Option<Box<Rare>>,
}

impl Drop for Parked {
    fn drop(&mut self) {
        // Dropped unresumed (the executor stopped): still give back the
        // per-address count.
        if let Some(slot) = self.slot.take() {
            slot.release(self.ip_key);
        }
    }
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

/// The token a connection's socket is registered with: its session key and
/// the low half of its connection id, so a token that arrives after the
/// connection ended (or its key was reused) matches nothing.
pub fn token(key: SessionKey, conn_id: u64) -> u64 {
    (u64::from(key) << 32) | (conn_id & u64::from(u32::MAX))
}

/// The session key and the connection id's low half in a token.
pub fn split_token(token: u64) -> (SessionKey, u32) {
    ((token >> 32) as SessionKey, token as u32)
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
    pub fn start(shard: usize, cpu: Option<usize>) -> Result<(Poller, UnixStream), ParkError> {
        // SAFETY: plain system calls; the returned descriptors are checked
        // and then owned.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(ParkError::Epoll(io::Error::last_os_error()));
        }
        // SAFETY: `epoll` is a new descriptor nothing else owns.
        let epoll = Arc::new(unsafe { OwnedFd::from_raw_fd(epoll) });
        let mut pair = [0; 2];
        // SAFETY: `pair` has room for the two descriptors.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                pair.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(ParkError::SocketPair(io::Error::last_os_error()));
        }
        // SAFETY: both are new descriptors nothing else owns.
        let (shard_end, watcher_end) =
            unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
        // The watcher learns that the shard stopped from a hang-up on its
        // own end (reported whatever the mask).
        ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            watcher_end.as_raw_fd(),
            STOP,
            0,
        )
        .map_err(ParkError::Watch)?;
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
            .map_err(ParkError::Thread)?;
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
            return ctl(epoll, libc::EPOLL_CTL_ADD, fd, token, events);
        }
        match ctl(epoll, libc::EPOLL_CTL_MOD, fd, token, events) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                ctl(epoll, libc::EPOLL_CTL_ADD, fd, token, events)
            }
            other => other,
        }
    }
}

/// One `epoll_ctl` call.
fn ctl(epoll: RawFd, op: libc::c_int, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
    let mut event = libc::epoll_event { events, u64: token };
    // SAFETY: `event` is a valid epoll_event for the duration of the call.
    if unsafe { libc::epoll_ctl(epoll, op, fd, &mut event) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The watcher thread: waits for ready sockets and sends their tokens to
/// the shard, one message per batch, until the shard's end closes.
fn watch(epoll: &OwnedFd, to_shard: &OwnedFd) {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; WATCH_BATCH];
    let mut message = Vec::with_capacity(WATCH_BATCH * 8);
    loop {
        // SAFETY: `events` has room for WATCH_BATCH entries.
        let n = unsafe {
            libc::epoll_wait(
                epoll.as_raw_fd(),
                events.as_mut_ptr(),
                WATCH_BATCH as libc::c_int,
                -1,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            warn!("watcher: epoll_wait failed: {e}; parked connections no longer wake");
            return;
        }
        message.clear();
        for event in &events[..n as usize] {
            let token = event.u64;
            if token == STOP {
                return;
            }
            message.extend_from_slice(&token.to_ne_bytes());
        }
        loop {
            // SAFETY: `message` is valid for its length; MSG_NOSIGNAL: a
            // closed peer is an error, not a SIGPIPE.
            let sent = unsafe {
                libc::send(
                    to_shard.as_raw_fd(),
                    message.as_ptr().cast(),
                    message.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if sent >= 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                debug!("watcher: shard gone ({e}), stopping");
                return;
            }
        }
    }
}

/// The shard's side of the watcher: resumes the connections whose sockets
/// became ready, until the broker stops.
pub async fn receive_ready(ctx: Ctx, mut from_watcher: UnixStream) {
    let mut message = vec![0u8; WATCH_BATCH * 8];
    loop {
        let n = match from_watcher.read(&mut message).await {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                warn!("shard {}: watcher channel failed: {e}", ctx.id);
                return;
            }
        };
        for bytes in message[..n].chunks_exact(8) {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(bytes);
            connection::socket_ready(&ctx, u64::from_ne_bytes(raw));
        }
    }
}

/// The connections the shard woke while parked, waiting to be resumed.
#[derive(Default)]
struct WakeList {
    /// Each connection's id and parked state.
    parked: Vec<(u64, Parked)>,
    /// The [`Unparker`] task, while it waits for work.
    waker: Option<Waker>,
}

thread_local! {
    /// This shard's wake list (a shard is a thread, and the callers, deep
    /// in shard code, hold the shard borrowed, so it cannot live there).
    static WAKE_LIST: RefCell<WakeList> = RefCell::new(WakeList::default());
}

/// Has parked connection `conn_id` resumed soon (by the [`Unparker`]), for
/// the shard's own reasons: a close request, a full socket to write.
pub fn wake_later(conn_id: u64, parked: Parked) {
    let waker = WAKE_LIST.with(|list| {
        let mut list = list.borrow_mut();
        list.parked.push((conn_id, parked));
        list.waker.take()
    });
    if let Some(waker) = waker {
        waker.wake();
    }
}

/// The task that resumes the connections on this shard's wake list.
pub struct Unparker {
    /// The shard.
    ctx: Ctx,
}

impl Unparker {
    /// The shard's unparker.
    pub fn new(ctx: Ctx) -> Unparker {
        Unparker { ctx }
    }
}

impl Future for Unparker {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let woken = WAKE_LIST.with(|list| {
            let mut list = list.borrow_mut();
            list.waker = Some(cx.waker().clone());
            std::mem::take(&mut list.parked)
        });
        for (conn_id, parked) in woken {
            connection::resume(&self.ctx, conn_id, parked);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            })
            .expect("executor");
        ex.join().expect("join");
    }
}
