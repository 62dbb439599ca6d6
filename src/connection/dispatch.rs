//! The MQTT rules for a connected client: each decoded packet and what the
//! session and the shard do with it (§3.3 to §3.14).

use bytes::BytesMut;

use crate::observe::log_limit::LogKind::{
    MaxAwaitingRel, ProtocolError, PublishDenied, StoreRefused,
};
use crate::observe::log_limit::limited;
use crate::protocol::Version;
use crate::protocol::message::Message;
use crate::protocol::topic;
use crate::protocol::v3::{self as codec, Packet, PacketId, QoS};
use crate::session::link::{CloseReason, Rare, SessionKey};
use crate::session::{self, Qos2Receipt};
use crate::shard::Shard;
use crate::store::record::FlowStep;

/// Decodes and handles every complete packet in `rx`; `rare` holds the
/// client's user name, for ACL checks (and an MQTT 5.0 client's topic
/// aliases). An MQTT 5.0 connection's packets go to [`super::dispatch_v5`].
pub fn process(
    shard: &mut Shard,
    key: SessionKey,
    conn_id: u64,
    rx: &mut BytesMut,
    rare: &mut Option<Box<Rare>>,
) -> Result<(), CloseReason> {
    let now = shard.now_ticks();
    let Some(session) = shard.session_for(key, conn_id) else {
        return Err(CloseReason::TakenOver);
    };
    if let Some(link) = session.link.as_mut() {
        link.last_seen = now;
    }
    if session.version == Version::V5 {
        return super::dispatch_v5::process(shard, key, conn_id, rx, rare);
    }
    let username = Rare::username(rare.as_deref());
    // Consecutive QoS 0 PUBLISH packets to one topic are collected and
    // published together (`crate::shard::run`), before any other packet is
    // handled, so the order of everything the client sent is kept.
    let mut run = std::mem::take(&mut shard.run);
    let result = process_packets(shard, key, conn_id, rx, username, &mut run);
    if !run.is_empty() {
        shard.publish_run(&mut run, Some(key));
    }
    shard.run = run;
    result
}

/// The loop of [`process`] for a 3.1.1 client, collecting runs in `run`.
fn process_packets(
    shard: &mut Shard,
    key: SessionKey,
    conn_id: u64,
    rx: &mut BytesMut,
    username: Option<&str>,
    run: &mut Vec<Message>,
) -> Result<(), CloseReason> {
    let max = shard.config.max_packet_size;
    loop {
        // A QoS 1 subscriber's PUBACKs, most of what a fan-out reads, are
        // taken without building a `Packet`.
        if let Some(id) = codec::take_puback(rx) {
            shard.stats.packets_received += 1;
            if !run.is_empty() {
                shard.publish_run(run, Some(key));
            }
            on_puback(shard, key, conn_id, id)?;
            continue;
        }
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
        match packet {
            Packet::Publish(publish) if publish.qos == QoS::AtMostOnce && !publish.retain => {
                if run.first().is_some_and(|m| m.topic != publish.topic) {
                    shard.publish_run(run, Some(key));
                }
                let message = Message::new(publish.topic, publish.payload, QoS::AtMostOnce, false);
                // QoS 0: no acknowledgement, whatever the outcome.
                if admit_publish(shard, key, conn_id, &message, publish.packet_id, username)?.1 {
                    run.push(message);
                }
            }
            packet => {
                if !run.is_empty() {
                    shard.publish_run(run, Some(key));
                }
                handle_packet(shard, key, conn_id, packet, username)?;
            }
        }
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
            let (qos, packet_id, retain) = (publish.qos, publish.packet_id, publish.retain);
            let message = Message::new(publish.topic, publish.payload, qos, retain);
            let received = receive_publish(shard, key, conn_id, message, packet_id, username)?;
            // A denied PUBLISH still completes its QoS flow (acknowledged,
            // then dropped and counted), as Mosquitto does; one over
            // max_awaiting_rel gets no PUBREC. The ack of a retained
            // publish waits for every replica
            // ([`crate::shard::held_acks::HeldAcks`]).
            if received != Received::QuotaExceeded
                && let Some(ack) = session::ack_for_publish(qos, packet_id)
            {
                let retained = retain && received == Received::Accepted;
                shard.queue_ack(key, conn_id, &ack, retained);
            }
        }
        Packet::PubAck(id) => return on_puback(shard, key, conn_id, id),
        Packet::PubRec(id) => {
            if session.on_pubrec(id) {
                shard.journal_step(key, FlowStep::PubRecd, id);
            }
            shard.mark_dirty(key);
        }
        Packet::PubRel(id) => {
            // PUBCOMP, also for an unknown id (§4.3.3); with persistence
            // it waits until the release is durable (`Shard::journal_step`).
            if session.release(id) {
                shard.journal_step(key, FlowStep::Released, id);
            }
            shard.queue_ack(key, conn_id, &codec::pubcomp(id), false);
        }
        Packet::PubComp(id) => {
            if session.on_pubcomp(id, &limits) {
                shard.journal_step(key, FlowStep::Done, id);
            }
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

/// A PUBACK from a connected client: its QoS 1 message is done (an
/// unknown id is ignored, as Mosquitto does), and a pending message may
/// take the freed slot of the inflight window.
fn on_puback(
    shard: &mut Shard,
    key: SessionKey,
    conn_id: u64,
    id: PacketId,
) -> Result<(), CloseReason> {
    let limits = shard.limits;
    let Some(session) = shard.session_for(key, conn_id) else {
        return Err(CloseReason::TakenOver);
    };
    if session.on_puback(id, &limits) {
        shard.journal_step(key, FlowStep::Done, id);
    }
    shard.mark_dirty(key);
    Ok(())
}

/// What became of a received PUBLISH: it decides the acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Received {
    /// Published (or, for QoS 2, a duplicate of one already published).
    Accepted,
    /// Refused by the ACL, or to a `$SYS` topic: acknowledged, dropped and
    /// counted (5.0: Reason Code 0x87 Not authorized).
    NotAuthorized,
    /// A QoS 2 PUBLISH over `max_awaiting_rel` unreleased ones: dropped and
    /// counted (3.1.1: no PUBREC; 5.0: PUBREC 0x97 Quota exceeded).
    QuotaExceeded,
}

/// The MQTT rules for a received PUBLISH of either version, its topic
/// already resolved: the topic is checked (a bad one closes the
/// connection), a QoS 2 packet id is deduplicated (§4.3.3), `$SYS` topics
/// and ACL refusals are dropped and counted, and the message is published.
pub(super) fn receive_publish(
    shard: &mut Shard,
    key: SessionKey,
    conn_id: u64,
    message: Message,
    packet_id: PacketId,
    username: Option<&str>,
) -> Result<Received, CloseReason> {
    let (received, deliver) = admit_publish(shard, key, conn_id, &message, packet_id, username)?;
    if deliver {
        shard.publish_from(message, Some(key));
    }
    Ok(received)
}

/// The checks of [`receive_publish`], counted: what became of the PUBLISH
/// and whether the message is to be published.
fn admit_publish(
    shard: &mut Shard,
    key: SessionKey,
    conn_id: u64,
    message: &Message,
    packet_id: PacketId,
    username: Option<&str>,
) -> Result<(Received, bool), CloseReason> {
    let limits = shard.limits;
    let max_topic_levels = shard.config.max_topic_levels;
    let denied = !shard.may_publish(key, username, &message.topic);
    let store_refuses = shard.store_refuses();
    let Some(session) = shard.session_for(key, conn_id) else {
        return Err(CloseReason::TakenOver);
    };
    if topic::validate_topic_name(&message.topic).is_err() {
        limited!(
            ProtocolError,
            debug,
            "client {}: invalid topic name {:?}",
            session.client_id,
            message.topic
        );
        shard.stats.protocol_errors += 1;
        return Err(CloseReason::TopicNameInvalid);
    }
    if topic::exceeds_levels(&message.topic, max_topic_levels) {
        limited!(
            ProtocolError,
            debug,
            "client {}: topic deeper than max_topic_levels ({max_topic_levels}), closing",
            session.client_id
        );
        shard.stats.protocol_errors += 1;
        return Err(CloseReason::TopicNameInvalid);
    }
    let refused = message.topic.starts_with("$SYS") || denied;
    if message.retain && message.qos != QoS::AtMostOnce && !refused && store_refuses {
        // Persistence cannot store it (full disk): never acknowledged. A
        // 5.0 client gets PUBACK/PUBREC 0x97 Quota exceeded; a 3.1.1 one
        // has no way to hear "not stored", and an unanswered packet id
        // would stay stuck in its window: its connection closes and it
        // resends after reconnecting (§4.4).
        limited!(
            StoreRefused,
            warn,
            "persistence cannot store a retained QoS {} publish to {}: refused",
            message.qos as u8,
            message.topic
        );
        let version = session.version;
        shard.stats.store_refused += 1;
        shard.stats.publish_dropped += 1;
        return match version {
            Version::V5 => Ok((Received::QuotaExceeded, false)),
            _ => Err(CloseReason::StoreUnavailable),
        };
    }
    let deliver = match message.qos {
        QoS::AtMostOnce | QoS::AtLeastOnce => true,
        // A refused QoS 2 message is not remembered: an MQTT 5.0 client
        // ends its flow at a failing PUBREC (and a 3.1.1 client's PUBREL
        // for an unknown id is still answered, §4.3.3).
        QoS::ExactlyOnce if refused => true,
        QoS::ExactlyOnce => match session.on_publish_qos2(packet_id, &limits) {
            Qos2Receipt::New => {
                // The PUBREC waits until the id is durable, so that a
                // PUBLISH resent after a restart is known as a duplicate.
                shard.journal_step(key, FlowStep::AwaitRel, packet_id);
                true
            }
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
                return Ok((Received::QuotaExceeded, false));
            }
        },
    };
    shard.stats.publish_received += 1;
    shard.stats.publish_received_by_qos[message.qos as usize] += 1;
    if message.topic.starts_with("$SYS") {
        limited!(
            PublishDenied,
            debug,
            "publish to {} dropped: $SYS is the broker's",
            message.topic
        );
        shard.stats.publish_dropped += 1;
        shard.stats.dropped_sys_topic += 1;
        return Ok((Received::NotAuthorized, false));
    }
    if denied {
        limited!(
            PublishDenied,
            debug,
            "publish to {} dropped: denied by the ACL",
            message.topic
        );
        shard.stats.publish_denied += 1;
        return Ok((Received::NotAuthorized, false));
    }
    Ok((Received::Accepted, deliver))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::testing::{self, attach_client};

    /// The bytes of a QoS 0 PUBLISH of `payload` to `topic`, as a client
    /// sends it.
    fn publish(topic: &str, payload: &str) -> Vec<u8> {
        let body = 2 + topic.len() + payload.len();
        let mut out = vec![0x30, u8::try_from(body).expect("short")];
        out.extend_from_slice(&u16::try_from(topic.len()).expect("short").to_be_bytes());
        out.extend_from_slice(topic.as_bytes());
        out.extend_from_slice(payload.as_bytes());
        out
    }

    /// The bytes of a SUBSCRIBE to `filter` at QoS 0, packet id 7.
    fn subscribe(filter: &str) -> Vec<u8> {
        let body = 2 + 2 + filter.len() + 1;
        let mut out = vec![0x82, u8::try_from(body).expect("short"), 0, 7];
        out.extend_from_slice(&u16::try_from(filter.len()).expect("short").to_be_bytes());
        out.extend_from_slice(filter.as_bytes());
        out.push(0);
        out
    }

    #[test]
    fn publishes_of_one_read_keep_their_order_around_the_other_packets() {
        let mut shard = testing::shard();
        let mut publisher = attach_client(&mut shard, "p", "none", QoS::AtMostOnce, None);
        let mut subscriber = attach_client(&mut shard, "s", "t", QoS::AtMostOnce, None);
        shard.flush_dirty();
        let conn_id = shard
            .sessions
            .get(publisher.key as usize)
            .and_then(|s| s.link.as_ref())
            .map(|l| l.conn_id)
            .expect("online");
        let mut read = Vec::new();
        for packet in [
            publish("t", "a"),
            publish("t", "b"),
            publish("u", "x"),
            publish("t", "c"),
            subscribe("t"),
            publish("t", "d"),
            publish("t", "e"),
        ] {
            read.extend_from_slice(&packet);
        }
        let mut rx = BytesMut::from(&read[..]);
        let mut rare = None;
        let done = process(&mut shard, publisher.key, conn_id, &mut rx, &mut rare);
        assert_eq!(done, Ok(()));
        assert!(rx.is_empty());
        assert!(shard.run.is_empty(), "no run left behind");
        shard.flush_dirty();
        let texts = |got: Vec<(String, Vec<u8>, QoS)>| -> Vec<String> {
            got.into_iter()
                .map(|(_, p, _)| String::from_utf8_lossy(&p).into_owned())
                .collect()
        };
        assert_eq!(texts(subscriber.publishes()), ["a", "b", "c", "d", "e"]);
        // The publisher subscribed after "c": it gets only what came after.
        assert_eq!(texts(publisher.publishes()), ["d", "e"]);
        assert_eq!(shard.stats.publish_received, 6);
    }
}
