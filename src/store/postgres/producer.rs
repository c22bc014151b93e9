//! A producer's connection to PostgreSQL as schema-postgres.sql describes one, for the benchmark:
//! plain `INSERT`s, then `NOTIFY foreman` after the commit; and its checks of what became of the
//! rows (still queued, attempts recorded).

use std::cell::{Cell, OnceCell, RefCell};
use std::ops::RangeInclusive;

use postgres::Client;

use super::{Role, Target};
use crate::error::{Error, Result};
use crate::store::RecordedAttempts;

pub struct Producer {
    target: Target,
    client: RefCell<Client>,
    last_id: Cell<i64>,
    /// The hot inserts, prepared at their first use (the bench's own connection, which only
    /// creates and drops schemas, runs on a database without foreman's tables) and then kept: a
    /// producer that enqueues one row per transaction pays one round trip each.
    insert_name: OnceCell<postgres::Statement>,
    insert_one: OnceCell<postgres::Statement>,
}

const INSERT_NAME: &str = "INSERT INTO foreman_task (task_name) VALUES ($1) RETURNING id";
const INSERT_ONE: &str =
    "INSERT INTO foreman_task (task_name, args) VALUES ($1, $2::text::jsonb) RETURNING id";

impl Producer {
    /// A producer's connection; with `durable` false, its commits do not wait for the WAL to
    /// reach disk (`synchronous_commit = off`, which schema-postgres.sql offers producers, as
    /// schema.sql offers SQLite's `synchronous = NORMAL`).
    pub fn open(url: &str, label: &str, durable: bool) -> Result<Producer> {
        let target = Target::parse(url, label)?;
        let mut client = target.connect(Role::Command)?;
        let err = |e: postgres::Error| target.error(&e);
        if !durable {
            client
                .batch_execute("SET synchronous_commit = off")
                .map_err(err)?;
        }
        Ok(Producer {
            target,
            client: RefCell::new(client),
            last_id: Cell::new(0),
            insert_name: OnceCell::new(),
            insert_one: OnceCell::new(),
        })
    }

    /// The statement in `cell`, prepared from `sql` the first time.
    fn prepared(
        &self,
        cell: &OnceCell<postgres::Statement>,
        sql: &str,
    ) -> Result<postgres::Statement> {
        if let Some(statement) = cell.get() {
            return Ok(statement.clone());
        }
        let statement = self.run(|c| c.prepare(sql))?;
        Ok(cell.get_or_init(|| statement).clone())
    }

    fn run<T>(
        &self,
        work: impl FnOnce(&mut Client) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        work(&mut self.client.borrow_mut()).map_err(|e| self.target.error(&e))
    }

    /// Inserts `count` rows of `name` in one statement; with `keys_from`, row i gets
    /// `args = [keys_from + i]` (i from 0). Returns the ids (consecutive: one producer).
    pub fn insert_many(
        &mut self,
        name: &str,
        count: usize,
        keys_from: Option<i64>,
    ) -> Result<RangeInclusive<i64>> {
        let count = i64::try_from(count).unwrap_or(i64::MAX);
        let row = self.run(|c| {
            c.query_one(
                "WITH ins AS (INSERT INTO foreman_task (task_name, args) \
                 SELECT $1, CASE WHEN $3::int8 IS NULL THEN '[]'::jsonb \
                                 ELSE jsonb_build_array(i - 1 + $3::int8) END \
                 FROM generate_series(1, $2::int8) AS i RETURNING id) \
                 SELECT min(id), max(id) FROM ins",
                &[&name, &count, &keys_from],
            )
        })?;
        let (first, last): (Option<i64>, Option<i64>) = (row.get(0), row.get(1));
        match (first, last) {
            (Some(first), Some(last)) if last - first + 1 == count => Ok(first..=last),
            _ => Err(self
                .target
                .error_text("the bench's batch insert got ids that are not consecutive")),
        }
    }

    /// The `list` bench's rows (as the SQLite producer's).
    pub fn insert_list_fixture(&self, count: usize) -> Result<()> {
        let count = i64::try_from(count).unwrap_or(i64::MAX);
        self.run(|c| {
            c.execute(
                "INSERT INTO foreman_task (task_name, args, priority, run_after) \
                 SELECT CASE WHEN i % 1000 = 0 THEN 'bench.rare' ELSE 'bench.bulk' END, \
                        jsonb_build_array(i), i % 3, \
                        CASE WHEN i % 100 = 0 THEN 'infinity'::timestamptz ELSE now() END \
                 FROM generate_series(1, $1::int8) AS i",
                &[&count],
            )?;
            // What autovacuum does soon after a million inserts; the queries are measured on a
            // table with statistics, as they run in a live database.
            c.batch_execute("ANALYZE foreman_task")
        })
    }

    /// Inserts one row in a transaction of its own; returns its id.
    pub fn insert_one(&self, name: &str, args: &str) -> Result<i64> {
        let statement = self.prepared(&self.insert_one, INSERT_ONE)?;
        self.run(|c| c.query_one(&statement, &[&name, &args]))
            .map(|r| r.get(0))
    }

    /// Runs `inserts` in one transaction; rolled back if it fails.
    pub fn in_transaction<T>(&self, inserts: impl FnOnce(&Producer) -> Result<T>) -> Result<T> {
        self.run(|c| c.batch_execute("BEGIN"))?;
        match inserts(self) {
            Ok(done) => {
                self.run(|c| c.batch_execute("COMMIT"))?;
                Ok(done)
            }
            Err(e) => {
                let _ = self.run(|c| c.batch_execute("ROLLBACK"));
                Err(e)
            }
        }
    }

    /// Inserts a row of `name` with only its name given, and returns its id.
    pub fn insert_name(&self, name: &str) -> Result<i64> {
        let statement = self.prepared(&self.insert_name, INSERT_NAME)?;
        let id = self.run(|c| c.query_one(&statement, &[&name]))?;
        Ok(id.get(0))
    }

    /// `insert_name`, remembering the id for `last_id`.
    pub fn append_name(&self, name: &str) -> Result<()> {
        let id = self.insert_name(name)?;
        self.last_id.set(id);
        Ok(())
    }

    pub fn last_id(&self) -> i64 {
        self.last_id.get()
    }

    /// Inserts a row of `name` due at `run_after` (Unix seconds), and returns its id.
    pub fn insert_due_at(&self, name: &str, run_after: f64) -> Result<i64> {
        self.run(|c| {
            c.query_one(
                "INSERT INTO foreman_task (task_name, run_after) VALUES ($1, to_timestamp($2)) RETURNING id",
                &[&name, &run_after],
            )
        })
        .map(|r| r.get(0))
    }

    /// `NOTIFY foreman`, after a commit: the producer's wake-up.
    pub fn notify(&self) -> Result<()> {
        self.run(|c| c.batch_execute("NOTIFY foreman"))
    }

    /// How many of `ids` are still queued.
    pub fn queued(&self, ids: &RangeInclusive<i64>) -> Result<usize> {
        let row = self.run(|c| {
            c.query_one(
                "SELECT count(*) FROM foreman_task WHERE id BETWEEN $1 AND $2",
                &[ids.start(), ids.end()],
            )
        })?;
        Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    /// What the daemons recorded of the attempts of `ids`.
    pub fn attempts(&self, ids: &RangeInclusive<i64>) -> Result<RecordedAttempts> {
        let row = self.run(|c| {
            c.query_one(
                "SELECT count(*), count(DISTINCT task_id), count(*) FILTER (WHERE state = 'done') \
                 FROM foreman_run WHERE task_id BETWEEN $1 AND $2",
                &[ids.start(), ids.end()],
            )
        })?;
        let n = |i: usize| usize::try_from(row.get::<_, i64>(i)).unwrap_or(0);
        Ok(RecordedAttempts {
            count: n(0),
            tasks: n(1),
            done: n(2),
        })
    }

    /// Creates schema `name` afresh (dropping one left by a bench that was killed).
    pub fn create_schema(&self, name: &str) -> Result<()> {
        let name = schema_name(name)?;
        self.run(|c| {
            c.batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"
            ))
        })
    }

    /// Drops schema `name` and all it holds.
    pub fn drop_schema(&self, name: &str) -> Result<()> {
        let name = schema_name(name)?;
        self.run(|c| c.batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE")))
    }

    /// The process id of this connection's backend on the server.
    pub fn backend_pid(&self) -> Result<i64> {
        let row = self.run(|c| c.query_one("SELECT pg_backend_pid()::int8", &[]))?;
        Ok(row.get(0))
    }

    /// The transactions of this database so far (committed and rolled back), as the server
    /// counts them: each statement a client sends in autocommit is one.
    pub fn transactions(&self) -> Result<i64> {
        let row = self.run(|c| {
            c.query_one(
                "SELECT (xact_commit + xact_rollback)::int8 FROM pg_stat_database \
                 WHERE datname = current_database()",
                &[],
            )
        })?;
        Ok(row.get(0))
    }
}

/// A schema name the bench made up, checked to need no quoting.
fn schema_name(name: &str) -> Result<&str> {
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if plain {
        Ok(name)
    } else {
        Err(Error::Config(format!("not a plain schema name: {name:?}")))
    }
}
