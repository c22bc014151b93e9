//! The foreman loop: one thread, one `match` over `Event`. It alone pops (and so deletes) rows, and
//! it never has more tasks out than there are workers. It blocks only on its event channels and,
//! bounded by the busy timeout, on SQLite's write lock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use notify::RecommendedWatcher;

use crate::children::{Children, KILL_GRACE};
use crate::clock::{StepDetector, unix_now};
use crate::config::{Config, Delivery, Runner};
use crate::duration::format_duration;
use crate::error::{Error, Result};
use crate::notify::Notifier;
use crate::outcome::{Finished, Outcome, headline};
use crate::pid_guard::PidGuard;
use crate::process_pool::{PoolEvent, PoolJob, ProcessPool};
use crate::queue::daemon::{Beat, DaemonInfo};
use crate::queue::{Access, Ending, FileStamp, Next, Queue, Resolved, RunState};
use crate::registry::{Handler, Registry};
use crate::schedule::Schedules;
use crate::signals::Shutdown;
use crate::stats::{Tally, minute_of};
use crate::sys::{hostname, process_start};
use crate::task::Task;
use crate::thread_pool::{Job, ThreadPool};
use crate::wakeup::{Lost, WakeupDir};

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
    /// A delayed task or a schedule is due.
    Due,
    /// Time to ping the watchdog, and maybe to write the heartbeat and figures.
    Beat,
}

/// How long an at-least-once task's lease lasts (longer for a task with a longer timeout). The
/// running daemon renews a lease that expires under a task still running; a dead daemon's leases
/// are taken back at the next start, so this only matters if another daemon shares the DB.
const MIN_LEASE: Duration = Duration::from_mins(10);
/// The longest sleep before re-checking due times; a far-off due time is re-read after it.
const MAX_DUE_WAIT: Duration = Duration::from_hours(1);
/// Attempts to record the last ended attempts before the daemon exits (each may wait out the busy
/// timeout).
const FLUSH_TRIES: usize = 3;
/// History rows looked at per pruning transaction, so pruning never holds the write lock for long.
const PRUNE_BATCH: usize = 1000;
/// How often the loop prunes history when the last pass found nothing more to prune.
const PRUNE_EVERY: Duration = Duration::from_mins(1);
/// The longest a busy daemon keeps its figures in memory before writing them (with a heartbeat).
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// The idle tick skips its look at the queue while neither the database nor its `-wal` changed;
/// it looks anyway this often, in case a commit left both the same size within the file
/// system's timestamp granularity.
const LOOK_ANYWAY: Duration = Duration::from_secs(30);
/// What a failure without any text is said to be.
const NO_REASON: &str = "(no reason given)";
/// A DB error that lasts is logged again this often (the loop retries it at every tick).
const DB_ERROR_EVERY: Duration = Duration::from_secs(10);

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

/// The DB's failures since it last took a write, so that a lasting one is logged once per
/// `DB_ERROR_EVERY`, and its end once.
#[derive(Default)]
struct DbTrouble {
    /// When the first failure of the current streak happened.
    since: Option<Instant>,
    failures: u64,
    logged_at: Option<Instant>,
}

struct Running {
    name: String,
    started: Instant,
    /// The pool running it, if it is a pool task.
    pool: Option<usize>,
    /// Runs under a lease (at-least-once): its row stays queued until the attempt is recorded.
    leased: bool,
    /// Seconds from when it was due (enqueued, or its delay or backoff over) to its start.
    waited: f64,
}

/// Runs the daemon until a shutdown signal arrives on `shutdown` and the running tasks are done
/// (or the graceful timeout passes). Takes the PID lock, creates the schema and wakeup dir if
/// absent, and drains the backlog first. At the graceful deadline, command tasks are killed but an
/// in-process handler cannot be: `run` returns without it, and it ends when the process exits.
pub fn run(config: &Config, mut registry: Registry, shutdown: &Receiver<Shutdown>) -> Result<()> {
    crate::queue::files::preflight(&config.db)?;
    WakeupDir::preflight(&config.wakeup_dir, config.tick)?;
    crate::fs_check::pid_file_writable(&config.pid_file)?;
    config.check_commands()?;
    registry.add_config(config)?;
    registry.check_schedules(config)?;
    let _guard = PidGuard::acquire(&config.pid_file)?;
    let mut queue = open_queue(config)?;
    let schedules = Schedules::load(&config.schedules, &mut queue, unix_now())?;
    let wakeup = WakeupDir::prepare(&config.wakeup_dir)?;
    // Watch before the first pop, so a task enqueued during startup cannot slip between the two.
    let (wake_tx, wakes) = crossbeam_channel::bounded(1);
    let (watcher, watcher_error) = match wakeup.watch(wake_tx.clone()) {
        Ok(watcher) => (Some(watcher), None),
        Err(e) => {
            // Out of inotify instances or watches (other programs of this user hold them): the
            // tick alone keeps the queue moving, and every tick tries the watch again.
            let message = unwatched(&e, config.tick);
            log::warn!("{message}");
            (None, Some(message))
        }
    };
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
        fatal: None,
        signalled: false,
        db_trouble: DbTrouble::default(),
        watcher,
        wake_tx,
        wakeup_trouble: watcher_error,
        clock: StepDetector::default(),
        stepped_back: 0.0,
        ended: Vec::new(),
        schedules,
        next_task_due: None,
        next_prune: Instant::now(),
        prune_from: None,
        tally: Tally::default(),
        notifier: Notifier::from_env(),
        last_beat: Instant::now(),
        last_stamp: None,
        last_look: Instant::now(),
    };
    foreman.schedules_due();
    foreman.wakeup.clear();
    foreman.fill();
    foreman.write_beat();
    let status = foreman.status_line();
    foreman.notifier.ready(status);
    foreman.serve(shutdown, &finished, &pool_events, &wakes)
}

impl Foreman<'_> {
    /// The loop: one event at a time until the daemon has stopped.
    fn serve(
        &mut self,
        shutdown: &Receiver<Shutdown>,
        finished: &Receiver<Finished>,
        pool_events: &Receiver<PoolEvent>,
        wakes: &Receiver<()>,
    ) -> Result<()> {
        let ticker = crossbeam_channel::tick(self.config.tick);
        // Figures are flushed by the tick too (at most once a second), so an idle daemon wakes for
        // its heartbeat only every `heartbeat`.
        let beat_every = self
            .notifier
            .watchdog_every()
            .map_or(self.config.heartbeat, |w| w.min(self.config.heartbeat));
        let beats = crossbeam_channel::tick(beat_every);
        let mut shutdown = shutdown.clone();
        loop {
            let deadline = match self.phase {
                Phase::Running => crossbeam_channel::never(),
                Phase::Draining { deadline } | Phase::Terminating { deadline } => {
                    crossbeam_channel::at(deadline)
                }
            };
            let due = match self.phase {
                Phase::Running => self
                    .next_due()
                    .map_or_else(crossbeam_channel::never, crossbeam_channel::at),
                _ => crossbeam_channel::never(),
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
                recv(due) -> _ => Event::Due,
                recv(beats) -> _ => Event::Beat,
            };
            match event {
                Event::Wakeup => {
                    if self.wakeup.watch_lost() {
                        self.look_at_wakeup_dir();
                    }
                    self.wakeup.clear();
                    self.fill();
                }
                Event::WorkerFinished(done) => {
                    self.finish(done);
                    // Coalesce: collect every worker that is done before popping once for all of them.
                    while let Ok(done) = finished.try_recv() {
                        self.finish(done);
                    }
                    self.fill();
                }
                Event::Pool(event) => {
                    self.pool_event(event);
                    self.fill();
                }
                Event::Tick => self.tick(),
                Event::Shutdown(signal) => self.shutdown(signal)?,
                Event::Deadline => self.deadline(),
                Event::Due => {
                    self.next_task_due = None;
                    self.schedules_due();
                    self.fill();
                }
                Event::Beat => self.beat(),
            }
            if self.stopped() {
                return self.fatal.take().map_or(Ok(()), Err);
            }
        }
    }
}

/// Opens the DB, creating or upgrading the schema, and takes back what a crashed predecessor left
/// running. Called with the PID lock held: this daemon is the only one.
fn open_queue(config: &Config) -> Result<Queue> {
    let mut queue = Queue::open(&config.db, Access::Create)?;
    queue.ensure_schema()?;
    let (requeued, lost) = queue.recover(unix_now())?;
    if requeued + lost > 0 {
        log::warn!(
            "the previous daemon stopped with tasks running: {lost} recorded lost (at-most-once), {requeued} queued again (at-least-once)"
        );
    }
    queue.register_daemon(&DaemonInfo {
        pid: std::process::id(),
        pid_start: process_start(std::process::id()),
        host: hostname(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at: unix_now(),
        workers: config.workers,
    })?;
    Ok(queue)
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

/// How `task` runs now: on its handler, not at all (dead letter), not yet, or (an expired lease of
/// a task this daemon still runs) not again.
fn resolve(
    config: &Config,
    registry: &Registry,
    pools: &[ProcessPool],
    running: &HashMap<i64, Running>,
    taken: &mut [usize],
    task: &Task,
    now: f64,
) -> Resolved<Handler> {
    let name = task.name.as_str();
    let lease = || {
        let timeout = config.tasks.get(name).and_then(|t| t.timeout);
        let lease = timeout.map_or(MIN_LEASE, |t| (t + MIN_LEASE / 10).max(MIN_LEASE));
        now + lease.as_secs_f64()
    };
    if task.was_leased && running.contains_key(&task.id) {
        return Resolved::Hold(lease());
    }
    let lease = match config.policy(name).delivery {
        Delivery::AtMostOnce => None,
        Delivery::AtLeastOnce => Some(lease()),
    };
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
        return Resolved::Run(handler.clone(), lease);
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
    Resolved::Run(handler.clone(), lease)
}

struct Foreman<'c> {
    config: &'c Config,
    registry: Registry,
    queue: Queue,
    wakeup: WakeupDir,
    /// The inotify watch on the wakeup dir; `None` while none can be set up (the tick tries again).
    watcher: Option<RecommendedWatcher>,
    /// Where a new watch sends its wakes.
    wake_tx: Sender<()>,
    /// The last problem with the wakeup dir or its watch that was logged, so each is logged once.
    wakeup_trouble: Option<String>,
    threads: ThreadPool,
    pools: Vec<ProcessPool>,
    children: Arc<Children>,
    running: HashMap<i64, Running>,
    phase: Phase,
    /// Why the daemon stops by itself (the database file was replaced): `run` returns it once the
    /// running tasks are done.
    fatal: Option<Error>,
    /// Whether a stop signal came: the second one abandons the running tasks.
    signalled: bool,
    db_trouble: DbTrouble,
    /// Tells the wall clock's backward steps from the monotonic clock's steady pace.
    clock: StepDetector,
    /// Seconds the wall clock stepped back that the queue's due times have not been moved by yet
    /// (the DB refused the update); tried again at the next tick.
    stepped_back: f64,
    /// Attempts that ended and are not recorded yet: the next cycle transaction writes them, with
    /// its pop, so recording costs no transaction of its own.
    ended: Vec<Ending>,
    schedules: Schedules,
    /// When the earliest delayed task is due, as the last short pop saw it.
    next_task_due: Option<f64>,
    next_prune: Instant,
    /// Where the next history pruning pass goes on from (a `foreman_run` key).
    prune_from: Option<(i64, i64)>,
    /// Figures of the ended attempts not written to `foreman_stat` yet.
    tally: Tally,
    notifier: Notifier,
    /// When the heartbeat row was last written.
    last_beat: Instant,
    /// The database files as the tick's last look at the queue saw them.
    last_stamp: Option<FileStamp>,
    last_look: Instant,
}

impl Foreman<'_> {
    /// Records the ended attempts, then pops and starts tasks until the slots are full, the queue
    /// has nothing due, or the due rows must wait (their pool is busy or still starting; they stay
    /// queued until a pool event or a finished task calls `fill` again).
    fn fill(&mut self) {
        if !matches!(self.phase, Phase::Running) {
            self.flush();
            return;
        }
        loop {
            let free = self.capacity().saturating_sub(self.running.len());
            if free == 0 && self.ended.is_empty() {
                return;
            }
            let now = unix_now();
            let (config, registry, pools, running) =
                (self.config, &self.registry, &self.pools, &self.running);
            // Pool tasks taken in this pop, by pool: with the pool's running ones, never more than
            // its processes, so no popped task waits for a process.
            let mut taken = vec![0; pools.len()];
            let resolve =
                |task: &Task| resolve(config, registry, pools, running, &mut taken, task, now);
            let popped = match self.queue.cycle(&self.ended, free, now, resolve) {
                Ok(popped) => popped,
                Err(e) => {
                    self.db_error("cannot pop tasks", &e);
                    return;
                }
            };
            // Only a cycle that wrote says the database takes writes again: one with nothing to
            // record or pop commits an empty transaction, which a full disk lets through.
            if !self.ended.is_empty() || !popped.tasks.is_empty() || !popped.dead.is_empty() {
                self.db_works();
            }
            self.ended.clear();
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
                self.next_task_due = popped.next_due;
            }
            for (task, handler) in popped.tasks {
                let pool = match &handler {
                    Handler::Pool { pool, .. } => Some(*pool),
                    _ => None,
                };
                let leased = config.policy(&task.name).delivery == Delivery::AtLeastOnce;
                let due = match (task.run_after, task.created_at) {
                    (Some(a), Some(b)) => a.max(b),
                    (a, b) => a.or(b).unwrap_or(now),
                };
                self.running.insert(
                    task.id,
                    Running {
                        name: task.name.clone(),
                        started: Instant::now(),
                        pool,
                        leased,
                        waited: (now - due).max(0.0),
                    },
                );
                match handler {
                    Handler::Pool { pool, timeout } => {
                        self.pools[pool].submit(PoolJob { task, timeout });
                    }
                    handler => self.threads.submit(Job { task, handler }),
                }
            }
            // Buried rows were progress: the rows behind them get their turn now, not at a tick.
            if started < free && popped.dead.is_empty() {
                return; // Nothing more is due, or what is due must wait.
            }
        }
    }

    /// The most tasks out at once: one per worker, plus the prefetched ones waiting for a worker.
    fn capacity(&self) -> usize {
        self.config.workers + self.config.prefetch
    }

    /// Whether the daemon is done: stopping with nothing left running, or past the terminating
    /// phase's deadline (then whatever still runs is killed).
    fn stopped(&mut self) -> bool {
        if !matches!(self.phase, Phase::Running) && self.running.is_empty() {
            self.flush_before_exit();
            self.stop_pools();
            self.sign_off();
            log::info!("foreman stopped: no task running");
            return true;
        }
        if let Phase::Terminating { deadline } = self.phase
            && Instant::now() >= deadline
        {
            let killed = self.children.kill_everything();
            self.flush_before_exit();
            self.stop_pools();
            self.sign_off();
            log::warn!(
                "foreman stopped: killed {killed} task process group(s); {} task(s) abandoned",
                self.running.len()
            );
            return true;
        }
        false
    }

    /// The last chance to record the ended attempts (a retry not recorded is a retry lost): tries a
    /// few times, then logs each one it could not record with what is needed to redo it.
    fn flush_before_exit(&mut self) {
        for _ in 0..FLUSH_TRIES {
            self.flush();
            if self.ended.is_empty() {
                return;
            }
        }
        for ending in &self.ended {
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
    fn flush(&mut self) {
        if self.ended.is_empty() {
            return;
        }
        let resolve = |_: &Task| Resolved::<()>::Defer;
        match self.queue.cycle(&self.ended, 0, unix_now(), resolve) {
            Ok(_) => {
                self.db_works();
                self.ended.clear();
            }
            Err(e) => self.db_error("cannot record the ended tasks", &e),
        }
    }

    /// When the loop must next wake for a delayed task or a schedule.
    fn next_due(&self) -> Option<Instant> {
        let due = match (self.next_task_due, self.schedules.next_due()) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Instant::now().checked_add(crate::clock::wait_until(due, unix_now(), MAX_DUE_WAIT))
    }

    fn schedules_due(&mut self) {
        let running = &self.running;
        let refused = self
            .schedules
            .fire_due(&mut self.queue, unix_now(), |id| running.contains_key(&id));
        for (name, e) in refused {
            self.db_error(&format!("schedule {name}"), &e);
        }
    }

    /// Turns a finished attempt into its record (and retry or dead letter), written by the next
    /// cycle, and logs it.
    fn finish(&mut self, done: Finished) {
        let (leased, waited) = self.forget(done.task.id);
        let Finished {
            task,
            outcome,
            elapsed,
        } = done;
        let now = unix_now();
        let ok = matches!(outcome, Outcome::Done { .. });
        self.tally
            .add(&task.name, ok, now, elapsed.as_secs_f64(), waited);
        let (state, reason) = match outcome {
            Outcome::Done { eventful } => {
                log::debug!("task {} {} done in {elapsed:?}", task.id, task.name);
                self.schedules
                    .report(&mut self.queue, task.id, eventful, now);
                self.ended.push(Ending {
                    task,
                    state: RunState::Done,
                    finished_at: now,
                    error: None,
                    next: Next::Finished,
                    leased,
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
        self.ended.push(Ending {
            task,
            state,
            finished_at: now,
            error: Some(reason),
            next,
            leased,
        });
    }

    /// The task is no longer running (finished, or buried before it started); returns whether it
    /// ran under a lease, and how long it waited to start.
    fn forget(&mut self, task_id: i64) -> (bool, f64) {
        let Some(running) = self.running.remove(&task_id) else {
            return (false, 0.0);
        };
        if let Some(pool) = running.pool.and_then(|p| self.pools.get_mut(p)) {
            pool.done_one();
        }
        (running.leased, running.waited)
    }

    fn pool_event(&mut self, event: PoolEvent) {
        let Some(pool) = self.pools.get_mut(event.pool) else {
            return;
        };
        let applied = pool.apply(event.slot, event.kind);
        let name = pool.name.clone();
        if let Some(served) = applied.first_hello {
            let elsewhere = self
                .registry
                .add_pool_tasks(event.pool, &served, self.config);
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
            let reason = match self.pools[event.pool].accepts(&job.task.name) {
                Err(reason) => reason,
                Ok(()) => format!("pool {name:?} went down before the task started"),
            };
            log::error!("task {} moved to foreman_dead: {reason}", job.task.id);
            crate::alert::task_buried(&job.task, &reason);
            self.ended.push(Ending {
                task: job.task,
                state: RunState::Dead,
                finished_at: unix_now(),
                error: Some(reason.clone()),
                next: Next::Bury(reason),
                leased,
            });
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
        if !matches!(self.phase, Phase::Running) {
            self.flush();
            return;
        }
        if self.db_replaced() {
            return;
        }
        self.watch_clock();
        if Instant::now() >= self.next_prune {
            self.prune();
        }
        if !self.tally.is_empty() && self.last_beat.elapsed() >= FLUSH_EVERY {
            self.write_beat();
        }
        if self.running.len() >= self.capacity() {
            if !self.ended.is_empty() {
                self.fill(); // A DB error kept them from being recorded; try again.
            }
            return;
        }
        let woken = self.look_at_wakeup_dir();
        // Taken before the look, so a commit during it shows as a change next time.
        let stamp = self.queue.file_stamp();
        if !woken
            && stamp.is_some()
            && stamp == self.last_stamp
            && self.ended.is_empty()
            && self.last_look.elapsed() < LOOK_ANYWAY
        {
            return; // Nothing was committed since the last look: the queue is as it was.
        }
        self.last_stamp = stamp;
        self.last_look = Instant::now();
        match self.queue.next_due() {
            Ok(Some(due)) if due <= unix_now() => self.fill(),
            Ok(due) => {
                self.next_task_due = due;
                if !self.ended.is_empty() {
                    self.fill();
                }
            }
            Err(e) => self.db_error("cannot read the queue", &e),
        }
    }

    /// Whether the database file at the configured path is no longer the file this daemon has
    /// open (deleted, or replaced by a restored backup): producers then write to a file it never
    /// reads. It stops popping, lets its running tasks end, and `run` returns an error (exit 1),
    /// so that the supervisor's restart opens the file that is there now.
    fn db_replaced(&mut self) -> bool {
        let Some(what) = self.queue.replaced() else {
            return false;
        };
        let db = self.config.db.display();
        log::error!(
            "database {db} {what} while the daemon ran: it stops popping and exits with status 1 once its {} running task(s) end, so that a restart opens the file now at that path",
            self.running.len()
        );
        match self.queue.abandon() {
            Ok(true) => {}
            Ok(false) => log::warn!(
                "database {db}: another process still reads the old file, so its WAL could not be emptied; a process opening the new file may read the old one's pages: stop every process that uses the database before replacing it"
            ),
            Err(e) => log::warn!("database {db}: emptying the old file's WAL: {e}"),
        }
        self.fatal = Some(Error::Environment(format!(
            "database {db} {what} while the daemon ran; restart foreman to use the file now at that path"
        )));
        self.stop_popping("database gone");
        true
    }

    /// Notices a backward step of the wall clock and moves what waits for a wall-clock time back
    /// by as much, so that a delay or an `every` interval lasts what was asked, not that plus
    /// the step. (A forward step needs nothing: what became due runs, a missed window once.)
    fn watch_clock(&mut self) {
        let now = unix_now();
        if let Some(back) = self.clock.observe(Instant::now(), now) {
            log::warn!(
                "the wall clock stepped back {back:.1}s: moving the due times of delayed tasks and of `every` schedules back as much"
            );
            self.stepped_back += back;
            self.next_task_due = None;
            self.schedules.step_back(&mut self.queue, back, now);
        }
        if self.stepped_back > 0.0 {
            match self.queue.move_due_back(self.stepped_back, now) {
                Ok(moved) => {
                    if moved > 0 {
                        log::info!(
                            "moved {moved} delayed task(s) {:.1}s earlier after the clock step",
                            self.stepped_back
                        );
                    }
                    self.stepped_back = 0.0;
                }
                Err(e) => self.db_error("cannot move delayed tasks after the clock step", &e),
            }
        }
    }

    /// The tick's look at the wakeup dir: clears files left there (a stale file would keep
    /// create-if-absent producers from ever signalling again), and sets the watch up again when
    /// the directory was removed or replaced, or when none could be set up before. Returns
    /// whether a producer may have signalled since the last look.
    fn look_at_wakeup_dir(&mut self) -> bool {
        match self.wakeup.clear_if_changed() {
            Ok(removed) => {
                if self.watcher.is_none() {
                    self.watch_wakeup_dir(None);
                }
                removed > 0
            }
            Err(lost) => {
                self.watch_wakeup_dir(Some(lost));
                true
            }
        }
    }

    /// (Re)creates and watches the wakeup dir. Each distinct failure is logged once; the tick
    /// tries again, and meanwhile moves the queue by itself.
    fn watch_wakeup_dir(&mut self, lost: Option<Lost>) {
        let path = &self.config.wakeup_dir;
        if lost.is_some() {
            self.watcher = None; // It watches a directory producers no longer reach.
        }
        let set_up = WakeupDir::prepare(path)
            .and_then(|dir| dir.watch(self.wake_tx.clone()).map(|w| (dir, w)));
        match set_up {
            Ok((mut dir, watcher)) => {
                dir.clear();
                self.wakeup = dir;
                self.watcher = Some(watcher);
                self.wakeup_trouble = None;
                match lost {
                    Some(lost) => log::warn!(
                        "wakeup dir {} {lost} while the daemon ran; watching it again",
                        path.display()
                    ),
                    None => log::info!(
                        "watching wakeup dir {} again: new tasks start at once again",
                        path.display()
                    ),
                }
            }
            Err(e) => {
                let message = match lost {
                    Some(lost) => format!(
                        "wakeup dir {} {lost} while the daemon ran, and cannot be set up again: {e}; tasks start within the {} tick until it can",
                        path.display(),
                        format_duration(self.config.tick)
                    ),
                    None => unwatched(&e, self.config.tick),
                };
                if self.wakeup_trouble.as_deref() != Some(message.as_str()) {
                    log::warn!("{message}");
                    self.wakeup_trouble = Some(message);
                }
            }
        }
    }

    /// The heartbeat timer: pings systemd's watchdog (from this loop, so a stuck loop gets the
    /// daemon restarted), and writes the heartbeat row with the figures when they are due.
    fn beat(&mut self) {
        // A tenth short of the period: the timer fires every `heartbeat` (or more often, for the
        // watchdog), and the last write ended a little after its firing.
        let due = self.config.heartbeat.mul_f64(0.9);
        if !self.tally.is_empty() || self.last_beat.elapsed() >= due {
            self.write_beat();
        }
        let status = self.status_line();
        self.notifier.alive(status);
    }

    /// Writes the heartbeat row and the figures counted since the last one, in one transaction.
    fn write_beat(&mut self) {
        // Our own commit must not read as a producer's to the next tick, but a producer's must
        // still: one before this point changed the stamp already, and one up to the second
        // `data_version` (say while the heartbeat waited for the write lock) changes that.
        let version = self.queue.data_version().ok();
        let unchanged = self.last_stamp.is_some() && self.queue.file_stamp() == self.last_stamp;
        let stats = self.tally.take();
        let pools = self.pools_json();
        let totals = self.tally.totals_json();
        let beat = Beat {
            pools_json: &pools,
            totals_json: &totals,
        };
        match self.queue.heartbeat(unix_now(), &beat, &stats) {
            Ok(()) => {
                self.db_works();
                self.last_beat = Instant::now();
                if unchanged && version.is_some() {
                    let stamp = self.queue.file_stamp();
                    if self.queue.data_version().ok() == version {
                        self.last_stamp = stamp;
                    }
                }
            }
            Err(e) => {
                self.tally.restore(stats);
                self.db_error("cannot write the heartbeat", &e);
            }
        }
    }

    /// The pools as the heartbeat row shows them: what `foreman status` and `health` need to tell
    /// a saturated pool from a stalled queue.
    fn pools_json(&self) -> String {
        let pools: Vec<serde_json::Value> = self
            .pools
            .iter()
            .map(|pool| {
                let tasks: Vec<&String> = pool.served().into_iter().flatten().collect();
                serde_json::json!({
                    "name": &*pool.name,
                    "processes": pool.processes(),
                    "up": pool.up(),
                    "busy": pool.in_flight(),
                    "tasks": tasks,
                })
            })
            .collect();
        serde_json::Value::Array(pools).to_string()
    }

    /// systemd's one-line status (`systemctl status` shows it).
    fn status_line(&self) -> String {
        let phase = match self.phase {
            Phase::Running => "",
            Phase::Draining { .. } | Phase::Terminating { .. } => "stopping; ",
        };
        let busy = self.running.len().min(self.config.workers);
        let prefetched = match self.running.len() - busy {
            0 => String::new(),
            n => format!(" (+{n} prefetched)"),
        };
        format!(
            "{phase}{busy}/{} busy{prefetched}; {} task(s) ended in the last minute",
            self.config.workers,
            self.tally.last_minute(unix_now())
        )
    }

    /// The last words in the DB: the figures not written yet, and a clean exit on the daemon row.
    fn sign_off(&mut self) {
        if self.queue.is_abandoned() {
            return; // The row is in a file nobody reads any more.
        }
        self.write_beat();
        if let Err(e) = self.queue.daemon_stopped(unix_now()) {
            log::warn!("could not mark the daemon stopped in the DB: {e}");
        }
    }

    /// Prunes history older than the retention, a window of rows at a time: the next window at
    /// the next tick until the whole history has been looked at, then again after a while.
    fn prune(&mut self) {
        let now = unix_now();
        let before = now - self.config.history_retention.as_secs_f64();
        if self.prune_from.is_none() {
            // Once per pass over the history: a minute's figures are few rows.
            let oldest = minute_of(now - self.config.stats_retention.as_secs_f64());
            if let Err(e) = self.queue.prune_stats(oldest) {
                self.db_error("cannot prune old figures", &e);
            }
        }
        match self
            .queue
            .prune_history(before, self.prune_from, PRUNE_BATCH)
        {
            Ok((pruned, next)) => {
                if pruned > 0 {
                    log::debug!("pruned {pruned} history row(s)");
                }
                self.prune_from = next;
                // A short retention (tests, small disks) is honoured to a tenth of itself.
                let every = PRUNE_EVERY
                    .min(self.config.history_retention / 10)
                    .max(self.config.tick);
                self.next_prune = if next.is_some() {
                    Instant::now()
                } else {
                    Instant::now() + every
                };
            }
            Err(e) => {
                self.next_prune = Instant::now() + PRUNE_EVERY;
                self.db_error("cannot prune old history", &e);
            }
        }
    }

    /// A DB operation failed: it is retried at the next event or tick. The first failure is
    /// logged at once, then the latest one every `DB_ERROR_EVERY` while they last: a full disk
    /// writes a line every few seconds, not one per tick. Not by the text: one cause reads
    /// differently from the pop, the heartbeat and a schedule (and with the free space in it).
    fn db_error(&mut self, what: &str, e: &Error) {
        // Whatever failed, the next tick looks at the queue: a pop that failed left due rows
        // behind, and the disk coming back commits nothing that would say so.
        self.last_stamp = None;
        let now = Instant::now();
        let trouble = &mut self.db_trouble;
        trouble.failures += 1;
        let since = *trouble.since.get_or_insert(now);
        let due = trouble
            .logged_at
            .is_none_or(|at| now.duration_since(at) >= DB_ERROR_EVERY);
        if !due {
            return;
        }
        let error = e.to_string();
        if trouble.logged_at.is_none() {
            log::error!(
                "{what}: {error} (retrying every {}; logged again every {} while it lasts)",
                format_duration(self.config.tick),
                format_duration(DB_ERROR_EVERY)
            );
        } else {
            log::error!(
                "{what}: {error} (failing for {:.1}s, {} attempts)",
                now.duration_since(since).as_secs_f64(),
                trouble.failures
            );
        }
        trouble.logged_at = Some(now);
    }

    /// A DB write succeeded: ends a streak of failures, saying so.
    fn db_works(&mut self) {
        let trouble = std::mem::take(&mut self.db_trouble);
        if let Some(since) = trouble.since {
            log::info!(
                "the database takes writes again after {:.1}s ({} failed attempts)",
                since.elapsed().as_secs_f64(),
                trouble.failures
            );
        }
    }

    fn shutdown(&mut self, signal: Shutdown) -> Result<()> {
        let first = !self.signalled;
        self.signalled = true;
        if let Phase::Running = self.phase {
            self.stop_popping(&format!("signal {}", signal.0));
            return Ok(());
        }
        if first {
            // Draining on its own (the database file was replaced): a supervisor's stop is the
            // first signal, which waits for the running tasks as it would have anyway.
            log::info!(
                "signal {}: already stopping; still waiting for {} running task(s)",
                signal.0,
                self.running.len()
            );
            return Ok(());
        }
        self.log_survivors("abandoned at second signal");
        self.children.kill_everything();
        // Once only: a second signal asks for an exit now, not after three busy timeouts.
        self.flush();
        // The figures of the attempts that ended since the last beat, counted as at any other exit.
        // No stopped stamp: abandoning running tasks is not a clean exit.
        self.write_beat();
        Err(Error::Interrupted {
            abandoned: self.running.len(),
        })
    }

    /// Running → Draining: no more pops; the running tasks get the graceful timeout.
    fn stop_popping(&mut self, why: &str) {
        log::info!(
            "{why}: stopping; waiting up to {:?} for {} running task(s)",
            self.config.graceful_timeout,
            self.running.len()
        );
        self.phase = Phase::Draining {
            deadline: Instant::now() + self.config.graceful_timeout,
        };
        let status = self.status_line();
        self.notifier.stopping(&status);
        // So that `foreman health` tells a daemon draining on purpose from a stalled one.
        if self.queue.is_abandoned() {
            return;
        }
        if let Err(e) = self.queue.daemon_stopping(unix_now()) {
            self.db_error("cannot mark the daemon stopping", &e);
        }
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

/// Why the wakeup dir is not watched, and what that costs.
fn unwatched(e: &Error, tick: Duration) -> String {
    format!(
        "{e}; falling back to the {} tick until a watch can be set up (a new task may wait up to a tick to start)",
        format_duration(tick)
    )
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
