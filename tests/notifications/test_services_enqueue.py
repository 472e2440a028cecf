"""The send path: a notification is recorded durably, with one insert and no network call."""
import socket
import uuid

import pytest
from django.utils import timezone

from chat.store import Message
from notifications.backends.webhook import WebhookBackend
from notifications.models import Delivery, Job, OutboxEntry
from notifications.services import notification_enqueue
from tests.notifications.receiver import unused_port

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.notifications.urls")]


def test_enqueue_is_a_single_insert_for_the_sends_that_commit_together(django_assert_num_queries):
    messages = [
        Message(
            message_id=uuid.uuid4(),
            conversation_id=uuid.uuid4(),
            seq=seq,
            sender_id=uuid.uuid4(),
            content="hello",
            message_type="text",
            is_encrypted=False,
            metadata={},
            sent_at=timezone.now(),
        )
        for seq in (7, 8, 9)
    ]
    with django_assert_num_queries(1) as captured:
        notification_enqueue(messages=messages)
    assert captured.captured_queries[0]["sql"].startswith("INSERT")
    entries = list(OutboxEntry.objects.order_by("seq"))
    assert [(e.message_id, e.conversation_id, e.seq, e.sender_id) for e in entries] == [
        (m.message_id, m.conversation_id, m.seq, m.sender_id) for m in messages
    ]
    for entry in entries:
        assert (entry.status, entry.attempts, entry.claimed_by, entry.last_error) == ("pending", 0, "", "")
        assert entry.claimed_until is None and entry.finished_at is None
        assert abs((timezone.now() - entry.next_attempt_at).total_seconds()) < 5
        assert abs((timezone.now() - entry.created_at).total_seconds()) < 5


def test_send_with_the_receiver_down_returns_201_and_makes_no_network_call(
    make_user, make_group, make_device, client_for, make_worker, monkeypatch, settings
):
    settings.CHAT_PUSH_BACKEND = "webhook"
    settings.CHAT_WEBHOOK_URL = f"http://127.0.0.1:{unused_port()}/hook"
    settings.CHAT_WEBHOOK_SECRET = "s"
    alice, bob = make_user(), make_user()
    make_device(bob)
    conversation = make_group(alice, bob)

    connects: list[object] = []
    real_connect = socket.socket.connect

    def recording_connect(sock: socket.socket, address: object) -> None:
        connects.append(address)
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", recording_connect)
    backend_calls: list[object] = []
    real_send = WebhookBackend.send
    monkeypatch.setattr(WebhookBackend, "send", lambda self, *args: backend_calls.append(args))

    response = client_for(alice).post(
        "/api/v1/messages/", {"conversation_id": str(conversation.pk), "content": "hi"}, format="json"
    )

    assert response.status_code == 201, response.data
    # Normal speed by construction: the request neither reached the backend nor opened a socket.
    assert connects == [] and backend_calls == []
    entry = OutboxEntry.objects.get(message_id=response.data["message_id"])
    assert (entry.status, entry.attempts, entry.seq) == (Job.Status.PENDING, 0, response.data["seq"])

    # Delivery is the worker's business: there the dead receiver is an attempt to retry.
    monkeypatch.setattr(socket.socket, "connect", real_connect)
    monkeypatch.setattr(WebhookBackend, "send", real_send)
    worker = make_worker()
    worker.run(once=True)
    delivery = Delivery.objects.get(outbox=entry)
    assert (delivery.status, delivery.attempts) == (Job.Status.PENDING, 1)
    assert "unreachable" in delivery.last_error
    assert delivery.next_attempt_at > timezone.now()
