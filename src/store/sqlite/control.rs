//! What the operator asks of the daemons through the database, and what the loop reads of it:
//! paused task names (`foreman_pause`), aborts of running attempts (`foreman_abort`), and the rows
//! a pause set aside, put back after a resume.

use rusqlite::{OptionalExtension, params};

use super::SqliteStore;
use crate::error::Result;
use crate::store::types::{AbortRequest, Control, PausedName};

/// `foreman_pause.task_name` of `pause --all`: no task can have an empty name.
const ALL: &str = "";

impl SqliteStore {
    /// The paused names and the abort requests of running attempts: reads of two small tables.
    /// Two reads, each consistent, not one transaction: it is also read within a caller's
    /// snapshot (`status`).
    pub fn control(&self) -> Result<Control> {
        let err = |e| self.err(e);
        let tx = &self.conn;
        let paused = tx
            .prepare_cached("SELECT task_name, paused_at FROM foreman_pause ORDER BY task_name")
            .and_then(|mut s| {
                s.query_map([], |r| {
                    let name: String = r.get(0)?;
                    Ok(PausedName {
                        task_name: (name != ALL).then_some(name),
                        since: r.get(1)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(err)?;
        let aborts = tx
            .prepare_cached(
                "SELECT a.task_id, a.attempt, a.grace, a.requested_at FROM foreman_abort a \
                 JOIN foreman_run r ON r.task_id = a.task_id AND r.attempt = a.attempt \
                 WHERE r.state = 'running'",
            )
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok(AbortRequest {
                        task_id: r.get(0)?,
                        attempt: r.get(1)?,
                        grace: r.get(2)?,
                        requested_at: r.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(err)?;
        Ok(Control { paused, aborts })
    }

    /// Pauses `name` (every task when `None`) from `now` on; returns false when it already was
    /// (it then keeps the time it was paused at).
    pub fn pause(&mut self, name: Option<&str>, now: f64) -> Result<bool> {
        self.write(|tx| {
            tx.prepare_cached(
                "INSERT INTO foreman_pause(task_name, paused_at) VALUES (?1, ?2) \
                 ON CONFLICT (task_name) DO NOTHING",
            )?
            .execute(params![name.unwrap_or(ALL), now])
            .map(|inserted| inserted > 0)
        })
    }

    /// Resumes `name`, or (`None`) everything: every paused name and `pause --all`. Returns how
    /// many pauses it lifted. The rows the pause set aside are put back by the daemon
    /// (`unpause_rows`).
    pub fn resume(&mut self, name: Option<&str>) -> Result<usize> {
        self.write(|tx| match name {
            Some(name) => tx.execute("DELETE FROM foreman_pause WHERE task_name = ?1", [name]),
            None => tx.execute("DELETE FROM foreman_pause", []),
        })
    }

    /// Puts back into the pop's index up to `batch` rows that a pause set aside and whose name is
    /// no longer paused, oldest first; returns how many. Each distinct name set aside costs an
    /// index search, each row an update.
    pub fn unpause_rows(&mut self, batch: usize) -> Result<usize> {
        self.write(|tx| {
            let mut done = 0;
            let mut after = String::new();
            while done < batch {
                let name: Option<String> = tx
                    .prepare_cached(
                        "SELECT min(task_name) FROM foreman_task WHERE paused = 1 AND task_name > ?1",
                    )?
                    .query_row([&after], |r| r.get(0))?;
                let Some(name) = name else { break };
                let still_paused = tx
                    .prepare_cached("SELECT 1 FROM foreman_pause WHERE task_name = ?1")?
                    .query_row([&name], |_| Ok(()))
                    .optional()?
                    .is_some();
                if !still_paused {
                    done += tx
                        .prepare_cached(
                            "UPDATE foreman_task SET paused = 0 WHERE id IN (SELECT id FROM foreman_task \
                             WHERE paused = 1 AND task_name = ?1 ORDER BY id LIMIT ?2)",
                        )?
                        .execute(params![
                            name,
                            i64::try_from(batch - done).unwrap_or(i64::MAX)
                        ])?;
                }
                after = name;
            }
            Ok(done)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::tests::{query_plan, queue_with};

    #[test]
    fn a_resume_puts_back_only_the_rows_of_names_no_longer_paused() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = queue_with(
            &dir,
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 30) \
             INSERT INTO foreman_task(task_name, paused) SELECT CASE i % 3 WHEN 0 THEN 'a' \
             WHEN 1 THEN 'b' ELSE 'c' END, 1 FROM n; \
             INSERT INTO foreman_pause(task_name, paused_at) VALUES ('b', 1.0);",
        );
        let paused = |queue: &SqliteStore, name: &str| -> i64 {
            queue
                .conn
                .query_row(
                    "SELECT count(*) FROM foreman_task WHERE paused = 1 AND task_name = ?1",
                    [name],
                    |r| r.get(0),
                )
                .unwrap()
        };
        assert_eq!(queue.unpause_rows(15).unwrap(), 15);
        assert_eq!(queue.unpause_rows(15).unwrap(), 5);
        assert_eq!(queue.unpause_rows(15).unwrap(), 0);
        assert_eq!((paused(&queue, "a"), paused(&queue, "c")), (0, 0));
        assert_eq!(paused(&queue, "b"), 10, "b is still paused");
        assert!(!queue.pause(Some("b"), 2.0).unwrap(), "already paused");
        assert!(queue.pause(None, 3.0).unwrap());
        let control = queue.control().unwrap();
        assert_eq!(
            control.paused,
            [
                PausedName {
                    task_name: None,
                    since: 3.0
                },
                PausedName {
                    task_name: Some("b".to_owned()),
                    since: 1.0
                }
            ]
        );
        assert_eq!(queue.resume(None).unwrap(), 2);
        assert_eq!(queue.unpause_rows(100).unwrap(), 10);
    }

    #[test]
    fn the_paused_rows_are_found_by_index() {
        let dir = tempfile::tempdir().unwrap();
        let queue = queue_with(&dir, "");
        let plan = query_plan(
            &queue,
            "SELECT min(task_name) FROM foreman_task WHERE paused = 1 AND task_name > ?1",
        );
        assert!(
            plan.contains("SEARCH foreman_task USING COVERING INDEX foreman_task_paused"),
            "{plan}"
        );
        let plan = query_plan(
            &queue,
            "SELECT id FROM foreman_task WHERE paused = 1 AND task_name = ?1 ORDER BY id LIMIT ?2",
        );
        assert!(
            plan.contains("SEARCH foreman_task USING COVERING INDEX foreman_task_paused")
                && !plan.contains("TEMP B-TREE"),
            "{plan}"
        );
    }
}
