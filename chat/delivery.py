"""In-order, exactly-once delivery of one conversation's messages to one connection (SPEC section 5).

Messages reach a connection over the channel layer, where a publish may be lost, overtaken or
repeated (replay overlapping live delivery). `SeqGate` lets each seq out once, in strictly
increasing order: it drops what was already let out, holds early arrivals, and when a gap does not
close by itself within GAP_WAIT_SECONDS it reads the missing range from the store, which has every
message. A committed seq that the store still cannot return after GAP_GIVE_UP_SECONDS (a
lagging or failing store; a failed send burns no seq) is skipped, so one loss cannot stall a
socket for good.

It knows nothing of Django or channels: the consumer hands it `emit` (send a message to the
client) and `fetch` (read a range from the store), and tests hand it a clock and a sleep that they
drive themselves.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from chat import metrics

logger = logging.getLogger(__name__)

# How long an early arrival waits for the seqs before it before they are read from the store.
GAP_WAIT_SECONDS = 0.25
# How long a seq the store cannot return is waited for before it is skipped (store loss or lag).
GAP_GIVE_UP_SECONDS = 5.0

Emit = Callable[[dict], Awaitable[None]]
# (after_seq, before_seq, limit) -> the stored messages strictly between them, ascending seq, from
# the lowest on; the page may stop early (bounded in bytes) but never skips one.
Fetch = Callable[[int, int, int], Awaitable[list[dict]]]


class SeqGate:
    """One connection's view of one conversation's seqs (or change numbers: `key`); `next_seq` is
    the next one it lets out."""

    def __init__(
        self,
        *,
        emit: Emit,
        fetch: Fetch,
        next_seq: int = 1,
        max_fetch: int = 1000,
        wait: float = GAP_WAIT_SECONDS,
        give_up: float = GAP_GIVE_UP_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        name: object = "",
        key: str = "seq",
    ) -> None:
        self._emit_message = emit
        self._fetch = fetch
        self._next_seq = next_seq
        self._max_fetch = max_fetch
        self._wait = wait
        self._give_up = give_up
        self._clock = clock
        self._sleep = sleep
        self._name = name  # for logs: the conversation
        # What is numbered: "seq" for messages; "change" for a conversation's changes (SPEC 4.1),
        # which get the same guarantee by change number (updates and deletes: messages only).
        self._key = key
        self._pending: dict[int, dict] = {}
        # Held while letting messages out, so a live arrival and a gap fill never interleave.
        self._lock = asyncio.Lock()
        self._gap_task: asyncio.Task | None = None
        self._closed = False

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def pending_seqs(self) -> list[int]:
        return sorted(self._pending)

    @property
    def gap_task(self) -> asyncio.Task | None:
        return self._gap_task

    def take_next(self, seq: int) -> bool:
        """Let `seq` out at once, without the event loop's help, if it is simply the next one:
        nothing held, nothing being let out. The caller then writes it (the consumer's fast path);
        False means: use `deliver`."""
        if seq != self._next_seq or self._pending or self._closed or self._lock.locked():
            return False
        self._next_seq = seq + 1
        return True

    async def deliver(self, message: dict) -> None:
        """Let `message` out now if it is the next seq (and whatever it unblocks), hold it if it is
        early, drop it if it was let out or is held already."""
        async with self._lock:
            seq = message[self._key]
            if self._closed or seq < self._next_seq or seq in self._pending:
                metrics.broadcast_dropped.inc()
                return
            if seq > self._next_seq:
                self._pending[seq] = message
                metrics.broadcast_channel_length.inc()
                if self._gap_task is None:
                    self._gap_task = asyncio.create_task(self._fill_gaps())
                return
            await self._emit(message)
            await self._emit_run({})

    async def update(self, message: dict) -> bool:
        """Fold an edit into the held message; False when it is not held (the caller sends the
        change itself)."""
        async with self._lock:
            if message[self._key] not in self._pending:
                return False
            # Not let out yet: it goes out in its place in the seq order, already edited.
            self._pending[message[self._key]] = message
            return True

    async def delete(self, seq: int) -> bool:
        """Turn the held message into its tombstone; False when it is not held."""
        async with self._lock:
            if seq not in self._pending:
                return False
            # It goes out in its place as the tombstone it now is: the client never sees the
            # deleted content.
            tombstone = {**self._pending[seq], "content": "", "metadata": {}, "deleted": True}
            tombstone.pop("content_omitted", None)
            self._pending[seq] = tombstone
            return True

    async def catch_up(self, last_seq: int) -> None:
        """Read from the store what this connection lacks up to `last_seq`, a seq known committed:
        a publish that was lost with no later message to reveal the gap. Live arrivals meanwhile
        are let out or dropped as usual; only seqs below the first held one are read here, the
        gap filler owns the rest."""
        try:
            while not self._closed and self._next_seq <= last_seq:
                upto = min([last_seq + 1, *self._pending])
                if upto <= self._next_seq:
                    return  # the gap filler is on it
                before = self._next_seq
                page = await self._fetch(before - 1, upto, min(upto - before, self._max_fetch))
                async with self._lock:
                    fetched = {m[self._key]: m for m in page if m[self._key] >= self._next_seq and m[self._key] not in self._pending}
                    await self._emit_run(fetched)
                if self._next_seq == before:
                    return  # not in the store (yet): the next re-check looks again
        except Exception:
            metrics.broadcast_panic.inc()
            logger.exception("catch-up failed on conversation %s", self._name)

    async def skip_to(self, next_seq: int) -> None:
        """The client has everything below `next_seq` already (it said so in a resume): let out
        nothing below it, and what is held from it on."""
        async with self._lock:
            if next_seq <= self._next_seq:
                return
            for seq in [seq for seq in self._pending if seq < next_seq]:
                del self._pending[seq]
                metrics.broadcast_channel_length.dec()
            self._next_seq = next_seq
            await self._emit_run({})

    def close(self) -> int:
        """Stop the gap filler and drop what is held; returns how many messages were dropped."""
        self._closed = True
        if self._gap_task is not None:
            self._gap_task.cancel()
            self._gap_task = None
        dropped = len(self._pending)
        metrics.broadcast_channel_length.dec(dropped)
        self._pending.clear()
        return dropped

    async def _emit(self, message: dict) -> None:
        await self._emit_message(message)
        self._next_seq = message[self._key] + 1

    async def _emit_run(self, fetched: dict[int, dict]) -> None:
        """Let out next_seq and its successors for as long as they are held or were fetched."""
        while True:
            if self._next_seq in self._pending:
                metrics.broadcast_channel_length.dec()
                await self._emit(self._pending.pop(self._next_seq))
            elif self._next_seq in fetched:
                metrics.gap_fills.inc()
                await self._emit(fetched.pop(self._next_seq))
            else:
                return

    async def _fill_gaps(self) -> None:
        """While anything is held: wait, read the missing seqs from the store, let them out; skip
        the seqs that stay missing for longer than the give-up time. A failed round is retried."""
        stuck_at, stuck_since = self._next_seq, self._clock()
        try:
            while self._pending:
                await self._sleep(self._wait)
                if not self._pending:
                    break
                try:
                    await self._fill_once(stuck_since)
                except Exception:
                    metrics.broadcast_panic.inc()
                    logger.exception("gap fill failed on conversation %s", self._name)
                if self._next_seq != stuck_at:  # progress: a later gap gets its own full wait
                    stuck_at, stuck_since = self._next_seq, self._clock()
        finally:
            if self._gap_task is asyncio.current_task():
                self._gap_task = None

    async def _fill_once(self, stuck_since: float) -> None:
        upto = min(self._pending)
        page = await self._fetch(
            self._next_seq - 1, upto, min(upto - self._next_seq, self._max_fetch)
        )
        async with self._lock:
            # Live arrivals may have moved on while the store was read; what is held wins (it
            # carries the edits that arrived while it waited).
            fetched = {m[self._key]: m for m in page if m[self._key] >= self._next_seq and m[self._key] not in self._pending}
            before = self._next_seq
            await self._emit_run(fetched)
            # A page may end early (it is bounded in bytes): what it did not reach is not missing.
            # Only a round that made no progress may give up on a seq.
            if self._next_seq != before or self._clock() - stuck_since <= self._give_up:
                return
            while self._pending or fetched:
                lowest = min(self._pending.keys() | fetched.keys())
                logger.warning(
                    "conversation %s: seqs %d..%d are in no store; skipping", self._name, self._next_seq, lowest - 1
                )
                self._next_seq = lowest
                await self._emit_run(fetched)
