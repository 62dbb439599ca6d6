//! A session's handle on its connection, as the shard sees it.
//!
//! The shard, the session and the registry need to reach a session's live
//! connection (to write to its socket, to close it, to wake it) without
//! knowing how the connection is served: [`Link`] is that handle, filled in
//! by the connection layer above (rumqttd's router/connection.rs is the same
//! idea). It also carries what a *parked* connection keeps while it has no
//! task ([`Parked`], see `connection::park`), and the shard's wake
//! list through which [`Link::wake`] gives a parked connection its task back
//! without this layer knowing the connection code.

use std::cell::{Cell, RefCell};
use std::os::fd::{OwnedFd, RawFd};
use std::task::Waker;

use bytestring::ByteString;

use crate::net::admission::{ConnectionSlot, IpKey};
use crate::net::framing::Framing;
use crate::net::transport::Transport;
use crate::protocol::Version;
use crate::protocol::v3::LastWill;
use crate::protocol::v5::{Properties, ReasonCode};

/// Index of a session in its shard's slab; also the router's subscriber key
/// (4 bytes, not 8: it is stored once per subscription).
pub type SessionKey = u32;

/// The [`Link::fd`] of a connection whose transport frames its bytes (TLS,
/// WebSocket) on socket `fd`: the descriptor bit-inverted, so negative (a
/// valid descriptor never is). The shard must not write to such a link's
/// socket and leaves every write to the connection task (see
/// `Shard::flush_dirty`); [`Link::socket`] gives the socket back for
/// lookups such as the peer address. No field is added to the link.
pub fn framed_fd(fd: RawFd) -> RawFd {
    !fd
}

/// The keep-alive clock's unit: a tenth of a second, so "1.5 × keep-alive"
/// (§3.1.2.10) is exact for every keep-alive value and a `u32` lasts 13 years.
pub const TICKS_PER_SEC: u32 = 10;

/// Why a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent DISCONNECT (no will, §3.14.4).
    Disconnect,
    /// The client sent DISCONNECT with Reason Code 0x04, Disconnect with
    /// Will Message (MQTT 5.0, §3.14.2.1): the will is published.
    DisconnectWithWill,
    /// The client closed the socket without DISCONNECT.
    PeerClosed,
    /// A socket error.
    Io,
    /// A protocol violation (§4.8; MQTT 5.0: DISCONNECT 0x82).
    ProtocolError,
    /// A malformed packet (MQTT 5.0: DISCONNECT 0x81, §4.13.1); 3.1.1
    /// connections close as for [`CloseReason::ProtocolError`].
    MalformedPacket,
    /// A packet over `max_packet_size` (MQTT 5.0: DISCONNECT 0x95).
    PacketTooLarge,
    /// A PUBLISH to a topic name that is not one (wildcards, too deep:
    /// MQTT 5.0: DISCONNECT 0x90 Topic Name invalid, §3.3.2.1); 3.1.1
    /// connections close as for [`CloseReason::ProtocolError`].
    TopicNameInvalid,
    /// More QoS 1/2 PUBLISHes unacknowledged than the Receive Maximum the
    /// broker announced (MQTT 5.0: DISCONNECT 0x93, §3.3.4).
    ReceiveMaximumExceeded,
    /// A Topic Alias of 0, over the announced maximum, or unknown with an
    /// empty topic (MQTT 5.0: DISCONNECT 0x94, §3.3.2.3.4).
    TopicAliasInvalid,
    /// A QoS 0 PUBLISH whose Payload Format Indicator says UTF-8 and whose
    /// payload is not (MQTT 5.0: DISCONNECT 0x99, §3.3.2.3.2; QoS 1/2 get
    /// PUBACK / PUBREC 0x99 instead and stay connected).
    PayloadFormatInvalid,
    /// No packet within 1.5 × keep-alive (§3.1.2.10).
    KeepAliveTimeout,
    /// A new connection with the same client id took over (§3.1.4).
    TakenOver,
    /// The broker is shutting down.
    Shutdown,
    /// The client did not read while its shard was over its share of
    /// `max_queued_bytes_total` (see `shard::Shard::shed`).
    Shed,
    /// An operator disconnected the client through the admin API.
    AdminDisconnect,
    /// Persistence cannot store what the client's QoS 1/2 PUBLISH needs
    /// (full disk, write error): no acknowledgement is sent for it, so the
    /// client resends after reconnecting (MQTT 5.0: DISCONNECT 0x97 Quota
    /// exceeded).
    StoreUnavailable,
}

impl CloseReason {
    /// True when the will message must be published (§3.1.2.5: any close
    /// that is not a DISCONNECT from the client; not when the broker stops).
    pub fn publishes_will(self) -> bool {
        !matches!(self, CloseReason::Disconnect | CloseReason::Shutdown)
    }

    /// The Reason Code of the DISCONNECT an MQTT 5.0 client is sent before
    /// its connection closes (§3.14.2.1, §4.13); None when the client
    /// ended it, the socket failed, or it is reset (shed).
    pub fn disconnect_reason(self) -> Option<ReasonCode> {
        Some(match self {
            CloseReason::Disconnect
            | CloseReason::DisconnectWithWill
            | CloseReason::PeerClosed
            | CloseReason::Io
            | CloseReason::Shed => return None,
            CloseReason::ProtocolError => ReasonCode::PROTOCOL_ERROR,
            CloseReason::MalformedPacket => ReasonCode::MALFORMED_PACKET,
            CloseReason::PacketTooLarge => ReasonCode::PACKET_TOO_LARGE,
            CloseReason::TopicNameInvalid => ReasonCode::TOPIC_NAME_INVALID,
            CloseReason::ReceiveMaximumExceeded => ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
            CloseReason::TopicAliasInvalid => ReasonCode::TOPIC_ALIAS_INVALID,
            CloseReason::PayloadFormatInvalid => ReasonCode::PAYLOAD_FORMAT_INVALID,
            CloseReason::KeepAliveTimeout => ReasonCode::KEEP_ALIVE_TIMEOUT,
            CloseReason::TakenOver => ReasonCode::SESSION_TAKEN_OVER,
            CloseReason::Shutdown => ReasonCode::SERVER_SHUTTING_DOWN,
            CloseReason::AdminDisconnect => ReasonCode::ADMINISTRATIVE_ACTION,
            CloseReason::StoreUnavailable => ReasonCode::QUOTA_EXCEEDED,
        })
    }

    /// The close reason for an MQTT 5.0 decode error's Reason Code
    /// ([`crate::protocol::v5::DecodeError::reason_code`]).
    pub fn for_reason_code(code: ReasonCode) -> CloseReason {
        match code {
            ReasonCode::MALFORMED_PACKET => CloseReason::MalformedPacket,
            ReasonCode::PACKET_TOO_LARGE => CloseReason::PacketTooLarge,
            ReasonCode::TOPIC_ALIAS_INVALID => CloseReason::TopicAliasInvalid,
            ReasonCode::RECEIVE_MAXIMUM_EXCEEDED => CloseReason::ReceiveMaximumExceeded,
            _ => CloseReason::ProtocolError,
        }
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
    pub waiter: Waiter,
    /// Set when the connection must close (the first reason wins).
    pub close: Option<CloseReason>,
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
    /// Counts the link in [`live_links`] while it exists.
    _counted: LinkCount,
}

/// A zero-sized guard that counts a [`Link`] in this thread's (shard's)
/// [`live_links`] from its creation to its drop: the "clients connected"
/// gauge, kept up to date instead of counted by a walk over the sessions.
/// A link never leaves its shard's thread (it holds a socket and a waker).
#[derive(Debug)]
struct LinkCount;

impl LinkCount {
    /// Counts one more link.
    fn new() -> LinkCount {
        LIVE_LINKS.with(|c| c.set(c.get() + 1));
        LinkCount
    }
}

impl Drop for LinkCount {
    fn drop(&mut self) {
        LIVE_LINKS.with(|c| c.set(c.get().saturating_sub(1)));
    }
}

/// A zero-sized guard that counts a [`Parked`] connection in this thread's
/// [`parked_connections`] from its creation to its drop (resumed or closed).
#[derive(Debug)]
pub struct ParkedCount(());

impl ParkedCount {
    /// Counts one more parked connection.
    pub fn new() -> ParkedCount {
        PARKED.with(|c| c.set(c.get() + 1));
        ParkedCount(())
    }
}

impl Default for ParkedCount {
    fn default() -> Self {
        ParkedCount::new()
    }
}

impl Drop for ParkedCount {
    fn drop(&mut self) {
        PARKED.with(|c| c.set(c.get().saturating_sub(1)));
    }
}

thread_local! {
    /// Links alive on this shard (see [`LinkCount`]).
    static LIVE_LINKS: Cell<u64> = const { Cell::new(0) };
    /// Parked connections on this shard (see [`ParkedCount`]).
    static PARKED: Cell<u64> = const { Cell::new(0) };
}

/// Connections with a link on this shard: its "clients connected".
pub fn live_links() -> u64 {
    LIVE_LINKS.with(Cell::get)
}

/// Connections parked on this shard (`connection::park`).
pub fn parked_connections() -> u64 {
    PARKED.with(Cell::get)
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
            _counted: LinkCount::new(),
        }
    }

    /// The first tick at which the connection has been silent for more
    /// than 1.5 × its keep-alive (§3.1.2.10) and must close; None without a
    /// keep-alive.
    pub fn keep_alive_deadline(&self) -> Option<u32> {
        (self.keep_alive > 0).then(|| {
            let limit = u32::from(self.keep_alive) * TICKS_PER_SEC * 3 / 2;
            self.last_seen.saturating_add(limit).saturating_add(1)
        })
    }

    /// True while the connection is parked (no task; `connection::park`).
    pub fn is_parked(&self) -> bool {
        matches!(self.waiter, Waiter::Parked(_))
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
            Waiter::Parked(parked) => wake_later(self.conn_id, parked),
        }
    }

    /// Remembers the task's waker (cloned only when it changed).
    pub fn set_waker(&mut self, waker: &Waker) {
        if !matches!(&self.waiter, Waiter::Task(w) if w.will_wake(waker)) {
            self.waiter = Waiter::Task(waker.clone());
        }
    }
}

/// Who wakes up when the shard has something for a connection.
#[derive(Debug, Default)]
pub enum Waiter {
    /// The connection's task is running, or will look at the link before it
    /// waits (so nothing needs waking).
    #[default]
    Running,
    /// The connection's task waits.
    Task(Waker),
    /// The connection has no task (`connection::park`).
    Parked(Parked),
}

/// A link with no socket (framed: the shard never writes to it), for unit
/// tests of the session.
#[cfg(test)]
pub fn test_link() -> Link {
    // i32::MIN: framed, on descriptor i32::MAX, which is never open.
    Link::new(1, i32::MIN, 0, 0)
}

/// The rarely needed part of a connection (its will and ACL identity),
/// kept by its task while it runs and in [`Parked`] while it is parked.
#[derive(Debug, Default)]
pub struct Rare {
    /// The will message (§3.1.2.5), if any.
    pub will: Option<LastWill>,
    /// MQTT 5.0 Will Properties besides the delay (§3.1.3.2), forwarded
    /// with the will as a PUBLISH's are; None for 3.1.1 and for none.
    pub will_properties: Option<Box<Properties>>,
    /// MQTT 5.0 Will Delay Interval in seconds (§3.1.3.2.2): the will of a
    /// session that outlives its connection waits this long, and is not
    /// sent if the client is back first (0: at once).
    pub will_delay: u32,
    /// The user name for ACL checks (CONNECT's, or the TLS identity); kept
    /// only when an ACL file is in force.
    pub username: Option<ByteString>,
    /// The client id for the will's ACL check (the session may be gone when
    /// the will is published); kept only with a will and an ACL file.
    pub client_id: Option<ByteString>,
    /// The topics an MQTT 5.0 client set Topic Aliases for on this
    /// connection (§3.3.2.3.4): alias `n` is entry `n - 1`, an empty topic
    /// is an alias not set. At most `max_topic_alias` entries; empty (no
    /// allocation) until the client uses one.
    pub topic_aliases: Vec<ByteString>,
    /// A parked TLS or WebSocket connection's framing state
    /// (`crate::net::framing`): here, not in [`Parked`], so that the many
    /// plain connections pay nothing for it (a parked framed connection
    /// always has a `Rare`). None while the connection runs (its task holds
    /// the framing) and for plain TCP.
    pub framing: Option<Box<Framing>>,
}

impl Rare {
    /// The user name for ACL checks of a connection's packets.
    pub fn username(rare: Option<&Rare>) -> Option<&str> {
        rare.and_then(|r| r.username.as_deref())
    }
}

/// A parked connection: what its task held that the session's link does
/// not already have. 32 bytes, kept inside the [`Link`],
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
    pub listener: Transport,
    /// The protocol the connection speaks.
    pub version: Version,
    /// Its place under `max_connections`.
    pub slot: Option<ConnectionSlot>,
    /// Its will and ACL identity, if any, and a TLS or WebSocket
    /// connection's framing state ([`Rare::framing`]).
    pub rare: Option<Box<Rare>>,
    /// Counts it in [`parked_connections`] while it is parked.
    pub _counted: ParkedCount,
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

/// The connections the shard woke while parked, waiting to be resumed.
#[derive(Default)]
struct WakeList {
    /// Each connection's id and parked state.
    parked: Vec<(u64, Parked)>,
    /// The connection layer's unparker task, while it waits for work.
    waker: Option<Waker>,
}

thread_local! {
    /// This shard's wake list (a shard is a thread, and the callers, deep
    /// in shard code, hold the shard borrowed, so it cannot live there).
    static WAKE_LIST: RefCell<WakeList> = RefCell::new(WakeList::default());
}

/// Has parked connection `conn_id` resumed soon (by the connection layer's unparker), for
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

/// Takes every connection on this shard's wake list and registers `waker`
/// to be woken when the next one arrives (the connection layer's unparker).
pub fn take_woken(waker: &Waker) -> Vec<(u64, Parked)> {
    WAKE_LIST.with(|list| {
        let mut list = list.borrow_mut();
        list.waker = Some(waker.clone());
        std::mem::take(&mut list.parked)
    })
}
