//! `foreman bench`: the CI smoke run (`--quick --json`: every scenario runs correctly, no timing
//! asserted), its clean-up, `--db`, a missing python3, usage errors, and the `foreman.bench` task
//! it counts starts with.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::support::{BIN, Env, PATIENCE, stderr, wait_until};

/// The real binary with nothing of the caller's environment but `PATH`, its temp dir in `tmp`.
fn bench(tmp: &Path, path: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("bench")
        .args(args)
        .env_clear()
        .env("PATH", path)
        .env("TMPDIR", tmp)
        .stdin(Stdio::null())
        .output()
        .expect("run foreman bench")
}

/// The scenarios' JSON lines of a `--json` run, after checking that it exited 0 and that its
/// first line says what the machine allows.
fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "foreman bench failed ({}):\n{text}\n{}",
        out.status,
        stderr(out)
    );
    let mut lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(!lines.is_empty(), "no output");
    let machine = lines.remove(0);
    let machine = &machine["machine"];
    for key in ["thread_wake_us", "inotify_wake_us"] {
        for quantile in ["p50", "p99"] {
            let value = machine[key][quantile].as_f64();
            assert!(
                value.is_some_and(|v| v.is_finite() && v >= 0.0),
                "{machine}"
            );
        }
    }
    for key in ["pop_limit_4_rows_per_s", "pop_limit_256_rows_per_s"] {
        assert!(machine[key].as_f64().is_some_and(|v| v > 0.0), "{machine}");
    }
    lines
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("foreman-bench-"))
        .collect()
}

#[test]
fn quick_bench_runs_every_scenario_correctly_and_cleans_up() {
    let env = Env::new();
    let path = std::env::var("PATH").unwrap_or_default();
    let out = bench(env.dir.path(), &path, &["--quick", "--json"]);
    let lines = json_lines(&out);
    let names: Vec<&str> = lines
        .iter()
        .map(|l| l["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "drain-inproc",
            "drain-pool",
            "drain-command",
            "cpu-per-task",
            "enqueue",
            "enqueue-batch",
            "latency",
            "idle",
            "rss",
            "startup",
            "depth",
            "delay",
            "list"
        ]
    );
    for line in &lines {
        assert_eq!(line["ok"], true, "{line}");
        assert_eq!(line["error"], serde_json::Value::Null, "{line}");
        assert_eq!(line["reps"], 1, "{line}");
        // python3 is there (the tests need it), so nothing is skipped and every figure is a number.
        assert_eq!(line["skipped"], serde_json::Value::Null, "{line}");
        let figures = line["figures"].as_array().unwrap();
        assert!(!figures.is_empty(), "{line}");
        for figure in figures {
            assert!(
                figure["median"].as_f64().is_some_and(f64::is_finite),
                "{line}"
            );
            assert!(figure["unit"].is_string(), "{line}");
        }
        assert_eq!(line["figure"], figures[0]["figure"], "{line}");
    }
    assert!(leftovers(env.dir.path()).is_empty());
}

#[test]
fn bench_puts_its_databases_at_db_and_removes_them() {
    let env = Env::new();
    let out = env
        .command(&["bench", "--quick", "--json", "startup", "enqueue-batch"])
        .env("TMPDIR", env.dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["ok"] == true), "{lines:?}");
    assert!(!env.db.exists());
    assert!(!env.wakeup.exists());
    assert!(leftovers(env.dir.path()).is_empty());
}

#[test]
fn an_existing_db_is_never_used_by_the_bench() {
    let env = Env::new();
    env.init();
    let out = env.run(&["bench", "--quick", "startup"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("exists"), "{}", stderr(&out));
    assert_eq!(env.queued(), 0, "the database is still there");
}

#[test]
fn without_python3_the_python_figures_are_skipped_not_failed() {
    let env = Env::new();
    // An empty PATH: no python3 (the daemon is this executable and /bin/true is absolute).
    let out = bench(
        env.dir.path(),
        "",
        &["--quick", "--json", "drain-pool", "enqueue-batch"],
    );
    let lines = json_lines(&out);
    assert_eq!(lines[0]["scenario"], "drain-pool");
    assert_eq!(lines[0]["ok"], true);
    assert!(lines[0]["skipped"].as_str().unwrap().contains("python3"));
    assert_eq!(lines[1]["scenario"], "enqueue-batch");
    let figures: Vec<&str> = lines[1]["figures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["figure"].as_str().unwrap())
        .collect();
    assert_eq!(figures, ["rust"]);
    assert!(lines[1]["notes"][0].as_str().unwrap().contains("skipped"));
}

#[test]
fn an_unknown_scenario_is_a_usage_error() {
    let env = Env::new();
    let out = env.run(&["bench", "drain-everything"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("drain-inproc"), "{}", stderr(&out));
}

#[test]
fn foreman_bench_task_appends_its_id_and_start_time() {
    let env = Env::new();
    env.init();
    let out_file = env.path("started.txt");
    let mut daemon = env
        .command(&["run"])
        .env("FOREMAN_BENCH_OUT", &out_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let ids = [
        env.insert("foreman.bench", "[]"),
        env.insert("foreman.bench", "[]"),
    ];
    env.touch_wakeup("t");
    let read = || std::fs::read_to_string(&out_file).unwrap_or_default();
    let ran = wait_until(PATIENCE, || read().lines().count() == 2);
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(ran, "records: {:?}", read());
    let mut seen = Vec::new();
    for line in read().lines() {
        let (id, at) = line.split_once(' ').unwrap();
        let (secs, micros) = at.split_once('.').unwrap();
        assert_eq!(micros.len(), 6, "{line}");
        let at: f64 = format!("{secs}.{micros}").parse().unwrap();
        assert!((before - 1.0..before + 60.0).contains(&at), "{line}");
        seen.push(id.parse::<i64>().unwrap());
    }
    seen.sort_unstable();
    assert_eq!(seen, ids);
}

#[test]
fn foreman_bench_task_fails_clearly_without_its_variable() {
    let env = Env::new();
    env.init();
    let daemon = env.daemon(&[]);
    let id = env.insert("foreman.bench", "[]");
    env.touch_wakeup("t");
    let out = env.run(&["wait", &id.to_string(), "--timeout", "30s"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(said.contains("FOREMAN_BENCH_OUT"), "{said}");
    daemon.stop();
}
