"""The message store: where messages live.

Two backends with one contract (tests/chat/test_store_contract.py runs against both):
`sql` (Django ORM; the embedded default) and `cassandra` (production).
"""
from __future__ import annotations

import abc
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cache
from typing import Any

from django.conf import settings
from django.utils.module_loading import import_string


class StoreError(Exception):
    """The store could not be reached or did not answer in time."""


@dataclass(frozen=True, slots=True)
class Message:
    message_id: uuid.UUID
    conversation_id: uuid.UUID
    seq: int
    sender_id: uuid.UUID
    content: str | None  # None only when inline() omitted it
    message_type: str
    is_encrypted: bool
    metadata: dict[str, Any]
    sent_at: datetime
    edited_at: datetime | None = None
    deleted: bool = False
    # The seq of the message this one replies to (SPEC 4.1), in the same conversation; None if none.
    reply_to: int | None = None
    # Set by inline() only: content over CHAT_INLINE_CONTENT_BYTES was left out (content is None).
    content_omitted: bool = False
    # The descriptors of the attachments the message carries (chat.services.attachments). Not kept
    # by the store: the relational Attachment rows are their truth, and chat.selectors adds them.
    attachments: tuple[dict[str, Any], ...] = ()

    def inline(self) -> "Message":
        """The message as frames and history pages carry it (SPEC sections 5 and 10): content over
        CHAT_INLINE_CONTENT_BYTES (UTF-8) is left out, so no message can make a frame exceed the
        transport's cap or a page hold more than a few MiB; the client reads it with
        GET conversations/{id}/messages/{seq}/."""
        if self.content is None or utf8_length(self.content) <= settings.CHAT_INLINE_CONTENT_BYTES:
            return self
        return replace(self, content=None, content_omitted=True)

    def as_dict(self) -> dict[str, Any]:
        """The wire shape of a message, shared by REST and WebSocket; `content_omitted: true` is
        there only when inline() left the content out."""
        shape = {
            "message_id": str(self.message_id),
            "conversation_id": str(self.conversation_id),
            "seq": self.seq,
            "sender_id": str(self.sender_id),
            "content": self.content,
            "message_type": self.message_type,
            "is_encrypted": self.is_encrypted,
            "metadata": self.metadata,
            "sent_at": self.sent_at.isoformat().replace("+00:00", "Z"),
            "edited_at": self.edited_at.isoformat().replace("+00:00", "Z") if self.edited_at else None,
            "deleted": self.deleted,
            "attachments": list(self.attachments),
            "reply_to": self.reply_to,
        }
        if self.content_omitted:
            shape["content_omitted"] = True
        return shape


def utf8_length(text: str) -> int:
    """len(text.encode()) without the copy where it can be avoided."""
    if text.isascii():  # a flag on CPython's compact strings: no scan
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True, slots=True)
class HistoryPage:
    messages: list[Message] = field(default_factory=list)
    has_more: bool = False


# What a change can be (SPEC 4.1): the kinds of the change log, and of the frames that carry them.
CHANGE_KINDS = ("updated", "deleted", "reaction.added", "reaction.removed")


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of a conversation's change log: the `change`-th edit, delete or reaction of it.

    The log names the message (`seq`) and never copies its content: a deleted message's content
    must be gone from everywhere, and readers take the message as it is now. `data` is what the
    kind adds (a reaction's emoji and user_id); JSON-serializable."""

    conversation_id: uuid.UUID
    change: int
    kind: str
    seq: int
    at: datetime
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.data,
            "change": self.change,
            "kind": self.kind,
            "seq": self.seq,
            "at": self.at.isoformat().replace("+00:00", "Z"),
        }


# What the store answers about a message's reactions, per seq: {emoji: {"count": n, "me": bool}},
# `me` for the user who asked (the wire shape of SPEC 4.1's `reactions`).
Reactions = dict[str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Edit:
    """One previous version of a message: the content an edit replaced (SPEC 4.1, edit history).

    `change` is the change number of the edit that replaced it; `written_at` when this content was
    written (the send, or the edit before), `replaced_at` when the edit replaced it."""

    conversation_id: uuid.UUID
    seq: int
    change: int
    content: str
    written_at: datetime
    replaced_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "change": self.change,
            "content": self.content,
            "written_at": self.written_at.isoformat().replace("+00:00", "Z"),
            "replaced_at": self.replaced_at.isoformat().replace("+00:00", "Z"),
        }


class MessageStore(abc.ABC):
    @abc.abstractmethod
    def insert(self, *messages: Message, meanwhile: Callable[[], None] | None = None) -> None:
        """Persist new messages, each at its (conversation, seq), all or (raising StoreError) not
        all: the caller's transaction then rolls their seqs back. A row already there belongs to a
        send whose relational transaction did not commit (no reader reads past the committed
        counter): the new message replaces it. `meanwhile` is run while the writes are in flight
        (a store across the network waits for them after it), so that the caller's own work
        within its transaction costs no extra time; an exception from it propagates."""

    @abc.abstractmethod
    def get(self, conversation_id: uuid.UUID, seq: int) -> Message | None: ...

    @abc.abstractmethod
    def history(
        self,
        conversation_id: uuid.UUID,
        *,
        after_seq: int | None = None,
        before_seq: int | None = None,
        limit: int = 50,
    ) -> HistoryPage:
        """Messages in ascending seq. With after_seq: the oldest `limit` after it; otherwise the
        newest `limit` below before_seq (or overall). has_more: more exist in the paged direction."""

    @abc.abstractmethod
    def edit(
        self, conversation_id: uuid.UUID, seq: int, content: str, edited_at: datetime
    ) -> Message | None:
        """Replace the content of a message and stamp edited_at; returns the message as stored now.

        None for an unknown message. A deleted message stays a tombstone: it is returned unchanged."""

    @abc.abstractmethod
    def tombstone(self, conversation_id: uuid.UUID, seq: int) -> Message | None:
        """Delete a message's content, keeping its place: content "", metadata {} (it describes the
        content: file names, sizes, links), deleted=True; id, seq, sender, times and reply_to stay.
        Its edit history (the earlier contents) and its reactions go with the content.

        Returns the tombstone (also when it already was one), or None for an unknown message."""

    # --- replies ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def reply_counts(self, conversation_id: uuid.UUID, seqs: Sequence[int]) -> dict[int, int]:
        """How many messages reply to each of `seqs` (tombstones included: they keep their place in
        the thread); seqs without replies are left out. The caller bounds the answer by the
        committed counter: it may count rows of sends that did not commit."""

    @abc.abstractmethod
    def replies(
        self, conversation_id: uuid.UUID, seq: int, *, after_seq: int, before_seq: int, limit: int = 50
    ) -> HistoryPage:
        """The messages replying to `seq` with a seq strictly between the two, ascending, at most
        `limit`; has_more when more follow before before_seq."""

    # --- reactions ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def reaction_add(self, conversation_id: uuid.UUID, seq: int, emoji: str, user_id: uuid.UUID) -> None:
        """Record that `user_id` reacted to the message with `emoji` (again: no effect)."""

    @abc.abstractmethod
    def reaction_remove(self, conversation_id: uuid.UUID, seq: int, emoji: str, user_id: uuid.UUID) -> None:
        """Take the reaction back (one that is not there: no effect)."""

    @abc.abstractmethod
    def reactions(self, conversation_id: uuid.UUID, seqs: Sequence[int], viewer_id: uuid.UUID | None) -> dict[int, Reactions]:
        """The reactions of each of `seqs` with their counts, `me` for `viewer_id`; seqs without
        reactions are left out. A page of messages is answered in a query per bucket, not per
        message."""

    # --- edit history ----------------------------------------------------------------------------

    @abc.abstractmethod
    def record_edit(self, edit: Edit) -> None:
        """Keep the content an edit replaces, at its (conversation, seq, change). One already there
        belongs to an edit whose relational transaction did not commit: the new one replaces it."""

    @abc.abstractmethod
    def edits(self, conversation_id: uuid.UUID, seq: int, *, before_change: int, limit: int = 50) -> list[Edit]:
        """The message's earlier versions replaced by edits numbered below before_change, newest
        first, at most `limit`."""

    @abc.abstractmethod
    def record_change(self, change: Change) -> None:
        """Write a change log entry at its (conversation, change). An entry already there belongs to
        a change whose relational transaction did not commit (no reader reads past the committed
        last_change): the new one replaces it."""

    @abc.abstractmethod
    def changes(
        self, conversation_id: uuid.UUID, *, after_change: int, before_change: int, limit: int = 50
    ) -> list[Change]:
        """The entries strictly between the two change numbers, ascending, at most `limit`."""


@cache
def get_message_store() -> MessageStore:
    backends = {"sql": "chat.store.sql.SqlMessageStore", "cassandra": "chat.store.cassandra.CassandraMessageStore"}
    try:
        path = backends[settings.CHAT_MESSAGE_STORE]
    except KeyError:
        raise ValueError(f"CHAT_MESSAGE_STORE must be one of {sorted(backends)}") from None
    return import_string(path)()
