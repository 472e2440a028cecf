import uuid

from django.db import models


class OutboxEntry(models.Model):
    """One sent message waiting to be turned into push notifications.

    Written on send with a single insert; the worker expands it to recipients (all participants
    but the sender, minus the muted and those who already read it) and delivers."""

    class Status(models.TextChoices):
        PENDING = "pending"
        DONE = "done"
        DEAD = "dead"

    id = models.BigAutoField(primary_key=True)
    message_id = models.UUIDField()
    conversation_id = models.UUIDField()
    seq = models.BigIntegerField()
    sender_id = models.UUIDField()
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=None, null=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["status", "next_attempt_at"], name="outbox_due")]
        verbose_name_plural = "outbox"
