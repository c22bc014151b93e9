//! The dashboard's reads (`foreman ui`) beyond `list` and `show`'s: dead letters paged and
//! selected by filter, failure texts for grouping, and deleting a chosen set of dead letters. A
//! page of dead letters walks the primary key down from a cursor and looks at a bounded number of
//! rows (`window`), and counts stop at a cap: a dashboard refreshing twice a second must not scan
//! a table of millions of rows.

use rusqlite::{Connection, params};

use super::admin::dead_letter;
use super::{SqliteStore, cell};
use crate::error::Result;
use crate::store::row::Cell;
use crate::store::types::{CappedCount, DeadFilter, DeadLetter, FailureText, Page};

// `?1` before, `?2` window, `?3` name, `?4` search, `?5` limit. The inner select walks the rowid
// downwards and stops after `window` rows; the outer one filters what it hands over, in order.
const SQL_DEAD_PAGE: &str = "SELECT id, task_id, task_name, args, kwargs, reason, created_at, died_at, \
     attempts, priority, origin, unique_key FROM (SELECT * FROM foreman_dead WHERE id < ?1 ORDER BY id DESC LIMIT ?2) \
     WHERE (?3 IS NULL OR task_name = ?3) \
     AND (?4 IS NULL OR instr(args, ?4) > 0 OR instr(kwargs, ?4) > 0 OR instr(reason, ?4) > 0) \
     ORDER BY id DESC LIMIT ?5";
const SQL_DEAD_WINDOW: &str = "SELECT count(*), min(id) FROM (SELECT id FROM foreman_dead WHERE id < ?1 ORDER BY id DESC LIMIT ?2)";

impl SqliteStore {
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

impl HasId for DeadLetter {
    fn id(&self) -> i64 {
        self.id
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::tests::{query_plan, queue_with};

    #[test]
    fn a_search_window_that_runs_out_says_how_far_it_got() {
        let dir = tempfile::tempdir().unwrap();
        let queue = queue_with(
            &dir,
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50)
             INSERT INTO foreman_dead(id, task_id, task_name, reason)
             SELECT i, i, CASE WHEN i = 3 THEN 'rare' ELSE 'common' END, 'boom' FROM n;",
        );
        let rare = DeadFilter {
            task: Some("rare"),
            search: None,
        };
        let first = queue.dead_page(rare, None, 10, 20).unwrap();
        assert!(first.rows.is_empty());
        assert_eq!(first.searched_to, Some(31));
        let second = queue.dead_page(rare, first.next_before, 10, 20).unwrap();
        assert_eq!(second.searched_to, Some(11));
        let third = queue.dead_page(rare, second.next_before, 10, 20).unwrap();
        assert_eq!(third.rows.len(), 1);
        assert_eq!(third.next_before, None);
        let count = queue.count_dead(DeadFilter::default(), 10, 1000).unwrap();
        assert_eq!(
            count,
            CappedCount {
                count: 10,
                more: true
            }
        );
        assert_eq!(queue.dead_ids(rare, 10).unwrap(), [3]);
    }

    #[test]
    fn a_page_of_dead_letters_walks_the_primary_key_downwards() {
        let dir = tempfile::tempdir().unwrap();
        let queue = queue_with(&dir, "");
        let plan = query_plan(&queue, SQL_DEAD_PAGE);
        assert!(
            plan.contains("SEARCH foreman_dead USING INTEGER PRIMARY KEY (rowid<?)"),
            "{plan}"
        );
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");
    }
}
