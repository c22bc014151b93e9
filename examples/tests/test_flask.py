"""examples/flask_app end to end: a request commits a note with Flask-SQLAlchemy, then queues its
task with `Client()` (FOREMAN_DB); the real foreman daemon runs it in the example's pool, inside
the app context of create_app(), and the task updates the note through the ORM."""

import os
import sys
import tempfile
import unittest
from unittest import mock

import harness

EXAMPLE = os.path.join(harness.REPO, "examples", "flask_app")
TASK = "notes_app.tasks.process_note"


class FlaskExampleTest(unittest.TestCase):
    def setUp(self):
        try:
            import flask  # noqa: F401
            import flask_sqlalchemy  # noqa: F401
        except ImportError as exc:
            harness.require(False, f"Flask or Flask-SQLAlchemy cannot be imported: {exc}")
        tmp = tempfile.TemporaryDirectory(prefix="foreman-flask-")
        self.addCleanup(tmp.cleanup)
        self.tmp = tmp.name
        env = mock.patch.dict(os.environ, {
            "DATABASE_URL": "sqlite:///" + os.path.join(self.tmp, "notes.sqlite3"),
            "FOREMAN_DB": os.path.join(self.tmp, "foreman.sqlite3"),
            "PYTHONPATH": harness.CLIENT_DIR,
        })
        env.start()
        self.addCleanup(env.stop)
        harness.run([sys.executable, "-m", "flask", "--app", "notes_app", "init-db"], cwd=EXAMPLE)
        sys.path[:0] = [EXAMPLE, harness.CLIENT_DIR]
        from notes_app import create_app

        self.server = harness.Server(create_app())
        self.addCleanup(self.server.stop)

    def create_note(self):
        status, body = self.server.post("/notes/", text="hello")
        self.assertEqual(status, 201, body)
        return body["id"]

    def wait_done(self, foreman, note_id):
        def done():
            foreman.assert_no_failed_run(TASK)
            status, note = self.server.get(f"/notes/{note_id}/")
            self.assertEqual(status, 200, note)
            return note if note["status"] == "done" else None

        try:
            return harness.wait_until(done, f"note {note_id} to be processed")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nforeman log:\n{foreman.log()}") from None

    def test_requests_before_and_after_the_queue_exists(self):
        # Before foreman ever ran there is no queue: the note is saved, the request answers, and
        # the log says how to queue the task by hand.
        with self.assertLogs("notes_app", "ERROR") as logs:
            early = self.create_note()
        self.assertIn(f"note {early} saved, but its task could not be queued", logs.output[0])
        self.assertIn("cannot open the foreman database", logs.output[0])
        self.assertEqual(self.server.get(f"/notes/{early}/")[1]["status"], "new")

        foreman = harness.Foreman(self.tmp, os.path.join(EXAMPLE, "foreman.toml"), self.tmp)
        self.addCleanup(foreman.stop)
        out = foreman.cli("enqueue", TASK, f"[{early}]")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.wait_done(foreman, early)

        # The same client, now that the queue exists: request, commit, task, update.
        note = self.wait_done(foreman, self.create_note())
        self.assertNotIn(note["processed_by_pid"], (None, os.getpid()))


if __name__ == "__main__":
    unittest.main()
