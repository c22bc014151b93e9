//! foreman: a background-task runner fed through SQLite. The library holds everything; the binary
//! only parses arguments, sets up logging and signals, and calls `cli::execute`.
//!
//! To run in-process Rust handlers, build a [`Registry`] and call [`run`] from your own `main`
//! (see `examples/inproc.rs`). To enqueue tasks from a Rust program, open a [`Client`] (see
//! `examples/producer.rs`).

pub mod alert;
pub mod bench;
pub mod children;
pub mod cli;
pub mod client;
pub mod clock;
pub mod command;
pub mod commands;
pub mod config;
pub mod cron;
pub mod database;
pub mod duration;
pub mod error;
pub mod foreman;
pub mod fs_check;
pub mod line_budget;
pub mod notify;
pub mod outcome;
pub mod pid_guard;
pub mod process_pool;
pub mod registry;
pub mod schedule;
pub mod signals;
pub mod spawn;
pub mod stats;
pub mod store;
pub mod sys;
pub mod task;
pub mod thread_pool;
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
/// `cargo test` stays quick; `PROPTEST_CASES` sets the count for a long run (README, *Fuzzing*).
#[cfg(test)]
pub(crate) fn fuzz_config(cases: u32) -> proptest::test_runner::Config {
    let mut config = proptest::test_runner::Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}
