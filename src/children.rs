//! `Children`: the process groups foreman started, so the foreman loop can signal them at shutdown
//! or when a task is aborted: each running task's group (its command's, or the pool process's
//! that runs it), by task id, and every pool process, busy or idle, by pool and slot. A pid is
//! removed before it is reaped, so a signal never reaches a recycled pid.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Between SIGTERM and SIGKILL whenever foreman stops a process: at a task's timeout, at the
/// graceful deadline, and when a pool stops a worker.
pub const KILL_GRACE: Duration = Duration::from_millis(500);

/// Sends `signal` to the process group led by `pid`.
pub fn kill_group(pid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; callers only name groups not yet reaped.
    unsafe {
        libc::kill(-pid, signal);
    }
}

#[derive(Default)]
pub struct Children {
    /// task id → pid, which is also the process group id (each child leads its own group).
    groups: Mutex<HashMap<i64, libc::pid_t>>,
    /// (pool, slot) → pid of every live pool process, busy or idle.
    workers: Mutex<HashMap<(usize, usize), libc::pid_t>>,
}

impl Children {
    fn lock(&self) -> MutexGuard<'_, HashMap<i64, libc::pid_t>> {
        // The map stays consistent even if a holder panicked: every operation is a single call.
        self.groups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_workers(&self) -> MutexGuard<'_, HashMap<(usize, usize), libc::pid_t>> {
        self.workers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a pool process from its spawn until just before it is reaped.
    pub fn insert_worker(&self, pool: usize, slot: usize, pid: libc::pid_t) {
        self.lock_workers().insert((pool, slot), pid);
    }

    pub fn remove_worker(&self, pool: usize, slot: usize) {
        self.lock_workers().remove(&(pool, slot));
    }

    /// SIGKILLs every task's process group and every pool process's group, busy or idle: the last
    /// word when the daemon leaves without waiting. `PR_SET_PDEATHSIG` would kill the processes
    /// foreman started, but not what they started.
    pub fn kill_everything(&self) -> usize {
        let workers = self.lock_workers();
        for &pid in workers.values() {
            kill_group(pid, libc::SIGKILL);
        }
        self.signal_all(libc::SIGKILL) + workers.len()
    }
    pub fn insert(&self, task_id: i64, pid: libc::pid_t) {
        self.lock().insert(task_id, pid);
    }

    pub fn remove(&self, task_id: i64) {
        self.lock().remove(&task_id);
    }

    /// Sends `signal` to the process group running task `task_id` (its command, or its pool
    /// worker); returns whether it has one.
    pub fn signal(&self, task_id: i64, signal: libc::c_int) -> bool {
        let groups = self.lock();
        let Some(&pid) = groups.get(&task_id) else {
            return false;
        };
        kill_group(pid, signal);
        true
    }

    /// Sends `signal` to every running task's process group; returns how many were signalled.
    pub fn signal_all(&self, signal: libc::c_int) -> usize {
        let groups = self.lock();
        for &pid in groups.values() {
            kill_group(pid, signal);
        }
        groups.len()
    }
}
