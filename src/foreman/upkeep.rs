//! The loop's upkeep between tasks: the fallback tick's look at the queue, a database lost under
//! the daemon, wall-clock steps, history pruning, the heartbeat with its figures, and how a lasting
//! database error is logged.

use std::time::{Duration, Instant};

use super::stop::Phase;
use super::{Foreman, Role, lost_database};
use crate::clock::{StepDetector, unix_now};
use crate::config::Config;
use crate::duration::format_duration;
use crate::error::Error;
use crate::notify::Notifier;
use crate::process_pool::ProcessPool;
use crate::stats::{Tally, minute_of};
use crate::store::{Beat, BeatNews, ChangeToken};

/// History rows looked at per pruning transaction, so pruning never holds the write lock for long.
const PRUNE_BATCH: usize = 1000;
/// How often the loop prunes history when the last pass found nothing more to prune.
const PRUNE_EVERY: Duration = Duration::from_mins(1);
/// The longest a busy daemon keeps its figures in memory before writing them (with a heartbeat),
/// or, on PostgreSQL, keeps a change from the dashboards (the heartbeat notifies
/// `foreman_changed` when the daemon started or ended tasks since the last one).
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// The idle tick skips its look at the queue while the store says nothing was committed; it
/// looks anyway this often, in case a commit left no trace the store can see (a SQLite commit
/// that left both files the same size within the file system's timestamp granularity).
pub(super) const LOOK_ANYWAY: Duration = Duration::from_secs(30);
/// A DB error that lasts is logged again this often (the loop retries it at every tick).
const DB_ERROR_EVERY: Duration = Duration::from_secs(10);
/// Heartbeats a daemon may miss before another daemon sharing its PostgreSQL database recovers
/// it: its running attempts become lost, its leases are released. (A busy daemon beats at least
/// once a second, an idle one every `heartbeat`.)
const STALE_BEATS: u32 = 4;
/// The least staleness limit, whatever the heartbeat: a server's hiccup is not a daemon's death.
const MIN_STALE: Duration = Duration::from_secs(2);

/// How long this daemon's heartbeat may be silent before another daemon recovers it.
pub(super) fn stale_after(config: &Config) -> Duration {
    (config.heartbeat * STALE_BEATS).max(MIN_STALE)
}

/// What the loop knows of the queue between pops, and when the fallback tick looks next.
pub(super) struct QueueLook {
    /// What had been committed at the tick's last look at the queue.
    pub(super) seen: Option<ChangeToken>,
    /// When the tick last looked.
    pub(super) at: Instant,
    /// When the earliest delayed task is due, as the last short pop saw it.
    pub(super) next_task_due: Option<f64>,
    /// What a cycle that claims costs, averaged: whether waiting a moment for more endings
    /// before the next one pays (`Foreman::gather`).
    pub(super) cycle_cost: Duration,
    /// When the next tick fires.
    pub(super) next_tick: Instant,
    /// Ticks in a row that found the daemon idle, nothing committed and the wake source healthy:
    /// each doubles the time to the next one, up to the heartbeat.
    pub(super) quiet_ticks: u32,
}

impl QueueLook {
    pub(super) fn new(tick: Duration) -> QueueLook {
        QueueLook {
            seen: None,
            at: Instant::now(),
            next_task_due: None,
            cycle_cost: Duration::ZERO,
            next_tick: Instant::now() + tick,
            quiet_ticks: 0,
        }
    }
}

/// The most a quiet tick doubles: 2^8 ticks, past any heartbeat worth having.
const MAX_QUIET_DOUBLINGS: u32 = 8;

/// Backward steps of the wall clock, and what is still to be done about one.
#[derive(Default)]
pub(super) struct ClockWatch {
    /// Tells the wall clock's backward steps from the monotonic clock's steady pace.
    pub(super) detector: StepDetector,
    /// Seconds the wall clock stepped back that the queue's due times have not been moved by yet
    /// (the DB refused the update); tried again at the next tick.
    pub(super) stepped_back: f64,
}

/// Where history pruning is.
pub(super) struct Pruning {
    pub(super) next: Instant,
    /// Where the next history pruning pass goes on from (a `foreman_run` key).
    pub(super) from: Option<(i64, i64)>,
    /// Where the next sweep for rows no daemon serves goes on from (a task id).
    pub(super) sweep_from: Option<i64>,
}

impl Default for Pruning {
    fn default() -> Pruning {
        Pruning {
            next: Instant::now(),
            from: None,
            sweep_from: None,
        }
    }
}

/// What the daemon publishes: its figures (to the database, with the heartbeat) and its status
/// (to systemd).
pub(super) struct Figures {
    /// Figures of the ended attempts not written to `foreman_stat` yet.
    pub(super) tally: Tally,
    pub(super) notifier: Notifier,
    /// When the heartbeat row was last written.
    pub(super) last_beat: Instant,
    /// How often the beat timer fires: the heartbeat, or half the watchdog's period if shorter.
    pub(super) beat_every: Duration,
    /// When it fires next.
    pub(super) next_beat: Instant,
}

impl Figures {
    pub(super) fn new(heartbeat: Duration) -> Figures {
        let notifier = Notifier::from_env();
        let beat_every = beat_every(&notifier, heartbeat);
        Figures {
            tally: Tally::default(),
            notifier,
            last_beat: Instant::now(),
            beat_every,
            next_beat: Instant::now() + beat_every,
        }
    }

    /// A reload changed the heartbeat: the beat timer follows from now.
    pub(super) fn set_heartbeat(&mut self, heartbeat: Duration) {
        self.beat_every = beat_every(&self.notifier, heartbeat);
        self.next_beat = Instant::now() + self.beat_every;
    }
}

/// The heartbeat, or half the watchdog's period if shorter.
fn beat_every(notifier: &Notifier, heartbeat: Duration) -> Duration {
    notifier
        .watchdog_every()
        .map_or(heartbeat, |w| w.min(heartbeat))
}

/// The DB's failures since it last took a write, so that a lasting one is logged once per
/// `DB_ERROR_EVERY`, and its end once.
#[derive(Default)]
pub(super) struct DbTrouble {
    /// When the first failure of the current streak happened.
    since: Option<Instant>,
    failures: u64,
    logged_at: Option<Instant>,
}

impl Foreman {
    /// The fallback tick: catches what no wake said (a producer that skipped its wakeup, an
    /// overflowed watch), and does the upkeep. Then sets when it fires next (`schedule_tick`).
    pub(super) fn tick(&mut self) {
        let quiet = self.tick_once();
        self.look.quiet_ticks = if quiet {
            self.look.quiet_ticks.saturating_add(1)
        } else {
            0
        };
        self.schedule_tick();
    }

    /// When the tick fires next: `tick` after this one, or, after ticks that found the daemon
    /// idle with nothing committed and its wake source healthy, twice as long each time, up to
    /// the heartbeat — and then with the heartbeat, so that an idle daemon wakes once per
    /// heartbeat. A producer's wake (or anything else that happens) brings `tick` back.
    pub(super) fn schedule_tick(&mut self) {
        let tick = self.config.tick;
        let doublings = self.look.quiet_ticks.min(MAX_QUIET_DOUBLINGS);
        let stretched = tick.saturating_mul(1 << doublings);
        let longest = tick.max(self.figures.beat_every);
        let now = Instant::now();
        self.look.next_tick = if stretched >= longest && self.figures.next_beat > now {
            self.figures.next_beat
        } else {
            now + stretched.min(longest)
        };
    }

    /// Something happened besides a tick: the next tick comes `tick` from now at the latest.
    pub(super) fn active(&mut self) {
        self.look.quiet_ticks = 0;
        let soon = Instant::now() + self.config.tick;
        if self.look.next_tick > soon {
            self.look.next_tick = soon;
        }
    }

    /// One tick's work; returns whether it found the daemon quiet: running nothing, nothing
    /// committed since the last look, and the wake source healthy.
    fn tick_once(&mut self) -> bool {
        if !matches!(self.stop.phase, Phase::Running) {
            self.flush();
            return false;
        }
        if self.db_lost() {
            return false;
        }
        self.watch_clock();
        if Instant::now() >= self.pruning.next {
            self.prune();
        }
        if (!self.figures.tally.is_empty() || self.store.unannounced())
            && self.figures.last_beat.elapsed() >= FLUSH_EVERY
        {
            self.write_beat();
        }
        // Before the busy check: an abort matters most when every worker is busy.
        let poked = self.wake.take_control();
        self.watch_control(poked);
        if self.free_slots() == (0, 0) {
            if !self.attempts.ended.is_empty() {
                self.fill(); // A DB error kept them from being recorded; try again.
            }
            return false;
        }
        let woken = self.wake.look();
        // Taken before the look, so a commit during it shows as a change next time.
        let stamp = self.store.changes();
        if !woken
            && stamp.is_some()
            && stamp == self.look.seen
            && self.attempts.ended.is_empty()
            && self.look.at.elapsed() < LOOK_ANYWAY
        {
            // Nothing was committed since the last look: the queue is as it was.
            return self.attempts.running.is_empty() && self.wake.healthy();
        }
        self.look.seen = stamp;
        self.look.at = Instant::now();
        match self.store.next_due() {
            Ok(Some(due)) if due <= self.store.now() => self.fill(),
            Ok(due) => {
                self.look.next_task_due = due;
                if !self.attempts.ended.is_empty() {
                    self.fill();
                }
            }
            Err(e) => self.db_error("cannot read the queue", &e),
        }
        false
    }

    /// Whether the database was lost under the daemon (its file deleted, or replaced by a restored
    /// backup): producers then write to a database it never reads. It stops popping, lets its
    /// running tasks end, and `run` returns an error (exit 1), so that the supervisor's restart
    /// opens the database that is there now.
    pub(super) fn db_lost(&mut self) -> bool {
        let Some(what) = self.store.lost() else {
            return false;
        };
        log::error!(
            "database {} {what} while the daemon ran: it stops popping and exits with status 1 once its {} running task(s) end, so that a restart opens the file now at that path",
            self.config.db,
            self.attempts.running.len()
        );
        self.stop.fatal = Some(lost_database(&self.config.db, what));
        self.stop_popping("database gone");
        true
    }

    /// Notices a backward step of the wall clock and moves what waits for a wall-clock time back
    /// by as much, so that a delay or an `every` interval lasts what was asked, not that plus
    /// the step. (A forward step needs nothing: what became due runs, a missed window once.)
    pub(super) fn watch_clock(&mut self) {
        // The database's own clock (PostgreSQL) keeps its due times: the host's steps do not
        // touch them.
        if !self.store.follows_host_clock() {
            return;
        }
        let now = unix_now();
        if let Some(back) = self.clock.detector.observe(Instant::now(), now) {
            log::warn!(
                "the wall clock stepped back {back:.1}s: moving the due times of delayed tasks and of `every` schedules back as much"
            );
            self.clock.stepped_back += back;
            self.look.next_task_due = None;
            self.schedules.step_back(&mut self.store, back, now);
        }
        if self.clock.stepped_back > 0.0 {
            match self.store.move_due_back(self.clock.stepped_back, now) {
                Ok(moved) => {
                    if moved > 0 {
                        log::info!(
                            "moved {moved} delayed task(s) {:.1}s earlier after the clock step",
                            self.clock.stepped_back
                        );
                    }
                    self.clock.stepped_back = 0.0;
                }
                Err(e) => self.db_error("cannot move delayed tasks after the clock step", &e),
            }
        }
    }

    /// Prunes history older than the retention, a window of rows at a time: the next window at
    /// the next tick until the whole history has been looked at, then again after a while.
    pub(super) fn prune(&mut self) {
        self.sweep_unserved();
        let now = self.store.now();
        let before = now - self.config.history_retention.as_secs_f64();
        if self.pruning.from.is_none() {
            // Once per pass over the history: a minute's figures are few rows.
            let oldest = minute_of(now - self.config.stats_retention.as_secs_f64());
            if let Err(e) = self.store.prune_stats(oldest) {
                self.db_error("cannot prune old figures", &e);
            }
        }
        match self
            .store
            .prune_history(before, self.pruning.from, PRUNE_BATCH)
        {
            Ok((pruned, next)) => {
                if pruned > 0 {
                    log::debug!("pruned {pruned} history row(s)");
                }
                self.pruning.from = next;
                // A short retention (tests, small disks) is honoured to a tenth of itself.
                let every = PRUNE_EVERY
                    .min(self.config.history_retention / 10)
                    .max(self.config.tick);
                self.pruning.next = if next.is_some() {
                    Instant::now()
                } else {
                    Instant::now() + every
                };
            }
            Err(e) => {
                self.pruning.next = Instant::now() + PRUNE_EVERY;
                self.db_error("cannot prune old history", &e);
            }
        }
    }

    /// Buries the rows whose task name no daemon has served for `unserved_after` (PostgreSQL,
    /// where each daemon claims only the names it serves), a window of rows per pass.
    fn sweep_unserved(&mut self) {
        match self
            .store
            .bury_unserved(self.config.unserved_after, self.pruning.sweep_from)
        {
            Ok((buried, next)) => {
                self.pruning.sweep_from = next;
                for row in &buried {
                    log::error!(
                        "task {} {} moved to foreman_dead: {}",
                        row.task_id,
                        row.task_name.as_deref().unwrap_or("(no name)"),
                        row.reason
                    );
                    crate::alert::row_buried(row);
                }
            }
            Err(e) => self.db_error("cannot look for tasks no daemon serves", &e),
        }
    }

    /// The heartbeat timer: pings systemd's watchdog (from this loop, so a stuck loop gets the
    /// daemon restarted), and writes the heartbeat row with the figures when they are due.
    pub(super) fn beat(&mut self) {
        self.figures.next_beat = Instant::now() + self.figures.beat_every;
        // A tenth short of the period: the timer fires every `heartbeat` (or more often, for the
        // watchdog), and the last write ended a little after its firing.
        let due = self.config.heartbeat.mul_f64(0.9);
        if !self.figures.tally.is_empty()
            || self.store.unannounced()
            || self.figures.last_beat.elapsed() >= due
        {
            self.write_beat();
        }
        let status = self.status_line();
        self.figures.notifier.alive(status);
    }

    /// Writes the heartbeat row and the figures counted since the last one, in one transaction.
    /// Our own commit must not read as a producer's to the next tick (`own_write`).
    pub(super) fn write_beat(&mut self) {
        let stats = self.figures.tally.take();
        let pools = self.pools_json();
        let totals = self.figures.tally.totals_json();
        let leases: Vec<(i64, f64)> = self
            .attempts
            .running
            .iter()
            .filter(|(_, r)| r.leased)
            .map(|(id, r)| {
                let length = super::lease_length(&self.config, &r.name);
                (*id, length.as_secs_f64())
            })
            .collect();
        let beat = Beat {
            workers: self.config.workers,
            pools_json: &pools,
            totals_json: &totals,
            served: &self.claims.served,
            leases: &leases,
        };
        let now = self.store.now();
        let written = self.store.own_write(&mut self.look.seen, |store| {
            store.heartbeat(now, &beat, &stats)
        });
        match written {
            Ok(news) => {
                self.db_works();
                self.figures.last_beat = Instant::now();
                self.beat_news(&news);
                // Another process committed (on PostgreSQL: the heartbeat's look at the queue
                // saw it change): a stretched tick looks soon, not a heartbeat later.
                if self.store.changes() != self.look.seen {
                    self.active();
                }
            }
            Err(e) => {
                self.figures.tally.restore(stats);
                self.db_error("cannot write the heartbeat", &e);
            }
        }
    }

    /// What the heartbeat learnt of the other daemons sharing the database, and of this one.
    fn beat_news(&mut self, news: &BeatNews) {
        if let Some(by) = news.recovered_by {
            log::error!(
                "this daemon was recovered by daemon {by}: its heartbeat was older than {} (it was cut off from the database, or stopped); its running attempts were recorded lost and its leases released. It registered again and carries on; the tasks it still runs record how they really ended",
                format_duration(stale_after(&self.config))
            );
        }
        for daemon in &news.recovered {
            log::warn!(
                "daemon {} (pid {} on {}) stopped heartbeating: recovered it: {} running attempt(s) recorded lost, {} lease(s) released to run again",
                daemon.id,
                daemon.pid,
                daemon.host,
                daemon.lost,
                daemon.released
            );
        }
        for id in &news.leases_lost {
            log::warn!(
                "task {id}: another daemon holds its lease now; it may run there too (at-least-once)"
            );
        }
    }

    /// The pools as the heartbeat row shows them: what `foreman status` and `health` need to tell
    /// a saturated pool from a stalled queue.
    /// During and after a reload a pool is its current generation and the ones it replaces,
    /// counted together: they all run its tasks until they are gone.
    pub(super) fn pools_json(&self) -> String {
        let pools = &self.workers.pools;
        let pools: Vec<serde_json::Value> = pools
            .iter()
            .filter(|g| matches!(g.role, Role::Current { .. }))
            .map(|current| {
                let pool = &current.pool;
                let same: Vec<&ProcessPool> = pools
                    .iter()
                    .filter(|g| g.role != Role::Stopping && g.pool.name == pool.name)
                    .map(|g| &g.pool)
                    .collect();
                let served = pool
                    .served()
                    .or_else(|| same.iter().find_map(|p| p.served()));
                let tasks: Vec<&String> = served.into_iter().flatten().collect();
                serde_json::json!({
                    "name": &*pool.name,
                    "processes": pool.target(),
                    "up": same.iter().map(|p| p.up()).sum::<usize>(),
                    "busy": same.iter().map(|p| p.busy()).sum::<usize>(),
                    "tasks": tasks,
                })
            })
            .collect();
        serde_json::Value::Array(pools).to_string()
    }

    /// systemd's one-line status (`systemctl status` shows it).
    pub(super) fn status_line(&self) -> String {
        let phase = match self.stop.phase {
            Phase::Running => "",
            Phase::Draining { .. } | Phase::Terminating { .. } => "stopping; ",
        };
        let busy = self.attempts.running.len().min(self.config.workers);
        let prefetched = match self.attempts.running.len() - busy {
            0 => String::new(),
            n => format!(" (+{n} prefetched)"),
        };
        format!(
            "{phase}{busy}/{} busy{prefetched}; {} task(s) ended in the last minute",
            self.config.workers,
            self.figures.tally.last_minute(self.store.now())
        )
    }

    /// A DB operation failed: it is retried at the next event or tick. The first failure is
    /// logged at once, then the latest one every `DB_ERROR_EVERY` while they last: a full disk
    /// writes a line every few seconds, not one per tick. Not by the text: one cause reads
    /// differently from the pop, the heartbeat and a schedule (and with the free space in it).
    pub(super) fn db_error(&mut self, what: &str, e: &Error) {
        // Whatever failed, the next tick looks at the queue: a pop that failed left due rows
        // behind, and the disk coming back commits nothing that would say so.
        self.look.seen = None;
        let now = Instant::now();
        let trouble = &mut self.db_trouble;
        trouble.failures += 1;
        let since = *trouble.since.get_or_insert(now);
        let due = trouble
            .logged_at
            .is_none_or(|at| now.duration_since(at) >= DB_ERROR_EVERY);
        if !due {
            return;
        }
        let error = e.to_string();
        if trouble.logged_at.is_none() {
            log::error!(
                "{what}: {error} (retrying every {}; logged again every {} while it lasts)",
                format_duration(self.config.tick),
                format_duration(DB_ERROR_EVERY)
            );
        } else {
            log::error!(
                "{what}: {error} (failing for {:.1}s, {} attempts)",
                now.duration_since(since).as_secs_f64(),
                trouble.failures
            );
        }
        trouble.logged_at = Some(now);
    }

    /// A DB write succeeded: ends a streak of failures, saying so.
    pub(super) fn db_works(&mut self) {
        let trouble = std::mem::take(&mut self.db_trouble);
        if let Some(since) = trouble.since {
            log::info!(
                "the database takes writes again after {:.1}s ({} failed attempts)",
                since.elapsed().as_secs_f64(),
                trouble.failures
            );
        }
    }
}
