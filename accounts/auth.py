"""Authentication: the token scheme (django-rest-knox: per device, hashed at rest, sliding expiry)
and Django's model backend behind the login throttles. Both serve every transport: DRF, the
Django admin and session logins, and the WebSocket handshake (chat/ws_auth.py)."""
from __future__ import annotations

import re

from django.contrib.auth.backends import ModelBackend
from django.utils import timezone
from knox import auth as knox_auth
from rest_framework import exceptions

from accounts import throttles

# Printable ASCII without spaces, bounded: anything else cannot be a token, and never reaches the
# database (a NUL would make PostgreSQL refuse the query) or the hash.
_TOKEN_SHAPE = re.compile(rb"[!-~]{1,256}")


class TokenAuthentication(knox_auth.TokenAuthentication):
    """`Authorization: Token <key>`. An expired token is deleted and refused; a live one slides."""

    def authenticate_credentials(self, token: bytes):
        if not _TOKEN_SHAPE.fullmatch(token):
            raise exceptions.AuthenticationFailed("Invalid token.")
        return super().authenticate_credentials(token)

    def _cleanup_token(self, auth_token) -> bool:
        # knox also sweeps every other token of the user here, a query per request; they are swept
        # at login instead (accounts.services.token_issue).
        if auth_token.expiry is not None and auth_token.expiry < timezone.now():
            auth_token.delete()
            return True
        return False


def user_for_token(key: str):
    """The active user whose live token `key` is (sliding its expiry), or None. Blocking."""
    try:
        user, _ = TokenAuthentication().authenticate_credentials(key.encode("latin1", "replace"))
    except exceptions.AuthenticationFailed:
        return None
    return user


class ThrottledModelBackend(ModelBackend):
    """Django's username/password check, behind the failed-login throttles: an attempt over either
    budget raises throttles.LoginThrottled (429) before any password is hashed."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if username is None or password is None:
            return None
        attempt = throttles.login_attempt_begin(username=username, request=request)
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is not None:
            attempt.succeeded()
        return user
