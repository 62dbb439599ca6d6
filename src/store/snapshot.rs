//! Snapshots of a journal while the broker runs (docs/design/persistence.md
//! §5.4, "What is built"): a shard whose log since its last snapshot grew
//! past `persistence_snapshot_log_bytes` starts a new segment
//! (`Journal::rotate`, at LSN `base`), writes what is live into
//! `snap-<base>.fms.tmp` in chunks (the walk over its state is the caller's,
//! yielding between chunks), ends it with a [`SNAPSHOT_END`] frame, syncs
//! it, renames it to `snap-<base>.fms` and syncs the directory. The
//! snapshot plus the segments from `base` on then hold everything, so the
//! files older than the *previous* snapshot are removed ([`remove_before`]):
//! two snapshots are kept with the log since the older one, and a damaged
//! newest snapshot falls back to the previous one and its log.
//!
//! A snapshot file has a segment's header and framing (a checksum per
//! record); it is complete only with its [`SNAPSHOT_END`] frame, which
//! counts the records before it. A crash while writing leaves the `.tmp`
//! file, which the next load removes; a snapshot file without its end frame
//! or with a bad record is set aside and the previous one is used.

use std::fs;
use std::path::{Path, PathBuf};

use glommio::io::{BufferedFile, OpenOptions};
use log::warn;

use crate::store::frame::{self, FORMAT_VERSION, HEADER_LEN, Header};
use crate::store::journal::{Lsn, sync_dir};
use crate::store::record::Record;
use crate::store::{Quarantine, StoreError, parallel};

/// Kind byte of the frame that ends a complete snapshot; its body is the
/// number of records before it (u64). Read here only, never a `Record`.
pub const SNAPSHOT_END: u8 = 0x7F;

/// Bytes a snapshot collects before it writes them: large enough that the
/// writes are few, small enough that a chunk's encoding is short.
pub const WRITE_CHUNK: usize = 1024 * 1024;

/// The path of the snapshot of the log from `base` on.
pub fn snapshot_path(dir: &Path, base: Lsn) -> PathBuf {
    dir.join(format!("snap-{base:016x}.fms"))
}

/// The base LSN a file name `prefix-<16 hex>.suffix` names.
fn base_of(name: &str, prefix: &str, suffix: &str) -> Option<Lsn> {
    let hex = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    u64::from_str_radix(hex, 16).ok()
}

/// A snapshot being written: records are framed into a buffer and written
/// with glommio's buffered file (the shard's io_uring) every
/// [`WRITE_CHUNK`] bytes.
pub struct SnapshotWriter {
    /// The file being written (`snap-<base>.fms.tmp`).
    file: BufferedFile,
    /// Its path.
    tmp: PathBuf,
    /// Where it goes once complete.
    path: PathBuf,
    /// Bytes written so far.
    pos: u64,
    /// Framed records not yet written.
    buf: Vec<u8>,
    /// Records appended.
    records: u64,
}

impl SnapshotWriter {
    /// Creates `snap-<base>.fms.tmp` in `dir`, its header naming
    /// `shard` of `shards`.
    ///
    /// # Errors
    /// The file cannot be created.
    pub async fn create(
        dir: &Path,
        base: Lsn,
        shard: u16,
        shards: u16,
    ) -> std::io::Result<SnapshotWriter> {
        let path = snapshot_path(dir, base);
        let tmp = path.with_extension("fms.tmp");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .buffered_open(&tmp)
            .await?;
        let mut buf = Vec::with_capacity(WRITE_CHUNK + 64 * 1024);
        buf.extend_from_slice(
            &Header {
                version: FORMAT_VERSION,
                shard,
                shards,
                base_lsn: base,
            }
            .encode(),
        );
        Ok(SnapshotWriter {
            file,
            tmp,
            path,
            pos: 0,
            buf,
            records: 0,
        })
    }

    /// Appends `record`.
    pub fn append(&mut self, record: &Record) {
        frame::append_record(&mut self.buf, record.kind(), |out| record.encode_body(out));
        self.records += 1;
    }

    /// Bytes framed and not yet written.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Writes what is buffered once it reaches [`WRITE_CHUNK`].
    ///
    /// # Errors
    /// The write failed (the caller abandons the snapshot).
    pub async fn flush_if_full(&mut self) -> std::io::Result<()> {
        if self.buf.len() >= WRITE_CHUNK {
            self.write_buffered().await?;
        }
        Ok(())
    }

    /// Writes everything buffered.
    async fn write_buffered(&mut self) -> std::io::Result<()> {
        while !self.buf.is_empty() {
            let n = self.file.write_at(self.buf.clone(), self.pos).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "snapshot write wrote nothing",
                ));
            }
            self.pos += n as u64;
            self.buf.drain(..n);
        }
        Ok(())
    }

    /// Ends the snapshot: the end frame, the last write, `fdatasync`, the
    /// rename and the directory sync. Returns its size in bytes.
    ///
    /// # Errors
    /// Any of those failed; the `.tmp` file is removed then.
    pub async fn finish(mut self) -> std::io::Result<u64> {
        let records = self.records;
        frame::append_record(&mut self.buf, SNAPSHOT_END, |out| {
            out.extend_from_slice(&records.to_le_bytes());
        });
        let done = async {
            self.write_buffered().await?;
            self.file.fdatasync().await?;
            Ok::<(), std::io::Error>(())
        }
        .await;
        let _ = self.file.close().await;
        if let Err(e) = done.and_then(|()| fs::rename(&self.tmp, &self.path)) {
            let _ = fs::remove_file(&self.tmp);
            return Err(e);
        }
        if let Some(dir) = self.path.parent() {
            sync_dir(dir);
        }
        Ok(self.pos)
    }

    /// Gives up: closes and removes the `.tmp` file.
    pub async fn abandon(self) {
        let _ = self.file.close().await;
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Removes from `dir` the segments and snapshots older than `cutoff` (the
/// base of the previous snapshot, which with the log after it stays as the
/// fallback). A failure is logged; the next snapshot tries again.
pub fn remove_before(dir: &Path, cutoff: Lsn) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let base = base_of(name, "log-", ".fml").or_else(|| base_of(name, "snap-", ".fms"));
        if base.is_some_and(|b| b < cutoff)
            && let Err(e) = fs::remove_file(entry.path())
        {
            warn!("persistence: cannot remove {}: {e}", entry.path().display());
        }
    }
}

/// The records of a snapshot file (decoded on up to `threads` threads), or
/// why it is not usable (the inner error); the outer error is a decoding
/// thread's panic (a bug, not damage: the file is not set aside for it).
fn read_snapshot(
    data: &[u8],
    threads: usize,
) -> Result<Result<(Lsn, Vec<Record>), String>, parallel::Panicked> {
    let header = match Header::decode(data) {
        Ok(header) => header,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let (raw, end) = frame::scan(&data[HEADER_LEN..]);
    if let frame::End::Damaged { offset, why } = end {
        return Ok(Err(format!("{why} at byte {}", offset + HEADER_LEN)));
    }
    let Some((last, body)) = raw.split_last() else {
        return Ok(Err("no records, not even its end".to_string()));
    };
    let count = <[u8; 8]>::try_from(last.body).ok().map(u64::from_le_bytes);
    if last.kind != SNAPSHOT_END || count != Some(body.len() as u64) {
        return Ok(Err(
            "incomplete: no end frame counting its records".to_string()
        ));
    }
    Ok(match parallel::decode(body, threads)? {
        (records, None) => Ok((header.base_lsn, records)),
        (_, Some((i, e))) => Err(format!("{e} at byte {}", body[i].offset + HEADER_LEN)),
    })
}

/// What [`newest`] found in a journal directory.
#[derive(Debug, Default)]
pub struct Found {
    /// The newest complete snapshot: the base LSN of the log after it, and
    /// its records.
    pub chosen: Option<(Lsn, Vec<Record>)>,
    /// The size in bytes of the chosen snapshot's file.
    pub chosen_size: u64,
    /// Every snapshot file left in the directory (to remove once what they
    /// hold is in a newer file).
    pub files: Vec<PathBuf>,
    /// Damaged snapshots set aside.
    pub quarantined: usize,
    /// The highest base LSN named by a snapshot file (LSNs only grow).
    pub highest_base: Lsn,
}

/// Finds the newest complete snapshot in `dir`: a damaged newer one is
/// moved aside (to the load's `corrupt-<ms>/`) with a warning and the one
/// before it is used; leftover `.tmp` files (a crash while writing) are
/// removed.
///
/// Its records are decoded on up to `threads` threads.
///
/// # Errors
/// A snapshot written by a newer fanmq.
pub(super) fn newest(
    dir: &Path,
    quarantine: &mut Quarantine,
    threads: usize,
) -> Result<Found, StoreError> {
    let mut found = Found::default();
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(found);
    };
    let mut snapshots: Vec<(Lsn, PathBuf)> = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("snap-") && name.ends_with(".fms.tmp") {
            let _ = fs::remove_file(entry.path());
        } else if let Some(base) = base_of(name, "snap-", ".fms") {
            snapshots.push((base, entry.path()));
        }
    }
    snapshots.sort();
    while let Some((base, path)) = snapshots.pop() {
        found.highest_base = found.highest_base.max(base);
        let mut size = 0;
        let read = match fs::read(&path) {
            Ok(data) => {
                size = data.len() as u64;
                if let Err(e @ frame::HeaderError::Newer(_)) = Header::decode(&data) {
                    return Err(StoreError::Newer {
                        path,
                        why: e.to_string(),
                    });
                }
                read_snapshot(&data, threads).map_err(|source| StoreError::LoadThread {
                    path: path.clone(),
                    source,
                })?
            }
            Err(e) => Err(e.to_string()),
        };
        match read {
            Ok((header_base, records)) if header_base == base => {
                found.chosen = Some((base, records));
                found.chosen_size = size;
                found.files.push(path);
                found
                    .files
                    .extend(snapshots.drain(..).map(|(_, older)| older));
                break;
            }
            other => {
                let why = other
                    .err()
                    .unwrap_or_else(|| "names another LSN".to_string());
                warn!(
                    "persistence: snapshot {} is damaged ({why}); using the one before it and the log after that",
                    path.display()
                );
                quarantine.keep(&path, true);
                found.quarantined += 1;
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use bytestring::ByteString;

    use super::*;
    use crate::config::SyncMode;
    use crate::store::journal::{Journal, commit_loop, segment_path};
    use crate::store::{live_retained, load_log};

    fn retain(stamp: u64, topic: &str, payload: &'static str) -> Record {
        crate::store::tests::retain(stamp, topic, payload.as_bytes())
    }

    /// What a replay of `dir` leaves: topic and payload, sorted.
    fn live(store: &Path, dir: &Path) -> (Vec<(String, String)>, LoadedLogSummary) {
        let loaded = load_log(store, dir).expect("loads");
        let summary = LoadedLogSummary {
            segments: loaded.segments.len(),
            quarantined: loaded.quarantined,
        };
        let mut got: Vec<_> = live_retained(loaded.records)
            .into_iter()
            .map(|(_, m)| {
                (
                    m.topic.to_string(),
                    String::from_utf8_lossy(&m.payload).to_string(),
                )
            })
            .collect();
        got.sort();
        (got, summary)
    }

    /// Files of a load, counted.
    #[derive(Debug, PartialEq, Eq)]
    struct LoadedLogSummary {
        /// Segments and snapshots read or made obsolete.
        segments: usize,
        /// Files set aside.
        quarantined: usize,
    }

    /// Runs `f` on a glommio executor of its own.
    fn on_glommio<F: std::future::Future<Output = ()> + 'static>(
        f: impl FnOnce() -> F + Send + 'static,
    ) {
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move { f().await })
            .expect("executor")
            .join()
            .expect("runs");
    }

    /// A store directory with its `retained/` journal directory: the
    /// directory (removed when dropped), and the paths of both.
    fn retained_dir() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let store = tempfile::tempdir().unwrap();
        let dir = store.path().join("retained");
        fs::create_dir_all(&dir).unwrap();
        let path = store.path().to_path_buf();
        (store, path, dir)
    }

    /// A journal in `dir` with its commit task; `stop` ends the task.
    fn journal(dir: &Path) -> (Rc<Journal>, Arc<AtomicBool>) {
        journal_at(dir, 0)
    }

    /// [`journal`] with its first segment at `base`.
    fn journal_at(dir: &Path, base: Lsn) -> (Rc<Journal>, Arc<AtomicBool>) {
        let journal = Rc::new(Journal::new(
            dir,
            0,
            1,
            base,
            SyncMode::Ack,
            Duration::from_secs(1),
            Vec::new(),
            Arc::default(),
        ));
        (journal, Arc::default())
    }

    /// A journal that rotates, a snapshot of what is live at the rotation,
    /// and the log after it: the load reads the snapshot and the later
    /// segment only, the segments before the rotation are obsolete, and a
    /// second snapshot lets [`remove_before`] take the files before the
    /// first.
    #[test]
    fn a_load_reads_the_newest_snapshot_and_the_log_after_it() {
        let store = tempfile::tempdir().unwrap();
        let dir = store.path().join("retained");
        fs::create_dir_all(&dir).unwrap();
        let (s, d) = (store.path().to_path_buf(), dir.clone());
        on_glommio(move || async move {
            let (journal, stop) = journal(&d);
            let task = glommio::spawn_local(commit_loop(journal.clone(), stop.clone()));
            journal.append(&retain(1, "a", "a1"));
            journal.append(&retain(2, "b", "b1"));
            journal.wait_acked(journal.end_lsn()).await;
            let first = journal.rotate();
            assert_eq!(journal.rotate(), first, "one switch at a time");
            journal.append(&retain(3, "a", "a2"));
            journal.wait_acked(journal.end_lsn()).await;
            assert_eq!(journal.path(), segment_path(&d, first));
            let mut snap = SnapshotWriter::create(&d, first, 0, 1).await.unwrap();
            // What was live during the walk: "a" already replaced.
            snap.append(&retain(3, "a", "a2"));
            snap.append(&retain(2, "b", "b1"));
            assert!(snap.finish().await.unwrap() > HEADER_LEN as u64);
            journal.snapshot_written(first);
            assert!(journal.log_bytes_since_snapshot() > 0);
            journal.append(&Record::RetainDelete(4, ByteString::from("b")));
            journal.wait_acked(journal.end_lsn()).await;
            let (got, summary) = live(&s, &d);
            assert_eq!(got, vec![("a".to_string(), "a2".to_string())]);
            assert_eq!(summary.segments, 3, "the snapshot, both segments");
            // A second snapshot: the first with the log after it stays as
            // the fallback; what came before the first goes.
            let second = journal.rotate();
            journal.append(&retain(5, "c", "c1"));
            journal.wait_acked(journal.end_lsn()).await;
            let mut snap = SnapshotWriter::create(&d, second, 0, 1).await.unwrap();
            snap.append(&retain(3, "a", "a2"));
            snap.append(&retain(5, "c", "c1"));
            snap.finish().await.unwrap();
            remove_before(&d, first);
            let mut names: Vec<String> = fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .collect();
            names.sort();
            let expected = [
                segment_path(&d, first),
                segment_path(&d, second),
                snapshot_path(&d, first),
                snapshot_path(&d, second),
            ];
            let mut expected: Vec<String> = expected
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
                .collect();
            expected.sort();
            assert_eq!(names, expected);
            let (got, _) = live(&s, &d);
            assert_eq!(
                got,
                vec![
                    ("a".to_string(), "a2".to_string()),
                    ("c".to_string(), "c1".to_string())
                ]
            );
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            task.await;
        });
    }

    /// A snapshot cut at any byte, or with a byte flipped, is not used: the
    /// load falls back to the snapshot before it and the log after that,
    /// and loses nothing; a crash before the rename leaves a `.tmp` file
    /// that is removed.
    /// A start keeps the loaded snapshot and log as they are: the new
    /// journal goes on in a segment after them (nothing rewritten before
    /// serving), a torn tail of the old log is cut once (so the next start
    /// does not set the new segment aside), and the log since the snapshot
    /// counts what was already on disk.
    #[test]
    fn a_restart_goes_on_after_the_loaded_snapshot_and_log_without_rewriting_them() {
        let (_store, s, d) = retained_dir();
        on_glommio(move || async move {
            // A first run: two messages, a snapshot of them, then log.
            let (journal, stop) = journal(&d);
            let task = glommio::spawn_local(commit_loop(journal.clone(), stop.clone()));
            journal.append(&retain(1, "a", "a1"));
            journal.append(&retain(2, "b", "b1"));
            let first = journal.rotate();
            let mut snap = SnapshotWriter::create(&d, first, 0, 1).await.unwrap();
            snap.append(&retain(1, "a", "a1"));
            snap.append(&retain(2, "b", "b1"));
            let size = snap.finish().await.unwrap();
            journal.append(&retain(3, "c", "c1"));
            journal.wait_acked(journal.end_lsn()).await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            task.await;
            let old_log = journal.path();
            // Killed mid-write: a torn record at the end of the log.
            let mut torn = fs::read(&old_log).unwrap();
            torn.extend_from_slice(&[9, 0, 0, 0, 1, 2]);
            fs::write(&old_log, &torn).unwrap();
            let before = fs::read_dir(&d).unwrap().filter_map(Result::ok).count();

            // The restart: load, then a journal after what was loaded.
            let loaded = load_log(&s, &d).unwrap();
            assert_eq!(loaded.snapshot, Some((first, size)));
            assert_eq!(loaded.log_from, first);
            assert_eq!(loaded.quarantined, 1, "the torn tail is copied aside");
            let (journal, stop) = journal_at(&d, loaded.next_base);
            journal.continue_log(loaded.log_from, loaded.snapshot);
            assert!(
                journal.log_bytes_since_snapshot() > (torn.len() - 6 - HEADER_LEN) as u64,
                "the log already on disk counts towards the next snapshot"
            );
            assert_eq!(journal.loaded_snapshot(), Some((first, size)));
            let task = glommio::spawn_local(commit_loop(journal.clone(), stop.clone()));
            journal.append(&retain(4, "d", "d1"));
            journal.wait_acked(journal.end_lsn()).await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            task.await;
            assert!(snapshot_path(&d, first).exists(), "the snapshot stays");
            assert!(old_log.exists(), "the old log stays");
            let after = fs::read_dir(&d).unwrap().filter_map(Result::ok).count();
            assert_eq!(after, before + 1, "one new segment, nothing rewritten");

            // The next start reads all of it, and finds no damage now.
            let (got, summary) = live(&s, &d);
            let want = [("a", "a1"), ("b", "b1"), ("c", "c1"), ("d", "d1")];
            let want: Vec<_> = want
                .iter()
                .map(|(t, p)| (t.to_string(), p.to_string()))
                .collect();
            assert_eq!(got, want);
            assert_eq!(summary.quarantined, 0, "the torn tail was cut");
        });
    }

    #[test]
    fn a_torn_or_damaged_snapshot_falls_back_to_the_previous_one_and_its_log() {
        let store = tempfile::tempdir().unwrap();
        let dir = store.path().join("retained");
        fs::create_dir_all(&dir).unwrap();
        let frame_of = crate::store::tests::segment;
        // The previous snapshot at 100, the log after it (100..200 and
        // 200..), the newest snapshot at 200.
        let mut older = frame_of(100, &[retain(1, "a", "a1")]);
        frame::append_record(&mut older, SNAPSHOT_END, |b| {
            b.extend_from_slice(&1u64.to_le_bytes())
        });
        fs::write(snapshot_path(&dir, 100), &older).unwrap();
        fs::write(
            segment_path(&dir, 100),
            frame_of(100, &[retain(2, "b", "b1")]),
        )
        .unwrap();
        fs::write(
            segment_path(&dir, 200),
            frame_of(200, &[retain(3, "c", "c1")]),
        )
        .unwrap();
        let mut newest = frame_of(200, &[retain(1, "a", "a1"), retain(2, "b", "b1")]);
        frame::append_record(&mut newest, SNAPSHOT_END, |b| {
            b.extend_from_slice(&2u64.to_le_bytes())
        });
        let everything = vec![
            ("a".to_string(), "a1".to_string()),
            ("b".to_string(), "b1".to_string()),
            ("c".to_string(), "c1".to_string()),
        ];
        fs::write(snapshot_path(&dir, 200), &newest).unwrap();
        let (got, summary) = live(store.path(), &dir);
        assert_eq!(got, everything);
        assert_eq!(
            summary,
            LoadedLogSummary {
                segments: 4,
                quarantined: 0
            },
            "both snapshots, the obsolete segment and the one read"
        );
        let mut rng = crate::test_rng::XorShift(0x5AA9);
        for cut in (0..newest.len()).step_by(3) {
            let mut damaged = newest.clone();
            if cut % 2 == 0 {
                damaged.truncate(cut);
            } else {
                damaged[cut] ^= 1 << (rng.next() % 8);
            }
            fs::write(snapshot_path(&dir, 200), &damaged).unwrap();
            let (got, summary) = live(store.path(), &dir);
            assert_eq!(got, everything, "cut or flipped at {cut}");
            assert_eq!(summary.quarantined, 1, "cut or flipped at {cut}");
        }
        // A crash before the rename: only the .tmp, removed at load.
        fs::write(snapshot_path(&dir, 300).with_extension("fms.tmp"), &newest).unwrap();
        let (got, _) = live(store.path(), &dir);
        assert_eq!(got, everything);
        assert!(!snapshot_path(&dir, 300).with_extension("fms.tmp").exists());
    }
}
