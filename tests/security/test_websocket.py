"""Attacks on the WebSocket endpoint, over a real daphne where the transport decides the outcome
(daphne encodes text frames and caps outgoing frames at --websocket-max-message-size)."""
import asyncio
import json
import urllib.parse

import pytest
from websockets.asyncio.client import connect

from tests.live import LiveServer, running_server
from tests.test_live_server import conversation  # noqa: F401 (a fixture: alice, bob and an outsider)

pytestmark = pytest.mark.live_server_process


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("security-ws")) as live:
        yield live


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


BIG = 3 * 1024 * 1024  # over daphne's 2 MiB cap on outgoing frames; the contract allows 10 MiB


def send_file(server, conversation, content, token_of="alice"):
    status, sent, _ = server.request(
        "POST", "/api/v1/messages/",
        {"conversation_id": conversation["id"], "content": content, "message_type": "file"},
        token=conversation[token_of],
    )
    assert status == 201, sent
    return sent


def omitted(message):
    return {**message, "content": None, "content_omitted": True}


async def test_a_message_over_the_frame_cap_travels_without_its_content(server, conversation):
    url = ws_url(server, conversation["id"])
    async with connect(url, **auth(conversation["alice"])) as a, connect(url, **auth(conversation["bob"])) as b:
        assert (await next_frame(a))["type"] == (await next_frame(b))["type"] == "ready"
        content = "y" * BIG
        sent = await asyncio.to_thread(send_file, server, conversation, content)
        for socket in (a, b):
            frame = await next_frame(socket)
            assert frame == {"type": "message.new", "conversation_id": sent["conversation_id"], "message": omitted(sent)}
        # The sockets live on: the next message arrives, content and all.
        small = await asyncio.to_thread(send_file, server, conversation, "small")
        for socket in (a, b):
            assert await next_frame(socket) == {"type": "message.new", "conversation_id": small["conversation_id"], "message": small}
            await socket.send(json.dumps({"type": "ping"}))
            assert await next_frame(socket) == {"type": "pong"}

        # An edit that makes a message large goes out without the content too.
        status, edited, _ = await asyncio.to_thread(
            server.request, "PATCH", f"/api/v1/conversations/{conversation['id']}/messages/{small['seq']}/",
            {"content": "z" * BIG}, conversation["alice"],
        )
        assert status == 200
        change = edited.pop("change")
        for socket in (a, b):
            assert await next_frame(socket) == {
                "type": "message.updated", "conversation_id": edited["conversation_id"], "message": omitted(edited), "change": change
            }

        # Content over the inline limit sent on the socket: the ack carries the message without it.
        await b.send(json.dumps(
            {"type": "message.send", "client_message_id": "big-ws", "content": "w" * (300 * 1024), "message_type": "file"}
        ))
        frames = [await next_frame(b), await next_frame(b)]
        ack = next(f for f in frames if f["type"] == "message.ack")
        assert ack["message"]["content"] is None and ack["message"]["content_omitted"] is True

    # A resume replays it, still without the content.
    async with connect(ws_url(server, conversation["id"], after_seq=sent["seq"] - 1), **auth(conversation["bob"])) as b:
        ready = await next_frame(b)
        assert ready["recovered"] is True
        assert await next_frame(b) == {"type": "message.new", "conversation_id": sent["conversation_id"], "message": omitted(sent)}

    # The client reads the content over REST: the full message object.
    path = f"/api/v1/conversations/{conversation['id']}/messages/{sent['seq']}/"
    status, full, _ = await asyncio.to_thread(server.request, "GET", path, token=conversation["bob"])
    # (A read adds what only reads carry: the message's reactions and reply count.)
    reads_only = {"reactions": full.pop("reactions", None), "reply_count": full.pop("reply_count", None)}
    assert (status, full, reads_only) == (200, sent, {"reactions": {}, "reply_count": 0})
    assert full["content"] == content and "content_omitted" not in full
    # History pages leave it out as well.
    status, page, _ = await asyncio.to_thread(
        server.request, "GET", f"/api/v1/conversations/{conversation['id']}/messages/?after_seq={sent['seq'] - 1}&limit=1",
        token=conversation["bob"],
    )
    assert status == 200 and page["results"] == [{**omitted(sent), "reactions": {}, "reply_count": 0}]


async def test_the_message_endpoint_is_for_members_only(server, conversation):
    sent = await asyncio.to_thread(send_file, server, conversation, "members only")
    for conversation_id, token in (
        (conversation["id"], conversation["outsider"]),
        ("00000000-0000-4000-8000-000000000000", conversation["alice"]),
    ):
        status, body, _ = await asyncio.to_thread(
            server.request, "GET", f"/api/v1/conversations/{conversation_id}/messages/{sent['seq']}/", token=token
        )
        assert status == 403, body
    status, _, _ = await asyncio.to_thread(
        server.request, "GET", f"/api/v1/conversations/{conversation['id']}/messages/999999/", token=conversation["alice"]
    )
    assert status == 404


async def test_a_frame_over_the_transport_cap_costs_the_frame_not_the_connection(tmp_path):
    # Inline content allowed above the frame cap (a misconfiguration): the frame guard must hold.
    with running_server(tmp_path, CHAT_INLINE_CONTENT_BYTES=str(10 * 1024 * 1024)) as server:
        _, alice = server.signup("alice")
        bob_id, bob = server.signup("bob")
        _, created, _ = server.request("POST", "/api/v1/conversations/", {"kind": "group", "participant_ids": [bob_id]}, token=alice)
        conversation = {"id": created["id"], "alice": alice, "bob": bob}
        dropped_before = server.metric("chat_client_message_dropped_total")
        async with connect(ws_url(server, created["id"]), **auth(bob)) as b:
            assert (await next_frame(b))["type"] == "ready"
            sent = await asyncio.to_thread(send_file, server, conversation, "y" * BIG)
            frame = await next_frame(b)
            assert (frame["type"], frame["code"], frame["dropped"]) == (
                "error", "unavailable", {"type": "message.new", "seq": sent["seq"]}
            )
            small = await asyncio.to_thread(send_file, server, conversation, "after")
            assert await next_frame(b) == {"type": "message.new", "conversation_id": small["conversation_id"], "message": small}
        assert server.metric("chat_client_message_dropped_total") == dropped_before + 1
        assert server.metric("chat_websocket_frame_too_large_total") == 1


def test_make_run_and_the_live_tests_cap_frames_at_the_services_value():
    from pathlib import Path

    from django.conf import settings

    root = Path(__file__).resolve().parents[2]
    makefile = (root / "Makefile").read_text()
    default = settings.ENVIRONMENT_VARIABLES["CHAT_MAX_FRAME_BYTES"]
    assert f"CHAT_MAX_FRAME_BYTES ?= {default}\nexport CHAT_MAX_FRAME_BYTES\n" in makefile
    serve = (root / "scripts" / "serve.py").read_text()
    assert f'os.environ.get("CHAT_MAX_FRAME_BYTES") or "{default}"' in serve
    assert '"--websocket-max-message-size", MAX_FRAME_BYTES' in serve
    assert LiveServer({}, Path("/dev/null")).max_frame_bytes == str(default)
