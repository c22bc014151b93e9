//! `foreman run`: the daemon, until SIGTERM or SIGINT (see the foreman loop).

use std::time::Duration;

use clap::Args;
use crossbeam_channel::Receiver;

use super::Globals;
use crate::duration::parse_duration;
use crate::error::Result;
use crate::registry::Registry;
use crate::signals::Shutdown;

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

/// Runs the daemon with the built-in and config-file handlers. `signals` sets up the shutdown
/// signals; it is called only here, so that other commands keep SIGINT's default behaviour.
pub fn run(
    globals: &Globals,
    daemon: &DaemonArgs,
    signals: impl FnOnce() -> Result<Receiver<Shutdown>>,
) -> Result<()> {
    let config = globals.load_config_with(daemon)?;
    let shutdown = signals()?;
    crate::foreman::run(&config, Registry::new(), &shutdown)
}
