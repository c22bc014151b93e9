//! What the operator asks of the loop through the database (`Store::control`): the paused task
//! names, which the pop sets aside and the schedules skip, and the running attempts to abort,
//! which get their cancellation flag and their process group signalled (SIGTERM, then SIGKILL
//! after their grace). The loop keeps the last answer and asks again only on a control wake, or
//! at a tick after the database changed: the pop never reads the pause table.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::Foreman;
use super::upkeep::LOOK_ANYWAY;
use crate::store::{AbortRequest, ChangeToken};

/// Rows put back per transaction after a resume, and the longest `fill` spends on it at once: a
/// large backlog goes back in steps, between which the loop pops.
const UNPAUSE_BATCH: usize = 2000;
const UNPAUSE_SLICE: Duration = Duration::from_millis(20);

/// The control state as the loop last read it.
pub(super) struct Control {
    /// Paused task names.
    paused: HashSet<String>,
    /// `foreman pause --all`: nothing is popped.
    pub(super) all_paused: bool,
    /// Rows a lifted pause set aside may still wait outside the pop's index.
    unpausing: bool,
    /// What had been committed when the state was read, and when.
    seen: Option<ChangeToken>,
    at: Instant,
    /// Aborted attempts, by task id, whose process group gets SIGKILL then if they still run.
    kills: Vec<(i64, Instant)>,
}

impl Default for Control {
    fn default() -> Control {
        Control {
            paused: HashSet::new(),
            all_paused: false,
            // A resume while no daemon ran leaves rows set aside: look once at startup.
            unpausing: true,
            seen: None,
            at: Instant::now(),
            kills: Vec::new(),
        }
    }
}

impl Control {
    /// Whether tasks of `name` are held back. The common case, nothing paused, costs one branch.
    pub(super) fn is_paused(&self, name: &str) -> bool {
        self.all_paused || (!self.paused.is_empty() && self.paused.contains(name))
    }

    /// When the next SIGKILL of an aborted attempt is due.
    pub(super) fn next_kill(&self) -> Option<Instant> {
        self.kills.iter().map(|(_, at)| *at).min()
    }
}

impl Foreman {
    /// Reads the control state again if a control wake came, or if the database changed since
    /// the last read (or long ago): the tick's and the wake's check.
    pub(super) fn watch_control(&mut self, poked: bool) {
        let stamp = self.store.changes();
        // A store that cannot tell what changed is looked at every tick, unless the wake source
        // tells of every control change itself (PostgreSQL's `NOTIFY foreman, 'control'`).
        let changed = (stamp.is_none() && !self.wake.tells_control())
            || stamp != self.control.seen
            || self.control.at.elapsed() >= LOOK_ANYWAY;
        if poked || changed {
            self.read_control(stamp);
        }
    }

    /// Reads the paused names and the abort requests, and acts on what changed.
    pub(super) fn read_control(&mut self, stamp: Option<ChangeToken>) {
        let control = match self.store.control() {
            Ok(control) => control,
            Err(e) => {
                self.db_error("cannot read the paused tasks and aborts", &e);
                return;
            }
        };
        self.control.seen = stamp;
        self.control.at = Instant::now();
        let all_paused = control.paused.iter().any(|p| p.task_name.is_none());
        let paused: HashSet<String> = control
            .paused
            .into_iter()
            .filter_map(|p| p.task_name)
            .collect();
        for name in paused.difference(&self.control.paused) {
            log::info!(
                "task {name} is paused: none of its tasks start until `foreman resume {name}`"
            );
        }
        let resumed: Vec<&String> = self.control.paused.difference(&paused).collect();
        for name in &resumed {
            log::info!("task {name} is resumed");
        }
        if !resumed.is_empty() {
            self.control.unpausing = true;
        }
        if all_paused != self.control.all_paused {
            if all_paused {
                log::info!("every task is paused: none starts until `foreman resume --all`");
            } else {
                log::info!("tasks are resumed (`foreman resume --all`)");
                self.control.unpausing = true;
            }
        }
        let changed = paused != self.control.paused || all_paused != self.control.all_paused;
        self.control.paused = paused;
        self.control.all_paused = all_paused;
        if changed {
            // A store that claims by name (PostgreSQL) leaves paused names out of its claims.
            self.plan_claims();
        }
        for request in control.aborts {
            self.abort(&request);
        }
    }

    /// Stops an attempt this daemon runs: raises its cancellation flag (what an in-process
    /// handler, or a worker that has not started it yet, sees) and sends SIGTERM to its process
    /// group, SIGKILL after the grace. A request for an attempt it does not run (another
    /// daemon's) is not its business.
    fn abort(&mut self, request: &AbortRequest) {
        let Some(running) = self.attempts.running.get(&request.task_id) else {
            return;
        };
        if running.attempt != request.attempt || running.cancel.is_raised() {
            return;
        }
        running.cancel.raise();
        let grace = Duration::try_from_secs_f64(request.grace).unwrap_or(Duration::ZERO);
        let signalled = self.workers.children.signal(request.task_id, libc::SIGTERM);
        if signalled {
            log::info!(
                "task {} {} aborted (foreman cancel): SIGTERM to its process group, SIGKILL in {}",
                request.task_id,
                running.name,
                crate::duration::format_duration(grace)
            );
            self.control
                .kills
                .push((request.task_id, Instant::now() + grace));
        } else {
            log::info!(
                "task {} {} aborted (foreman cancel): its cancellation flag is raised",
                request.task_id,
                running.name
            );
        }
    }

    /// SIGKILLs the process groups of aborted attempts whose grace is over.
    pub(super) fn kill_due(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) =
            self.control.kills.drain(..).partition(|(_, at)| *at <= now);
        self.control.kills = later;
        for (task_id, _) in due {
            if self.attempts.running.contains_key(&task_id)
                && self.workers.children.signal(task_id, libc::SIGKILL)
            {
                log::warn!("task {task_id} did not stop within its grace after SIGTERM: SIGKILL");
            }
        }
    }

    /// The attempt ended: no SIGKILL is due for it any more.
    pub(super) fn forget_kill(&mut self, task_id: i64) {
        if !self.control.kills.is_empty() {
            self.control.kills.retain(|(id, _)| *id != task_id);
        }
    }

    /// After a resume: puts the rows the pause set aside back into the pop's index, in batches,
    /// for at most a slice of time per call (the next `fill` goes on).
    pub(super) fn unpause(&mut self) {
        let until = Instant::now() + UNPAUSE_SLICE;
        loop {
            match self.store.unpause_rows(UNPAUSE_BATCH) {
                Ok(put_back) => {
                    if put_back > 0 {
                        log::debug!("{put_back} resumed task(s) back in the queue");
                    }
                    if put_back < UNPAUSE_BATCH {
                        self.control.unpausing = false;
                        return;
                    }
                }
                Err(e) => {
                    self.db_error("cannot put resumed tasks back in the queue", &e);
                    return;
                }
            }
            if Instant::now() >= until {
                return;
            }
        }
    }

    pub(super) fn unpausing(&self) -> bool {
        self.control.unpausing
    }
}
