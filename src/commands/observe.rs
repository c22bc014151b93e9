//! What the operator's commands (`status`, `stats`, `health`, `metrics`) make of the rows the
//! daemon publishes, the PID file's lock and /proc: is the daemon up or down, since when, with which
//! heartbeat, and the thresholds a verdict is judged by. It never writes the database and never
//! talks to the daemon process, so it works from another container sharing the volume.

use std::path::Path;
use std::time::Duration;

use crate::config::Config;
use crate::pid_guard::DaemonState;
use crate::store::{Access, DaemonRow, DueRow, PausedName, RunningAttempt, Store};
use crate::sys::{hostname, process_start};

/// Heartbeats a daemon may miss before `--max-age` (by default) calls it stale: a busy daemon
/// writes its row at least once a second and an idle one every `heartbeat`, so six missed ones is
/// a loop that stopped, not a slow write.
const MISSED_HEARTBEATS: u32 = 6;

/// The limits a verdict is judged by.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// A heartbeat older than this is stale.
    pub max_age: Duration,
    /// A due task waiting longer than this while a worker is free is a stall.
    pub max_queue_age: Duration,
}

impl Thresholds {
    /// The `health` defaults: six heartbeats, and a minute.
    pub fn defaults(config: &Config) -> Thresholds {
        Thresholds {
            max_age: config.heartbeat * MISSED_HEARTBEATS,
            max_queue_age: Duration::from_mins(1),
        }
    }
}

/// What the PID file's lock says.
#[derive(Debug, Clone, PartialEq)]
pub enum Lock {
    /// A daemon holds it; `since` is when it wrote its pid there (the file's mtime).
    Held {
        pid: Option<u32>,
        since: Option<f64>,
    },
    /// Nobody holds it: no daemon runs with this PID file.
    Free,
    /// The file is missing or unreadable (another container, another user): the heartbeat row
    /// has to tell.
    Unknown { why: String },
}

impl Lock {
    pub fn read(pid_file: Option<&Path>) -> Lock {
        let Some(pid_file) = pid_file else {
            // Daemons that share a database server have no lock file: their rows say.
            return Lock::Unknown {
                why: "no PID file (the daemons share the database)".to_owned(),
            };
        };
        let since = match std::fs::metadata(pid_file) {
            Ok(meta) => meta.modified().ok().map(unix_seconds),
            // No daemon ever ran with this PID file here: if one runs elsewhere, its row says so.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Lock::Unknown {
                    why: format!("no PID file at {}", pid_file.display()),
                };
            }
            Err(e) => {
                return Lock::Unknown {
                    why: format!("pid file {}: {e}", pid_file.display()),
                };
            }
        };
        match DaemonState::probe(pid_file) {
            Ok(DaemonState::Running { pid }) => Lock::Held { pid, since },
            Ok(DaemonState::NotRunning) => Lock::Free,
            Err(e) => Lock::Unknown { why: e.to_string() },
        }
    }
}

/// How the daemon's state was learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckedBy {
    /// The PID file's lock: authoritative.
    Lock,
    /// The heartbeat row alone, since the PID file could not be read.
    Heartbeat,
}

impl CheckedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckedBy::Lock => "lock",
            CheckedBy::Heartbeat => "heartbeat",
        }
    }
}

/// The daemon as the operator commands see it.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonView {
    pub running: bool,
    pub checked_by: CheckedBy,
    pub pid: Option<i64>,
    /// The heartbeat row: the running daemon's when `current`, else the last daemon's (or a
    /// predecessor's, while a new daemon has not registered yet).
    pub row: Option<DaemonRow>,
    /// `row` is the running daemon's own.
    pub current: bool,
    /// When the running daemon took the lock (from the PID file's mtime).
    pub lock_since: Option<f64>,
    /// Why the lock could not say (`CheckedBy::Heartbeat`).
    pub lock_note: Option<String>,
    /// The row's process is gone (or its pid now names another process) on this host.
    pub process_gone: bool,
}

impl DaemonView {
    /// Combines the lock with the row. `start_of(pid)` is the process's start time in /proc, if
    /// it can be read here; `host` is this machine's name. With the lock readable, the lock
    /// decides; without it, a row that is not stopped and whose heartbeat is younger than
    /// `max_age` means up.
    pub fn observe(
        lock: Lock,
        row: Option<DaemonRow>,
        host: &str,
        start_of: impl Fn(i64) -> Option<i64>,
        max_age: f64,
        now: f64,
    ) -> DaemonView {
        // On this host, /proc says whether the row's process still lives: no process with its pid,
        // or one that started at another time. That only names the reason a daemon is down; a
        // fresh heartbeat wins over it, since another pid namespace (a sidecar container) or
        // hidepid can hide a live daemon from /proc just as well.
        let process_gone = row.as_ref().is_some_and(|row| {
            row.stopped_at.is_none()
                && !host.is_empty()
                && row.host == host
                && row
                    .pid_start
                    .is_some_and(|started| start_of(row.pid).is_none_or(|s| s != started))
        });
        match lock {
            Lock::Free => DaemonView {
                running: false,
                checked_by: CheckedBy::Lock,
                pid: None,
                row,
                current: false,
                lock_since: None,
                lock_note: None,
                process_gone,
            },
            Lock::Held { pid, since } => {
                // The row is the lock holder's if it names the same pid and was written after
                // the lock was taken: in a container the daemon is pid 1 at every start, so the
                // pid alone cannot tell a predecessor's row from its own.
                let current = row.as_ref().is_some_and(|row| {
                    row.stopped_at.is_none()
                        && pid.is_none_or(|pid| i64::from(pid) == row.pid)
                        && since.is_none_or(|since| row.started_at >= since - LOCK_CLOCK_SLACK)
                });
                DaemonView {
                    running: true,
                    checked_by: CheckedBy::Lock,
                    pid: pid
                        .map(i64::from)
                        .or(row.as_ref().filter(|_| current).map(|r| r.pid)),
                    row,
                    current,
                    lock_since: since,
                    lock_note: None,
                    process_gone: false,
                }
            }
            Lock::Unknown { why } => {
                let alive = row.as_ref().is_some_and(|row| {
                    row.stopped_at.is_none() && now - row.heartbeat_at <= max_age
                });
                DaemonView {
                    running: alive,
                    checked_by: CheckedBy::Heartbeat,
                    pid: row.as_ref().filter(|_| alive).map(|r| r.pid),
                    current: alive,
                    row,
                    lock_since: None,
                    lock_note: Some(why),
                    process_gone,
                }
            }
        }
    }

    /// The running daemon's row.
    pub fn current_row(&self) -> Option<&DaemonRow> {
        self.row.as_ref().filter(|_| self.current)
    }

    pub fn heartbeat_age(&self, now: f64) -> Option<f64> {
        self.current_row()
            .map(|row| (now - row.heartbeat_at).max(0.0))
    }

    pub fn uptime(&self, now: f64) -> Option<f64> {
        self.current_row()
            .map(|row| row.started_at)
            .or(self.lock_since.filter(|_| self.running))
            .map(|since| (now - since).max(0.0))
    }

    /// Worker slots and how many are busy, while the daemon runs and has said how many it has.
    /// Of a daemon that shares its database, only its own attempts count.
    pub fn workers(&self, running: &[RunningAttempt]) -> Option<(i64, i64)> {
        let row = self.current_row()?;
        let busy = running
            .iter()
            .filter(|r| r.daemon_id.is_none_or(|id| id == row.id))
            .count();
        Some((row.workers, i64::try_from(busy).unwrap_or(i64::MAX)))
    }
}

/// The PID file's mtime has the file system's granularity and the row's `started_at` the clock's:
/// a second of slack keeps a daemon's own row from looking older than its lock.
const LOCK_CLOCK_SLACK: f64 = 1.0;

/// What every operator command reads: the daemon, its running set, the paused task names and the
/// oldest due row that is not paused, in one snapshot; all index lookups. On PostgreSQL, where
/// several daemons share the queue, `daemon` is the one on this host (the worst of them, if
/// several run here) and `daemons` all of them.
#[derive(Debug, Clone)]
pub struct Observation {
    /// The database's clock (PostgreSQL: the server's, not this host's).
    pub now: f64,
    pub daemon: DaemonView,
    /// Every daemon row the store shows: SQLite's one; on PostgreSQL every daemon that runs and
    /// those that ended lately, newest first.
    pub daemons: Vec<DaemonRow>,
    /// Whether the daemons share the database (PostgreSQL): then `daemon` is only this host's.
    pub shared: bool,
    pub running: Vec<RunningAttempt>,
    pub oldest_due: Option<DueRow>,
    pub paused: Vec<PausedName>,
}

/// Due rows looked at per priority for the oldest one that is not paused: the pop's lookahead.
const PAUSED_LOOKAHEAD: usize = 64;

/// Whether `name` is held back by one of the `paused` names (or by `pause --all`).
pub fn is_paused(paused: &[PausedName], name: &str) -> bool {
    paused
        .iter()
        .any(|p| p.task_name.as_deref().is_none_or(|n| n == name))
}

impl Observation {
    /// The daemons that run, as their rows say: not stopped or recovered, and a heartbeat younger
    /// than `max_age`.
    pub fn live(&self, max_age: f64) -> impl Iterator<Item = &DaemonRow> {
        let now = self.now;
        self.daemons
            .iter()
            .filter(move |row| row.is_open() && now - row.heartbeat_at <= max_age)
    }

    /// The attempts daemon `id` is running.
    pub fn busy(&self, id: i64) -> i64 {
        let n = self
            .running
            .iter()
            .filter(|r| r.daemon_id == Some(id))
            .count();
        i64::try_from(n).unwrap_or(i64::MAX)
    }
}

/// What a daemon's row says of it: `up`, `stale` (its heartbeat is older than `max_age`),
/// `stopping`, `stopped` (cleanly) or `recovered` (another daemon took back its work).
pub fn daemon_state(row: &DaemonRow, now: f64, max_age: f64) -> &'static str {
    if row.recovered_at.is_some() {
        "recovered"
    } else if row.stopped_at.is_some() {
        "stopped"
    } else if now - row.heartbeat_at > max_age {
        "stale"
    } else if row.stopping_at.is_some() {
        "stopping"
    } else {
        "up"
    }
}

/// The row of the daemon on `host` among the shared database's `rows`: of those that run, the
/// one whose heartbeat is oldest (health answers for the worst); else the newest that ran here.
fn row_on_host(rows: &[DaemonRow], host: &str) -> Option<DaemonRow> {
    let here = rows.iter().filter(|row| row.host == host);
    here.clone()
        .filter(|row| row.is_open())
        .min_by(|a, b| a.heartbeat_at.total_cmp(&b.heartbeat_at))
        .or_else(|| here.max_by(|a, b| a.started_at.total_cmp(&b.started_at)))
        .cloned()
}

impl Observation {
    /// Reads the observation and, in the same snapshot, whatever `more` reads (given the time,
    /// the daemons' rows and the paused names).
    pub fn read_with<T>(
        store: &Store,
        config: &Config,
        max_age: Duration,
        more: impl FnOnce(&Store, f64, &[DaemonRow], &[PausedName]) -> crate::Result<T>,
    ) -> crate::Result<(Observation, T)> {
        // The lock first: a daemon that starts after it was read only makes the row look newer.
        let lock = Lock::read(config.pid_file.as_deref());
        let now = store.now();
        let shared = !store.follows_host_clock();
        let host = hostname();
        let (rows, running, oldest_due, paused, more) = store.snapshot(|q| {
            let rows = q.daemon_rows()?;
            let paused = q.control()?.paused;
            let more = more(q, now, &rows, &paused)?;
            // A paused task waits on purpose: it is nobody's oldest due task.
            let oldest_due = if paused.is_empty() {
                q.oldest_due(now)?
            } else {
                q.first_waiting(now, PAUSED_LOOKAHEAD, |due| {
                    !is_paused(&paused, &due.task_name)
                })?
            };
            Ok((rows, q.running_attempts()?, oldest_due, paused, more))
        })?;
        let row = if shared {
            row_on_host(&rows, &host)
        } else {
            rows.first().cloned()
        };
        let start_of = |pid: i64| {
            u32::try_from(pid)
                .ok()
                .and_then(process_start)
                .and_then(|s| i64::try_from(s).ok())
        };
        let daemon = DaemonView::observe(lock, row, &host, start_of, max_age.as_secs_f64(), now);
        Ok((
            Observation {
                now,
                daemon,
                daemons: rows,
                shared,
                running,
                oldest_due,
                paused,
            },
            more,
        ))
    }
}

/// Opens the database read-only and checks its schema: the operator commands never write.
pub fn open(config: &Config) -> crate::Result<Store> {
    Store::open_checked(&config.db, Access::ReadOnly)
}

/// This machine's name, as the daemon records it in its row; empty if it cannot be read.
fn unix_seconds(time: std::time::SystemTime) -> f64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DaemonRow;

    fn row(pid: i64, started_at: f64, heartbeat_at: f64) -> DaemonRow {
        DaemonRow {
            id: 1,
            pid,
            pid_start: Some(777),
            host: "here".to_owned(),
            version: "0.1.0".to_owned(),
            started_at,
            heartbeat_at,
            stopping_at: None,
            stopped_at: None,
            workers: 4,
            pools: Vec::new(),
            totals: std::collections::BTreeMap::new(),
            served: Vec::new(),
            recovered_at: None,
            recovered_by: None,
        }
    }

    fn observe(lock: Lock, row: Option<DaemonRow>, start: Option<i64>) -> DaemonView {
        DaemonView::observe(lock, row, "here", |_| start, 30.0, 1000.0)
    }

    #[test]
    fn the_lock_decides_when_it_can_be_read() {
        let free = observe(Lock::Free, Some(row(5, 900.0, 999.0)), Some(777));
        assert!(!free.running && !free.current && free.row.is_some());
        let held = Lock::Held {
            pid: Some(5),
            since: Some(900.5),
        };
        let up = observe(held.clone(), Some(row(5, 900.0, 999.0)), None);
        assert!(up.running && up.current, "{up:?}");
        assert_eq!(up.heartbeat_age(1000.0), Some(1.0));
        assert_eq!(up.uptime(1000.0), Some(100.0));
        // pid 1 again after a container restart: the row predates the lock.
        let restarted = observe(
            Lock::Held {
                pid: Some(1),
                since: Some(950.0),
            },
            Some(row(1, 100.0, 200.0)),
            None,
        );
        assert!(restarted.running && !restarted.current);
        assert_eq!(restarted.heartbeat_age(1000.0), None);
        assert_eq!(restarted.uptime(1000.0), Some(50.0));
        let other_pid = observe(held, Some(row(6, 950.0, 999.0)), None);
        assert!(other_pid.running && !other_pid.current);
    }

    #[test]
    fn without_the_lock_a_fresh_unstopped_heartbeat_means_up() {
        let unknown = || Lock::Unknown {
            why: "pid file x: denied".to_owned(),
        };
        let up = observe(unknown(), Some(row(5, 900.0, 990.0)), Some(777));
        assert!(up.running && up.current && up.checked_by == CheckedBy::Heartbeat);
        let stale = observe(unknown(), Some(row(5, 900.0, 900.0)), Some(777));
        assert!(!stale.running && !stale.process_gone);
        let mut stopped = row(5, 900.0, 990.0);
        stopped.stopped_at = Some(990.0);
        assert!(!observe(unknown(), Some(stopped), Some(777)).running);
        // Its pid names another process now, or none: gone, which names why it went stale.
        let reused = observe(unknown(), Some(row(5, 900.0, 900.0)), Some(778));
        assert!(!reused.running && reused.process_gone);
        let gone = observe(unknown(), Some(row(5, 900.0, 900.0)), None);
        assert!(!gone.running && gone.process_gone);
        // A fresh heartbeat wins: /proc may not show the daemon (another pid namespace).
        assert!(observe(unknown(), Some(row(5, 900.0, 990.0)), None).running);
        // On another host /proc says nothing about it.
        let mut elsewhere = row(5, 900.0, 900.0);
        elsewhere.host = "there".to_owned();
        assert!(!observe(unknown(), Some(elsewhere), None).process_gone);
        assert!(!observe(unknown(), None, None).running);
    }
}
