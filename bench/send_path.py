"""Cost of one send's persist step (everything up to the commit), one thread, no load: the whole
step and each statement of it, in milliseconds of wall time, printed as JSON.

    .venv/bin/python bench/send_path.py                      # SQLite file + Cassandra + Redis
    .venv/bin/python bench/send_path.py --store sql          # SQLite only (no services needed)
    .venv/bin/python bench/send_path.py --database-url postgres://...

Uses a temporary SQLite file (or the given empty database), the `chat_bench` keyspace and Redis db
13, like bench/run.py. Where the fan-out benchmark says how fast the service is, this says what one
send costs and which step costs it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(fn, count: int) -> float:
    """Median milliseconds of `fn()` over `count` calls, after a tenth as many warm-up calls."""
    for _ in range(max(count // 10, 1)):
        fn()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(samples), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=["sql", "cassandra"], default="cassandra")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--count", type=int, default=500)
    args = parser.parse_args()

    workdir = tempfile.TemporaryDirectory()
    os.environ.update(
        DATABASE_URL=args.database_url or f"sqlite:///{workdir.name}/send.sqlite3",
        CHAT_MESSAGE_STORE=args.store,
        CASSANDRA_KEYSPACE="chat_bench",
        REDIS_URL=args.redis,
        CHAT_SEND_RATE="1000000/min",
        DJANGO_SETTINGS_MODULE="chatproject.settings",
        LOG_LEVEL="WARNING",
    )
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import transaction
    from django.utils import timezone

    from accounts.models import User
    from chat import sql
    from chat.services.conversations import conversation_create
    from chat.services.send import SendRequest, SendResult, message_send
    from chat.access import access_participation
    from core.ratelimit import get_send_rate_limiter
    from chat.store import get_message_store
    from notifications.services import notification_enqueue

    call_command("migrate", verbosity=0)
    if args.store == "cassandra":
        call_command("cassandra_schema", keyspace="chat_bench", verbosity=0)
    run = uuid.uuid4().hex[:8]
    alice = User.objects.create_user(username=f"alice-{run}", password="x")
    bob = User.objects.create_user(username=f"bob-{run}", password="x")
    conversation, _ = conversation_create(creator=alice, kind="group", participant_ids=[bob.pk], title="bench")
    _, participant_id, *_ = access_participation(user=alice, conversation_id=conversation.id)
    store = get_message_store()

    def send() -> SendResult:
        return message_send(
            SendRequest(
                sender=alice, conversation_id=conversation.id, content="hello", message_type="text",
                is_encrypted=False, metadata={"bench_ts": time.time_ns()}, idempotency_key=uuid.uuid4().hex,
                idempotency_field="client_message_id", transport="websocket",
            )
        )

    last = send().message

    far_seqs = iter(range(10**9, 2 * 10**9))  # a throwaway conversation: rows far above its real seqs

    def store_insert() -> None:
        store.insert(dataclasses.replace(last, message_id=uuid.uuid4(), seq=next(far_seqs)))

    def seq_in_transaction() -> None:
        with transaction.atomic():
            sql.allocate_seqs({conversation.id: 1}, timezone.now())

    steps = {
        "persist (the whole step, with a client_message_id)": send,
        "rate limit": lambda: get_send_rate_limiter().check(alice.pk),
        "authorize": lambda: access_participation(user=alice, conversation_id=conversation.id),
        "idempotency record lookup": lambda: sql.idempotency_record_ids({(alice.pk, uuid.uuid4().hex)}),
        "seq allocation (own transaction)": seq_in_transaction,
        "message store insert": store_insert,
        "read marker": lambda: sql.advance_read_markers({participant_id: 0}),
        "outbox insert": lambda: notification_enqueue(messages=[last]),
    }
    results = {name: timed(fn, args.count) for name, fn in steps.items()}
    print(json.dumps({
        "store": args.store, "database": "postgresql" if args.database_url else "sqlite", "count": args.count,
        "median_ms": results,
        "command": " ".join([".venv/bin/python", "bench/send_path.py", *sys.argv[1:]]),
    }, indent=1))


if __name__ == "__main__":
    main()
