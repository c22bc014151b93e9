//! The PostgreSQL scenarios (`--db postgresql://…`): pg-cpu-per-task, the server's CPU per
//! drained task (measured during the drain-inproc runs, `postmaster`), and drain-scale, 1, 2 and
//! 4 daemons draining one queue.

use super::daemon::{self, Daemon};
use super::drain::{BENCH_TASK, PREFETCH, WORKERS, steady_rate};
use super::records::Records;
use super::report::{ScenarioReport, at_least, at_most};
use super::{Bench, Outcome, Scenario};

/// Skipped unless the bench runs on PostgreSQL.
fn postgres_only(bench: &Bench<'_>, scenario: Scenario) -> Option<ScenarioReport> {
    (!bench.postgres).then(|| {
        ScenarioReport::skipped(
            scenario,
            bench.sizes.reps,
            "PostgreSQL only: give --db postgresql://…".to_owned(),
        )
    })
}

pub(crate) fn pg_cpu_per_task(bench: &mut Bench<'_>) -> Outcome<ScenarioReport> {
    if let Some(skipped) = postgres_only(bench, Scenario::PgCpuPerTask) {
        return Ok(skipped);
    }
    let default = bench.inproc_runs(Scenario::PgCpuPerTask, 0)?;
    let prefetch = bench.inproc_runs(Scenario::PgCpuPerTask, PREFETCH)?;
    let server = |runs: &[super::drain::DrainRun]| -> Vec<f64> {
        runs.iter()
            .filter_map(|r| r.server_cpu_us_per_task)
            .collect()
    };
    let mut report = ScenarioReport::new(Scenario::PgCpuPerTask, bench.sizes.reps);
    if server(&default).is_empty() {
        return Ok(ScenarioReport::skipped(
            Scenario::PgCpuPerTask,
            bench.sizes.reps,
            "the PostgreSQL server does not run on this machine (its processes cannot be read)"
                .to_owned(),
        ));
    }
    report
        .figure(
            "default",
            "server CPU per task, default",
            "µs",
            &server(&default),
            at_most(20.0),
        )
        .figure(
            "prefetch_256",
            format!("server CPU per task, prefetch {PREFETCH}"),
            "µs",
            &server(&prefetch),
            at_most(20.0),
        )
        .extra("tasks", bench.sizes.drain_tasks)
        .note(
            "measured on the drain-inproc runs: schedstat CPU of the postmaster and all its \
             processes (backends, WAL writer, checkpointer, autovacuum) over the drain",
        );
    Ok(report)
}

pub(crate) fn drain_scale(bench: &mut Bench<'_>) -> Outcome<ScenarioReport> {
    if let Some(skipped) = postgres_only(bench, Scenario::DrainScale) {
        return Ok(skipped);
    }
    let reps = bench.sizes.reps;
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut ratio = Vec::new();
    for rep in 1..=reps {
        for (i, daemons) in [1, 2, 4].into_iter().enumerate() {
            bench.rep(
                Scenario::DrainScale,
                rep,
                &format!("{daemons} daemon(s), run"),
            );
            rates[i].push(bench.drain_with(daemons)?);
        }
        ratio.push(rates[1][rep - 1] / rates[0][rep - 1] * 100.0);
    }
    let mut report = ScenarioReport::new(Scenario::DrainScale, reps);
    report
        .figure(
            "two_vs_one",
            "2 daemons, % of 1 daemon's rate",
            "%",
            &ratio,
            at_least(100.0),
        )
        .figure("one_daemon", "1 daemon", "tasks/s", &rates[0], None)
        .figure("two_daemons", "2 daemons", "tasks/s", &rates[1], None)
        .figure("four_daemons", "4 daemons", "tasks/s", &rates[2], None)
        .extra("tasks", bench.sizes.drain_tasks)
        .extra("workers_per_daemon", WORKERS)
        .note("each daemon with the default settings (4 workers, no prefetch), on one server");
    Ok(report)
}

impl Bench<'_> {
    /// Aggregate tasks/s of `count` daemons draining `drain_tasks` in-process tasks queued
    /// together, first start to last over all of them; each task exactly once.
    fn drain_with(&mut self, count: usize) -> Outcome<f64> {
        let n = self.sizes.drain_tasks;
        let mut run = self.work.run(&daemon::config(WORKERS, 0, ""))?;
        let mut daemons: Vec<Daemon> = (0..count)
            .map(|_| run.spawn(self.work))
            .collect::<Outcome<_>>()?;
        let mut records = Records::new(run.out.clone());
        let warm = self.warm_up(&run, &mut daemons[0], &mut records, false)?;
        // Every daemon has connected and listens before the rows come.
        self.pause(std::time::Duration::from_millis(500))?;
        let ids = run.insert_many(BENCH_TASK, n, None)?;
        run.wake_now()?;
        let target = n + 1;
        self.wait_records(&mut daemons[0], &mut records, "started", target)?;
        for daemon in daemons {
            daemon.stop()?;
        }
        records.poll()?;
        let starts = records.exactly_once(ids, &[warm])?;
        steady_rate(starts.into_values())
    }
}
