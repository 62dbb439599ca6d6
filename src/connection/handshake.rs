//! From an accepted socket to an attached session: the transport's
//! handshake (TLS, WebSocket), CONNECT (§3.1) bounded by the connect
//! timeout, authentication, the client-id claim (take-over across shards,
//! `crate::shard::registry`), CONNACK, and the will when a connection ends.

use std::os::fd::RawFd;
use std::time::Instant;

use bytes::BytesMut;
use bytestring::ByteString;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use log::debug;

use super::{Established, Identity, Peer, Wire};
use crate::net::transport::{Acceptor, Stream, Transport};
use crate::observe::log_limit::LogKind::{
    ConnectRefused, NotAuthorized, ProtocolError, PublishDenied,
};
use crate::observe::log_limit::limited;
use crate::protocol::message::Message;
use crate::protocol::topic;
use crate::protocol::v3::{self as codec, Connect, DecodeError, LastWill, Packet};
use crate::session::link::{Link, Rare, SessionKey, framed_fd};
use crate::session::{Session, SessionState};
use crate::shard::registry;
use crate::shard::{Ctx, Shard};

/// How much the receive buffer grows per read while waiting for CONNECT.
pub(super) const CONNECT_READ_CHUNK: usize = 512;

/// The transport's handshake (TLS, WebSocket), then MQTT's: None when the
/// connection ends there. Both together must finish within the connect
/// timeout, counted from the accept.
pub(super) async fn establish(
    ctx: &Ctx,
    tcp: TcpStream,
    acceptor: &Acceptor,
) -> Option<Established> {
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
pub(super) async fn accept_transport(
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
pub(super) async fn handshake(
    ctx: &Ctx,
    mut stream: Stream,
    deadline: Instant,
) -> Option<Established> {
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
        ctx.shard.borrow_mut().stats.auth_failures += 1;
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

/// Why the first packet did not arrive.
pub(super) enum FirstPacketError {
    /// It was not a valid packet.
    Decode(DecodeError),
    /// The socket closed or failed first.
    Closed,
}

/// Reads until one whole packet is decoded.
pub(super) async fn read_first_packet(
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
pub(super) async fn refuse(stream: &mut Stream, code: u8) {
    let _ = stream.write_all(&codec::connack(false, code)).await;
    let _ = stream.flush().await;
}

/// Creates the session for a new connection (under its claim `claim`, with the
/// claimed state) and queues CONNACK plus any redelivery.
pub(super) fn attach(
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
    session.reattach(&limits);
    let key = shard.insert_session(session);
    shard.mark_dirty(key);
    shard.flush_dirty();
    (key, conn_id)
}

/// Publishes a will message (§3.1.2.5).
pub(super) fn publish_will(shard: &mut Shard, will: LastWill) {
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
