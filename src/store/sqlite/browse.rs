//! Browsing tasks: `foreman list` (the queued rows, the running attempts and the history, filtered
//! and paged by id) and `foreman show` (one task's row, attempts and dead letter). Read-only.
//!
//! A list is a merge of up to four sources, each read in id order and stopped once it has `limit`
//! rows: `foreman_task` (its primary key, or the partial index of leased rows), the running
//! attempts (their partial index), the tasks whose latest attempt ended in a history state (the
//! history's primary key: no index of states, which every attempt's writes would pay for) and
//! `foreman_dead` (its task-id index). Nothing is counted unless asked (`count`).

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, params};

use super::admin::{DEAD_COLUMNS, dead_letter};
use super::{SqliteStore, cell};
use crate::error::Result;
use crate::store::row::Cell;
use crate::store::types::{AttemptRecord, CappedCount, ListQuery, ListedTask, TaskStory};

/// The states a task's row in `foreman_task` can be in.
const QUEUE_STATES: [&str; 4] = ["due", "later", "paused", "leased"];
/// The history states read from the task's latest attempt.
const ATTEMPT_STATES: [&str; 5] = ["done", "failed", "timeout", "lost", "cancelled"];
/// Whether the row's name is paused (or everything is): a lookup in the small pause table.
const NAME_PAUSED: &str =
    "EXISTS (SELECT 1 FROM foreman_pause p WHERE p.task_name IN ('', t.task_name))";

/// A row's state, as `list` and `show` name it.
fn queue_state_sql() -> String {
    format!(
        "CASE WHEN t.leased_at IS NOT NULL THEN 'leased' \
         WHEN t.paused = 1 OR {NAME_PAUSED} THEN 'paused' \
         WHEN t.run_after > :now THEN 'later' ELSE 'due' END"
    )
}

/// The condition for one state of a `foreman_task` row.
fn queue_state_condition(state: &str) -> String {
    match state {
        "leased" => "t.leased_at IS NOT NULL".to_owned(),
        "paused" => format!("t.leased_at IS NULL AND (t.paused = 1 OR {NAME_PAUSED})"),
        "later" => {
            format!(
                "t.leased_at IS NULL AND t.paused = 0 AND t.run_after > :now AND NOT {NAME_PAUSED}"
            )
        }
        _ => format!(
            "t.leased_at IS NULL AND t.paused = 0 AND t.run_after <= :now AND NOT {NAME_PAUSED}"
        ),
    }
}

/// A query's text and named parameters, built from the filters.
struct Sql {
    conditions: Vec<String>,
    params: Vec<(&'static str, Value)>,
}

/// Where a source keeps what the filters look at: columns, or expressions on them.
struct Columns {
    id: &'static str,
    task_name: &'static str,
    priority: &'static str,
    args: &'static str,
    kwargs: &'static str,
    /// The attempt's error or the dead letter's reason, which a search looks in too.
    error: &'static str,
}

const TASK: Columns = Columns {
    id: "t.id",
    task_name: "t.task_name",
    priority: "t.priority",
    args: "t.args",
    kwargs: "t.kwargs",
    error: "NULL",
};
// An attempt's `task` document leaves out what is usual; an attempt of schema version 3 has none.
const RUN: Columns = Columns {
    id: "r.task_id",
    task_name: "r.task_name",
    priority: "coalesce(json_extract(r.task, '$.priority'), 0)",
    args: "CASE WHEN r.task IS NOT NULL THEN coalesce(json_extract(r.task, '$.args'), '[]') END",
    kwargs: "CASE WHEN r.task IS NOT NULL THEN coalesce(json_extract(r.task, '$.kwargs'), '{}') END",
    error: "r.error",
};
const DEAD: Columns = Columns {
    id: "d.task_id",
    task_name: "d.task_name",
    priority: "d.priority",
    args: "d.args",
    kwargs: "d.kwargs",
    error: "d.reason",
};

impl Sql {
    /// The filters every source shares, on its `columns`, and the keyset bound on its id.
    fn new(q: &ListQuery<'_>, c: &Columns) -> Sql {
        let mut sql = Sql {
            conditions: Vec::new(),
            params: Vec::new(),
        };
        if let Some(task) = q.task {
            sql.conditions.push(format!("{} = :task", c.task_name));
            sql.params.push((":task", Value::Text(task.to_owned())));
        }
        if let Some(priority) = q.priority {
            sql.conditions.push(format!("{} = :priority", c.priority));
            sql.params.push((":priority", Value::Integer(priority)));
        }
        if let Some(search) = q.search {
            sql.conditions.push(format!(
                "(instr({}, :search) > 0 OR instr({}, :search) > 0 OR instr({}, :search) > 0)",
                c.args, c.kwargs, c.error
            ));
            sql.params.push((":search", Value::Text(search.to_owned())));
        }
        if let Some(after) = q.after {
            let op = if q.newest_first { "<" } else { ">" };
            sql.conditions.push(format!("{} {op} :after", c.id));
            sql.params.push((":after", Value::Integer(after)));
        }
        sql
    }

    fn with_now(mut self, now: f64) -> Sql {
        self.params.push((":now", Value::Real(now)));
        self
    }

    fn and(&mut self, condition: String) {
        self.conditions.push(condition);
    }

    fn where_clause(&self) -> String {
        if self.conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", self.conditions.join(" AND "))
        }
    }

    /// The parameters `text` uses (binding one it does not name is an error).
    fn named(&self, text: &str) -> Vec<(&str, &dyn rusqlite::ToSql)> {
        self.params
            .iter()
            .filter(|(name, _)| text.contains(name))
            .map(|(name, value)| (*name, value as &dyn rusqlite::ToSql))
            .collect()
    }
}

/// The sources a query reads: each a `SELECT` of the listed columns (or a count) with its
/// parameters.
struct Source {
    /// Everything after `SELECT <columns>`.
    from: String,
    columns: &'static str,
    sql: Sql,
    /// The id column, for the order.
    id: &'static str,
}

const TASK_COLUMNS: &str = "t.id, t.task_name, {state}, t.args, t.kwargs, t.priority, t.run_after, \
     t.attempt, t.created_at, t.origin, t.unique_key, NULL, NULL, NULL";
const RUN_COLUMNS: &str = "r.task_id, r.task_name, r.state, \
     CASE WHEN r.task IS NOT NULL THEN coalesce(json_extract(r.task, '$.args'), '[]') END, \
     CASE WHEN r.task IS NOT NULL THEN coalesce(json_extract(r.task, '$.kwargs'), '{}') END, \
     coalesce(json_extract(r.task, '$.priority'), 0), NULL, r.attempt, \
     r.enqueued_at, json_extract(r.task, '$.origin'), r.unique_key, r.started_at, r.finished_at, r.error";
const DEAD_LIST_COLUMNS: &str = "d.task_id, d.task_name, 'dead', d.args, d.kwargs, d.priority, \
     NULL, d.attempts, d.created_at, d.origin, d.unique_key, NULL, d.died_at, d.reason";

fn sources(q: &ListQuery<'_>) -> Result<Vec<Source>> {
    let states = q.wanted_states()?;
    let wants = |state: &str| states.as_ref().is_none_or(|s| s.contains(&state));
    let mut sources = Vec::new();

    let queue: Vec<&str> = QUEUE_STATES.into_iter().filter(|s| wants(s)).collect();
    if !queue.is_empty() {
        let mut sql = Sql::new(q, &TASK).with_now(q.now);
        if queue.len() < QUEUE_STATES.len() {
            let any: Vec<String> = queue.iter().map(|s| queue_state_condition(s)).collect();
            sql.and(format!("({})", any.join(" OR ")));
        }
        sources.push(Source {
            from: format!("FROM foreman_task t {}", sql.where_clause()),
            columns: TASK_COLUMNS,
            sql,
            id: "t.id",
        });
    }

    // The running attempts; by default, those of at-most-once tasks only, since a leased one is
    // already listed with its row.
    let explicit = states.as_ref().is_some_and(|s| s.contains(&"running"));
    if explicit || states.is_none() {
        let mut sql = Sql::new(q, &RUN);
        sql.and("r.state = 'running'".to_owned());
        if states.is_none() || wants("leased") {
            sql.and("NOT EXISTS (SELECT 1 FROM foreman_task t WHERE t.id = r.task_id)".to_owned());
        }
        sources.push(Source {
            from: format!("FROM foreman_run r {}", sql.where_clause()),
            columns: RUN_COLUMNS,
            sql,
            id: "r.task_id",
        });
    }

    let history: Vec<&str> = match &states {
        Some(states) => ATTEMPT_STATES
            .into_iter()
            .filter(|s| states.contains(s))
            .collect(),
        None => Vec::new(),
    };
    if !history.is_empty() {
        let mut sql = Sql::new(q, &RUN);
        let quoted: Vec<String> = history.iter().map(|s| format!("'{s}'")).collect();
        sql.and(format!("r.state IN ({})", quoted.join(", ")));
        // The task's latest attempt, and the task is not queued again (a retry): its outcome.
        sql.and(
            "NOT EXISTS (SELECT 1 FROM foreman_run n WHERE n.task_id = r.task_id AND n.attempt > r.attempt) \
             AND NOT EXISTS (SELECT 1 FROM foreman_task t WHERE t.id = r.task_id)"
                .to_owned(),
        );
        sources.push(Source {
            from: format!("FROM foreman_run r {}", sql.where_clause()),
            columns: RUN_COLUMNS,
            sql,
            id: "r.task_id",
        });
    }

    if states.as_ref().is_some_and(|s| s.contains(&"dead")) {
        let sql = Sql::new(q, &DEAD);
        sources.push(Source {
            from: format!("FROM foreman_dead d {}", sql.where_clause()),
            columns: DEAD_LIST_COLUMNS,
            sql,
            id: "d.task_id",
        });
    }
    Ok(sources)
}

fn listed(r: &rusqlite::Row<'_>) -> rusqlite::Result<ListedTask> {
    let text = |value: Cell| match value {
        Cell::Null => None,
        other => Some(other.into_text_lossy()),
    };
    Ok(ListedTask {
        id: r.get(0)?,
        task_name: cell(r, 1)?.into_text_lossy(),
        state: cell(r, 2)?.into_text_lossy(),
        args: text(cell(r, 3)?),
        kwargs: text(cell(r, 4)?),
        priority: match cell(r, 5)? {
            Cell::Integer(p) => p,
            _ => 0,
        },
        run_after: cell(r, 6)?.as_f64(),
        attempt: match cell(r, 7)? {
            Cell::Integer(a) => a,
            _ => 1,
        },
        created_at: cell(r, 8)?.as_f64(),
        origin: text(cell(r, 9)?),
        unique_key: text(cell(r, 10)?),
        started_at: cell(r, 11)?.as_f64(),
        finished_at: cell(r, 12)?.as_f64(),
        error: text(cell(r, 13)?),
    })
}

impl SqliteStore {
    /// The tasks `q` asks for, at most `q.limit`, in id order (newest first or oldest first),
    /// after `q.after`. Each source stops at `limit` rows, so the cost is the rows it steps over
    /// to find them: nothing at all with no filter, a walk of the matching rows otherwise.
    pub fn list(&self, q: &ListQuery<'_>) -> Result<Vec<ListedTask>> {
        let err = |e| self.err(e);
        let tx = self.conn.unchecked_transaction().map_err(err)?;
        let order = if q.newest_first { "DESC" } else { "ASC" };
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        let mut rows = Vec::new();
        for source in sources(q)? {
            let columns = source.columns.replace("{state}", &queue_state_sql());
            let sql = format!(
                "SELECT {columns} {} ORDER BY {} {order} LIMIT {limit}",
                source.from, source.id
            );
            let mut statement = tx.prepare(&sql).map_err(err)?;
            let found = statement
                .query_map(&*source.sql.named(&sql), listed)
                .map_err(err)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(err)?;
            rows.extend(found);
        }
        // Each source is in order; their merge, cut to the limit, is the page.
        if q.newest_first {
            rows.sort_by_key(|row| std::cmp::Reverse(row.id));
        } else {
            rows.sort_by_key(|row| row.id);
        }
        rows.truncate(q.limit);
        Ok(rows)
    }

    /// How many tasks `q` matches, however many there are (`q.limit` aside): a count of each
    /// source, which walks every matching row.
    pub fn count(&self, q: &ListQuery<'_>) -> Result<i64> {
        let err = |e| self.err(e);
        let tx = self.conn.unchecked_transaction().map_err(err)?;
        let mut total = 0;
        for source in sources(q)? {
            let sql = format!("SELECT count(*) {}", source.from);
            let n: i64 = tx
                .query_row(&sql, &*source.sql.named(&sql), |r| r.get(0))
                .map_err(err)?;
            total += n;
        }
        Ok(total)
    }

    /// Everything known of task `id`, in one snapshot; `None` when no table knows it.
    /// `count` that stops at `cap` + 1 rows of each source: what a dashboard can ask on every
    /// refresh ("10,000+"), however big the tables.
    pub fn count_up_to(&self, q: &ListQuery<'_>, cap: usize) -> Result<CappedCount> {
        let err = |e| self.err(e);
        let tx = self.conn.unchecked_transaction().map_err(err)?;
        let mut wide = q.clone();
        wide.after = None;
        let limit = i64::try_from(cap).unwrap_or(i64::MAX - 1) + 1;
        let mut total: i64 = 0;
        let mut more = false;
        for source in sources(&wide)? {
            let sql = format!(
                "SELECT count(*) FROM (SELECT 1 {} LIMIT {limit})",
                source.from
            );
            let n: i64 = tx
                .query_row(&sql, &*source.sql.named(&sql), |r| r.get(0))
                .map_err(err)?;
            more |= n >= limit;
            total += n;
        }
        let cap = i64::try_from(cap).unwrap_or(i64::MAX);
        Ok(CappedCount {
            count: total.min(cap),
            more: more || total > cap,
        })
    }

    pub fn task_story(&self, id: i64, now: f64) -> Result<Option<TaskStory>> {
        let err = |e| self.err(e);
        let tx = self.conn.unchecked_transaction().map_err(err)?;
        let queued = queued_row(&tx, id, now).map_err(err)?;
        let attempts = attempts(&tx, id).map_err(err)?;
        let dead = tx
            .prepare_cached(&format!(
                "SELECT {DEAD_COLUMNS} FROM foreman_dead WHERE task_id = ?1 ORDER BY id DESC LIMIT 1"
            ))
            .and_then(|mut s| s.query_row([id], dead_letter).optional())
            .map_err(err)?;
        if queued.is_none() && attempts.is_empty() && dead.is_none() {
            return Ok(None);
        }
        let name = queued
            .as_ref()
            .map(|q| q.task_name.clone())
            .or_else(|| attempts.last().map(|a| a.task_name.clone()))
            .or_else(|| dead.as_ref().and_then(|d| d.task_name.clone()));
        let paused_since = tx
            .prepare_cached("SELECT min(paused_at) FROM foreman_pause WHERE task_name IN ('', ?1)")
            .and_then(|mut s| s.query_row([name], |r| r.get(0)))
            .map_err(err)?;
        Ok(Some(TaskStory {
            task_id: id,
            queued,
            dead,
            attempts,
            paused_since,
        }))
    }
}

fn queued_row(tx: &Connection, id: i64, now: f64) -> rusqlite::Result<Option<ListedTask>> {
    let columns = TASK_COLUMNS.replace("{state}", &queue_state_sql());
    tx.prepare_cached(&format!(
        "SELECT {columns} FROM foreman_task t WHERE t.id = :id"
    ))?
    .query_row(rusqlite::named_params! {":id": id, ":now": now}, listed)
    .optional()
}

fn attempts(tx: &Connection, id: i64) -> rusqlite::Result<Vec<AttemptRecord>> {
    let text = |value: Cell| match value {
        Cell::Null => None,
        other => Some(other.into_text_lossy()),
    };
    let integer = |value: Cell| match value {
        Cell::Integer(i) => Some(i),
        _ => None,
    };
    // Who ran each attempt: the last daemon to start before it did.
    let daemons: Vec<(f64, String)> = tx
        .prepare_cached(
            "SELECT started_at, host || ':' || pid FROM foreman_daemon_log ORDER BY started_at",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let daemon_at = |started: Option<f64>| {
        let started = started?;
        daemons
            .iter()
            .rev()
            .find(|(at, _)| *at <= started)
            .map(|(_, who)| who.clone())
    };
    tx.prepare_cached(
        "SELECT r.attempt, r.task_name, r.state, r.enqueued_at, r.started_at, r.finished_at, r.error, \
         r.retry_at, r.exit_code, r.result, r.task, r.unique_key, a.requested_at \
         FROM foreman_run r LEFT JOIN foreman_abort a ON a.task_id = r.task_id AND a.attempt = r.attempt \
         WHERE r.task_id = ?1 ORDER BY r.attempt",
    )?
    .query_map(params![id], |r| {
        // The task as the attempt ran it, its usual values left out; none before schema 4.
        let task: Option<serde_json::Value> =
            text(cell(r, 10)?).and_then(|t| serde_json::from_str(&t).ok());
        let field = |key: &str, usual: serde_json::Value| {
            task.as_ref()
                .map(|task| task.get(key).cloned().unwrap_or(usual))
        };
        let started_at = cell(r, 4)?.as_f64();
        Ok(AttemptRecord {
            attempt: r.get(0)?,
            task_name: cell(r, 1)?.into_text_lossy(),
            state: cell(r, 2)?.into_text_lossy(),
            enqueued_at: cell(r, 3)?.as_f64(),
            started_at,
            finished_at: cell(r, 5)?.as_f64(),
            error: text(cell(r, 6)?),
            retry_at: cell(r, 7)?.as_f64(),
            exit_code: integer(cell(r, 8)?),
            result: text(cell(r, 9)?),
            daemon: daemon_at(started_at),
            args: field("args", serde_json::json!([])).map(|v| v.to_string()),
            kwargs: field("kwargs", serde_json::json!({})).map(|v| v.to_string()),
            priority: field("priority", serde_json::json!(0)).and_then(|v| v.as_i64()),
            origin: field("origin", serde_json::Value::Null)
                .and_then(|v| v.as_str().map(str::to_owned)),
            unique_key: text(cell(r, 11)?),
            abort_requested_at: cell(r, 12)?.as_f64(),
        })
    })?
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::tests::{query_plan, queue_with};

    fn query<'a>(states: &[&'a str]) -> ListQuery<'a> {
        ListQuery {
            states: states.to_vec(),
            newest_first: true,
            limit: 50,
            now: 1e12,
            ..ListQuery::default()
        }
    }

    /// Every source, unfiltered, is a walk of an index in id order: no sort, no scan of a table
    /// it then sorts; with `LIMIT`, it stops at the page's end.
    #[test]
    fn every_source_reads_in_index_order() {
        let dir = tempfile::tempdir().unwrap();
        let queue = queue_with(&dir, "");
        for states in [
            &[][..],
            &["leased"],
            &["running"],
            &["failed"],
            &["done"],
            &["dead"],
        ] {
            for source in sources(&query(states)).unwrap() {
                let columns = source.columns.replace("{state}", &queue_state_sql());
                let sql = format!(
                    "SELECT {columns} {} ORDER BY {} DESC LIMIT 50",
                    source.from, source.id
                )
                .replace(":now", "1");
                let plan = query_plan(&queue, &sql);
                assert!(!plan.contains("TEMP B-TREE"), "{states:?}: {plan}");
            }
        }
        let leased = sources(&query(&["leased"])).unwrap();
        let sql = format!("SELECT t.id {} ORDER BY t.id DESC", leased[0].from).replace(":now", "1");
        assert!(
            query_plan(&queue, &sql).contains("foreman_task_leased"),
            "{}",
            query_plan(&queue, &sql)
        );
    }

    #[test]
    fn lists_each_state_and_pages_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let queue = queue_with(
            &dir,
            "INSERT INTO foreman_task(id, task_name, run_after) VALUES (1, 'a', 0), (2, 'a', 2e12), (3, 'b', 0);
             INSERT INTO foreman_task(id, task_name, run_after, leased_at) VALUES (4, 'a', 2e12, 1);
             INSERT INTO foreman_pause(task_name, paused_at) VALUES ('b', 1);
             INSERT INTO foreman_run(task_id, attempt, task_name, state, task) VALUES
                 (5, 1, 'a', 'running', '{\"args\":[5]}'), (4, 1, 'a', 'running', '{\"args\":[]}'),
                 (6, 1, 'a', 'failed', '{\"args\":[6]}'), (6, 2, 'a', 'done', '{\"args\":[6]}'),
                 (7, 1, 'c', 'failed', '{\"args\":[7]}');
             INSERT INTO foreman_dead(task_id, task_name, reason) VALUES (7, 'c', 'x');",
        );
        let list = |q: &ListQuery<'_>| -> Vec<(i64, String)> {
            queue
                .list(q)
                .unwrap()
                .into_iter()
                .map(|t| (t.id, t.state))
                .collect()
        };
        let s = |id: i64, state: &str| (id, state.to_owned());
        assert_eq!(
            list(&query(&[])),
            [
                s(5, "running"),
                s(4, "leased"),
                s(3, "paused"),
                s(2, "later"),
                s(1, "due")
            ]
        );
        assert_eq!(
            list(&query(&["running"])),
            [s(5, "running"), s(4, "running")]
        );
        assert_eq!(
            list(&query(&["queued"])),
            [s(3, "paused"), s(2, "later"), s(1, "due")]
        );
        assert_eq!(
            list(&query(&["done", "failed"])),
            [s(7, "failed"), s(6, "done")]
        );
        assert_eq!(list(&query(&["dead"])), [s(7, "dead")]);
        let mut page = query(&[]);
        page.limit = 2;
        page.after = Some(4);
        assert_eq!(list(&page), [s(3, "paused"), s(2, "later")]);
        page.newest_first = false;
        page.after = Some(1);
        assert_eq!(list(&page), [s(2, "later"), s(3, "paused")]);
        let mut named = query(&[]);
        named.task = Some("a");
        named.search = Some("5");
        assert_eq!(list(&named), [s(5, "running")]);
        assert_eq!(queue.count(&query(&[])).unwrap(), 5);
        assert!(queue.list(&query(&["nonsense"])).is_err());
    }
}
