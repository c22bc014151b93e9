"""Tasks of the notes app, served by the `flask` pool of foreman.toml, where each one runs in the
app context of create_app() (--flask-app): db.session works as in a view, and is removed after
each task."""

import os

from foreman_worker import task
from notes_app import Note, db


@task  # task name "notes_app.tasks.process_note"
def process_note(note_id):
    note = db.session.get(Note, note_id)
    if note is None or note.status != "new":  # idempotent
        return
    note.status = "done"
    note.processed_by_pid = os.getpid()
    db.session.commit()
