//! `foreman bench`: measures the real daemon, run as a child process (`current_exe() run`) on fresh
//! databases in a temporary directory, and reports figures against the project's targets. A task
//! counts only once it has started, which it records itself (`foreman.bench`, or the Python pool
//! task written here), and every scenario checks that each task it enqueued ran exactly once; a
//! missed or repeated task fails the scenario (exit 1), a missed target does not. It never tunes
//! or judges the daemon beyond that: the figures are what they are on this machine.

// Counts of tasks and nanoseconds convert to f64 far below 2^52, where no precision is lost.
#![allow(clippy::cast_precision_loss)]

use std::collections::HashMap;
use std::path::PathBuf;

use crossbeam_channel::Receiver;

use crate::error::{Error, Result};
use crate::signals::Shutdown;

mod daemon;
mod drain;
mod list;
mod machine;
mod postmaster;
mod producer;
mod python;
mod records;
mod report;
mod server;
mod timing;

use daemon::Workspace;
use report::{Progress, ScenarioReport};

/// The scenarios, in the order they run and are reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Scenario {
    /// In-process tasks/s: default (pop ≤ free slots) and with prefetch = 256
    DrainInproc,
    /// Python tasks/s on a pool of 4 processes, plain and pipelined
    DrainPool,
    /// /bin/true per task, as a share of a bare spawn loop in the same run
    DrainCommand,
    /// Daemon CPU µs per in-process task (default and prefetch)
    CpuPerTask,
    /// One producer, one row per transaction + wakeup (Rust and Python client)
    Enqueue,
    /// 10,000 rows in one call (Rust and Python client)
    EnqueueBatch,
    /// Enqueue → start at an idle daemon, p50 / p99
    Latency,
    /// Daemon CPU over an idle window, tick on
    Idle,
    /// Peak RSS after a drain
    Rss,
    /// Spawn → first task started
    Startup,
    /// Drain rate with 1,000,000 queued vs 10,000 queued
    Depth,
    /// Lateness of delayed tasks after their due time, p50 / p99
    Delay,
    /// `foreman list` queries over 1,000,000 queued rows
    List,
    /// PostgreSQL server CPU per drained task, read from its processes (`--db postgresql://…`)
    PgCpuPerTask,
    /// 1, 2 and 4 daemons draining one queue: aggregate tasks/s (`--db postgresql://…`)
    DrainScale,
}

impl Scenario {
    pub const ALL: [Scenario; 15] = [
        Scenario::DrainInproc,
        Scenario::DrainPool,
        Scenario::DrainCommand,
        Scenario::CpuPerTask,
        Scenario::Enqueue,
        Scenario::EnqueueBatch,
        Scenario::Latency,
        Scenario::Idle,
        Scenario::Rss,
        Scenario::Startup,
        Scenario::Depth,
        Scenario::Delay,
        Scenario::List,
        Scenario::PgCpuPerTask,
        Scenario::DrainScale,
    ];

    /// The name on the command line, in the table and in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::DrainInproc => "drain-inproc",
            Scenario::DrainPool => "drain-pool",
            Scenario::DrainCommand => "drain-command",
            Scenario::CpuPerTask => "cpu-per-task",
            Scenario::Enqueue => "enqueue",
            Scenario::EnqueueBatch => "enqueue-batch",
            Scenario::Latency => "latency",
            Scenario::Idle => "idle",
            Scenario::Rss => "rss",
            Scenario::Startup => "startup",
            Scenario::Depth => "depth",
            Scenario::Delay => "delay",
            Scenario::List => "list",
            Scenario::PgCpuPerTask => "pg-cpu-per-task",
            Scenario::DrainScale => "drain-scale",
        }
    }

    /// Whether it measures a PostgreSQL server (a default run on SQLite leaves it out).
    fn postgres_only(self) -> bool {
        matches!(self, Scenario::PgCpuPerTask | Scenario::DrainScale)
    }
}

/// What `foreman bench` was asked for.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// One JSON object per scenario instead of the table.
    pub json: bool,
    /// The CI smoke run: one repetition of small sizes.
    pub quick: bool,
    /// Repetitions per scenario (default 3, 1 with `quick`).
    pub reps: Option<usize>,
    /// Empty: all of them.
    pub scenarios: Vec<Scenario>,
    /// Where the databases go instead of the temporary directory (a SQLite path that must not
    /// exist yet), or the PostgreSQL database whose fresh schemas the runs use.
    pub db: Option<crate::database::Database>,
    /// Where the wakeup dirs go instead of `<db>.wakeup` (must not exist yet).
    pub wakeup_dir: Option<PathBuf>,
}

/// How much work each scenario does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    pub reps: usize,
    /// Tasks per in-process and pool drain, and per drain at depth.
    pub drain_tasks: usize,
    /// `/bin/true` tasks per command drain (and bare spawns).
    pub command_tasks: usize,
    /// Rows the enqueue scenario inserts one by one.
    pub enqueue_rows: usize,
    /// Rows the enqueue-batch scenario inserts in one call.
    pub batch_rows: usize,
    /// Tasks of the latency scenario, 20 ms apart.
    pub latency_tasks: usize,
    pub idle_window: std::time::Duration,
    /// Rows queued behind the measured ones: the shallow and the deep case.
    pub depth_rows: (usize, usize),
    pub delay_tasks: usize,
    /// Delayed tasks are due over this span.
    pub delay_spread: std::time::Duration,
    /// What the machine measurements do before the scenarios.
    pub machine: machine::MachineSizes,
    /// Rows queued for the list scenario.
    pub list_rows: usize,
}

impl Sizes {
    pub fn new(quick: bool, reps: Option<usize>) -> Sizes {
        use std::time::Duration;
        if quick {
            Sizes {
                reps: reps.unwrap_or(1),
                drain_tasks: 2_000,
                command_tasks: 200,
                enqueue_rows: 2_000,
                batch_rows: 10_000,
                latency_tasks: 20,
                idle_window: Duration::from_secs(2),
                depth_rows: (10_000, 100_000),
                delay_tasks: 20,
                delay_spread: Duration::from_millis(500),
                machine: machine::MachineSizes {
                    wakes: 50,
                    pop_rows: 2_000,
                },
                list_rows: 10_000,
            }
        } else {
            Sizes {
                reps: reps.unwrap_or(3),
                drain_tasks: 20_000,
                command_tasks: 2_000,
                enqueue_rows: 20_000,
                batch_rows: 10_000,
                latency_tasks: 200,
                idle_window: Duration::from_secs(30),
                depth_rows: (10_000, 1_000_000),
                delay_tasks: 200,
                delay_spread: Duration::from_secs(2),
                machine: machine::MachineSizes {
                    wakes: 300,
                    pop_rows: 20_000,
                },
                list_rows: 1_000_000,
            }
        }
    }
}

/// Why a scenario did not produce figures.
#[derive(Debug)]
pub(crate) enum Failure {
    /// It could not run, or a task was lost or ran twice: the message says which.
    Failed(String),
    /// A signal asked the bench to stop.
    Interrupted(Shutdown),
}

impl Failure {
    pub fn new(message: impl Into<String>) -> Failure {
        Failure::Failed(message.into())
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Failed(e.to_string())
    }
}

pub(crate) type Outcome<T> = std::result::Result<T, Failure>;

/// Everything a scenario needs: the sizes, the temporary directory, whether Python runs here,
/// the progress line and the signal channel it must keep an eye on.
pub(crate) struct Bench<'a> {
    pub sizes: Sizes,
    pub work: &'a Workspace,
    /// Why the Python figures are skipped, if they are.
    pub no_python: Option<String>,
    /// Why the Python client's figures are skipped (on PostgreSQL it needs psycopg 3).
    pub no_python_client: Option<String>,
    pub progress: Progress,
    pub shutdown: &'a Receiver<Shutdown>,
    /// The in-process drains, by prefetch: drain-inproc, cpu-per-task and rss read the same runs.
    inproc: HashMap<usize, Vec<drain::DrainRun>>,
    /// What the machine allows, measured before the scenarios.
    pub machine: machine::Machine,
    /// The runs are on PostgreSQL (`--db postgresql://…`): its targets apply.
    pub postgres: bool,
}

impl Bench<'_> {
    /// `sqlite` as the target on SQLite, `postgres` on PostgreSQL (issue 16's table).
    pub fn target(
        &self,
        sqlite: impl Into<Option<report::Target>>,
        postgres: impl Into<Option<report::Target>>,
    ) -> Option<report::Target> {
        if self.postgres {
            postgres.into()
        } else {
            sqlite.into()
        }
    }

    /// Stops the bench at a signal; scenarios call it between steps.
    pub fn check_interrupt(&self) -> Outcome<()> {
        match self.shutdown.try_recv() {
            Ok(signal) => Err(Failure::Interrupted(signal)),
            Err(_) => Ok(()),
        }
    }

    /// Sleeps for `duration` unless a signal comes first.
    pub fn pause(&self, duration: std::time::Duration) -> Outcome<()> {
        match self.shutdown.recv_timeout(duration) {
            Ok(signal) => Err(Failure::Interrupted(signal)),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Ok(()),
            // No signal can come any more; the pause must still last (it paces the latency tasks).
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(duration);
                Ok(())
            }
        }
    }
}

/// Runs the chosen scenarios and prints their figures. `Ok` when every scenario ran correctly
/// (missed targets included); exit 1 when one failed or a signal stopped the bench.
pub fn run(options: &Options, shutdown: &Receiver<Shutdown>) -> Result<()> {
    let on_postgres = matches!(options.db, Some(crate::database::Database::Postgres(_)));
    let mut chosen = if options.scenarios.is_empty() {
        // The PostgreSQL scenarios only where they can run (named, they say why they cannot).
        Scenario::ALL
            .into_iter()
            .filter(|s| on_postgres || !s.postgres_only())
            .collect()
    } else {
        options.scenarios.clone()
    };
    chosen.sort_unstable();
    chosen.dedup();
    let sizes = Sizes::new(options.quick, options.reps);
    if sizes.reps == 0 {
        return Err(Error::Config("--reps must be at least 1".to_owned()));
    }
    let work = Workspace::create(options.db.clone(), options.wakeup_dir.clone())?;
    let mut progress = Progress::on_stderr();
    progress.begin("machine".to_owned());
    // On the disk the runs' databases go to: the temporary directory, or --db's.
    let machine_dir = match options.db.as_ref().and_then(|db| db.sqlite_path()) {
        Some(db) => crate::fs_check::suffixed(db, ".machine"),
        None => work.root().join("machine"),
    };
    let measured = std::fs::create_dir(&machine_dir)
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", machine_dir.display())))
        .and_then(|()| machine::measure(&machine_dir, sizes.machine, work.postgres()));
    let _ = std::fs::remove_dir_all(&machine_dir);
    let machine = match measured {
        Ok(machine) => machine,
        Err(Failure::Failed(message)) => {
            return Err(Error::Exit {
                code: 1,
                message: Some(format!("foreman bench: measuring the machine: {message}")),
            });
        }
        Err(Failure::Interrupted(Shutdown(signal))) => {
            return Err(Error::Exit {
                code: 1,
                message: Some(format!("foreman bench: interrupted by signal {signal}")),
            });
        }
    };
    progress.clear();
    let mut bench = Bench {
        sizes,
        work: &work,
        no_python: python::missing(false),
        no_python_client: python::missing(work.postgres().is_some()),
        progress,
        shutdown,
        inproc: HashMap::new(),
        machine,
        postgres: work.postgres().is_some(),
    };
    let out = report::Output::new(options.json, &sizes);
    out.header(&machine);
    let mut reports = Vec::new();
    for scenario in chosen {
        bench.progress.begin(scenario.name().to_owned());
        let report = match run_scenario(&mut bench, scenario) {
            Ok(report) => report,
            Err(Failure::Failed(message)) => ScenarioReport::failed(scenario, sizes.reps, message),
            Err(Failure::Interrupted(Shutdown(signal))) => {
                bench.progress.clear();
                return Err(Error::Exit {
                    code: 1,
                    message: Some(format!("foreman bench: interrupted by signal {signal}")),
                });
            }
        };
        bench.progress.clear();
        out.scenario(&report);
        reports.push(report);
    }
    out.footer(&reports);
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| r.error.is_some())
        .map(|r| r.scenario.name())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Exit {
            code: 1,
            message: Some(format!("foreman bench: failed: {}", failed.join(", "))),
        })
    }
}

fn run_scenario(bench: &mut Bench<'_>, scenario: Scenario) -> Outcome<ScenarioReport> {
    match scenario {
        Scenario::DrainInproc => drain::drain_inproc(bench),
        Scenario::DrainPool => drain::drain_pool(bench),
        Scenario::DrainCommand => drain::drain_command(bench),
        Scenario::CpuPerTask => drain::cpu_per_task(bench),
        Scenario::Rss => drain::rss(bench),
        Scenario::Depth => drain::depth(bench),
        Scenario::Enqueue => producer::enqueue(bench),
        Scenario::EnqueueBatch => producer::enqueue_batch(bench),
        Scenario::Latency => timing::latency(bench),
        Scenario::Idle => timing::idle(bench),
        Scenario::Startup => timing::startup(bench),
        Scenario::Delay => timing::delay(bench),
        Scenario::List => list::list(bench),
        Scenario::PgCpuPerTask => server::pg_cpu_per_task(bench),
        Scenario::DrainScale => server::drain_scale(bench),
    }
}

/// Median, min and max.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` for no values. The median of an even count is the mean of the middle two.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => f64::midpoint(sorted[n / 2 - 1], sorted[n / 2]),
        };
        Some(Spread {
            median,
            min: sorted[0],
            max: sorted[n - 1],
        })
    }
}

/// Nearest-rank percentile of sorted values (what the peers' harness computes); `p` in 1..=100.
pub(crate) fn percentile(sorted: &[f64], p: usize) -> f64 {
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // The values compared are exact.
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_middle() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Spread::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert!(Spread::of(&[]).is_none());
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let values: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&values, 50), 100.0);
        assert_eq!(percentile(&values, 99), 198.0);
        assert_eq!(percentile(&[7.0], 99), 7.0);
    }

    #[test]
    fn scenario_names_match_clap() {
        use clap::ValueEnum as _;
        for scenario in Scenario::ALL {
            let value = scenario.to_possible_value().unwrap();
            assert_eq!(value.get_name(), scenario.name());
        }
        assert_eq!(Scenario::value_variants().len(), Scenario::ALL.len());
    }
}
