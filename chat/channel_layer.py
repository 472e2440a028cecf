"""The Redis channel layer: channels-redis' pub/sub layer, with publishes that run side by side.

channels-redis sends every PUBLISH of a process under one lock per Redis shard and waits for
Redis' reply before the next one starts, so a process publishes at most one message per round
trip, and under load that round trip includes the busy event loop getting round to the reply.
Subscriptions keep that lock (they share one pub/sub connection); publishes here go through the
shard's connection pool concurrently, bounded so that a burst cannot open more connections than
the pool allows. Publishes of one process are therefore no longer ordered among themselves: the
consumer orders messages by seq (chat.consumers), and no other event depends on publish order.
Events published together (what a batch of sends committed; the typing and presence events of a
batch of sockets) go out in one pipeline (`group_send_many`): one round trip, in order.

When the subscription connection comes back after Redis went away, redis-py subscribes again on
its own, and whatever was published in between is lost without a word. Every channel of the
process then receives a RESUBSCRIBED event once the subscriptions have been asked for again, ahead
of anything from the new connection (chat.fanout acts on it).
"""
from __future__ import annotations

import asyncio

from channels_redis.pubsub import RedisPubSubChannelLayer, RedisPubSubLoopLayer, RedisSingleShardConnection
from channels_redis.utils import _wrap_close, create_pool, decode_hosts
from redis import asyncio as aioredis
from redis.asyncio.client import PubSub

# Concurrent PUBLISH calls per shard and process; redis-py's pool refuses more than 100 connections.
MAX_CONCURRENT_PUBLISHES = 32
# The event every local channel receives when a lost subscription connection is back.
RESUBSCRIBED = "layer.resubscribed"


class _PubSub(PubSub):
    def __init__(self, connection_pool, *, reconnected) -> None:
        super().__init__(connection_pool)
        self._reconnected = reconnected

    async def on_connect(self, connection) -> None:
        # redis-py registers this callback once the first connection is made, so it runs on
        # reconnects only; it subscribes again, and only then reads from the new connection.
        await super().on_connect(connection)
        self._reconnected()


class _Shard(RedisSingleShardConnection):
    def __init__(self, host, channel_layer) -> None:
        super().__init__(host, channel_layer)
        self._publishing = asyncio.Semaphore(MAX_CONCURRENT_PUBLISHES)

    def _ensure_redis(self) -> None:
        if self._redis is None:  # (as channels-redis does it, with our PubSub)
            self._redis = aioredis.Redis(connection_pool=create_pool(self.host))
            self._pubsub = _PubSub(self._redis.connection_pool, reconnected=self.channel_layer.resubscribed)

    async def publish(self, channel, message) -> None:
        self._ensure_redis()
        async with self._publishing:
            await self._redis.publish(channel, message)

    async def publish_many(self, items: list[tuple[str, bytes]]) -> None:
        """PUBLISH each (channel, message) in this order, in one pipeline: one connection and one
        round trip for all of them, and Redis runs them in the order sent."""
        self._ensure_redis()
        async with self._publishing:
            async with self._redis.pipeline(transaction=False) as pipeline:
                for channel, message in items:
                    pipeline.publish(channel, message)
                await pipeline.execute()


class _LoopLayer(RedisPubSubLoopLayer):
    def __init__(self, hosts=None, **kwargs) -> None:
        super().__init__(hosts, **kwargs)
        self._shards = [_Shard(host, self) for host in decode_hosts(hosts)]

    def resubscribed(self) -> None:
        """A shard's subscriptions are being made again: what was published meanwhile is lost."""
        event = self.channel_layer.serialize({"type": RESUBSCRIBED})
        for queue in self.channels.values():
            queue.put_nowait(event)

    async def group_send_many(self, items: list[tuple[str, dict]]) -> None:
        """group_send for each (group, message), in this order within each group: one pipeline per
        shard, the shards side by side."""
        by_shard: dict[_Shard, list[tuple[str, bytes]]] = {}
        for group, message in items:
            channel = self._get_group_channel_name(group)
            by_shard.setdefault(self._get_shard(channel), []).append((channel, self.channel_layer.serialize(message)))
        await asyncio.gather(*(shard.publish_many(published) for shard, published in by_shard.items()))


class ConcurrentPublishChannelLayer(RedisPubSubChannelLayer):
    async def group_send_many(self, items: list[tuple[str, dict]]) -> None:
        """Publish many events at once (chat.events._apublish_each): each group's in order."""
        await self._get_layer().group_send_many(items)

    def _get_layer(self) -> RedisPubSubLoopLayer:
        # As channels-redis does it, with our loop layer: one per event loop.
        loop = asyncio.get_running_loop()
        layer = self._layers.get(loop)
        if layer is None:
            layer = self._layers[loop] = _LoopLayer(*self._args, **self._kwargs, channel_layer=self)
            _wrap_close(self, loop)
        return layer
