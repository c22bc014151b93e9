#!/usr/bin/env bash
# foreman side by side with the shared harness's peers (snappea, Huey, django-tasks), in one go:
# build foreman, set up the peers' venvs, run every peer one after another (never two at once: they
# would share the cores), check each result, then print the table and the ratios. docs/BENCHMARKS.md
# shows a run.
#
# Usage, from anywhere:
#   bash bench/run_peers.sh [--skip-setup] [harness args, e.g. --reps 3 -n 20000]
# Environment:
#   PEERS_HARNESS  the harness (default: ../shared/bench/peers next to the repository)
#   OUT            where results go (default: bench/results/peers-<date>-<time>)
#   PY             python3 for setup.sh, foreman's driver, producer and pool (default: python3)
#   DJTASKS_ARGS   extra args for django-tasks only, e.g. "--reps 1" (later args win)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PEERS_HARNESS=$(cd "${PEERS_HARNESS:-$REPO/../shared/bench/peers}" && pwd)
export PEERS_HARNESS
PY=${PY:-python3}
SETUP=1
if [[ ${1:-} == --skip-setup ]]; then SETUP=0; shift; fi
OUT=${OUT:-$REPO/bench/results/peers-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# The harness is shared and read-only: no __pycache__ in it. Nothing from the caller's environment
# may reconfigure foreman (its FOREMAN_* variables) or make it report anywhere.
export PYTHONDONTWRITEBYTECODE=1
unset RUST_LOG SENTRY_DSN SENTRY_ENVIRONMENT
for var in $(compgen -e | grep '^FOREMAN_' || true); do unset "$var"; done

exec > >(tee -a "$OUT/console.log") 2>&1
START=$SECONDS
echo "run_peers.sh $* -> $OUT"

cargo build --release
if [[ $SETUP == 1 ]]; then
  echo "=== setup.sh $(date +%T)"
  (cd "$PEERS_HARNESS" && PY=$PY bash setup.sh)
fi

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "foreman: $(target/release/foreman --version), commit $(git describe --always --dirty)"
  echo "nproc: $(nproc)"
  echo "cpu: $(lscpu | sed -n 's/^Model name: *//p')"
  echo "memory: $(free -g | awk '/^Mem:/ {print $2 " GiB"}')"
  echo "kernel: $(uname -sr)"
  echo "python: $($PY -c 'import sys; print(sys.version.split()[0])'), sqlite: $($PY -c 'import sqlite3; print(sqlite3.sqlite_version)')"
  echo "filesystem of /tmp: $(df -T /tmp | awk 'NR==2 {print $2}')"
  echo "args: $*  DJTASKS_ARGS: ${DJTASKS_ARGS:-}"
} > "$OUT/host.txt"
cat "$OUT/host.txt"

peer() {  # peer NAME PYTHON SCRIPT [ARGS...]
  local name=$1 t0=$SECONDS; shift
  echo "=== $name $(date +%T), load average $(cut -d' ' -f1-3 /proc/loadavg)"
  "$1" bench/peers_run.py "$OUT" "${@:2}"
  echo "=== $name done in $((SECONDS - t0)) s, load average $(cut -d' ' -f1-3 /proc/loadavg)" \
    | tee -a "$OUT/host.txt"
}
# foreman right after the two peers it is compared with most, so the ratios share the VM's mood.
peer huey    /tmp/peers-venv-huey/bin/python    "$PEERS_HARNESS/huey/bench_huey.py"       "$@"
peer snappea /tmp/peers-venv-snappea/bin/python "$PEERS_HARNESS/snappea/bench_snappea.py" "$@"
peer foreman "$PY"                              bench/peers_foreman.py                    "$@"
# shellcheck disable=SC2086  # DJTASKS_ARGS is a list of words
peer djtasks /tmp/peers-venv-djtasks/bin/python "$PEERS_HARNESS/djtasks/bench_djtasks.py" "$@" ${DJTASKS_ARGS:-}

$PY "$PEERS_HARNESS/report.py" "$OUT"/*.json > "$OUT/table.md"
$PY bench/peers_ratios.py "$OUT"/*.json > "$OUT/ratios.md"
echo "=== all peers in $((SECONDS - START)) s"
cat "$OUT/table.md"
echo
cat "$OUT/ratios.md"
