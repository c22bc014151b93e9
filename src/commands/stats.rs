//! `foreman stats`: per task name over a window (1 h by default), the attempts that ended, their
//! failures, and p50/max wall and wait times from the merged per-minute histograms of
//! `foreman_stat`; with a trend per interval, drawn as a sparkline in the text form and given as
//! series in the JSON form.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use clap::Args;

use super::format::{Paint, Style, colour_wanted, columns, one_line, rounded, span};
use super::observe::open;
use super::{Globals, print};
use crate::config::Config;
use crate::duration::format_duration;
use crate::duration::parse_duration;
use crate::error::{Error, Result};
use crate::stats::{Histogram, MinuteStat, minute_of};
use crate::store::Store;

/// Per task name over a window: attempts, failures, p50/max wall and wait times, and a trend
#[derive(Args, Debug)]
pub struct StatsArgs {
    /// How far back to look, e.g. 1h, 24h, 7d
    #[arg(long, default_value = "1h", value_parser = parse_duration, value_name = "DURATION")]
    pub window: Duration,
    /// Only this task name
    #[arg(long, value_name = "NAME")]
    pub task: Option<String>,
    /// One JSON document instead of text
    #[arg(long)]
    pub json: bool,
}

pub fn run(globals: &Globals, args: &StatsArgs) -> Result<()> {
    let config = globals.load_config()?;
    let stats = Stats::read(&open(&config)?, &config, args.window, args.task.as_deref())?;
    print(&if args.json {
        stats.json()
    } else {
        stats.text(Style {
            colour: colour_wanted(),
        })
    })
}

/// The most intervals a window is cut into: a sparkline that fits a line.
const MAX_INTERVALS: i64 = 60;
/// Interval lengths in minutes, so that intervals start on round times: 1h → 60 × 1 min,
/// 24h → 48 × 30 min, 7d → 56 × 3 h. Longer windows use whole days.
const STEPS: [i64; 14] = [1, 2, 3, 5, 10, 15, 20, 30, 60, 120, 180, 360, 720, 1440];
const SPARKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
/// Task names the text form lists before it says `… N more`.
const MAX_TASK_LINES: usize = 15;
const NAME_WIDTH: usize = 40;

/// A window cut into intervals aligned to their length, the last one holding the current minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intervals {
    /// The first interval's first minute (Unix time / 60).
    pub first: i64,
    /// Minutes per interval.
    pub step: i64,
    pub count: usize,
}

impl Intervals {
    pub fn new(window: Duration, now: f64) -> Intervals {
        #[allow(clippy::cast_possible_truncation)] // A window in minutes fits an i64.
        let minutes = ((window.as_secs_f64() / 60.0).ceil() as i64).max(1);
        let wanted = (minutes + MAX_INTERVALS - 1) / MAX_INTERVALS;
        let step = STEPS
            .iter()
            .copied()
            .find(|s| *s >= wanted)
            .unwrap_or_else(|| (wanted + 1439) / 1440 * 1440);
        let count = (minutes + step - 1) / step;
        let current = minute_of(now);
        let last = current - current.rem_euclid(step);
        Intervals {
            first: last - (count - 1) * step,
            step,
            count: usize::try_from(count).unwrap_or(1),
        }
    }

    /// The last minute the window covers (the current one).
    pub fn last_minute(&self) -> i64 {
        self.first + i64::try_from(self.count).unwrap_or(0) * self.step - 1
    }

    /// The interval `minute` falls in, if the window covers it.
    pub fn index(&self, minute: i64) -> Option<usize> {
        usize::try_from((minute - self.first).div_euclid(self.step))
            .ok()
            .filter(|i| *i < self.count)
    }
}

/// One task name's figures over the window, and its attempts and failures per interval.
#[derive(Debug, Clone, Default)]
pub struct TaskStats {
    pub total: MinuteStat,
    pub counts: Vec<u64>,
    pub failures: Vec<u64>,
    /// Wall and wait times per interval (the dashboard's percentile charts).
    pub walls: Vec<Histogram>,
    pub waits: Vec<Histogram>,
}

impl TaskStats {
    fn new(intervals: usize) -> TaskStats {
        TaskStats {
            total: MinuteStat::default(),
            counts: vec![0; intervals],
            failures: vec![0; intervals],
            walls: vec![Histogram::default(); intervals],
            waits: vec![Histogram::default(); intervals],
        }
    }

    fn add(&mut self, interval: usize, stat: &MinuteStat) {
        self.total.merge(stat);
        self.counts[interval] = self.counts[interval].saturating_add(stat.count);
        self.failures[interval] = self.failures[interval].saturating_add(stat.failed);
        self.walls[interval].merge(&stat.wall_hist);
        self.waits[interval].merge(&stat.wait_hist);
    }
}

#[derive(Debug, Clone)]
pub struct Stats {
    pub window: Duration,
    pub task: Option<String>,
    pub now: f64,
    pub intervals: Intervals,
    pub by_task: BTreeMap<String, TaskStats>,
    pub all: TaskStats,
    /// How long the daemon keeps its figures: a longer window shows no more than that.
    pub retention: Duration,
}

impl Stats {
    pub fn read(
        store: &Store,
        config: &Config,
        window: Duration,
        task: Option<&str>,
    ) -> Result<Stats> {
        if window.is_zero() {
            return Err(Error::Config("--window must be longer than 0".to_owned()));
        }
        let now = store.now();
        let intervals = Intervals::new(window, now);
        let rows = store.minute_stats(intervals.first, intervals.last_minute(), task)?;
        let mut by_task: BTreeMap<String, TaskStats> = BTreeMap::new();
        let mut all = TaskStats::new(intervals.count);
        for (minute, name, stat) in rows {
            let Some(i) = intervals.index(minute) else {
                continue;
            };
            by_task
                .entry(name)
                .or_insert_with(|| TaskStats::new(intervals.count))
                .add(i, &stat);
            all.add(i, &stat);
        }
        Ok(Stats {
            window,
            task: task.map(str::to_owned),
            now,
            intervals,
            by_task,
            all,
            retention: config.stats_retention,
        })
    }

    /// The text form: a table of the figures, then one sparkline per task name.
    pub fn text(&self, style: Style) -> String {
        let mut out = String::new();
        let step = format_duration(Duration::from_secs(
            u64::try_from(self.intervals.step * 60).unwrap_or(60),
        ));
        let window = format_duration(self.window);
        let total = &self.all.total;
        let scope = self
            .task
            .as_deref()
            .map_or_else(String::new, |t| format!(" of {}", one_line(t, NAME_WIDTH)));
        let _ = writeln!(
            out,
            "{}",
            style.paint(
                Paint::Bold,
                &format!(
                    "last {window}{scope}: {} attempts ended, {} failed ({} intervals of {step}, oldest left)",
                    total.count, total.failed, self.intervals.count
                )
            )
        );
        if self.window > self.retention {
            let _ = writeln!(
                out,
                "(figures are kept for {}: stats_retention)",
                format_duration(self.retention)
            );
        }
        if self.by_task.is_empty() {
            return out;
        }
        let mut names: Vec<(&String, &TaskStats)> = self.by_task.iter().collect();
        names.sort_by(|a, b| b.1.total.count.cmp(&a.1.total.count).then(a.0.cmp(b.0)));
        let shown = &names[..names.len().min(MAX_TASK_LINES)];
        self.table_text(&mut out, style, shown);
        if names.len() > shown.len() {
            let _ = writeln!(
                out,
                "… {} more task names (--task NAME, or --json for all)",
                names.len() - shown.len()
            );
        }
        self.trend_text(&mut out, style, shown, &window, &step);
        out
    }

    /// The figures: one row per shown name, and one for them all.
    fn table_text(&self, out: &mut String, style: Style, shown: &[(&String, &TaskStats)]) {
        let figure = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), span);
        let row = |name: String, t: &MinuteStat| {
            vec![
                name,
                t.count.to_string(),
                t.failed.to_string(),
                figure(p50(&t.wall_hist, t.wall_max)),
                figure(Some(t.wall_max).filter(|_| t.count > 0)),
                figure(p50(&t.wait_hist, t.wait_max)),
                figure(Some(t.wait_max).filter(|_| t.count > 0)),
            ]
        };
        let mut rows: Vec<Vec<String>> = shown
            .iter()
            .map(|(name, stats)| row(one_line(name, NAME_WIDTH), &stats.total))
            .collect();
        if self.by_task.len() > 1 {
            rows.push(row("(all)".to_owned(), &self.all.total));
        }
        out.push('\n');
        out.push_str(&columns(
            "",
            &[
                "NAME", "TASKS", "FAILED", "WALL p50", "MAX", "WAIT p50", "MAX",
            ],
            &rows,
            &[false, true, true, true, true, true, true],
            style,
        ));
    }

    /// The trends: one sparkline per name, its failures under it when there were any.
    fn trend_text(
        &self,
        out: &mut String,
        style: Style,
        shown: &[(&String, &TaskStats)],
        window: &str,
        step: &str,
    ) {
        let width = shown
            .iter()
            .map(|(name, _)| one_line(name, NAME_WIDTH).chars().count())
            .max()
            .unwrap_or(0)
            .max(8);
        let axis_start = format!("-{window}");
        let axis = format!(
            "{axis_start:<w$}now",
            w = self
                .intervals
                .count
                .saturating_sub(3)
                .max(axis_start.len() + 1)
        );
        out.push('\n');
        let head = format!("{:<width$}  {axis}", format!("PER {step}"));
        let _ = writeln!(out, "{}", style.paint(Paint::Dim, &head));
        for (name, stats) in shown {
            let peak = stats.counts.iter().copied().max().unwrap_or(0);
            let _ = writeln!(
                out,
                "{:<width$}  {}  peak {peak}",
                one_line(name, NAME_WIDTH),
                sparkline(&stats.counts, '·')
            );
            let worst = stats.failures.iter().copied().max().unwrap_or(0);
            if worst > 0 {
                let line = format!(
                    "{:<width$}  {}  peak {worst}",
                    "  failed",
                    sparkline(&stats.failures, ' ')
                );
                let _ = writeln!(out, "{}", style.paint(Paint::Red, line.trim_end()));
            }
        }
    }

    /// The JSON form: one document, keys documented in docs/guide/operations.md.
    pub fn json(&self) -> String {
        format!("{}\n", self.document())
    }

    /// The JSON document (`stats --json`, and the dashboard's overview).
    pub fn document(&self) -> serde_json::Value {
        let starts: Vec<i64> = (0..self.intervals.count)
            .map(|i| {
                (self.intervals.first + i64::try_from(i).unwrap_or(0) * self.intervals.step) * 60
            })
            .collect();
        let by_task: serde_json::Map<String, serde_json::Value> = self
            .by_task
            .iter()
            .map(|(name, stats)| (name.clone(), figures_json(stats)))
            .collect();
        serde_json::json!({
            "window_seconds": self.window.as_secs_f64(),
            "task": self.task,
            "now": rounded(self.now),
            "interval_seconds": self.intervals.step * 60,
            "interval_starts": starts,
            "total": figures_json(&self.all),
            "by_task": by_task,
        })
    }
}

fn figures_json(stats: &TaskStats) -> serde_json::Value {
    let t = &stats.total;
    let seen = t.count > 0;
    #[allow(clippy::cast_precision_loss)] // Counts far below 2^52.
    let mean = |sum: f64| seen.then(|| round_span(sum / t.count as f64));
    serde_json::json!({
        "count": t.count,
        "done": t.done,
        "failed": t.failed,
        "wall_p50_seconds": p50(&t.wall_hist, t.wall_max).map(round_span),
        "wall_max_seconds": seen.then_some(t.wall_max),
        "wall_mean_seconds": mean(t.wall_total),
        "wait_p50_seconds": p50(&t.wait_hist, t.wait_max).map(round_span),
        "wait_max_seconds": seen.then_some(t.wait_max),
        "wait_mean_seconds": mean(t.wait_total),
        "count_series": stats.counts,
        "failed_series": stats.failures,
    })
}

/// The median from the histogram: the middle of its bucket, so never more than the largest value
/// seen (which is exact).
pub fn p50(hist: &Histogram, max: f64) -> Option<f64> {
    hist.quantile(0.5).map(|p| p.min(max))
}

/// Six significant digits: a p50 of 85 µs must not round to 0.
fn round_span(seconds: f64) -> f64 {
    if seconds <= 0.0 || !seconds.is_finite() {
        return 0.0;
    }
    let scale = 10f64.powi(5 - seconds.log10().floor() as i32);
    (seconds * scale).round() / scale
}

/// One character per value, `▁` to `█` scaled to the largest; `zero` for none at all, so an idle
/// interval is told apart from a quiet one.
pub fn sparkline(values: &[u64], zero: char) -> String {
    let peak = values.iter().copied().max().unwrap_or(0);
    values
        .iter()
        .map(|&v| {
            if v == 0 || peak == 0 {
                return zero;
            }
            // 1..=8 eighths of the peak, rounded up so that any activity shows.
            // In u128: a count read from the database may be anything up to u64::MAX.
            let level = (u128::from(v) * 8).div_ceil(u128::from(peak)).clamp(1, 8);
            SPARKS[usize::try_from(level - 1).unwrap_or(0)]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_cut_into_round_intervals() {
        let now = 1_700_000_000.0; // A minute boundary plus 20 s.
        let current = minute_of(now);
        let hour = Intervals::new(Duration::from_hours(1), now);
        assert_eq!((hour.step, hour.count), (1, 60));
        assert_eq!(hour.last_minute(), current);
        assert_eq!(hour.first, current - 59);
        let day = Intervals::new(Duration::from_hours(24), now);
        assert_eq!((day.step, day.count), (30, 48));
        assert_eq!(day.first.rem_euclid(30), 0, "aligned to half hours");
        assert!(day.last_minute() >= current && day.last_minute() < current + 30);
        let week = Intervals::new(Duration::from_hours(168), now);
        assert_eq!((week.step, week.count), (180, 56));
        let short = Intervals::new(Duration::from_secs(30), now);
        assert_eq!((short.step, short.count), (1, 1));
        let year = Intervals::new(Duration::from_hours(24 * 365), now);
        assert_eq!(year.step % 1440, 0);
        assert!(year.count <= 60);
        assert_eq!(hour.index(current), Some(59));
        assert_eq!(hour.index(current - 60), None);
        assert_eq!(hour.index(current + 1), None);
    }

    #[test]
    fn sparklines_scale_to_the_peak_and_show_any_activity() {
        assert_eq!(sparkline(&[0, 1, 4, 8, 100], '·'), "·▁▁▁█");
        assert_eq!(sparkline(&[0, 2, 4, 6, 8], ' '), " ▂▄▆█");
        assert_eq!(sparkline(&[0, 0], '·'), "··");
        assert_eq!(sparkline(&[], '·'), "");
        assert_eq!(sparkline(&[1, u64::MAX / 2, u64::MAX], '·'), "▁▄█");
    }

    #[test]
    fn spans_keep_their_significant_digits() {
        let close = |a: f64, b: f64| (a - b).abs() <= b.abs() * 1e-12;
        assert!(close(round_span(0.000_085_123_456), 0.000_085_123_5));
        assert!(close(round_span(1_234.567_89), 1_234.57));
        assert!(close(round_span(0.0), 0.0));
    }
}
