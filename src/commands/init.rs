//! `foreman init`: creates the database, its schema and (for SQLite) the wakeup dir; safe to
//! repeat, and safe beside a running daemon.

use clap::Args;

use super::{Globals, print};
use crate::error::Result;
use crate::store::{Access, SCHEMA_VERSION, Store};
use crate::wake::dir::WakeupDir;

/// Create the database, its schema and the wakeup dir (mode 0700); safe to repeat
#[derive(Args, Debug)]
pub struct InitArgs {}

pub fn run(globals: &Globals, _args: &InitArgs) -> Result<()> {
    let config = globals.load_config()?;
    let mut store = Store::open(&config.db, Access::Create)?;
    store.ensure_schema()?;
    let wakeup = match &config.wakeup_dir {
        Some(dir) => {
            WakeupDir::prepare(dir)?;
            format!(" and wakeup dir {}", dir.display())
        }
        None => String::new(),
    };
    print(&format!(
        "initialized {} (schema version {SCHEMA_VERSION}){wakeup}\n",
        config.db
    ))
}
