import functools
import itertools
import os
import sys
import threading
import time
import uuid

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from accounts.models import User
from chat.services import conversations
from tests.services import S3_ENDPOINT_URL, cassandra_available, require, s3_available

_names = itertools.count(1)


def pytest_sessionfinish(session):
    """SQLite's write-ahead log and shared-memory index, and the send path's writer lock
    (chat/services/send.py), stay beside a test database that Django removes: they go with it, or
    every run leaves megabytes in the temporary directory."""
    name = settings.DATABASES["default"].get("TEST", {}).get("NAME")
    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.sqlite3" or not name or os.path.exists(name):
        return
    for leftover in (f"{name}-wal", f"{name}-shm", f"{name}.writer-lock"):
        try:
            os.remove(leftover)
        except FileNotFoundError:
            pass


@pytest.fixture(autouse=True)
def _fresh_in_memory_layer(settings):
    """Each test gets an empty in-process channel layer and a fresh rate-limit budget."""
    from channels.layers import channel_layers

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    channel_layers.backends.clear()
    settings.CHAT_SEND_RATE = "10000/min"
    settings.CHAT_UPLOAD_RATE = "10000/min"
    # Auth throttles off unless a test asks for them (tests/security/test_accounts.py).
    settings.CHAT_LOGIN_FAIL_RATE_USER = settings.CHAT_LOGIN_FAIL_RATE_ADDR = "100000/min"
    settings.CHAT_REGISTER_RATE = "100000/min"
    yield
    channel_layers.backends.clear()


# Rate limits count in fixed wall-clock windows (core.ratelimit): a test that spends a small budget
# ("2/min") and expects the next request refused would see it pass if a window turned in between.
# So in tests the process's limiters read a clock that starts each test at the beginning of a day
# of its own: every window (a minute, an hour, a day) begins with the test, and no two tests share
# a window's count. (Waiting for the window to turn instead would stall an async test's event
# loop, which the server reads as overload and sheds the test's sends.)
SECONDS_PER_DAY = 86_400
_rate_days = itertools.count(1)


@pytest.fixture(autouse=True)
def _rate_windows_begin_with_the_test(monkeypatch):
    from core import ratelimit

    day_starts, started = next(_rate_days) * SECONDS_PER_DAY, time.monotonic()

    def clock() -> float:
        return day_starts + (time.monotonic() - started)

    @functools.cache
    def limiter(scope: str, rate: str, redis_url: str) -> ratelimit.RateLimiter:
        return ratelimit.RateLimiter(ratelimit.parse_rate(rate), redis_url, scope=scope, clock=clock)

    monkeypatch.setattr(ratelimit, "_limiter", limiter)


@pytest.fixture(autouse=True)
def _blocking_work_ends_with_its_test():
    """Work that a test's background tasks handed to the blocking-work pool (a settle look or a
    membership re-check started just before the test ended) has finished before the test's
    database is emptied. Cancelling the task at the end of the test does not stop a query that has
    started, and on PostgreSQL that query beside the flush's TRUNCATE can deadlock it, failing
    the flush and leaving rows for the next test.

    Torn down after the test's event loop is closed (no new work can be queued) and before
    pytest-django's flush (its fixture is set up first). Every worker of the pool waits at one
    barrier: each takes its turn only after what was queued before it."""
    yield
    from core import threads

    pool = threads._pool
    if pool._shutdown:  # (a test's own pool, already waited for)
        return
    barrier = threading.Barrier(pool._max_workers + 1)
    for _ in range(pool._max_workers):
        pool.submit(barrier.wait, 60)
    barrier.wait(60)


@pytest.fixture(autouse=True)
def _attachments_in_tmp(settings, tmp_path):
    """Each test stores attachments in a directory of its own (local storage); tests of object
    storage switch to the S3 API server with the `s3_bucket` fixture (tests/chat/conftest.py)."""
    settings.STORAGES = {**settings.STORAGES, "attachments": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(tmp_path / "attachments"), "base_url": None},
    }}


@pytest.fixture
def s3_bucket(settings):
    """Attachments in a bucket of their own on the S3 API server (skipped locally without it,
    failing in CI); the boto3 Bucket, to count what is in it. Emptied and removed afterwards."""
    require("The S3 API server", s3_available())
    import boto3

    from chatproject.settings import attachment_storage

    name = f"test-attachments-{uuid.uuid4().hex[:12]}"
    credentials = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}
    bucket = boto3.resource("s3", endpoint_url=S3_ENDPOINT_URL, **credentials).Bucket(name)
    bucket.create()
    settings.STORAGES = {**settings.STORAGES, "attachments": {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            **attachment_storage("s3")["OPTIONS"],
            "bucket_name": name,
            "endpoint_url": S3_ENDPOINT_URL,
            "access_key": "test",
            "secret_key": "test",
        },
    }}
    yield bucket
    bucket.objects.all().delete()
    bucket.delete()


@pytest.fixture
def make_user(db):
    def make(username: str | None = None, **fields) -> User:
        return User.objects.create_user(username=username or f"user{next(_names)}", password="s3cret-pass!", **fields)

    return make


@pytest.fixture
def client_for():
    """An API client authenticated with the user's token."""

    def make(user: User) -> APIClient:
        from accounts.services import token_issue

        client = APIClient()
        _, key = token_issue(user=user)
        client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
        return client

    return make


@pytest.fixture
def moderator(client, django_user_model):
    """A superuser logged in to the admin through `client`."""
    user = django_user_model.objects.create_superuser(username="mod", password="pw-for-mod-42")
    client.force_login(user)
    return user


@pytest.fixture
def make_group(make_user):
    def make(owner: User, *members: User, title: str = "team"):
        conversation, _ = conversations.conversation_create(
            creator=owner, kind="group", title=title, participant_ids=[m.pk for m in members]
        )
        return conversation

    return make


@pytest.fixture(params=["sql", "cassandra"])
def each_message_store(request, monkeypatch):
    """Each message store in turn (Cassandra: the real server), in place of the configured one for
    every module that reads it."""
    if request.param == "sql":
        from chat.store.sql import SqlMessageStore

        store = SqlMessageStore()
    else:
        from chat.store.cassandra import CassandraMessageStore

        store = CassandraMessageStore(connection=request.getfixturevalue("cassandra_connection"))
    use_message_store(monkeypatch, store)
    return store


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(scope="session")
def cassandra_connection():
    """A connection to a Cassandra keyspace created for this test session and dropped after it
    (skipped locally without Cassandra, failing in CI)."""
    require("Cassandra", cassandra_available())
    from chat.cassandra_models import sync_schema
    from chat.store.cassandra import open_connection

    # A keyspace of its own per session: parallel runs on one server cannot drop each other's.
    keyspace = f"test_{settings.CASSANDRA_KEYSPACE}_{uuid.uuid4().hex[:8]}"
    connection = open_connection(alias="test_cassandra", keyspace=keyspace)
    sync_schema(connection, {"class": "SimpleStrategy", "replication_factor": 1})
    yield connection
    # Dropping a keyspace's tables is a schema change on every node: slower than a request, more
    # so on a busy machine, so it gets more than the request timeout.
    connection.session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)
    connection.unregister()


class PublishedEvents(list):
    """The events handed to the channel layer, in order; `groups` pairs each with its group."""

    def __init__(self) -> None:
        super().__init__()
        self.groups: list[tuple[str, dict]] = []

    async def record(self, group: str, event: dict) -> bool:
        self.append(event)
        self.groups.append((group, event))
        return True


@pytest.fixture
def published(monkeypatch) -> PublishedEvents:
    """Capture what the code under test publishes. Events go out on commit (chat.events): a test
    that is not transactional runs its action under django_capture_on_commit_callbacks(execute=True)."""
    from chat import events

    captured = PublishedEvents()
    monkeypatch.setattr(events, "_apublish_to", captured.record)
    return captured


async def nothing_published(group: str, event: dict) -> bool:
    """In place of chat.events._apublish_to, for tests that need no channel layer."""
    return True


def use_message_store(monkeypatch, store) -> None:
    """Put `store` in place of the configured message store for every module that reads it."""
    import chat.store

    configured = chat.store.get_message_store
    for module in [m for name, m in sys.modules.items() if name.split(".")[0] in ("chat", "notifications")]:
        if getattr(module, "get_message_store", None) is configured:
            monkeypatch.setattr(module, "get_message_store", lambda: store)
