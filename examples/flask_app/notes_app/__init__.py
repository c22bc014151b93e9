"""The foreman Flask example: a notes app whose tasks run in a foreman pool.

    flask --app notes_app init-db
    flask --app notes_app run
"""

import logging
import os
import sqlite3

from flask import Flask, abort, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from foreman_client import Client


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
# FOREMAN_DB, else ./foreman.sqlite3, as for `foreman` itself. Creating the client opens nothing,
# so importing this module (in a worker, in `flask init-db`) needs no queue.
foreman = Client()
log = logging.getLogger(__name__)


class Note(db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str]
    # "new" until notes_app.tasks.process_note has run for it.
    status: Mapped[str] = mapped_column(default="new")
    processed_by_pid: Mapped[int | None]


def create_app():
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ.get(
        "DATABASE_URL", "sqlite:///notes.sqlite3"  # relative: in the app's instance folder
    )
    # A connection that went stale (a database restart) is replaced before use.
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_pre_ping": True}
    db.init_app(app)

    @app.cli.command("init-db")
    def init_db():
        """Create the tables."""
        db.create_all()

    @app.post("/notes/")
    def create_note():
        note = Note(text=request.form.get("text", ""))
        db.session.add(note)
        db.session.commit()  # first the app's data...
        try:
            foreman.enqueue("notes_app.tasks.process_note", note.id)  # ...then the task
        except sqlite3.Error:
            # The note is committed: answer as such, and leave enough in the log to queue the
            # task by hand (`foreman enqueue notes_app.tasks.process_note '[ID]'`).
            log.exception("note %d saved, but its task could not be queued", note.id)
        return jsonify(id=note.id), 201

    @app.get("/notes/<int:note_id>/")
    def note_detail(note_id):
        note = db.session.get(Note, note_id) or abort(404)
        return jsonify(id=note.id, status=note.status, processed_by_pid=note.processed_by_pid)

    return app
