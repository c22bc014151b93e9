"""examples/django_app end to end: a request commits a note and queues its task with
enqueue_on_commit; the real foreman daemon runs it in the example's Django pool, which updates the
note through the ORM. The app's database is a real PostgreSQL, restarted under the workers."""

import json
import os
import sqlite3
import sys
import tempfile
import time
import unittest
from unittest import mock

import harness

EXAMPLE = os.path.join(harness.REPO, "examples", "django_app")
TASK = "notes.tasks.process_note"


class DjangoExampleTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        try:
            import django
            import psycopg  # noqa: F401
        except ImportError as exc:
            harness.require(False, f"Django or psycopg cannot be imported: {exc}")
        tmp = tempfile.TemporaryDirectory(prefix="foreman-django-")
        cls.addClassCleanup(tmp.cleanup)
        cls.tmp = tmp.name
        cls.pg = harness.Postgres(cls.tmp)
        cls.addClassCleanup(cls.pg.stop)

        # This process is the web app: the settings read these, and the client FOREMAN_DB.
        env = mock.patch.dict(os.environ, {
            **cls.pg.env(),
            "DJANGO_SETTINGS_MODULE": "exampleproject.settings",
            "DJANGO_STATIC_ROOT": os.path.join(cls.tmp, "static"),
            "FOREMAN_DB": os.path.join(cls.tmp, "foreman.sqlite3"),
            "PYTHONPATH": harness.CLIENT_DIR,
        })
        env.start()
        cls.addClassCleanup(env.stop)
        harness.run([sys.executable, "manage.py", "migrate"], cwd=EXAMPLE)

        cls.foreman = harness.Foreman(cls.tmp, os.path.join(EXAMPLE, "foreman.toml"), cls.tmp)
        cls.addClassCleanup(cls.foreman.stop)
        sys.path[:0] = [EXAMPLE, harness.CLIENT_DIR]
        django.setup()
        from django.core.wsgi import get_wsgi_application

        cls.server = harness.Server(get_wsgi_application())
        cls.addClassCleanup(cls.server.stop)

    def setUp(self):
        from django.db import close_old_connections

        # What Django does before a request, for this thread's own connection: after a database
        # restart (another test), it is checked before its next use.
        close_old_connections()

    def create_note(self):
        status, body = self.server.post("/notes/", text="hello")
        self.assertEqual(status, 201, body)
        return body["id"]

    def wait_done(self, note_id):
        """The note once its task has run; fails at once if a task failed."""

        def done():
            self.foreman.assert_no_failed_run(TASK)
            status, note = self.server.get(f"/notes/{note_id}/")
            self.assertEqual(status, 200, note)
            return note if note["status"] == "done" else None

        try:
            return harness.wait_until(done, f"note {note_id} to be processed")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nforeman log:\n{self.foreman.log()}") from None

    def outbox(self):
        """(task_name, args) of what waits in the outbox, read by this process's own connection."""
        from foreman_django.models import Outbox

        return [(row.task_name, json.loads(row.args)) for row in Outbox.objects.order_by("id")]

    def pool_processes(self):
        out = self.foreman.cli("status", "--json")
        self.assertEqual(out.returncode, 0, out.stderr)
        (pool,) = [p for p in json.loads(out.stdout)["pools"] if p["name"] == "django"]
        return pool["processes"]

    def test_a_request_commits_a_note_and_its_task_updates_it(self):
        note = self.wait_done(self.create_note())
        self.assertNotIn(note["processed_by_pid"], (None, os.getpid()))
        self.assertEqual(self.outbox(), [])

    def test_a_database_restart_under_the_workers_costs_no_task(self):
        # Every worker serves a task first, so each holds a connection (CONN_MAX_AGE) when the
        # database restarts. Tasks go to whichever worker is free: send a few at a time.
        processes, pids = self.pool_processes(), set()
        for _ in range(10):
            notes = [self.create_note() for _ in range(2 * processes)]
            pids |= {self.wait_done(note_id)["processed_by_pid"] for note_id in notes}
            if len(pids) == processes:
                break
        self.assertEqual(len(pids), processes, "not every worker got a task")

        self.pg.restart()
        # The next task, and every one after it, runs on the same long-lived workers.
        for _ in range(2 * processes):
            note = self.wait_done(self.create_note())
            self.assertIn(note["processed_by_pid"], pids)
        self.foreman.assert_no_failed_run(TASK)

    def test_the_queue_failing_after_the_commit_loses_no_task(self):
        # Another connection holds foreman's write lock for longer than FOREMAN_TIMEOUT (1 s).
        lock = sqlite3.connect(self.foreman.db, timeout=10, isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")
            with self.assertLogs("foreman_django", "WARNING") as logs:
                note_id = self.create_note()  # 201: the note is committed, and the answer says so
            self.assertIn("could not queue tasks in foreman after the commit", logs.output[0])
            self.assertIn("database is locked", logs.output[0])
            self.assertEqual(self.outbox(), [(TASK, [note_id])])
        finally:
            lock.close()
        # The relay (on its schedule, or asked for now) moves the task, and it runs.
        out = self.foreman.cli("enqueue", "foreman_django.relay")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.wait_done(note_id)
        self.assertEqual(self.outbox(), [])

    def test_enqueue_on_commit_follows_the_transaction(self):
        from django.db import transaction

        from foreman_django import enqueue_on_commit, enqueue_on_commit_with

        class Rollback(Exception):
            pass

        with self.assertRaises(Rollback), transaction.atomic():
            enqueue_on_commit("example.rolled_back", 1)
            raise Rollback
        with self.assertRaises(TypeError), transaction.atomic():
            enqueue_on_commit("example.bad_argument", object())  # checked in the call
        self.assertEqual(self.outbox(), [])

        before = time.time()
        with transaction.atomic():
            enqueue_on_commit_with("example.later", [7], {"k": "v"}, delay=3600, priority=5)
            self.assertEqual(self.outbox(), [("example.later", [7])])  # in the transaction
        self.assertEqual(self.outbox(), [])  # moved to foreman at the commit
        db = sqlite3.connect(self.foreman.db, timeout=10)
        try:
            queued = db.execute(
                "SELECT task_name, args, kwargs, run_after, priority FROM foreman_task "
                "WHERE task_name LIKE 'example.%'"
            ).fetchall()
            db.execute("DELETE FROM foreman_task WHERE task_name LIKE 'example.%'")
            db.commit()
        finally:
            db.close()
        [(name, args, kwargs, run_after, priority)] = queued
        self.assertEqual((name, args, kwargs, priority), ("example.later", "[7]", '{"k":"v"}', 5))
        self.assertTrue(before + 3600 <= run_after <= time.time() + 3600, run_after - before)

    def test_manage_py_needs_no_foreman_database(self):
        missing = os.path.join(self.tmp, "nowhere", "foreman.sqlite3")
        env = {**os.environ, "FOREMAN_DB": missing}
        for command in (
            ["check"],
            ["makemigrations", "--check", "--dry-run"],
            ["migrate"],
            ["collectstatic", "--noinput"],
            ["test", "notes"],
        ):
            with self.subTest(command=command):
                harness.run([sys.executable, "manage.py", *command], cwd=EXAMPLE, env=env)
        self.assertFalse(os.path.exists(os.path.dirname(missing)))


if __name__ == "__main__":
    unittest.main()
