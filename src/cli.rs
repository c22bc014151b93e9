//! The `foreman` command line: the global flags and the list of subcommands, each dispatched in one
//! line to its file under `commands/`, where its arguments, help text and exit codes live.

use clap::{Parser, Subcommand};
use crossbeam_channel::Receiver;

use crate::commands::{
    self, DaemonArgs, Globals, bench::BenchArgs, cancel::CancelArgs, dead::DeadCommand,
    enqueue::EnqueueArgs, health::HealthArgs, init::InitArgs, list::ListArgs, metrics::MetricsArgs,
    pause::PauseArgs, reload::ReloadArgs, resume::ResumeArgs, retry::RetryArgs, show::ShowArgs,
    stats::StatsArgs, status::StatusArgs, ui::UiArgs, wait::WaitArgs,
};
use crate::config::Config;
use crate::error::Result;
use crate::signals::Shutdown;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  runtime failure (database error, daemon already running, a second signal during shutdown…)
  2  usage or configuration error (bad flag, bad config file, bad JSON argument)
`wait`, `show`, `cancel`, `health` and `reload` have exit codes of their own, and `retry` and
`dead requeue` exit 1 when they could not do it for every id: see their --help.";

/// A background-task runner: web apps enqueue by inserting a row into SQLite and touching a file
/// (or into PostgreSQL, with NOTIFY); `foreman run` wakes at once and runs the task.
#[derive(Parser, Debug)]
#[command(name = "foreman", version, about, after_help = EXIT_CODES, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub globals: Globals,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands. Each one's `--help` text is the doc comment of its arguments' struct in
/// `commands/`; `run` and `check-config` share theirs, so their one-line help is here.
#[derive(Subcommand, Debug)]
pub enum Command {
    Init(InitArgs),
    /// Run the daemon until SIGTERM or SIGINT (SIGHUP reloads its configuration)
    Run(DaemonArgs),
    Reload(ReloadArgs),
    Enqueue(EnqueueArgs),
    List(ListArgs),
    Show(ShowArgs),
    Wait(WaitArgs),
    Cancel(CancelArgs),
    Retry(RetryArgs),
    Pause(PauseArgs),
    Resume(ResumeArgs),
    /// List, requeue or purge dead letters: tasks that could not run or ran out of retries
    Dead {
        #[command(subcommand)]
        command: DeadCommand,
    },
    Status(StatusArgs),
    Stats(StatsArgs),
    Health(HealthArgs),
    Metrics(MetricsArgs),
    Ui(UiArgs),
    /// Validate the configuration and print the effective result
    CheckConfig(DaemonArgs),
    Bench(BenchArgs),
}

impl Cli {
    /// The configuration `run` will load, for a binary that sets things up before calling
    /// `execute` (Sentry); `None` for the other commands.
    pub fn run_config(&self) -> Option<Result<Config>> {
        match &self.command {
            Command::Run(daemon) => Some(self.globals.load_config_with(daemon)),
            _ => None,
        }
    }
}

/// Runs the parsed command. `signals` is called only by `run` and `bench`, so that other commands
/// keep the default behaviour of SIGINT.
pub fn execute(cli: &Cli, signals: impl FnOnce() -> Result<Receiver<Shutdown>>) -> Result<()> {
    let globals = &cli.globals;
    match &cli.command {
        Command::Init(args) => commands::init::run(globals, args),
        Command::Run(daemon) => commands::run::run(globals, daemon, signals),
        Command::Reload(args) => commands::reload::run(globals, args),
        Command::Enqueue(args) => commands::enqueue::run(globals, args),
        Command::List(args) => commands::list::run(globals, args),
        Command::Show(args) => commands::show::run(globals, args),
        Command::Wait(args) => commands::wait::run(globals, args),
        Command::Cancel(args) => commands::cancel::run(globals, args),
        Command::Retry(args) => commands::retry::run(globals, args),
        Command::Pause(args) => commands::pause::run(globals, args),
        Command::Resume(args) => commands::resume::run(globals, args),
        Command::Dead { command } => commands::dead::run(globals, command),
        Command::Status(args) => commands::status::run(globals, args),
        Command::Stats(args) => commands::stats::run(globals, args),
        Command::Health(args) => commands::health::run(globals, args),
        Command::Metrics(args) => commands::metrics::run(globals, args),
        Command::Ui(args) => commands::ui::run(globals, args),
        Command::CheckConfig(daemon) => commands::check_config::run(globals, daemon),
        Command::Bench(args) => commands::bench::run(globals, args, signals),
    }
}
