//! Maintenance and recovery: what a restart finds of the last daemon's running attempts, history
//! pruned a window at a time, due times moved back after a clock step, and a database file
//! deleted or replaced under the daemon.

use std::os::unix::fs::MetadataExt;

use rusqlite::{OptionalExtension, params};

use super::SqliteStore;
use crate::error::Result;

/// Crashes during one at-least-once task after which it is buried rather than run again.
const MAX_LOST_RUNS: i64 = 3;

impl SqliteStore {
    /// At startup, with the PID lock held (so no other daemon is running): every attempt still
    /// recorded `running` was cut short by a crash. At-least-once tasks among them are due again
    /// at once with attempt + 1; the others are recorded `lost`. Returns (re-queued, lost).
    pub fn recover(&mut self, now: f64) -> Result<(usize, usize)> {
        self.write(|tx| {
        // An attempt `foreman cancel` asked to abort ends cancelled, not lost, and is not run again
        // (an at-least-once task's row goes with it).
        tx.execute(
            "DELETE FROM foreman_task WHERE leased_at IS NOT NULL AND EXISTS \
             (SELECT 1 FROM foreman_abort a WHERE a.task_id = foreman_task.id AND a.attempt = foreman_task.attempt)",
            [],
        )?;
        tx.execute(
            "UPDATE foreman_run SET state = 'cancelled', finished_at = ?1, \
             error = 'aborted (foreman cancel): the daemon stopped while it ran' \
             WHERE state = 'running' AND (task_id, attempt) IN (SELECT task_id, attempt FROM foreman_abort)",
            [now],
        )?;
        tx.execute("DELETE FROM foreman_abort", [])?;
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
            if after.is_none() {
                // Once a pass: abort requests whose attempt ended before a daemon acted on them.
                tx.prepare_cached(
                    "DELETE FROM foreman_abort WHERE NOT EXISTS (SELECT 1 FROM foreman_run r \
                     WHERE r.task_id = foreman_abort.task_id AND r.attempt = foreman_abort.attempt \
                     AND r.state = 'running')",
                )?
                .execute([])?;
            }
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

    /// Whether the file at the database's path is no longer the one this connection has open
    /// (deleted, or replaced by a restored backup): what happened to it, if so. One `stat`, for
    /// the loop's tick. The first time it says so, the old file is abandoned: see `abandon`.
    pub fn lost(&mut self) -> Option<&'static str> {
        let known = self.identity?;
        let what = match std::fs::metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == known => return None,
            Ok(_) => "was replaced by another file",
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "was deleted or moved away",
            // Cannot look (a directory above lost its search permission): no verdict.
            Err(_) => return None,
        };
        if !self.abandoned {
            let db = self.path.display().to_string();
            match self.abandon() {
                Ok(true) => {}
                Ok(false) => log::warn!(
                    "database {db}: another process still reads the old file, so its WAL could not be emptied; a process opening the new file may read the old one's pages: stop every process that uses the database before replacing it"
                ),
                Err(e) => log::warn!("database {db}: emptying the old file's WAL: {e}"),
            }
        }
        Some(what)
    }

    /// Stops writing to a database file that was replaced or deleted under this connection.
    /// SQLite leaves the WAL of a moved file in place at close, where it would be taken for the
    /// WAL of the file now at the path: its pages would then overwrite that file's. So the WAL is
    /// folded into the file this connection has open (the moved or deleted one) and emptied now,
    /// and every later write fails instead of filling it again. Returns whether the WAL is empty
    /// (another process reading the old file can keep it from being emptied).
    fn abandon(&mut self) -> Result<bool> {
        self.abandoned = true;
        let busy: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        Ok(busy == 0)
    }

    /// Whether `lost` found the file gone: nothing more is written to it.
    pub fn was_lost(&self) -> bool {
        self.abandoned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::tests::queue_with;
    use crate::store::types::Access;

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

    #[test]
    #[allow(clippy::float_cmp)] // The values compared are exact.
    fn a_clock_step_back_moves_waiting_rows_back_but_not_due_or_leased_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = SqliteStore::open(&dir.path().join("q.db"), Access::Create).unwrap();
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
}
