//! The `list` scenario: how long `foreman list`'s queries take over 1,000,000 queued rows (10,000
//! with `--quick`): a page newest first, a page deep in the queue, oldest first, a state held by
//! no row, and the filters that have no index of their own (a rare name, a name with no row, a
//! state one row in a hundred is in, a text search, the count). Each figure is the median of
//! several calls of the store's own `list`, as the command runs it, in this process.

use std::time::Instant;

use super::report::{ScenarioReport, at_most};
use super::{Bench, Failure, Outcome, Scenario};
use crate::store::{Access, ListQuery, Store};

/// Calls per query and repetition; the median is kept.
const CALLS: usize = 9;

/// The figures with a target: the pages the command shows without a filter, read by index.
const PAGE_TARGET_MS: f64 = 10.0;

pub(crate) fn list(bench: &mut Bench<'_>) -> Outcome<ScenarioReport> {
    let rows = bench.sizes.list_rows;
    let run = bench.work.run(&super::daemon::config(1, 0, ""))?;
    bench.progress.show(&format!(
        "queueing {} rows",
        super::report::number(rows as f64)
    ));
    run.conn()?.insert_list_fixture(rows)?;
    let store = Store::open_checked(&run.db, Access::ReadOnly)?;
    let middle = i64::try_from(rows / 2).unwrap_or(i64::MAX);
    let base = ListQuery {
        newest_first: true,
        limit: 50,
        now: crate::clock::unix_now(),
        ..ListQuery::default()
    };
    let queries = queries(&base, middle);
    let mut report = ScenarioReport::new(Scenario::List, bench.sizes.reps);
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); queries.len() + 1];
    for rep in 1..=bench.sizes.reps {
        bench.rep(Scenario::List, rep, "run");
        for (i, (_, _, query, _)) in queries.iter().enumerate() {
            bench.check_interrupt()?;
            samples[i].push(median_ms(|| store.list(query).map(drop))?);
        }
        samples[queries.len()].push(median_ms(|| store.count(&base).map(drop))?);
    }
    // A check of what was timed: the first page is the newest rows.
    let first = store.list(&base)?;
    let newest = i64::try_from(rows).unwrap_or(i64::MAX);
    if first.len() != 50 || first[0].id != newest {
        return Err(Failure::new(format!(
            "list returned {} rows starting at {:?}, not 50 from {newest}",
            first.len(),
            first.first().map(|t| t.id)
        )));
    }
    for ((key, label, _, indexed), values) in queries.iter().zip(&samples) {
        let target = indexed.then(|| at_most(PAGE_TARGET_MS));
        report.figure(key, *label, "ms", values, target);
    }
    report.figure(
        "count_ms",
        "--count of every row",
        "ms",
        &samples[queries.len()],
        None,
    );
    report
        .extra("rows", rows)
        .extra("calls_per_figure", CALLS)
        .note("rows: 1 in 1,000 of a rare name, 1 in 100 delayed, priorities 0 to 2, args [i]");
    Ok(report)
}

/// Each query timed: its JSON key, its label, the query, and whether it reads by index alone (and
/// has the target).
type Timed<'a> = (&'static str, &'static str, ListQuery<'a>, bool);

fn queries<'a>(base: &ListQuery<'a>, middle: i64) -> Vec<Timed<'a>> {
    vec![
        (
            "first_page_ms",
            "first page of 50, newest first",
            base.clone(),
            true,
        ),
        (
            "deep_page_ms",
            "page after the middle id (--after)",
            ListQuery {
                after: Some(middle),
                ..base.clone()
            },
            true,
        ),
        (
            "oldest_first_ms",
            "first page, oldest first",
            ListQuery {
                newest_first: false,
                ..base.clone()
            },
            true,
        ),
        (
            "leased_ms",
            "--state leased (no row)",
            ListQuery {
                states: vec!["leased"],
                ..base.clone()
            },
            true,
        ),
        (
            "rare_name_ms",
            "--task (1 row in 1,000)",
            ListQuery {
                task: Some("bench.rare"),
                ..base.clone()
            },
            false,
        ),
        (
            "later_ms",
            "--state later (1 row in 100)",
            ListQuery {
                states: vec!["later"],
                ..base.clone()
            },
            false,
        ),
        (
            "missing_name_ms",
            "--task with no row (walks every row)",
            ListQuery {
                task: Some("bench.none"),
                ..base.clone()
            },
            false,
        ),
        (
            "search_ms",
            "--search (walks every row)",
            ListQuery {
                search: Some("[777777]"),
                ..base.clone()
            },
            false,
        ),
    ]
}

/// The median of `CALLS` timings of `call`, in milliseconds.
fn median_ms(mut call: impl FnMut() -> crate::Result<()>) -> Outcome<f64> {
    let mut times = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let started = Instant::now();
        call()?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    super::Spread::of(&times)
        .map(|s| s.median)
        .ok_or_else(|| Failure::new("no timing"))
}
