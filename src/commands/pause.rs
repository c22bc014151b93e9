//! `foreman pause NAME…|--all`: holds task names in the database; the daemons start none of their
//! tasks (they stay queued, set aside from the pop) and their schedules skip their windows, until
//! `foreman resume`. Running tasks run on.

use std::fmt::Write as _;

use clap::Args;

use super::format::age;
use super::{Globals, print};
use crate::clock::unix_now;
use crate::error::{Error, Result};
use crate::store::{Access, Store};

/// Pause task names (or every task): their tasks stay queued and do not start until resumed
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["names", "all"])))]
pub struct PauseArgs {
    /// Task names
    #[arg(value_name = "NAME")]
    pub names: Vec<String>,
    /// Every task, whatever its name (also names not queued yet)
    #[arg(long)]
    pub all: bool,
}

pub fn run(globals: &Globals, args: &PauseArgs) -> Result<()> {
    let names = checked_names(&args.names)?;
    let config = globals.load_config()?;
    let mut store = Store::open_checked(&config.db, Access::ReadWrite)?;
    let now = unix_now();
    let mut out = String::new();
    let targets: Vec<Option<&str>> = if args.all {
        vec![None]
    } else {
        names.iter().map(|n| Some(n.as_str())).collect()
    };
    for name in targets {
        let what = name.map_or_else(|| "every task".to_owned(), |n| format!("task {n}"));
        if store.pause(name, now)? {
            let _ = writeln!(out, "paused {what}");
        } else {
            let since = store
                .control()?
                .paused
                .into_iter()
                .find(|p| p.task_name.as_deref() == name)
                .map(|p| p.since);
            let since = since.map_or_else(String::new, |s| format!(" (for {})", age(now - s)));
            let _ = writeln!(out, "{what} was already paused{since}");
        }
    }
    crate::wake::poke_control(&config, &store, "the pause is recorded");
    print(&out)
}

/// The names, each a valid task name (an empty one would read as `--all`).
pub(super) fn checked_names(names: &[String]) -> Result<Vec<String>> {
    for name in names {
        if let Some(problem) = crate::task::name_problem(name) {
            return Err(Error::Config(format!("task name {name:?} {problem}")));
        }
    }
    Ok(super::distinct_names(names))
}
