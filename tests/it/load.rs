//! Load: producer processes enqueueing while the daemon drains (no "database is locked" reaches
//! them, nothing lost or repeated), and readers beside a sustained load (the `-wal` stays bounded,
//! the daemon's RSS and open descriptors stay flat). The `#[ignore]`d variants run the issue's full
//! numbers (docs/RELIABILITY.md).

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use foreman::store::WAL_SIZE_LIMIT;

use crate::support::{Daemon, Env, PATIENCE, PYTHON_CLIENT, open_fds, rss_kib, wait_until};

const MIB: u64 = 1 << 20;

/// Bytes in MiB, for reports.
fn mib(bytes: u64) -> f64 {
    f64::from(u32::try_from(bytes >> 10).unwrap_or(u32::MAX)) / 1024.0
}

/// A producer with the shipped client and its documented settings (busy timeout 5 s): `enqueue`
/// (one transaction per row) or `enqueue_many` (100 rows per transaction) of `foreman.bench`. An
/// error is counted and the rows are tried again; prints the ids, the errors and the slowest call.
const PRODUCER: &str = r#"
import json, sqlite3, sys, time
from foreman_client import Client

db, mode, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids, errors, slowest, over_1s = [], [], 0.0, 0
with Client(db) as client:
    while len(ids) < rows and len(errors) < 100:
        batch = 1 if mode == "enqueue" else min(100, rows - len(ids))
        start = time.perf_counter()
        try:
            if mode == "enqueue":
                ids.append(client.enqueue("foreman.bench"))
            else:
                ids.extend(client.enqueue_many([("foreman.bench",)] * batch))
        except sqlite3.Error as e:
            errors.append(str(e))
        took = time.perf_counter() - start
        slowest = max(slowest, took)
        over_1s += took > 1
print(json.dumps({"ids": ids, "errors": errors, "slowest": slowest, "over_1s": over_1s}))
"#;

#[derive(serde::Deserialize)]
struct Produced {
    ids: Vec<i64>,
    errors: Vec<String>,
    /// The longest call, in seconds: how close a producer came to its busy timeout.
    slowest: f64,
    over_1s: usize,
}

/// A daemon running `foreman.bench` in-process: the cheapest task, so the queue and the database
/// are what is under load.
fn bench_daemon(env: &Env) -> Daemon {
    let daemon = env.spawn_daemon(&["--log-level", "info"], |cmd| {
        cmd.env("FOREMAN_BENCH_OUT", env.path("ran.txt"));
    });
    daemon.expect_log("foreman running");
    daemon
}

/// The task ids `foreman.bench` recorded, in start order.
fn started(env: &Env) -> Vec<i64> {
    std::fs::read_to_string(env.path("ran.txt"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            l.split_whitespace()
                .next()
                .and_then(|id| id.parse().ok())
                .expect("id")
        })
        .collect()
}

fn producers_while_draining(rows: usize) {
    let env = Env::new();
    env.init();
    let daemon = bench_daemon(&env);
    let began = Instant::now();
    let producers: Vec<_> = ["enqueue", "enqueue_many", "enqueue", "enqueue_many"]
        .iter()
        .map(|mode| {
            Command::new("python3")
                .arg("-c")
                .arg(PRODUCER)
                .arg(&env.db)
                .arg(mode)
                .arg(rows.to_string())
                .env("PYTHONPATH", &*PYTHON_CLIENT)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("python3")
        })
        .collect();
    let mut ids = Vec::new();
    let (mut slowest, mut over_1s) = (0.0_f64, 0);
    for producer in producers {
        let out = producer.wait_with_output().expect("producer");
        assert!(
            out.status.success(),
            "producer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let produced: Produced = serde_json::from_slice(&out.stdout).expect("producer's JSON");
        assert!(
            produced.errors.is_empty(),
            "a producer saw {} error(s): {:?}",
            produced.errors.len(),
            produced.errors
        );
        assert_eq!(produced.ids.len(), rows);
        slowest = slowest.max(produced.slowest);
        over_1s += produced.over_1s;
        ids.extend(produced.ids);
    }
    let enqueued = began.elapsed();
    let expected: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(expected.len(), 4 * rows, "two producers got the same id");
    assert!(
        wait_until(PATIENCE, || started(&env).len() >= 4 * rows),
        "{} of {} tasks started",
        started(&env).len(),
        4 * rows
    );
    let drained = began.elapsed();
    let log = daemon.stop();
    let ran = started(&env);
    let unique: HashSet<i64> = ran.iter().copied().collect();
    assert_eq!(unique.len(), ran.len(), "a task ran twice");
    assert_eq!(unique, expected, "lost or unknown tasks");
    assert_eq!(env.queued(), 0);
    for bad in ["database is locked", "cannot pop"] {
        assert!(!log.contains(bad), "the daemon logged {bad:?}:\n{log}");
    }
    println!(
        "load summary: 4 producers x {rows} rows: 0 errors, 0 lost, 0 repeated; slowest enqueue call \
         {:.0} ms ({over_1s} over 1 s); enqueued in {:.1} s, all started after {:.1} s",
        slowest * 1000.0,
        enqueued.as_secs_f64(),
        drained.as_secs_f64()
    );
}

#[test]
fn four_producers_enqueue_while_the_daemon_drains_with_no_lock_error() {
    producers_while_draining(2_500);
}

#[test]
#[ignore = "long: 4 x 250,000 rows; see docs/RELIABILITY.md"]
fn long_four_producers_250_000_rows_each() {
    let rows = std::env::var("LOAD_ROWS").map_or(250_000, |v| v.parse().expect("a number"));
    producers_while_draining(rows);
}

/// What runs beside the daemon during a soak: a paced producer, `foreman status` in a loop and
/// a sampler of the `-wal`'s size and the daemon's RSS and descriptors.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    statuses: Arc<AtomicUsize>,
    samples: Arc<std::sync::Mutex<Vec<Sample>>>,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    wal: u64,
    rss_kib: u64,
    fds: usize,
}

impl Load {
    /// Starts the producer (about `rate` rows/s in batches of 100, as one web app would), the
    /// status loop and the sampler (every `every`).
    fn start(env: &Env, daemon: &Daemon, rate: u32, every: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let statuses = Arc::new(AtomicUsize::new(0));
        let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        {
            let (stop, conn, wakeup) = (Arc::clone(&stop), env.sql(), env.wakeup.clone());
            threads.push(std::thread::spawn(move || {
                let pause = Duration::from_secs(100) / rate;
                while !stop.load(Ordering::Relaxed) {
                    conn.execute(
                        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100) \
                         INSERT INTO foreman_task(task_name) SELECT 'foreman.bench' FROM n",
                        [],
                    )
                    .expect("a producer's insert");
                    std::fs::write(wakeup.join("load"), b"").expect("wakeup");
                    // Pacing, not synchronisation.
                    std::thread::sleep(pause);
                }
            }));
        }
        {
            let (stop, statuses) = (Arc::clone(&stop), Arc::clone(&statuses));
            let mut status = env.command(&["status"]);
            status.stdin(Stdio::null());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let out = status.output().expect("foreman status");
                    assert!(
                        out.status.success(),
                        "foreman status failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    statuses.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        {
            let (stop, samples) = (Arc::clone(&stop), Arc::clone(&samples));
            let (pid, wal) = (daemon.pid(), env.path("q.sqlite3-wal"));
            let began = Instant::now();
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // None: the daemon is gone, and the test that ran it has failed already.
                    let (Some(rss_kib), Some(fds)) = (rss_kib(pid), open_fds(pid)) else {
                        return;
                    };
                    let sample = Sample {
                        at: began.elapsed(),
                        wal: std::fs::metadata(&wal).map_or(0, |m| m.len()),
                        rss_kib,
                        fds,
                    };
                    samples.lock().unwrap().push(sample);
                    // The sampling interval, not synchronisation.
                    std::thread::sleep(every);
                }
            }));
        }
        Load {
            stop,
            threads,
            statuses,
            samples,
        }
    }

    fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    fn finish(mut self) -> (Vec<Sample>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in std::mem::take(&mut self.threads) {
            thread.join().expect("a load thread panicked");
        }
        let samples = self.samples.lock().unwrap().clone();
        (samples, self.statuses.load(Ordering::Relaxed))
    }
}

impl Drop for Load {
    /// A failed test stops its load too, instead of leaving it to fail against a removed dir.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn wal_size(env: &Env) -> u64 {
    std::fs::metadata(env.path("q.sqlite3-wal")).map_or(0, |m| m.len())
}

/// Holds a read transaction on its own connection, as a report or a forgotten cursor would.
fn begin_read(env: &Env) -> rusqlite::Connection {
    let conn = env.sql();
    conn.execute_batch("BEGIN").unwrap();
    let _: i64 = conn
        .query_row("SELECT count(*) FROM foreman_run", [], |r| r.get(0))
        .unwrap();
    conn
}

/// The first and last samples after `warmup`, for the flatness checks.
fn flat(samples: &[Sample], warmup: Duration) -> (Sample, Sample) {
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= warmup).collect();
    assert!(after.len() >= 2, "too few samples after the warm-up");
    (*after[0], **after.last().unwrap())
}

fn check_flat(samples: &[Sample], warmup: Duration) -> String {
    let (first, last) = flat(samples, warmup);
    let peak_rss = samples.iter().map(|s| s.rss_kib).max().unwrap();
    // SQLite's page cache (2 MiB by default) and the -wal's index fill up in the warm-up; what
    // grows after it is a leak.
    assert!(
        last.rss_kib <= first.rss_kib + 2048,
        "RSS grew from {} to {} KiB",
        first.rss_kib,
        last.rss_kib
    );
    assert!(
        last.fds <= first.fds + 2,
        "open fds grew from {} to {}",
        first.fds,
        last.fds
    );
    format!(
        "RSS {:.1} -> {:.1} MiB (peak {:.1}); fds {} -> {}",
        mib(first.rss_kib << 10),
        mib(last.rss_kib << 10),
        mib(peak_rss << 10),
        first.fds,
        last.fds
    )
}

#[test]
fn a_held_read_transaction_grows_the_wal_only_while_held() {
    let env = Env::new();
    env.init();
    let daemon = bench_daemon(&env);
    let load = Load::start(&env, &daemon, 5_000, Duration::from_millis(50));
    let mut peaks = Vec::new();
    for cycle in 0..3 {
        let reader = begin_read(&env);
        // Held until the -wal is well past the limit: every commit meanwhile stays in it.
        assert!(
            wait_until(PATIENCE, || wal_size(&env) > WAL_SIZE_LIMIT + 8 * MIB),
            "cycle {cycle}: the -wal stayed at {} bytes",
            wal_size(&env)
        );
        drop(reader);
        peaks.push(wal_size(&env));
        // Once the reader is gone, a checkpoint catches up, SQLite reuses the file from its start
        // and the daemon's next commit cuts it back to the limit.
        assert!(
            wait_until(PATIENCE, || wal_size(&env) <= WAL_SIZE_LIMIT),
            "cycle {cycle}: the -wal stayed at {} bytes after the reader let go",
            wal_size(&env)
        );
    }
    let took = load.samples().last().map(|s| s.at).unwrap_or_default();
    let (samples, statuses) = load.finish();
    assert!(statuses > 0, "foreman status never ran");
    let max_wal = samples.iter().map(|s| s.wal).max().unwrap();
    // Each hold grows the -wal from the limit by what was committed meanwhile, and no further.
    assert!(
        max_wal < WAL_SIZE_LIMIT + 64 * MIB,
        "the -wal reached {max_wal} bytes"
    );
    let flat = check_flat(&samples, took / 3);
    daemon.stop();
    println!(
        "wal summary: 3 holds in {:.1} s, {statuses} foreman status runs: -wal peaks {:?} MiB, max {:.1} MiB, cut back to <= {} MiB after each; {flat}",
        took.as_secs_f64(),
        peaks.iter().map(|p| p / MIB).collect::<Vec<_>>(),
        mib(max_wal),
        WAL_SIZE_LIMIT / MIB
    );
}

/// A reporting job's reader: holds a read transaction `hold`, lets go for `pause`, again.
fn periodic_reader(
    env: &Env,
    stop: &Arc<AtomicBool>,
    hold: Duration,
    pause: Duration,
) -> JoinHandle<()> {
    let (stop, env_db) = (Arc::clone(stop), env.db.clone());
    std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(&env_db).expect("open db");
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        while !stop.load(Ordering::Relaxed) {
            conn.execute_batch("BEGIN").unwrap();
            let _: i64 = conn
                .query_row("SELECT count(*) FROM foreman_run", [], |r| r.get(0))
                .unwrap();
            // The reader's own rhythm: the point of the soak, not synchronisation.
            std::thread::sleep(hold);
            conn.execute_batch("COMMIT").unwrap();
            std::thread::sleep(pause);
        }
    })
}

#[test]
#[ignore = "long: a 10-minute soak; see docs/RELIABILITY.md"]
fn long_soak_with_readers_keeps_wal_rss_and_fds_bounded() {
    let secs = |name: &str, default: u64| {
        Duration::from_secs(std::env::var(name).map_or(default, |v| v.parse().expect("seconds")))
    };
    let duration = secs("SOAK_SECONDS", 600);
    let env = Env::new();
    env.init();
    let daemon = bench_daemon(&env);
    let load = Load::start(&env, &daemon, 2_000, Duration::from_secs(1));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = periodic_reader(&env, &stop, Duration::from_secs(5), Duration::from_secs(1));
    let began = Instant::now();
    while began.elapsed() < duration {
        // The soak's length: nothing to wait for but time.
        std::thread::sleep(Duration::from_secs(1));
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("the reader panicked");
    let (samples, statuses) = load.finish();
    let third = samples.len() / 3;
    let peak = |part: &[Sample]| part.iter().map(|s| s.wal).max().unwrap_or(0);
    let (first, last) = (peak(&samples[..third]), peak(&samples[2 * third..]));
    assert!(
        last <= first + first / 4 + 4 * MIB,
        "the -wal kept growing: peak {first} bytes in the first third, {last} in the last"
    );
    assert!(
        wait_until(PATIENCE, || wal_size(&env) <= WAL_SIZE_LIMIT),
        "the -wal stayed at {} bytes after the load",
        wal_size(&env)
    );
    let flat = check_flat(&samples, duration / 10);
    let per_minute: Vec<String> = samples
        .chunks(60)
        .map(|c| format!("{:.0}", mib(peak(c))))
        .collect();
    let ran = started(&env).len();
    daemon.stop();
    println!(
        "soak summary: {:.0} s, ~2000 rows/s, reader holding 5 s of every 6, {statuses} foreman status runs, {ran} tasks: \
         -wal peak per minute [{}] MiB, first third {:.1} MiB, last third {:.1} MiB; {flat}",
        duration.as_secs_f64(),
        per_minute.join(", "),
        mib(first),
        mib(last),
    );
}
