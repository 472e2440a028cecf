"""The one membership rule, used by the DRF permissions, the WebSocket consumer and the services.

A caller may read or write a conversation when they are an active user, a current participant,
and not banned from it. Everything else, including an unknown conversation id, is AccessDenied:
the same answer, so nobody can probe which conversations exist.
"""
from __future__ import annotations

import uuid

from chat import sql
from chat.exceptions import AccessDenied
from chat.models import Conversation, Participant


def parse_conversation_id(value: object) -> uuid.UUID:
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except (TypeError, ValueError, AttributeError):
        raise AccessDenied() from None


def access_participant_id(*, user, conversation_id: object) -> tuple[uuid.UUID, int]:
    """The rule itself: (conversation id, the caller's participant id), or AccessDenied.

    One statement (chat.sql): the participation, the account still active (the user object a
    socket holds may be stale), and no ban. Every message send runs it."""
    if user is None or not user.is_authenticated or not user.is_active:
        raise AccessDenied()
    conversation_id = parse_conversation_id(conversation_id)
    participant_id = sql.allowed_participant_id(user.pk, conversation_id)
    if participant_id is None:
        raise AccessDenied()
    return conversation_id, participant_id


def access_conversation(*, user, conversation_id: object) -> tuple[Conversation, Participant]:
    """Fetch the conversation and the caller's participation, or raise AccessDenied."""
    _, participant_id = access_participant_id(user=user, conversation_id=conversation_id)
    try:
        participant = Participant.objects.select_related("conversation").get(pk=participant_id)
    except Participant.DoesNotExist:  # removed since the check
        raise AccessDenied() from None
    return participant.conversation, participant
