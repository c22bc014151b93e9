//! One file per subcommand: its arguments (clap derive, whose doc comments are its `--help`), its
//! exit codes, and what it does; `cli.rs` only lists them. Shared here: the global flags
//! (`Globals`) and printing; `observe` and `format` serve the operator's commands.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use clap::builder::{OsStringValueParser, TypedValueParser as _};

use crate::config::{Config, Overrides};
use crate::database::Database;
use crate::duration::parse_duration;
use crate::error::{Error, Result};

pub mod bench;
pub mod cancel;
pub mod check_config;
pub mod dead;
pub mod enqueue;
pub mod format;
pub mod health;
pub mod init;
pub mod list;
pub mod metrics;
pub mod observe;
pub mod pause;
pub mod reload;
pub mod resume;
pub mod retry;
pub mod run;
pub mod show;
pub mod stats;
pub mod status;
pub mod ui;
pub mod wait;

/// The flags every subcommand takes, before or after its name.
#[derive(Args, Debug, Default, Clone)]
pub struct Globals {
    /// The database: a SQLite file, or a postgresql:// URL [default: ./foreman.sqlite3]
    #[arg(long, global = true, env = "FOREMAN_DB", value_name = "DB", value_parser = OsStringValueParser::new().map(Database::from_arg))]
    pub db: Option<Database>,
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
}

impl Globals {
    /// The configuration, with the flags over the config file, and `daemon`'s settings over both.
    pub fn load_config_with(&self, daemon: &DaemonArgs) -> Result<Config> {
        let overrides = Overrides {
            db: self.db.clone(),
            wakeup_dir: self.wakeup_dir.clone(),
            pid_file: self.pid_file.clone(),
            workers: daemon.workers,
            graceful_timeout: daemon.graceful_timeout,
            tick: daemon.tick,
            prefetch: daemon.prefetch,
        };
        Config::load(self.config.as_deref(), &overrides)
    }

    /// The configuration as every command but `run` and `check-config` reads it.
    pub fn load_config(&self) -> Result<Config> {
        self.load_config_with(&DaemonArgs::default())
    }
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

/// Writes a command's answer to stdout.
fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Error::io("writing to stdout", e))
}

/// Writes one line to stdout (`foreman ui`'s URL, which a script may wait for).
#[cfg(feature = "ui")]
pub fn print_line(text: &str) -> Result<()> {
    print(&format!("{text}\n"))
}

/// The error of a command that printed its answer and only has its exit status to add.
fn exit_status(code: u8) -> Error {
    Error::Exit {
        code,
        message: None,
    }
}

/// Each id once, in the order given: a repeat would only report on what the first did.
fn distinct(ids: &[i64]) -> Vec<i64> {
    let mut seen = std::collections::HashSet::new();
    ids.iter().copied().filter(|id| seen.insert(*id)).collect()
}

/// Each name once, in the order given.
fn distinct_names(names: &[String]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    names
        .iter()
        .filter(|name| seen.insert(name.as_str()))
        .cloned()
        .collect()
}
