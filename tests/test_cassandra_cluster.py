"""A three-node Cassandra (`scripts/services.sh cluster`, keyspace RF 3, LOCAL_QUORUM) losing nodes
under a running daphne: with one node killed sends keep succeeding; with two down they fail fast
with 503, publishing and queueing nothing; when the nodes return, sends heal without a restart.

Run by `make test-cluster`; the default run leaves it out (marker `cassandra_cluster`), since it
needs the cluster, which takes half a minute to start (docs/reliability.md)."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from websockets.asyncio.client import connect

from tests.live import ROOT, LiveServer, migrate, server_env
from tests.services import _port_open, require
from tests.test_cassandra_outage import SERVICES, outbox_rows

pytestmark = [pytest.mark.live_server_process, pytest.mark.cassandra_cluster]

NODES = os.environ.get("CLUSTER_HOSTS", "127.0.0.2 127.0.0.3 127.0.0.4").split()
CQL_PORT = int(os.environ.get("CLUSTER_CQL_PORT", "9042"))
RUN_DIR = os.path.join(os.environ.get("CHAT_SERVICES_DIR") or str(ROOT / ".services"), "run")


def node_up(number: int) -> bool:
    return _port_open(NODES[number - 1], CQL_PORT)


def kill_node(number: int) -> None:
    """kill -9, as a crash: no drain, no goodbye to the gossip or the clients."""
    with open(os.path.join(RUN_DIR, f"cluster-node{number}.pid")) as pidfile:
        pid = int(pidfile.read())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while node_up(number) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not node_up(number), f"node{number} still answers after SIGKILL"


@pytest.fixture
def cluster_server(tmp_path):
    require("the three-node Cassandra cluster", all(node_up(n) for n in (1, 2, 3)), "scripts/services.sh cluster")
    for number in (1, 2, 3):
        assert os.path.exists(os.path.join(RUN_DIR, f"cluster-node{number}.pid")), (
            f"no pidfile for node{number} in {RUN_DIR}: this test kills only a cluster that this "
            "checkout's scripts/services.sh started (with the same CHAT_SERVICES_DIR)"
        )
    database = tmp_path / "db.sqlite3"
    keyspace = f"test_cluster_{uuid.uuid4().hex[:8]}"
    env = server_env(
        database,
        CHAT_MESSAGE_STORE="cassandra",
        CASSANDRA_HOSTS=",".join(NODES),
        CASSANDRA_PORT=str(CQL_PORT),
        CASSANDRA_KEYSPACE=keyspace,
        CASSANDRA_REPLICATION="SimpleStrategy:3",
        CASSANDRA_CONSISTENCY="LOCAL_QUORUM",
        CASSANDRA_REQUEST_TIMEOUT="2",
    )
    migrate(env)
    subprocess.run([sys.executable, "manage.py", "cassandra_schema"], cwd=ROOT, env=env, check=True)
    server = LiveServer(env, tmp_path / "daphne.log").start()
    yield server, database
    server.stop()
    subprocess.run([SERVICES, "start", "cluster"], check=True)  # whatever happened, leave it running
    drop = (
        f"from cassandra.cluster import Cluster; "
        f"Cluster({NODES!r}, port={CQL_PORT}).connect().execute('DROP KEYSPACE IF EXISTS {keyspace}')"
    )
    subprocess.run([sys.executable, "-c", drop], check=False)


async def test_sends_survive_one_node_fail_fast_without_quorum_and_heal(cluster_server):
    server, database = cluster_server
    _, alice = server.signup("alice")
    _, created, _ = server.request("POST", "/api/v1/conversations/", {"kind": "group", "participant_ids": []}, token=alice)
    conversation = created["id"]
    url = f"{server.ws}/ws/chat/?conversation_id={conversation}"

    def send(content):
        return server.request("POST", "/api/v1/messages/", {"conversation_id": conversation, "content": content}, token=alice)

    async with connect(url, additional_headers={"Authorization": f"Token {alice}"}) as socket:
        assert json.loads(await socket.recv())["type"] == "ready"

        async def sent_and_delivered(content):
            status, message, _ = send(content)
            assert status == 201, (content, status, message)
            assert json.loads(await asyncio.wait_for(socket.recv(), 5))["message"] == message
            return message

        accepted = [await sent_and_delivered("all three nodes up")]

        kill_node(3)
        for attempt in range(10):  # every one succeeds: two replicas of three are a quorum
            accepted.append(await sent_and_delivered(f"node3 down {attempt}"))

        kill_node(2)
        errors = server.metric("chat_message_persisted_total", 'status="error"')
        published = server.metric("chat_message_published_total", 'status="success"')
        queued = outbox_rows(database)
        for attempt in range(3):
            started = time.monotonic()
            status, body, _ = send(f"node2 and node3 down {attempt}")
            elapsed = time.monotonic() - started
            assert status == 503 and body["code"] == "unavailable", (status, body)
            assert elapsed < 5, f"a send without quorum took {elapsed:.1f} s to fail"
        assert server.metric("chat_message_persisted_total", 'status="error"') == errors + 3
        assert server.metric("chat_message_published_total", 'status="success"') == published
        assert outbox_rows(database) == queued
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(socket.recv(), 0.5)  # nothing was published

        subprocess.run([SERVICES, "start", "cluster"], check=True)  # the killed nodes come back
        deadline = time.monotonic() + 60
        while True:  # the driver reconnects by itself; daphne is not restarted
            status, healed, _ = send("after the nodes are back")
            if status == 201 or time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
        assert status == 201, healed
        assert json.loads(await asyncio.wait_for(socket.recv(), 5))["message"] == healed
        accepted.append(healed)

    assert [m["seq"] for m in accepted] == list(range(accepted[0]["seq"], accepted[0]["seq"] + len(accepted)))
    status, page, _ = server.request("GET", f"/api/v1/conversations/{conversation}/messages/", token=alice)
    assert status == 200
    assert [m["content"] for m in page["results"]] == [m["content"] for m in accepted]
