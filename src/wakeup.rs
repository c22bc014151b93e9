//! `WakeupDir`: the directory producers touch to wake the daemon. Owns its creation and its checks
//! (a directory, ours, writable), the inotify watch (through `notify`), and clearing the files the
//! daemon has consumed.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crossbeam_channel::Sender;
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use crate::error::{Error, Result};
use crate::preflight;

pub struct WakeupDir {
    path: PathBuf,
    /// The directory's mtime just before the last `clear` read it.
    cleared_at_mtime: Option<SystemTime>,
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
        Ok(WakeupDir::at(path))
    }

    /// What `prepare` refuses, without creating anything: for `foreman run`'s preflight. A missing
    /// directory passes if it can be created.
    pub fn check(path: &Path) -> Result<()> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                preflight::creatable(path, "wakeup dir")
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
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Watches the directory; every creation or change in it (and every overflow or error of the
    /// watch) sends one wake. `wakes` should be bounded(1): a pending wake already covers the rest.
    pub fn watch(&self, wakes: Sender<()>) -> Result<RecommendedWatcher> {
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let wake = match &event {
                    Ok(event) => {
                        event.need_rescan()
                            || !matches!(event.kind, EventKind::Remove(_) | EventKind::Access(_))
                    }
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
            .map_err(|e| Error::io("cannot start the inotify watcher", io::Error::other(e)))?;
        watcher
            .watch(&self.path, RecursiveMode::NonRecursive)
            .map_err(|e| {
                Error::io(
                    format!("cannot watch wakeup dir {}", self.path.display()),
                    io::Error::other(e),
                )
            })?;
        Ok(watcher)
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
    /// the queue itself whatever the directory holds.
    pub fn clear_if_changed(&mut self) -> usize {
        match self.cleared_at_mtime {
            Some(seen) if self.mtime() == Some(seen) => 0,
            _ => self.clear(),
        }
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
    preflight::refused("", &subject, &preflight::unreachable(path, err), None)
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
    preflight::writable(path).map_err(|e| {
        preflight::refused(
            "",
            &subject,
            &preflight::refusal(path, &e),
            Some("producers create files there and the daemon removes them"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_tick_reads_the_directory_only_after_a_change() {
        let root = tempfile::tempdir().unwrap();
        let mut dir = WakeupDir::prepare(&root.path().join("w")).unwrap();
        dir.touch("a").unwrap();
        assert_eq!(dir.clear_if_changed(), 1, "never cleared yet: must read");
        dir.clear_if_changed(); // Sees our own removal once.
        // A file that appeared without changing the mtime is not looked for...
        let mtime = dir.mtime().unwrap();
        dir.touch("b").unwrap();
        std::fs::File::open(dir.path())
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(dir.clear_if_changed(), 0);
        // ...but any change to the directory is.
        let later = mtime + Duration::from_secs(1);
        std::fs::File::open(dir.path())
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(dir.clear_if_changed(), 1);
        assert_eq!(dir.clear(), 0);
    }
}
