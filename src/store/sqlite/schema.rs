//! The schema: `schema.sql` (the public producer protocol) applied, versions 1 to 3 migrated, and a
//! database refused in one line when its version is newer than this binary or its tables lack
//! columns this version needs.

use std::sync::OnceLock;

use rusqlite::{Connection, TransactionBehavior};

use super::SqliteStore;
use crate::error::{Error, Result};

/// The public protocol; see the comment block at its top.
pub const SCHEMA_SQL: &str = include_str!("../../../schema.sql");

/// The `PRAGMA user_version` this binary creates and understands.
pub const SCHEMA_VERSION: i64 = 4;

/// Brings a version 1 database to version 2 before `SCHEMA_SQL` runs: `run_after`'s default is not
/// a constant, which `ALTER TABLE ADD COLUMN` refuses, so the queue table is rebuilt (ids, and the
/// AUTOINCREMENT high-water mark, kept). Every old row is due now, so they keep v1's id order.
const MIGRATE_V1_BEFORE: &str = "
ALTER TABLE foreman_dead ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE foreman_dead ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE foreman_dead ADD COLUMN origin TEXT;
ALTER TABLE foreman_task RENAME TO foreman_task_v1;
";

/// The columns schema version 4 adds to tables an older version has, with their definitions: each
/// has a constant default (or none), as `ALTER TABLE ADD COLUMN` requires. Added only where missing,
/// so that a migration cut short and run again, or a v1 table rebuilt from `SCHEMA_SQL`, is fine.
const V4_COLUMNS: &[(&str, &str, &str)] = &[
    ("foreman_task", "unique_key", "TEXT"),
    ("foreman_task", "paused", "INTEGER NOT NULL DEFAULT 0"),
    ("foreman_dead", "unique_key", "TEXT"),
    ("foreman_run", "task", "TEXT"),
    ("foreman_run", "unique_key", "TEXT"),
    ("foreman_run", "result", "TEXT"),
    ("foreman_run", "exit_code", "INTEGER"),
];

/// Before `SCHEMA_SQL` runs on a version 1 to 3 database: the pop's index becomes partial (rows a
/// pause holds back leave it), so the old one goes; `SCHEMA_SQL` creates the new one.
const MIGRATE_V3_BEFORE: &str = "DROP INDEX IF EXISTS foreman_task_due;";

const MIGRATE_V1_AFTER: &str = "
INSERT INTO foreman_task(id, task_name, args, kwargs, created_at, run_after)
    SELECT id, task_name, args, kwargs, created_at, (julianday('now') - 2440587.5) * 86400.0
    FROM foreman_task_v1;
DELETE FROM sqlite_sequence WHERE name = 'foreman_task';
UPDATE sqlite_sequence SET name = 'foreman_task' WHERE name = 'foreman_task_v1';
DROP TABLE foreman_task_v1;
";

impl SqliteStore {
    fn user_version(&self) -> Result<i64> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    fn refuse_newer(&self, version: i64) -> Result<()> {
        if version > SCHEMA_VERSION {
            return Err(self.err(format!(
                "schema version {version} is newer than this foreman understands ({SCHEMA_VERSION}); upgrade foreman"
            )));
        }
        Ok(())
    }

    /// Creates the schema if it is absent; idempotent, safe against a concurrent `init`. Refuses a
    /// database whose tables lack columns this version needs (made by hand before `init`, say),
    /// naming them, rather than failing later on a statement.
    pub fn ensure_schema(&mut self) -> Result<()> {
        let version = self.user_version()?;
        self.refuse_newer(version)?;
        if version == SCHEMA_VERSION {
            refuse_missing_columns(&self.conn, &[]).map_err(|e| self.err(e))?;
            if missing_table(&self.conn)
                .map_err(|e| self.err(e))?
                .is_none()
            {
                return Ok(());
            }
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| Error::db(&self.path, e))?;
        // Again under the write lock: a concurrent `init` may have done it meanwhile.
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| Error::db(&self.path, e))?;
        // A version 1 database lacks the columns its migration adds; versions 2 and 3 lack
        // version 4's.
        match version {
            1 => Ok(()),
            2 | 3 => refuse_missing_columns(&tx, V4_COLUMNS),
            _ => refuse_missing_columns(&tx, &[]),
        }
        .map_err(|e| Error::db(&self.path, e))?;
        if version == SCHEMA_VERSION
            && missing_table(&tx)
                .map_err(|e| Error::db(&self.path, e))?
                .is_none()
        {
            return Ok(());
        }
        let migrating = |e: rusqlite::Error| {
            Error::db(
                &self.path,
                format!("migrating from schema version {version}: {e}"),
            )
        };
        if version == 1 {
            tx.execute_batch(MIGRATE_V1_BEFORE).map_err(migrating)?;
        }
        if (1..SCHEMA_VERSION).contains(&version) {
            add_v4_columns(&tx).map_err(migrating)?;
            tx.execute_batch(MIGRATE_V3_BEFORE).map_err(migrating)?;
        }
        tx.execute_batch(SCHEMA_SQL)
            .map_err(|e| Error::db(&self.path, e))?;
        if version == 1 {
            tx.execute_batch(MIGRATE_V1_AFTER).map_err(migrating)?;
        }
        if (1..SCHEMA_VERSION).contains(&version) {
            refuse_missing_columns(&tx, &[]).map_err(|e| Error::db(&self.path, e))?;
            log::info!(
                "{}: migrated the schema from version {version} to {SCHEMA_VERSION}",
                self.path.display()
            );
        }
        tx.commit().map_err(|e| Error::db(&self.path, e))
    }

    /// Checks that the schema exists and is one this binary understands, without changing anything.
    pub fn check_schema(&self) -> Result<()> {
        match self.user_version()? {
            0 => {
                // `init` would refuse such a table too: say what it would say.
                refuse_missing_columns(&self.conn, &[]).map_err(|e| self.err(e))?;
                Err(self.err("has no foreman schema (run `foreman init`)"))
            }
            version if version < SCHEMA_VERSION => Err(self.err(format!(
                "has schema version {version}; this foreman needs {SCHEMA_VERSION} (run `foreman init` or start the daemon to upgrade it)"
            ))),
            version => {
                self.refuse_newer(version)?;
                refuse_missing_columns(&self.conn, &[]).map_err(|e| self.err(e))?;
                match missing_table(&self.conn).map_err(|e| self.err(e))? {
                    Some(table) => Err(self.err(format!(
                        "has no table {table} (run `foreman init` to create it)"
                    ))),
                    None => Ok(()),
                }
            }
        }
    }
}

/// The tables and columns `SCHEMA_SQL` creates, read from an in-memory database it was applied
/// to, so that the check below can never drift from the schema.
fn expected_tables() -> &'static [(String, Vec<String>)] {
    static TABLES: OnceLock<Vec<(String, Vec<String>)>> = OnceLock::new();
    TABLES.get_or_init(|| {
        let read = || -> rusqlite::Result<Vec<(String, Vec<String>)>> {
            let conn = Connection::open_in_memory()?;
            conn.execute_batch(SCHEMA_SQL)?;
            let names: Vec<String> = conn
                .prepare(
                    "SELECT name FROM sqlite_schema WHERE type = 'table' AND name LIKE 'foreman%' ORDER BY name",
                )?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            names
                .into_iter()
                .map(|name| {
                    let columns = table_columns(&conn, &name)?;
                    Ok((name, columns))
                })
                .collect()
        };
        // Cannot fail for the schema this binary carries (a unit test applies it); if it did,
        // the check would only be skipped.
        read().unwrap_or_default()
    })
}

/// The columns of `table` in the database; empty when there is no such table.
fn table_columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    conn.prepare_cached("SELECT name FROM pragma_table_info(?1)")?
        .query_map([table], |r| r.get(0))?
        .collect()
}

/// Adds the columns of `V4_COLUMNS` that the existing tables lack.
fn add_v4_columns(tx: &Connection) -> rusqlite::Result<()> {
    for (table, column, definition) in V4_COLUMNS {
        let have = table_columns(tx, table)?;
        if !have.is_empty() && !have.iter().any(|c| c == column) {
            tx.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {definition}"
            ))?;
        }
    }
    Ok(())
}

/// An existing foreman table without every column the schema gives it (a producer created
/// `foreman_task` itself, say, before `init`): an error naming the table and the columns. The
/// columns in `added` are left out: a migration adds them.
fn refuse_missing_columns(
    conn: &Connection,
    added: &[(&str, &str, &str)],
) -> std::result::Result<(), String> {
    for (table, expected) in expected_tables() {
        let have = table_columns(conn, table).map_err(|e| e.to_string())?;
        if have.is_empty() {
            continue;
        }
        let missing: Vec<&str> = expected
            .iter()
            .filter(|column| !have.contains(column))
            .filter(|column| !added.iter().any(|(t, c, _)| t == table && c == column))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "table {table} lacks column(s) {} of schema version {SCHEMA_VERSION}: it was not created by foreman (rename it, run `foreman init`, and copy its rows over)",
                missing.join(", ")
            ));
        }
    }
    Ok(())
}

/// The first foreman table the database lacks, if any.
fn missing_table(conn: &Connection) -> rusqlite::Result<Option<&'static str>> {
    for (table, _) in expected_tables() {
        if table_columns(conn, table)?.is_empty() {
            return Ok(Some(table));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_column_check_knows_every_table_of_the_schema() {
        let tables: Vec<&str> = expected_tables().iter().map(|(t, _)| t.as_str()).collect();
        for table in [
            "foreman_task",
            "foreman_dead",
            "foreman_run",
            "foreman_schedule",
            "foreman_daemon",
            "foreman_stat",
            "foreman_pause",
            "foreman_abort",
            "foreman_daemon_log",
        ] {
            assert!(tables.contains(&table), "{tables:?}");
        }
        let task = &expected_tables()
            .iter()
            .find(|(t, _)| t == "foreman_task")
            .unwrap()
            .1;
        assert!(task.iter().any(|c| c == "leased_at"), "{task:?}");
    }
}
