//! The SQLite backend: one connection to one database file, its settings (WAL, busy timeout,
//! statement and page caches) and the one way it writes (`write`: a prepared `BEGIN IMMEDIATE`
//! transaction). The work is split by job: `schema` (creation and migration), `cycle` (the loop's
//! transaction), `enqueue` (new tasks and schedule firings), `upkeep` (recovery, pruning, a file
//! lost under the daemon), `daemon` (its heartbeat row and figures), `report`, `admin` and
//! `browse` (the operator's queries), `ui` (the dashboard's), `control` (pauses and aborts), `producer` (the benchmark's
//! bulk rows), `files` (the file system's view of the database) and `watch` (commits seen from
//! another process).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};

use crate::error::{Error, Result};
use crate::store::row::Cell;
use crate::store::types::Access;

pub mod admin;
pub mod browse;
pub mod control;
pub mod cycle;
pub mod daemon;
pub mod enqueue;
pub mod files;
pub mod producer;
pub mod report;
pub mod schema;
pub mod ui;
pub mod upkeep;
pub mod watch;

/// Prepared statements kept per connection: every statement foreman runs, with room to spare.
const STATEMENT_CACHE: usize = 64;

/// How long a statement waits for another connection's write lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The size in bytes a grown `-wal` is cut back to when SQLite starts reusing it.
pub const WAL_SIZE_LIMIT: u64 = 16 << 20;

pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    /// (device, inode) of the file opened: a file at `path` that is not this one means the
    /// database was deleted or replaced under the connection.
    identity: Option<(u64, u64)>,
    /// Set by `abandon`: nothing more is written.
    abandoned: bool,
}

impl SqliteStore {
    /// Opens the database as `access` says and applies the connection settings. A database this
    /// user cannot write (a read-only mount or file, a directory where SQLite cannot create the
    /// `-wal` and `-shm` files) is refused up front, in the preflight's words, rather than with
    /// SQLite's code at the first write.
    pub fn open(path: &Path, access: Access) -> Result<SqliteStore> {
        let mut flags = OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
        flags |= match access {
            Access::Create => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
            Access::ReadWrite => OpenFlags::SQLITE_OPEN_READ_WRITE,
            Access::ReadOnly => OpenFlags::SQLITE_OPEN_READ_ONLY,
        };
        if access != Access::Create {
            files::exists(path)?;
        }
        if access == Access::ReadOnly {
            return SqliteStore::open_read_only(path, flags);
        }
        files::db_writable(path, false)?;
        let refused = |e: rusqlite::Error| SqliteStore::refused(path, access, e);
        let conn = Connection::open_with_flags(path, flags).map_err(refused)?;
        let queue = SqliteStore::with_connection(path, conn);
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

    /// Opens the database for reading only, as a user who may not write it or its directory (a
    /// monitoring user). SQLite reads a WAL database through its `-shm` index, which it creates
    /// when the first connection opens it: a user who cannot create it cannot read the database
    /// the usual way while no daemon has it open (after a clean stop, when SQLite has removed
    /// `-wal` and `-shm`). Then the database is read as immutable, without locks or the WAL: an
    /// empty or missing `-wal` means the file holds every commit. A `-wal` left with commits (the
    /// last daemon was killed) cannot be read without the index; the rows read are then older than
    /// those commits, which a warning says.
    fn open_read_only(path: &Path, flags: OpenFlags) -> Result<SqliteStore> {
        let refused = |e: rusqlite::Error| SqliteStore::refused(path, Access::ReadOnly, e);
        let store = SqliteStore::with_connection(
            path,
            Connection::open_with_flags(path, flags).map_err(refused)?,
        );
        match store.configure(Access::ReadOnly) {
            Ok(()) => return Ok(store),
            Err(e) if !files::needs_the_index(&e) => return Err(refused(e)),
            Err(_) => {}
        }
        drop(store);
        if files::wal_has_commits(path) {
            log::warn!(
                "reading {} without its -wal: this user cannot create {}-shm, which SQLite needs to read the commits still in the -wal (the last daemon did not stop cleanly), so the most recent ones do not show; give this user write access to the directory, or read while a daemon runs",
                path.display(),
                path.display()
            );
        }
        let conn =
            Connection::open_with_flags(files::immutable_uri(path), flags).map_err(refused)?;
        let store = SqliteStore::with_connection(path, conn);
        store.configure(Access::ReadOnly).map_err(refused)?;
        Ok(store)
    }

    fn with_connection(path: &Path, conn: Connection) -> SqliteStore {
        SqliteStore {
            conn,
            path: path.to_path_buf(),
            identity: std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino())),
            abandoned: false,
        }
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

    fn refuse_abandoned(&self) -> Result<()> {
        if self.abandoned {
            return Err(self.err(
                "the file was replaced or deleted under the daemon; nothing more is written to it",
            ));
        }
        Ok(())
    }
}

/// A cell binds as the value it was read as: text that is not UTF-8 goes back as the bytes it was
/// (a BLOB), so a copy keeps what a producer stored.
impl rusqlite::ToSql for Cell {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(rusqlite::types::ToSqlOutput::Borrowed(match self {
            Cell::Null => ValueRef::Null,
            Cell::Integer(i) => ValueRef::Integer(*i),
            Cell::Real(f) => ValueRef::Real(*f),
            Cell::Text(text) => ValueRef::Text(text.as_bytes()),
            Cell::Blob(bytes) => ValueRef::Blob(bytes),
        }))
    }
}

/// A column as a `Cell`, whatever a producer stored in it. SQLite lets a TEXT value hold bytes
/// that are not UTF-8, which rusqlite refuses to read as text: read with `get`, one such row
/// would fail every pop (and every `status` or `dead list`) for good. Those bytes come back as a
/// `Blob`, which the decoding turns into "not valid UTF-8".
pub(crate) fn cell(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Cell> {
    Ok(match row.get_ref(index)? {
        ValueRef::Null => Cell::Null,
        ValueRef::Integer(i) => Cell::Integer(i),
        ValueRef::Real(f) => Cell::Real(f),
        ValueRef::Text(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => Cell::Text(text.to_owned()),
            Err(_) => Cell::Blob(bytes.to_vec()),
        },
        ValueRef::Blob(bytes) => Cell::Blob(bytes.to_vec()),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::types::NewTask;

    /// The steps of `sql`'s query plan, joined by " | ".
    pub(crate) fn query_plan(queue: &SqliteStore, sql: &str) -> String {
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

    /// A new database in `dir`, its schema created, and `sql` run on it.
    pub(crate) fn queue_with(dir: &tempfile::TempDir, sql: &str) -> SqliteStore {
        let mut queue = SqliteStore::open(&dir.path().join("q.db"), Access::Create).unwrap();
        queue.ensure_schema().unwrap();
        queue.conn.execute_batch(sql).unwrap();
        queue
    }

    #[test]
    fn a_full_database_is_said_with_the_free_space_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = SqliteStore::open(&dir.path().join("q.db"), Access::Create).unwrap();
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
}
