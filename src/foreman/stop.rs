//! Stopping: the phases after a signal (or a lost database) stops the popping, the graceful
//! timeout, the kill after it, and the daemon's last words in the database.

use std::time::Instant;

use super::Foreman;
use crate::children::KILL_GRACE;
use crate::error::{Error, Result};
use crate::signals::Shutdown;

pub(super) enum Phase {
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

/// Where the daemon is on its way out.
pub(super) struct Stop {
    pub(super) phase: Phase,
    /// Whether a stop signal came: the second one abandons the running tasks.
    pub(super) signalled: bool,
    /// Why the daemon stops by itself (the database file was replaced): `run` returns it once the
    /// running tasks are done.
    pub(super) fatal: Option<Error>,
}

impl Default for Stop {
    fn default() -> Stop {
        Stop {
            phase: Phase::Running,
            signalled: false,
            fatal: None,
        }
    }
}

impl Foreman {
    /// Whether the daemon is done: stopping with nothing left running, or past the terminating
    /// phase's deadline (then whatever still runs is killed).
    pub(super) fn stopped(&mut self) -> bool {
        if !matches!(self.stop.phase, Phase::Running) && self.attempts.running.is_empty() {
            self.flush_before_exit();
            self.stop_pools();
            self.sign_off();
            log::info!("foreman stopped: no task running");
            return true;
        }
        if let Phase::Terminating { deadline } = self.stop.phase
            && Instant::now() >= deadline
        {
            let killed = self.workers.children.kill_everything();
            self.flush_before_exit();
            self.stop_pools();
            self.sign_off();
            log::warn!(
                "foreman stopped: killed {killed} task process group(s); {} task(s) abandoned",
                self.attempts.running.len()
            );
            return true;
        }
        false
    }

    /// The last words in the DB: the figures not written yet, and a clean exit on the daemon row.
    pub(super) fn sign_off(&mut self) {
        if self.store.was_lost() {
            return; // The row is in a file nobody reads any more.
        }
        self.write_beat();
        if let Err(e) = self.store.daemon_stopped(self.store.now()) {
            log::warn!("could not mark the daemon stopped in the DB: {e}");
        }
    }

    pub(super) fn shutdown(&mut self, signal: Shutdown) -> Result<()> {
        let first = !self.stop.signalled;
        self.stop.signalled = true;
        if let Phase::Running = self.stop.phase {
            self.stop_popping(&format!("signal {}", signal.0));
            return Ok(());
        }
        if first {
            // Draining on its own (the database file was replaced): a supervisor's stop is the
            // first signal, which waits for the running tasks as it would have anyway.
            log::info!(
                "signal {}: already stopping; still waiting for {} running task(s)",
                signal.0,
                self.attempts.running.len()
            );
            return Ok(());
        }
        self.log_survivors("abandoned at second signal");
        self.workers.children.kill_everything();
        // Once only: a second signal asks for an exit now, not after three busy timeouts.
        self.flush();
        // The figures of the attempts that ended since the last beat, counted as at any other exit.
        // No stopped stamp: abandoning running tasks is not a clean exit.
        self.write_beat();
        Err(Error::Interrupted {
            abandoned: self.attempts.running.len(),
        })
    }

    /// Running → Draining: no more pops; the running tasks get the graceful timeout.
    pub(super) fn stop_popping(&mut self, why: &str) {
        log::info!(
            "{why}: stopping; waiting up to {:?} for {} running task(s)",
            self.config.graceful_timeout,
            self.attempts.running.len()
        );
        self.stop.phase = Phase::Draining {
            deadline: Instant::now() + self.config.graceful_timeout,
        };
        let status = self.status_line();
        self.figures.notifier.stopping(&status);
        // So that `foreman health` tells a daemon draining on purpose from a stalled one.
        if self.store.was_lost() {
            return;
        }
        if let Err(e) = self.store.daemon_stopping(self.store.now()) {
            self.db_error("cannot mark the daemon stopping", &e);
        }
    }

    pub(super) fn deadline(&mut self) {
        if let Phase::Draining { .. } = self.stop.phase {
            self.log_survivors("still running at the graceful timeout");
            self.workers.children.signal_all(libc::SIGTERM);
            self.stop.phase = Phase::Terminating {
                deadline: Instant::now() + KILL_GRACE,
            };
        }
    }

    pub(super) fn log_survivors(&self, what: &str) {
        let mut survivors: Vec<_> = self.attempts.running.iter().collect();
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
