//! The loop's transaction: record the attempts that ended, then pop the due rows of the highest
//! priorities, each resolved by the caller into run, lease, defer or bury, all in one `BEGIN
//! IMMEDIATE`. Also what the idle tick reads without writing: the next due time, and whether
//! anything was committed since its last look.

use std::path::Path;

use rusqlite::{Connection, params};

use super::{SqliteStore, cell};
use crate::error::Result;
use crate::store::row::{RawRow, decode, printable_name};
use crate::store::types::{
    Buried, Claim, Ending, Next, Popped, Resolved, RunState, truncate_error,
};
use crate::task::Task;

/// What `changes` reads: the size and mtime of the database file and of its `-wal`.
pub type FileStamp = [(u64, Option<std::time::SystemTime>); 2];

// The pop's statements. Each is a search of the `foreman_task_due` index (priority, run_after,
// then the rowid): none scans the table or sorts, so a pop costs the same at any queue depth and
// however many rows wait for a later time. A test checks their query plans.
pub(super) const SQL_TOP_PRIORITY: &str =
    "SELECT max(priority) FROM foreman_task WHERE priority <= ?1";

pub(super) const SQL_NEXT_PRIORITY: &str =
    "SELECT max(priority) FROM foreman_task WHERE priority < ?1";

const SQL_DUE_ROWS: &str = "SELECT id, task_name, args, kwargs, created_at, run_after, priority, attempt, origin, leased_at \
     FROM foreman_task WHERE priority = ?1 AND run_after <= ?2 ORDER BY run_after, id LIMIT ?3";

const SQL_NEXT_DUE: &str =
    "SELECT min(run_after) FROM foreman_task WHERE priority = ?1 AND run_after > ?2";

const SQL_DUE_IN_PRIORITY: &str = "SELECT min(run_after) FROM foreman_task WHERE priority = ?1";

const SQL_DELETE: &str = "DELETE FROM foreman_task WHERE id = ?1";

/// Rows looked at beyond the free slots in one pop, so that a head of rows waiting for a busy pool
/// does not keep free slots from the rows behind it.
const LOOKAHEAD: usize = 64;

impl SqliteStore {
    /// One `BEGIN IMMEDIATE` transaction of the loop: records the attempts that `ended` (with
    /// their retries and dead letters), then pops up to `limit` due rows, highest priority first,
    /// each with what `resolve` gave for it. Popped rows are deleted (or leased) and recorded
    /// `running`; rows that cannot run move to `foreman_dead` with the reason; deferred rows are
    /// left alone. Nothing is ever missing from the DB between two states.
    pub fn cycle<H>(
        &mut self,
        ended: &[Ending],
        claim: Claim<'_>,
        now: f64,
        mut resolve: impl FnMut(&Task) -> Resolved<H>,
    ) -> Result<Popped<H>> {
        // One index walk resolves every row: the names are the resolver's business here.
        let limit = claim.limit;
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

    /// The size and modification time of the database file and its `-wal`: every commit changes
    /// one of them, so the idle tick can tell "nothing was committed" with two `stat`s instead of
    /// a read transaction. `None` when they cannot be read.
    pub fn changes(&self) -> Option<FileStamp> {
        let stamp = |path: &Path| {
            std::fs::metadata(path)
                .ok()
                .map(|m| (m.len(), m.modified().ok()))
        };
        let wal = crate::fs_check::suffixed(&self.path, "-wal");
        Some([stamp(&self.path)?, stamp(&wal).unwrap_or((0, None))])
    }

    /// Before one of the daemon's own writes: the mark that lets `after_own_write` carry a token
    /// across it. `None` unless `seen` is the files as they are now (something was committed
    /// since it was taken, or it is unknown): then it stays as it is, and the tick looks.
    pub fn own_write_mark(&self, seen: Option<&FileStamp>) -> Option<i64> {
        if seen.is_none() || self.changes().as_ref() != seen {
            return None;
        }
        self.data_version().ok()
    }

    /// After the daemon's own write: the files as they are now, if no other connection committed
    /// since the mark (SQLite's `data_version` moves for other connections' commits only, so a
    /// producer's commit during the write still reads as a change).
    pub fn after_own_write(&self, mark: i64) -> Option<FileStamp> {
        let now = self.changes();
        (self.data_version().ok() == Some(mark)).then_some(now)?
    }

    /// SQLite's `PRAGMA data_version`: it changes between two calls when another connection
    /// committed meanwhile, and never for this connection's own commits.
    fn data_version(&self) -> Result<i64> {
        self.conn
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::tests::{query_plan, queue_with};
    use crate::store::types::Access;

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
        let mut queue = SqliteStore::open(&path, Access::Create).unwrap();
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
                .cycle(&[], Claim::any(limit), now, |_| Resolved::Run((), None))
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
    fn every_pop_statement_is_an_index_search() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = SqliteStore::open(&dir.path().join("q.db"), Access::Create).unwrap();
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
