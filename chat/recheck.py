"""The periodic membership re-check of open conversation sockets (SPEC section 5).

Revocations reach a socket as `membership.revoked` events, published on commit. A change that
announces nothing (a ban written from `manage.py shell` with signals bypassed, a cron job, a
process whose publish failed for good) would leave the socket reading forever, so every
CHAT_MEMBERSHIP_RECHECK seconds one task per process re-runs the membership rule for all of the
process's open sockets, BATCH_SIZE sockets per query (chat.access.allowed_participations), and
closes with 4403 those that lost access. The same query reads each conversation's committed
last_seq and last_change: a socket that is behind (a publish was lost and no later one revealed
the gap) reads the rest from the store, so a lost publish is delivered within the interval too.
What is watched is one socket's view of one conversation: the conversation socket itself, or one
conversation of a user stream.

A socket that has just subscribed gets one early look at where its conversation stands (`settle`):
a subscription takes effect when Redis has processed it, which channels-redis does not wait for,
so a message published in between and committed after the handshake's read would otherwise wait
for a later message or the periodic round. The sockets that subscribed within a moment of each
other share that look's query, as the periodic round's sockets do: a reconnect storm's thousands
of sockets cost a few queries, not a thread hop and a query each. That look only catches up: a
socket it finds without access is left to its revocation's event, which is on its way (a user
stream delivers a left conversation up to where the leave's event says), and to the periodic round.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Protocol

from django.conf import settings

from chat import metrics
from chat.access import allowed_participations
from core.threads import in_thread

logger = logging.getLogger(__name__)

BATCH_SIZE = 500  # participant ids per query (SQLite's limit on bound variables is far above)
# A new subscription is surely live this long after it was made (Redis processes it in far less).
SETTLE_SECONDS = 1.0
# A settle look that is due waits this much longer for the next sockets' to share its query.
SETTLE_GATHER_SECONDS = 0.2


class Watched(Protocol):
    async def revoke(self) -> None: ...

    def catch_up(self, last_seq: int, last_change: int) -> None:
        """The conversation has committed up to these: deliver what this socket lacks."""


# Open sockets of this process -> the participation each was authorized by.
_sockets: dict[Watched, int] = {}
_task: asyncio.Task | None = None
# Sockets waiting for their settle look, with when it is due (loop time), in that order.
_settling: deque[tuple[float, Watched]] = deque()
_settle_task: asyncio.Task | None = None


def watch(socket: Watched, participant_id: int) -> None:
    """Re-check `socket`'s participation from now on; starts the process's task if needed."""
    global _task
    _sockets[socket] = participant_id
    loop = asyncio.get_running_loop()
    if _task is None or _task.done() or _task.get_loop() is not loop:
        _task = loop.create_task(_run(), name="chat-membership-recheck")


def unwatch(socket: Watched) -> None:
    _sockets.pop(socket, None)


def settle(socket: Watched) -> None:
    """One early catch-up of a watched socket whose subscription was just made, SETTLE_SECONDS from
    now (at most SETTLE_GATHER_SECONDS later), together with every other socket's due by then. (A
    socket no longer watched by then, closed meanwhile, is skipped.)"""
    global _settle_task
    loop = asyncio.get_running_loop()
    _settling.append((loop.time() + SETTLE_SECONDS, socket))
    if _settle_task is None or _settle_task.done() or _settle_task.get_loop() is not loop:
        _settle_task = loop.create_task(_settle_forever(), name="chat-settle-look")


async def _settle_forever() -> None:
    loop = asyncio.get_running_loop()
    while _settling:
        await asyncio.sleep(max(0.0, _settling[0][0] - loop.time()) + SETTLE_GATHER_SECONDS)
        now = loop.time()
        due = []
        while _settling and _settling[0][0] <= now:
            socket = _settling.popleft()[1]
            if socket in _sockets:  # (not closed meanwhile)
                due.append((socket, _sockets[socket]))
        try:
            await _check(due, revoke=False)
        except Exception:  # the database may be away: the periodic round is the backstop
            logger.exception("settle look failed")


async def _run() -> None:
    while _sockets:
        await asyncio.sleep(settings.CHAT_MEMBERSHIP_RECHECK)
        try:
            await recheck_once()
        except Exception:  # the database may be away: the next round tries again
            logger.exception("membership re-check failed")


async def recheck_once() -> int:
    """Re-run the rule for every watched socket; close those that lost access. Returns how many."""
    return await _check(list(_sockets.items()))


async def _check(sockets: list[tuple[Watched, int]], revoke: bool = True) -> int:
    """The rule for these (socket, participation id) pairs, BATCH_SIZE per query: those that lost
    access are closed if `revoke` (how many is returned), the others caught up to what is committed."""
    closed = 0
    for start in range(0, len(sockets), BATCH_SIZE):
        batch = sockets[start : start + BATCH_SIZE]
        allowed = await in_thread(allowed_participations)(participant_ids={pid for _, pid in batch})
        for socket, participant_id in batch:
            if socket not in _sockets:
                continue
            if participant_id not in allowed:
                if not revoke:
                    continue
                unwatch(socket)
                closed += 1
                metrics.membership_recheck_closed.inc()
                await socket.revoke()
            else:
                socket.catch_up(*allowed[participant_id])
    return closed
