from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest
from django.utils import timezone
from prometheus_client import REGISTRY

from accounts.models import User
from notifications import conf
from notifications.backends import get_backend
from notifications.models import Delivery, Device, Job, OutboxEntry
from notifications.worker import Worker
from tests.notifications.receiver import Receiver

WEBHOOK_SECRET = "test-webhook-secret"
_tokens = itertools.count(1)


@pytest.fixture(autouse=True)
def notification_env(settings) -> None:
    """Known notification settings whatever the environment says: the defaults, timeouts short for tests."""
    for name, default in settings.ENVIRONMENT_VARIABLES.items():
        if name.startswith(("CHAT_NOTIFICATION_", "CHAT_WEBHOOK_", "CHAT_VAPID_", "CHAT_WEBPUSH_", "CHAT_MAX_DEVICES")):
            setattr(settings, name, default)
    settings.CHAT_NOTIFICATION_TIMEOUT = 2.0
    settings.CHAT_NOTIFICATION_LEASE_SECONDS = 30.0
    settings.CHAT_PUSH_BACKEND = "log"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


@pytest.fixture
def webhook(settings, receiver) -> Receiver:
    """The webhook backend, pointed at a live local receiver."""
    settings.CHAT_PUSH_BACKEND = "webhook"
    settings.CHAT_WEBHOOK_URL = receiver.url + "/hook"
    settings.CHAT_WEBHOOK_SECRET = WEBHOOK_SECRET
    return receiver


@pytest.fixture
def make_worker() -> Callable[..., Worker]:
    def make(worker_id: str = "worker-a") -> Worker:
        config = conf.load()
        return Worker(config=config, backend=get_backend(config), worker_id=worker_id)

    return make


@pytest.fixture
def make_device(db) -> Callable[..., Device]:
    def make(user: User, kind: str = Device.Kind.FCM, **fields: str) -> Device:
        if kind != Device.Kind.WEBPUSH:
            fields.setdefault("token", f"token-{next(_tokens)}")
        return Device.objects.create(user=user, kind=kind, **fields)

    return make


def make_due() -> None:
    """Every waiting retry becomes due now, as if its backoff had passed."""
    now = timezone.now()
    for model in (OutboxEntry, Delivery):
        model.objects.filter(status=Job.Status.PENDING).update(next_attempt_at=now)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0
