"""What the tests that take Cassandra away under a running daphne share (tests/test_cassandra_outage.py,
one node stopped; tests/test_cassandra_cluster.py, cluster nodes killed): a daphne on the Cassandra
store with its own keyspace, a conversation of one with its socket, and the check that sends fail
fast and cleanly (503, nothing published, nothing queued)."""
from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from tests.live import ROOT, LiveServer, migrate, server_env

SERVICES = str(ROOT / "scripts" / "services.sh")


def outbox_rows(database: Path) -> int:
    with sqlite3.connect(database) as db:
        return db.execute("SELECT COUNT(*) FROM notifications_outboxentry").fetchone()[0]


@contextmanager
def cassandra_store_server(directory: Path, hosts: list[str], port: int, restart: list[str], **env_overrides: str):
    """A daphne on the Cassandra store, in a keyspace of its own on `hosts`; afterwards
    `scripts/services.sh <restart...>` leaves the nodes running, whatever the test did to them,
    and the keyspace is dropped."""
    database = directory / "db.sqlite3"
    keyspace = f"test_outage_{uuid.uuid4().hex[:8]}"
    env = server_env(
        database, CHAT_MESSAGE_STORE="cassandra", CASSANDRA_HOSTS=",".join(hosts), CASSANDRA_PORT=str(port),
        CASSANDRA_KEYSPACE=keyspace, CASSANDRA_REQUEST_TIMEOUT="2", **env_overrides,
    )
    migrate(env)
    subprocess.run([sys.executable, "manage.py", "cassandra_schema"], cwd=ROOT, env=env, check=True)
    server = LiveServer(env, directory / "daphne.log").start()
    try:
        yield server, database
    finally:
        server.stop()
        subprocess.run([SERVICES, *restart], check=True)
        drop = (
            f"from cassandra.cluster import Cluster; "
            f"Cluster({hosts!r}, port={port}).connect().execute('DROP KEYSPACE IF EXISTS {keyspace}')"
        )
        subprocess.run([sys.executable, "-c", drop], check=False)


@asynccontextmanager
async def conversation_of_one(server: LiveServer):
    """Alice alone in a group, her socket on it (past `ready`), and `send(content)` over REST."""
    _, alice = server.signup("alice")
    _, created, _ = server.request("POST", "/api/v1/conversations/", {"kind": "group", "participant_ids": []}, token=alice)
    conversation = created["id"]

    def send(content):
        return server.request("POST", "/api/v1/messages/", {"conversation_id": conversation, "content": content}, token=alice)

    url = f"{server.ws}/ws/chat/?conversation_id={conversation}"
    async with connect(url, additional_headers={"Authorization": f"Token {alice}"}) as socket:
        assert json.loads(await socket.recv())["type"] == "ready"
        yield socket, send, lambda: server.request("GET", f"/api/v1/conversations/{conversation}/messages/", token=alice)


async def assert_sends_fail_fast_and_cleanly(server: LiveServer, database: Path, socket, send, label: str) -> None:
    """Three sends: each a 503 `unavailable` within 5 s, counted as persist errors; nothing
    published (the counter and the socket), nothing queued for notification."""
    errors = server.metric("chat_message_persisted_total", 'status="error"')
    published = server.metric("chat_message_published_total", 'status="success"')
    queued = outbox_rows(database)
    for attempt in range(3):
        started = time.monotonic()
        status, body, _ = send(f"{label} {attempt}")
        elapsed = time.monotonic() - started
        assert status == 503 and body["code"] == "unavailable", (status, body)
        assert elapsed < 5, f"a send took {elapsed:.1f} s to fail"
    assert server.metric("chat_message_persisted_total", 'status="error"') == errors + 3
    assert server.metric("chat_message_published_total", 'status="success"') == published
    assert outbox_rows(database) == queued
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(socket.recv(), 0.5)  # nothing was published


async def send_until_healed(send, content: str, within: float = 60):
    """Sends until one succeeds (the driver reconnects by itself; daphne is not restarted)."""
    deadline = time.monotonic() + within
    while True:
        status, message, _ = send(content)
        if status == 201 or time.monotonic() > deadline:
            return status, message
        await asyncio.sleep(1)
