//! The PostgreSQL backend: one connection to a server that many daemons share, reconnected when
//! it breaks, with its session settings per role (`connect`), and the work split by job as in the
//! SQLite store: `schema` (creation and version), `cycle` (the loop's claim, one statement),
//! `enqueue` (new tasks and schedules, compare-and-set), `daemon` (registration, the heartbeat
//! with recovery of stale daemons and lease renewal, maintenance under advisory locks), `report`
//! and `admin` (the operator's queries), `browse` (`list` and `show`), `ui` (the dashboard's
//! reads), `control` (pauses and aborts), `listen` (the `LISTEN` connection), `producer` (the
//! bench's producer), `pgpass` (the password file).
//!
//! Every time comparison is the database's (`now()`): a duration the loop measured crosses the
//! wire as seconds and is applied to `now()`, and times come back as Unix seconds of the
//! database's clock. The loop reads that clock through `now`, an estimate kept on the host's
//! monotonic clock from the `now()` the daemon's statements return, so a host whose wall clock is
//! wrong or steps still fires schedules on the database's time.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use postgres::Client;
use postgres::types::ToSql;

use crate::error::{Error, Result};
use crate::store::types::Access;

pub mod admin;
pub mod browse;
pub mod connect;
pub mod control;
pub mod cycle;
pub mod daemon;
pub mod enqueue;
pub mod listen;
pub mod pgpass;
pub mod producer;
pub mod report;
pub mod schema;
pub mod ui;

pub use connect::{Role, Target};

/// Reconnection attempts after a failure are spaced from this…
const RECONNECT_FIRST: Duration = Duration::from_millis(200);
/// …doubling up to this, so a server that is down costs a failed connect every few seconds, and
/// one that comes back is used within that.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// The key of foreman's advisory locks: the oid of `foreman_task` (as an int), so that two
/// foreman schemas in one database do not exclude each other; the job is the second key.
const LOCK_KEY: &str = "'foreman_task'::regclass::oid::int";

/// An open connection (or the means to open one again) to a PostgreSQL database.
pub struct PgStore {
    target: Target,
    role: Role,
    conn: RefCell<Conn>,
    /// The database's clock as this host sees it.
    clock: RefCell<DbClock>,
    /// The daemon's registration, once it registered (the daemon's store only).
    daemon: Option<daemon::Registration>,
    /// The claim's state between cycles (the daemon's store only).
    claim: cycle::ClaimState,
    /// When the heartbeat last looked at the whole queue, and the next due time it saw (∞: none):
    /// the idle tick skips its own look right after one, so a heartbeat costs no statement more.
    looked: std::cell::Cell<Option<(Instant, f64)>>,
    /// What the heartbeat's last look saw (next due time, newest row), and a count of the looks
    /// that saw something else than the one before, and of broken connections: the daemon's
    /// token of change (`changes`).
    queue_seen: std::cell::Cell<(f64, Option<i64>)>,
    queue_changes: std::cell::Cell<u64>,
    /// How deep `snapshot`s are nested: only the outermost begins and ends the transaction.
    snapshot_depth: std::cell::Cell<u32>,
    /// The daemon changed what an operator sees (started or ended tasks, buried some) since its
    /// last heartbeat, which then notifies `foreman_changed` and clears it (`listen::CHANGED_CHANNEL`).
    unannounced: std::cell::Cell<bool>,
}

/// How long a look at the queue stands in for the tick's (the default tick).
const LOOK_STANDS: Duration = Duration::from_secs(1);

/// The connection, and the statements prepared on it.
struct Conn {
    client: Option<Client>,
    /// Prepared on `client`, keyed by their text's address (each is a `&'static str`).
    statements: Vec<(usize, postgres::Statement)>,
    /// When to try connecting again after a failure, and the delay after the next failure.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// The last failure to connect, said again while the backoff lasts.
    last_error: Option<String>,
    /// The connection broke (or the server went away) since the daemon last looked.
    broke: bool,
}

/// The database's clock, estimated on the host's monotonic clock.
#[derive(Debug, Clone, Copy)]
struct DbClock {
    /// Unix seconds of the database's clock at `at`.
    base: f64,
    at: Instant,
    /// Whether `base` was read from the server (else it is the host's clock).
    measured: bool,
}

impl DbClock {
    fn host() -> DbClock {
        DbClock {
            base: crate::clock::unix_now(),
            at: Instant::now(),
            measured: false,
        }
    }

    fn now(&self) -> f64 {
        self.base + self.at.elapsed().as_secs_f64()
    }

    /// The server's `clock_timestamp()` was `db_now` as it finished a statement sent at `sent`
    /// (so late in the round trip: the result's way back is all that follows it). Not `now()`,
    /// the statement's start: a statement that took 50 ms would put the estimate 25 ms behind.
    fn observe(&mut self, db_now: f64, sent: Instant) {
        if !db_now.is_finite() {
            return;
        }
        let _ = sent;
        self.base = db_now;
        self.at = Instant::now();
        self.measured = true;
    }
}

impl PgStore {
    /// Connects to `url` (shown as `label`). Commands fail at once when the server cannot be
    /// reached; the daemon's start waits for it (`daemon::wait_for_server`).
    pub fn open(url: &str, label: &str, access: Access, role: Option<Role>) -> Result<PgStore> {
        let role = role.unwrap_or(match access {
            Access::ReadOnly => Role::ReadOnly,
            Access::Create | Access::ReadWrite => Role::Command,
        });
        let store = PgStore::open_lazily(url, label, role)?;
        store.connected()?;
        // The commands compare the rows' times with now: the server's, not this host's.
        let sent = Instant::now();
        let rows =
            store.with(|c| c.query("SELECT extract(epoch FROM clock_timestamp())::float8", &[]))?;
        store.observe_clock(rows.first().and_then(|r| r.get(0)), sent);
        Ok(store)
    }

    /// The store for `url` in `role`, not connected yet (the daemon waits for its server).
    pub fn open_lazily(url: &str, label: &str, role: Role) -> Result<PgStore> {
        let target = Target::parse(url, label)?;
        Ok(PgStore {
            target,
            role,
            conn: RefCell::new(Conn {
                client: None,
                statements: Vec::new(),
                retry_at: None,
                backoff: RECONNECT_FIRST,
                last_error: None,
                broke: false,
            }),
            clock: RefCell::new(DbClock::host()),
            daemon: None,
            claim: cycle::ClaimState::default(),
            looked: std::cell::Cell::new(None),
            queue_seen: std::cell::Cell::new((f64::NAN, None)),
            queue_changes: std::cell::Cell::new(0),
            snapshot_depth: std::cell::Cell::new(0),
            unannounced: std::cell::Cell::new(false),
        })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::db(self.target.label.clone(), e)
    }

    /// Connects unless connected; between failed attempts, waits out the backoff (failing at once
    /// with the last error meanwhile), so a loop retrying at every event does not hammer a
    /// server that is down.
    fn connected(&self) -> Result<()> {
        let mut conn = self.conn.borrow_mut();
        if conn.client.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(());
        }
        if conn.client.take().is_some() {
            conn.statements.clear();
            conn.broke = true;
            self.queue_changes.set(self.queue_changes.get() + 1);
        }
        if let (Some(at), Some(last)) = (conn.retry_at, &conn.last_error)
            && Instant::now() < at
        {
            return Err(self.err(format!("{last} (retrying)")));
        }
        match self.target.connect(self.role) {
            Ok(client) => {
                conn.client = Some(client);
                conn.retry_at = None;
                conn.backoff = RECONNECT_FIRST;
                conn.last_error = None;
                Ok(())
            }
            Err(e) => {
                conn.retry_at = Some(Instant::now() + conn.backoff);
                conn.backoff = (conn.backoff * 2).min(RECONNECT_MAX);
                let text = match &e {
                    Error::Db { message, .. } => message.clone(),
                    other => other.to_string(),
                };
                conn.last_error = Some(text);
                Err(e)
            }
        }
    }

    /// Runs `work` on the connection (connecting first if needed). A failure that closed the
    /// connection drops it: the next call connects again.
    fn with<T>(
        &self,
        work: impl FnOnce(&mut Client) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        self.connected()?;
        let mut conn = self.conn.borrow_mut();
        let Some(client) = conn.client.as_mut() else {
            return Err(self.err("not connected"));
        };
        match work(client) {
            Ok(value) => Ok(value),
            Err(e) => {
                let closed = e.is_closed() || client.is_closed();
                if closed {
                    conn.client = None;
                    conn.statements.clear();
                    conn.broke = true;
                    self.queue_changes.set(self.queue_changes.get() + 1);
                }
                Err(self.target.error(&e))
            }
        }
    }

    /// Like `with`, with `sql` prepared once per connection and handed to `work`.
    fn with_prepared<T>(
        &self,
        sql: &'static str,
        work: impl FnOnce(&mut Client, &postgres::Statement) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        self.connected()?;
        let mut conn = self.conn.borrow_mut();
        let key = sql.as_ptr() as usize;
        let conn = &mut *conn;
        let Some(client) = conn.client.as_mut() else {
            return Err(self.err("not connected"));
        };
        let result = match conn.statements.iter().find(|(k, _)| *k == key) {
            Some((_, statement)) => work(client, statement),
            None => match client.prepare(sql) {
                Ok(statement) => {
                    let done = work(client, &statement);
                    conn.statements.push((key, statement));
                    done
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(value) => Ok(value),
            Err(e) => {
                if e.is_closed() || client.is_closed() {
                    conn.client = None;
                    conn.statements.clear();
                    conn.broke = true;
                    self.queue_changes.set(self.queue_changes.get() + 1);
                }
                Err(self.target.error(&e))
            }
        }
    }

    /// Runs one prepared statement, returning its rows.
    fn query(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>> {
        self.with_prepared(sql, |client, statement| client.query(statement, params))
    }

    /// Whether the connection broke since the last call (it has been opened again, or will be).
    fn take_broke(&self) -> bool {
        std::mem::take(&mut self.conn.borrow_mut().broke)
    }

    /// A statement looked at the queue: the next due time it saw (∞: nothing queued), and the
    /// newest row's id.
    fn looked_at_queue(&self, next_due: f64, newest: Option<i64>) {
        self.looked.set(Some((Instant::now(), next_due)));
        let (due, id) = self.queue_seen.get();
        if due.to_bits() != next_due.to_bits() || id != newest {
            self.queue_changes.set(self.queue_changes.get() + 1);
        }
        self.queue_seen.set((next_due, newest));
    }

    /// A cycle ran: the next `next_due` looks at the queue itself.
    fn forget_look(&self) {
        self.looked.set(None);
    }

    /// The daemon's token of change: it changes when a heartbeat saw the queue's next due time
    /// or its newest row change, or the connection broke. A daemon that listens is woken by each
    /// producer's `NOTIFY`; this catches the producer that did not notify, within a heartbeat
    /// (as SQLite's idle tick does with a file's change counter). `None` for other stores, which
    /// do not heartbeat: they must look.
    pub fn changes(&self) -> Option<u64> {
        self.daemon.as_ref()?;
        Some(self.queue_changes.get())
    }

    /// When the next row is due, as the heartbeat's look saw it if that was within the last
    /// tick; else the past, so that the caller's claim looks. `None`: nothing is queued.
    pub fn next_due(&self) -> Option<f64> {
        match self.looked.get() {
            Some((at, due)) if at.elapsed() < LOOK_STANDS => due.is_finite().then_some(due),
            _ => Some(f64::NEG_INFINITY),
        }
    }

    /// The database's clock, as this host estimates it (Unix seconds).
    pub fn now(&self) -> f64 {
        self.clock.borrow().now()
    }

    /// Records the server's `clock_timestamp()` at the end of a statement sent at `sent`.
    fn observe_clock(&self, db_now: Option<f64>, sent: Instant) {
        if let Some(db_now) = db_now {
            self.clock.borrow_mut().observe(db_now, sent);
        }
    }

    /// Runs `read` in one read-only, repeatable-read transaction: every figure it reads is of
    /// the same moment.
    /// A snapshot inside another is part of it.
    pub fn snapshot<T>(&self, read: impl FnOnce() -> Result<T>) -> Result<T> {
        let depth = self.snapshot_depth.get();
        if depth > 0 {
            return read();
        }
        self.with(|c| c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"))?;
        self.snapshot_depth.set(1);
        let value = read();
        self.snapshot_depth.set(0);
        // Nothing was written: ending it either way only releases the snapshot.
        let end = self.with(|c| c.batch_execute(if value.is_ok() { "COMMIT" } else { "ROLLBACK" }));
        let value = value?;
        end?;
        Ok(value)
    }

    /// `NOTIFY foreman` with `payload`: wakes the daemons (a producer's poke).
    pub fn notify(&self, payload: &str) -> Result<()> {
        self.with(|c| {
            c.execute("SELECT pg_notify('foreman', $1)", &[&payload])
                .map(drop)
        })
    }

    /// `NOTIFY foreman_changed`: tells the dashboards that this process changed something
    /// (a dashboard's action that need not wake a daemon: a purge, a cancel).
    pub fn announce(&self) -> Result<()> {
        self.with(|c| {
            c.execute("SELECT pg_notify($1, '')", &[&listen::CHANGED_CHANNEL])
                .map(drop)
        })
    }

    /// This daemon changed what an operator sees: its next heartbeat says so.
    fn changed_something(&self) {
        self.unannounced.set(true);
    }

    /// Whether this daemon changed something that its heartbeat has not announced yet.
    pub fn unannounced(&self) -> bool {
        self.unannounced.get()
    }
}

/// A dead letter from a row that starts with its columns in this order: id, task_id, task_name,
/// args, kwargs, reason, created_at, died_at, attempts, priority, origin, unique_key.
fn dead_letter(r: &postgres::Row) -> crate::store::types::DeadLetter {
    crate::store::types::DeadLetter {
        id: r.get(0),
        task_id: r.get(1),
        task_name: r.get(2),
        args: r.get(3),
        kwargs: r.get(4),
        reason: r.get(5),
        created_at: opt_secs(r, 6),
        died_at: opt_secs(r, 7),
        attempts: r.get(8),
        priority: r.get(9),
        origin: r.get(10),
        unique_key: r.get(11),
    }
}

/// Unix seconds as a float from a row's `float8` column (times are read as
/// `extract(epoch FROM …)::float8`, which also holds ±infinity a producer may have written).
fn opt_secs(row: &postgres::Row, index: usize) -> Option<f64> {
    row.try_get::<_, Option<f64>>(index).ok().flatten()
}

/// A count from SQL's `bigint` as the store's `usize`.
fn count(n: i64) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// A size as SQL's `bigint` (or `int` for a limit).
fn big(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
