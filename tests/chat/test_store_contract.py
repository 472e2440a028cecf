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

from chat.store import Change, Edit, Message, MessageStore

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


def test_insert_runs_meanwhile_once_and_an_exception_from_it_propagates(store):
    conversation_id = uuid.uuid4()
    ran = []
    store.insert(make_message(conversation_id, 1), make_message(conversation_id, 2), meanwhile=lambda: ran.append(1))
    assert ran == [1]
    assert [m.seq for m in store.history(conversation_id).messages] == [1, 2]

    def fails():
        raise RuntimeError("the caller's own work failed")

    with pytest.raises(RuntimeError):
        store.insert(make_message(conversation_id, 3), meanwhile=fails)


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


# --- replies -------------------------------------------------------------------------------------


def test_reply_to_round_trips_and_threads_page_ascending_across_buckets(store):
    conversation_id = uuid.uuid4()
    store.insert(make_message(conversation_id, 3))
    # Replies to 3 scattered over several buckets of 10, and replies to another message between.
    thread = [4, 9, 10, 11, 25, 31, 33]
    for seq in range(4, 36):
        store.insert(make_message(conversation_id, seq, reply_to=3 if seq in thread else (12 if seq in (13, 14) else None)))
    assert store.get(conversation_id, 9).reply_to == 3 and store.get(conversation_id, 5).reply_to is None
    assert [m.reply_to for m in store.history(conversation_id, after_seq=8, limit=3).messages] == [3, 3, 3]

    page = store.replies(conversation_id, 3, after_seq=0, before_seq=100, limit=50)
    assert seqs_of(page) == thread and page.has_more is False
    assert page.messages[0] == store.get(conversation_id, 4)
    for after, before, limit in [(0, 100, 3), (4, 100, 2), (10, 26, 5), (11, 25, 5), (33, 100, 5), (0, 5, 1)]:
        expected = [s for s in thread if after < s < before]
        got = store.replies(conversation_id, 3, after_seq=after, before_seq=before, limit=limit)
        assert seqs_of(got) == expected[:limit] and got.has_more == (len(expected) > limit), (after, before, limit)
    assert seqs_of(store.replies(conversation_id, 12, after_seq=0, before_seq=100)) == [13, 14]
    assert seqs_of(store.replies(conversation_id, 5, after_seq=0, before_seq=100)) == []
    assert seqs_of(store.replies(uuid.uuid4(), 3, after_seq=0, before_seq=100)) == []


def test_reply_counts_for_a_page_count_tombstones_and_leave_out_messages_without_replies(store):
    conversation_id = uuid.uuid4()
    for seq in range(1, 24):
        reply_to = {5: 1, 6: 1, 7: 2, 15: 1, 16: 12, 21: 19, 22: 19, 23: 19}.get(seq)
        store.insert(make_message(conversation_id, seq, reply_to=reply_to))
    store.tombstone(conversation_id, 6)
    assert store.reply_counts(conversation_id, list(range(1, 24))) == {1: 3, 2: 1, 12: 1, 19: 3}
    assert store.reply_counts(conversation_id, [19, 2, 3]) == {2: 1, 19: 3}
    assert store.reply_counts(conversation_id, [3, 4]) == {}
    assert store.reply_counts(uuid.uuid4(), [1]) == {}


# --- reactions -------------------------------------------------------------------------------------


def test_reactions_count_per_emoji_with_me_for_the_viewer_over_a_page_across_buckets(store):
    conversation_id = fill(store, range(1, 26))
    alice, bob, carol = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for seq, emoji, user in [
        (1, "👍", alice), (1, "👍", bob), (1, "🎉", bob), (9, "👍", carol), (10, "❤️", alice),
        (11, "👍🏽", alice), (11, "👍🏽", bob), (11, "👍🏽", carol), (20, "x", bob), (25, "👍", alice),
    ]:
        store.reaction_add(conversation_id, seq, emoji, user)
    store.reaction_add(conversation_id, 1, "👍", alice)  # again: a set member, counted once

    page = store.reactions(conversation_id, list(range(1, 26)), alice)
    assert page == {
        1: {"🎉": {"count": 1, "me": False}, "👍": {"count": 2, "me": True}},
        9: {"👍": {"count": 1, "me": False}},
        10: {"❤️": {"count": 1, "me": True}},
        11: {"👍🏽": {"count": 3, "me": True}},
        20: {"x": {"count": 1, "me": False}},
        25: {"👍": {"count": 1, "me": True}},
    }
    # Only the seqs asked for, whatever lies between them.
    assert store.reactions(conversation_id, [1, 20], bob) == {
        1: {"🎉": {"count": 1, "me": True}, "👍": {"count": 2, "me": True}},
        20: {"x": {"count": 1, "me": True}},
    }
    assert store.reactions(conversation_id, [9], None) == {9: {"👍": {"count": 1, "me": False}}}
    assert store.reactions(conversation_id, [2, 3], alice) == {}

    store.reaction_remove(conversation_id, 1, "👍", alice)
    store.reaction_remove(conversation_id, 1, "👍", alice)  # not there any more: no effect
    store.reaction_remove(conversation_id, 9, "👍", carol)
    assert store.reactions(conversation_id, [1, 9], alice) == {1: {"🎉": {"count": 1, "me": False}, "👍": {"count": 1, "me": False}}}


# --- edit history ----------------------------------------------------------------------------------


def make_edit(conversation_id: uuid.UUID, seq: int, change: int, content: str) -> Edit:
    at = _ms(datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=next(_sent)))
    return Edit(conversation_id=conversation_id, seq=seq, change=change, content=content, written_at=at, replaced_at=at + timedelta(seconds=1))


def test_edits_are_kept_per_message_newest_first_and_page_by_change(store):
    conversation_id = fill(store, [1, 2])
    first, second, third = make_edit(conversation_id, 1, 2, "v1"), make_edit(conversation_id, 1, 5, "v2 ✓"), make_edit(conversation_id, 1, 9, "v3")
    other = make_edit(conversation_id, 2, 7, "of 2")
    for edit in (second, other, first, third):
        store.record_edit(edit)
    assert store.edits(conversation_id, 1, before_change=100) == [third, second, first]
    assert store.edits(conversation_id, 1, before_change=100, limit=2) == [third, second]
    assert store.edits(conversation_id, 1, before_change=5) == [first]
    assert store.edits(conversation_id, 2, before_change=100) == [other]
    assert store.edits(uuid.uuid4(), 1, before_change=100) == []
    # An edit recorded again at its number (its transaction rolled back) replaces the old entry.
    again = make_edit(conversation_id, 1, 9, "v3 again")
    store.record_edit(again)
    assert store.edits(conversation_id, 1, before_change=100)[0] == again


def test_a_tombstone_takes_the_edit_history_and_the_reactions_with_the_content(store):
    conversation_id = fill(store, [1, 2])
    user = uuid.uuid4()
    for seq in (1, 2):
        store.record_edit(make_edit(conversation_id, seq, seq, "before"))
        store.reaction_add(conversation_id, seq, "👍", user)
    store.tombstone(conversation_id, 1)
    assert store.edits(conversation_id, 1, before_change=100) == []
    assert store.reactions(conversation_id, [1, 2], user) == {2: {"👍": {"count": 1, "me": True}}}
    assert len(store.edits(conversation_id, 2, before_change=100)) == 1


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


def test_cassandra_history_asks_the_bucket_index_only_for_long_ranges(cassandra_connection, monkeypatch):
    """A replay or a gap fill (a range within one or two buckets) reads those buckets directly;
    a longer range asks conversation_buckets first and skips the empty ones."""
    from chat.store.cassandra import CassandraMessageStore

    store = CassandraMessageStore(connection=cassandra_connection, bucket_size=BUCKET_SIZE)
    conversation_id = fill(store, [1, 2, 3, 47, 48])  # buckets 1 to 3 hold nothing
    statements = store._prepared()
    executed = []
    execute = store._execute
    monkeypatch.setattr(store, "_execute", lambda statement, params: executed.append(statement) or execute(statement, params))

    def reads(**bounds):
        executed.clear()
        page = store.history(conversation_id, **bounds)
        return seqs_of(page), [
            "index" if statement in (statements.buckets_ascending, statements.buckets_descending) else "page"
            for statement in executed
        ]

    assert reads(after_seq=1, before_seq=4) == ([2, 3], ["page"])  # one bucket
    assert reads(after_seq=2, before_seq=19) == ([3], ["page", "page"])  # two buckets, the second empty
    assert reads(after_seq=0, before_seq=19, limit=2) == ([1, 2], ["page"])  # the first fills the page
    assert reads(before_seq=19) == ([1, 2, 3], ["page", "page"])  # two buckets, newest first
    assert reads(after_seq=40, before_seq=49) == ([47, 48], ["page"])
    assert reads(after_seq=0, before_seq=29) == ([1, 2, 3], ["index", "page"])  # three: 1 and 2 are skipped
    assert reads(after_seq=0, before_seq=49) == ([1, 2, 3, 47, 48], ["index", "page", "page"])  # buckets 0-4
    assert reads(before_seq=49, limit=3) == ([3, 47, 48], ["index", "page", "page"])


def _recorded_requests(store, monkeypatch) -> list[tuple[object, list[str] | None]]:
    """Each request the store's writes make from now on, with the warnings Cassandra answered it with."""
    requests = []
    execute_all = store._execute_all

    def recording(batched, meanwhile=None):
        results = execute_all(batched, meanwhile)
        requests.extend((statement, result.response_future.warnings) for (statement, _), result in zip(batched, results))
        return results

    monkeypatch.setattr(store, "_execute_all", recording)
    return requests


def test_cassandra_insert_batches_rows_without_server_warnings(cassandra_connection, monkeypatch):
    """A group of sends' rows go in unlogged batches, fewer requests than rows, each under what
    Cassandra warns about (5 KiB, 10 partitions); every row reads back."""
    from cassandra.query import BatchStatement

    from chat.store.cassandra import CassandraMessageStore

    store = CassandraMessageStore(connection=cassandra_connection, bucket_size=BUCKET_SIZE)
    requests = _recorded_requests(store, monkeypatch)
    conversations = [uuid.uuid4() for _ in range(12)]
    messages = [make_message(conversation_id, seq) for conversation_id in conversations for seq in (9, 10)]
    messages.append(make_message(conversations[0], 11, reply_to=9))
    store.insert(*messages)
    # 25 message rows, 1 thread row and 24 bucket markers (seqs 9 and 10 are in two buckets)
    assert sum(len(statement) if isinstance(statement, BatchStatement) else 1 for statement, _ in requests) == 50
    assert [warnings for _, warnings in requests if warnings] == []
    assert 5 <= len(requests) < 25
    assert all(isinstance(statement, BatchStatement) for statement, _ in requests[:-1])
    for message in messages:
        assert store.get(message.conversation_id, message.seq) == message
    assert seqs_of(store.replies(conversations[0], 9, after_seq=9, before_seq=100)) == [11]


def test_cassandra_insert_batches_many_short_messages_of_few_conversations_without_warnings(cassandra_connection, monkeypatch):
    """Rows of few partitions fill a batch by size: Cassandra counts about 20 bytes per cell and
    29 per row besides the values, and a batch of 31 short messages estimated at 128 bytes each
    was over its 5 KiB warning."""
    from chat.store.cassandra import CassandraMessageStore

    store = CassandraMessageStore(connection=cassandra_connection, bucket_size=1000)
    requests = _recorded_requests(store, monkeypatch)
    conversations = [uuid.uuid4(), uuid.uuid4()]
    messages = [make_message(conversations[seq % 2], seq, content="hi") for seq in range(1, 64)]
    store.insert(*messages)
    assert [warnings for _, warnings in requests if warnings] == []
    assert 1 < len(requests) < 20
    for message in messages:
        assert store.get(message.conversation_id, message.seq) == message


def test_cassandra_insert_sends_large_rows_alone(cassandra_connection, monkeypatch):
    """Rows too large to share a batch go one request each: a batch of them would be over
    Cassandra's 5 KiB warning, and eight of the largest over its 50 KiB refusal."""
    from cassandra.query import BatchStatement

    from chat.store.cassandra import CassandraMessageStore

    store = CassandraMessageStore(connection=cassandra_connection, bucket_size=1000)
    requests = _recorded_requests(store, monkeypatch)
    conversation_id = uuid.uuid4()
    large = [make_message(conversation_id, seq, content="x" * 9_000) for seq in range(1, 9)]
    wide = [make_message(conversation_id, seq, content="é" * 2_000) for seq in range(9, 13)]  # 4,000 bytes
    store.insert(*large, *wide)
    assert [warnings for _, warnings in requests if warnings] == []
    assert not any(isinstance(statement, BatchStatement) for statement, _ in requests)
    assert len(requests) == 13  # and the bucket marker's
    for message in large + wide:
        assert store.get(conversation_id, message.seq) == message


def test_cassandra_thread_rows_of_sends_that_did_not_commit_are_skipped(cassandra_connection):
    """A reply whose relational transaction rolled back leaves its thread row; the next send takes
    its seq (no reply, or a reply to another message). The thread reads on past it."""
    from chat.store.cassandra import CassandraMessageStore

    store = CassandraMessageStore(connection=cassandra_connection, bucket_size=BUCKET_SIZE)
    conversation_id = uuid.uuid4()
    store.insert(make_message(conversation_id, 3))
    store.insert(make_message(conversation_id, 4, reply_to=3))
    for stale in (5, 6):
        store.insert(make_message(conversation_id, stale, reply_to=3))
        store.insert(make_message(conversation_id, stale))  # the send that took the seq again
    store.insert(make_message(conversation_id, 7, reply_to=3))
    store.insert(make_message(conversation_id, 8, reply_to=3))
    assert seqs_of(store.replies(conversation_id, 3, after_seq=0, before_seq=100)) == [4, 7, 8]
    page = store.replies(conversation_id, 3, after_seq=4, before_seq=100, limit=1)
    assert (seqs_of(page), page.has_more) == ([7], True)
    page = store.replies(conversation_id, 3, after_seq=0, before_seq=100, limit=2)
    assert (seqs_of(page), page.has_more) == ([4, 7], True)
    page = store.replies(conversation_id, 3, after_seq=7, before_seq=100, limit=1)
    assert (seqs_of(page), page.has_more) == ([8], False)
