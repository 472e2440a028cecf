"""The one membership rule, used by the DRF permissions, the WebSocket consumer and the services.

A caller may read or write a conversation when they are an active user, a current participant,
and not banned from it. Everything else, including an unknown conversation id, is AccessDenied:
the same answer, so nobody can probe which conversations exist.
"""
from __future__ import annotations

import uuid

from django.db.models import Exists

from chat.exceptions import AccessDenied
from chat.models import Ban, Conversation, Participant


def parse_conversation_id(value: object) -> uuid.UUID:
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except (TypeError, ValueError, AttributeError):
        raise AccessDenied() from None


def access_conversation(*, user, conversation_id: object) -> tuple[Conversation, Participant]:
    """Fetch the conversation and the caller's participation, or raise AccessDenied."""
    if user is None or not user.is_authenticated or not user.is_active:
        raise AccessDenied()
    conversation_id = parse_conversation_id(conversation_id)
    # One query: the participation, the account still active (the user object a socket holds may
    # be stale), and no ban.
    participant = (
        Participant.objects.select_related("conversation")
        .filter(conversation_id=conversation_id, user_id=user.pk, user__is_active=True)
        .annotate(banned=Exists(Ban.objects.filter(conversation_id=conversation_id, user_id=user.pk)))
        .first()
    )
    if participant is None or participant.banned:
        raise AccessDenied()
    return participant.conversation, participant
