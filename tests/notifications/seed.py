"""Seeds a database for worker-process tests: `python -m tests.notifications.seed MESSAGES DEVICES`.

Alice sends MESSAGES messages to a group with Bob, who has DEVICES fcm devices; so the outbox
holds MESSAGES entries, which expand to MESSAGES * DEVICES deliveries."""
from __future__ import annotations

import os
import sys
import uuid


def main(messages: int, devices: int) -> None:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
    django.setup()

    from accounts.models import User
    from chat.services import conversations, send as sending
    from notifications.models import Device

    suffix = uuid.uuid4().hex[:8]
    alice = User.objects.create_user(username=f"alice-{suffix}", password="long-enough-pass-42")
    bob = User.objects.create_user(username=f"bob-{suffix}", password="long-enough-pass-42")
    conversation, _ = conversations.conversation_create(
        creator=alice, kind="group", title="seeded", participant_ids=[bob.pk]
    )
    for index in range(devices):
        Device.objects.create(user=bob, kind=Device.Kind.FCM, token=f"token-{suffix}-{index}")
    for index in range(messages):
        sending.message_send(sending.SendRequest(sender=alice, conversation_id=conversation.pk, content=f"message {index}"))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
