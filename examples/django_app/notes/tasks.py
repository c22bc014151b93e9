"""Tasks of the notes app, served by the `django` pool of foreman.toml."""

import os

from django.utils import timezone

from foreman_worker import task
from notes.models import Note


@task  # task name "notes.tasks.process_note"
def process_note(note_id):
    # Idempotent: a task queued twice (see foreman_django's promise) changes nothing the second
    # time. The worker has set Django up and checks its connections around each task.
    Note.objects.filter(pk=note_id, status="new").update(
        status="done", processed_by_pid=os.getpid(), processed_at=timezone.now()
    )
