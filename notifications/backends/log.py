from __future__ import annotations

import logging
from typing import Any

from notifications.backends import PushBackend
from notifications.models import Delivery

logger = logging.getLogger("notifications.push")


class LogBackend(PushBackend):
    """Writes one log line per notification; for development, where no push service exists.

    The body (an excerpt of the message) is left out: logs are kept and shipped more widely than
    the messages themselves."""

    name = "log"

    def send(self, delivery: Delivery, payload: dict[str, Any]) -> None:
        logger.info(
            "push delivery=%s device=%s kind=%s user=%s conversation=%s seq=%s",
            delivery.pk,
            delivery.device_id,
            delivery.device.kind,
            delivery.user_id,
            payload["conversation_id"],
            payload["seq"],
        )
