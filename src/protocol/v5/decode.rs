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
//!   method (§3.15.2.2.2), an empty topic without a Topic Alias (§3.3.2.3.4),
//!   a Subscription Identifier from a client (MQTT-3.3.4-6), and packets a
//!   client never sends (CONNACK, SUBACK, UNSUBACK, PINGRESP).
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
use crate::codec::{self, PacketId, QoS};

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
    /// Payload Format Indicator other than 0 or 1 (§3.3.2.3.2). 0x82.
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
    /// A PUBLISH with an empty Topic Name and no Topic Alias (§3.3.2.3.4). 0x82.
    #[error("empty topic name without a topic alias")]
    EmptyTopicWithoutAlias,
    /// Authentication Data without an Authentication Method (§3.1.2.11.10).
    /// 0x82.
    #[error("authentication data without an authentication method")]
    AuthenticationDataWithoutMethod,
    /// An AUTH without an Authentication Method (§3.15.2.2.2). 0x82.
    #[error("AUTH without an authentication method")]
    MissingAuthenticationMethod,
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
            | E::MissingAuthenticationMethod => ReasonCode::PROTOCOL_ERROR,
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
/// byte a reason code without properties.
fn decode_reason_and_properties(
    packet_type: PacketType,
    reader: &mut Reader<'_>,
) -> Result<ReasonAndProperties, DecodeError> {
    if reader.is_empty() {
        return Ok(ReasonAndProperties::default());
    }
    let reason_code = ReasonCode(reader.u8()?);
    if !reason_code.is_valid_for(packet_type) {
        return Err(DecodeError::InvalidReasonCode {
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

/// Decodes an AUTH (§3.15): Remaining Length 0 is Success without properties
/// (§3.15.2.1); otherwise a reason code, then properties that must name the
/// Authentication Method (§3.15.2.2.2).
fn decode_auth(reader: &mut Reader<'_>) -> Result<ReasonAndProperties, DecodeError> {
    if reader.is_empty() {
        return Ok(ReasonAndProperties::default());
    }
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
/// [`crate::codec`] has the same cursor privately, returning its own
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
