//! `ThreadPool`: a fixed set of worker threads fed over a channel. Each runs one task at a time and
//! reports a `Finished` back to the foreman loop; a panicking handler fails its task, never the pool.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::children::Children;
use crate::error::{Error, Result};
use crate::registry::Handler;
use crate::task::Task;
use crate::{alert, command};

/// How a panicking handler's failure starts, so that `alert` can tell that the panic integration
/// already reported it.
pub(crate) const PANIC_PREFIX: &str = "handler panicked: ";

pub struct Job {
    pub task: Task,
    pub handler: Handler,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `eventful`: the task found something new (what adaptive schedules feed on); a handler that
    /// does not say counts as eventful.
    Done {
        eventful: bool,
    },
    Failed(String),
    /// Killed at its timeout.
    Timeout(String),
}

/// A task that finished, handed back to the foreman loop whole (a retry needs its arguments).
#[derive(Debug)]
pub struct Finished {
    pub task: Task,
    pub outcome: Outcome,
    pub elapsed: Duration,
}

/// What an in-process handler returns (as its error) to say it succeeded but found nothing new.
#[derive(Debug, Clone, Copy)]
pub struct Uneventful;

impl std::fmt::Display for Uneventful {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("uneventful")
    }
}

impl std::error::Error for Uneventful {}

pub struct ThreadPool {
    jobs: Sender<Job>,
    _threads: Vec<JoinHandle<()>>,
}

impl ThreadPool {
    /// Starts `workers` threads. The foreman loop submits no more jobs than there are idle workers
    /// plus its `prefetch`, so only prefetched tasks ever wait in the channel.
    pub fn start(
        workers: usize,
        finished: &Sender<Finished>,
        children: &Arc<Children>,
    ) -> Result<ThreadPool> {
        let (jobs, inbox) = crossbeam_channel::unbounded::<Job>();
        let threads = (0..workers)
            .map(|n| {
                let inbox = inbox.clone();
                let finished = finished.clone();
                let children = Arc::clone(children);
                std::thread::Builder::new()
                    .name(format!("foreman-worker-{n}"))
                    .spawn(move || work(&inbox, &finished, &children))
                    .map_err(|e| Error::io("starting a worker thread", e))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ThreadPool {
            jobs,
            _threads: threads,
        })
    }

    pub fn submit(&self, job: Job) {
        // Workers only stop when this sender is dropped, so a send cannot fail while we hold it.
        let _ = self.jobs.send(job);
    }
}

fn work(inbox: &Receiver<Job>, finished: &Sender<Finished>, children: &Children) {
    for Job { task, handler } in inbox {
        let started = Instant::now();
        log::debug!("task {} {} started", task.id, task.name);
        let outcome = match catch_unwind(AssertUnwindSafe(|| run(&task, &handler, children))) {
            Ok(outcome) => outcome,
            Err(panic) => {
                Outcome::Failed(format!("{PANIC_PREFIX}{}", panic_message(panic.as_ref())))
            }
        };
        let report = Finished {
            task,
            outcome,
            elapsed: started.elapsed(),
        };
        if finished.send(report).is_err() {
            return; // The foreman loop is gone; nobody is left to tell.
        }
    }
}

fn run(task: &Task, handler: &Handler, children: &Children) -> Outcome {
    match handler {
        // The panic hook runs before the unwinding: inside the scope, so its event names the task.
        Handler::InProcess(f) => match alert::in_task_scope(task, || f(task)) {
            Ok(()) => Outcome::Done { eventful: true },
            Err(e) if e.is::<Uneventful>() => Outcome::Done { eventful: false },
            Err(e) => Outcome::Failed(e.to_string()),
        },
        Handler::Command { argv, timeout } => command::run(task, argv, *timeout, children),
        Handler::Pool { .. } => Outcome::Failed("a pool task reached a worker thread".to_owned()),
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic payload)")
}
