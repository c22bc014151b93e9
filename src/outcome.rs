//! How an attempt ended, as every kind of worker reports it to the foreman loop: `Outcome`,
//! `Finished`, and the words shared by whoever reads a failure (`headline`, `PANIC_PREFIX`). A leaf:
//! workers, the loop and the Sentry reports all depend on it, it depends on `Task` alone.

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
}

/// What an in-process handler returns (as its error) to say it succeeded but found nothing new.
#[derive(Debug, Clone, Copy)]
pub struct Uneventful;

impl std::fmt::Display for Uneventful {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("uneventful")
    }
}

impl std::error::Error for Uneventful {}

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
    fn the_headline_is_the_last_line_with_text() {
        assert_eq!(
            headline("Traceback:\n  File x\nValueError: bad\n\n  "),
            Some("ValueError: bad")
        );
        assert_eq!(headline("  one  "), Some("one"));
        assert_eq!(headline(" \n\n"), None);
    }
}
