from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from notifications import outbound
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
    body carries `sent_at` under the signature, so a receiver can also refuse stale replays.

    The URL is the operator's, so it may be internal or plain http (outbound.WEBHOOK_POLICY), but
    the request is the same as for Web Push: no redirects (following one would turn the POST into
    a GET, or send the signed body somewhere the operator did not configure), one deadline for the
    whole attempt, and only the status code kept: the response body is never read."""

    name = "webhook"

    def __init__(self, config: NotificationConfig) -> None:
        if not config.webhook_url.startswith(("https://", "http://")):
            raise ImproperlyConfigured("The webhook backend needs CHAT_WEBHOOK_URL (an http or https URL)")
        if not config.webhook_secret:
            raise ImproperlyConfigured("The webhook backend needs CHAT_WEBHOOK_SECRET to sign its requests")
        self.url = config.webhook_url
        self.secret = config.webhook_secret
        self.timeout = config.timeout
        try:
            outbound.check_url(self.url, policy=outbound.WEBHOOK_POLICY, resolver=lambda host, port: ["0.0.0.0"])
        except outbound.UnsafeDestination as exc:
            raise ImproperlyConfigured(f"CHAT_WEBHOOK_URL is not usable: {exc}") from None
        self._host = (urlsplit(self.url).hostname or "").lower()

    def host_of(self, delivery: Delivery) -> str | None:
        return self._host

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
        deadline = time.monotonic() + self.timeout
        try:
            target = outbound.check_url(self.url, policy=outbound.WEBHOOK_POLICY, timeout=self.timeout)
            status = outbound.post(target, body=body, headers=headers, deadline=deadline)
        except outbound.Unresolvable as exc:
            raise DeliveryError(f"webhook unreachable: {exc}") from None
        except outbound.REQUEST_ERRORS as exc:
            raise DeliveryError(f"webhook unreachable: {outbound.describe(exc)}") from None
        if 300 <= status < 400:
            raise DeliveryError(f"webhook answered HTTP {status}; redirects are not followed")
        if not 200 <= status < 300:
            raise DeliveryError(f"webhook answered HTTP {status}")
