"""chat.sql.insert_rows: the hand-written INSERT of every send's append-only rows."""
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from chat import sql
from chat.models import IdempotencyKey, Participant
from notifications.models import OutboxEntry

pytestmark = pytest.mark.django_db


def _record(seq: int, key: str) -> dict:
    return {
        "sender_id": uuid.uuid4(), "key": key, "request_hash": "h" * 64,
        "conversation_id": uuid.uuid4(), "seq": seq, "message_id": uuid.uuid4(),
    }


def test_rows_shared_values_and_defaults_land_as_save_would_write_them(django_assert_num_queries):
    created = timezone.now() - timedelta(hours=1)
    rows = [_record(seq, f"key-{seq}") for seq in (1, 2, 3)]
    with django_assert_num_queries(1):
        sql.insert_rows(IdempotencyKey, rows, created_at=created)
    stored = list(IdempotencyKey.objects.order_by("seq").values(*rows[0], "created_at"))
    assert stored == [{**row, "created_at": created} for row in rows]

    # Fields neither given nor shared take their defaults, once for the statement.
    sql.insert_rows(OutboxEntry, [
        {"message_id": row["message_id"], "conversation_id": row["conversation_id"], "seq": row["seq"], "sender_id": row["sender_id"]}
        for row in rows
    ])
    entries = list(OutboxEntry.objects.order_by("seq"))
    assert [entry.message_id for entry in entries] == [row["message_id"] for row in rows]
    assert {(entry.status, entry.attempts, entry.claimed_by, entry.claimed_until) for entry in entries} == {("pending", 0, "", None)}
    assert len({entry.created_at for entry in entries}) == 1
    assert abs((timezone.now() - entries[0].created_at).total_seconds()) < 5


@pytest.mark.parametrize("rows, shared", [
    ([_record(1, "a")], {"created_at": timezone.now(), "colour": "red"}),  # not a field of the model
    ([_record(1, "a")], {"created_at": timezone.now(), "seq": 9}),  # given by the rows and shared
    ([_record(1, "a"), {**_record(2, "b"), "created_at": timezone.now()}], {}),  # rows that differ in their fields
    ([{key: value for key, value in _record(1, "a").items() if key != "key"}, _record(2, "b")], {"created_at": timezone.now()}),
])
def test_rows_that_do_not_match_the_statement_are_refused_before_anything_is_written(rows, shared):
    with pytest.raises(ValueError):
        sql.insert_rows(IdempotencyKey, rows, **shared)
    assert not IdempotencyKey.objects.exists()


def test_a_field_save_would_stamp_must_be_given():
    with pytest.raises(ValueError, match="joined_at"):
        sql.insert_rows(Participant, [{"conversation": uuid.uuid4(), "user": uuid.uuid4()}])
    assert not Participant.objects.exists()
