-- foreman queue schema, version 1. This file is the producer's contract: producers may rely on what
-- this comment documents and on nothing else.
--
-- TO ENQUEUE A TASK
--   1. INSERT INTO foreman_task(task_name, args, kwargs) VALUES (?, ?, ?);
--      args is a JSON array, kwargs a JSON object (both optional: they default to '[]' and '{}').
--      Every column added in a later schema version has a default, so this 3-column INSERT keeps working.
--   2. After the transaction commits, create any file in the wakeup directory (default: the DB path
--      plus ".wakeup"). The daemon wakes through inotify, deletes the file and pops the queue. Creating
--      the file only when it is absent is enough; the daemon also checks the queue on a fallback tick
--      (1 s by default), so a lost or stale wakeup file delays a task, it never stalls the queue.
--   Use a busy timeout of a few seconds on the producer's connection: the daemon holds the write lock
--   only for the few microseconds a pop takes. PRAGMA synchronous=NORMAL on that connection makes a
--   commit skip its fsync (the database is in WAL mode): a power loss may then lose the last commits,
--   never corrupt the file.
--
-- PYTHON: clients/python/foreman_client.py does all of this (Client(db).enqueue(name, *args, **kwargs)).
-- By hand, with the stdlib sqlite3:
--   import json, os, sqlite3
--   db = sqlite3.connect("foreman.sqlite3", timeout=5, isolation_level=None)
--   db.execute("INSERT INTO foreman_task(task_name, args, kwargs) VALUES (?, ?, ?)",
--              ("myapp.send_email", json.dumps(["a@example.com"]), json.dumps({"retry": True})))
--   wakeup = os.path.join("foreman.sqlite3.wakeup", "py-%d" % os.getpid())
--   os.path.exists(wakeup) or open(wakeup, "a").close()
--
-- SHELL (sqlite3 CLI)
--   sqlite3 -cmd '.timeout 5000' foreman.sqlite3 "INSERT INTO foreman_task(task_name, args) VALUES ('foreman.echo', '[\"hi\"]')"
--   touch foreman.sqlite3.wakeup/sh-$$
--
-- SEMANTICS
--   Tasks run at most once: the daemon deletes a row in the same transaction that pops it, before the
--   task starts. A crash loses at most the tasks that were running; none ever runs twice.
--   Rows are popped in id order. A row that cannot run (unknown or empty task name, args not a JSON
--   array, kwargs not a JSON object, text that is not JSON or not UTF-8) is moved to foreman_dead with
--   the reason, in the same transaction that pops it.
--
-- The daemon puts the database in WAL mode (a persistent setting), so producers never block it for long.
-- created_at and died_at are Unix times in seconds (REAL, millisecond precision). The default is
-- written with julianday() so that it works on every SQLite from 3.35 on.

CREATE TABLE IF NOT EXISTS foreman_task (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    task_name  TEXT NOT NULL,
    args       TEXT NOT NULL DEFAULT '[]',
    kwargs     TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
);

-- Rows that could not be run. task_id is the id the row had in foreman_task; the other columns are
-- copied from it unchanged (even when they are not valid UTF-8 or JSON), so nothing is lost.
CREATE TABLE IF NOT EXISTS foreman_dead (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id    INTEGER NOT NULL,
    task_name  TEXT,
    args       TEXT,
    kwargs     TEXT,
    created_at REAL,
    reason     TEXT NOT NULL,
    died_at    REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
);

PRAGMA user_version = 1;
