//! The dashboard's reads on PostgreSQL (`foreman ui`), as on SQLite: dead letters paged and
//! selected by filter, failure texts for grouping, and deleting a chosen set of dead letters. A
//! page walks the primary key down from a cursor and looks at no more than `window` rows; counts
//! stop at a cap, so that a dashboard refreshing twice a second never scans a big table.

use super::{PgStore, big, dead_letter, opt_secs};
use crate::error::Result;
use crate::store::types::{CappedCount, DeadFilter, DeadLetter, FailureText, Page};

// `$1` before, `$2` window, `$3` name, `$4` search, `$5` limit. The inner select walks the primary
// key downwards and stops after `window` rows; the outer one filters what it hands over, in order.
const SQL_DEAD_PAGE: &str = "SELECT id, task_id, task_name, args::text, kwargs::text, reason, \
     extract(epoch FROM created_at)::float8, extract(epoch FROM died_at)::float8, attempts::int8, \
     priority::int8, origin, unique_key \
     FROM (SELECT * FROM foreman_dead WHERE id < $1 ORDER BY id DESC LIMIT $2) d \
     WHERE ($3::text IS NULL OR task_name = $3) \
     AND ($4::text IS NULL OR strpos(args::text, $4) > 0 OR strpos(kwargs::text, $4) > 0 \
          OR strpos(reason, $4) > 0) \
     ORDER BY id DESC LIMIT $5";
const SQL_DEAD_WINDOW: &str = "SELECT count(*), min(id) \
     FROM (SELECT id FROM foreman_dead WHERE id < $1 ORDER BY id DESC LIMIT $2) w";

impl PgStore {
    /// A page of dead letters below the id `before`, newest first, looking at no more than
    /// `window` rows.
    pub fn dead_page(
        &self,
        filter: DeadFilter<'_>,
        before: Option<i64>,
        limit: usize,
        window: usize,
    ) -> Result<Page<DeadLetter>> {
        let before = before.unwrap_or(i64::MAX);
        let (window, wanted) = (big(window), big(limit));
        let (rows, seen) = self.snapshot(|| {
            let rows: Vec<DeadLetter> = self
                .query(
                    SQL_DEAD_PAGE,
                    &[&before, &window, &filter.task, &filter.search, &wanted],
                )?
                .iter()
                .map(dead_letter)
                .collect();
            let seen = if rows.len() < limit {
                let row = self.query(SQL_DEAD_WINDOW, &[&before, &window])?;
                row.first()
                    .map(|r| (r.get::<_, i64>(0), r.get::<_, Option<i64>>(1)))
            } else {
                None
            };
            Ok((rows, seen))
        })?;
        let searched_to = seen.and_then(|(count, lowest)| lowest.filter(|_| count >= window));
        Ok(page(rows, limit, searched_to))
    }

    /// The ids of the dead letters `filter` matches, oldest first, at most `cap` + 1 of them (so
    /// that the caller can tell "more than `cap`").
    pub fn dead_ids(&self, filter: DeadFilter<'_>, cap: usize) -> Result<Vec<i64>> {
        let limit = big(cap.saturating_add(1));
        Ok(self
            .query(
                "SELECT id FROM foreman_dead WHERE ($1::text IS NULL OR task_name = $1) \
                 AND ($2::text IS NULL OR strpos(args::text, $2) > 0 \
                      OR strpos(kwargs::text, $2) > 0 OR strpos(reason, $2) > 0) \
                 ORDER BY id LIMIT $3",
                &[&filter.task, &filter.search, &limit],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
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
            count: big(page.rows.len().min(cap)),
            more: page.rows.len() > cap || page.searched_to.is_some(),
        })
    }

    /// Deletes the dead letters with these ids, in one statement; returns how many there were.
    pub fn purge_dead_ids(&mut self, ids: &[i64]) -> Result<usize> {
        let n = self.with(|c| {
            c.execute(
                "DELETE FROM foreman_dead WHERE id = ANY($1)",
                &[&ids.to_vec()],
            )
        })?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// The texts of the newest failures: the errors among the newest `window` attempts and the
    /// reasons of the newest `window` dead letters, newest first.
    pub fn failure_texts(&self, window: usize) -> Result<Vec<FailureText>> {
        let window = big(window);
        self.snapshot(|| {
            let mut texts: Vec<FailureText> = self
                .query(
                    "SELECT task_name, error, extract(epoch FROM finished_at)::float8 \
                     FROM (SELECT task_name, error, finished_at FROM foreman_run \
                           ORDER BY task_id DESC, attempt DESC LIMIT $1) r \
                     WHERE error IS NOT NULL",
                    &[&window],
                )?
                .iter()
                .map(|r| FailureText {
                    task_name: r.get(0),
                    text: r.get::<_, Option<String>>(1).unwrap_or_default(),
                    at: opt_secs(r, 2),
                    dead: false,
                })
                .collect();
            texts.extend(
                self.query(
                    "SELECT task_name, reason, extract(epoch FROM died_at)::float8 \
                     FROM foreman_dead ORDER BY id DESC LIMIT $1",
                    &[&window],
                )?
                .iter()
                .map(|r| FailureText {
                    task_name: r.get(0),
                    text: r.get(1),
                    at: opt_secs(r, 2),
                    dead: true,
                }),
            );
            Ok(texts)
        })
    }
}

/// The page of `limit` rows out of `rows` (newest first), and where the next one starts.
fn page(mut rows: Vec<DeadLetter>, limit: usize, searched_to: Option<i64>) -> Page<DeadLetter> {
    if rows.len() >= limit {
        rows.truncate(limit);
        let next_before = rows.last().map(|r| r.id);
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
