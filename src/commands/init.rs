//! `foreman init`: creates the database (SQLite) or the tables (PostgreSQL, in the connection's
//! `search_path` schema), and for SQLite the wakeup dir; safe to repeat, and safe beside running
//! daemons.

use clap::Args;

use super::{Globals, print};
use crate::database::Database;
use crate::error::Result;
use crate::store::{Access, Store};
use crate::wake::dir::WakeupDir;

/// Create the database, its schema and the wakeup dir (mode 0700); safe to repeat
#[derive(Args, Debug)]
pub struct InitArgs {}

pub fn run(globals: &Globals, _args: &InitArgs) -> Result<()> {
    let config = globals.load_config()?;
    let mut store = Store::open(&config.db, Access::Create)?;
    store.ensure_schema()?;
    let wakeup = match (&config.db, &config.wakeup_dir) {
        (Database::Sqlite(_), Some(dir)) => {
            WakeupDir::prepare(dir)?;
            format!(" and wakeup dir {}", dir.display())
        }
        _ => String::new(),
    };
    print(&format!(
        "initialized {} (schema version {}){wakeup}\n",
        config.db,
        store.schema_version()
    ))
}
