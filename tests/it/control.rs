//! Control over every task (issue 18), with the real binary, daemon and workers: `list` at a million
//! rows, `show`, results from command, pool and Python-client tasks, aborts of running command and
//! pool tasks, pause and resume, unique keys raced by real producer processes, and `retry` of a
//! task lost in a `kill -9`.

use std::os::unix::fs::PermissionsExt;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::on_both;
use crate::support::{
    Env, PATIENCE, RECORD_TASK, is_dead, processes_with_env, records, stderr, wait_record,
    wait_until,
};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_out(out: &Output) -> Value {
    serde_json::from_str(&stdout(out))
        .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(out), stderr(out)))
}

fn enqueue(env: &Env, args: &[&str]) -> i64 {
    let mut full = vec!["enqueue"];
    full.extend_from_slice(args);
    env.ok(&full).trim().parse().expect("enqueue prints an id")
}

/// (state, attempt) of every attempt of task `id`.
fn runs(env: &Env, id: i64) -> Vec<(String, i64)> {
    env.rows(&format!(
        "SELECT state, attempt FROM foreman_run WHERE task_id = {id} ORDER BY attempt"
    ))
    .into_iter()
    .map(|r| {
        (
            r[0].clone().unwrap(),
            r[1].as_deref().unwrap().parse().unwrap(),
        )
    })
    .collect()
}

fn ids(list: &Value) -> Vec<i64> {
    list.as_array()
        .unwrap_or_else(|| panic!("not an array: {list}"))
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .collect()
}

// ---- list ----

#[test]
fn list_filters_and_pages_through_a_million_queued_rows() {
    let env = Env::new();
    env.init();
    // Row i: `rare` every 1,000th, else `bulk`; priority i % 3; every 100th waits for a later
    // time; args [i].
    let started = Instant::now();
    env.sql()
        .execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000) \
             INSERT INTO foreman_task(task_name, args, priority, run_after) \
             SELECT CASE WHEN i % 1000 = 0 THEN 'rare' ELSE 'bulk' END, json_array(i), i % 3, \
             CASE WHEN i % 100 = 0 THEN 9e12 ELSE 1 END FROM n",
        )
        .unwrap();
    eprintln!("1,000,000 rows inserted in {:?}", started.elapsed());
    let list = |args: &[&str]| {
        let mut full = vec!["list", "--json"];
        full.extend_from_slice(args);
        json_out(&env.run(&full))
    };
    // Newest first, a page of 50 by default, then the next page after its last id.
    let page = list(&[]);
    assert_eq!(ids(&page), (999_951..=1_000_000).rev().collect::<Vec<_>>());
    let first = &page[0];
    for (key, value) in [
        ("task_name", json!("rare")),
        ("state", json!("later")),
        ("args", json!([1_000_000])),
        ("kwargs", json!({})),
        ("priority", json!(1)),
        ("attempt", json!(1)),
    ] {
        assert_eq!(first[key], value, "{key}: {first}");
    }
    assert_eq!(page[1]["state"], "due");
    assert!(first["run_after"].as_f64().unwrap() > 1e12, "{first}");
    let next = list(&["--after", "999951", "--limit", "3"]);
    assert_eq!(ids(&next), [999_950, 999_949, 999_948]);
    assert_eq!(ids(&list(&["--oldest-first", "--limit", "3"])), [1, 2, 3]);
    assert_eq!(
        ids(&list(&["--oldest-first", "--after", "999998"])),
        [999_999, 1_000_000]
    );
    // Each filter, and filters together.
    assert_eq!(
        ids(&list(&["--task", "rare", "--limit", "3"])),
        [1_000_000, 999_000, 998_000]
    );
    assert_eq!(
        ids(&list(&["--state", "later", "--limit", "3"])),
        [1_000_000, 999_900, 999_800]
    );
    assert_eq!(
        ids(&list(&["--state", "due", "--task", "rare", "--limit", "2"])),
        Vec::<i64>::new(),
        "every rare row is later (i % 1000 = 0 is i % 100 = 0)"
    );
    assert_eq!(
        ids(&list(&[
            "--priority",
            "2",
            "--after",
            "500000",
            "--limit",
            "3"
        ])),
        [499_997, 499_994, 499_991]
    );
    // x99999 for x in 0..=9 and 999990..=999998.
    assert_eq!(ids(&list(&["--search", "99999"])).len(), 19);
    assert_eq!(ids(&list(&["--search", "[999999]"])), [999_999]);
    assert_eq!(ids(&list(&["--task", "nosuch"])), Vec::<i64>::new());
    assert_eq!(
        ids(&list(&["--state", "running,leased,failed,dead"])),
        Vec::<i64>::new()
    );
    // Counted only when asked.
    assert_eq!(env.ok(&["list", "--count"]).trim(), "1000000");
    assert_eq!(
        env.ok(&["list", "--count", "--state", "later"]).trim(),
        "10000"
    );
    assert_eq!(list(&["--count", "--task", "rare"]), json!({"count": 1000}));
    // A paused name's rows read paused.
    env.ok(&["pause", "rare"]);
    assert_eq!(list(&["--limit", "1"])[0]["state"], "paused");
    assert_eq!(
        ids(&list(&["--state", "paused", "--limit", "2"])),
        [1_000_000, 999_000]
    );
    // The text form, and its hint for the next page.
    let text = env.ok(&["list", "--limit", "2", "--task", "bulk"]);
    assert!(text.trim_start().starts_with("ID  STATE"), "{text}");
    assert!(text.contains("999999  due    bulk"), "{text}");
    assert!(text.contains("more: foreman list --after 999998"), "{text}");
    let bad = env.run(&["list", "--state", "sleeping"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("unknown state \"sleeping\""),
        "{}",
        stderr(&bad)
    );
}

on_both! {
fn list_shows_running_tasks_and_history_states(env: Env) {
    env.record_config(
        r#"
[tasks.fails]
command = ["sh", "-c", "exit 3"]
[tasks.hangs]
command = ["sh", "-c", "echo $$ > \"$RECORD_FILE.hang\"; exec sleep 60"]
"#,
    );
    env.init();
    let daemon = env.daemon(&[]);
    let done = enqueue(&env, &["record"]);
    let failed = enqueue(&env, &["fails", "[1]"]);
    let running = enqueue(&env, &["hangs"]);
    assert!(wait_until(PATIENCE, || runs(&env, failed).len() == 1
        && runs(&env, done) == [("done".to_owned(), 1)]
        && runs(&env, running) == [("running".to_owned(), 1)]));
    assert!(wait_until(PATIENCE, || runs(&env, failed)
        == [("failed".to_owned(), 1)]));
    let list = |args: &[&str]| {
        let mut full = vec!["list", "--json"];
        full.extend_from_slice(args);
        json_out(&env.run(&full))
    };
    let live = list(&[]);
    assert_eq!(ids(&live), [running]);
    assert_eq!(live[0]["state"], "running");
    assert!(live[0]["started_at"].is_f64(), "{live}");
    assert_eq!(ids(&list(&["--state", "done"])), [done]);
    let history = list(&["--state", "failed,done"]);
    assert_eq!(ids(&history), [failed, done]);
    assert_eq!(history[0]["args"], json!([1]));
    assert!(
        history[0]["error"]
            .as_str()
            .unwrap()
            .contains("exited with status 3"),
        "{history}"
    );
    assert_eq!(
        ids(&list(&["--state", "dead"])),
        [failed],
        "no retries: dead"
    );
    let out = env.run(&["cancel", "--grace", "100ms", &running.to_string()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(ids(&list(&["--state", "cancelled"])), [running]);
    daemon.stop();
}
}

// ---- show ----

on_both! {
fn show_tells_the_whole_story_of_a_task_with_three_attempts(env: Env) {
    // Fails twice, then succeeds with a result.
    env.config(
        r#"
[tasks.flaky]
command = ["sh", "-c", "n=$(cat \"$RECORD_FILE.n\" 2>/dev/null || echo 0); n=$((n+1)); echo $n > \"$RECORD_FILE.n\"; if [ $n -lt 3 ]; then echo \"try $n failed\" >&2; exit 4; fi; echo '{\"tries\": 3}' > \"$FOREMAN_RESULT_FILE\""]
max_retries = 2
retry_backoff = "100ms"
"#,
    );
    env.init();
    let daemon = env.daemon(&[]);
    let id = enqueue(&env, &["flaky", "[\"x\"]", "--kwargs", "{\"k\": 1}"]);
    let out = env.run(&["wait", &id.to_string(), "--json"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(json_out(&out)["result"], json!({"tries": 3}));
    let doc = json_out(&env.run(&["show", &id.to_string(), "--json"]));
    for (key, value) in [
        ("task_id", json!(id)),
        ("task_name", json!("flaky")),
        ("state", json!("done")),
        ("args", json!(["x"])),
        ("kwargs", json!({"k": 1})),
        ("result", json!({"tries": 3})),
        ("queued", Value::Null),
        ("dead", Value::Null),
    ] {
        assert_eq!(doc[key], value, "{key}: {doc}");
    }
    let attempts = doc["attempts"].as_array().unwrap();
    let states: Vec<(&str, i64, Option<i64>)> = attempts
        .iter()
        .map(|a| {
            (
                a["state"].as_str().unwrap(),
                a["attempt"].as_i64().unwrap(),
                a["exit_code"].as_i64(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("failed", 1, Some(4)),
            ("failed", 2, Some(4)),
            ("done", 3, Some(0))
        ]
    );
    for attempt in attempts {
        assert!(
            attempt["daemon"]
                .as_str()
                .unwrap()
                .ends_with(&format!(":{}", daemon.pid())),
            "{attempt}"
        );
        let (start, end) = (
            attempt["started_at"].as_f64().unwrap(),
            attempt["finished_at"].as_f64().unwrap(),
        );
        assert!(start <= end, "{attempt}");
    }
    assert!(
        attempts[0]["error"]
            .as_str()
            .unwrap()
            .contains("try 1 failed"),
        "{doc}"
    );
    assert!(attempts[0]["retry_at"].is_f64() && attempts[2]["retry_at"].is_null());
    let text = env.ok(&["show", &id.to_string()]);
    assert!(
        text.starts_with(&format!("task {id} flaky · done · 3 attempts\n")),
        "{text}"
    );
    assert!(text.contains("result: {\"tries\":3}"), "{text}");
    assert!(text.contains("stderr: try 2 failed"), "{text}");
    let unknown = env.run(&["show", "999"]);
    assert_eq!(unknown.status.code(), Some(3));
    daemon.stop();
}
}

// ---- results ----

#[test]
fn a_command_task_returns_its_result_through_its_result_file() {
    let env = Env::new();
    env.config(
        r#"
[tasks.answer]
command = ["sh", "-c", "echo 'a log line, not the result'; printf '{\"answer\": %s}' \"$(cat)\" > /dev/null; echo '{\"answer\": 42}' > \"$FOREMAN_RESULT_FILE\""]
[tasks.garbage]
command = ["sh", "-c", "echo 'not json' > \"$FOREMAN_RESULT_FILE\""]
[tasks.huge]
command = ["sh", "-c", "head -c 70000 /dev/zero | tr '\\0' 'x' | sed 's/.*/\"&\"/' > \"$FOREMAN_RESULT_FILE\""]
[tasks.silent]
command = ["true"]
"#,
    );
    env.init();
    let daemon = env.daemon(&[]);
    let wait = |id: i64| json_out(&env.run(&["wait", &id.to_string(), "--json"]));
    let answer = wait(enqueue(&env, &["answer"]));
    assert_eq!(
        (answer["state"].as_str(), &answer["result"]),
        (Some("done"), &json!({"answer": 42}))
    );
    let text = env.ok(&["wait", &enqueue(&env, &["answer"]).to_string()]);
    assert!(text.ends_with("result: {\"answer\":42}\n"), "{text}");
    let silent = wait(enqueue(&env, &["silent"]));
    assert_eq!(
        (silent["state"].as_str(), &silent["result"]),
        (Some("done"), &Value::Null)
    );
    let garbage = wait(enqueue(&env, &["garbage"]));
    assert_eq!(garbage["state"], "failed");
    assert!(
        garbage["error"]
            .as_str()
            .unwrap()
            .contains("its $FOREMAN_RESULT_FILE does not hold one JSON value"),
        "{garbage}"
    );
    let huge = wait(enqueue(&env, &["huge"]));
    assert_eq!(huge["state"], "failed");
    assert!(
        huge["error"]
            .as_str()
            .unwrap()
            .contains("over the limit of 65536"),
        "{huge}"
    );
    // The files are the daemon's, in a private directory: none is left behind by a finished task.
    let dirs: Vec<std::fs::DirEntry> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("foreman-results-{}-", daemon.pid()))
        })
        .collect();
    assert_eq!(dirs.len(), 1);
    let mode = dirs[0].metadata().unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let leftovers: Vec<String> = dirs
        .into_iter()
        .flat_map(|dir| {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter_map(Result::ok)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let pid = daemon.pid();
    daemon.stop();
    let left = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("foreman-results-{pid}-"))
        });
    assert!(!left, "the results directory goes with the daemon");
}

const POOL_TASKS: &str = r#"
import os, time
from foreman_worker import task, uneventful

def _record(what):
    with open(os.environ["RECORD_FILE"], "a") as f:
        f.write("%s %d\n" % (what, os.getpid()))

@task
def total(*numbers, scale=1):
    return {"total": sum(numbers) * scale}

@task
def quiet():
    return uneventful([1, 2])

@task
def record(tag):
    _record(tag)

@task
def hang(tag):
    _record(tag)
    time.sleep(60)
"#;

fn pool_env(extra: &str) -> Env {
    let env = Env::new();
    std::fs::write(env.path("pooltasks.py"), POOL_TASKS).unwrap();
    env.config(&format!(
        r#"
workers = 2
[pools.py]
command = ["python3", "-m", "foreman_worker", "pooltasks"]
processes = 1
{extra}
"#
    ));
    env.init();
    env
}

/// Runs Python with the client on its path; returns its stdout, which must be one JSON line.
fn python(env: &Env, script: &str) -> Value {
    let out = env
        .command(&[])
        .get_envs()
        .fold(std::process::Command::new("python3"), |mut cmd, (k, v)| {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
            cmd
        })
        .current_dir(env.dir.path())
        .arg("-c")
        .arg(script)
        .arg(&env.db)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "python: {}", stderr(&out));
    serde_json::from_str(stdout(&out).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)))
}

#[test]
fn a_pool_task_returns_its_result_to_wait_and_to_the_python_client() {
    let env = pool_env("");
    let daemon = env.daemon(&[]);
    let out = python(
        &env,
        r#"
import json, sys
from foreman_client import Client, TaskFailed
client = Client(sys.argv[1])
total = client.enqueue("pooltasks.total", 1, 2, 3, scale=10)
quiet = client.enqueue("pooltasks.quiet")
unknown = client.enqueue("pooltasks.nope")
results = [client.wait(total, timeout=60), client.wait(quiet, timeout=60)]
try:
    client.wait(unknown, timeout=60)
    failure = None
except TaskFailed as e:
    failure = [e.state, str(e)]
print(json.dumps({"ids": [total, quiet], "results": results, "failure": failure}))
"#,
    );
    assert_eq!(out["results"], json!([{"total": 60}, [1, 2]]));
    assert_eq!(out["failure"][0], "dead");
    assert!(
        out["failure"][1]
            .as_str()
            .unwrap()
            .contains("unknown task name"),
        "{out}"
    );
    let total = out["ids"][0].as_i64().unwrap();
    let waited = json_out(&env.run(&["wait", &total.to_string(), "--json"]));
    assert_eq!(waited["result"], json!({"total": 60}));
    daemon.stop();
}

// ---- abort ----

#[test]
fn cancel_kills_a_command_whose_process_ignores_sigterm_after_the_grace() {
    let env = Env::new();
    // The shell and its sleep both ignore SIGTERM: only the SIGKILL after the grace stops them.
    env.config(
        r#"
[tasks.stubborn]
command = ["sh", "-c", "trap '' TERM; echo started > \"$RECORD_FILE.$FOREMAN_TASK_ID\"; sleep 60; echo survived > \"$RECORD_FILE.$FOREMAN_TASK_ID\""]
max_retries = 3
"#,
    );
    env.init();
    let daemon = env.daemon(&[]);
    let id = enqueue(&env, &["stubborn"]);
    let marker = env.path(&format!("ran.txt.{id}"));
    assert!(wait_until(PATIENCE, || marker.exists()));
    let entry = format!("FOREMAN_TASK_ID={id}");
    let pids = processes_with_env(&entry);
    assert!(!pids.is_empty(), "the task's processes");
    let asked = Instant::now();
    let out = env.run(&["cancel", "--grace", "700ms", &id.to_string()]);
    let took = asked.elapsed();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).starts_with(&format!("aborted task {id} (stubborn), attempt 1, in ")),
        "{}",
        stdout(&out)
    );
    assert!(
        took >= Duration::from_millis(700),
        "SIGKILL came before the grace: {took:?}"
    );
    assert!(wait_until(PATIENCE, || pids
        .iter()
        .all(|pid| is_dead(*pid))));
    // Cancelled with SIGKILL's status, never retried (it has retries left).
    let (state, exit, error): (String, i64, String) = env
        .sql()
        .query_row(
            "SELECT state, exit_code, error FROM foreman_run WHERE task_id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((state.as_str(), exit), ("cancelled", 137));
    assert!(
        error.starts_with("aborted (foreman cancel): command killed by signal 9"),
        "{error}"
    );
    assert_eq!(env.queued(), 0, "not retried");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "started\n");
    daemon.expect_log(&format!(
        "task {id} did not stop within its grace after SIGTERM: SIGKILL"
    ));
    // Already cancelled: a second cancel says it finished.
    let again = env.run(&["cancel", &id.to_string()]);
    assert_eq!(again.status.code(), Some(4));
    daemon.stop();
}

#[test]
fn cancel_of_a_pool_task_restarts_its_worker_and_the_next_task_runs() {
    let env = pool_env("");
    let daemon = env.daemon(&[]);
    let hang = env.insert("pooltasks.hang", "[\"h\"]");
    env.touch_wakeup("w");
    let first_pid = wait_record(&env, "h");
    let out = env.run(&["cancel", "--grace", "2s", &hang.to_string()]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(wait_until(PATIENCE, || is_dead(first_pid)));
    daemon.expect_log(&format!(
        "worker pid {first_pid} stopped by the abort of task {hang}; starting another"
    ));
    assert_eq!(runs(&env, hang), [("cancelled".to_owned(), 1)]);
    // The pool is fine: the next task runs at once, on a new process.
    let next = env.insert("pooltasks.record", "[\"next\"]");
    env.touch_wakeup("w");
    let second_pid = wait_record(&env, "next");
    assert_ne!(second_pid, first_pid);
    assert!(wait_until(PATIENCE, || runs(&env, next) == [("done".to_owned(), 1)]));
    assert!(!daemon.has_log("failed to start"), "{}", daemon.log());
    assert_eq!(records(&env).len(), 2);
    env.assert_healthy();
    daemon.stop();
}

// ---- pause ----

on_both! {
fn a_paused_task_waits_while_tasks_arrive_and_resume_runs_every_one(env: Env) {
    env.config(&format!(
        r#"
workers = 2
{RECORD_TASK}
[tasks.other]
command = ["true"]
[schedules.tick]
task = "record"
every = "200ms"
"#
    ));
    env.init();
    let daemon = env.daemon(&["--tick", "100ms"]);
    // The schedule's first firing runs: the name is not paused yet.
    env.wait_ran(1);
    let out = env.ok(&["pause", "record"]);
    assert_eq!(out, "paused task record\n");
    daemon.expect_log("task record is paused");
    let ran_before = env.ran().len();
    // Tasks arrive while it is paused: by SQL and wakeup, and through the CLI.
    let mut queued = Vec::new();
    for i in 0..40 {
        queued.push(if i % 2 == 0 {
            let id = env.insert("record", "[]");
            env.touch_wakeup(&format!("p{i}"));
            id
        } else {
            enqueue(&env, &["record"])
        });
    }
    let other = enqueue(&env, &["other"]);
    // Other names run meanwhile; the paused rows are set aside from the pop.
    assert!(wait_until(PATIENCE, || runs(&env, other) == [("done".to_owned(), 1)]));
    // SQLite sets the paused rows aside from its pop's index; PostgreSQL's daemons leave the
    // name out of their claims, and the rows stay as they are.
    let set_aside = || -> i64 {
        env.number(if env.is_pg() {
            "SELECT count(*) FROM foreman_task WHERE task_name = 'record'"
        } else {
            "SELECT count(*) FROM foreman_task WHERE paused = 1"
        })
    };
    assert!(
        wait_until(PATIENCE, || set_aside() == 40),
        "{}",
        set_aside()
    );
    // The schedule skips its windows instead of piling up tasks.
    daemon.expect_log("schedule tick: task record is paused; skipping this window");
    assert_eq!(env.ran().len(), ran_before, "nothing ran while paused");
    assert_eq!(env.queued(), 40);
    // Every operator command says so, and a pause is no stall.
    let status = json_out(&env.run(&["status", "--json"]));
    assert_eq!(status["paused"][0]["task_name"], "record");
    assert_eq!(status["queue"]["by_task"]["record"]["paused"], 40);
    assert_eq!(status["queue"]["due"], 0);
    let text = env.ok(&["status"]);
    assert!(text.contains("paused    record for"), "{text}");
    let health = env.ok(&["health"]);
    assert!(
        health.starts_with("healthy") && health.contains("paused: record"),
        "{health}"
    );
    let metrics = env.ok(&["metrics"]);
    assert!(
        metrics.contains("foreman_queue_paused{task_name=\"record\"} 40"),
        "{metrics}"
    );
    assert!(metrics.contains("foreman_paused_since_seconds{task_name=\"record\"}"));
    assert_eq!(
        env.ok(&["pause", "record"])
            .lines()
            .next()
            .unwrap()
            .split(" (")
            .next()
            .unwrap(),
        "task record was already paused"
    );
    // Resume: every one of them runs, once.
    assert_eq!(env.ok(&["resume", "record"]), "resumed task record\n");
    let ran = env.wait_ran(ran_before + 40);
    let mut after: Vec<i64> = ran[ran_before..].to_vec();
    after.retain(|id| queued.contains(id));
    after.sort_unstable();
    let mut want = queued.clone();
    want.sort_unstable();
    assert!(wait_until(PATIENCE, || set_aside() == 0));
    let mut unique = after.clone();
    unique.dedup();
    assert_eq!(unique, after, "no task ran twice");
    assert_eq!(after, want, "every task ran");
    assert_eq!(
        env.ok(&["resume", "record"]),
        "task record was not paused\n"
    );
    daemon.expect_log("task record is resumed");
    daemon.stop();
}
}

on_both! {
fn pause_all_holds_every_task_until_resume_all(env: Env) {
    env.record_config("");
    env.init();
    let daemon = env.daemon(&[]);
    assert_eq!(env.ok(&["pause", "--all"]), "paused every task\n");
    daemon.expect_log("every task is paused");
    let id = enqueue(&env, &["record"]);
    let status = json_out(&env.run(&["status", "--json"]));
    assert_eq!(status["paused"][0]["task_name"], Value::Null);
    // A resume of one name does not lift --all, and says so.
    let out = env.ok(&["resume", "record"]);
    assert!(out.contains("every task is still paused"), "{out}");
    assert!(env.ran().is_empty());
    let shown = json_out(&env.run(&["show", &id.to_string(), "--json"]));
    assert_eq!(shown["state"], "paused");
    assert!(shown["paused_since"].is_f64(), "{shown}");
    assert_eq!(
        env.ok(&["resume", "--all"]),
        "resumed everything (1 pause lifted)\n"
    );
    assert_eq!(env.wait_ran(1), [id]);
    let bad = env.run(&["pause"]);
    assert_eq!(bad.status.code(), Some(2));
    daemon.stop();
}
}

// ---- unique keys ----

on_both! {
fn eight_producers_racing_one_unique_key_make_one_task(env: Env) {
    env.init();
    let client = crate::support::PYTHON_CLIENT.display().to_string();
    for round in 0..5 {
        let key = format!("report-{round}");
        // Four CLI and four Python producers, started together.
        let children: Vec<std::process::Child> = (0..8)
            .map(|n| {
                // The Python client's PostgreSQL producer is tested with psycopg in its own suite.
                let mut cmd = if n % 2 == 0 || env.is_pg() {
                    env.command(&["enqueue", "app.report", "[1]", "--unique", &key])
                } else {
                    let mut cmd = std::process::Command::new("python3");
                    cmd.env("PYTHONPATH", &client).arg("-c").arg(
                        "import sys\nfrom foreman_client import Client\n\
                         print(Client(sys.argv[1]).enqueue_with('app.report', [1], unique_key=sys.argv[2]))",
                    );
                    cmd.arg(&env.db).arg(&key);
                    cmd
                };
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let said: Vec<String> = children
            .into_iter()
            .map(|child| {
                let out = child.wait_with_output().unwrap();
                assert!(out.status.success(), "{}", stderr(&out));
                stdout(&out).trim().to_owned()
            })
            .collect();
        let rows: Vec<i64> = env
            .rows(&format!(
                "SELECT id FROM foreman_task WHERE unique_key = '{key}'"
            ))
            .iter()
            .map(|r| r[0].as_deref().unwrap().parse().unwrap())
            .collect();
        assert_eq!(rows.len(), 1, "round {round}: {rows:?}");
        assert!(
            said.iter().all(|id| *id == rows[0].to_string()),
            "round {round}: every producer gets the one id {}: {said:?}",
            rows[0]
        );
    }
    assert_eq!(env.queued(), 5);
}
}

on_both! {
fn a_unique_key_holds_while_its_task_is_queued_or_running_and_is_free_after(env: Env) {
    env.config(
        r#"
[tasks.hold]
command = ["sh", "-c", "while [ ! -e \"$RECORD_FILE.go\" ]; do sleep 0.01; done"]
"#,
    );
    env.init();
    let first = json_out(&env.run(&["enqueue", "hold", "--unique", "k", "--json"]));
    assert_eq!(first["created"], true);
    let id = first["id"].as_i64().unwrap();
    let again = json_out(&env.run(&["enqueue", "hold", "--unique", "k", "--json"]));
    assert_eq!(again, json!({"id": id, "created": false}));
    let daemon = env.daemon(&[]);
    assert!(wait_until(PATIENCE, || runs(&env, id) == [("running".to_owned(), 1)]));
    // Running counts: the key is still held, though the row left the queue.
    assert_eq!(env.queued(), 0);
    assert_eq!(enqueue(&env, &["hold", "--unique", "k"]), id);
    assert_eq!(env.queued(), 0);
    std::fs::write(env.path("ran.txt.go"), "").unwrap();
    assert!(wait_until(PATIENCE, || runs(&env, id) == [("done".to_owned(), 1)]));
    let fresh = enqueue(&env, &["hold", "--unique", "k"]);
    assert_ne!(fresh, id);
    assert!(wait_until(PATIENCE, || runs(&env, fresh) == [("done".to_owned(), 1)]));
    daemon.stop();
}
}

// ---- retry ----

on_both! {
fn retry_requeues_a_task_lost_in_a_kill_9_with_its_args(env: Env) {
    env.config(&format!(
        "heartbeat = \"500ms\"\n{RECORD_TASK}{}",
        r#"
[tasks.block]
command = ["sh", "-c", "echo started >> \"$RECORD_FILE.block\"; while [ ! -e \"$RECORD_FILE.go\" ]; do sleep 0.01; done; echo \"$FOREMAN_TASK_ID\" >> \"$RECORD_FILE\""]
"#
    ));
    env.init();
    let mut daemon = env.daemon(&[]);
    let lost = enqueue(
        &env,
        &[
            "block",
            "[\"payload\", 7]",
            "--kwargs",
            "{\"k\": true}",
            "--priority",
            "3",
        ],
    );
    assert!(wait_until(PATIENCE, || env.path("ran.txt.block").exists()));
    // Not finished: nothing to retry yet.
    let early = env.run(&["retry", &lost.to_string()]);
    assert_eq!(early.status.code(), Some(1));
    assert!(
        stdout(&early).contains("has not finished (running)"),
        "{}",
        stdout(&early)
    );
    daemon.kill9();
    std::fs::write(env.path("ran.txt.go"), "").unwrap();
    let daemon = env.daemon(&[]);
    daemon.expect_log(if env.is_pg() {
        "1 running attempt(s) recorded lost"
    } else {
        "1 recorded lost (at-most-once)"
    });
    assert_eq!(runs(&env, lost), [("lost".to_owned(), 1)]);
    let out = env.run(&["retry", &lost.to_string(), "999999"]);
    assert_eq!(out.status.code(), Some(1), "the unknown id");
    let said = stdout(&out);
    let new_id: i64 = said
        .lines()
        .next()
        .and_then(|l| l.strip_prefix(&format!("retried task {lost} as task ")))
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    assert!(said.contains("no task 999999"), "{said}");
    assert_eq!(env.wait_ran(1), [new_id]);
    let shown = json_out(&env.run(&["show", &new_id.to_string(), "--json"]));
    for (key, value) in [
        ("task_name", json!("block")),
        ("args", json!(["payload", 7])),
        ("kwargs", json!({"k": true})),
        ("priority", json!(3)),
        ("origin", json!(format!("retry of {lost}"))),
        ("state", json!("done")),
    ] {
        assert_eq!(shown[key], value, "{key}: {shown}");
    }
    // A done task can be retried too.
    let again = env.ok(&["retry", &new_id.to_string()]);
    assert!(
        again.starts_with(&format!("retried task {new_id} as task ")),
        "{again}"
    );
    daemon.stop();
}
}

// ---- migration ----

/// What `foreman init` of schema version 3 created (schema.sql at that version, tables and
/// indexes).
const SCHEMA_V3: &str = include_str!("schema_v3.sql");

#[test]
fn a_version_3_database_is_migrated_keeping_its_rows() {
    let env = Env::new();
    env.sql()
        .execute_batch(&format!(
            "{SCHEMA_V3}
             INSERT INTO foreman_task(task_name, args, priority) VALUES ('a', '[1]', 5), ('b', '[2]', 0);
             INSERT INTO foreman_run(task_id, attempt, task_name, state) VALUES (9, 1, 'old', 'done');
             INSERT INTO foreman_dead(task_id, task_name, reason) VALUES (8, 'x', 'old');"
        ))
        .unwrap();
    // Commands other than init and run refuse it until it is upgraded.
    let out = env.run(&["list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("has schema version 3; this foreman needs 4"),
        "{}",
        stderr(&out)
    );
    assert!(env.ok(&["init"]).contains("schema version 4"));
    let listed = json_out(&env.run(&["list", "--json", "--oldest-first"]));
    assert_eq!(ids(&listed), [1, 2]);
    assert_eq!(listed[0]["priority"], 5);
    assert_eq!(
        ids(&json_out(&env.run(&[
            "list",
            "--json",
            "--state",
            "done,dead"
        ]))),
        [9, 8]
    );
    // The old attempt has no args: retry says so rather than guess.
    let out = env.run(&["retry", "9"]);
    assert!(
        stdout(&out).contains("recorded without its args"),
        "{}",
        stdout(&out)
    );
    let plan: String = env
        .sql()
        .query_row(
            "SELECT sql FROM sqlite_master WHERE name = 'foreman_task_due'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(plan.ends_with("WHERE paused = 0"), "{plan}");
    let record = env.sql();
    record
        .execute(
            "INSERT INTO foreman_task(task_name, unique_key) VALUES ('c', 'k')",
            [],
        )
        .unwrap();
    assert_eq!(env.ok(&["init"]).lines().count(), 1, "idempotent");
}
