"""Cassandra stopped for real mid-test: sends fail fast and cleanly (503, nothing published, nothing
queued), and work again when it is back, without restarting the service."""
import asyncio
import json
import sqlite3
import subprocess
import sys
import time
import uuid

import pytest
from websockets.asyncio.client import connect

from tests.live import ROOT, LiveServer, migrate, server_env
from tests.services import cassandra_available, require

pytestmark = pytest.mark.live_server_process

SERVICES = str(ROOT / "scripts" / "services.sh")


def outbox_rows(database) -> int:
    with sqlite3.connect(database) as db:
        return db.execute("SELECT COUNT(*) FROM notifications_outboxentry").fetchone()[0]


@pytest.fixture
def cassandra_server(tmp_path):
    require("Cassandra", cassandra_available())
    database = tmp_path / "db.sqlite3"
    keyspace = f"test_outage_{uuid.uuid4().hex[:8]}"
    env = server_env(database, CHAT_MESSAGE_STORE="cassandra", CASSANDRA_KEYSPACE=keyspace, CASSANDRA_REQUEST_TIMEOUT="2")
    migrate(env)
    subprocess.run([sys.executable, "manage.py", "cassandra_schema"], cwd=ROOT, env=env, check=True)
    server = LiveServer(env, tmp_path / "daphne.log").start()
    yield server, database
    server.stop()
    subprocess.run([SERVICES, "start", "cassandra"], check=True)  # whatever happened, leave it running
    subprocess.run(
        [sys.executable, "-c", f"from cassandra.cluster import Cluster; Cluster(['127.0.0.1']).connect().execute('DROP KEYSPACE IF EXISTS {keyspace}')"],
        check=False,
    )


async def test_cassandra_down_fails_sends_fast_and_cleanly_then_heals(cassandra_server):
    server, database = cassandra_server
    alice_id, alice = server.signup("alice")
    _, created, _ = server.request("POST", "/api/v1/conversations/", {"kind": "group", "participant_ids": []}, token=alice)
    conversation = created["id"]
    url = f"{server.ws}/ws/chat/?conversation_id={conversation}"

    def send(content):
        return server.request("POST", "/api/v1/messages/", {"conversation_id": conversation, "content": content}, token=alice)

    async with connect(url, additional_headers={"Authorization": f"Token {alice}"}) as socket:
        assert json.loads(await socket.recv())["type"] == "ready"
        status, before, _ = send("while Cassandra is up")
        assert status == 201
        assert json.loads(await socket.recv())["message"] == before

        subprocess.run([SERVICES, "stop", "cassandra"], check=True)
        assert not cassandra_available(), (
            "Cassandra still answers: it was not started by this checkout's scripts/services.sh, "
            "so this test cannot stop it (run `make services` from this checkout)"
        )
        errors = server.metric("chat_message_persisted_total", 'status="error"')
        published = server.metric("chat_message_published_total", 'status="success"')
        queued = outbox_rows(database)
        for attempt in range(3):
            started = time.monotonic()
            status, body, _ = send(f"while Cassandra is down {attempt}")
            elapsed = time.monotonic() - started
            assert status == 503 and body["code"] == "unavailable"
            assert elapsed < 5, f"a send took {elapsed:.1f} s to fail"
        assert server.metric("chat_message_persisted_total", 'status="error"') == errors + 3
        assert server.metric("chat_message_published_total", 'status="success"') == published
        assert outbox_rows(database) == queued
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(socket.recv(), 0.5)  # nothing was published

        subprocess.run([SERVICES, "start", "cassandra"], check=True)
        deadline = time.monotonic() + 60
        while True:  # the driver reconnects by itself; the service is not restarted
            status, after, _ = send("after Cassandra is back")
            if status == 201 or time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
        assert status == 201
        assert after["seq"] == before["seq"] + 1  # the failed sends burned no seq
        assert json.loads(await asyncio.wait_for(socket.recv(), 5))["message"] == after
        status, page, _ = server.request("GET", f"/api/v1/conversations/{conversation}/messages/", token=alice)
        assert [m["content"] for m in page["results"]] == ["while Cassandra is up", "after Cassandra is back"]
