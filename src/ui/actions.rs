//! The dashboard's actions (`POST /api/…`): cancel queued tasks, requeue and purge dead letters,
//! run a schedule now, enqueue a task. Each goes through the CLI's own code (`cancel`,
//! `dead requeue`, `enqueue`, `schedule::run_now`) with the wakeup after (and, on PostgreSQL, a
//! `NOTIFY foreman_changed` that every dashboard's pages follow), is logged with who asked,
//! and records who asked in the origin of the task it creates. A bulk action takes the exact ids
//! the page showed the user (a frozen set, never "whatever matches now"), and a purge must be
//! confirmed by typing its count.

use serde_json::{Value, json};

use super::Shared;
use super::http::{Reply, Request};
use crate::commands::cancel::{DEFAULT_GRACE, describe};
use crate::commands::dead::{describe_requeued, requeue};
use crate::commands::enqueue::{checked, enqueue};
use crate::error::{Error, Result};
use crate::store::{CancelOutcome, DeadSelection, NewTask, Requeued, Store};

/// The most ids one action takes: the cap the pages' "select everything matching" stops at.
const MAX_IDS: usize = super::api::COUNT_CAP;

/// `POST PATH`.
pub fn handle(
    shared: &Shared,
    store: &mut Store,
    request: &mut Request,
    path: &str,
) -> Result<Reply> {
    let body = request.body()?;
    let who = request.who.clone();
    // What the origin of a task this action creates says: the proxy's user, and that it came from
    // the dashboard.
    let by = if who == "ui" {
        "ui".to_owned()
    } else {
        format!("{who} (ui)")
    };
    let doc = match path {
        "/api/tasks/cancel" => cancel(shared, store, &ids(&body)?, &by)?,
        "/api/dead/requeue" => {
            let ids = ids(&body)?;
            let outcomes = requeue(&shared.config, store, DeadSelection::Ids(&ids), Some(&by))?;
            let done = outcomes
                .iter()
                .filter(|o| matches!(o, Requeued::Task { .. }))
                .count();
            summary(
                &by,
                "requeue",
                ids.len(),
                done,
                outcomes.iter().map(describe_requeued),
            )
        }
        "/api/dead/purge" => purge(store, &body, &by)?,
        "/api/schedules/run" => {
            let name = text(&body, "name")?;
            let origin = format!("schedule {name}, run now by {by}");
            let id = crate::schedule::run_now(
                &shared.config.schedules,
                store,
                &name,
                &origin,
                store.now(),
            )?;
            crate::wake::poke(&shared.config, store, &format!("task {id} enqueued"));
            let line = format!("schedule {name}: enqueued task {id}");
            log::info!("dashboard: {by}: {line}");
            json!({"done": 1, "asked": 1, "lines": [line], "task_id": id})
        }
        "/api/enqueue" => {
            let name = text(&body, "name")?;
            let field = |key: &str, default: &str| match body.get(key) {
                None | Some(Value::Null) => Ok(default.to_owned()),
                Some(Value::String(text)) if text.trim().is_empty() => Ok(default.to_owned()),
                Some(Value::String(text)) => Ok(text.clone()),
                Some(_) => Err(Error::Config(format!("{key}: a JSON text"))),
            };
            let (args, kwargs) = checked(&name, &field("args", "[]")?, &field("kwargs", "{}")?)?;
            let delay = match body
                .get("delay")
                .and_then(Value::as_str)
                .filter(|d| !d.is_empty())
            {
                Some(text) => crate::duration::parse_duration(text)
                    .map_err(|e| Error::Config(format!("delay: {e}")))?
                    .as_secs_f64(),
                None => 0.0,
            };
            let priority = body.get("priority").and_then(Value::as_i64).unwrap_or(0);
            if !(-100..=100).contains(&priority) {
                return Err(Error::Config("priority: from -100 to 100".to_owned()));
            }
            let unique_key = body
                .get("unique_key")
                .and_then(Value::as_str)
                .filter(|k| !k.is_empty());
            let enqueued = enqueue(
                &shared.config,
                store,
                &NewTask {
                    name: &name,
                    args: &args,
                    kwargs: &kwargs,
                    delay,
                    priority,
                    origin: Some(&by),
                    unique_key,
                },
            )?;
            let id = enqueued.id;
            let line = if enqueued.created {
                format!("enqueued task {id} ({name})")
            } else {
                format!("not enqueued: task {id} holds its unique key")
            };
            log::info!("dashboard: {by}: {line}");
            json!({"done": usize::from(enqueued.created), "asked": 1, "lines": [line], "task_id": id})
        }
        _ => return Ok(Reply::error(404, &format!("no action {path}"))),
    };
    // Every dashboard's pages follow (on SQLite they see the files change).
    if let Err(e) = store.announce() {
        log::warn!(
            "dashboard: {by}: done, but telling the dashboards failed ({e}); their pages show it at their next change"
        );
    }
    Ok(Reply::ok(&doc))
}

/// Cancels each id in its own transaction, as `foreman cancel` does: a queued task is deleted
/// before it starts, a running one's attempt is marked for abort and the daemons are woken to
/// stop it (the page does not wait for it; its state shows when it ends).
fn cancel(shared: &Shared, store: &mut Store, ids: &[i64], by: &str) -> Result<Value> {
    let grace =
        crate::duration::parse_duration(DEFAULT_GRACE).map_or(5.0, |grace| grace.as_secs_f64());
    let mut lines = Vec::new();
    let mut done = 0;
    let mut aborts = 0;
    for &id in ids {
        let outcome = store.cancel(id, grace)?;
        done += usize::from(matches!(
            outcome,
            CancelOutcome::Cancelled { .. } | CancelOutcome::Aborting { .. }
        ));
        aborts += usize::from(matches!(outcome, CancelOutcome::Aborting { .. }));
        lines.push(describe(id, &outcome));
    }
    if aborts > 0 {
        crate::wake::poke_control(
            &shared.config,
            store,
            &format!("abort of {aborts} running task(s) requested"),
        );
    }
    Ok(summary(by, "cancel", ids.len(), done, lines.into_iter()))
}

/// Deletes exactly the dead letters listed, once the user typed `purge N` for the N listed.
fn purge(store: &mut Store, body: &Value, by: &str) -> Result<Value> {
    let ids = ids(body)?;
    let wanted = format!("purge {}", ids.len());
    let typed = body.get("confirm").and_then(Value::as_str).unwrap_or("");
    if typed.trim() != wanted {
        return Err(Error::Config(format!(
            "a purge deletes for good: confirm it by typing {wanted:?}"
        )));
    }
    let purged = store.purge_dead_ids(&ids)?;
    let line = format!("purged {purged} of {} dead letter(s)", ids.len());
    Ok(summary(
        by,
        "purge",
        ids.len(),
        purged,
        std::iter::once(line),
    ))
}

/// An action's answer, logged: how many of the asked it did, and the CLI's line for each.
fn summary(
    by: &str,
    action: &str,
    asked: usize,
    done: usize,
    lines: impl Iterator<Item = String>,
) -> Value {
    let lines: Vec<String> = lines.collect();
    log::info!("dashboard: {by}: {action} {done} of {asked}");
    for line in &lines {
        log::info!("dashboard: {by}: {line}");
    }
    json!({"done": done, "asked": asked, "lines": lines})
}

/// The body's `ids`: a non-empty list of whole numbers, each once, at most `MAX_IDS`.
fn ids(body: &Value) -> Result<Vec<i64>> {
    let list = body
        .get("ids")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::Config("ids: a list of ids is required".to_owned()))?;
    if list.is_empty() || list.len() > MAX_IDS {
        return Err(Error::Config(format!("ids: from 1 to {MAX_IDS} of them")));
    }
    let mut seen = std::collections::HashSet::new();
    let mut ids = Vec::with_capacity(list.len());
    for id in list {
        let id = id
            .as_i64()
            .ok_or_else(|| Error::Config(format!("ids: {id} is not a whole number")))?;
        if seen.insert(id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

fn text(body: &Value, key: &str) -> Result<String> {
    body.get(key)
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| Error::Config(format!("{key}: required")))
}
