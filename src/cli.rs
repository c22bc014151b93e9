//! The `foreman` command line: argument definitions (clap) and what each subcommand does. Output
//! formats live here; the work they report on lives in the other modules.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use crossbeam_channel::Receiver;

use crate::config::{Config, Overrides};
use crate::duration::parse_duration;
use crate::error::{Error, Result};
use crate::pid_guard::DaemonState;
use crate::queue::{Access, Queue, SCHEMA_VERSION};
use crate::registry::Registry;
use crate::signals::Shutdown;
use crate::wakeup::WakeupDir;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  runtime failure (database error, daemon already running, a second signal during shutdown…)
  2  usage or configuration error (bad flag, bad config file, bad JSON argument)";

/// A background-task runner: web apps enqueue by inserting a row into SQLite and touching a file;
/// `foreman run` wakes through inotify and runs the task.
#[derive(Parser, Debug)]
#[command(name = "foreman", version, about, after_help = EXIT_CODES, propagate_version = true)]
pub struct Cli {
    /// SQLite database [default: ./foreman.sqlite3]
    #[arg(long, global = true, env = "FOREMAN_DB", value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Directory producers touch to wake the daemon [default: <db>.wakeup]
    #[arg(long, global = true, env = "FOREMAN_WAKEUP_DIR", value_name = "DIR")]
    pub wakeup_dir: Option<PathBuf>,
    /// Config file [default: ./foreman.toml if present]
    #[arg(long, global = true, env = "FOREMAN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// PID file holding the daemon's lock [default: <db>.pid]
    #[arg(long, global = true, env = "FOREMAN_PID_FILE", value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Log level: error, warn, info, debug or trace [default: RUST_LOG, else info]
    #[arg(long, global = true, env = "FOREMAN_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<log::LevelFilter>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the database, its schema and the wakeup dir (mode 0700); safe to repeat
    Init,
    /// Run the daemon until SIGTERM or SIGINT
    Run(DaemonArgs),
    /// Enqueue a task and print its id
    Enqueue {
        /// Task name, e.g. foreman.echo
        name: String,
        /// Positional arguments as a JSON array
        #[arg(default_value = "[]", value_name = "ARGS_JSON")]
        args: String,
        /// Keyword arguments as a JSON object
        #[arg(long, default_value = "{}", value_name = "JSON")]
        kwargs: String,
    },
    /// Show whether the daemon runs, the queue depth per task name, the oldest task's age and the
    /// dead-letter count
    Status {
        /// One JSON document instead of text
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration and print the effective result
    CheckConfig(DaemonArgs),
}

/// Daemon settings that can also come from the config file.
#[derive(Args, Debug, Default, Clone)]
pub struct DaemonArgs {
    /// Worker threads, the most tasks running at once [default: 4]
    #[arg(long, env = "FOREMAN_WORKERS", value_name = "N")]
    pub workers: Option<usize>,
    /// Time running tasks get to finish after SIGTERM [default: 10s]
    #[arg(long, env = "FOREMAN_GRACEFUL_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub graceful_timeout: Option<Duration>,
    /// Fallback check of the queue, in case a wakeup is missed [default: 1s]
    #[arg(long, env = "FOREMAN_TICK", value_parser = parse_duration, value_name = "DURATION")]
    pub tick: Option<Duration>,
}

impl Cli {
    fn overrides(&self, daemon: &DaemonArgs) -> Overrides {
        Overrides {
            db: self.db.clone(),
            wakeup_dir: self.wakeup_dir.clone(),
            pid_file: self.pid_file.clone(),
            workers: daemon.workers,
            graceful_timeout: daemon.graceful_timeout,
            tick: daemon.tick,
        }
    }

    fn load_config(&self, daemon: &DaemonArgs) -> Result<Config> {
        Config::load(self.config.as_deref(), &self.overrides(daemon))
    }
}

/// Runs the parsed command. `signals` is called only by `run`, so that other commands keep the
/// default behaviour of SIGINT.
pub fn execute(cli: &Cli, signals: impl FnOnce() -> Result<Receiver<Shutdown>>) -> Result<()> {
    match &cli.command {
        Command::Init => init(cli),
        Command::Run(daemon) => {
            let config = cli.load_config(daemon)?;
            let shutdown = signals()?;
            crate::foreman::run(&config, Registry::new(), &shutdown)
        }
        Command::Enqueue { name, args, kwargs } => enqueue(cli, name, args, kwargs),
        Command::Status { json } => status(cli, *json),
        Command::CheckConfig(daemon) => {
            let config = cli.load_config(daemon)?;
            config.check_commands()?;
            // Building the registry is what finds a config task clashing with a built-in.
            Registry::new().add_config(&config)?;
            print(&config.to_toml())
        }
    }
}

fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Error::io("writing to stdout", e))
}

fn init(cli: &Cli) -> Result<()> {
    let config = cli.load_config(&DaemonArgs::default())?;
    let mut queue = Queue::open(&config.db, Access::Create)?;
    queue.ensure_schema()?;
    WakeupDir::prepare(&config.wakeup_dir)?;
    print(&format!(
        "initialized {} (schema version {SCHEMA_VERSION}) and wakeup dir {}\n",
        config.db.display(),
        config.wakeup_dir.display()
    ))
}

fn enqueue(cli: &Cli, name: &str, args: &str, kwargs: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::Config("task name must not be empty".to_owned()));
    }
    let args: serde_json::Value = serde_json::from_str(args)
        .map_err(|e| Error::Config(format!("ARGS_JSON is not valid JSON: {e}")))?;
    if !args.is_array() {
        return Err(Error::Config(
            "ARGS_JSON must be a JSON array, e.g. '[1, \"two\"]'".to_owned(),
        ));
    }
    let kwargs: serde_json::Value = serde_json::from_str(kwargs)
        .map_err(|e| Error::Config(format!("--kwargs is not valid JSON: {e}")))?;
    if !kwargs.is_object() {
        return Err(Error::Config(
            "--kwargs must be a JSON object, e.g. '{\"k\": 1}'".to_owned(),
        ));
    }
    let config = cli.load_config(&DaemonArgs::default())?;
    let mut queue = Queue::open(&config.db, Access::ReadWrite)?;
    queue.check_schema()?;
    let id = queue.enqueue(name, &args.to_string(), &kwargs.to_string())?;
    let wakeup = WakeupDir::at(&config.wakeup_dir);
    // The row is committed; a failed wakeup only delays the task until the daemon's next tick.
    if let Err(e) = wakeup.touch(&format!("cli-{}", std::process::id())) {
        log::warn!(
            "task {id} enqueued, but touching {} failed ({e}); it runs at the next tick",
            wakeup.path().display()
        );
    }
    print(&format!("{id}\n"))
}

fn status(cli: &Cli, json: bool) -> Result<()> {
    let config = cli.load_config(&DaemonArgs::default())?;
    let daemon = DaemonState::probe(&config.pid_file)?;
    let queue = Queue::open(&config.db, Access::ReadOnly)?;
    queue.check_schema()?;
    let status = queue.status()?;
    let (running, pid) = match daemon {
        DaemonState::Running { pid } => (true, pid),
        DaemonState::NotRunning => (false, None),
    };
    if json {
        let by_task: serde_json::Map<String, serde_json::Value> = status
            .by_task
            .iter()
            .map(|(name, n)| (name.clone(), (*n).into()))
            .collect();
        let doc = serde_json::json!({
            "db": config.db.display().to_string(),
            "daemon": { "running": running, "pid": pid },
            "queue": {
                "total": status.total,
                "oldest_age_seconds": status.oldest_age_seconds.map(|a| a.max(0.0)),
                "by_task": by_task,
            },
            "dead": status.dead,
        });
        return print(&format!("{doc}\n"));
    }
    let mut out = String::new();
    let daemon_line = match (running, pid) {
        (true, Some(pid)) => format!("running (pid {pid})"),
        (true, None) => "running (pid unknown)".to_owned(),
        (false, _) => "not running".to_owned(),
    };
    let _ = writeln!(out, "daemon   {daemon_line}");
    let _ = writeln!(out, "db       {}", config.db.display());
    let oldest = status
        .oldest_age_seconds
        .map(|a| format!(", oldest queued {:.1}s ago", a.max(0.0)))
        .unwrap_or_default();
    let _ = writeln!(out, "queued   {}{oldest}", status.total);
    let width = status
        .by_task
        .iter()
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(0);
    for (name, count) in &status.by_task {
        let _ = writeln!(out, "  {name:<width$}  {count:>8}");
    }
    let _ = writeln!(out, "dead     {}", status.dead);
    print(&out)
}
