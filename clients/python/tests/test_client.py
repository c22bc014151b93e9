"""foreman_client.py against a real SQLite file made from schema.sql; no daemon needed."""

import datetime
import enum
import json
import logging
import os
import sqlite3
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

CLIENT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = os.path.join(CLIENT_DIR, "..", "..", "schema.sql")

# What `foreman init` of foreman 1.x created: no run_after, no priority.
SCHEMA_V1 = """
CREATE TABLE foreman_task (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    task_name  TEXT NOT NULL,
    args       TEXT NOT NULL DEFAULT '[]',
    kwargs     TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
);
CREATE TABLE foreman_dead (
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
"""

# How far the database's clock may be from time.time() read around the INSERT (seconds).
CLOCK_TOLERANCE = 1.0
sys.path.insert(0, CLIENT_DIR)

import foreman_client  # noqa: E402
from foreman_client import Client  # noqa: E402


def without_foreman_env(test):
    """Runs test without the FOREMAN_* variables the client reads (the caller's may be set)."""
    patch = mock.patch.dict(os.environ)
    patch.start()
    test.addCleanup(patch.stop)
    for name in ("FOREMAN_DB", "FOREMAN_WAKEUP_DIR"):
        os.environ.pop(name, None)


class ClientTestCase(unittest.TestCase):
    def setUp(self):
        without_foreman_env(self)
        tmp = tempfile.TemporaryDirectory(prefix="foreman-client-test-")
        self.addCleanup(tmp.cleanup)
        self.db_path = os.path.join(tmp.name, "foreman.sqlite3")
        self.wakeup_dir = self.db_path + ".wakeup"
        # What `foreman init` / `foreman run` leave behind: the schema, WAL mode, the wakeup dir.
        with open(SCHEMA, encoding="utf-8") as f:
            schema = f.read()
        db = sqlite3.connect(self.db_path)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(schema)
        db.close()
        os.mkdir(self.wakeup_dir, 0o700)
        self.client = Client(self.db_path)
        self.addCleanup(self.client.close)

    def rows(self):
        """(id, task_name, args, kwargs) of every queued row, args and kwargs decoded."""
        db = sqlite3.connect(self.db_path)
        try:
            rows = db.execute(
                "SELECT id, task_name, args, kwargs FROM foreman_task ORDER BY id"
            ).fetchall()
        finally:
            db.close()
        return [(i, name, json.loads(args), json.loads(kwargs)) for i, name, args, kwargs in rows]

    def timing(self):
        """(id, run_after, priority) of every queued row."""
        db = sqlite3.connect(self.db_path)
        try:
            sql = "SELECT id, run_after, priority FROM foreman_task ORDER BY id"
            return db.execute(sql).fetchall()
        finally:
            db.close()

    def assert_near(self, value, low, high):
        """low <= value <= high, give or take CLOCK_TOLERANCE."""
        self.assertGreaterEqual(value, low - CLOCK_TOLERANCE)
        self.assertLessEqual(value, high + CLOCK_TOLERANCE)

    def wakeup_file(self, pid=None):
        return os.path.join(self.wakeup_dir, f"py-{pid or os.getpid()}")


class EnqueueTest(ClientTestCase):
    def test_enqueue_returns_increasing_ids_and_stores_json(self):
        first = self.client.enqueue("myapp.send_email", "a@example.com", retry=True)
        second = self.client.enqueue("myapp.noop")
        third = self.client.enqueue("myapp.nested", [1, {"x": None}], 2.5, opts={"deep": [True]})
        self.assertLess(first, second)
        self.assertLess(second, third)
        self.assertEqual(
            self.rows(),
            [
                (first, "myapp.send_email", ["a@example.com"], {"retry": True}),
                (second, "myapp.noop", [], {}),
                (third, "myapp.nested", [[1, {"x": None}], 2.5], {"opts": {"deep": [True]}}),
            ],
        )

    def test_empty_args_and_kwargs_are_the_schema_defaults(self):
        self.client.enqueue("myapp.noop")
        db = sqlite3.connect(self.db_path)
        self.addCleanup(db.close)
        row = db.execute("SELECT args, kwargs FROM foreman_task").fetchone()
        self.assertEqual(row, ("[]", "{}"))

    def test_kwargs_named_name_and_task_name(self):
        task_id = self.client.enqueue("myapp.rename", name="new", task_name="old")
        kwargs = {"name": "new", "task_name": "old"}
        self.assertEqual(self.rows(), [(task_id, "myapp.rename", [], kwargs)])

    def test_non_ascii(self):
        task_id = self.client.enqueue("myapp.grüß", "日本", emoji="🎉")
        self.assertEqual(self.rows(), [(task_id, "myapp.grüß", ["日本"], {"emoji": "🎉"})])

    def test_validation_errors_insert_nothing(self):
        cases = [
            (TypeError, lambda: self.client.enqueue("", 1)),
            (TypeError, lambda: self.client.enqueue(None)),
            (TypeError, lambda: self.client.enqueue(b"bytes.name")),
            (TypeError, lambda: self.client.enqueue("myapp.x", object())),
            (TypeError, lambda: self.client.enqueue("myapp.x", when={1, 2})),
            (ValueError, lambda: self.client.enqueue("myapp.x", float("nan"))),
            (ValueError, lambda: self.client.enqueue("myapp.x", limit=float("inf"))),
        ]
        for exc_type, call in cases:
            with self.subTest(exc_type=exc_type), self.assertRaises(exc_type):
                call()
        self.assertEqual(self.rows(), [])
        self.assertFalse(os.path.exists(self.wakeup_file()))

    def test_error_message_names_the_task(self):
        with self.assertRaisesRegex(TypeError, r"args of task 'myapp.x' are not JSON-serialisable"):
            self.client.enqueue("myapp.x", object())

    def test_threads_share_a_client(self):
        ids = []

        def produce():
            for _ in range(100):
                ids.append(self.client.enqueue("myapp.noop"))

        threads = [threading.Thread(target=produce) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(set(ids)), 400)
        self.assertEqual(sorted(ids), [row[0] for row in self.rows()])


class EnqueueManyTest(ClientTestCase):
    def test_ids_match_rows_and_order(self):
        before = self.client.enqueue("myapp.first")
        items = [
            ("myapp.a",),
            ("myapp.b", [1, 2]),
            ("myapp.c", (3,), {"k": "v"}),
            ["myapp.d", [], {}],
        ]
        ids = self.client.enqueue_many(items)
        after = self.client.enqueue("myapp.last")
        self.assertEqual(ids, list(range(before + 1, before + 5)))
        self.assertEqual(
            self.rows(),
            [
                (before, "myapp.first", [], {}),
                (ids[0], "myapp.a", [], {}),
                (ids[1], "myapp.b", [1, 2], {}),
                (ids[2], "myapp.c", [3], {"k": "v"}),
                (ids[3], "myapp.d", [], {}),
                (after, "myapp.last", [], {}),
            ],
        )

    def test_many_rows_from_a_generator(self):
        ids = self.client.enqueue_many(("myapp.n", [i]) for i in range(10_000))
        rows = self.rows()
        self.assertEqual(ids, [row[0] for row in rows])
        self.assertEqual([row[2] for row in rows], [[i] for i in range(10_000)])

    def test_ids_stay_right_after_deletes(self):
        # The daemon deletes popped rows; AUTOINCREMENT never reuses their ids.
        self.client.enqueue_many([("myapp.x",)] * 5)
        db = sqlite3.connect(self.db_path, isolation_level=None)
        db.execute("DELETE FROM foreman_task")
        db.close()
        ids = self.client.enqueue_many([("myapp.y",)] * 3)
        self.assertEqual(ids, [6, 7, 8])
        self.assertEqual([row[0] for row in self.rows()], ids)

    def test_empty_list_does_nothing(self):
        self.assertEqual(self.client.enqueue_many([]), [])
        self.assertFalse(os.path.exists(self.wakeup_file()))

    def test_validation_errors_insert_nothing(self):
        good = ("myapp.ok", [1], {"a": 1})
        bad_items = [
            (TypeError, "myapp.bare_string"),
            (TypeError, ()),
            (TypeError, ("myapp.x", [], {}, "extra")),
            (TypeError, ("",)),
            (TypeError, (42, [])),
            (TypeError, ("myapp.x", "not a list")),
            (TypeError, ("myapp.x", None)),
            (TypeError, ("myapp.x", [], [("a", 1)])),
            (TypeError, ("myapp.x", [], {1: "int key"})),
            (TypeError, ("myapp.x", [object()])),
            (ValueError, ("myapp.x", [], {"v": float("nan")})),
        ]
        for exc_type, bad in bad_items:
            with self.subTest(bad=bad), self.assertRaisesRegex(exc_type, r"enqueue_many item 2"):
                self.client.enqueue_many([good, good, bad, good])
        self.assertEqual(self.rows(), [])
        self.assertFalse(os.path.exists(self.wakeup_file()))

    def test_failed_insert_rolls_back(self):
        db = sqlite3.connect(self.db_path, isolation_level=None)
        # A trigger that fails the third row: the two before it must not stay.
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON foreman_task WHEN NEW.task_name = 'myapp.bad' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        db.close()
        with self.assertRaisesRegex(sqlite3.IntegrityError, "refused"):
            self.client.enqueue_many([("myapp.a",), ("myapp.b",), ("myapp.bad",)])
        self.assertEqual(self.rows(), [])
        self.assertEqual(len(self.client.enqueue_many([("myapp.a",), ("myapp.b",)])), 2)


class WakeupTest(ClientTestCase):
    def test_file_created_when_absent_and_left_alone_when_present(self):
        path = self.wakeup_file()
        self.assertFalse(os.path.exists(path))
        self.client.enqueue("myapp.x")
        self.assertTrue(os.path.exists(path))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600 & ~current_umask())

        opened = []
        real_open = os.open

        def counting_open(file, *args, **kwargs):
            opened.append(file)
            return real_open(file, *args, **kwargs)

        with mock.patch.object(foreman_client.os, "open", counting_open):
            self.client.enqueue("myapp.x")
            self.client.enqueue_many([("myapp.y",)])
            self.assertEqual(opened, [])
            # The daemon consumed it: the next enqueue creates it again.
            os.unlink(path)
            self.client.enqueue("myapp.x")
            self.assertEqual(opened, [path])
        self.assertTrue(os.path.exists(path))

    def test_enqueue_many_wakes_once(self):
        self.client.enqueue_many([("myapp.x",)] * 3)
        self.assertEqual(os.listdir(self.wakeup_dir), [f"py-{os.getpid()}"])

    def test_custom_wakeup_dir(self):
        custom = os.path.join(os.path.dirname(self.db_path), "elsewhere")
        os.mkdir(custom)
        with Client(self.db_path, custom) as client:
            client.enqueue("myapp.x")
        self.assertEqual(os.listdir(custom), [f"py-{os.getpid()}"])

    def test_missing_wakeup_dir_only_warns_once(self):
        os.rmdir(self.wakeup_dir)
        with self.assertLogs("foreman_client", logging.WARNING) as logs:
            first = self.client.enqueue("myapp.x")
            second = self.client.enqueue("myapp.y")
            self.client.enqueue_many([("myapp.z",)])
        self.assertEqual(len(logs.records), 1)
        self.assertIn("cannot create the wakeup file", logs.output[0])
        self.assertEqual([row[0] for row in self.rows()][:2], [first, second])
        self.assertEqual(len(self.rows()), 3)


class ConnectionTest(ClientTestCase):
    def test_missing_database_raises_at_first_use_and_creates_nothing(self):
        missing = os.path.join(os.path.dirname(self.db_path), "missing.sqlite3")
        client = Client(missing)  # creating a client opens nothing
        self.addCleanup(client.close)
        for use in (client.check, lambda: client.enqueue("myapp.x")):
            with self.assertRaisesRegex(sqlite3.OperationalError, "foreman init") as caught:
                use()
            self.assertIn(f"{missing} (given to Client())", str(caught.exception))
        self.assertFalse(os.path.exists(missing))

    def test_the_database_is_opened_on_first_use(self):
        client = Client(self.db_path)
        self.addCleanup(client.close)
        self.assertIsNone(client._conn)
        client.enqueue("myapp.x")
        self.assertIsNotNone(client._conn)

    def test_check_opens_and_checks_the_schema(self):
        self.client.check()
        self.assertIsNotNone(self.client._conn)
        empty = os.path.join(os.path.dirname(self.db_path), "empty.sqlite3")
        sqlite3.connect(empty).close()
        with Client(empty) as client:
            with self.assertRaisesRegex(sqlite3.OperationalError, "no foreman schema"):
                client.check()

    def test_database_without_schema_says_so(self):
        empty = os.path.join(os.path.dirname(self.db_path), "empty.sqlite3")
        sqlite3.connect(empty).close()
        with Client(empty) as client:
            with self.assertRaisesRegex(sqlite3.OperationalError, "no foreman schema"):
                client.enqueue("myapp.x")

    def test_connection_settings(self):
        self.client.check()
        conn = self.client._conn
        self.assertEqual(conn.execute("PRAGMA synchronous").fetchone()[0], 1)  # NORMAL
        self.assertEqual(conn.execute("PRAGMA busy_timeout").fetchone()[0], 5000)
        self.assertIsNone(conn.isolation_level)

    def test_close_and_context_manager(self):
        with Client(self.db_path) as client:
            client.enqueue("myapp.x")
        with self.assertRaisesRegex(RuntimeError, "closed"):
            client.enqueue("myapp.x")
        client.close()  # a second close is harmless

    def test_relative_path_survives_chdir(self):
        old = os.getcwd()
        self.addCleanup(os.chdir, old)
        os.chdir(os.path.dirname(self.db_path))
        client = Client("foreman.sqlite3")
        self.addCleanup(client.close)
        os.chdir(old)
        client.enqueue("myapp.x")
        self.assertEqual(client.wakeup_dir, self.wakeup_dir)
        self.assertTrue(os.path.exists(self.wakeup_file()))

    @unittest.skipUnless(hasattr(os, "fork"), "needs os.fork")
    def test_fork_child_gets_its_own_connection(self):
        parent_first = self.client.enqueue("myapp.parent")  # the connection is open before the fork
        parent_conn = self.client._conn
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: report through the pipe, never return into unittest
            status = 1
            try:
                os.close(read_end)
                task_id = self.client.enqueue("myapp.child")
                own = self.client._conn is not parent_conn
                os.write(write_end, json.dumps({"id": task_id, "own_connection": own}).encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write_end)
        status = wait_for(pid, timeout=10)
        with os.fdopen(read_end, "rb") as f:
            report = json.loads(f.read() or b"null")
        self.assertEqual(status, 0)
        self.assertTrue(report["own_connection"])
        parent_second = self.client.enqueue("myapp.parent")
        self.assertIs(self.client._conn, parent_conn)
        self.assertEqual(
            [(row[0], row[1]) for row in self.rows()],
            sorted(
                [
                    (parent_first, "myapp.parent"),
                    (report["id"], "myapp.child"),
                    (parent_second, "myapp.parent"),
                ]
            ),
        )
        self.assertTrue(os.path.exists(self.wakeup_file(pid)))


class EnvironmentTest(ClientTestCase):
    """Client() with no path follows the CLI: FOREMAN_DB, FOREMAN_WAKEUP_DIR, ./foreman.sqlite3."""

    def chdir(self, path):
        old = os.getcwd()
        self.addCleanup(os.chdir, old)
        os.chdir(path)

    def test_foreman_db_and_its_default_wakeup_dir(self):
        os.environ["FOREMAN_DB"] = self.db_path
        with Client() as client:
            self.assertEqual((client.db_path, client.wakeup_dir), (self.db_path, self.wakeup_dir))
            task_id = client.enqueue("myapp.x")
        self.assertEqual([row[0] for row in self.rows()], [task_id])
        self.assertTrue(os.path.exists(self.wakeup_file()))

    def test_foreman_wakeup_dir(self):
        custom = os.path.join(os.path.dirname(self.db_path), "elsewhere")
        os.mkdir(custom)
        os.environ["FOREMAN_DB"] = self.db_path
        os.environ["FOREMAN_WAKEUP_DIR"] = custom
        # As for the CLI, the variable fills in what the arguments leave out.
        for client in (Client(), Client(self.db_path)):
            with client:
                self.assertEqual(client.wakeup_dir, custom)
                client.enqueue("myapp.x")
        self.assertEqual(os.listdir(custom), [f"py-{os.getpid()}"])
        self.assertEqual(os.listdir(self.wakeup_dir), [])

    def test_default_is_foreman_sqlite3_in_the_current_directory(self):
        self.chdir(os.path.dirname(self.db_path))
        os.rename(self.db_path, "foreman.sqlite3")  # the fixture's file under the default name
        os.rename(self.wakeup_dir, "foreman.sqlite3.wakeup")
        with Client() as client:
            expected = os.path.join(os.getcwd(), "foreman.sqlite3")
            self.assertEqual((client.db_path, client.wakeup_dir), (expected, expected + ".wakeup"))
            client.enqueue("myapp.x")
        self.assertEqual(os.listdir("foreman.sqlite3.wakeup"), [f"py-{os.getpid()}"])

    def test_arguments_win_over_the_environment(self):
        os.environ["FOREMAN_DB"] = "/nonexistent/other.sqlite3"
        with Client(self.db_path) as client:
            self.assertEqual(client.wakeup_dir, self.wakeup_dir)
            client.enqueue("myapp.x")
        self.assertEqual(len(self.rows()), 1)

    def test_creating_a_client_touches_nothing_and_errors_name_the_source(self):
        missing = os.path.join(os.path.dirname(self.db_path), "no", "such", "q.sqlite3")
        os.environ["FOREMAN_DB"] = missing
        client = Client()
        self.addCleanup(client.close)
        with self.assertRaises(sqlite3.OperationalError) as caught:
            client.enqueue("myapp.x")
        self.assertIn(f"{missing} (from FOREMAN_DB)", str(caught.exception))
        self.assertFalse(os.path.exists(os.path.dirname(missing)))

        empty_dir = os.path.join(os.path.dirname(self.db_path), "empty")
        os.mkdir(empty_dir)
        self.chdir(empty_dir)
        del os.environ["FOREMAN_DB"]
        with Client() as client, self.assertRaises(sqlite3.OperationalError) as caught:
            client.check()
        self.assertIn("the default; set FOREMAN_DB", str(caught.exception))

    def test_an_empty_variable_is_refused_as_by_the_cli(self):
        for name, db_path in (("FOREMAN_DB", None), ("FOREMAN_WAKEUP_DIR", self.db_path)):
            with self.subTest(name=name), mock.patch.dict(os.environ, {name: ""}):
                with self.assertRaisesRegex(ValueError, f"{name} is set but empty"):
                    Client(db_path)

    def test_a_postgresql_url_needs_psycopg_and_is_never_repeated_with_its_password(self):
        for url in ("postgresql://app:secret@db/app", "postgres://app:secret@db/app?x=1"):
            os.environ["FOREMAN_DB"] = url
            client = Client()  # opens nothing yet
            self.assertNotIn("secret", repr(client))
            self.assertIn("app:***@db", repr(client))
            with mock.patch.dict(sys.modules, {"psycopg": None}):
                with self.assertRaisesRegex(ImportError, "needs psycopg 3") as caught:
                    client.enqueue("t")
            self.assertNotIn("secret", str(caught.exception))


class Priority(enum.IntEnum):
    LOW = -1
    HIGH = 10


class EnqueueWithTest(ClientTestCase):
    def test_args_and_kwargs_without_options_are_a_plain_task(self):
        before = time.time()
        first = self.client.enqueue_with("myapp.send_email", ["a@example.com"], {"retry": True})
        second = self.client.enqueue_with("myapp.x", args=(1, 2), kwargs=None)
        third = self.client.enqueue_with("myapp.noop")
        after = time.time()
        self.assertEqual(
            self.rows(),
            [
                (first, "myapp.send_email", ["a@example.com"], {"retry": True}),
                (second, "myapp.x", [1, 2], {}),
                (third, "myapp.noop", [], {}),
            ],
        )
        for _, run_after, priority in self.timing():
            self.assertEqual(priority, 0)
            self.assert_near(run_after, before, after)

    def test_delay_in_seconds(self):
        for delay in (600, 0.25, 0):
            with self.subTest(delay=delay):
                before = time.time()
                task_id = self.client.enqueue_with("myapp.later", delay=delay)
                after = time.time()
                [(_, run_after, priority)] = [t for t in self.timing() if t[0] == task_id]
                self.assertEqual(priority, 0)
                self.assert_near(run_after, before + delay, after + delay)

    def test_delay_as_timedelta_with_priority(self):
        before = time.time()
        task_id = self.client.enqueue_with(
            "app.reminder", args=[7], delay=datetime.timedelta(minutes=10), priority=5
        )
        after = time.time()
        self.assertEqual(self.rows(), [(task_id, "app.reminder", [7], {})])
        [(_, run_after, priority)] = self.timing()
        self.assertEqual(priority, 5)
        self.assert_near(run_after, before + 600, after + 600)

    def test_delay_is_counted_on_the_database_clock(self):
        # The delay is added in SQL: a Python clock that is off does not move run_after.
        with mock.patch.object(time, "time", return_value=0.0):
            self.client.enqueue_with("myapp.later", delay=60)
        [(_, run_after, _)] = self.timing()
        now = time.time()
        self.assert_near(run_after, now + 60, now + 60)

    def test_run_at_aware_datetime_and_unix_time(self):
        at = datetime.datetime(2030, 1, 2, 3, 4, 5, 250000, tzinfo=datetime.timezone.utc)
        other_zone = at.astimezone(datetime.timezone(datetime.timedelta(hours=-5)))
        ids = [
            self.client.enqueue_with("myapp.at", run_at=at),
            self.client.enqueue_with("myapp.at", run_at=other_zone, priority=-3),
            self.client.enqueue_with("myapp.at", run_at=at.timestamp()),
            self.client.enqueue_with("myapp.at", run_at=1_000_000_000),  # the past: due at once
        ]
        self.assertEqual(
            self.timing(),
            [
                (ids[0], at.timestamp(), 0),
                (ids[1], at.timestamp(), -3),
                (ids[2], at.timestamp(), 0),
                (ids[3], 1_000_000_000.0, 0),
            ],
        )

    def test_priority_alone(self):
        before = time.time()
        high = self.client.enqueue_with("myapp.urgent", priority=100)
        low = self.client.enqueue_with("myapp.whenever", priority=Priority.LOW)
        lowest = self.client.enqueue_with("myapp.min", priority=-100)
        after = time.time()
        rows = self.timing()
        self.assertEqual(
            [(i, p) for i, _, p in rows], [(high, 100), (low, -1), (lowest, -100)]
        )
        for _, run_after, _ in rows:
            self.assert_near(run_after, before, after)
        db = sqlite3.connect(self.db_path)
        self.addCleanup(db.close)
        kinds = db.execute("SELECT DISTINCT typeof(priority), typeof(run_after) FROM foreman_task")
        self.assertEqual(kinds.fetchall(), [("integer", "real")])

    def test_delayed_task_touches_the_wakeup_file(self):
        # The daemon must re-compute when to wake up, so a delayed task wakes it too.
        self.client.enqueue_with("myapp.later", delay=3600)
        self.assertTrue(os.path.exists(self.wakeup_file()))

    def test_enqueue_keeps_delay_and_priority_as_task_kwargs(self):
        task_id = self.client.enqueue("myapp.x", delay=5, priority=9, run_at=1)
        self.assertEqual(
            self.rows(), [(task_id, "myapp.x", [], {"delay": 5, "priority": 9, "run_at": 1})]
        )
        [(_, _, priority)] = self.timing()
        self.assertEqual(priority, 0)

    def test_validation_errors_insert_nothing(self):
        naive = datetime.datetime(2030, 1, 1)
        cases = [
            (ValueError, "not both", dict(delay=1, run_at=2)),
            (TypeError, "delay must be seconds", dict(delay="10")),
            (TypeError, "delay must be seconds", dict(delay=True)),
            (ValueError, "delay must not be negative", dict(delay=-1)),
            (ValueError, "delay must not be negative", dict(delay=datetime.timedelta(seconds=-1))),
            (ValueError, "finite", dict(delay=float("nan"))),
            (ValueError, "finite", dict(delay=float("inf"))),
            (ValueError, "out of range", dict(delay=10**400)),
            (ValueError, "timezone-aware", dict(run_at=naive)),
            (TypeError, "run_at must be", dict(run_at="2030-01-01T00:00:00Z")),
            (TypeError, "run_at must be", dict(run_at=datetime.date(2030, 1, 1))),
            (TypeError, "run_at must be", dict(run_at=False)),
            (ValueError, "finite", dict(run_at=float("nan"))),
            (TypeError, "priority must be an int", dict(priority=True)),
            (TypeError, "priority must be an int", dict(priority=1.0)),
            (TypeError, "priority must be an int", dict(priority="5")),
            (TypeError, "priority must be an int", dict(priority=None)),
            (ValueError, "between -100 and 100", dict(priority=101)),
            (ValueError, "between -100 and 100", dict(priority=-101)),
        ]
        for exc_type, message, options in cases:
            with self.subTest(options=options), self.assertRaisesRegex(exc_type, message):
                self.client.enqueue_with("myapp.x", **options)
        bad_tasks = [
            (TypeError, "task name must be a non-empty str", ("",), {}),
            (TypeError, "task name must be a non-empty str", (None,), {}),
            (TypeError, r"enqueue_with \(myapp.x\): args must be a list or tuple, not str",
             ("myapp.x", "abc"), {}),
            (TypeError, "kwargs must be a dict, not list", ("myapp.x", [], [("a", 1)]), {}),
            (TypeError, "kwargs keys must be str", ("myapp.x", [], {1: 2}), {}),
            (TypeError, "args of task 'myapp.x' are not JSON-serialisable",
             ("myapp.x", [object()]), {}),
            (ValueError, "kwargs of task 'myapp.x' are not JSON",
             ("myapp.x", [], {"v": float("nan")}), {}),
        ]
        for exc_type, message, args, options in bad_tasks:
            with self.subTest(args=args), self.assertRaisesRegex(exc_type, message):
                self.client.enqueue_with(*args, **options)
        self.assertEqual(self.rows(), [])
        self.assertFalse(os.path.exists(self.wakeup_file()))

    def test_delay_and_priority_are_keyword_only(self):
        with self.assertRaises(TypeError):
            self.client.enqueue_with("myapp.x", [], {}, 10)


class EnqueueManyTimingTest(ClientTestCase):
    def test_delay_and_priority_apply_to_every_item(self):
        before = time.time()
        ids = self.client.enqueue_many(
            [("myapp.a",), ("myapp.b", [1])], delay=datetime.timedelta(seconds=90), priority=3
        )
        after = time.time()
        rows = self.timing()
        self.assertEqual([row[0] for row in rows], ids)
        for _, run_after, priority in rows:
            self.assertEqual(priority, 3)
            self.assert_near(run_after, before + 90, after + 90)
        self.assertTrue(os.path.exists(self.wakeup_file()))

    def test_run_at_and_priority_alone(self):
        at = datetime.datetime(2031, 5, 6, tzinfo=datetime.timezone.utc)
        at_ids = self.client.enqueue_many([("myapp.a",)] * 2, run_at=at)
        before = time.time()
        urgent_ids = self.client.enqueue_many([("myapp.b",)] * 2, priority=-7)
        after = time.time()
        rows = self.timing()
        self.assertEqual([row[0] for row in rows], at_ids + urgent_ids)
        self.assertEqual(rows[:2], [(i, at.timestamp(), 0) for i in at_ids])
        for _, run_after, priority in rows[2:]:
            self.assertEqual(priority, -7)
            self.assert_near(run_after, before, after)

    def test_options_are_checked_before_the_items_are_read(self):
        read = []

        def items():
            read.append(1)
            yield ("myapp.a",)

        with self.assertRaisesRegex(TypeError, "priority must be an int"):
            self.client.enqueue_many(items(), priority="high")
        with self.assertRaisesRegex(ValueError, "not both"):
            self.client.enqueue_many(items(), delay=1, run_at=1)
        self.assertEqual(read, [])
        self.assertEqual(self.rows(), [])
        self.assertFalse(os.path.exists(self.wakeup_file()))

    def test_bad_item_with_options_inserts_nothing(self):
        with self.assertRaisesRegex(TypeError, "enqueue_many item 1"):
            self.client.enqueue_many([("myapp.a",), ("",)], delay=5, priority=1)
        self.assertEqual(self.rows(), [])

    def test_options_are_keyword_only(self):
        with self.assertRaises(TypeError):
            self.client.enqueue_many([("myapp.a",)], 10)


class UniqueKeyTest(ClientTestCase):
    def run_sql(self, sql, params=()):
        db = sqlite3.connect(self.db_path)
        try:
            with db:
                return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def test_a_queued_key_gives_back_its_task(self):
        first = self.client.enqueue_with("app.sync", [1], unique_key="sync:1")
        again = self.client.enqueue_with("app.sync", [2], unique_key="sync:1", delay=5)
        other = self.client.enqueue_with("app.sync", [3], unique_key="sync:2")
        self.assertEqual(again, first)
        self.assertNotEqual(other, first)
        self.assertEqual([r[2] for r in self.rows()], [[1], [3]])

    def test_a_running_key_gives_back_its_task_and_a_finished_one_is_free(self):
        self.run_sql(
            "INSERT INTO foreman_run(task_id, attempt, task_name, state, unique_key) "
            "VALUES (77, 1, 'app.sync', 'running', 'k')"
        )
        self.assertEqual(self.client.enqueue_with("app.sync", unique_key="k"), 77)
        self.assertEqual(self.rows(), [])
        self.run_sql("UPDATE foreman_run SET state = 'done' WHERE task_id = 77")
        new = self.client.enqueue_with("app.sync", unique_key="k")
        self.assertEqual([r[0] for r in self.rows()], [new])

    def test_the_plain_sql_of_schema_sql_works_too(self):
        first = self.client.enqueue_with("app.sync", unique_key="k")
        db = sqlite3.connect(self.db_path)
        try:
            cursor = db.execute(
                "INSERT INTO foreman_task(task_name, unique_key) VALUES ('app.sync', 'k') "
                "ON CONFLICT DO NOTHING"
            )
            self.assertEqual(cursor.rowcount, 0)
            with self.assertRaises(sqlite3.IntegrityError):
                db.execute("INSERT INTO foreman_task(task_name, unique_key) VALUES ('x', 'k')")
        finally:
            db.close()
        self.assertEqual([r[0] for r in self.rows()], [first])

    def test_a_key_must_be_a_str(self):
        with self.assertRaises(TypeError):
            self.client.enqueue_with("app.sync", unique_key=5)


class WaitTest(ClientTestCase):
    """Client.wait reads what the daemon records; here the records are written by hand."""

    def record(self, task_id, attempt, state, *, error=None, retry_at=None, result=None):
        db = sqlite3.connect(self.db_path)
        try:
            with db:
                db.execute(
                    "INSERT OR REPLACE INTO foreman_run(task_id, attempt, task_name, state, error, "
                    "retry_at, result) VALUES (?, ?, 'app.t', ?, ?, ?, ?)",
                    (task_id, attempt, state, error, retry_at, result),
                )
        finally:
            db.close()

    def test_a_done_task_gives_its_result(self):
        self.record(5, 1, "done", result='{"sent": 3}')
        self.assertEqual(self.client.wait(5), {"sent": 3})
        self.record(6, 1, "done")
        self.assertIsNone(self.client.wait(6))

    def test_a_failed_task_raises_with_its_error(self):
        self.record(5, 2, "failed", error="Traceback ...\nValueError: no such user")
        with self.assertRaises(foreman_client.TaskFailed) as caught:
            self.client.wait(5)
        failed = caught.exception
        self.assertEqual((failed.state, failed.attempt), ("failed", 2))
        self.assertIn("ValueError: no such user", str(failed))

    def test_it_waits_across_a_retry_and_returns_when_it_ends(self):
        task_id = self.client.enqueue("app.t")
        # Its first attempt failed and a retry is queued: not the outcome yet.
        self.record(task_id, 1, "failed", error="x", retry_at=1.0)

        def second_attempt_done():
            db = sqlite3.connect(self.db_path)
            try:
                with db:  # as the daemon does: the row goes with the attempt's record
                    db.execute("DELETE FROM foreman_task WHERE id = ?", (task_id,))
                    db.execute(
                        "INSERT INTO foreman_run(task_id, attempt, task_name, state, result) "
                        "VALUES (?, 2, 'app.t', 'done', '[1]')",
                        (task_id,),
                    )
            finally:
                db.close()

        self.run_later(second_attempt_done)
        self.assertEqual(self.client.wait(task_id, timeout=30), [1])

    def run_later(self, action):
        timer = threading.Timer(0.2, action)
        timer.start()
        self.addCleanup(timer.join)

    def test_unknown_and_timeout(self):
        with self.assertRaises(LookupError):
            self.client.wait(404)
        task_id = self.client.enqueue("app.t")
        started = time.monotonic()
        with self.assertRaises(TimeoutError):
            self.client.wait(task_id, timeout=0.1)
        self.assertLess(time.monotonic() - started, 5)


class SchemaVersionTest(unittest.TestCase):
    """A client against a version 1 database (foreman 1.x, not yet upgraded)."""

    def setUp(self):
        without_foreman_env(self)
        tmp = tempfile.TemporaryDirectory(prefix="foreman-client-test-")
        self.addCleanup(tmp.cleanup)
        self.db_path = os.path.join(tmp.name, "foreman.sqlite3")
        db = sqlite3.connect(self.db_path)
        db.executescript(SCHEMA_V1)
        db.close()
        os.mkdir(self.db_path + ".wakeup")
        self.client = Client(self.db_path)
        self.addCleanup(self.client.close)

    def count_rows(self):
        db = sqlite3.connect(self.db_path)
        try:
            return db.execute("SELECT count(*) FROM foreman_task").fetchone()[0]
        finally:
            db.close()

    def test_plain_tasks_still_work(self):
        self.client.enqueue("myapp.x", 1, k="v")
        self.client.enqueue_with("myapp.x", [1], {"k": "v"})
        self.client.enqueue_with("myapp.x", priority=0)
        self.client.enqueue_many([("myapp.y",)] * 3)
        self.assertEqual(self.count_rows(), 6)

    def test_delay_run_at_or_priority_say_to_upgrade(self):
        calls = [
            lambda: self.client.enqueue_with("myapp.x", delay=10),
            lambda: self.client.enqueue_with("myapp.x", delay=0),
            lambda: self.client.enqueue_with("myapp.x", run_at=2_000_000_000),
            lambda: self.client.enqueue_with("myapp.x", priority=1),
            lambda: self.client.enqueue_many([("myapp.y",)], delay=10),
            lambda: self.client.enqueue_many([("myapp.y",)], priority=-1),
        ]
        for index, call in enumerate(calls):
            with self.subTest(call=index):
                with self.assertRaisesRegex(sqlite3.OperationalError, "schema version 1") as caught:
                    call()
                self.assertIn("upgrade: run `foreman init`", str(caught.exception))
                self.assertIn(self.db_path, str(caught.exception))
        self.assertEqual(self.count_rows(), 0)

    def test_works_once_upgraded_and_checks_the_version_once(self):
        with self.assertRaisesRegex(sqlite3.OperationalError, "foreman init"):
            self.client.enqueue_with("myapp.x", delay=10)
        # What the upgrade leaves (the real migration keeps the rows; none are queued here).
        db = sqlite3.connect(self.db_path)
        db.executescript("DROP TABLE foreman_task; DROP TABLE foreman_dead;")
        with open(SCHEMA, encoding="utf-8") as f:
            db.executescript(f.read())
        db.close()
        statements = []
        self.client._conn.set_trace_callback(statements.append)
        self.client.enqueue_with("myapp.x", delay=10)
        self.client.enqueue_with("myapp.x", priority=2)
        self.client.enqueue_many([("myapp.y",)], delay=1)
        self.assertEqual(self.count_rows(), 3)
        self.assertEqual(sum("user_version" in sql for sql in statements), 1)

    def test_database_without_schema_says_so(self):
        empty = os.path.join(os.path.dirname(self.db_path), "empty.sqlite3")
        sqlite3.connect(empty).close()
        with Client(empty) as client:
            with self.assertRaisesRegex(sqlite3.OperationalError, "no foreman schema"):
                client.enqueue_with("myapp.x", delay=1)


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def wait_for(pid, timeout):
    """The exit status of child pid; kills it and fails after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not exit in {timeout}s")


if __name__ == "__main__":
    unittest.main()
