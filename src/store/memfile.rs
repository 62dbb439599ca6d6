//! Power-loss tests of the journal: an in-memory file system behind the
//! commit task's [`SegmentFs`] that keeps what was written to each file
//! and, apart, what its last completed `fdatasync` made durable. A power
//! cut ([`MemFs::power_cut`]) keeps the durable bytes of every file and of
//! what was written after them either nothing or a torn part (a random
//! prefix, maybe followed by garbage: a sector half written); the files
//! are then loaded as a restart would ([`crate::store::load_log`]).
//!
//! Writes may be short and every operation yields first, so the cut falls
//! between any two steps of the commit task. Cut points come from the
//! seeded [`XorShift`]: every run is the same.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use futures_lite::future::yield_now;

use crate::store::journal::{SegmentFile, SegmentFs};
use crate::test_rng::XorShift;

/// One in-memory file.
#[derive(Debug, Default)]
struct Contents {
    /// What was written (the page cache).
    written: Vec<u8>,
    /// What the last completed sync made durable.
    durable: Vec<u8>,
}

/// The files, by path, and the generator of short writes.
struct Files {
    /// Every file opened and not removed.
    files: BTreeMap<PathBuf, Contents>,
    /// Chooses how much of a write goes through.
    rng: XorShift,
}

/// An in-memory file system (cloned handles share it).
#[derive(Clone)]
pub struct MemFs(Rc<RefCell<Files>>);

/// A file of a [`MemFs`].
pub struct MemFile {
    /// The file system.
    fs: MemFs,
    /// Its path.
    path: PathBuf,
}

impl MemFs {
    /// An empty file system whose short writes follow `seed`.
    pub fn new(seed: u64) -> MemFs {
        MemFs(Rc::new(RefCell::new(Files {
            files: BTreeMap::new(),
            rng: XorShift(seed | 1),
        })))
    }

    /// The power goes: each file as the disk then holds it, durable bytes
    /// first, then (`torn`) maybe a random part of what was written after
    /// them, maybe followed by random garbage. Returns them with whether
    /// garbage was added.
    pub fn power_cut(&self, rng: &mut XorShift, torn: bool) -> Vec<(PathBuf, Vec<u8>, bool)> {
        let files = self.0.borrow();
        let mut out = Vec::new();
        for (path, contents) in &files.files {
            let mut data = contents.durable.clone();
            let mut garbage = false;
            // Only a file with writes not yet synced can be torn: past a
            // synced end there is no file to hold garbage.
            let unsynced = &contents.written[data.len().min(contents.written.len())..];
            if torn && !unsynced.is_empty() && rng.next().is_multiple_of(2) {
                let keep = (rng.next() % (unsynced.len() as u64 + 1)) as usize;
                data.extend_from_slice(&unsynced[..keep]);
                if rng.next().is_multiple_of(2) {
                    let len = 1 + (rng.next() % 40) as usize;
                    data.extend((0..len).map(|_| (rng.next() as u8) | 1));
                    garbage = true;
                }
            }
            out.push((path.clone(), data, garbage));
        }
        out
    }
}

impl SegmentFile for MemFile {
    async fn write_at(&self, buf: Vec<u8>, pos: u64) -> std::io::Result<usize> {
        yield_now().await;
        let mut files = self.fs.0.borrow_mut();
        // Short writes now and then: the journal writes the rest next.
        let n = match files.rng.next() % 4 {
            0 if buf.len() > 1 => 1 + (files.rng.next() as usize % (buf.len() - 1)),
            _ => buf.len(),
        };
        let contents = files
            .files
            .get_mut(&self.path)
            .ok_or_else(|| std::io::Error::other("removed"))?;
        let pos = pos as usize;
        if contents.written.len() < pos + n {
            contents.written.resize(pos + n, 0);
        }
        contents.written[pos..pos + n].copy_from_slice(&buf[..n]);
        Ok(n)
    }

    async fn fdatasync(&self) -> std::io::Result<()> {
        yield_now().await;
        let mut files = self.fs.0.borrow_mut();
        let contents = files
            .files
            .get_mut(&self.path)
            .ok_or_else(|| std::io::Error::other("removed"))?;
        contents.durable = contents.written.clone();
        Ok(())
    }

    async fn close(self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SegmentFs for MemFs {
    type File = MemFile;

    /// A file's name is taken as durable at once (the journal syncs the
    /// directory after opening a segment, before anything in it counts).
    async fn open(&self, path: &Path) -> std::io::Result<MemFile> {
        yield_now().await;
        self.0
            .borrow_mut()
            .files
            .insert(path.to_path_buf(), Contents::default());
        Ok(MemFile {
            fs: self.clone(),
            path: path.to_path_buf(),
        })
    }

    fn sync_dir(&self, _dir: &Path) {}

    fn remove(&self, path: &Path) -> std::io::Result<()> {
        self.0.borrow_mut().files.remove(path);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use bytestring::ByteString;

    use super::*;
    use crate::config::SyncMode;
    use crate::protocol::v3::QoS;
    use crate::store::frame::HEADER_LEN;
    use crate::store::journal::{Journal, Lsn, commit_loop_on};
    use crate::store::record::{Record, StoredMessage};
    use crate::store::{RETAINED_DIR, load_log};

    /// Record `i` of a test: a retained message whose payload names it,
    /// of a length that varies; every fifth one the ordered record of a
    /// shard step (format 3) of `i` sessions.
    fn record(i: u64) -> Record {
        if i % 5 == 4 {
            let entries = (0..i)
                .map(|n| crate::store::record::StepEntry {
                    alias: n as u32 + 1,
                    done: 1 + (n % 7) as u16,
                    message: 1 + (n % 2) as u8,
                    sent: 1 + (i % 65_000) as u16,
                })
                .collect();
            return Record::Steps(
                vec![(i, QoS::AtLeastOnce), (i + 1, QoS::ExactlyOnce)],
                entries,
            );
        }
        let len = 1 + (i * 37 % 200) as usize;
        let mut payload = vec![(i % 251) as u8; len];
        payload[0] = 1;
        Record::Retain(
            i + 1,
            StoredMessage {
                qos: QoS::AtLeastOnce,
                retain: true,
                expires_unix_ms: 0,
                topic: ByteString::from(format!("t/{i}")),
                properties: Default::default(),
                payload: Bytes::from(payload),
            },
        )
    }

    /// What one run up to the power cut left.
    struct Cut {
        /// The files as the disk holds them, and whether garbage was added.
        files: Vec<(PathBuf, Vec<u8>, bool)>,
        /// The LSN after each record appended, in order.
        ends: Vec<Lsn>,
        /// What had been acknowledged at the cut (`Journal::acked_lsn`).
        acked: Lsn,
        /// What was durable at the cut (the last completed sync).
        durable: Lsn,
    }

    /// A run: a journal in `mode` on a [`MemFs`]: random bursts of appends,
    /// yields between them (so the commit task is anywhere in a write or a
    /// sync), now and then a publisher waiting for its acknowledgement or a
    /// segment switch; then cuts the power.
    /// One such run for each of `seeds`, on one executor.
    fn run_until_cuts(seeds: Vec<u64>, mode: SyncMode, torn: bool) -> Vec<Cut> {
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let mut cuts = Vec::new();
                for seed in seeds {
                    cuts.push(cut_one(seed, mode, torn).await);
                }
                cuts
            })
            .expect("executor")
            .join()
            .expect("run")
    }

    /// One run (seeded by `seed`), on the current executor.
    async fn cut_one(seed: u64, mode: SyncMode, torn: bool) -> Cut {
        let mut rng = XorShift(seed);
        let fs = MemFs::new(rng.next());
        let dir = PathBuf::from("/mem/retained");
        let journal = Rc::new(Journal::new(
            &dir,
            0,
            1,
            0,
            mode,
            Duration::from_millis(1),
            Vec::new(),
            Arc::default(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let task = glommio::spawn_local(commit_loop_on(journal.clone(), stop.clone(), fs.clone()))
            .detach();
        let mut ends = Vec::new();
        for _ in 0..1 + rng.next() % 40 {
            for _ in 0..rng.next() % 6 {
                ends.push(journal.append(&record(ends.len() as u64)));
            }
            match rng.next() % 10 {
                0 => {
                    if let Some(&last) = ends.last() {
                        journal.wait_acked(last).await;
                    }
                }
                1 => {
                    journal.rotate();
                }
                _ => {}
            }
            for _ in 0..rng.next() % 5 {
                yield_now().await;
            }
        }
        let cut = Cut {
            files: fs.power_cut(&mut rng, torn),
            ends,
            acked: journal.acked_lsn(),
            durable: journal.durable_lsn(),
        };
        // The commit task is left where the cut found it: the
        // executor ends with this future.
        stop.store(true, Ordering::Relaxed);
        drop(task);
        cut
    }

    /// The base LSN a segment's file name gives.
    fn base_of(path: &Path) -> Lsn {
        let name = path.file_name().unwrap().to_str().unwrap();
        let hex = name
            .strip_prefix("log-")
            .unwrap()
            .strip_suffix(".fml")
            .unwrap();
        u64::from_str_radix(hex, 16).unwrap()
    }

    /// Whether `data` (a segment at `base`) ends inside its header or a
    /// record, given the LSN after each record (an empty file is one a
    /// journal created and never wrote: not damage).
    fn ends_mid_record(data: &[u8], base: Lsn, ends: &[Lsn]) -> bool {
        let end = base + data.len() as u64;
        !data.is_empty() && data.len() != HEADER_LEN && !ends.contains(&end)
    }

    /// Writes the cut's files into a store directory and loads them as a
    /// restart would: the records found, and how many files were set aside.
    fn restart(cut: &Cut) -> (Vec<Record>, usize) {
        let store = tempfile::tempdir().unwrap();
        let dir = store.path().join(RETAINED_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        for (path, data, _) in &cut.files {
            std::fs::write(dir.join(path.file_name().unwrap()), data).unwrap();
        }
        let loaded = load_log(store.path(), &dir).expect("a damaged tail never stops the load");
        (loaded.records, loaded.quarantined)
    }

    /// Checks what a restart after `cut` loads: a prefix of what was
    /// appended, holding at least every record up to `kept` (an LSN); a
    /// file that ends inside a record (a write cut short or torn, garbage)
    /// set aside, none else.
    fn check(seed: u64, cut: &Cut, kept: Lsn) -> (Vec<Record>, usize) {
        let (records, quarantined) = restart(cut);
        let damaged = cut.files.iter().any(|(path, data, garbage)| {
            *garbage || ends_mid_record(data, base_of(path), &cut.ends)
        });
        assert_eq!(
            quarantined > 0,
            damaged,
            "seed {seed}: damage is detected and set aside, and only damage"
        );
        let expected: Vec<Record> = (0..records.len() as u64).map(record).collect();
        assert_eq!(
            records, expected,
            "seed {seed}: a prefix of the log, in order"
        );
        let must = cut.ends.iter().filter(|&&e| e <= kept).count();
        assert!(
            records.len() >= must,
            "seed {seed}: {} records loaded, {must} were safe (LSN {kept})",
            records.len()
        );
        (records, quarantined)
    }

    #[test]
    fn with_ack_every_acknowledged_record_survives_a_power_cut_anywhere() {
        let mut acked_some = 0;
        let seeds: Vec<u64> = (1..=150u64).map(|s| s * 0x9E37).collect();
        for (seed, cut) in
            seeds
                .clone()
                .into_iter()
                .zip(run_until_cuts(seeds, SyncMode::Ack, false))
        {
            assert!(
                cut.acked <= cut.durable,
                "ack mode acknowledges only what is synced"
            );
            let (records, _) = check(seed, &cut, cut.acked);
            acked_some += usize::from(!records.is_empty());
        }
        assert!(acked_some > 50, "the cuts fell after some syncs too");
    }

    /// In `ack` mode what nobody waits for (a fan-out's stream of
    /// acknowledgement records) is written at once but synced only when a
    /// task waits for it (or after the interval): one sync then covers all
    /// of it, instead of one sync per write.
    #[test]
    fn with_ack_what_nobody_waits_for_is_written_at_once_and_synced_for_a_wait() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let fs = MemFs::new(7);
                let journal = Rc::new(Journal::new(
                    &PathBuf::from("/mem/shard-0"),
                    0,
                    1,
                    0,
                    SyncMode::Ack,
                    Duration::from_secs(3600),
                    Vec::new(),
                    Arc::default(),
                ));
                let stop = Arc::new(AtomicBool::new(false));
                let task =
                    glommio::spawn_local(commit_loop_on(journal.clone(), stop.clone(), fs.clone()))
                        .detach();
                let mut last = 0;
                for i in 0..20 {
                    last = journal.append(&record(i));
                    // The segment starts at LSN 0: bytes written are the LSN.
                    while journal.stats().bytes_written < last {
                        yield_now().await;
                    }
                }
                assert_eq!(
                    journal.stats().fsyncs,
                    0,
                    "20 writes, no sync: nothing waited"
                );
                assert!(journal.acked_lsn() < last, "not acknowledged before a sync");
                let waiting = journal.clone();
                let wait = glommio::spawn_local(async move { waiting.wait_acked(last).await });
                // The wait wakes the idle commit task, which syncs at once:
                // a few turns of the executor, not its 50 ms stop poll.
                for _ in 0..20 {
                    yield_now().await;
                }
                assert_eq!(
                    journal.stats().fsyncs,
                    1,
                    "one sync for the wait, over all 20"
                );
                assert_eq!(journal.acked_lsn(), last);
                wait.await;
                stop.store(true, Ordering::Relaxed);
                task.await;
            })
            .expect("executor")
            .join()
            .expect("run");
    }

    #[test]
    fn with_interval_at_most_the_records_since_the_last_sync_are_lost() {
        let mut lost_some = 0;
        let seeds: Vec<u64> = (1..=150u64).map(|s| s * 0x51ED).collect();
        let cuts = run_until_cuts(seeds.clone(), SyncMode::Interval, false);
        for (seed, cut) in seeds.into_iter().zip(cuts) {
            let (records, _) = check(seed, &cut, cut.durable);
            let acked = cut.ends.iter().filter(|&&e| e <= cut.acked).count();
            lost_some += usize::from(records.len() < acked);
        }
        // Acknowledged once written: a power cut loses some of those (what
        // the README says of "interval"), never what was synced.
        assert!(lost_some > 0, "some cuts fell between a write and its sync");
    }

    #[test]
    fn a_cut_mid_record_is_detected_and_set_aside_never_a_panic() {
        let mut torn_seen = 0;
        for mode in [SyncMode::Ack, SyncMode::Interval] {
            let seeds: Vec<u64> = (1..=100u64).map(|s| s * 0xD1CE).collect();
            let cuts = run_until_cuts(seeds.clone(), mode, true);
            for (seed, cut) in seeds.into_iter().zip(cuts) {
                let (_, quarantined) = check(seed, &cut, cut.durable);
                torn_seen += usize::from(cut.files.iter().any(|f| f.2) && quarantined > 0);
            }
        }
        assert!(torn_seen > 20, "the cuts tore records ({torn_seen})");
    }
}
