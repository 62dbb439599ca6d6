//! MQTT 5.0 Reason Codes (§2.4): one byte in CONNACK, PUBACK, PUBREC, PUBREL,
//! PUBCOMP, SUBACK, UNSUBACK, DISCONNECT and AUTH saying how an operation went.
//! Values below 0x80 are successes, 0x80 and above failures.
//!
//! Some values have several names, one per packet (0x00 is Success, Normal
//! disconnection and Granted QoS 0), so a [`ReasonCode`] is a byte with named
//! constants rather than an enum. [`ReasonCode::is_valid_for`] says which
//! packets may carry a value (Table 2-6), [`ReasonCode::client_may_send`] and
//! [`ReasonCode::server_may_send`] which side may send it there.

use super::PacketType;

/// A Reason Code (§2.4), with a constant for each name the specification gives.
/// The default is 0x00 Success.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReasonCode(pub u8);

/// Bit of `packet` in a mask of packet types.
const fn bit(packet: PacketType) -> u16 {
    1 << packet as u8
}

/// CONNACK.
const CA: u16 = bit(PacketType::ConnAck);
/// PUBACK.
const PA: u16 = bit(PacketType::PubAck);
/// PUBREC.
const PRC: u16 = bit(PacketType::PubRec);
/// PUBREL.
const PRL: u16 = bit(PacketType::PubRel);
/// PUBCOMP.
const PC: u16 = bit(PacketType::PubComp);
/// SUBACK.
const SA: u16 = bit(PacketType::SubAck);
/// UNSUBACK.
const UA: u16 = bit(PacketType::UnsubAck);
/// DISCONNECT.
const D: u16 = bit(PacketType::Disconnect);
/// AUTH.
const AU: u16 = bit(PacketType::Auth);

/// Table 2-6 of §2.4: each Reason Code, its name (the first the specification
/// lists for the value) and the packets that may carry it.
const TABLE: &[(u8, &str, u16)] = &[
    (0x00, "Success", CA | PA | PRC | PRL | PC | SA | UA | D | AU),
    (0x01, "Granted QoS 1", SA),
    (0x02, "Granted QoS 2", SA),
    (0x04, "Disconnect with Will Message", D),
    (0x10, "No matching subscribers", PA | PRC),
    (0x11, "No subscription existed", UA),
    (0x18, "Continue authentication", AU),
    (0x19, "Re-authenticate", AU),
    (0x80, "Unspecified error", CA | PA | PRC | SA | UA | D),
    (0x81, "Malformed Packet", CA | D),
    (0x82, "Protocol Error", CA | D),
    (
        0x83,
        "Implementation specific error",
        CA | PA | PRC | SA | UA | D,
    ),
    (0x84, "Unsupported Protocol Version", CA),
    (0x85, "Client Identifier not valid", CA),
    (0x86, "Bad User Name or Password", CA),
    (0x87, "Not authorized", CA | PA | PRC | SA | UA | D),
    (0x88, "Server unavailable", CA),
    (0x89, "Server busy", CA | D),
    (0x8A, "Banned", CA),
    (0x8B, "Server shutting down", D),
    (0x8C, "Bad authentication method", CA | D),
    (0x8D, "Keep Alive timeout", D),
    (0x8E, "Session taken over", D),
    (0x8F, "Topic Filter invalid", SA | UA | D),
    (0x90, "Topic Name invalid", CA | PA | PRC | D),
    (0x91, "Packet Identifier in use", PA | PRC | SA | UA),
    (0x92, "Packet Identifier not found", PRL | PC),
    (0x93, "Receive Maximum exceeded", D),
    (0x94, "Topic Alias invalid", D),
    (0x95, "Packet too large", CA | D),
    (0x96, "Message rate too high", D),
    (0x97, "Quota exceeded", CA | PA | PRC | SA | D),
    (0x98, "Administrative action", D),
    (0x99, "Payload format invalid", CA | PA | PRC | D),
    (0x9A, "Retain not supported", CA | D),
    (0x9B, "QoS not supported", CA | D),
    (0x9C, "Use another server", CA | D),
    (0x9D, "Server moved", CA | D),
    (0x9E, "Shared Subscriptions not supported", SA | D),
    (0x9F, "Connection rate exceeded", CA | D),
    (0xA0, "Maximum connect time", D),
    (0xA1, "Subscription Identifiers not supported", SA | D),
    (0xA2, "Wildcard Subscriptions not supported", SA | D),
];

/// The DISCONNECT Reason Codes a client may send (§3.14.2.1, "Sent by").
const CLIENT_DISCONNECT: [u8; 14] = [
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99,
];

// The whole table of §2.4, named as the specification names them; the
// broker sends only some of them.
#[allow(
    dead_code,
    reason = "the table of §2.4 is complete, the broker uses part of it"
)]
impl ReasonCode {
    /// 0x00 Success: CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK, AUTH.
    pub const SUCCESS: ReasonCode = ReasonCode(0x00);
    /// 0x00 Normal disconnection: DISCONNECT, the Will Message is not sent.
    pub const NORMAL_DISCONNECTION: ReasonCode = ReasonCode(0x00);
    /// 0x00 Granted QoS 0: SUBACK.
    pub const GRANTED_QOS_0: ReasonCode = ReasonCode(0x00);
    /// 0x01 Granted QoS 1: SUBACK.
    pub const GRANTED_QOS_1: ReasonCode = ReasonCode(0x01);
    /// 0x02 Granted QoS 2: SUBACK.
    pub const GRANTED_QOS_2: ReasonCode = ReasonCode(0x02);
    /// 0x04 Disconnect with Will Message: DISCONNECT from a client that wants
    /// its Will Message published.
    pub const DISCONNECT_WITH_WILL_MESSAGE: ReasonCode = ReasonCode(0x04);
    /// 0x10 No matching subscribers: PUBACK, PUBREC (still a success).
    pub const NO_MATCHING_SUBSCRIBERS: ReasonCode = ReasonCode(0x10);
    /// 0x11 No subscription existed: UNSUBACK.
    pub const NO_SUBSCRIPTION_EXISTED: ReasonCode = ReasonCode(0x11);
    /// 0x18 Continue authentication: AUTH.
    pub const CONTINUE_AUTHENTICATION: ReasonCode = ReasonCode(0x18);
    /// 0x19 Re-authenticate: AUTH from a client.
    pub const RE_AUTHENTICATE: ReasonCode = ReasonCode(0x19);
    /// 0x80 Unspecified error.
    pub const UNSPECIFIED_ERROR: ReasonCode = ReasonCode(0x80);
    /// 0x81 Malformed Packet: the packet could not be parsed correctly (§4.13).
    pub const MALFORMED_PACKET: ReasonCode = ReasonCode(0x81);
    /// 0x82 Protocol Error: a parsed packet breaks a rule of the protocol.
    pub const PROTOCOL_ERROR: ReasonCode = ReasonCode(0x82);
    /// 0x83 Implementation specific error.
    pub const IMPLEMENTATION_SPECIFIC_ERROR: ReasonCode = ReasonCode(0x83);
    /// 0x84 Unsupported Protocol Version: CONNACK.
    pub const UNSUPPORTED_PROTOCOL_VERSION: ReasonCode = ReasonCode(0x84);
    /// 0x85 Client Identifier not valid: CONNACK.
    pub const CLIENT_IDENTIFIER_NOT_VALID: ReasonCode = ReasonCode(0x85);
    /// 0x86 Bad User Name or Password: CONNACK.
    pub const BAD_USER_NAME_OR_PASSWORD: ReasonCode = ReasonCode(0x86);
    /// 0x87 Not authorized.
    pub const NOT_AUTHORIZED: ReasonCode = ReasonCode(0x87);
    /// 0x88 Server unavailable: CONNACK.
    pub const SERVER_UNAVAILABLE: ReasonCode = ReasonCode(0x88);
    /// 0x89 Server busy.
    pub const SERVER_BUSY: ReasonCode = ReasonCode(0x89);
    /// 0x8A Banned: CONNACK.
    pub const BANNED: ReasonCode = ReasonCode(0x8A);
    /// 0x8B Server shutting down: DISCONNECT.
    pub const SERVER_SHUTTING_DOWN: ReasonCode = ReasonCode(0x8B);
    /// 0x8C Bad authentication method.
    pub const BAD_AUTHENTICATION_METHOD: ReasonCode = ReasonCode(0x8C);
    /// 0x8D Keep Alive timeout: DISCONNECT.
    pub const KEEP_ALIVE_TIMEOUT: ReasonCode = ReasonCode(0x8D);
    /// 0x8E Session taken over: DISCONNECT to the older of two connections with
    /// one client identifier.
    pub const SESSION_TAKEN_OVER: ReasonCode = ReasonCode(0x8E);
    /// 0x8F Topic Filter invalid.
    pub const TOPIC_FILTER_INVALID: ReasonCode = ReasonCode(0x8F);
    /// 0x90 Topic Name invalid.
    pub const TOPIC_NAME_INVALID: ReasonCode = ReasonCode(0x90);
    /// 0x91 Packet Identifier in use.
    pub const PACKET_IDENTIFIER_IN_USE: ReasonCode = ReasonCode(0x91);
    /// 0x92 Packet Identifier not found: PUBREL, PUBCOMP.
    pub const PACKET_IDENTIFIER_NOT_FOUND: ReasonCode = ReasonCode(0x92);
    /// 0x93 Receive Maximum exceeded: DISCONNECT.
    pub const RECEIVE_MAXIMUM_EXCEEDED: ReasonCode = ReasonCode(0x93);
    /// 0x94 Topic Alias invalid: DISCONNECT.
    pub const TOPIC_ALIAS_INVALID: ReasonCode = ReasonCode(0x94);
    /// 0x95 Packet too large.
    pub const PACKET_TOO_LARGE: ReasonCode = ReasonCode(0x95);
    /// 0x96 Message rate too high: DISCONNECT.
    pub const MESSAGE_RATE_TOO_HIGH: ReasonCode = ReasonCode(0x96);
    /// 0x97 Quota exceeded.
    pub const QUOTA_EXCEEDED: ReasonCode = ReasonCode(0x97);
    /// 0x98 Administrative action: DISCONNECT.
    pub const ADMINISTRATIVE_ACTION: ReasonCode = ReasonCode(0x98);
    /// 0x99 Payload format invalid.
    pub const PAYLOAD_FORMAT_INVALID: ReasonCode = ReasonCode(0x99);
    /// 0x9A Retain not supported.
    pub const RETAIN_NOT_SUPPORTED: ReasonCode = ReasonCode(0x9A);
    /// 0x9B QoS not supported.
    pub const QOS_NOT_SUPPORTED: ReasonCode = ReasonCode(0x9B);
    /// 0x9C Use another server.
    pub const USE_ANOTHER_SERVER: ReasonCode = ReasonCode(0x9C);
    /// 0x9D Server moved.
    pub const SERVER_MOVED: ReasonCode = ReasonCode(0x9D);
    /// 0x9E Shared Subscriptions not supported.
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: ReasonCode = ReasonCode(0x9E);
    /// 0x9F Connection rate exceeded.
    pub const CONNECTION_RATE_EXCEEDED: ReasonCode = ReasonCode(0x9F);
    /// 0xA0 Maximum connect time: DISCONNECT.
    pub const MAXIMUM_CONNECT_TIME: ReasonCode = ReasonCode(0xA0);
    /// 0xA1 Subscription Identifiers not supported.
    pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: ReasonCode = ReasonCode(0xA1);
    /// 0xA2 Wildcard Subscriptions not supported.
    pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: ReasonCode = ReasonCode(0xA2);

    /// The SUBACK success code granting `qos` (0x00, 0x01 or 0x02).
    pub fn granted(qos: crate::protocol::v3::QoS) -> ReasonCode {
        ReasonCode(qos as u8)
    }

    /// Whether this is a failure (0x80 and above, §2.4).
    pub fn is_failure(self) -> bool {
        self.0 >= 0x80
    }

    /// The specification's name for this value (the first one where it has
    /// several), `None` for a value §2.4 does not define.
    pub fn name(self) -> Option<&'static str> {
        Self::entry(self.0).map(|(_, name, _)| name)
    }

    /// Whether `packet` may carry this Reason Code (Table 2-6 of §2.4 and the
    /// per-packet tables of chapter 3).
    pub fn is_valid_for(self, packet: PacketType) -> bool {
        Self::entry(self.0).is_some_and(|(_, _, packets)| packets & bit(packet) != 0)
    }

    /// Whether a client may send this Reason Code in `packet`: one `packet`
    /// may carry, and one the "Sent by" columns allow a client. They matter
    /// for DISCONNECT (§3.14.2.1: Session taken over, Server shutting down
    /// and the like only a server sends; MQTT-3.14.2-1) and AUTH (§3.15.2.1:
    /// a client sends Continue authentication or Re-authenticate, never
    /// Success). CONNACK, SUBACK and UNSUBACK only a server sends.
    pub fn client_may_send(self, packet: PacketType) -> bool {
        match packet {
            PacketType::Disconnect => CLIENT_DISCONNECT.contains(&self.0),
            PacketType::Auth => {
                self == Self::CONTINUE_AUTHENTICATION || self == Self::RE_AUTHENTICATE
            }
            PacketType::ConnAck | PacketType::SubAck | PacketType::UnsubAck => false,
            _ => self.is_valid_for(packet),
        }
    }

    /// Whether a server may send this Reason Code in `packet`: one `packet`
    /// may carry, except Disconnect with Will Message (a client's, §3.14.2.1)
    /// and Re-authenticate (a client's, §3.15.2.1).
    ///
    /// Nor Bad authentication method in a DISCONNECT: Table 2-6 lists it
    /// there, the DISCONNECT table of §3.14.2.1 does not, and clients that
    /// follow the latter (rumqttc, MQTTnet's server-side list) cannot parse
    /// it; a failed re-authentication can say 0x87 Not authorized instead.
    pub fn server_may_send(self, packet: PacketType) -> bool {
        match packet {
            PacketType::Disconnect => {
                self != Self::DISCONNECT_WITH_WILL_MESSAGE
                    && self != Self::BAD_AUTHENTICATION_METHOD
                    && self.is_valid_for(packet)
            }
            PacketType::Auth => self == Self::SUCCESS || self == Self::CONTINUE_AUTHENTICATION,
            _ => self.is_valid_for(packet),
        }
    }

    /// The row of [`TABLE`] for `value`.
    fn entry(value: u8) -> Option<(u8, &'static str, u16)> {
        TABLE.iter().copied().find(|(code, _, _)| *code == value)
    }
}

impl std::fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{:#04x} {name}", self.0),
            None => write!(f, "{:#04x}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_unique() {
        assert!(TABLE.windows(2).all(|pair| pair[0].0 < pair[1].0));
        assert_eq!(TABLE.len(), 43);
    }

    #[test]
    fn packets_per_code() {
        use PacketType as T;
        assert!(ReasonCode::SUCCESS.is_valid_for(T::ConnAck));
        assert!(ReasonCode::SUCCESS.is_valid_for(T::Auth));
        assert!(!ReasonCode::SUCCESS.is_valid_for(T::Publish));
        assert!(ReasonCode::GRANTED_QOS_2.is_valid_for(T::SubAck));
        assert!(!ReasonCode::GRANTED_QOS_2.is_valid_for(T::PubAck));
        assert!(ReasonCode::PACKET_IDENTIFIER_NOT_FOUND.is_valid_for(T::PubRel));
        assert!(!ReasonCode::PACKET_IDENTIFIER_NOT_FOUND.is_valid_for(T::PubAck));
        assert!(ReasonCode::SESSION_TAKEN_OVER.is_valid_for(T::Disconnect));
        assert!(!ReasonCode::SESSION_TAKEN_OVER.is_valid_for(T::ConnAck));
        assert!(ReasonCode::MALFORMED_PACKET.is_valid_for(T::ConnAck));
        assert!(!ReasonCode::TOPIC_ALIAS_INVALID.is_valid_for(T::ConnAck));
        assert!(!ReasonCode(0x03).is_valid_for(T::Disconnect));
        assert!(!ReasonCode(0xFF).is_valid_for(T::Disconnect));
        for code in CLIENT_DISCONNECT {
            assert!(ReasonCode(code).is_valid_for(T::Disconnect));
        }
        let will = ReasonCode::DISCONNECT_WITH_WILL_MESSAGE;
        assert!(will.client_may_send(T::Disconnect) && !will.server_may_send(T::Disconnect));
        let bad_method = ReasonCode::BAD_AUTHENTICATION_METHOD;
        assert!(
            bad_method.is_valid_for(T::Disconnect) && !bad_method.server_may_send(T::Disconnect)
        );
        assert!(bad_method.server_may_send(T::ConnAck));
        let taken = ReasonCode::SESSION_TAKEN_OVER;
        assert!(!taken.client_may_send(T::Disconnect) && taken.server_may_send(T::Disconnect));
        assert!(ReasonCode::PAYLOAD_FORMAT_INVALID.client_may_send(T::Disconnect));
        let success = ReasonCode::SUCCESS;
        assert!(!success.client_may_send(T::Auth) && success.server_may_send(T::Auth));
        let again = ReasonCode::RE_AUTHENTICATE;
        assert!(again.client_may_send(T::Auth) && !again.server_may_send(T::Auth));
        let more = ReasonCode::CONTINUE_AUTHENTICATION;
        assert!(more.client_may_send(T::Auth) && more.server_may_send(T::Auth));
        assert!(!success.client_may_send(T::ConnAck) && success.server_may_send(T::ConnAck));
        assert!(ReasonCode::QUOTA_EXCEEDED.client_may_send(T::PubAck));
        assert!(!ReasonCode(0x03).client_may_send(T::PubAck));
    }

    #[test]
    fn names_and_display() {
        assert_eq!(ReasonCode::NORMAL_DISCONNECTION, ReasonCode::SUCCESS);
        assert_eq!(ReasonCode::GRANTED_QOS_0, ReasonCode::SUCCESS);
        assert_eq!(ReasonCode::PROTOCOL_ERROR.name(), Some("Protocol Error"));
        assert_eq!(ReasonCode(0x03).name(), None);
        assert_eq!(
            ReasonCode::QUOTA_EXCEEDED.to_string(),
            "0x97 Quota exceeded"
        );
        assert_eq!(ReasonCode(0x42).to_string(), "0x42");
        assert!(ReasonCode::UNSPECIFIED_ERROR.is_failure());
        assert!(!ReasonCode::NO_SUBSCRIPTION_EXISTED.is_failure());
        assert_eq!(
            ReasonCode::granted(crate::protocol::v3::QoS::AtLeastOnce),
            ReasonCode::GRANTED_QOS_1
        );
    }
}
