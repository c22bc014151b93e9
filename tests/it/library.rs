//! The library API: in-process Rust handlers registered in a `Registry`, run by `foreman::run`
//! inside the test process, against a real DB and wakeup dir.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use foreman::{Config, Overrides, Registry, Shutdown};

use crate::support::{Env, PATIENCE, wait_until};

#[test]
fn in_process_handlers_run_and_a_panic_frees_the_slot() {
    let env = Env::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let registry = Registry::new()
        .register("app.add", move |task| {
            let sum: i64 = task.args.iter().filter_map(serde_json::Value::as_i64).sum();
            sink.lock().unwrap().push((task.id, sum));
            Ok(())
        })
        .register("app.panics", |_| panic!("handler bug"))
        .register("app.fails", |_| Err("no such user".into()));
    let overrides = Overrides {
        db: Some(env.db.clone().into()),
        workers: Some(1),
        tick: Some(Duration::from_millis(50)),
        ..Overrides::default()
    };
    let config = Config::load(None, &overrides).unwrap();
    let (stop, shutdown) = crossbeam_channel::unbounded();
    let daemon = std::thread::spawn(move || foreman::run(&config, registry, &shutdown));
    assert!(wait_until(PATIENCE, || env.db.exists()
        && env
            .sql()
            .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
            .unwrap()
            == foreman::store::SCHEMA_VERSION));
    // One worker: if the panic did not free its slot, the later task would never run.
    env.insert("app.panics", "[]");
    env.insert("app.fails", "[]");
    let id = env.insert("app.add", "[1, 2, 39]");
    assert!(wait_until(PATIENCE, || !seen.lock().unwrap().is_empty()));
    assert_eq!(*seen.lock().unwrap(), vec![(id, 42)]);
    // The panic cost the daemon nothing: its heartbeat moves, no task waits.
    env.assert_healthy();
    stop.send(Shutdown(libc::SIGTERM)).unwrap();
    assert!(daemon.join().unwrap().is_ok());
}

/// A daemon running `registry` in this process, on `env`'s database; stopped by `stop`.
struct InProcess {
    stop: crossbeam_channel::Sender<Shutdown>,
    daemon: std::thread::JoinHandle<foreman::Result<()>>,
}

impl InProcess {
    fn start(env: &Env, registry: Registry) -> InProcess {
        env.init();
        let overrides = Overrides {
            db: Some(env.db.clone().into()),
            workers: Some(2),
            tick: Some(Duration::from_millis(50)),
            ..Overrides::default()
        };
        let config = Config::load(None, &overrides).unwrap();
        let (stop, shutdown) = crossbeam_channel::unbounded();
        let daemon = std::thread::spawn(move || foreman::run(&config, registry, &shutdown));
        InProcess { stop, daemon }
    }

    fn stop(self) {
        self.stop.send(Shutdown(libc::SIGTERM)).unwrap();
        assert!(self.daemon.join().unwrap().is_ok());
    }
}

#[test]
fn the_client_enqueues_and_waits_for_an_in_process_result() {
    use foreman::{Client, TaskError, TaskSpec};
    use serde_json::json;

    let env = Env::new();
    let registry = Registry::new()
        .register_with_result("app.add", |task| {
            let sum: i64 = task.args.iter().filter_map(serde_json::Value::as_i64).sum();
            let scale = task.kwargs.get("scale").and_then(serde_json::Value::as_i64);
            Ok(json!({"sum": sum * scale.unwrap_or(1)}))
        })
        .register_with_result("app.big", |_| Ok(json!("x".repeat(70_000))))
        .register("app.fails", |_| Err("no such user".into()));
    let daemon = InProcess::start(&env, registry);
    let client = Client::open(&env.db).unwrap();
    let add = client
        .enqueue(
            &TaskSpec::new("app.add")
                .args((1, 2))
                .kwargs(json!({"scale": 10})),
        )
        .unwrap();
    assert!(add.created);
    assert_eq!(
        client.wait(add.id, PATIENCE).unwrap(),
        Some(json!({"sum": 30}))
    );
    // Several in one transaction, one of them twice by its unique key.
    let keyed = TaskSpec::new("app.add")
        .args([5])
        .unique_key("five")
        .delay(Duration::from_hours(1));
    let many = client
        .enqueue_many(&[keyed.clone(), TaskSpec::new("app.add").args([7]), keyed])
        .unwrap();
    assert_eq!(
        (many[0].created, many[1].created, many[2].created),
        (true, true, false)
    );
    assert_eq!(many[2].id, many[0].id);
    assert_eq!(
        client.wait(many[1].id, PATIENCE).unwrap(),
        Some(json!({"sum": 7}))
    );
    match client.wait(many[0].id, Duration::from_millis(100)) {
        Err(foreman::Error::Task(TaskError::StillWaiting { state, .. })) => {
            assert_eq!(state, "delayed");
        }
        other => panic!("{other:?}"),
    }
    let fails = client.enqueue(&TaskSpec::new("app.fails")).unwrap();
    match client.wait(fails.id, PATIENCE) {
        Err(foreman::Error::Task(TaskError::Failed { state, error, .. })) => {
            assert_eq!(
                (state.as_str(), error.as_deref()),
                ("failed", Some("no such user"))
            );
        }
        other => panic!("{other:?}"),
    }
    // A result over 64 KiB fails the attempt rather than being cut.
    let big = client.enqueue(&TaskSpec::new("app.big")).unwrap();
    let err = client.wait(big.id, PATIENCE).unwrap_err().to_string();
    assert!(err.contains("over the limit of 65536"), "{err}");
    assert!(matches!(
        client.wait(123_456, PATIENCE),
        Err(foreman::Error::Task(TaskError::Unknown {
            task_id: 123_456
        }))
    ));
    // Bad input is refused before anything is written.
    for bad in [
        TaskSpec::new(""),
        TaskSpec::new("app.add").args(json!({"not": "an array"})),
        TaskSpec::new("app.add").kwargs([1]),
        TaskSpec::new("app.add").priority(101),
    ] {
        assert!(matches!(
            client.enqueue(&bad),
            Err(foreman::Error::Config(_))
        ));
    }
    daemon.stop();
}

#[test]
fn an_in_process_handler_sees_its_abort_and_stops() {
    let env = Env::new();
    let saw = Arc::new(Mutex::new(None));
    let sink = Arc::clone(&saw);
    let registry = Registry::new().register("app.long", move |task| {
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_mins(1) {
            if task.cancelled() {
                *sink.lock().unwrap() = Some(task.id);
                return Err(foreman::Cancelled.into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    });
    let daemon = InProcess::start(&env, registry);
    let id = env.insert("app.long", "[]");
    env.touch_wakeup("w");
    let running = || {
        env.sql()
            .query_row(
                "SELECT count(*) FROM foreman_run WHERE task_id = ?1 AND state = 'running'",
                [id],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
            == 1
    };
    assert!(wait_until(PATIENCE, running));
    let out = env.run(&["cancel", &id.to_string()]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        crate::support::stderr(&out)
    );
    assert_eq!(*saw.lock().unwrap(), Some(id));
    let (state, error): (String, String) = env
        .sql()
        .query_row(
            "SELECT state, error FROM foreman_run WHERE task_id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (state.as_str(), error.as_str()),
        ("cancelled", "aborted (foreman cancel): cancelled")
    );
    daemon.stop();
}

crate::on_both! {
    /// `Client::enqueue_many` without unique keys: one statement on PostgreSQL, and still each
    /// task's own fields, in order, with ids that say which is which.
    fn enqueue_many_keeps_each_tasks_fields_in_order(env: Env) {
        use foreman::{Client, TaskSpec};
        use serde_json::json;

        env.init();
        let client = Client::open(env.db_arg()).unwrap();
        let specs = [
            TaskSpec::new("app.first").args([1]).priority(5),
            TaskSpec::new("app.second")
                .args(["two"])
                .kwargs(json!({"k": 2}))
                .delay(Duration::from_hours(1)),
            TaskSpec::new("app.third").args([3, 3]).priority(-5),
        ];
        let many = client.enqueue_many(&specs).unwrap();
        assert!(many.iter().all(|e| e.created));
        assert!(many.windows(2).all(|w| w[0].id < w[1].id), "{many:?}");
        let (run_after, created_at) = (env.epoch("run_after"), env.epoch("created_at"));
        let row = |id: i64| {
            env.rows(&format!(
                "SELECT task_name, CAST(args AS text), CAST(kwargs AS text), priority, \
                 CASE WHEN coalesce({run_after}, 0) > {created_at} + 600 THEN 'later' \
                 ELSE 'now' END FROM foreman_task WHERE id = {id}"
            ))
            .remove(0)
            .into_iter()
            .map(Option::unwrap_or_default)
            .map(|v| v.replace(' ', ""))
            .collect::<Vec<_>>()
        };
        assert_eq!(row(many[0].id), ["app.first", "[1]", "{}", "5", "now"]);
        assert_eq!(
            row(many[1].id),
            ["app.second", r#"["two"]"#, r#"{"k":2}"#, "0", "later"]
        );
        assert_eq!(row(many[2].id), ["app.third", "[3,3]", "{}", "-5", "now"]);
    }
}
