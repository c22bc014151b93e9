//! A PostgreSQL server on this machine, as the bench measures it: its CPU, read from its
//! processes in `/proc` (the postmaster found as the parent of the bench's own backend, so only a
//! server on this machine can be measured), and its count of the database's transactions.

use super::daemon::Run;
use super::{Failure, Outcome};

/// A PostgreSQL server on this machine: its postmaster, whose children do its work.
pub(crate) struct Server {
    postmaster: i32,
}

impl Server {
    /// The server of `run`'s database, if the run is on PostgreSQL and its server runs here.
    pub fn of(run: &Run) -> Option<Server> {
        let backend = run.conn().ok()?.backend_pid().ok()??;
        let backend = i32::try_from(backend).ok()?;
        let postmaster = parent(backend)?;
        // The parent of a backend is the postmaster, whose name is postgres (or postmaster).
        let name = std::fs::read_to_string(format!("/proc/{postmaster}/comm")).ok()?;
        name.trim()
            .starts_with("post")
            .then_some(Server { postmaster })
    }

    /// CPU time of the postmaster and every process it started (backends, the WAL writer, the
    /// checkpointer, autovacuum), in ns: the first field of `/proc/PID/schedstat`. A process
    /// that ended since the last reading takes its time with it (the daemons' backends live
    /// through a drain).
    pub fn cpu_ns(&self) -> Outcome<u64> {
        let entries = std::fs::read_dir("/proc")
            .map_err(|e| Failure::new(format!("cannot read /proc: {e}")))?;
        let mut total = schedstat(self.postmaster).unwrap_or(0);
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            if parent(pid) == Some(self.postmaster) {
                total += schedstat(pid).unwrap_or(0);
            }
        }
        Ok(total)
    }
}

/// Transactions of `run`'s database so far (committed and rolled back), as the server counts
/// them: each statement a client sends in autocommit is one.
pub(crate) fn transactions(run: &Run) -> Outcome<f64> {
    let count = run
        .conn()?
        .transactions()?
        .ok_or_else(|| Failure::new("not a PostgreSQL run"))?;
    Ok(count as f64)
}

fn parent(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command's closing parenthesis: state, then the parent's pid.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn schedstat(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
