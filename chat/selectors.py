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
from dataclasses import dataclass, replace
from typing import Any

import orjson
from django.conf import settings
from django.db.models import F, OuterRef, QuerySet, Subquery
from django.urls import reverse

from accounts.models import User
from chat import sql
from chat.access import allowed_participants
from chat.models import Attachment, Ban, Conversation
from chat.store import Change, Edit, HistoryPage, Message, StoreError, get_message_store, utf8_length
from core.errors import NotFound, StoreUnavailable


def conversation_list_for(*, user) -> QuerySet[Conversation]:
    """The caller's conversations (those the membership rule lets them see), with their read
    position, unread count and whether they muted it."""
    mine = allowed_participants().filter(conversation_id=OuterRef("pk"), user_id=user.pk)
    return (
        Conversation.objects.annotate(
            last_read_seq=Subquery(mine.values("last_read_seq")[:1]), muted=Subquery(mine.values("muted")[:1])
        )
        .filter(last_read_seq__isnull=False)
        .annotate(unread_count=F("last_seq") - F("last_read_seq"))
    )


@dataclass(frozen=True, slots=True)
class Standing:
    """Where one of the user's conversations stands: what a user stream needs to carry it."""

    participant_id: int
    conversation_id: uuid.UUID
    last_seq: int
    last_change: int


def stream_standings(*, user, conversation_ids: list[uuid.UUID] | None = None, limit: int | None = None) -> list[Standing]:
    """The user's conversations under the membership rule (all, or those of `conversation_ids`),
    most recently active first, at most `limit`: one query."""
    rows = allowed_participants().filter(user_id=user.pk)
    if conversation_ids is not None:
        rows = rows.filter(conversation_id__in=list(conversation_ids))
    rows = rows.order_by("-conversation__last_activity_at", "conversation_id").values_list(
        "pk", "conversation_id", "conversation__last_seq", "conversation__last_change"
    )
    return [Standing(*row) for row in (rows[:limit] if limit is not None else rows)]


def conversation_object(conversation: Conversation) -> dict:
    """The conversation as REST shows it (GET conversations/{id}/), as plain JSON values: what
    conversation.joined and conversation.updated carry."""
    from rest_framework.renderers import JSONRenderer

    from chat.serializers import ConversationOutput  # the serializers import the services, which import this

    return orjson.loads(JSONRenderer().render(ConversationOutput(conversation).data))


def conversation_shape(*, conversation_id: uuid.UUID) -> dict:
    return conversation_object(Conversation.objects.get(pk=conversation_id))


def access_lost_reason(*, user, conversation_id: uuid.UUID) -> str:
    """Why the user may no longer read the conversation, as conversation.left or a close says it:
    "inactive" (the account), "banned", or "removed" (no longer a participant)."""
    if not User.objects.filter(pk=user.pk, is_active=True).exists():
        return "inactive"
    if Ban.objects.filter(conversation_id=conversation_id, user_id=user.pk).exists():
        return "banned"
    return "removed"


def conversation_muted_by(*, conversation_id: uuid.UUID, user) -> bool:
    """Whether `user` muted the conversation (False when they are not in it)."""
    return bool(allowed_participants().filter(conversation_id=conversation_id, user_id=user.pk).values_list("muted", flat=True).first())


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
    """The messages with the descriptors of the attachments each carries (the store does not keep
    them: the Attachment rows are their truth): one hand-written statement finds which messages
    carry any, and only those are read with the ORM."""
    if not messages:
        return []
    carrying = sql.messages_with_attachments({message.message_id for message in messages})
    if not carrying:
        return list(messages)
    found: dict[uuid.UUID, list[dict[str, Any]]] = {}
    rows = Attachment.objects.filter(message_id__in=carrying, state=Attachment.State.ATTACHED).order_by("position")
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


def committed_message(*, conversation_id: uuid.UUID, seq: int) -> Message | None:
    """The conversation's message at `seq` if its send committed, else None."""
    committed = Conversation.objects.filter(pk=conversation_id).values_list("last_seq", flat=True).first() or 0
    if seq > committed:
        return None
    try:
        return get_message_store().get(conversation_id, seq)
    except StoreError as exc:
        raise StoreUnavailable() from exc


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


# --- what REST shows of a message beside the message itself (SPEC 4.1) ----------------------------

def message_views(*, conversation_id: uuid.UUID, messages: list[Message], viewer_id: uuid.UUID | None) -> list[dict]:
    """Messages as REST reads show them: each with its `reactions` ({emoji: {count, me}}, `me`
    for the viewer) and its `reply_count`, read for the whole list at once (a query per store
    bucket, never one per message). Frames carry neither: they change with every reaction and
    reply, which the reaction frames and message.new (with reply_to) announce."""
    if not messages:
        return []
    seqs = [message.seq for message in messages]
    store = get_message_store()
    try:
        reactions = store.reactions(conversation_id, seqs, viewer_id)
        reply_counts = store.reply_counts(conversation_id, seqs)
    except StoreError as exc:
        raise StoreUnavailable() from exc
    return [
        {**message.as_dict(), "reactions": reactions.get(message.seq, {}), "reply_count": reply_counts.get(message.seq, 0)}
        for message in messages
    ]


def message_replies(*, conversation: Conversation, seq: object, after_seq: int = 0, limit: int = 50) -> HistoryPage:
    """GET conversations/{id}/messages/{seq}/replies/: the thread of the message at `seq`, ascending,
    never past the committed counter; bounded in bytes like a history page (content over the
    inline limit omitted, the page ending early once it holds CHAT_MAX_PAGE_BYTES)."""
    parent = message_at(conversation=conversation, seq=seq)
    upper = conversation.last_seq + 1
    kept: list[Message] = []
    size = 0
    store = get_message_store()
    while len(kept) < limit:
        try:
            chunk = store.replies(
                conversation.id, parent.seq, after_seq=after_seq, before_seq=upper, limit=min(limit - len(kept), HISTORY_READ_CHUNK)
            )
        except StoreError as exc:
            raise StoreUnavailable() from exc
        for message in chunk.messages:
            message = message.inline()
            cost = _wire_bytes(message)
            if kept and size + cost > settings.CHAT_MAX_PAGE_BYTES:
                return HistoryPage(kept, has_more=True)
            kept.append(message)
            size += cost
        if not chunk.has_more or not chunk.messages:
            return HistoryPage(kept, has_more=False)
        after_seq = chunk.messages[-1].seq
    return HistoryPage(kept, has_more=True)


def message_edits(
    *, conversation: Conversation, seq: int, before_change: int | None = None, limit: int = 20
) -> tuple[list[Edit], bool]:
    """A message's earlier versions, newest first, and whether older ones follow (page on with
    before_change = the last one's change). Never past the committed change counter; read a few
    at a time and bounded in bytes like a history page, never empty while there is one."""
    upper = conversation.last_change + 1 if before_change is None else min(before_change, conversation.last_change + 1)
    kept: list[Edit] = []
    size = 0
    while len(kept) < limit:
        wanted = min(limit - len(kept), HISTORY_READ_CHUNK)
        try:
            chunk = get_message_store().edits(conversation.id, seq, before_change=upper, limit=wanted)
        except StoreError as exc:
            raise StoreUnavailable() from exc
        for edit in chunk:
            cost = _MESSAGE_ENVELOPE_BYTES + utf8_length(edit.content)
            if kept and size + cost > settings.CHAT_MAX_PAGE_BYTES:
                return kept, True
            kept.append(edit)
            size += cost
        if len(chunk) < wanted:
            return kept, False
        upper = chunk[-1].change
    try:
        more = bool(get_message_store().edits(conversation.id, seq, before_change=upper, limit=1))
    except StoreError as exc:
        raise StoreUnavailable() from exc
    return kept, more


# --- the change log (SPEC 4.1) ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ChangePage:
    # Each change with the message it names as it is now (inline), for the kinds that show it
    # (`updated`); None for the others.
    changes: list[tuple[Change, Message | None]]
    has_more: bool


def change_range(
    *, conversation_id: uuid.UUID, after_change: int, before_change: int, limit: int, max_bytes: int | None = None
) -> ChangePage:
    """The changes strictly between two numbers, ascending, for a caller that holds a committed
    upper bound (the conversation's last_change as it read it, or a change that was published:
    publishes happen after commit). Bounded in bytes like a history page (the edited messages
    travel with their changes); never empty while there is one."""
    max_bytes = settings.CHAT_MAX_PAGE_BYTES if max_bytes is None else max_bytes
    store = get_message_store()
    try:
        changes = store.changes(conversation_id, after_change=after_change, before_change=before_change, limit=limit)
        kept: list[tuple[Change, Message | None]] = []
        size = 0
        for change in changes:
            message = None
            if change.kind == "updated":
                message = store.get(conversation_id, change.seq)
                message = with_attachments([message.inline()])[0] if message is not None else None
            cost = _MESSAGE_ENVELOPE_BYTES + (_wire_bytes(message) if message is not None else 0)
            if kept and size + cost > max_bytes:
                return ChangePage(kept, has_more=True)
            kept.append((change, message))
            size += cost
    except StoreError as exc:
        raise StoreUnavailable() from exc
    return ChangePage(kept, has_more=len(changes) == limit and (not kept or kept[-1][0].change < before_change - 1))


def change_history(*, conversation: Conversation, after_change: int = 0, limit: int = 50) -> ChangePage:
    """GET conversations/{id}/changes/: the changes after a cursor, ascending, never past the
    committed last_change (`conversation` read from the database for this request)."""
    upper = conversation.last_change + 1
    if after_change + 1 >= upper:
        return ChangePage([], has_more=False)
    return change_range(conversation_id=conversation.id, after_change=after_change, before_change=upper, limit=limit)


def change_frame(conversation_id: uuid.UUID, change: Change, message: Message | None) -> dict:
    """A change as the socket event and frame that announce it (SPEC section 5)."""
    frame: dict = {"type": f"message.{change.kind}" if change.kind in ("updated", "deleted") else change.kind}
    frame["conversation_id"] = str(conversation_id)
    if change.kind == "updated" and message is not None:
        frame["message"] = message.as_dict()
    else:
        frame.update(change.data)
        frame["seq"] = change.seq
    frame["change"] = change.change
    return frame


def change_entry(change: Change, message: Message | None) -> dict:
    """A change as GET conversations/{id}/changes/ lists it."""
    entry = change.as_dict()
    if message is not None:
        entry["message"] = message.as_dict()
    return entry
