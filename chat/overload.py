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
import weakref
from collections.abc import Iterator

from django.conf import settings

# How often the loop is probed, and how fast the estimate follows it (an exponentially weighted
# average over about a second): one late tick (a GC pause, a big frame: anything shorter than
# CHAT_MAX_LOOP_LAG / SMOOTHING, 5 s by default) does not shed load. Each probe wakes an idle
# process up, which is most of its cost: 20 probes a second (a task's sleeps) cost an idle worker
# 0.65-0.75 % of a core, 10 (timer callbacks) 0.22-0.33 % (bench/loop_probe.py).
PROBE_SECONDS = 0.1
SMOOTHING = 0.1


class LoopLag:
    """How late this event loop runs a timer, smoothed; started by the first connection."""

    def __init__(self) -> None:
        self.lag = 0.0
        self._probing: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if loop not in self._probing:
            self._probing.add(loop)
            self._next_probe(loop)

    # A timer callback, not a task sleeping in a loop: a task's tick costs a future and a step of
    # the task besides the timer.
    def _next_probe(self, loop: asyncio.AbstractEventLoop) -> None:
        planned = loop.time() + PROBE_SECONDS
        loop.call_at(planned, self._probe, loop, planned)

    def _probe(self, loop: asyncio.AbstractEventLoop, planned: float) -> None:
        self._next_probe(loop)  # first: nothing after it can end the probing
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
