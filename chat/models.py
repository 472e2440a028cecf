import uuid

from django.conf import settings
from django.db import models


class Conversation(models.Model):
    class Kind(models.TextChoices):
        DIRECT = "direct"
        GROUP = "group"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=8, choices=Kind.choices)
    title = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    # The seq counter: every message's seq is allocated by an atomic increment of this row.
    last_seq = models.BigIntegerField(default=0)
    # The change counter (SPEC 4.1): every edit, delete and reaction takes the next value, allocated
    # like last_seq, in the relational transaction that writes the change.
    last_change = models.BigIntegerField(default=0)
    last_activity_at = models.DateTimeField(auto_now_add=True, db_index=True)
    # "<smaller user id>:<larger user id>" for direct conversations; the unique index is what makes
    # a direct conversation unique per pair even when both people create it at the same moment.
    direct_key = models.CharField(max_length=73, null=True, blank=True, unique=True, editable=False)

    def __str__(self) -> str:
        return self.title or f"{self.kind} {self.id}"


class Participant(models.Model):
    class Role(models.TextChoices):
        OWNER = "owner"
        ADMIN = "admin"
        MEMBER = "member"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="participants")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="participations")
    role = models.CharField(max_length=8, choices=Role.choices, default=Role.MEMBER)
    joined_at = models.DateTimeField(auto_now_add=True)
    last_read_seq = models.BigIntegerField(default=0)
    muted = models.BooleanField(default=False)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["conversation", "user"], name="participant_unique")]

    @property
    def can_manage(self) -> bool:
        return self.role in (self.Role.OWNER, self.Role.ADMIN)

    def __str__(self) -> str:
        return f"{self.user} in {self.conversation_id} ({self.role})"


class Ban(models.Model):
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="bans")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    banned_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    reason = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["conversation", "user"], name="ban_unique")]

    def __str__(self) -> str:
        return f"{self.user} banned from {self.conversation}"



class Report(models.Model):
    """A participant's report of a message, queued for the moderators in the admin."""

    class Status(models.TextChoices):
        OPEN = "open"
        RESOLVED = "resolved"
        DISMISSED = "dismissed"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="reports")
    seq = models.BigIntegerField()
    message_id = models.UUIDField()
    # The reported message's author and content as they were when reported: the sender may edit or
    # delete the message afterwards, and the moderator must still see what was reported.
    sender = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    reported_content = models.TextField()
    reporter = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    reason = models.CharField(max_length=1000)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.OPEN)
    created_at = models.DateTimeField(auto_now_add=True)
    handled_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    handled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            # One open report per reporter and message: reporting again does not flood the queue.
            models.UniqueConstraint(
                fields=["conversation", "seq", "reporter"],
                condition=models.Q(status="open"),
                name="report_open_unique",
            )
        ]
        indexes = [models.Index(fields=["status", "created_at"], name="report_queue")]

    def __str__(self) -> str:
        return f"Report #{self.pk} on message {self.seq} of {self.conversation_id}"


# Tables of the `sql` message store (chat.store.sql). The `cassandra` store keeps the same data in
# Cassandra; these stay empty there.


class SqlMessage(models.Model):
    message_id = models.UUIDField(primary_key=True)
    conversation_id = models.UUIDField()
    seq = models.BigIntegerField()
    sender_id = models.UUIDField()
    content = models.TextField()
    message_type = models.CharField(max_length=8)
    is_encrypted = models.BooleanField()
    metadata = models.JSONField()
    sent_at = models.DateTimeField()
    edited_at = models.DateTimeField(null=True)
    deleted = models.BooleanField(default=False)
    reply_to = models.BigIntegerField(null=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["conversation_id", "seq"], name="sqlmessage_conversation_seq")]
        # A thread (the replies to one message) is read in seq order, and counted per page.
        indexes = [models.Index(fields=["conversation_id", "reply_to", "seq"], name="sqlmessage_thread")]


class SqlChange(models.Model):
    """The change log of the `sql` message store (chat.store.Change)."""

    conversation_id = models.UUIDField()
    change = models.BigIntegerField()
    kind = models.CharField(max_length=32)
    seq = models.BigIntegerField()
    at = models.DateTimeField()
    data = models.JSONField(default=dict)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["conversation_id", "change"], name="sqlchange_conversation_change")]


class SqlReaction(models.Model):
    """A reaction of the `sql` message store: one row per (message, emoji, user)."""

    conversation_id = models.UUIDField()
    seq = models.BigIntegerField()
    emoji = models.CharField(max_length=64)
    user_id = models.UUIDField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["conversation_id", "seq", "emoji", "user_id"], name="sqlreaction_unique")
        ]


class SqlEdit(models.Model):
    """An earlier version of a message of the `sql` message store (chat.store.Edit)."""

    conversation_id = models.UUIDField()
    seq = models.BigIntegerField()
    change = models.BigIntegerField()
    content = models.TextField()
    written_at = models.DateTimeField()
    replaced_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["conversation_id", "change"], name="sqledit_conversation_change")]
        indexes = [models.Index(fields=["conversation_id", "seq", "change"], name="sqledit_message")]


class IdempotencyKey(models.Model):
    """What a send with an idempotency key created, committed in the send's own transaction beside
    the seq it allocated (whatever the message store): a retry finds it and gets the same message;
    a send that rolls back leaves none. Kept IDEMPOTENCY_TTL (48 h), then purged."""

    sender_id = models.UUIDField()
    key = models.CharField(max_length=255)
    request_hash = models.CharField(max_length=64)
    conversation_id = models.UUIDField()
    seq = models.BigIntegerField()
    message_id = models.UUIDField()
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["sender_id", "key"], name="idempotency_sender_key")]


class Attachment(models.Model):
    """An uploaded file (docs/attachments.md). Its bytes and thumbnail live in the "attachments"
    storage under names made of its id; this row is the truth of who may read it: the uploader
    while it is unattached, then the participants of the conversation whose message carries it.

    A row is unattached, attached (to exactly one message, at `position` among its attachments) or
    doomed (its message was deleted, a moderator removed it, or it stayed unattached for a day):
    doomed rows answer nobody and the sweeper (chat.services.attachments) deletes their objects,
    then the row."""

    class State(models.TextChoices):
        UNATTACHED = "unattached"
        ATTACHED = "attached"
        DOOMED = "doomed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    uploader = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    name = models.CharField(max_length=255)
    content_type = models.CharField(max_length=127)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    width = models.IntegerField(null=True, blank=True)
    height = models.IntegerField(null=True, blank=True)
    has_thumbnail = models.BooleanField(default=False)
    created_at = models.DateTimeField(db_index=True)
    state = models.CharField(max_length=10, choices=State.choices, default=State.UNATTACHED)
    conversation_id = models.UUIDField(null=True, blank=True)
    message_id = models.UUIDField(null=True, blank=True, db_index=True)
    seq = models.BigIntegerField(null=True, blank=True)
    position = models.SmallIntegerField(default=0)
    # The sweeper's lease on a doomed row: two sweepers never delete the same objects.
    sweep_claimed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["state", "created_at"], name="attachment_state_created"),
            models.Index(fields=["uploader", "state"], name="attachment_uploader_state"),
        ]

    @property
    def object_name(self) -> str:
        return self.id.hex

    @property
    def thumbnail_object_name(self) -> str:
        return f"{self.id.hex}.thumb"

    def __str__(self) -> str:
        return f"{self.name} ({self.content_type}, {self.size} bytes)"


# The Cassandra tables (cqlengine models) must be attributes of this module: django-cassandra-engine's
# `sync_cassandra` looks for them only in each app's models module.
from chat.cassandra_models import (  # noqa: F401,E402
    CassandraChange,
    CassandraConversationBucket,
    CassandraEdit,
    CassandraMessage,
    CassandraReaction,
    CassandraReply,
)
