"""Authentication: the token scheme (django-rest-knox: per device, hashed at rest, sliding expiry)
and Django's model backend behind the login throttles. Both serve every transport: DRF, the
Django admin and session logins, and the WebSocket handshake (chat/ws_auth.py)."""
from __future__ import annotations

import binascii
import re
import threading
from functools import cache
from hmac import compare_digest

from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.db import connection, connections
from django.utils import timezone
from knox import auth as knox_auth
from knox.crypto import hash_token
from knox.models import get_token_model
from knox.settings import CONSTANTS, knox_settings
from rest_framework import exceptions

from accounts import throttles

# Printable ASCII without spaces, bounded: anything else cannot be a token, and never reaches the
# database (a NUL would make PostgreSQL refuse the query) or the hash.
_TOKEN_SHAPE = re.compile(rb"[!-~]{1,256}")


class TokenAuthentication(knox_auth.TokenAuthentication):
    """`Authorization: Token <key>`. An expired token is deleted and refused; a live one slides."""

    def authenticate_credentials(self, token: bytes):
        # knox's own steps, over the rows `tokens_with_users` reads: knox builds and compiles
        # `filter(token_key=...).select_related("user")` on every request, which was 13 % of a
        # WebSocket handshake's CPU (docs/performance.md).
        if not _TOKEN_SHAPE.fullmatch(token):
            raise exceptions.AuthenticationFailed("Invalid token.")
        token = token.decode()
        for auth_token in tokens_with_users(token[: CONSTANTS.TOKEN_KEY_LENGTH]):
            if self._cleanup_token(auth_token):
                continue
            try:
                digest = hash_token(token)
            except (TypeError, binascii.Error):
                raise exceptions.AuthenticationFailed("Invalid token.") from None
            if compare_digest(digest, auth_token.digest):
                if knox_settings.AUTO_REFRESH and auth_token.expiry:
                    self.renew_token(auth_token)
                return self.validate_user(auth_token)
        raise exceptions.AuthenticationFailed("Invalid token.")

    def _cleanup_token(self, auth_token) -> bool:
        # knox also sweeps every other token of the user here, a query per request; they are swept
        # at login instead (accounts.services.token_issue).
        if auth_token.expiry is not None and auth_token.expiry < timezone.now():
            auth_token.delete()
            return True
        return False


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
        f"WHERE t.{quote(token_model._meta.get_field('token_key').column)} = %s"
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


def tokens_with_users(token_key: str) -> list:
    """The tokens whose key is `token_key`, each with its user loaded: what knox reads with
    `filter(token_key=...).select_related("user")`, in one hand-written statement (on the default
    database, the only relational one; knox's manager filters nothing)."""
    token_model, user_model = get_token_model(), get_user_model()
    with connection.cursor() as cursor:
        cursor.execute(_tokens_with_users_sql(connection.vendor, token_model, user_model), [token_key])
        rows = cursor.fetchall()
    split = len(token_model._meta.concrete_fields)
    tokens = []
    for row in rows:
        auth_token = _from_row(token_model, row[:split])
        auth_token.user = _from_row(user_model, row[split:])
        tokens.append(auth_token)
    return tokens


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
