"""Conversations and participants: create, rename, add, remove, ban, read markers; and the
revocation that follows every loss of access, whatever path caused it."""
from __future__ import annotations

import uuid

from django.conf import settings
from django.db import IntegrityError, transaction

from accounts.models import User
from chat import events
from chat.access import access_conversation
from chat.models import Ban, Conversation, Participant
from chat.selectors import conversation_object
from core.errors import NotAllowed, NotFound, ValidationFailed


def conversation_create(
    *, creator: User, kind: str, participant_ids: list[uuid.UUID], title: str = ""
) -> tuple[Conversation, bool]:
    """Create a conversation with the creator as owner; (conversation, created).

    A direct conversation is unique per pair: creating it again returns the existing one."""
    other_ids = set(participant_ids) - {creator.pk}
    others = list(User.objects.filter(pk__in=other_ids, is_active=True))
    unknown = other_ids - {user.pk for user in others}
    if unknown:
        raise ValidationFailed({"participant_ids": [f"Unknown or inactive users: {', '.join(sorted(map(str, unknown)))}."]})

    if kind == Conversation.Kind.DIRECT:
        if len(others) != 1:
            raise ValidationFailed({"participant_ids": ["A direct conversation has exactly one other participant."]})
        if title:
            raise ValidationFailed({"title": ["Direct conversations have no title."]})
        direct_key = ":".join(sorted([creator.pk.hex, others[0].pk.hex]))
        existing = Conversation.objects.filter(direct_key=direct_key).first()
        if existing is not None:
            return existing, False
        try:
            with transaction.atomic():
                conversation = Conversation.objects.create(kind=kind, created_by=creator, direct_key=direct_key)
                Participant.objects.bulk_create(
                    [
                        Participant(conversation=conversation, user=creator, role=Participant.Role.OWNER),
                        Participant(conversation=conversation, user=others[0], role=Participant.Role.MEMBER),
                    ]
                )
                _announce_joined(conversation, [creator.pk, others[0].pk])
        except IntegrityError:
            # The other person created the same pair at the same moment.
            return Conversation.objects.get(direct_key=direct_key), False
        return conversation, True

    if len(others) + 1 > settings.CHAT_MAX_GROUP_PARTICIPANTS:
        raise ValidationFailed(
            {"participant_ids": [f"A group has at most {settings.CHAT_MAX_GROUP_PARTICIPANTS} participants."]}
        )
    with transaction.atomic():
        conversation = Conversation.objects.create(kind=kind, title=title, created_by=creator)
        participants = Participant.objects.bulk_create(
            [Participant(conversation=conversation, user=creator, role=Participant.Role.OWNER)]
            + [Participant(conversation=conversation, user=user, role=Participant.Role.MEMBER) for user in others]
        )
        _announce_joined(conversation, [participant.user_id for participant in participants])
    return conversation, True


def conversation_update(*, actor: User, conversation_id: object, title: str) -> Conversation:
    conversation, participant = access_conversation(user=actor, conversation_id=conversation_id)
    if not participant.can_manage:
        raise NotAllowed("Only the owner or an admin may change the conversation.")
    if conversation.kind == Conversation.Kind.DIRECT:
        raise ValidationFailed({"title": ["Direct conversations have no title."]})
    conversation.title = title
    conversation.save(update_fields=["title"])
    events.conversation_updated(conversation_object(conversation))
    return conversation


def participant_add(
    *, actor: User, conversation_id: object, user_id: uuid.UUID, role: str = Participant.Role.MEMBER
) -> tuple[Participant, bool]:
    """Add a user to a group conversation (owner/admin; only the owner appoints admins)."""
    conversation, actor_participant = access_conversation(user=actor, conversation_id=conversation_id)
    if not actor_participant.can_manage:
        raise NotAllowed("Only the owner or an admin may add participants.")
    if conversation.kind == Conversation.Kind.DIRECT:
        raise ValidationFailed({"user_id": ["Direct conversations have fixed participants."]})
    if role not in (Participant.Role.ADMIN, Participant.Role.MEMBER):
        raise ValidationFailed({"role": ["Must be admin or member."]})
    if role == Participant.Role.ADMIN and actor_participant.role != Participant.Role.OWNER:
        raise NotAllowed("Only the owner may appoint admins.")
    user = User.objects.filter(pk=user_id, is_active=True).first()
    if user is None:
        raise ValidationFailed({"user_id": ["Unknown or inactive user."]})
    if conversation.bans.filter(user=user).exists():
        raise ValidationFailed({"user_id": ["This user is banned from the conversation."]})
    if conversation.participants.count() >= settings.CHAT_MAX_GROUP_PARTICIPANTS:
        raise ValidationFailed({"user_id": [f"A group has at most {settings.CHAT_MAX_GROUP_PARTICIPANTS} participants."]})
    try:
        with transaction.atomic():
            # New participants start with everything before their arrival already read.
            participant = Participant.objects.create(
                conversation=conversation, user=user, role=role, last_read_seq=conversation.last_seq
            )
    except IntegrityError:
        return Participant.objects.get(conversation=conversation, user=user), False
    return participant, True


def participant_remove(*, actor: User, conversation_id: object, user_id: uuid.UUID) -> None:
    """Remove a participant: anyone may leave; the owner removes anyone, an admin removes members.

    The removed user's open sockets on the conversation are closed (4403)."""
    conversation, actor_participant = access_conversation(user=actor, conversation_id=conversation_id)
    if conversation.kind == Conversation.Kind.DIRECT:
        raise ValidationFailed({"user_id": ["Direct conversations have fixed participants."]})
    target = conversation.participants.filter(user_id=user_id).first()
    if target is None:
        raise NotFound("No such participant.")
    if target.pk != actor_participant.pk:
        allowed = actor_participant.role == Participant.Role.OWNER or (
            actor_participant.role == Participant.Role.ADMIN and target.role == Participant.Role.MEMBER
        )
        if not allowed:
            raise NotAllowed("You may not remove this participant.")
    # Read by leave_on_participant_delete: the user's streams say why the conversation left them.
    target.leave_reason = "left" if target.pk == actor_participant.pk else "removed"
    with transaction.atomic():
        target.delete()  # closes the removed user's sockets: see revoke_on_participant_delete
        if target.role == Participant.Role.OWNER:
            _hand_over_ownership(conversation)


def _hand_over_ownership(conversation: Conversation) -> None:
    # The longest-standing admin inherits the conversation, else the longest-standing member
    # ("admin" sorts before "member").
    heir = conversation.participants.exclude(role=Participant.Role.OWNER).order_by("role", "joined_at", "pk").first()
    if heir is not None:
        heir.role = Participant.Role.OWNER
        heir.save(update_fields=["role"])


def ban_create(*, actor: User | None, conversation: Conversation, user: User, reason: str = "") -> Ban:
    """Ban a user from a conversation; their open sockets on it close (4403) at once.

    The participant row stays, so lifting the ban restores their access and read position."""
    ban, _ = Ban.objects.get_or_create(  # closes the user's sockets: see revoke_on_ban_save
        conversation=conversation, user=user, defaults={"banned_by": actor, "reason": reason}
    )
    return ban


def _standing(conversation_id: uuid.UUID) -> tuple[int, int]:
    """The conversation's (last_seq, last_change), read under its row lock in the caller's
    transaction: a send or change commits wholly before or wholly after the membership change."""
    with transaction.atomic():
        row = Conversation.objects.select_for_update().filter(pk=conversation_id).values_list("last_seq", "last_change").first()
    return row or (0, 0)


def _announce_joined(conversation: Conversation, user_ids: list[uuid.UUID]) -> None:
    last_seq, last_change = _standing(conversation.id)
    shape = conversation_object(conversation)
    for user_id in user_ids:
        events.conversation_joined(user_id, shape, last_seq, last_change)


# Access is revoked by model signals rather than by each service, so every path that removes a
# participant or bans someone (services, the admin's inline and forms, cascades from a deleted
# user or conversation) closes the affected sockets, once the change is committed.
def revoke_on_participant_delete(sender, instance: Participant, **kwargs) -> None:
    events.membership_revoked(instance.conversation_id, instance.user_id)


def revoke_on_ban_save(sender, instance: Ban, **kwargs) -> None:
    events.membership_revoked(instance.conversation_id, instance.user_id)


# And the same signals tell the person's user streams (conversation.joined / conversation.left), so
# the admin, cascades and services all announce membership the same way. A bulk_create sends no
# signal: conversation_create announces its participants itself.
def join_on_participant_save(sender, instance: Participant, created: bool, **kwargs) -> None:
    if created:
        _announce_joined(instance.conversation, [instance.user_id])


def leave_on_participant_delete(sender, instance: Participant, **kwargs) -> None:
    last_seq, last_change = _standing(instance.conversation_id)
    reason = getattr(instance, "leave_reason", "removed")
    events.conversation_left(instance.user_id, instance.conversation_id, reason, last_seq, last_change)


def leave_on_ban_save(sender, instance: Ban, created: bool, **kwargs) -> None:
    if created and Participant.objects.filter(conversation_id=instance.conversation_id, user_id=instance.user_id).exists():
        last_seq, last_change = _standing(instance.conversation_id)
        events.conversation_left(instance.user_id, instance.conversation_id, "banned", last_seq, last_change)


def join_on_ban_delete(sender, instance: Ban, **kwargs) -> None:
    """A lifted ban gives a participant their access back."""
    participant = Participant.objects.filter(conversation_id=instance.conversation_id, user_id=instance.user_id).first()
    if participant is not None:
        _announce_joined(participant.conversation, [participant.user_id])


def revoke_on_credentials_revoked(sender, user_id: uuid.UUID, **kwargs) -> None:
    """accounts.signals.credentials_revoked (deactivation, password change): every socket of the
    account closes (4403)."""
    events.user_sockets_revoked(user_id)


def read_marker_set(*, user: User, conversation_id: object, seq: object) -> Participant:
    """Move the caller's read marker forward to `seq`; it never moves backwards."""
    conversation, participant = access_conversation(user=user, conversation_id=conversation_id)
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= conversation.last_seq:
        raise ValidationFailed({"seq": [f"Must be an integer between 0 and {conversation.last_seq}."]})
    moved = Participant.objects.filter(pk=participant.pk, last_read_seq__lt=seq).update(last_read_seq=seq)
    participant.refresh_from_db(fields=["last_read_seq"])
    if moved:
        events.read_marker(conversation.id, user.pk, seq)
    return participant


def conversation_mute(*, user: User, conversation_id: object, muted: bool) -> tuple[Conversation, Participant]:
    """Mute or unmute a conversation for yourself: no push notifications reach you from it while
    muted (the notification worker checks before every attempt); everything else stays."""
    conversation, participant = access_conversation(user=user, conversation_id=conversation_id)
    if participant.muted != muted:
        Participant.objects.filter(pk=participant.pk).update(muted=muted)
        participant.muted = muted
    return conversation, participant
