//! The SQLite database's files as the file system sees them, before SQLite does: whether the
//! database, its `-wal` and `-shm` can be written where they are, in the words of `fs_check`.

use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fs_check::{
    parent, probe_create, refusal, refused, remote_fs_at, suffixed, unreachable, writable,
};

/// That the database file exists, for a command that must not create it: a missing file is said
/// with the fix, and a path this user cannot look at (a directory above it that it may not
/// search) is said as such, not as missing.
pub fn exists(db: &Path) -> Result<()> {
    match std::fs::metadata(db) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::db(
            db,
            "no such file (run `foreman init` to create it)",
        )),
        Err(e) => Err(refused(
            &format!("cannot read {}: ", db.display()),
            "the file",
            &unreachable(db, &e),
            None,
        )),
    }
}

/// Whether SQLite failed because it could not create or write the WAL index (`-shm`) of a
/// database opened read-only: what a reader without write access to the directory meets when no
/// other connection holds the database open.
pub fn needs_the_index(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::CannotOpen)
    )
}

/// Whether the database's `-wal` holds frames: commits not yet copied into the file itself.
pub fn wal_has_commits(db: &Path) -> bool {
    std::fs::metadata(suffixed(db, "-wal")).is_ok_and(|meta| meta.len() > 0)
}

/// An SQLite URI that opens `db` as immutable: no locks, no `-shm`, no `-wal` (every byte of the
/// path escaped that a URI would read otherwise).
pub fn immutable_uri(db: &Path) -> String {
    use std::fmt::Write as _;
    use std::os::unix::ffi::OsStrExt;
    let mut uri = String::from("file:");
    for &byte in db.as_os_str().as_bytes() {
        if byte.is_ascii_alphanumeric() || b"/-._~".contains(&byte) {
            uri.push(char::from(byte));
        } else {
            let _ = write!(uri, "%{byte:02X}");
        }
    }
    uri.push_str("?immutable=1");
    uri
}

/// What `foreman run` checks of the database before it takes the PID lock: that it can be
/// created or written (with a probe file), and whether it sits on a file system where the WAL's
/// shared memory cannot work (a warning).
pub fn preflight(db: &Path) -> Result<()> {
    db_writable(db, true)?;
    if let Some(fs) = remote_fs_at(db) {
        log::warn!(
            "database {} is on {fs}: SQLite's WAL mode shares its index (the -shm file) through \
             memory, so every process that opens the database must run on one machine, and SQLite \
             says WAL does not work over a network file system; keep it on a local volume",
            db.display()
        );
    }
    Ok(())
}

/// Whether the database at `db` (which need not exist yet) can be opened for writing: its
/// directory exists and takes new files (SQLite creates `-wal` and `-shm` next to the database, and
/// removes them when the last connection closes), and the files that exist are writable. With
/// `probe`, a file is also created and removed in the directory: access(2) cannot see a full disk,
/// a network server's own rules or a security module. The database file itself is never opened:
/// closing any descriptor of it would drop the POSIX locks of an SQLite connection the same
/// process (a program embedding foreman) may hold.
pub(crate) fn db_writable(db: &Path, probe: bool) -> Result<()> {
    let head = |verb: &str| format!("cannot {verb} {}: ", db.display());
    let real = real_path(db);
    let db = real.as_path();
    let dir = parent(db);
    let name = db.file_name().unwrap_or(db.as_os_str()).to_string_lossy();
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(Error::Environment(format!(
                "{}{} is not a directory; set db to a file in a directory",
                head("create"),
                dir.display()
            )));
        }
        Err(e) => {
            let subject = format!("its directory {}", dir.display());
            return Err(refused(
                &head("open"),
                &subject,
                &unreachable(dir, &e),
                None,
            ));
        }
    }
    let why = format!("SQLite needs to create {name}-wal and -shm next to it");
    let dir_refused = |e: io::Error| {
        let subject = format!("its directory {}", dir.display());
        refused(&head("write"), &subject, &refusal(dir, &e), Some(&why))
    };
    writable(dir).map_err(dir_refused)?;
    if probe {
        probe_create(dir, &name).map_err(dir_refused)?;
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut file = db.as_os_str().to_owned();
        file.push(suffix);
        let file = Path::new(&file);
        if std::fs::symlink_metadata(file).is_err() {
            continue; // Absent: the directory check covers its creation.
        }
        writable(file).map_err(|e| {
            let subject = if suffix.is_empty() {
                "the file".to_owned()
            } else {
                format!("its {suffix} file {}", file.display())
            };
            refused(&head("write"), &subject, &refusal(file, &e), None)
        })?;
    }
    Ok(())
}

/// Where SQLite puts the database: it follows a symlinked database to its target, which may not
/// exist yet (SQLite creates it), and puts `-wal` and `-shm` next to it.
fn real_path(db: &Path) -> PathBuf {
    /// As many links as Linux follows in one lookup.
    const MAX_LINKS: usize = 40;
    let mut path = db.to_path_buf();
    for _ in 0..MAX_LINKS {
        if let Ok(real) = std::fs::canonicalize(&path) {
            return real;
        }
        // Missing, or a link to a file not created yet: follow the link by hand.
        let Ok(target) = std::fs::read_link(&path) else {
            break;
        };
        path = parent(&path).join(target);
    }
    // A file not created yet: its directory's real path, if it has one.
    match (std::fs::canonicalize(parent(&path)), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_immutable_uri_escapes_what_a_uri_would_read() {
        assert_eq!(
            immutable_uri(Path::new("/var/lib/foreman/q.sqlite3")),
            "file:/var/lib/foreman/q.sqlite3?immutable=1"
        );
        assert_eq!(
            immutable_uri(Path::new("a b/q?#%.db")),
            "file:a%20b/q%3F%23%25.db?immutable=1"
        );
    }

    #[test]
    fn the_temp_dir_is_local_and_writable() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("missing/still/q.db");
        assert_eq!(remote_fs_at(&db), None);
        assert!(writable(dir.path()).is_ok());
        db_writable(&dir.path().join("q.db"), true).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "probe left"
        );
    }

    #[test]
    fn a_missing_database_directory_is_named_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("nowhere/q.db");
        let err = db_writable(&db, true).unwrap_err().to_string();
        let nowhere = dir.path().join("nowhere");
        assert_eq!(
            err,
            format!(
                "cannot open {}: its directory {} does not exist; create it (mkdir -p {}) or mount a volume there",
                db.display(),
                nowhere.display(),
                nowhere.display()
            )
        );
    }

    #[test]
    fn a_symlink_to_a_database_not_created_yet_is_checked_where_sqlite_creates_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink("data/real.db", &link).unwrap();
        db_writable(&link, true).unwrap();
        assert_eq!(
            real_path(&link),
            std::fs::canonicalize(dir.path().join("data"))
                .unwrap()
                .join("real.db")
        );
        // A link whose target's directory is missing names that directory.
        let broken = dir.path().join("broken.db");
        std::os::unix::fs::symlink("nowhere/real.db", &broken).unwrap();
        let err = db_writable(&broken, true).unwrap_err().to_string();
        assert!(err.contains("nowhere"), "{err}");
    }
}
