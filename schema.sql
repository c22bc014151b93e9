-- foreman queue schema, version 4. This file is the producer's contract: producers may rely on what
-- this comment documents and on nothing else.
--
-- TO ENQUEUE A TASK
--   1. INSERT INTO foreman_task(task_name, args, kwargs) VALUES (?, ?, ?);
--      args is a JSON array, kwargs a JSON object (both optional: they default to '[]' and '{}').
--      Every column added in a later schema version has a default, so this 3-column INSERT keeps working.
--      Optional columns a producer may set too:
--        run_after  Unix time (seconds, REAL) before which the task does not start; default: now.
--                   A delay of 600 s: (julianday('now') - 2440587.5) * 86400.0 + 600
--        priority   INTEGER from -100 to 100, default 0; higher runs first. (Each priority in use
--                   costs the pop an index lookup: use a handful, not a timestamp.)
--        unique_key TEXT, default NULL: see UNIQUE TASKS below.
--      Leave the other columns (attempt, origin, leased_at, paused) to foreman.
--   2. After the transaction commits, create any file in the wakeup directory (default: the DB path
--      plus ".wakeup"). The daemon wakes through inotify, deletes the file and pops the queue. Creating
--      the file only when it is absent is enough; the daemon also checks the queue on a fallback tick
--      (1 s by default; up to the heartbeat, 5 s, while it is idle), so a lost or stale wakeup
--      file delays a task, it never stalls the queue.
--   Use a busy timeout of a few seconds on the producer's connection: the daemon holds the write lock
--   only for the few microseconds a pop takes. PRAGMA synchronous=NORMAL on that connection makes a
--   commit skip its fsync (the database is in WAL mode): a power loss may then lose the last commits,
--   never corrupt the file.
--
-- PYTHON: clients/python/foreman_client.py does all of this (Client(db).enqueue(name, *args, **kwargs);
-- enqueue_with(name, args, kwargs, delay=…, priority=…, unique_key=…) for delayed, prioritised or
-- unique tasks; wait(id) for a task's result). RUST: foreman::Client (examples/producer.rs).
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
-- UNIQUE TASKS
--   A row with a unique_key is not inserted while another task with the same key is queued (due,
--   delayed, paused, leased, or waiting for a retry) or running: at most one task per key is ever
--   queued or running. The first is enforced by the unique index foreman_task_unique, the second
--   by the trigger foreman_task_unique_running, which skips the insert without an error (so a
--   task popped a moment ago is not joined by a second one before it has ended). To insert only if
--   no such task exists, and learn the id either way:
--     INSERT INTO foreman_task(task_name, args, kwargs, unique_key) VALUES (?, ?, ?, ?)
--         ON CONFLICT DO NOTHING;
--     -- if no row was inserted (changes() = 0), the task that holds the key:
--     SELECT id FROM foreman_task WHERE unique_key = ?
--     UNION ALL SELECT task_id FROM foreman_run WHERE unique_key = ? AND state = 'running';
--   in one transaction (BEGIN IMMEDIATE), so that the task holding the key cannot end in between.
--   Once a task has ended (done, failed for good, dead, cancelled) its key is free again; a failed
--   task waiting for its retry keeps it. Without ON CONFLICT, an INSERT whose key is queued fails
--   with a UNIQUE constraint error.
--
-- SEMANTICS
--   Tasks run at most once by default: the daemon deletes a row in the same transaction that pops it,
--   before the task starts. A crash loses at most the tasks that were running; none ever runs twice.
--   A task type configured with delivery = "at-least-once" is leased instead (its row stays, with
--   run_after moved to the lease's end and leased_at set) and deleted when it finishes; a crash means
--   it runs again (attempt + 1) at the next start.
--   Order: highest priority first; within a priority, by run_after, then id. A task enqueued without a
--   delay is due when it is inserted, so plain tasks run in id (FIFO) order.
--   A failed task with retries left (config max_retries) is put back with the same id, attempt + 1
--   and a later run_after; when none are left it moves to foreman_dead with its last error.
--   A row that cannot run (unknown or empty task name, a name over 1024 bytes or with a control
--   character, args not a JSON array, kwargs not a JSON object, text that is not JSON or not UTF-8)
--   is moved to foreman_dead with the reason, in the same transaction that pops it.
--   Every attempt is recorded in foreman_run (kept 7 days by default): `foreman wait ID` reads it.
--   A paused task name (`foreman pause NAME`, table foreman_pause) keeps its rows queued: the daemon
--   starts none of them until `foreman resume NAME`; it sets `paused` on those it meets meanwhile,
--   which takes them out of the pop's index, and clears it after the resume.
--
-- The daemon puts the database in WAL mode (a persistent setting), so producers never block it for long.
-- All times are Unix times in seconds (REAL, millisecond precision). Defaults are written with
-- julianday() so that they work on every SQLite from 3.35 on.

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
    leased_at  REAL,
    -- Schema version 4. At most one task with a given key is queued or running (UNIQUE TASKS above).
    unique_key TEXT,
    -- 1 while the row waits for its paused task name to be resumed (set and cleared by foreman).
    paused     INTEGER NOT NULL DEFAULT 0
);

-- The pop walks priorities from the highest down and takes each one's due rows in (run_after, id)
-- order: a range scan of this index, however many rows are queued, delayed or paused (paused rows
-- are not in it).
CREATE INDEX IF NOT EXISTS foreman_task_due ON foreman_task(priority, run_after) WHERE paused = 0;
-- What a restart must find: the leases of at-least-once tasks its predecessor was running.
CREATE INDEX IF NOT EXISTS foreman_task_leased ON foreman_task(id) WHERE leased_at IS NOT NULL;
-- The rows held back by a pause, by task name: what a resume puts back, and what `status` counts.
CREATE INDEX IF NOT EXISTS foreman_task_paused ON foreman_task(task_name, id) WHERE paused = 1;
-- At most one queued task per unique_key.
CREATE UNIQUE INDEX IF NOT EXISTS foreman_task_unique ON foreman_task(unique_key)
    WHERE unique_key IS NOT NULL;

-- Rows that could not be run, or failed with no retries left. task_id is the id the row had in
-- foreman_task; task_name, args and kwargs are copied from it unchanged (even when they are not
-- valid UTF-8 or JSON), so nothing is lost and `foreman dead requeue` can run it again.
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
    origin     TEXT,
    -- Schema version 4: the task's unique_key, given back to it by `foreman dead requeue`.
    unique_key TEXT
);

-- `foreman wait` and `foreman cancel` look dead letters up by task id.
CREATE INDEX IF NOT EXISTS foreman_dead_task ON foreman_dead(task_id);

-- One row per attempt, written by the daemon. state is one of running, done, failed, timeout, lost
-- (the daemon died while it ran), dead (it could not run), cancelled (`foreman cancel`, before it
-- started or while it ran). retry_at is set on a failed attempt that will be tried again. error is
-- the failure's text, truncated to 8 KiB. Schema version 4 adds:
--   task        the task as this attempt ran it, so that `foreman retry` can queue it again from
--               any attempt (even one lost in a crash), as a JSON object: {"args": […], "kwargs":
--               {…}, "priority": N, "origin": "…"}, each key left out when it is usual (no args,
--               no kwargs, priority 0, no origin): {} for a plain task
--   unique_key  the task's unique key: a running attempt holds it (UNIQUE TASKS above)
--   result      the JSON value the task returned (at most 64 KiB), or NULL
--   exit_code   a command task's exit status (128 + N when killed by signal N)
-- (Few columns on purpose: the daemon writes a row per task, and SQLite compares the keys of a
-- WITHOUT ROWID table of more than 13 columns the slow way.)
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
    task        TEXT,
    unique_key  TEXT,
    result      TEXT,
    exit_code   INTEGER,
    PRIMARY KEY (task_id, attempt)
) WITHOUT ROWID;

-- What a restart must find: the attempts that were running when the daemon died.
CREATE INDEX IF NOT EXISTS foreman_run_running ON foreman_run(task_id) WHERE state = 'running';
-- A task whose unique_key a running attempt holds is not inserted: skipped without an error, as
-- ON CONFLICT DO NOTHING skips one whose key is queued. (The running attempts are few: a walk of
-- foreman_run_running.)
CREATE TRIGGER IF NOT EXISTS foreman_task_unique_running BEFORE INSERT ON foreman_task
    WHEN NEW.unique_key IS NOT NULL AND EXISTS (SELECT 1 FROM foreman_run
        WHERE state = 'running' AND unique_key = NEW.unique_key)
BEGIN
    SELECT RAISE(IGNORE);
END;

-- Running attempts `foreman cancel` asked to abort: the daemon running one stops it (SIGTERM,
-- then SIGKILL after grace seconds; an in-process handler sees its cancellation flag) and records
-- it cancelled. A row outlives its attempt only until the daemon's next clean-up.
CREATE TABLE IF NOT EXISTS foreman_abort (
    task_id      INTEGER NOT NULL,
    attempt      INTEGER NOT NULL,
    grace        REAL NOT NULL,
    requested_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    PRIMARY KEY (task_id, attempt)
) WITHOUT ROWID;

-- Paused task names (`foreman pause NAME…`, `foreman resume NAME…`): the daemon starts none of their
-- tasks, and their schedules skip their windows, until they are resumed. task_name '' (which no
-- task can have) stands for every task (`foreman pause --all`). paused_at: since when.
CREATE TABLE IF NOT EXISTS foreman_pause (
    task_name TEXT PRIMARY KEY,
    paused_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
) WITHOUT ROWID;

-- Recurring tasks ([schedules.NAME] in the config): when each fires next, so that a restart neither
-- fires one twice nor catches up on every missed window. interval is the adaptive schedules' current
-- interval in seconds; spec is the definition next_due was computed from.
CREATE TABLE IF NOT EXISTS foreman_schedule (
    name         TEXT PRIMARY KEY,
    spec         TEXT NOT NULL,
    next_due     REAL NOT NULL,
    last_fired   REAL,
    last_task_id INTEGER,
    interval     REAL
);

-- Every daemon that started on this database (schema version 4), kept as long as the figures: the
-- daemon that ran an attempt is the last one to start before the attempt did.
CREATE TABLE IF NOT EXISTS foreman_daemon_log (
    started_at REAL NOT NULL,
    pid        INTEGER NOT NULL,
    host       TEXT NOT NULL,
    PRIMARY KEY (started_at, pid)
) WITHOUT ROWID;

-- The daemon's heartbeat: one row (id 1), replaced when a daemon starts, rewritten from its loop
-- every `heartbeat` (5 s by default) and at least once a second while it works, stamped
-- stopping_at when a shutdown signal makes it stop popping (it then waits for its running tasks)
-- and stopped_at when it exits cleanly. A heartbeat that stops moving while the pid lives is a stuck
-- loop. pid_start is the process's start time in clock ticks since boot (field 22 of
-- /proc/PID/stat), so a reused pid is not taken for the daemon. pools is a JSON array of
-- {"name", "processes", "up"}; totals a JSON object {task name: {"done": n, "failed": n}} counted
-- since started_at; workers is rewritten with them (a reload may change it). The running set is
-- foreman_run's rows in state 'running'.
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

-- Per-minute figures per task name (kept 7 days by default), written by the daemon from memory at
-- most once a second. minute is the Unix time divided by 60, of when the attempt ended. count is
-- the attempts that ended (done + failed; failed counts timeouts too). Wall time is start to end,
-- wait time enqueue (or due time, for a delayed task or a retry) to start, in seconds. The _hist
-- columns are JSON objects {bucket: count} of a log histogram: bucket b holds durations from
-- 100 µs · 2^((b-1)/4) up to 100 µs · 2^(b/4) (bucket 0: below 100 µs), so a percentile read from
-- it is within 9 % of the truth.
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

PRAGMA user_version = 4;
