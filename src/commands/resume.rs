//! `foreman resume NAME…|--all`: lifts pauses; the daemons put the tasks a pause held back into
//! the queue again, in their order, and start them as usual.

use std::fmt::Write as _;

use clap::Args;

use super::pause::checked_names;
use super::{Globals, print};
use crate::error::Result;
use crate::store::{Access, Store};

/// Resume paused task names (or everything): their queued tasks start again
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["names", "all"])))]
pub struct ResumeArgs {
    /// Task names
    #[arg(value_name = "NAME")]
    pub names: Vec<String>,
    /// Every pause: `pause --all` and every paused name
    #[arg(long)]
    pub all: bool,
}

pub fn run(globals: &Globals, args: &ResumeArgs) -> Result<()> {
    let names = checked_names(&args.names)?;
    let config = globals.load_config()?;
    let mut store = Store::open_checked(&config.db, Access::ReadWrite)?;
    let mut out = String::new();
    if args.all {
        let lifted = store.resume(None)?;
        let _ = match lifted {
            0 => writeln!(out, "nothing was paused"),
            1 => writeln!(out, "resumed everything (1 pause lifted)"),
            n => writeln!(out, "resumed everything ({n} pauses lifted)"),
        };
    } else {
        for name in &names {
            let _ = if store.resume(Some(name))? > 0 {
                writeln!(out, "resumed task {name}")
            } else {
                writeln!(out, "task {name} was not paused")
            };
        }
        if store
            .control()?
            .paused
            .iter()
            .any(|p| p.task_name.is_none())
        {
            out.push_str("every task is still paused (foreman pause --all): foreman resume --all lifts that\n");
        }
    }
    crate::wake::poke_control(&config, &store, "the resume is recorded");
    print(&out)
}
