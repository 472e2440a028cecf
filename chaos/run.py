"""`make chaos`: the service under load while faults hit it at random moments, then a checker
that reads back what was acknowledged (docs/reliability.md).

Everything it signals it starts itself and stops at the end, in a runtime dir of its own
(CHAOS_DIR, default <repo>/.chaos): PostgreSQL on a free port and the three-node Cassandra through
scripts/services.sh, a private redis-server, two daphne processes, the notification worker and a
webhook receiver in this process. It never touches a shared Redis or Cassandra: if the cluster's
addresses already answer, it refuses to start.

    python -m chaos.run --seconds 300 [--seed N]

The seed alone fixes the fault schedule (kinds, moments, targets, durations); it is printed first
and last. Exit status 1 on any violation.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import aiohttp
from aiohttp import web
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.live import LiveServer, free_port, migrate, server_env  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

SERVICES = str(ROOT / "scripts" / "services.sh")
CLUSTER_NODES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
FAULT_KINDS = ("daphne_kill", "redis_restart", "cassandra_pause", "worker_kill", "drop_clients", "rate_burst")
USERS = 6
# One more user, added to and removed from conversation A again and again (never sends).
CHURN = USERS
# Seconds a removed member's socket may stay open: "within a second" (docs/websocket.md) plus
# scheduling slack on two shared cores; when the announcement was lost (Redis down), the periodic
# recheck's CHAT_MEMBERSHIP_RECHECK (30 s) plus the same slack.
REMOVAL_CLOSE_SECONDS = 3.0
REMOVAL_CLOSE_SECONDS_REDIS_DOWN = 33.0
# Conversation -> member indexes: two groups that overlap in two users.
CONVERSATIONS = {"A": [0, 1, 2, 3], "B": [2, 3, 4, 5]}
SEND_RATE_PER_USER = "120/min"  # the burst fault goes past it; the steady load stays well under
WEBHOOK_SECRET = "chaos-webhook-secret"
# A 503 is accepted only inside a Cassandra fault window plus this much (the driver notices the
# node is back within a few seconds).
CASSANDRA_GRACE = 5.0


def log(text: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---------------------------------------------------------------- the fault schedule


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the load starts
    kind: str
    target: int  # daphne index, Cassandra node number, or user index; 0 where there is none
    duration: float  # the SIGSTOP's length, the outage's length


# Each fault gets a slot of at least this many seconds: the longest pause (15 s) and some calm.
MIN_SLOT = 18.0


def fault_schedule(seed: int, seconds: float) -> list[Fault]:
    """One fault per slot of the run (10 s of calm first, 25 s at the end), at a random moment in
    its slot: each fault ends before the next begins. From 251 s on (12 slots), every kind at least
    twice; a shorter run draws as many kinds as fit, each at most twice."""
    rng = random.Random(seed)
    span = seconds - 35
    count = max(1, int(span // 22)) if span >= 12 * MIN_SLOT else int(span // MIN_SLOT)
    if count < 1:
        raise SystemExit(f"{seconds:.0f} s leaves no room for a fault: give at least {35 + MIN_SLOT:.0f} s")
    kinds = list(FAULT_KINDS) * 2
    rng.shuffle(kinds)
    kinds = kinds[:count] + [rng.choice(FAULT_KINDS) for _ in range(count - len(kinds))]
    rng.shuffle(kinds)
    slot = span / count
    faults = []
    for index, kind in enumerate(kinds):
        at = 10 + index * slot + rng.uniform(0, slot - MIN_SLOT)
        target = {"daphne_kill": rng.randrange(2), "cassandra_pause": rng.randint(1, 3), "rate_burst": rng.randrange(USERS)}.get(kind, 0)
        duration = rng.uniform(5, 15) if kind == "cassandra_pause" else rng.uniform(1, 3)
        faults.append(Fault(round(at, 2), kind, target, round(duration, 2)))
    return faults


# ---------------------------------------------------------------- what the clients record


@dataclass
class SendRecord:
    user: int
    conversation: str
    key: str
    responses: list[tuple[float, float, int | str]] = field(default_factory=list)  # (start, end, status or error)
    message: dict | None = None  # the acknowledged message


@dataclass
class ChangeRecord:
    """One edit or delete of an acknowledged message, over REST by its sender, retried on a 5xx or
    a lost connection (an edit retried after a lost answer may take a second change number)."""

    user: int
    conversation: str
    seq: int
    kind: str  # "updated" (an edit) or "deleted"
    content: str | None = None  # an edit's new content: "<the send's key>~e<n>"
    responses: list[tuple[float, float, int | str]] = field(default_factory=list)
    change: int | None = None  # the change number of the acknowledged answer
    acknowledged: bool = False


@dataclass
class SocketLog:
    """What one user's socket(s) for one conversation received over the whole run."""

    seqs: list[int] = field(default_factory=list)
    # (change, seq, how many messages had arrived before it): the order of changes among messages.
    changes: list[tuple[int, int, int]] = field(default_factory=list)
    connects: int = 0
    last_seq_at_first_ready: int | None = None


@dataclass
class MembershipPeriod:
    """One stay of the churning user in conversation A: added (or a ban lifted), socket open,
    removed or banned."""

    added_at: float
    how: str = "removed"  # or "banned"
    removed_at: float | None = None  # run time of the removal's answer, or of the ban's commit
    removed_wall: float | None = None  # the same moment as wall-clock time, to compare with sent_at
    closed_at: float | None = None  # run time the socket closed with 4403, or a reconnect was refused
    ready_last_seq: int | None = None  # last_seq in the first `ready`
    ready_last_change: int | None = None  # last_change in the first `ready`
    seqs: list[int] = field(default_factory=list)
    late: list[int] = field(default_factory=list)  # seqs received that were sent after the removal
    changes: list[int] = field(default_factory=list)  # change numbers received


@dataclass
class Run:
    seed: int
    seconds: float
    directory: Path
    started: float = 0.0
    sends: list[SendRecord] = field(default_factory=list)
    changes: list[ChangeRecord] = field(default_factory=list)
    sockets: dict[tuple[int, str], SocketLog] = field(default_factory=dict)
    windows: list[tuple[str, float, float]] = field(default_factory=list)  # (kind, start, end) in run time
    faults_done: Counter = field(default_factory=Counter)
    webhook_hits: list[dict] = field(default_factory=list)
    stopping: bool = False
    periods: list[MembershipPeriod] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.started


# ---------------------------------------------------------------- processes


class Services:
    """Starts and stops what the run owns; `close` stops everything, whatever happened."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.env_services = dict(os.environ, CHAT_SERVICES_DIR=str(run.directory / "services"), POSTGRES_PORT=str(free_port()))
        self.redis: RedisServer | None = None
        self.daphnes: list[LiveServer] = []
        self.worker: subprocess.Popen | None = None
        self.worker_log = None
        self.env: dict[str, str] = {}
        self.cluster_started = False
        self.postgres_started = False
        self.paused: set[int] = set()

    def services_sh(self, *args: str) -> None:
        subprocess.run([SERVICES, *args], env=self.env_services, check=True)

    def start(self, receiver_port: int) -> None:
        from tests.services import _port_open

        if any(_port_open(node, 9042) for node in CLUSTER_NODES):
            raise SystemExit(
                "a Cassandra already answers on 127.0.0.2-4: the chaos run starts and signals a cluster "
                "of its own; stop that one first (scripts/services.sh stop cluster with its CHAT_SERVICES_DIR)"
            )
        # A fresh database and metrics directory every run; the cluster gets a fresh keyspace.
        self.services_sh("stop", "postgres")
        shutil.rmtree(self.run.directory / "services" / "postgres", ignore_errors=True)
        shutil.rmtree(self.run.directory / "metrics", ignore_errors=True)
        self.postgres_started = True
        self.services_sh("start", "postgres")
        self.cluster_started = True
        self.services_sh("start", "cluster")
        self.redis = RedisServer().start()
        keyspace = f"chaos_{self.run.seed}_{uuid.uuid4().hex[:6]}"
        self.env = server_env(
            self.run.directory / "unused.sqlite3",
            DATABASE_URL=f"postgres://chat@127.0.0.1:{self.env_services['POSTGRES_PORT']}/chat",
            REDIS_URL=self.redis.url,
            CHAT_MESSAGE_STORE="cassandra",
            CASSANDRA_HOSTS=",".join(CLUSTER_NODES),
            CASSANDRA_KEYSPACE=keyspace,
            CASSANDRA_REPLICATION="SimpleStrategy:3",
            CASSANDRA_CONSISTENCY="LOCAL_QUORUM",
            CHAT_SEND_RATE=SEND_RATE_PER_USER,
            CHAT_PUSH_BACKEND="webhook",
            CHAT_WEBHOOK_URL=f"http://127.0.0.1:{receiver_port}/hook",
            CHAT_WEBHOOK_SECRET=WEBHOOK_SECRET,
            # A killed worker's claims come back after the lease, within the drain.
            CHAT_NOTIFICATION_LEASE_SECONDS="10",
            CHAT_NOTIFICATION_TIMEOUT="3",
            CHAT_NOTIFICATION_POLL_INTERVAL="0.5",
            PROMETHEUS_MULTIPROC_DIR=str(self.run.directory / "metrics"),
            CHAT_MAX_FRAME_BYTES="2097152",  # as `make run` passes daphne
        )
        (self.run.directory / "metrics").mkdir(exist_ok=True)
        migrate(self.env)
        subprocess.run([sys.executable, "manage.py", "cassandra_schema"], cwd=ROOT, env=self.env, check=True,
                       stdout=subprocess.DEVNULL)
        self.daphnes = [LiveServer(self.env, self.run.directory / f"daphne{i}.log").start(timeout=60) for i in range(2)]
        self.start_worker()

    def start_worker(self) -> None:
        if self.worker_log is not None:
            self.worker_log.close()
        self.worker_log = open(self.run.directory / "worker.log", "ab")
        self.worker = subprocess.Popen(
            [sys.executable, "manage.py", "run_notifications"], cwd=ROOT, env=self.env,
            stdout=self.worker_log, stderr=subprocess.STDOUT,
        )

    def node_pid(self, number: int) -> int:
        return int((self.run.directory / "services" / "run" / f"cluster-node{number}.pid").read_text())

    def pause_node(self, number: int) -> None:
        os.kill(self.node_pid(number), signal.SIGSTOP)
        self.paused.add(number)

    def resume_node(self, number: int) -> None:
        os.kill(self.node_pid(number), signal.SIGCONT)
        self.paused.discard(number)

    def close(self) -> None:
        for number in list(self.paused):
            self.resume_node(number)
        for daphne in self.daphnes:
            daphne.stop()
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(15)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        if self.worker_log is not None:
            self.worker_log.close()
        if self.redis is not None:
            self.redis.stop()
        if self.cluster_started:
            self.services_sh("stop", "cluster")
        if self.postgres_started:
            self.services_sh("stop", "postgres")


# ---------------------------------------------------------------- clients


class Clients:
    def __init__(self, run: Run, services: Services) -> None:
        self.run = run
        self.services = services
        self.rng = random.Random(run.seed + 1)  # the load's randomness, apart from the schedule's
        self.users: list[tuple[str, str]] = []  # (id, token)
        self.conversations: dict[str, str] = {}
        self.sockets: dict[tuple[int, str], object] = {}
        self.http: aiohttp.ClientSession | None = None

    def daphne(self, unreachable: LiveServer | None = None) -> LiveServer:
        """Either daphne, at random; not the one a request just could not reach, as a load balancer
        takes a dead backend out (a client retrying only a killed daphne would give up before its
        restart, and a request that never reached a server is no fault of the service's)."""
        return self.rng.choice([d for d in self.services.daphnes if d is not unreachable] or self.services.daphnes)

    def set_up(self) -> None:
        server = self.services.daphnes[0]
        for index in range(USERS + 1):
            user_id, token = server.signup(f"chaos{index}")
            self.users.append((user_id, token))
            if index == CHURN:
                continue  # no device: its notifications are not checked
            status, body, _ = server.request(
                "POST", "/api/v1/push/devices/", {"kind": "fcm", "token": f"chaos-device-{index}", "name": "phone"}, token=token
            )
            assert status == 201, body
        for name, members in CONVERSATIONS.items():
            owner, *others = members
            status, body, _ = server.request(
                "POST", "/api/v1/conversations/",
                {"kind": "group", "title": name, "participant_ids": [self.users[m][0] for m in others]},
                token=self.users[owner][1],
            )
            assert status == 201, body
            self.conversations[name] = body["id"]
            for member in members:
                self.run.sockets[(member, name)] = SocketLog()

    async def socket_loop(self, user: int, name: str) -> None:
        """One user's socket for one conversation: reconnects (to either daphne) with after_seq =
        the last seq it received, until the run stops and it has caught up."""
        record = self.run.sockets[(user, name)]
        token = self.users[user][1]
        while True:
            server = self.daphne()
            after = record.seqs[-1] if record.seqs else 0
            after_change = max((c for c, _, _ in record.changes), default=0)
            url = f"{server.ws}/ws/chat/?conversation_id={self.conversations[name]}&after_seq={after}&after_change={after_change}"
            try:
                async with connect(url, additional_headers={"Authorization": f"Token {token}"}, open_timeout=5) as ws:
                    self.sockets[(user, name)] = ws
                    record.connects += 1
                    async for raw in ws:
                        frame = json.loads(raw)
                        if frame["type"] == "ready" and record.last_seq_at_first_ready is None:
                            record.last_seq_at_first_ready = frame["last_seq"]
                        elif frame["type"] == "message.new":
                            record.seqs.append(frame["message"]["seq"])
                        elif frame["type"] in ("message.updated", "message.deleted"):
                            seq = frame["message"]["seq"] if frame["type"] == "message.updated" else frame["seq"]
                            record.changes.append((frame["change"], seq, len(record.seqs)))
            except Exception:  # a drop, a refused or failed handshake: reconnect (cancellation is not an Exception)
                pass
            finally:
                self.sockets.pop((user, name), None)
            if self.run.stopping and self.caught_up(user, name):
                return
            await asyncio.sleep(0.2)

    def caught_up(self, user: int, name: str) -> bool:
        record = self.run.sockets[(user, name)]
        last_change = max((c for c, _, _ in record.changes), default=0)
        return bool(record.seqs) and record.seqs[-1] >= self.last_acked_seq(name) and last_change >= self.last_acked_change(name)

    def last_acked_seq(self, name: str) -> int:
        return max((s.message["seq"] for s in self.run.sends if s.conversation == name and s.message), default=0)

    def last_acked_change(self, name: str) -> int:
        return max((c.change for c in self.run.changes if c.conversation == name and c.change), default=0)

    async def send(self, user: int, name: str, *, retries: int = 8) -> SendRecord:
        """One send with an idempotency key, retried with the same key on a 5xx, a 429 or a lost
        connection, to either daphne."""
        key = f"u{user}-{uuid.uuid4().hex[:12]}"
        record = SendRecord(user, name, key)
        self.run.sends.append(record)
        body = {"conversation_id": self.conversations[name], "content": key}
        headers = {"Authorization": f"Token {self.users[user][1]}", "Idempotency-Key": key}
        unreachable = None
        for attempt in range(retries):
            server = self.daphne(unreachable)
            started = self.run.now()
            try:
                async with self.http.post(f"{server.http}/api/v1/messages/", json=body, headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=10)) as response:
                    status = response.status
                    payload = await response.json(content_type=None)
                    retry_after = float(response.headers.get("Retry-After", "1"))
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                record.responses.append((started, self.run.now(), type(error).__name__))
                unreachable = server if isinstance(error, aiohttp.ClientConnectorError) else None
                await asyncio.sleep(0.3 * (attempt + 1))
                continue
            unreachable = None
            record.responses.append((started, self.run.now(), status))
            if status in (200, 201):
                record.message = payload
                return record
            if status == 429:
                await asyncio.sleep(min(retry_after, 5))
                continue
            if status >= 500:
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            return record  # a 4xx other than 429: recorded, not retried (the checker flags it)
        return record

    async def sender_loop(self, user: int) -> None:
        names = [name for name, members in CONVERSATIONS.items() if user in members]
        while not self.run.stopping:
            await self.send(user, self.rng.choice(names))
            await asyncio.sleep(self.rng.uniform(0.6, 1.6))

    async def change_loop(self, user: int) -> None:
        """Now and then the user edits (two times in three) or deletes one of their acknowledged
        messages that is not deleted yet, over REST to either daphne."""
        edits = Counter()
        deleted: set[tuple[str, int]] = set()
        while not self.run.stopping:
            await asyncio.sleep(self.rng.uniform(2, 5))
            mine = [s for s in self.run.sends if s.user == user and s.message and (s.conversation, s.message["seq"]) not in deleted]
            if not mine:
                continue
            send = self.rng.choice(mine)
            seq = send.message["seq"]
            if self.rng.random() < 2 / 3:
                edits[send.key] += 1
                record = ChangeRecord(user, send.conversation, seq, "updated", f"{send.key}~e{edits[send.key]}")
            else:
                deleted.add((send.conversation, seq))
                record = ChangeRecord(user, send.conversation, seq, "deleted")
            self.run.changes.append(record)
            await self.change(record)

    async def change(self, record: ChangeRecord, retries: int = 6) -> None:
        url = f"/api/v1/conversations/{self.conversations[record.conversation]}/messages/{record.seq}/"
        headers = {"Authorization": f"Token {self.users[record.user][1]}"}
        unreachable = None
        for attempt in range(retries):
            server = self.daphne(unreachable)
            started = self.run.now()
            try:
                if record.kind == "updated":
                    call = self.http.patch(f"{server.http}{url}", json={"content": record.content}, headers=headers,
                                           timeout=aiohttp.ClientTimeout(total=10))
                else:
                    call = self.http.delete(f"{server.http}{url}", headers=headers, timeout=aiohttp.ClientTimeout(total=10))
                async with call as response:
                    status = response.status
                    payload = await response.json(content_type=None)
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                record.responses.append((started, self.run.now(), type(error).__name__))
                unreachable = server if isinstance(error, aiohttp.ClientConnectorError) else None
                await asyncio.sleep(0.3 * (attempt + 1))
                continue
            unreachable = None
            record.responses.append((started, self.run.now(), status))
            if status == 200:
                # A delete retried after its answer was lost finds a tombstone: change null.
                record.acknowledged, record.change = True, payload["change"]
                return
            if status >= 500:
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            return  # a 4xx: recorded, not retried (the checker flags it)

    async def churn_loop(self) -> None:
        """The owner of A adds the churning user, who opens a socket on A; 8-15 s later the owner
        removes them, or (one time in three) a moderator bans them, and the socket must close with
        4403 and receive nothing sent or changed after. A ban is lifted 2-5 s later, which makes
        the user a member again (bans keep the participant row): the next add finds them there."""
        owner_token = self.users[CONVERSATIONS["A"][0]][1]
        churn_id = self.users[CHURN][0]
        path = f"/api/v1/conversations/{self.conversations['A']}/participants/"

        async def owner_request(method: str, target: str, body: dict | None) -> int | None:
            try:
                status, _, _ = await asyncio.to_thread(self.daphne().request, method, target, body, owner_token)
                return status
            except OSError:  # that daphne is being restarted
                return None

        while not self.run.stopping:
            await asyncio.sleep(self.rng.uniform(3, 8))
            if await owner_request("POST", path, {"user_id": churn_id}) not in (200, 201):
                continue  # try again later
            period = MembershipPeriod(added_at=self.run.now())
            socket_task = asyncio.create_task(self.churn_socket(period))
            await asyncio.sleep(self.rng.uniform(8, 15))
            if self.rng.random() < 1 / 3:
                period.how = "banned"
                await asyncio.to_thread(self.set_ban, True)
            else:
                while await owner_request("DELETE", f"{path}{churn_id}/", None) != 204:
                    await asyncio.sleep(0.5)
            period.removed_at, period.removed_wall = self.run.now(), time.time()
            await asyncio.wait([socket_task], timeout=REMOVAL_CLOSE_SECONDS_REDIS_DOWN + 5)
            socket_task.cancel()
            self.run.periods.append(period)
            if period.how == "banned":
                await asyncio.sleep(self.rng.uniform(2, 5))
                await asyncio.to_thread(self.set_ban, False)

    def set_ban(self, banned: bool) -> None:
        """Ban the churning user from A, or lift the ban, as the moderation admin does (there is
        no REST endpoint for bans): through the service, whose model signals announce it."""
        from django.db import close_old_connections

        from chat.models import Ban, Conversation
        from chat.services.conversations import ban_create

        close_old_connections()
        conversation = Conversation.objects.get(pk=self.conversations["A"])
        if banned:
            from django.contrib.auth import get_user_model

            users = get_user_model().objects
            ban_create(actor=users.get(pk=self.users[CONVERSATIONS["A"][0]][0]), conversation=conversation,
                       user=users.get(pk=self.users[CHURN][0]), reason="chaos")
        else:
            Ban.objects.get(conversation=conversation, user_id=self.users[CHURN][0]).delete()

    async def churn_socket(self, period: MembershipPeriod) -> None:
        token = self.users[CHURN][1]
        while True:
            after = period.seqs[-1] if period.seqs else period.ready_last_seq
            after_change = period.changes[-1] if period.changes else period.ready_last_change
            url = f"{self.daphne().ws}/ws/chat/?conversation_id={self.conversations['A']}"
            if after is not None:
                url += f"&after_seq={after}&after_change={after_change}"
            code = None
            try:
                async with connect(url, additional_headers={"Authorization": f"Token {token}"}, open_timeout=5) as ws:
                    try:
                        async for raw in ws:
                            frame = json.loads(raw)
                            if frame["type"] == "ready" and period.ready_last_seq is None:
                                period.ready_last_seq, period.ready_last_change = frame["last_seq"], frame["last_change"]
                            elif frame["type"] in ("message.updated", "message.deleted"):
                                period.changes.append(frame["change"])
                            elif frame["type"] == "message.new":
                                message = frame["message"]
                                period.seqs.append(message["seq"])
                                sent = datetime.fromisoformat(message["sent_at"].replace("Z", "+00:00")).timestamp()
                                if period.removed_wall is not None and sent > period.removed_wall:
                                    period.late.append(message["seq"])
                    except ConnectionClosed:
                        pass
                    code = ws.close_code
            except InvalidStatus as refused:
                if period.removed_at is not None and refused.response.status_code == 403:
                    code = 4403  # reconnecting after the removal is refused: the removal holds
            except Exception:  # a drop or a failed handshake: reconnect
                pass
            if code == 4403 and period.removed_at is not None:
                period.closed_at = self.run.now()
                return
            await asyncio.sleep(0.2)

    async def burst(self, user: int) -> None:
        """Past the rate limit: a quarter more sends at once than the per-minute budget."""
        name = next(name for name, members in CONVERSATIONS.items() if user in members)
        await asyncio.gather(*(self.send(user, name, retries=3) for _ in range(150)))

    def drop(self, rng: random.Random) -> int:
        """Cut about half the client sockets without a close frame, as a network drop would."""
        victims = [ws for ws in list(self.sockets.values()) if rng.random() < 0.5]
        for ws in victims:
            ws.transport.abort()
        return len(victims)


# ---------------------------------------------------------------- faults


async def inflict(fault: Fault, run: Run, services: Services, clients: Clients, rng: random.Random) -> None:
    start = run.now()
    if fault.kind == "daphne_kill":
        daphne = services.daphnes[fault.target]
        daphne.process.kill()
        daphne.process.wait()
        await asyncio.sleep(fault.duration)
        await asyncio.to_thread(daphne.start, 60)
        detail = f"daphne{fault.target} (port {daphne.port}) kill -9, restarted"
    elif fault.kind == "redis_restart":
        services.redis.stop()
        await asyncio.sleep(fault.duration)
        await asyncio.to_thread(services.redis.start)
        detail = "Redis down and restarted (empty)"
    elif fault.kind == "cassandra_pause":
        services.pause_node(fault.target)
        await asyncio.sleep(fault.duration)
        services.resume_node(fault.target)
        detail = f"Cassandra node{fault.target} SIGSTOP for {fault.duration:.1f} s, SIGCONT"
    elif fault.kind == "worker_kill":
        # Mid-delivery: right after the receiver got a request, while the worker has more under way.
        hits = len(run.webhook_hits)
        deadline = time.monotonic() + 10
        while len(run.webhook_hits) == hits and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        services.worker.kill()
        services.worker.wait()
        await asyncio.sleep(fault.duration)
        services.start_worker()
        detail = "notification worker kill -9, restarted"
    elif fault.kind == "drop_clients":
        detail = f"{clients.drop(rng)} client sockets dropped"
    else:
        await clients.burst(fault.target)
        detail = f"user {fault.target}: 150 sends at once (budget {SEND_RATE_PER_USER})"
    run.windows.append((fault.kind, start, run.now()))
    run.faults_done[fault.kind] += 1
    log(f"t={start:6.1f}s..{run.now():6.1f}s {fault.kind}: {detail}")


async def fault_loop(faults: list[Fault], run: Run, services: Services, clients: Clients) -> None:
    rng = random.Random(run.seed + 2)
    for fault in faults:
        await asyncio.sleep(max(0.0, fault.at - run.now()))
        await inflict(fault, run, services, clients, rng)


# ---------------------------------------------------------------- webhook receiver


async def start_receiver(run: Run, port: int) -> web.AppRunner:
    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("X-Chat-Signature", ""), expected):
            return web.Response(status=401)
        run.webhook_hits.append(json.loads(body))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


# ---------------------------------------------------------------- the checker


def read_histories(clients: Clients, services: Services, violations: list[str]) -> dict[str, list[dict]]:
    """Each conversation's whole history, read back over REST in pages."""
    server = services.daphnes[0]
    histories: dict[str, list[dict]] = {}
    for name, conversation in clients.conversations.items():
        owner_token = clients.users[CONVERSATIONS[name][0]][1]
        messages, after = [], 0
        while True:
            status, page, _ = server.request(
                "GET", f"/api/v1/conversations/{conversation}/messages/?after_seq={after}&limit=200", token=owner_token
            )
            if status != 200:
                violations.append(f"history of {name}: HTTP {status}")
                break
            messages += page["results"]
            if not page["has_more"] or not page["results"]:
                break
            after = page["results"][-1]["seq"]
        histories[name] = messages
    return histories


def read_change_logs(clients: Clients, services: Services, violations: list[str]) -> dict[str, list[dict]]:
    """Each conversation's whole change log (GET changes/), read back in pages."""
    server = services.daphnes[0]
    logs: dict[str, list[dict]] = {}
    for name, conversation in clients.conversations.items():
        owner_token = clients.users[CONVERSATIONS[name][0]][1]
        entries, after = [], 0
        while True:
            status, page, _ = server.request(
                "GET", f"/api/v1/conversations/{conversation}/changes/?after_change={after}&limit=200", token=owner_token
            )
            if status != 200:
                violations.append(f"change log of {name}: HTTP {status}")
                break
            entries += page["results"]
            if not page["has_more"] or not page["results"]:
                break
            after = page["results"][-1]["change"]
        logs[name] = entries
    return logs


def expected_content(run: Run, name: str, seq: int, key: str) -> tuple[set[str], str | None]:
    """What a message may read back as after its edits and deletes: (every content it may hold,
    "" standing for the tombstone; the one it must hold when its last change was acknowledged,
    else None). An unacknowledged change may or may not have been applied."""
    attempts = [c for c in run.changes if c.conversation == name and c.seq == seq]
    allowed = {key} | {c.content if c.kind == "updated" else "" for c in attempts}
    if not attempts:
        return allowed, key
    last = attempts[-1]  # one user changes their own messages one at a time, in this order
    if not last.acknowledged:
        return allowed, None
    return allowed, last.content if last.kind == "updated" else ""


def check_history(run: Run, histories: dict[str, list[dict]]) -> list[str]:
    """Every acknowledged send is in history exactly once, in seq order, with no hole (a failed
    send uses no seq), reading as its edits and deletes left it; no idempotency key (the content,
    or the start of an edit's) produced two messages."""
    violations = []
    for name, messages in histories.items():
        seqs = [m["seq"] for m in messages]
        if seqs != list(range(1, len(seqs) + 1)):
            missing = sorted(set(range(1, max(seqs, default=0) + 1)) - set(seqs))
            violations.append(f"{name}: history seqs are not 1..{len(seqs)} in order (holes {missing[:10]})")
        # A tombstone has no content left to compare; only acknowledged sends are deleted, and
        # those are checked one by one below.
        for key, count in Counter(m["content"].split("~")[0] for m in messages if not m.get("deleted")).items():
            if count > 1:
                violations.append(f"{name}: idempotency key {key} produced {count} messages")
        by_id = {m["message_id"]: m for m in messages}
        for send in run.sends:
            if send.conversation != name or send.message is None:
                continue
            stored = by_id.get(send.message["message_id"])
            if stored is None or stored["seq"] != send.message["seq"]:
                violations.append(f"{name}: acknowledged send {send.key} (seq {send.message['seq']}) is not in history as acknowledged")
                continue
            allowed, required = expected_content(run, name, stored["seq"], send.key)
            content = "" if stored.get("deleted") else stored["content"]
            if content not in allowed or (required is not None and content != required):
                violations.append(f"{name} seq {stored['seq']}: reads {content!r} (deleted: {stored.get('deleted')}), "
                                  f"not what its acknowledged send and changes left ({required!r})")
    return violations


def check_change_log(run: Run, logs: dict[str, list[dict]]) -> list[str]:
    """Each conversation's change numbers are 1..last in order; every acknowledged edit or delete
    is in the log exactly once, with the number, kind and seq it was acknowledged with (a delete
    retried after its answer was lost is acknowledged with change null: its seq has one delete
    all the same); every entry is a change the load attempted."""
    violations = []
    for name, entries in logs.items():
        numbers = [e["change"] for e in entries]
        if numbers != list(range(1, len(numbers) + 1)):
            violations.append(f"{name}: change numbers are not 1..{len(numbers)} in order ({numbers[:20]})")
        by_number = defaultdict(list)
        for entry in entries:
            by_number[entry["change"]].append(entry)
        deletes = Counter(e["seq"] for e in entries if e["kind"] == "deleted")
        attempted = {(c.kind, c.seq) for c in run.changes if c.conversation == name}
        for entry in entries:
            if (entry["kind"], entry["seq"]) not in attempted:
                violations.append(f"{name} change {entry['change']}: {entry['kind']} of seq {entry['seq']}, which nobody asked for")
        for seq, count in deletes.items():
            if count > 1:
                violations.append(f"{name} seq {seq}: deleted {count} times in the change log")
        for record in run.changes:
            if record.conversation != name or not record.acknowledged:
                continue
            label = f"{name}: acknowledged {record.kind} of seq {record.seq} (change {record.change})"
            if record.change is None:
                if record.kind != "deleted" or deletes[record.seq] != 1:
                    violations.append(f"{label} is not in the change log once")
                continue
            found = by_number.get(record.change, [])
            if len(found) != 1 or found[0]["kind"] != record.kind or found[0]["seq"] != record.seq:
                violations.append(f"{label} is not in the change log once with its number: {found}")
            elif record.kind == "deleted" and deletes[record.seq] != 1:
                violations.append(f"{label} is not in the change log once")
    return violations


def check_deleted_content(run: Run, histories: dict[str, list[dict]], logs: dict[str, list[dict]]) -> list[str]:
    """A message whose delete was acknowledged reads back as a tombstone (deleted, content "",
    metadata {}), and none of what it ever said (its send's key, the content of any edit of it)
    is anywhere in its conversation's history or change log."""
    violations = []
    keys = {(s.conversation, s.message["seq"]): s.key for s in run.sends if s.message}
    for name, messages in histories.items():
        by_seq = {m["seq"]: m for m in messages}
        readable = json.dumps([messages, logs.get(name, [])])
        for record in run.changes:
            if record.conversation != name or record.kind != "deleted" or not record.acknowledged:
                continue
            stored = by_seq.get(record.seq)
            if stored is None or not stored.get("deleted") or stored["content"] != "" or stored.get("metadata"):
                violations.append(f"{name} seq {record.seq}: deleted, but history does not show a tombstone: {stored}")
            # Every edit's content starts with the key, so this finds them too.
            if keys[(name, record.seq)] in readable:
                violations.append(f"{name} seq {record.seq}: deleted, but its content {keys[(name, record.seq)]} is still readable")
    return violations


def check_socket_changes(run: Run, logs: dict[str, list[dict]]) -> list[str]:
    """Every user's socket for a conversation, over all its reconnects, got every change of the
    conversation once, in change order, for the seq the log has, and each only after the message
    it changes."""
    violations = []
    for (user, name), record in run.sockets.items():
        log_seqs = {e["change"]: e["seq"] for e in logs[name]}
        numbers = [change for change, _, _ in record.changes]
        if numbers != [e["change"] for e in logs[name]]:
            duplicates = [c for c, n in Counter(numbers).items() if n > 1]
            missing = sorted(set(log_seqs) - set(numbers))
            violations.append(
                f"user {user} in {name}: received {len(numbers)} of {len(log_seqs)} changes "
                f"(missing {missing[:10]}, duplicated {duplicates[:10]}, in order: {numbers == sorted(numbers)})"
            )
        for change, seq, messages_before in record.changes:
            if change in log_seqs and log_seqs[change] != seq:
                violations.append(f"user {user} in {name}: change {change} came for seq {seq}, the log has seq {log_seqs[change]}")
            if seq not in record.seqs[:messages_before]:
                violations.append(f"user {user} in {name}: change {change} of seq {seq} came before the message")
    return violations


def check_sockets(run: Run, histories: dict[str, list[dict]]) -> list[str]:
    """Every user's socket for a conversation, over all its reconnects, got every message once, in order."""
    violations = []
    for (user, name), record in run.sockets.items():
        last = len(histories[name])
        if record.seqs != list(range(1, last + 1)):
            duplicates = [s for s, c in Counter(record.seqs).items() if c > 1]
            missing = sorted(set(range(1, last + 1)) - set(record.seqs))
            violations.append(
                f"user {user} in {name}: received {len(record.seqs)} of {last} messages "
                f"(missing {missing[:10]}, duplicated {duplicates[:10]}, in order: {record.seqs == sorted(record.seqs)})"
            )
    return violations


def wall_time(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def check_membership(run: Run, logs: dict[str, list[dict]]) -> list[str]:
    """Each removal or ban closed the member's socket with 4403 within the promised time (longer
    when Redis was down around it), it received nothing sent or changed after it, and while a
    member it got every message and every change from its first `ready` on, once, in order."""
    violations = []
    changed_at = {e["change"]: wall_time(e["at"]) for e in logs.get("A", [])}
    for number, period in enumerate(run.periods):
        label = f"membership period {number} (added t={period.added_at:.1f}s, {period.how} t={period.removed_at:.1f}s)"
        redis_down_nearby = any(
            kind == "redis_restart" and start - 3 <= period.removed_at <= end + 3 for kind, start, end in run.windows
        )
        limit = REMOVAL_CLOSE_SECONDS_REDIS_DOWN if redis_down_nearby else REMOVAL_CLOSE_SECONDS
        if period.closed_at is None:
            violations.append(f"{label}: the socket did not close with 4403")
        elif period.closed_at - period.removed_at > limit:
            violations.append(f"{label}: the socket closed {period.closed_at - period.removed_at:.1f} s after the removal (limit {limit:.0f} s)")
        if period.late:
            violations.append(f"{label}: received seqs {period.late[:10]} sent after the removal")
        late_changes = [c for c in period.changes if changed_at.get(c, 0) > period.removed_wall]
        if late_changes:
            violations.append(f"{label}: received changes {late_changes[:10]} made after the removal")
        if period.ready_last_seq is not None:
            expected = list(range(period.ready_last_seq + 1, period.ready_last_seq + 1 + len(period.seqs)))
            if period.seqs != expected:
                violations.append(f"{label}: received {period.seqs[:20]}..., not one each of the seqs after {period.ready_last_seq}")
            expected = list(range(period.ready_last_change + 1, period.ready_last_change + 1 + len(period.changes)))
            if period.changes != expected:
                violations.append(f"{label}: received changes {period.changes[:20]}..., not one each of those after {period.ready_last_change}")
    return violations


def check_statuses(run: Run) -> tuple[list[str], Counter]:
    """Every 5xx of a send, an edit or a delete was a 503 of a request in flight during a Cassandra
    fault window (one sent a moment before the pause is answered during it); those that started
    with Redis down succeeded (or were rate limited); no other 4xx than 429; every one was
    answered."""
    violations: list[str] = []
    cassandra = [(s, e + CASSANDRA_GRACE) for kind, s, e in run.windows if kind == "cassandra_pause"]
    redis_down = [(s, e) for kind, s, e in run.windows if kind == "redis_restart"]
    status_counts: Counter = Counter()
    requests = [(f"send {s.key}", s.responses, s.message is not None) for s in run.sends]
    requests += [(f"{c.kind} of {c.conversation} seq {c.seq}", c.responses, c.acknowledged) for c in run.changes]
    for label, responses, acknowledged in requests:
        for started, answered, status in responses:
            status_counts[status] += 1
            if not isinstance(status, int):
                continue  # a lost connection (a daphne killed): the client retried
            in_flight_during_fault = any(started <= e and answered >= s for s, e in cassandra)
            if status >= 500 and (status != 503 or not in_flight_during_fault):
                violations.append(f"{label} at t={started:.1f}s: HTTP {status} outside a Cassandra fault window")
            if any(s <= started <= e for s, e in redis_down) and status not in (200, 201, 429):
                violations.append(f"{label} at t={started:.1f}s with Redis down: HTTP {status}")
            if 400 <= status < 500 and status != 429:
                violations.append(f"{label} at t={started:.1f}s: HTTP {status}")
        if not acknowledged and not any(status == 429 for _, _, status in responses):
            violations.append(f"{label} was never acknowledged: {responses}")
    return violations, status_counts


def check(run: Run, clients: Clients, services: Services) -> tuple[list[str], dict]:
    violations: list[str] = []
    histories = read_histories(clients, services, violations)
    logs = read_change_logs(clients, services, violations)
    violations += check_history(run, histories)
    violations += check_change_log(run, logs)
    violations += check_deleted_content(run, histories, logs)
    violations += check_sockets(run, histories)
    violations += check_socket_changes(run, logs)
    violations += check_membership(run, logs)
    status_violations, status_counts = check_statuses(run)
    violations += status_violations
    notification_figures = check_notifications(run, clients, histories, violations)
    figures = {
        "seed": run.seed,
        "seconds": run.seconds,
        "sends_acknowledged": sum(1 for s in run.sends if s.message),
        "sends_attempted": len(run.sends),
        "responses": {str(k): v for k, v in sorted(status_counts.items(), key=str)},
        "messages_in_history": {name: len(m) for name, m in histories.items()},
        "edits_acknowledged": sum(1 for c in run.changes if c.acknowledged and c.kind == "updated"),
        "deletes_acknowledged": sum(1 for c in run.changes if c.acknowledged and c.kind == "deleted"),
        "changes_attempted": len(run.changes),
        "changes_in_log": {name: len(entries) for name, entries in logs.items()},
        "socket_connects": sum(r.connects for r in run.sockets.values()),
        "membership_removals": sum(1 for p in run.periods if p.how == "removed"),
        "membership_bans": sum(1 for p in run.periods if p.how == "banned"),
        "faults": dict(run.faults_done),
        **notification_figures,
        "violations": len(violations),
    }
    return violations, figures


def check_notifications(run: Run, clients: Clients, histories: dict[str, list[dict]], violations: list[str]) -> dict:
    """Every notification due reached the receiver exactly once per device, counted by delivery id,
    or is in the dead letters with a reason."""
    from notifications.models import Delivery, OutboxEntry

    entries = {str(e.message_id): e for e in OutboxEntry.objects.all()}
    for name, messages in histories.items():
        for message in messages:
            entry = entries.get(message["message_id"])
            if entry is None:
                violations.append(f"{name} seq {message['seq']}: no outbox entry (its notifications were never queued)")
            elif entry.status != "done":
                violations.append(f"{name} seq {message['seq']}: outbox entry {entry.status} after the drain ({entry.last_error})")
    received = defaultdict(int)
    for hit in run.webhook_hits:
        received[int(hit["delivery_id"])] += 1
    deliveries = list(Delivery.objects.select_related("outbox").all())
    per_device = Counter((d.outbox_id, d.device_id) for d in deliveries)
    for (outbox, device), count in per_device.items():
        if count > 1:
            violations.append(f"outbox {outbox}: {count} deliveries to device {device}")
    statuses = Counter(d.status for d in deliveries)
    for delivery in deliveries:
        if delivery.status == "done" and not received[delivery.id]:
            violations.append(f"delivery {delivery.id} is done but the receiver never got it")
        elif delivery.status == "dead" and not delivery.last_error:
            violations.append(f"delivery {delivery.id} is dead without a reason")
        elif delivery.status == "pending":
            violations.append(f"delivery {delivery.id} still pending after the drain")
    known = {d.id for d in deliveries}
    for delivery_id in received:
        if delivery_id not in known:
            violations.append(f"the receiver got delivery {delivery_id}, which does not exist")
    # Each message is due to every other member's device, except a member whose read marker
    # already covered it when the worker expanded it: here, one who sent a later message there
    # (a send moves its sender's marker), since nobody else moves a marker in this run.
    user_index = {user_id: index for index, (user_id, _) in enumerate(clients.users)}
    delivered_to = {(d.outbox.message_id, d.user_id) for d in deliveries}
    for name, messages in histories.items():
        last_sent = defaultdict(int)  # user index -> seq of their latest message
        for message in messages:
            last_sent[user_index[message["sender_id"]]] = message["seq"]
        for message in messages:
            for member in CONVERSATIONS[name]:
                user_id = clients.users[member][0]
                if user_id == message["sender_id"] or last_sent[member] > message["seq"]:
                    continue
                if (uuid.UUID(message["message_id"]), uuid.UUID(user_id)) not in delivered_to:
                    violations.append(f"{name} seq {message['seq']}: no delivery to user {member}'s device")
    return {
        "deliveries": dict(statuses),
        "webhook_requests": len(run.webhook_hits),
        "webhook_repeats_same_delivery_id": sum(c - 1 for c in received.values() if c > 1),
    }


# ---------------------------------------------------------------- main


async def drain(run: Run, clients: Clients, seconds: float = 90) -> None:
    """Wait until every socket has every acknowledged message and no notification is pending."""
    from notifications.models import Delivery, OutboxEntry

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sockets_done = all(clients.caught_up(u, n) for (u, n) in run.sockets)
        pending = await asyncio.to_thread(
            lambda: OutboxEntry.objects.filter(status="pending").count() + Delivery.objects.filter(status="pending").count()
        )
        if sockets_done and pending == 0:
            return
        await asyncio.sleep(1)
    log("drain: not everything settled within the drain time; the checker reports what is missing")


async def main_async(run: Run, services: Services) -> int:
    receiver_port = free_port()
    receiver = await start_receiver(run, receiver_port)
    try:
        await asyncio.to_thread(services.start, receiver_port)
        import django

        # REDIS_URL too: a ban made here announces itself through the channel layer.
        os.environ.update({k: v for k, v in services.env.items() if k in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE", "REDIS_URL")})
        django.setup()
        clients = Clients(run, services)
        await asyncio.to_thread(clients.set_up)
        faults = fault_schedule(run.seed, run.seconds)
        async with aiohttp.ClientSession() as http:
            clients.http = http
            run.started = time.monotonic()
            log(f"load on for {run.seconds:.0f} s: {USERS} users, {len(run.sockets)} sockets, {len(faults)} faults")
            socket_tasks = [asyncio.create_task(clients.socket_loop(u, n)) for (u, n) in run.sockets]
            senders = [asyncio.create_task(clients.sender_loop(u)) for u in range(USERS)]
            senders += [asyncio.create_task(clients.change_loop(u)) for u in range(USERS)]
            senders.append(asyncio.create_task(clients.churn_loop()))
            faults_task = asyncio.create_task(fault_loop(faults, run, services, clients))
            await asyncio.sleep(run.seconds)
            await faults_task
            run.stopping = True
            await asyncio.gather(*senders)
            log("load off; draining")
            await drain(run, clients)
            for ws in list(clients.sockets.values()):
                await ws.close()
            await asyncio.wait(socket_tasks, timeout=10)
            for task in socket_tasks:
                task.cancel()
            violations, figures = await asyncio.to_thread(check, run, clients, services)
    finally:
        await receiver.cleanup()
    (run.directory / "result.json").write_text(json.dumps(figures, indent=2))
    # Every send's attempts, for looking into a failing seed: (start, end, status or error) in run time.
    with open(run.directory / "sends.jsonl", "w") as sends:
        for send in run.sends:
            sends.write(json.dumps({"key": send.key, "user": send.user, "conversation": send.conversation,
                                    "responses": send.responses, "seq": send.message and send.message["seq"]}) + "\n")
    with open(run.directory / "changes.jsonl", "w") as changes:
        for change in run.changes:
            changes.write(json.dumps({"kind": change.kind, "user": change.user, "conversation": change.conversation, "seq": change.seq,
                                      "responses": change.responses, "change": change.change, "acknowledged": change.acknowledged}) + "\n")
    for violation in violations[:50]:
        log(f"VIOLATION {violation}")
    log(json.dumps(figures))
    log(f"{len(violations)} violations; seed {run.seed} (rerun: make chaos CHAOS_SEED={run.seed} CHAOS_SECONDS={run.seconds:.0f})")
    return 1 if violations else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("CHAOS_SECONDS") or 300))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(10**6)))
    args = parser.parse_args()
    directory = Path(os.environ.get("CHAOS_DIR") or ROOT / ".chaos").resolve()
    directory.mkdir(parents=True, exist_ok=True)
    run = Run(seed=args.seed, seconds=args.seconds, directory=directory)
    faults = fault_schedule(run.seed, run.seconds)  # refuses a run too short for the schedule, before starting anything
    log(f"seed {run.seed}; runtime dir {directory}; fault schedule:")
    for fault in faults:
        log(f"  t={fault.at:6.1f}s {fault.kind} target={fault.target} duration={fault.duration}s")
    services = Services(run)
    try:
        status = asyncio.run(main_async(run, services))
    finally:
        services.close()
    sys.exit(status)


if __name__ == "__main__":
    main()
