"""Reads of the chat domain. Views, the admin, the consumer and the notification worker read
conversations and messages here, never from the message store directly, so the read rules hold
on every path:

- membership: conversation lists build on the one rule (chat.access.allowed_participants);
- never past the committed counter: a store row above a conversation's last_seq belongs to a send
  whose relational transaction did not commit (its seq is taken again by the next send), so no
  reader may show it;
- a store that cannot answer is StoreUnavailable (503, or an `unavailable` frame), whoever reads;
- pages are bounded in bytes as well as in count (SPEC section 10): their messages carry content
  over CHAT_INLINE_CONTENT_BYTES as omitted (Message.inline), a page stops early once it adds up
  to CHAT_MAX_PAGE_BYTES, and the store is read a few messages at a time, so one request holds at
  most HISTORY_READ_CHUNK full messages at once. message_at is the one read of full content.
"""
from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import orjson
from django.conf import settings
from django.db.models import F, OuterRef, QuerySet, Subquery
from django.urls import reverse

from chat.access import allowed_participants
from chat.models import Attachment, Conversation
from chat.store import HistoryPage, Message, StoreError, get_message_store, utf8_length
from core.errors import NotFound, StoreUnavailable


def conversation_list_for(*, user) -> QuerySet[Conversation]:
    """The caller's conversations (those the membership rule lets them see), with their read
    position and unread count."""
    mine = allowed_participants().filter(conversation_id=OuterRef("pk"), user_id=user.pk)
    return (
        Conversation.objects.annotate(last_read_seq=Subquery(mine.values("last_read_seq")[:1]))
        .filter(last_read_seq__isnull=False)
        .annotate(unread_count=F("last_seq") - F("last_read_seq"))
    )


def conversation_last_seq(*, conversation_id: uuid.UUID) -> int:
    """Where the conversation stands now: its committed counter (0 if it is gone)."""
    return Conversation.objects.filter(pk=conversation_id).values_list("last_seq", flat=True).first() or 0


def message_history(
    *, conversation: Conversation, after_seq: int | None = None, before_seq: int | None = None, limit: int = 50
) -> HistoryPage:
    """A page of the conversation's messages in ascending seq, never past its committed counter
    (`conversation` must have been read from the database for this request)."""
    upper = conversation.last_seq + 1
    before_seq = upper if before_seq is None else min(before_seq, upper)
    return message_range(conversation_id=conversation.id, after_seq=after_seq, before_seq=before_seq, limit=limit)


# Messages read from the store at once by a page: what a read holds before large content is left
# out. Without a content-size column neither store can skip large content in the read itself, so
# this bounds a page's transient memory at HISTORY_READ_CHUNK x 10 MiB (instead of limit x 10 MiB).
HISTORY_READ_CHUNK = 10


def message_range(
    *, conversation_id: uuid.UUID, after_seq: int | None, before_seq: int, limit: int, max_bytes: int | None = None
) -> HistoryPage:
    """The messages between two seqs (both exclusive), for a caller that already holds a committed
    upper bound: a socket replaying up to the last_seq it read, or filling a gap below a seq that
    was published (publishes happen after commit). With after_seq the oldest ones, otherwise the
    newest; ascending either way. Content over the inline limit is omitted; the page ends early
    (has_more) once it holds max_bytes (CHAT_MAX_PAGE_BYTES) of messages, but never empty."""
    max_bytes = settings.CHAT_MAX_PAGE_BYTES if max_bytes is None else max_bytes
    forward = after_seq is not None
    kept: list[Message] = []
    size = 0
    while len(kept) < limit:
        try:
            chunk = get_message_store().history(
                conversation_id, after_seq=after_seq, before_seq=before_seq,
                limit=min(limit - len(kept), HISTORY_READ_CHUNK),
            )
        except StoreError as exc:
            raise StoreUnavailable() from exc
        if not chunk.messages:
            return _page(kept, forward, has_more=False)
        for message in with_attachments(chunk.messages if forward else chunk.messages[::-1]):
            message = message.inline()
            cost = _wire_bytes(message)
            if kept and size + cost > max_bytes:
                return _page(kept, forward, has_more=True)
            kept.append(message)
            size += cost
        if not chunk.has_more:
            return _page(kept, forward, has_more=False)
        if forward:
            after_seq = chunk.messages[-1].seq
        else:
            before_seq = chunk.messages[0].seq
    return _page(kept, forward, has_more=True)


def _page(kept: list[Message], forward: bool, *, has_more: bool) -> HistoryPage:
    return HistoryPage(messages=kept if forward else kept[::-1], has_more=has_more)


# What a message adds to a page beside its content and metadata (ids, times, keys), roughly.
_MESSAGE_ENVELOPE_BYTES = 300


def _wire_bytes(message: Message) -> int:
    try:
        metadata = len(orjson.dumps(message.metadata))
    except TypeError:  # integers beyond 64 bits: the send path bounds metadata at 16 KiB anyway
        metadata = 16 * 1024
    attachments = _ATTACHMENT_BYTES * len(message.attachments)
    return _MESSAGE_ENVELOPE_BYTES + attachments + metadata + (utf8_length(message.content) if message.content else 0)


# What one attachment descriptor adds to a page, at most (a 255-character name, ids, URLs).
_ATTACHMENT_BYTES = 1500


def attachment_descriptor(attachment: Attachment) -> dict[str, Any]:
    """The wire shape of an attachment: the upload's answer, and what messages, frames, history
    and notifications carry (never the bytes)."""
    return {
        "attachment_id": str(attachment.pk),
        "name": attachment.name,
        "content_type": attachment.content_type,
        "size": attachment.size,
        "sha256": attachment.sha256,
        "width": attachment.width,
        "height": attachment.height,
        "url": reverse("attachment-download", args=[attachment.pk]),
        "thumbnail_url": reverse("attachment-thumbnail", args=[attachment.pk]) if attachment.has_thumbnail else None,
    }


def with_attachments(messages: Sequence[Message]) -> list[Message]:
    """The messages with the descriptors of the attachments each carries, in one query (the store
    does not keep them: the Attachment rows are their truth)."""
    if not messages:
        return []
    found: dict[uuid.UUID, list[dict[str, Any]]] = {}
    rows = Attachment.objects.filter(
        message_id__in=[message.message_id for message in messages], state=Attachment.State.ATTACHED
    ).order_by("position")
    for row in rows:
        found.setdefault(row.message_id, []).append(attachment_descriptor(row))
    return [
        replace(message, attachments=tuple(found[message.message_id])) if message.message_id in found else message
        for message in messages
    ]


def message_at(*, conversation: Conversation, seq: object) -> Message:
    """The conversation's message at `seq`, full content included, or NotFound."""
    # Checked against the counter first: nothing past it is committed, no store read for a seq
    # that cannot exist, and no value the store's integer column cannot hold.
    if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq <= conversation.last_seq:
        raise NotFound("No such message.")
    try:
        message = get_message_store().get(conversation.id, seq)
    except StoreError as exc:
        raise StoreUnavailable() from exc
    if message is None:
        raise NotFound("No such message.")
    return with_attachments([message])[0]


def message_of(*, conversation_id: uuid.UUID, seq: int, message_id: uuid.UUID) -> Message | None:
    """The message a committed record names (an idempotency record, a notification outbox entry:
    both commit with their message, so its seq is below the counter), or None if the store does
    not have that very message."""
    try:
        message = get_message_store().get(conversation_id, seq)
    except StoreError as exc:
        raise StoreUnavailable() from exc
    if message is None or message.message_id != message_id:
        return None
    return with_attachments([message])[0]
