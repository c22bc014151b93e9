"""foreman as a peer of the shared harness (../shared/bench/peers, see its README.md).

    PEERS_HARNESS=../shared/bench/peers python3 bench/peers_run.py OUT_DIR bench/peers_foreman.py [--reps 3]

(bench/run_peers.sh runs it with the three other peers; bench/peers_run.py keeps the result JSON
out of the read-only harness and fails unless every id ran exactly once.)

Consumer: `target/release/foreman run` with a `[pools.bench]` of 4 Python processes
(`python -m foreman_worker benchtasks`, bench/peers_foreman/benchtasks.py) and `workers = 4`,
matching the peers' 4 workers. Producer: the stdlib client, `Client(db).enqueue(name, i)`: one
INSERT in its own transaction, then the wakeup file, as snappea's `delay()` does.
Stdlib only: runs with any python3 (the same one starts the pool's workers).

BENCH_FOREMAN_PIPELINE=1 gives the pool `pipeline = true` (each process has its next task written
while it runs one; docs/guide/delivery.md); the result's settings say so. Give such a run a --tag.
"""
import os
import sqlite3
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.abspath(os.environ.get("PEERS_HARNESS", os.path.join(REPO, "..", "shared", "bench", "peers")))
sys.path.insert(0, HARNESS)
import common  # noqa: E402  (the harness's driver, never a copy)

CLIENT_DIR = os.path.join(REPO, "clients", "python")
APP_DIR = os.path.join(REPO, "bench", "peers_foreman")
TASK_NAME = "benchtasks.record"
WORKERS = 4
PIPELINE = os.environ.get("BENCH_FOREMAN_PIPELINE") == "1"


def foreman_bin():
    return os.environ.get("BENCH_FOREMAN_BIN", os.path.join(REPO, "target", "release", "foreman"))


class Peer(common.BasePeer):
    name = "foreman"

    def versions(self):
        version = subprocess.run([foreman_bin(), "--version"], capture_output=True, text=True, check=True)
        commit = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                                capture_output=True, text=True)
        sys.path.insert(0, CLIENT_DIR)
        import foreman_client
        import foreman_worker
        return {"foreman": version.stdout.strip(), "commit": commit.stdout.strip() or "unknown",
                "foreman_client": foreman_client.__version__, "foreman_worker": foreman_worker.__version__,
                "python": sys.version.split()[0], "sqlite": sqlite3.sqlite_version}

    def settings(self):
        return {"consumer": "foreman run (release build), workers = %d, [pools.bench] processes = %d%s: "
                            "%s -m foreman_worker benchtasks"
                            % (WORKERS, WORKERS, ", pipeline = true" if PIPELINE else "", sys.executable),
                "config": "defaults otherwise: tick 1 s, history of every attempt in foreman_run, "
                          "log level info (no line per task)",
                "db": "WAL (set by foreman init/run); the daemon deletes a row in the transaction that pops it",
                "producer": "foreman_client.Client(db).enqueue('%s', i): autocommit INSERT, synchronous=NORMAL, "
                            "then the wakeup file if absent" % TASK_NAME,
                "wakeup": "inotify on the wakeup dir; fallback tick 1 s"}

    def fresh(self, rundir):
        db = os.path.join(rundir, "foreman.sqlite3")
        # The producer enqueues before the consumer first starts (drain run): create the DB now.
        init = subprocess.run([foreman_bin(), "init", "--db", db], capture_output=True, text=True)
        if init.returncode != 0:
            raise RuntimeError("foreman init failed (exit %d): %s" % (init.returncode, init.stderr.strip()))
        config = os.path.join(rundir, "foreman.toml")
        with open(config, "w") as f:
            f.write("workers = %d\n\n[pools.bench]\ncommand = [%s, \"-m\", \"foreman_worker\", \"benchtasks\"]\n"
                    "processes = %d\npipeline = %s\n"
                    % (WORKERS, _toml_str(sys.executable), WORKERS, "true" if PIPELINE else "false"))
        return {"BENCH_FOREMAN_DB": db, "BENCH_FOREMAN_CONFIG": config, "BENCH_CWD": rundir,
                "PYTHONPATH": os.pathsep.join([CLIENT_DIR, APP_DIR, HARNESS])}

    def consumer_argvs(self, env):
        # Flags win over FOREMAN_* variables a caller may have set, so the run uses this DB.
        return [[foreman_bin(), "run", "--config", env["BENCH_FOREMAN_CONFIG"], "--db", env["BENCH_FOREMAN_DB"],
                 "--workers", str(WORKERS), "--log-level", "info"]]

    def queue_left(self, env):
        con = sqlite3.connect(env["BENCH_FOREMAN_DB"], timeout=5)
        try:
            return con.execute("select count(*) from foreman_task").fetchone()[0]
        finally:
            con.close()

    def producer_setup(self):
        from foreman_client import Client
        self.client = Client(os.environ["BENCH_FOREMAN_DB"])

    def enqueue(self, i):
        self.client.enqueue(TASK_NAME, i)


def _toml_str(s):
    return '"%s"' % s.replace("\\", "\\\\").replace('"', '\\"')


if __name__ == "__main__":
    common.main(Peer)
