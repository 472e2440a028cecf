"""Load generator of the user-stream scenario (bench/run.py `stream`): every user of a team chat on
one device, in many conversations at once. Driven like bench/loadgen.py: one JSON command per line
on stdin, one JSON answer per line on stdout.

    config (a JSON file, argv[1]): {"url": "ws://127.0.0.1:PORT/ws/chat/", "mode": "stream" | "sockets",
                             "users": [[user_id, token], ...], "conversations": [[conv_id, [user index, ...]], ...]}

mode `stream`: one user stream per user (the service's v2 way). mode `sockets`: one socket per user
and conversation (`?conversation_id=`), what a client of the raw relay (or of v1) must hold.

Commands:
    {"cmd": "connect"}                          -> {"connected", "sockets", "failed", "seconds"}
    {"cmd": "open", "phase", "rate", "duration"}
        `rate` message.send frames/s, round-robin over the conversations, each sent by the next of
        its members; then a drain until every member has every acked message. -> sent, acked,
        deliveries expected and received, gaps, dups, lost, send->deliver latency.
    {"cmd": "quit"}
Each send carries metadata {"bench_ts": time_ns at send}; every member records the time of arrival
minus bench_ts, and checks seq per (user, conversation): seq = last+1 is in order, <= last a
duplicate, > last+1 a gap.
"""
from __future__ import annotations

import asyncio
import collections
import json
import sys
import time

from websockets.asyncio.client import connect

from bench.loadgen import dumps, loads


class Socket:
    def __init__(self, user: int, conversations: list[str]) -> None:
        self.user = user
        self.conversations = conversations  # what it carries
        self.ws = None
        self.ready = asyncio.Event()
        self.last_seq: dict[str, int] = {}
        self.pending: set[str] = set()


class StreamGenerator:
    def __init__(self, config: dict) -> None:
        self.url = config["url"]
        self.mode = config["mode"]
        self.users = config["users"]
        self.conversations = [(cid, members) for cid, members in config["conversations"]]
        memberships: dict[int, list[str]] = collections.defaultdict(list)
        for cid, members in self.conversations:
            for member in members:
                memberships[member].append(cid)
        if self.mode == "stream":
            self.sockets = [Socket(user, memberships[user]) for user in sorted(memberships)]
        else:
            self.sockets = [Socket(user, [cid]) for user in sorted(memberships) for cid in memberships[user]]
        # Who sends for a conversation: its members' sockets carrying it, in turn.
        self.senders: dict[str, list[Socket]] = collections.defaultdict(list)
        for socket in self.sockets:
            for cid in socket.conversations:
                self.senders[cid].append(socket)
        self.reset()

    def reset(self) -> None:
        self.latencies: list[int] = []
        self.received = self.gaps = self.dups = self.sent = self.acked = 0
        self.acked_per_conversation: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.last_delivery = time.monotonic()

    async def reader(self, socket: Socket) -> None:
        try:
            async for raw in socket.ws:
                frame = loads(raw)
                kind = frame.get("type")
                if kind == "ready":
                    if "conversations" in frame:  # a user stream
                        socket.last_seq = {cid: state["last_seq"] for cid, state in frame["conversations"].items()}
                    else:
                        socket.last_seq = {socket.conversations[0]: frame.get("last_seq", 0)}
                    socket.ready.set()
                elif kind == "message.new":
                    message = frame["message"]
                    cid, seq = message["conversation_id"], message["seq"]
                    last = socket.last_seq.get(cid, 0)
                    if seq == last + 1:
                        socket.last_seq[cid] = seq
                    elif seq <= last:
                        self.dups += 1
                        continue
                    else:
                        self.gaps += 1
                        socket.last_seq[cid] = seq
                    self.received += 1
                    self.last_delivery = time.monotonic()
                    stamp = (message.get("metadata") or {}).get("bench_ts")
                    if stamp:
                        self.latencies.append(time.time_ns() - stamp)
                elif kind == "message.ack":
                    socket.pending.discard(frame.get("client_message_id"))
                    self.acked += 1
                    self.acked_per_conversation[frame["message"]["conversation_id"]] += 1
                elif kind == "error":
                    self.errors[frame.get("code", "?")] += 1
        except Exception as exc:  # a closed socket ends its reader
            self.errors[f"closed:{type(exc).__name__}"] += 1

    async def connect_all(self) -> dict:
        started = time.monotonic()
        semaphore = asyncio.Semaphore(50)
        failed: collections.Counter = collections.Counter()

        async def one(socket: Socket) -> None:
            token = self.users[socket.user][1]
            url = self.url if self.mode == "stream" else f"{self.url}?conversation_id={socket.conversations[0]}"
            async with semaphore:
                try:
                    socket.ws = await connect(url, additional_headers={"Authorization": f"Token {token}"},
                                              compression=None, ping_interval=None, open_timeout=60, max_size=None,
                                              max_queue=None)
                    asyncio.create_task(self.reader(socket))
                    await asyncio.wait_for(socket.ready.wait(), 60)
                except Exception as exc:
                    failed[type(exc).__name__] += 1

        await asyncio.gather(*(one(socket) for socket in self.sockets))
        return {"connected_users": len({s.user for s in self.sockets if s.ready.is_set()}),
                "sockets": sum(s.ready.is_set() for s in self.sockets), "failed": dict(failed),
                "seconds": round(time.monotonic() - started, 3)}

    async def open_loop(self, phase: int, rate: float, duration: float, drain: float) -> dict:
        self.reset()
        total = int(rate * duration)
        turn: collections.Counter = collections.Counter()
        started = time.monotonic()
        for k in range(total):
            cid, _ = self.conversations[k % len(self.conversations)]
            senders = self.senders[cid]
            socket = senders[turn[cid] % len(senders)]
            turn[cid] += 1
            client_id = f"p{phase}-{k}"
            frame = {"type": "message.send", "client_message_id": client_id, "content": "x" * 100,
                     "metadata": {"bench_ts": time.time_ns(), "bench_phase": phase}}
            if self.mode == "stream":
                frame["conversation_id"] = cid
            socket.pending.add(client_id)
            self.sent += 1
            try:
                await socket.ws.send(dumps(frame))
            except Exception as exc:
                self.errors[f"send:{type(exc).__name__}"] += 1
            await asyncio.sleep(max(0.0, started + (k + 1) / rate - time.monotonic()))
        # Drain: every member of a conversation gets each of its acked messages.
        members = {cid: len(self.senders[cid]) for cid, _ in self.conversations}
        deadline = time.monotonic() + drain
        while time.monotonic() < deadline:
            expected = sum(count * members[cid] for cid, count in self.acked_per_conversation.items())
            if self.acked + sum(self.errors.values()) >= self.sent and self.received >= expected:
                break
            if time.monotonic() - self.last_delivery > 5 and self.acked >= self.sent:
                break
            await asyncio.sleep(0.05)
        expected = sum(count * members[cid] for cid, count in self.acked_per_conversation.items())
        latencies = sorted(self.latencies)

        def pick(fraction: float):
            return round(latencies[min(len(latencies) - 1, int(fraction * len(latencies)))] / 1e6, 2) if latencies else None

        return {"sent": self.sent, "acked": self.acked, "expected_deliveries": expected, "received": self.received,
                "gaps": self.gaps, "dups": self.dups, "lost": max(expected - self.received, 0),
                "errors": dict(self.errors), "seconds": round(time.monotonic() - started, 3),
                "latency": {"p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": pick(1.0), "count": len(latencies)}}

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:
                return
            command = json.loads(line)
            if command["cmd"] == "connect":
                answer = await self.connect_all()
            elif command["cmd"] == "open":
                answer = await self.open_loop(command["phase"], command["rate"], command["duration"], command.get("drain", 30))
            else:
                for socket in self.sockets:
                    if socket.ws is not None:
                        await socket.ws.close()
                return
            print(dumps(answer), flush=True)


def main() -> None:
    with open(sys.argv[1]) as config:
        asyncio.run(StreamGenerator(json.load(config)).serve())


if __name__ == "__main__":
    main()
