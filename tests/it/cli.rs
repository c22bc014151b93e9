//! The CLI: init, enqueue, status, check-config, configuration errors and exit codes.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use crate::support::{Env, stderr};

#[test]
fn init_creates_the_db_and_a_private_wakeup_dir_and_is_idempotent() {
    let env = Env::new();
    let out = env.ok(&["init"]);
    assert!(out.contains("schema version 4"), "{out}");
    assert!(env.db.is_file());
    let mode = std::fs::metadata(&env.wakeup).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    env.insert("foreman.echo", "[]");
    env.ok(&["init"]);
    assert_eq!(env.queued(), 1, "a second init must not touch the data");
    let mode: String = env
        .sql()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn a_newer_schema_version_is_refused() {
    let env = Env::new();
    env.init();
    env.sql().execute_batch("PRAGMA user_version = 99").unwrap();
    for args in [
        &["run"][..],
        &["status"],
        &["enqueue", "foreman.echo"],
        &["init"],
    ] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains("schema version 99 is newer"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn a_file_that_is_not_sqlite_gets_a_clear_error() {
    let env = Env::new();
    std::fs::write(
        &env.db,
        "this is not a database, it is a text file that is long enough",
    )
    .unwrap();
    let out = env.run(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("q.sqlite3") && err.contains("not a database"),
        "{err}"
    );
}

#[test]
fn enqueue_prints_the_id_and_the_daemon_runs_it() {
    let env = Env::new();
    env.init();
    let daemon = env.daemon(&["--tick", "1h"]);
    let id = env.ok(&[
        "enqueue",
        "foreman.echo",
        "[\"from cli\"]",
        "--kwargs",
        "{\"k\":1}",
    ]);
    let id: i64 = id.trim().parse().unwrap();
    daemon.expect_log(&format!(
        "task {id} foreman.echo: args=[\"from cli\"] kwargs={{\"k\":1}}"
    ));
    daemon.stop();
}

#[test]
fn enqueue_rejects_bad_json_with_exit_2() {
    let env = Env::new();
    env.init();
    for (args, want) in [
        (&["enqueue", "x", "[1,"][..], "not valid JSON"),
        (&["enqueue", "x", "{}"], "must be a JSON array"),
        (
            &["enqueue", "x", "[]", "--kwargs", "[]"],
            "must be a JSON object",
        ),
        (&["enqueue", ""], "task name is empty"),
    ] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(env.queued(), 0);
}

#[test]
fn status_reports_the_daemon_and_the_queue() {
    let env = Env::new();
    env.init();
    let doc: serde_json::Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    assert_eq!(doc["daemon"]["running"], false);
    assert_eq!(doc["queue"]["total"], 0);
    assert!(doc["queue"]["oldest_due_age_seconds"].is_null());

    let daemon = env.daemon(&["--workers", "1"]);
    // Keep the one worker busy so the next rows stay queued.
    env.insert("foreman.sleep", "[30]");
    env.touch_wakeup("w");
    daemon.expect_log("foreman.sleep started");
    env.insert("b.task", "[]");
    env.insert("a.task", "[]");
    env.insert("a.task", "[]");
    env.sql()
        .execute(
            "INSERT INTO foreman_dead(task_id, reason) VALUES (1, 'test')",
            [],
        )
        .unwrap();
    // Global flags work after the subcommand too.
    let out = env
        .command(&[])
        .args(["status", "--json"])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["daemon"]["running"], true);
    assert_eq!(doc["daemon"]["pid"], daemon.pid());
    assert_eq!(doc["queue"]["total"], 3);
    assert_eq!(doc["queue"]["by_task"]["a.task"]["queued"], 2);
    assert_eq!(doc["queue"]["by_task"]["b.task"]["due"], 1);
    assert!(doc["queue"]["oldest_due_age_seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(doc["dead"], 1);
    let text = env.ok(&["status"]);
    assert!(
        text.contains(&format!("up · pid {}", daemon.pid())),
        "{text}"
    );
    assert!(text.contains("3 queued: 3 due"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("a.task")
                && l.split_whitespace().nth(1) == Some("2")),
        "{text}"
    );
    drop(daemon);
}

#[test]
fn bad_config_stops_startup_with_exit_2_naming_file_and_key() {
    let env = Env::new();
    for (config, want) in [
        ("workers = \"four\"", "`workers`"),
        ("wrokers = 4", "wrokers"),
        ("graceful_timeout = \"soon\"", "`graceful_timeout`"),
        (
            "[tasks.t]\ncommand = [\"/no/such/program\"]",
            "tasks.\"t\".command",
        ),
        ("[tasks.\"foreman.echo\"]\ncommand = [\"true\"]", "reserved"),
        ("workers = ", "invalid TOML"),
    ] {
        env.config(config);
        for args in [&["run"][..], &["check-config"]] {
            let out = env.run(args);
            assert_eq!(out.status.code(), Some(2), "{config}: {}", stderr(&out));
            let err = stderr(&out);
            assert!(
                err.contains("foreman.toml") && err.contains(want),
                "{config}: {err}"
            );
            assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        }
    }
    assert!(
        !env.db.exists(),
        "a bad config must stop before anything is created"
    );
}

#[test]
fn env_and_flags_override_the_config_file_in_that_order() {
    let env = Env::new();
    env.config("workers = 2\ntick = \"5s\"\n[tasks.t]\ncommand = [\"true\"]");
    let out = env.ok(&["check-config"]);
    assert!(
        out.contains("workers = 2") && out.contains("tick = \"5s\""),
        "{out}"
    );
    assert!(
        out.contains("[tasks.t]") && out.contains("command = [\"true\"]"),
        "{out}"
    );
    let out = env
        .command(&["check-config"])
        .env("FOREMAN_WORKERS", "3")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("workers = 3"));
    let out = env
        .command(&["check-config", "--workers", "5"])
        .env("FOREMAN_WORKERS", "3")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("workers = 5"));
    let out = env
        .command(&["check-config"])
        .env("FOREMAN_TICK", "250ms")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("tick = \"250ms\""));
}

#[test]
fn usage_errors_exit_2() {
    let env = Env::new();
    assert_eq!(env.run(&["no-such-command"]).status.code(), Some(2));
    assert_eq!(
        env.run(&["run", "--workers", "many"]).status.code(),
        Some(2)
    );
    assert_eq!(
        env.run(&["run", "--tick", "3 parsecs"]).status.code(),
        Some(2)
    );
    let help = String::from_utf8_lossy(&env.run(&["--help"]).stdout).into_owned();
    assert!(help.contains("Exit codes"), "{help}");
}

#[test]
fn a_wakeup_dir_owned_by_another_user_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to chown");
        return;
    }
    let env = Env::new();
    std::fs::create_dir(&env.wakeup).unwrap();
    std::os::unix::fs::chown(&env.wakeup, Some(65534), Some(65534)).unwrap();
    let out = env.run(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("owned by uid 65534"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn under_systemd_log_lines_carry_syslog_priorities_and_no_timestamp() {
    let env = Env::new();
    env.config("[tasks.t]\ncommand = [\"/no/such/program\"]");
    // systemd names the stream it connected by device and inode; stand in for it with a file.
    let log_path = env.path("journal.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let meta = log.metadata().unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let status = env
        .command(&["run"])
        .env("JOURNAL_STREAM", &stream)
        .stderr(log)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
    let err = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        err.starts_with("<3>") && err.contains("tasks.\"t\".command"),
        "{err}"
    );
    // Inherited by a process whose stderr is elsewhere, the variable must not apply.
    let out = env
        .command(&["run"])
        .env("JOURNAL_STREAM", &stream)
        .output()
        .unwrap();
    assert!(
        stderr(&out).starts_with("[20"),
        "a timestamp outside the journal: {}",
        stderr(&out)
    );
}

#[test]
fn status_reads_without_writing() {
    let env = Env::new();
    env.init();
    env.sql()
        .execute_batch("PRAGMA journal_mode = DELETE")
        .unwrap();
    env.ok(&["status"]);
    let mode: String = env
        .sql()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "delete", "status changed the database");
}

#[test]
fn a_producer_host_without_the_task_programs_can_still_enqueue() {
    let env = Env::new();
    env.init();
    // The web app's host shares foreman.toml, but the program only exists where the daemon runs.
    env.config("[tasks.resize]\ncommand = [\"/opt/only-on-the-worker/resize\"]");
    let id = env.ok(&["enqueue", "resize", "[1]"]);
    assert!(id.trim().parse::<i64>().is_ok(), "{id}");
    env.ok(&["status"]);
    let out = env.run(&["run"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "the daemon itself must refuse it"
    );
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
}

#[test]
fn sighup_reloads_instead_of_stopping_and_the_running_task_goes_on() {
    let env = Env::new();
    env.init();
    let daemon = env.daemon(&[]);
    let id = env.insert("foreman.sleep", "[0.3]");
    env.touch_wakeup("w");
    daemon.expect_log(&format!("task {id} foreman.sleep started"));
    daemon.signal(libc::SIGHUP);
    daemon.expect_log("reloaded: ");
    daemon.expect_log(&format!("task {id} foreman.sleep done"));
    env.assert_healthy();
    let log = daemon.stop();
    assert!(!log.contains("signal 1:"), "{log}");
}
