//! `foreman health`: one verdict, healthy or why not (daemon down, heartbeat stale, queue stalled),
//! for Docker's `HEALTHCHECK` and Kubernetes probes. It reads only what index lookups give (the
//! lock, the heartbeat row, the running set, the oldest due rows), since a probe runs it every few
//! seconds against queues of any depth. `status` shows the same verdict.

use std::collections::HashSet;

use std::time::Duration;

use clap::Args;

use super::format::{age, one_line, rounded};
use super::observe::{CheckedBy, Observation, Thresholds, is_paused, open};
use super::{Globals, exit_status, print};
use crate::config::Config;
use crate::duration::parse_duration;
use crate::store::{DaemonRow, DueRow, PausedName, Store};

// `health` is a probe: Docker reads any exit but 0 as unhealthy and reserves 2, so every
// unhealthy verdict is 1 and 2 stays a usage error.
const EXIT_CODES: &str = "\
Exit codes:
  0  healthy: the daemon runs, its heartbeat is fresh, and no task waits past --max-queue-age
     while a worker is free (busy workers or a saturated pool are healthy)
  1  unhealthy; the line says why: daemon_down, heartbeat_stale, stalled, db_error
  2  usage or configuration error

Examples:
  Dockerfile:  HEALTHCHECK --interval=30s CMD foreman health
  Kubernetes:  livenessProbe: {exec: {command: [foreman, health, --max-age, 30s]}}";

/// Exit 0 if the daemon is healthy, else 1 with one line saying why (for Docker and Kubernetes)
#[derive(Args, Debug)]
#[command(after_help = EXIT_CODES)]
pub struct HealthArgs {
    /// A heartbeat older than this is stale [default: 6 × the heartbeat setting, 30s]
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub max_age: Option<Duration>,
    /// A due task waiting longer than this while a worker is free is a stall
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub max_queue_age: Duration,
    /// One JSON document instead of the line
    #[arg(long)]
    pub json: bool,
}

pub fn run(globals: &Globals, args: &HealthArgs) -> crate::Result<()> {
    let config = globals.load_config()?;
    let thresholds = Thresholds {
        max_age: args
            .max_age
            .unwrap_or(Thresholds::defaults(&config).max_age),
        max_queue_age: args.max_queue_age,
    };
    let (text, healthy) = verdict(&config, thresholds, args.json);
    print(&text)?;
    if healthy { Ok(()) } else { Err(exit_status(1)) }
}

/// Due rows looked at per priority when the oldest ones belong to saturated pools: the pop's own
/// lookahead, so health sees the rows a pop would.
const STALL_LOOKAHEAD: usize = 64;

/// Why the verdict is what it is; `as_str` is the stable code `--json` gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Running, heartbeat fresh, nothing waiting too long.
    Ok,
    /// Running, but it has not written its first heartbeat yet (within `--max-age` of its start),
    /// or it started less than `--max-queue-age` ago with a backlog it has not caught up on.
    Starting,
    /// Tasks wait longer than `--max-queue-age`, but because every worker (or their pool's every
    /// process) is busy: a capacity problem, not a stuck daemon.
    Busy,
    DaemonDown,
    HeartbeatStale,
    /// Tasks wait longer than `--max-queue-age` while workers are free.
    Stalled,
    /// A shutdown signal made it stop popping; it waits for its running tasks (`graceful_timeout`).
    Stopping,
    /// The database cannot be opened or read.
    DbError,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ok => "ok",
            Reason::Starting => "starting",
            Reason::Busy => "busy",
            Reason::DaemonDown => "daemon_down",
            Reason::HeartbeatStale => "heartbeat_stale",
            Reason::Stalled => "stalled",
            Reason::Stopping => "stopping",
            Reason::DbError => "db_error",
        }
    }

    pub fn is_healthy(self) -> bool {
        matches!(
            self,
            Reason::Ok | Reason::Starting | Reason::Busy | Reason::Stopping
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub reason: Reason,
    /// One line for a person, without the `healthy:` prefix.
    pub message: String,
}

impl Verdict {
    fn new(reason: Reason, message: String) -> Verdict {
        Verdict { reason, message }
    }

    /// The line `health` prints: `healthy: …`, `unhealthy: stalled: …`.
    pub fn line(&self) -> String {
        let verdict = if self.reason.is_healthy() {
            "healthy"
        } else {
            "unhealthy"
        };
        // One line whatever a task name or an error holds: a probe's log shows the first.
        let message = one_line(&self.message, usize::MAX);
        match self.reason {
            Reason::Ok => format!("{verdict}: {message}"),
            reason => format!("{verdict}: {}: {message}", reason.as_str()),
        }
    }
}

/// Reads what a verdict needs, in one snapshot: the observation, and the row `waiting` finds.
pub fn observe(
    store: &Store,
    config: &Config,
    thresholds: Thresholds,
) -> crate::Result<(Observation, Option<DueRow>)> {
    Observation::read_with(store, config, thresholds.max_age, |q, now, row, paused| {
        waiting(q, now, row, paused, thresholds)
    })
}

/// The longest-waiting due row that a daemon should have started by now: due for over
/// `--max-queue-age`, not of a paused task name (a pause holds it back on purpose), and not a
/// task of a pool whose every process is busy (by the pools the daemons' `rows` list). With
/// several daemons (PostgreSQL), a name waits for capacity only when every daemon that serves it
/// serves it from a saturated pool.
pub fn waiting(
    store: &Store,
    now: f64,
    rows: &[DaemonRow],
    paused: &[PausedName],
    thresholds: Thresholds,
) -> crate::Result<Option<DueRow>> {
    // SQLite's one row counts whatever its state; of several, those that run.
    let rows: Vec<&DaemonRow> = if rows.len() > 1 || rows.iter().any(|r| !r.served.is_empty()) {
        rows.iter().filter(|r| r.is_open()).collect()
    } else {
        rows.iter().collect()
    };
    let saturated_in = |row: &DaemonRow, name: &str| {
        row.pools
            .iter()
            .any(|pool| pool.is_saturated() && pool.tasks.iter().any(|t| t == name))
    };
    let names: HashSet<&str> = rows
        .iter()
        .flat_map(|row| row.pools.iter())
        .filter(|pool| pool.is_saturated())
        .flat_map(|pool| pool.tasks.iter().map(String::as_str))
        .collect();
    let saturated: HashSet<&str> = names
        .into_iter()
        .filter(|name| {
            rows.iter().all(|row| {
                saturated_in(row, name) || !row.served.iter().any(|served| served == name)
            })
        })
        .collect();
    let before = now - thresholds.max_queue_age.as_secs_f64();
    store.first_waiting(before, STALL_LOOKAHEAD, |due| {
        !saturated.contains(due.task_name.as_str()) && !is_paused(paused, &due.task_name)
    })
}

/// Of the daemons sharing the database, the one that serves `name` with the most free workers:
/// (its row, free workers), if any runs.
fn freest_for<'o>(obs: &'o Observation, name: &str, max_age: f64) -> Option<(&'o DaemonRow, i64)> {
    obs.live(max_age)
        .filter(|row| row.stopping_at.is_none())
        .filter(|row| row.served.is_empty() || row.served.iter().any(|s| s == name))
        .map(|row| (row, row.workers - obs.busy(row.id)))
        .max_by_key(|(_, free)| *free)
}

/// `, paused: a, b` (or `every task`) for a summary; empty when nothing is paused.
fn paused_note(paused: &[PausedName]) -> String {
    if paused.is_empty() {
        return String::new();
    }
    if paused.iter().any(|p| p.task_name.is_none()) {
        return ", every task paused".to_owned();
    }
    let names: Vec<&str> = paused
        .iter()
        .filter_map(|p| p.task_name.as_deref())
        .collect();
    format!(", paused: {}", one_line(&names.join(", "), 80))
}

/// `foreman health`: the text (one line, or the JSON document) to print, and whether it is
/// healthy. A database that cannot be read is a verdict too (`db_error`), so a probe always gets
/// its one line.
fn verdict(config: &Config, thresholds: Thresholds, json_form: bool) -> (String, bool) {
    let (obs, verdict) = match open(config).and_then(|store| observe(&store, config, thresholds)) {
        Ok((obs, waiting)) => {
            let verdict = judge(&obs, waiting.as_ref(), thresholds);
            (Some(obs), verdict)
        }
        Err(e) => (
            None,
            Verdict {
                reason: Reason::DbError,
                message: e.to_string(),
            },
        ),
    };
    let text = if json_form {
        json(obs.as_ref(), &verdict, thresholds)
    } else {
        format!("{}\n", verdict.line())
    };
    (text, verdict.reason.is_healthy())
}

/// The verdict on what was observed. `waiting` is the longest-waiting row the daemon should have
/// started by now (see `observe`).
pub fn judge(obs: &Observation, waiting: Option<&DueRow>, thresholds: Thresholds) -> Verdict {
    let now = obs.now;
    let daemon = &obs.daemon;
    let max_age = thresholds.max_age.as_secs_f64();
    let max_queue_age = thresholds.max_queue_age.as_secs_f64();
    if obs.shared && daemon.row.is_none() {
        return judge_fleet(obs, waiting, thresholds);
    }
    if !daemon.running {
        return judge_down(obs, max_age);
    }
    let pid = daemon
        .pid
        .map_or_else(|| "?".to_owned(), |pid| pid.to_string());
    let Some(row) = daemon.current_row() else {
        return judge_unregistered(obs, &pid, max_age);
    };
    let heartbeat = (now - row.heartbeat_at).max(0.0);
    if heartbeat > max_age {
        return Verdict::new(
            Reason::HeartbeatStale,
            format!(
                "daemon pid {pid} runs, but its heartbeat is {} old (limit {}): its loop is stuck or the process is stopped",
                age(heartbeat),
                age(max_age)
            ),
        );
    }
    let busy = daemon.workers(&obs.running).map_or(0, |(_, busy)| busy);
    let workers = row.workers;
    if let Some(stopping) = row.stopping_at {
        // Due rows wait on purpose now: the next daemon pops them.
        return Verdict::new(
            Reason::Stopping,
            format!(
                "daemon pid {pid} is stopping (signalled {} ago), waiting for {busy} running task(s)",
                age((now - stopping).max(0.0))
            ),
        );
    }
    let oldest = obs
        .oldest_due
        .as_ref()
        .map(|due| (now - due.due_since).max(0.0));
    let others = match obs.live(max_age).count().saturating_sub(1) {
        n if n > 0 && obs.shared => format!(" (and {n} more daemon(s))"),
        _ => String::new(),
    };
    let summary = format!(
        "daemon pid {pid} up {}, heartbeat {} ago, {busy} of {workers} workers busy, {}{}{others}",
        age(now - row.started_at),
        age(heartbeat),
        oldest.map_or_else(
            || "nothing due".to_owned(),
            |o| format!("oldest due task waited {}", age(o))
        ),
        paused_note(&obs.paused)
    );
    if let Some(verdict) = shared_stall(obs, waiting, row, thresholds) {
        return verdict;
    }
    match (waiting, oldest) {
        // A backlog older than the daemon: its rows have waited for this daemon only as long as
        // it has run (a pool may still be starting), so a stall is judged once that is long enough.
        (Some(due), _) if busy < workers && now - row.started_at <= max_queue_age => Verdict::new(
            Reason::Starting,
            format!(
                "daemon pid {pid} started {} ago with a backlog: task {} ({}) was due {} ago; a stall counts after {} up",
                age(now - row.started_at),
                due.task_id,
                due.task_name,
                age(now - due.due_since),
                age(max_queue_age)
            ),
        ),
        (Some(due), _) if busy < workers => Verdict::new(
            Reason::Stalled,
            format!(
                "task {} ({}) has waited {} since it was due (limit {}) while {} of {workers} workers are free",
                due.task_id,
                due.task_name,
                age(now - due.due_since),
                age(max_queue_age),
                workers - busy
            ),
        ),
        (_, Some(oldest)) if oldest > max_queue_age => {
            let why = if busy >= workers {
                "every worker is busy".to_owned()
            } else {
                let full: Vec<&str> = row
                    .pools
                    .iter()
                    .filter(|pool| pool.is_saturated())
                    .map(|pool| pool.name.as_str())
                    .collect();
                format!("every process of pool {} is busy", full.join(", "))
            };
            Verdict::new(Reason::Busy, format!("{why}: {summary}"))
        }
        _ => Verdict::new(Reason::Ok, summary),
    }
}

/// With several daemons, a stall is a due task that no daemon with a free worker has started,
/// though one that serves its name (other than this host's, judged by the caller) has been up
/// long enough to.
fn shared_stall(
    obs: &Observation,
    waiting: Option<&DueRow>,
    row: &DaemonRow,
    thresholds: Thresholds,
) -> Option<Verdict> {
    let now = obs.now;
    let max_age = thresholds.max_age.as_secs_f64();
    let max_queue_age = thresholds.max_queue_age.as_secs_f64();
    let due = waiting.filter(|_| obs.shared)?;
    let (other, free) = freest_for(obs, &due.task_name, max_age)?;
    if free <= 0 || other.id == row.id || now - other.started_at <= max_queue_age {
        return None;
    }
    Some(Verdict::new(
        Reason::Stalled,
        format!(
            "task {} ({}) has waited {} since it was due (limit {}) while daemon {} (pid {} on {}) has {free} of {} workers free",
            due.task_id,
            due.task_name,
            age(now - due.due_since),
            age(max_queue_age),
            other.id,
            other.pid,
            other.host,
            other.workers
        ),
    ))
}

/// A database that daemons share, judged where none of them runs (a monitoring host): the
/// daemons that run anywhere, and whether a due task waits while one of them has a free worker.
fn judge_fleet(obs: &Observation, waiting: Option<&DueRow>, thresholds: Thresholds) -> Verdict {
    let now = obs.now;
    let max_age = thresholds.max_age.as_secs_f64();
    let max_queue_age = thresholds.max_queue_age.as_secs_f64();
    let live: Vec<&DaemonRow> = obs.live(max_age).collect();
    if live.is_empty() {
        return Verdict::new(
            Reason::DaemonDown,
            format!(
                "no daemon is running on any host ({})",
                fleet_down_detail(obs)
            ),
        );
    }
    if let Some(due) = waiting
        && let Some((row, free)) = freest_for(obs, &due.task_name, max_age)
        && free > 0
        && now - row.started_at > max_queue_age
    {
        return Verdict::new(
            Reason::Stalled,
            format!(
                "task {} ({}) has waited {} since it was due (limit {}) while daemon {} (pid {} on {}) has {free} of {} workers free",
                due.task_id,
                due.task_name,
                age(now - due.due_since),
                age(max_queue_age),
                row.id,
                row.pid,
                row.host,
                row.workers
            ),
        );
    }
    let workers: i64 = live.iter().map(|row| row.workers).sum();
    let busy: i64 = live.iter().map(|row| obs.busy(row.id)).sum();
    let mut hosts: Vec<&str> = live.iter().map(|row| row.host.as_str()).collect();
    hosts.sort_unstable();
    hosts.dedup();
    let oldest = obs
        .oldest_due
        .as_ref()
        .map(|due| (now - due.due_since).max(0.0));
    let summary = format!(
        "{} daemon(s) up on {}, none on this host; {busy} of {workers} workers busy, {}",
        live.len(),
        hosts.join(", "),
        oldest.map_or_else(
            || "nothing due".to_owned(),
            |o| format!("oldest due task waited {}", age(o))
        )
    );
    if oldest.is_some_and(|o| o > max_queue_age) {
        return Verdict::new(Reason::Busy, format!("every worker is busy: {summary}"));
    }
    Verdict::new(Reason::Ok, summary)
}

/// When the daemons of a shared database were last seen.
fn fleet_down_detail(obs: &Observation) -> String {
    match obs
        .daemons
        .iter()
        .max_by(|a, b| a.heartbeat_at.total_cmp(&b.heartbeat_at))
    {
        None => "none has run on this database".to_owned(),
        Some(row) => format!(
            "the last heartbeat was daemon {}'s (pid {} on {}), {} ago",
            row.id,
            row.pid,
            row.host,
            age(obs.now - row.heartbeat_at)
        ),
    }
}

/// No daemon runs, as far as the lock (or, without it, the heartbeat) can tell.
fn judge_down(obs: &Observation, max_age: f64) -> Verdict {
    let daemon = &obs.daemon;
    match &daemon.row {
        // Without the lock, an old heartbeat of a daemon that did not stop may be a stuck one.
        Some(row)
            if daemon.checked_by == CheckedBy::Heartbeat
                && row.stopped_at.is_none()
                && !daemon.process_gone =>
        {
            Verdict::new(
                Reason::HeartbeatStale,
                format!(
                    "the heartbeat of daemon pid {} is {} old (limit {}), and the PID file cannot tell whether it runs ({})",
                    row.pid,
                    age(obs.now - row.heartbeat_at),
                    age(max_age),
                    daemon.lock_note.as_deref().unwrap_or("unreadable"),
                ),
            )
        }
        _ => Verdict::new(
            Reason::DaemonDown,
            format!("no daemon is running ({})", down_detail(obs)),
        ),
    }
}

/// The lock is held but the row is a predecessor's: this daemon has not registered yet, which it
/// does early in its start.
fn judge_unregistered(obs: &Observation, pid: &str, max_age: f64) -> Verdict {
    match obs.daemon.uptime(obs.now) {
        Some(started) if started <= max_age => Verdict::new(
            Reason::Starting,
            format!(
                "daemon pid {pid} started {} ago and has not written its heartbeat yet",
                age(started)
            ),
        ),
        started => Verdict::new(
            Reason::HeartbeatStale,
            format!(
                "daemon pid {pid} holds the lock but has written no heartbeat{} (limit {})",
                started.map_or_else(String::new, |s| format!(" in {}", age(s))),
                age(max_age)
            ),
        ),
    }
}

/// Why the daemon is not running, from what its last row says: `pid 42 stopped cleanly 3m ago`.
pub fn down_detail(obs: &Observation) -> String {
    let now = obs.now;
    let daemon = &obs.daemon;
    // Without a row no daemon ever ran here: one running elsewhere on this file would have
    // written it, whatever PID file it uses.
    let Some(row) = &daemon.row else {
        return "none has run on this database".to_owned();
    };
    if let Some(stopped) = row.stopped_at {
        return format!("pid {} stopped cleanly {} ago", row.pid, age(now - stopped));
    }
    let gone = if daemon.process_gone {
        "; its process is gone"
    } else {
        ""
    };
    format!(
        "pid {} was last seen {} ago and did not stop cleanly (crash, kill -9 or a lost container{gone})",
        row.pid,
        age(now - row.heartbeat_at)
    )
}

/// `health --json`: the verdict with the figures it was made from.
pub fn json(obs: Option<&Observation>, verdict: &Verdict, thresholds: Thresholds) -> String {
    let now = obs.map_or(0.0, |o| o.now);
    let daemon = obs.map(|o| &o.daemon);
    let workers = obs.and_then(|o| o.daemon.workers(&o.running));
    let doc = serde_json::json!({
        "healthy": verdict.reason.is_healthy(),
        "reason": verdict.reason.as_str(),
        "message": verdict.message,
        "daemon_running": daemon.map(|d| d.running),
        "pid": daemon.and_then(|d| d.pid),
        "uptime_seconds": daemon.and_then(|d| d.uptime(now)).map(rounded),
        "heartbeat_age_seconds": daemon.and_then(|d| d.heartbeat_age(now)).map(rounded),
        "workers": workers.map(|(total, _)| total),
        "workers_busy": workers.map(|(_, busy)| busy),
        "oldest_due_age_seconds": obs
            .and_then(|o| o.oldest_due.as_ref())
            .map(|due| rounded((now - due.due_since).max(0.0))),
        "max_age_seconds": thresholds.max_age.as_secs_f64(),
        "max_queue_age_seconds": thresholds.max_queue_age.as_secs_f64(),
        "paused": obs.map(|o| paused_json(&o.paused, now)),
    });
    format!("{doc}\n")
}

/// The paused names as `status --json` and `health --json` give them: `task_name` `null` for
/// `pause --all`.
pub fn paused_json(paused: &[PausedName], now: f64) -> Vec<serde_json::Value> {
    paused
        .iter()
        .map(|p| {
            serde_json::json!({
                "task_name": p.task_name,
                "since": p.since,
                "for_seconds": rounded((now - p.since).max(0.0)),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::commands::observe::{DaemonView, Lock};
    use crate::store::{DaemonRow, PoolRow, RunningAttempt};

    const NOW: f64 = 10_000.0;
    const LIMITS: Thresholds = Thresholds {
        max_age: Duration::from_secs(30),
        max_queue_age: Duration::from_mins(1),
    };

    fn row() -> DaemonRow {
        DaemonRow {
            id: 1,
            pid: 42,
            pid_start: Some(7),
            host: "h".to_owned(),
            version: "0.1.0".to_owned(),
            started_at: 1000.0,
            heartbeat_at: NOW - 1.0,
            stopping_at: None,
            stopped_at: None,
            workers: 2,
            pools: vec![PoolRow {
                name: "py".to_owned(),
                processes: Some(1),
                up: Some(1),
                busy: Some(1),
                tasks: vec!["pooled".to_owned()],
            }],
            totals: std::collections::BTreeMap::new(),
            served: Vec::new(),
            recovered_at: None,
            recovered_by: None,
        }
    }

    fn obs(lock: Lock, row: Option<DaemonRow>, running: usize, oldest: Option<f64>) -> Observation {
        Observation {
            now: NOW,
            daemon: DaemonView::observe(lock, row, "h", |_| Some(7), 30.0, NOW),
            daemons: Vec::new(),
            shared: false,
            running: (0..running)
                .map(|i| RunningAttempt {
                    daemon_id: None,
                    task_id: i64::try_from(i).unwrap(),
                    attempt: 1,
                    task_name: "t".to_owned(),
                    started_at: Some(NOW - 1.0),
                    enqueued_at: None,
                })
                .collect(),
            oldest_due: oldest.map(|since| due("pooled", since)),
            paused: Vec::new(),
        }
    }

    fn due(name: &str, since: f64) -> DueRow {
        DueRow {
            task_id: 9,
            task_name: name.to_owned(),
            priority: 0,
            due_since: since,
        }
    }

    fn held() -> Lock {
        Lock::Held {
            pid: Some(42),
            since: Some(999.0),
        }
    }

    #[test]
    fn a_running_daemon_with_nothing_late_is_healthy() {
        let verdict = judge(&obs(held(), Some(row()), 1, Some(NOW - 5.0)), None, LIMITS);
        assert_eq!(verdict.reason, Reason::Ok, "{verdict:?}");
        assert!(
            verdict.line().starts_with("healthy: daemon pid 42 up"),
            "{}",
            verdict.line()
        );
        assert!(
            verdict.message.contains("1 of 2 workers busy"),
            "{verdict:?}"
        );
    }

    #[test]
    fn down_says_how_it_went() {
        let verdict = judge(&obs(Lock::Free, None, 0, None), None, LIMITS);
        assert_eq!(verdict.reason, Reason::DaemonDown);
        assert!(
            verdict.line().starts_with("unhealthy: daemon_down: "),
            "{}",
            verdict.line()
        );
        let mut stopped = row();
        stopped.stopped_at = Some(NOW - 120.0);
        let verdict = judge(&obs(Lock::Free, Some(stopped), 0, None), None, LIMITS);
        assert!(
            verdict.message.contains("stopped cleanly 2m 00s ago"),
            "{verdict:?}"
        );
        let verdict = judge(&obs(Lock::Free, Some(row()), 0, None), None, LIMITS);
        assert!(
            verdict.message.contains("did not stop cleanly"),
            "{verdict:?}"
        );
    }

    #[test]
    fn a_heartbeat_older_than_max_age_is_stale() {
        let mut old = row();
        old.heartbeat_at = NOW - 31.0;
        let verdict = judge(&obs(held(), Some(old.clone()), 0, None), None, LIMITS);
        assert_eq!(verdict.reason, Reason::HeartbeatStale, "{verdict:?}");
        // Without the PID file, an unstopped row with an old heartbeat is stale, not down.
        let unknown = Lock::Unknown {
            why: "pid file x: gone".to_owned(),
        };
        let verdict = judge(&obs(unknown, Some(old), 0, None), None, LIMITS);
        assert_eq!(verdict.reason, Reason::HeartbeatStale, "{verdict:?}");
    }

    #[test]
    fn a_new_daemon_gets_max_age_to_write_its_first_heartbeat() {
        let mut previous = row();
        previous.started_at = 100.0;
        let lock = |since| Lock::Held {
            pid: Some(42),
            since: Some(since),
        };
        let verdict = judge(
            &obs(lock(NOW - 2.0), Some(previous.clone()), 0, None),
            None,
            LIMITS,
        );
        assert_eq!(verdict.reason, Reason::Starting, "{verdict:?}");
        let verdict = judge(
            &obs(lock(NOW - 40.0), Some(previous), 0, None),
            None,
            LIMITS,
        );
        assert_eq!(verdict.reason, Reason::HeartbeatStale, "{verdict:?}");
    }

    #[test]
    fn a_late_task_is_a_stall_only_while_a_worker_is_free() {
        let late = due("plain", NOW - 90.0);
        let verdict = judge(
            &obs(held(), Some(row()), 1, Some(NOW - 90.0)),
            Some(&late),
            LIMITS,
        );
        assert_eq!(verdict.reason, Reason::Stalled, "{verdict:?}");
        assert!(
            verdict.message.contains("task 9 (plain) has waited 1m 30s")
                && verdict.message.contains("1 of 2 workers are free"),
            "{verdict:?}"
        );
        let verdict = judge(
            &obs(held(), Some(row()), 2, Some(NOW - 90.0)),
            Some(&late),
            LIMITS,
        );
        assert_eq!(verdict.reason, Reason::Busy, "{verdict:?}");
        assert!(
            verdict.message.starts_with("every worker is busy"),
            "{verdict:?}"
        );
        // A daemon up for less than --max-queue-age has not had the time to stall on a backlog
        // older than itself (its pool may still be starting): starting, not stalled.
        let mut new = row();
        new.started_at = NOW - 5.0;
        let verdict = judge(
            &obs(held(), Some(new), 0, Some(NOW - 600.0)),
            Some(&due("plain", NOW - 600.0)),
            LIMITS,
        );
        assert_eq!(verdict.reason, Reason::Starting, "{verdict:?}");
        assert!(
            verdict
                .line()
                .starts_with("healthy: starting: daemon pid 42 started 5.0s ago"),
            "{}",
            verdict.line()
        );
        // Only a saturated pool's rows are late (`observe` skipped them): busy, not stalled.
        let verdict = judge(&obs(held(), Some(row()), 1, Some(NOW - 90.0)), None, LIMITS);
        assert_eq!(verdict.reason, Reason::Busy, "{verdict:?}");
        assert!(
            verdict
                .message
                .starts_with("every process of pool py is busy"),
            "{verdict:?}"
        );
    }
}
