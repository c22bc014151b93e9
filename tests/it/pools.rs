//! Persistent worker pools with the real Python worker and client: routing by hello, failures,
//! crashes, timeouts, garbage, a pool that cannot start, shutdown and `kill -9` without orphans.

use std::process::Stdio;

use crate::support::{
    Daemon, Env, PATIENCE, PYTHON_CLIENT, is_dead, records, stderr, wait_record, wait_until,
};

/// Task module used by the pools below. It imports the decorator both ways a user may, which must
/// work under `python3 -m foreman_worker` (where that module is `__main__`).
const APP_TASKS: &str = r#"
import os, sys, time
import foreman_worker
from foreman_worker import task

def _record(what):
    with open(os.environ["RECORD_FILE"], "a") as f:
        f.write("%s %d\n" % (what, os.getpid()))

@task
def record(tag):
    _record(tag)

@foreman_worker.task(name="app.custom")
def custom(tag, suffix=""):
    _record(tag + suffix)

@task
def boom(message):
    raise ValueError(message)

@task
def crash(tag):
    _record(tag)
    os._exit(3)

@task
def hang(tag):
    _record(tag)
    time.sleep(60)

@task
def block(tag):
    # Runs until the test creates the file: a task that is running for as long as a test needs.
    while not os.path.exists(os.environ["RECORD_FILE"] + ".go"):
        time.sleep(0.01)
    _record(tag)

@task
def slow(tag):
    time.sleep(0.5)
    _record(tag)
"#;

fn pool_env(processes: usize, extra: &str) -> Env {
    let env = Env::new();
    std::fs::write(env.path("apptasks.py"), APP_TASKS).unwrap();
    env.config(&format!(
        r#"
workers = 4
[pools.py]
command = ["python3", "-m", "foreman_worker", "apptasks"]
processes = {processes}
{extra}
"#
    ));
    env.init();
    env
}

fn enqueue(env: &Env, name: &str, args: &str) -> i64 {
    let id = env.insert(name, args);
    env.touch_wakeup("t");
    id
}

/// Pids of the pool's workers, from the daemon's log.
fn worker_pids(daemon: &Daemon) -> Vec<i32> {
    let mut pids: Vec<i32> = daemon
        .log_lines("pool py: worker pid ")
        .iter()
        .filter_map(|l| {
            let rest = l.split("worker pid ").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// The dead-letter reason of task `id`, once it is there.
fn wait_dead_reason(env: &Env, id: i64) -> String {
    let mut reason = None;
    wait_until(PATIENCE, || {
        reason = env.dead_reason(id);
        reason.is_some()
    });
    reason.unwrap_or_else(|| panic!("task {id} never reached foreman_dead"))
}

fn run_python(env: &Env, script: &str) -> String {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .current_dir(env.dir.path())
        .env("PYTHONPATH", &*PYTHON_CLIENT)
        .env("DB", &env.db)
        .stdin(Stdio::null())
        .output()
        .expect("python3");
    assert!(out.status.success(), "python failed: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_python_client_enqueues_and_a_python_worker_runs_it() {
    let env = pool_env(2, "");
    let daemon = env.daemon(&[]);
    daemon.expect_log("apptasks.boom, apptasks.crash");
    run_python(
        &env,
        r#"
import os
from foreman_client import Client
client = Client(os.environ["DB"])
a = client.enqueue("apptasks.record", "one")
b, c = client.enqueue_many([("app.custom", ["two"], {"suffix": "!"}), ("apptasks.record", ["three"])])
assert a < b < c, (a, b, c)
"#,
    );
    wait_record(&env, "one");
    wait_record(&env, "two!");
    wait_record(&env, "three");
    daemon.stop();
}

#[test]
fn a_failing_task_logs_its_traceback_and_the_worker_keeps_serving() {
    let env = pool_env(1, "");
    let daemon = env.daemon(&[]);
    let id = enqueue(&env, "apptasks.boom", r#"["kaboom-42"]"#);
    daemon.expect_log(&format!("task {id} apptasks.boom failed after"));
    daemon.expect_log("ValueError: kaboom-42");
    daemon.expect_log(&format!(
        "task {id} apptasks.boom | Traceback (most recent call last):"
    ));
    let first = worker_pids(&daemon);
    enqueue(&env, "apptasks.record", r#"["after"]"#);
    let pid = wait_record(&env, "after");
    assert_eq!(vec![pid], first, "an exception must not cost the process");
    daemon.stop();
}

#[test]
fn a_worker_that_dies_mid_task_fails_that_task_once_and_is_restarted() {
    let env = pool_env(1, "");
    let daemon = env.daemon(&[]);
    let id = enqueue(&env, "apptasks.crash", r#"["crashing"]"#);
    let crashed = wait_record(&env, "crashing");
    daemon.expect_log(&format!(
        "worker pid {crashed} died during the task (exited with status 3)"
    ));
    daemon.expect_log(&format!("task {id} apptasks.crash failed"));
    enqueue(&env, "apptasks.record", r#"["next"]"#);
    let next = wait_record(&env, "next");
    assert_ne!(next, crashed, "a new process runs the next task");
    assert!(is_dead(crashed));
    let log = daemon.stop();
    let runs = records(&env).iter().filter(|r| r.0 == "crashing").count();
    assert_eq!(
        runs, 1,
        "at most once: the crashed task is not run again; log:\n{log}"
    );
}

#[test]
fn a_timeout_kills_the_worker_and_frees_its_slot() {
    let env = pool_env(
        1,
        "[tasks.\"apptasks.hang\"]\npool = \"py\"\ntimeout = \"300ms\"",
    );
    let daemon = env.daemon(&[]);
    let id = enqueue(&env, "apptasks.hang", r#"["hanging"]"#);
    let hung = wait_record(&env, "hanging");
    daemon.expect_log(&format!("task {id} apptasks.hang failed after"));
    daemon.expect_log("timeout after 300ms");
    assert!(
        wait_until(PATIENCE, || is_dead(hung)),
        "the hung worker is killed"
    );
    // The pool's only slot is free again, on a new process.
    enqueue(&env, "apptasks.record", r#"["freed"]"#);
    assert_ne!(wait_record(&env, "freed"), hung);
    env.assert_healthy();
    daemon.stop();
}

#[test]
fn a_pool_that_cannot_import_is_reported_and_everything_else_keeps_running() {
    let env = Env::new();
    env.config(&format!(
        r#"
{}
[pools.broken]
command = ["python3", "-m", "foreman_worker", "no_such_module_anywhere"]
processes = 1
[tasks."broken.task"]
pool = "broken"
"#,
        crate::support::RECORD_TASK
    ));
    env.init();
    let daemon = env.daemon(&[]);
    daemon.expect_log("No module named 'no_such_module_anywhere'");
    daemon.expect_log("pool broken: no worker can start");
    let dead = enqueue(&env, "broken.task", "[]");
    let fine = enqueue(&env, "record", "[]");
    assert_eq!(env.wait_ran(1), vec![fine]);
    let reason = wait_dead_reason(&env, dead);
    assert!(
        reason.contains("pool \"broken\" cannot start a worker")
            && reason.contains("No module named 'no_such_module_anywhere'"),
        "{reason}"
    );
    daemon.stop();
}

/// A hand-written worker: proves the protocol doc is enough, and can misbehave on purpose.
const RAW_WORKER: &str = r#"
import json, os, sys
version = int(os.environ.get("RAW_PROTOCOL", "1"))
print(json.dumps({"protocol": version, "tasks": ["raw.ok", "raw.garbage"], "worker": "raw"}), flush=True)
assert os.environ["FOREMAN_POOL"] == "raw" and os.environ["FOREMAN_PROTOCOL"] == "1"
for line in sys.stdin:
    task = json.loads(line)
    with open(os.environ["RECORD_FILE"], "a") as f:
        f.write("%s %d\n" % (task["args"][0], os.getpid()))
    if task["task_name"] == "raw.garbage":
        print("this is not JSON", flush=True)
    else:
        print(json.dumps({"id": task["id"], "ok": True}), flush=True)
"#;

fn raw_env(protocol: u32) -> Env {
    let env = Env::new();
    std::fs::write(env.path("raw_worker.py"), RAW_WORKER).unwrap();
    env.config(&format!(
        r#"
[pools.raw]
command = ["env", "RAW_PROTOCOL={protocol}", "python3", "raw_worker.py"]
processes = 1
"#
    ));
    env.init();
    env
}

#[test]
fn a_worker_writing_garbage_is_killed_and_restarted() {
    let env = raw_env(1);
    let daemon = env.daemon(&[]);
    let id = enqueue(&env, "raw.garbage", r#"["garbage"]"#);
    let first = wait_record(&env, "garbage");
    daemon.expect_log(&format!("task {id} raw.garbage failed after"));
    daemon.expect_log("worker protocol error");
    daemon.expect_log("\"this is not JSON\"");
    assert!(wait_until(PATIENCE, || is_dead(first)));
    enqueue(&env, "raw.ok", r#"["ok"]"#);
    assert_ne!(wait_record(&env, "ok"), first);
    daemon.stop();
}

#[test]
fn a_worker_speaking_another_protocol_version_is_refused() {
    let env = raw_env(99);
    let daemon = env.daemon(&[]);
    daemon.expect_log("speaks protocol 99, this foreman speaks 1");
    daemon.expect_log("pool raw: no worker can start");
    daemon.stop();
}

#[test]
fn a_command_task_past_its_timeout_is_killed() {
    let env = Env::new();
    env.config(&format!(
        r#"
{}
[tasks.hang]
command = ["sh", "-c", "(trap '' TERM; exec sleep 60) & echo $! > \"$RECORD_FILE.bg\"; echo $$ > \"$RECORD_FILE.pid\"; exec sleep 60"]
timeout = "300ms"
"#,
        crate::support::RECORD_TASK
    ));
    env.init();
    let daemon = env.daemon(&["--workers", "1"]);
    let id = enqueue(&env, "hang", "[]");
    daemon.expect_log(&format!("task {id} hang failed after"));
    daemon.expect_log("timeout after 300ms");
    for file in ["ran.txt.pid", "ran.txt.bg"] {
        let pid: i32 = std::fs::read_to_string(env.path(file))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The background child ignores SIGTERM: only the group's SIGKILL ends it.
        assert!(
            wait_until(PATIENCE, || is_dead(pid)),
            "{file}: {pid} survived the timeout"
        );
    }
    // The only worker is free again.
    let next = enqueue(&env, "record", "[]");
    assert_eq!(env.wait_ran(1), vec![next]);
    env.assert_healthy();
    daemon.stop();
}

#[test]
fn shutdown_lets_a_running_pool_task_finish_then_stops_every_worker() {
    let env = pool_env(2, "");
    let daemon = env.daemon(&[]);
    daemon.expect_log("apptasks.boom, apptasks.crash");
    assert!(
        wait_until(PATIENCE, || worker_pids(&daemon).len() == 2),
        "{}",
        daemon.log()
    );
    let id = enqueue(&env, "apptasks.slow", r#"["slow"]"#);
    daemon.expect_log(&format!("task {id} apptasks.slow started"));
    let pids = worker_pids(&daemon);
    let log = daemon.stop();
    assert!(records(&env).iter().any(|r| r.0 == "slow"), "{log}");
    for pid in pids {
        assert!(is_dead(pid), "worker {pid} outlived the daemon");
    }
}

#[test]
fn workers_die_with_the_daemon_even_on_kill_9() {
    let env = pool_env(2, "");
    let mut daemon = env.daemon(&[]);
    assert!(
        wait_until(PATIENCE, || worker_pids(&daemon).len() == 2),
        "{}",
        daemon.log()
    );
    let pids = worker_pids(&daemon);
    daemon.kill9();
    for pid in pids {
        assert!(
            wait_until(PATIENCE, || is_dead(pid)),
            "worker {pid} survived kill -9 of the daemon"
        );
    }
}

#[test]
fn a_stale_wakeup_entry_cannot_silence_the_python_client() {
    let env = pool_env(1, "");
    let daemon = env.daemon(&["--tick", "200ms"]);
    daemon.expect_log("apptasks.boom, apptasks.crash");
    // A wakeup entry the daemon cannot remove (a directory) under the client's own name: the
    // client sees it there and never creates it, so only the daemon's tick can find the task.
    run_python(
        &env,
        r#"
import os
from foreman_client import Client
client = Client(os.environ["DB"])
os.mkdir(os.path.join(os.environ["DB"] + ".wakeup", "py-%d" % os.getpid()))
client.enqueue("apptasks.record", "despite-stale-entry")
"#,
    );
    wait_record(&env, "despite-stale-entry");
    daemon.stop();
}

#[test]
fn pool_config_errors_name_the_key() {
    let env = Env::new();
    for (text, needle) in [
        (
            "workers = 2\n[pools.p]\ncommand = [\"true\"]\nprocesses = 3",
            "`pools.\"p\".processes` must be between 1 and workers (2), got 3",
        ),
        (
            "[tasks.t]\npool = \"nope\"",
            "`tasks.\"t\".pool` names pool \"nope\", which has no [pools.nope] section",
        ),
        (
            "[pools.p]\ncommand = [\"true\"]\n[tasks.t]\npool = \"p\"\ncommand = [\"true\"]",
            "`tasks.\"t\"` has both `command` and `pool`",
        ),
        (
            "[tasks.t]\ntimeout = \"1s\"",
            "`tasks.\"t\"` has no `command` or `pool`",
        ),
        (
            "[pools.p]\ncommand = [\"/no/such/worker\"]",
            "`pools.\"p\".command` names \"/no/such/worker\", which does not exist",
        ),
        ("[pools.p]\ncommand = []", "`pools.\"p\".command` is empty"),
    ] {
        env.config(text);
        let out = env.run(&["check-config"]);
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = stderr(&out);
        assert!(err.contains(needle), "{text}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

#[test]
fn the_python_client_and_worker_unit_tests_pass() {
    let out = std::process::Command::new("python3")
        .args(["-m", "unittest", "discover", "-s", "tests"])
        .current_dir(&*PYTHON_CLIENT)
        .stdin(Stdio::null())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python unit tests failed:\n{}",
        stderr(&out)
    );
}

#[test]
fn effective_config_shows_pools_and_timeouts() {
    let env = Env::new();
    env.config(
        "[pools.py]\ncommand = [\"python3\", \"-m\", \"foreman_worker\", \"app\"]\nprocesses = 2\n[tasks.\"app.x\"]\npool = \"py\"\ntimeout = \"30s\"",
    );
    let out = env.ok(&["check-config"]);
    for needle in [
        "[pools.py]",
        "processes = 2",
        "start_timeout = \"30s\"",
        "[tasks.\"app.x\"]",
        "pool = \"py\"",
        "timeout = \"30s\"",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
}

#[test]
fn a_configured_task_the_worker_does_not_serve_is_dead_lettered_with_the_reason() {
    let env = pool_env(1, "[tasks.\"apptasks.missing\"]\npool = \"py\"");
    let daemon = env.daemon(&[]);
    daemon.expect_log("the config routes task(s) apptasks.missing to this pool");
    let id = enqueue(&env, "apptasks.missing", "[]");
    let reason = wait_dead_reason(&env, id);
    assert!(
        reason.starts_with("pool \"py\" does not serve task \"apptasks.missing\""),
        "{reason}"
    );
    daemon.stop();
}

#[test]
fn pool_tasks_count_against_workers() {
    // Two workers, both busy with pool tasks: a command task must wait for one of them.
    let env = pool_env(2, crate::support::RECORD_TASK);
    let config = std::fs::read_to_string(env.path("foreman.toml")).unwrap();
    env.config(&config.replace("workers = 4", "workers = 2"));
    let daemon = env.daemon(&[]);
    daemon.expect_log("apptasks.boom, apptasks.crash");
    let first = env.insert("apptasks.slow", r#"["slow-1"]"#);
    env.insert("apptasks.slow", r#"["slow-2"]"#);
    let command = env.insert("record", "[]");
    env.touch_wakeup("t");
    daemon.expect_log(&format!("task {first} apptasks.slow started"));
    let lines = || -> Vec<String> {
        std::fs::read_to_string(env.path("ran.txt"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    assert!(wait_until(PATIENCE, || lines().len() == 3), "{:?}", lines());
    let order = lines();
    let command_at = order.iter().position(|l| *l == command.to_string());
    let first_slow_done = order.iter().position(|l| l.starts_with("slow-"));
    assert!(
        first_slow_done < command_at,
        "the command task started while both workers were busy: {order:?}"
    );
    daemon.stop();
}

#[test]
fn a_busy_pool_leaves_its_next_task_queued_and_other_tasks_run() {
    let env = pool_env(1, crate::support::RECORD_TASK);
    let daemon = env.daemon(&[]);
    daemon.expect_log("apptasks.block, apptasks.boom");
    let first = env.insert("apptasks.block", r#"["block-1"]"#);
    let second = env.insert("apptasks.block", r#"["block-2"]"#);
    let command = env.insert("record", "[]");
    env.touch_wakeup("t");
    daemon.expect_log(&format!("task {first} apptasks.block started"));
    // The pool's one process is busy: the command task still gets a free worker...
    assert!(wait_until(PATIENCE, || std::fs::read_to_string(
        env.path("ran.txt")
    )
    .is_ok_and(|t| t.lines().any(|l| l == command.to_string()))));
    // ...and the pool's next task waits in the queue, not popped, with its id.
    let queued: Vec<i64> = env
        .sql()
        .prepare("SELECT id FROM foreman_task")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(queued, vec![second]);
    std::fs::write(env.path("ran.txt.go"), "").unwrap();
    wait_record(&env, "block-2");
    daemon.stop();
}

#[test]
fn a_pool_slow_to_start_delays_only_the_tasks_it_may_serve() {
    let env = Env::new();
    env.config(&format!(
        "{}\n[pools.mute]\ncommand = [\"sleep\", \"60\"]\nprocesses = 1\n",
        crate::support::RECORD_TASK
    ));
    env.init();
    let daemon = env.daemon(&[]);
    let maybe_mute = env.insert("mute.task", "[]");
    let command = env.insert("record", "[]");
    env.touch_wakeup("t");
    assert_eq!(env.wait_ran(1), vec![command]);
    // No hello yet, so nobody knows whether the pool serves it: it stays queued, not dead.
    let dead: i64 = env
        .sql()
        .query_row("SELECT count(*) FROM foreman_dead", [], |r| r.get(0))
        .unwrap();
    assert_eq!((env.queued(), dead), (1, 0), "task {maybe_mute}");
    // Stopping does not wait for the hello.
    daemon.stop();
}

/// A task module that talks on stderr: at import (no task runs), and in each task.
const TALK_TASKS: &str = r#"
import sys
from foreman_worker import task

print("talk module loading")

@task
def talk(n):
    print("said %d" % n)
    sys.stderr.write("more %d\n" % n)
"#;

#[test]
fn a_workers_stderr_during_a_task_is_tagged_with_the_task() {
    let env = Env::new();
    std::fs::write(env.path("talktasks.py"), TALK_TASKS).unwrap();
    env.config(
        "[pools.py]\ncommand = [\"python3\", \"-m\", \"foreman_worker\", \"talktasks\"]\nprocesses = 1",
    );
    env.init();
    let daemon = env.daemon(&[]);
    daemon.expect_log("talktasks.talk");
    let pid = worker_pids(&daemon)[0];
    // Back to back on one process: a task's last line is often read after its answer, or
    // while the next task runs, and must still be its own.
    let ids: Vec<i64> = (0..30)
        .map(|n| env.insert("talktasks.talk", &format!("[{n}]")))
        .collect();
    env.touch_wakeup("t");
    for (n, id) in ids.iter().enumerate() {
        let tag = format!("task {id} talktasks.talk (pool py pid {pid}) stderr:");
        daemon.expect_log(&format!("{tag} more {n}"));
        assert!(
            daemon.has_log(&format!("{tag} said {n}")),
            "said {n} is not tagged {tag}; log:\n{}",
            daemon.log()
        );
    }
    // Outside a task, a line is the process's.
    assert!(daemon.has_log(&format!("pool py pid {pid} stderr: talk module loading")));
    assert!(
        daemon
            .log_lines("said ")
            .iter()
            .all(|l| l.contains("(pool py pid "))
    );
    daemon.stop();
}
