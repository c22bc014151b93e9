//! The loop's work on tasks: popping what is due into free slots (each row resolved to a handler,
//! a dead letter, or "not yet"), handing tasks to the workers, and turning what they report into
//! endings, retries and dead letters for the next cycle to record.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::control::Control;
use super::stop::Phase;
use super::{Foreman, MAX_DUE_WAIT, PoolGen, Role, Running, find_pool, lease_length};
use crate::config::{Config, Delivery, Runner};
use crate::outcome::{Finished, Outcome, headline};
use crate::process_pool::{PoolEvent, PoolJob, ProcessPool};
use crate::registry::{Handler, Registry};
use crate::store::{Claim, ClaimGroup, Ending, Next, Resolved, RunState};
use crate::task::Task;
use crate::thread_pool::Job;

/// Attempts to record the last ended attempts before the daemon exits (each may wait out the busy
/// timeout).
const FLUSH_TRIES: usize = 3;
/// A cycle that costs at least this makes a finished task wait for the others (`gather`)…
const GATHER_ABOVE: Duration = Duration::from_micros(100);
/// …at most this long, and a quarter of a cycle.
const GATHER_AT_MOST: Duration = Duration::from_micros(200);
/// What a failure without any text is said to be.
const NO_REASON: &str = "(no reason given)";

/// What one pop may still take: the free general slots (of `workers + prefetch`), which any task
/// takes but one written behind a pipelined pool's running task; and each pool generation's tasks
/// taken so far, by position in `pools`.
struct Slots {
    general: usize,
    taken: Vec<usize>,
}

/// The names this daemon can claim, by what limits them: each pool's (its free processes), then
/// the worker threads' (the free slots). A store that claims by name (PostgreSQL) takes only
/// these; the others read only the total.
#[derive(Default)]
pub(super) struct ClaimPlan {
    groups: Vec<ClaimGroup>,
    /// For each group, the pool whose free processes limit it (`None`: the worker threads).
    pools: Vec<Option<usize>>,
    /// Every name in the groups, sorted: what the daemon serves (its heartbeat publishes them).
    pub(super) served: Vec<String>,
}

impl ClaimPlan {
    /// The plan for what the registry serves now: a pool's names only once it is up (a pool
    /// still starting or that cannot start serves nothing yet), paused names left out.
    pub(super) fn new(
        config: &Config,
        registry: &Registry,
        pools: &[PoolGen],
        control: &Control,
    ) -> ClaimPlan {
        let mut by_runner: std::collections::BTreeMap<Option<usize>, Vec<String>> =
            std::collections::BTreeMap::new();
        let mut plan = ClaimPlan::default();
        for (name, handler) in registry.handlers() {
            // A paused name is served, but not claimed until it is resumed.
            if control.is_paused(name) {
                plan.served.push(name.to_owned());
                continue;
            }
            let pool = match handler {
                Handler::Pool { pool, .. } => {
                    let up =
                        generations(pools, *pool).any(|g| g.pool.settled() && !g.pool.is_down());
                    if !up {
                        continue;
                    }
                    Some(*pool)
                }
                Handler::InProcess(_) | Handler::Command { .. } => None,
            };
            by_runner.entry(pool).or_default().push(name.to_owned());
        }
        // Pools first: the worker threads' names take whatever slots are left.
        let threads = by_runner.remove(&None);
        for (pool, mut names) in by_runner.into_iter().chain(threads.map(|n| (None, n))) {
            names.sort_unstable();
            let leases = names
                .iter()
                .map(|name| match config.policy(name).delivery {
                    Delivery::AtMostOnce => 0.0,
                    Delivery::AtLeastOnce => lease_length(config, name).as_secs_f64(),
                })
                .collect();
            plan.served.extend(names.iter().cloned());
            plan.groups.push(ClaimGroup {
                names,
                leases,
                limit: 0,
            });
            plan.pools.push(pool);
        }
        plan.served.sort_unstable();
        plan
    }

    /// The claim for `general` free slots and `ahead` ones: each pool's group limited to its free
    /// processes plus, when pipelined, its room behind running tasks (during a reload, the
    /// generation being replaced's too); the worker threads' to the general slots. `resolve`
    /// counts exactly which slot each claimed task takes and defers the rare one left over.
    fn claim(&mut self, general: usize, ahead: usize, pools: &[PoolGen]) -> Claim<'_> {
        for (group, pool) in self.groups.iter_mut().zip(&self.pools) {
            group.limit = match pool {
                Some(id) => generations(pools, *id)
                    .map(|g| {
                        g.pool.processes().saturating_sub(g.pool.in_flight()) + g.pool.ahead_room()
                    })
                    .sum(),
                None => general,
            };
        }
        Claim {
            limit: general + ahead,
            groups: &self.groups,
        }
    }
}

/// The generations that run pool `id`'s tasks: the current one, and during a reload the one it
/// replaces.
fn generations(pools: &[PoolGen], id: usize) -> impl Iterator<Item = &PoolGen> {
    let current = find_pool(pools, id).map(|i| &pools[i]);
    let previous = current.and_then(|g| match g.role {
        Role::Current {
            previous: Some(previous),
        } => find_pool(pools, previous).map(|i| &pools[i]),
        _ => None,
    });
    current.into_iter().chain(previous)
}

/// How `task` runs now: on its handler, not at all (dead letter), not yet, not while its name is
/// paused, or (an expired lease of a task this daemon still runs) not again.
#[allow(clippy::too_many_arguments)] // The loop's parts it reads, borrowed one by one.
fn resolve(
    config: &Config,
    registry: &Registry,
    pools: &[PoolGen],
    running: &HashMap<i64, Running>,
    control: &Control,
    slots: &mut Slots,
    task: &Task,
    now: f64,
) -> Resolved<Handler> {
    let name = task.name.as_str();
    let lease = || now + lease_length(config, name).as_secs_f64();
    if task.was_leased && running.contains_key(&task.id) {
        return Resolved::Hold(lease());
    }
    if control.is_paused(name) {
        return Resolved::Pause;
    }
    let lease = match config.policy(name).delivery {
        Delivery::AtMostOnce => None,
        Delivery::AtLeastOnce => Some(lease()),
    };
    let current = pools
        .iter()
        .filter(|g| matches!(g.role, Role::Current { .. }));
    let Some(handler) = registry.get(name) else {
        // A pool still starting may serve it: its hello has not said yet.
        if current.clone().any(|g| !g.pool.settled()) {
            return Resolved::Defer;
        }
        let down: Vec<&str> = current
            .filter(|g| g.pool.is_down())
            .map(|g| &*g.pool.name)
            .collect();
        return Resolved::Dead(if down.is_empty() {
            format!("unknown task name {name:?}")
        } else {
            format!(
                "unknown task name {name:?} (pools that cannot start, and may serve it: {})",
                down.join(", ")
            )
        });
    };
    let Handler::Pool { pool: id, timeout } = handler else {
        if slots.general == 0 {
            return Resolved::Defer; // The free slots left are a pipelined pool's, ahead.
        }
        slots.general -= 1;
        return Resolved::Run(handler.clone(), lease);
    };
    let Some(index) = find_pool(pools, *id) else {
        return Resolved::Dead(format!("task {name:?} is routed to a missing pool"));
    };
    let here = place(&pools[index].pool, index, slots, name);
    if let Place::Take = here {
        return Resolved::Run(handler.clone(), lease);
    }
    // During a reload, the generation being replaced takes what the new one cannot take yet.
    if let Role::Current {
        previous: Some(previous),
    } = pools[index].role
        && let Some(before) = find_pool(pools, previous)
    {
        match place(&pools[before].pool, before, slots, name) {
            Place::Take => {
                let handler = Handler::Pool {
                    pool: previous,
                    timeout: *timeout,
                };
                return Resolved::Run(handler, lease);
            }
            Place::Full => return Resolved::Defer,
            Place::Unsettled | Place::Refuse(_) => {}
        }
    }
    match here {
        Place::Take | Place::Unsettled | Place::Full => Resolved::Defer,
        Place::Refuse(reason) => Resolved::Dead(reason),
    }
}

/// Whether a pool generation can take a task of `name` now.
enum Place {
    /// Taken, and counted in `Slots`.
    Take,
    /// No process has said hello yet, and none has given up.
    Unsettled,
    /// Every process is busy (or has a task waiting for it), or a process is free but no
    /// general slot is.
    Full,
    /// It cannot run it: the dead letter's reason.
    Refuse(String),
}

/// Takes a slot of `pool`, at `index` in the pools, for a task of `name` if it can run it now: a
/// general one if a process may be free (the task would run), else, in a pipelined pool, one
/// behind a running task (one per process).
fn place(pool: &ProcessPool, index: usize, slots: &mut Slots, name: &str) -> Place {
    if !pool.settled() {
        return Place::Unsettled;
    }
    if let Err(reason) = pool.accepts(name) {
        return Place::Refuse(reason);
    }
    let out = pool.in_flight() + slots.taken[index];
    match pool.processes() {
        0 => return Place::Refuse(format!("pool {:?} has no process left", pool.name)),
        processes if out < processes && slots.general > 0 => slots.general -= 1,
        processes if out >= processes && pool.pipelined() && out < 2 * processes => {}
        _ => return Place::Full,
    }
    slots.taken[index] += 1;
    Place::Take
}

impl Foreman {
    /// Records the ended attempts, then pops and starts tasks until the slots are full, the queue
    /// has nothing due, or the due rows must wait (their pool is busy or still starting; they stay
    /// queued until a pool event or a finished task calls `fill` again).
    pub(super) fn fill(&mut self) {
        if !matches!(self.stop.phase, Phase::Running) {
            self.flush();
            return;
        }
        if self.unpausing() {
            self.unpause();
        }
        loop {
            let (general, ahead) = if self.control.all_paused {
                (0, 0)
            } else {
                self.free_slots()
            };
            let free = general + ahead;
            if free == 0 && self.attempts.ended.is_empty() {
                return;
            }
            let now = self.store.now();
            let (config, registry, pools, running, control) = (
                &self.config,
                &self.registry,
                &self.workers.pools,
                &self.attempts.running,
                &self.control,
            );
            let claim = self.claims.claim(general, ahead, pools);
            // Pool tasks taken in this pop, by pool: with the pool's running ones, never more than
            // its processes, so no popped task waits for a process.
            let mut slots = Slots {
                general,
                taken: vec![0; pools.len()],
            };
            let resolve = |task: &Task| {
                resolve(
                    config, registry, pools, running, control, &mut slots, task, now,
                )
            };
            let started_at = Instant::now();
            let popped = match self.store.cycle(&self.attempts.ended, claim, now, resolve) {
                Ok(popped) => popped,
                Err(e) => {
                    self.db_error("cannot pop tasks", &e);
                    return;
                }
            };
            let cost = self.look.cycle_cost;
            self.look.cycle_cost = (cost * 7 + started_at.elapsed()) / 8;
            // Only a cycle that wrote says the database takes writes again: one with nothing to
            // record or pop commits an empty transaction, which a full disk lets through.
            if !self.attempts.ended.is_empty()
                || !popped.tasks.is_empty()
                || !popped.dead.is_empty()
                || popped.paused > 0
            {
                self.db_works();
            }
            self.attempts.ended.clear();
            for buried in &popped.dead {
                let name = buried.task_name.as_deref().unwrap_or("(no name)");
                log::error!(
                    "task {} {name} moved to foreman_dead: {}",
                    buried.task_id,
                    buried.reason
                );
                crate::alert::row_buried(buried);
            }
            let started = popped.tasks.len();
            if started < free {
                self.look.next_task_due = popped.next_due;
            }
            for (task, handler) in popped.tasks {
                self.hand_out(task, handler, now);
            }
            // Buried or paused rows were progress: the rows behind them get their turn now, not
            // at a tick.
            if started < free && popped.dead.is_empty() && popped.paused == 0 {
                return; // Nothing more is due, or what is due must wait.
            }
        }
    }

    /// Records `task` running and gives it to its pool or the worker threads.
    fn hand_out(&mut self, task: Task, handler: Handler, now: f64) {
        let pool = match &handler {
            Handler::Pool { pool, .. } => Some(*pool),
            _ => None,
        };
        let leased = self.config.policy(&task.name).delivery == Delivery::AtLeastOnce;
        let due = match (task.run_after, task.created_at) {
            (Some(a), Some(b)) => a.max(b),
            (a, b) => a.or(b).unwrap_or(now),
        };
        self.attempts.running.insert(
            task.id,
            Running {
                name: task.name.clone(),
                attempt: task.attempt,
                cancel: task.cancel.clone(),
                started: Instant::now(),
                pool,
                leased,
                waited: (now - due).max(0.0),
            },
        );
        match handler {
            Handler::Pool { pool, timeout } => {
                // `resolve` found it a moment ago.
                if let Some(index) = self.workers.find(pool) {
                    self.workers.pools[index]
                        .pool
                        .submit(PoolJob { task, timeout });
                }
            }
            handler => self.workers.threads.submit(Job { task, handler }),
        }
    }

    /// After a task ended, waits a moment for the others still out, when a cycle costs more than
    /// that (a database over a socket, whose claim commits to disk): with tasks of a few
    /// microseconds, each cycle would otherwise record one or two endings and fill as few slots,
    /// paying a whole commit each time. A cheap cycle (SQLite's) never waits.
    pub(super) fn gather(&mut self, finished: &crossbeam_channel::Receiver<Finished>) {
        let cost = self.look.cycle_cost;
        if cost < GATHER_ABOVE || self.attempts.running.is_empty() {
            return;
        }
        let until = Instant::now() + (cost / 4).min(GATHER_AT_MOST);
        while !self.attempts.running.is_empty() {
            let left = until.saturating_duration_since(Instant::now());
            match finished.recv_timeout(left) {
                Ok(done) => self.finish(done),
                Err(_) => return,
            }
        }
    }

    /// The most tasks out at once in general slots: one per worker, plus the prefetched ones
    /// waiting for a worker.
    pub(super) fn capacity(&self) -> usize {
        self.config.workers + self.config.prefetch
    }

    /// How many more tasks may be popped now: `general` slots (of `capacity`), which any task
    /// takes, and `ahead` ones, which only a pipelined pool's tasks take, written behind a
    /// running task (one per process). A pool's tasks beyond its processes hold no general slot:
    /// each starts only as the one before it on its process ends, in the slot that one frees.
    pub(super) fn free_slots(&self) -> (usize, usize) {
        let (mut ahead_out, mut ahead_free) = (0, 0);
        for generation in &self.workers.pools {
            ahead_out += generation.pool.ahead();
            if matches!(generation.role, Role::Current { .. } | Role::Previous) {
                ahead_free += generation.pool.ahead_room();
            }
        }
        let general_out = self.attempts.running.len().saturating_sub(ahead_out);
        (self.capacity().saturating_sub(general_out), ahead_free)
    }

    /// The last chance to record the ended attempts (a retry not recorded is a retry lost): tries a
    /// few times, then logs each one it could not record with what is needed to redo it.
    pub(super) fn flush_before_exit(&mut self) {
        for _ in 0..FLUSH_TRIES {
            self.flush();
            if self.attempts.ended.is_empty() {
                return;
            }
        }
        for ending in &self.attempts.ended {
            log::error!(
                "task {} {} attempt {} ended {} ({:?}), but the DB refused to record it; args {}, kwargs {}",
                ending.task.id,
                ending.task.name,
                ending.task.attempt,
                ending.state.as_str(),
                ending.next,
                serde_json::Value::from(ending.task.args.clone()),
                serde_json::Value::from(ending.task.kwargs.clone())
            );
        }
    }

    /// Records the ended attempts without popping (while stopping).
    pub(super) fn flush(&mut self) {
        if self.attempts.ended.is_empty() {
            return;
        }
        let resolve = |_: &Task| Resolved::<()>::Defer;
        let now = self.store.now();
        match self
            .store
            .cycle(&self.attempts.ended, Claim::any(0), now, resolve)
        {
            Ok(_) => {
                self.db_works();
                self.attempts.ended.clear();
            }
            Err(e) => self.db_error("cannot record the ended tasks", &e),
        }
    }

    /// When the loop must next wake for a delayed task or a schedule.
    pub(super) fn next_due(&self) -> Option<Instant> {
        let due = match (self.look.next_task_due, self.schedules.next_due()) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Instant::now().checked_add(crate::clock::wait_until(
            due,
            self.store.now(),
            MAX_DUE_WAIT,
        ))
    }

    pub(super) fn schedules_due(&mut self) {
        let (running, control) = (&self.attempts.running, &self.control);
        let now = self.store.now();
        let refused = self.schedules.fire_due(
            &mut self.store,
            now,
            |id| running.contains_key(&id),
            |name| control.is_paused(name),
        );
        for (name, e) in refused {
            self.db_error(&format!("schedule {name}"), &e);
        }
    }

    /// Turns a finished attempt into its record (and retry or dead letter), written by the next
    /// cycle, and logs it.
    pub(super) fn finish(&mut self, done: Finished) {
        let (leased, waited) = self.forget(done.task.id);
        let Finished {
            task,
            outcome,
            elapsed,
            result,
            exit_code,
        } = done;
        let now = self.store.now();
        let ok = matches!(outcome, Outcome::Done { .. });
        let aborted = !ok && task.cancelled();
        // An aborted attempt is the operator's doing, not the task's: it is no failure to count.
        if !aborted {
            self.figures
                .tally
                .add(&task.name, ok, now, elapsed.as_secs_f64(), waited);
        }
        let (state, reason) = match outcome {
            Outcome::Done { eventful } => {
                log::debug!("task {} {} done in {elapsed:?}", task.id, task.name);
                self.schedules
                    .report(&mut self.store, task.id, eventful, now);
                self.attempts.ended.push(Ending {
                    task,
                    state: RunState::Done,
                    finished_at: now,
                    error: None,
                    next: Next::Finished,
                    leased,
                    result,
                    exit_code,
                });
                return;
            }
            // Stopped by `foreman cancel` (or it gave up when it saw the flag): never retried.
            Outcome::Failed(reason) | Outcome::Timeout(reason) if aborted => {
                log::info!(
                    "task {} {} cancelled after {elapsed:?} (attempt {}): {}",
                    task.id,
                    task.name,
                    task.attempt,
                    headline(&reason).unwrap_or(NO_REASON)
                );
                self.attempts.ended.push(Ending {
                    task,
                    state: RunState::Cancelled,
                    finished_at: now,
                    error: Some(format!("aborted (foreman cancel): {reason}")),
                    next: Next::Finished,
                    leased,
                    result: None,
                    exit_code,
                });
                return;
            }
            Outcome::Failed(reason) => (RunState::Failed, reason),
            Outcome::Timeout(reason) => (RunState::Timeout, reason),
        };
        let policy = self.config.policy(&task.name);
        let retries_made = u32::try_from(task.attempt - 1).unwrap_or(u32::MAX);
        let next = if retries_made < policy.max_retries {
            let delay = policy.retry_backoff.delay(retries_made + 1);
            Next::Retry(now + delay.as_secs_f64())
        } else {
            let headline = headline(&reason).unwrap_or(NO_REASON);
            crate::alert::task_failed(&task, state, headline, &reason);
            Next::Bury(if task.attempt > 1 {
                format!("failed {} attempts; the last: {headline}", task.attempt)
            } else {
                headline.to_owned()
            })
        };
        log_failure(&task, elapsed, &reason, &next, now);
        self.attempts.ended.push(Ending {
            task,
            state,
            finished_at: now,
            error: Some(reason),
            next,
            leased,
            result: None,
            exit_code,
        });
    }

    /// The task is no longer running (finished, or buried before it started); returns whether it
    /// ran under a lease, and how long it waited to start.
    pub(super) fn forget(&mut self, task_id: i64) -> (bool, f64) {
        self.forget_kill(task_id);
        let Some(running) = self.attempts.running.remove(&task_id) else {
            return (false, 0.0);
        };
        if let Some(index) = running.pool.and_then(|id| self.workers.find(id)) {
            self.workers.pools[index].pool.done_one();
        }
        (running.leased, running.waited)
    }

    pub(super) fn pool_event(&mut self, event: PoolEvent) {
        // None: a pool generation stopped and dropped since (its last events come late).
        let Some(index) = self.workers.find(event.pool) else {
            return;
        };
        let generation = &mut self.workers.pools[index];
        let applied = generation.pool.apply(event.slot, event.kind);
        let name = generation.pool.name.clone();
        // Only the current generation routes: a draining one's hello serves nobody.
        let routes = matches!(generation.role, Role::Current { .. });
        if let Some(served) = applied.first_hello.filter(|_| routes) {
            let elsewhere = self
                .registry
                .add_pool_tasks(event.pool, &served, &self.config);
            if !elsewhere.is_empty() {
                log::warn!(
                    "pool {name}: task(s) {} already run another way (config or in-process); they stay there",
                    elsewhere.join(", ")
                );
            }
            let missing: Vec<&str> = self
                .config
                .tasks
                .iter()
                .filter(|(task, c)| {
                    matches!(&c.runner, Some(Runner::Pool(p)) if **p == *name)
                        && !served.contains(*task)
                })
                .map(|(task, _)| task.as_str())
                .collect();
            if !missing.is_empty() {
                log::error!(
                    "pool {name}: the config routes task(s) {} to this pool, but its worker does not serve them; they will go to foreman_dead",
                    missing.join(", ")
                );
            }
        }
        for job in applied.orphans {
            let (leased, _) = self.forget(job.task.id);
            let reason = match self.workers.pools[index].pool.accepts(&job.task.name) {
                Err(reason) => reason,
                Ok(()) => format!("pool {name:?} went down before the task started"),
            };
            log::error!("task {} moved to foreman_dead: {reason}", job.task.id);
            crate::alert::task_buried(&job.task, &reason);
            self.attempts.ended.push(Ending {
                task: job.task,
                state: RunState::Dead,
                finished_at: self.store.now(),
                error: Some(reason.clone()),
                next: Next::Bury(reason),
                leased,
                result: None,
                exit_code: None,
            });
        }
        // A pool that said hello, or went down, serves other names now.
        self.plan_claims();
    }

    /// Plans the claims again, after the pools or the registry changed.
    pub(super) fn plan_claims(&mut self) {
        self.claims = ClaimPlan::new(
            &self.config,
            &self.registry,
            &self.workers.pools,
            &self.control,
        );
    }

    /// Stops every pool's processes (all at once, of every generation) and waits until they
    /// are gone.
    pub(super) fn stop_pools(&mut self) {
        let mut pools = std::mem::take(&mut self.workers.pools);
        for generation in &mut pools {
            generation.pool.request_stop();
        }
        for generation in pools {
            generation.pool.join();
        }
    }
}

/// Logs a failed attempt: one record per line (the journal splits multi-line messages anyway, and
/// loses their priority), the first saying what happens next.
fn log_failure(task: &Task, elapsed: Duration, reason: &str, next: &Next, now: f64) {
    let then = match next {
        Next::Retry(at) => format!(
            "; attempt {} in {:.1}s",
            task.attempt.saturating_add(1),
            (at - now).max(0.0)
        ),
        Next::Bury(_) => "; moved to foreman_dead".to_owned(),
        Next::Finished => String::new(),
    };
    log::warn!(
        "task {} {} failed after {elapsed:?} (attempt {}): {}{then}",
        task.id,
        task.name,
        task.attempt,
        headline(reason).unwrap_or(NO_REASON)
    );
    if reason.contains('\n') {
        for line in reason.lines() {
            log::warn!("task {} {} | {line}", task.id, task.name);
        }
    }
}
