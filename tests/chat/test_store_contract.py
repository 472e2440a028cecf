"""The MessageStore contract, one suite run against both backends with identical expectations.

`sql` runs on the ORM test database; `cassandra` on the real server (skipped locally without it,
failing in CI) in a keyspace created for this session and dropped after it. Cassandra tests use
fresh conversation and sender ids instead of truncating tables between tests (TRUNCATE is slow).
Buckets of 10 messages make 35 messages cross every kind of bucket boundary.
"""
from __future__ import annotations

import dataclasses
import itertools
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from chat.store import Change, Message, MessageStore

pytestmark = pytest.mark.django_db

BUCKET_SIZE = 10


def _ms(value: datetime) -> datetime:
    # Cassandra timestamps have millisecond precision: the contract promises no more.
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


@pytest.fixture(params=["sql", "cassandra"])
def store(request) -> MessageStore:
    if request.param == "sql":
        from chat.store.sql import SqlMessageStore

        return SqlMessageStore()
    from chat.store.cassandra import CassandraMessageStore

    return CassandraMessageStore(connection=request.getfixturevalue("cassandra_connection"), bucket_size=BUCKET_SIZE)


_sent = itertools.count()


def make_message(conversation_id: uuid.UUID, seq: int, **fields) -> Message:
    values = {
        "message_id": uuid.uuid4(),
        "conversation_id": conversation_id,
        "seq": seq,
        "sender_id": uuid.uuid4(),
        "content": f"message {seq}",
        "message_type": "text",
        "is_encrypted": False,
        "metadata": {},
        "sent_at": _ms(datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=next(_sent))),
    }
    return Message(**(values | fields))


def fill(store: MessageStore, seqs) -> uuid.UUID:
    conversation_id = uuid.uuid4()
    for seq in seqs:
        store.insert(make_message(conversation_id, seq))
    return conversation_id


def seqs_of(page) -> list[int]:
    return [message.seq for message in page.messages]


def expected_page(seqs: list[int], after_seq: int | None, before_seq: int | None, limit: int) -> tuple[list[int], bool]:
    """The history contract spelled out on a list: ascending pages, the oldest `limit` after
    after_seq, else the newest `limit` below before_seq; has_more = more in the paged direction."""
    between = [s for s in sorted(seqs) if (after_seq is None or s > after_seq) and (before_seq is None or s < before_seq)]
    if after_seq is not None:
        return between[:limit], len(between) > limit
    return between[max(len(between) - limit, 0):], len(between) > limit


# --- messages ------------------------------------------------------------------------------------


def test_insert_then_get_return_every_field_unchanged(store):
    conversation_id = uuid.uuid4()
    message = make_message(
        conversation_id,
        1,
        content="héllo wörld — 你好 🙂\n\"quoted\" \\ tab\t",
        message_type="image",
        is_encrypted=True,
        metadata={"name": "café.png", "size": 12345, "dims": [640, 480], "nested": {"ok": True, "none": None}},
        sent_at=datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=timezone.utc),
    )
    edited = make_message(conversation_id, 2, edited_at=datetime(2026, 3, 4, 6, 0, 0, 123000, tzinfo=timezone.utc))
    store.insert(message)
    store.insert(edited)

    assert store.get(conversation_id, 1) == message
    assert store.get(conversation_id, 2) == edited
    assert store.get(conversation_id, 1).sent_at.utcoffset() == timedelta(0)


def test_the_largest_message_the_api_accepts_round_trips(store):
    """10 MiB of media content and 16 KiB of metadata: the limits of SPEC section 4."""
    conversation_id = uuid.uuid4()
    message = make_message(
        conversation_id, 1, content="m" * (10 * 1024 * 1024), message_type="video", metadata={"k": "v" * (16 * 1024 - 8)}
    )
    store.insert(message)
    assert store.get(conversation_id, 1) == message


def test_unknown_ids_return_none(store):
    conversation_id = fill(store, [1])
    assert store.get(conversation_id, 2) is None
    assert store.get(uuid.uuid4(), 1) is None


def test_history_is_ascending_and_per_conversation(store):
    first = uuid.uuid4()
    second = uuid.uuid4()
    for seq in (3, 1, 2):
        store.insert(make_message(first, seq))
        store.insert(make_message(second, seq + 10))
    assert seqs_of(store.history(first)) == [1, 2, 3]
    assert seqs_of(store.history(second)) == [11, 12, 13]
    assert seqs_of(store.history(uuid.uuid4())) == []


def test_one_insert_of_several_messages_writes_every_one(store):
    # A group commit's writes: two conversations, crossing bucket boundaries (new buckets' markers
    # written with them), in one call.
    first, second = uuid.uuid4(), uuid.uuid4()
    messages = [make_message(first, seq) for seq in range(1, 24)] + [make_message(second, seq) for seq in (9, 10, 11)]
    store.insert(*messages)
    assert store.history(first, limit=100).messages == messages[:23]
    assert seqs_of(store.history(first, limit=5)) == [19, 20, 21, 22, 23]
    assert seqs_of(store.history(second)) == [9, 10, 11]


@pytest.mark.parametrize("count", [9, 10, 11, 20, 21, 30])
@pytest.mark.parametrize("limit", [1, 9, 10, 11, 30, 31])
def test_newest_page_at_bucket_boundaries(store, count, limit):
    conversation_id = fill(store, range(1, count + 1))
    page = store.history(conversation_id, limit=limit)
    assert (seqs_of(page), page.has_more) == expected_page(list(range(1, count + 1)), None, None, limit)


_CURSORS = [None, -1, 0, 1, 9, 10, 11, 19, 20, 21, 29, 30, 31, 35, 36, 100]


@pytest.mark.parametrize("limit", [1, 10, 11, 200])
def test_every_cursor_pair_pages_exactly(store, limit):
    """35 messages (buckets 0-3 of 10): forward, backward, newest and bounded-both-ways pages,
    with cursors on, before and after each bucket boundary."""
    seqs = list(range(1, 36))
    conversation_id = fill(store, seqs)
    for after_seq, before_seq in itertools.product(_CURSORS, _CURSORS):
        page = store.history(conversation_id, after_seq=after_seq, before_seq=before_seq, limit=limit)
        assert (seqs_of(page), page.has_more) == expected_page(seqs, after_seq, before_seq, limit), (
            after_seq,
            before_seq,
        )


def test_paging_backward_then_forward_visits_every_message_once(store):
    conversation_id = fill(store, range(1, 36))
    page = store.history(conversation_id, limit=7)
    seen = seqs_of(page)
    while page.has_more:
        page = store.history(conversation_id, before_seq=seen[0], limit=7)
        seen = seqs_of(page) + seen
    assert seen == list(range(1, 36))

    page = store.history(conversation_id, after_seq=0, limit=8)
    forward = seqs_of(page)
    while page.has_more:
        page = store.history(conversation_id, after_seq=forward[-1], limit=8)
        forward += seqs_of(page)
    assert forward == list(range(1, 36))


def test_history_skips_empty_buckets(store):
    # Seqs 1-3, then 47-48: buckets 1 to 3 hold nothing.
    seqs = [1, 2, 3, 47, 48]
    conversation_id = fill(store, seqs)
    for after_seq, before_seq, limit in [(None, None, 3), (None, 47, 2), (3, None, 1), (0, None, 10), (2, 48, 5)]:
        page = store.history(conversation_id, after_seq=after_seq, before_seq=before_seq, limit=limit)
        assert (seqs_of(page), page.has_more) == expected_page(seqs, after_seq, before_seq, limit)


def test_limit_bounds(store):
    conversation_id = fill(store, range(1, 13))
    one = store.history(conversation_id, limit=1)
    assert (seqs_of(one), one.has_more) == ([12], True)
    exact = store.history(conversation_id, limit=12)
    assert (seqs_of(exact), exact.has_more) == (list(range(1, 13)), False)
    beyond = store.history(conversation_id, after_seq=0, limit=1000)
    assert (seqs_of(beyond), beyond.has_more) == (list(range(1, 13)), False)
    default = store.history(fill(store, range(1, 53)))
    assert (seqs_of(default), default.has_more) == (list(range(3, 53)), True)


# --- edit and tombstone ---------------------------------------------------------------------------


def test_edit_replaces_content_and_stamps_edited_at(store):
    conversation_id = uuid.uuid4()
    original = make_message(conversation_id, 11, metadata={"k": "v"})
    store.insert(original)
    edited_at = datetime(2026, 5, 6, 7, 8, 9, 10000, tzinfo=timezone.utc)

    edited = store.edit(conversation_id, 11, "fixed typo ✓", edited_at)

    expected = dataclasses.replace(original, content="fixed typo ✓", edited_at=edited_at)
    assert edited == expected
    assert store.get(conversation_id, 11) == expected
    assert store.history(conversation_id).messages == [expected]


def test_tombstone_removes_content_and_keeps_the_place(store):
    conversation_id = fill(store, [10, 12])
    original = make_message(conversation_id, 11, message_type="file", metadata={"name": "secret.pdf"})
    store.insert(original)

    tombstone = store.tombstone(conversation_id, 11)

    assert tombstone.deleted is True
    assert (tombstone.content, tombstone.metadata) == ("", {})
    assert (tombstone.message_id, tombstone.seq, tombstone.sender_id, tombstone.sent_at) == (
        original.message_id,
        11,
        original.sender_id,
        original.sent_at,
    )
    assert store.get(conversation_id, 11) == tombstone
    assert store.history(conversation_id).messages[1] == tombstone
    assert seqs_of(store.history(conversation_id)) == [10, 11, 12]
    assert store.tombstone(conversation_id, 11) == tombstone


def test_edit_leaves_a_tombstone_unchanged(store):
    conversation_id = fill(store, [1])
    tombstone = store.tombstone(conversation_id, 1)
    assert store.edit(conversation_id, 1, "back from the dead", datetime(2026, 1, 2, tzinfo=timezone.utc)) == tombstone
    assert store.get(conversation_id, 1) == tombstone


def test_edit_and_tombstone_of_unknown_messages_return_none_and_create_nothing(store):
    conversation_id = fill(store, [1])
    assert store.edit(conversation_id, 2, "x", datetime(2026, 1, 2, tzinfo=timezone.utc)) is None
    assert store.tombstone(conversation_id, 3) is None
    assert store.tombstone(uuid.uuid4(), 1) is None
    assert store.get(conversation_id, 2) is None
    assert store.get(conversation_id, 3) is None
    assert seqs_of(store.history(conversation_id)) == [1]


# --- the change log -------------------------------------------------------------------------------


def make_change(conversation_id: uuid.UUID, change: int, **fields) -> Change:
    values = {
        "conversation_id": conversation_id,
        "change": change,
        "kind": "updated",
        "seq": change * 2,
        "at": _ms(datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=next(_sent))),
    }
    return Change(**(values | fields))


def test_changes_round_trip_every_field_in_ascending_order_per_conversation(store):
    conversation_id, other = uuid.uuid4(), uuid.uuid4()
    written = [
        make_change(conversation_id, 1, kind="updated"),
        make_change(conversation_id, 2, kind="deleted"),
        make_change(conversation_id, 3, kind="reaction.added", data={"emoji": "👍", "user_id": str(uuid.uuid4())}),
    ]
    for change in reversed(written):
        store.record_change(change)
    elsewhere = make_change(other, 1)
    store.record_change(elsewhere)

    assert store.changes(conversation_id, after_change=0, before_change=10) == written
    assert store.changes(other, after_change=0, before_change=10) == [elsewhere]
    assert store.changes(uuid.uuid4(), after_change=0, before_change=10) == []


@pytest.mark.parametrize("limit", [1, 7, 50])
def test_every_change_cursor_pair_pages_exactly_across_buckets(store, limit):
    conversation_id = uuid.uuid4()
    for number in range(1, 36):  # buckets of 10: crosses every kind of boundary
        store.record_change(make_change(conversation_id, number))
    for after, before in [(0, 36), (9, 11), (10, 21), (19, 40), (35, 36), (0, 1), (5, 6), (34, 100)]:
        expected = [n for n in range(1, 36) if after < n < before][:limit]
        got = [change.change for change in store.changes(conversation_id, after_change=after, before_change=before, limit=limit)]
        assert got == expected, (after, before, limit)


def test_a_change_recorded_again_at_its_number_replaces_the_uncommitted_one(store):
    # A change whose relational transaction rolled back left its entry; the next change takes the
    # same number (no reader reads past the committed last_change) and must win.
    conversation_id = uuid.uuid4()
    store.record_change(make_change(conversation_id, 1, kind="updated", seq=4))
    replacement = make_change(conversation_id, 1, kind="deleted", seq=9)
    store.record_change(replacement)
    assert store.changes(conversation_id, after_change=0, before_change=2) == [replacement]


# --- where the backends differ ---------------------------------------------------------------------


def test_cassandra_seq_reused_after_a_rolled_back_send_belongs_to_the_new_message(cassandra_connection):
    """A send whose relational transaction rolls back after the Cassandra insert leaves its row,
    and the next send reuses the seq (SQL rolls both back together, so it never sees this). The
    new message overwrites the row (readers that hold the old id, such as an idempotency record of
    the rolled-back send, never exist: the record rolled back with it)."""
    from chat.store.cassandra import CassandraMessageStore

    store = CassandraMessageStore(connection=cassandra_connection, bucket_size=BUCKET_SIZE)
    conversation_id = uuid.uuid4()
    rolled_back, sent = make_message(conversation_id, 5), make_message(conversation_id, 5, content="the real 5")
    store.insert(rolled_back)
    store.insert(sent)
    assert store.get(conversation_id, 5) == sent
