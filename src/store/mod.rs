//! The store: every line of SQL foreman runs, behind one type, `Store`, which the loop, the
//! commands and the benchmark ask questions in their own words ("pop what is due", "has anything
//! changed since this token?", "was the database lost under me?"). Backend-neutral types live in
//! `types` and `row`; each backend lives in a folder of its own (`sqlite/`).
//!
//! `Store` is an enum over the backends, not a trait object: the pop takes the loop's resolver as
//! a generic closure, which a `dyn` method cannot, and a `match` on a variant costs one predictable
//! branch where a trait object would cost an indirect call and, for the closure, an allocation or a
//! dynamic call per row. A generic `Foreman<S: Store>` would avoid the branch but compile the loop
//! once per backend, and the binary's code pages are most of the daemon's memory.

use std::time::Duration;

use crate::database::Database;
use crate::error::{Error, Result};
use crate::stats::MinuteStat;
use crate::task::Task;

pub mod row;
pub mod sqlite;
pub mod types;

pub use sqlite::producer::{Producer, RecordedAttempts};
pub use sqlite::schema::{SCHEMA_SQL, SCHEMA_VERSION};
pub use sqlite::watch::DbWatch;
pub use sqlite::{BUSY_TIMEOUT, WAL_SIZE_LIMIT};
pub use types::*;

use sqlite::SqliteStore;

/// One open database, of whichever backend `--db` named.
pub enum Store {
    Sqlite(SqliteStore),
}

/// A note of what had been committed when it was taken, to tell later whether anything was
/// committed since. Opaque: only the store that gave it can compare it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeToken {
    Sqlite(sqlite::cycle::FileStamp),
}

/// Runs `$body` with `$backend` bound to the open backend, whichever it is.
macro_rules! each {
    ($store:expr, $backend:ident => $body:expr) => {
        match $store {
            Store::Sqlite($backend) => $body,
        }
    };
}

impl Store {
    /// Opens the database as `access` says. A database this user cannot write is refused up
    /// front in one line, rather than at the first write.
    pub fn open(db: &Database, access: Access) -> Result<Store> {
        match db {
            Database::Sqlite(path) => SqliteStore::open(path, access).map(Store::Sqlite),
            Database::Postgres(_) => Err(Error::Config(format!(
                "{db}: this foreman has no PostgreSQL backend yet; give --db a SQLite file"
            ))),
        }
    }

    /// Opens the database and checks that its schema is one this binary understands: what every
    /// command but `init` and `run` does first.
    pub fn open_checked(db: &Database, access: Access) -> Result<Store> {
        let store = Store::open(db, access)?;
        store.check_schema()?;
        Ok(store)
    }

    /// What `foreman run` checks before it takes its lock, so that a read-only mount or a
    /// missing directory stops it with one line naming the path and the fix.
    pub fn preflight(db: &Database) -> Result<()> {
        match db {
            Database::Sqlite(path) => sqlite::files::preflight(path),
            Database::Postgres(_) => Ok(()),
        }
    }

    // ---- Schema ----

    /// Creates the schema if it is absent, or upgrades an older one; idempotent, and safe
    /// against a concurrent `init`.
    pub fn ensure_schema(&mut self) -> Result<()> {
        each!(self, s => s.ensure_schema())
    }

    /// Checks that the schema exists and is one this binary understands, changing nothing.
    pub fn check_schema(&self) -> Result<()> {
        each!(self, s => s.check_schema())
    }

    // ---- The loop ----

    /// One transaction of the loop: records the attempts that `ended` (with their retries and
    /// dead letters), then pops up to `limit` due rows, highest priority first, each with what
    /// `resolve` gave for it.
    pub fn cycle<H>(
        &mut self,
        ended: &[Ending],
        limit: usize,
        now: f64,
        resolve: impl FnMut(&Task) -> Resolved<H>,
    ) -> Result<Popped<H>> {
        each!(self, s => s.cycle(ended, limit, now, resolve))
    }

    /// When the earliest queued row is due (it may be past), without writing anything.
    pub fn next_due(&self) -> Result<Option<f64>> {
        each!(self, s => s.next_due())
    }

    /// A token of what has been committed so far; `None` when the store cannot tell (then
    /// whoever asks must look at the queue).
    pub fn changes(&self) -> Option<ChangeToken> {
        each!(self, s => s.changes().map(ChangeToken::Sqlite))
    }

    /// Runs `write`, one of the daemon's own writes, so that it does not read as a change to
    /// whoever holds `seen`: a token taken before it still says "nothing changed" after it,
    /// unless another process committed meanwhile.
    pub fn own_write<T>(
        &mut self,
        seen: &mut Option<ChangeToken>,
        write: impl FnOnce(&mut Store) -> Result<T>,
    ) -> Result<T> {
        let mark = match (&*self, seen.as_ref()) {
            (Store::Sqlite(s), Some(ChangeToken::Sqlite(token))) => s.own_write_mark(Some(token)),
            (Store::Sqlite(_), None) => None,
        };
        let done = write(self)?;
        if let Some(mark) = mark {
            *seen = each!(&*self, s => s.after_own_write(mark).map(ChangeToken::Sqlite));
        }
        Ok(done)
    }

    /// Whether the database was lost under this process (its file deleted or replaced): what
    /// happened, if so. From then on the store writes nothing more to it.
    pub fn lost(&mut self) -> Option<&'static str> {
        each!(self, s => s.lost())
    }

    /// Whether `lost` said so once: nothing more is written.
    pub fn was_lost(&self) -> bool {
        each!(self, s => s.was_lost())
    }

    /// At startup: the attempts a crashed predecessor left running become lost (at-most-once) or
    /// due again (at-least-once). Returns (requeued, lost).
    pub fn recover(&mut self, now: f64) -> Result<(usize, usize)> {
        each!(self, s => s.recover(now))
    }

    /// Deletes, among the next `batch` history rows after `after`, those that finished before
    /// `before`; returns how many, and where to go on from (`None`: start over next time).
    pub fn prune_history(
        &mut self,
        before: f64,
        after: Option<(i64, i64)>,
        batch: usize,
    ) -> Result<(usize, Option<(i64, i64)>)> {
        each!(self, s => s.prune_history(before, after, batch))
    }

    /// Deletes the per-minute figures of minutes before `minute`.
    pub fn prune_stats(&mut self, minute: i64) -> Result<usize> {
        each!(self, s => s.prune_stats(minute))
    }

    /// After the wall clock stepped back by `seconds`: moves waiting rows' due times back as much.
    pub fn move_due_back(&mut self, seconds: f64, now: f64) -> Result<usize> {
        each!(self, s => s.move_due_back(seconds, now))
    }

    /// Makes `info` the daemon of this database.
    pub fn register_daemon(&mut self, info: &DaemonInfo) -> Result<()> {
        each!(self, s => s.register_daemon(info))
    }

    /// Writes the heartbeat and adds `stats` to the per-minute figures, in one transaction.
    pub fn heartbeat(
        &mut self,
        now: f64,
        beat: &Beat<'_>,
        stats: &std::collections::BTreeMap<(i64, String), MinuteStat>,
    ) -> Result<()> {
        each!(self, s => s.heartbeat(now, beat, stats))
    }

    /// Stamps the start of a shutdown on this daemon's row.
    pub fn daemon_stopping(&mut self, now: f64) -> Result<()> {
        each!(self, s => s.daemon_stopping(now))
    }

    /// Stamps a clean exit on this daemon's row.
    pub fn daemon_stopped(&mut self, now: f64) -> Result<()> {
        each!(self, s => s.daemon_stopped(now))
    }

    // ---- New tasks and schedules ----

    /// Inserts one task, unless its unique key is held by a queued or running task (then that
    /// task's id is returned, not created); the caller has checked that `args` is a JSON array
    /// and `kwargs` an object.
    pub fn enqueue_task(&mut self, task: &NewTask<'_>) -> Result<Enqueued> {
        each!(self, s => s.enqueue_task(task))
    }

    /// `enqueue_task` for each task, in one transaction: all of them or none.
    pub fn enqueue_many(&mut self, tasks: &[NewTask<'_>]) -> Result<Vec<Enqueued>> {
        each!(self, s => s.enqueue_many(tasks))
    }

    /// Whether the task is still queued (not popped yet, or waiting for a retry).
    pub fn is_queued(&self, id: i64) -> Result<bool> {
        each!(self, s => s.is_queued(id))
    }

    /// The stored state of every schedule, by name.
    pub fn schedules(&self) -> Result<Vec<(String, ScheduleState)>> {
        each!(self, s => s.schedules())
    }

    /// Stores a schedule's state.
    pub fn save_schedule(&mut self, name: &str, state: &ScheduleState) -> Result<()> {
        each!(self, s => s.save_schedule(name, state))
    }

    /// Fires a schedule: enqueues its task and stores its new state in one transaction.
    pub fn fire_schedule(
        &mut self,
        name: &str,
        task: &NewTask<'_>,
        state: &mut ScheduleState,
    ) -> Result<Enqueued> {
        each!(self, s => s.fire_schedule(name, task, state))
    }

    // ---- The operator's questions ----

    /// Runs `read` in one read transaction, so that every figure it reads is of one moment.
    pub fn snapshot<T>(&self, read: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
        each!(self, s => s.snapshot(|| read(self)))
    }

    /// The daemon's heartbeat row, if a daemon ever started here.
    pub fn daemon_row(&self) -> Result<Option<DaemonRow>> {
        each!(self, s => s.daemon_row())
    }

    /// The attempts recorded as running.
    pub fn running_attempts(&self) -> Result<Vec<RunningAttempt>> {
        each!(self, s => s.running_attempts())
    }

    /// The queue per task name, as of `now`.
    pub fn queue_depth(&self, now: f64) -> Result<Vec<TaskDepth>> {
        each!(self, s => s.queue_depth(now))
    }

    /// The due row that has waited longest, if any.
    pub fn oldest_due(&self, now: f64) -> Result<Option<DueRow>> {
        each!(self, s => s.oldest_due(now))
    }

    /// The longest-waiting row due since `before` or earlier that `waits_for_us` says the daemon
    /// should have started (a row whose pool is saturated waits for its pool, not the daemon),
    /// looking at no more than `lookahead` rows per priority.
    pub fn first_waiting(
        &self,
        before: f64,
        lookahead: usize,
        waits_for_us: impl FnMut(&DueRow) -> bool,
    ) -> Result<Option<DueRow>> {
        each!(self, s => s.first_waiting(before, lookahead, waits_for_us))
    }

    /// How many dead letters there are.
    pub fn dead_count(&self) -> Result<i64> {
        each!(self, s => s.dead_count())
    }

    /// The per-minute figures of minutes `from..=to` (of one task name, or all), by minute.
    pub fn minute_stats(
        &self,
        from: i64,
        to: i64,
        task: Option<&str>,
    ) -> Result<Vec<(i64, String, MinuteStat)>> {
        each!(self, s => s.minute_stats(from, to, task))
    }

    /// Where task `id` is now: queued, running, or how its latest attempt ended.
    pub fn task_progress(&self, id: i64) -> Result<Option<TaskProgress>> {
        each!(self, s => s.task_progress(id))
    }

    /// Cancels a queued task that has not started, or marks a running one's attempt for abort,
    /// with `grace` seconds between SIGTERM and SIGKILL.
    pub fn cancel(&mut self, id: i64, grace: f64) -> Result<CancelOutcome> {
        each!(self, s => s.cancel(id, grace))
    }

    /// Queues finished tasks again as new tasks (origin `retry of ID`).
    pub fn retry(&mut self, ids: &[i64]) -> Result<Vec<Retried>> {
        each!(self, s => s.retry(ids))
    }

    /// Tasks as `foreman list` shows them: a page in id order, after `q.after`.
    pub fn list(&self, q: &ListQuery<'_>) -> Result<Vec<ListedTask>> {
        each!(self, s => s.list(q))
    }

    /// How many tasks `q` matches (it walks them all: only when asked).
    pub fn count(&self, q: &ListQuery<'_>) -> Result<i64> {
        each!(self, s => s.count(q))
    }

    /// One task's row, attempts and dead letter, for `foreman show`.
    pub fn task_story(&self, id: i64, now: f64) -> Result<Option<TaskStory>> {
        each!(self, s => s.task_story(id, now))
    }

    // ---- Control: pauses and aborts ----

    /// The paused names and the aborts asked of running attempts.
    pub fn control(&self) -> Result<Control> {
        each!(self, s => s.control())
    }

    /// Pauses a task name (every task: `None`); false when it already was.
    pub fn pause(&mut self, name: Option<&str>, now: f64) -> Result<bool> {
        each!(self, s => s.pause(name, now))
    }

    /// Resumes a task name (`None`: every pause); returns how many pauses it lifted.
    pub fn resume(&mut self, name: Option<&str>) -> Result<usize> {
        each!(self, s => s.resume(name))
    }

    /// Puts back up to `batch` rows a pause set aside whose name is no longer paused.
    pub fn unpause_rows(&mut self, batch: usize) -> Result<usize> {
        each!(self, s => s.unpause_rows(batch))
    }

    /// Dead letters, newest first, with how many there are in all.
    pub fn dead_letters(&self, task: Option<&str>, limit: usize) -> Result<DeadPage> {
        each!(self, s => s.dead_letters(task, limit))
    }

    /// Queues dead letters again as new tasks; `by` (who asked) goes into their origin.
    pub fn requeue_dead(
        &mut self,
        which: DeadSelection<'_>,
        by: Option<&str>,
    ) -> Result<Vec<Requeued>> {
        each!(self, s => s.requeue_dead(which, by))
    }

    /// Deletes dead letters; returns how many.
    pub fn purge_dead(
        &mut self,
        older_than: Option<Duration>,
        task: Option<&str>,
    ) -> Result<usize> {
        each!(self, s => s.purge_dead(older_than, task))
    }

    // ---- The dashboard's reads (`foreman ui`) ----

    /// How many tasks `q` matches, counting no further than `cap` in each of its sources
    /// (`more`: at least that many); its `after` and `limit` are ignored.
    pub fn count_up_to(&self, q: &ListQuery<'_>, cap: usize) -> Result<CappedCount> {
        each!(self, s => s.count_up_to(q, cap))
    }

    /// A page of dead letters, newest first, below `before`, looking at at most `window` rows.
    pub fn dead_page(
        &self,
        filter: DeadFilter<'_>,
        before: Option<i64>,
        limit: usize,
        window: usize,
    ) -> Result<Page<DeadLetter>> {
        each!(self, s => s.dead_page(filter, before, limit, window))
    }

    /// The ids of the dead letters `filter` matches, oldest first, at most `cap` + 1.
    pub fn dead_ids(&self, filter: DeadFilter<'_>, cap: usize) -> Result<Vec<i64>> {
        each!(self, s => s.dead_ids(filter, cap))
    }

    /// How many dead letters `filter` matches, up to `cap`, looking at at most `window` rows.
    pub fn count_dead(
        &self,
        filter: DeadFilter<'_>,
        cap: usize,
        window: usize,
    ) -> Result<CappedCount> {
        each!(self, s => s.count_dead(filter, cap, window))
    }

    /// Deletes the dead letters with these ids; returns how many there were.
    pub fn purge_dead_ids(&mut self, ids: &[i64]) -> Result<usize> {
        each!(self, s => s.purge_dead_ids(ids))
    }

    /// The newest failures' texts (attempt errors and dead-letter reasons), for grouping.
    pub fn failure_texts(&self, window: usize) -> Result<Vec<FailureText>> {
        each!(self, s => s.failure_texts(window))
    }

    /// A watch that tells a reader (`wait`) when another process may have committed.
    pub fn watch(&self) -> DbWatch {
        each!(self, s => DbWatch::new(s.path()))
    }
}
