//! MQTT 5.0 Properties (§2.2.2): the optional, typed fields at the end of most
//! packets' variable headers, and in a CONNECT's Will.
//!
//! On the wire a property block is a Variable Byte Integer length, then
//! properties, each an identifier and a value of the identifier's data type.
//! [`Properties`] keeps them in a `Vec` in wire order, so an empty set (most
//! packets) does not allocate, repeated User Properties keep their order
//! (§3.3.2.3.7 asks the server to forward them unchanged), and encoding writes
//! them back as they were pushed. Typed accessors find a property by kind.
//!
//! # What decoding checks
//!
//! - The block must end exactly at its Property Length: a value running past
//!   it is [`DecodeError::PropertyLengthMismatch`], 0x81 Malformed Packet.
//! - An identifier §2.2.2.2 does not define, or one not valid for the packet
//!   (or the Will), is 0x81 Malformed Packet: §2.2.2.2 says "A Control Packet
//!   which contains an Identifier which is not valid for its packet type, or
//!   contains a value not of the specified data type, is a Malformed Packet".
//! - A property present twice where only User Property (everywhere) and
//!   Subscription Identifier (PUBLISH) may repeat is 0x82 Protocol Error: each
//!   property's section says "It is a Protocol Error to include ... more than
//!   once".
//! - Values the property sections call a Protocol Error (0x82): a Payload
//!   Format Indicator, Request Problem Information, Request Response
//!   Information or other byte flag other than 0 and 1, a Maximum QoS other than
//!   0 and 1, a Receive Maximum, Maximum Packet Size or Subscription Identifier
//!   of 0. A Topic Alias of 0 is 0x94 Topic Alias invalid (§3.3.2.3.4).
//! - Strings and string pairs are valid UTF-8 without U+0000 (§1.5.4, 0x81).
//!
//! Encoding checks the same rules for what the server sends, so a bug in the
//! broker shows as an [`EncodeError`] rather than as a client disconnecting.

use std::num::{NonZeroU16, NonZeroU32};

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use super::PacketType;
use super::decode::{DecodeError, Reader};
use super::encode::EncodeError;
use crate::protocol::v3::{self as codec, MAX_REMAINING_LENGTH, QoS};

/// Where a property block stands: in a packet, or in a CONNECT's Will
/// Properties (§3.1.3.2), whose allowed properties differ from the CONNECT's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Context {
    /// The properties of a packet of this type.
    Packet(PacketType),
    /// The Will Properties of a CONNECT.
    Will,
}

impl Context {
    /// This context's bit in a [`PROPERTIES`] mask: the packet type's number,
    /// and bit 0 (packet type 0 is reserved) for the Will.
    const fn bit(self) -> u16 {
        match self {
            Context::Packet(packet) => 1 << packet as u8,
            Context::Will => 1,
        }
    }
}

/// A Property Identifier (§2.2.2.2, Table 2-4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PropertyId {
    /// 0x01 Payload Format Indicator, Byte (§3.3.2.3.2).
    PayloadFormatIndicator = 0x01,
    /// 0x02 Message Expiry Interval, Four Byte Integer (§3.3.2.3.3).
    MessageExpiryInterval = 0x02,
    /// 0x03 Content Type, UTF-8 String (§3.3.2.3.9).
    ContentType = 0x03,
    /// 0x08 Response Topic, UTF-8 String (§3.3.2.3.5).
    ResponseTopic = 0x08,
    /// 0x09 Correlation Data, Binary Data (§3.3.2.3.6).
    CorrelationData = 0x09,
    /// 0x0B Subscription Identifier, Variable Byte Integer (§3.3.2.3.8,
    /// §3.8.2.1.2).
    SubscriptionIdentifier = 0x0B,
    /// 0x11 Session Expiry Interval, Four Byte Integer (§3.1.2.11.2).
    SessionExpiryInterval = 0x11,
    /// 0x12 Assigned Client Identifier, UTF-8 String (§3.2.2.3.7).
    AssignedClientIdentifier = 0x12,
    /// 0x13 Server Keep Alive, Two Byte Integer (§3.2.2.3.14).
    ServerKeepAlive = 0x13,
    /// 0x15 Authentication Method, UTF-8 String (§3.1.2.11.9).
    AuthenticationMethod = 0x15,
    /// 0x16 Authentication Data, Binary Data (§3.1.2.11.10).
    AuthenticationData = 0x16,
    /// 0x17 Request Problem Information, Byte (§3.1.2.11.7).
    RequestProblemInformation = 0x17,
    /// 0x18 Will Delay Interval, Four Byte Integer (§3.1.3.2.2).
    WillDelayInterval = 0x18,
    /// 0x19 Request Response Information, Byte (§3.1.2.11.6).
    RequestResponseInformation = 0x19,
    /// 0x1A Response Information, UTF-8 String (§3.2.2.3.15).
    ResponseInformation = 0x1A,
    /// 0x1C Server Reference, UTF-8 String (§3.2.2.3.16, §4.11).
    ServerReference = 0x1C,
    /// 0x1F Reason String, UTF-8 String (§3.2.2.3.9 and the acks').
    ReasonString = 0x1F,
    /// 0x21 Receive Maximum, Two Byte Integer (§3.1.2.11.3).
    ReceiveMaximum = 0x21,
    /// 0x22 Topic Alias Maximum, Two Byte Integer (§3.1.2.11.5).
    TopicAliasMaximum = 0x22,
    /// 0x23 Topic Alias, Two Byte Integer (§3.3.2.3.4).
    TopicAlias = 0x23,
    /// 0x24 Maximum QoS, Byte (§3.2.2.3.4).
    MaximumQoS = 0x24,
    /// 0x25 Retain Available, Byte (§3.2.2.3.5).
    RetainAvailable = 0x25,
    /// 0x26 User Property, UTF-8 String Pair (§3.1.2.11.8 and others).
    UserProperty = 0x26,
    /// 0x27 Maximum Packet Size, Four Byte Integer (§3.1.2.11.4).
    MaximumPacketSize = 0x27,
    /// 0x28 Wildcard Subscription Available, Byte (§3.2.2.3.11).
    WildcardSubscriptionAvailable = 0x28,
    /// 0x29 Subscription Identifier Available, Byte (§3.2.2.3.12).
    SubscriptionIdentifierAvailable = 0x29,
    /// 0x2A Shared Subscription Available, Byte (§3.2.2.3.13).
    SharedSubscriptionAvailable = 0x2A,
}

/// Bit of `packet` in a [`PROPERTIES`] mask.
const fn p(packet: PacketType) -> u16 {
    Context::Packet(packet).bit()
}

/// The Will Properties bit.
const WILL: u16 = Context::Will.bit();
/// CONNECT, CONNACK: the limits both sides announce.
const CONNECT_CONNACK: u16 = p(PacketType::Connect) | p(PacketType::ConnAck);
/// PUBLISH and the Will: the application message's properties.
const MESSAGE: u16 = p(PacketType::Publish) | WILL;
/// Packets that may carry a Reason String (§2.2.2.2).
const WITH_REASON_STRING: u16 = p(PacketType::ConnAck)
    | p(PacketType::PubAck)
    | p(PacketType::PubRec)
    | p(PacketType::PubRel)
    | p(PacketType::PubComp)
    | p(PacketType::SubAck)
    | p(PacketType::UnsubAck)
    | p(PacketType::Disconnect)
    | p(PacketType::Auth);
/// Every packet with properties, and the Will: where User Property may go.
const EVERYWHERE: u16 = WITH_REASON_STRING
    | MESSAGE
    | p(PacketType::Connect)
    | p(PacketType::Subscribe)
    | p(PacketType::Unsubscribe);
/// CONNACK only.
const CONNACK: u16 = p(PacketType::ConnAck);

/// Table 2-4 of §2.2.2.2: each property and where it may appear.
const PROPERTIES: [(PropertyId, u16); 27] = {
    use PacketType as T;
    use PropertyId as I;
    [
        (I::PayloadFormatIndicator, MESSAGE),
        (I::MessageExpiryInterval, MESSAGE),
        (I::ContentType, MESSAGE),
        (I::ResponseTopic, MESSAGE),
        (I::CorrelationData, MESSAGE),
        (I::SubscriptionIdentifier, p(T::Publish) | p(T::Subscribe)),
        (I::SessionExpiryInterval, CONNECT_CONNACK | p(T::Disconnect)),
        (I::AssignedClientIdentifier, CONNACK),
        (I::ServerKeepAlive, CONNACK),
        (I::AuthenticationMethod, CONNECT_CONNACK | p(T::Auth)),
        (I::AuthenticationData, CONNECT_CONNACK | p(T::Auth)),
        (I::RequestProblemInformation, p(T::Connect)),
        (I::WillDelayInterval, WILL),
        (I::RequestResponseInformation, p(T::Connect)),
        (I::ResponseInformation, CONNACK),
        (I::ServerReference, CONNACK | p(T::Disconnect)),
        (I::ReasonString, WITH_REASON_STRING),
        (I::ReceiveMaximum, CONNECT_CONNACK),
        (I::TopicAliasMaximum, CONNECT_CONNACK),
        (I::TopicAlias, p(T::Publish)),
        (I::MaximumQoS, CONNACK),
        (I::RetainAvailable, CONNACK),
        (I::UserProperty, EVERYWHERE),
        (I::MaximumPacketSize, CONNECT_CONNACK),
        (I::WildcardSubscriptionAvailable, CONNACK),
        (I::SubscriptionIdentifierAvailable, CONNACK),
        (I::SharedSubscriptionAvailable, CONNACK),
    ]
};

impl PropertyId {
    /// The property with identifier `value`, `None` for one §2.2.2.2 does not
    /// define.
    pub fn from_u8(value: u8) -> Option<PropertyId> {
        PROPERTIES
            .iter()
            .map(|&(id, _)| id)
            .find(|&id| id as u8 == value)
    }

    /// Whether this property may appear in `context` (Table 2-4).
    pub fn is_valid_in(self, context: Context) -> bool {
        PROPERTIES
            .iter()
            .any(|&(id, mask)| id == self && mask & context.bit() != 0)
    }

    /// Whether this property may appear more than once in `context`: User
    /// Property anywhere (§3.1.2.11.8), Subscription Identifier in a PUBLISH
    /// (§3.3.2.3.8); in a SUBSCRIBE it may not (§3.8.2.1.2).
    pub fn is_repeatable_in(self, context: Context) -> bool {
        self == PropertyId::UserProperty
            || (self == PropertyId::SubscriptionIdentifier
                && context == Context::Packet(PacketType::Publish))
    }
}

/// One property with its typed value. Values the specification restricts are
/// typed so that an invalid one cannot be built, where a type can say it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[expect(
    clippy::enum_variant_names,
    reason = "User Property is the spec's name (§3.1.2.11.8)"
)]
pub enum Property {
    /// Payload Format Indicator: `true` means the payload is UTF-8 (1), `false`
    /// unspecified bytes (0).
    PayloadFormatIndicator(bool),
    /// Message Expiry Interval in seconds.
    MessageExpiryInterval(u32),
    /// Content Type (a MIME type, by convention).
    ContentType(ByteString),
    /// Response Topic: the topic name for a response (request/response, §4.10).
    ResponseTopic(ByteString),
    /// Correlation Data: opaque data the requester uses to match the response.
    CorrelationData(Bytes),
    /// Subscription Identifier, 1 to 268,435,455 (a Variable Byte Integer).
    SubscriptionIdentifier(NonZeroU32),
    /// Session Expiry Interval in seconds; 0xFFFFFFFF: the session never ends.
    SessionExpiryInterval(u32),
    /// Assigned Client Identifier: the one the server made for an empty id.
    AssignedClientIdentifier(ByteString),
    /// Server Keep Alive in seconds: overrides the client's Keep Alive.
    ServerKeepAlive(u16),
    /// Authentication Method: names the extended authentication method.
    AuthenticationMethod(ByteString),
    /// Authentication Data: method-specific binary data.
    AuthenticationData(Bytes),
    /// Request Problem Information: may the server send Reason Strings and User
    /// Properties on failures (default true).
    RequestProblemInformation(bool),
    /// Will Delay Interval in seconds before the Will is published.
    WillDelayInterval(u32),
    /// Request Response Information: the client asks for Response Information.
    RequestResponseInformation(bool),
    /// Response Information: the basis for the client's response topics.
    ResponseInformation(ByteString),
    /// Server Reference: another server for the client to use (§4.11).
    ServerReference(ByteString),
    /// Reason String: human-readable diagnostics.
    ReasonString(ByteString),
    /// Receive Maximum: how many QoS 1/2 PUBLISHes the sender accepts at once.
    ReceiveMaximum(NonZeroU16),
    /// Topic Alias Maximum: the highest Topic Alias the sender accepts.
    TopicAliasMaximum(u16),
    /// Topic Alias: a number standing for the topic on this connection.
    TopicAlias(NonZeroU16),
    /// Maximum QoS the server supports: only 0 or 1 may be sent (absent means
    /// 2, §3.2.2.3.4); [`QoS::ExactlyOnce`] is an [`EncodeError`].
    MaximumQoS(QoS),
    /// Retain Available: does the server support retained messages.
    RetainAvailable(bool),
    /// User Property: a name/value pair, repeatable, order kept.
    UserProperty(ByteString, ByteString),
    /// Maximum Packet Size the sender accepts, in bytes.
    MaximumPacketSize(NonZeroU32),
    /// Wildcard Subscription Available.
    WildcardSubscriptionAvailable(bool),
    /// Subscription Identifier Available.
    SubscriptionIdentifierAvailable(bool),
    /// Shared Subscription Available.
    SharedSubscriptionAvailable(bool),
}

/// A property value in its wire data type (§1.5), borrowed for encoding.
enum Value<'a> {
    /// Byte (§1.5.1).
    Byte(u8),
    /// Two Byte Integer (§1.5.2).
    Two(u16),
    /// Four Byte Integer (§1.5.3).
    Four(u32),
    /// Variable Byte Integer (§1.5.5).
    Variable(u32),
    /// UTF-8 Encoded String (§1.5.4).
    Utf8(&'a str),
    /// Binary Data (§1.5.6).
    Binary(&'a [u8]),
    /// UTF-8 String Pair (§1.5.7).
    Pair(&'a str, &'a str),
}

impl Value<'_> {
    /// Bytes the value takes on the wire.
    fn len(&self) -> usize {
        match self {
            Value::Byte(_) => 1,
            Value::Two(_) => 2,
            Value::Four(_) => 4,
            Value::Variable(v) => codec::remaining_length_len(*v as usize),
            Value::Utf8(s) => 2 + s.len(),
            Value::Binary(b) => 2 + b.len(),
            Value::Pair(name, value) => 4 + name.len() + value.len(),
        }
    }

    /// Checks that the value can be encoded: strings and binary data fit their
    /// two-byte length (§1.5.4, §1.5.6), a Variable Byte Integer its four bytes.
    fn check(&self) -> Result<(), EncodeError> {
        let fits = |len: usize| {
            if len > codec::MAX_STRING_LEN {
                Err(EncodeError::StringTooLong(len))
            } else {
                Ok(())
            }
        };
        match self {
            Value::Variable(v) if *v as usize > MAX_REMAINING_LENGTH => {
                Err(EncodeError::VariableByteIntegerTooLarge(*v))
            }
            Value::Utf8(s) => fits(s.len()),
            Value::Binary(b) => fits(b.len()),
            Value::Pair(name, value) => fits(name.len()).and(fits(value.len())),
            _ => Ok(()),
        }
    }

    /// Appends the value (already checked).
    fn put(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        match self {
            Value::Byte(v) => out.put_u8(*v),
            Value::Two(v) => out.put_u16(*v),
            Value::Four(v) => out.put_u32(*v),
            Value::Variable(v) => codec::encode_remaining_length(*v as usize, out)?,
            Value::Utf8(s) => put_binary(s.as_bytes(), out)?,
            Value::Binary(b) => put_binary(b, out)?,
            Value::Pair(name, value) => {
                put_binary(name.as_bytes(), out)?;
                put_binary(value.as_bytes(), out)?;
            }
        }
        Ok(())
    }
}

/// Appends binary data or a string with its two-byte length (§1.5.4, §1.5.6).
///
/// # Errors
///
/// [`EncodeError::StringTooLong`] over 65,535 bytes; nothing is written then.
pub fn put_binary(bytes: &[u8], out: &mut BytesMut) -> Result<(), EncodeError> {
    let len = u16::try_from(bytes.len()).map_err(|_| EncodeError::StringTooLong(bytes.len()))?;
    out.put_u16(len);
    out.put_slice(bytes);
    Ok(())
}

impl Property {
    /// The property's identifier.
    pub fn id(&self) -> PropertyId {
        self.wire().0
    }

    /// The identifier and the value in its wire data type.
    fn wire(&self) -> (PropertyId, Value<'_>) {
        use Property as P;
        use PropertyId as I;
        match self {
            P::PayloadFormatIndicator(v) => (I::PayloadFormatIndicator, Value::Byte(u8::from(*v))),
            P::MessageExpiryInterval(v) => (I::MessageExpiryInterval, Value::Four(*v)),
            P::ContentType(v) => (I::ContentType, Value::Utf8(v)),
            P::ResponseTopic(v) => (I::ResponseTopic, Value::Utf8(v)),
            P::CorrelationData(v) => (I::CorrelationData, Value::Binary(v)),
            P::SubscriptionIdentifier(v) => (I::SubscriptionIdentifier, Value::Variable(v.get())),
            P::SessionExpiryInterval(v) => (I::SessionExpiryInterval, Value::Four(*v)),
            P::AssignedClientIdentifier(v) => (I::AssignedClientIdentifier, Value::Utf8(v)),
            P::ServerKeepAlive(v) => (I::ServerKeepAlive, Value::Two(*v)),
            P::AuthenticationMethod(v) => (I::AuthenticationMethod, Value::Utf8(v)),
            P::AuthenticationData(v) => (I::AuthenticationData, Value::Binary(v)),
            P::RequestProblemInformation(v) => {
                (I::RequestProblemInformation, Value::Byte(u8::from(*v)))
            }
            P::WillDelayInterval(v) => (I::WillDelayInterval, Value::Four(*v)),
            P::RequestResponseInformation(v) => {
                (I::RequestResponseInformation, Value::Byte(u8::from(*v)))
            }
            P::ResponseInformation(v) => (I::ResponseInformation, Value::Utf8(v)),
            P::ServerReference(v) => (I::ServerReference, Value::Utf8(v)),
            P::ReasonString(v) => (I::ReasonString, Value::Utf8(v)),
            P::ReceiveMaximum(v) => (I::ReceiveMaximum, Value::Two(v.get())),
            P::TopicAliasMaximum(v) => (I::TopicAliasMaximum, Value::Two(*v)),
            P::TopicAlias(v) => (I::TopicAlias, Value::Two(v.get())),
            P::MaximumQoS(v) => (I::MaximumQoS, Value::Byte(*v as u8)),
            P::RetainAvailable(v) => (I::RetainAvailable, Value::Byte(u8::from(*v))),
            P::UserProperty(name, value) => (I::UserProperty, Value::Pair(name, value)),
            P::MaximumPacketSize(v) => (I::MaximumPacketSize, Value::Four(v.get())),
            P::WildcardSubscriptionAvailable(v) => {
                (I::WildcardSubscriptionAvailable, Value::Byte(u8::from(*v)))
            }
            P::SubscriptionIdentifierAvailable(v) => (
                I::SubscriptionIdentifierAvailable,
                Value::Byte(u8::from(*v)),
            ),
            P::SharedSubscriptionAvailable(v) => {
                (I::SharedSubscriptionAvailable, Value::Byte(u8::from(*v)))
            }
        }
    }

    /// Reads the value of property `id` and checks it (see the module doc).
    fn read(id: PropertyId, reader: &mut Reader<'_>) -> Result<Property, DecodeError> {
        use DecodeError as E;
        use Property as P;
        use PropertyId as I;
        let flag = |reader: &mut Reader<'_>| -> Result<bool, DecodeError> {
            match reader.u8()? {
                0 => Ok(false),
                1 => Ok(true),
                value => Err(match id {
                    I::PayloadFormatIndicator => E::InvalidPayloadFormatIndicator(value),
                    I::RequestProblemInformation => E::InvalidRequestProblemInformation(value),
                    I::RequestResponseInformation => E::InvalidRequestResponseInformation(value),
                    _ => E::InvalidFlagProperty {
                        property: id,
                        value,
                    },
                }),
            }
        };
        Ok(match id {
            I::PayloadFormatIndicator => P::PayloadFormatIndicator(flag(reader)?),
            I::MessageExpiryInterval => P::MessageExpiryInterval(reader.u32()?),
            I::ContentType => P::ContentType(reader.string()?),
            I::ResponseTopic => P::ResponseTopic(reader.string()?),
            I::CorrelationData => P::CorrelationData(reader.bytes()?),
            I::SubscriptionIdentifier => P::SubscriptionIdentifier(
                NonZeroU32::new(reader.variable()?).ok_or(E::ZeroSubscriptionIdentifier)?,
            ),
            I::SessionExpiryInterval => P::SessionExpiryInterval(reader.u32()?),
            I::AssignedClientIdentifier => P::AssignedClientIdentifier(reader.string()?),
            I::ServerKeepAlive => P::ServerKeepAlive(reader.u16()?),
            I::AuthenticationMethod => P::AuthenticationMethod(reader.string()?),
            I::AuthenticationData => P::AuthenticationData(reader.bytes()?),
            I::RequestProblemInformation => P::RequestProblemInformation(flag(reader)?),
            I::WillDelayInterval => P::WillDelayInterval(reader.u32()?),
            I::RequestResponseInformation => P::RequestResponseInformation(flag(reader)?),
            I::ResponseInformation => P::ResponseInformation(reader.string()?),
            I::ServerReference => P::ServerReference(reader.string()?),
            I::ReasonString => P::ReasonString(reader.string()?),
            I::ReceiveMaximum => {
                P::ReceiveMaximum(NonZeroU16::new(reader.u16()?).ok_or(E::ZeroReceiveMaximum)?)
            }
            I::TopicAliasMaximum => P::TopicAliasMaximum(reader.u16()?),
            I::TopicAlias => {
                P::TopicAlias(NonZeroU16::new(reader.u16()?).ok_or(E::ZeroTopicAlias)?)
            }
            I::MaximumQoS => match reader.u8()? {
                0 => P::MaximumQoS(QoS::AtMostOnce),
                1 => P::MaximumQoS(QoS::AtLeastOnce),
                value => return Err(E::InvalidMaximumQoS(value)),
            },
            I::RetainAvailable => P::RetainAvailable(flag(reader)?),
            I::UserProperty => P::UserProperty(reader.string()?, reader.string()?),
            I::MaximumPacketSize => P::MaximumPacketSize(
                NonZeroU32::new(reader.u32()?).ok_or(E::ZeroMaximumPacketSize)?,
            ),
            I::WildcardSubscriptionAvailable => P::WildcardSubscriptionAvailable(flag(reader)?),
            I::SubscriptionIdentifierAvailable => P::SubscriptionIdentifierAvailable(flag(reader)?),
            I::SharedSubscriptionAvailable => P::SharedSubscriptionAvailable(flag(reader)?),
        })
    }
}

/// The properties of one packet or Will, in wire order. Empty (the common case)
/// without an allocation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties {
    /// The properties in the order they were decoded or pushed.
    list: Vec<Property>,
}

/// Generates a typed accessor per property that appears at most once: the
/// first value of that kind, `None` when absent. `copy` values are returned by
/// value, `borrow` ones by reference.
macro_rules! accessors {
    ($(copy $name:ident: $variant:ident -> $ty:ty;)* $(borrow $bname:ident: $bvariant:ident -> $bty:ty;)*) => {
        $(
            #[doc = concat!("The ", stringify!($variant), " property, if present.")]
            pub fn $name(&self) -> Option<$ty> {
                self.list.iter().find_map(|property| match property {
                    Property::$variant(value) => Some(*value),
                    _ => None,
                })
            }
        )*
        $(
            #[doc = concat!("The ", stringify!($bvariant), " property, if present.")]
            pub fn $bname(&self) -> Option<&$bty> {
                self.list.iter().find_map(|property| match property {
                    Property::$bvariant(value) => Some(value),
                    _ => None,
                })
            }
        )*
    };
}

impl Properties {
    /// An empty set; does not allocate.
    pub const fn new() -> Properties {
        Properties { list: Vec::new() }
    }

    /// Whether there are no properties.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// How many properties there are (each User Property counts).
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// The properties in wire order.
    pub fn iter(&self) -> std::slice::Iter<'_, Property> {
        self.list.iter()
    }

    /// Appends a property; encoding writes them in this order and refuses a
    /// set that breaks the rules of the packet it is encoded in.
    pub fn push(&mut self, property: Property) {
        self.list.push(property);
    }

    /// This set with `property` appended (for building a set in one
    /// expression).
    pub fn with(mut self, property: Property) -> Properties {
        self.push(property);
        self
    }

    /// Whether a property with identifier `id` is present.
    pub fn contains(&self, id: PropertyId) -> bool {
        self.list.iter().any(|property| property.id() == id)
    }

    accessors! {
        copy payload_format_indicator: PayloadFormatIndicator -> bool;
        copy message_expiry_interval: MessageExpiryInterval -> u32;
        copy session_expiry_interval: SessionExpiryInterval -> u32;
        copy server_keep_alive: ServerKeepAlive -> u16;
        copy request_problem_information: RequestProblemInformation -> bool;
        copy will_delay_interval: WillDelayInterval -> u32;
        copy request_response_information: RequestResponseInformation -> bool;
        copy receive_maximum: ReceiveMaximum -> NonZeroU16;
        copy topic_alias_maximum: TopicAliasMaximum -> u16;
        copy topic_alias: TopicAlias -> NonZeroU16;
        copy maximum_qos: MaximumQoS -> QoS;
        copy retain_available: RetainAvailable -> bool;
        copy maximum_packet_size: MaximumPacketSize -> NonZeroU32;
        copy wildcard_subscription_available: WildcardSubscriptionAvailable -> bool;
        copy subscription_identifier_available: SubscriptionIdentifierAvailable -> bool;
        copy shared_subscription_available: SharedSubscriptionAvailable -> bool;
        borrow content_type: ContentType -> ByteString;
        borrow response_topic: ResponseTopic -> ByteString;
        borrow correlation_data: CorrelationData -> Bytes;
        borrow assigned_client_identifier: AssignedClientIdentifier -> ByteString;
        borrow authentication_method: AuthenticationMethod -> ByteString;
        borrow authentication_data: AuthenticationData -> Bytes;
        borrow response_information: ResponseInformation -> ByteString;
        borrow server_reference: ServerReference -> ByteString;
        borrow reason_string: ReasonString -> ByteString;
    }

    /// The User Properties (name, value) in wire order.
    pub fn user_properties(&self) -> impl Iterator<Item = (&ByteString, &ByteString)> {
        self.list.iter().filter_map(|property| match property {
            Property::UserProperty(name, value) => Some((name, value)),
            _ => None,
        })
    }

    /// The Subscription Identifiers in wire order (one at most in a SUBSCRIBE,
    /// any number in a PUBLISH to a client).
    pub fn subscription_identifiers(&self) -> impl Iterator<Item = NonZeroU32> + '_ {
        self.list.iter().filter_map(|property| match property {
            Property::SubscriptionIdentifier(id) => Some(*id),
            _ => None,
        })
    }

    /// Reads a property block (its length and its properties) for `context`.
    pub(super) fn decode(
        reader: &mut Reader<'_>,
        context: Context,
    ) -> Result<Properties, DecodeError> {
        let len = reader.variable()? as usize;
        let mut block = Reader::new(
            reader
                .take(len)
                .map_err(|_| DecodeError::PropertyLengthMismatch)?,
        );
        let mut properties = Properties::new();
        let mut seen = 0u64;
        while !block.is_empty() {
            let raw = block
                .variable()
                .map_err(|e| truncated_is(e, DecodeError::PropertyLengthMismatch))?;
            let id = u8::try_from(raw)
                .ok()
                .and_then(PropertyId::from_u8)
                .ok_or(DecodeError::UnknownProperty(raw))?;
            if !id.is_valid_in(context) {
                return Err(DecodeError::PropertyNotAllowed {
                    property: id,
                    context,
                });
            }
            if !first_time(id, context, &mut seen) {
                return Err(DecodeError::DuplicateProperty(id));
            }
            let property = Property::read(id, &mut block)
                .map_err(|e| truncated_is(e, DecodeError::PropertyLengthMismatch))?;
            properties.push(property);
        }
        Ok(properties)
    }

    /// Checks this set for `context` (allowed, not repeated, values encodable)
    /// and returns the bytes it takes on the wire, Property Length included.
    pub(super) fn encoded_len(&self, context: Context) -> Result<usize, EncodeError> {
        let mut seen = 0u64;
        let mut len = 0usize;
        for property in &self.list {
            let (id, value) = property.wire();
            if !id.is_valid_in(context) {
                return Err(EncodeError::PropertyNotAllowed {
                    property: id,
                    context,
                });
            }
            if !first_time(id, context, &mut seen) {
                return Err(EncodeError::DuplicateProperty(id));
            }
            if *property == Property::MaximumQoS(QoS::ExactlyOnce) {
                return Err(EncodeError::MaximumQoS2);
            }
            value.check()?;
            // The identifier is a one-byte Variable Byte Integer (all are < 128).
            len = len.saturating_add(1 + value.len());
        }
        if len > MAX_REMAINING_LENGTH {
            return Err(EncodeError::RemainingLengthTooLarge(len));
        }
        Ok(codec::remaining_length_len(len) + len)
    }

    /// Appends the Property Length and the properties, once
    /// [`Properties::encoded_len`] has accepted them.
    pub(super) fn encode(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        let len: usize = self.list.iter().map(|p| 1 + p.wire().1.len()).sum();
        codec::encode_remaining_length(len, out)?;
        for property in &self.list {
            let (id, value) = property.wire();
            out.put_u8(id as u8);
            value.put(out)?;
        }
        Ok(())
    }
}

impl Properties {
    /// This set as a PUBLISH's property block (Property Length first), for
    /// carrying a message's forwarded properties outside MQTT (between
    /// cluster nodes).
    ///
    /// # Errors
    /// A property a PUBLISH may not carry, or a value too long.
    pub fn to_publish_block(&self) -> Result<Vec<u8>, EncodeError> {
        let len = self.encoded_len(Context::Packet(PacketType::Publish))?;
        let mut out = BytesMut::with_capacity(len);
        self.encode(&mut out)?;
        Ok(out.to_vec())
    }

    /// Reads a block written by [`Properties::to_publish_block`]; the
    /// whole of `bytes` must be the block.
    ///
    /// # Errors
    /// Not a valid PUBLISH property block, or bytes after it.
    pub fn from_publish_block(bytes: &[u8]) -> Result<Properties, DecodeError> {
        let mut reader = Reader::new(bytes);
        let properties = Properties::decode(&mut reader, Context::Packet(PacketType::Publish))?;
        if !reader.is_empty() {
            return Err(DecodeError::PropertyLengthMismatch);
        }
        Ok(properties)
    }
}

impl<'a> IntoIterator for &'a Properties {
    type Item = &'a Property;
    type IntoIter = std::slice::Iter<'a, Property>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl FromIterator<Property> for Properties {
    fn from_iter<I: IntoIterator<Item = Property>>(iter: I) -> Properties {
        Properties {
            list: iter.into_iter().collect(),
        }
    }
}

/// Records `id` in `seen` (a bit per identifier, all are below 64) and says
/// whether this is its first appearance or it may repeat in `context`.
fn first_time(id: PropertyId, context: Context, seen: &mut u64) -> bool {
    let bit = 1u64 << (id as u8);
    let first = *seen & bit == 0;
    *seen |= bit;
    first || id.is_repeatable_in(context)
}

/// Inside a property block, running out of bytes means the Property Length
/// does not match the properties: `instead` replaces [`DecodeError::Truncated`].
fn truncated_is(error: DecodeError, instead: DecodeError) -> DecodeError {
    if error == DecodeError::Truncated {
        instead
    } else {
        error
    }
}

#[cfg(test)]
mod tests {
    use super::super::ReasonCode;
    use super::super::tests::{cat, every_connack_property, props, string};
    use super::*;

    /// Decodes a property block for `context`.
    fn decode_block(bytes: &[u8], context: Context) -> Result<Properties, DecodeError> {
        let mut reader = Reader::new(bytes);
        let properties = Properties::decode(&mut reader, context)?;
        assert!(reader.is_empty(), "block not consumed");
        Ok(properties)
    }

    /// Encodes `properties` for `context`, checking the announced length.
    fn encode_block(properties: &Properties, context: Context) -> Result<Vec<u8>, EncodeError> {
        let len = properties.encoded_len(context)?;
        let mut out = BytesMut::new();
        properties.encode(&mut out)?;
        assert_eq!(out.len(), len);
        Ok(out.to_vec())
    }

    #[test]
    fn empty_properties_do_not_allocate() {
        assert_eq!(Properties::new().list.capacity(), 0);
        let decoded = decode_block(&[0], Context::Packet(PacketType::Publish)).unwrap();
        assert!(decoded.is_empty());
        assert_eq!(decoded.list.capacity(), 0);
        assert_eq!(
            encode_block(&decoded, Context::Packet(PacketType::Publish)),
            Ok(vec![0])
        );
    }

    #[test]
    fn every_connack_property_round_trips() {
        let context = Context::Packet(PacketType::ConnAck);
        let properties = every_connack_property();
        let bytes = encode_block(&properties, context).unwrap();
        assert_eq!(decode_block(&bytes, context), Ok(properties.clone()));
        assert_eq!(properties.session_expiry_interval(), Some(600));
        assert_eq!(properties.maximum_qos(), Some(QoS::AtLeastOnce));
        assert_eq!(properties.server_keep_alive(), Some(25));
        assert_eq!(properties.reason_string().map(|s| &s[..]), Some("hello"));
        assert_eq!(properties.topic_alias(), None);
        let users: Vec<_> = properties
            .user_properties()
            .map(|(n, v)| (&n[..], &v[..]))
            .collect();
        assert_eq!(users, [("z", "1"), ("a", "2")]);
        assert_eq!(properties.len(), 18);
        assert!(properties.contains(PropertyId::ServerReference));
    }

    #[test]
    fn publish_and_will_properties_round_trip() {
        use Property as P;
        let message = Properties::new()
            .with(P::PayloadFormatIndicator(true))
            .with(P::MessageExpiryInterval(60))
            .with(P::ContentType("text/plain".into()))
            .with(P::ResponseTopic("reply/me".into()))
            .with(P::CorrelationData(Bytes::from_static(b"\xFF\x00")))
            .with(P::UserProperty("k".into(), "v".into()))
            .with(P::UserProperty("k".into(), "w".into()));
        let will = message.clone().with(P::WillDelayInterval(5));
        let bytes = encode_block(&will, Context::Will).unwrap();
        assert_eq!(decode_block(&bytes, Context::Will), Ok(will.clone()));
        assert_eq!(will.will_delay_interval(), Some(5));

        let publish = message
            .with(P::TopicAlias(NonZeroU16::new(3).unwrap()))
            .with(P::SubscriptionIdentifier(NonZeroU32::new(1).unwrap()))
            .with(P::SubscriptionIdentifier(
                NonZeroU32::new(MAX_REMAINING_LENGTH as u32).unwrap(),
            ));
        let context = Context::Packet(PacketType::Publish);
        let bytes = encode_block(&publish, context).unwrap();
        assert_eq!(decode_block(&bytes, context), Ok(publish.clone()));
        let ids: Vec<u32> = publish
            .subscription_identifiers()
            .map(|id| id.get())
            .collect();
        assert_eq!(ids, [1, MAX_REMAINING_LENGTH as u32]);
    }

    #[test]
    fn wire_bytes_of_each_data_type() {
        use Property as P;
        let cases: Vec<(Property, Vec<u8>)> = vec![
            (P::PayloadFormatIndicator(true), vec![0x01, 1]),
            (
                P::ReceiveMaximum(NonZeroU16::new(0x0102).unwrap()),
                vec![0x21, 1, 2],
            ),
            (P::SessionExpiryInterval(0x01020304), vec![0x11, 1, 2, 3, 4]),
            (
                P::SubscriptionIdentifier(NonZeroU32::new(128).unwrap()),
                vec![0x0B, 0x80, 0x01],
            ),
            (
                P::ContentType("é".into()),
                cat(&[&[0x03], &string("é".as_bytes())]),
            ),
            (
                P::CorrelationData(Bytes::from_static(b"\x00")),
                cat(&[&[0x09], &string(b"\x00")]),
            ),
            (
                P::UserProperty("n".into(), "v".into()),
                cat(&[&[0x26], &string(b"n"), &string(b"v")]),
            ),
        ];
        for (property, wire) in cases {
            let context = if property.id() == PropertyId::ReceiveMaximum
                || property.id() == PropertyId::SessionExpiryInterval
            {
                Context::Packet(PacketType::Connect)
            } else {
                Context::Packet(PacketType::Publish)
            };
            let set = Properties::new().with(property);
            let bytes = encode_block(&set, context).unwrap();
            assert_eq!(bytes, props(&wire), "{set:?}");
            assert_eq!(decode_block(&bytes, context), Ok(set));
        }
    }

    /// Decodes `block` (without its length) for `context`, expecting `error`
    /// with reason code `reason`.
    fn refused(block: &[u8], context: Context, error: DecodeError, reason: ReasonCode) {
        assert_eq!(decode_block(&props(block), context), Err(error.clone()));
        assert_eq!(error.reason_code(), reason, "{error:?}");
    }

    #[test]
    fn unknown_and_misplaced_properties_are_malformed() {
        use DecodeError as E;
        let connect = Context::Packet(PacketType::Connect);
        let malformed = ReasonCode::MALFORMED_PACKET;
        refused(&[0x00, 0], connect, E::UnknownProperty(0), malformed);
        refused(&[0x04, 0], connect, E::UnknownProperty(4), malformed);
        refused(&[0x2B, 0], connect, E::UnknownProperty(0x2B), malformed);
        // A two-byte identifier (129), defined nowhere.
        refused(
            &[0x81, 0x01, 0],
            connect,
            E::UnknownProperty(129),
            malformed,
        );
        // A non-minimal identifier.
        refused(
            &[0x91, 0x00, 0, 0, 0, 0],
            connect,
            E::NonMinimalVariableByteInteger,
            malformed,
        );
        let misplaced: [(&[u8], Context, PropertyId); 5] = [
            (&[0x23, 0, 1], connect, PropertyId::TopicAlias),
            (&[0x12, 0, 0], connect, PropertyId::AssignedClientIdentifier),
            (
                &[0x11, 0, 0, 0, 1],
                Context::Will,
                PropertyId::SessionExpiryInterval,
            ),
            (&[0x18, 0, 0, 0, 1], connect, PropertyId::WillDelayInterval),
            (
                &[0x1F, 0, 0],
                Context::Packet(PacketType::Subscribe),
                PropertyId::ReasonString,
            ),
        ];
        for (block, context, property) in misplaced {
            refused(
                block,
                context,
                E::PropertyNotAllowed { property, context },
                malformed,
            );
        }
    }

    #[test]
    fn duplicates_are_protocol_errors() {
        use DecodeError as E;
        let protocol = ReasonCode::PROTOCOL_ERROR;
        let connect = Context::Packet(PacketType::Connect);
        refused(
            &[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2],
            connect,
            E::DuplicateProperty(PropertyId::SessionExpiryInterval),
            protocol,
        );
        refused(
            &[0x0B, 1, 0x0B, 2],
            Context::Packet(PacketType::Subscribe),
            E::DuplicateProperty(PropertyId::SubscriptionIdentifier),
            protocol,
        );
        let pair = cat(&[&[0x26], &string(b"a"), &string(b"b")]);
        let twice = cat(&[&pair, &pair]);
        assert_eq!(
            decode_block(&props(&twice), connect).map(|p| p.len()),
            Ok(2)
        );
        let publish = Context::Packet(PacketType::Publish);
        assert_eq!(
            decode_block(&props(&[0x0B, 1, 0x0B, 2]), publish).map(|p| p.len()),
            Ok(2)
        );
    }

    #[test]
    fn values_out_of_range() {
        use DecodeError as E;
        let protocol = ReasonCode::PROTOCOL_ERROR;
        let connect = Context::Packet(PacketType::Connect);
        let connack = Context::Packet(PacketType::ConnAck);
        let publish = Context::Packet(PacketType::Publish);
        let cases: [(&[u8], Context, DecodeError, ReasonCode); 11] = [
            (
                &[0x01, 2],
                publish,
                E::InvalidPayloadFormatIndicator(2),
                protocol,
            ),
            (
                &[0x01, 0xFF],
                Context::Will,
                E::InvalidPayloadFormatIndicator(0xFF),
                protocol,
            ),
            (
                &[0x17, 2],
                connect,
                E::InvalidRequestProblemInformation(2),
                protocol,
            ),
            (
                &[0x19, 7],
                connect,
                E::InvalidRequestResponseInformation(7),
                protocol,
            ),
            (&[0x21, 0, 0], connect, E::ZeroReceiveMaximum, protocol),
            (
                &[0x27, 0, 0, 0, 0],
                connect,
                E::ZeroMaximumPacketSize,
                protocol,
            ),
            (
                &[0x23, 0, 0],
                publish,
                E::ZeroTopicAlias,
                ReasonCode::TOPIC_ALIAS_INVALID,
            ),
            (
                &[0x0B, 0],
                Context::Packet(PacketType::Subscribe),
                E::ZeroSubscriptionIdentifier,
                protocol,
            ),
            (&[0x24, 2], connack, E::InvalidMaximumQoS(2), protocol),
            (
                &[0x25, 2],
                connack,
                E::InvalidFlagProperty {
                    property: PropertyId::RetainAvailable,
                    value: 2,
                },
                protocol,
            ),
            (
                &[0x0B, 0x80, 0x80, 0x80, 0x80, 0x01],
                publish,
                E::MalformedVariableByteInteger,
                ReasonCode::MALFORMED_PACKET,
            ),
        ];
        for (block, context, error, reason) in cases {
            refused(block, context, error, reason);
        }
    }

    #[test]
    fn strings_must_be_utf8_without_nul() {
        let publish = Context::Packet(PacketType::Publish);
        let malformed = ReasonCode::MALFORMED_PACKET;
        let bad: [&[u8]; 4] = [b"\xFF", b"a\x00", b"\xED\xA0\x80", b"\xC0\x80"];
        for raw in bad {
            let content_type = cat(&[&[0x03], &string(raw)]);
            refused(&content_type, publish, DecodeError::InvalidUtf8, malformed);
            // Either half of a User Property pair.
            let name = cat(&[&[0x26], &string(raw), &string(b"v")]);
            refused(&name, publish, DecodeError::InvalidUtf8, malformed);
            let value = cat(&[&[0x26], &string(b"n"), &string(raw)]);
            refused(&value, publish, DecodeError::InvalidUtf8, malformed);
        }
    }

    #[test]
    fn property_length_must_match() {
        let publish = Context::Packet(PacketType::Publish);
        let mismatch = DecodeError::PropertyLengthMismatch;
        // A Message Expiry Interval cut by the Property Length.
        let mut reader = Reader::new(&[3, 0x02, 0, 0, 0, 1]);
        assert_eq!(
            Properties::decode(&mut reader, publish),
            Err(mismatch.clone())
        );
        // A Property Length beyond the packet.
        let mut reader = Reader::new(&[9, 0x01, 1]);
        assert_eq!(
            Properties::decode(&mut reader, publish),
            Err(mismatch.clone())
        );
        // A string whose length runs past the block.
        refused(
            &[0x03, 0, 5, b'a'],
            publish,
            mismatch.clone(),
            ReasonCode::MALFORMED_PACKET,
        );
        // Missing the Property Length itself is a short packet.
        let mut reader = Reader::new(&[]);
        assert_eq!(
            Properties::decode(&mut reader, publish),
            Err(DecodeError::Truncated)
        );
        // The block ends where it says: what follows is the caller's.
        let mut reader = Reader::new(&[2, 0x01, 1, 0xAA]);
        assert!(Properties::decode(&mut reader, publish).is_ok());
        assert_eq!(reader.u8(), Ok(0xAA));
    }

    #[test]
    fn encoding_checks_the_same_rules() {
        use Property as P;
        let connect = Context::Packet(PacketType::Connect);
        let set = Properties::new().with(P::TopicAlias(NonZeroU16::new(1).unwrap()));
        assert_eq!(
            encode_block(&set, connect),
            Err(EncodeError::PropertyNotAllowed {
                property: PropertyId::TopicAlias,
                context: connect
            })
        );
        let twice = Properties::new()
            .with(P::SessionExpiryInterval(1))
            .with(P::SessionExpiryInterval(2));
        assert_eq!(
            encode_block(&twice, connect),
            Err(EncodeError::DuplicateProperty(
                PropertyId::SessionExpiryInterval
            ))
        );
        let connack = Context::Packet(PacketType::ConnAck);
        let qos2 = Properties::new().with(P::MaximumQoS(QoS::ExactlyOnce));
        assert_eq!(encode_block(&qos2, connack), Err(EncodeError::MaximumQoS2));
        let long = "x".repeat(65_536);
        let set = Properties::new().with(P::ReasonString(long.as_str().into()));
        assert_eq!(
            encode_block(&set, connack),
            Err(EncodeError::StringTooLong(65_536))
        );
        let set = Properties::new().with(P::UserProperty("n".into(), long.as_str().into()));
        assert_eq!(
            encode_block(&set, connack),
            Err(EncodeError::StringTooLong(65_536))
        );
        let huge = NonZeroU32::new(MAX_REMAINING_LENGTH as u32 + 1).unwrap();
        let set = Properties::new().with(P::SubscriptionIdentifier(huge));
        assert_eq!(
            encode_block(&set, Context::Packet(PacketType::Publish)),
            Err(EncodeError::VariableByteIntegerTooLarge(huge.get()))
        );
    }

    #[test]
    fn repeatable_only_where_the_spec_says() {
        let publish = Context::Packet(PacketType::Publish);
        let subscribe = Context::Packet(PacketType::Subscribe);
        assert!(PropertyId::UserProperty.is_repeatable_in(Context::Will));
        assert!(PropertyId::SubscriptionIdentifier.is_repeatable_in(publish));
        assert!(!PropertyId::SubscriptionIdentifier.is_repeatable_in(subscribe));
        assert!(!PropertyId::ContentType.is_repeatable_in(publish));
        assert_eq!(
            PropertyId::from_u8(0x2A),
            Some(PropertyId::SharedSubscriptionAvailable)
        );
        assert_eq!(PropertyId::from_u8(0x14), None);
    }
}
