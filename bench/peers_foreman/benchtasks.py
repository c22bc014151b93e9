"""The peers' trivial task, served by a foreman pool (`python -m foreman_worker benchtasks`).

The body is the harness's own `common.record` (../shared/bench/peers/common.py), called from a
one-line wrapper exactly like snappea's and Huey's task modules do, so every peer runs the same
bytes. Task name: "benchtasks.record". PYTHONPATH must hold clients/python and the harness dir;
bench/peers_foreman.py sets it.
"""
import common

from foreman_worker import task


@task
def record(i):
    common.record(i)
