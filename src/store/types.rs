//! The store's backend-neutral words: what the loop hands it (endings, new tasks, the daemon's
//! heartbeat) and what it answers (popped tasks, dead letters, the rows behind `status`, `stats`,
//! `health`, `dead` and `wait`). Plain data; every backend reads and writes these.

use std::collections::BTreeMap;

use crate::task::Task;

/// How a command needs the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Create the file if it is missing (`init`, `run`).
    Create,
    /// It must exist (`enqueue`).
    ReadWrite,
    /// It must exist; nothing is written, so a user who may only read it can look (`status`).
    ReadOnly,
}

/// Error text kept per attempt: a traceback's end says what went wrong, so the end is kept.
pub const MAX_ERROR_BYTES: usize = 8 * 1024;

/// An attempt's error as stored: its last `MAX_ERROR_BYTES` (on a character boundary).
pub fn truncate_error(error: &str) -> std::borrow::Cow<'_, str> {
    if error.len() <= MAX_ERROR_BYTES {
        return error.into();
    }
    let mut start = error.len() - MAX_ERROR_BYTES;
    while !error.is_char_boundary(start) {
        start += 1;
    }
    format!("[…] {}", &error[start..]).into()
}

/// What one cycle may claim. The SQLite store pops in one index walk and resolves each row, so it
/// reads only `limit`; the PostgreSQL store, whose queue several daemons share, claims only the
/// names of `groups`, each group up to its own limit, so that it never takes a row it would have
/// to put back (a busy pool's, or a name only other daemons serve).
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// The most rows in all: free worker slots plus the prefetch.
    pub limit: usize,
    /// The names this daemon can run now, by what limits them, in the order they are claimed.
    pub groups: &'a [ClaimGroup],
}

impl Claim<'_> {
    /// Up to `limit` rows of any name: what the loop asks when it records endings only.
    pub fn any(limit: usize) -> Claim<'static> {
        Claim { limit, groups: &[] }
    }
}

/// Task names that share a capacity: a pool's (its free processes) or the worker threads'.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClaimGroup {
    pub names: Vec<String>,
    /// For each name (same order), the lease in seconds of an at-least-once task; 0 for an
    /// at-most-once one.
    pub leases: Vec<f64>,
    /// The most rows of these names one claim may take.
    pub limit: usize,
}

/// What one cycle transaction popped. `H` is whatever the caller's resolver gives for a task name.
#[derive(Debug)]
pub struct Popped<H> {
    /// Tasks to run, in pop order, each with what its name resolved to. Their rows are deleted
    /// (or leased), and each has a `running` row in `foreman_run`.
    pub tasks: Vec<(Task, H)>,
    /// Rows moved to `foreman_dead`.
    pub dead: Vec<Buried>,
    /// Due rows the resolver deferred: they are still queued, unchanged.
    pub deferred: usize,
    /// When the pop found fewer rows than it was allowed: when the next delayed row becomes due.
    pub next_due: Option<f64>,
}

/// A row the pop moved to `foreman_dead` instead of running it.
#[derive(Debug)]
pub struct Buried {
    pub task_id: i64,
    /// Its task name, when the row had a readable one.
    pub task_name: Option<String>,
    pub reason: String,
}

/// What the pop's resolver decides for a decoded task.
pub enum Resolved<H> {
    /// Run it; with `Some(until)` under a lease that ends then (at-least-once), else deleted.
    Run(H, Option<f64>),
    /// It cannot run: moved to `foreman_dead` with this reason.
    Dead(String),
    /// It cannot run *yet* (its pool is busy or still starting): it stays queued.
    Defer,
    /// Its expired lease is this daemon's own, still running: the lease is renewed until then.
    Hold(f64),
}

/// The states an attempt goes through in `foreman_run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Done,
    Failed,
    Timeout,
    Lost,
    Dead,
    Cancelled,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Done => "done",
            RunState::Failed => "failed",
            RunState::Timeout => "timeout",
            RunState::Lost => "lost",
            RunState::Dead => "dead",
            RunState::Cancelled => "cancelled",
        }
    }
}

/// What happens to a task after an attempt ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Nothing more: it is done, or failed with no retries configured.
    Finished,
    /// Runs again (attempt + 1, same id) not before this Unix time.
    Retry(f64),
    /// Moves to `foreman_dead` with this reason (retries ran out, or it could not run).
    Bury(String),
}

/// An attempt that ended, as the loop hands it to the next cycle to record.
#[derive(Debug)]
pub struct Ending {
    pub task: Task,
    pub state: RunState,
    pub finished_at: f64,
    pub error: Option<String>,
    pub next: Next,
    /// The task ran under a lease: its row is still in `foreman_task`.
    pub leased: bool,
}

/// A recurring task's state in `foreman_schedule`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleState {
    pub spec: String,
    pub next_due: f64,
    pub last_fired: Option<f64>,
    pub last_task_id: Option<i64>,
    pub interval: Option<f64>,
}

/// A task to insert: a producer's three columns plus the options only foreman or the CLI set.
#[derive(Debug, Default, Clone, Copy)]
pub struct NewTask<'a> {
    pub name: &'a str,
    pub args: &'a str,
    pub kwargs: &'a str,
    /// Seconds from now before it may start.
    pub delay: f64,
    pub priority: i64,
    pub origin: Option<&'a str>,
}

/// Who the running daemon is, as it registers itself at startup.
#[derive(Debug, Clone)]
pub struct DaemonInfo {
    /// The task names it serves (so far: a pool's hello adds its names at a heartbeat).
    pub served: Vec<String>,
    /// How long its heartbeat may be silent before another daemon may recover it (PostgreSQL):
    /// a few of its heartbeats.
    pub stale_after: std::time::Duration,
    pub pid: u32,
    /// Field 22 of /proc/PID/stat: with the pid, tells this process from one that reused its pid.
    pub pid_start: Option<u64>,
    pub host: String,
    pub version: String,
    pub started_at: f64,
    pub workers: usize,
}

/// What a heartbeat writes besides its time.
#[derive(Debug, Default)]
pub struct Beat<'a> {
    pub pools_json: &'a str,
    pub totals_json: &'a str,
    /// The task names the daemon serves now.
    pub served: &'a [String],
    /// The at-least-once tasks it runs, with their lease in seconds: a store whose leases other
    /// daemons could take (PostgreSQL) renews them with the heartbeat.
    pub leases: &'a [(i64, f64)],
}

/// What a heartbeat learnt besides its own row: PostgreSQL's daemons watch each other.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BeatNews {
    /// Another daemon recovered this one (its heartbeat was stale: it was cut off from the
    /// database, or stopped): its running attempts were recorded lost and its leases released.
    /// It registered again under a new id.
    pub recovered_by: Option<i64>,
    /// Stale daemons this one recovered: (daemon id, host, pid, attempts recorded lost, leases
    /// released, tasks buried).
    pub recovered: Vec<RecoveredDaemon>,
    /// Leases of running tasks that another daemon holds now.
    pub leases_lost: Vec<i64>,
}

/// A stale daemon a heartbeat recovered.
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveredDaemon {
    pub id: i64,
    pub host: String,
    pub pid: i64,
    /// Its running attempts, recorded `lost`.
    pub lost: usize,
    /// Its leases, released: those tasks run again (at-least-once).
    pub released: usize,
}

/// What firing a schedule did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fired {
    /// Its task was enqueued with this id.
    Task(i64),
    /// Another daemon fired this window first (or changed the schedule): nothing was enqueued.
    Elsewhere,
}

/// Where a task stands, as `foreman wait` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskProgress {
    pub task_id: i64,
    pub task_name: String,
    /// `queued`, `delayed` or `leased` while its row is in `foreman_task` (and not running), else
    /// the state of its latest attempt in `foreman_run` (`running`, `done`, `failed`, `timeout`,
    /// `lost`, `dead`, `cancelled`), or `dead` from `foreman_dead` when it never had an attempt.
    pub state: String,
    /// The attempt this state is about; 0 for a dead letter that never ran.
    pub attempt: i64,
    /// No further attempt will be made: `state` is the outcome.
    pub is_final: bool,
    pub error: Option<String>,
    pub enqueued_at: Option<f64>,
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
}

impl TaskProgress {
    pub fn succeeded(&self) -> bool {
        self.is_final && self.state == "done"
    }
}

/// What `Store::cancel` did with one id.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// Its row was deleted before it started; its attempt is recorded `cancelled`.
    Cancelled {
        task_name: String,
    },
    /// Leased (`leased`: an at-least-once task), or its latest attempt is running: it has started.
    Running {
        leased: bool,
    },
    /// Its latest attempt ended in this state (or it is a dead letter: `dead`).
    Finished {
        state: String,
    },
    Unknown,
}

/// A row of `foreman_dead`. Text columns are as stored, read lossily when not valid UTF-8.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub id: i64,
    pub task_id: i64,
    pub task_name: Option<String>,
    pub args: Option<String>,
    pub kwargs: Option<String>,
    pub reason: String,
    pub created_at: Option<f64>,
    pub died_at: Option<f64>,
    pub attempts: i64,
    pub priority: i64,
    pub origin: Option<String>,
}

/// The newest dead letters, and how many match in all.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadPage {
    pub total: i64,
    pub rows: Vec<DeadLetter>,
}

/// Which dead letters `Store::requeue_dead` takes.
#[derive(Debug, Clone, Copy)]
pub enum DeadSelection<'a> {
    Ids(&'a [i64]),
    /// Every dead letter, or those of one task name.
    All {
        task: Option<&'a str>,
    },
}

/// What `Store::requeue_dead` did with one dead letter.
#[derive(Debug, Clone, PartialEq)]
pub enum Requeued {
    /// Queued again as the new task `task_id`; the dead row is gone.
    Task {
        dead_id: i64,
        task_id: i64,
    },
    /// Left dead: `foreman_task.task_name` cannot be NULL.
    NoName {
        dead_id: i64,
    },
    Unknown {
        dead_id: i64,
    },
}

/// A `foreman_daemon` row: a daemon that started, and what it last published. SQLite keeps one
/// (the last daemon's); PostgreSQL one per daemon run.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonRow {
    /// Its registration's id (SQLite: always 1).
    pub id: i64,
    pub pid: i64,
    /// Field 22 of /proc/PID/stat when it started: tells it from a later process with its pid.
    pub pid_start: Option<i64>,
    pub host: String,
    pub version: String,
    pub started_at: f64,
    pub heartbeat_at: f64,
    /// Set when a shutdown signal made it stop popping.
    pub stopping_at: Option<f64>,
    /// Set when it exited cleanly.
    pub stopped_at: Option<f64>,
    /// Its worker slots: the most tasks it runs at once.
    pub workers: i64,
    pub pools: Vec<PoolRow>,
    /// Attempts that ended since it started, by task name.
    pub totals: BTreeMap<String, Totals>,
    /// The task names it claims (PostgreSQL; empty on SQLite, whose daemon serves all).
    pub served: Vec<String>,
    /// Set when another daemon recovered it (its heartbeat went stale), by that daemon's id.
    pub recovered_at: Option<f64>,
    pub recovered_by: Option<i64>,
}

impl DaemonRow {
    /// Neither stopped nor recovered: it runs, as far as its row says (its heartbeat tells
    /// whether it still does).
    pub fn is_open(&self) -> bool {
        self.stopped_at.is_none() && self.recovered_at.is_none()
    }
}

/// One element of the daemon row's `pools`. Fields a daemon did not publish are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolRow {
    pub name: String,
    pub processes: Option<u64>,
    pub up: Option<u64>,
    pub busy: Option<u64>,
    /// The task names it serves.
    pub tasks: Vec<String>,
}

impl PoolRow {
    /// Every process has a task: rows for it wait for a process, not for the daemon.
    pub fn is_saturated(&self) -> bool {
        matches!((self.busy, self.processes), (Some(busy), Some(processes)) if busy >= processes)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub done: u64,
    pub failed: u64,
}

/// An attempt recorded `running` in `foreman_run`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningAttempt {
    /// The daemon running it (`foreman_daemon.id`).
    pub daemon_id: Option<i64>,
    pub task_id: i64,
    pub attempt: i64,
    pub task_name: String,
    pub started_at: Option<f64>,
    pub enqueued_at: Option<f64>,
}

/// The queued rows of one task name, as of `now`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskDepth {
    pub task_name: String,
    /// Every row: due + delayed + leased.
    pub queued: i64,
    /// Not leased and `run_after <= now`: waiting for a worker.
    pub due: i64,
    /// Not leased and `run_after > now`: waiting for their time (a delay or a retry's backoff).
    pub delayed: i64,
    /// Leased: an at-least-once task running now.
    pub leased: i64,
    /// When the longest-waiting due row became due.
    pub oldest_due_at: Option<f64>,
    /// When the first delayed row becomes due.
    pub next_due_at: Option<f64>,
}

/// A due, unleased row, as the index walks find it.
#[derive(Debug, Clone, PartialEq)]
pub struct DueRow {
    pub task_id: i64,
    pub task_name: String,
    pub priority: i64,
    /// When it became due: its `run_after`, or its insertion if that was later (a producer may
    /// set `run_after` in the past).
    pub due_since: f64,
}

/// The daemon row's `pools`; what cannot be read is left out (a figure is not worth failing a
/// report over), and logged.
pub fn parse_pools(text: &str) -> Vec<PoolRow> {
    let Ok(serde_json::Value::Array(pools)) = serde_json::from_str(text) else {
        log::debug!("foreman_daemon.pools is not a JSON array: {text:?}");
        return Vec::new();
    };
    pools
        .iter()
        .filter_map(|pool| {
            let field = |key: &str| pool.get(key).and_then(serde_json::Value::as_u64);
            Some(PoolRow {
                name: pool.get("name")?.as_str()?.to_owned(),
                processes: field("processes"),
                up: field("up"),
                busy: field("busy"),
                tasks: pool
                    .get("tasks")
                    .and_then(serde_json::Value::as_array)
                    .map(|names| {
                        names
                            .iter()
                            .filter_map(|n| n.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// The daemon row's `totals`: `{task: {"done": n, "failed": n}}`.
pub fn parse_totals(text: &str) -> BTreeMap<String, Totals> {
    let Ok(serde_json::Value::Object(totals)) = serde_json::from_str(text) else {
        log::debug!("foreman_daemon.totals is not a JSON object: {text:?}");
        return BTreeMap::new();
    };
    totals
        .iter()
        .map(|(name, counts)| {
            let field = |key: &str| {
                counts
                    .get(key)
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0)
            };
            (
                name.clone(),
                Totals {
                    done: field("done"),
                    failed: field("failed"),
                },
            )
        })
        .collect()
}
