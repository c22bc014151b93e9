//! `foreman bench`: the arguments of the benchmark; the scenarios, the child daemons they run and
//! the report live in the `bench` module.

use clap::Args;
use crossbeam_channel::Receiver;

use super::Globals;
#[cfg(not(feature = "postgres"))]
use crate::database::Database;
#[cfg(not(feature = "postgres"))]
use crate::error::Error;
use crate::error::Result;
use crate::signals::Shutdown;

const BENCH_HELP: &str = "\
Every scenario runs on a fresh database in a temporary directory (or at --db, which must not exist
yet; --config is not read: the bench writes its own). With --db postgresql://…, every run uses a
fresh schema in that database, dropped afterwards (the user needs CREATE on the database), and
the scenarios pg-cpu-per-task and drain-scale run too. A task counts once it has started, and
each scenario checks that every task ran exactly once.

Exit codes:
  0  every scenario ran correctly (missed targets are reported, not failures)
  1  a correctness check failed (a task lost or run twice), a run broke, or a signal stopped it
  2  usage error";

/// Benchmark the real daemon (run as a child on fresh temporary databases) against the targets
#[derive(Args, Debug)]
#[command(after_help = BENCH_HELP)]
pub struct BenchArgs {
    /// Scenarios to run [default: all; pg-cpu-per-task and drain-scale on PostgreSQL only]
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

/// `signals` is set up only so that a Ctrl-C stops the children and removes the temporary files.
pub fn run(
    globals: &Globals,
    args: &BenchArgs,
    signals: impl FnOnce() -> Result<Receiver<Shutdown>>,
) -> Result<()> {
    let db = globals.db.clone();
    #[cfg(not(feature = "postgres"))]
    if let Some(db @ Database::Postgres(_)) = &db {
        return Err(Error::Config(format!(
            "{db}: this foreman was built without PostgreSQL (cargo feature `postgres`)"
        )));
    }
    let options = crate::bench::Options {
        json: args.json,
        quick: args.quick,
        reps: args.reps,
        scenarios: args.scenarios.clone(),
        db,
        wakeup_dir: globals.wakeup_dir.clone(),
    };
    let shutdown = signals()?;
    crate::bench::run(&options, &shutdown)
}
