//! PostgreSQL's wake: a thread of its own waits on the store's `LISTEN foreman` connection and
//! turns each notification into a wake on the loop's channel. When `LISTEN` cannot work (the
//! setting `listen = false`, for PgBouncer in transaction mode) or fails (the server is down, a
//! pooler refuses it), the thread polls instead: a wake every `POLL`, and, after a failure, it
//! tries to listen again every `RELISTEN`. It warns once when listening fails and says when it
//! works again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::error::{Error, Result};
use crate::store::postgres::listen::Listener;

/// How often the daemon polls when it cannot listen.
pub const POLL: Duration = Duration::from_millis(250);
/// How long one wait for notifications lasts: how soon the thread notices it should stop (the
/// daemon's exit does not wait for it). A notification ends it at once, and a broken connection
/// (a server that went away, or one the keepalives found silent) too. An idle daemon pays for
/// each wait: the driver's timer wheel wakes the thread a few times per wait, whatever its length,
/// so a long one costs the least (a 10 s wait was a quarter of an idle daemon's CPU).
const WAIT: Duration = Duration::from_mins(1);
/// After a failure, how long the thread polls before it tries to listen again.
const RELISTEN: Duration = Duration::from_secs(5);

pub struct ListenWakeups {
    stop: Arc<AtomicBool>,
    /// Set by the thread when a notification asked to read the control state again (or when it
    /// could have been missed: a new connection, or polling).
    control: Arc<AtomicBool>,
    /// Whether the thread listens now (not polling after a failure, nor told not to listen).
    listening: Arc<AtomicBool>,
    listen: bool,
}

impl ListenWakeups {
    /// Starts the thread: listening on `url` (shown as `label`), or polling without `listen`.
    pub fn start(url: &str, label: &str, listen: bool, wakes: Sender<()>) -> Result<ListenWakeups> {
        let stop = Arc::new(AtomicBool::new(false));
        let listener = if listen {
            Some(Listener::new(url, label)?)
        } else {
            None
        };
        let control = Arc::new(AtomicBool::new(false));
        let listening = Arc::new(AtomicBool::new(false));
        let (flag, told, up) = (
            Arc::clone(&stop),
            Arc::clone(&control),
            Arc::clone(&listening),
        );
        std::thread::Builder::new()
            .name("foreman-listen".to_owned())
            .spawn(move || match listener {
                Some(listener) => listen_loop(listener, &flag, &told, &up, &wakes),
                None => poll_loop(&flag, &told, &wakes, None),
            })
            .map_err(|e| Error::io("cannot start the LISTEN thread", e))?;
        Ok(ListenWakeups {
            stop,
            control,
            listening,
            listen,
        })
    }

    /// Whether a notification asked, since the last call, to read the control state again (or a
    /// poll, which cannot tell, or a new connection, which may have missed one).
    pub fn take_control(&self) -> bool {
        self.control.swap(false, Ordering::SeqCst)
    }

    /// Whether every producer's `NOTIFY` reaches the loop now: the thread listens (it has not
    /// failed since it last listened), so the idle tick may stretch.
    pub fn healthy(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    pub fn describe(&self) -> String {
        if self.listen {
            "LISTEN foreman".to_owned()
        } else {
            format!(
                "polling every {} (listen = false)",
                crate::duration::format_duration(POLL)
            )
        }
    }
}

impl Drop for ListenWakeups {
    fn drop(&mut self) {
        // The thread sees it within one wait (or at its next notification) and ends, closing its
        // connection; nothing to join for.
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Polls until `stop`, or until `until` passes. No notification says what changed: each poll
/// asks the loop to read the control state too.
fn poll_loop(stop: &AtomicBool, control: &AtomicBool, wakes: &Sender<()>, until: Option<Instant>) {
    while !stop.load(Ordering::SeqCst) && until.is_none_or(|at| Instant::now() < at) {
        std::thread::sleep(POLL);
        control.store(true, Ordering::SeqCst);
        // bounded(1): a pending wake already covers this one.
        let _ = wakes.try_send(());
    }
}

fn listen_loop(
    mut listener: Listener,
    stop: &AtomicBool,
    control: &AtomicBool,
    listening: &AtomicBool,
    wakes: &Sender<()>,
) {
    let mut failing = false;
    while !stop.load(Ordering::SeqCst) {
        match listener.wait(WAIT) {
            Ok(heard) => {
                listening.store(true, Ordering::SeqCst);
                if failing {
                    log::info!("LISTEN foreman works again: back to waking on notifications");
                    failing = false;
                }
                // A new connection missed what was notified before it listened: look.
                if heard.control > 0 || heard.reconnected {
                    control.store(true, Ordering::SeqCst);
                }
                if heard.notifications > 0 || heard.reconnected {
                    let _ = wakes.try_send(());
                }
            }
            Err(e) => {
                listening.store(false, Ordering::SeqCst);
                if !failing {
                    log::warn!(
                        "cannot LISTEN for wake-ups ({e}); polling every {} instead, and trying to listen again every {}",
                        crate::duration::format_duration(POLL),
                        crate::duration::format_duration(RELISTEN)
                    );
                    failing = true;
                }
                poll_loop(stop, control, wakes, Some(Instant::now() + RELISTEN));
            }
        }
    }
}
