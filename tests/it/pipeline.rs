//! Pipelined pools (`pipeline = true`) with the real Python worker: a drain runs every task
//! exactly once; a task waits written behind a running one (one per process, popped ahead, while
//! `workers` still bounds what runs); and what becomes of the task behind one that fails: its
//! worker dies, it times out, or a reload retires the process; an abort of the task behind; a
//! timeout that runs from the task's own start.

use std::process::Stdio;

use crate::on_both;
use crate::support::{
    Daemon, Env, PATIENCE, RECORD_TASK, is_dead, records, stderr, wait_record, wait_until,
};

/// The pool's tasks; `block` and `block_crash` run until the test creates `ran.txt.go`.
const TASKS: &str = r#"
import os, time
from foreman_worker import task

def _record(what):
    with open(os.environ["RECORD_FILE"], "a") as f:
        f.write("%s %d\n" % (what, os.getpid()))

def _wait_go():
    while not os.path.exists(os.environ["RECORD_FILE"] + ".go"):
        time.sleep(0.01)

@task
def record(tag):
    _record(tag)

@task
def tick():
    pass

@task
def block(tag):
    _record("start-" + tag)
    _wait_go()
    _record(tag)

@task
def block_crash(tag):
    _record("start-" + tag)
    _wait_go()
    os._exit(3)

@task
def hang(tag):
    _record(tag)
    time.sleep(60)

@task
def slow(tag):
    time.sleep(0.5)
    _record(tag)

@task
def nap(tag):
    time.sleep(0.05)
    _record(tag)
"#;

/// A daemon's directory with a pipelined pool of `processes` and `workers`, then `extra`.
fn pipeline_env(processes: usize, workers: usize, extra: &str) -> Env {
    pipeline_env_on(Env::new(), processes, workers, extra)
}

/// `pipeline_env` on `env`'s database (SQLite or PostgreSQL).
fn pipeline_env_on(env: Env, processes: usize, workers: usize, extra: &str) -> Env {
    std::fs::write(env.path("pipetasks.py"), TASKS).unwrap();
    env.config(&format!(
        r#"
workers = {workers}
[pools.py]
command = ["python3", "-m", "foreman_worker", "pipetasks"]
processes = {processes}
pipeline = true
{extra}
"#
    ));
    env.init();
    env
}

/// A daemon whose pool has said hello.
fn pipelined_daemon(env: &Env) -> Daemon {
    let daemon = env.daemon(&[]);
    daemon.expect_log("serves pipetasks.block, pipetasks.block_crash");
    daemon
}

/// Waits until the daemon wrote task `behind` behind task `before` on a process.
fn expect_behind(daemon: &Daemon, behind: i64, before: i64) {
    let wanted = |l: &String| {
        l.contains(&format!("task {behind} "))
            && l.contains(&format!("written behind task {before} "))
    };
    assert!(
        wait_until(PATIENCE, || daemon
            .log_lines("written behind task")
            .iter()
            .any(wanted)),
        "task {behind} was not written behind task {before}:\n{}",
        daemon.log()
    );
}

/// (state, attempt) of every attempt of task `id`.
fn runs(env: &Env, id: i64) -> Vec<(String, i64)> {
    env.sql()
        .prepare("SELECT state, attempt FROM foreman_run WHERE task_id = ?1 ORDER BY attempt")
        .unwrap()
        .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

fn wait_runs(env: &Env, id: i64, want: &[(&str, i64)]) {
    let want: Vec<(String, i64)> = want.iter().map(|(s, a)| ((*s).to_owned(), *a)).collect();
    assert!(
        wait_until(PATIENCE, || runs(env, id) == want),
        "task {id}: {:?}, not {want:?}",
        runs(env, id)
    );
}

fn queued_ids(env: &Env) -> Vec<i64> {
    env.sql()
        .prepare("SELECT id FROM foreman_task ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn go(env: &Env) {
    std::fs::write(env.path("ran.txt.go"), "").unwrap();
}

fn count(env: &Env, tag: &str) -> usize {
    records(env).iter().filter(|r| r.0 == tag).count()
}

#[test]
fn a_pipelined_pool_drains_every_task_exactly_once() {
    let env = pipeline_env(2, 2, "");
    let daemon = pipelined_daemon(&env);
    let n = 600;
    env.sql()
        .execute_batch(&format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n}) \
             INSERT INTO foreman_task(task_name, args) \
             SELECT 'pipetasks.record', json_array('t' || i) FROM n"
        ))
        .unwrap();
    env.touch_wakeup("t");
    let done = || -> i64 {
        env.sql()
            .query_row(
                "SELECT count(*) FROM foreman_run WHERE state = 'done'",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert!(
        wait_until(PATIENCE, || done() == n),
        "{} of {n} done",
        done()
    );
    let ran = records(&env);
    assert_eq!(ran.len(), 600, "a task ran twice or not at all");
    for i in 1..=n {
        assert_eq!(count(&env, &format!("t{i}")), 1, "t{i}");
    }
    assert_eq!(env.queued(), 0);
    assert!(
        daemon.has_log("written behind task"),
        "no task was pipelined:\n{}",
        daemon.log()
    );
    let log = daemon.stop();
    assert!(!log.contains("restarting worker"), "{log}");
}

#[test]
fn a_pipelined_pool_pops_one_task_ahead_per_process_and_workers_still_bounds_what_runs() {
    // One worker: the pool's process runs `block`, a second pool task is popped and written
    // behind it, and the command task waits for the worker, as does the third pool task.
    let env = pipeline_env(1, 1, RECORD_TASK);
    let daemon = pipelined_daemon(&env);
    let first = env.insert("pipetasks.block", r#"["first"]"#);
    let behind = env.insert("pipetasks.record", r#"["behind"]"#);
    let third = env.insert("pipetasks.record", r#"["third"]"#);
    let command = env.insert("record", "[]");
    env.touch_wakeup("t");
    let pid = wait_record(&env, "start-first");
    expect_behind(&daemon, behind, first);
    assert_eq!(queued_ids(&env), vec![third, command]);
    assert_eq!(runs(&env, behind), [("running".to_owned(), 1)]);
    go(&env);
    // Behind it, on the same process; then the rest, one at a time.
    assert_eq!(wait_record(&env, "behind"), pid);
    assert_eq!(wait_record(&env, "third"), pid);
    let lines = || -> Vec<String> {
        std::fs::read_to_string(env.path("ran.txt"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    assert!(wait_until(PATIENCE, || lines().contains(&command.to_string())));
    let order = lines();
    let at = |line: &str| order.iter().position(|l| l.starts_with(line));
    assert!(
        at("first ") < at(&command.to_string()),
        "the command task ran while the only worker was busy: {order:?}"
    );
    for id in [first, behind, third, command] {
        wait_runs(&env, id, &[("done", 1)]);
    }
    daemon.stop();
}

#[test]
fn a_task_written_behind_one_whose_worker_dies_runs_once_on_another_process() {
    let env = pipeline_env(1, 1, "");
    let daemon = pipelined_daemon(&env);
    let crash = env.insert("pipetasks.block_crash", r#"["crash"]"#);
    let behind = env.insert("pipetasks.record", r#"["behind"]"#);
    env.touch_wakeup("t");
    let crashed = wait_record(&env, "start-crash");
    expect_behind(&daemon, behind, crash);
    go(&env);
    daemon.expect_log(&format!(
        "worker pid {crashed} died during the task (exited with status 3)"
    ));
    let ran_on = wait_record(&env, "behind");
    assert_ne!(ran_on, crashed, "it ran on the process that died");
    wait_runs(&env, crash, &[("failed", 1)]);
    wait_runs(&env, behind, &[("done", 1)]);
    let log = daemon.stop();
    assert_eq!(count(&env, "behind"), 1, "{log}");
}

#[test]
fn a_timeout_with_a_task_behind_kills_the_worker_and_the_task_behind_runs_once_elsewhere() {
    let env = pipeline_env(
        1,
        1,
        "[tasks.\"pipetasks.hang\"]\npool = \"py\"\ntimeout = \"300ms\"",
    );
    let daemon = pipelined_daemon(&env);
    let hang = env.insert("pipetasks.hang", r#"["hanging"]"#);
    let behind = env.insert("pipetasks.record", r#"["behind"]"#);
    env.touch_wakeup("t");
    let hung_pid = wait_record(&env, "hanging");
    expect_behind(&daemon, behind, hang);
    daemon.expect_log("timeout after 300ms");
    assert!(
        wait_until(PATIENCE, || is_dead(hung_pid)),
        "the hung worker lives"
    );
    assert_ne!(wait_record(&env, "behind"), hung_pid);
    wait_runs(&env, hang, &[("timeout", 1)]);
    wait_runs(&env, behind, &[("done", 1)]);
    daemon.stop();
    assert_eq!(count(&env, "behind"), 1);
}

#[test]
fn a_task_written_behind_times_out_from_its_own_start() {
    // `slow` takes 0.5 s; `nap`, written behind it, takes 0.05 s of its 0.3 s: counted from its
    // write it would time out, counted from its start it is done.
    let env = pipeline_env(
        1,
        1,
        "[tasks.\"pipetasks.nap\"]\npool = \"py\"\ntimeout = \"300ms\"",
    );
    let daemon = pipelined_daemon(&env);
    let slow = env.insert("pipetasks.slow", r#"["slow"]"#);
    let nap = env.insert("pipetasks.nap", r#"["nap"]"#);
    env.touch_wakeup("t");
    expect_behind(&daemon, nap, slow);
    let pid = wait_record(&env, "slow");
    assert_eq!(wait_record(&env, "nap"), pid);
    wait_runs(&env, slow, &[("done", 1)]);
    wait_runs(&env, nap, &[("done", 1)]);
    let log = daemon.stop();
    assert!(!log.contains("timeout after"), "{log}");
}

#[test]
fn cancel_of_a_task_written_behind_spares_the_task_before_it() {
    let env = pipeline_env(1, 1, "");
    let daemon = pipelined_daemon(&env);
    let first = env.insert("pipetasks.block", r#"["first"]"#);
    let behind = env.insert("pipetasks.slow", r#"["behind"]"#);
    env.touch_wakeup("t");
    let pid = wait_record(&env, "start-first");
    expect_behind(&daemon, behind, first);
    // `cancel` waits for the abort to be recorded, which comes once `first` has ended.
    let mut cancel = env
        .command(&["cancel", "--grace", "2s", &behind.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    daemon.expect_log(&format!(
        "task {behind} pipetasks.slow aborted (foreman cancel): its cancellation flag is raised"
    ));
    assert!(
        !is_dead(pid),
        "the abort stopped the process of the task before it"
    );
    go(&env);
    assert_eq!(wait_record(&env, "first"), pid);
    wait_runs(&env, first, &[("done", 1)]);
    wait_runs(&env, behind, &[("cancelled", 1)]);
    assert!(
        wait_until(PATIENCE, || cancel.try_wait().unwrap().is_some()),
        "cancel did not return"
    );
    let out = cancel.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    daemon.expect_log(&format!(
        "worker pid {pid} stopped by the abort of task {behind}; starting another"
    ));
    // The pool goes on, on a new process.
    let next = env.insert("pipetasks.record", r#"["next"]"#);
    env.touch_wakeup("n");
    assert_ne!(wait_record(&env, "next"), pid);
    wait_runs(&env, next, &[("done", 1)]);
    daemon.stop();
    assert_eq!(count(&env, "behind"), 0, "the aborted task ran to its end");
}

#[test]
fn a_reload_lets_a_pipelined_process_finish_the_task_written_behind_before_it_leaves() {
    let env = pipeline_env(1, 2, "");
    let daemon = pipelined_daemon(&env);
    let long = env.insert("pipetasks.block", r#"["long"]"#);
    let behind = env.insert("pipetasks.record", r#"["behind"]"#);
    env.touch_wakeup("t");
    let old = wait_record(&env, "start-long");
    expect_behind(&daemon, behind, long);
    daemon.signal(libc::SIGHUP);
    daemon.expect_log("reloaded: ");
    // The new process is up, and the old one still runs its task.
    assert!(wait_until(PATIENCE, || {
        daemon.log_lines("serves pipetasks.block").len() == 2
    }));
    assert!(!is_dead(old));
    go(&env);
    assert_eq!(wait_record(&env, "long"), old);
    assert_eq!(
        wait_record(&env, "behind"),
        old,
        "not finished by its process"
    );
    daemon.expect_log(&format!("worker pid {old} stopped: replaced by the reload"));
    wait_runs(&env, long, &[("done", 1)]);
    wait_runs(&env, behind, &[("done", 1)]);
    let next = env.insert("pipetasks.record", r#"["next"]"#);
    env.touch_wakeup("n");
    assert_ne!(wait_record(&env, "next"), old);
    wait_runs(&env, next, &[("done", 1)]);
    daemon.stop();
}

/// A worker that leaves after a task tagged `last` (as one that exits after so many tasks does),
/// once the test creates `ran.txt.go`, without reading the next line. It reads a byte at a time:
/// a buffered read could take the line behind with the task's own, and then the daemon must
/// count that task as started (and failed), not run it elsewhere.
const LEAVING_WORKER: &str = r#"
import json, os, sys, time
def lines():
    line = b""
    while True:
        byte = os.read(0, 1)
        if not byte:
            return
        line += byte
        if byte == b"\n":
            yield line
            line = b""
print(json.dumps({"protocol": 1, "tasks": ["leave.record"]}), flush=True)
for line in lines():
    task = json.loads(line)
    tag = task["args"][0]
    with open(os.environ["RECORD_FILE"], "a") as f:
        f.write("%s %d\n" % (tag, os.getpid()))
    if tag == "last":
        while not os.path.exists(os.environ["RECORD_FILE"] + ".go"):
            time.sleep(0.01)
    print(json.dumps({"id": task["id"], "ok": True}), flush=True)
    if tag == "last":
        os._exit(0)
"#;

#[test]
fn a_worker_that_exits_after_an_answer_leaves_the_line_behind_to_another_process() {
    let env = Env::new();
    std::fs::write(env.path("leaving_worker.py"), LEAVING_WORKER).unwrap();
    env.config(
        "workers = 1\n[pools.leave]\ncommand = [\"python3\", \"leaving_worker.py\"]\nprocesses = 1\npipeline = true\n",
    );
    env.init();
    let daemon = env.daemon(&[]);
    daemon.expect_log("serves leave.record");
    let last = env.insert("leave.record", r#"["last"]"#);
    let after = env.insert("leave.record", r#"["after"]"#);
    env.touch_wakeup("t");
    let first = wait_record(&env, "last");
    expect_behind(&daemon, after, last);
    go(&env);
    daemon.expect_log(&format!(
        "worker pid {first} exited before it read its next task (exited with status 0)"
    ));
    assert_ne!(wait_record(&env, "after"), first);
    wait_runs(&env, last, &[("done", 1)]);
    wait_runs(&env, after, &[("done", 1)]);
    daemon.stop();
    assert_eq!(count(&env, "after"), 1);
}

on_both! {
    /// The claim by name (PostgreSQL's) takes a pipelined pool's room behind its running tasks
    /// too, and every task still runs once.
    fn a_pipelined_pool_on_either_backend_writes_tasks_behind_and_runs_each_once(env: Env) {
        let env = pipeline_env_on(env, 2, 2, "");
        let daemon = pipelined_daemon(&env);
        let n: i64 = 2_000;
        env.insert_many("pipetasks.tick", n);
        env.touch_wakeup("t");
        let done = || env.number("SELECT count(*) FROM foreman_run WHERE state = 'done'");
        assert!(
            wait_until(PATIENCE, || done() == n),
            "{} of {n} done:\n{}",
            done(),
            daemon.log()
        );
        assert_eq!(
            env.number("SELECT count(DISTINCT task_id) FROM foreman_run"),
            n,
            "each task once"
        );
        assert_eq!(env.number("SELECT count(*) FROM foreman_run"), n);
        assert_eq!(env.queued(), 0);
        assert!(
            daemon.has_log("written behind task"),
            "no task was written behind another:\n{}",
            daemon.log()
        );
        daemon.stop();
    }
}
