//! New tasks: a producer's insert through the CLI, and a schedule's firing (its task and its new
//! state in one transaction), with the schedules' stored state.

use rusqlite::{Connection, OptionalExtension, params};

use super::SqliteStore;
use crate::error::Result;
use crate::store::types::{Enqueued, NewTask, ScheduleState};

impl SqliteStore {
    /// Inserts one task; the caller has checked that `args` is a JSON array and `kwargs` an
    /// object.
    pub fn enqueue_task(&mut self, task: &NewTask<'_>) -> Result<Enqueued> {
        // In a transaction of its own: an autocommit `INSERT … RETURNING` hands back the id
        // before its commit, and a commit that fails then (a full disk) would go unnoticed. It
        // also keeps the task holding a unique key from ending between the insert and the look.
        self.write(|tx| insert_task(tx, task))
    }

    /// Inserts the tasks in one transaction, in order.
    pub fn enqueue_many(&mut self, tasks: &[NewTask<'_>]) -> Result<Vec<Enqueued>> {
        self.write(|tx| tasks.iter().map(|task| insert_task(tx, task)).collect())
    }

    /// Whether the task is still queued (not popped yet, or waiting for a retry).
    pub fn is_queued(&self, id: i64) -> Result<bool> {
        self.conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM foreman_task WHERE id = ?1)")
            .and_then(|mut s| s.query_row([id], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }

    /// The stored state of every schedule, by name.
    pub fn schedules(&self) -> Result<Vec<(String, ScheduleState)>> {
        let err = |e| self.err(e);
        self.conn
            .prepare("SELECT name, spec, next_due, last_fired, last_task_id, interval FROM foreman_schedule")
            .map_err(err)?
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    ScheduleState {
                        spec: r.get(1)?,
                        next_due: r.get(2)?,
                        last_fired: r.get(3)?,
                        last_task_id: r.get(4)?,
                        interval: r.get(5)?,
                    },
                ))
            })
            .map_err(err)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(err)
    }

    /// Stores a schedule's state (a new schedule, a changed spec, or an adaptive interval that
    /// moved).
    pub fn save_schedule(&mut self, name: &str, state: &ScheduleState) -> Result<()> {
        self.refuse_abandoned()?;
        save_schedule(&self.conn, name, state).map_err(|e| self.err(e))
    }

    /// Fires a schedule: in one transaction, enqueues its task (unless `skip`) and stores its new
    /// state, so a crash can neither lose the firing nor repeat it. Returns the new task's id.
    pub fn fire_schedule(
        &mut self,
        name: &str,
        task: &NewTask<'_>,
        state: &mut ScheduleState,
    ) -> Result<Enqueued> {
        let enqueued = self.write(|tx| {
            let enqueued = insert_task(tx, task)?;
            save_schedule(
                tx,
                name,
                &ScheduleState {
                    last_task_id: Some(enqueued.id),
                    ..state.clone()
                },
            )?;
            Ok(enqueued)
        })?;
        state.last_task_id = Some(enqueued.id);
        Ok(enqueued)
    }
}

/// Inserts the task; with a unique key held by a queued task (the unique index) or a running one
/// (the schema's trigger), inserts nothing and answers that task's id.
fn insert_task(conn: &Connection, task: &NewTask<'_>) -> rusqlite::Result<Enqueued> {
    let inserted: Option<i64> = conn
        .prepare_cached(
            "INSERT INTO foreman_task(task_name, args, kwargs, run_after, priority, origin, unique_key) \
             VALUES (?1, ?2, ?3, (julianday('now') - 2440587.5) * 86400.0 + ?4, ?5, ?6, ?7) \
             ON CONFLICT DO NOTHING RETURNING id",
        )?
        .query_row(
            params![
                task.name,
                task.args,
                task.kwargs,
                task.delay,
                task.priority,
                task.origin,
                task.unique_key
            ],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(id) = inserted {
        return Ok(Enqueued { id, created: true });
    }
    let holder: Option<i64> = conn
        .prepare_cached(
            "SELECT id FROM foreman_task WHERE unique_key = ?1 \
             UNION ALL SELECT task_id FROM foreman_run WHERE unique_key = ?1 AND state = 'running' \
             LIMIT 1",
        )?
        .query_row([task.unique_key], |r| r.get(0))
        .optional()?;
    // Only a unique key keeps a row out; should nothing hold it, say so as SQLite would.
    holder
        .map(|id| Enqueued { id, created: false })
        .ok_or(rusqlite::Error::QueryReturnedNoRows)
}

fn save_schedule(conn: &Connection, name: &str, state: &ScheduleState) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO foreman_schedule(name, spec, next_due, last_fired, last_task_id, interval) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, \
         next_due = excluded.next_due, last_fired = excluded.last_fired, \
         last_task_id = excluded.last_task_id, interval = excluded.interval",
    )?
    .execute(params![
        name,
        state.spec,
        state.next_due,
        state.last_fired,
        state.last_task_id,
        state.interval
    ])
    .map(drop)
}
