#!/usr/bin/env python3
"""Medians of run.py's JSON lines, as the markdown table in docs/design/postgres-store.md."""
import json
import statistics
import sys

runs = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs.setdefault((r["script"], r["batch"], r["clients"]), []).append(r)
print("| shape | batch | daemons | tasks/s | server CPU µs/task (+ vacuum) | runs |")
print("|---|---|---|---|---|---|")
for (script, batch, clients), rs in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
    rate = statistics.median(r["tasks_per_s"] for r in rs)
    cpu = statistics.median(r["cpu_us_per_task"] for r in rs)
    vac = statistics.median(r["cpu_us_per_task_with_vacuum"] for r in rs)
    print("| %s | %d | %d | %s | %.1f (%.1f) | %d |" % (
        script.rsplit("-", 1)[0] if script[-4:] == ".sql" else script, batch, clients,
        format(round(rate, -2), ",.0f"), cpu, vac, len(rs)))
