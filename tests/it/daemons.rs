//! Several daemons on one PostgreSQL database, on this machine (issue 16): they drain one queue
//! with each task run exactly once, recover a daemon killed with `kill -9` (its running attempts
//! recorded lost, no task run twice, at-least-once tasks run again: none lost), and fire a
//! schedule they all configure once per window. The several-host runs (network namespaces, a link
//! cut, PostgreSQL restarted) are in `hosts.rs`, run by tests/reliability.sh.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::support::{Daemon, Env, wait_until};

/// Long enough for a drain of 20,000 tasks on a loaded 2-core CI machine.
const DRAIN_PATIENCE: Duration = Duration::from_mins(3);

/// Starts `foreman run` number `n` on `env`, its `foreman.bench` records in `bench-N.txt`, and
/// waits until it runs.
fn start(env: &Env, n: usize, args: &[&str]) -> Daemon {
    let out = env.path(&format!("bench-{n}.txt"));
    let daemon = env.spawn_daemon(args, |cmd| {
        cmd.env("FOREMAN_BENCH_OUT", &out)
            .env("FOREMAN_LOG_LEVEL", "debug");
    });
    daemon.expect_log("foreman running");
    daemon
}

/// The task ids `foreman.bench` recorded in daemon `n`'s file.
fn bench_records(env: &Env, n: usize) -> Vec<i64> {
    std::fs::read_to_string(env.path(&format!("bench-{n}.txt")))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_once(' ')?.0.parse().ok())
        .collect()
}

/// The id each daemon registered with, by pid.
fn daemon_ids(env: &Env) -> HashMap<i32, i64> {
    env.pg_sql()
        .query("SELECT pid, id FROM foreman_daemon", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[test]
fn three_daemons_drain_20000_tasks_each_exactly_once_and_each_runs_some() {
    let Some(env) = Env::pg() else { return };
    env.config("workers = 4\n");
    env.init();
    let daemons: Vec<Daemon> = (0..3).map(|n| start(&env, n, &[])).collect();
    let ids = env.insert_many("foreman.bench", 20_000);
    env.touch_wakeup("producer");
    let total = || (0..3).map(|n| bench_records(&env, n).len()).sum::<usize>();
    assert!(
        wait_until(DRAIN_PATIENCE, || total() >= 20_000),
        "only {} of 20000 tasks ran",
        total()
    );
    for daemon in daemons {
        daemon.stop();
    }
    let mut seen = HashSet::new();
    for n in 0..3 {
        let ran = bench_records(&env, n);
        assert!(!ran.is_empty(), "daemon {n} ran no task");
        for id in ran {
            assert!(seen.insert(id), "task {id} ran twice");
        }
    }
    let expected: HashSet<i64> = ids.collect();
    assert_eq!(seen, expected);
    let mut sql = env.pg_sql();
    let row = sql
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'done'), count(*), count(DISTINCT daemon_id) \
             FROM foreman_run",
            &[],
        )
        .unwrap();
    let (done, attempts, daemons): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((done, attempts, daemons), (20_000, 20_000, 3));
    assert_eq!(env.queued(), 0);
}

#[test]
fn kill_9_of_one_daemon_mid_drain_the_others_finish_and_its_running_attempts_are_lost() {
    let Some(env) = Env::pg() else { return };
    env.config(
        r#"
workers = 2
heartbeat = "500ms"
[tasks.record]
command = ["sh", "-c", "echo \"$FOREMAN_TASK_ID\" >> \"$RECORD_FILE\"; sleep 0.05"]
"#,
    );
    env.init();
    let total = 400;
    let ids = env.insert_many("record", total);
    let mut daemons: Vec<Daemon> = (0..3).map(|n| start(&env, n, &[])).collect();
    assert!(wait_until(DRAIN_PATIENCE, || env.ran().len() >= 60));
    let mut victim = daemons.remove(1);
    let victim_id = daemon_ids(&env)[&victim.pid()];
    victim.kill9();
    // The others drain the queue, and one of them recovers the victim once its heartbeat is
    // older than its staleness limit (4 heartbeats, 2 s): then nothing is left running.
    let settled = || {
        env.queued() == 0
            && env.number("SELECT count(*) FROM foreman_run WHERE state = 'running'") == 0
    };
    assert!(
        wait_until(DRAIN_PATIENCE, settled),
        "not drained and recovered: {} queued, log:\n{}",
        env.queued(),
        daemons[0].log()
    );
    let recovered_by: Option<i64> = env
        .pg_sql()
        .query_one(
            "SELECT recovered_by FROM foreman_daemon WHERE id = $1",
            &[&victim_id],
        )
        .unwrap()
        .get(0);
    let others: Vec<i64> = daemons.iter().map(|d| daemon_ids(&env)[&d.pid()]).collect();
    assert!(
        recovered_by.is_some_and(|by| others.contains(&by)),
        "victim {victim_id} recovered by {recovered_by:?}, not one of {others:?}"
    );
    assert!(
        daemons
            .iter()
            .any(|d| d.has_log(&format!("daemon {victim_id} (pid"))),
        "no daemon said it recovered the victim"
    );
    for daemon in daemons {
        daemon.stop();
    }
    let ran = env.ran();
    let unique: HashSet<i64> = ran.iter().copied().collect();
    assert_eq!(unique.len(), ran.len(), "a task ran twice");
    let rows = env
        .pg_sql()
        .query(
            "SELECT task_id, state, daemon_id FROM foreman_run ORDER BY task_id",
            &[],
        )
        .unwrap();
    let mut lost = 0;
    for row in &rows {
        let (task, state, daemon): (i64, String, Option<i64>) =
            (row.get(0), row.get(1), row.get(2));
        assert!(ids.contains(&task));
        match state.as_str() {
            "done" => {}
            "lost" => {
                assert_eq!(
                    daemon,
                    Some(victim_id),
                    "task {task} lost on another daemon"
                );
                lost += 1;
            }
            other => panic!("task {task} ended {other}"),
        }
    }
    assert_eq!(
        i64::try_from(rows.len()).unwrap(),
        total,
        "one attempt per task"
    );
    assert!(
        (1..=2).contains(&lost),
        "{lost} attempts lost; the victim ran 2 at a time"
    );
}

#[test]
fn a_schedule_configured_on_three_daemons_fires_once_per_window() {
    let Some(env) = Env::pg() else { return };
    env.config(&format!(
        "{}\n[schedules.beat]\ntask = \"record\"\nevery = \"1s\"\n",
        crate::support::RECORD_TASK
    ));
    env.init();
    let daemons: Vec<Daemon> = (0..3).map(|n| start(&env, n, &[])).collect();
    assert!(wait_until(Duration::from_secs(20), || env.ran().len() >= 6));
    for daemon in daemons {
        daemon.stop();
    }
    let ran = env.ran();
    let unique: HashSet<i64> = ran.iter().copied().collect();
    assert_eq!(unique.len(), ran.len(), "a task ran twice");
    let times: Vec<f64> = env
        .pg_sql()
        .query(
            "SELECT extract(epoch FROM enqueued_at)::float8 FROM foreman_run \
             WHERE task_name = 'record' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(times.len() >= 6, "{times:?}");
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] > 0.9,
            "two firings {:.3}s apart: {times:?}",
            pair[1] - pair[0]
        );
    }
}

#[test]
fn an_at_least_once_task_type_loses_no_task_when_a_daemon_is_killed() {
    let Some(env) = Env::pg() else { return };
    env.config(
        r#"
workers = 2
heartbeat = "500ms"
[tasks.record]
command = ["sh", "-c", "echo \"$FOREMAN_TASK_ID\" >> \"$RECORD_FILE\"; sleep 0.1"]
delivery = "at-least-once"
"#,
    );
    env.init();
    let total = 200;
    let ids = env.insert_many("record", total);
    let mut daemons: Vec<Daemon> = (0..3).map(|n| start(&env, n, &[])).collect();
    assert!(wait_until(DRAIN_PATIENCE, || env.ran().len() >= 30));
    daemons.remove(0).kill9();
    let done =
        || env.number("SELECT count(DISTINCT task_id) FROM foreman_run WHERE state = 'done'");
    assert!(
        wait_until(DRAIN_PATIENCE, || done() == total),
        "{} of {total} done; log:\n{}",
        done(),
        daemons[0].log()
    );
    for daemon in daemons {
        daemon.stop();
    }
    assert_eq!(env.queued(), 0);
    let ran: HashSet<i64> = env.ran().into_iter().collect();
    let expected: HashSet<i64> = ids.collect();
    assert_eq!(ran, expected, "every task ran at least once");
    // The victim's leases were released and run again, as attempt 2.
    let again = env
        .number("SELECT count(*) FROM foreman_run WHERE state = 'lost' AND retry_at IS NOT NULL");
    assert!(again >= 1, "no attempt was recorded lost and retried");
}

#[test]
fn status_health_and_metrics_show_every_daemon_and_the_queue_as_a_whole() {
    let Some(env) = Env::pg() else { return };
    env.config("workers = 3\n");
    env.init();
    let daemons: Vec<Daemon> = (0..2).map(|n| start(&env, n, &[])).collect();
    let out = env.run(&["status", "--json"]);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = status["daemons"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{status}");
    assert!(
        listed
            .iter()
            .all(|d| d["state"] == "up" && d["workers"] == 3),
        "{status}"
    );
    let text = env.ok(&["status"]);
    assert!(
        text.contains("daemons   2 up, 0 of 6 workers busy"),
        "{text}"
    );
    let health = env.ok(&["health"]);
    assert!(
        health.starts_with("healthy: daemon pid") && health.contains("(and 1 more daemon(s))"),
        "{health}"
    );
    let metrics = env.ok(&["metrics"]);
    assert!(metrics.contains("foreman_daemons_up 2"), "{metrics}");
    assert_eq!(
        metrics.matches("foreman_daemon_up{").count(),
        2,
        "{metrics}"
    );
    assert!(metrics.contains("foreman_up 1"), "{metrics}");
    for daemon in daemons {
        daemon.stop();
    }
    // Stopped cleanly: listed as such for an hour, and nothing runs.
    let status: serde_json::Value =
        serde_json::from_slice(&env.run(&["status", "--json"]).stdout).unwrap();
    let ended: Vec<&str> = status["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["state"].as_str().unwrap())
        .collect();
    assert_eq!(ended, ["stopped", "stopped"]);
    let out = env.run(&["health"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("unhealthy: daemon_down"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn the_python_client_enqueues_through_psycopg_and_its_notify_wakes_the_daemon() {
    let Some(env) = Env::pg() else { return };
    let Some(python) = crate::support::python_with("psycopg") else {
        return;
    };
    env.config(&format!(
        "{}\n[tasks.hold]\ncommand = [\"true\"]\n",
        crate::support::RECORD_TASK
    ));
    env.init();
    // A one-hour tick: only the client's NOTIFY (debounced to one per 100 ms, the last of a
    // burst sent at the end of its interval) can wake the daemon for these tasks.
    let daemon = env.daemon(&["--tick", "1h"]);
    let script = r#"
import json, sys
from foreman_client import Client
client = Client(sys.argv[1])
ids = [client.enqueue("record", i) for i in range(300)]
ids += client.enqueue_many([("record", [i]) for i in range(200)])
ids.append(client.enqueue_with("record", [1], {"k": 2}, delay=0.3, priority=7))
first = client.enqueue_with("hold", unique_key="once")
again = client.enqueue_with("hold", unique_key="once")
assert first == again, (first, again)
last = client.enqueue("record", "last")
assert client.wait(last, timeout=30) is None
print(json.dumps(ids + [last]))
"#;
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(crate::pg::PgDb::url(env.pg.as_ref().unwrap()))
        .env("PYTHONPATH", &*crate::support::PYTHON_CLIENT)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        crate::support::stderr(&out)
    );
    let ids: Vec<i64> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ids.len(), 502);
    let ran = env.wait_ran(502);
    let unique: HashSet<i64> = ran.iter().copied().collect();
    assert_eq!(unique, ids.iter().copied().collect::<HashSet<i64>>());
    assert_eq!(unique.len(), ran.len(), "a task ran twice");
    daemon.stop();
}

#[test]
fn a_database_with_synchronous_commit_off_gets_durable_commits_in_the_daemons_session() {
    let Some(env) = Env::pg() else { return };
    env.record_config("");
    env.init();
    let name = env.pg.as_ref().expect("a PostgreSQL env").name.clone();
    env.pg_sql()
        .batch_execute(&format!(
            "ALTER DATABASE {name} SET synchronous_commit = off"
        ))
        .unwrap();
    let daemon = env.daemon(&[]);
    daemon.expect_log(
        "synchronous_commit is off for this role or server; the daemon's own session uses on",
    );
    let id = env.insert("record", "[]");
    env.touch_wakeup("producer");
    assert_eq!(env.wait_ran(1), vec![id]);
    daemon.stop();
}
