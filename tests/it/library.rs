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
