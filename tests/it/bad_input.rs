//! Bad input from every side: rows the daemon cannot run, database files and configs it cannot
//! use, wakeup dirs it must not trust, workers that write garbage, and task arguments full of shell
//! metacharacters. Each gets one line naming what is wrong, nothing is lost, and the daemon keeps
//! running where it can.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::{Value, json};

use crate::support::{Env, PATIENCE, RECORD_TASK, finish, is_dead, wait_until};

/// Runs `foreman ARGS` that must stop by itself (a refusal), killing it after `PATIENCE` so a
/// daemon that wrongly starts cannot hang the test. Returns the exit code and the stderr lines.
fn refused(env: &Env, args: &[&str]) -> (Option<i32>, Vec<String>) {
    let (code, err) = finish(env.command(args), env);
    (code, err.lines().map(str::to_owned).collect())
}

/// The one error line of a refusal, without its timestamp; fails unless there is exactly one line.
fn one_error_line(args: &[&str], lines: &[String]) -> String {
    assert_eq!(
        lines.len(),
        1,
        "foreman {args:?}: one line expected: {lines:#?}"
    );
    let (_, message) = lines[0]
        .split_once(" ERROR] ")
        .unwrap_or_else(|| panic!("foreman {args:?}: not an error line: {}", lines[0]));
    message.to_owned()
}

fn expect_refusal(env: &Env, args: &[&str], code: i32, needles: &[&str]) -> String {
    let (status, lines) = refused(env, args);
    let message = one_error_line(args, &lines);
    assert_eq!(status, Some(code), "foreman {args:?}: {message}");
    for needle in needles {
        assert!(
            message.contains(needle),
            "foreman {args:?}: no {needle:?} in: {message}"
        );
    }
    message
}

fn count(env: &Env, sql: &str) -> i64 {
    env.sql().query_row(sql, [], |r| r.get(0)).unwrap()
}

const MB10: usize = 10 * 1024 * 1024;

fn n(len: usize) -> i64 {
    i64::try_from(len).unwrap()
}

/// Rows a producer may store that cannot run: (task_name, args, kwargs) as SQL expressions, and
/// the start of the reason.
const BAD_ROWS: &[(&str, &str, &str, &str)] = &[
    (
        "'no.such.task'",
        "'[]'",
        "'{}'",
        "unknown task name \"no.such.task\"",
    ),
    ("''", "'[]'", "'{}'", "task_name is empty"),
    (
        "printf('%.*c', 100000, 'n')",
        "'[]'",
        "'{}'",
        "task_name is 100000 bytes long (at most 1024)",
    ),
    (
        "'record' || char(0) || 'x'",
        "'[]'",
        "'{}'",
        "task_name contains the control character U+0000",
    ),
    (
        "'record' || char(10) || 'forged log line'",
        "'[]'",
        "'{}'",
        "task_name contains the control character U+000A",
    ),
    ("X'72ff'", "'[]'", "'{}'", "task_name is not valid UTF-8"),
    (
        "CAST(X'72ff' AS TEXT)",
        "'[]'",
        "'{}'",
        "task_name is not valid UTF-8",
    ),
    (
        "'record'",
        "'[1,'",
        "'{}'",
        "args is not valid JSON: EOF while parsing a value at line 1 column 3",
    ),
    (
        "'record'",
        "'{\"a\":1}'",
        "'{}'",
        "args is not a JSON array (got an object)",
    ),
    (
        "'record'",
        "'\"[]\"'",
        "'{}'",
        "args is not a JSON array (got a string)",
    ),
    (
        "'record'",
        "'null'",
        "'{}'",
        "args is not a JSON array (got null)",
    ),
    (
        "'record'",
        "'5'",
        "'{}'",
        "args is not a JSON array (got a number)",
    ),
    (
        "'record'",
        "'[]'",
        "'[1]'",
        "kwargs is not a JSON object (got an array)",
    ),
    (
        "'record'",
        "'[]'",
        "'nope'",
        "kwargs is not valid JSON: expected ident",
    ),
    (
        "'record'",
        "'[\"a' || char(0) || 'b\"]'",
        "'{}'",
        "args is not valid JSON: control character (\\u0000-\\u001F) found while parsing a string at line 1 column 4",
    ),
    (
        "'record'",
        "X'5b22ff225d'",
        "'{}'",
        "args is not valid UTF-8",
    ),
    // Text that is not UTF-8 (what a C producer may bind): it once failed every pop for good.
    (
        "'record'",
        "CAST(X'5b22ff225d' AS TEXT)",
        "'{}'",
        "args is not valid UTF-8",
    ),
    (
        "'record'",
        "'[]'",
        "CAST(X'7bff7d' AS TEXT)",
        "kwargs is not valid UTF-8",
    ),
    (
        "'record'",
        "'[' || printf('%.*c', 10485760, 'x') || ']'",
        "'{}'",
        "args is not valid JSON: expected value at line 1 column 2",
    ),
];

#[test]
fn rows_that_cannot_run_are_dead_lettered_as_stored_with_one_line_each_and_the_rest_run() {
    let env = Env::new();
    env.record_config(
        "[tasks.size]\ncommand = [\"sh\", \"-c\", \"wc -c > \\\"$RECORD_FILE.$FOREMAN_TASK_ID.size\\\"\"]\n",
    );
    env.init();
    let conn = env.sql();
    let insert = |id: Option<i64>, name: &str, args: &str, kwargs: &str| -> i64 {
        let id = id.map_or("NULL".to_owned(), |id| id.to_string());
        conn.query_row(
            &format!(
                "INSERT INTO foreman_task(id, task_name, args, kwargs) VALUES ({id}, {name}, {args}, {kwargs}) RETURNING id"
            ),
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    // Good rows around and between the bad ones, some with explicit ids, out of order.
    let mut good = vec![insert(Some(1000), "'record'", "'[]'", "'{}'")];
    let mut expected = Vec::new();
    for (i, (name, args, kwargs, reason)) in BAD_ROWS.iter().enumerate() {
        expected.push((insert(None, name, args, kwargs), *reason));
        if i % 6 == 0 {
            good.push(insert(Some(500 - n(i)), "'record'", "'[]'", "'{}'"));
        }
    }
    good.push(insert(None, "'record'", "X'5b5d'", "'{}'")); // A BLOB of UTF-8 JSON is fine.
    good.push(insert(None, "'record'", "'[\"\\u0000\"]'", "'{}'")); // An escaped NUL is JSON.
    let big = insert(
        None,
        "'size'",
        &format!("'[\"' || printf('%.*c', {MB10}, 'y') || '\"]'"),
        "'{}'",
    );
    good.push(insert(Some(3), "'record'", "'[]'", "'{}'"));
    // What a producer gets for a NULL name: the constraint's one line, and nothing queued.
    let null = conn
        .execute("INSERT INTO foreman_task(task_name) VALUES (NULL)", [])
        .unwrap_err()
        .to_string();
    assert_eq!(null, "NOT NULL constraint failed: foreman_task.task_name");
    conn.execute_batch("CREATE TABLE stored AS SELECT * FROM foreman_task")
        .unwrap();

    let daemon = env.daemon(&[]);
    let mut ran = env.wait_ran(good.len());
    ran.sort_unstable();
    good.sort_unstable();
    assert_eq!(ran, good, "every good row runs once, whatever its id");
    let size_file = env.path(&format!("ran.txt.{big}.size"));
    assert!(wait_until(PATIENCE, || std::fs::read_to_string(&size_file)
        .is_ok_and(|s| s.ends_with('\n'))));
    let size: usize = std::fs::read_to_string(&size_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        size > MB10,
        "the 10 MB argument reached the command: {size} bytes"
    );
    assert!(wait_until(PATIENCE, || env.queued() == 0));

    for (id, reason) in &expected {
        let got: String = conn
            .query_row(
                "SELECT reason FROM foreman_dead WHERE task_id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap_or_else(|e| panic!("task {id} ({reason}) is not a dead letter: {e}"));
        assert!(
            got.starts_with(reason),
            "task {id}: {got:?} should start with {reason:?}"
        );
    }
    // Nothing lost: each dead letter holds the row's values with their bytes and types.
    let same = count(
        &env,
        "SELECT count(*) FROM stored s JOIN foreman_dead d ON d.task_id = s.id \
         WHERE d.task_name IS s.task_name AND d.args IS s.args AND d.kwargs IS s.kwargs \
         AND typeof(d.task_name) = typeof(s.task_name) AND typeof(d.args) = typeof(s.args) \
         AND typeof(d.kwargs) = typeof(s.kwargs) AND d.attempts = 0",
    );
    assert_eq!(same, n(expected.len()));
    assert_eq!(
        count(&env, "SELECT count(*) FROM foreman_dead"),
        n(expected.len())
    );
    // One short line each in the log, however long or odd the name.
    let buried = daemon.log_lines("moved to foreman_dead");
    assert_eq!(buried.len(), expected.len(), "{buried:#?}");
    assert!(buried.iter().all(|l| l.len() < 400), "{buried:#?}");
    assert!(!daemon.has_log("forged log line\n"));
    assert!(!daemon.has_log("cannot pop"), "{}", daemon.log());
    // The operator commands read those dead letters too, bytes that are not UTF-8 included.
    let listed: Value =
        serde_json::from_str(&env.ok(&["dead", "list", "--json", "--limit", "1000"])).unwrap();
    assert_eq!(listed["total"], json!(expected.len()));
    env.ok(&["status"]);
    daemon.stop();
}

/// What is wrong, how to make it so, the commands to try, and what each must say.
type DbCase = (
    &'static str,
    fn(&Env),
    &'static [&'static str],
    &'static str,
);

#[test]
fn database_files_it_cannot_use_stop_each_command_with_one_line() {
    let cases: [DbCase; 5] = [
        (
            "not SQLite",
            |env| std::fs::write(&env.db, "name,args\nsend_email,[]\n".repeat(100)).unwrap(),
            &["init", "run", "enqueue", "status"],
            "file is not a database",
        ),
        (
            "a table a producer made before init",
            |env| {
                rusqlite::Connection::open(&env.db)
                    .unwrap()
                    .execute_batch(
                        "CREATE TABLE foreman_task(id INTEGER PRIMARY KEY, task_name TEXT, args TEXT)",
                    )
                    .unwrap();
            },
            &["init", "run", "enqueue", "status"],
            "table foreman_task lacks column(s) kwargs, created_at, run_after, priority, attempt, origin, leased_at, unique_key, paused of schema version 4: it was not created by foreman",
        ),
        (
            "a table re-made without two columns after init",
            |env| {
                env.init();
                env.sql()
                    .execute_batch(
                        "DROP TABLE foreman_task; CREATE TABLE foreman_task(id INTEGER PRIMARY KEY, \
                         task_name TEXT, args TEXT, kwargs TEXT, created_at REAL, run_after REAL, attempt INTEGER, origin TEXT)",
                    )
                    .unwrap();
            },
            &["init", "run", "enqueue", "status"],
            "table foreman_task lacks column(s) priority, leased_at, unique_key, paused of schema version 4",
        ),
        (
            "a dropped table",
            |env| {
                env.init();
                env.sql().execute_batch("DROP TABLE foreman_dead").unwrap();
            },
            &["enqueue", "status"],
            "has no table foreman_dead (run `foreman init` to create it)",
        ),
        (
            "an empty file",
            |env| std::fs::write(&env.db, b"").unwrap(),
            &["enqueue", "status"],
            "has no foreman schema (run `foreman init`)",
        ),
    ];
    for (what, setup, commands, needle) in cases {
        let env = Env::new();
        setup(&env);
        for command in commands {
            let args: &[&str] = if *command == "enqueue" {
                &["enqueue", "foreman.echo"]
            } else {
                std::slice::from_ref(command)
            };
            let message = expect_refusal(&env, args, 1, &[needle, "q.sqlite3"]);
            assert!(message.starts_with("database "), "{what}: {message}");
        }
    }
    // An empty file is an empty SQLite database: `init` gives it the schema, and it works.
    let env = Env::new();
    std::fs::write(&env.db, b"").unwrap();
    env.init();
    let daemon = env.daemon(&[]);
    let id = env.insert("foreman.echo", "[]");
    env.touch_wakeup("w");
    daemon.expect_log(&format!("task {id} foreman.echo"));
    daemon.stop();
}

#[test]
fn configs_it_cannot_use_stop_run_and_check_config_with_exit_2_naming_file_and_key() {
    let env = Env::new();
    let not_executable = env.path("not-executable");
    std::fs::write(&not_executable, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&not_executable, std::fs::Permissions::from_mode(0o644)).unwrap();
    // The config, and what its one line must say (besides the file name).
    let cases: &[(&[u8], &str)] = &[
        (
            b"[tasks.t]\ncomand = [\"true\"]",
            "(line 2): key `tasks.t.comand`: unknown field `comand`, expected one of `command`",
        ),
        (
            b"[pools.p]\ncommand = [\"true\"]\nprocess = 2",
            "(line 3): key `pools.p.process`: unknown field `process`",
        ),
        (
            b"[tasks.myapp.send_email]\ncommand = [\"true\"]",
            "key `tasks.myapp.send_email`: unknown field `send_email`, expected one of `command`, `cwd`, `env`, `pool`, `timeout`, `max_retries`, `retry_backoff`, `delivery` (a name with dots must be quoted: [tasks.\"myapp.send_email\"])",
        ),
        (
            b"tick = true",
            "(line 1): key `tick`: expected a duration such as \"10s\" or a number of seconds",
        ),
        (
            b"[tasks.t]\ncommand = \"sh -c 'echo hi'\"",
            "key `tasks.t.command`: invalid type: string \"sh -c 'echo hi'\", expected a sequence",
        ),
        (
            b"[tasks.t]\ncommand = [\"true\"]\nmax_retries = \"3\"",
            "key `tasks.t.max_retries`: invalid type: string \"3\", expected u32",
        ),
        (
            b"[pools.p]\ncommand = [\"true\"]\nprocesses = -1",
            "key `pools.p.processes`: invalid value: integer `-1`, expected usize",
        ),
        (
            b"graceful_timeout = 18446744073709551615",
            "key `graceful_timeout`: invalid duration \"18446744073709551615\": out of range (at most 36500d)",
        ),
        (
            b"workers = 1\nworkers = 2",
            "(line 2: \"workers = 2\"): invalid TOML: duplicate key",
        ),
        (
            b"[tasks.t]\ntimeout = \"1s\"",
            "key `tasks.\"t\"` has no `command` or `pool`, and no in-process handler or pool serves it",
        ),
        (
            b"[tasks.t]\ncommand = []",
            "key `tasks.\"t\".command` is empty: expected [program, args…]",
        ),
        (
            b"[tasks.t]\ncommand = [\"./not-executable\"]",
            "key `tasks.\"t\".command` names \"./not-executable\", which is not an executable file",
        ),
        (
            b"[tasks.t]\ncommand = [\"/\"]",
            "key `tasks.\"t\".command` names \"/\", which is not an executable file",
        ),
        (
            b"[tasks.t]\ncommand = [\"no-such-program-anywhere\"]",
            "key `tasks.\"t\".command` names \"no-such-program-anywhere\", which is not an executable in PATH",
        ),
        (
            b"[pools.p]\ncommand = [\"/no/such/worker\"]",
            "key `pools.\"p\".command` names \"/no/such/worker\", which does not exist",
        ),
        (
            b"[tasks.\"a\\u0000b\"]\ncommand = [\"true\"]",
            "key `tasks` task name \"a\\0b\" contains the control character U+0000",
        ),
        (
            b"[schedules.s]\ntask = \"\"\nevery = \"1m\"",
            "key `schedules.\"s\".task` is empty",
        ),
        (
            b"workers = \"\xff\"",
            "cannot read config file foreman.toml: stream did not contain valid UTF-8",
        ),
    ];
    for (text, needle) in cases {
        std::fs::write(env.path("foreman.toml"), text).unwrap();
        for command in ["check-config", "run"] {
            let message = expect_refusal(&env, &[command], 2, &[needle]);
            assert!(message.contains("foreman.toml"), "{message}");
        }
    }
    expect_refusal(
        &env,
        &["--config", "nope.toml", "check-config"],
        2,
        &["cannot read config file nope.toml"],
    );
    assert!(
        !env.db.exists(),
        "a bad config must stop before anything is created"
    );
}

#[test]
fn a_symlinked_wakeup_dir_is_followed_to_its_private_target() {
    let env = Env::new();
    env.config(&format!("tick = \"1h\"\n{RECORD_TASK}"));
    let target = env.path("real-wakeup");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink("real-wakeup", &env.wakeup).unwrap();
    env.init();
    let daemon = env.daemon(&[]);
    let id = env.insert("record", "[]");
    // Through the link, as a producer would: with a 1 h tick, only inotify can run it.
    env.touch_wakeup("w");
    assert_eq!(env.wait_ran(1), [id]);
    assert!(
        std::fs::symlink_metadata(&env.wakeup)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    daemon.stop();
}

/// How to spoil the wakeup dir, the exit code, and what the one line must say.
type WakeupCase = (Box<dyn Fn(&Env)>, i32, &'static [&'static str]);

#[test]
fn wakeup_dirs_others_could_write_or_that_lead_nowhere_are_refused() {
    let world = |mode: u32| {
        move |env: &Env| {
            std::fs::create_dir(&env.wakeup).unwrap();
            std::fs::set_permissions(&env.wakeup, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    };
    let link_to = |setup: fn(&Path)| {
        move |env: &Env| {
            let target = env.path("target");
            setup(&target);
            std::os::unix::fs::symlink(&target, &env.wakeup).unwrap();
        }
    };
    let shared_dir: fn(&Path) = |p| {
        std::fs::create_dir(p).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o1777)).unwrap();
    };
    let nothing: fn(&Path) = |_| {};
    let file: fn(&Path) = |p| std::fs::write(p, b"").unwrap();
    let cases: Vec<WakeupCase> = vec![
        (
            Box::new(world(0o777)),
            2,
            &["is writable by every user (mode 0777)", "chmod o-w"],
        ),
        (
            Box::new(world(0o1733)),
            2,
            &["is writable by every user (mode 1733)"],
        ),
        (
            Box::new(link_to(shared_dir)),
            2,
            &["(a symlink to ", "target)", "writable by every user"],
        ),
        (
            Box::new(link_to(nothing)),
            1,
            &[
                "(a symlink to ",
                "points to nothing; create it (mkdir -m 0700 ",
            ],
        ),
        (
            Box::new(link_to(file)),
            1,
            &["(a symlink to ", "is not a directory"],
        ),
    ];
    for (setup, code, needles) in cases {
        let env = Env::new();
        setup(&env);
        for command in ["init", "run"] {
            let message = expect_refusal(&env, &[command], code, needles);
            assert!(
                message.starts_with(&format!("wakeup dir {}", env.wakeup.display())),
                "{message}"
            );
        }
    }
}

#[test]
fn a_symlink_to_a_wakeup_dir_of_another_user_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to chown");
        return;
    }
    let env = Env::new();
    let target = env.path("theirs");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::chown(&target, Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::symlink(&target, &env.wakeup).unwrap();
    expect_refusal(
        &env,
        &["run"],
        2,
        &[
            "(a symlink to ",
            "is owned by uid 65534, not by this user (uid 0); refusing it",
        ],
    );
}

/// A worker that breaks the protocol in every way but one, chosen by the task's name.
const GARBAGE_WORKER: &str = r#"
import json, os, sys, time
print(json.dumps({"protocol": 1, "tasks": ["raw.ok", "raw.binary", "raw.huge", "raw.closed", "raw.twice", "raw.quits"]}), flush=True)
out = sys.stdout.buffer
for line in sys.stdin:
    task = json.loads(line)
    name, answer = task["task_name"], (json.dumps({"id": task["id"], "ok": True}) + "\n").encode()
    with open(os.environ["RECORD_FILE"], "a") as f:
        f.write("%s %d\n" % (task["args"][0], os.getpid()))
    if name == "raw.binary":
        out.write(b"\xff\xfe\x00\x01garbage\n")
    elif name == "raw.huge":
        out.write(b"x" * (10 << 20) + b"\n")
    elif name == "raw.closed":
        out.flush(); os.close(1); time.sleep(60)
    elif name == "raw.quits":
        sys.exit(0)
    elif name == "raw.twice":
        out.write(answer + answer)
    else:
        out.write(answer)
    out.flush()
"#;

#[test]
fn garbage_from_a_worker_fails_that_task_clearly_and_a_new_worker_takes_over() {
    let env = Env::new();
    std::fs::write(env.path("garbage_worker.py"), GARBAGE_WORKER).unwrap();
    env.config("[pools.raw]\ncommand = [\"python3\", \"garbage_worker.py\"]\nprocesses = 1\n");
    env.init();
    let daemon = env.daemon(&[]);
    daemon.expect_log("pool raw: worker pid");
    let broken = [
        (
            "raw.binary",
            "worker protocol error: expected value at line 1 column 1: \"\u{fffd}\u{fffd}\\0\\u{1}garbage\"",
        ),
        (
            "raw.huge",
            "worker protocol error: an answer line longer than 1 MiB",
        ),
        ("raw.closed", "closed its stdout without answering"),
        ("raw.quits", "died during the task (exited with status 0)"),
    ];
    let conn = env.sql();
    let enqueue = |name: &str, tag: &str| -> i64 {
        conn.query_row(
            "INSERT INTO foreman_task(task_name, args) VALUES (?1, json_array(?2)) RETURNING id",
            [name, tag],
            |r| r.get(0),
        )
        .unwrap()
    };
    // With one process, the tasks run in this order, each garbage one followed by a good one.
    let mut ids = Vec::new();
    for (i, (name, _)) in broken.iter().enumerate() {
        ids.push(enqueue(name, &format!("bad{i}")));
        enqueue("raw.ok", &format!("ok{i}"));
    }
    enqueue("raw.twice", "twice");
    enqueue("raw.ok", "after-twice");
    env.touch_wakeup("w");
    let records = || -> Vec<(String, i32)> {
        std::fs::read_to_string(env.path("ran.txt"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(tag, pid)| (tag.to_owned(), pid.parse().unwrap()))
            .collect()
    };
    assert!(
        wait_until(PATIENCE, || records()
            .iter()
            .any(|(tag, _)| tag == "after-twice")),
        "{:?}\n{}",
        records(),
        daemon.log()
    );
    let records = records();
    let pid_of = |tag: &str| records.iter().find(|(t, _)| t == tag).unwrap().1;
    for (i, ((_, reason), id)) in broken.iter().zip(&ids).enumerate() {
        let got = env.dead_reason(*id).unwrap();
        assert!(got.contains(reason), "task {id}: {got:?} lacks {reason:?}");
        assert!(!got.contains('\n'), "{got:?}");
        // The worker that broke is gone, and the next task ran on a new one.
        let bad = pid_of(&format!("bad{i}"));
        assert_ne!(pid_of(&format!("ok{i}")), bad);
        assert!(wait_until(PATIENCE, || is_dead(bad)));
    }
    // A second answer is caught before the next task is written: that task runs elsewhere, ok.
    assert_ne!(pid_of("after-twice"), pid_of("twice"));
    daemon.expect_log("wrote to its stdout between tasks");
    assert_eq!(
        count(&env, "SELECT count(*) FROM foreman_dead"),
        n(broken.len())
    );
    // Every good task, "twice" and "after-twice" included, is recorded done.
    let done = || {
        count(
            &env,
            "SELECT count(*) FROM foreman_run WHERE state = 'done'",
        )
    };
    assert!(
        wait_until(PATIENCE, || done() == n(broken.len()) + 2),
        "{}",
        done()
    );
    assert_eq!(
        count(&env, "SELECT count(*) FROM foreman_dead"),
        n(broken.len())
    );
    daemon.stop();
}

/// Strings a shell would expand, split, glob or execute; none of it may happen.
fn hostile_args(dir: &Path) -> (Value, Value) {
    let d = dir.display();
    let args = json!([
        format!("$(touch {d}/pwned-1)"),
        format!("`touch {d}/pwned-2`"),
        format!("; touch {d}/pwned-3 #"),
        format!("x && touch {d}/pwned-4 || y"),
        "' \" \\ | & > < ? ~ ! %s %n {a,b} $HOME ${PATH}",
        "*",
        "a\nb\tc\rd",
        "\u{0}\u{1b}[31m",
        "ünï €𝄞 \u{202e}",
        -0.0,
        9.706_208_360_911_635e299,
        [format!("$(touch {d}/pwned-5)")],
    ]);
    let kwargs = json!({ "$(id)": "`id`", "k\"ey'": "v;al|", "*": null });
    (args, kwargs)
}

#[test]
fn shell_metacharacters_reach_a_command_and_a_pool_task_byte_for_byte() {
    let env = Env::new();
    std::fs::write(
        env.path("capture.py"),
        "import json, os\nfrom foreman_worker import task\n\n@task\ndef capture(*args, **kwargs):\n    \
         with open(os.environ['RECORD_FILE'] + '.pool', 'w') as f:\n        json.dump([list(args), kwargs], f)\n",
    )
    .unwrap();
    env.config(
        r#"
[tasks."app.stdin"]
command = ["sh", "-c", "cat > \"$RECORD_FILE.$FOREMAN_TASK_ID\""]
[pools.py]
command = ["python3", "-m", "foreman_worker", "capture"]
processes = 1
"#,
    );
    env.init();
    let (args, kwargs) = hostile_args(env.dir.path());
    let daemon = env.daemon(&[]);
    daemon.expect_log("pool py: worker pid");
    let insert = |name: &str| -> i64 {
        env.sql()
            .query_row(
                "INSERT INTO foreman_task(task_name, args, kwargs) VALUES (?1, ?2, ?3) RETURNING id",
                [name, &args.to_string(), &kwargs.to_string()],
                |r| r.get(0),
            )
            .unwrap()
    };
    let id = insert("app.stdin");
    insert("capture.capture");
    env.touch_wakeup("w");
    // The command reads exactly the documented line, byte for byte.
    let stdin_file = env.path(&format!("ran.txt.{id}"));
    assert!(wait_until(PATIENCE, || std::fs::read(&stdin_file)
        .is_ok_and(|b| b.ends_with(b"\n"))));
    let want = format!(
        "{}\n",
        json!({"args": args, "id": id, "kwargs": kwargs, "task_name": "app.stdin"})
    );
    assert_eq!(
        String::from_utf8(std::fs::read(&stdin_file).unwrap()).unwrap(),
        want
    );
    // The Python handler gets the same strings, code point for code point.
    let pool_file = env.path("ran.txt.pool");
    assert!(wait_until(PATIENCE, || std::fs::read_to_string(&pool_file)
        .is_ok_and(|s| serde_json::from_str::<Value>(&s).is_ok())));
    let got: Value = serde_json::from_str(&std::fs::read_to_string(&pool_file).unwrap()).unwrap();
    assert_eq!(got, json!([args, kwargs]));
    assert_eq!(got[0][10].as_f64(), Some(9.706_208_360_911_635e299));
    let done = || {
        count(
            &env,
            "SELECT count(*) FROM foreman_run WHERE state = 'done'",
        )
    };
    assert!(wait_until(PATIENCE, || done() == 2), "{}", done());
    for n in 1..=5 {
        assert!(
            !env.path(&format!("pwned-{n}")).exists(),
            "pwned-{n}: a shell ran"
        );
    }
    daemon.stop();
}
