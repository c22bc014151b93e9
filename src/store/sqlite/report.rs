//! The operator's read-only queries behind `status`, `stats`, `health` and `metrics`: the daemon's
//! heartbeat row, the running set, the queue's depth and its oldest due rows, dead letters and the
//! per-minute figures. It never writes, and it does not judge: what counts as up, stale or stalled
//! is `ops`' business. The queries `health` runs are index lookups at any queue depth (a probe runs
//! it every few seconds); a test checks their plans. Only `status`, `stats` and `metrics` scan.

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, params};

use super::cycle::{SQL_NEXT_PRIORITY, SQL_TOP_PRIORITY};
use super::{SqliteStore, cell};
use crate::error::Result;
use crate::stats::{Histogram, MinuteStat};
use crate::store::types::{
    DaemonRow, DueRow, RunningAttempt, TaskDepth, parse_pools, parse_totals,
};

// The due rows of one priority, longest due first: a range search of `foreman_task_due`, like the
// pop's. Leased rows in the range (an expired lease about to be taken again) are stepped over.
const SQL_DUE_BEFORE: &str = "SELECT id, task_name, run_after, created_at FROM foreman_task \
     WHERE paused = 0 AND priority = ?1 AND run_after <= ?2 AND leased_at IS NULL \
     ORDER BY run_after, id LIMIT ?3";
// Served by the partial index `foreman_run_running`, which holds the running attempts alone.
const SQL_RUNNING: &str = "SELECT task_id, attempt, task_name, started_at, enqueued_at \
     FROM foreman_run WHERE state = 'running'";
const SQL_DAEMON: &str = "SELECT pid, pid_start, host, version, started_at, heartbeat_at, stopped_at, \
     workers, pools, totals, stopping_at FROM foreman_daemon WHERE id = 1";

impl SqliteStore {
    /// Runs `read` in one read transaction, so that every figure it reads is of the same moment
    /// (the pop moves a row from the queue to the running set in one commit).
    pub fn snapshot<T>(&self, read: impl FnOnce() -> Result<T>) -> Result<T> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        let value = read()?;
        // Nothing was written: ending the transaction either way only releases the snapshot.
        tx.finish().map_err(|e| self.err(e))?;
        Ok(value)
    }

    /// The `foreman_daemon` row, if a daemon (of schema version 3 or later) ever started here.
    pub fn daemon_row(&self) -> Result<Option<DaemonRow>> {
        self.conn
            .prepare_cached(SQL_DAEMON)
            .and_then(|mut s| {
                s.query_row([], |r| {
                    Ok(DaemonRow {
                        id: 1,
                        pid: r.get(0)?,
                        pid_start: r.get(1)?,
                        host: r.get(2)?,
                        version: r.get(3)?,
                        started_at: r.get(4)?,
                        heartbeat_at: r.get(5)?,
                        stopped_at: r.get(6)?,
                        workers: r.get(7)?,
                        pools: parse_pools(&r.get::<_, String>(8)?),
                        totals: parse_totals(&r.get::<_, String>(9)?),
                        stopping_at: r.get(10)?,
                        served: Vec::new(),
                        recovered_at: None,
                        recovered_by: None,
                    })
                })
                .optional()
            })
            .map_err(|e| self.err(e))
    }

    /// The attempts recorded `running`, oldest first. While the daemon runs, they are its tasks;
    /// when it is down, they are what it was running when it stopped (its next start records them
    /// `lost`).
    pub fn running_attempts(&self) -> Result<Vec<RunningAttempt>> {
        let mut running = self
            .conn
            .prepare_cached(SQL_RUNNING)
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok(RunningAttempt {
                        // The one daemon of the file (its row's id is always 1).
                        daemon_id: Some(1),
                        task_id: r.get(0)?,
                        attempt: r.get(1)?,
                        task_name: r.get(2)?,
                        started_at: cell(r, 3)?.as_f64(),
                        enqueued_at: cell(r, 4)?.as_f64(),
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(|e| self.err(e))?;
        // Sorted here rather than by SQL: the set is at most a few workers' worth, and the plan
        // stays a plain walk of the partial index.
        running.sort_by(|a, b| {
            a.started_at
                .unwrap_or(f64::INFINITY)
                .total_cmp(&b.started_at.unwrap_or(f64::INFINITY))
                .then(a.task_id.cmp(&b.task_id))
        });
        Ok(running)
    }

    /// The queued rows per task name as of `now`, by name. One scan of the table: for `status`
    /// and `metrics`, never for `health`.
    pub fn queue_depth(&self, now: f64) -> Result<Vec<TaskDepth>> {
        let rows = self
            .conn
            .prepare_cached(
                "SELECT task_name, count(*), \
                 coalesce(sum(leased_at IS NULL AND run_after <= ?1), 0), \
                 coalesce(sum(leased_at IS NULL AND run_after > ?1), 0), \
                 coalesce(sum(leased_at IS NOT NULL), 0), \
                 min(CASE WHEN leased_at IS NULL AND run_after <= ?1 THEN \
                     max(run_after, CASE WHEN typeof(created_at) IN ('real', 'integer') THEN created_at ELSE run_after END) END), \
                 min(CASE WHEN leased_at IS NULL AND run_after > ?1 THEN run_after END) \
                 FROM foreman_task GROUP BY task_name",
            )
            .and_then(|mut s| {
                s.query_map([now], |r| {
                    Ok(TaskDepth {
                        task_name: cell(r, 0)?.into_text_lossy(),
                        queued: r.get(1)?,
                        due: r.get(2)?,
                        delayed: r.get(3)?,
                        leased: r.get(4)?,
                        paused: 0,
                        oldest_due_at: cell(r, 5)?.as_f64(),
                        next_due_at: cell(r, 6)?.as_f64(),
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(|e| self.err(e))?;
        // Names stored as a blob and as text read the same once decoded: one entry each.
        let mut by_name: BTreeMap<String, TaskDepth> = BTreeMap::new();
        for row in rows {
            let entry = by_name
                .entry(row.task_name.clone())
                .or_insert_with(|| TaskDepth {
                    task_name: row.task_name.clone(),
                    ..TaskDepth::default()
                });
            entry.queued += row.queued;
            entry.due += row.due;
            entry.delayed += row.delayed;
            entry.leased += row.leased;
            entry.oldest_due_at = earliest(entry.oldest_due_at, row.oldest_due_at);
            entry.next_due_at = earliest(entry.next_due_at, row.next_due_at);
        }
        Ok(by_name.into_values().collect())
    }

    /// The due, unleased row that became due first (by `run_after`, across priorities). One
    /// index lookup per priority in use, however many rows are queued.
    pub fn oldest_due(&self, now: f64) -> Result<Option<DueRow>> {
        let mut oldest: Option<DueRow> = None;
        self.walk_due_rows(now, 1, |row| {
            if oldest.as_ref().is_none_or(|o| row.due_since < o.due_since) {
                oldest = Some(row);
            }
            false
        })?;
        Ok(oldest)
    }

    /// The longest-waiting row that has been due since `before` or earlier and that `waits_for_us`
    /// says the daemon should have started. Looks at no more than `lookahead` rows per priority
    /// (the pop's own lookahead), so rows it skips (a saturated pool's) cost a bounded walk.
    pub fn first_waiting(
        &self,
        before: f64,
        lookahead: usize,
        mut waits_for_us: impl FnMut(&DueRow) -> bool,
    ) -> Result<Option<DueRow>> {
        let mut found: Option<DueRow> = None;
        let mut done_with = None;
        self.walk_due_rows(before, lookahead, |row| {
            if done_with == Some(row.priority) || row.due_since > before || !waits_for_us(&row) {
                return false;
            }
            // The first such row of a priority is its longest-waiting one.
            done_with = Some(row.priority);
            if found.as_ref().is_none_or(|f| row.due_since < f.due_since) {
                found = Some(row);
            }
            false
        })?;
        Ok(found)
    }

    /// Visits, for each priority in use from the highest down, its first `limit` rows due at
    /// `before` (not leased), in pop order, until `visit` returns true.
    fn walk_due_rows(
        &self,
        before: f64,
        limit: usize,
        mut visit: impl FnMut(DueRow) -> bool,
    ) -> Result<()> {
        let err = |e| self.err(e);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut priority: Option<i64> = self
            .conn
            .prepare_cached(SQL_TOP_PRIORITY)
            .and_then(|mut s| s.query_row([i64::MAX], |r| r.get(0)))
            .map_err(err)?;
        while let Some(p) = priority {
            let mut select = self.conn.prepare_cached(SQL_DUE_BEFORE).map_err(err)?;
            let mut rows = select.query(params![p, before, limit]).map_err(err)?;
            while let Some(r) = rows.next().map_err(err)? {
                let run_after: f64 = r.get(2).map_err(err)?;
                let row = DueRow {
                    task_id: r.get(0).map_err(err)?,
                    task_name: cell(r, 1).map_err(err)?.into_text_lossy(),
                    priority: p,
                    due_since: cell(r, 3)
                        .map_err(err)?
                        .as_f64()
                        .map_or(run_after, |c| c.max(run_after)),
                };
                if visit(row) {
                    return Ok(());
                }
            }
            if p == i64::MIN {
                break;
            }
            priority = self
                .conn
                .prepare_cached(SQL_NEXT_PRIORITY)
                .and_then(|mut s| s.query_row([p], |r| r.get(0)))
                .map_err(err)?;
        }
        Ok(())
    }

    /// Rows in `foreman_dead`.
    pub fn dead_count(&self) -> Result<i64> {
        self.conn
            .prepare_cached("SELECT count(*) FROM foreman_dead")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }

    /// The `foreman_stat` rows of minutes `from..=to` (of `task` only, if given), by minute: a
    /// range of the primary key.
    pub fn minute_stats(
        &self,
        from: i64,
        to: i64,
        task: Option<&str>,
    ) -> Result<Vec<(i64, String, MinuteStat)>> {
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        self.conn
            .prepare_cached(
                "SELECT minute, task_name, count, done, failed, wall_total, wall_max, wait_total, \
                 wait_max, wall_hist, wait_hist FROM foreman_stat \
                 WHERE minute >= ?1 AND minute <= ?2 AND (?3 IS NULL OR task_name = ?3) \
                 ORDER BY minute, task_name",
            )
            .and_then(|mut s| {
                s.query_map(params![from, to, task], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        MinuteStat {
                            count: count(r.get(2)?),
                            done: count(r.get(3)?),
                            failed: count(r.get(4)?),
                            wall_total: r.get(5)?,
                            wall_max: r.get(6)?,
                            wait_total: r.get(7)?,
                            wait_max: r.get(8)?,
                            wall_hist: Histogram::from_json(&r.get::<_, String>(9)?),
                            wait_hist: Histogram::from_json(&r.get::<_, String>(10)?),
                        },
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(|e| self.err(e))
    }
}

fn earliest(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Access;
    use crate::store::types::Totals;

    fn queue() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = SqliteStore::open(&dir.path().join("q.db"), Access::Create).unwrap();
        queue.ensure_schema().unwrap();
        (dir, queue)
    }

    fn insert(
        queue: &SqliteStore,
        name: &str,
        created_at: f64,
        run_after: f64,
        priority: i64,
    ) -> i64 {
        queue
            .conn
            .query_row(
                "INSERT INTO foreman_task(task_name, created_at, run_after, priority) \
                 VALUES (?1, ?2, ?3, ?4) RETURNING id",
                params![name, created_at, run_after, priority],
                |r| r.get(0),
            )
            .unwrap()
    }

    #[test]
    fn the_daemon_row_reads_back_with_its_json_columns() {
        let (_dir, queue) = queue();
        assert_eq!(queue.daemon_row().unwrap(), None);
        queue
            .conn
            .execute(
                "INSERT INTO foreman_daemon(id, pid, pid_start, host, version, started_at, \
                 heartbeat_at, workers, pools, totals) VALUES (1, 42, 7, 'h', '0.1.0', 100, 150, 4, ?1, ?2)",
                [
                    r#"[{"name":"py","processes":2,"up":2,"busy":2,"tasks":["a","b"]},{"name":"old","processes":1,"up":0},{"bad":1}]"#,
                    r#"{"a":{"done":3,"failed":1},"b":{"done":2}}"#,
                ],
            )
            .unwrap();
        let row = queue.daemon_row().unwrap().unwrap();
        assert_eq!((row.pid, row.pid_start, row.workers), (42, Some(7), 4));
        assert_eq!(row.pools.len(), 2);
        assert!(row.pools[0].is_saturated());
        assert_eq!(row.pools[0].tasks, ["a", "b"]);
        assert_eq!(row.pools[1].busy, None);
        assert!(
            !row.pools[1].is_saturated(),
            "unknown busy is not saturated"
        );
        assert_eq!(row.totals["a"], Totals { done: 3, failed: 1 });
        assert_eq!(row.totals["b"], Totals { done: 2, failed: 0 });
        queue
            .conn
            .execute(
                "UPDATE foreman_daemon SET pools = 'garbage', totals = '[]'",
                [],
            )
            .unwrap();
        let row = queue.daemon_row().unwrap().unwrap();
        assert!(row.pools.is_empty() && row.totals.is_empty());
    }

    #[test]
    fn depth_splits_due_delayed_and_leased_per_name() {
        let (_dir, queue) = queue();
        let now = 1000.0;
        insert(&queue, "a", 900.0, 900.0, 0);
        insert(&queue, "a", 950.0, 950.0, 5);
        insert(&queue, "a", 950.0, 2000.0, 0);
        insert(&queue, "b", 990.0, 1500.0, 0);
        let leased = insert(&queue, "b", 800.0, 1100.0, 0);
        queue
            .conn
            .execute(
                "UPDATE foreman_task SET leased_at = 990 WHERE id = ?1",
                [leased],
            )
            .unwrap();
        // A producer that set run_after before the row existed: due since its insertion.
        insert(&queue, "c", 970.0, 10.0, 0);
        let depth = queue.queue_depth(now).unwrap();
        let names: Vec<_> = depth.iter().map(|d| d.task_name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        let a = &depth[0];
        assert_eq!((a.queued, a.due, a.delayed, a.leased), (3, 2, 1, 0));
        assert_eq!(
            (a.oldest_due_at, a.next_due_at),
            (Some(900.0), Some(2000.0))
        );
        let b = &depth[1];
        assert_eq!((b.queued, b.due, b.delayed, b.leased), (2, 0, 1, 1));
        assert_eq!((b.oldest_due_at, b.next_due_at), (None, Some(1500.0)));
        assert_eq!(depth[2].oldest_due_at, Some(970.0));
    }

    #[test]
    fn oldest_due_walks_every_priority_and_skips_leases_and_delays() {
        let (_dir, queue) = queue();
        let now = 1000.0;
        assert_eq!(queue.oldest_due(now).unwrap(), None);
        insert(&queue, "later", 100.0, 5000.0, 100);
        insert(&queue, "high", 950.0, 950.0, 50);
        let low = insert(&queue, "low", 900.0, 900.0, -100);
        let leased = insert(&queue, "leased", 100.0, 100.0, 0);
        queue
            .conn
            .execute(
                "UPDATE foreman_task SET leased_at = 90 WHERE id = ?1",
                [leased],
            )
            .unwrap();
        let oldest = queue.oldest_due(now).unwrap().unwrap();
        assert_eq!(
            (oldest.task_id, oldest.priority, oldest.due_since),
            (low, -100, 900.0)
        );
    }

    #[test]
    fn first_waiting_skips_what_the_caller_rules_out_and_recent_rows() {
        let (_dir, queue) = queue();
        insert(&queue, "pool", 100.0, 100.0, 0);
        insert(&queue, "pool", 110.0, 110.0, 0);
        let plain = insert(&queue, "plain", 120.0, 120.0, 0);
        insert(&queue, "high", 500.0, 500.0, 9);
        // Due long ago by run_after, but only inserted now: it has not waited yet.
        insert(&queue, "fresh", 990.0, 50.0, 3);
        let not_pool = |row: &DueRow| row.task_name != "pool";
        let found = queue.first_waiting(400.0, 64, not_pool).unwrap().unwrap();
        assert_eq!((found.task_id, found.task_name.as_str()), (plain, "plain"));
        // A lookahead of 2 sees only the pool's rows at priority 0.
        assert_eq!(queue.first_waiting(400.0, 2, not_pool).unwrap(), None);
        let found = queue.first_waiting(600.0, 64, |_| true).unwrap().unwrap();
        assert!((found.due_since - 100.0).abs() < 1e-9, "{found:?}");
        assert_eq!(queue.first_waiting(99.0, 64, |_| true).unwrap(), None);
    }

    #[test]
    fn minute_stats_read_a_range_of_minutes() {
        let (_dir, queue) = queue();
        let mut stat = MinuteStat::default();
        stat.add(true, 0.5, 0.01);
        stat.add(false, 1.5, 0.02);
        for (minute, name) in [(9, "a"), (10, "a"), (10, "b"), (12, "a"), (13, "a")] {
            queue
                .conn
                .execute(
                    "INSERT INTO foreman_stat VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                    params![
                        minute,
                        name,
                        2,
                        1,
                        1,
                        stat.wall_total,
                        stat.wall_max,
                        stat.wait_total,
                        stat.wait_max,
                        stat.wall_hist.to_json(),
                        stat.wait_hist.to_json()
                    ],
                )
                .unwrap();
        }
        let rows = queue.minute_stats(10, 12, None).unwrap();
        let keys: Vec<_> = rows.iter().map(|(m, n, _)| (*m, n.as_str())).collect();
        assert_eq!(keys, [(10, "a"), (10, "b"), (12, "a")]);
        assert_eq!(rows[0].2, stat);
        assert_eq!(queue.minute_stats(0, 99, Some("b")).unwrap().len(), 1);
    }

    #[test]
    fn running_attempts_come_oldest_first() {
        let (_dir, queue) = queue();
        queue
            .conn
            .execute_batch(
                "INSERT INTO foreman_run(task_id, attempt, task_name, state, started_at) VALUES \
                 (1, 1, 'a', 'done', 10), (2, 1, 'b', 'running', 30), (3, 2, 'c', 'running', 20)",
            )
            .unwrap();
        let running = queue.running_attempts().unwrap();
        let ids: Vec<_> = running.iter().map(|r| (r.task_id, r.attempt)).collect();
        assert_eq!(ids, [(3, 2), (2, 1)]);
    }

    /// `health` runs these every few seconds against queues of any depth: each must be an index
    /// search, never a scan of a table or a sort.
    #[test]
    fn the_health_queries_are_index_lookups() {
        let (_dir, queue) = queue();
        for (sql, wanted) in [
            (
                SQL_DUE_BEFORE,
                "SEARCH foreman_task USING INDEX foreman_task_due (priority=? AND run_after<?)",
            ),
            (SQL_RUNNING, "INDEX foreman_run_running"),
            (
                SQL_DAEMON,
                "SEARCH foreman_daemon USING INTEGER PRIMARY KEY (rowid=?)",
            ),
        ] {
            let plan = crate::store::sqlite::tests::query_plan(&queue, sql);
            assert!(plan.contains(wanted), "{sql}: {plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{sql}: {plan}");
            // Walking the partial index of running attempts is fine: it holds nothing else.
            let scans_a_table = plan
                .split(" | ")
                .any(|step| step.starts_with("SCAN") && !step.contains("foreman_run_running"));
            assert!(!scans_a_table, "{sql}: {plan}");
        }
    }
}
