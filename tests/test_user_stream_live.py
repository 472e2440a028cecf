"""The user stream's guarantee on real servers (SPEC section 5, issue part 7): two daphne
processes sharing Redis and one database; 30 users, each on a user stream in 10 of 20 shared
conversations; concurrent senders through both processes; members removed and added back while
messages flow; edits and deletes while some streams are away; a third of the streams reconnecting
in a loop and resuming by cursors.

Every stream is checked frame by frame, across its reconnections, by the client a real app would
be: each message of a conversation it carries arrives exactly once in seq order with no gap (from
where ready, conversation.joined or its resume put it), each change exactly once in change order,
and nothing of a conversation arrives after its conversation.left. At the end every stream stands
exactly where each of its conversations stands on the server.
"""
from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import pytest
from websockets.asyncio.client import connect

from tests.live import LiveServer, migrate, server_env
from tests.services import REDIS_URL, redis_available, require

pytestmark = pytest.mark.live_server_process

USERS = 30
CONVERSATIONS = 20
PER_USER = 10
TRAFFIC_SECONDS = 12
RECONNECTING = range(0, USERS, 3)  # these users' streams drop and resume in a loop


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require("Redis", redis_available())
    directory = tmp_path_factory.mktemp("stream-cluster")
    env = server_env(directory / "db.sqlite3", REDIS_URL=REDIS_URL, CHAT_MEMBERSHIP_RECHECK="2")
    migrate(env)
    servers = [LiveServer(env, directory / f"daphne-{i}.log").start() for i in range(2)]
    yield servers
    for server in servers:
        server.stop()


def members_of(conversation: int) -> list[int]:
    """User i is in conversations i .. i+9 (mod 20): every conversation has 15 members."""
    return [user for user in range(USERS) if (conversation - user) % CONVERSATIONS < PER_USER]


class StreamClient:
    """One user's device: a user stream, reconnected and resumed like an app does, checked on
    every frame."""

    def __init__(self, index: int, user_id: str, token: str, server: LiveServer) -> None:
        self.index, self.user_id, self.token, self.server = index, user_id, token, server
        self.cursors: dict[str, list[int]] = {}  # conversation -> [seq, change] it has
        self.active: set[str] = set()
        self.violations: list[str] = []
        self.frames = 0
        self.log: list[str] = []  # what it saw, for the report of a violation
        self.stop = asyncio.Event()

    def violation(self, text: str) -> None:
        self.violations.append(f"user {self.index}: {text}\n    last frames: " + "\n    ".join(self.log[-12:]))

    async def run(self) -> None:
        while True:
            try:
                await self.connection(reconnect_after=random.uniform(0.5, 2.0) if self.index in RECONNECTING else None)
            except (OSError, asyncio.TimeoutError) as exc:
                self.violation(f"connection failed: {exc!r}")
                await asyncio.sleep(0.2)
            if self.done.is_set():
                return
            # Away (changes happen meanwhile); a stream that was away or closing when the traffic
            # ended comes back once more and catches up.
            await asyncio.sleep(random.uniform(0.05, 0.5))

    async def connection(self, reconnect_after: float | None) -> None:
        url = f"{self.server.ws}/ws/chat/?resume=1"
        # max_queue=None: the client library stops reading the socket while more than max_queue
        # frames wait unread, and then cannot read the server's close reply either, so leaving a
        # busy stream took its close timeout (10 s). An app's client reads on, as a browser does.
        async with connect(
            url, additional_headers={"Authorization": f"Token {self.token}"}, max_size=None, max_queue=None
        ) as socket:
            ready = json.loads(await asyncio.wait_for(socket.recv(), 10))
            if ready["type"] != "ready":
                return self.violation(f"first frame {ready}")
            carried = ready["conversations"]
            resume = {cid: {"seq": self.cursors[cid][0], "change": self.cursors[cid][1]} for cid in carried if cid in self.cursors}
            # What it knew and no longer carries was left while it was away.
            self.cursors = {cid: self.cursors.get(cid) or [state["last_seq"], state["last_change"]] for cid, state in carried.items()}
            self.active = set(carried)
            self.log.append(f"connected: ready {carried}, resume {resume}")
            await socket.send(json.dumps({"type": "resume", "cursors": resume}))
            deadline = time.monotonic() + reconnect_after if reconnect_after else None
            while True:
                if deadline is not None and time.monotonic() > deadline and not self.stop.is_set():
                    return
                if self.stop.is_set() and deadline is not None:
                    deadline = None  # the last connection stays until the end
                try:
                    text = await asyncio.wait_for(socket.recv(), 0.2)
                except asyncio.TimeoutError:
                    if self.stop.is_set() and self.done.is_set():
                        return
                    continue
                self.check(json.loads(text), carried)

    def check(self, frame: dict, carried: dict) -> None:
        self.frames += 1
        if frame["type"] not in ("presence", "typing", "read", "pong"):
            self.log.append(json.dumps({k: v for k, v in frame.items() if k != "conversation"})[:300])
        kind, cid = frame["type"], frame.get("conversation_id")
        if kind == "resumed":
            for cid, outcome in frame["conversations"].items():
                if outcome.get("forbidden"):
                    # Removed between ready and the resume: its conversation.left follows, and
                    # until then it goes on from where ready put it.
                    self.cursors[cid] = [carried[cid]["last_seq"], carried[cid]["last_change"]]
                elif not outcome["recovered"]:
                    self.violation(f"resume of {cid} not recovered: {outcome}")
                    self.cursors[cid] = [carried[cid]["last_seq"], carried[cid]["last_change"]]
            return
        if kind in ("presence", "typing", "read", "pong", "message.ack", "conversation.updated"):
            return
        if kind == "conversation.joined":
            if cid in self.active:
                return self.violation(f"joined {cid} twice")
            self.active.add(cid)
            self.cursors[cid] = [frame["last_seq"], frame["last_change"]]
            return
        if kind == "conversation.left":
            if cid not in self.active:
                return self.violation(f"left {cid} it was not in")
            self.active.discard(cid)
            self.cursors.pop(cid, None)
            return
        if cid not in self.active:
            return self.violation(f"{kind} of {cid} after its conversation.left (or before its join)")
        cursor = self.cursors[cid]
        if kind == "message.new":
            seq = frame["message"]["seq"]
            if seq != cursor[0] + 1:
                self.violation(f"{cid}: message {seq} after {cursor[0]}")
            cursor[0] = max(cursor[0], seq)
        elif kind in ("message.updated", "message.deleted"):
            change = frame["change"]
            seq = frame["message"]["seq"] if kind == "message.updated" else frame["seq"]
            if change != cursor[1] + 1:
                self.violation(f"{cid}: change {change} after {cursor[1]}")
            if seq > cursor[0]:
                self.violation(f"{cid}: change {change} of message {seq} it does not have (at {cursor[0]})")
            cursor[1] = max(cursor[1], change)
        else:
            self.violation(f"unexpected frame {frame}")


def test_every_stream_gets_everything_exactly_once_in_order_across_processes(cluster):
    random.seed(15)
    a, b = cluster
    users = [cluster[i % 2].signup(f"streamer{i}") for i in range(USERS)]
    conversations: list[str] = []
    for c in range(CONVERSATIONS):
        owner, *others = members_of(c)
        status, body, _ = a.request(
            "POST", "/api/v1/conversations/",
            {"kind": "group", "title": f"c{c}", "participant_ids": [users[u][0] for u in others]},
            token=users[owner][1],
        )
        assert status == 201, body
        conversations.append(body["id"])
    owners = {conversations[c]: members_of(c)[0] for c in range(CONVERSATIONS)}

    clients = [StreamClient(i, users[i][0], users[i][1], cluster[i % 2]) for i in range(USERS)]
    traffic_over = threading.Event()
    errors: list[str] = []
    own_messages: dict[str, list[int]] = {cid: [] for cid in conversations}
    lock = threading.Lock()

    def request(server, *args, expect=(200, 201, 204), **kwargs):
        status, body, _ = server.request(*args, **kwargs)
        if status not in expect:
            errors.append(f"{args[0]} {args[1]} -> {status} {body}")
        return status, body

    def sender(server: LiveServer) -> None:
        rng = random.Random(id(server))
        while not traffic_over.is_set():
            c = rng.randrange(CONVERSATIONS)
            cid = conversations[c]
            # The owner is never removed, so it always may send; others may just have been removed (403).
            by = owners[cid] if rng.random() < 0.4 else rng.choice(members_of(c))
            status, body = request(
                server, "POST", "/api/v1/messages/", {"conversation_id": cid, "content": f"from {by}"},
                token=users[by][1], expect=(201, 403),
            )
            if status == 201 and by == owners[cid]:
                with lock:
                    own_messages[cid].append(body["seq"])
            time.sleep(0.02)

    def churn(server: LiveServer, share: int) -> None:
        """Members removed and added back, edits and deletes, while messages flow (each churner
        its own half of the conversations, so the two never undo each other)."""
        rng = random.Random(share)
        while not traffic_over.is_set():
            c = rng.randrange(share, CONVERSATIONS, 2)
            cid = conversations[c]
            owner_token = users[owners[cid]][1]
            member = rng.choice(members_of(c)[1:])
            request(server, "DELETE", f"/api/v1/conversations/{cid}/participants/{users[member][0]}/", token=owner_token)
            time.sleep(rng.uniform(0.05, 0.3))
            request(server, "POST", f"/api/v1/conversations/{cid}/participants/", {"user_id": users[member][0]}, token=owner_token)
            with lock:
                mine = list(own_messages[cid][-5:])
            if mine:
                seq = rng.choice(mine)
                if rng.random() < 0.7:
                    request(server, "PATCH", f"/api/v1/conversations/{cid}/messages/{seq}/", {"content": "edited"},
                            token=owner_token, expect=(200, 400))  # 400: deleted meanwhile
                else:
                    request(server, "DELETE", f"/api/v1/conversations/{cid}/messages/{seq}/", token=owner_token)
            time.sleep(0.05)

    async def scenario() -> None:
        for client in clients:
            client.done = asyncio.Event()
        tasks = [asyncio.create_task(client.run()) for client in clients]
        await asyncio.sleep(1.0)  # every stream is up
        workers = [threading.Thread(target=sender, args=(server,)) for server in (a, b)]
        workers += [threading.Thread(target=churn, args=(server, share)) for share, server in enumerate((a, b))]
        for worker in workers:
            worker.start()
        await asyncio.sleep(TRAFFIC_SECONDS)
        traffic_over.set()
        await asyncio.gather(*(asyncio.to_thread(worker.join) for worker in workers))
        for client in clients:
            client.stop.set()
        # Everyone reconnects once more and catches up: then each stream must stand exactly where
        # its conversations stand.
        final = {}
        for cid in conversations:
            status, body = request(a, "GET", f"/api/v1/conversations/{cid}/", token=users[owners[cid]][1])
            final[cid] = [body["last_seq"], body["last_change"]]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(
            client.cursors.get(cid) != final[cid] for client in clients for cid in client.active
        ):
            await asyncio.sleep(0.25)
        for client in clients:
            client.done.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        for client in clients:
            for cid in client.active:
                if client.cursors.get(cid) != final[cid]:
                    client.violation(f"{cid}: ends at {client.cursors.get(cid)}, the conversation at {final[cid]}")

    asyncio.run(scenario())
    violations = [v for client in clients for v in client.violations]
    assert violations == [], "\n".join(violations[:50])
    assert errors == [], "\n".join(errors[:20])
    # It was a real run: messages, changes and membership all moved.
    assert sum(client.frames for client in clients) > 1000
