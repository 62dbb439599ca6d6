//! The MQTT 5.0 rules for a connected client: each packet decoded by
//! [`crate::protocol::v5`] and what the session and the shard do with it.
//! What both versions share (a received PUBLISH, SUBSCRIBE, UNSUBSCRIBE)
//! is [`super::dispatch`]'s and the shard's; this module adds what MQTT 5.0
//! says on top: Reason Codes in acknowledgements, the properties a PUBLISH
//! carries on, DISCONNECT with a reason.

use std::time::Instant;

use bytes::BytesMut;
use bytestring::ByteString;

use super::dispatch::{Received, receive_publish};
use crate::observe::log_limit::LogKind::ProtocolError;
use crate::observe::log_limit::limited;
use crate::protocol::message::{Message, MessageProperties};
use crate::protocol::topic;
use crate::protocol::v3::{self as codec, QoS};
use crate::protocol::v5::{
    self, Ack, PacketType, Properties, Publish, ReasonAndProperties, ReasonCode,
};
use crate::router::shared;
use crate::session::link::{CloseReason, Rare, SessionKey};
use crate::shard::Shard;
use crate::store::record::FlowStep;

/// Decodes and handles every complete MQTT 5.0 packet in `rx`. A decode
/// error closes the connection with the DISCONNECT Reason Code the decoder
/// names (§4.13.1: 0x81 Malformed Packet, 0x82 Protocol Error, ...).
pub(super) fn process(
    shard: &mut Shard,
    key: SessionKey,
    conn_id: u64,
    rx: &mut BytesMut,
    rare: &mut Option<Box<Rare>>,
) -> Result<(), CloseReason> {
    let max = shard.config.max_packet_size;
    let max_topic_alias = shard.config.max_topic_alias;
    loop {
        let mut packet = match v5::decode(rx, max) {
            Ok(Some(packet)) => packet,
            Ok(None) => return Ok(()),
            Err(e) => {
                limited!(ProtocolError, debug, "client packet refused: {e}");
                shard.stats.protocol_errors += 1;
                return Err(CloseReason::for_reason_code(e.reason_code()));
            }
        };
        shard.stats.packets_received += 1;
        if let v5::Packet::Publish(publish) = &mut packet
            && let Err(reason) = resolve_topic_alias(publish, rare, max_topic_alias)
        {
            shard.stats.protocol_errors += 1;
            return Err(reason);
        }
        handle_packet(shard, key, conn_id, packet, Rare::username(rare.as_deref()))?;
    }
}

/// Applies a PUBLISH's Topic Alias (§3.3.2.3.4): with a topic, the alias is
/// set to it; with an empty topic, the topic is the alias's. An alias of 0
/// is the decoder's error; one over `max_topic_alias` (what the CONNACK
/// announced) or an empty topic with an alias not set is 0x94 Topic Alias
/// invalid.
fn resolve_topic_alias(
    publish: &mut Publish,
    rare: &mut Option<Box<Rare>>,
    max_topic_alias: u16,
) -> Result<(), CloseReason> {
    let Some(alias) = publish.properties.topic_alias() else {
        return Ok(());
    };
    let alias = alias.get();
    if alias > max_topic_alias {
        limited!(
            ProtocolError,
            debug,
            "topic alias {alias} over the maximum {max_topic_alias}"
        );
        return Err(CloseReason::TopicAliasInvalid);
    }
    let index = usize::from(alias - 1);
    let rare = rare.get_or_insert_with(Box::default);
    let aliases = &mut rare.topic_aliases;
    if publish.topic.is_empty() {
        match aliases.get(index).filter(|topic| !topic.is_empty()) {
            Some(topic) => publish.topic = topic.clone(),
            None => {
                limited!(
                    ProtocolError,
                    debug,
                    "topic alias {alias} used before it was set"
                );
                return Err(CloseReason::TopicAliasInvalid);
            }
        }
    } else {
        if aliases.len() <= index {
            aliases.resize(index + 1, ByteString::new());
        }
        if let Some(slot) = aliases.get_mut(index) {
            *slot = publish.topic.clone();
        }
    }
    Ok(())
}

/// Acts on one MQTT 5.0 packet from a connected client (`username`: for
/// the ACL).
fn handle_packet(
    shard: &mut Shard,
    key: SessionKey,
    conn_id: u64,
    packet: v5::Packet,
    username: Option<&str>,
) -> Result<(), CloseReason> {
    use v5::Packet as P;
    let limits = shard.limits;
    let Some(session) = shard.session_for(key, conn_id) else {
        return Err(CloseReason::TakenOver);
    };
    match packet {
        P::Connect(_) => {
            limited!(
                ProtocolError,
                debug,
                "client {}: second CONNECT (§3.1.0-2)",
                session.client_id
            );
            shard.stats.protocol_errors += 1;
            return Err(CloseReason::ProtocolError);
        }
        P::Publish(publish) => return handle_publish(shard, key, conn_id, publish, username),
        P::PubAck(ack) => {
            if session.on_puback(ack.packet_id, &limits) {
                shard.journal_step(key, FlowStep::Done, ack.packet_id);
            }
            shard.mark_dirty(key);
        }
        P::PubRec(ack) if ack.reason_code.is_failure() => {
            // The client refused the message: its QoS 2 flow ends here
            // (§4.3.3), no PUBREL.
            if session.on_pubrec_refused(ack.packet_id, &limits) {
                shard.journal_step(key, FlowStep::Done, ack.packet_id);
            }
            shard.mark_dirty(key);
        }
        P::PubRec(ack) => {
            if session.on_pubrec(ack.packet_id) {
                shard.journal_step(key, FlowStep::PubRecd, ack.packet_id);
            }
            shard.mark_dirty(key);
        }
        P::PubRel(ack) => {
            // PUBCOMP, with 0x92 Packet Identifier not found for an id that
            // was not awaiting release (§3.7.2.1; 3.1.1 answers plainly);
            // with persistence it waits until the release is durable.
            let reason_code = if session.release(ack.packet_id) {
                shard.journal_step(key, FlowStep::Released, ack.packet_id);
                ReasonCode::SUCCESS
            } else {
                ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
            };
            queue_ack(
                shard,
                key,
                conn_id,
                PacketType::PubComp,
                ack.packet_id,
                reason_code,
                false,
            );
        }
        P::PubComp(ack) => {
            if session.on_pubcomp(ack.packet_id, &limits) {
                shard.journal_step(key, FlowStep::Done, ack.packet_id);
            }
            shard.mark_dirty(key);
        }
        P::Subscribe(subscribe) => {
            if subscribe
                .filters
                .iter()
                .any(|(filter, options)| options.no_local && shared::is_shared(filter))
            {
                // No Local on a shared subscription (MQTT-3.8.3-4).
                limited!(
                    ProtocolError,
                    debug,
                    "client {}: No Local on a shared subscription",
                    session.client_id
                );
                shard.stats.protocol_errors += 1;
                return Err(CloseReason::ProtocolError);
            }
            let identifier = subscribe.subscription_identifier();
            shard.subscribe_with(
                key,
                subscribe.packet_id,
                subscribe.filters,
                identifier,
                username,
            );
        }
        P::Unsubscribe(unsubscribe) => {
            shard.unsubscribe(key, unsubscribe.packet_id, &unsubscribe.filters)
        }
        P::PingReq => {
            session.queue_control(&codec::PINGRESP_BYTES);
            shard.mark_dirty(key);
        }
        P::Disconnect(ReasonAndProperties {
            reason_code,
            properties,
        }) => {
            if let Some(expiry) = properties.session_expiry_interval() {
                // A session that ends with its connection cannot be made to
                // outlive it now (§3.14.2.2.2); otherwise the new interval
                // holds from this disconnection.
                if session.session_expiry == 0 && expiry != 0 {
                    limited!(
                        ProtocolError,
                        debug,
                        "client {}: DISCONNECT sets a Session Expiry Interval after 0",
                        session.client_id
                    );
                    shard.stats.protocol_errors += 1;
                    return Err(CloseReason::ProtocolError);
                }
                session.session_expiry = expiry;
                session.clean_session = expiry == 0;
            }
            return Err(if reason_code == ReasonCode::DISCONNECT_WITH_WILL_MESSAGE {
                CloseReason::DisconnectWithWill
            } else {
                CloseReason::Disconnect
            });
        }
        P::Auth(_) => {
            // No Authentication Method was accepted in CONNECT, so an AUTH
            // is a protocol error (§4.12).
            limited!(
                ProtocolError,
                debug,
                "client {}: AUTH without extended authentication",
                session.client_id
            );
            shard.stats.protocol_errors += 1;
            return Err(CloseReason::ProtocolError);
        }
    }
    Ok(())
}

/// A PUBLISH: its properties kept for MQTT 5.0 subscribers, the shared
/// rules applied ([`receive_publish`]), then PUBACK or PUBREC with the
/// Reason Code of what became of it.
fn handle_publish(
    shard: &mut Shard,
    key: SessionKey,
    conn_id: u64,
    publish: Publish,
    username: Option<&str>,
) -> Result<(), CloseReason> {
    if !publish.payload_is_utf8() {
        // The Payload Format Indicator says UTF-8 and it is not: refused
        // with 0x99 Payload format invalid (§3.3.2.3.2, a MAY): in the
        // PUBACK / PUBREC of QoS 1/2, by DISCONNECT for QoS 0, which has no
        // acknowledgement to carry it (§4.13: the connection only).
        limited!(
            ProtocolError,
            debug,
            "publish to {}: payload is not UTF-8",
            publish.topic
        );
        shard.stats.publish_dropped += 1;
        if publish.qos == QoS::AtMostOnce {
            shard.stats.protocol_errors += 1;
            return Err(CloseReason::PayloadFormatInvalid);
        }
        acknowledge(
            shard,
            key,
            conn_id,
            (publish.qos, publish.packet_id),
            ReasonCode::PAYLOAD_FORMAT_INVALID,
            false,
        );
        return Ok(());
    }
    let Publish {
        qos,
        retain,
        topic,
        packet_id,
        properties,
        payload,
        ..
    } = publish;
    if let Some(response_topic) = properties.response_topic()
        && topic::validate_topic_name(response_topic).is_err()
    {
        // A Response Topic is a Topic Name: no wildcards (§3.3.2.3.5).
        limited!(
            ProtocolError,
            debug,
            "invalid response topic {response_topic:?}"
        );
        shard.stats.protocol_errors += 1;
        return Err(CloseReason::ProtocolError);
    }
    // The Receive Maximum fanmq announced (max_inflight_messages) bounds
    // the QoS 2 messages the client may have unreleased (§3.3.4): one more
    // is 0x93 (a duplicate of one it has is not more).
    let receive_maximum = shard.limits.max_inflight.min(usize::from(u16::MAX));
    if qos == QoS::ExactlyOnce
        && let Some(session) = shard.session_for(key, conn_id)
        && let Some(flows) = session.state.flows.as_deref()
        && flows.awaiting_rel.len() >= receive_maximum
        && !flows.awaiting_rel.contains(&packet_id)
    {
        limited!(
            ProtocolError,
            debug,
            "client {}: more than {receive_maximum} QoS 2 messages unreleased",
            session.client_id
        );
        shard.stats.protocol_errors += 1;
        return Err(CloseReason::ReceiveMaximumExceeded);
    }
    let message = Message {
        topic,
        payload,
        qos,
        retain,
        retain_stamp: 0,
        properties: MessageProperties::of(&properties, Instant::now()),
    };
    let received = receive_publish(shard, key, conn_id, message, packet_id, username)?;
    let reason_code = match received {
        Received::Accepted => ReasonCode::SUCCESS,
        Received::NotAuthorized => ReasonCode::NOT_AUTHORIZED,
        Received::QuotaExceeded => ReasonCode::QUOTA_EXCEEDED,
    };
    // The ack of a retained publish waits for every replica
    // ([`crate::shard::held_acks::HeldAcks`]).
    let retained = retain && received == Received::Accepted;
    acknowledge(shard, key, conn_id, (qos, packet_id), reason_code, retained);
    Ok(())
}

/// Queues the PUBACK (QoS 1) or PUBREC (QoS 2) of a received PUBLISH
/// (its QoS and packet id) with `reason_code` (nothing for QoS 0);
/// `retained`: it acknowledges a retained publish that was accepted.
fn acknowledge(
    shard: &mut Shard,
    key: SessionKey,
    conn_id: u64,
    (qos, packet_id): (QoS, v5::PacketId),
    reason_code: ReasonCode,
    retained: bool,
) {
    let ack_type = match qos {
        QoS::AtMostOnce => return,
        QoS::AtLeastOnce => PacketType::PubAck,
        QoS::ExactlyOnce => PacketType::PubRec,
    };
    queue_ack(
        shard,
        key,
        conn_id,
        ack_type,
        packet_id,
        reason_code,
        retained,
    );
}

/// Queues a PUBACK, PUBREC or PUBCOMP for `packet_id` with `reason_code`
/// (the 4-byte short form for Success), behind held acks of the read
/// (`Shard::queue_ack`).
fn queue_ack(
    shard: &mut Shard,
    key: SessionKey,
    conn_id: u64,
    ack_type: PacketType,
    packet_id: v5::PacketId,
    reason_code: ReasonCode,
    retained: bool,
) {
    let ack = Ack {
        packet_id,
        reason_code,
        properties: Properties::new(),
    };
    let mut bytes = BytesMut::new();
    if let Err(e) = v5::encode_ack(ack_type, &ack, &mut bytes) {
        log::error!("cannot encode {ack_type:?}: {e}");
    }
    shard.queue_ack(key, conn_id, &bytes, retained);
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU16;

    use bytes::Bytes;

    use super::*;
    use crate::protocol::v5::Property;

    /// A QoS 0 PUBLISH to `topic` with Topic Alias `alias`.
    fn publish(topic: &'static str, alias: u16) -> Publish {
        let alias = NonZeroU16::new(alias).expect("non-zero alias");
        Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: ByteString::from_static(topic),
            packet_id: 0,
            properties: Properties::new().with(Property::TopicAlias(alias)),
            payload: Bytes::new(),
        }
    }

    #[test]
    fn topic_aliases_are_set_used_and_bounded() {
        let mut rare = None;
        let mut set = publish("a/b", 2);
        assert_eq!(resolve_topic_alias(&mut set, &mut rare, 2), Ok(()));
        let mut used = publish("", 2);
        assert_eq!(resolve_topic_alias(&mut used, &mut rare, 2), Ok(()));
        assert_eq!(used.topic, "a/b");
        let mut unset = publish("", 1);
        assert_eq!(
            resolve_topic_alias(&mut unset, &mut rare, 2),
            Err(CloseReason::TopicAliasInvalid),
            "alias 1 was never set"
        );
        let mut over = publish("c", 3);
        assert_eq!(
            resolve_topic_alias(&mut over, &mut rare, 2),
            Err(CloseReason::TopicAliasInvalid)
        );
        assert_eq!(rare.map(|r| r.topic_aliases.len()), Some(2));
    }

    #[test]
    fn decode_errors_close_with_their_reason() {
        for code in [0x81, 0x82, 0x93, 0x94, 0x95] {
            let reason = CloseReason::for_reason_code(ReasonCode(code));
            assert_eq!(reason.disconnect_reason(), Some(ReasonCode(code)));
        }
        assert_eq!(
            CloseReason::for_reason_code(ReasonCode::UNSUPPORTED_PROTOCOL_VERSION),
            CloseReason::ProtocolError
        );
    }
}
