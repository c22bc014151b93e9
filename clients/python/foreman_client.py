"""Enqueue foreman tasks from Python (stdlib only; copy this one file or pip install it).

    from foreman_client import Client

    foreman = Client("/var/lib/foreman/foreman.sqlite3")
    task_id = foreman.enqueue("myapp.tasks.send_email", "a@example.com", retry=True)

This is the producer protocol of schema.sql, done carefully: one INSERT per task in its own
transaction, then a file in the wakeup directory. A Client is safe to share between threads and
survives a fork (each process gets its own SQLite connection).
"""

import json
import logging
import os
import sqlite3
import threading
import urllib.parse
import weakref

__version__ = "1.0.0"

__all__ = ["Client", "__version__"]

log = logging.getLogger("foreman_client")

_INSERT = "INSERT INTO foreman_task(task_name, args, kwargs) VALUES (?, ?, ?)"
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


class Client:
    """A producer for one foreman database.

    ``db_path``: the daemon's database; it must exist (``foreman init`` or a running daemon).
    ``wakeup_dir``: defaults to ``db_path + ".wakeup"``, the daemon's default.
    ``timeout``: seconds to wait for SQLite's write lock (the busy timeout).
    """

    def __init__(self, db_path, wakeup_dir=None, *, timeout=5.0):
        # Absolute paths, so that a later os.chdir() cannot point the client somewhere else.
        self.db_path = os.path.abspath(os.fspath(db_path))
        if wakeup_dir is None:
            self.wakeup_dir = self.db_path + ".wakeup"
        else:
            self.wakeup_dir = os.path.abspath(os.fspath(wakeup_dir))
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conn = None
        self._pid = None
        self._wakeup_path = None
        self._closed = False
        self._warned = False
        with self._lock:
            self._connection()  # fail now, not at the first enqueue, on a wrong path
        _clients.add(self)

    def __repr__(self):
        return f"<foreman_client.Client db_path={self.db_path!r} wakeup_dir={self.wakeup_dir!r}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

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
        with self._lock:
            conn = self._connection()
            try:
                # Autocommit: this one statement is its own transaction, committed on return.
                task_id = conn.execute(_INSERT, row).lastrowid
            except sqlite3.OperationalError as exc:
                _raise_with_hint(exc)
                raise
        self._wake()
        return task_id

    def enqueue_many(self, items):
        """Insert many tasks in one transaction, wake the daemon once; returns the ids in order.

        Each item is ``(name,)``, ``(name, args)`` or ``(name, args, kwargs)`` with ``args`` a
        list or tuple and ``kwargs`` a dict. Everything is checked before anything is inserted: on
        an error nothing is.
        """
        rows = [_row(index, item) for index, item in enumerate(items)]
        if not rows:
            return []
        with self._lock:
            conn = self._connection()
            try:
                # IMMEDIATE takes the write lock at BEGIN, waiting for it up to the busy timeout.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(_INSERT, rows)
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
            self._conn = _connect(self.db_path, self.timeout)
            self._pid = pid
            self._wakeup_path = os.path.join(self.wakeup_dir, f"py-{pid}")
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
            log.warning(
                "cannot create the wakeup file %s (%s); tasks are still queued, and the daemon "
                "finds them on its fallback tick (1 s by default) instead of at once. "
                "Further wakeup errors of this client are not logged.",
                self._wakeup_path,
                exc,
            )


def _connect(db_path, timeout):
    # mode=rw: a wrong path raises instead of quietly creating an empty database there.
    uri = "file:" + urllib.parse.quote(db_path) + "?mode=rw"
    try:
        conn = sqlite3.connect(
            uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False
        )
    except sqlite3.OperationalError as exc:
        raise sqlite3.OperationalError(
            f"cannot open the foreman database {db_path}: {exc} "
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
    name = item[0]
    args = item[1] if len(item) > 1 else ()
    kwargs = item[2] if len(item) > 2 else _NO_KWARGS
    where = f"enqueue_many item {index}"
    if not isinstance(name, str) or not name:
        raise TypeError(f"{where}: task name must be a non-empty str, not {name!r:.200}")
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


def _after_fork_in_child():
    # A lock that another thread held at the moment of the fork stays locked forever in the child,
    # where that thread does not exist. The child is single-threaded here, so replacing is safe.
    # (The connection itself is replaced on first use, by the pid check in _connection.)
    for client in list(_clients):
        client._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
