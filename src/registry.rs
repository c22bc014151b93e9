//! `Registry`: which task names foreman can run and how (in-process Rust closure or a command per
//! task). Built-in `foreman.*` tasks are in every registry. It only maps names; running is the pool's.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ffi::OsString;
use std::fs::File;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{Config, RESERVED_PREFIX, Runner};
use crate::error::{Error, Result};
use crate::task::Task;

/// What an in-process handler returns: `Err` marks the task failed, with that message.
pub type TaskResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// What an in-process handler registered with `Registry::register_with_result` returns: `Ok` with
/// the task's result (kept with its attempt, given to `foreman wait`; `null` is none), or `Err`
/// as for `TaskResult`.
pub type ValueResult =
    std::result::Result<serde_json::Value, Box<dyn std::error::Error + Send + Sync>>;

/// Every in-process handler, as the workers call it: a result or none.
pub(crate) type HandlerOutput =
    std::result::Result<Option<serde_json::Value>, Box<dyn std::error::Error + Send + Sync>>;

type HandlerFn = dyn Fn(&Task) -> HandlerOutput + Send + Sync;

#[derive(Clone)]
pub enum Handler {
    InProcess(Arc<HandlerFn>),
    /// A process spawned per task.
    Command {
        command: Arc<CommandSpec>,
        timeout: Option<Duration>,
    },
    /// A persistent process of the pool (the `ProcessPool`) with this id.
    Pool {
        pool: usize,
        timeout: Option<Duration>,
    },
}

/// A command task's process, ready to start: its argv, the directory it runs in, and what it
/// adds to the daemon's environment (`FOREMAN_DB` and the rest of `Config::launch_env`).
pub struct CommandSpec {
    pub argv: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub env: Vec<(String, OsString)>,
}

#[derive(Clone)]
pub struct Registry {
    handlers: HashMap<String, Handler>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// A registry holding the built-in tasks: `foreman.echo` logs its args and kwargs,
    /// `foreman.sleep` sleeps `args[0]` seconds (or until `foreman cancel` aborts it),
    /// `foreman.bench` records its start for `foreman bench`.
    pub fn new() -> Self {
        let mut registry = Registry {
            handlers: HashMap::new(),
        };
        registry.insert(
            "foreman.echo",
            Handler::InProcess(Arc::new(|task: &Task| echo(task).map(|()| None))),
        );
        registry.insert(
            "foreman.sleep",
            Handler::InProcess(Arc::new(|task: &Task| sleep(task).map(|()| None))),
        );
        let out = BenchOut::default();
        registry.insert(
            "foreman.bench",
            Handler::InProcess(Arc::new(move |task: &Task| {
                out.record(task.id).map(|()| None)
            })),
        );
        registry
    }

    /// Adds (or replaces) an in-process handler. Handlers run on the worker threads, so they
    /// must be `Send + Sync`; a panic fails the task and frees the slot. A handler that runs for
    /// long should check `task.cancelled()` now and then (see `Task::cancelled`).
    #[must_use]
    pub fn register<F>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(&Task) -> TaskResult + Send + Sync + 'static,
    {
        self.insert(
            name,
            Handler::InProcess(Arc::new(move |task: &Task| handler(task).map(|()| None))),
        );
        self
    }

    /// Adds (or replaces) an in-process handler that returns a result: a JSON value kept with
    /// the attempt (at most 64 KiB as JSON; a larger one fails the attempt) and given to whoever
    /// waits for the task (`foreman wait --json`, `Client::wait`). `Value::Null` is no result.
    /// To say "uneventful" to an adaptive schedule, return `Err(Uneventful)` (no result then).
    #[must_use]
    pub fn register_with_result<F>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(&Task) -> ValueResult + Send + Sync + 'static,
    {
        self.insert(
            name,
            Handler::InProcess(Arc::new(move |task: &Task| handler(task).map(Some))),
        );
        self
    }

    fn insert(&mut self, name: &str, handler: Handler) {
        self.handlers.insert(name.to_owned(), handler);
    }

    /// Adds the tasks of the config (command and pool tasks); a name already served in-process is
    /// a config error. Its pools are the `ProcessPool`s with ids `first_pool_id`.. in the
    /// config's order.
    pub fn add_config(&mut self, config: &Config, first_pool_id: usize) -> Result<()> {
        for (name, task) in &config.tasks {
            if name.starts_with(RESERVED_PREFIX) {
                return Err(Error::Config(format!(
                    "task {name:?}: names starting with \"foreman.\" are reserved"
                )));
            }
            match self.handlers.entry(name.clone()) {
                // Settings (retries, delivery) for an in-process handler.
                Entry::Occupied(_) if task.runner.is_none() => {}
                Entry::Occupied(_) => {
                    return Err(Error::Config(format!(
                        "task {name:?} is defined both in the config file and as an in-process handler"
                    )));
                }
                Entry::Vacant(slot) => {
                    let timeout = task.timeout;
                    slot.insert(match &task.runner {
                        Some(Runner::Command(launch)) => Handler::Command {
                            command: Arc::new(CommandSpec {
                                argv: launch.argv.clone(),
                                cwd: launch.cwd.clone(),
                                env: config.launch_env(launch),
                            }),
                            timeout,
                        },
                        Some(Runner::Pool(pool)) => Handler::Pool {
                            pool: first_pool_id
                                + config.pools.keys().position(|p| p == pool).ok_or_else(|| {
                                    Error::Config(format!("task {name:?}: no pool {pool:?}"))
                                })?,
                            timeout,
                        },
                        // Settings only: a pool's hello may announce it.
                        None if !config.pools.is_empty() => continue,
                        None => {
                            return Err(config.key_error(
                                &format!("tasks.\"{name}\""),
                                "has no `command` or `pool`, and no in-process handler or pool serves it",
                            ));
                        }
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks that every schedule names a task something serves (when pools are configured, their
    /// hello may announce it later, so this cannot be known before they start).
    pub fn check_schedules(&self, config: &Config) -> Result<()> {
        if !config.pools.is_empty() {
            return Ok(());
        }
        for (name, schedule) in &config.schedules {
            if self.get(&schedule.task).is_none() {
                return Err(config.key_error(
                    &format!("schedules.\"{name}\".task"),
                    &format!(
                        "names task {:?}, which no config section or in-process handler serves",
                        schedule.task
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Routes the names a pool's worker said it serves to that pool, unless they already run
    /// another way; returns those names, which stay where they are.
    pub fn add_pool_tasks<'n>(
        &mut self,
        pool: usize,
        names: impl IntoIterator<Item = &'n String>,
        config: &Config,
    ) -> Vec<&'n str> {
        let mut elsewhere = Vec::new();
        for name in names {
            match self.handlers.entry(name.clone()) {
                Entry::Occupied(existing) => {
                    if !matches!(existing.get(), Handler::Pool { pool: p, .. } if *p == pool) {
                        elsewhere.push(name.as_str());
                    }
                }
                Entry::Vacant(slot) => {
                    // A `[tasks."NAME"]` section without a runner may still give a timeout.
                    let timeout = config.tasks.get(name).and_then(|t| t.timeout);
                    slot.insert(Handler::Pool { pool, timeout });
                }
            }
        }
        elsewhere
    }

    /// Routes what went to pool `from` to pool `to` instead (a replacement that could not start
    /// gives its tasks back to the generation it was to replace).
    pub fn repoint_pool(&mut self, from: usize, to: usize) {
        for handler in self.handlers.values_mut() {
            if let Handler::Pool { pool, .. } = handler
                && *pool == from
            {
                *pool = to;
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&Handler> {
        self.handlers.get(name)
    }

    /// Every task name with how it runs, in no particular order.
    pub fn handlers(&self) -> impl Iterator<Item = (&str, &Handler)> {
        self.handlers.iter().map(|(name, h)| (name.as_str(), h))
    }

    /// Task names, sorted, for the startup log line.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

#[allow(clippy::unnecessary_wraps)] // The handler signature is fixed.
fn echo(task: &Task) -> TaskResult {
    log::info!(
        "task {} foreman.echo: args={} kwargs={}",
        task.id,
        serde_json::Value::from(task.args.clone()),
        serde_json::Value::from(task.kwargs.clone())
    );
    Ok(())
}

fn sleep(task: &Task) -> TaskResult {
    let seconds = task
        .args
        .first()
        .and_then(serde_json::Value::as_f64)
        .ok_or("foreman.sleep expects args [seconds]")?;
    let duration = Duration::try_from_secs_f64(seconds)
        .map_err(|_| format!("foreman.sleep: bad duration {seconds}"))?;
    // In slices, so that `foreman cancel` stops it within one.
    let until = std::time::Instant::now() + duration;
    loop {
        if task.cancelled() {
            return Err(Box::new(crate::outcome::Cancelled));
        }
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}

/// The environment variable naming the file `foreman.bench` appends its start records to.
pub const BENCH_OUT_ENV: &str = "FOREMAN_BENCH_OUT";

/// `foreman.bench`'s record file, opened by the first task that runs and then shared by every
/// worker thread (one registry, one file). It holds the error instead when the file cannot be
/// opened, so that every task fails with the same message and none retries the open.
#[derive(Default)]
struct BenchOut {
    file: OnceLock<std::result::Result<File, String>>,
}

impl BenchOut {
    /// Appends `"<task id> <unix time, µs>\n"`: the task's own proof that it started, which
    /// `foreman bench` counts. It runs at 150,000+ tasks/s, so it takes the time first, formats
    /// into a stack buffer and makes exactly one `write(2)`: with `O_APPEND` a line is never split
    /// or interleaved with another worker's.
    fn record(&self, id: i64) -> TaskResult {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| format!("foreman.bench: the clock is before 1970: {e}"))?;
        let file = self
            .file
            .get_or_init(open_bench_out)
            .as_ref()
            .map_err(Clone::clone)?;
        // Longest line: 20 (i64) + 1 + 20 (u64) + 1 + 6 + 1 = 49 bytes.
        let mut line = [0u8; 64];
        let mut cursor = std::io::Cursor::new(&mut line[..]);
        writeln!(cursor, "{id} {}.{:06}", now.as_secs(), now.subsec_micros())
            .map_err(|e| format!("foreman.bench: formatting the record: {e}"))?;
        // At most 64, the buffer's length.
        let len = cursor.position() as usize;
        let written = (&*file)
            .write(&line[..len])
            .map_err(|e| format!("foreman.bench: writing to ${BENCH_OUT_ENV}: {e}"))?;
        if written != len {
            return Err(format!(
                "foreman.bench: short write to ${BENCH_OUT_ENV} ({written} of {len} bytes)"
            )
            .into());
        }
        Ok(())
    }
}

fn open_bench_out() -> std::result::Result<File, String> {
    let Some(path) = std::env::var_os(BENCH_OUT_ENV) else {
        return Err(format!(
            "foreman.bench records its start in the file named by ${BENCH_OUT_ENV}, which is not \
             set in the daemon's environment (the task is for `foreman bench`)"
        ));
    };
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .map_err(|e| {
            format!(
                "foreman.bench: cannot open ${BENCH_OUT_ENV} {}: {e}",
                std::path::Path::new(&path).display()
            )
        })
}
