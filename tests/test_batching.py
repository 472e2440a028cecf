"""core.batching.Batcher: what one event loop submits while a batch runs goes in the next batch, in
submission order; each caller gets its own outcome."""
import asyncio

import pytest

from core.batching import Batcher, per_loop


class Recorder:
    """A batch's work that records each batch and waits until the test lets it finish."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.release = asyncio.Event()

    async def __call__(self, items: list) -> list:
        self.batches.append(items)
        await self.release.wait()
        return [ValueError(item) if item == "bad" else item * 2 for item in items]


async def test_a_lone_call_runs_at_once_and_what_arrives_meanwhile_goes_in_the_next_batch():
    work = Recorder()
    batcher = Batcher(work, max_batch=10)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert work.batches == [[1]]  # no timer: it did not wait for company
    later = [asyncio.create_task(batcher.submit(n)) for n in (2, 3, 4)]
    await asyncio.sleep(0)
    assert work.batches == [[1]]  # one batch at a time
    work.release.set()
    assert await first == 2
    assert await asyncio.gather(*later) == [4, 6, 8]
    assert work.batches == [[1], [2, 3, 4]]
    assert batcher.task is None


async def test_batches_are_bounded_and_keep_submission_order():
    work = Recorder()
    work.release.set()
    batcher = Batcher(work, max_batch=3)
    blocker = asyncio.Event()

    async def slow(items):
        await blocker.wait()
        return await work(items)

    batcher.work = slow
    tasks = [asyncio.create_task(batcher.submit(n)) for n in range(8)]
    await asyncio.sleep(0)
    blocker.set()
    assert await asyncio.gather(*tasks) == [n * 2 for n in range(8)]
    assert work.batches == [[0, 1, 2], [3, 4, 5], [6, 7]]


async def test_an_item_error_reaches_its_caller_only_and_a_batch_error_reaches_all():
    work = Recorder()
    work.release.set()
    batcher = Batcher(work, max_batch=10)
    results = await asyncio.gather(*(batcher.submit(item) for item in (1, "bad", 3)), return_exceptions=True)
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], ValueError)

    async def down(items):
        raise ConnectionError("down")

    batcher.work = down
    results = await asyncio.gather(*(batcher.submit(item) for item in (1, 2)), return_exceptions=True)
    assert all(isinstance(result, ConnectionError) for result in results)
    batcher.work = work
    assert await batcher.submit(5) == 10  # and the next batch runs as usual


async def test_a_caller_that_goes_away_costs_nobody_else():
    work = Recorder()
    batcher = Batcher(work, max_batch=10)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    gone, stays = asyncio.create_task(batcher.submit(2)), asyncio.create_task(batcher.submit(3))
    await asyncio.sleep(0)
    gone.cancel()
    work.release.set()
    assert await first == 2 and await stays == 6
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert work.batches == [[1], [2, 3]]  # its work still ran: only its answer was dropped


def test_per_loop_gives_each_event_loop_its_own_batcher():
    of_this_loop = per_loop(lambda: Batcher(Recorder(), max_batch=1))

    async def get():
        return of_this_loop(), of_this_loop()

    first, again = asyncio.run(get())
    other, _ = asyncio.run(get())
    assert first is again
    assert other is not first


async def test_an_item_that_waited_past_max_wait_fails_unrun_and_the_rest_run():
    work = Recorder()
    batcher = Batcher(work, max_batch=10, max_wait=0.05)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    late = asyncio.create_task(batcher.submit(2))  # queued behind a slow batch
    await asyncio.sleep(0.1)
    fresh = asyncio.create_task(batcher.submit(3))
    await asyncio.sleep(0)
    work.release.set()
    assert await first == 2
    with pytest.raises(TimeoutError):
        await late
    assert await fresh == 6
    assert work.batches == [[1], [3]]  # the late item never ran


async def test_a_batch_answered_with_the_wrong_number_of_outcomes_fails_its_callers_instead_of_hanging():
    async def short(items):
        return items[:1]

    batcher = Batcher(short, max_batch=10)
    results = await asyncio.gather(*(batcher.submit(n) for n in (1, 2)), return_exceptions=True)
    assert all(isinstance(result, RuntimeError) for result in results)
