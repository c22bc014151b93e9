//! What the operator asks of the daemons through PostgreSQL: paused task names (`foreman_pause`),
//! which every daemon leaves out of its claims, and aborts of running attempts (`foreman_abort`),
//! which the daemon running each carries out. A pause touches no queued row: the claim skips the
//! name, so a resume has nothing to put back.

use super::PgStore;
use crate::error::Result;
use crate::store::types::{AbortRequest, Control, PausedName};

/// `foreman_pause.task_name` of `pause --all`: no task can have an empty name.
const ALL: &str = "";

impl PgStore {
    /// The paused names and the abort requests of attempts still running (of this daemon's, for
    /// a daemon): two reads of small tables, callable within a caller's snapshot.
    pub fn control(&self) -> Result<Control> {
        let me = self.daemon.as_ref().map(|d| d.id);
        let paused = self.with(|c| {
            c.query(
                "SELECT task_name, extract(epoch FROM paused_at)::float8 FROM foreman_pause \
                 ORDER BY task_name",
                &[],
            )
        })?;
        let aborts = self.with(|c| {
            c.query(
                "SELECT a.task_id, a.attempt::int8, a.grace, \
                 extract(epoch FROM a.requested_at)::float8 FROM foreman_abort a \
                 JOIN foreman_run r ON r.task_id = a.task_id AND r.attempt = a.attempt \
                 WHERE r.state = 'running' AND ($1::int8 IS NULL OR r.daemon_id = $1)",
                &[&me],
            )
        })?;
        Ok(Control {
            paused: paused
                .iter()
                .map(|r| {
                    let name: String = r.get(0);
                    PausedName {
                        task_name: (name != ALL).then_some(name),
                        since: r.get(1),
                    }
                })
                .collect(),
            aborts: aborts
                .iter()
                .map(|r| AbortRequest {
                    task_id: r.get(0),
                    attempt: r.get(1),
                    grace: r.get(2),
                    requested_at: r.get(3),
                })
                .collect(),
        })
    }

    /// Pauses `name` (every task when `None`); false when it already was (it keeps its time).
    /// The time is the server's.
    pub fn pause(&mut self, name: Option<&str>) -> Result<bool> {
        let n = self.with(|c| {
            c.execute(
                "INSERT INTO foreman_pause (task_name) VALUES ($1) ON CONFLICT (task_name) DO NOTHING",
                &[&name.unwrap_or(ALL)],
            )
        })?;
        Ok(n > 0)
    }

    /// Resumes `name`, or (`None`) every pause; returns how many it lifted.
    pub fn resume(&mut self, name: Option<&str>) -> Result<usize> {
        let n = self.with(|c| match name {
            Some(name) => c.execute("DELETE FROM foreman_pause WHERE task_name = $1", &[&name]),
            None => c.execute("DELETE FROM foreman_pause", &[]),
        })?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }
}
