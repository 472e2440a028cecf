"""Who is online in a conversation, across processes.

Each open socket holds an entry "<user hex>:<channel name>" in a Redis sorted set per conversation,
scored by when it expires; one task per process refreshes all of its sockets' entries, one script
per conversation, in the same pipelines as the joins and leaves. A user is online while any of
their entries is live. When a process dies its entries stop being refreshed and expire, and the
next refresh by any other process holding a socket on the conversation announces those users
offline. Without Redis the same rules run in this process (one process: its death takes every
socket with it).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from functools import cache
from typing import NamedTuple

from django.conf import settings

from core.batching import Batcher, per_loop

logger = logging.getLogger(__name__)

ENTRY_TTL_SECONDS = 60
REFRESH_SECONDS = 20
# How long a socket closed by its server's shutdown keeps its user online: the client reconnects at
# once after 1001 (with backoff), well within it, and is then not announced again.
SHUTDOWN_GRACE_SECONDS = 30
SCRIPT_MAX_WAIT_SECONDS = 2.0  # the client's socket timeout (1 s), once retried

# KEYS[1] conversation set; ARGV: member, expires, now, user prefix, key ttl ms.
# Returns 1 when this entry brings the user online (no other live entry of theirs), else 0, followed
# by the other live entries: who else is online, in the same round trip.
_JOIN = """
local live = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[3], '+inf')
local online = false
for _, m in ipairs(live) do
  if m ~= ARGV[1] and string.sub(m, 1, #ARGV[4]) == ARGV[4] then online = true break end
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
table.insert(live, 1, online and 0 or 1)
return live
"""

# KEYS[1]; ARGV: member, now, user prefix. Returns 1 when the user has no live entry left.
_LEAVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
local live = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[2], '+inf')
for _, m in ipairs(live) do
  if string.sub(m, 1, #ARGV[3]) == ARGV[3] then return 0 end
end
return 1
"""

# KEYS[1]; ARGV: expires, now, key ttl ms, then the members this process holds. Refreshes them
# (re-adding any that Redis lost, e.g. in a restart), drops expired entries and returns the users (hex) who have no live entry left.
_SWEEP = """
for i = 4, #ARGV do redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2])
if #expired == 0 then return {} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2])
local live = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[2], '+inf')
local alive = {}
for _, m in ipairs(live) do alive[string.sub(m, 1, 32)] = true end
local gone, seen = {}, {}
for _, m in ipairs(expired) do
  local user = string.sub(m, 1, 32)
  if not alive[user] and not seen[user] then seen[user] = true table.insert(gone, user) end
end
return gone
"""


# KEYS[1]; ARGV: member, expires. The entry lapses at `expires`, if it is still there and would
# not lapse sooner: an entry past its time that no sweep has removed yet stays expired.
_LAPSE = """
redis.call('ZADD', KEYS[1], 'XX', 'LT', ARGV[2], ARGV[1])
return 0
"""


class Joined(NamedTuple):
    announce: bool  # this entry brings its user online: no other live entry of theirs
    online: set[uuid.UUID]  # who is online in the conversation now, the joining user included


def _user_of(member: bytes | str) -> uuid.UUID:
    return uuid.UUID((member.decode() if isinstance(member, bytes) else member)[:32])


def _key(conversation_id: uuid.UUID) -> str:
    return f"chat:presence:{conversation_id.hex}"


def _member(user_id: uuid.UUID, channel: str) -> str:
    return f"{user_id.hex}:{channel}"


class RedisPresence:
    def __init__(
        self,
        url: str,
        ttl: float = ENTRY_TTL_SECONDS,
        refresh_every: float = REFRESH_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        # Wall-clock seconds: every process scores entries on one shared scale. Whether an entry
        # is live is decided by comparing its score with this "now", which the scripts take as an
        # argument; only the whole key's safety-net PEXPIRE runs on Redis's own clock.
        self.clock = clock
        self.ttl = ttl
        self.refresh_every = refresh_every
        # The entries of this process's open sockets, by conversation.
        self._held: dict[uuid.UUID, set[str]] = defaultdict(set)
        self._clients: dict[asyncio.AbstractEventLoop, object] = {}
        self._refreshers: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}
        # Joins and leaves: when thousands of sockets connect at once (a server restart), theirs go
        # in pipelines of many, each in the order it was asked, instead of a round trip and a
        # pool checkout each. A call waits for its batch at most as long as one Redis call may take
        # with its retry, so an outage costs each caller a bounded wait, not the queue's.
        self._scripts = per_loop(lambda: Batcher(self._run_scripts, max_batch=256, max_wait=SCRIPT_MAX_WAIT_SECONDS))

    def _client(self):
        # redis.asyncio clients belong to the event loop they were made on.
        loop = asyncio.get_running_loop()
        if loop not in self._clients:
            import redis.asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # A blocking pool: when hundreds of sockets close at once, their leaves wait for a
            # connection instead of failing with "Too many connections". One retry on a new
            # connection: after a Redis restart every pooled connection is dead, and each would
            # otherwise fail the first call that takes it (a join lost: a user never announced).
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                self.url, max_connections=32, timeout=2, socket_timeout=1, socket_connect_timeout=1,
                retry=Retry(NoBackoff(), 1),
            )
            self._clients[loop] = redis.asyncio.Redis(connection_pool=pool)
        return self._clients[loop]

    async def join(self, conversation_id: uuid.UUID, user_id: uuid.UUID, channel: str) -> Joined:
        member = _member(user_id, channel)
        self._held[conversation_id].add(member)
        self._start_refresher()
        now = self.clock()
        first, *live = await self._scripts().submit(
            (_JOIN, _key(conversation_id), (member, now + self.ttl, now, f"{user_id.hex}:", int(self.ttl * 2000)))
        )
        return Joined(first == 1, {_user_of(m) for m in live} | {user_id})

    async def leave(self, conversation_id: uuid.UUID, user_id: uuid.UUID, channel: str) -> bool:
        member = self._unhold(conversation_id, user_id, channel)
        result = await self._scripts().submit((_LEAVE, _key(conversation_id), (member, self.clock(), f"{user_id.hex}:")))
        return result == 1

    async def leave_on_shutdown(self, conversation_id: uuid.UUID, user_id: uuid.UUID, channel: str) -> None:
        """A socket its server's shutdown closed: the entry is no longer refreshed and lapses
        SHUTDOWN_GRACE_SECONDS from now, and nobody is told anything now. A client that reconnects
        meanwhile finds its user still online (not announced again); one that does not is
        announced offline by the next refresh after that, as the users of a dead process are."""
        member = self._unhold(conversation_id, user_id, channel)
        await self._scripts().submit((_LAPSE, _key(conversation_id), (member, self.clock() + SHUTDOWN_GRACE_SECONDS)))

    def _unhold(self, conversation_id: uuid.UUID, user_id: uuid.UUID, channel: str) -> str:
        """Stop refreshing a socket's entry; its member name."""
        member = _member(user_id, channel)
        held = self._held.get(conversation_id, set())
        held.discard(member)
        if not held:
            self._held.pop(conversation_id, None)
        return member

    async def _run_scripts(self, calls: list[tuple[str, str, tuple]]) -> list:
        """One pipeline for a batch of (script, key, arguments): each call's reply, or its error."""
        pipeline = self._client().pipeline(transaction=False)
        for script, key, arguments in calls:
            pipeline.eval(script, 1, key, *arguments)
        return await pipeline.execute(raise_on_error=False)

    async def refresh(self) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """Refresh every entry this process holds; (conversation, user) for each user found gone.
        The sweeps share the joins' and leaves' pipelines (a round trip and its awaits each cost
        about 0.36 ms of CPU per conversation, a seventh of an idle process's CPU), and so run in
        order with them: a sweep re-adds the members it was given, and a leave asked after it
        must not be undone by it. A sweep that fails (Redis away, a bad key) costs only its own
        conversation, until the next refresh."""
        now = self.clock()
        held = list(self._held.items())
        scripts = self._scripts()
        # Queued as their members are read, with no await in between (a leave could come first).
        sweeps = [
            scripts.enqueue((_SWEEP, _key(conversation_id), (now + self.ttl, now, int(self.ttl * 2000), *members)))
            for conversation_id, members in held
        ]
        outcomes = await asyncio.gather(*sweeps, return_exceptions=True)
        gone, failed = [], 0
        for (conversation_id, _), users in zip(held, outcomes, strict=True):
            if isinstance(users, BaseException):
                failed += 1
                continue
            gone += [(conversation_id, uuid.UUID(u.decode() if isinstance(u, bytes) else u)) for u in users]
        if failed:
            logger.warning("presence: refreshing %d of %d conversations failed", failed, len(held))
        return gone

    async def online(self, conversation_id: uuid.UUID) -> set[uuid.UUID]:
        members = await self._client().zrangebyscore(_key(conversation_id), self.clock(), "+inf")
        return {_user_of(m) for m in members}

    def _start_refresher(self) -> None:
        loop = asyncio.get_running_loop()
        task = self._refreshers.get(loop)
        if task is None or task.done():
            self._refreshers[loop] = loop.create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        from chat import events

        while self._held:
            await asyncio.sleep(self.refresh_every)
            try:
                for conversation_id, user_id in await self.refresh():
                    await events.presence(conversation_id, user_id, online=False)
            except Exception:  # Redis down: entries may lapse; the next refresh re-adds nothing
                logger.warning("presence: refresh failed", exc_info=True)


class LocalPresence:
    """The same contract within one process."""

    def __init__(self) -> None:
        self._channels: dict[uuid.UUID, dict[uuid.UUID, set[str]]] = defaultdict(lambda: defaultdict(set))

    async def join(self, conversation_id: uuid.UUID, user_id: uuid.UUID, channel: str) -> Joined:
        channels = self._channels[conversation_id][user_id]
        channels.add(channel)
        return Joined(len(channels) == 1, set(self._channels[conversation_id]))

    async def leave(self, conversation_id: uuid.UUID, user_id: uuid.UUID, channel: str) -> bool:
        users = self._channels[conversation_id]
        users[user_id].discard(channel)
        if users[user_id]:
            return False
        del users[user_id]
        if not users:
            del self._channels[conversation_id]
        return True

    async def leave_on_shutdown(self, conversation_id: uuid.UUID, user_id: uuid.UUID, channel: str) -> None:
        """(In one process, a shutdown takes every socket and this state with it.)"""
        await self.leave(conversation_id, user_id, channel)

    async def online(self, conversation_id: uuid.UUID) -> set[uuid.UUID]:
        return set(self._channels.get(conversation_id, {}))


@cache
def get_presence() -> RedisPresence | LocalPresence:
    return RedisPresence(settings.REDIS_URL) if settings.REDIS_URL else LocalPresence()
