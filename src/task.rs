//! `Task`, a popped row ready to run, and what makes a task name valid. A leaf: the store decodes
//! rows into tasks, the workers run them, the config checks its names with `name_problem`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Map, Value as Json};

/// A task popped from the queue. Its row is already deleted when a handler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: i64,
    pub name: String,
    /// Always a JSON array.
    pub args: Vec<Json>,
    pub kwargs: Map<String, Json>,
    /// Unix time in seconds at which the row was inserted, if the row had a usable value.
    pub created_at: Option<f64>,
    /// Unix time before which it was not to start (its delay, or its retry's backoff).
    pub run_after: Option<f64>,
    /// 1 for the first run; retries and re-runs after a crash count up.
    pub attempt: i64,
    pub priority: i64,
    /// Who enqueued it, when it was not a producer (a schedule, a requeue).
    pub origin: Option<String>,
    /// The row was leased by an at-least-once run that never finished (its daemon died).
    pub was_leased: bool,
    /// At most one task with this key is queued or running (`enqueue --unique`).
    pub unique_key: Option<String>,
    /// Raised when `foreman cancel` aborts this attempt: see `Task::cancelled`.
    pub cancel: CancelFlag,
}

/// Whether an attempt was asked to stop. Shared between the foreman loop, which raises it, and the
/// worker running the task, which reads it; clones share one flag.
#[derive(Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn raise(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for CancelFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CancelFlag({})", self.is_raised())
    }
}

/// Flags compare by their state: two tasks are equal whether or not they share a flag.
impl PartialEq for CancelFlag {
    fn eq(&self, other: &CancelFlag) -> bool {
        self.is_raised() == other.is_raised()
    }
}

impl Task {
    /// Whether `foreman cancel` asked this attempt to stop. An in-process handler that runs for a
    /// while should check it now and then and return early (an error, e.g. `foreman::Cancelled`):
    /// the attempt is then recorded `cancelled`, and not retried. A command or pool task is
    /// stopped with signals instead (SIGTERM, then SIGKILL after the grace).
    pub fn cancelled(&self) -> bool {
        self.cancel.is_raised()
    }

    /// The one-line JSON document a command task reads on its stdin.
    pub fn to_json_line(&self) -> String {
        let doc = serde_json::json!({
            "id": self.id,
            "task_name": self.name,
            "args": self.args,
            "kwargs": self.kwargs,
        });
        let mut line = doc.to_string();
        line.push('\n');
        line
    }
}

/// The longest task name foreman runs. Names end up in every log line, history row, Sentry tag
/// and metrics label of their task: a megabyte-long one is a producer's bug, not a name.
pub const MAX_TASK_NAME_BYTES: usize = 1024;

/// Why `name` cannot be a task name (empty, too long, or holding a control character, which
/// would forge log lines and cannot go into a child's environment), in one line; `None` if it can.
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("is empty".to_owned());
    }
    if name.len() > MAX_TASK_NAME_BYTES {
        return Some(format!(
            "is {} bytes long (at most {MAX_TASK_NAME_BYTES})",
            name.len()
        ));
    }
    name.chars()
        .find(|c| c.is_control())
        .map(|c| format!("contains the control character U+{:04X}", u32::from(c)))
}
