//! Popping: producers through the SQL protocol, backlog, wakeups and the fallback tick, dead letters.

use std::collections::HashSet;
use std::process::Command;

use crate::on_both;
use crate::support::{Env, PATIENCE, RECORD_TASK, wait_until};

fn assert_each_ran_once(ran: &[i64], expected: impl IntoIterator<Item = i64>) {
    let unique: HashSet<i64> = ran.iter().copied().collect();
    assert_eq!(unique.len(), ran.len(), "some task ran twice");
    let expected: HashSet<i64> = expected.into_iter().collect();
    assert_eq!(unique, expected);
}

#[test]
fn tasks_from_a_python_producer_each_run_exactly_once() {
    let env = Env::new();
    env.record_config("");
    env.init();
    let daemon = env.daemon(&[]);
    // The producer is schema.sql's Python example, run in a separate process while the daemon runs.
    let producer = r#"
import json, os, sqlite3, sys
db_path, wakeup_dir = sys.argv[1], sys.argv[2]
db = sqlite3.connect(db_path, timeout=5, isolation_level=None)
ids = []
for i in range(2000):
    cur = db.execute("INSERT INTO foreman_task(task_name, args, kwargs) VALUES (?, ?, ?)",
                     ("record", json.dumps([i]), json.dumps({"n": i})))
    ids.append(cur.lastrowid)
    wakeup = os.path.join(wakeup_dir, "py-%d" % os.getpid())
    os.path.exists(wakeup) or open(wakeup, "a").close()
print(json.dumps(ids))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(producer)
        .arg(&env.db)
        .arg(&env.wakeup)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "producer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<i64> = serde_json::from_slice(&out.stdout).expect("ids from the producer");
    assert_eq!(ids.len(), 2000);
    let ran = env.wait_ran(2000);
    assert_each_ran_once(&ran, ids);
    assert_eq!(env.queued(), 0);
    let log = daemon.stop();
    assert!(!log.contains("database is locked"), "{log}");
}

on_both! {
fn a_backlog_present_before_start_is_drained_in_order(env: Env) {
    env.record_config("");
    env.init();
    let ids: Vec<i64> = (0..300).map(|_| env.insert("record", "[]")).collect();
    let daemon = env.daemon(&["--workers", "1"]);
    let ran = env.wait_ran(300);
    // One worker: the run order is the pop order, which is FIFO by id.
    assert_eq!(ran, ids);
    assert_eq!(env.queued(), 0);
    daemon.stop();
}
}

#[test]
fn a_wakeup_file_wakes_the_daemon_through_inotify() {
    let env = Env::new();
    env.record_config("");
    env.init();
    // With a one-hour tick, only inotify can make this task run.
    let daemon = env.daemon(&["--tick", "1h"]);
    let id = env.insert("record", "[]");
    env.touch_wakeup("producer-1");
    assert_eq!(env.wait_ran(1), vec![id]);
    // The daemon consumed the wakeup file, so the next create-if-absent producer signals again.
    assert!(wait_until(PATIENCE, || std::fs::read_dir(&env.wakeup)
        .unwrap()
        .count()
        == 0));
    let id2 = env.insert("record", "[]");
    env.touch_wakeup("producer-1");
    assert_eq!(env.wait_ran(2), vec![id, id2]);
    daemon.stop();
}

#[test]
fn a_notify_wakes_the_daemon_through_listen() {
    let Some(env) = Env::pg() else { return };
    env.record_config("");
    env.init();
    // With a one-hour tick, only LISTEN can make these tasks run.
    let daemon = env.daemon(&["--tick", "1h"]);
    daemon.expect_log("LISTEN foreman");
    let id = env.insert("record", "[]");
    env.touch_wakeup("producer-1");
    assert_eq!(env.wait_ran(1), vec![id]);
    let id2 = env.insert("record", "[]");
    env.touch_wakeup("producer-1");
    assert_eq!(env.wait_ran(2), vec![id, id2]);
    daemon.stop();
}

on_both! {
fn a_row_without_a_wakeup_runs_within_the_tick(env: Env) {
    env.record_config("");
    env.init();
    let daemon = env.daemon(&["--tick", "200ms"]);
    // A stale wakeup entry is what stalled snappea (#492): a create-if-absent producer sees it and
    // signals nothing. This one cannot even be removed (a directory), and the row comes with no
    // wakeup at all: only the tick can find it.
    if !env.is_pg() {
        std::fs::create_dir(env.wakeup.join("stale-dir-entry")).unwrap();
    }
    let id = env.insert("record", "[]");
    assert_eq!(env.wait_ran(1), vec![id]);
    daemon.stop();
}
}

#[test]
fn without_listen_the_daemon_polls() {
    let Some(env) = Env::pg() else { return };
    env.config(&format!("listen = false\n{}", crate::support::RECORD_TASK));
    env.init();
    // A one-hour tick: only the poll (every 250 ms) can find the row, which nobody notifies.
    let daemon = env.daemon(&["--tick", "1h"]);
    daemon.expect_log("polling every 250ms (listen = false)");
    let id = env.insert("record", "[]");
    assert_eq!(env.wait_ran(1), vec![id]);
    daemon.stop();
}

on_both! {
    /// On PostgreSQL the heartbeat's look at the queue sees the row: no NOTIFY came.
    fn an_idle_daemons_tick_stretches_no_further_than_the_heartbeat(env: Env) {
        env.config(&format!("heartbeat = \"1s\"\n{RECORD_TASK}"));
        env.init();
        let daemon = env.daemon(&["--tick", "100ms"]);
        env.assert_healthy();
        // Quiet for long enough that the tick has stretched as far as it goes (100 ms doubling to
        // the 1 s heartbeat takes under 2 s); its daemon log says when it wakes, never why.
        let quiet = std::time::Instant::now();
        assert!(!wait_until(std::time::Duration::from_secs(3), || env
            .queued()
            > 0));
        let id = env.insert("record", "[]");
        let inserted = std::time::Instant::now();
        assert_eq!(env.wait_ran(1), vec![id]);
        let waited = inserted.elapsed();
        // Within the heartbeat of the insert, give or take a slow machine: not at some doubled tick.
        assert!(
            waited < std::time::Duration::from_millis(2500),
            "a row without a wakeup waited {waited:?} after {:?} idle",
            inserted - quiet
        );
        daemon.stop();
    }
}

#[test]
fn rows_that_cannot_run_move_to_foreman_dead_with_the_reason() {
    let env = Env::new();
    env.record_config("");
    env.init();
    let conn = env.sql();
    let rows: [(&str, &str, &str, &str); 5] = [
        (
            "no.such.task",
            "[]",
            "{}",
            "unknown task name \"no.such.task\"",
        ),
        ("record", "[1,", "{}", "args is not valid JSON"),
        ("record", "{\"a\":1}", "{}", "args is not a JSON array"),
        ("record", "[]", "[1]", "kwargs is not a JSON object"),
        ("record", "[]", "nope", "kwargs is not valid JSON"),
    ];
    let mut expected = Vec::new();
    for (name, args, kwargs, reason) in rows {
        let id: i64 = conn
            .query_row(
                "INSERT INTO foreman_task(task_name, args, kwargs) VALUES (?1, ?2, ?3) RETURNING id",
                [name, args, kwargs],
                |r| r.get(0),
            )
            .unwrap();
        expected.push((id, name, args, kwargs, reason));
    }
    let good = env.insert("record", "[]");
    let daemon = env.daemon(&[]);
    // The good row behind the bad ones still runs: a bad row never blocks the queue.
    assert_eq!(env.wait_ran(1), vec![good]);
    let dead: Vec<(i64, String, String, String, String)> = conn
        .prepare(
            "SELECT task_id, task_name, args, kwargs, reason FROM foreman_dead ORDER BY task_id",
        )
        .unwrap()
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(dead.len(), expected.len(), "{dead:?}");
    for ((id, name, args, kwargs, reason), row) in expected.iter().zip(&dead) {
        assert_eq!(
            (*id, *name, *args, *kwargs),
            (row.0, row.1.as_str(), row.2.as_str(), row.3.as_str())
        );
        assert!(
            row.4.starts_with(reason),
            "reason {:?} should start with {reason:?}",
            row.4
        );
    }
    assert_eq!(env.queued(), 0);
    daemon.expect_log(&format!(
        "task {} {} moved to foreman_dead: unknown task name",
        expected[0].0, expected[0].1
    ));
    daemon.stop();
}

on_both! {
fn kill_9_mid_drain_then_restart_runs_no_task_twice(env: Env) {
    env.config(
        r#"
workers = 4
[tasks.record]
command = ["sh", "-c", "echo \"$FOREMAN_TASK_ID\" >> \"$RECORD_FILE\"; sleep 0.01"]
"#,
    );
    env.init();
    let total = 400;
    let ids: Vec<i64> = (0..total).map(|_| env.insert("record", "[]")).collect();
    let mut first = env.daemon(&[]);
    assert!(wait_until(PATIENCE, || env.ran().len() >= 40));
    first.kill9();
    let second = env.daemon(&[]);
    assert!(
        wait_until(PATIENCE, || env.queued() == 0),
        "queue not drained after restart"
    );
    // SIGTERM waits for the running tasks, so every task that started has written its id.
    second.stop();
    let ran = env.ran();
    let unique: HashSet<i64> = ran.iter().copied().collect();
    assert_eq!(unique.len(), ran.len(), "a task ran twice");
    assert!(unique.iter().all(|id| ids.contains(id)));
    let lost = total - unique.len();
    assert!(lost <= 4, "lost {lost} tasks, more than the 4 in flight");
}
}

#[test]
fn the_daemon_creates_schema_and_wakeup_dir_on_a_fresh_path() {
    let env = Env::new();
    let daemon = env.daemon(&[]);
    assert!(env.wakeup.is_dir());
    let id = env.insert("foreman.echo", "[\"fresh\"]");
    env.touch_wakeup("w");
    daemon.expect_log(&format!("task {id} foreman.echo: args=[\"fresh\"]"));
    daemon.stop();
}

on_both! {
fn prefetch_pops_ahead_of_free_workers_and_still_runs_each_task_once(env: Env) {
    let gate = env.path("gate");
    env.config(&format!(
        "workers = 1\nprefetch = 3\n[tasks.gated]\ncommand = [\"sh\", \"-c\", \"while [ ! -e '{}' ]; do sleep 0.01; done; echo $FOREMAN_TASK_ID >> \\\"$RECORD_FILE\\\"\"]\n",
        gate.display()
    ));
    env.init();
    let ids: Vec<i64> = (0..6).map(|_| env.insert("gated", "[]")).collect();
    let daemon = env.daemon(&[]);
    // One running, three popped ahead (their rows gone, recorded running), two still queued.
    let running = || env.number("SELECT count(*) FROM foreman_run WHERE state = 'running'");
    assert!(wait_until(PATIENCE, || running() == 4 && env.queued() == 2));
    std::fs::write(&gate, "").unwrap();
    let ran = env.wait_ran(6);
    assert_each_ran_once(&ran, ids);
    daemon.stop();
}
}
