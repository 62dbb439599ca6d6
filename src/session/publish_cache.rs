//! The QoS 1/2 PUBLISH frames of this shard's sessions that are encoded one
//! session at a time (a message leaving a pending queue, a retained message
//! on SUBSCRIBE), shared between the sessions that send the same message
//! under the same packet id.
//!
//! A fan-out burst larger than a subscriber's inflight window puts the rest
//! of it in the subscriber's pending queue; each PUBACK then moves one
//! message into flight ([`Session::fill_window`](super::Session::fill_window)),
//! one session at a time, long after the fan-out's shared encodings
//! (`protocol::message::Encoded`) are gone. Packet ids are handed out in
//! order ([`super::packet_ids`]), so subscribers that got the same burst
//! send each of its messages under the same id, and the frame is the same
//! bytes for all of them: this cache encodes it once and hands each of
//! them the shared frame, where each used to encode and allocate its own
//! (at 10k subscribers and bursts twice the window, half of all deliveries).
//!
//! A message is known by the addresses of its topic and payload (shared
//! `Bytes`, never copied per subscriber) with its QoS and RETAIN flag; the
//! slot keeps a clone of the message, so those addresses cannot be reused
//! by another message while the slot holds them. Only messages without
//! MQTT 5.0 properties are kept: a frame with properties can differ per
//! session (Subscription Identifiers) or per moment (the Message Expiry
//! Interval left). A shard is one thread, so the cache is thread-local,
//! like the queued-bytes count (`super::outqueue`).

use std::cell::RefCell;

use crate::protocol::Version;
use crate::protocol::message::{Frame, Message};
use crate::protocol::v3::PacketId;

/// Slots of the cache, direct-mapped by message and packet id. Subscribers
/// a burst apart take up to a window's worth of (message, id) pairs at the
/// same time (100 with the default window and bursts of twice that);
/// direct-mapped, about that many pairs fall on a slot another one holds
/// when the slots are few: in a 1k-subscriber burst of twice the window
/// (callgrind), encoding still took 4.7-9.1% of the broker's instructions
/// with 256 slots, 3.6-4.3% with 1024. A power of two; the slots
/// themselves are about 100 KiB.
const SLOTS: usize = 1024;

/// Largest frame kept, in bytes: with [`SLOTS`] slots a shard keeps at most
/// 1 MiB of frames (and of the payloads they were made from). A larger
/// frame is encoded for each session, where the copy costs more than the
/// allocation saved anyway.
const MAX_FRAME_LEN: usize = 1024;

/// One encoded frame and what it was encoded from.
struct Slot {
    /// The message, kept so that its topic and payload stay allocated while
    /// their addresses name it here.
    message: Message,
    /// The protocol the frame is encoded for.
    version: Version,
    /// The packet id in the frame.
    packet_id: PacketId,
    /// The whole PUBLISH packet (DUP clear).
    frame: Frame,
}

thread_local! {
    /// This shard's slots, allocated on first use (a shard that never
    /// sends QoS 1/2 from a pending queue has none).
    static CACHE: RefCell<Vec<Option<Slot>>> = const { RefCell::new(Vec::new()) };
}

/// The PUBLISH frame of `message` (at its QoS and RETAIN flag, DUP clear)
/// under `packet_id` for a session speaking `version`: the one encoded for
/// an earlier session when the cache still has it, else encoded now (and
/// kept, when the message may be).
pub fn publish(message: &Message, version: Version, packet_id: PacketId) -> Frame {
    let encode = || message.encode_whole(version, message.qos, message.retain, false, packet_id);
    if message.properties.is_some() {
        return encode();
    }
    let index = slot_of(message, packet_id);
    CACHE.with(|cache| {
        let mut slots = cache.borrow_mut();
        if let Some(Some(slot)) = slots.get(index)
            && slot.packet_id == packet_id
            && slot.version == version
            && same_message(&slot.message, message)
        {
            return slot.frame.clone();
        }
        let frame = encode();
        if frame.len() <= MAX_FRAME_LEN {
            if slots.is_empty() {
                slots.resize_with(SLOTS, || None);
            }
            slots[index] = Some(Slot {
                message: message.clone(),
                version,
                packet_id,
                frame: frame.clone(),
            });
        }
        frame
    })
}

/// The slot of `message` under `packet_id`: its payload's address and the
/// id, mixed (Fibonacci hashing) so that consecutive ids of one message and
/// one id of consecutive messages spread over the slots.
fn slot_of(message: &Message, packet_id: PacketId) -> usize {
    let key = (message.payload.as_ptr() as u64) ^ (u64::from(packet_id) << 48);
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SLOTS.trailing_zeros())) as usize
}

/// True when `a` and `b` encode to the same PUBLISH: the same topic and
/// payload bytes (the same allocations, which the cached one keeps alive),
/// QoS and RETAIN, and no properties.
fn same_message(a: &Message, b: &Message) -> bool {
    a.topic.as_ptr() == b.topic.as_ptr()
        && a.topic.len() == b.topic.len()
        && a.payload.as_ptr() == b.payload.as_ptr()
        && a.payload.len() == b.payload.len()
        && a.qos == b.qos
        && a.retain == b.retain
        && a.properties.is_none()
        && b.properties.is_none()
}

/// Drops every kept frame (tests; a shard keeps its cache for its life).
#[cfg(test)]
pub fn clear() {
    CACHE.with(|cache| cache.borrow_mut().clear());
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::protocol::v3::QoS;

    fn message(topic: &'static str, payload: &'static [u8]) -> Message {
        Message::new(
            topic.into(),
            Bytes::copy_from_slice(payload),
            QoS::AtLeastOnce,
            false,
        )
    }

    #[test]
    fn the_same_message_under_the_same_id_is_one_frame() {
        clear();
        let m = message("a/b", b"hello");
        let copy = m.clone();
        let first = publish(&m, Version::V3, 7);
        let second = publish(&copy, Version::V3, 7);
        assert!(std::rc::Rc::ptr_eq(&first, &second));
        assert_eq!(
            &first[..],
            &m.encode_whole(Version::V3, QoS::AtLeastOnce, false, false, 7)[..]
        );
    }

    #[test]
    fn another_id_version_qos_or_message_is_its_own_frame() {
        clear();
        let m = message("a/b", b"hello");
        let first = publish(&m, Version::V3, 7);
        let other_id = publish(&m, Version::V3, 8);
        let v5 = publish(&m, Version::V5, 7);
        let qos2 = publish(
            &Message {
                qos: QoS::ExactlyOnce,
                ..m.clone()
            },
            Version::V3,
            7,
        );
        // Equal bytes, another allocation: another message.
        let twin = publish(&message("a/b", b"hello"), Version::V3, 7);
        for (frame, id, version, qos) in [
            (&other_id, 8, Version::V3, QoS::AtLeastOnce),
            (&v5, 7, Version::V5, QoS::AtLeastOnce),
            (&qos2, 7, Version::V3, QoS::ExactlyOnce),
            (&twin, 7, Version::V3, QoS::AtLeastOnce),
        ] {
            assert!(!std::rc::Rc::ptr_eq(&first, frame));
            assert_eq!(
                &frame[..],
                &m.encode_whole(version, qos, false, false, id)[..]
            );
        }
    }

    #[test]
    fn a_message_with_properties_or_a_large_one_is_not_kept() {
        clear();
        let mut with = message("a/b", b"x");
        with.properties = Some(std::sync::Arc::new(
            crate::protocol::message::MessageProperties {
                forwarded: crate::protocol::v5::Properties::new(),
                expires_at: None,
            },
        ));
        let a = publish(&with, Version::V5, 1);
        let b = publish(&with, Version::V5, 1);
        assert!(!std::rc::Rc::ptr_eq(&a, &b));
        let large = Message::new(
            "a/b".into(),
            Bytes::from(vec![0u8; MAX_FRAME_LEN]),
            QoS::AtLeastOnce,
            false,
        );
        let a = publish(&large, Version::V3, 1);
        let b = publish(&large, Version::V3, 1);
        assert!(!std::rc::Rc::ptr_eq(&a, &b));
        assert_eq!(a, b);
    }
}
