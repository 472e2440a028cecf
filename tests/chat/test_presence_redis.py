"""Presence across processes on a real Redis: entries, devices, and users whose process died.

Entry lifetimes are decided by the "now" each call passes to Redis, so these tests move an
injected clock instead of sleeping. Only the whole key's safety-net expiry runs on Redis's own
clock; it is checked by its PTTL, not waited for.
"""
import asyncio
import time
import uuid

import pytest

from chat.presence import SHUTDOWN_GRACE_SECONDS, Joined, RedisPresence
from tests.services import REDIS_URL, redis_available, require

TTL = 60


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def make_presence(clock):
    """One RedisPresence per simulated process, all on the test's clock."""
    require("Redis", redis_available())
    return lambda: RedisPresence(REDIS_URL, ttl=TTL, refresh_every=3600, clock=clock)


async def test_devices_and_leaving(make_presence):
    presence = make_presence()
    conversation, user = uuid.uuid4(), uuid.uuid4()
    assert await presence.join(conversation, user, "phone") == Joined(True, {user})
    assert await presence.join(conversation, user, "laptop") == Joined(False, {user})
    assert await presence.online(conversation) == {user}
    assert await presence.leave(conversation, user, "phone") is False
    assert await presence.leave(conversation, user, "laptop") is True
    assert await presence.online(conversation) == set()


async def test_users_of_a_dead_process_expire_and_are_announced_once(make_presence, clock):
    alive_process, dead_process = make_presence(), make_presence()
    conversation, alive, dead = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await alive_process.join(conversation, alive, "alive-socket")
    await dead_process.join(conversation, dead, "socket-on-a-process-that-died")
    clock.now += TTL * 0.6
    assert await alive_process.refresh() == []  # one call refreshes everything this process holds
    assert await alive_process.online(conversation) == {alive, dead}  # not expired yet
    clock.now += TTL * 0.6  # the dead process never refreshed: its entry expired
    assert await alive_process.online(conversation) == {alive}
    assert await alive_process.refresh() == [(conversation, dead)]
    assert await alive_process.refresh() == []  # announced once
    assert await dead_process.join(conversation, dead, "reconnected") == Joined(True, {alive, dead})


async def test_a_socket_closed_by_its_servers_shutdown_keeps_its_user_online_for_the_grace(make_presence, clock):
    """A restart is no presence change: the user of a socket closed by its server's shutdown stays
    online for SHUTDOWN_GRACE_SECONDS, so its client's reconnect is not announced, and one whose
    client does not come back is announced offline by the next refresh after the grace."""
    watcher_process, restarted, restarted_again = make_presence(), make_presence(), make_presence()
    conversation, watcher, back, gone = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await watcher_process.join(conversation, watcher, "watcher-socket")
    await restarted.join(conversation, back, "back-before-the-restart")
    await restarted.join(conversation, gone, "gone-before-the-restart")
    await restarted.leave_on_shutdown(conversation, back, "back-before-the-restart")
    await restarted.leave_on_shutdown(conversation, gone, "gone-before-the-restart")
    assert await restarted.refresh() == []  # the shut-down process holds (refreshes) neither any more
    clock.now += SHUTDOWN_GRACE_SECONDS - 1
    assert await restarted_again.join(conversation, back, "back-after-the-restart") == Joined(False, {watcher, back, gone})
    assert await watcher_process.refresh() == []  # nobody gone yet
    clock.now += 2  # past the grace: the entries the shutdown left have lapsed
    assert await watcher_process.refresh() == [(conversation, gone)]
    assert await watcher_process.online(conversation) == {watcher, back}
    assert await restarted_again.leave(conversation, back, "back-after-the-restart") is True  # its real leave is announced


async def test_an_expired_entry_of_another_device_does_not_keep_the_user_online(make_presence, clock):
    dead_process, live_process = make_presence(), make_presence()
    conversation, user = uuid.uuid4(), uuid.uuid4()
    await dead_process.join(conversation, user, "phone-on-a-dead-process")
    clock.now += TTL + 1
    assert (await live_process.join(conversation, user, "laptop")).announce  # online again, announced
    assert await live_process.leave(conversation, user, "laptop") is True  # and offline with it


async def test_refresh_covers_every_conversation_and_socket_held(make_presence, clock):
    presence = make_presence()
    first, second, user = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for conversation in (first, second):
        await presence.join(conversation, user, "socket-a")
        await presence.join(conversation, user, "socket-b")
    for _ in range(3):
        clock.now += TTL * 0.6  # three refreshes span well past one lifetime
        assert await presence.refresh() == []
    assert await presence.online(first) == await presence.online(second) == {user}


async def test_refresh_covers_conversations_past_one_pipeline(make_presence, clock):
    live_process, dead_process = make_presence(), make_presence()
    conversations, live, dead = [uuid.uuid4() for _ in range(300)], uuid.uuid4(), uuid.uuid4()
    for conversation in conversations:
        await live_process.join(conversation, live, "live-socket")
        await dead_process.join(conversation, dead, "socket-on-a-process-that-died")
    clock.now += TTL * 0.6
    assert await live_process.refresh() == []
    clock.now += TTL * 0.6  # every live entry was refreshed (in two pipelines); the dead ones lapsed
    assert sorted(await live_process.refresh()) == sorted((conversation, dead) for conversation in conversations)
    for conversation in conversations[:: 50]:
        assert await live_process.online(conversation) == {live}


async def test_a_leave_asked_while_a_refresh_is_under_way_is_not_undone_by_it(make_presence):
    """A sweep re-adds the entries it was given: a leave asked after the sweeps were queued must
    reach Redis after them."""
    presence = make_presence()
    conversations, user = [uuid.uuid4() for _ in range(300)], uuid.uuid4()
    for conversation in conversations:
        await presence.join(conversation, user, "socket")
    refreshing = asyncio.create_task(presence.refresh())
    await asyncio.sleep(0)  # the refresh has queued its sweeps
    leaves = [asyncio.create_task(presence.leave(conversation, user, "socket")) for conversation in conversations]
    await refreshing
    assert all(await asyncio.gather(*leaves))
    for conversation in conversations[:: 50]:
        assert await presence.online(conversation) == set()


async def test_a_failed_sweep_costs_only_its_conversation(make_presence, clock):
    import redis

    live_process, dead_process = make_presence(), make_presence()
    broken, fine, live, dead = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for conversation in (broken, fine):
        await live_process.join(conversation, live, "live-socket")
    await dead_process.join(fine, dead, "socket-on-a-process-that-died")
    redis.Redis.from_url(REDIS_URL).set(f"chat:presence:{broken.hex}", "not a sorted set")  # its sweep fails
    clock.now += TTL + 1
    assert await live_process.refresh() == [(fine, dead)]


async def test_the_shutdown_grace_never_brings_back_an_entry_past_its_time(make_presence, clock):
    """An entry that expired and that no sweep removed yet (a refresh failed, say) stays expired
    when its socket's server shuts down: its user does not reappear online."""
    restarted, other = make_presence(), make_presence()
    conversation, user, watcher = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await restarted.join(conversation, user, "socket")
    clock.now += TTL + 1
    await restarted.leave_on_shutdown(conversation, user, "socket")
    assert await other.join(conversation, watcher, "watcher") == Joined(True, {watcher})


async def test_a_join_says_who_else_is_online_in_the_same_call(make_presence, clock):
    first_process, second_process = make_presence(), make_presence()
    conversation, alice, bob, gone = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await first_process.join(conversation, gone, "socket-that-expires")
    clock.now += TTL + 1
    await first_process.join(conversation, alice, "alice-phone")
    # Another process's entries count, an expired one does not, and the joining user is included.
    assert await second_process.join(conversation, bob, "bob-laptop") == Joined(True, {alice, bob})
    assert await first_process.join(conversation, alice, "alice-laptop") == Joined(False, {alice, bob})


async def test_the_key_expires_on_its_own_when_nobody_refreshes_it(make_presence):
    """The safety net for a conversation whose every process died: Redis's own TTL, two lifetimes."""
    import redis

    presence = make_presence()
    conversation = uuid.uuid4()
    await presence.join(conversation, uuid.uuid4(), "socket")
    ttl_ms = redis.Redis.from_url(REDIS_URL).pttl(f"chat:presence:{conversation.hex}")
    assert TTL * 1000 < ttl_ms <= TTL * 2000


async def test_joins_and_leaves_at_the_same_moment_go_in_order(make_presence):
    """A reconnect storm's joins share pipelines: each still sees who joined before it, and a leave
    asked after a join is never applied before it."""
    presence = make_presence()
    conversation = uuid.uuid4()
    users = [uuid.uuid4() for _ in range(300)]  # more than one pipeline's worth
    joined = await asyncio.gather(*(presence.join(conversation, user, f"socket-{i}") for i, user in enumerate(users)))
    assert all(result.announce for result in joined)
    for i, result in enumerate(joined):
        assert set(users[: i + 1]) <= result.online  # everyone asked before it, and itself
    assert await presence.online(conversation) == set(users)

    same_device = uuid.uuid4()
    join, leave = await asyncio.gather(
        presence.join(conversation, same_device, "tablet"), presence.leave(conversation, same_device, "tablet")
    )
    assert join.announce and leave is True
    assert same_device not in await presence.online(conversation)
    left = await asyncio.gather(*(presence.leave(conversation, user, f"socket-{i}") for i, user in enumerate(users)))
    assert all(left)
    assert await presence.online(conversation) == set()
