"""Attachments as a person uses them, on daphne over real sockets, on local storage and on the S3
API server: upload a photo, send it over the WebSocket, the other participant's socket gets the
descriptor live and the participant downloads it; too large a file is a JSON 413 while it
streams, from the transport (whole body) and from the upload handler (the file itself)."""
from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
import uuid

import pytest
from websockets.asyncio.client import connect

from tests.chat.attachment_files import jpeg, multipart
from tests.live import running_server
from tests.services import S3_ENDPOINT_URL, require, s3_available
from tests.test_live_server import next_frame, ws_url

pytestmark = pytest.mark.live_server_process

MAX_ATTACHMENT_BYTES = 200_000


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def http(method: str, url: str, *, body: bytes | None = None, headers: dict | None = None):
    """(status, body bytes, headers), redirects not followed."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _opener.open(request, timeout=15) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers


def upload(server, token: str, name: str, data: bytes):
    body, content_type = multipart(name, data)
    return http("POST", f"{server.http}/api/v1/attachments/", body=body,
                headers={"Authorization": f"Token {token}", "Content-Type": content_type})


@pytest.fixture(scope="module", params=["local", "s3"])
def server(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"attachments-{request.param}")
    env = {"CHAT_MAX_ATTACHMENT_BYTES": str(MAX_ATTACHMENT_BYTES)}
    bucket = None
    if request.param == "local":
        env["CHAT_ATTACHMENT_ROOT"] = str(directory / "attachments")
    else:
        require("The S3 API server", s3_available())
        import boto3

        bucket = boto3.resource("s3", endpoint_url=S3_ENDPOINT_URL, aws_access_key_id="test",
                                aws_secret_access_key="test", region_name="us-east-1").Bucket(
            f"live-attachments-{uuid.uuid4().hex[:12]}")
        bucket.create()
        env.update(CHAT_ATTACHMENT_STORAGE="s3", CHAT_S3_BUCKET=bucket.name, CHAT_S3_ENDPOINT_URL=S3_ENDPOINT_URL,
                   CHAT_S3_ACCESS_KEY_ID="test", CHAT_S3_SECRET_ACCESS_KEY="test")
    with running_server(directory, **env) as live:
        live.storage = request.param
        yield live
    if bucket is not None:
        bucket.objects.all().delete()
        bucket.delete()


@pytest.fixture(scope="module")
def people(server):
    alice_id, alice = server.signup("alice")
    bob_id, bob = server.signup("bob")
    status, created, _ = server.request(
        "POST", "/api/v1/conversations/", {"kind": "direct", "participant_ids": [bob_id]}, token=alice
    )
    assert status == 201
    return {"conversation": created["id"], "alice": alice, "bob": bob}


async def test_a_photo_reaches_the_other_participant_who_downloads_it(server, people):
    photo = jpeg((1024, 768), location=True)
    status, raw, _ = upload(server, people["alice"], "beach.jpg", photo)
    assert status == 201, raw
    descriptor = json.loads(raw)

    url = ws_url(server, people["conversation"])
    async with connect(url, additional_headers={"Authorization": f"Token {people['alice']}"}) as alice, connect(
        url, additional_headers={"Authorization": f"Token {people['bob']}"}
    ) as bob:
        assert (await next_frame(alice))["type"] == (await next_frame(bob))["type"] == "ready"
        await alice.send(json.dumps({"type": "message.send", "client_message_id": "photo-1", "content": "",
                                     "message_type": "image", "attachments": [descriptor["attachment_id"]]}))
        frame = await next_frame(bob)
        assert frame["type"] == "message.new"
        assert frame["message"]["attachments"] == [descriptor]

    status, body, headers = http("GET", server.http + descriptor["url"], headers={"Authorization": f"Token {people['bob']}"})
    if server.storage == "s3":
        assert status == 302
        status, body, headers = http("GET", headers["Location"])  # the signed URL needs no token
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == descriptor["sha256"]
    assert headers["Content-Type"] == "image/jpeg"

    status, part, headers = http("GET", server.http + descriptor["url"],
                                 headers={"Authorization": f"Token {people['bob']}", "Range": "bytes=0-99"})
    if server.storage == "s3":
        status, part, headers = http("GET", headers["Location"], headers={"Range": "bytes=0-99"})
    assert status == 206 and part == body[:100]


def test_too_large_a_body_is_a_json_413_from_the_transport(server, people):
    status, raw, _ = upload(server, people["alice"], "big.bin", b"\x01" * (MAX_ATTACHMENT_BYTES + 200_000))
    assert status == 413
    assert json.loads(raw)["code"] == "request_too_large"


def test_too_large_a_file_is_a_json_413_from_the_upload_handler(server, people):
    # Within the body cap (the file's limit plus the multipart envelope), over the file's limit.
    status, raw, _ = upload(server, people["alice"], "big.bin", b"\x01" * (MAX_ATTACHMENT_BYTES + 1))
    assert status == 413
    assert json.loads(raw) == {"detail": f"Attachments are limited to {MAX_ATTACHMENT_BYTES} bytes.",
                               "code": "request_too_large"}


async def test_someone_elses_upload_is_an_error_frame(server, people):
    status, raw, _ = upload(server, people["bob"], "bobs.txt", b"mine")
    bobs = json.loads(raw)["attachment_id"]
    url = ws_url(server, people["conversation"])
    async with connect(url, additional_headers={"Authorization": f"Token {people['alice']}"}) as alice:
        await next_frame(alice)
        await alice.send(json.dumps({"type": "message.send", "client_message_id": "steal-1", "content": "",
                                     "attachments": [bobs]}))
        frame = await next_frame(alice)
    assert (frame["type"], frame["code"], frame["client_message_id"]) == ("error", "validation_error", "steal-1")
    assert "attachments" in frame["fields"]
