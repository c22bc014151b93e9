//! The wake seam: whatever tells the foreman loop "a producer committed, pop now", and what a
//! producer does to say so: the wakeup directory (inotify), the SQLite way, or PostgreSQL's
//! `LISTEN foreman` on a thread of its own (or polling, where `LISTEN` cannot work), each a
//! variant of `Wakeups` fed into the same channel, so the loop does not change. Every source is
//! only a hint: the loop's fallback tick looks at the queue anyway, so a lost wake delays a task,
//! it never stalls the queue.

use crossbeam_channel::Sender;

use crate::config::Config;
use crate::database::Database;
use crate::error::{Error, Result};

pub mod dir;
#[cfg(feature = "postgres")]
pub mod listen;

use dir::{DirWakeups, WakeupDir};
#[cfg(feature = "postgres")]
use listen::ListenWakeups;

/// The loop's source of wakes. Each wake is one `()` on the channel given to `start`, which is
/// bounded(1): a pending wake already covers whatever comes after it.
pub enum Wakeups {
    Dir(DirWakeups),
    #[cfg(feature = "postgres")]
    Listen(ListenWakeups),
}

impl Wakeups {
    /// What `foreman run` checks before it takes its lock.
    pub fn preflight(config: &Config) -> Result<()> {
        match (&config.db, &config.wakeup_dir) {
            (Database::Sqlite(_), Some(path)) => WakeupDir::preflight(path, config.tick),
            _ => Ok(()),
        }
    }

    /// Starts watching, before the first pop, so that a task enqueued during startup cannot slip
    /// between the two.
    pub fn start(config: &Config, wakes: Sender<()>) -> Result<Wakeups> {
        match (&config.db, &config.wakeup_dir) {
            #[cfg(feature = "postgres")]
            (Database::Postgres(url), _) => {
                ListenWakeups::start(url, &config.db.to_string(), config.listen, wakes)
                    .map(Wakeups::Listen)
            }
            (_, Some(path)) => DirWakeups::start(path, config.tick, wakes).map(Wakeups::Dir),
            (_, None) => Err(Error::Config(format!(
                "{}: no wakeup dir; set wakeup_dir (FOREMAN_WAKEUP_DIR)",
                config.db
            ))),
        }
    }

    /// A wake arrived on the channel: re-arms the source (a wakeup dir clears its files).
    pub fn woken(&mut self) {
        match self {
            Wakeups::Dir(dir) => dir.woken(),
            #[cfg(feature = "postgres")]
            Wakeups::Listen(_) => {}
        }
    }

    /// Whether a producer said, since the last call, that the operator changed what the daemons
    /// must do (a pause, a resume, an abort): the loop then reads its control state again.
    pub fn take_control(&mut self) -> bool {
        match self {
            Wakeups::Dir(dir) => dir.take_control(),
            #[cfg(feature = "postgres")]
            Wakeups::Listen(listen) => listen.take_control(),
        }
    }

    /// Whether `take_control` says of every control change (a wake source that carries them),
    /// so that the loop need not read the control state at every tick to see one.
    pub fn tells_control(&self) -> bool {
        match self {
            Wakeups::Dir(_) => false,
            #[cfg(feature = "postgres")]
            Wakeups::Listen(_) => true,
        }
    }

    /// The fallback tick's look at the source, which also repairs it (a wakeup dir that was
    /// removed is made and watched again). Returns whether a producer may have signalled without
    /// a wake reaching the loop.
    pub fn look(&mut self) -> bool {
        match self {
            Wakeups::Dir(dir) => dir.look(),
            // Its thread repairs the connection itself, and wakes the loop when it does.
            #[cfg(feature = "postgres")]
            Wakeups::Listen(_) => false,
        }
    }

    /// Whether every producer's signal reaches the loop now (an inotify watch that is set up
    /// and has lost nothing): the fallback tick may then stretch while the daemon is idle.
    pub fn healthy(&self) -> bool {
        match self {
            Wakeups::Dir(dir) => dir.healthy(),
            #[cfg(feature = "postgres")]
            Wakeups::Listen(listen) => listen.healthy(),
        }
    }

    /// Where wakes come from, for the startup line.
    pub fn describe(&self) -> String {
        match self {
            Wakeups::Dir(dir) => format!("wakeup dir {}", dir.path().display()),
            #[cfg(feature = "postgres")]
            Wakeups::Listen(listen) => listen.describe(),
        }
    }
}

/// What a producer does after its commit (the CLI's `enqueue` and `dead requeue`): wakes the
/// daemon. The rows are committed already: a failed wake only delays them until the daemon's next
/// tick, so it is a warning. `done` says what was committed. On PostgreSQL the store's own
/// statement notified the daemons at its commit already (`NOTIFY foreman` is transactional), and
/// the dashboards are told too (`announce`): a delayed row notifies no daemon.
pub fn poke(config: &Config, store: &crate::store::Store, done: &str) {
    if matches!(config.db, Database::Sqlite(_)) {
        touch(config, done, &format!("cli-{}", std::process::id()));
    } else {
        announce(store, done);
    }
}

/// After a change no daemon needs to hear of (a dead letter purged, a queued task cancelled):
/// tells the open dashboards, `NOTIFY foreman_changed` on PostgreSQL. On SQLite they see the
/// files change, and this does nothing.
pub fn announce(store: &crate::store::Store, done: &str) {
    if let Err(e) = store.announce() {
        log::warn!(
            "{done}, but telling the dashboards failed ({e}); their pages show it at their next change"
        );
    }
}

/// What `foreman pause`, `resume` and `cancel` do after their commit: wake the daemons and tell
/// them to read their control state (paused names, aborts) again. Without it they see the change
/// at their next tick. On PostgreSQL it is `NOTIFY foreman, 'control'` on the command's
/// connection.
pub fn poke_control(config: &Config, store: &crate::store::Store, done: &str) {
    if !matches!(config.db, Database::Sqlite(_)) {
        if let Err(e) = store.notify(CONTROL_PAYLOAD) {
            log::warn!(
                "{done}, but notifying the daemons failed ({e}); they see it at their next tick"
            );
        }
        return;
    }
    touch(
        config,
        done,
        &format!("{}{}", dir::CONTROL_PREFIX, std::process::id()),
    );
}

/// The payload of a `NOTIFY foreman` that asks the daemons to read their control state again.
pub const CONTROL_PAYLOAD: &str = "control";
#[cfg(feature = "postgres")]
const _: () =
    assert!(crate::store::postgres::listen::CONTROL_PAYLOAD.len() == CONTROL_PAYLOAD.len());

/// `poke` for a producer that knows the wakeup dir but has no `Config` (`Client`).
pub fn poke_dir(dir: Option<&std::path::Path>, done: &str) {
    touch_dir(dir, done, &format!("cli-{}", std::process::id()));
}

fn touch(config: &Config, done: &str, name: &str) {
    touch_dir(config.wakeup_dir.as_deref(), done, name);
}

fn touch_dir(dir: Option<&std::path::Path>, done: &str, name: &str) {
    let Some(path) = dir else {
        return;
    };
    let wakeup = WakeupDir::at(path);
    if let Err(e) = wakeup.touch(name) {
        log::warn!(
            "{done}, but touching {} failed ({e}); the daemon sees it at its next tick",
            wakeup.path().display()
        );
    }
}
