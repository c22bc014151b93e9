//! `foreman check-config`: validates the configuration as `run` would and prints the effective
//! result as TOML.

use super::{DaemonArgs, Globals, print};
use crate::config::Config;
use crate::error::Result;
use crate::registry::Registry;

pub fn run(globals: &Globals, daemon: &DaemonArgs) -> Result<()> {
    let config = globals.load_config_with(daemon)?;
    check(&config)?;
    print(&config.to_toml())
}

/// What `run` (and a reload) checks of a configuration beyond loading it: its programs and
/// directories, and the tasks and schedules it names. `reload` checks the same before it signals.
pub(super) fn check(config: &Config) -> Result<()> {
    config.check_commands()?;
    // Building the registry is what finds a config task clashing with a built-in.
    let mut registry = Registry::new();
    registry.add_config(config, 0)?;
    registry.check_schedules(config)
}
