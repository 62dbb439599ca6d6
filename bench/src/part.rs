//! A fan-out split over several load hosts, without a coordinator of our
//! own: every host runs the same command with its `--part K/N`.
//!
//! - Part K opens subscribers K of N of `--subs` (global indices, so client
//!   ids stay unique) and writes its results with the workers' raw reports
//!   ([`crate::result::PartRecord`]); `fanmq-bench merge` combines them.
//! - Part 1 also publishes, once every part is subscribed: at `--start-at`
//!   (wall clock, hosts in step by NTP), and/or once the broker's
//!   `/api/v1/stats` counts `--wait-subscribers` subscriptions
//!   ([`before_publishing`]).
//! - Parts 2..N only subscribe ([`receive_only`]): they expect `--msgs`
//!   messages and stop when all arrived, when nothing arrived for
//!   `--drain-timeout` after the first one, or at their deadline:
//!   `--duration` after `--start-at`, or without it after
//!   `--connect-timeout` + `--duration` (the longest part 1 waits for the
//!   subscribers, then its time limit).

use crate::cli::Opts;
use crate::fleet::{Fleet, FleetError};
use crate::phase;
use crate::progress::Progress;
use crate::stats;
use crate::stats_api::{self, StatsApiError};
use crate::target::ScenarioError;
use std::time::Duration;

/// `--start-at` may lie at most this far ahead (s): every run is bounded,
/// and a start an hour out is a typo more often than a plan.
pub const MAX_START_AHEAD_S: f64 = 3600.0;

/// How often `--wait-subscribers` asks the broker: fanmq refreshes the
/// figure every 500 ms (its `refresh_ms`), asking faster learns nothing.
const STATS_POLL: Duration = Duration::from_millis(500);

/// Checks the options of a split run.
///
/// # Errors
/// `--part` with `--compare`, a `--start-at` in the past or too far ahead,
/// `--wait-subscribers 0`.
pub fn validate(o: &Opts) -> Result<(), ScenarioError> {
    let bad = |what: String| Err(ScenarioError::Invalid(what));
    if o.part.is_some() && !o.compare.is_empty() {
        return bad("--part splits a run against one broker over hosts: drop --compare".into());
    }
    if let Some(at) = o.start_at {
        let ahead = at - stats::realtime_ns() as f64 / 1e9;
        if ahead < 0.0 {
            return bad(format!("--start-at is {:.0} s in the past", -ahead));
        }
        if ahead > MAX_START_AHEAD_S {
            return bad(format!(
                "--start-at is {ahead:.0} s ahead, more than the {MAX_START_AHEAD_S} s allowed"
            ));
        }
    }
    if o.wait_subscribers == Some(0) {
        return bad("--wait-subscribers must be at least 1".into());
    }
    Ok(())
}

/// Seconds from now until `--start-at` (negative once it passed).
fn until_start(at: f64) -> f64 {
    at - stats::realtime_ns() as f64 / 1e9
}

/// The publishing part, subscribed: waits for `--start-at`, then for
/// `--wait-subscribers` subscriptions at the broker. A start that passed
/// while this part was still subscribing goes into `notes`.
///
/// # Errors
/// A worker failed, or the broker did not reach the count within
/// `--connect-timeout` (with the last request's error, if it failed).
pub fn before_publishing(
    fleet: &mut Fleet,
    o: &Opts,
    progress: &Progress,
    notes: &mut Vec<String>,
) -> Result<(), ScenarioError> {
    if let Some(at) = o.start_at {
        let wait = until_start(at);
        if wait < 0.0 {
            notes.push(format!(
                "subscribed {:.1} s after --start-at: published at once",
                -wait
            ));
        } else {
            progress.println(&format!("publishing at --start-at, in {wait:.1} s"));
            let waited = fleet.gather::<()>(
                "--start-at",
                Duration::from_secs_f64(wait) + Duration::from_secs(5),
                progress,
                |_| None,
                |_| until_start(at) <= 0.0,
            );
            match waited {
                Ok(_) | Err(FleetError::Timeout(..)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let Some(wanted) = o.wait_subscribers else {
        return Ok(());
    };
    let host = o.host.as_deref().unwrap_or("127.0.0.1");
    let first_host = host.split(',').next().unwrap_or(host).trim();
    let urls = if o.stats_url.is_empty() {
        vec![stats_api::default_url(first_host)]
    } else {
        o.stats_url.clone()
    };
    let url = urls.join(", ");
    progress.println(&format!("waiting for {wanted} subscriptions at {url}"));
    let limit = Duration::from_secs_f64(o.connect_timeout);
    let mut last: Result<u64, StatsApiError> = Ok(0);
    let mut asked = std::time::Instant::now() - STATS_POLL;
    let waited = fleet.gather::<()>(
        "subscriptions at the broker",
        limit,
        progress,
        |_| None,
        |_| {
            if asked.elapsed() < STATS_POLL {
                return false;
            }
            asked = std::time::Instant::now();
            last = urls
                .iter()
                .map(|u| stats_api::subscriptions(u, o.stats_token.as_deref()))
                .sum();
            last.as_ref().is_ok_and(|&n| n >= wanted)
        },
    );
    match (waited, last) {
        (Ok(_), Ok(held)) => {
            progress.println(&format!("the broker holds {held} subscriptions"));
            Ok(())
        }
        (Err(FleetError::Timeout(..)), Ok(held)) => Err(StatsApiError::Short {
            held,
            wanted,
            seconds: o.connect_timeout,
        }
        .into()),
        (Err(FleetError::Timeout(..)), Err(e)) => Err(e.into()),
        (Err(e), _) => Err(e.into()),
        (Ok(_), Err(e)) => Err(e.into()),
    }
}

/// A part that only subscribes: waits for the deliveries of `--msgs`
/// messages to its `ready` subscribers (see the module doc for when it
/// stops).
///
/// # Errors
/// A worker failed.
pub fn receive_only(
    fleet: &mut Fleet,
    o: &Opts,
    ready: u64,
    progress: &Progress,
) -> Result<(), ScenarioError> {
    let wait_s = o
        .start_at
        .map_or(o.connect_timeout, |at| until_start(at).max(0.0));
    let deadline = stats::monotonic_ns() + ((wait_s + o.duration) * 1e9) as u64;
    progress.println(&format!(
        "receiving only (part 1 publishes), for at most {:.0} s",
        wait_s + o.duration
    ));
    phase::await_deliveries(
        fleet,
        o,
        phase::expected(o, ready, o.msgs),
        deadline,
        progress,
        |p| p.delivered > 0,
    )
}
