from django.db import models


class Note(models.Model):
    text = models.TextField()
    # "new" until notes.tasks.process_note has run for it.
    status = models.CharField(max_length=10, default="new")
    processed_by_pid = models.IntegerField(null=True)
    processed_at = models.DateTimeField(null=True)
