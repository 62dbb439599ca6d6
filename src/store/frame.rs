//! Framing of the store's files: the segment header and the records after
//! it, each with a CRC-32C, and the scan that finds where the valid prefix
//! of a file ends.
//!
//! Little-endian throughout (docs/design/persistence.md §4.1). A segment
//! starts with a [`HEADER_LEN`]-byte header, then records back to back:
//! `len` u32 (bytes of kind and body), `crc` u32 (CRC-32C over the four
//! `len` bytes, the kind and the body), `kind` u8, body. A zero `len` ends
//! the records (what lies past the end of a pre-allocated file is zeros).

/// Magic at the start of every log segment.
pub const LOG_MAGIC: &[u8; 8] = b"FANMQLOG";

/// The segment format this fanmq writes and the newest it reads: an older
/// fanmq refuses a segment with a higher version rather than guess (and
/// rather than take records of kinds it does not know for damage). 2: the
/// flow records name a session by its image's alias (record::Alias); the
/// format 1 records, which named it by stamp, are still read. 3: the
/// acknowledgements and sends of a shard step go as one ordered record
/// (record::kind::STEPS); format 1 and 2 segments are still read.
pub const FORMAT_VERSION: u16 = 3;

/// Bytes of a segment header: magic 8, version u16, shard u16, shards u16,
/// reserved u16, base LSN u64, CRC-32C of bytes 0..24 u32, reserved u32.
pub const HEADER_LEN: usize = 32;

/// Bytes before a record's kind: `len` u32 and `crc` u32.
pub const RECORD_HEAD_LEN: usize = 8;

/// Largest `len` of a record (kind and body): a message of the largest MQTT
/// packet (256 MiB) plus its topic and properties fits with room to spare;
/// anything larger is damage, not data.
pub const MAX_RECORD: u32 = 300 * 1024 * 1024;

/// The shard number a segment of the retained messages names (only shard 0
/// writes them, §3).
pub const RETAINED_SHARD: u16 = 0xFFFF;

/// A segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version the segment was written with.
    pub version: u16,
    /// The shard that wrote it ([`RETAINED_SHARD`] for retained messages).
    pub shard: u16,
    /// How many shards the broker that wrote it had.
    pub shards: u16,
    /// Log position of the first record.
    pub base_lsn: u64,
}

/// Why a header could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer than [`HEADER_LEN`] bytes: a segment torn while being created.
    #[error("segment header is torn ({0} of 32 bytes)")]
    Torn(usize),
    /// Not a fanmq segment, or a damaged header.
    #[error("not a fanmq segment header (bad magic or checksum)")]
    Damaged,
    /// Written by a newer fanmq: refused, never guessed at.
    #[error(
        "segment format {0} was written by a newer fanmq (this one reads up to format {FORMAT_VERSION}); upgrade fanmq or move the persistence directory away"
    )]
    Newer(u16),
}

impl Header {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(LOG_MAGIC);
        out[8..10].copy_from_slice(&self.version.to_le_bytes());
        out[10..12].copy_from_slice(&self.shard.to_le_bytes());
        out[12..14].copy_from_slice(&self.shards.to_le_bytes());
        out[16..24].copy_from_slice(&self.base_lsn.to_le_bytes());
        let crc = crc32c::crc32c(&out[..24]);
        out[24..28].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads a header from the start of `data`.
    ///
    /// # Errors
    /// A torn or damaged header, or one of a newer format.
    pub fn decode(data: &[u8]) -> Result<Header, HeaderError> {
        if data.len() < HEADER_LEN {
            return Err(HeaderError::Torn(data.len()));
        }
        let crc = u32::from_le_bytes([data[24], data[25], data[26], data[27]]);
        if &data[..8] != LOG_MAGIC || crc32c::crc32c(&data[..24]) != crc {
            return Err(HeaderError::Damaged);
        }
        let u16_at = |i: usize| u16::from_le_bytes([data[i], data[i + 1]]);
        let version = u16_at(8);
        if version > FORMAT_VERSION {
            return Err(HeaderError::Newer(version));
        }
        let mut lsn = [0u8; 8];
        lsn.copy_from_slice(&data[16..24]);
        Ok(Header {
            version,
            shard: u16_at(10),
            shards: u16_at(12),
            base_lsn: u64::from_le_bytes(lsn),
        })
    }
}

/// Appends one record (`kind`, then what `body` writes) to `out`, framed.
pub fn append_record(out: &mut Vec<u8>, kind: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEAD_LEN]);
    out.push(kind);
    body(out);
    let len = u32::try_from(out.len() - start - RECORD_HEAD_LEN).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32c::crc32c(&out[start..start + 4]);
    crc = crc32c::crc32c_append(crc, &out[start + RECORD_HEAD_LEN..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// One framed record found by [`scan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawRecord<'a> {
    /// Offset of its `len` field in the scanned bytes.
    pub offset: usize,
    /// Its kind.
    pub kind: u8,
    /// Its body.
    pub body: &'a [u8],
}

/// How the records of a scanned file end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// At the end of the data, or at a zero `len` with only zeros after it.
    Clean,
    /// At a bad record: a `len` out of range, a record running past the
    /// data, a checksum that fails, or non-zero bytes after a zero `len`.
    Damaged {
        /// Offset of the bad record: the valid prefix ends here.
        offset: usize,
        /// What was wrong.
        why: &'static str,
    },
}

/// How records end at `offset` where `rest` is what is left: cleanly when
/// it is all zeros (pre-allocated space), else damaged for reason `why`.
fn zeros_or_damage(rest: &[u8], offset: usize, why: &'static str) -> End {
    if rest.iter().all(|&b| b == 0) {
        End::Clean
    } else {
        End::Damaged { offset, why }
    }
}

/// The records of `data` (the bytes after a segment header) up to the first
/// bad one, and how they end. Never panics, whatever the bytes.
pub fn scan(data: &[u8]) -> (Vec<RawRecord<'_>>, End) {
    let mut records = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let rest = &data[at..];
        if rest.len() < RECORD_HEAD_LEN {
            return (records, zeros_or_damage(rest, at, "record header torn"));
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        if len == 0 {
            return (
                records,
                zeros_or_damage(rest, at, "zero length followed by data"),
            );
        }
        if len > MAX_RECORD {
            return (
                records,
                End::Damaged {
                    offset: at,
                    why: "record length out of range",
                },
            );
        }
        let total = RECORD_HEAD_LEN + len as usize;
        if rest.len() < total {
            return (
                records,
                End::Damaged {
                    offset: at,
                    why: "record runs past the end of the file",
                },
            );
        }
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        let computed = crc32c::crc32c_append(crc32c::crc32c(&rest[..4]), &rest[8..total]);
        if crc != computed {
            return (
                records,
                End::Damaged {
                    offset: at,
                    why: "record checksum mismatch",
                },
            );
        }
        records.push(RawRecord {
            offset: at,
            kind: rest[RECORD_HEAD_LEN],
            body: &rest[RECORD_HEAD_LEN + 1..total],
        });
        at += total;
    }
    (records, End::Clean)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::XorShift;

    fn header() -> Header {
        Header {
            version: FORMAT_VERSION,
            shard: 1,
            shards: 2,
            base_lsn: 77,
        }
    }

    #[test]
    fn crc32c_known_answer() {
        // From the crc32c crate's documentation.
        assert_eq!(crc32c::crc32c(b"Hello world!"), 0x7B98_E751);
    }

    #[test]
    fn header_round_trips_and_refuses_newer_torn_damaged() {
        let bytes = header().encode();
        assert_eq!(Header::decode(&bytes), Ok(header()));
        assert_eq!(Header::decode(&bytes[..10]), Err(HeaderError::Torn(10)));
        let mut damaged = bytes;
        damaged[17] ^= 1;
        assert_eq!(Header::decode(&damaged), Err(HeaderError::Damaged));
        let newer = Header {
            version: FORMAT_VERSION + 1,
            ..header()
        }
        .encode();
        let err = Header::decode(&newer).unwrap_err();
        assert_eq!(err, HeaderError::Newer(FORMAT_VERSION + 1));
        assert!(err.to_string().contains("newer fanmq"), "{err}");
    }

    fn three_records() -> Vec<u8> {
        let mut out = Vec::new();
        append_record(&mut out, 1, |b| b.extend_from_slice(b"one"));
        append_record(&mut out, 2, |b| b.extend_from_slice(b"second"));
        append_record(&mut out, 3, |b| b.extend_from_slice(b"the third"));
        out
    }

    #[test]
    fn records_round_trip_and_trailing_zeros_end_cleanly() {
        let mut data = three_records();
        data.extend_from_slice(&[0u8; 100]);
        let (records, end) = scan(&data);
        assert_eq!(end, End::Clean);
        let kinds: Vec<u8> = records.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [1, 2, 3]);
        assert_eq!(records[1].body, b"second");
        assert_eq!(records[0].offset, 0);
    }

    #[test]
    fn a_cut_at_every_byte_of_the_last_record_keeps_the_earlier_ones() {
        let data = three_records();
        let (all, _) = scan(&data);
        let last = all[2].offset;
        for cut in last..data.len() {
            let (records, end) = scan(&data[..cut]);
            assert_eq!(records.len(), 2, "cut at {cut}");
            if cut > last {
                assert!(matches!(end, End::Damaged { offset, .. } if offset == last));
            }
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_in_the_last_record_is_detected() {
        let data = three_records();
        let last = scan(&data).0[2].offset;
        for byte in last..data.len() {
            for bit in 0..8 {
                let mut bad = data.clone();
                bad[byte] ^= 1 << bit;
                let (records, end) = scan(&bad);
                assert_eq!(records.len(), 2, "byte {byte} bit {bit}");
                assert!(matches!(end, End::Damaged { offset, .. } if offset == last));
            }
        }
    }

    #[test]
    fn random_bytes_never_panic_and_never_yield_a_bad_record() {
        let mut rng = XorShift(0x5EED_F00D);
        for round in 0..2000 {
            let len = (rng.next() % 200) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if round % 3 == 0 {
                // Valid records with random garbage after them.
                let mut valid = three_records();
                valid.append(&mut data);
                data = valid;
            }
            let (records, _) = scan(&data);
            for r in records {
                assert!(r.offset + RECORD_HEAD_LEN + 1 + r.body.len() <= data.len());
            }
            let _ = Header::decode(&data);
        }
    }
}
