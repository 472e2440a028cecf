"""The `sql` message store: the relational database through the ORM. Same contract as Cassandra."""
from __future__ import annotations

import uuid

from django.db import DatabaseError, transaction

from chat.models import SqlChange, SqlMessage
from chat.store import Change, HistoryPage, Message, MessageStore, StoreError


def _to_message(row: SqlMessage) -> Message:
    return Message(
        message_id=row.message_id,
        conversation_id=row.conversation_id,
        seq=row.seq,
        sender_id=row.sender_id,
        content=row.content,
        message_type=row.message_type,
        is_encrypted=row.is_encrypted,
        metadata=row.metadata,
        sent_at=row.sent_at,
        edited_at=row.edited_at,
        deleted=row.deleted,
    )


class SqlMessageStore(MessageStore):
    def insert(self, *messages: Message) -> None:
        try:
            with transaction.atomic():
                SqlMessage.objects.bulk_create(
                    SqlMessage(
                        message_id=message.message_id,
                        conversation_id=message.conversation_id,
                        seq=message.seq,
                        sender_id=message.sender_id,
                        content=message.content,
                        message_type=message.message_type,
                        is_encrypted=message.is_encrypted,
                        metadata=message.metadata,
                        sent_at=message.sent_at,
                        edited_at=message.edited_at,
                        deleted=message.deleted,
                    )
                    for message in messages
                )
        except DatabaseError as exc:
            raise StoreError(str(exc)) from exc

    def get(self, conversation_id: uuid.UUID, seq: int) -> Message | None:
        row = SqlMessage.objects.filter(conversation_id=conversation_id, seq=seq).first()
        return _to_message(row) if row else None

    def history(self, conversation_id, *, after_seq=None, before_seq=None, limit=50) -> HistoryPage:
        rows = SqlMessage.objects.filter(conversation_id=conversation_id)
        if after_seq is not None:
            rows = rows.filter(seq__gt=after_seq)
        if before_seq is not None:
            rows = rows.filter(seq__lt=before_seq)
        try:
            if after_seq is not None:
                page = list(rows.order_by("seq")[: limit + 1])
                has_more = len(page) > limit
                page = page[:limit]
            else:
                page = list(rows.order_by("-seq")[: limit + 1])
                has_more = len(page) > limit
                page = page[:limit][::-1]
        except DatabaseError as exc:
            raise StoreError(str(exc)) from exc
        return HistoryPage(messages=[_to_message(row) for row in page], has_more=has_more)

    def edit(self, conversation_id, seq, content, edited_at) -> Message | None:
        try:
            SqlMessage.objects.filter(conversation_id=conversation_id, seq=seq, deleted=False).update(
                content=content, edited_at=edited_at
            )
            return self.get(conversation_id, seq)
        except DatabaseError as exc:
            raise StoreError(str(exc)) from exc

    def tombstone(self, conversation_id, seq) -> Message | None:
        try:
            SqlMessage.objects.filter(conversation_id=conversation_id, seq=seq).update(
                content="", metadata={}, deleted=True
            )
            return self.get(conversation_id, seq)
        except DatabaseError as exc:
            raise StoreError(str(exc)) from exc

    def record_change(self, change: Change) -> None:
        try:
            SqlChange.objects.update_or_create(
                conversation_id=change.conversation_id,
                change=change.change,
                defaults={"kind": change.kind, "seq": change.seq, "at": change.at, "data": change.data},
            )
        except DatabaseError as exc:
            raise StoreError(str(exc)) from exc

    def changes(self, conversation_id, *, after_change, before_change, limit=50) -> list[Change]:
        rows = SqlChange.objects.filter(
            conversation_id=conversation_id, change__gt=after_change, change__lt=before_change
        ).order_by("change")[:limit]
        try:
            return [
                Change(
                    conversation_id=row.conversation_id, change=row.change, kind=row.kind, seq=row.seq, at=row.at, data=row.data
                )
                for row in rows
            ]
        except DatabaseError as exc:
            raise StoreError(str(exc)) from exc
