//! Forwarding of SIGTERM, SIGINT and SIGHUP into a channel for the foreman loop. This installs process-wide
//! signal handlers, so only a binary's `main` calls it; the rest of the library never does.

use crossbeam_channel::Receiver;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::error::{Error, Result};

/// A shutdown request, by signal number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shutdown(pub i32);

/// Installs handlers for SIGTERM, SIGINT and SIGHUP (a closed terminal must stop the daemon
/// gracefully, not kill it with tasks whose rows are already gone) and returns the channel they are delivered on.
pub fn forward_shutdown_signals() -> Result<Receiver<Shutdown>> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| Error::io("installing signal handlers", e))?;
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::Builder::new()
        .name("foreman-signals".to_owned())
        .spawn(move || {
            for signal in signals.forever() {
                if tx.send(Shutdown(signal)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| Error::io("starting the signal thread", e))?;
    Ok(rx)
}
