//! foreman: a background-task runner fed through SQLite. The library holds everything; the binary
//! only parses arguments, sets up logging and signals, and calls `cli::execute`.
//!
//! To run in-process Rust handlers, build a [`Registry`] and call [`run`] from your own `main`
//! (see `examples/inproc.rs`).

pub mod alert;
pub mod bench;
pub mod children;
pub mod cli;
pub mod clock;
pub mod command;
pub mod config;
pub mod db_watch;
pub mod duration;
pub mod error;
pub mod foreman;
pub mod line_budget;
pub mod notify;
pub mod ops;
pub mod pid_guard;
pub mod preflight;
pub mod process_pool;
pub mod queue;
pub mod registry;
pub mod schedule;
pub mod signals;
pub mod spawn;
pub mod stats;
pub mod task;
pub mod thread_pool;
pub mod wakeup;

pub use config::{Config, Overrides};
pub use error::{Error, Result};
pub use foreman::run;
pub use registry::{Registry, TaskResult};
pub use signals::{Shutdown, forward_shutdown_signals};
pub use task::Task;
