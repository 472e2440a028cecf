"""WebSocket attacks that need no real transport: through the whole ASGI stack, in process."""
import pytest
from channels.db import database_sync_to_async

from chat import consumers
from tests.chat.test_consumer import open_socket, receive, receive_messages, send_over_rest_path

pytestmark = pytest.mark.django_db(transaction=True)


async def test_a_write_that_fails_costs_that_frame_not_the_consumer(make_user, make_group, monkeypatch):
    alice, bob = await database_sync_to_async(make_user)("alice"), await database_sync_to_async(make_user)("bob")
    conversation = await database_sync_to_async(make_group)(alice, bob)
    socket, connected = await open_socket(bob, conversation)
    assert connected
    assert (await receive(socket))["type"] == "ready"
    real_send = consumers.ChatConsumer.send
    failed = []

    async def send_failing_once(self, text_data=None, bytes_data=None, close=False):
        if not failed and '"message.new"' in (text_data or ""):
            failed.append(text_data)
            raise RuntimeError("transport refused the frame")
        return await real_send(self, text_data=text_data, bytes_data=bytes_data, close=close)

    monkeypatch.setattr(consumers.ChatConsumer, "send", send_failing_once)
    await send_over_rest_path(alice, conversation, "lost on the way out")
    await send_over_rest_path(alice, conversation, "arrives")
    assert [m["content"] for m in await receive_messages(socket, 1)] == ["arrives"]
    assert len(failed) == 1
    await socket.send_json_to({"type": "ping"})
    assert await receive(socket) == {"type": "pong"}
    await socket.disconnect()
