"""Group commit: the WebSocket sends one process receives together
commit in one relational transaction with concurrent store writes, on both message stores
(Cassandra: the real server), and each send still gets its own outcome: a refused send costs only
itself, a duplicate key replays, a failed store write fails the batch with no seq burned."""
import asyncio
import uuid

import pytest
from channels.db import database_sync_to_async

from chat.models import Conversation, IdempotencyKey, Participant
from chat.services import send as sending
from core.errors import AccessDenied, StoreUnavailable, ValidationFailed
from notifications.models import OutboxEntry
from tests.conftest import use_message_store

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def store(each_message_store):
    return each_message_store


@pytest.fixture
def batches(monkeypatch) -> list[int]:
    """The size of every batch the batcher commits."""
    sizes: list[int] = []
    persist = sending._persist_batch

    def recorded(requests):
        sizes.append(len(requests))
        return persist(requests)

    monkeypatch.setattr(sending, "_persist_batch", recorded)
    return sizes


def request(sender, conversation_id, content="hi", **fields):
    return sending.SendRequest(
        sender=sender, conversation_id=conversation_id, content=content, transport="websocket",
        idempotency_field="client_message_id", **fields,
    )


async def contents(store, conversation_id) -> list[str]:
    page = await database_sync_to_async(store.history)(conversation_id)
    return [m.content for m in page.messages]


async def send_together(*requests):
    """Submit every request from one loop before any is committed: they form one batch."""
    return await asyncio.gather(*(sending.amessage_send(r) for r in requests), return_exceptions=True)


async def test_sends_that_arrive_together_commit_together_each_with_its_own_outcome(
    store, batches, published, make_user, make_group
):
    alice, bob, outsider = await database_sync_to_async(lambda: (make_user(), make_user(), make_user()))()
    first, second = await database_sync_to_async(lambda: (make_group(alice, bob), make_group(bob, alice)))()

    outcomes = await send_together(
        request(alice, first.id, "1"),
        request(bob, second.id, "a"),
        request(outsider, first.id, "not a member"),
        request(bob, first.id, "2", idempotency_key="k"),
        request(alice, first.id, ""),  # invalid: empty content
        request(bob, first.id, "2", idempotency_key="k"),  # the same send again, in the same batch
        request(alice, second.id, "b"),
        request(alice, first.id, "3"),
    )

    assert batches == [8]
    assert isinstance(outcomes[2], AccessDenied)
    assert isinstance(outcomes[4], ValidationFailed) and "content" in outcomes[4].detail
    created = [o for o in outcomes if isinstance(o, sending.SendResult) and not o.replayed]
    assert [(m.conversation_id, m.seq, m.content) for m in (o.message for o in created)] == [
        (first.id, 1, "1"), (second.id, 1, "a"), (first.id, 2, "2"), (second.id, 2, "b"), (first.id, 3, "3"),
    ]
    assert outcomes[5].replayed and outcomes[5].message == outcomes[3].message
    # Everything committed: the counters, the store, the outbox; events in seq order per conversation.
    assert await contents(store, first.id) == ["1", "2", "3"]
    assert await contents(store, second.id) == ["a", "b"]
    counters = await database_sync_to_async(lambda: {c.pk: c.last_seq for c in Conversation.objects.all()})()
    assert (counters[first.id], counters[second.id]) == (3, 2)
    assert await database_sync_to_async(OutboxEntry.objects.count)() == 5
    # Published in seq order within each conversation (conversations side by side).
    new = [e["message"] for e in published if e["type"] == "message.new"]
    assert [m["seq"] for m in new if m["conversation_id"] == str(first.id)] == [1, 2, 3]
    assert [m["seq"] for m in new if m["conversation_id"] == str(second.id)] == [1, 2]


async def test_a_lone_send_is_not_held_back(store, batches, published, make_user, make_group):
    alice, bob = await database_sync_to_async(lambda: (make_user(), make_user()))()
    conversation = await database_sync_to_async(make_group)(alice, bob)
    for content in ("1", "2"):
        result = await sending.amessage_send(request(alice, conversation.id, content))
        assert result.message.content == content
    assert batches == [1, 1]


async def test_a_failed_store_write_fails_the_batch_and_burns_no_seq(store, batches, published, make_user, make_group, monkeypatch):
    from chat.store import StoreError

    alice, bob, outsider = await database_sync_to_async(lambda: (make_user(), make_user(), make_user()))()
    conversation = await database_sync_to_async(make_group)(alice, bob)

    def unavailable(*messages, meanwhile=None):
        # The writes fail after what commits with them was written (while they were in flight).
        meanwhile()
        raise StoreError("down")

    monkeypatch.setattr(store, "insert", unavailable)
    published.clear()  # the conversation's creation announced itself
    outcomes = await send_together(
        request(alice, conversation.id, "1", idempotency_key="k1"),
        request(outsider, conversation.id, "x"),
        request(bob, conversation.id, "2"),
    )
    assert batches == [3]
    assert [type(o) for o in outcomes] == [StoreUnavailable, AccessDenied, StoreUnavailable]
    assert published == []
    assert await database_sync_to_async(lambda: Conversation.objects.get(pk=conversation.pk).last_seq)() == 0
    assert not await database_sync_to_async(IdempotencyKey.objects.exists)()
    assert not await database_sync_to_async(OutboxEntry.objects.exists)()
    markers = await database_sync_to_async(lambda: set(Participant.objects.values_list("last_read_seq", flat=True)))()
    assert markers == {0}

    monkeypatch.undo()
    use_message_store(monkeypatch, store)
    retried = await sending.amessage_send(request(alice, conversation.id, "1", idempotency_key="k1"))
    assert (retried.message.seq, retried.replayed) == (1, False)


async def test_a_key_committed_elsewhere_meanwhile_replays_and_the_rest_of_the_batch_commits(
    store, batches, published, make_user, make_group, monkeypatch
):
    alice, bob = await database_sync_to_async(lambda: (make_user(), make_user()))()
    conversation = await database_sync_to_async(make_group)(alice, bob)
    elsewhere = await database_sync_to_async(sending.message_send)(request(alice, conversation.id, "once", idempotency_key="k"))
    # Another process's send with the same key commits between this batch's look for an earlier
    # send and its insert of the key: the batch meets the key's unique constraint (once: the
    # batch's second attempt looks again).
    lookups = []
    real_lookup = sending._earlier_sends

    def missed_once(keyed, now):
        lookups.append(len(keyed))
        return ({}, []) if len(lookups) == 1 else real_lookup(keyed, now)

    monkeypatch.setattr(sending, "_earlier_sends", missed_once)

    outcomes = await send_together(
        request(bob, conversation.id, "before"),
        request(alice, conversation.id, "once", idempotency_key="k"),
        request(bob, conversation.id, "after"),
    )
    assert [o.replayed for o in outcomes] == [False, True, False]
    assert outcomes[1].message == elsewhere.message
    assert lookups == [1, 1]  # the batch went again as a whole, not one send at a time
    assert await contents(store, conversation.id) == ["once", "before", "after"]
    assert await database_sync_to_async(lambda: Conversation.objects.get(pk=conversation.pk).last_seq)() == 3


async def test_a_cancelled_caller_does_not_cancel_its_send(store, batches, published, make_user, make_group):
    alice, bob = await database_sync_to_async(lambda: (make_user(), make_user()))()
    conversation = await database_sync_to_async(make_group)(alice, bob)
    waiting = asyncio.ensure_future(sending.amessage_send(request(alice, conversation.id, "sent anyway", idempotency_key=uuid.uuid4().hex)))
    other = asyncio.ensure_future(sending.amessage_send(request(bob, conversation.id, "and this")))
    await asyncio.sleep(0)
    waiting.cancel()  # the socket closed while its send was being committed
    assert (await other).message.seq == 2
    assert await contents(store, conversation.id) == ["sent anyway", "and this"]


@pytest.mark.django_db(transaction=True)
def test_on_sqlite_a_send_queues_behind_another_process_writing(make_user, make_group, published):
    """Sends of the processes sharing one SQLite file take turns on a file lock beside it, which
    hands the database over at once (SQLite's own lock makes waiters poll with sleeps)."""
    import fcntl
    import os
    import threading

    from django.db import connection

    if connection.vendor != "sqlite":
        pytest.skip("the file lock is SQLite's")
    alice, bob = make_user(), make_user()
    conversation = make_group(alice, bob)
    other_process = os.open(f"{connection.settings_dict['NAME']}.writer-lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(other_process, fcntl.LOCK_EX)  # another open file: flock treats it as another owner
    done = threading.Event()

    def send():
        sending.message_send(request(alice, conversation.id, "queued"))
        connection.close()
        done.set()

    thread = threading.Thread(target=send)
    thread.start()
    try:
        assert not done.wait(0.5)
    finally:
        fcntl.flock(other_process, fcntl.LOCK_UN)
        os.close(other_process)
    assert done.wait(10)
    thread.join()
    assert Conversation.objects.get(pk=conversation.pk).last_seq == 1


@pytest.mark.django_db(transaction=True)
def test_on_sqlite_a_batch_whose_wait_for_the_write_lock_ran_out_fails_once(make_user, make_group, monkeypatch):
    """SQLite's write lock held through the whole timeout (a long transaction outside the send
    path): each send of the batch alone would wait as long again, so the batch is not retried
    send by send; every send is answered 503 after the one wait, and nothing commits."""
    import sqlite3

    from django.db import connection

    from core.errors import StoreUnavailable

    if connection.vendor != "sqlite":
        pytest.skip("the write lock's timeout is SQLite's")
    alice, bob = make_user(), make_user()
    conversation = make_group(alice, bob)
    attempts = []
    persist_accepted = sending._persist_accepted

    def counted(accepted, **kwargs):
        attempts.append(len(accepted))
        return persist_accepted(accepted, **kwargs)

    monkeypatch.setattr(sending, "_persist_accepted", counted)
    holder = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    connection.ensure_connection()
    connection.connection.execute("PRAGMA busy_timeout = 100")  # a wait of 0.1 s, not 20
    try:
        outcomes = sending._persist_batch([request(alice, conversation.id, text) for text in "abc"])
    finally:
        holder.rollback()
        holder.close()
        connection.close()  # (its busy timeout goes with it)
    assert attempts == [3]
    assert [type(outcome) for outcome in outcomes] == [StoreUnavailable] * 3
    assert Conversation.objects.get(pk=conversation.pk).last_seq == 0


@pytest.mark.django_db(transaction=True)
def test_on_postgresql_the_seq_allocation_locks_its_rows_in_id_order(make_user, make_group):
    """A batch locks all of its conversations' rows with its first statement, lowest id first,
    whatever order the table holds them in: two batches sharing rows queue instead of deadlocking."""
    import threading
    import time

    from django.db import OperationalError, connection, transaction
    from django.utils import timezone

    from chat import sql

    if connection.vendor != "postgresql":
        pytest.skip("row locks are PostgreSQL's (SQLite locks the whole database)")
    alice, bob = make_user(), make_user()
    low, high = sorted((make_group(alice, bob), make_group(alice, bob)), key=lambda c: c.id.bytes)
    Conversation.objects.filter(pk=low.pk).update(title="moved")  # its row now comes after high's in the table
    holding, release, allocated = threading.Event(), threading.Event(), []

    def other_batch_holds_high():
        with transaction.atomic():
            list(Conversation.objects.select_for_update().filter(pk=high.pk))
            holding.set()
            release.wait(10)
        connection.close()

    def batch():
        with transaction.atomic():
            allocated.append(sql.allocate_seqs({high.id: 1, low.id: 2}, timezone.now()))
        connection.close()

    def waiting_for_a_lock() -> bool:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            return cursor.fetchone()[0] > 0

    threads = [threading.Thread(target=other_batch_holds_high), threading.Thread(target=batch)]
    threads[0].start()
    assert holding.wait(10)
    threads[1].start()
    try:
        for _ in range(500):
            if waiting_for_a_lock():
                break
            time.sleep(0.01)
        assert not allocated  # waiting for high's row...
        with pytest.raises(OperationalError), transaction.atomic():  # ...with low's already locked
            list(Conversation.objects.select_for_update(nowait=True).filter(pk=low.pk))
    finally:
        release.set()
        for thread in threads:
            thread.join(10)
    assert allocated == [{high.id: 1, low.id: 2}]


async def test_a_send_whose_uploads_cannot_be_attached_fails_alone_in_its_batch(store, batches, published, make_user, make_group):
    alice, bob = await database_sync_to_async(lambda: (make_user(), make_user()))()
    conversation = await database_sync_to_async(make_group)(alice, bob)
    outcomes = await send_together(
        request(alice, conversation.id, "1"),
        request(bob, conversation.id, "not yours", attachments=[str(uuid.uuid4())], idempotency_key="k"),
        request(alice, conversation.id, "2"),
    )
    assert batches == [3]
    assert isinstance(outcomes[1], ValidationFailed) and "attachments" in outcomes[1].detail
    assert [(o.message.seq, o.message.content) for o in (outcomes[0], outcomes[2])] == [(1, "1"), (2, "2")]
    assert await contents(store, conversation.id) == ["1", "2"]
    # Its seq and its idempotency record went back with it: the key is free for a corrected retry.
    assert not await database_sync_to_async(IdempotencyKey.objects.exists)()


async def test_replies_are_checked_in_the_transaction_and_a_retry_replays_after_its_target_is_deleted(
    store, batches, published, make_user, make_group
):
    from chat.services import moderation

    alice, bob = await database_sync_to_async(lambda: (make_user(), make_user()))()
    conversation = await database_sync_to_async(make_group)(alice, bob)
    first = await sending.amessage_send(request(alice, conversation.id, "first"))
    second = await sending.amessage_send(request(alice, conversation.id, "second"))
    await database_sync_to_async(moderation.message_delete)(actor=alice, conversation_id=conversation.id, seq=second.message.seq)
    outcomes = await send_together(
        request(bob, conversation.id, "re: first", reply_to=first.message.seq, idempotency_key="r1"),
        request(bob, conversation.id, "re: deleted", reply_to=second.message.seq),
        request(bob, conversation.id, "re: nothing", reply_to=99),
    )
    assert outcomes[0].message.reply_to == first.message.seq and outcomes[0].message.seq == 3
    assert [o.detail["reply_to"] for o in outcomes[1:]] == [["That message was deleted."], ["No such message in this conversation."]]
    # The reply's target is deleted afterwards: its retry still answers with the reply it created.
    await database_sync_to_async(moderation.message_delete)(actor=alice, conversation_id=conversation.id, seq=first.message.seq)
    retried = await sending.amessage_send(request(bob, conversation.id, "re: first", reply_to=first.message.seq, idempotency_key="r1"))
    assert retried.replayed and retried.message == outcomes[0].message


async def test_a_fault_accepting_one_send_fails_that_send_alone(store, batches, published, make_user, make_group, monkeypatch):
    alice, bob = await database_sync_to_async(lambda: (make_user(), make_user()))()
    conversation = await database_sync_to_async(make_group)(alice, bob)
    authorize = sending.access_participations

    def faulty_for_bob(requests):
        # The batch's one read fails; then each send is read alone, and only bob's read fails.
        if any(user.pk == bob.pk for user, _ in requests):
            raise RuntimeError("the database went away for this read")
        return authorize(requests)

    monkeypatch.setattr(sending, "access_participations", faulty_for_bob)
    outcomes = await send_together(request(alice, conversation.id, "1"), request(bob, conversation.id, "x"), request(alice, conversation.id, "2"))
    assert isinstance(outcomes[1], StoreUnavailable)
    assert [(o.message.seq, o.message.content) for o in (outcomes[0], outcomes[2])] == [(1, "1"), (2, "2")]


async def test_a_batch_takes_every_conversations_seqs_in_one_statement(store, batches, published, make_user, make_group, monkeypatch):
    # (The order it locks their rows in is the statement's own: the PostgreSQL test above.)
    alice, bob = await database_sync_to_async(lambda: (make_user(), make_user()))()
    one, two = await database_sync_to_async(lambda: (make_group(alice, bob), make_group(alice, bob)))()
    taken = []
    allocate = sending.sql.allocate_seqs

    def recorded(counts, now):
        taken.append(dict(counts))
        return allocate(counts, now)

    monkeypatch.setattr(sending.sql, "allocate_seqs", recorded)
    outcomes = await send_together(
        request(alice, two.id, "t1"), request(alice, one.id, "o1"), request(bob, two.id, "t2"), request(bob, one.id, "o2")
    )
    assert taken == [{one.id: 2, two.id: 2}]
    # Within a conversation, the order they arrived in.
    assert [(o.message.conversation_id, o.message.seq, o.message.content) for o in outcomes] == [
        (two.id, 1, "t1"), (one.id, 1, "o1"), (two.id, 2, "t2"), (one.id, 2, "o2")
    ]


async def test_a_refused_reply_leaves_its_conversation_as_it_was(store, batches, published, make_user, make_group):
    """A conversation whose only send of the batch is refused (its reply target does not exist)
    takes no seq and keeps its place in the conversation list (its activity time)."""
    alice, bob = await database_sync_to_async(lambda: (make_user(), make_user()))()
    one, two = await database_sync_to_async(lambda: (make_group(alice, bob), make_group(alice, bob)))()
    before = await database_sync_to_async(lambda: Conversation.objects.get(pk=two.pk))()
    outcomes = await send_together(request(alice, one.id, "plain"), request(bob, two.id, "re: nothing", reply_to=99))
    assert outcomes[0].message.seq == 1
    assert isinstance(outcomes[1], ValidationFailed)
    after = await database_sync_to_async(lambda: Conversation.objects.get(pk=two.pk))()
    assert (after.last_seq, after.last_activity_at) == (before.last_seq, before.last_activity_at)


async def test_a_batch_checks_its_senders_rates_in_one_call_and_refuses_only_those_over(
    store, batches, published, make_user, make_group, monkeypatch, settings
):
    from core import ratelimit
    from core.errors import RateLimited

    settings.CHAT_SEND_RATE = "2/min"
    ratelimit._limiter.cache_clear()
    calls = []
    check_many = ratelimit.RateLimiter.check_many

    def counted(self, subjects):
        calls.append(list(subjects))
        return check_many(self, subjects)

    monkeypatch.setattr(ratelimit.RateLimiter, "check_many", counted)
    alice, bob, outsider = await database_sync_to_async(lambda: (make_user(), make_user(), make_user()))()
    group = await database_sync_to_async(make_group)(alice, bob)
    try:
        outcomes = await send_together(
            request(alice, group.id, "a1"),
            request(alice, group.id, ""),  # invalid: refused before the rate counts it
            request(alice, group.id, "a2"),
            request(bob, group.id, "b1"),
            request(outsider, group.id, "o1"),  # counted, then refused by the membership rule
            request(alice, group.id, "a3"),  # alice's third within the minute
        )
    finally:
        ratelimit._limiter.cache_clear()

    assert batches == [6]
    assert calls == [[alice.pk, alice.pk, bob.pk, outsider.pk, alice.pk]]
    assert isinstance(outcomes[1], ValidationFailed)
    assert isinstance(outcomes[4], AccessDenied)
    assert isinstance(outcomes[5], RateLimited)
    assert [o.message.content for o in outcomes if isinstance(o, sending.SendResult)] == ["a1", "a2", "b1"]
    assert await contents(store, group.id) == ["a1", "a2", "b1"]


@pytest.mark.django_db(transaction=True)
def test_a_batch_costs_the_same_statements_whatever_its_size(make_user, make_group, published):
    """Set-wise: a batch runs one statement per kind (authorization, idempotency lookup, seq
    allocation, records, read markers, outbox), not a round of statements per send or per
    conversation; and every send still has its own record, read marker and outbox entry."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    senders = [make_user() for _ in range(3)]
    first, second = make_group(*senders), make_group(*senders)

    def batch(size: int) -> tuple[list, int]:
        requests = [
            request(senders[n % 3], (first, second)[n % 2].id, f"m{n}", idempotency_key=uuid.uuid4().hex)
            for n in range(size)
        ]
        with CaptureQueriesContext(connection) as queries:
            outcomes = sending._persist_batch(requests)
        return outcomes, len(queries)

    one, one_statements = batch(1)  # one sender, one conversation
    small, small_statements = batch(2)  # two of each
    large, large_statements = batch(12)
    assert all(isinstance(o, sending.SendResult) and not o.replayed for o in one + small + large)
    assert one_statements == small_statements == large_statements
    assert IdempotencyKey.objects.count() == OutboxEntry.objects.count() == 15
    # Each sender's read marker is at its own last message in each conversation.
    for conversation in (first, second):
        for sender in senders:
            own = [o.message.seq for o in one + small + large if o.message.conversation_id == conversation.id and o.message.sender_id == sender.pk]
            marker = Participant.objects.get(conversation=conversation, user=sender).last_read_seq
            assert marker == max(own, default=0)


async def test_a_key_reused_in_the_same_batch_for_another_message_is_refused(store, batches, published, make_user, make_group):
    from core.errors import IdempotencyMismatch

    alice, bob = await database_sync_to_async(lambda: (make_user(), make_user()))()
    conversation = await database_sync_to_async(make_group)(alice, bob)
    outcomes = await send_together(
        request(alice, conversation.id, "first", idempotency_key="k"),
        request(alice, conversation.id, "something else", idempotency_key="k"),
        request(bob, conversation.id, "first", idempotency_key="k"),  # another sender's key is another key
    )
    assert batches == [3]
    assert isinstance(outcomes[1], IdempotencyMismatch)
    assert [(o.message.seq, o.replayed) for o in (outcomes[0], outcomes[2])] == [(1, False), (2, False)]
    assert await contents(store, conversation.id) == ["first", "first"]


async def test_a_key_reused_in_one_batch_goes_by_arrival_not_by_conversation(store, batches, published, make_user, make_group):
    """The first send of a key wins, whichever conversation sorts first; a send whose reply target is
    refused does not take its key, and the same key's next send in the batch goes on."""
    from core.errors import IdempotencyMismatch

    alice, bob = await database_sync_to_async(lambda: (make_user(), make_user()))()
    one, two = await database_sync_to_async(lambda: (make_group(alice, bob), make_group(alice, bob)))()
    low, high = sorted((one, two), key=lambda c: c.id.bytes)
    outcomes = await send_together(
        request(alice, high.id, "first", idempotency_key="k"),
        request(alice, low.id, "first", idempotency_key="k"),  # the same key elsewhere: another request
        request(bob, high.id, "re: nothing", reply_to=99, idempotency_key="r"),
        request(bob, high.id, "plain", idempotency_key="r"),
    )
    assert batches == [4]
    assert (outcomes[0].message.conversation_id, outcomes[0].replayed) == (high.id, False)
    assert isinstance(outcomes[1], IdempotencyMismatch)
    assert isinstance(outcomes[2], ValidationFailed)
    assert (outcomes[3].message.content, outcomes[3].replayed) == ("plain", False)
    assert await contents(store, low.id) == []
    assert await contents(store, high.id) == ["first", "plain"]


async def test_a_failed_outbox_write_costs_only_its_own_message_its_notification(store, batches, published, make_user, make_group, monkeypatch):
    import notifications.services as notification_services

    alice, bob = await database_sync_to_async(lambda: (make_user(), make_user()))()
    conversation = await database_sync_to_async(make_group)(alice, bob)
    enqueue = notification_services.notification_enqueue

    def fails_for_one(*, messages):
        if any(message.content == "no push" for message in messages):
            raise RuntimeError("the outbox refused this one")
        enqueue(messages=messages)

    monkeypatch.setattr(notification_services, "notification_enqueue", fails_for_one)
    outcomes = await send_together(
        request(alice, conversation.id, "1"), request(bob, conversation.id, "no push"), request(alice, conversation.id, "3"),
    )
    assert [o.message.seq for o in outcomes] == [1, 2, 3]
    queued = await database_sync_to_async(lambda: sorted(OutboxEntry.objects.values_list("seq", flat=True)))()
    assert queued == [1, 3]
