//! The MQTT rules for a connected client: each decoded packet and what the
//! session and the shard do with it (§3.3 to §3.14).

use bytes::BytesMut;

use crate::observe::log_limit::LogKind::{MaxAwaitingRel, ProtocolError, PublishDenied};
use crate::observe::log_limit::limited;
use crate::protocol::message::Message;
use crate::protocol::topic;
use crate::protocol::v3::{self as codec, Packet, QoS};
use crate::session::link::{CloseReason, SessionKey};
use crate::session::{self, Qos2Receipt};
use crate::shard::Shard;

/// Decodes and handles every complete packet in `rx`; `username` is the
/// client's, for ACL checks.
pub fn process(
    shard: &mut Shard,
    key: SessionKey,
    conn_id: u64,
    rx: &mut BytesMut,
    username: Option<&str>,
) -> Result<(), CloseReason> {
    let now = shard.now_ticks();
    let Some(session) = shard.session_for(key, conn_id) else {
        return Err(CloseReason::TakenOver);
    };
    if let Some(link) = session.link.as_mut() {
        link.last_seen = now;
    }
    let max = shard.config.max_packet_size;
    loop {
        let packet = match codec::decode(rx, max) {
            Ok(Some(packet)) => packet,
            Ok(None) => return Ok(()),
            Err(e) => {
                limited!(ProtocolError, debug, "client packet refused: {e}");
                shard.stats.protocol_errors += 1;
                return Err(CloseReason::ProtocolError);
            }
        };
        shard.stats.packets_received += 1;
        handle_packet(shard, key, conn_id, packet, username)?;
    }
}

/// Acts on one packet from a connected client (`username`: for the ACL).
pub(super) fn handle_packet(
    shard: &mut Shard,
    key: SessionKey,
    conn_id: u64,
    packet: Packet,
    username: Option<&str>,
) -> Result<(), CloseReason> {
    let limits = shard.limits;
    let max_topic_levels = shard.config.max_topic_levels;
    // A denied PUBLISH still completes its QoS flow (acknowledged, then
    // dropped and counted), as Mosquitto does.
    let denied = match &packet {
        Packet::Publish(publish) => !shard.may_publish(key, username, &publish.topic),
        _ => false,
    };
    // Acks of retained publishes wait for every replica, and later acks of
    // this session wait behind them ([`crate::shard::held_acks::HeldAcks`]).
    let (replicas, holding) = (shard.nr_shards > 1, shard.held_acks.holds(key));
    let Some(session) = shard.session_for(key, conn_id) else {
        return Err(CloseReason::TakenOver);
    };
    match packet {
        Packet::Connect(_) => {
            limited!(
                ProtocolError,
                debug,
                "client {}: second CONNECT (§3.1.0-2)",
                session.client_id
            );
            shard.stats.protocol_errors += 1;
            return Err(CloseReason::ProtocolError);
        }
        Packet::Publish(publish) => {
            if topic::validate_topic_name(&publish.topic).is_err() {
                limited!(
                    ProtocolError,
                    debug,
                    "client {}: invalid topic name {:?}",
                    session.client_id,
                    publish.topic
                );
                shard.stats.protocol_errors += 1;
                return Err(CloseReason::ProtocolError);
            }
            if topic::exceeds_levels(&publish.topic, max_topic_levels) {
                limited!(
                    ProtocolError,
                    debug,
                    "client {}: topic deeper than max_topic_levels ({max_topic_levels}), closing",
                    session.client_id
                );
                shard.stats.protocol_errors += 1;
                return Err(CloseReason::ProtocolError);
            }
            let deliver = match publish.qos {
                QoS::AtMostOnce => true,
                QoS::AtLeastOnce => true,
                QoS::ExactlyOnce => match session.on_publish_qos2(publish.packet_id, &limits) {
                    Qos2Receipt::New => true,
                    Qos2Receipt::Duplicate => false,
                    Qos2Receipt::Refused => {
                        limited!(
                            MaxAwaitingRel,
                            info,
                            "client {}: more than {} unreleased QoS 2 messages, one dropped",
                            session.client_id,
                            limits.max_awaiting_rel
                        );
                        shard.stats.publish_dropped += 1;
                        shard.stats.dropped_qos2_overflow += 1;
                        return Ok(());
                    }
                },
            };
            if let Some(ack) = session::ack_for_publish(publish.qos, publish.packet_id) {
                let retained = replicas
                    && publish.retain
                    && deliver
                    && !denied
                    && !publish.topic.starts_with("$SYS");
                if retained || holding {
                    shard.held_acks.hold(key, conn_id, ack);
                } else {
                    session.queue_control(&ack);
                    shard.mark_dirty(key);
                }
            }
            shard.stats.publish_received += 1;
            shard.stats.publish_received_by_qos[publish.qos as usize] += 1;
            if !deliver {
                return Ok(());
            }
            if publish.topic.starts_with("$SYS") {
                limited!(
                    PublishDenied,
                    debug,
                    "publish to {} dropped: $SYS is the broker's",
                    publish.topic
                );
                shard.stats.publish_dropped += 1;
                shard.stats.dropped_sys_topic += 1;
                return Ok(());
            }
            if denied {
                limited!(
                    PublishDenied,
                    debug,
                    "publish to {} dropped: denied by the ACL",
                    publish.topic
                );
                shard.stats.publish_denied += 1;
                return Ok(());
            }
            shard.publish(Message {
                topic: publish.topic,
                payload: publish.payload,
                qos: publish.qos,
                retain: publish.retain,
                retain_stamp: 0,
            });
        }
        Packet::PubAck(id) => {
            session.on_puback(id, &limits);
            shard.mark_dirty(key);
        }
        Packet::PubRec(id) => {
            session.on_pubrec(id);
            shard.mark_dirty(key);
        }
        Packet::PubRel(id) => {
            session.on_pubrel(id);
            shard.mark_dirty(key);
        }
        Packet::PubComp(id) => {
            session.on_pubcomp(id, &limits);
            shard.mark_dirty(key);
        }
        Packet::Subscribe(subscribe) => shard.subscribe(key, subscribe, username),
        Packet::Unsubscribe(unsubscribe) => {
            shard.unsubscribe(key, unsubscribe.packet_id, &unsubscribe.filters)
        }
        Packet::PingReq => {
            session.queue_control(&codec::PINGRESP_BYTES);
            shard.mark_dirty(key);
        }
        Packet::Disconnect => return Err(CloseReason::Disconnect),
    }
    Ok(())
}
