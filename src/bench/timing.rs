//! The time scenarios: enqueue → start latency at an idle daemon, how late delayed tasks start,
//! spawn → first task, and the CPU an idle daemon burns. Times cross processes, so both sides
//! use the wall clock (Unix time): the producer (this process) takes it just before its INSERT,
//! the task when it starts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::daemon::{self, Daemon, Run};
use super::drain::{BENCH_TASK, WORKERS};
use super::python::{self, POOL_TASK};
use super::records::Records;
use super::report::{ScenarioReport, at_most};
use super::{Bench, Failure, Outcome, Scenario, percentile};
use crate::clock::unix_now;

/// Between two latency tasks: long enough for the daemon to be idle again.
const LATENCY_SPACING: Duration = Duration::from_millis(20);
/// The daemon settles after its start (pool processes, first heartbeat) before idle measurements.
const SETTLE: Duration = Duration::from_secs(1);
/// How early a delayed task may seem to start: the record's µs truncation and the f64 rounding
/// of a Unix time in µs. Anything earlier is a task run before its `run_after`: a failure.
const EARLY_TOLERANCE_S: f64 = 10e-6;

/// p50 and p99 in ms of one repetition.
type Quantiles = (f64, f64);

fn quantiles_ms(mut seconds: Vec<f64>) -> Quantiles {
    seconds.sort_by(f64::total_cmp);
    (
        percentile(&seconds, 50) * 1e3,
        percentile(&seconds, 99) * 1e3,
    )
}

impl Bench<'_> {
    /// One latency repetition: `n` tasks 20 ms apart at an idle daemon. With `pool`, Python tasks
    /// keyed 1..=n on a pool of `WORKERS` processes.
    fn latency_once(&mut self, pool: bool) -> Outcome<Quantiles> {
        let n = self.sizes.latency_tasks;
        let extra = if pool {
            python::pool_config(WORKERS)
        } else {
            String::new()
        };
        let run = self.work.run(&daemon::config(WORKERS, 0, &extra))?;
        let mut daemon = run.spawn(self.work)?;
        let mut records = Records::new(run.out.clone());
        let warm = self.warm_up(&run, &mut daemon, &mut records, pool)?;
        self.pause(SETTLE)?;
        let enqueued = self.trickle(&run, &mut daemon, n, pool)?;
        let target = records.len() + n;
        self.wait_records(&mut daemon, &mut records, "started", target)?;
        daemon.stop()?;
        records.poll()?;
        let starts = records.exactly_once(enqueued.keys().copied(), &[warm])?;
        Ok(quantiles_ms(
            enqueued.iter().map(|(id, at)| starts[id] - at).collect(),
        ))
    }

    /// Enqueues `n` tasks 20 ms apart as a producer does (INSERT, then the wakeup file if
    /// absent); returns each one's id (pool: key) with the time taken just before its INSERT.
    fn trickle(
        &mut self,
        run: &Run,
        daemon: &mut Daemon,
        n: usize,
        pool: bool,
    ) -> Outcome<HashMap<i64, f64>> {
        let producer = run.conn()?;
        let mut enqueued = HashMap::with_capacity(n);
        let start = Instant::now();
        for i in 1..=n {
            let key = i64::try_from(i).map_err(|_| Failure::new("too many tasks"))?;
            let (name, args) = if pool {
                (POOL_TASK, format!("[{key}]"))
            } else {
                (BENCH_TASK, "[]".to_owned())
            };
            let at = unix_now();
            let id = producer.insert_one(name, &args)?;
            // 20 ms apart, the 100 ms debounce would hold most NOTIFYs back: each one is sent,
            // as one producer per task (a web request each) would.
            if run.is_postgres() {
                run.wake_now()?;
            } else {
                run.wake_as("bench")?;
            }
            enqueued.insert(if pool { key } else { id }, at);
            self.progress.show(&format!("enqueued {i} of {n}"));
            daemon.check_alive()?;
            // Paced from the start, so that a slow step does not shift every later one.
            let next = LATENCY_SPACING * u32::try_from(i).unwrap_or(u32::MAX);
            self.pause(next.saturating_sub(start.elapsed()))?;
        }
        Ok(enqueued)
    }
}

pub(crate) fn latency(bench: &mut Bench<'_>) -> Outcome<ScenarioReport> {
    let reps = bench.sizes.reps;
    let (mut inproc, mut pool) = (Vec::new(), Vec::new());
    for rep in 1..=reps {
        bench.rep(Scenario::Latency, rep, "in-process run");
        inproc.push(bench.latency_once(false)?);
    }
    if bench.no_python.is_none() {
        for rep in 1..=reps {
            bench.rep(Scenario::Latency, rep, "Python pool run");
            pool.push(bench.latency_once(true)?);
        }
    }
    let p50 = |q: &[Quantiles]| q.iter().map(|q| q.0).collect::<Vec<_>>();
    let p99 = |q: &[Quantiles]| q.iter().map(|q| q.1).collect::<Vec<_>>();
    let mut report = ScenarioReport::new(Scenario::Latency, reps);
    report
        .figure(
            "p50",
            "in-process, p50",
            "ms",
            &p50(&inproc),
            bench.target(at_most(0.5), at_most(2.0)),
        )
        .figure(
            "p99",
            "in-process, p99",
            "ms",
            &p99(&inproc),
            bench.target(at_most(2.0), at_most(10.0)),
        )
        .figure("pool_p50", "Python pool, p50", "ms", &p50(&pool), None)
        .figure("pool_p99", "Python pool, p99", "ms", &p99(&pool), None)
        .extra("tasks", bench.sizes.latency_tasks)
        .extra("spacing_ms", 20);
    if let Some(why) = &bench.no_python {
        report.note(format!("Python pool figures skipped: {why}"));
    }
    Ok(report)
}

pub(crate) fn delay(bench: &mut Bench<'_>) -> Outcome<ScenarioReport> {
    let reps = bench.sizes.reps;
    let mut lateness = Vec::new();
    for rep in 1..=reps {
        bench.rep(Scenario::Delay, rep, "run");
        lateness.push(bench.delay_once()?);
    }
    let mut report = ScenarioReport::new(Scenario::Delay, reps);
    report
        .figure(
            "p50",
            "lateness after run_after, p50",
            "ms",
            &lateness.iter().map(|q| q.0).collect::<Vec<_>>(),
            at_most(1.0),
        )
        .figure(
            "p99",
            "lateness after run_after, p99",
            "ms",
            &lateness.iter().map(|q| q.1).collect::<Vec<_>>(),
            at_most(5.0),
        )
        .extra("tasks", bench.sizes.delay_tasks)
        .extra("spread_seconds", bench.sizes.delay_spread.as_secs_f64());
    Ok(report)
}

impl Bench<'_> {
    /// Delayed tasks due over the next `delay_spread`, enqueued in one transaction at an idle
    /// daemon; how long after its `run_after` each one started.
    fn delay_once(&mut self) -> Outcome<Quantiles> {
        let n = self.sizes.delay_tasks;
        let spread = self.sizes.delay_spread.as_secs_f64();
        let run = self.work.run(&daemon::config(WORKERS, 0, ""))?;
        let mut daemon = run.spawn(self.work)?;
        let mut records = Records::new(run.out.clone());
        let warm = self.warm_up(&run, &mut daemon, &mut records, false)?;
        let base = unix_now() + 0.2;
        let due = run.conn()?.in_transaction(|p| {
            let mut due = HashMap::with_capacity(n);
            for i in 0..n {
                let at = base + spread * i as f64 / n as f64;
                due.insert(p.insert_due_at(BENCH_TASK, at)?, at);
            }
            Ok(due)
        })?;
        run.wake()?;
        let target = records.len() + n;
        self.wait_records(&mut daemon, &mut records, "started", target)?;
        daemon.stop()?;
        records.poll()?;
        let starts = records.exactly_once(due.keys().copied(), &[warm])?;
        let mut late = Vec::with_capacity(n);
        for (id, at) in &due {
            let lateness = starts[id] - at;
            if lateness < -EARLY_TOLERANCE_S {
                return Err(Failure::new(format!(
                    "task {id} started {:.3} ms before its run_after",
                    -lateness * 1e3
                )));
            }
            late.push(lateness.max(0.0));
        }
        Ok(quantiles_ms(late))
    }
}

pub(crate) fn startup(bench: &mut Bench<'_>) -> Outcome<ScenarioReport> {
    let reps = bench.sizes.reps;
    let mut millis = Vec::new();
    for rep in 1..=reps {
        bench.rep(Scenario::Startup, rep, "run");
        let run = bench.work.run(&daemon::config(WORKERS, 0, ""))?;
        let id = run.insert_one(BENCH_TASK, "[]")?;
        let mut records = Records::new(run.out.clone());
        let spawned = unix_now();
        let mut daemon = run.spawn(bench.work)?;
        bench.wait_records(&mut daemon, &mut records, "started", 1)?;
        daemon.stop()?;
        records.poll()?;
        let starts = records.exactly_once([id], &[])?;
        millis.push((starts[&id] - spawned) * 1e3);
    }
    let mut report = ScenarioReport::new(Scenario::Startup, reps);
    report.figure(
        "spawn_to_first_start",
        "spawn → first task started",
        "ms",
        &millis,
        bench.target(at_most(20.0), None),
    );
    Ok(report)
}

pub(crate) fn idle(bench: &mut Bench<'_>) -> Outcome<ScenarioReport> {
    let reps = bench.sizes.reps;
    let window = bench.sizes.idle_window;
    let mut cpu = Vec::new();
    let mut queries = Vec::new();
    for rep in 1..=reps {
        bench.rep(Scenario::Idle, rep, "run");
        let run = bench.work.run(&daemon::config(WORKERS, 0, ""))?;
        let mut daemon = run.spawn(bench.work)?;
        let mut records = Records::new(run.out.clone());
        let warm = bench.warm_up(&run, &mut daemon, &mut records, false)?;
        bench.pause(SETTLE)?;
        let transactions = || super::postmaster::transactions(&run);
        let transactions_before = if run.is_postgres() {
            Some(transactions()?)
        } else {
            None
        };
        let before = daemon.cpu_ns()?;
        let start = Instant::now();
        while start.elapsed() < window {
            let left = window.saturating_sub(start.elapsed());
            bench
                .progress
                .show(&format!("idle, {}s left", left.as_secs()));
            bench.pause(left.min(Duration::from_millis(500)))?;
        }
        let after = daemon.cpu_ns()?;
        if let Some(before) = transactions_before {
            // The two readings are the bench's own transactions; the rest are the daemon's
            // statements (the server counts each autocommit statement as one).
            let daemon_queries = transactions()? - before - 2.0;
            queries.push(daemon_queries.max(0.0) / start.elapsed().as_secs_f64());
        }
        daemon.check_alive()?;
        daemon.stop()?;
        records.poll()?;
        records.exactly_once([], &[warm])?;
        cpu.push(after.saturating_sub(before) as f64 / 1e9);
    }
    let mut report = ScenarioReport::new(Scenario::Idle, reps);
    report
        .figure(
            "cpu_seconds",
            format!("daemon CPU over {}s idle, tick 1s", window.as_secs()),
            "s",
            &cpu,
            bench.target(at_most(0.001), at_most(0.002)),
        )
        .figure(
            "queries_per_s",
            "statements per second (PostgreSQL server's count)",
            "/s",
            &queries,
            at_most(1.0),
        )
        .extra("window_seconds", window.as_secs_f64());
    Ok(report)
}
