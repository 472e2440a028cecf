"""Load generator process: asyncio WebSocket clients (websockets, compression off), driven by the
orchestrator (bench/run.py) with one JSON command per line on stdin; one JSON answer per line on
stdout. Runs in its own process so it never shares an interpreter with the server it measures.

    config (argv[1], JSON): {"url": "ws://127.0.0.1:PORT/ws/chat/", "clients": [[conv, user, token], ...],
                             "connect_concurrency": 50, "content_bytes": 100}

Commands:
    {"cmd": "connect"}                         -> {"connected", "failed", "seconds"}
    {"cmd": "open", "phase", "rate", "duration", "start_at"}
        open loop: `rate` message.send frames/s spread over all clients round-robin (consecutive sends
        go to different conversations), then a drain until every receiver has every acked seq.
    {"cmd": "closed", "phase", "duration", "start_at"}
        closed loop: each client sends its next message as soon as its previous one is acked.
    {"cmd": "idle", "duration"}                -> sleeps with every connection open
    {"cmd": "storm", "phase", "rate", "after", "timeout", "drain", "replay"}
        reconnect storm: sends `rate` msg/s (round-robin over the connected clients) until every
        socket has been closed by the server (the orchestrator restarts it), then reconnects every
        client at once, each with `after_seq` = the last seq it received when `replay` (the
        server's replay fills what it missed) or without (a server that cannot replay), retrying a
        refused connection with a short backoff, keeps sending for `after` seconds once all are
        ready, then drains. -> the usual counters + wall-clock times of the first close and of each
        client's `ready`, and per conversation the highest acked seq and every client's last seq.
    {"cmd": "quit"}
Each send carries metadata {"bench_ts": time_ns at send, "bench_phase": phase}; every receiver
(the sender included) records time_ns at arrival minus bench_ts for message.new frames of the
phase, and checks seq per receiver: seq = last+1 is in order, <= last a duplicate, > last+1 a gap.
"""
from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import sys
import time

from websockets.asyncio.client import connect

# The longest wait between two reconnection attempts of one client.
RECONNECT_BACKOFF_MAX = 5.0
# After a storm's drain, how long messages acked through other generator processes get to arrive.
CROSS_GENERATOR_SETTLE_SECONDS = 2.0
# An unfinished drain with no delivery for this long: the server stopped delivering (lost), it is
# not merely working through a backlog (late).
STALL_SECONDS = 5.0

try:
    import orjson

    loads = orjson.loads

    def dumps(obj) -> str:
        return orjson.dumps(obj).decode()
except ImportError:  # pragma: no cover
    loads = json.loads

    def dumps(obj) -> str:
        return json.dumps(obj, separators=(",", ":"))


class Client:
    __slots__ = ("conv", "user", "token", "ws", "last_seq", "ready", "task", "pending", "closed_code", "resuming")

    def __init__(self, conv: str, user: str, token: str) -> None:
        self.conv, self.user, self.token = conv, user, token
        self.ws = None
        self.last_seq = 0
        self.ready = asyncio.Event()
        self.task = None
        self.pending: dict[str, asyncio.Future | None] = {}
        self.closed_code = None
        self.resuming = False  # connected with after_seq: `ready` must not move last_seq (the replay follows)


class Generator:
    def __init__(self, config: dict) -> None:
        self.url = config["url"]
        self.clients = [Client(*c) for c in config["clients"]]
        self.concurrency = config.get("connect_concurrency", 50)
        self.content = "x" * config.get("content_bytes", 100)
        self.by_conv: dict[str, list[Client]] = collections.defaultdict(list)
        for client in self.clients:
            self.by_conv[client.conv].append(client)
        # send order: the i-th member of every conversation, then the (i+1)-th...
        width = max((len(m) for m in self.by_conv.values()), default=0)
        self.send_order = [m[i] for i in range(width) for m in self.by_conv.values() if i < len(m)]
        self.reset()
        self.conv_acked_max: dict[str, int] = collections.defaultdict(int)
        self.counter = 0
        self.inflight: set[asyncio.Task] = set()

    def reset(self) -> None:
        self.latencies: dict[int, list[int]] = collections.defaultdict(list)
        self.ack_latencies: list[int] = []
        self.received = 0
        self.gaps = 0
        self.dups = 0
        self.errors: collections.Counter = collections.Counter()
        self.sent = 0
        self.acked = 0
        self.late_sends = 0
        self.stalled = False

    # --- receiving -----------------------------------------------------------------------------
    async def reader(self, client: Client) -> None:
        ws = client.ws
        try:
            async for raw in ws:
                frame = loads(raw)
                kind = frame.get("type")
                if kind == "message.new":
                    now = time.time_ns()
                    message = frame["message"]
                    seq = message["seq"]
                    last = client.last_seq
                    if seq == last + 1:
                        client.last_seq = seq
                    elif seq <= last:
                        self.dups += 1
                        continue
                    else:
                        self.gaps += seq - last - 1
                        client.last_seq = seq
                    self.received += 1
                    meta = message.get("metadata") or {}
                    sent = meta.get("bench_ts")
                    if sent is not None:
                        self.latencies[meta.get("bench_phase", 0)].append((now - sent) // 1000)
                elif kind == "message.ack":
                    now = time.time_ns()
                    message = frame["message"]
                    if message["seq"] > self.conv_acked_max[client.conv]:
                        self.conv_acked_max[client.conv] = message["seq"]
                    self.acked += 1
                    sent = (message.get("metadata") or {}).get("bench_ts")
                    if sent is not None:
                        self.ack_latencies.append((now - sent) // 1000)
                    waiter = client.pending.pop(frame.get("client_message_id"), None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(True)
                elif kind == "ready":
                    if not client.resuming:
                        client.last_seq = frame.get("last_seq") or 0
                    client.ready.set()
                elif kind == "error":
                    self.errors[frame.get("code", "?")] += 1
                    waiter = client.pending.pop(frame.get("client_message_id"), None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(False)
        except Exception as exc:  # connection closed or broken
            self.errors[f"closed:{type(exc).__name__}"] += 1
        finally:
            client.closed_code = getattr(ws, "close_code", None) or -1
            self.errors[f"close:{client.closed_code}"] += 1
            for waiter in client.pending.values():
                if waiter is not None and not waiter.done():
                    waiter.set_result(False)

    # --- commands ------------------------------------------------------------------------------
    async def connect_all(self) -> dict:
        started = time.monotonic()
        semaphore = asyncio.Semaphore(self.concurrency)
        failed = collections.Counter()

        async def one(client: Client) -> None:
            async with semaphore:
                for attempt in range(3):
                    try:
                        client.ws = await connect(
                            f"{self.url}?conversation_id={client.conv}",
                            additional_headers={"Authorization": f"Token {client.token}"},
                            compression=None, ping_interval=None, open_timeout=30, max_size=4 * 1024 * 1024,
                            max_queue=None,
                        )
                        client.task = asyncio.create_task(self.reader(client))
                        await asyncio.wait_for(client.ready.wait(), 30)
                        return
                    except Exception as exc:
                        if attempt == 2:
                            failed[type(exc).__name__] += 1
                        await asyncio.sleep(0.2 * (attempt + 1))

        await asyncio.gather(*(one(c) for c in self.clients))
        return {"connected": sum(c.ready.is_set() for c in self.clients), "failed": dict(failed),
                "seconds": round(time.monotonic() - started, 3)}

    async def storm(self, phase: int, rate: float, after: float, timeout: float, drain: float, replay: bool) -> dict:
        deadline = time.monotonic() + timeout
        stop_sending = asyncio.Event()
        self.t_start = time.monotonic()

        async def sender() -> None:
            k, t0 = 0, time.monotonic()
            while not stop_sending.is_set():
                live = [c for c in self.send_order if c.ready.is_set() and c.closed_code is None]
                if live and rate > 0:
                    task = asyncio.ensure_future(self.send(live[k % len(live)], phase))
                    self.inflight.add(task)
                    task.add_done_callback(self.inflight.discard)
                k += 1
                await asyncio.sleep(max(0.0, t0 + k / rate - time.monotonic()) if rate > 0 else 0.1)

        sending = asyncio.create_task(sender())
        down_at = None
        while time.monotonic() < deadline:  # the orchestrator stops the server
            if any(c.closed_code is not None for c in self.clients):
                down_at = down_at or time.time()
            if all(c.closed_code is not None for c in self.clients):
                break
            await asyncio.sleep(0.01)
        closed = sum(c.closed_code is not None for c in self.clients)
        unanswered_at_restart = sum(len(c.pending) for c in self.clients)
        for c in self.clients:
            c.pending.clear()
        ready_at: list[float] = []
        failed = collections.Counter()

        async def reconnect(client: Client) -> None:
            client.ready.clear()
            client.resuming = replay
            url = f"{self.url}?conversation_id={client.conv}" + (f"&after_seq={client.last_seq}" if replay else "")
            attempt = 0
            while time.monotonic() < deadline:
                attempt += 1
                try:
                    ws = await connect(url, additional_headers={"Authorization": f"Token {client.token}"},
                                       compression=None, ping_interval=None, open_timeout=30,
                                       max_size=4 * 1024 * 1024, max_queue=None)
                except Exception as exc:  # refused while the server restarts
                    failed[type(exc).__name__] += 1
                    # As a client should: exponential backoff with jitter (0.1 s doubling up to 5 s),
                    # so thousands of refused clients do not come back together and keep a
                    # restarting server busy answering nothing but retries.
                    await asyncio.sleep(min(RECONNECT_BACKOFF_MAX, 0.1 * 2 ** (attempt - 1)) * (0.5 + random.random() / 2))
                    continue
                client.ws, client.closed_code = ws, None
                client.task = asyncio.create_task(self.reader(client))
                try:
                    await asyncio.wait_for(client.ready.wait(), max(0.01, deadline - time.monotonic()))
                    ready_at.append(time.time())
                except asyncio.TimeoutError:
                    failed["no_ready"] += 1
                return

        await asyncio.gather(*(reconnect(c) for c in self.clients))
        reconnected = sum(c.ready.is_set() and c.closed_code is None for c in self.clients)
        await asyncio.sleep(after)
        stop_sending.set()
        await sending
        sending_seconds = time.monotonic() - self.t_start
        drained = await self.drain(drain)
        # This process drains against the acks it saw itself, but a conversation's members may sit
        # in several generator processes (the idle scenario opens its sockets in two halves): the
        # other processes' last messages may still be on their way here. The orchestrator checks
        # every member against every process's acks, so give those a moment to arrive.
        await asyncio.sleep(CROSS_GENERATOR_SETTLE_SECONDS)
        report = self.report(phase, drained, sending_seconds, 0.0)
        report.update(
            down_at=down_at, closed_by_server=closed, reconnected=reconnected, ready_at=sorted(ready_at),
            reconnect_failures=dict(failed), unanswered_at_restart=unanswered_at_restart,
            acked_max=dict(self.conv_acked_max),
            last_seqs={conv: [c.last_seq for c in members if c.ready.is_set()] for conv, members in self.by_conv.items()},
        )
        return report

    def frame(self, client: Client, phase: int) -> tuple[str, str]:
        self.counter += 1
        cid = f"b{os.getpid()}-{self.counter}"
        return cid, dumps({"type": "message.send", "client_message_id": cid, "content": self.content,
                           "metadata": {"bench_ts": time.time_ns(), "bench_phase": phase}})

    async def send(self, client: Client, phase: int, waiter: asyncio.Future | None = None) -> None:
        cid, text = self.frame(client, phase)
        client.pending[cid] = waiter
        self.sent += 1
        try:
            await client.ws.send(text)
        except Exception as exc:
            self.errors[f"send:{type(exc).__name__}"] += 1
            client.pending.pop(cid, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(False)

    async def open_loop(self, phase: int, rate: float, duration: float, start_at: float) -> None:
        live = [c for c in self.send_order if c.ready.is_set()]
        total = int(rate * duration)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        t0 = self.t_start = time.monotonic()
        k = 0
        while k < total:
            due = min(total, int((time.monotonic() - t0) * rate) + 1)
            if due - k > max(2, rate * 0.01):
                self.late_sends += due - k
            while k < due:
                client = live[k % len(live)]
                task = asyncio.ensure_future(self.send(client, phase))
                self.inflight.add(task)
                task.add_done_callback(self.inflight.discard)
                k += 1
            next_at = t0 + k / rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def closed_loop(self, phase: int, duration: float, start_at: float) -> None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        self.t_start = time.monotonic()
        end = self.t_start + duration
        loop = asyncio.get_running_loop()

        async def worker(client: Client) -> None:
            while time.monotonic() < end and client.closed_code is None:
                waiter = loop.create_future()
                await self.send(client, phase, waiter)
                try:
                    await asyncio.wait_for(waiter, 10)
                except asyncio.TimeoutError:
                    self.errors["ack_timeout"] += 1

        await asyncio.gather(*(worker(c) for c in self.clients if c.ready.is_set()))

    async def drain(self, timeout: float) -> bool:
        """Until every send is answered and every receiver holds its conversation's last acked seq.

        Sets self.stalled when nothing arrived in the last STALL_SECONDS of an unfinished drain: a
        server still working through a backlog is late, one that stopped delivering lost messages."""
        deadline = time.monotonic() + timeout
        last_progress, last_received = time.monotonic(), self.received
        self.stalled = False
        while time.monotonic() < deadline:
            outstanding = sum(len(c.pending) for c in self.clients)
            behind = sum(
                1 for c in self.clients if c.closed_code is None and c.ready.is_set()
                and c.last_seq < self.conv_acked_max[c.conv]
            )
            if outstanding == 0 and behind == 0:
                return True
            if self.received != last_received:
                last_progress, last_received = time.monotonic(), self.received
            await asyncio.sleep(0.05)
        self.stalled = time.monotonic() - last_progress >= STALL_SECONDS
        return False

    def report(self, phase: int, drained: bool, seconds: float, cpu: float) -> dict:
        # Behind at the drain deadline: lost if every send was answered and deliveries had stopped
        # (stalled), merely late (undelivered) while the server is still working through a backlog.
        behind = sum(
            max(0, self.conv_acked_max[c.conv] - c.last_seq) for c in self.clients if c.ready.is_set()
        )
        outstanding = sum(len(c.pending) for c in self.clients)
        lost = behind if outstanding == 0 and not drained and self.stalled else 0
        return {
            "sent": self.sent, "acked": self.acked, "received": self.received, "gaps": self.gaps,
            "dups": self.dups, "lost": lost, "undelivered": behind, "unanswered": outstanding, "errors": dict(self.errors), "drained": drained,
            "late_sends": self.late_sends, "seconds": round(seconds, 3), "gen_cpu_seconds": round(cpu, 3),
            "closed": sum(1 for c in self.clients if c.closed_code is not None),
            "latency_us": self.latencies.get(phase, []), "ack_latency_us": self.ack_latencies,
        }

    async def run_phase(self, command: dict) -> dict:
        self.reset()
        cpu0 = time.process_time()
        if command["cmd"] == "open":
            await self.open_loop(command["phase"], command["rate"], command["duration"], command["start_at"])
        else:
            await self.closed_loop(command["phase"], command["duration"], command["start_at"])
        sending = time.monotonic() - self.t_start
        drained = await self.drain(command.get("drain", 10))
        return self.report(command["phase"], drained, sending, time.process_time() - cpu0)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            command = json.loads(line)
            if command["cmd"] == "connect":
                answer = await self.connect_all()
            elif command["cmd"] in ("open", "closed"):
                answer = await self.run_phase(command)
            elif command["cmd"] == "storm":
                self.reset()
                answer = await self.storm(command["phase"], command["rate"], command.get("after", 2),
                                          command.get("timeout", 120), command.get("drain", 15),
                                          command.get("replay", True))
            elif command["cmd"] == "idle":
                cpu0 = time.process_time()
                await asyncio.sleep(command["duration"])
                answer = {"gen_cpu_seconds": time.process_time() - cpu0, "errors": dict(self.errors),
                          "closed": sum(1 for c in self.clients if c.closed_code is not None)}
            elif command["cmd"] == "quit":
                break
            else:
                answer = {"error": f"unknown command {command['cmd']}"}
            sys.stdout.write(dumps(answer) + "\n")
            sys.stdout.flush()
        await asyncio.gather(*(c.ws.close() for c in self.clients if c.ws is not None), return_exceptions=True)


def main() -> None:
    with open(sys.argv[1]) as handle:
        config = json.load(handle)
    asyncio.run(Generator(config).serve())


if __name__ == "__main__":
    main()
