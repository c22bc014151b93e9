//! `foreman retry ID…`: queues finished tasks again — done, failed, timed out, lost in a crash,
//! cancelled or dead — each as a new task with the same name, args, kwargs, priority and unique
//! key (origin `retry of ID`), from what its last attempt recorded.

use std::fmt::Write as _;

use clap::Args;

use super::{Globals, distinct, exit_status, print};
use crate::error::Result;
use crate::store::{Access, Retried, Store};

const EXIT_CODES: &str = "\
Exit codes:
  0  every task was queued again
  1  at least one was not (it has not finished, its unique key is held by a queued or running
     task, its history has no args, or the id is unknown), or a runtime failure
  2  usage error";

/// Queue finished tasks again (done, failed, lost, cancelled, dead) with the same name and args
#[derive(Args, Debug)]
#[command(after_help = EXIT_CODES)]
pub struct RetryArgs {
    /// Task ids
    #[arg(required = true, value_name = "ID")]
    pub ids: Vec<i64>,
}

pub fn run(globals: &Globals, args: &RetryArgs) -> Result<()> {
    let config = globals.load_config()?;
    let mut store = Store::open_checked(&config.db, Access::ReadWrite)?;
    let outcomes = store.retry(&distinct(&args.ids))?;
    let queued = outcomes
        .iter()
        .filter(|o| matches!(o, Retried::Queued { .. }))
        .count();
    if queued > 0 {
        crate::wake::poke(&config, &store, &format!("{queued} task(s) retried"));
    }
    let mut out = String::new();
    for outcome in &outcomes {
        let _ = match outcome {
            Retried::Queued { task_id, new_id } => {
                writeln!(out, "retried task {task_id} as task {new_id}")
            }
            Retried::Duplicate {
                task_id,
                existing_id,
            } => writeln!(
                out,
                "task {task_id} not retried: task {existing_id} holds its unique key"
            ),
            Retried::NotFinished { task_id, state } => writeln!(
                out,
                "task {task_id} has not finished ({state}); wait for it, or cancel it first"
            ),
            Retried::NoArgs { task_id } => writeln!(
                out,
                "task {task_id} cannot be retried: its last attempt was recorded without its args (by a foreman before schema version 4)"
            ),
            Retried::Unknown { task_id } => writeln!(
                out,
                "no task {task_id} (never enqueued, or its history was pruned)"
            ),
        };
    }
    print(&out)?;
    if queued == outcomes.len() {
        Ok(())
    } else {
        Err(exit_status(1))
    }
}
