//! The operator's queries on PostgreSQL behind the CLI: where a task stands (`wait`), cancelling
//! a queued task, and listing, requeueing and purging dead letters. It never claims: only the
//! daemons start tasks. A row `cancel` deletes is one no daemon has claimed (a claim holds its
//! row locked until it commits; `cancel` then waits, and finds the row gone and the attempt
//! running).

use std::time::Duration;

use super::{PgStore, big, opt_secs};
use crate::error::Result;
use crate::store::types::{
    CancelOutcome, DeadLetter, DeadPage, DeadSelection, Requeued, TaskProgress,
};

/// The task's latest attempt, its queued row, and its latest dead letter, in one statement (so
/// one snapshot): `kind` says which each row is.
const SQL_PROGRESS: &str = "\
(SELECT 'run' AS kind, attempt::int8, task_name, state, extract(epoch FROM enqueued_at)::float8,
        extract(epoch FROM started_at)::float8, extract(epoch FROM finished_at)::float8, error,
        retry_at IS NOT NULL AS will_retry, false AS delayed, false AS leased
 FROM foreman_run WHERE task_id = $1 ORDER BY attempt DESC LIMIT 1)
UNION ALL
(SELECT 'task', attempt::int8, task_name, NULL, extract(epoch FROM created_at)::float8, NULL, NULL,
        NULL, false, run_after > now(), leased_by IS NOT NULL
 FROM foreman_task WHERE id = $1)
UNION ALL
(SELECT 'dead', attempts::int8, coalesce(task_name, '(null)'), 'dead',
        extract(epoch FROM created_at)::float8, NULL, extract(epoch FROM died_at)::float8, reason,
        false, false, false
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
                    let (delayed, leased): (bool, bool) = (row.get(9), row.get(10));
                    let state = match (leased, delayed) {
                        (true, _) => "leased",
                        (false, true) => "delayed",
                        (false, false) => "queued",
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

    /// Cancels task `id` if no daemon has claimed it: its row is deleted and the attempt it would
    /// have been is recorded `cancelled`, in one statement.
    pub fn cancel(&mut self, id: i64) -> Result<CancelOutcome> {
        let rows = self.with(|c| {
            c.query(
                "WITH gone AS (
                    DELETE FROM foreman_task WHERE id = $1 AND leased_by IS NULL
                    RETURNING id, task_name, attempt, created_at
                 ), recorded AS (
                    INSERT INTO foreman_run AS r (task_id, attempt, task_name, state, enqueued_at,
                                                  finished_at)
                    SELECT id, attempt, task_name, 'cancelled', created_at, now() FROM gone
                    ON CONFLICT (task_id, attempt) DO UPDATE
                    SET state = 'cancelled', finished_at = now(), error = NULL, retry_at = NULL
                 )
                 SELECT (SELECT task_name FROM gone),
                        EXISTS (SELECT 1 FROM foreman_task WHERE id = $1 AND leased_by IS NOT NULL)",
                &[&id],
            )
        })?;
        let row = rows.first();
        if let Some(name) = row.and_then(|r| r.get::<_, Option<String>>(0)) {
            return Ok(CancelOutcome::Cancelled { task_name: name });
        }
        if row.is_some_and(|r| r.get::<_, bool>(1)) {
            return Ok(CancelOutcome::Running { leased: true });
        }
        Ok(match self.task_progress(id)? {
            Some(p) if p.state == "running" => CancelOutcome::Running { leased: false },
            Some(p) => CancelOutcome::Finished { state: p.state },
            None => CancelOutcome::Unknown,
        })
    }

    /// The newest `limit` dead letters (of `task` only, if given), and how many there are.
    pub fn dead_letters(&self, task: Option<&str>, limit: usize) -> Result<DeadPage> {
        let limit = big(limit);
        let rows = self.with(|c| {
            c.query(
                "SELECT id, task_id, task_name, args::text, kwargs::text, reason, \
                 extract(epoch FROM created_at)::float8, extract(epoch FROM died_at)::float8, \
                 attempts::int8, priority::int8, origin, count(*) OVER () \
                 FROM foreman_dead WHERE $1::text IS NULL OR task_name = $1 \
                 ORDER BY id DESC LIMIT $2",
                &[&task, &limit],
            )
        })?;
        let total = if let Some(row) = rows.first() {
            row.get(11)
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
            rows: rows
                .iter()
                .map(|r| DeadLetter {
                    id: r.get(0),
                    task_id: r.get(1),
                    task_name: r.get(2),
                    args: r.get(3),
                    kwargs: r.get(4),
                    reason: r.get(5),
                    created_at: opt_secs(r, 6),
                    died_at: opt_secs(r, 7),
                    attempts: r.get(8),
                    priority: r.get(9),
                    origin: r.get(10),
                })
                .collect(),
        })
    }

    /// Queues the selected dead letters again as new tasks and deletes them, in one
    /// transaction, notifying the daemons at its commit.
    pub fn requeue_dead(&mut self, which: DeadSelection<'_>) -> Result<Vec<Requeued>> {
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
                let origin = format!("requeue of dead {dead_id} (task {old_task_id})");
                let task_id: i64 = tx
                    .query_one(
                        "INSERT INTO foreman_task (task_name, args, kwargs, priority, origin) \
                         SELECT task_name, coalesce(args, '[]'), coalesce(kwargs, '{}'), \
                                priority, $2 FROM foreman_dead WHERE id = $1 RETURNING id",
                        &[&dead_id, &origin],
                    )?
                    .get(0);
                tx.execute("DELETE FROM foreman_dead WHERE id = $1", &[&dead_id])?;
                outcomes.push(Requeued::Task { dead_id, task_id });
            }
            if outcomes.iter().any(|o| matches!(o, Requeued::Task { .. })) {
                tx.execute("SELECT pg_notify('foreman', '')", &[])?;
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
