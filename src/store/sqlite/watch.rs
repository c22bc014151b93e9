//! `DbWatch`: tells a reader that another process may have committed to the SQLite database, by
//! watching the database's directory (inotify, through `notify`). It never opens the database and
//! is only a hint: the reader still looks at the data, and looks on a timer too, since an event can
//! be missed or the watch refused.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

pub struct DbWatch {
    /// A watch that sees nothing and only paces the reader: every `changed_within` waits this
    /// long at most, then says "look" (a database whose commits cannot be watched).
    every: Option<Duration>,
    /// Dropping it ends the watch.
    _watcher: Option<RecommendedWatcher>,
    /// Kept so that the channel stays open without a watcher: `changed_within` then times out
    /// instead of returning at once in a busy loop.
    _sender: Sender<()>,
    changes: Receiver<()>,
}

impl DbWatch {
    /// Watches the directory of `db`, non-recursively, for changes to the files whose names start
    /// with its file name: the database itself and its `-wal`, `-shm` and `-journal` files (a
    /// commit in WAL mode writes `-wal`). When the watch cannot be set up (inotify limits, an
    /// unreadable directory) it logs a warning and `changed_within` only times out.
    pub fn new(db: &Path) -> DbWatch {
        // bounded(1): one pending change already says "look again".
        let (sender, changes) = crossbeam_channel::bounded(1);
        let watcher = match watch(db, sender.clone()) {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                log::warn!(
                    "cannot watch {} for changes ({e}); looking at it every second instead",
                    db.display()
                );
                None
            }
        };
        DbWatch {
            every: None,
            _watcher: watcher,
            _sender: sender,
            changes,
        }
    }

    /// A watch of nothing: `changed_within` says "look" every `interval`.
    pub fn every(interval: Duration) -> DbWatch {
        let (sender, changes) = crossbeam_channel::bounded(1);
        DbWatch {
            every: Some(interval),
            _watcher: None,
            _sender: sender,
            changes,
        }
    }

    /// Blocks until a change has been seen since the last call, or `timeout` passes.
    pub fn changed_within(&self, timeout: Duration) -> bool {
        if let Some(every) = self.every {
            std::thread::sleep(timeout.min(every));
            return true;
        }
        self.changes.recv_timeout(timeout).is_ok()
    }
}

fn watch(db: &Path, wakes: Sender<()>) -> notify::Result<RecommendedWatcher> {
    let prefix: OsString = db.file_name().map(ToOwned::to_owned).unwrap_or_default();
    let dir = match db.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            Ok(event) => {
                event.need_rescan()
                    || (!matches!(event.kind, EventKind::Access(_))
                        && event.paths.iter().any(|path| {
                            path.file_name()
                                .is_some_and(|name| name.as_bytes().starts_with(prefix.as_bytes()))
                        }))
            }
            // An error may have hidden a change: look.
            Err(_) => true,
        };
        if relevant {
            let _ = wakes.try_send(());
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}
