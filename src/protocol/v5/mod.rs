//! MQTT 5.0 (OASIS Standard, 7 March 2019) server-side codec: bytes on the wire
//! to [`Packet`]s and back, with every wire-format check the specification
//! requires of a server.
//!
//! # Direction
//!
//! As in [`crate::protocol::v3`] (MQTT 3.1.1), a server only *decodes* what clients
//! send (CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE,
//! UNSUBSCRIBE, PINGREQ, DISCONNECT, AUTH: [`decode()`]) and only *encodes* what
//! servers send (CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK,
//! UNSUBACK, PINGRESP, DISCONNECT, AUTH: the `encode_*` functions). A packet
//! type a server never receives is a [`DecodeError`].
//!
//! # What is checked here, and what is not
//!
//! The *wire format*: framing; minimal Variable Byte Integers (§1.5.5); reserved
//! bits; lengths (the Property Length must match the properties exactly);
//! UTF-8 strings and string pairs (§1.5.4, §1.5.7); which properties each packet
//! may carry, which may repeat, and their values (§2.2.2, per-packet sections);
//! which reason codes each packet may carry (§2.4) and which of them only the
//! other side sends (§3.14.2.1, §3.15.2.1); Packet Identifiers; the
//! CONNECT protocol name, version and flags; the SUBSCRIBE options. Every
//! failure is a distinct [`DecodeError`] whose [`DecodeError::reason_code`] is
//! the Reason Code of the CONNACK (before the connection is accepted) or
//! DISCONNECT (after) the server sends before closing (§4.13).
//!
//! Not checked here, because they need state or topic rules that belong to the
//! session layer: topic names and filters (run [`crate::protocol::topic`] on them; a bad
//! filter is a SUBACK reason code, not a closed connection); Response Topic
//! wildcards (§3.3.2.3.5); No Local on a shared subscription (MQTT-3.8.3-4);
//! Topic Alias above the Topic Alias Maximum the server announced (only Topic
//! Alias 0 is refused here); the Receive Maximum quota; a DISCONNECT's Session
//! Expiry Interval when the CONNECT's was 0 (§3.14.2.2.2); an AUTH whose method
//! differs from the CONNECT's; the Payload Format Indicator's promise that the
//! payload is UTF-8 (a MAY, §3.3.2.3.2: see [`Publish::payload_is_utf8`] and
//! [`Will::payload_is_utf8`]).
//!
//! # Memory
//!
//! As in [`crate::protocol::v3`]: decoded strings, binary data and payloads are
//! *copied* out of the read buffer (one allocation each), never sliced from it,
//! so that a small message queued for a slow subscriber does not pin the whole
//! read buffer. A packet without properties carries an empty [`Properties`],
//! which does not allocate.
//!
//! # Errors leave the buffer untouched
//!
//! On `Err` nothing is consumed: every decode error closes the connection, so
//! there is nothing to resynchronise. A packet announcing more than the maximum
//! packet size fails as soon as its Remaining Length is read, before anything is
//! allocated for it.
//!
//! # Layout
//!
//! - [`reason`]: Reason Codes (§2.4) and which packets may carry each.
//! - [`properties`]: Properties (§2.2.2): [`Property`], [`Properties`].
//! - [`mod@decode`]: client packets, [`DecodeError`].
//! - [`encode`]: server packets, [`EncodeError`], the shared PUBLISH head.
//! - `fuzz`: the `decode_v5` cargo-fuzz target's entry point.

pub mod decode;
pub mod encode;
#[doc(hidden)]
pub mod fuzz;
pub mod properties;
pub mod reason;
#[cfg(test)]
mod tests;

use std::num::NonZeroU32;

use bytes::Bytes;
use bytestring::ByteString;

pub use crate::protocol::v3::{PacketId, QoS};
pub use decode::{DecodeError, decode, peek_frame_len};
#[cfg(test)]
pub use encode::encode_pingresp;
pub use encode::{
    EncodeError, PublishHeader, encode_ack, encode_connack, encode_disconnect, encode_publish,
    encode_publish_head, encode_suback, encode_unsuback,
};
#[cfg(test)]
pub use properties::PropertyId;
pub use properties::{Properties, Property};
pub use reason::ReasonCode;

/// Protocol Name of MQTT 5.0 (§3.1.2.1): the same as MQTT 3.1.1's.
pub const PROTOCOL_NAME: &[u8] = crate::protocol::v3::PROTOCOL_NAME_V311;

/// Protocol Version of MQTT 5.0 (§3.1.2.2). [`crate::protocol::v3`] answers a CONNECT
/// with this level with `UnsupportedProtocolLevel(5)`: that is the broker's cue
/// to decode the connection with this module instead.
pub const PROTOCOL_VERSION: u8 = 5;

/// PUBLISH fixed header flag DUP (§3.3.1.1): a re-delivery; never with QoS 0.
pub const PUBLISH_DUP: u8 = 0b1000;
/// PUBLISH fixed header flag RETAIN (§3.3.1.3).
pub const PUBLISH_RETAIN: u8 = 0b0001;
/// Shift of the two PUBLISH QoS bits in the fixed header flags (§3.3.1.2).
pub const PUBLISH_QOS_SHIFT: u8 = 1;

/// MQTT Control Packet types (§2.1.2), the high nibble of the first byte.
///
/// [`crate::protocol::v3`] has these as private constants; MQTT 5.0 adds
/// [`PacketType::Auth`] (15, reserved in 3.1.1), and property and reason code
/// rules are stated per packet type, so this module needs them as a type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PacketType {
    /// CONNECT (§3.1), client to server.
    Connect = 1,
    /// CONNACK (§3.2), server to client.
    ConnAck = 2,
    /// PUBLISH (§3.3), both directions.
    Publish = 3,
    /// PUBACK (§3.4), both directions.
    PubAck = 4,
    /// PUBREC (§3.5), both directions.
    PubRec = 5,
    /// PUBREL (§3.6), both directions.
    PubRel = 6,
    /// PUBCOMP (§3.7), both directions.
    PubComp = 7,
    /// SUBSCRIBE (§3.8), client to server.
    Subscribe = 8,
    /// SUBACK (§3.9), server to client.
    SubAck = 9,
    /// UNSUBSCRIBE (§3.10), client to server.
    Unsubscribe = 10,
    /// UNSUBACK (§3.11), server to client.
    UnsubAck = 11,
    /// PINGREQ (§3.12), client to server.
    PingReq = 12,
    /// PINGRESP (§3.13), server to client.
    PingResp = 13,
    /// DISCONNECT (§3.14), both directions.
    Disconnect = 14,
    /// AUTH (§3.15), both directions; new in MQTT 5.0.
    Auth = 15,
}

impl PacketType {
    /// The packet type with wire value `value` (0 is reserved: `None`).
    pub fn from_u8(value: u8) -> Option<PacketType> {
        use PacketType as T;
        Some(match value {
            1 => T::Connect,
            2 => T::ConnAck,
            3 => T::Publish,
            4 => T::PubAck,
            5 => T::PubRec,
            6 => T::PubRel,
            7 => T::PubComp,
            8 => T::Subscribe,
            9 => T::SubAck,
            10 => T::Unsubscribe,
            11 => T::UnsubAck,
            12 => T::PingReq,
            13 => T::PingResp,
            14 => T::Disconnect,
            15 => T::Auth,
            _ => return None,
        })
    }

    /// The fixed header flags this packet type must carry (§2.1.3): 0b0010 for
    /// PUBREL, SUBSCRIBE and UNSUBSCRIBE, 0 for the others; `None` for PUBLISH,
    /// whose flags are DUP, QoS and RETAIN.
    pub fn required_flags(self) -> Option<u8> {
        match self {
            PacketType::Publish => None,
            PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => Some(0b0010),
            _ => Some(0),
        }
    }

    /// The first byte of this packet type's fixed header with its required
    /// flags (PUBLISH: all flags clear).
    pub fn first_byte(self) -> u8 {
        (self as u8) << 4 | self.required_flags().unwrap_or(0)
    }
}

/// The Will Message of a CONNECT (§3.1.2.5, §3.1.3.2 to §3.1.3.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    /// Will Properties (§3.1.3.2): Will Delay Interval, Payload Format Indicator,
    /// Message Expiry Interval, Content Type, Response Topic, Correlation Data,
    /// User Property.
    pub properties: Properties,
    /// Will Topic (§3.1.3.3): valid UTF-8 without U+0000; the caller checks it is
    /// a topic name with [`crate::protocol::topic::validate_topic_name`].
    pub topic: ByteString,
    /// Will Payload (§3.1.3.4): binary data, possibly empty.
    pub payload: Bytes,
    /// Will QoS (§3.1.2.6).
    pub qos: QoS,
    /// Will Retain (§3.1.2.7).
    pub retain: bool,
}

impl Will {
    /// As [`Publish::payload_is_utf8`], for the Will Payload: a server MAY
    /// refuse a broken promise with CONNACK 0x99 Payload format invalid
    /// (§3.1.3.2.3).
    pub fn payload_is_utf8(&self) -> bool {
        payload_matches_format(&self.properties, &self.payload)
    }
}

/// A CONNECT packet (§3.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    /// Clean Start (§3.1.2.4): start a new session, discarding any existing one.
    pub clean_start: bool,
    /// Keep Alive (§3.1.2.10) in seconds; 0 turns it off (the server may still
    /// impose its Server Keep Alive).
    pub keep_alive: u16,
    /// CONNECT Properties (§3.1.2.11).
    pub properties: Properties,
    /// Client Identifier (§3.1.3.1); may be empty, then the server assigns one
    /// and returns it as Assigned Client Identifier (§3.2.2.3.7).
    pub client_id: ByteString,
    /// The Will Message, present when the Will Flag is set.
    pub will: Option<Will>,
    /// User Name (§3.1.3.5), present when the User Name Flag is set.
    pub username: Option<ByteString>,
    /// Password (§3.1.3.6), binary, present when the Password Flag is set. MQTT
    /// 5.0 allows a password without a user name (§3.1.2.9).
    pub password: Option<Bytes>,
}

/// A PUBLISH packet (§3.3) as a client sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    /// DUP (§3.3.1.1); never set with QoS 0.
    pub dup: bool,
    /// QoS (§3.3.1.2).
    pub qos: QoS,
    /// RETAIN (§3.3.1.3).
    pub retain: bool,
    /// Topic Name (§3.3.2.1): valid UTF-8 without U+0000, possibly empty when a
    /// Topic Alias is present (§3.3.2.3.4); the caller resolves the alias and
    /// checks the name with [`crate::protocol::topic::validate_topic_name`].
    pub topic: ByteString,
    /// Packet Identifier (§3.3.2.2): non-zero for QoS 1 and 2, 0 for QoS 0.
    pub packet_id: PacketId,
    /// PUBLISH Properties (§3.3.2.3). From a client never a Subscription
    /// Identifier (MQTT-3.3.4-6).
    pub properties: Properties,
    /// Payload (§3.3.3), in its own allocation.
    pub payload: Bytes,
}

impl Publish {
    /// Whether the payload keeps the Payload Format Indicator's promise: true
    /// unless the indicator says UTF-8 (1) and the payload is not valid UTF-8.
    /// A server MAY check this and answer 0x99 Payload Format Invalid
    /// (§3.3.2.3.2); checking it costs a scan of the payload, so the decoder
    /// leaves the choice to the caller.
    pub fn payload_is_utf8(&self) -> bool {
        payload_matches_format(&self.properties, &self.payload)
    }
}

/// Whether `payload` keeps the promise of the Payload Format Indicator in
/// `properties`: true unless it says UTF-8 and the payload is not.
fn payload_matches_format(properties: &Properties, payload: &[u8]) -> bool {
    properties.payload_format_indicator() != Some(true) || std::str::from_utf8(payload).is_ok()
}

/// Retain Handling of a subscription (§3.8.3.1, bits 4 and 5 of the options).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RetainHandling {
    /// 0: send retained messages at the time of the subscribe.
    SendAtSubscribe = 0,
    /// 1: send them only if the subscription does not exist yet.
    SendAtSubscribeIfNew = 1,
    /// 2: do not send retained messages at subscribe.
    DoNotSend = 2,
}

/// Subscription Options of one SUBSCRIBE filter (§3.8.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SubscriptionOptions {
    /// Maximum QoS the client accepts on this subscription (bits 0 and 1).
    pub qos: QoS,
    /// No Local (bit 2): do not forward the client's own publications.
    pub no_local: bool,
    /// Retain As Published (bit 3): keep RETAIN as published when forwarding.
    pub retain_as_published: bool,
    /// Retain Handling (bits 4 and 5).
    pub retain_handling: RetainHandling,
}

/// A SUBSCRIBE packet (§3.8).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet Identifier, non-zero, echoed in the SUBACK.
    pub packet_id: PacketId,
    /// SUBSCRIBE Properties (§3.8.2.1): at most one Subscription Identifier
    /// (1 to 268,435,455), User Properties.
    pub properties: Properties,
    /// At least one (Topic Filter, options) pair in packet order; the SUBACK
    /// answers them in the same order. Filters are valid UTF-8 without U+0000
    /// but not yet checked as topic filters.
    pub filters: Vec<(ByteString, SubscriptionOptions)>,
}

impl Subscribe {
    /// The Subscription Identifier (§3.8.2.1.2), if any.
    pub fn subscription_identifier(&self) -> Option<NonZeroU32> {
        self.properties.subscription_identifiers().next()
    }
}

/// An UNSUBSCRIBE packet (§3.10).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet Identifier, non-zero, echoed in the UNSUBACK.
    pub packet_id: PacketId,
    /// UNSUBSCRIBE Properties (§3.10.2.1): User Properties only.
    pub properties: Properties,
    /// At least one Topic Filter, in packet order.
    pub filters: Vec<ByteString>,
}

/// A PUBACK, PUBREC, PUBREL or PUBCOMP (§3.4 to §3.7): which one is the
/// [`Packet`] variant (decoding) or the [`PacketType`] passed along (encoding).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// Packet Identifier of the PUBLISH this acknowledges.
    pub packet_id: PacketId,
    /// Reason Code; [`ReasonCode::SUCCESS`] in the short form (Remaining Length
    /// 2).
    pub reason_code: ReasonCode,
    /// Reason String and User Properties; empty in the short forms (Remaining
    /// Length 2 or 3).
    pub properties: Properties,
}

impl Ack {
    /// A successful acknowledgement without properties (the short form).
    #[cfg(test)]
    pub fn success(packet_id: PacketId) -> Ack {
        Ack {
            packet_id,
            reason_code: ReasonCode::SUCCESS,
            properties: Properties::new(),
        }
    }
}

/// A DISCONNECT (§3.14) or AUTH (§3.15): a reason code and properties. The
/// default is Success (Normal disconnection) without properties, the short form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReasonAndProperties {
    /// Reason Code; [`ReasonCode::SUCCESS`] (Normal disconnection) when the
    /// packet has Remaining Length 0.
    pub reason_code: ReasonCode,
    /// DISCONNECT: Session Expiry Interval, Reason String, User Property, Server
    /// Reference. AUTH: Authentication Method, Authentication Data, Reason
    /// String, User Property.
    pub properties: Properties,
}

/// A CONNACK (§3.2), to encode with [`encode_connack`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnAck {
    /// Session Present (§3.2.2.1.1); written as 0 with a failure reason code
    /// (MQTT-3.2.2-6).
    pub session_present: bool,
    /// Connect Reason Code (§3.2.2.2).
    pub reason_code: ReasonCode,
    /// CONNACK Properties (§3.2.2.3).
    pub properties: Properties,
}

/// A control packet a server can receive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT (§3.1), boxed: it is much larger than the other packets.
    Connect(Box<Connect>),
    /// PUBLISH (§3.3).
    Publish(Publish),
    /// PUBACK (§3.4): QoS 1 acknowledgement of a PUBLISH we sent.
    PubAck(Ack),
    /// PUBREC (§3.5): QoS 2 step 1 answer to a PUBLISH we sent.
    PubRec(Ack),
    /// PUBREL (§3.6): QoS 2 step 2 for a PUBLISH the client sent.
    PubRel(Ack),
    /// PUBCOMP (§3.7): QoS 2 step 3 for a PUBLISH we sent.
    PubComp(Ack),
    /// SUBSCRIBE (§3.8).
    Subscribe(Subscribe),
    /// UNSUBSCRIBE (§3.10).
    Unsubscribe(Unsubscribe),
    /// PINGREQ (§3.12).
    PingReq,
    /// DISCONNECT (§3.14).
    Disconnect(ReasonAndProperties),
    /// AUTH (§3.15): extended authentication exchange.
    Auth(ReasonAndProperties),
}
