"""Attacks on the WebSocket endpoint, over a real daphne where the transport decides the outcome
(daphne encodes text frames and caps outgoing frames at --websocket-max-message-size)."""
import asyncio
import json
import urllib.parse

import pytest
from websockets.asyncio.client import connect

from tests.live import LiveServer, migrate, server_env

pytestmark = pytest.mark.live_server_process


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("security-ws")
    env = server_env(directory / "db.sqlite3")
    migrate(env)
    live = LiveServer(env, directory / "daphne.log").start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def conversation(server):
    alice_id, alice = server.signup("alice")
    bob_id, bob = server.signup("bob")
    _, outsider = server.signup("outsider")
    status, created, _ = server.request(
        "POST", "/api/v1/conversations/", {"kind": "group", "title": "sec", "participant_ids": [bob_id]}, token=alice
    )
    assert status == 201
    return {"id": created["id"], "alice": alice, "bob": bob, "outsider": outsider}


def ws_url(server, conversation_id, **params):
    return f"{server.ws}/ws/chat/?{urllib.parse.urlencode({'conversation_id': conversation_id, **params})}"


def auth(token):
    return {"additional_headers": {"Authorization": f"Token {token}"}, "max_size": None}


async def next_frame(socket, timeout=5, skip=("presence",)):
    while True:
        frame = json.loads(await asyncio.wait_for(socket.recv(), timeout))
        if frame["type"] not in skip:
            return frame


async def test_a_lone_surrogate_in_client_message_id_gets_an_error_frame_not_a_1011(server, conversation):
    async with connect(ws_url(server, conversation["id"]), **auth(conversation["bob"])) as socket:
        assert (await next_frame(socket))["type"] == "ready"
        # Raw JSON text with the escape: json.loads turns it into an unpaired surrogate, which has
        # no UTF-8 encoding.
        await socket.send('{"type": "message.send", "client_message_id": "\\ud800", "content": "x"}')
        frame = await next_frame(socket)
        assert (frame["type"], frame["code"]) == ("error", "validation_error")
        assert list(frame["fields"]) == ["client_message_id"]
        await socket.send('{"type": "typing", "client_message_id": "\\udfff\\ud800"}')
        await socket.send(json.dumps({"type": "ping"}))
        assert await next_frame(socket) == {"type": "pong"}
