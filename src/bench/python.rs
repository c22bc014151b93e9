//! The Python side of the bench, embedded so that an installed `foreman` binary benchmarks without
//! the repository: the shipped worker and client (`clients/python/`), the pool task that records
//! its start like `foreman.bench` does, and the producer script of the enqueue scenarios.

use std::path::Path;
use std::process::{Command, Stdio};

use serde::Deserialize;

use super::{Failure, Outcome};
use crate::error::{Error, Result};

/// The pool task of drain-pool and the pool latency; rows carry a key in `args`, since a Python
/// task does not see its task id.
pub(crate) const POOL_TASK: &str = "bench.pool";

const FILES: [(&str, &str); 4] = [
    (
        "foreman_worker.py",
        include_str!("../../clients/python/foreman_worker.py"),
    ),
    (
        "foreman_client.py",
        include_str!("../../clients/python/foreman_client.py"),
    ),
    ("foreman_bench_pool.py", POOL_MODULE),
    ("foreman_bench_enqueue.py", ENQUEUE_SCRIPT),
];

const POOL_MODULE: &str = r#""""foreman bench's pool task (written by `foreman bench`): appends "<key> <unix time>" to
$FOREMAN_BENCH_OUT with one os.write, like the built-in foreman.bench, so that the bench counts a
task only once it has started."""
import os
import time

from foreman_worker import task

_out = os.open(os.environ["FOREMAN_BENCH_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


@task(name="bench.pool")
def record(key):
    os.write(_out, b"%d %.6f\n" % (key, time.time()))
"#;

const ENQUEUE_SCRIPT: &str = r#""""foreman bench's Python producer (written by `foreman bench`):
    python3 foreman_bench_enqueue.py DB enqueue|enqueue_many ROWS
inserts ROWS foreman.bench tasks with foreman_client and prints {"seconds": …, "ids": […]}, the
time measured here around the calls alone."""
import json
import sys
import time

from foreman_client import Client


def main():
    db, mode, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with Client(db) as client:
        if mode == "enqueue":
            enqueue = client.enqueue
            start = time.perf_counter()
            ids = [enqueue("foreman.bench") for _ in range(rows)]
            seconds = time.perf_counter() - start
        else:
            items = [("foreman.bench",)] * rows
            start = time.perf_counter()
            ids = client.enqueue_many(items)
            seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "ids": ids}))


main()
"#;

/// Writes the modules into `dir`, which the daemon's pools and the producer script import from.
pub(crate) fn write_modules(dir: &Path) -> Result<()> {
    for (name, text) in FILES {
        let path = dir.join(name);
        std::fs::write(&path, text)
            .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
    }
    Ok(())
}

/// Why the Python figures cannot be had here, or `None` when `python3` runs with its sqlite3
/// (and, for a PostgreSQL bench, psycopg 3).
pub(crate) fn missing(postgres: bool) -> Option<String> {
    let module = if postgres { "psycopg" } else { "sqlite3" };
    let probe = Command::new("python3")
        .args(["-c", &format!("import json, {module}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match probe {
        Ok(status) if status.success() => None,
        Ok(status) => Some(format!(
            "python3 cannot import {module} ({})",
            crate::command::describe(status)
        )),
        Err(e) => Some(format!("python3 not found ({e})")),
    }
}

/// A pool of `processes` Python workers serving `bench.pool`.
pub(crate) fn pool_config(processes: usize) -> String {
    format!(
        "[pools.py]\ncommand = [\"python3\", \"-m\", \"foreman_worker\", \"foreman_bench_pool\"]\n\
         processes = {processes}\n"
    )
}

/// What the producer script printed.
#[derive(Debug, Deserialize)]
pub(crate) struct Enqueued {
    pub seconds: f64,
    pub ids: Vec<i64>,
}

/// Runs the producer script: `mode` is `enqueue` (one row per call) or `enqueue_many`.
pub(crate) fn enqueue(
    dir: &Path,
    db: &std::ffi::OsStr,
    mode: &str,
    rows: usize,
) -> Outcome<Enqueued> {
    let out = Command::new("python3")
        .arg(dir.join("foreman_bench_enqueue.py"))
        .arg(db)
        .arg(mode)
        .arg(rows.to_string())
        .current_dir(dir)
        .env("PYTHONPATH", dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Failure::new(format!("cannot run python3: {e}")))?;
    if !out.status.success() {
        return Err(Failure::new(format!(
            "the Python producer {}: {}",
            crate::command::describe(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        Failure::new(format!(
            "the Python producer printed {:?}: {e}",
            String::from_utf8_lossy(&out.stdout)
        ))
    })
}
