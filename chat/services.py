"""Every write of the chat domain, and the events it emits.

`message_send` is the only way a message is created: the REST view and the WebSocket consumer both
call it, so validation, rate limiting, authorization and idempotency cannot be skipped by any
transport. Lifecycle: validate -> rate-limit -> authorize -> idempotency -> allocate seq + persist
(+ the notification outbox entry, in the same transaction) -> publish.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.admin.models import ADDITION, CHANGE, LogEntry
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.utils import timezone

from accounts.models import User
from chat import events, metrics, sql
from chat.access import access_conversation, access_participant_id
from chat.exceptions import (
    AccessDenied,
    IdempotencyInFlight,
    IdempotencyMismatch,
    NotAllowed,
    NotFound,
    RateLimited,
    StoreUnavailable,
    ValidationFailed,
)
from chat.models import Ban, Conversation, Participant, Report
from chat.ratelimit import Decision as RateDecision
from chat.ratelimit import get_send_rate_limiter
from chat.store import Message, StoreError, get_message_store

logger = logging.getLogger(__name__)

MESSAGE_TYPES = ("text", "image", "video", "file")
MAX_TEXT_BYTES = 10_000
MAX_MEDIA_BYTES = 10 * 1024 * 1024
MAX_METADATA_BYTES = 16 * 1024
MAX_IDEMPOTENCY_KEY_LENGTH = 255
MAX_REPORT_REASON_LENGTH = 1000


@dataclass(frozen=True)
class MessageInput:
    content: str
    message_type: str
    is_encrypted: bool
    metadata: dict[str, Any]


@dataclass(frozen=True)
class SendResult:
    message: Message
    replayed: bool
    rate: RateDecision | None = None


def now_ms():
    """The current time at the precision every message store keeps (Cassandra: milliseconds), so a
    message reads back exactly as it was acknowledged."""
    now = timezone.now()
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _utf8(text: str) -> bytes | None:
    """The UTF-8 bytes of `text`, or None when no store can keep it: JSON lets a lone surrogate
    through, and PostgreSQL refuses NUL in text."""
    if "\x00" in text:
        return None
    try:
        return text.encode()
    except UnicodeEncodeError:
        return None


def check_message_input(
    *, content: object, message_type: object = "text", is_encrypted: object = False, metadata: object = None
) -> MessageInput:
    """Validate a message body against SPEC limits; raise ValidationFailed with field errors."""
    errors: dict[str, list[str]] = {}
    if message_type not in MESSAGE_TYPES:
        errors["message_type"] = [f"Must be one of: {', '.join(MESSAGE_TYPES)}."]
    if not isinstance(is_encrypted, bool):
        errors["is_encrypted"] = ["Must be a boolean."]
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        errors["metadata"] = ["Must be a JSON object."]
    else:
        encoded = _utf8(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False))
        if encoded is None:
            errors["metadata"] = ["Must be valid Unicode (no lone surrogates or NUL characters)."]
        elif len(encoded) > MAX_METADATA_BYTES:
            errors["metadata"] = [f"At most {MAX_METADATA_BYTES} bytes when serialized."]
    if not isinstance(content, str) or content == "":
        errors["content"] = ["Must be a non-empty string."]
    else:
        limit = MAX_TEXT_BYTES if message_type == "text" else MAX_MEDIA_BYTES
        # A character is 1 to 4 bytes in UTF-8: a string over the limit in characters is over it
        # in bytes, and is refused before it is encoded.
        encoded = None if len(content) > limit else _utf8(content)
        if len(content) > limit or (encoded is not None and len(encoded) > limit):
            errors["content"] = [f"At most {limit} bytes (UTF-8) for {message_type} messages."]
        elif encoded is None:
            errors["content"] = ["Must be valid Unicode (no lone surrogates or NUL characters)."]
    if errors:
        raise ValidationFailed(errors)
    return MessageInput(content, message_type, is_encrypted, metadata)


def check_idempotency_key(key: object, *, field: str) -> str:
    if (
        not isinstance(key, str)
        or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH
        or not all(" " <= ch <= "~" for ch in key)
    ):
        raise ValidationFailed({field: [f"Must be 1-{MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII characters."]})
    return key


def _request_hash(conversation_id: uuid.UUID, body: MessageInput) -> str:
    canonical = json.dumps(
        [str(conversation_id), body.content, body.message_type, body.is_encrypted, body.metadata],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(record, request_hash: str, rate: RateDecision) -> SendResult:
    if record.request_hash != request_hash:
        raise IdempotencyMismatch()
    try:
        message = get_message_store().get_by_id(record.message_id) if record.completed else None
    except StoreError as exc:
        raise StoreUnavailable() from exc
    if message is None:
        raise IdempotencyInFlight()
    metrics.idempotency_hit.inc()
    return SendResult(message=message, replayed=True, rate=rate)


def message_send(
    *,
    sender: User,
    conversation_id: object,
    content: object,
    message_type: object = "text",
    is_encrypted: object = False,
    metadata: object = None,
    idempotency_key: str | None = None,
    idempotency_field: str = "Idempotency-Key",
    transport: str = "rest",
) -> SendResult:
    """Send a message (the REST path, and any sync caller): persist it, then publish it."""
    result = _message_persist(
        sender=sender,
        conversation_id=conversation_id,
        content=content,
        message_type=message_type,
        is_encrypted=is_encrypted,
        metadata=metadata,
        idempotency_key=idempotency_key,
        idempotency_field=idempotency_field,
        transport=transport,
    )
    if not result.replayed:
        events.message_new(result.message)
    return result


async def amessage_send(*, run_blocking: Callable, **kwargs: Any) -> SendResult:
    """message_send for the event loop (the WebSocket path): the blocking part (ORM, store) runs
    through `run_blocking` (a thread pool), the publish runs on the loop itself, so no thread
    waits for the loop and the loop never waits for a thread to publish."""
    result = await run_blocking(_message_persist)(**kwargs)
    if not result.replayed:
        await events.amessage_new(result.message)
    return result


def _message_persist(
    *,
    sender: User,
    conversation_id: object,
    content: object,
    message_type: object,
    is_encrypted: object,
    metadata: object,
    idempotency_key: str | None,
    idempotency_field: str,
    transport: str,
) -> SendResult:
    """Everything of a send up to and including the commit: validate, rate-limit, authorize,
    claim the idempotency key, allocate the seq and persist (message, outbox entry). The callers
    publish what it returns."""
    body = check_message_input(
        content=content, message_type=message_type, is_encrypted=is_encrypted, metadata=metadata
    )
    if idempotency_key is not None:
        check_idempotency_key(idempotency_key, field=idempotency_field)

    rate = get_send_rate_limiter().check(sender.pk)
    if not rate.allowed:
        metrics.send_rate_limited.labels(transport=transport).inc()
        raise RateLimited(rate)

    started = time.perf_counter()
    try:
        conversation_id, participant_id = access_participant_id(user=sender, conversation_id=conversation_id)
    except AccessDenied:
        metrics.message_send_unauthorized.inc()
        raise
    metrics.message_delivery_duration.labels(step="authorize").observe(time.perf_counter() - started)

    store = get_message_store()
    message_id = uuid.uuid4()
    if idempotency_key is not None:
        request_hash = _request_hash(conversation_id, body)
        try:
            earlier = store.claim_idempotency(
                sender_id=sender.pk, key=idempotency_key, request_hash=request_hash, message_id=message_id
            )
        except StoreError as exc:
            metrics.message_persisted.labels(status="error").inc()
            raise StoreUnavailable() from exc
        if earlier is not None:
            return _replay(earlier, request_hash, rate)
        metrics.idempotency_miss.inc()

    started = time.perf_counter()
    try:
        # Allocating the seq and persisting in one relational transaction: a failed persist rolls
        # the counter back (no seq is burned), and seqs become durable in the order they are taken.
        # The outbox entry commits with them, so a sent message never lacks its notifications.
        with _relational_writer(), transaction.atomic():
            seq = sql.allocate_seq(conversation_id, timezone.now())
            message = Message(
                message_id=message_id,
                conversation_id=conversation_id,
                seq=seq,
                sender_id=sender.pk,
                content=body.content,
                message_type=body.message_type,
                is_encrypted=body.is_encrypted,
                metadata=body.metadata,
                sent_at=now_ms(),
            )
            store.insert(message, idempotency_key=idempotency_key)
            # Your own message is read by you: unread counts never include it.
            sql.advance_read_marker(participant_id, seq)
            _enqueue_notifications(message)
    except (StoreError, DatabaseError) as exc:
        metrics.message_persisted.labels(status="error").inc()
        logger.error("persist failed for conversation %s: %s", conversation_id, exc)
        if idempotency_key is not None:
            store.release_idempotency(sender_id=sender.pk, key=idempotency_key, message_id=message_id)
        raise StoreUnavailable() from exc
    metrics.message_persisted.labels(status="success").inc()
    metrics.message_delivery_duration.labels(step="persist").observe(time.perf_counter() - started)
    metrics.message_created.labels(message_type=message.message_type, is_encrypted=str(message.is_encrypted).lower()).inc()
    return SendResult(message=message, replayed=False, rate=rate)


# SQLite has one writer at a time and makes the others poll for the lock with growing sleeps (up
# to 100 ms a wait): queueing this process's senders on a lock hands the database over at once.
_sqlite_writer = threading.Lock()


def _relational_writer():
    return _sqlite_writer if connection.vendor == "sqlite" else contextlib.nullcontext()


def _enqueue_notifications(message: Message) -> None:
    """Write the outbox entry; a failure is logged and counted and never fails the send."""
    from notifications.services import notification_enqueue  # notifications depends on chat, not back

    started = time.perf_counter()
    try:
        with transaction.atomic():  # a savepoint: the send's transaction survives a failed insert
            notification_enqueue(message=message)
    except Exception:
        metrics.notification_enqueue_error.inc()
        logger.exception("notification enqueue failed for message %s", message.message_id)
    metrics.message_delivery_duration.labels(step="notify").observe(time.perf_counter() - started)


def conversation_create(
    *, creator: User, kind: str, participant_ids: list[uuid.UUID], title: str = ""
) -> tuple[Conversation, bool]:
    """Create a conversation with the creator as owner; (conversation, created).

    A direct conversation is unique per pair: creating it again returns the existing one."""
    other_ids = set(participant_ids) - {creator.pk}
    others = list(User.objects.filter(pk__in=other_ids, is_active=True))
    unknown = other_ids - {user.pk for user in others}
    if unknown:
        raise ValidationFailed({"participant_ids": [f"Unknown or inactive users: {', '.join(sorted(map(str, unknown)))}."]})

    if kind == Conversation.Kind.DIRECT:
        if len(others) != 1:
            raise ValidationFailed({"participant_ids": ["A direct conversation has exactly one other participant."]})
        if title:
            raise ValidationFailed({"title": ["Direct conversations have no title."]})
        direct_key = ":".join(sorted([creator.pk.hex, others[0].pk.hex]))
        existing = Conversation.objects.filter(direct_key=direct_key).first()
        if existing is not None:
            return existing, False
        try:
            with transaction.atomic():
                conversation = Conversation.objects.create(kind=kind, created_by=creator, direct_key=direct_key)
                Participant.objects.bulk_create(
                    [
                        Participant(conversation=conversation, user=creator, role=Participant.Role.OWNER),
                        Participant(conversation=conversation, user=others[0], role=Participant.Role.MEMBER),
                    ]
                )
        except IntegrityError:
            # The other person created the same pair at the same moment.
            return Conversation.objects.get(direct_key=direct_key), False
        return conversation, True

    if len(others) + 1 > settings.CHAT_MAX_GROUP_PARTICIPANTS:
        raise ValidationFailed(
            {"participant_ids": [f"A group has at most {settings.CHAT_MAX_GROUP_PARTICIPANTS} participants."]}
        )
    with transaction.atomic():
        conversation = Conversation.objects.create(kind=kind, title=title, created_by=creator)
        Participant.objects.bulk_create(
            [Participant(conversation=conversation, user=creator, role=Participant.Role.OWNER)]
            + [Participant(conversation=conversation, user=user, role=Participant.Role.MEMBER) for user in others]
        )
    return conversation, True


def conversation_update(*, actor: User, conversation_id: object, title: str) -> Conversation:
    conversation, participant = access_conversation(user=actor, conversation_id=conversation_id)
    if not participant.can_manage:
        raise NotAllowed("Only the owner or an admin may change the conversation.")
    if conversation.kind == Conversation.Kind.DIRECT:
        raise ValidationFailed({"title": ["Direct conversations have no title."]})
    conversation.title = title
    conversation.save(update_fields=["title"])
    return conversation


def participant_add(
    *, actor: User, conversation_id: object, user_id: uuid.UUID, role: str = Participant.Role.MEMBER
) -> tuple[Participant, bool]:
    """Add a user to a group conversation (owner/admin; only the owner appoints admins)."""
    conversation, actor_participant = access_conversation(user=actor, conversation_id=conversation_id)
    if not actor_participant.can_manage:
        raise NotAllowed("Only the owner or an admin may add participants.")
    if conversation.kind == Conversation.Kind.DIRECT:
        raise ValidationFailed({"user_id": ["Direct conversations have fixed participants."]})
    if role not in (Participant.Role.ADMIN, Participant.Role.MEMBER):
        raise ValidationFailed({"role": ["Must be admin or member."]})
    if role == Participant.Role.ADMIN and actor_participant.role != Participant.Role.OWNER:
        raise NotAllowed("Only the owner may appoint admins.")
    user = User.objects.filter(pk=user_id, is_active=True).first()
    if user is None:
        raise ValidationFailed({"user_id": ["Unknown or inactive user."]})
    if conversation.bans.filter(user=user).exists():
        raise ValidationFailed({"user_id": ["This user is banned from the conversation."]})
    if conversation.participants.count() >= settings.CHAT_MAX_GROUP_PARTICIPANTS:
        raise ValidationFailed({"user_id": [f"A group has at most {settings.CHAT_MAX_GROUP_PARTICIPANTS} participants."]})
    try:
        with transaction.atomic():
            # New participants start with everything before their arrival already read.
            participant = Participant.objects.create(
                conversation=conversation, user=user, role=role, last_read_seq=conversation.last_seq
            )
    except IntegrityError:
        return Participant.objects.get(conversation=conversation, user=user), False
    return participant, True


def participant_remove(*, actor: User, conversation_id: object, user_id: uuid.UUID) -> None:
    """Remove a participant: anyone may leave; the owner removes anyone, an admin removes members.

    The removed user's open sockets on the conversation are closed (4403)."""
    conversation, actor_participant = access_conversation(user=actor, conversation_id=conversation_id)
    if conversation.kind == Conversation.Kind.DIRECT:
        raise ValidationFailed({"user_id": ["Direct conversations have fixed participants."]})
    target = conversation.participants.filter(user_id=user_id).first()
    if target is None:
        raise NotFound("No such participant.")
    if target.pk != actor_participant.pk:
        allowed = actor_participant.role == Participant.Role.OWNER or (
            actor_participant.role == Participant.Role.ADMIN and target.role == Participant.Role.MEMBER
        )
        if not allowed:
            raise NotAllowed("You may not remove this participant.")
    with transaction.atomic():
        target.delete()  # closes the removed user's sockets: see revoke_on_participant_delete
        if target.role == Participant.Role.OWNER:
            _hand_over_ownership(conversation)


def _hand_over_ownership(conversation: Conversation) -> None:
    # The longest-standing admin inherits the conversation, else the longest-standing member
    # ("admin" sorts before "member").
    heir = conversation.participants.exclude(role=Participant.Role.OWNER).order_by("role", "joined_at", "pk").first()
    if heir is not None:
        heir.role = Participant.Role.OWNER
        heir.save(update_fields=["role"])


def ban_create(*, actor: User | None, conversation: Conversation, user: User, reason: str = "") -> Ban:
    """Ban a user from a conversation; their open sockets on it close (4403) at once.

    The participant row stays, so lifting the ban restores their access and read position."""
    ban, _ = Ban.objects.get_or_create(  # closes the user's sockets: see revoke_on_ban_save
        conversation=conversation, user=user, defaults={"banned_by": actor, "reason": reason}
    )
    return ban


# Access is revoked by model signals rather than by each service, so every path that removes a
# participant or bans someone (services, the admin's inline and forms, cascades from a deleted
# user or conversation) closes the affected sockets, once the change is committed.
def revoke_on_participant_delete(sender, instance: Participant, **kwargs) -> None:
    transaction.on_commit(lambda: events.membership_revoked(instance.conversation_id, instance.user_id))


def revoke_on_ban_save(sender, instance: Ban, **kwargs) -> None:
    transaction.on_commit(lambda: events.membership_revoked(instance.conversation_id, instance.user_id))


def read_marker_set(*, user: User, conversation_id: object, seq: object) -> Participant:
    """Move the caller's read marker forward to `seq`; it never moves backwards."""
    conversation, participant = access_conversation(user=user, conversation_id=conversation_id)
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= conversation.last_seq:
        raise ValidationFailed({"seq": [f"Must be an integer between 0 and {conversation.last_seq}."]})
    moved = Participant.objects.filter(pk=participant.pk, last_read_seq__lt=seq).update(last_read_seq=seq)
    participant.refresh_from_db(fields=["last_read_seq"])
    if moved:
        events.read_marker(conversation.id, user.pk, seq)
    return participant


# --- edit, delete, report ------------------------------------------------------------------------
# Moderators act in the Django admin; these permissions are checked here too, on the write path,
# so no other caller can skip them. Superusers have every permission.
MODERATE_MESSAGES_PERMISSION = "chat.change_conversation"
HANDLE_REPORTS_PERMISSION = "chat.change_report"
BAN_PERMISSION = "chat.add_ban"


def can_moderate(user: User, permission: str) -> bool:
    return user.is_active and user.is_staff and user.has_perm(permission)


def _require_permission(user: User, *permissions: str) -> None:
    if not all(can_moderate(user, permission) for permission in permissions):
        raise NotAllowed()



def _message_at(conversation: Conversation, seq: object) -> Message:
    """The conversation's message at `seq`, or NotFound."""
    # Checked against the counter first: no store read for a seq that cannot exist, and no value
    # the store's integer column cannot hold.
    if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq <= conversation.last_seq:
        raise NotFound("No such message.")
    try:
        message = get_message_store().get(conversation.id, seq)
    except StoreError as exc:
        raise StoreUnavailable() from exc
    if message is None:
        raise NotFound("No such message.")
    return message


def _message_was_deleted() -> ValidationFailed:
    return ValidationFailed({"non_field_errors": ["This message was deleted."]})


def _admin_log(actor: User, obj: Conversation | Report | Ban, action_flag: int, change_message: str) -> None:
    """Record a moderation action where moderators look for it: the admin log ("Recent actions")."""
    LogEntry.objects.log_actions(
        user_id=actor.pk, queryset=[obj], action_flag=action_flag, change_message=change_message, single_object=True
    )


def _username(user_id: uuid.UUID) -> str:
    return User.objects.filter(pk=user_id).values_list("username", flat=True).first() or str(user_id)


def message_edit(*, editor: User, conversation_id: object, seq: object, content: object) -> Message:
    """Replace the content of your own message and stamp edited_at; emits message.updated.

    message_type, is_encrypted and metadata stay: an edit corrects what was said, it does not turn
    a text into a file. The new content obeys the same limits as a send of that type."""
    conversation, _ = access_conversation(user=editor, conversation_id=conversation_id)
    message = _message_at(conversation, seq)
    if message.sender_id != editor.pk:
        raise NotAllowed("Only the sender may edit a message.")
    if message.deleted:
        raise _message_was_deleted()
    body = check_message_input(
        content=content,
        message_type=message.message_type,
        is_encrypted=message.is_encrypted,
        metadata=message.metadata,
    )
    try:
        edited = get_message_store().edit(conversation.id, message.seq, body.content, now_ms())
    except StoreError as exc:
        raise StoreUnavailable() from exc
    if edited is None:
        raise NotFound("No such message.")
    if edited.deleted:
        raise _message_was_deleted()  # deleted between the read and the edit; the store kept the tombstone
    events.message_updated(edited)
    return edited


def _tombstone(conversation: Conversation, message: Message) -> Message:
    """Delete the message's content in the store and announce it (once: a tombstone stays one)."""
    try:
        tombstone = get_message_store().tombstone(conversation.id, message.seq)
    except StoreError as exc:
        raise StoreUnavailable() from exc
    if tombstone is None:
        raise NotFound("No such message.")
    if not message.deleted:
        events.message_deleted(conversation.id, message.seq)
    return tombstone


def message_delete(*, actor: User, conversation_id: object, seq: object) -> Message:
    """Delete a message over the API, leaving a tombstone; emits message.deleted.

    Allowed to its sender, the conversation's owner and admins, and staff moderators who are
    participants (elsewhere staff moderate in the admin: message_moderate_delete). Deleting someone
    else's message is a moderation action and goes to the admin log."""
    conversation, participant = access_conversation(user=actor, conversation_id=conversation_id)
    message = _message_at(conversation, seq)
    own = message.sender_id == actor.pk
    if not (own or participant.can_manage or can_moderate(actor, MODERATE_MESSAGES_PERMISSION)):
        raise NotAllowed("Only the sender, the conversation's owner or admins, or a moderator may delete it.")
    tombstone = _tombstone(conversation, message)
    if not own and not message.deleted:
        _admin_log(
            actor,
            conversation,
            CHANGE,
            f"Deleted message {message.seq} by {_username(message.sender_id)} over the API "
            f"(as conversation {participant.role}).",
        )
    return tombstone


def message_moderate_delete(*, moderator: User, conversation: Conversation, seq: int) -> Message:
    """A moderator deletes a message of any conversation (the admin's message browser and report
    queue); emits message.deleted. The open reports about the message are resolved with it: what
    they reported is gone. Everything goes to the admin log."""
    _require_permission(moderator, MODERATE_MESSAGES_PERMISSION)
    message = _message_at(conversation, seq)
    tombstone = _tombstone(conversation, message)
    if not message.deleted:
        _admin_log(moderator, conversation, CHANGE, f"Deleted message {seq} by {_username(message.sender_id)}.")
    for report in Report.objects.filter(conversation=conversation, seq=seq, status=Report.Status.OPEN):
        _report_close(moderator, report, Report.Status.RESOLVED, f"Resolved: message {seq} deleted.")
    return tombstone


def message_report(*, reporter: User, conversation_id: object, seq: object, reason: object) -> tuple[Report, bool]:
    """Report someone else's message to the moderators; (report, created).

    Reporting a message again while your earlier report of it is open returns that report."""
    conversation, _ = access_conversation(user=reporter, conversation_id=conversation_id)
    reason = reason.strip() if isinstance(reason, str) else reason
    if not isinstance(reason, str) or not reason or len(reason) > MAX_REPORT_REASON_LENGTH:
        raise ValidationFailed(
            {"reason": [f"Must be a non-empty string of at most {MAX_REPORT_REASON_LENGTH} characters."]}
        )
    message = _message_at(conversation, seq)
    if message.deleted:
        raise _message_was_deleted()
    if message.sender_id == reporter.pk:
        raise ValidationFailed({"non_field_errors": ["You cannot report your own message."]})
    open_reports = Report.objects.filter(
        conversation=conversation, seq=message.seq, reporter=reporter, status=Report.Status.OPEN
    )
    existing = open_reports.first()
    if existing is not None:
        return existing, False
    try:
        with transaction.atomic():
            report = Report.objects.create(
                conversation=conversation,
                seq=message.seq,
                message_id=message.message_id,
                sender=User.objects.filter(pk=message.sender_id).first(),
                reported_content=message.content,
                reporter=reporter,
                reason=reason,
            )
    except IntegrityError:
        # The same report, submitted twice at the same moment.
        return open_reports.get(), False
    return report, True


def _report_close(moderator: User, report: Report, status: str, change_message: str) -> bool:
    # Conditional, so that two moderators handling one report log it once.
    closed = Report.objects.filter(pk=report.pk, status=Report.Status.OPEN).update(
        status=status, handled_by=moderator, handled_at=timezone.now()
    )
    if closed:
        report.refresh_from_db(fields=["status", "handled_by", "handled_at"])
        _admin_log(moderator, report, CHANGE, change_message)
    return bool(closed)


def report_resolve(*, moderator: User, report: Report) -> bool:
    """Close an open report as handled; False if it was no longer open."""
    _require_permission(moderator, HANDLE_REPORTS_PERMISSION)
    return _report_close(moderator, report, Report.Status.RESOLVED, "Resolved.")


def report_dismiss(*, moderator: User, report: Report) -> bool:
    """Close an open report as unfounded; False if it was no longer open."""
    _require_permission(moderator, HANDLE_REPORTS_PERMISSION)
    return _report_close(moderator, report, Report.Status.DISMISSED, "Dismissed.")


def report_delete_message(*, moderator: User, report: Report) -> Message:
    """Delete the reported message; this report and the others about it are resolved."""
    _require_permission(moderator, HANDLE_REPORTS_PERMISSION, MODERATE_MESSAGES_PERMISSION)
    return message_moderate_delete(moderator=moderator, conversation=report.conversation, seq=report.seq)


def report_ban_sender(*, moderator: User, report: Report) -> Ban:
    """Ban the reported message's sender from its conversation (their sockets close with 4403) and
    resolve the report."""
    _require_permission(moderator, HANDLE_REPORTS_PERMISSION, BAN_PERMISSION)
    if report.sender is None:
        raise ValidationFailed({"sender": ["The sender's account no longer exists."]})
    with transaction.atomic():
        already_banned = Ban.objects.filter(conversation=report.conversation, user=report.sender).exists()
        ban = ban_create(
            actor=moderator,
            conversation=report.conversation,
            user=report.sender,
            reason=f"Report #{report.pk}: {report.reason}"[: Ban._meta.get_field("reason").max_length],
        )
        if not already_banned:
            _admin_log(moderator, ban, ADDITION, f"Banned {report.sender} from the conversation (report #{report.pk}).")
        _report_close(moderator, report, Report.Status.RESOLVED, f"Resolved: sender {report.sender} banned.")
    return ban
