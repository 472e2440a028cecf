"""What a notification says. The same JSON goes to every backend.

Content policy: a plain text message shows an excerpt; media shows what kind it is (and the
descriptors of its attachments, never their bytes: the client downloads what it wants); an
end-to-end encrypted message (is_encrypted) shows only that a message arrived, because its
content is opaque to the server and an excerpt of ciphertext would be noise at best and a leak of
client-side data at worst. The client fetches the message itself by conversation_id and seq.
"""
from __future__ import annotations

import json
from typing import Any

from chat.models import Conversation
from chat.store import Message

EXCERPT_CHARS = 140
MEDIA_BODIES = {"image": "Sent a photo", "video": "Sent a video", "file": "Sent a file"}


# Web Push services refuse payloads over 4 KiB: the attachments a notification lists stop at this
# many bytes of JSON (the first ones; `attachment_count` tells how many there are, and the client
# reads the message for the rest).
MAX_ATTACHMENT_BYTES = 2048


def _attachments_within_budget(message: Message) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = []
    size = 2
    for descriptor in message.attachments:
        size += len(json.dumps(descriptor, separators=(",", ":"), ensure_ascii=False).encode()) + 1
        if size > MAX_ATTACHMENT_BYTES:
            break
        listed.append(descriptor)
    return listed


def _attachment_kind(content_type: str) -> str:
    kind = content_type.split("/", 1)[0]
    return kind if kind in ("image", "video") else "file"
ENCRYPTED_BODY = "New message"


def notification_payload(*, message: Message, conversation: Conversation, sender_name: str) -> dict[str, Any]:
    if message.is_encrypted:
        text = ENCRYPTED_BODY
    elif message.message_type == "text" and message.content:
        text = message.content
        if len(text) > EXCERPT_CHARS:
            text = text[: EXCERPT_CHARS - 1] + "…"
    elif message.attachments:
        text = MEDIA_BODIES[_attachment_kind(message.attachments[0]["content_type"])]
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
        # Names of an encrypted message's files are the client's business too.
        "attachments": [] if message.is_encrypted else _attachments_within_budget(message),
        "attachment_count": len(message.attachments),
    }
