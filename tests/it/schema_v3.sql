-- schema.sql at version 3 (foreman before issue 18), without its comments: the tables and indexes a
-- version 3 database has, for the migration test.

CREATE TABLE IF NOT EXISTS foreman_task (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    task_name  TEXT NOT NULL,
    args       TEXT NOT NULL DEFAULT '[]',
    kwargs     TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    run_after  REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
               CHECK (typeof(run_after) IN ('real', 'integer')),
    priority   INTEGER NOT NULL DEFAULT 0
               CHECK (typeof(priority) = 'integer' AND priority BETWEEN -100 AND 100),
    -- 1 for the first run; a retry or a re-run after a crash counts up.
    attempt    INTEGER NOT NULL DEFAULT 1,
    -- Who enqueued it when it was not a producer: "schedule NAME", "requeue of dead N (task M)".
    origin     TEXT,
    -- Set while an at-least-once task runs (its lease ends at run_after).
    leased_at  REAL
);

CREATE INDEX IF NOT EXISTS foreman_task_due ON foreman_task(priority, run_after);
CREATE INDEX IF NOT EXISTS foreman_task_leased ON foreman_task(id) WHERE leased_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS foreman_dead (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id    INTEGER NOT NULL,
    task_name  TEXT,
    args       TEXT,
    kwargs     TEXT,
    created_at REAL,
    reason     TEXT NOT NULL,
    died_at    REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    -- Attempts made (0: it never ran), and the row's priority and origin.
    attempts   INTEGER NOT NULL DEFAULT 0,
    priority   INTEGER NOT NULL DEFAULT 0,
    origin     TEXT
);

CREATE INDEX IF NOT EXISTS foreman_dead_task ON foreman_dead(task_id);

CREATE TABLE IF NOT EXISTS foreman_run (
    task_id     INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    task_name   TEXT NOT NULL,
    state       TEXT NOT NULL,
    enqueued_at REAL,
    started_at  REAL,
    finished_at REAL,
    error       TEXT,
    retry_at    REAL,
    PRIMARY KEY (task_id, attempt)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS foreman_run_running ON foreman_run(task_id) WHERE state = 'running';

CREATE TABLE IF NOT EXISTS foreman_schedule (
    name         TEXT PRIMARY KEY,
    spec         TEXT NOT NULL,
    next_due     REAL NOT NULL,
    last_fired   REAL,
    last_task_id INTEGER,
    interval     REAL
);

CREATE TABLE IF NOT EXISTS foreman_daemon (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    pid          INTEGER NOT NULL,
    pid_start    INTEGER,
    host         TEXT NOT NULL,
    version      TEXT NOT NULL,
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    stopping_at  REAL,
    stopped_at   REAL,
    workers      INTEGER NOT NULL,
    pools        TEXT NOT NULL DEFAULT '[]',
    totals       TEXT NOT NULL DEFAULT '{}'
);

CREATE TABLE IF NOT EXISTS foreman_stat (
    minute     INTEGER NOT NULL,
    task_name  TEXT NOT NULL,
    count      INTEGER NOT NULL DEFAULT 0,
    done       INTEGER NOT NULL DEFAULT 0,
    failed     INTEGER NOT NULL DEFAULT 0,
    wall_total REAL NOT NULL DEFAULT 0,
    wall_max   REAL NOT NULL DEFAULT 0,
    wait_total REAL NOT NULL DEFAULT 0,
    wait_max   REAL NOT NULL DEFAULT 0,
    wall_hist  TEXT NOT NULL DEFAULT '{}',
    wait_hist  TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (minute, task_name)
) WITHOUT ROWID;

PRAGMA user_version = 3;
