//! foreman: a background-task runner fed through SQLite or PostgreSQL. The library holds
//! everything; the binary only parses arguments, sets up logging and signals, and calls
//! `cli::execute`.
//!
//! To run in-process Rust handlers, build a [`Registry`] and call [`run`] from your own `main`
//! (see `examples/inproc.rs`). To enqueue tasks from a Rust program, open a [`Client`] (see
//! `examples/producer.rs`).
//!
//! # Layout
//!
//! Top-down, each layer using only the ones below it (ARCHITECTURE.md has the map):
//! - the command line: `cli`, `commands` (one file per subcommand), `bench`, `ui` (the web
//!   dashboard `foreman ui` serves); `client` (the Rust producer API);
//! - the daemon: `foreman` (the loop), `schedule`, `stats`, `notify`, `alert`, `wake`;
//! - the workers: `registry`, `thread_pool`, `command`, `spawn`, `process_pool`, `children`,
//!   `line_budget`, `outcome`;
//! - the store: `store` (every line of SQL);
//! - the leaves: `config`, `database`, `task`, `cron`, `clock`, `duration`, `error`, `fs_check`,
//!   `sys`, `pid_guard`, `reload_report`, `signals`.
//!
//! Public are the modules a binary, a test or an embedding program needs; the rest is private.

pub mod alert;
mod bench;
mod children;
pub mod cli;
mod client;
mod clock;
mod command;
mod commands;
pub mod config;
mod cron;
mod database;
mod duration;
mod error;
mod foreman;
mod fs_check;
mod line_budget;
mod notify;
mod outcome;
mod pid_guard;
mod process_pool;
mod registry;
mod reload_report;
mod schedule;
mod signals;
mod spawn;
mod stats;
pub mod store;
mod sys;
mod task;
mod thread_pool;
#[cfg(feature = "ui")]
mod ui;
pub mod wake;

pub use client::{Client, TaskError, TaskSpec};
pub use config::{Config, Overrides};
pub use database::Database;
pub use error::{Error, Result};
pub use foreman::run;
pub use outcome::{Cancelled, Uneventful};
pub use registry::{Registry, TaskResult, ValueResult};
pub use signals::{Shutdown, forward_shutdown_signals};
pub use store::Enqueued;
pub use task::Task;

/// The settings of the property tests (the `fuzz` modules): `cases` each by default, so that
/// `cargo test` stays quick; `PROPTEST_CASES` sets the count for a long run (CONTRIBUTING.md,
/// *Fuzzing*).
#[cfg(test)]
pub(crate) fn fuzz_config(cases: u32) -> proptest::test_runner::Config {
    let mut config = proptest::test_runner::Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}
