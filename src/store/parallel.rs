//! The start-up reads that run on several threads: decoding a file's
//! records ([`decode`]) and replaying the retained messages ([`live`]),
//! both for the retained messages' journal, which is one directory that
//! every shard needs whole (docs/design/persistence.md, "The retained
//! messages load on a thread per shard"). The session journals need none of it:
//! each shard reads its own directories on its own thread (`startup`).
//!
//! Both give what a serial read gives, record for record: [`decode`] splits
//! the records into contiguous ranges and stops, as the serial read does,
//! at the first record that does not decode (the ranges after it are
//! dropped); [`live`] splits the topics by a fixed hash, so every version
//! of a topic is weighed by one thread, in log order.

use std::ops::Range;

use ahash::AHashMap;
use bytes::Bytes;
use bytestring::ByteString;

use crate::store::frame::RawRecord;
use crate::store::record::{Record, RecordError, StoredMessage};

/// The fewest records a thread of [`decode`] or [`live`] takes: below
/// this, starting a thread (tens of microseconds) costs more than it saves,
/// so small journals (and the tests') are read on the calling thread.
pub const MIN_RECORDS_PER_THREAD: usize = 16 * 1024;

/// Seeds of the hash that splits the topics between the threads of
/// [`live`]: fixed, so that a topic goes to the same thread whatever
/// record it comes from (any values do; the map itself hashes with its own
/// random seed).
const PART_SEEDS: [u64; 4] = [
    0x243F_6A88_85A3_08D3,
    0x1319_8A2E_0370_7344,
    0xA409_3822_299F_31D0,
    0x082E_FA98_EC4E_6C89,
];

/// A thread of a parallel read panicked (a bug) or could not be started:
/// a start-up error instead of a hang or a half-loaded store.
#[derive(Debug, thiserror::Error)]
#[error("a thread of the parallel load panicked: {0}")]
pub struct Panicked(pub String);

/// How many threads to use for `len` records with up to `threads`
/// available: at least [`MIN_RECORDS_PER_THREAD`] records each, at least 1.
pub fn threads_for(len: usize, threads: usize) -> usize {
    threads.min(len / MIN_RECORDS_PER_THREAD).max(1)
}

/// The `parts` contiguous ranges that cover `0..len`, in order.
pub fn ranges(len: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.max(1);
    (0..parts)
        .map(|k| (len * k / parts)..(len * (k + 1) / parts))
        .collect()
}

/// Calls `f(k, input_k)` for every input (each on a thread of its own when
/// there are several) and returns the results in the order of the inputs.
/// Every thread is joined before it returns, so a panic in one is an error
/// here, never a wait.
///
/// # Errors
/// A part panicked, or its thread could not be started.
pub fn in_parallel<I: Send, T: Send>(
    inputs: Vec<I>,
    f: impl Fn(usize, I) -> T + Sync,
) -> Result<Vec<T>, Panicked> {
    if inputs.len() <= 1 {
        return Ok(inputs.into_iter().map(|input| f(0, input)).collect());
    }
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = inputs
            .into_iter()
            .enumerate()
            .map(|(k, input)| {
                std::thread::Builder::new()
                    .name(format!("fanmq-load-{k}"))
                    .spawn_scoped(scope, move || f(k, input))
            })
            .collect();
        let mut out = Vec::with_capacity(handles.len());
        let mut failed = None;
        for handle in handles {
            match handle.map(|h| h.join()) {
                Ok(Ok(value)) => out.push(value),
                Ok(Err(payload)) => {
                    let why = payload
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "no message".to_string());
                    failed.get_or_insert(why);
                }
                Err(e) => {
                    failed.get_or_insert(format!("cannot start a thread: {e}"));
                }
            }
        }
        match failed {
            Some(why) => Err(Panicked(why)),
            None => Ok(out),
        }
    })
}

/// What [`decode`] gives: the records, and the index of the first that did
/// not decode with why.
pub type Decoded = (Vec<Record>, Option<(usize, RecordError)>);

/// The records `raw` decode to, on up to `threads` threads, up to the
/// first that does not decode: the records before it, and its index in
/// `raw` with why.
///
/// # Errors
/// A thread panicked.
pub fn decode(raw: &[RawRecord<'_>], threads: usize) -> Result<Decoded, Panicked> {
    let parts = ranges(raw.len(), threads_for(raw.len(), threads));
    let chunks = in_parallel(parts, |_, range| {
        let mut out = Vec::with_capacity(range.len());
        for i in range {
            match Record::decode(raw[i].kind, raw[i].body) {
                Ok(record) => out.push(record),
                Err(e) => return (out, Some((i, e))),
            }
        }
        (out, None)
    })?;
    let mut chunks = chunks.into_iter();
    let Some((mut records, mut bad)) = chunks.next() else {
        return Ok((Vec::new(), None));
    };
    for (mut chunk, chunk_bad) in chunks {
        if bad.is_some() {
            break;
        }
        records.append(&mut chunk);
        bad = chunk_bad;
    }
    Ok((records, bad))
}

/// The topic and stamp of a retained update (a delete included), `None`
/// for every other record.
fn retained_update(record: &Record) -> Option<(u64, &[u8])> {
    match record {
        Record::Retain(stamp, message) => Some((*stamp, message.topic.as_bytes())),
        Record::RetainDelete(stamp, topic) => Some((*stamp, topic.as_bytes())),
        Record::SessionImage(_)
        | Record::SessionDrop(..)
        | Record::Message(..)
        | Record::Queue(..)
        | Record::Sent(..)
        | Record::Flow(..)
        | Record::Will(_)
        | Record::WillClear(..)
        | Record::DoneMany(_)
        | Record::Steps(..)
        | Record::Legacy(_) => None,
    }
}

/// The retained messages that a replay of `records` leaves, on up to
/// `threads` threads: per topic the update with the highest stamp (the
/// later one of equal stamps, as `RetainStore::apply` keeps it, so the
/// order of the records does not matter otherwise), deletes left out.
///
/// Thread k weighs the topics whose fixed hash is k modulo the threads,
/// over every record, with a map keyed by the records' own topic bytes (no
/// copy); the winners are then moved out of `records`, once.
///
/// # Errors
/// A thread panicked.
pub fn live(records: Vec<Record>, threads: usize) -> Result<Vec<(u64, StoredMessage)>, Panicked> {
    let parts = threads_for(records.len(), threads);
    let split =
        ahash::RandomState::with_seeds(PART_SEEDS[0], PART_SEEDS[1], PART_SEEDS[2], PART_SEEDS[3]);
    let winners = in_parallel((0..parts).collect(), |_, part| {
        let mut topics: AHashMap<&[u8], (u64, usize)> =
            AHashMap::with_capacity(records.len() / parts + 1);
        for (i, record) in records.iter().enumerate() {
            let Some((stamp, topic)) = retained_update(record) else {
                continue;
            };
            if parts > 1 && split.hash_one(topic) % parts as u64 != part as u64 {
                continue;
            }
            // One look-up per record: hashing topics was a sixth of the CPU
            // of a 300k retained messages' start.
            match topics.entry(topic) {
                std::collections::hash_map::Entry::Occupied(held) if held.get().0 > stamp => {}
                std::collections::hash_map::Entry::Occupied(mut held) => {
                    held.insert((stamp, i));
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert((stamp, i));
                }
            }
        }
        topics.into_values().map(|(_, i)| i).collect::<Vec<usize>>()
    })?;
    let mut keep = vec![false; records.len()];
    let mut count = 0;
    for i in winners.into_iter().flatten() {
        keep[i] = true;
        count += 1;
    }
    let mut out = Vec::with_capacity(count);
    for (record, kept) in records.into_iter().zip(keep) {
        if let (true, Record::Retain(stamp, message)) = (kept, record) {
            out.push((stamp, message));
        }
    }
    let chunk = out.len().div_ceil(parts).max(1);
    in_parallel(out.chunks_mut(chunk).collect(), |_, part| pack(part))?;
    Ok(out)
}

/// Bytes of topics and payloads [`pack`] puts into one block: large enough
/// that a block's reference count is taken by hundreds of messages in a
/// row (one cache line, not one allocation each), small enough that a
/// block kept alive by a last message still retained wastes little.
pub const PACK_BLOCK: usize = 64 * 1024;

/// Moves the topics and payloads of `messages` into shared blocks of about
/// [`PACK_BLOCK`] bytes, in order: each message then points into a block
/// instead of two allocations of its own, so the shards that fill their
/// replicas from the list read its topics in a row, and the clones they
/// take count on one block's reference at a time. A message larger than a
/// block gets a block of its own.
fn pack(messages: &mut [(u64, StoredMessage)]) {
    let size = |m: &StoredMessage| m.topic.len() + m.payload.len();
    let mut start = 0;
    while start < messages.len() {
        let mut end = start + 1;
        let mut bytes = size(&messages[start].1);
        while let Some((_, next)) = messages.get(end)
            && bytes + size(next) <= PACK_BLOCK
        {
            bytes += size(next);
            end += 1;
        }
        let mut block = Vec::with_capacity(bytes);
        for (_, m) in &messages[start..end] {
            block.extend_from_slice(m.topic.as_bytes());
            block.extend_from_slice(&m.payload);
        }
        let block = Bytes::from(block);
        let mut at = 0;
        for (_, m) in &mut messages[start..end] {
            let (topic, payload) = (m.topic.len(), m.payload.len());
            // The bytes were a valid topic: this cannot fail (the message
            // keeps its own topic if it did).
            if let Ok(packed) = ByteString::try_from(block.slice(at..at + topic)) {
                m.topic = packed;
            }
            m.payload = block.slice(at + topic..at + topic + payload);
            at += topic + payload;
        }
        start = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::frame;
    use crate::store::tests::retain;

    #[test]
    fn the_ranges_cover_every_index_once_in_order() {
        for (len, parts) in [(0, 3), (1, 3), (10, 3), (100_000, 7), (5, 1)] {
            let got = in_parallel(ranges(len, parts), |_, r| r).unwrap();
            assert_eq!(got.len(), parts);
            let flat: Vec<usize> = got.into_iter().flatten().collect();
            assert_eq!(flat, (0..len).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_part_that_panics_is_an_error_once_every_thread_ended() {
        let ended = std::sync::atomic::AtomicUsize::new(0);
        let err = in_parallel(ranges(4, 4), |k, _| {
            if k == 1 {
                panic!("part {k} failed");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
        .unwrap_err();
        assert!(err.to_string().contains("part 1 failed"), "{err}");
        assert_eq!(ended.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    /// `records` framed, as a segment body.
    fn framed(records: &[Record]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            frame::append_record(&mut out, r.kind(), |b| r.encode_body(b));
        }
        out
    }

    #[test]
    fn a_record_that_does_not_decode_ends_the_records_as_a_serial_read_does() {
        let n = 3 * MIN_RECORDS_PER_THREAD + 17;
        let records: Vec<Record> = (0..n)
            .map(|i| retain((i as u64 + 1) << 16, &format!("t/{i}"), b"p"))
            .collect();
        let mut body = framed(&records);
        let (raw, _) = frame::scan(&body);
        // A record whose checksum holds but whose QoS byte is 3, in the
        // second thread's range: its CRC is made again after the change.
        let bad = MIN_RECORDS_PER_THREAD + 5;
        let at = raw[bad].offset;
        body[at + frame::RECORD_HEAD_LEN + 1 + 8] = 3;
        let len = u32::from_le_bytes(body[at..at + 4].try_into().unwrap()) as usize;
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&body[at..at + 4]),
            &body[at + frame::RECORD_HEAD_LEN..at + frame::RECORD_HEAD_LEN + len],
        );
        body[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        let (raw, end) = frame::scan(&body);
        assert_eq!(end, frame::End::Clean, "the framing is sound");
        for threads in [1, 2, 4] {
            let (got, why) = decode(&raw, threads).unwrap();
            assert_eq!(got.len(), bad, "{threads} threads");
            assert_eq!(got[..], records[..bad]);
            assert_eq!(why.map(|(i, _)| i), Some(bad));
        }
        let (all, why) = decode(&frame::scan(&framed(&records)).0, 4).unwrap();
        assert!(why.is_none());
        assert_eq!(all, records);
    }

    #[test]
    fn the_live_set_is_the_same_on_one_thread_and_on_several() {
        let mut records = Vec::new();
        let topics = 2 * MIN_RECORDS_PER_THREAD;
        for i in 0..3 * topics {
            let t = i % topics;
            let stamp = ((i as u64 * 7919) % (3 * topics as u64) + 1) << 16;
            records.push(match i % 11 {
                0 => Record::RetainDelete(stamp, ByteString::from(format!("t/{t}"))),
                _ => retain(stamp, &format!("t/{t}"), b"v"),
            });
        }
        // Equal stamps: the later record wins.
        records.push(retain(5 << 16, "same", b"first"));
        records.push(retain(5 << 16, "same", b"second"));
        let sorted = |mut v: Vec<(u64, StoredMessage)>| {
            v.sort_by(|a, b| a.1.topic.cmp(&b.1.topic));
            v
        };
        let one = sorted(live(records.clone(), 1).unwrap());
        assert!(one.iter().any(|(_, m)| &m.payload[..] == b"second"));
        assert!(!one.iter().any(|(_, m)| &m.payload[..] == b"first"));
        for threads in [2, 3, 8] {
            assert_eq!(
                sorted(live(records.clone(), threads).unwrap()),
                one,
                "{threads}"
            );
        }
    }

    #[test]
    fn packed_messages_keep_their_bytes_and_share_blocks_in_order() {
        let big = vec![7u8; PACK_BLOCK + 10];
        let mut records = vec![
            retain(1 << 16, "a", b"one"),
            retain(2 << 16, "b/c", b""),
            retain(3 << 16, "d", b"three"),
        ];
        if let Record::Retain(_, m) = &mut records[1] {
            m.payload = Bytes::from(big.clone());
        }
        records.push(retain(4 << 16, "e", b"four"));
        let mut got = live(records.clone(), 1).unwrap();
        got.sort_by_key(|(stamp, _)| *stamp);
        let want: Vec<(u64, StoredMessage)> = records
            .into_iter()
            .filter_map(|r| match r {
                Record::Retain(stamp, m) => Some((stamp, m)),
                _ => None,
            })
            .collect();
        assert_eq!(got, want, "the same topics and payloads");
        let mut chunk = want.clone();
        pack(&mut chunk);
        assert_eq!(chunk, want);
        // "d" and "e" follow each other in one block; the large payload has
        // one of its own.
        let end_of_d = chunk[2]
            .1
            .payload
            .as_ptr()
            .wrapping_add(chunk[2].1.payload.len());
        assert_eq!(end_of_d, chunk[3].1.topic.as_bytes().as_ptr());
        assert_eq!(&chunk[1].1.payload[..], &big[..]);
    }
}
