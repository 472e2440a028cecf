from __future__ import annotations

import base64
import json
from typing import Any

import requests
from cryptography.hazmat.primitives import serialization
from django.core.exceptions import ImproperlyConfigured
from py_vapid import Vapid02
from pywebpush import WebPushException, webpush

from notifications.backends import DeliveryError, DeviceGone, PushBackend
from notifications.conf import NotificationConfig
from notifications.models import Delivery, Device


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


class WebPushBackend(PushBackend):
    """Web Push (RFC 8030) to browser subscriptions: the payload encrypted for the subscriber
    (RFC 8291, aes128gcm) and the request signed with the server's VAPID key (RFC 8292)."""

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
        self.session = requests.Session()

    def send(self, delivery: Delivery, payload: dict[str, Any]) -> None:
        device = delivery.device
        subscription = {"endpoint": device.endpoint, "keys": {"p256dh": device.p256dh, "auth": device.auth}}
        try:
            webpush(
                subscription_info=subscription,
                data=json.dumps(payload, separators=(",", ":"), ensure_ascii=False),
                vapid_private_key=self.vapid,
                # A fresh dict per call: webpush() writes the audience (the endpoint's origin)
                # into it, which differs from one push service to the next.
                vapid_claims={"sub": self.subject},
                content_encoding="aes128gcm",
                ttl=self.ttl,
                timeout=self.timeout,
                requests_session=self.session,
            )
        except WebPushException as exc:
            status = exc.status_code
            if status in (404, 410):
                raise DeviceGone(f"push service answered HTTP {status}: subscription expired") from exc
            raise DeliveryError(f"push service refused: {exc.message[:300]}") from exc
        except requests.RequestException as exc:
            raise DeliveryError(f"push service unreachable: {exc}") from exc
