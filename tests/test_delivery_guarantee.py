"""SPEC section 5 end to end: two daphne processes sharing Redis, 50 clients, concurrent senders on
both processes, a tenth of the clients reconnecting in a loop. Every client must see every message
of its conversation exactly once, in seq order, across all its connections."""
import asyncio
import json
import random
import time

import pytest
from websockets.asyncio.client import connect

from tests.live import LiveServer, migrate, server_env
from tests.redis_server import RedisServer, redis_server_binary
from tests.services import require

pytestmark = pytest.mark.live_server_process

CONVERSATIONS = 5
CLIENTS_PER_CONVERSATION = 10
MESSAGES_PER_CONVERSATION = 40
RECONNECTING_PER_CONVERSATION = 1  # a tenth of the clients


@pytest.fixture
def cluster(tmp_path):
    require("Redis (redis-server binary)", redis_server_binary() is not None)
    redis = RedisServer().start()
    env = server_env(tmp_path / "db.sqlite3", REDIS_URL=redis.url)
    migrate(env)
    servers = [LiveServer(env, tmp_path / f"daphne-{i}.log").start() for i in range(2)]
    yield servers
    for server in servers:
        server.stop()
    redis.stop()


class Client:
    """One person's view of a conversation: every message.new seen, over however many connections."""

    def __init__(self, servers, conversation_id, token, reconnecting):
        self.servers = servers
        self.conversation_id = conversation_id
        self.token = token
        self.reconnecting = reconnecting
        self.seqs: list[int] = []
        self.connections = 0
        self.ready = asyncio.Event()

    def url(self):
        server = self.servers[self.connections % 2]  # reconnects alternate between processes
        url = f"{server.ws}/ws/chat/?conversation_id={self.conversation_id}"
        return url + (f"&after_seq={self.seqs[-1]}" if self.seqs else "&after_seq=0")

    async def run(self, done: asyncio.Event):
        while not (done.is_set() and self.complete()):
            self.connections += 1
            # max_queue=None: leaving with more than max_queue frames unread would otherwise wait out
            # the close timeout (see tests/test_user_stream_live.py).
            async with connect(self.url(), additional_headers={"Authorization": f"Token {self.token}"}, max_queue=None) as socket:
                assert json.loads(await socket.recv())["type"] == "ready"
                self.ready.set()
                stay = random.uniform(0.05, 0.3) if self.reconnecting else None
                deadline = time.monotonic() + stay if stay else None
                while not (done.is_set() and self.complete()):
                    timeout = 0.2 if deadline is None else max(deadline - time.monotonic(), 0)
                    try:
                        frame = json.loads(await asyncio.wait_for(socket.recv(), timeout))
                    except asyncio.TimeoutError:
                        if deadline is not None:
                            break  # reconnect
                        continue
                    if frame["type"] == "message.new":
                        self.seqs.append(frame["message"]["seq"])

    def complete(self):
        return len(self.seqs) >= MESSAGES_PER_CONVERSATION


async def test_exactly_once_in_order_across_processes_with_reconnects(cluster):
    a, b = cluster
    started = time.monotonic()
    senders, conversations = [], []
    for c in range(CONVERSATIONS):
        members = [await asyncio.to_thread(a.signup, f"c{c}u{i}") for i in range(CLIENTS_PER_CONVERSATION)]
        _, created, _ = a.request(
            "POST", "/api/v1/conversations/",
            {"kind": "group", "participant_ids": [user_id for user_id, _ in members[1:]]}, token=members[0][1],
        )
        conversations.append((created["id"], members))

    done = asyncio.Event()
    clients = [
        Client(cluster, conversation_id, token, reconnecting=i < RECONNECTING_PER_CONVERSATION)
        for conversation_id, members in conversations
        for i, (_, token) in enumerate(members)
    ]
    tasks = [asyncio.create_task(client.run(done)) for client in clients]
    await asyncio.wait_for(asyncio.gather(*(client.ready.wait() for client in clients)), 30)

    async def sender(conversation_id, token, server, count):
        for i in range(count):
            status, _, _ = await asyncio.to_thread(
                server.request, "POST", "/api/v1/messages/", {"conversation_id": conversation_id, "content": f"m{i}"}, token
            )
            assert status == 201

    # Two concurrent senders per conversation, one on each process.
    half = MESSAGES_PER_CONVERSATION // 2
    await asyncio.gather(
        *(
            sender(conversation_id, members[s][1], cluster[s], half)
            for conversation_id, members in conversations
            for s in (0, 1)
        )
    )
    done.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)

    expected = list(range(1, MESSAGES_PER_CONVERSATION + 1))
    for client in clients:
        assert client.seqs == expected, (client.reconnecting, client.connections, client.seqs)
    reconnects = sum(client.connections - 1 for client in clients)
    assert reconnects >= CONVERSATIONS * RECONNECTING_PER_CONVERSATION
    print(
        f"\n2 processes, {len(clients)} clients, {CONVERSATIONS * MESSAGES_PER_CONVERSATION} messages, "
        f"{reconnects} reconnects, {time.monotonic() - started:.1f} s"
    )
