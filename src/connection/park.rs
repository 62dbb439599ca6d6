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
//! The shard itself wakes a parked connection (to close it, or to write when
//! its socket was full) with [`wake_later`](crate::session::link::wake_later): the connection goes on this
//! shard's wake list and the [`Unparker`] task resumes it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use futures_lite::AsyncReadExt;
use glommio::net::UnixStream;
use log::warn;

use crate::connection;
use crate::connection::live::{Live, Reading};
use crate::connection::{Established, Wire};
use crate::net::poller;
use crate::net::poller::WATCH_BATCH;
use crate::session::link;
use crate::session::link::{Parked, Waiter};
use crate::shard::Ctx;

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
            connection::resume(&self.ctx, conn_id, parked);
        }
        Poll::Pending
    }
}

/// Gives a parked connection its task back (see [`crate::connection::park`]).
pub fn resume(ctx: &Ctx, conn_id: u64, mut parked: Parked) {
    let Some(fd) = parked.fd.take() else {
        return;
    };
    let mut rare = parked.rare.take();
    let wire = match rare.as_mut().and_then(|r| r.framing.take()) {
        Some(framing) => Wire::Framed(fd, framing),
        None => Wire::Plain(fd),
    };
    glommio::spawn_local(Live {
        ctx: ctx.clone(),
        conn: Some(Established {
            wire,
            rx: BytesMut::new(),
            key: parked.key,
            conn_id,
            version: parked.version,
            rare,
        }),
        slot: parked.slot.take(),
        unprocessed: false,
        reading: Reading {
            fresh_waited: true,
            drained: false,
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
        Waiter::Parked(parked) => resume(ctx, conn_id, parked),
    }
}
