"""Mute end to end: a participant mutes a conversation over REST, and the worker delivers that
conversation's pushes to everyone else but them; replies to their own messages included (a mute
means no pushes from the conversation, SPEC 4.1); unmuting brings them back."""
from __future__ import annotations

import json

import pytest

from notifications.models import Delivery, Job

pytestmark = pytest.mark.django_db


def send_over_rest(client, conversation, content, **fields):
    response = client.post(
        "/api/v1/messages/", {"conversation_id": str(conversation.id), "content": content, **fields}, format="json"
    )
    assert response.status_code == 201, response.content
    return response.json()


def mute(client, conversation, muted):
    response = client.put(f"/api/v1/conversations/{conversation.id}/mute/", {"muted": muted}, format="json")
    assert response.status_code == 200 and response.json()["muted"] is muted


def pushed(webhook) -> list[tuple[str, str, int | None]]:
    """(device token, notification body, reply_to) of every push the receiver got, in order."""
    bodies = [json.loads(request.body) for request in webhook.received]
    return [(b["device"]["token"], b["notification"]["body"], b["notification"]["reply_to"]) for b in bodies]


def test_a_muted_participant_gets_no_pushes_not_even_for_replies_to_their_messages(
    webhook, make_user, make_group, make_device, make_worker, client_for
):
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    conversation = make_group(alice, bob, carol)
    make_device(bob, token="bob-phone")
    make_device(carol, token="carol-phone")
    worker = make_worker()

    send_over_rest(client_for(bob), conversation, "anyone for lunch?")  # seq 1, bob's own: no push to bob
    mute(client_for(bob), conversation, True)
    send_over_rest(client_for(alice), conversation, "me!", reply_to=1)
    send_over_rest(client_for(alice), conversation, "and about something else")
    worker.run(once=True)
    assert sorted(pushed(webhook)) == [
        ("carol-phone", "alice: and about something else", None),
        ("carol-phone", "alice: me!", 1),
        ("carol-phone", "bob: anyone for lunch?", None),
    ]

    mute(client_for(bob), conversation, False)
    send_over_rest(client_for(carol), conversation, "me too", reply_to=1)
    worker.run(once=True)
    # A reply notifies like any message, and says what it answers (the client shows "replied to you").
    assert pushed(webhook)[3:] == [("bob-phone", "carol: me too", 1)]


def test_muting_after_the_send_still_stops_the_push(webhook, make_user, make_group, make_device, make_worker, client_for):
    # The worker checks again before every attempt: a push queued before the mute is not sent.
    alice, bob = make_user("alice"), make_user("bob")
    conversation = make_group(alice, bob)
    make_device(bob, token="bob-phone")
    send_over_rest(client_for(alice), conversation, "late night message")
    mute(client_for(bob), conversation, True)
    make_worker().run(once=True)
    assert pushed(webhook) == []
    assert [(d.status, d.last_error) for d in Delivery.objects.all()] in ([], [(Job.Status.SKIPPED, "skipped: muted")])
