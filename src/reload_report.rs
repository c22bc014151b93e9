//! The answer to a reload, which the daemon writes beside its PID file (`<pid file>.reload`) and
//! `foreman reload` waits for: one JSON document, replaced whole (written beside and renamed over
//! it), so that a reader never sees half of one.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fs_check::suffixed;

/// How the daemon took a reload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// The daemon that answers.
    pub pid: u32,
    /// When its loop took the reload (Unix seconds): after the signal that asked for it was sent.
    pub requested_at: f64,
    /// Whether the configuration was applied; when not, the running one stays in force.
    pub applied: bool,
    /// What changed, or why it was refused: one line.
    pub message: String,
    /// Settings the file changes that only a restart applies: they keep their running values.
    pub restart_needed: Vec<String>,
}

/// Where the daemon whose lock is `pid_file` writes its answers.
pub fn path(pid_file: &Path) -> PathBuf {
    suffixed(pid_file, ".reload")
}

/// Replaces the answer beside `pid_file` with `report`.
pub fn write(pid_file: &Path, report: &ReloadReport) -> std::io::Result<()> {
    let target = path(pid_file);
    let temporary = suffixed(&target, ".tmp");
    let mut file = std::fs::File::create(&temporary)?;
    let mut text = serde_json::to_vec(report).map_err(std::io::Error::other)?;
    text.push(b'\n');
    file.write_all(&text)?;
    drop(file);
    std::fs::rename(&temporary, &target)
}

/// The last answer of the daemon whose lock is `pid_file`, if there is one that can be read.
pub fn read(pid_file: &Path) -> Option<ReloadReport> {
    let text = std::fs::read(path(pid_file)).ok()?;
    serde_json::from_slice(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("q.sqlite3.pid");
        assert_eq!(read(&pid_file), None);
        let report = ReloadReport {
            pid: 42,
            requested_at: 1.5,
            applied: true,
            message: "workers 4 -> 8".to_owned(),
            restart_needed: vec!["`db`".to_owned()],
        };
        write(&pid_file, &report).unwrap();
        assert_eq!(read(&pid_file), Some(report));
        assert!(dir.path().join("q.sqlite3.pid.reload").is_file());
    }
}
