//! `foreman check-config`: validates the configuration as `run` would and prints the effective
//! result as TOML.

use super::{DaemonArgs, Globals, print};
use crate::error::Result;
use crate::registry::Registry;

pub fn run(globals: &Globals, daemon: &DaemonArgs) -> Result<()> {
    let config = globals.load_config_with(daemon)?;
    config.check_commands()?;
    // Building the registry is what finds a config task clashing with a built-in.
    let mut registry = Registry::new();
    registry.add_config(&config)?;
    registry.check_schedules(&config)?;
    print(&config.to_toml())
}
