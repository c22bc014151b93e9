//! The Django and Flask example apps (`examples/`), end to end against the real binary. Each is a
//! Python unittest file in `examples/tests`, run by the Python named by `FOREMAN_PYTHON`, else
//! that of `/opt/foreman-venv` (where `.ci/python-venv` puts `examples/requirements.txt`) if there
//! is one, else `python3`.
//! Without Django or Flask there, a test prints a notice and passes, unless
//! `FOREMAN_PY_TESTS=required` (as in CI), which makes it fail.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::support::{BIN, stderr};

fn required() -> bool {
    std::env::var("FOREMAN_PY_TESTS").as_deref() == Ok("required")
}

/// Runs `examples/tests/{module}.py`, unless the Python cannot import `imports`.
fn run_example_tests(module: &str, imports: &str) {
    let venv = "/opt/foreman-venv/bin/python";
    let python = std::env::var("FOREMAN_PYTHON").unwrap_or_else(|_| {
        let found = Path::new(venv).exists();
        (if found { venv } else { "python3" }).to_owned()
    });
    let probe = Command::new(&python)
        .args(["-c", &format!("import {imports}")])
        .stdin(Stdio::null())
        .output();
    let missing = match &probe {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(stderr(out).trim().lines().last().unwrap_or("").to_owned()),
        Err(err) => Some(err.to_string()),
    };
    if let Some(why) = missing {
        let notice = format!(
            "{module}: {python} cannot import {imports} ({why}); make a virtualenv with \
             .ci/python-venv and set FOREMAN_PYTHON to its python"
        );
        assert!(!required(), "{notice} (FOREMAN_PY_TESTS=required)");
        eprintln!("notice: skipped {notice}");
        return;
    }
    let out = Command::new(&python)
        .args(["-m", "unittest", "-v", module])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tests"))
        .env("FOREMAN_BIN", BIN)
        // No __pycache__ in the examples from the web app, manage.py or the pool workers.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run python");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(out.status.success(), "{module} failed:\n{report}");
    // Something else missing (a PostgreSQL server) skips inside; `required` fails there instead.
    if report.contains("skipped") {
        eprintln!("notice: {module} skipped tests:\n{report}");
    }
}

#[test]
fn the_django_example_runs_end_to_end() {
    run_example_tests("test_django", "django, psycopg");
}

#[test]
fn the_flask_example_runs_end_to_end() {
    run_example_tests("test_flask", "flask, flask_sqlalchemy, sqlalchemy");
}
