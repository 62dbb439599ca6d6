//! Live progress: an `indicatif` spinner line on a terminal, plain log lines
//! (at most one a second) when stderr is not a terminal (CI, pipes, files).

use crate::protocol::Progress as Counters;
use indicatif::{ProgressBar, ProgressStyle};
use std::cell::Cell;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often a plain log line is written when not on a terminal.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// The progress display of one phase of a run.
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    last_log: Cell<Instant>,
}

impl Progress {
    /// A display for a phase named `label`.
    pub fn new(label: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed}] {msg}") {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self {
            bar,
            label: label.to_owned(),
            last_log: Cell::new(Instant::now()),
        }
    }

    /// Shows the latest totals.
    pub fn update(&self, c: &Counters) {
        let msg = format!(
            "{}: connected {} subscribed {} failed {} delivered {}",
            self.label, c.connected, c.ready, c.failed, c.delivered
        );
        match &self.bar {
            Some(bar) => bar.set_message(msg),
            None if self.last_log.get().elapsed() >= LOG_EVERY => {
                self.last_log.set(Instant::now());
                log::info!("{msg}");
            }
            None => {}
        }
    }

    /// Prints a line without garbling the spinner.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => log::info!("{line}"),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
