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
import time

import pytest

from tests.live import ROOT
from tests.services import _port_open, require
from tests.store_outage import (
    SERVICES,
    assert_sends_fail_fast_and_cleanly,
    cassandra_store_server,
    conversation_of_one,
    send_until_healed,
)

pytestmark = [pytest.mark.live_server_process, pytest.mark.cassandra_cluster]

NODES = os.environ.get("CLUSTER_HOSTS", "127.0.0.2 127.0.0.3 127.0.0.4").split()
CQL_PORT = int(os.environ.get("CLUSTER_CQL_PORT", "9042"))
SERVICES_DIR = os.environ.get("CHAT_SERVICES_DIR") or str(ROOT / ".services")
RUN_DIR = os.path.join(SERVICES_DIR, "run")


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
        # A node writes its configuration when it starts: one started by an older services.sh
        # acknowledges writes before they are on disk, and a kill -9 then loses them.
        with open(os.path.join(SERVICES_DIR, "cluster", f"node{number}", "cassandra.yaml")) as config:
            assert "\ncommitlog_sync: batch\n" in config.read(), (
                f"node{number} runs an older configuration: restart the cluster (scripts/services.sh stop cluster)"
            )
    # Whatever happened, the three nodes are left running.
    with cassandra_store_server(
        tmp_path, NODES, CQL_PORT, ["start", "cluster"],
        CASSANDRA_REPLICATION="SimpleStrategy:3", CASSANDRA_CONSISTENCY="LOCAL_QUORUM",
    ) as served:
        yield served


async def test_sends_survive_one_node_fail_fast_without_quorum_and_heal(cluster_server):
    server, database = cluster_server
    async with conversation_of_one(server) as (socket, send, history):

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
        await assert_sends_fail_fast_and_cleanly(server, database, socket, send, "node2 and node3 down")

        # The killed nodes come back (30-40 s). Off the event loop: the socket keeps answering
        # daphne's pings meanwhile, or daphne would drop it as dead.
        await asyncio.to_thread(subprocess.run, [SERVICES, "start", "cluster"], check=True)
        status, healed = await send_until_healed(send, "after the nodes are back")
        assert status == 201, healed
        assert json.loads(await asyncio.wait_for(socket.recv(), 5))["message"] == healed
        accepted.append(healed)

        assert [m["seq"] for m in accepted] == list(range(accepted[0]["seq"], accepted[0]["seq"] + len(accepted)))
        status, page, _ = history()
        assert status == 200
        assert [m["content"] for m in page["results"]] == [m["content"] for m in accepted]
