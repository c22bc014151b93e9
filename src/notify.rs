//! `Notifier`: what the daemon tells systemd (sd_notify): READY=1 once it pops, a STATUS= line,
//! WATCHDOG=1 from the loop, RELOADING=1 then READY=1 around a reload, STOPPING=1. Silent when
//! `NOTIFY_SOCKET` is unset.

use std::time::Duration;

use sd_notify::NotifyState;

/// The variables systemd gives the daemon for itself; its task processes must not inherit them
/// (a task's notification would be taken for the daemon's, or refused and logged by systemd).
pub const DAEMON_ONLY_ENV: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

pub struct Notifier {
    enabled: bool,
    /// How often systemd wants a WATCHDOG=1 (half its WatchdogSec), if it watches.
    watchdog: Option<Duration>,
    status: String,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        Notifier {
            enabled,
            watchdog: sd_notify::watchdog_enabled()
                .filter(|_| enabled)
                .map(|d| d / 2),
            status: String::new(),
        }
    }

    /// How often the loop must ping the watchdog, if systemd set one.
    pub fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog
    }

    pub fn ready(&mut self, status: String) {
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        self.status = status;
    }

    /// Sends the status line if it changed, and the watchdog ping if systemd watches.
    pub fn alive(&mut self, status: String) {
        let changed = status != self.status;
        match (changed, self.watchdog.is_some()) {
            (true, true) => self.send(&[NotifyState::Watchdog, NotifyState::Status(&status)]),
            (true, false) => self.send(&[NotifyState::Status(&status)]),
            (false, true) => self.send(&[NotifyState::Watchdog]),
            (false, false) => {}
        }
        self.status = status;
    }

    /// A reload begins; `ready` says it is over. (systemd 253 and later want the time with it.)
    pub fn reloading(&mut self) {
        let mut states = vec![NotifyState::Reloading];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        self.send(&states);
    }

    pub fn stopping(&mut self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            log::debug!("sd_notify failed: {e}");
        }
    }
}
