//! One client connection: read ► decode ► session ► write.
//!
//! A handshake task waits (bounded by the connect timeout) for CONNECT
//! (§3.1), claims the client id (take-over, see [`crate::shard::registry`]) and
//! attaches the session. The connected client then lives in a task of its own,
//! `Live`, a small hand-written future that loops: read whatever the socket
//! has into the shard's shared buffer, decode every complete packet, act on
//! each, flush every subscriber that got something, hand the publishes to the
//! other shards; at the end it tears the connection down (will, session).
//!
//! Writes normally happen outside this task: [`crate::shard::Shard::flush_dirty`]
//! sends each dirty session's queue with one non-blocking vectored send. Only
//! when a socket's send buffer is full does this task take over that
//! session's writes and wait for the socket to become writable; while its
//! queue is over the byte limit it also stops reading the client (back-pressure
//! instead of memory growth).
//!
//! A plain TCP connection has its task only while it has work: when its
//! socket has nothing to read (and it has nothing it must wait to write, or
//! it waits for writability), its task ends and the connection is *parked*
//! in its session's link, its socket watched by the shard's epoll instance
//! ([`crate::connection::park`]); [`socket_ready`] or the shard's own wake-up gives it a
//! task again ([`resume`]). Its socket is read with non-blocking `recv`.
//! It never becomes a glommio stream: its CONNECT is read with `recv`
//! while it waits without a task ([`crate::net::waiting`]), its handshake
//! task starts once the CONNECT is whole, and it parks at its first wait
//! after CONNACK ([`Wire::Plain`]), even when its SUBSCRIBE is about to
//! follow. In a connect storm thousands of clients are between CONNACK and
//! SUBSCRIBE at once; each held a task and a glommio poll source (about
//! 900 B) meanwhile when that first wait happened on glommio's stream.
//! Glommio's stream ([`Wire::Fresh`]) is left for a connection that owes
//! acknowledgements (`live::Live::wait`), and for one whose socket could
//! not be duplicated at its accept (out of descriptors).
//!
//! Connections over TLS or WebSocket ([`crate::net::transport`]) frame what is
//! written, so the shard never writes to their socket: their link's `fd` is
//! negative ([`framed_fd`]), the shard hands each flush to this task, and this task
//! writes the queue through the stream (and flushes it: TLS buffers records).
//! Their transport handshake also runs here, before CONNECT, bounded by the
//! connect timeout.
//!
//! An idle connection holds no buffers: its receive buffer is freed whenever
//! it is empty and its outgoing queue gives its memory back when drained.

mod ack_wake;
mod connect;
mod dispatch;
mod dispatch_v5;
mod handshake;
mod keepalive;
mod live;
pub mod park;

pub use dispatch::process;
pub use keepalive::keep_alive_sweeper;
pub use park::{resume, socket_ready};

use handshake::{Client, FirstPacketError, connect, decode_first_packet, establish, will_message};
use live::{Live, Reading};

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use glommio::net::TcpStream;
use log::debug;

use crate::net::admission::{ConnectionSlot, IpKey};
use crate::net::fd;
use crate::net::framing::Framing;
use crate::net::poller::Interest;
use crate::net::transport::{Acceptor, Transport};
use crate::net::waiting::WaitingSocket;
use crate::observe::log_limit::LogKind::PublishDenied;
use crate::observe::log_limit::limited;
use crate::protocol::Version;
use crate::protocol::v5::{self, ReasonCode};
use crate::security::acl::Who;
use crate::session::link::{CloseReason, Rare, SessionKey};
use crate::shard::Ctx;

/// What woke the connection loop.
enum Event {
    /// New bytes are in the receive buffer.
    Data,
    /// The connection must end.
    Closed(CloseReason),
    /// A plain connection's socket has nothing for it now: wait until it
    /// is ready as said, parked if possible ([`Live::wait`]).
    Wait(Interest),
}

/// A connection past CONNECT: what its main loop needs for its whole life.
/// Kept small, since one exists per connected client.
struct Established {
    /// The client's connection: a plain socket, or boxed TLS / WebSocket
    /// state.
    wire: Wire,
    /// Bytes received and not yet decoded (empty, unallocated, when idle).
    rx: BytesMut,
    /// The session's slab key on this shard.
    key: SessionKey,
    /// This connection's id (the session at `key` is ours while it matches).
    conn_id: u64,
    /// The protocol it speaks (how its packets are decoded, and whether a
    /// server DISCONNECT is sent when it ends).
    version: Version,
    /// The will message and the ACL identity, boxed: most clients have
    /// neither (None when there is no will and no ACL file).
    rare: Option<Box<Rare>>,
}

/// How an established connection's bytes travel.
enum Wire {
    /// Plain TCP on glommio's stream, read with `recv` like [`Wire::Plain`]:
    /// a connection accepted when no descriptor was left to take its socket
    /// from glommio (until its first wait after CONNECT has ended, which
    /// happens on that stream). Also a plain connection that owes acknowledgements
    /// (QoS 1/2 messages in flight to it) and was given back to glommio's
    /// stream for that time (`live::Live::wait`), so that each PUBACK
    /// wakes its task through glommio and not through the watcher thread.
    Fresh(TcpStream),
    /// Plain TCP: the socket itself (taken from glommio's stream, see
    /// [`plain_socket`]), read with non-blocking `recv` and waited on
    /// through the shard's epoll instance, so that the connection can be
    /// parked.
    Plain(OwnedFd),
    /// TLS or WebSocket: the socket (taken from glommio's stream after
    /// CONNECT, as for [`Wire::Plain`]) and its framing state, which the
    /// connection keeps while parked.
    Framed(OwnedFd, Box<Framing>),
}

impl Wire {
    /// The TCP socket underneath (for lookups and socket options).
    fn socket_fd(&self) -> RawFd {
        match self {
            Wire::Fresh(tcp) => tcp.as_raw_fd(),
            Wire::Plain(fd) => fd.as_raw_fd(),
            Wire::Framed(fd, _) => fd.as_raw_fd(),
        }
    }
}

/// A connection was accepted (and admitted). A plain MQTT socket is kept
/// as its socket only, in the shard's epoll set ([`crate::net::waiting`]),
/// while its CONNECT is on its way; its bytes are read with `recv` until
/// the CONNECT is whole (the first `recv` at once: a client often wrote
/// before its accept, and one that has not costs that `recv` only), and
/// only then does it get a task ([`socket_ready`], `serve_socket`). A TLS or
/// WebSocket socket is served at once when its client has written already,
/// otherwise it waits the same way until its first bytes. Thousands of
/// sockets accepted at once (clients reconnecting after a restart) thus
/// cost no task and no buffer each while their CONNECT is on its way.
pub fn accepted(
    ctx: &Ctx,
    socket: OwnedFd,
    acceptor: &Acceptor,
    slot: ConnectionSlot,
    ip_key: IpKey,
) {
    let accepted_at = Instant::now();
    let plain = acceptor.transport == Transport::Mqtt;
    if !plain && fd::has_input(socket.as_raw_fd()) {
        let tcp = fd::into_tcp_stream(socket);
        serve_in_task(ctx, tcp, acceptor, slot, ip_key, accepted_at);
        return;
    }
    let raw = socket.as_raw_fd();
    let mut shard = ctx.shard.borrow_mut();
    let deadline = accepted_at + shard.config.connect_timeout;
    let token = shard.waiting.insert(
        socket,
        acceptor.clone(),
        slot,
        ip_key,
        accepted_at,
        deadline,
    );
    if plain {
        // Its CONNECT (or part of it) is probably there already: read it
        // now, with the `recv` that would follow a peek (the socket is
        // added to the epoll set only if it must wait for the rest, or for
        // all of it).
        drop(shard);
        socket_ready(ctx, token);
        return;
    }
    let read = Interest {
        read: true,
        write: false,
    };
    match ctx.poller.arm(raw, token, read, true) {
        Ok(()) => {
            if let Some(waiting) = shard.waiting.get_mut(token) {
                waiting.registered = true;
            }
        }
        Err(e) => {
            debug!("{}: cannot watch the new socket ({e}), closing", Peer(raw));
            if let Some(waiting) = shard.waiting.take(token) {
                waiting.slot.release(waiting.ip_key);
            }
        }
    }
}

/// [`accepted`] for a connection that glommio's accept handed over (the
/// accept loop had waited there): its socket is taken from the stream
/// with a duplicate, the stream closes. Out of descriptors for the
/// duplicate, the connection is served on glommio's stream, in a task.
pub fn accepted_stream(
    ctx: &Ctx,
    tcp: TcpStream,
    acceptor: &Acceptor,
    slot: ConnectionSlot,
    ip_key: IpKey,
) {
    let plain = acceptor.transport == Transport::Mqtt;
    let socket = if plain || !fd::has_input(tcp.as_raw_fd()) {
        fd::duplicate(tcp.as_raw_fd()).ok()
    } else {
        // Its handshake is there: served on this stream at once.
        None
    };
    match socket {
        Some(socket) => {
            drop(tcp);
            accepted(ctx, socket, acceptor, slot, ip_key);
        }
        None => serve_in_task(ctx, tcp, acceptor, slot, ip_key, Instant::now()),
    }
}

/// Spawns [`serve`] for a connection on glommio's stream.
fn serve_in_task(
    ctx: &Ctx,
    tcp: TcpStream,
    acceptor: &Acceptor,
    slot: ConnectionSlot,
    ip_key: IpKey,
    accepted_at: Instant,
) {
    glommio::spawn_local(serve(
        ctx.clone(),
        tcp,
        acceptor.clone(),
        slot,
        ip_key,
        accepted_at,
    ))
    .detach();
}

/// Serves one accepted connection: the handshake in this task, then the
/// connection's life in a task of its own, `Live`, whose allocation is
/// only what a connected client needs (the handshake's state is freed).
/// The connect timeout counts from `accepted_at`.
pub async fn serve(
    ctx: Ctx,
    tcp: TcpStream,
    acceptor: Acceptor,
    slot: ConnectionSlot,
    ip_key: IpKey,
    accepted_at: Instant,
) {
    let Some(conn) = establish(&ctx, tcp, &acceptor, accepted_at).await else {
        slot.release(ip_key);
        return;
    };
    live(
        ctx,
        conn,
        slot,
        ip_key,
        acceptor.transport,
        Reading::default(),
    );
}

/// An accepted plain MQTT socket that waited without a task
/// ([`crate::net::waiting`]) has its whole first packet in `waiting.rx`:
/// handles it as [`serve`] does, without ever making the socket a glommio
/// stream (no poll source, no read buffer of its own). The connection
/// parks at its first wait after CONNACK, even when its SUBSCRIBE is about
/// to follow: in a connect storm, thousands of clients are between their
/// CONNACK and their SUBSCRIBE at once, and each would otherwise hold its
/// task and a glommio poll source meanwhile.
pub async fn serve_socket(ctx: Ctx, waiting: WaitingSocket) {
    let WaitingSocket {
        fd,
        acceptor,
        slot,
        ip_key,
        mut rx,
        drained,
        registered,
        ..
    } = waiting;
    let max = ctx.shard.borrow().config.max_packet_size;
    // Whole, as `first_bytes` checked: a packet still short of bytes here
    // is one the decoder disagrees about, which ends the connection.
    let first = decode_first_packet(&mut rx, max)
        .and_then(|request| request.ok_or(FirstPacketError::Closed));
    let Some(conn) = connect(&ctx, Client::Socket(fd), rx, first).await else {
        slot.release(ip_key);
        return;
    };
    // What the waiting entry knew of its socket: a connection whose CONNECT
    // (and pipelined SUBSCRIBE) came in one short read waits after handling
    // them without a `recv` that would find nothing, and its first wait
    // adds its socket to the epoll set unless it waited there already.
    let reading = Reading {
        drained,
        registered,
        ..Reading::default()
    };
    live(ctx, conn, slot, ip_key, acceptor.transport, reading);
}

/// Starts a connection's life past CONNACK: its `Live` task. `reading`:
/// what is known of its socket so far (`drained`, `registered`).
fn live(
    ctx: Ctx,
    conn: Established,
    slot: ConnectionSlot,
    ip_key: IpKey,
    listener: Transport,
    reading: Reading,
) {
    let unprocessed = !conn.rx.is_empty();
    // A connection that was never a glommio stream has no first wait there.
    let never_fresh = matches!(conn.wire, Wire::Plain(_));
    ctx.shard.borrow_mut().stats.clients_by_listener[listener.index()] += 1;
    glommio::spawn_local(Live {
        ctx,
        conn: Some(conn),
        slot: Some(slot),
        unprocessed,
        reading: Reading {
            // A client that wrote SUBSCRIBE with CONNECT (pipelined) has
            // sent what the wait on glommio's stream is for: it parks at its
            // first wait. Waiting there instead held every such connection's
            // task and glommio poll source (~900 B) until the keep-alive
            // sweep, all at once after a connect burst.
            fresh_waited: unprocessed || never_fresh,
            low_water: 1,
            // It sent CONNECT.
            heard: true,
            ..reading
        },
        forwarding: None,
        ended: None,
        listener,
        ip_key,
    })
    .detach();
}

/// Ends a connection: parks or removes its session, publishes its will when
/// the close calls for it, and only then closes the socket.
async fn teardown(ctx: &Ctx, conn: Established, reason: CloseReason) {
    {
        let mut shard = ctx.shard.borrow_mut();
        let outlives = shard
            .session_for(conn.key, conn.conn_id)
            .is_some_and(|s| !s.clean_session);
        let had_will = conn.rare.as_ref().is_some_and(|r| r.will.is_some());
        shard.end_connection(conn.key, conn.conn_id);
        if reason.publishes_will()
            && let Some(rare) = conn.rare
            && let Some(will) = rare.will
        {
            let who = Who {
                client_id: rare.client_id.as_deref().unwrap_or(""),
                username: rare.username.as_deref(),
            };
            let delay = rare.will_delay;
            if !shard.auth.can_publish(who, &will.topic) {
                limited!(
                    PublishDenied,
                    debug,
                    "will to {} dropped: denied by the ACL",
                    will.topic
                );
                shard.stats.publish_denied += 1;
            } else if delay > 0 && reason == CloseReason::TakenOver {
                // The client is back (on a new connection): a delayed will
                // is not sent (§3.1.3.2.2).
            } else if delay > 0 && outlives {
                // The session outlives the connection: the will waits in it
                // for its delay, found by the keep-alive sweep.
                let sent_at = Instant::now() + Duration::from_secs(u64::from(delay));
                if let Some(message) = will_message(will, rare.will_properties.as_deref(), sent_at)
                {
                    shard.delay_will(conn.key, message, delay);
                }
            } else if let Some(message) =
                will_message(will, rare.will_properties.as_deref(), Instant::now())
            {
                shard.stats.publish_received += 1;
                shard.publish(message);
            }
        }
        // With persistence, the journal forgets a will that is no longer
        // owed (published, or discarded by DISCONNECT or a shutdown); one
        // waiting for its delay was journalled as such. After a take-over
        // the new connection's CONNECT wrote its own.
        if had_will
            && outlives
            && reason != CloseReason::TakenOver
            && !shard.has_delayed_will(conn.key)
        {
            shard.journal_will(conn.key, None, 0);
        }
        shard.flush_dirty();
    }
    ctx.send_outbox();
    ctx.forward_publishes().await;
    debug!(
        "{}: connection closed: {reason:?}",
        Peer(conn.wire.socket_fd())
    );
    if let Wire::Framed(fd, mut framing) = conn.wire {
        // TLS / WebSocket: the DISCONNECT, then goodbye in the transport's
        // terms (a close frame, close_notify), if the socket takes them at
        // once; never wait for it.
        if conn.version == Version::V5
            && let Some(code) = reason.disconnect_reason()
        {
            let _ = framing.send(&disconnect_bytes(code));
        }
        framing.close();
        if reason == CloseReason::Shed {
            fd::reset_on_close(fd.as_raw_fd());
        } else {
            let _ = live::send_framed(&fd, &mut framing);
        }
        return;
    }
    if conn.version == Version::V5
        && let Some(code) = reason.disconnect_reason()
    {
        say_disconnect(conn.wire.socket_fd(), code);
    }
    if reason == CloseReason::Shed {
        // An abortive close (RST): the kernel drops the megabytes still in
        // the socket's send buffer now instead of trickling them out to a
        // client that does not read.
        fd::reset_on_close(conn.wire.socket_fd());
    }
    // The link is gone from the session; the socket closes with `conn`.
}

/// Tells an MQTT 5.0 client why the broker closes its connection: a
/// DISCONNECT with `code` (§3.14, §4.13), written if the socket takes it at
/// once (a client that does not read loses nothing it could use).
fn say_disconnect(socket: RawFd, code: ReasonCode) {
    send_now(socket, &disconnect_bytes(code));
}

/// Writes `bytes` to a plain socket if it takes them at once (one
/// non-blocking send; what it does not take is dropped): for the last
/// words to a client whose connection ends.
fn send_now(socket: RawFd, bytes: &[u8]) {
    let iovec = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let _ = fd::send_vectored(socket, &[iovec]);
}

/// A server DISCONNECT with `code` and no properties (§3.14).
fn disconnect_bytes(code: ReasonCode) -> BytesMut {
    let mut bytes = BytesMut::new();
    let disconnect = v5::ReasonAndProperties {
        reason_code: code,
        properties: v5::Properties::new(),
    };
    if let Err(e) = v5::encode_disconnect(&disconnect, &mut bytes) {
        log::error!("cannot encode DISCONNECT {code}: {e}");
    }
    bytes
}

/// A client's address (from its TCP socket) for log lines, looked up only
/// when a line is written (a `getpeername` per connection is not worth
/// paying when nothing logs).
struct Peer(RawFd);

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match fd::peer_addr(self.0) {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("?"),
        }
    }
}

/// The TLS client certificate's identity for log lines: ", TLS identity
/// CN" (nothing without one).
struct Identity<'a>(&'a Wire);

impl std::fmt::Display for Identity<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Wire::Framed(_, framing) => match framing.identity.as_deref() {
                Some(cn) => write!(f, ", TLS identity {cn:?}"),
                None => Ok(()),
            },
            Wire::Fresh(_) | Wire::Plain(_) => Ok(()),
        }
    }
}

/// What a connection costs while idle is its session's link (with the
/// parked state in place of a task, [`crate::session::link::Parked`]); the admin
/// figures' per-connection fields (`Link::connected_at`, `Live::listener`)
/// live in padding. Measured on 64-bit: the link was 40 bytes with a waker,
/// 56 with the parked state (which replaced a ~300-byte task and glommio's
/// ~500-byte poll source); a running connection's task holds a `Live`
/// (272 bytes since `Reading` got its ninth byte, `registered`, beside
/// `heard`: 8 bytes more per connection with a task, none per parked one).
#[cfg(all(test, target_pointer_width = "64"))]
mod size_tests {
    #[test]
    fn an_idle_connection_costs_its_link() {
        assert_eq!(std::mem::size_of::<crate::session::link::Parked>(), 32);
        assert_eq!(std::mem::size_of::<crate::session::link::Waiter>(), 32);
        assert_eq!(
            std::mem::size_of::<Option<crate::session::link::Link>>(),
            56
        );
        assert_eq!(std::mem::size_of::<super::Live>(), 272);
    }
}
