//! Encoding what an MQTT 5.0 server sends: CONNACK, PUBLISH, PUBACK, PUBREC,
//! PUBREL, PUBCOMP, SUBACK, UNSUBACK, PINGRESP, DISCONNECT, AUTH.
//!
//! Every function checks before writing and writes nothing on `Err`: the
//! properties must be valid for the packet and not repeated (§2.2.2.2), the
//! reason codes valid for the packet (§2.4), strings at most 65,535 bytes
//! (§1.5.4), the packet at most 268,435,455 bytes of Remaining Length (§2.1.4).
//! Short forms are written where the specification allows them: an
//! acknowledgement with Success and no properties is the 4 bytes MQTT 3.1.1
//! sends (the same as [`crate::protocol::v3::puback`] and its siblings), a DISCONNECT
//! or AUTH with Success and no properties is 2 bytes.
//!
//! Limits that depend on the client are the session's: the client's Maximum
//! Packet Size (§3.1.2.11.4; [`publish_len`] and friends say what a packet
//! takes), its Topic Alias Maximum, and whether it asked for problem
//! information (§3.1.2.11.7).
//!
//! # The shared PUBLISH head
//!
//! In MQTT 5.0 the Packet Identifier sits between the topic and the properties,
//! so [`encode_publish_head`] writes fixed header, topic, a two-byte slot for
//! the Packet Identifier (QoS 1 and 2) and the properties, and returns where the
//! slot is. A subscriber's frame is then `head[..at]`, its own Packet
//! Identifier (big-endian), `head[at + 2..]` and the shared payload; for QoS 0
//! it is `head` then the payload. The head depends on the QoS, the flags and the
//! properties, and the properties may differ per subscriber (Subscription
//! Identifiers, a Topic Alias), so the broker keeps one head per (QoS,
//! properties variant) of a message, as [`crate::protocol::message::Encoded`] keeps one
//! per QoS for MQTT 3.1.1.

use bytes::{BufMut, BytesMut};
use thiserror::Error;

use super::properties::{Context, Properties, PropertyId, put_binary};
use super::{
    Ack, ConnAck, PUBLISH_DUP, PUBLISH_QOS_SHIFT, PUBLISH_RETAIN, PacketType, ReasonAndProperties,
    ReasonCode,
};
use crate::protocol::v3::{self as codec, MAX_REMAINING_LENGTH, PacketId, QoS};

/// PINGRESP is the same bytes in both versions (§3.13): the broker sends
/// [`crate::protocol::v3::PINGRESP_BYTES`]; the tests encode it from here.
#[cfg(test)]
pub use crate::protocol::v3::encode_pingresp;

/// Why a packet cannot be encoded: a bug in what the broker asked for, or a
/// packet at the limits of the protocol. Nothing is written then.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The Remaining Length (or a Property Length) would exceed
    /// [`MAX_REMAINING_LENGTH`] (§1.5.5, §2.1.4).
    #[error("length {0} exceeds {MAX_REMAINING_LENGTH}")]
    RemainingLengthTooLarge(usize),
    /// A string or binary field longer than 65,535 bytes (§1.5.4, §1.5.6).
    #[error("string or binary data of {0} bytes exceeds 65535")]
    StringTooLong(usize),
    /// A Variable Byte Integer value (a Subscription Identifier) above
    /// 268,435,455 (§1.5.5).
    #[error("variable byte integer {0} exceeds {MAX_REMAINING_LENGTH}")]
    VariableByteIntegerTooLarge(u32),
    /// A property not valid in this packet (§2.2.2.2).
    #[error("property {property:?} not allowed in {context:?}")]
    PropertyNotAllowed {
        /// The property.
        property: PropertyId,
        /// The packet it was to be encoded in.
        context: Context,
    },
    /// A property that may appear only once, twice.
    #[error("property {0:?} more than once")]
    DuplicateProperty(PropertyId),
    /// Maximum QoS 2: only 0 or 1 may be sent; absence means 2 (§3.2.2.3.4).
    #[error("maximum QoS 2 must be sent as no Maximum QoS property")]
    MaximumQoS2,
    /// A reason code this packet may not carry (§2.4), or one only a client
    /// sends (Disconnect with Will Message, Re-authenticate).
    #[error("reason code {reason_code} not valid in {packet_type:?} from a server")]
    ReasonCodeNotAllowed {
        /// The packet type.
        packet_type: PacketType,
        /// The reason code.
        reason_code: ReasonCode,
    },
    /// [`encode_ack`] for a packet type that is not PUBACK, PUBREC, PUBREL or
    /// PUBCOMP.
    #[error("{0:?} is not a PUBLISH acknowledgement")]
    NotAnAck(PacketType),
    /// A SUBACK or UNSUBACK without reason codes: it answers a SUBSCRIBE or
    /// UNSUBSCRIBE, which has at least one filter (§3.9.3, §3.11.3).
    #[error("SUBACK or UNSUBACK without reason codes")]
    NoReasonCodes,
    /// A PUBLISH with an empty topic and no Topic Alias (§3.3.2.3.4).
    #[error("PUBLISH with an empty topic and no topic alias")]
    EmptyTopicWithoutAlias,
    /// An AUTH other than the Success short form without an Authentication
    /// Method (§3.15.2.2.2).
    #[error("AUTH without an authentication method")]
    MissingAuthenticationMethod,
}

impl From<codec::EncodeError> for EncodeError {
    fn from(error: codec::EncodeError) -> EncodeError {
        match error {
            codec::EncodeError::RemainingLengthTooLarge(len) => {
                EncodeError::RemainingLengthTooLarge(len)
            }
            codec::EncodeError::StringTooLong(len) => EncodeError::StringTooLong(len),
        }
    }
}

/// Checks a Remaining Length and returns the size of the whole packet.
fn packet_len(remaining_length: usize) -> Result<usize, EncodeError> {
    if remaining_length > MAX_REMAINING_LENGTH {
        return Err(EncodeError::RemainingLengthTooLarge(remaining_length));
    }
    Ok(1 + codec::remaining_length_len(remaining_length) + remaining_length)
}

/// Writes a fixed header whose Remaining Length was checked, after reserving
/// room for the whole packet.
fn put_fixed_header(
    first: u8,
    remaining_length: usize,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    out.reserve(packet_len(remaining_length)?);
    out.put_u8(first);
    codec::encode_remaining_length(remaining_length, out)?;
    Ok(())
}

/// Checks that a server may send `reason_code` in `packet_type` (§2.4, and
/// the "Sent by" columns of §3.14.2.1 and §3.15.2.1).
fn check_reason_code(packet_type: PacketType, reason_code: ReasonCode) -> Result<(), EncodeError> {
    if reason_code.server_may_send(packet_type) {
        Ok(())
    } else {
        Err(EncodeError::ReasonCodeNotAllowed {
            packet_type,
            reason_code,
        })
    }
}

/// Appends a CONNACK (§3.2). Session Present is written as 0 with a failure
/// reason code (MQTT-3.2.2-6).
///
/// # Errors
///
/// A reason code CONNACK may not carry, or properties it may not carry or
/// cannot hold; nothing is written then.
pub fn encode_connack(connack: &ConnAck, out: &mut BytesMut) -> Result<(), EncodeError> {
    check_reason_code(PacketType::ConnAck, connack.reason_code)?;
    let properties_len = connack
        .properties
        .encoded_len(Context::Packet(PacketType::ConnAck))?;
    put_fixed_header(PacketType::ConnAck.first_byte(), 2 + properties_len, out)?;
    let session_present = connack.session_present && !connack.reason_code.is_failure();
    out.put_u8(u8::from(session_present));
    out.put_u8(connack.reason_code.0);
    connack.properties.encode(out)
}

/// What a PUBLISH says besides its Packet Identifier and payload.
#[derive(Clone, Copy, Debug)]
pub struct PublishHeader<'a> {
    /// Topic Name; empty only with a Topic Alias (§3.3.2.3.4).
    pub topic: &'a str,
    /// QoS of this delivery.
    pub qos: QoS,
    /// RETAIN as sent to this subscriber (§3.3.1.3).
    pub retain: bool,
    /// DUP, a re-delivery; ignored for QoS 0 (MQTT-3.3.1-2).
    pub dup: bool,
    /// PUBLISH properties: Payload Format Indicator, Message Expiry Interval,
    /// Topic Alias, Response Topic, Correlation Data, User Properties (in
    /// order), Subscription Identifiers, Content Type.
    pub properties: &'a Properties,
}

/// Sizes of a PUBLISH once its header is checked.
struct PublishSizes {
    /// Bytes the properties take, Property Length included.
    properties_len: usize,
    /// The Remaining Length.
    remaining_length: usize,
}

impl PublishHeader<'_> {
    /// Checks the header for a payload of `payload_len` bytes.
    fn sizes(&self, payload_len: usize) -> Result<PublishSizes, EncodeError> {
        if self.topic.len() > codec::MAX_STRING_LEN {
            return Err(EncodeError::StringTooLong(self.topic.len()));
        }
        if self.topic.is_empty() && self.properties.topic_alias().is_none() {
            return Err(EncodeError::EmptyTopicWithoutAlias);
        }
        let properties_len = self
            .properties
            .encoded_len(Context::Packet(PacketType::Publish))?;
        let packet_id_len = if self.qos == QoS::AtMostOnce { 0 } else { 2 };
        let remaining_length =
            (2 + self.topic.len() + packet_id_len + properties_len).saturating_add(payload_len);
        packet_len(remaining_length)?;
        Ok(PublishSizes {
            properties_len,
            remaining_length,
        })
    }

    /// Writes the fixed header, the topic, the Packet Identifier (QoS 1 and 2)
    /// and the properties, and returns where the Packet Identifier went,
    /// counted from the start of what was written.
    fn put(
        &self,
        sizes: &PublishSizes,
        packet_id: PacketId,
        out: &mut BytesMut,
    ) -> Result<Option<usize>, EncodeError> {
        let start = out.len();
        let mut first = (PacketType::Publish as u8) << 4 | (self.qos as u8) << PUBLISH_QOS_SHIFT;
        if self.dup && self.qos != QoS::AtMostOnce {
            first |= PUBLISH_DUP;
        }
        if self.retain {
            first |= PUBLISH_RETAIN;
        }
        out.put_u8(first);
        codec::encode_remaining_length(sizes.remaining_length, out)?;
        put_binary(self.topic.as_bytes(), out)?;
        let packet_id_at = if self.qos == QoS::AtMostOnce {
            None
        } else {
            let at = out.len() - start;
            out.put_u16(packet_id);
            Some(at)
        };
        self.properties.encode(out)?;
        Ok(packet_id_at)
    }
}

/// Bytes a PUBLISH with this header and a payload of `payload_len` bytes takes
/// on the wire (to compare with the client's Maximum Packet Size).
///
/// # Errors
///
/// As [`encode_publish`].
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "the client's Maximum Packet Size is not honoured yet"
    )
)]
pub fn publish_len(header: &PublishHeader<'_>, payload_len: usize) -> Result<usize, EncodeError> {
    packet_len(header.sizes(payload_len)?.remaining_length)
}

/// Appends a whole PUBLISH (§3.3). `packet_id` is written for QoS 1 and 2 and
/// ignored for QoS 0.
///
/// # Errors
///
/// A topic over 65,535 bytes, an empty topic without Topic Alias, properties a
/// PUBLISH may not carry, a packet too large for MQTT; nothing is written then.
pub fn encode_publish(
    header: &PublishHeader<'_>,
    packet_id: PacketId,
    payload: &[u8],
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let sizes = header.sizes(payload.len())?;
    out.reserve(packet_len(sizes.remaining_length)?);
    header.put(&sizes, packet_id, out)?;
    out.put_slice(payload);
    Ok(())
}

/// Appends the head of a PUBLISH whose payload of `payload_len` bytes is sent
/// separately: fixed header (counting the payload), topic, a zero Packet
/// Identifier slot for QoS 1 and 2, properties. Returns the slot's offset from
/// the start of the head (`None` for QoS 0); see the module documentation for
/// how a subscriber's frame is put together.
///
/// # Errors
///
/// As [`encode_publish`]; nothing is written then.
pub fn encode_publish_head(
    header: &PublishHeader<'_>,
    payload_len: usize,
    out: &mut BytesMut,
) -> Result<Option<usize>, EncodeError> {
    let sizes = header.sizes(payload_len)?;
    out.reserve(codec::MAX_FIXED_HEADER_LEN + 2 + header.topic.len() + 2 + sizes.properties_len);
    header.put(&sizes, 0, out)
}

/// Appends a PUBACK, PUBREC, PUBREL or PUBCOMP (§3.4 to §3.7), in the short
/// form where it can be: Remaining Length 2 for Success without properties, 3
/// for another reason code without properties.
///
/// # Errors
///
/// [`EncodeError::NotAnAck`] for another packet type, a reason code or
/// properties the packet may not carry; nothing is written then.
pub fn encode_ack(
    packet_type: PacketType,
    ack: &Ack,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    if !matches!(
        packet_type,
        PacketType::PubAck | PacketType::PubRec | PacketType::PubRel | PacketType::PubComp
    ) {
        return Err(EncodeError::NotAnAck(packet_type));
    }
    check_reason_code(packet_type, ack.reason_code)?;
    let properties_len = ack.properties.encoded_len(Context::Packet(packet_type))?;
    let remaining_length = match (ack.reason_code, ack.properties.is_empty()) {
        (ReasonCode::SUCCESS, true) => 2,
        (_, true) => 3,
        (_, false) => 3 + properties_len,
    };
    put_fixed_header(packet_type.first_byte(), remaining_length, out)?;
    out.put_u16(ack.packet_id);
    if remaining_length > 2 {
        out.put_u8(ack.reason_code.0);
    }
    if remaining_length > 3 {
        ack.properties.encode(out)?;
    }
    Ok(())
}

/// Appends a SUBACK (§3.9): one reason code per filter of the SUBSCRIBE, in
/// order (Granted QoS 0 to 2 or a failure).
///
/// # Errors
///
/// No reason codes, a reason code SUBACK may not carry, properties other than
/// Reason String and User Property, a packet too large; nothing is written
/// then.
pub fn encode_suback(
    packet_id: PacketId,
    properties: &Properties,
    reason_codes: &[ReasonCode],
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    encode_reason_list(PacketType::SubAck, packet_id, properties, reason_codes, out)
}

/// Appends an UNSUBACK (§3.11): one reason code per filter of the
/// UNSUBSCRIBE, in order (Success, No subscription existed, or a failure).
///
/// # Errors
///
/// As [`encode_suback`], for UNSUBACK's reason codes.
pub fn encode_unsuback(
    packet_id: PacketId,
    properties: &Properties,
    reason_codes: &[ReasonCode],
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    encode_reason_list(
        PacketType::UnsubAck,
        packet_id,
        properties,
        reason_codes,
        out,
    )
}

/// A SUBACK or UNSUBACK: Packet Identifier, properties, a reason code per
/// filter.
fn encode_reason_list(
    packet_type: PacketType,
    packet_id: PacketId,
    properties: &Properties,
    reason_codes: &[ReasonCode],
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    if reason_codes.is_empty() {
        return Err(EncodeError::NoReasonCodes);
    }
    for &reason_code in reason_codes {
        check_reason_code(packet_type, reason_code)?;
    }
    let properties_len = properties.encoded_len(Context::Packet(packet_type))?;
    let remaining_length = (2 + properties_len).saturating_add(reason_codes.len());
    put_fixed_header(packet_type.first_byte(), remaining_length, out)?;
    out.put_u16(packet_id);
    properties.encode(out)?;
    out.extend(reason_codes.iter().map(|code| code.0));
    Ok(())
}

/// Appends a DISCONNECT (§3.14): Remaining Length 0 for Normal disconnection
/// without properties, 1 for another reason code without properties.
///
/// # Errors
///
/// A reason code or properties DISCONNECT may not carry; nothing is written
/// then.
pub fn encode_disconnect(
    disconnect: &ReasonAndProperties,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    encode_reason_and_properties(PacketType::Disconnect, disconnect, out)
}

/// Appends an AUTH (§3.15): Remaining Length 0 for Success without properties;
/// any other AUTH must carry the Authentication Method (§3.15.2.2.2).
///
/// # Errors
///
/// [`EncodeError::MissingAuthenticationMethod`], a reason code or properties
/// AUTH may not carry; nothing is written then.
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "fanmq refuses extended authentication (CONNACK 0x8C)"
    )
)]
pub fn encode_auth(auth: &ReasonAndProperties, out: &mut BytesMut) -> Result<(), EncodeError> {
    if *auth != ReasonAndProperties::default()
        && !auth.properties.contains(PropertyId::AuthenticationMethod)
    {
        return Err(EncodeError::MissingAuthenticationMethod);
    }
    encode_reason_and_properties(PacketType::Auth, auth, out)
}

/// A DISCONNECT or AUTH: optional reason code, optional properties.
fn encode_reason_and_properties(
    packet_type: PacketType,
    packet: &ReasonAndProperties,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    check_reason_code(packet_type, packet.reason_code)?;
    let properties_len = packet
        .properties
        .encoded_len(Context::Packet(packet_type))?;
    let remaining_length = match (packet.reason_code, packet.properties.is_empty()) {
        (ReasonCode::SUCCESS, true) => 0,
        (_, true) => 1,
        (_, false) => 1 + properties_len,
    };
    put_fixed_header(packet_type.first_byte(), remaining_length, out)?;
    if remaining_length > 0 {
        out.put_u8(packet.reason_code.0);
    }
    if remaining_length > 1 {
        packet.properties.encode(out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::num::{NonZeroU16, NonZeroU32};

    use bytestring::ByteString;

    use super::super::tests::{cat, props, string};
    use super::super::{Packet, Property, decode};
    use super::*;

    /// What `encode` appended to an empty buffer.
    fn encoded(
        encode: impl FnOnce(&mut BytesMut) -> Result<(), EncodeError>,
    ) -> Result<Vec<u8>, EncodeError> {
        let mut out = BytesMut::new();
        let result = encode(&mut out);
        if result.is_err() {
            assert!(out.is_empty(), "an error wrote bytes");
        }
        result.map(|()| out.to_vec())
    }

    fn reason_string(text: &str) -> Properties {
        Properties::new().with(Property::ReasonString(ByteString::from(text)))
    }

    #[test]
    fn connack() {
        let accepted = ConnAck {
            session_present: true,
            reason_code: ReasonCode::SUCCESS,
            properties: Properties::new(),
        };
        assert_eq!(
            encoded(|out| encode_connack(&accepted, out)),
            Ok(vec![0x20, 3, 1, 0, 0])
        );
        // Session Present is cleared with a failure (MQTT-3.2.2-6).
        let refused = ConnAck {
            reason_code: ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            properties: reason_string("no"),
            ..accepted.clone()
        };
        let expected = cat(&[
            &[0x20, 8, 0, 0x86],
            &props(&cat(&[&[0x1F], &string(b"no")])),
        ]);
        assert_eq!(encoded(|out| encode_connack(&refused, out)), Ok(expected));
        let taken_over = ConnAck {
            reason_code: ReasonCode::SESSION_TAKEN_OVER,
            ..accepted.clone()
        };
        assert_eq!(
            encoded(|out| encode_connack(&taken_over, out)),
            Err(EncodeError::ReasonCodeNotAllowed {
                packet_type: PacketType::ConnAck,
                reason_code: ReasonCode::SESSION_TAKEN_OVER,
            })
        );
        let alias = ConnAck {
            properties: Properties::new().with(Property::TopicAlias(NonZeroU16::MIN)),
            ..accepted
        };
        assert_eq!(
            encoded(|out| encode_connack(&alias, out)),
            Err(EncodeError::PropertyNotAllowed {
                property: PropertyId::TopicAlias,
                context: Context::Packet(PacketType::ConnAck),
            })
        );
    }

    #[test]
    fn acks_use_the_short_forms() {
        for packet_type in [
            PacketType::PubAck,
            PacketType::PubRec,
            PacketType::PubRel,
            PacketType::PubComp,
        ] {
            let first = packet_type.first_byte();
            let success = Ack::success(0x0102);
            assert_eq!(
                encoded(|out| encode_ack(packet_type, &success, out)),
                Ok(vec![first, 2, 1, 2])
            );
            let failure = if packet_type == PacketType::PubAck || packet_type == PacketType::PubRec
            {
                ReasonCode::QUOTA_EXCEEDED
            } else {
                ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
            };
            let short = Ack {
                reason_code: failure,
                ..success.clone()
            };
            assert_eq!(
                encoded(|out| encode_ack(packet_type, &short, out)),
                Ok(vec![first, 3, 1, 2, failure.0])
            );
            let long = Ack {
                properties: reason_string("r"),
                ..success.clone()
            };
            assert_eq!(
                encoded(|out| encode_ack(packet_type, &long, out)),
                Ok(cat(&[
                    &[first, 8, 1, 2, 0],
                    &props(&cat(&[&[0x1F], &string(b"r")]))
                ]))
            );
            let wrong = Ack {
                reason_code: ReasonCode::GRANTED_QOS_1,
                ..success
            };
            assert_eq!(
                encoded(|out| encode_ack(packet_type, &wrong, out)),
                Err(EncodeError::ReasonCodeNotAllowed {
                    packet_type,
                    reason_code: ReasonCode::GRANTED_QOS_1
                })
            );
        }
        // The success short form is MQTT 3.1.1's acknowledgement.
        let success = Ack::success(9);
        let v5 = |packet_type| encoded(|out| encode_ack(packet_type, &success, out)).unwrap();
        assert_eq!(v5(PacketType::PubAck), codec::puback(9));
        assert_eq!(v5(PacketType::PubRec), codec::pubrec(9));
        assert_eq!(v5(PacketType::PubRel), codec::pubrel(9));
        assert_eq!(v5(PacketType::PubComp), codec::pubcomp(9));
        assert_eq!(
            encoded(|out| encode_ack(PacketType::SubAck, &success, out)),
            Err(EncodeError::NotAnAck(PacketType::SubAck))
        );
    }

    #[test]
    fn suback_and_unsuback() {
        let codes = [
            ReasonCode::GRANTED_QOS_0,
            ReasonCode::GRANTED_QOS_2,
            ReasonCode::TOPIC_FILTER_INVALID,
        ];
        assert_eq!(
            encoded(|out| encode_suback(5, &Properties::new(), &codes, out)),
            Ok(vec![0x90, 6, 0, 5, 0, 0x00, 0x02, 0x8F])
        );
        assert_eq!(
            encoded(|out| encode_unsuback(
                5,
                &reason_string("x"),
                &[ReasonCode::NO_SUBSCRIPTION_EXISTED],
                out
            )),
            Ok(cat(&[
                &[0xB0, 8, 0, 5],
                &props(&cat(&[&[0x1F], &string(b"x")])),
                &[0x11]
            ]))
        );
        assert_eq!(
            encoded(|out| encode_unsuback(
                5,
                &Properties::new(),
                &[ReasonCode::GRANTED_QOS_1],
                out
            )),
            Err(EncodeError::ReasonCodeNotAllowed {
                packet_type: PacketType::UnsubAck,
                reason_code: ReasonCode::GRANTED_QOS_1
            })
        );
        assert_eq!(
            encoded(|out| encode_suback(5, &Properties::new(), &[], out)),
            Err(EncodeError::NoReasonCodes)
        );
    }

    #[test]
    fn disconnect_and_auth() {
        let normal = ReasonAndProperties::default();
        assert_eq!(
            encoded(|out| encode_disconnect(&normal, out)),
            Ok(vec![0xE0, 0])
        );
        let shutting_down = ReasonAndProperties {
            reason_code: ReasonCode::SERVER_SHUTTING_DOWN,
            properties: Properties::new(),
        };
        assert_eq!(
            encoded(|out| encode_disconnect(&shutting_down, out)),
            Ok(vec![0xE0, 1, 0x8B])
        );
        let moved = ReasonAndProperties {
            reason_code: ReasonCode::SERVER_MOVED,
            properties: Properties::new().with(Property::ServerReference("b:1883".into())),
        };
        assert_eq!(
            encoded(|out| encode_disconnect(&moved, out)),
            Ok(cat(&[
                &[0xE0, 11, 0x9D],
                &props(&cat(&[&[0x1C], &string(b"b:1883")]))
            ]))
        );
        assert_eq!(encoded(|out| encode_auth(&normal, out)), Ok(vec![0xF0, 0]));
        let continue_auth = ReasonAndProperties {
            reason_code: ReasonCode::CONTINUE_AUTHENTICATION,
            properties: Properties::new().with(Property::AuthenticationMethod("M".into())),
        };
        assert_eq!(
            encoded(|out| encode_auth(&continue_auth, out)),
            Ok(cat(&[
                &[0xF0, 6, 0x18],
                &props(&cat(&[&[0x15], &string(b"M")]))
            ]))
        );
        for (packet_type, reason_code) in [
            (PacketType::Auth, ReasonCode::RE_AUTHENTICATE),
            (
                PacketType::Disconnect,
                ReasonCode::DISCONNECT_WITH_WILL_MESSAGE,
            ),
        ] {
            let clients = ReasonAndProperties {
                reason_code,
                properties: continue_auth.properties.clone(),
            };
            let encode = |out: &mut BytesMut| match packet_type {
                PacketType::Auth => encode_auth(&clients, out),
                _ => encode_disconnect(&clients, out),
            };
            assert_eq!(
                encoded(encode),
                Err(EncodeError::ReasonCodeNotAllowed {
                    packet_type,
                    reason_code
                })
            );
        }
        let no_method = ReasonAndProperties {
            reason_code: ReasonCode::CONTINUE_AUTHENTICATION,
            properties: Properties::new(),
        };
        assert_eq!(
            encoded(|out| encode_auth(&no_method, out)),
            Err(EncodeError::MissingAuthenticationMethod)
        );
        let mut out = BytesMut::new();
        encode_pingresp(&mut out);
        assert_eq!(&out[..], &[0xD0, 0]);
    }

    fn publish_properties() -> Properties {
        Properties::new()
            .with(Property::MessageExpiryInterval(9))
            .with(Property::SubscriptionIdentifier(
                NonZeroU32::new(3).unwrap(),
            ))
            .with(Property::SubscriptionIdentifier(
                NonZeroU32::new(300).unwrap(),
            ))
            .with(Property::UserProperty("z".into(), "1".into()))
            .with(Property::UserProperty("a".into(), "2".into()))
    }

    #[test]
    fn publish_head_with_slot_is_the_whole_publish() {
        let properties = publish_properties();
        let payload = vec![0xAB; 200];
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let header = PublishHeader {
                topic: "a/b",
                qos,
                retain: true,
                dup: true,
                properties: &properties,
            };
            let whole = encoded(|out| encode_publish(&header, 0xBEEF, &payload, out)).unwrap();
            assert_eq!(publish_len(&header, payload.len()), Ok(whole.len()));
            let mut head = BytesMut::from(&b"prefix"[..]);
            let at = encode_publish_head(&header, payload.len(), &mut head).unwrap();
            let head = &head[6..];
            let frame = match at {
                Some(at) => cat(&[
                    &head[..at],
                    &0xBEEFu16.to_be_bytes(),
                    &head[at + 2..],
                    &payload,
                ]),
                None => cat(&[head, &payload]),
            };
            assert_eq!(frame, whole, "{qos:?}");
            assert_eq!(at.is_some(), qos != QoS::AtMostOnce);
            // DUP is never written with QoS 0.
            let dup = whole[0] & PUBLISH_DUP != 0;
            assert_eq!(dup, qos != QoS::AtMostOnce);
        }
    }

    #[test]
    fn publish_errors() {
        let empty = Properties::new();
        let header = PublishHeader {
            topic: "",
            qos: QoS::AtMostOnce,
            retain: false,
            dup: false,
            properties: &empty,
        };
        assert_eq!(
            encoded(|out| encode_publish(&header, 0, b"", out)),
            Err(EncodeError::EmptyTopicWithoutAlias)
        );
        let alias = Properties::new().with(Property::TopicAlias(NonZeroU16::MIN));
        let aliased = PublishHeader {
            properties: &alias,
            ..header
        };
        assert_eq!(
            encoded(|out| encode_publish(&aliased, 0, b"", out)),
            Ok(vec![0x30, 6, 0, 0, 3, 0x23, 0, 1])
        );
        let long = "t".repeat(65_536);
        let long_topic = PublishHeader {
            topic: &long,
            ..header
        };
        assert_eq!(
            encoded(|out| encode_publish(&long_topic, 0, b"", out)),
            Err(EncodeError::StringTooLong(65_536))
        );
        let huge = PublishHeader {
            topic: "t",
            ..header
        };
        let mut out = BytesMut::new();
        assert_eq!(
            encode_publish_head(&huge, MAX_REMAINING_LENGTH, &mut out),
            Err(EncodeError::RemainingLengthTooLarge(
                MAX_REMAINING_LENGTH + 4
            ))
        );
        assert!(out.is_empty());
        let session = Properties::new().with(Property::SessionExpiryInterval(1));
        let wrong = PublishHeader {
            topic: "t",
            properties: &session,
            ..header
        };
        assert_eq!(
            encoded(|out| encode_publish(&wrong, 0, b"", out)),
            Err(EncodeError::PropertyNotAllowed {
                property: PropertyId::SessionExpiryInterval,
                context: Context::Packet(PacketType::Publish),
            })
        );
    }

    #[test]
    fn a_publish_without_subscription_identifiers_decodes_back() {
        let properties = Properties::new()
            .with(Property::PayloadFormatIndicator(true))
            .with(Property::ContentType("text/plain".into()));
        let header = PublishHeader {
            topic: "x/y",
            qos: QoS::ExactlyOnce,
            retain: false,
            dup: false,
            properties: &properties,
        };
        let mut buf = BytesMut::new();
        encode_publish(&header, 4, b"hello", &mut buf).unwrap();
        let Ok(Some(Packet::Publish(publish))) = decode(&mut buf, 1 << 20) else {
            panic!("not a PUBLISH");
        };
        assert_eq!(
            (&publish.topic[..], publish.qos, publish.packet_id),
            ("x/y", QoS::ExactlyOnce, 4)
        );
        assert_eq!(publish.properties, properties);
        assert_eq!(&publish.payload[..], b"hello");
    }
}
