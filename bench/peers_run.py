"""Run one peer script of the shared harness, keep its result JSON in OUT_DIR, and check it.

    PEERS_HARNESS=../shared/bench/peers python3 bench/peers_run.py OUT_DIR SCRIPT [ARGS...]

SCRIPT is a harness peer (`$PEERS_HARNESS/huey/bench_huey.py`, ...) or bench/peers_foreman.py;
ARGS are the harness's (`--reps 3`, `-n 20000`, ...). Run it with the python the peer needs (the
peer's venv).

Why a wrapper: the harness's `common.main()` writes its result to `<harness>/results/`, which is
shared and read-only to us. `common.HERE` names that directory; it is also the consumer's working
directory for a peer whose `fresh()` sets no BENCH_CWD, and all four peers set one. So the wrapper
points `common.HERE` at a scratch directory, runs the script unchanged as `__main__`, and moves the
JSON it wrote to OUT_DIR.

Then it checks the result and exits 1, naming every problem, unless each run is clean: every id
0..N-1 started (the task records it), none twice, no row left queued, no enqueue error, consumers
exited 0, and their logs hold no "locked", "error", "exception" or "traceback". The harness records
all of these but does not stop on them.
"""
import json
import os
import runpy
import sys
import tempfile


def check(result):
    """The problems of one result document, as sentences; empty when every run is clean."""
    problems = []
    args = result["args"]
    runs = [(kind, r) for kind in ("drain", "idle", "concurrent") for r in result.get(kind, [])]
    if not runs:
        problems.append("no runs at all")
    for kind, r in runs:
        where = "%s %s rep %d" % (result["peer"], kind, r["rep"])
        if kind == "idle":
            if not r["lat_complete"] or r["lat_done"] != args["lat_n"]:
                problems.append("%s: %s of %d latency ids ran" % (where, r["lat_done"], args["lat_n"]))
        else:
            if not r["complete"] or r["done"] != r["n"]:
                problems.append("%s: %s of %d ids ran" % (where, r["done"], r["n"]))
            if r["queue_left"] != 0:
                problems.append("%s: %s rows left in the queue (None: unknown)" % (where, r["queue_left"]))
            if r["enqueue_errors"]:
                problems.append("%s: %d enqueue errors" % (where, r["enqueue_errors"]))
        if r["dupes"]:
            problems.append("%s: %d ids ran more than once" % (where, r["dupes"]))
        if any(rc != 0 for rc in r["consumer_rcs"]):
            problems.append("%s: consumer exit statuses %s" % (where, r["consumer_rcs"]))
        if r["log_hits"]:
            problems.append("%s: consumer log lines with %s" % (where, r["log_hits"]))
    return problems


def main(argv):
    if len(argv) < 2:
        sys.exit("usage: peers_run.py OUT_DIR SCRIPT [ARGS...]   (PEERS_HARNESS must be set)")
    out_dir, script = os.path.abspath(argv[0]), os.path.abspath(argv[1])
    harness = os.path.abspath(os.environ["PEERS_HARNESS"])
    sys.path.insert(0, harness)
    import common

    scratch = tempfile.mkdtemp(prefix="peers-run-")
    os.mkdir(os.path.join(scratch, "results"))
    common.HERE = scratch
    # As if started as `python SCRIPT ARGS`: the script's directory first on sys.path, and argv[0]
    # the script, which the harness re-executes as the producer (runpy sets argv[0] while it runs).
    sys.path[0] = os.path.dirname(script)
    sys.path.insert(1, harness)
    sys.argv = [script] + argv[2:]
    runpy.run_path(script, run_name="__main__")
    if sys.modules["common"] is not common:
        sys.exit("peers_run.py: %s imported another common.py than %s/common.py" % (script, harness))

    written = os.listdir(os.path.join(scratch, "results"))
    if len(written) != 1:
        sys.exit("peers_run.py: expected one result file from %s, found %s" % (script, written))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, written[0])
    os.replace(os.path.join(scratch, "results", written[0]), path)
    os.rmdir(os.path.join(scratch, "results"))
    os.rmdir(scratch)
    with open(path) as f:
        problems = check(json.load(f))
    if problems:
        sys.stderr.write("FAILED: %s\n  %s\n" % (path, "\n  ".join(problems)))
        sys.exit(1)
    print("checked %s: every id ran exactly once, nothing left queued, no errors" % path)


if __name__ == "__main__":
    main(sys.argv[1:])
