#!/usr/bin/env python3
"""Drains queued rows with one claim shape under pgbench; prints tasks/s and the server's CPU per
drained task, as one JSON line. The numbers in docs/design/postgres-store.md come from here.

    python3 shapes.py DIR                      # writes the shapes as pgbench scripts
    python3 run.py DIR/cycle-4.sql CLIENTS BATCH [--rows N] [--deferred M] [--stats analyzed]

It needs a PostgreSQL cluster with schema-postgres.sql applied in database $PGC_DB (default bench),
reached through $PGHOST/$PGPORT/$PGUSER, whose data directory is $PGC_DATA (to find the
postmaster). Server CPU is read from /proc: the postmaster's own and reaped children's time plus its
live children's, before and after, so it counts the backends, the WAL writer, the checkpointer and
autovacuum alike. Each pgbench client is one daemon with its own connection (and cursor). Before a
run the table is emptied and ANALYZEd, then loaded: the daemons' statements are planned on the
statistics of an empty table, the worst case (--stats analyzed loads first). The daemon's session
settings (see the doc) are on unless PGOPTIONS says otherwise."""
import argparse
import json
import math
import os
import subprocess
import time

DATA = os.environ.get("PGC_DATA", "/tmp/pg-claim/data")
DB = os.environ.get("PGC_DB", "bench")
TCK = os.sysconf("SC_CLK_TCK")
DAEMON_SETTINGS = (
    "-c plan_cache_mode=force_generic_plan -c enable_seqscan=off -c enable_sort=off "
    "-c enable_incremental_sort=off -c jit=off"
)
ENV = dict(os.environ)
ENV.setdefault("PGOPTIONS", DAEMON_SETTINGS)


def psql(sql):
    env = dict(ENV, PGOPTIONS="")
    return subprocess.run(["psql", "-X", "-q", "-At", "-d", DB, "-v", "ON_ERROR_STOP=1", "-c", sql],
                          env=env, check=True, capture_output=True, text=True).stdout.strip()


def stat(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
    except OSError:
        return None
    return s[s.rindex(")") + 2:].split()


def postmaster():
    with open(os.path.join(DATA, "postmaster.pid")) as f:
        return int(f.readline())


def children(pid):
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            f = stat(int(p))
            if f and int(f[1]) == pid:
                out.append(int(p))
    return out


def server_cpu():
    """CPU seconds of the whole server: the postmaster (own + reaped children) + live children."""
    pm = postmaster()
    total = sum(int(x) for x in stat(pm)[11:15])
    for c in children(pm):
        f = stat(c)
        if f:
            total += int(f[11]) + int(f[12])
    return total / TCK


def settle():
    """Waits until no backend serves DB and every exited child was reaped (its CPU counted)."""
    while True:
        pm = postmaster()
        busy = 0
        for c in children(pm):
            f = stat(c)
            if f is None:
                continue
            if f[0] == "Z":
                busy += 1
                continue
            try:
                with open("/proc/%d/cmdline" % c, "rb") as g:
                    if g.read().decode(errors="replace").startswith("postgres: %s %s " % (ENV.get("PGUSER", ""), DB)):
                        busy += 1
            except OSError:
                pass
        if not busy:
            break
        time.sleep(0.01)
    # An exiting backend's time moves to the postmaster's figures only once it is reaped: wait
    # until the total holds still.
    last, end = server_cpu(), time.monotonic() + 5
    while time.monotonic() < end:
        time.sleep(0.2)
        now = server_cpu()
        if now == last:
            return
        last = now


def idle_fraction(seconds=1.0):
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)
    i0, t0 = snap()
    time.sleep(seconds)
    i1, t1 = snap()
    return (i1 - i0) / max(1, t1 - t0)


def wait_quiet(limit=60):
    """Other sessions share this VM's 2 cores: start when it is nearly idle (or after `limit` s)."""
    end = time.monotonic() + limit
    while time.monotonic() < end and idle_fraction() < 0.8:
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("script")
    ap.add_argument("clients", type=int)
    ap.add_argument("batch", type=int)
    ap.add_argument("--rows", type=int, default=100000)
    ap.add_argument("--deferred", type=int, default=0, help="rows delayed by a day beside the due ones")
    ap.add_argument("--stats", choices=["empty", "analyzed"], default="empty")
    a = ap.parse_args()
    psql("TRUNCATE foreman_task, foreman_run RESTART IDENTITY")
    if a.stats == "empty":
        psql("VACUUM ANALYZE foreman_task, foreman_run")
    if a.deferred:
        psql("INSERT INTO foreman_task(task_name, run_after) SELECT 'bench.noop', now() + interval '1 day' "
             "FROM generate_series(1, %d)" % a.deferred)
    psql("INSERT INTO foreman_task(task_name, args, kwargs) SELECT 'bench.noop', jsonb_build_array(i), '{}' "
         "FROM generate_series(1, %d) i" % a.rows)
    if a.stats == "analyzed":
        psql("VACUUM ANALYZE foreman_task, foreman_run")
    psql("CHECKPOINT")
    settle()
    wait_quiet()
    per_client = math.ceil(a.rows / (a.clients * a.batch))
    cpu0 = server_cpu()
    t0 = time.monotonic()
    out = subprocess.run(["pgbench", "-n", "-M", "prepared", "-f", a.script, "-c", str(a.clients),
                          "-j", str(a.clients), "-t", str(per_client), "-D", "names={bench.noop}",
                          "-D", "cp={}", "-D", "cr={}", "-D", "ci={}"]
                         + [arg for e in ("ids", "attempts", "names", "states", "ago", "errors", "retry")
                            for arg in ("-D", "e_%s={}" % e)] + [DB], env=ENV, capture_output=True, text=True)
    t1 = time.monotonic()
    if out.returncode != 0:
        raise SystemExit(out.stdout + out.stderr)
    settle()
    cpu1 = server_cpu()
    left = int(psql("SELECT count(*) FROM foreman_task WHERE run_after <= now()"))
    psql("VACUUM foreman_task, foreman_run")
    settle()
    cpu2 = server_cpu()
    drained = max(1, a.rows - left)
    print(json.dumps(dict(
        script=os.path.basename(a.script), clients=a.clients, batch=a.batch, stats=a.stats,
        deferred=a.deferred, drained=drained, seconds=round(t1 - t0, 3),
        tasks_per_s=round(drained / (t1 - t0)),
        cpu_us_per_task=round((cpu1 - cpu0) / drained * 1e6, 1),
        cpu_us_per_task_with_vacuum=round((cpu2 - cpu0) / drained * 1e6, 1),
        idle_after=round(idle_fraction(0.5), 2))), flush=True)


main()
