//! The operator's commands: `enqueue --delay/--priority`, `wait` and its exit codes, `cancel`, and
//! `dead list/requeue/purge`, against the real binary, a real daemon where one matters, and rows
//! written by hand where a state must be set up exactly.

use std::io::{BufRead, BufReader};
use std::process::{Child, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::on_both;
use crate::support::{Env, PATIENCE, stderr, wait_until};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_doc(out: &Output) -> Value {
    serde_json::from_str(&stdout(out)).unwrap_or_else(|e| panic!("{e}: {}", stdout(out)))
}

fn enqueue(env: &Env, args: &[&str]) -> i64 {
    let mut full = vec!["enqueue"];
    full.extend_from_slice(args);
    env.ok(&full).trim().parse().expect("enqueue prints an id")
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// (state, attempt) of every `foreman_run` row of task `id`, by attempt.
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

fn count(env: &Env, sql: &str) -> i64 {
    env.number(sql)
}

/// A `foreman` command running in the background, its stderr lines arriving on `lines`.
struct Background {
    child: Child,
    lines: mpsc::Receiver<String>,
    started: Instant,
}

impl Background {
    fn spawn(env: &Env, args: &[&str]) -> Background {
        let mut child = env
            .command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn foreman");
        let (send, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = send.send(line);
            }
        });
        Background {
            child,
            lines,
            started: Instant::now(),
        }
    }

    /// Blocks until a stderr line contains `needle`; returns it.
    fn expect_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("no stderr line with {needle:?}: {e}"),
            }
        }
    }

    /// Waits for the exit; returns the output and when the exit was seen.
    fn finish(mut self) -> (Output, Instant) {
        let mut status = None;
        assert!(
            wait_until(PATIENCE, || {
                status = self.child.try_wait().unwrap();
                status.is_some()
            }),
            "still running after {PATIENCE:?}"
        );
        let exited = Instant::now();
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut self.child.stdout.take().unwrap(), &mut out).unwrap();
        let rest: Vec<String> = self.lines.try_iter().collect();
        let output = Output {
            status: status.unwrap(),
            stdout: out,
            stderr: rest.join("\n").into_bytes(),
        };
        (output, exited)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn enqueue_delay_and_priority_set_run_after_and_priority() {
    let env = Env::new();
    env.init();
    let before = now();
    let delayed = enqueue(&env, &["foreman.echo", "--delay", "10m", "--priority", "5"]);
    let after = now();
    let negative = enqueue(&env, &["foreman.echo", "--priority", "-3"]);
    let plain = enqueue(&env, &["foreman.echo"]);
    let row = |id: i64| -> (f64, f64, i64) {
        env.sql()
            .query_row(
                "SELECT created_at, run_after, priority FROM foreman_task WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap()
    };
    let (created, run_after, priority) = row(delayed);
    assert_eq!(priority, 5);
    assert!(
        (run_after - created - 600.0).abs() < 0.01,
        "run_after {run_after} is not created_at {created} + 600"
    );
    assert!(run_after >= before + 600.0 - 0.01 && run_after <= after + 600.0 + 0.01);
    assert_eq!(row(negative).2, -3);
    let (created, run_after, priority) = row(plain);
    assert_eq!(priority, 0);
    assert!((run_after - created).abs() < 0.01, "no delay: due at once");
    // A bad delay is a usage error, and nothing is enqueued.
    let out = env.run(&["enqueue", "foreman.echo", "--delay", "soon"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(env.queued(), 3);
}

on_both! {
fn wait_exits_0_with_the_outcome_of_a_task_the_daemon_ran(env: Env) {
    env.init();
    let id = enqueue(&env, &["foreman.echo", r#"["hi"]"#]);
    // Started before the daemon, so it sees the task queued, then running, then done.
    let wait = Background::spawn(
        &env,
        &[
            "wait",
            &id.to_string(),
            "--timeout",
            "60s",
            "--log-level",
            "debug",
        ],
    );
    wait.expect_line(&format!("task {id} queued (attempt 1); waiting"));
    let daemon = env.daemon(&["--tick", "1h"]);
    let started = wait.started;
    let (out, exited) = wait.finish();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        exited.duration_since(started) < Duration::from_secs(30),
        "well before its timeout"
    );
    let line = stdout(&out);
    assert!(
        line.starts_with(&format!("task {id} done (attempt 1, ran ")) && line.ends_with("s)\n"),
        "{line}"
    );
    // The same answer as JSON, at once now that it is final.
    let out = env.run(&["wait", &id.to_string(), "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let doc = json_doc(&out);
    assert_eq!(doc["task_id"], id);
    assert_eq!(doc["task_name"], "foreman.echo");
    assert_eq!(doc["state"], "done");
    assert_eq!(doc["attempt"], 1);
    assert_eq!(doc["final"], true);
    assert_eq!(doc["error"], Value::Null);
    let times: Vec<f64> = ["enqueued_at", "started_at", "finished_at"]
        .iter()
        .map(|key| doc[key].as_f64().unwrap_or_else(|| panic!("{key}: {doc}")))
        .collect();
    assert!(times[0] <= times[1] && times[1] <= times[2], "{doc}");
    daemon.stop();
}
}

#[test]
fn wait_returns_as_soon_as_the_state_changes_not_at_its_fallback_look() {
    let env = Env::new();
    env.init();
    let id = enqueue(&env, &["foreman.echo"]);
    let wait = Background::spawn(
        &env,
        &[
            "wait",
            &id.to_string(),
            "--timeout",
            "60s",
            "--log-level",
            "debug",
        ],
    );
    wait.expect_line("waiting for a change");
    // What the daemon's pop and end do, in one commit, right after the wait went to sleep: only
    // the change wakes it before its 1 s fallback look.
    let changed = Instant::now();
    env.sql()
        .execute_batch(&format!(
            "BEGIN; DELETE FROM foreman_task WHERE id = {id};
             INSERT INTO foreman_run(task_id, attempt, task_name, state, started_at, finished_at)
             VALUES ({id}, 1, 'foreman.echo', 'done', 1.0, 1.5); COMMIT;"
        ))
        .unwrap();
    let (out, exited) = wait.finish();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("task {id} done (attempt 1, ran 0.50s)\n")
    );
    let latency = exited.duration_since(changed);
    assert!(
        latency < Duration::from_millis(600),
        "took {latency:?} to notice the commit"
    );
}

on_both! {
fn wait_exits_1_when_the_last_retry_failed_and_reports_its_error(env: Env) {
    env.config(
        r#"
[tasks.flaky]
command = ["sh", "-c", "echo \"boom on try $FOREMAN_ATTEMPT\" >&2; exit 3"]
max_retries = 1
retry_backoff = { base = "300ms", jitter = false }
"#,
    );
    env.init();
    let daemon = env.daemon(&[]);
    let id = enqueue(&env, &["flaky"]);
    // The first failure has a retry left: wait must not stop there.
    let out = env.run(&["wait", &id.to_string(), "--timeout", "60s"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let line = stdout(&out);
    assert!(
        line.starts_with(&format!("task {id} failed (attempt 2): "))
            && line.contains("boom on try 2"),
        "{line}"
    );
    assert_eq!(line.lines().count(), 1, "{line}");
    assert_eq!(
        runs(&env, id),
        [("failed".to_owned(), 1), ("failed".to_owned(), 2)]
    );
    let doc = json_doc(&env.run(&["wait", &id.to_string(), "--json"]));
    assert_eq!(
        (doc["state"].as_str(), doc["final"].as_bool()),
        (Some("failed"), Some(true))
    );
    assert!(
        doc["error"].as_str().unwrap().contains("boom on try 2"),
        "{doc}"
    );
    daemon.stop();
}
}

#[test]
fn wait_exits_1_for_a_dead_letter_with_or_without_an_attempt() {
    let env = Env::new();
    env.init();
    let daemon = env.daemon(&[]);
    // An unknown name is recorded as a `dead` attempt; args that are not JSON never get one.
    let unknown = enqueue(&env, &["no.such.task"]);
    let garbage = env.insert("foreman.echo", "not json");
    env.touch_wakeup("w");
    assert!(wait_until(PATIENCE, || count(
        &env,
        "SELECT count(*) FROM foreman_dead"
    ) == 2));
    let out = env.run(&["wait", &unknown.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let line = stdout(&out);
    assert!(
        line.starts_with(&format!("task {unknown} dead (attempt 1): ")),
        "{line}"
    );
    let out = env.run(&["wait", &garbage.to_string(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let doc = json_doc(&out);
    assert_eq!(doc["state"], "dead");
    assert_eq!(doc["attempt"], 0);
    assert!(doc["error"].as_str().unwrap().contains("args"), "{doc}");
    daemon.stop();
}

on_both! {
fn wait_exits_2_at_its_timeout_saying_the_state(env: Env) {
    env.init();
    let queued = enqueue(&env, &["foreman.echo"]);
    let started = Instant::now();
    let out = env.run(&["wait", &queued.to_string(), "--timeout", "300ms"]);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(&format!("task {queued} still queued after 300ms")),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "");
    let delayed = enqueue(&env, &["foreman.echo", "--delay", "1h"]);
    let out = env.run(&["wait", &delayed.to_string(), "--timeout", "0", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let doc = json_doc(&out);
    assert_eq!(
        (doc["state"].as_str(), doc["final"].as_bool()),
        (Some("delayed"), Some(false))
    );
    // A bad --timeout is a usage error: also 2, without waiting.
    let out = env.run(&["wait", &queued.to_string(), "--timeout", "forever"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("invalid duration"),
        "{}",
        stderr(&out)
    );
}
}

on_both! {
fn wait_exits_3_at_once_for_an_unknown_id_and_documents_its_codes(env: Env) {
    env.init();
    let started = Instant::now();
    let out = env.run(&["wait", "4242", "--timeout", "60s"]);
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(3));
    let err = stderr(&out);
    assert!(err.contains("no task 4242"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let help = stdout(&env.run(&["wait", "--help"]));
    for code in [
        "0  the task is done",
        "1  it failed",
        "2  --timeout",
        "3  no task",
    ] {
        assert!(help.contains(code), "{help}");
    }
}
}

on_both! {
fn cancel_deletes_a_queued_task_and_records_the_attempt(env: Env) {
    env.init();
    let id = enqueue(&env, &["myapp.send", "[1]"]);
    let out = env.run(&["cancel", &id.to_string()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("cancelled task {id} (myapp.send) before it started\n")
    );
    assert_eq!(env.queued(), 0);
    let row = &env.rows(&format!(
        "SELECT state, attempt, task_name, {}, {} FROM foreman_run WHERE task_id = {id}",
        env.epoch("enqueued_at"),
        env.epoch("finished_at")
    ))[0];
    let text = |i: usize| row[i].clone().unwrap();
    let (state, attempt, name) = (text(0), text(1).parse::<i64>().unwrap(), text(2));
    let (enqueued, finished): (f64, f64) = (text(3).parse().unwrap(), text(4).parse().unwrap());
    assert_eq!(
        (state.as_str(), attempt, name.as_str()),
        ("cancelled", 1, "myapp.send")
    );
    assert!(enqueued <= finished && (now() - finished).abs() < 60.0);
    let out = env.run(&["wait", &id.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout(&out), format!("task {id} cancelled (attempt 1)\n"));
    // Cancelled is final: a second cancel says so.
    let out = env.run(&["cancel", &id.to_string()]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        stdout(&out),
        format!("task {id} already finished (cancelled)\n")
    );
}
}

#[test]
fn cancel_reports_each_id_and_marks_running_attempts_for_abort() {
    let env = Env::new();
    env.init();
    // A lease whose daemon died with its history: the attempt it would run next is cancelled.
    let leased: i64 = env
        .sql()
        .query_row(
            "INSERT INTO foreman_task(task_name, leased_at) VALUES ('sync', 1.0) RETURNING id",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let queued = enqueue(&env, &["foreman.echo"]);
    env.sql()
        .execute_batch(
            "INSERT INTO foreman_run(task_id, attempt, task_name, state) VALUES (9001, 1, 'x', 'running');
             INSERT INTO foreman_run(task_id, attempt, task_name, state) VALUES (9002, 1, 'x', 'done');",
        )
        .unwrap();
    let ids = [
        leased.to_string(),
        "9001".into(),
        "9002".into(),
        "9003".into(),
        queued.to_string(),
    ];
    let mut args = vec!["cancel", "--grace", "2s", "--timeout", "0"];
    args.extend(ids.iter().map(String::as_str));
    let out = env.run(&args);
    // The highest code that applies: an unknown id.
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "cancelled task {leased} (sync) before it started\n\
             task 9002 already finished (done)\nno task 9003\n\
             cancelled task {queued} (foreman.echo) before it started\n\
             task 9001 (x): abort requested, still running after 0s (it stops when the daemon running it reads the request)\n"
        )
    );
    assert_eq!(env.queued(), 0);
    assert_eq!(runs(&env, leased), [("cancelled".to_owned(), 2)]);
    // No daemon ran it: the request waits in its attempt's row for one.
    let (grace, asked): (f64, f64) = env
        .sql()
        .query_row(
            "SELECT grace, requested_at FROM foreman_abort WHERE task_id = 9001 AND attempt = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!((grace - 2.0).abs() < 1e-9 && (now() - asked).abs() < 60.0);
    let out = env.run(&["cancel", "--timeout", "0", "9001"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
}

on_both! {
fn cancel_aborts_an_in_process_task_the_daemon_is_running(env: Env) {
    env.init();
    let daemon = env.daemon(&[]);
    let id = enqueue(&env, &["foreman.sleep", "[30]"]);
    assert!(wait_until(PATIENCE, || runs(&env, id) == [("running".to_owned(), 1)]));
    let out = env.run(&["cancel", &id.to_string()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with(&format!(
            "aborted task {id} (foreman.sleep), attempt 1, in "
        )),
        "{}",
        stdout(&out)
    );
    // Recorded cancelled, never retried; the daemon is none the worse.
    assert_eq!(runs(&env, id), [("cancelled".to_owned(), 1)]);
    let out = env.run(&["wait", &id.to_string(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let doc = json_doc(&out);
    assert_eq!(doc["state"], "cancelled");
    assert!(
        doc["error"].as_str().unwrap().contains("foreman cancel"),
        "{doc}"
    );
    daemon.expect_log(&format!("task {id} foreman.sleep aborted (foreman cancel)"));
    env.assert_healthy();
    daemon.stop();
}
}

/// Inserts a dead letter by hand; returns its id.
fn bury(env: &Env, task_id: i64, name: Option<&str>, args: &str, died_ago_seconds: f64) -> i64 {
    env.sql()
        .query_row(
            "INSERT INTO foreman_dead(task_id, task_name, args, kwargs, reason, died_at, attempts, priority) \
             VALUES (?1, ?2, ?3, '{}', 'first line\nunknown task name', \
             (julianday('now') - 2440587.5) * 86400.0 - ?4, 2, 7) RETURNING id",
            rusqlite::params![task_id, name, args, died_ago_seconds],
            |r| r.get(0),
        )
        .unwrap()
}

#[test]
fn dead_list_shows_the_newest_first_with_json_values_as_stored() {
    let env = Env::new();
    env.init();
    let old = bury(&env, 10, Some("myapp.send"), r#"["a", {"b": 1}]"#, 600.0);
    let raw = bury(&env, 11, Some("myapp.send"), "not json", 120.0);
    let other = bury(&env, 12, Some("other"), "[]", 5.0);
    let doc = json_doc(&env.run(&["dead", "list", "--json"]));
    assert_eq!(doc["total"], 3);
    let ids: Vec<&Value> = doc["dead"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["id"])
        .collect();
    assert_eq!(ids, [&json!(other), &json!(raw), &json!(old)]);
    let first = &doc["dead"][2];
    assert_eq!(first["args"], json!(["a", {"b": 1}]));
    assert_eq!(first["kwargs"], json!({}));
    assert_eq!(doc["dead"][1]["args"], "not json");
    for (key, value) in [
        ("task_id", json!(10)),
        ("task_name", json!("myapp.send")),
        ("reason", json!("first line\nunknown task name")),
        ("attempts", json!(2)),
        ("priority", json!(7)),
        ("origin", Value::Null),
        ("created_at", Value::Null),
    ] {
        assert_eq!(first[key], value, "{key}: {first}");
    }
    assert!((now() - 600.0 - first["died_at"].as_f64().unwrap()).abs() < 60.0);
    // --task and --limit: the total counts every match, the footer says more exist.
    let doc = json_doc(&env.run(&[
        "dead",
        "list",
        "--json",
        "--task",
        "myapp.send",
        "--limit",
        "1",
    ]));
    assert_eq!(doc["total"], 2);
    assert_eq!(doc["dead"].as_array().unwrap().len(), 1);
    assert_eq!(doc["dead"][0]["id"], raw);
    let text = env.ok(&["dead", "list", "--limit", "2"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[0].starts_with("DEAD") && lines[0].ends_with("REASON"),
        "{text}"
    );
    let row: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        row,
        [
            raw.to_string().as_str(),
            "11",
            "myapp.send",
            "2",
            "2m",
            "ago",
            "unknown",
            "task",
            "name"
        ],
        "{text}"
    );
    assert!(lines[3].contains("2 of 3"), "{text}");
    let header_reason = lines[0].find("REASON").unwrap();
    assert_eq!(
        lines[1].find("unknown task name"),
        Some(header_reason),
        "aligned: {text}"
    );
    assert_eq!(
        env.ok(&["dead", "list", "--task", "nobody"]),
        "no dead letters\n"
    );
}

#[test]
fn a_dead_letter_requeued_keeps_its_bytes_and_records_its_origin() {
    let env = Env::new();
    env.init();
    let daemon = env.daemon(&[]);
    // Odd spacing and escapes: a copy that re-serialized the JSON would change them.
    let args = r#"[1,  "\u00e9",{"k" :[]}]"#;
    let id = env.insert("no.such.task", args);
    env.sql()
        .execute(
            "UPDATE foreman_task SET kwargs = '{ \"x\":1 }', priority = 4 WHERE id = ?1",
            [id],
        )
        .unwrap();
    env.touch_wakeup("w");
    assert!(wait_until(PATIENCE, || count(
        &env,
        "SELECT count(*) FROM foreman_dead"
    ) == 1));
    daemon.stop();
    let dead_id = count(&env, "SELECT id FROM foreman_dead");
    let out = env.run(&["dead", "requeue", &dead_id.to_string()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let new_id: i64 = count(&env, "SELECT id FROM foreman_task");
    assert_ne!(new_id, id);
    assert_eq!(
        stdout(&out),
        format!("requeued dead {dead_id} as task {new_id}\n")
    );
    let row: (String, String, String, i64, i64, String, Option<f64>) = env
        .sql()
        .query_row(
            "SELECT task_name, args, kwargs, priority, attempt, origin, leased_at FROM foreman_task",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
        )
        .unwrap();
    assert_eq!(
        row,
        (
            "no.such.task".to_owned(),
            args.to_owned(),
            "{ \"x\":1 }".to_owned(),
            4,
            1,
            format!("requeue of dead {dead_id} (task {id})"),
            None
        )
    );
    assert_eq!(count(&env, "SELECT count(*) FROM foreman_dead"), 0);
    let due: f64 = count_f64(&env, "SELECT run_after FROM foreman_task");
    assert!((now() - due).abs() < 60.0, "due now, not {due}");
    // Run again, it dies again, and the dead letter says where it came from.
    let daemon = env.daemon(&[]);
    env.touch_wakeup("w");
    assert!(wait_until(PATIENCE, || count(
        &env,
        "SELECT count(*) FROM foreman_dead"
    ) == 1));
    let doc = json_doc(&env.run(&["dead", "list", "--json"]));
    assert_eq!(
        doc["dead"][0]["origin"],
        format!("requeue of dead {dead_id} (task {id})")
    );
    assert_eq!(doc["dead"][0]["task_id"], new_id);
    daemon.stop();
}

fn count_f64(env: &Env, sql: &str) -> f64 {
    env.sql().query_row(sql, [], |r| r.get(0)).unwrap()
}

#[test]
fn requeue_all_wakes_the_daemon_and_leaves_what_it_cannot_requeue() {
    let env = Env::new();
    env.init();
    // A slow tick: only the wakeup can make the requeued task run soon.
    let daemon = env.daemon(&["--tick", "1h"]);
    let echo = bury(&env, 20, Some("foreman.echo"), r#"["again"]"#, 1.0);
    let nameless = bury(&env, 21, None, "[]", 1.0);
    let other = bury(&env, 22, Some("other"), "[]", 1.0);
    let out = env.run(&["dead", "requeue", "--all", "--task", "foreman.echo"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let line = stdout(&out);
    let new_id: i64 = line
        .trim()
        .strip_prefix(&format!("requeued dead {echo} as task "))
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    daemon.expect_log(&format!("task {new_id} foreman.echo: args=[\"again\"]"));
    daemon.stop();
    let out = env.run(&["dead", "requeue", "--all"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "dead {nameless} has no task name and cannot be requeued"
        )) && text.contains(&format!("requeued dead {other} as task ")),
        "{text}"
    );
    assert_eq!(
        count(&env, "SELECT id FROM foreman_dead"),
        nameless,
        "only the nameless row stays"
    );
    let out = env.run(&["dead", "requeue", "999", &nameless.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).starts_with("no dead letter 999\n"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn requeue_needs_ids_or_all_but_not_both() {
    let env = Env::new();
    env.init();
    for args in [
        &["dead", "requeue"][..],
        &["dead", "requeue", "1", "--all"],
        &["dead", "requeue", "1", "--task", "x"],
        &["dead", "requeue", "one"],
    ] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn dead_purge_deletes_by_age_and_task() {
    let env = Env::new();
    env.init();
    let day = 86_400.0;
    let old = bury(&env, 1, Some("a"), "[]", 40.0 * day);
    bury(&env, 2, Some("a"), "[]", 1.0);
    bury(&env, 3, Some("b"), "[]", 40.0 * day);
    bury(&env, 4, Some("b"), "[]", 1.0);
    assert_eq!(
        env.ok(&["dead", "purge", "--older-than", "30d", "--task", "a"]),
        "purged 1 dead letter\n"
    );
    assert_eq!(
        count(
            &env,
            &format!("SELECT count(*) FROM foreman_dead WHERE id = {old}")
        ),
        0
    );
    assert_eq!(
        env.ok(&["dead", "purge", "--older-than", "30d"]),
        "purged 1 dead letter\n"
    );
    assert_eq!(
        env.ok(&["dead", "purge", "--task", "b"]),
        "purged 1 dead letter\n"
    );
    assert_eq!(env.ok(&["dead", "purge"]), "purged 1 dead letter\n");
    assert_eq!(count(&env, "SELECT count(*) FROM foreman_dead"), 0);
    assert_eq!(env.ok(&["dead", "purge"]), "purged 0 dead letters\n");
    assert_eq!(
        env.run(&["dead", "purge", "--older-than", "old"])
            .status
            .code(),
        Some(2)
    );
}
