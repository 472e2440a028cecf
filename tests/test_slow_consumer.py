"""A client that stops reading is closed with 4008 instead of making the server buffer without
bound; everyone else keeps receiving, and the slow client resumes with after_seq losing nothing."""
import asyncio
import base64
import json
import os
import socket

import pytest
from websockets.asyncio.client import connect

from tests.live import LiveServer, migrate, server_env

pytestmark = pytest.mark.live_server_process

OUTBOUND_LIMIT = 256 * 1024
CONTENT = "x" * (512 * 1024)
MESSAGES = 30


def stalled_websocket(server, path: str, token: str) -> socket.socket:
    """A WebSocket handshake over a raw socket with a tiny receive buffer, that then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Token {token}\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


async def test_stalled_client_is_closed_4008_and_resumes_without_loss(tmp_path):
    # Content inline up to 1 MiB, so these 512 KiB messages fill the stalled client's buffer as
    # large frames would (by default content over 256 KiB is left out of frames).
    env = server_env(
        tmp_path / "db.sqlite3", CHAT_MAX_OUTBOUND_BYTES=str(OUTBOUND_LIMIT), CHAT_INLINE_CONTENT_BYTES=str(1024 * 1024)
    )
    migrate(env)
    server = LiveServer(env, tmp_path / "daphne.log").start()
    try:
        alice_id, alice = server.signup("alice")
        bob_id, bob = server.signup("bob")
        _, created, _ = server.request(
            "POST", "/api/v1/conversations/", {"kind": "group", "participant_ids": [bob_id]}, token=alice
        )
        path = f"/ws/chat/?conversation_id={created['id']}"
        stalled = stalled_websocket(server, path, bob)
        headers = {"Authorization": f"Token {alice}"}
        async with connect(server.ws + path, additional_headers=headers, max_size=None) as healthy:
            assert json.loads(await healthy.recv())["type"] == "ready"
            for i in range(MESSAGES):
                status, _, _ = await asyncio.to_thread(
                    server.request, "POST", "/api/v1/messages/",
                    {"conversation_id": created["id"], "content": CONTENT, "message_type": "file"}, alice,
                )
                assert status == 201
            received = []
            while len(received) < MESSAGES:
                frame = json.loads(await asyncio.wait_for(healthy.recv(), 10))
                if frame["type"] == "message.new":
                    received.append(frame["message"]["seq"])
            assert received == list(range(1, MESSAGES + 1))
        # The stalled client gets a grace period to catch up, then is closed.
        deadline = asyncio.get_running_loop().time() + 10
        while server.metric("chat_client_message_dropped_total") < 1 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
        assert server.metric("chat_client_message_dropped_total") >= 1
        stalled.close()

        async with connect(server.ws + path + "&after_seq=0", additional_headers={"Authorization": f"Token {bob}"}, max_size=None) as resumed:
            assert json.loads(await resumed.recv())["type"] == "ready"
            seqs = []
            while len(seqs) < MESSAGES:
                frame = json.loads(await asyncio.wait_for(resumed.recv(), 10))
                if frame["type"] == "message.new":
                    seqs.append(frame["message"]["seq"])
            assert seqs == list(range(1, MESSAGES + 1))
    finally:
        server.stop()


async def test_dead_peer_is_closed_by_protocol_pings_and_cleaned_up(tmp_path):
    env = server_env(tmp_path / "db.sqlite3")
    migrate(env)
    server = LiveServer(env, tmp_path / "daphne.log", daphne_args=("--ping-interval", "1", "--ping-timeout", "1")).start()
    try:
        alice_id, alice = server.signup("alice")
        _, created, _ = server.request("POST", "/api/v1/conversations/", {"kind": "group", "participant_ids": []}, token=alice)
        dead = stalled_websocket(server, f"/ws/chat/?conversation_id={created['id']}", alice)  # never answers a ping
        assert server.metric("chat_websocket_connections") == 1
        deadline = asyncio.get_running_loop().time() + 10
        while server.metric("chat_websocket_connections") and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.25)
        assert server.metric("chat_websocket_connections") == 0
        dead.close()
    finally:
        server.stop()
