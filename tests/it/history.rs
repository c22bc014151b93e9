//! Every attempt accounted for: `foreman_run` history, retries with backoff into the dead-letter
//! table, delays, priorities, crashes (lost at-most-once tasks, re-run at-least-once ones) and the
//! migration of a version 1 database.

use std::collections::HashMap;

use crate::on_both;
use crate::support::{Env, PATIENCE, RECORD_TASK, wait_until};

/// (attempt, state, started_at, finished_at, retry_at, error) of every attempt of task `id`.
type Attempt = (
    i64,
    String,
    Option<f64>,
    Option<f64>,
    Option<f64>,
    Option<String>,
);

fn attempts(env: &Env, id: i64) -> Vec<Attempt> {
    let sql = format!(
        "SELECT attempt, state, {}, {}, {}, error FROM foreman_run WHERE task_id = {id} \
         ORDER BY attempt",
        env.epoch("started_at"),
        env.epoch("finished_at"),
        env.epoch("retry_at")
    );
    let time = |v: &Option<String>| v.as_deref().map(|t| t.parse().unwrap());
    env.rows(&sql)
        .iter()
        .map(|r| {
            (
                r[0].as_deref().unwrap().parse().unwrap(),
                r[1].clone().unwrap(),
                time(&r[2]),
                time(&r[3]),
                time(&r[4]),
                r[5].clone(),
            )
        })
        .collect()
}

/// One time column of task `id`'s first attempt.
fn run_time(env: &Env, id: i64, column: &str) -> f64 {
    env.rows(&format!(
        "SELECT {} FROM foreman_run WHERE task_id = {id}",
        env.epoch(column)
    ))[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap()
}

/// Inserts a row of `name` due `delay` seconds from now (by the database's clock).
fn insert_due_in(env: &Env, name: &str, delay: f64) -> i64 {
    let due = if env.is_pg() {
        format!("now() + make_interval(secs => {delay})")
    } else {
        format!("(julianday('now') - 2440587.5) * 86400.0 + {delay}")
    };
    env.rows(&format!(
        "INSERT INTO foreman_task(task_name, run_after) VALUES ('{name}', {due}) RETURNING id"
    ))[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap()
}

fn state_of(env: &Env, id: i64) -> Option<String> {
    attempts(env, id).last().map(|a| a.1.clone())
}

fn dead_count(env: &Env) -> i64 {
    env.number("SELECT count(*) FROM foreman_dead")
}

on_both! {
fn a_done_task_is_recorded_with_its_times(env: Env) {
    env.record_config("");
    env.init();
    let daemon = env.daemon(&[]);
    let id = env.insert("record", "[]");
    env.touch_wakeup("w");
    assert!(wait_until(PATIENCE, || state_of(&env, id).as_deref() == Some("done")));
    let runs = attempts(&env, id);
    assert_eq!(runs.len(), 1);
    let (attempt, _, started, finished, retry_at, error) = &runs[0];
    assert_eq!(*attempt, 1);
    assert!(started.unwrap() <= finished.unwrap());
    assert_eq!((retry_at, error), (&None, &None));
    let enqueued = run_time(&env, id, "enqueued_at");
    assert!(enqueued <= started.unwrap());
    daemon.stop();
}
}

on_both! {
fn retries_back_off_then_the_task_is_dead_with_its_last_error(env: Env) {
    env.config(
        r#"
[tasks.flaky]
command = ["sh", "-c", "echo \"try $FOREMAN_ATTEMPT\" >&2; exit 3"]
max_retries = 2
retry_backoff = { base = "200ms", factor = 2, jitter = false }
"#,
    );
    env.init();
    let daemon = env.daemon(&[]);
    let id = env.insert("flaky", r#"["keep me"]"#);
    env.touch_wakeup("w");
    assert!(wait_until(PATIENCE, || dead_count(&env) == 1));
    let runs = attempts(&env, id);
    let states: Vec<(i64, &str)> = runs.iter().map(|r| (r.0, r.1.as_str())).collect();
    assert_eq!(states, [(1, "failed"), (2, "failed"), (3, "failed")]);
    // Each retry waited at least its backoff: 200 ms, then 400 ms.
    for (n, wait) in [(1, 0.2), (2, 0.4)] {
        let retry_at = runs[n - 1].4.expect("a retried attempt has retry_at");
        let finished = runs[n - 1].3.unwrap();
        assert!(retry_at - finished >= wait - 0.01, "{runs:?}");
        assert!(
            runs[n].2.unwrap() >= retry_at,
            "started before due: {runs:?}"
        );
    }
    assert_eq!(runs[2].4, None, "the last attempt is final");
    assert!(runs[2].5.as_deref().unwrap().contains("try 3"), "{runs:?}");
    let row = &env.rows("SELECT task_id, args, attempts, reason FROM foreman_dead")[0];
    let text = |i: usize| row[i].clone().unwrap();
    let (task_id, args, attempts, reason): (i64, String, i64, String) = (
        text(0).parse().unwrap(),
        text(1),
        text(2).parse().unwrap(),
        text(3),
    );
    assert_eq!(
        (task_id, args.as_str(), attempts),
        (id, r#"["keep me"]"#, 3)
    );
    assert!(
        reason.contains("failed 3 attempts") && reason.contains("exited with status 3"),
        "{reason}"
    );
    assert_eq!(env.queued(), 0);
    daemon.stop();
}
}

on_both! {
fn a_failure_without_retries_goes_to_the_dead_letters_at_once(env: Env) {
    env.config("[tasks.bad]\ncommand = [\"false\"]\n");
    env.init();
    let daemon = env.daemon(&[]);
    let id = env.insert("bad", "[]");
    env.touch_wakeup("w");
    assert!(wait_until(PATIENCE, || dead_count(&env) == 1));
    assert_eq!(state_of(&env, id).as_deref(), Some("failed"));
    daemon.stop();
}
}

on_both! {
fn a_delayed_task_waits_for_its_time_and_others_pass_it(env: Env) {
    env.record_config("");
    env.init();
    let daemon = env.daemon(&[]);
    let delayed = insert_due_in(&env, "record", 1.0);
    let plain = env.insert("record", "[]");
    env.touch_wakeup("w");
    let ran = env.wait_ran(2);
    assert_eq!(ran, [plain, delayed]);
    let started = run_time(&env, delayed, "started_at");
    let created = run_time(&env, delayed, "enqueued_at");
    // Both times are the DB's clock; the daemon's may differ by a rounding of the millisecond.
    assert!(
        started >= created + 1.0 - 0.002,
        "started {started} < due {}",
        created + 1.0
    );
    // On time: the due-time timer, not a later look at the queue (a tick, a heartbeat).
    assert!(
        started <= created + 1.5,
        "started {:.3} s after its due time",
        started - created - 1.0
    );
    daemon.stop();
}
}

#[test]
fn the_cli_delay_is_kept_by_a_daemon_with_a_slow_tick() {
    let env = Env::new();
    env.config(&format!("tick = \"1h\"\n{RECORD_TASK}"));
    env.init();
    let daemon = env.daemon(&[]);
    let id: i64 = env
        .sql()
        .query_row(
            "INSERT INTO foreman_task(task_name, run_after) \
             VALUES ('record', (julianday('now') - 2440587.5) * 86400.0 + 0.3) RETURNING id",
            [],
            |r| r.get(0),
        )
        .unwrap();
    env.touch_wakeup("w");
    // With a 1 h tick, only the due-time timer can start it.
    assert_eq!(env.wait_ran(1), [id]);
    daemon.stop();
}

on_both! {
fn higher_priority_runs_first_and_fifo_within_a_priority(env: Env) {
    env.config(&format!("workers = 1\n{RECORD_TASK}"));
    env.init();
    let mut ids = HashMap::new();
    for (label, priority) in [("a", 0), ("b", 5), ("c", 1), ("d", 5), ("e", -3), ("f", 0)] {
        let id: i64 = env.rows(&format!(
            "INSERT INTO foreman_task(task_name, priority) VALUES ('record', {priority}) RETURNING id"
        ))[0][0]
            .as_deref()
            .unwrap()
            .parse()
            .unwrap();
        ids.insert(id, label);
    }
    // Priorities are a small range: each one in use costs the pop a lookup.
    let refused = std::panic::catch_unwind(|| {
        env.rows("INSERT INTO foreman_task(task_name, priority) VALUES ('record', 101)")
    });
    assert!(refused.is_err(), "priority 101 was accepted");
    let daemon = env.daemon(&[]);
    let order: String = env.wait_ran(6).iter().map(|id| ids[id]).collect();
    assert_eq!(order, "bdcafe");
    daemon.stop();
}
}

on_both! {
fn a_running_task_is_recorded_lost_after_a_kill_9(env: Env) {
    env.config("heartbeat = \"500ms\"\n");
    env.init();
    let mut daemon = env.daemon(&[]);
    let id = env.insert("foreman.sleep", "[60]");
    env.touch_wakeup("w");
    assert!(wait_until(PATIENCE, || state_of(&env, id).as_deref()
        == Some("running")));
    daemon.kill9();
    let daemon = env.daemon(&[]);
    // SQLite's next daemon takes back what its predecessor left; PostgreSQL's daemons recover
    // a daemon whose heartbeat went stale (4 heartbeats: 2 s here).
    daemon.expect_log(if env.is_pg() {
        "1 running attempt(s) recorded lost"
    } else {
        "1 recorded lost"
    });
    let runs = attempts(&env, id);
    assert_eq!(runs.len(), 1, "at-most-once: never run again");
    assert_eq!(runs[0].1, "lost");
    assert_eq!(runs[0].4, None, "lost for good");
    assert_eq!(env.queued(), 0);
    daemon.stop();
}
}

on_both! {
fn at_least_once_tasks_survive_a_kill_9_mid_drain(env: Env) {
    env.config(
        r#"
workers = 4
heartbeat = "500ms"
[tasks.safe]
command = ["sh", "-c", "echo \"$FOREMAN_TASK_ID $FOREMAN_ATTEMPT\" >> \"$RECORD_FILE\"; sleep 0.05"]
delivery = "at-least-once"
"#,
    );
    env.init();
    let total = 120;
    env.insert_many("safe", i64::try_from(total).unwrap());
    let lines = || -> Vec<(i64, i64)> {
        std::fs::read_to_string(env.path("ran.txt"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (id, attempt) = l.split_once(' ')?;
                Some((id.parse().ok()?, attempt.trim().parse().ok()?))
            })
            .collect()
    };
    let mut daemon = env.daemon(&[]);
    assert!(wait_until(PATIENCE, || lines().len() >= 20));
    daemon.kill9();
    let leased = env.number("SELECT count(*) FROM foreman_task WHERE leased_at IS NOT NULL");
    assert!(
        (1..=4).contains(&leased),
        "{leased} leased rows at the crash"
    );
    let daemon = env.daemon(&[]);
    assert!(wait_until(PATIENCE, || env.queued() == 0
        && env.number("SELECT count(*) FROM foreman_run WHERE state = 'running'") == 0));
    daemon.stop();
    let ran = lines();
    let mut runs_per_id: HashMap<i64, Vec<i64>> = HashMap::new();
    for (id, attempt) in &ran {
        runs_per_id.entry(*id).or_default().push(*attempt);
    }
    assert_eq!(runs_per_id.len(), total, "0 lost");
    let twice: Vec<_> = runs_per_id.iter().filter(|(_, a)| a.len() > 1).collect();
    assert!(
        twice.len() <= 4,
        "duplicates beyond the in-flight: {twice:?}"
    );
    for (_, attempts) in twice {
        assert_eq!(attempts, &[1, 2], "a re-run counts as the next attempt");
    }
    let lost = env.number("SELECT count(*) FROM foreman_run WHERE state = 'lost' AND retry_at IS NOT NULL");
    assert_eq!(
        lost, leased,
        "each cut-short attempt is recorded lost, then retried"
    );
}
}

#[test]
fn a_version_1_database_is_migrated_keeping_its_rows_and_ids() {
    let env = Env::new();
    let conn = env.sql();
    conn.execute_batch(
        "CREATE TABLE foreman_task (
            id INTEGER PRIMARY KEY AUTOINCREMENT, task_name TEXT NOT NULL,
            args TEXT NOT NULL DEFAULT '[]', kwargs TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0));
         CREATE TABLE foreman_dead (
            id INTEGER PRIMARY KEY AUTOINCREMENT, task_id INTEGER NOT NULL, task_name TEXT,
            args TEXT, kwargs TEXT, created_at REAL, reason TEXT NOT NULL,
            died_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0));
         PRAGMA user_version = 1;
         INSERT INTO foreman_task(task_name, args) VALUES ('a', '[1]'), ('b', '[2]'), ('c', '[3]');
         DELETE FROM foreman_task WHERE id = 3;
         INSERT INTO foreman_dead(task_id, task_name, reason) VALUES (9, 'x', 'old');",
    )
    .unwrap();
    let out = env.ok(&["init"]);
    assert!(out.contains("schema version 4"), "{out}");
    let rows: Vec<(i64, String, String, i64, i64)> = conn
        .prepare("SELECT id, task_name, args, priority, attempt FROM foreman_task ORDER BY id")
        .unwrap()
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(
        rows,
        [
            (1, "a".to_owned(), "[1]".to_owned(), 0, 1),
            (2, "b".to_owned(), "[2]".to_owned(), 0, 1)
        ]
    );
    // AUTOINCREMENT's high-water mark survives the rebuild: id 3 is never handed out again.
    assert_eq!(env.insert("d", "[]"), 4);
    let reason: String = conn
        .query_row(
            "SELECT reason FROM foreman_dead WHERE task_id = 9",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(reason, "old");
    assert_eq!(env.ok(&["init"]).lines().count(), 1, "idempotent");
}

#[test]
fn history_older_than_the_retention_is_pruned() {
    let env = Env::new();
    env.config(&format!(
        "history_retention = \"1s\"\ntick = \"100ms\"\n{RECORD_TASK}"
    ));
    env.init();
    let daemon = env.daemon(&[]);
    let id = env.insert("record", "[]");
    env.touch_wakeup("w");
    assert!(wait_until(PATIENCE, || state_of(&env, id).as_deref() == Some("done")));
    assert!(wait_until(PATIENCE, || attempts(&env, id).is_empty()));
    daemon.expect_log("pruned 1 history row");
    daemon.stop();
}

#[test]
fn a_row_with_an_odd_created_at_is_retried_without_blocking_the_queue() {
    let env = Env::new();
    env.config(&format!(
        "{RECORD_TASK}\n[tasks.flaky]\ncommand = [\"false\"]\nmax_retries = 1\nretry_backoff = {{ base = \"50ms\", jitter = false }}\n"
    ));
    env.init();
    let daemon = env.daemon(&[]);
    // What Python's sqlite3 stores for a datetime: text, which decodes to no created_at.
    env.sql()
        .execute(
            "INSERT INTO foreman_task(task_name, created_at) VALUES ('flaky', '2024-05-01 10:00:00')",
            [],
        )
        .unwrap();
    env.touch_wakeup("w");
    assert!(wait_until(PATIENCE, || dead_count(&env) == 1));
    let id = env.insert("record", "[]");
    env.touch_wakeup("w2");
    assert_eq!(env.wait_ran(1), [id]);
    daemon.stop();
}

#[test]
fn rows_that_cannot_run_do_not_hold_up_the_rows_behind_them() {
    let env = Env::new();
    env.config(&format!("tick = \"1h\"\n{RECORD_TASK}"));
    env.init();
    let daemon = env.daemon(&[]);
    env.sql()
        .execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 500) \
             INSERT INTO foreman_task(task_name) SELECT 'app.unknown' FROM n",
        )
        .unwrap();
    let id = env.insert("record", "[]");
    env.touch_wakeup("w");
    // With a 1 h tick, only popping on past the buried rows can reach it.
    assert_eq!(env.wait_ran(1), [id]);
    assert_eq!(dead_count(&env), 500);
    daemon.stop();
}

#[test]
fn an_at_least_once_task_running_at_three_crashes_is_buried() {
    let env = Env::new();
    env.config("[tasks.fatal]\ncommand = [\"sleep\", \"60\"]\ndelivery = \"at-least-once\"\n");
    env.init();
    let id = env.insert("fatal", "[]");
    for attempt in 1..=3 {
        let mut daemon = env.daemon(&[]);
        assert!(wait_until(PATIENCE, || attempts(&env, id)
            .last()
            .is_some_and(|a| a.0 == attempt && a.1 == "running")));
        daemon.kill9();
    }
    let daemon = env.daemon(&[]);
    daemon.expect_log("moved to foreman_dead: the daemon stopped while they ran, 3 times");
    assert_eq!(env.queued(), 0);
    let runs = attempts(&env, id);
    assert_eq!(runs.len(), 3);
    assert!(runs.iter().all(|r| r.1 == "lost"));
    assert_eq!(runs[2].4, None, "the last lost attempt is final");
    let reason = env.dead_reason(id).unwrap();
    assert!(reason.contains("3 times"), "{reason}");
    daemon.stop();
}
