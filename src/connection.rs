//! One client connection: read ► decode ► session ► write.
//!
//! A handshake task waits (bounded by the connect timeout) for CONNECT
//! (§3.1), claims the client id (take-over, see [`crate::registry`]) and
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
//! ([`crate::park`]); [`socket_ready`] or the shard's own wake-up gives it a
//! task again ([`resume`]). Its socket is read with non-blocking `recv`.
//! Only the first wait after CONNECT happens in the task, on glommio's
//! stream ([`Wire::Fresh`]): the client's next packet (SUBSCRIBE) usually
//! follows at once, and waking a task through glommio costs less than
//! through the watcher thread. At its next wait (or when the keep-alive sweep
//! finds it idle) the socket leaves glommio's stream ([`Wire::Plain`]) and
//! the connection parks.
//!
//! Connections over TLS or WebSocket ([`crate::transport`]) frame what is
//! written, so the shard never writes to their socket: their link's `fd` is
//! negative ([`framed_fd`]), the shard hands each flush to this task, and this task
//! writes the queue through the stream (and flushes it: TLS buffers records).
//! Their transport handshake also runs here, before CONNECT, bounded by the
//! connect timeout.
//!
//! An idle connection holds no buffers: its receive buffer is freed whenever
//! it is empty and its outgoing queue gives its memory back when drained.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use bytestring::ByteString;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use log::{debug, warn};

use crate::acl::Who;
use crate::admission::{ConnectionCounts, IpKey};
use crate::codec::{self, Connect, DecodeError, LastWill, Packet, QoS};
use crate::log_limit::LogKind::{
    ConnectRefused, MaxAwaitingRel, NotAuthorized, ProtocolError, PublishDenied,
};
use crate::log_limit::limited;
use crate::message::Message;
use crate::metrics::{ListenerKind, SessionTotals};
use crate::outqueue::{Flushed, OutQueue};
use crate::park::{self, Interest, Parked};
use crate::registry;
use crate::session::{self, Qos2Receipt, Session, SessionState};
use crate::shard::{Ctx, SessionKey, Shard};
use crate::topic;
use crate::transport::{Acceptor, Stream, Transport};

/// The [`Link::fd`] of a connection whose transport frames its bytes (TLS,
/// WebSocket) on socket `fd`: the descriptor bit-inverted, so negative (a
/// valid descriptor never is). The shard must not write to such a link's
/// socket and leaves every write to the connection task (see
/// [`Shard::flush_dirty`]); [`Link::socket`] gives the socket back for
/// lookups such as the peer address. No field is added to the link.
pub fn framed_fd(fd: RawFd) -> RawFd {
    !fd
}

/// How much the receive buffer grows per read while waiting for CONNECT.
const CONNECT_READ_CHUNK: usize = 512;

/// The keep-alive clock's unit: a tenth of a second, so "1.5 × keep-alive"
/// (§3.1.2.10) is exact for every keep-alive value and a `u32` lasts 13 years.
pub const TICKS_PER_SEC: u32 = 10;

/// A plain connection still waiting in its task ([`Wire::Fresh`]: the
/// client sent nothing after CONNECT) is woken to park once it has been
/// silent this long: a second, so that the keep-alive sweep (every half
/// second) parks such clients within 1.5 s and never a client in the middle
/// of its first exchange.
const PARK_AFTER_TICKS: u32 = TICKS_PER_SEC;

/// Why a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent DISCONNECT (no will, §3.14.4).
    Disconnect,
    /// The client closed the socket without DISCONNECT.
    PeerClosed,
    /// A socket error.
    Io,
    /// Malformed packet or protocol violation (§4.8).
    ProtocolError,
    /// No packet within 1.5 × keep-alive (§3.1.2.10).
    KeepAliveTimeout,
    /// A new connection with the same client id took over (§3.1.4).
    TakenOver,
    /// The broker is shutting down.
    Shutdown,
    /// The client did not read while its shard was over its share of
    /// `max_queued_bytes_total` (see [`crate::shard::Shard::shed`]).
    Shed,
    /// An operator disconnected the client through the admin API.
    AdminDisconnect,
}

impl CloseReason {
    /// True when the will message must be published (§3.1.2.5: any close
    /// that is not a DISCONNECT from the client; not when the broker stops).
    pub fn publishes_will(self) -> bool {
        !matches!(self, CloseReason::Disconnect | CloseReason::Shutdown)
    }
}

/// A session's live connection, as the shard sees it. It is also how the
/// shard talks to the connection task: it sets `close` or `blocked` and wakes
/// the task ([`Link::wake`]; a parked connection gets a task back). When the
/// shard removes the session altogether (take-over), the task, woken, finds
/// its session gone and ends.
#[derive(Debug)]
pub struct Link {
    /// Unique id of the connection on this shard.
    pub conn_id: u64,
    /// The socket, for the shard's direct vectored writes. Valid while the
    /// link exists: the task removes the link before it closes the socket.
    /// Negative ([`framed_fd`]) for TLS and WebSocket connections, which
    /// only their task writes.
    pub fd: RawFd,
    /// Who to wake: the connection task while it waits, or the parked
    /// connection.
    waiter: Waiter,
    /// Set when the connection must close (the first reason wins).
    close: Option<CloseReason>,
    /// True while the socket's send buffer is full and the connection task
    /// (not the shard) writes this session's queue; for a framed link
    /// ([`Link::is_framed`]), while the task has queued bytes to write.
    pub blocked: bool,
    /// Keep-alive in seconds from CONNECT (0: none).
    pub keep_alive: u16,
    /// When the last packet arrived, in [`TICKS_PER_SEC`] since shard start.
    pub last_seen: u32,
    /// When the connection attached, in [`TICKS_PER_SEC`] since shard start
    /// (the admin API's "connected since"; fits in the struct's padding, so
    /// it costs no memory per connection).
    pub connected_at: u32,
}

impl Link {
    /// A link for connection `conn_id` on socket `fd`.
    pub fn new(conn_id: u64, fd: RawFd, keep_alive: u16, last_seen: u32) -> Link {
        Link {
            conn_id,
            fd,
            waiter: Waiter::Running,
            close: None,
            blocked: false,
            keep_alive,
            last_seen,
            connected_at: last_seen,
        }
    }

    /// True for a TLS or WebSocket connection: only its task may write.
    pub fn is_framed(&self) -> bool {
        self.fd < 0
    }

    /// The connection's socket, framed or not (for lookups, never writes).
    pub fn socket(&self) -> RawFd {
        if self.is_framed() { !self.fd } else { self.fd }
    }

    /// Asks the connection to close (the first reason wins).
    pub fn close(&mut self, reason: CloseReason) {
        self.close.get_or_insert(reason);
        self.wake();
    }

    /// Wakes the connection task; a parked connection gets one (soon: the
    /// shard's unparker spawns it, since the caller holds the shard).
    pub fn wake(&mut self) {
        match std::mem::take(&mut self.waiter) {
            Waiter::Running => {}
            Waiter::Task(waker) => waker.wake(),
            Waiter::Parked(parked) => park::wake_later(self.conn_id, parked),
        }
    }

    /// True while the connection is parked (has no task).
    pub fn is_parked(&self) -> bool {
        matches!(self.waiter, Waiter::Parked(_))
    }

    /// Remembers the task's waker (cloned only when it changed).
    fn set_waker(&mut self, waker: &Waker) {
        if !matches!(&self.waiter, Waiter::Task(w) if w.will_wake(waker)) {
            self.waiter = Waiter::Task(waker.clone());
        }
    }
}

/// Who wakes up when the shard has something for a connection.
#[derive(Debug, Default)]
enum Waiter {
    /// The connection's task is running, or will look at the link before it
    /// waits (so nothing needs waking).
    #[default]
    Running,
    /// The connection's task waits.
    Task(Waker),
    /// The connection has no task ([`crate::park`]).
    Parked(Parked),
}

/// A link with no socket (framed: the shard never writes to it), for unit
/// tests of the session.
#[cfg(test)]
pub fn test_link() -> Link {
    // i32::MIN: framed, on descriptor i32::MAX, which is never open.
    Link::new(1, i32::MIN, 0, 0)
}

/// Counts a live connection against `max_connections` until dropped. Its
/// count under `max_connections_per_ip` (its [`IpKey`], kept beside it in
/// what was padding, so a connection grows by nothing) is given back with
/// [`ConnectionSlot::release`].
#[derive(Debug)]
pub struct ConnectionSlot(pub Arc<ConnectionCounts>);

impl ConnectionSlot {
    /// The connection ended: gives back its count under `ip_key` (0: it
    /// was not counted per address) and, dropped, its place.
    pub fn release(self, ip_key: IpKey) {
        if ip_key != 0 {
            self.0.remove_ip(ip_key);
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.total.fetch_sub(1, Ordering::Relaxed);
    }
}

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
    /// The will message and the ACL identity, boxed: most clients have
    /// neither (None when there is no will and no ACL file).
    rare: Option<Box<Rare>>,
}

/// How an established connection's bytes travel.
enum Wire {
    /// Plain TCP until its first wait after CONNECT has ended: still
    /// glommio's stream, which that wait uses; read with `recv` like
    /// [`Wire::Plain`].
    Fresh(TcpStream),
    /// Plain TCP: the socket itself (taken from glommio's stream, see
    /// [`plain_socket`]), read with non-blocking `recv` and waited on
    /// through the shard's epoll instance, so that the connection can be
    /// parked.
    Plain(OwnedFd),
    /// TLS or WebSocket: the transport's stream (never parked).
    Framed(Stream),
}

impl Wire {
    /// The TCP socket underneath (for lookups and socket options).
    fn socket_fd(&self) -> RawFd {
        match self {
            Wire::Fresh(tcp) => tcp.as_raw_fd(),
            Wire::Plain(fd) => fd.as_raw_fd(),
            Wire::Framed(stream) => stream.socket_fd(),
        }
    }
}

/// The rarely needed part of an [`Established`] connection.
#[derive(Debug)]
pub struct Rare {
    /// The will message (§3.1.2.5), if any.
    will: Option<LastWill>,
    /// The user name for ACL checks (CONNECT's, or the TLS identity); kept
    /// only when an ACL file is in force.
    username: Option<ByteString>,
    /// The client id for the will's ACL check (the session may be gone when
    /// the will is published); kept only with a will and an ACL file.
    client_id: Option<ByteString>,
}

impl Rare {
    /// The user name for ACL checks of a connection's packets.
    fn username(rare: Option<&Rare>) -> Option<&str> {
        rare.and_then(|r| r.username.as_deref())
    }
}

/// Serves one accepted connection: the handshake in this task, then the
/// connection's life in a task of its own, `Live`, whose allocation is
/// only what a connected client needs (the handshake's state is freed).
pub async fn serve(
    ctx: Ctx,
    tcp: TcpStream,
    acceptor: Acceptor,
    slot: ConnectionSlot,
    ip_key: IpKey,
) {
    let listener = acceptor.transport.listener_kind();
    let Some(conn) = establish(&ctx, tcp, &acceptor).await else {
        slot.release(ip_key);
        return;
    };
    let unprocessed = !conn.rx.is_empty();
    ctx.shard.borrow_mut().stats.clients_by_listener[listener.index()] += 1;
    glommio::spawn_local(Live {
        ctx,
        conn: Some(conn),
        slot: Some(slot),
        unprocessed,
        reading: Reading::default(),
        forwarding: None,
        ended: None,
        listener,
        ip_key,
    })
    .detach();
}

/// The transport's handshake (TLS, WebSocket), then MQTT's: None when the
/// connection ends there. Both together must finish within the connect
/// timeout, counted from the accept.
async fn establish(ctx: &Ctx, tcp: TcpStream, acceptor: &Acceptor) -> Option<Established> {
    let deadline = Instant::now() + ctx.shard.borrow().config.connect_timeout;
    let stream = match acceptor.transport {
        Transport::Mqtt => Stream::Tcp(tcp),
        // Boxed: the TLS / WebSocket handshake's state is kilobytes, which
        // plain connections waiting for CONNECT must not carry.
        _ => Box::pin(accept_transport(ctx, tcp, acceptor, deadline)).await?,
    };
    handshake(ctx, stream, deadline).await
}

/// Runs a TLS or WebSocket handshake, bounded by `deadline`. None when it
/// fails or times out (logged; the socket closes).
async fn accept_transport(
    ctx: &Ctx,
    tcp: TcpStream,
    acceptor: &Acceptor,
    deadline: Instant,
) -> Option<Stream> {
    let connect_timeout = ctx.shard.borrow().config.connect_timeout;
    let left = deadline.saturating_duration_since(Instant::now());
    let peer = tcp
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let name = acceptor.transport.name();
    match glommio::timer::timeout(left, async { Ok(acceptor.accept(tcp).await) }).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            limited!(ProtocolError, debug, "{peer}: {name}: {e}, closing");
            None
        }
        Err(_) => {
            debug!("{peer}: {name}: no handshake within {connect_timeout:?}, closing");
            None
        }
    }
}

/// Waits for CONNECT (until `deadline`, the end of the connect timeout),
/// validates it, claims the client id and attaches the session. None when
/// the connection ends here (refused, timed out, invalid).
async fn handshake(ctx: &Ctx, mut stream: Stream, deadline: Instant) -> Option<Established> {
    let mut rx = BytesMut::new();
    let connect_timeout = ctx.shard.borrow().config.connect_timeout;
    let left = deadline.saturating_duration_since(Instant::now());
    let first = glommio::timer::timeout(left, async {
        Ok(read_first_packet(ctx, &mut stream, &mut rx).await)
    })
    .await;
    let connect = match first {
        Ok(Ok(Packet::Connect(connect))) => connect,
        Ok(Ok(other)) => {
            limited!(
                ProtocolError,
                debug,
                "{}: first packet is not CONNECT ({other:?}), closing",
                Peer(stream.socket_fd())
            );
            ctx.shard.borrow_mut().stats.protocol_errors += 1;
            return None;
        }
        Ok(Err(FirstPacketError::Decode(DecodeError::UnsupportedProtocolLevel(level)))) => {
            limited!(
                ConnectRefused,
                debug,
                "{}: unsupported protocol level {level}, CONNACK 1",
                Peer(stream.socket_fd())
            );
            ctx.shard.borrow_mut().stats.connect_refused += 1;
            refuse(&mut stream, codec::CONNACK_UNACCEPTABLE_PROTOCOL_VERSION).await;
            return None;
        }
        Ok(Err(FirstPacketError::Decode(e))) => {
            limited!(
                ProtocolError,
                debug,
                "{}: bad CONNECT: {e}",
                Peer(stream.socket_fd())
            );
            ctx.shard.borrow_mut().stats.protocol_errors += 1;
            return None;
        }
        Ok(Err(FirstPacketError::Closed)) => return None,
        Err(_) => {
            debug!(
                "{}: no CONNECT within {connect_timeout:?}, closing",
                Peer(stream.socket_fd())
            );
            return None;
        }
    };
    let Connect {
        clean_session,
        keep_alive,
        client_id,
        last_will,
        username,
        password,
        ..
    } = connect;
    if let Some(will) = &last_will
        && topic::validate_topic_name(&will.topic).is_err()
    {
        limited!(
            ProtocolError,
            debug,
            "{}: invalid will topic {:?}",
            Peer(stream.socket_fd()),
            will.topic
        );
        ctx.shard.borrow_mut().stats.protocol_errors += 1;
        return None;
    }
    let (max_levels, max_client_id_len) = {
        let config = &ctx.shard.borrow().config;
        (config.max_topic_levels, config.max_client_id_len)
    };
    if let Some(will) = &last_will
        && topic::exceeds_levels(&will.topic, max_levels)
    {
        limited!(
            ProtocolError,
            debug,
            "{}: will topic deeper than max_topic_levels ({max_levels})",
            Peer(stream.socket_fd())
        );
        ctx.shard.borrow_mut().stats.protocol_errors += 1;
        return None;
    }
    if client_id.len() > max_client_id_len {
        limited!(
            ConnectRefused,
            debug,
            "{}: client id of {} bytes is over max_client_id_len ({max_client_id_len}), CONNACK 2",
            Peer(stream.socket_fd()),
            client_id.len()
        );
        ctx.shard.borrow_mut().stats.connect_refused += 1;
        refuse(&mut stream, codec::CONNACK_IDENTIFIER_REJECTED).await;
        return None;
    }
    if ctx.shard.borrow().shutting_down {
        ctx.shard.borrow_mut().stats.connect_refused += 1;
        refuse(&mut stream, codec::CONNACK_SERVER_UNAVAILABLE).await;
        return None;
    }
    let client_id = if client_id.is_empty() {
        if !clean_session {
            limited!(
                ConnectRefused,
                debug,
                "{}: empty client id with CleanSession 0, CONNACK 2",
                Peer(stream.socket_fd())
            );
            ctx.shard.borrow_mut().stats.connect_refused += 1;
            refuse(&mut stream, codec::CONNACK_IDENTIFIER_REJECTED).await;
            return None;
        }
        ctx.shard.borrow_mut().generate_client_id()
    } else {
        client_id
    };
    // Before the claim: a refused client must not take over a session.
    let auth = ctx.shard.borrow().auth.clone();
    // use_identity_as_username: a verified client certificate's Common Name
    // is the user name and authenticates the client (TLS / WSS listeners).
    let tls_identity = if ctx.shard.borrow().config.use_identity_as_username {
        stream.tls_identity().map(ByteString::from)
    } else {
        None
    };
    if let Err(refusal) = auth
        .check_connect(
            username.as_deref(),
            password.as_ref(),
            tls_identity.as_deref(),
        )
        .await
    {
        limited!(
            NotAuthorized,
            info,
            "{}: client {client_id} (user {:?}) refused: {refusal}, CONNACK 5",
            Peer(stream.socket_fd()),
            username.as_deref().unwrap_or("")
        );
        ctx.shard.borrow_mut().stats.auth_failed += 1;
        refuse(&mut stream, codec::CONNACK_NOT_AUTHORIZED).await;
        return None;
    }
    let acl_username = if auth.acl_enabled() {
        tls_identity.or(username)
    } else {
        None
    };
    let rare = if last_will.is_some() || acl_username.is_some() {
        Some(Box::new(Rare {
            client_id: (last_will.is_some() && auth.acl_enabled()).then(|| client_id.clone()),
            will: last_will,
            username: acl_username,
        }))
    } else {
        None
    };
    let wire = match stream {
        Stream::Tcp(tcp) => Wire::Fresh(tcp),
        framed => Wire::Framed(framed),
    };
    let (claim, state) = match registry::claim(ctx, client_id.clone(), clean_session).await {
        Ok(granted) => granted,
        Err(e) => {
            debug!("{}: client {client_id}: {e}", Peer(wire.socket_fd()));
            return None;
        }
    };
    let link_fd = match &wire {
        Wire::Framed(stream) => framed_fd(stream.socket_fd()),
        plain => plain.socket_fd(),
    };
    let (key, conn_id) = attach(
        ctx,
        link_fd,
        client_id.clone(),
        claim,
        clean_session,
        state,
        keep_alive,
    );
    ctx.send_outbox();
    debug!(
        "{}: client {client_id} connected on shard {} (clean session {clean_session}, keep-alive {keep_alive}{})",
        Peer(wire.socket_fd()),
        ctx.id,
        Identity(&wire),
    );
    Some(Established {
        wire,
        rx,
        key,
        conn_id,
        rare,
    })
}

/// The socket of a plain TCP connection, taken from glommio's stream (which
/// has no way to give its descriptor up): a duplicate, so the stream can be
/// dropped (closing the original and cancelling its poll) while the
/// connection keeps the socket.
///
/// # Errors
/// The process is out of descriptors.
fn plain_socket(tcp: &TcpStream) -> io::Result<OwnedFd> {
    // SAFETY: the stream's descriptor is open for the duration of this call.
    unsafe { BorrowedFd::borrow_raw(tcp.as_raw_fd()) }.try_clone_to_owned()
}

/// Ends a connection: parks or removes its session, publishes its will when
/// the close calls for it, and only then closes the socket.
async fn teardown(ctx: &Ctx, conn: Established, reason: CloseReason) {
    {
        let mut shard = ctx.shard.borrow_mut();
        shard.end_connection(conn.key, conn.conn_id);
        if reason.publishes_will()
            && let Some(rare) = conn.rare
            && let Some(will) = rare.will
        {
            let who = Who {
                client_id: rare.client_id.as_deref().unwrap_or(""),
                username: rare.username.as_deref(),
            };
            if shard.auth.can_publish(who, &will.topic) {
                publish_will(&mut shard, will);
            } else {
                limited!(
                    PublishDenied,
                    debug,
                    "will to {} dropped: denied by the ACL",
                    will.topic
                );
                shard.stats.publish_denied += 1;
            }
        }
        shard.flush_dirty();
    }
    ctx.send_outbox();
    ctx.forward_publishes().await;
    debug!(
        "{}: connection closed: {reason:?}",
        Peer(conn.wire.socket_fd())
    );
    if reason == CloseReason::Shed {
        // An abortive close (RST): the kernel drops the megabytes still in
        // the socket's send buffer now instead of trickling them out to a
        // client that does not read.
        reset_on_close(conn.wire.socket_fd());
    }
    // The link is gone from the session; only now may the socket close.
    if let Wire::Framed(mut stream) = conn.wire {
        // TLS / WebSocket: say goodbye in the transport's terms (close_notify,
        // a close frame) if the socket takes it at once; never wait for it.
        let _ = futures_lite::future::poll_once(stream.close()).await;
    }
}

/// Makes the coming `close` of `fd` send a reset and discard unsent data
/// (SO_LINGER with a zero timeout).
fn reset_on_close(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is an open socket owned by the caller; the option value
    // is a valid `linger` of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        debug!(
            "SO_LINGER on a shed connection failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// A client's address (from its TCP socket) for log lines, looked up only
/// when a line is written (a `getpeername` per connection is not worth
/// paying when nothing logs).
struct Peer(RawFd);

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match peer_addr(self.0) {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("?"),
        }
    }
}

/// The peer address of a connection's socket `fd` (getpeername), None if
/// the peer is gone or `fd` is not a socket descriptor (negative).
pub fn peer_addr(fd: RawFd) -> Option<std::net::SocketAddr> {
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a connection's socket, open while the connection (or
    // its link: the connection removes the link before it closes the
    // socket) exists; it is only borrowed for this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&fd).peer_addr().ok()?.as_socket()
}

/// The TLS client certificate's identity for log lines: ", TLS identity
/// CN" (nothing without one).
struct Identity<'a>(&'a Wire);

impl std::fmt::Display for Identity<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Wire::Framed(stream) => match stream.tls_identity() {
                Some(cn) => write!(f, ", TLS identity {cn:?}"),
                None => Ok(()),
            },
            Wire::Fresh(_) | Wire::Plain(_) => Ok(()),
        }
    }
}

/// Why the first packet did not arrive.
enum FirstPacketError {
    /// It was not a valid packet.
    Decode(DecodeError),
    /// The socket closed or failed first.
    Closed,
}

/// Reads until one whole packet is decoded.
async fn read_first_packet(
    ctx: &Ctx,
    stream: &mut Stream,
    rx: &mut BytesMut,
) -> Result<Packet, FirstPacketError> {
    let max = ctx.shard.borrow().config.max_packet_size;
    loop {
        match codec::decode(rx, max) {
            Ok(Some(packet)) => return Ok(packet),
            Ok(None) => {}
            Err(e) => return Err(FirstPacketError::Decode(e)),
        }
        let len = rx.len();
        rx.resize(len + CONNECT_READ_CHUNK, 0);
        let n = stream
            .read(&mut rx[len..])
            .await
            .map_err(|_| FirstPacketError::Closed)?;
        rx.truncate(len + n);
        if n == 0 {
            return Err(FirstPacketError::Closed);
        }
        ctx.shard.borrow_mut().stats.bytes_received += n as u64;
    }
}

/// Answers CONNECT with a refusal code and lets the socket close (§3.2.2.3).
async fn refuse(stream: &mut Stream, code: u8) {
    let _ = stream.write_all(&codec::connack(false, code)).await;
    let _ = stream.flush().await;
}

/// Creates the session for a new connection (under its claim `claim`, with the
/// claimed state) and queues CONNACK plus any redelivery.
fn attach(
    ctx: &Ctx,
    link_fd: RawFd,
    client_id: ByteString,
    claim: u64,
    clean_session: bool,
    state: Option<SessionState>,
    keep_alive: u16,
) -> (SessionKey, u64) {
    let mut shard = ctx.shard.borrow_mut();
    let conn_id = shard.new_conn_id();
    let session_present = state.is_some() && !clean_session;
    let mut session = Session::new(client_id, clean_session, state.unwrap_or_default());
    session.claim = claim;
    session.link = Some(Link::new(conn_id, link_fd, keep_alive, shard.now_ticks()));
    session.queue_control(&codec::connack(session_present, codec::CONNACK_ACCEPTED));
    let limits = shard.limits;
    session.resume(&limits);
    let key = shard.insert_session(session);
    shard.mark_dirty(key);
    shard.flush_dirty();
    (key, conn_id)
}

/// Publishes a will message (§3.1.2.5).
fn publish_will(shard: &mut Shard, will: LastWill) {
    if topic::is_sys_topic(&will.topic) && will.topic.starts_with("$SYS") {
        limited!(
            PublishDenied,
            debug,
            "will to {} dropped: clients cannot publish to $SYS",
            will.topic
        );
        return;
    }
    shard.stats.publish_received += 1;
    shard.publish(Message {
        topic: will.topic,
        payload: will.message,
        qos: will.qos,
        retain: will.retain,
        retain_stamp: 0,
    });
}

/// The connection's main loop, as a future that ends with why the
/// connection ended: wait for bytes (or a close request, or writability
/// when the socket was full), handle every complete packet, flush, hand the
/// publishes to the other shards.
struct Live {
    /// The shard.
    ctx: Ctx,
    /// The connection; taken by the teardown when it ends.
    conn: Option<Established>,
    /// The connection's place under `max_connections`, given back at the end.
    slot: Option<ConnectionSlot>,
    /// Bytes that arrived with CONNECT wait in `conn.rx`: handle them before
    /// reading.
    unprocessed: bool,
    /// What the task knows of its plain socket's reading.
    reading: Reading,
    /// Publishes being handed to other shards, then the teardown (boxed:
    /// rarely in progress, and each may wait on the mesh).
    forwarding: Option<Pin<Box<dyn Future<Output = ()>>>>,
    /// Why the connection ends, once known, while `forwarding` completes.
    ended: Option<CloseReason>,
    /// The listener it came in on (per-listener connection gauge; fits in
    /// the struct's padding).
    listener: ListenerKind,
    /// The source address `slot` is counted under (0: not counted); fits
    /// in the struct's padding too.
    ip_key: IpKey,
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
                let username = Rare::username(conn.rare.as_deref());
                let step = process(&mut shard, conn.key, conn.conn_id, &mut conn.rx, username);
                shard.flush_dirty();
                (step, shard.has_remote_batch())
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

/// What a connection task knows of its plain socket, to spare `recv` calls
/// that would only say "nothing yet".
#[derive(Clone, Copy, Debug, Default)]
struct Reading {
    /// The connection ([`Wire::Fresh`]) has had its one wait in this task
    /// after CONNECT: it parks at its next.
    fresh_waited: bool,
    /// The last `recv` returned less than it could take: the socket was
    /// drained, so the connection may wait without another `recv` (arming
    /// epoll reports data that arrived since at once).
    drained: bool,
}

/// How a plain connection waits for its socket ([`Live::wait`]).
enum Waited {
    /// Parked: its task ends.
    Parked,
    /// In its task, which the socket's readiness wakes.
    Pending,
    /// Not yet: it could not leave glommio's stream (out of descriptors),
    /// so it waits on that stream, in its task.
    InTask,
}

impl Live {
    /// A plain connection's socket has nothing for it now: takes the socket
    /// from glommio's stream if still [`Wire::Fresh`], arms the shard's
    /// epoll instance for `interest`, then parks the connection (its task
    /// ends) or, while part of a packet waits in its receive buffer, waits in
    /// this task. Errs with why the connection must end instead.
    fn wait(&mut self, cx: &Context<'_>, interest: Interest) -> Result<Waited, CloseReason> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(CloseReason::Io);
        };
        let (key, conn_id, partial) = (conn.key, conn.conn_id, !conn.rx.is_empty());
        let mut shard = self.ctx.shard.borrow_mut();
        let Some(link) = shard
            .sessions
            .get_mut(key as usize)
            .and_then(|s| s.link.as_mut())
            .filter(|l| l.conn_id == conn_id)
        else {
            return Err(CloseReason::TakenOver);
        };
        let new = matches!(conn.wire, Wire::Fresh(_));
        if let Wire::Fresh(tcp) = &conn.wire {
            let fd = match plain_socket(tcp) {
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
        let Wire::Plain(fd) = &conn.wire else {
            // Only plain connections wait this way (see `poll_event`).
            return Err(CloseReason::Io);
        };
        if let Err(e) =
            self.ctx
                .poller
                .arm(fd.as_raw_fd(), park::token(key, conn_id), interest, new)
        {
            warn!(
                "{}: cannot watch the socket ({e}), closing",
                Peer(fd.as_raw_fd())
            );
            return Err(CloseReason::Io);
        }
        if partial {
            link.set_waker(cx.waker());
            return Ok(Waited::Pending);
        }
        let Some(conn) = self.conn.take() else {
            return Err(CloseReason::Io);
        };
        let Wire::Plain(fd) = conn.wire else {
            return Err(CloseReason::Io);
        };
        link.waiter = Waiter::Parked(Parked {
            fd: Some(fd),
            key,
            ip_key: self.ip_key,
            listener: self.listener,
            slot: self.slot.take(),
            rare: conn.rare,
        });
        Ok(Waited::Parked)
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
fn poll_event(
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
        ..
    } = &mut *guard;
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
    let Some(link) = session.link.as_mut() else {
        return Poll::Ready(Event::Closed(CloseReason::TakenOver));
    };
    if let Some(reason) = link.close {
        return Poll::Ready(Event::Closed(reason));
    }
    let fd = match wire {
        Wire::Framed(stream) => {
            if link.blocked {
                match write_framed(cx, stream, &mut session.out, read_buf) {
                    Ok((n, done)) => {
                        stats.bytes_sent += n as u64;
                        link.blocked = !done;
                    }
                    Err(_) => return Poll::Ready(Event::Closed(CloseReason::Io)),
                }
            }
            link.set_waker(cx.waker());
            if session.out.bytes() > limits.max_queued_bytes {
                // The client does not read what it is sent: stop reading it too.
                return Poll::Pending;
            }
            return Pin::new(&mut *stream)
                .poll_read(cx, read_buf)
                .map(|r| read_event(r, read_buf, rx, &mut stats.bytes_received));
        }
        Wire::Fresh(tcp) => tcp.as_raw_fd(),
        Wire::Plain(fd) => fd.as_raw_fd(),
    };
    if link.blocked {
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
        && !reading.fresh_waited
        && read
        && !link.blocked
    {
        // The first wait after CONNECT: in this task, on glommio's stream
        // (whose read tries a `recv` first).
        link.set_waker(cx.waker());
        return match Pin::new(tcp).poll_read(cx, read_buf) {
            Poll::Ready(r) => Poll::Ready(read_event(r, read_buf, rx, &mut stats.bytes_received)),
            Poll::Pending => {
                reading.fresh_waited = true;
                Poll::Pending
            }
        };
    }
    if read && !reading.drained {
        match recv(fd, read_buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            result => {
                reading.drained = result.as_ref().is_ok_and(|&n| n < read_buf.len());
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
fn read_event(
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

/// One non-blocking `recv` from a plain socket into `buf`.
///
/// # Errors
/// `WouldBlock` when nothing waits; any other error means the connection
/// is broken.
fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of its length; `fd` is the
        // connection's open socket.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Gives a parked connection its task back (see [`crate::park`]).
pub fn resume(ctx: &Ctx, conn_id: u64, mut parked: Parked) {
    let Some(fd) = parked.fd.take() else {
        return;
    };
    glommio::spawn_local(Live {
        ctx: ctx.clone(),
        conn: Some(Established {
            wire: Wire::Plain(fd),
            rx: BytesMut::new(),
            key: parked.key,
            conn_id,
            rare: parked.rare.take(),
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

/// The socket registered with `token` (see [`park::token`]) is ready: wakes
/// its connection, resuming it if parked. A token of a connection that has
/// ended, or that is running, changes nothing (a running task reads its
/// socket before it waits again).
pub fn socket_ready(ctx: &Ctx, token: u64) {
    let (key, conn_tag) = park::split_token(token);
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

/// Writes a framed (TLS, WebSocket) connection's queue through its stream,
/// copied in pieces of up to `scratch.len()` bytes (the shard's read buffer,
/// free while writing) so each piece becomes one TLS record run or one
/// WebSocket message, then flushes the stream. Returns the bytes written and
/// whether everything was written and flushed; otherwise the stream woke
/// this task up when it can take more.
fn write_framed(
    cx: &mut Context<'_>,
    stream: &mut Stream,
    out: &mut OutQueue,
    scratch: &mut [u8],
) -> io::Result<(usize, bool)> {
    let mut written = 0;
    loop {
        let len = out.copy_front(scratch);
        if len == 0 {
            break;
        }
        match Pin::new(&mut *stream).poll_write(cx, &scratch[..len]) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => {
                out.advance(n);
                written += n;
            }
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok((written, false)),
        }
    }
    match Pin::new(&mut *stream).poll_flush(cx) {
        Poll::Ready(Ok(())) => Ok((written, true)),
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Ok((written, false)),
    }
}

/// Decodes and handles every complete packet in `rx`; `username` is the
/// client's, for ACL checks.
pub(crate) fn process(
    shard: &mut Shard,
    key: SessionKey,
    conn_id: u64,
    rx: &mut BytesMut,
    username: Option<&str>,
) -> Result<(), CloseReason> {
    let now = shard.now_ticks();
    let Some(session) = shard.session_for(key, conn_id) else {
        return Err(CloseReason::TakenOver);
    };
    if let Some(link) = session.link.as_mut() {
        link.last_seen = now;
    }
    let max = shard.config.max_packet_size;
    loop {
        let packet = match codec::decode(rx, max) {
            Ok(Some(packet)) => packet,
            Ok(None) => return Ok(()),
            Err(e) => {
                limited!(ProtocolError, debug, "client packet refused: {e}");
                shard.stats.protocol_errors += 1;
                return Err(CloseReason::ProtocolError);
            }
        };
        shard.stats.messages_received += 1;
        handle_packet(shard, key, conn_id, packet, username)?;
    }
}

/// Acts on one packet from a connected client (`username`: for the ACL).
fn handle_packet(
    shard: &mut Shard,
    key: SessionKey,
    conn_id: u64,
    packet: Packet,
    username: Option<&str>,
) -> Result<(), CloseReason> {
    let limits = shard.limits;
    let max_topic_levels = shard.config.max_topic_levels;
    // A denied PUBLISH still completes its QoS flow (acknowledged, then
    // dropped and counted), as Mosquitto does.
    let denied = match &packet {
        Packet::Publish(publish) => !shard.may_publish(key, username, &publish.topic),
        _ => false,
    };
    // Acks of retained publishes wait for every replica, and later acks of
    // this session wait behind them ([`crate::retain::HeldAcks`]).
    let (replicas, holding) = (shard.nr_shards > 1, shard.held_acks.holds(key));
    let Some(session) = shard.session_for(key, conn_id) else {
        return Err(CloseReason::TakenOver);
    };
    match packet {
        Packet::Connect(_) => {
            limited!(
                ProtocolError,
                debug,
                "client {}: second CONNECT (§3.1.0-2)",
                session.client_id
            );
            shard.stats.protocol_errors += 1;
            return Err(CloseReason::ProtocolError);
        }
        Packet::Publish(publish) => {
            if topic::validate_topic_name(&publish.topic).is_err() {
                limited!(
                    ProtocolError,
                    debug,
                    "client {}: invalid topic name {:?}",
                    session.client_id,
                    publish.topic
                );
                shard.stats.protocol_errors += 1;
                return Err(CloseReason::ProtocolError);
            }
            if topic::exceeds_levels(&publish.topic, max_topic_levels) {
                limited!(
                    ProtocolError,
                    debug,
                    "client {}: topic deeper than max_topic_levels ({max_topic_levels}), closing",
                    session.client_id
                );
                shard.stats.protocol_errors += 1;
                return Err(CloseReason::ProtocolError);
            }
            let deliver = match publish.qos {
                QoS::AtMostOnce => true,
                QoS::AtLeastOnce => true,
                QoS::ExactlyOnce => match session.on_publish_qos2(publish.packet_id, &limits) {
                    Qos2Receipt::New => true,
                    Qos2Receipt::Duplicate => false,
                    Qos2Receipt::Refused => {
                        limited!(
                            MaxAwaitingRel,
                            info,
                            "client {}: more than {} unreleased QoS 2 messages, one dropped",
                            session.client_id,
                            limits.max_awaiting_rel
                        );
                        shard.stats.publish_dropped += 1;
                        shard.stats.dropped_qos2_overflow += 1;
                        return Ok(());
                    }
                },
            };
            if let Some(ack) = session::ack_for_publish(publish.qos, publish.packet_id) {
                let retained = replicas
                    && publish.retain
                    && deliver
                    && !denied
                    && !publish.topic.starts_with("$SYS");
                if retained || holding {
                    shard.held_acks.hold(key, conn_id, ack);
                } else {
                    session.queue_control(&ack);
                    shard.mark_dirty(key);
                }
            }
            shard.stats.publish_received += 1;
            shard.stats.publish_received_by_qos[publish.qos as usize] += 1;
            if !deliver {
                return Ok(());
            }
            if publish.topic.starts_with("$SYS") {
                limited!(
                    PublishDenied,
                    debug,
                    "publish to {} dropped: $SYS is the broker's",
                    publish.topic
                );
                shard.stats.publish_dropped += 1;
                shard.stats.dropped_sys_topic += 1;
                return Ok(());
            }
            if denied {
                limited!(
                    PublishDenied,
                    debug,
                    "publish to {} dropped: denied by the ACL",
                    publish.topic
                );
                shard.stats.publish_denied += 1;
                return Ok(());
            }
            shard.publish(Message {
                topic: publish.topic,
                payload: publish.payload,
                qos: publish.qos,
                retain: publish.retain,
                retain_stamp: 0,
            });
        }
        Packet::PubAck(id) => {
            session.on_puback(id, &limits);
            shard.mark_dirty(key);
        }
        Packet::PubRec(id) => {
            session.on_pubrec(id);
            shard.mark_dirty(key);
        }
        Packet::PubRel(id) => {
            session.on_pubrel(id);
            shard.mark_dirty(key);
        }
        Packet::PubComp(id) => {
            session.on_pubcomp(id, &limits);
            shard.mark_dirty(key);
        }
        Packet::Subscribe(subscribe) => shard.subscribe(key, subscribe, username),
        Packet::Unsubscribe(unsubscribe) => {
            shard.unsubscribe(key, unsubscribe.packet_id, &unsubscribe.filters)
        }
        Packet::PingReq => {
            session.queue_control(&codec::PINGRESP_BYTES);
            shard.mark_dirty(key);
        }
        Packet::Disconnect => return Err(CloseReason::Disconnect),
    }
    Ok(())
}

/// Closes connections silent for more than 1.5 × their keep-alive
/// (§3.1.2.10), checking every `period`; wakes plain connections idle in
/// their task for [`PARK_AFTER_TICKS`] so that they park.
pub async fn keep_alive_sweeper(ctx: Ctx, period: Duration) {
    loop {
        glommio::timer::sleep(period).await;
        let mut shard = ctx.shard.borrow_mut();
        if shard.shutting_down {
            return;
        }
        let now = shard.now_ticks();
        // The sweep walks every session anyway: it also gathers the queue
        // totals for the admin figures, which it then publishes.
        let mut totals = SessionTotals::default();
        for (_, session) in shard.sessions.iter_mut() {
            totals.count(session);
            let Some(link) = &mut session.link else {
                continue;
            };
            let limit = u32::from(link.keep_alive) * TICKS_PER_SEC * 3 / 2;
            let silent = now.saturating_sub(link.last_seen);
            if link.keep_alive > 0 && silent > limit {
                debug!("client {}: keep-alive timeout", session.client_id);
                link.close(CloseReason::KeepAliveTimeout);
            } else if silent >= PARK_AFTER_TICKS
                && !link.is_framed()
                && matches!(link.waiter, Waiter::Task(_))
            {
                // A plain connection idle in its task: it parks when woken.
                link.wake();
            }
        }
        shard.gauges.refresh(&shard, &totals);
    }
}

/// What a connection costs while idle is its session's link (with the
/// parked state in place of a task, [`crate::park::Parked`]); the admin
/// figures' per-connection fields (`Link::connected_at`, `Live::listener`)
/// live in padding. Measured on 64-bit: the link was 40 bytes with a waker,
/// 56 with the parked state (which replaced a ~300-byte task and glommio's
/// ~500-byte poll source); a running connection's task holds a `Live`.
#[cfg(all(test, target_pointer_width = "64"))]
mod size_tests {
    #[test]
    fn an_idle_connection_costs_its_link() {
        assert_eq!(std::mem::size_of::<crate::park::Parked>(), 32);
        assert_eq!(std::mem::size_of::<super::Waiter>(), 32);
        assert_eq!(std::mem::size_of::<Option<super::Link>>(), 56);
        assert_eq!(std::mem::size_of::<super::Live>(), 264);
    }
}
