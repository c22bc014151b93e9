//! One integration-test crate (it builds once). Every test runs the real `foreman` binary on a temp
//! dir with a real SQLite file, inotify, signals and child processes; the PostgreSQL tests on a
//! throwaway cluster of their own (`pg`).

mod admin;
mod bad_input;
mod bench;
#[cfg(feature = "ui")]
mod browser;
mod cli;
mod cli_reference;
mod commands;
mod control;
mod crash;
mod daemons;
mod drain;
mod environment;
mod faults;
mod frameworks;
mod history;
mod hosts;
mod launch;
mod layout;
mod library;
mod load;
mod monitoring;
mod ops;
mod pg;
mod pipeline;
mod pools;
mod publish;
mod reload;
mod schedules;
mod sentry;
mod shutdown;
mod support;
mod tidy;
#[cfg(feature = "ui")]
mod ui;
