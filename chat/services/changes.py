"""The change counter (SPEC 4.1): every edit, delete and reaction of a conversation takes the next
value of its `last_change` and is kept in the message store's change log, so a client that was
away reads what changed (GET conversations/{id}/changes/, or a resume on its socket).

`change_record` is the one way a change is recorded: moderation (edits, deletes) calls it, and so
does anything else that changes a message (reactions).
"""
from __future__ import annotations

import uuid
from typing import Any

from django.db import transaction

from chat import sql
from chat.store import CHANGE_KINDS, Change, get_message_store
from chat.services.send import now_ms


def change_record(*, conversation_id: uuid.UUID, seq: int, kind: str, data: dict[str, Any] | None = None) -> Change:
    """Record a change of `kind` to the message at (conversation, seq); returns it with its number.

    Must run inside the caller's `transaction.atomic()`, around the write the change describes:
    the number is allocated there (the conversation's row stays locked until commit, so entries are
    written in number order) and a rollback un-takes it. The log entry is written at once; the store
    write it describes may come before or after it within the transaction. Raises StoreError when
    the store cannot write the entry (the caller's transaction then rolls back). The caller
    announces the change after commit (chat.events), with its number."""
    if kind not in CHANGE_KINDS:
        raise ValueError(f"unknown change kind {kind!r}")
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("change_record must run inside the transaction of the change it records")
    change = Change(
        conversation_id=conversation_id,
        change=sql.allocate_change(conversation_id),
        kind=kind,
        seq=seq,
        at=now_ms(),
        data=data or {},
    )
    get_message_store().record_change(change)
    return change
