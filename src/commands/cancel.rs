//! `foreman cancel ID…`: cancels queued tasks before they start, and aborts running ones: the
//! attempt is marked in the database, the daemons are poked, and the daemon running it stops it
//! (cancellation flag; SIGTERM, then SIGKILL after `--grace`). It then waits (up to `--timeout`)
//! for each aborted attempt to end, and says for each id what became of it.

use std::time::{Duration, Instant};

use clap::Args;

use super::{Globals, distinct, exit_status, print};
use crate::duration::{format_duration, parse_duration};
use crate::error::Result;
use crate::store::{Access, CancelOutcome, Store};

// One code per outcome, so that a script cancelling one id learns which it was; with several ids
// the highest applies, the one that needs a look.
const EXIT_CODES: &str = "\
Exit codes (with several ids, the highest that applies):
  0  cancelled: every task was still queued, and is deleted before it started
  1  runtime failure (a database error)
  2  usage error
  3  aborted: at least one was running, and was stopped (its attempt is recorded cancelled and
     is not retried; it may have done part of its work)
  4  at least one had already finished (done, failed, dead, cancelled…), or finished before the
     abort reached it
  5  at least one abort was asked for, but the attempt still ran at --timeout (is the daemon
     that runs it up?); it is stopped when that daemon reads the request
  6  at least one id is unknown (never enqueued, or its history was pruned)";

/// Cancel queued tasks, and abort running ones (SIGTERM, SIGKILL after --grace)
#[derive(Args, Debug)]
#[command(after_help = EXIT_CODES)]
pub struct CancelArgs {
    /// Task ids
    #[arg(required = true, value_name = "ID")]
    pub ids: Vec<i64>,
    /// For a running command or pool task: between SIGTERM to its process group and SIGKILL
    #[arg(long, default_value = DEFAULT_GRACE, value_parser = parse_duration, value_name = "DURATION")]
    pub grace: Duration,
    /// How long to wait for aborted attempts to end (0: ask, and do not wait)
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
}

/// `--grace`'s default, which the dashboard's aborts use too.
pub const DEFAULT_GRACE: &str = "5s";

/// What became of one id, in the order of the exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Became {
    Cancelled = 0,
    Aborted = 3,
    Finished = 4,
    StillRunning = 5,
    Unknown = 6,
}

/// How long to go without looking at the database while waiting for an abort (a missed change).
const LOOK_EVERY: Duration = Duration::from_millis(500);

pub fn run(globals: &Globals, args: &CancelArgs) -> Result<()> {
    let config = globals.load_config()?;
    let mut store = Store::open_checked(&config.db, Access::ReadWrite)?;
    let mut worst = Became::Cancelled;
    let mut aborting = Vec::new();
    let mut cancelled = 0;
    let grace = args.grace.as_secs_f64();
    for id in distinct(&args.ids) {
        // Each in its own transaction, and printed at once: what was cancelled stays cancelled
        // and reported even if a later id fails.
        let outcome = store.cancel(id, grace)?;
        let became = match &outcome {
            CancelOutcome::Cancelled { .. } => {
                cancelled += 1;
                Became::Cancelled
            }
            CancelOutcome::Aborting { task_name, attempt } => {
                aborting.push((id, task_name.clone(), *attempt));
                continue;
            }
            CancelOutcome::Finished { .. } => Became::Finished,
            CancelOutcome::Unknown => Became::Unknown,
        };
        let line = format!("{}\n", describe(id, &outcome));
        worst = worst.max(became);
        print(&line)?;
    }
    if cancelled > 0 {
        crate::wake::announce(&store, &format!("{cancelled} queued task(s) cancelled"));
    }
    if !aborting.is_empty() {
        crate::wake::poke_control(
            &config,
            &store,
            &format!("abort of {} running task(s) requested", aborting.len()),
        );
        let watch = store.watch();
        let deadline = Instant::now().checked_add(args.timeout);
        let started = Instant::now();
        for (id, task_name, attempt) in aborting {
            let (became, line) = loop {
                let progress = store.task_progress(id)?;
                let ended = progress
                    .as_ref()
                    .filter(|p| !(p.attempt == attempt && p.state == "running"));
                if let Some(progress) = ended {
                    let took = format_duration(started.elapsed());
                    break if progress.attempt == attempt && progress.state == "cancelled" {
                        (
                            Became::Aborted,
                            format!(
                                "aborted task {id} ({task_name}), attempt {attempt}, in {took}\n"
                            ),
                        )
                    } else {
                        (
                            Became::Finished,
                            format!(
                                "task {id} ({task_name}) finished before the abort reached it: {} (attempt {})\n",
                                progress.state, progress.attempt
                            ),
                        )
                    };
                }
                let left =
                    deadline.map_or(LOOK_EVERY, |d| d.saturating_duration_since(Instant::now()));
                if left.is_zero() {
                    break (
                        Became::StillRunning,
                        format!(
                            "task {id} ({task_name}): abort requested, still running after {} (it stops when the daemon running it reads the request)\n",
                            format_duration(args.timeout)
                        ),
                    );
                }
                watch.changed_within(left.min(LOOK_EVERY));
            };
            worst = worst.max(became);
            print(&line)?;
        }
    }
    match worst {
        Became::Cancelled => Ok(()),
        other => Err(exit_status(other as u8)),
    }
}

/// What `Store::cancel` did with task `id`, in one line: what `cancel` prints (an abort, which
/// `cancel` then waits for, is said as asked) and the dashboard shows.
pub fn describe(id: i64, outcome: &CancelOutcome) -> String {
    match outcome {
        CancelOutcome::Cancelled { task_name } => {
            format!("cancelled task {id} ({task_name}) before it started")
        }
        CancelOutcome::Aborting { task_name, attempt } => format!(
            "abort of task {id} ({task_name}), attempt {attempt}, asked: the daemon running it stops it"
        ),
        CancelOutcome::Finished { state } => format!("task {id} already finished ({state})"),
        CancelOutcome::Unknown => format!("no task {id}"),
    }
}
