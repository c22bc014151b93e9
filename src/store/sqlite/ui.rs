//! The dashboard's reads (`foreman ui`): tasks listed by state, name and text with keyset paging,
//! one task's every row, dead letters paged and selected by filter, failure texts for grouping,
//! and deleting a chosen set of dead letters. Every listing walks a primary key downwards from a
//! cursor and looks at a bounded number of rows (`window`), and every count stops at a cap: a
//! dashboard refreshing twice a second must not scan a table of millions of rows.

use rusqlite::{Connection, OptionalExtension, params};

use super::{SqliteStore, cell};
use crate::error::Result;
use crate::store::row::Cell;
use crate::store::types::{
    AttemptRow, CappedCount, DeadFilter, DeadLetter, FailureText, Page, QueuedRow, TaskFilter,
    TaskRecord, TaskRow,
};

/// The states a `foreman_task` row can be in, as the listing names them.
const QUEUED_STATES: [&str; 3] = ["due", "later", "leased"];

// `?1` before, `?2` window, `?3` name, `?4` search, `?5` states (",due,later,"), `?6` now,
// `?7` limit. The inner select walks the rowid downwards and stops after `window` rows; the outer
// one filters what it hands over, in the same order.
const SQL_QUEUED_PAGE: &str = "SELECT id, task_name, attempt, priority, created_at, run_after, origin, \
     CASE WHEN leased_at IS NOT NULL THEN 'leased' WHEN run_after > ?6 THEN 'later' ELSE 'due' END AS state \
     FROM (SELECT * FROM foreman_task WHERE id < ?1 ORDER BY id DESC LIMIT ?2) \
     WHERE (?3 IS NULL OR task_name = ?3) \
     AND (?4 IS NULL OR instr(args, ?4) > 0 OR instr(kwargs, ?4) > 0) \
     AND (?5 IS NULL OR instr(?5, ',' || state || ',') > 0) \
     ORDER BY id DESC LIMIT ?7";

// A task's latest attempt, for tasks no longer queued: the two lookups are primary-key searches.
const SQL_RUN_PAGE: &str = "SELECT r.task_id, r.attempt, r.task_name, r.state, r.enqueued_at, r.started_at, \
     r.finished_at, r.error FROM (SELECT * FROM foreman_run WHERE task_id < ?1 \
     ORDER BY task_id DESC, attempt DESC LIMIT ?2) AS r \
     WHERE NOT EXISTS (SELECT 1 FROM foreman_run AS n WHERE n.task_id = r.task_id AND n.attempt > r.attempt) \
     AND NOT EXISTS (SELECT 1 FROM foreman_task AS t WHERE t.id = r.task_id) \
     AND (?3 IS NULL OR r.task_name = ?3) \
     AND (?4 IS NULL OR instr(r.error, ?4) > 0) \
     AND (?5 IS NULL OR instr(?5, ',' || r.state || ',') > 0) \
     ORDER BY r.task_id DESC, r.attempt DESC LIMIT ?6";

const SQL_QUEUED_WINDOW: &str = "SELECT count(*), min(id) FROM (SELECT id FROM foreman_task WHERE id < ?1 ORDER BY id DESC LIMIT ?2)";
const SQL_RUN_WINDOW: &str = "SELECT count(*), min(task_id) FROM (SELECT task_id FROM foreman_run \
     WHERE task_id < ?1 ORDER BY task_id DESC, attempt DESC LIMIT ?2)";

const SQL_DEAD_PAGE: &str = "SELECT id, task_id, task_name, args, kwargs, reason, created_at, died_at, \
     attempts, priority, origin FROM (SELECT * FROM foreman_dead WHERE id < ?1 ORDER BY id DESC LIMIT ?2) \
     WHERE (?3 IS NULL OR task_name = ?3) \
     AND (?4 IS NULL OR instr(args, ?4) > 0 OR instr(kwargs, ?4) > 0 OR instr(reason, ?4) > 0) \
     ORDER BY id DESC LIMIT ?5";
const SQL_DEAD_WINDOW: &str = "SELECT count(*), min(id) FROM (SELECT id FROM foreman_dead WHERE id < ?1 ORDER BY id DESC LIMIT ?2)";

impl SqliteStore {
    /// A page of tasks as `filter` asks: queued rows and the latest attempts of tasks no longer
    /// queued, merged newest first, each id once.
    pub fn task_page(&self, filter: &TaskFilter<'_>) -> Result<Page<TaskRow>> {
        let err = |e| self.err(e);
        let before = filter.before.unwrap_or(i64::MAX);
        let limit = to_i64(filter.limit);
        let window = to_i64(filter.window);
        let (queued_states, run_states) = split_states(&filter.states);
        let mut rows = Vec::new();
        let mut searched_to = None;
        if queued_states.as_deref() != Some("") {
            let found: Vec<TaskRow> = self
                .conn
                .prepare_cached(SQL_QUEUED_PAGE)
                .and_then(|mut s| {
                    s.query_map(
                        params![
                            before,
                            window,
                            filter.task,
                            filter.search,
                            queued_states,
                            filter.now,
                            limit
                        ],
                        |r| {
                            Ok(TaskRow {
                                id: r.get(0)?,
                                task_name: cell(r, 1)?.into_text_lossy(),
                                attempt: attempt(&cell(r, 2)?),
                                priority: Some(integer(&cell(r, 3)?)),
                                created_at: cell(r, 4)?.as_f64(),
                                run_after: cell(r, 5)?.as_f64(),
                                origin: text(cell(r, 6)?),
                                state: r.get(7)?,
                                started_at: None,
                                finished_at: None,
                                error: None,
                            })
                        },
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(err)?;
            // A source that filled the page covers everything down to its last row; only a
            // short one may have stopped at the end of its window.
            if found.len() < filter.limit {
                searched_to = searched_to
                    .max(window_end(&self.conn, SQL_QUEUED_WINDOW, before, window).map_err(err)?);
            }
            rows.extend(found);
        }
        if run_states.as_deref() != Some("") {
            let found: Vec<TaskRow> = self
                .conn
                .prepare_cached(SQL_RUN_PAGE)
                .and_then(|mut s| {
                    s.query_map(
                        params![
                            before,
                            window,
                            filter.task,
                            filter.search,
                            run_states,
                            limit
                        ],
                        |r| {
                            Ok(TaskRow {
                                id: r.get(0)?,
                                attempt: r.get(1)?,
                                task_name: cell(r, 2)?.into_text_lossy(),
                                state: text(cell(r, 3)?).unwrap_or_default(),
                                created_at: cell(r, 4)?.as_f64(),
                                started_at: cell(r, 5)?.as_f64(),
                                finished_at: cell(r, 6)?.as_f64(),
                                error: text(cell(r, 7)?),
                                priority: None,
                                run_after: None,
                                origin: None,
                            })
                        },
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(err)?;
            // A source that filled the page covers everything down to its last row; only a
            // short one may have stopped at the end of its window.
            if found.len() < filter.limit {
                searched_to = searched_to
                    .max(window_end(&self.conn, SQL_RUN_WINDOW, before, window).map_err(err)?);
            }
            rows.extend(found);
        }
        rows.sort_by_key(|row| std::cmp::Reverse(row.id));
        rows.dedup_by_key(|row| row.id);
        // Below where one source's window ended, the other's rows cannot be shown yet: rows of
        // the first may lie between them. The next page finds them again.
        rows.retain(|row| searched_to.is_none_or(|end| row.id >= end));
        Ok(page(rows, filter.limit, searched_to))
    }

    /// How many tasks `filter` matches, stopping at `cap` matches or at the end of its search
    /// window (`more`: at least that many). Its `before` and `limit` are ignored.
    pub fn count_tasks(&self, filter: &TaskFilter<'_>, cap: usize) -> Result<CappedCount> {
        let mut counting = filter.clone();
        counting.before = None;
        counting.limit = cap + 1;
        let page = self.task_page(&counting)?;
        Ok(CappedCount {
            count: to_i64(page.rows.len().min(cap)),
            more: page.rows.len() > cap || page.searched_to.is_some(),
        })
    }

    /// Everything about task `id`: its queued row, its attempts and its dead letters, in one
    /// snapshot; `None` when no table knows it.
    pub fn task_record(&self, id: i64) -> Result<Option<TaskRecord>> {
        let err = |e| self.err(e);
        let tx = self.conn.unchecked_transaction().map_err(err)?;
        let queued = tx
            .prepare_cached(
                "SELECT id, task_name, args, kwargs, created_at, run_after, priority, attempt, \
                 origin, leased_at FROM foreman_task WHERE id = ?1",
            )
            .and_then(|mut s| {
                s.query_row([id], |r| {
                    Ok(QueuedRow {
                        id: r.get(0)?,
                        task_name: cell(r, 1)?.into_text_lossy(),
                        args: text(cell(r, 2)?),
                        kwargs: text(cell(r, 3)?),
                        created_at: cell(r, 4)?.as_f64(),
                        run_after: cell(r, 5)?.as_f64(),
                        priority: integer(&cell(r, 6)?),
                        attempt: attempt(&cell(r, 7)?),
                        origin: text(cell(r, 8)?),
                        leased_at: cell(r, 9)?.as_f64(),
                    })
                })
                .optional()
            })
            .map_err(err)?;
        let attempts = tx
            .prepare_cached(
                "SELECT attempt, task_name, state, enqueued_at, started_at, finished_at, error, \
                 retry_at FROM foreman_run WHERE task_id = ?1 ORDER BY attempt",
            )
            .and_then(|mut s| {
                s.query_map([id], |r| {
                    Ok(AttemptRow {
                        attempt: r.get(0)?,
                        task_name: cell(r, 1)?.into_text_lossy(),
                        state: text(cell(r, 2)?).unwrap_or_default(),
                        enqueued_at: cell(r, 3)?.as_f64(),
                        started_at: cell(r, 4)?.as_f64(),
                        finished_at: cell(r, 5)?.as_f64(),
                        error: text(cell(r, 6)?),
                        retry_at: cell(r, 7)?.as_f64(),
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(err)?;
        let dead = tx
            .prepare_cached(
                "SELECT id, task_id, task_name, args, kwargs, reason, created_at, died_at, \
                 attempts, priority, origin FROM foreman_dead WHERE task_id = ?1 ORDER BY id",
            )
            .and_then(|mut s| {
                s.query_map([id], dead_letter)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(err)?;
        if queued.is_none() && attempts.is_empty() && dead.is_empty() {
            return Ok(None);
        }
        Ok(Some(TaskRecord {
            id,
            queued,
            attempts,
            dead,
        }))
    }

    /// A page of dead letters below the id `before`, newest first, looking at no more than
    /// `window` rows.
    pub fn dead_page(
        &self,
        filter: DeadFilter<'_>,
        before: Option<i64>,
        limit: usize,
        window: usize,
    ) -> Result<Page<DeadLetter>> {
        let err = |e| self.err(e);
        let before = before.unwrap_or(i64::MAX);
        let rows = self
            .conn
            .prepare_cached(SQL_DEAD_PAGE)
            .and_then(|mut s| {
                s.query_map(
                    params![
                        before,
                        to_i64(window),
                        filter.task,
                        filter.search,
                        to_i64(limit)
                    ],
                    dead_letter,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(err)?;
        let searched_to = if rows.len() < limit {
            window_end(&self.conn, SQL_DEAD_WINDOW, before, to_i64(window)).map_err(err)?
        } else {
            None
        };
        Ok(page(rows, limit, searched_to))
    }

    /// The ids of the dead letters `filter` matches, oldest first, at most `cap` + 1 of them (so
    /// that the caller can tell "more than `cap`").
    pub fn dead_ids(&self, filter: DeadFilter<'_>, cap: usize) -> Result<Vec<i64>> {
        self.conn
            .prepare_cached(
                "SELECT id FROM foreman_dead WHERE (?1 IS NULL OR task_name = ?1) \
                 AND (?2 IS NULL OR instr(args, ?2) > 0 OR instr(kwargs, ?2) > 0 OR instr(reason, ?2) > 0) \
                 ORDER BY id LIMIT ?3",
            )
            .and_then(|mut s| {
                s.query_map(
                    params![filter.task, filter.search, to_i64(cap.saturating_add(1))],
                    |r| r.get(0),
                )?
                .collect::<rusqlite::Result<Vec<i64>>>()
            })
            .map_err(|e| self.err(e))
    }

    /// How many dead letters `filter` matches, stopping at `cap` matches or after `window` rows
    /// (`more`: at least that many).
    pub fn count_dead(
        &self,
        filter: DeadFilter<'_>,
        cap: usize,
        window: usize,
    ) -> Result<CappedCount> {
        let page = self.dead_page(filter, None, cap + 1, window)?;
        Ok(CappedCount {
            count: to_i64(page.rows.len().min(cap)),
            more: page.rows.len() > cap || page.searched_to.is_some(),
        })
    }

    /// Deletes the dead letters with these ids, in one transaction; returns how many there were.
    pub fn purge_dead_ids(&mut self, ids: &[i64]) -> Result<usize> {
        self.write(|tx| {
            let mut delete = tx.prepare_cached("DELETE FROM foreman_dead WHERE id = ?1")?;
            let mut purged = 0;
            for id in ids {
                purged += delete.execute([id])?;
            }
            Ok(purged)
        })
    }

    /// The texts of the newest failures: the errors among the newest `window` attempts and the
    /// reasons of the newest `window` dead letters, newest first.
    pub fn failure_texts(&self, window: usize) -> Result<Vec<FailureText>> {
        let err = |e| self.err(e);
        let mut texts = self
            .conn
            .prepare_cached(
                "SELECT task_name, error, finished_at FROM (SELECT task_name, error, finished_at \
                 FROM foreman_run ORDER BY task_id DESC, attempt DESC LIMIT ?1) WHERE error IS NOT NULL",
            )
            .and_then(|mut s| {
                s.query_map([to_i64(window)], |r| {
                    Ok(FailureText {
                        task_name: text(cell(r, 0)?),
                        text: text(cell(r, 1)?).unwrap_or_default(),
                        at: cell(r, 2)?.as_f64(),
                        dead: false,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(err)?;
        texts.extend(
            self.conn
                .prepare_cached(
                    "SELECT task_name, reason, died_at FROM foreman_dead ORDER BY id DESC LIMIT ?1",
                )
                .and_then(|mut s| {
                    s.query_map([to_i64(window)], |r| {
                        Ok(FailureText {
                            task_name: text(cell(r, 0)?),
                            text: text(cell(r, 1)?).unwrap_or_default(),
                            at: cell(r, 2)?.as_f64(),
                            dead: true,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(err)?,
        );
        Ok(texts)
    }
}

/// The wanted states as the two sources' filters (`",due,later,"`): `None` for every state,
/// `Some("")` for none of a source's.
fn split_states(states: &[&str]) -> (Option<String>, Option<String>) {
    if states.is_empty() {
        return (None, None);
    }
    let list = |wanted: &mut dyn Iterator<Item = &&str>| {
        let names: Vec<&str> = wanted.copied().collect();
        if names.is_empty() {
            String::new()
        } else {
            format!(",{},", names.join(","))
        }
    };
    let queued = list(&mut states.iter().filter(|s| QUEUED_STATES.contains(s)));
    let run = list(&mut states.iter().filter(|s| !QUEUED_STATES.contains(s)));
    (Some(queued), Some(run))
}

/// Where a full search window ended: the lowest id it looked at, when it looked at `window` rows
/// (there may be more below); `None` when it reached the table's start.
fn window_end(
    conn: &Connection,
    sql: &str,
    before: i64,
    window: i64,
) -> rusqlite::Result<Option<i64>> {
    let (seen, lowest): (i64, Option<i64>) = conn
        .prepare_cached(sql)?
        .query_row(params![before, window], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(lowest.filter(|_| seen >= window))
}

/// The page of `limit` rows out of `rows` (newest first), and where the next one starts.
fn page<T: HasId>(mut rows: Vec<T>, limit: usize, searched_to: Option<i64>) -> Page<T> {
    if rows.len() >= limit {
        rows.truncate(limit);
        let next_before = rows.last().map(HasId::id);
        return Page {
            rows,
            next_before,
            searched_to: None,
        };
    }
    Page {
        rows,
        next_before: searched_to,
        searched_to,
    }
}

trait HasId {
    fn id(&self) -> i64;
}

impl HasId for TaskRow {
    fn id(&self) -> i64 {
        self.id
    }
}

impl HasId for DeadLetter {
    fn id(&self) -> i64 {
        self.id
    }
}

fn dead_letter(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        id: r.get(0)?,
        task_id: r.get(1)?,
        task_name: text(cell(r, 2)?),
        args: text(cell(r, 3)?),
        kwargs: text(cell(r, 4)?),
        reason: text(cell(r, 5)?).unwrap_or_default(),
        created_at: cell(r, 6)?.as_f64(),
        died_at: cell(r, 7)?.as_f64(),
        attempts: integer(&cell(r, 8)?),
        priority: integer(&cell(r, 9)?),
        origin: text(cell(r, 10)?),
    })
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn text(value: Cell) -> Option<String> {
    match value {
        Cell::Null => None,
        other => Some(other.into_text_lossy()),
    }
}

fn integer(value: &Cell) -> i64 {
    match *value {
        Cell::Integer(i) => i,
        _ => 0,
    }
}

/// A row's attempt the way the pop reads it: anything but a positive integer is the first.
fn attempt(value: &Cell) -> i64 {
    match *value {
        Cell::Integer(a) if a >= 1 => a,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::tests::{query_plan, queue_with};

    fn filter(states: Vec<&str>) -> TaskFilter<'_> {
        TaskFilter {
            states,
            limit: 10,
            window: 1000,
            now: 1000.0,
            ..TaskFilter::default()
        }
    }

    #[test]
    fn a_task_is_listed_once_in_its_current_state() {
        let dir = tempfile::tempdir().unwrap();
        let queue = queue_with(
            &dir,
            "INSERT INTO foreman_task(id, task_name, run_after, args) VALUES (1, 'a', 10, '[\"x\"]'), (2, 'a', 5000, '[]');
             INSERT INTO foreman_run(task_id, attempt, task_name, state, error, retry_at) VALUES
                 (1, 1, 'a', 'failed', 'boom', 20), (3, 1, 'b', 'failed', 'bad', 30), (3, 2, 'b', 'done', NULL, NULL),
                 (4, 1, 'b', 'running', NULL, NULL);",
        );
        let page = queue.task_page(&filter(vec![])).unwrap();
        let got: Vec<(i64, &str)> = page.rows.iter().map(|r| (r.id, r.state.as_str())).collect();
        assert_eq!(got, [(4, "running"), (3, "done"), (2, "later"), (1, "due")]);
        assert_eq!(page.next_before, None);
        let failed = queue.task_page(&filter(vec!["failed"])).unwrap();
        assert!(failed.rows.is_empty(), "task 3's latest attempt is done");
        let mut search = filter(vec![]);
        search.search = Some("\"x\"");
        let found: Vec<i64> = queue
            .task_page(&search)
            .unwrap()
            .rows
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(found, [1]);
        let count = queue.count_tasks(&filter(vec!["due", "later"]), 1).unwrap();
        assert_eq!(
            count,
            CappedCount {
                count: 1,
                more: true
            }
        );
    }

    #[test]
    fn a_search_window_that_runs_out_says_how_far_it_got() {
        let dir = tempfile::tempdir().unwrap();
        let queue = queue_with(
            &dir,
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50)
             INSERT INTO foreman_task(id, task_name) SELECT i, CASE WHEN i = 3 THEN 'rare' ELSE 'common' END FROM n;",
        );
        let mut rare = filter(vec![]);
        rare.task = Some("rare");
        rare.window = 20;
        let first = queue.task_page(&rare).unwrap();
        assert!(first.rows.is_empty());
        assert_eq!(first.searched_to, Some(31));
        rare.before = first.next_before;
        let second = queue.task_page(&rare).unwrap();
        assert_eq!(second.searched_to, Some(11));
        rare.before = second.next_before;
        let third = queue.task_page(&rare).unwrap();
        assert_eq!(third.rows.len(), 1);
        assert_eq!(third.next_before, None);
    }

    #[test]
    fn listings_walk_the_primary_keys_downwards() {
        let dir = tempfile::tempdir().unwrap();
        let queue = queue_with(&dir, "");
        for (sql, wanted) in [
            (
                SQL_QUEUED_PAGE,
                "SEARCH foreman_task USING INTEGER PRIMARY KEY (rowid<?)",
            ),
            (
                SQL_RUN_PAGE,
                "SEARCH foreman_run USING PRIMARY KEY (task_id<?)",
            ),
            (
                SQL_DEAD_PAGE,
                "SEARCH foreman_dead USING INTEGER PRIMARY KEY (rowid<?)",
            ),
        ] {
            let plan = query_plan(&queue, sql);
            assert!(plan.contains(wanted), "{sql}: {plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{sql}: {plan}");
        }
    }
}
