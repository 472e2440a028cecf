"""The `sql` message store: the relational database through the ORM. Same contract as Cassandra."""
from __future__ import annotations

import uuid
from datetime import timedelta

from django.db import DatabaseError, IntegrityError, transaction
from django.utils import timezone

from chat.models import SqlIdempotencyKey, SqlMessage
from chat.store import (
    IDEMPOTENCY_CLAIM_LEASE_SECONDS,
    HistoryPage,
    IdempotencyRecord,
    Message,
    MessageStore,
    StoreError,
)


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


def _to_record(row: SqlIdempotencyKey) -> IdempotencyRecord:
    return IdempotencyRecord(request_hash=row.request_hash, message_id=row.message_id, completed=row.completed)


class SqlMessageStore(MessageStore):
    def insert(self, message: Message, *, idempotency_key: str | None = None) -> None:
        try:
            with transaction.atomic():
                SqlMessage.objects.create(
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
                if idempotency_key is not None:
                    # Only our own claim: one a retry took over after our lease ran out is not ours
                    # to complete (the same condition as Cassandra's IF message_id = ?).
                    SqlIdempotencyKey.objects.filter(
                        sender_id=message.sender_id, key=idempotency_key, message_id=message.message_id
                    ).update(completed=True)
        except DatabaseError as exc:
            raise StoreError(str(exc)) from exc

    def get(self, conversation_id: uuid.UUID, seq: int) -> Message | None:
        row = SqlMessage.objects.filter(conversation_id=conversation_id, seq=seq).first()
        return _to_message(row) if row else None

    def get_by_id(self, message_id: uuid.UUID) -> Message | None:
        row = SqlMessage.objects.filter(message_id=message_id).first()
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

    def claim_idempotency(self, *, sender_id, key, request_hash, message_id) -> IdempotencyRecord | None:
        now = timezone.now()
        try:
            with transaction.atomic():
                SqlIdempotencyKey.objects.create(
                    sender_id=sender_id, key=key, request_hash=request_hash, message_id=message_id, created_at=now
                )
            return None
        except IntegrityError:
            pass
        except DatabaseError as exc:
            raise StoreError(str(exc)) from exc
        existing = SqlIdempotencyKey.objects.filter(sender_id=sender_id, key=key).first()
        if existing is None:  # released between our insert and this read: the key is free again
            return self.claim_idempotency(sender_id=sender_id, key=key, request_hash=request_hash, message_id=message_id)
        if existing.completed:
            return _to_record(existing)
        if self.get_by_id(existing.message_id) is not None:
            # The earlier request persisted its message and died before completing the claim.
            SqlIdempotencyKey.objects.filter(pk=existing.pk).update(completed=True)
            return IdempotencyRecord(existing.request_hash, existing.message_id, completed=True)
        if existing.created_at > now - timedelta(seconds=IDEMPOTENCY_CLAIM_LEASE_SECONDS):
            return _to_record(existing)  # in flight
        # Take over the stale claim; the conditional update makes concurrent retries race fairly.
        taken = SqlIdempotencyKey.objects.filter(pk=existing.pk, created_at=existing.created_at, completed=False).update(
            request_hash=request_hash, message_id=message_id, created_at=now
        )
        if taken:
            return None
        return _to_record(SqlIdempotencyKey.objects.get(pk=existing.pk))

    def release_idempotency(self, *, sender_id, key, message_id) -> None:
        try:
            SqlIdempotencyKey.objects.filter(sender_id=sender_id, key=key, message_id=message_id, completed=False).delete()
        except DatabaseError:
            pass  # The claim then expires by its lease.
