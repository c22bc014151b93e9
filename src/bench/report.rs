//! How the bench reports: a `ScenarioReport` of `Figure`s (median [min–max] of the repetitions,
//! with its target), printed as aligned table rows as each scenario ends (colour only on a
//! terminal without NO_COLOR) or as one JSON object per scenario per line; and the progress line
//! on stderr, drawn only on a terminal and only for steps that last more than a second.

use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::machine::Machine;
use super::{Scenario, Sizes, Spread};
use crate::commands::format::{self, Paint, Style};

/// Which way a figure is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Better {
    Higher,
    Lower,
}

/// The figure the project aims for on its 2-core VM.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target {
    pub value: f64,
    pub better: Better,
}

/// At least `value`.
pub(crate) fn at_least(value: f64) -> Target {
    Target {
        value,
        better: Better::Higher,
    }
}

/// At most `value`.
pub(crate) fn at_most(value: f64) -> Target {
    Target {
        value,
        better: Better::Lower,
    }
}

/// One measured figure over the repetitions.
#[derive(Debug, Clone)]
pub(crate) struct Figure {
    /// Stable snake_case name in the JSON.
    pub key: &'static str,
    /// What a person reads in the table.
    pub label: String,
    pub unit: &'static str,
    pub spread: Spread,
    pub target: Option<Target>,
}

impl Figure {
    /// Judged by the median.
    pub fn meets_target(&self) -> Option<bool> {
        self.target.map(|t| match t.better {
            Better::Higher => self.spread.median >= t.value,
            Better::Lower => self.spread.median <= t.value,
        })
    }

    fn json(&self) -> Map<String, Value> {
        let mut out = Map::new();
        out.insert("figure".into(), self.key.into());
        out.insert("label".into(), self.label.clone().into());
        out.insert("unit".into(), self.unit.into());
        out.insert("median".into(), self.spread.median.into());
        out.insert("min".into(), self.spread.min.into());
        out.insert("max".into(), self.spread.max.into());
        out.insert("target".into(), self.target.map(|t| t.value).into());
        out.insert(
            "better".into(),
            self.target
                .map(|t| match t.better {
                    Better::Higher => "higher",
                    Better::Lower => "lower",
                })
                .into(),
        );
        out.insert("meets_target".into(), self.meets_target().into());
        out
    }
}

/// What one scenario found, or why it failed.
#[derive(Debug)]
pub(crate) struct ScenarioReport {
    pub scenario: Scenario,
    pub reps: usize,
    /// The first is the scenario's headline figure.
    pub figures: Vec<Figure>,
    /// Scenario-specific JSON keys (sizes, how tasks were counted).
    pub extras: Map<String, Value>,
    /// Said under the table and in the JSON.
    pub notes: Vec<String>,
    /// Set when a check failed: the scenario's figures are not to be trusted.
    pub error: Option<String>,
    /// Set when the scenario could not run here (no python3): not a failure.
    pub skipped: Option<String>,
}

impl ScenarioReport {
    pub fn new(scenario: Scenario, reps: usize) -> ScenarioReport {
        ScenarioReport {
            scenario,
            reps,
            figures: Vec::new(),
            extras: Map::new(),
            notes: Vec::new(),
            error: None,
            skipped: None,
        }
    }

    pub fn failed(scenario: Scenario, reps: usize, error: String) -> ScenarioReport {
        ScenarioReport {
            error: Some(error),
            ..ScenarioReport::new(scenario, reps)
        }
    }

    pub fn skipped(scenario: Scenario, reps: usize, why: String) -> ScenarioReport {
        ScenarioReport {
            skipped: Some(why),
            ..ScenarioReport::new(scenario, reps)
        }
    }

    /// Adds a figure from one value per repetition (none: nothing is added).
    pub fn figure(
        &mut self,
        key: &'static str,
        label: impl Into<String>,
        unit: &'static str,
        values: &[f64],
        target: impl Into<Option<Target>>,
    ) -> &mut ScenarioReport {
        if let Some(spread) = Spread::of(values) {
            self.figures.push(Figure {
                key,
                label: label.into(),
                unit,
                spread,
                target: target.into(),
            });
        }
        self
    }

    pub fn extra(&mut self, key: &str, value: impl Into<Value>) -> &mut ScenarioReport {
        self.extras.insert(key.to_owned(), value.into());
        self
    }

    pub fn note(&mut self, text: impl Into<String>) -> &mut ScenarioReport {
        self.notes.push(text.into());
        self
    }

    /// One JSON object: the headline figure's keys at the top, every figure under `figures`.
    pub fn json(&self) -> Value {
        let mut out = Map::new();
        out.insert("scenario".into(), self.scenario.name().into());
        out.insert("ok".into(), self.error.is_none().into());
        out.insert("reps".into(), self.reps.into());
        let headline = self.figures.first().map_or_else(
            || {
                let mut empty = Map::new();
                for key in [
                    "figure",
                    "label",
                    "unit",
                    "median",
                    "min",
                    "max",
                    "target",
                    "better",
                    "meets_target",
                ] {
                    empty.insert(key.into(), Value::Null);
                }
                empty
            },
            Figure::json,
        );
        out.extend(headline);
        out.insert(
            "figures".into(),
            self.figures
                .iter()
                .map(|f| Value::Object(f.json()))
                .collect(),
        );
        out.insert("error".into(), self.error.clone().into());
        out.insert("skipped".into(), self.skipped.clone().into());
        out.insert("notes".into(), self.notes.clone().into());
        for (key, value) in &self.extras {
            out.entry(key.clone()).or_insert_with(|| value.clone());
        }
        Value::Object(out)
    }
}

/// Where the reports go: table rows or JSON lines on stdout, as each scenario ends.
pub(crate) struct Output {
    json: bool,
    style: Style,
    reps: usize,
}

/// Column widths: scenario, figure, median, unit, [min–max], target.
const COLUMNS: [usize; 6] = [14, 38, 9, 8, 21, 10];
/// Which columns hold numbers, aligned right.
const NUMERIC: [bool; 6] = [false, false, true, false, true, true];

impl Output {
    pub fn new(json: bool, sizes: &Sizes) -> Output {
        Output {
            json,
            style: Style {
                colour: format::colour_wanted(),
            },
            reps: sizes.reps,
        }
    }

    fn print(text: &str) {
        let mut out = std::io::stdout().lock();
        // A closed stdout (a pipe into `head`) must not stop the bench half way: it still has
        // children and files to clean up, and its exit code to give.
        let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    }

    /// The table's context line, what the machine allows, and the column heads; in JSON, the
    /// machine's line.
    pub fn header(&self, machine: &Machine) {
        if self.json {
            Output::print(&format!("{}\n", machine.json()));
            return;
        }
        let build = if cfg!(debug_assertions) {
            "debug build (figures are not representative)"
        } else {
            "release build"
        };
        let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
        let load = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_owned))
            .unwrap_or_else(|| "?".to_owned());
        let reps = self.reps;
        let mut text = format!(
            "foreman bench {}: {build}, {cpus} CPUs, load average {load} at start; median of {reps} \
             run{} [min–max]\n",
            env!("CARGO_PKG_VERSION"),
            if reps == 1 { "" } else { "s" }
        );
        let (t50, t99) = machine.thread_wake_us;
        let (i50, i99) = machine.inotify_wake_us;
        let _ = write!(
            text,
            "machine: thread wake-up p50 {t50:.0} µs, p99 {t99:.0} µs; inotify wake-up p50 \
             {i50:.0} µs, p99 {i99:.0} µs;\n         SQLite pop limit {} rows/s at 4 rows per pop, \
             {} at 256",
            number(machine.pop_limit_4),
            number(machine.pop_limit_256)
        );
        if let Some((four, many)) = machine.pg_pop_limit {
            let _ = write!(
                text,
                ";\n         PostgreSQL claim limit {} rows/s at 4 rows per claim, {} at 256",
                number(four),
                number(many)
            );
        }
        text.push_str("\n\n");
        let heads = ["scenario", "figure", "median", "", "[min–max]", "target"];
        let line = row(&heads.map(str::to_owned), "");
        text.push_str(&self.style.paint(Paint::Bold, line.trim_end()));
        text.push('\n');
        Output::print(&text);
    }

    pub fn scenario(&self, report: &ScenarioReport) {
        if self.json {
            Output::print(&format!("{}\n", report.json()));
            return;
        }
        let name = report.scenario.name().to_owned();
        let mut text = String::new();
        if let Some(error) = &report.error {
            let mark = self.style.paint(Paint::Red, "✗ FAILED");
            let _ = writeln!(text, "{name:<w$} {mark}: {error}", w = COLUMNS[0]);
        } else if let Some(why) = &report.skipped {
            let mark = self.style.paint(Paint::Yellow, "skipped");
            let _ = writeln!(text, "{name:<w$} {mark}: {why}", w = COLUMNS[0]);
        }
        for (i, figure) in report.figures.iter().enumerate() {
            let first = if i == 0 { name.clone() } else { String::new() };
            text.push_str(&self.figure_row(first, figure));
        }
        Output::print(&text);
    }

    fn figure_row(&self, scenario: String, figure: &Figure) -> String {
        let Spread { median, min, max } = figure.spread;
        let unit = figure.unit;
        let cells = [
            scenario,
            figure.label.clone(),
            number(median),
            unit.to_owned(),
            format!("[{}–{}]", number(min), number(max)),
            figure.target.map_or_else(String::new, |t| {
                let sign = if t.better == Better::Higher {
                    "≥"
                } else {
                    "≤"
                };
                // Targets are round: 0.5 reads better than number()'s 0.500.
                let value = if t.value >= 1000.0 {
                    number(t.value)
                } else {
                    t.value.to_string()
                };
                format!("{sign} {value}")
            }),
        ];
        let mark = match figure.meets_target() {
            Some(true) => self.style.paint(Paint::Green, "✓"),
            Some(false) => self.style.paint(Paint::Red, "✗"),
            None => String::new(),
        };
        format!("{}\n", row(&cells, &mark).trim_end())
    }

    /// The notes, then one line on what failed and which targets were missed.
    pub fn footer(&self, reports: &[ScenarioReport]) {
        if self.json {
            return;
        }
        let mut text = String::from("\n");
        for report in reports {
            for note in &report.notes {
                let _ = writeln!(text, "{}: {note}", report.scenario.name());
            }
        }
        let failed: Vec<&str> = reports
            .iter()
            .filter(|r| r.error.is_some())
            .map(|r| r.scenario.name())
            .collect();
        let missed: Vec<String> = reports
            .iter()
            .flat_map(|r| {
                r.figures
                    .iter()
                    .filter(|f| f.meets_target() == Some(false))
                    .map(move |f| format!("{} {}", r.scenario.name(), f.key))
            })
            .collect();
        if failed.is_empty() {
            text.push_str("every scenario ran correctly: each task started exactly once\n");
        } else {
            let line = format!("FAILED (a task lost, repeated, or a run that broke): {}", {
                failed.join(", ")
            });
            text.push_str(&self.style.paint(Paint::Red, &line));
            text.push('\n');
        }
        if !missed.is_empty() {
            let _ = writeln!(text, "targets missed: {}", missed.join(", "));
        }
        Output::print(&text);
    }
}

/// The cells padded to the columns (by characters, since µ and – are one wide), then `mark`.
fn row(cells: &[String; 6], mark: &str) -> String {
    let mut line = String::new();
    for (i, (cell, width)) in cells.iter().zip(COLUMNS).enumerate() {
        let pad = width.saturating_sub(cell.chars().count());
        if NUMERIC[i] {
            line.push_str(&" ".repeat(pad));
            line.push_str(cell);
        } else {
            line.push_str(cell);
            line.push_str(&" ".repeat(pad));
        }
        line.push(' ');
    }
    line.push_str(mark);
    line
}

/// A figure for people: thousands separated from 1,000 on, three significant digits below.
pub(crate) fn number(value: f64) -> String {
    let magnitude = value.abs();
    if !value.is_finite() {
        return value.to_string();
    }
    if magnitude >= 1000.0 {
        #[allow(clippy::cast_possible_truncation)] // Rounded, and far below i64's range.
        let whole = value.round() as i64;
        let digits = whole.unsigned_abs().to_string();
        let mut grouped = String::new();
        for (i, digit) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                grouped.push(',');
            }
            grouped.push(digit);
        }
        let sign = if whole < 0 { "-" } else { "" };
        return format!("{sign}{grouped}");
    }
    let decimals = match magnitude {
        m if m >= 100.0 || m == 0.0 => 0,
        m if m >= 10.0 => 1,
        m if m >= 1.0 => 2,
        m if m >= 0.1 => 3,
        m if m >= 0.01 => 4,
        m if m >= 0.001 => 5,
        _ => 6,
    };
    format!("{value:.decimals$}")
}

/// The progress line on stderr: only on a terminal, and only once a scenario has run for more than
/// a second (a shorter one would only flicker).
pub(crate) struct Progress {
    tty: bool,
    context: String,
    since: Instant,
    drawn: Option<Instant>,
}

impl Progress {
    pub fn on_stderr() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            context: String::new(),
            since: Instant::now(),
            drawn: None,
        }
    }

    /// A new scenario: what the line starts with, and the second counts from now.
    pub fn begin(&mut self, context: String) {
        self.clear();
        self.context = context;
        self.since = Instant::now();
    }

    /// Says where the scenario is (a repetition, a step).
    pub fn context(&mut self, context: String) {
        self.context = context;
    }

    /// Draws `context: text`, at most ten times a second.
    pub fn show(&mut self, text: &str) {
        if !self.tty || self.since.elapsed() < Duration::from_secs(1) {
            return;
        }
        if self
            .drawn
            .is_some_and(|at| at.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K{}: {text}", self.context);
        let _ = err.flush();
        self.drawn = Some(Instant::now());
    }

    /// Removes the line, if one was drawn.
    pub fn clear(&mut self) {
        if self.drawn.take().is_some() {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // The values compared are exact.
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(number(161_234.4), "161,234");
        assert_eq!(number(1_000.0), "1,000");
        assert_eq!(number(876.2), "876");
        assert_eq!(number(42.25), "42.2");
        assert_eq!(number(4.2), "4.20");
        assert_eq!(number(0.512), "0.512");
        assert_eq!(number(0.0036), "0.00360");
        assert_eq!(number(0.0), "0");
    }

    #[test]
    fn json_has_the_headline_at_the_top_and_every_figure_below() {
        let mut report = ScenarioReport::new(Scenario::Latency, 3);
        report
            .figure("p50", "p50", "ms", &[0.4, 0.5, 0.6], at_most(0.5))
            .figure("p99", "p99", "ms", &[3.0, 1.0, 2.0], at_most(2.0))
            .extra("tasks", 200);
        let json = report.json();
        assert_eq!(json["scenario"], "latency");
        assert_eq!(json["ok"], true);
        assert_eq!(json["figure"], "p50");
        assert_eq!(json["median"], 0.5);
        assert_eq!(json["meets_target"], true);
        assert_eq!(json["figures"][1]["max"], 3.0);
        assert_eq!(json["figures"][1]["meets_target"], true);
        assert_eq!(json["tasks"], 200);
        let failed = ScenarioReport::failed(Scenario::Idle, 1, "boom".into()).json();
        assert_eq!(failed["ok"], false);
        assert_eq!(failed["error"], "boom");
        assert_eq!(failed["median"], Value::Null);
    }
}
