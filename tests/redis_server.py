"""A private redis-server on a free loopback port, which a test may stop and start again.

Outage tests use it instead of the shared Redis from `make services`, so stopping it disturbs
nothing else. The binary is the one `make services` installs from Debian.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from tests.live import free_port
from tests.services import require


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if shutil.os.path.exists("/usr/bin/redis-server") else None
    )


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def private_redis():
    require("Redis (redis-server binary)", redis_server_binary() is not None)
    server = RedisServer().start()
    yield server
    server.stop()
