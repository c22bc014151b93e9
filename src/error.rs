//! The one error type of the library, and how each kind maps to a process exit code.

use std::fmt;
use std::path::PathBuf;

/// Everything that can stop a foreman command. Messages are one line a user can act on: they name
/// the file, the key or the task.
#[derive(Debug)]
pub enum Error {
    /// Bad configuration or usage (exit code 2): the message names the file and key.
    Config(String),
    /// Another daemon holds the PID file's lock.
    AlreadyRunning { pid_file: PathBuf, pid: Option<u32> },
    /// The database could not be opened, created or queried.
    Db { path: PathBuf, message: String },
    /// The environment refuses what foreman needs: a read-only mount, a missing directory, a file
    /// or directory this user may not write. The message names the path, the cause and the fix.
    Environment(String),
    /// A file-system or process operation failed.
    Io {
        what: String,
        source: std::io::Error,
    },
    /// A second shutdown signal arrived before the graceful shutdown finished.
    Interrupted { abandoned: usize },
    /// The command printed its answer, and the answer is a status of its own, documented in its
    /// --help (`foreman wait`: 1 for a task that failed, 3 for an unknown id). `message`, if any,
    /// says why on stderr.
    Exit { code: u8, message: Option<String> },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    pub fn db(path: impl Into<PathBuf>, err: impl fmt::Display) -> Self {
        Error::Db {
            path: path.into(),
            message: err.to_string(),
        }
    }

    /// Exit code per the project's convention: 2 for configuration or usage, 1 for the rest
    /// (`Environment` too: the same configuration works once the mount or permission is fixed); a
    /// command's own status for `Exit`.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => 2,
            Error::Exit { code, .. } => i32::from(*code),
            _ => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(msg) | Error::Environment(msg) => f.write_str(msg),
            Error::AlreadyRunning {
                pid_file,
                pid: Some(pid),
            } => {
                write!(
                    f,
                    "already running (pid {pid}; pid file {})",
                    pid_file.display()
                )
            }
            Error::AlreadyRunning {
                pid_file,
                pid: None,
            } => {
                write!(
                    f,
                    "already running (pid file {} is locked)",
                    pid_file.display()
                )
            }
            Error::Db { path, message } => write!(f, "database {}: {message}", path.display()),
            Error::Io { what, source } => write!(f, "{what}: {source}"),
            Error::Interrupted { abandoned } => {
                write!(
                    f,
                    "second signal: exited at once, abandoning {abandoned} running task(s)"
                )
            }
            Error::Exit { message, .. } => f.write_str(message.as_deref().unwrap_or_default()),
        }
    }
}

impl std::error::Error for Error {}
