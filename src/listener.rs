//! Listening sockets and the accept loop.
//!
//! Each listen address gets one socket per shard, all bound with SO_REUSEPORT
//! so the kernel spreads new connections over per-core accept queues. The
//! sockets are built with `socket2` (glommio's own `bind` fixes the backlog at
//! 1024) before the shards start, so that port 0 resolves to one port that
//! every shard then binds.
//!
//! The accept loop never spins and never crashes on resource exhaustion: at
//! `max_connections` it accepts and closes at once (the client sees a clean
//! close, not a hanging SYN), and when the process is out of file descriptors
//! (EMFILE/ENFILE) or memory it logs, waits, and tries again, so it recovers
//! once descriptors free up.
//!
//! It also applies the per-address connection limit and the connection-rate
//! token bucket ([`crate::net::admission`]): a refused socket is closed right
//! after accept, counted, and logged at most once per
//! [`crate::observe::log_limit::LOG_INTERVAL`] per kind ([`crate::observe::log_limit`]).
//!
//! The connections already queued are taken with `accept4` on the
//! listener, made non-blocking ([`crate::net::fd::accept`]): one system
//! call each, the socket owned from the start. Only when the queue is
//! empty does the loop wait, in glommio's accept (io_uring), whose stream
//! hands its socket over with one duplicate
//! ([`crate::connection::accepted_stream`]).
//!
//! An accepted socket whose client has not written yet gets no task: it
//! waits in the shard's epoll set ([`crate::connection::accepted`]) until
//! its first bytes arrive.
//!
//! On a listener that expects the PROXY protocol ([`crate::net::proxy`]),
//! the accepted socket's peer is the load balancer, not the client. There
//! `max_connections` still counts every accepted socket at once, but the
//! rate, the per-address count and the loopback exemption wait for the
//! header: a task of the connection's own reads it (within
//! `proxy_protocol_timeout_secs`), then applies them to the client's
//! address from the header, then serves the connection. A connection
//! without a valid header in time is closed, counted
//! (`connections_proxy_refused`) and logged (rate-limited).

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use glommio::net::TcpListener;
use log::{debug, warn};
use socket2::{Domain, Protocol, Socket, Type};

use crate::connection;
use crate::net::admission::{self, AddressRates, ConnectionCounts, ConnectionSlot, TokenBucket};
use crate::net::fd;
use crate::net::proxy::{self, Origin};
use crate::net::transport::Acceptor;
use crate::observe::log_limit::LogKind::{
    AcceptFailed, MaxConnectionRate, MaxConnectionRatePerIp, MaxConnections, MaxConnectionsPerIp,
    ProxyProtocol,
};
use crate::observe::log_limit::limited;
use crate::shard::Ctx;

/// Pause after an accept error caused by exhausted resources, so the loop
/// does not spin while descriptors or memory are short.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Errors setting up listeners.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// A socket could not be created, configured, bound or listened on.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// One listen address's sockets: one per shard, all on the same port.
#[derive(Debug)]
pub struct ListenerSet {
    /// The address actually bound (port 0 resolved).
    pub addr: SocketAddr,
    /// One listening socket's descriptor per shard, owned until a shard takes it.
    pub fds: Vec<RawFd>,
}

/// Creates `shards` listening sockets on `addr` with SO_REUSEPORT.
///
/// # Errors
/// Any socket call failing (address in use, permission, ...).
pub fn bind(addr: SocketAddr, shards: usize, backlog: u32) -> Result<ListenerSet, ListenerError> {
    let mut fds = Vec::with_capacity(shards);
    let mut bound = addr;
    for _ in 0..shards {
        let socket =
            make_socket(bound, backlog).map_err(|source| ListenerError::Bind { addr, source })?;
        if bound.port() == 0 {
            bound = socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .unwrap_or(bound);
        }
        fds.push(socket.into_raw_fd());
    }
    Ok(ListenerSet { addr: bound, fds })
}

/// One listening socket with the options fan-out needs. TCP_NODELAY is set
/// here once: Linux clones an accepted socket from its listener, so every
/// connection inherits it without a `setsockopt` of its own (a CONNACK, a
/// SUBACK or a lone PUBLISH must not wait for Nagle's algorithm).
fn make_socket(addr: SocketAddr, backlog: u32) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket)
}

/// Accepts connections on `fd` for this shard until shutdown; `acceptor`
/// says which transport the listener speaks (its handshake runs in each
/// connection's task).
pub async fn accept_loop(
    ctx: Ctx,
    fd: RawFd,
    addr: SocketAddr,
    acceptor: Acceptor,
    counts: Arc<ConnectionCounts>,
) {
    let kind = acceptor.transport;
    // SAFETY: `fd` is a listening socket created by `bind` and handed to
    // exactly this shard; the listener takes ownership and closes it.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    // Non-blocking, for `fd::accept`'s loop. glommio's accept, which waits
    // when the queue is empty, keeps the flag as it finds it (its io_uring
    // accept waits for a connection either way).
    if let Err(e) = fd::set_nonblocking(fd) {
        warn!(
            "shard {}: listener {addr}: cannot make it non-blocking ({e})",
            ctx.id
        );
        return;
    }
    let config = ctx.shard.borrow().config.clone();
    let max = config.max_connections;
    // Shared with the tasks that read PROXY protocol headers (one shard,
    // one thread; never borrowed across an await).
    let limits = Rc::new(RefCell::new(AcceptLimits::new(&config, ctx.nr_shards)));
    loop {
        if ctx.shard.borrow().shutting_down {
            debug!("shard {}: listener {addr} closed", ctx.id);
            return;
        }
        // The connections already queued are taken with `accept4`, one
        // system call each; only when none is left does the loop wait, in
        // glommio's accept (io_uring), which hands over the next one.
        let accepted = match fd::accept(fd) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let waited =
                    futures_lite::future::or(async { Some(listener.accept().await) }, async {
                        wait_for_shutdown(&ctx).await;
                        None
                    })
                    .await;
                match waited {
                    None => {
                        debug!("shard {}: listener {addr} closed", ctx.id);
                        return;
                    }
                    Some(Ok(stream)) => Ok(Accepted::Stream(stream)),
                    // Nothing after all (the listener is non-blocking):
                    // look again.
                    Some(Err(glommio::GlommioError::IoError(e)))
                        if e.kind() == std::io::ErrorKind::WouldBlock =>
                    {
                        continue;
                    }
                    Some(Err(e)) => Err(std::io::Error::from(e)),
                }
            }
            Ok(socket) => Ok(Accepted::Socket(socket)),
            Err(e) => Err(e),
        };
        match accepted {
            Ok(socket) => {
                {
                    let mut shard = ctx.shard.borrow_mut();
                    shard.stats.connections_accepted += 1;
                    shard.stats.accepted_by_listener[kind.index()] += 1;
                }
                let ip_key = if acceptor.proxy_protocol {
                    // Counted per address once the header names the client.
                    0
                } else {
                    let admitted =
                        limits
                            .borrow_mut()
                            .admit_socket(&ctx, socket.raw_fd(), addr, &counts);
                    match admitted {
                        Ok(key) => key,
                        Err(refused) => {
                            debug!("shard {}: connection closed at accept: {refused}", ctx.id);
                            drop(socket);
                            continue;
                        }
                    }
                };
                if counts.total.fetch_add(1, Ordering::Relaxed) >= max {
                    counts.total.fetch_sub(1, Ordering::Relaxed);
                    if ip_key != 0 {
                        counts.remove_ip(ip_key);
                    }
                    ctx.shard.borrow_mut().stats.connections_refused += 1;
                    limited!(
                        MaxConnections,
                        warn,
                        "max_connections ({max}) reached: refusing new connections"
                    );
                    drop(socket);
                    continue;
                }
                let slot = ConnectionSlot(counts.clone());
                if acceptor.proxy_protocol {
                    glommio::spawn_local(serve_proxied(
                        ctx.clone(),
                        socket.into_stream(),
                        addr,
                        acceptor.clone(),
                        slot,
                        limits.clone(),
                    ))
                    .detach();
                    continue;
                }
                match socket {
                    Accepted::Socket(socket) => {
                        connection::accepted(&ctx, socket, &acceptor, slot, ip_key);
                    }
                    Accepted::Stream(tcp) => {
                        connection::accepted_stream(&ctx, tcp, &acceptor, slot, ip_key);
                    }
                }
                if glommio::executor().need_preempt() {
                    // A long queue of connections: let the shard's other
                    // tasks (these connections' handshakes) run too.
                    futures_lite::future::yield_now().await;
                }
            }
            Err(e) => {
                let exhausted = matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                );
                ctx.shard.borrow_mut().stats.accept_errors += 1;
                limited!(
                    AcceptFailed,
                    warn,
                    "accept on {addr} failed: {e}{}",
                    if exhausted {
                        " (out of file descriptors or memory: raise LimitNOFILE / fs.file-max or lower max_connections)"
                    } else {
                        ""
                    }
                );
                if exhausted {
                    glommio::timer::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            }
        }
    }
}

/// A connection as the accept loop got it: its own socket (`fd::accept`),
/// or glommio's stream (from its accept, when the loop had to wait).
enum Accepted {
    /// Taken with `accept4`.
    Socket(OwnedFd),
    /// Handed over by glommio's accept.
    Stream(glommio::net::TcpStream),
}

impl Accepted {
    /// The socket's descriptor.
    fn raw_fd(&self) -> RawFd {
        match self {
            Accepted::Socket(socket) => socket.as_raw_fd(),
            Accepted::Stream(tcp) => tcp.as_raw_fd(),
        }
    }

    /// As glommio's stream (what the PROXY protocol reader takes).
    fn into_stream(self) -> glommio::net::TcpStream {
        match self {
            Accepted::Socket(socket) => fd::into_tcp_stream(socket),
            Accepted::Stream(tcp) => tcp,
        }
    }
}

/// A connection on a PROXY protocol listener: reads the header, applies the
/// rate and per-address limits to the client it names, then serves the
/// connection. Closes it (the slot gives its place back) when the header is
/// missing, invalid or late, or a limit refuses the client.
async fn serve_proxied(
    ctx: Ctx,
    mut stream: glommio::net::TcpStream,
    addr: SocketAddr,
    acceptor: Acceptor,
    slot: ConnectionSlot,
    limits: Rc<RefCell<AcceptLimits>>,
) {
    let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else {
        return; // Already gone.
    };
    let timeout = ctx.shard.borrow().config.proxy_protocol_timeout;
    let client = match proxy::read_header(&mut stream, timeout).await {
        Ok(origin) => {
            proxy::remember(local, peer, origin);
            match origin {
                Origin::Client(client) => client,
                Origin::Balancer => peer,
            }
        }
        Err(e) => {
            ctx.shard.borrow_mut().stats.connections_proxy_refused += 1;
            limited!(
                ProxyProtocol,
                warn,
                "{peer} on {} listener {addr}: {e}: closing (the listener has proxy_protocol = true)",
                acceptor.transport.name()
            );
            return;
        }
    };
    let counts = slot.0.clone();
    let admitted = limits.borrow_mut().admit(&ctx, client, addr, &counts);
    match admitted {
        Ok(ip_key) => {
            connection::serve(ctx, stream, acceptor, slot, ip_key, Instant::now()).await;
        }
        Err(refused) => debug!("shard {}: {client} via {peer} closed: {refused}", ctx.id),
    }
}

/// Why a freshly accepted connection is closed at once (already counted in
/// the stats and, rate-limited, logged).
#[derive(Debug, thiserror::Error)]
enum Refused {
    /// The peer was gone before its address could be read.
    #[error("the peer is already gone")]
    PeerGone(#[source] std::io::Error),
    /// The listener is over `max_connection_rate`.
    #[error("max_connection_rate reached")]
    RateLimited,
    /// Its address is over `max_connection_rate_per_ip`.
    #[error("max_connection_rate_per_ip reached")]
    IpRateLimited,
    /// Its address already has `max_connections_per_ip` connections.
    #[error("max_connections_per_ip reached")]
    IpLimited,
}

/// One accept loop's per-address and rate limits (see [`crate::net::admission`]).
struct AcceptLimits {
    /// Connections at once per address; 0: no limit.
    max_per_ip: usize,
    /// This shard's share of the listener's rate; None: no limit.
    bucket: Option<TokenBucket>,
    /// This shard's share of each address's rate; None: no limit.
    per_ip_rate: Option<AddressRates>,
    /// Loopback clients skip both limits.
    exempt_loopback: bool,
}

impl AcceptLimits {
    /// The limits of `config`, for one of `shards` accept loops.
    fn new(config: &crate::config::Config, shards: usize) -> AcceptLimits {
        let bucket = (config.max_connection_rate > 0).then(|| {
            TokenBucket::shard_share(
                config.max_connection_rate,
                config.connection_rate_burst,
                shards,
                Instant::now(),
            )
        });
        let per_ip_rate = (config.max_connection_rate_per_ip > 0).then(|| {
            AddressRates::shard_share(
                config.max_connection_rate_per_ip,
                config.connection_rate_per_ip_burst,
                shards,
            )
        });
        AcceptLimits {
            max_per_ip: config.max_connections_per_ip,
            bucket,
            per_ip_rate,
            exempt_loopback: config.limits_exempt_loopback,
        }
    }

    /// [`AcceptLimits::admit`] for an accepted socket whose peer is the
    /// client (no PROXY protocol), looking the address up only when a
    /// limit is on.
    ///
    /// # Errors
    /// [`Refused`]: why the connection must be closed.
    fn admit_socket(
        &mut self,
        ctx: &Ctx,
        socket: RawFd,
        listener: SocketAddr,
        counts: &ConnectionCounts,
    ) -> Result<admission::IpKey, Refused> {
        if self.bucket.is_none() && self.per_ip_rate.is_none() && self.max_per_ip == 0 {
            return Ok(0);
        }
        // Already gone (reset before we looked): nothing to count.
        let peer = fd::socket_peer(socket).map_err(Refused::PeerGone)?;
        self.admit(ctx, peer, listener, counts)
    }

    /// Checks the rate and the per-address count for a new connection from
    /// `peer` to `listener`. Ok with the address key it was counted under
    /// (0: not counted), Err when it must be closed now (already counted in
    /// the stats).
    ///
    /// # Errors
    /// [`Refused`]: why the connection must be closed.
    fn admit(
        &mut self,
        ctx: &Ctx,
        peer: SocketAddr,
        listener: SocketAddr,
        counts: &ConnectionCounts,
    ) -> Result<admission::IpKey, Refused> {
        if self.exempt_loopback && peer.ip().to_canonical().is_loopback() {
            return Ok(0);
        }
        let now = Instant::now();
        // Per address first: a hostile address's refused connections take
        // no token from the listener's bucket.
        if let Some(rates) = &mut self.per_ip_rate
            && !rates.try_take(counts.ip_key(peer.ip()), now)
        {
            ctx.shard.borrow_mut().stats.connections_ip_rate_limited += 1;
            limited!(
                MaxConnectionRatePerIp,
                warn,
                "max_connection_rate_per_ip reached for {} on {listener}: closing its new connections",
                peer.ip()
            );
            return Err(Refused::IpRateLimited);
        }
        if let Some(bucket) = &mut self.bucket
            && !bucket.try_take(now)
        {
            ctx.shard.borrow_mut().stats.connections_rate_limited += 1;
            limited!(
                MaxConnectionRate,
                warn,
                "max_connection_rate reached on {listener}: closing new connections (latest from {peer})"
            );
            return Err(Refused::RateLimited);
        }
        if self.max_per_ip == 0 {
            return Ok(0);
        }
        let key = counts.ip_key(peer.ip());
        if !counts.try_add_ip(key, self.max_per_ip) {
            ctx.shard.borrow_mut().stats.connections_ip_limited += 1;
            limited!(
                MaxConnectionsPerIp,
                warn,
                "max_connections_per_ip ({}) reached for {}: closing its new connections",
                self.max_per_ip,
                peer.ip()
            );
            return Err(Refused::IpLimited);
        }
        Ok(key)
    }
}

/// Resolves once the shard begins shutting down (woken by
/// `Shard::begin_shutdown`, no timer).
pub async fn wait_for_shutdown(ctx: &Ctx) {
    std::future::poll_fn(|cx| ctx.shard.borrow_mut().poll_shutdown(cx)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let listener = make_socket("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.tcp_nodelay().unwrap(), "TCP_NODELAY not inherited");
    }

    #[test]
    fn port_zero_resolves_to_one_port_for_every_shard() {
        let set = bind("127.0.0.1:0".parse().unwrap(), 3, 128).unwrap();
        assert_ne!(set.addr.port(), 0);
        assert_eq!(set.fds.len(), 3);
        for fd in set.fds {
            // SAFETY: fds from `bind` are owned listening sockets.
            let socket = unsafe { Socket::from_raw_fd(fd) };
            let local = socket.local_addr().unwrap().as_socket().unwrap();
            assert_eq!(local, set.addr);
        }
    }
}
