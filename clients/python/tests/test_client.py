"""foreman_client.py against a real SQLite file made from schema.sql; no daemon needed."""

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
sys.path.insert(0, CLIENT_DIR)

import foreman_client  # noqa: E402
from foreman_client import Client  # noqa: E402


class ClientTestCase(unittest.TestCase):
    def setUp(self):
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
    def test_missing_database_raises_and_creates_nothing(self):
        missing = os.path.join(os.path.dirname(self.db_path), "missing.sqlite3")
        with self.assertRaisesRegex(sqlite3.OperationalError, "foreman init"):
            Client(missing)
        self.assertFalse(os.path.exists(missing))

    def test_database_without_schema_says_so(self):
        empty = os.path.join(os.path.dirname(self.db_path), "empty.sqlite3")
        sqlite3.connect(empty).close()
        with Client(empty) as client:
            with self.assertRaisesRegex(sqlite3.OperationalError, "no foreman schema"):
                client.enqueue("myapp.x")

    def test_connection_settings(self):
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
