//! The password file libpq reads (`~/.pgpass`, or `PGPASSFILE`): lines of
//! `hostname:port:database:username:password`, `*` matching anything, `\:` and `\\` escaped, the
//! first matching line winning. As libpq does, a file that its group or others may read is
//! ignored, with a warning. Pure but for `read`, so it is tested on its own.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The file's text, unless it is missing, unreadable, or readable by others (then ignored, as
/// libpq ignores it, and said so once).
pub fn read(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        log::warn!(
            "password file {} has group or world access; it is ignored (chmod 0600 it)",
            path.display()
        );
        return None;
    }
    std::fs::read_to_string(path).ok()
}

/// The password of the first line of `text` matching the connection.
pub fn lookup(text: &str, host: &str, port: u16, db: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#') && !line.trim().is_empty())
        .find_map(|line| {
            let fields = split(line);
            let [h, p, d, u, password] = fields.as_slice() else {
                return None;
            };
            let matches = |field: &str, value: &str| field == "*" || field == value;
            (matches(h, host) && matches(p, &port) && matches(d, db) && matches(u, user))
                .then(|| password.clone())
        })
}

/// A line's fields, split at unescaped colons, with `\:` and `\\` unescaped. A password may hold
/// colons only escaped; what follows a fifth colon belongs to the password, as in libpq.
fn split(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next()
                    && let Some(field) = fields.last_mut()
                {
                    field.push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => {
                if let Some(field) = fields.last_mut() {
                    field.push(c);
                }
            }
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_matching_line_wins_with_wildcards_and_escapes() {
        let text = "\
# comment
db.internal:5432:app:worker:first
*:*:app:worker:second
localhost:5433:*:*:p\\:a\\\\ss
*:*:*:*:any:thing
";
        assert_eq!(
            lookup(text, "db.internal", 5432, "app", "worker").as_deref(),
            Some("first")
        );
        assert_eq!(
            lookup(text, "other", 1, "app", "worker").as_deref(),
            Some("second")
        );
        assert_eq!(
            lookup(text, "localhost", 5433, "x", "y").as_deref(),
            Some("p:a\\ss")
        );
        assert_eq!(lookup(text, "h", 1, "d", "u").as_deref(), Some("any:thing"));
        assert_eq!(lookup("a:b:c\n", "a", 1, "c", "d"), None);
    }

    #[test]
    fn a_file_others_may_read_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(&path, "*:*:*:*:pw\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(read(&path), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read(&path).as_deref(), Some("*:*:*:*:pw\n"));
    }
}
