//! The coordinator's side of the worker processes: start them, send them
//! commands, gather their events, and make sure they are gone afterwards.

use crate::progress::Progress as Display;
use crate::protocol::{Command, Event, Progress, WorkerReport, WorkerTask};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("starting worker: {0}")]
    Spawn(std::io::Error),
    #[error("talking to worker {0}: {1}")]
    Pipe(usize, String),
    #[error("worker {0} failed: {1}")]
    Worker(usize, String),
    #[error("worker {0} exited")]
    Exited(usize),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
}

/// The running workers.
pub struct Fleet {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    /// Events from all workers, tagged with the worker number; `None` = that
    /// worker's stdout closed.
    rx: Receiver<(usize, Option<Event>)>,
    /// Latest counters per worker.
    pub progress: Vec<Progress>,
}

impl Fleet {
    /// Starts one worker process per task (this binary, `worker` subcommand).
    ///
    /// # Errors
    /// A process could not be started or given its task.
    pub fn spawn(tasks: &[WorkerTask]) -> Result<Fleet, FleetError> {
        let exe = std::env::current_exe().map_err(FleetError::Spawn)?;
        let (tx, rx) = channel();
        let mut fleet = Fleet {
            children: Vec::new(),
            stdins: Vec::new(),
            rx,
            progress: vec![Progress::default(); tasks.len()],
        };
        for (w, task) in tasks.iter().enumerate() {
            let mut child = std::process::Command::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(FleetError::Spawn)?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                return Err(FleetError::Pipe(w, "no pipes".into()));
            };
            fleet.children.push(child);
            fleet.stdins.push(stdin);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let event = serde_json::from_str::<Event>(&line)
                        .unwrap_or_else(|e| Event::Fatal(format!("bad event: {e}")));
                    if tx.send((w, Some(event))).is_err() {
                        return;
                    }
                }
                let _ = tx.send((w, None));
            });
            let line =
                serde_json::to_string(task).map_err(|e| FleetError::Pipe(w, e.to_string()))?;
            fleet.write(w, &line)?;
        }
        Ok(fleet)
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    fn write(&mut self, w: usize, line: &str) -> Result<(), FleetError> {
        let stdin = &mut self.stdins[w];
        stdin
            .write_all(line.as_bytes())
            .and_then(|()| stdin.write_all(b"\n"))
            .and_then(|()| stdin.flush())
            .map_err(|e| FleetError::Pipe(w, e.to_string()))
    }

    /// Sends `cmd` to every worker.
    ///
    /// # Errors
    /// A worker's pipe is broken.
    pub fn send_all(&mut self, cmd: &Command) -> Result<(), FleetError> {
        let line = serde_json::to_string(cmd).map_err(|e| FleetError::Pipe(0, e.to_string()))?;
        for w in 0..self.len() {
            self.write(w, &line)?;
        }
        Ok(())
    }

    /// Total counters over all workers.
    pub fn total(&self) -> Progress {
        self.progress
            .iter()
            .fold(Progress::default(), |a, p| Progress {
                connected: a.connected + p.connected,
                ready: a.ready + p.ready,
                failed: a.failed + p.failed,
                delivered: a.delivered + p.delivered,
                stale: a.stale + p.stale,
            })
    }

    /// Waits for every worker's report (answers to `Finish` or `Step`), in
    /// worker order, for up to a minute.
    ///
    /// # Errors
    /// As [`Fleet::gather`].
    pub fn gather_reports(
        &mut self,
        what: &'static str,
        display: &Display,
    ) -> Result<Vec<WorkerReport>, FleetError> {
        Ok(self
            .gather(
                what,
                Duration::from_secs(60),
                display,
                |e| match e {
                    Event::Report(r) => Some(*r),
                    _ => None,
                },
                |_| false,
            )?
            .into_iter()
            .flatten()
            .collect())
    }

    /// Waits for one event per worker that `pick` accepts, updating the
    /// progress display meanwhile. `tick` runs about every 100 ms with the
    /// totals and may end the wait early by returning `true` (the answers
    /// still missing are then `None`).
    ///
    /// # Errors
    /// A worker failed or exited, or `timeout` passed.
    pub fn gather<T>(
        &mut self,
        what: &'static str,
        timeout: Duration,
        display: &Display,
        mut pick: impl FnMut(Event) -> Option<T>,
        mut tick: impl FnMut(&Progress) -> bool,
    ) -> Result<Vec<Option<T>>, FleetError> {
        let deadline = Instant::now() + timeout;
        let mut answers: Vec<Option<T>> = (0..self.len()).map(|_| None).collect();
        while answers.iter().any(Option::is_none) {
            let now = Instant::now();
            if now >= deadline {
                return Err(FleetError::Timeout(timeout, what));
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            match self.rx.recv_timeout(wait) {
                Ok((w, Some(Event::Progress(p)))) => self.progress[w] = p,
                Ok((w, Some(Event::Fatal(msg)))) => return Err(FleetError::Worker(w, msg)),
                Ok((w, Some(event))) => {
                    if let Some(t) = pick(event) {
                        answers[w] = Some(t);
                    }
                }
                // A worker exits right after its final report: only an
                // exit before its answer is an error.
                Ok((w, None)) if answers[w].is_none() => return Err(FleetError::Exited(w)),
                Ok((_, None)) => {}
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(FleetError::Exited(0)),
            }
            let total = self.total();
            display.update(&total);
            if tick(&total) {
                break;
            }
        }
        Ok(answers)
    }
}

impl Drop for Fleet {
    /// Workers exit when their stdin closes; kill any that linger.
    fn drop(&mut self) {
        self.stdins.clear();
        let deadline = Instant::now() + Duration::from_secs(3);
        for child in &mut self.children {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
