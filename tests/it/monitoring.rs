//! What a monitoring user, node_exporter's textfile collector and Prometheus's own checker meet:
//! reading the database without write access in every state, `metrics --output` files another
//! user can read and that never go stale saying the daemon is up, timestamps beside ages, and
//! pool state published as soon as a pool says hello.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Output};
use std::time::Duration;

use crate::support::{BIN, Env, NOBODY, PATIENCE, chmod, is_root, stderr, wait_until};

/// `foreman ARGS` on `env`'s database as `uid`, with the umask `umask`.
fn run_as(env: &Env, uid: u32, umask: u32, args: &[&str]) -> Output {
    let template = env.command(args);
    let mut cmd = Command::new(BIN);
    cmd.args(template.get_args());
    if let Some(dir) = template.get_current_dir() {
        cmd.current_dir(dir);
    }
    for (key, value) in template.get_envs() {
        if let Some(value) = value {
            cmd.env(key, value);
        }
    }
    cmd.uid(uid).gid(uid);
    // SAFETY: umask is async-signal-safe and touches nothing else.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(umask);
            Ok(())
        });
    }
    cmd.output().unwrap()
}

/// The health verdict's reason code, from `health --json`.
fn reason(out: &Output) -> String {
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(out)
        )
    });
    doc["reason"].as_str().unwrap_or_default().to_owned()
}

/// An `Env` whose files another user may read but not write: the temp dir is made 0755, the
/// database's directory stays root's.
fn readable_env() -> Option<Env> {
    if !is_root() {
        eprintln!("notice: not root, so the tests as another user are skipped");
        return None;
    }
    let env = Env::new();
    chmod(env.dir.path(), 0o755);
    Some(env)
}

#[test]
fn a_read_only_user_reads_the_database_whether_the_daemon_runs_stopped_or_crashed() {
    let Some(env) = readable_env() else { return };
    env.init();
    let mut daemon = env.daemon(&[]);
    env.assert_healthy();
    let as_nobody = |args: &[&str]| run_as(&env, NOBODY, 0o022, args);
    assert_eq!(reason(&as_nobody(&["health", "--json"])), "ok");
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(PATIENCE).success());
    // SQLite removed -wal and -shm at the clean stop; nobody cannot create them in root's
    // directory, and used to get "attempt to write a readonly database" (db_error).
    assert!(!env.path("q.sqlite3-shm").exists());
    let out = as_nobody(&["health", "--json"]);
    assert_eq!(reason(&out), "daemon_down", "{}", stderr(&out));
    let out = as_nobody(&["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // After a kill -9, -wal and -shm stay, and SQLite reads them through a read-only index.
    let mut daemon = env.daemon(&[]);
    env.assert_healthy();
    daemon.kill9();
    let out = as_nobody(&["health", "--json"]);
    assert_eq!(reason(&out), "daemon_down", "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    // Without the index, the commits still in the -wal cannot be read: said, and read without.
    let wal = std::fs::metadata(env.path("q.sqlite3-wal")).map_or(0, |m| m.len());
    assert!(wal > 0, "the killed daemon's -wal holds its commits");
    std::fs::remove_file(env.path("q.sqlite3-shm")).unwrap();
    let out = as_nobody(&["health", "--json"]);
    assert_eq!(reason(&out), "daemon_down", "{}", stderr(&out));
    assert!(
        stderr(&out).contains("without its -wal"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn metrics_output_is_readable_by_others_and_never_left_saying_up() {
    let Some(env) = readable_env() else { return };
    env.init();
    let dir = env.path("textfile");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o777);
    let target = dir.join("foreman.prom");
    let target_arg = target.to_str().unwrap();
    let daemon = env.daemon(&[]);
    env.assert_healthy();
    // A umask that would make the file unreadable to node_exporter, had foreman not set its mode.
    let out = run_as(&env, NOBODY, 0o077, &["metrics", "--output", target_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    let written = std::fs::read_to_string(&target).unwrap();
    assert!(written.contains("\nforeman_up 1\n"), "{written}");
    drop(daemon);
    // The database becomes unreadable: the file must not go on saying the daemon is up.
    chmod(&env.db, 0o600);
    let out = run_as(&env, NOBODY, 0o077, &["metrics", "--output", target_arg]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let written = std::fs::read_to_string(&target).unwrap();
    assert!(written.contains("\nforeman_up 0\n"), "{written}");
    assert!(written.contains("\nforeman_metrics_error 1\n"), "{written}");
    let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
}

/// The value of the one sample of `name` in an exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_export_timestamps_beside_ages_and_pass_promtool() {
    let env = Env::new();
    env.init();
    let daemon = env.daemon(&[]);
    env.assert_healthy();
    let text = env.ok(&["metrics"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let beat = sample(&text, "foreman_heartbeat_timestamp_seconds").expect("heartbeat timestamp");
    let start = sample(&text, "foreman_start_time_seconds").expect("start time");
    let age = sample(&text, "foreman_heartbeat_age_seconds").expect("heartbeat age");
    assert!(start <= beat && beat <= now && now - beat < 60.0, "{text}");
    assert!((now - beat - age).abs() < 5.0, "{text}");
    drop(daemon);
    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write as _;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics: {}{}",
                String::from_utf8_lossy(&out.stdout),
                stderr(&out)
            );
        }
        Err(e) => {
            assert!(
                std::env::var("FOREMAN_PROMTOOL").as_deref() != Ok("required"),
                "promtool: {e}, and FOREMAN_PROMTOOL=required"
            );
            eprintln!("notice: promtool not found ({e}); skipping its check");
        }
    }
}

#[test]
fn status_shows_a_pool_up_as_soon_as_it_says_hello() {
    let env = Env::new();
    std::fs::write(
        env.path("quiet_tasks.py"),
        "from foreman_worker import task\n\n@task\ndef noop():\n    pass\n",
    )
    .unwrap();
    // A heartbeat an hour apart: only a publication on the pool's own change can show it.
    env.config(
        r#"
heartbeat = "1h"
[pools.py]
command = ["python3", "-m", "foreman_worker", "quiet_tasks"]
processes = 2
"#,
    );
    env.init();
    let daemon = env.daemon(&[]);
    assert!(wait_until(PATIENCE, || daemon.log_lines(" ready").len()
        + daemon.log_lines(" serves ").len()
        >= 2));
    let up = || -> Option<(u64, Vec<String>)> {
        let doc: serde_json::Value = serde_json::from_str(&env.ok(&["status", "--json"])).ok()?;
        let pool = doc["pools"].as_array()?.first()?.clone();
        let tasks = pool["tasks"].as_array()?;
        Some((
            pool["up"].as_u64()?,
            tasks
                .iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect(),
        ))
    };
    assert!(
        wait_until(Duration::from_secs(5), || up()
            .is_some_and(|(n, tasks)| n == 2 && tasks == ["quiet_tasks.noop"])),
        "status after both hellos: {:?}",
        up()
    );
}
