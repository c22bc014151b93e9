//! `ProcessPool`: the persistent worker processes of one `[pools.NAME]`. Each process has a driver
//! thread that starts it, checks its hello, writes it one task at a time and reads the answer
//! (docs/worker-protocol.md), and restarts it with backoff. The pool never pops and never routes:
//! the foreman loop decides which tasks reach it, from the hellos the drivers report.

use std::collections::{BTreeSet, VecDeque};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::result::Result as StdResult;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select, select_biased};
use serde::Deserialize;

use crate::alert;
use crate::children::{Children, KILL_GRACE, kill_group};
use crate::command::{
    describe, has_exited, pidfd_open, piped_command, poll, pollfd, set_nonblocking, spawn,
    wait_exited_no_reap,
};
use crate::config::{PoolConfig, find_executable};
use crate::duration::format_duration;
use crate::error::{Error, Result};
use crate::line_budget::LineBudget;
use crate::outcome::{CANCELLED_BEFORE_START, Finished, Outcome, result_text};
use crate::task::Task;

/// The worker protocol version this daemon speaks.
pub const PROTOCOL_VERSION: u64 = 1;
/// A protocol line longer than this is garbage, not a message.
const MAX_LINE_BYTES: usize = 1 << 20;
/// A stderr line longer than this is logged in pieces.
const MAX_STDERR_LINE_BYTES: usize = 8192;
/// Lines of stderr quoted when a worker fails: the full text is in the log just above, and the
/// last line (a traceback's exception) is what names the problem.
const STDERR_TAIL_LINES: usize = 1;
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A process that dies sooner than this after its hello counts as a failed start, so a worker that
/// crashes right away is restarted with backoff rather than in a hot loop.
const MIN_HEALTHY_LIFE: Duration = Duration::from_secs(1);
/// Consecutive failed starts of every process before the pool is declared down and its tasks go
/// to the dead-letter table. One failure may be bad luck; three in a row (≈ 0.3 s of backoff) is a
/// broken deployment.
const DOWN_AFTER_FAILURES: u32 = 3;
/// After its stdin closes, how long an idle worker gets to exit on its own before SIGTERM.
const STOP_WAIT: Duration = Duration::from_secs(2);
/// How often a driver waiting for a hello checks whether the pool is stopping.
const STOP_CHECK: Duration = Duration::from_millis(100);
/// After end of file on a worker's stdout during a task, how long it gets to turn out to be
/// exiting (its fds close a moment before it can be waited for) before it counts as a worker that
/// closed its stdout and lives on.
const CLOSED_OR_DYING: Duration = Duration::from_millis(100);

/// A task on its way to a pool process.
pub struct PoolJob {
    pub task: Task,
    pub timeout: Option<Duration>,
}

/// What a driver tells the foreman loop about its process.
#[derive(Debug)]
pub struct PoolEvent {
    /// The pool's `id`.
    pub pool: usize,
    pub slot: usize,
    pub kind: PoolEventKind,
}

#[derive(Debug)]
pub enum PoolEventKind {
    /// The process said hello and waits for tasks.
    Ready {
        pid: libc::pid_t,
        tasks: BTreeSet<String>,
    },
    /// The process could not start or died before it was healthy; retried after a backoff.
    StartFailed { reason: String, failures: u32 },
    /// The process took a `retire_one` and is gone; its driver has ended.
    Retired { pid: libc::pid_t },
}

/// What the drivers take from the pool's queue.
// A job is moved once, by value, as before there were `Retire`s: boxing it would cost an
// allocation per task.
#[allow(clippy::large_enum_variant)]
enum PoolMsg {
    Job(PoolJob),
    /// The first driver to take it stops its process, which is idle then, and ends: how a reload
    /// replaces a pool's processes one at a time, each after its current task.
    Retire,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Starting,
    Ready,
    Failed,
    /// Retired: its driver has ended.
    Gone,
}

/// The loop's side of one pool (of one generation of it, during a reload): the channel its
/// drivers take jobs from, and what their events said about the processes.
pub struct ProcessPool {
    /// Unique over the daemon's life: its events and its processes' `Children` entries carry it.
    pub id: usize,
    pub name: Arc<str>,
    config: PoolConfig,
    /// What its processes add to the daemon's environment (`Config::launch_env`).
    env: Arc<[(String, OsString)]>,
    jobs: Sender<PoolMsg>,
    /// The same queue as the drivers read, so the loop can take back jobs no process will run.
    backlog: Receiver<PoolMsg>,
    /// Dropped to stop the drivers.
    stop: Option<Sender<()>>,
    /// Given to the drivers started later.
    stopped: Receiver<()>,
    events: Sender<PoolEvent>,
    finished: Sender<Finished>,
    children: Arc<Children>,
    threads: Vec<JoinHandle<()>>,
    /// One per driver started, in start order.
    slots: Vec<SlotState>,
    /// `Retire` messages sent and not taken yet: as many processes are on their way out.
    retiring: usize,
    /// Tasks handed to the pool and not finished yet; the loop keeps it at most `processes()`.
    in_flight: usize,
    /// The task names of the first hello; every later process runs the same command.
    served: Option<BTreeSet<String>>,
    last_error: String,
}

/// What a driver thread needs; one per process slot.
struct Driver {
    pool: usize,
    slot: usize,
    name: Arc<str>,
    config: PoolConfig,
    /// What its processes add to the daemon's environment (`Config::launch_env`).
    env: Arc<[(String, OsString)]>,
    jobs: Receiver<PoolMsg>,
    requeue: Sender<PoolMsg>,
    stop: Receiver<()>,
    events: Sender<PoolEvent>,
    finished: Sender<Finished>,
    children: Arc<Children>,
}

impl ProcessPool {
    /// Starts `processes` of the pool's drivers (at most its configured number; `start_process`
    /// starts the others); each starts its process at once.
    #[allow(clippy::too_many_arguments)] // What every driver gets, handed over once.
    pub fn start(
        id: usize,
        name: &str,
        config: &PoolConfig,
        env: Vec<(String, OsString)>,
        processes: usize,
        events: &Sender<PoolEvent>,
        finished: &Sender<Finished>,
        children: &Arc<Children>,
    ) -> Result<ProcessPool> {
        let (jobs, backlog) = crossbeam_channel::unbounded();
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let mut pool = ProcessPool {
            id,
            name: name.into(),
            config: config.clone(),
            env: env.into(),
            jobs,
            backlog,
            stop: Some(stop),
            stopped,
            events: events.clone(),
            finished: finished.clone(),
            children: Arc::clone(children),
            threads: Vec::with_capacity(config.processes),
            slots: Vec::with_capacity(config.processes),
            retiring: 0,
            in_flight: 0,
            served: None,
            last_error: String::new(),
        };
        for _ in 0..processes.min(config.processes) {
            pool.start_process()?;
        }
        Ok(pool)
    }

    /// Starts one more driver, which starts its process.
    pub fn start_process(&mut self) -> Result<()> {
        let slot = self.slots.len();
        let driver = Driver {
            pool: self.id,
            slot,
            name: Arc::clone(&self.name),
            config: self.config.clone(),
            env: Arc::clone(&self.env),
            jobs: self.backlog.clone(),
            requeue: self.jobs.clone(),
            stop: self.stopped.clone(),
            events: self.events.clone(),
            finished: self.finished.clone(),
            children: Arc::clone(&self.children),
        };
        // PR_SET_PDEATHSIG fires when the thread that forked exits, so the process is always
        // started by this long-lived thread, which outlives it.
        let thread = std::thread::Builder::new()
            .name(format!("foreman-pool-{}-{slot}", self.name))
            .spawn(move || driver.drive())
            .map_err(|e| Error::io("starting a pool driver thread", e))?;
        self.threads.push(thread);
        self.slots.push(SlotState::Starting);
        Ok(())
    }

    /// The processes it is configured to have.
    pub fn target(&self) -> usize {
        self.config.processes
    }

    /// Drivers started, retired ones included.
    pub fn started(&self) -> usize {
        self.slots.len()
    }

    /// Whether a process is starting (or failing to) and has not said hello yet.
    pub fn starting(&self) -> bool {
        self.slots.contains(&SlotState::Starting)
    }

    /// Processes that run or start (a failing one waits out its backoff without a process).
    pub fn running(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, SlotState::Ready | SlotState::Starting))
            .count()
    }

    /// Processes not retired yet (those on their way out included).
    pub fn alive(&self) -> usize {
        self.slots.iter().filter(|s| **s != SlotState::Gone).count()
    }

    /// Asks one process to leave: the first idle one, or the first to finish its task. `false`
    /// when none is left to ask.
    pub fn retire_one(&mut self) -> bool {
        if self.processes() == 0 {
            return false;
        }
        self.retiring += 1;
        // The drivers hold a sender too, so the channel is never disconnected while we hold it.
        let _ = self.jobs.send(PoolMsg::Retire);
        true
    }

    /// Whether every driver has ended (after `request_stop`, or retired), so `join` waits for
    /// nothing.
    pub fn ended(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }

    /// Whether the loop may pop: some process is up, or none can start.
    pub fn settled(&self) -> bool {
        self.slots.contains(&SlotState::Ready) || self.is_down()
    }

    /// No process is up and every one has failed to start several times in a row.
    pub fn is_down(&self) -> bool {
        self.slots
            .iter()
            .filter(|s| **s != SlotState::Gone)
            .all(|s| *s == SlotState::Failed)
    }

    /// Whether a task of this name can be handed to the pool; `Err` is the dead-letter reason.
    pub fn accepts(&self, task_name: &str) -> std::result::Result<(), String> {
        if self.is_down() {
            return Err(format!(
                "pool {:?} cannot start a worker: {}",
                self.name, self.last_error
            ));
        }
        match &self.served {
            Some(served) if !served.contains(task_name) => Err(format!(
                "pool {:?} does not serve task {task_name:?} (its workers serve: {})",
                self.name,
                join(served)
            )),
            _ => Ok(()),
        }
    }

    /// The processes that take tasks: started and not asked to leave.
    pub fn processes(&self) -> usize {
        self.alive().saturating_sub(self.retiring)
    }

    /// Processes that said hello and have not died since.
    pub fn up(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| **s == SlotState::Ready)
            .count()
    }

    /// Why its last process failed to start.
    pub fn last_error(&self) -> &str {
        &self.last_error
    }

    /// The task names its hello announced, once one came.
    pub fn served(&self) -> Option<&BTreeSet<String>> {
        self.served.as_ref()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn submit(&mut self, job: PoolJob) {
        self.in_flight += 1;
        // The drivers hold a sender too, so the channel is never disconnected while we hold it.
        let _ = self.jobs.send(PoolMsg::Job(job));
    }

    /// One of the pool's tasks finished (or was taken back).
    pub fn done_one(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Applies a driver's event. Returns the task names of the pool's first hello, which the loop
    /// routes to it, and the jobs to move to the dead-letter table when the pool just went down.
    pub fn apply(&mut self, slot: usize, kind: PoolEventKind) -> Applied {
        let was_down = self.is_down();
        let mut applied = Applied::default();
        match kind {
            PoolEventKind::Ready { pid, tasks } => {
                if let Some(state) = self.slots.get_mut(slot) {
                    *state = SlotState::Ready;
                }
                if was_down {
                    log::info!(
                        "pool {}: worker pid {pid} started; the pool is up again",
                        self.name
                    );
                } else {
                    log::debug!("pool {}: worker pid {pid} ready", self.name);
                }
                match &self.served {
                    None => {
                        log::info!(
                            "pool {}: worker pid {pid} serves {}",
                            self.name,
                            join(&tasks)
                        );
                        applied.first_hello = Some(tasks.clone());
                        self.served = Some(tasks);
                    }
                    Some(served) if *served != tasks => log::warn!(
                        "pool {}: worker pid {pid} serves {}, unlike the first worker ({}); tasks are routed by the first",
                        self.name,
                        join(&tasks),
                        join(served)
                    ),
                    Some(_) => {}
                }
            }
            PoolEventKind::Retired { pid } => {
                if let Some(state) = self.slots.get_mut(slot) {
                    *state = SlotState::Gone;
                }
                self.retiring = self.retiring.saturating_sub(1);
                log::info!(
                    "pool {}: worker pid {pid} stopped: replaced by the reload",
                    self.name
                );
            }
            PoolEventKind::StartFailed { reason, failures } => {
                let was_failing = self.slots.contains(&SlotState::Failed);
                if failures >= DOWN_AFTER_FAILURES
                    && let Some(state) = self.slots.get_mut(slot)
                {
                    *state = SlotState::Failed;
                }
                self.last_error = reason;
                if self.is_down() {
                    if !was_down {
                        log::error!(
                            "pool {}: no worker can start ({}); its tasks go to foreman_dead until one does",
                            self.name,
                            self.last_error
                        );
                        alert::pool_failing(&self.name, true, failures, &self.last_error);
                    }
                    for message in self.backlog.try_iter() {
                        match message {
                            PoolMsg::Job(job) => applied.orphans.push(job),
                            // No process of a pool that is down can take it: none is left to go.
                            PoolMsg::Retire => self.retiring = self.retiring.saturating_sub(1),
                        }
                    }
                } else if !was_failing && self.slots.contains(&SlotState::Failed) {
                    // Reported once per streak, when the first worker gives up; the pool going
                    // down (every worker) is worse and reported again.
                    alert::pool_failing(&self.name, false, failures, &self.last_error);
                }
            }
        }
        applied
    }

    /// Tells the drivers to stop: idle workers get EOF on stdin, then SIGTERM and SIGKILL if they
    /// linger; no driver takes another job or restarts its process.
    pub fn request_stop(&mut self) {
        self.stop = None;
    }

    /// Stops the drivers and returns when every process is gone.
    pub fn join(mut self) {
        self.stop = None;
        for thread in std::mem::take(&mut self.threads) {
            let _ = thread.join();
        }
    }
}

impl Drop for ProcessPool {
    fn drop(&mut self) {
        // Without `stop` (an error path), the drivers still wind down; the process may exit first,
        // and then PR_SET_PDEATHSIG takes the workers with it.
        self.stop = None;
    }
}

#[derive(Default)]
pub struct Applied {
    pub first_hello: Option<BTreeSet<String>>,
    pub orphans: Vec<PoolJob>,
}

fn join(names: &BTreeSet<String>) -> String {
    if names.is_empty() {
        return "no tasks".to_owned();
    }
    names
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// How a driver's service of one process ended.
enum Ended {
    Stopping,
    /// The process is gone; `healthy` when it served a task or lived long enough to reset the
    /// backoff; `why` says what happened, for the failed-start report.
    Gone {
        healthy: bool,
        why: String,
    },
}

impl Driver {
    fn drive(self) {
        let mut failures = 0u32;
        loop {
            if self.stopping() {
                return;
            }
            match Worker::start(&self) {
                Ok(Some(worker)) => {
                    let _ = self.events.send(PoolEvent {
                        pool: self.pool,
                        slot: self.slot,
                        kind: PoolEventKind::Ready {
                            pid: worker.pid,
                            tasks: worker.tasks.clone(),
                        },
                    });
                    match self.serve(worker) {
                        Ended::Stopping => return,
                        Ended::Gone { healthy: true, .. } => failures = 0,
                        Ended::Gone {
                            healthy: false,
                            why,
                        } => {
                            failures += 1;
                            self.report_failure(
                                format!("died within a second of its hello, before serving a task: {why}"),
                                failures,
                            );
                        }
                    }
                }
                Ok(None) => return, // Stopping while it started.
                Err(reason) => {
                    failures += 1;
                    self.report_failure(reason, failures);
                }
            }
            if failures > 0 {
                let backoff = backoff(failures);
                select! {
                    recv(self.stop) -> _ => return,
                    default(backoff) => {}
                }
            }
        }
    }

    fn report_failure(&self, reason: String, failures: u32) {
        log::warn!(
            "pool {}: worker failed to start (attempt {failures}, retrying in {}): {reason}",
            self.name,
            format_duration(backoff(failures))
        );
        let _ = self.events.send(PoolEvent {
            pool: self.pool,
            slot: self.slot,
            kind: PoolEventKind::StartFailed { reason, failures },
        });
    }

    fn stopping(&self) -> bool {
        matches!(
            self.stop.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        )
    }

    /// Hands jobs to `worker` until it dies or the pool stops.
    fn serve(&self, mut worker: Worker) -> Ended {
        let ready_at = Instant::now();
        let mut served_any = false;
        let healthy = |served_any: bool| served_any || ready_at.elapsed() >= MIN_HEALTHY_LIFE;
        let mut stderr_open = worker.stderr_done.clone();
        loop {
            // Biased: once the pool stops, no job is taken, however many wait.
            select_biased! {
                recv(self.stop) -> _ => {
                    worker.stop(&self.name);
                    return Ended::Stopping;
                }
                recv(stderr_open) -> _ => {
                    // stderr closed: most likely the process exited while idle (it closes its
                    // fds a moment before it can be waited for).
                    if worker.wait_exit(Duration::from_millis(100)) {
                        let status = worker.reap();
                        let why = format!(
                            "worker pid {} exited while idle ({}){}",
                            worker.pid,
                            describe(status),
                            worker.stderr_tail_suffix()
                        );
                        log::warn!("pool {}: {why}", self.name);
                        return Ended::Gone { healthy: healthy(served_any), why };
                    }
                    stderr_open = crossbeam_channel::never();
                }
                recv(self.jobs) -> message => {
                    let job = match message {
                        Ok(PoolMsg::Job(job)) => job,
                        Ok(PoolMsg::Retire) => {
                            // Idle, since it takes messages: nothing of a task is cut short.
                            let pid = worker.pid;
                            worker.stop(&self.name);
                            let _ = self.events.send(PoolEvent {
                                pool: self.pool,
                                slot: self.slot,
                                kind: PoolEventKind::Retired { pid },
                            });
                            return Ended::Stopping;
                        }
                        Err(_) => continue,
                    };
                    match worker.run(job) {
                        Ran::Answered(finished) => {
                            served_any = true;
                            let _ = self.finished.send(finished);
                        }
                        Ran::NotSent(job, what) => {
                            // The job never reached the process: another one may run it.
                            let _ = self.requeue.send(PoolMsg::Job(job));
                            let status = worker.kill();
                            let why = format!(
                                "worker pid {} {what} ({}){}",
                                worker.pid,
                                describe(status),
                                worker.stderr_tail_suffix()
                            );
                            log::warn!("pool {}: {why}", self.name);
                            return Ended::Gone { healthy: healthy(served_any), why };
                        }
                        Ran::Broken(finished) => {
                            let why = match &finished.outcome {
                                Outcome::Failed(reason) | Outcome::Timeout(reason) => reason.clone(),
                                Outcome::Done { .. } => String::new(),
                            };
                            // Killed by `foreman cancel`: a worker stopped on purpose, not one
                            // that fails, so it is started again at once, with no backoff.
                            let aborted = finished.task.cancelled();
                            if aborted {
                                log::info!(
                                    "pool {}: worker pid {} stopped by the abort of task {}; starting another",
                                    self.name, worker.pid, finished.task.id
                                );
                            } else {
                                log::warn!("pool {}: restarting worker pid {}: {why}", self.name, worker.pid);
                            }
                            let _ = self.finished.send(finished);
                            return Ended::Gone { healthy: aborted || healthy(served_any), why };
                        }
                    }
                }
            }
        }
    }
}

/// `timeout` from now; `None` (no deadline) for a timeout too large to represent.
fn deadline_after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (RESTART_BACKOFF_MIN * 2u32.pow(doublings)).min(RESTART_BACKOFF_MAX)
}

/// How one task on a worker went.
enum Ran {
    /// The worker answered; it is ready for the next task.
    Answered(Finished),
    /// The worker was gone before it could read the task, or could not have answered it; says
    /// which.
    NotSent(PoolJob, String),
    /// The task failed with the worker (death, timeout, garbage); the worker is dead and reaped.
    Broken(Finished),
}

/// One running worker process.
struct Worker {
    child: Child,
    pid: libc::pid_t,
    stdin: Option<File>,
    stdout: LineReader,
    pidfd: Option<OwnedFd>,
    /// Disconnected when the stderr reader reaches EOF.
    stderr_done: Receiver<()>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// Where each task's stderr begins and ends, for the reader to tag its lines.
    stderr_tags: Arc<StderrTags>,
    /// `pool py pid 1234`: how its stderr lines are tagged outside a task.
    who: Arc<str>,
    tasks: BTreeSet<String>,
    children: Arc<Children>,
    /// (pool, slot), its key in `children`.
    key: (usize, usize),
}

#[derive(Deserialize)]
struct Hello {
    protocol: u64,
    tasks: Vec<String>,
}

#[derive(Deserialize)]
struct Answer {
    id: i64,
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    /// Whether a successful task found something new (protocol v1, optional).
    #[serde(default)]
    eventful: Option<bool>,
    /// What a successful task returned (protocol v1, optional; `null` is none).
    #[serde(default)]
    result: serde_json::Value,
}

/// A worker's answer line to the task `task_id`: the task's outcome and result, or (one line,
/// quoting the start of the line) the protocol error that fails the task and the worker. A result
/// over the size limit fails the task alone: the worker spoke the protocol.
pub(crate) fn parse_answer(
    line: &[u8],
    task_id: i64,
) -> StdResult<(Outcome, Option<String>), String> {
    match serde_json::from_slice::<Answer>(line) {
        Ok(answer) if answer.id == task_id => Ok(if answer.ok {
            match result_text(&answer.result) {
                Ok(result) => (
                    Outcome::Done {
                        eventful: answer.eventful.unwrap_or(true),
                    },
                    result,
                ),
                Err(too_big) => (Outcome::Failed(too_big), None),
            }
        } else {
            (
                Outcome::Failed(
                    answer
                        .error
                        .unwrap_or_else(|| "failed (the worker gave no error text)".into()),
                ),
                None,
            )
        }),
        Ok(answer) => Err(format!(
            "worker protocol error: answer for task {} while running task {task_id}",
            answer.id
        )),
        Err(e) => Err(format!(
            "worker protocol error: {}: {}",
            bounded(&e.to_string()),
            excerpt(line)
        )),
    }
}

/// The task names a hello line announces, or why it is not a hello this daemon accepts (one line,
/// to follow "worker pid N ").
pub(crate) fn parse_hello(line: &[u8]) -> StdResult<BTreeSet<String>, String> {
    match serde_json::from_slice::<Hello>(line) {
        Ok(hello) if hello.protocol == PROTOCOL_VERSION => Ok(hello.tasks.into_iter().collect()),
        Ok(hello) => Err(format!(
            "speaks protocol {}, this foreman speaks {PROTOCOL_VERSION}",
            hello.protocol
        )),
        Err(e) => Err(format!(
            "wrote a bad hello line ({}): {}",
            bounded(&e.to_string()),
            excerpt(line)
        )),
    }
}

/// serde's messages quote the offending value (escaped, so on one line), which a worker can make
/// a megabyte long: kept to their start.
fn bounded(message: &str) -> String {
    const MAX_CHARS: usize = 200;
    match message.char_indices().nth(MAX_CHARS) {
        Some((end, _)) => format!("{}…", &message[..end]),
        None => message.to_owned(),
    }
}

enum LineError {
    Eof,
    Timeout,
    TooLong,
    Io(io::Error),
}

impl Worker {
    /// Spawns the process and waits for its hello. `Ok(None)` when the pool stopped meanwhile;
    /// `Err` says why the process could not start (it is dead and reaped then).
    fn start(driver: &Driver) -> std::result::Result<Option<Worker>, String> {
        let launch = &driver.config.command;
        let mut argv = launch.argv.clone();
        // A bare program name is found in the daemon's PATH, as for command tasks, even when
        // `env` gives the worker another PATH (std's spawn would search that one).
        if launch.env.contains_key("PATH")
            && let Some(program) = argv.first_mut()
            && !program.contains('/')
            && let Ok(found) = find_executable(program)
        {
            *program = found.display().to_string();
        }
        let mut command = piped_command(&argv)?;
        if let Some(cwd) = &launch.cwd {
            command.current_dir(cwd);
        }
        command
            .envs(driver.env.iter().map(|(key, value)| (key, value)))
            .env("FOREMAN_POOL", &*driver.name)
            .env("FOREMAN_PROTOCOL", PROTOCOL_VERSION.to_string());
        let (mut child, pid) = spawn(&mut command, &argv).map_err(|e| {
            // std says only "No such file or directory" when the `chdir` failed.
            match launch.cwd.as_deref().filter(|cwd| !cwd.is_dir()) {
                Some(cwd) => format!("{e} (its cwd {} is not a directory)", cwd.display()),
                None => e,
            }
        })?;
        driver.children.insert_worker(driver.pool, driver.slot, pid);
        let stdin = child.stdin.take().map(|s| File::from(OwnedFd::from(s)));
        if let Some(stdin) = &stdin {
            set_nonblocking(stdin.as_raw_fd());
        }
        let stdout = child.stdout.take().map(|s| File::from(OwnedFd::from(s)));
        let stderr = child.stderr.take().map(|s| File::from(OwnedFd::from(s)));
        let started = (|| {
            let (Some(stdout), Some(stderr)) = (stdout, stderr) else {
                return Err("the worker's pipes were not set up".to_owned());
            };
            let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
            let tags = Arc::new(StderrTags::new(stderr));
            let who: Arc<str> = format!("pool {} pid {pid}", driver.name).into();
            let stderr_done = log_stderr(&tags, &who, &stderr_tail)?;
            Ok((stdout, stderr_tail, stderr_done, tags, who))
        })();
        let (stdout, stderr_tail, stderr_done, stderr_tags, who) = match started {
            Ok(started) => started,
            Err(e) => {
                // Nothing to talk to it with: stop it and reap it, leaving no zombie.
                kill_group(pid, libc::SIGKILL);
                driver.children.remove_worker(driver.pool, driver.slot);
                let _ = child.wait();
                return Err(e);
            }
        };
        let mut worker = Worker {
            child,
            pid,
            stdin,
            stdout: LineReader::new(stdout),
            pidfd: pidfd_open(pid),
            stderr_done,
            stderr_tail,
            stderr_tags,
            who,
            tasks: BTreeSet::new(),
            children: Arc::clone(&driver.children),
            key: (driver.pool, driver.slot),
        };
        let Some(line) = worker.read_hello(driver)? else {
            return Ok(None);
        };
        let tasks = match parse_hello(&line) {
            Ok(tasks) => tasks,
            Err(why) => {
                worker.kill();
                return Err(format!("worker pid {pid} {why}"));
            }
        };
        if driver.stopping() {
            worker.kill();
            return Ok(None);
        }
        worker.tasks = tasks;
        Ok(Some(worker))
    }

    /// Waits for the hello line (up to `start_timeout`, checking for a stop meanwhile). `Ok(None)`
    /// when the pool stopped; `Err` when the worker failed, and then it is dead and reaped.
    fn read_hello(&mut self, driver: &Driver) -> std::result::Result<Option<Vec<u8>>, String> {
        let deadline = deadline_after(driver.config.start_timeout);
        let line = loop {
            let slice = deadline.map_or(Instant::now() + STOP_CHECK, |d| {
                (Instant::now() + STOP_CHECK).min(d)
            });
            match self.stdout.read_line(Some(slice), self.pidfd.as_ref()) {
                Ok(line) => break line,
                Err(LineError::Timeout) if deadline.is_none_or(|d| Instant::now() < d) => {
                    if driver.stopping() {
                        self.kill();
                        return Ok(None);
                    }
                }
                Err(e) => {
                    let why = match e {
                        LineError::Timeout => format!(
                            "no hello line within {} (start_timeout)",
                            format_duration(driver.config.start_timeout)
                        ),
                        LineError::TooLong => "its hello line is longer than 1 MiB".to_owned(),
                        LineError::Io(e) => format!("reading its stdout: {e}"),
                        LineError::Eof => String::new(),
                    };
                    let status = self.kill();
                    let why = if why.is_empty() {
                        format!("exited before its hello ({})", describe(status))
                    } else {
                        why
                    };
                    return Err(format!(
                        "worker pid {} {why}{}",
                        self.pid,
                        self.stderr_tail_suffix()
                    ));
                }
            }
        };
        Ok(Some(line))
    }

    /// Writes the task, waits for the answer (up to the timeout) and judges it. What the worker
    /// writes to stderr meanwhile is logged tagged with the task.
    fn run(&mut self, job: PoolJob) -> Ran {
        let tag: Arc<str> = format!("task {} {} ({})", job.task.id, job.task.name, self.who).into();
        self.stderr_tags.mark(Some(tag));
        let ran = self.run_tagged(job);
        self.stderr_tags.mark(None);
        ran
    }

    fn run_tagged(&mut self, job: PoolJob) -> Ran {
        if job.task.cancelled() {
            // Aborted while it waited for a process: it never starts.
            return Ran::Answered(Finished {
                task: job.task,
                outcome: Outcome::Failed(CANCELLED_BEFORE_START.to_owned()),
                elapsed: Duration::ZERO,
                result: None,
                exit_code: None,
            });
        }
        if let Some(what) = self.broken_while_idle() {
            return Ran::NotSent(job, what);
        }
        let children = Arc::clone(&self.children);
        let started = Instant::now();
        let deadline = job.timeout.and_then(deadline_after);
        children.insert(job.task.id, self.pid);
        log::debug!(
            "task {} {} started on worker pid {}",
            job.task.id,
            job.task.name,
            self.pid
        );
        let line = job.task.to_json_line();
        let mut stdin_broke = false;
        let result = match self.write_all(line.as_bytes(), deadline) {
            Ok(()) => self.stdout.read_line(deadline, self.pidfd.as_ref()),
            Err(WriteError::NothingWritten) => {
                children.remove(job.task.id);
                return Ran::NotSent(job, "was gone when a task came".to_owned());
            }
            Err(WriteError::Timeout) => Err(LineError::Timeout),
            // EOF as far as the answer goes, but the message must say which pipe broke.
            Err(WriteError::Broken) => {
                stdin_broke = true;
                Err(LineError::Eof)
            }
        };
        let task = job.task;
        let finished = |task, outcome| Finished {
            task,
            outcome,
            elapsed: started.elapsed(),
            result: None,
            exit_code: None,
        };
        let failure = match result {
            Ok(answer) => match parse_answer(&answer, task.id) {
                Ok((outcome, result)) => {
                    children.remove(task.id);
                    return Ran::Answered(Finished {
                        result,
                        ..finished(task, outcome)
                    });
                }
                Err(why) => why,
            },
            Err(LineError::Timeout) => {
                let reason = match job.timeout {
                    Some(timeout) => format!("timeout after {}", format_duration(timeout)),
                    None => "timeout".to_owned(),
                };
                self.kill_keeping_group(&children, task.id);
                return Ran::Broken(finished(task, Outcome::Timeout(reason)));
            }
            Err(LineError::TooLong) => {
                "worker protocol error: an answer line longer than 1 MiB".to_owned()
            }
            Err(LineError::Io(e)) => format!("reading the worker's answer: {e}"),
            Err(LineError::Eof) => {
                // End of file on stdout: the process is exiting, or it closed its stdout and so
                // can never answer (it is killed then, like a dead one, and restarted).
                let (broke, what) = if self.wait_exit(CLOSED_OR_DYING) {
                    ("", "died during the task")
                } else if stdin_broke {
                    (
                        "worker protocol error: ",
                        "closed its stdin before it had read the task",
                    )
                } else {
                    (
                        "worker protocol error: ",
                        "closed its stdout without answering",
                    )
                };
                let status = self.kill_keeping_group(&children, task.id);
                let reason = format!(
                    "{broke}worker pid {} {what} ({}){}",
                    self.pid,
                    describe(status),
                    self.stderr_tail_suffix()
                );
                return Ran::Broken(finished(task, Outcome::Failed(reason)));
            }
        };
        self.kill_keeping_group(&children, task.id);
        Ran::Broken(finished(task, Outcome::Failed(failure)))
    }

    /// Whether the worker broke the protocol between two tasks, so that it could not answer the
    /// next one (it closed its stdout, or exited) or its answer could not be told from what it
    /// wrote unasked. Such a worker gets no task: it is restarted, and the task goes to another.
    fn broken_while_idle(&mut self) -> Option<String> {
        if !self.stdout.buf.is_empty() {
            return Some(format!(
                "wrote to its stdout between tasks: {}",
                excerpt(&self.stdout.buf)
            ));
        }
        let mut fds = [pollfd(self.stdout.file.as_raw_fd(), libc::POLLIN)];
        if !poll(&mut fds, Some(Duration::ZERO)).is_ok_and(|ready| ready > 0) {
            return None; // Nothing to read: as it should be.
        }
        let mut chunk = [0u8; 256];
        match self.stdout.file.read(&mut chunk) {
            Ok(0) => Some("closed its stdout between tasks".to_owned()),
            Ok(n) => Some(format!(
                "wrote to its stdout between tasks: {}",
                excerpt(&chunk[..n])
            )),
            Err(e) => Some(format!("cannot read its stdout: {e}")),
        }
    }

    /// Kills the worker, forgetting its task's process group only once it has exited, so the
    /// loop's shutdown signals never reach a recycled pid.
    fn kill_keeping_group(&mut self, children: &Children, task_id: i64) -> ExitStatus {
        self.terminate();
        children.remove(task_id);
        self.reap()
    }

    fn write_all(
        &mut self,
        mut data: &[u8],
        deadline: Option<Instant>,
    ) -> StdResult<(), WriteError> {
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(WriteError::NothingWritten);
        };
        let mut written_any = false;
        while !data.is_empty() {
            match stdin.write(data) {
                Ok(n) => {
                    written_any = true;
                    data = &data[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A big task and a worker not reading yet: wait, but not past the timeout.
                    let mut fds = [pollfd(stdin.as_raw_fd(), libc::POLLOUT)];
                    let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                    if poll(&mut fds, timeout).is_ok_and(|ready| ready == 0) {
                        return Err(WriteError::Timeout);
                    }
                }
                Err(_) if written_any => return Err(WriteError::Broken),
                Err(_) => return Err(WriteError::NothingWritten),
            }
        }
        Ok(())
    }

    /// Waits (bounded) for the process to exit after SIGTERM, then SIGKILLs its group. Leaves the
    /// process unreaped.
    fn terminate(&mut self) {
        self.stdin = None;
        kill_group(self.pid, libc::SIGTERM);
        if !self.wait_exit(KILL_GRACE) {
            kill_group(self.pid, libc::SIGKILL);
            wait_exited_no_reap(self.pid);
        }
    }

    /// Terminates and reaps the worker; returns its exit status.
    fn kill(&mut self) -> ExitStatus {
        self.terminate();
        self.reap()
    }

    /// Kills what is left of the exited worker's process group (its own children), then reaps it.
    /// In that order: until the leader is reaped, its pid cannot be reused for another group.
    fn reap(&mut self) -> ExitStatus {
        kill_group(self.pid, libc::SIGKILL);
        self.children.remove_worker(self.key.0, self.key.1);
        let status = self
            .child
            .wait()
            .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL));
        // Let the stderr reader log the last lines before they are quoted.
        let _ = self.stderr_done.recv_timeout(Duration::from_millis(200));
        status
    }

    /// Graceful stop: EOF on stdin, a little time to exit, then signals.
    fn stop(&mut self, pool: &str) {
        self.stdin = None;
        if !self.wait_exit(STOP_WAIT) {
            log::warn!(
                "pool {pool}: worker pid {} did not exit within {} of closing its stdin; terminating it",
                self.pid,
                format_duration(STOP_WAIT)
            );
            self.terminate();
        }
        self.reap();
    }

    /// Whether the process exited within `limit` (without reaping it).
    fn wait_exit(&self, limit: Duration) -> bool {
        let Some(pidfd) = &self.pidfd else {
            // No pidfd (Linux < 5.3): check a few times instead.
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline {
                if has_exited(self.pid) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            return has_exited(self.pid);
        };
        let mut fds = [pollfd(pidfd.as_raw_fd(), libc::POLLIN)];
        let deadline = Instant::now() + limit;
        loop {
            match poll(
                &mut fds,
                Some(deadline.saturating_duration_since(Instant::now())),
            ) {
                Ok(ready) => return ready > 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    fn stderr_tail_suffix(&self) -> String {
        let tail = self
            .stderr_tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if tail.is_empty() {
            String::new()
        } else {
            let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
            format!("; last stderr line: {}", lines.join(" | "))
        }
    }
}

enum WriteError {
    /// Not a byte reached the pipe: the worker was already gone.
    NothingWritten,
    Broken,
    Timeout,
}

/// The start of a line for an error message: bounded, and readable even when it is binary.
fn excerpt(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(&line[..line.len().min(200)]);
    format!("{:?}", text.trim_end())
}

/// Reads newline-terminated lines from a worker's stdout with a deadline, never holding more than
/// one line's worth of bytes.
struct LineReader {
    file: File,
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a newline.
    scanned: usize,
}

impl LineReader {
    fn new(file: File) -> Self {
        LineReader {
            file,
            buf: Vec::with_capacity(4096),
            scanned: 0,
        }
    }

    /// The next line without its newline. A process that exited (its pidfd is readable) with
    /// nothing more to read gives `Eof`, even if a grandchild still holds the pipe open.
    fn read_line(
        &mut self,
        deadline: Option<Instant>,
        pidfd: Option<&OwnedFd>,
    ) -> StdResult<Vec<u8>, LineError> {
        loop {
            if let Some(pos) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + pos;
                let line = self.buf[..end].to_vec();
                self.buf.drain(..=end);
                self.scanned = 0;
                return Ok(line);
            }
            self.scanned = self.buf.len();
            if self.buf.len() > MAX_LINE_BYTES {
                return Err(LineError::TooLong);
            }
            let mut fds = [
                pollfd(self.file.as_raw_fd(), libc::POLLIN),
                pollfd(pidfd.map_or(-1, AsRawFd::as_raw_fd), libc::POLLIN),
            ];
            let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            match poll(&mut fds, timeout) {
                Ok(0) => return Err(LineError::Timeout),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(LineError::Io(e)),
            }
            if fds[0].revents == 0 {
                return Err(LineError::Eof); // Exited without writing anything more.
            }
            let mut chunk = [0u8; 8192];
            match self.file.read(&mut chunk) {
                Ok(0) => return Err(LineError::Eof),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LineError::Io(e)),
            }
        }
    }
}

/// Which task a worker's stderr belongs to, by position in the stream: the driver marks where
/// each task's bytes begin and end, and the reader tags each line by the mark in force at its
/// first byte. Both count bytes under one lock (the reader what it took from the pipe, the driver
/// that plus what is still in it), so a line the worker wrote just before its answer is its
/// task's, even when the reader gets to it after the answer, or during the next task.
struct StderrTags {
    /// The daemon's end of the pipe; the reader's, and the driver's to ask how much is unread.
    pipe: File,
    state: Mutex<TagState>,
}

struct TagState {
    /// Bytes the reader has taken out of the pipe.
    read: u64,
    /// From which byte each tag applies (`None`: no task), in stream order. The first one
    /// applies at the reader's position.
    marks: VecDeque<(u64, Option<Arc<str>>)>,
}

impl StderrTags {
    fn new(pipe: File) -> Self {
        StderrTags {
            pipe,
            state: Mutex::new(TagState {
                read: 0,
                marks: VecDeque::from([(0, None)]),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TagState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// From the next byte the worker writes, its stderr is `tag`'s.
    fn mark(&self, tag: Option<Arc<str>>) {
        let mut state = self.lock();
        let mut unread: libc::c_int = 0;
        // SAFETY: FIONREAD writes the count of unread bytes to the int it is given.
        if unsafe { libc::ioctl(self.pipe.as_raw_fd(), libc::FIONREAD, &raw mut unread) } != 0 {
            unread = 0;
        }
        let at = state.read + u64::try_from(unread).unwrap_or(0);
        state.marks.push_back((at, tag));
    }

    /// Reads what the pipe holds (after `poll` said it holds something), counting it; `Ok(0)` at
    /// EOF. Returns with the lock held, so that the lines are tagged before the next mark.
    fn read<'s>(
        &'s self,
        chunk: &mut [u8],
    ) -> io::Result<(usize, std::sync::MutexGuard<'s, TagState>)> {
        let mut state = self.lock();
        let n = (&self.pipe).read(chunk)?;
        state.read += n as u64;
        Ok((n, state))
    }
}

impl TagState {
    /// The tag of the byte at `offset`, which is at or after every earlier one asked about.
    fn tag_at(&mut self, offset: u64) -> Option<Arc<str>> {
        while self.marks.len() > 1 && self.marks[1].0 <= offset {
            self.marks.pop_front();
        }
        self.marks.front().and_then(|(_, tag)| tag.clone())
    }
}

/// Logs a worker's stderr line by line from its own thread, tagged with the task running when the
/// line began (`task 42 app.x (pool py pid 1234) stderr: …`) or with the process (`pool py pid
/// 1234 stderr: …`), keeping the last lines for error messages. The returned channel disconnects
/// at EOF.
fn log_stderr(
    tags: &Arc<StderrTags>,
    who: &Arc<str>,
    tail: &Arc<Mutex<VecDeque<String>>>,
) -> std::result::Result<Receiver<()>, String> {
    let (done_tx, done) = crossbeam_channel::bounded::<()>(0);
    let tags = Arc::clone(tags);
    let who = Arc::clone(who);
    let tail = Arc::clone(tail);
    std::thread::Builder::new()
        .name(format!("foreman-{who}-stderr"))
        .spawn(move || {
            let _done = done_tx;
            // The current line, the offset of its first byte and its tag.
            let mut partial = Vec::new();
            let mut partial_tag: Option<Arc<str>> = None;
            let mut chunk = [0u8; 8192];
            let mut lines: Vec<(Option<Arc<str>>, Vec<u8>)> = Vec::new();
            let mut budget = LineBudget::new();
            let mut emit = |tag: Option<&Arc<str>>, line: &[u8]| {
                let text = String::from_utf8_lossy(line);
                let text = text.trim_end_matches('\r');
                budget.log(tag.map_or(&*who, |t| t), "stderr", text);
                if text.trim().is_empty() {
                    return;
                }
                let mut tail = tail.lock().unwrap_or_else(PoisonError::into_inner);
                if tail.len() == STDERR_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(text.chars().take(500).collect());
            };
            loop {
                // Waits outside the lock, so a driver's mark never waits for the worker's output.
                let mut fds = [pollfd(tags.pipe.as_raw_fd(), libc::POLLIN)];
                match poll(&mut fds, None) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
                let (n, mut state) = match tags.read(&mut chunk) {
                    Ok((0, _)) => break,
                    Ok(read) => read,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let mut offset = state.read - n as u64;
                let mut data = &chunk[..n];
                while !data.is_empty() {
                    if partial.is_empty() {
                        partial_tag = state.tag_at(offset);
                    }
                    let (piece, ended) = match data.iter().position(|&b| b == b'\n') {
                        Some(pos) => (&data[..pos], pos + 1),
                        None => (data, data.len()),
                    };
                    partial.extend_from_slice(piece);
                    let complete = ended > piece.len();
                    if complete || partial.len() >= MAX_STDERR_LINE_BYTES {
                        lines.push((partial_tag.take(), std::mem::take(&mut partial)));
                    }
                    offset += ended as u64;
                    data = &data[ended..];
                }
                drop(state);
                for (tag, line) in lines.drain(..) {
                    emit(tag.as_ref(), &line);
                }
            }
            if !partial.is_empty() {
                emit(partial_tag.as_ref(), &partial);
            }
            budget.finish(&who);
        })
        .map(drop)
        .map_err(|e| format!("cannot start the stderr reader thread: {e}"))?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(50), RESTART_BACKOFF_MAX);
    }

    #[test]
    fn excerpt_is_bounded_and_quoted() {
        let long = vec![b'x'; 5000];
        assert!(excerpt(&long).len() < 210);
        assert_eq!(excerpt(b"hi\xff"), "\"hi\u{fffd}\"");
    }
}

/// Property tests ("fuzzing") of what the daemon reads from a worker's stdout: any bytes give an
/// outcome or one bounded line of protocol error, never a panic. Run longer with
/// `PROPTEST_CASES=200000 cargo test --release --lib fuzz` (see CONTRIBUTING.md, *Fuzzing*).
#[cfg(test)]
mod fuzz {
    use std::io::{Seek, Write as _};

    use proptest::prelude::*;

    use super::*;

    /// Bytes that are often almost an answer: JSON punctuation, the protocol's keys, UTF-8 and not.
    fn line_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            "[{}\\[\\]\":,0-9 \\\\]{0,12}(id|ok|error|eventful|protocol|tasks|true|false|null)?[{}\\[\\]\":,0-9 ]{0,12}"
                .prop_map(String::into_bytes),
            (any::<i64>(), any::<bool>(), any::<Option<String>>(), any::<Option<bool>>()).prop_map(
                |(id, ok, error, eventful)| {
                    serde_json::json!({"id": id, "ok": ok, "error": error, "eventful": eventful})
                        .to_string()
                        .into_bytes()
                }
            ),
        ]
    }

    fn one_bounded_line(why: &str) -> std::result::Result<(), TestCaseError> {
        prop_assert!(!why.contains('\n'), "{why}");
        prop_assert!(why.chars().count() < 600, "{} chars", why.chars().count());
        Ok(())
    }

    proptest! {
        #![proptest_config(crate::fuzz_config(256))]

        #[test]
        fn any_answer_line_is_an_outcome_or_a_protocol_error(line in line_bytes(), id in any::<i64>()) {
            match parse_answer(&line, id) {
                Ok((Outcome::Done { .. } | Outcome::Failed(_), _)) => {
                    let doc: serde_json::Value = serde_json::from_slice(&line).unwrap();
                    prop_assert_eq!(&doc["id"], &serde_json::json!(id));
                }
                Ok((Outcome::Timeout(_), _)) => prop_assert!(false, "an answer is never a timeout"),
                Err(why) => {
                    prop_assert!(why.starts_with("worker protocol error: "), "{why}");
                    one_bounded_line(&why)?;
                }
            }
        }

        #[test]
        fn a_well_formed_answer_is_understood(id in any::<i64>(), ok in any::<bool>(), error in any::<Option<String>>(), eventful in any::<Option<bool>>()) {
            let line = serde_json::json!({"id": id, "ok": ok, "error": error, "eventful": eventful, "extra": [1]}).to_string();
            let (outcome, result) = parse_answer(line.as_bytes(), id).map_err(TestCaseError::fail)?;
            prop_assert_eq!(result, None);
            match outcome {
                Outcome::Done { eventful: e } => prop_assert!(ok && e == eventful.unwrap_or(true)),
                Outcome::Failed(text) => {
                    prop_assert!(!ok);
                    if let Some(error) = error {
                        prop_assert_eq!(text, error);
                    }
                }
                Outcome::Timeout(_) => prop_assert!(false),
            }
            let other = id.wrapping_add(1);
            prop_assert!(parse_answer(line.as_bytes(), other).unwrap_err().contains("answer for task"));
        }

        #[test]
        fn any_hello_line_is_task_names_or_one_line_why(line in line_bytes()) {
            if let Err(why) = parse_hello(&line) {
                one_bounded_line(&why)?;
            }
        }

        /// The line reader splits any byte stream (here a file, read in 8 KiB chunks) into the
        /// same lines as a plain split, and ends at the end.
        #[test]
        fn the_line_reader_splits_any_stream(bytes in proptest::collection::vec(any::<u8>(), 0..20_000)) {
            // Newlines often enough for short lines and long ones, across chunk boundaries.
            let data: Vec<u8> = bytes.iter().map(|&b| if b < 4 { b'\n' } else { b }).collect();
            let mut file = tempfile::tempfile().unwrap();
            file.write_all(&data).unwrap();
            file.rewind().unwrap();
            let mut reader = LineReader::new(file);
            let mut lines = Vec::new();
            loop {
                match reader.read_line(None, None) {
                    Ok(line) => lines.push(line),
                    Err(LineError::Eof) => break,
                    Err(LineError::TooLong | LineError::Timeout | LineError::Io(_)) => {
                        prop_assert!(false, "a short stream gave something else than lines");
                    }
                }
            }
            let complete = data.iter().rposition(|&b| b == b'\n').map_or(0, |end| end + 1);
            let want: Vec<&[u8]> = data[..complete].split(|&b| b == b'\n').collect();
            prop_assert_eq!(lines.len() + 1, want.len());
            for (got, want) in lines.iter().zip(&want) {
                prop_assert_eq!(got.as_slice(), *want);
            }
        }
    }

    #[test]
    fn a_line_past_the_limit_is_too_long_not_a_huge_buffer() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![b'x'; 3 * MAX_LINE_BYTES]).unwrap();
        file.rewind().unwrap();
        let mut reader = LineReader::new(file);
        assert!(matches!(
            reader.read_line(None, None),
            Err(LineError::TooLong)
        ));
        assert!(reader.buf.len() <= MAX_LINE_BYTES + 8192);
    }

    #[test]
    fn a_huge_bad_value_is_quoted_short() {
        let line = format!("{{\"id\": \"{}\", \"ok\": true}}", "y".repeat(1 << 20));
        let why = parse_answer(line.as_bytes(), 1).unwrap_err();
        assert!(
            why.len() < 600 && why.starts_with("worker protocol error: invalid type"),
            "{why}"
        );
    }
}
