//! The producer's side: how fast one producer enqueues while the daemon runs, one row per
//! transaction (plus the wakeup file) and many rows in one call, from Rust (the store's producer
//! connection, set up as schema.sql says) and from Python (the shipped client, timed inside the Python process). The
//! daemon runs every task, so these scenarios check exactly-once too.

use std::time::Instant;

use super::daemon::{self, Run, touch_if_absent};
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
    python: Vec<f64>,
}

impl Bench<'_> {
    fn enqueue_reps(&mut self, scenario: Scenario, mode: Mode, rows: usize) -> Outcome<Rates> {
        let mut rates = Rates {
            rust: Vec::new(),
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
            if self.no_python.is_none() {
                let method = match mode {
                    Mode::OneByOne => "enqueue",
                    Mode::Batch => "enqueue_many",
                };
                let done = python::enqueue(self.work.root(), &run.db, method, rows)?;
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

/// One INSERT per transaction (autocommit), each followed by the wakeup file if it is absent.
fn rust_one_by_one(run: &Run, rows: usize) -> Outcome<(Vec<i64>, f64)> {
    let wakeup = run.wakeup.join("bench-rust");
    let producer = run.conn()?;
    let mut ids = Vec::with_capacity(rows);
    let start = Instant::now();
    for _ in 0..rows {
        ids.push(producer.insert_name(BENCH_TASK)?);
        touch_if_absent(&wakeup)?;
    }
    Ok((ids, start.elapsed().as_secs_f64()))
}

/// Every row in one transaction with one prepared statement, then the wakeup file.
fn rust_batch(run: &Run, rows: usize) -> Outcome<(Vec<i64>, f64)> {
    let wakeup = run.wakeup.join("bench-rust");
    let producer = run.conn()?;
    let start = Instant::now();
    let last = producer.in_transaction(|p| {
        for _ in 0..rows {
            p.append_name(BENCH_TASK)?;
        }
        Ok(p.last_id())
    })?;
    touch_if_absent(&wakeup)?;
    let seconds = start.elapsed().as_secs_f64();
    // Consecutive: the transaction held the write lock from BEGIN IMMEDIATE to COMMIT.
    let first = last - i64::try_from(rows).map_err(|_| Failure::new("too many rows"))? + 1;
    Ok(((first..=last).collect(), seconds))
}

fn report(bench: &Bench<'_>, scenario: Scenario, rates: &Rates, target: f64) -> ScenarioReport {
    let mut report = ScenarioReport::new(scenario, bench.sizes.reps);
    report
        .figure("rust", "Rust", "rows/s", &rates.rust, at_least(target))
        .figure(
            "python",
            "Python (foreman_client)",
            "rows/s",
            &rates.python,
            at_least(target),
        );
    if let Some(why) = &bench.no_python {
        report.note(format!("Python figures skipped: {why}"));
    }
    report
}

pub(crate) fn enqueue(bench: &mut Bench<'_>) -> Outcome<ScenarioReport> {
    let rows = bench.sizes.enqueue_rows;
    let rates = bench.enqueue_reps(Scenario::Enqueue, Mode::OneByOne, rows)?;
    let mut report = report(bench, Scenario::Enqueue, &rates, 8_000.0);
    report.extra("rows", rows);
    Ok(report)
}

pub(crate) fn enqueue_batch(bench: &mut Bench<'_>) -> Outcome<ScenarioReport> {
    let rows = bench.sizes.batch_rows;
    let rates = bench.enqueue_reps(Scenario::EnqueueBatch, Mode::Batch, rows)?;
    let mut report = report(bench, Scenario::EnqueueBatch, &rates, 200_000.0);
    report.extra("rows", rows);
    Ok(report)
}
