"""Real servers the tests use: Redis, Cassandra and an S3 API server, started by `make services`.

On a laptop without them, their tests skip with the reason. In CI (CI=true, or
CHAT_REQUIRE_SERVICES=1) a missing service fails the test instead: nothing silently skips there.
"""
from __future__ import annotations

import os
import socket

import pytest

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
CASSANDRA_HOST = os.environ.get("CASSANDRA_HOSTS", "127.0.0.1").split(",")[0]
CASSANDRA_PORT = int(os.environ.get("CASSANDRA_PORT", "9042"))
S3_ENDPOINT_URL = os.environ.get("TEST_S3_ENDPOINT_URL", f"http://127.0.0.1:{os.environ.get('S3_PORT', '9400')}")


def services_required() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true"} or os.environ.get("CHAT_REQUIRE_SERVICES") == "1"


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def redis_available() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
    except Exception:
        return False


def cassandra_available() -> bool:
    return _port_open(CASSANDRA_HOST, CASSANDRA_PORT)


def s3_available() -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(S3_ENDPOINT_URL + "/", timeout=1) as response:
            return response.status == 200
    except Exception:
        return False


def require(name: str, available: bool, start_with: str = "make services") -> None:
    if available:
        return
    message = f"{name} is not running on loopback; start it with `{start_with}`"
    if services_required():
        pytest.fail(message + " (services are required in CI)", pytrace=False)
    pytest.skip(message)
