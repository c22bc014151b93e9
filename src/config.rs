//! The effective configuration: `foreman.toml`, then `FOREMAN_*` env and flags on top (flag wins),
//! validated once at startup. Owns the defaults; nothing else invents one.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::database::Database;
use crate::duration::{format_duration, in_range, parse_duration};
use crate::error::{Error, Result};

pub const DEFAULT_DB: &str = "foreman.sqlite3";
pub const DEFAULT_CONFIG: &str = "foreman.toml";
pub const DEFAULT_WORKERS: usize = 4;
pub const DEFAULT_GRACEFUL_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_TICK: Duration = Duration::from_secs(1);
/// Python importing a large app can take seconds; a hello later than this means something is wrong.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `foreman_run` keeps an attempt's record.
pub const DEFAULT_HISTORY_RETENTION: Duration = Duration::from_hours(168);
/// How long `foreman_stat` keeps its per-minute rows.
pub const DEFAULT_STATS_RETENTION: Duration = Duration::from_hours(168);
/// How often an idle daemon rewrites its heartbeat row (a busy one writes it with its work, at most
/// once a second). `foreman health --max-age` defaults to six of these.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// PostgreSQL: how long a due row waits for a daemon that serves its name before it becomes a
/// dead letter for "no handler" (a deploy that adds a task name reaches the producers and the
/// daemons in either order).
pub const DEFAULT_UNSERVED_AFTER: Duration = Duration::from_mins(5);
/// More threads than this is a typo, not a configuration.
const MAX_WORKERS: usize = 1024;
/// Popped-but-not-started tasks are lost in a crash: more than this is a typo, not a trade-off.
const MAX_PREFETCH: usize = 100_000;
/// Task names under this prefix belong to foreman's built-in handlers.
pub const RESERVED_PREFIX: &str = "foreman.";

/// Settings given on the command line or in `FOREMAN_*` variables; they override the config file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub db: Option<Database>,
    pub wakeup_dir: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub workers: Option<usize>,
    pub graceful_timeout: Option<Duration>,
    pub tick: Option<Duration>,
    pub prefetch: Option<usize>,
}

/// How a configured task runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runner {
    /// The process started for each task.
    Command(Launch),
    /// The name of the `[pools.NAME]` whose persistent processes run it.
    Pool(String),
}

/// `[tasks."NAME"]`: how a task runs (none: in-process or announced by a pool's hello) and what
/// happens when it fails.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskConfig {
    pub runner: Option<Runner>,
    /// Past this, the task's process is killed and the task fails.
    pub timeout: Option<Duration>,
    pub policy: Policy,
}

/// What foreman does around a task type's attempts; the same for every way of running it.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Attempts after the first one that fails (or times out).
    pub max_retries: u32,
    pub retry_backoff: Backoff,
    pub delivery: Delivery,
}

/// The policy of a task type the config does not mention.
pub static DEFAULT_POLICY: Policy = Policy {
    max_retries: 0,
    retry_backoff: DEFAULT_BACKOFF,
    delivery: Delivery::AtMostOnce,
};

const DEFAULT_BACKOFF: Backoff = Backoff {
    base: Duration::from_secs(1),
    factor: 2.0,
    max: Duration::from_hours(1),
    jitter: true,
};

impl Default for Policy {
    fn default() -> Self {
        DEFAULT_POLICY.clone()
    }
}

/// Delay before retry n (1-based): `base * factor^(n-1)`, at most `max`; with `jitter`, a uniform
/// random point in its upper half, so that tasks failing together do not retry together.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub factor: f64,
    pub max: Duration,
    pub jitter: bool,
}

impl Default for Backoff {
    fn default() -> Self {
        DEFAULT_BACKOFF
    }
}

impl Backoff {
    /// The delay before retry number `retry` (1 for the first retry).
    pub fn delay(&self, retry: u32) -> Duration {
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let raw = self.base.as_secs_f64() * self.factor.powi(exponent);
        let capped = raw.min(self.max.as_secs_f64());
        let seconds = if self.jitter {
            capped * (0.5 + fastrand::f64() / 2.0)
        } else {
            capped
        };
        Duration::try_from_secs_f64(seconds).unwrap_or(self.max)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The row is deleted when the task is popped: a crash loses a running task, never repeats it.
    AtMostOnce,
    /// The row is leased and deleted when the task ends: a crash repeats a running task.
    AtLeastOnce,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::AtMostOnce => "at-most-once",
            Delivery::AtLeastOnce => "at-least-once",
        }
    }
}

/// `[schedules.NAME]`: a task enqueued again and again.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleConfig {
    pub task: String,
    pub args: serde_json::Value,
    pub kwargs: serde_json::Value,
    pub priority: i64,
    pub when: When,
    /// Each due time is moved later by a random part of this.
    pub jitter: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum When {
    Every(Duration),
    /// A five-field (or six, with seconds) cron pattern, in the local time zone.
    Cron(String),
    /// Software Heritage's adaptive recurrence: the interval starts at `start`, is multiplied by
    /// `factor` after a run that found nothing new, divided by it after one that did, and stays
    /// within `min..=max`.
    Adaptive {
        start: Duration,
        min: Duration,
        max: Duration,
        factor: f64,
    },
}

/// A process foreman starts: a command task's, or a pool's worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// argv, run directly, never through a shell.
    pub argv: Vec<String>,
    /// The directory it runs in (`cwd`); `None`: the daemon's working directory.
    pub cwd: Option<PathBuf>,
    /// Variables set on top of the daemon's environment (`env`).
    pub env: BTreeMap<String, String>,
}

/// The variables foreman sets for each task or worker process itself: `env` may not set them.
const SET_BY_FOREMAN: [&str; 6] = [
    "FOREMAN_TASK_ID",
    "FOREMAN_TASK_NAME",
    "FOREMAN_ATTEMPT",
    "FOREMAN_RESULT_FILE",
    "FOREMAN_POOL",
    "FOREMAN_PROTOCOL",
];

/// A pool of persistent worker processes speaking the worker protocol (docs/worker-protocol.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub command: Launch,
    /// How many processes, each running one task at a time.
    pub processes: usize,
    /// How long a new process may take to write its hello line.
    pub start_timeout: Duration,
    /// Whether a busy process is written its next task before it answers (docs/guide/delivery.md,
    /// *Pipelined pools*): one task ahead per process, popped before a process is free.
    pub pipeline: bool,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The config file that was read, if any.
    pub file: Option<PathBuf>,
    pub db: Database,
    /// Where producers wake the daemon (SQLite); `None` for a database that wakes it otherwise.
    pub wakeup_dir: Option<PathBuf>,
    /// The daemon's lock, one daemon per SQLite file; `None` when daemons share the database.
    pub pid_file: Option<PathBuf>,
    pub workers: usize,
    pub graceful_timeout: Duration,
    /// Tasks popped beyond the free workers, handed over as workers free up (docs/guide/delivery.md).
    pub prefetch: usize,
    pub tick: Duration,
    pub tasks: BTreeMap<String, TaskConfig>,
    pub pools: BTreeMap<String, PoolConfig>,
    pub schedules: BTreeMap<String, ScheduleConfig>,
    pub history_retention: Duration,
    pub stats_retention: Duration,
    pub heartbeat: Duration,
    /// PostgreSQL: wake on `LISTEN foreman` (true), or poll (false: behind PgBouncer in
    /// transaction mode, where `LISTEN` cannot work); the dashboard's live updates likewise.
    pub listen: bool,
    /// PostgreSQL: a due row whose name no daemon seen alive during this long serves is buried.
    pub unserved_after: Duration,
    /// PostgreSQL: a daemon started while the server cannot be reached waits for it (true), or
    /// exits with status 1 (false).
    pub wait_for_db: bool,
    pub sentry: SentryConfig,
    /// What this configuration was loaded from, so that a reload reads it the same way.
    source: Source,
}

/// The config file asked for (if any) and the flags and environment given: a reload applies them
/// again to the file as it is then.
#[derive(Debug, Clone, Default)]
struct Source {
    config_file: Option<PathBuf>,
    overrides: Overrides,
}

/// Where failures are reported (cargo feature `sentry`). `SENTRY_DSN` in the environment wins over
/// `sentry_dsn` in the file; no DSN, no reporting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SentryConfig {
    pub dsn: Option<String>,
    pub environment: Option<String>,
    /// Whether events carry the task's args and kwargs (they may hold personal data).
    pub send_args: bool,
}

impl SentryConfig {
    /// `SENTRY_DSN` from the environment, else `dsn`.
    pub(crate) fn new(
        dsn: Option<String>,
        environment: Option<String>,
        send_args: Option<bool>,
    ) -> Self {
        SentryConfig {
            dsn: std::env::var("SENTRY_DSN")
                .ok()
                .or(dsn)
                .filter(|dsn| !dsn.trim().is_empty()),
            environment,
            send_args: send_args.unwrap_or(false),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    db: Option<PathBuf>,
    wakeup_dir: Option<PathBuf>,
    pid_file: Option<PathBuf>,
    workers: Option<usize>,
    graceful_timeout: Option<DurationValue>,
    prefetch: Option<usize>,
    tick: Option<DurationValue>,
    #[serde(default)]
    tasks: BTreeMap<String, FileTask>,
    #[serde(default)]
    pools: BTreeMap<String, FilePool>,
    #[serde(default)]
    schedules: BTreeMap<String, FileSchedule>,
    history_retention: Option<DurationValue>,
    stats_retention: Option<DurationValue>,
    heartbeat: Option<DurationValue>,
    listen: Option<bool>,
    unserved_after: Option<DurationValue>,
    wait_for_db: Option<bool>,
    sentry_dsn: Option<String>,
    sentry_environment: Option<String>,
    sentry_send_args: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTask {
    command: Option<Vec<String>>,
    cwd: Option<PathBuf>,
    env: Option<BTreeMap<String, String>>,
    pool: Option<String>,
    timeout: Option<DurationValue>,
    max_retries: Option<u32>,
    retry_backoff: Option<FileBackoff>,
    delivery: Option<FileDelivery>,
}

/// `retry_backoff = "10s"` (the base) or `{ base, factor, max, jitter }`.
#[derive(Deserialize)]
#[serde(untagged)]
enum FileBackoff {
    Base(DurationValue),
    Full(FileBackoffTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackoffTable {
    base: Option<DurationValue>,
    factor: Option<f64>,
    max: Option<DurationValue>,
    jitter: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum FileDelivery {
    AtMostOnce,
    AtLeastOnce,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSchedule {
    task: String,
    #[serde(default)]
    args: Option<serde_json::Value>,
    #[serde(default)]
    kwargs: Option<serde_json::Value>,
    #[serde(default)]
    priority: i64,
    every: Option<DurationValue>,
    cron: Option<String>,
    jitter: Option<DurationValue>,
    adaptive: Option<FileAdaptive>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdaptive {
    min: DurationValue,
    max: DurationValue,
    factor: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePool {
    command: Vec<String>,
    cwd: Option<PathBuf>,
    env: Option<BTreeMap<String, String>>,
    processes: Option<usize>,
    start_timeout: Option<DurationValue>,
    pipeline: Option<bool>,
}

/// A duration in a config file: a string with a unit or a number of seconds.
struct DurationValue(Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Int(u64),
            Float(f64),
        }
        let parsed = match Raw::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom("expected a duration such as \"10s\" or a number of seconds")
        })? {
            Raw::Text(text) => parse_duration(&text),
            Raw::Int(secs) => in_range(Duration::from_secs(secs), &secs.to_string()),
            Raw::Float(secs) => Duration::try_from_secs_f64(secs)
                .map_err(|_| format!("invalid duration {secs}"))
                .and_then(|d| in_range(d, &secs.to_string())),
        };
        parsed.map(DurationValue).map_err(serde::de::Error::custom)
    }
}

impl Config {
    /// Reads the config file (the given one, else `./foreman.toml` if present), applies the
    /// overrides and validates the result.
    pub fn load(config_file: Option<&Path>, overrides: &Overrides) -> Result<Config> {
        let file = match config_file {
            Some(path) => Some(path.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.is_file()),
        };
        let parsed = match &file {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        let mut config = Config::build(file, parsed, overrides)?;
        config.source = Source {
            config_file: config_file.map(Path::to_path_buf),
            overrides: overrides.clone(),
        };
        Ok(config)
    }

    /// The configuration as `load` reads it now, from the same file with the same flags and
    /// environment: what a reload applies. A file found by the search (`./foreman.toml`) must
    /// still be there: its absence is an error, not the built-in defaults, which would drop every
    /// task and pool. When none was found, the search runs again.
    pub fn reload(&self) -> Result<Config> {
        let file = self.source.config_file.as_deref().or(self.file.as_deref());
        Config::load(file, &self.source.overrides)
    }

    /// The configuration from a parsed file (or none) and the overrides, validated.
    #[allow(clippy::too_many_lines)] // One field per setting, in the order `Config` lists them.
    fn build(file: Option<PathBuf>, parsed: FileConfig, overrides: &Overrides) -> Result<Config> {
        // Paths written in a config file are relative to that file, so the file means the same
        // whatever directory the daemon is started from.
        let base = file
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let from_file = |p: Option<PathBuf>| p.map(|p| base.join(p));

        let db = overrides
            .db
            .clone()
            .or_else(|| {
                parsed
                    .db
                    .map(|db| Database::parse(db.as_os_str()).relative_to(&base))
            })
            .unwrap_or_else(|| Database::Sqlite(PathBuf::from(DEFAULT_DB)));
        let wakeup_dir = overrides
            .wakeup_dir
            .clone()
            .or_else(|| from_file(parsed.wakeup_dir))
            .or_else(|| db.default_wakeup_dir());
        let pid_file = overrides
            .pid_file
            .clone()
            .or_else(|| from_file(parsed.pid_file))
            .or_else(|| db.default_pid_file());
        // A relative program path and `cwd` are relative to the config file, like the other
        // paths in it; a bare program name is looked up in PATH when the process starts.
        let resolve = |argv: Vec<String>, cwd: Option<PathBuf>, env: Option<BTreeMap<_, _>>| {
            resolve_launch(&base, argv, cwd, env.unwrap_or_default())
        };
        let workers = overrides
            .workers
            .or(parsed.workers)
            .unwrap_or(DEFAULT_WORKERS);
        let file_for_errors = file.clone();
        let mut tasks = BTreeMap::new();
        for (name, task) in parsed.tasks {
            let config = build_task(&name, task, &resolve)
                .map_err(|(key, what)| key_error_in(file_for_errors.as_deref(), &key, &what))?;
            tasks.insert(name, config);
        }
        let mut schedules = BTreeMap::new();
        for (name, schedule) in parsed.schedules {
            let config = build_schedule(&name, schedule)
                .map_err(|(key, what)| key_error_in(file_for_errors.as_deref(), &key, &what))?;
            schedules.insert(name, config);
        }
        let pools = parsed
            .pools
            .into_iter()
            .map(|(name, pool)| {
                let config = PoolConfig {
                    command: resolve(pool.command, pool.cwd, pool.env),
                    processes: pool.processes.unwrap_or(workers),
                    start_timeout: pool.start_timeout.map_or(DEFAULT_START_TIMEOUT, |d| d.0),
                    pipeline: pool.pipeline.unwrap_or(false),
                };
                (name, config)
            })
            .collect();
        let config = Config {
            db,
            wakeup_dir,
            pid_file,
            workers,
            prefetch: overrides.prefetch.or(parsed.prefetch).unwrap_or(0),
            graceful_timeout: overrides
                .graceful_timeout
                .or(parsed.graceful_timeout.map(|d| d.0))
                .unwrap_or(DEFAULT_GRACEFUL_TIMEOUT),
            tick: overrides
                .tick
                .or(parsed.tick.map(|d| d.0))
                .unwrap_or(DEFAULT_TICK),
            tasks,
            pools,
            schedules,
            history_retention: parsed
                .history_retention
                .map_or(DEFAULT_HISTORY_RETENTION, |d| d.0),
            stats_retention: parsed
                .stats_retention
                .map_or(DEFAULT_STATS_RETENTION, |d| d.0),
            heartbeat: parsed.heartbeat.map_or(DEFAULT_HEARTBEAT, |d| d.0),
            listen: parsed.listen.unwrap_or(true),
            unserved_after: parsed
                .unserved_after
                .map_or(DEFAULT_UNSERVED_AFTER, |d| d.0),
            wait_for_db: parsed.wait_for_db.unwrap_or(true),
            sentry: SentryConfig::new(
                parsed.sentry_dsn,
                parsed.sentry_environment,
                parsed.sentry_send_args,
            ),
            file,
            source: Source::default(),
        };
        config.validate(overrides)?;
        Ok(config)
    }

    /// The retry and delivery policy of the task named `name`.
    pub fn policy(&self, name: &str) -> &Policy {
        self.tasks.get(name).map_or(&DEFAULT_POLICY, |t| &t.policy)
    }

    /// The top-level settings: numbers in range, durations above zero, a DSN that parses.
    fn validate_settings(&self, overrides: &Overrides) -> Result<()> {
        // Name the flag when the value came from the command line or env, not the file.
        let origin = |from_override: bool, key: &str| {
            if from_override {
                format!("--{key} (or FOREMAN_{})", key.to_uppercase())
            } else {
                self.key_name(key)
            }
        };
        for (key, value, range, from_override) in [
            (
                "workers",
                self.workers,
                1..=MAX_WORKERS,
                overrides.workers.is_some(),
            ),
            (
                "prefetch",
                self.prefetch,
                0..=MAX_PREFETCH,
                overrides.prefetch.is_some(),
            ),
        ] {
            if !range.contains(&value) {
                return Err(Error::Config(format!(
                    "{} must be between {} and {}, got {value}",
                    origin(from_override, key),
                    range.start(),
                    range.end()
                )));
            }
        }
        for (key, value) in [
            ("history_retention", self.history_retention),
            ("stats_retention", self.stats_retention),
            ("heartbeat", self.heartbeat),
            ("unserved_after", self.unserved_after),
        ] {
            if value.is_zero() {
                return Err(self.key_error(key, "must be greater than 0"));
            }
        }
        if let Some(problem) = self.sentry.dsn.as_deref().and_then(dsn_problem) {
            let from_env = std::env::var("SENTRY_DSN").is_ok_and(|d| !d.trim().is_empty());
            return Err(if from_env {
                Error::Config(format!("SENTRY_DSN {problem}"))
            } else {
                self.key_error("sentry_dsn", problem)
            });
        }
        if self.tick.is_zero() {
            let key = origin(overrides.tick.is_some(), "tick");
            return Err(Error::Config(format!("{key} must be greater than 0")));
        }
        Ok(())
    }

    /// Checks what every command needs; `check_commands` adds what only the daemon needs.
    fn validate(&self, overrides: &Overrides) -> Result<()> {
        self.validate_settings(overrides)?;
        for (name, task) in &self.tasks {
            let key = format!("tasks.\"{name}\"");
            if let Some(problem) = crate::task::name_problem(name) {
                // Quoted by `{:?}` so that a control character or a huge name stays one short line.
                let shown: String = name.chars().take(64).collect();
                return Err(self.key_error("tasks", &format!("task name {shown:?} {problem}")));
            }
            if name.starts_with(RESERVED_PREFIX) {
                return Err(self.key_error(
                    &key,
                    "names starting with \"foreman.\" are reserved for built-in tasks",
                ));
            }
            match &task.runner {
                Some(Runner::Command(command)) => self.validate_launch(&key, command)?,
                Some(Runner::Pool(pool)) if !self.pools.contains_key(pool) => {
                    return Err(self.key_error(
                        &format!("{key}.pool"),
                        &format!(
                            "names pool {pool:?}, which has no [pools.{}] section",
                            toml_key(pool)
                        ),
                    ));
                }
                _ => {}
            }
            if task.timeout.is_some_and(|t| t.is_zero()) {
                return Err(self.key_error(&format!("{key}.timeout"), "must be greater than 0"));
            }
        }
        for (name, pool) in &self.pools {
            let key = format!("pools.\"{name}\"");
            if name.is_empty() || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(self.key_error(
                    &key,
                    "a pool name must be non-empty, without spaces or control characters",
                ));
            }
            self.validate_launch(&key, &pool.command)?;
            if pool.processes == 0 || pool.processes > self.workers {
                // More processes than workers could never all be busy: `workers` bounds every task.
                return Err(self.key_error(
                    &format!("{key}.processes"),
                    &format!(
                        "must be between 1 and workers ({}), got {}",
                        self.workers, pool.processes
                    ),
                ));
            }
            if pool.start_timeout.is_zero() {
                return Err(
                    self.key_error(&format!("{key}.start_timeout"), "must be greater than 0")
                );
            }
        }
        Ok(())
    }

    /// What a command or a pool's `command`, `cwd` and `env` must be, whatever the host.
    fn validate_launch(&self, key: &str, launch: &Launch) -> Result<()> {
        if launch.argv.is_empty() {
            return Err(self.key_error(
                &format!("{key}.command"),
                "is empty: expected [program, args…]",
            ));
        }
        if let Some(cwd) = &launch.cwd {
            let bytes = cwd.as_os_str().as_encoded_bytes();
            if bytes.is_empty() || bytes.contains(&0) {
                return Err(self.key_error(
                    &format!("{key}.cwd"),
                    "must be a directory's path, not empty and without NUL characters",
                ));
            }
        }
        for (name, value) in &launch.env {
            if name.is_empty() || name.contains(['=', '\0']) {
                let shown: String = name.chars().take(64).collect();
                return Err(self.key_error(
                    &format!("{key}.env"),
                    &format!(
                        "has {shown:?}, which is not a variable name (empty, or with = or NUL)"
                    ),
                ));
            }
            if value.contains('\0') {
                return Err(self.key_error(
                    &format!("{key}.env.{}", toml_key(name)),
                    "contains a NUL character, which no environment variable can hold",
                ));
            }
            if SET_BY_FOREMAN.contains(&name.as_str()) {
                return Err(self.key_error(
                    &format!("{key}.env"),
                    &format!("sets {name}, which foreman sets itself for each task or worker"),
                ));
            }
        }
        Ok(())
    }

    /// Checks that every command task's and pool's program exists and is executable, and that
    /// its `cwd` is a directory the daemon can enter. Only the daemon (and `check-config` and
    /// `reload`) needs this: a producer host sharing the config may lack the programs.
    pub fn check_commands(&self) -> Result<()> {
        let tasks = self
            .tasks
            .iter()
            .filter_map(|(name, task)| match &task.runner {
                Some(Runner::Command(command)) => Some(("tasks", name, command)),
                Some(Runner::Pool(_)) | None => None,
            });
        let pools = self
            .pools
            .iter()
            .map(|(name, pool)| ("pools", name, &pool.command));
        for (section, name, launch) in tasks.chain(pools) {
            if let Some(program) = launch.argv.first()
                && let Err(why) = find_executable(program)
            {
                let key = format!("{section}.\"{name}\".command");
                return Err(self.key_error(&key, &why));
            }
            if let Some(cwd) = &launch.cwd
                && let Err(why) = enterable_directory(cwd)
            {
                let key = format!("{section}.\"{name}\".cwd");
                return Err(self.key_error(&key, &why));
            }
        }
        Ok(())
    }

    /// What every process foreman starts finds in its environment besides the daemon's own and
    /// its `env`: where the queue is, as absolute paths, so that a task that enqueues reaches
    /// this daemon's queue from whatever directory it runs in.
    pub fn child_env(&self) -> Vec<(String, OsString)> {
        let absolute = |path: &Path| {
            std::path::absolute(path).map_or_else(|_| path.as_os_str().to_owned(), PathBuf::into)
        };
        let db = match &self.db {
            Database::Sqlite(path) => absolute(path),
            // With its password, if it has one: the task needs it to connect.
            Database::Postgres(_) => self.db.as_os_str(),
        };
        let mut env = vec![("FOREMAN_DB".to_owned(), db)];
        if let Some(dir) = &self.wakeup_dir {
            env.push(("FOREMAN_WAKEUP_DIR".to_owned(), absolute(dir)));
        }
        env
    }

    /// The environment `launch` adds to the daemon's: `child_env`, then its own `env`, which
    /// wins (a task may enqueue into another queue).
    pub fn launch_env(&self, launch: &Launch) -> Vec<(String, OsString)> {
        let mut env: Vec<(String, OsString)> = self
            .child_env()
            .into_iter()
            .filter(|(key, _)| !launch.env.contains_key(key))
            .collect();
        env.extend(
            launch
                .env
                .iter()
                .map(|(key, value)| (key.clone(), OsString::from(value))),
        );
        env
    }

    fn key_name(&self, key: &str) -> String {
        key_name_in(self.file.as_deref(), key)
    }

    pub(crate) fn key_error(&self, key: &str, what: &str) -> Error {
        key_error_in(self.file.as_deref(), key, what)
    }

    /// The effective configuration as TOML, as `foreman check-config` prints it.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let source = self.file.as_ref().map_or_else(
            || "none (built-in defaults)".to_owned(),
            |f| f.display().to_string(),
        );
        let _ = writeln!(out, "# config file: {source}");
        // A PostgreSQL URL is printed without its password (`Display`): this output gets pasted.
        let _ = writeln!(out, "db = {}", toml_str(&self.db.to_string()));
        for (key, path) in [
            ("wakeup_dir", &self.wakeup_dir),
            ("pid_file", &self.pid_file),
        ] {
            if let Some(path) = path {
                let _ = writeln!(out, "{key} = {}", toml_str(&path.display().to_string()));
            }
        }
        let _ = writeln!(out, "workers = {}", self.workers);
        let _ = writeln!(
            out,
            "graceful_timeout = \"{}\"",
            format_duration(self.graceful_timeout)
        );
        let _ = writeln!(out, "prefetch = {}", self.prefetch);
        let _ = writeln!(out, "tick = \"{}\"", format_duration(self.tick));
        let _ = writeln!(
            out,
            "history_retention = \"{}\"",
            format_duration(self.history_retention)
        );
        let _ = writeln!(
            out,
            "stats_retention = \"{}\"",
            format_duration(self.stats_retention)
        );
        let _ = writeln!(out, "heartbeat = \"{}\"", format_duration(self.heartbeat));
        if matches!(self.db, Database::Postgres(_)) {
            let _ = writeln!(out, "listen = {}", self.listen);
            let _ = writeln!(
                out,
                "unserved_after = \"{}\"",
                format_duration(self.unserved_after)
            );
            let _ = writeln!(out, "wait_for_db = {}", self.wait_for_db);
        }
        if let Some(dsn) = &self.sentry.dsn {
            // The key is a secret of sorts; say where events go, not how to send them.
            let host = dsn.rsplit('@').next().unwrap_or_default();
            let _ = writeln!(out, "sentry_dsn = {}", toml_str(&format!("…@{host}")));
        }
        if let Some(environment) = &self.sentry.environment {
            let _ = writeln!(out, "sentry_environment = {}", toml_str(environment));
        }
        let _ = writeln!(out, "sentry_send_args = {}", self.sentry.send_args);
        for (name, pool) in &self.pools {
            let _ = writeln!(out, "\n[pools.{}]", toml_key(name));
            write_launch(&mut out, &pool.command);
            let _ = writeln!(
                out,
                "processes = {}\nstart_timeout = \"{}\"\npipeline = {}",
                pool.processes,
                format_duration(pool.start_timeout),
                pool.pipeline
            );
        }
        for (name, task) in &self.tasks {
            let _ = writeln!(out, "\n[tasks.{}]", toml_key(name));
            let _ = match &task.runner {
                Some(Runner::Command(command)) => {
                    write_launch(&mut out, command);
                    Ok(())
                }
                Some(Runner::Pool(pool)) => writeln!(out, "pool = {}", toml_str(pool)),
                None => writeln!(out, "# runs in-process or on a pool that announces it"),
            };
            if let Some(timeout) = task.timeout {
                let _ = writeln!(out, "timeout = \"{}\"", format_duration(timeout));
            }
            write_policy(&mut out, &task.policy);
        }
        for (name, schedule) in &self.schedules {
            write_schedule(&mut out, name, schedule);
        }
        out
    }
}

/// What is wrong with a Sentry DSN (`https://KEY@HOST/PROJECT_ID`), checked here so that a typo
/// stops startup like any other bad setting instead of silently disabling reports.
fn dsn_problem(dsn: &str) -> Option<&'static str> {
    let Some((scheme, rest)) = dsn.trim().split_once("://") else {
        return Some("is not a DSN: expected https://KEY@HOST/PROJECT_ID");
    };
    if scheme != "https" && scheme != "http" {
        return Some("must start with https:// or http://");
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    match authority.split_once('@') {
        Some((key, host)) if !key.is_empty() && !host.is_empty() => {}
        _ => return Some("has no KEY@HOST part: expected https://KEY@HOST/PROJECT_ID"),
    }
    if path
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .is_none_or(str::is_empty)
    {
        return Some("has no project id: expected https://KEY@HOST/PROJECT_ID");
    }
    None
}

/// A config mistake found while building a section: (key, what is wrong with it).
type KeyError = (String, String);

fn build_task(
    name: &str,
    task: FileTask,
    resolve: &impl Fn(Vec<String>, Option<PathBuf>, Option<BTreeMap<String, String>>) -> Launch,
) -> std::result::Result<TaskConfig, KeyError> {
    let key = format!("tasks.\"{name}\"");
    if task.command.is_none() {
        // A pool task runs in its pool's process, which has the pool's `cwd` and `env`.
        let only_commands = |what: &str| {
            let hint = match &task.pool {
                Some(pool) => format!(": set it on [pools.{}]", toml_key(pool)),
                None => String::new(),
            };
            Err((
                format!("{key}.{what}"),
                format!("applies to command tasks only (with `command`){hint}"),
            ))
        };
        if task.cwd.is_some() {
            return only_commands("cwd");
        }
        if task.env.is_some() {
            return only_commands("env");
        }
    }
    let runner = match (task.command, task.pool) {
        (Some(command), None) => Some(Runner::Command(resolve(command, task.cwd, task.env))),
        (None, Some(pool)) => Some(Runner::Pool(pool)),
        (None, None) => None,
        (Some(_), Some(_)) => {
            return Err((
                key,
                "has both `command` and `pool`: a task runs one way".to_owned(),
            ));
        }
    };
    let mut retry_backoff = Backoff::default();
    match task.retry_backoff {
        None => {}
        Some(FileBackoff::Base(base)) => retry_backoff.base = base.0,
        Some(FileBackoff::Full(table)) => {
            if let Some(base) = table.base {
                retry_backoff.base = base.0;
            }
            if let Some(max) = table.max {
                retry_backoff.max = max.0;
            }
            if let Some(factor) = table.factor {
                if !(factor.is_finite() && factor >= 1.0) {
                    return Err((
                        format!("{key}.retry_backoff.factor"),
                        format!("must be a number of at least 1, got {factor}"),
                    ));
                }
                retry_backoff.factor = factor;
            }
            if let Some(jitter) = table.jitter {
                retry_backoff.jitter = jitter;
            }
        }
    }
    let delivery = match task.delivery {
        None | Some(FileDelivery::AtMostOnce) => Delivery::AtMostOnce,
        Some(FileDelivery::AtLeastOnce) => Delivery::AtLeastOnce,
    };
    Ok(TaskConfig {
        runner,
        timeout: task.timeout.map(|d| d.0),
        policy: Policy {
            max_retries: task.max_retries.unwrap_or(0),
            retry_backoff,
            delivery,
        },
    })
}

/// A command as the config file gives it, with its relative program path (one with a `/`) and
/// `cwd` resolved against `base`, the config file's directory. A program so resolved is made
/// absolute when the process runs elsewhere (`cwd`), where a relative one would name another file.
fn resolve_launch(
    base: &Path,
    mut argv: Vec<String>,
    cwd: Option<PathBuf>,
    env: BTreeMap<String, String>,
) -> Launch {
    // An empty one stays empty, for `validate` to refuse: joined, it would be `base`.
    let cwd = cwd.map(|cwd| {
        if cwd.as_os_str().is_empty() {
            cwd
        } else {
            base.join(cwd)
        }
    });
    if let Some(program) = argv.first_mut()
        && program.contains('/')
        && Path::new(program.as_str()).is_relative()
    {
        let path = base.join(&*program);
        let path = match &cwd {
            Some(_) => std::path::absolute(&path).unwrap_or(path),
            None => path,
        };
        *program = path.display().to_string();
    }
    Launch { argv, cwd, env }
}

/// Whether the daemon can run a process in `dir`: a directory it may enter (search permission,
/// for its effective user). `Err` says why not, to follow "names \"DIR\", ".
fn enterable_directory(dir: &Path) -> std::result::Result<(), String> {
    let shown = dir.display();
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("names \"{shown}\", which does not exist"));
        }
        Err(e) => return Err(format!("names \"{shown}\", which cannot be examined: {e}")),
        Ok(meta) if !meta.is_dir() => {
            return Err(format!("names \"{shown}\", which is not a directory"));
        }
        Ok(_) => {}
    }
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("names \"{shown}\", which contains a NUL character"))?;
    // SAFETY: a valid C string; faccessat only reads it.
    let rc =
        unsafe { libc::faccessat(libc::AT_FDCWD, path.as_ptr(), libc::X_OK, libc::AT_EACCESS) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        return Err(format!(
            "names \"{shown}\", which the daemon (uid {uid}) cannot enter: {e}"
        ));
    }
    Ok(())
}

fn build_schedule(
    name: &str,
    schedule: FileSchedule,
) -> std::result::Result<ScheduleConfig, KeyError> {
    let key = format!("schedules.\"{name}\"");
    let when = match (schedule.every, schedule.cron, schedule.adaptive) {
        (Some(every), None, None) => When::Every(every.0),
        (None, Some(cron), None) => {
            crate::cron::parse_cron(&cron).map_err(|e| (format!("{key}.cron"), e))?;
            When::Cron(cron)
        }
        (every, None, Some(adaptive)) => {
            let (min, max) = (adaptive.min.0, adaptive.max.0);
            let factor = adaptive.factor.unwrap_or(2.0);
            if min.is_zero() || min > max {
                return Err((format!("{key}.adaptive"), "needs 0 < min <= max".to_owned()));
            }
            if !(factor.is_finite() && factor > 1.0) {
                return Err((
                    format!("{key}.adaptive.factor"),
                    format!("must be a number greater than 1, got {factor}"),
                ));
            }
            let start = every.map_or(min, |e| e.0.clamp(min, max));
            When::Adaptive {
                start,
                min,
                max,
                factor,
            }
        }
        (None, None, None) => {
            return Err((
                key,
                "needs `every = \"5m\"`, `cron = \"0 3 * * *\"` or `adaptive = { min, max }`"
                    .to_owned(),
            ));
        }
        _ => {
            return Err((
                key,
                "takes one of `every` and `cron` (`every` with `adaptive` sets its starting interval)".to_owned(),
            ));
        }
    };
    if let When::Every(every) = when
        && every.is_zero()
    {
        return Err((format!("{key}.every"), "must be greater than 0".to_owned()));
    }
    let args = schedule.args.unwrap_or_else(|| serde_json::json!([]));
    if !args.is_array() {
        return Err((format!("{key}.args"), "must be an array".to_owned()));
    }
    let kwargs = schedule.kwargs.unwrap_or_else(|| serde_json::json!({}));
    if !kwargs.is_object() {
        return Err((format!("{key}.kwargs"), "must be a table".to_owned()));
    }
    if let Some(problem) = crate::task::name_problem(&schedule.task) {
        return Err((format!("{key}.task"), problem));
    }
    Ok(ScheduleConfig {
        task: schedule.task,
        args,
        kwargs,
        priority: schedule.priority,
        when,
        jitter: schedule.jitter.map(|d| d.0),
    })
}

fn write_launch(out: &mut String, launch: &Launch) {
    let _ = writeln!(out, "command = {}", toml_argv(&launch.argv));
    if let Some(cwd) = &launch.cwd {
        let _ = writeln!(out, "cwd = {}", toml_str(&cwd.display().to_string()));
    }
    if !launch.env.is_empty() {
        let pairs: Vec<String> = launch
            .env
            .iter()
            .map(|(key, value)| format!("{} = {}", toml_key(key), toml_str(value)))
            .collect();
        let _ = writeln!(out, "env = {{ {} }}", pairs.join(", "));
    }
}

fn write_policy(out: &mut String, policy: &Policy) {
    let b = &policy.retry_backoff;
    let _ = writeln!(
        out,
        "max_retries = {}\nretry_backoff = {{ base = \"{}\", factor = {:?}, max = \"{}\", jitter = {} }}\ndelivery = \"{}\"",
        policy.max_retries,
        format_duration(b.base),
        b.factor,
        format_duration(b.max),
        b.jitter,
        policy.delivery.as_str()
    );
}

fn write_schedule(out: &mut String, name: &str, schedule: &ScheduleConfig) {
    let _ = writeln!(
        out,
        "\n[schedules.{}]\ntask = {}\nargs = {}\nkwargs = {}\npriority = {}",
        toml_key(name),
        toml_str(&schedule.task),
        json_as_toml(&schedule.args),
        json_as_toml(&schedule.kwargs),
        schedule.priority
    );
    let _ = match &schedule.when {
        When::Every(every) => writeln!(out, "every = \"{}\"", format_duration(*every)),
        When::Cron(cron) => writeln!(out, "cron = {}", toml_str(cron)),
        When::Adaptive {
            start,
            min,
            max,
            factor,
        } => writeln!(
            out,
            "every = \"{}\"\nadaptive = {{ min = \"{}\", max = \"{}\", factor = {factor:?} }}",
            format_duration(*start),
            format_duration(*min),
            format_duration(*max)
        ),
    };
    if let Some(jitter) = schedule.jitter {
        let _ = writeln!(out, "jitter = \"{}\"", format_duration(jitter));
    }
}

/// A JSON value (from the config) written back as an inline TOML value.
fn json_as_toml(value: &serde_json::Value) -> String {
    toml::Value::try_from(value).map_or_else(|_| "[]".to_owned(), |v| v.to_string())
}

fn key_name_in(file: Option<&Path>, key: &str) -> String {
    match file {
        Some(file) => format!("{}: key `{key}`", file.display()),
        None => format!("configuration key `{key}`"),
    }
}

fn key_error_in(file: Option<&Path>, key: &str, what: &str) -> Error {
    Error::Config(format!("{} {what}", key_name_in(file, key)))
}

fn toml_str(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

fn toml_argv(argv: &[String]) -> String {
    let quoted: Vec<String> = argv.iter().map(|a| toml_str(a)).collect();
    format!("[{}]", quoted.join(", "))
}

/// A key as TOML writes it: bare when it can be, quoted otherwise (`a.b` is two keys unquoted).
fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare { key.to_owned() } else { toml_str(key) }
}

fn read_file_config(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("cannot read config file {}: {e}", path.display())))?;
    parse_file_config(path, &text)
}

/// The text of the config file at `path`, parsed; errors name the file, the line and the key.
fn parse_file_config(path: &Path, text: &str) -> Result<FileConfig> {
    let deserializer =
        toml::de::Deserializer::parse(text).map_err(|e| toml_error(path, text, &e))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let line = inner.span().map(|s| line_of(text, s.start));
        let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
        if key == "." || key.is_empty() {
            Error::Config(format!(
                "{}{at}: {}",
                path.display(),
                inner.message().trim()
            ))
        } else {
            // `[tasks.myapp.send_email]` unquoted is a table `myapp` holding `send_email`.
            let sections = ["tasks.", "pools.", "schedules."];
            let in_header = inner.span().is_some_and(|s| {
                let start = text
                    .get(..s.start)
                    .map_or(0, |t| t.rfind('\n').map_or(0, |n| n + 1));
                text.get(start..)
                    .is_some_and(|l| l.trim_start().starts_with('['))
            });
            let hint = if in_header
                && sections.iter().any(|s| key.starts_with(s))
                && inner.message().starts_with("unknown field")
            {
                " (a name with dots must be quoted: [tasks.\"myapp.send_email\"])"
            } else {
                ""
            };
            Error::Config(format!(
                "{}{at}: key `{key}`: {}{hint}",
                path.display(),
                inner.message().trim()
            ))
        }
    })
}

fn toml_error(path: &Path, text: &str, err: &toml::de::Error) -> Error {
    // The line itself, quoted (so it stays one line) and shortened: a syntax error's message
    // ("duplicate key", "string values must be quoted") does not say which key it is about.
    let at = err
        .span()
        .map(|s| {
            let start = text
                .get(..s.start)
                .map_or(0, |t| t.rfind('\n').map_or(0, |n| n + 1));
            let line = text
                .get(start..)
                .unwrap_or_default()
                .lines()
                .next()
                .unwrap_or_default();
            let mut shown: String = line.trim().chars().take(60).collect();
            if shown.len() < line.trim().len() {
                shown.push('…');
            }
            format!(" (line {}: {shown:?})", line_of(text, s.start))
        })
        .unwrap_or_default();
    Error::Config(format!(
        "{}{at}: invalid TOML: {}",
        path.display(),
        err.message().trim()
    ))
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |t| t.matches('\n').count()) + 1
}

/// Finds `program` the way exec would (a path, or a search of `PATH`) and checks it is executable.
pub(crate) fn find_executable(program: &str) -> std::result::Result<PathBuf, String> {
    let is_executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        return if !path.exists() {
            Err(format!("names {program:?}, which does not exist"))
        } else if is_executable(&path) {
            Ok(path)
        } else {
            Err(format!(
                "names {program:?}, which is not an executable file"
            ))
        };
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&search)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| format!("names {program:?}, which is not an executable in PATH"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("foreman.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(Some(&path), &Overrides::default())
    }

    #[test]
    fn a_sentry_dsn_typo_is_a_config_error() {
        assert_eq!(dsn_problem("https://abc@o1.ingest.sentry.io/42"), None);
        assert_eq!(dsn_problem("http://k@127.0.0.1:9000/1"), None);
        for bad in [
            "abc",
            "ftp://k@h/1",
            "https://h/1",
            "https://k@h",
            "https://k@h/",
        ] {
            assert!(dsn_problem(bad).is_some(), "{bad}");
        }
        if std::env::var_os("SENTRY_DSN").is_none() {
            let err = load_text("sentry_dsn = \"https://example.com\"")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("`sentry_dsn`") && err.contains("KEY@HOST"),
                "{err}"
            );
        }
    }

    #[test]
    fn defaults_derive_from_the_db_path() {
        let config = load_text("db = \"q.db\"").unwrap();
        assert!(config.db.sqlite_path().unwrap().ends_with("q.db"));
        let wakeup_dir = config.wakeup_dir.unwrap();
        assert!(wakeup_dir.to_string_lossy().ends_with("q.db.wakeup"));
        assert!(
            config
                .pid_file
                .unwrap()
                .to_string_lossy()
                .ends_with("q.db.pid")
        );
        assert_eq!(config.workers, DEFAULT_WORKERS);
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(&path, "workers = 2\ntick = \"5s\"").unwrap();
        let overrides = Overrides {
            workers: Some(7),
            ..Overrides::default()
        };
        let config = Config::load(Some(&path), &overrides).unwrap();
        assert_eq!(config.workers, 7);
        assert_eq!(config.tick, Duration::from_secs(5));
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let err = load_text("workers = \"four\"").unwrap_err().to_string();
        assert!(
            err.contains("foreman.toml") && err.contains("`workers`"),
            "{err}"
        );
        let err = load_text("wrokers = 4").unwrap_err().to_string();
        assert!(err.contains("wrokers") && err.contains("line 1"), "{err}");
        let err = load_text("[tasks.x]\ncommand = []")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tasks.\"x\".command"), "{err}");
        // A missing program stops the daemon, not a producer that shares the config file.
        let config = load_text("[tasks.x]\ncommand = [\"/nonexistent/prog\"]").unwrap();
        let err = config.check_commands().unwrap_err().to_string();
        assert!(
            err.contains("does not exist") && err.contains("tasks.\"x\".command"),
            "{err}"
        );
        let config = load_text("[tasks.x]\ncommand = [\"bin/prog\", \"bin/arg\"]").unwrap();
        let Some(Runner::Command(command)) = &config.tasks["x"].runner else {
            panic!("x is a command task");
        };
        let argv = &command.argv;
        assert!(
            argv[0].ends_with("/bin/prog") && argv[0].len() > "/bin/prog".len(),
            "{argv:?}"
        );
        assert_eq!(argv[1], "bin/arg", "only the program is resolved");
        let err = load_text("tick = \"3 parsecs\"").unwrap_err().to_string();
        assert!(
            err.contains("`tick`") && err.contains("invalid duration"),
            "{err}"
        );
        let err = load_text("[tasks.x]\nargv = [\"true\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("argv"), "{err}");
        assert_eq!(load_text("workers = 0").unwrap_err().exit_code(), 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("foreman.toml");
        std::fs::write(&path, "workers = 2").unwrap();
        let overrides = Overrides {
            workers: Some(0),
            ..Overrides::default()
        };
        let err = Config::load(Some(&path), &overrides)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--workers (or FOREMAN_WORKERS)") && !err.contains("foreman.toml"),
            "{err}"
        );
    }

    #[test]
    fn cwd_and_env_resolve_against_the_file_and_print_back() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("conf");
        std::fs::create_dir_all(conf.join("app")).unwrap();
        let path = conf.join("foreman.toml");
        std::fs::write(
            &path,
            r#"
db = "q.sqlite3"
[pools.py]
command = ["bin/python", "-m", "w"]
cwd = "app"
env = { DJANGO_SETTINGS_MODULE = "site.settings", "A.B" = "x y" }
[tasks.t]
command = ["true"]
cwd = "/"
env = { FOREMAN_DB = "/elsewhere.sqlite3" }
"#,
        )
        .unwrap();
        let config = Config::load(Some(&path), &Overrides::default()).unwrap();
        let pool = &config.pools["py"].command;
        assert_eq!(pool.cwd.as_deref(), Some(conf.join("app").as_path()));
        // Absolute, since the worker runs elsewhere than the daemon.
        assert_eq!(pool.argv[0], conf.join("bin/python").display().to_string());
        assert_eq!(pool.env["A.B"], "x y");
        let printed = config.to_toml();
        let again_path = dir.path().join("again.toml");
        std::fs::write(&again_path, &printed).unwrap();
        let again = Config::load(Some(&again_path), &Overrides::default()).unwrap();
        assert_eq!(again.pools, config.pools, "{printed}");
        assert_eq!(again.tasks, config.tasks, "{printed}");
        // The task's own FOREMAN_DB wins over the daemon's; the pool gets the daemon's, absolute.
        let Some(Runner::Command(task)) = &config.tasks["t"].runner else {
            panic!("t is a command task");
        };
        let db: Vec<_> = config
            .launch_env(task)
            .into_iter()
            .filter(|(k, _)| k == "FOREMAN_DB")
            .collect();
        assert_eq!(db, [("FOREMAN_DB".to_owned(), "/elsewhere.sqlite3".into())]);
        let env = config.launch_env(pool);
        let db = &env.iter().find(|(k, _)| k == "FOREMAN_DB").unwrap().1;
        assert_eq!(Path::new(db), conf.join("q.sqlite3").as_path());
        let wake = &env
            .iter()
            .find(|(k, _)| k == "FOREMAN_WAKEUP_DIR")
            .unwrap()
            .1;
        assert!(Path::new(wake).is_absolute(), "{wake:?}");
        // A directory that is not there is the daemon's problem (and check-config's), by key.
        let err = config.check_commands().unwrap_err().to_string();
        assert!(err.contains("`pools.\"py\".command`"), "{err}");
    }

    #[test]
    fn a_reload_reads_the_same_file_with_the_same_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(&path, "workers = 2\ntick = \"5s\"").unwrap();
        let overrides = Overrides {
            tick: Some(Duration::from_secs(2)),
            ..Overrides::default()
        };
        let config = Config::load(Some(&path), &overrides).unwrap();
        std::fs::write(&path, "workers = 3\ntick = \"7s\"").unwrap();
        let again = config.reload().unwrap();
        assert_eq!(again.workers, 3);
        assert_eq!(again.tick, Duration::from_secs(2), "the flag still wins");
        std::fs::remove_file(&path).unwrap();
        let err = config.reload().unwrap_err().to_string();
        assert!(err.contains("cannot read config file"), "{err}");
    }

    #[test]
    fn cwd_and_env_mistakes_name_the_key() {
        for (text, needle) in [
            (
                "[pools.p]\ncommand = [\"true\"]\nenv = { FOREMAN_TASK_ID = \"1\" }",
                "`pools.\"p\".env` sets FOREMAN_TASK_ID, which foreman sets itself",
            ),
            (
                "[pools.p]\ncommand = [\"true\"]\nenv = { \"A=B\" = \"1\" }",
                "`pools.\"p\".env` has \"A=B\", which is not a variable name",
            ),
            (
                "[pools.p]\ncommand = [\"true\"]\nenv = { A = \"\\u0000\" }",
                "`pools.\"p\".env.A` contains a NUL character",
            ),
            (
                "[pools.p]\ncommand = [\"true\"]\ncwd = \"\"",
                "`pools.\"p\".cwd` must be a directory's path",
            ),
            (
                "[pools.p]\ncommand = [\"true\"]\nenv = { A = 1 }",
                "pools.p.env.A",
            ),
            (
                "[pools.p]\ncommand = [\"true\"]\n[tasks.t]\npool = \"p\"\ncwd = \"/\"",
                "`tasks.\"t\".cwd` applies to command tasks only (with `command`): set it on [pools.p]",
            ),
            (
                "[tasks.t]\nenv = { A = \"1\" }",
                "`tasks.\"t\".env` applies to command tasks only",
            ),
        ] {
            let err = load_text(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        for (cwd, needle) in [
            (
                "/nonexistent/dir",
                "names \"/nonexistent/dir\", which does not exist",
            ),
            (
                "/etc/passwd",
                "names \"/etc/passwd\", which is not a directory",
            ),
        ] {
            let config =
                load_text(&format!("[tasks.t]\ncommand = [\"true\"]\ncwd = \"{cwd}\"")).unwrap();
            let err = config.check_commands().unwrap_err().to_string();
            assert!(
                err.contains("`tasks.\"t\".cwd`") && err.contains(needle),
                "{err}"
            );
        }
    }

    #[test]
    fn backoff_grows_to_its_cap_and_jitters_in_the_upper_half() {
        let fixed = Backoff {
            base: Duration::from_secs(2),
            factor: 3.0,
            max: Duration::from_secs(30),
            jitter: false,
        };
        let delays: Vec<u64> = (1..=5).map(|n| fixed.delay(n).as_secs()).collect();
        assert_eq!(delays, [2, 6, 18, 30, 30]);
        let jittered = Backoff {
            jitter: true,
            ..fixed
        };
        for _ in 0..200 {
            let d = jittered.delay(2).as_secs_f64();
            assert!((3.0..=6.0).contains(&d), "{d}");
        }
        assert_eq!(
            fixed.delay(u32::MAX),
            Duration::from_secs(30),
            "no overflow"
        );
    }

    #[test]
    fn task_policies_and_schedules_parse_and_print_back() {
        let config = load_text(
            r#"
history_retention = "2d"
[tasks.t]
command = ["true"]
max_retries = 3
retry_backoff = { base = "5s", max = "1m", factor = 4, jitter = false }
delivery = "at-least-once"
[tasks.u]
command = ["true"]
retry_backoff = "10s"
[schedules.a]
task = "t"
args = [1, "x"]
kwargs = { k = true }
cron = "0 3 * * *"
jitter = "30s"
[schedules.b]
task = "u"
every = "2h"
adaptive = { min = "1h", max = "30d" }
"#,
        )
        .unwrap();
        let t = &config.tasks["t"].policy;
        assert_eq!(t.max_retries, 3);
        assert_eq!(t.delivery, Delivery::AtLeastOnce);
        assert_eq!(t.retry_backoff.base, Duration::from_secs(5));
        assert_eq!(
            config.tasks["u"].policy.retry_backoff.base,
            Duration::from_secs(10)
        );
        assert!(config.tasks["u"].policy.retry_backoff.jitter);
        assert_eq!(config.policy("other"), &DEFAULT_POLICY);
        assert_eq!(config.schedules["a"].args, serde_json::json!([1, "x"]));
        assert_eq!(
            config.schedules["b"].when,
            When::Adaptive {
                start: Duration::from_hours(2),
                min: Duration::from_hours(1),
                max: Duration::from_hours(720),
                factor: 2.0
            }
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("again.toml");
        std::fs::write(&path, config.to_toml()).unwrap();
        let again = Config::load(Some(&path), &Overrides::default()).unwrap();
        assert_eq!(again.tasks, config.tasks);
        assert_eq!(again.schedules, config.schedules);
        assert_eq!(again.history_retention, Duration::from_hours(48));
    }

    #[test]
    fn schedule_and_policy_mistakes_name_the_key() {
        for (text, needle) in [
            (
                "[schedules.s]
task = \"t\"",
                "`schedules.\"s\"` needs `every",
            ),
            (
                "[schedules.s]
task = \"t\"
every = \"1m\"
cron = \"* * * * *\"",
                "`schedules.\"s\"` takes one of",
            ),
            (
                "[schedules.s]
task = \"t\"
cron = \"61 * * * *\"",
                "`schedules.\"s\".cron` invalid cron pattern",
            ),
            (
                "[schedules.s]
task = \"t\"
adaptive = { min = \"2h\", max = \"1h\" }",
                "`schedules.\"s\".adaptive` needs 0 < min <= max",
            ),
            (
                "[schedules.s]
task = \"t\"
every = \"1m\"
args = 3",
                "args",
            ),
            (
                "[tasks.t]
command = [\"true\"]
delivery = \"twice\"",
                "delivery",
            ),
            (
                "[tasks.t]
command = [\"true\"]
max_retries = -1",
                "max_retries",
            ),
            (
                "history_retention = \"0s\"",
                "`history_retention` must be greater than 0",
            ),
        ] {
            let err = load_text(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn effective_config_parses_back() {
        let config = load_text(
            "workers = 3\ngraceful_timeout = 2.5\n[tasks.\"a.b\"]\ncommand = [\"true\", \"x y\"]",
        )
        .unwrap();
        let printed = config.to_toml();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("again.toml");
        std::fs::write(&path, &printed).unwrap();
        let again = Config::load(Some(&path), &Overrides::default()).unwrap();
        assert_eq!(again.workers, 3);
        assert_eq!(again.graceful_timeout, Duration::from_millis(2500));
        assert_eq!(again.tasks, config.tasks);
    }
}

/// Property tests ("fuzzing") of config loading: any text, and any value under every known key,
/// loads or fails with one line naming the file (and the key). Run longer with
/// `PROPTEST_CASES=200000 cargo test --release --lib fuzz` (see CONTRIBUTING.md, *Fuzzing*).
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    fn load(text: &str) -> Result<Config> {
        let path = Path::new("/etc/foreman/fuzz.toml");
        Config::build(
            Some(path.to_path_buf()),
            parse_file_config(path, text)?,
            &Overrides::default(),
        )
    }

    /// A TOML value as text: well-formed ones of every type, and near-misses.
    fn toml_value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|i| i.to_string()),
            any::<u64>().prop_map(|i| i.to_string()),
            any::<f64>().prop_map(|f| format!("{f:?}")),
            Just("nan".to_owned()),
            Just("-inf".to_owned()),
            any::<bool>().prop_map(|b| b.to_string()),
            any::<String>().prop_map(|s| toml::Value::String(s).to_string()),
            "\"[0-9.]{0,6}(ms|s|m|h|d|y|)\"",
            "\"[*/0-9 ,-]{0,14}\"",
            Just("\"at-least-once\"".to_owned()),
            Just("[\"true\", \"--flag\"]".to_owned()),
            Just("[]".to_owned()),
            Just("[1, \"a\"]".to_owned()),
            Just("{ base = \"1s\", factor = 0.5 }".to_owned()),
            Just("{ min = \"1h\", max = \"1m\" }".to_owned()),
            Just("{ a = 1 }".to_owned()),
            Just("1979-05-27T07:32:00Z".to_owned()),
            "[a-z\"\\[\\]{}=., ]{0,10}",
        ]
    }

    /// (section header, what the section needs anyway, key): every key the file format knows.
    fn known_key() -> impl Strategy<Value = (&'static str, &'static str, &'static str)> {
        const TOP: &[&str] = &[
            "db",
            "wakeup_dir",
            "pid_file",
            "workers",
            "graceful_timeout",
            "prefetch",
            "tick",
            "history_retention",
            "stats_retention",
            "heartbeat",
            "listen",
            "unserved_after",
            "wait_for_db",
            "sentry_dsn",
            "sentry_environment",
            "sentry_send_args",
        ];
        const TASK: &[&str] = &[
            "command",
            "cwd",
            "env",
            "pool",
            "timeout",
            "max_retries",
            "retry_backoff",
            "delivery",
        ];
        const POOL: &[&str] = &["processes", "start_timeout", "cwd", "env", "pipeline"];
        const SCHEDULE: &[&str] = &[
            "cron", "jitter", "args", "kwargs", "priority", "adaptive", "task",
        ];
        prop_oneof![
            proptest::sample::select(TOP).prop_map(|k| ("", "", k)),
            proptest::sample::select(TASK).prop_map(|k| ("[tasks.\"a.b\"]", "", k)),
            proptest::sample::select(POOL).prop_map(|k| ("[pools.p]", "command = [\"true\"]", k)),
            proptest::sample::select(SCHEDULE).prop_map(|k| ("[schedules.s]", "every = \"1m\"", k)),
            Just(("[schedules.s]", "task = \"t\"", "every")),
        ]
    }

    fn one_line_about(err: &Error, what: &str) -> std::result::Result<(), TestCaseError> {
        let text = err.to_string();
        prop_assert_eq!(err.exit_code(), 2, "{}", text);
        prop_assert!(!text.trim().contains('\n'), "{}", text);
        prop_assert!(text.starts_with("/etc/foreman/fuzz.toml"), "{}", text);
        // A syntax error is reported where the parser gave up, which for an unclosed `{` or `[`
        // is a later line: it names the line (quoted), not necessarily the key.
        if text.contains("invalid TOML") {
            prop_assert!(text.contains("(line "), "{}", text);
        } else {
            prop_assert!(text.contains(what), "{} does not name {}", text, what);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(crate::fuzz_config(256))]

        #[test]
        fn any_text_loads_or_fails_in_one_line_naming_the_file(text in prop_oneof![
            any::<String>(),
            "([a-z_]{1,8} = [0-9a-z\"\\[\\]{}.,= ]{0,10}\n|\\[[a-z_.\"]{0,12}\\]\n){0,5}",
        ]) {
            if let Err(err) = load(&text) {
                one_line_about(&err, "")?;
            }
        }

        #[test]
        fn a_bad_value_under_any_known_key_names_that_key(
            (header, needs, key) in known_key(),
            value in toml_value(),
        ) {
            let text = format!("{header}\n{needs}\n{key} = {value}\n");
            // A schedule must have a task, unless the generated key is it.
            let text = if header == "[schedules.s]" && key != "task" && !needs.starts_with("task") {
                format!("{text}task = \"t\"\n")
            } else {
                text
            };
            if let Err(err) = load(&text) {
                one_line_about(&err, key)?;
            }
        }
    }
}
