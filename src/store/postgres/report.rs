//! The operator's reads on PostgreSQL behind `status`, `stats`, `health` and `metrics`: the
//! daemons' rows (every live one, and those that ended lately), the running set of all of them,
//! the queue's depth and its oldest due rows, dead letters, and the figures, added up over the
//! daemons. It never writes and does not judge. `health`'s reads are index lookups.

use std::collections::BTreeMap;

use super::{PgStore, big, opt_secs};
use crate::error::Result;
use crate::stats::{Histogram, MinuteStat};
use crate::store::types::{
    DaemonRow, DueRow, RunningAttempt, TaskDepth, parse_pools, parse_totals,
};

/// Daemon rows that ended (stopped, recovered) are shown this long after.
const ENDED_SHOWN_SECONDS: f64 = 3600.0;

impl PgStore {
    /// Every daemon that has not stopped or been recovered, and those that did in the last hour,
    /// newest first.
    pub fn daemon_rows(&self) -> Result<Vec<DaemonRow>> {
        let rows = self.with(|c| {
            c.query(
                "SELECT id, pid::int8, pid_start, host, version, \
                 extract(epoch FROM started_at)::float8, extract(epoch FROM heartbeat_at)::float8, \
                 extract(epoch FROM stopping_at)::float8, extract(epoch FROM stopped_at)::float8, \
                 workers::int8, pools::text, totals::text, served, \
                 extract(epoch FROM recovered_at)::float8, recovered_by \
                 FROM foreman_daemon \
                 WHERE (stopped_at IS NULL AND recovered_at IS NULL) \
                    OR coalesce(stopped_at, recovered_at) > now() - make_interval(secs => $1) \
                 ORDER BY started_at DESC, id DESC",
                &[&ENDED_SHOWN_SECONDS],
            )
        })?;
        Ok(rows
            .iter()
            .map(|r| DaemonRow {
                id: r.get(0),
                pid: r.get(1),
                pid_start: r.get(2),
                host: r.get(3),
                version: r.get(4),
                started_at: r.get(5),
                heartbeat_at: r.get(6),
                stopping_at: r.get(7),
                stopped_at: r.get(8),
                workers: r.get(9),
                pools: parse_pools(&r.get::<_, String>(10)),
                totals: parse_totals(&r.get::<_, String>(11)),
                served: r.get(12),
                recovered_at: r.get(13),
                recovered_by: r.get(14),
            })
            .collect())
    }

    /// The attempts recorded running, on every daemon, oldest first (the partial index of
    /// running attempts, which holds nothing else).
    pub fn running_attempts(&self) -> Result<Vec<RunningAttempt>> {
        let rows = self.with(|c| {
            c.query(
                "SELECT daemon_id, task_id, attempt::int8, task_name, \
                 extract(epoch FROM started_at)::float8, extract(epoch FROM enqueued_at)::float8 \
                 FROM foreman_run WHERE state = 'running'",
                &[],
            )
        })?;
        let mut running: Vec<RunningAttempt> = rows
            .iter()
            .map(|r| RunningAttempt {
                daemon_id: r.get(0),
                task_id: r.get(1),
                attempt: r.get(2),
                task_name: r.get(3),
                started_at: opt_secs(r, 4),
                enqueued_at: opt_secs(r, 5),
            })
            .collect();
        running.sort_by(|a, b| {
            a.started_at
                .unwrap_or(f64::INFINITY)
                .total_cmp(&b.started_at.unwrap_or(f64::INFINITY))
                .then(a.task_id.cmp(&b.task_id))
        });
        Ok(running)
    }

    /// The queued rows per task name, as of the database's clock: one scan, for `status` and
    /// `metrics`, never `health`.
    pub fn queue_depth(&self) -> Result<Vec<TaskDepth>> {
        let rows = self.with(|c| {
            c.query(
                "SELECT task_name, count(*), \
                 count(*) FILTER (WHERE leased_by IS NULL AND run_after <= now()), \
                 count(*) FILTER (WHERE leased_by IS NULL AND run_after > now()), \
                 count(*) FILTER (WHERE leased_by IS NOT NULL), \
                 extract(epoch FROM min(greatest(run_after, created_at)) \
                     FILTER (WHERE leased_by IS NULL AND run_after <= now()))::float8, \
                 extract(epoch FROM min(run_after) \
                     FILTER (WHERE leased_by IS NULL AND run_after > now()))::float8 \
                 FROM foreman_task GROUP BY task_name ORDER BY task_name",
                &[],
            )
        })?;
        Ok(rows
            .iter()
            .map(|r| TaskDepth {
                task_name: r.get(0),
                queued: r.get(1),
                due: r.get(2),
                delayed: r.get(3),
                leased: r.get(4),
                paused: 0,
                oldest_due_at: opt_secs(r, 5),
                next_due_at: opt_secs(r, 6),
            })
            .collect())
    }

    /// The due, unleased row that became due first, across priorities: one index lookup per
    /// priority in use.
    pub fn oldest_due(&self, before: f64) -> Result<Option<DueRow>> {
        let mut oldest: Option<DueRow> = None;
        for row in self.due_rows(before, 1)? {
            if oldest.as_ref().is_none_or(|o| row.due_since < o.due_since) {
                oldest = Some(row);
            }
        }
        Ok(oldest)
    }

    /// The longest-waiting row due since `before` or earlier that `waits_for_us` says a daemon
    /// should have started, looking at no more than `lookahead` rows per priority.
    pub fn first_waiting(
        &self,
        before: f64,
        lookahead: usize,
        mut waits_for_us: impl FnMut(&DueRow) -> bool,
    ) -> Result<Option<DueRow>> {
        let mut found: Option<DueRow> = None;
        let mut done_with = None;
        for row in self.due_rows(before, lookahead)? {
            if done_with == Some(row.priority) || row.due_since > before || !waits_for_us(&row) {
                continue;
            }
            done_with = Some(row.priority);
            if found.as_ref().is_none_or(|f| row.due_since < f.due_since) {
                found = Some(row);
            }
        }
        Ok(found)
    }

    /// For each priority in use, from the highest down, its first `limit` unleased rows due at
    /// `before`, in claim order: the claim's own walk of the due index, read-only.
    fn due_rows(&self, before: f64, limit: usize) -> Result<Vec<DueRow>> {
        let limit = big(limit);
        let rows = self.with(|c| {
            c.query(
                "WITH RECURSIVE priorities(p) AS ( \
                    SELECT (SELECT priority FROM foreman_task ORDER BY priority DESC LIMIT 1) \
                  UNION ALL \
                    SELECT (SELECT priority FROM foreman_task WHERE priority < priorities.p \
                            ORDER BY priority DESC LIMIT 1) \
                    FROM priorities WHERE priorities.p IS NOT NULL) \
                 SELECT t.id, t.task_name, priorities.p::int8, \
                        extract(epoch FROM greatest(t.run_after, t.created_at))::float8 \
                 FROM priorities CROSS JOIN LATERAL ( \
                    SELECT id, task_name, run_after, created_at FROM foreman_task \
                    WHERE priority = priorities.p AND run_after <= to_timestamp($1) \
                      AND leased_by IS NULL \
                    ORDER BY run_after, id LIMIT $2) AS t",
                &[&before, &limit],
            )
        })?;
        Ok(rows
            .iter()
            .map(|r| DueRow {
                task_id: r.get(0),
                task_name: r.get(1),
                priority: r.get(2),
                due_since: opt_secs(r, 3).unwrap_or(before),
            })
            .collect())
    }

    /// Rows in `foreman_dead`.
    pub fn dead_count(&self) -> Result<i64> {
        let rows = self.with(|c| c.query("SELECT count(*) FROM foreman_dead", &[]))?;
        Ok(rows.first().map_or(0, |r| r.get(0)))
    }

    /// The figures of minutes `from..=to` (of `task` only, if given), by minute and task, the
    /// daemons' rows added up.
    pub fn minute_stats(
        &self,
        from: i64,
        to: i64,
        task: Option<&str>,
    ) -> Result<Vec<(i64, String, MinuteStat)>> {
        let rows = self.with(|c| {
            c.query(
                "SELECT minute, task_name, count, done, failed, wall_total, wall_max, \
                 wait_total, wait_max, wall_hist::text, wait_hist::text FROM foreman_stat \
                 WHERE minute >= $1 AND minute <= $2 AND ($3::text IS NULL OR task_name = $3) \
                 ORDER BY minute, task_name",
                &[&from, &to, &task],
            )
        })?;
        let mut merged: BTreeMap<(i64, String), MinuteStat> = BTreeMap::new();
        for row in &rows {
            let key = (row.get::<_, i64>(0), row.get::<_, String>(1));
            let stat = minute_stat_at(row, 2);
            merged.entry(key).or_default().merge(&stat);
        }
        Ok(merged
            .into_iter()
            .map(|((minute, name), stat)| (minute, name, stat))
            .collect())
    }
}

/// A `foreman_stat` row's figures, from its `count` column on.
pub(super) fn minute_stat(row: &postgres::Row) -> MinuteStat {
    minute_stat_at(row, 0)
}

fn minute_stat_at(row: &postgres::Row, at: usize) -> MinuteStat {
    let n = |i: usize| u64::try_from(row.get::<_, i64>(at + i)).unwrap_or(0);
    MinuteStat {
        count: n(0),
        done: n(1),
        failed: n(2),
        wall_total: row.get(at + 3),
        wall_max: row.get(at + 4),
        wait_total: row.get(at + 5),
        wait_max: row.get(at + 6),
        wall_hist: Histogram::from_json(&row.get::<_, String>(at + 7)),
        wait_hist: Histogram::from_json(&row.get::<_, String>(at + 8)),
    }
}
