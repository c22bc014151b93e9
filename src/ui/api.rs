//! The JSON twin of every page (`GET /api/…`): the data each page shows, read in one short read
//! transaction through the CLI's own code where the CLI answers the same question (`status`,
//! `stats`, `health`, `dead list`, `wait`). Listings page by keyset and count up to a cap.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};

use super::Shared;
use super::http::{Reply, Request};
use crate::commands::dead::dead_json;
use crate::commands::format::{one_line, rounded};
use crate::commands::list::task_json;
use crate::commands::show::story_json;
use crate::commands::stats::Stats;
use crate::commands::status::Status;
use crate::config::Config;
use crate::duration::parse_duration;
use crate::error::{Error, Result};
use crate::outcome::headline;
use crate::store::{CappedCount, DeadFilter, LIST_STATES, ListQuery, Store};

/// Rows per page, unless `limit` asks for another number (at most `MAX_LIMIT`).
const PAGE_ROWS: usize = 50;
const MAX_LIMIT: usize = 1000;
/// Rows of a table one page request looks at, at most: a narrow filter over a big table says how
/// far down it searched instead of walking it all.
pub const SEARCH_WINDOW: usize = 100_000;
/// Counts stop here: "10,000+".
pub const COUNT_CAP: usize = 10_000;
/// Attempts and dead letters the error groups are read from, newest first.
const FAILURE_WINDOW: usize = 100_000;
/// Task names listed per error group.
const GROUP_NAMES: usize = 10;
/// A failure's text is cut to this many characters in listings (the detail page has it whole).
const LINE_CHARS: usize = 300;

/// What the Tasks page's `state` groups stand for; any other value is passed to `list` as it is
/// (a state, or a comma-separated list). Without `state`, `list`'s default: the live tasks.
const GROUPS: [(&str, &[&str]); 2] = [
    (
        "history",
        &["done", "failed", "timeout", "lost", "cancelled", "dead"],
    ),
    (
        "all",
        &[
            "queued",
            "leased",
            "running",
            "done",
            "failed",
            "timeout",
            "lost",
            "cancelled",
            "dead",
        ],
    ),
];

/// `GET /api/PAGE`.
pub fn get(shared: &Shared, store: &Store, request: &Request, page: &str) -> Result<Reply> {
    let config = &shared.config;
    let doc = match page {
        "overview" => overview(config, store)?.0,
        "stats" => stats(config, store, request)?,
        "tasks" => tasks(store, request)?,
        "tasks/ids" => task_ids(store, request)?,
        "dead" => dead(store, request)?,
        "dead/ids" => dead_ids(store, request)?,
        "errors" => errors(store, request)?,
        "schedules" => schedules(config, store)?,
        "daemons" => daemons(config, store)?,
        other => match other.strip_prefix("tasks/").map(str::parse::<i64>) {
            Some(Ok(id)) => match task(store, id)? {
                Some(doc) => doc,
                None => return Ok(Reply::error(404, &format!("no task {id}"))),
            },
            _ => return Ok(Reply::error(404, &format!("no endpoint /api/{other}"))),
        },
    };
    let mut doc = doc;
    if let Value::Object(map) = &mut doc {
        map.insert(
            "ui".to_owned(),
            json!({"read_only": shared.options.read_only, "who": request.who}),
        );
    }
    Ok(Reply::ok(&doc))
}

/// The overview: `status --json`'s document (health verdict, daemon, workers, pools, queue per
/// task name, dead letters, the last minute), with `health`'s one line.
pub fn overview(config: &Config, store: &Store) -> Result<(Value, Status)> {
    let status = Status::read(store, config)?;
    let mut doc = status.document();
    doc["health"]["line"] = status.verdict.line().into();
    Ok((doc, status))
}

/// The charts and the per-task figures over `window` (1h by default): `stats --json`'s document,
/// with each interval's done and failed counts and wall and wait percentiles.
fn stats(config: &Config, store: &Store, request: &Request) -> Result<Value> {
    let window = match request.param("window") {
        Some(text) => parse_duration(&text).map_err(|e| Error::Config(format!("window: {e}")))?,
        None => Duration::from_hours(1),
    };
    if window > Duration::from_hours(31 * 24) {
        return Err(Error::Config("window: at most 31d".to_owned()));
    }
    let task = request.param("name");
    let stats = store.snapshot(|q| Stats::read(q, config, window, task.as_deref()))?;
    let all = &stats.all;
    let interval_starts: Vec<i64> = (0..stats.intervals.count)
        .map(|i| {
            (stats.intervals.first + i64::try_from(i).unwrap_or(0) * stats.intervals.step) * 60
        })
        .collect();
    let done: Vec<u64> = all
        .counts
        .iter()
        .zip(&all.failures)
        .map(|(count, failed)| count.saturating_sub(*failed))
        .collect();
    let quantiles = |hists: &[crate::stats::Histogram], q: f64| -> Vec<Option<f64>> {
        hists.iter().map(|h| h.quantile(q)).collect()
    };
    let mut doc = stats.document();
    doc["chart"] = json!({
        "starts": interval_starts,
        "done": done,
        "failed": all.failures,
        "wall_p50_seconds": quantiles(&all.walls, 0.5),
        "wall_p95_seconds": quantiles(&all.walls, 0.95),
        "wait_p50_seconds": quantiles(&all.waits, 0.5),
        "wait_p95_seconds": quantiles(&all.waits, 0.95),
    });
    Ok(doc)
}

/// The query string's values a filter borrows from: `state`, `name`, `q` (text in the args,
/// kwargs or error), `before` (keyset: ids below it) and `limit`.
struct TaskParams {
    states: String,
    name: Option<String>,
    search: Option<String>,
    before: Option<i64>,
    limit: usize,
}

impl TaskParams {
    fn read(request: &Request) -> Result<TaskParams> {
        let number = |key: &str| -> Result<Option<i64>> {
            request
                .param(key)
                .map(|v| {
                    v.parse::<i64>()
                        .map_err(|_| Error::Config(format!("{key}: not a whole number: {v:?}")))
                })
                .transpose()
        };
        let limit = number("limit")?.map_or(PAGE_ROWS, |n| {
            usize::try_from(n).unwrap_or(1).clamp(1, MAX_LIMIT)
        });
        Ok(TaskParams {
            states: request.param("state").unwrap_or_default(),
            name: request.param("name"),
            search: request.param("q"),
            before: number("before")?,
            limit,
        })
    }

    /// `foreman list`'s query for these values, newest first, as of `now` (the database's clock).
    fn query(&self, now: f64) -> ListQuery<'_> {
        let mut states = Vec::new();
        for wanted in self.states.split(',').filter(|s| !s.is_empty()) {
            match GROUPS.iter().find(|(group, _)| *group == wanted) {
                Some((_, members)) => states.extend_from_slice(members),
                None => states.push(wanted),
            }
        }
        ListQuery {
            states,
            task: self.name.as_deref(),
            priority: None,
            search: self.search.as_deref(),
            newest_first: true,
            after: self.before,
            limit: self.limit,
            now,
        }
    }
}

/// The Tasks page: `foreman list`'s tasks (its `--json` elements, with the error's line), the next
/// page's cursor, and on the first page a count that stops at `COUNT_CAP`.
fn tasks(store: &Store, request: &Request) -> Result<Value> {
    let params = TaskParams::read(request)?;
    let query = params.query(store.now());
    let rows = store.list(&query)?;
    // Counted on the first page only: further pages keep the count the first one showed.
    let count = if query.after.is_none() {
        Some(store.count_up_to(&query, COUNT_CAP)?)
    } else {
        None
    };
    let next_before = (rows.len() >= params.limit)
        .then(|| rows.last().map(|t| t.id))
        .flatten();
    Ok(json!({
        "filter": {"state": params.states, "name": params.name, "q": params.search,
                   "before": params.before, "limit": params.limit},
        "states": LIST_STATES,
        "tasks": rows.iter().map(|t| {
            let mut doc = task_json(t);
            doc["error_line"] = t.error.as_deref().and_then(headline).map(|h| one_line(h, LINE_CHARS)).into();
            doc
        }).collect::<Vec<_>>(),
        "next_before": next_before,
        "count": count.map(count_json),
    }))
}

/// The ids of the queued tasks (due, later or paused: those `cancel` deletes before they start)
/// the filter matches, oldest first, at most `COUNT_CAP`: the frozen set a bulk cancel applies to.
fn task_ids(store: &Store, request: &Request) -> Result<Value> {
    let mut params = TaskParams::read(request)?;
    let now = store.now();
    let asked = params.query(now).states.join(",");
    let queued: Vec<&str> = ["due", "later", "paused"]
        .into_iter()
        .filter(|s| {
            asked.is_empty()
                || asked
                    .split(',')
                    .any(|a| a == *s || a == "queued" || a == "all")
        })
        .collect();
    if queued.is_empty() {
        return Ok(json!({"ids": [], "more": false}));
    }
    params.states = queued.join(",");
    params.before = None;
    params.limit = COUNT_CAP + 1;
    let mut query = params.query(now);
    query.newest_first = false;
    let mut ids: Vec<i64> = store.list(&query)?.iter().map(|t| t.id).collect();
    let more = ids.len() > COUNT_CAP;
    ids.truncate(COUNT_CAP);
    Ok(json!({"ids": ids, "more": more}))
}

fn count_json(count: CappedCount) -> Value {
    json!({"count": count.count, "more": count.more})
}

/// One task's page: `foreman show --json`'s document (its state, args and kwargs, origin, every
/// attempt with its daemon, exit code, error and result, its dead letter), with what the page
/// may do with it.
fn task(store: &Store, id: i64) -> Result<Option<Value>> {
    let Some(told) = store.task_story(id, store.now())? else {
        return Ok(None);
    };
    let mut doc = story_json(&told);
    let queued_state = told.queued.as_ref().map(|q| q.state.as_str());
    doc["cancellable"] = matches!(queued_state, Some("due" | "later" | "paused")).into();
    doc["abortable"] = told
        .attempts
        .last()
        .is_some_and(|a| a.state == "running" && a.abort_requested_at.is_none())
        .into();
    if let Some(dead) = &told.dead {
        let mut letter = dead_json(dead);
        letter["headline"] = headline(&dead.reason)
            .map(|h| one_line(h, LINE_CHARS))
            .into();
        doc["dead_letter"] = letter;
    }
    Ok(Some(doc))
}

/// The dead letters' filter and page from the query string: `name`, `q`, `before`, `limit`.
fn dead(store: &Store, request: &Request) -> Result<Value> {
    let params = TaskParams::read(request)?;
    let filter = DeadFilter {
        task: params.name.as_deref(),
        search: params.search.as_deref(),
    };
    let (page, count) = store.snapshot(|q| {
        let page = q.dead_page(filter, params.before, params.limit, SEARCH_WINDOW)?;
        let count = if params.before.is_none() {
            Some(q.count_dead(filter, COUNT_CAP, SEARCH_WINDOW)?)
        } else {
            None
        };
        Ok((page, count))
    })?;
    let rows: Vec<Value> = page
        .rows
        .iter()
        .map(|d| {
            let mut doc = dead_json(d);
            doc["headline"] = headline(&d.reason).map(|h| one_line(h, LINE_CHARS)).into();
            doc
        })
        .collect();
    Ok(json!({
        "filter": {"name": params.name, "q": params.search, "before": params.before,
                   "limit": params.limit},
        "dead": rows,
        "next_before": page.next_before,
        "searched_to": page.searched_to,
        "count": count.map(count_json),
    }))
}

/// The ids of every dead letter the filter matches, oldest first, at most `COUNT_CAP`: the
/// frozen set a bulk requeue or purge applies to.
fn dead_ids(store: &Store, request: &Request) -> Result<Value> {
    let params = TaskParams::read(request)?;
    let filter = DeadFilter {
        task: params.name.as_deref(),
        search: params.search.as_deref(),
    };
    let mut ids = store.snapshot(|q| q.dead_ids(filter, COUNT_CAP))?;
    let more = ids.len() > COUNT_CAP;
    ids.truncate(COUNT_CAP);
    Ok(json!({"ids": ids, "more": more}))
}

/// Failures grouped by the line that says what went wrong (`dead list`'s REASON column): count,
/// dead letters among them, first and last seen, task names. From the newest attempts and dead
/// letters, within `window` (7d by default).
fn errors(store: &Store, request: &Request) -> Result<Value> {
    let window = match request.param("window") {
        Some(text) => parse_duration(&text).map_err(|e| Error::Config(format!("window: {e}")))?,
        None => Duration::from_hours(7 * 24),
    };
    let now = store.now();
    let since = now - window.as_secs_f64();
    let texts = store.snapshot(|q| q.failure_texts(FAILURE_WINDOW))?;
    let read = texts.len();
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for failure in texts {
        if failure.at.is_some_and(|at| at < since) {
            continue;
        }
        let line = headline(&failure.text)
            .unwrap_or("(no error text)")
            .to_owned();
        let group = groups.entry(one_line(&line, LINE_CHARS)).or_default();
        group.count += 1;
        group.dead += u64::from(failure.dead);
        if let Some(at) = failure.at {
            group.first = Some(group.first.map_or(at, |f: f64| f.min(at)));
            group.last = Some(group.last.map_or(at, |l: f64| l.max(at)));
        }
        if let Some(name) = failure.task_name
            && group.names.len() < GROUP_NAMES
        {
            group.names.insert(name);
        }
        if group.example.is_empty() {
            group.example = failure.text;
        }
    }
    let mut list: Vec<(String, Group)> = groups.into_iter().collect();
    list.sort_by(|a, b| {
        b.1.last
            .unwrap_or(0.0)
            .total_cmp(&a.1.last.unwrap_or(0.0))
            .then(b.1.count.cmp(&a.1.count))
    });
    Ok(json!({
        "window_seconds": window.as_secs_f64(),
        "now": rounded(now),
        "read": read,
        "read_limit": FAILURE_WINDOW * 2,
        "groups": list.into_iter().map(|(line, g)| json!({
            "line": line,
            "count": g.count,
            "dead": g.dead,
            "first_seen": g.first,
            "last_seen": g.last,
            "task_names": g.names,
            "example": g.example,
        })).collect::<Vec<_>>(),
    }))
}

/// One group of failures on the Errors page.
#[derive(Default)]
struct Group {
    count: u64,
    dead: u64,
    first: Option<f64>,
    last: Option<f64>,
    names: BTreeSet<String>,
    example: String,
}

/// Every schedule: configured ones with their stored state, and stored ones no longer
/// configured; with the last task's state as `wait` reads it.
fn schedules(config: &Config, store: &Store) -> Result<Value> {
    let stored: BTreeMap<String, crate::store::ScheduleState> =
        store.schedules()?.into_iter().collect();
    // Each last task as `wait` reads it, in a read transaction of its own.
    let mut progress = BTreeMap::new();
    for state in stored.values() {
        if let Some(id) = state.last_task_id {
            progress.insert(id, store.task_progress(id)?);
        }
    }
    let names: BTreeSet<&String> = config.schedules.keys().chain(stored.keys()).collect();
    let rows: Vec<Value> = names
        .into_iter()
        .map(|name| {
            let configured = config.schedules.get(name);
            let state = stored.get(name);
            let last = state
                .and_then(|s| s.last_task_id)
                .and_then(|id| progress.get(&id).cloned().flatten());
            json!({
                "name": name,
                "configured": configured.is_some(),
                "task": configured.map(|c| c.task.clone()),
                "when": configured.map(|c| when_text(&c.when)),
                "spec": state.map(|s| s.spec.clone()),
                "next_due": state.map(|s| s.next_due),
                "last_fired": state.and_then(|s| s.last_fired),
                "last_task_id": state.and_then(|s| s.last_task_id),
                "last_task_state": last.map(|p| p.state),
                "interval_seconds": state.and_then(|s| s.interval),
            })
        })
        .collect();
    Ok(json!({"now": rounded(store.now()), "schedules": rows}))
}

fn when_text(when: &crate::config::When) -> String {
    use crate::config::When;
    use crate::duration::format_duration;
    match when {
        When::Every(every) => format!("every {}", format_duration(*every)),
        When::Cron(cron) => format!("cron {cron}"),
        When::Adaptive {
            start,
            min,
            max,
            factor,
        } => format!(
            "adaptive from {} within {}..{}, ×{factor}",
            format_duration(*start),
            format_duration(*min),
            format_duration(*max)
        ),
    }
}

/// The daemon (up or down, and why), its workers and what each busy one runs since when, and its
/// pools: `status`'s figures.
fn daemons(config: &Config, store: &Store) -> Result<Value> {
    let (doc, status) = overview(config, store)?;
    let row = status.obs.daemon.row.as_ref();
    Ok(json!({
        "now": doc["now"],
        "health": doc["health"],
        "daemon": doc["daemon"],
        "daemons": doc["daemons"],
        "shared": doc["shared"],
        "down_detail": (!status.obs.daemon.running)
            .then(|| crate::commands::health::down_detail(&status.obs)),
        "lock_note": status.obs.daemon.lock_note,
        "workers": doc["workers"],
        "running": doc["running"],
        "pools": doc["pools"],
        "last_pools": row.filter(|_| !status.obs.daemon.current).map(|r| r.pools.iter().map(|p| p.name.clone()).collect::<Vec<_>>()),
        "totals": row.map(|r| r.totals.iter().map(|(name, t)| (name.clone(), json!({"done": t.done, "failed": t.failed}))).collect::<serde_json::Map<_, _>>()),
    }))
}
