//! The loop's transaction: record the attempts that ended, then pop the due rows of the highest
//! priorities, each resolved by the caller into run, lease, defer or bury, all in one `BEGIN
//! IMMEDIATE`. Also what the idle tick reads without writing: the next due time, and whether
//! anything was committed since its last look.

use std::path::Path;

use rusqlite::{CachedStatement, Connection, params};

use super::{SqliteStore, cell};
use crate::error::Result;
use crate::store::row::{Cell, RawRow, decode, printable_name};
use crate::store::types::{
    Buried, Claim, Ending, Next, Popped, Resolved, RunState, truncate_error,
};
use crate::task::Task;

/// What `changes` reads: the size and mtime of the database file and of its `-wal`.
pub type FileStamp = [(u64, Option<std::time::SystemTime>); 2];

// The pop's statements. Each is a search of the `foreman_task_due` index (priority, run_after,
// then the rowid): none scans the table or sorts, so a pop costs the same at any queue depth and
// however many rows wait for a later time. The index is partial (rows a pause holds back are not
// in it), so each says `paused = 0`, which is what lets SQLite use it. A test checks their plans.
pub(super) const SQL_TOP_PRIORITY: &str =
    "SELECT max(priority) FROM foreman_task WHERE paused = 0 AND priority <= ?1";

pub(super) const SQL_NEXT_PRIORITY: &str =
    "SELECT max(priority) FROM foreman_task WHERE paused = 0 AND priority < ?1";

const SQL_DUE_ROWS: &str = "SELECT id, task_name, args, kwargs, created_at, run_after, priority, attempt, origin, leased_at, unique_key \
     FROM foreman_task WHERE paused = 0 AND priority = ?1 AND run_after <= ?2 ORDER BY run_after, id LIMIT ?3";

const SQL_NEXT_DUE: &str =
    "SELECT min(run_after) FROM foreman_task WHERE paused = 0 AND priority = ?1 AND run_after > ?2";

const SQL_DUE_IN_PRIORITY: &str =
    "SELECT min(run_after) FROM foreman_task WHERE paused = 0 AND priority = ?1";

const SQL_DELETE: &str = "DELETE FROM foreman_task WHERE id = ?1";
const SQL_INSERT_RUN: &str = "INSERT OR REPLACE INTO foreman_run(task_id, attempt, task_name, state, \
     enqueued_at, started_at, finished_at, error, task, unique_key) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";
// An ending without a result or an exit status, as most are: a statement that binds two less.
const SQL_END_ATTEMPT: &str = "UPDATE foreman_run SET state = ?3, finished_at = ?4, error = ?5, \
     retry_at = ?6 WHERE task_id = ?1 AND attempt = ?2";

/// Rows looked at beyond the free slots in one pop, so that a head of rows waiting for a busy pool
/// does not keep free slots from the rows behind it.
const LOOKAHEAD: usize = 64;
/// Rows of paused task names one pop sets aside at most (each an UPDATE): a backlog of a name just
/// paused leaves the pop's index in bounded steps, while the rows behind it still run.
const PAUSE_SWEEP: usize = 1000;

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
            paused: 0,
            next_due: None,
        };
        if limit == 0 && ended.is_empty() {
            return Ok(popped);
        }
        self.write(|tx| {
            let mut rows = RowStatements::new(tx);
            record_endings(tx, &mut rows, ended)?;
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
                pop_priority(
                    tx,
                    &mut rows,
                    priority,
                    limit,
                    now,
                    &mut popped,
                    &mut resolve,
                )?;
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

/// Records the attempts that ended, each with its retry or dead letter. All at once under one
/// savepoint, which is what almost every cycle needs; when one ending fails for a reason of its
/// own row (it would fail again however often it is tried), they are recorded again one by one,
/// each under a savepoint of its own, so that that one is skipped (and logged) and the others
/// are not. A failure of the whole database (full, read-only, I/O) fails the cycle, and the loop
/// keeps the endings for the next one.
fn record_endings(
    tx: &Connection,
    rows: &mut RowStatements<'_>,
    ended: &[Ending],
) -> rusqlite::Result<()> {
    if ended.is_empty() {
        return Ok(());
    }
    tx.prepare_cached("SAVEPOINT endings")?.execute([])?;
    let all = ended
        .iter()
        .try_for_each(|ending| record_ending(tx, rows, ending));
    match all {
        Ok(()) => {}
        Err(e) if !is_about_the_row(&e) => return Err(e),
        Err(_) => {
            tx.prepare_cached("ROLLBACK TO endings")?.execute([])?;
            for ending in ended {
                tx.prepare_cached("SAVEPOINT ending")?.execute([])?;
                if let Err(e) = record_ending(tx, rows, ending) {
                    if !is_about_the_row(&e) {
                        return Err(e);
                    }
                    // Undoes this ending alone.
                    tx.prepare_cached("ROLLBACK TO ending")?.execute([])?;
                    log_unrecorded(ending, &e);
                }
                tx.prepare_cached("RELEASE ending")?.execute([])?;
            }
        }
    }
    tx.prepare_cached("RELEASE endings")?.execute([]).map(drop)
}

/// The statements a cycle runs once per row (per popped task, per ended attempt), each taken
/// from the connection's statement cache once per cycle instead of once per row: a cache lookup
/// hashes and compares the statement's text, which cost more than some of these statements' own
/// work.
struct RowStatements<'c> {
    conn: &'c Connection,
    delete: Option<CachedStatement<'c>>,
    insert_run: Option<CachedStatement<'c>>,
    end_attempt: Option<CachedStatement<'c>>,
}

impl<'c> RowStatements<'c> {
    fn new(conn: &'c Connection) -> RowStatements<'c> {
        RowStatements {
            conn,
            delete: None,
            insert_run: None,
            end_attempt: None,
        }
    }

    fn delete(&mut self) -> rusqlite::Result<&mut CachedStatement<'c>> {
        cached(&mut self.delete, self.conn, SQL_DELETE)
    }

    fn insert_run(&mut self) -> rusqlite::Result<&mut CachedStatement<'c>> {
        cached(&mut self.insert_run, self.conn, SQL_INSERT_RUN)
    }

    fn end_attempt(&mut self) -> rusqlite::Result<&mut CachedStatement<'c>> {
        cached(&mut self.end_attempt, self.conn, SQL_END_ATTEMPT)
    }
}

/// The statement in `slot`, taken from the cache the first time.
fn cached<'s, 'c>(
    slot: &'s mut Option<CachedStatement<'c>>,
    conn: &'c Connection,
    sql: &str,
) -> rusqlite::Result<&'s mut CachedStatement<'c>> {
    match slot {
        Some(statement) => Ok(statement),
        None => Ok(slot.insert(conn.prepare_cached(sql)?)),
    }
}

/// Writes what became of an attempt: its `foreman_run` row, and its retry or dead letter.
fn record_ending(
    tx: &Connection,
    rows: &mut RowStatements<'_>,
    ending: &Ending,
) -> rusqlite::Result<()> {
    let task = &ending.task;
    let retry_at = match ending.next {
        Next::Retry(at) => Some(at),
        _ => None,
    };
    let error = ending.error.as_deref().map(truncate_error);
    // Most endings have neither a result nor an exit status: their statement binds two less.
    let changed = if ending.result.is_none() && ending.exit_code.is_none() {
        rows.end_attempt()?.execute(params![
            task.id,
            task.attempt,
            ending.state.as_str(),
            ending.finished_at,
            error,
            retry_at
        ])?
    } else {
        tx.prepare_cached(
            "UPDATE foreman_run SET state = ?3, finished_at = ?4, error = ?5, retry_at = ?6, \
             result = ?7, exit_code = ?8 WHERE task_id = ?1 AND attempt = ?2",
        )?
        .execute(params![
            task.id,
            task.attempt,
            ending.state.as_str(),
            ending.finished_at,
            error,
            retry_at,
            ending.result,
            ending.exit_code
        ])?
    };
    if changed == 0 {
        insert_whole_ending(tx, rows, ending, error.as_deref(), retry_at)?;
    }
    if ending.state == RunState::Cancelled {
        tx.prepare_cached("DELETE FROM foreman_abort WHERE task_id = ?1 AND attempt = ?2")?
            .execute(params![task.id, task.attempt])?;
    }
    match &ending.next {
        Next::Finished => {
            if ending.leased {
                rows.delete()?.execute([task.id])?;
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
                    "INSERT INTO foreman_task(id, task_name, args, kwargs, created_at, run_after, priority, attempt, origin, unique_key) \
                     VALUES (?1, ?2, ?3, ?4, coalesce(?5, (julianday('now') - 2440587.5) * 86400.0), ?6, ?7, ?8, ?9, ?10)",
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
                    task.origin,
                    task.unique_key
                ])?;
            }
        }
        Next::Bury(reason) => {
            if ending.leased {
                rows.delete()?.execute([task.id])?;
            }
            let (args, kwargs) = json_texts(task);
            tx.prepare_cached(
                "INSERT INTO foreman_dead(task_id, task_name, args, kwargs, created_at, reason, attempts, priority, origin, unique_key) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
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
                task.origin,
                task.unique_key
            ])?;
        }
    }
    Ok(())
}

/// History was pruned under a very long task, or the row never got one: the attempt's row is
/// written whole.
fn insert_whole_ending(
    tx: &Connection,
    rows: &mut RowStatements<'_>,
    ending: &Ending,
    error: Option<&str>,
    retry_at: Option<f64>,
) -> rusqlite::Result<()> {
    let task = &ending.task;
    insert_run(
        rows,
        &Attempt {
            task,
            raw: None,
            state: ending.state,
            started_at: None,
            finished_at: Some(ending.finished_at),
            error,
        },
    )?;
    tx.prepare_cached(
        "UPDATE foreman_run SET result = ?3, exit_code = ?4, retry_at = ?5 \
         WHERE task_id = ?1 AND attempt = ?2",
    )?
    .execute(params![
        task.id,
        task.attempt,
        ending.result,
        ending.exit_code,
        retry_at
    ])
    .map(drop)
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

/// An attempt's `foreman_run` row as it is first written.
struct Attempt<'a> {
    task: &'a Task,
    /// The row it was popped from: its args and kwargs are copied as stored, with no encoding.
    raw: Option<&'a RawRow>,
    state: RunState,
    started_at: Option<f64>,
    finished_at: Option<f64>,
    error: Option<&'a str>,
}

/// Writes an attempt's row, with what `foreman retry` needs to queue the task again. On the hot
/// path (one per popped task): the args and kwargs go into its `task` document as the pop read
/// them, not re-encoded.
fn insert_run(rows: &mut RowStatements<'_>, attempt: &Attempt<'_>) -> rusqlite::Result<()> {
    let task = attempt.task;
    let document = task_document(task, attempt.raw);
    rows.insert_run()?
        .execute(params![
            task.id,
            task.attempt,
            task.name,
            attempt.state.as_str(),
            task.created_at,
            attempt.started_at,
            attempt.finished_at,
            attempt.error,
            document,
            task.unique_key,
        ])
        .map(drop)
}

/// `foreman_run.task`: `{"args":…,"kwargs":…,"priority":N,"origin":…}`, leaving out what is
/// usual (empty args or kwargs, priority 0, no origin): `{}` for a plain task, with no allocation.
/// Built by hand from the texts the pop read (valid JSON: the row decoded), which costs a copy,
/// not an encoding: the row is written for every task.
fn task_document(task: &Task, raw: Option<&RawRow>) -> std::borrow::Cow<'static, str> {
    let texts;
    let (args, kwargs) = if let Some((Some(args), Some(kwargs))) =
        raw.map(|raw| (json_text(&raw.args), json_text(&raw.kwargs)))
    {
        (args, kwargs)
    } else {
        texts = json_texts(task);
        (texts.0.as_str(), texts.1.as_str())
    };
    let empty = |text: &str, pair: &str| text.len() == 2 && text == pair;
    let (plain_args, plain_kwargs) = (empty(args, "[]"), empty(kwargs, "{}"));
    if plain_args && plain_kwargs && task.priority == 0 && task.origin.is_none() {
        return "{}".into();
    }
    let origin = task
        .origin
        .as_deref()
        .and_then(|origin| serde_json::to_string(origin).ok());
    let mut digits = [0u8; 20];
    let priority = small_int(task.priority, &mut digits);
    let mut parts: [&str; 9] = [""; 9];
    if !plain_args {
        parts[..2].copy_from_slice(&[",\"args\":", args]);
    }
    if !plain_kwargs {
        parts[2..4].copy_from_slice(&[",\"kwargs\":", kwargs]);
    }
    if task.priority != 0 {
        parts[4..6].copy_from_slice(&[",\"priority\":", priority]);
    }
    if let Some(origin) = &origin {
        parts[6..8].copy_from_slice(&[",\"origin\":", origin]);
    }
    parts[8] = "}";
    let mut document = String::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + 1);
    document.push('{');
    // The first part's comma is the opening's.
    let mut first = true;
    for part in parts {
        if first && part.starts_with(',') {
            document.push_str(&part[1..]);
            first = false;
        } else {
            document.push_str(part);
        }
    }
    document.into()
}

/// An integer's decimal digits, written into `buf` (a priority: -100 to 100, but any i64 fits).
fn small_int(n: i64, buf: &mut [u8; 20]) -> &str {
    let mut end = buf.len();
    let mut rest = n.unsigned_abs();
    loop {
        end -= 1;
        buf[end] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if n < 0 {
        end -= 1;
        buf[end] = b'-';
    }
    std::str::from_utf8(&buf[end..]).unwrap_or("0")
}

/// A column the pop decoded as JSON, as its text (UTF-8 text, or a BLOB of it).
fn json_text(cell: &Cell) -> Option<&str> {
    match cell {
        Cell::Text(text) => Some(text),
        Cell::Blob(bytes) => std::str::from_utf8(bytes).ok(),
        _ => None,
    }
}

/// Pops the due rows of one priority into `popped`, until it holds `limit` tasks.
fn pop_priority<H>(
    tx: &Connection,
    rows: &mut RowStatements<'_>,
    priority: i64,
    limit: usize,
    now: f64,
    popped: &mut Popped<H>,
    resolve: &mut impl FnMut(&Task) -> Resolved<H>,
) -> rusqlite::Result<()> {
    let want = limit - popped.tasks.len();
    // Read first, write after: a deferred row is then never touched, and its lock-free read is
    // all it costs.
    let mut read = Vec::with_capacity(want);
    {
        let mut select = tx.prepare_cached(SQL_DUE_ROWS)?;
        let mut cursor = select.query(params![
            priority,
            now,
            i64::try_from(want + LOOKAHEAD + PAUSE_SWEEP).unwrap_or(i64::MAX)
        ])?;
        let (mut runnable, mut others, mut paused) = (0, 0, 0);
        while runnable < want && others < LOOKAHEAD && paused < PAUSE_SWEEP {
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
                unique_key: cell(r, 10)?,
            };
            let resolved = match decode(&raw) {
                Ok(task) => {
                    let resolved = resolve(&task);
                    match resolved {
                        Resolved::Run(..) => runnable += 1,
                        Resolved::Pause => paused += 1,
                        _ => others += 1,
                    }
                    Ok((task, resolved))
                }
                Err(reason) => {
                    others += 1;
                    Err(reason)
                }
            };
            read.push((raw, resolved));
        }
    }
    for (raw, resolved) in read {
        write_popped(tx, rows, &raw, resolved, now, popped)?;
    }
    Ok(())
}

/// Writes what the pop decided for one row it read: started (deleted or leased, with its running
/// attempt), deferred, held, set aside for a pause, or buried.
fn write_popped<H>(
    tx: &Connection,
    rows: &mut RowStatements<'_>,
    raw: &RawRow,
    resolved: std::result::Result<(Task, Resolved<H>), String>,
    now: f64,
    popped: &mut Popped<H>,
) -> rusqlite::Result<()> {
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
                None => rows.delete()?.execute([task.id]).map(drop)?,
            }
            insert_run(
                rows,
                &Attempt {
                    task: &task,
                    raw: Some(raw),
                    state: RunState::Running,
                    started_at: Some(now),
                    finished_at: None,
                    error: None,
                },
            )?;
            popped.tasks.push((task, handler));
        }
        Ok((_, Resolved::Defer)) => popped.deferred += 1,
        Ok((task, Resolved::Pause)) => {
            if task.was_leased {
                // Its lease ran out with no daemon to hold it: that attempt was cut short.
                lose_expired_lease(tx, &task, now)?;
                tx.prepare_cached(
                    "UPDATE foreman_task SET paused = 1, leased_at = NULL, attempt = attempt + 1 WHERE id = ?1",
                )?
                .execute([task.id])?;
            } else {
                tx.prepare_cached("UPDATE foreman_task SET paused = 1 WHERE id = ?1")?
                    .execute([task.id])?;
            }
            popped.paused += 1;
        }
        Ok((task, Resolved::Hold(until))) => {
            tx.prepare_cached("UPDATE foreman_task SET run_after = ?2 WHERE id = ?1")?
                .execute(params![task.id, until])?;
        }
        Ok((mut task, Resolved::Dead(reason))) => {
            if task.was_leased {
                lose_expired_lease(tx, &task, now)?;
                task.attempt = task.attempt.saturating_add(1);
            }
            bury_raw(tx, rows, raw, &reason)?;
            insert_run(
                rows,
                &Attempt {
                    task: &task,
                    raw: Some(raw),
                    state: RunState::Dead,
                    started_at: None,
                    finished_at: Some(now),
                    error: Some(&reason),
                },
            )?;
            popped.dead.push(Buried {
                task_id: raw.id,
                task_name: Some(task.name),
                reason,
            });
        }
        Err(reason) => {
            bury_raw(tx, rows, raw, &reason)?;
            popped.dead.push(Buried {
                task_id: raw.id,
                task_name: printable_name(&raw.task_name),
                reason,
            });
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
fn bury_raw(
    tx: &Connection,
    rows: &mut RowStatements<'_>,
    raw: &RawRow,
    reason: &str,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO foreman_dead(task_id, task_name, args, kwargs, created_at, reason, attempts, priority, origin, unique_key) \
         SELECT id, task_name, args, kwargs, created_at, ?2, 0, \
                CASE WHEN typeof(priority) = 'integer' THEN priority ELSE 0 END, origin, unique_key \
         FROM foreman_task WHERE id = ?1",
    )?
    .execute(params![raw.id, reason])?;
    rows.delete()?.execute([raw.id]).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::tests::{query_plan, queue_with};
    use crate::store::types::Access;

    #[test]
    fn the_task_document_is_the_json_of_the_task_as_popped() {
        let raw = RawRow {
            id: 7,
            task_name: Cell::Text("t".into()),
            args: Cell::Text("[1, \"two\"]".into()),
            kwargs: Cell::Blob(b"{\"k\": null}".to_vec()),
            created_at: Cell::Null,
            run_after: Cell::Null,
            priority: Cell::Integer(-100),
            attempt: Cell::Integer(1),
            origin: Cell::Text("schedule \"s\"".into()),
            leased_at: Cell::Null,
            unique_key: Cell::Null,
        };
        let task = decode(&raw).unwrap();
        let document = task_document(&task, Some(&raw));
        let parsed: serde_json::Value = serde_json::from_str(&document).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({"args": [1, "two"], "kwargs": {"k": null}, "priority": -100,
                "origin": "schedule \"s\""})
        );
        let usual = Task {
            priority: 0,
            origin: None,
            ..task.clone()
        };
        assert_eq!(
            task_document(&usual, None),
            "{\"args\":[1,\"two\"],\"kwargs\":{\"k\":null}}"
        );
        let only_kwargs = Task {
            args: Vec::new(),
            ..usual.clone()
        };
        assert_eq!(
            task_document(&only_kwargs, None),
            "{\"kwargs\":{\"k\":null}}"
        );
        let plain = Task {
            kwargs: serde_json::Map::new(),
            ..only_kwargs
        };
        assert!(matches!(
            task_document(&plain, None),
            std::borrow::Cow::Borrowed("{}")
        ));
        for n in [0, 5, -7, 100, i64::MIN, i64::MAX] {
            let mut buf = [0u8; 20];
            assert_eq!(small_int(n, &mut buf), n.to_string());
        }
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
    fn an_ending_its_row_refuses_is_skipped_and_the_others_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = queue_with(
            &dir,
            "INSERT INTO foreman_task(task_name) VALUES ('a'), ('b'), ('c')",
        );
        let now = crate::clock::unix_now();
        let popped = queue
            .cycle(&[], Claim::any(3), now, |_| Resolved::Run((), None))
            .unwrap();
        let ending = |task: &Task, next: Next| Ending {
            task: task.clone(),
            state: RunState::Failed,
            finished_at: now,
            error: Some("boom".to_owned()),
            next,
            leased: false,
            result: None,
            exit_code: None,
        };
        let tasks: Vec<&Task> = popped.tasks.iter().map(|(t, ())| t).collect();
        // A producer took the first task's id meanwhile: its retry cannot go back under it.
        queue
            .conn
            .execute(
                "INSERT INTO foreman_task(id, task_name) VALUES (?1, 'squatter')",
                [tasks[0].id],
            )
            .unwrap();
        let ended = [
            ending(tasks[0], Next::Retry(now + 60.0)),
            ending(tasks[1], Next::Retry(now + 60.0)),
            ending(tasks[2], Next::Finished),
        ];
        queue
            .cycle(&ended, Claim::any(0), now, |_| Resolved::Run((), None))
            .unwrap();
        let state = |id: i64| -> String {
            queue
                .conn
                .query_row(
                    "SELECT state FROM foreman_run WHERE task_id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .unwrap()
        };
        assert_eq!(
            state(tasks[0].id),
            "running",
            "the refused ending is undone whole"
        );
        assert_eq!(state(tasks[1].id), "failed");
        assert_eq!(state(tasks[2].id), "failed");
        let retried: i64 = queue
            .conn
            .query_row(
                "SELECT attempt FROM foreman_task WHERE id = ?1",
                [tasks[1].id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(retried, 2);
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
