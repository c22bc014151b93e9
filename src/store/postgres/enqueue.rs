//! New tasks on PostgreSQL: the CLI's insert (with its `NOTIFY` in the same transaction, so the
//! daemons hear of it at its commit), and the schedules, which several daemons share: each firing
//! and each skipped window is a compare-and-set on the `next_due` the daemon read, so that of
//! several daemons one wins each window and the others learn it as an outcome.

use super::PgStore;
use super::cycle::{clean, int};
use crate::error::Result;
use crate::store::types::{Enqueued, Fired, NewTask, ScheduleState};

/// Two due times closer than this are the same window: `next_due` is stored to the microsecond
/// and read back as a float, so an exact comparison could miss by a rounding.
const SAME_DUE_SECONDS: f64 = 0.000_5;

/// The task, and `pg_notify` at its commit when it is due now (a delayed one wakes nobody: the
/// daemons' timers and ticks find it). With a unique key, only if no running attempt holds it and
/// no queued row has it; the key's advisory lock is taken first, in the same transaction
/// (schema-postgres.sql, UNIQUE TASKS).
const SQL_ENQUEUE: &str = "\
WITH t AS (
    INSERT INTO foreman_task (task_name, args, kwargs, run_after, priority, origin, unique_key)
    SELECT $1::text, $2::text::jsonb, $3::text::jsonb, now() + make_interval(secs => $4::float8),
           $5::int, $6::text, $7::text
    WHERE $7::text IS NULL OR NOT EXISTS (
        SELECT 1 FROM foreman_run WHERE state = 'running' AND unique_key = $7::text)
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
    RETURNING id
)
SELECT id, CASE WHEN $4::float8 <= 0 THEN pg_notify('foreman', '') END FROM t";

/// Many tasks without unique keys in one statement, in the arrays' order (ids are drawn from the
/// sequence as the rows are inserted, so the sorted ids are the tasks' in order): one round trip
/// instead of one per task.
const SQL_ENQUEUE_ARRAYS: &str = "\
WITH t AS (
    INSERT INTO foreman_task (task_name, args, kwargs, run_after, priority, origin)
    SELECT u.name, u.args::jsonb, u.kwargs::jsonb, now() + make_interval(secs => u.delay),
           u.priority, u.origin
    FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::int[], $6::text[])
         WITH ORDINALITY AS u(name, args, kwargs, delay, priority, origin, n)
    ORDER BY u.n
    RETURNING id
)
SELECT id FROM t ORDER BY id";

/// The task that holds a unique key: queued, or running.
const SQL_KEY_HOLDER: &str = "\
SELECT id FROM foreman_task WHERE unique_key = $1
UNION ALL SELECT task_id FROM foreman_run WHERE state = 'running' AND unique_key = $1
LIMIT 1";

/// Takes a unique key's lock for the rest of the transaction.
pub(super) const SQL_LOCK_KEY: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended('foreman:' || $1::text, 0))";

/// Inserts `task` through `tx`, a transaction when the task has a unique key (the key's lock lasts
/// until its end), else any connection; a held unique key gives its holder's id.
pub(super) fn insert_task(
    tx: &mut impl postgres::GenericClient,
    task: &NewTask<'_>,
) -> std::result::Result<Enqueued, postgres::Error> {
    if let Some(key) = task.unique_key {
        tx.execute(SQL_LOCK_KEY, &[&key])?;
    }
    let origin = task.origin.map(clean);
    let inserted = tx.query_opt(
        SQL_ENQUEUE,
        &[
            &task.name,
            &task.args,
            &task.kwargs,
            &task.delay,
            &int(task.priority),
            &origin,
            &task.unique_key,
        ],
    )?;
    if let Some(row) = inserted {
        return Ok(Enqueued {
            id: row.get(0),
            created: true,
        });
    }
    let holder = tx.query_opt(SQL_KEY_HOLDER, &[&task.unique_key])?;
    // Only a unique key keeps a row out; should nothing hold it (it ended meanwhile), say so.
    Ok(Enqueued {
        id: holder.map_or(0, |r| r.get(0)),
        created: false,
    })
}

impl PgStore {
    /// Inserts one task; the caller has checked that `args` is a JSON array and `kwargs` an
    /// object. The daemons are notified at its commit.
    pub fn enqueue_task(&mut self, task: &NewTask<'_>) -> Result<Enqueued> {
        if task.unique_key.is_some() {
            return self
                .enqueue_many(std::slice::from_ref(task))?
                .pop()
                .ok_or_else(|| self.err("the insert returned no id"));
        }
        // Without a key, one autocommit statement: one round trip.
        self.with(|c| insert_task(c, task))
    }

    /// Inserts the tasks in one transaction, in order.
    pub fn enqueue_many(&mut self, tasks: &[NewTask<'_>]) -> Result<Vec<Enqueued>> {
        if tasks.len() > 1 && tasks.iter().all(|t| t.unique_key.is_none()) {
            return self.enqueue_arrays(tasks);
        }
        self.with(|c| {
            let mut tx = c.transaction()?;
            let mut done = Vec::with_capacity(tasks.len());
            for task in tasks {
                done.push(insert_task(&mut tx, task)?);
            }
            tx.commit()?;
            Ok(done)
        })
    }

    /// `enqueue_many` of tasks without unique keys: one statement, and the daemons notified at
    /// its commit when any task is due now.
    fn enqueue_arrays(&mut self, tasks: &[NewTask<'_>]) -> Result<Vec<Enqueued>> {
        let names: Vec<&str> = tasks.iter().map(|t| t.name).collect();
        let args: Vec<&str> = tasks.iter().map(|t| t.args).collect();
        let kwargs: Vec<&str> = tasks.iter().map(|t| t.kwargs).collect();
        let delays: Vec<f64> = tasks.iter().map(|t| t.delay).collect();
        let priorities: Vec<i32> = tasks.iter().map(|t| int(t.priority)).collect();
        let origins: Vec<Option<String>> = tasks.iter().map(|t| t.origin.map(clean)).collect();
        let due = delays.iter().any(|d| *d <= 0.0);
        let ids: Vec<i64> = self.with(|c| {
            let mut tx = c.transaction()?;
            let rows = tx.query(
                SQL_ENQUEUE_ARRAYS,
                &[&names, &args, &kwargs, &delays, &priorities, &origins],
            )?;
            if due {
                tx.execute("SELECT pg_notify('foreman', '')", &[])?;
            }
            tx.commit()?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })?;
        if ids.len() != tasks.len() {
            return Err(self.err("the insert returned fewer ids than tasks"));
        }
        Ok(ids
            .into_iter()
            .map(|id| Enqueued { id, created: true })
            .collect())
    }

    /// Whether the task is queued (not claimed yet, or waiting for a retry), or running on any
    /// daemon.
    pub fn is_queued(&self, id: i64) -> Result<bool> {
        let rows = self.query(
            "SELECT EXISTS (SELECT 1 FROM foreman_task WHERE id = $1::int8) \
             OR EXISTS (SELECT 1 FROM foreman_run WHERE task_id = $1::int8 AND state = 'running')",
            &[&id],
        )?;
        Ok(rows.first().is_some_and(|r| r.get(0)))
    }

    /// The stored state of every schedule, by name (times on the database's clock).
    pub fn schedules(&self) -> Result<Vec<(String, ScheduleState)>> {
        let rows = self.with(|c| {
            c.query(
                "SELECT name, spec, extract(epoch FROM next_due)::float8, \
                 extract(epoch FROM last_fired)::float8, last_task_id, interval \
                 FROM foreman_schedule",
                &[],
            )
        })?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    ScheduleState {
                        spec: r.get(1),
                        next_due: r.get(2),
                        last_fired: r.get(3),
                        last_task_id: r.get(4),
                        interval: r.get(5),
                    },
                )
            })
            .collect())
    }

    /// Stores a schedule's state. With `expected`, only if its `next_due` is still that (a
    /// compare-and-set: false when another daemon moved it first); without, a new schedule is
    /// inserted, and a stored one replaced only if its definition differs.
    pub fn save_schedule(
        &mut self,
        name: &str,
        state: &ScheduleState,
        expected: Option<f64>,
    ) -> Result<bool> {
        let rows = match expected {
            Some(due) => self.with(|c| {
                c.query(
                    "UPDATE foreman_schedule SET spec = $2, next_due = to_timestamp($3), \
                     last_fired = to_timestamp($4), last_task_id = $5, interval = $6 \
                     WHERE name = $1 AND abs(extract(epoch FROM next_due)::float8 - $7) < $8 \
                     RETURNING 1",
                    &[
                        &name,
                        &state.spec,
                        &state.next_due,
                        &state.last_fired,
                        &state.last_task_id,
                        &state.interval,
                        &due,
                        &SAME_DUE_SECONDS,
                    ],
                )
            })?,
            None => self.with(|c| {
                c.query(
                    "INSERT INTO foreman_schedule AS s (name, spec, next_due, last_fired, \
                     last_task_id, interval) \
                     VALUES ($1, $2, to_timestamp($3), to_timestamp($4), $5, $6) \
                     ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, \
                     next_due = excluded.next_due, last_fired = excluded.last_fired, \
                     last_task_id = coalesce(excluded.last_task_id, s.last_task_id), \
                     interval = excluded.interval \
                     WHERE s.spec IS DISTINCT FROM excluded.spec \
                     RETURNING 1",
                    &[
                        &name,
                        &state.spec,
                        &state.next_due,
                        &state.last_fired,
                        &state.last_task_id,
                        &state.interval,
                    ],
                )
            })?,
        };
        Ok(!rows.is_empty())
    }

    /// Fires a schedule: moves its `next_due` from `expected` to the new state's and inserts its
    /// task, under an id taken from the table's sequence, in one statement; `Elsewhere` when
    /// another daemon fired this window first.
    pub fn fire_schedule(
        &mut self,
        name: &str,
        task: &NewTask<'_>,
        expected: f64,
        state: &mut ScheduleState,
    ) -> Result<Fired> {
        let rows = self.with(|c| {
            c.query(
                "WITH fired AS (
                    UPDATE foreman_schedule
                    SET next_due = to_timestamp($3::float8), last_fired = now(),
                        interval = $11::float8,
                        last_task_id = nextval(pg_get_serial_sequence('foreman_task', 'id'))
                    WHERE name = $1::text
                      AND abs(extract(epoch FROM next_due)::float8 - $2::float8) < $10::float8
                    RETURNING last_task_id, extract(epoch FROM last_fired)::float8 AS fired_at
                 ), t AS (
                    INSERT INTO foreman_task (id, task_name, args, kwargs, priority, origin)
                    OVERRIDING SYSTEM VALUE
                    SELECT last_task_id, $4::text, $5::text::jsonb, $6::text::jsonb, $7::int,
                           $8::text
                    FROM fired
                    RETURNING id
                 )
                 SELECT t.id, fired.fired_at, pg_notify('foreman', $9::text)
                 FROM t, fired",
                &[
                    &name,
                    &expected,
                    &state.next_due,
                    &task.name,
                    &task.args,
                    &task.kwargs,
                    &int(task.priority),
                    &task.origin.map(clean),
                    &"",
                    &SAME_DUE_SECONDS,
                    &state.interval,
                ],
            )
        })?;
        let Some(row) = rows.first() else {
            return Ok(Fired::Elsewhere);
        };
        let id: i64 = row.get(0);
        state.last_task_id = Some(id);
        state.last_fired = row.get(1);
        Ok(Fired::Task(id))
    }
}
