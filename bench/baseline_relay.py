"""The raw baseline: the smallest relay that does what the generator measures, nothing else.

    .venv/bin/python -m bench.baseline_relay --port 8765 --redis redis://127.0.0.1:6379/13

A `websockets` server (per-message compression off) where `ws://HOST:PORT/?conversation_id=<id>`
joins that conversation. Each `message.send` text frame gets a seq from Redis (INCR per
conversation) and is PUBLISHed on the conversation's channel in the same Lua call, so publish order
is seq order; one pub/sub subscription per conversation per process relays it to every local
member with `websockets.broadcast` (the frame is serialised once). The frames have the shapes of
the real service (ready, message.new, message.ack), so the same load generator measures both.
No auth, no persistence, no rate limit, no presence: the practical floor of the machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
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


class Relay:
    def __init__(self, redis_url: str) -> None:
        self.redis = aioredis.from_url(redis_url, decode_responses=True)
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
    args = parser.parse_args()
    relay = Relay(args.redis)
    await relay.start()
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(relay.handler, args.host, args.port, compression=None, max_size=2 * 1024 * 1024):
        await stop


if __name__ == "__main__":
    asyncio.run(main())
