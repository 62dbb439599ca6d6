//! The journal: records appended during a step into memory, written and
//! synced by one commit task per journal (docs/design/persistence.md §5.1).
//!
//! [`Journal::append`] frames a record into the pending buffer and wakes the
//! task; it never waits, so the publish path has no `.await`. The task,
//! [`commit_loop`], takes everything pending, writes it with one
//! `BufferedFile::write_at` at the end of the segment and, in `ack` mode,
//! makes it durable with one `fdatasync` once a task waits for it
//! ([`Journal::wait_acked`]): one write and at most one sync in flight,
//! each covering all that was appended before it (group commit). Records
//! nobody waits for (acknowledgements a subscriber sent, messages leaving
//! its queue: a crash only resends those QoS 1 messages) are written at
//! once and made durable by the next sync someone waits for, or at the
//! latest after `persistence_sync_interval_ms`, so that a fan-out's stream
//! of them does not cost an `fdatasync` per loop iteration.
//! Both are operations on the shard's own io_uring: the shard's thread never
//! blocks on the disk. [`Journal::acked_lsn`] is what may be acknowledged:
//! synced bytes in `ack` mode, written ones (in the page cache: they survive
//! `kill -9`, not a power loss) in `interval` mode, where the task syncs
//! every `persistence_sync_interval_ms`.
//!
//! A write that fails (a full disk) keeps its bytes pending, marks the
//! journal failing (one log line per episode; for the retained journal every
//! shard then refuses retained QoS 1/2 publishes, while acknowledgements
//! waiting for a session journal wait, at most `APPLY_TIMEOUT`, after which
//! their connection closes) and is retried every [`RETRY_PERIOD`] until it
//! succeeds. A failed `fdatasync` is not retried: Linux may have
//! dropped the dirty pages and will not report it twice, so fanmq exits
//! non-zero and the next start reads exactly what is durable (nothing
//! unsynced was acknowledged).
//!
//! The commit task reaches the disk through [`SegmentFs`] (open, write,
//! sync, close a segment; sync a directory; remove a file): [`Disk`],
//! glommio's buffered files, in the broker; an in-memory file system that
//! keeps only what was synced when the power is cut in the store's
//! power-loss tests (store::memfile).

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use glommio::io::{BufferedFile, OpenOptions};
use log::{error, info, warn};

use crate::config::SyncMode;
use crate::store::frame::{self, FORMAT_VERSION, HEADER_LEN, Header};
use crate::store::record::Record;

/// How often a failing write (full disk) is retried.
pub const RETRY_PERIOD: Duration = Duration::from_secs(1);

/// A log position: bytes since the start of the shard's first segment.
pub type Lsn = u64;

/// Figures of one journal, copied into the shard's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Records appended.
    pub records: u64,
    /// Bytes written to the file.
    pub bytes_written: u64,
    /// `fdatasync` calls completed.
    pub fsyncs: u64,
    /// Writes that failed (full disk, I/O error).
    pub write_errors: u64,
    /// Snapshots written while running (store::snapshot).
    pub snapshots: u64,
    /// LSN where the log since the last snapshot starts (the journal's
    /// first segment until the first snapshot).
    pub snapshot_base: Lsn,
}

/// What the commit task and the shard share (one thread: `Cell`s).
struct State {
    /// Framed records not yet written.
    pending: Vec<u8>,
    /// Commit task to wake when something is appended.
    commit_waker: Option<Waker>,
    /// Tasks waiting for [`Journal::acked_lsn`] to advance.
    waiters: Vec<Waker>,
    /// The highest LSN a task waits to see acknowledged
    /// ([`Journal::wait_acked`]): in `ack` mode the commit task syncs when
    /// this is past the durable LSN (or the interval passed).
    demand: Lsn,
    /// Figures.
    stats: JournalStats,
    /// A segment switch asked for by [`Journal::rotate`]: where in
    /// `pending` the new segment (its header) starts, and its base LSN.
    rotate: Option<(usize, Lsn)>,
    /// The snapshot task waiting for the log to reach `snapshot_at`.
    snapshot_waker: Option<Waker>,
    /// The LSN past which the snapshot task is woken (`u64::MAX`: none).
    snapshot_at: Lsn,
}

/// One shard's journal of one directory.
pub struct Journal {
    /// The directory its segments go to.
    dir: PathBuf,
    /// The shard number written in segment headers.
    shard_tag: u16,
    /// Shards of the broker (segment headers).
    shards: u16,
    /// LSN of the current segment's first byte (its header); moves at
    /// each [`Journal::rotate`], once the commit task switched files.
    base: Cell<Lsn>,
    /// `ack` or `interval`.
    mode: SyncMode,
    /// Period of the syncs in `interval` mode.
    interval: Duration,
    /// LSN after the last appended record.
    end: Cell<Lsn>,
    /// LSN up to which the file holds what was appended.
    written: Cell<Lsn>,
    /// LSN up to which it is durable.
    synced: Cell<Lsn>,
    /// Set while writes fail; shared with every shard, which then refuses
    /// acknowledgements that need this journal.
    failing: Arc<AtomicBool>,
    /// Older segments, removed once the new one (which holds everything
    /// they held that is still live) is durable.
    obsolete: RefCell<Vec<PathBuf>>,
    /// The snapshot (base LSN, bytes) the log this journal goes on after
    /// was loaded from ([`Journal::continue_log`]): the fallback its first
    /// snapshot keeps.
    loaded_snapshot: Cell<Option<(Lsn, u64)>>,
    /// Pending bytes, wakers, figures.
    state: RefCell<State>,
}

impl Journal {
    /// A journal that starts a new segment in `dir` at `base` (after every
    /// older segment), with `initial` records first (what was loaded and is
    /// still live: the start-up compaction). `obsolete` are removed once it
    /// is durable. `failing` is set while writes fail.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dir: &Path,
        shard_tag: u16,
        shards: u16,
        base: Lsn,
        mode: SyncMode,
        interval: Duration,
        obsolete: Vec<PathBuf>,
        failing: Arc<AtomicBool>,
    ) -> Journal {
        let header = Header {
            version: FORMAT_VERSION,
            shard: shard_tag,
            shards,
            base_lsn: base,
        };
        let mut pending = Vec::with_capacity(64 * 1024);
        pending.extend_from_slice(&header.encode());
        Journal {
            dir: dir.to_path_buf(),
            shard_tag,
            shards,
            base: Cell::new(base),
            mode,
            interval,
            end: Cell::new(base + HEADER_LEN as u64),
            written: Cell::new(base),
            synced: Cell::new(base),
            failing,
            obsolete: RefCell::new(obsolete),
            loaded_snapshot: Cell::new(None),
            state: RefCell::new(State {
                pending,
                commit_waker: None,
                waiters: Vec::new(),
                demand: 0,
                stats: JournalStats {
                    snapshot_base: base,
                    ..JournalStats::default()
                },
                rotate: None,
                snapshot_waker: None,
                snapshot_at: Lsn::MAX,
            }),
        }
    }

    /// The segment file this journal writes.
    pub fn path(&self) -> PathBuf {
        segment_path(&self.dir, self.base.get())
    }

    /// The directory its segments go to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The shard number and shard count written in its segment headers.
    pub fn tags(&self) -> (u16, u16) {
        (self.shard_tag, self.shards)
    }

    /// Starts a new segment at the end of the log: what was appended so far
    /// goes to the current file, which the commit task makes durable and
    /// closes; what is appended from now on goes to `log-<returned LSN>`.
    /// A snapshot taken from now on makes every earlier segment obsolete.
    /// A second call before the switch happened returns the same LSN.
    pub fn rotate(&self) -> Lsn {
        let mut state = self.state.borrow_mut();
        if let Some((_, base)) = state.rotate {
            return base;
        }
        let base = self.end.get();
        let at = state.pending.len();
        state.rotate = Some((at, base));
        let header = Header {
            version: FORMAT_VERSION,
            shard: self.shard_tag,
            shards: self.shards,
            base_lsn: base,
        };
        state.pending.extend_from_slice(&header.encode());
        if let Some(waker) = state.commit_waker.take() {
            waker.wake();
        }
        self.end.set(base + HEADER_LEN as u64);
        base
    }

    /// Goes on after a log that was loaded and kept as it is (no rewrite
    /// at start): the log since the last snapshot counts from `log_from`
    /// (so the snapshot threshold counts the log already on disk), and
    /// `snapshot` (base LSN, bytes), the one the load used, is what the
    /// first snapshot of this journal keeps as its fallback.
    pub fn continue_log(&self, log_from: Lsn, snapshot: Option<(Lsn, u64)>) {
        self.state.borrow_mut().stats.snapshot_base = log_from.min(self.base.get());
        self.loaded_snapshot.set(snapshot);
    }

    /// The snapshot set by [`Journal::continue_log`], if any.
    pub fn loaded_snapshot(&self) -> Option<(Lsn, u64)> {
        self.loaded_snapshot.get()
    }

    /// Records a snapshot written for the log from `base` on.
    pub fn snapshot_written(&self, base: Lsn) {
        let mut state = self.state.borrow_mut();
        state.stats.snapshots += 1;
        state.stats.snapshot_base = base;
    }

    /// Records that a snapshot for the log from `base` on failed: the next
    /// try waits until the log grew by another threshold from there.
    pub fn snapshot_failed(&self, base: Lsn) {
        self.state.borrow_mut().stats.snapshot_base = base;
    }

    /// Bytes of log since the last snapshot (or since the journal started).
    pub fn log_bytes_since_snapshot(&self) -> u64 {
        let since = self.state.borrow().stats.snapshot_base;
        self.end.get().saturating_sub(since)
    }

    /// Appends `record`; returns the LSN after it (what an acknowledgement
    /// that needs it waits for).
    pub fn append(&self, record: &Record) -> Lsn {
        let mut state = self.state.borrow_mut();
        let before = state.pending.len();
        frame::append_record(&mut state.pending, record.kind(), |out| {
            record.encode_body(out)
        });
        let added = (state.pending.len() - before) as u64;
        state.stats.records += 1;
        if let Some(waker) = state.commit_waker.take() {
            waker.wake();
        }
        self.end.set(self.end.get() + added);
        if self.end.get() >= state.snapshot_at
            && let Some(waker) = state.snapshot_waker.take()
        {
            waker.wake();
        }
        self.end.get()
    }

    /// The records appended and not yet written, decoded (tests read what
    /// a step journalled).
    #[cfg(test)]
    pub fn pending_records(&self) -> Vec<Record> {
        let state = self.state.borrow();
        let body = match self.written.get() {
            w if w == self.base.get() => &state.pending[HEADER_LEN..],
            _ => &state.pending[..],
        };
        crate::store::read_records(body).0
    }

    /// Waits until the log since the last snapshot is at least `bytes`
    /// long (the snapshot task; woken by [`Journal::append`]).
    pub async fn wait_log_bytes(&self, bytes: u64) {
        poll_fn(|cx| {
            if self.log_bytes_since_snapshot() >= bytes {
                return Poll::Ready(());
            }
            let mut state = self.state.borrow_mut();
            state.snapshot_at = state.stats.snapshot_base.saturating_add(bytes);
            state.snapshot_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
    }

    /// LSN after the last appended record.
    pub fn end_lsn(&self) -> Lsn {
        self.end.get()
    }

    /// What may be acknowledged: durable bytes in `ack` mode, written ones
    /// in `interval` mode.
    pub fn acked_lsn(&self) -> Lsn {
        match self.mode {
            SyncMode::Ack => self.synced.get(),
            SyncMode::Interval => self.written.get(),
        }
    }

    /// LSN up to which the journal is durable (its last completed sync).
    #[cfg(test)]
    pub fn durable_lsn(&self) -> Lsn {
        self.synced.get()
    }

    /// Figures so far.
    pub fn stats(&self) -> JournalStats {
        self.state.borrow().stats
    }

    /// Waits until [`Journal::acked_lsn`] reaches `lsn`; in `ack` mode
    /// this is what makes the commit task sync (it is woken for it).
    pub async fn wait_acked(&self, lsn: Lsn) {
        poll_fn(|cx| {
            if self.acked_lsn() >= lsn {
                return Poll::Ready(());
            }
            let mut state = self.state.borrow_mut();
            state.waiters.push(cx.waker().clone());
            if lsn > state.demand {
                state.demand = lsn;
                if let Some(waker) = state.commit_waker.take() {
                    waker.wake();
                }
            }
            Poll::Pending
        })
        .await;
    }

    /// Whether a task waits for more than is durable.
    fn sync_wanted(&self) -> bool {
        self.state.borrow().demand > self.synced.get()
    }

    /// Wakes every task waiting for an LSN.
    fn wake_waiters(&self) {
        let waiters = std::mem::take(&mut self.state.borrow_mut().waiters);
        for waker in waiters {
            waker.wake();
        }
    }

    /// Marks the journal failing or recovered, logging the change once.
    fn set_failing(&self, failing: bool, why: &dyn std::fmt::Display) {
        if self.failing.swap(failing, Ordering::Relaxed) == failing {
            return;
        }
        if failing {
            error!(
                "persistence: cannot write {} ({why}); QoS 1/2 publishes that need it are refused until it can",
                self.path().display()
            );
        } else {
            info!(
                "persistence: writing {} again; acknowledgements resume",
                self.path().display()
            );
        }
    }
}

/// A segment file as the commit task uses it.
pub(crate) trait SegmentFile {
    /// Writes `buf` at `pos`; returns how many bytes were written (maybe
    /// fewer: the rest is written next).
    async fn write_at(&self, buf: Vec<u8>, pos: u64) -> std::io::Result<usize>;
    /// Makes what was written durable.
    async fn fdatasync(&self) -> std::io::Result<()>;
    /// Closes the file.
    async fn close(self) -> std::io::Result<()>;
}

/// Where the commit task opens its segments.
pub(crate) trait SegmentFs {
    /// Its files.
    type File: SegmentFile;
    /// Opens (creating or truncating) the segment at `path`.
    async fn open(&self, path: &Path) -> std::io::Result<Self::File>;
    /// Makes `dir`'s entries durable.
    fn sync_dir(&self, dir: &Path);
    /// Removes the file at `path`.
    fn remove(&self, path: &Path) -> std::io::Result<()>;
}

/// The real disk: glommio's buffered files on the shard's io_uring.
#[derive(Clone, Copy, Debug, Default)]
pub struct Disk;

impl SegmentFile for BufferedFile {
    async fn write_at(&self, buf: Vec<u8>, pos: u64) -> std::io::Result<usize> {
        Ok(BufferedFile::write_at(self, buf, pos).await?)
    }

    async fn fdatasync(&self) -> std::io::Result<()> {
        Ok(BufferedFile::fdatasync(self).await?)
    }

    async fn close(self) -> std::io::Result<()> {
        Ok(BufferedFile::close(self).await?)
    }
}

impl SegmentFs for Disk {
    type File = BufferedFile;

    async fn open(&self, path: &Path) -> std::io::Result<BufferedFile> {
        Ok(OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .buffered_open(path)
            .await?)
    }

    fn sync_dir(&self, dir: &Path) {
        sync_dir(dir);
    }

    fn remove(&self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_file(path)
    }
}

/// The path of the segment starting at `base` in `dir`.
pub fn segment_path(dir: &Path, base: Lsn) -> PathBuf {
    dir.join(format!("log-{base:016x}.fml"))
}

/// Opens (creating or truncating) the segment file at `path`, retrying
/// every [`RETRY_PERIOD`] while that fails.
async fn open_segment<F: SegmentFs>(journal: &Journal, path: &Path, fs: &F) -> F::File {
    loop {
        match fs.open(path).await {
            Ok(file) => return file,
            Err(e) => {
                journal.set_failing(true, &e);
                glommio::timer::sleep(RETRY_PERIOD).await;
            }
        }
    }
}

/// Writes and syncs `journal` until `stop` is set and nothing is pending.
pub async fn commit_loop(journal: Rc<Journal>, stop: Arc<AtomicBool>) {
    commit_loop_on(journal, stop, Disk).await;
}

/// [`commit_loop`] through `fs`.
pub(crate) async fn commit_loop_on<F: SegmentFs>(
    journal: Rc<Journal>,
    stop: Arc<AtomicBool>,
    fs: F,
) {
    let path = journal.path();
    let mut file = open_segment(&journal, &path, &fs).await;
    info!(
        "persistence: journal {} open (shard tag {}, {} shards)",
        path.display(),
        journal.shard_tag,
        journal.shards
    );
    let mut pos = 0u64;
    let mut last_sync = Instant::now();
    loop {
        let has_pending = wait_for_work(&journal, &stop).await;
        if !has_pending && stop.load(Ordering::Relaxed) {
            sync(&journal, &file, &fs).await;
            break;
        }
        if has_pending {
            // Up to a segment switch, if one is asked for: the rest goes
            // to the next file.
            let buf = {
                let state = journal.state.borrow();
                let upto = state.rotate.map_or(state.pending.len(), |(at, _)| at);
                state.pending[..upto].to_vec()
            };
            if !buf.is_empty() {
                match file.write_at(buf, pos).await {
                    Ok(n) => {
                        pos += n as u64;
                        let mut state = journal.state.borrow_mut();
                        state.pending.drain(..n);
                        if let Some((at, _)) = &mut state.rotate {
                            *at -= n;
                        }
                        state.stats.bytes_written += n as u64;
                        drop(state);
                        journal.written.set(journal.base.get() + pos);
                        journal.set_failing(false, &"");
                    }
                    Err(e) => {
                        journal.state.borrow_mut().stats.write_errors += 1;
                        journal.set_failing(true, &e);
                        glommio::timer::sleep(RETRY_PERIOD).await;
                        continue;
                    }
                }
            }
            let switch = journal
                .state
                .borrow()
                .rotate
                .and_then(|(at, base)| (at == 0).then_some(base));
            if let Some(base) = switch {
                // The old segment is complete: durable before anything of
                // the new one can count (the prefix property, §5.1).
                sync(&journal, &file, &fs).await;
                let _ = file.close().await;
                journal.base.set(base);
                journal.state.borrow_mut().rotate = None;
                file = open_segment(&journal, &journal.path(), &fs).await;
                fs.sync_dir(&journal.dir);
                pos = 0;
                journal.wake_waiters();
                continue;
            }
        }
        let due = match journal.mode {
            SyncMode::Ack => journal.sync_wanted() || last_sync.elapsed() >= journal.interval,
            SyncMode::Interval => last_sync.elapsed() >= journal.interval,
        };
        if due && journal.synced.get() < journal.written.get() {
            sync(&journal, &file, &fs).await;
            last_sync = Instant::now();
        }
        journal.wake_waiters();
    }
    let _ = file.close().await;
}

/// Waits until something is pending (true), or until a sync is due (in
/// `ack` mode: a task waits for what is written, or the interval passed;
/// in `interval` mode: the interval passed), or until `stop` (false).
async fn wait_for_work(journal: &Journal, stop: &AtomicBool) -> bool {
    /// How often a journal with nothing to do checks `stop`.
    const STOP_POLL: Duration = Duration::from_millis(50);
    let started = Instant::now();
    loop {
        if !journal.state.borrow().pending.is_empty() {
            return true;
        }
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        if journal.synced.get() < journal.written.get()
            && (started.elapsed() >= journal.interval
                || (journal.mode == SyncMode::Ack && journal.sync_wanted()))
        {
            return false;
        }
        // Woken by an append, or in `ack` mode by a task that waits for
        // what is written (`Journal::wait_acked`): then it syncs now.
        let appended = poll_fn(|cx| {
            let mut state = journal.state.borrow_mut();
            let sync_wanted = journal.mode == SyncMode::Ack
                && state.demand > journal.synced.get()
                && journal.synced.get() < journal.written.get();
            if state.pending.is_empty() && !sync_wanted {
                state.commit_waker = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        });
        let _ = glommio::timer::timeout(STOP_POLL, async {
            appended.await;
            Ok(())
        })
        .await;
    }
}

/// Makes everything written durable, and once the first sync succeeded,
/// removes the segments it replaces. A failed `fdatasync` ends the process
/// (see the module documentation).
async fn sync<F: SegmentFs>(journal: &Journal, file: &F::File, fs: &F) {
    let target = journal.written.get();
    if let Err(e) = file.fdatasync().await {
        error!(
            "persistence: fdatasync of {} failed ({e}); exiting so that the next start reads what is durable",
            journal.path().display()
        );
        std::process::exit(1);
    }
    journal.synced.set(target);
    journal.state.borrow_mut().stats.fsyncs += 1;
    let obsolete = std::mem::take(&mut *journal.obsolete.borrow_mut());
    if obsolete.is_empty() {
        return;
    }
    fs.sync_dir(&journal.dir);
    for old in obsolete {
        if let Err(e) = fs.remove(&old) {
            warn!("persistence: cannot remove {}: {e}", old.display());
        }
    }
}

/// Makes a directory's entries durable (a new or removed file's name).
pub fn sync_dir(dir: &Path) {
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        warn!("persistence: cannot sync directory {}: {e}", dir.display());
    }
}
