"""Configuration of push notifications: environment variables with documented defaults.

Read at call time rather than at import, so the worker, the web process and tests each see the
environment they run with. The backend itself is `settings.CHAT_PUSH_BACKEND` (SPEC section 3);
everything else specific to notifications lives here (docs/notifications.md lists it all).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

BACKENDS = ("log", "webhook", "webpush")


def _env_str(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, not {value!r}") from None


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    try:
        return float(value) if value else default
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, not {value!r}") from None


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return value in {"1", "true", "yes", "on"} if value else default


@dataclass(frozen=True)
class NotificationConfig:
    backend: str
    # Attempts per job, counted when a worker claims it; the last failure dead-letters the job.
    max_attempts: int
    # Retry n waits backoff_base * 2**(n-1) seconds, capped at backoff_max, times a random
    # factor in [1 - backoff_jitter, 1] so a receiver's outage does not end in a thundering herd.
    backoff_base: float
    backoff_max: float
    backoff_jitter: float
    # Bound on each connect and read of one delivery's HTTP request.
    timeout: float
    # How long a claim is held; a crashed worker's jobs are taken over once it has passed.
    lease_seconds: float
    batch_size: int
    poll_interval: float
    # Sent and skipped deliveries older than this are deleted by the worker; 0 keeps them forever.
    retention_days: int
    max_devices_per_user: int
    webhook_url: str
    webhook_secret: str
    vapid_private_key: str
    vapid_subject: str
    webpush_ttl: int
    # Web Push endpoints must be https (browsers only hand out https ones); plain http is for
    # local development and tests against a loopback push service.
    webpush_allow_http: bool


def load() -> NotificationConfig:
    """The current configuration, validated; raises ImproperlyConfigured on a bad value."""
    config = NotificationConfig(
        backend=settings.CHAT_PUSH_BACKEND,
        max_attempts=_env_int("CHAT_NOTIFICATION_MAX_ATTEMPTS", 10),
        backoff_base=_env_float("CHAT_NOTIFICATION_BACKOFF_BASE", 5.0),
        backoff_max=_env_float("CHAT_NOTIFICATION_BACKOFF_MAX", 3600.0),
        backoff_jitter=_env_float("CHAT_NOTIFICATION_BACKOFF_JITTER", 0.5),
        timeout=_env_float("CHAT_NOTIFICATION_TIMEOUT", 5.0),
        lease_seconds=_env_float("CHAT_NOTIFICATION_LEASE_SECONDS", 60.0),
        batch_size=_env_int("CHAT_NOTIFICATION_BATCH_SIZE", 20),
        poll_interval=_env_float("CHAT_NOTIFICATION_POLL_INTERVAL", 1.0),
        retention_days=_env_int("CHAT_NOTIFICATION_RETENTION_DAYS", 7),
        max_devices_per_user=_env_int("CHAT_MAX_DEVICES_PER_USER", 20),
        webhook_url=_env_str("CHAT_WEBHOOK_URL", ""),
        webhook_secret=_env_str("CHAT_WEBHOOK_SECRET", ""),
        vapid_private_key=_env_str("CHAT_VAPID_PRIVATE_KEY", ""),
        vapid_subject=_env_str("CHAT_VAPID_SUBJECT", ""),
        webpush_ttl=_env_int("CHAT_WEBPUSH_TTL", 86400),
        webpush_allow_http=_env_bool("CHAT_WEBPUSH_ALLOW_HTTP", False),
    )
    _validate(config)
    return config


def _validate(config: NotificationConfig) -> None:
    if config.backend not in BACKENDS:
        raise ImproperlyConfigured(f"CHAT_PUSH_BACKEND must be one of {', '.join(BACKENDS)}, not {config.backend!r}")
    if config.max_attempts < 1:
        raise ImproperlyConfigured("CHAT_NOTIFICATION_MAX_ATTEMPTS must be at least 1")
    if config.backoff_base <= 0 or config.backoff_max < config.backoff_base:
        raise ImproperlyConfigured("Need 0 < CHAT_NOTIFICATION_BACKOFF_BASE <= CHAT_NOTIFICATION_BACKOFF_MAX")
    if not 0 <= config.backoff_jitter < 1:
        raise ImproperlyConfigured("CHAT_NOTIFICATION_BACKOFF_JITTER must be in [0, 1)")
    if config.timeout <= 0 or config.batch_size < 1 or config.poll_interval <= 0:
        raise ImproperlyConfigured(
            "CHAT_NOTIFICATION_TIMEOUT and CHAT_NOTIFICATION_POLL_INTERVAL must be positive, "
            "CHAT_NOTIFICATION_BATCH_SIZE at least 1"
        )
    # A worker starts a delivery only while its lease outlives the delivery's timeout; a lease
    # shorter than that would have it release every job it claims.
    if config.lease_seconds <= config.timeout + 1:
        raise ImproperlyConfigured("CHAT_NOTIFICATION_LEASE_SECONDS must exceed CHAT_NOTIFICATION_TIMEOUT + 1")
