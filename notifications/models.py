"""Push notifications: devices, the outbox written on send, and per-device deliveries.

Two kinds of job share the claiming machinery (notifications/queue.py):
- OutboxEntry: one per sent message, written with a single insert on the send path. A worker
  expands it into Delivery rows for the recipients' devices.
- Delivery: one per (message, device). Retried on its own, so a failure on one device never
  repeats a notification another device already received.
"""
import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone


class Device(models.Model):
    """Somewhere a user's notifications can be pushed to."""

    class Kind(models.TextChoices):
        WEBPUSH = "webpush", "Web Push"
        FCM = "fcm", "Firebase Cloud Messaging token"
        APNS = "apns", "Apple Push Notification service token"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="push_devices")
    kind = models.CharField(max_length=8, choices=Kind.choices)
    name = models.CharField(max_length=100, blank=True)
    # Web Push: the browser's PushSubscription (endpoint and its two keys). Native kinds: the token.
    endpoint = models.CharField(max_length=1024, blank=True)
    p256dh = models.CharField(max_length=200, blank=True)
    auth = models.CharField(max_length=100, blank=True)
    token = models.CharField(max_length=512, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        # A subscription or token identifies one app install: registered again (by whoever is
        # signed in there now) it is updated, never duplicated.
        constraints = [models.UniqueConstraint(fields=["kind", "endpoint", "token"], name="device_unique_address")]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.name or self.id} of {self.user_id}"


class Job(models.Model):
    """A unit of work claimed by one worker at a time, under a lease."""

    class Status(models.TextChoices):
        PENDING = "pending"
        DONE = "done"
        SKIPPED = "skipped"
        DEAD = "dead"

    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    # Incremented on claim, not on failure: a job that crashes its worker every time still
    # reaches the dead letters instead of looping forever.
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    claimed_by = models.CharField(max_length=100, blank=True)
    claimed_until = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True


class OutboxEntry(Job):
    """One sent message waiting to be expanded into deliveries. Only ids: the content is read
    from the message store at delivery time, so a message deleted meanwhile is not pushed."""

    id = models.BigAutoField(primary_key=True)
    message_id = models.UUIDField()
    conversation_id = models.UUIDField()
    seq = models.BigIntegerField()
    sender_id = models.UUIDField()

    class Meta:
        indexes = [models.Index(fields=["status", "next_attempt_at"], name="outbox_due")]
        verbose_name = "outbox entry"
        verbose_name_plural = "outbox"

    def __str__(self) -> str:
        return f"message {self.message_id} (seq {self.seq})"


class Delivery(Job):
    """One notification to one device."""

    id = models.BigAutoField(primary_key=True)
    outbox = models.ForeignKey(OutboxEntry, on_delete=models.CASCADE, related_name="deliveries")
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="deliveries")
    # The recipient when the job was made: a device re-registered by someone else since then
    # must not receive this person's notification.
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["outbox", "device"], name="delivery_unique_device")]
        indexes = [models.Index(fields=["status", "next_attempt_at"], name="delivery_due")]
        verbose_name_plural = "deliveries"

    def __str__(self) -> str:
        return f"delivery {self.pk} to device {self.device_id}"


class DeadLetter(Delivery):
    """The admin's view of deliveries that used up their attempts."""

    class Meta:
        proxy = True
        verbose_name = "dead letter"
