"""Moderators and attachments in the Django admin: a message's attachments with thumbnails in
the message browser and on a report, and deleting one."""
from pathlib import Path

import pytest
from django.contrib.admin.models import LogEntry
from django.core.files.base import ContentFile

from chat import selectors
from chat.models import Attachment
from chat.services import moderation
from chat.services import send as sending
from chat.services.attachments import attachment_create
from tests.chat.attachment_files import jpeg

pytestmark = pytest.mark.django_db


@pytest.fixture
def sent(make_user, make_group):
    """A conversation with one message carrying a photo and a text file."""
    alice, bob = make_user("alice"), make_user("bob")
    conversation = make_group(alice, bob)
    photo = attachment_create(uploader=alice, file=ContentFile(jpeg()), name="photo.jpg", size=len(jpeg()))
    notes = attachment_create(uploader=alice, file=ContentFile(b"notes"), name="notes.txt", size=5)
    message = sending.message_send(sending.SendRequest(
        sender=alice, conversation_id=conversation.pk, content="look", attachments=[str(photo.pk), str(notes.pk)]
    )).message
    return conversation, message, photo, notes, bob


def test_the_message_browser_shows_thumbnails(client, moderator, sent):
    conversation, _, photo, notes, _ = sent
    page = client.get(f"/admin/chat/conversation/{conversation.pk}/messages/").content.decode()
    assert f'<img src="/admin/chat/attachment/{photo.pk}/thumbnail/"' in page
    assert "notes.txt" in page and f"/admin/chat/attachment/{notes.pk}/delete/" in page
    thumbnail = client.get(f"/admin/chat/attachment/{photo.pk}/thumbnail/")
    assert thumbnail.status_code == 200 and thumbnail["Content-Type"] == "image/webp"
    original = client.get(f"/admin/chat/attachment/{photo.pk}/file/")
    assert original["Content-Disposition"].startswith("attachment")  # never rendered in the admin


def test_a_moderator_deletes_an_attachment(client, moderator, sent, settings):
    conversation, message, photo, notes, _ = sent
    response = client.post(f"/admin/chat/attachment/{photo.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert list(Attachment.objects.values_list("pk", flat=True)) == [notes.pk]
    root = Path(settings.STORAGES["attachments"]["OPTIONS"]["location"])
    assert sorted(p.name for p in root.iterdir()) == [notes.pk.hex]
    conversation.refresh_from_db()
    remaining = selectors.message_at(conversation=conversation, seq=message.seq).attachments
    assert [a["attachment_id"] for a in remaining] == [str(notes.pk)]
    entry = LogEntry.objects.get(object_id=str(photo.pk))
    assert "photo.jpg" in entry.change_message and entry.user == moderator


def test_a_report_keeps_showing_the_attachments_of_a_deleted_message(client, moderator, sent):
    conversation, message, photo, _, bob = sent
    report, _ = moderation.message_report(reporter=bob, conversation_id=conversation.pk, seq=message.seq, reason="x")
    moderation.message_delete(actor=message_sender(message), conversation_id=conversation.pk, seq=message.seq)
    page = client.get(f"/admin/chat/report/{report.pk}/change/").content.decode()
    assert f"/admin/chat/attachment/{photo.pk}/thumbnail/" in page


def test_staff_without_the_permission_cannot_delete_or_read(client, sent, django_user_model):
    _, _, photo, _, _ = sent
    staff = django_user_model.objects.create_user(username="helper", password="pw-helper-42", is_staff=True)
    client.force_login(staff)
    assert client.get(f"/admin/chat/attachment/{photo.pk}/file/").status_code == 403
    assert client.post(f"/admin/chat/attachment/{photo.pk}/delete/", {"post": "yes"}).status_code == 403
    assert Attachment.objects.filter(pk=photo.pk).exists()


def message_sender(message):
    from accounts.models import User

    return User.objects.get(pk=message.sender_id)


def test_the_attachment_list_and_page_render_with_previews(client, moderator, sent):
    _, _, photo, notes, _ = sent
    listing = client.get("/admin/chat/attachment/?state__exact=attached").content.decode()
    assert f'<img src="/admin/chat/attachment/{photo.pk}/thumbnail/"' in listing and "notes.txt" in listing
    page = client.get(f"/admin/chat/attachment/{photo.pk}/change/")
    assert page.status_code == 200 and "image/jpeg" in page.content.decode()
