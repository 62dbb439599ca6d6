//! Decoding what an MQTT 5.0 client sends: bytes to [`Packet`]s, with the
//! checks listed in the [module documentation](super), each failure a
//! [`DecodeError`] that names the Reason Code to close the connection with.
//!
//! # Reason codes of decode errors (§4.13)
//!
//! - 0x81 Malformed Packet where the specification says the packet cannot be
//!   parsed: bad Variable Byte Integers (§1.5.5), bad UTF-8 (§1.5.4), lengths
//!   that do not add up, fixed header flags (§2.1.3), PUBLISH QoS 3
//!   (§3.3.1.2), unknown or misplaced properties (§2.2.2.2), the CONNECT
//!   reserved flag (§3.1.2.3), Will QoS 3 and will flags without a will
//!   (§3.1.2.6), SUBSCRIBE reserved option bits (§3.8.3.1), and a reason code
//!   that the packet may not carry (§2.4: an undefined value for that field;
//!   the specification names no code for this, and a value outside the field's
//!   range is a format error, as for properties in §2.2.2.2).
//! - 0x82 Protocol Error where it says Protocol Error: repeated properties,
//!   property values out of range (§3.1.2.11, §3.3.2.3, §3.8.2.1), Packet
//!   Identifier 0 (§2.2.1), a SUBSCRIBE or UNSUBSCRIBE without filters
//!   (§3.8.3, §3.10.3), SUBSCRIBE QoS 3 or Retain Handling 3 (§3.8.3.1),
//!   Authentication Data without a method (§3.1.2.11.10), an AUTH without a
//!   method (§3.15.2.2.2), an empty topic without a Topic Alias (§3.3.2.1),
//!   a Subscription Identifier from a client (MQTT-3.3.4-6), a DISCONNECT or
//!   AUTH reason code only a server sends (§3.14.2.1, §3.15.2.1), and packets
//!   a client never sends (CONNACK, SUBACK, UNSUBACK, PINGRESP).
//! - 0x84 Unsupported Protocol Version for a CONNECT that is not "MQTT" level 5
//!   (§3.1.2.1, §3.1.2.2; for a wrong name the server MAY also just close).
//! - 0x94 Topic Alias invalid for Topic Alias 0 (§3.3.2.3.4).
//! - 0x95 Packet too large beyond the maximum packet size (§3.2.2.3.6).

use bytes::{Buf, Bytes, BytesMut};
use bytestring::ByteString;
use thiserror::Error;

use super::properties::{Context, Properties, PropertyId};
use super::{
    Ack, Connect, PROTOCOL_NAME, PROTOCOL_VERSION, PUBLISH_DUP, PUBLISH_QOS_SHIFT, PUBLISH_RETAIN,
    Packet, PacketType, Publish, ReasonAndProperties, ReasonCode, RetainHandling, Subscribe,
    SubscriptionOptions, Unsubscribe, Will,
};
use crate::protocol::v3::{self as codec, PacketId, QoS};

/// Connect flag bit 0: reserved, must be 0 (§3.1.2.3).
const CONNECT_RESERVED: u8 = 0b0000_0001;
/// Connect flag Clean Start (§3.1.2.4).
const CONNECT_CLEAN_START: u8 = 0b0000_0010;
/// Connect flag Will Flag (§3.1.2.5).
const CONNECT_WILL: u8 = 0b0000_0100;
/// Shift of the two Will QoS bits (§3.1.2.6).
const CONNECT_WILL_QOS_SHIFT: u8 = 3;
/// Connect flag Will Retain (§3.1.2.7).
const CONNECT_WILL_RETAIN: u8 = 0b0010_0000;
/// Connect flag Password Flag (§3.1.2.9).
const CONNECT_PASSWORD: u8 = 0b0100_0000;
/// Connect flag User Name Flag (§3.1.2.8).
const CONNECT_USERNAME: u8 = 0b1000_0000;

/// Subscription option bit No Local (§3.8.3.1).
const OPTION_NO_LOCAL: u8 = 0b0000_0100;
/// Subscription option bit Retain As Published (§3.8.3.1).
const OPTION_RETAIN_AS_PUBLISHED: u8 = 0b0000_1000;
/// Shift of the two Retain Handling bits (§3.8.3.1).
const OPTION_RETAIN_HANDLING_SHIFT: u8 = 4;
/// Subscription option bits 6 and 7: reserved, must be 0 (MQTT-3.8.3-5).
const OPTION_RESERVED: u8 = 0b1100_0000;

/// Why bytes from a client are not a packet the server accepts. Every variant
/// closes the connection; [`DecodeError::reason_code`] gives the Reason Code
/// for the CONNACK or DISCONNECT sent first (see the module documentation for
/// the mapping and its sections).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// A Variable Byte Integer needs a fifth byte (§1.5.5). 0x81.
    #[error("malformed variable byte integer: more than 4 bytes")]
    MalformedVariableByteInteger,
    /// A Variable Byte Integer uses more bytes than its value needs
    /// (MQTT-1.5.5-1). 0x81.
    #[error("variable byte integer not in its minimal form")]
    NonMinimalVariableByteInteger,
    /// The packet is larger than the server's maximum packet size, reported as
    /// soon as its Remaining Length is read (§3.2.2.3.6). 0x95.
    #[error("packet of {size} bytes exceeds the maximum of {max} bytes")]
    PacketTooLarge {
        /// Size the packet announces: fixed header plus Remaining Length.
        size: usize,
        /// The maximum packet size.
        max: usize,
    },
    /// Packet type 0, reserved (§2.1.2). 0x81.
    #[error("reserved packet type 0")]
    ReservedPacketType,
    /// A packet only a server sends: CONNACK, SUBACK, UNSUBACK, PINGRESP. 0x82.
    #[error("unexpected packet type {0:?} from a client")]
    UnexpectedPacketType(PacketType),
    /// The fixed header flags are not those the packet type requires (§2.1.3).
    /// 0x81.
    #[error("invalid fixed header flags {flags:#06b} for {packet_type:?}")]
    InvalidFixedHeaderFlags {
        /// The packet type.
        packet_type: PacketType,
        /// The flags received.
        flags: u8,
    },
    /// PUBLISH with QoS 3 (§3.3.1.2). 0x81.
    #[error("PUBLISH with QoS 3")]
    InvalidPublishQoS,
    /// PUBLISH with QoS 0 and DUP set (MQTT-3.3.1-2): invalid fixed header
    /// flags (§2.1.3). 0x81.
    #[error("PUBLISH with QoS 0 and DUP set")]
    DupWithQoS0,
    /// A UTF-8 string is not valid UTF-8 or contains U+0000 (MQTT-1.5.4-1,
    /// MQTT-1.5.4-2). 0x81.
    #[error("invalid UTF-8 string")]
    InvalidUtf8,
    /// The Remaining Length ends before a field the packet must contain. 0x81.
    #[error("packet shorter than its fields")]
    Truncated,
    /// Bytes are left after the packet's last field. 0x81.
    #[error("unexpected bytes after the packet's fields")]
    TrailingBytes,
    /// A Packet Identifier of 0 in a PUBLISH (QoS > 0), SUBSCRIBE or
    /// UNSUBSCRIBE (MQTT-2.2.1-3). 0x82.
    #[error("packet identifier 0")]
    ZeroPacketId,
    /// A SUBSCRIBE or UNSUBSCRIBE without topic filters (MQTT-3.8.3-2,
    /// MQTT-3.10.3-2). 0x82.
    #[error("SUBSCRIBE or UNSUBSCRIBE without topic filters")]
    NoTopicFilters,
    /// Subscription options with reserved bits 6 or 7 set (MQTT-3.8.3-5). 0x81.
    #[error("subscription options {0:#04x} with reserved bits set")]
    ReservedSubscriptionOptions(u8),
    /// Subscription options with Maximum QoS 3 (§3.8.3.1). 0x82.
    #[error("subscription with QoS 3")]
    InvalidSubscriptionQoS,
    /// Subscription options with Retain Handling 3 (§3.8.3.1). 0x82.
    #[error("subscription with Retain Handling 3")]
    InvalidRetainHandling,
    /// A CONNECT whose Protocol Name is not "MQTT" (§3.1.2.1). 0x84.
    #[error("invalid protocol name")]
    InvalidProtocolName,
    /// A CONNECT with Protocol Version other than 5 (§3.1.2.2). 0x84.
    #[error("unsupported protocol version {0}")]
    UnsupportedProtocolVersion(u8),
    /// The CONNECT reserved flag is set (MQTT-3.1.2-3). 0x81.
    #[error("reserved connect flag set")]
    ReservedConnectFlag,
    /// Will QoS 3 (§3.1.2.6). 0x81.
    #[error("will QoS 3")]
    InvalidWillQoS,
    /// Will QoS or Will Retain set without the Will Flag (MQTT-3.1.2-11,
    /// MQTT-3.1.2-13). 0x81.
    #[error("will QoS or retain without the will flag")]
    WillFlagsWithoutWill,
    /// A property identifier §2.2.2.2 does not define. 0x81.
    #[error("unknown property identifier {0:#04x}")]
    UnknownProperty(u32),
    /// A property not valid in this packet or in the Will (§2.2.2.2). 0x81.
    #[error("property {property:?} not allowed in {context:?}")]
    PropertyNotAllowed {
        /// The property.
        property: PropertyId,
        /// Where it appeared.
        context: Context,
    },
    /// A property present more than once where it may appear only once. 0x82.
    #[error("property {0:?} more than once")]
    DuplicateProperty(PropertyId),
    /// The Property Length does not match the properties: it runs past the
    /// packet, or a property runs past it (§2.2.2.1). 0x81.
    #[error("property length does not match the properties")]
    PropertyLengthMismatch,
    /// Payload Format Indicator other than 0 or 1 (§3.3.2.3.2, §3.1.3.2.3).
    /// Those sections define only 0 and 1 without naming a code for the
    /// rest; 0x82, as the sections of the other byte flags say.
    #[error("payload format indicator {0}")]
    InvalidPayloadFormatIndicator(u8),
    /// Request Problem Information other than 0 or 1 (§3.1.2.11.7). 0x82.
    #[error("request problem information {0}")]
    InvalidRequestProblemInformation(u8),
    /// Request Response Information other than 0 or 1 (§3.1.2.11.6). 0x82.
    #[error("request response information {0}")]
    InvalidRequestResponseInformation(u8),
    /// Another byte flag (the CONNACK-only availability flags) other than 0 or
    /// 1 (§3.2.2.3.5, §3.2.2.3.11 to §3.2.2.3.13). 0x82.
    #[error("property {property:?} with value {value}")]
    InvalidFlagProperty {
        /// The property.
        property: PropertyId,
        /// The value received.
        value: u8,
    },
    /// Maximum QoS other than 0 or 1 (§3.2.2.3.4). 0x82.
    #[error("maximum QoS {0}")]
    InvalidMaximumQoS(u8),
    /// Receive Maximum 0 (§3.1.2.11.3). 0x82.
    #[error("receive maximum 0")]
    ZeroReceiveMaximum,
    /// Maximum Packet Size 0 (§3.1.2.11.4). 0x82.
    #[error("maximum packet size 0")]
    ZeroMaximumPacketSize,
    /// Topic Alias 0 (MQTT-3.3.2-8). 0x94.
    #[error("topic alias 0")]
    ZeroTopicAlias,
    /// Subscription Identifier 0 (§3.8.2.1.2). 0x82.
    #[error("subscription identifier 0")]
    ZeroSubscriptionIdentifier,
    /// A PUBLISH from a client with a Subscription Identifier (MQTT-3.3.4-6).
    /// 0x82.
    #[error("subscription identifier in a PUBLISH from a client")]
    SubscriptionIdentifierFromClient,
    /// A PUBLISH with an empty Topic Name and no Topic Alias (§3.3.2.1,
    /// §3.3.2.3.4). 0x82.
    #[error("empty topic name without a topic alias")]
    EmptyTopicWithoutAlias,
    /// Authentication Data without an Authentication Method (§3.1.2.11.10).
    /// 0x82.
    #[error("authentication data without an authentication method")]
    AuthenticationDataWithoutMethod,
    /// An AUTH without an Authentication Method (§3.15.2.2.2). 0x82.
    #[error("AUTH without an authentication method")]
    MissingAuthenticationMethod,
    /// A reason code the packet may carry but only a server sends: in a
    /// DISCONNECT (MQTT-3.14.2-1, the "Sent by" column of §3.14.2.1), in an
    /// AUTH (Success, §3.15.2.1; also its empty short form). 0x82.
    #[error("{packet_type:?} from a client with server-only reason code {reason_code}")]
    ServerOnlyReasonCode {
        /// The packet type.
        packet_type: PacketType,
        /// The reason code received.
        reason_code: ReasonCode,
    },
    /// A reason code this packet may not carry (§2.4). 0x81.
    #[error("reason code {reason_code} not valid in {packet_type:?}")]
    InvalidReasonCode {
        /// The packet type.
        packet_type: PacketType,
        /// The reason code received.
        reason_code: ReasonCode,
    },
}

impl DecodeError {
    /// The Reason Code of the CONNACK (to a CONNECT) or DISCONNECT the server
    /// sends before closing the connection (§4.13).
    pub fn reason_code(&self) -> ReasonCode {
        use DecodeError as E;
        match self {
            E::PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            E::InvalidProtocolName | E::UnsupportedProtocolVersion(_) => {
                ReasonCode::UNSUPPORTED_PROTOCOL_VERSION
            }
            E::ZeroTopicAlias => ReasonCode::TOPIC_ALIAS_INVALID,
            E::UnexpectedPacketType(_)
            | E::ZeroPacketId
            | E::NoTopicFilters
            | E::InvalidSubscriptionQoS
            | E::InvalidRetainHandling
            | E::DuplicateProperty(_)
            | E::InvalidPayloadFormatIndicator(_)
            | E::InvalidRequestProblemInformation(_)
            | E::InvalidRequestResponseInformation(_)
            | E::InvalidFlagProperty { .. }
            | E::InvalidMaximumQoS(_)
            | E::ZeroReceiveMaximum
            | E::ZeroMaximumPacketSize
            | E::ZeroSubscriptionIdentifier
            | E::SubscriptionIdentifierFromClient
            | E::EmptyTopicWithoutAlias
            | E::AuthenticationDataWithoutMethod
            | E::MissingAuthenticationMethod
            | E::ServerOnlyReasonCode { .. } => ReasonCode::PROTOCOL_ERROR,
            E::MalformedVariableByteInteger
            | E::NonMinimalVariableByteInteger
            | E::ReservedPacketType
            | E::InvalidFixedHeaderFlags { .. }
            | E::InvalidPublishQoS
            | E::DupWithQoS0
            | E::InvalidUtf8
            | E::Truncated
            | E::TrailingBytes
            | E::ReservedSubscriptionOptions(_)
            | E::ReservedConnectFlag
            | E::InvalidWillQoS
            | E::WillFlagsWithoutWill
            | E::UnknownProperty(_)
            | E::PropertyNotAllowed { .. }
            | E::PropertyLengthMismatch
            | E::InvalidReasonCode { .. } => ReasonCode::MALFORMED_PACKET,
        }
    }
}

/// Decodes the packet at the front of `buf`.
///
/// Returns `Ok(None)` while the packet is incomplete (nothing consumed: read
/// more and call again), `Ok(Some(packet))` after consuming exactly its bytes.
/// `max_packet_size` bounds the whole packet, fixed header included (the
/// Maximum Packet Size the server announces in CONNACK, §3.2.2.3.6).
///
/// # Errors
///
/// Any [`DecodeError`]: close the connection, after a CONNACK or DISCONNECT
/// with [`DecodeError::reason_code`]. Nothing is consumed.
pub fn decode(buf: &mut BytesMut, max_packet_size: usize) -> Result<Option<Packet>, DecodeError> {
    let Some(frame_len) = peek_frame_len(buf, max_packet_size)? else {
        return Ok(None);
    };
    let Some(frame) = buf.get(..frame_len) else {
        return Ok(None);
    };
    let packet = decode_frame(frame)?;
    buf.advance(frame_len);
    Ok(Some(packet))
}

/// Reads the fixed header at the front of `buf` and returns the length of the
/// whole packet; `Ok(None)` while the fixed header is incomplete. The type and
/// flags are checked as soon as the first byte is there.
///
/// # Errors
///
/// The fixed header's errors ([`DecodeError::ReservedPacketType`],
/// [`DecodeError::UnexpectedPacketType`],
/// [`DecodeError::InvalidFixedHeaderFlags`], [`DecodeError::InvalidPublishQoS`],
/// [`DecodeError::DupWithQoS0`]), the Remaining Length's
/// ([`DecodeError::MalformedVariableByteInteger`],
/// [`DecodeError::NonMinimalVariableByteInteger`]) and
/// [`DecodeError::PacketTooLarge`].
pub fn peek_frame_len(buf: &[u8], max_packet_size: usize) -> Result<Option<usize>, DecodeError> {
    let Some((&first, rest)) = buf.split_first() else {
        return Ok(None);
    };
    check_fixed_header(first)?;
    let Some((remaining_length, length_bytes)) = decode_variable_byte_integer(rest)? else {
        return Ok(None);
    };
    let size = 1 + length_bytes + remaining_length as usize;
    if size > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: max_packet_size,
        });
    }
    Ok(Some(size))
}

/// Decodes a Variable Byte Integer (§1.5.5) at the front of `bytes`: `(value,
/// bytes used)`, `None` when more bytes are needed. Unlike MQTT 3.1.1's
/// Remaining Length ([`codec::decode_remaining_length`], which this wraps),
/// the encoding must be minimal (MQTT-1.5.5-1).
///
/// # Errors
///
/// [`DecodeError::MalformedVariableByteInteger`] when the fourth byte
/// continues, [`DecodeError::NonMinimalVariableByteInteger`] when fewer bytes
/// would do (e.g. `0x80 0x00` for 0).
pub fn decode_variable_byte_integer(bytes: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let Some((value, used)) = codec::decode_remaining_length(bytes)
        .map_err(|_| DecodeError::MalformedVariableByteInteger)?
    else {
        return Ok(None);
    };
    if codec::remaining_length_len(value) != used {
        return Err(DecodeError::NonMinimalVariableByteInteger);
    }
    // Four bytes of seven bits: at most 268,435,455, which fits a u32.
    let value = u32::try_from(value).map_err(|_| DecodeError::MalformedVariableByteInteger)?;
    Ok(Some((value, used)))
}

/// Checks the first byte of a fixed header: a packet type a server receives,
/// with the flags it requires (§2.1.3).
fn check_fixed_header(first: u8) -> Result<PacketType, DecodeError> {
    let packet_type = PacketType::from_u8(first >> 4).ok_or(DecodeError::ReservedPacketType)?;
    let flags = first & 0x0F;
    match packet_type {
        PacketType::ConnAck | PacketType::SubAck | PacketType::UnsubAck | PacketType::PingResp => {
            Err(DecodeError::UnexpectedPacketType(packet_type))
        }
        PacketType::Publish => publish_flags(flags).map(|_| packet_type),
        _ if packet_type.required_flags() == Some(flags) => Ok(packet_type),
        _ => Err(DecodeError::InvalidFixedHeaderFlags { packet_type, flags }),
    }
}

/// Splits PUBLISH flags into `(dup, qos, retain)` and checks them.
fn publish_flags(flags: u8) -> Result<(bool, QoS, bool), DecodeError> {
    let qos =
        QoS::from_u8((flags >> PUBLISH_QOS_SHIFT) & 0b11).ok_or(DecodeError::InvalidPublishQoS)?;
    let dup = flags & PUBLISH_DUP != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::DupWithQoS0);
    }
    Ok((dup, qos, flags & PUBLISH_RETAIN != 0))
}

/// Decodes one complete frame whose fixed header was checked.
fn decode_frame(frame: &[u8]) -> Result<Packet, DecodeError> {
    let Some((&first, rest)) = frame.split_first() else {
        return Err(DecodeError::Truncated);
    };
    let packet_type = check_fixed_header(first)?;
    let Some((_, length_bytes)) = decode_variable_byte_integer(rest)? else {
        return Err(DecodeError::Truncated);
    };
    let body = rest.get(length_bytes..).ok_or(DecodeError::Truncated)?;
    let mut reader = Reader::new(body);
    let packet = match packet_type {
        PacketType::Connect => Packet::Connect(Box::new(decode_connect(&mut reader)?)),
        PacketType::Publish => Packet::Publish(decode_publish(first & 0x0F, &mut reader)?),
        PacketType::PubAck => Packet::PubAck(decode_ack(packet_type, &mut reader)?),
        PacketType::PubRec => Packet::PubRec(decode_ack(packet_type, &mut reader)?),
        PacketType::PubRel => Packet::PubRel(decode_ack(packet_type, &mut reader)?),
        PacketType::PubComp => Packet::PubComp(decode_ack(packet_type, &mut reader)?),
        PacketType::Subscribe => Packet::Subscribe(decode_subscribe(&mut reader)?),
        PacketType::Unsubscribe => Packet::Unsubscribe(decode_unsubscribe(&mut reader)?),
        PacketType::PingReq => Packet::PingReq,
        PacketType::Disconnect => {
            Packet::Disconnect(decode_reason_and_properties(packet_type, &mut reader)?)
        }
        PacketType::Auth => Packet::Auth(decode_auth(&mut reader)?),
        PacketType::ConnAck | PacketType::SubAck | PacketType::UnsubAck | PacketType::PingResp => {
            return Err(DecodeError::UnexpectedPacketType(packet_type));
        }
    };
    reader.finish()?;
    Ok(packet)
}

/// Decodes a CONNECT's variable header and payload (§3.1.2, §3.1.3).
fn decode_connect(reader: &mut Reader<'_>) -> Result<Connect, DecodeError> {
    if reader.binary()? != PROTOCOL_NAME {
        return Err(DecodeError::InvalidProtocolName);
    }
    let version = reader.u8()?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedProtocolVersion(version));
    }
    let flags = reader.u8()?;
    if flags & CONNECT_RESERVED != 0 {
        return Err(DecodeError::ReservedConnectFlag);
    }
    let will_flag = flags & CONNECT_WILL != 0;
    let will_retain = flags & CONNECT_WILL_RETAIN != 0;
    let will_qos_bits = (flags >> CONNECT_WILL_QOS_SHIFT) & 0b11;
    if !will_flag && (will_qos_bits != 0 || will_retain) {
        return Err(DecodeError::WillFlagsWithoutWill);
    }
    let will_qos = QoS::from_u8(will_qos_bits).ok_or(DecodeError::InvalidWillQoS)?;
    let keep_alive = reader.u16()?;
    let properties = Properties::decode(reader, Context::Packet(PacketType::Connect))?;
    if properties.contains(PropertyId::AuthenticationData)
        && !properties.contains(PropertyId::AuthenticationMethod)
    {
        return Err(DecodeError::AuthenticationDataWithoutMethod);
    }
    let client_id = reader.string()?;
    let will = if will_flag {
        Some(Will {
            properties: Properties::decode(reader, Context::Will)?,
            topic: reader.string()?,
            payload: reader.bytes()?,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    // Unlike 3.1.1 (MQTT-3.1.2-22), 5.0 allows a password without a user name.
    let username = if flags & CONNECT_USERNAME != 0 {
        Some(reader.string()?)
    } else {
        None
    };
    let password = if flags & CONNECT_PASSWORD != 0 {
        Some(reader.bytes()?)
    } else {
        None
    };
    Ok(Connect {
        clean_start: flags & CONNECT_CLEAN_START != 0,
        keep_alive,
        properties,
        client_id,
        will,
        username,
        password,
    })
}

/// Decodes a PUBLISH's variable header and payload (§3.3.2, §3.3.3).
fn decode_publish(flags: u8, reader: &mut Reader<'_>) -> Result<Publish, DecodeError> {
    let (dup, qos, retain) = publish_flags(flags)?;
    let topic = reader.string()?;
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        reader.non_zero_packet_id()?
    };
    let properties = Properties::decode(reader, Context::Packet(PacketType::Publish))?;
    if properties.contains(PropertyId::SubscriptionIdentifier) {
        return Err(DecodeError::SubscriptionIdentifierFromClient);
    }
    if topic.is_empty() && properties.topic_alias().is_none() {
        return Err(DecodeError::EmptyTopicWithoutAlias);
    }
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        properties,
        payload: Bytes::copy_from_slice(reader.take_rest()),
    })
}

/// Decodes a PUBACK, PUBREC, PUBREL or PUBCOMP (§3.4 to §3.7). Remaining
/// Length 2 is the short form for Success without properties, 3 a reason code
/// without properties (§3.4.2.1, §3.4.2.2.1).
fn decode_ack(packet_type: PacketType, reader: &mut Reader<'_>) -> Result<Ack, DecodeError> {
    let packet_id = reader.u16()?;
    let ReasonAndProperties {
        reason_code,
        properties,
    } = decode_reason_and_properties(packet_type, reader)?;
    Ok(Ack {
        packet_id,
        reason_code,
        properties,
    })
}

/// Decodes an optional reason code and optional properties, as they end a
/// PUBACK, PUBREC, PUBREL, PUBCOMP (after the Packet Identifier) and make a
/// DISCONNECT (§3.14.2): nothing left means Success without properties, one
/// byte a reason code without properties. The reason code must be one the
/// packet may carry (§2.4) and a client may send.
fn decode_reason_and_properties(
    packet_type: PacketType,
    reader: &mut Reader<'_>,
) -> Result<ReasonAndProperties, DecodeError> {
    let reason_code = if reader.is_empty() {
        ReasonCode::SUCCESS
    } else {
        ReasonCode(reader.u8()?)
    };
    if !reason_code.is_valid_for(packet_type) {
        return Err(DecodeError::InvalidReasonCode {
            packet_type,
            reason_code,
        });
    }
    if !reason_code.client_may_send(packet_type) {
        return Err(DecodeError::ServerOnlyReasonCode {
            packet_type,
            reason_code,
        });
    }
    let properties = if reader.is_empty() {
        Properties::new()
    } else {
        Properties::decode(reader, Context::Packet(packet_type))?
    };
    Ok(ReasonAndProperties {
        reason_code,
        properties,
    })
}

/// Decodes an AUTH (§3.15) from a client: Continue authentication or
/// Re-authenticate (the empty short form means Success, which only a server
/// sends), with properties that name the Authentication Method (§3.15.2.2.2).
fn decode_auth(reader: &mut Reader<'_>) -> Result<ReasonAndProperties, DecodeError> {
    let auth = decode_reason_and_properties(PacketType::Auth, reader)?;
    if !auth.properties.contains(PropertyId::AuthenticationMethod) {
        return Err(DecodeError::MissingAuthenticationMethod);
    }
    Ok(auth)
}

/// Decodes a SUBSCRIBE's variable header and payload (§3.8.2, §3.8.3).
fn decode_subscribe(reader: &mut Reader<'_>) -> Result<Subscribe, DecodeError> {
    let packet_id = reader.non_zero_packet_id()?;
    let properties = Properties::decode(reader, Context::Packet(PacketType::Subscribe))?;
    let mut filters = Vec::new();
    while !reader.is_empty() {
        let filter = reader.string()?;
        filters.push((filter, subscription_options(reader.u8()?)?));
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters);
    }
    Ok(Subscribe {
        packet_id,
        properties,
        filters,
    })
}

/// Splits and checks a Subscription Options byte (§3.8.3.1).
fn subscription_options(byte: u8) -> Result<SubscriptionOptions, DecodeError> {
    if byte & OPTION_RESERVED != 0 {
        return Err(DecodeError::ReservedSubscriptionOptions(byte));
    }
    let qos = QoS::from_u8(byte & 0b11).ok_or(DecodeError::InvalidSubscriptionQoS)?;
    let retain_handling = match (byte >> OPTION_RETAIN_HANDLING_SHIFT) & 0b11 {
        0 => RetainHandling::SendAtSubscribe,
        1 => RetainHandling::SendAtSubscribeIfNew,
        2 => RetainHandling::DoNotSend,
        _ => return Err(DecodeError::InvalidRetainHandling),
    };
    Ok(SubscriptionOptions {
        qos,
        no_local: byte & OPTION_NO_LOCAL != 0,
        retain_as_published: byte & OPTION_RETAIN_AS_PUBLISHED != 0,
        retain_handling,
    })
}

/// Decodes an UNSUBSCRIBE's variable header and payload (§3.10.2, §3.10.3).
fn decode_unsubscribe(reader: &mut Reader<'_>) -> Result<Unsubscribe, DecodeError> {
    let packet_id = reader.non_zero_packet_id()?;
    let properties = Properties::decode(reader, Context::Packet(PacketType::Unsubscribe))?;
    let mut filters = Vec::new();
    while !reader.is_empty() {
        filters.push(reader.string()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters);
    }
    Ok(Unsubscribe {
        packet_id,
        properties,
        filters,
    })
}

/// A cursor over a packet body (or a property block) that never reads past
/// it: a short body is [`DecodeError::Truncated`], never a panic.
///
/// [`crate::protocol::v3`] has the same cursor privately, returning its own
/// `DecodeError`; this one returns MQTT 5.0's and adds the data types MQTT 5.0
/// introduced (Four Byte Integer, Variable Byte Integer).
pub(super) struct Reader<'a> {
    /// The bytes not read yet.
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A cursor at the start of `bytes`.
    pub(super) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { rest: bytes }
    }

    /// Whether every byte was read.
    pub(super) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Reads `len` bytes.
    pub(super) fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        let (taken, rest) = self
            .rest
            .split_at_checked(len)
            .ok_or(DecodeError::Truncated)?;
        self.rest = rest;
        Ok(taken)
    }

    /// Reads every byte left (a PUBLISH payload has no length prefix).
    fn take_rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// Reads `N` bytes as an array.
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N)?;
        <[u8; N]>::try_from(bytes).map_err(|_| DecodeError::Truncated)
    }

    /// Reads a Byte (§1.5.1).
    pub(super) fn u8(&mut self) -> Result<u8, DecodeError> {
        self.array::<1>().map(|[byte]| byte)
    }

    /// Reads a Two Byte Integer, big-endian (§1.5.2).
    pub(super) fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }

    /// Reads a Four Byte Integer, big-endian (§1.5.3).
    pub(super) fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_be_bytes)
    }

    /// Reads a Variable Byte Integer in its minimal form (§1.5.5).
    pub(super) fn variable(&mut self) -> Result<u32, DecodeError> {
        let (value, used) =
            decode_variable_byte_integer(self.rest)?.ok_or(DecodeError::Truncated)?;
        self.take(used)?;
        Ok(value)
    }

    /// Reads a Packet Identifier that must not be 0 (MQTT-2.2.1-3).
    fn non_zero_packet_id(&mut self) -> Result<PacketId, DecodeError> {
        match self.u16()? {
            0 => Err(DecodeError::ZeroPacketId),
            id => Ok(id),
        }
    }

    /// Reads Binary Data with its two-byte length (§1.5.6).
    fn binary(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// Reads Binary Data, copied out of the read buffer.
    pub(super) fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        self.binary().map(Bytes::copy_from_slice)
    }

    /// Reads a UTF-8 Encoded String (§1.5.4): valid UTF-8 (so no surrogates)
    /// without U+0000 (which in UTF-8 only a zero byte encodes), copied out of
    /// the read buffer.
    pub(super) fn string(&mut self) -> Result<ByteString, DecodeError> {
        let raw = self.binary()?;
        if raw.contains(&0) {
            return Err(DecodeError::InvalidUtf8);
        }
        std::str::from_utf8(raw)
            .map(ByteString::from)
            .map_err(|_| DecodeError::InvalidUtf8)
    }

    /// Checks that nothing is left after the last field.
    fn finish(&self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::{NonZeroU16, NonZeroU32};

    use super::super::Property;
    use super::super::tests::{BIG, cat, decode_all, decode_err, frame, props, string};
    use super::*;

    /// First bytes of the client packets, with their required flags.
    const CONNECT: u8 = 0x10;
    const PUBLISH: u8 = 0x30;
    const PUBACK: u8 = 0x40;
    const PUBREC: u8 = 0x50;
    const PUBREL: u8 = 0x62;
    const PUBCOMP: u8 = 0x70;
    const SUBSCRIBE: u8 = 0x82;
    const UNSUBSCRIBE: u8 = 0xA2;
    const PINGREQ: u8 = 0xC0;
    const DISCONNECT: u8 = 0xE0;
    const AUTH: u8 = 0xF0;

    /// Expects `bytes` to fail with `error`, whose reason code is `reason`.
    fn refused(bytes: &[u8], error: DecodeError, reason: ReasonCode) {
        assert_eq!(decode_err(bytes), error, "{bytes:02x?}");
        assert_eq!(error.reason_code(), reason, "{error:?}");
    }

    /// A CONNECT body: "MQTT" level 5, `flags`, keep alive 60, `properties`
    /// (a whole block), client id "c", then `rest`.
    fn connect_body(flags: u8, properties: &[u8], rest: &[u8]) -> Vec<u8> {
        cat(&[
            &string(b"MQTT"),
            &[5, flags, 0, 60],
            properties,
            &string(b"c"),
            rest,
        ])
    }

    #[test]
    fn variable_byte_integers_must_be_minimal() {
        let cases: [(u32, &[u8]); 8] = [
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
            assert_eq!(
                decode_variable_byte_integer(encoded),
                Ok(Some((value, encoded.len())))
            );
            for cut in 0..encoded.len() {
                assert_eq!(decode_variable_byte_integer(&encoded[..cut]), Ok(None));
            }
        }
        let non_minimal: [&[u8]; 4] = [
            &[0x80, 0x00],
            &[0xFF, 0x00],
            &[0x80, 0x80, 0x00],
            &[0x81, 0x80, 0x80, 0x00],
        ];
        for encoded in non_minimal {
            assert_eq!(
                decode_variable_byte_integer(encoded),
                Err(DecodeError::NonMinimalVariableByteInteger)
            );
        }
        assert_eq!(
            decode_variable_byte_integer(&[0x80, 0x80, 0x80, 0x80]),
            Err(DecodeError::MalformedVariableByteInteger)
        );
        let malformed = ReasonCode::MALFORMED_PACKET;
        refused(
            &[PINGREQ, 0x80, 0x00],
            DecodeError::NonMinimalVariableByteInteger,
            malformed,
        );
        refused(
            &[PINGREQ, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            DecodeError::MalformedVariableByteInteger,
            malformed,
        );
    }

    #[test]
    fn packet_too_large_is_reported_before_the_bytes_arrive() {
        let mut buf = BytesMut::from(&[PUBLISH, 0xC8, 0x01][..]);
        let error = decode(&mut buf, 202).expect_err("too large");
        assert_eq!(
            error,
            DecodeError::PacketTooLarge {
                size: 203,
                max: 202
            }
        );
        assert_eq!(error.reason_code(), ReasonCode::PACKET_TOO_LARGE);
        assert_eq!(buf.len(), 3);
        assert_eq!(decode(&mut buf, 203), Ok(None));
        assert_eq!(peek_frame_len(&[PUBLISH, 0xC8, 0x01], BIG), Ok(Some(203)));
        assert_eq!(peek_frame_len(&[PUBLISH, 0xC8], BIG), Ok(None));
        assert_eq!(peek_frame_len(&[], BIG), Ok(None));
    }

    #[test]
    fn fixed_header_errors() {
        use DecodeError as E;
        let malformed = ReasonCode::MALFORMED_PACKET;
        refused(&[0x00, 0], E::ReservedPacketType, malformed);
        for packet_type in [
            PacketType::ConnAck,
            PacketType::SubAck,
            PacketType::UnsubAck,
            PacketType::PingResp,
        ] {
            refused(
                &[packet_type.first_byte(), 0],
                E::UnexpectedPacketType(packet_type),
                ReasonCode::PROTOCOL_ERROR,
            );
        }
        let bad_flags = [
            (PacketType::PubRel, 0x60),
            (PacketType::Subscribe, 0x80),
            (PacketType::Unsubscribe, 0xA3),
            (PacketType::PubAck, 0x42),
            (PacketType::PingReq, 0xC1),
            (PacketType::Disconnect, 0xE8),
            (PacketType::Auth, 0xF2),
            (PacketType::Connect, 0x11),
        ];
        for (packet_type, first) in bad_flags {
            let flags = first & 0x0F;
            refused(
                &[first, 0],
                E::InvalidFixedHeaderFlags { packet_type, flags },
                malformed,
            );
        }
        refused(
            &frame(PUBLISH | 0b0110, &string(b"t")),
            E::InvalidPublishQoS,
            malformed,
        );
        refused(
            &frame(PUBLISH | 0b1000, &string(b"t")),
            E::DupWithQoS0,
            malformed,
        );
    }

    #[test]
    fn incomplete_input_at_every_split_point() {
        let samples = [
            frame(
                CONNECT,
                &connect_body(
                    0xC6,
                    &props(&[0x11, 0, 0, 0, 9]),
                    &cat(&[
                        &props(&[0x18, 0, 0, 0, 1]),
                        &string(b"w"),
                        &string(b"bye"),
                        &string(b"user"),
                        &string(b"pw"),
                    ]),
                ),
            ),
            frame(
                PUBLISH | 0b0100,
                &cat(&[&string(b"a/b"), &[0, 9], &props(&[0x01, 1]), &[7; 300]]),
            ),
            frame(
                SUBSCRIBE,
                &cat(&[&[0, 1], &props(&[0x0B, 5]), &string(b"x"), &[0x2D]]),
            ),
            frame(UNSUBSCRIBE, &cat(&[&[0, 1], &props(&[]), &string(b"x")])),
            vec![PUBREL, 3, 0, 5, 0x92],
            vec![PINGREQ, 0],
            vec![DISCONNECT, 0],
            frame(
                AUTH,
                &cat(&[&[0x18], &props(&cat(&[&[0x15], &string(b"m")]))]),
            ),
        ];
        for sample in samples {
            for cut in 0..sample.len() {
                let mut buf = BytesMut::from(&sample[..cut]);
                assert_eq!(
                    decode(&mut buf, BIG),
                    Ok(None),
                    "cut {cut} of {sample:02x?}"
                );
                assert_eq!(buf.len(), cut);
            }
            let mut buf = BytesMut::from(&sample[..]);
            buf.extend_from_slice(&sample);
            assert!(
                matches!(decode(&mut buf, BIG), Ok(Some(_))),
                "{sample:02x?}"
            );
            assert_eq!(buf.len(), sample.len());
            assert!(matches!(decode(&mut buf, BIG), Ok(Some(_))));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn connect_with_everything() {
        let connect_properties = cat(&[
            &[0x11, 0, 0, 0x0E, 0x10],
            &[0x21, 0, 10],
            &[0x27, 0, 1, 0, 0],
            &[0x22, 0, 5],
            &[0x19, 1],
            &[0x17, 0],
            &[0x26],
            &string(b"k"),
            &string(b"v"),
            &[0x15],
            &string(b"PLAIN"),
            &[0x16],
            &string(b"\x00tok"),
        ]);
        let will_properties = cat(&[&[0x18, 0, 0, 0, 30, 0x01, 1, 0x03], &string(b"text/plain")]);
        // User Name, Password, Will Retain, Will QoS 2, Will, Clean Start.
        let bytes = frame(
            CONNECT,
            &connect_body(
                0b1111_0110,
                &props(&connect_properties),
                &cat(&[
                    &props(&will_properties),
                    &string(b"will/t"),
                    &string(b"\xFFgone"),
                    &string(b"alice"),
                    &string(b"secret"),
                ]),
            ),
        );
        let Ok(Packet::Connect(connect)) = decode_all(&bytes) else {
            panic!("not a CONNECT");
        };
        assert!(connect.clean_start);
        assert_eq!(connect.keep_alive, 60);
        assert_eq!(&connect.client_id[..], "c");
        let p = &connect.properties;
        assert_eq!(p.session_expiry_interval(), Some(3600));
        assert_eq!(p.receive_maximum(), NonZeroU16::new(10));
        assert_eq!(p.maximum_packet_size(), NonZeroU32::new(65_536));
        assert_eq!(p.topic_alias_maximum(), Some(5));
        assert_eq!(p.request_response_information(), Some(true));
        assert_eq!(p.request_problem_information(), Some(false));
        assert_eq!(p.authentication_method().map(|m| &m[..]), Some("PLAIN"));
        assert_eq!(
            p.authentication_data().map(|d| &d[..]),
            Some(&b"\x00tok"[..])
        );
        assert_eq!(p.user_properties().count(), 1);
        let will = connect.will.as_ref().expect("will");
        assert_eq!(will.qos, QoS::ExactlyOnce);
        assert!(will.retain);
        assert_eq!(&will.topic[..], "will/t");
        assert_eq!(&will.payload[..], b"\xFFgone");
        assert_eq!(will.properties.will_delay_interval(), Some(30));
        assert_eq!(will.properties.payload_format_indicator(), Some(true));
        // It promises UTF-8 and sends 0xFF: the caller may refuse with 0x99.
        assert!(!will.payload_is_utf8());
        assert_eq!(
            will.properties.content_type().map(|c| &c[..]),
            Some("text/plain")
        );
        assert_eq!(connect.username.as_deref(), Some("alice"));
        assert_eq!(connect.password.as_deref(), Some(&b"secret"[..]));
    }

    #[test]
    fn connect_minimal_and_password_without_username() {
        let Ok(Packet::Connect(connect)) = decode_all(&frame(CONNECT, &connect_body(0, &[0], &[])))
        else {
            panic!("not a CONNECT");
        };
        assert!(!connect.clean_start && connect.will.is_none() && connect.properties.is_empty());
        assert_eq!((connect.username, connect.password), (None, None));
        // Allowed in 5.0 (§3.1.2.9), unlike 3.1.1.
        let bytes = frame(CONNECT, &connect_body(0b0100_0000, &[0], &string(b"pw")));
        let Ok(Packet::Connect(connect)) = decode_all(&bytes) else {
            panic!("not a CONNECT");
        };
        assert_eq!(connect.username, None);
        assert_eq!(connect.password.as_deref(), Some(&b"pw"[..]));
    }

    #[test]
    fn connect_errors() {
        use DecodeError as E;
        let malformed = ReasonCode::MALFORMED_PACKET;
        let protocol = ReasonCode::PROTOCOL_ERROR;
        let unsupported = ReasonCode::UNSUPPORTED_PROTOCOL_VERSION;
        let mut wrong_name = connect_body(0, &[0], &[]);
        wrong_name[2..6].copy_from_slice(b"MQTX");
        refused(
            &frame(CONNECT, &wrong_name),
            E::InvalidProtocolName,
            unsupported,
        );
        for level in [3, 4, 6] {
            let mut body = connect_body(0, &[0], &[]);
            body[6] = level;
            refused(
                &frame(CONNECT, &body),
                E::UnsupportedProtocolVersion(level),
                unsupported,
            );
        }
        let cases: [(u8, DecodeError, ReasonCode); 5] = [
            (0b0000_0001, E::ReservedConnectFlag, malformed),
            (0b0001_1100, E::InvalidWillQoS, malformed),
            (0b0000_1000, E::WillFlagsWithoutWill, malformed),
            (0b0001_0000, E::WillFlagsWithoutWill, malformed),
            (0b0010_0000, E::WillFlagsWithoutWill, malformed),
        ];
        for (flags, error, reason) in cases {
            refused(
                &frame(CONNECT, &connect_body(flags, &[0], &[])),
                error,
                reason,
            );
        }
        let data_only = props(&cat(&[&[0x16], &string(b"x")]));
        refused(
            &frame(CONNECT, &connect_body(0, &data_only, &[])),
            E::AuthenticationDataWithoutMethod,
            protocol,
        );
        refused(
            &frame(CONNECT, &connect_body(0, &props(&[0x17, 2]), &[])),
            E::InvalidRequestProblemInformation(2),
            protocol,
        );
        refused(
            &frame(CONNECT, &connect_body(0, &props(&[0x23, 0, 1]), &[])),
            E::PropertyNotAllowed {
                property: PropertyId::TopicAlias,
                context: Context::Packet(PacketType::Connect),
            },
            malformed,
        );
        // A CONNECT property in the Will Properties.
        let will = cat(&[&props(&[0x11, 0, 0, 0, 1]), &string(b"t"), &string(b"")]);
        refused(
            &frame(CONNECT, &connect_body(0b0000_0100, &[0], &will)),
            E::PropertyNotAllowed {
                property: PropertyId::SessionExpiryInterval,
                context: Context::Will,
            },
            malformed,
        );
        // Flags promise a user name that is not there; a byte too many.
        refused(
            &frame(CONNECT, &connect_body(0x80, &[0], &[])),
            E::Truncated,
            malformed,
        );
        refused(
            &frame(CONNECT, &connect_body(0, &[0], &[0])),
            E::TrailingBytes,
            malformed,
        );
        let bad_id = cat(&[&string(b"MQTT"), &[5, 0, 0, 60, 0], &string(b"a\x00")]);
        refused(&frame(CONNECT, &bad_id), E::InvalidUtf8, malformed);
        let bad_user = connect_body(0x80, &[0], &string(b"\xC3"));
        refused(&frame(CONNECT, &bad_user), E::InvalidUtf8, malformed);
    }

    #[test]
    fn publish_with_properties() {
        let properties = cat(&[
            &[0x01, 1, 0x02, 0, 0, 0, 10, 0x23, 0, 7, 0x08],
            &string(b"re/ply"),
            &[0x09],
            &string(b"\x01\x02"),
            &[0x26],
            &string(b"a"),
            &string(b"1"),
            &[0x26],
            &string(b"a"),
            &string(b"2"),
            &[0x03],
            &string(b"json"),
        ]);
        let bytes = frame(
            PUBLISH | 0b1011,
            &cat(&[&string(b"a/b"), &[0x12, 0x34], &props(&properties), b"{}"]),
        );
        let Ok(Packet::Publish(publish)) = decode_all(&bytes) else {
            panic!("not a PUBLISH");
        };
        assert!(publish.dup && publish.retain);
        assert_eq!(publish.qos, QoS::AtLeastOnce);
        assert_eq!(publish.packet_id, 0x1234);
        assert_eq!(&publish.topic[..], "a/b");
        assert_eq!(&publish.payload[..], b"{}");
        let p = &publish.properties;
        assert_eq!(p.payload_format_indicator(), Some(true));
        assert_eq!(p.message_expiry_interval(), Some(10));
        assert_eq!(p.topic_alias(), NonZeroU16::new(7));
        assert_eq!(p.response_topic().map(|t| &t[..]), Some("re/ply"));
        assert_eq!(p.correlation_data().map(|d| &d[..]), Some(&[1u8, 2][..]));
        assert_eq!(p.content_type().map(|t| &t[..]), Some("json"));
        let values: Vec<_> = p.user_properties().map(|(_, v)| &v[..]).collect();
        assert_eq!(values, ["1", "2"]);
        assert!(publish.payload_is_utf8());
    }

    #[test]
    fn publish_rules() {
        use DecodeError as E;
        let protocol = ReasonCode::PROTOCOL_ERROR;
        // An empty topic is fine with a Topic Alias, not without.
        let aliased = frame(PUBLISH, &cat(&[&string(b""), &props(&[0x23, 0, 1]), b"x"]));
        let Ok(Packet::Publish(publish)) = decode_all(&aliased) else {
            panic!("not a PUBLISH");
        };
        assert!(publish.topic.is_empty());
        refused(
            &frame(PUBLISH, &cat(&[&string(b""), &[0], b"x"])),
            E::EmptyTopicWithoutAlias,
            protocol,
        );
        refused(
            &frame(PUBLISH, &cat(&[&string(b"t"), &props(&[0x23, 0, 0])])),
            E::ZeroTopicAlias,
            ReasonCode::TOPIC_ALIAS_INVALID,
        );
        refused(
            &frame(PUBLISH, &cat(&[&string(b"t"), &props(&[0x0B, 1])])),
            E::SubscriptionIdentifierFromClient,
            protocol,
        );
        refused(
            &frame(PUBLISH | 0b0010, &cat(&[&string(b"t"), &[0, 0], &[0]])),
            E::ZeroPacketId,
            protocol,
        );
        refused(
            &frame(PUBLISH, &cat(&[&string(b"t"), &props(&[0x01, 2])])),
            E::InvalidPayloadFormatIndicator(2),
            protocol,
        );
        refused(
            &frame(PUBLISH, &cat(&[&string(b"t"), &props(&[0x11, 0, 0, 0, 0])])),
            E::PropertyNotAllowed {
                property: PropertyId::SessionExpiryInterval,
                context: Context::Packet(PacketType::Publish),
            },
            ReasonCode::MALFORMED_PACKET,
        );
        // The Property Length is not optional in a PUBLISH.
        refused(
            &frame(PUBLISH, &string(b"t")),
            E::Truncated,
            ReasonCode::MALFORMED_PACKET,
        );
        // A promise of UTF-8 that the payload breaks is the caller's call.
        let bytes = frame(PUBLISH, &cat(&[&string(b"t"), &props(&[0x01, 1]), b"\xFF"]));
        let Ok(Packet::Publish(publish)) = decode_all(&bytes) else {
            panic!("not a PUBLISH");
        };
        assert!(!publish.payload_is_utf8());
    }

    #[test]
    fn decoded_data_is_copied_out_of_the_read_buffer() {
        let bytes = frame(
            PUBLISH,
            &cat(&[
                &string(b"t"),
                &props(&cat(&[&[0x08], &string(b"r")])),
                b"payload",
            ]),
        );
        let mut buf = BytesMut::from(&bytes[..]);
        let range = buf.as_ptr_range();
        let Ok(Some(Packet::Publish(publish))) = decode(&mut buf, BIG) else {
            panic!("not a PUBLISH");
        };
        let response = publish.properties.response_topic().expect("response topic");
        for slice in [
            &publish.payload[..],
            publish.topic.as_bytes(),
            response.as_bytes(),
        ] {
            assert!(!range.contains(&slice.as_ptr()), "shares the read buffer");
        }
    }

    #[test]
    fn acknowledgements_and_their_short_forms() {
        use DecodeError as E;
        let ack = |reason: u8, properties: Properties| Ack {
            packet_id: 7,
            reason_code: ReasonCode(reason),
            properties,
        };
        let reason_string = cat(&[&[0x1F], &string(b"why")]);
        let with_reason_string =
            Properties::new().with(Property::ReasonString(ByteString::from("why")));
        for first in [PUBACK, PUBREC, PUBREL, PUBCOMP] {
            let wrap = |a: Ack| match first {
                PUBACK => Packet::PubAck(a),
                PUBREC => Packet::PubRec(a),
                PUBREL => Packet::PubRel(a),
                _ => Packet::PubComp(a),
            };
            assert_eq!(decode_all(&[first, 2, 0, 7]), Ok(wrap(Ack::success(7))));
            assert_eq!(decode_all(&[first, 3, 0, 7, 0]), Ok(wrap(Ack::success(7))));
            assert_eq!(
                decode_all(&[first, 4, 0, 7, 0, 0]),
                Ok(wrap(Ack::success(7)))
            );
            let failure = if first == PUBACK || first == PUBREC {
                0x80
            } else {
                0x92
            };
            assert_eq!(
                decode_all(&[first, 3, 0, 7, failure]),
                Ok(wrap(ack(failure, Properties::new())))
            );
            let bytes = frame(first, &cat(&[&[0, 7, failure], &props(&reason_string)]));
            assert_eq!(
                decode_all(&bytes),
                Ok(wrap(ack(failure, with_reason_string.clone())))
            );
            let packet_type = PacketType::from_u8(first >> 4).expect("ack type");
            let wrong = if failure == 0x92 { 0x80 } else { 0x92 };
            refused(
                &[first, 3, 0, 7, wrong],
                E::InvalidReasonCode {
                    packet_type,
                    reason_code: ReasonCode(wrong),
                },
                ReasonCode::MALFORMED_PACKET,
            );
            refused(
                &frame(first, &cat(&[&[0, 7, 0], &props(&[0x01, 0])])),
                E::PropertyNotAllowed {
                    property: PropertyId::PayloadFormatIndicator,
                    context: Context::Packet(packet_type),
                },
                ReasonCode::MALFORMED_PACKET,
            );
            refused(&[first, 1, 0], E::Truncated, ReasonCode::MALFORMED_PACKET);
            refused(
                &[first, 5, 0, 7, 0, 0, 0],
                E::TrailingBytes,
                ReasonCode::MALFORMED_PACKET,
            );
        }
        assert_eq!(
            decode_all(&[PUBACK, 3, 0, 7, 0x10]),
            Ok(Packet::PubAck(ack(0x10, Properties::new())))
        );
    }

    #[test]
    fn subscribe_options_and_properties() {
        let options = [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x2E];
        let mut body = cat(&[
            &[0, 9],
            &props(&cat(&[
                &[0x0B, 0x80, 0x01, 0x26],
                &string(b"k"),
                &string(b"v"),
            ])),
        ]);
        for &option in &options {
            body.extend(cat(&[&string(b"f/+"), &[option]]));
        }
        let Ok(Packet::Subscribe(subscribe)) = decode_all(&frame(SUBSCRIBE, &body)) else {
            panic!("not a SUBSCRIBE");
        };
        assert_eq!(subscribe.packet_id, 9);
        assert_eq!(subscribe.subscription_identifier(), NonZeroU32::new(128));
        assert_eq!(subscribe.filters.len(), options.len());
        let last = subscribe.filters[7].1;
        assert_eq!(
            last,
            SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: RetainHandling::DoNotSend,
            }
        );
        assert_eq!(
            subscribe.filters[6].1.retain_handling,
            RetainHandling::DoNotSend
        );
        assert_eq!(
            subscribe.filters[5].1.retain_handling,
            RetainHandling::SendAtSubscribeIfNew
        );
        assert!(subscribe.filters[3].1.no_local);
        assert!(subscribe.filters[4].1.retain_as_published);
        assert_eq!(subscribe.filters[0].1.qos, QoS::AtMostOnce);
        assert_eq!(
            subscribe.filters[0].1.retain_handling,
            RetainHandling::SendAtSubscribe
        );
        assert_eq!(&subscribe.filters[0].0[..], "f/+");
    }

    #[test]
    fn subscribe_errors() {
        use DecodeError as E;
        let malformed = ReasonCode::MALFORMED_PACKET;
        let protocol = ReasonCode::PROTOCOL_ERROR;
        let with_option =
            |option: u8| frame(SUBSCRIBE, &cat(&[&[0, 1, 0], &string(b"f"), &[option]]));
        refused(
            &with_option(0x40),
            E::ReservedSubscriptionOptions(0x40),
            malformed,
        );
        refused(
            &with_option(0x80),
            E::ReservedSubscriptionOptions(0x80),
            malformed,
        );
        refused(&with_option(0x03), E::InvalidSubscriptionQoS, protocol);
        refused(&with_option(0x30), E::InvalidRetainHandling, protocol);
        refused(&frame(SUBSCRIBE, &[0, 1, 0]), E::NoTopicFilters, protocol);
        refused(
            &frame(SUBSCRIBE, &cat(&[&[0, 0, 0], &string(b"f"), &[0]])),
            E::ZeroPacketId,
            protocol,
        );
        refused(
            &frame(
                SUBSCRIBE,
                &cat(&[&[0, 1], &props(&[0x0B, 0]), &string(b"f"), &[0]]),
            ),
            E::ZeroSubscriptionIdentifier,
            protocol,
        );
        refused(
            &frame(
                SUBSCRIBE,
                &cat(&[&[0, 1], &props(&[0x0B, 1, 0x0B, 2]), &string(b"f"), &[0]]),
            ),
            E::DuplicateProperty(PropertyId::SubscriptionIdentifier),
            protocol,
        );
        // A filter without its options byte.
        refused(
            &frame(SUBSCRIBE, &cat(&[&[0, 1, 0], &string(b"f")])),
            E::Truncated,
            malformed,
        );
    }

    #[test]
    fn unsubscribe() {
        use DecodeError as E;
        let body = cat(&[
            &[0, 4],
            &props(&cat(&[&[0x26], &string(b"k"), &string(b"v")])),
            &string(b"a"),
            &string(b"b/#"),
        ]);
        let Ok(Packet::Unsubscribe(unsubscribe)) = decode_all(&frame(UNSUBSCRIBE, &body)) else {
            panic!("not an UNSUBSCRIBE");
        };
        assert_eq!(unsubscribe.packet_id, 4);
        assert_eq!(unsubscribe.properties.user_properties().count(), 1);
        let filters: Vec<&str> = unsubscribe.filters.iter().map(|f| &f[..]).collect();
        assert_eq!(filters, ["a", "b/#"]);
        refused(
            &frame(UNSUBSCRIBE, &[0, 4, 0]),
            E::NoTopicFilters,
            ReasonCode::PROTOCOL_ERROR,
        );
        refused(
            &frame(UNSUBSCRIBE, &cat(&[&[0, 0, 0], &string(b"a")])),
            E::ZeroPacketId,
            ReasonCode::PROTOCOL_ERROR,
        );
        refused(
            &frame(
                UNSUBSCRIBE,
                &cat(&[&[0, 4], &props(&[0x0B, 1]), &string(b"a")]),
            ),
            E::PropertyNotAllowed {
                property: PropertyId::SubscriptionIdentifier,
                context: Context::Packet(PacketType::Unsubscribe),
            },
            ReasonCode::MALFORMED_PACKET,
        );
    }

    #[test]
    fn pingreq_and_disconnect() {
        use DecodeError as E;
        assert_eq!(decode_all(&[PINGREQ, 0]), Ok(Packet::PingReq));
        refused(
            &[PINGREQ, 1, 0],
            E::TrailingBytes,
            ReasonCode::MALFORMED_PACKET,
        );
        let normal = ReasonAndProperties::default();
        assert_eq!(
            decode_all(&[DISCONNECT, 0]),
            Ok(Packet::Disconnect(normal.clone()))
        );
        assert_eq!(
            decode_all(&[DISCONNECT, 1, 0]),
            Ok(Packet::Disconnect(normal.clone()))
        );
        assert_eq!(
            decode_all(&[DISCONNECT, 2, 0, 0]),
            Ok(Packet::Disconnect(normal))
        );
        assert_eq!(
            decode_all(&[DISCONNECT, 1, 0x04]),
            Ok(Packet::Disconnect(ReasonAndProperties {
                reason_code: ReasonCode::DISCONNECT_WITH_WILL_MESSAGE,
                properties: Properties::new(),
            }))
        );
        let properties = cat(&[
            &[0x11, 0, 0, 0, 5, 0x1F],
            &string(b"bye"),
            &[0x26],
            &string(b"k"),
            &string(b"v"),
            &[0x1C],
            &string(b"elsewhere"),
        ]);
        let Ok(Packet::Disconnect(disconnect)) =
            decode_all(&frame(DISCONNECT, &cat(&[&[0x80], &props(&properties)])))
        else {
            panic!("not a DISCONNECT");
        };
        assert_eq!(disconnect.reason_code, ReasonCode::UNSPECIFIED_ERROR);
        assert_eq!(disconnect.properties.session_expiry_interval(), Some(5));
        assert_eq!(
            disconnect.properties.reason_string().map(|s| &s[..]),
            Some("bye")
        );
        assert_eq!(
            disconnect.properties.server_reference().map(|s| &s[..]),
            Some("elsewhere")
        );
        refused(
            &[DISCONNECT, 1, 0x8E],
            E::ServerOnlyReasonCode {
                packet_type: PacketType::Disconnect,
                reason_code: ReasonCode::SESSION_TAKEN_OVER,
            },
            ReasonCode::PROTOCOL_ERROR,
        );
        refused(
            &[DISCONNECT, 1, 0x18],
            E::InvalidReasonCode {
                packet_type: PacketType::Disconnect,
                reason_code: ReasonCode::CONTINUE_AUTHENTICATION,
            },
            ReasonCode::MALFORMED_PACKET,
        );
        refused(
            &frame(DISCONNECT, &cat(&[&[0], &props(&[0x02, 0, 0, 0, 1])])),
            E::PropertyNotAllowed {
                property: PropertyId::MessageExpiryInterval,
                context: Context::Packet(PacketType::Disconnect),
            },
            ReasonCode::MALFORMED_PACKET,
        );
    }

    #[test]
    fn auth() {
        use DecodeError as E;
        let method = cat(&[&[0x15], &string(b"SCRAM-SHA-1"), &[0x16], &string(b"nonce")]);
        // Success (and so the empty short form) is the server's.
        let success = E::ServerOnlyReasonCode {
            packet_type: PacketType::Auth,
            reason_code: ReasonCode::SUCCESS,
        };
        refused(&[AUTH, 0], success.clone(), ReasonCode::PROTOCOL_ERROR);
        refused(
            &frame(AUTH, &cat(&[&[0], &props(&method)])),
            success,
            ReasonCode::PROTOCOL_ERROR,
        );
        let Ok(Packet::Auth(auth)) = decode_all(&frame(AUTH, &cat(&[&[0x18], &props(&method)])))
        else {
            panic!("not an AUTH");
        };
        assert_eq!(auth.reason_code, ReasonCode::CONTINUE_AUTHENTICATION);
        assert_eq!(
            auth.properties.authentication_method().map(|m| &m[..]),
            Some("SCRAM-SHA-1")
        );
        assert_eq!(
            auth.properties.authentication_data().map(|d| &d[..]),
            Some(&b"nonce"[..])
        );
        let protocol = ReasonCode::PROTOCOL_ERROR;
        refused(
            &[AUTH, 2, 0x19, 0],
            E::MissingAuthenticationMethod,
            protocol,
        );
        refused(&[AUTH, 1, 0x18], E::MissingAuthenticationMethod, protocol);
        refused(
            &frame(
                AUTH,
                &cat(&[&[0x19], &props(&cat(&[&[0x16], &string(b"d")]))]),
            ),
            E::MissingAuthenticationMethod,
            protocol,
        );
        refused(
            &frame(AUTH, &cat(&[&[0x04], &props(&method)])),
            E::InvalidReasonCode {
                packet_type: PacketType::Auth,
                reason_code: ReasonCode::DISCONNECT_WITH_WILL_MESSAGE,
            },
            ReasonCode::MALFORMED_PACKET,
        );
    }

    /// [`super::super::fuzz::decode`] on `bytes` with the largest packet size
    /// it allows; how many packets it decoded.
    fn decode_loop(bytes: &[u8]) -> usize {
        super::super::fuzz::decode(&cat(&[&[0xFF], bytes]))
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = crate::test_rng::XorShift(0x9E37_79B9_7F4A_7C15);
        for _ in 0..20_000 {
            let len = (rng.next() % 48) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            decode_loop(&bytes);
        }
    }

    #[test]
    fn mutated_packets_never_panic() {
        let samples = [
            frame(
                CONNECT,
                &connect_body(
                    0xC6,
                    &props(&[0x11, 0, 0, 0, 9, 0x21, 0, 1]),
                    &cat(&[
                        &props(&[0x18, 0, 0, 0, 1, 0x01, 1]),
                        &string(b"w"),
                        &string(b"bye"),
                        &string(b"user"),
                        &string(b"pw"),
                    ]),
                ),
            ),
            frame(
                PUBLISH | 0b0011,
                &cat(&[
                    &string(b"a/b"),
                    &[0, 9],
                    &props(&cat(&[
                        &[0x01, 1, 0x23, 0, 4, 0x26],
                        &string(b"k"),
                        &string(b"v"),
                    ])),
                    b"data",
                ]),
            ),
            frame(
                SUBSCRIBE,
                &cat(&[
                    &[0, 1],
                    &props(&[0x0B, 5]),
                    &string(b"x"),
                    &[0x2D],
                    &string(b"y"),
                    &[1],
                ]),
            ),
            frame(UNSUBSCRIBE, &cat(&[&[0, 1], &props(&[]), &string(b"x")])),
            frame(
                PUBACK,
                &cat(&[&[0, 5, 0x10], &props(&cat(&[&[0x1F], &string(b"r")]))]),
            ),
            frame(DISCONNECT, &cat(&[&[0x04], &props(&[0x11, 0, 0, 0, 1])])),
            frame(
                AUTH,
                &cat(&[
                    &[0x18],
                    &props(&cat(&[&[0x15], &string(b"m"), &[0x16], &string(b"d")])),
                ]),
            ),
        ];
        let mut rng = crate::test_rng::XorShift(0xDEAD_BEEF_CAFE_F00D);
        let mut decoded = 0;
        for round in 0..20_000 {
            let mut bytes = samples[round % samples.len()].clone();
            for _ in 0..1 + rng.next() % 3 {
                let at = (rng.next() as usize) % bytes.len();
                bytes[at] = rng.next() as u8;
            }
            if rng.next().is_multiple_of(4) {
                bytes.truncate((rng.next() as usize) % (bytes.len() + 1));
            }
            decoded += decode_loop(&bytes);
        }
        // The mutations are small enough that some packets stay valid.
        assert!(decoded > 1000, "{decoded}");
    }
}
