"""WebSocket handshake: Origin check and authentication (token header, one-time ticket, session)."""
from __future__ import annotations

from urllib.parse import parse_qs

from channels.auth import get_user
from channels.middleware import BaseMiddleware
from channels.security.websocket import OriginValidator
from channels.sessions import CookieMiddleware, SessionMiddleware
from django.conf import settings
from django.contrib.auth.models import AnonymousUser

from chat import metrics
from core.threads import in_thread


class ChatOriginValidator(OriginValidator):
    """Browsers must come from an allowed host; clients that send no Origin (not browsers) pass."""

    def valid_origin(self, parsed_origin) -> bool:
        if parsed_origin is None:
            return True
        valid = self.validate_origin(parsed_origin)
        if not valid:
            metrics.websocket_connection_unauthorized.inc()
        return valid


@in_thread
def _user_for_token(key: str):
    # The same check as REST: hashed lookup, expiry (sliding), active account.
    from accounts.auth import user_for_token

    return user_for_token(key) or AnonymousUser()


@in_thread
def _user_for_ticket(ticket: str):
    from accounts.services import ws_ticket_redeem

    return ws_ticket_redeem(ticket=ticket) or AnonymousUser()


class ChatAuthMiddleware(BaseMiddleware):
    """Sets scope["user"]. An explicit credential (header or ticket) wins over the session cookie,
    and a bad explicit credential means anonymous: it never falls back to the cookie."""

    async def __call__(self, scope, receive, send):
        # The credential is read in a call of its own: this frame lives as long as the connection,
        # and should hold neither the token nor the parsing's leftovers.
        user = await _user_of(scope)
        # (BaseMiddleware.__call__ would only copy the scope once more.)
        return await self.inner({**scope, "user": user}, receive, send)


async def _user_of(scope):
    authorization = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin1")
    tickets = parse_qs(scope.get("query_string", b"").decode("latin1")).get("ticket")
    if authorization:
        scheme, _, key = authorization.partition(" ")
        return await _user_for_token(key.strip()) if scheme.lower() == "token" else AnonymousUser()
    if tickets:
        return await _user_for_ticket(tickets[0])
    # channels' get_user, run in our pool rather than channels' single thread.
    return await in_thread(get_user.func)(scope)


class HandshakeAdmission:
    """Admission control for WebSocket handshakes, before any other work on them.

    A handshake costs authentication, an authorization read and the fan-out's subscription; when
    thousands arrive at once (every client of a restarted server), a process that starts them all
    finishes none within daphne's connect timeout: each is dropped after its work was done and
    comes back as one more. So a process works on at most CHAT_MAX_PENDING_HANDSHAKES at a time
    and refuses the rest at once (HTTP 403, as for any connection limit), which costs one cheap
    answer and sends the client into its backoff."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.pending = 0

    async def __call__(self, scope, receive, send):
        if self.pending >= settings.CHAT_MAX_PENDING_HANDSHAKES:
            metrics.websocket_handshake_shed.inc()
            await receive()  # websocket.connect
            return await send({"type": "websocket.close"})
        self.pending += 1
        admitted = _AdmittedSend(self, send)
        try:
            return await self.inner(scope, receive, admitted)
        finally:
            admitted.handshake_over()


class _AdmittedSend:
    """The `send` of an admitted handshake: its slot frees at the accept or the refusal. (A small
    object, not closures: it lives as long as the connection, and there are thousands.)"""

    __slots__ = ("admission", "send")

    def __init__(self, admission: HandshakeAdmission, send) -> None:
        self.admission: HandshakeAdmission | None = admission
        self.send = send

    def handshake_over(self) -> None:
        if self.admission is not None:
            self.admission.pending -= 1
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
        HandshakeAdmission(ChatOriginValidator(CookieMiddleware(SessionMiddleware(ChatAuthMiddleware(inner))), allowed))
    )
