//! MQTT 3.1.1 (and 3.1) server-side codec: bytes on the wire to [`Packet`]s and
//! back.
//!
//! # Why fanmq owns its codec
//!
//! mqttbytes 0.6 refuses protocol name `MQIsdp` (MQTT 3.1, level 3), which we must
//! accept; it does not check the fixed header's reserved flag bits, does not refuse
//! U+0000 in strings, and allocates a `String` per topic. This module does all the
//! wire-format checks MQTT 3.1.1 requires of a server, in one pass, without a
//! validation layer in front of someone else's decoder.
//!
//! # Direction
//!
//! A server only *decodes* what clients send (CONNECT, PUBLISH, PUBACK, PUBREC,
//! PUBREL, PUBCOMP, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT) and only *encodes*
//! what servers send (CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK,
//! UNSUBACK, PINGRESP). A packet type a server must never receive is an error.
//!
//! # What is checked here, and what is not
//!
//! This module checks the *wire format*: framing, reserved bits, lengths, UTF-8,
//! packet identifiers, protocol name and level. It does **not** check the meaning
//! of topics: the caller must run [`crate::protocol::topic::validate_topic_name`] on
//! [`Publish::topic`] and [`LastWill::topic`], and
//! [`crate::protocol::topic::validate_topic_filter`] on each SUBSCRIBE / UNSUBSCRIBE filter
//! (a bad SUBSCRIBE filter gets return code [`SUBACK_FAILURE`], not a closed
//! connection, so that decision belongs to the session). Session-level rules (the
//! first packet must be CONNECT, a second CONNECT is a violation, an empty client
//! id needs CleanSession) belong to the session layer too.
//!
//! # Remaining length encodings that are not minimal
//!
//! MQTT 3.1.1 §2.2.3 describes the variable length encoding but, unlike MQTT 5
//! (§1.5.5), does not require the minimum number of bytes. The decoder therefore
//! accepts a non-minimal encoding (`0x80 0x00` for 0) as long as it fits in four
//! bytes; the encoder always writes the minimal form. This cannot be abused: the
//! four-byte bound and `max_packet_size` still apply.
//!
//! # Memory
//!
//! Decoded topics, strings and payloads are *copied* out of the read buffer into
//! fresh `Bytes` / `ByteString` values (one allocation each) rather than sliced
//! with `split_to().freeze()`. A slice would share the read buffer's allocation:
//! a 10-byte payload queued for a slow subscriber would pin the whole 64 KiB read
//! buffer it arrived in, for as long as it sits in any subscriber's queue. Copying
//! once on the way in costs one small allocation and keeps memory proportional to
//! what is actually queued.
//!
//! # Errors leave the buffer untouched
//!
//! On `Err`, nothing is consumed from the buffer: MQTT says the connection must be
//! closed on any of these errors, so there is nothing to resynchronise.

mod decode;
mod encode;

pub use decode::*;
pub use encode::*;

use bytes::Bytes;
use bytestring::ByteString;
use thiserror::Error;

/// Packet Identifier (§2.3.1): names one QoS 1/2 exchange or one SUBSCRIBE /
/// UNSUBSCRIBE. Non-zero where the spec requires one; `0` in a QoS 0 [`Publish`].
pub type PacketId = u16;

/// Largest value the Remaining Length field can carry (§2.2.3): four bytes of seven
/// value bits each, `0xFF 0xFF 0xFF 0x7F`.
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Most bytes the Remaining Length field may take (§2.2.3). A fifth byte (the
/// fourth still has its continuation bit set) is a malformed packet.
pub const MAX_REMAINING_LENGTH_BYTES: usize = 4;

/// Largest fixed header: the first byte plus a four-byte Remaining Length. Lets a
/// caller size a buffer for a header it is about to write.
pub const MAX_FIXED_HEADER_LEN: usize = 1 + MAX_REMAINING_LENGTH_BYTES;

/// Largest UTF-8 string or binary field (§1.5.3): its length is a 16-bit prefix.
pub const MAX_STRING_LEN: usize = 65_535;

/// Protocol Name of MQTT 3.1.1 (§3.1.2.1), sent with level [`PROTOCOL_LEVEL_V311`].
pub const PROTOCOL_NAME_V311: &[u8] = b"MQTT";

/// Protocol Level of MQTT 3.1.1 (§3.1.2.2).
pub const PROTOCOL_LEVEL_V311: u8 = 4;

/// Protocol Name of MQTT 3.1 (IBM's "MQ Integrated SCADA Device Protocol"), still
/// sent by old clients with level [`PROTOCOL_LEVEL_V31`].
pub const PROTOCOL_NAME_V31: &[u8] = b"MQIsdp";

/// Protocol Level of MQTT 3.1.
pub const PROTOCOL_LEVEL_V31: u8 = 3;

/// CONNACK return code (§3.2.2.3): connection accepted.
pub const CONNACK_ACCEPTED: u8 = 0x00;

/// CONNACK return code: the server does not support the requested protocol level.
/// The answer to [`DecodeError::UnsupportedProtocolLevel`].
pub const CONNACK_UNACCEPTABLE_PROTOCOL_VERSION: u8 = 0x01;

/// CONNACK return code: the client identifier is well-formed UTF-8 but not allowed
/// (e.g. empty with CleanSession 0, §3.1.3-8).
pub const CONNACK_IDENTIFIER_REJECTED: u8 = 0x02;

/// CONNACK return code: the server is unavailable (e.g. out of connection slots).
pub const CONNACK_SERVER_UNAVAILABLE: u8 = 0x03;

/// CONNACK return code: the client is not authorized to connect.
pub const CONNACK_NOT_AUTHORIZED: u8 = 0x05;

/// SUBACK return code (§3.9.3) refusing one topic filter; success codes are the
/// granted QoS (0, 1 or 2).
pub const SUBACK_FAILURE: u8 = 0x80;

/// Control packet type CONNECT (§2.2.1), client to server.
const CONNECT: u8 = 1;
/// Control packet type CONNACK, server to client: never decoded.
const CONNACK: u8 = 2;
/// Control packet type PUBLISH, both directions.
const PUBLISH: u8 = 3;
/// Control packet type PUBACK, both directions.
const PUBACK: u8 = 4;
/// Control packet type PUBREC, both directions.
const PUBREC: u8 = 5;
/// Control packet type PUBREL, both directions.
const PUBREL: u8 = 6;
/// Control packet type PUBCOMP, both directions.
const PUBCOMP: u8 = 7;
/// Control packet type SUBSCRIBE, client to server.
const SUBSCRIBE: u8 = 8;
/// Control packet type SUBACK, server to client: never decoded.
const SUBACK: u8 = 9;
/// Control packet type UNSUBSCRIBE, client to server.
const UNSUBSCRIBE: u8 = 10;
/// Control packet type UNSUBACK, server to client: never decoded.
const UNSUBACK: u8 = 11;
/// Control packet type PINGREQ, client to server.
const PINGREQ: u8 = 12;
/// A whole PINGREQ (§3.12): all an idle client's socket holds when it only
/// keeps its connection alive (the same bytes in MQTT 5.0, §3.12).
pub const PINGREQ_BYTES: [u8; 2] = [PINGREQ << 4, 0];
/// Control packet type PINGRESP, server to client: never decoded.
const PINGRESP: u8 = 13;
/// Control packet type DISCONNECT, client to server.
const DISCONNECT: u8 = 14;

/// Fixed header flags that PUBREL, SUBSCRIBE and UNSUBSCRIBE must carry (§2.2.2).
const FLAGS_0010: u8 = 0b0010;

/// PUBLISH fixed header flag: DUP, a re-delivery (§3.3.1.1).
const PUBLISH_DUP: u8 = 0b1000;
/// PUBLISH fixed header flag: RETAIN (§3.3.1.3).
const PUBLISH_RETAIN: u8 = 0b0001;
/// Shift of the two QoS bits in the PUBLISH fixed header flags (§3.3.1.2).
const PUBLISH_QOS_SHIFT: u8 = 1;

/// Connect flag bit 0: reserved, must be 0 in 3.1.1 (§3.1.2.3).
const CONNECT_RESERVED: u8 = 0b0000_0001;
/// Connect flag: CleanSession (§3.1.2.4).
const CONNECT_CLEAN_SESSION: u8 = 0b0000_0010;
/// Connect flag: Will Flag (§3.1.2.5).
const CONNECT_WILL: u8 = 0b0000_0100;
/// Shift of the two Will QoS bits in the connect flags (§3.1.2.6).
const CONNECT_WILL_QOS_SHIFT: u8 = 3;
/// Connect flag: Will Retain (§3.1.2.7).
const CONNECT_WILL_RETAIN: u8 = 0b0010_0000;
/// Connect flag: Password Flag (§3.1.2.9).
const CONNECT_PASSWORD: u8 = 0b0100_0000;
/// Connect flag: User Name Flag (§3.1.2.8).
const CONNECT_USERNAME: u8 = 0b1000_0000;

/// Quality of Service level of a PUBLISH, a will, or a subscription (§4.3).
///
/// Ordered, so that the effective QoS of a delivery is `min(publish, granted)` and
/// overlapping subscriptions pick the `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
#[expect(
    clippy::enum_variant_names,
    reason = "the spec's names (§4.3): At most once, At least once, Exactly once"
)]
pub enum QoS {
    /// QoS 0: fire and forget, no acknowledgement.
    AtMostOnce = 0,
    /// QoS 1: acknowledged by PUBACK, may be duplicated.
    AtLeastOnce = 1,
    /// QoS 2: four-step PUBREC / PUBREL / PUBCOMP exchange, delivered once.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS with wire value `value`, or `None` for 3 and above (3 is reserved
    /// and malformed everywhere in MQTT 3.1.1).
    pub fn from_u8(value: u8) -> Option<QoS> {
        match value {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// Which protocol a client speaks, from its CONNECT's Protocol Name and Level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolVersion {
    /// MQTT 3.1: Protocol Name `MQIsdp`, level 3.
    V31,
    /// MQTT 3.1.1: Protocol Name `MQTT`, level 4.
    V311,
}

/// The Will Message of a CONNECT (§3.1.2.5): published by the server when the
/// connection ends without a DISCONNECT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastWill {
    /// Will Topic (§3.1.3.2). Valid UTF-8 without U+0000; the caller checks it is a
    /// valid topic name (no wildcards) with [`crate::protocol::topic::validate_topic_name`].
    pub topic: ByteString,
    /// Will Message (§3.1.3.3): binary application data, possibly empty.
    pub message: Bytes,
    /// Will QoS (§3.1.2.6): the QoS the will is published with.
    pub qos: QoS,
    /// Will Retain (§3.1.2.7): whether the will is published as a retained message.
    pub retain: bool,
}

/// A CONNECT packet (§3.1): the first packet of every connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    /// Protocol the client speaks (3.1 or 3.1.1).
    pub protocol: ProtocolVersion,
    /// CleanSession (§3.1.2.4): discard any previous session and start afresh, and
    /// discard this one when the connection ends.
    pub clean_session: bool,
    /// Keep Alive (§3.1.2.10) in seconds; 0 turns the keep-alive mechanism off.
    pub keep_alive: u16,
    /// Client Identifier (§3.1.3.1). May be empty: the session layer then generates
    /// one (CleanSession 1) or refuses with [`CONNACK_IDENTIFIER_REJECTED`].
    pub client_id: ByteString,
    /// Will Message, present when the Will Flag is set.
    pub last_will: Option<LastWill>,
    /// User Name (§3.1.3.4), present when the User Name Flag is set.
    pub username: Option<ByteString>,
    /// Password (§3.1.3.5), binary data, present when the Password Flag is set.
    pub password: Option<Bytes>,
}

/// A PUBLISH packet (§3.3): an application message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    /// DUP (§3.3.1.1): this may be a re-delivery. Always false for QoS 0.
    pub dup: bool,
    /// QoS level of this delivery (§3.3.1.2).
    pub qos: QoS,
    /// RETAIN (§3.3.1.3): store this as the topic's retained message.
    pub retain: bool,
    /// Topic Name (§3.3.2.1). Valid UTF-8 without U+0000; the caller checks it is a
    /// valid topic name with [`crate::protocol::topic::validate_topic_name`].
    pub topic: ByteString,
    /// Packet Identifier (§3.3.2.2): non-zero for QoS 1 and 2, `0` for QoS 0 (which
    /// has none on the wire).
    pub packet_id: PacketId,
    /// Application payload (§3.3.3), possibly empty, in its own allocation.
    pub payload: Bytes,
}

/// A SUBSCRIBE packet (§3.8).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet Identifier, non-zero, echoed in the SUBACK.
    pub packet_id: PacketId,
    /// At least one (Topic Filter, Requested QoS) pair, in packet order; the SUBACK
    /// answers them in the same order. Filters are valid UTF-8 without U+0000 but
    /// not yet checked as topic filters.
    pub filters: Vec<(ByteString, QoS)>,
}

/// An UNSUBSCRIBE packet (§3.10).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet Identifier, non-zero, echoed in the UNSUBACK.
    pub packet_id: PacketId,
    /// At least one Topic Filter, in packet order.
    pub filters: Vec<ByteString>,
}

/// A control packet a server can receive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT (§3.1): connection request.
    Connect(Connect),
    /// PUBLISH (§3.3): application message.
    Publish(Publish),
    /// PUBACK (§3.4): QoS 1 acknowledgement of a PUBLISH we sent.
    PubAck(PacketId),
    /// PUBREC (§3.5): QoS 2 step 1 answer to a PUBLISH we sent.
    PubRec(PacketId),
    /// PUBREL (§3.6): QoS 2 step 2, the client releases a PUBLISH it sent us.
    PubRel(PacketId),
    /// PUBCOMP (§3.7): QoS 2 step 3, completes a PUBLISH we sent.
    PubComp(PacketId),
    /// SUBSCRIBE (§3.8).
    Subscribe(Subscribe),
    /// UNSUBSCRIBE (§3.10).
    Unsubscribe(Unsubscribe),
    /// PINGREQ (§3.12): keep-alive.
    PingReq,
    /// DISCONNECT (§3.14): clean close; the will is discarded.
    Disconnect,
}

/// Why bytes from a client are not a packet the server accepts. Every variant means
/// "close the connection" (§4.8); only [`DecodeError::UnsupportedProtocolLevel`]
/// is answered first (CONNACK [`CONNACK_UNACCEPTABLE_PROTOCOL_VERSION`]).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The Remaining Length needs a fifth byte (§2.2.3).
    #[error("malformed remaining length: more than 4 bytes")]
    MalformedRemainingLength,
    /// The whole packet (fixed header + remaining length) is larger than the
    /// configured maximum; reported as soon as the Remaining Length is read.
    #[error("packet of {size} bytes exceeds the maximum of {max} bytes")]
    PacketTooLarge {
        /// Size the packet announces: fixed header plus remaining length.
        size: usize,
        /// The configured maximum packet size.
        max: usize,
    },
    /// A packet type a server must never receive: CONNACK, SUBACK, UNSUBACK,
    /// PINGRESP, or the reserved types 0 and 15 (§2.2.1).
    #[error("unexpected packet type {0}")]
    UnexpectedPacketType(u8),
    /// The fixed header's flag bits are not the ones the packet type requires:
    /// 0b0010 for PUBREL, SUBSCRIBE and UNSUBSCRIBE, 0 for others (§2.2.2).
    #[error("invalid fixed header flags {flags:#06b} for packet type {packet_type}")]
    InvalidFixedHeaderFlags {
        /// The packet type (high nibble of the first byte).
        packet_type: u8,
        /// The flags received (low nibble of the first byte).
        flags: u8,
    },
    /// A PUBLISH with both QoS bits set: QoS 3 is reserved (§3.3.1.2, MQTT-3.3.1-4).
    #[error("PUBLISH with QoS 3")]
    InvalidPublishQoS,
    /// A QoS 0 PUBLISH with DUP set (§3.3.1.1, MQTT-3.3.1-2).
    #[error("PUBLISH with QoS 0 and DUP set")]
    DupWithQoS0,
    /// A UTF-8 encoded string is not valid UTF-8 or contains U+0000 (§1.5.3,
    /// MQTT-1.5.3-1 and MQTT-1.5.3-2).
    #[error("invalid UTF-8 string")]
    InvalidUtf8,
    /// The Remaining Length ends before a field the packet must contain.
    #[error("packet shorter than its fields")]
    Truncated,
    /// Bytes are left after the last field the packet can contain.
    #[error("unexpected bytes after the packet's fields")]
    TrailingBytes,
    /// A PUBLISH (QoS > 0), SUBSCRIBE or UNSUBSCRIBE with Packet Identifier 0
    /// (§2.3.1, MQTT-2.3.1-1).
    #[error("packet identifier 0")]
    ZeroPacketId,
    /// A SUBSCRIBE or UNSUBSCRIBE without any topic filter (MQTT-3.8.3-3,
    /// MQTT-3.10.3-2).
    #[error("SUBSCRIBE or UNSUBSCRIBE without topic filters")]
    NoTopicFilters,
    /// A SUBSCRIBE Requested QoS byte with reserved upper bits set or QoS 3
    /// (§3.8.3.1, MQTT-3.8.3-4).
    #[error("invalid requested QoS byte {0:#04x}")]
    InvalidRequestedQoS(u8),
    /// A CONNECT whose Protocol Name is neither `MQTT` nor `MQIsdp` (§3.1.2.1): the
    /// server may close without a CONNACK (MQTT-3.1.2-1).
    #[error("invalid protocol name")]
    InvalidProtocolName,
    /// A CONNECT with a known Protocol Name but another level (§3.1.2.2): answer
    /// CONNACK [`CONNACK_UNACCEPTABLE_PROTOCOL_VERSION`], then close (MQTT-3.1.2-2).
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    /// A 3.1.1 CONNECT with the reserved connect flag set (§3.1.2.3, MQTT-3.1.2-3).
    #[error("reserved connect flag set")]
    ReservedConnectFlag,
    /// Will QoS or Will Retain set without the Will Flag, or Will QoS 3
    /// (MQTT-3.1.2-11, MQTT-3.1.2-13, MQTT-3.1.2-14).
    #[error("invalid will flags")]
    InvalidWillFlags,
    /// A 3.1.1 CONNECT with the Password Flag but not the User Name Flag
    /// (MQTT-3.1.2-22).
    #[error("password flag without user name flag")]
    PasswordWithoutUsername,
}

/// Why a packet cannot be encoded. The broker only re-encodes what it decoded, so
/// these only happen at the limits (e.g. a QoS 0 PUBLISH of the largest size,
/// delivered at QoS 1, needs two more bytes for the Packet Identifier).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The Remaining Length would exceed [`MAX_REMAINING_LENGTH`] (§2.2.3).
    #[error("remaining length {0} exceeds {MAX_REMAINING_LENGTH}")]
    RemainingLengthTooLarge(usize),
    /// A UTF-8 string is longer than [`MAX_STRING_LEN`] bytes (§1.5.3).
    #[error("string of {0} bytes exceeds {MAX_STRING_LEN}")]
    StringTooLong(usize),
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};
    use decode::check_fixed_header;
    use mqttbytes::v4 as mb;

    /// A maximum packet size that never gets in the way.
    const BIG: usize = MAX_REMAINING_LENGTH + MAX_FIXED_HEADER_LEN;

    /// Decodes `bytes` and checks that exactly all of them were consumed.
    fn decode_all(bytes: &[u8]) -> Result<Packet, DecodeError> {
        let mut buf = BytesMut::from(bytes);
        let packet = decode(&mut buf, BIG)?;
        assert!(buf.is_empty(), "left {} bytes", buf.len());
        packet.ok_or(DecodeError::Truncated)
    }

    /// Decodes `bytes` expecting an error, and checks nothing was consumed.
    fn decode_err(bytes: &[u8]) -> DecodeError {
        let mut buf = BytesMut::from(bytes);
        let err = decode(&mut buf, BIG).expect_err("should fail");
        assert_eq!(buf.len(), bytes.len());
        err
    }

    /// Builds a frame from a first byte and a body, with a minimal remaining length.
    fn frame(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_u8(first);
        encode_remaining_length(body.len(), &mut out).unwrap();
        out.put_slice(body);
        out.to_vec()
    }

    /// A length-prefixed string field.
    fn string(s: &[u8]) -> Vec<u8> {
        let mut v = u16::try_from(s.len()).unwrap().to_be_bytes().to_vec();
        v.extend_from_slice(s);
        v
    }

    /// A CONNECT body with the given name, level and flags and a client id "c".
    fn connect_body(name: &[u8], level: u8, flags: u8) -> Vec<u8> {
        let mut body = string(name);
        body.push(level);
        body.push(flags);
        body.extend_from_slice(&60u16.to_be_bytes());
        body.extend(string(b"c"));
        body
    }

    fn mb_write(packet: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
        let mut out = BytesMut::new();
        packet(&mut out);
        out.to_vec()
    }

    fn mb_qos(qos: QoS) -> mqttbytes::QoS {
        match qos {
            QoS::AtMostOnce => mqttbytes::QoS::AtMostOnce,
            QoS::AtLeastOnce => mqttbytes::QoS::AtLeastOnce,
            QoS::ExactlyOnce => mqttbytes::QoS::ExactlyOnce,
        }
    }

    fn mb_read(bytes: &[u8]) -> mb::Packet {
        let mut buf = BytesMut::from(bytes);
        let packet = mb::read(&mut buf, BIG).unwrap();
        assert!(buf.is_empty());
        packet
    }

    #[test]
    fn qos_from_u8() {
        assert_eq!(QoS::from_u8(0), Some(QoS::AtMostOnce));
        assert_eq!(QoS::from_u8(1), Some(QoS::AtLeastOnce));
        assert_eq!(QoS::from_u8(2), Some(QoS::ExactlyOnce));
        assert_eq!(QoS::from_u8(3), None);
        assert_eq!(QoS::from_u8(0xFF), None);
        assert!(QoS::AtMostOnce < QoS::AtLeastOnce && QoS::AtLeastOnce < QoS::ExactlyOnce);
    }

    #[test]
    fn remaining_length_edges() {
        let cases: [(usize, &[u8]); 8] = [
            (0, &[0x00]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xFF, 0xFF, 0x7F]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (268_435_455, &[0xFF, 0xFF, 0xFF, 0x7F]),
        ];
        for (value, encoded) in cases {
            let mut out = BytesMut::new();
            encode_remaining_length(value, &mut out).unwrap();
            assert_eq!(&out[..], encoded, "encode {value}");
            assert_eq!(remaining_length_len(value), encoded.len(), "len {value}");
            assert_eq!(
                decode_remaining_length(encoded),
                Ok(Some((value, encoded.len()))),
                "decode {value}"
            );
            // Every strict prefix is incomplete.
            for cut in 0..encoded.len() {
                assert_eq!(decode_remaining_length(&encoded[..cut]), Ok(None));
            }
        }
        let mut out = BytesMut::new();
        assert_eq!(
            encode_remaining_length(MAX_REMAINING_LENGTH + 1, &mut out),
            Err(EncodeError::RemainingLengthTooLarge(
                MAX_REMAINING_LENGTH + 1
            ))
        );
        assert!(out.is_empty());
        assert_eq!(
            decode_remaining_length(&[0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
            Err(DecodeError::MalformedRemainingLength)
        );
        // Known to be malformed as soon as the fourth byte continues.
        assert_eq!(
            decode_remaining_length(&[0x80, 0x80, 0x80, 0x80]),
            Err(DecodeError::MalformedRemainingLength)
        );
        assert_eq!(
            decode_err(&[PINGREQ << 4, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
            DecodeError::MalformedRemainingLength
        );
    }

    #[test]
    fn non_minimal_remaining_length_is_accepted() {
        assert_eq!(decode_remaining_length(&[0x80, 0x00]), Ok(Some((0, 2))));
        assert_eq!(
            decode_all(&[PINGREQ << 4, 0x80, 0x80, 0x00]),
            Ok(Packet::PingReq)
        );
        assert_eq!(
            decode_all(&[PUBACK << 4, 0x82, 0x00, 0x00, 0x07]),
            Ok(Packet::PubAck(7))
        );
    }

    #[test]
    fn take_puback_takes_exactly_what_decode_reads_as_a_puback() {
        // Two PUBACKs and the start of a third: each taken alone, then
        // nothing until the rest arrives.
        let mut buf = BytesMut::from(&[0x40, 2, 0, 7, 0x40, 2, 1, 0, 0x40, 2, 0][..]);
        assert_eq!(take_puback(&mut buf), Some(7));
        assert_eq!(take_puback(&mut buf), Some(256));
        assert_eq!(take_puback(&mut buf), None);
        assert_eq!(&buf[..], &[0x40, 2, 0]);
        // Not the plain shape: left to `decode`, which decides (a
        // non-minimal length, flags set, trailing bytes, another packet).
        for bytes in [
            &[PUBACK << 4, 0x82, 0x00, 0x00, 0x07][..],
            &[(PUBACK << 4) | 1, 2, 0, 7],
            &[PUBACK << 4, 3, 0, 7, 0],
            &[PUBREC << 4, 2, 0, 7],
            &[PINGREQ << 4, 0],
        ] {
            let mut buf = BytesMut::from(bytes);
            assert_eq!(take_puback(&mut buf), None, "{bytes:?}");
            assert_eq!(&buf[..], bytes, "nothing consumed");
        }
        // Where it takes one, decode reads the same.
        let mut buf = BytesMut::from(&[0x40, 2, 0, 0][..]);
        assert_eq!(take_puback(&mut buf), Some(0));
        assert_eq!(decode_all(&[0x40, 2, 0, 0]), Ok(Packet::PubAck(0)));
    }

    #[test]
    fn packet_too_large_is_reported_before_the_bytes_arrive() {
        // A PUBLISH announcing 200 bytes of remaining length: 203 bytes in all.
        let mut buf = BytesMut::from(&[PUBLISH << 4, 0xC8, 0x01][..]);
        assert_eq!(
            decode(&mut buf, 202),
            Err(DecodeError::PacketTooLarge {
                size: 203,
                max: 202
            })
        );
        assert_eq!(buf.len(), 3);
        assert_eq!(decode(&mut buf, 203), Ok(None));
        // The limit covers the fixed header: PINGREQ is 2 bytes.
        let mut buf = BytesMut::from(&[PINGREQ << 4, 0][..]);
        assert!(matches!(
            decode(&mut buf, 1),
            Err(DecodeError::PacketTooLarge { size: 2, max: 1 })
        ));
        assert_eq!(decode(&mut buf, 2), Ok(Some(Packet::PingReq)));
    }

    #[test]
    fn peek_frame_len_reports_whole_frame() {
        assert_eq!(peek_frame_len(&[], BIG), Ok(None));
        assert_eq!(peek_frame_len(&[PUBLISH << 4], BIG), Ok(None));
        assert_eq!(peek_frame_len(&[PUBLISH << 4, 0x80], BIG), Ok(None));
        assert_eq!(
            peek_frame_len(&[PUBLISH << 4, 0x80, 0x01], BIG),
            Ok(Some(131))
        );
        assert_eq!(
            peek_frame_len(&[CONNACK << 4], BIG),
            Err(DecodeError::UnexpectedPacketType(CONNACK))
        );
    }

    #[test]
    fn incomplete_input_at_every_split_point() {
        let mut samples: Vec<Vec<u8>> = Vec::new();
        let mut connect = mb::Connect::new("client-1");
        connect.last_will = Some(mb::LastWill::new(
            "will/t",
            "bye",
            mqttbytes::QoS::AtLeastOnce,
            true,
        ));
        connect.set_login("user", "pass");
        samples.push(mb_write(|out| {
            connect.write(out).unwrap();
        }));
        let mut out = BytesMut::new();
        encode_publish("a/b", QoS::ExactlyOnce, true, true, 9, &[7; 300], &mut out).unwrap();
        samples.push(out.to_vec());
        samples.push(frame(
            SUBSCRIBE << 4 | 2,
            &[0, 1, 0, 1, b'x', 1, 0, 1, b'y', 2],
        ));
        samples.push(frame(UNSUBSCRIBE << 4 | 2, &[0, 1, 0, 1, b'x']));
        samples.push(vec![PUBREL << 4 | 2, 2, 0, 5]);
        samples.push(vec![PINGREQ << 4, 0]);
        for sample in samples {
            for cut in 0..sample.len() {
                let mut buf = BytesMut::from(&sample[..cut]);
                assert_eq!(decode(&mut buf, BIG), Ok(None), "cut {cut} of {sample:?}");
                assert_eq!(buf.len(), cut);
            }
            // Two packets back to back: the first decode consumes exactly one.
            let mut buf = BytesMut::from(&sample[..]);
            buf.extend_from_slice(&sample);
            assert!(decode(&mut buf, BIG).unwrap().is_some());
            assert_eq!(buf.len(), sample.len());
            assert!(decode(&mut buf, BIG).unwrap().is_some());
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn connect_from_mqttbytes() {
        let mut connect = mb::Connect::new("client-1");
        connect.keep_alive = 30;
        connect.clean_session = false;
        connect.last_will = Some(mb::LastWill::new(
            "will/topic",
            "gone",
            mqttbytes::QoS::ExactlyOnce,
            true,
        ));
        connect.set_login("alice", "secret");
        let bytes = mb_write(|out| {
            connect.write(out).unwrap();
        });
        let Ok(Packet::Connect(c)) = decode_all(&bytes) else {
            panic!("not a connect");
        };
        assert_eq!(c.protocol, ProtocolVersion::V311);
        assert!(!c.clean_session);
        assert_eq!(c.keep_alive, 30);
        assert_eq!(c.client_id, "client-1");
        assert_eq!(
            c.last_will,
            Some(LastWill {
                topic: "will/topic".into(),
                message: Bytes::from_static(b"gone"),
                qos: QoS::ExactlyOnce,
                retain: true,
            })
        );
        assert_eq!(c.username.as_deref(), Some("alice"));
        assert_eq!(c.password, Some(Bytes::from_static(b"secret")));

        // Minimal: empty client id, no will, no login.
        let connect = mb::Connect::new("");
        let bytes = mb_write(|out| {
            connect.write(out).unwrap();
        });
        let Ok(Packet::Connect(c)) = decode_all(&bytes) else {
            panic!("not a connect");
        };
        assert!(c.clean_session);
        assert_eq!(c.client_id, "");
        assert_eq!((c.last_will, c.username, c.password), (None, None, None));
    }

    #[test]
    fn connect_mqisdp_level_3_is_accepted() {
        let bytes = frame(CONNECT << 4, &connect_body(b"MQIsdp", 3, 0b10));
        let Ok(Packet::Connect(c)) = decode_all(&bytes) else {
            panic!("not a connect");
        };
        assert_eq!(c.protocol, ProtocolVersion::V31);
        assert!(c.clean_session);
        assert_eq!(c.keep_alive, 60);
        assert_eq!(c.client_id, "c");
        // 3.1 is not held to 3.1.1's reserved bit and password-only rules.
        let mut body = connect_body(b"MQIsdp", 3, 0b0100_0001);
        body.extend(string(b"pw"));
        let Ok(Packet::Connect(c)) = decode_all(&frame(CONNECT << 4, &body)) else {
            panic!("not a connect");
        };
        assert_eq!(c.password, Some(Bytes::from_static(b"pw")));
        assert_eq!(c.username, None);
    }

    #[test]
    fn connect_protocol_errors() {
        let err = |body: Vec<u8>| decode_err(&frame(CONNECT << 4, &body));
        assert_eq!(
            err(connect_body(b"MQTX", 4, 0)),
            DecodeError::InvalidProtocolName
        );
        assert_eq!(
            err(connect_body(b"", 4, 0)),
            DecodeError::InvalidProtocolName
        );
        assert_eq!(
            err(connect_body(b"MQTT", 5, 0)),
            DecodeError::UnsupportedProtocolLevel(5)
        );
        assert_eq!(
            err(connect_body(b"MQTT", 3, 0)),
            DecodeError::UnsupportedProtocolLevel(3)
        );
        assert_eq!(
            err(connect_body(b"MQIsdp", 4, 0)),
            DecodeError::UnsupportedProtocolLevel(4)
        );
        assert_eq!(
            err(connect_body(b"MQTT", 4, 0b1)),
            DecodeError::ReservedConnectFlag
        );
        // Will QoS without the will flag, will retain without it, will QoS 3.
        assert_eq!(
            err(connect_body(b"MQTT", 4, 0b1000)),
            DecodeError::InvalidWillFlags
        );
        assert_eq!(
            err(connect_body(b"MQTT", 4, 0b10_0000)),
            DecodeError::InvalidWillFlags
        );
        assert_eq!(
            err(connect_body(b"MQTT", 4, 0b1_1100)),
            DecodeError::InvalidWillFlags
        );
        assert_eq!(
            err(connect_body(b"MQTT", 4, 0b0100_0000)),
            DecodeError::PasswordWithoutUsername
        );
        // Will flag set but no will topic / message follow the client id.
        assert_eq!(
            err(connect_body(b"MQTT", 4, 0b0100)),
            DecodeError::Truncated
        );
        // Trailing byte after the client id.
        let mut body = connect_body(b"MQTT", 4, 0);
        body.push(0);
        assert_eq!(err(body), DecodeError::TrailingBytes);
        // Client id with U+0000, then with invalid UTF-8.
        let mut body = connect_body(b"MQTT", 4, 0);
        body.truncate(body.len() - 3);
        body.extend(string(b"a\0b"));
        assert_eq!(err(body.clone()), DecodeError::InvalidUtf8);
        body.truncate(body.len() - 5);
        body.extend(string(&[0xC3, 0x28]));
        assert_eq!(err(body), DecodeError::InvalidUtf8);
        // Cut inside the fixed part of the variable header.
        assert_eq!(err(string(b"MQTT")), DecodeError::Truncated);
    }

    #[test]
    fn publish_round_trips_with_mqttbytes() {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            for retain in [false, true] {
                let dup = qos != QoS::AtMostOnce;
                let packet_id = if qos == QoS::AtMostOnce { 0 } else { 4242 };
                // mqttbytes encodes, we decode.
                let mut publish = mb::Publish::new("sensors/t/1", mb_qos(qos), vec![1, 2, 3]);
                publish.retain = retain;
                publish.dup = dup;
                publish.pkid = packet_id;
                let bytes = mb_write(|out| {
                    publish.write(out).unwrap();
                });
                let expected = Publish {
                    dup,
                    qos,
                    retain,
                    topic: "sensors/t/1".into(),
                    packet_id,
                    payload: Bytes::from_static(&[1, 2, 3]),
                };
                assert_eq!(decode_all(&bytes), Ok(Packet::Publish(expected)));
                // We encode, mqttbytes decodes, and the bytes are identical.
                let mut ours = BytesMut::new();
                encode_publish(
                    "sensors/t/1",
                    qos,
                    retain,
                    dup,
                    packet_id,
                    &[1, 2, 3],
                    &mut ours,
                )
                .unwrap();
                assert_eq!(&ours[..], &bytes[..]);
                assert_eq!(mb_read(&ours), mb::Packet::Publish(publish));
            }
        }
    }

    #[test]
    fn publish_empty_payload_and_large_payload() {
        let mut out = BytesMut::new();
        encode_publish("t", QoS::AtMostOnce, false, false, 0, &[], &mut out).unwrap();
        assert_eq!(&out[..], &[0x30, 3, 0, 1, b't']);
        let Ok(Packet::Publish(p)) = decode_all(&out) else {
            panic!("not a publish");
        };
        assert!(p.payload.is_empty());

        let payload = vec![0xAB; 70_000];
        let mut out = BytesMut::new();
        encode_publish("big", QoS::AtLeastOnce, false, false, 1, &payload, &mut out).unwrap();
        assert_eq!(out.len(), 1 + 3 + 2 + 3 + 2 + 70_000);
        let Ok(Packet::Publish(p)) = decode_all(&out) else {
            panic!("not a publish");
        };
        assert_eq!(p.payload.len(), 70_000);
    }

    #[test]
    fn publish_head_plus_id_plus_payload_equals_publish() {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            for payload_len in [0usize, 1, 120, 121, 200, 20_000] {
                let payload = vec![0x5A; payload_len];
                let mut whole = BytesMut::new();
                encode_publish("a/b/c", qos, true, true, 0xBEEF, &payload, &mut whole).unwrap();
                let mut split = BytesMut::new();
                encode_publish_head("a/b/c", qos, true, true, payload_len, &mut split).unwrap();
                if qos != QoS::AtMostOnce {
                    split.put_u16(0xBEEF);
                }
                split.put_slice(&payload);
                assert_eq!(whole, split, "qos {qos:?} len {payload_len}");
            }
        }
    }

    #[test]
    fn publish_encode_limits() {
        let mut out = BytesMut::new();
        let long = "x".repeat(65_536);
        assert_eq!(
            encode_publish(&long, QoS::AtMostOnce, false, false, 0, &[], &mut out),
            Err(EncodeError::StringTooLong(65_536))
        );
        // The largest QoS 0 publish does not fit at QoS 1 (two more bytes).
        let payload_len = MAX_REMAINING_LENGTH - 2 - 1;
        assert_eq!(
            encode_publish_head("t", QoS::AtLeastOnce, false, false, payload_len, &mut out),
            Err(EncodeError::RemainingLengthTooLarge(
                MAX_REMAINING_LENGTH + 2
            ))
        );
        assert!(out.is_empty());
        encode_publish_head("t", QoS::AtMostOnce, false, false, payload_len, &mut out).unwrap();
        assert_eq!(&out[..5], &[0x30, 0xFF, 0xFF, 0xFF, 0x7F]);
        // DUP is never written for QoS 0.
        let mut out = BytesMut::new();
        encode_publish("t", QoS::AtMostOnce, false, true, 0, &[], &mut out).unwrap();
        assert_eq!(out[0], 0x30);
    }

    #[test]
    fn publish_errors() {
        // QoS 3.
        assert_eq!(
            decode_err(&frame(0x36, &string(b"t"))),
            DecodeError::InvalidPublishQoS
        );
        // DUP with QoS 0.
        assert_eq!(
            decode_err(&frame(0x38, &string(b"t"))),
            DecodeError::DupWithQoS0
        );
        // QoS 1 with packet id 0.
        let mut body = string(b"t");
        body.extend_from_slice(&[0, 0]);
        assert_eq!(decode_err(&frame(0x32, &body)), DecodeError::ZeroPacketId);
        // QoS 1 without a packet id; no topic at all; topic longer than the packet.
        assert_eq!(
            decode_err(&frame(0x32, &string(b"t"))),
            DecodeError::Truncated
        );
        assert_eq!(decode_err(&frame(0x30, &[])), DecodeError::Truncated);
        assert_eq!(
            decode_err(&frame(0x30, &[0, 5, b'a'])),
            DecodeError::Truncated
        );
        // Topic with U+0000 or invalid UTF-8 (a lone surrogate, encoded).
        assert_eq!(
            decode_err(&frame(0x30, &string(b"a\0"))),
            DecodeError::InvalidUtf8
        );
        assert_eq!(
            decode_err(&frame(0x30, &string(&[0xED, 0xA0, 0x80]))),
            DecodeError::InvalidUtf8
        );
        // An empty topic decodes; topic.rs refuses it.
        assert!(decode_all(&frame(0x30, &string(b""))).is_ok());
    }

    #[test]
    fn publish_copies_out_of_the_read_buffer() {
        let mut out = BytesMut::new();
        encode_publish("t", QoS::AtMostOnce, false, false, 0, b"hi", &mut out).unwrap();
        let range = out.as_ptr_range();
        let Ok(Some(Packet::Publish(p))) = decode(&mut out, BIG) else {
            panic!("not a publish");
        };
        assert!(!range.contains(&p.payload.as_ptr()));
        assert!(!range.contains(&p.topic.as_bytes().as_ptr()));
    }

    #[test]
    fn acks_round_trip_with_mqttbytes() {
        // mqttbytes encodes, we decode.
        let bytes = mb_write(|out| {
            mb::PubAck::new(1).write(out).unwrap();
        });
        assert_eq!(decode_all(&bytes), Ok(Packet::PubAck(1)));
        let bytes = mb_write(|out| {
            mb::PubRec::new(2).write(out).unwrap();
        });
        assert_eq!(decode_all(&bytes), Ok(Packet::PubRec(2)));
        let bytes = mb_write(|out| {
            mb::PubRel::new(3).write(out).unwrap();
        });
        assert_eq!(decode_all(&bytes), Ok(Packet::PubRel(3)));
        let bytes = mb_write(|out| {
            mb::PubComp::new(65_535).write(out).unwrap();
        });
        assert_eq!(decode_all(&bytes), Ok(Packet::PubComp(65_535)));
        let bytes = mb_write(|out| {
            mb::PingReq.write(out).unwrap();
        });
        assert_eq!(decode_all(&bytes), Ok(Packet::PingReq));
        let bytes = mb_write(|out| {
            mb::Disconnect.write(out).unwrap();
        });
        assert_eq!(decode_all(&bytes), Ok(Packet::Disconnect));

        // We encode, mqttbytes decodes.
        let mut out = BytesMut::new();
        encode_puback(11, &mut out);
        assert_eq!(mb_read(&out), mb::Packet::PubAck(mb::PubAck::new(11)));
        let mut out = BytesMut::new();
        encode_pubrec(12, &mut out);
        assert_eq!(mb_read(&out), mb::Packet::PubRec(mb::PubRec::new(12)));
        let mut out = BytesMut::new();
        encode_pubrel(13, &mut out);
        assert_eq!(&out[..], &[0x62, 2, 0, 13]);
        assert_eq!(mb_read(&out), mb::Packet::PubRel(mb::PubRel::new(13)));
        let mut out = BytesMut::new();
        encode_pubcomp(14, &mut out);
        assert_eq!(mb_read(&out), mb::Packet::PubComp(mb::PubComp::new(14)));
        let mut out = BytesMut::new();
        encode_unsuback(15, &mut out);
        assert_eq!(mb_read(&out), mb::Packet::UnsubAck(mb::UnsubAck::new(15)));
        let mut out = BytesMut::new();
        encode_pingresp(&mut out);
        assert_eq!(mb_read(&out), mb::Packet::PingResp);
        // Our own acks decode with our decoder too (both directions exist).
        for (bytes, packet) in [
            (encode_with(|o| encode_puback(7, o)), Packet::PubAck(7)),
            (encode_with(|o| encode_pubrec(7, o)), Packet::PubRec(7)),
            (encode_with(|o| encode_pubrel(7, o)), Packet::PubRel(7)),
            (encode_with(|o| encode_pubcomp(7, o)), Packet::PubComp(7)),
        ] {
            assert_eq!(decode_all(&bytes), Ok(packet));
        }
    }

    fn encode_with(f: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
        let mut out = BytesMut::new();
        f(&mut out);
        out.to_vec()
    }

    #[test]
    fn ack_length_errors() {
        assert_eq!(decode_err(&[PUBACK << 4, 1, 0]), DecodeError::Truncated);
        assert_eq!(
            decode_err(&[PUBACK << 4, 3, 0, 1, 0]),
            DecodeError::TrailingBytes
        );
        assert_eq!(
            decode_err(&[PINGREQ << 4, 1, 0]),
            DecodeError::TrailingBytes
        );
        assert_eq!(
            decode_err(&[DISCONNECT << 4, 1, 0]),
            DecodeError::TrailingBytes
        );
        // Acks with packet id 0 are passed on (the session ignores unknown ids).
        assert_eq!(decode_all(&[PUBACK << 4, 2, 0, 0]), Ok(Packet::PubAck(0)));
    }

    #[test]
    fn connack_suback_to_mqttbytes() {
        let mut out = BytesMut::new();
        encode_connack(true, CONNACK_ACCEPTED, &mut out);
        assert_eq!(
            mb_read(&out),
            mb::Packet::ConnAck(mb::ConnAck::new(mb::ConnectReturnCode::Success, true))
        );
        // Session present is cleared on refusal.
        let mut out = BytesMut::new();
        encode_connack(true, CONNACK_NOT_AUTHORIZED, &mut out);
        assert_eq!(&out[..], &[0x20, 2, 0, 5]);
        assert_eq!(
            mb_read(&out),
            mb::Packet::ConnAck(mb::ConnAck::new(
                mb::ConnectReturnCode::NotAuthorized,
                false
            ))
        );
        let mut out = BytesMut::new();
        encode_suback(77, &[0, 1, 2, SUBACK_FAILURE], &mut out).unwrap();
        assert_eq!(
            mb_read(&out),
            mb::Packet::SubAck(mb::SubAck::new(
                77,
                vec![
                    mb::SubscribeReasonCode::Success(mqttbytes::QoS::AtMostOnce),
                    mb::SubscribeReasonCode::Success(mqttbytes::QoS::AtLeastOnce),
                    mb::SubscribeReasonCode::Success(mqttbytes::QoS::ExactlyOnce),
                    mb::SubscribeReasonCode::Failure,
                ]
            ))
        );
        // Encoders append: several packets batch into one buffer.
        let mut out = BytesMut::new();
        encode_pingresp(&mut out);
        encode_puback(1, &mut out);
        assert_eq!(&out[..], &[0xD0, 0, 0x40, 2, 0, 1]);
    }

    #[test]
    fn subscribe_and_unsubscribe_from_mqttbytes() {
        let mut subscribe = mb::Subscribe::new("a/+/c", mqttbytes::QoS::AtLeastOnce);
        subscribe.pkid = 10;
        subscribe.add("#".to_string(), mqttbytes::QoS::ExactlyOnce);
        subscribe.add("x".to_string(), mqttbytes::QoS::AtMostOnce);
        let bytes = mb_write(|out| {
            subscribe.write(out).unwrap();
        });
        assert_eq!(
            decode_all(&bytes),
            Ok(Packet::Subscribe(Subscribe {
                packet_id: 10,
                filters: vec![
                    ("a/+/c".into(), QoS::AtLeastOnce),
                    ("#".into(), QoS::ExactlyOnce),
                    ("x".into(), QoS::AtMostOnce),
                ],
            }))
        );
        let mut unsubscribe = mb::Unsubscribe::new("a/+/c");
        unsubscribe.pkid = 11;
        unsubscribe.topics.push("#".to_string());
        let bytes = mb_write(|out| {
            unsubscribe.write(out).unwrap();
        });
        assert_eq!(
            decode_all(&bytes),
            Ok(Packet::Unsubscribe(Unsubscribe {
                packet_id: 11,
                filters: vec!["a/+/c".into(), "#".into()],
            }))
        );
    }

    #[test]
    fn subscribe_errors() {
        let sub = |body: &[u8]| decode_err(&frame(SUBSCRIBE << 4 | 2, body));
        assert_eq!(sub(&[0, 1]), DecodeError::NoTopicFilters);
        assert_eq!(sub(&[0, 0, 0, 1, b'a', 0]), DecodeError::ZeroPacketId);
        assert_eq!(
            sub(&[0, 1, 0, 1, b'a', 3]),
            DecodeError::InvalidRequestedQoS(3)
        );
        assert_eq!(
            sub(&[0, 1, 0, 1, b'a', 0x81]),
            DecodeError::InvalidRequestedQoS(0x81)
        );
        assert_eq!(
            sub(&[0, 1, 0, 1, b'a', 0x04]),
            DecodeError::InvalidRequestedQoS(4)
        );
        assert_eq!(sub(&[0, 1, 0, 1, b'a']), DecodeError::Truncated);
        assert_eq!(sub(&[0, 1, 0, 1, 0, 0]), DecodeError::InvalidUtf8);
        assert_eq!(sub(&[0]), DecodeError::Truncated);
        let unsub = |body: &[u8]| decode_err(&frame(UNSUBSCRIBE << 4 | 2, body));
        assert_eq!(unsub(&[0, 1]), DecodeError::NoTopicFilters);
        assert_eq!(unsub(&[0, 0, 0, 1, b'a']), DecodeError::ZeroPacketId);
        assert_eq!(unsub(&[0, 1, 0, 2, b'a']), DecodeError::Truncated);
        assert_eq!(unsub(&[0, 1, 0, 1, 0xFF]), DecodeError::InvalidUtf8);
    }

    #[test]
    fn fixed_header_errors() {
        for packet_type in [0u8, CONNACK, SUBACK, UNSUBACK, PINGRESP, 15] {
            assert_eq!(
                decode_err(&[packet_type << 4, 0]),
                DecodeError::UnexpectedPacketType(packet_type)
            );
        }
        // Wrong flags for each type with fixed flags.
        for (packet_type, good) in [
            (CONNECT, 0u8),
            (PUBACK, 0),
            (PUBREC, 0),
            (PUBREL, 2),
            (PUBCOMP, 0),
            (SUBSCRIBE, 2),
            (UNSUBSCRIBE, 2),
            (PINGREQ, 0),
            (DISCONNECT, 0),
        ] {
            for flags in 0..16u8 {
                let result = check_fixed_header(packet_type << 4 | flags);
                if flags == good {
                    assert_eq!(result, Ok(()));
                } else {
                    assert_eq!(
                        result,
                        Err(DecodeError::InvalidFixedHeaderFlags { packet_type, flags })
                    );
                }
            }
        }
        // Checked from the first byte alone.
        assert_eq!(
            decode_err(&[SUBSCRIBE << 4]),
            DecodeError::InvalidFixedHeaderFlags {
                packet_type: SUBSCRIBE,
                flags: 0
            }
        );
    }

    use crate::test_rng::XorShift;

    /// Decodes until the buffer is exhausted, incomplete, or an error: must not
    /// panic, and each decoded packet consumes at least two bytes.
    fn decode_loop(bytes: &[u8], max: usize) {
        let mut buf = BytesMut::from(bytes);
        loop {
            let before = buf.len();
            match decode(&mut buf, max) {
                Ok(Some(_)) => assert!(buf.len() + 2 <= before),
                Ok(None) => {
                    assert_eq!(buf.len(), before);
                    break;
                }
                Err(_) => {
                    assert_eq!(buf.len(), before);
                    break;
                }
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for _ in 0..100_000 {
            let len = (rng.next() % 48) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            decode_loop(&bytes, 1024);
        }
    }

    #[test]
    fn mutated_packets_never_panic() {
        let mut connect = mb::Connect::new("client-1");
        connect.last_will = Some(mb::LastWill::new(
            "w",
            "m",
            mqttbytes::QoS::AtLeastOnce,
            false,
        ));
        connect.set_login("u", "p");
        let mut samples = vec![mb_write(|out| {
            connect.write(out).unwrap();
        })];
        samples.push(encode_with(|o| {
            encode_publish("a/b", QoS::AtLeastOnce, false, false, 3, b"xyz", o).unwrap()
        }));
        samples.push(frame(
            SUBSCRIBE << 4 | 2,
            &[0, 1, 0, 1, b'x', 1, 0, 1, b'y', 2],
        ));
        samples.push(frame(UNSUBSCRIBE << 4 | 2, &[0, 1, 0, 1, b'x']));
        let mut rng = XorShift(0xDEAD_BEEF_CAFE_F00D);
        let mut decoded = 0;
        for round in 0..100_000 {
            let mut bytes = samples[round % samples.len()].clone();
            let flips = 1 + rng.next() % 3;
            for _ in 0..flips {
                let at = (rng.next() as usize) % bytes.len();
                bytes[at] = rng.next() as u8;
            }
            if rng.next().is_multiple_of(4) {
                bytes.truncate((rng.next() as usize) % (bytes.len() + 1));
            }
            let mut buf = BytesMut::from(&bytes[..]);
            if let Ok(Some(_)) = decode(&mut buf, 1024) {
                decoded += 1;
            }
            decode_loop(&bytes, 1024);
        }
        // The mutations are small enough that some packets stay valid.
        assert!(decoded > 0);
    }
}
