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
    def __init__(self, work: Work, *, max_batch: int) -> None:
        self.work = work
        self.max_batch = max_batch
        self.waiting: list[tuple[Item, asyncio.Future]] = []
        self.task: asyncio.Task | None = None

    async def submit(self, item: Item) -> Result:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((item, future))
        if self.task is None:
            self.task = asyncio.create_task(self._run_waiting())
        return await future

    async def _run_waiting(self) -> None:
        batch: list[tuple[Item, asyncio.Future]] = []
        try:
            while self.waiting:
                batch, self.waiting = self.waiting[: self.max_batch], self.waiting[self.max_batch :]
                try:
                    outcomes = await self.work([item for item, _ in batch])
                except Exception as exc:  # the whole batch failed (the service is down): each caller's
                    outcomes = [exc] * len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():  # its caller went away; the work stands
                        continue
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        except asyncio.CancelledError:  # the loop is shutting down
            for _, future in batch + self.waiting:
                future.cancel()
            self.waiting = []
            raise
        finally:
            self.task = None


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
