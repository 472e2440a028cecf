"""Attachments in S3-compatible object storage, against the real S3 API server on loopback that
`scripts/services.sh start s3` runs (skipped locally without it, failing in CI): objects land in
the bucket, downloads redirect to a signed URL that expires within a minute and serves the bytes
(and Range) itself, and the sweeper leaves nothing behind."""
from __future__ import annotations

import hashlib
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from django.utils import timezone

from chat.models import Attachment
from chat.services.attachments import attachments_sweep
from tests.chat.attachment_files import GPS_IFD, exif_of, jpeg, upload

pytestmark = pytest.mark.django_db(transaction=True)


def object_names(bucket) -> list[str]:
    return sorted(item.key for item in bucket.objects.all())


@pytest.fixture
def people(make_user):
    return make_user("alice"), make_user("bob"), make_user("mallory")


def test_a_photo_is_stored_sent_and_downloaded_through_a_signed_url(s3_bucket, people, client_for, make_group):
    alice, bob, mallory = people
    conversation = make_group(alice, bob)
    photo = upload(client_for(alice), "photo.jpg", jpeg((800, 600), location=True)).json()
    assert object_names(s3_bucket) == sorted([photo["attachment_id"].replace("-", ""),
                                              photo["attachment_id"].replace("-", "") + ".thumb"])
    sent = client_for(alice).post(
        "/api/v1/messages/",
        {"conversation_id": str(conversation.pk), "content": "", "attachments": [photo["attachment_id"]]},
        format="json",
    )
    assert sent.status_code == 201

    redirect = client_for(bob).get(photo["url"])
    assert redirect.status_code == 302
    assert redirect["X-Content-Type-Options"] == "nosniff"
    signed = redirect["Location"]
    query = parse_qs(urlsplit(signed).query)
    assert query["X-Amz-Expires"] == ["60"]
    assert query["response-content-type"] == ["image/jpeg"]
    fetched = requests.get(signed, timeout=10)
    assert fetched.status_code == 200 and hashlib.sha256(fetched.content).hexdigest() == photo["sha256"]
    assert GPS_IFD not in exif_of(fetched.content)
    part = requests.get(signed, headers={"Range": "bytes=0-99"}, timeout=10)
    assert part.status_code == 206 and part.content == fetched.content[:100]

    thumbnail = requests.get(client_for(bob).get(photo["thumbnail_url"])["Location"], timeout=10)
    assert thumbnail.status_code == 200 and thumbnail.content[8:12] == b"WEBP"
    assert client_for(mallory).get(photo["url"]).status_code == 403


def test_a_file_downloads_as_an_attachment(s3_bucket, people, client_for):
    stored = upload(client_for(people[0]), "page.html", b"<!DOCTYPE html><script>alert(1)</script>").json()
    signed = client_for(people[0]).get(stored["url"])["Location"]
    fetched = requests.get(signed, timeout=10)
    assert fetched.headers["Content-Disposition"] == 'attachment; filename="page.html"'
    assert fetched.content.startswith(b"<!DOCTYPE html>")


def test_a_refused_upload_leaves_nothing_in_the_bucket(s3_bucket, people, client_for, settings):
    settings.CHAT_MAX_ATTACHMENT_BYTES = 1000
    assert upload(client_for(people[0]), "big.bin", b"\x01" * 5000).status_code == 413
    assert upload(client_for(people[0]), "cat.png", b"not a png at all").status_code == 400
    assert upload(client_for(people[0]), "cut.jpg", jpeg((300, 300))[:500]).status_code == 400
    assert object_names(s3_bucket) == [] and not Attachment.objects.exists()


def test_the_sweeper_leaves_nothing_behind_and_deletes_nothing_twice(s3_bucket, people, client_for, make_group):
    alice, bob, _ = people
    conversation = make_group(alice, bob)
    client = client_for(alice)
    sent_photo, kept, expired = (upload(client, name, jpeg()).json() for name in ("a.jpg", "b.jpg", "c.jpg"))
    seq = client.post(
        "/api/v1/messages/",
        {"conversation_id": str(conversation.pk), "content": "", "attachments": [sent_photo["attachment_id"]]},
        format="json",
    ).json()["seq"]
    Attachment.objects.filter(pk=expired["attachment_id"]).update(created_at=timezone.now() - timedelta(hours=25))
    assert len(object_names(s3_bucket)) == 6

    assert client.delete(f"/api/v1/conversations/{conversation.pk}/messages/{seq}/").status_code == 200
    result = attachments_sweep()
    assert (result.expired, result.deleted) == (1, 2)
    assert object_names(s3_bucket) == sorted([kept["attachment_id"].replace("-", ""),
                                              kept["attachment_id"].replace("-", "") + ".thumb"])
    assert attachments_sweep().deleted == 0
    assert len(object_names(s3_bucket)) == 2
