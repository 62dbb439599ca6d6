//! The load generator's own minimal MQTT 3.1.1 and MQTT 5.0 client codec.
//!
//! Two halves with different costs:
//!
//! - **Per connection** (CONNECT, SUBSCRIBE): encoded with `mqttbytes`, which
//!   is correct and convenient; it runs once per connection, so its `String`
//!   allocations do not matter.
//! - **Per delivery** (every incoming frame): [`parse`] is hand-written and
//!   allocation-free. It borrows the frame out of the read buffer and hands a
//!   PUBLISH's topic and payload out as slices. `mqttbytes::v4::read` would
//!   allocate a `String` per topic and a `Bytes` per payload on every delivery,
//!   which is exactly the per-delivery cost the load generator must not have
//!   (it has to stay far cheaper than the broker it measures). The unit tests
//!   check [`parse`] against frames encoded by `mqttbytes`.
//!
//! Outgoing acks (PUBACK, PUBREC, PUBREL, PUBCOMP) and PINGREQ are fixed
//! 2- or 4-byte frames, written by hand.
//!
//! MQTT 5.0 (`--protocol 5`): `mqttbytes::v5` cannot set a CONNECT's
//! properties from outside the crate, so the few packets the bench sends
//! are framed by hand here ([`encode_connect_v5`], [`encode_subscribe_v5`],
//! and [`encode_publish_header`] with `v5`), each checked against
//! `mqttbytes::v5`'s decoder in the tests. What 5.0 adds to the packets the
//! bench reads is a properties block (a Variable Byte Integer length, then
//! the properties) in CONNACK, SUBACK and PUBLISH; [`parse`] with `v5` skips
//! it and reports a PUBLISH's Topic Alias. The 4-byte acks are valid 5.0
//! acks (reason Success, no properties: §3.4.2.1).

use bytes::BytesMut;
use mqttbytes::QoS;
use mqttbytes::v4::{Connect, Subscribe};

/// Which MQTT version the bench's clients speak (`--protocol`,
/// `--publisher-protocol`).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4).
    #[default]
    #[value(name = "4")]
    #[serde(rename = "4")]
    V311,
    /// MQTT 5.0.
    #[value(name = "5")]
    #[serde(rename = "5")]
    V5,
    /// Subscribers only: every other one (odd global index) MQTT 5.0, the
    /// rest 3.1.1.
    #[value(name = "mixed")]
    #[serde(rename = "mixed")]
    Mixed,
}

impl Protocol {
    /// Whether client number `index` speaks MQTT 5.0.
    pub fn v5_for(self, index: u64) -> bool {
        match self {
            Protocol::V311 => false,
            Protocol::V5 => true,
            Protocol::Mixed => index % 2 == 1,
        }
    }
}

/// Largest frame the bench accepts from a broker. Its own publishes are small
/// (`--payload` plus a short topic); anything bigger is a protocol error here.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// PINGREQ, sent when a connection has been quiet for half its keep-alive.
pub const PINGREQ: [u8; 2] = [0xC0, 0x00];

/// DISCONNECT, sent before a clean close.
pub const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// MQTT control packet types (first nibble of the fixed header).
pub mod kind {
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBACK: u8 = 9;
    pub const PINGRESP: u8 = 13;
}

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MqttError {
    #[error("malformed remaining length")]
    RemainingLength,
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("malformed {0} packet")]
    Malformed(&'static str),
    #[error("encoding failed: {0}")]
    Encode(String),
}

/// One decoded incoming frame, borrowing from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// CONNACK with its return code (0 = accepted).
    ConnAck { code: u8 },
    /// SUBACK with one return code per filter (0x80 = failure).
    SubAck { pkid: u16, codes: &'a [u8] },
    /// PUBLISH: `pkid` is 0 for QoS 0; `topic` is empty when an MQTT 5.0
    /// broker sent only the Topic Alias `alias`.
    Publish {
        qos: u8,
        dup: bool,
        pkid: u16,
        topic: &'a [u8],
        payload: &'a [u8],
        /// MQTT 5.0 Topic Alias property, if the PUBLISH has one.
        alias: Option<u16>,
    },
    /// PUBACK, PUBREC, PUBREL, PUBCOMP: the packet type and its packet id.
    Ack { kind: u8, pkid: u16 },
    /// PINGRESP.
    PingResp,
    /// Anything else a broker should not send a client; ignored by callers.
    Other { kind: u8 },
}

/// A Variable Byte Integer (remaining length, property length) at the
/// front of `buf`: `Ok(None)` when incomplete, else the value and its size.
fn read_varint(buf: &[u8]) -> Result<Option<(usize, usize)>, MqttError> {
    let mut value: usize = 0;
    let mut shift = 0;
    let mut pos = 0;
    loop {
        let Some(&b) = buf.get(pos) else {
            return Ok(None);
        };
        value |= usize::from(b & 0x7F) << shift;
        pos += 1;
        if b & 0x80 == 0 {
            return Ok(Some((value, pos)));
        }
        shift += 7;
        if shift > 21 {
            return Err(MqttError::RemainingLength);
        }
    }
}

/// Skips an MQTT 5.0 properties block at `body[at..]`; returns where it ends
/// and the Topic Alias among the properties, if any.
fn skip_properties(
    body: &[u8],
    at: usize,
    packet: &'static str,
) -> Result<(usize, Option<u16>), MqttError> {
    let rest = body.get(at..).ok_or(MqttError::Malformed(packet))?;
    let (len, len_size) = read_varint(rest)?.ok_or(MqttError::Malformed(packet))?;
    let start = at + len_size;
    let props = body
        .get(start..start + len)
        .ok_or(MqttError::Malformed(packet))?;
    let mut alias = None;
    let mut i = 0;
    // A broker's PUBLISH properties (§3.3.2.3); any other id is an error.
    while let Some(&id) = props.get(i) {
        i += 1;
        let two = |i: usize| -> Option<usize> {
            Some(usize::from(u16::from_be_bytes([
                *props.get(i)?,
                *props.get(i + 1)?,
            ])))
        };
        let size = match id {
            0x01 => 1, // Payload Format Indicator
            0x02 => 4, // Message Expiry Interval
            0x23 => {
                alias = two(i).map(|a| a as u16);
                2
            }
            0x03 | 0x08 | 0x09 | 0x1F => 2 + two(i).ok_or(MqttError::Malformed(packet))?,
            0x26 => {
                let k = 2 + two(i).ok_or(MqttError::Malformed(packet))?;
                k + 2 + two(i + k).ok_or(MqttError::Malformed(packet))?
            }
            0x0B => {
                read_varint(&props[i..])?
                    .ok_or(MqttError::Malformed(packet))?
                    .1
            }
            _ => return Err(MqttError::Malformed(packet)),
        };
        i += size;
    }
    if i != props.len() {
        return Err(MqttError::Malformed(packet));
    }
    Ok((start + len, alias))
}

/// Decodes one MQTT 3.1.1 frame from the front of `buf` ([`parse_as`]).
///
/// # Errors
/// As [`parse_as`].
#[cfg(test)]
pub fn parse(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, MqttError> {
    parse_as(buf, false)
}

/// Decodes one frame from the front of `buf`, of MQTT 5.0 when `v5` (a
/// properties block after the variable header), else of MQTT 3.1.1.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame (not an error:
/// read more), or the frame and how many bytes it took.
///
/// # Errors
/// A malformed length, an oversized frame, or a body too short for its type.
pub fn parse_as(buf: &[u8], v5: bool) -> Result<Option<(Frame<'_>, usize)>, MqttError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    // Remaining length: 1 to 4 bytes, 7 bits each.
    let Some((len, len_size)) = read_varint(&buf[1..])? else {
        return Ok(None);
    };
    let pos = 1 + len_size;
    if len > MAX_FRAME {
        return Err(MqttError::TooLarge(len));
    }
    let total = pos + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[pos..total];
    let packet_kind = byte1 >> 4;
    let u16_at =
        |i: usize| -> Option<u16> { Some(u16::from_be_bytes([*body.get(i)?, *body.get(i + 1)?])) };
    let frame = match packet_kind {
        kind::CONNACK => {
            let code = *body.get(1).ok_or(MqttError::Malformed("CONNACK"))?;
            Frame::ConnAck { code }
        }
        kind::SUBACK => {
            let pkid = u16_at(0).ok_or(MqttError::Malformed("SUBACK"))?;
            let at = if v5 {
                skip_properties(body, 2, "SUBACK")?.0
            } else {
                2
            };
            Frame::SubAck {
                pkid,
                codes: &body[at..],
            }
        }
        kind::PUBLISH => {
            let qos = (byte1 >> 1) & 0x03;
            let topic_len = usize::from(u16_at(0).ok_or(MqttError::Malformed("PUBLISH"))?);
            let topic = body
                .get(2..2 + topic_len)
                .ok_or(MqttError::Malformed("PUBLISH"))?;
            let mut at = 2 + topic_len;
            let mut pkid = 0;
            if qos > 0 {
                pkid = u16_at(at).ok_or(MqttError::Malformed("PUBLISH"))?;
                at += 2;
            }
            let mut alias = None;
            if v5 {
                (at, alias) = skip_properties(body, at, "PUBLISH")?;
                if topic.is_empty() && alias.is_none() {
                    return Err(MqttError::Malformed("PUBLISH"));
                }
            }
            Frame::Publish {
                qos,
                dup: byte1 & 0x08 != 0,
                pkid,
                topic,
                payload: &body[at..],
                alias,
            }
        }
        kind::PUBACK | kind::PUBREC | kind::PUBREL | kind::PUBCOMP => {
            let pkid = u16_at(0).ok_or(MqttError::Malformed("ack"))?;
            Frame::Ack {
                kind: packet_kind,
                pkid,
            }
        }
        kind::PINGRESP => Frame::PingResp,
        other => Frame::Other { kind: other },
    };
    Ok(Some((frame, total)))
}

/// Converts a numeric QoS (0, 1, 2) for `mqttbytes`.
fn qos_of(qos: u8) -> QoS {
    match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Appends a CONNECT to `out`.
///
/// # Errors
/// Only if `mqttbytes` refuses the packet (e.g. an oversized client id).
pub fn encode_connect(
    client_id: &str,
    keep_alive_s: u16,
    clean_session: bool,
    out: &mut Vec<u8>,
) -> Result<(), MqttError> {
    let mut connect = Connect::new(client_id);
    connect.keep_alive = keep_alive_s;
    connect.clean_session = clean_session;
    let mut buf = BytesMut::new();
    connect
        .write(&mut buf)
        .map_err(|e| MqttError::Encode(e.to_string()))?;
    out.extend_from_slice(&buf);
    Ok(())
}

/// Appends an MQTT 5.0 CONNECT to `out`: Clean Start as `clean_start`, no
/// will or credentials, and Topic Alias Maximum `topic_alias_max` when not
/// 0 (§3.1.2.11.8: the aliases the broker may use towards this client).
///
/// # Errors
/// A client id over 65,535 bytes.
pub fn encode_connect_v5(
    client_id: &str,
    keep_alive_s: u16,
    clean_start: bool,
    topic_alias_max: u16,
    out: &mut Vec<u8>,
) -> Result<(), MqttError> {
    let id_len = u16::try_from(client_id.len())
        .map_err(|_| MqttError::Encode("client id over 65535 bytes".into()))?;
    let mut properties = Vec::new();
    if topic_alias_max > 0 {
        properties.push(0x22);
        properties.extend_from_slice(&topic_alias_max.to_be_bytes());
    }
    let mut body = Vec::with_capacity(16 + properties.len() + client_id.len());
    body.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 5]);
    body.push(if clean_start { 0x02 } else { 0 });
    body.extend_from_slice(&keep_alive_s.to_be_bytes());
    write_remaining_length(properties.len(), &mut body);
    body.extend_from_slice(&properties);
    body.extend_from_slice(&id_len.to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    out.push(0x10);
    write_remaining_length(body.len(), out);
    out.extend_from_slice(&body);
    Ok(())
}

/// Appends an MQTT 5.0 SUBSCRIBE for one filter to `out`, without
/// properties, with subscription options = `qos` (§3.8.3.1).
///
/// # Errors
/// A filter over 65,535 bytes.
pub fn encode_subscribe_v5(
    pkid: u16,
    filter: &str,
    qos: u8,
    out: &mut Vec<u8>,
) -> Result<(), MqttError> {
    let filter_len = u16::try_from(filter.len())
        .map_err(|_| MqttError::Encode("filter over 65535 bytes".into()))?;
    let remaining = 2 + 1 + 2 + filter.len() + 1;
    out.push(0x82);
    write_remaining_length(remaining, out);
    out.extend_from_slice(&pkid.to_be_bytes());
    out.push(0); // no properties
    out.extend_from_slice(&filter_len.to_be_bytes());
    out.extend_from_slice(filter.as_bytes());
    out.push(qos & 0x03);
    Ok(())
}

/// Appends a SUBSCRIBE for one filter to `out`.
///
/// # Errors
/// Only if `mqttbytes` refuses the packet.
pub fn encode_subscribe(
    pkid: u16,
    filter: &str,
    qos: u8,
    out: &mut Vec<u8>,
) -> Result<(), MqttError> {
    let mut sub = Subscribe::new(filter, qos_of(qos));
    sub.pkid = pkid;
    let mut buf = BytesMut::new();
    sub.write(&mut buf)
        .map_err(|e| MqttError::Encode(e.to_string()))?;
    out.extend_from_slice(&buf);
    Ok(())
}

/// Appends a PUBLISH's fixed header, topic and packet id to `out` (and, for
/// MQTT 5.0, an empty properties block); the caller appends exactly
/// `payload_len` payload bytes next. Split this way so the publisher can
/// stamp the payload in place without a copy.
pub fn encode_publish_header(
    topic: &str,
    qos: u8,
    pkid: u16,
    payload_len: usize,
    v5: bool,
    out: &mut Vec<u8>,
) {
    let id_len = if qos > 0 { 2 } else { 0 };
    let remaining = 2 + topic.len() + id_len + usize::from(v5) + payload_len;
    out.push(0x30 | (qos << 1));
    write_remaining_length(remaining, out);
    // Topics come from the command line and are short; `as u16` is checked
    // by the CLI (MQTT topics are at most 65535 bytes).
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    if v5 {
        out.push(0); // Property Length 0
    }
}

/// Appends a 4-byte ack (PUBACK, PUBREC, PUBREL or PUBCOMP) to `out`.
pub fn encode_ack(packet_kind: u8, pkid: u16, out: &mut Vec<u8>) {
    // PUBREL has reserved flags 0b0010 (MQTT 3.1.1 §3.6.1).
    let flags = if packet_kind == kind::PUBREL { 0x02 } else { 0 };
    out.push((packet_kind << 4) | flags);
    out.push(2);
    out.extend_from_slice(&pkid.to_be_bytes());
}

/// Does topic filter `filter` match topic name `topic` (MQTT 3.1.1 §4.7)?
/// Used to check that every subscriber will receive every message, which
/// the loss count relies on. (`$`-topics are not special here.)
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// MQTT variable-length "remaining length".
fn write_remaining_length(mut len: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqttbytes::v4::{ConnAck, ConnectReturnCode, PubAck, Publish, SubAck, SubscribeReasonCode};

    #[test]
    fn parses_publish_encoded_by_mqttbytes() {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let mut p = Publish::new("a/b", qos, vec![7u8; 300]);
            if qos != QoS::AtMostOnce {
                p.pkid = 42;
            }
            let mut buf = BytesMut::new();
            p.write(&mut buf).unwrap();
            let (frame, used) = parse(&buf).unwrap().unwrap();
            assert_eq!(used, buf.len());
            match frame {
                Frame::Publish {
                    qos: q,
                    pkid,
                    topic,
                    payload,
                    ..
                } => {
                    assert_eq!(q, qos as u8);
                    assert_eq!(pkid, if q == 0 { 0 } else { 42 });
                    assert_eq!(topic, b"a/b");
                    assert_eq!(payload, &[7u8; 300][..]);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn own_publish_header_decodes_with_mqttbytes() {
        for qos in 0..=2u8 {
            let payload = vec![1u8; 200];
            let mut out = Vec::new();
            encode_publish_header("bench/x", qos, 9, payload.len(), false, &mut out);
            out.extend_from_slice(&payload);
            let mut buf = BytesMut::from(&out[..]);
            match mqttbytes::v4::read(&mut buf, MAX_FRAME).unwrap() {
                mqttbytes::v4::Packet::Publish(p) => {
                    assert_eq!(p.topic, "bench/x");
                    assert_eq!(p.qos as u8, qos);
                    assert_eq!(p.payload.len(), 200);
                    if qos > 0 {
                        assert_eq!(p.pkid, 9);
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn partial_frames_are_incomplete_not_errors() {
        let mut buf = BytesMut::new();
        Publish::new("t", QoS::AtMostOnce, vec![0u8; 1000])
            .write(&mut buf)
            .unwrap();
        for cut in 0..buf.len() {
            assert_eq!(parse(&buf[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn parses_acks_connack_suback() {
        let mut buf = BytesMut::new();
        ConnAck::new(ConnectReturnCode::Success, false)
            .write(&mut buf)
            .unwrap();
        SubAck::new(5, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)])
            .write(&mut buf)
            .unwrap();
        PubAck::new(77).write(&mut buf).unwrap();
        let mut rest = &buf[..];
        let mut frames = Vec::new();
        while let Some((f, used)) = parse(rest).unwrap() {
            frames.push(format!("{f:?}"));
            rest = &rest[used..];
        }
        assert_eq!(
            frames,
            vec![
                "ConnAck { code: 0 }",
                "SubAck { pkid: 5, codes: [1] }",
                "Ack { kind: 4, pkid: 77 }"
            ]
        );
    }

    #[test]
    fn rejects_bad_length_and_truncated_bodies() {
        assert_eq!(
            parse(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
            Err(MqttError::RemainingLength)
        );
        // PUBLISH whose topic length points past the body.
        assert_eq!(
            parse(&[0x30, 0x03, 0x00, 0x09, b'a']),
            Err(MqttError::Malformed("PUBLISH"))
        );
        assert_eq!(parse(&[0x40, 0x01, 0x00]), Err(MqttError::Malformed("ack")));
    }

    #[test]
    fn connect_subscribe_and_ack_encoding() {
        let mut out = Vec::new();
        encode_connect("c1", 30, true, &mut out).unwrap();
        encode_subscribe(1, "a/+", 1, &mut out).unwrap();
        encode_ack(kind::PUBREL, 3, &mut out);
        let mut buf = BytesMut::from(&out[..]);
        assert!(matches!(
            mqttbytes::v4::read(&mut buf, MAX_FRAME),
            Ok(mqttbytes::v4::Packet::Connect(c)) if c.client_id == "c1" && c.keep_alive == 30
        ));
        assert!(matches!(
            mqttbytes::v4::read(&mut buf, MAX_FRAME),
            Ok(mqttbytes::v4::Packet::Subscribe(s)) if s.pkid == 1 && s.filters[0].path == "a/+"
        ));
        assert!(matches!(
            mqttbytes::v4::read(&mut buf, MAX_FRAME),
            Ok(mqttbytes::v4::Packet::PubRel(r)) if r.pkid == 3
        ));
    }

    #[test]
    fn v5_packets_decode_with_mqttbytes_v5() {
        let mut out = Vec::new();
        encode_connect_v5("c5", 30, true, 12, &mut out).unwrap();
        encode_subscribe_v5(3, "a/#", 1, &mut out).unwrap();
        encode_publish_header("a/b", 1, 9, 20, true, &mut out);
        out.extend_from_slice(&[5u8; 20]);
        let mut buf = BytesMut::from(&out[..]);
        match mqttbytes::v5::read(&mut buf, MAX_FRAME).unwrap() {
            mqttbytes::v5::Packet::Connect(c) => {
                assert_eq!((c.client_id.as_str(), c.keep_alive), ("c5", 30));
                assert!(c.clean_session);
                assert_eq!(c.properties.unwrap().topic_alias_max, Some(12));
            }
            other => panic!("unexpected {other:?}"),
        }
        match mqttbytes::v5::read(&mut buf, MAX_FRAME).unwrap() {
            mqttbytes::v5::Packet::Subscribe(s) => {
                assert_eq!(s.pkid, 3);
                assert_eq!(s.filters[0].path, "a/#");
                assert_eq!(s.filters[0].qos, QoS::AtLeastOnce);
            }
            other => panic!("unexpected {other:?}"),
        }
        match mqttbytes::v5::read(&mut buf, MAX_FRAME).unwrap() {
            mqttbytes::v5::Packet::Publish(p) => {
                assert_eq!((p.topic.as_str(), p.pkid), ("a/b", 9));
                assert_eq!(p.payload.len(), 20);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn v5_publish_properties_are_skipped_and_the_alias_reported() {
        // QoS 1, empty topic, packet id 7, properties: Topic Alias 2, a User
        // Property ("k", "v"), Message Expiry 60; payload "xy".
        let props = [0x23, 0, 2, 0x26, 0, 1, b'k', 0, 1, b'v', 0x02, 0, 0, 0, 60];
        let mut body = vec![0, 0, 0, 7, props.len() as u8];
        body.extend_from_slice(&props);
        body.extend_from_slice(b"xy");
        let mut frame = vec![0x32, body.len() as u8];
        frame.extend_from_slice(&body);
        let (f, used) = parse_as(&frame, true).unwrap().unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(
            f,
            Frame::Publish {
                qos: 1,
                dup: false,
                pkid: 7,
                topic: b"",
                payload: b"xy",
                alias: Some(2),
            }
        );
        // An empty topic without an alias is an error.
        let frame = [0x30, 4, 0, 0, 0, b'x'];
        assert_eq!(parse_as(&frame, true), Err(MqttError::Malformed("PUBLISH")));
        // A 5.0 SUBACK: the reason codes come after the properties.
        let suback = [0x90, 4, 0, 1, 0, 1];
        assert_eq!(
            parse_as(&suback, true).unwrap().unwrap().0,
            Frame::SubAck {
                pkid: 1,
                codes: &[1]
            }
        );
    }

    #[test]
    fn filters_match_topics() {
        assert!(topic_matches("a/b", "a/b"));
        assert!(topic_matches("a/+", "a/b"));
        assert!(topic_matches("#", "a/b"));
        assert!(topic_matches("a/#", "a"));
        assert!(topic_matches("+/+", "a/b"));
        assert!(!topic_matches("a/+", "a/b/c"));
        assert!(!topic_matches("a/b", "a"));
        assert!(!topic_matches("+", "a/b"));
    }

    #[test]
    fn remaining_length_boundaries() {
        for len in [0usize, 127, 128, 16383, 16384, 2_097_151, 2_097_152] {
            let mut out = Vec::new();
            write_remaining_length(len, &mut out);
            let mut frame = vec![0xD0];
            frame.extend_from_slice(&out);
            frame.resize(frame.len() + len, 0);
            let (_, used) = parse(&frame).unwrap().unwrap();
            assert_eq!(used, frame.len());
        }
    }
}
