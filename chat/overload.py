"""Load shedding: refuse new WebSocket sends while this process cannot keep up.

Past a process's capacity, accepting more sends only lengthens its queues: sends wait for a worker
thread (behind the database and the message store), deliveries and acks wait for the event loop,
and latency and memory grow without bound (tens of seconds in docs/performance.md) for everyone on
the process. So a new `message.send` is answered with an `unavailable` error frame instead
(counted in chat_message_shed_total) while either
- CHAT_MAX_SENDS_IN_FLIGHT sends of this process are already accepted and not yet acknowledged, or
- the event loop runs late by more than CHAT_MAX_LOOP_LAG (smoothed).
The client retries with the same client_message_id; deliveries, acks and everything already
accepted go on.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from django.conf import settings

# How often the loop is probed, and how fast the estimate follows it (an exponentially weighted
# average over about a second): one late tick (a GC pause, a big frame) does not shed load.
PROBE_SECONDS = 0.05
SMOOTHING = 0.05


class LoopLag:
    """How late this event loop runs a timer, smoothed; started by the first connection."""

    def __init__(self) -> None:
        self.lag = 0.0
        self._tasks: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        task = self._tasks.get(loop)
        if task is None or task.done():
            self._tasks[loop] = loop.create_task(self._probe(loop))

    async def _probe(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            planned = loop.time() + PROBE_SECONDS
            await asyncio.sleep(PROBE_SECONDS)
            self.observe(max(loop.time() - planned, 0.0))

    def observe(self, late: float) -> None:
        self.lag += SMOOTHING * (late - self.lag)

    def overloaded(self) -> bool:
        limit = settings.CHAT_MAX_LOOP_LAG
        return limit > 0 and self.lag > limit


loop_lag = LoopLag()


class SendsInFlight:
    """Sends of this process accepted and not yet acknowledged."""

    def __init__(self) -> None:
        self.count = 0

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1

    def overloaded(self) -> bool:
        return self.count >= settings.CHAT_MAX_SENDS_IN_FLIGHT


sends_in_flight = SendsInFlight()


def overloaded() -> bool:
    return sends_in_flight.overloaded() or loop_lag.overloaded()
