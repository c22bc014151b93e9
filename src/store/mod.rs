//! The store: every line of SQL foreman runs, behind one type, `Store`, which the loop, the
//! commands and the benchmark ask questions in their own words ("pop what is due", "has anything
//! changed since this token?", "was the database lost under me?"). Backend-neutral types live in
//! `types` and `row`; each backend lives in a folder of its own (`sqlite/`, and `postgres/` with
//! the cargo feature `postgres`).
//!
//! `Store` is an enum over the backends, not a trait object: the pop takes the loop's resolver as
//! a generic closure, which a `dyn` method cannot, and a `match` on a variant costs one predictable
//! branch where a trait object would cost an indirect call and, for the closure, an allocation or a
//! dynamic call per row. A generic `Foreman<S: Store>` would avoid the branch but compile the loop
//! once per backend, and the binary's code pages are most of the daemon's memory.

use std::path::Path;
use std::time::Duration;

use crate::database::Database;
#[cfg(not(feature = "postgres"))]
use crate::error::Error;
use crate::error::Result;
use crate::stats::MinuteStat;
use crate::task::Task;

#[cfg(feature = "postgres")]
pub mod postgres;
pub mod row;
pub mod sqlite;
pub mod types;

pub use sqlite::producer::RecordedAttempts;
pub use sqlite::schema::{SCHEMA_SQL, SCHEMA_VERSION};
pub use sqlite::watch::DbWatch;
pub use sqlite::{BUSY_TIMEOUT, WAL_SIZE_LIMIT};
pub use types::*;

#[cfg(feature = "postgres")]
use self::postgres::PgStore;
use sqlite::SqliteStore;

/// One open database, of whichever backend `--db` named.
pub enum Store {
    Sqlite(SqliteStore),
    /// Boxed: the SQLite variant, whose loop is the one to keep lean, stays small.
    #[cfg(feature = "postgres")]
    Postgres(Box<PgStore>),
}

/// A note of what had been committed when it was taken, to tell later whether anything was
/// committed since. Opaque: only the store that gave it can compare it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeToken {
    Sqlite(sqlite::cycle::FileStamp),
    /// The daemon's count of changes its heartbeats saw (`PgStore::changes`).
    #[cfg(feature = "postgres")]
    Postgres(u64),
}

/// Runs `$body` with `$backend` bound to the open backend, whichever it is.
macro_rules! each {
    ($store:expr, $backend:ident => $body:expr) => {
        match $store {
            Store::Sqlite($backend) => $body,
            #[cfg(feature = "postgres")]
            Store::Postgres($backend) => $body,
        }
    };
}

/// Runs `$sqlite` on SQLite and `$postgres` on PostgreSQL, where the two differ in what they do.
macro_rules! split {
    ($store:expr, $s:ident => $sqlite:expr, $p:ident => $postgres:expr) => {
        match $store {
            Store::Sqlite($s) => $sqlite,
            #[cfg(feature = "postgres")]
            Store::Postgres($p) => $postgres,
        }
    };
}

/// The error of a PostgreSQL URL given to a foreman built without the backend.
#[cfg(not(feature = "postgres"))]
fn no_postgres(db: &Database) -> Error {
    Error::Config(format!(
        "{db}: this foreman was built without PostgreSQL (cargo feature `postgres`); give --db a SQLite file"
    ))
}

impl Store {
    /// Opens the database as `access` says. A database this user cannot write is refused up
    /// front in one line, rather than at the first write.
    pub fn open(db: &Database, access: Access) -> Result<Store> {
        match db {
            Database::Sqlite(path) => SqliteStore::open(path, access).map(Store::Sqlite),
            #[cfg(feature = "postgres")]
            Database::Postgres(url) => PgStore::open(url, &db.to_string(), access, None)
                .map(|s| Store::Postgres(Box::new(s))),
            #[cfg(not(feature = "postgres"))]
            Database::Postgres(_) => Err(no_postgres(db)),
        }
    }

    /// Opens the database for the daemon. A PostgreSQL server that cannot be reached yet is
    /// waited for, saying so, for as long as `keep_waiting` (given how long it may sleep) says.
    pub fn open_daemon(db: &Database, keep_waiting: impl FnMut(Duration) -> bool) -> Result<Store> {
        match db {
            Database::Sqlite(path) => {
                let _ = keep_waiting;
                SqliteStore::open(path, Access::Create).map(Store::Sqlite)
            }
            #[cfg(feature = "postgres")]
            Database::Postgres(url) => {
                let store =
                    PgStore::open_lazily(url, &db.to_string(), self::postgres::Role::Daemon)?;
                store.wait_for_server(keep_waiting)?;
                Ok(Store::Postgres(Box::new(store)))
            }
            #[cfg(not(feature = "postgres"))]
            Database::Postgres(_) => Err(no_postgres(db)),
        }
    }

    /// The schema version this backend's foreman creates.
    pub fn schema_version(&self) -> i64 {
        split!(self, _s => SCHEMA_VERSION, _p => self::postgres::schema::SCHEMA_VERSION)
    }

    /// The database's clock, as Unix seconds: what due times, leases and schedules are compared
    /// with. SQLite's is this host's; PostgreSQL's is the server's `now()`, as this host
    /// estimates it on its monotonic clock.
    pub fn now(&self) -> f64 {
        split!(self, _s => crate::clock::unix_now(), p => p.now())
    }

    /// Whether due times in the database were written on this host's wall clock, so that a step
    /// of that clock must move them (SQLite); PostgreSQL's are the server's.
    pub fn follows_host_clock(&self) -> bool {
        split!(self, _s => true, _p => false)
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

    /// One cycle of the loop: records the attempts that `ended` (with their retries and dead
    /// letters), then pops what `claim` allows, highest priority first, each row with what
    /// `resolve` gave for it. `now` is `Store::now` as the loop read it: the endings' times and
    /// due times are on that clock.
    pub fn cycle<H>(
        &mut self,
        ended: &[Ending],
        claim: Claim<'_>,
        now: f64,
        resolve: impl FnMut(&Task) -> Resolved<H>,
    ) -> Result<Popped<H>> {
        split!(self, s => s.cycle(ended, claim, now, resolve), p => p.cycle(ended, claim, now, resolve))
    }

    /// When the earliest queued row is due (it may be past), without writing anything. A store
    /// that cannot tell without claiming (PostgreSQL, where other daemons claim too) answers
    /// what its heartbeat saw if that was within the last second,
    /// else the past: the caller's cycle looks, and writes nothing when nothing is due.
    pub fn next_due(&self) -> Result<Option<f64>> {
        split!(self, s => s.next_due(), p => Ok(p.next_due()))
    }

    /// A token of what has been committed so far; `None` when the store cannot tell (then
    /// whoever asks must look at the queue).
    pub fn changes(&self) -> Option<ChangeToken> {
        split!(
            self,
            s => s.changes().map(ChangeToken::Sqlite),
            p => p.changes().map(ChangeToken::Postgres)
        )
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
            _ => None,
        };
        let done = write(self)?;
        if let (Some(mark), Store::Sqlite(s)) = (mark, &*self) {
            *seen = s.after_own_write(mark).map(ChangeToken::Sqlite);
        }
        Ok(done)
    }

    /// Whether the database was lost under this process (its file deleted or replaced): what
    /// happened, if so. From then on the store writes nothing more to it.
    pub fn lost(&mut self) -> Option<&'static str> {
        split!(self, s => s.lost(), _p => None)
    }

    /// Whether `lost` said so once: nothing more is written.
    pub fn was_lost(&self) -> bool {
        split!(self, s => s.was_lost(), _p => false)
    }

    /// At startup: the attempts a crashed predecessor left running become lost (at-most-once) or
    /// due again (at-least-once). Returns (requeued, lost). On PostgreSQL a new daemon has a new
    /// registration, and the stale daemons are recovered by the heartbeats: nothing to do here.
    pub fn recover(&mut self, now: f64) -> Result<(usize, usize)> {
        split!(self, s => s.recover(now), _p => Ok((0, 0)))
    }

    /// Deletes, among the next `batch` history rows after `after`, those that finished before
    /// `before` (the database's clock); returns how many, and where to go on from (`None`: start
    /// over next time). On PostgreSQL, one daemon at a time does it.
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

    /// After the host's wall clock stepped back by `seconds`: moves waiting rows' due times back
    /// as much (only when `follows_host_clock`).
    pub fn move_due_back(&mut self, seconds: f64, now: f64) -> Result<usize> {
        split!(self, s => s.move_due_back(seconds, now), _p => Ok(0))
    }

    /// Registers `info` as a daemon of this database (SQLite: the daemon).
    pub fn register_daemon(&mut self, info: &DaemonInfo) -> Result<()> {
        each!(self, s => s.register_daemon(info))
    }

    /// Writes the heartbeat and adds `stats` to the per-minute figures, in one transaction. On
    /// PostgreSQL it also renews the daemon's leases and recovers daemons whose heartbeat is
    /// older than the staleness limit each registered with, and tells what it learnt.
    pub fn heartbeat(
        &mut self,
        now: f64,
        beat: &Beat<'_>,
        stats: &std::collections::BTreeMap<(i64, String), MinuteStat>,
    ) -> Result<BeatNews> {
        split!(
            self,
            s => s.heartbeat(now, beat, stats).map(|()| BeatNews::default()),
            p => p.heartbeat(beat, stats)
        )
    }

    /// Stamps the start of a shutdown on this daemon's row.
    pub fn daemon_stopping(&mut self, now: f64) -> Result<()> {
        split!(self, s => s.daemon_stopping(now), p => p.daemon_stopping())
    }

    /// Stamps a clean exit on this daemon's row.
    pub fn daemon_stopped(&mut self, now: f64) -> Result<()> {
        split!(self, s => s.daemon_stopped(now), p => p.daemon_stopped())
    }

    /// Buries rows whose task name no daemon seen alive during `grace` serves, among the next
    /// rows after `after`; returns them and where to go on from. Only PostgreSQL's daemons serve
    /// some names and not others: SQLite's pop buries an unknown name when it meets it.
    pub fn bury_unserved(
        &mut self,
        grace: Duration,
        after: Option<i64>,
    ) -> Result<(Vec<Buried>, Option<i64>)> {
        split!(
            self,
            _s => {
                let _ = (grace, after);
                Ok((Vec::new(), None))
            },
            p => p.bury_unserved(grace, after)
        )
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

    /// Whether the task is still queued (not popped yet, or waiting for a retry), or (PostgreSQL)
    /// running on any daemon.
    pub fn is_queued(&self, id: i64) -> Result<bool> {
        each!(self, s => s.is_queued(id))
    }

    /// The stored state of every schedule, by name.
    pub fn schedules(&self) -> Result<Vec<(String, ScheduleState)>> {
        each!(self, s => s.schedules())
    }

    /// Stores a schedule's state. With `expected`, only if its stored due time is still that
    /// (another daemon may have moved it: then `false`); without, a new or changed definition.
    pub fn save_schedule(
        &mut self,
        name: &str,
        state: &ScheduleState,
        expected: Option<f64>,
    ) -> Result<bool> {
        split!(
            self,
            s => {
                // One daemon per file: nobody else moves its schedules.
                let _ = expected;
                s.save_schedule(name, state).map(|()| true)
            },
            p => p.save_schedule(name, state, expected)
        )
    }

    /// Fires a schedule whose stored due time is `expected`: enqueues its task and stores its new
    /// state in one transaction, unless another daemon fired this window first.
    pub fn fire_schedule(
        &mut self,
        name: &str,
        task: &NewTask<'_>,
        expected: f64,
        state: &mut ScheduleState,
    ) -> Result<Fired> {
        split!(
            self,
            s => {
                let _ = expected;
                s.fire_schedule(name, task, state).map(|e| Fired::Task(e.id))
            },
            p => p.fire_schedule(name, task, expected, state)
        )
    }

    // ---- The operator's questions ----

    /// Runs `read` in one read transaction, so that every figure it reads is of one moment.
    pub fn snapshot<T>(&self, read: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
        each!(self, s => s.snapshot(|| read(self)))
    }

    /// The daemons' rows, newest first: SQLite's one (if a daemon ever started here); on
    /// PostgreSQL every daemon that runs, and those that stopped or were recovered lately.
    pub fn daemon_rows(&self) -> Result<Vec<DaemonRow>> {
        split!(self, s => s.daemon_row().map(|row| row.into_iter().collect()), p => p.daemon_rows())
    }

    /// The attempts recorded as running.
    pub fn running_attempts(&self) -> Result<Vec<RunningAttempt>> {
        each!(self, s => s.running_attempts())
    }

    /// The queue per task name, as of `now` (PostgreSQL: the server's `now()`).
    pub fn queue_depth(&self, now: f64) -> Result<Vec<TaskDepth>> {
        split!(self, s => s.queue_depth(now), p => p.queue_depth())
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
        split!(self, s => s.pause(name, now), p => p.pause(name))
    }

    /// Resumes a task name (`None`: every pause); returns how many pauses it lifted.
    pub fn resume(&mut self, name: Option<&str>) -> Result<usize> {
        each!(self, s => s.resume(name))
    }

    /// Puts back up to `batch` rows a pause set aside whose name is no longer paused. On
    /// PostgreSQL a pause sets no row aside (the claims leave the name out): nothing to do.
    pub fn unpause_rows(&mut self, batch: usize) -> Result<usize> {
        split!(self, s => s.unpause_rows(batch), _p => { let _ = batch; Ok(0) })
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

    /// A watch that tells a reader (`wait`) when another process may have committed. On
    /// PostgreSQL it is a short timer: the daemons notify their commits only with their heartbeat.
    pub fn watch(&self) -> DbWatch {
        split!(self, s => DbWatch::new(s.path()), _p => DbWatch::every(WATCH_POLL))
    }

    /// `NOTIFY` on PostgreSQL (what a producer does after its commit, with `payload`); SQLite is
    /// woken through its wakeup directory instead (`wake::poke`).
    pub fn notify(&self, payload: &str) -> Result<()> {
        split!(self, _s => { let _ = payload; Ok(()) }, p => p.notify(payload))
    }

    /// Tells whoever watches the whole database (the dashboards) that this process changed
    /// something: `NOTIFY foreman_changed` on PostgreSQL. Nothing on SQLite, whose watchers see
    /// the files change.
    pub fn announce(&self) -> Result<()> {
        split!(self, _s => Ok(()), p => p.announce())
    }

    /// Whether the daemon changed something its heartbeat has not announced yet (PostgreSQL:
    /// the heartbeat notifies `foreman_changed`); the loop then writes its heartbeat soon.
    /// Always false on SQLite, whose watchers see the files change.
    pub fn unannounced(&self) -> bool {
        split!(self, _s => false, p => p.unannounced())
    }

    /// What tells a reader of the whole database (the dashboard) that another process may have
    /// committed, without a query: on PostgreSQL a `LISTEN` connection on the producers' channel
    /// and the daemons' (`Feed::Listen`; `listen = false` polls instead); on SQLite the
    /// database's directory watched and the files' stamps compared (`Feed::Files`, with
    /// `changes`).
    pub fn feed(&self, listen: bool) -> Feed {
        match self {
            Store::Sqlite(s) => {
                let _ = listen;
                Feed::Files(DbWatch::new(s.path()))
            }
            #[cfg(feature = "postgres")]
            Store::Postgres(p) if listen => Feed::Listen(Notices(Box::new(
                self::postgres::listen::Listener::watcher(p.target().clone()),
            ))),
            #[cfg(feature = "postgres")]
            Store::Postgres(_) => Feed::Poll,
        }
    }
}

/// What `Store::feed` gives.
pub enum Feed {
    /// SQLite: inotify on the database's directory; `Store::changes` says whether it was a commit.
    Files(DbWatch),
    /// PostgreSQL: notifications.
    #[cfg(feature = "postgres")]
    Listen(Notices),
    /// PostgreSQL with `listen = false`: nothing tells; the reader looks on a timer.
    #[cfg(feature = "postgres")]
    Poll,
}

/// A `LISTEN` connection on the producers' channel (`foreman`) and the daemons'
/// (`foreman_changed`), connected at its first wait. Whoever holds one must keep waiting on it,
/// or drop it: notifications that nobody reads fill the connection and hold back the server's
/// notification queue.
#[cfg(feature = "postgres")]
pub struct Notices(Box<self::postgres::listen::Listener>);

#[cfg(feature = "postgres")]
impl Notices {
    /// Waits up to `timeout` for a notification: true when one came, or when the connection is
    /// new (whatever was notified before it listened was missed: look). An error is a
    /// connection that could not be opened, broke, or refused `LISTEN`.
    pub fn wait(&mut self, timeout: Duration) -> Result<bool> {
        let heard = self.0.wait(timeout)?;
        Ok(heard.notifications > 0 || heard.reconnected)
    }
}

/// How often `wait` looks on PostgreSQL: the daemons notify their commits only with their
/// heartbeat (`foreman_changed`), too late for a waiting producer.
#[cfg(feature = "postgres")]
const WATCH_POLL: Duration = Duration::from_millis(100);

/// A producer's connection, as the schema's comment tells producers to open one: for the
/// benchmark, which measures what a producer pays.
pub enum Producer {
    Sqlite(sqlite::producer::Producer),
    #[cfg(feature = "postgres")]
    Postgres(Box<self::postgres::producer::Producer>),
}

/// Runs `$body` with `$p` bound to the producer's backend.
macro_rules! each_producer {
    ($producer:expr, $p:ident => $body:expr) => {
        match $producer {
            Producer::Sqlite($p) => $body,
            #[cfg(feature = "postgres")]
            Producer::Postgres($p) => $body,
        }
    };
}

impl Producer {
    /// A producer's connection as the schema's comment recommends: on SQLite `synchronous =
    /// NORMAL`, on PostgreSQL `synchronous_commit = off` (a crash may lose the last commits,
    /// never corrupt).
    pub fn open(db: &Database) -> Result<Producer> {
        Producer::open_with(db, false)
    }

    /// `open`, with each PostgreSQL commit waiting for the WAL's flush when `durable`.
    pub fn open_with(db: &Database, durable: bool) -> Result<Producer> {
        match db {
            Database::Sqlite(path) => {
                let _ = durable;
                sqlite::producer::Producer::open(path).map(Producer::Sqlite)
            }
            #[cfg(feature = "postgres")]
            Database::Postgres(url) => {
                self::postgres::producer::Producer::open(url, &db.to_string(), durable)
                    .map(|p| Producer::Postgres(Box::new(p)))
            }
            #[cfg(not(feature = "postgres"))]
            Database::Postgres(_) => Err(no_postgres(db)),
        }
    }

    /// The SQLite file, if this is one.
    pub fn sqlite_path(db: &Database) -> Option<&Path> {
        db.sqlite_path()
    }

    /// Inserts `count` rows of `name` in one transaction; with `keys_from`, row i gets
    /// `args = [keys_from + i]`. Returns the ids.
    pub fn insert_many(
        &mut self,
        name: &str,
        count: usize,
        keys_from: Option<i64>,
    ) -> Result<std::ops::RangeInclusive<i64>> {
        each_producer!(self, p => p.insert_many(name, count, keys_from))
    }

    /// The `list` bench's rows: `count` of them, one in 1,000 `bench.rare`, one in 100 delayed
    /// far ahead, priorities 0 to 2.
    pub fn insert_list_fixture(&self, count: usize) -> Result<()> {
        each_producer!(self, p => p.insert_list_fixture(count))
    }

    /// Inserts one row in a transaction of its own; returns its id.
    pub fn insert_one(&self, name: &str, args: &str) -> Result<i64> {
        each_producer!(self, p => p.insert_one(name, args))
    }

    /// Runs `inserts` in one transaction.
    pub fn in_transaction<T>(&self, inserts: impl FnOnce(&Producer) -> Result<T>) -> Result<T> {
        match self {
            Producer::Sqlite(p) => p.in_transaction(|_| inserts(self)),
            #[cfg(feature = "postgres")]
            Producer::Postgres(p) => p.in_transaction(|_| inserts(self)),
        }
    }

    pub fn insert_name(&self, name: &str) -> Result<i64> {
        each_producer!(self, p => p.insert_name(name))
    }

    pub fn append_name(&self, name: &str) -> Result<()> {
        each_producer!(self, p => p.append_name(name))
    }

    pub fn last_id(&self) -> i64 {
        each_producer!(self, p => p.last_id())
    }

    pub fn insert_due_at(&self, name: &str, run_after: f64) -> Result<i64> {
        each_producer!(self, p => p.insert_due_at(name, run_after))
    }

    pub fn queued(&self, ids: &std::ops::RangeInclusive<i64>) -> Result<usize> {
        each_producer!(self, p => p.queued(ids))
    }

    pub fn attempts(&self, ids: &std::ops::RangeInclusive<i64>) -> Result<RecordedAttempts> {
        each_producer!(self, p => p.attempts(ids))
    }

    /// The PostgreSQL producer's `NOTIFY foreman` after its commit; SQLite's producer touches a
    /// file instead, which the bench does itself.
    pub fn notify(&self) -> Result<()> {
        match self {
            Producer::Sqlite(_) => Ok(()),
            #[cfg(feature = "postgres")]
            Producer::Postgres(p) => p.notify(),
        }
    }

    /// Creates schema `name` afresh (PostgreSQL: a bench run's own); nothing on SQLite, whose
    /// bench files are the run's own.
    pub fn create_schema(&self, name: &str) -> Result<()> {
        match self {
            Producer::Sqlite(_) => {
                let _ = name;
                Ok(())
            }
            #[cfg(feature = "postgres")]
            Producer::Postgres(p) => p.create_schema(name),
        }
    }

    /// Drops schema `name` and what it holds (PostgreSQL); nothing on SQLite.
    pub fn drop_schema(&self, name: &str) -> Result<()> {
        match self {
            Producer::Sqlite(_) => {
                let _ = name;
                Ok(())
            }
            #[cfg(feature = "postgres")]
            Producer::Postgres(p) => p.drop_schema(name),
        }
    }

    /// The server's process serving this connection (PostgreSQL); `None` on SQLite.
    pub fn backend_pid(&self) -> Result<Option<i64>> {
        match self {
            Producer::Sqlite(_) => Ok(None),
            #[cfg(feature = "postgres")]
            Producer::Postgres(p) => p.backend_pid().map(Some),
        }
    }

    /// The database's transactions so far, as the server counts them (PostgreSQL); `None` on
    /// SQLite.
    pub fn transactions(&self) -> Result<Option<i64>> {
        match self {
            Producer::Sqlite(_) => Ok(None),
            #[cfg(feature = "postgres")]
            Producer::Postgres(p) => p.transactions().map(Some),
        }
    }
}
