//! The operator commands `status`, `stats`, `health` and `metrics`: their text and JSON forms
//! (parsed), `health` against a missing, a stopped (SIGSTOP) and a stalled daemon, and the
//! Prometheus output read back by a strict parser of the exposition format.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Output;

use crate::support::{Daemon, Env, PATIENCE, RECORD_TASK, stderr, wait_until};

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn json(out: &str) -> serde_json::Value {
    assert_eq!(
        out.lines().count(),
        1,
        "one JSON document on one line: {out}"
    );
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `health` with `args`; returns (exit code, the one line it printed).
fn health(env: &Env, args: &[&str]) -> (Option<i32>, String) {
    let mut full = vec!["health"];
    full.extend_from_slice(args);
    let out = env.run(&full);
    let text = stdout(&out);
    assert_eq!(
        text.lines().count(),
        1,
        "one line: {text:?} {}",
        stderr(&out)
    );
    (out.status.code(), text.trim_end().to_owned())
}

/// Polls `health` until its line starts with `prefix`; panics with the last line after PATIENCE.
fn health_until(env: &Env, args: &[&str], prefix: &str) -> (Option<i32>, String) {
    let mut last = (None, String::new());
    let seen = wait_until(PATIENCE, || {
        last = health(env, args);
        last.1.starts_with(prefix)
    });
    assert!(seen, "health never said {prefix:?}; last: {last:?}");
    last
}

/// Waits until the daemon's heartbeat row is its own (it registers early in its start).
fn wait_registered(env: &Env, daemon: &Daemon) {
    assert!(
        wait_until(PATIENCE, || env
            .sql()
            .query_row("SELECT pid FROM foreman_daemon WHERE id = 1", [], |r| r
                .get::<_, i64>(0))
            .is_ok_and(|pid| pid == i64::from(daemon.pid()))),
        "the daemon never registered; log:\n{}",
        daemon.log()
    );
}

fn proc_start(pid: u32) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap()
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer outlives the call, which writes at most its length.
    assert_eq!(
        unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) },
        0
    );
    let end = buf.iter().position(|b| *b == 0).unwrap();
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// A daemon row written by hand, as a daemon that is this test process would write it.
fn fake_daemon_row(env: &Env, heartbeat_age: f64, workers: i64, pools: &str) {
    let now = now();
    env.sql()
        .execute(
            "INSERT OR REPLACE INTO foreman_daemon(id, pid, pid_start, host, version, started_at, \
             heartbeat_at, workers, pools) VALUES (1, ?1, ?2, ?3, 'test', ?4, ?5, ?6, ?7)",
            rusqlite::params![
                std::process::id(),
                proc_start(std::process::id()),
                hostname(),
                now - 100.0,
                now - heartbeat_age,
                workers,
                pools
            ],
        )
        .unwrap();
}

/// A queued row that has been due for `age` seconds.
fn insert_due(env: &Env, name: &str, age: f64) -> i64 {
    let at = now() - age;
    env.sql()
        .query_row(
            "INSERT INTO foreman_task(task_name, created_at, run_after) VALUES (?1, ?2, ?2) RETURNING id",
            rusqlite::params![name, at],
            |r| r.get(0),
        )
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// status

#[test]
fn status_shows_the_daemon_its_workers_running_tasks_and_the_queue() {
    let env = Env::new();
    env.config("heartbeat = \"1s\"\nworkers = 2\n");
    env.init();
    let daemon = env.daemon(&[]);
    wait_registered(&env, &daemon);
    let sleeper = env.insert("foreman.sleep", "[30]");
    env.touch_wakeup("w");
    daemon.expect_log(&format!("task {sleeper} foreman.sleep started"));
    env.ok(&["enqueue", "foreman.echo", "[1]", "--delay", "1h"]);
    env.sql()
        .execute(
            "INSERT INTO foreman_dead(task_id, reason) VALUES (99, 'test')",
            [],
        )
        .unwrap();

    let doc = json(&env.ok(&["status", "--json"]));
    let d = &doc["daemon"];
    assert_eq!(d["running"], true);
    assert_eq!(d["checked_by"], "lock");
    assert_eq!(d["pid"], daemon.pid());
    assert_eq!(d["host"], hostname());
    assert!(d["stopped_at"].is_null());
    assert!(d["heartbeat_age_seconds"].as_f64().unwrap() < 10.0, "{d}");
    assert!(d["uptime_seconds"].as_f64().unwrap() >= 0.0, "{d}");
    assert_eq!(doc["health"]["healthy"], true);
    assert_eq!(doc["health"]["reason"], "ok");
    assert_eq!(doc["workers"], serde_json::json!({"total": 2, "busy": 1}));
    assert_eq!(doc["running"][0]["task_id"], sleeper);
    assert_eq!(doc["running"][0]["task_name"], "foreman.sleep");
    assert!(doc["running"][0]["age_seconds"].as_f64().unwrap() >= 0.0);
    let q = &doc["queue"];
    assert_eq!(
        (
            q["total"].as_i64(),
            q["due"].as_i64(),
            q["delayed"].as_i64()
        ),
        (Some(1), Some(0), Some(1))
    );
    assert!(q["oldest_due_age_seconds"].is_null());
    let next = q["next_due_in_seconds"].as_f64().unwrap();
    assert!(next > 3000.0 && next <= 3600.0, "{next}");
    assert_eq!(q["by_task"]["foreman.echo"]["delayed"], 1);
    assert_eq!(doc["dead"], 1);
    assert!(doc["last_minute"]["count"].is_u64());

    let text = env.ok(&["status"]);
    assert!(
        !text.contains('\x1b'),
        "no colour when stdout is not a terminal: {text}"
    );
    assert!(
        text.starts_with(&format!("daemon    up · pid {} on ", daemon.pid())),
        "{text}"
    );
    assert!(text.contains("health    healthy\n"), "{text}");
    assert!(text.contains("workers   1 of 2 busy\n"), "{text}");
    assert!(
        text.contains("1 queued: 0 due, 1 later, 0 leased"),
        "{text}"
    );
    // Aligned columns: every cell of the running table ends where its header does.
    let header = text
        .lines()
        .find(|l| l.contains("TASK  ATTEMPT  NAME"))
        .unwrap();
    let row = text.lines().find(|l| l.contains("foreman.sleep")).unwrap();
    let end_of = |line: &str, word: &str| line.find(word).unwrap() + word.len();
    assert_eq!(
        end_of(header, "TASK"),
        end_of(row, &sleeper.to_string()),
        "{text}"
    );
    assert_eq!(header.find("NAME"), row.find("foreman.sleep"), "{text}");
    assert!(text.contains("dead      1 (foreman dead list)"), "{text}");
    drop(daemon);
}

#[test]
fn status_of_a_daemon_that_died_lists_what_it_was_running() {
    let env = Env::new();
    env.config("heartbeat = \"100ms\"\n");
    env.init();
    let mut daemon = env.daemon(&[]);
    wait_registered(&env, &daemon);
    let id = env.insert("foreman.sleep", "[30]");
    env.touch_wakeup("w");
    daemon.expect_log(&format!("task {id} foreman.sleep started"));
    let pid = daemon.pid();
    daemon.kill9();

    let doc = json(&env.ok(&["status", "--json"]));
    assert_eq!(doc["daemon"]["running"], false);
    assert_eq!(doc["daemon"]["pid"], pid, "the last daemon's pid");
    assert!(doc["daemon"]["stopped_at"].is_null());
    assert_eq!(doc["health"]["reason"], "daemon_down");
    assert_eq!(doc["running"][0]["task_id"], id);
    assert!(doc["workers"]["total"].is_null());
    let text = env.ok(&["status"]);
    assert!(
        text.contains(&format!("down · pid {pid} was last seen")),
        "{text}"
    );
    assert!(text.contains("did not stop cleanly"), "{text}");
    assert!(
        text.contains("1 task were running when the daemon stopped"),
        "{text}"
    );
}

#[test]
fn status_fits_one_screen_however_many_task_names_are_queued() {
    let env = Env::new();
    env.init();
    for i in 0..40 {
        insert_due(&env, &format!("task.{i:02}"), 1.0);
    }
    let text = env.ok(&["status"]);
    assert!(text.contains("… 25 more task names"), "{text}");
    assert!(
        text.lines().count() <= 30,
        "{} lines:\n{text}",
        text.lines().count()
    );
    assert!(text.lines().all(|l| l.chars().count() <= 120), "{text}");
    assert_eq!(
        json(&env.ok(&["status", "--json"]))["queue"]["by_task"]
            .as_object()
            .unwrap()
            .len(),
        40
    );
}

// ---------------------------------------------------------------------------------------------
// stats

/// A `foreman_stat` row: `count` attempts of `wall` seconds each that waited `wait`, `failed`
/// of them failed.
fn insert_stat(env: &Env, minute: i64, name: &str, count: u32, failed: u32, wall: f64, wait: f64) {
    // The bucket a duration lands in, as the daemon computes it (100 µs · 2^(b/4)).
    let bucket = |s: f64| ((s / 1e-4).log2() * 4.0).floor() + 1.0;
    let hist = |s: f64| format!("{{\"{}\": {count}}}", bucket(s));
    let n = f64::from(count);
    env.sql()
        .execute(
            "INSERT INTO foreman_stat VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            rusqlite::params![
                minute,
                name,
                count,
                count - failed,
                failed,
                wall * n,
                wall,
                wait * n,
                wait,
                hist(wall),
                hist(wait)
            ],
        )
        .unwrap();
}

fn current_minute() -> i64 {
    #[allow(clippy::cast_possible_truncation)]
    let minute = (now() / 60.0).floor() as i64;
    minute
}

/// A database with figures of two task names: `mail` 10 attempts (2 failed) a minute ago and 4
/// half an hour ago, plus 100 outside the hour; `thumb` 3 two minutes ago.
fn stats_env() -> (Env, i64) {
    let env = Env::new();
    env.init();
    let minute = current_minute();
    insert_stat(&env, minute - 1, "mail", 10, 2, 0.2, 0.01);
    insert_stat(&env, minute - 30, "mail", 4, 0, 0.2, 0.01);
    insert_stat(&env, minute - 2, "thumb", 3, 0, 2.0, 1.0);
    insert_stat(&env, minute - 90, "mail", 100, 0, 9.0, 9.0); // Outside the hour.

    (env, minute)
}

#[test]
fn stats_json_gives_figures_per_task_name_and_series_per_interval() {
    let (env, minute) = stats_env();
    let doc = json(&env.ok(&["stats", "--json"]));
    assert_eq!(doc["window_seconds"], 3600.0);
    assert_eq!(doc["interval_seconds"], 60);
    let starts = doc["interval_starts"].as_array().unwrap();
    assert_eq!(starts.len(), 60);
    assert!(
        starts[59].as_i64().unwrap() >= minute * 60,
        "the last interval is the current minute"
    );
    let mail = &doc["by_task"]["mail"];
    assert_eq!(
        (
            mail["count"].as_u64(),
            mail["done"].as_u64(),
            mail["failed"].as_u64()
        ),
        (Some(14), Some(12), Some(2))
    );
    let p50 = mail["wall_p50_seconds"].as_f64().unwrap();
    assert!(
        (p50 / 0.2 - 1.0).abs() < 0.1,
        "p50 {p50} within a bucket of 0.2"
    );
    assert!((mail["wall_max_seconds"].as_f64().unwrap() - 0.2).abs() < 1e-9);
    assert!((mail["wait_mean_seconds"].as_f64().unwrap() - 0.01).abs() < 1e-3);
    // By the intervals' starts, in case the minute turned since `minute` was read.
    let at = |m: i64| {
        starts
            .iter()
            .position(|s| s.as_i64() == Some(m * 60))
            .unwrap()
    };
    let series: Vec<u64> = mail["count_series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(
        (
            series[at(minute - 1)],
            series[at(minute - 30)],
            series.iter().sum::<u64>()
        ),
        (10, 4, 14)
    );
    assert_eq!(mail["failed_series"][at(minute - 1)], 2);
    assert_eq!(doc["total"]["count"], 17);
    assert_eq!(doc["by_task"]["thumb"]["wait_max_seconds"], 1.0);
}

#[test]
fn stats_text_draws_a_trend_per_task_name_and_takes_other_windows() {
    let (env, _) = stats_env();
    let text = env.ok(&["stats"]);
    assert!(
        text.starts_with("last 1h: 17 attempts ended, 2 failed (60 intervals of 1m"),
        "{text}"
    );
    let row = text.lines().find(|l| l.starts_with("mail ")).unwrap();
    assert_eq!(
        row.split_whitespace().take(3).collect::<Vec<_>>(),
        ["mail", "14", "2"],
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("(all)")), "{text}");
    // The trend: one character per interval, the busiest one full.
    let spark = text
        .lines()
        .filter(|l| l.starts_with("mail "))
        .nth(1)
        .unwrap();
    assert!(spark.contains('█') && spark.contains("peak 10"), "{text}");
    let failed = text
        .lines()
        .find(|l| l.trim_start().starts_with("failed"))
        .unwrap();
    assert!(failed.contains('█') && failed.contains("peak 2"), "{text}");

    let day = json(&env.ok(&["stats", "--window", "24h", "--task", "mail", "--json"]));
    assert_eq!(
        (
            day["interval_seconds"].as_i64(),
            day["interval_starts"].as_array().unwrap().len()
        ),
        (Some(1800), 48)
    );
    assert_eq!(day["task"], "mail");
    assert_eq!(day["by_task"]["mail"]["count"], 114);
    assert!(day["by_task"]["thumb"].is_null());
    let week = json(&env.ok(&["stats", "--window", "7d", "--json"]));
    assert_eq!(
        (
            week["interval_seconds"].as_i64(),
            week["interval_starts"].as_array().unwrap().len()
        ),
        (Some(10800), 56)
    );

    assert_eq!(env.run(&["stats", "--window", "0s"]).status.code(), Some(2));
    assert_eq!(
        env.run(&["stats", "--window", "soon"]).status.code(),
        Some(2)
    );
    let none = env.ok(&["stats", "--task", "nothing"]);
    assert!(
        none.starts_with("last 1h of nothing: 0 attempts ended"),
        "{none}"
    );
}

#[test]
fn stats_count_what_a_real_daemon_ran() {
    let env = Env::new();
    env.config(&format!(
        "heartbeat = \"100ms\"\n{RECORD_TASK}\n[tasks.fails]\ncommand = [\"sh\", \"-c\", \"exit 3\"]\n"
    ));
    env.init();
    for _ in 0..4 {
        env.insert("record", "[]");
    }
    env.insert("fails", "[]");
    let daemon = env.daemon(&[]);
    env.wait_ran(4);
    let counted = || json(&env.ok(&["stats", "--json"]))["total"]["count"].as_u64();
    assert!(
        wait_until(PATIENCE, || counted() == Some(5)),
        "{:?}",
        counted()
    );
    let doc = json(&env.ok(&["stats", "--json"]));
    assert_eq!(doc["by_task"]["record"]["done"], 4);
    assert_eq!(doc["by_task"]["fails"]["failed"], 1);
    assert!(
        doc["by_task"]["record"]["wall_p50_seconds"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    daemon.stop();
}

// ---------------------------------------------------------------------------------------------
// health

#[test]
fn health_says_daemon_down_without_a_daemon_and_healthy_with_one() {
    let env = Env::new();
    env.config("heartbeat = \"1s\"\n");
    env.init();
    let (code, line) = health(&env, &[]);
    assert_eq!(code, Some(1));
    assert!(
        line.starts_with("unhealthy: daemon_down: no daemon is running"),
        "{line}"
    );
    let doc = json(&stdout(&env.run(&["health", "--json"])));
    assert_eq!(
        (doc["healthy"].as_bool(), doc["reason"].as_str()),
        (Some(false), Some("daemon_down"))
    );

    let daemon = env.daemon(&[]);
    let (code, line) = health_until(&env, &[], "healthy: ");
    assert_eq!(code, Some(0));
    assert!(
        line.contains(&format!("daemon pid {} up", daemon.pid())),
        "{line}"
    );
    let doc = json(&stdout(&env.run(&["health", "--json"])));
    assert_eq!(doc["healthy"], true);
    assert_eq!(doc["reason"], "ok");
    assert_eq!(doc["pid"], daemon.pid());
    assert_eq!(doc["workers"], 4);
    assert!(doc["heartbeat_age_seconds"].as_f64().unwrap() < 10.0);
    assert_eq!(doc["max_age_seconds"], 6.0, "six heartbeats by default");

    daemon.stop();
    let (code, line) = health(&env, &[]);
    assert_eq!(code, Some(1));
    assert!(line.contains("stopped cleanly"), "{line}");
}

#[test]
fn health_says_heartbeat_stale_while_the_daemon_is_stopped_and_recovers() {
    let env = Env::new();
    env.config("heartbeat = \"100ms\"\n");
    env.init();
    let daemon = env.daemon(&[]);
    let limits = ["--max-age", "1s"];
    health_until(&env, &limits, "healthy: ");
    daemon.signal(libc::SIGSTOP);
    let (code, line) = health_until(&env, &limits, "unhealthy: heartbeat_stale");
    daemon.signal(libc::SIGCONT);
    assert_eq!(code, Some(1));
    assert!(
        line.contains(&format!(
            "daemon pid {} runs, but its heartbeat is",
            daemon.pid()
        )),
        "{line}"
    );
    let (code, _) = health_until(&env, &limits, "healthy: ");
    assert_eq!(code, Some(0));
    daemon.stop();
}

#[test]
fn health_says_stalled_when_due_tasks_wait_while_workers_are_free() {
    let env = Env::new();
    // The daemon only looks at the queue on a wakeup or its tick: rows inserted without touching
    // the wakeup dir wait an hour, while its heartbeat keeps moving.
    env.config(&format!(
        "tick = \"1h\"\nheartbeat = \"100ms\"\n{RECORD_TASK}"
    ));
    env.init();
    let daemon = env.daemon(&[]);
    health_until(&env, &["--max-age", "10s"], "healthy: ");
    let id = env.insert("record", "[]");
    // A generous --max-age: only the stall is under test.
    let limits = ["--max-queue-age", "1s", "--max-age", "10s"];
    let (code, line) = health_until(&env, &limits, "unhealthy: stalled");
    assert_eq!(code, Some(1));
    assert!(
        line.contains(&format!("task {id} (record) has waited")),
        "{line}"
    );
    assert!(line.contains("4 of 4 workers are free"), "{line}");
    let doc = json(&stdout(&env.run(&[
        "health",
        "--max-queue-age",
        "1s",
        "--max-age",
        "10s",
        "--json",
    ])));
    assert_eq!(
        (doc["reason"].as_str(), doc["workers_busy"].as_i64()),
        (Some("stalled"), Some(0))
    );
    assert!(doc["oldest_due_age_seconds"].as_f64().unwrap() > 1.0);
    assert_eq!(
        json(&env.ok(&["status", "--json"]))["queue"]["oldest_due_task_id"],
        id
    );
    // A wakeup gets it going; healthy again once it ran.
    env.touch_wakeup("w");
    env.wait_ran(1);
    health_until(&env, &limits, "healthy: ");
    daemon.stop();
}

#[test]
fn health_tells_a_saturated_pool_from_a_stall() {
    let env = Env::new();
    env.init();
    // No PID file here: the (hand-written) heartbeat row is what tells.
    let no_pid_file = env.path("elsewhere.pid");
    let no_pid_file = no_pid_file.to_str().unwrap();
    let pools = r#"[{"name":"py","processes":1,"up":1,"busy":1,"tasks":["pooled"]}]"#;
    fake_daemon_row(&env, 0.0, 4, pools);
    insert_due(&env, "pooled", 30.0);
    let args = [
        "--pid-file",
        no_pid_file,
        "--max-queue-age",
        "5s",
        "--max-age",
        "1h",
    ];
    let (code, line) = health(&env, &args);
    assert_eq!(code, Some(0), "{line}");
    assert!(
        line.starts_with("healthy: busy: every process of pool py is busy"),
        "{line}"
    );
    let plain = insert_due(&env, "plain", 20.0);
    let (code, line) = health(&env, &args);
    assert_eq!(code, Some(1), "{line}");
    assert!(
        line.starts_with(&format!("unhealthy: stalled: task {plain} (plain)")),
        "{line}"
    );
    // A pool with a free process: its own task is a stall too.
    fake_daemon_row(&env, 0.0, 4, &pools.replace("\"busy\":1", "\"busy\":0"));
    env.sql()
        .execute("DELETE FROM foreman_task WHERE id = ?1", [plain])
        .unwrap();
    let (code, line) = health(&env, &args);
    assert_eq!(code, Some(1), "{line}");
    assert!(line.contains("(pooled)"), "{line}");
}

#[test]
fn without_the_pid_file_health_judges_by_the_heartbeat_and_proc() {
    let env = Env::new();
    env.init();
    let no_pid_file = env.path("elsewhere.pid");
    let args = [
        "--pid-file",
        no_pid_file.to_str().unwrap(),
        "--max-age",
        "30s",
    ];
    let (code, line) = health(&env, &args);
    assert_eq!(code, Some(1));
    assert!(line.starts_with("unhealthy: daemon_down"), "{line}");
    // This test process stands in for the daemon: its pid and start time are real.
    fake_daemon_row(&env, 1.0, 4, "[]");
    let (code, line) = health(&env, &args);
    assert_eq!(code, Some(0), "{line}");
    let doc = json(&env.ok(&[
        "--pid-file",
        no_pid_file.to_str().unwrap(),
        "status",
        "--json",
    ]));
    assert_eq!(doc["daemon"]["checked_by"], "heartbeat");
    assert_eq!(doc["daemon"]["running"], true);
    fake_daemon_row(&env, 60.0, 4, "[]");
    let (code, line) = health(&env, &args);
    assert_eq!(code, Some(1));
    assert!(line.starts_with("unhealthy: heartbeat_stale"), "{line}");
    // Its pid now names a process that started at another time: the daemon is gone.
    env.sql()
        .execute("UPDATE foreman_daemon SET pid_start = pid_start + 1", [])
        .unwrap();
    let (_, line) = health(&env, &args);
    assert!(
        line.starts_with("unhealthy: daemon_down") && line.contains("its process is gone"),
        "{line}"
    );
}

#[test]
fn health_exit_codes_are_for_probes() {
    let env = Env::new();
    // The database is missing: unhealthy, with its one line.
    let (code, line) = health(&env, &[]);
    assert_eq!(code, Some(1));
    assert!(
        line.starts_with("unhealthy: db_error: ") && line.contains("q.sqlite3"),
        "{line}"
    );
    assert_eq!(
        json(&stdout(&env.run(&["health", "--json"])))["reason"],
        "db_error"
    );
    // Usage and configuration errors are 2, which Docker reserves: never a verdict.
    assert_eq!(
        env.run(&["health", "--max-age", "soon"]).status.code(),
        Some(2)
    );
    env.config("heartbeat = \"often\"\n");
    assert_eq!(env.run(&["health"]).status.code(), Some(2));
    let help = stdout(&env.run(&["health", "--help"]));
    assert!(
        help.contains("Exit codes") && help.contains("HEALTHCHECK"),
        "{help}"
    );
}

// ---------------------------------------------------------------------------------------------
// metrics

/// One sample of the exposition: its metric name, labels, and value as written and parsed.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    text: String,
    value: f64,
}

/// A strict reader of the Prometheus text format 0.0.4: every sample's family has one HELP and
/// one TYPE line before it, a family's samples are contiguous, names and label names are valid,
/// label values use only the three escapes, values parse as Go floats, and no sample repeats.
/// Returns the samples and each family's type.
fn parse_exposition(text: &str) -> Result<(Vec<Sample>, BTreeMap<String, String>), String> {
    if !text.ends_with('\n') {
        return Err("does not end with a newline".into());
    }
    let mut reader = Exposition::default();
    for line in text.lines() {
        match line.strip_prefix("# ") {
            Some(rest) => reader.comment(line, rest)?,
            None => reader.sample(line)?,
        }
    }
    Ok((reader.samples, reader.types))
}

#[derive(Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    helps: BTreeSet<String>,
    finished_families: BTreeSet<String>,
    current: Option<String>,
    seen: BTreeSet<String>,
    samples: Vec<Sample>,
}

impl Exposition {
    fn comment(&mut self, line: &str, rest: &str) -> Result<(), String> {
        let (keyword, rest) = rest
            .split_once(' ')
            .ok_or(format!("bad comment {line:?}"))?;
        let (name, arg) = rest
            .split_once(' ')
            .ok_or(format!("bad {keyword} {line:?}"))?;
        if !valid_name(name, true) {
            return Err(format!("bad metric name in {line:?}"));
        }
        match keyword {
            "HELP" => {
                if !self.helps.insert(name.to_owned()) {
                    return Err(format!("second HELP for {name}"));
                }
                let mut chars = arg.chars();
                while let Some(c) = chars.next() {
                    if c == '\\' && !matches!(chars.next(), Some('\\' | 'n')) {
                        return Err(format!("bad escape in {line:?}"));
                    }
                }
            }
            "TYPE" => {
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&arg) {
                    return Err(format!("bad type in {line:?}"));
                }
                if self.types.insert(name.to_owned(), arg.to_owned()).is_some() {
                    return Err(format!("second TYPE for {name}"));
                }
                if arg == "counter" && !name.ends_with("_total") {
                    return Err(format!("counter {name} does not end in _total"));
                }
            }
            _ => return Err(format!("unexpected comment {line:?}")),
        }
        Ok(())
    }

    fn sample(&mut self, line: &str) -> Result<(), String> {
        let name_end = line
            .find(['{', ' '])
            .ok_or(format!("bad sample {line:?}"))?;
        let name = &line[..name_end];
        if !valid_name(name, true) {
            return Err(format!("bad metric name in {line:?}"));
        }
        if !self.types.contains_key(name) || !self.helps.contains(name) {
            return Err(format!("{name} has a sample before its HELP and TYPE"));
        }
        if self.current.as_deref() != Some(name) {
            if self.finished_families.contains(name) {
                return Err(format!("the samples of {name} are not together"));
            }
            if let Some(previous) = self.current.replace(name.to_owned()) {
                self.finished_families.insert(previous);
            }
        }
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(after) => parse_labels(after, line)?,
            None => (BTreeMap::new(), &line[name_end..]),
        };
        let rest = rest
            .strip_prefix(' ')
            .ok_or(format!("no space before the value in {line:?}"))?;
        let mut parts = rest.split(' ');
        let text = parts.next().unwrap_or("");
        let value = go_float(text)?;
        if let Some(timestamp) = parts.next() {
            timestamp
                .parse::<i64>()
                .map_err(|_| format!("bad timestamp in {line:?}"))?;
        }
        if parts.next().is_some() {
            return Err(format!("trailing text in {line:?}"));
        }
        if !self.seen.insert(format!("{name}{labels:?}")) {
            return Err(format!("sample repeated: {line:?}"));
        }
        self.samples.push(Sample {
            name: name.to_owned(),
            labels,
            text: text.to_owned(),
            value,
        });
        Ok(())
    }
}

fn valid_name(name: &str, colons: bool) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colons && c == ':'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colons && c == ':'))
}

fn go_float(text: &str) -> Result<f64, String> {
    match text {
        "NaN" => Ok(f64::NAN),
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ if !text.is_empty()
            && text
                .chars()
                .all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) =>
        {
            text.parse().map_err(|e| format!("value {text:?}: {e}"))
        }
        _ => Err(format!("value {text:?}")),
    }
}

/// The label set after `{`: the labels, and what follows the closing `}`.
fn parse_labels<'a>(
    after: &'a str,
    line: &str,
) -> Result<(BTreeMap<String, String>, &'a str), String> {
    let mut labels = BTreeMap::new();
    let mut chars = after.char_indices().peekable();
    loop {
        let start = chars.peek().map(|(i, _)| *i).ok_or("unclosed labels")?;
        if after[start..].starts_with('}') {
            return Ok((labels, &after[start + 1..]));
        }
        let eq = after[start..]
            .find("=\"")
            .ok_or(format!("bad label in {line:?}"))?
            + start;
        let label = &after[start..eq];
        if !valid_name(label, false) || label.starts_with("__") {
            return Err(format!("bad label name {label:?}"));
        }
        while chars.peek().is_some_and(|(i, _)| *i < eq + 2) {
            chars.next();
        }
        let mut value = String::new();
        loop {
            match chars.next().ok_or("unclosed label value")?.1 {
                '\\' => match chars.next().ok_or("dangling escape")?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    c => return Err(format!("bad escape \\{c} in {line:?}")),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        if labels.insert(label.to_owned(), value).is_some() {
            return Err(format!("label {label} twice in {line:?}"));
        }
        match chars.peek() {
            Some((_, ',')) => {
                chars.next();
                if chars.peek().is_some_and(|(_, c)| *c == '}') {
                    return Err(format!("trailing comma in {line:?}"));
                }
            }
            Some((_, '}')) => {}
            _ => return Err(format!("bad label list in {line:?}")),
        }
    }
}

#[test]
fn the_strict_parser_rejects_what_prometheus_would() {
    for bad in [
        "m 1\n",
        "# HELP m h\n# TYPE m gauge\nm{l=\"a\\q\"} 1\n",
        "# HELP m h\n# TYPE m gauge\nm{l=\"a\",} 1\n",
        "# HELP m h\n# TYPE m gauge\nm one\n",
        "# HELP m h\n# TYPE m gauge\nm 1\n# HELP n h\n# TYPE n gauge\nn 1\nm 2\n",
        "# HELP m h\n# TYPE m gauge\nm 1\nm 2\n",
        "# HELP m h\n# TYPE m counter\nm 1\n",
        "# HELP m h\n# TYPE m gauge\nm 1",
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted {bad:?}");
    }
    let (samples, _) = parse_exposition(
        "# HELP m h \\\\ \\n\n# TYPE m gauge\nm{a=\"x\\\"y\\\\z\\n\",b=\"\"} +Inf\nm 0.5 1700000000000\n",
    )
    .unwrap();
    assert_eq!(samples[0].labels["a"], "x\"y\\z\n");
    assert!(samples[0].value.is_infinite());
    assert_eq!(samples[1].text, "0.5");
}

fn sample<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    samples.iter().find(|s| {
        s.name == name
            && s.labels.len() == labels.len()
            && labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    })
}

#[test]
fn metrics_are_valid_prometheus_text_with_the_status_figures() {
    let env = Env::new();
    env.config(&format!("heartbeat = \"1s\"\nworkers = 3\n{RECORD_TASK}"));
    env.init();
    // A name that needs every escape, queued for later so that it stays.
    let odd = "we\"ird\\name\nx";
    env.sql()
        .execute(
            "INSERT INTO foreman_task(task_name, run_after) VALUES (?1, ?2)",
            rusqlite::params![odd, now() + 3600.0],
        )
        .unwrap();
    let dead = "INSERT INTO foreman_dead(task_id, reason) VALUES (7, 'test')";
    env.sql().execute_batch(dead).unwrap();
    let minute = current_minute();
    insert_stat(&env, minute - 1, "past", 2, 1, 0.5, 0.1);
    insert_stat(&env, minute, "past", 2, 1, 0.5, 0.1);
    let daemon = env.daemon(&[]);
    for _ in 0..3 {
        env.insert("record", "[]");
    }
    env.touch_wakeup("w");
    env.wait_ran(3);
    let done = || {
        let (samples, _) = parse_exposition(&env.ok(&["metrics"])).unwrap();
        sample(
            &samples,
            "foreman_tasks_total",
            &[("task_name", "record"), ("outcome", "done")],
        )
        .map(|s| s.text.clone())
    };
    assert!(
        wait_until(PATIENCE, || done().as_deref() == Some("3")),
        "{:?}",
        done()
    );

    let text = env.ok(&["metrics"]);
    let (samples, types) = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    let get = |name: &str, labels: &[(&str, &str)]| {
        sample(&samples, name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?}:\n{text}"))
            .clone()
    };
    let value = |name: &str, labels: &[(&str, &str)]| get(name, labels).text;
    assert_eq!(value("foreman_up", &[]), "1");
    assert_eq!(value("foreman_healthy", &[]), "1");
    assert!(get("foreman_heartbeat_age_seconds", &[]).value < 10.0);
    assert!(get("foreman_uptime_seconds", &[]).value >= 0.0);
    assert_eq!(value("foreman_workers", &[]), "3");
    assert_eq!(value("foreman_workers_busy", &[]), "0");
    assert_eq!(value("foreman_queue_delayed", &[("task_name", odd)]), "1");
    assert_eq!(value("foreman_queue_due", &[("task_name", "record")]), "0");
    assert_eq!(value("foreman_queue_oldest_due_age_seconds", &[]), "0");
    assert_eq!(value("foreman_dead_letters", &[]), "1");
    assert_eq!(
        value(
            "foreman_tasks_total",
            &[("task_name", "record"), ("outcome", "failed")]
        ),
        "0"
    );
    // The figures of the last complete minute, hand-written into it (and into the current one,
    // in case the minute turns).
    let p50 = get(
        "foreman_last_minute_wall_p50_seconds",
        &[("task_name", "past")],
    )
    .value;
    assert!((p50 / 0.5 - 1.0).abs() < 0.1, "{p50}");
    assert_eq!(
        value(
            "foreman_last_minute_wall_max_seconds",
            &[("task_name", "past")]
        ),
        "0.5"
    );
    assert_eq!(
        value(
            "foreman_last_minute_wait_max_seconds",
            &[("task_name", "past")]
        ),
        "0.1"
    );
    assert_eq!(
        value(
            "foreman_last_minute_tasks",
            &[("task_name", "past"), ("outcome", "failed")]
        ),
        "1"
    );
    assert_eq!(types["foreman_tasks_total"], "counter");
    assert_eq!(types["foreman_up"], "gauge");

    daemon.stop();

    let (samples, _) = parse_exposition(&env.ok(&["metrics"])).unwrap();
    assert_eq!(sample(&samples, "foreman_up", &[]).unwrap().text, "0");
    assert_eq!(sample(&samples, "foreman_healthy", &[]).unwrap().text, "0");
    assert!(
        sample(&samples, "foreman_workers", &[]).is_none(),
        "no worker figures while down"
    );
}

#[test]
fn metrics_output_replaces_the_file_whole_for_the_textfile_collector() {
    let env = Env::new();
    env.init();
    let dir = env.path("textfile");
    std::fs::create_dir(&dir).unwrap();
    let target = dir.join("foreman.prom");
    for _ in 0..2 {
        let out = env.run(&["metrics", "--output", target.to_str().unwrap()]);
        assert!(
            out.status.success() && out.stdout.is_empty(),
            "{}",
            stderr(&out)
        );
    }
    let written = std::fs::read_to_string(&target).unwrap();
    parse_exposition(&written).unwrap_or_else(|e| panic!("{e}:\n{written}"));
    assert!(written.contains("\nforeman_up 0\n"), "{written}");
    // Nothing else is left in the directory the collector reads.
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files, [std::ffi::OsString::from("foreman.prom")]);
    let out = env.run(&["metrics", "--output", "/no/such/dir/foreman.prom"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("/no/such/dir/"), "{}", stderr(&out));
}

#[test]
fn health_gives_a_new_daemon_max_age_to_register() {
    let env = Env::new();
    env.config("heartbeat = \"100ms\"\n");
    env.init();
    let daemon = env.daemon(&[]);
    wait_registered(&env, &daemon);
    // What a predecessor leaves: the same pid (a container's pid 1), started before the lock was
    // taken. The heartbeat does not rewrite started_at, so the row stays a predecessor's.
    env.sql()
        .execute(
            "UPDATE foreman_daemon SET started_at = started_at - 3600",
            [],
        )
        .unwrap();
    let doc = json(&stdout(&env.run(&["health", "--json", "--max-age", "1h"])));
    assert_eq!(
        (doc["reason"].as_str(), doc["healthy"].as_bool()),
        (Some("starting"), Some(true)),
        "{doc}"
    );
    let (code, line) = health(&env, &["--max-age", "1ms"]);
    assert_eq!(code, Some(1));
    assert!(
        line.starts_with("unhealthy: heartbeat_stale") && line.contains("has written no heartbeat"),
        "{line}"
    );
    daemon.stop();
}

/// Runs `foreman ARGS` on a terminal (a pty from script(1)); `None` when script is missing.
fn on_a_terminal(env: &Env, args: &str, no_color: Option<&str>) -> Option<String> {
    let line = format!(
        "'{}' --db '{}' {args}",
        crate::support::BIN,
        env.db.display()
    );
    let mut script = std::process::Command::new("script");
    script
        .args(["-qec", &line, "/dev/null"])
        .current_dir(env.dir.path())
        .stdin(std::process::Stdio::null())
        .env_remove("NO_COLOR");
    if let Some(value) = no_color {
        script.env("NO_COLOR", value);
    }
    let out = script.output().ok()?;
    Some(stdout(&out))
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let env = Env::new();
    env.init();
    let Some(coloured) = on_a_terminal(&env, "status", None) else {
        eprintln!("skipped: needs script(1) for a terminal");
        return;
    };
    assert!(coloured.contains("\x1b[31mdown\x1b[0m"), "{coloured:?}");
    for no_color in ["1", "yes"] {
        let plain = on_a_terminal(&env, "status", Some(no_color)).unwrap();
        assert!(
            plain.contains("down") && !plain.contains('\x1b'),
            "{plain:?}"
        );
    }
    // An empty NO_COLOR does not count (no-color.org).
    let empty = on_a_terminal(&env, "status", Some("")).unwrap();
    assert!(empty.contains('\x1b'), "{empty:?}");
    // Redirected, never: the other tests read plain text from a pipe.
    assert!(!env.ok(&["status"]).contains('\x1b'));
}

#[test]
fn health_says_stopping_while_a_signalled_daemon_waits_for_its_tasks() {
    let env = Env::new();
    let gate = env.path("gate");
    env.config(&format!(
        "workers = 1\ngraceful_timeout = \"1m\"\n[tasks.gated]\ncommand = [\"sh\", \"-c\", \"while [ ! -e '{}' ]; do sleep 0.01; done\"]\n",
        gate.display()
    ));
    env.init();
    env.insert("gated", "[]");
    let mut daemon = env.daemon(&[]);
    wait_registered(&env, &daemon);
    assert!(wait_until(PATIENCE, || env.queued() == 0));
    // Due long ago, and left queued on purpose by a daemon that is stopping.
    insert_due(&env, "gated", 120.0);
    daemon.signal(libc::SIGTERM);
    let (code, line) = health_until(&env, &["--max-queue-age", "1s"], "healthy: stopping");
    assert_eq!(code, Some(0), "{line}");
    let status = json(&env.ok(&["status", "--json"]));
    assert!(
        status["daemon"]["stopping_at"].as_f64().is_some(),
        "{status}"
    );
    std::fs::write(&gate, "").unwrap();
    assert!(daemon.wait_exit(PATIENCE).success());
    health_until(&env, &[], "unhealthy: daemon_down");
}
