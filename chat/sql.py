"""The statements every message send runs, written by hand.

Building and compiling a queryset costs this machine 0.3-0.9 ms of CPU per statement (measured in
docs/performance.md), several times what SQLite or PostgreSQL take to run it; a send runs these on
every message. Everything else uses the ORM. The SQL is portable between SQLite (3.35+, for
RETURNING) and PostgreSQL, names tables and columns from the models, and passes values through the
fields' own database conversion.
"""
from __future__ import annotations

import uuid
from datetime import datetime

from django.contrib.auth import get_user_model
from django.db import connection, models

from chat.models import Ban, Conversation, Participant


def _table(model) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def _column(model, field: str) -> str:
    return connection.ops.quote_name(model._meta.get_field(field).column)


def _value(model, field: str, value):
    return model._meta.get_field(field).get_db_prep_value(value, connection)


def allowed_participant_id(user_id: uuid.UUID, conversation_id: uuid.UUID) -> int | None:
    """The membership rule (chat.access) in one statement: the caller's participation in the
    conversation, when the account is active and not banned from it; None otherwise."""
    user = get_user_model()
    p_conversation, p_user = _column(Participant, "conversation"), _column(Participant, "user")
    b_conversation, b_user = _column(Ban, "conversation"), _column(Ban, "user")
    sql = (
        f"SELECT p.{_column(Participant, 'id')} FROM {_table(Participant)} p "
        f"JOIN {_table(user)} u ON u.{_column(user, 'id')} = p.{p_user} "
        f"WHERE p.{p_conversation} = %s AND p.{p_user} = %s AND u.{_column(user, 'is_active')} = %s "
        f"AND NOT EXISTS (SELECT 1 FROM {_table(Ban)} b "
        f"WHERE b.{b_conversation} = p.{p_conversation} AND b.{b_user} = p.{p_user})"
    )
    params = [
        _value(Conversation, "id", conversation_id),
        _value(user, "id", user_id),
        _value(user, "is_active", True),
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return row[0] if row else None


def allocate_seq(conversation_id: uuid.UUID, now: datetime) -> int:
    """Take the conversation's next seq (the caller's transaction holds it until commit)."""
    last_seq = _column(Conversation, "last_seq")
    sql = (
        f"UPDATE {_table(Conversation)} SET {last_seq} = {last_seq} + 1, "
        f"{_column(Conversation, 'last_activity_at')} = %s WHERE {_column(Conversation, 'id')} = %s "
        f"RETURNING {last_seq}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [_value(Conversation, "last_activity_at", now), _value(Conversation, "id", conversation_id)])
        return cursor.fetchone()[0]


def advance_read_marker(participant_id: int, seq: int) -> None:
    """Move a read marker forward to `seq`; never backwards."""
    last_read_seq = _column(Participant, "last_read_seq")
    sql = (
        f"UPDATE {_table(Participant)} SET {last_read_seq} = %s "
        f"WHERE {_column(Participant, 'id')} = %s AND {last_read_seq} < %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [seq, participant_id, seq])


def insert_row(instance: models.Model) -> None:
    """INSERT one new row for a model instance whose primary key the database assigns, as save()
    would write it (field defaults and conversions included), without the compiler. No signals
    are sent and the instance does not learn its id: for append-only rows nobody reads back here
    (the notification outbox entry of each message)."""
    meta = instance._meta
    fields = [field for field in meta.concrete_fields if not field.primary_key]
    sql = (
        f"INSERT INTO {_table(type(instance))} ({', '.join(connection.ops.quote_name(f.column) for f in fields)}) "
        f"VALUES ({', '.join(['%s'] * len(fields))})"
    )
    params = [field.get_db_prep_save(field.pre_save(instance, True), connection) for field in fields]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
