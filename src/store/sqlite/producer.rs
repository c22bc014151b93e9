//! A producer's connection, as `schema.sql` tells producers to open one (busy timeout,
//! `synchronous = NORMAL`), for the benchmark: it measures what a producer pays, so it runs a
//! producer's plain statements rather than the store's own enqueue. Also its checks of what became
//! of the rows (still queued, attempts recorded).

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior, params};

use crate::error::{Error, Result};

/// The busy timeout schema.sql recommends to producers.
const PRODUCER_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Producer {
    conn: Connection,
    path: PathBuf,
}

/// What the daemon recorded of a range of tasks in `foreman_run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordedAttempts {
    /// Attempts recorded.
    pub count: usize,
    /// Distinct tasks among them.
    pub tasks: usize,
    /// Attempts recorded `done`.
    pub done: usize,
}

impl Producer {
    pub fn open(path: &Path) -> Result<Producer> {
        let err = |e| Error::db(path, e);
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(PRODUCER_BUSY_TIMEOUT).map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        Ok(Producer {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, e: rusqlite::Error) -> Error {
        Error::db(&self.path, e)
    }

    /// Inserts `count` rows of `name` in one transaction (a recursive CTE: fast at a million
    /// rows); with `keys_from`, row i gets `args = [keys_from + i]` (i from 0). Returns the ids,
    /// consecutive since the transaction held the write lock.
    pub fn insert_many(
        &mut self,
        name: &str,
        count: usize,
        keys_from: Option<i64>,
    ) -> Result<RangeInclusive<i64>> {
        let count = i64::try_from(count).map_err(|_| Error::db(&self.path, "too many rows"))?;
        let args = if keys_from.is_some() {
            "json_array(i - 1 + ?3)"
        } else {
            "'[]'"
        };
        let sql = format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
             INSERT INTO foreman_task(task_name, args) SELECT ?2, {args} FROM n"
        );
        let write = |conn: &mut Connection| -> rusqlite::Result<i64> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            match keys_from {
                Some(from) => tx.execute(&sql, params![count, name, from])?,
                None => tx.execute(&sql, params![count, name])?,
            };
            let last = tx.last_insert_rowid();
            tx.commit()?;
            Ok(last)
        };
        let last = write(&mut self.conn).map_err(|e| self.err(e))?;
        Ok(last - count + 1..=last)
    }

    /// Inserts the list benchmark's `count` rows in one transaction: row i of the task
    /// `bench.rare` every 1,000th (else `bench.bulk`), with priority i % 3, delayed far ahead every
    /// 100th, and args `[i]`.
    pub fn insert_list_fixture(&self, count: usize) -> Result<()> {
        let count = i64::try_from(count).map_err(|_| Error::db(&self.path, "too many rows"))?;
        self.conn
            .execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
                 INSERT INTO foreman_task(task_name, args, priority, run_after) \
                 SELECT CASE WHEN i % 1000 = 0 THEN 'bench.rare' ELSE 'bench.bulk' END, \
                 json_array(i), i % 3, CASE WHEN i % 100 = 0 THEN 9e12 ELSE 1 END FROM n",
                [count],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Inserts one row in a transaction of its own (autocommit), the way most producers do;
    /// returns its id.
    pub fn insert_one(&self, name: &str, args: &str) -> Result<i64> {
        self.conn
            .prepare_cached(
                "INSERT INTO foreman_task(task_name, args) VALUES (?1, ?2) RETURNING id",
            )
            .and_then(|mut s| s.query_row([name, args], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }

    /// Runs `inserts` in one `BEGIN IMMEDIATE` transaction; rolled back if it fails.
    pub fn in_transaction<T>(&self, inserts: impl FnOnce(&Producer) -> Result<T>) -> Result<T> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| self.err(e))?;
        let done = inserts(self).and_then(|done| {
            self.conn.execute_batch("COMMIT").map_err(|e| self.err(e))?;
            Ok(done)
        });
        if done.is_err() && !self.conn.is_autocommit() {
            // Best effort: the connection is dropped with its run anyway.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        done
    }

    /// Inserts a row of `name` with only its name given, and returns its id.
    pub fn insert_name(&self, name: &str) -> Result<i64> {
        self.conn
            .prepare_cached("INSERT INTO foreman_task(task_name) VALUES (?1) RETURNING id")
            .and_then(|mut s| s.query_row([name], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }

    /// Inserts a row of `name` with only its name given, without asking for its id (the cheapest
    /// statement, for a batch whose ids follow from `last_id`).
    pub fn append_name(&self, name: &str) -> Result<()> {
        self.conn
            .prepare_cached("INSERT INTO foreman_task(task_name) VALUES (?1)")
            .and_then(|mut s| s.execute([name]))
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// The id of the last row this connection inserted.
    pub fn last_id(&self) -> i64 {
        self.conn.last_insert_rowid()
    }

    /// Inserts a row of `name` due at `run_after`, and returns its id.
    pub fn insert_due_at(&self, name: &str, run_after: f64) -> Result<i64> {
        self.conn
            .prepare_cached(
                "INSERT INTO foreman_task(task_name, run_after) VALUES (?1, ?2) RETURNING id",
            )
            .and_then(|mut s| s.query_row(params![name, run_after], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }

    /// How many of `ids` are still queued.
    pub fn queued(&self, ids: &RangeInclusive<i64>) -> Result<usize> {
        self.conn
            .prepare_cached("SELECT count(*) FROM foreman_task WHERE id BETWEEN ?1 AND ?2")
            .and_then(|mut s| s.query_row([ids.start(), ids.end()], |r| r.get::<_, i64>(0)))
            .map(|n| usize::try_from(n).unwrap_or(0))
            .map_err(|e| self.err(e))
    }

    /// What the daemon recorded of the attempts of `ids`.
    pub fn attempts(&self, ids: &RangeInclusive<i64>) -> Result<RecordedAttempts> {
        let count = |n: i64| usize::try_from(n).unwrap_or(0);
        self.conn
            .prepare_cached(
                "SELECT count(*), count(DISTINCT task_id), coalesce(sum(state = 'done'), 0) \
                 FROM foreman_run WHERE task_id BETWEEN ?1 AND ?2",
            )
            .and_then(|mut s| {
                s.query_row([ids.start(), ids.end()], |r| {
                    Ok(RecordedAttempts {
                        count: count(r.get(0)?),
                        tasks: count(r.get(1)?),
                        done: count(r.get(2)?),
                    })
                })
            })
            .map_err(|e| self.err(e))
    }
}
