from __future__ import annotations

from django.db.models import F, FilteredRelation, Q, QuerySet

from chat.models import Conversation


def conversation_list_for(*, user) -> QuerySet[Conversation]:
    """The caller's conversations (not those they are banned from), with their read position."""
    return (
        Conversation.objects.annotate(mine=FilteredRelation("participants", condition=Q(participants__user=user)))
        .filter(mine__isnull=False)
        .exclude(bans__user=user)
        .annotate(last_read_seq=F("mine__last_read_seq"), unread_count=F("last_seq") - F("mine__last_read_seq"))
    )
