//! Test helpers: `Env` (a temp dir holding a DB and wakeup dir, and the real `foreman` binary run
//! there) and `Daemon` (a running `foreman run` whose log is captured). Waits are polls with a
//! timeout on something observable, never bare sleeps.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_foreman");
/// Generous: CI machines are slow and shared; a passing test never waits this long.
pub static PYTHON_CLIENT: std::sync::LazyLock<PathBuf> =
    std::sync::LazyLock::new(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python"));
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `check` every few milliseconds until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if check() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub wakeup: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("q.sqlite3");
        let wakeup = dir.path().join("q.sqlite3.wakeup");
        Env { dir, db, wakeup }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The real binary, run in the temp dir with `--db` set and no `FOREMAN_*` or `RUST_LOG` from
    /// the caller's environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.current_dir(self.dir.path())
            .arg("--db")
            .arg(&self.db)
            .args(args);
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy();
            // SENTRY_*: no test reports to the caller's Sentry; proxies would take the stand-in
            // Sentry's requests to 127.0.0.1 elsewhere.
            if name.starts_with("FOREMAN_")
                || name.starts_with("SENTRY_")
                || name.to_ascii_lowercase().ends_with("_proxy")
                || key == "RUST_LOG"
                || key == "JOURNAL_STREAM"
            {
                cmd.env_remove(key);
            }
        }
        cmd.env("RECORD_FILE", self.path("ran.txt"));
        // Pool workers inherit this: the Python client and worker, and task modules in the temp dir.
        cmd.env(
            "PYTHONPATH",
            format!("{}:{}", PYTHON_CLIENT.display(), self.dir.path().display()),
        );
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run foreman")
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "foreman {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn init(&self) {
        self.ok(&["init"]);
    }

    /// Writes `foreman.toml` in the temp dir (found there by default) with the given text.
    pub fn config(&self, text: &str) -> PathBuf {
        let path = self.path("foreman.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// A config with a `record` task that appends its id to ran.txt, plus `extra`.
    pub fn record_config(&self, extra: &str) {
        self.config(&format!("{RECORD_TASK}\n{extra}"));
    }

    pub fn daemon(&self, args: &[&str]) -> Daemon {
        let mut full = vec!["--log-level", "debug"];
        full.extend_from_slice(args);
        let daemon = self.spawn_daemon(&full, |_| {});
        daemon.expect_log("foreman running");
        daemon
    }

    /// Starts `foreman run ARGS` without waiting for it to be ready (a test may kill it during its
    /// startup); `setup` may add to its command, e.g. environment variables.
    pub fn spawn_daemon(&self, args: &[&str], setup: impl FnOnce(&mut Command)) -> Daemon {
        let mut cmd = self.command(&[]);
        cmd.arg("run").args(args);
        setup(&mut cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn daemon");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Daemon {
            child,
            log,
            exit: None,
        }
    }

    pub fn sql(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(&self.db).expect("open db");
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn
    }

    /// Inserts a row the way a producer does, without touching the wakeup dir.
    pub fn insert(&self, name: &str, args: &str) -> i64 {
        self.sql()
            .query_row(
                "INSERT INTO foreman_task(task_name, args) VALUES (?1, ?2) RETURNING id",
                [name, args],
                |r| r.get(0),
            )
            .expect("insert")
    }

    pub fn touch_wakeup(&self, name: &str) {
        std::fs::write(self.wakeup.join(name), b"").expect("touch wakeup");
    }

    pub fn queued(&self) -> i64 {
        self.sql()
            .query_row("SELECT count(*) FROM foreman_task", [], |r| r.get(0))
            .unwrap()
    }

    /// The ids the `record` task has written, in the order they ran.
    pub fn ran(&self) -> Vec<i64> {
        std::fs::read_to_string(self.path("ran.txt"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().parse().expect("id line"))
            .collect()
    }

    pub fn wait_ran(&self, count: usize) -> Vec<i64> {
        let ok = wait_until(PATIENCE, || self.ran().len() >= count);
        let ran = self.ran();
        assert!(ok, "only {} of {count} tasks ran", ran.len());
        ran
    }
}

pub const RECORD_TASK: &str = r#"
[tasks.record]
command = ["sh", "-c", "echo \"$FOREMAN_TASK_ID\" >> \"$RECORD_FILE\""]
"#;

pub struct Daemon {
    pub child: Child,
    log: Arc<Mutex<Vec<String>>>,
    exit: Option<ExitStatus>,
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Every line containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains(needle))
            .cloned()
            .collect()
    }

    pub fn has_log(&self, needle: &str) -> bool {
        self.log
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.contains(needle))
    }

    pub fn expect_log(&self, needle: &str) {
        assert!(
            wait_until(PATIENCE, || self.has_log(needle)),
            "no log line with {needle:?}; log:\n{}",
            self.log()
        );
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2).
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }

    /// Waits for the daemon to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        let status = status.unwrap_or_else(|| {
            panic!(
                "daemon still running after {timeout:?}; log:\n{}",
                self.log()
            )
        });
        self.exit = Some(status);
        // Let the log reader catch the last lines.
        wait_until(Duration::from_secs(2), || Arc::strong_count(&self.log) == 1);
        status
    }

    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        self.wait_exit(PATIENCE);
    }

    /// SIGTERM, then expect a clean exit 0.
    pub fn stop(mut self) -> String {
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(PATIENCE);
        assert!(
            status.success(),
            "daemon exited with {status}; log:\n{}",
            self.log()
        );
        self.log()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether a process is gone or a zombie (dead, waiting for a reaper that may never come in a
/// container whose init does not reap).
pub fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A connection that leaves the `-wal` as it finds it: it does not checkpoint (and delete the
/// `-wal`) when it closes as the last one. After a `kill -9`, the next daemon then starts on the
/// `-wal` its predecessor left, as after a real crash.
pub fn inspect(db: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(db).expect("open db");
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )
    .expect("no checkpoint on close");
    conn
}

/// `PRAGMA integrity_check` of the database, on an `inspect` connection.
pub fn integrity_check(db: &Path) -> String {
    inspect(db)
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check")
}

/// Live processes (not zombies) whose environment holds `entry` (`NAME=value`): how a test finds
/// what a daemon started, whoever their parent is now.
pub fn processes_with_env(entry: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
                environ
                    .split(|b| *b == 0)
                    .any(|var| var == entry.as_bytes())
            }) && !is_dead(*pid)
        })
        .collect()
}

/// A process's resident set size in KiB (`VmRSS`), if it is still there.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// How many file descriptors a process has open, if it is still there.
pub fn open_fds(pid: i32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}
