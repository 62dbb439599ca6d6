//! From an accepted socket to an attached session: the transport's
//! handshake (TLS, WebSocket), CONNECT (§3.1) bounded by the connect
//! timeout, authentication, the client-id claim (take-over across shards,
//! `crate::shard::registry`), CONNACK, and the will when a connection ends.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Instant;

use bytes::BytesMut;
use bytestring::ByteString;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use log::debug;

use super::connect::{
    Accepted, ConnectRequest, Refusal, accepting_connack, effective_keep_alive,
    refusing_connack_v5, response_information,
};
use super::{Established, Identity, Peer, Wire, send_now};
use crate::net::fd;
use crate::net::transport::{Acceptor, Stream, Transport};
use crate::observe::log_limit::LogKind::{
    ConnectRefused, NotAuthorized, ProtocolError, PublishDenied,
};
use crate::observe::log_limit::limited;
use crate::protocol::Version;
use crate::protocol::message::{Message, MessageProperties};
use crate::protocol::topic;
use crate::protocol::v3::{self as codec, DecodeError, LastWill, Packet};
use crate::protocol::v5::{self, Properties, ReasonCode};
use crate::security::auth;
use crate::session::alias::ServerAliases;
use crate::session::link::{Link, Rare, SessionKey, framed_fd};
use crate::session::{Session, SessionState};
use crate::shard::Ctx;
use crate::shard::registry;

/// How much the receive buffer grows per read while waiting for CONNECT.
pub(super) const CONNECT_READ_CHUNK: usize = 512;

/// The transport's handshake (TLS, WebSocket), then MQTT's: None when the
/// connection ends there. Both together must finish within the connect
/// timeout, counted from the accept (`accepted_at`).
pub(super) async fn establish(
    ctx: &Ctx,
    tcp: TcpStream,
    acceptor: &Acceptor,
    accepted_at: Instant,
) -> Option<Established> {
    let deadline = accepted_at + ctx.shard.borrow().config.connect_timeout;
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
    // The client's address (a PROXY protocol header's, if any).
    let peer = Peer(std::os::fd::AsRawFd::as_raw_fd(&tcp)).to_string();
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

/// Waits for CONNECT (until `deadline`, the end of the connect timeout)
/// on glommio's stream, then handles it ([`connect`]). None when the
/// connection ends here (refused, timed out, invalid).
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
    match first {
        Ok(first) => connect(ctx, Client::Stream(stream), rx, first).await,
        Err(_) => {
            debug!(
                "{}: no CONNECT within {connect_timeout:?}, closing",
                Peer(stream.socket_fd())
            );
            None
        }
    }
}

/// A client between its first packet and CONNACK: what the refusals are
/// written to, and what becomes the connection's [`Wire`].
pub(super) enum Client {
    /// Read through glommio's stream (or its TLS / WebSocket framing).
    Stream(Stream),
    /// A plain TCP socket whose first packet was read with `recv` while it
    /// waited without a task (`crate::net::waiting`): it never becomes a
    /// glommio stream, and parks at its first wait after CONNACK.
    Socket(OwnedFd),
}

impl Client {
    /// The TCP socket underneath (for log lines).
    fn socket_fd(&self) -> RawFd {
        match self {
            Client::Stream(stream) => stream.socket_fd(),
            Client::Socket(fd) => fd.as_raw_fd(),
        }
    }

    /// Writes a CONNACK that ends the connection. A socket is written once,
    /// without waiting: a CONNACK is a few bytes, which a socket that has
    /// sent nothing yet always takes.
    async fn answer(&mut self, bytes: &[u8]) {
        match self {
            Client::Stream(stream) => {
                let _ = stream.write_all(bytes).await;
                let _ = stream.flush().await;
            }
            Client::Socket(fd) => send_now(fd.as_raw_fd(), bytes),
        }
    }
}

/// Handles the client's first packet, `first` (`rx` holds what came after
/// it): validates the CONNECT, claims the client id and attaches the
/// session. None when the connection ends here (refused, invalid).
pub(super) async fn connect(
    ctx: &Ctx,
    mut client: Client,
    mut rx: BytesMut,
    first: Result<ConnectRequest, FirstPacketError>,
) -> Option<Established> {
    let request = match first {
        Ok(request) => request,
        Err(FirstPacketError::NotConnect(what)) => {
            limited!(
                ProtocolError,
                debug,
                "{}: first packet is not CONNECT ({what}), closing",
                Peer(client.socket_fd())
            );
            ctx.shard.borrow_mut().stats.protocol_errors += 1;
            return None;
        }
        Err(FirstPacketError::Decode(DecodeError::UnsupportedProtocolLevel(level))) => {
            // 3.x clients understand 3.1.1's CONNACK 1; a client of a later
            // version than 5.0 gets MQTT 5.0's 0x84 (§3.1.2.2).
            let version = if level > v5::PROTOCOL_VERSION {
                Version::V5
            } else {
                Version::V3
            };
            limited!(
                ConnectRefused,
                debug,
                "{}: unsupported protocol level {level}, refused",
                Peer(client.socket_fd())
            );
            ctx.shard.borrow_mut().stats.connect_refused += 1;
            refuse(&mut client, version, Refusal::UnsupportedProtocolVersion).await;
            return None;
        }
        Err(FirstPacketError::Decode(e)) => {
            limited!(
                ProtocolError,
                debug,
                "{}: bad CONNECT: {e}",
                Peer(client.socket_fd())
            );
            ctx.shard.borrow_mut().stats.protocol_errors += 1;
            return None;
        }
        Err(FirstPacketError::DecodeV5(e)) => {
            // §4.13.1: a CONNACK with the reason, then close.
            limited!(
                ProtocolError,
                debug,
                "{}: bad MQTT 5.0 CONNECT: {e}",
                Peer(client.socket_fd())
            );
            ctx.shard.borrow_mut().stats.protocol_errors += 1;
            client.answer(&refusing_connack_v5(e.reason_code())).await;
            return None;
        }
        Err(FirstPacketError::Closed) => return None,
    };
    let version = request.version;
    if let Some(will) = &request.will
        && topic::validate_topic_name(&will.topic).is_err()
    {
        limited!(
            ProtocolError,
            debug,
            "{}: invalid will topic {:?}",
            Peer(client.socket_fd()),
            will.topic
        );
        ctx.shard.borrow_mut().stats.protocol_errors += 1;
        if version == Version::V5 {
            let code = ReasonCode::TOPIC_NAME_INVALID;
            client.answer(&refusing_connack_v5(code)).await;
        }
        return None;
    }
    let (max_levels, max_client_id_len, max_keepalive) = {
        let config = &ctx.shard.borrow().config;
        (
            config.max_topic_levels,
            config.max_client_id_len,
            config.max_keepalive,
        )
    };
    if let Some(will) = &request.will
        && topic::exceeds_levels(&will.topic, max_levels)
    {
        limited!(
            ProtocolError,
            debug,
            "{}: will topic deeper than max_topic_levels ({max_levels})",
            Peer(client.socket_fd())
        );
        ctx.shard.borrow_mut().stats.protocol_errors += 1;
        return None;
    }
    if request.will_payload_invalid {
        limited!(
            ConnectRefused,
            debug,
            "{}: will payload is not UTF-8 as its format says, refused",
            Peer(client.socket_fd())
        );
        refuse(&mut client, version, Refusal::PayloadFormatInvalid).await;
        return None;
    }
    if request.authentication_method {
        limited!(
            ConnectRefused,
            debug,
            "{}: extended authentication is not supported, refused",
            Peer(client.socket_fd())
        );
        refuse(&mut client, version, Refusal::BadAuthenticationMethod).await;
        return None;
    }
    if request.client_id.len() > max_client_id_len {
        limited!(
            ConnectRefused,
            debug,
            "{}: client id of {} bytes is over max_client_id_len ({max_client_id_len}), refused",
            Peer(client.socket_fd()),
            request.client_id.len()
        );
        ctx.shard.borrow_mut().stats.connect_refused += 1;
        refuse(&mut client, version, Refusal::ClientIdentifierNotValid).await;
        return None;
    }
    if ctx.shard.borrow().shutting_down {
        ctx.shard.borrow_mut().stats.connect_refused += 1;
        refuse(&mut client, version, Refusal::ServerUnavailable).await;
        return None;
    }
    let ConnectRequest {
        protocol_level,
        clean_start,
        keep_alive,
        client_id,
        will: last_will,
        will_properties,
        will_delay,
        username,
        password,
        session_expiry,
        receive_maximum,
        maximum_packet_size,
        request_response_information,
        topic_alias_maximum,
        ..
    } = request;
    let mut accepted = Accepted {
        assigned_client_id: None,
        server_keep_alive: None,
        response_information: None,
    };
    let client_id = if client_id.is_empty() {
        // 3.1.1 refuses an empty id with CleanSession 0 (§3.1.3-8); 5.0
        // assigns one in any case (§3.1.3.1).
        if version == Version::V3 && !clean_start {
            limited!(
                ConnectRefused,
                debug,
                "{}: empty client id with CleanSession 0, CONNACK 2",
                Peer(client.socket_fd())
            );
            ctx.shard.borrow_mut().stats.connect_refused += 1;
            refuse(&mut client, version, Refusal::ClientIdentifierNotValid).await;
            return None;
        }
        let id = ctx.shard.borrow_mut().generate_client_id();
        if version == Version::V5 {
            accepted.assigned_client_id = Some(id.clone());
        }
        id
    } else {
        client_id
    };
    let (keep_alive, server_keep_alive) = effective_keep_alive(version, keep_alive, max_keepalive);
    accepted.server_keep_alive = server_keep_alive;
    if request_response_information {
        let config = &ctx.shard.borrow().config;
        accepted.response_information =
            response_information(config.response_information.as_deref(), &client_id);
    }
    // Before the claim: a refused client must not take over a session.
    let auth = ctx.shard.borrow().auth.clone();
    // use_identity_as_username: a verified client certificate's Common Name
    // is the user name and authenticates the client (TLS / WSS listeners).
    let tls_identity = if ctx.shard.borrow().config.use_identity_as_username {
        match &client {
            Client::Stream(stream) => stream.tls_identity().map(ByteString::from),
            Client::Socket(_) => None,
        }
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
        let answer = match refusal {
            auth::Refusal::Anonymous => Refusal::NotAuthorized,
            _ => Refusal::BadUserNameOrPassword,
        };
        limited!(
            NotAuthorized,
            info,
            "{}: client {client_id} (user {:?}) refused: {refusal}, {}",
            Peer(client.socket_fd()),
            username.as_deref().unwrap_or(""),
            answer.describe(version)
        );
        ctx.shard.borrow_mut().stats.auth_failures += 1;
        let refusal = answer;
        refuse(&mut client, version, refusal).await;
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
            will_properties,
            will_delay,
            username: acl_username.clone(),
            topic_aliases: Vec::new(),
            framing: None,
        }))
    } else {
        None
    };
    // A framed connection's own descriptor for its socket, taken now, while
    // giving up costs nothing: glommio's stream goes once CONNECT is done.
    let framed_socket = match &client {
        Client::Stream(stream @ Stream::Framed(_)) => match fd::duplicate(stream.socket_fd()) {
            Ok(fd) => Some(fd),
            Err(e) => {
                debug!(
                    "{}: cannot take the socket ({e}), closing",
                    Peer(client.socket_fd())
                );
                return None;
            }
        },
        Client::Stream(Stream::Tcp(_)) | Client::Socket(_) => None,
    };
    let (claim, state) = match registry::claim(ctx, client_id.clone(), clean_start).await {
        Ok(granted) => granted,
        Err(e) => {
            debug!("{}: client {client_id}: {e}", Peer(client.socket_fd()));
            // A claim that ran out of time or that the cluster could not
            // decide is refused as server unavailable (3.1.1: 0x03, 5.0:
            // 0x88): the client tries again. A superseded one gets no
            // CONNACK (a newer connection has the id).
            if e != registry::RegistryError::Superseded {
                refuse(&mut client, version, Refusal::ServerUnavailable).await;
            }
            return None;
        }
    };
    let wire = match client {
        Client::Socket(fd) => Wire::Plain(fd),
        Client::Stream(stream) => match (stream.into_framed(), framed_socket) {
            (Ok((_glommio_stream, framing, decoded)), Some(socket)) => {
                // What came after CONNECT (a pipelined SUBSCRIBE) is read next.
                rx.extend_from_slice(&decoded);
                Wire::Framed(socket, framing)
            }
            (Ok(_), None) => return None,
            (Err(tcp), _) => Wire::Fresh(tcp),
        },
    };
    let link_fd = match &wire {
        Wire::Framed(socket, _) => framed_fd(socket.as_raw_fd()),
        plain => plain.socket_fd(),
    };
    let attached = Attach {
        claim,
        version,
        clean_start,
        session_expiry,
        keep_alive,
        receive_maximum,
        max_packet_size: maximum_packet_size,
        topic_alias_maximum,
        accepted,
        acl_username,
        protocol_level,
    };
    let (key, conn_id) = attach(ctx, link_fd, client_id.clone(), state, &attached);
    if rx.is_empty() {
        ctx.shard.borrow_mut().flush_dirty();
    }
    // Otherwise the client pipelined packets after its CONNECT (a
    // SUBSCRIBE, usually): the connection task's first step handles them
    // and its flush sends the CONNACK with their answers (a SUBACK) in one
    // write, not two.
    journal_will(ctx, key, &client_id, rare.as_deref());
    ctx.send_outbox();
    debug!(
        "{}: client {client_id} connected on shard {} ({version:?}, clean start {clean_start}, session expiry {session_expiry}, keep-alive {keep_alive}{})",
        Peer(wire.socket_fd()),
        ctx.id,
        Identity(&wire),
    );
    Some(Established {
        wire,
        rx,
        key,
        conn_id,
        version,
        rare,
    })
}

/// Why the first packet did not arrive.
pub(super) enum FirstPacketError {
    /// It was not a valid 3.1.1 packet.
    Decode(DecodeError),
    /// It was a CONNECT for MQTT 5.0 that is not valid.
    DecodeV5(v5::DecodeError),
    /// A valid packet, but not CONNECT (its type, for the log).
    NotConnect(&'static str),
    /// The socket closed or failed first.
    Closed,
}

/// Reads until one whole packet is decoded ([`decode_first_packet`]).
pub(super) async fn read_first_packet(
    ctx: &Ctx,
    stream: &mut Stream,
    rx: &mut BytesMut,
) -> Result<ConnectRequest, FirstPacketError> {
    let max = ctx.shard.borrow().config.max_packet_size;
    loop {
        if let Some(request) = decode_first_packet(rx, max)? {
            return Ok(request);
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

/// Decodes the client's first packet from `rx`: a CONNECT of 3.1.1 (or
/// 3.1), or, when the 3.1.1 decoder finds protocol level 5, of MQTT 5.0
/// (the 3.1.1 decoder leaves the buffer untouched on errors). None while
/// the packet is not whole.
pub(super) fn decode_first_packet(
    rx: &mut BytesMut,
    max: usize,
) -> Result<Option<ConnectRequest>, FirstPacketError> {
    match codec::decode(rx, max) {
        Ok(Some(Packet::Connect(connect))) => Ok(Some(ConnectRequest::from(connect))),
        Ok(Some(_)) => Err(FirstPacketError::NotConnect("MQTT 3.1.1")),
        Ok(None) => Ok(None),
        Err(DecodeError::UnsupportedProtocolLevel(v5::PROTOCOL_VERSION)) => {
            match v5::decode(rx, max) {
                Ok(Some(v5::Packet::Connect(connect))) => Ok(Some(ConnectRequest::from(connect))),
                Ok(Some(_)) => Err(FirstPacketError::NotConnect("MQTT 5.0")),
                // The 3.1.1 decoder read the level, so the packet is whole.
                Ok(None) => Err(FirstPacketError::Closed),
                Err(e) => Err(FirstPacketError::DecodeV5(e)),
            }
        }
        Err(e) => Err(FirstPacketError::Decode(e)),
    }
}

/// Answers CONNECT with a refusal in `version`'s format and lets the socket
/// close (§3.2.2.3; 5.0: §3.2.2.2).
pub(super) async fn refuse(client: &mut Client, version: Version, refusal: Refusal) {
    client.answer(&refusal.connack(version)).await;
}

/// What [`attach`] needs of the CONNECT besides the client id.
pub(super) struct Attach {
    /// The token of the claim the session is attached under
    /// (`Session::claim`).
    pub(super) claim: u64,
    /// The connection's protocol.
    pub(super) version: Version,
    /// Clean Start / CleanSession: the claimed state was discarded.
    pub(super) clean_start: bool,
    /// Session Expiry Interval in seconds (0: the session ends with the
    /// connection).
    pub(super) session_expiry: u32,
    /// The keep-alive the connection is held to.
    pub(super) keep_alive: u16,
    /// The client's Receive Maximum.
    pub(super) receive_maximum: u16,
    /// The client's Maximum Packet Size.
    pub(super) max_packet_size: u32,
    /// The client's Topic Alias Maximum (0 for 3.1.1).
    pub(super) topic_alias_maximum: u16,
    /// What the CONNACK tells an accepted client.
    pub(super) accepted: Accepted,
    /// The user name for ACL checks (None without an ACL file): a session
    /// with per-delivery read checks takes this connection's.
    pub(super) acl_username: Option<ByteString>,
    /// The CONNECT's Protocol Level (`Session::protocol_level`).
    pub(super) protocol_level: u8,
}

/// Creates the session for a new connection (with the claimed state) and
/// queues CONNACK plus any redelivery (marked dirty, not flushed).
pub(super) fn attach(
    ctx: &Ctx,
    link_fd: RawFd,
    client_id: ByteString,
    state: Option<SessionState>,
    attach: &Attach,
) -> (SessionKey, u64) {
    let mut shard = ctx.shard.borrow_mut();
    let conn_id = shard.new_conn_id();
    let session_present = state.is_some() && !attach.clean_start;
    // A stored (persistent) session resumed by a session that ends with
    // its connection.
    let resumed_for_now = state.is_some() && attach.session_expiry == 0;
    let mut session = Session::new(
        client_id,
        attach.session_expiry == 0,
        state.unwrap_or_default(),
    );
    session.claim = attach.claim;
    session.version = attach.version;
    session.protocol_level = attach.protocol_level;
    session.session_expiry = attach.session_expiry;
    session.receive_maximum = attach.receive_maximum;
    session.max_packet_size = attach.max_packet_size;
    if session.read_check {
        session.check_reads(attach.acl_username.clone());
    }
    if attach.version == Version::V5 {
        session.server_aliases = ServerAliases::new(
            attach.topic_alias_maximum,
            shard.config.server_topic_aliases,
        );
    }
    session.link = Some(Link::new(
        conn_id,
        link_fd,
        attach.keep_alive,
        shard.now_ticks(),
    ));
    let connack = accepting_connack(
        attach.version,
        session_present,
        &attach.accepted,
        &shard.config,
    );
    session.queue_frame(&connack);
    if let Some(flows) = session.state.flows.as_mut() {
        // The client is back: a will still waiting for its delay is not
        // sent (§3.1.3.2.2).
        flows.delayed_will = None;
    }
    let limits = shard.limits;
    session.reattach(&limits);
    let key = shard.insert_session(session);
    if resumed_for_now && shard.session_journal.is_some() {
        // An MQTT 5.0 Clean Start 0 with Session Expiry 0 resumes the
        // stored session but ends it with this connection: a crash must not
        // bring it back, so it leaves the journal, and the CONNACK waits for
        // that (as a clean start's waits on the shard that held it).
        let client_id = shard.sessions[key as usize].client_id.clone();
        let lsn = shard.journal_drop(&client_id);
        shard.hold_out(key, lsn);
    }
    // Sent by the caller's flush (`connect`).
    shard.mark_dirty(key);
    (key, conn_id)
}

/// With persistence, journals a persistent session's will as owed from
/// this CONNECT on (or that it has none): after a crash it is published
/// (`shard::persist_will`). A will the ACL refuses is not kept.
fn journal_will(ctx: &Ctx, key: SessionKey, client_id: &str, rare: Option<&Rare>) {
    let mut shard = ctx.shard.borrow_mut();
    if shard.session_journal.is_none() {
        return;
    }
    let will = rare.and_then(|rare| {
        let will = rare.will.clone()?;
        let who = crate::security::acl::Who {
            client_id,
            username: rare.username.as_deref(),
        };
        if !shard.auth.can_publish(who, &will.topic) {
            return None;
        }
        Some((
            will_message(will, rare.will_properties.as_deref(), Instant::now())?,
            rare.will_delay,
        ))
    });
    shard.journal_will(key, will.as_ref().map(|(m, delay)| (m, *delay)), 0);
}

/// The will as the message to publish (§3.1.2.5), with its MQTT 5.0
/// properties, its Message Expiry Interval counted from `sent_at`; None for
/// a will to `$SYS` (clients cannot publish there).
pub(super) fn will_message(
    will: LastWill,
    properties: Option<&Properties>,
    sent_at: Instant,
) -> Option<Message> {
    if topic::is_sys_topic(&will.topic) && will.topic.starts_with("$SYS") {
        limited!(
            PublishDenied,
            debug,
            "will to {} dropped: clients cannot publish to $SYS",
            will.topic
        );
        return None;
    }
    Some(Message {
        topic: will.topic,
        payload: will.message,
        qos: will.qos,
        retain: will.retain,
        retain_stamp: 0,
        properties: properties.and_then(|p| MessageProperties::of(p, sent_at)),
    })
}
