//! What the daemon publishes for operators: its heartbeat row, per-minute figures in
//! `foreman_stat`, and its sd_notify messages to systemd.

use std::os::unix::net::UnixDatagram;
use std::process::Stdio;
use std::time::Duration;

use crate::support::{Env, PATIENCE, RECORD_TASK, wait_until};

/// (pid, pid_start, heartbeat_at, stopped_at, workers, pools) of the daemon row.
type DaemonRow = (i64, Option<i64>, f64, Option<f64>, i64, String);

fn daemon_row(env: &Env) -> Option<DaemonRow> {
    env.sql()
        .query_row(
            "SELECT pid, pid_start, heartbeat_at, stopped_at, workers, pools FROM foreman_daemon WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .ok()
}

fn proc_start(pid: i32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

#[test]
fn the_heartbeat_row_names_the_daemon_moves_and_is_stamped_at_exit() {
    let env = Env::new();
    env.config("heartbeat = \"100ms\"\nworkers = 3\n");
    let daemon = env.daemon(&[]);
    let pid = daemon.pid();
    assert!(wait_until(PATIENCE, || daemon_row(&env).is_some()));
    let (row_pid, pid_start, first_beat, stopped, workers, pools) = daemon_row(&env).unwrap();
    assert_eq!(row_pid, i64::from(pid));
    assert_eq!(pid_start, proc_start(pid), "pid_start must match /proc");
    assert_eq!((stopped, workers, pools.as_str()), (None, 3, "[]"));
    // An idle daemon keeps beating.
    assert!(
        wait_until(PATIENCE, || daemon_row(&env)
            .is_some_and(|row| row.2 >= first_beat + 0.2)),
        "the heartbeat did not move"
    );
    daemon.stop();
    let (_, _, beat, stopped, _, _) = daemon_row(&env).unwrap();
    let stopped = stopped.expect("a clean exit sets stopped_at");
    assert!((stopped - beat).abs() < 1e-6, "{stopped} {beat}");
}

#[test]
fn the_heartbeat_row_lists_pools_with_their_tasks() {
    let env = Env::new();
    std::fs::write(
        env.path("poolmod.py"),
        "from foreman_worker import task\n@task\ndef hello():\n    pass\n",
    )
    .unwrap();
    env.config(&format!(
        "heartbeat = \"100ms\"\n[pools.py]\ncommand = [\"python3\", \"-m\", \"foreman_worker\", \"poolmod\"]\nprocesses = 2\n{RECORD_TASK}"
    ));
    let daemon = env.daemon(&[]);
    assert!(
        wait_until(PATIENCE, || daemon_row(&env).is_some_and(|row| {
            let pools: serde_json::Value = serde_json::from_str(&row.5).unwrap();
            pools[0]["up"] == 2
        })),
        "pools never showed up; log:\n{}",
        daemon.log()
    );
    let pools: serde_json::Value = serde_json::from_str(&daemon_row(&env).unwrap().5).unwrap();
    assert_eq!(pools[0]["name"], "py");
    assert_eq!(pools[0]["processes"], 2);
    assert_eq!(pools[0]["busy"], 0);
    assert_eq!(pools[0]["tasks"], serde_json::json!(["poolmod.hello"]));
    daemon.stop();
}

#[test]
fn per_minute_figures_count_done_and_failed_attempts_with_their_times() {
    let env = Env::new();
    env.record_config("[tasks.fails]\ncommand = [\"sh\", \"-c\", \"exit 3\"]\n");
    env.init();
    for _ in 0..5 {
        env.insert("record", "[]");
    }
    for _ in 0..2 {
        env.insert("fails", "[]");
    }
    let daemon = env.daemon(&[]);
    env.wait_ran(5);
    let totals = |env: &Env| -> Vec<(String, i64, i64, i64, f64, String)> {
        let conn = env.sql();
        let mut stmt = conn
            .prepare(
                "SELECT task_name, sum(count), sum(done), sum(failed), max(wall_max), group_concat(wall_hist, ' ') \
                 FROM foreman_stat GROUP BY task_name ORDER BY task_name",
            )
            .unwrap();
        stmt.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
    };
    assert!(
        wait_until(PATIENCE, || {
            let t = totals(&env);
            t.len() == 2 && t[0].1 == 2 && t[1].1 == 5
        }),
        "figures: {:?}",
        totals(&env)
    );
    let t = totals(&env);
    assert_eq!((t[0].0.as_str(), t[0].2, t[0].3), ("fails", 0, 2));
    assert_eq!((t[1].0.as_str(), t[1].2, t[1].3), ("record", 5, 0));
    assert!(t[1].4 > 0.0 && t[1].4 < 30.0, "wall_max {}", t[1].4);
    // The histograms hold one entry per attempt.
    let counted: u64 = t[1]
        .5
        .split(' ')
        .flat_map(|h| {
            let h: serde_json::Map<String, serde_json::Value> = serde_json::from_str(h).unwrap();
            h.into_values().map(|n| n.as_u64().unwrap())
        })
        .sum();
    assert_eq!(counted, 5);
    daemon.stop();
    let totals: serde_json::Value = serde_json::from_str(
        &env.sql()
            .query_row("SELECT totals FROM foreman_daemon", [], |r| {
                r.get::<_, String>(0)
            })
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        totals,
        serde_json::json!({"fails": {"done": 0, "failed": 2}, "record": {"done": 5, "failed": 0}})
    );
}

#[test]
fn figures_older_than_the_retention_are_pruned() {
    let env = Env::new();
    env.config("stats_retention = \"1h\"\n");
    env.init();
    let now_minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60;
    let now_minute = i64::try_from(now_minute).unwrap();
    env.sql()
        .execute_batch(&format!(
            "INSERT INTO foreman_stat(minute, task_name, count) VALUES ({}, 'old', 1), ({}, 'recent', 1);",
            now_minute - 61,
            now_minute - 59
        ))
        .unwrap();
    let daemon = env.daemon(&[]);
    let names = || -> Vec<String> {
        let conn = env.sql();
        let mut stmt = conn
            .prepare("SELECT task_name FROM foreman_stat ORDER BY task_name")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    };
    assert!(
        wait_until(PATIENCE, || names() == ["recent"]),
        "{:?}",
        names()
    );
    daemon.stop();
}

/// Reads datagrams until one contains `needle`; returns everything read.
fn receive_until(socket: &UnixDatagram, needle: &str, seen: &mut Vec<String>) -> bool {
    let mut buf = [0u8; 4096];
    wait_until(PATIENCE, || match socket.recv(&mut buf) {
        Ok(n) => {
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            let found = message.contains(needle);
            seen.push(message);
            found
        }
        Err(_) => false,
    })
}

#[test]
fn systemd_hears_ready_status_watchdog_and_stopping_and_tasks_do_not_inherit_its_socket() {
    let env = Env::new();
    env.config(
        "[tasks.envcheck]\ncommand = [\"sh\", \"-c\", \"echo \\\"${NOTIFY_SOCKET-unset} ${WATCHDOG_USEC-unset}\\\" > \\\"$RECORD_FILE\\\"\"]\n",
    );
    env.init();
    let socket_path = env.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    env.insert("envcheck", "[]");
    let mut child = env
        .command(&["run"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "300000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    assert!(receive_until(&socket, "READY=1", &mut seen), "{seen:?}");
    let ready = seen.last().unwrap().clone();
    assert!(
        ready.contains("STATUS=") && ready.contains("busy"),
        "{ready}"
    );
    // The task popped before READY ran without the daemon's systemd variables.
    assert!(wait_until(PATIENCE, || std::fs::read_to_string(
        env.path("ran.txt")
    )
    .is_ok_and(|t| t.ends_with('\n'))));
    assert_eq!(
        std::fs::read_to_string(env.path("ran.txt")).unwrap(),
        "unset unset\n"
    );
    // WatchdogSec 0.3 s: pings at least every 0.15 s, from the loop.
    for _ in 0..3 {
        seen.clear();
        assert!(receive_until(&socket, "WATCHDOG=1", &mut seen), "{seen:?}");
    }
    // SAFETY: plain kill(2) on our child.
    assert_eq!(
        unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) },
        0
    );
    seen.clear();
    assert!(receive_until(&socket, "STOPPING=1", &mut seen), "{seen:?}");
    assert!(child.wait().unwrap().success());
}

#[test]
fn figures_of_attempts_that_ended_reach_the_db_at_a_second_signal_too() {
    let env = Env::new();
    env.record_config("[tasks.slow]\ncommand = [\"sleep\", \"30\"]\n");
    env.init();
    env.insert("slow", "[]");
    let mut daemon = env.daemon(&[]);
    let runs = |state: &str| -> i64 {
        env.sql()
            .query_row(
                "SELECT count(*) FROM foreman_run WHERE state = ?1",
                [state],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert!(wait_until(PATIENCE, || runs("running") == 1));
    for _ in 0..3 {
        env.insert("record", "[]");
    }
    env.touch_wakeup("w");
    // Recorded in foreman_run as soon as they end; their figures wait for the next beat (up to a
    // second), which the second signal comes before.
    assert!(wait_until(PATIENCE, || runs("done") == 3));
    daemon.signal(libc::SIGINT);
    daemon.expect_log("signal 2: stopping");
    daemon.signal(libc::SIGINT);
    let status = daemon.wait_exit(PATIENCE);
    assert_eq!(status.code(), Some(1), "{}", daemon.log());
    let counted: Option<i64> = env
        .sql()
        .query_row(
            "SELECT sum(count) FROM foreman_stat WHERE task_name = 'record'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(counted, Some(3), "{}", daemon.log());
}

#[test]
fn an_idle_daemon_beats_every_heartbeat_not_every_other() {
    let env = Env::new();
    env.config("heartbeat = \"300ms\"\n");
    let daemon = env.daemon(&[]);
    let mut beats: Vec<f64> = Vec::new();
    assert!(wait_until(PATIENCE, || {
        if let Some(row) = daemon_row(&env)
            && beats.last() != Some(&row.2)
        {
            beats.push(row.2);
        }
        beats.len() >= 6
    }));
    // The first gaps may include startup; the idle ones must be one period, not two.
    let gaps: Vec<f64> = beats.windows(2).skip(1).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| *g < 0.45),
        "heartbeat gaps {gaps:?} for a 300 ms heartbeat"
    );
    daemon.stop();
}
