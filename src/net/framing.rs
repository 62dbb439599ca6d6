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
//! TLS is rustls's [`ServerConnection`], fed with [`ServerConnection::read_tls`]
//! and drained with [`ServerConnection::write_tls`]. WebSocket frames
//! (RFC 6455 §5) are read with tungstenite's [`FrameHeader`] parser and
//! written unmasked (§5.1: a server never masks). MQTT over WebSocket is a
//! byte stream of binary frames (MQTT 3.1.1 §6): frame and message
//! boundaries are ignored, a text frame is refused, a ping is answered, a
//! close is echoed and ends the stream.

use std::io::{self, Cursor, Read, Write};

use async_tungstenite::tungstenite::protocol::frame::FrameHeader;
use async_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use bytes::BytesMut;
use rustls::ServerConnection;

/// Largest payload of a WebSocket control frame (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// Plaintext read from rustls per call while unframing TLS (a stack
/// buffer; rustls hands out at most what it holds).
const TLS_READ_CHUNK: usize = 4096;

/// Why the framing refused the peer's bytes (the connection closes).
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    /// rustls refused a record (its alert is queued to send).
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// A WebSocket frame header tungstenite cannot parse.
    #[error("WebSocket frame header: {0}")]
    Header(#[from] async_tungstenite::tungstenite::Error),
    /// A WebSocket frame that breaks RFC 6455 or MQTT §6.
    #[error("WebSocket: {0}")]
    Ws(&'static str),
    /// A WebSocket frame larger than `max_packet_size`.
    #[error("WebSocket frame of {0} bytes is over the limit")]
    FrameTooLarge(u64),
    /// rustls failed to write (cannot happen into a `Vec`).
    #[error("TLS write: {0}")]
    Io(#[from] io::Error),
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
    tls: Option<Box<ServerConnection>>,
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
    /// The framing for a connection: `tls` once its handshake is done,
    /// `ws` with the largest frame it accepts once its upgrade is done.
    pub fn new(
        tls: Option<ServerConnection>,
        ws_max_frame: Option<usize>,
        identity: Option<Box<str>>,
    ) -> Framing {
        Framing {
            tls: tls.map(Box::new),
            ws: ws_max_frame.map(|max| WsFraming {
                max_frame: max as u64,
                ..WsFraming::default()
            }),
            tx: Vec::new(),
            identity,
        }
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
        let Some(tls) = self.tls.as_deref_mut() else {
            let ws = self.ws.as_mut().ok_or(FramingError::Ws("no framing"))?;
            return ws.receive(wire, mqtt, &mut self.tx);
        };
        let mut input = wire;
        let mut closed = false;
        loop {
            // One read at a time, its plaintext taken before the next: rustls
            // refuses more records while its plaintext buffer is full.
            if !input.is_empty() && tls.read_tls(&mut input)? > 0 {
                let state = tls.process_new_packets();
                if let Err(e) = state {
                    tls.write_tls(&mut self.tx)?;
                    return Err(e.into());
                }
            }
            let mut chunk = [0u8; TLS_READ_CHUNK];
            loop {
                match tls.reader().read(&mut chunk) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => match self.ws.as_mut() {
                        Some(ws) => closed |= ws_over_tls(ws, tls, &chunk[..n], mqtt)?,
                        None => mqtt.extend_from_slice(&chunk[..n]),
                    },
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // The peer closed the TCP connection without close_notify.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        closed = true;
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if input.is_empty() || closed {
                break;
            }
        }
        while tls.wants_write() {
            tls.write_tls(&mut self.tx)?;
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
                let closed = ws_over_tls(ws, tls, plaintext, mqtt)?;
                drain_tls(tls, &mut self.tx)?;
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
                tls.writer().write_all(&frame)?;
                drain_tls(tls, &mut self.tx)
            }
            (Some(tls), false) => {
                tls.writer().write_all(mqtt)?;
                drain_tls(tls, &mut self.tx)
            }
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
                let _ = tls.writer().write_all(&frame);
                tls.send_close_notify();
                let _ = drain_tls(tls, &mut self.tx);
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

/// WebSocket over TLS: unframes `plaintext`, the answers encrypted by
/// `tls` (sent with its next records). True when the peer closed.
fn ws_over_tls(
    ws: &mut WsFraming,
    tls: &mut ServerConnection,
    plaintext: &[u8],
    mqtt: &mut BytesMut,
) -> Result<bool, FramingError> {
    let mut answer = Vec::new();
    let closed = ws.receive(plaintext, mqtt, &mut answer)? == Received::Closed;
    if !answer.is_empty() {
        tls.writer().write_all(&answer)?;
    }
    Ok(closed)
}

/// Unmasks (or masks) a WebSocket payload with its 4-byte key (RFC 6455
/// §5.3; tungstenite keeps its own function private).
fn apply_mask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Moves every TLS record rustls has ready into `tx`.
fn drain_tls(tls: &mut ServerConnection, tx: &mut Vec<u8>) -> Result<(), FramingError> {
    while tls.wants_write() {
        tls.write_tls(tx)?;
    }
    Ok(())
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
        Framing::new(None, Some(1024), None)
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

    #[test]
    fn sent_frames_are_unmasked_binary() {
        let mut framing = ws();
        framing.send(b"\xd0\x00").unwrap();
        assert_eq!(framing.tx, b"\x82\x02\xd0\x00");
        framing.close();
        assert_eq!(&framing.tx[4..], b"\x88\x02\x03\xe8");
    }
}
