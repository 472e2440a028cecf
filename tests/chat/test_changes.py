"""The change counter and change log (SPEC 4.1): every edit and delete takes the conversation's
next change number in its relational transaction and is kept in the message store's change log;
GET conversations/{id}/changes/ pages it, for members only. Both message stores."""
from __future__ import annotations

import pytest

from django.db import transaction
from chat.models import Conversation
from chat.services.changes import change_record
from chat.store import StoreError
from tests.chat.test_moderation import message_store, message_url, send, trio  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db


def changes_url(conversation):
    return f"/api/v1/conversations/{conversation.id}/changes/"


def test_edits_and_deletes_are_numbered_logged_and_paged(message_store, trio, client_for):
    alice, bob, _, conversation = trio
    for text in ("one", "two", "three"):
        send(bob, conversation, text)
    bob_client = client_for(bob)
    assert bob_client.patch(message_url(conversation, 2), {"content": "TWO"}, format="json").json()["change"] == 1
    assert bob_client.delete(message_url(conversation, 3)).json()["change"] == 2
    assert bob_client.patch(message_url(conversation, 1), {"content": "ONE"}, format="json").json()["change"] == 3
    # An edit refused (a deleted message) takes no number.
    assert bob_client.patch(message_url(conversation, 3), {"content": "back"}, format="json").status_code == 400

    page = client_for(alice).get(changes_url(conversation)).json()
    assert [(c["change"], c["kind"], c["seq"]) for c in page["results"]] == [(1, "updated", 2), (2, "deleted", 3), (3, "updated", 1)]
    assert page["has_more"] is False
    # An updated entry carries the message as it is now; a delete never carries content.
    assert page["results"][0]["message"]["content"] == "TWO" and "message" not in page["results"][1]

    first = client_for(alice).get(changes_url(conversation), {"limit": 2}).json()
    assert [c["change"] for c in first["results"]] == [1, 2] and first["has_more"] is True
    rest = client_for(alice).get(changes_url(conversation), {"after_change": 2, "limit": 2}).json()
    assert [c["change"] for c in rest["results"]] == [3] and rest["has_more"] is False
    assert client_for(alice).get(changes_url(conversation), {"after_change": 3}).json() == {"results": [], "has_more": False}

    detail = client_for(alice).get(f"/api/v1/conversations/{conversation.id}/").json()
    listed = client_for(alice).get("/api/v1/conversations/").json()["results"][0]
    assert detail["last_change"] == listed["last_change"] == 3


def test_members_only_with_no_existence_leak(trio, client_for):
    alice, bob, carol, conversation = trio
    unknown = Conversation(id="00000000-0000-0000-0000-000000000001")
    assert client_for(carol).get(changes_url(conversation)).status_code == 403
    assert client_for(carol).get(changes_url(unknown)).status_code == 403
    assert client_for(alice).get(changes_url(unknown)).status_code == 403
    assert client_for(alice).get(changes_url(conversation)).status_code == 200


@pytest.mark.parametrize(
    "query, field",
    [
        ({"after_change": "-1"}, "after_change"),
        ({"after_change": "abc"}, "after_change"),
        ({"after_change": str(2**64)}, "after_change"),
        ({"after_change": "1\x00"}, "after_change"),
        ({"limit": "0"}, "limit"),
        ({"limit": "201"}, "limit"),
        ({"limit": "ten"}, "limit"),
    ],
)
def test_bad_cursors_and_limits_are_400_with_the_field(trio, client_for, query, field):
    alice, _, _, conversation = trio
    response = client_for(alice).get(changes_url(conversation), query)
    assert response.status_code == 400 and field in response.json()


def test_a_failed_log_write_rolls_the_edit_back_and_burns_no_number(message_store, trio, client_for, monkeypatch):
    _, bob, _, conversation = trio
    send(bob, conversation, "keep me")

    def refuse(change):
        raise StoreError("down")

    with monkeypatch.context() as patched:
        patched.setattr(message_store, "record_change", refuse)
        assert client_for(bob).patch(message_url(conversation, 1), {"content": "lost"}, format="json").status_code == 503
        assert client_for(bob).delete(message_url(conversation, 1)).status_code == 503
    conversation.refresh_from_db()
    assert conversation.last_change == 0
    assert message_store.get(conversation.id, 1).content == "keep me" and not message_store.get(conversation.id, 1).deleted
    assert client_for(bob).patch(message_url(conversation, 1), {"content": "now"}, format="json").json()["change"] == 1


def test_nothing_past_the_committed_counter_is_listed(message_store, trio, client_for):
    # A log entry whose relational transaction rolled back (Cassandra keeps it) stays unseen, and
    # the next change takes its number.
    alice, bob, _, conversation = trio
    send(bob, conversation, "x")
    with pytest.raises(RuntimeError), transaction.atomic():
        change_record(conversation_id=conversation.id, seq=1, kind="updated")
        raise RuntimeError("rolled back")
    assert client_for(alice).get(changes_url(conversation)).json()["results"] == []
    assert client_for(bob).patch(message_url(conversation, 1), {"content": "y"}, format="json").json()["change"] == 1
    assert len(client_for(alice).get(changes_url(conversation)).json()["results"]) == 1


@pytest.mark.django_db(transaction=True)  # outside any transaction, as a careless caller would be
def test_change_record_refuses_to_run_outside_a_transaction_and_unknown_kinds(trio):
    _, _, _, conversation = trio
    with pytest.raises(RuntimeError):
        change_record(conversation_id=conversation.id, seq=1, kind="updated")
    with pytest.raises(ValueError):
        change_record(conversation_id=conversation.id, seq=1, kind="renamed")
