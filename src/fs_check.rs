//! File-system checks that turn a read-only mount, a missing directory or a permission problem into
//! one line naming the path, the cause and the fix, instead of an OS or SQLite code at the first
//! write; and the file systems where inotify or SQLite's WAL cannot do their job. A leaf: it only
//! looks (its one probe file is removed at once); the database, the wakeup dir and the PID file
//! are created by their owners, which use these words when the file system refuses them.

use std::ffi::CString;
use std::ffi::OsString;
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `path` with `suffix` appended to its file name: `<db>-wal`, `<db>.wakeup`, `<db>.pid`.
pub fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

/// The fix for a read-only mount. In a container that is the image's root file system; under
/// systemd (which sets `INVOCATION_ID` for every service) the unit's `ProtectSystem=strict`.
fn read_only_fix(under_systemd: bool) -> &'static str {
    if under_systemd {
        "add it to the unit's ReadWritePaths= (ProtectSystem=strict makes every other path \
         read-only), or mount a writable volume there"
    } else {
        "mount a writable volume there (Kubernetes readOnlyRootFilesystem: use an emptyDir or a PVC)"
    }
}

/// Whether the PID file can be opened for writing, or created in its directory.
pub fn pid_file_writable(pid_file: &Path) -> Result<()> {
    let head = |verb: &str| format!("cannot {verb} pid file {}: ", pid_file.display());
    match std::fs::metadata(pid_file) {
        Ok(_) => writable(pid_file)
            .map_err(|e| refused(&head("write"), "the file", &refusal(pid_file, &e), None)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let dir = parent(pid_file);
            let subject = format!("its directory {}", dir.display());
            std::fs::metadata(dir)
                .map_err(|e| refused(&head("create"), &subject, &unreachable(dir, &e), None))?;
            writable(dir).map_err(|e| refused(&head("create"), &subject, &refusal(dir, &e), None))
        }
        Err(e) => Err(refused(
            &head("open"),
            "the file",
            &unreachable(pid_file, &e),
            None,
        )),
    }
}

/// Whether a directory `what` at `path` that does not exist yet can be created with its missing
/// parents: the nearest one that exists must be a directory that takes new entries.
pub(crate) fn creatable(path: &Path, what: &str) -> Result<()> {
    let head = format!("cannot create {what} {}: ", path.display());
    let mut ancestor = parent(path);
    loop {
        match std::fs::metadata(ancestor) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => {
                return Err(Error::Environment(format!(
                    "{head}{} is not a directory; choose another path",
                    ancestor.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && parent(ancestor) != ancestor => {
                ancestor = parent(ancestor);
            }
            Err(e) => {
                let subject = ancestor.display().to_string();
                return Err(refused(&head, &subject, &unreachable(ancestor, &e), None));
            }
        }
    }
    writable(ancestor).map_err(|e| {
        let subject = ancestor.display().to_string();
        refused(&head, &subject, &refusal(ancestor, &e), None)
    })
}

/// The directory a path is in; `.` for a bare file name, the path itself for `/`.
pub(crate) fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if dir.as_os_str().is_empty() => Path::new("."),
        Some(dir) => dir,
        None => path,
    }
}

/// Why a path refuses what foreman needs, worded to fit one line: `{subject} {cause} ({detail};
/// {why}); {fix}`.
pub(crate) struct Refusal {
    cause: String,
    detail: Option<String>,
    fix: String,
}

/// The one-line error: `head` names what failed ("cannot write /data/foreman.sqlite3: "),
/// `subject` the path that refused ("its directory /data"), `why` what foreman needs it for.
pub(crate) fn refused(head: &str, subject: &str, refusal: &Refusal, why: Option<&str>) -> Error {
    let Refusal { cause, detail, fix } = refusal;
    let aside = match (detail.as_deref(), why) {
        (Some(detail), Some(why)) => format!(" ({detail}; {why})"),
        (Some(one), None) | (None, Some(one)) => format!(" ({one})"),
        (None, None) => String::new(),
    };
    Error::Environment(format!("{head}{subject} {cause}{aside}; {fix}"))
}

/// Why a write to `path` was refused with `err` (from `writable`, a probe or a create).
pub(crate) fn refusal(path: &Path, err: &io::Error) -> Refusal {
    let uid = euid();
    match err.raw_os_error() {
        Some(libc::EROFS) => Refusal {
            cause: "is on a read-only file system".to_owned(),
            detail: None,
            fix: read_only_fix(std::env::var_os("INVOCATION_ID").is_some()).to_owned(),
        },
        // Mode bits never stop root: what does is an immutable flag, a security module or an NFS
        // server that maps root to nobody.
        Some(libc::EACCES | libc::EPERM) if uid == 0 => Refusal {
            cause: "is not writable even by root".to_owned(),
            detail: owner_and_mode(path),
            fix: "look for an immutable flag (lsattr), a security module's denial (SELinux, \
                  AppArmor) or an NFS export's root_squash"
                .to_owned(),
        },
        Some(libc::EACCES | libc::EPERM) => Refusal {
            cause: format!("is not writable by uid {uid}"),
            detail: owner_and_mode(path),
            fix: format!(
                "give uid {uid} write access to {} (chown or chmod; in Kubernetes, \
                 securityContext.fsGroup)",
                path.display()
            ),
        },
        Some(libc::ENOSPC | libc::EDQUOT) => Refusal {
            cause: "has no space left".to_owned(),
            detail: Some(err.to_string()),
            fix: "free some space or use a larger volume".to_owned(),
        },
        _ => Refusal {
            cause: "cannot be written".to_owned(),
            detail: Some(err.to_string()),
            fix: "check its mount and permissions".to_owned(),
        },
    }
}

/// Why `path` could not even be looked at (`stat` failed with `err`).
pub(crate) fn unreachable(path: &Path, err: &io::Error) -> Refusal {
    let uid = euid();
    match err.kind() {
        io::ErrorKind::NotFound => Refusal {
            cause: "does not exist".to_owned(),
            detail: None,
            fix: format!(
                "create it (mkdir -p {}) or mount a volume there",
                path.display()
            ),
        },
        io::ErrorKind::PermissionDenied => Refusal {
            cause: format!("is out of reach of uid {uid}"),
            detail: Some("a directory above it does not let this user search it".to_owned()),
            fix: format!("give uid {uid} search (x) permission on every directory above it"),
        },
        _ => Refusal {
            cause: "cannot be looked at".to_owned(),
            detail: Some(err.to_string()),
            fix: "check its mount and permissions".to_owned(),
        },
    }
}

fn owner_and_mode(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    Some(format!(
        "owner uid {}, mode {:04o}",
        meta.uid(),
        meta.mode() & 0o7777
    ))
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Whether this process may write `path`: EROFS for a read-only mount (whole file system, or a
/// read-only bind mount such as Kubernetes' readOnlyRootFilesystem or systemd's ProtectSystem),
/// which stops root too; else access(2)'s answer for the mode bits, ACLs and security modules.
/// access(2) checks the real ids, which are the effective ones: foreman is never setuid. (The
/// effective-ids variant, faccessat2, is refused with EPERM by some container seccomp profiles.)
pub(crate) fn writable(path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    let mut vfs = MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is NUL-terminated and outlives the call; `vfs` is large enough for the result.
    if unsafe { libc::statvfs(c.as_ptr(), vfs.as_mut_ptr()) } == 0 {
        // SAFETY: statvfs succeeded, so it filled the struct (which was zeroed anyway).
        let vfs = unsafe { vfs.assume_init() };
        if vfs.f_flag & libc::ST_RDONLY != 0 {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
    }
    // SAFETY: as above.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The space this user may still use on the file system holding `path`, and its size, in bytes.
pub(crate) fn free_space(path: &Path) -> Option<(u64, u64)> {
    let c = c_path(path).ok()?;
    let mut vfs = MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is NUL-terminated and outlives the call; `vfs` is large enough for the result.
    if unsafe { libc::statvfs(c.as_ptr(), vfs.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs succeeded, so it filled the struct.
    let vfs = unsafe { vfs.assume_init() };
    // The field widths depend on the target; u64 holds them all.
    #[allow(clippy::useless_conversion)]
    let (frsize, avail, blocks) = (
        u64::from(vfs.f_frsize),
        u64::from(vfs.f_bavail),
        u64::from(vfs.f_blocks),
    );
    Some((avail.saturating_mul(frsize), blocks.saturating_mul(frsize)))
}

/// A size for messages: `0 B`, `812 KiB`, `1.5 GiB`.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut scale = 1u64;
    while n / scale >= 1024 && unit + 1 < UNITS.len() {
        scale *= 1024;
        unit += 1;
    }
    if unit > 0 && n / scale < 10 {
        // One decimal where it still says something.
        #[allow(clippy::cast_precision_loss)] // A message, not a measurement.
        let exact = n as f64 / scale as f64;
        return format!("{exact:.1} {}", UNITS[unit]);
    }
    format!("{} {}", n / scale, UNITS[unit])
}

/// Creates and removes a file in `dir`, named after the database so a leftover explains itself.
pub(crate) fn probe_create(dir: &Path, db_name: &str) -> io::Result<()> {
    let probe = dir.join(format!(".{db_name}.foreman-probe-{}", std::process::id()));
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe);
    match created {
        Ok(file) => {
            drop(file);
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        // A leftover of a run killed between the two calls (in a container the pid is the same
        // every time): the directory did take that create.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The file system holding `path` (or, for a path not created yet, its nearest ancestor), when
/// inotify or SQLite's WAL cannot work on it as on a local disk.
pub fn remote_fs_at(path: &Path) -> Option<&'static str> {
    let mut path = path;
    loop {
        match fs_magic(path) {
            Ok(magic) => return remote_fs(magic),
            Err(e) if e.kind() == io::ErrorKind::NotFound && parent(path) != path => {
                path = parent(path);
            }
            Err(_) => return None,
        }
    }
}

/// `statfs(2)`'s `f_type`: which file system `path` is on.
fn fs_magic(path: &Path) -> io::Result<u32> {
    let c = c_path(path)?;
    let mut fs = MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is NUL-terminated and outlives the call; `fs` is large enough for the result.
    if unsafe { libc::statfs(c.as_ptr(), fs.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded, so it filled the struct (which was zeroed anyway).
    let fs = unsafe { fs.assume_init() };
    // The magics are 32-bit patterns; f_type is a signed word whose width depends on the target.
    #[allow(clippy::cast_sign_loss)]
    Ok(fs.f_type as u32)
}

/// The name of the file system with this `statfs` magic when inotify cannot see every change on
/// it: one whose files other machines (or a VM's host) change directly, without passing through
/// this kernel. inotify reports only what this kernel does, so a producer elsewhere never wakes the
/// daemon, and SQLite's WAL shared memory does not reach another machine either. Local file
/// systems, tmpfs and overlayfs (a container's root: changes through the same mount are seen; a
/// volume shared between containers is a bind mount of the host's disk) are fine: `None`.
pub fn remote_fs(magic: u32) -> Option<&'static str> {
    Some(match magic {
        0x0000_6969 => "nfs",
        0x0000_517B | 0xFF53_4D42 | 0xFE53_4D42 => "smb/cifs",
        // Docker Desktop's and WSL 2's host mounts, QEMU shares.
        0x0102_1997 => "9p",
        // sshfs, s3fs, gcsfuse, glusterfs, ceph-fuse, and virtiofs (Docker Desktop on macOS,
        // Kata, VM shares), which reports FUSE's magic too.
        0x6573_5546 => "a FUSE file system (sshfs, gcsfuse, virtiofs, …)",
        0x5346_414F | 0x6B41_4653 => "afs",
        0x00C3_6400 => "cephfs",
        0x0BD0_0BD0 => "lustre",
        0x4750_4653 => "gpfs",
        0x1983_0326 => "beegfs",
        0x0116_1970 => "gfs2",
        0x7461_636F => "ocfs2",
        0xAAD7_AAEA => "panfs",
        0x7375_7245 => "coda",
        0x0000_564C => "ncpfs",
        0x786F_4256 => "vboxsf (VirtualBox shared folder)",
        0xBACB_ACBC => "vmhgfs (VMware shared folder)",
        0x7C7C_6673 => "prl_fs (Parallels shared folder)",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_and_host_shares_are_remote_local_and_container_file_systems_are_not() {
        for (magic, name) in [
            (0x6969, "nfs"),
            (0xFF53_4D42, "smb/cifs"),
            (0xFE53_4D42, "smb/cifs"),
            (0x0102_1997, "9p"),
            (0x00C3_6400, "cephfs"),
            (0x0BD0_0BD0, "lustre"),
        ] {
            assert_eq!(remote_fs(magic), Some(name), "{magic:#x}");
        }
        assert!(remote_fs(0x6573_5546).unwrap().contains("FUSE"));
        // ext4, xfs, btrfs, tmpfs, overlayfs, zfs.
        for magic in [
            0xEF53,
            0x5846_5342,
            0x9123_683E,
            0x0102_1994,
            0x794C_7630,
            0x2FC1_2FC1,
        ] {
            assert_eq!(remote_fs(magic), None, "{magic:#x}");
        }
    }

    #[test]
    fn sizes_read_at_a_glance() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(812 * 1024), "812 KiB");
        assert_eq!(bytes(u64::MAX), "16777215 TiB");
        let dir = tempfile::tempdir().unwrap();
        let (free, total) = free_space(dir.path()).unwrap();
        assert!(free <= total && total > 0);
    }

    #[test]
    fn refusals_fit_one_line() {
        let path = Path::new("/data");
        let rofs = Refusal {
            fix: read_only_fix(false).to_owned(),
            ..refusal(path, &io::Error::from_raw_os_error(libc::EROFS))
        };
        let err = refused(
            "cannot write /data/foreman.sqlite3: ",
            "its directory /data",
            &rofs,
            Some("SQLite needs to create foreman.sqlite3-wal and -shm next to it"),
        );
        assert_eq!(
            err.to_string(),
            "cannot write /data/foreman.sqlite3: its directory /data is on a read-only file system \
             (SQLite needs to create foreman.sqlite3-wal and -shm next to it); mount a writable \
             volume there (Kubernetes readOnlyRootFilesystem: use an emptyDir or a PVC)"
        );
        assert_eq!(err.exit_code(), 1);
        assert!(read_only_fix(true).contains("ReadWritePaths="));
    }
}
