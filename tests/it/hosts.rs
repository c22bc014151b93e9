//! Several hosts sharing one PostgreSQL server (issue 16), on this machine: the server and three
//! daemons each in a network namespace of its own, each host joined to the server's namespace by
//! a veth pair, so that a host can be cut off by taking its link down. One drain of 100,000 tasks
//! (`HOSTS_TASKS`) goes through three faults: PostgreSQL restarted (fast shutdown, started again),
//! one daemon killed with `kill -9` and started again, and one host's link down for longer than
//! the heartbeat's staleness limit, then up again. Then: nothing left queued or running, no task
//! run twice at-most-once, none lost at-least-once, the database's tables and indexes intact
//! (amcheck), and the recovered daemons accounted for.
//!
//! Root only (network namespaces), with PostgreSQL's server binaries and its amcheck extension.
//! `#[ignore]`d: `tests/reliability.sh hosts::` runs them; docs/RELIABILITY.md has their last
//! results. The namespaces are named `fmh<pid>…`: a run removes those a killed run left (their pid
//! gone), and no other.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::pg::{PgDb, server_bin_dir, user_ids};
use crate::support::{Daemon, Env, PATIENCE, is_root, wait_until};

/// The hosts that run a daemon.
const HOSTS: usize = 3;
/// The daemons' heartbeat: another daemon recovers one silent for 4 of them.
const HEARTBEAT: Duration = Duration::from_secs(1);
const STALE: Duration = Duration::from_secs(4);
/// How long a host's link stays down: well past its staleness.
const CUT: Duration = Duration::from_secs(10);
/// The server's port, in its namespace.
const PORT: u16 = 5432;
const DB: &str = "lab";
/// For a whole drain on the loaded 2-core VM, faults included.
const DRAIN_PATIENCE: Duration = Duration::from_mins(10);

/// A network namespace this test created (`ip netns add`), deleted when dropped.
struct Netns {
    name: String,
    /// `/run/netns/NAME`, open for `setns`.
    handle: File,
}

impl Netns {
    fn add(name: &str) -> Netns {
        ip(&["netns", "add", name]);
        let handle = File::open(format!("/run/netns/{name}"))
            .unwrap_or_else(|e| panic!("open /run/netns/{name}: {e}"));
        Netns {
            name: name.to_owned(),
            handle,
        }
    }

    /// `ip -n NAME ARGS`.
    fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// Makes `cmd` run in this namespace: it joins it between fork and exec (the caller is root).
    fn enter(&self, cmd: &mut Command) {
        let fd = self.handle.as_raw_fd();
        // SAFETY: setns(2) is async-signal-safe; `fd` stays open in the parent until the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Its interfaces go with it, and so do their veth peers.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes the namespaces a killed run of this test left: `fmh<pid>…` whose pid is gone.
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("fmh") else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// The server's namespace, the hosts' namespaces and links, and PostgreSQL.
struct Lab {
    hosts: Vec<Netns>,
    /// The host side of each host's veth pair, in the host's namespace.
    links: Vec<String>,
    db_ns: Netns,
    bin: PathBuf,
    owner: (u32, u32),
    root: tempfile::TempDir,
    server: Option<Child>,
}

impl Lab {
    /// Sets it up and starts the server, or `None` (with a notice) when this machine cannot.
    fn start() -> Option<Lab> {
        let skip = |why: &str| {
            eprintln!("notice: skipping the several-host test: {why}");
            None
        };
        if !is_root() {
            return skip("network namespaces need root");
        }
        let Some(bin) = server_bin_dir() else {
            return skip("no PostgreSQL server binaries");
        };
        let Some(owner) = user_ids("postgres") else {
            return skip("no postgres user to run the server as");
        };
        remove_stale_namespaces();
        let prefix = format!("fmh{}", std::process::id());
        let db_ns = Netns::add(&format!("{prefix}db"));
        db_ns.ip(&["link", "set", "lo", "up"]);
        let mut hosts = Vec::new();
        let mut links = Vec::new();
        for n in 1..=HOSTS {
            let host = Netns::add(&format!("{prefix}h{n}"));
            host.ip(&["link", "set", "lo", "up"]);
            let (near, far) = (format!("{prefix}v{n}h"), format!("{prefix}v{n}d"));
            // Made inside the host's namespace: no interface of this test is ever in the root one.
            host.ip(&[
                "link",
                "add",
                &near,
                "type",
                "veth",
                "peer",
                "name",
                &far,
                "netns",
                &db_ns.name,
            ]);
            host.ip(&["addr", "add", &format!("10.231.{n}.2/30"), "dev", &near]);
            host.ip(&["link", "set", &near, "up"]);
            db_ns.ip(&["addr", "add", &format!("10.231.{n}.1/30"), "dev", &far]);
            db_ns.ip(&["link", "set", &far, "up"]);
            hosts.push(host);
            links.push(near);
        }
        let root = tempfile::Builder::new()
            .prefix("foreman-hosts-")
            .tempdir()
            .expect("temp dir");
        for dir in ["", "sock"] {
            let path = root.path().join(dir);
            std::fs::create_dir_all(&path).unwrap();
            std::os::unix::fs::chown(&path, Some(owner.0), Some(owner.1)).unwrap();
        }
        let data = root.path().join("data");
        let out = Command::new(bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "foreman", "-E", "UTF8", "--no-locale"])
            .args(["--auth-local=trust", "--auth-host=trust"])
            .uid(owner.0)
            .gid(owner.1)
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The hosts reach it over their links; it trusts them (the namespaces are the test's).
        let hba = data.join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba).unwrap();
        text.push_str("host all all 10.231.0.0/16 trust\n");
        std::fs::write(&hba, text).unwrap();
        let mut lab = Lab {
            hosts,
            links,
            db_ns,
            bin,
            owner,
            root,
            server: None,
        };
        lab.start_server();
        let mut admin = lab.db("postgres").connect();
        admin
            .batch_execute(&format!("CREATE DATABASE {DB}"))
            .expect("create database");
        lab.db(DB)
            .connect()
            .batch_execute("CREATE EXTENSION amcheck")
            .expect("amcheck");
        Some(lab)
    }

    /// Database `name`, over the server's socket (the test's own connections).
    fn db(&self, name: &str) -> PgDb {
        PgDb::at(name, &self.root.path().join("sock"), PORT)
    }

    /// What daemon `host` (0-based) connects to: the server's address on its link.
    fn url(host: usize) -> String {
        format!("postgresql://foreman@10.231.{}.1:{PORT}/{DB}", host + 1)
    }

    /// Starts PostgreSQL in its namespace, durable (fsync on), and waits until it accepts.
    fn start_server(&mut self) {
        let data = self.root.path().join("data");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.root.path().join("server.log"))
            .unwrap();
        let mut server = Command::new(self.bin.join("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(self.root.path().join("sock"))
            .args(["-p", &PORT.to_string()])
            .args(["-c", "listen_addresses=*", "-c", "max_connections=50"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let (fd, (uid, gid)) = (self.db_ns.handle.as_raw_fd(), self.owner);
        // SAFETY: setns, setgroups, setgid, setuid and prctl are async-signal-safe. The namespace
        // is joined while still root; the death signal is armed after the uid change, which would
        // clear it: the server dies with the thread that started it (the test's).
        unsafe {
            server.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0
                    || libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                    || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.server = Some(server.spawn().expect("start postgres"));
        let ready = || {
            std::fs::read_to_string(data.join("postmaster.pid"))
                .is_ok_and(|text| text.lines().nth(7).map(str::trim) == Some("ready"))
        };
        assert!(
            wait_until(PATIENCE * 2, ready),
            "postgres did not start: {}",
            std::fs::read_to_string(self.root.path().join("server.log")).unwrap_or_default()
        );
    }

    /// Stops PostgreSQL (`mode`: SIGINT fast, SIGQUIT immediate) and waits for it to exit.
    fn stop_server(&mut self, signal: i32) {
        if let Some(mut server) = self.server.take() {
            let pid = i32::try_from(server.id()).unwrap();
            // SAFETY: plain kill(2) of the server this test started.
            unsafe { libc::kill(pid, signal) };
            let _ = server.wait();
        }
    }

    /// `foreman run` on host `host` (0-based), its log captured.
    fn daemon(&self, env: &Env, host: usize) -> Daemon {
        let url = Lab::url(host);
        let mut cmd = env.command_without_db(&["--db", &url, "run", "--log-level", "debug"]);
        self.hosts[host].enter(&mut cmd);
        Daemon::spawn(cmd)
    }

    /// Takes host `host`'s link down (`up`: up again).
    fn link(&self, host: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        self.hosts[host].ip(&["link", "set", &self.links[host], state]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_server(libc::SIGQUIT);
    }
}

/// The ids the tasks recorded at their start, with how many times each.
fn starts(env: &Env) -> HashMap<i64, usize> {
    let mut seen = HashMap::new();
    for id in env.ran() {
        *seen.entry(id).or_insert(0) += 1;
    }
    seen
}

/// The registration id of the daemon with `pid`, the newest.
fn registration(env: &Env, pid: i32) -> i64 {
    env.number(&format!(
        "SELECT max(id) FROM foreman_daemon WHERE pid = {pid}"
    ))
}

/// When registration `id` was recovered by another daemon, if it was.
fn recovered(env: &Env, id: i64) -> bool {
    env.number(&format!(
        "SELECT count(*) FROM foreman_daemon WHERE id = {id} AND recovered_by IS NOT NULL"
    )) == 1
}

/// Waits until `percent` of the `tasks` have started: the start records' lines, counted every
/// 100 ms.
fn wait_progress(env: &Env, tasks: usize, percent: usize) {
    let target = tasks * percent / 100;
    let file = env.path("ran.txt");
    let deadline = Instant::now() + DRAIN_PATIENCE;
    loop {
        let lines = std::fs::read(&file).map_or(0, |b| b.split(|c| *c == b'\n').count() - 1);
        if lines >= target {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the drain stalled at {lines} of {target}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// After the drain: (ids that never started, ids that started more than once, attempts recorded
/// lost), once every task is checked to have an ended attempt and the database to be intact.
fn check(env: &Env, ids: &std::ops::RangeInclusive<i64>) -> (usize, usize, i64) {
    let seen = starts(env);
    let lost = ids.clone().filter(|id| !seen.contains_key(id)).count();
    let twice = seen.values().filter(|n| **n > 1).count();
    assert!(
        seen.keys().all(|id| ids.contains(id)),
        "a start of an unknown id"
    );
    let lost_attempts = env.number("SELECT count(*) FROM foreman_run WHERE state = 'lost'");
    // Every task has an attempt, and its last one ended.
    assert_eq!(
        env.number("SELECT count(DISTINCT task_id) FROM foreman_run"),
        ids.end() - ids.start() + 1
    );
    // The tables and their indexes are intact.
    let corrupt = env.number(
        "SELECT count(*) FROM pg_class c, LATERAL verify_heapam(c.oid) \
         WHERE c.relname LIKE 'foreman%' AND c.relkind = 'r'",
    );
    assert_eq!(corrupt, 0, "verify_heapam found corruption");
    env.rows(
        "SELECT bt_index_check(c.oid, true) FROM pg_class c JOIN pg_am a ON a.oid = c.relam \
         WHERE c.relname LIKE 'foreman%' AND c.relkind = 'i' AND a.amname = 'btree'",
    );
    (lost, twice, lost_attempts)
}

/// What one drain through the three faults gave.
struct Outcome {
    tasks: usize,
    seconds: f64,
    /// Ids with no start record (at-most-once: the crash window; at-least-once: must be 0).
    lost: usize,
    /// Ids that started more than once.
    twice: usize,
    /// Attempts the history records lost.
    lost_attempts: i64,
    server_down: Duration,
    killed_recovered_after: Duration,
    cut_recovered_after: Duration,
}

fn drain_through_faults(delivery: &str) -> Option<Outcome> {
    let mut lab = Lab::start()?;
    let tasks: usize = std::env::var("HOSTS_TASKS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let env = Env::with_pg(lab.db(DB));
    env.config(&format!(
        r#"workers = 4
heartbeat = "{}s"
[tasks.record]
command = ["sh", "-c", "echo \"$FOREMAN_TASK_ID\" >> \"$RECORD_FILE\""]
delivery = "{delivery}"
"#,
        HEARTBEAT.as_secs()
    ));
    env.init();
    let ids = env.insert_many("record", i64::try_from(tasks).unwrap());
    let started = Instant::now();
    let mut daemons: Vec<Daemon> = (0..HOSTS).map(|h| lab.daemon(&env, h)).collect();
    // 1. PostgreSQL restarts under the daemons (a fast shutdown, as a package upgrade does).
    wait_progress(&env, tasks, 20);
    let down = Instant::now();
    lab.stop_server(libc::SIGINT);
    std::thread::sleep(Duration::from_millis(500));
    lab.start_server();
    let server_down = down.elapsed();

    // 2. kill -9 of host 1's daemon: another recovers it once its heartbeat is stale; a new one
    //    starts there.
    wait_progress(&env, tasks, 40);
    let victim = registration(&env, daemons[0].pid());
    let killed = Instant::now();
    daemons[0].kill9();
    assert!(
        wait_until(STALE * 4, || recovered(&env, victim)),
        "daemon {victim} was not recovered"
    );
    let killed_recovered_after = killed.elapsed();
    daemons[0] = lab.daemon(&env, 0);

    // 3. Host 2 cut off for longer than its staleness: recovered by the others meanwhile, it
    //    notices when its link is back, registers again and carries on.
    wait_progress(&env, tasks, 60);
    let cut_id = registration(&env, daemons[1].pid());
    let cut = Instant::now();
    lab.link(1, false);
    assert!(
        wait_until(CUT, || recovered(&env, cut_id)),
        "the cut-off daemon {cut_id} was not recovered within {CUT:?}"
    );
    let cut_recovered_after = cut.elapsed();
    std::thread::sleep(CUT.saturating_sub(cut.elapsed()));
    lab.link(1, true);
    assert!(
        wait_until(PATIENCE * 2, || daemons[1]
            .has_log("this daemon was recovered by daemon")),
        "the cut-off daemon did not notice; log:\n{}",
        daemons[1].log()
    );

    // The rest of the drain: nothing queued, nothing running.
    let settled = || {
        env.queued() == 0
            && env.number("SELECT count(*) FROM foreman_run WHERE state = 'running'") == 0
    };
    assert!(
        wait_until(DRAIN_PATIENCE, settled),
        "not drained: {} queued",
        env.queued()
    );
    let seconds = started.elapsed().as_secs_f64();
    for daemon in daemons {
        daemon.stop();
    }

    let (lost, twice, lost_attempts) = check(&env, &ids);
    Some(Outcome {
        tasks,
        seconds,
        lost,
        twice,
        lost_attempts,
        server_down,
        killed_recovered_after,
        cut_recovered_after,
    })
}

fn summary(delivery: &str, o: &Outcome) {
    println!(
        "summary hosts {delivery}: {} tasks on {HOSTS} hosts in {:.1} s; PostgreSQL restarted ({:.1} s down), \
         a daemon killed (recovered after {:.1} s), a host cut off for {:?} (recovered after {:.1} s): \
         lost {} (no start), run twice {}, attempts recorded lost {}, integrity ok",
        o.tasks,
        o.seconds,
        o.server_down.as_secs_f64(),
        o.killed_recovered_after.as_secs_f64(),
        CUT,
        o.cut_recovered_after.as_secs_f64(),
        o.lost,
        o.twice,
        o.lost_attempts
    );
}

#[test]
#[ignore = "long, root: three hosts in network namespaces; see docs/RELIABILITY.md"]
fn long_three_hosts_drain_100_000_tasks_through_a_restart_a_kill_and_a_cut() {
    let Some(o) = drain_through_faults("at-most-once") else {
        return;
    };
    summary("at-most-once", &o);
    assert_eq!(o.twice, 0, "at-most-once: a task ran twice");
    // A crash loses at most what was in flight: a daemon's workers, per fault and daemon.
    assert!(o.lost <= 3 * 4 * HOSTS, "{} lost", o.lost);
}

#[test]
#[ignore = "long, root: three hosts in network namespaces; see docs/RELIABILITY.md"]
fn long_three_hosts_at_least_once_lose_nothing_through_a_restart_a_kill_and_a_cut() {
    let Some(o) = drain_through_faults("at-least-once") else {
        return;
    };
    summary("at-least-once", &o);
    assert_eq!(o.lost, 0, "at-least-once: a task never ran");
}
