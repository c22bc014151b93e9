//! Reloading the configuration of a running daemon, by SIGHUP and by `foreman reload`: new task
//! code in a pool, its processes replaced one at a time while a long task finishes, a refused
//! configuration, workers, tasks, schedules and pools changed, settings that need a restart, and
//! nothing queued or running lost.

use crate::support::{
    BIN, Daemon, Env, PATIENCE, RECORD_TASK, is_dead, processes_with_env, records, stderr,
    wait_record, wait_until,
};

/// The pool's task module before the deploy: `hold` runs until the test lets it go.
const TASKS_V1: &str = r#"
import os, time
from foreman_worker import task

def _record(what):
    with open(os.environ["RECORD_FILE"], "a") as f:
        f.write("%s %d\n" % (what, os.getpid()))

@task
def record(tag):
    _record(tag)

@task
def hold(tag):
    _record("start-" + tag)
    while not os.path.exists(os.environ["RECORD_FILE"] + ".go"):
        time.sleep(0.01)
    _record(tag)
"#;

/// After the deploy: a task that did not exist.
const TASKS_V2: &str = r#"

@task
def fresh(tag):
    _record("fresh-" + tag)
"#;

fn pool_config(processes: usize, extra: &str) -> String {
    format!(
        "workers = 4\n[pools.py]\ncommand = [\"python3\", \"-m\", \"foreman_worker\", \"deploytasks\"]\nprocesses = {processes}\n{extra}"
    )
}

fn enqueue(env: &Env, name: &str, args: &str) -> i64 {
    let id = env.insert(name, args);
    env.touch_wakeup("t");
    id
}

/// The live processes of pool `pool` of this test's daemon (other tests' pools may share the name).
fn pool_processes(env: &Env, pool: &str) -> Vec<i32> {
    let ours = processes_with_env(&format!("RECORD_FILE={}", env.path("ran.txt").display()));
    processes_with_env(&format!("FOREMAN_POOL={pool}"))
        .into_iter()
        .filter(|pid| ours.contains(pid))
        .collect()
}

/// Where each line containing `needle` is in the log, in order.
fn positions(log: &str, needle: &str) -> Vec<usize> {
    log.lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i)
        .collect()
}

/// The states of every attempt, from the history.
fn run_states(env: &Env) -> Vec<(String, String)> {
    env.rows("SELECT task_name, state FROM foreman_run ORDER BY task_id")
        .into_iter()
        .map(|row| (row[0].clone().unwrap(), row[1].clone().unwrap()))
        .collect()
}

fn dead_count(env: &Env) -> i64 {
    env.number("SELECT count(*) FROM foreman_dead")
}

/// `foreman reload`: (exit code, stdout, stderr).
fn reload(env: &Env) -> (Option<i32>, String, String) {
    let out = env.run(&["reload"]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr(&out),
    )
}

crate::on_both! {
    /// On PostgreSQL too: there the new code's task is not claimed until a new worker serves it.
    fn sighup_loads_new_pool_code_replacing_processes_one_at_a_time_while_a_long_task_finishes(
        env: Env
    ) {
        std::fs::write(env.path("deploytasks.py"), TASKS_V1).unwrap();
        env.config(&pool_config(2, ""));
        env.init();
        let daemon = env.daemon(&[]);
        daemon.expect_log("serves deploytasks.hold, deploytasks.record");
        assert!(wait_until(PATIENCE, || pool_processes(&env, "py").len() == 2));
        let old = pool_processes(&env, "py");
        enqueue(&env, "deploytasks.hold", r#"["long"]"#);
        let long_pid = wait_record(&env, "start-long");

        // The deploy: new code, then SIGHUP. A task of the new code enqueued at once waits for the
        // new workers instead of being refused as unknown; the old code's tasks keep running.
        let mut code = TASKS_V1.to_owned();
        code.push_str(TASKS_V2);
        std::fs::write(env.path("deploytasks.py"), code).unwrap();
        daemon.signal(libc::SIGHUP);
        let fresh = enqueue(&env, "deploytasks.fresh", r#"["one"]"#);
        let during: Vec<i64> = (0..10)
            .map(|n| enqueue(&env, "deploytasks.record", &format!("[\"during-{n}\"]")))
            .collect();
        let fresh_pid = wait_record(&env, "fresh-one");
        assert!(!old.contains(&fresh_pid), "{fresh_pid} is an old process");
        for n in 0..during.len() {
            wait_record(&env, &format!("during-{n}"));
        }
        daemon.expect_log("serves deploytasks.fresh, deploytasks.hold, deploytasks.record");

        // The idle old process is replaced; the one running the long task is left to finish it.
        let idle = *old.iter().find(|p| **p != long_pid).unwrap();
        daemon.expect_log(&format!(
            "worker pid {idle} stopped: replaced by the reload"
        ));
        assert!(wait_until(PATIENCE, || pool_processes(&env, "py")
            .iter()
            .filter(|p| !old.contains(p))
            .count()
            == 2));
        assert!(
            !is_dead(long_pid),
            "the process of the long task was stopped"
        );
        assert!(!daemon.has_log(&format!("worker pid {long_pid} stopped")));
        std::fs::write(env.path("ran.txt.go"), "").unwrap();
        assert_eq!(wait_record(&env, "long"), long_pid);
        daemon.expect_log(&format!(
            "worker pid {long_pid} stopped: replaced by the reload"
        ));
        assert!(wait_until(PATIENCE, || is_dead(long_pid)));

        // One at a time: the first new worker said hello before the first old one left, and the
        // second new one started after that.
        let log = daemon.log();
        let new_hello = positions(&log, "serves deploytasks.fresh");
        let left = positions(&log, "stopped: replaced by the reload");
        let second = positions(&log, "ready");
        assert_eq!(left.len(), 2, "{log}");
        assert!(new_hello[0] < left[0], "{log}");
        assert!(
            second.iter().any(|at| *at > left[0] && *at < left[1]),
            "the second new worker did not start between the old ones' exits:\n{log}"
        );
        assert!(log.contains("reloaded: "), "{log}");

        // Nothing lost: every task ran once, none failed, nothing is left or dead.
        let ran = records(&env);
        assert_eq!(ran.iter().filter(|r| r.0 == "fresh-one").count(), 1);
        for n in 0..during.len() {
            let tag = format!("during-{n}");
            assert_eq!(ran.iter().filter(|r| r.0 == tag).count(), 1, "{ran:?}");
        }
        assert!(wait_until(PATIENCE, || env.queued() == 0));
        assert_eq!(dead_count(&env), 0);
        let states = run_states(&env);
        assert!(states.iter().all(|(_, s)| s == "done"), "{states:?}");
        assert!(
            states.iter().any(|(n, _)| n == "deploytasks.fresh"),
            "{fresh}"
        );
        daemon.stop();
        assert!(pool_processes(&env, "py").is_empty());
    }
}

#[test]
fn new_pool_code_that_cannot_start_leaves_the_old_processes_serving() {
    let env = Env::new();
    std::fs::write(env.path("deploytasks.py"), TASKS_V1).unwrap();
    env.config(&pool_config(1, ""));
    env.init();
    let daemon = env.daemon(&[]);
    daemon.expect_log("serves deploytasks.hold, deploytasks.record");
    let old = pool_processes(&env, "py");
    assert_eq!(old.len(), 1);
    let mut code = TASKS_V1.to_owned();
    code.push_str("\nraise RuntimeError('broken deploy')\n");
    std::fs::write(env.path("deploytasks.py"), code).unwrap();
    let (code, out, err) = reload(&env);
    assert_eq!(code, Some(0), "{out}{err}");
    daemon.expect_log("the reloaded workers cannot start");
    assert!(daemon.has_log("broken deploy"));
    // The old process never left, and serves on.
    enqueue(&env, "deploytasks.record", r#"["after"]"#);
    assert_eq!(wait_record(&env, "after"), old[0]);
    assert!(!daemon.has_log("stopped: replaced by the reload"));
    daemon.stop();
}

#[test]
fn a_refused_configuration_keeps_the_daemon_running_on_the_old_one() {
    let env = Env::new();
    env.config(&format!("workers = 2\n{RECORD_TASK}"));
    env.init();
    let daemon = env.daemon(&[]);

    // `foreman reload` checks first: the reason, exit 2, and no signal sent.
    for (text, reason) in [
        ("workers = [", "invalid TOML"),
        (
            "[tasks.t]\ncommand = [\"/no/such/program\"]",
            "`tasks.\"t\".command` names \"/no/such/program\", which does not exist",
        ),
        (
            "[tasks.t]\ncommand = [\"true\"]\ncwd = \"/no/such/dir\"",
            "`tasks.\"t\".cwd` names \"/no/such/dir\", which does not exist",
        ),
    ] {
        env.config(text);
        let (code, out, err) = reload(&env);
        assert_eq!(code, Some(2), "{text}: {out}{err}");
        assert!(err.contains(reason), "{text}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert!(!daemon.has_log("reload"), "{}", daemon.log());

    // SIGHUP with a broken file: refused and logged, the old configuration stays.
    env.config("workers = [");
    daemon.signal(libc::SIGHUP);
    daemon.expect_log("reload refused, the running configuration stays");
    // The answer is written right after the log line.
    let answer = env.path("q.sqlite3.pid.reload");
    assert!(wait_until(PATIENCE, || answer.exists()));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&answer).unwrap()).unwrap();
    assert_eq!(report["applied"], false, "{report}");
    assert!(report["message"].as_str().unwrap().contains("invalid TOML"));
    let id = env.insert("record", "[]");
    env.touch_wakeup("w");
    assert_eq!(env.wait_ran(1), [id]);
    env.config(&format!("workers = 2\n{RECORD_TASK}"));
    env.assert_healthy();
    daemon.stop();
}

#[test]
fn foreman_reload_applies_workers_tasks_schedules_and_pools() {
    let env = Env::new();
    std::fs::write(env.path("deploytasks.py"), TASKS_V1).unwrap();
    // Command tasks that run until the test lets them go, and record their start.
    let hold = r#"
[tasks.hold]
command = ["sh", "-c", "echo \"start $FOREMAN_TASK_ID\" >> \"$RECORD_FILE\"; while [ ! -e \"$RECORD_FILE.go\" ]; do sleep 0.01; done"]
"#;
    env.config(&format!(
        "workers = 1\n{hold}\n[tasks.gone]\ncommand = [\"true\"]\n[pools.old]\ncommand = [\"python3\", \"-m\", \"foreman_worker\", \"deploytasks\"]\nprocesses = 1"
    ));
    env.init();
    let daemon = env.daemon(&[]);
    daemon.expect_log("pool old: worker pid");
    let started = |env: &Env| {
        std::fs::read_to_string(env.path("ran.txt"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("start "))
            .count()
    };
    for _ in 0..3 {
        env.insert("hold", "[]");
    }
    env.touch_wakeup("w");
    assert!(wait_until(PATIENCE, || started(&env) == 1));

    // Three workers, a schedule, a new command task and a new pool; `gone` and pool `old` go.
    env.config(&format!(
        "workers = 3\n{hold}\n[tasks.added]\ncommand = [\"sh\", \"-c\", \"echo added >> \\\"$RECORD_FILE\\\"\"]\n[schedules.tick]\ntask = \"added\"\nevery = \"1h\"\n[pools.new]\ncommand = [\"python3\", \"-m\", \"foreman_worker\", \"deploytasks\"]\nprocesses = 1"
    ));
    let (code, out, err) = reload(&env);
    assert_eq!(code, Some(0), "{out}{err}");
    for said in [
        "workers 1 -> 3",
        "pools added: new",
        "pools removed: old",
        "tasks added: added",
        "tasks removed: gone",
        "schedules added: tick",
    ] {
        assert!(out.contains(said), "{said}: {out}");
    }
    // The two queued tasks run now, beside the first: three workers.
    assert!(
        wait_until(PATIENCE, || started(&env) == 3),
        "{}",
        daemon.log()
    );
    let status: serde_json::Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["workers"]["total"], 3, "{status}");
    std::fs::write(env.path("ran.txt.go"), "").unwrap();
    // The schedule fired its new task; the new pool serves; the old pool's process is gone.
    assert!(wait_until(PATIENCE, || std::fs::read_to_string(
        env.path("ran.txt")
    )
    .is_ok_and(|s| s.contains("added\n"))));
    daemon.expect_log("pool new: worker pid");
    assert!(wait_until(PATIENCE, || pool_processes(&env, "old").is_empty()));
    enqueue(&env, "deploytasks.record", r#"["on-new"]"#);
    wait_record(&env, "on-new");
    let gone = enqueue(&env, "gone", "[]");
    assert!(wait_until(PATIENCE, || env.dead_reason(gone).is_some()));
    assert!(env.dead_reason(gone).unwrap().contains("unknown task name"));
    assert!(wait_until(PATIENCE, || env.queued() == 0));
    assert!(
        wait_until(PATIENCE, || run_states(&env)
            .iter()
            .filter(|(n, s)| n == "hold" && s == "done")
            .count()
            == 3),
        "{:?}",
        run_states(&env)
    );

    // Fewer workers: it applies once the running tasks end.
    env.config(&format!("workers = 2\n{hold}"));
    let (code, out, err) = reload(&env);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("workers 3 -> 2"), "{out}");
    let status: serde_json::Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["workers"]["total"], 2, "{status}");
    daemon.stop();
}

#[test]
fn settings_that_need_a_restart_keep_their_values_and_the_rest_applies() {
    let env = Env::new();
    env.config(&format!("workers = 2\n{RECORD_TASK}"));
    env.init();
    let daemon = env.daemon(&[]);
    env.config(&format!(
        "workers = 3\nwakeup_dir = \"elsewhere\"\n{RECORD_TASK}"
    ));
    let (code, out, err) = reload(&env);
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(out.contains("workers 2 -> 3"), "{out}");
    assert!(
        err.contains("`wakeup_dir` changes only at a restart: it stays"),
        "{err}"
    );
    daemon.expect_log("`wakeup_dir` changes only at a restart");
    // The daemon still wakes on the old directory.
    let id = env.insert("record", "[]");
    env.touch_wakeup("w");
    assert_eq!(env.wait_ran(1), [id]);
    daemon.stop();
}

#[test]
fn reload_says_when_there_is_no_daemon_to_reload() {
    let env = Env::new();
    env.record_config("");
    env.init();
    let (code, _, err) = reload(&env);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("foreman is not running: no daemon holds the lock on"),
        "{err}"
    );
    // PostgreSQL daemons share a database and have no PID file to be found by.
    let out = std::process::Command::new(BIN)
        .current_dir(env.dir.path())
        .args(["reload", "--db", "postgresql://localhost/nowhere"])
        .env_remove("FOREMAN_PID_FILE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("has no PID file to find the daemon by"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_second_reload_during_a_replacement_still_ends_with_one_generation() {
    let env = Env::new();
    std::fs::write(env.path("deploytasks.py"), TASKS_V1).unwrap();
    env.config(&pool_config(2, ""));
    env.init();
    let daemon: Daemon = env.daemon(&[]);
    daemon.expect_log("serves deploytasks.hold, deploytasks.record");
    let first = pool_processes(&env, "py");
    // A long task keeps one of the first processes, so the first replacement cannot be over
    // when the second reload comes.
    enqueue(&env, "deploytasks.hold", r#"["long"]"#);
    let long_pid = wait_record(&env, "start-long");
    daemon.signal(libc::SIGHUP);
    daemon.expect_log("reloaded: ");
    daemon.expect_log("are started; the previous ones leave");
    let second: Vec<i32> = pool_processes(&env, "py")
        .into_iter()
        .filter(|p| !first.contains(p))
        .collect();
    assert_eq!(second.len(), 2, "{}", daemon.log());
    daemon.signal(libc::SIGHUP);
    assert!(
        wait_until(PATIENCE, || daemon.log_lines("INFO ] reloaded: ").len()
            == 2),
        "{}",
        daemon.log()
    );
    let ids: Vec<i64> = (0..10)
        .map(|n| enqueue(&env, "deploytasks.record", &format!("[\"r{n}\"]")))
        .collect();
    for n in 0..ids.len() {
        wait_record(&env, &format!("r{n}"));
    }
    // The second generation is replaced too, while the first one's last process still runs.
    for pid in &second {
        daemon.expect_log(&format!("worker pid {pid} stopped: replaced by the reload"));
    }
    assert!(!is_dead(long_pid));
    std::fs::write(env.path("ran.txt.go"), "").unwrap();
    assert_eq!(wait_record(&env, "long"), long_pid);
    // In the end, two processes: the newest generation's.
    assert!(
        wait_until(PATIENCE, || {
            let now = pool_processes(&env, "py");
            now.len() == 2
                && now
                    .iter()
                    .all(|p| !first.contains(p) && !second.contains(p))
        }),
        "{}",
        daemon.log()
    );
    assert!(wait_until(PATIENCE, || env.queued() == 0));
    assert_eq!(dead_count(&env), 0);
    daemon.stop();
}

#[test]
fn a_reload_with_fixed_code_brings_a_pool_that_is_down_back_with_all_its_processes() {
    let env = Env::new();
    // The old command names a module that stays broken: only the new one can start.
    std::fs::write(
        env.path("brokentasks.py"),
        "raise RuntimeError('not yet')\n",
    )
    .unwrap();
    std::fs::write(env.path("deploytasks.py"), TASKS_V1).unwrap();
    env.config(&pool_config(2, "").replace("deploytasks", "brokentasks"));
    env.init();
    let daemon = env.daemon(&[]);
    daemon.expect_log("pool py: no worker can start");
    env.config(&pool_config(2, ""));
    let (code, out, err) = reload(&env);
    assert_eq!(code, Some(0), "{out}{err}");
    daemon.expect_log("serves deploytasks.hold, deploytasks.record");
    assert!(
        wait_until(PATIENCE, || pool_processes(&env, "py").len() == 2),
        "{}",
        daemon.log()
    );
    daemon.expect_log("are started; the previous ones leave");
    enqueue(&env, "deploytasks.record", r#"["back"]"#);
    wait_record(&env, "back");
    daemon.stop();
}

#[test]
fn retries_and_timeouts_change_on_reload() {
    let env = Env::new();
    let v1 = "[tasks.flaky]\ncommand = [\"false\"]\n[tasks.slow]\ncommand = [\"sleep\", \"30\"]\n";
    env.config(v1);
    env.init();
    let daemon = env.daemon(&[]);
    env.config(
        "[tasks.flaky]\ncommand = [\"false\"]\nmax_retries = 2\nretry_backoff = { base = \"10ms\", jitter = false }\n[tasks.slow]\ncommand = [\"sleep\", \"30\"]\ntimeout = \"200ms\"\n",
    );
    let (code, out, err) = reload(&env);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("tasks changed: flaky, slow"), "{out}");
    let flaky = enqueue(&env, "flaky", "[]");
    let slow = enqueue(&env, "slow", "[]");
    // Three attempts of flaky (two retries), and slow stopped at its new timeout.
    assert!(
        wait_until(PATIENCE, || env.dead_reason(flaky).is_some()
            && env.dead_reason(slow).is_some()),
        "{}",
        daemon.log()
    );
    let states = run_states(&env);
    let of = |name: &str| -> Vec<&str> {
        states
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, s)| s.as_str())
            .collect()
    };
    assert_eq!(of("flaky"), ["failed", "failed", "failed"], "{states:?}");
    assert_eq!(of("slow"), ["timeout"], "{states:?}");
    daemon.stop();
}
