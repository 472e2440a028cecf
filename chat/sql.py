"""The statements every message send runs, and every page of messages read, written by hand.

Building and compiling a queryset costs this machine 0.3-0.9 ms of CPU per statement (measured in
docs/performance.md), several times what SQLite or PostgreSQL take to run it; a send runs these on
every message, and a history page, replay or gap fill asks which of its messages carry attachments. Everything else uses the ORM. The SQL is portable between SQLite (3.35+, for
RETURNING) and PostgreSQL, names tables and columns from the models, and passes values through the
fields' own database conversion. Each statement's text is built once per database vendor and, for
a batch, per shape (its numbers of rows or distinct values; the 256 most recent shapes of each
statement are kept: a batch holds at most chat.services.send.MAX_BATCH sends).
"""
from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from datetime import datetime
from functools import cache, lru_cache

from django.contrib.auth import get_user_model
from django.db import connection, models

from chat.models import Attachment, Ban, Conversation, IdempotencyKey, Participant


def _table(model) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def _column(model, field: str) -> str:
    return connection.ops.quote_name(model._meta.get_field(field).column)


def _value(model, field: str, value):
    return model._meta.get_field(field).get_db_prep_value(value, connection)


def _uuid(value) -> uuid.UUID:
    """A UUID column's value as the database returns it (PostgreSQL: a UUID; SQLite: hex text)."""
    return value if isinstance(value, uuid.UUID) else uuid.UUID(value)


def _placeholders(count: int) -> str:
    return ", ".join(["%s"] * count)


@lru_cache(maxsize=256)
def _allowed_participations_sql(vendor: str, conversations: int, users: int) -> str:
    user = get_user_model()
    p_conversation, p_user = _column(Participant, "conversation"), _column(Participant, "user")
    b_conversation, b_user = _column(Ban, "conversation"), _column(Ban, "user")
    return (
        f"SELECT p.{p_user}, p.{p_conversation}, p.{_column(Participant, 'id')}, "
        f"c.{_column(Conversation, 'last_seq')}, c.{_column(Conversation, 'last_change')} "
        f"FROM {_table(Participant)} p "
        f"JOIN {_table(user)} u ON u.{_column(user, 'id')} = p.{p_user} "
        f"JOIN {_table(Conversation)} c ON c.{_column(Conversation, 'id')} = p.{p_conversation} "
        f"WHERE p.{p_conversation} IN ({_placeholders(conversations)}) AND p.{p_user} IN ({_placeholders(users)}) "
        f"AND u.{_column(user, 'is_active')} = %s "
        f"AND NOT EXISTS (SELECT 1 FROM {_table(Ban)} b "
        f"WHERE b.{b_conversation} = p.{p_conversation} AND b.{b_user} = p.{p_user})"
    )


def allowed_participations(
    pairs: Collection[tuple[uuid.UUID, uuid.UUID]],
) -> dict[tuple[uuid.UUID, uuid.UUID], tuple[int, int, int]]:
    """The membership rule (chat.access) in one statement for many (user id, conversation id)
    pairs: for each pair whose account is active, a participant and not banned from the
    conversation, (the participation id, the conversation's committed last_seq and last_change).
    Pairs the rule refuses are absent. (The statement asks for every user in every conversation
    named and keeps the pairs asked for: a batch's senders are few.)"""
    if not pairs:
        return {}
    user = get_user_model()
    conversations = {conversation_id for _, conversation_id in pairs}
    users = {user_id for user_id, _ in pairs}
    params = [
        *(_value(Conversation, "id", conversation_id) for conversation_id in conversations),
        *(_value(user, "id", user_id) for user_id in users),
        _value(user, "is_active", True),
    ]
    with connection.cursor() as cursor:
        cursor.execute(_allowed_participations_sql(connection.vendor, len(conversations), len(users)), params)
        rows = cursor.fetchall()
    wanted = set(pairs)
    found = {}
    for user_id, conversation_id, participant_id, last_seq, last_change in rows:
        pair = (_uuid(user_id), _uuid(conversation_id))
        if pair in wanted:
            found[pair] = (participant_id, last_seq, last_change)
    return found


@lru_cache(maxsize=256)
def _allocate_seqs_sql(vendor: str, conversations: int, in_order: bool) -> str:
    table, conversation_id = _table(Conversation), _column(Conversation, "id")
    last_seq, activity = _column(Conversation, "last_seq"), _column(Conversation, "last_activity_at")
    # (Qualified where the statement joins its own rows: `locked` below has an id column too.)
    this = f"{table}." if in_order else ""
    # (CAST: PostgreSQL cannot tell a bare parameter's type inside CASE.)
    taken = f"CASE {this}{conversation_id} " + " ".join(["WHEN %s THEN CAST(%s AS BIGINT)"] * conversations) + " END"
    # A row that takes no seq (it is only locked) keeps its activity time.
    assignments = (
        f"SET {last_seq} = {this}{last_seq} + {taken}, "
        f"{activity} = CASE WHEN {taken} > 0 THEN %s ELSE {this}{activity} END"
    )
    returning = f"RETURNING {this}{conversation_id}, {this}{last_seq}"
    if in_order:
        # Locked first, lowest id first, as every batch of every process locks its rows: two
        # batches taking two rows in opposite orders would deadlock. FOR NO KEY UPDATE is the
        # lock an UPDATE takes (it lets foreign-key checks of new participants through).
        return (
            f"WITH locked AS (SELECT {conversation_id} FROM {table} WHERE {conversation_id} IN "
            f"({_placeholders(conversations)}) ORDER BY {conversation_id} FOR NO KEY UPDATE) "
            f"UPDATE {table} {assignments} FROM locked WHERE {this}{conversation_id} = locked.{conversation_id} {returning}"
        )
    return f"UPDATE {table} {assignments} WHERE {conversation_id} IN ({_placeholders(conversations)}) {returning}"


def allocate_seqs(counts: dict[uuid.UUID, int], now: datetime) -> dict[uuid.UUID, int]:
    """Take the next seqs of several conversations in one statement, conversation id -> how many;
    conversation id -> the last seq taken. The caller's transaction holds the rows until commit.
    On PostgreSQL a statement of several rows locks them in id order, those with a count of 0
    included (they take no seq); elsewhere a count of 0 is left out."""
    in_order = connection.vendor == "postgresql" and len(counts) > 1
    if not in_order:
        counts = {conversation_id: count for conversation_id, count in counts.items() if count}
        if not counts:
            return {}
    ids = [_value(Conversation, "id", conversation_id) for conversation_id in counts]
    taken = [value for db_id, count in zip(ids, counts.values()) for value in (db_id, count)]
    at = _value(Conversation, "last_activity_at", now)
    params = [*ids, *taken, *taken, at] if in_order else [*taken, *taken, at, *ids]
    with connection.cursor() as cursor:
        cursor.execute(_allocate_seqs_sql(connection.vendor, len(counts), in_order), params)
        rows = cursor.fetchall()
    return {_uuid(conversation_id): last_seq for conversation_id, last_seq in rows}


def advance_read_markers(seqs: dict[int, int]) -> None:
    """Move read markers forward, participation id -> seq, in one statement; never backwards."""
    if not seqs:
        return
    pairs = [value for participant_id, seq in seqs.items() for value in (participant_id, seq)]
    with connection.cursor() as cursor:
        cursor.execute(_advance_read_markers_sql(connection.vendor, len(seqs)), [*pairs, *seqs, *pairs])


@lru_cache(maxsize=256)
def _advance_read_markers_sql(vendor: str, count: int) -> str:
    last_read_seq = _column(Participant, "last_read_seq")
    # (CAST: PostgreSQL cannot tell a bare parameter's type inside CASE.)
    new_seq = "CASE " + _column(Participant, "id") + " " + " ".join(["WHEN %s THEN CAST(%s AS BIGINT)"] * count) + " END"
    return (
        f"UPDATE {_table(Participant)} SET {last_read_seq} = {new_seq} "
        f"WHERE {_column(Participant, 'id')} IN ({_placeholders(count)}) AND {last_read_seq} < {new_seq}"
    )


def insert_rows(model: type[models.Model], rows: Sequence[dict[str, object]], **shared) -> None:
    """INSERT new rows of `model` (whose primary key the database assigns) in one statement, as
    save() would write them, without the compiler and without a model instance per row: each row
    gives the values that differ between rows (by field name, the same names in every row),
    `shared` those every row has, and every other field takes its default. Values pass through
    their fields' own database conversion; shared values and defaults once per statement, since
    these statements run inside every send's hold of the database's writer. No signals are sent.
    For the append-only rows of every send (the notification outbox entries, the idempotency
    records)."""
    if not rows:
        return
    varying, constant, sql = _insert_rows_sql(model, connection.vendor, tuple(rows[0]), tuple(shared), len(rows))
    constant_values = [
        field.get_db_prep_save(shared[field.name] if field.name in shared else field.get_default(), connection)
        for field in constant
    ]
    names = rows[0].keys()
    params = []
    for row in rows:
        if row.keys() != names:
            raise ValueError(f"every row of one statement gives the same fields: {sorted(row)} against {sorted(names)}")
        params += [field.get_db_prep_save(row[field.name], connection) for field in varying]
        params += constant_values
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


@lru_cache(maxsize=256)
def _insert_rows_sql(
    model: type[models.Model], vendor: str, varying: tuple[str, ...], shared: tuple[str, ...], count: int
) -> tuple[list, list, str]:
    by_row = [model._meta.get_field(name) for name in varying]
    once = [field for field in model._meta.concrete_fields if not field.primary_key and field.name not in varying]
    unknown = set(shared) - {field.name for field in once}
    if unknown or any(field.primary_key for field in by_row):
        raise ValueError(f"not a row's field of {model.__name__}, or given twice: {sorted(unknown) or varying}")
    # A default is all this fills in; save() would also stamp these, so they must be given.
    stamped = [field.name for field in once if field.name not in shared and (getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False))]
    if stamped:
        raise ValueError(f"{model.__name__}: give {stamped} (save() stamps them; insert_rows does not)")
    fields = by_row + once
    columns = ", ".join(connection.ops.quote_name(field.column) for field in fields)
    row = f"({_placeholders(len(fields))})"
    return by_row, once, f"INSERT INTO {_table(model)} ({columns}) VALUES {', '.join([row] * count)}"


def idempotency_record_ids(pairs: Collection[tuple[uuid.UUID, str]]) -> dict[tuple[uuid.UUID, str], int]:
    """The ids of the senders' idempotency records for these (sender id, key) pairs, in one
    statement: every keyed send asks, and almost always hears nothing (a retry is what finds one,
    and then reads it with the ORM)."""
    if not pairs:
        return {}
    senders = {sender_id for sender_id, _ in pairs}
    keys = {key for _, key in pairs}
    params = [
        *(_value(IdempotencyKey, "sender_id", sender_id) for sender_id in senders),
        *(_value(IdempotencyKey, "key", key) for key in keys),
    ]
    with connection.cursor() as cursor:
        cursor.execute(_idempotency_record_ids_sql(connection.vendor, len(senders), len(keys)), params)
        rows = cursor.fetchall()
    wanted = set(pairs)
    return {
        (_uuid(sender_id), key): record_id for record_id, sender_id, key in rows if (_uuid(sender_id), key) in wanted
    }


@lru_cache(maxsize=256)
def _idempotency_record_ids_sql(vendor: str, senders: int, keys: int) -> str:
    return (
        f"SELECT {_column(IdempotencyKey, 'id')}, {_column(IdempotencyKey, 'sender_id')}, {_column(IdempotencyKey, 'key')} "
        f"FROM {_table(IdempotencyKey)} WHERE {_column(IdempotencyKey, 'sender_id')} IN ({_placeholders(senders)}) "
        f"AND {_column(IdempotencyKey, 'key')} IN ({_placeholders(keys)})"
    )


@cache
def _allocate_change_sql(vendor: str) -> str:
    last_change = _column(Conversation, "last_change")
    return (
        f"UPDATE {_table(Conversation)} SET {last_change} = {last_change} + 1 "
        f"WHERE {_column(Conversation, 'id')} = %s RETURNING {last_change}"
    )


def allocate_change(conversation_id: uuid.UUID) -> int:
    """Take the conversation's next change number, as allocate_seqs takes seqs: the caller's
    transaction holds the conversation's row until commit, so changes are written in their order."""
    with connection.cursor() as cursor:
        cursor.execute(_allocate_change_sql(connection.vendor), [_value(Conversation, "id", conversation_id)])
        return cursor.fetchone()[0]


def messages_with_attachments(message_ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
    """Which of these messages carry attachments, in one statement: every page of messages asks
    (history, replay, gap fill), and almost always hears none; the descriptors of those that do
    are then read with the ORM (chat.selectors.with_attachments)."""
    if not message_ids:
        return set()
    params = [
        *(_value(Attachment, "message_id", message_id) for message_id in message_ids),
        _value(Attachment, "state", Attachment.State.ATTACHED),
    ]
    with connection.cursor() as cursor:
        cursor.execute(_messages_with_attachments_sql(connection.vendor, len(message_ids)), params)
        return {_uuid(message_id) for (message_id,) in cursor.fetchall()}


@lru_cache(maxsize=256)
def _messages_with_attachments_sql(vendor: str, count: int) -> str:
    message_id = _column(Attachment, "message_id")
    return (
        f"SELECT DISTINCT {message_id} FROM {_table(Attachment)} "
        f"WHERE {message_id} IN ({_placeholders(count)}) AND {_column(Attachment, 'state')} = %s"
    )
