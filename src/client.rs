//! `Client`: the producer API for Rust programs (a web app that enqueues): open a database,
//! enqueue tasks (with args, kwargs, a delay, a priority, a unique key), many in one transaction,
//! and wait for a task's result. It speaks the producer protocol of `schema.sql` through the store,
//! and wakes the daemon the way `foreman enqueue` does. Also `wait_for`, the wait that `Client::wait`
//! and `foreman wait` share.
//!
//! ```no_run
//! use std::time::Duration;
//! use foreman::{Client, TaskSpec};
//!
//! let client = Client::open("foreman.sqlite3")?;
//! let id = client.enqueue(&TaskSpec::new("app.send_email").args(("a@example.com",)))?.id;
//! let result = client.wait(id, Duration::from_secs(30))?;
//! # Ok::<(), foreman::Error>(())
//! ```

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::database::Database;
pub use crate::error::TaskError;
use crate::error::{Error, Result};
use crate::store::{Access, Enqueued, NewTask, Store, TaskProgress};

/// A producer's handle on one foreman database. It holds one connection, behind a mutex: share it
/// between threads (`Arc<Client>`), or open one per thread for more concurrent enqueues.
pub struct Client {
    store: Mutex<Store>,
    db: Database,
    wakeup_dir: Option<PathBuf>,
}

/// A task to enqueue: a name and, all optional, its args (anything that serializes to a JSON
/// array: a `Vec`, a tuple, `json!([..])`), kwargs (to a JSON object), a delay, a priority and a
/// unique key.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    name: String,
    args: std::result::Result<Value, String>,
    kwargs: std::result::Result<Value, String>,
    delay: Duration,
    priority: i64,
    unique_key: Option<String>,
}

impl TaskSpec {
    pub fn new(name: impl Into<String>) -> TaskSpec {
        TaskSpec {
            name: name.into(),
            args: Ok(Value::Array(Vec::new())),
            kwargs: Ok(Value::Object(serde_json::Map::new())),
            delay: Duration::ZERO,
            priority: 0,
            unique_key: None,
        }
    }

    /// The positional arguments: must serialize to a JSON array.
    #[must_use]
    pub fn args(mut self, args: impl Serialize) -> TaskSpec {
        self.args = serde_json::to_value(args).map_err(|e| e.to_string());
        self
    }

    /// The keyword arguments: must serialize to a JSON object.
    #[must_use]
    pub fn kwargs(mut self, kwargs: impl Serialize) -> TaskSpec {
        self.kwargs = serde_json::to_value(kwargs).map_err(|e| e.to_string());
        self
    }

    /// Not before this much time from the insert (on the database's clock).
    #[must_use]
    pub fn delay(mut self, delay: Duration) -> TaskSpec {
        self.delay = delay;
        self
    }

    /// -100 to 100, default 0: among due tasks, higher runs first.
    #[must_use]
    pub fn priority(mut self, priority: i64) -> TaskSpec {
        self.priority = priority;
        self
    }

    /// Enqueue only if no task with this key is queued or running; else the enqueue answers that
    /// task's id (`Enqueued::created` false).
    #[must_use]
    pub fn unique_key(mut self, key: impl Into<String>) -> TaskSpec {
        self.unique_key = Some(key.into());
        self
    }

    /// The columns to insert, checked as `foreman enqueue` checks them.
    fn encoded(&self) -> Result<(String, String)> {
        let bad =
            |what: &str, why: &str| Error::Config(format!("task {:?}: {what} {why}", self.name));
        if let Some(problem) = crate::task::name_problem(&self.name) {
            return Err(Error::Config(format!("task name {problem}")));
        }
        if !(-100..=100).contains(&self.priority) {
            return Err(bad("priority", "must be from -100 to 100"));
        }
        let args = match &self.args {
            Ok(args @ Value::Array(_)) => args.to_string(),
            Ok(_) => return Err(bad("args", "must serialize to a JSON array")),
            Err(e) => return Err(bad("args", &format!("cannot be serialized: {e}"))),
        };
        let kwargs = match &self.kwargs {
            Ok(kwargs @ Value::Object(_)) => kwargs.to_string(),
            Ok(_) => return Err(bad("kwargs", "must serialize to a JSON object")),
            Err(e) => return Err(bad("kwargs", &format!("cannot be serialized: {e}"))),
        };
        Ok((args, kwargs))
    }
}

impl Client {
    /// Opens the database at `db` (a SQLite file; it must exist: `foreman init` or a daemon makes
    /// it). The daemon is woken through `<db>.wakeup`, its default wakeup dir.
    pub fn open(db: impl AsRef<OsStr>) -> Result<Client> {
        let db = Database::parse(db.as_ref());
        let store = Store::open_checked(&db, Access::ReadWrite)?;
        Ok(Client {
            wakeup_dir: db.default_wakeup_dir(),
            store: Mutex::new(store),
            db,
        })
    }

    /// Wakes the daemon through this directory instead (its `wakeup_dir` setting).
    #[must_use]
    pub fn with_wakeup_dir(mut self, dir: impl Into<PathBuf>) -> Client {
        self.wakeup_dir = Some(dir.into());
        self
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        // A panic while the lock was held left no transaction open: the store's writes roll back.
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Enqueues one task in its own transaction and wakes the daemon. With a unique key held by a
    /// queued or running task, nothing is inserted and that task's id is answered.
    pub fn enqueue(&self, task: &TaskSpec) -> Result<Enqueued> {
        let (args, kwargs) = task.encoded()?;
        let enqueued = self.store().enqueue_task(&NewTask {
            name: &task.name,
            args: &args,
            kwargs: &kwargs,
            delay: task.delay.as_secs_f64(),
            priority: task.priority,
            origin: None,
            unique_key: task.unique_key.as_deref(),
        })?;
        if enqueued.created {
            self.wake(&format!("task {} enqueued", enqueued.id));
        }
        Ok(enqueued)
    }

    /// Enqueues every task in one transaction (all or none), in order, and wakes the daemon once.
    pub fn enqueue_many(&self, tasks: &[TaskSpec]) -> Result<Vec<Enqueued>> {
        let encoded = tasks
            .iter()
            .map(TaskSpec::encoded)
            .collect::<Result<Vec<_>>>()?;
        let rows: Vec<NewTask<'_>> = tasks
            .iter()
            .zip(&encoded)
            .map(|(task, (args, kwargs))| NewTask {
                name: &task.name,
                args,
                kwargs,
                delay: task.delay.as_secs_f64(),
                priority: task.priority,
                origin: None,
                unique_key: task.unique_key.as_deref(),
            })
            .collect();
        let enqueued = self.store().enqueue_many(&rows)?;
        if enqueued.iter().any(|e| e.created) {
            self.wake(&format!("{} task(s) enqueued", enqueued.len()));
        }
        Ok(enqueued)
    }

    /// Waits up to `timeout` for task `id`'s outcome, across its retries: its result (`None` if
    /// it returned none) when it is done, else `Error::Task` saying why not.
    pub fn wait(&self, id: i64, timeout: Duration) -> Result<Option<Value>> {
        let store = self.store();
        let progress = wait_for(&store, id, timeout)?;
        let Some(progress) = progress else {
            return Err(Error::Task(TaskError::Unknown { task_id: id }));
        };
        if progress.succeeded() {
            return Ok(progress
                .result
                .as_deref()
                .map(|text| serde_json::from_str(text).unwrap_or(Value::String(text.to_owned()))));
        }
        Err(Error::Task(if progress.is_final {
            TaskError::Failed {
                task_id: id,
                state: progress.state,
                attempt: progress.attempt,
                error: progress.error,
            }
        } else {
            TaskError::StillWaiting {
                task_id: id,
                state: progress.state,
            }
        }))
    }

    fn wake(&self, done: &str) {
        crate::wake::poke_dir(self.wakeup_dir.as_deref(), done);
    }

    /// The database this client writes.
    pub fn database(&self) -> &Database {
        &self.db
    }
}

/// How long `wait_for` goes without looking at the database when it sees no change: a missed
/// inotify event, or a watch that could not be set up, costs at most this.
const WAIT_FALLBACK: Duration = Duration::from_secs(1);
/// The least time between two looks: a task's commits come in bursts (its pop, its end, other
/// tasks' commits meanwhile), and one look per burst is enough.
const WAIT_MIN_GAP: Duration = Duration::from_millis(5);

/// Waits up to `timeout` for task `id` to have an outcome (`is_final`); returns where it stands
/// then (final or not), or `None` for an unknown id. It watches the database for commits, so an
/// answer comes as soon as the task ends, and looks on a timer too.
pub fn wait_for(store: &Store, id: i64, timeout: Duration) -> Result<Option<TaskProgress>> {
    // Set up before the first look, so that a commit between the two is not missed.
    let watch = store.watch();
    let deadline = Instant::now().checked_add(timeout);
    loop {
        let looked_at = Instant::now();
        let Some(progress) = store.task_progress(id)? else {
            return Ok(None);
        };
        if progress.is_final {
            return Ok(Some(progress));
        }
        let remaining = deadline.map_or(WAIT_FALLBACK, |deadline| {
            deadline.saturating_duration_since(Instant::now())
        });
        if remaining.is_zero() {
            return Ok(Some(progress));
        }
        log::debug!(
            "task {id} {} (attempt {}); waiting for a change",
            progress.state,
            progress.attempt
        );
        // A change seen during the gap is kept, not dropped: a commit's last write to the -wal can
        // come just before the commit is visible, so the look after the gap may still miss it,
        // and only the kept change brings the next look.
        watch.changed_within(remaining.min(WAIT_FALLBACK));
        std::thread::sleep(WAIT_MIN_GAP.saturating_sub(looked_at.elapsed()));
    }
}
