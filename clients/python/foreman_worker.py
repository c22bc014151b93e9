"""A persistent foreman worker for Python tasks (worker protocol version 1).

Mark task functions with ``@task`` in your own modules::

    # myapp/tasks.py
    from foreman_worker import task

    @task                      # task name "myapp.tasks.send_email"
    def send_email(to, retry=False):
        ...

    @task(name="thumbnail")    # or choose the name
    def make_thumbnail(path):
        ...

and point a foreman pool at them::

    [pools.py]
    command = ["python3", "-m", "foreman_worker", "myapp.tasks"]

The process imports the modules once, says which tasks it serves, then runs tasks one at a time for
as long as the daemon keeps it. The protocol is docs/worker-protocol.md; this file is stdlib-only
and can be copied into a project as is.

A task that returns normally is done; one that raises has failed, with the traceback as the error.
What it returns is its *result* (a JSON-serialisable value, at most 64 KiB as JSON), kept with the
attempt and given to whoever waits for it (``foreman wait ID --json``, ``Client.wait(id)``);
``None`` is no result. A value that is not JSON-serialisable is left out, with a warning on stderr.

``True`` and ``False`` also tell an adaptive schedule (``adaptive = {...}`` in a
``[schedules.NAME]`` of the config) whether the run was *eventful*, i.e. found something new.
``True`` brings the schedule's next run sooner, ``False`` backs it off::

    @task
    def poll_feed(url):
        new_items = fetch_new(url)
        store(new_items)
        return bool(new_items)

Any other value says nothing, which counts as eventful. To return a result and still say
"uneventful", return ``uneventful(result)``. An ``async def`` task is run to completion, and its
result read the same way.

Frameworks. With ``DJANGO_SETTINGS_MODULE`` set, the worker calls ``django.setup()`` before it
imports the task modules, and Django's ``close_old_connections()`` before and after each task, as
Django does around a request (so a database restart costs no task). ``--flask-app
MODULE:APP_OR_FACTORY`` runs each task inside that Flask app's app context (a factory is called
once). Hooks of your own run around every task::

    @before_task
    def log_start(task_id, task_name):
        ...

    @after_task
    def log_end(task_id, task_name, error):   # error: the exception, or None
        ...

A hook that raises fails the task with the hook's traceback.
"""

import contextlib
import importlib
import types
import json
import os
import sys
import traceback

__version__ = "1.2.0"
PROTOCOL = 1

__all__ = ["task", "uneventful", "before_task", "after_task", "main", "PROTOCOL", "__version__"]

# Every @task function, in decoration order, as (name, function). Names are checked for duplicates
# only in main(): a web app that imports the task modules to call the functions directly never runs
# main(), and should not fail on a clash that matters only to the worker.
_registered = []

# What runs around every task, in registration order: functions of (task_id, task_name) returning
# a context manager, entered before the task and exited (in reverse order) after it. The framework
# set-up in main() registers first, so user hooks run inside the Flask app context, say.
_around = []

# The answer to a task that returned None: one small line (< PIPE_BUF, so written whole); the id is
# an int, so it is valid JSON. Other return values are results (_result_answer).
_ANSWER_OK = b'{"id": %d, "ok": true}\n'

# A result's JSON may be this long (the daemon fails a longer one; the same limit, checked here
# so that a huge result can never make an answer line over 1 MiB).
_MAX_RESULT_BYTES = 64 * 1024

# Task names whose non-JSON results were already warned about (once per name, not per task).
_warned_results = set()

# The daemon rejects answer lines over 1 MiB as a protocol error. An error text is cut to this many
# characters; json escapes a character to at most 12 bytes, so the line stays under 1 MiB.
_MAX_ERROR_CHARS = 64 * 1024

_USAGE = "usage: python3 -m foreman_worker [--flask-app MODULE:APP] MODULE [MODULE...]"


def task(fn=None, *, name=None):
    """Mark ``fn`` as a foreman task; usable as ``@task`` and ``@task(name="custom.name")``.

    The default name is ``f"{fn.__module__}.{fn.__name__}"``. The function is returned unchanged,
    so it can still be called directly (in tests, or synchronously).
    """
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"@task(name=...) must be a non-empty str, not {name!r}")

    def mark(f):
        if not callable(f):
            raise TypeError(f"@task decorates a function, not {f!r}")
        task_name = name if name is not None else f"{f.__module__}.{f.__name__}"
        _registered.append((task_name, f))
        return f

    if fn is None:
        return mark
    if isinstance(fn, str):
        raise TypeError(f"use @task(name={fn!r}), not @task({fn!r})")
    return mark(fn)


def before_task(fn):
    """Call ``fn(task_id, task_name)`` before each task; usable as a decorator.

    If it raises, the task is not run and fails with the hook's traceback (the after-task hooks
    registered before it still run).
    """

    @contextlib.contextmanager
    def around(task_id, task_name):
        fn(task_id, task_name)
        yield

    _around.append(around)
    return fn


def after_task(fn):
    """Call ``fn(task_id, task_name, error)`` after each task; usable as a decorator.

    ``error`` is the exception the task raised, or None. It runs whether the task succeeded or
    not; if it raises, the task fails with the hook's traceback.
    """

    @contextlib.contextmanager
    def around(task_id, task_name):
        try:
            yield
        except BaseException as exc:
            fn(task_id, task_name, exc)
            raise
        fn(task_id, task_name, None)

    _around.append(around)
    return fn


def _setup_django(settings_module):
    """django.setup(), and Django's connection clean-up around each task."""
    try:
        import django

        django.setup()
        from django.db import close_old_connections
    except KeyboardInterrupt:
        raise
    except BaseException:
        _fail(
            f"cannot set up Django (DJANGO_SETTINGS_MODULE={settings_module}):\n"
            f"{traceback.format_exc().rstrip()}"
        )

    # What Django does on request_started and request_finished: drop connections that broke (a
    # database restart) or outlived CONN_MAX_AGE, so a long-lived worker does not use them.
    @contextlib.contextmanager
    def around(task_id, task_name):
        close_old_connections()
        try:
            yield
        finally:
            close_old_connections()

    _around.append(around)


def _setup_flask(spec):
    """Run each task in the app context of the Flask app (or factory) named MODULE:NAME."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        if name:
            app = getattr(module, name)
        else:  # Flask's own defaults
            app = getattr(module, "create_app", None) or getattr(module, "app")
        if not hasattr(app, "app_context"):
            app = app()  # a factory
    except KeyboardInterrupt:
        raise
    except BaseException:
        _fail(f"cannot load the Flask app {spec!r}:\n{traceback.format_exc().rstrip()}")
    if not hasattr(app, "app_context"):
        _fail(f"--flask-app {spec!r} names no Flask app, nor a factory returning one: {app!r:.200}")
    _around.append(lambda task_id, task_name: app.app_context())


class _Uneventful:
    """A task's return value that says "uneventful" to an adaptive schedule, with a result."""

    __slots__ = ("result",)

    def __init__(self, result):
        self.result = result


def uneventful(result=None):
    """Return this from a task to say that its run found nothing new (for an adaptive schedule),
    with ``result`` as its result: ``return uneventful({"checked": 12})``."""
    return _Uneventful(result)


def _result_answer(task_id, task_name, result):
    """The answer line of a task that returned ``result`` (not None): the result, and for a bool
    or ``uneventful(...)`` the "eventful" key."""
    line = '{"id": %d, "ok": true' % task_id
    if type(result) is _Uneventful:
        line += ', "eventful": false'
        result = result.result
    elif result is True:  # `is`, not ==: 1, 0 or a numpy bool say nothing about eventfulness
        line += ', "eventful": true'
    elif result is False:
        line += ', "eventful": false'
    if result is not None:
        try:
            encoded = json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as exc:
            if task_name not in _warned_results:
                _warned_results.add(task_name)
                sys.stderr.write(
                    f"foreman_worker: task {task_name}: its return value is not JSON-serialisable "
                    f"({exc}); it is not kept as the result (warned once per task name)\n"
                )
                sys.stderr.flush()
        else:
            if len(encoded) > _MAX_RESULT_BYTES:
                return _error_line(
                    task_id,
                    f"the task's result is {len(encoded)} bytes of JSON, over the limit of "
                    f"{_MAX_RESULT_BYTES}: store large results elsewhere and return where they are",
                )
            line += ', "result": ' + encoded
    return (line + "}\n").encode()


def _describe(fn):
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _collect_tasks(module_names):
    """Map task name -> function for everything registered, or exit 1 on a duplicate name."""
    registered = list(_registered)
    # With the sys.modules alias in main() there is one registry. Should a second copy of this
    # module have been imported anyway (before the alias existed), take its tasks too.
    other = sys.modules.get("foreman_worker")
    if other is not None and other is not sys.modules[__name__]:
        registered += getattr(other, "_registered", [])
    tasks = {}
    for task_name, fn in registered:
        known = tasks.get(task_name)
        if known is not None and known is not fn:
            _fail(
                f"duplicate task name {task_name!r}: {_describe(known)} and {_describe(fn)}; "
                "give one of them @task(name=...)"
            )
        tasks[task_name] = fn
    if not tasks:
        _fail(f"no @task functions found in {', '.join(module_names)}")
    return tasks


def _collect_around():
    """Every hook registered, by this module or by a second copy of it (see _collect_tasks)."""
    other = sys.modules.get("foreman_worker")
    if other is not None and other is not sys.modules[__name__]:
        return _around + getattr(other, "_around", [])
    return list(_around)


def _fail(message):
    sys.stderr.write(f"foreman_worker: {message}\n")
    sys.stderr.flush()
    sys.exit(1)


def _write_all(fd, data):
    # A blocking pipe write can come back short when a signal interrupts it part way.
    while data:
        data = data[os.write(fd, data):]


def _error_line(task_id, error):
    if len(error) > _MAX_ERROR_CHARS:
        head = _MAX_ERROR_CHARS // 4
        tail = _MAX_ERROR_CHARS - head
        cut = len(error) - head - tail
        error = f"{error[:head]}\n[... {cut} characters cut ...]\n{error[-tail:]}"
    # ensure_ascii (the default) keeps the line valid UTF-8 even for lone surrogates in the text.
    return (json.dumps({"id": task_id, "ok": False, "error": error}) + "\n").encode()


def _serve(tasks, around, proto_in, proto_out):
    """Answer task lines until EOF. Hot path: no logging, no allocation beyond what a task needs."""
    readline = proto_in.readline
    loads = json.loads
    write = os.write
    format_exception = traceback.format_exception
    served = ", ".join(sorted(tasks))

    while True:
        line = readline()
        if not line:
            return 0  # EOF: the daemon closed our stdin, so it wants us gone.
        try:
            msg = loads(line)
            task_id = msg["id"]
            if type(task_id) is not int:
                raise TypeError(f"id is {task_id!r}, not an integer")
        except Exception as exc:
            # Without a usable id there is no way to answer; the daemon never sends this.
            _fail(f"malformed task line from the daemon ({exc!r}): {line[:200]!r}")

        task_name = msg.get("task_name")
        args = msg.get("args", [])
        kwargs = msg.get("kwargs", {})
        fn = tasks.get(task_name) if type(task_name) is str else None
        if fn is None:
            error = f"unknown task {task_name} (this worker serves: {served})"
        elif type(args) is not list:
            error = f"args must be a JSON array, got {type(args).__name__}: {args!r:.200}"
        elif type(kwargs) is not dict:
            error = f"kwargs must be a JSON object, got {type(kwargs).__name__}: {kwargs!r:.200}"
        else:
            try:
                if around:
                    result = _call_within(around, task_id, task_name, fn, args, kwargs)
                else:
                    result = fn(*args, **kwargs)
                    if result is not None and isinstance(result, types.CoroutineType):
                        # An `async def` task: calling it only made the coroutine, so run it.
                        result = _run_coroutine(result)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # SystemExit too: a failed task, not a dead worker
                lines = format_exception(type(exc), exc, _user_frames(exc.__traceback__))
                error = "".join(lines).rstrip("\n")
            else:
                # The common case, no result, costs no encoding.
                if result is None:
                    write(proto_out, _ANSWER_OK % task_id)
                else:
                    _write_all(proto_out, _result_answer(task_id, task_name, result))
                continue
        _write_all(proto_out, _error_line(task_id, error))


def _call_within(around, task_id, task_name, fn, args, kwargs):
    # ExitStack exits exactly what was entered, in reverse, even when a hook raises half way.
    with contextlib.ExitStack() as stack:
        for enter in around:
            stack.enter_context(enter(task_id, task_name))
        result = fn(*args, **kwargs)
        if result is not None and isinstance(result, types.CoroutineType):
            result = _run_coroutine(result)
        return result


def _user_frames(tb):
    """The traceback from the first frame that is not this module's or contextlib's: the task's
    or the hook's. The worker's own frames would only be noise."""
    own = (__file__, contextlib.__file__)
    while tb.tb_next is not None and tb.tb_frame.f_code.co_filename in own:
        tb = tb.tb_next
    return tb


def _run_coroutine(coroutine):
    import asyncio  # only async tasks pay for the import

    return asyncio.run(coroutine)


def main(argv=None):
    """Run as ``python3 -m foreman_worker [--flask-app MODULE:APP] MODULE...``; returns 0 or 1."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] in (["-h"], ["--help"]):
        sys.stderr.write(f"{_USAGE}\n\n{_HELP}\n")
        return 0
    flask_app, module_names = _parse_args(args)

    # Keep the protocol streams for ourselves before any user code runs. stdout: a print() in a
    # task, or C code writing to fd 1, would corrupt the protocol, so fd 1 becomes a copy of
    # stderr (the daemon logs stderr). stdin: a task reading stdin would eat task lines, so fd 0
    # becomes /dev/null. The daemon's EOF still reaches us, since it holds the only write end.
    proto_out = os.dup(1)
    proto_in = os.fdopen(os.dup(0), "rb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)

    # THE -m PITFALL: under `python3 -m foreman_worker` this module is __main__, and a task module
    # doing `from foreman_worker import task` would import a second copy with its own registry.
    # Make that import find this very module instead.
    if __name__ == "__main__":
        sys.modules.setdefault("foreman_worker", sys.modules[__name__])
    # `python3 -m` puts the working directory on sys.path; `python3 path/to/foreman_worker.py`
    # puts this file's directory there instead. Behave the same either way.
    # (Unless -P / PYTHONSAFEPATH asked for no such entry.)
    cwd = os.getcwd()
    if not getattr(sys.flags, "safe_path", False) and cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)

    # Frameworks first: task modules import models, which need a set-up Django.
    django_settings = os.environ.get("DJANGO_SETTINGS_MODULE")
    if django_settings:
        _setup_django(django_settings)
    if flask_app is not None:
        _setup_flask(flask_app)

    for module_name in module_names:
        try:
            importlib.import_module(module_name)
        except KeyboardInterrupt:
            raise
        except BaseException:
            _fail(f"cannot import module {module_name!r}:\n{traceback.format_exc().rstrip()}")
    tasks = _collect_tasks(module_names)

    hello = {
        "protocol": PROTOCOL,
        "tasks": sorted(tasks),
        "worker": f"foreman_worker.py/{__version__}",
    }
    _write_all(proto_out, (json.dumps(hello) + "\n").encode())
    return _serve(tasks, _collect_around(), proto_in, proto_out)


_HELP = """Serve the @task functions of MODULEs to a foreman pool.

With DJANGO_SETTINGS_MODULE set, Django is set up before the MODULEs are imported, and
close_old_connections() runs before and after each task.

  --flask-app MODULE:APP  run each task in the app context of this Flask app, or of the app
                          this factory returns (default name: create_app, else app)"""


def _parse_args(args):
    """(the --flask-app value or None, the module names); exits 1 on a usage error."""
    flask_app, modules = None, []
    args = iter(args)
    for arg in args:
        if arg == "--flask-app":
            flask_app = next(args, None)
            if not flask_app:
                _fail(f"--flask-app needs a value, e.g. --flask-app myapp:create_app\n{_USAGE}")
        elif arg.startswith("--flask-app="):
            flask_app = arg.partition("=")[2]
        elif arg.startswith("-"):
            _fail(f"unknown option {arg!r}\n{_USAGE}")
        else:
            modules.append(arg)
    if not modules:
        _fail(f"no module given\n{_USAGE}")
    return flask_app, modules


if __name__ == "__main__":
    sys.exit(main())
