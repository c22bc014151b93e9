//! `foreman dead list|requeue|purge`: the dead letters, tasks that could not run or ran out of
//! retries: listed newest first, queued again as new tasks, or deleted.

use std::fmt::Write as _;
use std::time::Duration;

use clap::Subcommand;

use super::format::{ago, one_line, stored_json};
use super::{Globals, distinct, exit_status, print};
use crate::clock::unix_now;
use crate::config::Config;
use crate::duration::parse_duration;
use crate::error::Result;
use crate::outcome::headline;
use crate::store::{Access, DeadLetter, DeadSelection, Requeued, Store};

const REQUEUE_EXIT_CODES: &str = "\
Exit codes:
  0  every selected dead letter was requeued
  1  at least one was not (unknown id, no task name, or its unique key is held by a queued or
     running task), or a runtime failure
  2  usage error (neither IDs nor --all, or both)";

/// The width `dead list` fits its lines to, by shortening the reason.
const LINE_WIDTH: usize = 100;

#[derive(Subcommand, Debug)]
pub enum DeadCommand {
    /// List dead letters, newest first
    List {
        /// One JSON document instead of text
        #[arg(long)]
        json: bool,
        /// Only those of this task name
        #[arg(long, value_name = "NAME")]
        task: Option<String>,
        /// Show at most this many
        #[arg(long, default_value_t = 100, value_name = "N")]
        limit: usize,
    },
    /// Queue dead letters again as new tasks (same name, args, kwargs and priority; due now)
    #[command(after_help = REQUEUE_EXIT_CODES)]
    #[command(group(clap::ArgGroup::new("which").required(true).args(["ids", "all"])))]
    Requeue {
        /// Dead-letter ids (the first column of dead list, not task ids)
        #[arg(value_name = "ID")]
        ids: Vec<i64>,
        /// Every dead letter (or every one of --task)
        #[arg(long)]
        all: bool,
        /// With --all: only those of this task name
        #[arg(long, value_name = "NAME", conflicts_with = "ids")]
        task: Option<String>,
    },
    /// Delete dead letters and print how many
    Purge {
        /// Only those that died longer ago than this, e.g. 30d [default: all]
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        older_than: Option<Duration>,
        /// Only those of this task name
        #[arg(long, value_name = "NAME")]
        task: Option<String>,
    },
}

pub fn run(globals: &Globals, command: &DeadCommand) -> Result<()> {
    let config = globals.load_config()?;
    match command {
        DeadCommand::List { json, task, limit } => {
            dead_list(&config, *json, task.as_deref(), *limit)
        }
        DeadCommand::Requeue { ids, all, task } => {
            let which = if *all {
                DeadSelection::All {
                    task: task.as_deref(),
                }
            } else {
                DeadSelection::Ids(ids)
            };
            dead_requeue(&config, which)
        }
        DeadCommand::Purge { older_than, task } => {
            let mut store = Store::open_checked(&config.db, Access::ReadWrite)?;
            let purged = store.purge_dead(*older_than, task.as_deref())?;
            let plural = if purged == 1 { "" } else { "s" };
            if purged > 0 {
                crate::wake::announce(&store, &format!("purged {purged} dead letter{plural}"));
            }
            print(&format!("purged {purged} dead letter{plural}\n"))
        }
    }
}

fn dead_list(config: &Config, json: bool, task: Option<&str>, limit: usize) -> Result<()> {
    let store = Store::open_checked(&config.db, Access::ReadOnly)?;
    let page = store.dead_letters(task, limit)?;
    if json {
        let dead: Vec<serde_json::Value> = page.rows.iter().map(dead_json).collect();
        let doc = serde_json::json!({ "total": page.total, "dead": dead });
        return print(&format!("{doc}\n"));
    }
    let mut out = if page.total == 0 {
        "no dead letters\n".to_owned()
    } else {
        dead_table(&page.rows)
    };
    if usize::try_from(page.total).is_ok_and(|total| total > page.rows.len()) {
        let _ = writeln!(
            out,
            "showing the newest {} of {} dead letters (--limit N shows more)",
            page.rows.len(),
            page.total
        );
    }
    print(&out)
}

/// Aligned columns, one dead letter a line; the reason is its last line, cut to fit.
fn dead_table(rows: &[DeadLetter]) -> String {
    const HEADER: [&str; 6] = ["DEAD", "TASK", "NAME", "ATTEMPTS", "DIED", "REASON"];
    let now = unix_now();
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|dead| {
            [
                dead.id.to_string(),
                dead.task_id.to_string(),
                one_line(dead.task_name.as_deref().unwrap_or("(null)"), 40),
                dead.attempts.to_string(),
                dead.died_at
                    .map_or_else(|| "?".to_owned(), |t| ago(now - t)),
                headline(&dead.reason).unwrap_or_default().to_owned(),
            ]
        })
        .collect();
    let mut widths = HEADER.map(|h| h.chars().count());
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let reason_width = LINE_WIDTH
        .saturating_sub(widths[..5].iter().sum::<usize>() + 2 * 5)
        .max(20);
    let mut out = String::new();
    let header = HEADER.map(str::to_owned);
    for [dead, task, name, attempts, died, reason] in std::iter::once(&header).chain(&cells) {
        let [w0, w1, w2, w3, w4, _] = widths;
        let reason = one_line(reason, reason_width);
        let _ = writeln!(
            out,
            "{dead:>w0$}  {task:>w1$}  {name:<w2$}  {attempts:>w3$}  {died:<w4$}  {reason}"
        );
    }
    out
}

/// A dead letter as `dead list --json` gives it (and the dashboard's API).
pub fn dead_json(dead: &DeadLetter) -> serde_json::Value {
    serde_json::json!({
        "id": dead.id,
        "task_id": dead.task_id,
        "task_name": dead.task_name,
        "args": stored_json(dead.args.as_deref()),
        "kwargs": stored_json(dead.kwargs.as_deref()),
        "reason": dead.reason,
        "created_at": dead.created_at,
        "died_at": dead.died_at,
        "attempts": dead.attempts,
        "priority": dead.priority,
        "origin": dead.origin,
        "unique_key": dead.unique_key,
    })
}

fn dead_requeue(config: &Config, which: DeadSelection<'_>) -> Result<()> {
    let ids;
    let which = match which {
        DeadSelection::Ids(given) => {
            ids = distinct(given);
            DeadSelection::Ids(&ids)
        }
        all @ DeadSelection::All { .. } => all,
    };
    let mut store = Store::open_checked(&config.db, Access::ReadWrite)?;
    let outcomes = requeue(config, &mut store, which, None)?;
    let mut out = String::new();
    for outcome in &outcomes {
        let _ = writeln!(out, "{}", describe_requeued(outcome));
    }
    if outcomes.is_empty() {
        out.push_str("no dead letters to requeue\n");
    }
    print(&out)?;
    let requeued = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, Requeued::Task { .. }))
        .count();
    if requeued == outcomes.len() {
        Ok(())
    } else {
        Err(exit_status(1))
    }
}

/// Requeues dead letters (`by`, who asked, goes into the new tasks' origin) and wakes the daemon
/// when any was: `dead requeue` and the dashboard.
pub fn requeue(
    config: &Config,
    store: &mut Store,
    which: DeadSelection<'_>,
    by: Option<&str>,
) -> Result<Vec<Requeued>> {
    let outcomes = store.requeue_dead(which, by)?;
    let requeued = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, Requeued::Task { .. }))
        .count();
    if requeued > 0 {
        crate::wake::poke(
            config,
            store,
            &format!("{requeued} dead letter(s) requeued"),
        );
    }
    Ok(outcomes)
}

/// What became of one dead letter, in one line: what `dead requeue` prints and the dashboard
/// shows.
pub fn describe_requeued(outcome: &Requeued) -> String {
    match outcome {
        Requeued::Task { dead_id, task_id } => format!("requeued dead {dead_id} as task {task_id}"),
        Requeued::Duplicate { dead_id, task_id } => format!(
            "dead {dead_id} not requeued: task {task_id} holds its unique key; it stays in foreman_dead"
        ),
        Requeued::NoName { dead_id } => format!(
            "dead {dead_id} has no task name and cannot be requeued; it stays in foreman_dead"
        ),
        Requeued::Unknown { dead_id } => format!("no dead letter {dead_id}"),
    }
}
