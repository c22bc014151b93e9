//! Forwarding of SIGTERM, SIGINT and SIGHUP into a channel for the foreman loop, which stops on the
//! first two and reloads its configuration on SIGHUP. This installs process-wide signal handlers,
//! so only a binary's `main` calls it; the rest of the library never does.

use crossbeam_channel::Receiver;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::error::{Error, Result};

/// A signal for the daemon, by number: `SIGHUP` asks it to reload its configuration, any other
/// to stop. (The name is older than the reload; a library user sends `Shutdown(libc::SIGTERM)` to
/// stop the daemon and `Shutdown(libc::SIGHUP)` to reload it.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shutdown(pub i32);

/// Installs handlers for SIGTERM, SIGINT and SIGHUP and returns the channel they are delivered on.
/// Without them SIGTERM and SIGINT would kill the daemon with tasks whose rows are already gone,
/// and SIGHUP (`systemctl reload`, `foreman reload`) too.
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
