"""Attachments over the API (SPEC 4.1, docs/attachments.md) on local storage: upload checks and
limits, the access rule for downloads, messages that carry attachments, Range, and the sweeper.
The same on the S3 API server: tests/chat/test_attachments_s3.py; over a real socket:
tests/test_attachments_live.py."""
from __future__ import annotations

import hashlib
import io
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.utils import timezone

from chat.models import Attachment, Report
from chat.services import conversations, moderation
from chat.services.attachments import attachments_sweep
from chat.services.send import SendRequest, message_send
from tests.chat.attachment_files import GPS_IFD, exif_of, jpeg, png, png_bomb, upload
from tests.chat.test_moderation import message_store  # noqa: F401  (the fixture: both stores)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def people(make_user):
    return make_user("alice"), make_user("bob"), make_user("mallory")


@pytest.fixture
def conversation(people, make_group):
    alice, bob, _ = people
    return make_group(alice, bob)


def stored_files(settings) -> list[Path]:
    root = Path(settings.STORAGES["attachments"]["OPTIONS"]["location"])
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def body_of(response) -> bytes:
    return b"".join(response) if response.streaming else response.content


def send(client, conversation, attachments, content="", **fields):
    return client.post(
        "/api/v1/messages/",
        {"conversation_id": str(conversation.pk), "content": content, "attachments": attachments, **fields},
        format="json",
    )


class TestUpload:
    def test_a_photo_is_measured_thumbnailed_and_loses_its_location(self, people, client_for, settings):
        alice = people[0]
        original = jpeg((640, 480), location=True)
        assert GPS_IFD in exif_of(original)

        response = upload(client_for(alice), "holiday.jpg", original)

        assert response.status_code == 201, response.content
        body = response.json()
        assert body["name"] == "holiday.jpg"
        assert (body["content_type"], body["width"], body["height"]) == ("image/jpeg", 640, 480)
        assert body["thumbnail_url"] == f"/api/v1/attachments/{body['attachment_id']}/thumbnail/"
        stored = client_for(alice).get(body["url"])
        data = body_of(stored)
        assert GPS_IFD not in exif_of(data) and exif_of(data)[0x010F] == "Test camera"
        assert body["size"] == len(data) and body["sha256"] == hashlib.sha256(data).hexdigest()
        assert len(stored_files(settings)) == 2  # the photo and its thumbnail
        thumbnail = client_for(alice).get(body["thumbnail_url"])
        assert thumbnail.status_code == 200 and thumbnail["Content-Type"] == "image/webp"
        assert body_of(thumbnail)[8:12] == b"WEBP"

    def test_a_turned_photo_reports_the_size_it_is_shown_at(self, people, client_for):
        from PIL import Image

        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees to show
        out = io.BytesIO()
        Image.new("RGB", (64, 48)).save(out, "JPEG", exif=exif.tobytes())
        body = upload(client_for(people[0]), "turned.jpg", out.getvalue()).json()
        assert (body["width"], body["height"]) == (48, 64)

    def test_a_photo_without_location_is_stored_byte_for_byte(self, people, client_for):
        original = png()
        body = upload(client_for(people[0]), "pixel.png", original).json()
        assert body["sha256"] == hashlib.sha256(original).hexdigest()
        assert (body["content_type"], body["width"], body["height"]) == ("image/png", 40, 30)

    def test_the_client_content_type_is_ignored_and_text_is_a_file(self, people, client_for):
        response = upload(client_for(people[0]), "notes.txt", b"plain words\n")
        body = response.json()
        assert response.status_code == 201
        assert (body["content_type"], body["width"], body["thumbnail_url"]) == ("text/plain", None, None)

    @pytest.mark.parametrize(
        "name, data, problem",
        [
            ("empty.txt", b"", "empty"),
            ("photo.jpg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "says image/jpeg"),
            ("invoice.pdf", b"MZ\x90\x00" + b"\x00" * 200, "says application/pdf"),
            ("cat.png", b"just some text", "says image/png"),
            ("truncated.jpg", jpeg((300, 300))[:600], "could not be read"),
            ("bomb.png", png_bomb(), "at most"),
            ("../../etc/passwd", b"root:x:0:0", "path separators"),
            ("..\\boot.ini", b"[boot]", "path separators"),
            ("bell\x07.txt", b"ding", "control characters"),
            ("gpj.exe\u202e.txt", b"MZ", "control characters"),
            ("x" * 256 + ".txt", b"long", "at most 255"),
        ],
    )
    def test_bad_files_are_a_clear_400_and_nothing_is_stored(self, people, client_for, settings, name, data, problem):
        response = upload(client_for(people[0]), name, data)
        assert response.status_code == 400, response.content
        assert problem in " ".join(response.json()["file"])
        assert stored_files(settings) == [] and not Attachment.objects.exists()

    def test_over_the_limit_is_a_json_413_while_streaming(self, people, client_for, settings):
        settings.CHAT_MAX_ATTACHMENT_BYTES = 1000
        response = upload(client_for(people[0]), "big.bin", b"\x01" * 5000)
        assert response.status_code == 413
        assert response.json()["code"] == "request_too_large"
        assert stored_files(settings) == [] and not Attachment.objects.exists()
        assert upload(client_for(people[0]), "fits.bin", b"\x01" * 1000).status_code == 201

    def test_the_quota_counts_everything_a_user_keeps(self, people, client_for, settings):
        settings.CHAT_ATTACHMENT_QUOTA_BYTES = 2500
        alice, bob, _ = people
        assert upload(client_for(alice), "a.bin", b"\x01" * 2000).status_code == 201
        refused = upload(client_for(alice), "b.bin", b"\x01" * 1000)
        assert refused.status_code == 413 and refused.json()["code"] == "quota_exceeded"
        assert "500 bytes are left" in refused.json()["detail"]
        assert upload(client_for(bob), "b.bin", b"\x01" * 1000).status_code == 201  # per user
        assert Attachment.objects.count() == 2 and len(stored_files(settings)) == 2

    def test_unsent_uploads_are_capped_in_number(self, people, client_for, settings, monkeypatch):
        monkeypatch.setattr("chat.services.attachments.MAX_PENDING_UPLOADS", 2)
        client = client_for(people[0])
        statuses = [upload(client, f"{i}.txt", b"x").status_code for i in range(3)]
        assert statuses == [201, 201, 400] and Attachment.objects.count() == 2

    def test_a_request_without_the_file_field_or_as_json_is_a_4xx(self, people, client_for):
        client = client_for(people[0])
        assert upload(client, "a.txt", b"x", field="other").status_code == 400
        assert client.post("/api/v1/attachments/", {"file": "x"}, format="json").status_code == 415

    def test_anonymous_is_401(self, client):
        body_status = upload(client, "a.txt", b"x").status_code
        assert body_status == 401


class TestAccess:
    def test_only_the_uploader_reads_an_unsent_upload(self, people, client_for):
        alice, bob, _ = people
        attachment = upload(client_for(alice), "a.txt", b"secret").json()
        assert client_for(alice).get(attachment["url"]).status_code == 200
        assert client_for(bob).get(attachment["url"]).status_code == 403

    def test_unknown_malformed_and_foreign_ids_get_the_same_403(self, people, client_for):
        alice, bob, _ = people
        foreign = upload(client_for(alice), "a.txt", b"secret").json()["url"]
        answers = [
            client_for(bob).get(url)
            for url in (foreign, f"/api/v1/attachments/{uuid.uuid4()}/", "/api/v1/attachments/not-an-id/")
        ]
        assert {r.status_code for r in answers} == {403}
        assert len({r.content for r in answers}) == 1

    def test_once_sent_the_conversation_reads_it_and_nobody_else(self, people, client_for, conversation):
        alice, bob, mallory = people
        attachment = upload(client_for(alice), "plan.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n").json()
        assert send(client_for(alice), conversation, [attachment["attachment_id"]]).status_code == 201
        download = client_for(bob).get(attachment["url"])
        assert download.status_code == 200 and body_of(download).startswith(b"%PDF")
        assert download["Content-Disposition"] == 'attachment; filename="plan.pdf"'
        assert download["X-Content-Type-Options"] == "nosniff"
        assert "sandbox" in download["Content-Security-Policy"]
        assert client_for(mallory).get(attachment["url"]).status_code == 403
        conversations.participant_remove(actor=bob, conversation_id=conversation.pk, user_id=bob.pk)
        assert client_for(bob).get(attachment["url"]).status_code == 403

    def test_images_show_inline_and_html_or_svg_never_does(self, people, client_for):
        client = client_for(people[0])
        photo = upload(client, "p.png", png()).json()
        assert client.get(photo["url"])["Content-Disposition"].startswith("inline")
        for name, data in [("x.html", b"<!DOCTYPE html><script>alert(1)</script>"),
                           ("x.svg", b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"></svg>')]:
            stored = upload(client, name, data).json()
            response = client.get(stored["url"])
            assert response["Content-Disposition"].startswith("attachment")
            assert response["X-Content-Type-Options"] == "nosniff"
            assert stored["thumbnail_url"] is None

    def test_range_requests(self, people, client_for):
        client = client_for(people[0])
        data = bytes(range(256)) * 40
        url = upload(client, "clip.bin", data).json()["url"]
        part = client.get(url, HTTP_RANGE="bytes=100-199")
        assert part.status_code == 206 and body_of(part) == data[100:200]
        assert part["Content-Range"] == f"bytes 100-199/{len(data)}" and part["Content-Length"] == "100"
        assert body_of(client.get(url, HTTP_RANGE="bytes=-10")) == data[-10:]
        assert body_of(client.get(url, HTTP_RANGE="bytes=10000-")) == data[10000:]
        outside = client.get(url, HTTP_RANGE=f"bytes={len(data)}-")
        assert outside.status_code == 416 and outside["Content-Range"] == f"bytes */{len(data)}"
        assert client.get(url, HTTP_RANGE="bytes=0-1,5-6").status_code == 200  # several ranges: the whole file


class TestMessages:
    def test_a_message_carries_descriptors_everywhere_never_bytes(
        self, people, client_for, conversation, published, django_capture_on_commit_callbacks
    ):
        alice, bob, _ = people
        first = upload(client_for(alice), "a.jpg", jpeg()).json()
        second = upload(client_for(alice), "b.txt", b"words").json()
        with django_capture_on_commit_callbacks(execute=True):
            response = send(client_for(alice), conversation, [second["attachment_id"], first["attachment_id"]])
        assert response.status_code == 201, response.content
        message = response.json()
        assert message["content"] == "" and message["attachments"] == [second, first]
        assert published[0]["message"]["attachments"] == [second, first]
        history = client_for(bob).get(f"/api/v1/conversations/{conversation.pk}/messages/").json()
        assert history["results"][0]["attachments"] == [second, first]
        one = client_for(bob).get(f"/api/v1/conversations/{conversation.pk}/messages/{message['seq']}/").json()
        assert one["attachments"] == [second, first]

    def test_an_edit_keeps_the_attachments(self, people, client_for, conversation):
        alice = people[0]
        attachment = upload(client_for(alice), "a.txt", b"x").json()
        seq = send(client_for(alice), conversation, [attachment["attachment_id"]], content="look").json()["seq"]
        edited = client_for(alice).patch(
            f"/api/v1/conversations/{conversation.pk}/messages/{seq}/", {"content": "look at this"}, format="json"
        )
        assert edited.json()["attachments"] == [attachment]

    def test_only_your_own_unsent_uploads_can_be_attached(self, people, client_for, conversation, make_group):
        alice, bob, _ = people
        bobs = upload(client_for(bob), "b.txt", b"x").json()["attachment_id"]
        mine = upload(client_for(alice), "a.txt", b"x").json()["attachment_id"]
        for attempt in ([bobs], [str(uuid.uuid4())], [mine, bobs]):
            refused = send(client_for(alice), conversation, attempt)
            assert refused.status_code == 400 and "attachments" in refused.json()
        assert Attachment.objects.get(pk=mine).state == Attachment.State.UNATTACHED
        assert conversation.__class__.objects.get(pk=conversation.pk).last_seq == 0  # no seq burned
        assert send(client_for(alice), conversation, [mine]).status_code == 201
        again = send(client_for(alice), make_group(alice, bob, title="other"), [mine])
        assert again.status_code == 400  # never carried by two messages

    @pytest.mark.parametrize(
        "attachments", [[], [str(uuid.uuid4())] * 2, [str(uuid.uuid4()) for _ in range(11)], ["nope"], "x"]
    )
    def test_a_bad_list_is_a_400(self, people, client_for, conversation, attachments):
        response = send(client_for(people[0]), conversation, attachments, content="hi")
        assert response.status_code == 400 and "attachments" in response.json()

    def test_empty_content_needs_attachments(self, people, client_for, conversation):
        response = client_for(people[0]).post(
            "/api/v1/messages/", {"conversation_id": str(conversation.pk), "content": ""}, format="json"
        )
        assert response.status_code == 400 and "content" in response.json()

    def test_an_idempotent_retry_replays_the_same_message(self, people, client_for, conversation):
        alice = people[0]
        attachment_id = upload(client_for(alice), "a.txt", b"x").json()["attachment_id"]
        client = client_for(alice)
        first = client.post("/api/v1/messages/", {"conversation_id": str(conversation.pk), "content": "",
                            "attachments": [attachment_id]}, format="json", HTTP_IDEMPOTENCY_KEY="k1")
        retry = client.post("/api/v1/messages/", {"conversation_id": str(conversation.pk), "content": "",
                            "attachments": [attachment_id]}, format="json", HTTP_IDEMPOTENCY_KEY="k1")
        assert retry.status_code == 201 and retry["Idempotent-Replayed"] == "true"
        assert retry.json() == first.json()

    def test_inline_media_content_still_works(self, people, conversation):
        result = message_send(SendRequest(sender=people[0], conversation_id=conversation.pk,
                                          content="data:image/png;base64,AAAA", message_type="image"))
        assert result.message.attachments == () and result.message.content.startswith("data:")


class TestLifecycle:
    def test_unsent_uploads_are_swept_after_a_day(self, people, client_for, settings):
        alice = people[0]
        old = upload(client_for(alice), "old.jpg", jpeg()).json()
        young = upload(client_for(alice), "young.txt", b"x").json()
        Attachment.objects.filter(pk=old["attachment_id"]).update(created_at=timezone.now() - timedelta(hours=25))
        assert len(stored_files(settings)) == 3

        result = attachments_sweep()
        assert (result.expired, result.deleted) == (1, 1)
        assert [p.name for p in stored_files(settings)] == [uuid.UUID(young["attachment_id"]).hex]
        assert list(Attachment.objects.values_list("pk", flat=True)) == [uuid.UUID(young["attachment_id"])]
        assert client_for(alice).get(old["url"]).status_code == 403

    def test_a_deleted_messages_attachments_go_once_no_report_is_open(self, people, client_for, conversation, settings):
        alice, bob, _ = people
        attachment = upload(client_for(alice), "a.jpg", jpeg()).json()
        seq = send(client_for(alice), conversation, [attachment["attachment_id"]]).json()["seq"]
        moderation.message_report(reporter=bob, conversation_id=conversation.pk, seq=seq, reason="spam")
        deleted = client_for(alice).delete(f"/api/v1/conversations/{conversation.pk}/messages/{seq}/")
        assert deleted.json()["attachments"] == []
        assert client_for(bob).get(attachment["url"]).status_code == 403  # gone for everyone at once

        assert attachments_sweep().deleted == 0  # the moderator still has to judge the report
        assert len(stored_files(settings)) == 2
        Report.objects.update(status=Report.Status.DISMISSED)
        assert attachments_sweep().deleted == 1
        assert attachments_sweep().deleted == 0  # nothing is deleted twice
        assert stored_files(settings) == [] and not Attachment.objects.exists()

    def test_a_deleted_conversations_attachments_are_swept(self, people, client_for, conversation, settings):
        attachment_id = upload(client_for(people[0]), "a.jpg", jpeg()).json()["attachment_id"]
        assert send(client_for(people[0]), conversation, [attachment_id]).status_code == 201
        conversation.delete()
        assert attachments_sweep().deleted == 1
        assert stored_files(settings) == [] and not Attachment.objects.exists()

    def test_the_management_command_sweeps(self, people, client_for, settings, capsys):
        upload(client_for(people[0]), "old.txt", b"x")
        Attachment.objects.update(created_at=timezone.now() - timedelta(days=2))
        call_command("sweep_attachments")
        assert "1 unsent uploads expired; 1 attachments deleted." in capsys.readouterr().out
        assert stored_files(settings) == []

    def test_a_sweeper_that_lost_its_storage_retries_later(self, people, client_for, settings, monkeypatch):
        upload(client_for(people[0]), "old.txt", b"x")
        Attachment.objects.update(created_at=timezone.now() - timedelta(days=2))
        from django.core.files.storage import FileSystemStorage

        def broken(self, name):
            raise OSError("disk gone")

        with monkeypatch.context() as patch:
            patch.setattr(FileSystemStorage, "delete", broken)
            assert attachments_sweep().deleted == 0
        assert Attachment.objects.count() == 1  # the row stays: the objects are not forgotten
        assert attachments_sweep(now=timezone.now() + timedelta(minutes=11)).deleted == 1
        assert stored_files(settings) == []


def test_the_upload_body_cap_is_the_attachment_limit_plus_its_envelope(settings):
    from django.urls import reverse

    from core.bodylimit import body_cap_for

    assert settings.ATTACHMENT_UPLOAD_PATH == reverse("attachment-upload")
    assert body_cap_for(reverse("attachment-upload")) == settings.CHAT_MAX_ATTACHMENT_BYTES + 64 * 1024
    assert body_cap_for(reverse("message-send")) == settings.CHAT_MAX_REQUEST_BYTES


class TestOnEveryMessageStore:
    """The store keeps no attachments (the Attachment rows are their truth): the same answers on
    the sql store and on the real Cassandra."""

    def test_send_history_and_delete(self, message_store, people, client_for, conversation):
        alice, bob, _ = people
        attachment = upload(client_for(alice), "a.jpg", jpeg()).json()
        sent = send(client_for(alice), conversation, [attachment["attachment_id"]], content="see")
        assert sent.status_code == 201 and sent.json()["attachments"] == [attachment]
        assert message_store.get(conversation.pk, 1).message_id == uuid.UUID(sent.json()["message_id"])
        page = client_for(bob).get(f"/api/v1/conversations/{conversation.pk}/messages/").json()
        assert page["results"][0]["attachments"] == [attachment]
        client_for(alice).delete(f"/api/v1/conversations/{conversation.pk}/messages/1/")
        page = client_for(bob).get(f"/api/v1/conversations/{conversation.pk}/messages/").json()
        assert page["results"][0]["deleted"] and page["results"][0]["attachments"] == []
        assert attachments_sweep().deleted == 1

    def test_a_page_gives_each_message_its_own_attachments_in_order(self, message_store, people, client_for, conversation):
        alice, bob, _ = people
        first, second, third = (upload(client_for(alice), name, jpeg()).json() for name in ("a.jpg", "b.jpg", "c.jpg"))

        def plain(content):
            answer = client_for(alice).post(
                "/api/v1/messages/", {"conversation_id": str(conversation.pk), "content": content}, format="json"
            )
            assert answer.status_code == 201

        plain("plain")
        assert send(client_for(alice), conversation, [second["attachment_id"], first["attachment_id"]], content="two").status_code == 201
        plain("plain again")
        assert send(client_for(alice), conversation, [third["attachment_id"]]).status_code == 201
        page = client_for(bob).get(f"/api/v1/conversations/{conversation.pk}/messages/").json()["results"]
        assert [(m["content"], m["attachments"]) for m in page] == [
            ("plain", []), ("two", [second, first]), ("plain again", []), ("", [third]),
        ]


def test_only_attached_uploads_make_a_message_one_that_carries_attachments(people, client_for, conversation):
    """chat.sql.messages_with_attachments, the statement every page of messages runs: attached
    uploads count, unattached and doomed ones (a deleted message's) do not."""
    from chat import sql

    alice = people[0]
    kept, doomed, loose = (upload(client_for(alice), name, jpeg()).json()["attachment_id"] for name in "abc")
    carrying = uuid.UUID(send(client_for(alice), conversation, [kept], content="kept").json()["message_id"])
    deleted = uuid.UUID(send(client_for(alice), conversation, [doomed], content="deleted").json()["message_id"])
    client_for(alice).delete(f"/api/v1/conversations/{conversation.pk}/messages/2/")
    plain = uuid.uuid4()
    assert Attachment.objects.get(pk=doomed).state == Attachment.State.DOOMED
    assert Attachment.objects.get(pk=loose).state == Attachment.State.UNATTACHED
    assert sql.messages_with_attachments({carrying, deleted, plain}) == {carrying}
    assert sql.messages_with_attachments({deleted, plain}) == set()
    assert sql.messages_with_attachments(set()) == set()


def test_a_page_without_attachments_costs_one_statement_for_them(people, client_for, conversation, django_assert_num_queries):
    from chat.selectors import with_attachments
    from chat.store import get_message_store

    alice = people[0]
    for content in ("one", "two", "three"):
        client_for(alice).post("/api/v1/messages/", {"conversation_id": str(conversation.pk), "content": content}, format="json")
    messages = get_message_store().history(conversation.pk, after_seq=0, before_seq=4, limit=10).messages
    assert len(messages) == 3
    with django_assert_num_queries(1):
        assert with_attachments(messages) == list(messages)


@pytest.mark.parametrize(
    "name, head, content_type",
    [
        ("IMG_0001.HEIC", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 50, "image/heif"),
        ("clip.mp4", b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + b"\x00" * 100, "video/mp4"),
        ("song.mp3", b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x00" * 50, "audio/mpeg"),
        ("archive.zip", b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + b"\x00" * 60, "application/zip"),
        ("table.csv", b"a,b\n1,2\n", "text/plain"),
        ("README", "héllo\n".encode(), "text/plain"),
        ("blob", b"\x00\x01\x02\x03", "application/octet-stream"),
    ],
)
def test_common_files_are_taken_by_their_names(name, head, content_type):
    from chat.attachment_files import sniff_content_type

    assert sniff_content_type(head, name) == content_type


def test_a_storage_failure_during_an_upload_leaves_no_row_and_no_object(make_user, client_for, settings, monkeypatch):
    from django.core.files.storage import FileSystemStorage

    real_save = FileSystemStorage.save

    def thumbnail_fails(self, name, content, *args, **kwargs):
        if name.endswith(".thumb"):
            raise OSError("disk full")
        return real_save(self, name, content, *args, **kwargs)

    monkeypatch.setattr(FileSystemStorage, "save", thumbnail_fails)
    response = upload(client_for(make_user()), "a.jpg", jpeg())
    assert response.status_code == 503 and response.json()["code"] == "unavailable"
    assert stored_files(settings) == [] and not Attachment.objects.exists()


def test_a_download_whose_file_is_gone_is_a_503_not_a_500(make_user, client_for, settings):
    client = client_for(make_user())
    url = upload(client, "a.txt", b"words").json()["url"]
    for path in stored_files(settings):
        path.unlink()
    response = client.get(url)
    assert response.status_code == 503 and response.json()["code"] == "unavailable"


def test_uploads_are_rate_limited_per_user(make_user, client_for, settings):
    settings.CHAT_UPLOAD_RATE = "2/min"
    alice, bob = make_user(), make_user()
    statuses = [upload(client_for(alice), f"{i}.txt", b"x").status_code for i in range(3)]
    refused = upload(client_for(alice), "more.txt", b"x")
    assert statuses == [201, 201, 429] and refused.status_code == 429
    assert refused.json()["code"] == "rate_limited" and "uploads" in refused.json()["detail"]
    assert int(refused["Retry-After"]) >= 1
    assert upload(client_for(bob), "b.txt", b"x").status_code == 201
    assert Attachment.objects.count() == 3
