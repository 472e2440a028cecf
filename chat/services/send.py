"""Sending a message: the only way a message is created.

The REST view and the WebSocket consumer both send through here, so validation, rate limiting,
authorization and idempotency cannot be skipped by any transport. Lifecycle: validate ->
rate-limit -> authorize -> idempotency -> allocate seq + persist (+ whatever must commit with the
message: chat.signals.message_persisted) -> publish, after commit.

This is the hot path (docs/performance.md): the per-message statements are hand-written
(chat.sql) and nothing here reads more than it must.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError, IntegrityError, connection, transaction
from django.utils import timezone

from accounts.models import User
from chat import events, metrics, sql
from chat.access import access_participant_id
from chat.models import IdempotencyKey
from chat.selectors import committed_message, message_of
from chat.signals import message_persisted
from chat.store import Message, StoreError, get_message_store
from core.errors import (
    AccessDenied,
    IdempotencyMismatch,
    RateLimited,
    StoreUnavailable,
    ValidationFailed,
)
from core.jsonsafe import MAX_DEPTH, json_problem
from core.ratelimit import Decision as RateDecision
from core.ratelimit import get_send_rate_limiter
from core.threads import in_thread

logger = logging.getLogger(__name__)

MESSAGE_TYPES = ("text", "image", "video", "file")
MAX_TEXT_BYTES = 10_000
MAX_MEDIA_BYTES = 10 * 1024 * 1024
MAX_METADATA_BYTES = 16 * 1024
MAX_METADATA_DEPTH = MAX_DEPTH  # SPEC 4.1: nested deeper than 32 levels is a 400
MAX_IDEMPOTENCY_KEY_LENGTH = 255
# How long a key answers with its first send's message (SPEC: at least 24 h).
IDEMPOTENCY_TTL = timedelta(hours=48)


@dataclass(frozen=True, slots=True)
class SendRequest:
    """One send as a transport received it; nothing in it is trusted yet (`check_message_input`
    and `check_idempotency_key` validate it on the send path)."""

    sender: User
    conversation_id: object
    content: object
    message_type: object = "text"
    is_encrypted: object = False
    metadata: object = None
    reply_to: object = None  # the seq of the message this one replies to (SPEC 4.1)
    idempotency_key: object = None
    # Where an idempotency key error is reported: the REST header or the frame's field.
    idempotency_field: str = "Idempotency-Key"
    transport: str = "rest"


@dataclass(frozen=True, slots=True)
class MessageInput:
    content: str
    message_type: str
    is_encrypted: bool
    metadata: dict[str, Any]
    reply_to: int | None = None  # set by check_reply_to, once the conversation is known


@dataclass(frozen=True, slots=True)
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
    elif problem := json_problem(metadata, max_depth=MAX_METADATA_DEPTH, refuse_nul=True):
        # Before json.dumps, which recurses (RecursionError) and escapes NUL where _utf8 cannot see it.
        errors["metadata"] = [problem]
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


def check_reply_to(conversation_id: uuid.UUID, reply_to: object) -> int:
    """A reply names a message of the same conversation that is not deleted (SPEC 4.1); a seq the
    conversation has not reached (another conversation's, say) is no message of it."""
    if isinstance(reply_to, bool) or not isinstance(reply_to, int) or not 1 <= reply_to < 2**63:
        raise ValidationFailed({"reply_to": ["Must be the seq of a message of this conversation."]})
    message = committed_message(conversation_id=conversation_id, seq=reply_to)
    if message is None:
        raise ValidationFailed({"reply_to": ["No such message in this conversation."]})
    if message.deleted:
        raise ValidationFailed({"reply_to": ["That message was deleted."]})
    return reply_to


def _request_hash(conversation_id: uuid.UUID, body: MessageInput) -> str:
    # reply_to only when there is one: the hashes of records written before replies existed hold.
    reply = [body.reply_to] if body.reply_to is not None else []
    canonical = json.dumps(
        [str(conversation_id), body.content, body.message_type, body.is_encrypted, body.metadata, *reply],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(record: IdempotencyKey, request_hash: str, rate: RateDecision) -> SendResult:
    """The answer to a retry: the message the key's first send created (it committed with the
    record, so it is there), or 422 for a different request under the same key."""
    if record.request_hash != request_hash:
        raise IdempotencyMismatch()
    message = message_of(conversation_id=record.conversation_id, seq=record.seq, message_id=record.message_id)
    if message is None:  # the store lost a committed message: a fault, never a new send
        raise StoreUnavailable()
    metrics.idempotency_hit.inc()
    return SendResult(message=message, replayed=True, rate=rate)


def _earlier_send(sender_id: uuid.UUID, key: str, now: datetime) -> IdempotencyKey | None:
    """The sender's record for `key` within its lifetime. An expired one is deleted here, in the
    send's transaction, so that the key can be used again."""
    record_id = sql.idempotency_record_id(sender_id, key)
    if record_id is None:
        return None
    record = IdempotencyKey.objects.get(pk=record_id)
    if record.created_at > now - IDEMPOTENCY_TTL:
        return record
    record.delete()
    return None


def idempotency_keys_purge(*, now: datetime | None = None, batch: int = 1000) -> int:
    """Delete up to `batch` idempotency records past their lifetime; the number deleted. The
    notification worker calls it with its other housekeeping; a send also drops an expired record
    it runs into."""
    cutoff = (now or timezone.now()) - IDEMPOTENCY_TTL
    ids = list(IdempotencyKey.objects.filter(created_at__lt=cutoff).values_list("pk", flat=True)[:batch])
    return IdempotencyKey.objects.filter(pk__in=ids).delete()[0] if ids else 0


def message_send(request: SendRequest) -> SendResult:
    """Send a message (the REST path, and any sync caller). Its message.new event goes out when
    the send commits (chat.events)."""
    return _message_persist(request)


async def amessage_send(request: SendRequest) -> SendResult:
    """message_send for the event loop (the WebSocket path): the blocking part (ORM, store) runs
    in the thread pool, and the events the send committed are published from the loop itself, so
    no thread waits for the loop and the loop never waits for a thread to publish."""
    result, committed_events = await in_thread(events.collecting(_message_persist))(request)
    await events.apublish_collected(committed_events)
    return result


def _message_persist(request: SendRequest) -> SendResult:
    """Everything of a send up to and including the commit: validate, rate-limit, authorize, then
    in one transaction: look for an earlier send with the same key, allocate the seq, record the
    key, persist (the message, and what commits with it)."""
    body = check_message_input(
        content=request.content,
        message_type=request.message_type,
        is_encrypted=request.is_encrypted,
        metadata=request.metadata,
    )
    key = request.idempotency_key
    if key is not None:
        check_idempotency_key(key, field=request.idempotency_field)
    sender = request.sender

    rate = get_send_rate_limiter().check(sender.pk)
    if not rate.allowed:
        metrics.send_rate_limited.labels(transport=request.transport).inc()
        raise RateLimited(rate)

    started = time.perf_counter()
    try:
        conversation_id, participant_id = access_participant_id(user=sender, conversation_id=request.conversation_id)
    except AccessDenied:
        metrics.message_send_unauthorized.inc()
        raise
    metrics.message_delivery_duration.labels(step="authorize").observe(time.perf_counter() - started)
    if request.reply_to is not None:
        body = replace(body, reply_to=check_reply_to(conversation_id, request.reply_to))

    request_hash = _request_hash(conversation_id, body) if key is not None else ""
    started = time.perf_counter()
    try:
        # One relational transaction allocates the seq, records the idempotency key beside it and
        # persists: a failed persist rolls the counter back (no seq is burned) and leaves no
        # record, and seqs become durable in the order they are taken. What other apps write for
        # the message (the notification outbox entry) commits with it too.
        with _relational_writer(), transaction.atomic():
            now = timezone.now()
            earlier = _earlier_send(sender.pk, key, now) if key is not None else None
            if earlier is None:
                message = _persist(request, body, conversation_id, participant_id, key, request_hash, now)
    except IntegrityError:
        # The same key committed by a concurrent send a moment ago (its record's unique key):
        # everything of ours rolled back, and the retry gets what that send created.
        earlier = IdempotencyKey.objects.filter(sender_id=sender.pk, key=key).first()
        if earlier is None:
            raise StoreUnavailable() from None
    except (StoreError, DatabaseError) as exc:
        metrics.message_persisted.labels(status="error").inc()
        logger.error("persist failed for conversation %s: %s", conversation_id, exc)
        raise StoreUnavailable() from exc
    if earlier is not None:
        return _replay(earlier, request_hash, rate)
    if key is not None:
        metrics.idempotency_miss.inc()
    metrics.message_persisted.labels(status="success").inc()
    metrics.message_delivery_duration.labels(step="persist").observe(time.perf_counter() - started)
    metrics.message_created.labels(message_type=message.message_type, is_encrypted=str(message.is_encrypted).lower()).inc()
    return SendResult(message=message, replayed=False, rate=rate)


def _persist(
    request: SendRequest,
    body: MessageInput,
    conversation_id: uuid.UUID,
    participant_id: int,
    key: str | None,
    request_hash: str,
    now: datetime,
) -> Message:
    """Inside the send's transaction: the seq, the idempotency record, the message, the sender's
    read marker, what other apps commit with it, and the message.new event (on commit)."""
    seq = sql.allocate_seq(conversation_id, now)
    message = Message(
        message_id=uuid.uuid4(),
        conversation_id=conversation_id,
        seq=seq,
        sender_id=request.sender.pk,
        content=body.content,
        message_type=body.message_type,
        is_encrypted=body.is_encrypted,
        metadata=body.metadata,
        sent_at=now_ms(),
        reply_to=body.reply_to,
    )
    if key is not None:
        # Before the store write: a concurrent duplicate fails here, not after a wasted write.
        sql.insert_row(
            IdempotencyKey(
                sender_id=message.sender_id,
                key=key,
                request_hash=request_hash,
                conversation_id=conversation_id,
                seq=seq,
                message_id=message.message_id,
                created_at=now,
            )
        )
    get_message_store().insert(message)
    # Your own message is read by you: unread counts never include it.
    sql.advance_read_marker(participant_id, seq)
    _announce_persisted(message)
    events.message_new(message)
    return message


# SQLite has one writer at a time and makes the others poll for the lock with growing sleeps (up
# to 100 ms a wait): queueing this process's senders on a lock hands the database over at once.
_sqlite_writer = threading.Lock()


def _relational_writer():
    return _sqlite_writer if connection.vendor == "sqlite" else contextlib.nullcontext()


def _announce_persisted(message: Message) -> None:
    """Let other apps write what commits with the message (the notification outbox); a failure is
    logged and counted and never fails the send."""
    started = time.perf_counter()
    try:
        with transaction.atomic():  # a savepoint: the send's transaction survives a failed receiver
            message_persisted.send(sender=Message, message=message)
    except Exception:
        metrics.notification_enqueue_error.inc()
        logger.exception("a message_persisted receiver failed for message %s", message.message_id)
    metrics.message_delivery_duration.labels(step="notify").observe(time.perf_counter() - started)
