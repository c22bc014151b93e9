"""`manage.py test`: no foreman database is needed, the task is seen in the outbox."""

import json

from django.test import TestCase

from foreman_django.models import Outbox
from notes.models import Note
from notes.tasks import process_note


class CreateNoteTest(TestCase):
    def test_the_task_is_queued_with_the_note(self):
        # TestCase never commits, so on_commit callbacks (the move to foreman) do not run: the
        # task is in the outbox, written in the same transaction as the note.
        response = self.client.post("/notes/", {"text": "hello"})
        self.assertEqual(response.status_code, 201)
        note_id = response.json()["id"]
        task = Outbox.objects.get()
        self.assertEqual(task.task_name, "notes.tasks.process_note")
        self.assertEqual(json.loads(task.args), [note_id])

    def test_the_task_marks_the_note_done(self):
        note = Note.objects.create(text="hello")
        process_note(note.pk)  # a @task is a plain function
        note.refresh_from_db()
        self.assertEqual(note.status, "done")
