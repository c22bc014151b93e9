//! Command tasks: what the child receives (argv, stdin JSON, environment) and how its output and
//! failures reach the log.

use crate::support::{Env, PATIENCE, wait_until};

#[test]
fn a_command_gets_the_task_as_json_on_stdin_and_in_its_environment() {
    let env = Env::new();
    env.config(
        r#"
[tasks."app.capture"]
command = ["sh", "-c", "cat > \"$RECORD_FILE.$FOREMAN_TASK_ID.json\"; echo \"$FOREMAN_TASK_NAME\" > \"$RECORD_FILE.name\"", "ignored-$0"]
"#,
    );
    env.init();
    let daemon = env.daemon(&[]);
    // Shell metacharacters must arrive byte for byte, never interpreted.
    let args = r#"["$(touch pwned)", "; rm -rf / #", "`id`", "a\nb", "ünï"]"#;
    let id = env.insert("app.capture", args);
    env.touch_wakeup("w");
    let stdin_file = env.path(&format!("ran.txt.{id}.json"));
    assert!(wait_until(PATIENCE, || std::fs::read_to_string(
        &stdin_file
    )
    .is_ok_and(|s| s.ends_with('\n'))));
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stdin_file).unwrap()).unwrap();
    assert_eq!(doc["id"], id);
    assert_eq!(doc["task_name"], "app.capture");
    assert_eq!(
        doc["args"],
        serde_json::from_str::<serde_json::Value>(args).unwrap()
    );
    assert_eq!(doc["kwargs"], serde_json::json!({}));
    assert!(wait_until(PATIENCE, || std::fs::read_to_string(
        env.path("ran.txt.name")
    )
    .is_ok_and(|s| s == "app.capture\n")));
    assert!(!env.path("pwned").exists());
    daemon.stop();
}

#[test]
fn a_failing_command_is_logged_with_its_status_and_stderr() {
    let env = Env::new();
    env.config(
        r#"
[tasks.fails]
command = ["sh", "-c", "echo working; echo 'first problem' >&2; echo 'smtp timed out' >&2; exit 3"]
"#,
    );
    env.init();
    let daemon = env.daemon(&[]);
    let id = env.insert("fails", "[]");
    env.touch_wakeup("w");
    daemon.expect_log(&format!("task {id} fails failed"));
    let log = daemon.log();
    let line = log
        .lines()
        .find(|l| l.contains(&format!("task {id} fails failed")))
        .unwrap();
    assert!(
        line.contains("exited with status 3") && line.contains("smtp timed out"),
        "{line}"
    );
    assert!(
        log.contains(&format!("task {id} fails stdout: working")),
        "{log}"
    );
    assert!(
        log.contains(&format!("task {id} fails stderr: first problem")),
        "{log}"
    );
    // The slot is free again: the next task runs.
    let next = env.insert("foreman.echo", "[]");
    env.touch_wakeup("w");
    daemon.expect_log(&format!("task {next} foreman.echo"));
    daemon.stop();
}

#[test]
fn a_command_that_ignores_stdin_and_floods_stdout_does_not_wedge_a_worker() {
    let env = Env::new();
    // 200 KB of arguments (more than a pipe holds) to a command that never reads stdin.
    env.config(
        r#"
workers = 1
[tasks.noisy]
command = ["sh", "-c", "i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done"]
"#,
    );
    env.init();
    let daemon = env.daemon(&[]);
    let big = format!("[\"{}\"]", "x".repeat(200_000));
    let id = env.insert("noisy", &big);
    let next = env.insert("foreman.echo", "[]");
    env.touch_wakeup("w");
    daemon.expect_log(&format!("task {id} noisy done"));
    // All of it was read: the first 1,000 lines at least are logged (the burst of the task's log
    // budget), the rest counted.
    let logged = daemon
        .log_lines(&format!("task {id} noisy stdout: line "))
        .len();
    let counted: usize = daemon
        .log_lines(&format!("task {id} noisy: "))
        .iter()
        .filter_map(|l| {
            l.split(": ")
                .nth(1)?
                .strip_suffix(" output line(s) not logged")
        })
        .map(|n| n.parse::<usize>().unwrap())
        .sum();
    assert!(logged >= 1000, "{logged}");
    assert_eq!(logged + counted, 2000, "{}", daemon.log());
    daemon.expect_log(&format!("task {next} foreman.echo"));
    daemon.stop();
}

#[test]
fn a_command_starts_with_default_signal_handling_and_the_daemons_environment() {
    let env = Env::new();
    // A variable from the daemon's environment, then SigIgn and SigBlk as the task's process has
    // them: `exec`, so that grep reads its own status (the shell blocks signals while it waits
    // for a child, so its own would be no evidence).
    env.config(
        r#"
[tasks."app.signals"]
command = ["sh", "-c", "echo \"inherited=$FROM_DAEMON\" > \"$RECORD_FILE\"; exec grep -E '^Sig(Ign|Blk)' /proc/self/status >> \"$RECORD_FILE\""]
"#,
    );
    env.init();
    env.insert("app.signals", "[]");
    let mut cmd = env.command(&["run"]);
    cmd.env("FROM_DAEMON", "yes")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut daemon = cmd.spawn().unwrap();
    let record = env.path("ran.txt");
    assert!(wait_until(PATIENCE, || std::fs::read_to_string(&record)
        .is_ok_and(|s| s.contains("SigBlk"))));
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(i32::try_from(daemon.id()).unwrap(), libc::SIGTERM) };
    daemon.wait().unwrap();
    let text = std::fs::read_to_string(&record).unwrap();
    let mask = |name: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap();
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    // Rust ignores SIGPIPE in the daemon; a task must get the default back (bit 13 - 1).
    assert_eq!(mask("SigIgn:") & (1 << 12), 0, "{text}");
    assert_eq!(mask("SigBlk:"), 0, "no signal blocked: {text}");
    assert!(text.contains("inherited=yes"), "{text}");
}

#[test]
fn a_command_that_cannot_be_started_fails_with_the_reason() {
    let env = Env::new();
    let program = env.path("vanishing");
    std::fs::write(&program, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(
        &program,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    env.config(&format!(
        "[tasks.\"app.gone\"]\ncommand = [\"{}\"]\n",
        program.display()
    ));
    env.init();
    let daemon = env.daemon(&[]);
    // Checked at startup; gone by the time the task runs.
    std::fs::remove_file(&program).unwrap();
    let id = env.insert("app.gone", "[]");
    env.touch_wakeup("w");
    assert!(wait_until(PATIENCE, || env.dead_reason(id).is_some()));
    let reason = env.dead_reason(id).unwrap();
    assert!(
        reason.contains("cannot start command") && reason.contains("No such file or directory"),
        "{reason}"
    );
    daemon.stop();
}
