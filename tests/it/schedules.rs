//! Recurring tasks: cron and `every` schedules fire once per due time, across restarts, without
//! catching up on missed windows; adaptive schedules back off and come back with their task's
//! answers.

use crate::support::{Env, PATIENCE, RECORD_TASK, wait_until};

fn schedule_state(env: &Env, name: &str) -> Option<(f64, Option<f64>, Option<f64>)> {
    env.sql()
        .query_row(
            "SELECT next_due, last_fired, interval FROM foreman_schedule WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .ok()
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn a_cron_schedule_fires_every_due_time() {
    let env = Env::new();
    env.config(&format!(
        "{RECORD_TASK}\n[schedules.each_second]\ntask = \"record\"\ncron = \"* * * * * *\"\n"
    ));
    env.init();
    let daemon = env.daemon(&[]);
    env.wait_ran(3);
    daemon.stop();
    let conn = env.sql();
    let enqueued: Vec<f64> = conn
        .prepare("SELECT enqueued_at FROM foreman_run ORDER BY task_id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    // One firing per second boundary: none piled up, none doubled.
    for pair in enqueued.windows(2) {
        assert!(pair[1] - pair[0] > 0.5, "{enqueued:?}");
    }
}

#[test]
fn a_missed_window_fires_once_and_a_restart_does_not_fire_again() {
    let env = Env::new();
    env.config(&format!(
        "{RECORD_TASK}\n[schedules.nightly]\ntask = \"record\"\nargs = [\"n\"]\ncron = \"*/5 * * * *\"\n"
    ));
    env.init();
    // First start: the schedule is stored with its next five-minute boundary, and does not fire.
    let daemon = env.daemon(&[]);
    assert!(wait_until(PATIENCE, || schedule_state(&env, "nightly").is_some()));
    let (next_due, last_fired, _) = schedule_state(&env, "nightly").unwrap();
    assert!(next_due > now() && next_due - now() <= 300.0 + 1.0);
    assert_eq!(last_fired, None);
    daemon.stop();
    // A day of downtime: 288 missed windows.
    env.sql()
        .execute(
            "UPDATE foreman_schedule SET next_due = ?1 WHERE name = 'nightly'",
            [now() - 86_400.0],
        )
        .unwrap();
    let daemon = env.daemon(&[]);
    let fired = env.wait_ran(1)[0];
    // Schedules fire before the loop pops, so once a task enqueued now has run, any catch-up
    // firing would have run too.
    let marker = env.insert("record", "[]");
    env.touch_wakeup("w");
    assert_eq!(
        env.wait_ran(2),
        [fired, marker],
        "one firing for 288 windows"
    );
    daemon.stop();
    let (next_due, last_fired, _) = schedule_state(&env, "nightly").unwrap();
    assert!(last_fired.is_some() && next_due > now());
    // A restart before the next due time fires nothing: the due time is in the DB.
    let daemon = env.daemon(&[]);
    let second_marker = env.insert("record", "[]");
    env.touch_wakeup("w");
    assert_eq!(env.wait_ran(3), [fired, marker, second_marker]);
    daemon.stop();
}

#[test]
fn an_adaptive_schedule_backs_off_when_uneventful_and_returns_when_eventful() {
    let env = Env::new();
    env.config(
        r#"
[tasks.probe]
command = ["sh", "-c", "echo \"$FOREMAN_TASK_ID\" >> \"$RECORD_FILE\"; test -e \"$RECORD_FILE.eventful\" || exit 75"]

[schedules.watch]
task = "probe"
every = "200ms"
adaptive = { min = "100ms", max = "800ms", factor = 2 }
"#,
    );
    env.init();
    let daemon = env.daemon(&[]);
    let interval = || schedule_state(&env, "watch").and_then(|s| s.2);
    for want in [0.4, 0.8] {
        assert!(
            wait_until(PATIENCE, || interval() == Some(want)),
            "interval {:?}, wanted {want}",
            interval()
        );
    }
    // It stays at its maximum while nothing is new.
    let runs = env.ran().len();
    env.wait_ran(runs + 1);
    assert_eq!(interval(), Some(0.8));
    std::fs::write(env.path("ran.txt.eventful"), b"").unwrap();
    for want in [0.4, 0.2, 0.1] {
        assert!(
            wait_until(PATIENCE, || interval() == Some(want)),
            "interval {:?}, wanted {want}",
            interval()
        );
    }
    assert!(daemon.has_log("was eventful"));
    assert!(!daemon.has_log("failed"), "exit 75 is not a failure");
    daemon.stop();
}

#[test]
fn a_schedule_of_a_task_nothing_serves_is_a_config_error() {
    let env = Env::new();
    env.config("[schedules.s]\ntask = \"app.nope\"\nevery = \"1m\"\n");
    let out = env.run(&["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    let err = crate::support::stderr(&out);
    assert!(
        err.contains("`schedules.\"s\".task` names task \"app.nope\""),
        "{err}"
    );
}

#[test]
fn a_pool_task_reports_eventful_through_the_worker_protocol() {
    let env = Env::new();
    std::fs::write(
        env.path("probetasks.py"),
        r#"
import os
from foreman_worker import task

@task
def probe():
    with open(os.environ["RECORD_FILE"], "a") as f:
        f.write("%s\n" % os.environ.get("FOREMAN_POOL", "?"))
    return os.path.exists(os.environ["RECORD_FILE"] + ".eventful")
"#,
    )
    .unwrap();
    env.config(
        r#"
[pools.py]
command = ["python3", "-m", "foreman_worker", "probetasks"]
processes = 1

[schedules.watch]
task = "probetasks.probe"
every = "200ms"
adaptive = { min = "100ms", max = "400ms", factor = 2 }
"#,
    );
    env.init();
    let daemon = env.daemon(&[]);
    let interval = || schedule_state(&env, "watch").and_then(|s| s.2);
    assert!(
        wait_until(PATIENCE, || interval() == Some(0.4)),
        "{:?}",
        interval()
    );
    std::fs::write(env.path("ran.txt.eventful"), b"").unwrap();
    assert!(
        wait_until(PATIENCE, || interval() == Some(0.1)),
        "{:?}",
        interval()
    );
    daemon.stop();
}
