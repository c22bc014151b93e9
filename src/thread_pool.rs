//! `ThreadPool`: a fixed set of worker threads fed through one job queue. Each runs one task at a time and
//! reports a `Finished` back to the foreman loop; a panicking handler fails its task, never the pool.

use std::any::Any;
use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::Sender;

use crate::children::Children;
use crate::command::ResultFiles;
use crate::error::{Error, Result};
use crate::outcome::{
    CANCELLED_BEFORE_START, Finished, Outcome, PANIC_PREFIX, Reported, Uneventful, result_text,
};
use crate::registry::Handler;
use crate::task::Task;
use crate::{alert, command};

pub struct Job {
    pub task: Task,
    pub handler: Handler,
}

pub struct ThreadPool {
    jobs: Arc<Inbox>,
    /// Where command tasks write their results; removed with the pool.
    results: Arc<ResultFiles>,
    _threads: Vec<JoinHandle<()>>,
}

/// The workers' job queue. A mutex and a condition variable rather than a channel: an idle worker
/// then sleeps at once, where a channel's receiver spins and yields first, which on a 2-core
/// machine took CPU from the foreman loop at every hand-off.
#[derive(Default)]
struct Inbox {
    queue: Mutex<(VecDeque<Job>, bool)>,
    ready: Condvar,
}

impl Inbox {
    /// The next job; `None` once the pool is closed.
    fn take(&self) -> Option<Job> {
        let mut guard = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(job) = guard.0.pop_front() {
                return Some(job);
            }
            if guard.1 {
                return None;
            }
            guard = self
                .ready
                .wait(guard)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        // Workers finish what they hold and stop, as they did when a channel's sender was dropped.
        let mut guard = self
            .jobs
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        guard.1 = true;
        self.jobs.ready.notify_all();
        drop(guard);
        // The workers are not joined (one may run an in-process handler that never returns), so
        // the last of them may outlive the process: the directory goes now.
        self.results.remove();
    }
}

impl ThreadPool {
    /// Starts `workers` threads. The foreman loop submits no more jobs than there are idle workers
    /// plus its `prefetch`, so only prefetched tasks ever wait in the channel.
    pub fn start(
        workers: usize,
        finished: &Sender<Finished>,
        children: &Arc<Children>,
    ) -> Result<ThreadPool> {
        let jobs = Arc::new(Inbox::default());
        let results = Arc::new(ResultFiles::default());
        let threads = (0..workers)
            .map(|n| {
                let inbox = Arc::clone(&jobs);
                let finished = finished.clone();
                let children = Arc::clone(children);
                let results = Arc::clone(&results);
                std::thread::Builder::new()
                    .name(format!("foreman-worker-{n}"))
                    .spawn(move || work(&inbox, &finished, &children, &results))
                    .map_err(|e| Error::io("starting a worker thread", e))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ThreadPool {
            jobs,
            results,
            _threads: threads,
        })
    }

    pub fn submit(&self, job: Job) {
        let mut guard = self
            .jobs
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        guard.0.push_back(job);
        drop(guard);
        self.jobs.ready.notify_one();
    }
}

fn work(inbox: &Inbox, finished: &Sender<Finished>, children: &Children, results: &ResultFiles) {
    while let Some(Job { task, handler }) = inbox.take() {
        let started = Instant::now();
        log::debug!("task {} {} started", task.id, task.name);
        let reported = if task.cancelled() {
            // Aborted while it waited for this worker (prefetched): it never starts.
            Outcome::Failed(CANCELLED_BEFORE_START.to_owned()).into()
        } else {
            match catch_unwind(AssertUnwindSafe(|| run(&task, &handler, children, results))) {
                Ok(reported) => reported,
                Err(panic) => {
                    Outcome::Failed(format!("{PANIC_PREFIX}{}", panic_message(panic.as_ref())))
                        .into()
                }
            }
        };
        let report = Finished {
            task,
            outcome: reported.outcome,
            elapsed: started.elapsed(),
            result: reported.result,
            exit_code: reported.exit_code,
        };
        if finished.send(report).is_err() {
            return; // The foreman loop is gone; nobody is left to tell.
        }
    }
}

fn run(task: &Task, handler: &Handler, children: &Children, results: &ResultFiles) -> Reported {
    match handler {
        // The panic hook runs before the unwinding: inside the scope, so its event names the task.
        Handler::InProcess(f) => match alert::in_task_scope(task, || f(task)) {
            Ok(None) => Outcome::Done { eventful: true }.into(),
            Ok(Some(value)) => match result_text(&value) {
                Ok(result) => Reported {
                    outcome: Outcome::Done { eventful: true },
                    result,
                    exit_code: None,
                },
                Err(too_big) => Outcome::Failed(too_big).into(),
            },
            Err(e) if e.is::<Uneventful>() => Outcome::Done { eventful: false }.into(),
            Err(e) => Outcome::Failed(e.to_string()).into(),
        },
        Handler::Command { argv, timeout } => command::run(task, argv, *timeout, children, results),
        Handler::Pool { .. } => {
            Outcome::Failed("a pool task reached a worker thread".to_owned()).into()
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic payload)")
}
