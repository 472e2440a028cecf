"""The membership rule is defined once (chat.access.allowed_participants); the send path runs it as
one hand-written statement (chat.sql.allowed_participations). Here the two, and every caller
built on them, are held to the same answer over every state a participation can be in."""
from __future__ import annotations

import uuid

import pytest

from accounts.models import User
from chat import selectors, sql
from chat.access import access_conversation, access_participation, access_participations, allowed_participants
from chat.models import Ban, Conversation, Participant
from chat.services import conversations
from core.errors import AccessDenied

pytestmark = pytest.mark.django_db

STATES = [
    "owner", "admin", "member", "removed", "banned", "ban lifted", "deactivated", "reactivated",
    "never a participant", "unknown conversation", "malformed id",
]
ALLOWED = {"owner", "admin", "member", "ban lifted", "reactivated"}


@pytest.fixture
def situation(make_user, make_group):
    """(user, conversation id as a caller would pass it) for a state."""

    def make(state: str) -> tuple[User, object]:
        owner, user = make_user(), make_user()
        conversation = make_group(owner, user)
        if state == "owner":
            return owner, conversation.pk
        if state == "admin":
            Participant.objects.filter(conversation=conversation, user=user).update(role=Participant.Role.ADMIN)
        elif state == "removed":
            conversations.participant_remove(actor=owner, conversation_id=conversation.pk, user_id=user.pk)
        elif state in ("banned", "ban lifted"):
            conversations.ban_create(actor=owner, conversation=conversation, user=user)
            if state == "ban lifted":
                Ban.objects.filter(conversation=conversation, user=user).delete()
        elif state in ("deactivated", "reactivated"):
            User.objects.filter(pk=user.pk).update(is_active=False)
            if state == "reactivated":
                User.objects.filter(pk=user.pk).update(is_active=True)
        elif state == "never a participant":
            return make_user(), conversation.pk
        elif state == "unknown conversation":
            return user, uuid.uuid4()
        elif state == "malformed id":
            return user, "not-a-uuid"
        return user, conversation.pk

    return make


def _allows(check, user, conversation_id) -> bool:
    try:
        check(user=user, conversation_id=conversation_id)
    except AccessDenied:
        return False
    return True


@pytest.mark.parametrize("state", STATES)
def test_every_definition_gives_the_same_answer(state, situation):
    user, conversation_id = situation(state)
    # The user object a socket holds is loaded once; the rule must read the account from the
    # database, not trust this object. A fresh one is what a new request would hold.
    fresh = User.objects.get(pk=user.pk)
    try:
        parsed = uuid.UUID(str(conversation_id))
    except ValueError:
        parsed = None
    answers = {
        "allowed_participants": parsed is not None
        and allowed_participants().filter(conversation_id=parsed, user_id=user.pk).exists(),
        "hand-written statement": parsed is not None and (user.pk, parsed) in sql.allowed_participations({(user.pk, parsed)}),
        "access_participation (send path, handshake, stale user object)": _allows(access_participation, user, conversation_id),
        "access_conversation (REST, WebSocket)": _allows(access_conversation, fresh, conversation_id),
        "conversation list": parsed is not None
        and selectors.conversation_list_for(user=fresh).filter(pk=parsed).exists(),
    }
    expected = state in ALLOWED
    assert answers == dict.fromkeys(answers, expected)


def test_the_hand_written_statement_and_the_queryset_agree_on_a_mixed_conversation(make_user, make_group):
    """One conversation holding every kind of participation at once, compared row by row."""
    owner, admin, member, banned, lifted, inactive = (make_user() for _ in range(6))
    conversation = make_group(owner, admin, member, banned, lifted, inactive)
    Participant.objects.filter(conversation=conversation, user=admin).update(role=Participant.Role.ADMIN)
    conversations.ban_create(actor=owner, conversation=conversation, user=banned)
    conversations.ban_create(actor=owner, conversation=conversation, user=lifted)
    Ban.objects.filter(conversation=conversation, user=lifted).delete()
    User.objects.filter(pk=inactive.pk).update(is_active=False)
    everyone = [owner, admin, member, banned, lifted, inactive]
    by_queryset = set(allowed_participants().filter(conversation=conversation).values_list("user_id", flat=True))
    by_statement = {user_id for user_id, _ in sql.allowed_participations({(u.pk, conversation.pk) for u in everyone})}
    assert by_queryset == by_statement == {owner.pk, admin.pk, member.pk, lifted.pk}


def test_the_statement_for_many_answers_only_the_pairs_asked(make_user, make_group):
    """A batch of sends asks for its senders in their conversations at once; a sender who is a
    member of another conversation of the batch, where they did not send, is not an answer, and
    each answer carries its own conversation's counters."""
    alice, bob, carol = make_user(), make_user(), make_user()
    first, second = make_group(alice, bob, carol), make_group(alice, bob)
    conversations.ban_create(actor=alice, conversation=second, user=bob)
    Conversation.objects.filter(pk=first.pk).update(last_seq=7, last_change=3)
    asked = {(alice.pk, second.pk), (bob.pk, first.pk), (bob.pk, second.pk), (carol.pk, second.pk)}
    found = sql.allowed_participations(asked)
    assert set(found) == {(alice.pk, second.pk), (bob.pk, first.pk)}
    assert found[(bob.pk, first.pk)] == (Participant.objects.get(conversation=first, user=bob).pk, 7, 3)
    assert found[(alice.pk, second.pk)][1:] == (0, 0)
    assert access_participations([(alice, second.pk), (alice, "not-a-uuid"), (carol, second.pk), (bob, first.pk)]) == [
        (second.pk, Participant.objects.get(conversation=second, user=alice).pk, 0, 0), None, None,
        (first.pk, Participant.objects.get(conversation=first, user=bob).pk, 7, 3),
    ]
