"""Push backends: where a worker hands a notification for one device.

`CHAT_PUSH_BACKEND` picks one: `log` (default; development), `webhook` (an HTTP POST with a
signed body to a gateway of yours, e.g. one relaying to FCM/APNs), `webpush` (straight to the
browsers' push services, encrypted and VAPID-signed).
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar

from django.core.exceptions import ImproperlyConfigured

from notifications.conf import NotificationConfig
from notifications.models import Delivery, Device


class DeliveryError(Exception):
    """The attempt failed; the job is retried with backoff, then dead-lettered."""


class DeviceGone(DeliveryError):
    """The push service says the subscription no longer exists: retrying cannot succeed."""


class DestinationRefused(DeliveryError):
    """The attempt was not made: the destination failed the outbound rules right before it
    (notifications/outbound.py). Nothing was sent, so it says nothing about the host's health."""


class PushBackend(abc.ABC):
    name: ClassVar[str]
    # The device kinds this backend can reach; devices of other kinds get no delivery.
    device_kinds: ClassVar[frozenset[str]] = frozenset(Device.Kind.values)

    def host_of(self, delivery: Delivery) -> str | None:
        """The host an attempt for `delivery` talks to, for the worker's per-host concurrency
        limit and circuit breaker; None when there is no remote host."""
        return None

    @abc.abstractmethod
    def send(self, delivery: Delivery, payload: dict[str, Any]) -> None:
        """Hand one notification to `delivery.device`; raise DeliveryError when it was not accepted."""


def get_backend(config: NotificationConfig) -> PushBackend:
    """The configured backend; raises ImproperlyConfigured when its settings are missing."""
    if config.backend == "webhook":
        from notifications.backends.webhook import WebhookBackend

        return WebhookBackend(config)
    if config.backend == "webpush":
        from notifications.backends.webpush import WebPushBackend

        return WebPushBackend(config)
    if config.backend == "log":
        from notifications.backends.log import LogBackend

        return LogBackend()
    raise ImproperlyConfigured(f"Unknown push backend {config.backend!r}")
