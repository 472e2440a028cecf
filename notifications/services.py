"""Writes of the notifications domain: the outbox on send, devices, operator re-queues."""
from __future__ import annotations

import base64
import binascii
import uuid

from cryptography.hazmat.primitives.asymmetric import ec
from django.db import IntegrityError, transaction
from django.db.models import QuerySet

from accounts.models import User
from chat import sql
from core.errors import NotFound, ValidationFailed
from chat.store import Message
from notifications import conf, metrics, outbound, queue
from notifications.backends.webpush import endpoint_policy
from notifications.models import Delivery, Device, OutboxEntry


def notification_enqueue(*, messages: list[Message]) -> None:
    """Record that `messages` need push notifications. One insert; no network call, no read:
    recipients and devices are worked out by the worker (notifications/worker.py). Every send
    runs it, inside its hold of the database's writer, so it skips the ORM's compiler and model
    instances (chat.sql.insert_rows)."""
    sql.insert_rows(OutboxEntry, [
        {
            "message_id": message.message_id,
            "conversation_id": message.conversation_id,
            "seq": message.seq,
            "sender_id": message.sender_id,
        }
        for message in messages
    ])


def enqueue_on_messages_persisted(sender, messages: list[Message], **kwargs) -> None:
    """chat.signals.messages_persisted: inside the sends' transaction."""
    notification_enqueue(messages=messages)


def _b64url_bytes(value: str) -> bytes | None:
    # Browsers hand keys out as unpadded base64url; accept standard base64 and padding too.
    text = value.strip().replace("+", "-").replace("/", "_").rstrip("=")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def check_device_address(*, kind: str, endpoint: str, p256dh: str, auth: str, token: str) -> None:
    """Validate what a device is reached by; raise ValidationFailed with field errors."""
    errors: dict[str, list[str]] = {}
    if kind == Device.Kind.WEBPUSH:
        config = conf.load()
        try:
            # The same rules as before every attempt (SPEC section 7); the worker checks again,
            # since what a name resolves to can change after registration.
            outbound.check_url(endpoint, policy=endpoint_policy(config), timeout=config.timeout)
        except outbound.UnsafeDestination as exc:
            errors["endpoint"] = [f"Not a usable push endpoint: {exc}"]
        except outbound.Unresolvable:
            # One message for both: what an internal name resolves to is none of the caller's business.
            errors["endpoint"] = ["Not a usable push endpoint: Must be a public address (not private, loopback, link-local or reserved)."]
        public_key = _b64url_bytes(p256dh)
        try:
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key or b"")
        except ValueError:
            errors["keys.p256dh"] = ["Must be the subscription's P-256 public key, base64url-encoded."]
        if len(_b64url_bytes(auth) or b"") != 16:
            errors["keys.auth"] = ["Must be the subscription's 16-byte auth secret, base64url-encoded."]
        if token:
            errors["token"] = ["Web Push devices have no token."]
    else:
        if not token:
            errors["token"] = [f"Required for {kind} devices."]
        if endpoint or p256dh or auth:
            errors["endpoint"] = [f"{kind} devices are reached by token; endpoint and keys are for webpush."]
    if errors:
        raise ValidationFailed(errors)


def device_register(
    *, user: User, kind: str, name: str = "", endpoint: str = "", p256dh: str = "", auth: str = "", token: str = ""
) -> tuple[Device, bool]:
    """Register a device for `user`; (device, created).

    The same subscription or token registered again by its owner is updated (the browser rotated
    its keys, the device was renamed). Registered by anyone else it is refused: an endpoint or a
    token can leak (logs, a shared screenshot, another app), and taking it over would redirect the
    owner's notifications, and their excerpts, to the taker. Neither a Web Push subscription nor
    an FCM/APNs token can prove possession here, so the owner frees it: signing out on a shared
    browser deletes the device (DELETE push/devices/{id}/), and so does an expired subscription.
    The refusal does not say whose it is."""
    check_device_address(kind=kind, endpoint=endpoint, p256dh=p256dh, auth=auth, token=token)
    address = {"kind": kind, "endpoint": endpoint, "token": token}
    fields = {"name": name, "p256dh": p256dh.strip(), "auth": auth.strip()}
    limit = conf.load().max_devices_per_user
    if Device.objects.filter(user=user).exclude(**address).count() >= limit:
        raise ValidationFailed({"non_field_errors": [f"At most {limit} devices per user; delete one first."]})
    for _ in range(2):
        existing = Device.objects.filter(**address).first()
        if existing is not None:
            if existing.user_id != user.pk:
                field = "endpoint" if kind == Device.Kind.WEBPUSH else "token"
                raise ValidationFailed(
                    {field: ["Already registered to another account; it must be unregistered there first."]}
                )
            for key, value in fields.items():
                setattr(existing, key, value)
            existing.save()
            return existing, False
        try:
            with transaction.atomic():
                return Device.objects.create(user=user, **address, **fields), True
        except IntegrityError:
            # Registered by a concurrent request a moment ago: update that one instead.
            continue
    raise ValidationFailed({"non_field_errors": ["This device is being registered concurrently; retry."]})


def device_delete(*, user: User, device_id: uuid.UUID) -> None:
    """Delete one of the caller's devices; someone else's is reported as not found."""
    deleted, _ = Device.objects.filter(pk=device_id, user=user).delete()
    if not deleted:
        raise NotFound("No such device.")


def notification_requeue(*, queryset: QuerySet[OutboxEntry] | QuerySet[Delivery]) -> int:
    """Re-queue dead (or waiting) jobs with fresh attempts; the number re-queued. Jobs being
    delivered right now are left to their worker."""
    name = "outbox" if queryset.model is OutboxEntry else "delivery"
    count = queue.requeue(queryset)
    metrics.requeued.labels(queue=name).inc(count)
    return count

