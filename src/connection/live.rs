//! `Live`: a connected client's task, a small hand-written future that
//! loops read ► decode ► act ► flush until the connection must close, waits
//! for its socket (on glommio's stream at first, then through the shard's
//! epoll instance so that it can park), and writes a framed (TLS, WebSocket)
//! connection's queue through its stream.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use futures_lite::AsyncRead;
use log::{debug, warn};

use super::ack_wake;
use super::dispatch::process;
use super::{Established, Event, Peer, Wire, teardown};
use crate::net::admission::{ConnectionSlot, IpKey};
use crate::net::fd;
use crate::net::framing::{Framing, FramingError, Received};
use crate::net::poller::{self, Interest};
use crate::net::transport::Transport;
use crate::session::link::{CloseReason, Parked, ParkedCount, Waiter};
use crate::session::outqueue::{Flushed, OutQueue};
use crate::shard::{Ctx, Shard};

/// The connection's main loop, as a future that ends with why the
/// connection ended: wait for bytes (or a close request, or writability
/// when the socket was full), handle every complete packet, flush, hand the
/// publishes to the other shards.
pub(super) struct Live {
    /// The shard.
    pub(super) ctx: Ctx,
    /// The connection; taken by the teardown when it ends.
    pub(super) conn: Option<Established>,
    /// The connection's place under `max_connections`, given back at the end.
    pub(super) slot: Option<ConnectionSlot>,
    /// Bytes that arrived with CONNECT wait in `conn.rx`: handle them before
    /// reading.
    pub(super) unprocessed: bool,
    /// What the task knows of its plain socket's reading.
    pub(super) reading: Reading,
    /// Publishes being handed to other shards, then the teardown (boxed:
    /// rarely in progress, and each may wait on the mesh).
    pub(super) forwarding: Option<Pin<Box<dyn Future<Output = ()>>>>,
    /// Why the connection ends, once known, while `forwarding` completes.
    pub(super) ended: Option<CloseReason>,
    /// The listener it came in on (per-listener connection gauge; fits in
    /// the struct's padding).
    pub(super) listener: Transport,
    /// The source address `slot` is counted under (0: not counted); fits
    /// in the struct's padding too.
    pub(super) ip_key: IpKey,
}

impl Drop for Live {
    fn drop(&mut self) {
        // Dropped before its end (the executor stopped): still give back
        // the per-address count.
        if let Some(slot) = self.slot.take() {
            slot.release(self.ip_key);
        }
    }
}

impl Future for Live {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            if let Some(forwarding) = this.forwarding.as_mut() {
                if forwarding.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.forwarding = None;
            }
            let Some(conn) = this.conn.as_mut() else {
                // The teardown has finished.
                if let Some(slot) = this.slot.take() {
                    slot.release(this.ip_key);
                    let mut shard = this.ctx.shard.borrow_mut();
                    let gauge = &mut shard.stats.clients_by_listener[this.listener.index()];
                    *gauge = gauge.saturating_sub(1);
                }
                return Poll::Ready(());
            };
            if let Some(reason) = this.ended {
                this.end(reason);
                continue;
            }
            if this.unprocessed {
                this.unprocessed = false;
            } else {
                match poll_event(cx, &this.ctx, conn, &mut this.reading) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Event::Closed(reason)) => {
                        this.end(reason);
                        continue;
                    }
                    Poll::Ready(Event::Wait(interest)) => match this.wait(cx, interest) {
                        Ok(Waited::Parked) => return Poll::Ready(()),
                        Ok(Waited::Pending) => {
                            // Woken, it reads before it waits again.
                            this.reading.drained = false;
                            return Poll::Pending;
                        }
                        Ok(Waited::InTask) => {
                            this.reading.fresh_waited = false;
                            continue;
                        }
                        Err(reason) => {
                            this.end(reason);
                            continue;
                        }
                    },
                    Poll::Ready(Event::Data) => {}
                }
            }
            let (step, forward) = {
                let mut shard = this.ctx.shard.borrow_mut();
                let mut step = process(
                    &mut shard,
                    conn.key,
                    conn.conn_id,
                    &mut conn.rx,
                    &mut conn.rare,
                );
                // A full read buffer: the client is sending a burst. Read
                // on before the flush, so that each subscriber gets one
                // write (and each other shard one batch) for all of it.
                let mut reads = 1;
                while step.is_ok() && this.reading.full && reads < MAX_READS_PER_STEP {
                    if !read_on(&mut shard, conn, &mut this.reading) {
                        break;
                    }
                    step = process(
                        &mut shard,
                        conn.key,
                        conn.conn_id,
                        &mut conn.rx,
                        &mut conn.rare,
                    );
                    reads += 1;
                }
                shard.flush_dirty();
                (
                    step,
                    shard.has_remote_batch()
                        || shard.held_acks.is_holding()
                        || !shard.held_subacks.is_empty(),
                )
            };
            if !this.ctx.shard.borrow().outbox.is_empty() {
                this.ctx.send_outbox();
            }
            this.ended = step.err();
            if conn.rx.is_empty() && conn.rx.capacity() > 0 {
                // Idle connections hold no receive buffer.
                conn.rx = BytesMut::new();
            }
            if forward {
                let ctx = this.ctx.clone();
                this.forwarding = Some(Box::pin(async move { ctx.forward_publishes().await }));
                continue;
            }
            if this.ended.is_some() {
                continue;
            }
            if glommio::executor().need_preempt() {
                // Let the shard's other tasks run first.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    }
}

/// Most reads of one connection handled in one step (one flush, one batch
/// to the other shards) while its reads fill the shard's read buffer:
/// 4 x [`crate::shard::READ_BUFFER_SIZE`] = 256 KiB, what the plain TCP
/// forwarder of the benchmark (`raw`) reads at once. Bounded so that a
/// publisher that never stops cannot hold back the flush of what it sent.
const MAX_READS_PER_STEP: usize = 4;

/// One more non-blocking `recv` of a plain connection whose last read
/// filled the read buffer, into its receive buffer: true when it read
/// something. Would-block marks the socket drained; the peer's close or an
/// error is left for the next [`poll_event`], whose own `recv` sees it again.
fn read_on(shard: &mut Shard, conn: &mut Established, reading: &mut Reading) -> bool {
    reading.full = false;
    let fd = match &conn.wire {
        Wire::Fresh(tcp) => tcp.as_raw_fd(),
        Wire::Plain(fd) => fd.as_raw_fd(),
        Wire::Framed(..) => return false,
    };
    let Shard {
        read_buf, stats, ..
    } = shard;
    match fd::recv(fd, read_buf) {
        Ok(n) if n > 0 => {
            reading.full = n == read_buf.len();
            reading.drained = !reading.full;
            conn.rx.extend_from_slice(&read_buf[..n]);
            stats.bytes_received += n as u64;
            true
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            reading.drained = true;
            false
        }
        _ => false,
    }
}

/// What a connection task knows of its plain socket, to spare `recv` calls
/// that would only say "nothing yet".
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Reading {
    /// The connection ([`Wire::Fresh`]) has had its one wait in this task
    /// after CONNECT: it parks at its next.
    pub(super) fresh_waited: bool,
    /// The last `recv` returned less than it could take: the socket was
    /// drained, so the connection may wait without another `recv` (arming
    /// epoll reports data that arrived since at once).
    pub(super) drained: bool,
    /// The last `recv` filled the read buffer: more is probably waiting,
    /// so the step reads on before its flush (`MAX_READS_PER_STEP`).
    pub(super) full: bool,
    /// The socket's receive low-water mark in bytes, raised while the
    /// connection owes acknowledgements and waits on glommio's stream
    /// ([`super::ack_wake`]); 0 or 1: the kernel's default.
    pub(super) low_water: u32,
    /// This task has read something from the client (or was started with
    /// bytes it sent). Until then the mark stays at 1: see
    /// [`super::ack_wake`], "the first wait".
    pub(super) heard: bool,
    /// The socket is in the shard's epoll set (armed before, perhaps
    /// fired since): its next wait modifies that registration, one
    /// `epoll_ctl`. False while it is glommio's ([`Wire::Fresh`]) and for
    /// a plain socket whose CONNECT was there at its accept: its first
    /// wait adds it, one `epoll_ctl` too.
    pub(super) registered: bool,
}

/// How a plain connection waits for its socket ([`Live::wait`]).
pub(super) enum Waited {
    /// Parked: its task ends.
    Parked,
    /// In its task, which the socket's readiness wakes.
    Pending,
    /// Not yet: it could not leave glommio's stream (out of descriptors),
    /// or it owes acknowledgements, so it waits on that stream, in its task.
    InTask,
}

impl Live {
    /// A plain connection's socket has nothing for it now: takes the socket
    /// from glommio's stream if still [`Wire::Fresh`], arms the shard's
    /// epoll instance for `interest`, then parks the connection (its task
    /// ends) or, while part of a packet waits in its receive buffer, waits in
    /// this task. Errs with why the connection must end instead.
    ///
    /// A plain connection that owes acknowledgements (QoS 1/2 messages in
    /// flight to it) and waits only to read neither parks nor waits through
    /// epoll:
    /// every PUBACK would then cost a wake-up of the watcher thread and a
    /// new task. It waits on glommio's stream instead (given back to it if
    /// it had left it, see [`Poller::forget`](crate::net::poller::Poller::forget)),
    /// and parks at its first wait with nothing owed.
    fn wait(&mut self, cx: &Context<'_>, interest: Interest) -> Result<Waited, CloseReason> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(CloseReason::Io);
        };
        let (key, conn_id, partial) = (conn.key, conn.conn_id, !conn.rx.is_empty());
        let mut shard = self.ctx.shard.borrow_mut();
        let Some(session) = shard
            .sessions
            .get_mut(key as usize)
            .filter(|s| s.link.as_ref().is_some_and(|l| l.conn_id == conn_id))
        else {
            return Err(CloseReason::TakenOver);
        };
        // A framed (TLS, WebSocket) socket has no glommio stream to wait on:
        // it waits through the poller, owed acknowledgements or not.
        let framed = matches!(conn.wire, Wire::Framed(..));
        if interest.read && !interest.write && !framed && session.awaits_acks() {
            drop(shard);
            return self.stay_on_stream();
        }
        // Through epoll no timeout bounds a raised mark: back to 1.
        if let Wire::Fresh(tcp) = &conn.wire {
            ack_wake::reset(tcp.as_raw_fd(), &mut self.reading.low_water);
        }
        let Some(link) = session.link.as_mut() else {
            return Err(CloseReason::TakenOver);
        };
        let new = !self.reading.registered;
        if let Wire::Fresh(tcp) = &conn.wire {
            let fd = match fd::duplicate(tcp.as_raw_fd()) {
                Ok(fd) => fd,
                Err(e) => {
                    // Out of descriptors: stay on glommio's stream for now
                    // (the keep-alive sweep tries again).
                    debug!(
                        "{}: cannot take the socket from glommio ({e}), not parked",
                        Peer(tcp.as_raw_fd())
                    );
                    return Ok(Waited::InTask);
                }
            };
            // The shard writes to the new descriptor from now on; the old one
            // closes with glommio's stream.
            link.fd = fd.as_raw_fd();
            conn.wire = Wire::Plain(fd);
        }
        let fd = match &conn.wire {
            Wire::Plain(fd) | Wire::Framed(fd, _) => fd,
            // A fresh wire was made plain above.
            Wire::Fresh(_) => return Err(CloseReason::Io),
        };
        if let Err(e) =
            self.ctx
                .poller
                .arm(fd.as_raw_fd(), poller::token(key, conn_id), interest, new)
        {
            warn!(
                "{}: cannot watch the socket ({e}), closing",
                Peer(fd.as_raw_fd())
            );
            return Err(CloseReason::Io);
        }
        self.reading.registered = true;
        if partial {
            link.set_waker(cx.waker());
            return Ok(Waited::Pending);
        }
        let Some(conn) = self.conn.take() else {
            return Err(CloseReason::Io);
        };
        let mut rare = conn.rare;
        let fd = match conn.wire {
            Wire::Plain(fd) => fd,
            Wire::Framed(fd, framing) => {
                rare.get_or_insert_with(Box::default).framing = Some(framing);
                fd
            }
            Wire::Fresh(_) => return Err(CloseReason::Io),
        };
        link.waiter = Waiter::Parked(Parked {
            fd: Some(fd),
            key,
            ip_key: self.ip_key,
            listener: self.listener,
            version: conn.version,
            slot: self.slot.take(),
            rare,
            _counted: ParkedCount::new(),
        });
        Ok(Waited::Parked)
    }

    /// Keeps the connection in its task, waiting on glommio's stream: a
    /// [`Wire::Plain`] socket leaves the shard's epoll instance and becomes
    /// glommio's stream again (same descriptor, so the link's stays true).
    fn stay_on_stream(&mut self) -> Result<Waited, CloseReason> {
        let Some(mut conn) = self.conn.take() else {
            return Err(CloseReason::Io);
        };
        conn.wire = match conn.wire {
            Wire::Plain(fd) => {
                if let Err(e) = self.ctx.poller.forget(fd.as_raw_fd()) {
                    warn!(
                        "{}: cannot stop watching the socket ({e}), closing",
                        Peer(fd.as_raw_fd())
                    );
                    self.conn = Some(Established {
                        wire: Wire::Plain(fd),
                        ..conn
                    });
                    return Err(CloseReason::Io);
                }
                self.reading.registered = false;
                Wire::Fresh(fd::into_tcp_stream(fd))
            }
            other => other,
        };
        self.conn = Some(conn);
        Ok(Waited::InTask)
    }

    /// The connection ended: start its teardown (polled like a forward).
    fn end(&mut self, reason: CloseReason) {
        self.ended = None;
        if let Some(conn) = self.conn.take() {
            let ctx = self.ctx.clone();
            self.forwarding = Some(Box::pin(async move { teardown(&ctx, conn, reason).await }));
        }
    }
}

/// Polls for what the connection must do next: close, write (when its socket
/// was full), read, or wait.
pub(super) fn poll_event(
    cx: &mut Context<'_>,
    ctx: &Ctx,
    conn: &mut Established,
    reading: &mut Reading,
) -> Poll<Event> {
    let Established {
        wire,
        rx,
        key,
        conn_id,
        ..
    } = conn;
    let (key, conn_id) = (*key, *conn_id);
    let mut guard = ctx.shard.borrow_mut();
    let Shard {
        sessions,
        stats,
        read_buf,
        limits,
        iovecs,
        shed_conns,
        held_out,
        config,
        ..
    } = &mut *guard;
    // A queue held for the journal (`crate::shard::held_out`) is written
    // once the shard releases it.
    let held = held_out.waits(key, conn_id);
    let Some(session) = sessions
        .get_mut(key as usize)
        .filter(|s| s.link.as_ref().is_some_and(|l| l.conn_id == conn_id))
    else {
        // The session left this connection: shed, or taken over.
        if let Some(i) = shed_conns.iter().position(|&c| c == conn_id) {
            shed_conns.swap_remove(i);
            return Poll::Ready(Event::Closed(CloseReason::Shed));
        }
        return Poll::Ready(Event::Closed(CloseReason::TakenOver));
    };
    let owed = session.awaits_acks();
    let low_water = if owed {
        ack_wake::low_water(
            session.inflight_len(),
            session.window(limits),
            config.acks_per_wake,
        )
    } else {
        1
    };
    let Some(link) = session.link.as_mut() else {
        return Poll::Ready(Event::Closed(CloseReason::TakenOver));
    };
    if let Some(reason) = link.close {
        return Poll::Ready(Event::Closed(reason));
    }
    let fd = match wire {
        Wire::Framed(socket, framing) => {
            if link.blocked && !held {
                match write_framed(socket, framing, &mut session.out, read_buf) {
                    Ok(n) => {
                        stats.bytes_sent += n as u64;
                        link.blocked = !(session.out.is_empty() && framing.tx.is_empty());
                    }
                    Err(_) => return Poll::Ready(Event::Closed(CloseReason::Io)),
                }
            } else if !framing.tx.is_empty() && send_framed(socket, framing).is_err() {
                return Poll::Ready(Event::Closed(CloseReason::Io));
            }
            // While its queue is stuck over the limit, the client does not
            // read what it is sent: stop reading it too (back-pressure).
            let read = !(link.blocked && session.out.bytes() > limits.max_queued_bytes);
            let write = link.blocked || !framing.tx.is_empty();
            if read && !reading.drained {
                match fd::recv(socket.as_raw_fd(), read_buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Ok(0) => return Poll::Ready(Event::Closed(CloseReason::PeerClosed)),
                    Err(_) => return Poll::Ready(Event::Closed(CloseReason::Io)),
                    Ok(n) => {
                        reading.drained = n < read_buf.len();
                        stats.bytes_received += n as u64;
                        return Poll::Ready(match framing.receive(&read_buf[..n], rx) {
                            Ok(Received::Open) => Event::Data,
                            Ok(Received::Closed) => Event::Closed(CloseReason::PeerClosed),
                            Err(e) => {
                                debug!("{}: {e}, closing", Peer(socket.as_raw_fd()));
                                Event::Closed(CloseReason::ProtocolError)
                            }
                        });
                    }
                }
            }
            return Poll::Ready(Event::Wait(Interest { read, write }));
        }
        Wire::Fresh(tcp) => tcp.as_raw_fd(),
        Wire::Plain(fd) => fd.as_raw_fd(),
    };
    if link.blocked && !held {
        match session.out.flush(fd, iovecs) {
            Ok((n, flushed)) => {
                stats.bytes_sent += n as u64;
                link.blocked = flushed == Flushed::WouldBlock && !session.out.is_empty();
            }
            Err(_) => return Poll::Ready(Event::Closed(CloseReason::Io)),
        }
    }
    // While its queue is stuck over the limit, the client does not read
    // what it is sent: stop reading it too (back-pressure).
    let read = !(link.blocked && session.out.bytes() > limits.max_queued_bytes);
    if let Wire::Fresh(tcp) = wire
        && (!reading.fresh_waited || owed)
        && read
        && !link.blocked
    {
        // The first wait after CONNECT, or any while acknowledgements are
        // owed (see `Live::wait`): in this task, on glommio's stream
        // (whose read tries a `recv` first), woken once per batch of
        // acknowledgements while many are owed (`ack_wake`).
        // Until the client has sent something to this task, any byte wakes
        // it (`ack_wake::first_wait`).
        let want = if reading.heard { low_water } else { 1 };
        ack_wake::apply(tcp, &mut reading.low_water, want);
        link.set_waker(cx.waker());
        let mut result = Pin::new(&mut *tcp).poll_read(cx, read_buf);
        if matches!(&result, Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::TimedOut) {
            // `ACK_PATIENCE` has passed (the only read timeout set): read
            // what arrived, and wait for any byte from now on.
            ack_wake::apply(tcp, &mut reading.low_water, 1);
            stats.ack_patience_expired += 1;
            result = match fd::recv(tcp.as_raw_fd(), read_buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    Pin::new(&mut *tcp).poll_read(cx, read_buf)
                }
                done => Poll::Ready(done),
            };
        }
        return match result {
            Poll::Ready(r) => {
                reading.heard |= matches!(r, Ok(n) if n > 0);
                // A short read drained the socket: a wait through epoll
                // needs no `recv` first (arming it reports what came since).
                reading.drained = matches!(r, Ok(n) if n < read_buf.len());
                Poll::Ready(read_event(r, read_buf, rx, &mut stats.bytes_received))
            }
            Poll::Pending => {
                reading.fresh_waited = true;
                Poll::Pending
            }
        };
    }
    // Owing acknowledgements, a plain socket that waits only to read goes
    // back to glommio's stream (`Live::wait`), whose read tries a `recv`
    // first: none here (a resumed connection would make two that find
    // nothing).
    let to_stream = owed && !link.blocked && matches!(wire, Wire::Plain(_));
    if read && !reading.drained && !to_stream {
        match fd::recv(fd, read_buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            result => {
                reading.heard |= result.as_ref().is_ok_and(|&n| n > 0);
                reading.drained = result.as_ref().is_ok_and(|&n| n < read_buf.len());
                reading.full = result.as_ref().is_ok_and(|&n| n == read_buf.len());
                return Poll::Ready(read_event(result, read_buf, rx, &mut stats.bytes_received));
            }
        }
    }
    Poll::Ready(Event::Wait(Interest {
        read,
        write: link.blocked,
    }))
}

/// What a read's outcome means for the connection: 0 bytes is the peer's
/// close; `n` bytes are new data, moved from `read_buf` to the receive
/// buffer `rx` and counted in `bytes_received`; an error breaks the
/// connection.
pub(super) fn read_event(
    result: io::Result<usize>,
    read_buf: &[u8],
    rx: &mut BytesMut,
    bytes_received: &mut u64,
) -> Event {
    match result {
        Ok(0) => Event::Closed(CloseReason::PeerClosed),
        Ok(n) => {
            rx.extend_from_slice(&read_buf[..n]);
            *bytes_received += n as u64;
            Event::Data
        }
        Err(_) => Event::Closed(CloseReason::Io),
    }
}

/// Frames a TLS or WebSocket connection's queue, in pieces of up to
/// `scratch.len()` bytes (the shard's read buffer, free while writing), each
/// one WebSocket message or TLS record run, and sends what the socket takes
/// ([`send_framed`]). Stops framing while more than a piece waits unsent,
/// so a client that does not read keeps its backlog in the session's queue
/// (counted, shed over the limit), not here. Returns the queue bytes framed.
pub(super) fn write_framed(
    socket: &OwnedFd,
    framing: &mut Framing,
    out: &mut OutQueue,
    scratch: &mut [u8],
) -> Result<usize, FramingError> {
    let mut written = 0;
    loop {
        send_framed(socket, framing)?;
        if !framing.tx.is_empty() {
            return Ok(written);
        }
        let len = out.copy_front(scratch);
        if len == 0 {
            return Ok(written);
        }
        framing.send(&scratch[..len])?;
        out.advance(len);
        written += len;
    }
}

/// Sends what a TLS or WebSocket connection's framing has queued, as much
/// as the socket takes now.
pub(super) fn send_framed(socket: &OwnedFd, framing: &mut Framing) -> Result<(), FramingError> {
    while !framing.tx.is_empty() {
        let iovec = libc::iovec {
            iov_base: framing.tx.as_ptr() as *mut libc::c_void,
            iov_len: framing.tx.len(),
        };
        match fd::send_vectored(socket.as_raw_fd(), &[iovec]) {
            Ok(n) => framing.sent(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
