//! Loading the persistent sessions at start-up, one journal directory at a
//! time, so that every shard can load its own directories on its own
//! executor, in parallel with the others (docs/design/persistence.md,
//! "Start-up").
//!
//! The steps, for each shard:
//!
//! 1. [`session_dirs`]: the `shard-*/` directories it reads (its own, and
//!    those of a broker with more shards, by index modulo the shard count).
//! 2. [`read_sessions`]: per client id, the newest session record (image or
//!    drop) and the newest will record of each directory, the live images
//!    replayed with the records after them ([`flows::replay`]). A
//!    directory's records only name messages and aliases of the same
//!    directory: each journal writes what its images reference.
//! 3. The caller hands every [`Found`] to the client id's home shard (this
//!    layer does not know where that is).
//! 4. [`pick`]: of everything a shard was handed, per client id the record
//!    with the highest stamp wins, as a whole-store read would choose.
//! 5. [`write_compacted`]: the shard's sessions go into a new segment of its
//!    own directory, durably.
//! 6. [`SessionsLoad::finished`]: the last shard to get there removes every
//!    segment read (so a crash at any point leaves every session in some
//!    segment: nothing goes before every new segment is durable) and logs
//!    the total.
//!
//! The tests' `Store::load_sessions` runs steps 2 and 4 over every
//! directory in turn.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytestring::ByteString;
use log::{info, warn};

use crate::protocol::topic::SHARED_PREFIX;
use crate::store::frame::{self, Header};
use crate::store::record::{self, Record, StoredWill};
use crate::store::{LoadedSession, StoreError, flows, journal, load_log, shard_dir};

/// The newest will record of a client id: its stamp, and the will (`None`:
/// cleared).
pub type WillRecord = (u64, Option<StoredWill>);

/// What became of a client id's newest session record in one directory.
#[derive(Debug)]
pub enum Fate {
    /// An image, live at the load: the session with what it had queued and
    /// in flight (its will is attached by [`pick`], which sees every
    /// directory's).
    Live(Box<LoadedSession>),
    /// An image whose Session Expiry Interval passed while the broker was
    /// down.
    Expired,
    /// An expired image that still holds messages for its shared
    /// subscriptions: loaded all the same, to end right after the start and
    /// hand them to other members (§4.8.2), as had it expired while the
    /// broker ran.
    Ending(Box<LoadedSession>),
    /// A drop (the session ended).
    Dropped,
}

/// What one directory holds for one client id.
#[derive(Debug)]
pub struct Found {
    /// The client id.
    pub client_id: ByteString,
    /// Its newest image or drop in the directory, with its stamp; `None`
    /// when the directory only holds a will record of it.
    pub session: Option<(u64, Fate)>,
    /// Its newest will record in the directory.
    pub will: Option<WillRecord>,
}

/// What [`read_sessions`] read from one directory.
#[derive(Debug, Default)]
pub struct DirSessions {
    /// Per client id what the directory holds.
    pub found: Vec<Found>,
    /// The segments and snapshots read: to remove once every shard's new
    /// segment is durable.
    pub segments: Vec<PathBuf>,
    /// Where a new segment of this directory may start.
    pub next_base: u64,
    /// Valid records read.
    pub records: usize,
}

/// The `shard-*` directories of `store` that shard `shard` of `shards`
/// reads: `shard-<k>` for every k with k mod `shards` = `shard` (a broker
/// with more shards wrote the others), and those without a number on shard
/// 0. Entries that are not directories are left out, as before.
///
/// # Errors
/// A store directory that cannot be listed.
pub fn session_dirs(store: &Path, shard: usize, shards: usize) -> Result<Vec<PathBuf>, StoreError> {
    let entries = fs::read_dir(store).map_err(|source| StoreError::Io {
        path: store.to_path_buf(),
        source,
    })?;
    let mut dirs = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(index) = name.to_str().and_then(|n| n.strip_prefix("shard-")) else {
            continue;
        };
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let mine = match index.parse::<usize>() {
            Ok(k) => k % shards.max(1) == shard,
            Err(_) => shard == 0,
        };
        if mine {
            dirs.push(path);
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Reads the session journal in `dir` (of the store at `store`, for the
/// `corrupt-<ms>/` directory) and returns per client id its newest session
/// and will records there, the live images with their queues and flows
/// replayed. A session online at the crash counts as offline from
/// `now_unix_ms`.
///
/// # Errors
/// See [`load_log`].
pub fn read_sessions(
    store: &Path,
    dir: &Path,
    now_unix_ms: u64,
) -> Result<DirSessions, StoreError> {
    let loaded = load_log(store, dir)?;
    let mut out = DirSessions {
        segments: loaded.segments,
        next_base: loaded.next_base,
        records: loaded.records.len(),
        ..DirSessions::default()
    };
    let mut latest: ahash::AHashMap<ByteString, Record> = ahash::AHashMap::new();
    let mut messages: ahash::AHashMap<u64, record::StoredMessage> = ahash::AHashMap::new();
    let mut queued_after: ahash::AHashMap<u64, Vec<flows::FlowEvent>> = ahash::AHashMap::new();
    let mut wills: ahash::AHashMap<ByteString, WillRecord> = ahash::AHashMap::new();
    // The directory's aliases (record::Alias), in log order: the flow
    // records after an image name it by its alias.
    let mut aliases: ahash::AHashMap<record::Alias, u64> = ahash::AHashMap::new();
    for record in loaded.records {
        let mut events = |stamp: Option<u64>, event: flows::FlowEvent| {
            if let Some(stamp) = stamp {
                queued_after.entry(stamp).or_default().push(event);
            }
        };
        let (stamp, client_id) = match record {
            Record::SessionImage(ref s) => {
                if s.alias != 0 {
                    aliases.insert(s.alias, s.stamp);
                    record::seen_alias(s.alias);
                }
                (s.stamp, s.client_id.clone())
            }
            Record::SessionDrop(stamp, ref id) => (stamp, id.clone()),
            Record::Message(mid, message) => {
                record::seen_stamp(mid);
                messages.insert(mid, message);
                continue;
            }
            Record::Queue(mid, refs) => {
                for (alias, qos) in refs {
                    events(
                        aliases.get(&alias).copied(),
                        flows::FlowEvent::Queued(mid, qos),
                    );
                }
                continue;
            }
            Record::Sent(mid, refs) => {
                for (alias, packet_id, qos) in refs {
                    let event = flows::FlowEvent::Sent(mid, packet_id, qos);
                    events(aliases.get(&alias).copied(), event);
                }
                continue;
            }
            Record::Flow(step, alias, packet_id) => {
                let event = flows::FlowEvent::Step(step, packet_id);
                events(aliases.get(&alias).copied(), event);
                continue;
            }
            Record::DoneMany(done) => {
                for (alias, packet_id) in done {
                    let event = flows::FlowEvent::Step(record::FlowStep::Done, packet_id);
                    events(aliases.get(&alias).copied(), event);
                }
                continue;
            }
            Record::Steps(messages, entries) => {
                for (alias, event) in flows::steps_events(&messages, &entries) {
                    events(aliases.get(&alias).copied(), event);
                }
                continue;
            }
            Record::Legacy(legacy) => {
                for (stamp, event) in flows::legacy_events(legacy) {
                    events(Some(stamp), event);
                }
                continue;
            }
            Record::Will(will) => {
                let (stamp, id) = (will.stamp, will.client_id.clone());
                latest_will(&mut wills, id, (stamp, Some(will)));
                continue;
            }
            Record::WillClear(stamp, id) => {
                latest_will(&mut wills, id, (stamp, None));
                continue;
            }
            Record::Retain(..) | Record::RetainDelete(..) => continue,
        };
        record::seen_stamp(stamp);
        let newer = latest.get(&client_id).is_none_or(|held| match held {
            Record::SessionImage(s) => s.stamp < stamp,
            Record::SessionDrop(held, _) => *held < stamp,
            _ => true,
        });
        if newer {
            latest.insert(client_id, record);
        }
    }
    out.found.reserve(latest.len());
    for (client_id, record) in latest {
        let will = wills.remove(&client_id);
        let session = match record {
            Record::SessionImage(session) => {
                let stamp = session.stamp;
                (
                    stamp,
                    live_or_expired(session, &mut queued_after, &messages, now_unix_ms),
                )
            }
            Record::SessionDrop(stamp, _) => (stamp, Fate::Dropped),
            _ => continue,
        };
        out.found.push(Found {
            client_id,
            session: Some(session),
            will,
        });
    }
    out.found
        .extend(wills.into_iter().map(|(client_id, will)| Found {
            client_id,
            session: None,
            will: Some(will),
        }));
    Ok(out)
}

/// A newest image: expired, or live with its queue (expired messages left
/// out) and flows replayed from the records after it.
fn live_or_expired(
    mut session: record::StoredSession,
    queued_after: &mut ahash::AHashMap<u64, Vec<flows::FlowEvent>>,
    messages: &ahash::AHashMap<u64, record::StoredMessage>,
    now_unix_ms: u64,
) -> Fate {
    if session.offline_since_unix_ms == 0 {
        session.offline_since_unix_ms = now_unix_ms;
    }
    let deadline = session
        .offline_since_unix_ms
        .saturating_add(u64::from(session.expiry_interval) * 1000);
    let expired = session.expiry_interval != u32::MAX && deadline <= now_unix_ms;
    let shares = || {
        session
            .subscriptions
            .iter()
            .any(|s| s.filter.starts_with(SHARED_PREFIX))
    };
    if expired && !shares() {
        return Fate::Expired;
    }
    let after = queued_after.remove(&session.stamp).unwrap_or_default();
    let (mut queued, flows) = flows::replay(&session.queued, &after, |mid| messages.get(&mid));
    queued.retain(|(_, message, _)| {
        message.expires_unix_ms == 0 || message.expires_unix_ms > now_unix_ms
    });
    if expired && queued.is_empty() && flows.inflight.is_empty() {
        return Fate::Expired;
    }
    let loaded = Box::new(LoadedSession {
        session,
        queued,
        flows,
        will: None,
    });
    // An expired one with shared messages left: the shard gives it what
    // is left of its expiry (at least a second), and it ends after the
    // start, handing them on.
    if expired {
        Fate::Ending(loaded)
    } else {
        Fate::Live(loaded)
    }
}

/// Keeps in `wills` the will record (`None`: a clear) with the highest
/// stamp of client id `id`.
fn latest_will(
    wills: &mut ahash::AHashMap<ByteString, WillRecord>,
    id: ByteString,
    will: WillRecord,
) {
    record::seen_stamp(will.0);
    if wills.get(&id).is_none_or(|(held, _)| *held < will.0) {
        wills.insert(id, will);
    }
}

/// The sessions [`pick`] keeps.
#[derive(Debug, Default)]
pub struct Picked {
    /// The live sessions, each with its newest will.
    pub sessions: Vec<LoadedSession>,
    /// Client ids whose newest record is an expired image.
    pub expired: usize,
    /// Of `sessions`, those loaded to end after the start ([`Fate::Ending`]).
    pub ending: usize,
}

/// Of everything `found` holds (from any number of directories, in any
/// order), keeps per client id the session record with the highest stamp
/// (the first of equal ones) and the will record with the highest stamp,
/// and returns the live sessions with their wills.
pub fn pick(found: impl IntoIterator<Item = Found>) -> Picked {
    type Newest = (Option<(u64, Fate)>, Option<WillRecord>);
    let mut newest: ahash::AHashMap<ByteString, Newest> = ahash::AHashMap::new();
    for f in found {
        let held = newest.entry(f.client_id).or_default();
        if let Some((stamp, fate)) = f.session
            && held.0.as_ref().is_none_or(|(h, _)| *h < stamp)
        {
            held.0 = Some((stamp, fate));
        }
        if let Some(will) = f.will
            && held.1.as_ref().is_none_or(|(h, _)| *h < will.0)
        {
            held.1 = Some(will);
        }
    }
    let mut out = Picked::default();
    for (session, will) in newest.into_values() {
        match session {
            Some((_, Fate::Live(mut loaded))) => {
                loaded.will = will.and_then(|(_, will)| will);
                out.sessions.push(*loaded);
            }
            Some((_, Fate::Ending(mut loaded))) => {
                loaded.will = will.and_then(|(_, will)| will);
                out.sessions.push(*loaded);
                out.ending += 1;
            }
            Some((_, Fate::Expired)) => out.expired += 1,
            Some((_, Fate::Dropped)) | None => {}
        }
    }
    out
}

/// Writes `sessions` (shard `shard`'s of `shards`) into a new segment at
/// `base` of `shard-<shard>/` in `store` and makes it durable: each
/// session's messages, then its image with a fresh alias (stored back into
/// `sessions`), its flows and its will. Returns the segment's path and
/// where the shard's journal goes on.
///
/// # Errors
/// A directory or segment that cannot be created, written or synced (the
/// segments read are still there).
pub fn write_compacted(
    store: &Path,
    shard: usize,
    shards: usize,
    base: u64,
    sessions: &mut [LoadedSession],
) -> Result<(PathBuf, u64), StoreError> {
    let dir = shard_dir(store, shard);
    let io = |path: &Path, source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let mut data = Header {
        version: frame::FORMAT_VERSION,
        shard: u16::try_from(shard).unwrap_or(u16::MAX),
        shards: u16::try_from(shards).unwrap_or(u16::MAX),
        base_lsn: base,
    }
    .encode()
    .to_vec();
    let mut written = ahash::AHashSet::new();
    for loaded in sessions.iter_mut() {
        let inflight = loaded.flows.inflight.iter().map(|f| (f.mid, &f.message));
        let queued = loaded
            .queued
            .iter()
            .map(|(mid, message, _)| (*mid, message));
        for (mid, message) in inflight.chain(queued) {
            if written.insert(mid) {
                let record = Record::Message(mid, message.clone());
                frame::append_record(&mut data, record.kind(), |out| record.encode_body(out));
            }
        }
        let mut image = loaded.session.clone();
        image.alias = record::next_alias();
        // In flight first, as a running image lists them.
        image.queued = loaded
            .flows
            .inflight
            .iter()
            .map(|f| (f.mid, f.qos))
            .chain(loaded.queued.iter().map(|(mid, _, qos)| (*mid, *qos)))
            .collect();
        let alias = image.alias;
        loaded.session.alias = alias;
        let record = Record::SessionImage(image);
        frame::append_record(&mut data, record.kind(), |out| record.encode_body(out));
        let will = loaded.will.clone().map(Record::Will);
        for record in flows::loaded_tail(alias, &loaded.flows)
            .into_iter()
            .chain(will)
        {
            frame::append_record(&mut data, record.kind(), |out| record.encode_body(out));
        }
    }
    let path = journal::segment_path(&dir, base);
    let tmp = path.with_extension("fml.tmp");
    let mut file = File::create(&tmp).map_err(|e| io(&tmp, e))?;
    file.write_all(&data)
        .and_then(|()| file.sync_all())
        .map_err(|e| io(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
    journal::sync_dir(&dir);
    let next = base + data.len() as u64 + 1;
    Ok((path, next))
}

/// One shard's part of the load, for [`SessionsLoad::finished`].
#[derive(Debug, Default)]
pub struct LoadPart {
    /// The segments its directories held (read, now obsolete).
    pub read: Vec<PathBuf>,
    /// The segment it wrote (never removed).
    pub written: Option<PathBuf>,
    /// Sessions it restored.
    pub sessions: usize,
    /// Records it read.
    pub records: usize,
    /// Sessions it found expired.
    pub expired: usize,
    /// Of `sessions`, those loaded to end right after the start
    /// ([`Picked::ending`]).
    pub ending: usize,
}

/// The load of every shard's sessions, shared by the shards while they
/// start: counts the shards still loading, and collects what the last one
/// removes and logs. Only used at start-up (a lock here holds up no
/// client).
#[derive(Debug)]
pub struct SessionsLoad {
    /// When the load began.
    started: Instant,
    /// Shards that have not finished their part.
    remaining: AtomicUsize,
    /// The finished parts so far, summed.
    done: Mutex<Tally>,
}

/// The finished parts of a [`SessionsLoad`], summed.
#[derive(Debug, Default)]
struct Tally {
    /// Every segment read.
    read: Vec<PathBuf>,
    /// Every segment written (never removed, even if a name was read too).
    written: Vec<PathBuf>,
    /// Sessions restored.
    sessions: usize,
    /// Records read.
    records: usize,
    /// Sessions found expired.
    expired: usize,
    /// Sessions loaded to end right after the start.
    ending: usize,
}

impl SessionsLoad {
    /// A load by `shards` shards, beginning now.
    pub fn new(shards: usize) -> SessionsLoad {
        SessionsLoad {
            started: Instant::now(),
            remaining: AtomicUsize::new(shards),
            done: Mutex::new(Tally::default()),
        }
    }

    /// Records that a shard wrote its new segment durably. The last shard
    /// removes every segment read (none that was written) and logs what
    /// every shard loaded and how long it took; returns true there. A shard
    /// that fails never gets here, so the segments read stay.
    pub fn finished(&self, part: LoadPart) -> bool {
        let mut done = self
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        done.read.extend(part.read);
        done.written.extend(part.written);
        done.sessions += part.sessions;
        done.records += part.records;
        done.expired += part.expired;
        done.ending += part.ending;
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return false;
        }
        for old in done.read.iter().filter(|p| !done.written.contains(p)) {
            if let Err(e) = fs::remove_file(old) {
                warn!("persistence: cannot remove {}: {e}", old.display());
            }
        }
        info!(
            "persistence: {} persistent sessions from {} records of {} segments ({} expired while the broker was down; {} ending: expired, loaded to end right after the start) in {:?}",
            done.sessions,
            done.records,
            done.read.len(),
            done.expired,
            done.ending,
            self.started.elapsed()
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::v3::QoS;
    use crate::store::record::{StoredMessage, StoredSession, next_stamp};
    use crate::store::{RETAINED_DIR, Store};
    use bytes::Bytes;

    fn message(payload: &'static [u8]) -> StoredMessage {
        StoredMessage {
            qos: QoS::AtLeastOnce,
            retain: false,
            expires_unix_ms: 0,
            topic: ByteString::from("t"),
            properties: Default::default(),
            payload: Bytes::from_static(payload),
        }
    }

    fn image(stamp: u64, id: &str, alias: u32, queued: Vec<(u64, QoS)>) -> StoredSession {
        StoredSession {
            stamp,
            client_id: ByteString::from(id),
            protocol_level: 4,
            expiry_interval: u32::MAX,
            offline_since_unix_ms: 1,
            subscriptions: Vec::new(),
            queued,
            alias,
        }
    }

    /// Writes `records` as one segment of `shard-<k>/`.
    fn write_dir(store: &Path, k: usize, records: &[Record]) {
        let dir = shard_dir(store, k);
        fs::create_dir_all(&dir).unwrap();
        let mut data = Header {
            version: frame::FORMAT_VERSION,
            shard: k as u16,
            shards: 2,
            base_lsn: 0,
        }
        .encode()
        .to_vec();
        for r in records {
            frame::append_record(&mut data, r.kind(), |b| r.encode_body(b));
        }
        fs::write(journal::segment_path(&dir, 0), data).unwrap();
    }

    /// Client id, payloads queued, will payload, of each session.
    fn summary(sessions: &[LoadedSession]) -> Vec<(String, Vec<Bytes>, Option<Bytes>)> {
        let mut out: Vec<_> = sessions
            .iter()
            .map(|s| {
                (
                    s.session.client_id.to_string(),
                    s.queued.iter().map(|(_, m, _)| m.payload.clone()).collect(),
                    s.will.as_ref().map(|w| w.message.payload.clone()),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Two shards' directories: "moved" went from shard 0 to shard 1
    /// (newer image there), "ended" was dropped on shard 1 after its image
    /// on shard 0, "stays" lives on shard 0 with a will written on shard 1.
    fn two_shards(store: &Path) {
        let (old, ended, stays) = (next_stamp(), next_stamp(), next_stamp());
        let (drop, moved, will) = (next_stamp(), next_stamp(), next_stamp());
        write_dir(
            store,
            0,
            &[
                Record::Message(11, message(b"old")),
                Record::SessionImage(image(old, "moved", 1, vec![(11, QoS::AtLeastOnce)])),
                Record::SessionImage(image(ended, "ended", 2, Vec::new())),
                Record::Message(12, message(b"kept")),
                Record::SessionImage(image(stays, "stays", 3, Vec::new())),
                Record::Queue(12, vec![(3, QoS::AtLeastOnce)]),
            ],
        );
        let mut stored_will = crate::store::record::StoredWill {
            stamp: will,
            client_id: ByteString::from("stays"),
            delay: 0,
            due_unix_ms: 0,
            expiry_interval: None,
            message: message(b"will"),
        };
        stored_will.message.retain = false;
        write_dir(
            store,
            1,
            &[
                Record::SessionDrop(drop, ByteString::from("ended")),
                Record::Message(21, message(b"new")),
                Record::SessionImage(image(moved, "moved", 1, vec![(21, QoS::AtLeastOnce)])),
                Record::Will(stored_will),
            ],
        );
    }

    #[test]
    fn shards_loading_their_own_directories_in_parallel_pick_what_one_read_of_all_picks() {
        let dir = tempfile::tempdir().unwrap();
        two_shards(dir.path());
        fs::create_dir_all(dir.path().join(RETAINED_DIR)).unwrap();
        let whole = {
            let store = Store::open(dir.path()).unwrap();
            store.load_sessions(record::unix_ms_now()).unwrap()
        };
        let expected = vec![
            ("moved".to_string(), vec![Bytes::from_static(b"new")], None),
            (
                "stays".to_string(),
                vec![Bytes::from_static(b"kept")],
                Some(Bytes::from_static(b"will")),
            ),
        ];
        assert_eq!(summary(&whole.sessions), expected);

        // Each shard on its own thread reads its own directory and hands
        // every client id to its "home" (here: by first letter).
        let home = |id: &str| usize::from(id.starts_with('s'));
        let store = dir.path();
        let now = record::unix_ms_now();
        let (to_0, to_1): (Vec<_>, Vec<_>) = std::thread::scope(|scope| {
            let readers: Vec<_> = (0..2)
                .map(|k| {
                    scope.spawn(move || {
                        let dirs = session_dirs(store, k, 2).unwrap();
                        assert_eq!(dirs, vec![shard_dir(store, k)]);
                        let read = read_sessions(store, &dirs[0], now).unwrap();
                        let (a, b): (Vec<_>, Vec<_>) = read
                            .found
                            .into_iter()
                            .partition(|f| home(&f.client_id) == 0);
                        (a, (b, read.segments))
                    })
                })
                .collect();
            readers.into_iter().map(|r| r.join().unwrap()).unzip()
        });
        let mut segments = Vec::new();
        let mut for_1 = Vec::new();
        let mut for_0 = Vec::new();
        for (mine, (theirs, read)) in to_0.into_iter().zip(to_1) {
            for_0.extend(mine);
            for_1.extend(theirs);
            segments.extend(read);
        }
        let load = SessionsLoad::new(2);
        let mut all = Vec::new();
        for (k, found) in [(0, for_0), (1, for_1)] {
            let mut picked = pick(found);
            let (path, next) = write_compacted(store, k, 2, 1000, &mut picked.sessions).unwrap();
            assert!(next > 1000);
            let part = LoadPart {
                read: segments.clone(),
                written: Some(path.clone()),
                sessions: picked.sessions.len(),
                records: 0,
                expired: picked.expired,
                ending: picked.ending,
            };
            assert_eq!(load.finished(part), k == 1, "the last one removes");
            all.extend(picked.sessions);
        }
        assert_eq!(summary(&all), expected);
        // The old segments are gone, the new ones hold the same sessions.
        for old in &segments {
            assert!(!old.exists(), "{} removed", old.display());
        }
        let store = Store::open(dir.path()).unwrap();
        let again = store.load_sessions(record::unix_ms_now()).unwrap();
        assert_eq!(summary(&again.sessions), expected);
    }

    #[test]
    fn a_shard_that_never_finishes_leaves_every_segment_read() {
        let dir = tempfile::tempdir().unwrap();
        two_shards(dir.path());
        let read = read_sessions(dir.path(), &shard_dir(dir.path(), 0), 1).unwrap();
        let load = SessionsLoad::new(2);
        let part = LoadPart {
            read: read.segments.clone(),
            ..LoadPart::default()
        };
        assert!(!load.finished(part));
        assert!(read.segments.iter().all(|p| p.exists()));
    }

    #[test]
    fn directories_of_a_broker_with_more_shards_are_shared_out_by_index() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["shard-0", "shard-1", "shard-2", "shard-3", "shard-x"] {
            fs::create_dir_all(dir.path().join(name)).unwrap();
        }
        fs::write(dir.path().join("shard-5"), b"not a directory").unwrap();
        let names = |k| -> Vec<String> {
            session_dirs(dir.path(), k, 2)
                .unwrap()
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names(0), vec!["shard-0", "shard-2", "shard-x"]);
        assert_eq!(names(1), vec!["shard-1", "shard-3"]);
    }

    #[test]
    fn a_newer_segment_in_a_shard_directory_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let shard = shard_dir(dir.path(), 1);
        fs::create_dir_all(&shard).unwrap();
        let newer = Header {
            version: frame::FORMAT_VERSION + 1,
            shard: 1,
            shards: 2,
            base_lsn: 0,
        };
        fs::write(journal::segment_path(&shard, 0), newer.encode()).unwrap();
        let err = read_sessions(dir.path(), &shard, 1).unwrap_err();
        assert!(err.to_string().contains("newer fanmq"), "{err}");
    }
}
