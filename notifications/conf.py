"""Configuration of push notifications, gathered from settings and checked as a whole.

Every value is a Django setting read from its environment variable in chatproject/settings.py
(docs/configuration.md lists them all); `load()` reads them at call time, so tests that override
settings see their values. The backend itself is `settings.CHAT_PUSH_BACKEND` (SPEC section 3).
"""
from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

BACKENDS = ("log", "webhook", "webpush")


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
    # Hard deadline of one attempt, all of it: DNS, connect, TLS, request and response.
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
    # Host suffixes Web Push endpoints must match (`*.notify.windows.com`); empty: any public host.
    push_allowed_hosts: tuple[str, ...]
    # Attempts in flight at once per worker, and at most this many to one host.
    concurrency: int
    per_host_concurrency: int
    # After this many consecutive failed attempts at one host, its deliveries wait
    # breaker_cooldown seconds (not counted as attempts) before the host is tried again.
    breaker_threshold: int
    breaker_cooldown: float


def load() -> NotificationConfig:
    """The current configuration, validated; raises ImproperlyConfigured on a bad value."""
    config = NotificationConfig(
        backend=settings.CHAT_PUSH_BACKEND,
        max_attempts=settings.CHAT_NOTIFICATION_MAX_ATTEMPTS,
        backoff_base=settings.CHAT_NOTIFICATION_BACKOFF_BASE,
        backoff_max=settings.CHAT_NOTIFICATION_BACKOFF_MAX,
        backoff_jitter=settings.CHAT_NOTIFICATION_BACKOFF_JITTER,
        timeout=settings.CHAT_NOTIFICATION_TIMEOUT,
        lease_seconds=settings.CHAT_NOTIFICATION_LEASE_SECONDS,
        batch_size=settings.CHAT_NOTIFICATION_BATCH_SIZE,
        poll_interval=settings.CHAT_NOTIFICATION_POLL_INTERVAL,
        retention_days=settings.CHAT_NOTIFICATION_RETENTION_DAYS,
        max_devices_per_user=settings.CHAT_MAX_DEVICES_PER_USER,
        webhook_url=settings.CHAT_WEBHOOK_URL,
        webhook_secret=settings.CHAT_WEBHOOK_SECRET,
        vapid_private_key=settings.CHAT_VAPID_PRIVATE_KEY,
        vapid_subject=settings.CHAT_VAPID_SUBJECT,
        webpush_ttl=settings.CHAT_WEBPUSH_TTL,
        webpush_allow_http=settings.CHAT_WEBPUSH_ALLOW_HTTP,
        push_allowed_hosts=tuple(host.strip().lower() for host in settings.CHAT_PUSH_ALLOWED_HOSTS if host.strip()),
        concurrency=settings.CHAT_NOTIFICATION_CONCURRENCY,
        per_host_concurrency=settings.CHAT_NOTIFICATION_PER_HOST_CONCURRENCY,
        breaker_threshold=settings.CHAT_NOTIFICATION_BREAKER_THRESHOLD,
        breaker_cooldown=settings.CHAT_NOTIFICATION_BREAKER_COOLDOWN,
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
    if config.concurrency < 1 or config.per_host_concurrency < 1 or config.breaker_threshold < 1:
        raise ImproperlyConfigured(
            "CHAT_NOTIFICATION_CONCURRENCY, CHAT_NOTIFICATION_PER_HOST_CONCURRENCY and "
            "CHAT_NOTIFICATION_BREAKER_THRESHOLD must be at least 1"
        )
    if config.breaker_cooldown <= 0:
        raise ImproperlyConfigured("CHAT_NOTIFICATION_BREAKER_COOLDOWN must be positive")
    # A worker starts a delivery only while its lease outlives the delivery's timeout; a lease
    # shorter than that would have it release every job it claims.
    if config.lease_seconds <= config.timeout + 1:
        raise ImproperlyConfigured("CHAT_NOTIFICATION_LEASE_SECONDS must exceed CHAT_NOTIFICATION_TIMEOUT + 1")
