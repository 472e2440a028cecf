"""Attacks over HTTP (SPEC 4.1 "Bad input never costs a 500", section 10).

Bad input gets a clear 4xx with a JSON body: never a 500, a hang, a dropped connection without an
answer, or a process that keeps hundreds of MiB. Where the transport decides (body buffering, header
lines), the tests talk to a real daphne over a loopback socket."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from accounts.services import token_issue
from chat.services import send as sending
from core.errors import ValidationFailed
from tests.live import ROOT, LiveServer, running_server

MiB = 1024 * 1024


def nested(depth: int, leaf: object = 1) -> object:
    """A JSON value `depth` containers deep: nested(1) == {"k": 1}."""
    value = leaf
    for _ in range(depth):
        value = {"k": value}
    return value


def json_depth(value: object) -> int:
    return 1 + max(map(json_depth, value.values()), default=0) if isinstance(value, dict) else 0


# ------------------------------------------------------------------------------ item 10: nesting


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/api/v1/auth/register/", "/api/v1/auth/token/"])
def test_an_absurdly_nested_body_is_a_400_for_anonymous_callers(client, path):
    response = client.post(path, "[" * 100_000, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["code"] == "parse_error"


@pytest.mark.django_db
def test_a_body_nested_33_deep_is_refused_and_32_is_not(make_user, make_group, client_for):
    owner = make_user()
    conversation = make_group(owner)
    client = client_for(owner)

    def send(metadata_depth: int):
        body = {"conversation_id": str(conversation.id), "content": "hi", "metadata": nested(metadata_depth)}
        return client.post("/api/v1/messages/", json.dumps(body), content_type="application/json"), json_depth(body)

    response, depth = send(31)
    assert (depth, response.status_code) == (32, 201), response.content
    response, depth = send(32)
    assert (depth, response.status_code) == (33, 400), response.content
    assert response.json()["code"] == "parse_error"


def test_metadata_deeper_than_32_is_a_field_error():
    sending.check_message_input(content="x", metadata=nested(32))
    with pytest.raises(ValidationFailed) as refused:
        sending.check_message_input(content="x", metadata=nested(33))
    assert list(refused.value.detail) == ["metadata"]


@pytest.mark.parametrize(
    "metadata",
    [{"a\u0000": 1}, {"a": "b\u0000c"}, {"a": ["ok", {"deep": "\u0000"}]}, {"k": [["\u0000"]]}],
)
def test_nul_anywhere_in_metadata_is_a_field_error(metadata):
    with pytest.raises(ValidationFailed) as refused:
        sending.check_message_input(content="x", metadata=metadata)
    assert list(refused.value.detail) == ["metadata"]


@pytest.mark.django_db
def test_escaped_nul_in_metadata_over_rest_is_a_400_not_a_store_error(make_user, make_group, client_for):
    owner = make_user()
    conversation = make_group(owner)
    body = '{"conversation_id": "%s", "content": "x", "metadata": {"k": "a\\u0000b"}}' % conversation.id
    response = client_for(owner).post("/api/v1/messages/", body, content_type="application/json")
    assert response.status_code == 400
    assert "metadata" in response.json()


@pytest.mark.django_db(transaction=True)
async def test_an_absurdly_nested_frame_costs_an_error_frame_not_the_socket(make_user, make_group):
    from chatproject.asgi import application

    owner = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(make_group)(owner)
    _, key = await database_sync_to_async(token_issue)(user=owner)
    communicator = WebsocketCommunicator(
        application, f"/ws/chat/?conversation_id={conversation.id}",
        headers=[(b"authorization", f"Token {key}".encode())],
    )
    connected, _ = await communicator.connect()
    assert connected

    async def next_frame():
        while True:
            frame = json.loads(await communicator.receive_from(timeout=3))
            if frame["type"] != "presence":
                return frame

    assert (await next_frame())["type"] == "ready"
    await communicator.send_to(text_data="[" * 100_000)
    assert (await next_frame())["code"] == "bad_request"
    frame = {"type": "message.send", "client_message_id": "deep", "content": "x", "metadata": nested(40)}
    await communicator.send_to(text_data=json.dumps(frame))
    assert (await next_frame())["code"] == "bad_request"
    await communicator.send_to(text_data=json.dumps({"type": "ping"}))
    assert (await next_frame())["type"] == "pong"
    await communicator.disconnect()


# ---------------------------------------------------------------------------- item 12: cursors


def cursor(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "value",
    [
        cursor("p=not-a-date"),
        cursor("p=2024-13-45T99:00:00"),
        cursor("p=\x00"),
        cursor("o=abc"),
        cursor("r=x"),
        "%%%not-base64%%%",
        "\u00e9",
        cursor("o=1&p=" + "9" * 5000),
    ],
)
def test_a_garbage_cursor_is_a_400(make_user, make_group, client_for, value):
    owner = make_user()
    make_group(owner)
    response = client_for(owner).get("/api/v1/conversations/", {"cursor": value})
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "invalid_cursor"


@pytest.mark.django_db
def test_a_well_formed_cursor_still_pages(make_user, make_group, client_for):
    owner = make_user()
    make_group(owner)
    response = client_for(owner).get("/api/v1/conversations/", {"cursor": cursor(urllib.parse.urlencode({"p": "2999-01-01T00:00:00+00:00"}))})
    assert response.status_code == 200
    assert len(response.json()["results"]) == 1


# ------------------------------------------------------------------------- item 13: NUL in query


@pytest.mark.django_db
@pytest.mark.parametrize(
    "query, field",
    [
        ("search=%00", "search"), ("search=ab%00", "search"), ("search=a%00b", "search"),
        ("x%00=1", "non_field_errors"), ("limit=5&search=%00", "search"),
    ],
)
def test_nul_in_a_query_parameter_is_a_400_naming_it(make_user, client_for, query, field):
    response = client_for(make_user()).get("/api/v1/users/?" + query)
    assert response.status_code == 400
    assert list(response.json()) == [field]


# --------------------------------------------------------------------------- item 15: /metrics


@pytest.mark.django_db
class TestMetricsAccess:
    @pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
    def test_loopback_reads_metrics(self, client, address):
        response = client.get("/metrics", REMOTE_ADDR=address)
        assert response.status_code == 200
        assert b"django_http_requests" in response.content

    def test_anyone_else_is_refused(self, client):
        response = client.get("/metrics", REMOTE_ADDR="203.0.113.7")
        assert response.status_code == 403
        assert response.json()["code"] == "forbidden"

    def test_a_listed_network_reads_metrics(self, client, settings):
        settings.CHAT_METRICS_ALLOWED_IPS = ["10.0.0.0/8"]
        assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 200
        assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 403

    def test_the_token_opens_it_from_anywhere(self, client, settings):
        settings.CHAT_METRICS_TOKEN = "s3cret-scrape-token"
        ok = client.get("/metrics", REMOTE_ADDR="203.0.113.7", HTTP_AUTHORIZATION="Bearer s3cret-scrape-token")
        wrong = client.get("/metrics", REMOTE_ADDR="203.0.113.7", HTTP_AUTHORIZATION="Bearer s3cret-scrape-tokeX")
        assert (ok.status_code, wrong.status_code) == (200, 403)

    def test_no_token_configured_means_no_bearer_gets_in(self, client, settings):
        settings.CHAT_METRICS_TOKEN = ""
        response = client.get("/metrics", REMOTE_ADDR="203.0.113.7", HTTP_AUTHORIZATION="Bearer ")
        assert response.status_code == 403


# -------------------------------------------------------------------- item 16: deploy settings


def run_deploy_check(**env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "CHAT_"))}
    base.update(DJANGO_SETTINGS_MODULE="chatproject.settings", DJANGO_DEBUG="false",
                DJANGO_SECRET_KEY="x7$Qp!v2Lr9#Tz4&Wn8*Ks5^Hd3@Jf6%Gb1(Mc0)Ya7_Ue2+Io9=Px4-Rw8~St",
                DJANGO_ALLOWED_HOSTS="chat.example.com")
    base.update(env)
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT, env=base, capture_output=True, text=True, timeout=120,
    )


def test_check_deploy_is_clean_with_the_production_variables():
    result = run_deploy_check(
        DJANGO_SECURE_SSL_REDIRECT="true",
        DJANGO_SECURE_HSTS_SECONDS="31536000",
        DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS="true",
        DJANGO_SECURE_HSTS_PRELOAD="true",
        DJANGO_SECURE_COOKIES="true",
        DJANGO_SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO,https",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_warns_without_them():
    result = run_deploy_check()
    assert result.returncode != 0
    for check in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert check in result.stderr


def test_a_malformed_proxy_ssl_header_stops_the_process():
    result = run_deploy_check(DJANGO_SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO")
    assert result.returncode != 0
    assert "DJANGO_SECURE_PROXY_SSL_HEADER" in result.stderr


# ------------------------------------------------- items 8 and 18: bodies and headers on real daphne


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("security-http")) as live:
        yield live


def memory_kib(pid: int) -> dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident memory of a process, KiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
    return fields


def read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP/1.1 response; the body by Content-Length or to EOF."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response; got {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", -1))
    while length < 0 or len(body) < length:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        body += chunk
    return status, headers, body


def stream_body(server: LiveServer, path: str, total: int, *, chunked: bool) -> tuple[int, dict, bytes, int]:
    """Send a POST of `total` bytes in 1 MiB pieces, stopping as soon as the server answers;
    (status, headers, body, bytes sent). The client holds one 1 MiB piece at a time."""
    piece = b"x" * MiB
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {total}\r\n\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head.encode())
        try:
            while sent < total:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server has answered
                sock.sendall((b"100000\r\n" + piece + b"\r\n") if chunked else piece)
                sent += len(piece)
            else:
                if chunked:
                    sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed; the answer is still in our receive buffer
        status, headers, body = read_response(sock)
    return status, headers, body, sent


def assert_json_413(status: int, headers: dict, body: bytes) -> None:
    assert status == 413, body[:300]
    assert headers["content-type"] == "application/json"
    answer = json.loads(body)
    assert answer["code"] == "request_too_large" and answer["detail"]


@pytest.mark.live_server_process
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_300_mib_anonymous_body_is_refused_before_it_is_buffered(server, chunked):
    server.request("GET", "/api/v1/")  # warm up: the first request imports the views
    before = memory_kib(server.process.pid)
    started = time.monotonic()
    status, headers, body, sent = stream_body(server, "/api/v1/auth/register/", 300 * MiB, chunked=chunked)
    elapsed = time.monotonic() - started
    after = memory_kib(server.process.pid)
    grown_mib = (after["VmHWM"] - before["VmHWM"]) / 1024
    print(f"daphne memory: before {before}, after {after} (KiB); peak grew {grown_mib:.1f} MiB; sent {sent / MiB:.0f} MiB"
          f" in {elapsed:.1f} s; answer {status}")
    assert_json_413(status, headers, body)
    # The answer came long before the body was through (the JSON cap is 11 MiB) ...
    assert sent < 300 * MiB, f"the whole body was sent before an answer ({elapsed:.1f} s)"
    # ... and the server's peak memory did not grow by anything like the body.
    assert grown_mib < 40
    # The server goes on serving.
    assert server.request("GET", "/api/v1/")[0] in (200, 401)


@pytest.mark.live_server_process
def test_a_12_mib_body_from_an_ordinary_client_gets_a_json_413(server):
    request = urllib.request.Request(
        server.http + "/api/v1/messages/", data=b"{" + b" " * (12 * MiB) + b"}", method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=20)
    assert_json_413(answer.value.code, {k.lower(): v for k, v in answer.value.headers.items()}, answer.value.read())


@pytest.mark.live_server_process
def test_a_body_just_under_the_cap_reaches_the_app(server):
    from django.conf import settings

    body = b'{"username": "x", "password": "y", "pad": "' + b"p" * (settings.CHAT_MAX_REQUEST_BYTES - 100) + b'"}'
    status, answer, _ = raw_post(server, "/api/v1/auth/register/", body)
    assert status == 400 and ("username" in answer or "password" in answer), answer  # the view judged it


def raw_post(server: LiveServer, path: str, body: bytes):
    request = urllib.request.Request(server.http + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


@pytest.mark.live_server_process
@pytest.mark.parametrize(
    "headers",
    [
        f"X-Long: {'a' * 20_000}\r\n",  # one header line over Twisted's 16 KiB line limit
        "".join(f"X-Many-{i}: {'b' * 100}\r\n" for i in range(200)),  # 16 KiB of header lines in all
    ],
    ids=["one-long-line", "many-lines"],
)
def test_oversized_headers_get_a_json_431_and_the_server_goes_on(server, headers):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"GET /api/v1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode())
        status, response_headers, body = read_response(sock)
    assert status == 431, body
    assert response_headers["content-type"] == "application/json"
    assert json.loads(body)["code"] == "request_header_fields_too_large"
    assert server.request("GET", "/api/v1/")[0] in (200, 401)
    assert server.process.poll() is None


@pytest.mark.live_server_process
def test_metrics_are_served_over_loopback_by_real_daphne(server):
    assert server.metric("django_http_requests_before_middlewares_total") > 0


# ------------------------------------------------------- item 8: the ASGI body cap, without a server


def asgi_scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict:
    return {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": headers, "client": ["127.0.0.1", 1], "server": ["127.0.0.1", 80]}


async def run_capped(path: str, chunks: list[bytes], headers=(), caps=None, default=100):
    """Run the body-cap middleware over a recording app; (what was sent, what the app saw, chunks read)."""
    from core.bodylimit import BodyLimitMiddleware

    seen: list[dict] = []
    sent: list[dict] = []
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    read = 0

    async def receive():
        nonlocal read
        if pending:
            read += 1
            return pending.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        while True:
            message = await receive()
            seen.append(message)
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        if seen[-1]["type"] == "http.request":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    middleware = BodyLimitMiddleware(app, default_cap=default, caps=caps or {})
    await asyncio.wait_for(middleware(asgi_scope(path, list(headers)), receive, send), 5)
    return sent, seen, read


async def test_a_declared_length_over_the_cap_is_refused_without_reading_the_body():
    sent, seen, read = await run_capped("/api/v1/messages/", [b"x" * 50] * 4, headers=[(b"content-length", b"200")])
    assert (sent[0]["status"], seen, read) == (413, [], 0)
    assert (b"content-type", b"application/json") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["code"] == "request_too_large"


async def test_an_undeclared_body_is_cut_off_once_it_passes_the_cap():
    sent, seen, read = await run_capped("/api/v1/messages/", [b"x" * 60] * 10)
    assert sent[0]["status"] == 413
    assert read == 2  # stopped reading at 120 > 100
    # The app never gets a partial body as if it were whole: it is told the client went away.
    assert seen[-1]["type"] == "http.disconnect" and sum(len(m.get("body", b"")) for m in seen) <= 100


async def test_a_body_within_the_cap_passes_whole():
    sent, seen, _ = await run_capped("/api/v1/messages/", [b"x" * 50, b"y" * 50], headers=[(b"content-length", b"100")])
    assert sent[0]["status"] == 200
    assert b"".join(m["body"] for m in seen) == b"x" * 50 + b"y" * 50


async def test_the_cap_is_chosen_per_path():
    caps = {"/api/v1/attachments/": 1000}
    sent, _, _ = await run_capped("/api/v1/attachments/", [b"x" * 500], headers=[(b"content-length", b"500")], caps=caps)
    assert sent[0]["status"] == 200
    sent, _, _ = await run_capped("/api/v1/messages/", [b"x" * 500], headers=[(b"content-length", b"500")], caps=caps)
    assert sent[0]["status"] == 413


async def test_a_malformed_content_length_is_a_400():
    sent, seen, _ = await run_capped("/api/v1/messages/", [b"x"], headers=[(b"content-length", b"12abc")])
    assert (sent[0]["status"], seen) == (400, [])
