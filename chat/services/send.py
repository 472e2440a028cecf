"""Sending a message: the only way a message is created.

The REST view and the WebSocket consumer both send through here, so validation, rate limiting,
authorization and idempotency cannot be skipped by any transport. Lifecycle: validate ->
rate-limit -> authorize -> idempotency (looked up just before the transaction, recorded in it) ->
(in the transaction) reply target -> allocate seq +
attach uploads + persist (+ whatever must commit with the message: chat.signals.messages_persisted)
-> publish, after commit. WebSocket sends commit in groups (`_send_batcher`), each with its own outcome.

This is the hot path (docs/performance.md): the per-message statements are hand-written
(chat.sql) and nothing here reads more than it must.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
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
from chat.access import access_participations
from chat.models import IdempotencyKey
from chat.selectors import committed_message, message_of
from chat.services.attachments import attachments_attach, check_attachment_ids
from chat.signals import messages_persisted
from chat.store import Message, StoreError, get_message_store
from core.errors import (
    AccessDenied,
    ChatError,
    IdempotencyMismatch,
    RateLimited,
    StoreUnavailable,
    ValidationFailed,
)
from core.batching import Batcher, per_loop
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
    attachments: object = None
    # Where an idempotency key error is reported: the REST header or the frame's field.
    idempotency_field: str = "Idempotency-Key"
    transport: str = "rest"


@dataclass(frozen=True, slots=True)
class MessageInput:
    content: str
    message_type: str
    is_encrypted: bool
    metadata: dict[str, Any]
    attachments: tuple[uuid.UUID, ...] = ()
    reply_to: int | None = None  # its target is checked in the send's transaction (check_reply_target)


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
    *,
    content: object,
    message_type: object = "text",
    is_encrypted: object = False,
    metadata: object = None,
    attachments: object = None,
) -> MessageInput:
    """Validate a message body against SPEC limits; raise ValidationFailed with field errors."""
    errors: dict[str, list[str]] = {}
    try:
        attachment_ids = check_attachment_ids(attachments)
    except ValidationFailed as exc:
        errors.update(exc.detail)
        attachment_ids = ()
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
    if not isinstance(content, str) or (content == "" and not attachment_ids):
        errors["content"] = ["Must be a non-empty string (it may be empty when the message carries attachments)."]
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
    return MessageInput(content, message_type, is_encrypted, metadata, attachment_ids)


def check_idempotency_key(key: object, *, field: str) -> str:
    if (
        not isinstance(key, str)
        or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH
        or not all(" " <= ch <= "~" for ch in key)
    ):
        raise ValidationFailed({field: [f"Must be 1-{MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII characters."]})
    return key


def check_reply_to(reply_to: object) -> int:
    """The shape of a reply's target: a seq (its message is checked in the send's transaction,
    `check_reply_target`, after a retry has had the chance to replay)."""
    if isinstance(reply_to, bool) or not isinstance(reply_to, int) or not 1 <= reply_to < 2**63:
        raise ValidationFailed({"reply_to": ["Must be the seq of a message of this conversation."]})
    return reply_to


def check_reply_target(conversation_id: uuid.UUID, reply_to: int) -> None:
    """A reply names a message of the same conversation that is not deleted (SPEC 4.1); a seq the
    conversation has not reached (another conversation's, say) is no message of it."""
    message = committed_message(conversation_id=conversation_id, seq=reply_to)
    if message is None:
        raise ValidationFailed({"reply_to": ["No such message in this conversation."]})
    if message.deleted:
        raise ValidationFailed({"reply_to": ["That message was deleted."]})


def _request_hash(conversation_id: uuid.UUID, body: MessageInput) -> str:
    fields: list[Any] = [str(conversation_id), body.content, body.message_type, body.is_encrypted, body.metadata]
    # Attachments and reply_to only when there are some: the hashes of records written before
    # either existed stay valid.
    if body.attachments:
        fields.append([str(attachment_id) for attachment_id in body.attachments])
    if body.reply_to is not None:
        fields.append(body.reply_to)
    canonical = json.dumps(
        fields,
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


def _earlier_sends(keyed: list[_Accepted], now: datetime) -> tuple[dict[tuple[uuid.UUID, str], IdempotencyKey], list[int]]:
    """The senders' records for these sends' keys within their lifetime, (sender id, key) ->
    record (one statement, and a second one to read the records found); and the ids of those past
    it, which the sends' transaction deletes so that the keys can be used again. Read before the transaction, to keep it short: a record
    committed meanwhile by another process makes the transaction's insert of the key fail on its
    unique constraint, and the send is then answered from that record (`_persist_accepted`)."""
    record_ids = sql.idempotency_record_ids({(send.request.sender.pk, send.key) for send in keyed})
    if not record_ids:
        return {}, []
    records, expired = {}, []
    for record in IdempotencyKey.objects.filter(pk__in=record_ids.values()):
        if record.created_at > now - IDEMPOTENCY_TTL:
            records[(record.sender_id, record.key)] = record
        else:
            expired.append(record.pk)
    return records, expired


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
    outcome = _persist_batch([request])[0]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


async def amessage_send(request: SendRequest) -> SendResult:
    """message_send for the event loop (the WebSocket path), with group commit: the sends a process
    receives while a batch is being committed go together in the next one (`_send_batcher`). The
    blocking part runs in the thread pool, and the events the sends committed are published from
    the loop itself, so no thread waits for the loop and the loop never waits for a thread to
    publish."""
    return await _send_batcher().submit(request)


# (the process admits CHAT_MAX_SENDS_IN_FLIGHT sends at a time: 64 by default)
MAX_BATCH = 64


async def _commit_batch(requests: list[SendRequest]) -> list[SendResult | Exception]:
    """Group commit for one event loop's sends. Each send alone pays a thread hop, a relational
    transaction (on SQLite, the one write lock of the database, taken by each process in turn)
    and a store round trip; a batch pays one hop, one transaction and concurrent store writes for
    all of its sends."""
    metrics.send_batch_size.observe(len(requests))
    try:
        outcomes, committed = await in_thread(events.collecting(_persist_batch))(requests)
    except Exception:  # not a per-send outcome (a bug): every send of the batch fails
        logger.exception("committing a batch of %d sends failed", len(requests))
        return [StoreUnavailable() for _ in requests]
    try:
        # One round trip for the batch's events: each conversation's in seq order.
        await events.apublish_collected(committed)
    except Exception:  # the sends committed: a publish never fails them (clients catch up)
        logger.exception("publishing a batch's events failed")
    return outcomes


_send_batcher = per_loop(lambda: Batcher(_commit_batch, max_batch=MAX_BATCH))


@dataclass(frozen=True, slots=True)
class _Accepted:
    """A send that passed validation, the rate limit and authorization: what its transaction needs."""

    request: SendRequest
    body: MessageInput
    key: str | None
    conversation_id: uuid.UUID
    participant_id: int
    request_hash: str
    rate: RateDecision


def _validated(request: SendRequest) -> tuple[MessageInput, str | None]:
    """A send's body and idempotency key, checked; ValidationFailed refuses it."""
    body = check_message_input(
        content=request.content,
        message_type=request.message_type,
        is_encrypted=request.is_encrypted,
        metadata=request.metadata,
        attachments=request.attachments,
    )
    key = request.idempotency_key
    if key is not None:
        check_idempotency_key(key, field=request.idempotency_field)
    if request.reply_to is not None:
        body = replace(body, reply_to=check_reply_to(request.reply_to))
    return body, key


def _admitted(
    requests: list[SendRequest], validated: list[tuple[int, MessageInput, str | None]], rates: list[RateDecision]
) -> tuple[list[tuple[int, _Accepted]], list[tuple[int, SendOutcome]]]:
    """The validated sends admitted (within their senders' rates, and the membership rule lets each
    sender write its conversation: one statement for all of them), and the refused ones with the
    ChatError that refuses each."""
    refused: list[tuple[int, SendOutcome]] = []
    within: list[tuple[int, MessageInput, str | None, RateDecision]] = []
    for (index, body, key), rate in zip(validated, rates, strict=True):
        if rate.allowed:
            within.append((index, body, key, rate))
        else:
            metrics.send_rate_limited.labels(transport=requests[index].transport).inc()
            refused.append((index, RateLimited(rate)))
    started = time.perf_counter()
    asked = [(requests[index].sender, requests[index].conversation_id) for index, _, _, _ in within]
    try:
        participations = access_participations(asked)
    except Exception:
        if len(asked) <= 1:
            logger.exception("authorizing a send failed")
            return [], refused + [(index, StoreUnavailable()) for index, *_ in within]
        # A fault reading for the batch: each send is read alone, and only those that fail so fail.
        logger.warning("authorizing a batch of %d sends failed; reading them one by one", len(asked), exc_info=True)
        participations = []
        for one in asked:
            try:
                participations.append(access_participations([one])[0])
            except Exception as exc:
                logger.error("authorizing a send failed: %s", exc)
                participations.append(exc)
    elapsed = time.perf_counter() - started  # what each send of the batch waited for: observed once per send
    accepted: list[tuple[int, _Accepted]] = []
    for (index, body, key, rate), participation in zip(within, participations, strict=True):
        if isinstance(participation, Exception):
            refused.append((index, StoreUnavailable()))
        elif participation is None:
            metrics.message_send_unauthorized.inc()
            refused.append((index, AccessDenied()))
        else:
            conversation_id = participation.conversation_id
            request_hash = _request_hash(conversation_id, body) if key is not None else ""
            send = _Accepted(requests[index], body, key, conversation_id, participation.participant_id, request_hash, rate)
            accepted.append((index, send))
            metrics.message_delivery_duration.labels(step="authorize").observe(elapsed)
    return accepted, refused


SendOutcome = SendResult | ChatError


def _persist_batch(requests: list[SendRequest]) -> list[SendOutcome]:
    """Everything of these sends up to and including the commit, one outcome per request in order:
    each is validated, the valid ones' rates are checked together (one call) and they are
    authorized together (one statement), and the admitted ones commit in one transaction
    (chat.services.send._persist_accepted)."""
    outcomes: list[SendOutcome | None] = [None] * len(requests)
    validated: list[tuple[int, MessageInput, str | None]] = []
    for index, request in enumerate(requests):
        try:
            validated.append((index, *_validated(request)))
        except ChatError as exc:
            outcomes[index] = exc
        except Exception:  # a bug validating this send: it fails alone
            logger.exception("validating a send failed")
            outcomes[index] = StoreUnavailable()
    # Every valid send counts against its sender's rate (one round trip for the batch), the ones
    # then refused by the membership rule included, as when each send was checked alone.
    rates = get_send_rate_limiter().check_many([requests[index].sender.pk for index, _, _ in validated])
    accepted, refused = _admitted(requests, validated, rates)
    for index, outcome in refused:
        outcomes[index] = outcome
    if accepted:
        for index, outcome in _persist_accepted(accepted):
            outcomes[index] = outcome
    return outcomes  # type: ignore[return-value]


def _persist_accepted(accepted: list[tuple[int, _Accepted]], *, retried: bool = False) -> list[tuple[int, SendOutcome]]:
    """One relational transaction for all of `accepted`: for each, the sender's earlier send with the
    same key (looked up just before), or the seq allocated and the key recorded beside it; then the
    store writes (concurrent), and what commits with each message. A failed persist rolls every
    counter back (no seq is burned) and leaves no record, and seqs become durable in the order
    they are taken."""
    first_uses, reuses = _split_reused_keys(accepted)
    if reuses:
        # A key an earlier send of this batch uses: that send commits first, and this one after it
        # (then it replays that send, is refused for another body, or goes on if that send failed).
        return _persist_accepted(first_uses) + _persist_accepted(reuses)
    started = time.perf_counter()
    earlier: list[tuple[int, _Accepted, IdempotencyKey]] = []
    created: list[tuple[int, _Accepted, Message]] = []
    refused: list[tuple[int, SendOutcome]] = []
    try:
        now = timezone.now()
        found, expired = _earlier_sends([send for _, send in accepted if send.key is not None], now)
        with _relational_writer(), transaction.atomic():
            if expired:
                IdempotencyKey.objects.filter(pk__in=expired).delete()
            new_records: list[dict] = []
            # Each conversation's sends in the order they arrived in.
            fresh: dict[uuid.UUID, list[tuple[int, _Accepted]]] = {}
            for index, send in accepted:
                record = found.get((send.request.sender.pk, send.key)) if send.key is not None else None
                if record is not None:
                    earlier.append((index, send, record))
                else:
                    fresh.setdefault(send.conversation_id, []).append((index, send))
            # One statement takes every conversation's seqs for its sends up to the first with
            # something to check (a reply target, uploads), and locks all of the batch's rows
            # (in one order for every batch of every process: see sql.allocate_seqs).
            leading = {conversation_id: _plain_run(sends) for conversation_id, sends in fresh.items()}
            last_seqs = sql.allocate_seqs({c: len(run) for c, run in leading.items()}, now) if fresh else {}
            for conversation_id, sends in fresh.items():
                run = leading[conversation_id]
                if run:
                    created += _messages_at(last_seqs[conversation_id] - len(run) + 1, run, new_records)
                # The rest one by one, in order: the checked sends each with its own seq.
                plain: list[tuple[int, _Accepted]] = []
                for index, send in sends[len(run):]:
                    if _is_plain(send):
                        plain.append((index, send))
                        continue
                    created += _allocate_plain(conversation_id, plain, now, new_records)
                    plain = []
                    try:
                        created.append((index, send, _allocate_checked(send, now)))
                    except ValidationFailed as exc:  # its reply target or uploads are refused: it fails alone
                        refused.append((index, exc))
                created += _allocate_plain(conversation_id, plain, now, new_records)
            # Before the store write: a concurrent duplicate fails here, not after a wasted write.
            sql.insert_rows(IdempotencyKey, new_records, created_at=now)
            # What commits with the messages is written while the store writes are in flight.
            get_message_store().insert(*(message for _, _, message in created), meanwhile=lambda: _commit_with(created))
    except IntegrityError as exc:
        # A send of another process committed one of these keys after the lookup (its record's
        # unique key): everything of ours rolled back. Once more, the lookup finds that send and
        # this one replays it; past that, each send goes alone.
        if not retried:
            return _persist_accepted(accepted, retried=True)
        if len(accepted) > 1:
            return [outcome for one in accepted for outcome in _persist_accepted([one])]
        metrics.message_persisted.labels(status="error").inc()
        logger.error("persist failed twice on a unique key: %s", exc)
        return [(index, StoreUnavailable()) for index, _ in accepted]
    except DatabaseError as exc:
        if len(accepted) > 1 and not _write_lock_wait_ran_out(exc):
            # The relational database refused the batch (a deadlock with a transaction outside
            # the send path, a serialization failure): each send goes alone, and only those that
            # fail so are answered with the failure.
            logger.warning("a batch of %d sends failed (%s); committing them one by one", len(accepted), exc)
            return [outcome for one in accepted for outcome in _persist_accepted([one])]
        metrics.message_persisted.labels(status="error").inc()
        logger.error("persist failed: %s", exc)
        return [(index, StoreUnavailable()) for index, _ in accepted]
    except StoreError as exc:
        metrics.message_persisted.labels(status="error").inc(len(accepted))
        logger.error("persist failed for %d sends: %s", len(accepted), exc)
        return [(index, StoreUnavailable()) for index, _ in accepted]

    outcomes: list[tuple[int, SendOutcome]] = refused
    for index, send, record in earlier:
        try:
            outcomes.append((index, _replay(record, send.request_hash, send.rate)))
        except ChatError as exc:
            outcomes.append((index, exc))
    elapsed = time.perf_counter() - started
    if created:
        metrics.message_persisted.labels(status="success").inc(len(created))
        if keyed := sum(send.key is not None for _, send, _ in created):
            metrics.idempotency_miss.inc(keyed)
    for index, send, message in created:
        metrics.message_delivery_duration.labels(step="persist").observe(elapsed)
        metrics.message_created.labels(message_type=message.message_type, is_encrypted=str(message.is_encrypted).lower()).inc()
        outcomes.append((index, SendResult(message=message, replayed=False, rate=send.rate)))
    return outcomes


def _split_reused_keys(accepted: list[tuple[int, _Accepted]]) -> tuple[list[tuple[int, _Accepted]], list[tuple[int, _Accepted]]]:
    """The sends whose key no earlier send of the batch uses (in the order they arrived), and the
    rest."""
    seen: set[tuple[uuid.UUID, str]] = set()
    first_uses, reuses = [], []
    for item in accepted:
        send = item[1]
        if send.key is None:
            first_uses.append(item)
            continue
        key = (send.request.sender.pk, send.key)
        (reuses if key in seen else first_uses).append(item)
        seen.add(key)
    return first_uses, reuses


def _message_of(send: _Accepted, seq: int) -> tuple[Message, dict | None]:
    """The message a send creates at `seq`, and the idempotency record written beside it when the
    send has a key (an IdempotencyKey row for sql.insert_rows, created at the batch's `now`)."""
    body = send.body
    message = Message(
        message_id=uuid.uuid4(),
        conversation_id=send.conversation_id,
        seq=seq,
        sender_id=send.request.sender.pk,
        content=body.content,
        message_type=body.message_type,
        is_encrypted=body.is_encrypted,
        metadata=body.metadata,
        sent_at=now_ms(),
        reply_to=body.reply_to,
    )
    if send.key is None:
        return message, None
    return message, {
        "sender_id": message.sender_id, "key": send.key, "request_hash": send.request_hash,
        "conversation_id": send.conversation_id, "seq": seq, "message_id": message.message_id,
    }


def _is_plain(send: _Accepted) -> bool:
    """A send with nothing to check in its transaction (no reply target, no uploads)."""
    return send.body.reply_to is None and not send.body.attachments


def _plain_run(sends: list[tuple[int, _Accepted]]) -> list[tuple[int, _Accepted]]:
    """The sends before the first that is not plain."""
    for position, (_, send) in enumerate(sends):
        if not _is_plain(send):
            return sends[:position]
    return sends


def _messages_at(
    first: int, plain: list[tuple[int, _Accepted]], new_records: list[dict]
) -> list[tuple[int, _Accepted, Message]]:
    """The messages of plain sends at seqs `first`, `first` + 1, ...; their idempotency records
    join `new_records`, which the batch inserts in one statement."""
    created = []
    for offset, (index, send) in enumerate(plain):
        message, record = _message_of(send, first + offset)
        created.append((index, send, message))
        if record is not None:
            new_records.append(record)
    return created


def _allocate_plain(
    conversation_id: uuid.UUID, plain: list[tuple[int, _Accepted]], now: datetime, new_records: list[dict]
) -> list[tuple[int, _Accepted, Message]]:
    """Inside the batch's transaction: the next seqs of a conversation for plain sends, in one
    statement, and their messages."""
    if not plain:
        return []
    last = sql.allocate_seqs({conversation_id: len(plain)}, now)[conversation_id]
    return _messages_at(last - len(plain) + 1, plain, new_records)


def _allocate_checked(send: _Accepted, now: datetime) -> Message:
    """Inside the batch's transaction, for a send whose reply target or uploads must be checked:
    its seq, its idempotency record, and the uploads the message carries (in a savepoint of their
    own: a list that cannot be attached gives back this send's seq and record, and the other sends
    of its batch go on)."""
    body = send.body
    if body.reply_to is not None:
        check_reply_target(send.conversation_id, body.reply_to)  # before anything is allocated
    with transaction.atomic() if body.attachments else contextlib.nullcontext():
        message, record = _message_of(send, sql.allocate_seqs({send.conversation_id: 1}, now)[send.conversation_id])
        if record is not None:
            # Before the uploads, so a concurrent duplicate fails on the key (and replays), not on them.
            sql.insert_rows(IdempotencyKey, [record], created_at=now)
        if body.attachments:
            message = replace(message, attachments=attachments_attach(
                sender_id=message.sender_id, attachment_ids=body.attachments, conversation_id=send.conversation_id,
                message_id=message.message_id, seq=message.seq,
            ))
        return message


def _commit_with(created: list[tuple[int, _Accepted, Message]]) -> None:
    """Inside the batch's transaction, while the store writes are in flight: the senders' read
    markers, what other apps commit with the messages, and the message.new events (on commit)."""
    # Your own message is read by you: unread counts never include it.
    read_up_to: dict[int, int] = {}
    for _, send, message in created:
        read_up_to[send.participant_id] = max(read_up_to.get(send.participant_id, 0), message.seq)
    sql.advance_read_markers(read_up_to)
    _announce_persisted([message for _, _, message in created])
    for _, _, message in created:
        events.message_new(message)


class _SqliteWriter:
    """SQLite has one writer at a time, and a writer that finds the lock taken polls for it with
    growing sleeps (up to 100 ms a wait): it sleeps on while the lock is free again. Senders queue
    here instead, on a lock that hands the database over at once: a thread lock within the process,
    and an advisory file lock (flock) beside the database file between the processes serving it."""

    def __init__(self) -> None:
        self._threads = threading.Lock()
        self._file: int | None = None  # -1: an in-memory database, which no other process shares

    def __enter__(self) -> None:
        self._threads.acquire()
        try:
            if self._file is None:
                name = str(connection.settings_dict["NAME"])
                in_memory = name.startswith((":memory:", "file:")) or not name
                self._file = -1 if in_memory else os.open(f"{name}.writer-lock", os.O_RDWR | os.O_CREAT, 0o600)
            if self._file >= 0:
                fcntl.flock(self._file, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise

    def __exit__(self, *exc_info) -> None:
        try:
            if self._file >= 0:
                fcntl.flock(self._file, fcntl.LOCK_UN)
        finally:
            self._threads.release()


_sqlite_writer = _SqliteWriter()


def _write_lock_wait_ran_out(error: DatabaseError) -> bool:
    """SQLite's write lock stayed taken through the connection's whole timeout (a long transaction
    outside the send path): each send of the batch alone would wait as long again."""
    return getattr(error.__cause__, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY


def _relational_writer():
    return _sqlite_writer if connection.vendor == "sqlite" else contextlib.nullcontext()


def _announce_persisted(messages: list[Message]) -> None:
    """Let other apps write what commits with the messages (the notification outbox); a failure is
    logged and counted and never fails the sends."""
    if not messages:
        return
    started = time.perf_counter()
    try:
        with transaction.atomic():  # a savepoint: the sends' transaction survives a failed receiver
            messages_persisted.send(sender=Message, messages=messages)
    except Exception:
        if len(messages) > 1:  # one message's failure must not cost the others their notifications
            for message in messages:
                _announce_persisted([message])
            return
        metrics.notification_enqueue_error.inc()
        logger.exception("a messages_persisted receiver failed for message %s", messages[0].message_id)
    elapsed = time.perf_counter() - started
    for _ in messages:  # what each send waited for: observed once per send
        metrics.message_delivery_duration.labels(step="notify").observe(elapsed)
