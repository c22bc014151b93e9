//! The one error type of the library, and how each kind maps to a process exit code.

use std::fmt;
use std::path::PathBuf;

use crate::outcome::headline;

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
    /// A task waited for (`Client::wait`) has no result to give: it failed, the wait ran out, or
    /// there is no such task.
    Task(TaskError),
    /// The command printed its answer, and the answer is a status of its own, documented in its
    /// --help (`foreman wait`: 1 for a task that failed, 3 for an unknown id). `message`, if any,
    /// says why on stderr.
    Exit { code: u8, message: Option<String> },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Why `Client::wait` has no result to give.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskError {
    /// It ended without success: `state` is failed, timeout, lost, dead or cancelled. `error` is
    /// its last error (or dead letter's reason).
    Failed {
        task_id: i64,
        state: String,
        attempt: i64,
        error: Option<String>,
    },
    /// The wait's timeout passed first; `state` is where the task was then.
    StillWaiting { task_id: i64, state: String },
    /// No task has this id (never enqueued, or its history was pruned).
    Unknown { task_id: i64 },
}

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskError::Failed {
                task_id,
                state,
                attempt,
                error,
            } => {
                let error = error
                    .as_deref()
                    .and_then(headline)
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                write!(f, "task {task_id} {state} (attempt {attempt}){error}")
            }
            TaskError::StillWaiting { task_id, state } => {
                write!(f, "task {task_id} is still {state}")
            }
            TaskError::Unknown { task_id } => write!(
                f,
                "no task {task_id} (never enqueued, or its history was pruned)"
            ),
        }
    }
}

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
            Error::Task(e) => write!(f, "{e}"),
            Error::Exit { message, .. } => f.write_str(message.as_deref().unwrap_or_default()),
        }
    }
}

impl std::error::Error for Error {}
