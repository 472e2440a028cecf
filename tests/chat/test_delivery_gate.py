"""SeqGate on its own: a fake store read and a clock the test moves, so no test waits for real time."""
import asyncio
import heapq
import itertools

import pytest

from chat import metrics
from chat.delivery import GAP_GIVE_UP_SECONDS, GAP_WAIT_SECONDS, SeqGate


class FakeTime:
    """A monotonic clock and a sleep that only this test moves forward."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._sleepers: list[tuple[float, int, asyncio.Future]] = []
        self._order = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._order), future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper at its own deadline and letting it run."""
        target = self.now + seconds
        await settle()
        while self._sleepers and self._sleepers[0][0] <= target + 1e-9:
            deadline, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, deadline)
            if not future.done():
                future.set_result(None)
            await settle()
        self.now = target
        await settle()


async def settle() -> None:
    """Let every runnable task run until it waits on the fake clock (or on nothing)."""
    for _ in range(50):
        await asyncio.sleep(0)


def message(seq: int, content: str | None = None) -> dict:
    return {"seq": seq, "content": content if content is not None else f"m{seq}", "metadata": {"k": seq}, "deleted": False}


class FakeStore:
    """The fetch a gate is given: reads `messages`, records every call, fails when told to."""

    def __init__(self, *seqs: int) -> None:
        self.messages = {seq: message(seq) for seq in seqs}
        self.calls: list[tuple[int, int, int]] = []
        self.failures = 0

    async def fetch(self, after_seq: int, before_seq: int, limit: int) -> list[dict]:
        self.calls.append((after_seq, before_seq, limit))
        await asyncio.sleep(0)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("store unavailable")
        return [self.messages[s] for s in range(after_seq + 1, before_seq) if s in self.messages][:limit]


class Harness:
    def __init__(self, store: FakeStore, **options) -> None:
        self.time = FakeTime()
        self.store = store
        self.emitted: list[dict] = []
        self.gate = SeqGate(
            emit=self._emit, fetch=store.fetch, clock=self.time.clock, sleep=self.time.sleep, name="c1", **options
        )

    async def _emit(self, message: dict) -> None:
        self.emitted.append(message)

    @property
    def seqs(self) -> list[int]:
        return [m["seq"] for m in self.emitted]

    async def deliver(self, *seqs: int) -> None:
        for seq in seqs:
            await self.gate.deliver(message(seq))


@pytest.fixture
def harness():
    made = []

    def make(*stored: int, **options) -> Harness:
        made.append(Harness(FakeStore(*stored), **options))
        return made[-1]

    yield make
    for h in made:
        h.gate.close()


class Count:
    """How much a prometheus series moved since it was made."""

    def __init__(self, series) -> None:
        self.series = series
        self.start = series._value.get()

    @property
    def delta(self) -> float:
        return self.series._value.get() - self.start


async def test_in_order_arrivals_pass_straight_through(harness):
    h = harness()
    await h.deliver(1, 2, 3)
    assert h.seqs == [1, 2, 3]
    assert h.gate.next_seq == 4 and h.gate.gap_task is None
    await h.time.advance(10)
    assert h.store.calls == []


async def test_take_next_lets_only_the_plain_next_seq_through(harness):
    h = harness(1, 2, 3, 4, 5)
    assert h.gate.take_next(1) and h.gate.next_seq == 2
    assert not h.gate.take_next(1) and not h.gate.take_next(3)  # a duplicate, an early arrival
    await h.deliver(3)  # held: nothing may jump ahead of the hole while it is there
    assert not h.gate.take_next(2) and h.gate.next_seq == 2
    await h.deliver(2)
    assert h.seqs == [2, 3] and h.gate.take_next(4)
    async with h.gate._lock:  # the gate is letting messages out (a gap fill, a catch-up)
        assert not h.gate.take_next(5)
    h.gate.close()
    assert not h.gate.take_next(5)


async def test_early_arrivals_wait_and_go_out_in_seq_order(harness):
    h = harness(1, 2, 3)
    buffered = Count(metrics.broadcast_channel_length)
    await h.deliver(3)
    assert h.seqs == [] and h.gate.pending_seqs == [3] and buffered.delta == 1
    await h.deliver(1)
    assert h.seqs == [1]
    await h.deliver(2)
    assert h.seqs == [1, 2, 3]
    assert h.store.calls == []  # reordered from what arrived, not filled from the store
    assert buffered.delta == 0


async def test_a_seq_seen_twice_goes_out_once(harness):
    h = harness(next_seq=1)
    dropped = Count(metrics.broadcast_dropped)
    await h.deliver(1, 2)  # the catch-up replay ...
    await h.deliver(2, 3)  # ... overlapping live delivery
    await h.deliver(3)
    assert h.seqs == [1, 2, 3]
    assert dropped.delta == 2


async def test_a_duplicate_of_a_held_message_does_not_replace_it(harness):
    """A repeat of a held seq (replay and live both early) is dropped: the held copy, which may
    carry an edit by now, is the one that goes out."""
    h = harness()
    dropped = Count(metrics.broadcast_dropped)
    await h.deliver(2)
    assert await h.gate.update(message(2, "edited"))
    await h.deliver(2)  # the stale copy again
    await h.deliver(1)
    assert [(m["seq"], m["content"]) for m in h.emitted] == [(1, "m1"), (2, "edited")]
    assert dropped.delta == 1


async def test_a_lost_publish_is_read_from_the_store_after_the_wait(harness):
    h = harness(1, 2, 3)
    fills = Count(metrics.gap_fills)
    await h.deliver(1, 3)  # 2's publish was lost
    await h.time.advance(GAP_WAIT_SECONDS * 0.9)
    assert h.seqs == [1] and h.store.calls == []  # the wait lets a merely late publish arrive
    await h.time.advance(GAP_WAIT_SECONDS * 0.2)
    assert h.store.calls == [(1, 3, 1)]
    assert h.seqs == [1, 2, 3] and fills.delta == 1
    await settle()
    assert h.gate.gap_task is None and h.gate.pending_seqs == []


async def test_a_large_gap_is_read_in_pages_of_max_fetch(harness):
    h = harness(*range(1, 7), max_fetch=2)
    await h.deliver(1, 6)
    await h.time.advance(GAP_WAIT_SECONDS)
    assert h.seqs == [1, 2, 3]
    await h.time.advance(GAP_WAIT_SECONDS)
    assert h.seqs == [1, 2, 3, 4, 5, 6]
    assert h.store.calls == [(1, 6, 2), (3, 6, 2)]


async def test_a_seq_no_store_has_is_skipped_at_the_give_up_time_and_not_before(harness):
    h = harness(1, 3)  # 2 was taken but never stored (its send failed)
    await h.deliver(1, 3)
    await h.time.advance(GAP_GIVE_UP_SECONDS - 0.01)
    assert h.seqs == [1] and h.gate.pending_seqs == [3]
    assert len(h.store.calls) > 10  # kept reading meanwhile
    await h.time.advance(2 * GAP_WAIT_SECONDS)
    assert h.seqs == [1, 3]
    await h.deliver(2, 4)  # 2 turning up now would be out of order: dropped
    assert h.seqs == [1, 3, 4]


async def test_a_hole_inside_a_fetched_page_is_waited_for_not_jumped(harness):
    h = harness(1, 3, 4)  # the store has 3 but not (yet) 2
    await h.deliver(1, 5)
    await h.time.advance(GAP_WAIT_SECONDS)
    assert h.seqs == [1]  # 3 is there, but letting it out now would lose 2 for good
    h.store.messages[2] = message(2)
    await h.time.advance(GAP_WAIT_SECONDS)
    assert h.seqs == [1, 2, 3, 4, 5]


async def test_after_the_give_up_time_stored_seqs_past_the_hole_still_go_out(harness):
    h = harness(1, 3, 4)
    await h.deliver(1, 6)
    await h.time.advance(GAP_GIVE_UP_SECONDS + 2 * GAP_WAIT_SECONDS)
    assert h.seqs == [1, 3, 4, 6]  # 2 and 5 are in no store; 3 and 4 are


async def test_each_gap_gets_the_whole_give_up_time(harness):
    """Progress restarts the give-up time: a gap that opens while another was being waited for
    is not skipped early because the gap task has been running for long."""
    h = harness(1, 3)
    await h.deliver(1, 3, 6)
    await h.time.advance(3.0)
    assert h.seqs == [1]
    h.store.messages[2] = message(2)  # 2's write lands late; 4 and 5 are still missing
    await h.time.advance(GAP_WAIT_SECONDS)
    assert h.seqs == [1, 2, 3]
    await h.time.advance(GAP_GIVE_UP_SECONDS - 2 * GAP_WAIT_SECONDS)
    assert h.seqs == [1, 2, 3]  # more than GAP_GIVE_UP_SECONDS since the task started
    await h.time.advance(3 * GAP_WAIT_SECONDS)
    assert h.seqs == [1, 2, 3, 6]


async def test_an_edit_or_delete_of_a_held_message_goes_out_with_it(harness):
    h = harness()
    await h.deliver(1, 3, 4)
    assert await h.gate.update(message(3, "m3 edited"))
    assert await h.gate.delete(4)
    assert not await h.gate.update(message(1, "too late"))  # already out: the caller sends the change
    assert not await h.gate.delete(9)  # not here yet
    await h.deliver(2)
    assert [(m["seq"], m["content"], m["metadata"], m["deleted"]) for m in h.emitted] == [
        (1, "m1", {"k": 1}, False),
        (2, "m2", {"k": 2}, False),
        (3, "m3 edited", {"k": 3}, False),
        (4, "", {}, True),
    ]


async def test_a_page_cut_short_by_its_byte_bound_is_not_taken_for_missing_seqs(harness):
    # The store was down past the give-up time; then it answers with pages bounded in bytes (one
    # message each here). What a page did not reach is stored, not missing: nothing is skipped.
    h = harness(*range(1, 8))
    h.store.failures = 10_000
    await h.deliver(1, 7)
    await h.time.advance(2 * GAP_GIVE_UP_SECONDS)
    h.store.failures = 0
    real_fetch = h.store.fetch

    async def one_per_page(after_seq, before_seq, limit):
        return (await real_fetch(after_seq, before_seq, limit))[:1]

    h.gate._fetch = one_per_page
    for _ in range(6):
        await h.time.advance(GAP_WAIT_SECONDS)
    assert h.seqs == [1, 2, 3, 4, 5, 6, 7]


async def test_a_deleted_held_message_loses_its_content_omitted_mark(harness):
    h = harness()
    await h.deliver(1)
    await h.gate.deliver({**message(3), "content": None, "content_omitted": True})
    assert await h.gate.delete(3)
    await h.deliver(2)
    assert h.emitted[-1] == {"seq": 3, "content": "", "metadata": {}, "deleted": True}


async def test_a_failed_store_read_is_retried(harness):
    h = harness(1, 2, 3)
    h.store.failures = 1
    panics = Count(metrics.broadcast_panic)
    await h.deliver(1, 3)
    await h.time.advance(GAP_WAIT_SECONDS)
    assert h.seqs == [1] and panics.delta == 1 and len(h.store.calls) == 1
    await h.time.advance(GAP_WAIT_SECONDS)
    assert h.seqs == [1, 2, 3] and len(h.store.calls) == 2


async def test_failed_reads_never_count_as_the_store_lacking_a_seq(harness):
    h = harness(1, 2, 3)
    h.store.failures = 10_000
    await h.deliver(1, 3)
    await h.time.advance(2 * GAP_GIVE_UP_SECONDS)
    assert h.seqs == [1]  # 2 may well be stored: it is not skipped
    h.store.failures = 0
    await h.time.advance(GAP_WAIT_SECONDS)
    assert h.seqs == [1, 2, 3]


async def test_close_stops_the_gap_filler_and_drops_what_is_held(harness):
    h = harness(1, 2, 3, 4)
    buffered = Count(metrics.broadcast_channel_length)
    await h.deliver(1, 3, 4)
    task = h.gate.gap_task
    assert task is not None and buffered.delta == 2
    assert h.gate.close() == 2
    await settle()
    assert task.cancelled()
    assert buffered.delta == 0 and h.gate.pending_seqs == []
    await h.time.advance(GAP_GIVE_UP_SECONDS)
    await h.deliver(2)
    assert h.seqs == [1] and h.store.calls == []


async def test_catch_up_reads_what_is_committed_but_never_arrived(harness):
    """The last messages' publishes were lost: no later arrival reveals the gap, the re-check's
    committed last_seq does."""
    h = harness(1, 2, 3, 4, max_fetch=2)
    await h.deliver(1)
    await h.gate.catch_up(4)
    assert h.seqs == [1, 2, 3, 4]
    assert h.store.calls == [(1, 5, 2), (3, 5, 1)]  # in pages of at most max_fetch
    await h.deliver(3)  # the lost publish turns up after all: dropped
    assert h.seqs == [1, 2, 3, 4]


async def test_catch_up_leaves_held_messages_to_the_gap_filler_and_stops_when_the_store_lags(harness):
    h = harness(1, 2, 3)
    await h.deliver(1, 3)  # 3 is held, waiting for 2
    await h.gate.catch_up(3)
    assert h.seqs == [1, 2, 3] and h.store.calls == [(1, 3, 1)]  # read only below the held seq
    h.store.calls.clear()
    await h.gate.catch_up(5)  # committed, not readable yet: nothing emitted, no loop
    assert h.seqs == [1, 2, 3] and h.store.calls == [(3, 6, 2)]
