"""The baselines: the smallest relay that does what the generator measures, nothing else.

    .venv/bin/python -m bench.baseline_relay --port 8765 --redis redis://127.0.0.1:6379/13            # raw
    .venv/bin/python -m bench.baseline_relay --port 8765 --redis redis://127.0.0.1:6379/13 --durable  # + Cassandra

A `websockets` server (per-message compression off) where `ws://HOST:PORT/?conversation_id=<id>`
joins that conversation. Each `message.send` text frame gets a seq from Redis (INCR per
conversation) and is PUBLISHed on the conversation's channel in the same Lua call, so publish order
is seq order; one pub/sub subscription per conversation per process relays it to every local
member with `websockets.broadcast` (the frame is serialised once). The frames have the shapes of
the real service (ready, message.new, message.ack), so the same load generator measures both.
No auth, no persistence, no rate limit, no presence: the practical floor of the machine.

--durable: the floor of a relay that keeps what it relays. Each message is also written to
Cassandra, one prepared INSERT per message into `relay_messages` of the service's keyspace, with the
service's driver (the `cassandra` module of scylla-driver), contact points, port, protocol version
and consistency level (read from chatproject.settings, so the same environment configures both),
awaited asynchronously on the event loop (the driver's callback resolves an asyncio future) before
the seq, the publish and the ack. Its keyspace must exist (`manage.py cassandra_schema`); the table
is created here. No replay either: a reconnecting client resumes from `ready.last_seq`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import uuid
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
from websockets.asyncio.server import broadcast, serve

PREFIX = "benchrelay:"
# Seq and publish in one atomic step: subscribers see a conversation's messages in seq order.
SEND_LUA = """
local seq = redis.call('INCR', KEYS[1])
if seq == 1 then redis.call('EXPIRE', KEYS[1], 86400) end
redis.call('PUBLISH', KEYS[2], seq .. '|' .. ARGV[1])
return seq
"""
FRAME_HEAD = '{"type":"message.new","message":{"seq":'


class CassandraLog:
    """One durable write per message: a prepared INSERT at the service's consistency level."""

    def __init__(self) -> None:
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
        from cassandra import ConsistencyLevel
        from cassandra.cluster import Cluster
        from django.conf import settings

        self.cluster = Cluster(settings.CASSANDRA_HOSTS, port=settings.CASSANDRA_PORT,
                               protocol_version=settings.CASSANDRA_PROTOCOL_VERSION)
        self.session = self.cluster.connect(settings.CASSANDRA_KEYSPACE)
        self.session.execute(
            "CREATE TABLE IF NOT EXISTS relay_messages (conversation_id text, message_id timeuuid, body text, "
            "PRIMARY KEY (conversation_id, message_id))", timeout=60)
        self.insert = self.session.prepare(
            "INSERT INTO relay_messages (conversation_id, message_id, body) VALUES (?, ?, ?)")
        self.insert.consistency_level = ConsistencyLevel.name_to_value[settings.CASSANDRA_CONSISTENCY]
        self.consistency = settings.CASSANDRA_CONSISTENCY

    async def write(self, conversation: str, body: str) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def resolved(_rows) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        def failed(exc) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_exception(exc))

        self.session.execute_async(self.insert, (conversation, uuid.uuid1(), body)).add_callbacks(resolved, failed)
        await done

    def close(self) -> None:
        self.cluster.shutdown()


class Relay:
    def __init__(self, redis_url: str, durable: bool = False) -> None:
        self.log = CassandraLog() if durable else None
        # Callers wait for a free connection rather than fail: a reconnect storm makes 2,000
        # handshakes read their seq at once, and redis-py's default pool refuses past its limit.
        pool = aioredis.BlockingConnectionPool.from_url(redis_url, decode_responses=True, max_connections=64, timeout=None)
        self.redis = aioredis.Redis(connection_pool=pool)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.send_script = self.redis.register_script(SEND_LUA)
        self.members: dict[str, set] = {}
        self.listener: asyncio.Task | None = None

    async def start(self) -> None:
        await self.pubsub.subscribe(PREFIX + "keepalive")
        self.listener = asyncio.create_task(self.listen())

    async def listen(self) -> None:
        while True:
            message = await self.pubsub.get_message(timeout=1.0)
            if message is None or message["type"] != "message":
                continue
            conversation = message["channel"][len(PREFIX):]
            seq, _, rest = message["data"].partition("|")
            members = self.members.get(conversation)
            if members:
                broadcast(members, FRAME_HEAD + seq + "," + rest)

    async def handler(self, ws) -> None:
        query = parse_qs(urlsplit(ws.request.path).query)
        conversation = (query.get("conversation_id") or [""])[0]
        if not conversation:
            await ws.close(1008, "conversation_id required")
            return
        members = self.members.setdefault(conversation, set())
        if not members:
            await self.pubsub.subscribe(PREFIX + conversation)
        members.add(ws)
        user_id = str(uuid.uuid4())
        try:
            last_seq = int(await self.redis.get(PREFIX + "seq:" + conversation) or 0)
            await ws.send(json.dumps({"type": "ready", "conversation_id": conversation, "user_id": user_id,
                                      "last_seq": last_seq, "recovered": True}))
            async for raw in ws:
                try:
                    frame = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(frame, dict) or frame.get("type") != "message.send":
                    continue
                message = {
                    "message_id": str(uuid.uuid4()), "conversation_id": conversation, "sender_id": user_id,
                    "content": frame.get("content"), "message_type": frame.get("message_type", "text"),
                    "is_encrypted": bool(frame.get("is_encrypted", False)), "metadata": frame.get("metadata") or {},
                    "sent_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
                    "edited_at": None, "deleted": False,
                }
                body = json.dumps(message, separators=(",", ":"))
                if self.log is not None:
                    try:
                        await self.log.write(conversation, body)
                    except Exception as exc:  # answered, not acknowledged, as the service does
                        await ws.send(json.dumps({"type": "error", "code": "unavailable", "detail": str(exc),
                                                  "client_message_id": frame.get("client_message_id")}))
                        continue
                seq = await self.send_script(keys=[PREFIX + "seq:" + conversation, PREFIX + conversation],
                                             args=[body[1:] + "}"])
                message["seq"] = seq
                await ws.send(json.dumps({"type": "message.ack", "client_message_id": frame.get("client_message_id"),
                                          "message": message}, separators=(",", ":")))
        finally:
            members.discard(ws)
            if not members:
                self.members.pop(conversation, None)
                await self.pubsub.unsubscribe(PREFIX + conversation)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--durable", action="store_true", help="one Cassandra write per message before the ack")
    args = parser.parse_args()
    relay = Relay(args.redis, durable=args.durable)
    await relay.start()
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(relay.handler, args.host, args.port, compression=None, max_size=2 * 1024 * 1024):
        await stop
    if relay.log is not None:
        relay.log.close()


if __name__ == "__main__":
    asyncio.run(main())
