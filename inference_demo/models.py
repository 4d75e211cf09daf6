"""Records of demo use. No torch here: the web process imports this module."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class DemoRequest(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        CANCELLED = "cancelled", "Cancelled"
        FAILED = "failed", "Failed"

    OPEN_STATUSES = (Status.QUEUED, Status.RUNNING)

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="demo_requests"
    )
    release = models.ForeignKey(
        "weights.Release", on_delete=models.CASCADE, related_name="demo_requests"
    )
    client = models.CharField(max_length=10, default="web")  # web page or API
    prompt = models.TextField()
    params = models.JSONField(default=dict)
    status = models.CharField(
        max_length=10, choices=Status.choices, default=Status.QUEUED, db_index=True
    )
    finish_reason = models.CharField(max_length=20, blank=True)
    tokens_in = models.PositiveIntegerField(default=0)
    tokens_out = models.PositiveIntegerField(default=0)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # A Stop, recorded where whichever process runs the request sees it (runner.CancelWatch).
    cancel_requested_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"demo #{self.pk} {self.release_id} by {self.user_id} ({self.status})"

    def is_open(self) -> bool:
        return self.status in self.OPEN_STATUSES

    @property
    def max_new_tokens(self) -> int:
        return int(self.params.get("max_new_tokens", 0))
