//! A [`Message`] as a NATS message and back (docs/design/cluster.md §5).
//!
//! The common case, QoS 0 without RETAIN or properties, has no header block
//! at all (a plain `PUB`). Otherwise these headers, each only when needed:
//!
//! | Header | Value | Meaning |
//! | --- | --- | --- |
//! | `Fanmq-Q` | `1` or `2` | QoS the publisher used; absent: 0 |
//! | `Fanmq-R` | `1` | the publisher's RETAIN flag (MQTT 5.0 Retain As Published); receivers never store the message: retained state comes from the KV bucket |
//! | `Fanmq-E` | decimal seconds | Message Expiry Interval left when sent |
//! | `Fanmq-P` | base64, standard alphabet, no padding | the MQTT 5.0 PUBLISH property block of the forwarded properties (Payload Format Indicator, Content Type, Response Topic, Correlation Data, User Properties) |
//! | `Fanmq-Topic` | base64url, no padding | the topic, on `<root>.x` only |
//! | `Fanmq-O` | `<incarnation, 16 hex>.<sequence, decimal>` | QoS 1/2 only: the message's origin, the publishing node's run and its count of what it published (cluster::tail) |
//!
//! Unknown headers are ignored: NATS applications may add their own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use bytestring::ByteString;

use crate::cluster::subject::{self, TopicSubject};
use crate::protocol::message::{Message, MessageProperties};
use crate::protocol::topic;
use crate::protocol::v3::QoS;
use crate::protocol::v5::Properties;

/// The publisher's QoS.
const QOS: &str = "Fanmq-Q";
/// The publisher's RETAIN flag.
const RETAIN: &str = "Fanmq-R";
/// Message Expiry Interval left, in seconds.
const EXPIRY: &str = "Fanmq-E";
/// The forwarded MQTT 5.0 properties.
const PROPERTIES: &str = "Fanmq-P";
/// The topic of an escaped message.
const TOPIC: &str = "Fanmq-Topic";
/// The origin of a QoS 1/2 message.
const ORIGIN: &str = "Fanmq-O";

/// Where a message comes from: the publishing node's incarnation (random
/// at each start) and the sequence number its bridge gave the message,
/// counting up in the order it publishes. NATS keeps one connection's
/// messages in order to each subscriber, so two nodes get each origin's
/// messages in the same order, which lets a session moving between them
/// take each once (cluster::tail).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    /// The publishing node's incarnation.
    pub node: u64,
    /// Its sequence number there.
    pub seq: u64,
}

impl Origin {
    /// The header's value: `<node, 16 hex>.<seq, decimal>` (also the form
    /// of the tail's `Fanmq-Tail-Cover` and `Fanmq-Tail-First`).
    pub fn to_header(self) -> String {
        format!("{:016x}.{}", self.node, self.seq)
    }

    /// Reads [`Origin::to_header`]'s value.
    pub fn of_header(value: &str) -> Option<Origin> {
        let (node, seq) = value.split_once('.')?;
        Some(Origin {
            node: u64::from_str_radix(node, 16).ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

/// The origin a NATS message's headers name, if any and valid.
pub fn origin(headers: Option<&HeaderMap>) -> Option<Origin> {
    Origin::of_header(headers?.get(ORIGIN)?.as_str())
}

/// A message ready for NATS.
#[derive(Debug)]
pub struct Outgoing {
    /// Where it goes.
    pub subject: String,
    /// Its headers; `None` for the plain case.
    pub headers: Option<HeaderMap>,
    /// The payload (the message's own `Bytes`, not copied).
    pub payload: Bytes,
}

/// Why a NATS message is no fanmq message.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The subject does not spell a topic.
    #[error(transparent)]
    Subject(#[from] subject::SubjectError),
    /// A header's value does not parse.
    #[error("header {0} has an invalid value")]
    Invalid(&'static str),
    /// An escaped message without its topic.
    #[error("message on the escaped subject without a valid {TOPIC} header")]
    NoTopic,
}

/// `message` as a NATS message under `root`, a QoS 1/2 one with its
/// `origin`; `None` when it must not leave the node (expired, or its
/// properties cannot be encoded).
pub fn encode(root: &str, message: &Message, now: Instant, origin: Origin) -> Option<Outgoing> {
    let target = subject::topic_subject(root, &message.topic);
    let mut headers = HeaderMap::new();
    match message.qos {
        QoS::AtMostOnce => {}
        QoS::AtLeastOnce => headers.insert(QOS, "1"),
        QoS::ExactlyOnce => headers.insert(QOS, "2"),
    }
    if message.qos != QoS::AtMostOnce {
        headers.insert(ORIGIN, origin.to_header().as_str());
    }
    if message.retain {
        headers.insert(RETAIN, "1");
    }
    if let Some(properties) = &message.properties {
        if let Some(at) = properties.expires_at {
            let left = at.checked_duration_since(now)?;
            // Rounded up, so a live message never says 0.
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            headers.insert(EXPIRY, secs.to_string().as_str());
        }
        if !properties.forwarded.is_empty() {
            let block = properties.forwarded.to_publish_block().ok()?;
            headers.insert(PROPERTIES, STANDARD_NO_PAD.encode(block).as_str());
        }
    }
    if let TopicSubject::Escaped(_) = target {
        headers.insert(
            TOPIC,
            URL_SAFE_NO_PAD.encode(message.topic.as_bytes()).as_str(),
        );
    }
    Some(Outgoing {
        subject: target.subject().to_string(),
        headers: (!headers.is_empty()).then_some(headers),
        payload: message.payload.clone(),
    })
}

/// The message a NATS message under `root` carries, received at `now`.
/// Its retain flag is the publisher's (for Retain As Published); the
/// caller never stores it as retained.
///
/// # Errors
/// A subject or header that does not follow the mapping.
pub fn decode(
    root: &str,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: Bytes,
    now: Instant,
) -> Result<Message, HeaderError> {
    let get = |name| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
    let topic = if subject == subject::escaped_subject(root) {
        let raw = get(TOPIC).ok_or(HeaderError::NoTopic)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(raw)
            .map_err(|_| HeaderError::NoTopic)?;
        let topic = String::from_utf8(bytes).map_err(|_| HeaderError::NoTopic)?;
        if topic::validate_topic_name(&topic).is_err() {
            return Err(HeaderError::NoTopic);
        }
        topic
    } else {
        subject::subject_topic(root, subject)?
    };
    let qos = match get(QOS) {
        None => QoS::AtMostOnce,
        Some("1") => QoS::AtLeastOnce,
        Some("2") => QoS::ExactlyOnce,
        Some(_) => return Err(HeaderError::Invalid(QOS)),
    };
    let retain = get(RETAIN) == Some("1");
    let expires_at = match get(EXPIRY) {
        None => None,
        Some(secs) => {
            let secs: u32 = secs.parse().map_err(|_| HeaderError::Invalid(EXPIRY))?;
            Some(now + Duration::from_secs(u64::from(secs)))
        }
    };
    let forwarded = match get(PROPERTIES) {
        None => Properties::new(),
        Some(text) => {
            let block = STANDARD_NO_PAD
                .decode(text)
                .map_err(|_| HeaderError::Invalid(PROPERTIES))?;
            let properties = Properties::from_publish_block(&block)
                .map_err(|_| HeaderError::Invalid(PROPERTIES))?;
            // Only what a message forwards; never an alias or identifier.
            MessageProperties::of(&properties, now)
                .map(|p| p.forwarded.clone())
                .unwrap_or_default()
        }
    };
    let properties = (!forwarded.is_empty() || expires_at.is_some()).then(|| {
        Arc::new(MessageProperties {
            forwarded,
            expires_at,
        })
    });
    Ok(Message {
        topic: ByteString::from(topic),
        payload,
        qos,
        retain,
        retain_stamp: 0,
        properties,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::v5::Property;

    /// An origin for the tests.
    const ORIGIN_1: Origin = Origin {
        node: 0xfeed,
        seq: 42,
    };

    /// Encodes and decodes `message`.
    fn round_trip(message: &Message) -> (Outgoing, Message) {
        let now = Instant::now();
        let out = encode("fanmq", message, now, ORIGIN_1).expect("sendable");
        let back = decode(
            "fanmq",
            &out.subject,
            out.headers.as_ref(),
            out.payload.clone(),
            now,
        )
        .expect("decodes");
        (out, back)
    }

    #[test]
    fn plain_qos0_has_no_headers_and_comes_back_equal() {
        let m = Message::new(
            "a/b".into(),
            Bytes::from_static(b"hello"),
            QoS::AtMostOnce,
            false,
        );
        let (out, back) = round_trip(&m);
        assert!(out.headers.is_none(), "no origin either");
        assert_eq!(out.subject, "fanmq.t.a.b");
        assert_eq!(back, m);
    }

    #[test]
    fn qos_retain_properties_and_escaped_topics_survive() {
        let now = Instant::now();
        let forwarded = Properties::new()
            .with(Property::ContentType("text/plain".into()))
            .with(Property::UserProperty("k".into(), "v1".into()))
            .with(Property::UserProperty("k".into(), "v2".into()));
        let m = Message {
            topic: "a b/c".into(),
            payload: Bytes::from_static(b"x"),
            qos: QoS::ExactlyOnce,
            retain: true,
            retain_stamp: 0,
            properties: Some(Arc::new(MessageProperties {
                forwarded: forwarded.clone(),
                expires_at: Some(now + Duration::from_millis(1500)),
            })),
        };
        let (out, back) = round_trip(&m);
        assert_eq!(out.subject, "fanmq.x");
        let headers = out.headers.as_ref().expect("headers");
        assert_eq!(headers.get(QOS).map(|v| v.as_str()), Some("2"));
        assert_eq!(headers.get(EXPIRY).map(|v| v.as_str()), Some("2"));
        assert_eq!(
            headers.get(ORIGIN).map(|v| v.as_str()),
            Some("000000000000feed.42")
        );
        assert_eq!(origin(Some(headers)), Some(ORIGIN_1));
        assert_eq!(back.topic, m.topic);
        assert_eq!(back.qos, QoS::ExactlyOnce);
        assert!(back.retain);
        let props = back.properties.expect("properties");
        assert_eq!(props.forwarded, forwarded, "user properties in order");
        assert!(props.expires_at.is_some());
    }

    #[test]
    fn an_expired_message_is_not_sent() {
        let now = Instant::now();
        let m = Message {
            properties: Some(Arc::new(MessageProperties {
                forwarded: Properties::new(),
                expires_at: Some(now),
            })),
            ..Message::new("t".into(), Bytes::new(), QoS::AtMostOnce, false)
        };
        assert!(encode("fanmq", &m, now + Duration::from_millis(1), ORIGIN_1).is_none());
    }

    #[test]
    fn an_origin_that_does_not_parse_is_none() {
        for bad in ["", "12", "x.1", "1.x", "1.-1"] {
            let mut h = HeaderMap::new();
            h.insert(ORIGIN, bad);
            assert_eq!(origin(Some(&h)), None, "{bad:?}");
        }
        assert_eq!(origin(None), None);
    }

    #[test]
    fn bad_headers_are_refused() {
        let now = Instant::now();
        let mut h = HeaderMap::new();
        h.insert(QOS, "3");
        assert!(decode("fanmq", "fanmq.t.a", Some(&h), Bytes::new(), now).is_err());
        let mut h = HeaderMap::new();
        h.insert(PROPERTIES, "!!");
        assert!(decode("fanmq", "fanmq.t.a", Some(&h), Bytes::new(), now).is_err());
        assert!(decode("fanmq", "fanmq.x", None, Bytes::new(), now).is_err());
        let mut h = HeaderMap::new();
        h.insert(TOPIC, URL_SAFE_NO_PAD.encode("a/#").as_str());
        assert!(decode("fanmq", "fanmq.x", Some(&h), Bytes::new(), now).is_err());
    }
}
