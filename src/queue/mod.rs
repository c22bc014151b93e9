//! `Queue`: every SQL statement foreman runs (besides `schema.sql`), on one connection. It owns the
//! connection settings, the schema version check, the pop transaction and the CLI's queries.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use crate::error::{Error, Result};
use crate::task::{RawRow, Task, decode, printable_name};

pub mod admin;
pub mod daemon;
pub mod files;
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
    /// (device, inode) of the file opened: a file at `path` that is not this one means the
    /// database was deleted or replaced under the connection.
    identity: Option<(u64, u64)>,
    /// Set by `abandon`: nothing more is written.
    abandoned: bool,
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
            files::db_writable(path, false)?;
        }
        let refused = |e: rusqlite::Error| Queue::refused(path, access, e);
        let conn = Connection::open_with_flags(path, flags).map_err(refused)?;
        let identity = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        let queue = Queue {
            conn,
            path: path.to_path_buf(),
            identity,
            abandoned: false,
        };
        queue.configure(access).map_err(refused)?;
        // SQLite falls back to read-only, silently, when the file system refuses writes that the
        // checks above could not foresee (a FUSE or NFS server's own rules).
        if access != Access::ReadOnly && queue.conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(false)
        {
            return Err(files::db_writable(path, true).err().unwrap_or_else(|| {
                queue.err("SQLite could open it only read-only; check its mount and permissions")
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
        // Plans that never look at bound values. Without this, SQLite 3.54 reads a bound `LIMIT ?`
        // while planning and re-prepares the statement whenever the value changes: the pop's
        // limit (the free slots) changes from pop to pop, and the re-parse was a seventh of the
        // daemon's CPU. Every hot statement is an index search whatever the values (tested).
        self.conn
            .set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
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
        // 512 KiB of page cache instead of SQLite's 2 MiB: a pop reads the head of one index and
        // the rows it points at, so the hot pages are few, and a miss is a read from the OS's
        // cache; the rest was a fifth of the daemon's resident memory after a drain.
        self.conn.execute_batch(&format!(
            "PRAGMA synchronous = NORMAL; PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}; \
             PRAGMA cache_size = -512"
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
            && let Err(explained) = files::db_writable(path, true)
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
        self.refuse_abandoned()?;
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
        done.map_err(|e| self.write_error(e))
    }

    /// A failed write, worded for the user: SQLite's "database or disk is full" is said with the
    /// free space and the fix, like the preflight's refusals; other errors as SQLite gives them.
    fn write_error(&self, e: rusqlite::Error) -> Error {
        if e.sqlite_error_code() != Some(rusqlite::ErrorCode::DiskFull) {
            return Error::db(&self.path, e);
        }
        let space =
            crate::fs_check::free_space(&self.path).map_or_else(String::new, |(free, total)| {
                format!(
                    " (its file system has {} free of {})",
                    crate::fs_check::bytes(free),
                    crate::fs_check::bytes(total)
                )
            });
        Error::Environment(format!(
            "cannot write {}: database or disk is full{space}; free some space or use a larger volume",
            self.path.display()
        ))
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

    /// Creates the schema if it is absent; idempotent, safe against a concurrent `init`. Refuses a
    /// database whose tables lack columns this version needs (made by hand before `init`, say),
    /// naming them, rather than failing later on a statement.
    pub fn ensure_schema(&mut self) -> Result<()> {
        let version = self.user_version()?;
        self.refuse_newer(version)?;
        if version == SCHEMA_VERSION {
            refuse_missing_columns(&self.conn).map_err(|e| self.err(e))?;
            if missing_table(&self.conn)
                .map_err(|e| self.err(e))?
                .is_none()
            {
                return Ok(());
            }
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| Error::db(&self.path, e))?;
        // Again under the write lock: a concurrent `init` may have done it meanwhile.
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| Error::db(&self.path, e))?;
        // A version 1 database lacks the columns its migration adds.
        if version != 1 {
            refuse_missing_columns(&tx).map_err(|e| Error::db(&self.path, e))?;
        }
        if version == SCHEMA_VERSION
            && missing_table(&tx)
                .map_err(|e| Error::db(&self.path, e))?
                .is_none()
        {
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
            refuse_missing_columns(&tx).map_err(|e| Error::db(&self.path, e))?;
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
            0 => {
                // `init` would refuse such a table too: say what it would say.
                refuse_missing_columns(&self.conn).map_err(|e| self.err(e))?;
                Err(self.err("has no foreman schema (run `foreman init`)"))
            }
            version if version < SCHEMA_VERSION => Err(self.err(format!(
                "has schema version {version}; this foreman needs {SCHEMA_VERSION} (run `foreman init` or start the daemon to upgrade it)"
            ))),
            version => {
                self.refuse_newer(version)?;
                refuse_missing_columns(&self.conn).map_err(|e| self.err(e))?;
                match missing_table(&self.conn).map_err(|e| self.err(e))? {
                    Some(table) => Err(self.err(format!(
                        "has no table {table} (run `foreman init` to create it)"
                    ))),
                    None => Ok(()),
                }
            }
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
                    // A full disk or an I/O error refuses every write: the whole cycle fails, and
                    // the loop keeps the endings to record them once the DB takes writes again.
                    if !is_about_the_row(&e) {
                        return Err(e);
                    }
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
        let wal = crate::fs_check::suffixed(&self.path, "-wal");
        Some([stamp(&self.path)?, stamp(&wal).unwrap_or((0, None))])
    }

    /// Whether the file at the database's path is no longer the one this connection has open:
    /// what happened to it, if so. One `stat`, for the loop's tick.
    pub fn replaced(&self) -> Option<&'static str> {
        let known = self.identity?;
        match std::fs::metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == known => None,
            Ok(_) => Some("was replaced by another file"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("was deleted or moved away"),
            // Cannot look (a directory above lost its search permission): no verdict.
            Err(_) => None,
        }
    }

    /// Stops writing to a database file that was replaced or deleted under this connection.
    /// SQLite leaves the WAL of a moved file in place at close, where it would be taken for the
    /// WAL of the file now at the path: its pages would then overwrite that file's. So the WAL is
    /// folded into the file this connection has open (the moved or deleted one) and emptied now,
    /// and every later write fails instead of filling it again. Returns whether the WAL is empty
    /// (another process reading the old file can keep it from being emptied).
    pub fn abandon(&mut self) -> Result<bool> {
        self.abandoned = true;
        let busy: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        Ok(busy == 0)
    }

    pub fn is_abandoned(&self) -> bool {
        self.abandoned
    }

    fn refuse_abandoned(&self) -> Result<()> {
        if self.abandoned {
            return Err(self.err(
                "the file was replaced or deleted under the daemon; nothing more is written to it",
            ));
        }
        Ok(())
    }

    /// After the wall clock stepped back by `seconds`: moves the due times of the rows waiting for
    /// a later time back as much (not before `now`), since they were computed on the clock before
    /// the step. Leased rows keep theirs: a lease is renewed by the daemon that holds it. Returns
    /// how many rows moved. A delayed row inserted between the step and this call (at most a
    /// tick) moves too, and runs that much early.
    pub fn move_due_back(&mut self, seconds: f64, now: f64) -> Result<usize> {
        self.write(|tx| {
            tx.prepare_cached(
                "UPDATE foreman_task SET run_after = max(?2, run_after - ?1) \
                 WHERE run_after > ?2 AND leased_at IS NULL",
            )?
            .execute(params![seconds, now])
        })
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
        // In a transaction of its own: an autocommit `INSERT … RETURNING` hands back the id
        // before its commit, and a commit that fails then (a full disk) would go unnoticed.
        self.write(|tx| insert_task(tx, task))
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

/// Whether `e` is about the row being written (it would fail again however often it is tried),
/// rather than about the database as a whole (full, read-only, an I/O error), which refuses every
/// write until someone fixes it.
fn is_about_the_row(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode;
    match e.sqlite_error_code() {
        Some(code) => matches!(
            code,
            ErrorCode::ConstraintViolation
                | ErrorCode::TooBig
                | ErrorCode::TypeMismatch
                | ErrorCode::ParameterOutOfRange
        ),
        // rusqlite's own errors, such as a value that does not convert.
        None => true,
    }
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
                task_name: cell(r, 1)?,
                args: cell(r, 2)?,
                kwargs: cell(r, 3)?,
                created_at: cell(r, 4)?,
                run_after: cell(r, 5)?,
                priority: cell(r, 6)?,
                attempt: cell(r, 7)?,
                origin: cell(r, 8)?,
                leased_at: cell(r, 9)?,
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
                popped.dead.push(Buried {
                    task_id: raw.id,
                    task_name: printable_name(&raw.task_name),
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

/// Moves a row to `foreman_dead` exactly as the producer wrote it: copied in SQL, so every
/// column keeps its bytes and its type (a TEXT that is not UTF-8 stays TEXT).
fn bury_raw(tx: &Connection, raw: &RawRow, reason: &str) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO foreman_dead(task_id, task_name, args, kwargs, created_at, reason, attempts, priority, origin) \
         SELECT id, task_name, args, kwargs, created_at, ?2, 0, \
                CASE WHEN typeof(priority) = 'integer' THEN priority ELSE 0 END, origin \
         FROM foreman_task WHERE id = ?1",
    )?
    .execute(params![raw.id, reason])?;
    delete_task(tx, raw.id)
}

/// A column as a `Value`, whatever a producer stored in it. SQLite lets a TEXT value hold bytes
/// that are not UTF-8, which rusqlite refuses to read as text: read with `get`, one such row
/// would fail every pop (and every `status` or `dead list`) for good. Those bytes come back as a
/// `Blob`, which the decoding turns into "not valid UTF-8".
pub(crate) fn cell(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Value> {
    Ok(match row.get_ref(index)? {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(f) => Value::Real(f),
        ValueRef::Text(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => Value::Text(text.to_owned()),
            Err(_) => Value::Blob(bytes.to_vec()),
        },
        ValueRef::Blob(bytes) => Value::Blob(bytes.to_vec()),
    })
}

/// The tables and columns `SCHEMA_SQL` creates, read from an in-memory database it was applied
/// to, so that the check below can never drift from the schema.
fn expected_tables() -> &'static [(String, Vec<String>)] {
    static TABLES: OnceLock<Vec<(String, Vec<String>)>> = OnceLock::new();
    TABLES.get_or_init(|| {
        let read = || -> rusqlite::Result<Vec<(String, Vec<String>)>> {
            let conn = Connection::open_in_memory()?;
            conn.execute_batch(SCHEMA_SQL)?;
            let names: Vec<String> = conn
                .prepare(
                    "SELECT name FROM sqlite_schema WHERE type = 'table' AND name LIKE 'foreman%' ORDER BY name",
                )?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            names
                .into_iter()
                .map(|name| {
                    let columns = table_columns(&conn, &name)?;
                    Ok((name, columns))
                })
                .collect()
        };
        // Cannot fail for the schema this binary carries (a unit test applies it); if it did,
        // the check would only be skipped.
        read().unwrap_or_default()
    })
}

/// The columns of `table` in the database; empty when there is no such table.
fn table_columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    conn.prepare_cached("SELECT name FROM pragma_table_info(?1)")?
        .query_map([table], |r| r.get(0))?
        .collect()
}

/// An existing foreman table without every column the schema gives it (a producer created
/// `foreman_task` itself, say, before `init`): an error naming the table and the columns.
fn refuse_missing_columns(conn: &Connection) -> std::result::Result<(), String> {
    for (table, expected) in expected_tables() {
        let have = table_columns(conn, table).map_err(|e| e.to_string())?;
        if have.is_empty() {
            continue;
        }
        let missing: Vec<&str> = expected
            .iter()
            .filter(|column| !have.contains(column))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "table {table} lacks column(s) {} of schema version {SCHEMA_VERSION}: it was not created by foreman (rename it, run `foreman init`, and copy its rows over)",
                missing.join(", ")
            ));
        }
    }
    Ok(())
}

/// The first foreman table the database lacks, if any.
fn missing_table(conn: &Connection) -> rusqlite::Result<Option<&'static str>> {
    for (table, _) in expected_tables() {
        if table_columns(conn, table)?.is_empty() {
            return Ok(Some(table));
        }
    }
    Ok(None)
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
        let mut queue = queue_with(
            &dir,
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2500) \
             INSERT INTO foreman_run(task_id, attempt, task_name, state, finished_at) \
             SELECT i, 1, 't', CASE WHEN i <= 10 THEN 'running' ELSE 'done' END, \
                    CASE WHEN i <= 10 THEN NULL ELSE 5.0 END FROM n",
        );
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
    #[allow(clippy::float_cmp)] // The values compared are exact.
    fn a_clock_step_back_moves_waiting_rows_back_but_not_due_or_leased_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = Queue::open(&dir.path().join("q.db"), Access::Create).unwrap();
        queue.ensure_schema().unwrap();
        let insert = |run_after: f64, leased_at: Option<f64>| -> i64 {
            queue
                .conn
                .query_row(
                    "INSERT INTO foreman_task(task_name, run_after, leased_at) VALUES ('t', ?1, ?2) RETURNING id",
                    params![run_after, leased_at],
                    |r| r.get(0),
                )
                .unwrap()
        };
        let due = insert(900.0, None);
        let soon = insert(1500.0, None);
        let later = insert(9000.0, None);
        let leased = insert(1500.0, Some(900.0));
        // The clock went back an hour, to 1000: what waited for 1500 on the old clock was due.
        assert_eq!(queue.move_due_back(3600.0, 1000.0).unwrap(), 2);
        let run_after = |id: i64| -> f64 {
            queue
                .conn
                .query_row(
                    "SELECT run_after FROM foreman_task WHERE id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .unwrap()
        };
        assert_eq!(run_after(due), 900.0);
        assert_eq!(run_after(soon), 1000.0);
        assert_eq!(run_after(later), 5400.0);
        assert_eq!(run_after(leased), 1500.0);
    }

    #[test]
    fn a_full_database_is_said_with_the_free_space_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = Queue::open(&dir.path().join("q.db"), Access::Create).unwrap();
        queue.ensure_schema().unwrap();
        // A database that may not grow refuses like a full disk (SQLITE_FULL).
        let pages: i64 = queue
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        queue
            .conn
            .execute_batch(&format!("PRAGMA max_page_count = {pages}"))
            .unwrap();
        let big = "x".repeat(100_000);
        let task = NewTask {
            name: "t",
            args: &format!("[\"{big}\"]"),
            kwargs: "{}",
            ..NewTask::default()
        };
        let err = queue.enqueue_task(&task).unwrap_err().to_string();
        assert!(err.contains("database or disk is full"), "{err}");
        assert!(err.contains("free some space"), "{err}");
        let queued: i64 = queue
            .conn
            .query_row("SELECT count(*) FROM foreman_task", [], |r| r.get(0))
            .unwrap();
        assert_eq!(queued, 0);
    }

    #[test]
    fn only_a_rows_own_error_skips_its_ending_a_full_disk_fails_the_cycle() {
        let sqlite = |code| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None);
        assert!(is_about_the_row(&sqlite(rusqlite::ffi::SQLITE_CONSTRAINT)));
        assert!(is_about_the_row(&sqlite(rusqlite::ffi::SQLITE_TOOBIG)));
        assert!(is_about_the_row(&rusqlite::Error::InvalidQuery));
        for code in [
            rusqlite::ffi::SQLITE_FULL,
            rusqlite::ffi::SQLITE_IOERR,
            rusqlite::ffi::SQLITE_READONLY,
            rusqlite::ffi::SQLITE_BUSY,
            rusqlite::ffi::SQLITE_CORRUPT,
        ] {
            assert!(!is_about_the_row(&sqlite(code)), "{code}");
        }
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

    /// A new database in `dir`, its schema created, and `sql` run on it.
    fn queue_with(dir: &tempfile::TempDir, sql: &str) -> Queue {
        let mut queue = Queue::open(&dir.path().join("q.db"), Access::Create).unwrap();
        queue.ensure_schema().unwrap();
        queue.conn.execute_batch(sql).unwrap();
        queue
    }

    #[test]
    fn pops_of_changing_sizes_never_re_prepare_the_pop() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = queue_with(
            &dir,
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 40) \
             INSERT INTO foreman_task(task_name) SELECT 't' FROM n",
        );
        let mut popped = 0;
        for (round, limit) in [1, 4, 2, 3, 1, 4, 7, 2].into_iter().enumerate() {
            let now = crate::clock::unix_now() + f64::from(u32::try_from(round).unwrap());
            popped += queue
                .cycle(&[], limit, now, |_| Resolved::Run((), None))
                .unwrap()
                .tasks
                .len();
        }
        assert_eq!(popped, 24);
        for sql in [SQL_DUE_ROWS, SQL_TOP_PRIORITY, SQL_DELETE] {
            let statement = queue.conn.prepare_cached(sql).unwrap();
            let re_prepared = statement.get_status(rusqlite::StatementStatus::RePrepare);
            assert_eq!(re_prepared, 0, "{sql}");
        }
    }

    #[test]
    fn the_column_check_knows_every_table_of_the_schema() {
        let tables: Vec<&str> = expected_tables().iter().map(|(t, _)| t.as_str()).collect();
        for table in [
            "foreman_task",
            "foreman_dead",
            "foreman_run",
            "foreman_schedule",
            "foreman_daemon",
            "foreman_stat",
        ] {
            assert!(tables.contains(&table), "{tables:?}");
        }
        let task = &expected_tables()
            .iter()
            .find(|(t, _)| t == "foreman_task")
            .unwrap()
            .1;
        assert!(task.iter().any(|c| c == "leased_at"), "{task:?}");
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
