//! Persistence: what fanmq keeps on disk across restarts and crashes
//! (docs/design/persistence.md). This version keeps the retained messages
//! and the persistent sessions: subscriptions, queued messages, and the
//! QoS 1/2 flows in progress ([`flows`]).
//!
//! ```text
//! <persistence_location>/
//!   LOCK             flock()ed while a broker runs: a second one refuses to start
//!   FORMAT           "fanmq-store 1": an older fanmq refuses a newer format
//!   retained/        log-<base LSN, 16 hex>.fml: shard 0's journal of retained updates
//!   shard-<k>/       log-*.fml: shard k's persistent sessions (subscriptions)
//!   */snap-<LSN>.fms a snapshot of that journal for the log from LSN on
//!                    (written while running: the snapshot module)
//!   corrupt-<ms>/    damaged files moved (or copied) aside, never read again
//! ```
//!
//! [`Store::open`] checks the directory and takes the lock; [`load_log`]
//! reads a journal directory, keeping the valid prefix of damaged files (a
//! torn or corrupt tail is expected after a crash or power loss: never a
//! reason to refuse to start, never a panic); the [`journal`] writes.

pub mod flows;
pub mod frame;
pub mod journal;
#[cfg(test)]
mod memfile;
pub mod parallel;
pub mod record;
pub mod snapshot;
pub mod startup;

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use log::{info, warn};

use crate::store::frame::{End, HEADER_LEN, Header, HeaderError};
use crate::store::record::Record;

/// The store layout this fanmq writes into `FORMAT`; a higher one is
/// refused.
pub const STORE_VERSION: u32 = 1;

/// The directory of the retained messages' journal.
pub const RETAINED_DIR: &str = "retained";

/// Errors opening or loading the store: each one a clear start-up error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The location is missing, not a directory, or not writable.
    #[error("persistence_location {path}: {why}")]
    Location {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Another process holds the lock.
    #[error(
        "persistence_location {0} is in use by another fanmq (its LOCK file is locked); two brokers cannot share one directory"
    )]
    Locked(PathBuf),
    /// Written by a newer fanmq.
    #[error("{path}: {why}")]
    Newer {
        /// The file.
        path: PathBuf,
        /// Which format and what to do.
        why: String,
    },
    /// A thread of the parallel load of `path` panicked (a bug): the start
    /// stops with this error rather than wait or serve half a store.
    #[error("persistence: loading {path}: {source}")]
    LoadThread {
        /// The journal directory.
        path: PathBuf,
        /// The panic.
        #[source]
        source: parallel::Panicked,
    },
    /// Any other I/O error on the store's files.
    #[error("persistence: {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An opened store directory; holds the lock while it lives.
#[derive(Debug)]
pub struct Store {
    /// The directory.
    pub dir: PathBuf,
    /// The `LOCK` file, `flock`ed (the lock goes with the descriptor).
    _lock: File,
}

impl Store {
    /// Opens `dir`: checks that it is a writable directory, takes `LOCK`,
    /// checks or writes `FORMAT`, and creates the journal directories.
    ///
    /// # Errors
    /// A missing or unwritable directory, a lock held by another broker,
    /// a newer format.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let location = |why: String| StoreError::Location {
            path: dir.to_path_buf(),
            why,
        };
        match fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(location("not a directory".to_string())),
            Err(e) => {
                return Err(location(format!(
                    "{e} (create it, owned by the user fanmq runs as)"
                )));
            }
        }
        let lock_path = dir.join("LOCK");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| location(format!("not writable: {e}")))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StoreError::Locked(dir.to_path_buf()));
        }
        check_format(dir)?;
        let retained = dir.join(RETAINED_DIR);
        fs::create_dir_all(&retained).map_err(|source| StoreError::Io {
            path: retained,
            source,
        })?;
        Ok(Store {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }
}

/// Reads `FORMAT` (refusing a newer version) or writes it.
fn check_format(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join("FORMAT");
    let io = |source| StoreError::Io {
        path: path.clone(),
        source,
    };
    match fs::read(&path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let version = text
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("fanmq-store "))
                .and_then(|v| v.trim().parse::<u32>().ok());
            match version {
                Some(v) if v > STORE_VERSION => {
                    return Err(StoreError::Newer {
                        path,
                        why: format!(
                            "store format {v} was written by a newer fanmq (this one reads up to {STORE_VERSION}); upgrade fanmq, or move the directory away to start empty"
                        ),
                    });
                }
                Some(_) => return Ok(()),
                None => warn!("persistence: {} is damaged; rewriting it", path.display()),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let tmp = dir.join("FORMAT.tmp");
    let mut file = File::create(&tmp).map_err(io)?;
    file.write_all(format!("fanmq-store {STORE_VERSION}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io)?;
    fs::rename(&tmp, &path).map_err(io)?;
    journal::sync_dir(dir);
    Ok(())
}

/// What [`load_log`] read from one journal directory.
#[derive(Debug, Default)]
pub struct LoadedLog {
    /// Every valid record, oldest first.
    pub records: Vec<Record>,
    /// The segments and snapshots read (or made obsolete by the snapshot
    /// read): to remove once their live records are durable in a new
    /// segment.
    pub segments: Vec<PathBuf>,
    /// The LSN a new segment starts at (after every segment found).
    pub next_base: u64,
    /// Files moved or copied to a `corrupt-<ms>/` directory.
    pub quarantined: usize,
    /// Bytes of valid records read.
    pub bytes: u64,
    /// The snapshot the load started from: its base LSN and size in bytes.
    pub snapshot: Option<(u64, u64)>,
    /// The LSN the log read starts at (the snapshot's base, else the first
    /// segment's): where a journal that goes on after this log, without
    /// rewriting it, counts its log since the last snapshot from.
    pub log_from: u64,
}

/// Reads every segment of the journal directory `dir` (in `store`, for the
/// `corrupt-<ms>/` directory): the valid prefix of the log. A segment with a
/// bad header or a bad record ends the log there: that segment is copied
/// to `corrupt-<ms>/` (its valid records are kept and written again by the
/// next journal), every later segment is moved there, and a warning names
/// file and offset.
///
/// # Errors
/// A segment written by a newer fanmq, or a directory that cannot be listed.
pub fn load_log(store: &Path, dir: &Path) -> Result<LoadedLog, StoreError> {
    load_log_on(store, dir, 1)
}

/// [`load_log`] with each file's records decoded on up to `threads`
/// threads ([`parallel::decode`]): the same records, the same files set
/// aside.
///
/// # Errors
/// As [`load_log`]; a decoding thread that panicked.
pub fn load_log_on(store: &Path, dir: &Path, threads: usize) -> Result<LoadedLog, StoreError> {
    let io = |path: &Path, source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut segments: Vec<(u64, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        let name = entry.file_name();
        let Some(hex) = name
            .to_str()
            .and_then(|n| n.strip_prefix("log-"))
            .and_then(|n| n.strip_suffix(".fml"))
        else {
            continue;
        };
        match u64::from_str_radix(hex, 16) {
            Ok(base) => segments.push((base, entry.path())),
            Err(_) => warn!("persistence: ignoring {}", entry.path().display()),
        }
    }
    segments.sort();
    let mut loaded = LoadedLog::default();
    let mut quarantine = Quarantine::new(store);
    // The newest complete snapshot, then the log from its base on; older
    // segments are obsolete (removed with the rest by the start-up
    // compaction).
    let found = snapshot::newest(dir, &mut quarantine, threads)?;
    loaded.quarantined += found.quarantined;
    loaded.segments.extend(found.files);
    loaded.next_base = found.highest_base + u64::from(found.highest_base > 0);
    let from = match found.chosen {
        Some((base, records)) => {
            loaded.records = records;
            loaded.snapshot = Some((base, found.chosen_size));
            base
        }
        None => 0,
    };
    loaded.log_from = match loaded.snapshot {
        Some((base, _)) => base,
        None => segments.first().map_or(0, |(base, _)| *base),
    };
    let mut damaged = false;
    for (base, path) in segments {
        if base < from {
            loaded.segments.push(path);
            continue;
        }
        // LSNs only grow: a new segment starts after every one found.
        loaded.next_base = loaded.next_base.max(base + 1);
        if damaged {
            quarantine.keep(&path, true);
            loaded.quarantined += 1;
            continue;
        }
        let data = match fs::read(&path) {
            Ok(data) if data.is_empty() => {
                // Created by a journal that stopped before its first write.
                loaded.next_base = loaded.next_base.max(base + 1);
                loaded.segments.push(path);
                continue;
            }
            Ok(data) => data,
            Err(e) => {
                warn!(
                    "persistence: cannot read {}: {e}; moved aside",
                    path.display()
                );
                quarantine.keep(&path, true);
                loaded.quarantined += 1;
                damaged = true;
                continue;
            }
        };
        loaded.next_base = loaded.next_base.max(base + data.len() as u64 + 1);
        match Header::decode(&data) {
            Ok(_) => {}
            Err(HeaderError::Newer(_)) => {
                return Err(StoreError::Newer {
                    why: HeaderError::Newer(u16::from_le_bytes([data[8], data[9]])).to_string(),
                    path,
                });
            }
            Err(e) => {
                warn!("persistence: {}: {e}; moved aside", path.display());
                quarantine.keep(&path, true);
                loaded.quarantined += 1;
                damaged = true;
                continue;
            }
        }
        let (records, valid, bad) =
            read_records_on(&data[HEADER_LEN..], threads).map_err(|source| {
                StoreError::LoadThread {
                    path: path.clone(),
                    source,
                }
            })?;
        loaded.bytes += valid as u64;
        loaded.records.extend(records);
        if let Some((offset, why)) = bad {
            warn!(
                "persistence: {} is damaged at byte {} ({why}); loaded what came before, the file is copied aside",
                path.display(),
                offset + HEADER_LEN
            );
            quarantine.keep(&path, false);
            truncate(&path, (HEADER_LEN + valid) as u64);
            loaded.quarantined += 1;
            damaged = true;
        }
        loaded.segments.push(path);
    }
    Ok(loaded)
}

/// Cuts the damaged segment at `path` (already copied aside) to its valid
/// prefix of `len` bytes, durably: a journal that goes on after it without
/// rewriting it (the retained messages') must not find the damage again at
/// the next start, which would set the segments after it aside. A failure
/// is logged (the next start then sets aside what follows, as before).
fn truncate(path: &Path, len: u64) {
    let done = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len).and_then(|()| f.sync_all()));
    if let Err(e) = done {
        warn!(
            "persistence: cannot cut {} to its valid {len} bytes: {e}",
            path.display()
        );
    }
}

/// The records of a segment's body (the bytes after its header) up to the
/// first bad one: the records, the bytes they take, and where and why the
/// valid prefix ends if it is not the end. Never panics, whatever the bytes.
pub fn read_records(body: &[u8]) -> ReadRecords {
    // One thread: `parallel::decode` runs it on this one, so a panic there
    // unwinds through here and never comes back as an error.
    read_records_on(body, 1).unwrap_or_default()
}

/// What [`read_records`] gives: the records, the bytes they take, and where
/// and why the valid prefix ends if it is not the end.
pub type ReadRecords = (Vec<Record>, usize, Option<(usize, String)>);

/// [`read_records`] with the records decoded on up to `threads` threads.
///
/// # Errors
/// A decoding thread panicked.
pub fn read_records_on(body: &[u8], threads: usize) -> Result<ReadRecords, parallel::Panicked> {
    let (raw, end) = frame::scan(body);
    let mut bad = match end {
        End::Clean => None,
        End::Damaged { offset, why } => Some((offset, why.to_string())),
    };
    let (records, undecoded) = parallel::decode(&raw, threads)?;
    if let Some((i, e)) = undecoded {
        bad = Some((raw[i].offset, e.to_string()));
    }
    let valid = records.len().checked_sub(1).map_or(0, |last| {
        raw[last].offset + frame::RECORD_HEAD_LEN + 1 + raw[last].body.len()
    });
    Ok((records, valid, bad))
}

/// The `corrupt-<unix ms>/` directory of one load, made on first use.
struct Quarantine {
    /// Its path.
    dir: PathBuf,
    /// Whether it exists yet.
    made: bool,
}

impl Quarantine {
    fn new(store: &Path) -> Quarantine {
        Quarantine {
            dir: store.join(format!("corrupt-{}", record::unix_ms_now())),
            made: false,
        }
    }

    /// Moves (or, `moved` false, copies) `path` into the directory. A
    /// failure is logged: the load goes on either way.
    fn keep(&mut self, path: &Path, moved: bool) {
        if !self.made {
            if let Err(e) = fs::create_dir_all(&self.dir) {
                warn!("persistence: cannot create {}: {e}", self.dir.display());
            }
            self.made = true;
        }
        let name = path.file_name().unwrap_or_default();
        let parent = path.parent().and_then(Path::file_name).unwrap_or_default();
        let target = self.dir.join(format!(
            "{}-{}",
            parent.to_string_lossy(),
            name.to_string_lossy()
        ));
        let done = if moved {
            fs::rename(path, &target)
        } else {
            fs::copy(path, &target).map(|_| ())
        };
        match done {
            Ok(()) => warn!(
                "persistence: {} {} to {}",
                path.display(),
                if moved { "moved" } else { "copied" },
                target.display()
            ),
            Err(e) => warn!("persistence: cannot set {} aside: {e}", path.display()),
        }
    }
}

/// The retained messages loaded at start-up, and where shard 0's journal
/// goes on from: what every shard starts with.
#[derive(Debug)]
pub struct RetainedState {
    /// The journal directory.
    pub dir: PathBuf,
    /// Where the new segment starts.
    pub next_base: u64,
    /// The snapshot the load used (base LSN, bytes), if any.
    pub snapshot: Option<(u64, u64)>,
    /// Where the log read starts (LoadedLog::log_from).
    pub log_from: u64,
    /// The live retained messages with their stamps.
    pub retained: Vec<(u64, record::StoredMessage)>,
    /// Set while shard 0's journal cannot write; read by every shard.
    pub failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl RetainedState {
    /// Every loaded retained message, for shard `shard` of `shards`: the
    /// same set for every shard, each starting at its own place in the
    /// list (`shard`/`shards` of the way in), so that shards filling their
    /// replicas at once clone from different blocks ([`parallel::live`]
    /// packs them) instead of taking turns on the same reference counts.
    pub fn for_shard(
        &self,
        shard: usize,
        shards: usize,
    ) -> impl Iterator<Item = &(u64, record::StoredMessage)> {
        let from = self.retained.len() * shard.min(shards) / shards.max(1);
        let (head, tail) = self.retained.split_at(from);
        // Its size hint is exact: `RetainStore::restore` reserves by it.
        tail.iter().chain(head)
    }
}

impl Store {
    /// Reads the retained messages' journal (at start-up, before any shard
    /// runs) on up to `threads` threads ([`parallel`]: each file's records
    /// decoded in ranges, the replay split by topic) and logs what it found
    /// and how long it took.
    ///
    /// # Errors
    /// See [`load_log_on`].
    pub fn load_retained(&self, threads: usize) -> Result<RetainedState, StoreError> {
        let started = Instant::now();
        let dir = self.dir.join(RETAINED_DIR);
        let mut loaded = load_log_on(&self.dir, &dir, threads)?;
        let read_in = started.elapsed();
        let records = std::mem::take(&mut loaded.records);
        let count = records.len();
        let used = parallel::threads_for(count, threads);
        let retained =
            parallel::live(records, threads).map_err(|source| StoreError::LoadThread {
                path: dir.clone(),
                source,
            })?;
        info!(
            "persistence: {}: {} retained messages from {count} records ({} bytes, {} segments, {} files set aside) in {:?} on {used} thread{} (read and decoded in {read_in:?})",
            dir.display(),
            retained.len(),
            loaded.bytes,
            loaded.segments.len(),
            loaded.quarantined,
            started.elapsed(),
            if used == 1 { "" } else { "s" },
        );
        Ok(RetainedState {
            dir,
            next_base: loaded.next_base,
            snapshot: loaded.snapshot,
            log_from: loaded.log_from,
            retained,
            failing: std::sync::Arc::default(),
        })
    }
}

/// The directory of shard `shard`'s session journal.
pub fn shard_dir(store: &Path, shard: usize) -> PathBuf {
    store.join(format!("shard-{shard}"))
}

/// One persistent session found at start-up.
#[derive(Clone, Debug)]
pub struct LoadedSession {
    /// Its latest image (`queued` as the image had it).
    pub session: record::StoredSession,
    /// The messages queued for it, oldest first, with their ids and the
    /// QoS it gets them at.
    pub queued: Vec<(u64, record::StoredMessage, crate::protocol::v3::QoS)>,
    /// Its outgoing messages in flight and incoming QoS 2 ids awaiting
    /// PUBREL.
    pub flows: flows::LoadedFlows,
    /// Its will, if one was owed or waiting for its delay.
    pub will: Option<record::StoredWill>,
}

/// The persistent sessions found in every shard's journal, read one
/// directory after the other ([`Store::load_sessions`], the tests' whole
/// view of a store; at start-up each shard loads its own, [`startup`]).
#[cfg(test)]
#[derive(Debug, Default)]
pub struct LoadedSessions {
    /// The live sessions: per client id the image with the highest stamp,
    /// unless a drop came later or its Session Expiry Interval has passed;
    /// each with the messages it had queued (its image's, then those queued
    /// for it after the image), expired ones left out.
    pub sessions: Vec<LoadedSession>,
    /// Sessions found expired at load.
    pub expired: usize,
    /// Sessions found expired at load that are loaded all the same, to end
    /// right after the start: their shared subscriptions' messages go to
    /// other members then.
    pub ending: usize,
    /// Every segment read (of every `shard-*` directory).
    pub segments: Vec<PathBuf>,
    /// Where new segments start (after every one found).
    pub next_base: u64,
}

#[cfg(test)]
impl Store {
    /// Reads every `shard-*/` journal, one after the other (a broker with
    /// another shard count wrote some of them: sessions are placed by
    /// client id afterwards), and logs what it found and how long it took.
    /// A session online at the crash counts as offline from `now_unix_ms`.
    /// At start-up each shard does the same for its own directories, in
    /// parallel ([`startup`]).
    ///
    /// # Errors
    /// See [`load_log`].
    pub fn load_sessions(&self, now_unix_ms: u64) -> Result<LoadedSessions, StoreError> {
        let started = Instant::now();
        let mut out = LoadedSessions::default();
        let mut found = Vec::new();
        let mut records = 0usize;
        for dir in startup::session_dirs(&self.dir, 0, 1)? {
            let read = startup::read_sessions(&self.dir, &dir, now_unix_ms)?;
            out.next_base = out.next_base.max(read.next_base);
            out.segments.extend(read.segments);
            records += read.records;
            found.extend(read.found);
        }
        let picked = startup::pick(found);
        out.sessions = picked.sessions;
        out.expired = picked.expired;
        out.ending = picked.ending;
        info!(
            "persistence: {} persistent sessions from {records} records of {} segments ({} expired while the broker was down) in {:?}",
            out.sessions.len(),
            out.segments.len(),
            out.expired,
            started.elapsed()
        );
        Ok(out)
    }
}

/// The retained messages that a replay of `records` leaves: per topic the
/// update with the highest stamp (as `RetainStore::apply` keeps it, so the
/// order of the records does not matter), deletes left out. On this
/// thread (the tests'); [`parallel::live`] splits it over several.
#[cfg(test)]
pub fn live_retained(records: Vec<Record>) -> Vec<(u64, record::StoredMessage)> {
    // One part: `parallel::live` runs it on this thread, so a panic there
    // unwinds through here and never comes back as an error.
    parallel::live(records, 1).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::v3::QoS;
    use crate::store::journal::segment_path;
    use crate::store::record::StoredMessage;
    use bytes::Bytes;
    use bytestring::ByteString;

    pub(super) fn retain(stamp: u64, topic: &str, payload: &'static [u8]) -> Record {
        retain_bytes(stamp, topic, Bytes::from_static(payload))
    }

    /// A retained QoS 1 update of `topic` to `payload`, stamped `stamp`.
    fn retain_bytes(stamp: u64, topic: &str, payload: Bytes) -> Record {
        Record::Retain(
            stamp,
            StoredMessage {
                qos: QoS::AtLeastOnce,
                retain: true,
                expires_unix_ms: 0,
                topic: ByteString::from(topic),
                properties: Default::default(),
                payload,
            },
        )
    }

    /// A segment at `base` holding `records`.
    pub(super) fn segment(base: u64, records: &[Record]) -> Vec<u8> {
        let mut out = Header {
            version: frame::FORMAT_VERSION,
            shard: frame::RETAINED_SHARD,
            shards: 1,
            base_lsn: base,
        }
        .encode()
        .to_vec();
        for r in records {
            frame::append_record(&mut out, r.kind(), |b| r.encode_body(b));
        }
        out
    }

    fn payloads(loaded: LoadedLog) -> Vec<(String, Bytes)> {
        let mut got: Vec<(String, Bytes)> = live_retained(loaded.records)
            .into_iter()
            .map(|(_, m)| (m.topic.to_string(), m.payload))
            .collect();
        got.sort();
        got
    }

    #[test]
    fn open_locks_writes_format_and_refuses_a_second_broker_or_a_newer_format() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).expect("opens");
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Locked(_))
        ));
        drop(store);
        Store::open(dir.path()).expect("lock released with the first");
        fs::write(dir.path().join("FORMAT"), "fanmq-store 2\n").unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("newer fanmq"), "{err}");
        let missing = dir.path().join("nope");
        let err = Store::open(&missing).unwrap_err();
        assert!(err.to_string().contains("persistence_location"), "{err}");
    }

    #[test]
    fn replay_keeps_the_highest_stamp_per_topic_and_drops_deletes() {
        let records = vec![
            retain(3 << 16, "a", b"new"),
            retain(2 << 16, "a", b"old"),
            retain(4 << 16, "b", b"b"),
            Record::RetainDelete(5 << 16, ByteString::from("b")),
            retain(1 << 16, "c", b"c"),
        ];
        let mut live: Vec<_> = live_retained(records)
            .into_iter()
            .map(|(s, m)| (s, m.payload))
            .collect();
        live.sort();
        assert_eq!(
            live,
            vec![
                (1 << 16, Bytes::from_static(b"c")),
                (3 << 16, Bytes::from_static(b"new"))
            ]
        );
    }

    #[test]
    fn garbage_after_the_records_keeps_the_valid_prefix_and_sets_the_file_aside() {
        let store = tempfile::tempdir().unwrap();
        let dir = store.path().join(RETAINED_DIR);
        fs::create_dir_all(&dir).unwrap();
        let mut first = segment(0, &[retain(1 << 16, "a", b"1"), retain(2 << 16, "b", b"2")]);
        first.extend_from_slice(b"garbage \x01\x02 after the records");
        fs::write(segment_path(&dir, 0), &first).unwrap();
        // A later segment after the damage is moved aside, not read.
        fs::write(
            segment_path(&dir, 1000),
            segment(1000, &[retain(3 << 16, "c", b"3")]),
        )
        .unwrap();
        let loaded = load_log(store.path(), &dir).expect("loads");
        assert_eq!(loaded.quarantined, 2);
        assert_eq!(loaded.segments, vec![segment_path(&dir, 0)]);
        assert!(loaded.next_base > 1000);
        assert_eq!(
            payloads(loaded),
            vec![
                ("a".to_string(), Bytes::from_static(b"1")),
                ("b".to_string(), Bytes::from_static(b"2"))
            ]
        );
        let aside: Vec<_> = fs::read_dir(store.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert_eq!(fs::read_dir(aside[0].path()).unwrap().count(), 2);
    }

    #[test]
    fn a_torn_header_an_empty_segment_and_random_files_never_stop_the_load() {
        let store = tempfile::tempdir().unwrap();
        let dir = store.path().join(RETAINED_DIR);
        fs::create_dir_all(&dir).unwrap();
        fs::write(segment_path(&dir, 0), segment(0, &[retain(1, "a", b"1")])).unwrap();
        fs::write(segment_path(&dir, 100), b"").unwrap();
        fs::write(segment_path(&dir, 200), &segment(200, &[])[..10]).unwrap();
        fs::write(dir.join("notes.txt"), b"not a segment").unwrap();
        let loaded = load_log(store.path(), &dir).expect("loads");
        assert_eq!(loaded.quarantined, 1, "the torn header");
        assert_eq!(
            payloads(loaded),
            vec![("a".to_string(), Bytes::from_static(b"1"))]
        );
        let mut rng = crate::test_rng::XorShift(0xD15C);
        for round in 0..200 {
            let len = (rng.next() % 300) as usize;
            let mut data = segment(0, &[retain(1, "a", b"1")]);
            if round % 2 == 0 {
                data.truncate(len.min(data.len()));
            }
            data.extend((0..len).map(|_| rng.next() as u8));
            fs::write(segment_path(&dir, 0), &data).unwrap();
            let _ = load_log(store.path(), &dir).expect("never fails on damage");
        }
    }

    #[test]
    fn a_segment_of_a_newer_format_is_refused() {
        let store = tempfile::tempdir().unwrap();
        let dir = store.path().join(RETAINED_DIR);
        fs::create_dir_all(&dir).unwrap();
        let newer = Header {
            version: frame::FORMAT_VERSION + 1,
            shard: 0,
            shards: 1,
            base_lsn: 0,
        };
        fs::write(segment_path(&dir, 0), newer.encode()).unwrap();
        let err = load_log(store.path(), &dir).unwrap_err();
        assert!(err.to_string().contains("newer fanmq"), "{err}");
    }

    /// Records enough for [`parallel::MIN_RECORDS_PER_THREAD`] to give
    /// four threads.
    const MANY: usize = 4 * parallel::MIN_RECORDS_PER_THREAD + 123;

    /// `n` retained updates from stamp `first` on, to `topics` topics
    /// (every 7th a delete), payloads naming the stamp.
    fn updates(first: u64, n: usize, topics: usize) -> Vec<Record> {
        (0..n)
            .map(|i| {
                let stamp = (first + i as u64) << 16;
                let topic = format!("t/{}", i % topics);
                if i % 7 == 3 {
                    Record::RetainDelete(stamp, ByteString::from(topic))
                } else {
                    retain_bytes(stamp, &topic, Bytes::from(format!("payload {stamp}")))
                }
            })
            .collect()
    }

    /// A snapshot file at `base` holding `records`, with its end frame.
    fn snapshot_file(base: u64, records: &[Record]) -> Vec<u8> {
        let mut out = segment(base, records);
        let count = records.len() as u64;
        frame::append_record(&mut out, snapshot::SNAPSHOT_END, |b| {
            b.extend_from_slice(&count.to_le_bytes());
        });
        out
    }

    /// A topic, a stamp and a payload of the live set.
    type Live = Vec<(String, u64, Bytes)>;

    /// What `load_retained` on `threads` threads gives: the live set by
    /// topic, and the state.
    fn retained_on(store: &Path, threads: usize) -> (Live, RetainedState) {
        let opened = Store::open(store).expect("opens");
        let state = opened.load_retained(threads).expect("loads");
        let mut got: Live = state
            .retained
            .iter()
            .map(|(stamp, m)| (m.topic.to_string(), *stamp, m.payload.clone()))
            .collect();
        got.sort();
        (got, state)
    }

    /// Copies the directory tree at `from` to `to`.
    fn copy_tree(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap().filter_map(Result::ok) {
            let target = to.join(entry.file_name());
            if entry.path().is_dir() {
                copy_tree(&entry.path(), &target);
            } else {
                fs::copy(entry.path(), &target).unwrap();
            }
        }
    }

    /// Files set aside in `corrupt-*/` directories of `store`.
    fn set_aside(store: &Path) -> usize {
        fs::read_dir(store)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("corrupt-"))
            .map(|e| fs::read_dir(e.path()).unwrap().count())
            .sum()
    }

    /// The names and sizes of the files in `store`'s `retained/`.
    fn listing(store: &Path) -> Vec<(String, u64)> {
        let mut names: Vec<(String, u64)> = fs::read_dir(store.join(RETAINED_DIR))
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| {
                let len = e.metadata().unwrap().len();
                (e.file_name().to_string_lossy().into_owned(), len)
            })
            .collect();
        names.sort();
        names
    }

    /// Loads a copy of the store at `store` on 1 thread and another on 4:
    /// both give the same live set, cut and set aside the same files;
    /// returns the live set and the number of files set aside.
    fn same_on_one_and_four(store: &Path) -> (Live, usize) {
        let scratch = tempfile::tempdir().unwrap();
        let one = scratch.path().join("one");
        let four = scratch.path().join("four");
        copy_tree(store, &one);
        copy_tree(store, &four);
        let (serial, serial_state) = retained_on(&one, 1);
        let (parallel, parallel_state) = retained_on(&four, 4);
        assert_eq!(serial, parallel, "the same retained set");
        assert_eq!(serial_state.next_base, parallel_state.next_base);
        assert_eq!(serial_state.log_from, parallel_state.log_from);
        assert_eq!(serial_state.snapshot, parallel_state.snapshot);
        assert_eq!(listing(&one), listing(&four), "the same files, cut alike");
        assert_eq!(
            set_aside(&one),
            set_aside(&four),
            "the same files set aside"
        );
        (parallel, set_aside(&four))
    }

    /// A store with a snapshot of `MANY` updates at 1000 and two segments
    /// after it; returns the `(base, bytes)` of the segments.
    fn big_store(store: &Path) -> Vec<(u64, Vec<u8>)> {
        let dir = store.join(RETAINED_DIR);
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            snapshot::snapshot_path(&dir, 1000),
            snapshot_file(1000, &updates(1, MANY, MANY / 2)),
        )
        .unwrap();
        let segments = vec![
            (
                1000,
                segment(1000, &updates(MANY as u64 + 1, MANY, MANY / 3)),
            ),
            (
                9_000_000,
                segment(9_000_000, &updates(2 * MANY as u64 + 1, MANY, MANY)),
            ),
        ];
        for (base, data) in &segments {
            fs::write(segment_path(&dir, *base), data).unwrap();
        }
        segments
    }

    #[test]
    fn several_threads_load_the_same_retained_set_as_one() {
        let store = tempfile::tempdir().unwrap();
        big_store(store.path());
        let (live, aside) = same_on_one_and_four(store.path());
        assert_eq!(aside, 0);
        let deletes = (0..MANY).filter(|i| i % 7 == 3).count();
        assert_eq!(
            live.len(),
            MANY - deletes,
            "each topic's newest, deletes left out"
        );
        // Every topic's newest update is in the last segment.
        assert!(
            live.iter()
                .all(|(_, stamp, _)| *stamp > (2 * MANY as u64) << 16)
        );
    }

    #[test]
    fn a_torn_tail_loads_the_valid_prefix_on_several_threads() {
        let store = tempfile::tempdir().unwrap();
        let segments = big_store(store.path());
        let (base, data) = &segments[1];
        // Cut in the middle of the last record.
        let path = segment_path(&store.path().join(RETAINED_DIR), *base);
        fs::write(&path, &data[..data.len() - 9]).unwrap();
        let (live, aside) = same_on_one_and_four(store.path());
        assert_eq!(aside, 1, "the torn segment copied aside");
        let last_stamp = ((3 * MANY) as u64) << 16;
        assert!(
            !live.iter().any(|(_, stamp, _)| *stamp == last_stamp),
            "the torn record is gone"
        );
        assert!(
            live.iter()
                .any(|(_, stamp, _)| *stamp == last_stamp - (1 << 16))
        );
    }

    /// The first segment of `big_store` with its record `index` made
    /// undecodable (QoS 3) under a checksum that holds.
    fn undecodable(data: &[u8], index: usize) -> Vec<u8> {
        let (raw, _) = frame::scan(&data[HEADER_LEN..]);
        let mut out = data.to_vec();
        let at = raw[index].offset + HEADER_LEN;
        assert_eq!(out[at + frame::RECORD_HEAD_LEN], record::kind::RETAIN);
        // After its len, crc, kind and stamp: the QoS byte.
        out[at + frame::RECORD_HEAD_LEN + 1 + 8] = 3;
        let len = u32::from_le_bytes([out[at], out[at + 1], out[at + 2], out[at + 3]]) as usize;
        let body = at + frame::RECORD_HEAD_LEN;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[at..at + 4]), &out[body..body + len]);
        out[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        out
    }

    #[test]
    fn a_corrupt_record_in_the_middle_keeps_what_came_before_and_sets_the_rest_aside() {
        let store = tempfile::tempdir().unwrap();
        let segments = big_store(store.path());
        let dir = store.path().join(RETAINED_DIR);
        let (base, data) = &segments[0];
        let (raw, _) = frame::scan(&data[HEADER_LEN..]);
        // A bit flipped in a record's payload, in the third of four
        // threads' ranges of the first segment: its checksum fails.
        let index = 3 * MANY / 4 - 10;
        let mut damaged = data.clone();
        damaged[raw[index].offset + HEADER_LEN + raw[index].body.len()] ^= 0x10;
        fs::write(segment_path(&dir, *base), &damaged).unwrap();
        let (live, aside) = same_on_one_and_four(store.path());
        assert_eq!(aside, 2, "the damaged segment copied, the later one moved");
        let first = (MANY as u64 + 1) << 16;
        let damaged_stamp = first + ((index as u64) << 16);
        assert!(live.iter().all(|(_, stamp, _)| *stamp < damaged_stamp));
        assert!(
            live.iter()
                .any(|(_, stamp, _)| *stamp == damaged_stamp - (1 << 16))
        );

        // A record whose checksum holds but that does not decode, in the
        // second thread's range: the same, by the decode.
        let fresh = tempfile::tempdir().unwrap();
        big_store(fresh.path());
        let index = MANY / 3 + 1;
        let index = if index % 7 == 3 { index + 1 } else { index };
        fs::write(
            segment_path(&fresh.path().join(RETAINED_DIR), *base),
            undecodable(data, index),
        )
        .unwrap();
        let (live, aside) = same_on_one_and_four(fresh.path());
        assert_eq!(aside, 2);
        let bad_stamp = first + ((index as u64) << 16);
        assert!(live.iter().all(|(_, stamp, _)| *stamp < bad_stamp));
        assert!(
            live.iter()
                .any(|(_, stamp, _)| *stamp == bad_stamp - (1 << 16))
        );
    }

    #[test]
    fn a_damaged_snapshot_falls_back_alike_on_several_threads() {
        let store = tempfile::tempdir().unwrap();
        big_store(store.path());
        let dir = store.path().join(RETAINED_DIR);
        let (whole, _) = same_on_one_and_four(store.path());
        // A newer snapshot (naming a base no log starts at) whose record
        // in its second half does not decode: set aside, the older
        // snapshot and its log load.
        let newer = snapshot_file(9_500_000, &updates(1, MANY, MANY));
        fs::write(
            snapshot::snapshot_path(&dir, 9_500_000),
            undecodable(&newer, MANY / 2 + 2),
        )
        .unwrap();
        let (live, aside) = same_on_one_and_four(store.path());
        assert_eq!(aside, 1, "the damaged snapshot set aside");
        assert_eq!(live, whole, "the older snapshot and its log");
    }

    #[test]
    fn a_newer_format_refuses_the_load_on_several_threads() {
        let store = tempfile::tempdir().unwrap();
        let segments = big_store(store.path());
        let dir = store.path().join(RETAINED_DIR);
        let mut newer = segments[1].1.clone();
        newer[8..10].copy_from_slice(&(frame::FORMAT_VERSION + 1).to_le_bytes());
        let crc = crc32c::crc32c(&newer[..24]);
        newer[24..28].copy_from_slice(&crc.to_le_bytes());
        fs::write(segment_path(&dir, segments[1].0), &newer).unwrap();
        let opened = Store::open(store.path()).unwrap();
        let err = opened.load_retained(4).unwrap_err();
        assert!(err.to_string().contains("newer fanmq"), "{err}");
    }

    #[test]
    fn an_empty_journal_loads_nothing_on_several_threads() {
        let store = tempfile::tempdir().unwrap();
        let (live, state) = retained_on(store.path(), 4);
        assert!(live.is_empty());
        assert_eq!((state.next_base, state.snapshot), (0, None));
        // A segment created by a journal that stopped before its first
        // write, and one with a header only.
        let dir = store.path().join(RETAINED_DIR);
        fs::write(segment_path(&dir, 0), b"").unwrap();
        fs::write(segment_path(&dir, 10), segment(10, &[])).unwrap();
        let (live, aside) = same_on_one_and_four(store.path());
        assert!(live.is_empty());
        assert_eq!(aside, 0);
    }

    #[test]
    fn every_shard_gets_the_same_retained_set_each_from_its_own_place() {
        let store = tempfile::tempdir().unwrap();
        big_store(store.path());
        let (live, state) = retained_on(store.path(), 4);
        for shards in [1, 2, 3, 8] {
            let mut firsts = Vec::new();
            for shard in 0..shards {
                let iter = state.for_shard(shard, shards);
                assert_eq!(iter.size_hint(), (live.len(), Some(live.len())));
                let mut got: Live = iter
                    .map(|(stamp, m)| (m.topic.to_string(), *stamp, m.payload.clone()))
                    .collect();
                firsts.push(got[0].clone());
                got.sort();
                assert_eq!(got, live, "shard {shard} of {shards}");
            }
            firsts.sort();
            firsts.dedup();
            assert_eq!(firsts.len(), shards, "each shard starts elsewhere");
        }
    }
}
