//! Browsing tasks on PostgreSQL: `foreman list` (queued rows, running attempts and history,
//! filtered and paged by id) and `foreman show` (one task's row, attempts and dead letter), as on
//! SQLite: a merge of up to four sources, each read in id order and stopped at the page's size.
//! Read-only. A name is paused when `foreman_pause` says so (the rows themselves are untouched).
//! `--search` looks in the JSON text PostgreSQL prints for `jsonb` (`{"a": 1}`, with spaces).

use postgres::types::ToSql;

use super::{PgStore, opt_secs};
use crate::error::Result;
use crate::store::types::{AttemptRecord, CappedCount, ListQuery, ListedTask, TaskStory};

const QUEUE_STATES: [&str; 4] = ["due", "later", "paused", "leased"];
const ATTEMPT_STATES: [&str; 5] = ["done", "failed", "timeout", "lost", "cancelled"];

/// Whether the row's name is paused (or everything is).
const NAME_PAUSED: &str =
    "EXISTS (SELECT 1 FROM foreman_pause p WHERE p.task_name IN ('', t.task_name))";

/// A query's conditions and parameters (`$1`…), built from the filters.
struct Sql {
    conditions: Vec<String>,
    params: Vec<Box<dyn ToSql + Sync>>,
}

impl Sql {
    fn new() -> Sql {
        Sql {
            conditions: Vec::new(),
            params: Vec::new(),
        }
    }

    /// `$n` for a new parameter.
    fn param(&mut self, value: impl ToSql + Sync + 'static) -> String {
        self.params.push(Box::new(value));
        format!("${}", self.params.len())
    }

    /// The filters every source shares, on its columns, and the keyset bound on its id.
    fn filters(
        q: &ListQuery<'_>,
        id: &str,
        name: &str,
        priority: &str,
        args: &str,
        kwargs: &str,
        error: &str,
    ) -> Sql {
        let mut sql = Sql::new();
        if let Some(task) = q.task {
            let p = sql.param(task.to_owned());
            sql.conditions.push(format!("{name} = {p}"));
        }
        if let Some(value) = q.priority {
            let p = sql.param(value);
            sql.conditions.push(format!("{priority} = {p}"));
        }
        if let Some(search) = q.search {
            let p = sql.param(search.to_owned());
            sql.conditions.push(format!(
                "(strpos({args}::text, {p}) > 0 OR strpos({kwargs}::text, {p}) > 0 \
                 OR strpos({error}, {p}) > 0)"
            ));
        }
        if let Some(after) = q.after {
            let p = sql.param(after);
            let op = if q.newest_first { "<" } else { ">" };
            sql.conditions.push(format!("{id} {op} {p}"));
        }
        sql
    }

    fn where_clause(&self) -> String {
        if self.conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", self.conditions.join(" AND "))
        }
    }

    /// The parameters `text` uses: those up to the highest `$n` in it (a count leaves out the
    /// columns, where the last one, `now`, may be the only use).
    fn refs(&self, text: &str) -> Vec<&(dyn ToSql + Sync)> {
        let used = (1..=self.params.len())
            .rev()
            .find(|n| {
                let mark = format!("${n}");
                text.match_indices(&mark).any(|(at, _)| {
                    !text[at + mark.len()..].starts_with(|c: char| c.is_ascii_digit())
                })
            })
            .unwrap_or(0);
        self.params[..used]
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

/// One source: its columns, what follows them, its parameters, and its id column.
struct Source {
    columns: String,
    from: String,
    sql: Sql,
    id: &'static str,
}

/// A row's state, as `list` and `show` name it (`now` is parameter `now`).
fn queue_state(now: &str) -> String {
    format!(
        "CASE WHEN t.leased_by IS NOT NULL THEN 'leased' WHEN {NAME_PAUSED} THEN 'paused' \
         WHEN t.run_after > to_timestamp({now}) THEN 'later' ELSE 'due' END"
    )
}

fn queue_condition(state: &str, now: &str) -> String {
    match state {
        "leased" => "t.leased_by IS NOT NULL".to_owned(),
        "paused" => format!("t.leased_by IS NULL AND {NAME_PAUSED}"),
        "later" => format!(
            "t.leased_by IS NULL AND t.run_after > to_timestamp({now}) AND NOT {NAME_PAUSED}"
        ),
        _ => format!(
            "t.leased_by IS NULL AND t.run_after <= to_timestamp({now}) AND NOT {NAME_PAUSED}"
        ),
    }
}

fn task_columns(state: &str) -> String {
    format!(
        "t.id, t.task_name, {state}, t.args::text, t.kwargs::text, t.priority::int8, \
         extract(epoch FROM t.run_after)::float8, t.attempt::int8, \
         extract(epoch FROM t.created_at)::float8, t.origin, t.unique_key, NULL::float8, \
         NULL::float8, NULL::text"
    )
}

const RUN_COLUMNS: &str = "r.task_id, r.task_name, r.state, r.args::text, r.kwargs::text, \
     coalesce(r.priority, 0)::int8, NULL::float8, r.attempt::int8, \
     extract(epoch FROM r.enqueued_at)::float8, r.origin, r.unique_key, \
     extract(epoch FROM r.started_at)::float8, extract(epoch FROM r.finished_at)::float8, r.error";

const DEAD_COLUMNS: &str = "d.task_id, coalesce(d.task_name, '(null)'), 'dead', d.args::text, \
     d.kwargs::text, d.priority::int8, NULL::float8, d.attempts::int8, \
     extract(epoch FROM d.created_at)::float8, d.origin, d.unique_key, NULL::float8, \
     extract(epoch FROM d.died_at)::float8, d.reason";

fn sources(q: &ListQuery<'_>) -> Result<Vec<Source>> {
    let states = q.wanted_states()?;
    let wants = |state: &str| states.as_ref().is_none_or(|s| s.contains(&state));
    let mut sources = Vec::new();

    let queue: Vec<&str> = QUEUE_STATES.into_iter().filter(|s| wants(s)).collect();
    if !queue.is_empty() {
        let mut sql = Sql::filters(
            q,
            "t.id",
            "t.task_name",
            "t.priority",
            "t.args",
            "t.kwargs",
            "NULL::text",
        );
        let now = sql.param(q.now);
        if queue.len() < QUEUE_STATES.len() {
            let any: Vec<String> = queue.iter().map(|s| queue_condition(s, &now)).collect();
            sql.conditions.push(format!("({})", any.join(" OR ")));
        }
        sources.push(Source {
            columns: task_columns(&queue_state(&now)),
            from: format!("FROM foreman_task t {}", sql.where_clause()),
            sql,
            id: "t.id",
        });
    }

    let run_filters = |q: &ListQuery<'_>| {
        Sql::filters(
            q,
            "r.task_id",
            "r.task_name",
            "coalesce(r.priority, 0)",
            "r.args",
            "r.kwargs",
            "r.error",
        )
    };
    let explicit = states.as_ref().is_some_and(|s| s.contains(&"running"));
    if explicit || states.is_none() {
        let mut sql = run_filters(q);
        sql.conditions.push("r.state = 'running'".to_owned());
        if states.is_none() || wants("leased") {
            sql.conditions.push(
                "NOT EXISTS (SELECT 1 FROM foreman_task t WHERE t.id = r.task_id)".to_owned(),
            );
        }
        sources.push(Source {
            columns: RUN_COLUMNS.to_owned(),
            from: format!("FROM foreman_run r {}", sql.where_clause()),
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
        let mut sql = run_filters(q);
        let quoted: Vec<String> = history.iter().map(|s| format!("'{s}'")).collect();
        sql.conditions
            .push(format!("r.state IN ({})", quoted.join(", ")));
        sql.conditions.push(
            "NOT EXISTS (SELECT 1 FROM foreman_run n WHERE n.task_id = r.task_id AND n.attempt > r.attempt) \
             AND NOT EXISTS (SELECT 1 FROM foreman_task t WHERE t.id = r.task_id)"
                .to_owned(),
        );
        sources.push(Source {
            columns: RUN_COLUMNS.to_owned(),
            from: format!("FROM foreman_run r {}", sql.where_clause()),
            sql,
            id: "r.task_id",
        });
    }

    if states.as_ref().is_some_and(|s| s.contains(&"dead")) {
        let sql = Sql::filters(
            q,
            "d.task_id",
            "d.task_name",
            "d.priority",
            "d.args",
            "d.kwargs",
            "d.reason",
        );
        sources.push(Source {
            columns: DEAD_COLUMNS.to_owned(),
            from: format!("FROM foreman_dead d {}", sql.where_clause()),
            sql,
            id: "d.task_id",
        });
    }
    Ok(sources)
}

fn listed(r: &postgres::Row) -> ListedTask {
    ListedTask {
        id: r.get(0),
        task_name: r.get(1),
        state: r.get(2),
        args: r.get(3),
        kwargs: r.get(4),
        priority: r.get(5),
        run_after: opt_secs(r, 6),
        attempt: r.get(7),
        created_at: opt_secs(r, 8),
        origin: r.get(9),
        unique_key: r.get(10),
        started_at: opt_secs(r, 11),
        finished_at: opt_secs(r, 12),
        error: r.get(13),
    }
}

impl PgStore {
    /// The tasks `q` asks for, at most `q.limit`, in id order, after `q.after`; in one snapshot.
    pub fn list(&self, q: &ListQuery<'_>) -> Result<Vec<ListedTask>> {
        let order = if q.newest_first { "DESC" } else { "ASC" };
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        let sources = sources(q)?;
        let mut rows = self.snapshot(|| {
            let mut rows = Vec::new();
            for source in &sources {
                let text = format!(
                    "SELECT {} {} ORDER BY {} {order} LIMIT {limit}",
                    source.columns, source.from, source.id
                );
                let found = self.with(|c| c.query(text.as_str(), &source.sql.refs(&text)))?;
                rows.extend(found.iter().map(listed));
            }
            Ok(rows)
        })?;
        if q.newest_first {
            rows.sort_by_key(|row| std::cmp::Reverse(row.id));
        } else {
            rows.sort_by_key(|row| row.id);
        }
        rows.truncate(q.limit);
        Ok(rows)
    }

    /// How many tasks `q` matches (a count of each source).
    pub fn count(&self, q: &ListQuery<'_>) -> Result<i64> {
        let sources = sources(q)?;
        self.snapshot(|| {
            let mut total = 0;
            for source in &sources {
                let text = format!("SELECT count(*) {}", source.from);
                let rows = self.with(|c| c.query(text.as_str(), &source.sql.refs(&text)))?;
                total += rows.first().map_or(0, |r| r.get::<_, i64>(0));
            }
            Ok(total)
        })
    }

    /// `count` that stops at `cap` + 1 rows of each source: what a dashboard can ask on every
    /// refresh ("10,000+"), however big the tables.
    pub fn count_up_to(&self, q: &ListQuery<'_>, cap: usize) -> Result<CappedCount> {
        let mut wide = q.clone();
        wide.after = None;
        let limit = i64::try_from(cap).unwrap_or(i64::MAX - 1) + 1;
        let sources = sources(&wide)?;
        let (total, more) = self.snapshot(|| {
            let (mut total, mut more) = (0_i64, false);
            for source in &sources {
                let text = format!(
                    "SELECT count(*) FROM (SELECT 1 {} LIMIT {limit}) capped",
                    source.from
                );
                let rows = self.with(|c| c.query(text.as_str(), &source.sql.refs(&text)))?;
                let n = rows.first().map_or(0, |r| r.get::<_, i64>(0));
                more |= n >= limit;
                total += n;
            }
            Ok((total, more))
        })?;
        let cap = i64::try_from(cap).unwrap_or(i64::MAX);
        Ok(CappedCount {
            count: total.min(cap),
            more: more || total > cap,
        })
    }

    /// Everything known of task `id`, in one snapshot; `None` when no table knows it.
    pub fn task_story(&self, id: i64, now: f64) -> Result<Option<TaskStory>> {
        self.snapshot(|| {
            let columns = task_columns(&queue_state("$2"));
            let queued = self
                .with(|c| {
                    c.query(
                        format!("SELECT {columns} FROM foreman_task t WHERE t.id = $1").as_str(),
                        &[&id, &now],
                    )
                })?
                .first()
                .map(listed);
            let attempts = self
                .with(|c| {
                    c.query(
                        "SELECT r.attempt::int8, r.task_name, r.state, \
                         extract(epoch FROM r.enqueued_at)::float8, \
                         extract(epoch FROM r.started_at)::float8, \
                         extract(epoch FROM r.finished_at)::float8, r.error, \
                         extract(epoch FROM r.retry_at)::float8, r.exit_code::int8, r.result, \
                         r.args::text, r.kwargs::text, r.priority::int8, r.origin, r.unique_key, \
                         extract(epoch FROM a.requested_at)::float8, d.host || ':' || d.pid \
                         FROM foreman_run r \
                         LEFT JOIN foreman_abort a ON a.task_id = r.task_id AND a.attempt = r.attempt \
                         LEFT JOIN foreman_daemon d ON d.id = r.daemon_id \
                         WHERE r.task_id = $1 ORDER BY r.attempt",
                        &[&id],
                    )
                })?
                .iter()
                .map(|r| AttemptRecord {
                    attempt: r.get(0),
                    task_name: r.get(1),
                    state: r.get(2),
                    enqueued_at: opt_secs(r, 3),
                    started_at: opt_secs(r, 4),
                    finished_at: opt_secs(r, 5),
                    error: r.get(6),
                    retry_at: opt_secs(r, 7),
                    exit_code: r.get(8),
                    result: r.get(9),
                    args: r.get(10),
                    kwargs: r.get(11),
                    priority: r.get(12),
                    origin: r.get(13),
                    unique_key: r.get(14),
                    abort_requested_at: opt_secs(r, 15),
                    daemon: r.get(16),
                })
                .collect::<Vec<_>>();
            let dead = self
                .with(|c| {
                    c.query(
                        "SELECT id, task_id, task_name, args::text, kwargs::text, reason, \
                         extract(epoch FROM created_at)::float8, extract(epoch FROM died_at)::float8, \
                         attempts::int8, priority::int8, origin, unique_key FROM foreman_dead \
                         WHERE task_id = $1 ORDER BY id DESC LIMIT 1",
                        &[&id],
                    )
                })?
                .first()
                .map(super::dead_letter);
            if queued.is_none() && attempts.is_empty() && dead.is_none() {
                return Ok(None);
            }
            let name = queued
                .as_ref()
                .map(|q| q.task_name.clone())
                .or_else(|| attempts.last().map(|a| a.task_name.clone()))
                .or_else(|| dead.as_ref().and_then(|d| d.task_name.clone()));
            let paused_since = self
                .with(|c| {
                    c.query(
                        "SELECT extract(epoch FROM min(paused_at))::float8 FROM foreman_pause \
                         WHERE task_name IN ('', $1)",
                        &[&name],
                    )
                })?
                .first()
                .and_then(|r| opt_secs(r, 0));
            Ok(Some(TaskStory {
                task_id: id,
                queued,
                dead,
                attempts,
                paused_since,
            }))
        })
    }
}
