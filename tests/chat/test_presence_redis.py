"""Presence across processes on a real Redis: entries, devices, and users whose process died."""
import asyncio
import uuid

import pytest

from chat.presence import RedisPresence
from tests.services import REDIS_URL, redis_available, require


@pytest.fixture
def presence():
    require("Redis", redis_available())
    return RedisPresence(REDIS_URL, ttl=0.5)


async def test_devices_and_leaving(presence):
    conversation, user = uuid.uuid4(), uuid.uuid4()
    assert await presence.join(conversation, user, "phone") is True
    assert await presence.join(conversation, user, "laptop") is False
    assert await presence.online(conversation) == {user}
    assert await presence.leave(conversation, user, "phone") is False
    assert await presence.leave(conversation, user, "laptop") is True
    assert await presence.online(conversation) == set()


async def test_users_of_a_dead_process_expire_and_are_announced_once(presence):
    conversation, alive, dead = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await presence.join(conversation, alive, "alive-socket")
    await presence.join(conversation, dead, "socket-on-a-process-that-died")
    await asyncio.sleep(0.3)
    assert await presence.refresh(conversation, alive, "alive-socket") == []
    await asyncio.sleep(0.3)  # the dead process never refreshed: its entry expired
    assert await presence.online(conversation) == {alive}
    assert await presence.refresh(conversation, alive, "alive-socket") == [dead]
    assert await presence.refresh(conversation, alive, "alive-socket") == []  # announced once
    assert await presence.join(conversation, dead, "reconnected") is True
