"""Print foreman's figures next to the peers' and the ratios foreman/snappea and foreman/Huey.

    python3 bench/peers_ratios.py OUT_DIR/*.json

Reads the result JSONs of one bench/run_peers.sh run (one file per peer; the peer is the file's
"peer" field). Each cell is the median over the repetitions; a ratio is foreman's median divided by
the other peer's. Stdlib only.
"""
import json
import statistics
import sys

# (label, runs, how to get the figure from one run, decimals, which way is better)
FIGURES = [
    ("(a) drain tasks/s, steady", "drain", lambda r: r["drain_per_s_steady"], 0, "higher"),
    ("(a) drain tasks/s, incl. startup", "drain", lambda r: r["drain_per_s_incl_startup"], 0, "higher"),
    ("(b) enqueue/s (1 row per transaction)", "drain", lambda r: r["enqueue_per_s"], 0, "higher"),
    ("(c) latency p50 ms", "idle", lambda r: r["lat_p50_ms"], 1, "lower"),
    ("(c) latency p99 ms", "idle", lambda r: r["lat_p99_ms"], 1, "lower"),
    ("(d) idle CPU s per idle window (schedstat)", "idle", lambda r: r["idle_cpu_sched_s"], 4, "lower"),
    ("(e) peak RSS MiB, drain", "drain", lambda r: r["peak_rss_kb"] / 1024, 1, "lower"),
    ("(e) peak RSS MiB, idle", "idle", lambda r: r["peak_rss_kb"] / 1024, 1, "lower"),
    ("consumer CPU ms per task (drain)", "drain", lambda r: r["consumer_cpu_s"] * 1000 / r["n"], 2, "lower"),
]
PEERS = ["foreman", "snappea", "huey", "djtasks"]
NAMES = {"foreman": "foreman", "snappea": "snappea", "huey": "Huey", "djtasks": "django-tasks"}


def main(paths):
    results = {}
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        if doc["peer"] in results:
            sys.exit("peers_ratios.py: two results for %s; pass one run's files" % doc["peer"])
        results[doc["peer"]] = doc
    for need in ("foreman", "snappea", "huey"):
        if need not in results:
            sys.exit("peers_ratios.py: no result for %s" % need)
    peers = [p for p in PEERS if p in results]
    head = ["figure"] + [NAMES[p] for p in peers] + ["foreman / snappea", "foreman / Huey", "better"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, kind, get, nd, better in FIGURES:
        medians = {p: statistics.median(get(r) for r in results[p][kind]) for p in peers}
        row = [label] + ["%.*f" % (nd, medians[p]) for p in peers]
        for other in ("snappea", "huey"):
            row.append(ratio(medians["foreman"], medians[other]))
        row.append(better)
        print("| " + " | ".join(row) + " |")


def ratio(a, b):
    if b == 0:
        return "n/a (divisor 0)"
    r = a / b
    if r < 1:
        return "%.2g×" % r
    return "%.*f×" % (2 if r < 10 else 1 if r < 100 else 0, r)


if __name__ == "__main__":
    main(sys.argv[1:])
