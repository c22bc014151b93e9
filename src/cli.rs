//! The `foreman` command line: argument definitions (clap) and what each subcommand does. Output
//! formats live here; the work they report on lives in the other modules.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use crossbeam_channel::Receiver;

use crate::clock::unix_now;
use crate::config::{Config, Overrides};
use crate::db_watch::DbWatch;
use crate::duration::{format_duration, parse_duration};
use crate::error::{Error, Result};
use crate::ops::stats::Stats;
use crate::ops::status::Status;
use crate::ops::{self, Style, Thresholds, metrics, one_line};
use crate::outcome::headline;
use crate::queue::admin::{CancelOutcome, DeadLetter, DeadSelection, Requeued, TaskProgress};
use crate::queue::{Access, NewTask, Queue, SCHEMA_VERSION};
use crate::registry::Registry;
use crate::signals::Shutdown;
use crate::wakeup::WakeupDir;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  runtime failure (database error, daemon already running, a second signal during shutdown…)
  2  usage or configuration error (bad flag, bad config file, bad JSON argument)
`wait` and `health` have exit codes of their own, and `cancel` and `dead requeue` exit 1 when they
could not do it for every id: see their --help.";

// `wait` answers with its status, so its codes differ from the others' on purpose.
const WAIT_EXIT_CODES: &str = "\
Exit codes:
  0  the task is done
  1  it failed for good: failed, timeout or lost with no retry left, dead, or cancelled
     (also a runtime failure such as a database error, told apart by its message on stderr)
  2  --timeout passed first (stderr says the state the task is in), or a usage error
  3  no task has this id (never enqueued, or its history was pruned)";

// `health` is a probe: Docker reads any exit but 0 as unhealthy and reserves 2, so every
// unhealthy verdict is 1 and 2 stays a usage error.
const HEALTH_EXIT_CODES: &str = "\
Exit codes:
  0  healthy: the daemon runs, its heartbeat is fresh, and no task waits past --max-queue-age
     while a worker is free (busy workers or a saturated pool are healthy)
  1  unhealthy; the line says why: daemon_down, heartbeat_stale, stalled, db_error
  2  usage or configuration error

Examples:
  Dockerfile:  HEALTHCHECK --interval=30s CMD foreman health
  Kubernetes:  livenessProbe: {exec: {command: [foreman, health, --max-age, 30s]}}";

const CANCEL_EXIT_CODES: &str = "\
Exit codes:
  0  every task was cancelled
  1  at least one was not (it had started, had finished or does not exist), or a runtime failure
  2  usage error";

const REQUEUE_EXIT_CODES: &str = "\
Exit codes:
  0  every selected dead letter was requeued
  1  at least one was not (unknown id, or no task name), or a runtime failure
  2  usage error (neither IDs nor --all, or both)";

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
    Enqueue(EnqueueArgs),
    /// Wait for a task's outcome, across its retries, and print it
    #[command(after_help = WAIT_EXIT_CODES)]
    Wait {
        /// Task id, as enqueue printed it
        id: i64,
        /// Give up after this long
        #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
        timeout: Duration,
        /// One JSON document instead of text
        #[arg(long)]
        json: bool,
    },
    /// Cancel queued tasks that have not started yet
    #[command(after_help = CANCEL_EXIT_CODES)]
    Cancel {
        /// Task ids
        #[arg(required = true, value_name = "ID")]
        ids: Vec<i64>,
    },
    /// List, requeue or purge dead letters: tasks that could not run or ran out of retries
    Dead {
        #[command(subcommand)]
        command: DeadCommand,
    },
    /// Show the daemon (up or down, uptime, heartbeat), workers, running tasks, the queue per task
    /// name, dead letters and the last minute's throughput
    Status {
        /// One JSON document instead of text
        #[arg(long)]
        json: bool,
    },
    /// Per task name over a window: attempts, failures, p50/max wall and wait times, and a trend
    Stats {
        /// How far back to look, e.g. 1h, 24h, 7d
        #[arg(long, default_value = "1h", value_parser = parse_duration, value_name = "DURATION")]
        window: Duration,
        /// Only this task name
        #[arg(long, value_name = "NAME")]
        task: Option<String>,
        /// One JSON document instead of text
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 if the daemon is healthy, else 1 with one line saying why (for Docker and Kubernetes)
    #[command(after_help = HEALTH_EXIT_CODES)]
    Health {
        /// A heartbeat older than this is stale [default: 6 × the heartbeat setting, 30s]
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        max_age: Option<Duration>,
        /// A due task waiting longer than this while a worker is free is a stall
        #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
        max_queue_age: Duration,
        /// One JSON document instead of the line
        #[arg(long)]
        json: bool,
    },
    /// Print status figures in the Prometheus text format (for node_exporter's textfile collector)
    Metrics {
        /// Write them to FILE atomically (temporary file and rename) instead of stdout
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Validate the configuration and print the effective result
    CheckConfig(DaemonArgs),
    /// Benchmark the real daemon (run as a child on fresh temporary databases) against the targets
    #[command(after_help = BENCH_HELP)]
    Bench(BenchArgs),
}

const BENCH_HELP: &str = "\
Every scenario runs on a fresh database in a temporary directory (or at --db, which must not exist
yet; --config is not read: the bench writes its own). A task counts once it has started, and each
scenario checks that every task ran exactly once.

Exit codes:
  0  every scenario ran correctly (missed targets are reported, not failures)
  1  a correctness check failed (a task lost or run twice), a run broke, or a signal stopped it
  2  usage error";

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Scenarios to run [default: all]
    #[arg(value_enum, value_name = "SCENARIO")]
    pub scenarios: Vec<crate::bench::Scenario>,
    /// One JSON object per scenario per line instead of the table
    #[arg(long)]
    pub json: bool,
    /// Small sizes and one repetition (under 20 s): a smoke test of correctness, not a measurement
    #[arg(long)]
    pub quick: bool,
    /// Repetitions per scenario [default: 3, or 1 with --quick]
    #[arg(long, value_name = "N")]
    pub reps: Option<usize>,
}

#[derive(Args, Debug)]
pub struct EnqueueArgs {
    /// Task name, e.g. foreman.echo
    pub name: String,
    /// Positional arguments as a JSON array
    #[arg(default_value = "[]", value_name = "ARGS_JSON")]
    pub args: String,
    /// Keyword arguments as a JSON object
    #[arg(long, default_value = "{}", value_name = "JSON")]
    pub kwargs: String,
    /// Start it no sooner than this from now, e.g. 10m
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub delay: Option<Duration>,
    /// Higher runs first: -100 to 100
    #[arg(
        long,
        default_value_t = 0,
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(i64).range(-100..=100),
        value_name = "N"
    )]
    pub priority: i64,
}

#[derive(Subcommand, Debug)]
pub enum DeadCommand {
    /// List dead letters, newest first
    List {
        /// One JSON document instead of text
        #[arg(long)]
        json: bool,
        /// Only those of this task name
        #[arg(long, value_name = "NAME")]
        task: Option<String>,
        /// Show at most this many
        #[arg(long, default_value_t = 100, value_name = "N")]
        limit: usize,
    },
    /// Queue dead letters again as new tasks (same name, args, kwargs and priority; due now)
    #[command(after_help = REQUEUE_EXIT_CODES)]
    #[command(group(clap::ArgGroup::new("which").required(true).args(["ids", "all"])))]
    Requeue {
        /// Dead-letter ids (the first column of dead list, not task ids)
        #[arg(value_name = "ID")]
        ids: Vec<i64>,
        /// Every dead letter (or every one of --task)
        #[arg(long)]
        all: bool,
        /// With --all: only those of this task name
        #[arg(long, value_name = "NAME", conflicts_with = "ids")]
        task: Option<String>,
    },
    /// Delete dead letters and print how many
    Purge {
        /// Only those that died longer ago than this, e.g. 30d [default: all]
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        older_than: Option<Duration>,
        /// Only those of this task name
        #[arg(long, value_name = "NAME")]
        task: Option<String>,
    },
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
    /// Tasks popped ahead of free workers (faster; a crash loses them) [default: 0]
    #[arg(long, env = "FOREMAN_PREFETCH", value_name = "N")]
    pub prefetch: Option<usize>,
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
            prefetch: daemon.prefetch,
        }
    }

    fn load_config(&self, daemon: &DaemonArgs) -> Result<Config> {
        Config::load(self.config.as_deref(), &self.overrides(daemon))
    }

    /// The configuration `run` will load, for a binary that sets things up before calling
    /// `execute` (Sentry); `None` for the other commands.
    pub fn run_config(&self) -> Option<Result<Config>> {
        match &self.command {
            Command::Run(daemon) => Some(self.load_config(daemon)),
            _ => None,
        }
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
        Command::Enqueue(task) => enqueue(cli, task),
        Command::Wait { id, timeout, json } => wait(cli, *id, *timeout, *json),
        Command::Cancel { ids } => cancel(cli, ids),
        Command::Dead { command } => dead(cli, command),
        Command::Status { json } => {
            let config = cli.load_config(&DaemonArgs::default())?;
            let status = Status::read(&ops::open(&config)?, &config)?;
            print(&if *json {
                status.json()
            } else {
                status.text(Style {
                    colour: ops::colour_wanted(),
                })
            })
        }
        Command::Stats { window, task, json } => {
            let config = cli.load_config(&DaemonArgs::default())?;
            let stats = Stats::read(&ops::open(&config)?, &config, *window, task.as_deref())?;
            print(&if *json {
                stats.json()
            } else {
                stats.text(Style {
                    colour: ops::colour_wanted(),
                })
            })
        }
        Command::Health {
            max_age,
            max_queue_age,
            json,
        } => {
            let config = cli.load_config(&DaemonArgs::default())?;
            let thresholds = Thresholds {
                max_age: max_age.unwrap_or(Thresholds::defaults(&config).max_age),
                max_queue_age: *max_queue_age,
            };
            let (text, healthy) = ops::health::run(&config, thresholds, *json);
            print(&text)?;
            if healthy {
                Ok(())
            } else {
                Err(Error::Exit {
                    code: 1,
                    message: None,
                })
            }
        }
        Command::Metrics { output } => {
            let config = cli.load_config(&DaemonArgs::default())?;
            let text = metrics::render(&Status::read(&ops::open(&config)?, &config)?);
            match output {
                Some(path) => metrics::write_atomically(path, &text),
                None => print(&text),
            }
        }
        Command::Bench(args) => {
            let options = crate::bench::Options {
                json: args.json,
                quick: args.quick,
                reps: args.reps,
                scenarios: args.scenarios.clone(),
                db: cli.db.clone(),
                wakeup_dir: cli.wakeup_dir.clone(),
            };
            // Only so that a Ctrl-C stops the children and removes the temporary files.
            let shutdown = signals()?;
            crate::bench::run(&options, &shutdown)
        }
        Command::CheckConfig(daemon) => {
            let config = cli.load_config(daemon)?;
            config.check_commands()?;
            // Building the registry is what finds a config task clashing with a built-in.
            let mut registry = Registry::new();
            registry.add_config(&config)?;
            registry.check_schedules(&config)?;
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

fn enqueue(cli: &Cli, task: &EnqueueArgs) -> Result<()> {
    if let Some(problem) = crate::task::name_problem(&task.name) {
        return Err(Error::Config(format!("task name {problem}")));
    }
    let args: serde_json::Value = serde_json::from_str(&task.args)
        .map_err(|e| Error::Config(format!("ARGS_JSON is not valid JSON: {e}")))?;
    if !args.is_array() {
        return Err(Error::Config(
            "ARGS_JSON must be a JSON array, e.g. '[1, \"two\"]'".to_owned(),
        ));
    }
    let kwargs: serde_json::Value = serde_json::from_str(&task.kwargs)
        .map_err(|e| Error::Config(format!("--kwargs is not valid JSON: {e}")))?;
    if !kwargs.is_object() {
        return Err(Error::Config(
            "--kwargs must be a JSON object, e.g. '{\"k\": 1}'".to_owned(),
        ));
    }
    let config = cli.load_config(&DaemonArgs::default())?;
    let mut queue = Queue::open(&config.db, Access::ReadWrite)?;
    queue.check_schema()?;
    let id = queue.enqueue_task(&NewTask {
        name: &task.name,
        args: &args.to_string(),
        kwargs: &kwargs.to_string(),
        delay: task.delay.unwrap_or_default().as_secs_f64(),
        priority: task.priority,
        origin: None,
    })?;
    wake_daemon(&config, &format!("task {id} enqueued"));
    print(&format!("{id}\n"))
}

/// What a producer does after its commit. The rows are committed already: a failed wakeup only
/// delays them until the daemon's next tick, so it is a warning.
fn wake_daemon(config: &Config, done: &str) {
    let wakeup = WakeupDir::at(&config.wakeup_dir);
    if let Err(e) = wakeup.touch(&format!("cli-{}", std::process::id())) {
        log::warn!(
            "{done}, but touching {} failed ({e}); the daemon sees it at its next tick",
            wakeup.path().display()
        );
    }
}

/// How long `wait` goes without looking at the database when it sees no change: a missed inotify
/// event, or a watch that could not be set up, costs at most this.
const WAIT_FALLBACK: Duration = Duration::from_secs(1);
/// The least time between two looks: a task's commits come in bursts (its pop, its end, other
/// tasks' commits meanwhile), and one look per burst is enough.
const WAIT_MIN_GAP: Duration = Duration::from_millis(5);
/// The width `dead list` fits its lines to, by shortening the reason.
const LINE_WIDTH: usize = 100;

fn wait(cli: &Cli, id: i64, timeout: Duration, json: bool) -> Result<()> {
    let config = cli.load_config(&DaemonArgs::default())?;
    let queue = Queue::open(&config.db, Access::ReadOnly)?;
    queue.check_schema()?;
    // Set up before the first look, so that a commit between the two is not missed.
    let watch = DbWatch::new(&config.db);
    let deadline = Instant::now().checked_add(timeout);
    loop {
        let looked_at = Instant::now();
        let Some(progress) = queue.task_progress(id)? else {
            return Err(Error::Exit {
                code: 3,
                message: Some(format!(
                    "no task {id} (never enqueued, or its history was pruned)"
                )),
            });
        };
        if progress.is_final {
            print(&if json {
                progress_json(&progress)
            } else {
                outcome_line(&progress)
            })?;
            if progress.succeeded() {
                return Ok(());
            }
            return Err(Error::Exit {
                code: 1,
                message: None,
            });
        }
        let remaining = deadline.map_or(WAIT_FALLBACK, |deadline| {
            deadline.saturating_duration_since(Instant::now())
        });
        if remaining.is_zero() {
            if json {
                print(&progress_json(&progress))?;
            }
            return Err(Error::Exit {
                code: 2,
                message: Some(format!(
                    "task {id} still {} after {}",
                    progress.state,
                    format_duration(timeout)
                )),
            });
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

/// `task 12 done (attempt 2, ran 0.31s)`, `task 12 failed (attempt 3): <the error's last line>`.
fn outcome_line(progress: &TaskProgress) -> String {
    let id = progress.task_id;
    if progress.state == "done" {
        let ran = match (progress.started_at, progress.finished_at) {
            (Some(started), Some(finished)) => {
                format!(", ran {:.2}s", (finished - started).max(0.0))
            }
            _ => String::new(),
        };
        return format!("task {id} done (attempt {}{ran})\n", progress.attempt);
    }
    let attempt = if progress.attempt == 0 {
        "never ran".to_owned()
    } else {
        format!("attempt {}", progress.attempt)
    };
    let error = progress
        .error
        .as_deref()
        .and_then(headline)
        .map(|line| format!(": {line}"))
        .unwrap_or_default();
    format!("task {id} {} ({attempt}){error}\n", progress.state)
}

fn progress_json(progress: &TaskProgress) -> String {
    let doc = serde_json::json!({
        "task_id": progress.task_id,
        "task_name": progress.task_name,
        "state": progress.state,
        "attempt": progress.attempt,
        "final": progress.is_final,
        "error": progress.error,
        "enqueued_at": progress.enqueued_at,
        "started_at": progress.started_at,
        "finished_at": progress.finished_at,
    });
    format!("{doc}\n")
}

/// Each id once, in the order given: a repeat would only report on what the first did.
fn distinct(ids: &[i64]) -> Vec<i64> {
    let mut seen = std::collections::HashSet::new();
    ids.iter().copied().filter(|id| seen.insert(*id)).collect()
}

fn cancel(cli: &Cli, ids: &[i64]) -> Result<()> {
    let config = cli.load_config(&DaemonArgs::default())?;
    let mut queue = Queue::open(&config.db, Access::ReadWrite)?;
    queue.check_schema()?;
    let mut every_one = true;
    for id in distinct(ids) {
        // Each in its own transaction, and printed at once: what was cancelled stays cancelled
        // and reported even if a later id fails.
        let outcome = queue.cancel(id)?;
        every_one &= matches!(outcome, CancelOutcome::Cancelled { .. });
        print(&match outcome {
            CancelOutcome::Cancelled { task_name } => {
                format!("cancelled task {id} ({task_name})\n")
            }
            CancelOutcome::Running { leased: false } => format!(
                "task {id} is running and cannot be cancelled: under at-most-once delivery a started task runs to its end\n"
            ),
            CancelOutcome::Running { leased: true } => format!(
                "task {id} is running and cannot be cancelled: a started task runs to its end (at-least-once: its row goes when it finishes)\n"
            ),
            CancelOutcome::Finished { state } => format!("task {id} already finished ({state})\n"),
            CancelOutcome::Unknown => format!("no task {id}\n"),
        })?;
    }
    if every_one {
        Ok(())
    } else {
        Err(Error::Exit {
            code: 1,
            message: None,
        })
    }
}

fn dead(cli: &Cli, command: &DeadCommand) -> Result<()> {
    let config = cli.load_config(&DaemonArgs::default())?;
    match command {
        DeadCommand::List { json, task, limit } => {
            dead_list(&config, *json, task.as_deref(), *limit)
        }
        DeadCommand::Requeue { ids, all, task } => {
            let which = if *all {
                DeadSelection::All {
                    task: task.as_deref(),
                }
            } else {
                DeadSelection::Ids(ids)
            };
            dead_requeue(&config, which)
        }
        DeadCommand::Purge { older_than, task } => {
            let mut queue = Queue::open(&config.db, Access::ReadWrite)?;
            queue.check_schema()?;
            let purged = queue.purge_dead(*older_than, task.as_deref())?;
            let plural = if purged == 1 { "" } else { "s" };
            print(&format!("purged {purged} dead letter{plural}\n"))
        }
    }
}

fn dead_list(config: &Config, json: bool, task: Option<&str>, limit: usize) -> Result<()> {
    let queue = Queue::open(&config.db, Access::ReadOnly)?;
    queue.check_schema()?;
    let page = queue.dead_letters(task, limit)?;
    if json {
        let dead: Vec<serde_json::Value> = page.rows.iter().map(dead_json).collect();
        let doc = serde_json::json!({ "total": page.total, "dead": dead });
        return print(&format!("{doc}\n"));
    }
    let mut out = if page.total == 0 {
        "no dead letters\n".to_owned()
    } else {
        dead_table(&page.rows)
    };
    if usize::try_from(page.total).is_ok_and(|total| total > page.rows.len()) {
        let _ = writeln!(
            out,
            "showing the newest {} of {} dead letters (--limit N shows more)",
            page.rows.len(),
            page.total
        );
    }
    print(&out)
}

/// Aligned columns, one dead letter a line; the reason is its last line, cut to fit.
fn dead_table(rows: &[DeadLetter]) -> String {
    const HEADER: [&str; 6] = ["DEAD", "TASK", "NAME", "ATTEMPTS", "DIED", "REASON"];
    let now = unix_now();
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|dead| {
            [
                dead.id.to_string(),
                dead.task_id.to_string(),
                one_line(dead.task_name.as_deref().unwrap_or("(null)"), 40),
                dead.attempts.to_string(),
                dead.died_at
                    .map_or_else(|| "?".to_owned(), |t| ago(now - t)),
                headline(&dead.reason).unwrap_or_default().to_owned(),
            ]
        })
        .collect();
    let mut widths = HEADER.map(|h| h.chars().count());
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let reason_width = LINE_WIDTH
        .saturating_sub(widths[..5].iter().sum::<usize>() + 2 * 5)
        .max(20);
    let mut out = String::new();
    let header = HEADER.map(str::to_owned);
    for [dead, task, name, attempts, died, reason] in std::iter::once(&header).chain(&cells) {
        let [w0, w1, w2, w3, w4, _] = widths;
        let reason = one_line(reason, reason_width);
        let _ = writeln!(
            out,
            "{dead:>w0$}  {task:>w1$}  {name:<w2$}  {attempts:>w3$}  {died:<w4$}  {reason}"
        );
    }
    out
}

/// `12s ago`, `3m ago`, `5h ago`, `2d ago`.
fn ago(seconds: f64) -> String {
    #[allow(clippy::cast_sign_loss)] // Clamped to 0 first; a clock step back is "0s ago".
    let seconds = seconds.max(0.0) as u64;
    match seconds {
        0..60 => format!("{seconds}s ago"),
        60..3600 => format!("{}m ago", seconds / 60),
        3600..86_400 => format!("{}h ago", seconds / 3600),
        _ => format!("{}d ago", seconds / 86_400),
    }
}

fn dead_json(dead: &DeadLetter) -> serde_json::Value {
    serde_json::json!({
        "id": dead.id,
        "task_id": dead.task_id,
        "task_name": dead.task_name,
        "args": stored_json(dead.args.as_deref()),
        "kwargs": stored_json(dead.kwargs.as_deref()),
        "reason": dead.reason,
        "created_at": dead.created_at,
        "died_at": dead.died_at,
        "attempts": dead.attempts,
        "priority": dead.priority,
        "origin": dead.origin,
    })
}

/// A column a producer wrote: its JSON when it is JSON, else its text as a string (a row is often
/// dead precisely because it is not JSON).
fn stored_json(text: Option<&str>) -> serde_json::Value {
    text.map_or(serde_json::Value::Null, |text| {
        serde_json::from_str(text).unwrap_or_else(|_| text.into())
    })
}

fn dead_requeue(config: &Config, which: DeadSelection<'_>) -> Result<()> {
    let ids;
    let which = match which {
        DeadSelection::Ids(given) => {
            ids = distinct(given);
            DeadSelection::Ids(&ids)
        }
        all @ DeadSelection::All { .. } => all,
    };
    let mut queue = Queue::open(&config.db, Access::ReadWrite)?;
    queue.check_schema()?;
    let outcomes = queue.requeue_dead(which)?;
    let requeued = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, Requeued::Task { .. }))
        .count();
    if requeued > 0 {
        wake_daemon(config, &format!("{requeued} dead letter(s) requeued"));
    }
    let mut out = String::new();
    for outcome in &outcomes {
        let _ = match outcome {
            Requeued::Task { dead_id, task_id } => {
                writeln!(out, "requeued dead {dead_id} as task {task_id}")
            }
            Requeued::NoName { dead_id } => writeln!(
                out,
                "dead {dead_id} has no task name and cannot be requeued; it stays in foreman_dead"
            ),
            Requeued::Unknown { dead_id } => writeln!(out, "no dead letter {dead_id}"),
        };
    }
    if outcomes.is_empty() {
        out.push_str("no dead letters to requeue\n");
    }
    print(&out)?;
    if requeued == outcomes.len() {
        Ok(())
    } else {
        Err(Error::Exit {
            code: 1,
            message: None,
        })
    }
}
