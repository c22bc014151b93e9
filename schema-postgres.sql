-- foreman queue schema for PostgreSQL, version 1. This file is the producer's contract on
-- PostgreSQL, as schema.sql is on SQLite: producers may rely on what this comment documents and on
-- nothing else. It needs PostgreSQL 13 or later.
--
-- WHERE THE TABLES LIVE
--   In the first schema of the connection's search_path that exists (current_schema()), the same
--   for `foreman init`, the daemons and the producers: point all of them at one schema. The user
--   that runs `foreman init` needs CREATE on it; since PostgreSQL 15 ordinary users may not create
--   in `public`, so give the app its own schema:
--     CREATE SCHEMA foreman AUTHORIZATION app;  ALTER ROLE app SET search_path = foreman;
--   (ALTER ROLE works behind PgBouncer too, where a search_path in the URL's `options` may not.)
--   `foreman init` applies this file in one transaction; by hand: psql -1 -f schema-postgres.sql.
--   Applying it again changes nothing.
--
-- TO ENQUEUE A TASK
--   1. INSERT INTO foreman_task(task_name, args, kwargs) VALUES ($1, $2, $3);
--      args is a JSON array, kwargs a JSON object (both optional: they default to '[]' and '{}').
--      Both columns are jsonb: the INSERT itself refuses text that is not JSON, args that is not an
--      array, kwargs that is not an object, and a task_name that is empty, over 1024 bytes or holds
--      a control character, so a bad row fails in the producer's hands instead of becoming a dead
--      letter. A driver that sends parameters typed as text needs a cast: VALUES ($1, $2::jsonb, $3::jsonb).
--      (jsonb cannot hold the character U+0000, and keeps only the last of duplicate keys.)
--      Every column added in a later schema version has a default, so this 3-column INSERT keeps
--      working. Optional columns a producer may set too:
--        run_after  timestamptz before which the task does not start; default now(), the database's
--                   clock (never the producer's): a delay of 10 minutes is  now() + interval '10 min'.
--        priority   smallint from -100 to 100, default 0; higher runs first. (Each priority in use
--                   costs the pop an index lookup: use a handful, not a timestamp.)
--        unique_key text: at most one task with this key is queued or running (UNIQUE TASKS below).
--      Leave the other columns (id, created_at, attempt, origin, leased_by, leased_at) to foreman.
--      A producer may commit with synchronous_commit = off (SET on its connection, or
--      ?options=-csynchronous_commit%3Doff in its URL): a commit then returns before the WAL reaches
--      disk, several times faster; a crash of the server may lose the last enqueues it reported,
--      never corrupt anything (SQLite's synchronous = NORMAL makes the same trade). Behind
--      PgBouncer in transaction mode, use SET LOCAL in the transaction, or ALTER ROLE … SET. The
--      daemons keep their own claims durable: a lost claim could run a task twice.
--   2. Optionally, after the transaction commits: NOTIFY foreman  (the producers' channel, the one
--      the daemons listen on; the payload is ignored). A daemon that listens pops at once; without a
--      NOTIFY, or behind PgBouncer in transaction mode where LISTEN cannot work, the daemons find the
--      task at their next poll (1 s by default, 250 ms in poll-only mode). Send at most one NOTIFY
--      per 100 ms per process, after the commit, and never from a trigger on foreman_task: every
--      NOTIFY takes a lock that serialises the commits of the whole cluster.
--
-- CHANNELS
--   foreman          producers NOTIFY it after their commit (above); the daemons and the dashboards
--                    (`foreman ui`) listen. The payload 'control' asks the daemons to read their
--                    pauses and aborts again (`foreman pause`, `resume`, `cancel` send it).
--   foreman_changed  the daemons NOTIFY it when they changed what an operator sees: in the commit
--                    of a heartbeat, when the daemon started or ended tasks, buried some or
--                    recovered a daemon since its previous heartbeat (so at most one per heartbeat,
--                    about one a second while it works, none while it idles), and when a daemon
--                    starts and stops; the dashboards' actions send it too. The dashboards listen,
--                    to refresh their pages; anyone may. The payload is empty. Producers need not
--                    send it: NOTIFY foreman is enough.
--
-- UNIQUE TASKS
--   A task with a unique_key is not queued while another with that key is queued or running. The
--   queued case is the unique index: INSERT … ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL
--   DO NOTHING. To cover a running task too, in one transaction first take the key's lock, then
--   insert only if no attempt with that key runs:
--     BEGIN;
--     SELECT pg_advisory_xact_lock(hashtextextended('foreman:' || $key, 0));
--     INSERT INTO foreman_task(task_name, args, unique_key) SELECT $1, $2, $key
--         WHERE NOT EXISTS (SELECT 1 FROM foreman_run WHERE state = 'running' AND unique_key = $key)
--         ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING RETURNING id;
--     COMMIT;
--   (A daemon takes the same lock when it claims a keyed row, so the two cannot cross.) No id back:
--   a task with that key is queued or running.
--
-- PYTHON: clients/python/foreman_client.py does all of this when psycopg 3 is installed
-- (Client("postgresql://…").enqueue(name, *args, **kwargs)). By hand, with psycopg 3:
--   import json, psycopg
--   with psycopg.connect("postgresql://app@db/app", autocommit=True) as db:
--       db.execute("INSERT INTO foreman_task(task_name, args, kwargs) VALUES (%s, %s::jsonb, %s::jsonb)",
--                  ("myapp.send_email", json.dumps(["a@example.com"]), json.dumps({"retry": True})))
--       db.execute("NOTIFY foreman")
--
-- SHELL (psql)
--   psql "$DATABASE_URL" -c "INSERT INTO foreman_task(task_name, args) VALUES ('foreman.echo', '[\"hi\"]')" -c "NOTIFY foreman"
--
-- SEMANTICS
--   As on SQLite, across every daemon that serves the database:
--   Tasks run at most once by default: a daemon deletes a row in the transaction that claims it
--   (SELECT … FOR UPDATE SKIP LOCKED), before the task starts. A crash loses at most the tasks that
--   daemon was running or had claimed; none ever runs twice.
--   A task type configured with delivery = "at-least-once" is leased instead: its row stays, with
--   leased_by set to the daemon's id, leased_at to when the lease began, and run_after moved to the
--   lease's end, and it is deleted when it finishes. A lease that ends without being renewed (its
--   daemon died, or lost the database for longer than the lease) is due again: any daemon takes it,
--   as attempt + 1.
--   A daemon only claims the task names it serves: a name served by some daemons only waits for one
--   of them. A row becomes a dead letter for "no handler" only when no daemon seen alive during a
--   grace period serves its name.
--   Order: highest priority first; within a priority, by run_after, then id. A task enqueued without
--   a delay is due when its transaction began, so plain tasks run in about id (FIFO) order.
--   A failed task with retries left (config max_retries) is put back with the same id, attempt + 1
--   and a later run_after; when none are left it moves to foreman_dead with its last error.
--   Every attempt is recorded in foreman_run (kept 7 days by default): `foreman wait ID` reads it.
--   All times are timestamptz taken from the database's clock (now()), never from a host's.
--
-- The tables below other than foreman_task are written by the daemons; they are documented so
-- that operators can read them, not as a protocol.

-- Applied as one transaction, under a transaction-scoped advisory lock, so two `foreman init`s at
-- once cannot both create the same table (CREATE … IF NOT EXISTS alone can fail then). The key is
-- 'foreman' in ASCII. A transaction-scoped lock also works behind PgBouncer in transaction mode.
SELECT pg_advisory_xact_lock(28821955155271022);

CREATE TABLE IF NOT EXISTS foreman_task (
    -- GENERATED ALWAYS: a producer cannot pick an id (foreman re-inserts a retry under its own).
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_name  text NOT NULL
               CONSTRAINT foreman_task_name_valid CHECK (
                   task_name <> '' AND octet_length(task_name) <= 1024
                   AND task_name !~ '[\x01-\x1f\x7f-\x9f]'),
    args       jsonb NOT NULL DEFAULT '[]'
               CONSTRAINT foreman_task_args_array CHECK (jsonb_typeof(args) = 'array'),
    kwargs     jsonb NOT NULL DEFAULT '{}'
               CONSTRAINT foreman_task_kwargs_object CHECK (jsonb_typeof(kwargs) = 'object'),
    created_at timestamptz NOT NULL DEFAULT now(),
    run_after  timestamptz NOT NULL DEFAULT now(),
    priority   smallint NOT NULL DEFAULT 0
               CONSTRAINT foreman_task_priority_range CHECK (priority BETWEEN -100 AND 100),
    -- 1 for the first run; a retry or a re-run after a lost lease counts up.
    attempt    integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    -- Who enqueued it when it was not a producer: "schedule NAME", "requeue of dead N (task M)".
    origin     text,
    -- Set while an at-least-once task runs: the id of the daemon (foreman_daemon.id) that holds the
    -- lease and when the lease began; the lease ends at run_after. No foreign key: a key check on
    -- every lease would cost the claim, and a daemon row is never deleted while it holds leases.
    leased_by  bigint,
    leased_at  timestamptz,
    -- At most one task with a given key is queued or running (UNIQUE TASKS above).
    unique_key text,
    CONSTRAINT foreman_task_lease_whole CHECK ((leased_by IS NULL) = (leased_at IS NULL))
) WITH (
    -- Every claimed row leaves a dead tuple, and claims walk the dead ones at the head of the due
    -- index until vacuum clears them: vacuum after a fixed number of them, however large the table
    -- once grew, and without the cost-based pauses (the table is small once drained).
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 10000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 10000
);

-- The claim walks this index from the due end: per priority in use, the rows with run_after <=
-- now() in (run_after, id) order, and stops at the first row that is not due yet, however many are
-- delayed or leased behind it. An expired lease is found the same way (its run_after is the
-- lease's end). The claim's plan does not depend on the table's statistics.
CREATE INDEX IF NOT EXISTS foreman_task_due ON foreman_task (priority, run_after, id);
-- What recovering a dead daemon must find: the leases it held.
CREATE INDEX IF NOT EXISTS foreman_task_leased ON foreman_task (leased_by) WHERE leased_by IS NOT NULL;
-- One queued task per unique key.
CREATE UNIQUE INDEX IF NOT EXISTS foreman_task_unique ON foreman_task (unique_key)
    WHERE unique_key IS NOT NULL;

-- Rows that could not be run, or failed with no retries left. task_id is the id the row had in
-- foreman_task; task_name, args, kwargs, created_at, priority and origin are copied from it, so
-- nothing is lost and `foreman dead requeue` can run it again.
CREATE TABLE IF NOT EXISTS foreman_dead (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id    bigint NOT NULL,
    task_name  text,
    args       jsonb,
    kwargs     jsonb,
    created_at timestamptz,
    reason     text NOT NULL,
    died_at    timestamptz NOT NULL DEFAULT now(),
    -- Attempts made (0: it never ran), and the row's priority and origin.
    attempts   integer NOT NULL DEFAULT 0,
    priority   smallint NOT NULL DEFAULT 0,
    origin     text,
    -- The task's unique_key, given back to it by `foreman dead requeue`.
    unique_key text
);

-- `foreman wait` and `foreman cancel` look dead letters up by task id.
CREATE INDEX IF NOT EXISTS foreman_dead_task ON foreman_dead (task_id);

-- One row per attempt, written by the daemon that ran it (daemon_id: foreman_daemon.id). state is
-- one of running, done, failed, timeout, lost (its daemon died or was cut off while it ran), dead
-- (it could not run), cancelled; a newer foreman may add states, so readers treat an unknown one
-- as not final. retry_at is set on an attempt that will be tried again. error is the failure's
-- text, truncated to 8 KiB. args, kwargs, priority and origin are the task as the attempt ran it
-- (what `foreman retry` queues again); unique_key its key, which a running attempt holds; result
-- the JSON text the task returned (up to 64 KiB), exit_code a command's exit status.
CREATE TABLE IF NOT EXISTS foreman_run (
    task_id     bigint NOT NULL,
    attempt     integer NOT NULL,
    task_name   text NOT NULL,
    state       text NOT NULL,
    daemon_id   bigint,
    enqueued_at timestamptz,
    started_at  timestamptz,
    finished_at timestamptz,
    error       text,
    retry_at    timestamptz,
    args        jsonb,
    kwargs      jsonb,
    priority    smallint,
    origin      text,
    unique_key  text,
    result      text,
    exit_code   integer,
    PRIMARY KEY (task_id, attempt)
) WITH (
    -- Written twice per task (running, then its ending), pruned after 7 days.
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0
);

-- The running set (`status`, `health`) and what recovering a dead daemon must find: its attempts
-- that were running. Only running attempts are in it, so it stays small.
CREATE INDEX IF NOT EXISTS foreman_run_running ON foreman_run (daemon_id) WHERE state = 'running';
-- Whether a running attempt holds a unique key.
CREATE INDEX IF NOT EXISTS foreman_run_unique ON foreman_run (unique_key)
    WHERE state = 'running' AND unique_key IS NOT NULL;

-- `foreman cancel` of a running attempt: the daemon running it aborts it (SIGTERM, then SIGKILL
-- after grace seconds) and records it cancelled.
CREATE TABLE IF NOT EXISTS foreman_abort (
    task_id      bigint NOT NULL,
    attempt      integer NOT NULL,
    grace        double precision NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, attempt)
);

-- `foreman pause`: no daemon claims a paused task name ('' pauses every task) until `foreman
-- resume`; its rows stay queued as they are.
CREATE TABLE IF NOT EXISTS foreman_pause (
    task_name text PRIMARY KEY,
    paused_at timestamptz NOT NULL DEFAULT now()
);

-- Recurring tasks ([schedules.NAME] in the config), shared by every daemon that configures them:
-- a daemon fires one by moving next_due from the value it read to the next window, in the
-- transaction that inserts the task (a compare-and-set: of several daemons, one wins each window).
-- interval is the adaptive schedules' current interval in seconds; spec is the definition
-- next_due was computed from.
CREATE TABLE IF NOT EXISTS foreman_schedule (
    name         text PRIMARY KEY,
    spec         text NOT NULL,
    next_due     timestamptz NOT NULL,
    last_fired   timestamptz,
    last_task_id bigint,
    interval     double precision
);

-- One row per daemon run (a restart is a new row, with a new id), registered when it starts. The
-- daemon rewrites heartbeat_at from its loop every `heartbeat` (5 s by default) and at least once
-- a second while it works; it stamps stopping_at when a shutdown signal makes it stop claiming
-- (it then waits for its running tasks) and stopped_at when it exits cleanly. A daemon whose
-- heartbeat is older than the staleness limit and that has not stopped is recovered by another,
-- exactly once (recovered_at, recovered_by: the first to set them): its running attempts become
-- `lost` and its leases are released. pid_start is the process's start time in clock ticks since
-- boot (field 22 of /proc/PID/stat) on `host`, so a reused pid is not taken for the daemon.
-- pools is a JSON array of {"name", "processes", "up", "busy", "tasks"}; totals a JSON object
-- {task name: {"done": n, "failed": n}} counted since started_at; served the task names it
-- claims; stale_after the seconds its heartbeat may be silent before another daemon recovers it
-- (a few of its heartbeats, its own choice). The running set is foreman_run's rows in state
-- 'running' with its id.
CREATE TABLE IF NOT EXISTS foreman_daemon (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,
    pid_start    bigint,
    version      text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    stopping_at  timestamptz,
    stopped_at   timestamptz,
    workers      integer NOT NULL,
    pools        jsonb NOT NULL DEFAULT '[]',
    totals       jsonb NOT NULL DEFAULT '{}',
    served       text[] NOT NULL DEFAULT '{}',
    stale_after  double precision NOT NULL DEFAULT 30,
    recovered_at timestamptz,
    recovered_by bigint
) WITH (
    -- Rewritten by every heartbeat: room on each page keeps those updates in place (HOT).
    fillfactor = 50
);

-- Per-minute figures per task name and daemon (kept 7 days by default), written by each daemon
-- from memory at most once a second; one daemon never writes another's rows, so their writes never
-- wait for each other. Readers add up the daemons' rows. minute is the Unix time divided by 60, of
-- when the attempt ended. count is the attempts that ended (done + failed; failed counts timeouts
-- too). Wall time is start to end, wait time enqueue (or due time, for a delayed task or a retry)
-- to start, in seconds. The _hist columns are JSON objects {bucket: count} of a log histogram:
-- bucket b holds durations from 100 µs · 2^((b-1)/4) up to 100 µs · 2^(b/4) (bucket 0: below
-- 100 µs), so a percentile read from it is within 9 % of the truth.
CREATE TABLE IF NOT EXISTS foreman_stat (
    minute     bigint NOT NULL,
    task_name  text NOT NULL,
    daemon_id  bigint NOT NULL,
    count      bigint NOT NULL DEFAULT 0,
    done       bigint NOT NULL DEFAULT 0,
    failed     bigint NOT NULL DEFAULT 0,
    wall_total double precision NOT NULL DEFAULT 0,
    wall_max   double precision NOT NULL DEFAULT 0,
    wait_total double precision NOT NULL DEFAULT 0,
    wait_max   double precision NOT NULL DEFAULT 0,
    wall_hist  jsonb NOT NULL DEFAULT '{}',
    wait_hist  jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (minute, task_name, daemon_id)
);

-- The schema version of this set of tables (one row). A foreman refuses a version newer than it
-- knows, and brings an older one up to date at `init` or at a daemon's start.
CREATE TABLE IF NOT EXISTS foreman_meta (
    one            boolean PRIMARY KEY DEFAULT true CHECK (one),
    schema_version integer NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
INSERT INTO foreman_meta (schema_version) VALUES (1) ON CONFLICT (one) DO NOTHING;
