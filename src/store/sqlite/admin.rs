//! The operator's queries behind the CLI: where a task stands (`wait`), cancelling a queued task,
//! and listing, requeueing and purging dead letters. It never pops: only the foreman loop starts
//! tasks, and a row this module deletes is one that has not started.

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::{SqliteStore, cell};
use crate::error::Result;
use crate::store::row::Cell;
use crate::store::types::{
    CancelOutcome, DeadLetter, DeadPage, DeadSelection, Requeued, TaskProgress,
};

const NOW: &str = "(julianday('now') - 2440587.5) * 86400.0";

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

    /// Cancels task `id` if it has not started: its row is deleted and the attempt it would have
    /// been is recorded `cancelled`, in one transaction.
    pub fn cancel(&mut self, id: i64) -> Result<CancelOutcome> {
        self.write(|tx| cancel_in(tx, id))
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
            .prepare(
                "SELECT id, task_id, task_name, args, kwargs, reason, created_at, died_at, attempts, \
                 priority, origin FROM foreman_dead WHERE ?1 IS NULL OR task_name = ?1 \
                 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(err)?
            .query_map(
                params![task, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| {
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
                    })
                },
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

/// The task's attempt with the highest number, if it has one.
fn latest_run(conn: &Connection, id: i64) -> rusqlite::Result<Option<TaskProgress>> {
    conn.prepare_cached(
        "SELECT attempt, task_name, state, enqueued_at, started_at, finished_at, error, retry_at \
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

/// The task's row in `foreman_task`: waiting (queued, or delayed until `run_after`) or leased.
fn queued_task(conn: &Connection, id: i64) -> rusqlite::Result<Option<TaskProgress>> {
    conn.prepare_cached(&format!(
        "SELECT task_name, created_at, attempt, leased_at IS NOT NULL, run_after > {NOW} \
         FROM foreman_task WHERE id = ?1"
    ))?
    .query_row([id], |r| {
        let state = match (r.get::<_, bool>(3)?, r.get::<_, bool>(4)?) {
            (true, _) => "leased",
            (false, true) => "delayed",
            (false, false) => "queued",
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
        })
    })
    .optional()
}

fn cancel_in(tx: &Connection, id: i64) -> rusqlite::Result<CancelOutcome> {
    let row: Option<(Cell, Cell, Cell, bool)> = tx
        .query_row(
            "SELECT task_name, attempt, created_at, leased_at IS NOT NULL FROM foreman_task WHERE id = ?1",
            [id],
            |r| Ok((cell(r, 0)?, cell(r, 1)?, cell(r, 2)?, r.get(3)?)),
        )
        .optional()?;
    match row {
        Some((_, _, _, true)) => Ok(CancelOutcome::Running { leased: true }),
        Some((name, attempt_value, created_at, false)) => {
            let task_name = name.into_text_lossy();
            tx.execute("DELETE FROM foreman_task WHERE id = ?1", [id])?;
            // OR REPLACE: the queued row is the authority on its attempt, which has not started;
            // a leftover row for that number would only be a stale copy.
            tx.execute(
                &format!(
                    "INSERT OR REPLACE INTO foreman_run(task_id, attempt, task_name, state, enqueued_at, finished_at) \
                     VALUES (?1, ?2, ?3, 'cancelled', ?4, {NOW})"
                ),
                params![id, attempt(&attempt_value), task_name, created_at.as_f64()],
            )?;
            Ok(CancelOutcome::Cancelled { task_name })
        }
        None => Ok(match latest_run(tx, id)? {
            Some(run) if run.state == "running" => CancelOutcome::Running { leased: false },
            Some(run) => CancelOutcome::Finished { state: run.state },
            None if latest_dead(tx, id)?.is_some() => CancelOutcome::Finished {
                state: "dead".to_owned(),
            },
            None => CancelOutcome::Unknown,
        }),
    }
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
    let task_id = tx
        .prepare_cached(
            "INSERT INTO foreman_task(task_name, args, kwargs, priority, origin) \
             SELECT task_name, coalesce(args, '[]'), coalesce(kwargs, '{}'), priority, ?2 \
             FROM foreman_dead WHERE id = ?1 RETURNING id",
        )?
        .query_row(
            params![
                dead_id,
                match by {
                    Some(who) => format!("requeue of dead {dead_id} (task {old_task_id}) by {who}"),
                    None => format!("requeue of dead {dead_id} (task {old_task_id})"),
                }
            ],
            |r| r.get(0),
        )?;
    tx.prepare_cached("DELETE FROM foreman_dead WHERE id = ?1")?
        .execute([dead_id])?;
    Ok(Requeued::Task { dead_id, task_id })
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
