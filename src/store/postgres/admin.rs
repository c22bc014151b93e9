//! The operator's queries on PostgreSQL behind the CLI: where a task stands (`wait`), cancelling
//! a queued task, and listing, requeueing and purging dead letters. It never claims: only the
//! daemons start tasks. A row `cancel` deletes is one no daemon has claimed (a claim holds its
//! row locked until it commits; `cancel` then waits, and finds the row gone and the attempt
//! running).

use std::time::Duration;

use super::enqueue::insert_task;
use super::{PgStore, big, opt_secs};
use crate::error::Result;
use crate::store::types::{
    CancelOutcome, DeadPage, DeadSelection, NewTask, Requeued, Retried, TaskProgress,
};

/// The task's latest attempt, its queued row, and its latest dead letter, in one statement (so
/// one snapshot): `kind` says which each row is.
const SQL_PROGRESS: &str = "\
(SELECT 'run' AS kind, attempt::int8, task_name, state, extract(epoch FROM enqueued_at)::float8,
        extract(epoch FROM started_at)::float8, extract(epoch FROM finished_at)::float8, error,
        retry_at IS NOT NULL AS will_retry, false AS delayed, false AS leased, result,
        false AS paused
 FROM foreman_run WHERE task_id = $1 ORDER BY attempt DESC LIMIT 1)
UNION ALL
(SELECT 'task', attempt::int8, task_name, NULL, extract(epoch FROM created_at)::float8, NULL, NULL,
        NULL, false, run_after > now(), leased_by IS NOT NULL, NULL,
        EXISTS (SELECT 1 FROM foreman_pause p WHERE p.task_name IN ('', t.task_name))
 FROM foreman_task t WHERE id = $1)
UNION ALL
(SELECT 'dead', attempts::int8, coalesce(task_name, '(null)'), 'dead',
        extract(epoch FROM created_at)::float8, NULL, extract(epoch FROM died_at)::float8, reason,
        false, false, false, NULL, false
 FROM foreman_dead WHERE task_id = $1 ORDER BY id DESC LIMIT 1)";

impl PgStore {
    /// Where task `id` stands; `None` when no table knows the id. The precedence is SQLite's: a
    /// running attempt, else the queued row, else the latest attempt, else the dead letter.
    pub fn task_progress(&self, id: i64) -> Result<Option<TaskProgress>> {
        let rows = self.with(|c| c.query(SQL_PROGRESS, &[&id]))?;
        let mut run = None;
        let mut queued = None;
        let mut dead = None;
        for row in &rows {
            let kind: String = row.get(0);
            let state: Option<String> = row.get(3);
            let progress = TaskProgress {
                task_id: id,
                task_name: row.get(2),
                state: state.clone().unwrap_or_default(),
                attempt: row.get(1),
                is_final: false,
                error: row.get(7),
                enqueued_at: opt_secs(row, 4),
                started_at: opt_secs(row, 5),
                finished_at: opt_secs(row, 6),
                result: row.get(11),
            };
            match kind.as_str() {
                "run" => {
                    let will_retry: bool = row.get(8);
                    let is_final = match progress.state.as_str() {
                        "done" | "dead" | "cancelled" => true,
                        "failed" | "timeout" | "lost" => !will_retry,
                        _ => false,
                    };
                    run = Some(TaskProgress {
                        is_final,
                        ..progress
                    });
                }
                "task" => {
                    let (delayed, leased, paused): (bool, bool, bool) =
                        (row.get(9), row.get(10), row.get(12));
                    let state = match (leased, paused, delayed) {
                        (true, _, _) => "leased",
                        (false, true, _) => "paused",
                        (false, false, true) => "delayed",
                        (false, false, false) => "queued",
                    };
                    queued = Some(TaskProgress {
                        state: state.to_owned(),
                        error: None,
                        ..progress
                    });
                }
                _ => {
                    dead = Some(TaskProgress {
                        is_final: true,
                        ..progress
                    });
                }
            }
        }
        if let Some(run) = &run
            && run.state == "running"
        {
            return Ok(Some(run.clone()));
        }
        Ok(queued.or(run).or(dead))
    }

    /// Cancels task `id`: a running attempt (an at-least-once task's leased row included) gets an
    /// abort request, which the daemon running it carries out; a row no daemon has claimed is
    /// deleted and the attempt it would have been recorded `cancelled`; in one transaction. A
    /// row a claim holds makes the delete wait for that claim's commit, and find it running.
    pub fn cancel(&mut self, id: i64, grace: f64) -> Result<CancelOutcome> {
        let outcome = self.with(|c| {
            let mut tx = c.transaction()?;
            // Locked (or waited for) first, so the attempt read next is what it is now.
            let row = tx.query_opt(
                "SELECT task_name, attempt::int8, leased_by IS NOT NULL FROM foreman_task \
                 WHERE id = $1 FOR UPDATE",
                &[&id],
            )?;
            let latest = tx.query_opt(
                "SELECT attempt::int8, task_name, state FROM foreman_run WHERE task_id = $1 \
                 ORDER BY attempt DESC LIMIT 1",
                &[&id],
            )?;
            if let Some(run) = latest.as_ref().filter(|r| r.get::<_, String>(2) == "running") {
                let attempt: i64 = run.get(0);
                tx.execute(
                    "INSERT INTO foreman_abort (task_id, attempt, grace) VALUES ($1, $2::int8::int, $3) \
                     ON CONFLICT (task_id, attempt) DO UPDATE SET grace = excluded.grace",
                    &[&id, &attempt, &grace],
                )?;
                tx.commit()?;
                return Ok(CancelOutcome::Aborting {
                    task_name: run.get(1),
                    attempt,
                });
            }
            if let Some(row) = row {
                let (task_name, attempt, leased): (String, i64, bool) =
                    (row.get(0), row.get(1), row.get(2));
                // A lease with no running attempt was cut short: the attempt it would run next is
                // the one cancelled.
                let attempt = attempt + i64::from(leased);
                tx.execute(
                    "WITH gone AS (DELETE FROM foreman_task WHERE id = $1 RETURNING *) \
                     INSERT INTO foreman_run AS r (task_id, attempt, task_name, state, enqueued_at, \
                         finished_at, args, kwargs, priority, origin, unique_key) \
                     SELECT id, $2::int8::int, task_name, 'cancelled', created_at, now(), args, \
                            kwargs, priority, origin, unique_key FROM gone \
                     ON CONFLICT (task_id, attempt) DO UPDATE SET state = 'cancelled', \
                         finished_at = now(), error = NULL, retry_at = NULL",
                    &[&id, &attempt],
                )?;
                tx.commit()?;
                return Ok(CancelOutcome::Cancelled { task_name });
            }
            tx.commit()?;
            Ok(CancelOutcome::Unknown)
        })?;
        if outcome != CancelOutcome::Unknown {
            return Ok(outcome);
        }
        Ok(match self.task_progress(id)? {
            Some(p) => CancelOutcome::Finished { state: p.state },
            None => CancelOutcome::Unknown,
        })
    }

    /// Queues finished tasks again as new tasks (origin `retry of ID`), each from its latest
    /// attempt's args (or its dead letter's), in one transaction per id.
    pub fn retry(&mut self, ids: &[i64]) -> Result<Vec<Retried>> {
        let mut outcomes = Vec::with_capacity(ids.len());
        for &task_id in ids {
            if let Some(progress) = self.task_progress(task_id)? {
                let queued =
                    ["queued", "delayed", "paused", "leased"].contains(&progress.state.as_str());
                if queued || !progress.is_final {
                    outcomes.push(Retried::NotFinished {
                        task_id,
                        state: progress.state,
                    });
                    continue;
                }
            }
            let outcome = self.with(|c| {
                let mut tx = c.transaction()?;
                let origin = format!("retry of {task_id}");
                // From the last attempt (the task as it ran), else from its dead letter.
                let rows = tx.query(
                    "(SELECT 1 AS src, task_name, args, kwargs, coalesce(priority, 0)::int, \
                             unique_key FROM foreman_run WHERE task_id = $1 \
                      ORDER BY attempt DESC LIMIT 1) \
                     UNION ALL \
                     (SELECT 2, task_name, coalesce(args, '[]'), coalesce(kwargs, '{}'), \
                             priority::int, unique_key FROM foreman_dead WHERE task_id = $1 \
                      ORDER BY id DESC LIMIT 1)",
                    &[&task_id],
                )?;
                if rows.is_empty() {
                    return Ok(Retried::Unknown { task_id });
                }
                let usable = rows.iter().find(|r| {
                    r.get::<_, Option<serde_json::Value>>(2).is_some()
                        && r.get::<_, Option<String>>(1).is_some()
                });
                let Some(row) = usable else {
                    return Ok(Retried::NoArgs { task_id });
                };
                let (name, args, kwargs, priority, key): (
                    String,
                    serde_json::Value,
                    serde_json::Value,
                    i32,
                    Option<String>,
                ) = (row.get(1), row.get(2), row.get(3), row.get(4), row.get(5));
                let (args, kwargs) = (args.to_string(), kwargs.to_string());
                let task = NewTask {
                    name: &name,
                    args: &args,
                    kwargs: &kwargs,
                    delay: 0.0,
                    priority: i64::from(priority),
                    origin: Some(&origin),
                    unique_key: key.as_deref(),
                };
                let enqueued = insert_task(&mut tx, &task)?;
                tx.commit()?;
                Ok(if enqueued.created {
                    Retried::Queued {
                        task_id,
                        new_id: enqueued.id,
                    }
                } else {
                    Retried::Duplicate {
                        task_id,
                        existing_id: enqueued.id,
                    }
                })
            })?;
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// The newest `limit` dead letters (of `task` only, if given), and how many there are.
    pub fn dead_letters(&self, task: Option<&str>, limit: usize) -> Result<DeadPage> {
        let limit = big(limit);
        let rows = self.with(|c| {
            c.query(
                "SELECT id, task_id, task_name, args::text, kwargs::text, reason, \
                 extract(epoch FROM created_at)::float8, extract(epoch FROM died_at)::float8, \
                 attempts::int8, priority::int8, origin, unique_key, count(*) OVER () \
                 FROM foreman_dead WHERE $1::text IS NULL OR task_name = $1 \
                 ORDER BY id DESC LIMIT $2",
                &[&task, &limit],
            )
        })?;
        let total = if let Some(row) = rows.first() {
            row.get(12)
        } else {
            // A page past the end still says how many there are.
            let rows = self.with(|c| {
                c.query(
                    "SELECT count(*) FROM foreman_dead WHERE $1::text IS NULL OR task_name = $1",
                    &[&task],
                )
            })?;
            rows.first().map_or(0, |r| r.get(0))
        };
        Ok(DeadPage {
            total,
            rows: rows.iter().map(super::dead_letter).collect(),
        })
    }

    /// Queues the selected dead letters again as new tasks and deletes them, in one
    /// transaction, notifying the daemons at its commit.
    /// `by` (who asked) goes into their origin.
    pub fn requeue_dead(
        &mut self,
        which: DeadSelection<'_>,
        by: Option<&str>,
    ) -> Result<Vec<Requeued>> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            let ids: Vec<i64> = match which {
                DeadSelection::Ids(ids) => ids.to_vec(),
                DeadSelection::All { task } => tx
                    .query(
                        "SELECT id FROM foreman_dead WHERE $1::text IS NULL OR task_name = $1 \
                         ORDER BY id",
                        &[&task],
                    )?
                    .iter()
                    .map(|r| r.get(0))
                    .collect(),
            };
            let mut outcomes = Vec::with_capacity(ids.len());
            for dead_id in ids {
                let found = tx.query_opt(
                    "SELECT task_id, task_name IS NULL FROM foreman_dead WHERE id = $1 FOR UPDATE",
                    &[&dead_id],
                )?;
                let Some(found) = found else {
                    outcomes.push(Requeued::Unknown { dead_id });
                    continue;
                };
                let (old_task_id, no_name): (i64, bool) = (found.get(0), found.get(1));
                if no_name {
                    outcomes.push(Requeued::NoName { dead_id });
                    continue;
                }
                let origin = match by {
                    Some(who) => format!("requeue of dead {dead_id} (task {old_task_id}) by {who}"),
                    None => format!("requeue of dead {dead_id} (task {old_task_id})"),
                };
                let dead = tx.query_one(
                    "SELECT task_name, coalesce(args, '[]')::text, coalesce(kwargs, '{}')::text, \
                     priority::int8, unique_key FROM foreman_dead WHERE id = $1",
                    &[&dead_id],
                )?;
                let (name, args, kwargs, priority, key): (
                    String,
                    String,
                    String,
                    i64,
                    Option<String>,
                ) = (
                    dead.get(0),
                    dead.get(1),
                    dead.get(2),
                    dead.get(3),
                    dead.get(4),
                );
                let task = NewTask {
                    name: &name,
                    args: &args,
                    kwargs: &kwargs,
                    delay: 0.0,
                    priority,
                    origin: Some(&origin),
                    unique_key: key.as_deref(),
                };
                let enqueued = insert_task(&mut tx, &task)?;
                if enqueued.created {
                    tx.execute("DELETE FROM foreman_dead WHERE id = $1", &[&dead_id])?;
                    outcomes.push(Requeued::Task {
                        dead_id,
                        task_id: enqueued.id,
                    });
                } else {
                    outcomes.push(Requeued::Duplicate {
                        dead_id,
                        task_id: enqueued.id,
                    });
                }
            }
            tx.commit()?;
            Ok(outcomes)
        })
    }

    /// Deletes the dead letters that died more than `older_than` ago (all without it), of `task`
    /// only if given. Returns how many.
    pub fn purge_dead(
        &mut self,
        older_than: Option<Duration>,
        task: Option<&str>,
    ) -> Result<usize> {
        let seconds = older_than.map(|d| d.as_secs_f64());
        let n = self.with(|c| {
            c.execute(
                "DELETE FROM foreman_dead WHERE ($1::float8 IS NULL OR died_at < now() - \
                 make_interval(secs => $1)) AND ($2::text IS NULL OR task_name = $2)",
                &[&seconds, &task],
            )
        })?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }
}
