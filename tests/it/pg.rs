//! `PgCluster`: a throwaway PostgreSQL server for the tests that need one, started once per test
//! binary in a private temp dir, with a fresh database per test, and gone when the binary exits:
//! an exit hook stops it and removes its files, and a server whose test binary was killed gets
//! SIGQUIT from the kernel (so no postgres process outlives the tests). Without PostgreSQL's
//! server binaries the tests skip with a notice, unless `FOREMAN_PG_TESTS=required` (CI sets it),
//! which makes that a failure.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use postgres::error::SqlState;
use postgres::{Client, NoTls};

use crate::support::{PATIENCE, is_root, wait_until};

/// The PostgreSQL producer contract, as `foreman init` will apply it.
const SCHEMA: &str = include_str!("../../schema-postgres.sql");
/// The cluster's superuser, as the URLs name it.
const USER: &str = "foreman";
/// Where temp dirs of clusters start their names, so that a later run can find a killed run's.
const DIR_PREFIX: &str = "foreman-pg-";

/// The cluster of this test binary, once one was asked for.
static CLUSTER: OnceLock<Result<PgCluster, Unavailable>> = OnceLock::new();
/// Set once the server process has exited (reaped by the thread that started it).
static SERVER_EXITED: AtomicBool = AtomicBool::new(false);

pub struct PgCluster {
    /// Holds `data/` (the cluster), `sock/` (its socket), its log and the lock below.
    root: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    /// The superuser's password, needed over TCP only (the socket trusts its local users).
    password: String,
    postmaster: libc::pid_t,
    /// Creates the per-test databases.
    admin: Mutex<Client>,
    next_db: AtomicUsize,
    /// flock'ed while this process lives: a later run removes a temp dir whose lock is free.
    _lock: File,
}

/// A database of its own for one test.
pub struct PgDb {
    pub name: String,
    socket_dir: PathBuf,
    port: u16,
    password: String,
}

impl PgDb {
    /// Database `name` of a server of the test's own, on `socket_dir` and `port` (trusted).
    pub fn at(name: &str, socket_dir: &Path, port: u16) -> PgDb {
        PgDb {
            name: name.to_owned(),
            socket_dir: socket_dir.to_owned(),
            port,
            password: String::new(),
        }
    }

    /// Over the cluster's unix socket: `postgresql://foreman@/t_N?host=/socket/dir&port=P`.
    pub fn url(&self) -> String {
        format!(
            "postgresql://{USER}@/{}?host={}&port={}",
            self.name,
            self.socket_dir.display(),
            self.port
        )
    }

    /// Over TCP on 127.0.0.1, with the password.
    pub fn tcp_url(&self) -> String {
        format!(
            "postgresql://{USER}:{}@127.0.0.1:{}/{}",
            self.password, self.port, self.name
        )
    }

    pub fn connect(&self) -> Client {
        connect(&self.url())
    }
}

pub fn connect(url: &str) -> Client {
    Client::connect(url, NoTls).unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// The cluster of this test binary, started at the first call; `None` (after a notice, once) when
/// this machine has no PostgreSQL server binaries and `FOREMAN_PG_TESTS` is not `required`.
pub fn cluster() -> Option<&'static PgCluster> {
    static NOTICE: std::sync::Once = std::sync::Once::new();
    match CLUSTER.get_or_init(PgCluster::start) {
        Ok(cluster) => Some(cluster),
        Err(Unavailable::Failed(why)) => panic!("cannot start a PostgreSQL cluster: {why}"),
        Err(Unavailable::NoBinaries(why)) => {
            assert!(
                std::env::var("FOREMAN_PG_TESTS").as_deref() != Ok("required"),
                "FOREMAN_PG_TESTS=required, but {why}"
            );
            NOTICE.call_once(|| {
                // Straight to stderr, past the test harness's capture, so that it is seen.
                let _ = writeln!(
                    std::io::stderr(),
                    "notice: skipping the PostgreSQL tests: {why} (FOREMAN_PG_TESTS=required makes this a failure)"
                );
            });
            None
        }
    }
}

enum Unavailable {
    /// The tests skip (or fail, if required).
    NoBinaries(String),
    /// The binaries are there but the cluster would not start: always a failure.
    Failed(String),
}

impl PgCluster {
    fn start() -> Result<PgCluster, Unavailable> {
        let bin = server_bin_dir().ok_or_else(|| {
            Unavailable::NoBinaries(
                "no PostgreSQL server binaries (initdb and postgres) in $FOREMAN_PG_BIN, \
                 /usr/lib/postgresql/*/bin or on PATH"
                    .to_owned(),
            )
        })?;
        PgCluster::start_with(&bin).map_err(Unavailable::Failed)
    }

    fn start_with(bin: &Path) -> Result<PgCluster, String> {
        // PostgreSQL refuses to run as root: as root, the server and initdb run as `postgres`.
        let owner = if is_root() {
            Some(user_ids("postgres").ok_or(
                "the tests run as root, and there is no `postgres` user to run the server as",
            )?)
        } else {
            None
        };
        remove_stale_dirs();
        let root = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?
            .keep();
        let lock = File::create(root.join("lock")).map_err(|e| e.to_string())?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(format!("cannot lock {}", root.display()));
        }
        let socket_dir = root.join("sock");
        std::fs::create_dir(&socket_dir).map_err(|e| e.to_string())?;
        let password = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let pwfile = root.join("pwfile");
        std::fs::write(&pwfile, &password).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| e.to_string())?;
        if let Some((uid, gid)) = owner {
            for path in [&root, &socket_dir, &pwfile] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))
                    .map_err(|e| format!("chown {}: {e}", path.display()))?;
            }
        }
        let data = root.join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", USER, "-E", "UTF8", "--no-locale", "--no-sync"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .env_remove("PGDATA");
        if let Some((uid, gid)) = owner {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb
            .output()
            .map_err(|e| format!("run {}: {e}", bin.join("initdb").display()))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // A free port can be taken between the probe and the server's bind: try a few.
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            match serve(bin, &root, &data, &socket_dir, port, owner) {
                Ok(postmaster) => {
                    let url = format!(
                        "postgresql://{USER}@/postgres?host={}&port={port}",
                        socket_dir.display()
                    );
                    let admin = Client::connect(&url, NoTls).map_err(|e| e.to_string())?;
                    // SAFETY: registers a plain function, once (this runs inside a OnceLock).
                    unsafe { libc::atexit(stop_at_exit) };
                    return Ok(PgCluster {
                        root,
                        socket_dir,
                        port,
                        password,
                        postmaster,
                        admin: Mutex::new(admin),
                        next_db: AtomicUsize::new(1),
                        _lock: lock,
                    });
                }
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    /// A new, empty database for one test.
    pub fn database(&self) -> PgDb {
        let name = format!("t_{}", self.next_db.fetch_add(1, Ordering::Relaxed));
        self.admin
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        PgDb {
            name,
            socket_dir: self.socket_dir.clone(),
            port: self.port,
            password: self.password.clone(),
        }
    }

    /// Stops the server (immediate shutdown: the data is thrown away) and removes its files.
    fn stop(&self) {
        // SAFETY: plain kill(2) of the server this process started.
        unsafe { libc::kill(self.postmaster, libc::SIGQUIT) };
        if !wait_until(PATIENCE, || SERVER_EXITED.load(Ordering::SeqCst)) {
            // SAFETY: as above. Its backends exit when they notice that it is gone.
            unsafe { libc::kill(self.postmaster, libc::SIGKILL) };
            wait_until(PATIENCE, || SERVER_EXITED.load(Ordering::SeqCst));
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Registered once the server runs: the test binary is exiting (its tests passed or not).
extern "C" fn stop_at_exit() {
    if let Some(Ok(cluster)) = CLUSTER.get() {
        cluster.stop();
    }
}

/// Starts `postgres` on `port` and waits until it accepts connections; returns its pid.
fn serve(
    bin: &Path,
    root: &Path,
    data: &Path,
    socket_dir: &Path,
    port: u16,
    owner: Option<(u32, u32)>,
) -> Result<libc::pid_t, String> {
    let log_path = root.join(format!("server-{port}.log"));
    let log = File::create(&log_path).map_err(|e| e.to_string())?;
    let mut server = Command::new(bin.join("postgres"));
    server
        .arg("-D")
        .arg(data)
        .arg("-k")
        .arg(socket_dir)
        .args(["-p", &port.to_string()])
        // fsync off (-F) and no full-page writes: a test cluster never outlives a crash.
        .args([
            "-F",
            "-c",
            "full_page_writes=off",
            "-c",
            "synchronous_commit=off",
        ])
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "shared_buffers=32MB",
        ])
        .args(["-c", "unix_socket_permissions=0700"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    if let Some((uid, gid)) = owner {
        server.uid(uid).gid(gid);
    }
    let parent = std::process::id();
    // SAFETY: prctl and getppid are async-signal-safe. std runs this after it changed the uid,
    // which would otherwise clear the death signal.
    unsafe {
        server.pre_exec(move || {
            // SIGQUIT (an immediate shutdown) when the thread that started it ends: that thread
            // waits for the server, so it ends only with the server or with this process.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The test process died before the signal was armed.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(std::io::Error::other("the test process is gone"));
            }
            Ok(())
        });
    }
    let (started, pid) = std::sync::mpsc::channel();
    SERVER_EXITED.store(false, Ordering::SeqCst);
    std::thread::Builder::new()
        .name("postgres".to_owned())
        .spawn(move || match server.spawn() {
            Err(e) => {
                let _ = started.send(Err(e.to_string()));
            }
            Ok(mut child) => {
                let _ = started.send(Ok(child.id()));
                let _ = child.wait();
                SERVER_EXITED.store(true, Ordering::SeqCst);
            }
        })
        .map_err(|e| e.to_string())?;
    let pid = pid
        .recv()
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("start {}: {e}", bin.join("postgres").display()))?;
    let pid = libc::pid_t::try_from(pid).map_err(|e| e.to_string())?;
    // postmaster.pid's 8th line is the server's status; "ready" once it accepts connections.
    let ready = || {
        std::fs::read_to_string(data.join("postmaster.pid"))
            .is_ok_and(|text| text.lines().nth(7).map(str::trim) == Some("ready"))
    };
    wait_until(PATIENCE * 2, || {
        ready() || SERVER_EXITED.load(Ordering::SeqCst)
    });
    if ready() && !SERVER_EXITED.load(Ordering::SeqCst) {
        return Ok(pid);
    }
    // SAFETY: plain kill(2) of the server just started.
    unsafe { libc::kill(pid, libc::SIGQUIT) };
    wait_until(PATIENCE, || SERVER_EXITED.load(Ordering::SeqCst));
    Err(format!(
        "postgres did not start on port {port}: {}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    ))
}

/// Where `initdb` and `postgres` are: `$FOREMAN_PG_BIN`, else the newest Debian-style
/// /usr/lib/postgresql/N/bin, else a directory on PATH that has both.
pub fn server_bin_dir() -> Option<PathBuf> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("FOREMAN_PG_BIN") {
        return Some(PathBuf::from(dir)).filter(|d| has_both(d));
    }
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .filter(|(_, bin)| has_both(bin))
        .collect();
    debian.sort();
    if let Some((_, bin)) = debian.pop() {
        return Some(bin);
    }
    std::env::split_paths(&std::env::var_os("PATH")?).find(|dir| has_both(dir))
}

/// The uid and gid of user `name`.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let name = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: getpwnam_r writes into `entry` and `buf`, both alive for the call, and returns the
    // entry through `found` (pointing into them) or null.
    unsafe {
        let mut entry: libc::passwd = std::mem::zeroed();
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            name.as_ptr(),
            &raw mut entry,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &raw mut found,
        );
        (rc == 0 && !found.is_null()).then_some((entry.pw_uid, entry.pw_gid))
    }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port on 127.0.0.1: {e}"))
}

/// Removes the temp dirs of earlier test binaries that were killed before their exit hook ran:
/// their lock is free (their servers got SIGQUIT when those binaries died).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let Ok(lock) = File::open(entry.path().join("lock")) else {
            continue;
        };
        // SAFETY: flock on a descriptor owned here; closing it releases the lock.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[test]
fn the_throwaway_cluster_gives_each_test_its_own_database() {
    let Some(pg) = cluster() else { return };
    let (a, b) = (pg.database(), pg.database());
    assert_ne!(a.name, b.name);
    for url in [a.url(), a.tcp_url()] {
        let mut client = connect(&url);
        let row = client
            .query_one("SELECT 1, current_database()", &[])
            .unwrap();
        assert_eq!(
            (row.get::<_, i32>(0), row.get::<_, String>(1)),
            (1, a.name.clone())
        );
    }
    // The socket trusts local users; over TCP the password is required.
    let no_password = format!("postgresql://{USER}@127.0.0.1:{}/{}", pg.port, a.name);
    assert!(Client::connect(&no_password, NoTls).is_err());
}

#[test]
fn the_schema_applies_twice_and_its_checks_refuse_bad_rows() {
    let Some(pg) = cluster() else { return };
    let mut client = pg.database().connect();
    client.batch_execute(SCHEMA).unwrap();
    client.batch_execute(SCHEMA).unwrap();
    let version: i32 = client
        .query_one("SELECT schema_version FROM foreman_meta", &[])
        .unwrap()
        .get(0);
    assert_eq!(version, 1);
    for (values, code, constraint) in [
        (
            r#"'t', '{"a": 1}', '{}'"#,
            SqlState::CHECK_VIOLATION,
            Some("foreman_task_args_array"),
        ),
        (
            "'t', '[]', '[]'",
            SqlState::CHECK_VIOLATION,
            Some("foreman_task_kwargs_object"),
        ),
        (
            "'t', '[1', '{}'",
            SqlState::INVALID_TEXT_REPRESENTATION,
            None,
        ),
        (
            "'', '[]', '{}'",
            SqlState::CHECK_VIOLATION,
            Some("foreman_task_name_valid"),
        ),
        (
            r"E'a\nb', '[]', '{}'",
            SqlState::CHECK_VIOLATION,
            Some("foreman_task_name_valid"),
        ),
        ("NULL, '[]', '{}'", SqlState::NOT_NULL_VIOLATION, None),
    ] {
        let sql = format!("INSERT INTO foreman_task(task_name, args, kwargs) VALUES ({values})");
        let err = client.execute(sql.as_str(), &[]).unwrap_err();
        let db_error = err.as_db_error().unwrap_or_else(|| panic!("{sql}: {err}"));
        assert_eq!(db_error.code(), &code, "{sql}: {db_error}");
        if constraint.is_some() {
            assert_eq!(db_error.constraint(), constraint, "{sql}");
        }
    }
    let row = client
        .query_one(
            "INSERT INTO foreman_task(task_name, args, kwargs) \
             VALUES ('app.send_email', '[\"a@example.com\"]', '{\"retry\": true}') \
             RETURNING args::text, kwargs::text, priority, attempt, \
                       run_after <= now() AND created_at = now(), leased_by IS NULL",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), r#"["a@example.com"]"#);
    assert_eq!(row.get::<_, String>(1), r#"{"retry": true}"#);
    assert_eq!((row.get::<_, i16>(2), row.get::<_, i32>(3)), (0, 1));
    assert!(row.get::<_, bool>(4), "due now, by the database's clock");
    assert!(row.get::<_, bool>(5), "not leased");
    let queued: i64 = client
        .query_one("SELECT count(*) FROM foreman_task", &[])
        .unwrap()
        .get(0);
    assert_eq!(queued, 1, "the refused rows left nothing behind");
}

#[test]
fn concurrent_inits_all_succeed_in_the_search_path_schema() {
    let Some(pg) = cluster() else { return };
    let db = pg.database();
    db.connect().batch_execute("CREATE SCHEMA app").unwrap();
    // The connection's search_path names the schema, as `ALTER ROLE … SET search_path` would.
    let url = format!("{}&options=-csearch_path%3Dapp", db.url());
    let inits: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || connect(&url).batch_execute(SCHEMA))
        })
        .collect();
    for init in inits {
        init.join().unwrap().unwrap();
    }
    let tables: Vec<(String, String)> = db
        .connect()
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_tables \
             WHERE tablename LIKE 'foreman%' ORDER BY 1, 2",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let names: Vec<&str> = tables.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        names,
        [
            "foreman_abort",
            "foreman_daemon",
            "foreman_dead",
            "foreman_meta",
            "foreman_pause",
            "foreman_run",
            "foreman_schedule",
            "foreman_stat",
            "foreman_task"
        ]
    );
    assert!(
        tables.iter().all(|(schema, _)| schema == "app"),
        "{tables:?}"
    );
}
