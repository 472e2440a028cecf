"""Two daphne processes sharing Redis and one database, as the service scales out (SPEC section 9).

Cross-process delivery, the rate limit and the metrics across processes, and a Redis outage with
the server actually killed mid-test and started again.
"""
import asyncio
import json
import threading
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from chat.events import RETRY_DELAYS_SECONDS
from chat.recheck import SETTLE_SECONDS
from tests.live import LiveServer, migrate, server_env
from tests.redis_server import RedisServer, redis_server_binary
from tests.services import require

pytestmark = pytest.mark.live_server_process

SEND_RATE_LIMIT = 30


@pytest.fixture(scope="module")
def redis_server():
    require("Redis (redis-server binary)", redis_server_binary() is not None)
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    directory = tmp_path_factory.mktemp("cluster")
    metrics_dir = directory / "prometheus"
    metrics_dir.mkdir()
    env = server_env(
        directory / "db.sqlite3",
        REDIS_URL=redis_server.url,
        CHAT_SEND_RATE=f"{SEND_RATE_LIMIT}/min",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    migrate(env)
    servers = [LiveServer(env, directory / f"daphne-{i}.log").start() for i in range(2)]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def people(cluster):
    a = cluster[0]
    alice_id, alice = a.signup("alice")
    bob_id, bob = a.signup("bob")
    status, conversation, _ = a.request(
        "POST", "/api/v1/conversations/", {"kind": "group", "participant_ids": [bob_id]}, token=alice
    )
    assert status == 201
    status, probe, _ = a.request(
        "POST", "/api/v1/conversations/", {"kind": "group", "participant_ids": [bob_id], "title": "probe"}, token=alice
    )
    assert status == 201
    return {"alice": alice, "bob": bob, "conversation": conversation["id"], "probe": probe["id"]}


def ws_url(server, conversation_id, after_seq=None):
    url = f"{server.ws}/ws/chat/?conversation_id={conversation_id}"
    return url + (f"&after_seq={after_seq}" if after_seq is not None else "")


def alice_and_bob_in_a_new_conversation(server, people, title):
    """Alice's and bob's profiles, and the id of a new group conversation of the two."""
    status, alice_profile, _ = server.request("GET", "/api/v1/users/me/", token=people["alice"])
    assert status == 200, alice_profile
    status, bob_profile, _ = server.request("GET", "/api/v1/users/me/", token=people["bob"])
    assert status == 200, bob_profile
    status, created, _ = server.request(
        "POST", "/api/v1/conversations/", {"kind": "group", "participant_ids": [bob_profile["id"]], "title": title},
        token=people["alice"],
    )
    assert status == 201, created
    return alice_profile, bob_profile, created["id"]


async def frames_of_type(socket, kind, count, timeout=10):
    found = []
    deadline = time.monotonic() + timeout
    while len(found) < count:
        frame = json.loads(await asyncio.wait_for(socket.recv(), max(deadline - time.monotonic(), 0.01)))
        if frame["type"] == kind:
            found.append(frame)
    return found


def send(server, token, conversation, content, **headers):
    return server.request(
        "POST", "/api/v1/messages/", {"conversation_id": conversation, "content": content}, token=token, headers=headers
    )


async def test_messages_cross_processes_in_order(cluster, people):
    a, b = cluster
    conversation = people["conversation"]
    async with connect(ws_url(a, conversation), additional_headers={"Authorization": f"Token {people['alice']}"}) as on_a, \
            connect(ws_url(b, conversation), additional_headers={"Authorization": f"Token {people['bob']}"}) as on_b:
        ready = json.loads(await on_a.recv())
        await on_b.recv()
        sent = []
        for i in range(10):
            server = cluster[i % 2]
            status, message, _ = send(server, people["alice"], conversation, f"m{i}")
            assert status == 201
            sent.append(message)
        await on_b.send(json.dumps({"type": "message.send", "client_message_id": "from-b", "content": "via ws on b"}))
        for socket in (on_a, on_b):
            received = [f["message"] for f in await frames_of_type(socket, "message.new", 11)]
            assert received[:10] == sent
            assert [m["seq"] for m in received] == list(range(ready["last_seq"] + 1, ready["last_seq"] + 12))


def test_rate_limit_holds_across_processes(cluster):
    a, b = cluster
    _, token = a.signup("burster")
    status, conversation, _ = a.request("POST", "/api/v1/conversations/", {"kind": "group", "participant_ids": []}, token=token)
    statuses = []
    # The limit counts in fixed windows of a minute (core.ratelimit): a burst that crossed into the
    # next window would rightly get a second allowance. Start it at the beginning of a window.
    into_window = time.time() % 60
    if into_window > 30:
        time.sleep(60 - into_window + 0.1)

    def burst(server):
        for i in range(25):
            statuses.append(send(server, token, conversation["id"], f"burst {i}")[0])

    threads = [threading.Thread(target=burst, args=(server,)) for server in (a, b, a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses.count(201) == SEND_RATE_LIMIT
    assert statuses.count(429) == 100 - SEND_RATE_LIMIT


def test_metrics_sum_over_processes(cluster, people):
    a, b = cluster
    series = ("chat_message_created_total", 'is_encrypted="false",message_type="text"')
    before = a.metric(*series)
    assert send(a, people["bob"], people["conversation"], "counted on a")[0] == 201
    assert send(b, people["bob"], people["conversation"], "counted on b")[0] == 201
    assert a.metric(*series) == b.metric(*series) == before + 2


async def test_redis_outage_keeps_sends_durable_and_nothing_is_lost(cluster, people, redis_server):
    a, b = cluster
    conversation = people["conversation"]
    headers = {"Authorization": f"Token {people['bob']}"}
    status, page, _ = a.request("GET", f"/api/v1/conversations/{conversation}/messages/?limit=1", token=people["bob"])
    last_seen = page["results"][-1]["seq"] if page["results"] else 0
    errors_before = b.metric("chat_redis_publish_error_total")

    async with connect(ws_url(a, conversation), additional_headers=headers) as open_through_outage:
        assert json.loads(await open_through_outage.recv())["type"] == "ready"
        redis_server.stop()
        started = time.monotonic()
        status, during, _ = send(b, people["alice"], conversation, "sent while Redis is down")
        assert status == 201
        assert time.monotonic() - started < 3
        status, page, _ = b.request(
            "GET", f"/api/v1/conversations/{conversation}/messages/?after_seq={last_seen}", token=people["bob"]
        )
        assert [m["message_id"] for m in page["results"]] == [during["message_id"]]
        # At least this message's publish failed (presence events published meanwhile count too).
        assert b.metric("chat_redis_publish_error_total") >= errors_before + 1

        redis_server.start()  # same port: the service reconnects by itself, no restart
        await wait_until_delivery_works(a, b, people)
        status, after, _ = send(b, people["alice"], conversation, "sent after Redis is back")
        assert status == 201
        # The socket that stayed open gets the lost publish from the store, then the new one, in order.
        assert [f["message"] for f in await frames_of_type(open_through_outage, "message.new", 2)] == [during, after]

    async with connect(ws_url(a, conversation, after_seq=last_seen), additional_headers=headers) as socket:
        assert json.loads(await socket.recv())["type"] == "ready"
        received = [f["message"] for f in await frames_of_type(socket, "message.new", 2)]
        assert received == [during, after]
        status, live, _ = send(b, people["alice"], conversation, "live again")
        assert [f["message"] for f in await frames_of_type(socket, "message.new", 1)] == [live]


async def wait_until_delivery_works(receiving, sending, people, timeout=20):
    """Until a message sent through `sending` reaches a socket on `receiving` live: Redis is back
    and `receiving`'s subscriptions are restored. Probed on a conversation of its own, so the
    conversation under test sees no extra messages."""
    headers = {"Authorization": f"Token {people['bob']}"}
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with connect(ws_url(receiving, people["probe"]), additional_headers=headers, open_timeout=3) as socket:
                assert json.loads(await asyncio.wait_for(socket.recv(), 3))["type"] == "ready"
                status, probe, _ = send(sending, people["alice"], people["probe"], "probe")
                assert status == 201
                frames = await frames_of_type(socket, "message.new", 1, timeout=2)
                assert frames[0]["message"]["message_id"] == probe["message_id"]
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


async def test_presence_works_again_on_both_processes_after_a_redis_restart(cluster, people):
    """After the Redis outage above every pooled presence connection of both processes is dead: a
    join must still reach Redis and announce its user (chat.presence retries on a new connection)."""
    a, b = cluster
    # A conversation of its own: no presence entry of the other tests' sockets lingers in it.
    alice_profile, bob_profile, conversation = alice_and_bob_in_a_new_conversation(a, people, "presence")
    async with connect(ws_url(a, conversation), additional_headers={"Authorization": f"Token {people['alice']}"}) as watching:
        assert json.loads(await watching.recv())["type"] == "ready"
        # A subscription takes effect when Redis has processed it, which nobody waits for (presence is
        # best effort; messages are caught up from the store): give it the consumer's settle time.
        await asyncio.sleep(SETTLE_SECONDS)
        async with connect(ws_url(b, conversation), additional_headers={"Authorization": f"Token {people['bob']}"}) as joining:
            assert json.loads(await joining.recv())["type"] == "ready"
            [online] = await frames_of_type(watching, "presence", 1)
            assert (online["user_id"], online["online"]) == (bob_profile["id"], True)
            [seen] = await frames_of_type(joining, "presence", 1)  # and bob is told alice is online
            assert (seen["user_id"], seen["online"]) == (alice_profile["id"], True)


async def test_a_removal_lost_with_redis_closes_the_socket_before_anything_sent_after_it(cluster, people, redis_server):
    """A removal committed while Redis is down, whose announcement never gets through (its retries
    end before Redis is back): once the process's subscriptions are back, the removed member's
    socket closes with 4403 before anything published since reaches it, not at the periodic
    re-check 30 s later."""
    a, b = cluster
    carol_id, carol = a.signup("carol-removed-in-outage")
    status, created, _ = a.request(
        "POST", "/api/v1/conversations/", {"kind": "group", "participant_ids": [carol_id], "title": "outage removal"},
        token=people["alice"],
    )
    assert status == 201, created
    conversation = created["id"]
    async with connect(ws_url(a, conversation), additional_headers={"Authorization": f"Token {carol}"}) as removed:
        assert json.loads(await removed.recv())["type"] == "ready"
        redis_server.stop()
        status, body, _ = b.request(
            "DELETE", f"/api/v1/conversations/{conversation}/participants/{carol_id}/", token=people["alice"]
        )
        assert status == 204, body
        # Past every retry of the revocation's publish (chat.events.RETRY_DELAYS_SECONDS): lost for good.
        await asyncio.sleep(sum(RETRY_DELAYS_SECONDS) + 1)
        redis_server.start()
        await wait_until_delivery_works(a, b, people)
        status, after, _ = send(b, people["alice"], conversation, "sent after the removal")
        assert status == 201, after

        frames = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                frames.append(json.loads(await asyncio.wait_for(removed.recv(), 10)))
        assert closed.value.rcvd.code == 4403
        assert [f for f in frames if f["type"] == "message.new"] == []
    assert a.metric("chat_redis_resubscribed_total") >= 1


async def test_a_server_restart_is_no_presence_change(cluster, people):
    """A process that restarts closes its sockets with 1001 and their clients reconnect: the
    others in their conversations are told neither that those users went offline nor that they
    came back (chat.presence.SHUTDOWN_GRACE_SECONDS), and who is online is still said to the
    reconnected socket."""
    a, b = cluster
    alice_profile, bob_profile, conversation = alice_and_bob_in_a_new_conversation(a, people, "restart")
    bob_headers, alice_headers = {"Authorization": f"Token {people['bob']}"}, {"Authorization": f"Token {people['alice']}"}
    async with connect(ws_url(a, conversation), additional_headers=bob_headers) as watching:
        assert json.loads(await watching.recv())["type"] == "ready"
        await asyncio.sleep(SETTLE_SECONDS)  # bob's subscription is live (see the test above)
        async with connect(ws_url(b, conversation), additional_headers=alice_headers) as before:
            assert json.loads(await before.recv())["type"] == "ready"
            [online] = await frames_of_type(watching, "presence", 1)
            assert (online["user_id"], online["online"]) == (alice_profile["id"], True)
            await asyncio.to_thread(b.stop)  # SIGTERM: the process ends its sockets and exits
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(before.recv(), 10)
            assert closed.value.rcvd.code == 1001
        await asyncio.to_thread(b.start)
        async with connect(ws_url(b, conversation), additional_headers=alice_headers) as back:
            assert json.loads(await back.recv())["type"] == "ready"
            # Bob is online; alice's join was answered (and an announcement of hers would have been
            # published) before she is told so.
            [seen] = await frames_of_type(back, "presence", 1)
            assert (seen["user_id"], seen["online"]) == (bob_profile["id"], True)
            # Published after anything the shutdown or the reconnect announced, so everything those
            # announced reaches bob before it.
            await back.send(json.dumps({"type": "message.send", "client_message_id": "after-restart", "content": "back"}))
            received = []
            while not received or received[-1]["type"] != "message.new":
                received.append(json.loads(await asyncio.wait_for(watching.recv(), 10)))
            assert received[-1]["message"]["content"] == "back"
            assert [frame for frame in received if frame["type"] == "presence"] == []
