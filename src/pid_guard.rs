//! `PidGuard`: the daemon's single-instance lock, an flock on the PID file held for the daemon's
//! life. The lock, never the file's existence, says whether a daemon runs, so a stale file left by
//! `kill -9` or a container restart is harmless.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// A reader such as `foreman status` holds the lock for microseconds; a starting daemon retries
/// this many times before it believes another daemon holds it.
const LOCK_ATTEMPTS: u32 = 5;
const LOCK_RETRY: Duration = Duration::from_millis(20);

pub struct PidGuard {
    _file: File,
}

impl PidGuard {
    /// Takes the lock and writes our pid, or fails with `AlreadyRunning` naming the holder's pid.
    pub fn acquire(path: &Path) -> Result<PidGuard> {
        let io_err = |e| Error::io(format!("pid file {}", path.display()), e);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            // Say why in the preflight's words (read-only mount, permissions) when it can tell.
            .map_err(|e| {
                crate::fs_check::pid_file_writable(path)
                    .err()
                    .unwrap_or_else(|| io_err(e))
            })?;
        let mut attempts = 0;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if attempts + 1 < LOCK_ATTEMPTS => {
                    attempts += 1;
                    std::thread::sleep(LOCK_RETRY);
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(Error::AlreadyRunning {
                        pid_file: path.to_path_buf(),
                        pid: read_pid(&mut file),
                    });
                }
                Err(TryLockError::Error(e)) => return Err(io_err(e)),
            }
        }
        file.set_len(0).map_err(io_err)?;
        file.rewind().map_err(io_err)?;
        writeln!(file, "{}", std::process::id()).map_err(io_err)?;
        Ok(PidGuard { _file: file })
    }
}

/// Whether a daemon holds the lock on `path`, and its pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonState {
    Running { pid: Option<u32> },
    NotRunning,
}

impl DaemonState {
    pub fn probe(path: &Path) -> Result<DaemonState> {
        let mut file = match OpenOptions::new().read(true).open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(DaemonState::NotRunning),
            Err(e) => return Err(Error::io(format!("pid file {}", path.display()), e)),
        };
        // A shared lock is enough to tell: it conflicts only with the daemon's exclusive one.
        match file.try_lock_shared() {
            Ok(()) => Ok(DaemonState::NotRunning),
            Err(TryLockError::WouldBlock) => Ok(DaemonState::Running {
                pid: read_pid(&mut file),
            }),
            Err(TryLockError::Error(e)) => Err(Error::io(
                format!("pid file {}", PathBuf::from(path).display()),
                e,
            )),
        }
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}
