from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import requests
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from notifications.backends import DeliveryError, PushBackend
from notifications.conf import NotificationConfig
from notifications.models import Delivery, Device

SIGNATURE_HEADER = "X-Chat-Signature"
DELIVERY_HEADER = "X-Chat-Delivery"


def sign(body: bytes, secret: str) -> str:
    """The X-Chat-Signature value: `sha256=` and the hex HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def device_address(device: Device) -> dict[str, Any]:
    address: dict[str, Any] = {"id": str(device.id), "kind": device.kind}
    if device.kind == Device.Kind.WEBPUSH:
        address.update(endpoint=device.endpoint, keys={"p256dh": device.p256dh, "auth": device.auth})
    else:
        address["token"] = device.token
    return address


class WebhookBackend(PushBackend):
    """POSTs each notification as JSON to CHAT_WEBHOOK_URL, signed with CHAT_WEBHOOK_SECRET.

    Any 2xx accepts it. Delivery is at least once: a receiver that answered too late is sent the
    same notification again, with the same X-Chat-Delivery id, so it can drop the duplicate. The
    body carries `sent_at` under the signature, so a receiver can also refuse stale replays."""

    name = "webhook"

    def __init__(self, config: NotificationConfig) -> None:
        if not config.webhook_url.startswith(("https://", "http://")):
            raise ImproperlyConfigured("The webhook backend needs CHAT_WEBHOOK_URL (an http or https URL)")
        if not config.webhook_secret:
            raise ImproperlyConfigured("The webhook backend needs CHAT_WEBHOOK_SECRET to sign its requests")
        self.url = config.webhook_url
        self.secret = config.webhook_secret
        self.timeout = config.timeout
        # One session per worker: keep-alive to the gateway instead of a handshake per notification.
        self.session = requests.Session()

    def send(self, delivery: Delivery, payload: dict[str, Any]) -> None:
        body = json.dumps(
            {
                "delivery_id": str(delivery.pk),
                "attempt": delivery.attempts,
                "sent_at": timezone.now().isoformat().replace("+00:00", "Z"),
                "recipient_id": str(delivery.user_id),
                "device": device_address(delivery.device),
                "notification": payload,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(body, self.secret),
            DELIVERY_HEADER: str(delivery.pk),
        }
        try:
            # No redirects: following one would turn the POST into a GET, or send the signed body
            # somewhere the operator did not configure.
            response = self.session.post(
                self.url, data=body, headers=headers, timeout=self.timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            raise DeliveryError(f"webhook unreachable: {exc}") from exc
        if not 200 <= response.status_code < 300:
            raise DeliveryError(f"webhook answered HTTP {response.status_code}: {response.text[:200]}")
