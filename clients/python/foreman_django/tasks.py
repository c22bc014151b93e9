"""The relay as a pool task: serve it from your Django pool and put it on a schedule.

    [pools.django]
    command = ["python3", "-m", "foreman_worker", "myapp.tasks", "foreman_django.tasks"]

    [schedules.foreman-outbox]
    task = "foreman_django.relay"
    every = "30s"
"""

from foreman_worker import task

import foreman_django


@task(name="foreman_django.relay")
def relay(using=None):
    """Move what waits in the outbox; True when there was something (for adaptive schedules)."""
    moved = foreman_django.relay(using=using)
    if moved:
        foreman_django.log.warning("moved %d task(s) from the outbox to foreman", moved)
    return moved > 0
