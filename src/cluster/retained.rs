//! Retained messages in the JetStream KV bucket `<root>_retained`, one key
//! per topic (docs/design/cluster.md §8).
//!
//! Key: base64url-nopad(SHA-256(topic)), 43 characters (KV keys must match
//! `[-/_=.a-zA-Z0-9]+`, and topics may be 65,535 bytes). Value, little
//! endian: version u8 = 1; QoS u8; flags u8 (bit 0: RETAIN as published,
//! always set); reserved u8; expiry deadline u64 (Unix ms, 0: none); origin
//! node (u8 length + bytes); topic (u16 length + bytes); MQTT 5.0 property
//! block of the forwarded properties (u32 length + bytes, 0: none); the
//! payload to the end. A delete is a KV delete of the key.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;
use sha2::{Digest, Sha256};

use crate::protocol::message::{Message, MessageProperties};
use crate::protocol::topic;
use crate::protocol::v3::QoS;
use crate::protocol::v5::Properties;

/// The value layout's version.
const VERSION: u8 = 1;
/// Bytes before the origin: version, QoS, flags, reserved, expiry.
const FIXED: usize = 12;
/// Bits of a retained stamp below the revision: all ones, above every
/// shard id, so a confirmed revision orders after every local update of the
/// same clock value.
const STAMP_LOW: u64 = 0xFFFF;

/// Why a bucket value is no retained message.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// Shorter than its fields say.
    #[error("retained value truncated")]
    Truncated,
    /// A layout this version does not know.
    #[error("retained value version {0} unknown")]
    Version(u8),
    /// A field out of range (QoS, topic, properties).
    #[error("retained value field {0} invalid")]
    Invalid(&'static str),
}

/// The bucket's name under cluster root `root`.
pub fn bucket(root: &str) -> String {
    format!("{root}_retained")
}

/// The key of `topic`.
pub fn key(topic: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(topic.as_bytes()))
}

/// The stamp of a retained update confirmed at bucket revision `revision`.
pub fn stamp(revision: u64) -> u64 {
    (revision << 16) | STAMP_LOW
}

/// Unix milliseconds of `at` (an `Instant` in this process).
fn unix_ms(at: Instant, now: Instant) -> u64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let wall_at = wall + at.saturating_duration_since(now);
    u64::try_from(wall_at.as_millis()).unwrap_or(u64::MAX)
}

/// The value of retained `message` published on node `origin`; `None` when
/// it cannot be stored (expired, or properties that do not encode).
pub fn encode(message: &Message, origin: &str, now: Instant) -> Option<Bytes> {
    let mut expiry = 0;
    let mut block = Vec::new();
    if let Some(p) = &message.properties {
        if let Some(at) = p.expires_at {
            if at <= now {
                return None;
            }
            expiry = unix_ms(at, now);
        }
        if !p.forwarded.is_empty() {
            block = p.forwarded.to_publish_block().ok()?;
        }
    }
    let origin = &origin.as_bytes()[..origin.len().min(255)];
    let topic_len = u16::try_from(message.topic.len()).ok()?;
    let block_len = u32::try_from(block.len()).ok()?;
    let mut out = BytesMut::with_capacity(
        FIXED
            + 1
            + origin.len()
            + 2
            + message.topic.len()
            + 4
            + block.len()
            + message.payload.len(),
    );
    out.put_u8(VERSION);
    out.put_u8(message.qos as u8);
    out.put_u8(1);
    out.put_u8(0);
    out.put_u64_le(expiry);
    out.put_u8(origin.len() as u8);
    out.put_slice(origin);
    out.put_u16_le(topic_len);
    out.put_slice(message.topic.as_bytes());
    out.put_u32_le(block_len);
    out.put_slice(&block);
    out.put_slice(&message.payload);
    Some(out.freeze())
}

/// A value read back: the message (retained, unstamped) and its origin.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    /// The retained message.
    pub message: Message,
    /// The node it was published on.
    pub origin: String,
}

/// Splits `n` bytes off the front of `rest`.
fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], ValueError> {
    if rest.len() < n {
        return Err(ValueError::Truncated);
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

/// Reads a value written by [`encode`]; `now` turns the expiry back into
/// an `Instant`.
///
/// # Errors
/// See [`ValueError`].
pub fn decode(value: &Bytes, now: Instant) -> Result<Decoded, ValueError> {
    let mut rest: &[u8] = value;
    let fixed = take(&mut rest, FIXED)?;
    if fixed[0] != VERSION {
        return Err(ValueError::Version(fixed[0]));
    }
    let qos = match fixed[1] {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => return Err(ValueError::Invalid("qos")),
    };
    let mut expiry = [0u8; 8];
    expiry.copy_from_slice(&fixed[4..12]);
    let expiry = u64::from_le_bytes(expiry);
    let origin_len = usize::from(take(&mut rest, 1)?[0]);
    let origin = String::from_utf8_lossy(take(&mut rest, origin_len)?).into_owned();
    let topic_len = take(&mut rest, 2)?;
    let topic_len = usize::from(u16::from_le_bytes([topic_len[0], topic_len[1]]));
    let topic = std::str::from_utf8(take(&mut rest, topic_len)?)
        .map_err(|_| ValueError::Invalid("topic"))?
        .to_string();
    if topic::validate_topic_name(&topic).is_err() {
        return Err(ValueError::Invalid("topic"));
    }
    let block_len = take(&mut rest, 4)?;
    let block_len = u32::from_le_bytes([block_len[0], block_len[1], block_len[2], block_len[3]]);
    let block = take(&mut rest, block_len as usize)?;
    let forwarded = if block.is_empty() {
        Properties::new()
    } else {
        Properties::from_publish_block(block).map_err(|_| ValueError::Invalid("properties"))?
    };
    let expires_at = (expiry != 0).then(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let left = Duration::from_millis(expiry).saturating_sub(wall);
        now + left
    });
    let payload = value.slice(value.len() - rest.len()..);
    let properties = (!forwarded.is_empty() || expires_at.is_some()).then(|| {
        Arc::new(MessageProperties {
            forwarded,
            expires_at,
        })
    });
    Ok(Decoded {
        message: Message {
            topic: ByteString::from(topic),
            payload,
            qos,
            retain: true,
            retain_stamp: 0,
            properties,
        },
        origin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::v5::Property;

    #[test]
    fn a_value_round_trips_with_properties_and_expiry() {
        let now = Instant::now();
        let message = Message {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::AtLeastOnce,
            retain: true,
            retain_stamp: 7,
            properties: Some(Arc::new(MessageProperties {
                forwarded: Properties::new().with(Property::ContentType("json".into())),
                expires_at: Some(now + Duration::from_secs(60)),
            })),
        };
        let value = encode(&message, "node-a", now).expect("encodes");
        let back = decode(&value, now).expect("decodes");
        assert_eq!(back.origin, "node-a");
        assert_eq!(back.message.topic, message.topic);
        assert_eq!(back.message.payload, message.payload);
        assert_eq!(back.message.qos, QoS::AtLeastOnce);
        let p = back.message.properties.expect("properties");
        assert_eq!(p.forwarded, message.properties.as_ref().unwrap().forwarded);
        let left = p.expires_at.unwrap().saturating_duration_since(now);
        assert!(left > Duration::from_secs(58) && left <= Duration::from_secs(60));
    }

    #[test]
    fn truncated_or_foreign_values_are_refused() {
        let now = Instant::now();
        let message = Message::new("t".into(), Bytes::from_static(b"x"), QoS::AtMostOnce, true);
        let value = encode(&message, "n", now).unwrap();
        for cut in 0..value.len() - 1 {
            assert!(decode(&value.slice(..cut), now).is_err(), "cut at {cut}");
        }
        let mut other = value.to_vec();
        other[0] = 9;
        assert_eq!(
            decode(&Bytes::from(other), now),
            Err(ValueError::Version(9))
        );
    }

    #[test]
    fn keys_are_valid_kv_keys_of_fixed_length() {
        for topic in ["a", "a b/c", &"x".repeat(65_535)] {
            let k = key(topic);
            assert_eq!(k.len(), 43);
            assert!(
                k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            );
        }
        assert!(stamp(2) > stamp(1) && stamp(1) > (1 << 16) | 3);
    }
}
