"""Admission control for WebSocket handshakes (chat.ws_auth.HandshakeAdmission): at
CHAT_MAX_PENDING_HANDSHAKES in progress the server stops accepting connections until half the
slots are free; past the slots, a handshake accepted meanwhile waits its turn (first come, first
served) for a while, and is refused, before the application behind it does any work, when the
queue is full or the wait too long; a slot frees when a handshake is accepted, refused or dies."""
import asyncio
import functools

import pytest

from chat import metrics, ws_auth
from chat.ws_auth import HandshakeAdmission


class Handshake:
    """One connection as daphne drives it: websocket.connect in, whatever the app sends out."""

    def __init__(self, admission: HandshakeAdmission, server: "Server | None" = None) -> None:
        self.sent: list[dict] = []
        self.incoming: asyncio.Queue = asyncio.Queue()
        self.incoming.put_nowait({"type": "websocket.connect"})
        # daphne's `send` is `partial(server.handle_reply, protocol)`: the admission finds the server in it.
        send = functools.partial(server.handle_reply, self) if server is not None else self.send
        self.task = asyncio.create_task(admission({"type": "websocket"}, self.incoming.get, send))

    async def send(self, message: dict) -> None:
        self.sent.append(message)


class Server:
    """What the admission uses of core.transport's daphne server: it pauses and resumes accepting."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def handle_reply(self, handshake: Handshake, message: dict) -> None:
        await handshake.send(message)

    def pause_accepting(self) -> None:
        self.calls.append(("pause",))

    def resume_accepting(self, at_most: int) -> None:
        self.calls.append(("resume", at_most))


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


async def test_over_the_limit_a_handshake_waits_and_past_the_queue_it_is_refused_before_the_app_sees_it(app, monkeypatch):
    monkeypatch.setattr(ws_auth, "QUEUE_PER_SLOT", 1)  # 2 slots: 2 may wait
    admission = HandshakeAdmission(app)
    shed_before = metrics.websocket_handshake_shed._value.get()
    first, second = Handshake(admission), Handshake(admission)
    await settle()
    third, fourth = Handshake(admission), Handshake(admission)
    await settle()
    refused = Handshake(admission)
    await settle()
    assert refused.task.done() and refused.sent == [{"type": "websocket.close"}]
    assert app.started == 2 and metrics.websocket_handshake_shed._value.get() == shed_before + 1
    assert not third.task.done() and not fourth.task.done()  # waiting, not refused

    # An accepted handshake frees its slot (the connection itself no longer counts): the first
    # one waiting gets it ...
    app.answers[0].set_result({"type": "websocket.accept"})
    await settle()
    assert app.started == 3 and admission.pending == 2
    # ... and so does a refusal, for the next one waiting.
    app.answers[1].set_result({"type": "websocket.close"})
    await settle()
    assert app.started == 4 and len(admission.queue) == 0
    # A dead handshake frees its slot too.
    app.answers[2].set_result(None)
    app.answers[3].set_result({"type": "websocket.accept"})
    await settle()
    assert admission.pending == 0
    for h in (first, second, third, fourth):
        h.task.cancel()
    await asyncio.gather(*(h.task for h in (first, second, third, fourth)), return_exceptions=True)
    assert admission.pending == 0


async def test_a_handshake_that_waited_too_long_is_refused_and_gives_up_its_place(app, monkeypatch):
    monkeypatch.setattr(ws_auth, "QUEUE_SECONDS", 0.05)
    admission = HandshakeAdmission(app)
    first, second = Handshake(admission), Handshake(admission)
    await settle()
    waiting = Handshake(admission)
    await asyncio.sleep(0.1)
    assert waiting.task.done() and waiting.sent == [{"type": "websocket.close"}]
    assert app.started == 2
    # The slot that frees later is not handed to the one that left: it is free.
    app.answers[0].set_result({"type": "websocket.accept"})
    await settle()
    assert admission.pending == 1
    third = Handshake(admission)
    await settle()
    assert app.started == 3 and admission.pending == 2
    for h in (first, second, third):
        h.task.cancel()
    await asyncio.gather(*(h.task for h in (first, second, third)), return_exceptions=True)
    assert admission.pending == 0


async def test_the_slots_come_back_as_handshakes_end(app):
    admission = HandshakeAdmission(app)
    first, second = Handshake(admission), Handshake(admission)
    await settle()
    app.answers[0].set_result({"type": "websocket.accept"})
    await settle()
    third = Handshake(admission)
    await settle()
    assert app.started == 3 and not third.task.done()
    # A refusal and a handshake whose application died give theirs back too.
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


async def test_a_shutdown_that_cancels_running_and_queued_handshakes_together_leaves_none_running(app):
    """daphne cancels every application at once: a slot handed to a queued handshake in that same
    moment must not start it (it would run on past the shutdown, which waits for it)."""
    admission = HandshakeAdmission(app)
    running = [Handshake(admission), Handshake(admission)]
    await settle()
    queued = [Handshake(admission), Handshake(admission)]
    await settle()
    everyone = running + queued
    for handshake in everyone:
        handshake.task.cancel()
    done, still_running = await asyncio.wait([h.task for h in everyone], timeout=1)
    assert not still_running
    assert app.started == 2 and admission.pending == 0


async def test_with_every_slot_taken_the_server_stops_accepting_until_half_of_them_are_free(settings):
    """New clients then wait in the kernel's listen queue instead of being refused into their
    backoff; accepting resumes for as many connections as there are free slots."""
    settings.CHAT_MAX_PENDING_HANDSHAKES = 4
    app, server = App(), Server()
    admission = HandshakeAdmission(app)
    handshakes = [Handshake(admission, server) for _ in range(3)]
    await settle()
    assert server.calls == []
    handshakes.append(Handshake(admission, server))
    await settle()
    assert server.calls == [("pause",)]
    # One accepted in the burst before the pause waits for a slot, and gets the first that frees:
    # still every slot taken, still paused.
    handshakes.append(Handshake(admission, server))
    await settle()
    app.answers[0].set_result({"type": "websocket.accept"})
    await settle()
    assert app.started == 5 and server.calls == [("pause",)]
    app.answers[1].set_result({"type": "websocket.accept"})
    await settle()
    assert server.calls == [("pause",)]  # one slot free of four: not yet
    app.answers[2].set_result({"type": "websocket.close"})
    await settle()
    assert server.calls == [("pause",), ("resume", 2)]
    assert all(h.sent == [m] for h, m in zip(handshakes, ({"type": "websocket.accept"},) * 2 + ({"type": "websocket.close"},)))
    for h in handshakes:
        h.task.cancel()
    await asyncio.gather(*(h.task for h in handshakes), return_exceptions=True)
    assert admission.pending == 0 and server.calls == [("pause",), ("resume", 2)]


async def test_a_pause_lasts_at_most_max_pause_seconds_even_with_every_slot_still_taken(settings, monkeypatch):
    """HTTP connections share the listening socket: handshakes that stay slow (Redis away, a
    flood) must not keep them waiting. Past the pause the overflow is queued and refused as before."""
    monkeypatch.setattr(ws_auth, "MAX_PAUSE_SECONDS", 0.05)
    settings.CHAT_MAX_PENDING_HANDSHAKES = 2
    app, server = App(), Server()
    admission = HandshakeAdmission(app)
    handshakes = [Handshake(admission, server) for _ in range(2)]
    await settle()
    assert server.calls == [("pause",)]
    await asyncio.sleep(0.1)
    assert server.calls == [("pause",), ("resume", 1)] and admission.pending == 2
    app.answers[0].set_result({"type": "websocket.accept"})  # a slot frees: nothing more to resume
    await settle()
    assert server.calls == [("pause",), ("resume", 1)]
    for h in handshakes:
        h.task.cancel()
    await asyncio.gather(*(h.task for h in handshakes), return_exceptions=True)
    assert admission.pending == 0
