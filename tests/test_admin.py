"""Moderation through the Django admin emits the same live events as the services."""
import pytest

from chat import events
from chat.models import Ban

pytestmark = pytest.mark.django_db



def test_ban_from_the_admin_closes_the_users_sockets(client, moderator, make_user, make_group, published, django_capture_on_commit_callbacks):
    alice, bob = make_user(), make_user()
    conversation = make_group(alice, bob)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/admin/chat/ban/add/", {"conversation": conversation.pk, "user": bob.pk, "reason": "spam"}
        )
    assert response.status_code == 302, response.content[:2000]
    ban = Ban.objects.get(conversation=conversation, user=bob)
    assert (ban.banned_by, ban.reason) == (moderator, "spam")
    assert {"type": "membership.revoked", "user_id": str(bob.pk)} in published


def test_deactivate_action(client, moderator, make_user, published, django_capture_on_commit_callbacks):
    bob = make_user()
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/admin/accounts/user/", {"action": "deactivate", "_selected_action": [str(bob.pk)]}
        )
    assert response.status_code == 302
    bob.refresh_from_db()
    assert not bob.is_active
    assert (events.ACCOUNTS_GROUP, {"type": "membership.revoked", "user_id": str(bob.pk)}) in published.groups


def test_unticking_active_in_the_user_form_also_closes_sockets(client, moderator, make_user, published, django_capture_on_commit_callbacks):
    bob = make_user("bob")
    form = {
        "username": "bob", "is_staff": "", "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00",
        "initial-date_joined_0": "2026-01-01", "initial-date_joined_1": "00:00:00",
    }
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/admin/accounts/user/{bob.pk}/change/", form)
    assert response.status_code == 302, response.content[:3000]
    bob.refresh_from_db()
    assert not bob.is_active
    assert (events.ACCOUNTS_GROUP, {"type": "membership.revoked", "user_id": str(bob.pk)}) in published.groups


def test_conversation_admin_pages_render(client, moderator, make_user, make_group):
    conversation = make_group(make_user(), make_user())
    assert client.get("/admin/chat/conversation/").status_code == 200
    assert client.get(f"/admin/chat/conversation/{conversation.pk}/change/").status_code == 200
    assert client.get("/admin/chat/conversation/", {"q": "team"}).status_code == 200


def test_every_way_of_removing_a_participant_closes_their_sockets(make_user, make_group, published, django_capture_on_commit_callbacks):
    """The admin's inline, a queryset delete, a deleted account: all revoke, not only the service."""
    from chat.models import Participant

    alice, bob, carol = make_user(), make_user(), make_user()
    conversation = make_group(alice, bob, carol)
    expected = {str(bob.pk), str(carol.pk)}
    with django_capture_on_commit_callbacks(execute=True):
        Participant.objects.filter(conversation=conversation, user=bob).delete()
        carol.delete()
    revoked = {e["user_id"] for e in published if isinstance(e, dict) and e["type"] == "membership.revoked"}
    assert revoked == expected
