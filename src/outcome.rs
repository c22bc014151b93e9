//! How an attempt ended, as every kind of worker reports it to the foreman loop: `Outcome`,
//! `Finished` (with the task's result), and the words shared by whoever reads a failure
//! (`headline`, `PANIC_PREFIX`) or writes a result (`result_text`). A leaf: workers, the loop and
//! the Sentry reports all depend on it, it depends on `Task` alone.

use std::time::Duration;

use crate::task::Task;

/// How a panicking handler's failure starts, so that the Sentry report can tell that its panic
/// integration already reported it.
pub const PANIC_PREFIX: &str = "handler panicked: ";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `eventful`: the task found something new (what adaptive schedules feed on); a handler that
    /// does not say counts as eventful.
    Done {
        eventful: bool,
    },
    Failed(String),
    /// Killed at its timeout.
    Timeout(String),
}

/// A task that finished, handed back to the foreman loop whole (a retry needs its arguments).
#[derive(Debug)]
pub struct Finished {
    pub task: Task,
    pub outcome: Outcome,
    pub elapsed: Duration,
    /// The JSON text of the value the task returned, if it returned one (done tasks only).
    pub result: Option<String>,
    /// A command task's exit status (128 + N when signal N killed it).
    pub exit_code: Option<i32>,
}

/// What a worker found out about one attempt, before it is handed back as `Finished`.
#[derive(Debug)]
pub struct Reported {
    pub outcome: Outcome,
    pub result: Option<String>,
    pub exit_code: Option<i32>,
}

impl From<Outcome> for Reported {
    fn from(outcome: Outcome) -> Reported {
        Reported {
            outcome,
            result: None,
            exit_code: None,
        }
    }
}

/// The most bytes a task's result may take as JSON text. A larger one fails the attempt: it is
/// never cut, which would make it another value.
pub const MAX_RESULT_BYTES: usize = 64 * 1024;

/// A task's result as stored: its JSON text, or the failure that a result over
/// `MAX_RESULT_BYTES` is. `null` is no result.
pub fn result_text(value: &serde_json::Value) -> Result<Option<String>, String> {
    if value.is_null() {
        return Ok(None);
    }
    let text = value.to_string();
    if text.len() > MAX_RESULT_BYTES {
        return Err(too_big(text.len()));
    }
    Ok(Some(text))
}

/// The failure of a task whose result is `bytes` long.
pub fn too_big(bytes: usize) -> String {
    format!(
        "the task's result is {bytes} bytes of JSON, over the limit of {MAX_RESULT_BYTES}: store          large results elsewhere and return where they are"
    )
}

/// The reason of an attempt that was aborted before it started.
pub const CANCELLED_BEFORE_START: &str = "cancelled before it started (foreman cancel)";

/// What an in-process handler returns (as its error) to say it succeeded but found nothing new.
#[derive(Debug, Clone, Copy)]
pub struct Uneventful;

impl std::fmt::Display for Uneventful {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("uneventful")
    }
}

impl std::error::Error for Uneventful {}

/// What an in-process handler may return (as its error) once `Task::cancelled` says the attempt
/// was aborted: the attempt is recorded `cancelled`, like any failure after an abort.
#[derive(Debug, Clone, Copy)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled")
    }
}

impl std::error::Error for Cancelled {}

/// A failure's last non-empty line, trimmed: where a traceback or a command's stderr says what
/// went wrong. `None` for a reason with no text at all.
pub fn headline(reason: &str) -> Option<&str> {
    reason
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_is_kept_whole_or_fails_the_attempt() {
        assert_eq!(result_text(&serde_json::Value::Null), Ok(None));
        assert_eq!(
            result_text(&serde_json::json!({"n": 1})),
            Ok(Some("{\"n\":1}".to_owned()))
        );
        let big = serde_json::Value::String("x".repeat(MAX_RESULT_BYTES));
        let err = result_text(&big).unwrap_err();
        assert!(err.contains("over the limit of 65536"), "{err}");
    }

    #[test]
    fn the_headline_is_the_last_line_with_text() {
        assert_eq!(
            headline("Traceback:\n  File x\nValueError: bad\n\n  "),
            Some("ValueError: bad")
        );
        assert_eq!(headline("  one  "), Some("one"));
        assert_eq!(headline(" \n\n"), None);
    }
}
