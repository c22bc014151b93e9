#!/usr/bin/env bash
# Every claim shape x 1, 2, 4 daemons x batches of 4 and 256, REPS times, interleaved; one JSON
# line per run on stdout (keep them out of git). Needs the cluster described in run.py.
#   bash matrix.sh > /tmp/pg-claim.jsonl && python3 summary.py /tmp/pg-claim.jsonl
set -euo pipefail
cd "$(dirname "$0")"
shapes="$(mktemp -d)"
trap 'rm -rf "$shapes"' EXIT
python3 shapes.py "$shapes"
for rep in $(seq "${REPS:-3}"); do
    for batch in 4 256; do
        for clients in 1 2 4; do
            for shape in cycle two-step no-cursor; do
                python3 run.py "$shapes/$shape-$batch.sql" "$clients" "$batch"
            done
        done
    done
done
# The commit's fsync share: the same cycle without waiting for it (never for real claims).
for rep in $(seq "${REPS:-3}"); do
    PGOPTIONS="-c plan_cache_mode=force_generic_plan -c enable_seqscan=off -c enable_sort=off -c enable_incremental_sort=off -c jit=off -c synchronous_commit=off" \
        python3 run.py "$shapes/cycle-4.sql" 1 4 | sed 's/"script": "cycle-4.sql"/"script": "cycle-4.sql (no commit fsync)"/'
done
