"""The outbox: tasks written in the app's transaction, waiting to be moved to foreman."""

from django.db import models


class Outbox(models.Model):
    """One task of ``enqueue_on_commit``, until ``relay()`` has queued it in foreman."""

    id = models.BigAutoField(primary_key=True)
    task_name = models.TextField()
    # JSON, as foreman_task's columns: checked and encoded by enqueue_on_commit.
    args = models.TextField(default="[]")
    kwargs = models.TextField(default="{}")
    # A Unix time; null: due at once.
    run_at = models.FloatField(null=True)
    priority = models.SmallIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "foreman_outbox"
        verbose_name = "task waiting for foreman"

    def __str__(self):
        return f"{self.task_name} (outbox #{self.id})"
