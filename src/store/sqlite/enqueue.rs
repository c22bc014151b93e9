//! New tasks: a producer's insert through the CLI, and a schedule's firing (its task and its new
//! state in one transaction), with the schedules' stored state.

use rusqlite::{Connection, params};

use super::SqliteStore;
use crate::error::Result;
use crate::store::types::{NewTask, ScheduleState};

impl SqliteStore {
    /// Inserts one task; the caller has checked that `args` is a JSON array and `kwargs` an
    /// object.
    pub fn enqueue_task(&mut self, task: &NewTask<'_>) -> Result<i64> {
        // In a transaction of its own: an autocommit `INSERT … RETURNING` hands back the id
        // before its commit, and a commit that fails then (a full disk) would go unnoticed.
        self.write(|tx| insert_task(tx, task))
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
    ) -> Result<i64> {
        let id = self.write(|tx| {
            let id = insert_task(tx, task)?;
            save_schedule(
                tx,
                name,
                &ScheduleState {
                    last_task_id: Some(id),
                    ..state.clone()
                },
            )?;
            Ok(id)
        })?;
        state.last_task_id = Some(id);
        Ok(id)
    }
}

fn insert_task(conn: &Connection, task: &NewTask<'_>) -> rusqlite::Result<i64> {
    conn.prepare_cached(
        "INSERT INTO foreman_task(task_name, args, kwargs, run_after, priority, origin) \
         VALUES (?1, ?2, ?3, (julianday('now') - 2440587.5) * 86400.0 + ?4, ?5, ?6) RETURNING id",
    )?
    .query_row(
        params![
            task.name,
            task.args,
            task.kwargs,
            task.delay,
            task.priority,
            task.origin
        ],
        |r| r.get(0),
    )
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
