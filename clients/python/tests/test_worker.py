"""foreman_worker.py: the worker protocol, spoken over pipes to `python3 -m foreman_worker`.

No daemon needed: each test starts the worker as the daemon would and plays the daemon's part.
Every read has a deadline, so a broken worker fails the test instead of hanging the run.
"""

import json
import os
import select
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest

CLIENT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, CLIENT_DIR)

import foreman_worker  # noqa: E402

TIMEOUT = 10.0  # seconds; generous for a slow CI machine, only reached when something is broken

# Task modules, written to a temp dir that is put on the worker's PYTHONPATH.
MODULES = {
    # `import foreman_worker` style.
    "tasks_plain": """
        import foreman_worker

        @foreman_worker.task
        def add(a, b):
            if a + b != 3:
                raise ValueError(f"expected 3, got {a + b}")
    """,
    # `from foreman_worker import task` style, both decorator forms, and misbehaving tasks.
    "tasks_from": """
        import os
        import sys
        from foreman_worker import task

        @task(name="custom.name")
        def custom(*args, **kwargs):
            pass

        @task
        def boom(message):
            raise RuntimeError(message)

        @task
        def noisy():
            print("printed by a task")
            sys.stdout.write("written to sys.stdout\\n")
            os.write(1, b"written to fd 1\\n")

        @task
        def exits():
            sys.exit(3)

        @task
        def reads_stdin():
            sys.stdin.read()

        @task
        async def coroutine(path):
            open(path, "w").close()
    """,
    # Tasks reporting (or not) whether they found something new, for adaptive schedules.
    "tasks_eventful": """
        import foreman_worker
        from foreman_worker import task

        @task
        def found(new):
            return new

        @task
        async def found_async(new):
            return new

        @task
        def quiet(result):
            return foreman_worker.uneventful(result)
    """,
    # Tasks returning results.
    "tasks_results": """
        from foreman_worker import task

        @task
        def give(value):
            return value

        @task
        def opaque():
            return object()

        @task
        def huge(size):
            return "x" * size
    """,
    # Hooks around each task, logged to a file of the worker's own (hooks-PID.log beside this
    # module), written before the answer, so the test reads it as soon as the answer is in.
    "tasks_hooks": """
        import os
        from foreman_worker import task, before_task, after_task

        LOG = os.path.join(os.path.dirname(__file__), "hooks-%d.log" % os.getpid())

        def log(*words):
            with open(LOG, "a") as f:
                f.write(" ".join(map(str, words)) + "\\n")

        @before_task
        def first(task_id, task_name):
            log("first", task_id, task_name)

        @after_task
        def done(task_id, task_name, error):
            log("done", task_id, task_name, repr(error))

        @before_task
        def guard(task_id, task_name):
            if task_name == "tasks_hooks.guarded":
                raise PermissionError("guard says no")

        @after_task
        def strict(task_id, task_name, error):
            if task_name == "tasks_hooks.spoiled":
                raise ValueError("after-task hook failed")

        @task
        def work(tag):
            log("task", tag)

        @task
        def fails():
            raise RuntimeError("task failed")

        @task
        def guarded():
            log("task", "guarded")

        @task
        def spoiled():
            log("task", "spoiled")
    """,
    # A stand-in for a Flask app and its factory: app_context() is all the worker uses. The real
    # Flask is exercised by examples/flask_app's end-to-end test.
    "fake_flask": """
        import os

        LOG = os.path.join(os.path.dirname(__file__), "flask-%d.log" % os.getpid())
        CURRENT = []

        class Context:
            def __enter__(self):
                CURRENT.append(self)
                return self

            def __exit__(self, *exc):
                CURRENT.remove(self)

        class App:
            def app_context(self):
                return Context()

        app = App()
        factory_calls = []

        def create_app():
            factory_calls.append(1)
            return App()

        def not_an_app():
            return 42
    """,
    "tasks_flask": """
        import fake_flask
        from foreman_worker import task, before_task

        @before_task
        def inside(task_id, task_name):
            assert fake_flask.CURRENT, "user hooks run inside the app context"

        @task
        def in_context():
            assert len(fake_flask.CURRENT) == 1, fake_flask.CURRENT
            assert fake_flask.factory_calls == [1], fake_flask.factory_calls
    """,
    "tasks_broken": """
        import foreman_worker
        import no_such_module_for_foreman_tests
    """,
    "tasks_none": """
        def not_a_task():
            pass
    """,
    "tasks_dup_a": """
        from foreman_worker import task

        @task(name="same")
        def a():
            pass
    """,
    "tasks_dup_b": """
        from foreman_worker import task

        @task(name="same")
        def b():
            pass
    """,
}


class Worker:
    """A `python3 -m foreman_worker MODULES...` process and the daemon's end of its pipes."""

    def __init__(self, modules_dir, *modules, env=None):
        env = {**os.environ, **(env or {})}
        if env.get("DJANGO_SETTINGS_MODULE") == "":  # a test's way to say: not this one
            del env["DJANGO_SETTINGS_MODULE"]
        env["PYTHONPATH"] = os.pathsep.join([CLIENT_DIR, modules_dir])
        env["FOREMAN_POOL"] = "py"
        env["FOREMAN_PROTOCOL"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "foreman_worker", *modules],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=modules_dir,
            env=env,
        )
        self._stdout = b""
        # Drain stderr in the background so that a chatty worker cannot block on a full pipe.
        self._stderr = []
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()

    def _drain_stderr(self):
        for chunk in iter(lambda: self.proc.stderr.read1(65536), b""):
            self._stderr.append(chunk)

    def stderr(self):
        """Everything the worker wrote to stderr; waits for EOF once the process has exited."""
        if self.proc.poll() is not None:
            self._stderr_thread.join(TIMEOUT)
        return b"".join(self._stderr).decode("utf-8", "replace")

    def send(self, message):
        line = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        self.proc.stdin.write(line)
        self.proc.stdin.flush()

    def readline(self, timeout=TIMEOUT):
        """The next stdout line (without the newline), or None at EOF; fails after timeout."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._stdout:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise AssertionError(
                    f"no line from the worker in {timeout}s; stderr:\n{self.stderr()}"
                )
            chunk = os.read(fd, 65536)
            if not chunk:
                if self._stdout:
                    raise AssertionError(f"unterminated last line {self._stdout!r}")
                return None
            self._stdout += chunk
        line, self._stdout = self._stdout.split(b"\n", 1)
        return line

    def read_json(self):
        line = self.readline()
        if line is None:
            raise AssertionError(f"worker closed stdout; stderr:\n{self.stderr()}")
        return json.loads(line)

    def run(self, task_id, task_name, args=(), kwargs=None):
        self.send(
            {"id": task_id, "task_name": task_name, "args": list(args), "kwargs": kwargs or {}}
        )
        return self.read_json()

    def close_stdin(self):
        self.proc.stdin.close()

    def wait(self):
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker did not exit in {TIMEOUT}s; stderr:\n{self.stderr()}"
            ) from None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        self._stderr_thread.join(TIMEOUT)


class WorkerTestCase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory(prefix="foreman-worker-test-")
        cls.modules_dir = cls._tmp.name
        for name, source in MODULES.items():
            with open(os.path.join(cls.modules_dir, name + ".py"), "w", encoding="utf-8") as f:
                f.write(textwrap.dedent(source))

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def start(self, *modules, env=None):
        # Whatever the caller's environment says, no Django unless a test asks for it.
        env = {"DJANGO_SETTINGS_MODULE": "", **(env or {})}
        worker = Worker(self.modules_dir, *modules, env=env)
        self.addCleanup(worker.kill)
        return worker

    def start_serving(self, *modules):
        """A worker that has said hello; the hello is checked for the protocol version."""
        worker = self.start(*modules)
        hello = worker.read_json()
        self.assertEqual(hello["protocol"], 1)
        return worker

    def assert_exits_before_hello(self, worker, stderr_contains):
        """The worker must exit 1 with a message on stderr and nothing at all on stdout."""
        self.assertIsNone(worker.readline(), "expected no hello")
        self.assertEqual(worker.wait(), 1)
        self.assertIn(stderr_contains, worker.stderr())


class HelloTest(WorkerTestCase):
    def test_hello_lists_tasks_of_both_import_styles_under_dash_m(self):
        worker = self.start("tasks_plain", "tasks_from")
        hello = worker.read_json()
        self.assertEqual(hello["protocol"], 1)
        self.assertEqual(
            hello["tasks"],
            [
                "custom.name",
                "tasks_from.boom",
                "tasks_from.coroutine",
                "tasks_from.exits",
                "tasks_from.noisy",
                "tasks_from.reads_stdin",
                "tasks_plain.add",
            ],
        )
        self.assertTrue(hello["worker"].startswith("foreman_worker.py/"))

    def test_hello_with_a_from_import_module_alone(self):
        worker = self.start_serving("tasks_from")
        self.assertEqual(worker.run(1, "custom.name"), {"id": 1, "ok": True})

    def test_import_error_exits_1_with_traceback_and_no_hello(self):
        worker = self.start("tasks_plain", "tasks_broken")
        self.assert_exits_before_hello(worker, "cannot import module 'tasks_broken'")
        stderr = worker.stderr()
        self.assertIn("Traceback (most recent call last)", stderr)
        self.assertIn("No module named 'no_such_module_for_foreman_tests'", stderr)

    def test_no_module_given_exits_1(self):
        worker = self.start()
        self.assert_exits_before_hello(worker, "no module given")

    def test_no_tasks_found_exits_1(self):
        worker = self.start("tasks_none")
        self.assert_exits_before_hello(worker, "no @task functions found in tasks_none")

    def test_duplicate_task_names_exit_1(self):
        worker = self.start("tasks_dup_a", "tasks_dup_b")
        self.assert_exits_before_hello(worker, "duplicate task name 'same'")
        self.assertIn("tasks_dup_a.a and tasks_dup_b.b", worker.stderr())


class ServeTest(WorkerTestCase):
    def test_ok_answer(self):
        worker = self.start_serving("tasks_plain")
        self.assertEqual(worker.run(42, "tasks_plain.add", [1], {"b": 2}), {"id": 42, "ok": True})
        self.assertEqual(worker.run(43, "tasks_plain.add", [2, 1]), {"id": 43, "ok": True})

    def test_answer_line_is_exactly_the_documented_one(self):
        worker = self.start_serving("tasks_plain")
        worker.send({"id": 7, "task_name": "tasks_plain.add", "args": [1, 2], "kwargs": {}})
        self.assertEqual(worker.readline(), b'{"id": 7, "ok": true}')

    def test_unknown_keys_in_the_task_line_are_ignored(self):
        worker = self.start_serving("tasks_plain")
        worker.send(
            {"id": 8, "task_name": "tasks_plain.add", "args": [1, 2], "kwargs": {}, "attempt": 1}
        )
        self.assertEqual(worker.read_json(), {"id": 8, "ok": True})

    def test_exception_is_a_failure_with_the_traceback(self):
        worker = self.start_serving("tasks_from", "tasks_plain")
        answer = worker.run(5, "tasks_from.boom", ["the sky fell"])
        self.assertEqual((answer["id"], answer["ok"]), (5, False))
        self.assertTrue(answer["error"].startswith("Traceback (most recent call last):"))
        self.assertTrue(answer["error"].endswith("RuntimeError: the sky fell"), answer["error"])
        self.assertIn("in boom\n    raise RuntimeError(message)", answer["error"])
        self.assertNotIn("foreman_worker.py", answer["error"])  # starts in the task, not the loop
        answer = worker.run(6, "tasks_plain.add", [5, 5])
        self.assertIn("ValueError: expected 3, got 10", answer["error"])
        self.assertEqual(worker.run(7, "tasks_plain.add", [1, 2]), {"id": 7, "ok": True})

    def test_huge_error_is_cut_below_the_line_limit(self):
        worker = self.start_serving("tasks_from")
        huge = "\u00e9" * 2_000_000  # escaped by json to 12 MB
        worker.send({"id": 1, "task_name": "tasks_from.boom", "args": [huge], "kwargs": {}})
        line = worker.readline()
        self.assertLess(len(line), 1 << 20)
        answer = json.loads(line)
        self.assertFalse(answer["ok"])
        self.assertIn("characters cut", answer["error"])
        self.assertTrue(answer["error"].endswith("\u00e9"))

    def test_print_in_a_task_goes_to_stderr_not_the_protocol(self):
        worker = self.start_serving("tasks_from")
        self.assertEqual(worker.run(1, "tasks_from.noisy"), {"id": 1, "ok": True})
        self.assertEqual(worker.run(2, "custom.name"), {"id": 2, "ok": True})
        worker.close_stdin()
        self.assertIsNone(worker.readline())
        self.assertEqual(worker.wait(), 0)
        stderr = worker.stderr()
        for text in ("printed by a task", "written to sys.stdout", "written to fd 1"):
            self.assertIn(text, stderr)

    def test_a_task_reading_stdin_does_not_eat_task_lines(self):
        worker = self.start_serving("tasks_from")
        self.assertEqual(worker.run(1, "tasks_from.reads_stdin"), {"id": 1, "ok": True})
        self.assertEqual(worker.run(2, "custom.name"), {"id": 2, "ok": True})

    def test_system_exit_in_a_task_is_a_failure_and_the_worker_keeps_serving(self):
        worker = self.start_serving("tasks_from")
        answer = worker.run(1, "tasks_from.exits")
        self.assertFalse(answer["ok"])
        self.assertIn("SystemExit: 3", answer["error"])
        self.assertEqual(worker.run(2, "custom.name"), {"id": 2, "ok": True})

    def test_async_task_is_awaited(self):
        worker = self.start_serving("tasks_from")
        path = os.path.join(self.modules_dir, "coroutine-ran")
        self.assertEqual(worker.run(1, "tasks_from.coroutine", [path]), {"id": 1, "ok": True})
        self.assertTrue(os.path.exists(path))

    def test_unknown_task(self):
        worker = self.start_serving("tasks_plain")
        answer = worker.run(9, "nope.missing")
        self.assertEqual(
            answer,
            {
                "id": 9,
                "ok": False,
                "error": "unknown task nope.missing (this worker serves: tasks_plain.add)",
            },
        )

    def test_bad_args_and_kwargs(self):
        worker = self.start_serving("tasks_plain")
        worker.send({"id": 1, "task_name": "tasks_plain.add", "args": {"a": 1}, "kwargs": {}})
        answer = worker.read_json()
        self.assertEqual((answer["id"], answer["ok"]), (1, False))
        self.assertIn("args must be a JSON array", answer["error"])
        worker.send({"id": 2, "task_name": "tasks_plain.add", "args": [], "kwargs": [1]})
        answer = worker.read_json()
        self.assertEqual((answer["id"], answer["ok"]), (2, False))
        self.assertIn("kwargs must be a JSON object", answer["error"])
        # Arguments the function does not take: a TypeError from the call, reported as a failure.
        answer = worker.run(3, "tasks_plain.add", [1, 2, 3])
        self.assertIn("TypeError", answer["error"])
        self.assertEqual(worker.run(4, "tasks_plain.add", [1, 2]), {"id": 4, "ok": True})

    def test_eof_exits_0(self):
        worker = self.start_serving("tasks_plain")
        worker.close_stdin()
        self.assertIsNone(worker.readline())
        self.assertEqual(worker.wait(), 0)

    def test_malformed_task_line_exits_1(self):
        worker = self.start_serving("tasks_plain")
        worker.send(b"this is not json\n")
        self.assertIsNone(worker.readline())
        self.assertEqual(worker.wait(), 1)
        self.assertIn("malformed task line", worker.stderr())

    def test_task_line_without_an_integer_id_exits_1(self):
        worker = self.start_serving("tasks_plain")
        worker.send({"id": "1", "task_name": "tasks_plain.add", "args": [1, 2], "kwargs": {}})
        self.assertIsNone(worker.readline())
        self.assertEqual(worker.wait(), 1)
        self.assertIn("malformed task line", worker.stderr())


class EventfulTest(WorkerTestCase):
    """A task's True/False return value is the answer's "eventful" (and its result); anything
    else leaves "eventful" out."""

    def test_true_false_and_none_give_the_documented_lines(self):
        worker = self.start_serving("tasks_eventful")
        for task_id, value, line in [
            (1, True, b'{"id": 1, "ok": true, "eventful": true, "result": true}'),
            (2, False, b'{"id": 2, "ok": true, "eventful": false, "result": false}'),
            (3, None, b'{"id": 3, "ok": true}'),
        ]:
            with self.subTest(value=value):
                worker.send(
                    {"id": task_id, "task_name": "tasks_eventful.found", "args": [value]}
                )
                self.assertEqual(worker.readline(), line)

    def test_only_the_bools_count(self):
        worker = self.start_serving("tasks_eventful")
        for task_id, value in enumerate([1, 0, "yes", [], {"new": True}, 2.5], start=1):
            with self.subTest(value=value):
                answer = worker.run(task_id, "tasks_eventful.found", [value])
                self.assertEqual(answer, {"id": task_id, "ok": True, "result": value})

    def test_async_tasks_report_it_too(self):
        worker = self.start_serving("tasks_eventful")
        name = "tasks_eventful.found_async"
        self.assertEqual(
            worker.run(1, name, [True]), {"id": 1, "ok": True, "eventful": True, "result": True}
        )
        self.assertEqual(
            worker.run(2, name, [False]),
            {"id": 2, "ok": True, "eventful": False, "result": False},
        )
        self.assertEqual(worker.run(3, name, [None]), {"id": 3, "ok": True})

    def test_uneventful_carries_a_result(self):
        worker = self.start_serving("tasks_eventful")
        answer = worker.run(1, "tasks_eventful.quiet", [{"checked": 12}])
        self.assertEqual(answer, {"id": 1, "ok": True, "eventful": False, "result": {"checked": 12}})

    def test_a_failure_has_no_eventful(self):
        worker = self.start_serving("tasks_eventful")
        answer = worker.run(1, "tasks_eventful.found", [], {"unknown": True})
        self.assertEqual((answer["ok"], "eventful" in answer), (False, False))
        self.assertIn("TypeError", answer["error"])


class HookTest(WorkerTestCase):
    def log(self, worker, name="hooks"):
        path = os.path.join(self.modules_dir, f"{name}-{worker.proc.pid}.log")
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()

    def test_hooks_run_around_each_task_in_order(self):
        worker = self.start_serving("tasks_hooks")
        self.assertEqual(worker.run(1, "tasks_hooks.work", ["a"]), {"id": 1, "ok": True})
        answer = worker.run(2, "tasks_hooks.fails")
        self.assertIn("RuntimeError: task failed", answer["error"])
        self.assertNotIn("foreman_worker.py", answer["error"])
        self.assertEqual(
            self.log(worker),
            [
                "first 1 tasks_hooks.work",
                "task a",
                "done 1 tasks_hooks.work None",
                "first 2 tasks_hooks.fails",
                "done 2 tasks_hooks.fails RuntimeError('task failed')",
            ],
        )

    def test_a_failing_before_hook_fails_the_task_without_running_it(self):
        worker = self.start_serving("tasks_hooks")
        answer = worker.run(1, "tasks_hooks.guarded")
        self.assertFalse(answer["ok"])
        self.assertIn("in guard", answer["error"])
        self.assertIn("PermissionError: guard says no", answer["error"])
        self.assertNotIn("foreman_worker.py", answer["error"])
        # The hooks registered before it ran, and the after-task hook saw the error.
        self.assertEqual(
            self.log(worker),
            [
                "first 1 tasks_hooks.guarded",
                "done 1 tasks_hooks.guarded PermissionError('guard says no')",
            ],
        )
        self.assertEqual(worker.run(2, "tasks_hooks.work", ["b"]), {"id": 2, "ok": True})

    def test_a_failing_after_hook_fails_the_task(self):
        worker = self.start_serving("tasks_hooks")
        answer = worker.run(1, "tasks_hooks.spoiled")
        self.assertFalse(answer["ok"])
        self.assertIn("ValueError: after-task hook failed", answer["error"])
        self.assertIn("task spoiled", self.log(worker))
        self.assertEqual(worker.run(2, "tasks_hooks.work", ["c"]), {"id": 2, "ok": True})

    def test_flask_app_context_around_each_task(self):
        for spec in ("fake_flask:create_app", "fake_flask"):  # the factory, by name and default
            with self.subTest(spec=spec):
                worker = self.start("--flask-app", spec, "tasks_flask")
                self.assertEqual(worker.read_json()["tasks"], ["tasks_flask.in_context"])
                self.assertEqual(worker.run(1, "tasks_flask.in_context"), {"id": 1, "ok": True})
                self.assertEqual(worker.run(2, "tasks_flask.in_context"), {"id": 2, "ok": True})

    def test_a_bad_flask_app_exits_1_before_hello(self):
        for spec, message in [
            ("fake_flask:not_an_app", "names no Flask app, nor a factory returning one: 42"),
            ("fake_flask:missing", "AttributeError"),
            ("no_such_module_for_foreman_tests:app", "cannot load the Flask app"),
        ]:
            with self.subTest(spec=spec):
                worker = self.start(f"--flask-app={spec}", "tasks_plain")
                self.assert_exits_before_hello(worker, message)

    def test_usage_errors_exit_1_before_hello(self):
        for args, message in [
            (["--flask-app"], "--flask-app needs a value"),
            (["--bogus", "tasks_plain"], "unknown option '--bogus'"),
            (["--flask-app", "fake_flask"], "no module given"),
        ]:
            with self.subTest(args=args):
                self.assert_exits_before_hello(self.start(*args), message)

    def test_django_settings_that_cannot_be_set_up_exit_1_before_hello(self):
        settings = "no_such_settings_for_foreman_tests"
        worker = self.start("tasks_plain", env={"DJANGO_SETTINGS_MODULE": settings})
        self.assert_exits_before_hello(
            worker, f"cannot set up Django (DJANGO_SETTINGS_MODULE={settings})"
        )
        self.assertIn("Traceback", worker.stderr())


class ResultTest(WorkerTestCase):
    """A task's return value is the "result" of its answer (docs/worker-protocol.md)."""

    def test_the_return_value_is_the_result(self):
        worker = self.start_serving("tasks_results")
        for task_id, value in enumerate([{"sent": 3}, [1, "two"], "ok", 0, 2.5], start=1):
            with self.subTest(value=value):
                answer = worker.run(task_id, "tasks_results.give", [value])
                self.assertEqual(answer, {"id": task_id, "ok": True, "result": value})

    def test_a_value_that_is_not_json_is_left_out_with_one_warning(self):
        worker = self.start_serving("tasks_results")
        for task_id in (1, 2):
            self.assertEqual(
                worker.run(task_id, "tasks_results.opaque"), {"id": task_id, "ok": True}
            )
        worker.close_stdin()
        self.assertEqual(worker.wait(), 0)
        self.assertEqual(worker.stderr().count("is not JSON-serialisable"), 1, worker.stderr())

    def test_a_result_over_64_kib_fails_the_task(self):
        worker = self.start_serving("tasks_results")
        answer = worker.run(1, "tasks_results.huge", [64 * 1024])
        self.assertEqual(answer["ok"], False)
        self.assertIn("over the limit of 65536", answer["error"])
        # The largest that fits: 64 KiB of JSON, the quotes included.
        answer = worker.run(2, "tasks_results.huge", [64 * 1024 - 2])
        self.assertEqual((answer["ok"], len(answer["result"])), (True, 64 * 1024 - 2))


class DecoratorTest(unittest.TestCase):
    """The decorator in-process: what a web app importing the task modules sees."""

    def setUp(self):
        registered = list(foreman_worker._registered)
        self.addCleanup(setattr, foreman_worker, "_registered", registered)

    def test_returns_the_function_unchanged(self):
        def f(x):
            return x * 2

        self.assertIs(foreman_worker.task(f), f)
        self.assertIs(foreman_worker.task(name="x.y")(f), f)
        self.assertEqual(f(21), 42)

    def test_default_and_custom_names(self):
        @foreman_worker.task
        def g():
            pass

        @foreman_worker.task(name="custom.g")
        def h():
            pass

        names = [name for name, fn in foreman_worker._registered[-2:]]
        self.assertEqual(names, [f"{__name__}.g", "custom.g"])

    def test_bad_names_are_refused(self):
        with self.assertRaises(TypeError):
            foreman_worker.task(name="")
        with self.assertRaisesRegex(TypeError, r"@task\(name='x'\)"):
            foreman_worker.task("x")

    def test_protocol_constants(self):
        self.assertEqual(foreman_worker.PROTOCOL, 1)
        self.assertIsInstance(foreman_worker.__version__, str)


if __name__ == "__main__":
    unittest.main()
