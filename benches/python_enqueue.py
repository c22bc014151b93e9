#!/usr/bin/env python3
"""Measure the Python producer (clients/python/foreman_client.py). Run by hand:

    python3 benches/python_enqueue.py [--rows N]

(a) Client.enqueue, one task per transaction plus the wakeup check, N rows (default 20,000);
(b) Client.enqueue_many of 10,000 rows in one transaction.
Each runs 5 times on a fresh database made from schema.sql in WAL mode, as the daemon leaves it.
No daemon runs, so the wakeup file is created once and then only stat()ed: with a daemon consuming
it, some enqueues also pay for creating it again. Prints a table, then one JSON line.
"""

import argparse
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))

from foreman_client import Client  # noqa: E402

REPETITIONS = 5
MANY_ROWS = 10_000


def fresh_db(directory, run):
    """A database as `foreman run` leaves it: schema.sql applied, WAL mode, wakeup dir present."""
    path = os.path.join(directory, f"run{run}.sqlite3")
    with open(os.path.join(ROOT, "schema.sql"), encoding="utf-8") as f:
        schema = f.read()
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(schema)
    db.close()
    os.mkdir(path + ".wakeup", 0o700)
    return path


def measure(directory, rows, run_once):
    """rows/s of each repetition, each on a new database."""
    rates = []
    for run in range(REPETITIONS):
        path = fresh_db(directory, f"{run_once.__name__}{run}")
        with Client(path) as client:
            start = time.perf_counter()
            run_once(client, rows)
            elapsed = time.perf_counter() - start
            count = client._conn.execute("SELECT count(*) FROM foreman_task").fetchone()[0]
        assert count == rows, (count, rows)
        rates.append(rows / elapsed)
    return rates


def enqueue(client, rows):
    for i in range(rows):
        client.enqueue("bench.noop", i)


def enqueue_many(client, rows):
    client.enqueue_many([("bench.noop",)] * rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows for the enqueue() case")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="foreman-bench-") as directory:
        results = [
            ("enqueue (1 row/txn)", options.rows, measure(directory, options.rows, enqueue)),
            ("enqueue_many", MANY_ROWS, measure(directory, MANY_ROWS, enqueue_many)),
        ]

    print(
        f"python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'case':<22} {'rows':>7} {'median rows/s':>14} {'min-max rows/s':>22}")
    for case, rows, rates in results:
        span = f"{min(rates):,.0f}-{max(rates):,.0f}"
        print(f"{case:<22} {rows:>7} {statistics.median(rates):>14,.0f} {span:>22}")
    print(
        json.dumps(
            {
                "bench": "python_enqueue",
                "enqueue_per_s": round(statistics.median(results[0][2])),
                "enqueue_many_per_s": round(statistics.median(results[1][2])),
            },
            separators=(",", ":"),
        )
    )


if __name__ == "__main__":
    main()
