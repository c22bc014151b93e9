//! The producer's side: how fast one producer enqueues while the daemon runs, one row per
//! transaction (plus the wakeup file) and many rows in one call, from Rust (the store's producer
//! connection, set up as schema.sql says) and from Python (the shipped client, timed inside the Python process). The
//! daemon runs every task, so these scenarios check exactly-once too.

use std::time::Instant;

use super::daemon::{self, Run};
use super::drain::{BENCH_TASK, WORKERS};
use super::python;
use super::records::Records;
use super::report::{ScenarioReport, at_least};
use super::{Bench, Failure, Outcome, Scenario};

/// How one producer inserts its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One INSERT per transaction, then the wakeup file if absent.
    OneByOne,
    /// Every row in one transaction, then the wakeup file.
    Batch,
}

/// Rows per second of each producer, one value per repetition.
struct Rates {
    rust: Vec<f64>,
    /// PostgreSQL: the same producer with each commit waiting for the WAL's flush.
    rust_durable: Vec<f64>,
    python: Vec<f64>,
}

impl Bench<'_> {
    fn enqueue_reps(&mut self, scenario: Scenario, mode: Mode, rows: usize) -> Outcome<Rates> {
        let mut rates = Rates {
            rust: Vec::new(),
            rust_durable: Vec::new(),
            python: Vec::new(),
        };
        for rep in 1..=self.sizes.reps {
            self.rep(scenario, rep, "run");
            let run = self.work.run(&daemon::config(WORKERS, 0, ""))?;
            let mut daemon = run.spawn(self.work)?;
            let mut records = Records::new(run.out.clone());
            let warm = self.warm_up(&run, &mut daemon, &mut records, false)?;
            let (mut ids, seconds) = match mode {
                Mode::OneByOne => rust_one_by_one(&run, rows)?,
                Mode::Batch => rust_batch(&run, rows)?,
            };
            rates.rust.push(rows as f64 / seconds);
            let target = records.len() + rows;
            self.wait_records(&mut daemon, &mut records, "started", target)?;
            if run.is_postgres() && mode == Mode::OneByOne {
                let durable = crate::store::Producer::open_with(&run.db, true)?;
                let start = Instant::now();
                for _ in 0..rows {
                    ids.push(durable.insert_name(BENCH_TASK)?);
                    run.wake_as("bench-rust")?;
                }
                run.wake_now()?;
                rates
                    .rust_durable
                    .push(rows as f64 / start.elapsed().as_secs_f64());
                let target = records.len() + rows;
                self.wait_records(&mut daemon, &mut records, "started", target)?;
            }
            if self.no_python_client.is_none() {
                let method = match mode {
                    Mode::OneByOne => "enqueue",
                    Mode::Batch => "enqueue_many",
                };
                let done = python::enqueue(self.work.root(), &run.db.as_os_str(), method, rows)?;
                if done.ids.len() != rows {
                    return Err(Failure::new(format!(
                        "the Python producer returned {} ids for {rows} rows",
                        done.ids.len()
                    )));
                }
                rates.python.push(rows as f64 / done.seconds);
                ids.extend(done.ids);
                let target = records.len() + rows;
                self.wait_records(&mut daemon, &mut records, "started", target)?;
            }
            daemon.stop()?;
            records.poll()?;
            records.exactly_once(ids, &[warm])?;
        }
        Ok(rates)
    }
}

/// One INSERT per transaction (autocommit), each followed by the wakeup file if it is absent
/// (PostgreSQL: `NOTIFY foreman`, at most one per 100 ms, and one after the last row).
fn rust_one_by_one(run: &Run, rows: usize) -> Outcome<(Vec<i64>, f64)> {
    let producer = run.conn()?;
    let mut ids = Vec::with_capacity(rows);
    let start = Instant::now();
    for _ in 0..rows {
        ids.push(producer.insert_name(BENCH_TASK)?);
        run.wake_as("bench-rust")?;
    }
    run.wake_now()?;
    Ok((ids, start.elapsed().as_secs_f64()))
}

/// Every row in one transaction with one prepared statement, then the wakeup file.
fn rust_batch(run: &Run, rows: usize) -> Outcome<(Vec<i64>, f64)> {
    let producer = run.conn()?;
    let start = Instant::now();
    let last = producer.in_transaction(|p| {
        for _ in 0..rows {
            p.append_name(BENCH_TASK)?;
        }
        Ok(p.last_id())
    })?;
    run.wake_now()?;
    run.wake_as("bench-rust")?;
    let seconds = start.elapsed().as_secs_f64();
    // Consecutive: the transaction held the write lock from BEGIN IMMEDIATE to COMMIT.
    let first = last - i64::try_from(rows).map_err(|_| Failure::new("too many rows"))? + 1;
    Ok(((first..=last).collect(), seconds))
}

fn report(
    bench: &Bench<'_>,
    scenario: Scenario,
    rates: &Rates,
    target: Option<super::report::Target>,
) -> ScenarioReport {
    let mut report = ScenarioReport::new(scenario, bench.sizes.reps);
    let rust = if bench.postgres {
        "Rust (synchronous_commit = off)"
    } else {
        "Rust"
    };
    report
        .figure("rust", rust, "rows/s", &rates.rust, target)
        .figure(
            "rust_durable",
            "Rust, each commit flushed",
            "rows/s",
            &rates.rust_durable,
            None,
        )
        .figure(
            "python",
            "Python (foreman_client)",
            "rows/s",
            &rates.python,
            target,
        );
    if let Some(why) = &bench.no_python_client {
        report.note(format!("Python figures skipped: {why}"));
    }
    report
}

pub(crate) fn enqueue(bench: &mut Bench<'_>) -> Outcome<ScenarioReport> {
    let rows = bench.sizes.enqueue_rows;
    let rates = bench.enqueue_reps(Scenario::Enqueue, Mode::OneByOne, rows)?;
    let target = bench.target(at_least(8_000.0), at_least(5_000.0));
    let mut report = report(bench, Scenario::Enqueue, &rates, target);
    report.extra("rows", rows);
    Ok(report)
}

pub(crate) fn enqueue_batch(bench: &mut Bench<'_>) -> Outcome<ScenarioReport> {
    let rows = bench.sizes.batch_rows;
    let rates = bench.enqueue_reps(Scenario::EnqueueBatch, Mode::Batch, rows)?;
    let target = bench.target(at_least(200_000.0), None);
    let mut report = report(bench, Scenario::EnqueueBatch, &rates, target);
    report.extra("rows", rows);
    Ok(report)
}
