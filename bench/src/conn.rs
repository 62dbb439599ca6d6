//! One subscriber connection of a worker ([`crate::worker`]): where it is
//! in its life and what it keeps between reads.

use crate::stats::SeqTracker;
use crate::tls::TlsConn;
use crate::ws::WsConn;

/// Where one connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not opened yet (or dropped, waiting for the next connect).
    Idle,
    /// TCP connect in progress.
    Connecting,
    /// WebSocket upgrade request sent, waiting for its answer (then
    /// CONNECT goes out).
    WaitUpgrade,
    /// CONNECT sent, SUBSCRIBE too when pipelined (raw mode: hello sent,
    /// waiting for `K`).
    WaitConnAck,
    /// CONNACK in, SUBSCRIBE sent: waiting for SUBACK.
    WaitSubAck,
    /// Subscribed: receiving publishes.
    Ready,
    /// Gave up on it; the reason is in the error counts.
    Failed,
}

/// One subscriber connection.
pub struct Conn {
    pub stream: Option<mio::net::TcpStream>,
    pub state: State,
    /// When the current connect attempt began (connect latency).
    pub started_ns: u64,
    /// When we last wrote (keep-alive).
    pub last_send_ns: u64,
    /// Part of a frame left from the previous read; empty almost always.
    pub partial: Vec<u8>,
    /// Bytes not yet accepted by the socket; empty almost always.
    pub unsent: Vec<u8>,
    pub seq: SeqTracker,
    /// Subscribed at the start of the current phase or during it: must
    /// receive every message of the phase (a connection that breaks later
    /// counts its missing messages as lost).
    pub counted: bool,
    /// When a failed handshake is tried again (`reconnect_ms`); 0: not
    /// waiting for that.
    pub retry_at_ns: u64,
    /// The WebSocket state (`--transport ws`, `wss`), boxed: TCP
    /// connections pay one pointer for it.
    pub ws: Option<Box<WsConn>>,
    /// The TLS state (`--transport wss`), boxed likewise. With it,
    /// `unsent` is plaintext that the next flush encrypts.
    pub tls: Option<Box<TlsConn>>,
}

impl Conn {
    /// A connection not opened yet: no socket, no buffer.
    pub fn new() -> Conn {
        Conn {
            stream: None,
            state: State::Idle,
            started_ns: 0,
            last_send_ns: 0,
            partial: Vec::new(),
            unsent: Vec::new(),
            seq: SeqTracker::default(),
            counted: false,
            retry_at_ns: 0,
            ws: None,
            tls: None,
        }
    }

    /// Forgets what the connection kept between reads (its socket is
    /// gone): buffers, WebSocket and TLS state.
    pub fn clear_transport(&mut self) {
        self.partial = Vec::new();
        self.unsent = Vec::new();
        self.ws = None;
        self.tls = None;
    }
}
