//! Where task processes run and what they find in their environment: `cwd` and `env` for pools and
//! command tasks, relative paths against the config file's directory, and `FOREMAN_DB` and
//! `FOREMAN_WAKEUP_DIR` as absolute paths, so that a task that enqueues reaches this daemon's queue.

use std::path::{Path, PathBuf};

use crate::support::{BIN, Daemon, Env, PATIENCE, Unprivileged, chmod, finish, wait_until};

/// A task module found only from the pool's `cwd`: nothing on PYTHONPATH holds it.
const WHERE_TASKS: &str = r#"
import json, os
from foreman_worker import task

@task
def report(tag):
    seen = {k: os.environ.get(k) for k in ("GREETING", "FOREMAN_DB", "FOREMAN_WAKEUP_DIR")}
    seen.update(tag=tag, cwd=os.getcwd())
    with open(os.environ["RECORD_FILE"], "a") as f:
        f.write(json.dumps(seen) + "\n")
"#;

/// The pool's reports, one JSON object per task.
fn reports(env: &Env) -> Vec<serde_json::Value> {
    std::fs::read_to_string(env.path("ran.txt"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON report"))
        .collect()
}

fn wait_report(env: &Env, tag: &str, daemon: &Daemon) -> serde_json::Value {
    let mut found = None;
    wait_until(PATIENCE, || {
        found = reports(env).into_iter().find(|r| r["tag"] == tag);
        found.is_some()
    });
    found.unwrap_or_else(|| panic!("no report tagged {tag}; log:\n{}", daemon.log()))
}

fn canonical(path: impl AsRef<Path>) -> PathBuf {
    let path = path.as_ref();
    path.canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn pools_and_commands_run_in_their_cwd_with_their_env_and_the_absolute_queue() {
    let env = Env::new();
    let conf = env.path("conf");
    std::fs::create_dir_all(conf.join("app")).unwrap();
    std::fs::create_dir_all(conf.join("work")).unwrap();
    std::fs::write(conf.join("app/where_tasks.py"), WHERE_TASKS).unwrap();
    // Relative paths in the file are relative to conf/, whatever the daemon's directory.
    std::fs::write(
        conf.join("foreman.toml"),
        format!(
            r#"
db = "../q.sqlite3"
workers = 2
[pools.py]
command = ["python3", "-m", "foreman_worker", "where_tasks"]
cwd = "app"
env = {{ GREETING = "hello from the pool" }}
processes = 1
[tasks.where]
command = ["sh", "-c", "pwd > where.txt; echo \"$GREETING|$FOREMAN_DB|$FOREMAN_WAKEUP_DIR\" >> where.txt"]
cwd = "work"
env = {{ GREETING = "hi" }}
[tasks.chain]
command = ["{BIN}", "enqueue", "where_tasks.report", "[\"chained\"]"]
cwd = "work"
"#
        ),
    )
    .unwrap();
    // Started from the temp dir with the config given relative to it, and no --db: the
    // database is the file's, conf/../q.sqlite3.
    let mut cmd = env.command_without_db(&[
        "run",
        "--log-level",
        "debug",
        "--config",
        "conf/foreman.toml",
    ]);
    cmd.env("PYTHONPATH", &*crate::support::PYTHON_CLIENT);
    let daemon = Daemon::spawn(cmd);
    daemon.expect_log("pool py: worker pid");
    let db = canonical(env.path("q.sqlite3"));
    let wakeup = canonical(env.path("q.sqlite3.wakeup"));

    env.insert("where_tasks.report", r#"["direct"]"#);
    env.insert("where", "[]");
    env.touch_wakeup("w");
    let report = wait_report(&env, "direct", &daemon);
    assert_eq!(
        canonical(report["cwd"].as_str().unwrap()),
        canonical(conf.join("app"))
    );
    assert_eq!(report["GREETING"], "hello from the pool");
    let foreman_db = report["FOREMAN_DB"].as_str().unwrap();
    assert!(Path::new(foreman_db).is_absolute(), "{foreman_db}");
    assert_eq!(canonical(foreman_db), db);
    assert_eq!(
        canonical(report["FOREMAN_WAKEUP_DIR"].as_str().unwrap()),
        wakeup
    );

    let written = conf.join("work/where.txt");
    assert!(
        wait_until(PATIENCE, || std::fs::read_to_string(&written)
            .is_ok_and(|s| s.lines().count() == 2)),
        "the command task did not run; log:\n{}",
        daemon.log()
    );
    let text = std::fs::read_to_string(&written).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(canonical(lines[0]), canonical(conf.join("work")));
    let parts: Vec<&str> = lines[1].split('|').collect();
    assert_eq!(parts[0], "hi");
    assert_eq!(canonical(parts[1]), db);
    assert_eq!(canonical(parts[2]), wakeup);

    // A task that enqueues from its own directory reaches this daemon's queue, not a new
    // ./foreman.sqlite3 there.
    env.insert("chain", "[]");
    env.touch_wakeup("w");
    wait_report(&env, "chained", &daemon);
    assert!(!conf.join("work/foreman.sqlite3").exists());
    daemon.stop();
}

#[test]
fn a_cwd_the_daemon_cannot_enter_is_a_config_error_naming_the_key() {
    let t = Unprivileged::new();
    let missing = t.env.path("missing");
    let closed = t.env.path("closed");
    std::fs::create_dir(&closed).unwrap();
    // No search permission for anyone but root: the daemon, not root here, cannot enter it.
    chmod(&closed, 0o600);
    for (dir, why) in [
        (&missing, "which does not exist".to_owned()),
        (
            &closed,
            format!(
                "which the daemon (uid {}) cannot enter: Permission denied",
                t.uid
            ),
        ),
    ] {
        t.env.config(&format!(
            "[tasks.t]\ncommand = [\"true\"]\ncwd = \"{}\"",
            dir.display()
        ));
        for command in ["check-config", "run"] {
            let (code, err) = finish(t.command(&[command]), &t.env);
            assert_eq!(code, Some(2), "{command}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "{command}: {err}");
            let expected = format!("key `tasks.\"t\".cwd` names \"{}\", {why}", dir.display());
            assert!(err.contains(&expected), "{command}: {err}");
        }
    }
}

#[test]
fn a_task_that_enqueues_reaches_the_daemons_queue_whoever_named_the_database() {
    // A command task (no cwd: it runs where the daemon does) that enqueues with the CLI, which
    // finds no foreman.toml there: only FOREMAN_DB can lead it to the daemon's queue.
    let chain = format!(
        "[tasks.chain]\ncommand = [\"{BIN}\", \"enqueue\", \"record\"]\n{}",
        crate::support::RECORD_TASK
    );
    for (how, config_dir, args) in [
        // The database named relative to the config file, which is in a directory of its own.
        (
            "by the config file",
            "conf",
            vec!["--config", "conf/foreman.toml"],
        ),
        // The database named by a relative flag.
        (
            "by a relative --db",
            "conf",
            vec!["--config", "conf/foreman.toml", "--db", "q2.sqlite3"],
        ),
    ] {
        let env = Env::new();
        let conf = env.path(config_dir);
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(
            conf.join("foreman.toml"),
            format!("db = \"q.sqlite3\"\n{chain}"),
        )
        .unwrap();
        let mut full = vec!["run"];
        full.extend(args.iter().copied());
        let daemon = Daemon::spawn(env.command_without_db(&full));
        let db = if args.contains(&"--db") {
            env.path("q2.sqlite3")
        } else {
            conf.join("q.sqlite3")
        };
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute("INSERT INTO foreman_task(task_name) VALUES ('chain')", [])
            .unwrap();
        let mut wakeup = db.clone().into_os_string();
        wakeup.push(".wakeup");
        std::fs::write(PathBuf::from(wakeup).join("w"), "").unwrap();
        assert!(
            wait_until(PATIENCE, || std::fs::read_to_string(env.path("ran.txt"))
                .is_ok_and(|s| s.lines().count() == 1)),
            "{how}: the chained task never ran; log:\n{}",
            daemon.log()
        );
        assert!(
            !env.path("foreman.sqlite3").exists(),
            "{how}: a second queue was made"
        );
        daemon.stop();
    }
}
