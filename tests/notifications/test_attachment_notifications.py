"""Notifications of messages with attachments carry their descriptors (never bytes), and the
worker's housekeeping sweeps the attachments nobody may read any more."""
import json
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.files.base import ContentFile
from django.utils import timezone

from chat.models import Attachment
from chat.services import send as sending
from chat.services.attachments import attachment_create
from tests.chat.attachment_files import jpeg

pytestmark = pytest.mark.django_db


def stored(user, name="photo.jpg", data=None) -> Attachment:
    data = jpeg() if data is None else data
    return attachment_create(uploader=user, file=ContentFile(data), name=name, size=len(data))


def send(sender, conversation, attachments, **fields):
    fields.setdefault("content", "")
    return sending.message_send(sending.SendRequest(
        sender=sender, conversation_id=conversation.pk, attachments=[str(a.pk) for a in attachments], **fields
    )).message


def test_the_notification_says_a_photo_came_and_describes_it(webhook, make_user, make_group, make_device, make_worker):
    alice, bob = make_user("alice"), make_user("bob")
    make_device(bob)
    message = send(alice, make_group(alice, bob, title="trip"), [stored(alice)])

    make_worker().run(once=True)

    notification = json.loads(webhook.received[0].body)["notification"]
    assert notification["body"] == "alice: Sent a photo"
    assert notification["attachments"] == list(message.attachments)
    assert notification["attachments"][0]["content_type"] == "image/jpeg"
    assert notification["attachment_count"] == 1


def test_ten_long_named_files_still_fit_a_web_push_payload(webhook, make_user, make_group, make_device, make_worker):
    alice, bob = make_user("alice"), make_user("bob")
    make_device(bob)
    files = [stored(alice, f"{i}{'x' * 250}.txt", b"words") for i in range(10)]
    message = send(alice, make_group(alice, bob, title="t" * 200), files, content="y" * 500)

    make_worker().run(once=True)

    notification = json.loads(webhook.received[0].body)["notification"]
    assert len(json.dumps(notification).encode()) < 3500  # Web Push services take 4 KiB, encryption included
    assert notification["attachment_count"] == 10
    assert 1 <= len(notification["attachments"]) < 10
    assert notification["attachments"] == list(message.attachments[: len(notification["attachments"])])


def test_an_encrypted_message_tells_nothing_of_its_files(webhook, make_user, make_group, make_device, make_worker):
    alice, bob = make_user("alice"), make_user("bob")
    make_device(bob)
    send(alice, make_group(alice, bob), [stored(alice, "secret-plans.txt", b"ciphertext")], content="AAAA",
         is_encrypted=True)

    make_worker().run(once=True)

    notification = json.loads(webhook.received[0].body)["notification"]
    assert notification["attachments"] == [] and "secret" not in json.dumps(notification)
    assert notification["attachment_count"] == 1


def test_the_worker_sweeps_unsent_uploads_past_a_day(make_user, make_worker, settings):
    upload = stored(make_user())
    Attachment.objects.filter(pk=upload.pk).update(created_at=timezone.now() - timedelta(hours=25))
    root = Path(settings.STORAGES["attachments"]["OPTIONS"]["location"])
    assert len(list(root.iterdir())) == 2

    make_worker().run(once=True)

    assert not Attachment.objects.exists() and list(root.iterdir()) == []
