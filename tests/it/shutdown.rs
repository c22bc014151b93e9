//! Shutdown and the single-instance guard: graceful stop, the graceful timeout, a second signal,
//! a second daemon, a stale PID file.

use std::time::{Duration, Instant};

use crate::support::{Daemon, Env, PATIENCE, is_dead, read_pid, stderr, wait_until};

const HANG_TASK: &str = r#"
[tasks.hang]
command = ["sh", "-c", "echo $$ > \"$RECORD_FILE.pid\"; exec sleep 60"]
"#;

/// Starts a daemon running one `hang` task; returns it with the task id and the child's pid.
fn start_hang(env: &Env, args: &[&str]) -> (Daemon, i64, i32) {
    env.config(HANG_TASK);
    env.init();
    let daemon = env.daemon(args);
    let id = env.insert("hang", "[]");
    env.touch_wakeup("w");
    let pid_file = env.path("ran.txt.pid");
    assert!(
        wait_until(PATIENCE, || read_pid(&pid_file).is_some()),
        "task never started"
    );
    let child = read_pid(&pid_file).unwrap();
    (daemon, id, child)
}

#[test]
fn sigterm_waits_for_a_running_task_then_exits_0() {
    let env = Env::new();
    env.init();
    let mut daemon = env.daemon(&[]);
    let id = env.insert("foreman.sleep", "[0.5]");
    env.touch_wakeup("w");
    daemon.expect_log(&format!("task {id} foreman.sleep started"));
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(PATIENCE);
    assert!(status.success(), "exit {status}");
    let log = daemon.log();
    let done = log
        .find(&format!("task {id} foreman.sleep done"))
        .expect("the task finished");
    let stopped = log.find("foreman stopped").expect("stop logged");
    assert!(done < stopped, "{log}");
}

#[test]
fn tasks_queued_after_sigterm_stay_queued() {
    let env = Env::new();
    env.init();
    let mut daemon = env.daemon(&["--workers", "1"]);
    let id = env.insert("foreman.sleep", "[0.5]");
    env.touch_wakeup("w");
    daemon.expect_log(&format!("task {id} foreman.sleep started"));
    daemon.signal(libc::SIGTERM);
    daemon.expect_log("stopping");
    let later = env.insert("foreman.echo", "[]");
    env.touch_wakeup("w2");
    assert!(daemon.wait_exit(PATIENCE).success());
    assert!(
        !daemon.log().contains(&format!("task {later} ")),
        "popped during shutdown"
    );
    assert_eq!(env.queued(), 1);
}

#[test]
fn graceful_timeout_exceeded_logs_the_survivor_and_kills_its_child() {
    let env = Env::new();
    let (mut daemon, id, child) = start_hang(&env, &["--graceful-timeout", "1s"]);
    let signalled = Instant::now();
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(5));
    let took = signalled.elapsed();
    assert!(status.success(), "exit {status}");
    // The issue's bound: the graceful timeout plus one second.
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(
        daemon.log().contains(&format!(
            "task {id} hang still running at the graceful timeout"
        )),
        "{}",
        daemon.log()
    );
    assert!(
        wait_until(PATIENCE, || is_dead(child)),
        "child {child} survived the daemon"
    );
}

#[test]
fn a_second_signal_exits_at_once_and_kills_children() {
    let env = Env::new();
    let (mut daemon, _, child) = start_hang(&env, &["--graceful-timeout", "1h"]);
    daemon.signal(libc::SIGTERM);
    daemon.expect_log("stopping");
    daemon.signal(libc::SIGINT);
    let status = daemon.wait_exit(PATIENCE);
    assert_eq!(status.code(), Some(1), "{}", daemon.log());
    assert!(daemon.log().contains("second signal"), "{}", daemon.log());
    assert!(
        wait_until(PATIENCE, || is_dead(child)),
        "child {child} survived"
    );
}

#[test]
fn children_die_with_the_daemon_even_on_kill_9() {
    let env = Env::new();
    let (mut daemon, _, child) = start_hang(&env, &[]);
    daemon.kill9();
    assert!(
        wait_until(PATIENCE, || is_dead(child)),
        "child {child} outlived a kill -9 of the daemon"
    );
}

#[test]
fn a_second_daemon_on_the_same_db_is_refused() {
    let env = Env::new();
    env.init();
    let first = env.daemon(&[]);
    let out = env.run(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("already running (pid {}", first.pid())),
        "{err}"
    );
    first.stop();
}

#[test]
fn a_stale_pid_file_after_kill_9_is_ignored() {
    let env = Env::new();
    env.init();
    let mut first = env.daemon(&[]);
    let old_pid = first.pid();
    first.kill9();
    let pid_file = env.path("q.sqlite3.pid");
    assert_eq!(
        read_pid(&pid_file),
        Some(old_pid),
        "the pid file is left behind"
    );
    let second = env.daemon(&[]);
    assert_eq!(read_pid(&pid_file), Some(second.pid()));
    let id = env.insert("foreman.echo", "[]");
    env.touch_wakeup("w");
    second.expect_log(&format!("task {id} foreman.echo"));
    second.stop();
}
