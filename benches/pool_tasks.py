"""The trivial task of the pool benchmarks, with the body the peers' harness uses
(../shared/bench/peers/common.py `record`): append "<i> <time.time()>" to a per-process file in
$BENCH_OUT, so lost or duplicated tasks are visible and start times can be compared."""
import os
import time

from foreman_worker import task

_fd = None


@task(name="bench.record")
def record(i):
    global _fd
    t = time.time()
    if _fd is None:
        path = os.path.join(os.environ["BENCH_OUT"], "%d.txt" % os.getpid())
        _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, b"%d %.6f\n" % (i, t))
