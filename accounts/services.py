from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.models import User, WebSocketTicket
from accounts.signals import user_deactivated
from core.errors import ValidationFailed


def user_register(*, username: str, password: str) -> User:
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
        raise ValidationFailed({"username": ["A user with that username already exists."]}) from exc
    return user


def user_deactivate(*, user: User) -> None:
    """Deactivate an account: its tokens, session and tickets stop working, and every socket it has
    open, on any conversation, closes (4403)."""
    User.objects.filter(pk=user.pk).update(is_active=False)
    user.is_active = False
    user_deactivated.send(sender=User, user_id=user.pk)


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
