"""N simultaneous sends with one idempotency key, on both message stores (Cassandra: the real
server): exactly one message, no seq burned, and every other request answered with that message.
The record commits in the send's relational transaction, so a concurrent duplicate waits for the
first send and then replays it (never 409)."""
import threading

import pytest
from django.db import connection

from chat import events

from tests.conftest import nothing_published, use_message_store
from chat.services import send as sending
from chat.models import Conversation

pytestmark = pytest.mark.django_db(transaction=True)

SENDERS = 8


@pytest.fixture
def store(each_message_store, monkeypatch):
    monkeypatch.setattr(events, "_apublish_to", nothing_published)
    return each_message_store


@pytest.mark.parametrize("round_", range(3))
def test_one_key_many_simultaneous_requests(store, make_user, make_group, round_):
    alice, bob = make_user(), make_user()
    conversation = make_group(alice, bob)
    barrier = threading.Barrier(SENDERS)
    outcomes, errors = [], []

    def attempt():
        barrier.wait()
        try:
            result = sending.message_send(sending.SendRequest(
                sender=alice, conversation_id=conversation.id, content="once", idempotency_key="same-key"
            ))
            outcomes.append(("replayed" if result.replayed else "created", result.message))
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=attempt) for _ in range(SENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    created = [message for kind, message in outcomes if kind == "created"]
    assert len(created) == 1
    assert [kind for kind, _ in outcomes].count("replayed") == SENDERS - 1
    assert all(message == created[0] for kind, message in outcomes if kind == "replayed")
    assert Conversation.objects.get(pk=conversation.pk).last_seq == 1
    assert [m.message_id for m in store.history(conversation.id).messages] == [created[0].message_id]
    # Once the first request is done, every retry is a replay of it.
    again = sending.message_send(sending.SendRequest(sender=alice, conversation_id=conversation.id, content="once", idempotency_key="same-key"))
    assert again.replayed and again.message == created[0]


def test_a_send_whose_commit_fails_after_the_store_write_is_retried_not_replayed(store, make_user, make_group, monkeypatch):
    # The message reached the store, then the relational transaction failed: the send failed, so
    # the retry must create the message (at the same seq, none burned), not replay the orphan.
    from django.db import DatabaseError

    from core.errors import StoreUnavailable

    alice, bob = make_user(), make_user()
    conversation = make_group(alice, bob)

    def commit_breaks(*args):
        raise DatabaseError("the relational database went away")

    monkeypatch.setattr(sending.sql, "advance_read_markers", commit_breaks)
    with pytest.raises(StoreUnavailable):
        sending.message_send(sending.SendRequest(sender=alice, conversation_id=conversation.id, content="hi", idempotency_key="k"))
    monkeypatch.undo()
    use_message_store(monkeypatch, store)
    monkeypatch.setattr(events, "_apublish_to", nothing_published)

    result = sending.message_send(sending.SendRequest(sender=alice, conversation_id=conversation.id, content="hi", idempotency_key="k"))
    assert not result.replayed and result.message.seq == 1
    assert [m.message_id for m in store.history(conversation.id).messages] == [result.message.message_id]
    assert sending.message_send(sending.SendRequest(
        sender=alice, conversation_id=conversation.id, content="hi", idempotency_key="k"
    )).replayed
