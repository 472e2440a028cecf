"""Coalescing of one event loop's calls into batches, with no timer.

Many sockets of a process ask for the same kind of work at the same moment: sends to commit, a
reconnect storm's presence entries and announcements. Each alone pays a round trip (a thread hop
and a transaction, or a Redis call with its pool checkout). A `Batcher` runs at most one batch at
a time, and whatever is submitted meanwhile goes together in the next one: a lone call goes at
once (batching costs no latency; batches form only under load), and batches run in submission
order, so two calls of one caller never overtake each other.
"""
from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

# A batch's items -> one outcome per item, in order: its result, or the exception its caller gets.
Work = Callable[[list[Item]], Awaitable[list["Result | BaseException"]]]


class Batcher(Generic[Item, Result]):
    """Runs `work` over batches of what `submit` was given, one batch at a time, at most
    `max_batch` items each. `max_wait` (seconds, or None) bounds how long an item may wait for its
    batch to start: when the service behind `work` is slow, a queue of batches would otherwise make
    each caller wait for every batch ahead of it; past the bound the item fails with TimeoutError
    and is not run."""

    def __init__(self, work: Work, *, max_batch: int, max_wait: float | None = None) -> None:
        self.work = work
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.waiting: list[tuple[Item, asyncio.Future, float]] = []
        self.task: asyncio.Task | None = None

    async def submit(self, item: Item) -> Result:
        return await self.enqueue(item)

    def enqueue(self, item: Item) -> asyncio.Future:
        """submit's first half, for a caller that queues several items at one moment: queued by the
        time this returns, so nothing submitted later runs before them; the future has the outcome."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append((item, future, loop.time()))
        if self.task is None:
            self.task = asyncio.create_task(self._run_waiting())
        return future

    async def _run_waiting(self) -> None:
        batch: list[tuple[Item, asyncio.Future, float]] = []
        try:
            while self.waiting:
                batch, self.waiting = self._next_batch()
                if not batch:
                    continue
                try:
                    outcomes = await self.work([item for item, _, _ in batch])
                    if len(outcomes) != len(batch):
                        raise RuntimeError(f"{len(outcomes)} outcomes for a batch of {len(batch)}")
                except Exception as exc:  # the whole batch failed (the service is down): each caller
                    outcomes = [exc] * len(batch)
                for (_, future, _), outcome in zip(batch, outcomes):
                    if future.done():  # its caller went away; the work stands
                        continue
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
                batch = []
        finally:
            # Cancelled (the loop shuts down) or broken: no caller is left waiting for good.
            for _, future, _ in batch + self.waiting:
                future.cancel()
            self.waiting = []
            self.task = None

    def _next_batch(self) -> tuple[list, list]:
        """The next batch and what stays waiting; items past `max_wait` fail here, unrun."""
        batch, rest = self.waiting[: self.max_batch], self.waiting[self.max_batch :]
        if self.max_wait is not None:
            too_old = asyncio.get_running_loop().time() - self.max_wait
            late = [entry for entry in batch if entry[2] < too_old]
            for _, future, _ in late:
                if not future.done():
                    future.set_exception(TimeoutError(f"waited over {self.max_wait} s for its batch"))
            batch = [entry for entry in batch if entry[2] >= too_old]
        return batch, rest


def per_loop(make: Callable[[], Batcher]) -> Callable[[], Batcher]:
    """A function returning the running loop's Batcher, made by `make` on first use (a batcher's
    futures and task belong to one loop; the server has one, tests several)."""
    batchers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Batcher]" = weakref.WeakKeyDictionary()

    def of_this_loop() -> Batcher:
        loop = asyncio.get_running_loop()
        batcher = batchers.get(loop)
        if batcher is None:
            batcher = batchers[loop] = make()
        return batcher

    return of_this_loop
