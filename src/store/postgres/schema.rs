//! The PostgreSQL schema: `schema-postgres.sql` (the producer contract on PostgreSQL) applied in
//! one transaction under its advisory lock, in the connection's `search_path` schema, and a
//! database refused in one line when its version is newer than this binary or its tables lack
//! columns this version needs.

use std::sync::OnceLock;

use super::PgStore;
use crate::error::Result;

/// The public protocol on PostgreSQL; see the comment block at its top.
pub const SCHEMA_SQL: &str = include_str!("../../../schema-postgres.sql");

/// The `foreman_meta.schema_version` this binary creates and understands.
pub const SCHEMA_VERSION: i64 = 1;

impl PgStore {
    /// The schema version of the foreman tables in the connection's schema, `None` without them.
    fn schema_version(&self) -> Result<Option<i64>> {
        let rows = self.with(|c| {
            c.query(
                "SELECT to_regclass('foreman_meta') IS NOT NULL, current_schema()::text",
                &[],
            )
        })?;
        let row = rows.first();
        if row.is_some_and(|r| r.get::<_, Option<String>>(1).is_none()) {
            return Err(self.err(
                "the connection's search_path names no schema that exists (create one, e.g. CREATE SCHEMA foreman, and ALTER ROLE … SET search_path = foreman)",
            ));
        }
        if !row.is_some_and(|r| r.get::<_, bool>(0)) {
            return Ok(None);
        }
        let rows = self.with(|c| c.query("SELECT schema_version::int8 FROM foreman_meta", &[]))?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    fn refuse_newer(&self, version: i64) -> Result<()> {
        if version > SCHEMA_VERSION {
            return Err(self.err(format!(
                "schema version {version} is newer than this foreman understands ({SCHEMA_VERSION}); upgrade foreman"
            )));
        }
        Ok(())
    }

    /// Creates the schema if it is absent; idempotent, and safe against a concurrent `init` (the
    /// file takes a transaction-scoped advisory lock first). Refuses tables that lack columns.
    pub fn ensure_schema(&mut self) -> Result<()> {
        if let Some(version) = self.schema_version()? {
            self.refuse_newer(version)?;
            if version == SCHEMA_VERSION {
                return self.refuse_missing_columns();
            }
        }
        // One implicit transaction: the whole file or nothing.
        // One query string: PostgreSQL runs it as one implicit transaction, the whole file or
        // nothing.
        self.with(|c| c.batch_execute(SCHEMA_SQL))?;
        self.refuse_missing_columns()?;
        // Fresh tables have no statistics; the CLI's one-off statements are planned on them.
        self.with(|c| c.batch_execute("ANALYZE foreman_task, foreman_run"))
    }

    /// Checks that the schema exists and is one this binary understands, changing nothing.
    pub fn check_schema(&self) -> Result<()> {
        match self.schema_version()? {
            None => Err(self.err(format!(
                "has no foreman schema in schema {} (run `foreman init`)",
                self.current_schema()
            ))),
            Some(version) if version < SCHEMA_VERSION => Err(self.err(format!(
                "has schema version {version}; this foreman needs {SCHEMA_VERSION} (run `foreman init` or start the daemon to upgrade it)"
            ))),
            Some(version) => {
                self.refuse_newer(version)?;
                self.refuse_missing_columns()
            }
        }
    }

    fn current_schema(&self) -> String {
        self.with(|c| c.query_one("SELECT coalesce(current_schema()::text, '(none)')", &[]))
            .map_or_else(|_| "?".to_owned(), |r| r.get(0))
    }

    /// A foreman table without every column the schema gives it: an error naming them.
    fn refuse_missing_columns(&self) -> Result<()> {
        let rows = self.with(|c| {
            c.query(
                "SELECT table_name::text, column_name::text FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name LIKE 'foreman\\_%'",
                &[],
            )
        })?;
        let have: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        for (table, columns) in expected_tables() {
            if !have.iter().any(|(t, _)| t == table) {
                return Err(self.err(format!(
                    "has no table {table} (run `foreman init` to create it)"
                )));
            }
            let missing: Vec<&str> = columns
                .iter()
                .filter(|c| !have.iter().any(|(t, col)| t == table && col == *c))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                return Err(self.err(format!(
                    "table {table} lacks column(s) {} of schema version {SCHEMA_VERSION}: it was not created by foreman (rename it, run `foreman init`, and copy its rows over)",
                    missing.join(", ")
                )));
            }
        }
        Ok(())
    }
}

/// The tables and columns `SCHEMA_SQL` creates, read from its `CREATE TABLE` statements, so the
/// check can never drift from the file (a unit test pins what it finds).
pub fn expected_tables() -> &'static [(String, Vec<String>)] {
    static TABLES: OnceLock<Vec<(String, Vec<String>)>> = OnceLock::new();
    TABLES.get_or_init(|| parse_tables(SCHEMA_SQL))
}

fn parse_tables(sql: &str) -> Vec<(String, Vec<String>)> {
    const NOT_COLUMNS: [&str; 6] = [
        "CONSTRAINT",
        "PRIMARY",
        "UNIQUE",
        "CHECK",
        "FOREIGN",
        "EXCLUDE",
    ];
    let mut tables = Vec::new();
    let mut current: Option<(String, Vec<String>)> = None;
    for line in sql.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("CREATE TABLE IF NOT EXISTS ") {
            let name = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            current = Some((name, Vec::new()));
            continue;
        }
        let Some((_, columns)) = current.as_mut() else {
            continue;
        };
        if line.starts_with(')') {
            tables.extend(current.take());
            continue;
        }
        let Some(word) = line.split_whitespace().next() else {
            continue;
        };
        let is_identifier = word
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        // A column line is `name type…`; continuation lines start with a keyword or a comment.
        if is_identifier && !NOT_COLUMNS.contains(&word.to_ascii_uppercase().as_str()) {
            let second = line.split_whitespace().nth(1).unwrap_or_default();
            if second.chars().next().is_some_and(char::is_alphabetic) && second != "AND" {
                columns.push(word.to_owned());
            }
        }
    }
    tables
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_column_check_reads_every_table_and_column_of_the_schema() {
        let tables = expected_tables();
        let names: Vec<&str> = tables.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            names,
            [
                "foreman_task",
                "foreman_dead",
                "foreman_run",
                "foreman_abort",
                "foreman_pause",
                "foreman_schedule",
                "foreman_daemon",
                "foreman_stat",
                "foreman_meta"
            ]
        );
        let columns = |table: &str| {
            tables
                .iter()
                .find(|(t, _)| t == table)
                .map(|(_, c)| c.join(" "))
                .unwrap()
        };
        assert_eq!(
            columns("foreman_task"),
            "id task_name args kwargs created_at run_after priority attempt origin leased_by leased_at unique_key"
        );
        assert_eq!(
            columns("foreman_daemon"),
            "id host pid pid_start version started_at heartbeat_at stopping_at stopped_at workers pools totals served stale_after recovered_at recovered_by"
        );
        assert_eq!(
            columns("foreman_run"),
            "task_id attempt task_name state daemon_id enqueued_at started_at finished_at error retry_at args kwargs priority origin unique_key result exit_code"
        );
    }
}
