//! Sentry end to end: the real binary reports to a stand-in Sentry, a tiny HTTP server on
//! 127.0.0.1 that records the events of the envelopes it is sent.

#![cfg(feature = "sentry")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::support::{Env, PATIENCE, RECORD_TASK, stderr, wait_until};

/// Accepts connections on a port of its own and records every event it receives, with the raw
/// envelope it came in, until the test process exits.
struct StubSentry {
    dsn: String,
    received: Arc<Mutex<Vec<(Value, String)>>>,
}

impl StubSentry {
    fn start() -> StubSentry {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let sink = Arc::clone(&sink);
                std::thread::spawn(move || serve(stream, &sink));
            }
        });
        StubSentry {
            dsn: format!("http://key@127.0.0.1:{port}/1"),
            received,
        }
    }

    /// The events (and their envelopes) whose tag `key` is `value`.
    fn tagged(&self, key: &str, value: &str) -> Vec<(Value, String)> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(event, _)| event["tags"][key] == value)
            .cloned()
            .collect()
    }

    fn wait_tagged(&self, key: &str, value: &str) -> (Value, String) {
        assert!(
            wait_until(PATIENCE, || !self.tagged(key, value).is_empty()),
            "no event tagged {key}={value} arrived"
        );
        self.tagged(key, value).remove(0)
    }
}

/// HTTP/1.1 requests with a Content-Length body, one after the other on a kept-alive connection.
fn serve(stream: TcpStream, sink: &Mutex<Vec<(Value, String)>>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut writer = stream;
    loop {
        let mut length = 0;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line.trim_end().is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().expect("content-length");
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let envelope = String::from_utf8_lossy(&body).into_owned();
        // An envelope: a header line, then an item header line and a payload line per item.
        let lines: Vec<&str> = envelope.lines().collect();
        for pair in lines.get(1..).unwrap_or_default().chunks(2) {
            if let [header, payload] = pair
                && serde_json::from_str::<Value>(header).is_ok_and(|h| h["type"] == "event")
            {
                let event = serde_json::from_str(payload).expect("event JSON");
                sink.lock().unwrap().push((event, envelope.clone()));
            }
        }
        // Recorded before the answer: once the sender has its answer, the test can see the event.
        let answer =
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}";
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

#[test]
fn a_failing_command_task_is_reported_tagged_and_without_its_args() {
    let sentry = StubSentry::start();
    let env = Env::new();
    env.config(&format!(
        r#"
sentry_dsn = "{}"
sentry_environment = "staging"
[tasks.fails]
command = ["/bin/sh", "-c", "exit 3"]
"#,
        sentry.dsn
    ));
    env.init();
    let daemon = env.daemon(&[]);
    daemon.expect_log("reporting failures to Sentry at 127.0.0.1");
    let id = env.insert("fails", r#"["secret-arg"]"#);
    env.touch_wakeup("w");
    let (event, envelope) = sentry.wait_tagged("task_id", &id.to_string());
    assert_eq!(event["tags"]["task_name"], "fails");
    assert_eq!(event["tags"]["attempt"], "1");
    assert_eq!(event["tags"]["state"], "failed");
    assert_eq!(event["tags"]["kind"], "task_failed");
    assert_eq!(event["environment"], "staging");
    assert_eq!(
        event["release"],
        concat!("foreman@", env!("CARGO_PKG_VERSION"))
    );
    assert!(
        event["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("fails: ")),
        "{event}"
    );
    assert!(!envelope.contains("secret-arg"), "{envelope}");
    daemon.stop();
    assert_eq!(sentry.tagged("task_id", &id.to_string()).len(), 1);
}

#[test]
fn a_startup_error_is_reported_before_the_daemon_exits() {
    let sentry = StubSentry::start();
    let env = Env::new();
    env.config("[tasks.x]\npool = \"nowhere\"\n");
    let out = env
        .command(&["run"])
        .env("SENTRY_DSN", &sentry.dsn)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run foreman");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // Flushed before the exit, so it is here already; the wait only covers a slow reader thread.
    let (event, _) = sentry.wait_tagged("kind", "startup");
    assert_eq!(event["level"], "fatal");
    assert!(
        event["message"]
            .as_str()
            .is_some_and(|m| m.contains("nowhere")),
        "{event}"
    );
}

#[test]
fn commands_other_than_run_do_not_report() {
    let sentry = StubSentry::start();
    let env = Env::new();
    env.config("[tasks.x]\npool = \"nowhere\"\n");
    let out = env
        .command(&["check-config"])
        .env("SENTRY_DSN", &sentry.dsn)
        .output()
        .expect("run foreman");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(sentry.received.lock().unwrap().is_empty());
}

#[test]
fn a_sentry_that_never_answers_holds_up_neither_the_tasks_nor_the_exit() {
    // Accepts connections (the kernel completes them) but never reads or answers a request.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let env = Env::new();
    env.config(&format!(
        "sentry_dsn = \"http://key@127.0.0.1:{port}/1\"\n{RECORD_TASK}\n[tasks.fails]\ncommand = [\"/bin/sh\", \"-c\", \"exit 3\"]\n"
    ));
    env.init();
    let mut daemon = env.daemon(&[]);
    env.insert("fails", "[]");
    env.touch_wakeup("a");
    daemon.expect_log("moved to foreman_dead");
    // The transport's thread is now waiting for an answer; tasks still run.
    let id = env.insert("record", "[]");
    env.touch_wakeup("b");
    assert_eq!(env.wait_ran(1), [id]);
    daemon.signal(libc::SIGTERM);
    let started = std::time::Instant::now();
    let status = daemon.wait_exit(PATIENCE);
    assert!(status.success(), "{status}; log:\n{}", daemon.log());
    // The flush gets its 2 s, and no more.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "exit took {:?}",
        started.elapsed()
    );
    drop(listener);
}
