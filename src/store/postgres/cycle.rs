//! The loop's claim on PostgreSQL: one prepared statement per group of names that share a
//! capacity, sent with autocommit, that records the attempts that ended, claims up to the
//! group's limit of due rows of its names (`FOR UPDATE SKIP LOCKED`, in index order, after the
//! daemon's cursor), deletes them (at-most-once) or leases them to this daemon (at-least-once),
//! and records their running attempts: one round trip and one commit per cycle on the hot path.
//! Endings that touch `foreman_task` or `foreman_dead` (a retry, a burial, a finished lease) go
//! in one transaction with the first claim. Statements, plans and measurements:
//! docs/design/postgres-store.md.

use std::time::{Duration, Instant};

use postgres::types::ToSql;
use serde_json::Value as Json;

use super::{PgStore, big, opt_secs};
use crate::error::{Error, Result};
use crate::store::row::{TypedRow, decode_typed};
use crate::store::types::{
    Buried, Claim, ClaimGroup, Ending, Next, Popped, Resolved, RunState, truncate_error,
};
use crate::task::Task;

/// How often a daemon drops its cursors and walks each priority from the head of the due index
/// again: a row can land behind a cursor (a producer's transaction that began before the last
/// claim and committed after it, a row another claimer locked and then left). The same bound
/// as the SQLite loop's fallback tick.
const CURSOR_LIFETIME: Duration = Duration::from_secs(1);

/// The claim (see the module comment). `$1` the daemon's id; `$2`, `$3` the names it may claim
/// and their leases in seconds (0: at-most-once); `$4` how many rows at most; `$5`–`$7` its
/// cursor (per priority, the `run_after` and id of the last row it claimed); `$8`–`$16` the
/// attempts that ended, one array element each. A row with a unique key is claimed only under
/// its key's advisory lock (tried, never waited for), which a producer of that key takes too:
/// the move from queued to running never crosses a producer's check (schema-postgres.sql).
pub(super) const SQL_CYCLE: &str = "\
WITH RECURSIVE priorities(p) AS (
    SELECT (SELECT priority FROM foreman_task ORDER BY priority DESC LIMIT 1)
  UNION ALL
    SELECT (SELECT priority FROM foreman_task WHERE priority < priorities.p
            ORDER BY priority DESC LIMIT 1)
    FROM priorities WHERE priorities.p IS NOT NULL
), claimed AS MATERIALIZED (
    SELECT t.ctid, t.id, t.task_name, t.leased_by, t.attempt, t.run_after,
           coalesce((SELECT l.secs FROM unnest($2::text[], $3::float8[]) AS l(name, secs)
                     WHERE l.name = t.task_name LIMIT 1), 0) AS lease
    FROM priorities
    CROSS JOIN LATERAL (
        SELECT coalesce(max(to_timestamp(c.run_after)), '-infinity') AS run_after,
               coalesce(max(c.id), 0) AS id
        FROM unnest($5::int[], $6::float8[], $7::int8[]) AS c(p, run_after, id)
        WHERE c.p = priorities.p) AS after
    CROSS JOIN LATERAL (
        SELECT ctid, id, task_name, leased_by, attempt, run_after FROM foreman_task
        WHERE priority = priorities.p AND run_after <= now()
          AND (run_after, id) > (after.run_after, after.id)
          AND task_name = ANY($2::text[])
          AND leased_by IS DISTINCT FROM $1::int8
          AND (unique_key IS NULL
               OR pg_try_advisory_xact_lock(hashtextextended('foreman:' || unique_key, 0)))
        ORDER BY run_after, id
        LIMIT $4::int8
        FOR UPDATE SKIP LOCKED) AS t
    LIMIT $4::int8
), expired AS (
    INSERT INTO foreman_run AS r (task_id, attempt, task_name, state, daemon_id, finished_at,
                                  retry_at, error)
    SELECT id, attempt, task_name, 'lost', leased_by, now(), now(),
           'its lease expired before it finished; it runs again (at-least-once)'
    FROM claimed WHERE leased_by IS NOT NULL
    ON CONFLICT (task_id, attempt) DO UPDATE
    SET state = excluded.state, finished_at = excluded.finished_at,
        retry_at = excluded.retry_at, error = excluded.error
    WHERE r.state = 'running'
), ended AS (
    INSERT INTO foreman_run AS r (task_id, attempt, task_name, state, daemon_id, finished_at,
                                  error, retry_at, result, exit_code)
    SELECT e.task_id, e.attempt, e.task_name, e.state, $1::int8,
           now() - make_interval(secs => e.finished_ago), e.error,
           now() + make_interval(secs => e.retry_in), e.result, e.exit_code
    FROM unnest($8::int8[], $9::int[], $10::text[], $11::text[], $12::float8[], $13::text[],
                $14::float8[], $15::text[], $16::int[])
         AS e(task_id, attempt, task_name, state, finished_ago, error, retry_in, result, exit_code)
    ON CONFLICT (task_id, attempt) DO UPDATE
    SET state = excluded.state, finished_at = excluded.finished_at, error = excluded.error,
        retry_at = excluded.retry_at, result = excluded.result, exit_code = excluded.exit_code
), gone AS (
    DELETE FROM foreman_task WHERE ctid = ANY(ARRAY(SELECT ctid FROM claimed WHERE lease <= 0))
    RETURNING id, task_name, args, kwargs, created_at, priority,
              attempt + (leased_by IS NOT NULL)::int AS attempt, origin, unique_key
), leased AS (
    UPDATE foreman_task
    SET leased_by = $1::int8, leased_at = now(),
        run_after = now() + make_interval(secs => (SELECT c.lease FROM claimed c
                                                    WHERE c.id = foreman_task.id)),
        attempt = attempt + (leased_by IS NOT NULL)::int
    WHERE ctid = ANY(ARRAY(SELECT ctid FROM claimed WHERE lease > 0))
    RETURNING id, task_name, args, kwargs, created_at, priority, attempt, origin, unique_key
), taken AS (
    SELECT * FROM gone UNION ALL SELECT * FROM leased
), started AS (
    INSERT INTO foreman_run AS r (task_id, attempt, task_name, state, daemon_id, enqueued_at,
                                  started_at, args, kwargs, priority, origin, unique_key)
    SELECT id, attempt, task_name, 'running', $1::int8, created_at, now(), args, kwargs, priority,
           origin, unique_key
    FROM taken
    ON CONFLICT (task_id, attempt) DO UPDATE
    SET state = 'running', daemon_id = excluded.daemon_id, started_at = excluded.started_at,
        finished_at = NULL, error = NULL, retry_at = NULL, args = excluded.args,
        kwargs = excluded.kwargs, priority = excluded.priority, origin = excluded.origin,
        unique_key = excluded.unique_key
)
SELECT taken.id, taken.task_name, taken.args, taken.kwargs,
       extract(epoch FROM taken.created_at)::float8, extract(epoch FROM claimed.run_after)::float8,
       taken.priority::int8, taken.attempt::int8, taken.origin, claimed.lease,
       extract(epoch FROM now())::float8,
       CASE WHEN (SELECT count(*) FROM taken) < $4::int8 THEN
           (SELECT extract(epoch FROM min(n.run_after) - now())::float8
            FROM priorities CROSS JOIN LATERAL (
                SELECT run_after FROM foreman_task
                WHERE priority = priorities.p AND run_after > now()
                ORDER BY run_after LIMIT 1) AS n)
       END,
       taken.unique_key
FROM (SELECT) AS one LEFT JOIN (taken JOIN claimed USING (id)) ON true";

/// A finished lease is deleted only if this daemon still holds it; the ids it no longer held
/// come back missing. A `LATERAL` probe per id: the primary key, whatever the statistics.
const SQL_DELETE_LEASED: &str = "\
DELETE FROM foreman_task WHERE ctid = ANY(ARRAY(
    SELECT t.ctid FROM unnest($2::int8[]) AS d(id)
    CROSS JOIN LATERAL (SELECT ctid FROM foreman_task
                        WHERE id = d.id AND leased_by = $1::int8) AS t))
RETURNING id";

/// A retry of an at-most-once task: the row again, under its id, one attempt later. `ON
/// CONFLICT DO NOTHING`: a retry whose commit's answer was lost (the connection broke) is
/// written once.
const SQL_REQUEUE: &str = "\
INSERT INTO foreman_task (id, task_name, args, kwargs, created_at, run_after, priority, attempt,
                          origin, unique_key) OVERRIDING SYSTEM VALUE
VALUES ($1::int8, $2::text, $3::jsonb, $4::jsonb, coalesce(to_timestamp($5::float8), now()),
        now() + make_interval(secs => $6::float8), $7::int, $8::int, $9::text, $10::text)
ON CONFLICT DO NOTHING";

/// A retry of an at-least-once task: its lease ends, its next attempt waits for the backoff.
const SQL_RETRY_LEASED: &str = "\
UPDATE foreman_task SET attempt = attempt + 1, run_after = now() + make_interval(secs => $3::float8),
    leased_by = NULL, leased_at = NULL
WHERE id = $2::int8 AND leased_by = $1::int8 RETURNING id";

/// A dead letter, written once even when the transaction is sent again.
const SQL_BURY: &str = "\
INSERT INTO foreman_dead (task_id, task_name, args, kwargs, created_at, reason, attempts, priority,
                          origin, unique_key)
SELECT $1::int8, $2::text, $3::jsonb, $4::jsonb, to_timestamp($5::float8), $6::text, $7::int,
       $8::int, $9::text, $10::text
WHERE NOT EXISTS (SELECT 1 FROM foreman_dead WHERE task_id = $1::int8 AND attempts = $7::int
                  AND reason = $6::text)";

/// A claimed row the resolver still said no to: put back as it was, its running attempt gone.
const SQL_PUT_BACK: &str = "\
INSERT INTO foreman_task (id, task_name, args, kwargs, created_at, run_after, priority, attempt,
                          origin, unique_key) OVERRIDING SYSTEM VALUE
VALUES ($1::int8, $2::text, $3::jsonb, $4::jsonb, coalesce(to_timestamp($5::float8), now()),
        coalesce(to_timestamp($6::float8), now()), $7::int, $8::int, $9::text, $10::text)
ON CONFLICT DO NOTHING";

const SQL_UNLEASE: &str = "\
UPDATE foreman_task SET leased_by = NULL, leased_at = NULL,
    run_after = coalesce(to_timestamp($3::float8), now())
WHERE id = $2::int8 AND leased_by = $1::int8";

const SQL_FORGET_RUN: &str = "\
DELETE FROM foreman_run WHERE task_id = $1::int8 AND attempt = $2::int AND state = 'running'";

const SQL_FORGET_ABORT: &str =
    "DELETE FROM foreman_abort WHERE task_id = $1::int8 AND attempt = $2::int";

const SQL_DEAD_RUN: &str = "\
UPDATE foreman_run SET state = 'dead', finished_at = now(), error = $3::text
WHERE task_id = $1::int8 AND attempt = $2::int";

/// The claim's state between cycles: each group's names and cursor.
#[derive(Debug, Default)]
pub struct ClaimState {
    groups: Vec<GroupCursor>,
    /// When the cursors were last dropped.
    reset_at: Option<Instant>,
    /// The `now()` of the last claim that came back (every attempt it started has it as its
    /// `started_at`): a claim sent after it whose answer was lost
    /// (the connection broke) may have committed; its attempts are settled at the next success.
    last_claim_at: Option<f64>,
    in_doubt_since: Option<f64>,
}

#[derive(Debug, Default, Clone)]
struct GroupCursor {
    names: Vec<String>,
    /// Per priority: the `run_after` and id of the last row claimed.
    after: Vec<(i32, f64, i64)>,
}

/// A claimed row, as the statement gave it, with what the claim needs to put it back.
struct ClaimedRow {
    task: std::result::Result<Task, (i64, String)>,
    /// Its `run_after` before the claim, and whether it was leased (at-least-once).
    run_after: Option<f64>,
    leased: bool,
    raw: (String, Json, Json, Option<f64>, i64, i64, Option<String>),
    unique_key: Option<String>,
}

/// The endings' columns, one vector each, as the statement takes them.
#[derive(Default)]
struct EndingArrays {
    task_id: Vec<i64>,
    attempt: Vec<i32>,
    task_name: Vec<String>,
    state: Vec<&'static str>,
    finished_ago: Vec<f64>,
    error: Vec<Option<String>>,
    retry_in: Vec<Option<f64>>,
    result: Vec<Option<String>>,
    exit_code: Vec<Option<i32>>,
}

impl EndingArrays {
    fn of(ended: &[Ending], now: f64) -> EndingArrays {
        let mut arrays = EndingArrays::default();
        for ending in ended {
            arrays.task_id.push(ending.task.id);
            arrays.attempt.push(int(ending.task.attempt));
            arrays.task_name.push(ending.task.name.clone());
            arrays.state.push(ending.state.as_str());
            arrays
                .finished_ago
                .push((now - ending.finished_at).max(0.0));
            arrays
                .error
                .push(ending.error.as_deref().map(|e| clean(&truncate_error(e))));
            arrays.retry_in.push(match ending.next {
                Next::Retry(at) => Some((at - now).max(0.0)),
                _ => None,
            });
            arrays.result.push(ending.result.as_deref().map(clean));
            arrays.exit_code.push(ending.exit_code);
        }
        arrays
    }
}

impl PgStore {
    /// The loop's cycle: records the attempts that `ended`, then claims what `claim` allows, each
    /// row with what `resolve` gave for it. See the module comment.
    pub fn cycle<H>(
        &mut self,
        ended: &[Ending],
        claim: Claim<'_>,
        now: f64,
        mut resolve: impl FnMut(&Task) -> Resolved<H>,
    ) -> Result<Popped<H>> {
        // The heartbeat's look at the queue no longer stands in for the tick's: this cycle may
        // have seen rows it had not (a delayed row, whose due time the loop now waits for).
        self.forget_look();
        let mut popped = Popped {
            tasks: Vec::with_capacity(claim.limit.min(1024)),
            dead: Vec::new(),
            deferred: 0,
            paused: 0,
            next_due: None,
        };
        if claim.limit == 0 && ended.is_empty() {
            return Ok(popped);
        }
        let me = self.daemon_id()?;
        self.settle_in_doubt(me)?;
        self.refresh_cursors(claim);
        let arrays = EndingArrays::of(ended, now);
        // Claims known to have committed: their rows are gone from the queue, so their tasks run
        // whatever happens to the claims after them.
        let mut safe = Vec::new();
        let claimed = self.claim_all(me, ended, &arrays, claim, now, &mut popped, &mut safe);
        // Endings recorded (or perhaps recorded, before a failure), tasks started: the heartbeat
        // tells the dashboards. Not a cycle that found nothing: an idle daemon announces nothing.
        if !ended.is_empty() || !safe.is_empty() {
            self.changed_something();
        }
        if let Err(e) = claimed {
            self.after_failure();
            if safe.is_empty() {
                return Err(e);
            }
            log::warn!("{e}; running the {} task(s) claimed before it", safe.len());
        }
        self.resolve_claimed(me, safe, &mut popped, &mut resolve);
        Ok(popped)
    }

    /// The cycle's statements: the rare endings and the first claim in one transaction, the other
    /// groups' claims each in its own. Each claim that commits goes into `safe`.
    #[allow(clippy::too_many_arguments)] // The cycle's parts, each its own parameter.
    fn claim_all<H>(
        &mut self,
        me: i64,
        ended: &[Ending],
        arrays: &EndingArrays,
        claim: Claim<'_>,
        now: f64,
        popped: &mut Popped<H>,
        safe: &mut Vec<ClaimedRow>,
    ) -> Result<()> {
        let rare = ended.iter().any(|e| {
            e.leased || !matches!(e.next, Next::Finished) || e.state == RunState::Cancelled
        });
        let mut endings = (!ended.is_empty()).then_some(arrays);
        let mut in_transaction = false;
        if rare {
            self.with(|c| c.batch_execute("BEGIN"))?;
            in_transaction = true;
            self.record_rare(me, ended, now)?;
        }
        let mut remaining = claim.limit;
        for (index, group) in claim.groups.iter().enumerate() {
            let want = remaining.min(group.limit);
            if want == 0 || group.names.is_empty() {
                continue;
            }
            let got = self.claim_group(me, index, group, want, endings.take(), popped)?;
            if in_transaction {
                self.with(|c| c.batch_execute("COMMIT"))?;
                in_transaction = false;
            }
            remaining -= got.len().min(remaining);
            safe.extend(got);
        }
        if endings.is_some() {
            let none = ClaimGroup::default();
            self.claim_group(me, usize::MAX, &none, 0, endings.take(), popped)?;
        }
        if in_transaction {
            self.with(|c| c.batch_execute("COMMIT"))?;
        }
        Ok(())
    }

    /// After a failed cycle: a transaction left open is rolled back (outside one, ROLLBACK only
    /// warns); a claim whose answer was lost with the connection may have committed, which the
    /// next success settles.
    fn after_failure(&mut self) {
        if self.take_broke() {
            self.claim.in_doubt_since = self
                .claim
                .in_doubt_since
                .or(Some(self.claim.last_claim_at.unwrap_or(f64::NEG_INFINITY)));
        } else {
            let _ = self.with(|c| c.batch_execute("ROLLBACK"));
        }
    }

    /// A claim whose answer the broken connection lost may have committed: its rows are gone
    /// from the queue and recorded running under this daemon, which never got them. They are
    /// recorded `lost` (at-most-once: not run), and its leases released, before anything else.
    fn settle_in_doubt(&mut self, me: i64) -> Result<()> {
        let Some(since) = self.claim.in_doubt_since else {
            return Ok(());
        };
        let rows = self.with(|c| {
            c.query(
                "WITH lost AS (
                    UPDATE foreman_run SET state = 'lost', finished_at = now(),
                        error = 'claimed as the daemon''s connection broke; it never started'
                    WHERE daemon_id = $1::int8 AND state = 'running'
                      AND started_at > to_timestamp($2::float8)
                    RETURNING task_id
                 ), released AS (
                    UPDATE foreman_task SET leased_by = NULL, leased_at = NULL, run_after = now()
                    WHERE leased_by = $1::int8 AND leased_at > to_timestamp($2::float8)
                    RETURNING id
                 )
                 SELECT (SELECT count(*) FROM lost), (SELECT count(*) FROM released)",
                &[&me, &since],
            )
        })?;
        self.claim.in_doubt_since = None;
        if let Some(row) = rows.first() {
            let (lost, released): (i64, i64) = (row.get(0), row.get(1));
            if lost + released > 0 {
                self.changed_something();
                log::warn!(
                    "the connection broke during a claim that committed: {lost} task(s) it claimed never started and are recorded lost ({released} at-least-once task(s) run again)"
                );
            }
        }
        Ok(())
    }

    /// Drops the cursors once a second, and those of a group whose names changed.
    fn refresh_cursors(&mut self, claim: Claim<'_>) {
        let claim_state = &mut self.claim;
        let stale = claim_state
            .reset_at
            .is_none_or(|at| at.elapsed() >= CURSOR_LIFETIME);
        if stale {
            claim_state.reset_at = Some(Instant::now());
        }
        claim_state
            .groups
            .resize_with(claim.groups.len(), GroupCursor::default);
        for (cursor, group) in claim_state.groups.iter_mut().zip(claim.groups) {
            if cursor.names != group.names {
                cursor.names.clone_from(&group.names);
                cursor.after.clear();
            } else if stale {
                cursor.after.clear();
            }
        }
    }

    /// One claim statement: `want` rows of the group's names (none for `want` 0), with
    /// `endings` recorded. Its cursor is the group's at position `group`.
    fn claim_group<H>(
        &mut self,
        me: i64,
        group: usize,
        claim: &ClaimGroup,
        want: usize,
        endings: Option<&EndingArrays>,
        popped: &mut Popped<H>,
    ) -> Result<Vec<ClaimedRow>> {
        let (names, leases) = (&claim.names, &claim.leases);
        let empty = EndingArrays::default();
        let e = endings.unwrap_or(&empty);
        let (mut cur_p, mut cur_at, mut cur_id) = (Vec::new(), Vec::new(), Vec::new());
        if let Some(cursor) = self.claim.groups.get(group) {
            for &(p, at, id) in &cursor.after {
                cur_p.push(p);
                cur_at.push(at);
                cur_id.push(id);
            }
        }
        let limit = big(want);
        let params: [&(dyn ToSql + Sync); 16] = [
            &me,
            &names,
            &leases,
            &limit,
            &cur_p,
            &cur_at,
            &cur_id,
            &e.task_id,
            &e.attempt,
            &e.task_name,
            &e.state,
            &e.finished_ago,
            &e.error,
            &e.retry_in,
            &e.result,
            &e.exit_code,
        ];
        let rows = self.query(SQL_CYCLE, &params)?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            let db_now: Option<f64> = row.get(10);
            if let Some(db_now) = db_now {
                let last = self.claim.last_claim_at.unwrap_or(f64::NEG_INFINITY);
                self.claim.last_claim_at = Some(last.max(db_now));
            }
            if let (Some(db_now), Some(due_in)) = (db_now, row.get::<_, Option<f64>>(11)) {
                let due = db_now + due_in;
                popped.next_due = Some(popped.next_due.map_or(due, |d: f64| d.min(due)));
            }
            let Some(id) = row.get::<_, Option<i64>>(0) else {
                continue;
            };
            let name: String = row.get(1);
            let args: Json = row.get(2);
            let kwargs: Json = row.get(3);
            let created_at = opt_secs(row, 4);
            let run_after = opt_secs(row, 5);
            let priority: i64 = row.get(6);
            let attempt: i64 = row.get(7);
            let origin: Option<String> = row.get(8);
            let lease: f64 = row.get(9);
            let unique_key: Option<String> = row.get(12);
            if let (Some(cursor), Some(at)) = (self.claim.groups.get_mut(group), run_after) {
                let p = i32::try_from(priority).unwrap_or(0);
                match cursor.after.iter_mut().find(|(q, _, _)| *q == p) {
                    Some(entry) if (at, id) > (entry.1, entry.2) => *entry = (p, at, id),
                    Some(_) => {}
                    None => cursor.after.push((p, at, id)),
                }
            }
            let task = decode_typed(TypedRow {
                id,
                task_name: name.clone(),
                args: args.clone(),
                kwargs: kwargs.clone(),
                created_at,
                run_after,
                priority,
                attempt,
                origin: origin.clone(),
                unique_key: unique_key.clone(),
            })
            .map_err(|reason| (id, reason));
            claimed.push(ClaimedRow {
                task,
                run_after,
                leased: lease > 0.0,
                raw: (name, args, kwargs, created_at, priority, attempt, origin),
                unique_key,
            });
        }
        Ok(claimed)
    }

    /// The endings that touch more than their history row, in the open transaction: retries,
    /// burials and finished leases.
    fn record_rare(&mut self, me: i64, ended: &[Ending], now: f64) -> Result<()> {
        let finished_leases: Vec<i64> = ended
            .iter()
            .filter(|e| e.leased && !matches!(e.next, Next::Retry(_)))
            .map(|e| e.task.id)
            .collect();
        if !finished_leases.is_empty() {
            let rows = self.query(SQL_DELETE_LEASED, &[&me, &finished_leases])?;
            let deleted: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            for id in finished_leases.iter().filter(|id| !deleted.contains(id)) {
                log::warn!(
                    "task {id}: its lease ran out or was released while it ran, so another daemon may run it again (at-least-once); its outcome is recorded"
                );
            }
        }
        for ending in ended {
            let task = &ending.task;
            match &ending.next {
                Next::Finished => {}
                Next::Retry(at) => {
                    let retry_in = (at - now).max(0.0);
                    if ending.leased {
                        let rows = self.query(SQL_RETRY_LEASED, &[&me, &task.id, &retry_in])?;
                        if rows.is_empty() {
                            log::warn!(
                                "task {}: its lease ran out or was released while it ran; another daemon runs it again instead of this retry",
                                task.id
                            );
                        }
                    } else {
                        let (args, kwargs) = json_values(task);
                        self.query(
                            SQL_REQUEUE,
                            &[
                                &task.id,
                                &task.name,
                                &args,
                                &kwargs,
                                &task.created_at,
                                &retry_in,
                                &int(task.priority),
                                &int(task.attempt.saturating_add(1)),
                                &task.origin,
                                &task.unique_key,
                            ],
                        )?;
                    }
                }
                Next::Bury(reason) => {
                    let (args, kwargs) = json_values(task);
                    self.query(
                        SQL_BURY,
                        &[
                            &task.id,
                            &task.name,
                            &args,
                            &kwargs,
                            &task.created_at,
                            &clean(&truncate_error(reason)),
                            &int(task.attempt),
                            &int(task.priority),
                            &task.origin,
                            &task.unique_key,
                        ],
                    )?;
                }
            }
        }
        let cancelled: Vec<(i64, i32)> = ended
            .iter()
            .filter(|e| e.state == RunState::Cancelled)
            .map(|e| (e.task.id, int(e.task.attempt)))
            .collect();
        for (id, attempt) in cancelled {
            self.query(SQL_FORGET_ABORT, &[&id, &attempt])?;
        }
        Ok(())
    }

    /// Hands each claimed row to the resolver; the rare row it still refuses (a pool that died
    /// between the capacity check and the claim) is put back or buried, in one transaction.
    fn resolve_claimed<H>(
        &mut self,
        me: i64,
        claimed: Vec<ClaimedRow>,
        popped: &mut Popped<H>,
        resolve: &mut impl FnMut(&Task) -> Resolved<H>,
    ) {
        let mut put_back = Vec::new();
        let mut bury = Vec::new();
        for row in claimed {
            match &row.task {
                Ok(task) => match resolve(task) {
                    Resolved::Run(handler, _) => {
                        if let Ok(task) = row.task {
                            popped.tasks.push((task, handler));
                        }
                    }
                    Resolved::Dead(reason) => bury.push((row, reason)),
                    // A paused name is left out of the claim; one paused since is put back.
                    Resolved::Defer | Resolved::Hold(_) | Resolved::Pause => put_back.push(row),
                },
                Err((_, reason)) => {
                    let reason = reason.clone();
                    bury.push((row, reason));
                }
            }
        }
        if put_back.is_empty() && bury.is_empty() {
            return;
        }
        popped.deferred += put_back.len();
        let fixed = self.correct(me, &put_back, &bury);
        for (row, reason) in &bury {
            let (id, name) = match &row.task {
                Ok(task) => (task.id, Some(task.name.clone())),
                Err((id, _)) => (*id, Some(row.raw.0.clone())),
            };
            popped.dead.push(Buried {
                task_id: id,
                task_name: name,
                reason: reason.clone(),
            });
        }
        if let Err(e) = fixed {
            // They stay recorded running under this daemon: the next start of any daemon, or
            // this daemon's recovery, records them lost. Never run twice.
            log::error!(
                "{e}: {} claimed row(s) this daemon cannot run now could not be put back; they are recorded running and will be recorded lost",
                put_back.len() + bury.len()
            );
            popped.dead.clear();
        }
    }

    fn correct(
        &mut self,
        me: i64,
        put_back: &[ClaimedRow],
        bury: &[(ClaimedRow, String)],
    ) -> Result<()> {
        self.with(|c| c.batch_execute("BEGIN"))?;
        let done = (|| -> Result<()> {
            for row in put_back {
                let (name, args, kwargs, created_at, priority, attempt, origin) = &row.raw;
                let id = row_id(row);
                if row.leased {
                    self.query(SQL_UNLEASE, &[&me, &id, &row.run_after])?;
                } else {
                    self.query(
                        SQL_PUT_BACK,
                        &[
                            &id,
                            name,
                            args,
                            kwargs,
                            created_at,
                            &row.run_after,
                            &int(*priority),
                            &int(*attempt),
                            origin,
                            &row.unique_key,
                        ],
                    )?;
                }
                self.query(SQL_FORGET_RUN, &[&id, &int(*attempt)])?;
            }
            for (row, reason) in bury {
                let (name, args, kwargs, created_at, priority, attempt, origin) = &row.raw;
                let id = row_id(row);
                let reason = clean(&truncate_error(reason));
                if row.leased {
                    self.query(SQL_DELETE_LEASED, &[&me, &vec![id]])?;
                }
                self.query(
                    SQL_BURY,
                    &[
                        &id,
                        name,
                        args,
                        kwargs,
                        created_at,
                        &reason,
                        &int(*attempt),
                        &int(*priority),
                        origin,
                        &row.unique_key,
                    ],
                )?;
                self.query(SQL_DEAD_RUN, &[&id, &int(*attempt), &reason])?;
            }
            Ok(())
        })();
        match done {
            Ok(()) => self.with(|c| c.batch_execute("COMMIT")),
            Err(e) => {
                let _ = self.with(|c| c.batch_execute("ROLLBACK"));
                Err(e)
            }
        }
    }

    /// The daemon's id: the cycle writes it into every attempt.
    pub(super) fn daemon_id(&self) -> Result<i64> {
        self.daemon.as_ref().map(|d| d.id).ok_or_else(|| {
            Error::Config("the PostgreSQL store claims only for a registered daemon".to_owned())
        })
    }
}

fn row_id(row: &ClaimedRow) -> i64 {
    match &row.task {
        Ok(task) => task.id,
        Err((id, _)) => *id,
    }
}

/// The task's args and kwargs as `jsonb` values.
fn json_values(task: &Task) -> (Json, Json) {
    (
        Json::Array(task.args.clone()),
        Json::Object(task.kwargs.clone()),
    )
}

/// A count or number that the schema keeps in an `int`.
pub(super) fn int(n: i64) -> i32 {
    i32::try_from(n).unwrap_or(if n < 0 { i32::MIN } else { i32::MAX })
}

/// Text PostgreSQL can store: it refuses the character U+0000, which a command's output may hold.
pub(super) fn clean(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}
