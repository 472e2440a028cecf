"""Reads of the chat domain. Views, the admin, the consumer and the notification worker read
conversations and messages here, never from the message store directly, so the read rules hold
on every path:

- membership: conversation lists build on the one rule (chat.access.allowed_participants);
- never past the committed counter: a store row above a conversation's last_seq belongs to a send
  whose relational transaction did not commit (its seq is taken again by the next send), so no
  reader may show it;
- a store that cannot answer is StoreUnavailable (503, or an `unavailable` frame), whoever reads.
"""
from __future__ import annotations

import uuid

from django.db.models import F, OuterRef, QuerySet, Subquery

from chat.access import allowed_participants
from chat.models import Conversation
from chat.store import HistoryPage, Message, StoreError, get_message_store
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


def message_history(
    *, conversation: Conversation, after_seq: int | None = None, before_seq: int | None = None, limit: int = 50
) -> HistoryPage:
    """A page of the conversation's messages in ascending seq, never past its committed counter
    (`conversation` must have been read from the database for this request)."""
    upper = conversation.last_seq + 1
    before_seq = upper if before_seq is None else min(before_seq, upper)
    return message_range(conversation_id=conversation.id, after_seq=after_seq, before_seq=before_seq, limit=limit)


def message_range(
    *, conversation_id: uuid.UUID, after_seq: int | None, before_seq: int, limit: int
) -> HistoryPage:
    """The messages between two seqs (both exclusive), for a caller that already holds a committed
    upper bound: a socket replaying up to the last_seq it read, or filling a gap below a seq that
    was published (publishes happen after commit)."""
    try:
        return get_message_store().history(conversation_id, after_seq=after_seq, before_seq=before_seq, limit=limit)
    except StoreError as exc:
        raise StoreUnavailable() from exc


def message_at(*, conversation: Conversation, seq: object) -> Message:
    """The conversation's message at `seq`, or NotFound."""
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
    return message


def message_of(*, conversation_id: uuid.UUID, seq: int, message_id: uuid.UUID) -> Message | None:
    """The message a committed record names (an idempotency record, a notification outbox entry:
    both commit with their message, so its seq is below the counter), or None if the store does
    not have that very message."""
    try:
        message = get_message_store().get(conversation_id, seq)
    except StoreError as exc:
        raise StoreUnavailable() from exc
    return message if message is not None and message.message_id == message_id else None
