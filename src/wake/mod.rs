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
/// statement notified at its commit already (`NOTIFY foreman` is transactional).
pub fn poke(config: &Config, done: &str) {
    let (Database::Sqlite(_), Some(path)) = (&config.db, &config.wakeup_dir) else {
        return;
    };
    let wakeup = WakeupDir::at(path);
    if let Err(e) = wakeup.touch(&format!("cli-{}", std::process::id())) {
        log::warn!(
            "{done}, but touching {} failed ({e}); the daemon sees it at its next tick",
            wakeup.path().display()
        );
    }
}
