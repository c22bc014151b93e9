//! `foreman wait ID`: waits for a task's outcome, across its retries, and prints it with the
//! task's result. It watches the database for commits (so an answer comes as soon as the task
//! ends) and looks on a timer too.

use std::time::Duration;

use clap::Args;

use super::{Globals, exit_status, print};
use crate::client::wait_for;
use crate::duration::{format_duration, parse_duration};
use crate::error::{Error, Result};
use crate::outcome::headline;
use crate::store::{Access, Store, TaskProgress};

// `wait` answers with its status, so its codes differ from the others' on purpose.
const EXIT_CODES: &str = "\
Exit codes:
  0  the task is done
  1  it failed for good: failed, timeout or lost with no retry left, dead, or cancelled
     (also a runtime failure such as a database error, told apart by its message on stderr)
  2  --timeout passed first (stderr says the state the task is in), or a usage error
  3  no task has this id (never enqueued, or its history was pruned)";

/// Wait for a task's outcome, across its retries, and print it
#[derive(Args, Debug)]
#[command(after_help = EXIT_CODES)]
pub struct WaitArgs {
    /// Task id, as enqueue printed it
    pub id: i64,
    /// Give up after this long
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// One JSON document instead of text
    #[arg(long)]
    pub json: bool,
}

pub fn run(globals: &Globals, args: &WaitArgs) -> Result<()> {
    let WaitArgs { id, timeout, json } = *args;
    let config = globals.load_config()?;
    let store = Store::open_checked(&config.db, Access::ReadOnly)?;
    let Some(progress) = wait_for(&store, id, timeout)? else {
        return Err(Error::Exit {
            code: 3,
            message: Some(format!(
                "no task {id} (never enqueued, or its history was pruned)"
            )),
        });
    };
    if progress.is_final {
        print(&if json {
            progress_json(&progress)
        } else {
            outcome_line(&progress)
        })?;
        if progress.succeeded() {
            return Ok(());
        }
        return Err(exit_status(1));
    }
    if json {
        print(&progress_json(&progress))?;
    }
    Err(Error::Exit {
        code: 2,
        message: Some(format!(
            "task {id} still {} after {}",
            progress.state,
            format_duration(timeout)
        )),
    })
}

/// `task 12 done (attempt 2, ran 0.31s)`, `task 12 failed (attempt 3): <the error's last line>`.
fn outcome_line(progress: &TaskProgress) -> String {
    let id = progress.task_id;
    if progress.state == "done" {
        let ran = match (progress.started_at, progress.finished_at) {
            (Some(started), Some(finished)) => {
                format!(", ran {:.2}s", (finished - started).max(0.0))
            }
            _ => String::new(),
        };
        let result = progress
            .result
            .as_deref()
            .map(|result| format!("result: {result}\n"))
            .unwrap_or_default();
        return format!(
            "task {id} done (attempt {}{ran})\n{result}",
            progress.attempt
        );
    }
    let attempt = if progress.attempt == 0 {
        "never ran".to_owned()
    } else {
        format!("attempt {}", progress.attempt)
    };
    let error = progress
        .error
        .as_deref()
        .and_then(headline)
        .map(|line| format!(": {line}"))
        .unwrap_or_default();
    format!("task {id} {} ({attempt}){error}\n", progress.state)
}

fn progress_json(progress: &TaskProgress) -> String {
    let doc = serde_json::json!({
        "task_id": progress.task_id,
        "task_name": progress.task_name,
        "state": progress.state,
        "attempt": progress.attempt,
        "final": progress.is_final,
        "error": progress.error,
        "enqueued_at": progress.enqueued_at,
        "started_at": progress.started_at,
        "finished_at": progress.finished_at,
        "result": super::format::stored_json(progress.result.as_deref()),
    });
    format!("{doc}\n")
}
