"""Admission control for WebSocket handshakes (chat.ws_auth.HandshakeAdmission): past
CHAT_MAX_PENDING_HANDSHAKES in progress, a handshake is refused at once, before the application
behind it does any work; a slot frees when a handshake is accepted, refused or dies."""
import asyncio

import pytest

from chat import metrics
from chat.ws_auth import HandshakeAdmission


class Handshake:
    """One connection as daphne drives it: websocket.connect in, whatever the app sends out."""

    def __init__(self, admission: HandshakeAdmission) -> None:
        self.sent: list[dict] = []
        self.incoming: asyncio.Queue = asyncio.Queue()
        self.incoming.put_nowait({"type": "websocket.connect"})
        self.task = asyncio.create_task(admission({"type": "websocket"}, self.incoming.get, self.send))

    async def send(self, message: dict) -> None:
        self.sent.append(message)


class App:
    """The application behind admission: each handshake waits until the test answers it."""

    def __init__(self) -> None:
        self.started = 0
        self.answers: list[asyncio.Future] = []

    async def __call__(self, scope, receive, send):
        self.started += 1
        await receive()
        answer = asyncio.get_running_loop().create_future()
        self.answers.append(answer)
        message = await answer
        if message is None:
            raise RuntimeError("the application died during the handshake")
        await send(message)
        await asyncio.sleep(3600)  # the connection lives on after its handshake


@pytest.fixture
def app(settings):
    settings.CHAT_MAX_PENDING_HANDSHAKES = 2
    return App()


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def test_over_the_limit_a_handshake_is_refused_before_the_app_sees_it(app):
    admission = HandshakeAdmission(app)
    shed_before = metrics.websocket_handshake_shed._value.get()
    first, second = Handshake(admission), Handshake(admission)
    await settle()
    refused = Handshake(admission)
    await settle()
    assert refused.task.done() and refused.sent == [{"type": "websocket.close"}]
    assert app.started == 2 and metrics.websocket_handshake_shed._value.get() == shed_before + 1

    # An accepted handshake frees its slot (the connection itself no longer counts) ...
    app.answers[0].set_result({"type": "websocket.accept"})
    await settle()
    third = Handshake(admission)
    await settle()
    assert app.started == 3 and not third.task.done()
    # ... and so do a refusal and a handshake whose application died.
    app.answers[1].set_result({"type": "websocket.close"})
    app.answers[2].set_result(None)
    await settle()
    assert admission.pending == 0
    fourth, fifth = Handshake(admission), Handshake(admission)
    await settle()
    assert app.started == 5 and admission.pending == 2
    for h in (first, second, third, fourth, fifth):
        h.task.cancel()
    await asyncio.gather(*(h.task for h in (first, second, third, fourth, fifth)), return_exceptions=True)
    assert admission.pending == 0
