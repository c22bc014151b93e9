//! The operator's queries behind the CLI: where a task stands (`wait`), cancelling a queued task or
//! asking for a running one to be aborted, queueing a finished task again (`retry`), and listing,
//! requeueing and purging dead letters. It never pops: only the foreman loop starts tasks, and a
//! row this module deletes is one that has not started.

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::{SqliteStore, cell};
use crate::error::Result;
use crate::store::row::Cell;
use crate::store::types::{
    CancelOutcome, DeadLetter, DeadPage, DeadSelection, Requeued, Retried, TaskProgress,
};

const NOW: &str = "(julianday('now') - 2440587.5) * 86400.0";

/// A `foreman_task` row as `foreman_run.task` keeps it (what the pop writes, in SQL): args and
/// kwargs that are not JSON are kept as strings.
const TASK_DOCUMENT: &str = "json_object(\
     'args', CASE WHEN json_valid(args) THEN json(args) ELSE args END, \
     'kwargs', CASE WHEN json_valid(kwargs) THEN json(kwargs) ELSE kwargs END, \
     'priority', priority, 'origin', origin)";

impl SqliteStore {
    /// Where task `id` stands, read in one snapshot; `None` when no table knows the id.
    pub fn task_progress(&self, id: i64) -> Result<Option<TaskProgress>> {
        let err = |e| self.err(e);
        // One read transaction: the pop deletes the row and writes the attempt in one commit, so
        // the task is always in exactly one of the places looked at.
        let tx = self.conn.unchecked_transaction().map_err(err)?;
        let latest = latest_run(&tx, id).map_err(err)?;
        if let Some(run) = &latest
            && run.state == "running"
        {
            return Ok(latest);
        }
        if let Some(queued) = queued_task(&tx, id).map_err(err)? {
            return Ok(Some(queued));
        }
        if latest.is_some() {
            return Ok(latest);
        }
        latest_dead(&tx, id).map_err(err)
    }

    /// Cancels task `id`: if it has not started, its row is deleted and the attempt it would have
    /// been is recorded `cancelled`, in one transaction; if it runs, its attempt is marked for
    /// abort (with `grace` seconds between SIGTERM and SIGKILL), which the daemon running it
    /// carries out once it reads its control state (`control`).
    pub fn cancel(&mut self, id: i64, grace: f64) -> Result<CancelOutcome> {
        self.write(|tx| cancel_in(tx, id, grace))
    }

    /// Queues finished tasks again, each as a new task with the name, args, kwargs, priority and
    /// unique key of its last attempt (or of its dead letter), due now, origin `retry of ID`, in
    /// one transaction. One outcome per id, in the order given.
    pub fn retry(&mut self, ids: &[i64]) -> Result<Vec<Retried>> {
        self.write(|tx| ids.iter().map(|&id| retry_one(tx, id)).collect())
    }

    /// The newest `limit` dead letters (of `task` only, if given), and how many there are.
    pub fn dead_letters(&self, task: Option<&str>, limit: usize) -> Result<DeadPage> {
        let err = |e| self.err(e);
        let tx = self.conn.unchecked_transaction().map_err(err)?;
        let total = tx
            .query_row(
                "SELECT count(*) FROM foreman_dead WHERE ?1 IS NULL OR task_name = ?1",
                [task],
                |r| r.get(0),
            )
            .map_err(err)?;
        let rows = tx
            .prepare(&format!(
                "SELECT {DEAD_COLUMNS} FROM foreman_dead WHERE ?1 IS NULL OR task_name = ?1 \
                 ORDER BY id DESC LIMIT ?2"
            ))
            .map_err(err)?
            .query_map(
                params![task, i64::try_from(limit).unwrap_or(i64::MAX)],
                dead_letter,
            )
            .map_err(err)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(err)?;
        Ok(DeadPage { total, rows })
    }

    /// Queues the selected dead letters again as new tasks (same name, args, kwargs and priority,
    /// due now, origin naming the dead row and, if given, who asked) and deletes them, all in one
    /// transaction. Returns one outcome per dead letter, in id order for `All`, in the given order
    /// for `Ids`.
    pub fn requeue_dead(
        &mut self,
        which: DeadSelection<'_>,
        by: Option<&str>,
    ) -> Result<Vec<Requeued>> {
        self.write(|tx| {
            let ids = match which {
                DeadSelection::Ids(ids) => ids.to_vec(),
                DeadSelection::All { task } => tx
                    .prepare(
                        "SELECT id FROM foreman_dead WHERE ?1 IS NULL OR task_name = ?1 ORDER BY id",
                    )?
                    .query_map([task], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<i64>>>()?,
            };
            ids.into_iter().map(|id| requeue_one(tx, id, by)).collect()
        })
    }

    /// Deletes the dead letters that died more than `older_than` ago (all of them without it), of
    /// `task` only if given. Returns how many.
    pub fn purge_dead(
        &mut self,
        older_than: Option<Duration>,
        task: Option<&str>,
    ) -> Result<usize> {
        self.conn
            .execute(
                &format!(
                    "DELETE FROM foreman_dead WHERE (?1 IS NULL OR died_at < {NOW} - ?1) \
                     AND (?2 IS NULL OR task_name = ?2)"
                ),
                params![older_than.map(|d| d.as_secs_f64()), task],
            )
            .map_err(|e| self.err(e))
    }
}

/// The columns `dead_letter` reads, in its order.
pub(super) const DEAD_COLUMNS: &str = "id, task_id, task_name, args, kwargs, reason, created_at, \
     died_at, attempts, priority, origin, unique_key";

/// A `foreman_dead` row selected with `DEAD_COLUMNS`.
pub(super) fn dead_letter(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        id: r.get(0)?,
        task_id: r.get(1)?,
        task_name: text(cell(r, 2)?),
        args: text(cell(r, 3)?),
        kwargs: text(cell(r, 4)?),
        reason: text(cell(r, 5)?).unwrap_or_default(),
        created_at: cell(r, 6)?.as_f64(),
        died_at: cell(r, 7)?.as_f64(),
        attempts: integer(&cell(r, 8)?),
        priority: integer(&cell(r, 9)?),
        origin: text(cell(r, 10)?),
        unique_key: text(cell(r, 11)?),
    })
}

/// The task's attempt with the highest number, if it has one.
fn latest_run(conn: &Connection, id: i64) -> rusqlite::Result<Option<TaskProgress>> {
    conn.prepare_cached(
        "SELECT attempt, task_name, state, enqueued_at, started_at, finished_at, error, retry_at, result \
         FROM foreman_run WHERE task_id = ?1 ORDER BY attempt DESC LIMIT 1",
    )?
    .query_row([id], |r| {
        let state = text(cell(r, 2)?).unwrap_or_default();
        let retry_at = cell(r, 7)?.as_f64();
        Ok(TaskProgress {
            task_id: id,
            task_name: cell(r, 1)?.into_text_lossy(),
            is_final: is_final(&state, retry_at),
            state,
            attempt: r.get(0)?,
            error: text(cell(r, 6)?),
            enqueued_at: cell(r, 3)?.as_f64(),
            started_at: cell(r, 4)?.as_f64(),
            finished_at: cell(r, 5)?.as_f64(),
            result: text(cell(r, 8)?),
        })
    })
    .optional()
}

/// Whether an attempt in `state` is the task's last. A state this binary does not know (a newer
/// daemon's) is not claimed as an outcome.
fn is_final(state: &str, retry_at: Option<f64>) -> bool {
    match state {
        "done" | "dead" | "cancelled" => true,
        "failed" | "timeout" | "lost" => retry_at.is_none(),
        _ => false,
    }
}

/// The task's row in `foreman_task`: waiting (queued, delayed until `run_after`, or held back
/// by a pause of its name) or leased.
fn queued_task(conn: &Connection, id: i64) -> rusqlite::Result<Option<TaskProgress>> {
    conn.prepare_cached(&format!(
        "SELECT task_name, created_at, attempt, leased_at IS NOT NULL, run_after > {NOW}, \
         paused = 1 OR EXISTS (SELECT 1 FROM foreman_pause p WHERE p.task_name IN ('', foreman_task.task_name)) \
         FROM foreman_task WHERE id = ?1"
    ))?
    .query_row([id], |r| {
        let state = match (r.get::<_, bool>(3)?, r.get::<_, bool>(5)?, r.get::<_, bool>(4)?) {
            (true, _, _) => "leased",
            (false, true, _) => "paused",
            (false, false, true) => "delayed",
            (false, false, false) => "queued",
        };
        Ok(TaskProgress {
            task_id: id,
            task_name: cell(r, 0)?.into_text_lossy(),
            state: state.to_owned(),
            attempt: attempt(&cell(r, 2)?),
            is_final: false,
            error: None,
            enqueued_at: cell(r, 1)?.as_f64(),
            started_at: None,
            finished_at: None,
            result: None,
        })
    })
    .optional()
}

/// The task as a dead letter, for a row that died before it had an attempt (or whose history was
/// pruned). `foreman_dead` has no index on `task_id`: this scans it, once per `wait`, at its end.
fn latest_dead(conn: &Connection, id: i64) -> rusqlite::Result<Option<TaskProgress>> {
    conn.prepare_cached(
        "SELECT task_name, created_at, reason, died_at, attempts FROM foreman_dead \
         WHERE task_id = ?1 ORDER BY id DESC LIMIT 1",
    )?
    .query_row([id], |r| {
        Ok(TaskProgress {
            task_id: id,
            task_name: cell(r, 0)?.into_text_lossy(),
            state: "dead".to_owned(),
            attempt: integer(&cell(r, 4)?),
            is_final: true,
            error: text(cell(r, 2)?),
            enqueued_at: cell(r, 1)?.as_f64(),
            started_at: None,
            finished_at: cell(r, 3)?.as_f64(),
            result: None,
        })
    })
    .optional()
}

fn cancel_in(tx: &Connection, id: i64, grace: f64) -> rusqlite::Result<CancelOutcome> {
    let row: Option<(Cell, Cell, bool)> = tx
        .query_row(
            "SELECT task_name, attempt, leased_at IS NOT NULL FROM foreman_task WHERE id = ?1",
            [id],
            |r| Ok((cell(r, 0)?, cell(r, 1)?, r.get(2)?)),
        )
        .optional()?;
    let latest = latest_run(tx, id)?;
    if let Some(run) = latest.as_ref().filter(|run| run.state == "running") {
        // Running (an at-least-once task keeps its leased row meanwhile): marked for abort. A
        // second cancel keeps the first request's time and takes the new grace.
        tx.execute(
            "INSERT INTO foreman_abort(task_id, attempt, grace) VALUES (?1, ?2, ?3) \
             ON CONFLICT (task_id, attempt) DO UPDATE SET grace = excluded.grace",
            params![id, run.attempt, grace],
        )?;
        return Ok(CancelOutcome::Aborting {
            task_name: run.task_name.clone(),
            attempt: run.attempt,
        });
    }
    match row {
        Some((name, attempt_value, leased)) => {
            let task_name = name.into_text_lossy();
            // A lease with no running attempt was cut short (its daemon died, and its history
            // went): the attempt it would run next is the one cancelled.
            let attempt = attempt(&attempt_value) + i64::from(leased);
            // OR REPLACE: the queued row is the authority on its attempt, which has not started;
            // a leftover row for that number would only be a stale copy. The task as queued is
            // kept with it, so that `retry` can queue it again.
            tx.execute(
                &format!(
                    "INSERT OR REPLACE INTO foreman_run(task_id, attempt, task_name, state, enqueued_at, \
                     finished_at, task, unique_key) \
                     SELECT id, ?2, task_name, 'cancelled', created_at, {NOW}, {TASK_DOCUMENT}, unique_key \
                     FROM foreman_task WHERE id = ?1"
                ),
                params![id, attempt],
            )?;
            tx.execute("DELETE FROM foreman_task WHERE id = ?1", [id])?;
            Ok(CancelOutcome::Cancelled { task_name })
        }
        None => Ok(match latest {
            Some(run) => CancelOutcome::Finished { state: run.state },
            None if latest_dead(tx, id)?.is_some() => CancelOutcome::Finished {
                state: "dead".to_owned(),
            },
            None => CancelOutcome::Unknown,
        }),
    }
}

/// Inserts a task copied from a `SELECT` of (task_name, args, kwargs, priority, origin,
/// unique_key) with `?1` and `?2` bound to `key` and `origin` (it needs a WHERE clause, which
/// tells SQLite that the `ON CONFLICT` after it is not a join's): the new id, or `Err` with the id of
/// the task holding its unique key (queued or running), which kept it from being inserted.
fn insert_copy(
    tx: &Connection,
    select: &str,
    key: i64,
    origin: &str,
) -> rusqlite::Result<std::result::Result<i64, i64>> {
    let inserted: Option<i64> = tx
        .prepare_cached(&format!(
            "INSERT INTO foreman_task(task_name, args, kwargs, priority, origin, unique_key) \
             {select} ON CONFLICT DO NOTHING RETURNING id"
        ))?
        .query_row(params![key, origin], |r| r.get(0))
        .optional()?;
    if let Some(id) = inserted {
        return Ok(Ok(id));
    }
    let holder = tx
        .prepare_cached(&format!(
            "SELECT id FROM foreman_task WHERE unique_key = (SELECT unique_key FROM ({select})) \
             UNION ALL SELECT task_id FROM foreman_run WHERE state = 'running' \
             AND unique_key = (SELECT unique_key FROM ({select})) LIMIT 1"
        ))?
        .query_row(params![key, origin], |r| r.get(0))
        .optional()?;
    // Nothing holds it: the row was refused for another reason, which a plain INSERT would say.
    Ok(Err(holder.unwrap_or(0)))
}

fn retry_one(tx: &Connection, task_id: i64) -> rusqlite::Result<Retried> {
    if let Some(queued) = queued_task(tx, task_id)? {
        return Ok(Retried::NotFinished {
            task_id,
            state: queued.state,
        });
    }
    let latest = latest_run(tx, task_id)?;
    if let Some(run) = latest.as_ref().filter(|run| !run.is_final) {
        return Ok(Retried::NotFinished {
            task_id,
            state: run.state.clone(),
        });
    }
    let origin = format!("retry of {task_id}");
    let has_args: bool = tx
        .prepare_cached(
            "SELECT task IS NOT NULL FROM foreman_run WHERE task_id = ?1 ORDER BY attempt DESC LIMIT 1",
        )?
        .query_row([task_id], |r| r.get(0))
        .optional()?
        .unwrap_or(false);
    let dead: Option<bool> = tx
        .prepare_cached(
            "SELECT task_name IS NOT NULL FROM foreman_dead WHERE task_id = ?1 ORDER BY id DESC LIMIT 1",
        )?
        .query_row([task_id], |r| r.get(0))
        .optional()?;
    // Copied in SQL: from the last attempt, which has the task as it was popped (its JSON values;
    // the text is the document's, spaces aside), else from its dead letter (a row that could not
    // even be read: its bytes).
    let select = if has_args {
        "SELECT task_name, coalesce(json_extract(task, '$.args'), '[]'), \
         coalesce(json_extract(task, '$.kwargs'), '{}'), coalesce(json_extract(task, '$.priority'), 0), \
         ?2, unique_key \
         FROM (SELECT * FROM foreman_run WHERE task_id = ?1 ORDER BY attempt DESC LIMIT 1) WHERE true"
    } else if dead == Some(true) {
        "SELECT task_name, coalesce(args, '[]'), coalesce(kwargs, '{}'), priority, ?2, unique_key \
         FROM (SELECT * FROM foreman_dead WHERE task_id = ?1 ORDER BY id DESC LIMIT 1) WHERE true"
    } else if latest.is_some() || dead.is_some() {
        return Ok(Retried::NoArgs { task_id });
    } else {
        return Ok(Retried::Unknown { task_id });
    };
    Ok(match insert_copy(tx, select, task_id, &origin)? {
        Ok(new_id) => Retried::Queued { task_id, new_id },
        Err(existing_id) => Retried::Duplicate {
            task_id,
            existing_id,
        },
    })
}

fn requeue_one(tx: &Connection, dead_id: i64, by: Option<&str>) -> rusqlite::Result<Requeued> {
    let found: Option<(i64, bool)> = tx
        .prepare_cached("SELECT task_id, task_name IS NULL FROM foreman_dead WHERE id = ?1")?
        .query_row([dead_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((old_task_id, false)) = found else {
        return Ok(match found {
            Some(_) => Requeued::NoName { dead_id },
            None => Requeued::Unknown { dead_id },
        });
    };
    // Copied in SQL, so that args and kwargs keep their exact bytes whatever they hold; only a
    // NULL (which `foreman_task` forbids) becomes the empty default.
    let select = "SELECT task_name, coalesce(args, '[]'), coalesce(kwargs, '{}'), priority, ?2, \
         unique_key FROM foreman_dead WHERE id = ?1";
    let origin = match by {
        Some(who) => format!("requeue of dead {dead_id} (task {old_task_id}) by {who}"),
        None => format!("requeue of dead {dead_id} (task {old_task_id})"),
    };
    match insert_copy(tx, select, dead_id, &origin)? {
        Ok(task_id) => {
            tx.prepare_cached("DELETE FROM foreman_dead WHERE id = ?1")?
                .execute([dead_id])?;
            Ok(Requeued::Task { dead_id, task_id })
        }
        Err(task_id) => Ok(Requeued::Duplicate { dead_id, task_id }),
    }
}

fn text(value: Cell) -> Option<String> {
    match value {
        Cell::Null => None,
        other => Some(other.into_text_lossy()),
    }
}

fn integer(value: &Cell) -> i64 {
    match *value {
        Cell::Integer(i) => i,
        _ => 0,
    }
}

/// A row's attempt the way the pop reads it: anything but a positive integer is the first.
fn attempt(value: &Cell) -> i64 {
    match *value {
        Cell::Integer(a) if a >= 1 => a,
        _ => 1,
    }
}
