//! Decoding what a client sends (CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL,
//! PUBCOMP, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT): framing, the fixed
//! header's checks, and each packet's variable header and payload.

use bytes::{Buf, BytesMut};
use bytestring::ByteString;

use super::*;

/// Decodes the packet at the front of `buf`.
///
/// Returns `Ok(None)` while the packet is incomplete (nothing is consumed: read
/// more and call again), and `Ok(Some(packet))` after consuming exactly that
/// packet's bytes. `max_packet_size` bounds the whole packet (fixed header plus
/// remaining length).
///
/// # Errors
///
/// Any [`DecodeError`]: the connection must be closed. Nothing is consumed. A
/// packet announcing more than `max_packet_size` fails as soon as its Remaining
/// Length is known, without waiting for its bytes.
pub fn decode(buf: &mut BytesMut, max_packet_size: usize) -> Result<Option<Packet>, DecodeError> {
    let Some(frame_len) = peek_frame_len(buf, max_packet_size)? else {
        return Ok(None);
    };
    let Some(frame) = buf.get(..frame_len) else {
        return Ok(None);
    };
    let packet = decode_frame(frame)?;
    buf.advance(frame_len);
    Ok(Some(packet))
}

/// The PUBACK at the front of `buf` in its one well-formed shape (`0x40`,
/// Remaining Length 2, the Packet Identifier): consumed, and its id
/// returned; None, with nothing consumed, for anything else (which
/// [`decode`] then handles, errors included). The same as [`decode`]
/// returning [`Packet::PubAck`] for those 4 bytes (a packet that small is
/// under any maximum packet size), without building a [`Packet`]: a QoS 1
/// subscriber sends one PUBACK per message, so at a large fan-out they are
/// most of what the broker decodes, and moving the large `Packet` value out
/// of [`decode`] was a sixth of the broker's instructions per delivery.
#[inline]
pub fn take_puback(buf: &mut BytesMut) -> Option<PacketId> {
    match **buf {
        [first, 2, high, low, ..] if first == PUBACK << 4 => {
            buf.advance(4);
            Some(u16::from_be_bytes([high, low]))
        }
        _ => None,
    }
}

/// Reads the fixed header at the front of `buf` and returns the length of the whole
/// packet, so that a connection can reserve exactly what it still has to read.
///
/// Returns `Ok(None)` when the fixed header itself is incomplete. The packet type
/// and the fixed header flags are checked as soon as the first byte is there.
///
/// # Errors
///
/// [`DecodeError::UnexpectedPacketType`], [`DecodeError::InvalidFixedHeaderFlags`],
/// [`DecodeError::InvalidPublishQoS`], [`DecodeError::DupWithQoS0`],
/// [`DecodeError::MalformedRemainingLength`], [`DecodeError::PacketTooLarge`].
pub fn peek_frame_len(buf: &[u8], max_packet_size: usize) -> Result<Option<usize>, DecodeError> {
    let Some((&first, rest)) = buf.split_first() else {
        return Ok(None);
    };
    check_fixed_header(first)?;
    let Some((remaining_length, length_bytes)) = decode_remaining_length(rest)? else {
        return Ok(None);
    };
    let size = 1 + length_bytes + remaining_length;
    if size > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: max_packet_size,
        });
    }
    Ok(Some(size))
}

/// Decodes a Remaining Length from the bytes that follow the first byte.
///
/// Returns `(value, bytes used)`, `None` when more bytes are needed. Non-minimal
/// encodings are accepted (see the module documentation).
///
/// # Errors
///
/// [`DecodeError::MalformedRemainingLength`] when the fourth byte still has its
/// continuation bit set.
pub fn decode_remaining_length(bytes: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut value = 0usize;
    for (index, &byte) in bytes.iter().take(MAX_REMAINING_LENGTH_BYTES).enumerate() {
        value |= usize::from(byte & 0x7F) << (7 * index);
        if byte & 0x80 == 0 {
            return Ok(Some((value, index + 1)));
        }
    }
    if bytes.len() >= MAX_REMAINING_LENGTH_BYTES {
        Err(DecodeError::MalformedRemainingLength)
    } else {
        Ok(None)
    }
}

/// Checks the first byte of a fixed header: a packet type a server may receive,
/// with the flags that type requires (§2.2.2).
pub(super) fn check_fixed_header(first: u8) -> Result<(), DecodeError> {
    let packet_type = first >> 4;
    let flags = first & 0x0F;
    let required = match packet_type {
        PUBLISH => return publish_flags(flags).map(|_| ()),
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => FLAGS_0010,
        CONNECT | PUBACK | PUBREC | PUBCOMP | PINGREQ | DISCONNECT => 0,
        _ => return Err(DecodeError::UnexpectedPacketType(packet_type)),
    };
    if flags == required {
        Ok(())
    } else {
        Err(DecodeError::InvalidFixedHeaderFlags { packet_type, flags })
    }
}

/// Splits PUBLISH fixed header flags into `(dup, qos, retain)` and checks them.
fn publish_flags(flags: u8) -> Result<(bool, QoS, bool), DecodeError> {
    let qos =
        QoS::from_u8((flags >> PUBLISH_QOS_SHIFT) & 0b11).ok_or(DecodeError::InvalidPublishQoS)?;
    let dup = flags & PUBLISH_DUP != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::DupWithQoS0);
    }
    Ok((dup, qos, flags & PUBLISH_RETAIN != 0))
}

/// Decodes one complete frame (fixed header included) whose header was checked.
fn decode_frame(frame: &[u8]) -> Result<Packet, DecodeError> {
    let Some((&first, rest)) = frame.split_first() else {
        return Err(DecodeError::Truncated);
    };
    let Some((_, length_bytes)) = decode_remaining_length(rest)? else {
        return Err(DecodeError::Truncated);
    };
    let body = rest.get(length_bytes..).ok_or(DecodeError::Truncated)?;
    let mut reader = Reader { rest: body };
    let packet = match first >> 4 {
        CONNECT => Packet::Connect(decode_connect(&mut reader)?),
        PUBLISH => Packet::Publish(decode_publish(first & 0x0F, &mut reader)?),
        PUBACK => Packet::PubAck(reader.u16()?),
        PUBREC => Packet::PubRec(reader.u16()?),
        PUBREL => Packet::PubRel(reader.u16()?),
        PUBCOMP => Packet::PubComp(reader.u16()?),
        SUBSCRIBE => Packet::Subscribe(decode_subscribe(&mut reader)?),
        UNSUBSCRIBE => Packet::Unsubscribe(decode_unsubscribe(&mut reader)?),
        PINGREQ => Packet::PingReq,
        DISCONNECT => Packet::Disconnect,
        other => return Err(DecodeError::UnexpectedPacketType(other)),
    };
    reader.finish()?;
    Ok(packet)
}

/// Decodes a CONNECT's variable header and payload (§3.1.2, §3.1.3).
fn decode_connect(reader: &mut Reader<'_>) -> Result<Connect, DecodeError> {
    let name = reader.binary()?;
    let level = reader.u8()?;
    let protocol = match name {
        PROTOCOL_NAME_V311 if level == PROTOCOL_LEVEL_V311 => ProtocolVersion::V311,
        PROTOCOL_NAME_V31 if level == PROTOCOL_LEVEL_V31 => ProtocolVersion::V31,
        PROTOCOL_NAME_V311 | PROTOCOL_NAME_V31 => {
            return Err(DecodeError::UnsupportedProtocolLevel(level));
        }
        _ => return Err(DecodeError::InvalidProtocolName),
    };

    let flags = reader.u8()?;
    // MQTT 3.1 says nothing about bit 0 and the password flag alone; be lenient
    // with old clients and strict with 3.1.1 ones.
    let strict = protocol == ProtocolVersion::V311;
    if strict && flags & CONNECT_RESERVED != 0 {
        return Err(DecodeError::ReservedConnectFlag);
    }
    let will_flag = flags & CONNECT_WILL != 0;
    let will_retain = flags & CONNECT_WILL_RETAIN != 0;
    let will_qos_bits = (flags >> CONNECT_WILL_QOS_SHIFT) & 0b11;
    if !will_flag && (will_qos_bits != 0 || will_retain) {
        return Err(DecodeError::InvalidWillFlags);
    }
    let will_qos = QoS::from_u8(will_qos_bits).ok_or(DecodeError::InvalidWillFlags)?;
    let username_flag = flags & CONNECT_USERNAME != 0;
    let password_flag = flags & CONNECT_PASSWORD != 0;
    if strict && password_flag && !username_flag {
        return Err(DecodeError::PasswordWithoutUsername);
    }

    let keep_alive = reader.u16()?;
    let client_id = ByteString::from(reader.utf8()?);
    let last_will = if will_flag {
        let topic = ByteString::from(reader.utf8()?);
        let message = Bytes::copy_from_slice(reader.binary()?);
        Some(LastWill {
            topic,
            message,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(ByteString::from(reader.utf8()?))
    } else {
        None
    };
    let password = if password_flag {
        Some(Bytes::copy_from_slice(reader.binary()?))
    } else {
        None
    };

    Ok(Connect {
        protocol,
        clean_session: flags & CONNECT_CLEAN_SESSION != 0,
        keep_alive,
        client_id,
        last_will,
        username,
        password,
    })
}

/// Decodes a PUBLISH's variable header and payload (§3.3.2, §3.3.3).
fn decode_publish(flags: u8, reader: &mut Reader<'_>) -> Result<Publish, DecodeError> {
    let (dup, qos, retain) = publish_flags(flags)?;
    let topic = ByteString::from(reader.utf8()?);
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        reader.non_zero_packet_id()?
    };
    let payload = Bytes::copy_from_slice(reader.take_rest());
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        payload,
    })
}

/// Decodes a SUBSCRIBE's variable header and payload (§3.8.2, §3.8.3).
fn decode_subscribe(reader: &mut Reader<'_>) -> Result<Subscribe, DecodeError> {
    let packet_id = reader.non_zero_packet_id()?;
    let mut filters = Vec::new();
    while !reader.is_empty() {
        let filter = ByteString::from(reader.utf8()?);
        let requested = reader.u8()?;
        let qos = QoS::from_u8(requested).ok_or(DecodeError::InvalidRequestedQoS(requested))?;
        filters.push((filter, qos));
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters);
    }
    Ok(Subscribe { packet_id, filters })
}

/// Decodes an UNSUBSCRIBE's variable header and payload (§3.10.2, §3.10.3).
fn decode_unsubscribe(reader: &mut Reader<'_>) -> Result<Unsubscribe, DecodeError> {
    let packet_id = reader.non_zero_packet_id()?;
    let mut filters = Vec::new();
    while !reader.is_empty() {
        filters.push(ByteString::from(reader.utf8()?));
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters);
    }
    Ok(Unsubscribe { packet_id, filters })
}

/// A cursor over a packet's body that never reads past it: every read is checked
/// and a short body is [`DecodeError::Truncated`], never a panic.
struct Reader<'a> {
    /// The bytes not read yet.
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Whether every byte was read.
    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Reads one byte.
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&byte, rest) = self.rest.split_first().ok_or(DecodeError::Truncated)?;
        self.rest = rest;
        Ok(byte)
    }

    /// Reads a big-endian two-byte integer (§1.5.2).
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let high = self.u8()?;
        let low = self.u8()?;
        Ok(u16::from_be_bytes([high, low]))
    }

    /// Reads a Packet Identifier that must not be 0 (MQTT-2.3.1-1).
    fn non_zero_packet_id(&mut self) -> Result<PacketId, DecodeError> {
        match self.u16()? {
            0 => Err(DecodeError::ZeroPacketId),
            id => Ok(id),
        }
    }

    /// Reads `len` bytes.
    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        let (taken, rest) = self
            .rest
            .split_at_checked(len)
            .ok_or(DecodeError::Truncated)?;
        self.rest = rest;
        Ok(taken)
    }

    /// Reads every byte left (a PUBLISH payload has no length prefix).
    fn take_rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// Reads binary data with a two-byte length prefix (§1.5.3 framing).
    fn binary(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// Reads a UTF-8 encoded string (§1.5.3): valid UTF-8 (which already excludes
    /// the surrogates U+D800..U+DFFF) and no U+0000. In UTF-8 a zero byte only ever
    /// encodes U+0000, so a byte scan finds it.
    fn utf8(&mut self) -> Result<&'a str, DecodeError> {
        let raw = self.binary()?;
        if raw.contains(&0) {
            return Err(DecodeError::InvalidUtf8);
        }
        std::str::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8)
    }

    /// Checks that the packet has no bytes after its last field.
    fn finish(&self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }
}
