"""What the example apps' end-to-end tests share: the real `foreman` daemon, a throwaway
PostgreSQL cluster, a WSGI app served on loopback, and waits with deadlines (never bare sleeps).

Environment: FOREMAN_BIN (default: target/debug/foreman), FOREMAN_PY_TESTS=required to fail
instead of skipping when something is missing, FOREMAN_PG_BIN (default: the newest
/usr/lib/postgresql/*/bin).
"""

import glob
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, make_server

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIENT_DIR = os.path.join(REPO, "clients", "python")
FOREMAN_BIN = os.environ.get("FOREMAN_BIN") or os.path.join(REPO, "target", "debug", "foreman")
# Generous for a slow, shared CI machine; a passing test never waits this long.
PATIENCE = 60.0


def require(condition, what):
    """Skip the test unless condition holds; with FOREMAN_PY_TESTS=required, fail instead."""
    if condition:
        return
    if os.environ.get("FOREMAN_PY_TESTS") == "required":
        raise AssertionError(f"{what} (FOREMAN_PY_TESTS=required)")
    raise unittest.SkipTest(what)


def wait_until(check, what, timeout=PATIENCE):
    """Polls check() until it returns a true value, which is returned; fails after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def run(args, **kwargs):
    """Runs a command to completion; fails with its output unless it exits 0."""
    done = subprocess.run(
        args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, **kwargs
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done


class Foreman:
    """`foreman run --config CONFIG` in directory cwd (the examples' tests start it elsewhere than
    the app: their pools find the app through `cwd`), on a database of its own in tmp."""

    def __init__(self, tmp, config, cwd, env=None):
        require(os.access(FOREMAN_BIN, os.X_OK), f"no foreman binary at {FOREMAN_BIN}")
        self.db = os.path.join(tmp, "foreman.sqlite3")
        self.log_path = os.path.join(tmp, "foreman.log")
        # Nothing of the caller's foreman or Sentry settings (as in tests/it/support.rs).
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("FOREMAN_", "SENTRY_")) and k not in ("RUST_LOG", "JOURNAL_STREAM")
        }
        self.env.update(env or {})
        self.env["FOREMAN_DB"] = self.db
        # The pools' `python3` is this test's (a virtualenv's), and they import the client from
        # the repository rather than from an install.
        self.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + self.env["PATH"]
        self.env["PYTHONPATH"] = CLIENT_DIR
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [FOREMAN_BIN, "run", "--config", config],
                cwd=cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(lambda: self.proc.poll() is not None or self.healthy(), "foreman health")
        if self.proc.poll() is not None:
            raise AssertionError(f"foreman exited {self.proc.returncode}:\n{self.log()}")

    def cli(self, *args):
        return subprocess.run(
            [FOREMAN_BIN, "--db", self.db, *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def healthy(self):
        return self.cli("health").returncode == 0

    def log(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def runs(self, task_name):
        """(state, error) of every attempt of task_name, from the history table."""
        db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            sql = "SELECT state, error FROM foreman_run WHERE task_name = ? ORDER BY task_id"
            return db.execute(sql, (task_name,)).fetchall()
        finally:
            db.close()

    def assert_no_failed_run(self, task_name):
        failed = [run for run in self.runs(task_name) if run[0] not in ("running", "done")]
        if failed:
            raise AssertionError(f"{task_name} failed: {failed}\nforeman log:\n{self.log()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(PATIENCE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Postgres:
    """A throwaway PostgreSQL cluster in root: trust auth, fsync off, no TCP (a private socket
    directory), as the postgres user when we are root. The env() variables point libpq at it."""

    PORT = "5432"  # only names the socket file in our own directory: no clash with anything

    def __init__(self, root):
        bindir = os.environ.get("FOREMAN_PG_BIN") or _newest_pg_bindir()
        require(bindir and os.path.exists(os.path.join(bindir, "initdb")), "no PostgreSQL server")
        self.bin = bindir
        self.data = os.path.join(root, "pgdata")
        self.socket_dir = os.path.join(root, "pgsocket")
        self.log_path = os.path.join(root, "postgres.log")
        self.as_postgres = []
        os.chmod(root, 0o755)  # the server's user must reach its directories
        os.mkdir(self.data, 0o700)
        os.mkdir(self.socket_dir, 0o700)
        open(self.log_path, "w").close()
        if os.geteuid() == 0:
            self.as_postgres = ["runuser", "-u", "postgres", "--"]
            for path in (self.data, self.socket_dir, self.log_path):
                shutil.chown(path, "postgres", "postgres")
        self._pg("initdb", "-D", self.data, "-A", "trust", "-U", "foreman", "-E", "UTF8",
                 "--no-sync")
        self.start()
        self._pg("createdb", "-h", self.socket_dir, "-p", self.PORT, "-U", "foreman", "example")

    def env(self):
        return {"PGHOST": self.socket_dir, "PGPORT": self.PORT, "PGUSER": "foreman",
                "PGDATABASE": "example"}

    def _pg(self, program, *args):
        return run([*self.as_postgres, os.path.join(self.bin, program), *args])

    def _ctl(self, *args):
        options = f"-F -k {self.socket_dir} -p {self.PORT} -c listen_addresses=''"
        self._pg("pg_ctl", "-D", self.data, "-l", self.log_path, "-w", "-t", "60", "-o", options,
                 *args)

    def start(self):
        self._ctl("start")

    def restart(self):
        """A fast restart: every backend is ended, so every client connection breaks."""
        self._ctl("-m", "fast", "restart")

    def stop(self):
        self._ctl("-m", "immediate", "stop")


def _newest_pg_bindir():
    found = glob.glob("/usr/lib/postgresql/*/bin")
    return max(found, key=lambda d: int(d.split("/")[-2])) if found else None


class Server:
    """A WSGI app served on 127.0.0.1 by a thread of this process: the web app of the example."""

    def __init__(self, app):
        class Quiet(WSGIRequestHandler):
            def log_message(self, *args):
                pass

        self.httpd = make_server("127.0.0.1", 0, app, handler_class=Quiet)
        self.base = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def post(self, path, **form):
        data = urllib.parse.urlencode(form).encode()
        return self._request(urllib.request.Request(self.base + path, data=data))

    def get(self, path):
        return self._request(urllib.request.Request(self.base + path))

    # No proxy from the environment may take requests to 127.0.0.1 elsewhere.
    _opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _request(self, req):
        """(status, decoded JSON body)."""
        try:
            with self._opener.open(req, timeout=PATIENCE) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode("utf-8", "replace")

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
