//! The wakeup directory, the SQLite way to wake the daemon: producers create a file in it after
//! their commit. `WakeupDir` owns the directory's creation and checks (a directory, ours, writable),
//! its inotify watch (through `notify`) and clearing the files the daemon has consumed;
//! `DirWakeups` keeps a watch on it for the loop, setting it up again when the directory is
//! removed or replaced, or when no watch could be had.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use crossbeam_channel::Sender;
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use crate::duration::format_duration;
use crate::error::{Error, Result};
use crate::fs_check;

pub struct WakeupDir {
    path: PathBuf,
    /// The directory's mtime just before the last `clear` read it.
    cleared_at_mtime: Option<SystemTime>,
    /// (device, inode) of the directory `prepare` checked: the one a watch sees. `None` for a
    /// producer's view, which never watches.
    identity: Option<(u64, u64)>,
    /// Set by the watch when the directory itself is removed: a directory created again at once
    /// may get the same inode number back, which the identity check cannot tell.
    watch_lost: Arc<AtomicBool>,
    /// Set by the watch when a control file appeared (`CONTROL_PREFIX`): the operator paused,
    /// resumed or aborted something, and the loop should read its control state again.
    control: Arc<AtomicBool>,
}

/// The start of the name of a wakeup file that says "control changed" (`foreman pause`, `resume`,
/// `cancel` of a running task) rather than "tasks were queued".
pub const CONTROL_PREFIX: &str = "control-";

/// What became of the directory `prepare` checked: producers now reach another one, or none, and
/// a watch on it sees nothing they do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    Gone,
    Replaced,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Lost::Gone => "was removed",
            Lost::Replaced => "was replaced by another directory",
        })
    }
}

impl WakeupDir {
    /// Creates the directory with mode 0700 if it is missing; refuses one that is not a directory,
    /// that this user cannot write, that is owned by another user or writable by every user (who
    /// could then stall or flood this daemon). A symlink is followed, and its target checked.
    pub fn prepare(path: &Path) -> Result<WakeupDir> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(path)
                    .map_err(|e| {
                        // Say why in the preflight's words when it can tell.
                        WakeupDir::check(path).err().unwrap_or_else(|| {
                            Error::io(format!("cannot create wakeup dir {}", path.display()), e)
                        })
                    })?;
                // `mode` is filtered by the umask; the directory must be 0700 whatever it is.
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(
                    |e| Error::io(format!("cannot chmod wakeup dir {}", path.display()), e),
                )?;
            }
            Err(e) => return Err(unreachable(path, &e)),
            Ok(meta) => check_existing(path, &meta)?,
        }
        let mut dir = WakeupDir::at(path);
        dir.identity = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        Ok(dir)
    }

    /// What `foreman run` checks of the wakeup dir before it takes the PID lock: what `prepare`
    /// would refuse, and whether it sits on a file system where inotify misses other machines'
    /// files (a warning: the daemon then relies on its `tick`).
    pub fn preflight(path: &Path, tick: Duration) -> Result<()> {
        WakeupDir::check(path)?;
        if let Some(fs) = fs_check::remote_fs_at(path) {
            log::warn!(
                "wakeup dir {} is on {fs}: inotify does not see files created on other machines; the \
                 daemon relies on its {} tick there",
                path.display(),
                format_duration(tick)
            );
        }
        Ok(())
    }

    /// What `prepare` refuses, without creating anything: for `foreman run`'s preflight. A missing
    /// directory passes if it can be created.
    pub fn check(path: &Path) -> Result<()> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs_check::creatable(path, "wakeup dir")
            }
            Err(e) => Err(unreachable(path, &e)),
            Ok(meta) => check_existing(path, &meta),
        }
    }

    /// The directory as a producer sees it: no checks, nothing created.
    pub fn at(path: &Path) -> WakeupDir {
        WakeupDir {
            path: path.to_path_buf(),
            cleared_at_mtime: None,
            identity: None,
            watch_lost: Arc::default(),
            control: Arc::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Watches the directory; every creation or change in it (and every overflow or error of the
    /// watch) sends one wake. `wakes` should be bounded(1): a pending wake already covers the rest.
    pub fn watch(&self, wakes: Sender<()>) -> Result<RecommendedWatcher> {
        // notify names events by the absolute path it was asked to watch.
        let itself = std::path::absolute(&self.path).map_err(|e| {
            Error::io(
                format!("cannot watch wakeup dir {}", self.path.display()),
                e,
            )
        })?;
        let lost = Arc::clone(&self.watch_lost);
        let control = Arc::clone(&self.control);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(event) = &event
                    && matches!(event.kind, EventKind::Create(_))
                    && event.paths.iter().any(|path| {
                        path.file_name().is_some_and(|n| {
                            n.as_encoded_bytes().starts_with(CONTROL_PREFIX.as_bytes())
                        })
                    })
                {
                    control.store(true, Ordering::Relaxed);
                }
                let wake = match &event {
                    Ok(event) if matches!(event.kind, EventKind::Remove(_)) => {
                        // The directory itself is gone, and this watch with it: the loop must
                        // set up another one, now.
                        let gone = event.paths.contains(&itself);
                        if gone {
                            lost.store(true, Ordering::Relaxed);
                        }
                        gone || event.need_rescan()
                    }
                    Ok(event) => event.need_rescan() || !matches!(event.kind, EventKind::Access(_)),
                    Err(e) => {
                        log::warn!(
                            "wakeup watch error (the fallback tick keeps the queue moving): {e}"
                        );
                        true
                    }
                };
                if wake {
                    let _ = wakes.try_send(());
                }
            })
            .map_err(|e| self.unwatchable(&e))?;
        watcher
            .watch(&self.path, RecursiveMode::NonRecursive)
            .map_err(|e| self.unwatchable(&e))?;
        Ok(watcher)
    }

    /// Why a watch could not be set up, naming the kernel limit when that is the reason.
    fn unwatchable(&self, e: &notify::Error) -> Error {
        let limit = match &e.kind {
            notify::ErrorKind::MaxFilesWatch => Some("watches (fs.inotify.max_user_watches)"),
            notify::ErrorKind::Io(io) if io.raw_os_error() == Some(libc::EMFILE) => {
                Some("inotify instances (fs.inotify.max_user_instances) or open files")
            }
            _ => None,
        };
        let what = format!("cannot watch wakeup dir {}", self.path.display());
        match limit {
            // SAFETY: geteuid has no preconditions.
            Some(limit) => Error::Environment(format!(
                "{what}: uid {} has used up its {limit}; other programs of this user hold them",
                unsafe { libc::geteuid() }
            )),
            None => Error::io(what, io::Error::other(e.to_string())),
        }
    }

    /// Removes the wakeup files, so that producers which create a file only when it is absent will
    /// create (and so signal) again. Returns how many were removed.
    pub fn clear(&mut self) -> usize {
        // Taken before reading, so a file created during the read changes it and is seen next time.
        self.cleared_at_mtime = self.mtime();
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return 0;
        };
        entries
            .filter_map(std::result::Result::ok)
            .filter(|entry| std::fs::remove_file(entry.path()).is_ok())
            .count()
    }

    /// `clear`, but only when the directory changed since the last one. Reading a directory makes
    /// inotify report an open to the watcher thread, so the idle tick checks the mtime instead. A
    /// change hidden by the clock's granularity costs at most a tick of latency: the tick checks
    /// the queue itself whatever the directory holds. The same `stat` tells whether the directory
    /// is still the one `prepare` checked (and the watch sees): `Err` when it is not.
    pub fn clear_if_changed(&mut self) -> std::result::Result<usize, Lost> {
        if self.watch_lost() {
            return Err(Lost::Gone);
        }
        let meta = std::fs::metadata(&self.path);
        if let Some(known) = self.identity {
            match &meta {
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Lost::Gone),
                Ok(m) if (m.dev(), m.ino()) != known => return Err(Lost::Replaced),
                _ => {}
            }
        }
        let mtime = meta.ok().and_then(|m| m.modified().ok());
        match self.cleared_at_mtime {
            Some(seen) if mtime == Some(seen) => Ok(0),
            _ => Ok(self.clear()),
        }
    }

    /// Whether the watch saw a control file since the last call.
    pub fn take_control(&self) -> bool {
        self.control.swap(false, Ordering::Relaxed)
    }

    /// Whether the watch saw the directory itself removed (and so stopped watching).
    pub fn watch_lost(&self) -> bool {
        self.watch_lost.load(Ordering::Relaxed)
    }

    fn mtime(&self) -> Option<SystemTime> {
        std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok()
    }

    /// What a producer does after committing: create a file named `name` unless it already exists.
    pub fn touch(&self, name: &str) -> io::Result<()> {
        let file = self.path.join(name);
        if file.exists() {
            return Ok(());
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .map(drop)
    }
}

fn unreachable(path: &Path, err: &io::Error) -> Error {
    let subject = format!("wakeup dir {}", path.display());
    fs_check::refused("", &subject, &fs_check::unreachable(path, err), None)
}

fn check_existing(path: &Path, link: &std::fs::Metadata) -> Result<()> {
    // A symlink is followed (a volume mount or a deploy tool may put one there): what must be a
    // private directory of ours is its target, so the checks below are the target's.
    let (meta, subject) = if link.file_type().is_symlink() {
        let target = std::fs::read_link(path).unwrap_or_default();
        let subject = format!(
            "wakeup dir {} (a symlink to {})",
            path.display(),
            target.display()
        );
        match std::fs::metadata(path) {
            Ok(meta) => (meta, subject),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let target = path.parent().unwrap_or(Path::new("")).join(target);
                return Err(Error::Environment(format!(
                    "{subject} points to nothing; create it (mkdir -m 0700 {}) or remove the symlink",
                    target.display()
                )));
            }
            Err(e) => {
                return Err(Error::Environment(format!(
                    "{subject} cannot be followed ({e}); point it at a directory this user can reach"
                )));
            }
        }
    } else {
        (link.clone(), format!("wakeup dir {}", path.display()))
    };
    if !meta.is_dir() {
        return Err(Error::Environment(format!(
            "{subject} is not a directory; remove it, or set wakeup_dir (FOREMAN_WAKEUP_DIR) to a directory"
        )));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(Error::Config(format!(
            "{subject} is owned by uid {}, not by this user (uid {me}); refusing it",
            meta.uid()
        )));
    }
    // Anyone who can create files there can wake the daemon at will, and with the sticky bit plant
    // files it cannot remove; and `clear` deletes every file of ours in it, so a shared directory
    // such as /tmp given by mistake would lose them. `init` and `run` create it 0700.
    if meta.mode() & 0o002 != 0 {
        return Err(Error::Config(format!(
            "{subject} is writable by every user (mode {:04o}): any local user could wake this daemon or plant files in it; refusing it (chmod o-w {}, or let foreman create it: it makes it 0700)",
            meta.mode() & 0o7777,
            path.display()
        )));
    }
    // The daemon removes the files producers create, which takes write permission on the
    // directory, not on the files.
    fs_check::writable(path).map_err(|e| {
        fs_check::refused(
            "",
            &subject,
            &fs_check::refusal(path, &e),
            Some("producers create files there and the daemon removes them"),
        )
    })
}

/// The wakeup dir as the loop uses it: watched, its files cleared after each wake, and set up
/// again (at once, from the watch's own removal event, or at the tick) when it goes.
pub struct DirWakeups {
    dir: WakeupDir,
    /// The inotify watch; `None` while none can be set up (the tick tries again).
    watcher: Option<RecommendedWatcher>,
    /// Where a new watch sends its wakes.
    wakes: Sender<()>,
    /// The last problem with the directory or its watch that was logged, so each is logged once.
    trouble: Option<String>,
    /// The fallback tick, which the messages name as what keeps the queue moving meanwhile.
    tick: Duration,
}

impl DirWakeups {
    /// Creates the directory if it is missing and watches it. A watch that cannot be set up (out
    /// of inotify instances or watches, which other programs of this user hold) is a warning: the
    /// tick alone keeps the queue moving, and every tick tries the watch again.
    pub fn start(path: &Path, tick: Duration, wakes: Sender<()>) -> Result<DirWakeups> {
        let dir = WakeupDir::prepare(path)?;
        let (watcher, trouble) = match dir.watch(wakes.clone()) {
            Ok(watcher) => (Some(watcher), None),
            Err(e) => {
                let message = unwatched(&e, tick);
                log::warn!("{message}");
                (None, Some(message))
            }
        };
        let mut wakeups = DirWakeups {
            dir,
            watcher,
            wakes,
            trouble,
            tick,
        };
        wakeups.dir.clear();
        Ok(wakeups)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Whether a control file appeared since the last call.
    pub fn take_control(&self) -> bool {
        self.dir.take_control()
    }

    /// A wake arrived: clears the files (so create-if-absent producers signal again), and
    /// watches the directory again if the wake was the watch's own removal.
    pub fn woken(&mut self) {
        if self.dir.watch_lost() {
            self.look();
        }
        self.dir.clear();
    }

    /// The tick's look at the directory: clears files left there (a stale file would keep
    /// create-if-absent producers from ever signalling again), and sets the watch up again when
    /// the directory was removed or replaced, or when none could be set up before. Returns
    /// whether a producer may have signalled since the last look.
    pub fn look(&mut self) -> bool {
        match self.dir.clear_if_changed() {
            Ok(removed) => {
                if self.watcher.is_none() {
                    self.rewatch(None);
                }
                removed > 0
            }
            Err(lost) => {
                self.rewatch(Some(lost));
                true
            }
        }
    }

    /// Whether a file a producer creates reaches the loop now: the directory is watched, and
    /// neither it nor its watch was lost.
    pub fn healthy(&self) -> bool {
        self.watcher.is_some() && self.trouble.is_none() && !self.dir.watch_lost()
    }

    /// (Re)creates and watches the directory. Each distinct failure is logged once; the tick
    /// tries again, and meanwhile moves the queue by itself.
    fn rewatch(&mut self, lost: Option<Lost>) {
        let path = self.dir.path().to_path_buf();
        if lost.is_some() {
            self.watcher = None; // It watches a directory producers no longer reach.
        }
        let set_up = WakeupDir::prepare(&path)
            .and_then(|dir| dir.watch(self.wakes.clone()).map(|w| (dir, w)));
        match set_up {
            Ok((mut dir, watcher)) => {
                dir.clear();
                self.dir = dir;
                self.watcher = Some(watcher);
                self.trouble = None;
                match lost {
                    Some(lost) => log::warn!(
                        "wakeup dir {} {lost} while the daemon ran; watching it again",
                        path.display()
                    ),
                    None => log::info!(
                        "watching wakeup dir {} again: new tasks start at once again",
                        path.display()
                    ),
                }
            }
            Err(e) => {
                let message = match lost {
                    Some(lost) => format!(
                        "wakeup dir {} {lost} while the daemon ran, and cannot be set up again: {e}; tasks start within the {} tick until it can",
                        path.display(),
                        format_duration(self.tick)
                    ),
                    None => unwatched(&e, self.tick),
                };
                if self.trouble.as_deref() != Some(message.as_str()) {
                    log::warn!("{message}");
                    self.trouble = Some(message);
                }
            }
        }
    }
}

/// Why the wakeup dir is not watched, and what that costs.
fn unwatched(e: &Error, tick: Duration) -> String {
    format!(
        "{e}; falling back to the {} tick until a watch can be set up (a new task may wait up to a tick to start)",
        format_duration(tick)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_reads_the_directory_only_after_a_change() {
        let root = tempfile::tempdir().unwrap();
        let mut dir = WakeupDir::prepare(&root.path().join("w")).unwrap();
        dir.touch("a").unwrap();
        assert_eq!(
            dir.clear_if_changed(),
            Ok(1),
            "never cleared yet: must read"
        );
        dir.clear_if_changed().unwrap(); // Sees our own removal once.
        // A file that appeared without changing the mtime is not looked for...
        let mtime = dir.mtime().unwrap();
        dir.touch("b").unwrap();
        std::fs::File::open(dir.path())
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(dir.clear_if_changed(), Ok(0));
        // ...but any change to the directory is.
        let later = mtime + Duration::from_secs(1);
        std::fs::File::open(dir.path())
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(dir.clear_if_changed(), Ok(1));
        assert_eq!(dir.clear(), 0);
    }

    #[test]
    fn the_tick_tells_a_removed_or_replaced_directory() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("w");
        let mut dir = WakeupDir::prepare(&path).unwrap();
        assert_eq!(dir.clear_if_changed(), Ok(0));
        // Made while the first one exists, so it cannot get its inode number.
        std::fs::create_dir(root.path().join("v")).unwrap();
        std::fs::remove_dir(&path).unwrap();
        assert_eq!(dir.clear_if_changed(), Err(Lost::Gone));
        // Moved in by someone else: another inode, which no watch of ours sees.
        std::fs::rename(root.path().join("v"), &path).unwrap();
        assert_eq!(dir.clear_if_changed(), Err(Lost::Replaced));
        let mut again = WakeupDir::prepare(&path).unwrap();
        assert_eq!(again.clear_if_changed(), Ok(0));
        // A producer's view has nothing to lose.
        std::fs::remove_dir(&path).unwrap();
        assert_eq!(WakeupDir::at(&path).clear_if_changed(), Ok(0));
    }

    #[test]
    fn the_watch_tells_when_the_directory_itself_goes() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("w");
        let dir = WakeupDir::prepare(&path).unwrap();
        let (wake_tx, wakes) = crossbeam_channel::bounded(1);
        let _watcher = dir.watch(wake_tx).unwrap();
        dir.touch("a").unwrap();
        wakes.recv_timeout(Duration::from_secs(5)).unwrap();
        std::fs::remove_file(path.join("a")).unwrap();
        assert!(!dir.watch_lost(), "a file removed is not the directory");
        std::fs::remove_dir(&path).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !dir.watch_lost() && std::time::Instant::now() < deadline {
            let _ = wakes.recv_timeout(Duration::from_millis(10));
        }
        assert!(dir.watch_lost());
    }
}
