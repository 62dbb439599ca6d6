//! The journal: records appended during a step into memory, written and
//! synced by one commit task per journal (docs/design/persistence.md §5.1).
//!
//! [`Journal::append`] frames a record into the pending buffer and wakes the
//! task; it never waits, so the publish path has no `.await`. The task,
//! [`commit_loop`], takes everything pending, writes it with one
//! `BufferedFile::write_at` at the end of the segment and, in `ack` mode,
//! makes it durable with one `fdatasync`: one write and at most one sync in
//! flight, each covering all that was appended before it (group commit).
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
}

/// What the commit task and the shard share (one thread: `Cell`s).
struct State {
    /// Framed records not yet written.
    pending: Vec<u8>,
    /// Commit task to wake when something is appended.
    commit_waker: Option<Waker>,
    /// Tasks waiting for [`Journal::acked_lsn`] to advance.
    waiters: Vec<Waker>,
    /// Figures.
    stats: JournalStats,
}

/// One shard's journal of one directory.
pub struct Journal {
    /// The directory its segments go to.
    dir: PathBuf,
    /// The shard number written in segment headers.
    shard_tag: u16,
    /// Shards of the broker (segment headers).
    shards: u16,
    /// LSN of the new segment's first byte (its header).
    base: Lsn,
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
            base,
            mode,
            interval,
            end: Cell::new(base + HEADER_LEN as u64),
            written: Cell::new(base),
            synced: Cell::new(base),
            failing,
            obsolete: RefCell::new(obsolete),
            state: RefCell::new(State {
                pending,
                commit_waker: None,
                waiters: Vec::new(),
                stats: JournalStats::default(),
            }),
        }
    }

    /// The segment file this journal writes.
    pub fn path(&self) -> PathBuf {
        segment_path(&self.dir, self.base)
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
        self.end.get()
    }

    /// The records appended and not yet written, decoded (tests read what
    /// a step journalled).
    #[cfg(test)]
    pub fn pending_records(&self) -> Vec<Record> {
        let state = self.state.borrow();
        let body = match self.written.get() {
            w if w == self.base => &state.pending[HEADER_LEN..],
            _ => &state.pending[..],
        };
        crate::store::read_records(body).0
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

    /// Figures so far.
    pub fn stats(&self) -> JournalStats {
        self.state.borrow().stats
    }

    /// Waits until [`Journal::acked_lsn`] reaches `lsn`.
    pub async fn wait_acked(&self, lsn: Lsn) {
        poll_fn(|cx| {
            if self.acked_lsn() >= lsn {
                return Poll::Ready(());
            }
            self.state.borrow_mut().waiters.push(cx.waker().clone());
            Poll::Pending
        })
        .await;
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

/// The path of the segment starting at `base` in `dir`.
pub fn segment_path(dir: &Path, base: Lsn) -> PathBuf {
    dir.join(format!("log-{base:016x}.fml"))
}

/// Writes and syncs `journal` until `stop` is set and nothing is pending.
pub async fn commit_loop(journal: Rc<Journal>, stop: Arc<AtomicBool>) {
    let path = journal.path();
    let file = loop {
        match OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .buffered_open(&path)
            .await
        {
            Ok(file) => break file,
            Err(e) => {
                journal.set_failing(true, &e);
                glommio::timer::sleep(RETRY_PERIOD).await;
            }
        }
    };
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
            sync(&journal, &file).await;
            break;
        }
        if has_pending {
            let buf = journal.state.borrow().pending.clone();
            match file.write_at(buf, pos).await {
                Ok(n) => {
                    pos += n as u64;
                    let mut state = journal.state.borrow_mut();
                    state.pending.drain(..n);
                    state.stats.bytes_written += n as u64;
                    drop(state);
                    journal.written.set(journal.base + pos);
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
        let due = match journal.mode {
            SyncMode::Ack => true,
            SyncMode::Interval => last_sync.elapsed() >= journal.interval,
        };
        if due && journal.synced.get() < journal.written.get() {
            sync(&journal, &file).await;
            last_sync = Instant::now();
        }
        journal.wake_waiters();
    }
    let _ = file.close().await;
}

/// Waits until something is pending (true), or in `interval` mode until
/// the next sync is due, or until `stop` (false).
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
        if journal.mode == SyncMode::Interval
            && journal.synced.get() < journal.written.get()
            && started.elapsed() >= journal.interval
        {
            return false;
        }
        let appended = poll_fn(|cx| {
            let mut state = journal.state.borrow_mut();
            if state.pending.is_empty() {
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
async fn sync(journal: &Journal, file: &BufferedFile) {
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
    sync_dir(&journal.dir);
    for old in obsolete {
        if let Err(e) = std::fs::remove_file(&old) {
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
