"""foreman for Django: settings, and tasks queued if and only if the transaction commits.

    # settings.py
    INSTALLED_APPS = [..., "foreman_django"]   # then: manage.py migrate
    FOREMAN_DB = "/var/lib/foreman/foreman.sqlite3"   # optional: else FOREMAN_DB, else the CLI's

    # views.py
    from foreman_django import enqueue_on_commit

    with transaction.atomic():
        note = Note.objects.create(text=text)
        enqueue_on_commit("notes.tasks.process_note", note.pk)

``enqueue_on_commit`` writes the task into an outbox table of your own database, in your
transaction, so it commits or rolls back with your data. Right after the commit it moves it to
foreman (one short foreman transaction, a bounded wait for its lock). If that fails (the foreman
database is missing, locked or on a full disk), nothing is raised into your view, whose data is
committed: a warning is logged and the task waits in the outbox until ``relay()`` moves it, run
by the next commit's move or by the ``foreman_django.relay`` task on a schedule. The promise: a
task is queued if and only if its transaction commits, and never lost on the way; should the
process die between foreman's commit and the outbox row's deletion, it is queued twice.

Settings, each read when first needed (else the environment variable of the same name, else the
CLI's default): ``FOREMAN_DB``, ``FOREMAN_WAKEUP_DIR``; ``FOREMAN_TIMEOUT``, seconds to wait for
foreman's write lock (default 1).
"""

import json
import logging
import threading
import time

import foreman_client
from django.db import DEFAULT_DB_ALIAS, transaction

__all__ = ["client", "enqueue_on_commit", "enqueue_on_commit_with", "relay"]

log = logging.getLogger("foreman_django")

# A request moves at most this many tasks after its commit; the relay task moves the rest.
_FLUSH_LIMIT = 100
_RELAY_BATCH = 500
_DEFAULT_TIMEOUT = 1.0

_client = None
_client_lock = threading.Lock()


def client():
    """The foreman_client.Client of the settings, created on first use (opened on first enqueue)."""
    global _client
    with _client_lock:
        if _client is None:
            from django.conf import settings

            _client = foreman_client.Client(
                getattr(settings, "FOREMAN_DB", None),
                getattr(settings, "FOREMAN_WAKEUP_DIR", None),
                timeout=getattr(settings, "FOREMAN_TIMEOUT", _DEFAULT_TIMEOUT),
            )
        return _client


def _reset_client(setting, **kwargs):
    """override_settings(FOREMAN_DB=...) in tests: the next client() reads the new value."""
    global _client
    if setting.startswith("FOREMAN_"):
        with _client_lock:
            if _client is not None:
                _client.close()
            _client = None


def enqueue_on_commit(task_name, /, *args, **kwargs):
    """Queue the task if and only if the current transaction of the default database commits.

    ``args`` and ``kwargs`` are the task's, as for ``Client.enqueue``; they are checked now, so a
    bad argument raises here, in your view. Outside a transaction the task is queued at once.
    """
    enqueue_on_commit_with(task_name, args, kwargs)


def enqueue_on_commit_with(
    task_name, /, args=(), kwargs=None, *, using=None, delay=None, run_at=None, priority=0
):
    """``enqueue_on_commit`` with options: ``using``, the database alias whose transaction it
    joins (default: the default one), and ``delay`` (counted from this call), ``run_at`` and
    ``priority`` as for ``Client.enqueue_with``."""
    from django.apps import apps
    from django.core.exceptions import ImproperlyConfigured

    if not apps.is_installed("foreman_django"):
        raise ImproperlyConfigured(
            "enqueue_on_commit needs 'foreman_django' in INSTALLED_APPS (then run migrate)"
        )
    from foreman_django.models import Outbox

    name, args_json, kwargs_json = foreman_client._task_row(
        task_name, args, kwargs, "enqueue_on_commit"
    )
    foreman_client._timing(delay, run_at, priority)  # raises on a bad option
    if delay is not None:
        run_at = time.time() + foreman_client._delay_seconds(delay)
    elif run_at is not None:
        run_at = foreman_client._unix_time(run_at)
    alias = using or DEFAULT_DB_ALIAS
    Outbox.objects.using(alias).create(
        task_name=name, args=args_json, kwargs=kwargs_json, run_at=run_at, priority=priority
    )
    transaction.on_commit(lambda: _flush(alias), using=alias)


def _flush(alias):
    """After a commit: move the outbox to foreman now. Never raises: the app's data is committed,
    and an error here would turn a done request into an HTTP 500."""
    try:
        relay(using=alias, limit=_FLUSH_LIMIT)
    except Exception as exc:
        log.warning(
            "could not queue tasks in foreman after the commit (%s); they wait in the outbox "
            "table foreman_outbox of database %r until the next commit or the "
            "foreman_django.relay task moves them",
            exc,
            alias,
        )


class _Taken(Exception):
    """Another relay took some of the rows we read: leave them to it."""


def relay(using=None, *, limit=None):
    """Move tasks from the outbox to foreman, oldest first; returns how many were moved.

    Each batch is one transaction on the app's database (rows locked with SKIP LOCKED where the
    database has it, so concurrent relays take different rows) around one short foreman
    transaction; foreman's write lock is never held while the app's database is waited for.
    ``limit``: stop after about that many (default: until the outbox is empty).
    """
    from foreman_django.models import Outbox

    alias = using or DEFAULT_DB_ALIAS
    outbox = Outbox.objects.using(alias)
    moved = 0
    while limit is None or moved < limit:
        batch = _RELAY_BATCH if limit is None else min(_RELAY_BATCH, limit - moved)
        try:
            with transaction.atomic(using=alias):
                rows = list(outbox.select_for_update(skip_locked=True).order_by("id")[:batch])
                if not rows:
                    break
                # One foreman transaction takes one timing; other rows wait for the next batch.
                first = rows[0]
                rows = [r for r in rows if (r.run_at, r.priority) == (first.run_at, first.priority)]
                # The delete claims the rows: on a database without SKIP LOCKED another relay
                # may have read them too, and only one of us deletes them.
                if outbox.filter(pk__in=[r.pk for r in rows]).delete()[0] != len(rows):
                    raise _Taken
                client().enqueue_many(
                    [(r.task_name, json.loads(r.args), json.loads(r.kwargs)) for r in rows],
                    run_at=first.run_at,
                    priority=first.priority,
                )
        except _Taken:
            break
        moved += len(rows)
    return moved
