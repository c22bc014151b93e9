//! Cron patterns, parsed once the way both the config check and the schedules use them. A leaf, so
//! that the config can check a pattern without depending on the schedules that run it.

use std::str::FromStr as _;

pub use croner::Cron;

/// Parses a cron pattern the way the daemon will use it (five fields, or six with seconds).
pub fn parse_cron(pattern: &str) -> std::result::Result<Cron, String> {
    Cron::from_str(pattern).map_err(|e| format!("invalid cron pattern {pattern:?}: {e}"))
}
