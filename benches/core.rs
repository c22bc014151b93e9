//! Quick core benchmark (the full `foreman bench` comes later): drain rate of trivial in-process
//! tasks, of `/bin/true` command tasks and of Python tasks on a pool of 4 workers, idle → start
//! latency (in-process and Python), drain rate at 1M queued rows (due, or delayed), and how late
//! delayed tasks start. Run with `cargo bench --bench core [-- drain latency depth delay]`; prints a
//! table and one JSON line. A task counts only once it has started, and every run checks that each task ran
//! exactly once. The Python client's enqueue rates are measured by `benches/python_enqueue.py`.

// Counts of a few thousand convert to f64 exactly.
#![allow(clippy::cast_precision_loss)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use foreman::{Config, Overrides, Registry, Shutdown};

const DRAIN_TASKS: usize = 20_000;
const COMMAND_TASKS: usize = 2_000;
const LATENCY_TASKS: usize = 200;
const LATENCY_SPACING: Duration = Duration::from_millis(20);
const POOL_PROCESSES: usize = 4;
const REPS: usize = 3;

/// Start times by task id, as recorded by the handler itself.
type Starts = Arc<Mutex<HashMap<i64, Instant>>>;

struct Bench {
    /// Holds the DB and wakeup dir; removed on drop.
    _dir: tempfile::TempDir,
    config: Config,
}

impl Bench {
    fn new(config_text: &str) -> Bench {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("foreman.toml");
        std::fs::write(&path, config_text).expect("config");
        let overrides = Overrides {
            db: Some(dir.path().join("q.sqlite3").into()),
            ..Overrides::default()
        };
        let config = Config::load(Some(&path), &overrides).expect("config");
        Bench { _dir: dir, config }
    }

    fn conn(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(self.config.db.sqlite_path().expect("a SQLite file"))
            .expect("db");
        conn.busy_timeout(Duration::from_secs(5))
            .expect("busy timeout");
        // What the Python client and schema.sql recommend for producers: in WAL mode a commit
        // then needs no fsync, and a power loss can lose the last commits but never corrupts.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .expect("synchronous");
        conn
    }

    fn enqueue_batch(&self, name: &str, n: usize) -> Vec<i64> {
        let mut conn = self.conn();
        let tx = conn.transaction().expect("tx");
        let ids = {
            let mut insert = tx
                .prepare("INSERT INTO foreman_task(task_name) VALUES (?1) RETURNING id")
                .expect("prepare");
            (0..n)
                .map(|_| insert.query_row([name], |r| r.get(0)).expect("insert"))
                .collect()
        };
        tx.commit().expect("commit");
        ids
    }

    /// Runs the daemon in a thread until `done` says so; returns the time from start to the end.
    fn run_until(&self, registry: Registry, done: impl Fn() -> bool) -> Duration {
        let (stop, shutdown) = crossbeam_channel::unbounded();
        let config = self.config.clone();
        let started = Instant::now();
        let daemon = std::thread::spawn(move || foreman::run(&config, registry, &shutdown));
        while !done() {
            std::thread::sleep(Duration::from_micros(200));
        }
        let took = started.elapsed();
        stop.send(Shutdown(libc::SIGTERM)).expect("stop");
        daemon.join().expect("daemon thread").expect("daemon");
        took
    }
}

fn recording_registry(name: &str, starts: &Starts) -> Registry {
    let starts = Arc::clone(starts);
    Registry::new().register(name, move |task| {
        let previous = starts
            .lock()
            .expect("starts")
            .insert(task.id, Instant::now());
        assert!(previous.is_none(), "task {} ran twice", task.id);
        Ok(())
    })
}

fn check_each_ran_once(starts: &Starts, ids: &[i64]) {
    let starts = starts.lock().expect("starts");
    assert_eq!(starts.len(), ids.len(), "not every task ran");
    assert!(
        ids.iter().all(|id| starts.contains_key(id)),
        "a task id is missing"
    );
}

/// Tasks per second from the first start to the last.
fn steady_rate(starts: &Starts) -> f64 {
    let starts = starts.lock().expect("starts");
    let first = starts.values().min().expect("a start");
    let last = starts.values().max().expect("a start");
    (starts.len() - 1) as f64 / last.duration_since(*first).as_secs_f64()
}

fn drain_inproc(config: &str) -> f64 {
    let bench = Bench::new(config);
    init(&bench);
    let ids = bench.enqueue_batch("bench.noop", DRAIN_TASKS);
    let starts: Starts = Arc::default();
    let registry = recording_registry("bench.noop", &starts);
    let counter = Arc::clone(&starts);
    bench.run_until(registry, || {
        counter.lock().expect("starts").len() == DRAIN_TASKS
    });
    check_each_ran_once(&starts, &ids);
    steady_rate(&starts)
}

fn drain_command() -> f64 {
    let bench = Bench::new("[tasks.\"bench.true\"]\ncommand = [\"/bin/true\"]\n");
    init(&bench);
    let ids = bench.enqueue_batch("bench.true", COMMAND_TASKS);
    let conn = bench.conn();
    let queued = || {
        conn.query_row("SELECT count(*) FROM foreman_task", [], |r| {
            r.get::<_, i64>(0)
        })
        .expect("count")
    };
    // A command task cannot report its own start here; the pop (row gone) is the closest honest
    // mark, and shutdown waits for the last ones to finish, so the time covers every run.
    let took = bench.run_until(Registry::new(), || queued() == 0);
    assert_eq!(queued(), 0, "{} tasks left", ids.len());
    COMMAND_TASKS as f64 / took.as_secs_f64()
}

/// The same number of `/bin/true` spawns, 4 threads at a time, without foreman.
fn bare_spawn() -> f64 {
    let started = Instant::now();
    let per_thread = COMMAND_TASKS / 4;
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..per_thread {
                    let status = std::process::Command::new("/bin/true")
                        .status()
                        .expect("spawn");
                    assert!(status.success());
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("thread");
    }
    COMMAND_TASKS as f64 / started.elapsed().as_secs_f64()
}

/// Enqueue → start for tasks arriving one by one at an idle daemon, as a producer does it (insert
/// in autocommit, then create the wakeup file if absent). Returns (p50, p99) in milliseconds.
fn latency() -> (f64, f64) {
    let bench = Bench::new("");
    init(&bench);
    let starts: Starts = Arc::default();
    let registry = recording_registry("bench.noop", &starts);
    let enqueued: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let producer_done = Arc::new(AtomicBool::new(false));
    let producer = {
        let enqueued = Arc::clone(&enqueued);
        let producer_done = Arc::clone(&producer_done);
        let conn = bench.conn();
        let wakeup = bench
            .config
            .wakeup_dir
            .as_deref()
            .expect("a wakeup dir")
            .join("bench");
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200)); // Let the daemon go idle first.
            let mut insert = conn
                .prepare("INSERT INTO foreman_task(task_name) VALUES ('bench.noop') RETURNING id")
                .expect("prepare");
            for _ in 0..LATENCY_TASKS {
                let at = Instant::now();
                let id: i64 = insert.query_row([], |r| r.get(0)).expect("insert");
                if !wakeup.exists() {
                    std::fs::File::create(&wakeup).expect("wakeup");
                }
                enqueued.lock().expect("enqueued").insert(id, at);
                std::thread::sleep(LATENCY_SPACING);
            }
            producer_done.store(true, Ordering::SeqCst);
        })
    };
    let counter = Arc::clone(&starts);
    bench.run_until(registry, || {
        producer_done.load(Ordering::SeqCst) && counter.lock().expect("s").len() == LATENCY_TASKS
    });
    producer.join().expect("producer");
    let starts = starts.lock().expect("starts");
    let enqueued = enqueued.lock().expect("enqueued");
    let mut lat: Vec<f64> = enqueued
        .iter()
        .map(|(id, at)| starts[id].duration_since(*at).as_secs_f64() * 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);
    (percentile(&lat, 50), percentile(&lat, 99))
}

/// Nearest-rank percentile, as the peers' harness computes it.
fn percentile(sorted: &[f64], p: usize) -> f64 {
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// A config running `bench.record` (benches/pool_tasks.py) on a pool of Python workers that write
/// their start times to `out`.
fn pool_config(out: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pythonpath = format!(
        "PYTHONPATH={}:{}",
        root.join("clients/python").display(),
        root.join("benches").display()
    );
    let argv = [
        "env",
        &pythonpath,
        &format!("BENCH_OUT={}", out.display()),
        "python3",
        "-m",
        "foreman_worker",
        "pool_tasks",
    ];
    let quoted: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "workers = {POOL_PROCESSES}\n[pools.py]\ncommand = [{}]\nprocesses = {POOL_PROCESSES}\n",
        quoted.join(", ")
    )
}

/// (i, start time in Unix seconds) for every line the Python tasks wrote; checks each i once.
fn pool_records(out: &Path, expected: usize) -> Vec<(usize, f64)> {
    let mut records = Vec::with_capacity(expected);
    for entry in std::fs::read_dir(out).expect("out dir") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("record file");
        for line in text.lines() {
            let (i, at) = line.split_once(' ').expect("a record line");
            records.push((i.parse().expect("i"), at.parse().expect("time")));
        }
    }
    let distinct: HashSet<usize> = records.iter().map(|r| r.0).collect();
    assert_eq!(records.len(), distinct.len(), "a task ran twice");
    assert_eq!(distinct.len(), expected, "not every task ran");
    records
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

fn drain_pool() -> f64 {
    let out = tempfile::tempdir().expect("out dir");
    let bench = Bench::new(&pool_config(out.path()));
    init(&bench);
    {
        let mut conn = bench.conn();
        let tx = conn.transaction().expect("tx");
        let mut insert = tx
            .prepare(
                "INSERT INTO foreman_task(task_name, args) VALUES ('bench.record', json_array(?1))",
            )
            .expect("prepare");
        for i in 0..DRAIN_TASKS {
            insert
                .execute([i64::try_from(i).expect("small")])
                .expect("insert");
        }
        drop(insert);
        tx.commit().expect("commit");
    }
    let conn = bench.conn();
    let queued = || {
        conn.query_row("SELECT count(*) FROM foreman_task", [], |r| {
            r.get::<_, i64>(0)
        })
        .expect("count")
    };
    // Shutdown waits for the running tasks, so every record is written when this returns.
    bench.run_until(Registry::new(), || {
        std::thread::sleep(Duration::from_millis(5));
        queued() == 0
    });
    let records = pool_records(out.path(), DRAIN_TASKS);
    let first = records.iter().map(|r| r.1).fold(f64::INFINITY, f64::min);
    let last = records.iter().map(|r| r.1).fold(0.0, f64::max);
    (DRAIN_TASKS - 1) as f64 / (last - first)
}

/// Enqueue → start of Python tasks at an idle daemon with a pool; (p50, p99) in milliseconds.
fn latency_pool() -> (f64, f64) {
    let out = tempfile::tempdir().expect("out dir");
    let bench = Bench::new(&pool_config(out.path()));
    init(&bench);
    let conn = bench.conn();
    let wakeup = bench
        .config
        .wakeup_dir
        .as_deref()
        .expect("a wakeup dir")
        .join("bench");
    let enqueued: Arc<Mutex<Vec<f64>>> = Arc::default();
    let producer_done = Arc::new(AtomicBool::new(false));
    let producer = {
        let enqueued = Arc::clone(&enqueued);
        let producer_done = Arc::clone(&producer_done);
        let out: PathBuf = out.path().to_path_buf();
        std::thread::spawn(move || {
            // Wait for the workers: the first task's record shows they are up; then go idle.
            conn.execute(
                "INSERT INTO foreman_task(task_name, args) VALUES ('bench.record', '[0]')",
                [],
            )
            .expect("warm-up");
            std::fs::File::create(&wakeup).expect("wakeup");
            while std::fs::read_dir(&out).expect("out").next().is_none() {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(200));
            let mut insert = conn
                .prepare("INSERT INTO foreman_task(task_name, args) VALUES ('bench.record', json_array(?1))")
                .expect("prepare");
            for i in 1..=LATENCY_TASKS {
                let at = unix_now();
                insert
                    .execute([i64::try_from(i).expect("small")])
                    .expect("insert");
                if !wakeup.exists() {
                    std::fs::File::create(&wakeup).expect("wakeup");
                }
                enqueued.lock().expect("enqueued").push(at);
                std::thread::sleep(LATENCY_SPACING);
            }
            producer_done.store(true, Ordering::SeqCst);
        })
    };
    let queue = bench.conn();
    bench.run_until(Registry::new(), || {
        std::thread::sleep(Duration::from_millis(5));
        producer_done.load(Ordering::SeqCst)
            && queue
                .query_row("SELECT count(*) FROM foreman_task", [], |r| {
                    r.get::<_, i64>(0)
                })
                .expect("count")
                == 0
    });
    producer.join().expect("producer");
    let records = pool_records(out.path(), LATENCY_TASKS + 1);
    let enqueued = enqueued.lock().expect("enqueued");
    let mut lat: Vec<f64> = records
        .iter()
        .filter(|(i, _)| *i > 0)
        .map(|(i, at)| (at - enqueued[i - 1]) * 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);
    (percentile(&lat, 50), percentile(&lat, 99))
}

/// Drain rate of the first `DRAIN_TASKS` in-process tasks with `depth` rows queued in all; with
/// `delayed`, all but those are due tomorrow (rows the pop must step over, or not).
fn drain_depth(depth: usize, delayed: bool) -> f64 {
    let bench = Bench::new("");
    init(&bench);
    let conn = bench.conn();
    let (name, run_after) = if delayed {
        (
            "bench.later",
            "(julianday('now') - 2440587.5) * 86400.0 + 86400.0",
        )
    } else {
        ("bench.noop", "(julianday('now') - 2440587.5) * 86400.0")
    };
    let bulk = if delayed { depth - DRAIN_TASKS } else { depth };
    conn.execute_batch(&format!(
        "BEGIN; WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {bulk}) \
         INSERT INTO foreman_task(task_name, run_after) SELECT '{name}', {run_after} FROM n; COMMIT;"
    ))
    .expect("bulk insert");
    if delayed {
        bench.enqueue_batch("bench.noop", DRAIN_TASKS);
    }
    let starts: Starts = Arc::default();
    let registry = recording_registry("bench.noop", &starts);
    let counter = Arc::clone(&starts);
    bench.run_until(registry, || {
        counter.lock().expect("starts").len() >= DRAIN_TASKS
    });
    steady_rate(&starts)
}

/// Lateness of delayed tasks: 200 tasks due 20 ms apart, enqueued ahead of time; how long after
/// its `run_after` each one started (p50, p99, in ms).
fn delay_lateness() -> (f64, f64) {
    let bench = Bench::new("");
    init(&bench);
    let conn = bench.conn();
    let base = unix_now() + 0.5;
    let mut due = HashMap::new();
    for n in 0..LATENCY_TASKS {
        let at = base + n as f64 * LATENCY_SPACING.as_secs_f64();
        let id: i64 = conn
            .query_row(
                "INSERT INTO foreman_task(task_name, run_after) VALUES ('bench.at', ?1) RETURNING id",
                [at],
                |r| r.get(0),
            )
            .expect("insert");
        due.insert(id, at);
    }
    let started: Arc<Mutex<HashMap<i64, f64>>> = Arc::default();
    let sink = Arc::clone(&started);
    let registry = Registry::new().register("bench.at", move |task| {
        sink.lock().expect("starts").insert(task.id, unix_now());
        Ok(())
    });
    let counter = Arc::clone(&started);
    bench.run_until(registry, || {
        counter.lock().expect("starts").len() == LATENCY_TASKS
    });
    let started = started.lock().expect("starts");
    let mut late: Vec<f64> = started
        .iter()
        .map(|(id, at)| {
            let lateness = at - due[id];
            assert!(lateness >= 0.0, "task {id} started {lateness}s early");
            lateness * 1000.0
        })
        .collect();
    late.sort_by(f64::total_cmp);
    (percentile(&late, 50), percentile(&late, 99))
}

fn init(bench: &Bench) {
    let mut store = foreman::store::Store::open(&bench.config.db, foreman::store::Access::Create)
        .expect("open");
    store.ensure_schema().expect("schema");
    let wakeup_dir = bench.config.wakeup_dir.as_deref().expect("a wakeup dir");
    foreman::wake::dir::WakeupDir::prepare(wakeup_dir).expect("wakeup dir");
}

fn median(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

fn main() {
    // `cargo test --all-targets` runs this binary without `--bench`; only `cargo bench` measures.
    if !std::env::args().any(|a| a == "--bench") {
        println!("core benchmark: run it with `cargo bench --bench core [-- SCENARIO…]`");
        return;
    }
    let chosen: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| chosen.is_empty() || chosen.iter().any(|c| c == name);
    let mut report = serde_json::Map::new();
    if wanted("drain") {
        drain_scenarios(&mut report);
    }
    if wanted("latency") {
        latency_scenarios(&mut report);
    }
    if wanted("depth") {
        let shallow = median(
            (0..REPS)
                .map(|_| drain_depth(10_000 + DRAIN_TASKS, false))
                .collect(),
        );
        show("drain at depth 30k", "tasks/s", shallow);
        let deep = median((0..REPS).map(|_| drain_depth(1_000_000, false)).collect());
        show("drain at depth 1M", "tasks/s", deep);
        let delayed = median((0..REPS).map(|_| drain_depth(1_000_000, true)).collect());
        show("drain, 980k delayed", "tasks/s", delayed);
        report.insert("depth_30k_tasks_per_s".into(), shallow.0.into());
        report.insert("depth_1m_tasks_per_s".into(), deep.0.into());
        report.insert("depth_1m_delayed_tasks_per_s".into(), delayed.0.into());
        report.insert("depth_1m_vs_30k".into(), (deep.0 / shallow.0).into());
    }
    if wanted("delay") {
        let lates: Vec<(f64, f64)> = (0..REPS).map(|_| delay_lateness()).collect();
        let p50 = median(lates.iter().map(|l| l.0).collect());
        let p99 = median(lates.iter().map(|l| l.1).collect());
        show("delay lateness p50", "ms", p50);
        show("delay lateness p99", "ms", p99);
        report.insert("delay_lateness_p50_ms".into(), p50.0.into());
        report.insert("delay_lateness_p99_ms".into(), p99.0.into());
    }
    println!("{}", serde_json::Value::Object(report));
}

fn show(name: &str, unit: &str, (med, min, max): (f64, f64, f64)) {
    println!("{name:<24} {med:>12.1} {unit:<8} [{min:.1}–{max:.1}]");
}

fn drain_scenarios(report: &mut serde_json::Map<String, serde_json::Value>) {
    let inproc = median((0..REPS).map(|_| drain_inproc("")).collect());
    show("drain-inproc (20k)", "tasks/s", inproc);
    let prefetch = median((0..REPS).map(|_| drain_inproc("prefetch = 256")).collect());
    show("drain-inproc, prefetch 256", "tasks/s", prefetch);
    report.insert(
        "drain_inproc_prefetch_tasks_per_s".into(),
        prefetch.0.into(),
    );
    let command = median((0..REPS).map(|_| drain_command()).collect());
    show("drain-command /bin/true", "tasks/s", command);
    let bare = median((0..REPS).map(|_| bare_spawn()).collect());
    show("bare spawn, 4 threads", "spawns/s", bare);
    let pool = median((0..REPS).map(|_| drain_pool()).collect());
    show("drain-pool python ×4", "tasks/s", pool);
    report.insert("drain_inproc_tasks_per_s".into(), inproc.0.into());
    report.insert("drain_command_tasks_per_s".into(), command.0.into());
    report.insert("bare_spawn_per_s".into(), bare.0.into());
    report.insert("command_vs_bare".into(), (command.0 / bare.0).into());
    report.insert("drain_pool_tasks_per_s".into(), pool.0.into());
}

fn latency_scenarios(report: &mut serde_json::Map<String, serde_json::Value>) {
    let lats: Vec<(f64, f64)> = (0..REPS).map(|_| latency()).collect();
    let p50 = median(lats.iter().map(|l| l.0).collect());
    let p99 = median(lats.iter().map(|l| l.1).collect());
    show("latency p50", "ms", p50);
    show("latency p99", "ms", p99);
    let lats: Vec<(f64, f64)> = (0..REPS).map(|_| latency_pool()).collect();
    let pool_p50 = median(lats.iter().map(|l| l.0).collect());
    let pool_p99 = median(lats.iter().map(|l| l.1).collect());
    show("latency python p50", "ms", pool_p50);
    show("latency python p99", "ms", pool_p99);
    report.insert("latency_p50_ms".into(), p50.0.into());
    report.insert("latency_p99_ms".into(), p99.0.into());
    report.insert("latency_pool_p50_ms".into(), pool_p50.0.into());
    report.insert("latency_pool_p99_ms".into(), pool_p99.0.into());
}
