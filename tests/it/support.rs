//! Test helpers: `Env` (a temp dir holding a DB and wakeup dir, and the real `foreman` binary run
//! there) and `Daemon` (a running `foreman run` whose log is captured). Waits are polls with a
//! timeout on something observable, never bare sleeps.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::pg::PgDb;

pub const BIN: &str = env!("CARGO_BIN_EXE_foreman");
/// Generous: CI machines are slow and shared; a passing test never waits this long.
pub static PYTHON_CLIENT: std::sync::LazyLock<PathBuf> =
    std::sync::LazyLock::new(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python"));
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A Python that can import `imports`: `FOREMAN_PYTHON`, else /opt/foreman-venv's (made by
/// .ci/python-venv), else `python3`. `None`, after a notice, when it cannot, unless
/// `FOREMAN_PY_TESTS=required` (CI), which makes that a failure.
pub fn python_with(imports: &str) -> Option<String> {
    let venv = "/opt/foreman-venv/bin/python";
    let python = std::env::var("FOREMAN_PYTHON").unwrap_or_else(|_| {
        (if Path::new(venv).exists() {
            venv
        } else {
            "python3"
        })
        .to_owned()
    });
    let probe = Command::new(&python)
        .args(["-c", &format!("import {imports}")])
        .stdin(Stdio::null())
        .output();
    let missing = match &probe {
        Ok(out) if out.status.success() => return Some(python),
        Ok(out) => stderr(out).trim().lines().last().unwrap_or("").to_owned(),
        Err(err) => err.to_string(),
    };
    let notice = format!(
        "{python} cannot import {imports} ({missing}); make a virtualenv with .ci/python-venv \
         and set FOREMAN_PYTHON to its python"
    );
    assert!(
        std::env::var("FOREMAN_PY_TESTS").as_deref() != Ok("required"),
        "{notice} (FOREMAN_PY_TESTS=required)"
    );
    eprintln!("notice: skipped: {notice}");
    None
}

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
    /// Set when the env's database is a PostgreSQL one (of the test binary's throwaway cluster)
    /// instead of the SQLite file `db`.
    pub pg: Option<PgDb>,
}

/// Declares a test that runs on both backends: `NAME::sqlite` and `NAME::postgres` (which skips,
/// with a notice, where the machine has no PostgreSQL server binaries). The body takes the `Env`.
#[macro_export]
macro_rules! on_both {
    ($(#[$meta:meta])* fn $name:ident($env:ident: Env) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn run($env: $crate::support::Env) $body

            #[test]
            fn sqlite() {
                run($crate::support::Env::new());
            }

            #[test]
            fn postgres() {
                if let Some(env) = $crate::support::Env::pg() {
                    run(env);
                }
            }
        }
    };
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("q.sqlite3");
        let wakeup = dir.path().join("q.sqlite3.wakeup");
        Env {
            dir,
            db,
            wakeup,
            pg: None,
        }
    }

    /// An env on a fresh database of the test binary's PostgreSQL cluster; `None` (the test skips,
    /// with a notice) on a machine without PostgreSQL's server binaries.
    pub fn pg() -> Option<Env> {
        let db = crate::pg::cluster()?.database();
        let mut env = Env::new();
        env.pg = Some(db);
        Some(env)
    }

    /// An env on PostgreSQL database `db` of a server the test started itself.
    pub fn with_pg(db: PgDb) -> Env {
        let mut env = Env::new();
        env.pg = Some(db);
        env
    }

    pub fn is_pg(&self) -> bool {
        self.pg.is_some()
    }

    /// What `--db` is given: the SQLite file or the PostgreSQL URL.
    pub fn db_arg(&self) -> std::ffi::OsString {
        match &self.pg {
            Some(pg) => pg.url().into(),
            None => self.db.clone().into_os_string(),
        }
    }

    /// A connection to the PostgreSQL database (the env must be one).
    pub fn pg_sql(&self) -> postgres::Client {
        self.pg.as_ref().expect("a PostgreSQL env").connect()
    }

    /// The rows `sql` answers, every value as text (`None` for NULL), on either backend (SQL both
    /// understand; `Env::epoch` for a time column).
    pub fn rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        if let Some(pg) = &self.pg {
            return pg
                .connect()
                .simple_query(sql)
                .expect(sql)
                .into_iter()
                .filter_map(|message| match message {
                    postgres::SimpleQueryMessage::Row(row) => Some(
                        (0..row.len())
                            .map(|i| row.get(i).map(str::to_owned))
                            .collect(),
                    ),
                    _ => None,
                })
                .collect();
        }
        let conn = self.sql();
        let mut statement = conn.prepare(sql).expect(sql);
        let columns = statement.column_count();
        statement
            .query_map([], |r| {
                Ok((0..columns)
                    .map(|i| match r.get_ref(i).unwrap() {
                        rusqlite::types::ValueRef::Null => None,
                        rusqlite::types::ValueRef::Integer(n) => Some(n.to_string()),
                        rusqlite::types::ValueRef::Real(f) => Some(f.to_string()),
                        rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                            Some(String::from_utf8_lossy(t).into_owned())
                        }
                    })
                    .collect())
            })
            .expect(sql)
            .collect::<Result<_, _>>()
            .expect(sql)
    }

    /// A time column as Unix seconds, in this env's SQL (`timestamptz` on PostgreSQL).
    pub fn epoch(&self, column: &str) -> String {
        if self.is_pg() {
            format!("extract(epoch FROM {column})::float8")
        } else {
            column.to_owned()
        }
    }

    /// The one number `sql` answers, on either backend (SQL both understand).
    pub fn number(&self, sql: &str) -> i64 {
        match &self.pg {
            Some(pg) => pg.connect().query_one(sql, &[]).expect(sql).get(0),
            None => self.sql().query_row(sql, [], |r| r.get(0)).expect(sql),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The real binary, run in the temp dir with `--db` set and no `FOREMAN_*` or `RUST_LOG` from
    /// the caller's environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.command_without_db(&[]);
        cmd.arg("--db").arg(self.db_arg()).args(args);
        cmd
    }

    /// `command` without `--db`: the database is what the config file or the defaults say.
    pub fn command_without_db(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.current_dir(self.dir.path()).args(args);
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
        Daemon::spawn(self.command(&daemon_args(args)))
    }

    /// Starts `foreman run ARGS` without waiting for it to be ready (a test may kill it during its
    /// startup); `setup` may add to its command, e.g. environment variables.
    pub fn spawn_daemon(&self, args: &[&str], setup: impl FnOnce(&mut Command)) -> Daemon {
        let mut cmd = self.command(&[]);
        cmd.arg("run").args(args);
        setup(&mut cmd);
        Daemon::start(cmd)
    }

    /// `foreman health`, which must say healthy.
    pub fn assert_healthy(&self) {
        let out = self.run(&["health"]);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.starts_with("healthy"),
            "foreman health: {said}{}",
            stderr(&out)
        );
    }

    /// A connection to the SQLite file (the env must be a SQLite one).
    pub fn sql(&self) -> rusqlite::Connection {
        assert!(self.pg.is_none(), "Env::sql on a PostgreSQL env");
        let conn = rusqlite::Connection::open(&self.db).expect("open db");
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn
    }

    /// Inserts a row the way a producer does, without waking the daemon.
    pub fn insert(&self, name: &str, args: &str) -> i64 {
        if let Some(pg) = &self.pg {
            return pg
                .connect()
                .query_one(
                    "INSERT INTO foreman_task(task_name, args) VALUES ($1, $2::text::jsonb) RETURNING id",
                    &[&name, &args],
                )
                .expect("insert")
                .get(0);
        }
        self.sql()
            .query_row(
                "INSERT INTO foreman_task(task_name, args) VALUES (?1, ?2) RETURNING id",
                [name, args],
                |r| r.get(0),
            )
            .expect("insert")
    }

    /// Inserts `count` rows of `name` in one statement; returns their ids (consecutive).
    pub fn insert_many(&self, name: &str, count: i64) -> std::ops::RangeInclusive<i64> {
        let (first, last): (i64, i64) = if let Some(pg) = &self.pg {
            let row = pg
                .connect()
                .query_one(
                    "WITH i AS (INSERT INTO foreman_task(task_name) \
                     SELECT $1 FROM generate_series(1, $2::int8) RETURNING id) \
                     SELECT min(id), max(id) FROM i",
                    &[&name, &count],
                )
                .expect("insert");
            (row.get(0), row.get(1))
        } else {
            let conn = self.sql();
            conn.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2) \
                 INSERT INTO foreman_task(task_name) SELECT ?1 FROM n",
                rusqlite::params![name, count],
            )
            .expect("insert");
            let last = conn.last_insert_rowid();
            (last - count + 1, last)
        };
        assert_eq!(last - first + 1, count, "ids not consecutive");
        first..=last
    }

    /// What a producer does after its commit: a file in the wakeup dir, or `NOTIFY foreman`.
    pub fn touch_wakeup(&self, name: &str) {
        if let Some(pg) = &self.pg {
            pg.connect()
                .batch_execute("NOTIFY foreman")
                .expect("notify");
            return;
        }
        std::fs::write(self.wakeup.join(name), b"").expect("touch wakeup");
    }

    /// The reason task `id` was moved to `foreman_dead` with, if it is there.
    pub fn dead_reason(&self, id: i64) -> Option<String> {
        if let Some(pg) = &self.pg {
            return pg
                .connect()
                .query_opt("SELECT reason FROM foreman_dead WHERE task_id = $1", &[&id])
                .expect("dead reason")
                .map(|r| r.get(0));
        }
        self.sql()
            .query_row(
                "SELECT reason FROM foreman_dead WHERE task_id = ?1",
                [id],
                |r| r.get(0),
            )
            .ok()
    }

    pub fn queued(&self) -> i64 {
        self.number("SELECT count(*) FROM foreman_task")
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

/// `foreman run`'s arguments for a test daemon: debug logs, then `args`.
pub fn daemon_args<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut full = vec!["run", "--log-level", "debug"];
    full.extend_from_slice(args);
    full
}

impl Daemon {
    /// Starts `cmd` (a `foreman run`), capturing its log, and waits until it runs.
    pub fn spawn(cmd: Command) -> Daemon {
        let daemon = Daemon::start(cmd);
        daemon.expect_log("foreman running");
        daemon
    }

    /// `spawn` without waiting for the daemon to say it runs.
    pub fn start(mut cmd: Command) -> Daemon {
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

/// Mode bits do not stop root, so tests that need them run foreman as `nobody` when they run as
/// root.
pub const NOBODY: u32 = 65534;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// An `Env` whose database and wakeup dir live in `data/`, owned by the user foreman runs as:
/// ourselves, or another user (`nobody` by default) when we are root.
pub struct Unprivileged {
    pub env: Env,
    pub data: PathBuf,
    pub uid: u32,
    bin: PathBuf,
}

impl Unprivileged {
    pub fn new() -> Unprivileged {
        Unprivileged::as_uid(NOBODY)
    }

    /// Runs foreman as `uid` when we are root (a user of its own keeps a test's per-user kernel
    /// limits away from the other tests').
    pub fn as_uid(uid: u32) -> Unprivileged {
        let mut env = Env::new();
        let data = env.path("data");
        std::fs::create_dir(&data).unwrap();
        env.db = data.join("q.sqlite3");
        env.wakeup = data.join("q.sqlite3.wakeup");
        let (uid, bin) = if is_root() {
            // The user must be able to enter the temp dir (0700 from tempfile) and run the binary.
            chmod(env.dir.path(), 0o755);
            std::os::unix::fs::chown(&data, Some(uid), Some(uid)).unwrap();
            (uid, runnable_by(&env, uid))
        } else {
            // SAFETY: as in is_root.
            (unsafe { libc::geteuid() }, PathBuf::from(BIN))
        };
        Unprivileged {
            env,
            data,
            uid,
            bin,
        }
    }

    /// `Env::command`, as the unprivileged user.
    pub fn command(&self, args: &[&str]) -> Command {
        let template = self.env.command(args);
        let mut cmd = Command::new(&self.bin);
        cmd.args(template.get_args());
        if let Some(dir) = template.get_current_dir() {
            cmd.current_dir(dir);
        }
        for (key, value) in template.get_envs() {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        if is_root() {
            cmd.uid(self.uid).gid(self.uid);
        }
        cmd
    }

    /// `Env::daemon`, as the unprivileged user.
    pub fn daemon(&self, args: &[&str]) -> Daemon {
        Daemon::spawn(self.command(&daemon_args(args)))
    }

    /// Runs the command as the unprivileged user and expects it to fail with exit code 1 and one
    /// error line: `message`.
    pub fn expect_refusal(&self, args: &[&str], message: &str) {
        let (code, err) = finish(self.command(args), &self.env);
        let errors: Vec<&str> = err.lines().filter(|l| l.contains(" ERROR] ")).collect();
        assert_eq!(code, Some(1), "foreman {args:?}: {err}");
        assert_eq!(errors.len(), 1, "foreman {args:?}: {err}");
        let line = errors[0].split_once(" ERROR] ").unwrap().1;
        assert_eq!(line, message, "foreman {args:?}");
    }

    /// `foreman init`, as the unprivileged user.
    pub fn init(&self) {
        let (code, err) = finish(self.command(&["init"]), &self.env);
        assert_eq!(code, Some(0), "{err}");
    }

    /// The fix every permission refusal proposes for `path`.
    pub fn give_access(&self, path: &Path) -> String {
        format!(
            "give uid {} write access to {} (chown or chmod; in Kubernetes, securityContext.fsGroup)",
            self.uid,
            path.display()
        )
    }
}

/// The binary, or a copy in the temp dir when `uid` cannot reach the build's target dir.
fn runnable_by(env: &Env, uid: u32) -> PathBuf {
    let runs = Command::new(BIN)
        .arg("--version")
        .uid(uid)
        .gid(uid)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if runs {
        return PathBuf::from(BIN);
    }
    let copy = env.path("foreman");
    std::fs::copy(BIN, &copy).unwrap();
    chmod(&copy, 0o755);
    copy
}

/// Waits for `cmd` to exit (killing it after `PATIENCE`: a daemon that should have refused to start
/// would run forever); returns its exit code and stderr.
pub fn finish(mut cmd: Command, env: &Env) -> (Option<i32>, String) {
    let err_path = env.path("stderr.txt");
    let err_file = std::fs::File::create(&err_path).unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err_file)
        .spawn()
        .expect("spawn foreman");
    wait_child(child, &err_path)
}

/// Waits for `child` to exit (killing it after PATIENCE); returns its exit code and the stderr
/// it wrote to `err_path`.
pub fn wait_child(mut child: std::process::Child, err_path: &Path) -> (Option<i32>, String) {
    let mut status = None;
    let exited = wait_until(PATIENCE, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    let err = std::fs::read_to_string(err_path).unwrap();
    assert!(exited, "still running after {PATIENCE:?}; stderr:\n{err}");
    (status.and_then(|s| s.code()), err)
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

/// The (tag, pid) lines that Python pool tasks appended to `ran.txt`.
pub fn records(env: &Env) -> Vec<(String, i32)> {
    std::fs::read_to_string(env.path("ran.txt"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (tag, pid) = l.rsplit_once(' ')?;
            Some((tag.to_owned(), pid.parse().ok()?))
        })
        .collect()
}

/// Waits for the task tagged `tag` to record its start; returns the pid of the process that ran it.
pub fn wait_record(env: &Env, tag: &str) -> i32 {
    let mut pid = None;
    let found = wait_until(PATIENCE, || {
        pid = records(env).into_iter().find(|r| r.0 == tag).map(|r| r.1);
        pid.is_some()
    });
    assert!(found, "task {tag} never ran; records: {:?}", records(env));
    pid.unwrap()
}
