"""The service as a person runs it: daphne on a real socket, HTTP and WebSocket clients."""
import asyncio
import http.cookiejar
import json
import re
import urllib.parse
import urllib.error
import urllib.request
import uuid

import pytest
import websockets
from websockets.asyncio.client import connect

from tests.live import running_server

pytestmark = pytest.mark.live_server_process


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("live")) as live:
        yield live


@pytest.fixture(scope="module")
def conversation(server):
    """Two participants and one outsider, as the README walks through it."""
    alice_id, alice = server.signup("alice")
    bob_id, bob = server.signup("bob")
    _, outsider = server.signup("outsider")
    status, created, _ = server.request(
        "POST", "/api/v1/conversations/", {"kind": "group", "title": "live", "participant_ids": [bob_id]}, token=alice
    )
    assert status == 201
    return {"id": created["id"], "alice": alice, "bob": bob, "outsider": outsider, "bob_id": bob_id}


def ws_url(server, conversation_id, **params):
    query = urllib.parse.urlencode({"conversation_id": conversation_id, **params})
    return f"{server.ws}/ws/chat/?{query}"


async def expect_refused(url, **kwargs):
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        async with connect(url, open_timeout=5, **kwargs):
            pass
    assert refused.value.response.status_code == 403


async def next_frame(socket, timeout=5, skip=("presence",)):
    while True:
        frame = json.loads(await asyncio.wait_for(socket.recv(), timeout))
        if frame["type"] not in skip:
            return frame


async def test_a_message_sent_over_rest_reaches_both_participants(server, conversation):
    url = ws_url(server, conversation["id"])
    async with connect(url, additional_headers={"Authorization": f"Token {conversation['alice']}"}) as a, connect(
        url, additional_headers={"Authorization": f"Token {conversation['bob']}"}
    ) as b:
        assert (await next_frame(a))["type"] == (await next_frame(b))["type"] == "ready"
        status, sent, _ = server.request(
            "POST", "/api/v1/messages/", {"conversation_id": conversation["id"], "content": "hello over REST"},
            token=conversation["alice"],
        )
        assert status == 201
        for socket in (a, b):
            frame = await next_frame(socket)
            assert frame == {"type": "message.new", "conversation_id": sent["conversation_id"], "message": sent}


async def test_frames_of_every_length_form_arrive_whole_and_in_order(server, conversation):
    """A frame's length takes 7 bits, 16 bits or 64 bits (RFC 6455 section 5.2): messages whose
    frames need each form, written by the server's own framing (core.transport.text_frame)."""
    url = ws_url(server, conversation["id"])
    async with connect(url, additional_headers={"Authorization": f"Token {conversation['bob']}"}, max_size=None) as b:
        assert (await next_frame(b))["type"] == "ready"
        sent = []
        for message_type, content in (("text", "short"), ("text", "é" * 4000), ("file", "x" * 200_000)):
            status, message, _ = server.request(
                "POST", "/api/v1/messages/",
                {"conversation_id": conversation["id"], "content": content, "message_type": message_type},
                token=conversation["alice"],
            )
            assert status == 201, message
            sent.append(message)
        for message in sent:
            assert await next_frame(b) == {"type": "message.new", "conversation_id": conversation["id"], "message": message}


async def test_websocket_send_is_acked_and_delivered(server, conversation):
    url = ws_url(server, conversation["id"])
    async with connect(url, additional_headers={"Authorization": f"Token {conversation['bob']}"}) as b:
        await next_frame(b)
        await b.send(json.dumps({"type": "message.send", "client_message_id": "live-1", "content": "from ws"}))
        frames = [await next_frame(b), await next_frame(b)]
        assert {f["type"] for f in frames} == {"message.ack", "message.new"}
        await b.send(json.dumps({"type": "ping"}))
        assert await next_frame(b) == {"type": "pong"}


async def test_handshake_refusals_are_http_403(server, conversation):
    url = ws_url(server, conversation["id"])
    await expect_refused(url, additional_headers={"Authorization": f"Token {conversation['outsider']}"})
    await expect_refused(ws_url(server, str(uuid.uuid4())), additional_headers={"Authorization": f"Token {conversation['alice']}"})
    await expect_refused(ws_url(server, "not-a-uuid"), additional_headers={"Authorization": f"Token {conversation['alice']}"})
    await expect_refused(url)  # no credentials
    await expect_refused(url, additional_headers={"Authorization": "Token wrong"})
    await expect_refused(url, additional_headers={"Authorization": f"Token {conversation['alice']}"}, origin="https://evil.example")


async def test_browser_origin_and_one_time_ticket(server, conversation):
    status, body, _ = server.request("POST", "/api/v1/auth/ws-ticket/", token=conversation["alice"])
    assert status == 201
    url = ws_url(server, conversation["id"], ticket=body["ticket"])
    async with connect(url, origin=f"http://localhost:{server.port}") as socket:
        assert (await next_frame(socket))["type"] == "ready"
    await expect_refused(url)  # the ticket is spent


async def test_session_cookie_authenticates_the_websocket(server, conversation):
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    login_url = f"{server.http}/api/auth/login/"
    page = opener.open(login_url).read().decode()
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    form = urllib.parse.urlencode(
        {"username": "alice", "password": "long-enough-pass-42", "csrfmiddlewaretoken": csrf, "next": "/api/v1/"}
    ).encode()
    opener.open(urllib.request.Request(login_url, data=form, headers={"Referer": login_url})).read()
    cookies = {cookie.name: cookie.value for cookie in jar}
    assert "sessionid" in cookies
    cookie_header = "; ".join(f"{name}={value}" for name, value in cookies.items())
    async with connect(ws_url(server, conversation["id"]), additional_headers={"Cookie": cookie_header}) as socket:
        ready = await next_frame(socket)
        assert ready["type"] == "ready"


def test_unauthenticated_rest_is_401(server):
    status, body, headers = server.request("GET", "/api/v1/conversations/")
    assert status == 401 and headers["WWW-Authenticate"] == "Token"


def test_metrics_endpoint(server):
    with urllib.request.urlopen(f"{server.http}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert "chat_message_created_total" in text and "django_http_requests_total_by_method_total" in text


async def test_oversized_frames(server, conversation):
    """Over 1 MiB: an error frame and the connection stays; over the 2 MiB transport cap: closed 1009."""
    url = ws_url(server, conversation["id"])
    headers = {"Authorization": f"Token {conversation['bob']}"}
    async with connect(url, additional_headers=headers, max_size=None) as socket:
        await next_frame(socket)
        await socket.send("x" * (1024 * 1024 + 1))
        frame = await next_frame(socket)
        assert (frame["type"], frame["code"]) == ("error", "bad_request")
        await socket.send(json.dumps({"type": "ping"}))
        assert await next_frame(socket) == {"type": "pong"}
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            await socket.send("x" * (3 * 1024 * 1024))
            await next_frame(socket)
        # The server fails the connection with 1009 as soon as the cap is crossed; the client may
        # see the close frame or, still writing, only the reset that follows it.
        assert closed.value.rcvd is None or closed.value.rcvd.code == 1009
    async with connect(url, additional_headers=headers) as socket:  # the server is fine
        assert (await next_frame(socket))["type"] == "ready"


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_a_body_over_the_limit_is_refused_without_copies_in_memory(server, conversation):
    before = rss_bytes(server.process.pid)
    body = b'{"conversation_id": "' + conversation["id"].encode() + b'", "content": "' + b"x" * (16 * 1024 * 1024) + b'"}'
    request = urllib.request.Request(
        f"{server.http}/api/v1/messages/", data=body, method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Token {conversation['alice']}"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code in (400, 413)
    # daphne queues a request body for the application as it arrives, so a body costs about its
    # own size while in flight (docs/api.md: cap bodies at the proxy); the service must not add
    # copies of it on top (parsing, decoding, validating).
    assert rss_bytes(server.process.pid) - before < 24 * 1024 * 1024


async def test_a_handshake_while_redis_is_unreachable_gets_unavailable_then_4013(tmp_path):
    """The channel layer cannot subscribe the socket (a conversation socket or a user stream): it would miss live events, so it is told to
    come back (an error frame, then 4013: daphne's WebSocket layer refuses 1013 itself)."""
    # Nothing listens on port 1: the channel layer cannot subscribe anything.
    with running_server(tmp_path, REDIS_URL="redis://127.0.0.1:1/0") as live:
        alice_id, alice = live.signup("alice")
        status, created, _ = live.request(
            "POST", "/api/v1/conversations/", {"kind": "group", "title": "down", "participant_ids": []}, token=alice
        )
        assert status == 201
        async with connect(ws_url(live, created["id"]), additional_headers={"Authorization": f"Token {alice}"}) as socket:
            frame = await next_frame(socket)
            assert (frame["type"], frame["code"]) == ("error", "unavailable")
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                await asyncio.wait_for(socket.recv(), 10)
            assert socket.close_code == 4013
        # The user stream alike.
        async with connect(f"{live.ws}/ws/chat/", additional_headers={"Authorization": f"Token {alice}"}) as socket:
            frame = await next_frame(socket)
            assert (frame["type"], frame["code"]) == ("error", "unavailable")
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                await asyncio.wait_for(socket.recv(), 10)
            assert socket.close_code == 4013


async def test_a_server_shutting_down_closes_every_socket_with_1001(tmp_path):
    """SPEC section 5: 1001 when the server shuts down, on both kinds of connection, so clients
    reconnect at once instead of waiting to notice a dead connection."""
    from websockets.exceptions import ConnectionClosed

    with running_server(tmp_path) as live:
        _, alice = live.signup("alice")
        bob_id, _ = live.signup("bob")
        status, created, _ = live.request(
            "POST", "/api/v1/conversations/", {"kind": "group", "participant_ids": [bob_id]}, token=alice
        )
        assert status == 201
        headers = {"Authorization": f"Token {alice}"}
        async with connect(ws_url(live, created["id"]), additional_headers=headers) as conversation_socket, connect(
            f"{live.ws}/ws/chat/", additional_headers=headers
        ) as stream:
            for socket in (conversation_socket, stream):
                assert (await next_frame(socket))["type"] == "ready"
            await asyncio.to_thread(live.stop)
            for socket in (conversation_socket, stream):
                with pytest.raises(ConnectionClosed) as closed:
                    await next_frame(socket)
                assert closed.value.rcvd is not None, "closed without a close frame"
                assert closed.value.rcvd.code == 1001
