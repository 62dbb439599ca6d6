//! Helpers shared by the unit tests of this module, and cross-checks against
//! an independent implementation: rumqttc 0.24's MQTT 5.0 packets
//! (`rumqttc::v5::mqttbytes::v5`), written by rumqttc and decoded here, encoded
//! here and read by rumqttc.

use std::num::{NonZeroU16, NonZeroU32};

use bytes::{BufMut, BytesMut};

use super::{DecodeError, Packet, Properties, Property, QoS, decode};
use crate::protocol::v3::{self as codec, MAX_FIXED_HEADER_LEN, MAX_REMAINING_LENGTH};

/// A maximum packet size that never gets in the way.
pub(super) const BIG: usize = MAX_REMAINING_LENGTH + MAX_FIXED_HEADER_LEN;

/// A frame: `first`, a minimal Remaining Length, `body`.
pub(super) fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u8(first);
    codec::encode_remaining_length(body.len(), &mut out).expect("test body fits");
    out.put_slice(body);
    out.to_vec()
}

/// A length-prefixed string or binary field.
pub(super) fn string(s: &[u8]) -> Vec<u8> {
    let mut v = u16::try_from(s.len())
        .expect("test string fits")
        .to_be_bytes()
        .to_vec();
    v.extend_from_slice(s);
    v
}

/// A property block: its minimal length, then `block`.
pub(super) fn props(block: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    codec::encode_remaining_length(block.len(), &mut out).expect("test block fits");
    out.put_slice(block);
    out.to_vec()
}

/// Concatenates byte pieces.
pub(super) fn cat(pieces: &[&[u8]]) -> Vec<u8> {
    pieces.concat()
}

/// A CONNACK property set with every CONNACK property, User Properties out of
/// alphabetical order (their order must be kept).
pub(super) fn every_connack_property() -> Properties {
    use Property as P;
    [
        P::SessionExpiryInterval(600),
        P::ReceiveMaximum(NonZeroU16::new(100).unwrap()),
        P::MaximumQoS(QoS::AtLeastOnce),
        P::RetainAvailable(false),
        P::MaximumPacketSize(NonZeroU32::new(1 << 20).unwrap()),
        P::AssignedClientIdentifier("auto-7".into()),
        P::TopicAliasMaximum(16),
        P::ReasonString("hello".into()),
        P::UserProperty("z".into(), "1".into()),
        P::UserProperty("a".into(), "2".into()),
        P::WildcardSubscriptionAvailable(true),
        P::SubscriptionIdentifierAvailable(false),
        P::SharedSubscriptionAvailable(true),
        P::ServerKeepAlive(25),
        P::ResponseInformation("resp/".into()),
        P::ServerReference("other".into()),
        P::AuthenticationMethod("TOKEN".into()),
        P::AuthenticationData(bytes::Bytes::from_static(b"ok")),
    ]
    .into_iter()
    .collect()
}

/// Decodes `bytes`, checking that exactly all of them were consumed.
pub(super) fn decode_all(bytes: &[u8]) -> Result<Packet, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let packet = decode(&mut buf, BIG)?;
    assert!(buf.is_empty(), "left {} bytes", buf.len());
    packet.ok_or(DecodeError::Truncated)
}

/// Decodes `bytes` expecting an error, checking that nothing was consumed.
pub(super) fn decode_err(bytes: &[u8]) -> DecodeError {
    let mut buf = BytesMut::from(bytes);
    let err = decode(&mut buf, BIG).expect_err("should fail");
    assert_eq!(buf.len(), bytes.len(), "an error consumed bytes");
    err
}

mod rumqttc_writes_we_decode {
    use rumqttc::v5::mqttbytes::QoS as RQoS;
    use rumqttc::v5::mqttbytes::v5 as r;

    use super::super::*;
    use super::*;

    /// rumqttc's encoding of `packet`.
    fn written(packet: r::Packet) -> Vec<u8> {
        let mut out = BytesMut::new();
        packet.write(&mut out).expect("rumqttc writes it");
        out.to_vec()
    }

    fn users(properties: &Properties) -> Vec<(String, String)> {
        properties
            .user_properties()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn user_pairs() -> Vec<(String, String)> {
        vec![("b".into(), "2".into()), ("a".into(), "1".into())]
    }

    #[test]
    fn connect_with_will_and_login() {
        let mut properties = r::ConnectProperties::new();
        properties.session_expiry_interval = Some(120);
        properties.receive_maximum = Some(16);
        properties.max_packet_size = Some(4096);
        properties.topic_alias_max = Some(8);
        properties.request_response_info = Some(1);
        properties.request_problem_info = Some(0);
        properties.user_properties = user_pairs();
        properties.authentication_method = Some("TOKEN".into());
        properties.authentication_data = Some(bytes::Bytes::from_static(b"xyz"));
        let connect = r::Connect {
            keep_alive: 45,
            client_id: "client-5".into(),
            clean_start: true,
            properties: Some(properties),
        };
        let will = r::LastWill::new(
            "will/topic",
            "gone",
            RQoS::AtLeastOnce,
            true,
            Some(r::LastWillProperties {
                delay_interval: Some(10),
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(99),
                content_type: Some("text/plain".into()),
                response_topic: Some("re/sponse".into()),
                correlation_data: Some(bytes::Bytes::from_static(b"\x01")),
                user_properties: user_pairs(),
            }),
        );
        let login = r::Login::new("alice", "secret");
        let bytes = written(r::Packet::Connect(connect, Some(will), Some(login)));
        let Ok(Packet::Connect(c)) = decode_all(&bytes) else {
            panic!("not a CONNECT");
        };
        assert!(c.clean_start);
        assert_eq!(c.keep_alive, 45);
        assert_eq!(&c.client_id[..], "client-5");
        let p = &c.properties;
        assert_eq!(p.session_expiry_interval(), Some(120));
        assert_eq!(p.receive_maximum().map(|v| v.get()), Some(16));
        assert_eq!(p.maximum_packet_size().map(|v| v.get()), Some(4096));
        assert_eq!(p.topic_alias_maximum(), Some(8));
        assert_eq!(p.request_response_information(), Some(true));
        assert_eq!(p.request_problem_information(), Some(false));
        assert_eq!(users(p), user_pairs());
        assert_eq!(p.authentication_method().map(|m| &m[..]), Some("TOKEN"));
        assert_eq!(p.authentication_data().map(|d| &d[..]), Some(&b"xyz"[..]));
        let w = c.will.as_ref().expect("will");
        assert_eq!((&w.topic[..], &w.payload[..]), ("will/topic", &b"gone"[..]));
        assert_eq!((w.qos, w.retain), (QoS::AtLeastOnce, true));
        let wp = &w.properties;
        assert_eq!(wp.will_delay_interval(), Some(10));
        assert_eq!(wp.payload_format_indicator(), Some(true));
        assert_eq!(wp.message_expiry_interval(), Some(99));
        assert_eq!(wp.content_type().map(|s| &s[..]), Some("text/plain"));
        assert_eq!(wp.response_topic().map(|s| &s[..]), Some("re/sponse"));
        assert_eq!(wp.correlation_data().map(|d| &d[..]), Some(&b"\x01"[..]));
        assert_eq!(users(wp), user_pairs());
        assert_eq!(c.username.as_deref(), Some("alice"));
        assert_eq!(c.password.as_deref(), Some(&b"secret"[..]));
    }

    #[test]
    fn minimal_connect() {
        let connect = r::Connect {
            keep_alive: 0,
            client_id: String::new(),
            clean_start: false,
            properties: None,
        };
        let Ok(Packet::Connect(c)) = decode_all(&written(r::Packet::Connect(connect, None, None)))
        else {
            panic!("not a CONNECT");
        };
        assert!(c.client_id.is_empty() && c.properties.is_empty() && c.will.is_none());
        assert!(!c.clean_start && c.username.is_none() && c.password.is_none());
    }

    #[test]
    fn publish_with_properties() {
        let properties = r::PublishProperties {
            payload_format_indicator: Some(0),
            message_expiry_interval: Some(7),
            topic_alias: Some(2),
            response_topic: Some("r/t".into()),
            correlation_data: Some(bytes::Bytes::from_static(b"cd")),
            user_properties: user_pairs(),
            subscription_identifiers: Vec::new(),
            content_type: Some("application/json".into()),
        };
        for qos in [RQoS::AtMostOnce, RQoS::AtLeastOnce, RQoS::ExactlyOnce] {
            let mut publish = r::Publish::new("a/b", qos, vec![1, 2, 3], Some(properties.clone()));
            publish.retain = true;
            publish.pkid = if qos == RQoS::AtMostOnce { 0 } else { 77 };
            let Ok(Packet::Publish(p)) = decode_all(&written(r::Packet::Publish(publish))) else {
                panic!("not a PUBLISH");
            };
            assert_eq!(p.qos as u8, qos as u8);
            assert_eq!(
                (p.retain, p.dup, p.packet_id),
                (true, false, if qos == RQoS::AtMostOnce { 0 } else { 77 })
            );
            assert_eq!((&p.topic[..], &p.payload[..]), ("a/b", &[1u8, 2, 3][..]));
            let pp = &p.properties;
            assert_eq!(pp.payload_format_indicator(), Some(false));
            assert_eq!(pp.message_expiry_interval(), Some(7));
            assert_eq!(pp.topic_alias().map(|a| a.get()), Some(2));
            assert_eq!(pp.response_topic().map(|s| &s[..]), Some("r/t"));
            assert_eq!(pp.correlation_data().map(|d| &d[..]), Some(&b"cd"[..]));
            assert_eq!(pp.content_type().map(|s| &s[..]), Some("application/json"));
            assert_eq!(users(pp), user_pairs());
        }
        // A client must not send a Subscription Identifier (MQTT-3.3.4-6).
        let with_id = r::PublishProperties {
            subscription_identifiers: vec![4],
            ..properties
        };
        let publish = r::Publish::new("a", RQoS::AtMostOnce, "x", Some(with_id));
        assert_eq!(
            decode_err(&written(r::Packet::Publish(publish))),
            DecodeError::SubscriptionIdentifierFromClient
        );
    }

    #[test]
    fn subscribe_and_unsubscribe() {
        let filters = vec![
            r::Filter::new("a/+", RQoS::AtMostOnce),
            r::Filter {
                path: "b/#".into(),
                qos: RQoS::ExactlyOnce,
                nolocal: true,
                preserve_retain: true,
                retain_forward_rule: r::RetainForwardRule::Never,
            },
            r::Filter {
                retain_forward_rule: r::RetainForwardRule::OnNewSubscribe,
                ..r::Filter::new("c", RQoS::AtLeastOnce)
            },
        ];
        let properties = r::SubscribeProperties {
            id: Some(200_000),
            user_properties: user_pairs(),
        };
        let mut subscribe = r::Subscribe::new_many(filters, Some(properties));
        subscribe.pkid = 3;
        let Ok(Packet::Subscribe(s)) = decode_all(&written(r::Packet::Subscribe(subscribe))) else {
            panic!("not a SUBSCRIBE");
        };
        assert_eq!(s.packet_id, 3);
        assert_eq!(
            s.subscription_identifier().map(|id| id.get()),
            Some(200_000)
        );
        assert_eq!(users(&s.properties), user_pairs());
        let options: Vec<_> = s.filters.iter().map(|(f, o)| (&f[..], *o)).collect();
        let expected = |qos, no_local, retain_as_published, retain_handling| SubscriptionOptions {
            qos,
            no_local,
            retain_as_published,
            retain_handling,
        };
        assert_eq!(
            options,
            [
                (
                    "a/+",
                    expected(
                        QoS::AtMostOnce,
                        false,
                        false,
                        RetainHandling::SendAtSubscribe
                    )
                ),
                (
                    "b/#",
                    expected(QoS::ExactlyOnce, true, true, RetainHandling::DoNotSend)
                ),
                (
                    "c",
                    expected(
                        QoS::AtLeastOnce,
                        false,
                        false,
                        RetainHandling::SendAtSubscribeIfNew
                    )
                ),
            ]
        );

        let mut unsubscribe = r::Unsubscribe::new(
            "a/+",
            Some(r::UnsubscribeProperties {
                user_properties: user_pairs(),
            }),
        );
        unsubscribe.filters.push("b/#".into());
        unsubscribe.pkid = 4;
        let Ok(Packet::Unsubscribe(u)) = decode_all(&written(r::Packet::Unsubscribe(unsubscribe)))
        else {
            panic!("not an UNSUBSCRIBE");
        };
        assert_eq!(u.packet_id, 4);
        assert_eq!(
            u.filters,
            [ByteString::from("a/+"), ByteString::from("b/#")]
        );
        assert_eq!(users(&u.properties), user_pairs());
    }

    #[test]
    fn acknowledgements() {
        let puback = r::PubAck {
            pkid: 10,
            reason: r::PubAckReason::NoMatchingSubscribers,
            properties: Some(r::PubAckProperties {
                reason_string: Some("nobody".into()),
                user_properties: user_pairs(),
            }),
        };
        let Ok(Packet::PubAck(ack)) = decode_all(&written(r::Packet::PubAck(puback))) else {
            panic!("not a PUBACK");
        };
        assert_eq!(
            (ack.packet_id, ack.reason_code),
            (10, ReasonCode::NO_MATCHING_SUBSCRIBERS)
        );
        assert_eq!(
            ack.properties.reason_string().map(|s| &s[..]),
            Some("nobody")
        );
        assert_eq!(users(&ack.properties), user_pairs());

        let success = Ok(Packet::PubAck(Ack::success(11)));
        assert_eq!(
            decode_all(&written(r::Packet::PubAck(r::PubAck::new(11, None)))),
            success
        );
        let pubrec = r::PubRec {
            pkid: 12,
            reason: r::PubRecReason::QuotaExceeded,
            properties: None,
        };
        let Ok(Packet::PubRec(ack)) = decode_all(&written(r::Packet::PubRec(pubrec))) else {
            panic!("not a PUBREC");
        };
        assert_eq!(
            (ack.packet_id, ack.reason_code),
            (12, ReasonCode::QUOTA_EXCEEDED)
        );
        let pubrel = r::PubRel {
            pkid: 13,
            reason: r::PubRelReason::PacketIdentifierNotFound,
            properties: None,
        };
        let Ok(Packet::PubRel(ack)) = decode_all(&written(r::Packet::PubRel(pubrel))) else {
            panic!("not a PUBREL");
        };
        assert_eq!(
            (ack.packet_id, ack.reason_code),
            (13, ReasonCode::PACKET_IDENTIFIER_NOT_FOUND)
        );
        let pubcomp = r::PubComp::new(14, None);
        assert_eq!(
            decode_all(&written(r::Packet::PubComp(pubcomp))),
            Ok(Packet::PubComp(Ack::success(14)))
        );
    }

    #[test]
    fn pingreq_and_disconnect() {
        assert_eq!(
            decode_all(&written(r::Packet::PingReq(r::PingReq))),
            Ok(Packet::PingReq)
        );
        // rumqttc does not export DisconnectProperties: no properties here.
        // And it writes Remaining Length 1, the reason code, then a Property
        // Length byte outside the frame: we decode the frame and leave that.
        let disconnect = r::Disconnect::new(r::DisconnectReasonCode::DisconnectWithWillMessage);
        let mut buf = BytesMut::from(&written(r::Packet::Disconnect(disconnect))[..]);
        assert_eq!(&buf[..], [0xE0, 1, 0x04, 0]);
        let Ok(Some(Packet::Disconnect(d))) = decode(&mut buf, BIG) else {
            panic!("not a DISCONNECT");
        };
        assert_eq!(d.reason_code, ReasonCode::DISCONNECT_WITH_WILL_MESSAGE);
        assert!(d.properties.is_empty());
        assert_eq!(&buf[..], [0]);
        let normal = r::Disconnect::new(r::DisconnectReasonCode::NormalDisconnection);
        assert_eq!(
            decode_all(&written(r::Packet::Disconnect(normal))),
            Ok(Packet::Disconnect(ReasonAndProperties::default()))
        );
    }
}

mod we_encode_rumqttc_reads {
    use std::num::{NonZeroU16, NonZeroU32};

    use rumqttc::v5::mqttbytes::QoS as RQoS;
    use rumqttc::v5::mqttbytes::v5 as r;

    use super::super::*;
    use super::*;

    /// rumqttc's reading of `bytes`, which must be one whole packet.
    fn read(bytes: &[u8]) -> r::Packet {
        let mut buf = BytesMut::from(bytes);
        let packet = r::Packet::read(&mut buf, None).expect("rumqttc reads it");
        assert!(buf.is_empty(), "rumqttc left {} bytes", buf.len());
        packet
    }

    fn encoded(encode: impl FnOnce(&mut BytesMut) -> Result<(), EncodeError>) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode(&mut out).expect("encodes");
        out.to_vec()
    }

    fn user_properties() -> Properties {
        Properties::new()
            .with(Property::UserProperty("z".into(), "1".into()))
            .with(Property::UserProperty("a".into(), "2".into()))
    }

    fn user_pairs() -> Vec<(String, String)> {
        vec![("z".into(), "1".into()), ("a".into(), "2".into())]
    }

    #[test]
    fn connack_with_every_property() {
        let properties = every_connack_property();
        let connack = ConnAck {
            session_present: true,
            reason_code: ReasonCode::SUCCESS,
            properties,
        };
        let r::Packet::ConnAck(ack) = read(&encoded(|out| encode_connack(&connack, out))) else {
            panic!("not a CONNACK");
        };
        assert!(ack.session_present);
        assert_eq!(ack.code, r::ConnectReturnCode::Success);
        let p = ack.properties.expect("properties");
        assert_eq!(p.session_expiry_interval, Some(600));
        assert_eq!(p.receive_max, Some(100));
        assert_eq!(p.max_qos, Some(1));
        assert_eq!(p.retain_available, Some(0));
        assert_eq!(p.max_packet_size, Some(1 << 20));
        assert_eq!(p.assigned_client_identifier.as_deref(), Some("auto-7"));
        assert_eq!(p.topic_alias_max, Some(16));
        assert_eq!(p.reason_string.as_deref(), Some("hello"));
        assert_eq!(p.user_properties, user_pairs());
        assert_eq!(p.wildcard_subscription_available, Some(1));
        assert_eq!(p.subscription_identifiers_available, Some(0));
        assert_eq!(p.shared_subscription_available, Some(1));
        assert_eq!(p.server_keep_alive, Some(25));
        assert_eq!(p.response_information.as_deref(), Some("resp/"));
        assert_eq!(p.server_reference.as_deref(), Some("other"));
        assert_eq!(p.authentication_method.as_deref(), Some("TOKEN"));
        assert_eq!(p.authentication_data.as_deref(), Some(&b"ok"[..]));

        let refused = ConnAck {
            session_present: true,
            reason_code: ReasonCode::NOT_AUTHORIZED,
            properties: Properties::new(),
        };
        let r::Packet::ConnAck(ack) = read(&encoded(|out| encode_connack(&refused, out))) else {
            panic!("not a CONNACK");
        };
        assert!(!ack.session_present);
        assert_eq!(ack.code, r::ConnectReturnCode::NotAuthorized);
    }

    #[test]
    fn publish_whole_and_from_its_head() {
        use Property as P;
        let properties = Properties::new()
            .with(P::PayloadFormatIndicator(true))
            .with(P::MessageExpiryInterval(30))
            .with(P::TopicAlias(NonZeroU16::new(5).unwrap()))
            .with(P::ResponseTopic("re/ply".into()))
            .with(P::CorrelationData(bytes::Bytes::from_static(b"c")))
            .with(P::UserProperty("z".into(), "1".into()))
            .with(P::SubscriptionIdentifier(NonZeroU32::new(1).unwrap()))
            .with(P::UserProperty("a".into(), "2".into()))
            .with(P::SubscriptionIdentifier(NonZeroU32::new(70_000).unwrap()))
            .with(P::ContentType("text/plain".into()));
        let payload = b"fan-out payload";
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let header = PublishHeader {
                topic: "t/1",
                qos,
                retain: true,
                dup: false,
                properties: &properties,
            };
            let mut head = BytesMut::new();
            let at = encode_publish_head(&header, payload.len(), &mut head).expect("head");
            let frame = match at {
                Some(at) => cat(&[&head[..at], &321u16.to_be_bytes(), &head[at + 2..], payload]),
                None => cat(&[&head, payload]),
            };
            let r::Packet::Publish(p) = read(&frame) else {
                panic!("not a PUBLISH");
            };
            assert_eq!(p.qos as u8, qos as u8);
            assert_eq!(p.pkid, if qos == QoS::AtMostOnce { 0 } else { 321 });
            assert!(p.retain && !p.dup);
            assert_eq!((&p.topic[..], &p.payload[..]), (&b"t/1"[..], &payload[..]));
            let pp = p.properties.expect("properties");
            assert_eq!(pp.payload_format_indicator, Some(1));
            assert_eq!(pp.message_expiry_interval, Some(30));
            assert_eq!(pp.topic_alias, Some(5));
            assert_eq!(pp.response_topic.as_deref(), Some("re/ply"));
            assert_eq!(pp.correlation_data.as_deref(), Some(&b"c"[..]));
            assert_eq!(pp.user_properties, user_pairs());
            assert_eq!(pp.subscription_identifiers, [1, 70_000]);
            assert_eq!(pp.content_type.as_deref(), Some("text/plain"));
        }
        // The plain form, without properties.
        let empty = Properties::new();
        let header = PublishHeader {
            topic: "t",
            qos: QoS::AtLeastOnce,
            retain: false,
            dup: true,
            properties: &empty,
        };
        let r::Packet::Publish(p) = read(&encoded(|out| encode_publish(&header, 9, b"x", out)))
        else {
            panic!("not a PUBLISH");
        };
        assert!(p.dup && p.properties.is_none());
        assert_eq!((p.pkid, p.qos), (9, RQoS::AtLeastOnce));
    }

    #[test]
    fn acknowledgements() {
        let with_properties = Ack {
            packet_id: 40,
            reason_code: ReasonCode::PAYLOAD_FORMAT_INVALID,
            properties: user_properties().with(Property::ReasonString("bad".into())),
        };
        let r::Packet::PubAck(ack) = read(&encoded(|out| {
            encode_ack(PacketType::PubAck, &with_properties, out)
        })) else {
            panic!("not a PUBACK");
        };
        assert_eq!(
            (ack.pkid, ack.reason),
            (40, r::PubAckReason::PayloadFormatInvalid)
        );
        let p = ack.properties.expect("properties");
        assert_eq!(
            (p.reason_string.as_deref(), p.user_properties),
            (Some("bad"), user_pairs())
        );

        let short = Ack {
            reason_code: ReasonCode::NO_MATCHING_SUBSCRIBERS,
            properties: Properties::new(),
            ..with_properties
        };
        let r::Packet::PubRec(rec) =
            read(&encoded(|out| encode_ack(PacketType::PubRec, &short, out)))
        else {
            panic!("not a PUBREC");
        };
        assert_eq!(
            (rec.pkid, rec.reason),
            (40, r::PubRecReason::NoMatchingSubscribers)
        );
        let r::Packet::PubRel(rel) = read(&encoded(|out| {
            encode_ack(PacketType::PubRel, &Ack::success(41), out)
        })) else {
            panic!("not a PUBREL");
        };
        assert_eq!((rel.pkid, rel.reason), (41, r::PubRelReason::Success));
        let not_found = Ack {
            packet_id: 42,
            reason_code: ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
            properties: Properties::new(),
        };
        let r::Packet::PubComp(comp) = read(&encoded(|out| {
            encode_ack(PacketType::PubComp, &not_found, out)
        })) else {
            panic!("not a PUBCOMP");
        };
        assert_eq!(
            (comp.pkid, comp.reason),
            (42, r::PubCompReason::PacketIdentifierNotFound)
        );
    }

    #[test]
    fn suback_unsuback_disconnect_pingresp() {
        let codes = [
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::NOT_AUTHORIZED,
            ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
        ];
        let r::Packet::SubAck(suback) = read(&encoded(|out| {
            encode_suback(8, &user_properties(), &codes, out)
        })) else {
            panic!("not a SUBACK");
        };
        assert_eq!(suback.pkid, 8);
        assert_eq!(
            suback.return_codes,
            [
                r::SubscribeReasonCode::Success(RQoS::AtLeastOnce),
                r::SubscribeReasonCode::NotAuthorized,
                r::SubscribeReasonCode::SharedSubscriptionsNotSupported,
            ]
        );
        assert_eq!(
            suback.properties.expect("properties").user_properties,
            user_pairs()
        );

        let codes = [ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED];
        let r::Packet::UnsubAck(unsuback) = read(&encoded(|out| {
            encode_unsuback(9, &Properties::new(), &codes, out)
        })) else {
            panic!("not an UNSUBACK");
        };
        assert_eq!(unsuback.pkid, 9);
        assert_eq!(
            unsuback.reasons,
            [
                r::UnsubAckReason::Success,
                r::UnsubAckReason::NoSubscriptionExisted
            ]
        );

        let disconnect = ReasonAndProperties {
            reason_code: ReasonCode::SESSION_TAKEN_OVER,
            properties: user_properties().with(Property::ReasonString("another".into())),
        };
        let r::Packet::Disconnect(d) = read(&encoded(|out| encode_disconnect(&disconnect, out)))
        else {
            panic!("not a DISCONNECT");
        };
        assert_eq!(d.reason_code, r::DisconnectReasonCode::SessionTakenOver);
        let p = d.properties.expect("properties");
        assert_eq!(
            (p.reason_string.as_deref(), p.user_properties),
            (Some("another"), user_pairs())
        );

        let mut out = BytesMut::new();
        encode_pingresp(&mut out);
        assert_eq!(read(&out), r::Packet::PingResp(r::PingResp));
    }
}

/// Table 2-6 (which packet carries which Reason Code) against rumqttc's
/// reason code enums, for every byte value.
mod reason_code_table {
    use rumqttc::v5::mqttbytes::v5 as r;

    use super::super::*;
    use super::*;

    /// Whether rumqttc reads `bytes` as a packet.
    fn rumqttc_reads(bytes: &[u8]) -> bool {
        r::Packet::read(&mut BytesMut::from(bytes), None).is_ok()
    }

    #[test]
    fn every_code_in_every_packet_agrees_with_rumqttc() {
        for code in 0..=u8::MAX {
            let reason = ReasonCode(code);
            let packets: [(PacketType, Vec<u8>); 8] = [
                (PacketType::ConnAck, vec![0x20, 3, 0, code, 0]),
                (PacketType::PubAck, vec![0x40, 4, 0, 1, code, 0]),
                (PacketType::PubRec, vec![0x50, 4, 0, 1, code, 0]),
                (PacketType::PubRel, vec![0x62, 4, 0, 1, code, 0]),
                (PacketType::PubComp, vec![0x70, 4, 0, 1, code, 0]),
                (PacketType::SubAck, vec![0x90, 4, 0, 1, 0, code]),
                (PacketType::UnsubAck, vec![0xB0, 4, 0, 1, 0, code]),
                (PacketType::Disconnect, vec![0xE0, 2, code, 0]),
            ];
            for (packet_type, bytes) in packets {
                let valid = reason.is_valid_for(packet_type);
                // Table 2-6 lists Bad authentication method for DISCONNECT, the
                // DISCONNECT table of §3.14.2.1 does not; rumqttc follows the
                // latter (and so we never send it, see server_may_send).
                let known_difference = packet_type == PacketType::Disconnect
                    && reason == ReasonCode::BAD_AUTHENTICATION_METHOD;
                assert_eq!(
                    rumqttc_reads(&bytes),
                    valid && !known_difference,
                    "{reason} in {packet_type:?}"
                );
                if reason.server_may_send(packet_type) {
                    assert!(rumqttc_reads(&bytes), "we send {reason} in {packet_type:?}");
                }
                // What a client may send decodes here; the rest is refused.
                if matches!(
                    packet_type,
                    PacketType::ConnAck | PacketType::SubAck | PacketType::UnsubAck
                ) {
                    continue;
                }
                let decoded = decode(&mut BytesMut::from(&bytes[..]), BIG);
                let client = valid && reason.client_may_send(packet_type);
                assert_eq!(
                    decoded.is_ok(),
                    client,
                    "{reason} in {packet_type:?}: {decoded:?}"
                );
            }
        }
    }
}

/// Table 2-4 (which packet carries which property) against rumqttc's
/// property parsers, for every property in every packet both implement.
mod property_table {
    use std::num::{NonZeroU16, NonZeroU32};

    use rumqttc::v5::mqttbytes::v5 as r;

    use super::super::properties::Context;
    use super::super::*;
    use super::*;

    /// One property of each identifier, with a valid value.
    fn one_of_each() -> Vec<Property> {
        use Property as P;
        let one16 = NonZeroU16::MIN;
        let one32 = NonZeroU32::MIN;
        vec![
            P::PayloadFormatIndicator(true),
            P::MessageExpiryInterval(1),
            P::ContentType("c".into()),
            P::ResponseTopic("r".into()),
            P::CorrelationData(bytes::Bytes::from_static(b"d")),
            P::SubscriptionIdentifier(one32),
            P::SessionExpiryInterval(1),
            P::AssignedClientIdentifier("a".into()),
            P::ServerKeepAlive(1),
            P::AuthenticationMethod("m".into()),
            P::AuthenticationData(bytes::Bytes::from_static(b"d")),
            P::RequestProblemInformation(true),
            P::WillDelayInterval(1),
            P::RequestResponseInformation(true),
            P::ResponseInformation("i".into()),
            P::ServerReference("s".into()),
            P::ReasonString("r".into()),
            P::ReceiveMaximum(one16),
            P::TopicAliasMaximum(1),
            P::TopicAlias(one16),
            P::MaximumQoS(QoS::AtLeastOnce),
            P::RetainAvailable(true),
            P::UserProperty("k".into(), "v".into()),
            P::MaximumPacketSize(one32),
            P::WildcardSubscriptionAvailable(true),
            P::SubscriptionIdentifierAvailable(true),
            P::SharedSubscriptionAvailable(true),
        ]
    }

    /// The property block holding `property` (and the Authentication Method
    /// that Authentication Data needs, §3.1.2.11.10), unchecked.
    fn block(property: &Property) -> Vec<u8> {
        let mut properties = Properties::new();
        if property.id() == PropertyId::AuthenticationData {
            properties.push(Property::AuthenticationMethod("m".into()));
        }
        properties.push(property.clone());
        let mut out = BytesMut::new();
        properties.encode(&mut out).expect("encodes");
        out.to_vec()
    }

    /// A packet of `context` carrying the property block `props`.
    fn packet(context: Context, props: &[u8]) -> Vec<u8> {
        let connect = |flags: u8, will: &[u8]| {
            let mut body = cat(&[&string(b"MQTT"), &[5, flags, 0, 10]]);
            body.extend_from_slice(if flags == 0x02 { props } else { &[0] });
            body.extend(string(b"id"));
            body.extend_from_slice(will);
            frame(0x10, &body)
        };
        let Context::Packet(packet_type) = context else {
            let will = cat(&[props, &string(b"w"), &string(b"x")]);
            return connect(0x06, &will);
        };
        let first = packet_type.first_byte();
        match packet_type {
            PacketType::Connect => connect(0x02, &[]),
            PacketType::ConnAck => frame(first, &cat(&[&[0, 0], props])),
            PacketType::Publish => frame(first, &cat(&[&string(b"t"), props, b"p"])),
            PacketType::Subscribe => frame(first, &cat(&[&[0, 1], props, &string(b"t"), &[0]])),
            PacketType::Unsubscribe => frame(first, &cat(&[&[0, 1], props, &string(b"t")])),
            PacketType::SubAck | PacketType::UnsubAck => {
                frame(first, &cat(&[&[0, 1], props, &[0]]))
            }
            PacketType::Disconnect => frame(first, &cat(&[&[0], props])),
            _ => frame(first, &cat(&[&[0, 1, 0], props])),
        }
    }

    #[test]
    fn every_property_in_every_packet_agrees_with_rumqttc() {
        use PacketType as T;
        let ids: std::collections::HashSet<_> = one_of_each().iter().map(Property::id).collect();
        assert_eq!(ids.len(), 27, "one of each identifier");
        let server_sends = [T::ConnAck, T::SubAck, T::UnsubAck];
        let both = [
            T::Publish,
            T::PubAck,
            T::PubRec,
            T::PubRel,
            T::PubComp,
            T::Disconnect,
        ];
        let client_sends = [T::Connect, T::Subscribe, T::Unsubscribe];
        let contexts = server_sends
            .iter()
            .chain(&both)
            .chain(&client_sends)
            .map(|&t| Context::Packet(t))
            .chain([Context::Will]);
        for context in contexts {
            for property in one_of_each() {
                let bytes = packet(context, &block(&property));
                let valid = property.id().is_valid_in(context);
                let rumqttc = r::Packet::read(&mut BytesMut::from(&bytes[..]), None);
                assert_eq!(
                    rumqttc.is_ok(),
                    valid,
                    "{property:?} in {context:?}: {rumqttc:?}"
                );
                let from_client =
                    !matches!(context, Context::Packet(t) if server_sends.contains(&t));
                if !from_client {
                    continue;
                }
                // A client must not send a Subscription Identifier in a PUBLISH.
                let client_may = valid
                    && !(context == Context::Packet(T::Publish)
                        && property.id() == PropertyId::SubscriptionIdentifier);
                let ours = decode(&mut BytesMut::from(&bytes[..]), BIG);
                assert_eq!(
                    ours.is_ok(),
                    client_may,
                    "{property:?} in {context:?}: {ours:?}"
                );
            }
        }
    }
}
