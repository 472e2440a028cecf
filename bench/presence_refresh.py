"""CPU of one presence refresh (chat.presence.RedisPresence.refresh), printed as JSON.

    .venv/bin/python bench/presence_refresh.py --redis redis://127.0.0.1:6379/12 --conversations 200

A process refreshes its sockets' presence entries every 20 s, one sweep per conversation it holds
sockets in: in the idle scenario (2,000 sockets in 200 conversations of 10 on two workers) each
worker holds entries in all 200. This holds `--sockets` entries in each of `--conversations`
conversations and reports the median CPU and wall time of `--repeat` refreshes. Its keys expire
on their own (two entry lifetimes); use a Redis database nothing else uses.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


async def measure(url: str, conversations: int, sockets: int, repeat: int) -> dict:
    from chat.presence import RedisPresence

    presence = RedisPresence(url)
    for _ in range(conversations):
        conversation = uuid.uuid4()
        for socket in range(sockets):
            await presence.join(conversation, uuid.uuid4(), f"socket-{socket}")
    await presence.refresh()  # warm: connections made, scripts cached
    cpu, wall = [], []
    for _ in range(repeat):
        started_cpu, started_wall = time.process_time(), time.perf_counter()
        await presence.refresh()
        cpu.append(time.process_time() - started_cpu)
        wall.append(time.perf_counter() - started_wall)
    for task in presence._refreshers.values():
        task.cancel()
    return {
        "conversations": conversations, "sockets_per_conversation": sockets, "refreshes": repeat,
        "cpu_ms_median": round(statistics.median(cpu) * 1000, 2), "wall_ms_median": round(statistics.median(wall) * 1000, 2),
        "cpu_ms_per_conversation": round(statistics.median(cpu) * 1000 / conversations, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12", help="a Redis database nothing else uses")
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--sockets", type=int, default=5, help="entries held per conversation")
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
    import django

    django.setup()
    print(json.dumps(asyncio.run(measure(args.redis, args.conversations, args.sockets, args.repeat))))


if __name__ == "__main__":
    main()
