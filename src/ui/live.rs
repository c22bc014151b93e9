//! Live updates: one watcher turns database changes into overview snapshots, at least `MIN_GAP`
//! apart (two a second at most), shared by every open page through server-sent events (`GET /api/events`).
//!
//! A change is seen without asking the database: the database directory is watched (inotify, the
//! same `DbWatch` that `wait` uses) and the files' sizes and times compared (`Store::changes`, what
//! the daemon's idle tick uses). Nothing is read while nothing changes and nobody listens. Some
//! verdicts change with time alone (a heartbeat goes stale, a due task waits too long, a daemon
//! killed with `kill -9` writes nothing): the watcher also looks again when the last snapshot
//! says such a moment comes, and probes the PID file's lock, which costs no query.

use std::io::Write as _;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::Shared;
use super::http::{Reply, Request, security_header_lines};
use crate::commands::observe::{Lock, Thresholds};
use crate::commands::status::Status;

/// The shortest time between two snapshots: two a second at most.
const MIN_GAP: Duration = Duration::from_millis(500);
/// How often the watcher looks at the files and the lock when inotify says nothing (a missed
/// event, a watch the kernel refused): two `stat`s and a lock probe, no query.
const LOOK_EVERY: Duration = Duration::from_secs(2);
/// A comment line on an idle stream, so that proxies and the browser keep it open.
const PING_EVERY: Duration = Duration::from_secs(15);
/// Event streams open at once; each has a thread.
pub const MAX_STREAMS: usize = 32;

/// The latest snapshot, and who waits for the next.
pub struct Hub {
    state: Mutex<HubState>,
    changed: Condvar,
}

struct HubState {
    /// Counts snapshots; 0 before the first.
    version: u64,
    /// The last snapshot as an SSE frame.
    frame: Arc<String>,
    streams: usize,
    /// A stream opened since the last snapshot: take one now.
    wanted: bool,
}

impl Hub {
    pub fn new() -> Hub {
        Hub {
            state: Mutex::new(HubState {
                version: 0,
                frame: Arc::new(String::new()),
                streams: 0,
                wanted: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish(&self, frame: String) {
        let mut state = self.lock();
        state.version += 1;
        state.frame = Arc::new(frame);
        state.wanted = false;
        self.changed.notify_all();
    }

    /// Waits until there is a snapshot newer than `seen`, or `timeout` passes.
    fn next(&self, seen: u64, timeout: Duration) -> Option<(u64, Arc<String>)> {
        let state = self.lock();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |s| s.version <= seen)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (state.version > seen).then(|| (state.version, Arc::clone(&state.frame)))
    }

    /// The watcher waits here while nobody listens (or up to `timeout`); true when a stream
    /// asks for a snapshot now.
    fn wait_for_listeners(&self, timeout: Duration) -> bool {
        let state = self.lock();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |s| s.streams == 0 && !s.wanted)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.wanted
    }

    fn listeners(&self) -> usize {
        self.lock().streams
    }
}

/// The watcher: runs for the life of the process.
pub fn watch(shared: &Shared) {
    let thresholds = Thresholds::defaults(&shared.config);
    let mut store = None;
    let mut watch = None;
    let mut last_stamp = None;
    let mut last_lock = None;
    let mut last_sent: Option<Instant> = None;
    // When the verdict may change with time alone, by the last snapshot.
    let mut deadline: Option<f64> = None;
    loop {
        let wanted = shared.hub.wait_for_listeners(LOOK_EVERY);
        if shared.hub.listeners() == 0 && !wanted {
            // Nobody listens: forget what was seen, so that the next listener gets a fresh look.
            last_stamp = None;
            watch = None;
            continue;
        }
        let store = match store.as_mut() {
            Some(store) => store,
            None => match shared.open() {
                Ok(opened) => store.insert(opened),
                Err(e) => {
                    log::warn!("dashboard: {e}");
                    std::thread::sleep(LOOK_EVERY);
                    continue;
                }
            },
        };
        let watch = watch.get_or_insert_with(|| store.watch());
        let wait = deadline.map_or(LOOK_EVERY, |at| {
            Duration::from_secs_f64(
                (at - crate::clock::unix_now()).clamp(0.0, LOOK_EVERY.as_secs_f64()),
            )
        });
        if !wanted && last_stamp.is_some() {
            watch.changed_within(wait);
        }
        let stamp = store.changes();
        let lock = Lock::read(shared.config.pid_file.as_deref());
        let due = deadline.is_some_and(|at| crate::clock::unix_now() >= at);
        let changed = wanted
            || stamp.is_none()
            || stamp != last_stamp
            || last_lock.as_ref() != Some(&lock)
            || due;
        if !changed {
            continue;
        }
        // At most one per MIN_GAP: changes that come meanwhile are in the next snapshot.
        if let Some(sent) = last_sent
            && sent.elapsed() < MIN_GAP
        {
            std::thread::sleep(MIN_GAP.saturating_sub(sent.elapsed()));
        }
        let stamp = store.changes();
        match super::api::overview(&shared.config, store) {
            Ok((doc, status)) => {
                deadline = next_moment(&status, thresholds);
                shared
                    .hub
                    .publish(format!("event: overview\ndata: {doc}\n\n"));
            }
            Err(e) => {
                log::warn!("dashboard: {e}");
                shared.hub.publish(format!(
                    "event: failure\ndata: {}\n\n",
                    serde_json::json!({"error": e.to_string()})
                ));
                deadline = None;
            }
        }
        last_sent = Some(Instant::now());
        last_stamp = stamp;
        last_lock = Some(lock);
    }
}

/// The next moment the verdict may change without a write: the heartbeat going stale, or the
/// oldest due task waiting past the limit.
fn next_moment(status: &Status, thresholds: Thresholds) -> Option<f64> {
    let daemon = &status.obs.daemon;
    if !daemon.running {
        return None;
    }
    let goes_stale = daemon
        .current_row()
        .map(|row| row.heartbeat_at + thresholds.max_age.as_secs_f64());
    let waits_too_long = status
        .obs
        .oldest_due
        .as_ref()
        .map(|due| due.due_since + thresholds.max_queue_age.as_secs_f64());
    // Just after the moment, so that the look judges past it.
    [goes_stale, waits_too_long]
        .into_iter()
        .flatten()
        .filter(|at| *at > status.obs.now)
        .min_by(f64::total_cmp)
        .map(|at| at + 0.05)
}

/// `GET /api/events`: the connection becomes an event stream, served by a thread of its own.
pub fn subscribe(shared: &Shared, request: &mut Request) -> Reply {
    {
        let mut state = shared.hub.lock();
        if state.streams >= MAX_STREAMS {
            return Reply::error(
                503,
                "too many live connections; the page falls back to polling",
            );
        }
        state.streams += 1;
        state.wanted = true;
        shared.hub.changed.notify_all();
    }
    let Some(raw) = request.take() else {
        shared.hub.lock().streams -= 1;
        return Reply::taken();
    };
    let hub = Arc::clone(&shared.hub);
    let started = std::thread::Builder::new()
        .name("ui-events".to_owned())
        .spawn(move || {
            stream(&hub, raw.into_writer());
            let mut state = hub.lock();
            state.streams = state.streams.saturating_sub(1);
        });
    if let Err(e) = started {
        log::warn!("dashboard: starting an event stream: {e}");
        shared.hub.lock().streams -= 1;
    }
    Reply::taken()
}

/// Writes the stream: the headers by hand (tiny_http would buffer a chunked body), then each
/// snapshot as it comes, and a ping when there is none for a while. Ends when the client goes.
fn stream(hub: &Hub, mut out: Box<dyn std::io::Write + Send>) {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n\
         Connection: close\r\nX-Accel-Buffering: no\r\n{}\r\nretry: 2000\n\n",
        security_header_lines()
    );
    if out
        .write_all(head.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        return;
    }
    let mut seen = 0;
    loop {
        let frame = match hub.next(seen, PING_EVERY) {
            Some((version, frame)) => {
                seen = version;
                frame
            }
            None => Arc::new(": ping\n\n".to_owned()),
        };
        if out
            .write_all(frame.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            return;
        }
    }
}
