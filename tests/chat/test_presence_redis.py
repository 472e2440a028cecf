"""Presence across processes on a real Redis: entries, devices, and users whose process died."""
import asyncio
import uuid

import pytest

from chat.presence import RedisPresence
from tests.services import REDIS_URL, redis_available, require


@pytest.fixture
def make_presence():
    """One RedisPresence per simulated process, with a short entry lifetime."""
    require("Redis", redis_available())
    return lambda: RedisPresence(REDIS_URL, ttl=0.5, refresh_every=3600)


async def test_devices_and_leaving(make_presence):
    presence = make_presence()
    conversation, user = uuid.uuid4(), uuid.uuid4()
    assert await presence.join(conversation, user, "phone") is True
    assert await presence.join(conversation, user, "laptop") is False
    assert await presence.online(conversation) == {user}
    assert await presence.leave(conversation, user, "phone") is False
    assert await presence.leave(conversation, user, "laptop") is True
    assert await presence.online(conversation) == set()


async def test_users_of_a_dead_process_expire_and_are_announced_once(make_presence):
    alive_process, dead_process = make_presence(), make_presence()
    conversation, alive, dead = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await alive_process.join(conversation, alive, "alive-socket")
    await dead_process.join(conversation, dead, "socket-on-a-process-that-died")
    await asyncio.sleep(0.3)
    assert await alive_process.refresh() == []  # one call refreshes everything this process holds
    await asyncio.sleep(0.3)  # the dead process never refreshed: its entry expired
    assert await alive_process.online(conversation) == {alive}
    assert await alive_process.refresh() == [(conversation, dead)]
    assert await alive_process.refresh() == []  # announced once
    assert await dead_process.join(conversation, dead, "reconnected") is True


async def test_refresh_covers_every_conversation_and_socket_held(make_presence):
    presence = make_presence()
    first, second, user = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for conversation in (first, second):
        await presence.join(conversation, user, "socket-a")
        await presence.join(conversation, user, "socket-b")
    for _ in range(3):
        await asyncio.sleep(0.3)
        assert await presence.refresh() == []
    assert await presence.online(first) == await presence.online(second) == {user}
