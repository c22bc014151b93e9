//! The foreman loop: one thread, one `match` over `Event`. It alone pops (and so deletes) rows, and
//! it never has more tasks out than there are workers (plus the prefetch, plus a pipelined pool's
//! tasks written behind running ones). It blocks only on its event channels and, bounded by the
//! busy timeout, on the database's write lock.
//!
//! `serve` reads as two calls: `next_event` (the `select!` over the channels) and `handle` (the
//! `match` over what came). The state is grouped by what it is for: the configuration in force,
//! the attempts out, the workers, the stop phase, the operator's pauses and aborts (`Control`, in
//! `control.rs`), and the upkeep parts (`QueueLook`, `ClockWatch`, `Pruning`, `Figures`,
//! `DbTrouble`) in `upkeep.rs`; popping and finishing are in `work.rs`, stopping in `stop.rs`,
//! reloading the configuration and replacing the pools' processes in `reload.rs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};

use crate::children::Children;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::outcome::Finished;
use crate::pid_guard::PidGuard;
use crate::process_pool::{PoolEvent, ProcessPool};
use crate::registry::Registry;
use crate::schedule::Schedules;
use crate::signals::Shutdown;
use crate::store::{DaemonInfo, Ending, Store};
use crate::sys::{hostname, process_start};
use crate::task::CancelFlag;
use crate::thread_pool::ThreadPool;
use crate::wake::Wakeups;

mod control;
mod reload;
mod stop;
mod upkeep;
mod work;

use control::Control;
use stop::{Phase, Stop};
use upkeep::{ClockWatch, DbTrouble, Figures, Pruning, QueueLook};
use work::ClaimPlan;

/// Everything the daemon reacts to.
// A finished task is moved once, by value: boxing it would cost an allocation per task.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Event {
    /// A producer signalled (a file appeared in the wakeup dir, or its watch overflowed).
    Wakeup,
    WorkerFinished(Finished),
    /// A pool process said hello or failed to start.
    Pool(PoolEvent),
    /// The fallback tick: catches missed wakeups and stale wakeup files.
    Tick,
    Shutdown(Shutdown),
    /// SIGHUP: read the configuration again and apply it.
    Reload,
    /// The current shutdown phase ran out of time.
    Deadline,
    /// A delayed task or a schedule is due.
    Due,
    /// Time to ping the watchdog, and maybe to write the heartbeat and figures.
    Beat,
    /// An aborted attempt's grace is over: SIGKILL if it still runs.
    Kill,
}

/// The channels the loop waits on, besides the timers it makes from its own state.
struct Channels {
    shutdown: Receiver<Shutdown>,
    finished: Receiver<Finished>,
    pool_events: Receiver<PoolEvent>,
    wakes: Receiver<()>,
}

/// A task handed to a worker (or waiting for one, prefetched) and not finished yet.
struct Running {
    name: String,
    attempt: i64,
    /// The flag its worker sees; raised by an abort (`foreman cancel`).
    cancel: CancelFlag,
    started: Instant,
    /// The pool running it, if it is a pool task.
    pool: Option<usize>,
    /// Runs under a lease (at-least-once): its row stays queued until the attempt is recorded.
    leased: bool,
    /// Seconds from when it was due (enqueued, or its delay or backoff over) to its start.
    waited: f64,
}

/// The tasks out of the queue: running (or prefetched), and ended but not recorded yet.
#[derive(Default)]
struct Attempts {
    running: HashMap<i64, Running>,
    /// Attempts that ended and are not recorded yet: the next cycle transaction writes them, with
    /// its pop, so recording costs no transaction of its own.
    ended: Vec<Ending>,
}

/// What runs the tasks: worker threads (in-process and command tasks), the process pools, and
/// the record of every child process, so that none outlives the daemon.
struct Workers {
    threads: ThreadPool,
    /// Every pool's processes, a generation per `ProcessPool`: one per configured pool, and
    /// during and after a reload the ones on their way out.
    pools: Vec<PoolGen>,
    children: Arc<Children>,
    /// The id the next `ProcessPool` gets.
    next_pool_id: usize,
    /// Where workers report, kept to start more of them on a reload.
    finished: Sender<Finished>,
    pool_events: Sender<PoolEvent>,
}

/// One generation of a pool's processes, and what it is to the loop.
struct PoolGen {
    pool: ProcessPool,
    role: Role,
}

/// What a pool generation is for: a reload replaces each pool by a new generation, whose
/// processes start one at a time while the previous one's leave, each after its current task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Takes the pool's tasks; during a reload, `previous` (a pool id) is the generation it
    /// replaces.
    Current { previous: Option<usize> },
    /// Being replaced: takes what the current generation cannot take yet, and gives up a
    /// process for each of the current one's that says hello.
    Previous,
    /// Removed by a reload, or replaced before its replacement was done: takes no task; its
    /// processes leave as they become idle, and it is stopped once it runs nothing.
    Draining,
    /// Told to stop; dropped once its drivers have ended.
    Stopping,
}

impl Workers {
    /// The position in `pools` of the generation with this id.
    fn find(&self, id: usize) -> Option<usize> {
        find_pool(&self.pools, id)
    }
}

fn find_pool(pools: &[PoolGen], id: usize) -> Option<usize> {
    pools.iter().position(|g| g.pool.id == id)
}

struct Foreman {
    config: Config,
    /// The handlers `run` was given (built-in and in-process), to which a reload adds the
    /// configuration's again.
    base_registry: Registry,
    registry: Registry,
    store: Store,
    wake: Wakeups,
    workers: Workers,
    attempts: Attempts,
    schedules: Schedules,
    /// What each cycle may claim, by name (see `ClaimPlan`).
    claims: ClaimPlan,
    stop: Stop,
    control: Control,
    look: QueueLook,
    clock: ClockWatch,
    pruning: Pruning,
    figures: Figures,
    db_trouble: DbTrouble,
}

/// Runs the daemon until a shutdown signal arrives on `shutdown` and the running tasks are done
/// (or the graceful timeout passes). Takes the PID lock, creates the schema and wakeup dir if
/// absent, and drains the backlog first. At the graceful deadline, command tasks are killed but an
/// in-process handler cannot be: `run` returns without it, and it ends when the process exits.
///
/// SIGHUP on `shutdown` (`Shutdown(libc::SIGHUP)`) reloads the configuration: `Config::reload`,
/// applied while the daemon runs (docs/guide/daemon.md, *Reloading*).
pub fn run(config: &Config, registry: Registry, shutdown: &Receiver<Shutdown>) -> Result<()> {
    Store::preflight(&config.db)?;
    Wakeups::preflight(config)?;
    if let Some(pid_file) = &config.pid_file {
        crate::fs_check::pid_file_writable(pid_file)?;
    }
    config.check_commands()?;
    let base_registry = registry.clone();
    let mut registry = registry;
    // The pools get ids 0.. in the config's order.
    registry.add_config(config, 0)?;
    registry.check_schedules(config)?;
    let _guard = config
        .pid_file
        .as_deref()
        .map(PidGuard::acquire)
        .transpose()?;
    let mut store = open_store(config, &registry, shutdown)?;
    let now = store.now();
    let schedules = Schedules::load(&config.schedules, &mut store, now)?;
    let (wake_tx, wakes) = crossbeam_channel::bounded(1);
    let wake = Wakeups::start(config, wake_tx)?;
    let (finished_tx, finished) = crossbeam_channel::unbounded();
    let children = Arc::new(Children::default());
    let threads = ThreadPool::start(config.workers, &finished_tx, &children)?;
    let (pool_tx, pool_events) = crossbeam_channel::unbounded();
    let pools = config
        .pools
        .iter()
        .enumerate()
        .map(|(id, (name, pool))| {
            let env = config.launch_env(&pool.command);
            let pool = ProcessPool::start(
                id,
                name,
                pool,
                env,
                pool.processes,
                &pool_tx,
                &finished_tx,
                &children,
            )?;
            Ok(PoolGen {
                pool,
                role: Role::Current { previous: None },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    log_startup(config, &registry, &wake, &pools);
    let mut foreman = Foreman {
        config: config.clone(),
        base_registry,
        registry,
        store,
        wake,
        workers: Workers {
            threads,
            next_pool_id: pools.len(),
            pools,
            children,
            finished: finished_tx,
            pool_events: pool_tx,
        },
        attempts: Attempts {
            running: HashMap::with_capacity(config.workers),
            ended: Vec::new(),
        },
        schedules,
        claims: ClaimPlan::default(),
        stop: Stop::default(),
        control: Control::default(),
        look: QueueLook::new(config.tick),
        clock: ClockWatch::default(),
        pruning: Pruning::default(),
        figures: Figures::new(config.heartbeat),
        db_trouble: DbTrouble::default(),
    };
    let stamp = foreman.store.changes();
    foreman.read_control(stamp);
    foreman.plan_claims();
    foreman.schedules_due();
    foreman.fill();
    foreman.write_beat();
    let status = foreman.status_line();
    foreman.figures.notifier.ready(status);
    let mut channels = Channels {
        shutdown: shutdown.clone(),
        finished,
        pool_events,
        wakes,
    };
    foreman.serve(&mut channels)
}

impl Foreman {
    /// The loop: one event at a time until the daemon has stopped.
    fn serve(&mut self, channels: &mut Channels) -> Result<()> {
        loop {
            let event = self.next_event(channels);
            self.handle(event, channels)?;
            if self.stopped() {
                return self.stop.fatal.take().map_or(Ok(()), Err);
            }
        }
    }

    /// Waits for the next event: a channel's message, or one of the loop's own timers (the
    /// shutdown phase's deadline, the next due task or schedule).
    fn next_event(&self, channels: &mut Channels) -> Event {
        loop {
            let deadline = match self.stop.phase {
                Phase::Running => crossbeam_channel::never(),
                Phase::Draining { deadline } | Phase::Terminating { deadline } => {
                    crossbeam_channel::at(deadline)
                }
            };
            let due = match self.stop.phase {
                Phase::Running => self
                    .next_due()
                    .map_or_else(crossbeam_channel::never, crossbeam_channel::at),
                _ => crossbeam_channel::never(),
            };
            let kill = self
                .control
                .next_kill()
                .map_or_else(crossbeam_channel::never, crossbeam_channel::at);
            // Figures are flushed by the tick too (at most once a second while busy), and an idle
            // daemon's tick comes with its heartbeat: it wakes once per heartbeat.
            let tick = crossbeam_channel::at(self.look.next_tick);
            let beat = crossbeam_channel::at(self.figures.next_beat);
            return select! {
                recv(channels.shutdown) -> signal => if let Ok(signal) = signal {
                    if signal.0 == libc::SIGHUP {
                        Event::Reload
                    } else {
                        Event::Shutdown(signal)
                    }
                } else {
                    // Nobody can ask for a shutdown any more; stop listening instead of spinning.
                    channels.shutdown = crossbeam_channel::never();
                    continue;
                },
                recv(channels.finished) -> done => done.map_or(Event::Tick, Event::WorkerFinished),
                recv(channels.pool_events) -> event => event.map_or(Event::Tick, Event::Pool),
                recv(channels.wakes) -> _ => Event::Wakeup,
                recv(tick) -> _ => Event::Tick,
                recv(deadline) -> _ => Event::Deadline,
                recv(due) -> _ => Event::Due,
                recv(beat) -> _ => Event::Beat,
                recv(kill) -> _ => Event::Kill,
            };
        }
    }

    fn handle(&mut self, event: Event, channels: &Channels) -> Result<()> {
        if !matches!(event, Event::Tick | Event::Beat) {
            self.active();
        }
        match event {
            Event::Wakeup => {
                self.wake.woken();
                if self.wake.take_control() {
                    self.watch_control(true);
                }
                self.fill();
            }
            Event::WorkerFinished(done) => {
                self.finish(done);
                // Coalesce: collect every worker that is done before popping once for all of them.
                while let Ok(done) = channels.finished.try_recv() {
                    self.finish(done);
                }
                self.gather(&channels.finished);
                if self.replacing_pools() {
                    self.advance_pools();
                }
                self.fill();
            }
            Event::Pool(event) => {
                // Published at once, not at the next heartbeat: `status` and `health` must not
                // say a pool is down (or serves nothing) after its workers said hello.
                let before = self.pools_json();
                self.pool_event(event);
                self.advance_pools();
                if self.pools_json() != before {
                    self.write_beat();
                }
                self.fill();
            }
            Event::Tick => {
                if self.replacing_pools() {
                    self.advance_pools();
                }
                self.tick();
            }
            Event::Shutdown(signal) => self.shutdown(signal)?,
            Event::Reload => self.reload(),
            Event::Deadline => self.deadline(),
            Event::Due => {
                self.look.next_task_due = None;
                self.schedules_due();
                self.fill();
            }
            Event::Beat => self.beat(),
            Event::Kill => self.kill_due(),
        }
        Ok(())
    }
}

/// Opens the database, creating or upgrading the schema, and takes back what a crashed predecessor
/// left running (SQLite, with the PID lock held: this daemon is the only one), then registers.
/// A PostgreSQL server that cannot be reached is waited for (`wait_for_db`), until a signal.
fn open_store(
    config: &Config,
    registry: &Registry,
    shutdown: &Receiver<crate::signals::Shutdown>,
) -> Result<Store> {
    let mut store = Store::open_daemon(&config.db, |pause| {
        config.wait_for_db && shutdown.recv_timeout(pause).is_err()
    })?;
    store.ensure_schema()?;
    let (requeued, lost) = store.recover(store.now())?;
    if requeued + lost > 0 {
        log::warn!(
            "the previous daemon stopped with tasks running: {lost} recorded lost (at-most-once), {requeued} queued again (at-least-once)"
        );
    }
    let mut served: Vec<String> = registry
        .handlers()
        .filter(|(_, h)| !matches!(h, crate::registry::Handler::Pool { .. }))
        .map(|(name, _)| name.to_owned())
        .collect();
    served.sort_unstable();
    store.register_daemon(&DaemonInfo {
        pid: std::process::id(),
        pid_start: process_start(std::process::id()),
        host: hostname(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at: store.now(),
        workers: config.workers,
        served,
        stale_after: upkeep::stale_after(config),
    })?;
    Ok(store)
}

fn log_startup(config: &Config, registry: &Registry, wake: &Wakeups, pools: &[PoolGen]) {
    let pools = if pools.is_empty() {
        String::new()
    } else {
        let names: Vec<&str> = pools.iter().map(|g| &*g.pool.name).collect();
        format!(", pools starting: {}", names.join(", "))
    };
    log::info!(
        "foreman running: pid {}, db {}, {}, {} workers, tasks: {}{pools}",
        std::process::id(),
        config.db,
        wake.describe(),
        config.workers,
        registry.names().join(", "),
    );
}

/// Why the daemon exits by itself, and with which error, once its running tasks are done.
fn lost_database(db: &dyn std::fmt::Display, what: &str) -> Error {
    Error::Environment(format!(
        "database {db} {what} while the daemon ran; restart foreman to use the file now at that path"
    ))
}

/// How long an at-least-once task's lease lasts (longer for a task with a longer timeout). The
/// daemon running the task renews it (SQLite: when it expires; PostgreSQL: with its heartbeat).
/// A dead daemon's leases are taken back at the next start (SQLite) or by the daemon that
/// recovers it (PostgreSQL): the length matters only when that never comes.
const MIN_LEASE: Duration = Duration::from_mins(10);

/// How long an at-least-once task of `name` is leased for.
fn lease_length(config: &Config, name: &str) -> Duration {
    let timeout = config.tasks.get(name).and_then(|t| t.timeout);
    timeout.map_or(MIN_LEASE, |t| (t + MIN_LEASE / 10).max(MIN_LEASE))
}

/// The longest sleep before re-checking due times; a far-off due time is re-read after it.
const MAX_DUE_WAIT: Duration = Duration::from_hours(1);
