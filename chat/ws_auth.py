"""WebSocket handshake: admission, the Origin check and authentication (token header, one-time
ticket, session cookie).

Every layer under daphne that is a coroutine of its own keeps a frame alive (and often a copy of
the scope) for as long as its connection: a few hundred bytes to a kilobyte each, times thousands
of idle sockets per process. So the layers here hand on the inner application's coroutine instead
of awaiting it where they can (`keep_server_send`, `ChatOriginValidator`), the socket reads the
session itself instead of channels' cookie and session middlewares wrapping it, and the consumer
authenticates in its handshake (`authenticate`) instead of a middleware around it.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from importlib import import_module
from typing import Any
from urllib.parse import parse_qs, urlparse

from channels.auth import get_user
from channels.security.websocket import OriginValidator
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.http.cookie import parse_cookie

from chat import metrics
from core import transport
from core.batching import Batcher, per_loop
from core.threads import in_thread


# A handshake over CHAT_MAX_PENDING_HANDSHAKES waits at most this long for a slot (HandshakeAdmission).
QUEUE_SECONDS = 2.0
# At most this many handshakes wait per slot; past that they are refused at once.
QUEUE_PER_SLOT = 4
# A process that stopped accepting connections (every slot taken) accepts again once this share
# of the slots is free, or after MAX_PAUSE_SECONDS, whichever comes first.
RESUME_WITH_FREE = 0.5
MAX_PAUSE_SECONDS = 0.5


async def deny(scope, receive, send):
    """Refuse the handshake (HTTP 403) with no channel-layer channel (channels' WebsocketDenier
    subscribes one in Redis first, and dies with a 500 while Redis is down)."""
    await receive()  # websocket.connect
    await send({"type": "websocket.close"})


class ChatOriginValidator(OriginValidator):
    """Browsers must come from an allowed host; clients that send no Origin (not browsers) pass."""

    def __call__(self, scope, receive, send):
        # channels' own __call__ awaits the application in a frame of its own; this returns it.
        origins = [value for name, value in scope.get("headers", []) if name == b"origin"]
        try:
            parsed_origin = urlparse(origins[-1].decode("latin1")) if origins else None
            valid = self.valid_origin(parsed_origin)
        except ValueError:  # an Origin no browser sends (urlparse refuses it)
            metrics.websocket_connection_unauthorized.inc()
            valid = False
        return self.application(scope, receive, send) if valid else deny(scope, receive, send)

    def valid_origin(self, parsed_origin) -> bool:
        if parsed_origin is None:
            return True
        valid = self.validate_origin(parsed_origin)
        if not valid:
            metrics.websocket_connection_unauthorized.inc()
        return valid


def _user_for_ticket(ticket: str):
    from accounts.services import ws_ticket_redeem

    return ws_ticket_redeem(ticket=ticket) or AnonymousUser()


def _user_for_session(session_key: str):
    # channels' get_user: Django's checks (the backend, the session's auth hash).
    session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    return get_user.func({"session": session})


def _credential(scope) -> tuple[str, str] | None:
    """The kind of a handshake's credential ("token", "ticket", "session") and its value; None when
    it names nobody. An explicit credential (header or ticket) wins over the session cookie, and a
    bad explicit credential names nobody: it never falls back to the cookie."""
    headers = dict(scope.get("headers", []))
    authorization = headers.get(b"authorization", b"").decode("latin1")
    tickets = parse_qs(scope.get("query_string", b"").decode("latin1")).get("ticket")
    if authorization:
        scheme, _, key = authorization.partition(" ")
        return ("token", key.strip()) if scheme.lower() == "token" else None
    if tickets:
        return "ticket", tickets[0]
    session_key = parse_cookie(headers.get(b"cookie", b"").decode("latin1")).get(settings.SESSION_COOKIE_NAME)
    return ("session", session_key) if session_key else None


# A read the handshake needs next, done in the same trip to the thread pool as the authentication:
# a set-wise function of [(user, argument), ...] -> [result, ...], and this handshake's argument.
FirstRead = tuple[Callable[[list[tuple[Any, Any]]], list[Any]], Any]


async def authenticate(scope, then: FirstRead | None = None) -> tuple[Any, Any]:
    """The user a handshake's credential names (or AnonymousUser), and what `then` reads for an
    authenticated one (else None). (The consumer's handshake calls it, in a frame that ends with
    it: what is parsed here, the token included, is not kept for the connection's lifetime.)"""
    credential = _credential(scope)
    if credential is None:
        return AnonymousUser(), None
    kind, value = credential
    if kind == "token":
        return await _tokens_together().submit((value, then))
    lookup = _user_for_ticket if kind == "ticket" else _user_for_session
    return await in_thread(_look_up)(lookup, value, then)


def _look_up(lookup: Callable[[str], Any], value: str, then: FirstRead | None) -> tuple[Any, Any]:
    user = lookup(value)
    return user, _read_each([(user, then)])[0]


def _read_each(asked: list[tuple[Any, FirstRead | None]]) -> list[Any]:
    """Each authenticated user's first read, one call of each read function for all who ask it."""
    results: list[Any] = [None] * len(asked)
    by_read: dict[Callable, list[tuple[int, Any, Any]]] = {}
    for index, (user, then) in enumerate(asked):
        if then is not None and user.is_authenticated:
            by_read.setdefault(then[0], []).append((index, user, then[1]))
    for read, entries in by_read.items():
        for (index, _, _), result in zip(entries, read([(user, argument) for _, user, argument in entries]), strict=True):
            results[index] = result
    return results


def _tokens_and_reads(asked: list[tuple[str, FirstRead | None]]) -> list[tuple[Any, Any]]:
    from accounts.auth import users_for_tokens  # (the same check as REST: hashed lookup, sliding expiry, active)

    users = [user or AnonymousUser() for user in users_for_tokens([key for key, _ in asked])]
    return list(zip(users, _read_each([(user, then) for user, (_, then) in zip(users, asked)])))


async def _authenticate_tokens(asked: list[tuple[str, FirstRead | None]]) -> list[tuple[Any, Any]]:
    return await in_thread(_tokens_and_reads)(asked)


# The token handshakes that arrive while one trip is under way share the next: one trip to the
# thread pool, one statement for their tokens and one for each kind of first read (a reconnect
# storm's). Tickets and sessions (browsers) keep a trip each: redeeming a ticket writes.
_tokens_together = per_loop(lambda: Batcher(_authenticate_tokens, max_batch=settings.CHAT_MAX_PENDING_HANDSHAKES))


class HandshakeAdmission:
    """Admission control for WebSocket handshakes, before any other work on them.

    A handshake costs authentication, an authorization read and the fan-out's subscription; when
    thousands arrive at once (every client of a restarted server), a process that starts them all
    finishes none within daphne's connect timeout: each is dropped after its work was done and
    comes back as one more. So a process works on at most CHAT_MAX_PENDING_HANDSHAKES at a time,
    and while all of them are taken it stops accepting connections (core.transport's server): the
    next clients wait in the kernel's listen queue, which costs the process nothing, and are taken
    in turn as slots free, instead of being refused into their backoff (seconds each, growing) and
    coming back after the burst has cleared. The pause ends when half the slots are free, or after
    MAX_PAUSE_SECONDS at most: HTTP connections share the listening socket, and handshakes that
    stay slow (Redis away, a flood of them) must not keep those waiting. The connections accepted
    while slots are all taken (in the burst before the pause, or after it ran out) wait here, first
    come first served, for at most QUEUE_SECONDS (well within daphne's handshake timeout, 5 s).
    Past QUEUE_PER_SLOT waiting per slot, or past the wait, a handshake is refused (HTTP 403, as
    for any connection limit): one cheap answer, and the client backs off."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.pending = 0
        self.queue: deque[asyncio.Future] = deque()
        self.paused = None  # the server not accepting because every slot is taken
        self.pause_timer: asyncio.TimerHandle | None = None

    async def __call__(self, scope, receive, send):
        while self.queue and self.queue[0].done():  # turns that ran out: no longer waiting
            self.queue.popleft()
        if self.pending < settings.CHAT_MAX_PENDING_HANDSHAKES and not self.queue:
            self.pending += 1
        elif not await self._wait_for_a_slot():
            metrics.websocket_handshake_shed.inc()
            return await deny(scope, receive, send)
        admitted = _AdmittedSend(self, send)
        try:
            if self.pending == settings.CHAT_MAX_PENDING_HANDSHAKES:
                self._pause_accepting(send)
            return await self.inner(scope, receive, admitted)
        finally:
            admitted.handshake_over()

    async def _wait_for_a_slot(self) -> bool:
        """Queue for a slot; True once one was handed over (it counts in `pending` then). The turn
        is settled once, by release() (True) or by the timer (False): asyncio.wait_for could lose
        a cancellation that came with the slot (3.11), or a slot that came with the timeout (3.12+)."""
        if len(self.queue) >= QUEUE_PER_SLOT * settings.CHAT_MAX_PENDING_HANDSHAKES:
            return False
        loop = asyncio.get_running_loop()
        turn = loop.create_future()
        self.queue.append(turn)
        timer = loop.call_later(QUEUE_SECONDS, _turn_runs_out, turn)
        try:
            return await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.result():
                self.release()  # the slot came with the cancellation (a shutdown): pass it on
            raise
        finally:
            timer.cancel()

    def release(self) -> None:
        """A handshake ended (accepted, refused or dead): its slot goes to the longest waiting one."""
        while self.queue:
            turn = self.queue.popleft()
            if not turn.done():  # (a turn that ran out, or whose handshake went away: skipped)
                turn.set_result(True)
                return
        self.pending -= 1
        if settings.CHAT_MAX_PENDING_HANDSHAKES - self.pending >= RESUME_WITH_FREE * settings.CHAT_MAX_PENDING_HANDSHAKES:
            self._resume_accepting()

    def _pause_accepting(self, send) -> None:
        """`send` is the server's own (keep_server_send is the outermost layer). Another server,
        or the test communicator, has no pause: its connections are only queued and refused."""
        server = transport.daphne_server(send)
        if self.paused is None and hasattr(server, "pause_accepting"):
            server.pause_accepting()
            self.paused = server
            self.pause_timer = asyncio.get_running_loop().call_later(MAX_PAUSE_SECONDS, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self.paused is None:
            return
        # About as many new connections as there are free slots (core.transport's server), at
        # least one; the next pause comes when the slots are all taken again (not one resume and
        # pause per handshake).
        self.paused.resume_accepting(at_most=max(1, settings.CHAT_MAX_PENDING_HANDSHAKES - self.pending))
        self.paused = None
        self.pause_timer.cancel()
        self.pause_timer = None


def _turn_runs_out(turn: asyncio.Future) -> None:
    if not turn.done():
        turn.set_result(False)


class _AdmittedSend:
    """The `send` of an admitted handshake: its slot frees at the accept or the refusal. (A small
    object, not closures: it lives as long as the connection, and there are thousands.)"""

    __slots__ = ("admission", "send")

    def __init__(self, admission: HandshakeAdmission, send) -> None:
        self.admission: HandshakeAdmission | None = admission
        self.send = send

    def handshake_over(self) -> None:
        if self.admission is not None:
            self.admission.release()
            self.admission = None

    async def __call__(self, message):
        if self.admission is not None and message["type"] in ("websocket.accept", "websocket.close"):
            self.handshake_over()
        await self.send(message)


def keep_server_send(inner):
    """Put the server's own `send` in the scope, before middleware wraps it: the consumer reads
    the socket's unsent backlog through it (chat.consumers.socket_backlog_probe)."""

    def app(scope, receive, send):
        # In place: this is the outermost application and the scope is the server's, made for this
        # connection; a copy would stay alive as long as the socket. And no coroutine of its own
        # (the inner application's is returned, for the server to run): a frame per connection.
        scope["server_send"] = send
        return inner(scope, receive, send)

    app._asgi_single_callable = True  # an ASGI 3 application, though not a coroutine function
    return app


def websocket_stack(inner):
    allowed = settings.ALLOWED_HOSTS or (["localhost", "127.0.0.1", "[::1]"] if settings.DEBUG else [])
    return keep_server_send(
        HandshakeAdmission(ChatOriginValidator(inner, allowed))
    )
