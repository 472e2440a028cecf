"""Cassandra stopped for real mid-test: sends fail fast and cleanly (503, nothing published, nothing
queued), and work again when it is back, without restarting the service."""
import asyncio
import json
import subprocess

import pytest

from tests.services import CASSANDRA_HOST, CASSANDRA_PORT, cassandra_available, require
from tests.store_outage import (
    SERVICES,
    assert_sends_fail_fast_and_cleanly,
    cassandra_store_server,
    conversation_of_one,
    send_until_healed,
)

pytestmark = pytest.mark.live_server_process


@pytest.fixture
def cassandra_server(tmp_path):
    require("Cassandra", cassandra_available())
    # Whatever happened, Cassandra is left running.
    with cassandra_store_server(tmp_path, [CASSANDRA_HOST], CASSANDRA_PORT, ["start", "cassandra"]) as served:
        yield served


async def test_cassandra_down_fails_sends_fast_and_cleanly_then_heals(cassandra_server):
    server, database = cassandra_server
    async with conversation_of_one(server) as (socket, send, history):
        status, before, _ = send("while Cassandra is up")
        assert status == 201
        assert json.loads(await socket.recv())["message"] == before

        # Off the event loop, so the socket keeps answering daphne's pings.
        await asyncio.to_thread(subprocess.run, [SERVICES, "stop", "cassandra"], check=True)
        assert not cassandra_available(), (
            "Cassandra still answers: it was not started by this checkout's scripts/services.sh, "
            "so this test cannot stop it (run `make services` from this checkout)"
        )
        await assert_sends_fail_fast_and_cleanly(server, database, socket, send, "while Cassandra is down")

        await asyncio.to_thread(subprocess.run, [SERVICES, "start", "cassandra"], check=True)
        status, after = await send_until_healed(send, "after Cassandra is back")
        assert status == 201
        assert after["seq"] == before["seq"] + 1  # the failed sends burned no seq
        assert json.loads(await asyncio.wait_for(socket.recv(), 5))["message"] == after
        _, page, _ = history()
        assert [m["content"] for m in page["results"]] == ["while Cassandra is up", "after Cassandra is back"]
