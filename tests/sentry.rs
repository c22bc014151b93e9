//! Sentry reports from a daemon run in-process (`foreman::run`, in-process handlers, a real DB), with
//! sentry's test transport on the client bound to the main hub, which the loop and worker threads
//! report through. A test binary of its own: the hub is process-wide, so these tests take turns
//! (`SERIAL`) instead of running beside the many tests of `tests/it`.

#![cfg(feature = "sentry")]

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use foreman::config::SentryConfig;
use foreman::{Config, Overrides, Registry, Shutdown};
use sentry::Hub;
use sentry::protocol::{Event, Value};
use sentry::test::TestTransport;

/// Generous: CI machines are slow and shared; a passing test never waits this long.
const PATIENCE: Duration = Duration::from_secs(30);

static SERIAL: Mutex<()> = Mutex::new(());

/// Polls `check` every few milliseconds until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if check() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A Sentry client with a test transport, bound to the main hub for one test.
struct Reports {
    transport: Arc<TestTransport>,
    events: Vec<Event<'static>>,
    _turn: MutexGuard<'static, ()>,
}

impl Reports {
    fn bind(send_args: bool) -> Reports {
        let turn = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        let config = SentryConfig {
            dsn: Some("https://key@sentry.invalid/1".to_owned()),
            environment: Some("test".to_owned()),
            send_args,
        };
        let mut options = foreman::alert::client_options(&config)
            .unwrap()
            .expect("a DSN makes options");
        let transport = TestTransport::new();
        options.transport = Some(Arc::new(Arc::clone(&transport)));
        // The daemon's threads start after this, so each one's hub starts from this client.
        Hub::main().bind_client(Some(Arc::new(options.into())));
        Reports {
            transport,
            events: Vec::new(),
            _turn: turn,
        }
    }

    /// Every event so far that is tagged with this task id.
    fn for_task(&mut self, id: i64) -> Vec<Event<'static>> {
        self.events.extend(self.transport.fetch_and_clear_events());
        let id = id.to_string();
        self.events
            .iter()
            .filter(|e| e.tags.get("task_id") == Some(&id))
            .cloned()
            .collect()
    }

    fn with_tag(&mut self, key: &str, value: &str) -> Vec<Event<'static>> {
        self.events.extend(self.transport.fetch_and_clear_events());
        self.events
            .iter()
            .filter(|e| e.tags.get(key).map(String::as_str) == Some(value))
            .cloned()
            .collect()
    }
}

impl Drop for Reports {
    fn drop(&mut self) {
        Hub::main().bind_client(None);
    }
}

/// `foreman::run` on a temp dir, in a thread of the test process.
struct Daemon {
    dir: tempfile::TempDir,
    db: PathBuf,
    stop: Sender<Shutdown>,
    thread: Option<JoinHandle<foreman::Result<()>>>,
}

impl Daemon {
    fn start(config: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("q.sqlite3");
        let file = dir.path().join("foreman.toml");
        std::fs::write(&file, config).expect("write config");
        let overrides = Overrides {
            db: Some(db.clone().into()),
            workers: Some(2),
            tick: Some(Duration::from_millis(20)),
            ..Overrides::default()
        };
        let config = Config::load(Some(&file), &overrides).expect("config");
        let registry = Registry::new()
            .register("app.panics", |_| panic!("handler bug"))
            .register("app.fails", |_| {
                Err("smtp: connection refused\nsmtp timed out".into())
            });
        let (stop, shutdown) = crossbeam_channel::unbounded();
        let thread = std::thread::spawn(move || foreman::run(&config, registry, &shutdown));
        let daemon = Daemon {
            dir,
            db,
            stop,
            thread: Some(thread),
        };
        assert!(
            wait_until(PATIENCE, || daemon.schema_ready()),
            "the daemon did not create its schema"
        );
        daemon
    }

    fn schema_ready(&self) -> bool {
        self.db.exists()
            && rusqlite::Connection::open(&self.db)
                .and_then(|c| c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)))
                .is_ok_and(|v| v == foreman::store::SCHEMA_VERSION)
    }

    fn sql(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(&self.db).expect("open db");
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn
    }

    fn insert(&self, name: &str, args: &str, kwargs: &str) -> i64 {
        self.sql()
            .query_row(
                "INSERT INTO foreman_task(task_name, args, kwargs) VALUES (?1, ?2, ?3) RETURNING id",
                [name, args, kwargs],
                |r| r.get(0),
            )
            .expect("insert")
    }

    /// Waits until the task is in `foreman_dead`. Its report, if it has one, is captured before
    /// the transaction that moves it there, except a dead letter's (captured after).
    fn wait_dead(&self, id: i64) {
        let dead = || {
            self.sql()
                .query_row(
                    "SELECT count(*) FROM foreman_dead WHERE task_id = ?1",
                    [id],
                    |r| r.get::<_, i64>(0),
                )
                .unwrap()
                > 0
        };
        assert!(
            wait_until(PATIENCE, dead),
            "task {id} never reached foreman_dead"
        );
    }

    fn stop(mut self) {
        self.stop.send(Shutdown(libc::SIGTERM)).unwrap();
        let result = self.thread.take().unwrap().join().unwrap();
        assert!(result.is_ok(), "run failed: {result:?}");
        drop(self.dir);
    }
}

fn extra<'e>(event: &'e Event<'static>, key: &str) -> Option<&'e Value> {
    event.extra.get(key)
}

#[test]
fn a_panicking_handler_makes_one_event_tagged_with_its_task() {
    let mut reports = Reports::bind(false);
    let daemon = Daemon::start("");
    let id = daemon.insert(
        "app.panics",
        r#"["secret-arg"]"#,
        r#"{"k": "secret-kwarg"}"#,
    );
    daemon.wait_dead(id);
    let events = reports.for_task(id);
    // The panic integration's event; the final failure it caused is not reported again.
    assert_eq!(events.len(), 1, "{events:#?}");
    let event = &events[0];
    assert_eq!(event.exception.len(), 1);
    assert_eq!(event.exception[0].ty, "panic");
    assert_eq!(event.exception[0].value.as_deref(), Some("handler bug"));
    assert_eq!(event.tags["task_name"], "app.panics");
    assert_eq!(event.tags["attempt"], "1");
    assert_eq!(
        event.release.as_deref(),
        Some(concat!("foreman@", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(event.environment.as_deref(), Some("test"));
    assert!(extra(event, "args").is_none() && extra(event, "kwargs").is_none());
    daemon.stop();
}

#[test]
fn a_task_failing_every_attempt_is_reported_once_at_its_final_failure() {
    let mut reports = Reports::bind(false);
    let daemon = Daemon::start(
        r#"
[tasks."app.fails"]
max_retries = 1
retry_backoff = { base = "50ms", jitter = false }
"#,
    );
    let id = daemon.insert("app.fails", r#"["secret-arg"]"#, "{}");
    daemon.wait_dead(id);
    let events = reports.for_task(id);
    assert_eq!(events.len(), 1, "{events:#?}");
    let event = &events[0];
    assert_eq!(event.level, sentry::Level::Error);
    assert_eq!(event.message.as_deref(), Some("app.fails: smtp timed out"));
    assert_eq!(event.tags["kind"], "task_failed");
    assert_eq!(event.tags["task_name"], "app.fails");
    assert_eq!(event.tags["attempt"], "2");
    assert_eq!(event.tags["state"], "failed");
    assert_eq!(
        extra(event, "error"),
        Some(&Value::from("smtp: connection refused\nsmtp timed out"))
    );
    assert!(extra(event, "args").is_none() && extra(event, "kwargs").is_none());
    let text = serde_json::to_string(event).unwrap();
    assert!(!text.contains("secret-arg"), "{text}");
    daemon.stop();
}

#[test]
fn an_unknown_task_name_makes_a_dead_letter_event() {
    let mut reports = Reports::bind(false);
    let daemon = Daemon::start("");
    let id = daemon.insert("app.nope", "[]", "{}");
    // Captured just after the transaction that buries it: wait for the event itself.
    assert!(wait_until(PATIENCE, || !reports.for_task(id).is_empty()));
    let events = reports.for_task(id);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].tags["kind"], "dead_letter");
    assert_eq!(events[0].tags["task_name"], "app.nope");
    assert_eq!(
        events[0].message.as_deref(),
        Some(r#"task moved to foreman_dead: unknown task name "app.nope""#)
    );
    daemon.stop();
}

#[test]
fn args_and_kwargs_go_with_the_event_only_with_send_args() {
    let mut reports = Reports::bind(true);
    let daemon = Daemon::start("");
    let panicked = daemon.insert("app.panics", r#"["secret-arg"]"#, r#"{"k": "v"}"#);
    let failed = daemon.insert("app.fails", "[1, 2]", "{}");
    daemon.wait_dead(panicked);
    daemon.wait_dead(failed);
    let panic = reports.for_task(panicked);
    assert_eq!(panic.len(), 1, "{panic:#?}");
    assert_eq!(
        extra(&panic[0], "args"),
        Some(&serde_json::json!(["secret-arg"]))
    );
    assert_eq!(
        extra(&panic[0], "kwargs"),
        Some(&serde_json::json!({"k": "v"}))
    );
    let failure = reports.for_task(failed);
    assert_eq!(failure.len(), 1, "{failure:#?}");
    assert_eq!(extra(&failure[0], "args"), Some(&serde_json::json!([1, 2])));
    assert_eq!(extra(&failure[0], "kwargs"), Some(&serde_json::json!({})));
    daemon.stop();
}

#[test]
fn a_pool_that_cannot_start_is_reported_once() {
    let mut reports = Reports::bind(false);
    let daemon = Daemon::start(
        r#"
[pools.broken]
command = ["/bin/sh", "-c", "echo 'cannot import app' >&2; exit 1"]
processes = 1
"#,
    );
    assert!(wait_until(PATIENCE, || !reports
        .with_tag("pool", "broken")
        .is_empty()));
    let events = reports.with_tag("pool", "broken");
    // One process: the pool is down at the streak's first report, which says so.
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].tags["kind"], "pool_down");
    assert_eq!(events[0].level, sentry::Level::Error);
    let message = events[0].message.as_deref().unwrap_or_default();
    assert!(
        message.starts_with("pool broken: no worker can start: worker pid "),
        "{message}"
    );
    assert!(message.contains("cannot import app"), "{message}");
    daemon.stop();
}
