//! `foreman cancel ID…`: cancels queued tasks that have not started; says for each id what
//! became of it.

use clap::Args;

use super::{Globals, distinct, exit_status, print};
use crate::error::Result;
use crate::store::{Access, CancelOutcome, Store};

const EXIT_CODES: &str = "\
Exit codes:
  0  every task was cancelled
  1  at least one was not (it had started, had finished or does not exist), or a runtime failure
  2  usage error";

/// Cancel queued tasks that have not started yet
#[derive(Args, Debug)]
#[command(after_help = EXIT_CODES)]
pub struct CancelArgs {
    /// Task ids
    #[arg(required = true, value_name = "ID")]
    pub ids: Vec<i64>,
}

pub fn run(globals: &Globals, args: &CancelArgs) -> Result<()> {
    let config = globals.load_config()?;
    let mut store = Store::open_checked(&config.db, Access::ReadWrite)?;
    let mut every_one = true;
    for id in distinct(&args.ids) {
        // Each in its own transaction, and printed at once: what was cancelled stays cancelled
        // and reported even if a later id fails.
        let outcome = store.cancel(id)?;
        every_one &= matches!(outcome, CancelOutcome::Cancelled { .. });
        print(&format!("{}\n", describe(id, &outcome)))?;
    }
    if every_one {
        Ok(())
    } else {
        Err(exit_status(1))
    }
}

/// What became of cancelling task `id`, in one line: what `cancel` prints and the dashboard shows.
pub fn describe(id: i64, outcome: &CancelOutcome) -> String {
    match outcome {
        CancelOutcome::Cancelled { task_name } => format!("cancelled task {id} ({task_name})"),
        CancelOutcome::Running { leased: false } => format!(
            "task {id} is running and cannot be cancelled: under at-most-once delivery a started task runs to its end"
        ),
        CancelOutcome::Running { leased: true } => format!(
            "task {id} is running and cannot be cancelled: a started task runs to its end (at-least-once: its row goes when it finishes)"
        ),
        CancelOutcome::Finished { state } => format!("task {id} already finished ({state})"),
        CancelOutcome::Unknown => format!("no task {id}"),
    }
}
