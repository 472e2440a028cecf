"""Per-process fan-out: one channel-layer subscription per group per process, however many local
sockets listen to it.

channels gives every socket its own channel: each event is queued once per socket and wakes each
socket through channels' `await_many_dispatch` (a new task and an `asyncio.wait` per event per
socket), and the process holds one subscription per socket per group. Here the process holds one
channel; the first local listener of a group subscribes it, the last one unsubscribes it. Each
event arrives once per process and is handed, in arrival order, to the inbox of every local
listener of its group (events carry their group: chat.events adds it). A listener's inbox is
drained by that listener alone, so a slow socket holds up nobody else.

Revocations of whole accounts arrive on one group for all accounts (chat.events.ACCOUNTS_GROUP),
which the process subscribes with its first socket and drops with its last; each goes to the
process's listeners of that account only.

When the channel layer's subscription connection comes back after Redis went away (its
RESUBSCRIBED event), whatever was published in between is lost, revocations among it. Before
anything published since goes out, the process re-runs the membership rule for all its sockets
(chat.recheck): those that lost access meanwhile close first, and the others read what they
missed from the store; one more round follows once the new subscriptions surely hold. Joins are
lost the same way: each user stream is told (RESUBSCRIBED on its user's group) and reads which
conversations it should carry.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from channels.layers import get_channel_layer

from chat import events, metrics, recheck
from chat.channel_layer import RESUBSCRIBED

logger = logging.getLogger(__name__)

# After a failed receive (the channel layer's Redis is restarting), wait this long before the next.
RECEIVE_RETRY_SECONDS = 0.5
# A re-check after resubscribing that fails (the database is away too) is tried this many times,
# RECEIVE_RETRY_SECONDS apart, while deliveries wait; then they go on, and the periodic round
# (CHAT_MEMBERSHIP_RECHECK) is the backstop.
RESUBSCRIBED_RECHECK_ATTEMPTS = 3


class Listener(Protocol):
    def feed(self, event: dict[str, Any]) -> None:
        """Take one event; must not block (queue it and return)."""


class Fanout:
    """The fan-out of one process (one event loop); get it with `get_fanout()`."""

    def __init__(self) -> None:
        self.layer = get_channel_layer()
        self.channel: str | None = None
        self.listeners: dict[str, set[Listener]] = {}
        # The local listeners of each account (its user id, as account events carry it).
        self.accounts: dict[str, set[Listener]] = {}
        self._account_router = _AccountRouter(self.accounts)
        self._changes = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._rechecking_later: asyncio.Task | None = None

    async def subscribe(self, group: str, listener: Listener) -> None:
        """Deliver the group's events to `listener` from now on. Raises when the channel layer
        cannot subscribe (the caller refuses the socket: it would miss live events)."""
        async with self._changes:
            if self.channel is None:
                self.channel = await self.layer.new_channel()
                self._task = asyncio.create_task(self._receive_forever())
            listeners = self.listeners.get(group)
            if listeners is None:
                await events.retry_once(lambda: self.layer.group_add(group, self.channel))
                listeners = self.listeners[group] = set()
                metrics.redis_subscription_active.inc()
            listeners.add(listener)

    async def watch_account(self, user_id: object, listener: Listener) -> None:
        """Deliver the revocations of this account to `listener` from now on. Raises as subscribe."""
        if events.ACCOUNTS_GROUP not in self.listeners:
            await self.subscribe(events.ACCOUNTS_GROUP, self._account_router)
        self.accounts.setdefault(str(user_id), set()).add(listener)

    async def unwatch_account(self, user_id: object, listener: Listener) -> None:
        key = str(user_id)
        listeners = self.accounts.get(key)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self.accounts[key]
        if self.accounts:
            return
        async with self._changes:
            # Again under the lock: a socket may have watched an account meanwhile. (watch_account
            # adds to `accounts` without the lock while the group is subscribed; _drop removes the
            # group before its first await, so a later watch_account subscribes it again.)
            if not self.accounts and events.ACCOUNTS_GROUP in self.listeners:
                await self._drop(events.ACCOUNTS_GROUP)

    async def unsubscribe(self, group: str, listener: Listener) -> None:
        async with self._changes:
            listeners = self.listeners.get(group)
            if listeners is None or listener not in listeners:
                return
            listeners.discard(listener)
            if not listeners:
                await self._drop(group)

    async def _drop(self, group: str) -> None:
        """The last local listener of the group is gone (under the lock)."""
        del self.listeners[group]
        metrics.redis_subscription_active.dec()
        try:
            await self.layer.group_discard(group, self.channel)
        except Exception:  # the layer drops its local membership all the same
            logger.warning("fan-out: group_discard of %s failed", group, exc_info=True)

    async def _receive_forever(self) -> None:
        while True:
            try:
                event = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("fan-out: receive failed; retrying", exc_info=True)
                await asyncio.sleep(RECEIVE_RETRY_SECONDS)
                continue
            if event.get("type") == RESUBSCRIBED:
                await self._after_resubscribing()
                continue
            for listener in tuple(self.listeners.get(event.get("group"), ())):
                try:
                    listener.feed(event)
                except Exception:
                    metrics.broadcast_panic.inc()
                    logger.exception("fan-out: a listener refused an event")

    async def _after_resubscribing(self) -> None:
        metrics.redis_resubscribed.inc()
        await self._recheck_after_resubscribing()
        # Redis takes the subscriptions a moment after they were asked for: what was published
        # in that moment (a revocation among it) is found by one more round once they surely hold.
        self._rechecking_later = asyncio.create_task(self._recheck_later())
        for group, listeners in tuple(self.listeners.items()):
            if group.startswith(events.USER_GROUP_PREFIX):
                for listener in tuple(listeners):
                    try:
                        listener.feed({"type": RESUBSCRIBED, "group": group})
                    except Exception:
                        metrics.broadcast_panic.inc()
                        logger.exception("fan-out: a listener refused an event")

    async def _recheck_later(self) -> None:
        await asyncio.sleep(recheck.SETTLE_SECONDS)
        try:
            await recheck.recheck_once()
        except Exception:  # the periodic round is the backstop
            logger.warning("fan-out: the second re-check after resubscribing failed", exc_info=True)

    async def _recheck_after_resubscribing(self) -> None:
        for attempt in range(1, RESUBSCRIBED_RECHECK_ATTEMPTS + 1):
            try:
                closed = await recheck.recheck_once()
            except Exception:
                logger.warning("fan-out: re-check after resubscribing failed (attempt %d)", attempt, exc_info=True)
                if attempt < RESUBSCRIBED_RECHECK_ATTEMPTS:
                    await asyncio.sleep(RECEIVE_RETRY_SECONDS)
            else:
                logger.info("fan-out: resubscribed; the re-check closed %d sockets", closed)
                return
        logger.error("fan-out: resubscribed without a re-check; revocations lost meanwhile wait for the periodic one")


class _AccountRouter:
    """The fan-out's own listener of the accounts group: each event to that account's listeners."""

    def __init__(self, accounts: dict[str, set[Listener]]) -> None:
        self.accounts = accounts

    def feed(self, event: dict[str, Any]) -> None:
        for listener in tuple(self.accounts.get(event.get("user_id"), ())):
            try:
                listener.feed(event)
            except Exception:  # (one socket's failure must not keep the revocation from the others)
                metrics.broadcast_panic.inc()
                logger.exception("fan-out: a listener refused an account event")


_fanouts: dict[asyncio.AbstractEventLoop, Fanout] = {}


def get_fanout() -> Fanout:
    """This event loop's fan-out (one per process in the server; tests run several loops)."""
    loop = asyncio.get_running_loop()
    fanout = _fanouts.get(loop)
    if fanout is None or fanout.layer is not get_channel_layer():
        fanout = _fanouts[loop] = Fanout()
    return fanout
