from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone
from knox.models import AuthToken

from accounts.models import User, WebSocketTicket
from accounts.signals import credentials_revoked
from accounts.usernames import INVALID_MESSAGE, is_valid_username, normalize_username
from core.errors import ValidationFailed

DUPLICATE_USERNAME = "A user with that username already exists."


def user_register(*, username: str, password: str) -> User:
    """`username` NFKC-normalized and checked here as well as in the serializer: the rule lives on
    the write path. Unique case-insensitively by a database constraint."""
    username = normalize_username(username)
    if not is_valid_username(username):
        raise ValidationFailed({"username": [INVALID_MESSAGE]})
    user = User(username=username)
    try:
        validate_password(password, user=user)
    except DjangoValidationError as exc:
        raise ValidationFailed({"password": list(exc.messages)}) from exc
    user.set_password(password)
    try:
        with transaction.atomic():
            user.save()
    except IntegrityError as exc:
        raise ValidationFailed({"username": [DUPLICATE_USERNAME]}) from exc
    return user


def user_deactivate(*, user: User) -> None:
    """Deactivate an account: its tokens and tickets are deleted (re-activation does not revive
    them), its session stops working, and every socket it has open, on any conversation, closes
    (4403)."""
    with transaction.atomic():
        User.objects.filter(pk=user.pk).update(is_active=False)
        user.is_active = False
        credentials_revoke_all(user=user)


def credentials_revoke_all(*, user: User) -> None:
    """Every token of every device and every unused WebSocket ticket of `user` stops working, and
    every socket the account has open closes (credentials_revoked)."""
    AuthToken.objects.filter(user=user).delete()
    WebSocketTicket.objects.filter(user=user).delete()
    credentials_revoked.send(sender=User, user_id=user.pk)


def token_issue(*, user: User) -> tuple[AuthToken, str]:
    """A new token for one device (the key is returned once; only its hash is stored). Sweeps the
    user's expired tokens, and past CHAT_MAX_TOKENS_PER_USER revokes the oldest."""
    AuthToken.objects.filter(user=user, expiry__lt=timezone.now()).delete()
    token, key = AuthToken.objects.create(user=user)
    keep = AuthToken.objects.filter(user=user).order_by("-created").values_list("pk", flat=True)
    AuthToken.objects.filter(user=user).exclude(pk__in=list(keep[: settings.CHAT_MAX_TOKENS_PER_USER])).delete()
    return token, key


def token_revoke(*, token: AuthToken) -> None:
    AuthToken.objects.filter(pk=token.pk).delete()


def password_change(*, user: User, new_password: str) -> tuple[AuthToken, str]:
    """Set a new password (Django's validators) and revoke every token and ticket of the user; the
    caller gets a fresh token. The old password is checked by the caller (through the throttled
    backend). Sessions die by themselves: Django ties them to the password hash."""
    try:
        validate_password(new_password, user=user)
    except DjangoValidationError as exc:
        raise ValidationFailed({"new_password": list(exc.messages)}) from exc
    with transaction.atomic():
        user.set_password(new_password)
        user.save(update_fields=["password"])
        credentials_revoke_all(user=user)
        return token_issue(user=user)


def _ticket_hash(ticket: str) -> str:
    return hashlib.sha256(ticket.encode()).hexdigest()


def ws_ticket_issue(*, user: User) -> str:
    ticket = secrets.token_urlsafe(32)
    WebSocketTicket.objects.create(
        key_hash=_ticket_hash(ticket),
        user=user,
        expires_at=timezone.now() + timedelta(seconds=settings.CHAT_WS_TICKET_TTL),
    )
    # Expired tickets are swept here rather than by a cron: issuing is rare and cheap.
    WebSocketTicket.objects.filter(expires_at__lt=timezone.now()).delete()
    return ticket


def ws_ticket_redeem(*, ticket: str) -> User | None:
    """Return the ticket's user and burn the ticket; None if unknown, expired or already used."""
    key_hash = _ticket_hash(ticket)
    row = WebSocketTicket.objects.select_related("user").filter(key_hash=key_hash).first()
    if row is None:
        return None
    # The delete is the claim: of two concurrent redeems only one deletes the row.
    deleted, _ = WebSocketTicket.objects.filter(key_hash=key_hash).delete()
    if not deleted or row.expires_at <= timezone.now() or not row.user.is_active:
        return None
    return row.user
