//! `ThreadPool`: a fixed set of worker threads fed through one job queue. Each runs one task at a time and
//! reports a `Finished` back to the foreman loop; a panicking handler fails its task, never the pool.

use std::any::Any;
use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
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
    /// Workers started (and not asked to leave), and how the next one is named.
    workers: usize,
    next_number: usize,
    /// What every worker is given, kept to start more on a reload.
    finished: Sender<Finished>,
    children: Arc<Children>,
}

/// The workers' job queue. A mutex and a condition variable rather than a channel: an idle worker
/// then sleeps at once, where a channel's receiver spins and yields first, which on a 2-core
/// machine took CPU from the foreman loop at every hand-off.
#[derive(Default)]
struct Inbox {
    queue: Mutex<Queue>,
    ready: Condvar,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// The pool is gone: every worker ends once the queue is empty.
    closed: bool,
    /// Workers asked to end (fewer `workers` after a reload): as many idle ones do.
    retire: usize,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next job; `None` once the pool is closed, or this worker is one asked to end.
    fn take(&self) -> Option<Job> {
        let mut guard = self.lock();
        loop {
            if let Some(job) = guard.jobs.pop_front() {
                return Some(job);
            }
            if guard.closed {
                return None;
            }
            if guard.retire > 0 {
                guard.retire -= 1;
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
        let mut guard = self.jobs.lock();
        guard.closed = true;
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
        let mut pool = ThreadPool {
            jobs: Arc::new(Inbox::default()),
            results: Arc::new(ResultFiles::default()),
            workers: 0,
            next_number: 0,
            finished: finished.clone(),
            children: Arc::clone(children),
        };
        pool.resize(workers)?;
        Ok(pool)
    }

    /// Starts workers, or asks idle ones to end, until there are `workers`. A worker ends only
    /// when it holds no task: what runs on it finishes first. The threads are not joined (see
    /// `Drop`): one that ends is gone by itself.
    pub fn resize(&mut self, workers: usize) -> Result<()> {
        if workers < self.workers {
            let mut guard = self.jobs.lock();
            guard.retire += self.workers - workers;
            self.workers = workers;
            self.jobs.ready.notify_all();
            return Ok(());
        }
        // Ones asked to end and still waiting are kept instead.
        let kept = {
            let mut guard = self.jobs.lock();
            let kept = guard.retire.min(workers - self.workers);
            guard.retire -= kept;
            kept
        };
        self.workers += kept;
        while self.workers < workers {
            let inbox = Arc::clone(&self.jobs);
            let finished = self.finished.clone();
            let children = Arc::clone(&self.children);
            let results = Arc::clone(&self.results);
            // PR_SET_PDEATHSIG of a command's process fires when this thread ends: it ends only
            // idle, with no process of its own running.
            std::thread::Builder::new()
                .name(format!("foreman-worker-{}", self.next_number))
                .spawn(move || work(&inbox, &finished, &children, &results))
                .map_err(|e| Error::io("starting a worker thread", e))?;
            self.next_number += 1;
            self.workers += 1;
        }
        Ok(())
    }

    pub fn submit(&self, job: Job) {
        let mut guard = self.jobs.lock();
        guard.jobs.push_back(job);
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
        Handler::Command { command, timeout } => {
            command::run(task, command, *timeout, children, results)
        }
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
