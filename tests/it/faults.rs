//! Faults around a running daemon: a full disk, a database or wakeup dir changed under it, no
//! inotify, and tasks that eat memory, close their stdout or flood their stderr. Each time the
//! daemon says what happened in one line, keeps running (or, when its database is replaced,
//! exits 1 for a restart), loses nothing it was given, and runs the next task.
//!
//! Covered elsewhere: a panicking in-process handler (library.rs), command and pool tasks that
//! hang past their timeout (pools.rs), unwritable paths and read-only mounts at startup
//! (environment.rs). A backward step of the clock is tested at the unit level (`clock`,
//! `schedule`, `queue`): the tests never change the system clock.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{
    BIN, Daemon, Env, PATIENCE, PYTHON_CLIENT, Unprivileged, chmod, daemon_args, finish, is_dead,
    is_root, records, stderr, wait_record, wait_until,
};

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn enqueue(env: &Env, name: &str, args: &str) -> i64 {
    let id = env.insert(name, args);
    env.touch_wakeup("t");
    id
}

/// The state of the task's latest attempt in `foreman_run`.
fn run_state(env: &Env, id: i64) -> Option<String> {
    env.sql()
        .query_row(
            "SELECT state FROM foreman_run WHERE task_id = ?1 ORDER BY attempt DESC LIMIT 1",
            [id],
            |r| r.get(0),
        )
        .ok()
}

fn count(env: &Env, sql: &str) -> i64 {
    env.sql().query_row(sql, [], |r| r.get(0)).unwrap()
}

/// The daemon's peak resident memory (VmHWM), in KiB.
fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A small tmpfs, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(stderr(&out).trim().to_owned());
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a child still holding a file there must not leave the mount behind.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `dir` with one file until it takes no more bytes.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    path
}

const PYTHON_ENQUEUE: &str = r"
import sys
from foreman_client import Client
try:
    Client(sys.argv[1]).enqueue('foreman.bench')
except Exception as e:
    print(type(e).__name__, e)
else:
    print('enqueued')
";

/// Inserts `count` `foreman.bench` tasks in one transaction, without a wakeup; returns their ids.
fn insert_bench_tasks(env: &Env, count: usize) -> Vec<i64> {
    let mut conn = env.sql();
    let tx = conn.transaction().unwrap();
    let ids = (0..count)
        .map(|_| {
            tx.query_row(
                "INSERT INTO foreman_task(task_name) VALUES ('foreman.bench') RETURNING id",
                [],
                |r| r.get(0),
            )
            .unwrap()
        })
        .collect();
    tx.commit().unwrap();
    ids
}

/// (task id, Unix time) of each start `foreman.bench` recorded in `path`.
fn bench_starts(path: &Path) -> Vec<(i64, f64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (id, at) = l.split_once(' ')?;
            Some((id.parse().ok()?, at.parse().ok()?))
        })
        .collect()
}

/// On a full disk, `foreman enqueue` and the Python client fail with the reason, and are never
/// handed an id for a row that was not stored.
fn expect_producers_refused(env: &Env) {
    let out = env.run(&["enqueue", "foreman.bench"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty(), "an id for a task not enqueued");
    assert!(
        err.contains(&format!(
            "cannot write {}: database or disk is full (its file system has",
            env.db.display()
        )) && err.contains("; free some space or use a larger volume"),
        "{err}"
    );
    let python = Command::new("python3")
        .arg("-c")
        .arg(PYTHON_ENQUEUE)
        .arg(&env.db)
        .env("PYTHONPATH", &*PYTHON_CLIENT)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&python.stdout);
    assert!(
        said.contains("OperationalError database or disk is full"),
        "{said}{}",
        stderr(&python)
    );
}

/// Moves `env`'s database and wakeup dir to a 16 MiB tmpfs, mounted until the guard drops; `None`
/// (the test is skipped, and says so) where mounting is not allowed.
fn on_a_small_disk(env: &mut Env) -> Option<(Tmpfs, PathBuf)> {
    let small = env.path("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = if is_root() {
        Tmpfs::mount(&small, "16m")
    } else {
        Err("not root".to_owned())
    };
    match mounted {
        Ok(tmpfs) => {
            env.db = small.join("q.sqlite3");
            env.wakeup = small.join("q.sqlite3.wakeup");
            Some((tmpfs, small))
        }
        Err(e) => {
            eprintln!("skipped: cannot mount tmpfs ({e})");
            None
        }
    }
}

#[test]
fn a_full_disk_fails_producers_clearly_and_the_daemon_resumes_losing_nothing() {
    let mut env = Env::new();
    let Some((_tmpfs, small)) = on_a_small_disk(&mut env) else {
        return;
    };
    env.config(
        r#"
workers = 1
[schedules.every_second]
task = "foreman.echo"
every = "1s"
[tasks.hold]
command = ["sh", "-c", "while [ ! -e \"$RECORD_FILE.go\" ]; do sleep 0.01; done; echo \"$FOREMAN_TASK_ID\" >> \"$RECORD_FILE\""]
"#,
    );
    env.init();
    // foreman.bench records each start outside the small file system.
    let starts = env.path("starts.txt");
    let mut cmd = env.command(&daemon_args(&["--tick", "50ms"]));
    cmd.env("FOREMAN_BENCH_OUT", &starts);
    let daemon = Daemon::spawn(cmd);
    let hold = enqueue(&env, "hold", "[]");
    assert!(wait_until(PATIENCE, || run_state(&env, hold).as_deref()
        == Some("running")));
    // Queued behind the only worker, which `hold` keeps busy.
    let queued = insert_bench_tasks(&env, 2000);
    let filler = fill(&small);
    expect_producers_refused(&env);

    // `hold` ends while the disk is full: neither its end nor the next pop can be written.
    std::fs::write(env.path("ran.txt.go"), b"").unwrap();
    assert_eq!(env.wait_ran(1), vec![hold]);
    // Whichever write fails first (the pop, the heartbeat, the schedule) says it.
    daemon.expect_log("database or disk is full");
    // A second and a half of full disk (30 ticks, and a schedule's firing): the daemon lives on,
    // retrying, and says so once.
    let pid = daemon.pid();
    assert!(!wait_until(Duration::from_millis(1500), || is_dead(pid)));
    let errors = daemon.log_lines("disk is full");
    assert_eq!(errors.len(), 1, "{}", daemon.log());
    assert!(errors[0].contains("retrying every 50ms"), "{}", errors[0]);
    let bench_queued = "SELECT count(*) FROM foreman_task WHERE task_name = 'foreman.bench'";
    assert_eq!(count(&env, bench_queued), 2000);
    assert_eq!(std::fs::read_to_string(&starts).unwrap_or_default(), "");

    std::fs::remove_file(&filler).unwrap();
    let freed = unix_now();
    assert!(
        wait_until(PATIENCE, || bench_starts(&starts).len() >= 2000),
        "{} of 2000 started; log:\n{}",
        bench_starts(&starts).len(),
        daemon.log()
    );
    let started = bench_starts(&starts);
    let mut ids: Vec<i64> = started.iter().map(|s| s.0).collect();
    ids.sort_unstable();
    assert_eq!(ids, queued, "each queued task ran once");
    let resumed = started.iter().map(|s| s.1).fold(f64::MAX, f64::min) - freed;
    daemon.expect_log("the database takes writes again after");
    assert_eq!(run_state(&env, hold).as_deref(), Some("done"));
    assert_eq!(count(&env, bench_queued), 0);
    assert_eq!(count(&env, "SELECT count(*) FROM foreman_dead"), 0);
    env.assert_healthy();
    let log = daemon.stop();
    eprintln!(
        "resumed {resumed:.2}s after space returned; 2000 of 2000 ran; {} error line(s)",
        log.lines().filter(|l| l.contains("disk is full")).count()
    );
}

#[test]
fn a_database_made_read_only_under_the_daemon_refuses_producers_and_the_daemon_runs_on() {
    if !is_root() {
        eprintln!("skipped: needs root, to add a row the daemon's user could not");
        return;
    }
    let t = Unprivileged::new();
    t.init();
    let daemon = t.daemon(&["--tick", "50ms"]);
    chmod(&t.env.db, 0o444);
    chmod(&t.data, 0o555);
    let (code, err) = finish(t.command(&["enqueue", "foreman.echo"]), &t.env);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "cannot write {}: its directory {} is not writable by uid {}",
            t.env.db.display(),
            t.data.display(),
            t.uid
        )),
        "{err}"
    );
    // The daemon's connection was opened for writing and stays so: a row a privileged producer
    // adds runs, and the heartbeat it records moves.
    let beat = || -> f64 {
        t.env
            .sql()
            .query_row("SELECT heartbeat_at FROM foreman_daemon", [], |r| r.get(0))
            .unwrap()
    };
    let before = beat();
    let id = enqueue(&t.env, "foreman.echo", r#"["read-only"]"#);
    daemon.expect_log(&format!("task {id} foreman.echo"));
    assert!(wait_until(PATIENCE, || beat() > before), "no heartbeat");
    assert_eq!(run_state(&t.env, id).as_deref(), Some("done"));
    t.env.assert_healthy();
    chmod(&t.data, 0o755);
    chmod(&t.env.db, 0o644);
    let (code, err) = finish(t.command(&["enqueue", "foreman.echo"]), &t.env);
    assert_eq!(code, Some(0), "writable again: {err}");
    daemon.expect_log("foreman.echo: args=[]");
    let log = daemon.stop();
    assert!(!log.contains("ERROR"), "{log}");
}

#[test]
fn a_database_replaced_or_deleted_under_the_daemon_stops_it_with_exit_1_for_a_restart() {
    let env = Env::new();
    env.init();
    // A restored backup, with a task of its own.
    let backup = env.path("backup.sqlite3");
    let out = Command::new(BIN)
        .arg("--db")
        .arg(&backup)
        .arg("init")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    rusqlite::Connection::open(&backup)
        .unwrap()
        .execute(
            r#"INSERT INTO foreman_task(task_name, args) VALUES ('foreman.echo', '["from the backup"]')"#,
            [],
        )
        .unwrap();
    let mut daemon = env.daemon(&["--tick", "50ms"]);
    let id = enqueue(&env, "foreman.echo", "[]");
    daemon.expect_log(&format!("task {id} foreman.echo"));
    std::fs::rename(&backup, &env.db).unwrap();
    let status = daemon.wait_exit(PATIENCE);
    let log = daemon.log();
    assert_eq!(status.code(), Some(1), "{log}");
    let db = env.db.display();
    assert!(
        log.contains(&format!(
            "database {db} was replaced by another file while the daemon ran: it stops popping"
        )) && log.contains(&format!(
            "ERROR] database {db} was replaced by another file while the daemon ran; restart foreman to use the file now at that path"
        )),
        "{log}"
    );
    let mut restarted = env.daemon(&["--tick", "50ms"]);
    restarted.expect_log(r#"foreman.echo: args=["from the backup"]"#);

    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{db}{suffix}"));
    }
    let status = restarted.wait_exit(PATIENCE);
    let log = restarted.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "database {db} was deleted or moved away while the daemon ran"
        )),
        "{log}"
    );
    // The restart creates the database afresh, and producers' tasks run again.
    let fresh = env.daemon(&["--tick", "50ms"]);
    let id = enqueue(&env, "foreman.echo", r#"["fresh"]"#);
    fresh.expect_log(&format!(r#"task {id} foreman.echo: args=["fresh"]"#));
    fresh.stop();
}

#[test]
fn an_idle_daemon_on_a_full_disk_logs_the_trouble_once() {
    // With nothing to pop, a cycle commits an empty transaction, which a full disk lets through:
    // that must not read as the database taking writes again (and restart the error's logging).
    let mut env = Env::new();
    let Some((_tmpfs, small)) = on_a_small_disk(&mut env) else {
        return;
    };
    env.config("workers = 2\n[schedules.every_second]\ntask = \"foreman.echo\"\nevery = \"1s\"\n");
    env.init();
    let daemon = env.daemon(&["--tick", "50ms"]);
    let filler = fill(&small);
    daemon.expect_log("database or disk is full");
    // Two more firings of the schedule, each failing, each followed by an empty pop.
    let pid = daemon.pid();
    assert!(!wait_until(Duration::from_millis(2500), || is_dead(pid)));
    let log = daemon.log();
    assert_eq!(daemon.log_lines("disk is full").len(), 1, "{log}");
    assert!(!log.contains("takes writes again"), "{log}");
    std::fs::remove_file(&filler).unwrap();
    daemon.expect_log("the database takes writes again");
    daemon.stop();
}

#[test]
fn a_stop_signal_while_draining_for_a_replaced_database_still_waits_for_the_running_task() {
    // A supervisor restarting the daemon after a restore sends one SIGTERM: that must not count
    // as the second signal, which abandons running tasks.
    let env = Env::new();
    env.init();
    let mut daemon = env.daemon(&["--tick", "50ms"]);
    let id = enqueue(&env, "foreman.sleep", "[2]");
    daemon.expect_log(&format!("task {id} foreman.sleep started"));
    std::fs::remove_file(&env.db).unwrap();
    daemon.expect_log("database gone: stopping");
    daemon.signal(libc::SIGTERM);
    daemon.expect_log("signal 15: already stopping; still waiting for 1 running task(s)");
    let status = daemon.wait_exit(PATIENCE);
    let log = daemon.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!("task {id} foreman.sleep done")),
        "{log}"
    );
    assert!(!log.contains("abandoned"), "{log}");
}

#[test]
fn a_wakeup_dir_removed_under_the_daemon_is_made_again_and_watched() {
    let env = Env::new();
    env.init();
    // A tick far off: only the watch can start these tasks while the test runs.
    let daemon = env.daemon(&["--tick", "1h"]);
    let again = format!(
        "wakeup dir {} was removed while the daemon ran; watching it again",
        env.wakeup.display()
    );
    std::fs::remove_dir_all(&env.wakeup).unwrap();
    daemon.expect_log(&again);
    let mode = std::fs::metadata(&env.wakeup).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let id = enqueue(&env, "foreman.echo", r#"["first"]"#);
    daemon.expect_log(&format!("task {id} foreman.echo"));
    // Removed and made again at once by someone else (a deploy script): watched all the same.
    std::fs::remove_dir_all(&env.wakeup).unwrap();
    match std::fs::create_dir(&env.wakeup) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {} // The daemon was first.
        created => created.unwrap(),
    }
    assert!(wait_until(PATIENCE, || daemon.log_lines(&again).len() == 2));
    let id = enqueue(&env, "foreman.echo", r#"["second"]"#);
    daemon.expect_log(&format!("task {id} foreman.echo"));
    daemon.stop();
}

/// A user of its own for the inotify test: using up `nobody`'s inotify instances would take them
/// from the tests that run foreman as `nobody` meanwhile.
const INOTIFY_UID: u32 = 64_999;

/// Takes inotify instances until the kernel refuses one, prints how many and the errno, and holds
/// them until its stdin closes.
const USE_UP_INOTIFY: &str = r"
import ctypes, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
libc = ctypes.CDLL(None, use_errno=True)
fds = []
while True:
    fd = libc.inotify_init1(0)
    if fd < 0:
        break
    fds.append(fd)
print(len(fds), ctypes.get_errno(), flush=True)
sys.stdin.read()
";

#[test]
fn without_inotify_the_daemon_warns_runs_on_its_tick_and_watches_once_it_can() {
    if !is_root() {
        eprintln!("skipped: needs root, to use up the inotify instances of a user of its own");
        return;
    }
    let t = Unprivileged::as_uid(INOTIFY_UID);
    t.init();
    let mut hog = Command::new("python3")
        .arg("-c")
        .arg(USE_UP_INOTIFY)
        .uid(INOTIFY_UID)
        .gid(INOTIFY_UID)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(hog.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let max: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if line.trim() != format!("{max} {}", libc::EMFILE) {
        eprintln!(
            "skipped: cannot use up the {max} inotify instances of uid {INOTIFY_UID} ({line:?})"
        );
        let _ = hog.kill();
        let _ = hog.wait();
        return;
    }
    let daemon = t.daemon(&["--tick", "100ms"]);
    let warning = daemon.log_lines("falling back to the 100ms tick");
    assert_eq!(warning.len(), 1, "{}", daemon.log());
    assert!(
        warning[0].contains(&format!(
            "cannot watch wakeup dir {}: uid {INOTIFY_UID} has used up its inotify instances",
            t.env.wakeup.display()
        )),
        "{}",
        warning[0]
    );
    let id = enqueue(&t.env, "foreman.echo", r#"["on the tick"]"#);
    daemon.expect_log(&format!("task {id} foreman.echo"));
    drop(hog.stdin.take());
    hog.wait().unwrap();
    daemon.expect_log(&format!(
        "watching wakeup dir {} again: new tasks start at once again",
        t.env.wakeup.display()
    ));
    let id = enqueue(&t.env, "foreman.echo", r#"["watched"]"#);
    daemon.expect_log(&format!("task {id} foreman.echo"));
    assert_eq!(daemon.log_lines("falling back").len(), 1, "warned once");
    t.env.assert_healthy();
    daemon.stop();
}

/// Task module for the pool below.
const FAULT_TASKS: &str = r#"
import os, sys, time
from foreman_worker import task

def _record(what):
    with open(os.environ["RECORD_FILE"], "a") as f:
        f.write("%s %d\n" % (what, os.getpid()))

@task
def record(tag):
    _record(tag)

@task
def hog(tag):
    _record(tag)
    held = [bytearray(8 << 20) for _ in range(20)]
    time.sleep(60)

@task
def flood(tag, megabytes):
    line = "x" * 99 + "\n"
    for _ in range(megabytes * 10_000):
        sys.stderr.write(line)
    sys.stderr.flush()
    _record(tag)
"#;

/// An `Env` with the fault task module as pool `py` (one process, its address space capped by
/// `ulimit -v` so a runaway task cannot take the machine), plus `extra` config.
fn fault_env(extra: &str) -> Env {
    let env = Env::new();
    std::fs::write(env.path("faulttasks.py"), FAULT_TASKS).unwrap();
    env.config(&format!(
        r#"
workers = 2
[pools.py]
command = ["sh", "-c", "ulimit -v 1000000; exec python3 -m foreman_worker faulttasks"]
processes = 1
{extra}
"#
    ));
    env.init();
    env
}

#[test]
fn a_task_eating_memory_is_stopped_and_its_slot_freed() {
    let env = fault_env(
        r#"
[tasks."faulttasks.hog"]
pool = "py"
timeout = "1s"
[tasks.hog]
command = ["sh", "-c", "ulimit -v 200000; exec python3 -c 'x = []\nwhile True: x.append(bytearray(1 << 20))'"]
"#,
    );
    let daemon = env.daemon(&[]);
    // A command past its address-space limit fails with the child's own last words.
    let id = enqueue(&env, "hog", "[]");
    daemon.expect_log(&format!("task {id} hog failed"));
    let line = daemon.log_lines(&format!("task {id} hog failed")).remove(0);
    assert!(line.contains("MemoryError"), "{line}");
    // A pool task that holds 160 MB is killed at its timeout, and its process with it.
    let id = enqueue(&env, "faulttasks.hog", r#"["hogging"]"#);
    let hog = wait_record(&env, "hogging");
    daemon.expect_log(&format!("task {id} faulttasks.hog failed after"));
    daemon.expect_log("timeout after 1s");
    assert!(wait_until(PATIENCE, || is_dead(hog)), "the hog lives on");
    enqueue(&env, "faulttasks.record", r#"["next"]"#);
    assert_ne!(wait_record(&env, "next"), hog);
    env.assert_healthy();
    daemon.stop();
}

/// A hand-written pool worker that closes its stdout: during a task, or between two.
const CLOSING_WORKER: &str = r#"
import json, os, sys, time
print(json.dumps({"protocol": 1, "tasks": ["raw.ok", "raw.close_now", "raw.close_after"]}), flush=True)
for line in sys.stdin:
    task = json.loads(line)
    with open(os.environ["RECORD_FILE"], "a") as f:
        f.write("%s %d\n" % (task["args"][0], os.getpid()))
    if task["task_name"] == "raw.close_now":
        os.close(1)
        time.sleep(60)
    print(json.dumps({"id": task["id"], "ok": True}), flush=True)
    if task["task_name"] == "raw.close_after":
        os.close(1)
"#;

#[test]
fn a_task_closing_its_stdout_ends_well_or_costs_the_worker_only() {
    let env = Env::new();
    std::fs::write(env.path("closing_worker.py"), CLOSING_WORKER).unwrap();
    env.config(
        r#"
[pools.raw]
command = ["python3", "closing_worker.py"]
processes = 1
[tasks.quiet]
command = ["sh", "-c", "exec >&-; echo \"closed $$\" >> \"$RECORD_FILE\"; echo 'still here' >&2"]
"#,
    );
    env.init();
    let daemon = env.daemon(&[]);
    // A command needs no stdout.
    let id = enqueue(&env, "quiet", "[]");
    wait_record(&env, "closed");
    daemon.expect_log(&format!("task {id} quiet done"));
    // A worker that closes its stdout between two tasks is not given the next one: that one
    // runs on its successor.
    let id = enqueue(&env, "raw.close_after", r#"["after"]"#);
    let closed = wait_record(&env, "after");
    daemon.expect_log(&format!("task {id} raw.close_after done"));
    let fd1 = format!("/proc/{closed}/fd/1");
    assert!(wait_until(PATIENCE, || !Path::new(&fd1).exists()));
    let id = enqueue(&env, "raw.ok", r#"["next"]"#);
    let next = wait_record(&env, "next");
    assert_ne!(next, closed);
    daemon.expect_log(&format!(
        "worker pid {closed} closed its stdout between tasks"
    ));
    daemon.expect_log(&format!("task {id} raw.ok done"));
    // One that closes it during a task fails that task (it may have done its work: at most
    // once) and is replaced.
    let id = enqueue(&env, "raw.close_now", r#"["now"]"#);
    let broken = wait_record(&env, "now");
    assert_eq!(broken, next);
    daemon.expect_log(&format!("task {id} raw.close_now failed after"));
    daemon.expect_log(&format!(
        "worker protocol error: worker pid {broken} closed its stdout without answering"
    ));
    assert!(wait_until(PATIENCE, || is_dead(broken)));
    enqueue(&env, "raw.ok", r#"["last"]"#);
    assert_ne!(wait_record(&env, "last"), broken);
    let tags: Vec<String> = records(&env).into_iter().map(|r| r.0).collect();
    assert_eq!(
        tags,
        ["closed", "after", "next", "now", "last"],
        "each ran once"
    );
    env.assert_healthy();
    daemon.stop();
}

/// 100-byte lines: `megabytes` MB of them is `megabytes * 10_000` lines.
fn flood_command(megabytes: u32) -> String {
    format!(
        r#"command = ["sh", "-c", "yes {x} | head -c {bytes} >&2; echo \"flooded $$\" >> \"$RECORD_FILE\""]"#,
        x = "x".repeat(99),
        bytes = megabytes * 1_000_000
    )
}

/// The stderr lines of `who` in `log`, and the lines it says it did not log.
fn logged_and_skipped(log: &str, who: &str) -> (u64, u64) {
    let line = format!("{who} stderr: ");
    let counted = format!("{who}: ");
    let logged = log.lines().filter(|l| l.contains(&line)).count() as u64;
    let skipped = log
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once(&counted)?;
            rest.strip_suffix(" output line(s) not logged")?
                .parse::<u64>()
                .ok()
        })
        .sum();
    (logged, skipped)
}

#[test]
fn a_task_flooding_stderr_is_read_at_full_speed_and_logged_within_a_budget() {
    let env = fault_env(&format!("[tasks.flood]\n{}", flood_command(50)));
    let daemon = env.daemon(&[]);
    let before = peak_rss_kib(daemon.pid());
    let started = Instant::now();
    let id = enqueue(&env, "flood", "[]");
    wait_record(&env, "flooded");
    daemon.expect_log(&format!("task {id} flood done"));
    let took = started.elapsed();
    let who = format!("task {id} flood");
    let (logged, skipped) = logged_and_skipped(&daemon.log(), &who);
    assert_eq!(logged + skipped, 500_000, "every line logged or counted");
    // The burst, then 100 a second.
    let budget = 1000 + u64::try_from(took.as_millis().div_ceil(10)).unwrap() + 1;
    assert!(logged <= budget, "{logged} lines logged in {took:?}");
    assert_eq!(
        daemon
            .log_lines(&format!("{who} writes more than 100 lines a second"))
            .len(),
        1
    );
    // The same from a pool process: 20 MB on the worker's stderr, during a task.
    let id = enqueue(&env, "faulttasks.flood", r#"["pool flooded", 20]"#);
    let worker = wait_record(&env, "pool flooded");
    daemon.expect_log(&format!("task {id} faulttasks.flood done"));
    // Its lines are the task's, tagged with the process too: `task 7 faulttasks.flood (pool py
    // pid 42) stderr: …`; the process's budget counts them.
    let who = format!("pool py pid {worker}");
    daemon.expect_log(&format!(
        "task {id} faulttasks.flood ({who}) writes more than 100 lines a second"
    ));
    // The worker lives on, and its count comes with its next line (or its exit).
    enqueue(&env, "faulttasks.record", r#"["after the flood"]"#);
    assert_eq!(wait_record(&env, "after the flood"), worker);
    let after = peak_rss_kib(daemon.pid());
    assert!(
        after < before + 16 * 1024,
        "the daemon's peak RSS went from {before} to {after} KiB over 70 MB of output"
    );
    env.assert_healthy();
    let log = daemon.stop();
    let (in_task, in_task_skipped) = logged_and_skipped(&log, &format!("{who})"));
    let (between, between_skipped) = logged_and_skipped(&log, &who);
    let (logged, skipped) = (in_task + between, in_task_skipped + between_skipped);
    assert_eq!(
        logged + skipped,
        200_000,
        "every pool line logged or counted"
    );
    eprintln!(
        "50 MB flood: {took:?}; peak RSS {before} -> {after} KiB; pool: {logged} logged, {skipped} counted"
    );
}
