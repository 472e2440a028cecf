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
        scope = dict(scope)
        authorization = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin1")
        tickets = parse_qs(scope.get("query_string", b"").decode("latin1")).get("ticket")
        if authorization:
            scheme, _, key = authorization.partition(" ")
            scope["user"] = await _user_for_token(key.strip()) if scheme.lower() == "token" else AnonymousUser()
        elif tickets:
            scope["user"] = await _user_for_ticket(tickets[0])
        else:
            # channels' get_user, run in our pool rather than channels' single thread.
            scope["user"] = await in_thread(get_user.func)(scope)
        return await super().__call__(scope, receive, send)


def keep_server_send(inner):
    """Put the server's own `send` in the scope, before middleware wraps it: the consumer reads
    the socket's unsent backlog through it (chat.consumers.socket_backlog_probe)."""

    async def app(scope, receive, send):
        # In place: this is the outermost application and the scope is the server's, made for this
        # connection; a copy would stay alive as long as the socket.
        scope["server_send"] = send
        return await inner(scope, receive, send)

    return app


def websocket_stack(inner):
    allowed = settings.ALLOWED_HOSTS or (["localhost", "127.0.0.1", "[::1]"] if settings.DEBUG else [])
    return keep_server_send(
        ChatOriginValidator(CookieMiddleware(SessionMiddleware(ChatAuthMiddleware(inner))), allowed)
    )
