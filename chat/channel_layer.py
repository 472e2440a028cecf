"""The Redis channel layer: channels-redis' pub/sub layer, with publishes that run side by side.

channels-redis sends every PUBLISH of a process under one lock per Redis shard and waits for
Redis' reply before the next one starts, so a process publishes at most one message per round
trip, and under load that round trip includes the busy event loop getting round to the reply.
Subscriptions keep that lock (they share one pub/sub connection); publishes here go through the
shard's connection pool concurrently, bounded so that a burst cannot open more connections than
the pool allows. Publishes of one process are therefore no longer ordered among themselves: the
consumer orders messages by seq (chat.consumers), and no other event depends on publish order.
"""
from __future__ import annotations

import asyncio

from channels_redis.pubsub import RedisPubSubChannelLayer, RedisPubSubLoopLayer, RedisSingleShardConnection
from channels_redis.utils import _wrap_close, decode_hosts

# Concurrent PUBLISH calls per shard and process; redis-py's pool refuses more than 100 connections.
MAX_CONCURRENT_PUBLISHES = 32


class _Shard(RedisSingleShardConnection):
    def __init__(self, host, channel_layer) -> None:
        super().__init__(host, channel_layer)
        self._publishing = asyncio.Semaphore(MAX_CONCURRENT_PUBLISHES)

    async def publish(self, channel, message) -> None:
        self._ensure_redis()
        async with self._publishing:
            await self._redis.publish(channel, message)


class _LoopLayer(RedisPubSubLoopLayer):
    def __init__(self, hosts=None, **kwargs) -> None:
        super().__init__(hosts, **kwargs)
        self._shards = [_Shard(host, self) for host in decode_hosts(hosts)]


class ConcurrentPublishChannelLayer(RedisPubSubChannelLayer):
    def _get_layer(self) -> RedisPubSubLoopLayer:
        # As channels-redis does it, with our loop layer: one per event loop.
        loop = asyncio.get_running_loop()
        layer = self._layers.get(loop)
        if layer is None:
            layer = self._layers[loop] = _LoopLayer(*self._args, **self._kwargs, channel_layer=self)
            _wrap_close(self, loop)
        return layer
