//! The application message as it moves through the broker, and its outgoing
//! frames encoded once per shard.
//!
//! A [`Message`] is what a publisher sent (topic, payload, QoS, retain flag). It
//! is cheap to clone: the topic and payload are reference-counted `Bytes`, so a
//! message handed to another shard or kept in a subscriber's queue moves a
//! refcount, not the payload.
//!
//! [`Encoded`] caches the wire form of one message for one fan-out on one shard:
//! every QoS 0 subscriber gets a clone of the same frame, every QoS 1/2
//! subscriber gets the same head (fixed header + topic) and payload with its own
//! packet id written between them (see `crate::session::outqueue::OutFrame`).

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use std::rc::Rc;

use crate::protocol::v3::{self as codec, QoS};

/// Encoded bytes shared by the queues of one shard.
pub type Frame = Rc<[u8]>;

/// An application message (MQTT 3.1.1 §3.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The topic name it was published to (already validated).
    pub topic: ByteString,
    /// The application payload, shared between every queue that holds it.
    pub payload: Bytes,
    /// The QoS it was published with (or, in a subscriber's queue, the QoS it
    /// will be delivered with after the downgrade to the granted QoS).
    pub qos: QoS,
    /// The RETAIN flag as the publisher set it.
    pub retain: bool,
    /// Where a retained message stands in the order every replica agrees on
    /// (`crate::router::retain::RetainStore::stamp`); 0 when not retained or not
    /// stamped (only the shard that received it stamps it). 8 bytes, past
    /// the padding: a message is 80 bytes, not 72.
    pub retain_stamp: u64,
}

impl Message {
    /// Bytes this message occupies on the wire as a PUBLISH with a packet id
    /// (used to account queued bytes against a client's limit).
    pub fn wire_len(&self) -> usize {
        let remaining = 2 + self.topic.len() + 2 + self.payload.len();
        1 + codec::remaining_length_len(remaining) + remaining
    }

    /// Encodes a complete PUBLISH frame (for QoS 0 fan-out once per shard;
    /// alone for a retained message on SUBSCRIBE or a redelivery with DUP).
    pub fn encode_whole(&self, qos: QoS, retain: bool, dup: bool, packet_id: u16) -> Frame {
        let mut out = BytesMut::with_capacity(self.wire_len());
        let encoded = codec::encode_publish(
            &self.topic,
            qos,
            retain,
            dup,
            packet_id,
            &self.payload,
            &mut out,
        );
        report_unencodable(encoded);
        Frame::from(&out[..])
    }
}

/// The wire forms of one message for one fan-out on one shard, each encoded on
/// first use and then shared by every subscriber that needs it.
///
/// Normal forwarding always clears RETAIN (§3.3.1.3), so only the QoS varies.
pub struct Encoded<'a> {
    /// The message being fanned out.
    pub message: &'a Message,
    /// The shard's batch buffer of this step, where QoS 0 frames go.
    batch: &'a mut BytesMut,
    /// Where the QoS 0 frame lies in the shard's batch of this step
    /// (start, length), once encoded.
    qos0: Option<(u32, u32)>,
    /// Fixed header + topic for QoS 1 and QoS 2 deliveries: index 0 is QoS 1.
    heads: [Option<Frame>; 2],
    /// The payload as a shard-local frame, for QoS 1 and 2 deliveries.
    payload: Option<Frame>,
}

impl<'a> Encoded<'a> {
    /// Starts an empty cache for `message`, encoding into `batch`.
    pub fn new(message: &'a Message, batch: &'a mut BytesMut) -> Self {
        Encoded {
            message,
            batch,
            qos0: None,
            heads: [None, None],
            payload: None,
        }
    }

    /// The QoS 0 frame's range in the shard's batch of this step: encoded
    /// (appended) the first time, then shared by every subscriber.
    pub fn qos0_frame(&mut self) -> (u32, u32) {
        let message = self.message;
        let batch = &mut *self.batch;
        *self.qos0.get_or_insert_with(|| {
            let start = batch.len();
            let encoded = codec::encode_publish(
                &message.topic,
                QoS::AtMostOnce,
                false,
                false,
                0,
                &message.payload,
                batch,
            );
            report_unencodable(encoded);
            let len = batch.len() - start;
            (
                u32::try_from(start).unwrap_or(u32::MAX),
                u32::try_from(len).unwrap_or(0),
            )
        })
    }

    /// The shared head (fixed header and topic) of a QoS 1 or 2 PUBLISH; the
    /// caller writes its own packet id and then the payload.
    pub fn head(&mut self, qos: QoS) -> Frame {
        let message = self.message;
        let slot = if qos == QoS::ExactlyOnce { 1 } else { 0 };
        self.heads[slot]
            .get_or_insert_with(|| {
                let mut out = BytesMut::with_capacity(8 + message.topic.len());
                let encoded = codec::encode_publish_head(
                    &message.topic,
                    qos,
                    false,
                    false,
                    message.payload.len(),
                    &mut out,
                );
                report_unencodable(encoded);
                Frame::from(&out[..])
            })
            .clone()
    }

    /// The payload, copied once per shard into a shard-local frame.
    pub fn payload(&mut self) -> Frame {
        let message = self.message;
        self.payload
            .get_or_insert_with(|| Frame::from(&message.payload[..]))
            .clone()
    }
}

/// Encoding a message cannot fail: its topic and payload come from a decoded
/// packet no larger than `max_packet_size` (far below MQTT's 256 MiB limit),
/// and forwarding never makes a packet larger. Should that ever break, the
/// frame stays empty (nothing is sent) and the error is logged.
fn report_unencodable(result: Result<(), codec::EncodeError>) {
    if let Err(e) = result {
        log::error!("cannot encode an outgoing PUBLISH: {e}");
    }
}
