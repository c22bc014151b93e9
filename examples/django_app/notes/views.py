from django.db import transaction
from django.http import JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from foreman_django import enqueue_on_commit
from notes.models import Note


@csrf_exempt  # a JSON API for scripts; a form would carry Django's CSRF token instead
@require_POST
def create_note(request):
    with transaction.atomic():
        note = Note.objects.create(text=request.POST.get("text", ""))
        # Queued if and only if this transaction commits: the task never looks for a note that
        # is not there, and a failure to reach foreman after the commit loses nothing.
        enqueue_on_commit("notes.tasks.process_note", note.pk)
    return JsonResponse({"id": note.pk}, status=201)


@require_GET
def note_detail(request, pk):
    note = get_object_or_404(Note, pk=pk)
    return JsonResponse(
        {"id": note.pk, "status": note.status, "processed_by_pid": note.processed_by_pid}
    )
