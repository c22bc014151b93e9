//! Enqueueing from a Rust program with `foreman::Client`, and waiting for a result.
//!
//! In one shell: `cargo run -- init && cargo run -- run`; in another:
//! `cargo run --example producer` (or `cargo run --example producer -- path/to/foreman.sqlite3`).

use std::time::Duration;

use foreman::{Client, TaskSpec};
use serde_json::json;

fn main() {
    let db = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "foreman.sqlite3".to_owned());
    if let Err(e) = produce(&db) {
        eprintln!("producer: {e}");
        std::process::exit(e.exit_code());
    }
}

fn produce(db: &str) -> foreman::Result<()> {
    // One connection; share it between threads with an `Arc<Client>`.
    let client = Client::open(db)?;

    // A task with args (anything that serializes to a JSON array) and kwargs.
    let hello = client.enqueue(
        &TaskSpec::new("foreman.echo")
            .args(("hello", 1))
            .kwargs(json!({"from": "examples/producer.rs"})),
    )?;
    println!("enqueued task {}", hello.id);

    // At most one such task queued or running at a time: the second enqueue finds the first.
    let report = TaskSpec::new("foreman.echo")
        .args(["nightly report"])
        .unique_key("report-2026-01-01")
        .delay(Duration::from_mins(1))
        .priority(5);
    let first = client.enqueue(&report)?;
    let again = client.enqueue(&report)?;
    println!(
        "report: task {} (created: {}), then task {} (created: {})",
        first.id, first.created, again.id, again.created
    );

    // Many tasks in one transaction: all of them or none.
    let batch: Vec<TaskSpec> = (0..3)
        .map(|n| TaskSpec::new("foreman.echo").args([n]))
        .collect();
    let ids: Vec<i64> = client.enqueue_many(&batch)?.iter().map(|e| e.id).collect();
    println!("enqueued tasks {ids:?}");

    // The result of a task (foreman.echo returns none), or why there is none.
    match client.wait(hello.id, Duration::from_secs(10)) {
        Ok(result) => println!("task {} done, result {result:?}", hello.id),
        Err(foreman::Error::Task(why)) => println!("no result: {why}"),
        Err(e) => return Err(e),
    }
    Ok(())
}
