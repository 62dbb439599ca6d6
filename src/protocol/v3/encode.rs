//! Encoding what a server sends (CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL,
//! PUBCOMP, SUBACK, UNSUBACK, PINGRESP), always in the minimal form.

use bytes::{BufMut, BytesMut};

use super::*;

/// Number of bytes the Remaining Length field takes for `len` (1 to 4).
///
/// Values above [`MAX_REMAINING_LENGTH`] cannot be encoded; they also return 4 and
/// [`encode_remaining_length`] refuses them.
pub fn remaining_length_len(len: usize) -> usize {
    match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Appends `len` as a Remaining Length (§2.2.3), in its minimal form.
///
/// # Errors
///
/// [`EncodeError::RemainingLengthTooLarge`] above [`MAX_REMAINING_LENGTH`];
/// nothing is written then.
pub fn encode_remaining_length(len: usize, out: &mut BytesMut) -> Result<(), EncodeError> {
    if len > MAX_REMAINING_LENGTH {
        return Err(EncodeError::RemainingLengthTooLarge(len));
    }
    let mut value = len;
    loop {
        // The mask makes the narrowing exact.
        let mut byte = (value & 0x7F) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            return Ok(());
        }
    }
}

/// The 4 bytes of a packet that is a fixed header and a packet id (PUBACK,
/// PUBREC, PUBREL, PUBCOMP, UNSUBACK).
fn packet_id_packet(first: u8, packet_id: PacketId) -> [u8; 4] {
    let [high, low] = packet_id.to_be_bytes();
    [first, 2, high, low]
}

/// A CONNACK (§3.2) as its 4 bytes.
///
/// Session Present is only sent with return code [`CONNACK_ACCEPTED`]: a refusal
/// must carry 0 (MQTT-3.2.2-4), so it is cleared for any other code.
pub fn connack(session_present: bool, return_code: u8) -> [u8; 4] {
    let session_present = session_present && return_code == CONNACK_ACCEPTED;
    [CONNACK << 4, 2, u8::from(session_present), return_code]
}

/// A PUBACK (§3.4): QoS 1 acknowledgement of the client's PUBLISH.
pub fn puback(packet_id: PacketId) -> [u8; 4] {
    packet_id_packet(PUBACK << 4, packet_id)
}

/// A PUBREC (§3.5): QoS 2 step 1, we received the client's PUBLISH.
pub fn pubrec(packet_id: PacketId) -> [u8; 4] {
    packet_id_packet(PUBREC << 4, packet_id)
}

/// A PUBREL (§3.6): QoS 2 step 2 for a PUBLISH we sent (flags 0b0010).
pub fn pubrel(packet_id: PacketId) -> [u8; 4] {
    packet_id_packet(PUBREL << 4 | FLAGS_0010, packet_id)
}

/// A PUBCOMP (§3.7): QoS 2 step 3, the client's PUBLISH is complete.
pub fn pubcomp(packet_id: PacketId) -> [u8; 4] {
    packet_id_packet(PUBCOMP << 4, packet_id)
}

/// An UNSUBACK (§3.11).
pub fn unsuback(packet_id: PacketId) -> [u8; 4] {
    packet_id_packet(UNSUBACK << 4, packet_id)
}

/// A PINGRESP (§3.13).
pub const PINGRESP_BYTES: [u8; 2] = [PINGRESP << 4, 0];

/// Appends a CONNACK (§3.2); see [`connack`].
#[cfg(test)]
pub fn encode_connack(session_present: bool, return_code: u8, out: &mut BytesMut) {
    out.extend_from_slice(&connack(session_present, return_code));
}

/// Appends a PUBACK (§3.4).
#[cfg(test)]
pub fn encode_puback(packet_id: PacketId, out: &mut BytesMut) {
    out.extend_from_slice(&puback(packet_id));
}

/// Appends a PUBREC (§3.5).
#[cfg(test)]
pub fn encode_pubrec(packet_id: PacketId, out: &mut BytesMut) {
    out.extend_from_slice(&pubrec(packet_id));
}

/// Appends a PUBREL (§3.6).
#[cfg(test)]
pub fn encode_pubrel(packet_id: PacketId, out: &mut BytesMut) {
    out.extend_from_slice(&pubrel(packet_id));
}

/// Appends a PUBCOMP (§3.7).
#[cfg(test)]
pub fn encode_pubcomp(packet_id: PacketId, out: &mut BytesMut) {
    out.extend_from_slice(&pubcomp(packet_id));
}

/// Appends a SUBACK (§3.9) with one return code per filter of the SUBSCRIBE, in
/// order: the granted QoS (0, 1, 2) or [`SUBACK_FAILURE`].
///
/// # Errors
///
/// [`EncodeError::RemainingLengthTooLarge`] for an impossible number of codes;
/// nothing is written then.
pub fn encode_suback(
    packet_id: PacketId,
    return_codes: &[u8],
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let remaining_length = 2usize.saturating_add(return_codes.len());
    if remaining_length > MAX_REMAINING_LENGTH {
        return Err(EncodeError::RemainingLengthTooLarge(remaining_length));
    }
    out.reserve(1 + remaining_length_len(remaining_length) + remaining_length);
    out.put_u8(SUBACK << 4);
    encode_remaining_length(remaining_length, out)?;
    out.put_u16(packet_id);
    out.put_slice(return_codes);
    Ok(())
}

/// Appends an UNSUBACK (§3.11).
#[cfg(test)]
pub fn encode_unsuback(packet_id: PacketId, out: &mut BytesMut) {
    out.extend_from_slice(&unsuback(packet_id));
}

/// Appends a PINGRESP (§3.13); the broker queues [`PINGRESP_BYTES`] itself.
#[cfg(test)]
pub fn encode_pingresp(out: &mut BytesMut) {
    out.extend_from_slice(&PINGRESP_BYTES);
}

/// Remaining Length of a PUBLISH: topic with its length prefix, the Packet
/// Identifier for QoS 1 and 2, and the payload. Saturates instead of overflowing.
pub fn publish_remaining_length(topic_len: usize, qos: QoS, payload_len: usize) -> usize {
    let packet_id_len = if qos == QoS::AtMostOnce { 0 } else { 2 };
    2usize
        .saturating_add(topic_len)
        .saturating_add(packet_id_len)
        .saturating_add(payload_len)
}

/// Checks a PUBLISH's sizes and returns `(topic length prefix, remaining length)`.
fn publish_sizes(topic: &str, qos: QoS, payload_len: usize) -> Result<(u16, usize), EncodeError> {
    let topic_len =
        u16::try_from(topic.len()).map_err(|_| EncodeError::StringTooLong(topic.len()))?;
    let remaining_length = publish_remaining_length(topic.len(), qos, payload_len);
    if remaining_length > MAX_REMAINING_LENGTH {
        return Err(EncodeError::RemainingLengthTooLarge(remaining_length));
    }
    Ok((topic_len, remaining_length))
}

/// Writes a PUBLISH fixed header and topic whose sizes were checked.
fn put_publish_head(
    topic: &str,
    topic_len: u16,
    remaining_length: usize,
    flags: (QoS, bool, bool),
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let (qos, retain, dup) = flags;
    // DUP must be 0 for QoS 0 (MQTT-3.3.1-2): never write it there.
    let dup = dup && qos != QoS::AtMostOnce;
    let mut first = PUBLISH << 4 | (qos as u8) << PUBLISH_QOS_SHIFT;
    if dup {
        first |= PUBLISH_DUP;
    }
    if retain {
        first |= PUBLISH_RETAIN;
    }
    out.put_u8(first);
    encode_remaining_length(remaining_length, out)?;
    out.put_u16(topic_len);
    out.put_slice(topic.as_bytes());
    Ok(())
}

/// Appends a whole PUBLISH (§3.3). `packet_id` is written for QoS 1 and 2 and
/// ignored for QoS 0; `dup` is ignored for QoS 0 (MQTT-3.3.1-2).
///
/// # Errors
///
/// [`EncodeError::StringTooLong`] for a topic over 65,535 bytes,
/// [`EncodeError::RemainingLengthTooLarge`] for a packet too large for MQTT;
/// nothing is written then.
pub fn encode_publish(
    topic: &str,
    qos: QoS,
    retain: bool,
    dup: bool,
    packet_id: PacketId,
    payload: &[u8],
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let (topic_len, remaining_length) = publish_sizes(topic, qos, payload.len())?;
    out.reserve(1 + remaining_length_len(remaining_length) + remaining_length);
    put_publish_head(topic, topic_len, remaining_length, (qos, retain, dup), out)?;
    if qos != QoS::AtMostOnce {
        out.put_u16(packet_id);
    }
    out.put_slice(payload);
    Ok(())
}

/// Appends the head of a PUBLISH whose payload (of `payload_len` bytes) is sent
/// separately: the fixed header, whose Remaining Length counts the Packet
/// Identifier for QoS 1 and 2, and the topic.
///
/// This is the QoS 1/2 fan-out form: the head is encoded once and shared; each
/// subscriber's frame is `head`, then its own two-byte Packet Identifier
/// (big-endian, only for QoS 1 and 2), then the shared payload. For QoS 0 the frame
/// is `head` then payload. `dup` is ignored for QoS 0.
///
/// # Errors
///
/// As [`encode_publish`]; nothing is written then.
pub fn encode_publish_head(
    topic: &str,
    qos: QoS,
    retain: bool,
    dup: bool,
    payload_len: usize,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let (topic_len, remaining_length) = publish_sizes(topic, qos, payload_len)?;
    out.reserve(MAX_FIXED_HEADER_LEN + 2 + topic.len());
    put_publish_head(topic, topic_len, remaining_length, (qos, retain, dup), out)
}
