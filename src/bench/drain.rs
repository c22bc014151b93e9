//! The throughput scenarios: drains of queued tasks (in-process, Python pool, `/bin/true`
//! commands), the daemon's CPU per task and peak RSS read from the in-process drains, and the
//! drain rate at depth. Each drain is timed from the first task's recorded start to the last one's,
//! so the daemon's startup and the producer's insert are not in the rate.

use std::time::{Duration, Instant};

use super::daemon::{self, Daemon, Run};
use super::python::{self, POOL_TASK};
use super::records::Records;
use super::report::{ScenarioReport, at_least, at_most};
use super::{Bench, Failure, Outcome, Scenario};

/// The daemon's default.
pub(crate) const WORKERS: usize = 4;
/// The prefetch drain-inproc and cpu-per-task compare with the default (0).
pub(crate) const PREFETCH: usize = 256;
/// The built-in task that records its start.
pub(crate) const BENCH_TASK: &str = "foreman.bench";
const POOL_PROCESSES: usize = 4;
/// drain-command's task: a program that cannot record anything.
const TRUE: &str = "/bin/true";

/// One in-process drain.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DrainRun {
    /// Tasks/s, first start to last.
    pub rate: f64,
    /// Daemon CPU over the drain ÷ tasks.
    pub cpu_us_per_task: f64,
    /// VmHWM once the drain is over.
    pub peak_rss_mib: f64,
    /// PostgreSQL's CPU over the drain ÷ tasks (its server's processes), when it runs here.
    pub server_cpu_us_per_task: Option<f64>,
}

/// Tasks per second from the first start to the last of `starts`.
pub(crate) fn steady_rate(starts: impl IntoIterator<Item = f64>) -> Outcome<f64> {
    let mut times: Vec<f64> = starts.into_iter().collect();
    times.sort_by(f64::total_cmp);
    match (times.first(), times.last()) {
        (Some(first), Some(last)) if last > first => Ok((times.len() - 1) as f64 / (last - first)),
        _ => Err(Failure::new(format!(
            "{} starts are too few, or too close together, to make a rate",
            times.len()
        ))),
    }
}

impl Bench<'_> {
    /// Runs a `foreman.bench` task (or a pool's, with `pool`) and waits for its record: the
    /// daemon is up and popping. Returns its id (its key 0 for a pool task).
    pub(crate) fn warm_up(
        &mut self,
        run: &Run,
        daemon: &mut Daemon,
        records: &mut Records,
        pool: bool,
    ) -> Outcome<i64> {
        let id = if pool {
            run.insert_one(POOL_TASK, "[0]")?;
            0
        } else {
            run.insert_one(BENCH_TASK, "[]")?
        };
        run.wake()?;
        let target = records.len() + 1;
        self.wait_records(daemon, records, "warm-up", target)?;
        Ok(id)
    }

    /// Sets the progress line's context to the scenario's repetition.
    pub(crate) fn rep(&mut self, scenario: Scenario, rep: usize, what: &str) {
        let reps = self.sizes.reps;
        self.progress
            .context(format!("{} {what} {rep}/{reps}", scenario.name()));
    }

    /// The in-process drains with `prefetch`, run once and shared by the scenarios that read them.
    pub(crate) fn inproc_runs(
        &mut self,
        scenario: Scenario,
        prefetch: usize,
    ) -> Outcome<Vec<DrainRun>> {
        if let Some(runs) = self.inproc.get(&prefetch) {
            return Ok(runs.clone());
        }
        let mut runs = Vec::new();
        for rep in 1..=self.sizes.reps {
            self.rep(scenario, rep, &format!("prefetch {prefetch}, run"));
            runs.push(self.drain_inproc_once(prefetch)?);
        }
        self.inproc.insert(prefetch, runs.clone());
        Ok(runs)
    }

    pub(crate) fn drain_inproc_once(&mut self, prefetch: usize) -> Outcome<DrainRun> {
        let n = self.sizes.drain_tasks;
        let mut run = self.work.run(&daemon::config(WORKERS, prefetch, ""))?;
        let mut daemon = run.spawn(self.work)?;
        let mut records = Records::new(run.out.clone());
        let warm = self.warm_up(&run, &mut daemon, &mut records, false)?;
        let ids = run.insert_many(BENCH_TASK, n, None)?;
        let server = super::postmaster::Server::of(&run);
        let server_before = server
            .as_ref()
            .map(super::postmaster::Server::cpu_ns)
            .transpose()?;
        let cpu_before = daemon.cpu_ns()?;
        run.wake()?;
        self.wait_records(&mut daemon, &mut records, "started", n + 1)?;
        let cpu_after = daemon.cpu_ns()?;
        let server_after = server
            .as_ref()
            .map(super::postmaster::Server::cpu_ns)
            .transpose()?;
        let peak_kib = daemon.peak_rss_kib()?;
        daemon.stop()?;
        records.poll()?;
        let starts = records.exactly_once(ids, &[warm])?;
        Ok(DrainRun {
            rate: steady_rate(starts.into_values())?,
            cpu_us_per_task: cpu_after.saturating_sub(cpu_before) as f64 / 1e3 / n as f64,
            peak_rss_mib: peak_kib as f64 / 1024.0,
            server_cpu_us_per_task: server_before
                .zip(server_after)
                .map(|(before, after)| after.saturating_sub(before) as f64 / 1e3 / n as f64),
        })
    }
}

pub(crate) fn drain_inproc(bench: &mut Bench<'_>) -> Outcome<ScenarioReport> {
    let default = bench.inproc_runs(Scenario::DrainInproc, 0)?;
    let prefetch = bench.inproc_runs(Scenario::DrainInproc, PREFETCH)?;
    let rates = |runs: &[DrainRun]| runs.iter().map(|r| r.rate).collect::<Vec<_>>();
    let mut report = ScenarioReport::new(Scenario::DrainInproc, bench.sizes.reps);
    report
        .figure(
            "default",
            "default (pop ≤ free slots)",
            "tasks/s",
            &rates(&default),
            bench.target(at_least(30_000.0), at_least(10_000.0)),
        )
        .figure(
            "prefetch_256",
            format!("prefetch = {PREFETCH}"),
            "tasks/s",
            &rates(&prefetch),
            bench.target(at_least(150_000.0), at_least(50_000.0)),
        );
    // The same rates against what the machine's pop transaction allows (measured at the start
    // of this run): how far foreman is from its database, whatever the machine.
    let (limit_4, limit_256) = bench
        .machine
        .pg_pop_limit
        .unwrap_or((bench.machine.pop_limit_4, bench.machine.pop_limit_256));
    report
        .figure(
            "default_share_of_pop_limit",
            "default, % of the 4-row pop limit",
            "%",
            &share(&rates(&default), limit_4),
            bench.target(at_least(80.0), None),
        )
        .figure(
            "prefetch_256_share_of_pop_limit",
            format!("prefetch {PREFETCH}, % of the {PREFETCH}-row limit"),
            "%",
            &share(&rates(&prefetch), limit_256),
            None,
        )
        .extra("tasks", bench.sizes.drain_tasks)
        .extra("workers", WORKERS);
    Ok(report)
}

/// Each rate as a percentage of `limit`.
fn share(rates: &[f64], limit: f64) -> Vec<f64> {
    rates.iter().map(|rate| 100.0 * rate / limit).collect()
}

pub(crate) fn cpu_per_task(bench: &mut Bench<'_>) -> Outcome<ScenarioReport> {
    let default = bench.inproc_runs(Scenario::CpuPerTask, 0)?;
    let prefetch = bench.inproc_runs(Scenario::CpuPerTask, PREFETCH)?;
    let cpu = |runs: &[DrainRun]| runs.iter().map(|r| r.cpu_us_per_task).collect::<Vec<_>>();
    let mut report = ScenarioReport::new(Scenario::CpuPerTask, bench.sizes.reps);
    report
        .figure(
            "default",
            "daemon CPU per task, default",
            "µs",
            &cpu(&default),
            bench.target(at_most(10.0), None),
        )
        .figure(
            "prefetch_256",
            format!("daemon CPU per task, prefetch {PREFETCH}"),
            "µs",
            &cpu(&prefetch),
            bench.target(at_most(10.0), None),
        )
        .extra("tasks", bench.sizes.drain_tasks)
        .note("measured on the drain-inproc runs: schedstat CPU of the daemon's threads");
    Ok(report)
}

pub(crate) fn rss(bench: &mut Bench<'_>) -> Outcome<ScenarioReport> {
    let default = bench.inproc_runs(Scenario::Rss, 0)?;
    let peaks: Vec<f64> = default.iter().map(|r| r.peak_rss_mib).collect();
    let n = super::report::number(bench.sizes.drain_tasks as f64);
    let mut report = ScenarioReport::new(Scenario::Rss, bench.sizes.reps);
    report
        .figure(
            "peak_rss",
            format!("peak RSS (VmHWM) after a {n} drain"),
            "MiB",
            &peaks,
            bench.target(at_most(8.0), None),
        )
        .extra("tasks", bench.sizes.drain_tasks);
    Ok(report)
}

pub(crate) fn drain_pool(bench: &mut Bench<'_>) -> Outcome<ScenarioReport> {
    let reps = bench.sizes.reps;
    if let Some(why) = &bench.no_python {
        return Ok(ScenarioReport::skipped(
            Scenario::DrainPool,
            reps,
            why.clone(),
        ));
    }
    let (mut rates, mut cpu) = (Vec::new(), Vec::new());
    let (mut piped_rates, mut piped_cpu) = (Vec::new(), Vec::new());
    // Alternated, so that both see the same machine.
    for rep in 1..=reps {
        bench.rep(Scenario::DrainPool, rep, "run");
        let (rate, us) = bench.drain_pool_once(false)?;
        rates.push(rate);
        cpu.push(us);
        bench.rep(Scenario::DrainPool, rep, "pipelined run");
        let (rate, us) = bench.drain_pool_once(true)?;
        piped_rates.push(rate);
        piped_cpu.push(us);
    }
    let mut report = ScenarioReport::new(Scenario::DrainPool, reps);
    report
        .figure(
            "tasks_per_s",
            format!("Python pool of {POOL_PROCESSES}"),
            "tasks/s",
            &rates,
            at_least(15_000.0),
        )
        .figure(
            "daemon_cpu_per_task",
            "daemon CPU per pool task",
            "µs",
            &cpu,
            at_most(15.0),
        )
        .figure(
            "pipelined_tasks_per_s",
            format!("Python pool of {POOL_PROCESSES}, pipelined"),
            "tasks/s",
            &piped_rates,
            at_least(15_000.0),
        )
        .figure(
            "pipelined_daemon_cpu_per_task",
            "daemon CPU per pool task, pipelined",
            "µs",
            &piped_cpu,
            at_most(15.0),
        )
        .extra("tasks", bench.sizes.drain_tasks)
        .extra("processes", POOL_PROCESSES);
    Ok(report)
}

impl Bench<'_> {
    /// One drain of Python tasks on a pool of `POOL_PROCESSES` (`pipeline = true` with
    /// `pipelined`): tasks/s, and the daemon's CPU µs per task.
    fn drain_pool_once(&mut self, pipelined: bool) -> Outcome<(f64, f64)> {
        let n = self.sizes.drain_tasks;
        let mut pool = python::pool_config(POOL_PROCESSES);
        if pipelined {
            pool.push_str("pipeline = true\n");
        }
        let mut run = self.work.run(&daemon::config(WORKERS, 0, &pool))?;
        let mut daemon = run.spawn(self.work)?;
        let mut records = Records::new(run.out.clone());
        self.warm_up(&run, &mut daemon, &mut records, true)?;
        // The first hello routed the warm-up; give the other processes, started at the same
        // moment, time to say theirs, so that the drain runs on all four.
        self.pause(Duration::from_millis(300))?;
        let keys = 1..=i64::try_from(n).map_err(|_| Failure::new("too many tasks"))?;
        let cpu_before = daemon.cpu_ns()?;
        run.insert_many(POOL_TASK, n, Some(1))?;
        run.wake()?;
        self.wait_records(&mut daemon, &mut records, "started", n + 1)?;
        // The daemon's own threads (loop, drivers, readers), not the Python processes'.
        let cpu_after = daemon.cpu_ns()?;
        daemon.stop()?;
        records.poll()?;
        let starts = records.exactly_once(keys, &[0])?;
        Ok((
            steady_rate(starts.into_values())?,
            cpu_after.saturating_sub(cpu_before) as f64 / 1e3 / n as f64,
        ))
    }
}

pub(crate) fn drain_command(bench: &mut Bench<'_>) -> Outcome<ScenarioReport> {
    let reps = bench.sizes.reps;
    let n = bench.sizes.command_tasks;
    let (mut command, mut bare, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 1..=reps {
        bench.rep(Scenario::DrainCommand, rep, "run");
        let rate = bench.drain_command_once(n)?;
        bench.progress.show("bare spawn loop");
        let spawns = bare_spawn(n, WORKERS)?;
        command.push(rate);
        bare.push(spawns);
        ratio.push(rate / spawns * 100.0);
    }
    let mut report = ScenarioReport::new(Scenario::DrainCommand, reps);
    report
        .figure(
            "vs_bare",
            format!("{TRUE} tasks vs bare spawns"),
            "%",
            &ratio,
            at_least(80.0),
        )
        .figure(
            "tasks_per_s",
            format!("{TRUE} tasks (counted at the pop)"),
            "tasks/s",
            &command,
            None,
        )
        .figure(
            "bare_spawns_per_s",
            format!("bare spawn loop, {WORKERS} threads"),
            "spawns/s",
            &bare,
            None,
        )
        .extra("tasks", n)
        .extra("counted_by", "pop")
        .note(format!(
            "{TRUE} cannot record its start: a task counts when its row is popped (gone from \
             foreman_task), and the run checks foreman_run for one done attempt per task"
        ));
    Ok(report)
}

impl Bench<'_> {
    /// Tasks/s from the commit of `n` command rows to the pop of the last.
    fn drain_command_once(&mut self, n: usize) -> Outcome<f64> {
        let extra = format!("[tasks.\"bench.true\"]\ncommand = [\"{TRUE}\"]\n");
        let mut run = self.work.run(&daemon::config(WORKERS, 0, &extra))?;
        let mut daemon = run.spawn(self.work)?;
        let mut records = Records::new(run.out.clone());
        let warm = self.warm_up(&run, &mut daemon, &mut records, false)?;
        let ids = run.insert_many("bench.true", n, None)?;
        let start = Instant::now();
        run.wake()?;
        let interval = Duration::from_millis(2);
        self.wait_for(&mut daemon, "popped", n, interval, || {
            Ok(n.saturating_sub(run.queued(&ids)?))
        })?;
        let took = start.elapsed();
        let interval = Duration::from_millis(20);
        self.wait_for(&mut daemon, "recorded done", n, interval, || {
            run.attempts(&ids).map(|a| a.done)
        })?;
        daemon.stop()?;
        let seen = run.attempts(&ids)?;
        if seen.count != n || seen.tasks != n || seen.done != n {
            return Err(Failure::new(format!(
                "exactly-once check failed: {n} command tasks made {} attempts of {} distinct \
                 tasks, {} done",
                seen.count, seen.tasks, seen.done
            )));
        }
        records.poll()?;
        records.exactly_once([], &[warm])?;
        Ok(n as f64 / took.as_secs_f64())
    }
}

/// `n` spawns of `/bin/true`, `threads` at a time, without foreman: what drain-command compares to.
fn bare_spawn(n: usize, threads: usize) -> Outcome<f64> {
    let start = Instant::now();
    let per_thread = n.div_ceil(threads);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || -> Result<(), String> {
                for _ in 0..per_thread {
                    let status = std::process::Command::new(TRUE)
                        .status()
                        .map_err(|e| format!("cannot run {TRUE}: {e}"))?;
                    if !status.success() {
                        return Err(format!("{TRUE} {}", crate::command::describe(status)));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for worker in workers {
        worker
            .join()
            .map_err(|_| Failure::new("a spawn thread panicked"))?
            .map_err(Failure::new)?;
    }
    Ok((per_thread * threads) as f64 / start.elapsed().as_secs_f64())
}

pub(crate) fn depth(bench: &mut Bench<'_>) -> Outcome<ScenarioReport> {
    let reps = bench.sizes.reps;
    let (shallow_rows, deep_rows) = bench.sizes.depth_rows;
    let (mut shallow, mut deep, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 1..=reps {
        bench.rep(Scenario::Depth, rep, "run");
        let low = bench.drain_at_depth(shallow_rows)?;
        let high = bench.drain_at_depth(deep_rows)?;
        shallow.push(low);
        deep.push(high);
        ratio.push(high / low * 100.0);
    }
    let n = bench.sizes.drain_tasks;
    let label = |rows: usize| format!("rate, {} queued behind", super::report::number(rows as f64));
    let mut report = ScenarioReport::new(Scenario::Depth, reps);
    report
        .figure(
            "deep_vs_shallow",
            format!(
                "rate with {} vs {} queued",
                super::report::number(deep_rows as f64),
                super::report::number(shallow_rows as f64)
            ),
            "%",
            &ratio,
            at_least(90.0),
        )
        .figure(
            "shallow_tasks_per_s",
            label(shallow_rows),
            "tasks/s",
            &shallow,
            None,
        )
        .figure("deep_tasks_per_s", label(deep_rows), "tasks/s", &deep, None)
        .extra("tasks", n)
        .extra("shallow_rows", shallow_rows)
        .extra("deep_rows", deep_rows);
    Ok(report)
}

impl Bench<'_> {
    /// Drain rate of the first `drain_tasks` in-process tasks with `behind` more queued after
    /// them; the daemon is stopped once they started, leaving the rest queued.
    fn drain_at_depth(&mut self, behind: usize) -> Outcome<f64> {
        let n = self.sizes.drain_tasks;
        let mut run = self.work.run(&daemon::config(WORKERS, 0, ""))?;
        self.progress.show(&format!(
            "queueing {} rows",
            super::report::number((n + behind) as f64)
        ));
        let ids = run.insert_many(BENCH_TASK, n + behind, None)?;
        let mut daemon = run.spawn(self.work)?;
        let mut records = Records::new(run.out.clone());
        self.wait_records(&mut daemon, &mut records, "started", n)?;
        daemon.stop()?;
        records.poll()?;
        let starts = records.at_most_once(&ids, &[])?;
        let left = run.queued(&ids)?;
        if starts.len() + left != n + behind {
            return Err(Failure::new(format!(
                "exactly-once check failed: of {} tasks, {} started and {left} are still queued",
                n + behind,
                starts.len()
            )));
        }
        let mut times: Vec<f64> = starts.into_values().collect();
        times.sort_by(f64::total_cmp);
        times.truncate(n);
        steady_rate(times)
    }
}
