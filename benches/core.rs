//! Quick core benchmark (the full `foreman bench` comes later): drain rate of trivial in-process
//! tasks and of `/bin/true` command tasks, and idle → start latency. Run with
//! `cargo bench --bench core`; prints a table and one JSON line. A task counts only once it has
//! started, and every run checks that each id ran exactly once.

// Counts of a few thousand convert to f64 exactly.
#![allow(clippy::cast_precision_loss)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use foreman::{Config, Overrides, Registry, Shutdown};

const DRAIN_TASKS: usize = 20_000;
const COMMAND_TASKS: usize = 2_000;
const LATENCY_TASKS: usize = 200;
const LATENCY_SPACING: Duration = Duration::from_millis(20);
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
            db: Some(dir.path().join("q.sqlite3")),
            ..Overrides::default()
        };
        let config = Config::load(Some(&path), &overrides).expect("config");
        Bench { _dir: dir, config }
    }

    fn conn(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(&self.config.db).expect("db");
        conn.busy_timeout(Duration::from_secs(5))
            .expect("busy timeout");
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

fn drain_inproc() -> f64 {
    let bench = Bench::new("");
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
        let wakeup = bench.config.wakeup_dir.join("bench");
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

fn init(bench: &Bench) {
    let mut queue = foreman::queue::Queue::open(&bench.config.db, foreman::queue::Access::Create)
        .expect("open");
    queue.ensure_schema().expect("schema");
    foreman::wakeup::WakeupDir::prepare(&bench.config.wakeup_dir).expect("wakeup dir");
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
        println!("core benchmark: run it with `cargo bench --bench core`");
        return;
    }
    let show = |name: &str, unit: &str, (med, min, max): (f64, f64, f64)| {
        println!("{name:<24} {med:>12.1} {unit:<8} [{min:.1}–{max:.1}]");
    };
    let inproc = median((0..REPS).map(|_| drain_inproc()).collect());
    show("drain-inproc (20k)", "tasks/s", inproc);
    let command = median((0..REPS).map(|_| drain_command()).collect());
    show("drain-command /bin/true", "tasks/s", command);
    let bare = median((0..REPS).map(|_| bare_spawn()).collect());
    show("bare spawn, 4 threads", "spawns/s", bare);
    let lats: Vec<(f64, f64)> = (0..REPS).map(|_| latency()).collect();
    let p50 = median(lats.iter().map(|l| l.0).collect());
    let p99 = median(lats.iter().map(|l| l.1).collect());
    show("latency p50", "ms", p50);
    show("latency p99", "ms", p99);
    println!(
        "{}",
        serde_json::json!({
            "drain_inproc_tasks_per_s": inproc.0,
            "drain_command_tasks_per_s": command.0,
            "bare_spawn_per_s": bare.0,
            "command_vs_bare": command.0 / bare.0,
            "latency_p50_ms": p50.0,
            "latency_p99_ms": p99.0,
        })
    );
}
