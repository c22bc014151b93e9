//! `foreman status`: the daemon (up or down, uptime, heartbeat), its workers and pools, the running
//! tasks, the queue per task name, dead letters and the last minute's throughput, with `health`'s
//! verdict; as one screen of aligned text or one JSON document. Unlike `health` it scans the queue
//! (one GROUP BY per task name). `metrics` reads the same `Status`.

use std::fmt::Write as _;

use clap::Args;

use super::format::{Paint, Style, age, colour_wanted, columns, one_line, rounded};
use super::health::{self, Verdict};
use super::observe::{Observation, Thresholds, daemon_state, is_paused, open};
use super::{Globals, print};
use crate::config::Config;
use crate::stats::{MinuteStat, minute_of};
use crate::store::{Store, TaskDepth};

/// Running tasks and task names the text form lists before it says `… N more`: one screen.
const MAX_RUNNING_LINES: usize = 10;
const MAX_DAEMON_LINES: usize = 10;
const MAX_TASK_LINES: usize = 15;
/// Task names are cut to this width in the text form.
const NAME_WIDTH: usize = 40;

/// Show the daemon (up or down, uptime, heartbeat), workers, running tasks, the queue per task
/// name, dead letters and the last minute's throughput
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// One JSON document instead of text
    #[arg(long)]
    pub json: bool,
}

pub fn run(globals: &Globals, args: &StatusArgs) -> crate::Result<()> {
    let config = globals.load_config()?;
    let status = Status::read(&open(&config)?, &config)?;
    print(&if args.json {
        status.json()
    } else {
        status.text(Style {
            colour: colour_wanted(),
        })
    })
}

/// Everything `status` and `metrics` report, read in one snapshot.
#[derive(Debug, Clone)]
pub struct Status {
    pub db: String,
    pub obs: Observation,
    /// The heartbeat age past which a daemon counts as stale.
    pub max_age: f64,
    pub verdict: Verdict,
    pub depth: Vec<TaskDepth>,
    pub dead: i64,
    /// The last complete minute (Unix time / 60).
    pub last_minute: i64,
    /// Each task name's figures in that minute, by name.
    pub last_minute_stats: Vec<(String, MinuteStat)>,
}

impl Status {
    pub fn read(store: &Store, config: &Config) -> crate::Result<Status> {
        let thresholds = Thresholds::defaults(config);
        let (obs, (waiting, mut depth, dead, last_minute, stats)) =
            Observation::read_with(store, config, thresholds.max_age, |q, now, row, paused| {
                let minute = minute_of(now) - 1;
                Ok((
                    health::waiting(q, now, row, paused, thresholds)?,
                    q.queue_depth(now)?,
                    q.dead_count()?,
                    minute,
                    q.minute_stats(minute, minute, None)?,
                ))
            })?;
        let verdict = health::judge(&obs, waiting.as_ref(), thresholds);
        // A paused name's waiting rows are neither due nor later: they wait for a resume.
        for task in &mut depth {
            if is_paused(&obs.paused, &task.task_name) {
                task.paused = task.due + task.delayed;
                (task.due, task.delayed, task.oldest_due_at, task.next_due_at) = (0, 0, None, None);
            }
        }
        Ok(Status {
            db: config.db.to_string(),
            obs,
            max_age: thresholds.max_age.as_secs_f64(),
            verdict,
            depth,
            dead,
            last_minute,
            last_minute_stats: stats
                .into_iter()
                .map(|(_, name, stat)| (name, stat))
                .collect(),
        })
    }

    /// Queued, due, later, leased and paused rows, over every task name.
    fn queue_totals(&self) -> (i64, i64, i64, i64, i64) {
        self.depth
            .iter()
            .fold((0, 0, 0, 0, 0), |(q, d, l, s, p), t| {
                (
                    q + t.queued,
                    d + t.due,
                    l + t.delayed,
                    s + t.leased,
                    p + t.paused,
                )
            })
    }

    fn next_due_at(&self) -> Option<f64> {
        self.depth
            .iter()
            .filter_map(|t| t.next_due_at)
            .min_by(f64::total_cmp)
    }

    fn last_minute_total(&self) -> MinuteStat {
        let mut total = MinuteStat::default();
        for (_, stat) in &self.last_minute_stats {
            total.merge(stat);
        }
        total
    }

    /// The text form: one screen, aligned, coloured when `style` says so.
    pub fn text(&self, style: Style) -> String {
        let mut out = String::new();
        self.daemon_text(&mut out, style);
        if self.obs.shared {
            self.daemons_text(&mut out, style);
        }
        self.running_text(&mut out, style);
        self.paused_text(&mut out, style);
        self.queue_text(&mut out, style);
        self.tail_text(&mut out, style);
        out
    }

    /// Every daemon of a shared database (PostgreSQL): the ones that run, and those that ended in
    /// the last hour.
    fn daemons_text(&self, out: &mut String, style: Style) {
        let now = self.obs.now;
        let live = self.obs.live(self.max_age).count();
        let ended =
            self.obs.daemons.len() - self.obs.daemons.iter().filter(|d| d.is_open()).count();
        let workers: i64 = self.obs.live(self.max_age).map(|d| d.workers).sum();
        let busy: i64 = self
            .obs
            .live(self.max_age)
            .map(|d| self.obs.busy(d.id))
            .sum();
        let mut summary = format!("{live} up, {busy} of {workers} workers busy");
        if ended > 0 {
            let _ = write!(summary, " · {ended} ended in the last hour");
        }
        let _ = writeln!(out, "{}{summary}", label(style, "daemons"));
        if self.obs.daemons.is_empty() {
            return;
        }
        let rows: Vec<Vec<String>> = self
            .obs
            .daemons
            .iter()
            .take(MAX_DAEMON_LINES)
            .map(|d| {
                let state = daemon_state(d, now, self.max_age);
                let state = match state {
                    "up" => style.paint(Paint::Green, state),
                    "stopping" | "stopped" => state.to_owned(),
                    _ => style.paint(Paint::Red, state),
                };
                vec![
                    d.id.to_string(),
                    one_line(&d.host, 30),
                    d.pid.to_string(),
                    state,
                    format!("{}/{}", self.obs.busy(d.id), d.workers),
                    age((now - d.heartbeat_at).max(0.0)),
                    one_line(&d.served.join(", "), 40),
                ]
            })
            .collect();
        out.push_str(&columns(
            "  ",
            &["ID", "HOST", "PID", "STATE", "BUSY", "HEARTBEAT", "SERVES"],
            &rows,
            &[true, false, true, false, true, true, false],
            style,
        ));
        more(out, self.obs.daemons.len(), MAX_DAEMON_LINES, "daemons");
    }

    /// The daemon, the verdict, the workers and the pools.
    fn daemon_text(&self, out: &mut String, style: Style) {
        let now = self.obs.now;
        let daemon = &self.obs.daemon;
        let label = |name: &str| label(style, name);
        let state = if daemon.running {
            style.paint(Paint::Green, "up")
        } else {
            style.paint(Paint::Red, "down")
        };
        let mut facts = Vec::new();
        if daemon.running {
            if let Some(pid) = daemon.pid {
                facts.push(match daemon.current_row() {
                    Some(row) if !row.host.is_empty() => format!("pid {pid} on {}", row.host),
                    _ => format!("pid {pid}"),
                });
            }
            if let Some(row) = daemon.current_row() {
                facts.push(format!("foreman {}", row.version));
            }
            if let Some(uptime) = daemon.uptime(now) {
                facts.push(format!("uptime {}", age(uptime)));
            }
            facts.push(daemon.heartbeat_age(now).map_or_else(
                || "no heartbeat yet".to_owned(),
                |beat| format!("heartbeat {} ago", age(beat)),
            ));
            if let Some(note) = &daemon.lock_note {
                facts.push(format!("judged by its heartbeat ({note})"));
            }
        } else {
            facts.push(health::down_detail(&self.obs));
        }
        let _ = writeln!(out, "{}{state} · {}", label("daemon"), facts.join(" · "));

        let verdict_paint = match self.verdict.reason {
            health::Reason::Ok => Paint::Green,
            reason if reason.is_healthy() => Paint::Yellow,
            _ => Paint::Red,
        };
        // The daemon's facts are on the line above: `healthy` alone says all when all is well.
        let verdict = if self.verdict.reason == health::Reason::Ok {
            "healthy".to_owned()
        } else {
            self.verdict.line()
        };
        let _ = writeln!(
            out,
            "{}{}",
            label("health"),
            style.paint(verdict_paint, &verdict)
        );

        if let Some((total, busy)) = daemon.workers(&self.obs.running) {
            let _ = writeln!(out, "{}{busy} of {total} busy", label("workers"));
        }
        for pool in daemon.current_row().map_or(&[][..], |row| &row.pools) {
            let figure = |n: Option<u64>| n.map_or_else(|| "?".to_owned(), |n| n.to_string());
            let full = if pool.is_saturated() {
                style.paint(Paint::Yellow, " (saturated)")
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{}{} processes, {} up, {} busy{full} · serves {}",
                label(&format!("pool {}", one_line(&pool.name, 4))),
                figure(pool.processes),
                figure(pool.up),
                figure(pool.busy),
                one_line(&pool.tasks.join(", "), 60),
            );
        }
    }

    /// The running set, oldest first.
    fn running_text(&self, out: &mut String, style: Style) {
        let now = self.obs.now;
        let daemon = &self.obs.daemon;
        let label = |name: &str| label(style, name);
        let running = &self.obs.running;
        let plural = if running.len() == 1 { "" } else { "s" };
        let running_head = if daemon.running || running.is_empty() {
            format!("{} task{plural}", running.len())
        } else {
            format!(
                "{} task{plural} were running when the daemon stopped (its next start records them lost)",
                running.len()
            )
        };
        let _ = writeln!(out, "{}{running_head}", label("running"));
        if !running.is_empty() {
            let rows: Vec<Vec<String>> = running
                .iter()
                .take(MAX_RUNNING_LINES)
                .map(|r| {
                    vec![
                        r.task_id.to_string(),
                        r.attempt.to_string(),
                        one_line(&r.task_name, NAME_WIDTH),
                        r.started_at
                            .map_or_else(|| "?".to_owned(), |s| age(now - s)),
                    ]
                })
                .collect();
            out.push_str(&columns(
                "  ",
                &["TASK", "ATTEMPT", "NAME", "AGE"],
                &rows,
                &[true, true, false, true],
                style,
            ));
            more(out, running.len(), MAX_RUNNING_LINES, "running tasks");
        }
    }

    /// What is paused, and since when; nothing when nothing is.
    fn paused_text(&self, out: &mut String, style: Style) {
        if self.obs.paused.is_empty() {
            return;
        }
        let now = self.obs.now;
        let names: Vec<String> = self
            .obs
            .paused
            .iter()
            .map(|p| {
                let what = p.task_name.as_deref().map_or_else(
                    || "every task (pause --all)".to_owned(),
                    |name| one_line(name, NAME_WIDTH),
                );
                format!("{what} for {}", age(now - p.since))
            })
            .collect();
        let _ = writeln!(
            out,
            "{}{}",
            label(style, "paused"),
            style.paint(Paint::Yellow, &names.join(", "))
        );
    }

    /// The queue in total and per task name, most due first.
    fn queue_text(&self, out: &mut String, style: Style) {
        let now = self.obs.now;
        let label = |name: &str| label(style, name);
        let (queued, due, delayed, leased, paused) = self.queue_totals();
        let mut queue_line =
            format!("{queued} queued: {due} due, {delayed} later, {leased} leased");
        if paused > 0 {
            let _ = write!(queue_line, ", {paused} paused");
        }
        if let Some(oldest) = &self.obs.oldest_due {
            let _ = write!(
                queue_line,
                " · oldest due waited {}",
                age(now - oldest.due_since)
            );
        }
        if let Some(next) = self.next_due_at() {
            let _ = write!(queue_line, " · next later task in {}", age(next - now));
        }
        let _ = writeln!(out, "{}{queue_line}", label("queue"));
        if !self.depth.is_empty() {
            let mut by_task: Vec<&TaskDepth> = self.depth.iter().collect();
            by_task.sort_by(|a, b| {
                b.due
                    .cmp(&a.due)
                    .then(b.queued.cmp(&a.queued))
                    .then(a.task_name.cmp(&b.task_name))
            });
            let rows: Vec<Vec<String>> = by_task
                .iter()
                .take(MAX_TASK_LINES)
                .map(|t| {
                    vec![
                        one_line(&t.task_name, NAME_WIDTH),
                        t.queued.to_string(),
                        t.due.to_string(),
                        t.delayed.to_string(),
                        t.leased.to_string(),
                        t.paused.to_string(),
                        t.oldest_due_at.map_or_else(String::new, |at| age(now - at)),
                    ]
                })
                .collect();
            out.push_str(&columns(
                "  ",
                &[
                    "NAME",
                    "QUEUED",
                    "DUE",
                    "LATER",
                    "LEASED",
                    "PAUSED",
                    "OLDEST DUE",
                ],
                &rows,
                &[false, true, true, true, true, true, true],
                style,
            ));
            more(out, by_task.len(), MAX_TASK_LINES, "task names");
        }
    }

    /// Dead letters and the last minute.
    fn tail_text(&self, out: &mut String, style: Style) {
        let label = |name: &str| label(style, name);
        let dead = if self.dead == 0 {
            "0".to_owned()
        } else {
            format!(
                "{} (foreman dead list)",
                style.paint(Paint::Yellow, &self.dead.to_string())
            )
        };
        let _ = writeln!(out, "{}{dead}", label("dead"));
        let total = self.last_minute_total();
        let failed = if total.failed == 0 {
            "0 failed".to_owned()
        } else {
            style.paint(Paint::Red, &format!("{} failed", total.failed))
        };
        let _ = writeln!(
            out,
            "{}{} done, {failed} in the last complete minute",
            label("last min"),
            total.done
        );
    }

    /// The JSON form: one document, keys documented in docs/guide/operations.md.
    pub fn json(&self) -> String {
        format!("{}\n", self.document())
    }

    /// The JSON document (`status --json`, and the dashboard's overview).
    pub fn document(&self) -> serde_json::Value {
        let workers = self.obs.daemon.workers(&self.obs.running);
        serde_json::json!({
            "db": self.db,
            "now": rounded(self.obs.now),
            "daemon": self.daemon_json(),
            "daemons": self.daemons_json(),
            "shared": self.obs.shared,
            "health": {
                "healthy": self.verdict.reason.is_healthy(),
                "reason": self.verdict.reason.as_str(),
                "message": self.verdict.message,
            },
            "workers": {
                "total": workers.map(|(total, _)| total),
                "busy": workers.map(|(_, busy)| busy),
            },
            "pools": self.pools_json(),
            "running": self.running_json(),
            "queue": self.queue_json(),
            "paused": health::paused_json(&self.obs.paused, self.obs.now),
            "dead": self.dead,
            "last_minute": self.last_minute_json(),
        })
    }

    /// The running daemon, or the last one when none runs.
    fn daemon_json(&self) -> serde_json::Value {
        let now = self.obs.now;
        let daemon = &self.obs.daemon;
        let row = daemon.row.as_ref();
        // Down, the last heartbeat's age says when the daemon was last seen.
        let heartbeat_age = if daemon.running {
            daemon.heartbeat_age(now)
        } else {
            row.map(|row| (now - row.heartbeat_at).max(0.0))
        };
        serde_json::json!({
            "running": daemon.running,
            "checked_by": daemon.checked_by.as_str(),
            "pid": daemon.pid.or(row.map(|r| r.pid)),
            "host": row.map(|r| &r.host),
            "version": row.map(|r| &r.version),
            "started_at": row.map(|r| r.started_at),
            "uptime_seconds": daemon.uptime(now).map(rounded),
            "heartbeat_at": row.map(|r| r.heartbeat_at),
            "heartbeat_age_seconds": heartbeat_age.map(rounded),
            "stopping_at": row.and_then(|r| r.stopping_at),
            "stopped_at": row.and_then(|r| r.stopped_at),
        })
    }

    /// Every daemon row: SQLite's one, or every daemon of a shared database.
    fn daemons_json(&self) -> Vec<serde_json::Value> {
        let now = self.obs.now;
        self.obs
            .daemons
            .iter()
            .map(|d| {
                serde_json::json!({
                    "id": d.id,
                    "host": d.host,
                    "pid": d.pid,
                    "version": d.version,
                    "state": daemon_state(d, now, self.max_age),
                    "started_at": d.started_at,
                    "heartbeat_at": d.heartbeat_at,
                    "heartbeat_age_seconds": rounded((now - d.heartbeat_at).max(0.0)),
                    "workers": d.workers,
                    "workers_busy": self.obs.busy(d.id),
                    "served": d.served,
                    "stopping_at": d.stopping_at,
                    "stopped_at": d.stopped_at,
                    "recovered_at": d.recovered_at,
                    "recovered_by": d.recovered_by,
                })
            })
            .collect()
    }

    fn pools_json(&self) -> Vec<serde_json::Value> {
        let pools = self
            .obs
            .daemon
            .current_row()
            .map_or(&[][..], |row| &row.pools);
        pools
            .iter()
            .map(|pool| {
                serde_json::json!({
                    "name": pool.name,
                    "processes": pool.processes,
                    "up": pool.up,
                    "busy": pool.busy,
                    "saturated": pool.is_saturated(),
                    "tasks": pool.tasks,
                })
            })
            .collect()
    }

    fn running_json(&self) -> Vec<serde_json::Value> {
        let now = self.obs.now;
        self.obs
            .running
            .iter()
            .map(|r| {
                serde_json::json!({
                    "task_id": r.task_id,
                    "attempt": r.attempt,
                    "task_name": r.task_name,
                    "started_at": r.started_at,
                    "age_seconds": r.started_at.map(|s| rounded((now - s).max(0.0))),
                })
            })
            .collect()
    }

    fn queue_json(&self) -> serde_json::Value {
        let now = self.obs.now;
        let in_seconds = |at: Option<f64>| at.map(|at| rounded((at - now).max(0.0)));
        let waited = |at: Option<f64>| at.map(|at| rounded((now - at).max(0.0)));
        let by_task: serde_json::Map<String, serde_json::Value> = self
            .depth
            .iter()
            .map(|t| {
                (
                    t.task_name.clone(),
                    serde_json::json!({
                        "queued": t.queued,
                        "due": t.due,
                        "delayed": t.delayed,
                        "leased": t.leased,
                        "paused": t.paused,
                        "oldest_due_age_seconds": waited(t.oldest_due_at),
                        "next_due_in_seconds": in_seconds(t.next_due_at),
                    }),
                )
            })
            .collect();
        let (queued, due, delayed, leased, paused) = self.queue_totals();
        let oldest = self.obs.oldest_due.as_ref();
        serde_json::json!({
            "total": queued,
            "due": due,
            "delayed": delayed,
            "leased": leased,
            "paused": paused,
            "oldest_due_age_seconds": waited(oldest.map(|d| d.due_since)),
            "oldest_due_task_id": oldest.map(|d| d.task_id),
            "next_due_in_seconds": in_seconds(self.next_due_at()),
            "by_task": by_task,
        })
    }

    fn last_minute_json(&self) -> serde_json::Value {
        let total = self.last_minute_total();
        let by_task: serde_json::Map<String, serde_json::Value> = self
            .last_minute_stats
            .iter()
            .map(|(name, stat)| {
                (
                    name.clone(),
                    serde_json::json!({"count": stat.count, "done": stat.done, "failed": stat.failed}),
                )
            })
            .collect();
        serde_json::json!({
            "start": self.last_minute * 60,
            "count": total.count,
            "done": total.done,
            "failed": total.failed,
            "by_task": by_task,
        })
    }
}

/// A line's label: the first column, bold.
fn label(style: Style, name: &str) -> String {
    style.paint(Paint::Bold, &format!("{name:<10}"))
}

/// `  … 3 more task names` when a list was cut.
fn more(out: &mut String, len: usize, shown: usize, what: &str) {
    if len > shown {
        let _ = writeln!(out, "  … {} more {what}", len - shown);
    }
}
