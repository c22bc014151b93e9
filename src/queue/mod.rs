//! `Queue`: every SQL statement foreman runs (besides `schema.sql`), on one connection. It owns the
//! connection settings, the schema version check, the pop transaction and the CLI's queries.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use crate::error::{Error, Result};
use crate::task::{RawRow, Task, decode};

pub mod admin;
pub mod daemon;
pub mod report;

/// The public protocol; see the comment block at its top.
pub const SCHEMA_SQL: &str = include_str!("../../schema.sql");
/// The `PRAGMA user_version` this binary creates and understands.
pub const SCHEMA_VERSION: i64 = 3;
/// Brings a version 1 database to version 2 before `SCHEMA_SQL` runs: `run_after`'s default is not
/// a constant, which `ALTER TABLE ADD COLUMN` refuses, so the queue table is rebuilt (ids, and the
/// AUTOINCREMENT high-water mark, kept). Every old row is due now, so they keep v1's id order.
const MIGRATE_V1_BEFORE: &str = "
ALTER TABLE foreman_dead ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE foreman_dead ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE foreman_dead ADD COLUMN origin TEXT;
ALTER TABLE foreman_task RENAME TO foreman_task_v1;
";
const MIGRATE_V1_AFTER: &str = "
INSERT INTO foreman_task(id, task_name, args, kwargs, created_at, run_after)
    SELECT id, task_name, args, kwargs, created_at, (julianday('now') - 2440587.5) * 86400.0
    FROM foreman_task_v1;
DELETE FROM sqlite_sequence WHERE name = 'foreman_task';
UPDATE sqlite_sequence SET name = 'foreman_task' WHERE name = 'foreman_task_v1';
DROP TABLE foreman_task_v1;
";
/// Prepared statements kept per connection: every statement foreman runs, with room to spare.
const STATEMENT_CACHE: usize = 64;
/// How long a statement waits for another connection's write lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The size in bytes a grown `-wal` is cut back to when SQLite starts reusing it.
pub const WAL_SIZE_LIMIT: u64 = 16 << 20;

/// What `Queue::file_stamp` compares.
pub type FileStamp = [(u64, Option<std::time::SystemTime>); 2];

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// How a command needs the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Create the file if it is missing (`init`, `run`).
    Create,
    /// It must exist (`enqueue`).
    ReadWrite,
    /// It must exist; nothing is written, so a user who may only read it can look (`status`).
    ReadOnly,
}

pub struct Queue {
    conn: Connection,
    path: PathBuf,
}

/// What one cycle transaction popped. `H` is whatever the caller's resolver gives for a task name.
#[derive(Debug)]
pub struct Popped<H> {
    /// Tasks to run, in pop order, each with what its name resolved to. Their rows are deleted
    /// (or leased), and each has a `running` row in `foreman_run`.
    pub tasks: Vec<(Task, H)>,
    /// Rows moved to `foreman_dead`.
    pub dead: Vec<Buried>,
    /// Due rows the resolver deferred: they are still queued, unchanged.
    pub deferred: usize,
    /// When the pop found fewer rows than it was allowed: when the next delayed row becomes due.
    pub next_due: Option<f64>,
}

/// A row the pop moved to `foreman_dead` instead of running it.
#[derive(Debug)]
pub struct Buried {
    pub task_id: i64,
    /// Its task name, when the row had a readable one.
    pub task_name: Option<String>,
    pub reason: String,
}

/// What the pop's resolver decides for a decoded task.
pub enum Resolved<H> {
    /// Run it; with `Some(until)` under a lease that ends then (at-least-once), else deleted.
    Run(H, Option<f64>),
    /// It cannot run: moved to `foreman_dead` with this reason.
    Dead(String),
    /// It cannot run *yet* (its pool is busy or still starting): it stays queued.
    Defer,
    /// Its expired lease is this daemon's own, still running: the lease is renewed until then.
    Hold(f64),
}

/// The states an attempt goes through in `foreman_run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Done,
    Failed,
    Timeout,
    Lost,
    Dead,
    Cancelled,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Done => "done",
            RunState::Failed => "failed",
            RunState::Timeout => "timeout",
            RunState::Lost => "lost",
            RunState::Dead => "dead",
            RunState::Cancelled => "cancelled",
        }
    }
}

/// What happens to a task after an attempt ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Nothing more: it is done, or failed with no retries configured.
    Finished,
    /// Runs again (attempt + 1, same id) not before this Unix time.
    Retry(f64),
    /// Moves to `foreman_dead` with this reason (retries ran out, or it could not run).
    Bury(String),
}

/// An attempt that ended, as the loop hands it to the next cycle to record.
#[derive(Debug)]
pub struct Ending {
    pub task: Task,
    pub state: RunState,
    pub finished_at: f64,
    pub error: Option<String>,
    pub next: Next,
    /// The task ran under a lease: its row is still in `foreman_task`.
    pub leased: bool,
}

/// A recurring task's state in `foreman_schedule`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleState {
    pub spec: String,
    pub next_due: f64,
    pub last_fired: Option<f64>,
    pub last_task_id: Option<i64>,
    pub interval: Option<f64>,
}

// The pop's statements. Each is a search of the `foreman_task_due` index (priority, run_after,
// then the rowid): none scans the table or sorts, so a pop costs the same at any queue depth and
// however many rows wait for a later time. A test checks their query plans.
const SQL_TOP_PRIORITY: &str = "SELECT max(priority) FROM foreman_task WHERE priority <= ?1";
const SQL_NEXT_PRIORITY: &str = "SELECT max(priority) FROM foreman_task WHERE priority < ?1";
const SQL_DUE_ROWS: &str = "SELECT id, task_name, args, kwargs, created_at, run_after, priority, attempt, origin, leased_at \
     FROM foreman_task WHERE priority = ?1 AND run_after <= ?2 ORDER BY run_after, id LIMIT ?3";
const SQL_NEXT_DUE: &str =
    "SELECT min(run_after) FROM foreman_task WHERE priority = ?1 AND run_after > ?2";
const SQL_DUE_IN_PRIORITY: &str = "SELECT min(run_after) FROM foreman_task WHERE priority = ?1";
const SQL_DELETE: &str = "DELETE FROM foreman_task WHERE id = ?1";

/// Crashes during one at-least-once task after which it is buried rather than run again.
const MAX_LOST_RUNS: i64 = 3;

/// Error text kept per attempt: a traceback's end says what went wrong, so the end is kept.
const MAX_ERROR_BYTES: usize = 8 * 1024;
/// Rows looked at beyond the free slots in one pop, so that a head of rows waiting for a busy pool
/// does not keep free slots from the rows behind it.
const LOOKAHEAD: usize = 64;

/// Now, as Unix seconds: the unit of every time column.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn truncate_error(error: &str) -> std::borrow::Cow<'_, str> {
    if error.len() <= MAX_ERROR_BYTES {
        return error.into();
    }
    let mut start = error.len() - MAX_ERROR_BYTES;
    while !error.is_char_boundary(start) {
        start += 1;
    }
    format!("[…] {}", &error[start..]).into()
}

impl Queue {
    /// Opens the database as `access` says and applies the connection settings. A database this
    /// user cannot write (a read-only mount or file, a directory where SQLite cannot create the
    /// `-wal` and `-shm` files) is refused up front, in the preflight's words, rather than with
    /// SQLite's code at the first write.
    pub fn open(path: &Path, access: Access) -> Result<Queue> {
        let mut flags = OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
        flags |= match access {
            Access::Create => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
            Access::ReadWrite => OpenFlags::SQLITE_OPEN_READ_WRITE,
            Access::ReadOnly => OpenFlags::SQLITE_OPEN_READ_ONLY,
        };
        if access != Access::Create && !path.exists() {
            return Err(Error::db(
                path,
                "no such file (run `foreman init` to create it)",
            ));
        }
        if access != Access::ReadOnly {
            crate::preflight::db_writable(path, false)?;
        }
        let refused = |e: rusqlite::Error| Queue::refused(path, access, e);
        let conn = Connection::open_with_flags(path, flags).map_err(refused)?;
        let queue = Queue {
            conn,
            path: path.to_path_buf(),
        };
        queue.configure(access).map_err(refused)?;
        // SQLite falls back to read-only, silently, when the file system refuses writes that the
        // checks above could not foresee (a FUSE or NFS server's own rules).
        if access != Access::ReadOnly && queue.conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(false)
        {
            return Err(crate::preflight::db_writable(path, true)
                .err()
                .unwrap_or_else(|| {
                    queue
                        .err("SQLite could open it only read-only; check its mount and permissions")
                }));
        }
        Ok(queue)
    }

    fn configure(&self, access: Access) -> rusqlite::Result<()> {
        self.conn.busy_timeout(BUSY_TIMEOUT)?;
        // The loop's transaction alone uses more than rusqlite's default 16 statements (pop,
        // history, retries, savepoints); an LRU that small re-parses some of them every pop.
        self.conn
            .set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // Reading the journal mode first is what tells "not a database" apart early, with SQLite's
        // own message, instead of at the first pop.
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        if access == Access::ReadOnly {
            return Ok(());
        }
        if !mode.eq_ignore_ascii_case("wal") {
            self.conn
                .query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
        }
        // A reader that holds a snapshot keeps every commit after it in the -wal, so the file grows
        // for as long as it reads; SQLite reuses it from the start once every reader has let go,
        // but never gives the space back. With a limit, the first commit after that reuse cuts
        // the file back to it. Above the ~4 MiB that autocheckpoints keep it at, so a steady
        // load never pays for the truncation.
        self.conn.execute_batch(&format!(
            "PRAGMA synchronous = NORMAL; PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}"
        ))
    }

    /// An error from opening or configuring the database. SQLite's READONLY and CANTOPEN codes on a
    /// database foreman must write mean the file system refused: said in the preflight's words (which
    /// probe the directory too) when it can tell why, else in SQLite's.
    fn refused(path: &Path, access: Access, e: rusqlite::Error) -> Error {
        let file_system = matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::CannotOpen)
        );
        if file_system
            && access != Access::ReadOnly
            && let Err(explained) = crate::preflight::db_writable(path, true)
        {
            return explained;
        }
        Error::db(path, e)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::db(&self.path, e)
    }

    /// Runs `work` in one `BEGIN IMMEDIATE` transaction and commits it (rolls back on error).
    /// The transaction statements are prepared once, like the work's: the loop runs one
    /// transaction per pop, and parsing `BEGIN` and `COMMIT` each time showed in its profile.
    fn write<T>(&mut self, work: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let conn = &self.conn;
        let done = conn
            .prepare_cached("BEGIN IMMEDIATE")
            .and_then(|mut s| s.execute([]))
            .and_then(|_| {
                let done = work(conn)?;
                conn.prepare_cached("COMMIT")?.execute([])?;
                Ok(done)
            });
        if done.is_err() && !conn.is_autocommit() {
            let _ = conn
                .prepare_cached("ROLLBACK")
                .and_then(|mut s| s.execute([]));
        }
        done.map_err(|e| Error::db(&self.path, e))
    }

    fn user_version(&self) -> Result<i64> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    fn refuse_newer(&self, version: i64) -> Result<()> {
        if version > SCHEMA_VERSION {
            return Err(self.err(format!(
                "schema version {version} is newer than this foreman understands ({SCHEMA_VERSION}); upgrade foreman"
            )));
        }
        Ok(())
    }

    /// Creates the schema if it is absent; idempotent, safe against a concurrent `init`.
    pub fn ensure_schema(&mut self) -> Result<()> {
        let version = self.user_version()?;
        self.refuse_newer(version)?;
        if version == SCHEMA_VERSION {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| Error::db(&self.path, e))?;
        // Again under the write lock: a concurrent `init` may have done it meanwhile.
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| Error::db(&self.path, e))?;
        if version == SCHEMA_VERSION {
            return Ok(());
        }
        if version == 1 {
            tx.execute_batch(MIGRATE_V1_BEFORE).map_err(|e| {
                Error::db(&self.path, format!("migrating from schema version 1: {e}"))
            })?;
        }
        tx.execute_batch(SCHEMA_SQL)
            .map_err(|e| Error::db(&self.path, e))?;
        if version == 1 {
            tx.execute_batch(MIGRATE_V1_AFTER).map_err(|e| {
                Error::db(&self.path, format!("migrating from schema version 1: {e}"))
            })?;
            log::info!(
                "{}: migrated the schema from version 1 to {SCHEMA_VERSION}",
                self.path.display()
            );
        }
        tx.commit().map_err(|e| Error::db(&self.path, e))
    }

    /// Checks that the schema exists and is one this binary understands, without changing anything.
    pub fn check_schema(&self) -> Result<()> {
        match self.user_version()? {
            0 => Err(self.err("has no foreman schema (run `foreman init`)")),
            version if version < SCHEMA_VERSION => Err(self.err(format!(
                "has schema version {version}; this foreman needs {SCHEMA_VERSION} (run `foreman init` or start the daemon to upgrade it)"
            ))),
            version => self.refuse_newer(version),
        }
    }

    /// One `BEGIN IMMEDIATE` transaction of the loop: records the attempts that `ended` (with
    /// their retries and dead letters), then pops up to `limit` due rows, highest priority first,
    /// each with what `resolve` gave for it. Popped rows are deleted (or leased) and recorded
    /// `running`; rows that cannot run move to `foreman_dead` with the reason; deferred rows are
    /// left alone. Nothing is ever missing from the DB between two states.
    pub fn cycle<H>(
        &mut self,
        ended: &[Ending],
        limit: usize,
        now: f64,
        mut resolve: impl FnMut(&Task) -> Resolved<H>,
    ) -> Result<Popped<H>> {
        let mut popped = Popped {
            tasks: Vec::with_capacity(limit),
            dead: Vec::new(),
            deferred: 0,
            next_due: None,
        };
        if limit == 0 && ended.is_empty() {
            return Ok(popped);
        }
        self.write(|tx| {
            for ending in ended {
                // One ending the DB refuses must not block the others, nor the pop, forever.
                tx.prepare_cached("SAVEPOINT ending")?.execute([])?;
                if let Err(e) = record_ending(tx, ending) {
                    // Undoes this ending alone.
                    tx.prepare_cached("ROLLBACK TO ending")?.execute([])?;
                    log_unrecorded(ending, &e);
                }
                tx.prepare_cached("RELEASE ending")?.execute([])?;
            }
            let mut below = i64::MAX;
            let mut first = true;
            while popped.tasks.len() < limit {
                let priority: Option<i64> = tx
                    .prepare_cached(if first {
                        SQL_TOP_PRIORITY
                    } else {
                        SQL_NEXT_PRIORITY
                    })
                    .and_then(|mut s| s.query_row([below], |r| r.get(0)))?;
                let Some(priority) = priority else { break };
                first = false;
                below = priority;
                pop_priority(tx, priority, limit, now, &mut popped, &mut resolve)?;
                if popped.tasks.len() < limit {
                    let due: Option<f64> = tx
                        .prepare_cached(SQL_NEXT_DUE)
                        .and_then(|mut s| s.query_row(params![priority, now], |r| r.get(0)))?;
                    popped.next_due = match (popped.next_due, due) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
                if priority == i64::MIN {
                    break;
                }
            }
            Ok(popped)
        })
    }

    /// The size and modification time of the database file and its `-wal`: every commit changes
    /// one of them, so the idle tick can tell "nothing was committed" with two `stat`s instead of
    /// a read transaction. `None` when they cannot be read.
    pub fn file_stamp(&self) -> Option<FileStamp> {
        let stamp = |path: &Path| {
            std::fs::metadata(path)
                .ok()
                .map(|m| (m.len(), m.modified().ok()))
        };
        let wal = suffixed(&self.path, "-wal");
        Some([stamp(&self.path)?, stamp(&wal).unwrap_or((0, None))])
    }

    /// SQLite's `PRAGMA data_version`: it changes between two calls when another connection
    /// committed meanwhile, and never for this connection's own commits.
    pub fn data_version(&self) -> Result<i64> {
        self.conn
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }

    /// When the earliest queued row is due (it may be now or past), without writing anything:
    /// the fallback tick's check, so an idle daemon never takes the write lock.
    pub fn next_due(&self) -> Result<Option<f64>> {
        let err = |e| self.err(e);
        let mut next: Option<f64> = None;
        let mut priority: Option<i64> = self
            .conn
            .prepare_cached(SQL_TOP_PRIORITY)
            .and_then(|mut s| s.query_row([i64::MAX], |r| r.get(0)))
            .map_err(err)?;
        while let Some(p) = priority {
            let due: Option<f64> = self
                .conn
                .prepare_cached(SQL_DUE_IN_PRIORITY)
                .and_then(|mut s| s.query_row([p], |r| r.get(0)))
                .map_err(err)?;
            next = match (next, due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            priority = self
                .conn
                .prepare_cached(SQL_NEXT_PRIORITY)
                .and_then(|mut s| s.query_row([p], |r| r.get(0)))
                .map_err(err)?;
        }
        Ok(next)
    }

    /// At startup, with the PID lock held (so no other daemon is running): every attempt still
    /// recorded `running` was cut short by a crash. At-least-once tasks among them are due again
    /// at once with attempt + 1; the others are recorded `lost`. Returns (re-queued, lost).
    pub fn recover(&mut self, now: f64) -> Result<(usize, usize)> {
        self.write(|tx| {
        tx.execute(
            "UPDATE foreman_run SET state = 'lost', finished_at = ?1, retry_at = ?1, \
             error = 'the daemon stopped while it ran (crash or kill -9); it runs again (at-least-once)' \
             WHERE state = 'running' AND (task_id, attempt) IN \
             (SELECT id, attempt FROM foreman_task WHERE leased_at IS NOT NULL)",
            [now],
        )?;
        // A task that was running at every one of the last crashes may be what crashes the daemon:
        // after MAX_LOST_RUNS, it is buried instead of run again.
        let buried = tx
            .execute(
                "INSERT INTO foreman_dead(task_id, task_name, args, kwargs, created_at, reason, attempts, priority, origin) \
                 SELECT id, task_name, args, kwargs, created_at, \
                        'the daemon stopped while it ran, ' || ?2 || ' times: not run again (it may be what stops it)', \
                        attempt, priority, origin \
                 FROM foreman_task t WHERE leased_at IS NOT NULL AND \
                 (SELECT count(*) FROM foreman_run r WHERE r.task_id = t.id AND r.state = 'lost') >= ?2",
                params![now, MAX_LOST_RUNS],
            )?;
        if buried > 0 {
            // Their last attempt was recorded as lost-and-retried just above; it is final now.
            tx.execute(
                "UPDATE foreman_run SET retry_at = NULL WHERE state = 'lost' AND retry_at = ?1 \
                 AND task_id IN (SELECT id FROM foreman_task t WHERE leased_at IS NOT NULL AND \
                 (SELECT count(*) FROM foreman_run r WHERE r.task_id = t.id AND r.state = 'lost') >= ?2)",
                params![now, MAX_LOST_RUNS],
            )?;
            tx.execute(
                "DELETE FROM foreman_task WHERE leased_at IS NOT NULL AND \
                 (SELECT count(*) FROM foreman_run r WHERE r.task_id = foreman_task.id AND r.state = 'lost') >= ?1",
                [MAX_LOST_RUNS],
            )?;
            log::error!(
                "{buried} at-least-once task(s) moved to foreman_dead: the daemon stopped while they ran, {MAX_LOST_RUNS} times"
            );
        }
        let requeued = tx
            .execute(
                "UPDATE foreman_task SET attempt = attempt + 1, leased_at = NULL, run_after = ?1 \
                 WHERE leased_at IS NOT NULL",
                [now],
            )?;
        let lost = tx
            .execute(
                "UPDATE foreman_run SET state = 'lost', finished_at = ?1, \
                 error = 'the daemon stopped while it ran (crash or kill -9); at-most-once: not run again' \
                 WHERE state = 'running'",
                [now],
            )?;
        Ok((requeued, lost))
        })
    }

    /// Deletes, among the next `batch` history rows after `after` (in key order, from the start
    /// when `None`), those that finished before `before`. Returns how many it deleted and where to
    /// go on from (`None`: the end was reached, start over next time). Each pass costs the same
    /// however long the history is, and successive passes cover all of it, so rows kept by a
    /// long-running or long-delayed task never stall pruning behind them.
    pub fn prune_history(
        &mut self,
        before: f64,
        after: Option<(i64, i64)>,
        batch: usize,
    ) -> Result<(usize, Option<(i64, i64)>)> {
        let (from_id, from_attempt) = after.unwrap_or((i64::MIN, i64::MIN));
        self.write(|tx| {
            // The window's last key; none when fewer than `batch` rows are left.
            let last: Option<(i64, i64)> = tx
                .prepare_cached(
                    "SELECT task_id, attempt FROM foreman_run WHERE (task_id, attempt) > (?1, ?2) \
                 ORDER BY task_id, attempt LIMIT 1 OFFSET ?3",
                )
                .and_then(|mut s| {
                    s.query_row(
                        params![
                            from_id,
                            from_attempt,
                            i64::try_from(batch.saturating_sub(1)).unwrap_or(i64::MAX)
                        ],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()
                })?;
            let (to_id, to_attempt) = last.unwrap_or((i64::MAX, i64::MAX));
            let deleted = tx
                .prepare_cached(
                    "DELETE FROM foreman_run WHERE (task_id, attempt) > (?1, ?2) \
                 AND (task_id, attempt) <= (?3, ?4) AND finished_at < ?5",
                )
                .and_then(|mut s| {
                    s.execute(params![from_id, from_attempt, to_id, to_attempt, before])
                })?;
            Ok((deleted, last))
        })
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

    /// Whether the task is still queued (not popped yet, or waiting for a retry).
    pub fn is_queued(&self, id: i64) -> Result<bool> {
        self.conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM foreman_task WHERE id = ?1)")
            .and_then(|mut s| s.query_row([id], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }

    /// Inserts one task; the caller has checked that `args` is a JSON array and `kwargs` an
    /// object.
    pub fn enqueue_task(&mut self, task: &NewTask<'_>) -> Result<i64> {
        insert_task(&self.conn, task).map_err(|e| self.err(e))
    }
}

/// A task to insert: a producer's three columns plus the options only foreman or the CLI set.
#[derive(Debug, Default, Clone, Copy)]
pub struct NewTask<'a> {
    pub name: &'a str,
    pub args: &'a str,
    pub kwargs: &'a str,
    /// Seconds from now before it may start.
    pub delay: f64,
    pub priority: i64,
    pub origin: Option<&'a str>,
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

/// Writes what became of an attempt: its `foreman_run` row, and its retry or dead letter.
fn record_ending(tx: &Connection, ending: &Ending) -> rusqlite::Result<()> {
    let task = &ending.task;
    let retry_at = match ending.next {
        Next::Retry(at) => Some(at),
        _ => None,
    };
    let error = ending.error.as_deref().map(truncate_error);
    let changed = tx
        .prepare_cached(
            "UPDATE foreman_run SET state = ?3, finished_at = ?4, error = ?5, retry_at = ?6 \
             WHERE task_id = ?1 AND attempt = ?2",
        )?
        .execute(params![
            task.id,
            task.attempt,
            ending.state.as_str(),
            ending.finished_at,
            error,
            retry_at
        ])?;
    if changed == 0 {
        // History was pruned under a very long task, or the row never got one: write it whole.
        insert_run(
            tx,
            task,
            ending.state,
            None,
            Some(ending.finished_at),
            error.as_deref(),
        )?;
    }
    match &ending.next {
        Next::Finished => {
            if ending.leased {
                delete_task(tx, task.id)?;
            }
        }
        Next::Retry(at) => {
            if ending.leased {
                tx.prepare_cached(
                    "UPDATE foreman_task SET attempt = attempt + 1, run_after = ?2, leased_at = NULL WHERE id = ?1",
                )?
                .execute(params![task.id, at])?;
            } else {
                let (args, kwargs) = json_texts(task);
                tx.prepare_cached(
                    "INSERT INTO foreman_task(id, task_name, args, kwargs, created_at, run_after, priority, attempt, origin) \
                     VALUES (?1, ?2, ?3, ?4, coalesce(?5, (julianday('now') - 2440587.5) * 86400.0), ?6, ?7, ?8, ?9)",
                )?
                .execute(params![
                    task.id,
                    task.name,
                    args,
                    kwargs,
                    task.created_at,
                    at,
                    task.priority,
                    task.attempt + 1,
                    task.origin
                ])?;
            }
        }
        Next::Bury(reason) => {
            if ending.leased {
                delete_task(tx, task.id)?;
            }
            let (args, kwargs) = json_texts(task);
            tx.prepare_cached(
                "INSERT INTO foreman_dead(task_id, task_name, args, kwargs, created_at, reason, attempts, priority, origin) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                task.id,
                task.name,
                args,
                kwargs,
                task.created_at,
                truncate_error(reason),
                task.attempt,
                task.priority,
                task.origin
            ])?;
        }
    }
    Ok(())
}

/// The DB refused to record how an attempt ended: say everything needed to redo it by hand.
fn log_unrecorded(ending: &Ending, e: &rusqlite::Error) {
    let (args, kwargs) = json_texts(&ending.task);
    log::error!(
        "task {} {} attempt {} ended {} ({:?}), but recording it failed: {e}; args {args}, kwargs {kwargs}",
        ending.task.id,
        ending.task.name,
        ending.task.attempt,
        ending.state.as_str(),
        ending.next
    );
}

fn json_texts(task: &Task) -> (String, String) {
    (
        serde_json::to_string(&task.args).unwrap_or_else(|_| "[]".to_owned()),
        serde_json::to_string(&task.kwargs).unwrap_or_else(|_| "{}".to_owned()),
    )
}

fn delete_task(tx: &Connection, id: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(SQL_DELETE)?.execute([id]).map(drop)
}

fn insert_run(
    tx: &Connection,
    task: &Task,
    state: RunState,
    started_at: Option<f64>,
    finished_at: Option<f64>,
    error: Option<&str>,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO foreman_run(task_id, attempt, task_name, state, enqueued_at, started_at, finished_at, error) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        task.id,
        task.attempt,
        task.name,
        state.as_str(),
        task.created_at,
        started_at,
        finished_at,
        error
    ])
    .map(drop)
}

/// Pops the due rows of one priority into `popped`, until it holds `limit` tasks.
fn pop_priority<H>(
    tx: &Connection,
    priority: i64,
    limit: usize,
    now: f64,
    popped: &mut Popped<H>,
    resolve: &mut impl FnMut(&Task) -> Resolved<H>,
) -> rusqlite::Result<()> {
    let want = limit - popped.tasks.len();
    // Read first, write after: a deferred row is then never touched, and its lock-free read is
    // all it costs.
    let mut raws = Vec::with_capacity(want);
    {
        let mut select = tx.prepare_cached(SQL_DUE_ROWS)?;
        let mut cursor = select.query(params![
            priority,
            now,
            i64::try_from(want + LOOKAHEAD).unwrap_or(i64::MAX)
        ])?;
        let mut runnable = 0;
        while runnable < want {
            let Some(r) = cursor.next()? else { break };
            let raw = RawRow {
                id: r.get(0)?,
                task_name: r.get(1)?,
                args: r.get(2)?,
                kwargs: r.get(3)?,
                created_at: r.get(4)?,
                run_after: r.get(5)?,
                priority: r.get(6)?,
                attempt: r.get(7)?,
                origin: r.get(8)?,
                leased_at: r.get(9)?,
            };
            let resolved = match decode(&raw) {
                Ok(task) => {
                    let resolved = resolve(&task);
                    if matches!(resolved, Resolved::Run(..)) {
                        runnable += 1;
                    }
                    Ok((task, resolved))
                }
                Err(reason) => Err(reason),
            };
            raws.push((raw, resolved));
        }
    }
    for (raw, resolved) in raws {
        match resolved {
            Ok((mut task, Resolved::Run(handler, lease))) => {
                if task.was_leased {
                    lose_expired_lease(tx, &task, now)?;
                    task.attempt = task.attempt.saturating_add(1);
                }
                match lease {
                    Some(until) => tx
                        .prepare_cached(
                            "UPDATE foreman_task SET leased_at = ?2, run_after = ?3, attempt = ?4 WHERE id = ?1",
                        )?
                        .execute(params![task.id, now, until, task.attempt])
                        .map(drop)?,
                    None => delete_task(tx, task.id)?,
                }
                insert_run(tx, &task, RunState::Running, Some(now), None, None)?;
                popped.tasks.push((task, handler));
            }
            Ok((_, Resolved::Defer)) => popped.deferred += 1,
            Ok((task, Resolved::Hold(until))) => {
                tx.prepare_cached("UPDATE foreman_task SET run_after = ?2 WHERE id = ?1")?
                    .execute(params![task.id, until])?;
            }
            Ok((mut task, Resolved::Dead(reason))) => {
                if task.was_leased {
                    lose_expired_lease(tx, &task, now)?;
                    task.attempt = task.attempt.saturating_add(1);
                }
                bury_raw(tx, &raw, &reason)?;
                insert_run(tx, &task, RunState::Dead, None, Some(now), Some(&reason))?;
                popped.dead.push(Buried {
                    task_id: raw.id,
                    task_name: Some(task.name),
                    reason,
                });
            }
            Err(reason) => {
                bury_raw(tx, &raw, &reason)?;
                let task_name = match &raw.task_name {
                    Value::Text(name) if !name.is_empty() => Some(name.clone()),
                    _ => None,
                };
                popped.dead.push(Buried {
                    task_id: raw.id,
                    task_name,
                    reason,
                });
            }
        }
    }
    Ok(())
}

/// A lease that expired while no daemon held it: its attempt was cut short, and it runs again.
fn lose_expired_lease(tx: &Connection, task: &Task, now: f64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE foreman_run SET state = 'lost', finished_at = ?3, retry_at = ?3, \
         error = 'its lease expired before it finished; it runs again (at-least-once)' \
         WHERE task_id = ?1 AND attempt = ?2 AND state = 'running'",
    )?
    .execute(params![task.id, task.attempt, now])
    .map(drop)
}

/// Moves a row to `foreman_dead` exactly as the producer wrote it.
fn bury_raw(tx: &Connection, raw: &RawRow, reason: &str) -> rusqlite::Result<()> {
    delete_task(tx, raw.id)?;
    tx.prepare_cached(
        "INSERT INTO foreman_dead(task_id, task_name, args, kwargs, created_at, reason, attempts, priority, origin) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, coalesce(?7, 0), ?8)",
    )?
    .execute(params![
        raw.id,
        raw.task_name,
        raw.args,
        raw.kwargs,
        raw.created_at,
        reason,
        match raw.priority {
            Value::Integer(p) => Some(p),
            _ => None,
        },
        raw.origin
    ])
    .map(drop)
}

/// Task names as a person should see them, whatever a producer stored.
fn text_lossy(value: Value) -> String {
    match value {
        Value::Text(text) => text,
        Value::Blob(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Value::Null => "(null)".to_owned(),
        Value::Integer(i) => i.to_string(),
        Value::Real(f) => f.to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn pruning_walks_past_rows_it_must_keep() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = Queue::open(&dir.path().join("q.db"), Access::Create).unwrap();
        queue.ensure_schema().unwrap();
        queue
            .conn
            .execute_batch(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2500) \
                 INSERT INTO foreman_run(task_id, attempt, task_name, state, finished_at) \
                 SELECT i, 1, 't', CASE WHEN i <= 10 THEN 'running' ELSE 'done' END, \
                        CASE WHEN i <= 10 THEN NULL ELSE 5.0 END FROM n",
            )
            .unwrap();
        let mut passes = Vec::new();
        let mut from = None;
        loop {
            let (deleted, next) = queue.prune_history(10.0, from, 1000).unwrap();
            passes.push(deleted);
            from = next;
            if from.is_none() {
                break;
            }
        }
        assert_eq!(passes, [990, 1000, 500]);
        let left: i64 = queue
            .conn
            .query_row("SELECT count(*) FROM foreman_run", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 10, "the running attempts stay");
        assert_eq!(queue.prune_history(10.0, None, 1000).unwrap(), (0, None));
    }

    /// The steps of `sql`'s query plan, joined by " | ".
    pub(crate) fn query_plan(queue: &Queue, sql: &str) -> String {
        let mut explain = queue
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap();
        let values = std::iter::repeat_n(1, explain.parameter_count());
        let plan: Vec<String> = explain
            .query_map(rusqlite::params_from_iter(values), |r| r.get(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        plan.join(" | ")
    }

    #[test]
    fn data_version_moves_for_other_connections_commits_only() {
        let dir = std::env::temp_dir().join(format!("foreman-dv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("q.sqlite3");
        let mut queue = Queue::open(&path, Access::Create).unwrap();
        queue.ensure_schema().unwrap();
        let before = queue.data_version().unwrap();
        queue.prune_stats(0).unwrap();
        assert_eq!(queue.data_version().unwrap(), before, "our own commit");
        let other = Connection::open(&path).unwrap();
        other
            .execute("INSERT INTO foreman_task(task_name) VALUES ('x')", [])
            .unwrap();
        assert_ne!(
            queue.data_version().unwrap(),
            before,
            "another connection's commit"
        );
        drop((queue, other));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_pop_statement_is_an_index_search() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = Queue::open(&dir.path().join("q.db"), Access::Create).unwrap();
        queue.ensure_schema().unwrap();
        for (sql, index) in [
            (
                SQL_TOP_PRIORITY,
                "COVERING INDEX foreman_task_due (priority<?)",
            ),
            (
                SQL_NEXT_PRIORITY,
                "COVERING INDEX foreman_task_due (priority<?)",
            ),
            (
                SQL_DUE_ROWS,
                "INDEX foreman_task_due (priority=? AND run_after<?)",
            ),
            (
                SQL_NEXT_DUE,
                "COVERING INDEX foreman_task_due (priority=? AND run_after>?)",
            ),
            (
                SQL_DUE_IN_PRIORITY,
                "COVERING INDEX foreman_task_due (priority=?)",
            ),
            (SQL_DELETE, "INTEGER PRIMARY KEY (rowid=?)"),
        ] {
            let plan = query_plan(&queue, sql);
            assert!(
                plan.contains(&format!("SEARCH foreman_task USING {index}")),
                "{sql}: {plan}"
            );
            assert!(
                !plan.contains("SCAN") && !plan.contains("TEMP B-TREE"),
                "{sql}: {plan}"
            );
        }
    }
}
