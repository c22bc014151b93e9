#!/usr/bin/env bash
# Regenerates link/hot-symbols.txt: the functions `foreman run` executes, grouped by what makes it
# run them, which build.rs asks the linker (rust-lld) to lay out in that order in release builds.
# The daemon's resident memory is mostly its code pages, and the kernel maps 64 KiB around each
# page fault: hot code spread over the binary costs several MiB, packed together far less. Each
# group is packed on its own (startup first, then the in-process loop, then what a config file,
# command tasks, pools and schedules add), so a daemon that uses no pool touches none of the
# pool's pages.
#
# Run it after a toolchain or dependency upgrade, or a large refactor (names that no longer exist
# are skipped by the linker, so a stale list only gives back part of the saving). It runs the
# release binary under valgrind's callgrind on small workloads. Needs valgrind, sqlite3, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

FOREMAN_SYMBOL_ORDER=0 cargo build --release --quiet
bin="$repo/target/release/foreman"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp clients/python/foreman_worker.py "$work/"
cat > "$work/hot_tasks.py" <<'PY'
from foreman_worker import task

@task("py.add")
def add(a, b):
    return a + b
PY

# One profile: a fresh database in its own directory, rows from `$2` (SQL), the daemon run under
# callgrind with the config `$3` (empty: none) until no row is left, then SIGTERM.
profile() {
    local name=$1 rows=$2 config=$3
    local dir="$work/$name"
    mkdir "$dir"
    cd "$dir"
    local flags=(--db q.sqlite3)
    if [ -n "$config" ]; then
        printf '%s\n' "$config" > foreman.toml
        flags+=(--config foreman.toml)
    fi
    "$bin" "${flags[@]}" init > /dev/null
    [ -z "$rows" ] || sqlite3 q.sqlite3 "$rows"
    FOREMAN_BENCH_OUT="$dir/out" PYTHONPATH="$work" valgrind --tool=callgrind --demangle=no \
        --callgrind-out-file="$dir/callgrind.out" "$bin" "${flags[@]}" --log-level warn run \
        > "$dir/daemon.log" 2>&1 &
    local daemon=$! left=1
    for _ in $(seq 1 600); do
        left=$(sqlite3 q.sqlite3 "SELECT count(*) FROM foreman_task")
        [ "$left" = 0 ] && break
        sleep 0.5
    done
    sleep 2 # A few ticks and heartbeats of an idle daemon.
    kill -TERM "$daemon"
    wait "$daemon" || true
    [ "$left" = 0 ] || { echo "error: $name: $left tasks left; see $dir/daemon.log" >&2; exit 1; }
    cd "$repo"
}

bench_rows() {
    echo "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $2)
          INSERT INTO foreman_task(task_name, args) SELECT '$1', $3 FROM n;"
}
profile 1-startup "" ""
profile 2-inproc "$(bench_rows foreman.bench 2000 "'[]'")" ""
profile 3-config "$(bench_rows foreman.bench 500 "'[]'")" 'workers = 4
prefetch = 64
tick = "200ms"'
profile 4-command "$(bench_rows sh.true 50 "'[]'")" '[tasks."sh.true"]
command = ["/bin/true"]'
profile 5-pool "$(bench_rows py.add 200 'json_array(i, 1)')" '[pools.py]
command = ["python3", "-m", "foreman_worker", "hot_tasks"]
processes = 2'
profile 6-schedule "" '[schedules.every]
task = "foreman.echo"
every = "1s"'

nm --defined-only "$bin" > "$work/symbols"
python3 - "$work" > link/hot-symbols.txt <<'PY'
import os, re, sys
work = sys.argv[1]
# Where the linker put each function without an order: within a group, functions keep that
# order, which keeps a crate's or a module's functions together as the compiler emitted them.
address = {}
for line in open(os.path.join(work, "symbols")):
    parts = line.split()
    if len(parts) == 3 and parts[1] in "tTwW":
        address.setdefault(parts[2], int(parts[0], 16))
seen = set()
for run in sorted(os.listdir(work)):
    out = os.path.join(work, run, "callgrind.out")
    if not os.path.isfile(out):
        continue
    group = set()
    for line in open(out, errors="replace"):
        m = re.match(r"c?fn=\(\d+\) (.+)", line.rstrip("\n"))
        if m and m.group(1) in address and m.group(1) not in seen:
            group.add(m.group(1))
    seen |= group
    for name in sorted(group, key=address.get):
        print(name)
PY
echo "link/hot-symbols.txt: $(wc -l < link/hot-symbols.txt) functions"
