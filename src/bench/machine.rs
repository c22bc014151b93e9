//! What the machine allows, measured at the start of every bench run so that a figure can be
//! read against it: how long a parked thread takes to wake when another hands it work (the cost
//! of every hand-off between the loop, a worker and a pool driver), how long a file created in a
//! watched directory takes to reach a waiting thread (a producer's wakeup), and how many rows a
//! tight loop of the daemon's own transaction pops per second on the bench's disk, 4 rows at a
//! time (the default pop, one row per worker) and 256 (with prefetch). A drain cannot beat the
//! pop limit; a latency cannot beat the wake-ups.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::{Failure, Outcome, percentile};
use crate::clock::unix_now;
use crate::database::Database;
use crate::store::{Access, Ending, Next, Producer, Resolved, RunState, Store};

/// What the machine allows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Machine {
    /// A parked thread woken through a channel: p50 and p99, µs.
    pub thread_wake_us: (f64, f64),
    /// A file created in a watched directory, seen by a waiting thread: p50 and p99, µs.
    pub inotify_wake_us: (f64, f64),
    /// Rows/s of back-to-back pop transactions of 4 rows, each recording the last one's endings.
    pub pop_limit_4: f64,
    /// The same, 256 rows at a time.
    pub pop_limit_256: f64,
    /// With `--db postgresql://…`: the same through the PostgreSQL store's claim, on the server,
    /// 4 and 256 rows at a time.
    pub pg_pop_limit: Option<(f64, f64)>,
}

/// How much each measurement does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MachineSizes {
    pub wakes: usize,
    pub pop_rows: usize,
}

/// Measures the machine in `dir`, which must be on the disk the runs use.
pub(crate) fn measure(dir: &Path, sizes: MachineSizes, postgres: Option<&str>) -> Outcome<Machine> {
    let pg_pop_limit = match postgres {
        Some(url) => Some((
            pg_pop_limit(url, sizes.pop_rows, 4)?,
            pg_pop_limit(url, sizes.pop_rows, 256)?,
        )),
        None => None,
    };
    Ok(Machine {
        thread_wake_us: thread_wake(sizes.wakes)?,
        inotify_wake_us: inotify_wake(dir, sizes.wakes)?,
        pop_limit_4: pop_limit(dir, sizes.pop_rows, 4)?,
        pop_limit_256: pop_limit(dir, sizes.pop_rows, 256)?,
        pg_pop_limit,
    })
}

impl Machine {
    /// The JSON line that comes before the scenarios' (`"machine": {...}`).
    pub fn json(&self) -> Value {
        let mut machine = Map::new();
        let pair = |(p50, p99): (f64, f64)| serde_json::json!({ "p50": p50, "p99": p99 });
        machine.insert("thread_wake_us".into(), pair(self.thread_wake_us));
        machine.insert("inotify_wake_us".into(), pair(self.inotify_wake_us));
        machine.insert("pop_limit_4_rows_per_s".into(), self.pop_limit_4.into());
        machine.insert("pop_limit_256_rows_per_s".into(), self.pop_limit_256.into());
        if let Some((four, many)) = self.pg_pop_limit {
            machine.insert("pg_pop_limit_4_rows_per_s".into(), four.into());
            machine.insert("pg_pop_limit_256_rows_per_s".into(), many.into());
        }
        serde_json::json!({ "machine": machine })
    }
}

/// The gap between two hand-offs: long enough that the receiving thread has parked.
const PARK_GAP: Duration = Duration::from_millis(1);

/// p50 and p99 of `samples` in µs.
fn quantiles_us(mut samples: Vec<f64>) -> Outcome<(f64, f64)> {
    if samples.is_empty() {
        return Err(Failure::new("no wake-up was measured"));
    }
    samples.sort_by(f64::total_cmp);
    Ok((percentile(&samples, 50), percentile(&samples, 99)))
}

/// A thread parked in a channel's `recv`, woken `n` times by a send carrying the send's time.
fn thread_wake(n: usize) -> Outcome<(f64, f64)> {
    let (to_thread, inbox) = crossbeam_channel::bounded::<Instant>(1);
    let (to_main, results) = crossbeam_channel::bounded::<f64>(1);
    let waiter = std::thread::spawn(move || {
        while let Ok(sent) = inbox.recv() {
            let woke = sent.elapsed().as_secs_f64() * 1e6;
            if to_main.send(woke).is_err() {
                return;
            }
        }
    });
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        std::thread::sleep(PARK_GAP);
        if to_thread.send(Instant::now()).is_err() {
            break;
        }
        match results.recv() {
            Ok(us) => samples.push(us),
            Err(_) => break,
        }
    }
    drop(to_thread);
    let _ = waiter.join();
    quantiles_us(samples)
}

/// A file created in a directory `notify` watches, `n` times, timed to the waiting thread.
fn inotify_wake(dir: &Path, n: usize) -> Outcome<(f64, f64)> {
    use notify::{EventKind, RecursiveMode, Watcher as _};
    let wakeup_dir = dir.join("machine-wakeup");
    std::fs::create_dir(&wakeup_dir)
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", wakeup_dir.display())))?;
    let (created_tx, created_rx) = crossbeam_channel::bounded::<Instant>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && matches!(event.kind, EventKind::Create(_))
        {
            let _ = created_tx.try_send(Instant::now());
        }
    })
    .and_then(|mut w| {
        w.watch(&wakeup_dir, RecursiveMode::NonRecursive)
            .map(|()| w)
    })
    .map_err(|e| Failure::new(format!("cannot watch {}: {e}", wakeup_dir.display())))?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        std::thread::sleep(PARK_GAP);
        let file = wakeup_dir.join(i.to_string());
        let created = Instant::now();
        std::fs::File::create(&file)
            .map_err(|e| Failure::new(format!("cannot create {}: {e}", file.display())))?;
        match created_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(at) => samples.push(at.saturating_duration_since(created).as_secs_f64() * 1e6),
            Err(_) => return Err(Failure::new("a file creation was not seen within 5 s")),
        }
        let _ = std::fs::remove_file(&file);
    }
    let _ = watcher.unwatch(&wakeup_dir);
    drop(watcher);
    let _ = std::fs::remove_dir_all(&wakeup_dir);
    quantiles_us(samples)
}

/// `pop_limit` on PostgreSQL: the daemon's own claim statement, back to back, through a
/// registered daemon's store on a schema of its own in the database of `url`, dropped after.
fn pg_pop_limit(url: &str, rows: usize, batch: usize) -> Outcome<f64> {
    let base = Database::Postgres(url.to_owned());
    let schema = format!("foreman_bench_machine_{}", std::process::id());
    let admin = Producer::open(&base)?;
    admin.create_schema(&schema)?;
    let db = Database::Postgres(super::daemon::with_search_path(url, &schema));
    let result = (|| {
        let mut store = Store::open_daemon(&db, |_| false)?;
        store.ensure_schema()?;
        store.register_daemon(&crate::store::DaemonInfo {
            served: vec!["foreman.bench".to_owned()],
            stale_after: std::time::Duration::from_mins(1),
            pid: std::process::id(),
            pid_start: None,
            host: crate::sys::hostname(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: unix_now(),
            workers: batch,
        })?;
        Producer::open(&db)?.insert_many("foreman.bench", rows, None)?;
        let groups = [crate::store::ClaimGroup {
            names: vec!["foreman.bench".to_owned()],
            leases: vec![0.0],
            limit: usize::MAX,
        }];
        let claim = crate::store::Claim {
            limit: batch,
            groups: &groups,
        };
        pop_back_to_back(&mut store, claim)
    })();
    let _ = admin.drop_schema(&schema);
    result
}

/// Rows/s of the daemon's own transaction, back to back on a fresh database in `dir`: pop up to
/// `batch` rows and record the previous pop's attempts as done, until `rows` rows are gone. No
/// task runs: this is what the database allows the loop, whatever the workers do.
fn pop_limit(dir: &Path, rows: usize, batch: usize) -> Outcome<f64> {
    let path = dir.join(format!("machine-pop-{batch}.sqlite3"));
    let db = Database::Sqlite(path.clone());
    let result = (|| {
        let mut store = Store::open(&db, Access::Create)?;
        store.ensure_schema()?;
        Producer::open(&Database::Sqlite(path.clone()))?.insert_many(
            "foreman.bench",
            rows,
            None,
        )?;
        pop_back_to_back(&mut store, crate::store::Claim::any(batch))
    })();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    result
}

/// Rows/s of `store`'s cycle run back to back with `claim`, each recording the previous one's
/// attempts as done, until the queue is empty.
fn pop_back_to_back(store: &mut Store, claim: crate::store::Claim<'_>) -> Outcome<f64> {
    let mut ended: Vec<Ending> = Vec::new();
    let mut popped_rows = 0;
    let start = Instant::now();
    loop {
        let now = store.now();
        let popped = store.cycle(&ended, claim, now, |_| Resolved::Run((), None))?;
        ended = popped
            .tasks
            .into_iter()
            .map(|(task, ())| Ending {
                task,
                state: RunState::Done,
                finished_at: now,
                error: None,
                next: Next::Finished,
                leased: false,
                result: None,
                exit_code: None,
            })
            .collect();
        if ended.is_empty() {
            break;
        }
        popped_rows += ended.len();
    }
    Ok(popped_rows as f64 / start.elapsed().as_secs_f64())
}
