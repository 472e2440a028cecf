"""Reactions and replies as a client sees them: daphne on a real socket, on both message stores
(Cassandra the real server): reaction frames with their change numbers, replies sent over the
socket, and a reconnecting client's replay of the changes it missed."""
from __future__ import annotations

import asyncio
import json
import urllib.parse

import pytest
from websockets.asyncio.client import connect

from tests.live import running_server
from tests.test_live_server import next_frame as live_frame, ws_url

pytestmark = pytest.mark.live_server_process


@pytest.fixture(scope="module", params=["sql", "cassandra"])
def server(request, tmp_path_factory):
    overrides = {}
    if request.param == "cassandra":
        # The test session's keyspace, schema included (dropped with the session).
        keyspace = request.getfixturevalue("cassandra_connection").keyspace
        overrides = {"CHAT_MESSAGE_STORE": "cassandra", "CASSANDRA_KEYSPACE": keyspace}
    with running_server(tmp_path_factory.mktemp(f"features-{request.param}"), **overrides) as live:
        yield live


def reaction_path(conversation_id, seq, emoji):
    return f"/api/v1/conversations/{conversation_id}/messages/{seq}/reactions/{urllib.parse.quote(emoji, safe='')}/"


async def next_frame(socket, timeout=5):
    return await live_frame(socket, timeout, skip=("presence", "read", "typing"))


async def test_reactions_and_replies_reach_sockets_live_and_replay_after_a_reconnect(server):
    alice_id, alice = server.signup("alice")
    bob_id, bob = server.signup("bob")
    _, outsider = server.signup("mallory")
    status, created, _ = server.request(
        "POST", "/api/v1/conversations/", {"kind": "group", "title": "plans", "participant_ids": [bob_id]}, token=alice
    )
    assert status == 201
    cid = created["id"]

    def reaction(kind, emoji, user_id, change):
        return {"type": kind, "conversation_id": cid, "emoji": emoji, "user_id": user_id, "seq": 1, "change": change}

    async with connect(ws_url(server, cid), additional_headers={"Authorization": f"Token {alice}"}) as a, connect(
        ws_url(server, cid), additional_headers={"Authorization": f"Token {bob}"}
    ) as b:
        assert (await next_frame(a))["last_change"] == (await next_frame(b))["last_change"] == 0
        status, sent, _ = server.request("POST", "/api/v1/messages/", {"conversation_id": cid, "content": "friday?"}, token=alice)
        assert status == 201
        for socket in (a, b):
            assert (await next_frame(socket))["message"]["seq"] == 1

        status, body, _ = server.request("PUT", reaction_path(cid, 1, "👍"), token=bob)
        assert (status, body["change"]) == (201, 1)
        for socket in (a, b):
            assert await next_frame(socket) == reaction("reaction.added", "👍", bob_id, 1)
        status, body, _ = server.request("PUT", reaction_path(cid, 1, "👍"), token=bob)
        assert (status, body["change"]) == (200, None)  # nothing new, and no frame for it:
        assert server.request("PUT", reaction_path(cid, 1, "🎉"), token=alice)[0] == 201
        for socket in (a, b):
            assert await next_frame(socket) == reaction("reaction.added", "🎉", alice_id, 2)
        assert server.request("DELETE", reaction_path(cid, 1, "👍"), token=bob)[1]["change"] == 3
        for socket in (a, b):
            assert await next_frame(socket) == reaction("reaction.removed", "👍", bob_id, 3)

        # A reply over the socket: acknowledged, delivered like any message, with its reply_to.
        await b.send(json.dumps({"type": "message.send", "client_message_id": "r-1", "content": "yes!", "reply_to": 1}))
        frames = [await next_frame(b), await next_frame(b)]
        ack = next(f for f in frames if f["type"] == "message.ack")
        assert (ack["message"]["seq"], ack["message"]["reply_to"]) == (2, 1)
        delivered = await next_frame(a)
        assert delivered["type"] == "message.new" and delivered["message"]["reply_to"] == 1
        # A reply to something that is no message of this conversation is an error frame.
        for client_id, reply_to in (("r-2", 99), ("r-3", "1"), ("r-4", 0)):
            await b.send(json.dumps({"type": "message.send", "client_message_id": client_id, "content": "?", "reply_to": reply_to}))
            error = await next_frame(b)
            assert (error["type"], error["code"], error["client_message_id"]) == ("error", "validation_error", client_id)
            assert "reply_to" in error["fields"]

    # Bad input and outsiders over real HTTP.
    status, body, _ = server.request("PUT", reaction_path(cid, 1, "thumbs up"), token=bob)
    assert status == 400 and "emoji" in body
    assert server.request("PUT", reaction_path(cid, 1, "👍"), token=outsider)[0] == 403
    assert server.request("GET", f"/api/v1/conversations/{cid}/messages/1/replies/", token=outsider)[0] == 403
    status, thread, _ = server.request("GET", f"/api/v1/conversations/{cid}/messages/1/replies/", token=alice)
    assert [m["content"] for m in thread["results"]] == ["yes!"]

    # A client that was away asks for what it missed: the messages, then the changes in order.
    async with connect(
        ws_url(server, cid, after_seq=0, after_change=0), additional_headers={"Authorization": f"Token {alice}"}
    ) as again:
        ready = await next_frame(again)
        assert (ready["last_seq"], ready["last_change"], ready["recovered"]) == (2, 3, True)
        assert [(await next_frame(again))["message"]["seq"] for _ in range(2)] == [1, 2]
        assert [await next_frame(again) for _ in range(3)] == [
            reaction("reaction.added", "👍", bob_id, 1),
            reaction("reaction.added", "🎉", alice_id, 2),
            reaction("reaction.removed", "👍", bob_id, 3),
        ]
        with pytest.raises(asyncio.TimeoutError):  # exactly once each
            await next_frame(again, timeout=0.5)
