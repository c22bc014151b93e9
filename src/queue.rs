//! `Queue`: every SQL statement foreman runs (besides `schema.sql`), on one connection. It owns the
//! connection settings, the schema version check, the pop transaction and the CLI's queries.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, TransactionBehavior, params};

use crate::error::{Error, Result};
use crate::task::{RawRow, Task, decode};

/// The public protocol; see the comment block at its top.
pub const SCHEMA_SQL: &str = include_str!("../schema.sql");
/// The `PRAGMA user_version` this binary creates and understands.
pub const SCHEMA_VERSION: i64 = 1;
/// How long a statement waits for another connection's write lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

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

/// What one pop transaction did. `H` is whatever the caller's resolver gives for a task name.
#[derive(Debug)]
pub struct Popped<H> {
    /// Tasks to run, in id order, each with what its name resolved to. Their rows are deleted.
    pub tasks: Vec<(Task, H)>,
    /// Rows moved to `foreman_dead`: (task id, reason).
    pub dead: Vec<(i64, String)>,
    /// Rows the resolver deferred: they are still queued, unchanged.
    pub deferred: usize,
}

impl<H> Popped<H> {
    /// Rows the pop looked at.
    pub fn rows(&self) -> usize {
        self.tasks.len() + self.dead.len() + self.deferred
    }
}

/// What the pop's resolver decides for a decoded task.
pub enum Resolved<H> {
    Run(H),
    /// It cannot run: moved to `foreman_dead` with this reason.
    Dead(String),
    /// It cannot run *yet* (its pool is busy or still starting): it stays queued.
    Defer,
}

/// The queue as `foreman status` reports it.
#[derive(Debug, Default)]
pub struct QueueStatus {
    pub total: i64,
    /// Seconds since the oldest queued row was inserted.
    pub oldest_age_seconds: Option<f64>,
    /// (task name, queued count), by name.
    pub by_task: Vec<(String, i64)>,
    pub dead: i64,
}

impl Queue {
    /// Opens the database as `access` says and applies the connection settings.
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
        let conn = Connection::open_with_flags(path, flags).map_err(|e| Error::db(path, e))?;
        let queue = Queue {
            conn,
            path: path.to_path_buf(),
        };
        queue.configure(access).map_err(|e| queue.err(e))?;
        Ok(queue)
    }

    fn configure(&self, access: Access) -> rusqlite::Result<()> {
        self.conn.busy_timeout(BUSY_TIMEOUT)?;
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
        self.conn.execute_batch("PRAGMA synchronous = NORMAL")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::db(&self.path, e)
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
        tx.execute_batch(SCHEMA_SQL)
            .map_err(|e| Error::db(&self.path, e))?;
        tx.commit().map_err(|e| Error::db(&self.path, e))
    }

    /// Checks that the schema exists and is one this binary understands, without changing anything.
    pub fn check_schema(&self) -> Result<()> {
        match self.user_version()? {
            0 => Err(self.err("has no foreman schema (run `foreman init`)")),
            version => self.refuse_newer(version),
        }
    }

    /// In one `BEGIN IMMEDIATE` transaction, deletes up to `limit` rows in id order and returns the
    /// ones that can run, each with what `resolve` gave for it. Rows that cannot run (bad JSON, or
    /// `Resolved::Dead`) are moved to `foreman_dead` with the reason, and deferred rows are put back
    /// unchanged (same id, so FIFO order holds), both in the same transaction: no other connection
    /// ever sees a row missing.
    pub fn pop<H>(
        &mut self,
        limit: usize,
        mut resolve: impl FnMut(&Task) -> Resolved<H>,
    ) -> Result<Popped<H>> {
        let mut popped = Popped {
            tasks: Vec::with_capacity(limit),
            dead: Vec::new(),
            deferred: 0,
        };
        if limit == 0 {
            return Ok(popped);
        }
        let path = &self.path;
        let err = |e: rusqlite::Error| Error::db(path, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let mut raws = {
            let mut delete = tx
                .prepare_cached(
                    "DELETE FROM foreman_task WHERE id IN (SELECT id FROM foreman_task ORDER BY id LIMIT ?1) \
                     RETURNING id, task_name, args, kwargs, created_at",
                )
                .map_err(err)?;
            let rows = delete
                .query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                    Ok(RawRow {
                        id: r.get(0)?,
                        task_name: r.get(1)?,
                        args: r.get(2)?,
                        kwargs: r.get(3)?,
                        created_at: r.get(4)?,
                    })
                })
                .map_err(err)?;
            rows.collect::<rusqlite::Result<Vec<RawRow>>>()
                .map_err(err)?
        };
        // RETURNING gives no order guarantee; FIFO is promised.
        raws.sort_unstable_by_key(|r| r.id);
        for raw in raws {
            let reason = match decode(&raw) {
                Ok(task) => match resolve(&task) {
                    Resolved::Run(handler) => {
                        popped.tasks.push((task, handler));
                        continue;
                    }
                    Resolved::Dead(reason) => reason,
                    Resolved::Defer => {
                        tx.prepare_cached(
                            "INSERT INTO foreman_task(id, task_name, args, kwargs, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                        )
                        .and_then(|mut insert| {
                            insert.execute(params![raw.id, raw.task_name, raw.args, raw.kwargs, raw.created_at])
                        })
                        .map_err(err)?;
                        popped.deferred += 1;
                        continue;
                    }
                },
                Err(reason) => reason,
            };
            tx.prepare_cached(
                "INSERT INTO foreman_dead(task_id, task_name, args, kwargs, created_at, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut insert| {
                insert.execute(params![raw.id, raw.task_name, raw.args, raw.kwargs, raw.created_at, reason])
            })
            .map_err(err)?;
            popped.dead.push((raw.id, reason));
        }
        tx.commit().map_err(err)?;
        Ok(popped)
    }

    /// Moves an already popped task that cannot run to `foreman_dead` (the pop itself buries the
    /// rows it can judge; this is for tasks that turn out to be unrunnable after the pop).
    pub fn bury(&mut self, task: &Task, reason: &str) -> Result<()> {
        let args = serde_json::Value::from(task.args.clone()).to_string();
        let kwargs = serde_json::Value::from(task.kwargs.clone()).to_string();
        self.conn
            .prepare_cached(
                "INSERT INTO foreman_dead(task_id, task_name, args, kwargs, created_at, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut insert| {
                insert.execute(params![task.id, task.name, args, kwargs, task.created_at, reason])
            })
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// A cheap read that tells whether a pop would find anything; used by the fallback tick so an
    /// idle daemon never takes the write lock.
    pub fn has_queued(&self) -> Result<bool> {
        self.conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM foreman_task)")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }

    /// Inserts one task; the caller has checked that `args` is a JSON array and `kwargs` an object.
    pub fn enqueue(&mut self, name: &str, args: &str, kwargs: &str) -> Result<i64> {
        self.conn
            .prepare_cached("INSERT INTO foreman_task(task_name, args, kwargs) VALUES (?1, ?2, ?3) RETURNING id")
            .and_then(|mut s| s.query_row(params![name, args, kwargs], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }

    pub fn status(&self) -> Result<QueueStatus> {
        let err = |e| self.err(e);
        let tx = self.conn.unchecked_transaction().map_err(err)?;
        let by_task = tx
            .prepare("SELECT task_name, count(*) FROM foreman_task GROUP BY task_name ORDER BY task_name")
            .map_err(err)?
            .query_map([], |r| Ok((text_lossy(r.get(0)?), r.get::<_, i64>(1)?)))
            .map_err(err)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(err)?;
        let oldest_age_seconds: Option<f64> = tx
            .query_row(
                "SELECT (julianday('now') - 2440587.5) * 86400.0 - created_at FROM foreman_task ORDER BY id LIMIT 1",
                [],
                |r| r.get(0),
            )
            .or_else(|e| if e == rusqlite::Error::QueryReturnedNoRows { Ok(None) } else { Err(e) })
            .map_err(err)?;
        let dead = tx
            .query_row("SELECT count(*) FROM foreman_dead", [], |r| r.get(0))
            .map_err(err)?;
        Ok(QueueStatus {
            total: by_task.iter().map(|(_, n)| n).sum(),
            oldest_age_seconds,
            by_task,
            dead,
        })
    }
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
