//! The MQTT 5.0 decoder's fuzzing entry point: the `decode_v5` cargo-fuzz
//! target (`fuzz/fuzz_targets/decode_v5.rs`) calls [`decode`], and so do this
//! module's randomized unit tests. The crate's fuzz
//! entry points are in `crate::fuzzing` (`decode_v5`); the checks live here,
//! beside the codec they hold to its promises.

use bytes::BytesMut;

use super::encode::{PublishHeader, encode_publish};
use super::{DecodeError, Packet, PacketType, Publish, peek_frame_len};

/// Largest packet the target allows, so that large announced lengths meet both
/// "too large" and "incomplete".
const FUZZ_MAX_PACKET_SIZE: usize = 4096;

/// Runs the decoder on `data` and returns how many packets it decoded. The
/// first byte picks the maximum packet size and a chunk size; the rest is the
/// stream, decoded once whole and once fed in chunks.
///
/// # Panics
///
/// When the decoder breaks a promise (that is the point): it panics; the two
/// feeds give different packets or errors; `None` or an error consumes bytes;
/// a packet consumes other than the length its fixed header announced; an
/// error's reason code is one neither CONNACK nor DISCONNECT may carry; a
/// decoded PUBLISH, encoded again, does not decode to itself.
pub fn decode(data: &[u8]) -> usize {
    let Some((&seed, stream)) = data.split_first() else {
        return 0;
    };
    let max = (2 + usize::from(seed) * 16).min(FUZZ_MAX_PACKET_SIZE);
    let whole = decode_stream(stream, max, stream.len().max(1));
    let chunked = decode_stream(stream, max, 1 + usize::from(seed % 8));
    assert_eq!(whole, chunked, "chunked stream decoded differently");
    whole.0.len()
}

/// Decodes `stream`, fed `chunk` bytes at a time, until it ends or fails.
fn decode_stream(stream: &[u8], max: usize, chunk: usize) -> (Vec<Packet>, Option<DecodeError>) {
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut packets = Vec::new();
    loop {
        let before = buf.len();
        let announced = peek_frame_len(&buf, max);
        match super::decode(&mut buf, max) {
            Ok(Some(packet)) => {
                assert_eq!(announced, Ok(Some(before - buf.len())), "consumed bytes");
                if let Packet::Publish(publish) = &packet {
                    assert_round_trip(publish);
                }
                packets.push(packet);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "an incomplete packet consumed bytes");
                if fed == stream.len() {
                    return (packets, None);
                }
                let n = chunk.min(stream.len() - fed);
                buf.extend_from_slice(&stream[fed..fed + n]);
                fed += n;
            }
            Err(error) => {
                assert_eq!(buf.len(), before, "an error consumed bytes");
                let reason = error.reason_code();
                assert!(
                    reason.is_valid_for(PacketType::ConnAck)
                        || reason.is_valid_for(PacketType::Disconnect),
                    "{error:?} maps to {reason}"
                );
                return (packets, Some(error));
            }
        }
    }
}

/// Encodes `publish` as a server would forward it and decodes it back.
fn assert_round_trip(publish: &Publish) {
    let header = PublishHeader {
        topic: &publish.topic,
        qos: publish.qos,
        retain: publish.retain,
        dup: publish.dup,
        properties: &publish.properties,
    };
    let mut out = BytesMut::new();
    encode_publish(&header, publish.packet_id, &publish.payload, &mut out)
        .expect("a decoded PUBLISH encodes");
    let again = super::decode(&mut out, usize::MAX);
    assert_eq!(again, Ok(Some(Packet::Publish(publish.clone()))));
}

#[cfg(test)]
mod tests {
    /// The committed seed inputs of the `decode_v5` target and how many
    /// packets each holds before its end or its error.
    #[test]
    fn seed_corpus_decodes_as_intended() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode_v5");
        let seeds = [
            ("connect", 1),
            ("publish_stream", 4),
            ("subscribe_unsubscribe", 2),
            ("acks", 4),
            ("disconnect_auth", 2),
            ("non_minimal_length", 0),
            ("duplicate_property", 0),
            ("too_large", 0),
        ];
        for (name, packets) in seeds {
            let data = std::fs::read(dir.join(name)).expect("seed file");
            assert_eq!(super::decode(&data), packets, "{name}");
        }
    }
}
