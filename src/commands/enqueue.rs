//! `foreman enqueue`: inserts one task, as a producer would, wakes the daemon, prints the id (of
//! the task holding its unique key, when one does).

use std::time::Duration;

use clap::Args;

use super::{Globals, print};
use crate::config::Config;
use crate::duration::parse_duration;
use crate::error::{Error, Result};
use crate::store::{Access, Enqueued, NewTask, Store};

/// Enqueue a task and print its id
#[derive(Args, Debug)]
pub struct EnqueueArgs {
    /// Task name, e.g. foreman.echo
    pub name: String,
    /// Positional arguments as a JSON array
    #[arg(default_value = "[]", value_name = "ARGS_JSON")]
    pub args: String,
    /// Keyword arguments as a JSON object
    #[arg(long, default_value = "{}", value_name = "JSON")]
    pub kwargs: String,
    /// Start it no sooner than this from now, e.g. 10m
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub delay: Option<Duration>,
    /// Higher runs first: -100 to 100
    #[arg(
        long,
        default_value_t = 0,
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(i64).range(-100..=100),
        value_name = "N"
    )]
    pub priority: i64,
    /// Enqueue only if no task with this key is queued or running; either way, print the id of
    /// the task that has it
    #[arg(long, value_name = "KEY")]
    pub unique: Option<String>,
    /// Print {"id": N, "created": true|false} instead of the id
    #[arg(long)]
    pub json: bool,
}

pub fn run(globals: &Globals, task: &EnqueueArgs) -> Result<()> {
    let (args, kwargs) = checked(&task.name, &task.args, &task.kwargs)?;
    let config = globals.load_config()?;
    let mut store = Store::open_checked(&config.db, Access::ReadWrite)?;
    let enqueued = enqueue(
        &config,
        &mut store,
        &NewTask {
            name: &task.name,
            args: &args,
            kwargs: &kwargs,
            delay: task.delay.unwrap_or_default().as_secs_f64(),
            priority: task.priority,
            origin: None,
            unique_key: task.unique.as_deref(),
        },
    )?;
    let id = enqueued.id;
    if task.json {
        let doc = serde_json::json!({"id": id, "created": enqueued.created});
        return print(&format!("{doc}\n"));
    }
    print(&format!("{id}\n"))
}

/// Checks a task's name, args and kwargs as `enqueue` takes them (the dashboard's form too);
/// returns the args and kwargs as compact JSON text.
pub fn checked(name: &str, args: &str, kwargs: &str) -> Result<(String, String)> {
    if let Some(problem) = crate::task::name_problem(name) {
        return Err(Error::Config(format!("task name {problem}")));
    }
    let args: serde_json::Value = serde_json::from_str(args)
        .map_err(|e| Error::Config(format!("ARGS_JSON is not valid JSON: {e}")))?;
    if !args.is_array() {
        return Err(Error::Config(
            "ARGS_JSON must be a JSON array, e.g. '[1, \"two\"]'".to_owned(),
        ));
    }
    let kwargs: serde_json::Value = serde_json::from_str(kwargs)
        .map_err(|e| Error::Config(format!("--kwargs is not valid JSON: {e}")))?;
    if !kwargs.is_object() {
        return Err(Error::Config(
            "--kwargs must be a JSON object, e.g. '{\"k\": 1}'".to_owned(),
        ));
    }
    Ok((args.to_string(), kwargs.to_string()))
}

/// Inserts a checked task and wakes the daemon when a row was inserted (a task holding its
/// unique key is logged instead): `enqueue` and the dashboard.
pub fn enqueue(config: &Config, store: &mut Store, task: &NewTask<'_>) -> Result<Enqueued> {
    let enqueued = store.enqueue_task(task)?;
    let id = enqueued.id;
    if enqueued.created {
        crate::wake::poke(config, store, &format!("task {id} enqueued"));
    } else if let Some(key) = task.unique_key {
        log::info!("not enqueued: task {id} holds the unique key {key:?}");
    }
    Ok(enqueued)
}
