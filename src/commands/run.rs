//! `foreman run`: the daemon, until SIGTERM or SIGINT; SIGHUP reloads it (see the foreman loop).

use crossbeam_channel::Receiver;

use super::{DaemonArgs, Globals};
use crate::error::Result;
use crate::registry::Registry;
use crate::signals::Shutdown;

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
