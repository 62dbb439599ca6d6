//! The subscribers' WebSocket transport (`--transport ws`): MQTT over
//! WebSocket as a browser's MQTT.js speaks it (MQTT 3.1.1 §6), on the
//! worker's own non-blocking sockets.
//!
//! tungstenite does the RFC 6455 parts: the upgrade's key and its expected
//! answer ([`generate_key`], [`derive_accept_key`]), frame headers
//! ([`FrameHeader::parse`]) and masked client frames ([`Frame::format`]);
//! httparse reads the 101 answer. What is left here is the bookkeeping a
//! worker needs per connection: the key until the answer came, and the part
//! of a frame left from the previous read ([`WsConn`]). Every MQTT packet a
//! subscriber sends goes in one binary frame; the broker's frames are a
//! byte stream of MQTT (a packet may span frames, a frame may hold many).

use bytes::Bytes;
use std::io::Cursor;
use tungstenite::handshake::client::generate_key;
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::{Frame, FrameHeader};

/// The request path of the upgrade: what MQTT.js, FlashMQ and fanmq use.
pub const PATH: &str = "/mqtt";

/// Largest upgrade answer accepted (its headers): brokers send a few
/// hundred bytes.
const MAX_ANSWER: usize = 8 * 1024;

/// Headers parsed in the upgrade answer (httparse needs a fixed array).
const MAX_HEADERS: usize = 32;

/// Largest frame accepted from the broker: larger than any burst a broker
/// coalesces into one frame, and a bound on what a bad length can make a
/// worker hold.
const MAX_FRAME: u64 = 64 * 1024 * 1024;

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("WebSocket upgrade answer: {0}")]
    Http(#[from] httparse::Error),
    #[error("WebSocket upgrade answer: {0}")]
    Upgrade(String),
    #[error("WebSocket frame: {0}")]
    Frame(#[from] tungstenite::Error),
    #[error("WebSocket frame: {0}")]
    Protocol(&'static str),
    #[error("WebSocket closed by the broker")]
    Closed,
}

/// One WebSocket connection's state between reads.
#[derive(Debug, Default)]
pub struct WsConn {
    /// `Sec-WebSocket-Key` of the upgrade request until the answer came
    /// (then empty).
    key: String,
    /// Bytes read that do not make a whole upgrade answer or frame yet
    /// (empty, unallocated, almost always).
    partial: Vec<u8>,
    /// Masks of the frames sent so far: a different masking key per frame
    /// (RFC 6455 §5.3), from a xorshift of this counter (a load generator
    /// needs no unpredictable keys, only valid frames).
    masks: u32,
}

impl WsConn {
    /// A connection whose upgrade request to `host` is appended to `out`.
    pub fn start(host: &str, out: &mut Vec<u8>) -> WsConn {
        let key = generate_key();
        out.extend_from_slice(
            format!(
                "GET {PATH} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
            )
            .as_bytes(),
        );
        WsConn {
            key,
            partial: Vec::new(),
            masks: 0,
        }
    }

    /// True while the upgrade's answer has not come.
    pub fn upgrading(&self) -> bool {
        !self.key.is_empty()
    }

    /// Takes `wire`, bytes read from the socket: the upgrade's answer
    /// first (checked: 101, the accept key, subprotocol `mqtt`), then
    /// frames, whose binary payloads are appended to `mqtt`. A ping is
    /// answered in `out`.
    ///
    /// # Errors
    /// A refused or malformed upgrade, a bad frame, or the broker's close.
    pub fn receive(
        &mut self,
        wire: &[u8],
        mqtt: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<(), WsError> {
        let mut data = std::mem::take(&mut self.partial);
        data.extend_from_slice(wire);
        let mut at = 0;
        if self.upgrading() {
            match self.answer(&data)? {
                Some(used) => at = used,
                None => {
                    self.partial = data;
                    return Ok(());
                }
            }
        }
        while let Some(used) = self.frame(&data[at..], mqtt, out)? {
            at += used;
        }
        data.drain(..at);
        if !data.is_empty() {
            self.partial = data;
        }
        Ok(())
    }

    /// Appends `packet` to `out` as one masked binary frame.
    pub fn send(&mut self, packet: &[u8], out: &mut Vec<u8>) {
        self.send_frame(OpCode::Data(Data::Binary), packet, out);
    }

    /// Appends one masked final frame of `opcode`.
    fn send_frame(&mut self, opcode: OpCode, payload: &[u8], out: &mut Vec<u8>) {
        self.masks = self.masks.wrapping_add(1);
        let header = FrameHeader {
            opcode,
            mask: Some(xorshift(self.masks).to_be_bytes()),
            ..FrameHeader::default()
        };
        // Formatting into a Vec cannot fail.
        let _ = Frame::from_payload(header, Bytes::copy_from_slice(payload)).format(out);
    }

    /// Checks the upgrade answer at the start of `data`: its length once
    /// whole, None before.
    fn answer(&mut self, data: &[u8]) -> Result<Option<usize>, WsError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let len = match response.parse(data)? {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial if data.len() < MAX_ANSWER => return Ok(None),
            httparse::Status::Partial => return Err(WsError::Upgrade("over 8 KiB".into())),
        };
        if response.code != Some(101) {
            return Err(WsError::Upgrade(format!(
                "status {:?} {:?}",
                response.code, response.reason
            )));
        }
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
        };
        if header("sec-websocket-accept") != Some(derive_accept_key(self.key.as_bytes())) {
            return Err(WsError::Upgrade("wrong Sec-WebSocket-Accept".into()));
        }
        if header("sec-websocket-protocol").as_deref() != Some("mqtt") {
            return Err(WsError::Upgrade("subprotocol mqtt not chosen".into()));
        }
        self.key = String::new();
        Ok(Some(len))
    }

    /// Handles the first whole frame of `bytes`: how many bytes it took;
    /// None when no whole frame is there yet.
    fn frame(
        &mut self,
        bytes: &[u8],
        mqtt: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<Option<usize>, WsError> {
        let mut cursor = Cursor::new(bytes);
        let Some((header, len)) = FrameHeader::parse(&mut cursor)? else {
            return Ok(None);
        };
        if header.mask.is_some() {
            return Err(WsError::Protocol(
                "masked frame from the server (RFC 6455 §5.1)",
            ));
        }
        if len > MAX_FRAME {
            return Err(WsError::Protocol("frame over 64 MiB"));
        }
        let start = cursor.position() as usize;
        // `len` is at most MAX_FRAME, which fits a usize.
        let end = start + len as usize;
        let Some(payload) = bytes.get(start..end) else {
            return Ok(None);
        };
        match header.opcode {
            OpCode::Data(Data::Binary | Data::Continue) => mqtt.extend_from_slice(payload),
            OpCode::Control(Control::Ping) => {
                self.send_frame(OpCode::Control(Control::Pong), payload, out)
            }
            OpCode::Control(Control::Pong) => {}
            OpCode::Control(Control::Close) => return Err(WsError::Closed),
            _ => return Err(WsError::Protocol("not a binary frame")),
        }
        Ok(Some(end))
    }
}

/// One xorshift32 step of `x` (never 0 for `x` ≠ 0).
fn xorshift(mut x: u32) -> u32 {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The broker's side of the upgrade: tungstenite's accept key for the
    /// request in `request`.
    fn answer_to(request: &[u8], protocol: &str) -> Vec<u8> {
        let text = String::from_utf8_lossy(request);
        let key = text
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap();
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        )
        .into_bytes()
    }

    /// A server frame (unmasked).
    fn server_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let header = FrameHeader {
            opcode,
            ..FrameHeader::default()
        };
        Frame::from_payload(header, Bytes::copy_from_slice(payload))
            .format(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn the_upgrade_then_frames_are_an_mqtt_byte_stream() {
        let mut request = Vec::new();
        let mut ws = WsConn::start("127.0.0.1:8083", &mut request);
        let text = String::from_utf8(request.clone()).unwrap();
        assert!(text.starts_with("GET /mqtt HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("Sec-WebSocket-Protocol: mqtt\r\n"));
        assert!(ws.upgrading());
        // The answer, then a CONNACK split over two frames, then a SUBACK
        // and a PUBLISH in one frame; delivered in reads cut anywhere.
        let mut wire = answer_to(&request, "mqtt");
        wire.extend(server_frame(OpCode::Data(Data::Binary), b"\x20\x02"));
        wire.extend(server_frame(OpCode::Data(Data::Continue), b"\x00\x00"));
        wire.extend(server_frame(
            OpCode::Data(Data::Binary),
            b"\x90\x03\x00\x01\x00\x30\x03\x00\x01t",
        ));
        let (mut mqtt, mut out) = (Vec::new(), Vec::new());
        for piece in wire.chunks(7) {
            ws.receive(piece, &mut mqtt, &mut out).unwrap();
        }
        assert!(!ws.upgrading());
        assert_eq!(
            mqtt,
            b"\x20\x02\x00\x00\x90\x03\x00\x01\x00\x30\x03\x00\x01t"
        );
        assert!(out.is_empty() && ws.partial.capacity() == 0);
    }

    #[test]
    fn sent_packets_are_masked_binary_frames_and_pings_answered() {
        let mut request = Vec::new();
        let mut ws = WsConn::start("h", &mut request);
        let (mut mqtt, mut out) = (Vec::new(), Vec::new());
        ws.receive(&answer_to(&request, "mqtt"), &mut mqtt, &mut out)
            .unwrap();
        ws.send(b"\xc0\x00", &mut out);
        ws.send(b"\xc0\x00", &mut out);
        let first = FrameHeader::parse(&mut Cursor::new(&out)).unwrap().unwrap();
        assert_eq!(first.0.opcode, OpCode::Data(Data::Binary));
        let mask = first.0.mask.expect("a client masks (RFC 6455 §5.1)");
        assert_eq!(first.1, 2);
        assert_eq!([out[6] ^ mask[0], out[7] ^ mask[1]], [0xc0, 0x00]);
        let second = FrameHeader::parse(&mut Cursor::new(&out[8..]))
            .unwrap()
            .unwrap();
        assert_ne!(second.0.mask, Some(mask), "a fresh key per frame");
        out.clear();
        ws.receive(
            &server_frame(OpCode::Control(Control::Ping), b"hi"),
            &mut mqtt,
            &mut out,
        )
        .unwrap();
        let pong = FrameHeader::parse(&mut Cursor::new(&out)).unwrap().unwrap();
        assert_eq!(pong.0.opcode, OpCode::Control(Control::Pong));
        assert!(mqtt.is_empty());
    }

    #[test]
    fn bad_answers_and_frames_are_errors() {
        let upgraded = |answer: &[u8]| {
            let mut request = Vec::new();
            let mut ws = WsConn::start("h", &mut request);
            let answer = if answer.is_empty() {
                answer_to(&request, "mqtt")
            } else {
                answer.to_vec()
            };
            ws.receive(&answer, &mut Vec::new(), &mut Vec::new())
                .map(|()| ws)
        };
        assert!(upgraded(b"HTTP/1.1 400 Bad Request\r\n\r\n").is_err());
        let wrong_key = b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: x\r\n\
            Sec-WebSocket-Protocol: mqtt\r\n\r\n";
        assert!(upgraded(wrong_key).is_err());
        let mut request = Vec::new();
        let mut ws = WsConn::start("h", &mut request);
        let no_protocol = answer_to(&request, "chat");
        assert!(
            ws.receive(&no_protocol, &mut Vec::new(), &mut Vec::new())
                .is_err()
        );
        for frame in [
            server_frame(OpCode::Data(Data::Text), b"x"),
            server_frame(OpCode::Control(Control::Close), b"\x03\xe8"),
        ] {
            let mut ws = upgraded(b"").unwrap();
            assert!(
                ws.receive(&frame, &mut Vec::new(), &mut Vec::new())
                    .is_err()
            );
        }
        // A masked frame (a client's) from the server.
        let mut ws = upgraded(b"").unwrap();
        let mut masked = Vec::new();
        ws.send(b"x", &mut masked);
        assert!(
            ws.receive(&masked, &mut Vec::new(), &mut Vec::new())
                .is_err()
        );
    }
}
