//! Parked connections: a plain TCP client with nothing to do holds no task.
//!
//! Most connections of a fan-out broker are subscribers that never send
//! anything but a PINGREQ now and then. Waiting on a socket the glommio way
//! costs, per connection, a task (about 300 bytes with the connection's
//! state) and a poll source (about 500 bytes, allocated by glommio for every
//! wait). A *parked* connection has neither: it is its socket plus a few
//! fields in its session's [`Link`](crate::session::link::Link) ([`Parked`]),
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
//! The shard itself wakes a parked connection (to close it, to write when
//! its socket was full, or to read the acknowledgements of the QoS 1/2
//! messages it has just written to it, see `Shard::flush_dirty`) with [`wake_later`](crate::session::link::wake_later): the connection goes on this
//! shard's wake list and the [`Unparker`] task resumes it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use futures_lite::AsyncReadExt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};

use glommio::net::{TcpStream, UnixStream};
use log::{debug, warn};

use crate::connection;
use crate::connection::live::{Live, Reading};
use crate::connection::{Established, Wire};
use crate::net::fd;
use crate::net::poller;
use crate::net::poller::Interest;
use crate::net::poller::WATCH_BATCH;
use crate::net::transport::Transport;
use crate::net::waiting::{Waiting, WaitingSocket};
use crate::protocol::v3;
use crate::session::link;
use crate::session::link::{CloseReason, Parked, Waiter};
use crate::shard::{Ctx, Shard};

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
        // Let the tasks this batch started run (and end, or park) before
        // the next batch: in a connect storm the watcher's messages queue
        // up, and reading them all first would start a handshake task for
        // every waiting client at once.
        futures_lite::future::yield_now().await;
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
        let woken = link::take_woken(cx.waker());
        for (conn_id, parked) in woken {
            connection::resume(&self.ctx, conn_id, parked, BytesMut::new());
        }
        Poll::Pending
    }
}

/// Gives a parked connection its task back (see [`crate::connection::park`]).
/// `rx`: bytes already read from its socket, handled first.
pub fn resume(ctx: &Ctx, conn_id: u64, mut parked: Parked, rx: BytesMut) {
    let Some(fd) = parked.fd.take() else {
        return;
    };
    let mut rare = parked.rare.take();
    let wire = match rare.as_mut().and_then(|r| r.framing.take()) {
        // `rx` is empty here: `answer_ping` reads only plain sockets, whose
        // bytes are MQTT bytes; a framed socket's bytes go through its
        // framing, which the task reads itself.
        Some(framing) => Wire::Framed(fd, framing),
        None => Wire::Plain(fd),
    };
    let unprocessed = !rx.is_empty();
    glommio::spawn_local(Live {
        ctx: ctx.clone(),
        conn: Some(Established {
            wire,
            rx,
            key: parked.key,
            conn_id,
            version: parked.version,
            rare,
        }),
        slot: parked.slot.take(),
        unprocessed,
        reading: Reading {
            fresh_waited: true,
            drained: false,
            full: false,
            low_water: 1,
            heard: unprocessed,
            // It was armed before it parked.
            registered: true,
        },
        forwarding: None,
        ended: None,
        listener: parked.listener,
        ip_key: parked.ip_key,
    })
    .detach();
}

/// The socket registered with `token` (see [`crate::net::poller::token`]) is ready: wakes
/// its connection, resuming it if parked. A token of a connection that has
/// ended, or that is running, changes nothing (a running task reads its
/// socket before it waits again).
pub fn socket_ready(ctx: &Ctx, token: u64) {
    if Waiting::is_token(token) {
        return first_bytes(ctx, token);
    }
    let (key, conn_tag) = poller::split_token(token);
    let (conn_id, waiter) = {
        let mut shard = ctx.shard.borrow_mut();
        let Some(link) = shard
            .sessions
            .get_mut(key as usize)
            .and_then(|s| s.link.as_mut())
            .filter(|l| l.conn_id as u32 == conn_tag)
        else {
            return;
        };
        (link.conn_id, std::mem::take(&mut link.waiter))
    };
    match waiter {
        Waiter::Running => {}
        Waiter::Task(waker) => waker.wake(),
        Waiter::Parked(parked) => {
            if let Some((parked, rx)) = answer_ping(ctx, token, parked) {
                resume(ctx, conn_id, parked, rx);
            }
        }
    }
}

/// A parked connection's socket is readable. When all it holds is one
/// PINGREQ (§3.12), what an idle subscriber sends every keep-alive, and it
/// is plain TCP (a TLS or WebSocket one resumes: its bytes are framed), the
/// shard answers it here: the keep-alive clock moves on, PINGRESP is
/// sent at once (queued and flushed like any write to a parked socket when
/// something else waits to go out first), and the socket is armed again; the connection stays parked (no task, no buffer). Anything
/// else (other bytes, the peer's close, a connection being closed or
/// waiting to write) returns the connection with the bytes read, for
/// [`resume`].
fn answer_ping(ctx: &Ctx, token: u64, parked: Parked) -> Option<(Parked, BytesMut)> {
    let key = parked.key;
    // A TLS or WebSocket socket holds records or frames, not MQTT bytes:
    // its task reads them through its framing.
    if parked.rare.as_ref().is_some_and(|r| r.framing.is_some()) {
        return Some((parked, BytesMut::new()));
    }
    let Some(fd) = parked.fd.as_ref().map(AsRawFd::as_raw_fd) else {
        return Some((parked, BytesMut::new()));
    };
    let mut guard = ctx.shard.borrow_mut();
    let shard = &mut *guard;
    let now = shard.now_ticks();
    let Some(session) = shard.sessions.get_mut(key as usize).filter(|s| {
        s.link
            .as_ref()
            .is_some_and(|l| poller::token(key, l.conn_id) == token)
    }) else {
        return Some((parked, BytesMut::new()));
    };
    if !session
        .link
        .as_ref()
        .is_some_and(|l| l.close.is_none() && !l.blocked)
    {
        return Some((parked, BytesMut::new()));
    }
    // One byte more than a PINGREQ: a socket holding more goes to the task.
    let mut head = [0u8; v3::PINGREQ_BYTES.len() + 1];
    let pinged = match fd::recv(fd, &mut head) {
        Ok(n) if head[..n] == v3::PINGREQ_BYTES => true,
        // Woken for nothing: wait again.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Ok(n) => {
            shard.stats.bytes_received += n as u64;
            return Some((parked, BytesMut::from(&head[..n])));
        }
        // The task's own read sees the error (or the close) again.
        Err(_) => return Some((parked, BytesMut::new())),
    };
    // Whether the PINGRESP waits in the queue for `flush_dirty`.
    let mut queued = false;
    if pinged {
        // Nothing else to send and no hold for the journal (the idle case):
        // one send, no queue (whose memory a parked connection has given
        // back) and no flush.
        let held = session
            .link
            .as_ref()
            .is_some_and(|l| shard.held_out.waits(key, l.conn_id));
        let sent = if session.out.is_empty() && !held {
            send_some(fd, &v3::PINGRESP_BYTES)
        } else {
            0
        };
        shard.stats.bytes_sent += sent as u64;
        if let Some(rest) = v3::PINGRESP_BYTES.get(sent..).filter(|r| !r.is_empty()) {
            session.queue_control(rest);
            queued = true;
        }
        shard.stats.packets_received += 1;
        shard.stats.pingreq_parked += 1;
        shard.stats.bytes_received += v3::PINGREQ_BYTES.len() as u64;
    }
    let Some(link) = session.link.as_mut() else {
        return Some((parked, BytesMut::new()));
    };
    if pinged {
        link.last_seen = now;
    }
    link.waiter = Waiter::Parked(parked);
    let read = Interest {
        read: true,
        write: false,
    };
    if let Err(e) = ctx.poller.arm(fd, token, read, false) {
        warn!("socket {fd}: cannot watch it again ({e}), closing");
        link.close(CloseReason::Io);
    }
    if queued {
        shard.mark_dirty(key);
        shard.flush_dirty();
    }
    None
}

/// One non-blocking send of `bytes` to a plain socket: how many it took (0
/// when full or broken: the queued rest goes through the flush, which sees
/// the error again).
fn send_some(fd: std::os::fd::RawFd, bytes: &[u8]) -> usize {
    let iovec = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    fd::send_vectored(fd, &[iovec]).unwrap_or(0)
}

/// An accepted socket that waited for its first bytes ([`crate::net::waiting`])
/// is readable. A plain MQTT socket's bytes are read here, with `recv` into
/// the shard's read buffer, and kept in its waiting entry until its first
/// packet is whole: a CONNECT that comes in pieces waits on, still without
/// a task, until the connect timeout. The whole packet is handed to
/// [`crate::connection::serve_socket`] (the socket stays in the epoll set
/// if it waited there, and parks there). A socket accepted with its bytes
/// already there is read here at once, and added to the epoll set only if
/// they are not its whole first packet. A TLS or WebSocket socket leaves the epoll set for
/// glommio's stream, and its connection task starts
/// ([`crate::connection::serve`]): its first bytes are its transport's
/// handshake.
fn first_bytes(ctx: &Ctx, token: u64) {
    let mut guard = ctx.shard.borrow_mut();
    let Shard {
        waiting,
        read_buf,
        stats,
        config,
        ..
    } = &mut *guard;
    let Some(socket) = waiting.get_mut(token) else {
        // Closed at its deadline meanwhile.
        return;
    };
    if socket.acceptor.transport != Transport::Mqtt {
        let Some(socket) = waiting.take(token) else {
            return;
        };
        drop(guard);
        return to_glommio(ctx, socket);
    }
    let raw = socket.fd.as_raw_fd();
    let whole = match fd::recv(raw, read_buf) {
        // The client closed before its CONNECT was whole.
        Ok(0) => None,
        Ok(n) => {
            stats.bytes_received += n as u64;
            socket.drained = n < read_buf.len();
            socket.rx.extend_from_slice(&read_buf[..n]);
            match v3::peek_frame_len(&socket.rx, config.max_packet_size) {
                Ok(Some(size)) => Some(socket.rx.len() >= size),
                Ok(None) => Some(false),
                // Not the start of a packet a server takes: the decoder
                // refuses it (and logs why).
                Err(_) => Some(true),
            }
        }
        // Woken for nothing: wait again.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(false),
        Err(_) => None,
    };
    match whole {
        Some(true) => {
            let Some(socket) = waiting.take(token) else {
                return;
            };
            drop(guard);
            glommio::spawn_local(connection::serve_socket(ctx.clone(), socket)).detach();
        }
        Some(false) => {
            let read = Interest {
                read: true,
                write: false,
            };
            // Added the first time (its bytes were not there at its
            // accept, or only part of them), re-armed after that.
            match ctx.poller.arm(raw, token, read, !socket.registered) {
                Ok(()) => socket.registered = true,
                Err(e) => {
                    debug!("socket {raw}: cannot watch it ({e}), closing");
                    if let Some(socket) = waiting.take(token) {
                        socket.slot.release(socket.ip_key);
                    }
                }
            }
        }
        None => {
            // Dropped: the socket closes (and leaves the epoll set).
            if let Some(socket) = waiting.take(token) {
                socket.slot.release(socket.ip_key);
            }
        }
    }
}

/// A TLS or WebSocket socket that waited for its first bytes: it leaves
/// the epoll set for glommio's stream, and its connection task starts.
fn to_glommio(ctx: &Ctx, waiting: WaitingSocket) {
    let raw = waiting.fd.into_raw_fd();
    if let Err(e) = ctx.poller.forget(raw) {
        debug!("socket {raw}: not in the epoll set ({e})");
    }
    // SAFETY: `raw` is the accepted socket, owned until now by the waiting
    // entry; glommio's stream takes it over (and closes it).
    let tcp = unsafe { TcpStream::from_raw_fd(raw) };
    glommio::spawn_local(connection::serve(
        ctx.clone(),
        tcp,
        waiting.acceptor,
        waiting.slot,
        waiting.ip_key,
        waiting.accepted_at,
    ))
    .detach();
}
