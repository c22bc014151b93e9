//! `foreman show ID`: one task's whole story — its queued row or dead letter, every attempt
//! (state, daemon, start, end, exit status, error, result), its origin and its result — as text or
//! one JSON document with an `attempts` array.

use std::fmt::Write as _;

use clap::Args;

use super::format::{Style, age, colour_wanted, columns, one_line, span, stored_json};
use super::{Globals, print};
use crate::error::{Error, Result};
use crate::outcome::headline;
use crate::store::{Access, AttemptRecord, Store, TaskStory};

const EXIT_CODES: &str = "\
Exit codes:
  0  the task was found and shown
  1  runtime failure
  2  usage error
  3  no task has this id (never enqueued, or its history was pruned)";

/// Show everything about one task: its row, every attempt, its result
#[derive(Args, Debug)]
#[command(after_help = EXIT_CODES)]
pub struct ShowArgs {
    /// Task id
    pub id: i64,
    /// One JSON document instead of text
    #[arg(long)]
    pub json: bool,
}

pub fn run(globals: &Globals, args: &ShowArgs) -> Result<()> {
    let config = globals.load_config()?;
    let db = Store::open_checked(&config.db, Access::ReadOnly)?;
    let now = db.now();
    let Some(story) = db.task_story(args.id, now)? else {
        return Err(Error::Exit {
            code: 3,
            message: Some(format!(
                "no task {} (never enqueued, or its history was pruned)",
                args.id
            )),
        });
    };
    print(&if args.json {
        format!("{}\n", story_json(&story))
    } else {
        story_text(&story, now)
    })
}

/// What the task is now: its queued row's state, else its latest attempt's, else dead.
fn state(story: &TaskStory) -> String {
    if let Some(queued) = &story.queued {
        if let (Some(last), "leased") = (story.attempts.last(), queued.state.as_str()) {
            return last.state.clone();
        }
        return queued.state.clone();
    }
    if let Some(last) = story.attempts.last() {
        return last.state.clone();
    }
    "dead".to_owned()
}

/// The task as queued: from its row, else its latest attempt, else its dead letter.
struct Call {
    name: String,
    args: Option<String>,
    kwargs: Option<String>,
    priority: Option<i64>,
    origin: Option<String>,
    unique_key: Option<String>,
    enqueued_at: Option<f64>,
}

fn call(story: &TaskStory) -> Call {
    if let Some(q) = &story.queued {
        return Call {
            name: q.task_name.clone(),
            args: q.args.clone(),
            kwargs: q.kwargs.clone(),
            priority: Some(q.priority),
            origin: q.origin.clone(),
            unique_key: q.unique_key.clone(),
            enqueued_at: q.created_at,
        };
    }
    if let Some(a) = story.attempts.iter().rev().find(|a| a.args.is_some()) {
        return Call {
            name: a.task_name.clone(),
            args: a.args.clone(),
            kwargs: a.kwargs.clone(),
            priority: a.priority,
            origin: a.origin.clone(),
            unique_key: a.unique_key.clone(),
            enqueued_at: a.enqueued_at,
        };
    }
    if let Some(d) = &story.dead {
        return Call {
            name: d.task_name.clone().unwrap_or_else(|| "(null)".to_owned()),
            args: d.args.clone(),
            kwargs: d.kwargs.clone(),
            priority: Some(d.priority),
            origin: d.origin.clone(),
            unique_key: d.unique_key.clone(),
            enqueued_at: d.created_at,
        };
    }
    let last = story.attempts.last();
    Call {
        name: last.map(|a| a.task_name.clone()).unwrap_or_default(),
        args: None,
        kwargs: None,
        priority: None,
        origin: None,
        unique_key: None,
        enqueued_at: last.and_then(|a| a.enqueued_at),
    }
}

fn result(story: &TaskStory) -> Option<&str> {
    story
        .attempts
        .iter()
        .rev()
        .find_map(|a| a.result.as_deref())
}

/// `show --json`'s document (and the dashboard's task page).
pub fn story_json(story: &TaskStory) -> serde_json::Value {
    let call = call(story);
    let attempts: Vec<serde_json::Value> = story.attempts.iter().map(attempt_json).collect();
    serde_json::json!({
        "task_id": story.task_id,
        "task_name": call.name,
        "state": state(story),
        "args": stored_json(call.args.as_deref()),
        "kwargs": stored_json(call.kwargs.as_deref()),
        "priority": call.priority,
        "origin": call.origin,
        "unique_key": call.unique_key,
        "enqueued_at": call.enqueued_at,
        "queued": story.queued.as_ref().map(|q| serde_json::json!({
            "state": q.state,
            "run_after": q.run_after,
            "attempt": q.attempt,
        })),
        "paused_since": story.paused_since,
        "result": stored_json(result(story)),
        "dead": story.dead.as_ref().map(|d| serde_json::json!({
            "id": d.id,
            "reason": d.reason,
            "died_at": d.died_at,
            "attempts": d.attempts,
        })),
        "attempts": attempts,
    })
}

fn attempt_json(a: &AttemptRecord) -> serde_json::Value {
    serde_json::json!({
        "attempt": a.attempt,
        "state": a.state,
        "daemon": a.daemon,
        "enqueued_at": a.enqueued_at,
        "started_at": a.started_at,
        "finished_at": a.finished_at,
        "exit_code": a.exit_code,
        "error": a.error,
        "retry_at": a.retry_at,
        "result": stored_json(a.result.as_deref()),
        "abort_requested_at": a.abort_requested_at,
    })
}

fn story_text(story: &TaskStory, now: f64) -> String {
    let style = Style {
        colour: colour_wanted(),
    };
    let call = call(story);
    let mut out = String::new();
    let attempts = story.attempts.len();
    let _ = writeln!(
        out,
        "task {} {} · {}{}",
        story.task_id,
        call.name,
        state(story),
        if attempts > 0 {
            format!(
                " · {attempts} attempt{}",
                if attempts == 1 { "" } else { "s" }
            )
        } else {
            String::new()
        }
    );
    let mut facts = Vec::new();
    if let Some(at) = call.enqueued_at {
        facts.push(format!("enqueued {} ago", age(now - at)));
    }
    if let Some(priority) = call.priority.filter(|p| *p != 0) {
        facts.push(format!("priority {priority}"));
    }
    if let Some(origin) = &call.origin {
        facts.push(format!("origin: {origin}"));
    }
    if let Some(key) = &call.unique_key {
        facts.push(format!("unique key {key:?}"));
    }
    if !facts.is_empty() {
        let _ = writeln!(out, "  {}", facts.join(" · "));
    }
    if let Some(queued) = &story.queued {
        let when = match (queued.state.as_str(), queued.run_after) {
            ("later", Some(at)) => format!(", due in {}", age(at - now)),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "  queued: {} (attempt {}{when})",
            queued.state, queued.attempt
        );
    }
    if let Some(since) = story.paused_since {
        let _ = writeln!(
            out,
            "  paused for {} (foreman resume {})",
            age(now - since),
            call.name
        );
    }
    let _ = writeln!(
        out,
        "  args:   {}",
        call.args.as_deref().unwrap_or("(unknown)")
    );
    let _ = writeln!(
        out,
        "  kwargs: {}",
        call.kwargs.as_deref().unwrap_or("(unknown)")
    );
    if let Some(result) = result(story) {
        let _ = writeln!(out, "  result: {result}");
    }
    if let Some(dead) = &story.dead {
        let _ = writeln!(
            out,
            "  dead letter {}: {}",
            dead.id,
            headline(&dead.reason).unwrap_or_default()
        );
    }
    out.push_str(&attempts_table(&story.attempts, now, style));
    out
}

/// Every attempt, one a line: state, daemon, start, run time, exit status, error's last line.
fn attempts_table(attempts: &[AttemptRecord], now: f64, style: Style) -> String {
    if attempts.is_empty() {
        return String::new();
    }
    {
        let rows: Vec<Vec<String>> = attempts
            .iter()
            .map(|a| {
                let ran = match (a.started_at, a.finished_at) {
                    (Some(s), Some(f)) => span((f - s).max(0.0)),
                    (Some(s), None) => format!("{} so far", span((now - s).max(0.0))),
                    _ => String::new(),
                };
                vec![
                    a.attempt.to_string(),
                    a.state.clone(),
                    a.daemon.clone().unwrap_or_default(),
                    a.started_at
                        .map_or_else(String::new, |s| format!("{} ago", age(now - s))),
                    ran,
                    a.exit_code.map_or_else(String::new, |c| c.to_string()),
                    a.error
                        .as_deref()
                        .and_then(headline)
                        .map(|e| one_line(e, 60))
                        .unwrap_or_default(),
                ]
            })
            .collect();
        columns(
            "  ",
            &["#", "STATE", "DAEMON", "STARTED", "RAN", "EXIT", "ERROR"],
            &rows,
            &[true, false, false, false, true, true, false],
            style,
        )
    }
}
