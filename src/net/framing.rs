//! The framing of a TLS or WebSocket connection as plain state, without a
//! socket: bytes received go in, MQTT bytes come out; MQTT bytes go in,
//! bytes to send come out ([`Framing`]).
//!
//! Holding the framing apart from the socket is what lets a TLS or
//! WebSocket connection park like a plain TCP one (`connection::park`):
//! while idle it is its socket, registered with the shard's epoll instance,
//! and this state; no task, no glommio stream, and no buffer of its own
//! (each buffer here is freed when it empties).
//!
//! TLS is rustls's [`UnbufferedServerConnection`]: the TLS bytes received
//! are kept here ([`Tls::rx`], freed once every whole record in it was
//! taken) and what rustls encodes or encrypts goes straight into
//! [`Framing::tx`], so a parked TLS connection holds rustls's keys and state
//! but no buffer (the buffered `ServerConnection` keeps a 4 KiB receive
//! buffer for ever once it has read a record). WebSocket frames
//! (RFC 6455 §5) are read with tungstenite's [`FrameHeader`] parser and
//! written unmasked (§5.1: a server never masks). MQTT over WebSocket is a
//! byte stream of binary frames (MQTT 3.1.1 §6): frame and message
//! boundaries are ignored, a text frame is refused, a ping is answered, a
//! close is echoed and ends the stream.

use std::io::Cursor;

use async_tungstenite::tungstenite::protocol::frame::FrameHeader;
use async_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use bytes::BytesMut;
use rustls::pki_types::CertificateDer;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
    UnbufferedStatus,
};

/// Largest payload of a WebSocket control frame (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// First guess of the room a handshake record or an alert takes in
/// [`Framing::tx`]; rustls says how much it needs when that is short.
const TLS_RECORD_GUESS: usize = 512;

/// Bytes a TLS record adds to its plaintext, at most: the 5-byte header,
/// TLS 1.2's 8-byte explicit nonce or TLS 1.3's content type, and the
/// 16-byte AEAD tag. Only a first guess, as [`TLS_RECORD_GUESS`].
const TLS_RECORD_OVERHEAD: usize = 5 + 8 + 16;

/// Largest plaintext of one TLS record (RFC 8446 §5.1): a longer write is
/// several records, each with its overhead.
const TLS_MAX_FRAGMENT: usize = 16 * 1024;

/// Why the framing refused the peer's bytes (the connection closes).
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    /// rustls refused a record (its alert is queued to send).
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// rustls could not encode a handshake record (cannot happen: the
    /// buffer grows to the size it asks for).
    #[error("TLS encode: {0}")]
    Encode(#[from] EncodeError),
    /// rustls could not encrypt (its sequence numbers ran out).
    #[error("TLS encrypt: {0}")]
    Encrypt(#[from] EncryptError),
    /// Something was to be sent while the TLS handshake is not done.
    #[error("TLS: nothing can be sent before the handshake is done")]
    NotWritable,
    /// TLS 1.3 early (0-RTT) data, which the server configuration never
    /// accepts.
    #[error("TLS: early data refused")]
    EarlyData,
    /// A WebSocket frame header tungstenite cannot parse.
    #[error("WebSocket frame header: {0}")]
    Header(#[from] async_tungstenite::tungstenite::Error),
    /// A WebSocket frame that breaks RFC 6455 or MQTT §6.
    #[error("WebSocket: {0}")]
    Ws(&'static str),
    /// A WebSocket frame larger than `max_packet_size`.
    #[error("WebSocket frame of {0} bytes is over the limit")]
    FrameTooLarge(u64),
    /// The socket failed while the framed bytes were sent
    /// (`connection::live`).
    #[error("send: {0}")]
    Io(#[from] std::io::Error),
}

/// What [`Framing::receive`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// The stream goes on (MQTT bytes, if any, were appended).
    Open,
    /// The peer closed the stream (TLS close_notify, WebSocket close).
    Closed,
}

/// A TLS and/or WebSocket connection's state between its socket and MQTT.
pub struct Framing {
    /// TLS (TLS and WSS listeners): boxed, as rustls's state is ~1 kB.
    tls: Option<Box<Tls>>,
    /// WebSocket (WS and WSS listeners).
    ws: Option<WsFraming>,
    /// Bytes framed for the socket and not sent yet (empty, unallocated,
    /// when nothing waits).
    pub tx: Vec<u8>,
    /// The verified client certificate's subject Common Name, if any.
    pub identity: Option<Box<str>>,
}

impl std::fmt::Debug for Framing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Framing")
            .field("tls", &self.tls.is_some())
            .field("ws", &self.ws)
            .field("tx", &self.tx.len())
            .field("identity", &self.identity)
            .finish()
    }
}

/// What a WebSocket connection remembers between reads.
#[derive(Debug, Default)]
struct WsFraming {
    /// Bytes received that do not make a whole frame yet (empty,
    /// unallocated, between frames).
    partial: Vec<u8>,
    /// A fragmented binary message is in progress (its continuation frames
    /// are MQTT bytes; RFC 6455 §5.4).
    fragmented: bool,
    /// Largest frame payload accepted: `max_packet_size`.
    max_frame: u64,
}

impl Framing {
    /// The framing of a TLS connection, from its first byte: the handshake
    /// runs through [`Framing::receive`] (its records queued in
    /// [`Framing::tx`]) until [`Framing::is_handshaking`] turns false.
    pub fn tls(conn: UnbufferedServerConnection) -> Framing {
        Framing {
            tls: Some(Box::new(Tls {
                conn,
                rx: Vec::new(),
            })),
            ws: None,
            tx: Vec::new(),
            identity: None,
        }
    }

    /// The framing of a plain WebSocket connection once its upgrade is
    /// done, accepting frames of up to `max_frame` bytes.
    pub fn ws(max_frame: usize) -> Framing {
        let mut framing = Framing {
            tls: None,
            ws: None,
            tx: Vec::new(),
            identity: None,
        };
        framing.start_ws(max_frame);
        framing
    }

    /// WebSocket framing from now on (a WSS connection's upgrade is done):
    /// plaintext is WebSocket frames of up to `max_frame` bytes.
    pub fn start_ws(&mut self, max_frame: usize) {
        self.ws = Some(WsFraming {
            max_frame: max_frame as u64,
            ..WsFraming::default()
        });
    }

    /// True while a TLS connection's handshake is not done.
    pub fn is_handshaking(&self) -> bool {
        self.tls
            .as_ref()
            .is_some_and(|tls| tls.conn.is_handshaking())
    }

    /// The certificate a TLS client presented (verified during the
    /// handshake), if any: the first of its chain.
    pub fn peer_certificate(&self) -> Option<&CertificateDer<'static>> {
        self.tls
            .as_ref()
            .and_then(|tls| tls.conn.peer_certificates())
            .and_then(|chain| chain.first())
    }

    /// True for a WebSocket connection.
    pub fn is_ws(&self) -> bool {
        self.ws.is_some()
    }

    /// Unframes `wire` (bytes from the socket, possibly none: then only
    /// what rustls already holds), appends the MQTT bytes to `mqtt` and
    /// queues any answer (TLS records, WebSocket pong or close) in
    /// [`Framing::tx`].
    ///
    /// # Errors
    /// A TLS or WebSocket violation; what the peer must be told (a TLS
    /// alert) is queued in `tx`.
    pub fn receive(&mut self, wire: &[u8], mqtt: &mut BytesMut) -> Result<Received, FramingError> {
        let Framing { tls, ws, tx, .. } = self;
        let Some(tls) = tls.as_deref_mut() else {
            let ws = ws.as_mut().ok_or(FramingError::Ws("no framing"))?;
            return ws.receive(wire, mqtt, tx);
        };
        tls.rx.extend_from_slice(wire);
        // WebSocket answers (pongs, the close echo) are encrypted once
        // rustls has handed out every record received.
        let mut answer = Vec::new();
        let mut closed = tls.process(tx, |plaintext| match ws.as_mut() {
            Some(ws) => Ok(ws.receive(plaintext, mqtt, &mut answer)? == Received::Closed),
            None => {
                mqtt.extend_from_slice(plaintext);
                Ok(false)
            }
        })?;
        if !answer.is_empty() {
            closed |= tls.write(tx, TlsWrite::Data(&answer))?;
        }
        Ok(if closed {
            Received::Closed
        } else {
            Received::Open
        })
    }

    /// Unframes `plaintext`, bytes already out of TLS (or with no TLS), in
    /// the WebSocket layer: those a WSS client sent with its upgrade
    /// request. Without WebSocket they are MQTT bytes.
    ///
    /// # Errors
    /// A WebSocket violation.
    pub fn receive_plaintext(
        &mut self,
        plaintext: &[u8],
        mqtt: &mut BytesMut,
    ) -> Result<Received, FramingError> {
        let closed = match (self.ws.as_mut(), self.tls.as_deref_mut()) {
            (Some(ws), Some(tls)) => {
                let mut answer = Vec::new();
                let closed = ws.receive(plaintext, mqtt, &mut answer)? == Received::Closed;
                if !answer.is_empty() {
                    tls.write(&mut self.tx, TlsWrite::Data(&answer))?;
                }
                closed
            }
            (Some(ws), None) => ws.receive(plaintext, mqtt, &mut self.tx)? == Received::Closed,
            (None, _) => {
                mqtt.extend_from_slice(plaintext);
                false
            }
        };
        Ok(if closed {
            Received::Closed
        } else {
            Received::Open
        })
    }

    /// Frames `mqtt` (one WebSocket message, TLS records) into
    /// [`Framing::tx`].
    ///
    /// # Errors
    /// rustls refusing to encrypt (the connection is closing).
    pub fn send(&mut self, mqtt: &[u8]) -> Result<(), FramingError> {
        match (self.tls.as_deref_mut(), self.ws.is_some()) {
            (Some(tls), true) => {
                let mut frame = Vec::with_capacity(mqtt.len() + 10);
                ws_frame(OpCode::Data(Data::Binary), mqtt, &mut frame)?;
                tls.write(&mut self.tx, TlsWrite::Data(&frame)).map(drop)
            }
            (Some(tls), false) => tls.write(&mut self.tx, TlsWrite::Data(mqtt)).map(drop),
            (None, _) => ws_frame(OpCode::Data(Data::Binary), mqtt, &mut self.tx),
        }
    }

    /// Queues the transport's goodbye (a WebSocket close frame, then TLS
    /// close_notify) in [`Framing::tx`].
    pub fn close(&mut self) {
        let mut frame = Vec::new();
        if self.ws.is_some() {
            // 1000: normal closure (RFC 6455 §7.4.1).
            let _ = ws_frame(
                OpCode::Control(Control::Close),
                &1000u16.to_be_bytes(),
                &mut frame,
            );
        }
        match self.tls.as_deref_mut() {
            Some(tls) => {
                if !frame.is_empty() {
                    let _ = tls.write(&mut self.tx, TlsWrite::Data(&frame));
                }
                let _ = tls.write(&mut self.tx, TlsWrite::CloseNotify);
            }
            None => self.tx.extend_from_slice(&frame),
        }
    }

    /// `n` bytes of [`Framing::tx`] were sent: drops them, and frees the
    /// buffer once empty.
    pub fn sent(&mut self, n: usize) {
        self.tx.drain(..n.min(self.tx.len()));
        if self.tx.is_empty() {
            self.tx = Vec::new();
        }
    }
}

/// Unmasks (or masks) a WebSocket payload with its 4-byte key (RFC 6455
/// §5.3; tungstenite keeps its own function private).
fn apply_mask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Appends one final, unmasked frame of `opcode` carrying `payload`.
fn ws_frame(opcode: OpCode, payload: &[u8], out: &mut Vec<u8>) -> Result<(), FramingError> {
    let header = FrameHeader {
        opcode,
        ..FrameHeader::default()
    };
    header.format(payload.len() as u64, out)?;
    out.extend_from_slice(payload);
    Ok(())
}

/// A TLS connection: rustls's unbuffered state machine and the bytes it has
/// not taken yet.
struct Tls {
    /// rustls's server connection (handshake state, keys, sequence numbers).
    conn: UnbufferedServerConnection,
    /// TLS bytes received that do not make a whole record yet, or that
    /// rustls still holds a handshake message in (empty, unallocated, once
    /// it took them all).
    rx: Vec<u8>,
}

/// What [`Tls::write`] encrypts.
enum TlsWrite<'a> {
    /// Application data.
    Data(&'a [u8]),
    /// The close_notify alert (RFC 8446 §6.1).
    CloseNotify,
}

impl Tls {
    /// Hands every whole record in [`Tls::rx`] to rustls: handshake
    /// records it answers go to `tx`, application data to `plaintext`
    /// (which returns true when the stream above TLS closed). True when
    /// the peer closed (close_notify, or `plaintext` said so).
    ///
    /// # Errors
    /// A record rustls refuses (its alert queued in `tx`), or what
    /// `plaintext` refuses.
    fn process(
        &mut self,
        tx: &mut Vec<u8>,
        mut plaintext: impl FnMut(&[u8]) -> Result<bool, FramingError>,
    ) -> Result<bool, FramingError> {
        let mut closed = false;
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut self.rx);
            let step = match state {
                Ok(ConnectionState::ReadTraffic(mut traffic)) => loop {
                    match traffic.next_record() {
                        Some(Ok(record)) => {
                            discard += record.discard;
                            match plaintext(record.payload) {
                                Ok(ended) => closed |= ended,
                                Err(e) => break Err(e),
                            }
                        }
                        Some(Err(e)) => break Err(e.into()),
                        None => break Ok(true),
                    }
                },
                Ok(ConnectionState::EncodeTlsData(mut encode)) => encode_record(tx, &mut encode)
                    .map(|()| true)
                    .map_err(FramingError::from),
                // What was encoded is in `tx`, sent by the caller in order.
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    Ok(true)
                }
                Ok(ConnectionState::PeerClosed) => {
                    closed = true;
                    Ok(true)
                }
                Ok(ConnectionState::Closed) => {
                    closed = true;
                    Ok(false)
                }
                Ok(ConnectionState::ReadEarlyData(_)) => Err(FramingError::EarlyData),
                // No whole record left (handshake or traffic).
                Ok(_) => Ok(false),
                Err(e) => Err(e.into()),
            };
            self.discard(discard);
            match step {
                Ok(true) => {}
                Ok(false) => return Ok(closed),
                Err(e) => {
                    self.queue_alert(tx);
                    return Err(e);
                }
            }
        }
    }

    /// Encrypts `what` into `tx` (after any handshake record rustls still
    /// has to send). True when rustls found the connection closed.
    ///
    /// # Errors
    /// The handshake is not done, or rustls cannot encrypt.
    fn write(&mut self, tx: &mut Vec<u8>, what: TlsWrite<'_>) -> Result<bool, FramingError> {
        loop {
            let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut self.rx);
            let step = match state {
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    let insufficient = |e: &EncryptError| match e {
                        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
                            Some(*required_size)
                        }
                        _ => None,
                    };
                    let written = match what {
                        TlsWrite::Data(data) => {
                            let records = data.len() / TLS_MAX_FRAGMENT + 1;
                            let guess = data.len() + records * TLS_RECORD_OVERHEAD;
                            append_record(tx, guess, |buf| traffic.encrypt(data, buf), insufficient)
                        }
                        TlsWrite::CloseNotify => append_record(
                            tx,
                            TLS_RECORD_GUESS,
                            |buf| traffic.queue_close_notify(buf),
                            insufficient,
                        ),
                    };
                    written.map(|()| Some(false)).map_err(FramingError::from)
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => encode_record(tx, &mut encode)
                    .map(|()| None)
                    .map_err(FramingError::from),
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    Ok(None)
                }
                Ok(ConnectionState::Closed) => Ok(Some(true)),
                Ok(_) => Err(FramingError::NotWritable),
                Err(e) => Err(e.into()),
            };
            self.discard(discard);
            if let Some(closed) = step? {
                return Ok(closed);
            }
        }
    }

    /// Queues the alert rustls prepared after refusing a record (best
    /// effort: the connection closes either way), and drops what was
    /// received.
    fn queue_alert(&mut self, tx: &mut Vec<u8>) {
        self.rx = Vec::new();
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) =
            self.conn.process_tls_records(&mut []).state
        {
            let _ = encode_record(tx, &mut encode);
        }
    }

    /// Drops the first `n` bytes of [`Tls::rx`] (rustls took them), and
    /// frees it once empty.
    fn discard(&mut self, n: usize) {
        self.rx.drain(..n.min(self.rx.len()));
        if self.rx.is_empty() {
            self.rx = Vec::new();
        }
    }
}

/// Appends the handshake record (or alert) rustls has ready to `tx`.
fn encode_record(
    tx: &mut Vec<u8>,
    encode: &mut EncodeTlsData<'_, ServerConnectionData>,
) -> Result<(), EncodeError> {
    append_record(
        tx,
        TLS_RECORD_GUESS,
        |buf| encode.encode(buf),
        |e| match e {
            EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
                Some(*required_size)
            }
            _ => None,
        },
    )
}

/// Appends to `tx` what `write` puts in a buffer of `size` bytes, growing
/// it to the size rustls asks for (`insufficient` reads it from the error).
fn append_record<E>(
    tx: &mut Vec<u8>,
    mut size: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
    insufficient: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let start = tx.len();
    loop {
        tx.resize(start + size, 0);
        match write(&mut tx[start..]) {
            Ok(n) => {
                tx.truncate(start + n);
                return Ok(());
            }
            Err(e) => {
                tx.truncate(start);
                match insufficient(&e) {
                    Some(needed) if needed > size => size = needed,
                    _ => return Err(e),
                }
            }
        }
    }
}

impl WsFraming {
    /// Unframes `wire`: binary payloads to `mqtt`, answers to `answer`.
    fn receive(
        &mut self,
        wire: &[u8],
        mqtt: &mut BytesMut,
        answer: &mut Vec<u8>,
    ) -> Result<Received, FramingError> {
        let mut partial = std::mem::take(&mut self.partial);
        partial.extend_from_slice(wire);
        let mut consumed = 0;
        let result = loop {
            match self.frame(&mut partial[consumed..], mqtt, answer) {
                Ok(Some((used, received))) => {
                    consumed += used;
                    if received == Received::Closed {
                        break Ok(Received::Closed);
                    }
                }
                Ok(None) => break Ok(Received::Open),
                Err(e) => break Err(e),
            }
        };
        partial.drain(..consumed);
        if !partial.is_empty() {
            self.partial = partial;
        }
        result
    }

    /// Handles the first whole frame of `bytes`: how many bytes it took and
    /// whether the stream goes on; None when no whole frame is there yet.
    fn frame(
        &mut self,
        bytes: &mut [u8],
        mqtt: &mut BytesMut,
        answer: &mut Vec<u8>,
    ) -> Result<Option<(usize, Received)>, FramingError> {
        let mut cursor = Cursor::new(&*bytes);
        let Some((header, len)) = FrameHeader::parse(&mut cursor)? else {
            return Ok(None);
        };
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(FramingError::Ws("reserved bits set without an extension"));
        }
        let Some(mask) = header.mask else {
            return Err(FramingError::Ws(
                "unmasked frame from a client (RFC 6455 §5.1)",
            ));
        };
        let control = matches!(header.opcode, OpCode::Control(_));
        if control && (!header.is_final || len > MAX_CONTROL_PAYLOAD) {
            return Err(FramingError::Ws("fragmented or oversized control frame"));
        }
        if len > self.max_frame {
            return Err(FramingError::FrameTooLarge(len));
        }
        let start = cursor.position() as usize;
        // `len` is at most `max_frame`, a usize.
        let end = start + len as usize;
        if bytes.len() < end {
            return Ok(None);
        }
        let payload = &mut bytes[start..end];
        apply_mask(payload, mask);
        match header.opcode {
            OpCode::Data(Data::Binary) if !self.fragmented => {
                self.fragmented = !header.is_final;
                mqtt.extend_from_slice(payload);
            }
            OpCode::Data(Data::Continue) if self.fragmented => {
                self.fragmented = !header.is_final;
                mqtt.extend_from_slice(payload);
            }
            OpCode::Data(Data::Text) => {
                return Err(FramingError::Ws(
                    "text frame: MQTT over WebSocket is binary only",
                ));
            }
            OpCode::Data(_) => return Err(FramingError::Ws("data frame out of sequence")),
            OpCode::Control(Control::Ping) => {
                ws_frame(OpCode::Control(Control::Pong), payload, answer)?;
            }
            OpCode::Control(Control::Pong) => {}
            OpCode::Control(Control::Close) => {
                // Echo the status code (RFC 6455 §5.5.1), not the reason.
                let code = &payload[..payload.len().min(2)];
                ws_frame(OpCode::Control(Control::Close), code, answer)?;
                return Ok(Some((end, Received::Closed)));
            }
            OpCode::Control(Control::Reserved(_)) => {
                return Err(FramingError::Ws("reserved opcode"));
            }
        }
        Ok(Some((end, Received::Open)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A client frame (masked, as RFC 6455 §5.1 requires).
    fn client_frame(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let header = FrameHeader {
            is_final: fin,
            opcode,
            mask: Some(mask),
            ..FrameHeader::default()
        };
        let mut out = Vec::new();
        header.format(payload.len() as u64, &mut out).unwrap();
        let mut masked = payload.to_vec();
        apply_mask(&mut masked, mask);
        out.extend_from_slice(&masked);
        out
    }

    fn ws() -> Framing {
        Framing::ws(1024)
    }

    #[test]
    fn binary_frames_are_a_byte_stream_across_reads() {
        let mut framing = ws();
        let mut wire = client_frame(OpCode::Data(Data::Binary), false, b"\x30\x05ab");
        wire.extend(client_frame(OpCode::Data(Data::Continue), true, b"cde"));
        let mut mqtt = BytesMut::new();
        // Split inside the second frame's header: the rest waits.
        let (first, second) = wire.split_at(12);
        assert_eq!(framing.receive(first, &mut mqtt).unwrap(), Received::Open);
        assert_eq!(&mqtt[..], b"\x30\x05ab");
        assert!(!framing.ws.as_ref().unwrap().partial.is_empty());
        assert_eq!(framing.receive(second, &mut mqtt).unwrap(), Received::Open);
        assert_eq!(&mqtt[..], b"\x30\x05abcde");
        let ws = framing.ws.as_ref().unwrap();
        assert!(ws.partial.is_empty() && ws.partial.capacity() == 0);
        assert!(!ws.fragmented);
    }

    #[test]
    fn pings_are_answered_and_close_is_echoed() {
        let mut framing = ws();
        let mut mqtt = BytesMut::new();
        let ping = client_frame(OpCode::Control(Control::Ping), true, b"hi");
        assert_eq!(framing.receive(&ping, &mut mqtt).unwrap(), Received::Open);
        assert_eq!(framing.tx, b"\x8a\x02hi");
        framing.sent(framing.tx.len());
        assert_eq!(framing.tx.capacity(), 0);
        let close = client_frame(OpCode::Control(Control::Close), true, b"\x03\xe8bye");
        assert_eq!(
            framing.receive(&close, &mut mqtt).unwrap(),
            Received::Closed
        );
        assert_eq!(framing.tx, b"\x88\x02\x03\xe8");
        assert!(mqtt.is_empty());
    }

    #[test]
    fn bad_frames_are_refused() {
        let refused = |wire: Vec<u8>| ws().receive(&wire, &mut BytesMut::new()).is_err();
        assert!(refused(client_frame(OpCode::Data(Data::Text), true, b"x")));
        assert!(refused(client_frame(
            OpCode::Data(Data::Continue),
            true,
            b"x"
        )));
        assert!(refused(client_frame(
            OpCode::Data(Data::Binary),
            true,
            &[0; 1025]
        )));
        assert!(refused(client_frame(
            OpCode::Control(Control::Ping),
            false,
            b""
        )));
        assert!(refused(client_frame(
            OpCode::Control(Control::Reserved(0xb)),
            true,
            b""
        )));
        // Unmasked (a server's frame) from a client.
        let mut unmasked = Vec::new();
        ws_frame(OpCode::Data(Data::Binary), b"x", &mut unmasked).unwrap();
        assert!(refused(unmasked));
    }

    /// A server configuration with a fresh self-signed certificate for
    /// localhost, TLS `version` only, and a client configuration trusting it.
    fn tls_configs(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], der)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// A TLS framing and a rustls client talking to it in memory, the
    /// handshake done, with `version` only.
    fn tls_pair(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (Framing, rustls::ClientConnection) {
        let (server, client) = tls_configs(version);
        let mut client =
            rustls::ClientConnection::new(client, "localhost".try_into().unwrap()).unwrap();
        let mut framing = Framing::tls(UnbufferedServerConnection::new(server).unwrap());
        let mut mqtt = BytesMut::new();
        for _ in 0..10 {
            if !framing.is_handshaking() && !client.is_handshaking() {
                break;
            }
            let wire = from_client(&mut client);
            assert_eq!(framing.receive(&wire, &mut mqtt).unwrap(), Received::Open);
            to_client(&mut framing, &mut client);
        }
        assert!(!framing.is_handshaking() && !client.is_handshaking());
        assert!(mqtt.is_empty());
        (framing, client)
    }

    /// The TLS records the client has to send.
    fn from_client(client: &mut rustls::ClientConnection) -> Vec<u8> {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        wire
    }

    /// Hands the framing's records to the client; returns the plaintext it
    /// got and whether it saw close_notify.
    fn to_client(framing: &mut Framing, client: &mut rustls::ClientConnection) -> (Vec<u8>, bool) {
        use std::io::Read;
        let tx = std::mem::take(&mut framing.tx);
        let mut records = &tx[..];
        let mut plaintext = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            // The client takes records while its plaintext buffer has room.
            if !records.is_empty() {
                client.read_tls(&mut records).unwrap();
                client.process_new_packets().unwrap();
            }
            loop {
                match client.reader().read(&mut chunk) {
                    Ok(0) => return (plaintext, true),
                    Ok(n) => plaintext.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
            if records.is_empty() {
                return (plaintext, false);
            }
        }
    }

    #[test]
    fn tls_records_carry_mqtt_both_ways_and_leave_no_buffer() {
        use std::io::Write;
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (mut framing, mut client) = tls_pair(version);
            let connect = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00";
            client.writer().write_all(connect).unwrap();
            let wire = from_client(&mut client);
            // A record split across reads: the first part waits in `rx`.
            let (first, second) = wire.split_at(wire.len() / 2);
            let mut mqtt = BytesMut::new();
            assert_eq!(framing.receive(first, &mut mqtt).unwrap(), Received::Open);
            assert!(mqtt.is_empty());
            assert_eq!(framing.receive(second, &mut mqtt).unwrap(), Received::Open);
            assert_eq!(&mqtt[..], connect);
            // Every whole record taken: nothing is held for the idle time.
            let rx = &framing.tls.as_ref().unwrap().rx;
            assert_eq!(rx.capacity(), 0, "{version:?}");

            framing.send(b"\x20\x02\x00\x00").unwrap();
            assert_eq!(
                to_client(&mut framing, &mut client),
                (b"\x20\x02\x00\x00".to_vec(), false)
            );
            // A write larger than one record is several records.
            let large = vec![7u8; 40_000];
            framing.send(&large).unwrap();
            assert_eq!(to_client(&mut framing, &mut client), (large, false));
            framing.close();
            assert_eq!(to_client(&mut framing, &mut client), (Vec::new(), true));
        }
    }

    #[test]
    fn a_tls_close_notify_closes_the_stream() {
        let (mut framing, mut client) = tls_pair(&rustls::version::TLS13);
        client.send_close_notify();
        let wire = from_client(&mut client);
        let mut mqtt = BytesMut::new();
        assert_eq!(framing.receive(&wire, &mut mqtt).unwrap(), Received::Closed);
    }

    #[test]
    fn websocket_over_tls_is_unframed_and_its_pings_answered() {
        use std::io::Write;
        let (mut framing, mut client) = tls_pair(&rustls::version::TLS13);
        framing.start_ws(1024);
        let mut frames = client_frame(OpCode::Data(Data::Binary), true, b"\xc0\x00");
        frames.extend(client_frame(OpCode::Control(Control::Ping), true, b"hi"));
        client.writer().write_all(&frames).unwrap();
        let wire = from_client(&mut client);
        let mut mqtt = BytesMut::new();
        assert_eq!(framing.receive(&wire, &mut mqtt).unwrap(), Received::Open);
        assert_eq!(&mqtt[..], b"\xc0\x00");
        assert_eq!(
            to_client(&mut framing, &mut client),
            (b"\x8a\x02hi".to_vec(), false)
        );
    }

    #[test]
    fn bytes_that_are_not_tls_are_refused_with_an_alert() {
        let (server, _) = tls_configs(&rustls::version::TLS13);
        let conn = UnbufferedServerConnection::new(server).unwrap();
        let mut framing = Framing::tls(conn);
        let refused = framing.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &mut BytesMut::new());
        assert!(matches!(refused, Err(FramingError::Tls(_))), "{refused:?}");
        // An alert record (content type 21) is queued for the peer.
        assert_eq!(framing.tx.first(), Some(&0x15), "{:?}", framing.tx);
    }

    #[test]
    fn sent_frames_are_unmasked_binary() {
        let mut framing = ws();
        framing.send(b"\xd0\x00").unwrap();
        assert_eq!(framing.tx, b"\x82\x02\xd0\x00");
        framing.close();
        assert_eq!(&framing.tx[4..], b"\x88\x02\x03\xe8");
    }
}
