"""Enqueue foreman tasks from Python (stdlib only; copy this one file or pip install it).

    from foreman_client import Client

    foreman = Client()  # FOREMAN_DB, else ./foreman.sqlite3, as for the CLI; opened on first use
    task_id = foreman.enqueue("myapp.tasks.send_email", "a@example.com", retry=True)
    # In 10 minutes, and ahead of priority-0 tasks due then (schema version 2):
    foreman.enqueue_with(
        "myapp.tasks.remind", args=[user_id], delay=timedelta(minutes=10), priority=5
    )
    # Not twice: while a task with this key is queued or running, its id comes back instead
    # (schema version 4):
    foreman.enqueue_with("myapp.tasks.reindex", args=[site], unique_key=f"reindex:{site}")
    # What a task returned (or TaskFailed with its error):
    result = foreman.wait(task_id, timeout=30)

This is the producer protocol of schema.sql, done carefully: one INSERT per task in its own
transaction, then a file in the wakeup directory. A Client is safe to share between threads and
survives a fork (each process gets its own SQLite connection). Creating one touches no file, so a
module may create it at import time.

Given a ``postgresql://`` (or ``postgres://``) URL instead of a path, it speaks the PostgreSQL
protocol of schema-postgres.sql through psycopg 3 (``pip install "psycopg[binary]"``): the INSERT,
then ``NOTIFY foreman`` after the commit, at most one per 100 ms per process (a burst of enqueues
sends one, and a last one 100 ms after the first if more came meanwhile).
"""

import datetime
import json
import logging
import math
import numbers
import operator
import os
import sqlite3
import threading
import time
import urllib.parse
import weakref

__version__ = "1.2.0"

__all__ = ["Client", "TaskFailed", "__version__"]

# PostgreSQL (schema-postgres.sql). The JSON goes as text and is cast: the columns are jsonb, whose
# CHECKs refuse args that are not an array and kwargs that are not an object.
_PG_INSERT = (
    "INSERT INTO foreman_task(task_name, args, kwargs, run_after, priority) "
    "VALUES (%s, %s::jsonb, %s::jsonb, now() + make_interval(secs => %s), %s) RETURNING id"
)
_PG_INSERT_AT = (
    "INSERT INTO foreman_task(task_name, args, kwargs, run_after, priority) "
    "VALUES (%s, %s::jsonb, %s::jsonb, to_timestamp(%s), %s) RETURNING id"
)
_PG_LOCK_KEY = "SELECT pg_advisory_xact_lock(hashtextextended('foreman:' || %s, 0))"
_PG_INSERT_UNIQUE = (
    "INSERT INTO foreman_task(task_name, args, kwargs, run_after, priority, unique_key) "
    "SELECT %s, %s::jsonb, %s::jsonb, {run_after}, %s, %s "
    "WHERE NOT EXISTS (SELECT 1 FROM foreman_run WHERE state = 'running' AND unique_key = %s) "
    "ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING RETURNING id"
)
_PG_KEY_HOLDER = (
    "SELECT id FROM foreman_task WHERE unique_key = %s UNION ALL "
    "SELECT task_id FROM foreman_run WHERE unique_key = %s AND state = 'running' LIMIT 1"
)
_PG_INSERT_MANY = (
    "INSERT INTO foreman_task(task_name, args, kwargs, run_after, priority) "
    "SELECT t.name, t.args::jsonb, t.kwargs::jsonb, {run_after}, %s "
    "FROM unnest(%s::text[], %s::text[], %s::text[]) WITH ORDINALITY AS t(name, args, kwargs, i) "
    "ORDER BY t.i RETURNING id"
)
_PG_PROGRESS = (
    "(SELECT 'run', attempt, state, error, retry_at IS NOT NULL, result FROM foreman_run "
    " WHERE task_id = %(id)s ORDER BY attempt DESC LIMIT 1) UNION ALL "
    "(SELECT 'task', attempt, NULL, NULL, false, NULL FROM foreman_task WHERE id = %(id)s) "
    "UNION ALL (SELECT 'dead', 0, 'dead', reason, false, NULL FROM foreman_dead "
    " WHERE task_id = %(id)s ORDER BY id DESC LIMIT 1)"
)
# At most one NOTIFY per this many seconds per process: every NOTIFY takes a lock that
# serialises the commits of the whole cluster.
_NOTIFY_EVERY = 0.1

log = logging.getLogger("foreman_client")

# A task due now with priority 0: the 3-column INSERT of every schema version.
_INSERT = "INSERT INTO foreman_task(task_name, args, kwargs) VALUES (?, ?, ?)"
# Schema version 2 columns. A delay is added to the database's now, the expression of the schema's
# defaults and of the daemon's own delayed inserts: it counts from the INSERT, on the same clock as
# every other run_after, whatever time Python thinks it is.
_INSERT_DELAYED = (
    "INSERT INTO foreman_task(task_name, args, kwargs, run_after, priority) "
    "VALUES (?, ?, ?, (julianday('now') - 2440587.5) * 86400.0 + ?, ?)"
)
# run_at: an absolute Unix time, stored as it is.
_INSERT_AT = (
    "INSERT INTO foreman_task(task_name, args, kwargs, run_after, priority) "
    "VALUES (?, ?, ?, ?, ?)"
)
# The first schema version with run_after and priority.
_SCHEMA_VERSION_TIMING = 2
# The first schema version with unique keys and results.
_SCHEMA_VERSION_CONTROL = 4
# A unique task: inserted unless a queued task holds the key (the unique index) or a running one
# does (the schema's trigger); either way the statement succeeds, and rowcount says which.
_INSERT_UNIQUE = (
    "INSERT INTO foreman_task(task_name, args, kwargs, run_after, priority, unique_key) "
    "VALUES (?, ?, ?, (julianday('now') - 2440587.5) * 86400.0 + ?, ?, ?) ON CONFLICT DO NOTHING"
)
_INSERT_UNIQUE_AT = (
    "INSERT INTO foreman_task(task_name, args, kwargs, run_after, priority, unique_key) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
_KEY_HOLDER = (
    "SELECT id FROM foreman_task WHERE unique_key = ?1 UNION ALL "
    "SELECT task_id FROM foreman_run WHERE unique_key = ?1 AND state = 'running' LIMIT 1"
)
# Where a task stands (Client.wait), as `foreman wait` reads it: its latest attempt, its queued
# row, its dead letter.
_LATEST_ATTEMPT = (
    "SELECT attempt, state, error, retry_at, result FROM foreman_run WHERE task_id = ? "
    "ORDER BY attempt DESC LIMIT 1"
)
_IS_QUEUED = "SELECT attempt FROM foreman_task WHERE id = ?"
_DEAD_REASON = "SELECT reason FROM foreman_dead WHERE task_id = ? ORDER BY id DESC LIMIT 1"
# How often Client.wait looks, at first and at most (it backs off between the two).
_WAIT_FIRST_POLL, _WAIT_MAX_POLL = 0.005, 0.2
# The range schema.sql allows (a CHECK constraint): each priority in use costs the daemon's pop.
_PRIORITY_MIN, _PRIORITY_MAX = -100, 100
_EMPTY_ARGS = "[]"
_EMPTY_KWARGS = "{}"
_NO_KWARGS = {}  # never mutated

# One encoder, built once: json.dumps(..., allow_nan=False) would build a new one on every call.
# NaN and Infinity are not JSON; the daemon would reject the row, so refuse them here.
_encode = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode

# Connections inherited across a fork, kept referenced so that they are never closed: a child must
# not close (or use) its parent's SQLite connection, and dropping the object would close it.
_inherited_connections = []

# Clients alive in this process, so that a fork can hand each one a fresh lock (below).
_clients = weakref.WeakSet()


class TaskFailed(Exception):
    """Raised by ``Client.wait`` for a task that ended without success.

    ``state`` is ``failed``, ``timeout``, ``lost``, ``dead`` or ``cancelled``; ``error`` is its last
    error (a traceback's text, or a dead letter's reason), or None; ``attempt`` the attempt it is
    about.
    """

    def __init__(self, task_id, state, attempt, error):
        self.task_id, self.state, self.attempt, self.error = task_id, state, attempt, error
        # The error's last line names the problem (a traceback's exception).
        lines = (error or "").strip().splitlines()
        suffix = f": {lines[-1].strip()}" if lines else ""
        super().__init__(f"task {task_id} {state} (attempt {attempt}){suffix}")


class Client:
    """A producer for one foreman database.

    Each setting is the argument, else the environment variable the ``foreman`` CLI reads, else
    the CLI's default:

    ``db_path``: ``FOREMAN_DB``, else ``./foreman.sqlite3``. The database must exist
    (``foreman init`` or a running daemon) by the first enqueue, not before.
    ``wakeup_dir``: ``FOREMAN_WAKEUP_DIR``, else ``db_path + ".wakeup"``.
    ``timeout``: seconds to wait for SQLite's write lock (the busy timeout).

    Relative paths are made absolute here, against the current directory. Nothing is opened
    until the first enqueue (or ``check()``), so creating a Client never fails on the database.
    """

    def __init__(self, db_path=None, wakeup_dir=None, *, timeout=5.0):
        self.db_path, self._db_source = _setting(db_path, "FOREMAN_DB", "foreman.sqlite3")
        # A PostgreSQL server (schema-postgres.sql), reached through psycopg 3, imported at the
        # first use so that a SQLite user needs no psycopg.
        self._postgres = self.db_path.lower().startswith(("postgres://", "postgresql://"))
        if self._postgres:
            self.wakeup_dir = None
        else:
            # Absolute paths, so that a later os.chdir() cannot point the client elsewhere.
            self.db_path = os.path.abspath(self.db_path)
            wakeup_dir, _ = _setting(wakeup_dir, "FOREMAN_WAKEUP_DIR", self.db_path + ".wakeup")
            self.wakeup_dir = os.path.abspath(wakeup_dir)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conn = None
        self._pid = None
        self._wakeup_path = None
        self._closed = False
        self._warned = False
        # Set once PRAGMA user_version has shown run_after and priority exist. Only a good answer
        # is kept: after `foreman init` upgrades a version 1 database, the next check passes.
        self._schema_has_timing = False
        # The highest schema version seen (a database is only ever upgraded).
        self._schema_version = 0
        _clients.add(self)

    def __repr__(self):
        if self._postgres:
            # Never the URL's password.
            return f"<foreman_client.Client db={_redacted(self.db_path)!r}>"
        return f"<foreman_client.Client db_path={self.db_path!r} wakeup_dir={self.wakeup_dir!r}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def check(self):
        """Open the database now and check it has a foreman schema; raises sqlite3.Error if not.

        For a readiness check, or to fail at start-up rather than at the first enqueue.
        """
        with self._lock:
            if self._postgres:
                self._pg_version(self._connection())
                return
            version = self._connection().execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                raise sqlite3.OperationalError(_no_schema(self.db_path))

    def close(self):
        """Close the connection. Enqueueing afterwards raises RuntimeError."""
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                if self._pid == os.getpid():
                    conn.close()
                else:
                    _inherited_connections.append(conn)

    def enqueue(self, task_name, /, *args, **kwargs):
        """Insert one task and wake the daemon; returns the task's id.

        ``args`` and ``kwargs`` are what the task function will be called with; they must be
        JSON-serialisable. ``task_name`` is positional-only, so a task may take a keyword argument
        called ``name`` or ``task_name``.
        """
        if not isinstance(task_name, str) or not task_name:
            raise TypeError(f"task name must be a non-empty str, not {task_name!r}")
        row = (
            task_name,
            _encode_json(args, "args", task_name) if args else _EMPTY_ARGS,
            _encode_json(kwargs, "kwargs", task_name) if kwargs else _EMPTY_KWARGS,
        )
        if self._postgres:
            return self._pg_insert(_PG_INSERT, row + (0.0, 0))
        return self._insert_one(_INSERT, row)

    def enqueue_with(
        self,
        task_name,
        /,
        args=(),
        kwargs=None,
        *,
        delay=None,
        run_at=None,
        priority=0,
        unique_key=None,
    ):
        """Insert one task, optionally delayed or prioritised, and wake the daemon; returns its id.

        ``args`` (a list or tuple) and ``kwargs`` (a dict, or None) are what the task function
        will be called with, as for ``enqueue``. Then, all optional:

        - ``delay``: seconds (int or float, >= 0) or a ``datetime.timedelta``; the task does not
          start before that much time has passed since the INSERT.
        - ``run_at``: a timezone-aware ``datetime.datetime`` or a Unix time in seconds; the task
          does not start before it; a time in the past makes it due at once. Give ``delay`` or
          ``run_at``, not both.
        - ``priority``: an int from -100 to 100 (default 0); among due tasks, higher runs first.

        - ``unique_key``: a str; while a task with this key is queued or running, nothing is
          inserted and that task's id is returned instead (schema version 4).

        A delay, run_at or non-zero priority needs schema version 2, a unique key version 4:
        against an older database this raises ``sqlite3.OperationalError`` saying to run
        ``foreman init``.
        """
        row = _task_row(task_name, args, kwargs, "enqueue_with")
        sql, timing = _timing(delay, run_at, priority)
        if unique_key is not None and not isinstance(unique_key, str):
            raise TypeError(f"unique_key must be a str, not {type(unique_key).__name__}")
        if self._postgres:
            pg_sql, pg_timing = _pg_timing(sql, timing)
            if unique_key is None:
                return self._pg_insert(pg_sql, row + pg_timing)
            return self._pg_insert_unique(sql, row + pg_timing, unique_key)
        if unique_key is None:
            return self._insert_one(sql, row + timing)
        if not isinstance(unique_key, str):
            raise TypeError(f"unique_key must be a str, not {type(unique_key).__name__}")
        if sql is _INSERT:
            timing = (0.0, 0)
        unique = _INSERT_UNIQUE_AT if sql is _INSERT_AT else _INSERT_UNIQUE
        return self._insert_unique(unique, row + timing + (unique_key,), unique_key)

    def wait(self, task_id, timeout=30.0):
        """Wait for task ``task_id`` to finish, across its retries, and return its result.

        The result is what the task returned (JSON-decoded; None when it returned none). A task
        that ended without success raises ``TaskFailed`` (with ``state`` and ``error``); one still
        queued or running after ``timeout`` seconds (None: no limit) raises ``TimeoutError``, an
        unknown id ``LookupError``. It polls the database, backing off from 5 ms to 200 ms.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = _WAIT_FIRST_POLL
        while True:
            with self._lock:
                conn = self._connection()
                if self._postgres:
                    found = _pg_progress(conn, task_id)
                else:
                    self._check_schema(conn, _SCHEMA_VERSION_CONTROL, "Client.wait")
                    found = _progress(conn, task_id)
            if found is None:
                raise LookupError(f"no task {task_id} (never enqueued, or its history was pruned)")
            state, attempt, final, error, result = found
            if final:
                if state == "done":
                    return None if result is None else json.loads(result)
                raise TaskFailed(task_id, state, attempt, error)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"task {task_id} still {state} after {timeout}s")
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            time.sleep(pause if left is None else min(pause, left))
            pause = min(pause * 2, _WAIT_MAX_POLL)

    def enqueue_many(self, items, *, delay=None, run_at=None, priority=0):
        """Insert many tasks in one transaction, wake the daemon once; returns the ids in order.

        Each item is ``(name,)``, ``(name, args)`` or ``(name, args, kwargs)`` with ``args`` a
        list or tuple and ``kwargs`` a dict. ``delay``, ``run_at`` and ``priority`` are those of
        ``enqueue_with`` and apply to every item. Everything is checked before anything is
        inserted: on an error nothing is.
        """
        sql, timing = _timing(delay, run_at, priority)
        if self._postgres:
            rows = [_row(index, item) for index, item in enumerate(items)]
            return self._pg_insert_many(sql, timing, rows) if rows else []
        rows = [_row(index, item) + timing for index, item in enumerate(items)]
        if not rows:
            return []
        with self._lock:
            conn = self._connection()
            if sql is not _INSERT:
                self._check_schema_has_timing(conn)
            try:
                # IMMEDIATE takes the write lock at BEGIN, waiting for it up to the busy timeout.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(sql, rows)
                    # executemany does not set cursor.lastrowid; the connection knows it.
                    last_id = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:  # SQLite may have rolled back already
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                _raise_with_hint(exc)
                raise
        self._wake()
        # The ids are consecutive: we held the write lock from BEGIN IMMEDIATE to COMMIT, so no
        # other connection inserted in between, and AUTOINCREMENT gives each row max(id) + 1.
        return list(range(last_id - len(rows) + 1, last_id + 1))

    def _insert_one(self, sql, row):
        with self._lock:
            conn = self._connection()
            if sql is not _INSERT:
                self._check_schema_has_timing(conn)
            try:
                # Autocommit: this one statement is its own transaction, committed on return.
                task_id = conn.execute(sql, row).lastrowid
            except sqlite3.OperationalError as exc:
                _raise_with_hint(exc)
                raise
        # After the commit: a delayed task needs the wakeup too, the daemon then re-computes
        # when to wake up next.
        self._wake()
        return task_id

    def _insert_unique(self, sql, row, unique_key):
        """Insert unless the key is held; the id of the new task or of the holder."""
        with self._lock:
            conn = self._connection()
            self._check_schema(conn, _SCHEMA_VERSION_CONTROL, "unique_key")
            try:
                # One transaction: the task holding the key cannot end between the two statements.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    cursor = conn.execute(sql, row)
                    created = cursor.rowcount > 0
                    if created:
                        task_id = cursor.lastrowid
                    else:
                        holder = conn.execute(_KEY_HOLDER, (unique_key,)).fetchone()
                        if holder is None:  # cannot happen: only a held key skips the insert
                            raise sqlite3.IntegrityError(f"unique key {unique_key!r} refused")
                        task_id = holder[0]
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                _raise_with_hint(exc)
                raise
        if created:
            self._wake()
        return task_id

    # ---- PostgreSQL ----

    def _pg_insert(self, sql, params):
        """One autocommit INSERT … RETURNING id, then the debounced NOTIFY."""
        with self._lock:
            conn = self._connection()
            task_id = conn.execute(sql, params).fetchone()[0]
            self._pg_notify(conn)
        return task_id

    def _pg_insert_unique(self, sql, params, unique_key):
        """Insert unless the key is held (queued or running): under the key's advisory lock, as
        schema-postgres.sql says, so that a daemon's claim of the holder cannot cross the check."""
        run_after = "to_timestamp(%s)" if sql is _INSERT_AT else "now() + make_interval(secs => %s)"
        statement = _PG_INSERT_UNIQUE.format(run_after=run_after)
        name, args, kwargs, when, priority = params
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                conn.execute(_PG_LOCK_KEY, (unique_key,))
                row = conn.execute(
                    statement, (name, args, kwargs, when, priority, unique_key, unique_key)
                ).fetchone()
                if row is None:
                    holder = conn.execute(_PG_KEY_HOLDER, (unique_key, unique_key)).fetchone()
                    if holder is None:  # the holder ended between the two: cannot happen
                        raise RuntimeError(f"unique key {unique_key!r} refused")
            if row is not None:
                self._pg_notify(conn)
                return row[0]
            return holder[0]

    def _pg_insert_many(self, sql, timing, rows):
        """Every row in one statement (one transaction); the ids in the items' order."""
        run_after = "to_timestamp(%s)" if sql is _INSERT_AT else "now() + make_interval(secs => %s)"
        when, priority = timing if timing else (0.0, 0)
        statement = _PG_INSERT_MANY.format(run_after=run_after)
        names, args, kwargs = (list(column) for column in zip(*rows))
        with self._lock:
            conn = self._connection()
            ids = [r[0] for r in conn.execute(statement, (when, priority, names, args, kwargs))]
            self._pg_notify(conn)
        return ids

    def _pg_notify(self, conn):
        """NOTIFY foreman after a commit, at most once per _NOTIFY_EVERY per process: the first of
        a burst at once, the rest folded into one at the end of the interval. Never raises: the
        rows are committed, and the daemons find them at their next poll anyway."""
        global _last_notify, _notify_pending
        now = time.monotonic()
        with _notify_lock:
            wait = _last_notify + _NOTIFY_EVERY - now
            if wait <= 0:
                _last_notify = now
            elif _notify_pending:
                return
            else:
                _notify_pending = True
        if wait <= 0:
            try:
                conn.execute("NOTIFY foreman")
            except Exception as exc:  # noqa: BLE001 - a wake-up is only a hint
                self._warn_once(exc)
            return
        timer = threading.Timer(wait, self._pg_notify_later)
        timer.daemon = True
        timer.start()

    def _pg_notify_later(self):
        global _last_notify, _notify_pending
        with _notify_lock:
            _notify_pending = False
            _last_notify = time.monotonic()
        try:
            with self._lock:
                if not self._closed:
                    self._connection().execute("NOTIFY foreman")
        except Exception as exc:  # noqa: BLE001
            self._warn_once(exc)

    def _pg_version(self, conn):
        row = conn.execute(
            "SELECT CASE WHEN to_regclass('foreman_meta') IS NULL THEN 0 "
            "ELSE 1 END"
        ).fetchone()
        if row[0] == 0:
            raise _pg_module().errors.UndefinedTable(
                f"the database {_redacted(self.db_path)} has no foreman schema in its "
                "search_path (run `foreman init` or start a daemon)"
            )

    def _check_schema(self, conn, needed, what):
        """Raise unless the database's schema is at least version ``needed``. With the lock held."""
        if self._schema_version >= needed:
            return
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version < needed:
            raise sqlite3.OperationalError(
                f"{what} needs foreman schema version {needed}; the database {self.db_path} has "
                f"version {version}: run `foreman init` with the new foreman, or start its daemon"
            )
        self._schema_version = version

    def _check_schema_has_timing(self, conn):
        """Raise unless the database has run_after and priority. Call with self._lock held."""
        if self._schema_has_timing:
            return
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            raise sqlite3.OperationalError(_no_schema(self.db_path))
        if version < _SCHEMA_VERSION_TIMING:
            raise sqlite3.OperationalError(
                f"the foreman database {self.db_path} has schema version {version}, which has no "
                f"delayed or prioritised tasks (delay, run_at and priority need version "
                f"{_SCHEMA_VERSION_TIMING}); upgrade: run `foreman init` with the new foreman, or "
                "start its daemon, which migrates the database and keeps the queued tasks"
            )
        self._schema_has_timing = True

    def _connection(self):
        """The connection of this process, opened on first use. Call with self._lock held."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        pid = os.getpid()
        if self._pid != pid:
            # New process (first use, or we are a forked child, e.g. under gunicorn --preload):
            # never touch the parent's connection, open our own.
            if self._conn is not None:
                _inherited_connections.append(self._conn)
            if self._postgres:
                self._conn = _pg_connect(self.db_path, self._db_source, self.timeout)
            else:
                self._conn = _connect(self.db_path, self._db_source, self.timeout)
                self._wakeup_path = os.path.join(self.wakeup_dir, f"py-{pid}")
            self._pid = pid
        return self._conn

    def _wake(self):
        """Make sure a file exists in the wakeup dir. Never raises: the row is already committed,
        and an exception would make the caller retry and enqueue the task twice."""
        path = self._wakeup_path
        try:
            # Usually the file is still there (the daemon has not consumed it yet): one stat.
            # Skipping the create then cannot leave a task unnoticed: the daemon deletes wakeup
            # files *before* each pop, so a file that is still there means the pop that will
            # consume it comes after our commit and sees our row; and its fallback tick checks
            # the queue whatever the files say.
            os.stat(path)
            return
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._warn_once(exc)
            return
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as exc:
            self._warn_once(exc)

    def _warn_once(self, exc):
        if not self._warned:
            self._warned = True
            what = "NOTIFY foreman failed" if self._postgres else (
                f"cannot create the wakeup file {self._wakeup_path}"
            )
            log.warning(
                "%s (%s); tasks are still queued, and the daemon finds them on its fallback "
                "tick (1 s by default) instead of at once. Further wakeup errors of this client "
                "are not logged.",
                what,
                exc,
            )


def _progress(conn, task_id):
    """(state, attempt, final, error, result) of a task, read in one snapshot; None if unknown."""
    conn.execute("BEGIN")
    try:
        latest = conn.execute(_LATEST_ATTEMPT, (task_id,)).fetchone()
        if latest is not None and latest[1] == "running":
            return "running", latest[0], False, None, None
        queued = conn.execute(_IS_QUEUED, (task_id,)).fetchone()
        if queued is not None:
            return "queued", queued[0], False, None, None
        if latest is not None:
            attempt, state, error, retry_at, result = latest
            final = state in ("done", "dead", "cancelled") or (
                state in ("failed", "timeout", "lost") and retry_at is None
            )
            return state, attempt, final, error, result
        dead = conn.execute(_DEAD_REASON, (task_id,)).fetchone()
        if dead is not None:
            return "dead", 0, True, dead[0], None
        return None
    finally:
        conn.execute("COMMIT")


# The process's last NOTIFY, and whether one is scheduled: shared by every client of the process.
_notify_lock = threading.Lock()
_last_notify = float("-inf")
_notify_pending = False


def _pg_module():
    try:
        import psycopg
    except ImportError:
        raise ImportError(
            'a postgresql:// database needs psycopg 3: pip install "psycopg[binary]"'
        ) from None
    return psycopg


def _pg_connect(url, source, timeout):
    psycopg = _pg_module()
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout)))
    except psycopg.OperationalError as exc:
        # psycopg's message names the host and the user, never the password.
        raise psycopg.OperationalError(
            f"cannot connect to the foreman database {_redacted(url)} ({source}): {exc}"
        ) from None


def _redacted(url):
    """The URL with any password replaced by ***."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user_info, host = netloc.rsplit("@", 1)
        if ":" in user_info:
            netloc = user_info.split(":", 1)[0] + ":***@" + host
    query = "&".join(
        "password=***" if pair.lower().startswith("password=") else pair
        for pair in parts.query.split("&")
    ) if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _pg_timing(sql, timing):
    """The PostgreSQL INSERT for _timing's choice, and its (when, priority) parameters."""
    if sql is _INSERT_AT:
        return _PG_INSERT_AT, timing
    if sql is _INSERT:
        return _PG_INSERT, (0.0, 0)
    return _PG_INSERT, timing


def _pg_progress(conn, task_id):
    """(state, attempt, final, error, result) as `foreman wait` decides it; None if unknown."""
    run = task = dead = None
    for kind, attempt, state, error, will_retry, result in conn.execute(
        _PG_PROGRESS, {"id": task_id}
    ):
        if kind == "run":
            run = (attempt, state, error, will_retry, result)
        elif kind == "task":
            task = attempt
        else:
            dead = error
    if run is not None and run[1] == "running":
        return "running", run[0], False, None, None
    if task is not None:
        return "queued", task, False, None, None
    if run is not None:
        attempt, state, error, will_retry, result = run
        final = state in ("done", "dead", "cancelled") or (
            state in ("failed", "timeout", "lost") and not will_retry
        )
        return state, attempt, final, error, result
    if dead is not None:
        return "dead", 0, True, dead, None
    return None


def _setting(value, env_name, default):
    """(value, where it came from): the argument, else the environment variable, else default."""
    if value is not None:
        return os.fspath(value), "given to Client()"
    from_env = os.environ.get(env_name)
    if from_env is None:
        return default, f"the default; set {env_name} or pass the path"
    if not from_env:  # the CLI refuses it too
        raise ValueError(f"{env_name} is set but empty: unset it or give it a path")
    return from_env, f"from {env_name}"


def _no_schema(db_path):
    return f"the database {db_path} has no foreman schema (run `foreman init` or start the daemon)"


def _connect(db_path, source, timeout):
    # mode=rw: a wrong path raises instead of quietly creating an empty database there.
    uri = "file:" + urllib.parse.quote(db_path) + "?mode=rw"
    try:
        conn = sqlite3.connect(
            uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False
        )
    except sqlite3.OperationalError as exc:
        raise sqlite3.OperationalError(
            f"cannot open the foreman database {db_path} ({source}): {exc} "
            "(it must exist: run `foreman init` or start the daemon)"
        ) from None
    # The daemon keeps the database in WAL mode (`foreman init` and `foreman run` set it; it
    # persists). With WAL, synchronous=NORMAL does not fsync on each commit, only at checkpoints:
    # a power loss or OS crash can lose the last commits, but it never corrupts the database, and
    # an application crash loses nothing. The daemon makes the same trade; it is what makes one
    # transaction per enqueue cheap.
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _raise_with_hint(exc):
    if "no such table: foreman_task" in str(exc):
        raise sqlite3.OperationalError(
            f"{exc}: this database has no foreman schema (run `foreman init` or start the daemon)"
        ) from exc
    if "has no column named" in str(exc):  # a database replaced by an older one meanwhile
        raise sqlite3.OperationalError(
            f"{exc}: this database has an older foreman schema (upgrade: run `foreman init`)"
        ) from exc


def _encode_json(value, what, task_name):
    try:
        return _encode(value)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{what} of task {task_name!r} are not JSON-serialisable: {exc}") from None


def _row(index, item):
    """One enqueue_many item as INSERT parameters; TypeError/ValueError names the bad item."""
    if not isinstance(item, (tuple, list)) or not 1 <= len(item) <= 3:
        raise TypeError(
            f"enqueue_many item {index}: expected (name,), (name, args) or (name, args, kwargs), "
            f"got {item!r:.200}"
        )
    args = item[1] if len(item) > 1 else ()
    kwargs = item[2] if len(item) > 2 else _NO_KWARGS
    return _task_row(item[0], args, kwargs, f"enqueue_many item {index}")


def _task_row(name, args, kwargs, where):
    """(name, args JSON, kwargs JSON); TypeError/ValueError messages start with ``where``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"{where}: task name must be a non-empty str, not {name!r:.200}")
    if kwargs is None:
        kwargs = _NO_KWARGS
    if not isinstance(args, (list, tuple)):
        kind = type(args).__name__
        raise TypeError(f"{where} ({name}): args must be a list or tuple, not {kind}")
    if not isinstance(kwargs, dict):
        kind = type(kwargs).__name__
        raise TypeError(f"{where} ({name}): kwargs must be a dict, not {kind}")
    for key in kwargs:
        if not isinstance(key, str):  # json would turn 1 into "1" behind the caller's back
            raise TypeError(f"{where} ({name}): kwargs keys must be str, not {key!r:.200}")
    # Empty args and kwargs, the common case, cost no encoding: the constants are their JSON.
    return (
        name,
        _encode_json(args, f"{where}: args", name) if args else _EMPTY_ARGS,
        _encode_json(kwargs, f"{where}: kwargs", name) if kwargs else _EMPTY_KWARGS,
    )


def _timing(delay, run_at, priority):
    """The INSERT statement for these options, and the parameters they add after the row's three.

    A task due now with priority 0 gets the plain INSERT, which works on every schema version.
    """
    try:
        if isinstance(priority, bool):  # an int to Python, but surely a mistake here
            raise TypeError
        # Any integer (an IntEnum, numpy.int64), as a plain int; a float is refused.
        priority = operator.index(priority)
    except TypeError:
        kind = type(priority).__name__
        raise TypeError(f"priority must be an int, not {kind}: {priority!r:.200}") from None
    if not _PRIORITY_MIN <= priority <= _PRIORITY_MAX:
        raise ValueError(
            f"priority must be between {_PRIORITY_MIN} and {_PRIORITY_MAX}, got {priority}"
        )
    if delay is not None and run_at is not None:
        raise ValueError("give delay or run_at, not both")
    if delay is not None:
        return _INSERT_DELAYED, (_delay_seconds(delay), priority)
    if run_at is not None:
        return _INSERT_AT, (_unix_time(run_at), priority)
    if priority != 0:
        return _INSERT_DELAYED, (0.0, priority)
    return _INSERT, ()


def _delay_seconds(delay):
    if isinstance(delay, datetime.timedelta):
        seconds = delay.total_seconds()
    elif isinstance(delay, bool) or not isinstance(delay, numbers.Real):
        raise TypeError(
            f"delay must be seconds (int or float) or a datetime.timedelta, "
            f"not {type(delay).__name__}: {delay!r:.200}"
        )
    else:
        seconds = _float(delay, "delay")
    if not math.isfinite(seconds):
        raise ValueError(f"delay must be a finite number of seconds, got {delay!r}")
    if seconds < 0:
        raise ValueError(
            f"delay must not be negative, got {delay!r} (for an absolute time, use run_at=)"
        )
    return seconds


def _float(number, what):
    try:
        return float(number)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"{what} is out of range: {number!r:.200}") from None


def _unix_time(run_at):
    if isinstance(run_at, datetime.datetime):
        if run_at.utcoffset() is None:
            raise ValueError(
                f"run_at must be a timezone-aware datetime, not the naive {run_at!r}: e.g. "
                "datetime.now(timezone.utc) + timedelta(hours=1), or give delay= instead"
            )
        return run_at.timestamp()
    if isinstance(run_at, bool) or not isinstance(run_at, numbers.Real):
        raise TypeError(
            f"run_at must be a timezone-aware datetime.datetime or a Unix time in seconds, "
            f"not {type(run_at).__name__}: {run_at!r:.200}"
        )
    seconds = _float(run_at, "run_at")
    if not math.isfinite(seconds):
        raise ValueError(f"run_at must be a finite Unix time, got {run_at!r}")
    return seconds


def _after_fork_in_child():
    # A lock that another thread held at the moment of the fork stays locked forever in the child,
    # where that thread does not exist. The child is single-threaded here, so replacing is safe.
    # (The connection itself is replaced on first use, by the pid check in _connection.)
    global _notify_lock, _notify_pending, _last_notify
    for client in list(_clients):
        client._lock = threading.Lock()
    # A NOTIFY timer was the parent's thread: the child starts afresh.
    _notify_lock = threading.Lock()
    _notify_pending = False
    _last_notify = float("-inf")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
