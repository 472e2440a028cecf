"""Real daphne processes on loopback sockets, for tests where the transport matters."""
from __future__ import annotations

import json
from contextlib import contextmanager
import re
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(database_path: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "CHAT_", "REDIS_URL", "DATABASE_URL"))}
    env.update(
        DJANGO_SETTINGS_MODULE="chatproject.settings",
        DJANGO_SECRET_KEY="live-test-secret-key-not-for-production",
        DATABASE_URL=f"sqlite:///{database_path}",
        CHAT_SEND_RATE="100000/min",
        # Every test signs up and logs in from 127.0.0.1; the throttles have tests of their own.
        CHAT_REGISTER_RATE="100000/min",
        CHAT_LOGIN_FAIL_RATE_USER="100000/min",
        CHAT_LOGIN_FAIL_RATE_ADDR="100000/min",
        LOG_LEVEL="WARNING",
    )
    env.update(overrides)
    return env


def migrate(env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)


@contextmanager
def running_server(directory: Path, **env_overrides: str):
    """A daphne on a freshly migrated SQLite database in `directory` (plus any environment
    overrides), stopped when the block ends."""
    env = server_env(directory / "db.sqlite3", **env_overrides)
    migrate(env)
    live = LiveServer(env, directory / "daphne.log").start()
    try:
        yield live
    finally:
        live.stop()


class LiveServer:
    """One daphne process serving chatproject.asgi on 127.0.0.1."""

    def __init__(self, env: dict[str, str], log_path: Path, daphne_args: tuple[str, ...] = ()) -> None:
        self.env = env
        self.daphne_args = daphne_args
        self.port = free_port()
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def max_frame_bytes(self) -> str:
        """daphne's cap on a frame, in and out: the service's CHAT_MAX_FRAME_BYTES, as `make run` does."""
        from django.conf import settings

        return self.env.get("CHAT_MAX_FRAME_BYTES") or str(settings.ENVIRONMENT_VARIABLES["CHAT_MAX_FRAME_BYTES"])

    def start(self, timeout: float = 20) -> "LiveServer":
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "daphne", "--websocket-max-message-size", self.max_frame_bytes,
                "--websocket-max-frame-size", self.max_frame_bytes,
                *self.daphne_args,
                "-b", "127.0.0.1", "-p", str(self.port), "chatproject.asgi:application",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daphne exited with {self.process.returncode}; see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"daphne did not listen within {timeout} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "log", None):
            self.log.close()

    def request(self, method: str, path: str, body: dict | None = None, token: str | None = None, headers=None):
        """(status, parsed JSON body, headers) of one HTTP request."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.http + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        request.add_header("Accept", "application/json")
        if token:
            request.add_header("Authorization", f"Token {token}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None, response.headers
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw.decode(errors="replace")
            return error.code, parsed, error.headers

    def metric(self, name: str, labels: str = "") -> float:
        """A sample of the server's /metrics (0 when absent); labels as they print: 'a="x",b="y"'."""
        with urllib.request.urlopen(f"{self.http}/metrics", timeout=5) as response:
            text = response.read().decode()
        series = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "")
        match = re.search(r"^" + series + r" ([0-9.e+-]+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def signup(self, username: str, password: str = "long-enough-pass-42") -> tuple[str, str]:
        """Register a user over HTTP; (user id, token)."""
        status, user, _ = self.request("POST", "/api/v1/auth/register/", {"username": username, "password": password})
        assert status == 201, user
        status, token, _ = self.request("POST", "/api/v1/auth/token/", {"username": username, "password": password})
        assert status == 200, token
        return user["id"], token["token"]
