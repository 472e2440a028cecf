"""The statements every message send runs, written by hand.

Building and compiling a queryset costs this machine 0.3-0.9 ms of CPU per statement (measured in
docs/performance.md), several times what SQLite or PostgreSQL take to run it; a send runs these on
every message. Everything else uses the ORM. The SQL is portable between SQLite (3.35+, for
RETURNING) and PostgreSQL, names tables and columns from the models, and passes values through the
fields' own database conversion. Each statement's text is built once per database vendor.
"""
from __future__ import annotations

import uuid
from datetime import datetime
from functools import cache

from django.contrib.auth import get_user_model
from django.db import connection, models

from chat.models import Ban, Conversation, IdempotencyKey, Participant


def _table(model) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def _column(model, field: str) -> str:
    return connection.ops.quote_name(model._meta.get_field(field).column)


def _value(model, field: str, value):
    return model._meta.get_field(field).get_db_prep_value(value, connection)


@cache
def _allowed_participation_sql(vendor: str) -> str:
    user = get_user_model()
    p_conversation, p_user = _column(Participant, "conversation"), _column(Participant, "user")
    b_conversation, b_user = _column(Ban, "conversation"), _column(Ban, "user")
    return (
        f"SELECT p.{_column(Participant, 'id')}, c.{_column(Conversation, 'last_seq')}, "
        f"c.{_column(Conversation, 'last_change')} FROM {_table(Participant)} p "
        f"JOIN {_table(user)} u ON u.{_column(user, 'id')} = p.{p_user} "
        f"JOIN {_table(Conversation)} c ON c.{_column(Conversation, 'id')} = p.{p_conversation} "
        f"WHERE p.{p_conversation} = %s AND p.{p_user} = %s AND u.{_column(user, 'is_active')} = %s "
        f"AND NOT EXISTS (SELECT 1 FROM {_table(Ban)} b "
        f"WHERE b.{b_conversation} = p.{p_conversation} AND b.{b_user} = p.{p_user})"
    )


def allowed_participation(user_id: uuid.UUID, conversation_id: uuid.UUID) -> tuple[int, int, int] | None:
    """The membership rule (chat.access) in one statement: (the caller's participation id, the
    conversation's committed last_seq and last_change) when the account is active, a participant
    and not banned from it; None otherwise."""
    user = get_user_model()
    params = [
        _value(Conversation, "id", conversation_id),
        _value(user, "id", user_id),
        _value(user, "is_active", True),
    ]
    with connection.cursor() as cursor:
        cursor.execute(_allowed_participation_sql(connection.vendor), params)
        row = cursor.fetchone()
    return (row[0], row[1], row[2]) if row else None


@cache
def _allocate_seq_sql(vendor: str) -> str:
    last_seq = _column(Conversation, "last_seq")
    return (
        f"UPDATE {_table(Conversation)} SET {last_seq} = {last_seq} + 1, "
        f"{_column(Conversation, 'last_activity_at')} = %s WHERE {_column(Conversation, 'id')} = %s "
        f"RETURNING {last_seq}"
    )


def allocate_seq(conversation_id: uuid.UUID, now: datetime) -> int:
    """Take the conversation's next seq (the caller's transaction holds it until commit)."""
    params = [_value(Conversation, "last_activity_at", now), _value(Conversation, "id", conversation_id)]
    with connection.cursor() as cursor:
        cursor.execute(_allocate_seq_sql(connection.vendor), params)
        return cursor.fetchone()[0]


@cache
def _advance_read_marker_sql(vendor: str) -> str:
    last_read_seq = _column(Participant, "last_read_seq")
    return (
        f"UPDATE {_table(Participant)} SET {last_read_seq} = %s "
        f"WHERE {_column(Participant, 'id')} = %s AND {last_read_seq} < %s"
    )


def advance_read_marker(participant_id: int, seq: int) -> None:
    """Move a read marker forward to `seq`; never backwards."""
    with connection.cursor() as cursor:
        cursor.execute(_advance_read_marker_sql(connection.vendor), [seq, participant_id, seq])


def insert_row(instance: models.Model) -> None:
    """INSERT one new row for a model instance whose primary key the database assigns, as save()
    would write it (field defaults and conversions included), without the compiler. No signals
    are sent and the instance does not learn its id: for the append-only rows of every send (the
    notification outbox entry, the idempotency record)."""
    fields, sql = _insert_sql(type(instance), connection.vendor)
    params = [field.get_db_prep_save(field.pre_save(instance, True), connection) for field in fields]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


@cache
def _insert_sql(model: type[models.Model], vendor: str) -> tuple[list, str]:
    fields = [field for field in model._meta.concrete_fields if not field.primary_key]
    columns = ", ".join(connection.ops.quote_name(field.column) for field in fields)
    return fields, f"INSERT INTO {_table(model)} ({columns}) VALUES ({', '.join(['%s'] * len(fields))})"


@cache
def _idempotency_record_id_sql(vendor: str) -> str:
    return (
        f"SELECT {_column(IdempotencyKey, 'id')} FROM {_table(IdempotencyKey)} "
        f"WHERE {_column(IdempotencyKey, 'sender_id')} = %s AND {_column(IdempotencyKey, 'key')} = %s"
    )


def idempotency_record_id(sender_id: uuid.UUID, key: str) -> int | None:
    """The id of the sender's idempotency record for `key`, or None: every keyed send asks, and
    almost always hears None (a retry is what finds one, and then reads it with the ORM)."""
    params = [_value(IdempotencyKey, "sender_id", sender_id), _value(IdempotencyKey, "key", key)]
    with connection.cursor() as cursor:
        cursor.execute(_idempotency_record_id_sql(connection.vendor), params)
        row = cursor.fetchone()
    return row[0] if row else None


@cache
def _allocate_change_sql(vendor: str) -> str:
    last_change = _column(Conversation, "last_change")
    return (
        f"UPDATE {_table(Conversation)} SET {last_change} = {last_change} + 1 "
        f"WHERE {_column(Conversation, 'id')} = %s RETURNING {last_change}"
    )


def allocate_change(conversation_id: uuid.UUID) -> int:
    """Take the conversation's next change number, as allocate_seq takes a seq: the caller's
    transaction holds the conversation's row until commit, so changes are written in their order."""
    with connection.cursor() as cursor:
        cursor.execute(_allocate_change_sql(connection.vendor), [_value(Conversation, "id", conversation_id)])
        return cursor.fetchone()[0]
