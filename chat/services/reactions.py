"""Reactions (SPEC 4.1): a participant marks a message with an emoji, and takes it back.

Every reaction that changes something is a change of the conversation (chat.services.changes):
it takes the next change number in the transaction that writes it, lands in the change log and
goes out as reaction.added / reaction.removed. Reacting again with the same emoji, or taking back
a reaction that is not there, changes nothing and takes no number.

Reactions count against the sender's send rate (CHAT_SEND_RATE): each one is a write that every
connected member receives, so a script cannot flood a conversation with them instead of messages.
"""
from __future__ import annotations

import logging
import unicodedata
import uuid
from dataclasses import dataclass
from typing import Any

from django.db import DatabaseError, transaction

from accounts.models import User
from chat import events, metrics
from chat.access import access_conversation
from chat.selectors import message_at
from chat.services.changes import change_record
from chat.store import MessageStore, Reactions, StoreError, get_message_store, utf8_length
from core.errors import NotFound, RateLimited, StoreUnavailable, ValidationFailed
from core.ratelimit import get_send_rate_limiter

logger = logging.getLogger(__name__)

MAX_EMOJI_BYTES = 64
MAX_DISTINCT_EMOJI = 50
# Per person and message: without it one member could take all 50 places of every message, and
# nobody else could react with anything new.
MAX_EMOJI_PER_USER = 20


@dataclass(frozen=True, slots=True)
class ReactionChange:
    """What a PUT or DELETE of a reaction did: the change number it took (None: nothing changed)
    and the message's reactions now, `me` for the caller."""

    conversation_id: uuid.UUID
    seq: int
    emoji: str
    user_id: uuid.UUID
    change: int | None
    reactions: Reactions

    def as_dict(self) -> dict[str, Any]:
        return {
            "conversation_id": str(self.conversation_id),
            "seq": self.seq,
            "emoji": self.emoji,
            "user_id": str(self.user_id),
            "change": self.change,
            "reactions": self.reactions,
        }


# Format characters an emoji uses: the zero-width joiner of ZWJ sequences and the tag characters
# of subdivision flags. Any other format character (a right-to-left override, say) is refused.
_EMOJI_FORMAT_CHARACTERS = frozenset({"\u200d"} | {chr(c) for c in range(0xE0020, 0xE0080)})


def _emoji_character(ch: str) -> bool:
    # U+FFFD: what invalid UTF-8 in the URL decodes to.
    if ch == "\ufffd":
        return False
    category = unicodedata.category(ch)
    if category == "Cf":
        return ch in _EMOJI_FORMAT_CHARACTERS
    return category not in ("Cc", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")


def check_emoji(emoji: object) -> str:
    """1-64 bytes of UTF-8 with no whitespace and no control characters (SPEC 4.1). Which emoji
    exist is the clients' business: the server keeps the text as given."""
    problem = None
    if not isinstance(emoji, str) or emoji == "":
        problem = "Must be a non-empty string."
    elif len(emoji) > MAX_EMOJI_BYTES:
        problem = f"At most {MAX_EMOJI_BYTES} bytes (UTF-8)."
    elif any(ch.isspace() or not _emoji_character(ch) for ch in emoji):
        problem = "Must not contain whitespace, control, format, private-use or unassigned characters."
    elif utf8_length(emoji) > MAX_EMOJI_BYTES:
        problem = f"At most {MAX_EMOJI_BYTES} bytes (UTF-8)."
    if problem:
        raise ValidationFailed({"emoji": [problem]})
    return emoji


def reaction_add(*, user: User, conversation_id: object, seq: object, emoji: object) -> ReactionChange:
    """React to a message of a conversation you are in; emits reaction.added when it is new."""
    return _reaction_set(user=user, conversation_id=conversation_id, seq=seq, emoji=emoji, present=True)


def reaction_remove(*, user: User, conversation_id: object, seq: object, emoji: object) -> ReactionChange:
    """Take your reaction back; emits reaction.removed when there was one."""
    return _reaction_set(user=user, conversation_id=conversation_id, seq=seq, emoji=emoji, present=False)


def _reaction_set(*, user: User, conversation_id: object, seq: object, emoji: object, present: bool) -> ReactionChange:
    conversation, _ = access_conversation(user=user, conversation_id=conversation_id)
    emoji = check_emoji(emoji)
    message = message_at(conversation=conversation, seq=seq)
    if message.deleted:
        raise ValidationFailed({"non_field_errors": ["This message was deleted."]})
    rate = get_send_rate_limiter().check(user.pk)
    if not rate.allowed:
        metrics.send_rate_limited.labels(transport="rest").inc()
        raise RateLimited(rate)
    store = get_message_store()
    kind = "reaction.added" if present else "reaction.removed"
    written = False
    try:
        with transaction.atomic():
            # The change number first: it locks the conversation's row, so what is read below
            # (the message, its reactions) cannot change before this commits.
            change = change_record(
                conversation_id=conversation.id, seq=message.seq, kind=kind, data={"emoji": emoji, "user_id": str(user.pk)}
            )
            current = store.get(conversation.id, message.seq)
            if current is None:
                raise NotFound("No such message.")
            if current.deleted:
                raise ValidationFailed({"non_field_errors": ["This message was deleted."]})
            reactions = store.reactions(conversation.id, [message.seq], user.pk).get(message.seq, {})
            mine = reactions.get(emoji, {}).get("me", False)
            if mine == present:
                transaction.set_rollback(True)  # nothing changes: give the number back
                return ReactionChange(conversation.id, message.seq, emoji, user.pk, None, reactions)
            if present:
                _check_room(reactions, emoji)
            _store_reaction(store, conversation.id, message.seq, emoji, user.pk, present)
            written = True
            events.reaction_changed(change)
    except StoreError as exc:
        raise StoreUnavailable() from exc
    except DatabaseError as exc:
        if written:
            # The relational commit failed after the store write (Cassandra is no part of that
            # transaction): undo it, or a retry would find the reaction there, change nothing
            # and announce nothing, and nobody would ever hear of it.
            _undo(store, conversation.id, message.seq, emoji, user.pk, present)
        raise StoreUnavailable() from exc
    return ReactionChange(conversation.id, message.seq, emoji, user.pk, change.change, _after(reactions, emoji, present))


def _check_room(reactions: Reactions, emoji: str) -> None:
    """Whether the caller may add `emoji` to a message with these reactions (`me` theirs)."""
    if emoji not in reactions and len(reactions) >= MAX_DISTINCT_EMOJI:
        raise ValidationFailed({"emoji": [f"A message has at most {MAX_DISTINCT_EMOJI} distinct emoji."]})
    if sum(1 for state in reactions.values() if state["me"]) >= MAX_EMOJI_PER_USER:
        raise ValidationFailed({"emoji": [f"You can react to a message with at most {MAX_EMOJI_PER_USER} emoji."]})


def _store_reaction(store: MessageStore, conversation_id: uuid.UUID, seq: int, emoji: str, user_id: uuid.UUID, present: bool) -> None:
    if present:
        store.reaction_add(conversation_id, seq, emoji, user_id)
    else:
        store.reaction_remove(conversation_id, seq, emoji, user_id)


def _undo(store: MessageStore, conversation_id: uuid.UUID, seq: int, emoji: str, user_id: uuid.UUID, present: bool) -> None:
    try:
        _store_reaction(store, conversation_id, seq, emoji, user_id, not present)
    except StoreError:
        logger.error("could not undo a reaction to %s/%s whose change did not commit", conversation_id, seq)


def _after(reactions: Reactions, emoji: str, present: bool) -> Reactions:
    """The message's reactions once the caller's `emoji` was added or removed."""
    now = {name: dict(state) for name, state in reactions.items()}
    state = now.setdefault(emoji, {"count": 0, "me": False})
    state["count"] += 1 if present else -1
    state["me"] = present
    if state["count"] <= 0:
        del now[emoji]
    return dict(sorted(now.items()))
