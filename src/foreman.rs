//! The foreman loop: one thread, one `match` over `Event`. It alone pops (and so deletes) rows, and
//! it never has more tasks out than there are workers. It blocks only on its event channels and,
//! bounded by the busy timeout, on SQLite's write lock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, select};

use crate::children::{Children, KILL_GRACE};
use crate::config::{Config, Runner};
use crate::error::{Error, Result};
use crate::pid_guard::PidGuard;
use crate::process_pool::{PoolEvent, PoolJob, ProcessPool};
use crate::queue::{Access, Queue, Resolved};
use crate::registry::{Handler, Registry};
use crate::signals::Shutdown;
use crate::task::Task;
use crate::thread_pool::{Finished, Job, Outcome, ThreadPool};
use crate::wakeup::WakeupDir;

/// Everything the daemon reacts to.
#[derive(Debug)]
enum Event {
    /// A file appeared in the wakeup dir (or the watch overflowed).
    Wakeup,
    WorkerFinished(Finished),
    /// A pool process said hello or failed to start.
    Pool(PoolEvent),
    /// The fallback tick: catches missed wakeups and stale wakeup files.
    Tick,
    Shutdown(Shutdown),
    /// The current shutdown phase ran out of time.
    Deadline,
}

enum Phase {
    Running,
    /// Stopped popping; waiting for running tasks until the deadline.
    Draining {
        deadline: Instant,
    },
    /// Sent SIGTERM to the survivors' processes; SIGKILL at the deadline.
    Terminating {
        deadline: Instant,
    },
}

struct Running {
    name: String,
    started: Instant,
    /// The pool running it, if it is a pool task.
    pool: Option<usize>,
}

/// Runs the daemon until a shutdown signal arrives on `shutdown` and the running tasks are done
/// (or the graceful timeout passes). Takes the PID lock, creates the schema and wakeup dir if
/// absent, and drains the backlog first. At the graceful deadline, command tasks are killed but an
/// in-process handler cannot be: `run` returns without it, and it ends when the process exits.
pub fn run(config: &Config, mut registry: Registry, shutdown: &Receiver<Shutdown>) -> Result<()> {
    config.check_commands()?;
    registry.add_config(config)?;
    let _guard = PidGuard::acquire(&config.pid_file)?;
    let mut queue = Queue::open(&config.db, Access::Create)?;
    queue.ensure_schema()?;
    let wakeup = WakeupDir::prepare(&config.wakeup_dir)?;
    // Watch before the first pop, so a task enqueued during startup cannot slip between the two.
    let (wake_tx, wakes) = crossbeam_channel::bounded(1);
    let _watcher = wakeup.watch(wake_tx)?;
    let (finished_tx, finished) = crossbeam_channel::unbounded();
    let children = Arc::new(Children::default());
    let threads = ThreadPool::start(config.workers, &finished_tx, &children)?;
    let (pool_tx, pool_events) = crossbeam_channel::unbounded();
    let pools = config
        .pools
        .iter()
        .enumerate()
        .map(|(index, (name, pool))| {
            ProcessPool::start(index, name, pool, &pool_tx, &finished_tx, &children)
        })
        .collect::<Result<Vec<_>>>()?;
    log_startup(config, &registry, &pools);
    let mut foreman = Foreman {
        config,
        registry,
        queue,
        wakeup,
        threads,
        pools,
        children,
        running: HashMap::with_capacity(config.workers),
        phase: Phase::Running,
        last_db_error: None,
    };
    foreman.wakeup.clear();
    foreman.fill();
    let ticker = crossbeam_channel::tick(config.tick);
    let mut shutdown = shutdown.clone();
    loop {
        let deadline = match foreman.phase {
            Phase::Running => crossbeam_channel::never(),
            Phase::Draining { deadline } | Phase::Terminating { deadline } => {
                crossbeam_channel::at(deadline)
            }
        };
        let event = select! {
            recv(shutdown) -> signal => if let Ok(signal) = signal {
                Event::Shutdown(signal)
            } else {
                // Nobody can ask for a shutdown any more; stop listening instead of spinning.
                shutdown = crossbeam_channel::never();
                continue;
            },
            recv(finished) -> done => done.map_or(Event::Tick, Event::WorkerFinished),
            recv(pool_events) -> event => event.map_or(Event::Tick, Event::Pool),
            recv(wakes) -> _ => Event::Wakeup,
            recv(ticker) -> _ => Event::Tick,
            recv(deadline) -> _ => Event::Deadline,
        };
        match event {
            Event::Wakeup => {
                foreman.wakeup.clear();
                foreman.fill();
            }
            Event::WorkerFinished(done) => {
                foreman.finish(done);
                // Coalesce: collect every worker that is done before popping once for all of them.
                while let Ok(done) = finished.try_recv() {
                    foreman.finish(done);
                }
                foreman.fill();
            }
            Event::Pool(event) => {
                foreman.pool_event(event);
                foreman.fill();
            }
            Event::Tick => foreman.tick(),
            Event::Shutdown(signal) => foreman.shutdown(signal)?,
            Event::Deadline => foreman.deadline(),
        }
        if !matches!(foreman.phase, Phase::Running) && foreman.running.is_empty() {
            foreman.stop_pools();
            log::info!("foreman stopped: no task running");
            return Ok(());
        }
        if let Phase::Terminating { deadline } = foreman.phase
            && Instant::now() >= deadline
        {
            let killed = foreman.children.kill_everything();
            foreman.stop_pools();
            log::warn!(
                "foreman stopped: killed {killed} task process group(s); {} task(s) abandoned",
                foreman.running.len()
            );
            return Ok(());
        }
    }
}

fn log_startup(config: &Config, registry: &Registry, pools: &[ProcessPool]) {
    let pools = if pools.is_empty() {
        String::new()
    } else {
        let names: Vec<&str> = pools.iter().map(|p| &*p.name).collect();
        format!(", pools starting: {}", names.join(", "))
    };
    log::info!(
        "foreman running: pid {}, db {}, wakeup dir {}, {} workers, tasks: {}{pools}",
        std::process::id(),
        config.db.display(),
        config.wakeup_dir.display(),
        config.workers,
        registry.names().join(", "),
    );
}

/// How the task named `name` runs now: on its handler, not at all (dead letter), or not yet.
fn resolve(
    registry: &Registry,
    pools: &[ProcessPool],
    taken: &mut [usize],
    name: &str,
) -> Resolved<Handler> {
    let Some(handler) = registry.get(name) else {
        // A pool still starting may serve it: its hello has not said yet.
        if pools.iter().any(|p| !p.settled()) {
            return Resolved::Defer;
        }
        let down: Vec<&str> = pools
            .iter()
            .filter(|p| p.is_down())
            .map(|p| &*p.name)
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
    let Handler::Pool { pool: index, .. } = handler else {
        return Resolved::Run(handler.clone());
    };
    let (Some(pool), Some(taken)) = (pools.get(*index), taken.get_mut(*index)) else {
        return Resolved::Dead(format!("task {name:?} is routed to a missing pool"));
    };
    if !pool.settled() {
        return Resolved::Defer;
    }
    if let Err(reason) = pool.accepts(name) {
        return Resolved::Dead(reason);
    }
    if pool.in_flight() + *taken >= pool.processes() {
        return Resolved::Defer;
    }
    *taken += 1;
    Resolved::Run(handler.clone())
}

struct Foreman<'c> {
    config: &'c Config,
    registry: Registry,
    queue: Queue,
    wakeup: WakeupDir,
    threads: ThreadPool,
    pools: Vec<ProcessPool>,
    children: Arc<Children>,
    running: HashMap<i64, Running>,
    phase: Phase,
    /// When the last DB error was logged, so a broken DB logs once per tick, not once per event.
    last_db_error: Option<Instant>,
}

impl Foreman<'_> {
    /// Pops and starts tasks until the slots are full, the queue is empty, or the rows at its head
    /// must wait (their pool is busy or still starting; they stay queued until a pool event or a
    /// finished task calls `fill` again).
    fn fill(&mut self) {
        while matches!(self.phase, Phase::Running) {
            let free = self.config.workers - self.running.len();
            if free == 0 {
                return;
            }
            let (registry, pools) = (&self.registry, &self.pools);
            // Pool tasks taken in this pop, by pool: with the pool's running ones, never more than
            // its processes, so no popped task waits for a process.
            let mut taken = vec![0; pools.len()];
            let resolve = |task: &Task| resolve(registry, pools, &mut taken, &task.name);
            let popped = match self.queue.pop(free, resolve) {
                Ok(popped) => popped,
                Err(e) => {
                    self.db_error(&e);
                    return;
                }
            };
            for (id, reason) in &popped.dead {
                log::error!("task {id} moved to foreman_dead: {reason}");
            }
            let rows = popped.rows();
            let deferred = popped.deferred;
            for (task, handler) in popped.tasks {
                let pool = match &handler {
                    Handler::Pool { pool, .. } => Some(*pool),
                    _ => None,
                };
                self.running.insert(
                    task.id,
                    Running {
                        name: task.name.clone(),
                        started: Instant::now(),
                        pool,
                    },
                );
                match handler {
                    Handler::Pool { pool, timeout } => {
                        self.pools[pool].submit(PoolJob { task, timeout });
                    }
                    handler => self.threads.submit(Job { task, handler }),
                }
            }
            if rows < free || deferred > 0 {
                return; // The queue is empty, or its head must wait.
            }
        }
    }

    fn finish(&mut self, done: Finished) {
        self.forget(done.task_id);
        match done.outcome {
            Outcome::Done => log::debug!(
                "task {} {} done in {:?}",
                done.task_id,
                done.task_name,
                done.elapsed
            ),
            Outcome::Failed(reason) => {
                // One log record per line: the journal splits multi-line messages anyway, and
                // loses their priority. A traceback's last line says what went wrong.
                let headline = reason.lines().rev().find(|l| !l.trim().is_empty());
                log::warn!(
                    "task {} {} failed after {:?}: {}",
                    done.task_id,
                    done.task_name,
                    done.elapsed,
                    headline.unwrap_or("(no reason given)").trim()
                );
                if reason.contains('\n') {
                    for line in reason.lines() {
                        log::warn!("task {} {} | {line}", done.task_id, done.task_name);
                    }
                }
            }
        }
    }

    /// The task is no longer running (finished, or buried before it started).
    fn forget(&mut self, task_id: i64) {
        if let Some(Running {
            pool: Some(pool), ..
        }) = self.running.remove(&task_id)
            && let Some(pool) = self.pools.get_mut(pool)
        {
            pool.done_one();
        }
    }

    fn pool_event(&mut self, event: PoolEvent) {
        let Some(pool) = self.pools.get_mut(event.pool) else {
            return;
        };
        let applied = pool.apply(event.slot, event.kind);
        let name = pool.name.clone();
        if let Some(served) = applied.first_hello {
            let elsewhere = self.registry.add_pool_tasks(event.pool, &served);
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
                    matches!(&c.runner, Runner::Pool(p) if **p == *name) && !served.contains(*task)
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
            self.forget(job.task.id);
            let reason = match self.pools[event.pool].accepts(&job.task.name) {
                Err(reason) => reason,
                Ok(()) => format!("pool {name:?} went down before the task started"),
            };
            match self.queue.bury(&job.task, &reason) {
                Ok(()) => log::error!("task {} moved to foreman_dead: {reason}", job.task.id),
                // Nowhere left to keep it: say so loudly, with everything needed to redo it.
                Err(e) => log::error!(
                    "task {} {} lost: {reason}; and it could not be moved to foreman_dead: {e} (args {}, kwargs {})",
                    job.task.id,
                    job.task.name,
                    serde_json::Value::from(job.task.args.clone()),
                    serde_json::Value::from(job.task.kwargs.clone())
                ),
            }
        }
    }

    /// Stops every pool's processes (all at once) and waits until they are gone.
    fn stop_pools(&mut self) {
        let mut pools = std::mem::take(&mut self.pools);
        for pool in &mut pools {
            pool.request_stop();
        }
        for pool in pools {
            pool.join();
        }
    }

    fn tick(&mut self) {
        if !matches!(self.phase, Phase::Running) || self.running.len() == self.config.workers {
            return;
        }
        // A stale file would keep create-if-absent producers from ever signalling again.
        self.wakeup.clear_if_changed();
        match self.queue.has_queued() {
            Ok(true) => self.fill(),
            Ok(false) => {}
            Err(e) => self.db_error(&e),
        }
    }

    fn db_error(&mut self, e: &Error) {
        let now = Instant::now();
        if self
            .last_db_error
            .is_none_or(|at| now.duration_since(at) >= self.config.tick)
        {
            log::error!(
                "cannot pop tasks (retrying every {:?}): {e}",
                self.config.tick
            );
            self.last_db_error = Some(now);
        }
    }

    fn shutdown(&mut self, signal: Shutdown) -> Result<()> {
        if let Phase::Running = self.phase {
            log::info!(
                "signal {}: stopping; waiting up to {:?} for {} running task(s)",
                signal.0,
                self.config.graceful_timeout,
                self.running.len()
            );
            self.phase = Phase::Draining {
                deadline: Instant::now() + self.config.graceful_timeout,
            };
            return Ok(());
        }
        self.log_survivors("abandoned at second signal");
        self.children.kill_everything();
        Err(Error::Interrupted {
            abandoned: self.running.len(),
        })
    }

    fn deadline(&mut self) {
        if let Phase::Draining { .. } = self.phase {
            self.log_survivors("still running at the graceful timeout");
            self.children.signal_all(libc::SIGTERM);
            self.phase = Phase::Terminating {
                deadline: Instant::now() + KILL_GRACE,
            };
        }
    }

    fn log_survivors(&self, what: &str) {
        let mut survivors: Vec<_> = self.running.iter().collect();
        survivors.sort_unstable_by_key(|(id, _)| **id);
        for (id, task) in survivors {
            log::warn!(
                "task {id} {} {what} (started {:?} ago)",
                task.name,
                task.started.elapsed()
            );
        }
    }
}
