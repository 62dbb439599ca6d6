//! Snapshots while the broker serves (docs/design/persistence.md §5.4,
//! "What is built"): [`spawn_snapshots`] starts a task per journal of
//! the shard which, when its log since its last snapshot is past
//! `persistence_snapshot_log_bytes` (and past the size of its last
//! snapshot, so that snapshots never cost more than twice the log they
//! replace), starts a new segment and writes what is live into a snapshot
//! (`store::snapshot`), then removes the files older than the previous one.
//!
//! The walk is fuzzy and never stalls the data path for long: the
//! persistent sessions are visited [`SESSIONS_PER_CHUNK`] slab slots at a
//! time with `yield_if_needed` between chunks. Each visited session gets a
//! fresh image (a new stamp, so the `Queue` records of the new segment that
//! name its older stamp, already part of the image, are not counted
//! twice), after a `Message` record for each queued message it is the first
//! to hold in this snapshot: a message fanned out to many sessions is
//! written once (found by the identity of its shared payload, topic and
//! property buffers, which only an identical message can share). What
//! changes during the walk is in the new segment too; a session that
//! appears during it writes its own image there. Retained messages (shard
//! 0): the replica's messages are cloned (reference counts only) in one
//! step, then written in chunks.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ahash::AHashMap;
use log::{info, warn};

use crate::protocol::message::Message;
use crate::shard::Shard;
use crate::store::journal::{Journal, Lsn};
use crate::store::record::{Record, StoredMessage, next_stamp, unix_ms_now};
use crate::store::snapshot::{SnapshotWriter, WRITE_CHUNK, remove_before, snapshot_path};

/// Slab slots visited between two yields: short enough that a step of the
/// walk takes well under a millisecond for sessions with small queues.
pub const SESSIONS_PER_CHUNK: usize = 1024;

/// Retained messages written between two yields.
pub const RETAINED_PER_CHUNK: usize = 4096;

/// How often a snapshot task waiting for its log checks for shutdown.
pub const STOP_POLL: Duration = Duration::from_millis(250);

/// Identity of a message's shared buffers: payload, topic, properties.
type MessageKey = (usize, usize, usize, usize, usize);

/// The buffers `message` shares with its copies in other queues.
fn identity(message: &Message) -> MessageKey {
    (
        message.payload.as_ptr() as usize,
        message.payload.len(),
        message.topic.as_ptr() as usize,
        message.topic.len(),
        message
            .properties
            .as_ref()
            .map_or(0, |p| Arc::as_ptr(p) as usize),
    )
}

/// Which journal a snapshot is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    /// The shard's persistent sessions.
    Sessions,
    /// The retained messages (shard 0).
    Retained,
}

impl Shard {
    /// Appends the images of the persistent sessions in slab slots
    /// `from..from + count` to `out`, each after the messages it is the
    /// first in this snapshot to queue (`seen` maps them to their ids);
    /// stops early once `out` holds a [`WRITE_CHUNK`] to write (sessions
    /// with long queues). Returns the next slot, or `None` past the last.
    pub fn snapshot_sessions_chunk(
        &mut self,
        from: usize,
        count: usize,
        seen: &mut AHashMap<MessageKey, u64>,
        out: &mut SnapshotWriter,
    ) -> Option<usize> {
        let end = self.sessions.capacity();
        if from >= end {
            return None;
        }
        let now = Instant::now();
        let unix_now = unix_ms_now();
        let upto = (from + count).min(end);
        for slot in from..upto {
            let Ok(key) = u32::try_from(slot) else {
                continue;
            };
            // A message several sessions hold is written once.
            let store = |message: &Message| {
                *seen.entry(identity(message)).or_insert_with(|| {
                    let mid = next_stamp();
                    out.append(&Record::Message(
                        mid,
                        StoredMessage::of(message, now, unix_now),
                    ));
                    mid
                })
            };
            let Some((image, tail, _)) = self.image_with_flows(key, store) else {
                continue;
            };
            self.persist_stamps.insert(key, image.alias);
            out.append(&Record::SessionImage(image));
            for record in &tail {
                out.append(record);
            }
            if out.buffered() >= WRITE_CHUNK {
                return Some(slot + 1);
            }
        }
        Some(upto)
    }

    /// Appends the latest will record of each persistent session that has
    /// one to `out`, with its stamp (the loader keeps the latest per client
    /// id): the log that journalled them is removed after the snapshot.
    pub fn snapshot_wills(&self, out: &mut SnapshotWriter) {
        for record in self.persist_wills.values() {
            out.append(record);
        }
    }
}

/// Writes one snapshot of `journal` (whose log now starts at `base`).
/// Returns its size.
async fn write_snapshot(
    shard: &Rc<RefCell<Shard>>,
    journal: &Journal,
    which: Which,
    base: Lsn,
) -> std::io::Result<u64> {
    let (tag, shards) = journal.tags();
    let mut out = SnapshotWriter::create(journal.dir(), base, tag, shards).await?;
    let walked = match which {
        Which::Sessions => {
            let mut seen = AHashMap::new();
            let mut slot = 0;
            loop {
                let next = shard.borrow_mut().snapshot_sessions_chunk(
                    slot,
                    SESSIONS_PER_CHUNK,
                    &mut seen,
                    &mut out,
                );
                let Some(next) = next else {
                    shard.borrow().snapshot_wills(&mut out);
                    break Ok(());
                };
                slot = next;
                if let Err(e) = out.flush_if_full().await {
                    break Err(e);
                }
                glommio::yield_if_needed().await;
            }
        }
        Which::Retained => {
            let messages: Vec<Message> = shard.borrow().retained.messages().cloned().collect();
            let mut written = Ok(());
            for (n, message) in messages.iter().enumerate() {
                if let Some(record @ Record::Retain(..)) = Record::of_retained(message) {
                    out.append(&record);
                }
                if out.buffered() >= WRITE_CHUNK || n % RETAINED_PER_CHUNK == 0 {
                    if let Err(e) = out.flush_if_full().await {
                        written = Err(e);
                        break;
                    }
                    glommio::yield_if_needed().await;
                }
            }
            written
        }
    };
    match walked {
        Ok(()) => out.finish().await,
        Err(e) => {
            out.abandon().await;
            Err(e)
        }
    }
}

/// Snapshots `journal` of this shard while it runs, whenever its log since
/// its last snapshot is past `threshold` bytes (and past the last
/// snapshot's size), until `stop`.
async fn snapshot_journal(
    shard: Rc<RefCell<Shard>>,
    journal: Rc<Journal>,
    which: Which,
    threshold: u64,
    stop: Arc<AtomicBool>,
) {
    // Base of the last snapshot written: with the log after it, the
    // fallback of the next one.
    // At start: the snapshot the load used, kept as it was.
    let (mut previous, mut last_size) = journal
        .loaded_snapshot()
        .map_or((None, 0), |(base, size)| (Some(base), size));
    while !stop.load(Ordering::Relaxed) {
        let due = glommio::timer::timeout(STOP_POLL, async {
            journal.wait_log_bytes(threshold.max(last_size)).await;
            Ok(())
        })
        .await;
        if due.is_err() {
            continue;
        }
        let started = Instant::now();
        let base = journal.rotate();
        match write_snapshot(&shard, &journal, which, base).await {
            Ok(size) => {
                journal.snapshot_written(base);
                if let Some(previous) = previous {
                    remove_before(journal.dir(), previous);
                }
                previous = Some(base);
                last_size = size;
                info!(
                    "persistence: snapshot {} of {size} bytes written in {:?}",
                    snapshot_path(journal.dir(), base).display(),
                    started.elapsed()
                );
            }
            Err(e) => {
                // Tried again once the log grew by another threshold.
                journal.snapshot_failed(base);
                warn!(
                    "persistence: snapshot of {} failed ({e}); the log is kept",
                    journal.dir().display()
                );
            }
        }
    }
}

/// Starts a snapshot task for each of this shard's journals (see
/// [`snapshot_journal`]).
pub fn spawn_snapshots(shard: &Rc<RefCell<Shard>>, threshold: u64, stop: &Arc<AtomicBool>) {
    let journals = {
        let s = shard.borrow();
        [
            (s.session_journal.clone(), Which::Sessions),
            (s.retain_journal.clone(), Which::Retained),
        ]
    };
    for (journal, which) in journals {
        if let Some(journal) = journal {
            glommio::spawn_local(snapshot_journal(
                shard.clone(),
                journal,
                which,
                threshold,
                stop.clone(),
            ))
            .detach();
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use bytestring::ByteString;

    use super::*;
    use crate::config::Config;
    use crate::protocol::v3::QoS;
    use crate::session::{Session, SessionState};
    use crate::shard::testing;
    use crate::store::load_log;

    /// A message fanned out to two persistent sessions is written once,
    /// each image names it with the QoS it gets; a clean session is left
    /// out; the images' new stamps become what later `Queue` records name.
    #[test]
    fn a_fanned_out_message_is_written_once_and_clean_sessions_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let mut shard = testing::shard_with(0, 1, Config::default());
                let message = Message {
                    topic: ByteString::from("fan/out"),
                    payload: Bytes::from_static(b"once"),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    retain_stamp: 0,
                    properties: None,
                };
                let mut keys = Vec::new();
                for (id, clean) in [("p1", false), ("p2", false), ("clean", true)] {
                    let mut session =
                        Session::new(ByteString::from(id), clean, SessionState::default());
                    let flows = session.state.flows.get_or_insert_with(Box::default);
                    flows.pending.push_back(message.clone());
                    keys.push(shard.insert_session(session));
                }
                let mut out = SnapshotWriter::create(&path, 1000, 0, 1).await.unwrap();
                let mut seen = AHashMap::new();
                let mut slot = 0;
                while let Some(next) = shard.snapshot_sessions_chunk(slot, 2, &mut seen, &mut out) {
                    slot = next;
                }
                out.finish().await.unwrap();
                let loaded = load_log(&path, &path).expect("loads");
                let mids: Vec<u64> = loaded
                    .records
                    .iter()
                    .filter_map(|r| match r {
                        Record::Message(mid, m) => {
                            assert_eq!(&m.payload[..], b"once");
                            Some(*mid)
                        }
                        _ => None,
                    })
                    .collect();
                assert_eq!(mids.len(), 1, "written once: {:?}", loaded.records);
                let images: Vec<&crate::store::record::StoredSession> = loaded
                    .records
                    .iter()
                    .filter_map(|r| match r {
                        Record::SessionImage(s) => Some(s),
                        _ => None,
                    })
                    .collect();
                let ids: Vec<&str> = images.iter().map(|s| &*s.client_id).collect();
                assert_eq!(ids, vec!["p1", "p2"]);
                for (image, key) in images.iter().zip(&keys) {
                    assert_eq!(image.queued, vec![(mids[0], QoS::AtLeastOnce)]);
                    assert_eq!(shard.persist_stamps.get(key), Some(&image.alias));
                }
            })
            .expect("executor")
            .join()
            .expect("runs");
    }

    /// A snapshot carries what exactly-once needs: each in-flight message
    /// under the id the snapshot wrote it with (which the session's entry
    /// then carries, for the records after it), its packet id and phase,
    /// the incoming QoS 2 ids awaiting PUBREL, and the latest will.
    #[test]
    fn a_snapshot_carries_flows_in_flight_incoming_qos2_ids_and_wills() {
        use crate::session::{Inflight, Phase};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let mut shard = testing::shard_with(0, 1, Config::default());
                let message = |qos| Message {
                    topic: ByteString::from("in/flight"),
                    payload: Bytes::from_static(b"sent"),
                    qos,
                    retain: false,
                    retain_stamp: 0,
                    properties: None,
                };
                let mut session =
                    Session::new(ByteString::from("flows"), false, SessionState::default());
                let flows = session.state.flows.get_or_insert_with(Box::default);
                for (packet_id, qos, phase) in [
                    (7, QoS::AtLeastOnce, Phase::AwaitPubAck),
                    (8, QoS::ExactlyOnce, Phase::AwaitPubComp),
                ] {
                    flows.inflight.push_back(Inflight {
                        packet_id,
                        message: message(qos),
                        phase,
                        stored: 1,
                        journalled: true,
                    });
                }
                flows.awaiting_rel.push(42);
                let key = shard.insert_session(session);
                let will = Record::Will(crate::store::record::StoredWill {
                    stamp: next_stamp(),
                    client_id: ByteString::from("flows"),
                    delay: 5,
                    due_unix_ms: 0,
                    message: StoredMessage::of(&message(QoS::AtLeastOnce), Instant::now(), 0),
                    expiry_interval: Some(60),
                });
                shard
                    .persist_wills
                    .insert(ByteString::from("flows"), will.clone());
                let mut out = SnapshotWriter::create(&path, 1000, 0, 1).await.unwrap();
                let mut seen = AHashMap::new();
                let mut slot = 0;
                while let Some(next) = shard.snapshot_sessions_chunk(slot, 8, &mut seen, &mut out) {
                    slot = next;
                }
                shard.snapshot_wills(&mut out);
                out.finish().await.unwrap();
                let records = load_log(&path, &path).expect("loads").records;
                let stored: Vec<u64> = shard
                    .sessions
                    .get(key as usize)
                    .unwrap()
                    .state
                    .flows
                    .as_ref()
                    .unwrap()
                    .inflight
                    .iter()
                    .map(|f| f.stored)
                    .collect();
                let written: Vec<u64> = records
                    .iter()
                    .filter_map(|r| match r {
                        Record::Message(mid, _) => Some(*mid),
                        _ => None,
                    })
                    .collect();
                assert_eq!(stored, written, "entries carry the snapshot's ids");
                let stamp = shard.persist_stamps[&key];
                let sent: Vec<_> = records
                    .iter()
                    .filter_map(|r| match r {
                        Record::Sent(mid, refs) => Some((*mid, refs.clone())),
                        _ => None,
                    })
                    .collect();
                assert_eq!(
                    sent,
                    vec![
                        (written[0], vec![(stamp, 7, QoS::AtLeastOnce)]),
                        (written[1], vec![(stamp, 8, QoS::ExactlyOnce)]),
                    ]
                );
                use crate::store::record::FlowStep;
                assert!(
                    records.contains(&Record::Flow(FlowStep::PubRecd, stamp, 8)),
                    "the PUBREC'd QoS 2 phase: {records:?}"
                );
                assert!(
                    records.contains(&Record::Flow(FlowStep::AwaitRel, stamp, 42)),
                    "incoming QoS 2 ids: {records:?}"
                );
                assert!(records.contains(&will), "the will: {records:?}");
            })
            .expect("executor")
            .join()
            .expect("runs");
    }
}
