//! `foreman metrics`: the figures of `status` in the Prometheus text exposition format (version
//! 0.0.4), for node_exporter's textfile collector; no HTTP server. `--output FILE` replaces the
//! file atomically (a temporary file in the same directory, then a rename), so the collector never
//! reads half a file, with mode 0644 whatever the caller's umask, so the collector (another user)
//! can read it. A database that cannot be read still replaces the file, with `foreman_up 0` and
//! `foreman_metrics_error 1`: an old file would go on saying the daemon is up.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use clap::Args;

use super::observe::open;
use super::status::Status;
use super::{Globals, print};
use crate::error::{Error, Result};

/// Print status figures in the Prometheus text format (for node_exporter's textfile collector)
#[derive(Args, Debug)]
pub struct MetricsArgs {
    /// Write them to FILE atomically (temporary file and rename) instead of stdout
    #[arg(long, value_name = "FILE")]
    pub output: Option<std::path::PathBuf>,
}

pub fn run(globals: &Globals, args: &MetricsArgs) -> Result<()> {
    let read = globals.load_config().and_then(|config| {
        let status = Status::read(&open(&config)?, &config)?;
        Ok(render(&status))
    });
    match (&args.output, read) {
        (Some(path), Ok(text)) => write_atomically(path, &text),
        (Some(path), Err(e)) => {
            write_atomically(path, &unreadable())?;
            Err(e)
        }
        (None, Ok(text)) => print(&text),
        (None, Err(e)) => Err(e),
    }
}

/// What the file says when the figures could not be read: down, and why it says so.
fn unreadable() -> String {
    let mut out = Exposition::default();
    out.family("foreman_up", "gauge", UP_HELP, [(vec![], 0.0)]);
    out.family(
        "foreman_metrics_error",
        "gauge",
        ERROR_HELP,
        [(vec![], 1.0)],
    );
    out.text
}

const UP_HELP: &str =
    "Whether a foreman daemon runs on this database (1) or not, or it could not be read (0).";
const ERROR_HELP: &str = "Whether `foreman metrics` could not read the database (1) or could (0).";

/// The text a textfile collector reads.
pub fn render(status: &Status) -> String {
    let mut out = Exposition::default();
    daemon_families(&mut out, status);
    if status.obs.shared {
        fleet_families(&mut out, status);
    }
    queue_families(&mut out, status);
    throughput_families(&mut out, status);
    out.text
}

/// Up, healthy, liveness, workers and pools.
fn daemon_families(out: &mut Exposition, status: &Status) {
    let daemon = &status.obs.daemon;
    out.family(
        "foreman_up",
        "gauge",
        UP_HELP,
        // Of daemons sharing the database, any that runs, wherever it does.
        [(
            vec![],
            f64::from(u8::from(
                daemon.running
                    || (status.obs.shared && status.obs.live(status.max_age).count() > 0),
            )),
        )],
    );
    out.family(
        "foreman_metrics_error",
        "gauge",
        ERROR_HELP,
        [(vec![], 0.0)],
    );
    out.family(
        "foreman_healthy",
        "gauge",
        "Whether `foreman health` with its default limits would pass (1) or not (0).",
        [(
            vec![],
            f64::from(u8::from(status.verdict.reason.is_healthy())),
        )],
    );
    liveness_families(out, status);
    let workers = daemon.workers(&status.obs.running);
    out.family(
        "foreman_workers",
        "gauge",
        "Worker slots of the running daemon: the most tasks it runs at once.",
        workers.map(|(total, _)| (vec![], count(total))),
    );
    out.family(
        "foreman_workers_busy",
        "gauge",
        "Tasks the running daemon is running.",
        workers.map(|(_, busy)| (vec![], count(busy))),
    );
    let pools = daemon.current_row().map_or(&[][..], |row| &row.pools);
    for (name, help, field) in [
        (
            "foreman_pool_processes",
            "Processes a worker pool is configured with.",
            0,
        ),
        (
            "foreman_pool_up",
            "Processes of a worker pool that said hello and have not died since.",
            1,
        ),
        (
            "foreman_pool_busy",
            "Processes of a worker pool running a task.",
            2,
        ),
    ] {
        out.family(
            name,
            "gauge",
            help,
            pools.iter().filter_map(|pool| {
                let value = [pool.processes, pool.up, pool.busy][field]?;
                Some((vec![("pool", pool.name.as_str())], unsigned(value)))
            }),
        );
    }
}

/// Every daemon of a shared database (PostgreSQL), labelled by its id, host and pid: whether it
/// runs, its heartbeat's age, its workers and busy ones, and its tasks since it started. Ended
/// daemons are left out (their series end with them).
fn fleet_families(out: &mut Exposition, status: &Status) {
    let now = status.obs.now;
    let daemons: Vec<(String, &crate::store::DaemonRow)> = status
        .obs
        .daemons
        .iter()
        .filter(|d| d.is_open())
        .map(|d| (d.id.to_string(), d))
        .collect();
    let pids: Vec<String> = daemons.iter().map(|(_, d)| d.pid.to_string()).collect();
    let labels = |i: usize| {
        let (id, d) = &daemons[i];
        vec![
            ("daemon", id.as_str()),
            ("host", d.host.as_str()),
            ("pid", pids[i].as_str()),
        ]
    };
    out.family(
        "foreman_daemons_up",
        "gauge",
        "Daemons sharing the database whose heartbeat is fresh.",
        [(
            vec![],
            count(i64::try_from(status.obs.live(status.max_age).count()).unwrap_or(0)),
        )],
    );
    out.family(
        "foreman_daemon_up",
        "gauge",
        "Whether a daemon sharing the database runs (1: its heartbeat is fresh) or is stale (0).",
        (0..daemons.len()).map(|i| {
            let up = now - daemons[i].1.heartbeat_at <= status.max_age;
            (labels(i), f64::from(u8::from(up)))
        }),
    );
    out.family(
        "foreman_daemon_heartbeat_age_seconds",
        "gauge",
        "Seconds since a daemon sharing the database wrote its heartbeat.",
        (0..daemons.len()).map(|i| (labels(i), (now - daemons[i].1.heartbeat_at).max(0.0))),
    );
    out.family(
        "foreman_daemon_workers",
        "gauge",
        "Worker slots of a daemon sharing the database.",
        (0..daemons.len()).map(|i| (labels(i), count(daemons[i].1.workers))),
    );
    out.family(
        "foreman_daemon_workers_busy",
        "gauge",
        "Tasks a daemon sharing the database is running.",
        (0..daemons.len()).map(|i| (labels(i), count(status.obs.busy(daemons[i].1.id)))),
    );
}

/// When the daemon was last seen and since when it runs, as ages and as timestamps.
fn liveness_families(out: &mut Exposition, status: &Status) {
    let now = status.obs.now;
    let daemon = &status.obs.daemon;
    let heartbeat_age = if daemon.running {
        daemon.heartbeat_age(now)
    } else {
        daemon
            .row
            .as_ref()
            .map(|row| (now - row.heartbeat_at).max(0.0))
    };
    out.family(
        "foreman_heartbeat_age_seconds",
        "gauge",
        "Seconds since the daemon last wrote its heartbeat row.",
        heartbeat_age.map(|age| (vec![], age)),
    );
    // Timestamps as well as ages: a textfile is read up to a scrape interval (or a cron period)
    // after it was written, when its ages are already that much too young; `time() - x` is not.
    let heartbeat_at = if daemon.running {
        daemon.current_row()
    } else {
        daemon.row.as_ref()
    }
    .map(|row| row.heartbeat_at);
    out.family(
        "foreman_heartbeat_timestamp_seconds",
        "gauge",
        "Unix time of the daemon's last heartbeat.",
        heartbeat_at.map(|at| (vec![], at)),
    );
    out.family(
        "foreman_start_time_seconds",
        "gauge",
        "Unix time the running daemon started.",
        daemon
            .current_row()
            .map(|row| row.started_at)
            .or(daemon.lock_since.filter(|_| daemon.running))
            .map(|at| (vec![], at)),
    );
    out.family(
        "foreman_uptime_seconds",
        "gauge",
        "Seconds since the running daemon started.",
        daemon.uptime(now).map(|uptime| (vec![], uptime)),
    );
}

/// The queue per task name, its oldest due task, and dead letters.
fn queue_families(out: &mut Exposition, status: &Status) {
    let now = status.obs.now;
    let totals = status.obs.daemon.current_row().map(|row| &row.totals);
    // Every task name the queue or the daemon's totals know, so that a drained queue reads 0
    // rather than a series that vanishes.
    let names: BTreeSet<&str> = status
        .depth
        .iter()
        .map(|t| t.task_name.as_str())
        .chain(
            totals
                .into_iter()
                .flat_map(|t| t.keys().map(String::as_str)),
        )
        .collect();
    let depth = |name: &str| status.depth.iter().find(|t| t.task_name == name);
    for (metric, help, pick) in [
        (
            "foreman_queue_due",
            "Queued tasks that are due: waiting for a worker.",
            0,
        ),
        (
            "foreman_queue_delayed",
            "Queued tasks waiting for their time (a delay or a retry's backoff).",
            1,
        ),
        (
            "foreman_queue_leased",
            "Queued at-least-once tasks that are running under a lease.",
            2,
        ),
        (
            "foreman_queue_paused",
            "Queued tasks held back by a pause of their name (foreman pause).",
            3,
        ),
    ] {
        out.family(
            metric,
            "gauge",
            help,
            names.iter().map(|name| {
                let n = depth(name).map_or(0, |t| [t.due, t.delayed, t.leased, t.paused][pick]);
                (vec![("task_name", *name)], count(n))
            }),
        );
    }
    out.family(
        "foreman_paused_since_seconds",
        "gauge",
        "Unix time since which a task name is paused; task_name \"*\" is `foreman pause --all`.",
        status.obs.paused.iter().map(|p| {
            (
                vec![("task_name", p.task_name.as_deref().unwrap_or("*"))],
                p.since,
            )
        }),
    );
    out.family(
        "foreman_queue_oldest_due_age_seconds",
        "gauge",
        "Seconds the longest-waiting due task has been due (0 when none is).",
        [(
            vec![],
            status
                .obs
                .oldest_due
                .as_ref()
                .map_or(0.0, |due| (now - due.due_since).max(0.0)),
        )],
    );
    out.family(
        "foreman_dead_letters",
        "gauge",
        "Tasks in foreman_dead: they could not run or ran out of retries.",
        [(vec![], count(status.dead))],
    );
}

/// Attempts that ended: since the daemon started, and in the last complete minute with their
/// times.
fn throughput_families(out: &mut Exposition, status: &Status) {
    let totals = status.obs.daemon.current_row().map(|row| &row.totals);
    out.family(
        "foreman_tasks_total",
        "counter",
        "Attempts that ended since the running daemon started, by outcome (timeouts count as failed).",
        totals.into_iter().flatten().flat_map(|(name, t)| {
            [
                (vec![("task_name", name.as_str()), ("outcome", "done")], unsigned(t.done)),
                (vec![("task_name", name.as_str()), ("outcome", "failed")], unsigned(t.failed)),
            ]
        }),
    );

    let minute = &status.last_minute_stats;
    out.family(
        "foreman_last_minute_tasks",
        "gauge",
        "Attempts that ended in the last complete minute, by outcome.",
        minute.iter().flat_map(|(name, stat)| {
            [
                (
                    vec![("task_name", name.as_str()), ("outcome", "done")],
                    unsigned(stat.done),
                ),
                (
                    vec![("task_name", name.as_str()), ("outcome", "failed")],
                    unsigned(stat.failed),
                ),
            ]
        }),
    );
    for (metric, help, wall, p50) in [
        (
            "foreman_last_minute_wall_p50_seconds",
            "Median run time (start to end) of the attempts that ended in the last complete minute.",
            true,
            true,
        ),
        (
            "foreman_last_minute_wall_max_seconds",
            "Longest run time of the attempts that ended in the last complete minute.",
            true,
            false,
        ),
        (
            "foreman_last_minute_wait_p50_seconds",
            "Median wait (due to start) of the attempts that ended in the last complete minute.",
            false,
            true,
        ),
        (
            "foreman_last_minute_wait_max_seconds",
            "Longest wait (due to start) of the attempts that ended in the last complete minute.",
            false,
            false,
        ),
    ] {
        out.family(
            metric,
            "gauge",
            help,
            minute
                .iter()
                .filter(|(_, s)| s.count > 0)
                .filter_map(|(name, stat)| {
                    let (hist, max) = if wall {
                        (&stat.wall_hist, stat.wall_max)
                    } else {
                        (&stat.wait_hist, stat.wait_max)
                    };
                    let value = if p50 {
                        super::stats::p50(hist, max)?
                    } else {
                        max
                    };
                    Some((vec![("task_name", name.as_str())], value))
                }),
        );
    }
}

/// Writes `text` to `path` so that a reader sees the old file or the new one, never a part: a
/// temporary file in the same directory (named so the textfile collector, which reads `*.prom`,
/// skips it), then a rename over the target.
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::Config(format!("--output {}: not a file name", path.display())))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let temp_name = format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    );
    let temp = dir.map_or_else(|| temp_name.clone().into(), |d| d.join(&temp_name));
    let io_err = |e| Error::io(format!("writing {}", temp.display()), e);
    let written = std::fs::File::create(&temp).and_then(|mut file| {
        // Set on the open file, so no umask filters it.
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(io_err(e));
    }
    std::fs::rename(&temp, path).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        Error::io(
            format!("renaming {} to {}", temp.display(), path.display()),
            e,
        )
    })
}

#[allow(clippy::cast_precision_loss)] // Counts far below 2^52.
fn count(n: i64) -> f64 {
    n as f64
}

#[allow(clippy::cast_precision_loss)] // Counts far below 2^52.
fn unsigned(n: u64) -> f64 {
    n as f64
}

/// The exposition being written: families one after the other, each with its HELP and TYPE.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    /// Writes one metric family; nothing at all when it has no samples, since a TYPE line without
    /// samples only says the figure is unknown, which its absence says too.
    fn family<'a>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, f64)>,
    ) {
        let mut samples = samples.into_iter().peekable();
        if samples.peek().is_none() {
            return;
        }
        let _ = writeln!(self.text, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            self.text.push_str(name);
            if !labels.is_empty() {
                self.text.push('{');
                for (i, (label, value)) in labels.iter().enumerate() {
                    if i > 0 {
                        self.text.push(',');
                    }
                    let _ = write!(self.text, "{label}=\"{}\"", escape_label(value));
                }
                self.text.push('}');
            }
            let _ = writeln!(self.text, " {}", number(value));
        }
    }
}

/// A label value: backslash, double quote and newline escaped (anything else is taken as is).
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A HELP text: backslash and newline escaped.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value as Go's ParseFloat reads it.
fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        // Rust prints the shortest text that reads back the same, without an exponent.
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_and_numbers_are_escaped_as_the_format_says() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(number(3.0), "3");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NAN), "NaN");
        let mut out = Exposition::default();
        out.family("m", "gauge", "a \\ b\nc", [(vec![("l", "x\"y")], 1.5)]);
        out.family("empty", "gauge", "never shown", []);
        assert_eq!(
            out.text,
            "# HELP m a \\\\ b\\nc\n# TYPE m gauge\nm{l=\"x\\\"y\"} 1.5\n"
        );
    }

    #[test]
    fn the_output_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("foreman.prom");
        write_atomically(&path, "a 1\n").unwrap();
        write_atomically(&path, "b 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "b 2\n");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file is left behind");
        assert!(write_atomically(&dir.path().join("no/such/dir/x.prom"), "").is_err());
    }
}
