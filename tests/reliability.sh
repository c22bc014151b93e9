#!/bin/sh
# The long reliability runs of docs/RELIABILITY.md, in release: 100 kill -9s of the daemon in a
# 100,000-task drain for each task kind and delivery, 4 producers x 250,000 rows, and the
# 10-minute soak with readers, and (as root, with PostgreSQL) three hosts in network namespaces
# draining 100,000 tasks through a PostgreSQL restart, a kill -9 and a cut link. One test at a time: each measures, and in parallel they would
# measure each other. Extra arguments narrow the run (e.g. `crash::long_kill_9_100_times_pool`);
# CRASH_TASKS, CRASH_CRASHES, CRASH_SEED, LOAD_ROWS, SOAK_SECONDS and HOSTS_TASKS change the
# numbers.
# The full output goes to target/reliability.log; the summary lines are printed at the end.
set -eu
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- crash::long load::long hosts::long
log=target/reliability.log
status=0
cargo test --release --test it -- --ignored --nocapture --test-threads 1 "$@" >"$log" 2>&1 || status=$?
grep -E "summary|CRASH_SEED|^test |test result" "$log"
exit $status
