//! The daemon's own rows: its heartbeat in `foreman_daemon` and its per-minute figures in
//! `foreman_stat`. Only the daemon writes them, from its loop.

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, params};

use super::SqliteStore;
use crate::error::Result;
use crate::stats::{Histogram, MinuteStat};
use crate::store::types::{Beat, DaemonInfo};

impl SqliteStore {
    /// Makes `info` the daemon of this DB: replaces the row a predecessor left.
    pub fn register_daemon(&mut self, info: &DaemonInfo) -> Result<()> {
        self.write(|tx| {
            // Who ran an attempt is the last daemon to start before it: one runs at a time here,
            // and the log costs a row per start, where a column would cost one per task.
            tx.execute(
                "INSERT OR REPLACE INTO foreman_daemon_log(started_at, pid, host) VALUES (?1, ?2, ?3)",
                params![info.started_at, info.pid, info.host],
            )?;
            tx.execute(
                "INSERT OR REPLACE INTO foreman_daemon(id, pid, pid_start, host, version, started_at, heartbeat_at, stopped_at, workers) \
                 VALUES (1, ?1, ?2, ?3, ?4, ?5, ?5, NULL, ?6)",
                params![
                    info.pid,
                    info.pid_start.and_then(|s| i64::try_from(s).ok()),
                    info.host,
                    info.version,
                    info.started_at,
                    i64::try_from(info.workers).unwrap_or(i64::MAX),
                ],
            )
            .map(drop)
        })
    }

    /// Writes the heartbeat and adds `stats` to `foreman_stat`, in one transaction.
    pub fn heartbeat(
        &mut self,
        now: f64,
        beat: &Beat<'_>,
        stats: &BTreeMap<(i64, String), MinuteStat>,
    ) -> Result<()> {
        let pid = std::process::id();
        self.write(|tx| {
            tx.prepare_cached(
                "UPDATE foreman_daemon SET heartbeat_at = ?1, pools = ?2, totals = ?3, workers = ?5 WHERE id = 1 AND pid = ?4",
            )?
            .execute(params![
                now,
                beat.pools_json,
                beat.totals_json,
                pid,
                i64::try_from(beat.workers).unwrap_or(i64::MAX)
            ])?;
            for ((minute, name), stat) in stats {
                add_stat(tx, *minute, name, stat)?;
            }
            Ok(())
        })
    }

    /// Stamps the start of a shutdown on this daemon's row: it pops no more, and waits for its
    /// running tasks.
    pub fn daemon_stopping(&mut self, now: f64) -> Result<()> {
        let pid = std::process::id();
        self.write(|tx| {
            tx.prepare_cached(
                "UPDATE foreman_daemon SET stopping_at = ?1 WHERE id = 1 AND pid = ?2",
            )?
            .execute(params![now, pid])
            .map(drop)
        })
    }

    /// Stamps a clean exit on this daemon's row.
    pub fn daemon_stopped(&mut self, now: f64) -> Result<()> {
        let pid = std::process::id();
        self.write(|tx| {
            tx.execute(
                "UPDATE foreman_daemon SET stopped_at = ?1, heartbeat_at = ?1 WHERE id = 1 AND pid = ?2",
                params![now, pid],
            )
            .map(drop)
        })
    }

    /// Deletes the per-minute figures of minutes before `minute`; returns how many rows went.
    pub fn prune_stats(&mut self, minute: i64) -> Result<usize> {
        self.write(|tx| {
            // The daemons of that time too, but the last one, which may run attempts still kept.
            tx.prepare_cached(
                "DELETE FROM foreman_daemon_log WHERE started_at < ?1 * 60.0 \
                 AND started_at < (SELECT max(started_at) FROM foreman_daemon_log)",
            )?
            .execute([minute])?;
            tx.prepare_cached("DELETE FROM foreman_stat WHERE minute < ?1")?
                .execute([minute])
        })
    }
}

/// Adds one minute's figures to what the row has (a restart within the minute, or an earlier flush).
fn add_stat(
    tx: &rusqlite::Connection,
    minute: i64,
    name: &str,
    stat: &MinuteStat,
) -> rusqlite::Result<()> {
    let mut row = tx
        .prepare_cached(
            "SELECT count, done, failed, wall_total, wall_max, wait_total, wait_max, wall_hist, wait_hist \
             FROM foreman_stat WHERE minute = ?1 AND task_name = ?2",
        )?
        .query_row(params![minute, name], |r| {
            Ok(MinuteStat {
                count: r.get::<_, i64>(0)?.try_into().unwrap_or(0),
                done: r.get::<_, i64>(1)?.try_into().unwrap_or(0),
                failed: r.get::<_, i64>(2)?.try_into().unwrap_or(0),
                wall_total: r.get(3)?,
                wall_max: r.get(4)?,
                wait_total: r.get(5)?,
                wait_max: r.get(6)?,
                wall_hist: Histogram::from_json(&r.get::<_, String>(7)?),
                wait_hist: Histogram::from_json(&r.get::<_, String>(8)?),
            })
        })
        .optional()?
        .unwrap_or_default();
    row.merge(stat);
    let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    tx.prepare_cached(
        "INSERT OR REPLACE INTO foreman_stat(minute, task_name, count, done, failed, wall_total, wall_max, wait_total, wait_max, wall_hist, wait_hist) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        minute,
        name,
        int(row.count),
        int(row.done),
        int(row.failed),
        row.wall_total,
        row.wall_max,
        row.wait_total,
        row.wait_max,
        row.wall_hist.to_json(),
        row.wait_hist.to_json(),
    ])
    .map(drop)
}
