//! CONNECT and CONNACK of either protocol version: a decoded CONNECT as the
//! handshake uses it ([`ConnectRequest`]), why a client is refused
//! ([`Refusal`]) and the CONNACK bytes of each version.
//!
//! MQTT 3.1.1 has one CONNACK return code per refusal (§3.2.2.3); MQTT 5.0
//! has Reason Codes (§3.2.2.2) and CONNACK properties (§3.2.2.3) that tell
//! the client the broker's limits.

use bytes::BytesMut;
use bytestring::ByteString;

use crate::config::Config;
use crate::protocol::Version;
use crate::protocol::v3::{self as codec, LastWill};
use crate::protocol::v5::{self, ConnAck, Properties, Property, ReasonCode};
use crate::session::SESSION_NEVER_EXPIRES;

/// A CONNECT, whichever protocol version it came in, reduced to what the
/// handshake needs.
pub(super) struct ConnectRequest {
    /// The protocol the connection speaks from now on.
    pub(super) version: Version,
    /// The CONNECT's Protocol Level: 3 (MQTT 3.1), 4 (3.1.1) or 5 (5.0),
    /// which the admin API shows.
    pub(super) protocol_level: u8,
    /// Clean Start (5.0, §3.1.2.4) or CleanSession (3.1.1): discard any
    /// existing session for the client id.
    pub(super) clean_start: bool,
    /// Keep Alive in seconds as the client asked (0: none).
    pub(super) keep_alive: u16,
    /// Client Identifier; empty: the broker assigns one.
    pub(super) client_id: ByteString,
    /// The will message.
    pub(super) will: Option<LastWill>,
    /// The will's properties besides the delay (5.0).
    pub(super) will_properties: Option<Box<Properties>>,
    /// Will Delay Interval in seconds (5.0; 0 for 3.1.1).
    pub(super) will_delay: u32,
    /// User Name.
    pub(super) username: Option<ByteString>,
    /// Password.
    pub(super) password: Option<bytes::Bytes>,
    /// Session Expiry Interval in seconds (§3.1.2.11.2): 0 ends the session
    /// with the connection, [`SESSION_NEVER_EXPIRES`] never. 3.1.1 maps
    /// CleanSession onto it: 1 is 0, 0 is never.
    pub(super) session_expiry: u32,
    /// The client's Receive Maximum (§3.1.2.11.3): QoS 1/2 PUBLISHes it
    /// accepts unacknowledged; 65,535 when absent (and for 3.1.1).
    pub(super) receive_maximum: u16,
    /// The client's Maximum Packet Size (§3.1.2.11.4); `u32::MAX` when
    /// absent (MQTT's own limit applies).
    pub(super) maximum_packet_size: u32,
    /// The client's Topic Alias Maximum (§3.1.2.11.8): aliases the broker
    /// may use towards it; 0 when absent (and for 3.1.1).
    pub(super) topic_alias_maximum: u16,
    /// True when the CONNECT names an Authentication Method (§3.1.2.11.9):
    /// extended authentication, which fanmq does not support.
    pub(super) authentication_method: bool,
    /// True when the will's Payload Format Indicator says UTF-8 and its
    /// payload is not (5.0; refused with 0x99, §3.1.3.2.3).
    pub(super) will_payload_invalid: bool,
    /// Request Response Information = 1 (5.0, §3.1.2.11.7): the client
    /// asks for a Response Information in CONNACK.
    pub(super) request_response_information: bool,
}

impl From<codec::Connect> for ConnectRequest {
    fn from(connect: codec::Connect) -> ConnectRequest {
        ConnectRequest {
            version: Version::V3,
            protocol_level: match connect.protocol {
                codec::ProtocolVersion::V31 => codec::PROTOCOL_LEVEL_V31,
                codec::ProtocolVersion::V311 => codec::PROTOCOL_LEVEL_V311,
            },
            clean_start: connect.clean_session,
            keep_alive: connect.keep_alive,
            client_id: connect.client_id,
            will: connect.last_will,
            will_properties: None,
            will_delay: 0,
            username: connect.username,
            password: connect.password,
            session_expiry: if connect.clean_session {
                0
            } else {
                SESSION_NEVER_EXPIRES
            },
            receive_maximum: u16::MAX,
            maximum_packet_size: u32::MAX,
            topic_alias_maximum: 0,
            authentication_method: false,
            will_payload_invalid: false,
            request_response_information: false,
        }
    }
}

impl From<Box<v5::Connect>> for ConnectRequest {
    fn from(connect: Box<v5::Connect>) -> ConnectRequest {
        let v5::Connect {
            clean_start,
            keep_alive,
            properties,
            client_id,
            will,
            username,
            password,
        } = *connect;
        let will_payload_invalid = will.as_ref().is_some_and(|will| !will.payload_is_utf8());
        let will_delay = will
            .as_ref()
            .and_then(|will| will.properties.will_delay_interval())
            .unwrap_or(0);
        let will_properties = will
            .as_ref()
            .filter(|will| !will.properties.is_empty())
            .map(|will| Box::new(will.properties.clone()));
        ConnectRequest {
            version: Version::V5,
            protocol_level: v5::PROTOCOL_VERSION,
            clean_start,
            keep_alive,
            client_id,
            will: will.map(|will| LastWill {
                topic: will.topic,
                message: will.payload,
                qos: will.qos,
                retain: will.retain,
            }),
            will_properties,
            will_delay,
            username,
            password,
            session_expiry: properties.session_expiry_interval().unwrap_or(0),
            receive_maximum: properties.receive_maximum().map_or(u16::MAX, u16::from),
            maximum_packet_size: properties.maximum_packet_size().map_or(u32::MAX, u32::from),
            topic_alias_maximum: properties.topic_alias_maximum().unwrap_or(0),
            authentication_method: properties.authentication_method().is_some(),
            will_payload_invalid,
            request_response_information: properties
                .request_response_information()
                .unwrap_or(false),
        }
    }
}

/// Why a CONNECT is refused: one CONNACK code per version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// A protocol level the broker does not speak.
    UnsupportedProtocolVersion,
    /// A client id over `max_client_id_len`, or empty without a clean
    /// session (3.1.1).
    ClientIdentifierNotValid,
    /// An unknown user or a wrong password.
    BadUserNameOrPassword,
    /// Not allowed to connect (anonymous when `allow_anonymous` is false).
    NotAuthorized,
    /// The broker is shutting down.
    ServerUnavailable,
    /// An Authentication Method (5.0): extended authentication is not
    /// supported.
    BadAuthenticationMethod,
    /// A will payload that breaks its Payload Format Indicator (5.0).
    PayloadFormatInvalid,
}

impl Refusal {
    /// The MQTT 3.1.1 CONNACK return code (§3.2.2.3).
    fn v3_code(self) -> u8 {
        match self {
            Refusal::UnsupportedProtocolVersion => codec::CONNACK_UNACCEPTABLE_PROTOCOL_VERSION,
            Refusal::ClientIdentifierNotValid => codec::CONNACK_IDENTIFIER_REJECTED,
            // 3.1.1's 4 (bad user name or password) is what Mosquitto sends
            // too, but fanmq has always answered 5; kept for its 3.1.1
            // clients.
            Refusal::BadUserNameOrPassword | Refusal::NotAuthorized => {
                codec::CONNACK_NOT_AUTHORIZED
            }
            Refusal::ServerUnavailable
            | Refusal::BadAuthenticationMethod
            | Refusal::PayloadFormatInvalid => codec::CONNACK_SERVER_UNAVAILABLE,
        }
    }

    /// The MQTT 5.0 CONNACK Reason Code (§3.2.2.2).
    pub(super) fn reason_code(self) -> ReasonCode {
        match self {
            Refusal::UnsupportedProtocolVersion => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            Refusal::ClientIdentifierNotValid => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            Refusal::BadUserNameOrPassword => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            Refusal::NotAuthorized => ReasonCode::NOT_AUTHORIZED,
            Refusal::ServerUnavailable => ReasonCode::SERVER_UNAVAILABLE,
            Refusal::BadAuthenticationMethod => ReasonCode::BAD_AUTHENTICATION_METHOD,
            Refusal::PayloadFormatInvalid => ReasonCode::PAYLOAD_FORMAT_INVALID,
        }
    }

    /// The refusing CONNACK as log lines name it: "CONNACK 5" (3.1.1's
    /// return code) or "CONNACK 0x86 ..." (5.0's reason code).
    pub(super) fn describe(self, version: Version) -> String {
        match version {
            Version::V3 => format!("CONNACK {}", self.v3_code()),
            Version::V5 => format!("CONNACK {}", self.reason_code()),
        }
    }

    /// The refusing CONNACK in `version`'s format.
    pub(super) fn connack(self, version: Version) -> Vec<u8> {
        match version {
            Version::V3 => codec::connack(false, self.v3_code()).to_vec(),
            Version::V5 => refusing_connack_v5(self.reason_code()),
        }
    }
}

/// An MQTT 5.0 CONNACK refusing with `reason_code`, without properties.
pub(super) fn refusing_connack_v5(reason_code: ReasonCode) -> Vec<u8> {
    let connack = ConnAck {
        session_present: false,
        reason_code,
        properties: Properties::new(),
    };
    let mut out = BytesMut::new();
    if let Err(e) = v5::encode_connack(&connack, &mut out) {
        log::error!("cannot encode CONNACK {reason_code}: {e}");
    }
    out.to_vec()
}

/// What an accepted client is told in its CONNACK besides Session Present.
pub(super) struct Accepted {
    /// The client id the broker assigned to an empty one (5.0: Assigned
    /// Client Identifier, §3.2.2.3.7).
    pub(super) assigned_client_id: Option<ByteString>,
    /// The keep-alive the broker imposes when it differs from the client's
    /// (Server Keep Alive, §3.2.2.3.14).
    pub(super) server_keep_alive: Option<u16>,
    /// Response Information (§3.2.2.3.15): `response_information` for this
    /// client, when it asked for one and one is configured.
    pub(super) response_information: Option<ByteString>,
}

/// The Response Information for a client that asked for one: the
/// configured `template` with `%c` replaced by its client id; None when
/// none is configured.
pub(super) fn response_information(template: Option<&str>, client_id: &str) -> Option<ByteString> {
    template.map(|t| ByteString::from(t.replace("%c", client_id)))
}

/// The accepting CONNACK in `version`'s format. For 5.0 its properties
/// announce the broker's limits (§3.2.2.3): Receive Maximum
/// (`max_inflight_messages`), Maximum Packet Size (`max_packet_size`),
/// Topic Alias Maximum (`max_topic_alias`), Retain Available, Wildcard and
/// Subscription Identifier Available, and Shared Subscription Available = 0
/// (not implemented). Maximum QoS is left out: 2, the default.
pub(super) fn accepting_connack(
    version: Version,
    session_present: bool,
    accepted: &Accepted,
    config: &Config,
) -> Vec<u8> {
    if version == Version::V3 {
        return codec::connack(session_present, codec::CONNACK_ACCEPTED).to_vec();
    }
    let mut properties = Properties::new();
    if let Some(id) = &accepted.assigned_client_id {
        properties.push(Property::AssignedClientIdentifier(id.clone()));
    }
    if let Some(keep_alive) = accepted.server_keep_alive {
        properties.push(Property::ServerKeepAlive(keep_alive));
    }
    if let Some(information) = &accepted.response_information {
        properties.push(Property::ResponseInformation(information.clone()));
    }
    let receive_maximum = u16::try_from(config.max_inflight_messages).unwrap_or(u16::MAX);
    if let Some(receive_maximum) = std::num::NonZeroU16::new(receive_maximum)
        && receive_maximum.get() < u16::MAX
    {
        properties.push(Property::ReceiveMaximum(receive_maximum));
    }
    if let Some(max) = u32::try_from(config.max_packet_size)
        .ok()
        .and_then(std::num::NonZeroU32::new)
    {
        properties.push(Property::MaximumPacketSize(max));
    }
    if config.max_topic_alias > 0 {
        properties.push(Property::TopicAliasMaximum(config.max_topic_alias));
    }
    properties.push(Property::RetainAvailable(true));
    properties.push(Property::WildcardSubscriptionAvailable(true));
    properties.push(Property::SubscriptionIdentifierAvailable(true));
    properties.push(Property::SharedSubscriptionAvailable(true));
    let connack = ConnAck {
        session_present,
        reason_code: ReasonCode::SUCCESS,
        properties,
    };
    let mut out = BytesMut::new();
    if let Err(e) = v5::encode_connack(&connack, &mut out) {
        log::error!("cannot encode CONNACK: {e}");
    }
    out.to_vec()
}

/// The keep-alive an MQTT 5.0 client is held to: its own, unless it asked
/// for none or for more than `max_keepalive` (§3.2.2.3.14); then
/// `max_keepalive`, which the CONNACK announces. 3.1.1 clients keep theirs.
pub(super) fn effective_keep_alive(
    version: Version,
    requested: u16,
    max_keepalive: u16,
) -> (u16, Option<u16>) {
    if version == Version::V5 && max_keepalive > 0 && (requested == 0 || requested > max_keepalive)
    {
        (max_keepalive, Some(max_keepalive))
    } else {
        (requested, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_in_each_version() {
        assert_eq!(
            Refusal::BadUserNameOrPassword.connack(Version::V3),
            vec![0x20, 2, 0, 5]
        );
        assert_eq!(
            Refusal::BadUserNameOrPassword.connack(Version::V5),
            vec![0x20, 3, 0, 0x86, 0]
        );
        assert_eq!(
            Refusal::UnsupportedProtocolVersion.connack(Version::V5),
            vec![0x20, 3, 0, 0x84, 0]
        );
    }

    #[test]
    fn server_keep_alive_caps_and_fills_in() {
        assert_eq!(effective_keep_alive(Version::V5, 30, 60), (30, None));
        assert_eq!(effective_keep_alive(Version::V5, 0, 60), (60, Some(60)));
        assert_eq!(effective_keep_alive(Version::V5, 90, 60), (60, Some(60)));
        assert_eq!(effective_keep_alive(Version::V3, 0, 60), (0, None));
    }

    #[test]
    fn response_information_fills_in_the_client_id() {
        assert_eq!(
            response_information(Some("reply/%c/"), "dev-1").as_deref(),
            Some("reply/dev-1/")
        );
        assert_eq!(response_information(None, "dev-1"), None);
        let accepted = Accepted {
            assigned_client_id: None,
            server_keep_alive: None,
            response_information: response_information(Some("r/"), "x"),
        };
        let bytes = accepting_connack(Version::V5, false, &accepted, &Config::default());
        assert!(bytes.windows(5).any(|w| w == [0x1a, 0, 2, b'r', b'/']));
    }

    #[test]
    fn an_accepting_v5_connack_announces_the_limits() {
        let config = Config::default();
        let accepted = Accepted {
            assigned_client_id: Some(ByteString::from_static("id")),
            server_keep_alive: None,
            response_information: None,
        };
        let bytes = accepting_connack(Version::V5, false, &accepted, &config);
        assert_eq!(&bytes[2..4], &[0, 0]);
        // The codec decodes only client packets: look for a few properties'
        // bytes instead.
        assert!(bytes.windows(4).any(|w| w == [0x12, 0, 2, b'i']));
        let receive_maximum = u16::try_from(config.max_inflight_messages)
            .unwrap_or(u16::MAX)
            .to_be_bytes();
        assert!(
            bytes
                .windows(3)
                .any(|w| w == [0x21, receive_maximum[0], receive_maximum[1]]),
            "receive max"
        );
        assert!(
            bytes.windows(2).any(|w| w == [0x2A, 1]),
            "shared subscriptions"
        );
        assert_eq!(
            accepting_connack(Version::V3, true, &accepted, &config),
            vec![0x20, 2, 1, 0]
        );
    }
}
