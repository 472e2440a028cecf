from __future__ import annotations

import base64
import json
import time
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from django.core.exceptions import ImproperlyConfigured
from py_vapid import Vapid02

from notifications import outbound
from notifications.backends import DeliveryError, DestinationRefused, DeviceGone, PushBackend
from notifications.conf import NotificationConfig
from notifications.models import Delivery, Device

VAPID_TOKEN_LIFETIME = 12 * 3600


def load_vapid_key(private_key: str) -> Vapid02:
    """CHAT_VAPID_PRIVATE_KEY as PEM, or base64url of the raw 32-byte key or of its DER."""
    try:
        if "-----BEGIN" in private_key:
            return Vapid02.from_pem(private_key.encode())
        return Vapid02.from_string(private_key)
    except Exception as exc:
        raise ImproperlyConfigured(f"CHAT_VAPID_PRIVATE_KEY is not a usable P-256 private key: {exc}") from exc


def vapid_public_key(private_key: str) -> str:
    """The application server key a browser subscribes with: base64url of the uncompressed point."""
    point = load_vapid_key(private_key).public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return base64.urlsafe_b64encode(point).rstrip(b"=").decode()


def endpoint_policy(config: NotificationConfig) -> outbound.Policy:
    """What a Web Push endpoint must be (SPEC section 7): https on 443 of a public address,
    narrowed to CHAT_PUSH_ALLOWED_HOSTS when set. CHAT_WEBPUSH_ALLOW_HTTP (development only)
    also admits plain http, any port and loopback addresses: never private networks or
    link-local ones."""
    hosts = tuple(host for host in config.push_allowed_hosts if host)
    if config.webpush_allow_http:
        return outbound.Policy(schemes=("https", "http"), ports=None, allow_loopback=True, allowed_hosts=hosts)
    return outbound.Policy(allowed_hosts=hosts)


class WebPushBackend(PushBackend):
    """Web Push (RFC 8030) to browser subscriptions: the payload encrypted for the subscriber
    (RFC 8291, aes128gcm) and the request signed with the server's VAPID key (RFC 8292).

    pywebpush only encrypts; the request itself goes through notifications.outbound: the
    endpoint checked again right before the attempt, the connection pinned to the checked
    address, no redirects, one deadline for the whole attempt, the response body never read."""

    name = "webpush"
    device_kinds = frozenset({Device.Kind.WEBPUSH})

    def __init__(self, config: NotificationConfig) -> None:
        if not config.vapid_private_key:
            raise ImproperlyConfigured("The webpush backend needs CHAT_VAPID_PRIVATE_KEY")
        if not config.vapid_subject.startswith(("mailto:", "https://")):
            raise ImproperlyConfigured(
                "The webpush backend needs CHAT_VAPID_SUBJECT: a mailto: or https: contact for push services"
            )
        self.vapid = load_vapid_key(config.vapid_private_key)
        self.subject = config.vapid_subject
        self.ttl = config.webpush_ttl
        self.timeout = config.timeout
        self.policy = endpoint_policy(config)

    def host_of(self, delivery: Delivery) -> str | None:
        return (urlsplit(delivery.device.endpoint).hostname or "").lower() or None

    def send(self, delivery: Delivery, payload: dict[str, Any]) -> None:
        deadline = time.monotonic() + self.timeout
        device = delivery.device
        try:
            target = outbound.check_url(device.endpoint, policy=self.policy, timeout=self.timeout)
        except outbound.UnsafeDestination as exc:
            raise DestinationRefused(f"endpoint refused: {exc}") from None
        except outbound.Unresolvable as exc:
            raise DeliveryError(f"push service unreachable: {exc}") from None
        # Imported here, by the notification worker: pywebpush brings aiohttp, a quarter of a second
        # of every web worker's start (a restart's clients wait for it) for nothing it uses.
        from pywebpush import WebPusher

        subscription = {"endpoint": device.endpoint, "keys": {"p256dh": device.p256dh, "auth": device.auth}}
        body = WebPusher(subscription).encode(
            json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode(), "aes128gcm"
        )["body"]
        # The audience is the endpoint's origin, which differs from one push service to the next.
        claims = {"sub": self.subject, "aud": target.origin, "exp": int(time.time()) + VAPID_TOKEN_LIFETIME}
        headers = {
            **self.vapid.sign(claims),
            "Content-Type": "application/octet-stream",
            "Content-Encoding": "aes128gcm",
            "TTL": str(self.ttl),
        }
        try:
            status = outbound.post(target, body=body, headers=headers, deadline=deadline)
        except outbound.REQUEST_ERRORS as exc:
            raise DeliveryError(f"push service unreachable: {outbound.describe(exc)}") from None
        if 200 <= status < 300:
            return
        # Per RFC 8030 the subscription is gone. Only the push service the endpoint names, checked
        # just now, can say so: the answer cannot come from an internal host.
        if status in (404, 410):
            raise DeviceGone(f"push service answered HTTP {status}: subscription expired")
        if 300 <= status < 400:
            raise DeliveryError(f"push service answered HTTP {status}; redirects are not followed")
        raise DeliveryError(f"push service answered HTTP {status}")
