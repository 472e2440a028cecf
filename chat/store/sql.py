"""The `sql` message store: the relational database through the ORM. Same contract as Cassandra."""
from __future__ import annotations

import uuid

from collections.abc import Callable, Sequence

from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import Count, Q

from chat.models import SqlChange, SqlEdit, SqlMessage, SqlReaction
from chat.store import Change, Edit, HistoryPage, Message, MessageStore, Reactions, StoreError


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
        reply_to=row.reply_to,
    )


class SqlMessageStore(MessageStore):
    def insert(self, *messages: Message, meanwhile: Callable[[], None] | None = None) -> None:
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
                        reply_to=message.reply_to,
                    )
                    for message in messages
                )
        except DatabaseError as exc:
            raise StoreError(str(exc)) from exc
        if meanwhile is not None:  # (nothing is in flight here: the rows are written)
            meanwhile()

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
            with transaction.atomic():
                SqlMessage.objects.filter(conversation_id=conversation_id, seq=seq).update(
                    content="", metadata={}, deleted=True
                )
                SqlEdit.objects.filter(conversation_id=conversation_id, seq=seq).delete()
                SqlReaction.objects.filter(conversation_id=conversation_id, seq=seq).delete()
            return self.get(conversation_id, seq)
        except DatabaseError as exc:
            raise StoreError(str(exc)) from exc

    def reply_counts(self, conversation_id, seqs: Sequence[int]) -> dict[int, int]:
        rows = (
            SqlMessage.objects.filter(conversation_id=conversation_id, reply_to__in=list(seqs))
            .values_list("reply_to")
            .annotate(count=Count("seq"))
        )
        try:
            return dict(rows)
        except DatabaseError as exc:
            raise StoreError(str(exc)) from exc

    def replies(self, conversation_id, seq, *, after_seq, before_seq, limit=50) -> HistoryPage:
        rows = SqlMessage.objects.filter(
            conversation_id=conversation_id, reply_to=seq, seq__gt=after_seq, seq__lt=before_seq
        ).order_by("seq")[: limit + 1]
        try:
            page = list(rows)
        except DatabaseError as exc:
            raise StoreError(str(exc)) from exc
        return HistoryPage(messages=[_to_message(row) for row in page[:limit]], has_more=len(page) > limit)

    def reaction_add(self, conversation_id, seq, emoji, user_id) -> None:
        try:
            with transaction.atomic():  # a savepoint: the caller's transaction survives a duplicate
                SqlReaction.objects.create(conversation_id=conversation_id, seq=seq, emoji=emoji, user_id=user_id)
        except IntegrityError:
            pass  # already there: a reaction is a set member
        except DatabaseError as exc:
            raise StoreError(str(exc)) from exc

    def reaction_remove(self, conversation_id, seq, emoji, user_id) -> None:
        try:
            SqlReaction.objects.filter(conversation_id=conversation_id, seq=seq, emoji=emoji, user_id=user_id).delete()
        except DatabaseError as exc:
            raise StoreError(str(exc)) from exc

    def reactions(self, conversation_id, seqs: Sequence[int], viewer_id) -> dict[int, Reactions]:
        rows = (
            SqlReaction.objects.filter(conversation_id=conversation_id, seq__in=list(seqs))
            .values_list("seq", "emoji")
            .annotate(count=Count("id"), mine=Count("id", filter=Q(user_id=viewer_id)))
            .order_by("seq", "emoji")
        )
        found: dict[int, Reactions] = {}
        try:
            for seq, emoji, count, mine in rows:
                found.setdefault(seq, {})[emoji] = {"count": count, "me": mine > 0}
        except DatabaseError as exc:
            raise StoreError(str(exc)) from exc
        return found

    def record_edit(self, edit: Edit) -> None:
        try:
            SqlEdit.objects.update_or_create(
                conversation_id=edit.conversation_id,
                change=edit.change,
                defaults={
                    "seq": edit.seq,
                    "content": edit.content,
                    "written_at": edit.written_at,
                    "replaced_at": edit.replaced_at,
                },
            )
        except DatabaseError as exc:
            raise StoreError(str(exc)) from exc

    def edits(self, conversation_id, seq, *, before_change, limit=50) -> list[Edit]:
        rows = SqlEdit.objects.filter(conversation_id=conversation_id, seq=seq, change__lt=before_change).order_by(
            "-change"
        )[:limit]
        try:
            return [
                Edit(
                    conversation_id=row.conversation_id,
                    seq=row.seq,
                    change=row.change,
                    content=row.content,
                    written_at=row.written_at,
                    replaced_at=row.replaced_at,
                )
                for row in rows
            ]
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
