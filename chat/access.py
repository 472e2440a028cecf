"""The one membership rule: who may read or write a conversation.

A caller may read or write a conversation when they are an active user, a current participant,
and not banned from it. Everything else, including an unknown conversation id, is AccessDenied:
the same answer, so nobody can probe which conversations exist.

The rule is defined once, as `allowed_participants()`: the participations that grant access.
Everything that decides who sees a conversation builds on it: the DRF permission and the
REST views (through `access_conversation`), the conversation list, the notification worker's
recipients and its check before every attempt. The send path and the WebSocket handshake run the
same rule as one hand-written statement (chat.sql.allowed_participations, through
`access_participations`) for speed;
tests/chat/test_access.py holds the two to agreement over every state a participation can be in.
"""
from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from typing import Any, NamedTuple

from django.db.models import Exists, OuterRef, QuerySet

from chat import sql
from chat.models import Attachment, Ban, Conversation, Participant
from core.errors import AccessDenied


def allowed_participants() -> QuerySet[Participant]:
    """The participations that grant access: the account is active and not banned from the
    conversation (a ban keeps the participant row, so lifting it restores access)."""
    banned = Ban.objects.filter(conversation_id=OuterRef("conversation_id"), user_id=OuterRef("user_id"))
    return Participant.objects.filter(user__is_active=True).filter(~Exists(banned))


def parse_conversation_id(value: object) -> uuid.UUID:
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except (TypeError, ValueError, AttributeError):
        raise AccessDenied() from None


class Participation(NamedTuple):
    conversation_id: uuid.UUID
    participant_id: int
    # Where the conversation stood when the rule was read (its committed counters).
    last_seq: int
    last_change: int


def access_participation(*, user, conversation_id: object) -> Participation:
    """The caller's participation, or AccessDenied: the rule as one hand-written statement
    (chat.sql), as the hot paths run it for many callers at once (`access_participations`: a
    batch of sends, the WebSocket handshakes that arrive together). The account is checked in the
    database too: the user object a socket holds may be stale."""
    participation = access_participations([(user, conversation_id)])[0]
    if participation is None:
        raise AccessDenied()
    return participation


def access_participations(requests: Sequence[tuple[Any, object]]) -> list[Participation | None]:
    """access_participation for many (user, conversation id) requests in one statement: each
    one's participation, or None where the rule refuses it (a malformed conversation id too)."""
    asked: list[tuple[uuid.UUID, uuid.UUID] | None] = []
    for user, conversation_id in requests:
        try:
            if user is None or not user.is_authenticated or not user.is_active:
                raise AccessDenied()
            asked.append((user.pk, parse_conversation_id(conversation_id)))
        except AccessDenied:
            asked.append(None)
    found = sql.allowed_participations({pair for pair in asked if pair is not None})
    return [
        Participation(pair[1], *found[pair]) if pair is not None and pair in found else None for pair in asked
    ]


def access_conversation(*, user, conversation_id: object) -> tuple[Conversation, Participant]:
    """Fetch the conversation and the caller's participation, or raise AccessDenied."""
    if user is None or not user.is_authenticated or not user.is_active:
        raise AccessDenied()
    conversation_id = parse_conversation_id(conversation_id)
    participant = (
        allowed_participants().filter(conversation_id=conversation_id, user_id=user.pk).select_related("conversation").first()
    )
    if participant is None:
        raise AccessDenied()
    return participant.conversation, participant


def access_attachment(*, user, attachment_id: object) -> Attachment:
    """An attachment the caller may read, or AccessDenied: its uploader while no message carries
    it; then whoever the membership rule lets read the conversation of the message that carries
    it. Unknown, malformed, deleted and foreign ids get the same answer."""
    denied = AccessDenied("You cannot read this attachment.")
    if user is None or not user.is_authenticated or not user.is_active:
        raise denied
    try:
        attachment_id = attachment_id if isinstance(attachment_id, uuid.UUID) else uuid.UUID(str(attachment_id))
    except (TypeError, ValueError, AttributeError):
        raise denied from None
    attachment = Attachment.objects.filter(pk=attachment_id).first()
    if attachment is None:
        raise denied
    if attachment.state == Attachment.State.UNATTACHED and attachment.uploader_id == user.pk:
        return attachment
    if attachment.state == Attachment.State.ATTACHED and (
        allowed_participants().filter(conversation_id=attachment.conversation_id, user_id=user.pk).exists()
    ):
        return attachment
    raise denied


def allowed_participations(*, participant_ids: Collection[int]) -> dict[int, tuple[int, int]]:
    """Those of the participations that still grant access, each with its conversation's committed
    (last_seq, last_change), in one query: the periodic re-check of open sockets (chat.recheck)
    runs the rule for a batch of sockets at once, and learns whether any of them is behind."""
    rows = allowed_participants().filter(pk__in=list(participant_ids)).values_list(
        "pk", "conversation__last_seq", "conversation__last_change"
    )
    return {pk: (last_seq, last_change) for pk, last_seq, last_change in rows}
