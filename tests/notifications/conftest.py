from __future__ import annotations

import ipaddress
import itertools
import socket
from collections.abc import Callable, Iterator

import pytest
from django.utils import timezone
from prometheus_client import REGISTRY

from accounts.models import User
from notifications import conf, outbound
from notifications.backends import get_backend
from notifications.models import Delivery, Device, Job, OutboxEntry
from notifications.worker import Worker
from tests.notifications.receiver import Receiver

WEBHOOK_SECRET = "test-webhook-secret"
# A public address (example.com's) that names resolve to in tests. It passes the outbound rules
# but is never connected to: `fake_dns` refuses any connection outside loopback.
PUBLIC_IP = "93.184.215.14"
_tokens = itertools.count(1)


@pytest.fixture(autouse=True)
def notification_env(settings) -> None:
    """Known notification settings whatever the environment says: the defaults, timeouts short for tests."""
    for name, default in settings.ENVIRONMENT_VARIABLES.items():
        if name.startswith(("CHAT_NOTIFICATION_", "CHAT_WEBHOOK_", "CHAT_VAPID_", "CHAT_WEBPUSH_", "CHAT_MAX_DEVICES", "CHAT_PUSH_ALLOWED")):
            setattr(settings, name, default)
    settings.CHAT_NOTIFICATION_TIMEOUT = 2.0
    settings.CHAT_NOTIFICATION_LEASE_SECONDS = 30.0
    settings.CHAT_PUSH_BACKEND = "log"


class FakeDNS:
    """The resolver of notifications.outbound in tests: a table, no network. Unknown names fail
    like a name that does not exist; `*.example.net` resolves to PUBLIC_IP."""

    def __init__(self) -> None:
        self.names: dict[str, list[str] | Callable[[], list[str]]] = {}
        self.lookups: list[str] = []
        # Every (address, port) the outbound module connected to.
        self.connections: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        answer = self.names.get(host)
        if answer is None and host.endswith(".example.net"):
            answer = [PUBLIC_IP]
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(answer() if callable(answer) else answer)


@pytest.fixture(autouse=True)
def fake_dns(monkeypatch) -> FakeDNS:
    """No test asks a real DNS server, and no test connects outside loopback (the network rule):
    the outbound module's connections are checked before they are made."""
    dns = FakeDNS()
    monkeypatch.setattr(outbound, "resolve", dns)
    real_connect = socket.create_connection

    def loopback_only(address, *args, **kwargs):
        host = address[0]
        if not ipaddress.ip_address(host).is_loopback:
            raise AssertionError(f"a test tried to connect to {host}")
        dns.connections.append((host, address[1]))
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(outbound.socket, "create_connection", loopback_only)
    return dns


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
