from __future__ import annotations

from chat.store import Message
from notifications.models import OutboxEntry


def notification_enqueue(*, message: Message) -> OutboxEntry:
    """Record that `message` needs push notifications. One insert; no network call."""
    return OutboxEntry.objects.create(
        message_id=message.message_id,
        conversation_id=message.conversation_id,
        seq=message.seq,
        sender_id=message.sender_id,
    )
