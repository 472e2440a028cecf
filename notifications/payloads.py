"""What a notification says. The same JSON goes to every backend.

Content policy: a plain text message shows an excerpt; media shows what kind it is; an
end-to-end encrypted message (is_encrypted) shows only that a message arrived, because its
content is opaque to the server and an excerpt of ciphertext would be noise at best and a leak of
client-side data at worst. The client fetches the message itself by conversation_id and seq.
"""
from __future__ import annotations

from typing import Any

from chat.models import Conversation
from chat.store import Message

EXCERPT_CHARS = 140
MEDIA_BODIES = {"image": "Sent a photo", "video": "Sent a video", "file": "Sent a file"}
ENCRYPTED_BODY = "New message"


def notification_payload(*, message: Message, conversation: Conversation, sender_name: str) -> dict[str, Any]:
    if message.is_encrypted:
        text = ENCRYPTED_BODY
    elif message.message_type == "text":
        text = message.content
        if len(text) > EXCERPT_CHARS:
            text = text[: EXCERPT_CHARS - 1] + "…"
    else:
        text = MEDIA_BODIES.get(message.message_type, ENCRYPTED_BODY)
    if conversation.kind == Conversation.Kind.GROUP:
        title = conversation.title or "Group"
        body = f"{sender_name}: {text}"
    else:
        title = sender_name
        body = text
    return {
        "type": "message.new",
        "title": title,
        "body": body,
        "conversation_id": str(message.conversation_id),
        "message_id": str(message.message_id),
        "seq": message.seq,
        # A reply says which message it answers: the client can show "replied to you".
        "reply_to": message.reply_to,
        "sender_id": str(message.sender_id),
        "sender_name": sender_name,
        "message_type": message.message_type,
        "is_encrypted": message.is_encrypted,
        "sent_at": message.sent_at.isoformat().replace("+00:00", "Z"),
    }
