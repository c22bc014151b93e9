//! What `--db` names: a SQLite file or a PostgreSQL server. Parsed once, from the flag, the
//! environment or the config file, so that nothing else guesses from a string; the SQLite-only
//! defaults (the wakeup dir and the PID file next to the file) derive from it here.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};

use crate::fs_check::suffixed;

/// A database foreman can run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file (created by `init` or `run` when missing).
    Sqlite(PathBuf),
    /// A PostgreSQL server, as a `postgres://` or `postgresql://` URL (with `?host=/socket/dir`
    /// for a Unix socket). It may carry a password: print it only through `Display`, which hides
    /// it.
    Postgres(String),
}

/// The URL schemes that name a PostgreSQL server rather than a file.
const POSTGRES_SCHEMES: [&str; 2] = ["postgres://", "postgresql://"];

impl Database {
    /// Reads `--db`: a PostgreSQL URL when it starts with one of its schemes, else a path (any
    /// bytes, as the file system allows).
    pub fn parse(value: &OsStr) -> Database {
        match value.to_str() {
            Some(text)
                if POSTGRES_SCHEMES
                    .iter()
                    .any(|s| starts_with_ignore_case(text, s)) =>
            {
                Database::Postgres(text.to_owned())
            }
            _ => Database::Sqlite(PathBuf::from(value)),
        }
    }

    /// For clap: `--db` never fails to parse (a bad URL is refused when it is opened).
    #[allow(clippy::needless_pass_by_value)] // clap's `map` hands the value over.
    pub fn from_arg(value: OsString) -> Database {
        Database::parse(&value)
    }

    /// The SQLite file, if this is one.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Database::Sqlite(path) => Some(path),
            Database::Postgres(_) => None,
        }
    }

    /// Where producers wake the daemon by default: the directory `<db>.wakeup` next to a SQLite
    /// file. A PostgreSQL server wakes it by `NOTIFY`, so it has no default.
    pub fn default_wakeup_dir(&self) -> Option<PathBuf> {
        self.sqlite_path().map(|db| suffixed(db, ".wakeup"))
    }

    /// Where the daemon's lock lives by default: `<db>.pid` next to a SQLite file (one daemon per
    /// file). Daemons on a PostgreSQL server share it, so it has no default.
    pub fn default_pid_file(&self) -> Option<PathBuf> {
        self.sqlite_path().map(|db| suffixed(db, ".pid"))
    }

    /// As written in a config file: a relative SQLite path is relative to the file's directory.
    #[must_use]
    pub fn relative_to(self, base: &Path) -> Database {
        match self {
            Database::Sqlite(path) => Database::Sqlite(base.join(path)),
            url @ Database::Postgres(_) => url,
        }
    }

    /// The value as given, for writing the config back out (`check-config`). A PostgreSQL URL
    /// keeps its password here: this is the configuration itself, not a message.
    pub fn as_os_str(&self) -> OsString {
        match self {
            Database::Sqlite(path) => path.clone().into_os_string(),
            Database::Postgres(url) => OsString::from(url),
        }
    }
}

/// A path is a SQLite file, as `--db PATH` always was.
impl From<PathBuf> for Database {
    fn from(path: PathBuf) -> Database {
        Database::Sqlite(path)
    }
}

/// For messages and logs: the path, or the URL with any password replaced by `***`.
impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Database::Sqlite(path) => write!(f, "{}", path.display()),
            Database::Postgres(url) => f.write_str(&redact_password(url)),
        }
    }
}

fn starts_with_ignore_case(text: &str, prefix: &str) -> bool {
    text.get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

/// `postgresql://user:secret@host/db?password=x` → `postgresql://user:***@host/db?password=***`.
fn redact_password(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(end) => rest.split_at(end),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                        format!("{key}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_names_a_server_and_anything_else_a_file() {
        for url in [
            "postgresql://app@db:5432/app",
            "postgres://app@db/app",
            "PostgreSQL://app@db/app",
        ] {
            assert_eq!(
                Database::parse(OsStr::new(url)),
                Database::Postgres(url.to_owned())
            );
        }
        for path in [
            "foreman.sqlite3",
            "/var/lib/foreman/q.db",
            "postgres.db",
            "./postgres:/x",
        ] {
            assert_eq!(
                Database::parse(OsStr::new(path)),
                Database::Sqlite(PathBuf::from(path))
            );
        }
        let file = Database::parse(OsStr::new("data/q.db"));
        assert_eq!(
            file.default_wakeup_dir(),
            Some(PathBuf::from("data/q.db.wakeup"))
        );
        assert_eq!(
            file.default_pid_file(),
            Some(PathBuf::from("data/q.db.pid"))
        );
        let server = Database::parse(OsStr::new("postgresql://db/app"));
        assert_eq!(server.default_wakeup_dir(), None);
        assert_eq!(server.default_pid_file(), None);
    }

    #[test]
    fn a_password_never_reaches_a_message() {
        let shown = |url: &str| Database::Postgres(url.to_owned()).to_string();
        assert_eq!(
            shown("postgresql://app:s3cret@db:5432/app"),
            "postgresql://app:***@db:5432/app"
        );
        assert_eq!(
            shown("postgres://app:p%40ss@db/app?sslmode=require&password=x"),
            "postgres://app:***@db/app?sslmode=require&password=***"
        );
        assert_eq!(
            shown("postgresql:///app?host=/run/postgresql"),
            "postgresql:///app?host=/run/postgresql"
        );
        assert_eq!(shown("postgresql://app@db/app"), "postgresql://app@db/app");
    }
}
