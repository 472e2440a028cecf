"""How long a user stream's handshake takes, and how big its `ready` is, for a user in 1, 100 and
2,000 conversations (docs/performance.md, "User stream").

    .venv/bin/python -m bench.stream_handshake --redis redis://127.0.0.1:6379/13 [--repeat 10]

One daphne on a fresh SQLite database and the given Redis; the users and conversations are
inserted in bulk. Each handshake is timed from the TCP connect to the `ready` frame, with the
stream alone on the server (every one of its conversations is a new subscription for the
process: the worst case). Run with the default CHAT_STREAM_MAX_CONVERSATIONS and with the limit
lifted, to show what the limit buys.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = (1, 100, 2000)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed(env: dict) -> dict[int, str]:
    """One user per size, in that many conversations (of two people); their tokens by size."""
    script = f"""
import django, json, os, uuid
django.setup()
from django.utils import timezone
from accounts.models import User
from accounts.services import token_issue
from chat.models import Conversation, Participant
tokens = {{}}
other = User.objects.create_user(username="other-" + uuid.uuid4().hex[:6])
for size in {list(SIZES)}:
    user = User.objects.create_user(username=f"in-{{size}}-" + uuid.uuid4().hex[:6])
    conversations = Conversation.objects.bulk_create([Conversation(kind="group", title=f"c{{i}}") for i in range(size)])
    Participant.objects.bulk_create(
        [Participant(conversation=c, user=user, role="owner") for c in conversations]
        + [Participant(conversation=c, user=other) for c in conversations]
    )
    tokens[size] = token_issue(user=user)[1]
print(json.dumps(tokens))
"""
    output = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return {int(size): token for size, token in json.loads(output.stdout.strip().splitlines()[-1]).items()}


async def handshake(port: int, token: str) -> tuple[float, int, bool]:
    from websockets.asyncio.client import connect

    started = time.perf_counter()
    async with connect(f"ws://127.0.0.1:{port}/ws/chat/", additional_headers={"Authorization": f"Token {token}"}, max_size=None) as ws:
        text = await ws.recv()
        elapsed = time.perf_counter() - started
    ready = json.loads(text)
    return elapsed, len(text), ready.get("truncated", False)


def measure(env: dict, tokens: dict[int, str], repeat: int, workdir: Path, label: str) -> list[dict]:
    port = free_port()
    with open(workdir / f"daphne-{label}.log", "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "chatproject.asgi:application"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            rows = []
            for size in SIZES:
                asyncio.run(handshake(port, tokens[size]))  # warm: first database connection, imports
                samples = [asyncio.run(handshake(port, tokens[size])) for _ in range(repeat)]
                times = sorted(sample[0] * 1000 for sample in samples)
                rows.append({
                    "limit": label, "conversations": size,
                    "median_ms": round(statistics.median(times), 1), "max_ms": round(times[-1], 1),
                    "ready_bytes": samples[-1][1], "truncated": samples[-1][2],
                })
                print(json.dumps(rows[-1]), flush=True)
            return rows
        finally:
            server.terminate()
            server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", required=True, help="a Redis database of its own, e.g. redis://127.0.0.1:6379/13")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="stream-handshake-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "CHAT_", "REDIS_URL", "DATABASE_URL"))}
    env.update(
        DJANGO_SETTINGS_MODULE="chatproject.settings",
        DJANGO_SECRET_KEY="bench-secret-key-not-for-production",
        DATABASE_URL=f"sqlite:///{workdir / 'db.sqlite3'}",
        REDIS_URL=args.redis,
        LOG_LEVEL="WARNING",
    )
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)
    tokens = seed(env)

    rows = measure(env, tokens, args.repeat, workdir, "default")
    rows += measure({**env, "CHAT_STREAM_MAX_CONVERSATIONS": "5000"}, tokens, args.repeat, workdir, "5000")
    print("| CHAT_STREAM_MAX_CONVERSATIONS | user in | handshake median | max | ready frame | truncated |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['limit']} | {row['conversations']} | {row['median_ms']} ms | {row['max_ms']} ms | "
              f"{row['ready_bytes']:,} B | {row['truncated']} |")


if __name__ == "__main__":
    main()
