"""The Redis channel layer (chat.channel_layer), on the real Redis: the batch publish
(group_send_many) sends the events one piece of work committed in one pipeline, each group's in
order, to every subscriber, and chat.events counts each of them; a subscription connection that
Redis dropped is announced to the process's channels when it comes back."""
import asyncio
import uuid

import pytest

from chat import events, metrics
from chat.channel_layer import RESUBSCRIBED, ConcurrentPublishChannelLayer
from tests.services import REDIS_URL, redis_available, require


@pytest.fixture
def layer():
    require("Redis", redis_available())
    return ConcurrentPublishChannelLayer(hosts=[REDIS_URL])


async def subscribed(layer, group: str) -> str:
    channel = await layer.new_channel()
    await layer.group_add(group, channel)
    return channel


async def received(layer, channel: str, count: int) -> list[dict]:
    return [await asyncio.wait_for(layer.receive(channel), 5) for _ in range(count)]


async def test_many_events_reach_each_group_in_order(layer):
    one, two = f"conversation.{uuid.uuid4().hex}", f"conversation.{uuid.uuid4().hex}"
    first, second, both = await subscribed(layer, one), await subscribed(layer, two), await subscribed(layer, two)
    await layer.group_add(one, both)
    items = [(one if n % 3 else two, {"type": "message.new", "n": n}) for n in range(30)]
    await layer.group_send_many(items)
    ones = [m["n"] for m in await received(layer, first, 20)]
    twos = [m["n"] for m in await received(layer, second, 10)]
    assert ones == [n for n in range(30) if n % 3]
    assert twos == [n for n in range(30) if not n % 3]
    # A subscriber of both groups gets both, each group's in order.
    everything = [m["n"] for m in await received(layer, both, 30)]
    assert [n for n in everything if n % 3] == ones and [n for n in everything if not n % 3] == twos
    await layer.flush()


async def test_apublish_collected_sends_a_batch_in_one_call_and_counts_each_event(layer, settings, monkeypatch):
    from channels.layers import channel_layers

    settings.REDIS_URL = REDIS_URL
    monkeypatch.setitem(channel_layers.backends, "default", layer)
    group = events.conversation_group(uuid.uuid4())
    channel = await subscribed(layer, group)
    calls = []
    many = layer.group_send_many

    async def counted(items):
        calls.append(len(items))
        await many(items)

    monkeypatch.setattr(layer, "group_send_many", counted)
    published = metrics.message_published.labels(status="success")
    before = published._value.get()
    await events.apublish_collected([(group, {"type": "message.new", "seq": seq}) for seq in (1, 2, 3)])
    assert calls == [3]
    messages = await received(layer, channel, 3)
    assert [m["seq"] for m in messages] == [1, 2, 3]
    assert {m["group"] for m in messages} == {group}  # the fan-out routes by it (chat.fanout)
    assert published._value.get() == before + 3
    await layer.flush()


async def test_a_lost_subscription_connection_is_announced_ahead_of_what_follows(layer):
    """Redis drops the process's pub/sub connection (as a restart does): redis-py subscribes again by
    itself, and every local channel receives RESUBSCRIBED before anything from the new connection.
    A first connection announces nothing."""
    import redis.asyncio

    group = f"conversation.{uuid.uuid4().hex}"
    channel = await subscribed(layer, group)
    admin = redis.asyncio.from_url(REDIS_URL)
    group_channel = layer._get_layer()._get_group_channel_name(group)
    published = 0
    killed_after = None

    async def publish_steadily():
        nonlocal published
        while True:
            published += 1
            await admin.publish(group_channel, layer.serialize({"type": "message.new", "n": published}))
            await asyncio.sleep(0.005)

    publisher = asyncio.create_task(publish_steadily())
    # One receive at a time, never cancelled (channels-redis drops a channel whose receive is).
    received_events: list[dict] = []
    while len(received_events) < 5:
        received_events.append(await asyncio.wait_for(layer.receive(channel), 5))
    assert all(event["type"] == "message.new" for event in received_events)

    pubsub = layer._get_layer()._shards[0]._pubsub
    host, port = pubsub.connection._writer.get_extra_info("sockname")[:2]
    assert await admin.client_kill_filter(_type="pubsub", addr=f"{host}:{port}") == 1
    killed_after = published  # what is published from now on can only come on a new connection

    # Until 30 of those have come: enough for any of them to overtake a late announcement.
    while len([e for e in received_events if e["type"] == "message.new" and e["n"] > killed_after]) < 30:
        received_events.append(await asyncio.wait_for(layer.receive(channel), 10))
    publisher.cancel()
    await admin.aclose()
    await layer.flush()

    kinds = [event["type"] for event in received_events]; print("KINDS", killed_after, [(e["type"], e.get("n")) for e in received_events])
    assert kinds.count(RESUBSCRIBED) == 1
    marker = kinds.index(RESUBSCRIBED)
    # Everything published after the kill came after the announcement.
    assert all(e["n"] <= killed_after for e in received_events[:marker])
    assert received_events[marker + 1:] and all(e["type"] == "message.new" for e in received_events[marker + 1:])
