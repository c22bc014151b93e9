//! The bench's files and processes: the `Workspace` (a temporary directory removed on drop), one
//! `Run` per daemon start (a fresh database, wakeup dir, config and record file; on PostgreSQL a
//! fresh schema in the given database, dropped afterwards), and the `Daemon` child (`foreman run`
//! from this very executable), which is killed on every way out, and whose CPU time and peak RSS
//! are read from `/proc`. It measures nothing itself.

use std::io::{BufRead as _, Read as _, Seek as _};
use std::ops::RangeInclusive;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{Failure, Outcome, python};
use crate::database::Database;
use crate::error::{Error, Result};
use crate::store::{Access, Producer, RecordedAttempts, Store};
use crate::wake::dir::WakeupDir;

/// Longer than the generated config's `graceful_timeout` (5 s): a daemon still there after this
/// did not stop on SIGTERM, which fails the scenario.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines of the daemon's log quoted when something went wrong.
const LOG_TAIL_LINES: usize = 15;

/// The bench's temporary directory: the Python modules, and a subdirectory per daemon run.
pub(crate) struct Workspace {
    root: PathBuf,
    /// `--db`: every run's database goes there instead (removed between runs).
    db: Option<PathBuf>,
    wakeup_dir: Option<PathBuf>,
    /// `--db postgresql://…`: every run gets a schema of its own in that database (the URL's
    /// `search_path` set to it), dropped after the run.
    postgres: Option<String>,
    runs: std::cell::Cell<usize>,
}

impl Workspace {
    /// Creates a new directory under the system's temp dir (`$TMPDIR`, else /tmp) and writes the
    /// Python modules there. A `--db` or `--wakeup-dir` that exists is refused: the bench deletes
    /// its databases between runs, and must never delete a real queue.
    pub fn create(db: Option<Database>, wakeup_dir: Option<PathBuf>) -> Result<Workspace> {
        let (db, postgres) = match db {
            Some(Database::Postgres(url)) => {
                // Reached now, so that a wrong URL fails before the machine is measured.
                Producer::open(&Database::Postgres(url.clone()))?;
                (None, Some(url))
            }
            Some(Database::Sqlite(path)) => (Some(path), None),
            None => (None, None),
        };
        for (path, what) in [
            (&db, "--db (or FOREMAN_DB)"),
            (&wakeup_dir, "--wakeup-dir (or FOREMAN_WAKEUP_DIR)"),
        ] {
            if let Some(path) = path
                && path.symlink_metadata().is_ok()
            {
                return Err(Error::Config(format!(
                    "foreman bench: {what} {} exists; the bench creates and deletes its own \
                     databases there, so name a path that does not exist yet",
                    path.display()
                )));
            }
        }
        let root = unique_dir()?;
        let work = Workspace {
            root,
            db,
            wakeup_dir,
            postgres,
            runs: std::cell::Cell::new(0),
        };
        python::write_modules(&work.root)?;
        Ok(work)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The PostgreSQL database the runs use, if `--db` named one.
    pub fn postgres(&self) -> Option<&str> {
        self.postgres.as_deref()
    }

    /// A fresh run: its directory, a database with the schema, the wakeup dir and `config`.
    pub fn run(&self, config: &str) -> Outcome<Run> {
        let n = self.runs.get() + 1;
        self.runs.set(n);
        let dir = self.root.join(format!("run-{n}"));
        std::fs::create_dir(&dir)
            .map_err(|e| Failure::new(format!("cannot create {}: {e}", dir.display())))?;
        let config_path = dir.join("foreman.toml");
        std::fs::write(&config_path, config)
            .map_err(|e| Failure::new(format!("cannot write {}: {e}", config_path.display())))?;
        if let Some(base) = &self.postgres {
            let schema = format!("foreman_bench_{}_{n}", std::process::id());
            let mut run = Run {
                pid_file: dir.join("q.pid"),
                out: dir.join("started.txt"),
                log: dir.join("daemon.log"),
                config: config_path,
                dir,
                db: Database::Postgres(with_search_path(base, &schema)),
                wakeup: None,
                schema: Some((base.clone(), schema.clone())),
                conn: None,
                last_notify: std::cell::Cell::new(None),
            };
            Producer::open(&Database::Postgres(base.clone()))?.create_schema(&schema)?;
            Store::open(&run.db, Access::Create)?.ensure_schema()?;
            run.conn = Some(Producer::open(&run.db)?);
            return Ok(run);
        }
        let db = self.db.clone().unwrap_or_else(|| dir.join("q.sqlite3"));
        let wakeup = self
            .wakeup_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.wakeup", db.display())));
        // The run owns these from here on: its drop removes them, even if what follows fails.
        let mut run = Run {
            pid_file: dir.join("q.pid"),
            out: dir.join("started.txt"),
            log: dir.join("daemon.log"),
            config: config_path,
            dir,
            db: Database::Sqlite(db),
            wakeup: Some(wakeup.clone()),
            schema: None,
            conn: None,
            last_notify: std::cell::Cell::new(None),
        };
        Store::open(&run.db, Access::Create)?.ensure_schema()?;
        WakeupDir::prepare(&wakeup)?;
        run.conn = Some(Producer::open(&run.db)?);
        Ok(run)
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        // Nothing to report to: a leftover directory in /tmp is the worst outcome.
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// `$TMPDIR/foreman-bench-<pid>-<n>`, mode 0700, created here (never an existing one).
fn unique_dir() -> Result<PathBuf> {
    let base = std::env::temp_dir();
    let pid = std::process::id();
    let mut attempt = 0;
    loop {
        let path = base.join(format!("foreman-bench-{pid}-{attempt}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1;
            }
            Err(e) => {
                return Err(Error::io(
                    format!("cannot create a directory in {}", base.display()),
                    e,
                ));
            }
        }
    }
}

/// A config for the daemon child: `workers` threads, `prefetch`, then `extra` (pools, tasks).
pub(crate) fn config(workers: usize, prefetch: usize, extra: &str) -> String {
    format!("workers = {workers}\nprefetch = {prefetch}\ngraceful_timeout = \"5s\"\n{extra}")
}

/// `url` with its `search_path` set to `schema` (in the startup packet's `options`).
pub(crate) fn with_search_path(url: &str, schema: &str) -> String {
    let setting = format!("-c%20search_path%3D{schema}");
    if let Some(at) = url.find("options=") {
        let end = url[at..].find('&').map_or(url.len(), |e| at + e);
        return format!("{}%20{setting}{}", &url[..end], &url[end..]);
    }
    let joiner = if url.contains('?') { '&' } else { '?' };
    format!("{url}{joiner}options={setting}")
}

/// A producer sends at most one `NOTIFY foreman` per this long (schema-postgres.sql).
const NOTIFY_EVERY: Duration = Duration::from_millis(100);

/// One daemon start's files and the producer's connection to its database.
pub(crate) struct Run {
    pub dir: PathBuf,
    pub db: Database,
    /// The wakeup dir (SQLite).
    pub wakeup: Option<PathBuf>,
    /// (the database's URL, the run's schema in it) on PostgreSQL: dropped with the run.
    schema: Option<(String, String)>,
    /// When the producer last sent `NOTIFY foreman`.
    last_notify: std::cell::Cell<Option<Instant>>,
    pub pid_file: PathBuf,
    /// `FOREMAN_BENCH_OUT`: where tasks record their start.
    pub out: PathBuf,
    config: PathBuf,
    log: PathBuf,
    conn: Option<Producer>,
}

impl Drop for Run {
    fn drop(&mut self) {
        self.conn = None;
        // The database and wakeup dir may be outside `dir` (--db); the pid file never is.
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some((base, schema)) = &self.schema {
            let dropped = Producer::open(&Database::Postgres(base.clone()))
                .and_then(|p| p.drop_schema(schema));
            if let Err(e) = dropped {
                eprintln!("foreman bench: could not drop schema {schema}: {e}");
            }
        }
        if let Database::Sqlite(db) = &self.db {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
            }
        }
        if let Some(wakeup) = &self.wakeup {
            let _ = std::fs::remove_dir_all(wakeup);
        }
    }
}

impl Run {
    /// The producer's connection to the run's database.
    pub fn conn(&self) -> Outcome<&Producer> {
        self.conn
            .as_ref()
            .ok_or_else(|| Failure::new("the producer connection is closed"))
    }

    /// Starts `foreman run` (this executable) on the run's files, its log in the run's dir.
    pub fn spawn(&self, work: &Workspace) -> Outcome<Daemon> {
        Daemon::spawn(self, work)
    }

    /// Inserts `count` rows of `name` in one transaction; with `keys_from`, row i gets
    /// `args = [keys_from + i]`. Returns the ids. Does not wake the daemon.
    pub fn insert_many(
        &mut self,
        name: &str,
        count: usize,
        keys_from: Option<i64>,
    ) -> Outcome<RangeInclusive<i64>> {
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| Failure::new("the producer connection is closed"))?;
        Ok(conn.insert_many(name, count, keys_from)?)
    }

    /// Inserts one row, autocommit; returns its id. Does not wake the daemon.
    pub fn insert_one(&self, name: &str, args: &str) -> Outcome<i64> {
        Ok(self.conn()?.insert_one(name, args)?)
    }

    /// Rows still queued among `ids`.
    pub fn queued(&self, ids: &RangeInclusive<i64>) -> Outcome<usize> {
        Ok(self.conn()?.queued(ids)?)
    }

    /// What the daemon recorded of the attempts of `ids`.
    pub fn attempts(&self, ids: &RangeInclusive<i64>) -> Outcome<RecordedAttempts> {
        Ok(self.conn()?.attempts(ids)?)
    }

    /// The producer's wakeup after a batch: create a file in the wakeup dir if it is not there
    /// (schema.sql), or `NOTIFY foreman` (schema-postgres.sql).
    pub fn wake(&self) -> Outcome<()> {
        if self.wakeup.is_some() {
            return self.wake_as("bench");
        }
        self.wake_now()
    }

    /// The wakeup of producer `name`: its own file in the wakeup dir, or (PostgreSQL) a
    /// `NOTIFY foreman`, at most one per 100 ms as the producer protocol asks. `wake_now` sends
    /// the one a burst may still owe.
    pub fn wake_as(&self, name: &str) -> Outcome<()> {
        if let Some(dir) = &self.wakeup {
            return touch_if_absent(&dir.join(name));
        }
        let due = self
            .last_notify
            .get()
            .is_none_or(|at| at.elapsed() >= NOTIFY_EVERY);
        if due {
            self.wake_now()?;
        }
        Ok(())
    }

    /// `NOTIFY foreman` now (PostgreSQL).
    pub fn wake_now(&self) -> Outcome<()> {
        if self.wakeup.is_none() {
            self.conn()?.notify()?;
            self.last_notify.set(Some(Instant::now()));
        }
        Ok(())
    }

    /// Whether the run is on PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        self.schema.is_some()
    }
}

/// Creates `path` unless it exists: one `stat` in the common case, as the Python client does.
pub(crate) fn touch_if_absent(path: &Path) -> Outcome<()> {
    if path.symlink_metadata().is_ok() {
        return Ok(());
    }
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map(drop)
        .map_err(|e| Failure::new(format!("cannot create wakeup file {}: {e}", path.display())))
}

/// A `foreman run` child. Dropping it kills it (SIGKILL) unless `stop` already ended it.
pub(crate) struct Daemon {
    child: Child,
    pid: u32,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Daemon {
    fn spawn(run: &Run, work: &Workspace) -> Outcome<Daemon> {
        let exe = std::env::current_exe()
            .map_err(|e| Failure::new(format!("cannot find this executable: {e}")))?;
        let exe = exe.to_str().ok_or_else(|| {
            Failure::new(format!("executable path {} is not UTF-8", exe.display()))
        })?;
        // The daemon's own way of starting children: its own process group, so that a Ctrl-C at
        // the terminal reaches the bench alone (which then kills it), and SIGKILL when the bench
        // dies, even by `kill -9`.
        let mut command = crate::command::piped_command(&[exe.to_owned()]).map_err(Failure::new)?;
        let log = std::fs::File::create(&run.log)
            .map_err(|e| Failure::new(format!("cannot create {}: {e}", run.log.display())))?;
        let log_too = log
            .try_clone()
            .map_err(|e| Failure::new(format!("{}: {e}", run.log.display())))?;
        command
            .arg("--config")
            .arg(&run.config)
            .arg("--db")
            .arg(run.db.as_os_str());
        if let Some(wakeup) = &run.wakeup {
            command
                .arg("--wakeup-dir")
                .arg(wakeup)
                .arg("--pid-file")
                .arg(&run.pid_file);
        }
        command
            .args(["--log-level", "warn", "run"])
            .current_dir(work.root())
            .stdin(Stdio::null())
            .stdout(log_too)
            .stderr(log);
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy();
            // The caller's settings would change what is measured (FOREMAN_WORKERS…), its Sentry
            // would get the bench's reports, its journal our log lines.
            if name.starts_with("FOREMAN_")
                || name.starts_with("SENTRY_")
                || ["RUST_LOG", "JOURNAL_STREAM", "PYTHONPATH"].contains(&name.as_ref())
            {
                command.env_remove(&key);
            }
        }
        command
            .env(crate::registry::BENCH_OUT_ENV, &run.out)
            .env("PYTHONPATH", work.root());
        let child = command
            .spawn()
            .map_err(|e| Failure::new(format!("cannot start {exe} run: {e}")))?;
        Ok(Daemon {
            pid: child.id(),
            child,
            log: run.log.clone(),
            exited: None,
        })
    }

    /// CPU time of every live thread, in ns: the first field of each `/proc/PID/task/*/schedstat`
    /// (the scheduler's own clock, unlike utime's 10 ms ticks).
    pub fn cpu_ns(&self) -> Outcome<u64> {
        let dir = format!("/proc/{}/task", self.pid);
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| self.failure(&format!("cannot read {dir}: {e}")))?;
        let mut total = 0;
        for entry in entries.flatten() {
            // A thread that ended since read_dir has no file any more: its time is gone with it.
            let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
                continue;
            };
            total += text
                .split_whitespace()
                .next()
                .and_then(|ns| ns.parse::<u64>().ok())
                .ok_or_else(|| Failure::new(format!("{dir}/*/schedstat: unexpected {text:?}")))?;
        }
        Ok(total)
    }

    /// Peak resident set size in KiB (`VmHWM` of `/proc/PID/status`).
    pub fn peak_rss_kib(&self) -> Outcome<u64> {
        let path = format!("/proc/{}/status", self.pid);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| self.failure(&format!("cannot read {path}: {e}")))?;
        text.lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| Failure::new(format!("{path} has no VmHWM line")))
    }

    /// Fails if the daemon has exited (it should run until `stop`).
    pub fn check_alive(&mut self) -> Outcome<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                self.exited = Some(status);
                Err(self.failure(&format!("the daemon {}", crate::command::describe(status))))
            }
            Err(e) => Err(self.failure(&format!("cannot wait for the daemon: {e}"))),
        }
    }

    /// SIGTERM, then waits for a clean exit (status 0): the daemon records every ended attempt
    /// before it exits, so the database is complete afterwards.
    pub fn stop(mut self) -> Outcome<()> {
        if let Some(status) = self.exited {
            return Err(self.failure(&format!(
                "the daemon {} before it was stopped",
                crate::command::describe(status)
            )));
        }
        if let Ok(pid) = libc::pid_t::try_from(self.pid) {
            // SAFETY: kill with a pid we spawned and have not reaped (`exited` is None).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.exited = Some(status);
                    if status.success() {
                        return Ok(());
                    }
                    return Err(self.failure(&format!(
                        "the daemon {} after SIGTERM",
                        crate::command::describe(status)
                    )));
                }
                Ok(None) if start.elapsed() < STOP_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None) => {
                    return Err(self.failure(&format!(
                        "the daemon did not exit within {STOP_TIMEOUT:?} of SIGTERM"
                    )));
                }
                Err(e) => return Err(self.failure(&format!("cannot wait for the daemon: {e}"))),
            }
        }
    }

    /// `message` and the end of the daemon's log.
    pub fn failure(&self, message: &str) -> Failure {
        Failure::new(format!("{message}{}", log_tail(&self.log)))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited.is_none() {
            // Errors: it is gone already, or cannot be signalled; either way nothing to do.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The last lines of the daemon's log, indented, or nothing when it is empty.
fn log_tail(path: &Path) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    // The tail is in the last few KiB; a log of warnings about 20,000 tasks can be large.
    let len = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(std::io::SeekFrom::Start(len.saturating_sub(8192)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let lines: Vec<String> = bytes.lines().map_while(std::result::Result::ok).collect();
    let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    if tail.is_empty() {
        return String::new();
    }
    // Not the path: the run's directory is removed with the run.
    format!("; the daemon's log ends with:\n    {}", tail.join("\n    "))
}
