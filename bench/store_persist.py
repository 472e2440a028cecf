"""Persist latency of MessageStore.insert: sequential inserts after a warm-up, printed as JSON.

    .venv/bin/python bench/store_persist.py --backend cassandra   # real server from `make services`
    .venv/bin/python bench/store_persist.py --backend sql         # SQLite, in a temporary file

Cassandra runs in a throwaway keyspace (created with `sync_schema`, dropped afterwards), SQL in a
temporary database file migrated for the run: the bench never touches the service's data.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def percentile(sorted_values: list[float], fraction: float) -> float:
    # Nearest rank: the smallest value with at least `fraction` of the samples at or below it.
    return sorted_values[max(0, math.ceil(fraction * len(sorted_values)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["sql", "cassandra"], required=True)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args()

    workdir = tempfile.TemporaryDirectory()
    if args.backend == "sql":
        os.environ["DATABASE_URL"] = f"sqlite:///{workdir.name}/bench.sqlite3"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from chat.store import Message, MessageStore

    cleanup = []
    if args.backend == "sql":
        call_command("migrate", verbosity=0)
        from chat.store.sql import SqlMessageStore

        store: MessageStore = SqlMessageStore()
        target = settings.DATABASES["default"]["NAME"]
    else:
        from chat.cassandra_models import sync_schema
        from chat.store.cassandra import CassandraMessageStore, open_connection

        keyspace = f"bench_{uuid.uuid4().hex[:8]}"
        connection = open_connection("bench", keyspace)
        sync_schema(connection, settings.CASSANDRA_REPLICATION)
        cleanup.append(lambda: connection.session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}"))
        store = CassandraMessageStore(connection=connection)
        target = f"{settings.CASSANDRA_HOSTS}:{settings.CASSANDRA_PORT}/{keyspace} ({settings.CASSANDRA_CONSISTENCY})"

    conversation_id, sender_id = uuid.uuid4(), uuid.uuid4()
    samples: list[float] = []
    try:
        for seq in range(1, args.warmup + args.count + 1):
            message = Message(
                message_id=uuid.uuid4(),
                conversation_id=conversation_id,
                seq=seq,
                sender_id=sender_id,
                content="a typical chat message of about a hundred bytes, give or take, with some text in it.",
                message_type="text",
                is_encrypted=False,
                metadata={"client": "bench"},
                sent_at=datetime.now(timezone.utc),
            )
            started = time.perf_counter()
            store.insert(message)
            if seq > args.warmup:
                samples.append((time.perf_counter() - started) * 1000)
    finally:
        for step in cleanup:
            step()
        workdir.cleanup()

    ordered = sorted(samples)
    print(
        json.dumps(
            {
                "backend": args.backend,
                "target": target,
                "inserts": len(samples),
                "warmup": args.warmup,
                "p50_ms": round(percentile(ordered, 0.50), 3),
                "p95_ms": round(percentile(ordered, 0.95), 3),
                "p99_ms": round(percentile(ordered, 0.99), 3),
                "mean_ms": round(statistics.fmean(samples), 3),
                "max_ms": round(ordered[-1], 3),
                "command": shlex.join([".venv/bin/python", "bench/store_persist.py", *sys.argv[1:]]),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
