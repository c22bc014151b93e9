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
    /// Due rows of paused task names, set aside (`paused = 1`) until a resume.
    pub paused: usize,
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
    /// Its task name is paused: it stays queued, set aside from the pop's index until a resume.
    Pause,
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
    /// The JSON text of the value the task returned (at most `outcome::MAX_RESULT_BYTES`), if any.
    pub result: Option<String>,
    /// A command task's exit status (128 + N when a signal N killed it).
    pub exit_code: Option<i32>,
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
    /// At most one task with this key is queued or running: while one is, nothing is inserted and
    /// its id is returned instead.
    pub unique_key: Option<&'a str>,
}

/// What enqueueing one task did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The new task's id, or (not `created`) the id of the task that holds its unique key.
    pub id: i64,
    /// Whether a row was inserted: false when a task with the same unique key was queued or
    /// running.
    pub created: bool,
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
    /// Worker threads now: a reload may have changed them since the daemon registered.
    pub workers: usize,
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
    /// The JSON text of what the attempt returned, if it returned something.
    pub result: Option<String>,
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
    /// It is running (its latest attempt is `running`): the attempt is marked for abort, which
    /// the daemon running it carries out (`Control::aborts`).
    Aborting {
        task_name: String,
        attempt: i64,
    },
    /// Its latest attempt ended in this state (or it is a dead letter: `dead`).
    Finished {
        state: String,
    },
    Unknown,
}

/// What the operator asked of the daemons through the database: the paused task names and the
/// running attempts to abort. The loop caches it and reads it again on a control wake or when the
/// database changed (at most once a tick).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Control {
    pub paused: Vec<PausedName>,
    pub aborts: Vec<AbortRequest>,
}

/// A paused task name, or every task (`task_name` `None`: `foreman pause --all`).
#[derive(Debug, Clone, PartialEq)]
pub struct PausedName {
    pub task_name: Option<String>,
    /// When it was paused (Unix seconds).
    pub since: f64,
}

/// A running attempt `foreman cancel` asked to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct AbortRequest {
    pub task_id: i64,
    pub attempt: i64,
    /// Seconds between SIGTERM and SIGKILL for a process.
    pub grace: f64,
    pub requested_at: f64,
}

/// What `Store::retry` did with one task id.
#[derive(Debug, Clone, PartialEq)]
pub enum Retried {
    /// Queued again as the new task `new_id` (origin `retry of N`).
    Queued {
        task_id: i64,
        new_id: i64,
    },
    /// Not queued: the task holding its unique key, `existing_id`, is queued or running.
    Duplicate {
        task_id: i64,
        existing_id: i64,
    },
    /// It has not finished (queued, delayed, paused, leased, running, or waiting for a retry).
    NotFinished {
        task_id: i64,
        state: String,
    },
    /// Its last attempt was recorded without its args (by a daemon of schema version 3 or older).
    NoArgs {
        task_id: i64,
    },
    Unknown {
        task_id: i64,
    },
}

/// Which tasks `Store::list` returns. States: `due`, `later`, `paused`, `leased` (rows of
/// `foreman_task`), `running` (running attempts), and the history states `done`, `failed`,
/// `timeout`, `lost`, `cancelled` (the task's latest attempt) and `dead` (dead letters).
#[derive(Debug, Clone, Default)]
pub struct ListQuery<'a> {
    /// Empty: the live tasks (everything queued, and the running attempts of at-most-once tasks).
    pub states: Vec<&'a str>,
    pub task: Option<&'a str>,
    pub priority: Option<i64>,
    /// Text that args or kwargs must contain (as stored: JSON text).
    pub search: Option<&'a str>,
    /// Newest (highest id) first; else oldest first.
    pub newest_first: bool,
    /// Keyset paging: only ids below this one (newest first) or above it (oldest first).
    pub after: Option<i64>,
    pub limit: usize,
    /// What `due` and `later` are judged by.
    pub now: f64,
}

/// Every state `list` knows, with `queued` (due, later and paused) as a shorthand.
pub const LIST_STATES: [&str; 12] = [
    "queued",
    "due",
    "later",
    "paused",
    "leased",
    "running",
    "done",
    "failed",
    "timeout",
    "lost",
    "cancelled",
    "dead",
];

impl ListQuery<'_> {
    /// The states a query asks for, shorthands expanded; `None` for the default (the live tasks).
    /// Both backends read the query this way.
    pub fn wanted_states(&self) -> crate::error::Result<Option<Vec<&'static str>>> {
        let q = self;
        if q.states.is_empty() {
            return Ok(None);
        }
        let mut states = Vec::new();
        for state in &q.states {
            let Some(known) = LIST_STATES.iter().find(|s| *s == state) else {
                return Err(crate::error::Error::Config(format!(
                    "unknown state {state:?}: one of {}",
                    LIST_STATES.join(", ")
                )));
            };
            let expanded: &[&'static str] = if *known == "queued" {
                &["due", "later", "paused"]
            } else {
                std::slice::from_ref(known)
            };
            for state in expanded {
                if !states.contains(state) {
                    states.push(*state);
                }
            }
        }
        Ok(Some(states))
    }
}

/// One task as `foreman list` shows it. Text columns are as stored, read lossily.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedTask {
    pub id: i64,
    pub task_name: String,
    pub state: String,
    pub args: Option<String>,
    pub kwargs: Option<String>,
    pub priority: i64,
    pub run_after: Option<f64>,
    pub attempt: i64,
    pub created_at: Option<f64>,
    pub origin: Option<String>,
    pub unique_key: Option<String>,
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
    /// The attempt's error, or the dead letter's reason.
    pub error: Option<String>,
}

/// One task's whole story, for `foreman show`.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskStory {
    pub task_id: i64,
    /// Its row in `foreman_task`, while it is queued (or leased).
    pub queued: Option<ListedTask>,
    /// Its dead letter, if it died.
    pub dead: Option<DeadLetter>,
    /// Every attempt recorded, first to last.
    pub attempts: Vec<AttemptRecord>,
    /// Since when its task name (or every task) is paused, if it is.
    pub paused_since: Option<f64>,
}

/// A row of `foreman_run`.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    pub attempt: i64,
    pub task_name: String,
    pub state: String,
    pub daemon: Option<String>,
    pub enqueued_at: Option<f64>,
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
    pub error: Option<String>,
    pub retry_at: Option<f64>,
    pub exit_code: Option<i64>,
    pub result: Option<String>,
    pub args: Option<String>,
    pub kwargs: Option<String>,
    pub priority: Option<i64>,
    pub origin: Option<String>,
    pub unique_key: Option<String>,
    pub abort_requested_at: Option<f64>,
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
    pub unique_key: Option<String>,
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
    /// Left dead: the task `task_id` holds its unique key (queued or running).
    Duplicate {
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
    /// Waiting for their paused name to be resumed (the store leaves this to whoever knows the
    /// paused names: it counts them as due or delayed).
    pub paused: i64,
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

// ---- The dashboard's reads (`foreman ui`) ----

/// A page of dead letters and where the next one starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub rows: Vec<T>,
    /// The `before` of the next page; `None` when the search reached the table's start.
    pub next_before: Option<i64>,
    /// Every matching row above this id is on this page or an earlier one; set when the page is
    /// short because the search window ran out, not the rows.
    pub searched_to: Option<i64>,
}

/// A count that stops at a cap, so that counting never walks a big table: `more` means "at
/// least `count`".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CappedCount {
    pub count: i64,
    pub more: bool,
}

/// Which dead letters `Store::dead_page` and `Store::dead_ids` take.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadFilter<'a> {
    pub task: Option<&'a str>,
    /// Text that the args, the kwargs or the reason must contain.
    pub search: Option<&'a str>,
}

/// One failure's text, for grouping: a failed attempt's error or a dead letter's reason.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureText {
    pub task_name: Option<String>,
    pub text: String,
    /// When it ended or died.
    pub at: Option<f64>,
    /// From `foreman_dead` (else `foreman_run`).
    pub dead: bool,
}
