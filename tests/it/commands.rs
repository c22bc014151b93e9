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
    daemon.expect_log(&format!("task {id} noisy stdout: line 1999"));
    daemon.expect_log(&format!("task {id} noisy done"));
    daemon.expect_log(&format!("task {next} foreman.echo"));
    daemon.stop();
}
