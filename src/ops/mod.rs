//! The operator's commands `status`, `stats`, `health` and `metrics`: what they make of the rows
//! the daemon publishes (read through `queue::report`), the PID file's lock and /proc — up or down,
//! a stale heartbeat, a stalled queue — and how they print it: aligned text with colour only on a
//! terminal, one JSON document, or the Prometheus text format. It never writes the database and
//! never talks to the daemon process, so it works from another container sharing the volume.

use std::path::Path;
use std::time::Duration;

use crate::config::Config;
use crate::pid_guard::DaemonState;
use crate::queue::report::{DaemonRow, DueRow, RunningAttempt};
use crate::queue::{Access, Queue};
use crate::sys::{hostname, process_start};

pub mod health;
pub mod metrics;
pub mod stats;
pub mod status;

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
    pub fn read(pid_file: &Path) -> Lock {
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
    pub fn workers(&self, running: &[RunningAttempt]) -> Option<(i64, i64)> {
        let row = self.current_row()?;
        Some((
            row.workers,
            i64::try_from(running.len()).unwrap_or(i64::MAX),
        ))
    }
}

/// The PID file's mtime has the file system's granularity and the row's `started_at` the clock's:
/// a second of slack keeps a daemon's own row from looking older than its lock.
const LOCK_CLOCK_SLACK: f64 = 1.0;

/// What every operator command reads: the daemon, its running set and the oldest due row, in one
/// snapshot; all index lookups.
#[derive(Debug, Clone)]
pub struct Observation {
    pub now: f64,
    pub daemon: DaemonView,
    pub running: Vec<RunningAttempt>,
    pub oldest_due: Option<DueRow>,
}

impl Observation {
    /// Reads the observation and, in the same snapshot, whatever `more` reads (given the time and
    /// the daemon row).
    pub fn read_with<T>(
        queue: &Queue,
        config: &Config,
        max_age: Duration,
        more: impl FnOnce(&Queue, f64, Option<&DaemonRow>) -> crate::Result<T>,
    ) -> crate::Result<(Observation, T)> {
        // The lock first: a daemon that starts after it was read only makes the row look newer.
        let lock = Lock::read(&config.pid_file);
        let now = crate::clock::unix_now();
        let (row, running, oldest_due, more) = queue.snapshot(|q| {
            let row = q.daemon_row()?;
            let more = more(q, now, row.as_ref())?;
            Ok((row, q.running_attempts()?, q.oldest_due(now)?, more))
        })?;
        let start_of = |pid: i64| {
            u32::try_from(pid)
                .ok()
                .and_then(process_start)
                .and_then(|s| i64::try_from(s).ok())
        };
        let daemon =
            DaemonView::observe(lock, row, &hostname(), start_of, max_age.as_secs_f64(), now);
        Ok((
            Observation {
                now,
                daemon,
                running,
                oldest_due,
            },
            more,
        ))
    }
}

/// Opens the database read-only and checks its schema: the operator commands never write.
pub fn open(config: &Config) -> crate::Result<Queue> {
    let queue = Queue::open(&config.db, Access::ReadOnly)?;
    queue.check_schema()?;
    Ok(queue)
}

/// This machine's name, as the daemon records it in its row; empty if it cannot be read.
fn unix_seconds(time: std::time::SystemTime) -> f64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Whether human output may carry colour: stdout is a terminal and `NO_COLOR` is unset or empty
/// (no-color.org).
pub fn colour_wanted() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// ANSI colour for the human forms, or none.
#[derive(Debug, Clone, Copy, Default)]
pub struct Style {
    pub colour: bool,
}

#[derive(Debug, Clone, Copy)]
pub enum Paint {
    Bold,
    Dim,
    Red,
    Green,
    Yellow,
}

impl Style {
    /// `text` wrapped in the colour's codes; pad it first, since the codes have no width.
    pub fn paint(self, paint: Paint, text: &str) -> String {
        if !self.colour {
            return text.to_owned();
        }
        let code = match paint {
            Paint::Bold => "1",
            Paint::Dim => "2",
            Paint::Red => "31",
            Paint::Green => "32",
            Paint::Yellow => "33",
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }
}

/// An age for people: `0.8s`, `42s`, `12m 03s`, `2h 03m`, `3d 04h`.
pub fn age(seconds: f64) -> String {
    let seconds = seconds.max(0.0);
    if seconds < 10.0 {
        return format!("{seconds:.1}s");
    }
    #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
    // Non-negative, and ages fit.
    let whole = seconds as u64;
    match whole {
        0..60 => format!("{whole}s"),
        60..3600 => format!("{}m {:02}s", whole / 60, whole % 60),
        3600..86_400 => format!("{}h {:02}m", whole / 3600, whole % 3600 / 60),
        _ => format!("{}d {:02}h", whole / 86_400, whole % 86_400 / 3600),
    }
}

/// A task's wall or wait time for people: `85µs`, `120ms`, `2.30s`, then as an age.
pub fn span(seconds: f64) -> String {
    match seconds {
        s if s < 0.001 => format!("{:.0}µs", s.max(0.0) * 1e6),
        s if s < 1.0 => format!("{:.0}ms", s * 1e3),
        s if s < 10.0 => format!("{s:.2}s"),
        s => age(s),
    }
}

/// Seconds with millisecond precision: the JSON forms' unit.
pub fn rounded(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

/// `text` on one line of at most `width` characters, cut with an ellipsis.
pub fn one_line(text: &str, width: usize) -> String {
    let clean = text.chars().map(|c| if c.is_control() { ' ' } else { c });
    if text.chars().count() <= width {
        return clean.collect();
    }
    let mut cut: String = clean.take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Aligned columns under a dimmed header, each line indented by `indent`; `right[i]` right-aligns
/// column i (numbers). The last column is not padded, so lines carry no trailing spaces.
pub fn columns(
    indent: &str,
    header: &[&str],
    rows: &[Vec<String>],
    right: &[bool],
    style: Style,
) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::from(indent);
        for (i, cell) in cells.enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i > 0 {
                text.push_str("  ");
            }
            let last = i + 1 == widths.len();
            if right.get(i).copied().unwrap_or(false) {
                text.extend(std::iter::repeat_n(' ', pad));
                text.push_str(cell);
            } else {
                text.push_str(cell);
                if !last {
                    text.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
        text
    };
    let mut out = style.paint(Paint::Dim, line(&mut header.iter().copied()).trim_end());
    out.push('\n');
    for row in rows {
        out.push_str(line(&mut row.iter().map(String::as_str)).trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::report::DaemonRow;

    fn row(pid: i64, started_at: f64, heartbeat_at: f64) -> DaemonRow {
        DaemonRow {
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

    #[test]
    fn ages_and_spans_read_at_a_glance() {
        assert_eq!(age(0.84), "0.8s");
        assert_eq!(age(42.3), "42s");
        assert_eq!(age(723.0), "12m 03s");
        assert_eq!(age(7380.0), "2h 03m");
        assert_eq!(age(3.0 * 86_400.0 + 4.0 * 3600.0), "3d 04h");
        assert_eq!(age(-5.0), "0.0s");
        assert_eq!(span(0.000_085), "85µs");
        assert_eq!(span(0.12), "120ms");
        assert_eq!(span(2.3), "2.30s");
        assert_eq!(span(75.0), "1m 15s");
    }
}
