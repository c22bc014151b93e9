//! The daemons' own rows on PostgreSQL: one `foreman_daemon` row per daemon run (its id names one
//! unbroken membership), the heartbeat that also renews the daemon's leases, writes its figures
//! and recovers every stale daemon exactly once (all in one statement), a clean stop, and the
//! maintenance jobs that one daemon at a time runs under a transaction-scoped advisory lock
//! (history and figures pruned, old daemon rows dropped, rows no live daemon serves buried).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use postgres::types::ToSql;

use super::cycle::{clean, int};
use super::{LOCK_KEY, PgStore, big, count};
use crate::error::Result;
use crate::stats::MinuteStat;
use crate::store::types::{Beat, BeatNews, Buried, DaemonInfo, RecoveredDaemon};

/// Crashes during one at-least-once task after which it is buried rather than run again (as on
/// SQLite: the task may be what kills its daemons).
const MAX_LOST_RUNS: i64 = 3;
/// Figures of minutes older than this are forgotten from memory; a late flush of such a minute
/// (after a long outage) reads the row back first.
const STATS_MEMORY: f64 = 3600.0;
/// Rows looked at per pass of the "no handler" sweep.
const SWEEP_BATCH: i64 = 1000;
/// Daemon rows stopped or recovered longer ago than this are deleted (if they hold no lease).
const DAEMON_ROW_RETENTION: f64 = 7.0 * 86_400.0;

/// The advisory lock's second key, per maintenance job.
#[derive(Debug, Clone, Copy)]
#[repr(i32)]
enum Job {
    PruneHistory = 1,
    PruneStats = 2,
    Sweep = 4,
}

/// The daemon's registration: its id, and what it registered with (to register again after
/// another daemon recovered it).
pub struct Registration {
    pub id: i64,
    info: DaemonInfo,
    /// The figures written under this id so far, by (minute, task): each heartbeat writes a
    /// minute's totals (only this daemon writes its rows, so it overwrites; no read-merge-write).
    written: BTreeMap<(i64, String), MinuteStat>,
}

/// The heartbeat (see the module comment). `$1` the daemon's id, `$2`-`$4` its pools, totals and
/// served names, `$5`-`$6` its running leases and their lengths, `$7` unused (kept so the
/// numbering of the figures stays), `$8` `MAX_LOST_RUNS`, `$9`-`$19` the figures to write, `$20`
/// whether the daemon changed something since its last heartbeat. A daemon is stale once its
/// heartbeat is older than the limit it registered with.
///
/// It notifies `foreman_changed` (at its commit) when `$20` says so or it recovered a daemon: at
/// most once per heartbeat, never while the daemon is idle, and in a commit the heartbeat makes
/// anyway, since every `NOTIFY` takes a lock that serialises the commits of the whole cluster.
const SQL_HEARTBEAT: &str = "\
WITH me AS (
    UPDATE foreman_daemon SET heartbeat_at = now(), pools = $2::text::jsonb,
        totals = $3::text::jsonb,
        served = $4::text[]
    WHERE id = $1::int8
    RETURNING recovered_at, recovered_by
), ok AS (
    SELECT NOT EXISTS (SELECT 1 FROM me WHERE recovered_at IS NOT NULL) AS live
), renewed AS (
    UPDATE foreman_task SET run_after = now() + make_interval(secs => l.secs)
    FROM unnest($5::int8[], $6::float8[]) AS l(id, secs)
    WHERE foreman_task.id = l.id AND foreman_task.leased_by = $1::int8 AND (SELECT live FROM ok)
      AND foreman_task.run_after < now() + make_interval(secs => l.secs / 2)
    RETURNING foreman_task.id
), held AS (
    SELECT l.id FROM unnest($5::int8[]) AS l(id)
    WHERE EXISTS (SELECT 1 FROM foreman_task t WHERE t.id = l.id AND t.leased_by = $1::int8)
), stale AS (
    UPDATE foreman_daemon SET recovered_at = now(), recovered_by = $1::int8
    WHERE id <> $1::int8 AND recovered_at IS NULL AND stopped_at IS NULL
      AND heartbeat_at < now() - make_interval(secs => stale_after)
      AND $7::float8 IS NOT NULL AND (SELECT live FROM ok)
    RETURNING id, host, pid
), aborted AS (
    -- An at-least-once task `foreman cancel` asked to abort ends cancelled: not run again.
    DELETE FROM foreman_task t
    WHERE t.leased_by = ANY(ARRAY(SELECT id FROM stale))
      AND EXISTS (SELECT 1 FROM foreman_abort a WHERE a.task_id = t.id AND a.attempt = t.attempt)
), doomed AS (
    DELETE FROM foreman_task t
    WHERE t.leased_by = ANY(ARRAY(SELECT id FROM stale))
      AND NOT EXISTS (SELECT 1 FROM foreman_abort a WHERE a.task_id = t.id AND a.attempt = t.attempt)
      AND (SELECT count(*) FROM foreman_run r WHERE r.task_id = t.id AND r.state = 'lost')
          >= $8::int8 - 1
    RETURNING t.id, t.task_name, t.args, t.kwargs, t.created_at, t.attempt, t.priority, t.origin
), buried AS (
    INSERT INTO foreman_dead (task_id, task_name, args, kwargs, created_at, reason, attempts,
                              priority, origin)
    SELECT id, task_name, args, kwargs, created_at,
           format('its daemon stopped heartbeating while it ran, %s times: not run again (it may be what stops daemons)', $8::int8),
           attempt, priority, origin
    FROM doomed
    RETURNING task_id
), released AS (
    UPDATE foreman_task t
    SET leased_by = NULL, leased_at = NULL, run_after = now(), attempt = t.attempt + 1
    WHERE t.leased_by = ANY(ARRAY(SELECT id FROM stale))
      AND NOT EXISTS (SELECT 1 FROM foreman_abort a WHERE a.task_id = t.id AND a.attempt = t.attempt)
      AND (SELECT count(*) FROM foreman_run r WHERE r.task_id = t.id AND r.state = 'lost')
          < $8::int8 - 1
    RETURNING t.id, t.attempt - 1 AS attempt
), lost AS (
    UPDATE foreman_run r
    SET state = CASE WHEN EXISTS (SELECT 1 FROM foreman_abort a
                                  WHERE a.task_id = r.task_id AND a.attempt = r.attempt)
                     THEN 'cancelled' ELSE 'lost' END,
        finished_at = now(),
        retry_at = CASE WHEN (task_id, attempt) IN (SELECT id, attempt FROM released)
                        THEN now() END,
        error = CASE WHEN EXISTS (SELECT 1 FROM foreman_abort a
                                  WHERE a.task_id = r.task_id AND a.attempt = r.attempt)
                     THEN 'aborted (foreman cancel): its daemon ' || daemon_id || ' stopped while it ran'
                     WHEN (task_id, attempt) IN (SELECT id, attempt FROM released)
                     THEN 'its daemon ' || daemon_id || ' stopped heartbeating while it ran; it runs again (at-least-once)'
                     ELSE 'its daemon ' || daemon_id || ' stopped heartbeating while it ran (a crash, kill -9, or cut off from the database); at-most-once: not run again' END
    WHERE daemon_id = ANY(ARRAY(SELECT id FROM stale)) AND state = 'running'
    RETURNING daemon_id
), stats AS (
    INSERT INTO foreman_stat AS f (minute, task_name, daemon_id, count, done, failed, wall_total,
                                   wall_max, wait_total, wait_max, wall_hist, wait_hist)
    SELECT s.minute, s.task_name, $1::int8, s.count, s.done, s.failed, s.wall_total, s.wall_max,
           s.wait_total, s.wait_max, s.wall_hist, s.wait_hist
    FROM unnest($9::int8[], $10::text[], $11::int8[], $12::int8[], $13::int8[], $14::float8[],
                $15::float8[], $16::float8[], $17::float8[], $18::jsonb[], $19::jsonb[])
         AS s(minute, task_name, count, done, failed, wall_total, wall_max, wait_total, wait_max,
              wall_hist, wait_hist)
    ON CONFLICT (minute, task_name, daemon_id) DO UPDATE
    SET count = excluded.count, done = excluded.done, failed = excluded.failed,
        wall_total = excluded.wall_total, wall_max = excluded.wall_max,
        wait_total = excluded.wait_total, wait_max = excluded.wait_max,
        wall_hist = excluded.wall_hist, wait_hist = excluded.wait_hist
)
SELECT (SELECT count(*) FROM me), (SELECT recovered_by FROM me),
       extract(epoch FROM clock_timestamp())::float8,
       ARRAY(SELECT id FROM held),
       ARRAY(SELECT id FROM stale), ARRAY(SELECT host FROM stale), ARRAY(SELECT pid FROM stale),
       ARRAY(SELECT daemon_id FROM lost),
       (SELECT count(*) FROM released), (SELECT count(*) FROM buried),
       -- The queue's next due time (past: something is due), for the idle tick to skip a look.
       (WITH RECURSIVE priorities(p) AS (
            SELECT (SELECT priority FROM foreman_task ORDER BY priority DESC LIMIT 1)
          UNION ALL
            SELECT (SELECT priority FROM foreman_task WHERE priority < priorities.p
                    ORDER BY priority DESC LIMIT 1)
            FROM priorities WHERE priorities.p IS NOT NULL)
        SELECT extract(epoch FROM min(n.run_after))::float8 FROM priorities
        CROSS JOIN LATERAL (SELECT run_after FROM foreman_task WHERE priority = priorities.p
                            ORDER BY run_after LIMIT 1) AS n),
       -- The newest row: a producer that did not notify shows here within a heartbeat.
       (SELECT max(id) FROM foreman_task),
       -- The dashboards' notification, when there is something to tell (a one-time filter: no
       -- row, no call).
       (SELECT count(*) FROM (SELECT pg_notify('foreman_changed', '')
                              WHERE $20::bool OR EXISTS (SELECT 1 FROM stale)) AS told)";

/// A daemon's registration; the dashboards hear of a daemon that starts (`foreman_changed`).
const SQL_REGISTER: &str = "\
INSERT INTO foreman_daemon (host, pid, pid_start, version, workers, served, stale_after)
VALUES ($1::text, $2::int, $3::int8, $4::text, $5::int, $6::text[], $7::float8)
RETURNING id, extract(epoch FROM clock_timestamp())::float8, pg_notify('foreman_changed', '')";

impl PgStore {
    /// Waits for the server at the daemon's start, saying so, while `keep_waiting` says to: a
    /// daemon started while PostgreSQL is down (or not up yet) waits instead of exiting.
    pub fn wait_for_server(&self, mut keep_waiting: impl FnMut(Duration) -> bool) -> Result<()> {
        let mut said = false;
        let started = Instant::now();
        let mut logged = started;
        loop {
            match self.connected() {
                Ok(()) => {
                    if said {
                        log::info!(
                            "{}: the server answers after {:.1}s",
                            self.target.label.display(),
                            started.elapsed().as_secs_f64()
                        );
                    }
                    return Ok(());
                }
                Err(e) => {
                    if !said {
                        log::warn!(
                            "{e}; waiting for the server (retrying, and logged again every minute; wait_for_db = false exits instead)"
                        );
                        said = true;
                    } else if logged.elapsed() >= Duration::from_mins(1) {
                        log::warn!(
                            "still waiting for the server after {:.0}s: {e}",
                            started.elapsed().as_secs_f64()
                        );
                        logged = Instant::now();
                    }
                    if !keep_waiting(Duration::from_millis(500)) {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Registers this daemon: a new `foreman_daemon` row, whose id its attempts, leases and
    /// figures carry.
    pub fn register_daemon(&mut self, info: &DaemonInfo) -> Result<()> {
        let id = self.insert_registration(info)?;
        self.daemon = Some(Registration {
            id,
            info: info.clone(),
            written: BTreeMap::new(),
        });
        Ok(())
    }

    fn insert_registration(&self, info: &DaemonInfo) -> Result<i64> {
        let sent = Instant::now();
        let pid = i32::try_from(info.pid).unwrap_or(i32::MAX);
        let pid_start = info.pid_start.and_then(|s| i64::try_from(s).ok());
        let workers = i32::try_from(info.workers).unwrap_or(i32::MAX);
        let rows = self.query(
            SQL_REGISTER,
            &[
                &clean(&info.host),
                &pid,
                &pid_start,
                &clean(&info.version),
                &workers,
                &info.served,
                &info.stale_after.as_secs_f64(),
            ],
        )?;
        let row = rows
            .first()
            .ok_or_else(|| self.err("registering the daemon returned nothing"))?;
        self.observe_clock(row.get(1), sent);
        Ok(row.get(0))
    }

    /// The heartbeat, with the daemon's leases renewed, its figures written, and every stale
    /// daemon recovered; see `SQL_HEARTBEAT`. A daemon that others recovered registers again.
    pub fn heartbeat(
        &mut self,
        beat: &Beat<'_>,
        stats: &BTreeMap<(i64, String), MinuteStat>,
    ) -> Result<BeatNews> {
        let me = self.daemon_id()?;
        let rows = self.minute_rows(stats)?;
        let (lease_ids, lease_secs): (Vec<i64>, Vec<f64>) = beat.leases.iter().copied().unzip();
        let staleness = 0.0_f64;
        let announce = self.unannounced();
        let sent = Instant::now();
        let params: [&(dyn ToSql + Sync); 20] = [
            &me,
            &beat.pools_json,
            &beat.totals_json,
            &beat.served,
            &lease_ids,
            &lease_secs,
            &staleness,
            &MAX_LOST_RUNS,
            &rows.minute,
            &rows.task,
            &rows.count,
            &rows.done,
            &rows.failed,
            &rows.wall_total,
            &rows.wall_max,
            &rows.wait_total,
            &rows.wait_max,
            &rows.wall_hist,
            &rows.wait_hist,
            &announce,
        ];
        let row = self
            .query(SQL_HEARTBEAT, &params)?
            .into_iter()
            .next()
            .ok_or_else(|| self.err("the heartbeat returned nothing"))?;
        if announce {
            self.unannounced.set(false);
        }
        self.observe_clock(row.get(2), sent);
        self.looked_at_queue(
            row.get::<_, Option<f64>>(10).unwrap_or(f64::INFINITY),
            row.get::<_, Option<i64>>(11),
        );
        if let Some(daemon) = self.daemon.as_mut() {
            for ((minute, task), stat) in rows.merged {
                daemon.written.insert((minute, task), stat);
            }
            let oldest = crate::stats::minute_of(self.clock.borrow().now() - STATS_MEMORY);
            daemon.written.retain(|(minute, _), _| *minute >= oldest);
        }
        let found: i64 = row.get(0);
        let recovered_by: Option<i64> = row.get(1);
        let held: Vec<i64> = row.get(3);
        let ids: Vec<i64> = row.get(4);
        let hosts: Vec<String> = row.get(5);
        let pids: Vec<i32> = row.get(6);
        let lost_of: Vec<Option<i64>> = row.get(7);
        let released: i64 = row.get(8);
        let buried: i64 = row.get(9);
        let mut news = BeatNews {
            recovered_by: None,
            recovered: ids
                .iter()
                .zip(hosts)
                .zip(pids)
                .map(|((&id, host), pid)| RecoveredDaemon {
                    id,
                    host,
                    pid: i64::from(pid),
                    lost: lost_of.iter().filter(|d| **d == Some(id)).count(),
                    released: 0,
                })
                .collect(),
            leases_lost: lease_ids
                .iter()
                .copied()
                .filter(|id| !held.contains(id))
                .collect(),
        };
        if let Some(first) = news.recovered.first_mut() {
            first.released = count(released);
        }
        if buried > 0 {
            log::error!(
                "{buried} at-least-once task(s) moved to foreman_dead: their daemons stopped heartbeating while they ran, {MAX_LOST_RUNS} times"
            );
        }
        if found == 0 || recovered_by.is_some() {
            news.recovered_by = Some(recovered_by.unwrap_or(0));
            self.register_again(me)?;
        }
        Ok(news)
    }

    /// After another daemon recovered this one: a new registration, to which this daemon's
    /// attempts still running and any lease it took since move, so that its next recovery, if
    /// any, covers them.
    fn register_again(&mut self, old: i64) -> Result<()> {
        let Some(daemon) = self.daemon.as_ref() else {
            return Ok(());
        };
        let info = daemon.info.clone();
        let id = self.insert_registration(&info)?;
        self.with(|c| {
            c.execute(
                "WITH runs AS (UPDATE foreman_run SET daemon_id = $2::int8
                               WHERE daemon_id = $1::int8 AND state = 'running')
                 UPDATE foreman_task SET leased_by = $2::int8 WHERE leased_by = $1::int8",
                &[&old, &id],
            )
        })?;
        self.daemon = Some(Registration {
            id,
            info,
            written: BTreeMap::new(),
        });
        Ok(())
    }

    /// The minutes' totals to write: what this daemon wrote before for each (minute, task), plus
    /// what came since. A minute it forgot (older than `STATS_MEMORY`) is read back first.
    fn minute_rows(&self, stats: &BTreeMap<(i64, String), MinuteStat>) -> Result<MinuteRows> {
        let mut rows = MinuteRows::default();
        let me = self.daemon_id()?;
        for ((minute, task), stat) in stats {
            let mut total = match self
                .daemon
                .as_ref()
                .and_then(|d| d.written.get(&(*minute, task.clone())))
            {
                Some(written) => written.clone(),
                None => self.read_minute(me, *minute, task)?,
            };
            total.merge(stat);
            let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            rows.minute.push(*minute);
            rows.task.push(clean(task));
            rows.count.push(int(total.count));
            rows.done.push(int(total.done));
            rows.failed.push(int(total.failed));
            rows.wall_total.push(total.wall_total);
            rows.wall_max.push(total.wall_max);
            rows.wait_total.push(total.wait_total);
            rows.wait_max.push(total.wait_max);
            rows.wall_hist.push(json(&total.wall_hist.to_json()));
            rows.wait_hist.push(json(&total.wait_hist.to_json()));
            rows.merged.push(((*minute, task.clone()), total));
        }
        Ok(rows)
    }

    /// One minute's row of this daemon's figures, if the heartbeat wrote it before.
    fn read_minute(&self, me: i64, minute: i64, task: &str) -> Result<MinuteStat> {
        let rows = self.with(|c| {
            c.query(
                "SELECT count, done, failed, wall_total, wall_max, wait_total, wait_max, \
                 wall_hist::text, wait_hist::text FROM foreman_stat \
                 WHERE minute = $1 AND task_name = $2 AND daemon_id = $3",
                &[&minute, &task, &me],
            )
        })?;
        Ok(rows
            .first()
            .map_or_else(MinuteStat::default, super::report::minute_stat))
    }

    /// Stamps the start of a shutdown on this daemon's row, and tells the dashboards.
    pub fn daemon_stopping(&mut self) -> Result<()> {
        let me = self.daemon_id()?;
        self.with(|c| {
            c.execute(
                "UPDATE foreman_daemon SET stopping_at = now() WHERE id = $1
                 RETURNING pg_notify('foreman_changed', '')",
                &[&me],
            )
        })
        .map(drop)
    }

    /// Stamps a clean exit on this daemon's row, and tells the dashboards. Whatever it still had running (handlers
    /// abandoned at the graceful deadline) is recorded lost now, and its leases released, since
    /// no other daemon recovers a daemon that stopped.
    pub fn daemon_stopped(&mut self) -> Result<()> {
        let me = self.daemon_id()?;
        self.with(|c| {
            c.execute(
                "WITH released AS (
                    UPDATE foreman_task SET leased_by = NULL, leased_at = NULL, run_after = now(),
                        attempt = attempt + 1
                    WHERE leased_by = $1
                    RETURNING id, attempt - 1 AS attempt
                 ), lost AS (
                    UPDATE foreman_run SET state = 'lost', finished_at = now(),
                        retry_at = CASE WHEN (task_id, attempt) IN (SELECT id, attempt FROM released)
                                        THEN now() END,
                        error = 'the daemon stopped before it finished (graceful timeout)'
                    WHERE daemon_id = $1 AND state = 'running'
                 )
                 UPDATE foreman_daemon SET stopped_at = now(), heartbeat_at = now() WHERE id = $1
                 RETURNING pg_notify('foreman_changed', '')",
                &[&me],
            )
        })
        .map(drop)
    }

    /// Runs `sql` (whose first parameter is the job) only if this daemon gets the job's advisory
    /// lock: maintenance runs on one daemon at a time. `None`: another daemon has it.
    fn locked<T>(
        &self,
        job: Job,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        read: impl FnOnce(&postgres::Row) -> T,
    ) -> Result<Option<T>> {
        let job = job as i32;
        let mut all: Vec<&(dyn ToSql + Sync)> = vec![&job];
        all.extend_from_slice(params);
        let text = format!(
            "WITH lock AS MATERIALIZED (SELECT pg_try_advisory_xact_lock({LOCK_KEY}, $1::int) AS got) {sql}"
        );
        let rows = self.with(|c| c.query(text.as_str(), &all))?;
        Ok(rows
            .first()
            .and_then(|row| row.get::<_, bool>(0).then(|| read(row))))
    }

    /// Deletes, among the next `batch` history rows after `after`, those that finished before
    /// `before` (the database's clock); one daemon at a time.
    pub fn prune_history(
        &mut self,
        before: f64,
        after: Option<(i64, i64)>,
        batch: usize,
    ) -> Result<(usize, Option<(i64, i64)>)> {
        let (from_id, from_attempt) = after.unwrap_or((i64::MIN, i64::MIN));
        let from_attempt = int(from_attempt);
        let offset = big(batch.saturating_sub(1));
        let done = self.locked(
            Job::PruneHistory,
            ", last AS (
                SELECT task_id, attempt FROM foreman_run
                WHERE (SELECT got FROM lock) AND (task_id, attempt) > ($2::int8, $3::int)
                ORDER BY task_id, attempt LIMIT 1 OFFSET $4::int8
             ), bounds AS (
                SELECT coalesce((SELECT task_id FROM last), 9223372036854775807) AS id,
                       coalesce((SELECT attempt FROM last), 2147483647) AS attempt
             ), aborts AS (
                -- Once a pass: abort requests whose attempt ended before a daemon acted on them.
                DELETE FROM foreman_abort a
                WHERE (SELECT got FROM lock) AND $6::bool AND NOT EXISTS (
                    SELECT 1 FROM foreman_run r WHERE r.task_id = a.task_id
                    AND r.attempt = a.attempt AND r.state = 'running')
             ), deleted AS (
                DELETE FROM foreman_run r USING bounds b
                WHERE (SELECT got FROM lock) AND (r.task_id, r.attempt) > ($2::int8, $3::int)
                  AND (r.task_id, r.attempt) <= (b.id, b.attempt)
                  AND r.finished_at < to_timestamp($5::float8)
                RETURNING 1
             )
             SELECT (SELECT got FROM lock), (SELECT task_id FROM last),
                    (SELECT attempt FROM last)::int8, (SELECT count(*) FROM deleted)",
            &[&from_id, &from_attempt, &offset, &before, &after.is_none()],
            |row| {
                let last = match (row.get::<_, Option<i64>>(1), row.get::<_, Option<i64>>(2)) {
                    (Some(id), Some(attempt)) => Some((id, attempt)),
                    _ => None,
                };
                (count(row.get(3)), last)
            },
        )?;
        Ok(done.unwrap_or((0, None)))
    }

    /// Deletes the figures of minutes before `minute`, and daemon rows stopped or recovered long
    /// ago that hold no lease; one daemon at a time.
    pub fn prune_stats(&mut self, minute: i64) -> Result<usize> {
        let retention = DAEMON_ROW_RETENTION;
        let done = self.locked(
            Job::PruneStats,
            ", stats AS (
                DELETE FROM foreman_stat WHERE (SELECT got FROM lock) AND minute < $2::int8
                RETURNING 1
             ), daemons AS (
                DELETE FROM foreman_daemon d
                WHERE (SELECT got FROM lock)
                  AND coalesce(d.stopped_at, d.recovered_at) < now() - make_interval(secs => $3::float8)
                  AND NOT EXISTS (SELECT 1 FROM foreman_task t WHERE t.leased_by = d.id)
             )
             SELECT (SELECT got FROM lock), (SELECT count(*) FROM stats)",
            &[&minute, &retention],
            |row| count(row.get(1)),
        )?;
        Ok(done.unwrap_or(0))
    }

    /// Buries, among the next rows of `foreman_task` after id `after`, those due for longer than
    /// `grace` whose name no daemon seen alive during `grace` serves; only once this daemon has
    /// run that long itself, and one daemon at a time. Returns them, and where to go on from.
    pub fn bury_unserved(
        &mut self,
        grace: Duration,
        after: Option<i64>,
    ) -> Result<(Vec<Buried>, Option<i64>)> {
        let me = self.daemon_id()?;
        let grace = grace.as_secs_f64();
        let from = after.unwrap_or(0);
        let done = self.locked(
            Job::Sweep,
            ", served AS (
                SELECT DISTINCT unnest(served) AS name FROM foreman_daemon
                WHERE heartbeat_at > now() - make_interval(secs => $3::float8)
             ), walk AS (
                SELECT id FROM foreman_task WHERE (SELECT got FROM lock) AND id > $4::int8
                ORDER BY id LIMIT $5::int8
             ), doomed AS (
                DELETE FROM foreman_task
                WHERE id = ANY(ARRAY(SELECT id FROM walk))
                  AND leased_by IS NULL AND run_after < now() - make_interval(secs => $3::float8)
                  AND task_name <> ALL(ARRAY(SELECT name FROM served))
                  AND (SELECT started_at FROM foreman_daemon WHERE id = $2::int8)
                      < now() - make_interval(secs => $3::float8)
                RETURNING id, task_name, args, kwargs, created_at, attempt, priority, origin
             ), buried AS (
                INSERT INTO foreman_dead (task_id, task_name, args, kwargs, created_at, reason,
                                          attempts, priority, origin)
                SELECT id, task_name, args, kwargs, created_at,
                       format('no daemon seen in the last %s serves task name %s', $6::text, task_name),
                       attempt - 1, priority, origin
                FROM doomed
                RETURNING task_id, task_name, reason
             )
             SELECT (SELECT got FROM lock), (SELECT max(id) FROM walk),
                    ARRAY(SELECT task_id FROM buried), ARRAY(SELECT task_name FROM buried),
                    ARRAY(SELECT reason FROM buried)",
            &[
                &me,
                &grace,
                &from,
                &SWEEP_BATCH,
                &crate::duration::format_duration(Duration::from_secs_f64(grace)),
            ],
            |row| {
                let next: Option<i64> = row.get(1);
                let ids: Vec<i64> = row.get(2);
                let names: Vec<String> = row.get(3);
                let reasons: Vec<String> = row.get(4);
                let buried = ids
                    .into_iter()
                    .zip(names)
                    .zip(reasons)
                    .map(|((task_id, name), reason)| Buried {
                        task_id,
                        task_name: Some(name),
                        reason,
                    })
                    .collect();
                (buried, next)
            },
        )?;
        let done = done.unwrap_or((Vec::new(), None));
        if !done.0.is_empty() {
            self.changed_something();
        }
        Ok(done)
    }
}

/// The figures to write, one array per column.
#[derive(Default)]
struct MinuteRows {
    minute: Vec<i64>,
    task: Vec<String>,
    count: Vec<i64>,
    done: Vec<i64>,
    failed: Vec<i64>,
    wall_total: Vec<f64>,
    wall_max: Vec<f64>,
    wait_total: Vec<f64>,
    wait_max: Vec<f64>,
    wall_hist: Vec<serde_json::Value>,
    wait_hist: Vec<serde_json::Value>,
    merged: Vec<((i64, String), MinuteStat)>,
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|_| serde_json::json!({}))
}

#[cfg(test)]
mod tests {
    use super::super::listen::CHANGED_CHANNEL;
    use super::*;

    #[test]
    fn the_daemons_statements_notify_the_documented_channel() {
        let notify = format!("pg_notify('{CHANGED_CHANNEL}', '')");
        for sql in [SQL_HEARTBEAT, SQL_REGISTER] {
            assert!(sql.contains(&notify), "{sql}");
        }
    }
}
