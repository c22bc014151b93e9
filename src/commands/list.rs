//! `foreman list`: tasks by state — queued (due, later, paused), leased, running, and with
//! `--state` the history (done, failed, timeout, lost, cancelled, dead) — filtered by name,
//! priority and a text in their args, a page at a time in id order (`--after ID`). Each page is
//! index walks that stop at its end: fast at any queue depth. Nothing is counted unless `--count`.

use std::fmt::Write as _;

use clap::Args;

use super::format::{Style, age, colour_wanted, columns, one_line, stored_json};
use super::{Globals, print};
use crate::error::Result;
use crate::store::{Access, ListQuery, ListedTask, Store};

/// List tasks: queued, leased and running ones, or those in the given states, newest first
#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only tasks in these states: queued (= due, later, paused), due, later, paused, leased,
    /// running, done, failed, timeout, lost, cancelled, dead [default: every queued, leased and
    /// running task]
    #[arg(long, value_delimiter = ',', value_name = "STATE")]
    pub state: Vec<String>,
    /// Only tasks of this name
    #[arg(long, value_name = "NAME")]
    pub task: Option<String>,
    /// Only tasks of this priority
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    pub priority: Option<i64>,
    /// Only tasks whose args or kwargs (as JSON text), or error, contain this text
    #[arg(long, value_name = "TEXT")]
    pub search: Option<String>,
    /// Oldest (lowest id) first
    #[arg(long)]
    pub oldest_first: bool,
    /// At most this many
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub limit: usize,
    /// The next page: tasks after this id (the last one of the previous page)
    #[arg(long, value_name = "ID")]
    pub after: Option<i64>,
    /// Print how many tasks match instead (this walks all of them)
    #[arg(long)]
    pub count: bool,
    /// A JSON array of objects instead of text
    #[arg(long)]
    pub json: bool,
}

/// Args and kwargs are cut to this width in the text form.
const ARGS_WIDTH: usize = 60;
const NAME_WIDTH: usize = 40;

pub fn run(globals: &Globals, args: &ListArgs) -> Result<()> {
    let config = globals.load_config()?;
    let store = Store::open_checked(&config.db, Access::ReadOnly)?;
    let query = ListQuery {
        states: args.state.iter().map(String::as_str).collect(),
        task: args.task.as_deref(),
        priority: args.priority,
        search: args.search.as_deref(),
        newest_first: !args.oldest_first,
        after: args.after,
        limit: args.limit,
        now: store.now(),
    };
    if args.count {
        let count = store.count(&query)?;
        return print(&if args.json {
            format!("{}\n", serde_json::json!({ "count": count }))
        } else {
            format!("{count}\n")
        });
    }
    let tasks = store.list(&query)?;
    if args.json {
        let docs: Vec<serde_json::Value> = tasks.iter().map(task_json).collect();
        return print(&format!("{}\n", serde_json::Value::Array(docs)));
    }
    print(&text(&tasks, args, query.now))
}

/// One element of the `--json` array.
pub fn task_json(task: &ListedTask) -> serde_json::Value {
    serde_json::json!({
        "id": task.id,
        "task_name": task.task_name,
        "state": task.state,
        "args": stored_json(task.args.as_deref()),
        "kwargs": stored_json(task.kwargs.as_deref()),
        "priority": task.priority,
        "run_after": task.run_after,
        "attempt": task.attempt,
        "enqueued_at": task.created_at,
        "origin": task.origin,
        "unique_key": task.unique_key,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
        "error": task.error,
    })
}

fn text(tasks: &[ListedTask], args: &ListArgs, now: f64) -> String {
    if tasks.is_empty() {
        return if args.after.is_some() {
            "no more tasks\n".to_owned()
        } else {
            "no tasks\n".to_owned()
        };
    }
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|task| {
            // When: due in / waited for a queued task, how long it has run, or since it ended.
            let when = match task.state.as_str() {
                "later" => task
                    .run_after
                    .map_or_else(String::new, |at| format!("in {}", age(at - now))),
                "running" | "leased" => task
                    .started_at
                    .map_or_else(String::new, |at| format!("for {}", age(now - at))),
                "due" | "paused" => task
                    .created_at
                    .map_or_else(String::new, |at| format!("{} ago", age(now - at))),
                _ => task
                    .finished_at
                    .map_or_else(String::new, |at| format!("{} ago", age(now - at))),
            };
            let call = format!(
                "{} {}",
                task.args.as_deref().unwrap_or("[]"),
                task.kwargs.as_deref().unwrap_or("{}")
            );
            vec![
                task.id.to_string(),
                task.state.clone(),
                one_line(&task.task_name, NAME_WIDTH),
                task.attempt.to_string(),
                task.priority.to_string(),
                when,
                one_line(call.trim_end_matches(" {}"), ARGS_WIDTH),
            ]
        })
        .collect();
    let mut out = columns(
        "",
        &["ID", "STATE", "NAME", "ATTEMPT", "PRI", "WHEN", "ARGS"],
        &rows,
        &[true, false, false, true, true, false, false],
        Style {
            colour: colour_wanted(),
        },
    );
    if tasks.len() == args.limit
        && let Some(last) = tasks.last()
    {
        let _ = writeln!(out, "more: foreman list --after {} …", last.id);
    }
    out
}
