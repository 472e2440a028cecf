"""Editing, deleting and reporting messages over REST, and moderation in the Django admin: the
message browser, the report queue and the admin log, against both message stores.

The store under test replaces the configured one everywhere (`message_store`), so the admin, the
services and the consumer all read and write the Cassandra keyspace in the `cassandra` runs.
"""
from __future__ import annotations


import pytest
from channels.db import database_sync_to_async
from django.contrib.admin.models import ADDITION, CHANGE, LogEntry
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.db import DatabaseError
from django.test import Client

from chat import events, sql
from chat.services import conversations, moderation, send as sending
from core.errors import NotAllowed, StoreUnavailable
from chat.models import Ban, Conversation, Report
from chat.store import Change, MessageStore
from tests.conftest import use_message_store
from tests.chat.test_consumer import expect_close, nothing_but_presence, open_socket, receive, receive_messages

real_advance_read_markers = sql.advance_read_markers

# Small Cassandra buckets, so a page of the message browser spans several partitions.
CASSANDRA_BUCKET_SIZE = 10


@pytest.fixture(params=["sql", "cassandra"])
def message_store(request, monkeypatch) -> MessageStore:
    """The store under test, in place of the configured one for every module that reads it."""
    if request.param == "sql":
        from chat.store.sql import SqlMessageStore

        store = SqlMessageStore()
    else:
        from chat.store.cassandra import CassandraMessageStore

        store = CassandraMessageStore(
            connection=request.getfixturevalue("cassandra_connection"), bucket_size=CASSANDRA_BUCKET_SIZE
        )
    use_message_store(monkeypatch, store)
    return store




@pytest.fixture
def trio(make_user, make_group):
    """alice owns a group with bob; carol is not in it."""
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    return alice, bob, carol, make_group(alice, bob)


@pytest.fixture
def moderator_client(django_user_model) -> tuple[Client, object]:
    moderator = django_user_model.objects.create_superuser(username="mod", password="pw-for-mod-42")
    client = Client()
    client.force_login(moderator)
    return client, moderator


@pytest.fixture
def staff_client(django_user_model):
    """A logged-in staff user holding exactly the given chat permissions."""

    def make(*codenames: str) -> tuple[Client, object]:
        user = django_user_model.objects.create_user(username=f"staff-{'-'.join(codenames) or 'none'}", is_staff=True)
        user.user_permissions.set(Permission.objects.filter(content_type__app_label="chat", codename__in=codenames))
        client = Client()
        client.force_login(user)
        return client, user

    return make


def send(user, conversation, content="hello", **fields):
    return sending.message_send(sending.SendRequest(sender=user, conversation_id=conversation.id, content=content, **fields)).message


def message_url(conversation, seq, suffix=""):
    return f"/api/v1/conversations/{conversation.id}/messages/{seq}/{suffix}"


def browser_url(conversation):
    return f"/admin/chat/conversation/{conversation.pk}/messages/"


def log_messages(obj) -> list[str]:
    entries = LogEntry.objects.filter(
        content_type=ContentType.objects.get_for_model(obj), object_id=str(obj.pk)
    ).order_by("pk")
    return [entry.get_change_message() for entry in entries]


def report_message(client_for, reporter, conversation, seq, reason="spam"):
    response = client_for(reporter).post(message_url(conversation, seq, "report/"), {"reason": reason}, format="json")
    assert response.status_code == 201, response.content
    return Report.objects.get(pk=response.json()["id"])


@pytest.mark.django_db
class TestEdit:
    @pytest.mark.django_db(transaction=True)  # its events go out on commit
    def test_the_sender_edits_content_and_the_rest_stays(self, message_store, trio, client_for, published):
        alice, bob, _, conversation = trio
        sent = send(bob, conversation, "helo", message_type="file", metadata={"name": "a.txt"})
        published.clear()
        response = client_for(bob).patch(message_url(conversation, 1), {"content": "hello"}, format="json")
        assert response.status_code == 200, response.content
        stored = message_store.get(conversation.id, 1)
        assert (stored.content, stored.message_type, stored.metadata, stored.sent_at) == (
            "hello", "file", {"name": "a.txt"}, sent.sent_at
        )
        assert stored.edited_at is not None and response.json() == {**stored.as_dict(), "change": 1}
        assert published == [
            {"type": "message.updated", "conversation_id": str(conversation.id), "message": stored.as_dict(), "change": 1}
        ]
        # The change is durable and numbered: the next one takes 2, and the log lists both.
        assert client_for(bob).patch(message_url(conversation, 1), {"content": "hello!"}, format="json").json()["change"] == 2
        conversation.refresh_from_db()
        assert conversation.last_change == 2

    def test_edit_obeys_the_send_limits_of_the_messages_type(self, message_store, trio, client_for):
        _, bob, _, conversation = trio
        send(bob, conversation, "short")
        send(bob, conversation, "file", message_type="file")
        too_long_for_text = "x" * (sending.MAX_TEXT_BYTES + 1)
        response = client_for(bob).patch(message_url(conversation, 1), {"content": too_long_for_text}, format="json")
        assert response.status_code == 400 and "content" in response.json()
        assert message_store.get(conversation.id, 1).content == "short"
        response = client_for(bob).patch(message_url(conversation, 2), {"content": too_long_for_text}, format="json")
        assert response.status_code == 200

    def test_refusals(self, message_store, trio, client_for, published):
        alice, bob, carol, conversation = trio
        send(bob, conversation, "mine")
        published.clear()
        body = {"content": "changed"}
        assert client_for(alice).patch(message_url(conversation, 1), body, format="json").status_code == 403
        assert client_for(carol).patch(message_url(conversation, 1), body, format="json").status_code == 403
        assert client_for(bob).patch(message_url(conversation, 2), body, format="json").status_code == 404
        unknown = Conversation(id="00000000-0000-0000-0000-000000000001")
        assert client_for(bob).patch(message_url(unknown, 1), body, format="json").status_code == 403
        assert client_for(bob).patch(message_url(conversation, 1), {"content": ""}, format="json").status_code == 400
        assert message_store.get(conversation.id, 1).content == "mine"
        assert published == []

    def test_a_deleted_message_cannot_be_edited(self, message_store, trio, client_for):
        _, bob, _, conversation = trio
        send(bob, conversation, "oops")
        assert client_for(bob).delete(message_url(conversation, 1)).status_code == 200
        response = client_for(bob).patch(message_url(conversation, 1), {"content": "back"}, format="json")
        assert response.status_code == 400 and "non_field_errors" in response.json()
        assert message_store.get(conversation.id, 1).content == ""


@pytest.mark.django_db
class TestDelete:
    @pytest.mark.django_db(transaction=True)  # its events go out on commit
    def test_the_sender_deletes_and_a_tombstone_stays(self, message_store, trio, client_for, published):
        alice, bob, _, conversation = trio
        sent = send(bob, conversation, "secret", metadata={"link": "x"})
        published.clear()
        response = client_for(bob).delete(message_url(conversation, 1))
        assert response.status_code == 200
        tombstone = message_store.get(conversation.id, 1)
        assert (tombstone.deleted, tombstone.content, tombstone.metadata) == (True, "", {})
        assert (tombstone.message_id, tombstone.sender_id) == (sent.message_id, bob.pk)
        assert response.json() == {**tombstone.as_dict(), "change": 1}
        assert published == [{"type": "message.deleted", "conversation_id": str(conversation.id), "seq": 1, "change": 1}]
        assert log_messages(conversation) == []  # not moderation: your own message

    def test_the_owner_deletes_a_members_message_and_it_is_logged(self, message_store, trio, client_for, published):
        alice, bob, _, conversation = trio
        send(bob, conversation, "rude")
        assert client_for(alice).delete(message_url(conversation, 1)).status_code == 200
        assert message_store.get(conversation.id, 1).deleted
        assert log_messages(conversation) == ["Deleted message 1 by bob over the API (as conversation owner)."]
        # Deleting a tombstone again changes nothing, announces nothing, logs nothing and takes no
        # change number.
        published.clear()
        again = client_for(alice).delete(message_url(conversation, 1))
        assert again.status_code == 200 and again.json()["change"] is None
        assert published == [] and len(log_messages(conversation)) == 1
        conversation.refresh_from_db()
        assert conversation.last_change == 1

    @pytest.mark.django_db(transaction=True)  # its events go out on commit
    def test_a_delete_whose_commit_was_lost_is_recorded_by_the_retry(self, message_store, trio, client_for, published):
        # Found by the chaos run: a daphne killed between writing the tombstone (and the log entry)
        # to the store and committing the change number left a tombstone that no change announced,
        # and the client's retry answered `change: null`. The store's state that leaves: the
        # tombstone, and a log entry past the committed last_change.
        alice, bob, _, conversation = trio
        send(bob, conversation, "oops")
        message_store.tombstone(conversation.id, 1)
        message_store.record_change(Change(conversation.id, 1, "deleted", 1, sending.now_ms(), {}))
        published.clear()
        retried = client_for(bob).delete(message_url(conversation, 1))
        assert retried.status_code == 200 and retried.json()["change"] == 1 and retried.json()["deleted"]
        assert published == [{"type": "message.deleted", "conversation_id": str(conversation.id), "seq": 1, "change": 1}]
        conversation.refresh_from_db()
        assert conversation.last_change == 1
        assert [(c.change, c.kind, c.seq) for c in message_store.changes(conversation.id, after_change=0, before_change=9)] == [(1, "deleted", 1)]
        # Recorded now: the next delete is the no-op.
        published.clear()
        assert client_for(bob).delete(message_url(conversation, 1)).json()["change"] is None
        assert published == []

    def test_a_member_may_not_delete_anothers_message(self, message_store, trio, client_for, published):
        alice, bob, carol, conversation = trio
        send(alice, conversation, "owner's")
        published.clear()
        assert client_for(bob).delete(message_url(conversation, 1)).status_code == 403
        assert client_for(carol).delete(message_url(conversation, 1)).status_code == 403
        assert client_for(bob).delete(message_url(conversation, 99)).status_code == 404
        assert not message_store.get(conversation.id, 1).deleted
        assert published == []

    def test_staff_members_delete_with_the_moderation_permission_only(
        self, message_store, trio, client_for, staff_client
    ):
        alice, bob, _, conversation = trio
        send(bob, conversation, "one")
        send(bob, conversation, "two")
        _, without = staff_client()
        _, moderator = staff_client("change_conversation")
        for user in (without, moderator):
            conversations.participant_add(actor=alice, conversation_id=conversation.id, user_id=user.pk)
        assert client_for(without).delete(message_url(conversation, 1)).status_code == 403
        assert client_for(moderator).delete(message_url(conversation, 2)).status_code == 200
        assert [message_store.get(conversation.id, seq).deleted for seq in (1, 2)] == [False, True]


@pytest.mark.django_db
class TestReport:
    def test_a_report_goes_to_the_queue_with_what_was_reported(self, message_store, trio, client_for):
        alice, bob, _, conversation = trio
        sent = send(bob, conversation, "buy pills")
        response = client_for(alice).post(message_url(conversation, 1, "report/"), {"reason": "spam"}, format="json")
        assert response.status_code == 201, response.content
        report = Report.objects.get()
        assert response.json()["id"] == report.pk
        assert (report.status, report.sender, report.reporter, report.reason) == ("open", bob, alice, "spam")
        assert (report.message_id, report.reported_content) == (sent.message_id, "buy pills")
        # The evidence stays when the sender edits the message afterwards.
        moderation.message_edit(editor=bob, conversation_id=conversation.id, seq=1, content="nothing to see")
        report.refresh_from_db()
        assert report.reported_content == "buy pills"

    def test_reporting_again_while_open_returns_the_same_report(self, message_store, trio, client_for):
        alice, bob, _, conversation = trio
        send(bob, conversation)
        first = client_for(alice).post(message_url(conversation, 1, "report/"), {"reason": "spam"}, format="json")
        again = client_for(alice).post(message_url(conversation, 1, "report/"), {"reason": "more"}, format="json")
        assert (first.status_code, again.status_code) == (201, 200)
        assert first.json()["id"] == again.json()["id"] and Report.objects.count() == 1

    def test_refusals(self, message_store, trio, client_for):
        alice, bob, carol, conversation = trio
        send(bob, conversation)
        send(bob, conversation)
        moderation.message_delete(actor=bob, conversation_id=conversation.id, seq=2)
        assert client_for(carol).post(message_url(conversation, 1, "report/"), {"reason": "x"}).status_code == 403
        assert client_for(alice).post(message_url(conversation, 9, "report/"), {"reason": "x"}).status_code == 404
        assert client_for(bob).post(message_url(conversation, 1, "report/"), {"reason": "x"}).status_code == 400
        assert client_for(alice).post(message_url(conversation, 2, "report/"), {"reason": "x"}).status_code == 400
        assert client_for(alice).post(message_url(conversation, 1, "report/"), {"reason": " "}).status_code == 400
        assert Report.objects.count() == 0


@pytest.mark.django_db
class TestMessageBrowser:
    def test_pages_by_seq_from_the_newest(self, message_store, trio, moderator_client):
        client, _ = moderator_client
        alice, bob, _, conversation = trio
        for n in range(1, 61):
            send(alice if n % 2 else bob, conversation, f"message {n}")
        newest = client.get(browser_url(conversation))
        assert newest.status_code == 200
        assert [row["message"].seq for row in newest.context["rows"]] == list(range(11, 61))
        assert newest.context["newer_url"] is None
        assert b"message 60" in newest.content and b"bob" in newest.content
        older = client.get(newest.context["older_url"])
        assert [row["message"].seq for row in older.context["rows"]] == list(range(1, 11))
        assert older.context["older_url"] is None
        newer = client.get(older.context["newer_url"])
        assert [row["message"].seq for row in newer.context["rows"]] == list(range(11, 61))
        # Where a report links to: the page starting at the reported message.
        around = client.get(browser_url(conversation), {"after_seq": 24})
        assert around.context["rows"][0]["message"].seq == 25
        assert client.get(f"/admin/chat/conversation/{conversation.pk}/change/").content.count(
            browser_url(conversation).encode()
        ) == 1

    def test_shows_no_message_whose_send_did_not_commit(self, message_store, trio, moderator_client, client_for, monkeypatch):
        """On Cassandra the store write happens before the relational commit: a send whose commit
        failed leaves a row above last_seq, which nobody acknowledged. The browser, like REST
        history, reads no further than the committed counter."""
        client, _ = moderator_client
        alice, _, _, conversation = trio
        send(alice, conversation, "acknowledged")

        def commit_breaks(*args):
            raise DatabaseError("the relational database went away")

        monkeypatch.setattr(sql, "advance_read_markers", commit_breaks)
        with pytest.raises(StoreUnavailable):
            send(alice, conversation, "never acknowledged")
        monkeypatch.setattr(sql, "advance_read_markers", real_advance_read_markers)

        history = client_for(alice).get(f"/api/v1/conversations/{conversation.pk}/messages/").data["results"]
        assert [m["content"] for m in history] == ["acknowledged"]
        for query in ({}, {"after_seq": 0}, {"before_seq": 3}):
            page = client.get(browser_url(conversation), query)
            assert [row["message"].content for row in page.context["rows"]] == ["acknowledged"]
            assert b"never acknowledged" not in page.content

    @pytest.mark.django_db(transaction=True)  # its events go out on commit
    def test_delete_tombstones_announces_logs_and_resolves_open_reports(
        self, message_store, trio, moderator_client, client_for, published
    ):
        client, moderator = moderator_client
        alice, bob, _, conversation = trio
        send(bob, conversation, "first")
        send(bob, conversation, "nasty")
        report = report_message(client_for, alice, conversation, 2)
        published.clear()
        page = f"{browser_url(conversation)}?after_seq=1"
        response = client.post(f"{browser_url(conversation)}2/delete/", {"next": page})
        assert response.status_code == 302 and response["Location"] == page
        assert message_store.get(conversation.id, 2).deleted and not message_store.get(conversation.id, 1).deleted
        assert published == [{"type": "message.deleted", "conversation_id": str(conversation.id), "seq": 2, "change": 1}]
        assert log_messages(conversation) == ["Deleted message 2 by bob."]
        report.refresh_from_db()
        assert (report.status, report.handled_by) == ("resolved", moderator)
        assert log_messages(report) == ["Resolved: message 2 deleted."]
        assert b"deleted" in client.get(browser_url(conversation)).content

    def test_delete_of_an_unknown_seq_reports_the_error(self, message_store, trio, moderator_client):
        client, _ = moderator_client
        conversation = trio[3]
        response = client.post(f"{browser_url(conversation)}5/delete/", follow=True)
        assert b"Message 5 was not deleted" in response.content
        assert LogEntry.objects.count() == 0

    def test_delete_needs_a_post_with_a_csrf_token(self, message_store, trio, django_user_model):
        conversation = trio[3]
        send(trio[1], conversation)
        client = Client(enforce_csrf_checks=True)
        client.force_login(django_user_model.objects.create_superuser(username="m2", password="pw-for-mod-42"))
        assert client.get(f"{browser_url(conversation)}1/delete/").status_code == 405
        assert client.post(f"{browser_url(conversation)}1/delete/").status_code == 403
        assert not message_store.get(conversation.id, 1).deleted

    def test_permissions(self, message_store, trio, staff_client, published):
        conversation = trio[3]
        send(trio[1], conversation, "keep me")
        published.clear()
        nobody, _ = staff_client()
        assert nobody.get(browser_url(conversation)).status_code == 403
        viewer, _ = staff_client("view_conversation")
        page = viewer.get(browser_url(conversation))
        assert page.status_code == 200 and b"keep me" in page.content and b'value="Delete"' not in page.content
        assert viewer.post(f"{browser_url(conversation)}1/delete/").status_code == 403
        assert not message_store.get(conversation.id, 1).deleted and published == []
        changer, _ = staff_client("change_conversation")
        assert b'value="Delete"' in changer.get(browser_url(conversation)).content
        assert changer.post(f"{browser_url(conversation)}1/delete/").status_code == 302
        assert message_store.get(conversation.id, 1).deleted


@pytest.mark.django_db
class TestReportQueue:
    @pytest.fixture
    def reported(self, message_store, trio, client_for):
        alice, bob, _, conversation = trio
        send(bob, conversation, "you are all idiots")
        return report_message(client_for, alice, conversation, 1, reason="insults")

    def act(self, client, action, *reports):
        return client.post(
            "/admin/chat/report/", {"action": action, "index": 0, "_selected_action": [r.pk for r in reports]}
        )

    def test_the_queue_shows_the_reported_message(self, reported, moderator_client):
        client, _ = moderator_client
        queue = client.get("/admin/chat/report/", {"status__exact": "open"})
        assert queue.status_code == 200
        assert b"you are all idiots" in queue.content and b"insults" in queue.content
        detail = client.get(f"/admin/chat/report/{reported.pk}/change/")
        assert detail.status_code == 200 and b"(unchanged)" in detail.content
        assert b"?after_seq=0#seq-1" in detail.content

    @pytest.mark.parametrize(
        ("action", "status", "logged"), [("resolve", "resolved", "Resolved."), ("dismiss", "dismissed", "Dismissed.")]
    )
    def test_resolve_and_dismiss(self, reported, moderator_client, published, message_store, action, status, logged):
        client, moderator = moderator_client
        assert self.act(client, action, reported).status_code == 302
        reported.refresh_from_db()
        assert (reported.status, reported.handled_by) == (status, moderator)
        assert log_messages(reported) == [logged]
        assert not message_store.get(reported.conversation_id, 1).deleted and published == []
        # A closed report is not closed again, nor logged twice.
        self.act(client, "resolve" if action == "dismiss" else "dismiss", reported)
        reported.refresh_from_db()
        assert reported.status == status and len(log_messages(reported)) == 1

    @pytest.mark.django_db(transaction=True)  # its events go out on commit
    def test_delete_message(self, reported, moderator_client, published, message_store):
        client, _ = moderator_client
        assert self.act(client, "delete_message", reported).status_code == 302
        assert message_store.get(reported.conversation_id, 1).deleted
        assert published == [
            {"type": "message.deleted", "conversation_id": str(reported.conversation_id), "seq": 1, "change": 1}
        ]
        reported.refresh_from_db()
        assert reported.status == "resolved"
        assert log_messages(reported.conversation) == ["Deleted message 1 by bob."]
        detail = client.get(f"/admin/chat/report/{reported.pk}/change/")
        assert b"(deleted)" in detail.content and b"you are all idiots" in detail.content

    def test_ban_sender(self, reported, moderator_client, published, django_capture_on_commit_callbacks):
        client, moderator = moderator_client
        with django_capture_on_commit_callbacks(execute=True):
            assert self.act(client, "ban_sender", reported).status_code == 302
        ban = Ban.objects.get(conversation=reported.conversation, user=reported.sender)
        assert (ban.banned_by, ban.reason) == (moderator, f"Report #{reported.pk}: insults")
        assert {"type": "membership.revoked", "user_id": str(reported.sender_id)} in published
        reported.refresh_from_db()
        assert reported.status == "resolved"
        assert LogEntry.objects.get(action_flag=ADDITION, object_id=str(ban.pk)).get_change_message() == (
            f"Banned bob from the conversation (report #{reported.pk})."
        )
        assert log_messages(reported) == ["Resolved: sender bob banned."]

    def test_actions_need_their_permissions(self, reported, staff_client, message_store, published):
        nobody, _ = staff_client()
        assert nobody.get("/admin/chat/report/").status_code == 403
        assert self.act(nobody, "delete_message", reported).status_code == 403
        handler, _ = staff_client("view_report", "change_report")
        for action in ("delete_message", "ban_sender"):
            # An action the user may not run is not offered, and posting it does nothing.
            assert f'value="{action}"'.encode() not in handler.get("/admin/chat/report/").content
            self.act(handler, action, reported)
        assert not message_store.get(reported.conversation_id, 1).deleted
        assert not Ban.objects.exists() and published == []
        assert self.act(handler, "resolve", reported).status_code == 302
        reported.refresh_from_db()
        assert reported.status == "resolved"

    def test_the_services_check_the_permissions_too(self, reported, staff_client):
        _, handler = staff_client("change_report")
        with pytest.raises(NotAllowed):
            moderation.report_ban_sender(moderator=handler, report=reported)
        with pytest.raises(NotAllowed):
            moderation.report_delete_message(moderator=handler, report=reported)
        with pytest.raises(NotAllowed):
            moderation.message_moderate_delete(moderator=handler, conversation=reported.conversation, seq=1)
        assert not Ban.objects.exists()

    def test_reports_cannot_be_added_or_deleted_in_the_admin(self, reported, moderator_client):
        client, _ = moderator_client
        assert client.get("/admin/chat/report/add/").status_code == 403
        assert client.post(f"/admin/chat/report/{reported.pk}/delete/").status_code == 403
        assert Report.objects.filter(pk=reported.pk).exists()


@pytest.mark.django_db
def test_the_admin_log_is_browsable_and_read_only(message_store, trio, moderator_client):
    client, _ = moderator_client
    conversation = trio[3]
    send(trio[1], conversation)
    client.post(f"{browser_url(conversation)}1/delete/")
    log = client.get("/admin/admin/logentry/")
    assert log.status_code == 200 and b"Deleted message 1 by bob." in log.content
    entry = LogEntry.objects.get(action_flag=CHANGE)
    assert client.post(f"/admin/admin/logentry/{entry.pk}/delete/").status_code == 403


# --- live: what connected clients see -----------------------------------------------------------


@pytest.mark.django_db(transaction=True)
class TestLive:
    async def test_a_moderator_handles_a_report_in_the_admin_alone(
        self, message_store, trio, client_for, moderator_client
    ):
        """The issue's acceptance: find a reported message in the queue, delete it, ban its sender,
        and see all of it in the admin log; connected clients see each step."""
        alice, bob, _, conversation = trio
        client, moderator = moderator_client
        await database_sync_to_async(send)(bob, conversation, "scam link")
        report = await database_sync_to_async(report_message)(client_for, alice, conversation, 1)
        bystander, _ = await open_socket(alice, conversation)
        offender, _ = await open_socket(bob, conversation)
        for socket in (bystander, offender):
            assert (await receive(socket))["type"] == "ready"

        queue = await database_sync_to_async(client.get)("/admin/chat/report/", {"status__exact": "open"})
        assert b"scam link" in queue.content
        post = database_sync_to_async(client.post)
        await post("/admin/chat/report/", {"action": "delete_message", "index": 0, "_selected_action": [report.pk]})
        deleted = {"type": "message.deleted", "conversation_id": str(conversation.id), "seq": 1, "change": 1}
        assert await receive(bystander) == deleted
        assert await receive(offender) == deleted
        assert (await database_sync_to_async(message_store.get)(conversation.id, 1)).deleted

        await post("/admin/chat/report/", {"action": "ban_sender", "index": 0, "_selected_action": [report.pk]})
        await expect_close(offender, 4403)
        await offender.disconnect(code=4403)
        assert not (await open_socket(bob, conversation))[1]
        assert await nothing_but_presence(bystander)
        await bystander.disconnect()

        log = await database_sync_to_async(client.get)("/admin/admin/logentry/")
        for entry in ("Deleted message 1 by bob.", "Resolved: message 1 deleted.", "Banned bob from the conversation"):
            assert entry.encode() in log.content
        assert await database_sync_to_async(LogEntry.objects.filter(user=moderator).count)() == 3

    async def test_edit_and_browser_delete_reach_connected_clients(
        self, message_store, trio, client_for, moderator_client
    ):
        alice, bob, _, conversation = trio
        client, _ = moderator_client
        socket, _ = await open_socket(alice, conversation)
        await receive(socket)
        await database_sync_to_async(send)(bob, conversation, "typo")
        [message] = await receive_messages(socket, 1)
        bob_api = await database_sync_to_async(client_for)(bob)
        response = await database_sync_to_async(bob_api.patch)(
            message_url(conversation, 1), {"content": "fixed"}, format="json"
        )
        assert response.status_code == 200
        updated = await receive(socket)
        assert updated["type"] == "message.updated"
        assert updated["message"] == {**message, "content": "fixed", "edited_at": updated["message"]["edited_at"]}
        assert updated["message"]["edited_at"] is not None
        await database_sync_to_async(client.post)(f"{browser_url(conversation)}1/delete/")
        assert await receive(socket) == {"type": "message.deleted", "conversation_id": str(conversation.id), "seq": 1, "change": 2}
        await socket.disconnect()

    async def test_changes_to_a_message_not_yet_delivered_go_out_with_it(self, message_store, trio):
        """An edit or delete that overtakes its message.new is folded into that message, and its
        change frame follows the message: the client never sees the old content nor a change to a
        message it does not have yet, and still gets every change in change order."""
        alice, bob, _, conversation = trio
        template = (await database_sync_to_async(send)(bob, conversation, "m1", metadata={"k": "v"})).as_dict()
        socket, _ = await open_socket(alice, conversation)
        assert (await receive(socket))["last_seq"] == 1
        second, third, fourth = [{**template, "seq": seq, "content": f"m{seq}"} for seq in (2, 3, 4)]
        group = events.conversation_group(conversation.id)
        # seqs 3 and 4 arrive before 2 and wait; 3's edit and 4's deletion arrive while they wait.
        await events._apublish_to(group, {"type": "message.new", "message": third})
        await events._apublish_to(group, {"type": "message.new", "message": fourth})
        edited = {**third, "content": "m3 edited"}
        await events._apublish_to(group, {"type": "message.updated", "conversation_id": str(conversation.id), "message": edited, "change": 1})
        await events._apublish_to(group, {"type": "message.deleted", "conversation_id": str(conversation.id), "seq": 4, "change": 2})
        await events._apublish_to(group, {"type": "message.new", "message": second})
        frames = [await receive(socket) for _ in range(5)]
        assert [(f["type"], f.get("change")) for f in frames] == [
            ("message.new", None), ("message.new", None), ("message.updated", 1), ("message.new", None), ("message.deleted", 2)
        ]
        delivered = [f["message"] for f in frames if f["type"] == "message.new"]
        assert [(m["seq"], m["content"], m["metadata"], m["deleted"]) for m in delivered] == [
            (2, "m2", {"k": "v"}, False), (3, "m3 edited", {"k": "v"}, False), (4, "", {}, True)
        ]
        assert await nothing_but_presence(socket)
        await socket.disconnect()
