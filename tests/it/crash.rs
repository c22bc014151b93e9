//! Crashes: `kill -9` of the daemon at random moments of a drain (in-process, command and pool
//! tasks; at-most-once and at-least-once) and of a producer inside its transaction. Every task
//! writes its id when it starts; after each crash that record, the queue and the history say what
//! the crash cost. The `#[ignore]`d variants run the issue's full numbers (docs/RELIABILITY.md).

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{
    Daemon, Env, PATIENCE, PYTHON_CLIENT, inspect, integrity_check, processes_with_env, wait_until,
};

/// The task name of the command and pool kinds (the in-process kind runs `foreman.bench`).
const TASK: &str = "crash.record";

/// The pool kind's task: records its start with one `write(2)` in append mode, like the others.
const POOL_MODULE: &str = r#"
import os
from foreman_worker import task

_out = os.open(os.environ["RECORD_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

@task(name="crash.record")
def record(task_id):
    os.write(_out, b"%d\n" % task_id)
"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// The built-in `foreman.bench`, an in-process Rust handler (it appends the task id).
    InProcess,
    /// A `sh` per task that appends `$FOREMAN_TASK_ID`.
    Command,
    /// A Python pool task that appends its `args[0]`, the row's id.
    Pool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delivery {
    AtMostOnce,
    AtLeastOnce,
}

/// One crash loop: `tasks` rows queued up front, the daemon `kill -9`ed `crashes` times while it
/// drains them, then a last start that finishes the drain.
#[derive(Clone, Copy, Debug)]
struct Drain {
    kind: Kind,
    delivery: Delivery,
    tasks: i64,
    crashes: usize,
    workers: usize,
    prefetch: usize,
}

impl Drain {
    fn new(kind: Kind, delivery: Delivery, tasks: i64, crashes: usize) -> Drain {
        Drain {
            kind,
            delivery,
            tasks,
            crashes,
            workers: 4,
            prefetch: 0,
        }
    }

    /// The issue's numbers, unless `CRASH_TASKS` or `CRASH_CRASHES` say otherwise.
    fn long(kind: Kind, delivery: Delivery) -> Drain {
        let var = |name: &str, default: usize| {
            std::env::var(name).map_or(default, |v| v.parse().expect("a number"))
        };
        Drain::new(
            kind,
            delivery,
            i64::try_from(var("CRASH_TASKS", 100_000)).unwrap(),
            var("CRASH_CRASHES", 100),
        )
    }

    /// What a crash may lose (at-most-once) or run again (at-least-once): the running tasks plus
    /// the prefetched ones.
    fn in_flight(&self) -> usize {
        self.workers + self.prefetch
    }

    fn config(&self, env: &Env) {
        let delivery = match self.delivery {
            Delivery::AtMostOnce => "at-most-once",
            Delivery::AtLeastOnce => "at-least-once",
        };
        let head = format!("workers = {}\nprefetch = {}\n", self.workers, self.prefetch);
        let task = match self.kind {
            Kind::InProcess => {
                // Built-in names take no [tasks] section, so no other delivery for this kind.
                assert_eq!(self.delivery, Delivery::AtMostOnce);
                String::new()
            }
            Kind::Command => format!(
                "[tasks.\"{TASK}\"]\ncommand = [\"sh\", \"-c\", \"echo $FOREMAN_TASK_ID >> \\\"$RECORD_FILE\\\"\"]\ndelivery = \"{delivery}\"\n"
            ),
            Kind::Pool => {
                std::fs::write(env.path("crashtasks.py"), POOL_MODULE).expect("pool module");
                format!(
                    "[pools.crash]\ncommand = [\"python3\", \"-m\", \"foreman_worker\", \"crashtasks\"]\n\
                     [tasks.\"{TASK}\"]\npool = \"crash\"\ndelivery = \"{delivery}\"\n"
                )
            }
        };
        env.config(&format!("{head}{task}"));
    }

    fn task_name(&self) -> &'static str {
        match self.kind {
            Kind::InProcess => "foreman.bench",
            Kind::Command | Kind::Pool => TASK,
        }
    }
}

/// The ids the tasks wrote when they started, in that order, read as the file grows.
struct Record {
    path: PathBuf,
    consumed: u64,
    ids: Vec<i64>,
}

impl Record {
    fn new(path: PathBuf) -> Record {
        Record {
            path,
            consumed: 0,
            ids: Vec::new(),
        }
    }

    /// Reads the lines added since the last call; returns how many ids there are now.
    fn refresh(&mut self) -> usize {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return self.ids.len();
        };
        file.seek(SeekFrom::Start(self.consumed)).expect("seek");
        let mut added = Vec::new();
        file.read_to_end(&mut added).expect("read the record");
        // A line being written right now is left for the next call.
        let whole = added.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        for line in added[..whole]
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
        {
            // foreman.bench adds its start time after the id.
            let id = std::str::from_utf8(line)
                .ok()
                .and_then(|l| l.split_whitespace().next())
                .and_then(|id| id.parse().ok())
                .unwrap_or_else(|| panic!("bad record line {:?}", String::from_utf8_lossy(line)));
            self.ids.push(id);
        }
        self.consumed += whole as u64;
        self.ids.len()
    }
}

/// What the crash loop has found so far.
#[derive(Default)]
struct Tally {
    /// Ids recorded at least once, and how many of the record's lines were counted in.
    seen: HashSet<i64>,
    counted: usize,
    /// Recorded starts of an id already seen.
    repeats: usize,
    /// Ids gone from the queue without a recorded start.
    lost: HashSet<i64>,
    lost_per_crash: Vec<usize>,
    /// At-least-once rows still leased after each crash: what runs again.
    leased_per_crash: Vec<usize>,
    /// From spawning a daemon to its first new task start, for each start that got that far.
    first_task: Vec<Duration>,
    /// From each `kill -9` to the last of the daemon's processes gone.
    orphans_gone: Vec<Duration>,
    startup_kills: usize,
}

impl Tally {
    /// Takes in the record's new lines and the queue as the last crash left them; returns the
    /// ids this crash lost.
    fn account(&mut self, drain: &Drain, env: &Env, record: &Record) -> usize {
        for id in &record.ids[self.counted..] {
            if !self.seen.insert(*id) {
                self.repeats += 1;
            }
        }
        self.counted = record.ids.len();
        let conn = inspect(&env.db);
        let ids = |sql: &str| -> HashSet<i64> {
            conn.prepare(sql)
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        let queued = ids("SELECT id FROM foreman_task");
        let dead = ids("SELECT task_id FROM foreman_dead");
        assert!(dead.is_empty(), "tasks in foreman_dead: {dead:?}");
        let lost: HashSet<i64> = (1..=drain.tasks)
            .filter(|id| !queued.contains(id) && !self.seen.contains(id))
            .collect();
        assert!(
            lost.is_superset(&self.lost),
            "tasks counted lost ran later: {:?}",
            self.lost.difference(&lost).collect::<Vec<_>>()
        );
        let new = lost.len() - self.lost.len();
        self.lost = lost;
        new
    }

    fn summary(&self, drain: &Drain) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        format!(
            "crash summary: {:?} {:?}, {} tasks, {} workers, prefetch {}, {} crashes ({} during startup): \
             {} lost (max {} per crash), {} repeated starts, leased at a crash max {}, \
             restart to first task p50 {:.0} ms max {:.0} ms, processes gone after kill max {:.0} ms",
            drain.kind,
            drain.delivery,
            drain.tasks,
            drain.workers,
            drain.prefetch,
            drain.crashes,
            self.startup_kills,
            self.lost.len(),
            self.lost_per_crash.iter().max().unwrap_or(&0),
            self.repeats,
            self.leased_per_crash.iter().max().unwrap_or(&0),
            ms(median(&self.first_task)),
            ms(self.first_task.iter().max().copied().unwrap_or_default()),
            ms(self.orphans_gone.iter().max().copied().unwrap_or_default()),
        )
    }
}

fn spawn(env: &Env) -> Daemon {
    // Info, not debug: a line per task would slow the drain down to the log's pace.
    env.spawn_daemon(&["--log-level", "info"], |cmd| {
        cmd.env("FOREMAN_BENCH_OUT", env.path("ran.txt"));
    })
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

fn seed() -> u64 {
    std::env::var("CRASH_SEED").map_or_else(|_| fastrand::u64(..), |s| s.parse().expect("a seed"))
}

/// Queues rows 1..=`tasks` in one transaction; each row's `args` is `[id]` (a Python task does not
/// see its id).
fn queue_rows(env: &Env, name: &str, tasks: i64) {
    env.sql()
        .execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
             INSERT INTO foreman_task(id, task_name, args) SELECT i, ?2, json_array(i) FROM n",
            rusqlite::params![tasks, name],
        )
        .expect("queue the rows");
}

/// Runs the crash loop and checks every crash as it goes; returns the summary line.
fn crash_loop(drain: &Drain) -> String {
    let env = Env::new();
    drain.config(&env);
    env.init();
    queue_rows(&env, drain.task_name(), drain.tasks);
    let seed = seed();
    println!("crash loop {drain:?}, CRASH_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut record = Record::new(env.path("ran.txt"));
    let mut tally = Tally::default();
    let segment = usize::try_from(drain.tasks).unwrap() / (drain.crashes + 1);
    assert!(
        segment > drain.crashes * drain.in_flight(),
        "too few tasks for that many crashes"
    );
    for crash in 0..drain.crashes {
        let before = record.refresh();
        let spawned = Instant::now();
        let mut daemon = spawn(&env);
        // About one kill in ten lands during startup: opening the DB, recovery, the first pop.
        if rng.usize(..10) == 0 {
            // The kill's random moment, not a wait for anything.
            std::thread::sleep(Duration::from_millis(rng.u64(..50)));
            tally.startup_kills += 1;
        } else {
            assert!(
                wait_until(PATIENCE, || record.refresh() > before),
                "no task started after restart {crash}; log:\n{}",
                daemon.log()
            );
            tally.first_task.push(spawned.elapsed());
            // Somewhere in this crash's share of the drain, never before the previous kill's
            // point (a startup kill makes no progress).
            let target = (crash * segment + rng.usize(1..=segment)).max(before + 1);
            assert!(
                wait_until(PATIENCE, || record.refresh() >= target),
                "the drain stalled at {} of {target} before crash {crash}; log:\n{}",
                record.ids.len(),
                daemon.log()
            );
        }
        daemon.kill9();
        after_kill(drain, &env, &mut record, &mut tally, crash);
    }
    let spawned = Instant::now();
    let before = record.refresh();
    let daemon = spawn(&env);
    assert!(wait_until(PATIENCE, || record.refresh() > before));
    tally.first_task.push(spawned.elapsed());
    assert!(
        wait_until(PATIENCE, || env.queued() == 0),
        "the last start did not finish the drain; log:\n{}",
        daemon.log()
    );
    // SIGTERM waits for the running tasks, so every task that started has recorded it.
    daemon.stop();
    record.refresh();
    tally.account(drain, &env, &record);
    assert_eq!(integrity_check(&env.db), "ok", "after the drain");
    check_history(drain, &env, &tally);
    // Generous, for a loaded machine: a restart that waited for its tick, or for a pool's
    // start timeout, would still show. A pool's Python workers must start before its first task.
    let bound = match drain.kind {
        Kind::InProcess | Kind::Command => Duration::from_secs(1),
        Kind::Pool => Duration::from_secs(5),
    };
    let median = median(&tally.first_task);
    assert!(median < bound, "restart to first task: median {median:?}");
    let summary = tally.summary(drain);
    println!("{summary}");
    summary
}

/// What one `kill -9` left: no process of the daemon's, a sound database, and no more lost (or,
/// at-least-once, leased) tasks than were in flight.
fn after_kill(drain: &Drain, env: &Env, record: &mut Record, tally: &mut Tally, crash: usize) {
    let marker = format!("RECORD_FILE={}", env.path("ran.txt").display());
    let killed = Instant::now();
    assert!(
        wait_until(PATIENCE, || processes_with_env(&marker).is_empty()),
        "processes outlived the daemon's kill -9: {:?}",
        processes_with_env(&marker)
    );
    tally.orphans_gone.push(killed.elapsed());
    assert_eq!(integrity_check(&env.db), "ok", "after crash {crash}");
    // The tasks are dead, so the record is final for this crash.
    record.refresh();
    let lost = tally.account(drain, env, record);
    tally.lost_per_crash.push(lost);
    let leased: i64 = inspect(&env.db)
        .query_row(
            "SELECT count(*) FROM foreman_task WHERE leased_at IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let leased = usize::try_from(leased).unwrap();
    tally.leased_per_crash.push(leased);
    match drain.delivery {
        Delivery::AtMostOnce => {
            assert_eq!(tally.repeats, 0, "a task ran twice (crash {crash})");
            assert!(
                lost <= drain.in_flight(),
                "crash {crash} lost {lost} tasks, more than the {} in flight",
                drain.in_flight()
            );
        }
        Delivery::AtLeastOnce => {
            assert_eq!(lost, 0, "crash {crash} lost tasks: {:?}", tally.lost);
            assert!(
                leased <= drain.in_flight(),
                "{leased} tasks leased at crash {crash}, more than the {} in flight",
                drain.in_flight()
            );
        }
    }
}

/// The end of the drain: every task ran, or (at-most-once) was lost at a crash and is recorded
/// `lost` in the history; nothing is left running.
fn check_history(drain: &Drain, env: &Env, tally: &Tally) {
    let conn = env.sql();
    let running: i64 = conn
        .query_row(
            "SELECT count(*) FROM foreman_run WHERE state = 'running'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(running, 0, "attempts still recorded running");
    let recorded_lost: HashSet<i64> = conn
        .prepare("SELECT task_id FROM foreman_run WHERE state = 'lost'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let unaccounted: Vec<&i64> = tally.lost.difference(&recorded_lost).collect();
    assert!(
        unaccounted.is_empty(),
        "lost without a `lost` attempt: {unaccounted:?}"
    );
    let crashes = drain.crashes * drain.in_flight();
    match drain.delivery {
        Delivery::AtMostOnce => {
            assert_eq!(tally.repeats, 0);
            assert!(tally.lost.len() <= crashes);
        }
        Delivery::AtLeastOnce => {
            assert!(tally.lost.is_empty(), "lost: {:?}", tally.lost);
            assert!(
                tally.repeats <= crashes,
                "{} repeated starts",
                tally.repeats
            );
        }
    }
    assert_eq!(
        tally.seen.len() + tally.lost.len(),
        usize::try_from(drain.tasks).unwrap()
    );
}

#[test]
fn kill_9_mid_drain_of_in_process_tasks() {
    crash_loop(&Drain::new(
        Kind::InProcess,
        Delivery::AtMostOnce,
        20_000,
        4,
    ));
}

#[test]
fn kill_9_mid_drain_with_prefetch_loses_at_most_workers_plus_prefetch() {
    let drain = Drain {
        prefetch: 64,
        ..Drain::new(Kind::InProcess, Delivery::AtMostOnce, 20_000, 4)
    };
    crash_loop(&drain);
}

#[test]
fn kill_9_mid_drain_of_command_tasks() {
    crash_loop(&Drain::new(Kind::Command, Delivery::AtMostOnce, 3_000, 3));
}

#[test]
fn kill_9_mid_drain_of_pool_tasks() {
    crash_loop(&Drain::new(Kind::Pool, Delivery::AtMostOnce, 5_000, 3));
}

#[test]
fn kill_9_mid_drain_of_at_least_once_command_tasks_loses_none() {
    crash_loop(&Drain::new(Kind::Command, Delivery::AtLeastOnce, 3_000, 3));
}

#[test]
fn kill_9_mid_drain_of_at_least_once_pool_tasks_loses_none() {
    crash_loop(&Drain::new(Kind::Pool, Delivery::AtLeastOnce, 5_000, 3));
}

#[test]
#[ignore = "long: 100 crashes in a 100,000-task drain; see docs/RELIABILITY.md"]
fn long_kill_9_100_times_in_process() {
    crash_loop(&Drain::long(Kind::InProcess, Delivery::AtMostOnce));
}

#[test]
#[ignore = "long: 100 crashes in a 100,000-task drain; see docs/RELIABILITY.md"]
fn long_kill_9_100_times_command() {
    crash_loop(&Drain::long(Kind::Command, Delivery::AtMostOnce));
}

#[test]
#[ignore = "long: 100 crashes in a 100,000-task drain; see docs/RELIABILITY.md"]
fn long_kill_9_100_times_pool() {
    crash_loop(&Drain::long(Kind::Pool, Delivery::AtMostOnce));
}

#[test]
#[ignore = "long: 100 crashes in a 100,000-task drain; see docs/RELIABILITY.md"]
fn long_kill_9_100_times_at_least_once_command() {
    crash_loop(&Drain::long(Kind::Command, Delivery::AtLeastOnce));
}

#[test]
#[ignore = "long: 100 crashes in a 100,000-task drain; see docs/RELIABILITY.md"]
fn long_kill_9_100_times_at_least_once_pool() {
    crash_loop(&Drain::long(Kind::Pool, Delivery::AtLeastOnce));
}

/// A producer that opens a transaction, inserts `rows` rows, says `inserted` and waits on stdin
/// before it would commit.
const PARTIAL_PRODUCER: &str = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=5, isolation_level=None)
db.execute("BEGIN")
db.executemany("INSERT INTO foreman_task(task_name, args) VALUES ('record', ?)",
               (('["partial", "%s"]' % ("x" * 200),) for _ in range(int(sys.argv[2]))))
print("inserted", flush=True)
sys.stdin.read()
db.execute("COMMIT")
"#;

#[test]
fn kill_9_of_a_producer_mid_transaction_leaves_no_row_and_the_daemon_running() {
    let env = Env::new();
    env.record_config("");
    env.init();
    let daemon = env.daemon(&[]);
    let good = |tag: &str| -> Vec<i64> {
        let ids = (0..50)
            .map(|_| env.insert("record", &format!("[\"{tag}\"]")))
            .collect();
        env.touch_wakeup("w");
        ids
    };
    let mut expected = good("before");
    env.wait_ran(50);
    let mut producer = Command::new("python3")
        .arg("-c")
        .arg(PARTIAL_PRODUCER)
        .arg(&env.db)
        .arg("20000")
        .env("PYTHONPATH", &*PYTHON_CLIENT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(producer.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("the producer's line");
    assert_eq!(line.trim(), "inserted", "the producer failed");
    // More than SQLite's page cache holds: the uncommitted rows are on disk, in the -wal.
    let wal = std::fs::metadata(env.path("q.sqlite3-wal")).unwrap().len();
    assert!(wal > 2 << 20, "-wal is {wal} bytes");
    // The daemon clears the wakeup dir before it pops: once it is empty, the daemon waits for the
    // producer's write lock.
    env.touch_wakeup("during");
    assert!(wait_until(PATIENCE, || std::fs::read_dir(&env.wakeup)
        .unwrap()
        .next()
        .is_none()));
    producer.kill().expect("kill -9 the producer");
    producer.wait().unwrap();
    expected.extend(good("after"));
    let ran = env.wait_ran(100);
    let ran_set: HashSet<i64> = ran.iter().copied().collect();
    assert_eq!(ran.len(), ran_set.len(), "a task ran twice");
    assert_eq!(ran_set, expected.iter().copied().collect::<HashSet<_>>());
    let conn = env.sql();
    let partial: i64 = conn
        .query_row(
            "SELECT (SELECT count(*) FROM foreman_task) + (SELECT count(*) FROM foreman_dead) \
             + (SELECT count(*) FROM foreman_run WHERE task_id NOT IN (SELECT value FROM json_each(?1)))",
            [serde_json::to_string(&expected).unwrap()],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(partial, 0, "rows of the killed transaction are visible");
    assert_eq!(integrity_check(&env.db), "ok");
    let log = daemon.stop();
    // Not even a pop that timed out waiting for the lock: the killed producer released it.
    assert!(!log.contains("ERROR]") && !log.contains("WARN ]"), "{log}");
}
