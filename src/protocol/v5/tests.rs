//! Helpers shared by the unit tests of this module, and cross-checks against
//! an independent implementation: rumqttc 0.24's MQTT 5.0 packets
//! (`rumqttc::v5::mqttbytes::v5`), written by rumqttc and decoded here, encoded
//! here and read by rumqttc.

use bytes::{BufMut, BytesMut};

use super::{DecodeError, Packet, decode};
use crate::codec::{self, MAX_FIXED_HEADER_LEN, MAX_REMAINING_LENGTH};

/// A maximum packet size that never gets in the way.
pub(super) const BIG: usize = MAX_REMAINING_LENGTH + MAX_FIXED_HEADER_LEN;

/// A frame: `first`, a minimal Remaining Length, `body`.
pub(super) fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u8(first);
    codec::encode_remaining_length(body.len(), &mut out).expect("test body fits");
    out.put_slice(body);
    out.to_vec()
}

/// A length-prefixed string or binary field.
pub(super) fn string(s: &[u8]) -> Vec<u8> {
    let mut v = u16::try_from(s.len())
        .expect("test string fits")
        .to_be_bytes()
        .to_vec();
    v.extend_from_slice(s);
    v
}

/// A property block: its minimal length, then `block`.
pub(super) fn props(block: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    codec::encode_remaining_length(block.len(), &mut out).expect("test block fits");
    out.put_slice(block);
    out.to_vec()
}

/// Concatenates byte pieces.
pub(super) fn cat(pieces: &[&[u8]]) -> Vec<u8> {
    pieces.concat()
}

/// Decodes `bytes`, checking that exactly all of them were consumed.
pub(super) fn decode_all(bytes: &[u8]) -> Result<Packet, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let packet = decode(&mut buf, BIG)?;
    assert!(buf.is_empty(), "left {} bytes", buf.len());
    packet.ok_or(DecodeError::Truncated)
}

/// Decodes `bytes` expecting an error, checking that nothing was consumed.
pub(super) fn decode_err(bytes: &[u8]) -> DecodeError {
    let mut buf = BytesMut::from(bytes);
    let err = decode(&mut buf, BIG).expect_err("should fail");
    assert_eq!(buf.len(), bytes.len(), "an error consumed bytes");
    err
}
