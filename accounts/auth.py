"""Authentication: the token scheme (django-rest-knox: per device, hashed at rest, sliding expiry)
and Django's model backend behind the login throttles. Both serve every transport: DRF, the
Django admin and session logins, and the WebSocket handshake (chat/ws_auth.py)."""
from __future__ import annotations

import binascii
import logging
import re
import threading
from collections.abc import Sequence
from functools import cache
from hmac import compare_digest

from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.db import DatabaseError, connection, connections
from django.utils import timezone
from knox import auth as knox_auth
from knox.crypto import hash_token
from knox.models import get_token_model
from knox.settings import CONSTANTS, knox_settings
from rest_framework import exceptions

from accounts import throttles

logger = logging.getLogger(__name__)

# Printable ASCII without spaces, bounded: anything else cannot be a token, and never reaches the
# database (a NUL would make PostgreSQL refuse the query) or the hash.
_TOKEN_SHAPE = re.compile(rb"[!-~]{1,256}")


class TokenAuthentication(knox_auth.TokenAuthentication):
    """`Authorization: Token <key>`. An expired token is deleted and refused; a live one slides."""

    def authenticate_credentials(self, token: bytes):
        if not _TOKEN_SHAPE.fullmatch(token):
            raise exceptions.AuthenticationFailed("Invalid token.")
        token = token.decode()
        writes = _TokenWrites()
        try:
            user, auth_token = _check(token, tokens_with_users(token[: CONSTANTS.TOKEN_KEY_LENGTH]), writes)
        finally:
            gone = writes.flush()
        if auth_token.digest in gone:
            raise exceptions.AuthenticationFailed("Invalid token.")
        return user, auth_token


def _check(token: str, candidates: list, writes: "_TokenWrites"):
    """knox's steps over the tokens read for `token`'s key (`tokens_with_users`: knox builds and
    compiles `filter(token_key=...).select_related("user")` on every request, which was 13 % of a
    WebSocket handshake's CPU, docs/performance.md): (user, token), or AuthenticationFailed. Its
    writes wait in `writes`."""
    for auth_token in candidates:
        if writes.expired(auth_token):
            continue
        try:
            digest = hash_token(token)
        except (TypeError, binascii.Error):
            raise exceptions.AuthenticationFailed("Invalid token.") from None
        if compare_digest(digest, auth_token.digest):
            if knox_settings.AUTO_REFRESH and auth_token.expiry:
                writes.slide(auth_token)
            if not auth_token.user.is_active:
                raise exceptions.AuthenticationFailed("User inactive or deleted.")
            return auth_token.user, auth_token
    raise exceptions.AuthenticationFailed("Invalid token.")


class _TokenWrites:
    """What checking tokens writes, set-wise at the end: the expired tokens deleted (knox also sweeps
    every other token of the user on each check, a query per request; they are swept at login
    instead, accounts.services.token_issue), and the expiries that slide (knox's renew_token, at
    most once per MIN_REFRESH_INTERVAL per token). One statement each for a whole batch of checks:
    the handshakes that share a read share its writes too."""

    def __init__(self) -> None:
        self.now = timezone.now()
        self.to_delete: set[str] = set()
        self.to_slide: dict[str, object] = {}  # digest -> token

    def expired(self, auth_token) -> bool:
        if auth_token.expiry is not None and auth_token.expiry < self.now:
            self.to_delete.add(auth_token.digest)
            return True
        return False

    def slide(self, auth_token) -> None:
        new_expiry = self.now + knox_settings.TOKEN_TTL
        if knox_settings.AUTO_REFRESH_MAX_TTL is not None:
            new_expiry = min(new_expiry, auth_token.created + knox_settings.AUTO_REFRESH_MAX_TTL)
        if (new_expiry - auth_token.expiry).total_seconds() > knox_settings.MIN_REFRESH_INTERVAL:
            auth_token.expiry = new_expiry
            self.to_slide[auth_token.digest] = auth_token

    def flush(self) -> set[str]:
        """Write; the digests of the tokens whose expiry was to slide and that are gone meanwhile
        (revoked between the read and now: refused, as knox's save of a deleted token refuses).
        Best effort otherwise: a write the database refuses (its writer busy past the timeout)
        leaves the expiry where it was and the expired token for the next check, and fails no
        check, so that it holds up no other handshake that shared the read."""
        token_model = get_token_model()
        gone: set[str] = set()
        try:
            if self.to_delete:
                token_model.objects.filter(digest__in=self.to_delete).delete()
            by_expiry: dict[object, list[str]] = {}
            for digest, auth_token in self.to_slide.items():
                by_expiry.setdefault(auth_token.expiry, []).append(digest)
            for expiry, digests in by_expiry.items():
                if token_model.objects.filter(digest__in=digests).update(expiry=expiry) < len(digests):
                    gone |= set(digests) - set(token_model.objects.filter(digest__in=digests).values_list("digest", flat=True))
        except DatabaseError:
            logger.warning("token expiry and clean-up writes failed; left for the next check", exc_info=True)
        return gone


def users_for_tokens(keys: Sequence[str]) -> list:
    """The active user whose live token each key is (sliding its expiry), or None: what REST's
    check answers, for many keys at once (the WebSocket handshakes that arrive together), with one
    statement reading every token they name, and set-wise writes. Blocking."""
    shaped = [key if key.isascii() and _TOKEN_SHAPE.fullmatch(key.encode()) else None for key in keys]
    candidates: dict[str, list] = {}
    for auth_token in tokens_with_users(*{key[: CONSTANTS.TOKEN_KEY_LENGTH] for key in shaped if key}):
        candidates.setdefault(auth_token.token_key, []).append(auth_token)
    writes = _TokenWrites()
    found: list = []
    try:
        for key in shaped:
            try:
                found.append(_check(key, candidates.get(key[: CONSTANTS.TOKEN_KEY_LENGTH], []), writes) if key else None)
            except exceptions.AuthenticationFailed:
                found.append(None)
    finally:
        gone = writes.flush()
    return [None if checked is None or checked[1].digest in gone else checked[0] for checked in found]


@cache
def _tokens_with_users_sql(vendor: str, token_model, user_model) -> str:
    """The statement of `tokens_with_users` (its text is built once per database vendor and pair
    of models): the token's concrete fields, then the user's."""
    quote = connection.ops.quote_name
    token_fields, user_fields = list(token_model._meta.concrete_fields), list(user_model._meta.concrete_fields)
    columns = [f"t.{quote(field.column)}" for field in token_fields] + [f"u.{quote(field.column)}" for field in user_fields]
    user_key = token_model._meta.get_field("user")
    return (
        f"SELECT {', '.join(columns)} FROM {quote(token_model._meta.db_table)} t "
        f"JOIN {quote(user_model._meta.db_table)} u ON u.{quote(user_key.target_field.column)} = t.{quote(user_key.column)} "
        f"WHERE t.{quote(token_model._meta.get_field('token_key').column)} IN "
    )


def _from_row(model, values) -> object:
    """A model instance from its concrete fields' columns as the database returned them, converted
    as the ORM converts them (the backend's converters, then the field's)."""
    db = connections[connection.alias]  # this thread's connection: its converters are bound to it
    converted = []
    for (column, converters), value in zip(_converters(db, model), values):
        for convert in converters:
            value = convert(value, column, db)
        converted.append(value)
    return model.from_db(db.alias, [field.attname for field in model._meta.concrete_fields], converted)


# This thread's connection and, per model, each concrete field's column with its converters on
# that connection: looked up once per thread instead of per row (per row they were half of a token
# check's CPU). Per thread, not in a shared cache: the converters are bound to the thread's
# connection, and a thread's entry goes with it (REST requests each run in a thread of their own).
_thread = threading.local()


def _converters(db, model) -> list[tuple[object, list]]:
    if getattr(_thread, "db", None) is not db:
        _thread.db, _thread.converters = db, {}
    found = _thread.converters.get(model)
    if found is None:
        columns = [field.get_col(model._meta.db_table) for field in model._meta.concrete_fields]
        found = _thread.converters[model] = [
            (column, db.ops.get_db_converters(column) + column.get_db_converters(db)) for column in columns
        ]
    return found


def tokens_with_users(*token_keys: str) -> list:
    """The tokens whose key is one of `token_keys`, each with its user loaded: what knox reads with
    `filter(token_key=...).select_related("user")`, in one hand-written statement (on the default
    database, the only relational one; knox's manager filters nothing)."""
    if not token_keys:
        return []
    token_model, user_model = get_token_model(), get_user_model()
    statement = _tokens_with_users_sql(connection.vendor, token_model, user_model)
    with connection.cursor() as cursor:
        cursor.execute(f"{statement}({', '.join(['%s'] * len(token_keys))})", list(token_keys))
        rows = cursor.fetchall()
    split = len(token_model._meta.concrete_fields)
    tokens = []
    for row in rows:
        auth_token = _from_row(token_model, row[:split])
        auth_token.user = _from_row(user_model, row[split:])
        tokens.append(auth_token)
    return tokens


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
