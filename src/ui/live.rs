//! Live updates: one watcher turns database changes into overview snapshots, at least `MIN_GAP`
//! apart (two a second at most), shared by every open page through server-sent events (`GET /api/events`).
//!
//! A change is seen without asking the database (`Store::feed`). On SQLite the database directory
//! is watched (inotify, the same `DbWatch` that `wait` uses) and the files' sizes and times
//! compared (`Store::changes`, what the daemon's idle tick uses). On PostgreSQL a `LISTEN`
//! connection hears the producers' `NOTIFY foreman` and the daemons' `foreman_changed` (sent with
//! a heartbeat when a daemon changed something since its last one, and when one starts or stops);
//! where `LISTEN` is turned off (`listen = false`) or fails, the watcher reads every `POLL_EVERY`
//! instead, and says so once. Nothing is read while nothing changes and nobody listens.
//!
//! Some verdicts change with time alone (a heartbeat goes stale, a due task waits too long, a
//! daemon killed with `kill -9` writes nothing): the watcher also looks again when the last
//! snapshot says such a moment comes, and probes the PID file's lock, which costs no query. On
//! PostgreSQL, where a daemon that dies says nothing (and may hold no lock on this host), that
//! look comes at least once per staleness period: the one periodic read while a page is open.

use std::io::Write as _;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::Shared;
use super::http::{Reply, Request, security_header_lines};
use crate::commands::observe::{Lock, Thresholds};
use crate::commands::status::Status;
use crate::config::Config;
#[cfg(feature = "postgres")]
use crate::store::Notices;
use crate::store::{ChangeToken, DbWatch, Feed, Store};

/// The shortest time between two snapshots: two a second at most.
const MIN_GAP: Duration = Duration::from_millis(500);
/// How often the watcher looks at the files and the lock when inotify says nothing (a missed
/// event, a watch the kernel refused): two `stat`s and a lock probe, no query.
const LOOK_EVERY: Duration = Duration::from_secs(2);
/// PostgreSQL without `LISTEN` (`listen = false`, or while it fails): a snapshot this often
/// while a page is open.
#[cfg(feature = "postgres")]
const POLL_EVERY: Duration = Duration::from_secs(2);
/// After `LISTEN` failed, how long the watcher polls before it tries to listen again.
#[cfg(feature = "postgres")]
const RELISTEN: Duration = Duration::from_secs(10);
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

/// How the watcher learns that something may have changed (`Store::feed`).
enum Source {
    /// SQLite: the directory's watch, and the files' stamp when the last snapshot was read.
    Files {
        watch: DbWatch,
        seen: Option<ChangeToken>,
    },
    /// PostgreSQL: notifications; after a failure, polling until `relisten_at`.
    #[cfg(feature = "postgres")]
    Listen {
        notices: Notices,
        relisten_at: Option<Instant>,
        last_read: Option<Instant>,
    },
    /// PostgreSQL with `listen = false`: a snapshot every `POLL_EVERY`.
    #[cfg(feature = "postgres")]
    Poll { last_read: Option<Instant> },
}

impl Source {
    fn new(store: &Store, config: &Config) -> Source {
        match store.feed(config.listen) {
            Feed::Files(watch) => Source::Files { watch, seen: None },
            #[cfg(feature = "postgres")]
            Feed::Listen(notices) => Source::Listen {
                notices,
                relisten_at: None,
                last_read: None,
            },
            #[cfg(feature = "postgres")]
            Feed::Poll => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    log::info!(
                        "dashboard: listen = false: reading the overview every {} while a page is open",
                        crate::duration::format_duration(POLL_EVERY)
                    );
                });
                Source::Poll { last_read: None }
            }
        }
    }

    /// Waits up to `wait` for a sign of change (not at all when a snapshot is `wanted` anyway);
    /// true when the database may have changed since the last snapshot.
    fn changed(&mut self, store: &Store, wait: Duration, wanted: bool) -> bool {
        let wait = if wanted { Duration::ZERO } else { wait };
        match self {
            Source::Files { watch, seen } => {
                if !wanted && seen.is_some() {
                    watch.changed_within(wait);
                }
                let stamp = store.changes();
                wanted || stamp.is_none() || stamp != *seen
            }
            #[cfg(feature = "postgres")]
            Source::Listen {
                notices,
                relisten_at,
                last_read,
            } => {
                if let Some(at) = *relisten_at {
                    if Instant::now() < at {
                        return poll(*last_read, wait) || wanted;
                    }
                    *relisten_at = None;
                }
                // Wanted: only take what is pending (or connect), which this snapshot covers.
                match notices.wait(wait) {
                    Ok(heard) => {
                        if heard && listen_failing(false) {
                            log::info!(
                                "dashboard: LISTEN works again: back to reading on notifications"
                            );
                        }
                        heard || wanted
                    }
                    Err(e) => {
                        if !listen_failing(true) {
                            log::warn!(
                                "dashboard: cannot LISTEN for changes ({e}); reading the overview every {} while a page is open, and trying to listen again every {}",
                                crate::duration::format_duration(POLL_EVERY),
                                crate::duration::format_duration(RELISTEN)
                            );
                        }
                        *relisten_at = Some(Instant::now() + RELISTEN);
                        true
                    }
                }
            }
            #[cfg(feature = "postgres")]
            Source::Poll { last_read } => poll(*last_read, wait) || wanted,
        }
    }

    /// A snapshot is about to be read: what it covers is the baseline for the next `changed`.
    fn reading(&mut self, store: &Store) {
        match self {
            Source::Files { seen, .. } => *seen = store.changes(),
            #[cfg(feature = "postgres")]
            Source::Listen { last_read, .. } | Source::Poll { last_read } => {
                *last_read = Some(Instant::now());
            }
        }
    }
}

/// Records whether `LISTEN` fails now and returns whether it failed before: a failure is
/// warned of once, and its end said once, for the life of the process (a page closed and opened
/// again while it lasts says nothing new).
#[cfg(feature = "postgres")]
fn listen_failing(now: bool) -> bool {
    static FAILING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    FAILING.swap(now, std::sync::atomic::Ordering::SeqCst)
}

/// Polling: waits until `POLL_EVERY` after the last read (at most `wait`); true once it is time.
#[cfg(feature = "postgres")]
fn poll(last_read: Option<Instant>, wait: Duration) -> bool {
    let Some(next) = last_read.map(|at| at + POLL_EVERY) else {
        return true;
    };
    let left = next.saturating_duration_since(Instant::now());
    std::thread::sleep(left.min(wait));
    Instant::now() >= next
}

/// The watcher: runs for the life of the process.
pub fn watch(shared: &Shared) {
    let thresholds = Thresholds::defaults(&shared.config);
    let mut store = None;
    let mut source: Option<Source> = None;
    let mut last_lock = None;
    let mut last_sent: Option<Instant> = None;
    // When the verdict may change with time alone, by the last snapshot.
    let mut deadline: Option<Instant> = None;
    loop {
        let wanted = shared.hub.wait_for_listeners(LOOK_EVERY);
        if shared.hub.listeners() == 0 && !wanted {
            // Nobody listens: stop watching (on PostgreSQL, close the LISTEN connection, which
            // nobody would read), so that the next listener gets a fresh look.
            source = None;
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
        let source = source.get_or_insert_with(|| Source::new(store, &shared.config));
        let wait = deadline.map_or(LOOK_EVERY, |at| {
            at.saturating_duration_since(Instant::now()).min(LOOK_EVERY)
        });
        let changed = source.changed(store, wait, wanted);
        let lock = Lock::read(shared.config.pid_file.as_deref());
        let due = deadline.is_some_and(|at| Instant::now() >= at);
        if !changed && last_lock.as_ref() == Some(&lock) && !due {
            continue;
        }
        // At most one per MIN_GAP: changes that come meanwhile are in the next snapshot.
        if let Some(sent) = last_sent
            && sent.elapsed() < MIN_GAP
        {
            std::thread::sleep(MIN_GAP.saturating_sub(sent.elapsed()));
        }
        source.reading(store);
        match super::api::overview(&shared.config, store) {
            Ok((doc, status)) => {
                deadline = next_moment(&status, thresholds).map(|after| Instant::now() + after);
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
        last_lock = Some(lock);
    }
}

/// How long after the snapshot's moment the verdict may change without a write: a heartbeat
/// going stale, or the oldest due task waiting past the limit. On PostgreSQL, where daemons share
/// the database, the first of the live daemons to go stale, and at the latest one staleness
/// period on: a daemon that dies says nothing.
fn next_moment(status: &Status, thresholds: Thresholds) -> Option<Duration> {
    let obs = &status.obs;
    let max_age = thresholds.max_age.as_secs_f64();
    let mut moments = Vec::new();
    if obs.shared {
        moments.extend(obs.live(max_age).map(|row| row.heartbeat_at + max_age));
        moments.push(obs.now + max_age);
    } else if obs.daemon.running {
        moments.extend(
            obs.daemon
                .current_row()
                .map(|row| row.heartbeat_at + max_age),
        );
    }
    let up = if obs.shared {
        obs.live(max_age).next().is_some()
    } else {
        obs.daemon.running
    };
    if up {
        moments.extend(
            obs.oldest_due
                .as_ref()
                .map(|due| due.due_since + thresholds.max_queue_age.as_secs_f64()),
        );
    }
    // Just after the moment, so that the look judges past it.
    moments
        .into_iter()
        .filter(|at| *at > obs.now)
        .min_by(f64::total_cmp)
        .map(|at| Duration::from_secs_f64(at - obs.now + 0.05))
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
