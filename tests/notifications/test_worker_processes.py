"""Real `manage.py run_notifications` processes sharing one SQLite file and one HTTP receiver."""
from __future__ import annotations

import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.live import ROOT, migrate, server_env
from tests.notifications.conftest import WEBHOOK_SECRET
from tests.notifications.receiver import Receiver

pytestmark = pytest.mark.live_server_process


@pytest.fixture(scope="module")
def migrated_database(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "db.sqlite3"
    migrate(server_env(path))
    return path


@pytest.fixture
def environment(tmp_path, migrated_database, receiver):
    """A fresh copy of the migrated database, and the worker settings pointing at `receiver`."""
    database = tmp_path / "db.sqlite3"
    shutil.copy(migrated_database, database)
    env = server_env(
        database,
        CHAT_PUSH_BACKEND="webhook",
        CHAT_WEBHOOK_URL=receiver.url + "/hook",
        CHAT_WEBHOOK_SECRET=WEBHOOK_SECRET,
        CHAT_NOTIFICATION_POLL_INTERVAL="0.05",
        CHAT_NOTIFICATION_TIMEOUT="3",
        CHAT_NOTIFICATION_LEASE_SECONDS="5",
        CHAT_NOTIFICATION_BATCH_SIZE="2",
        LOG_LEVEL="ERROR",
    )
    return database, env


def seed(env: dict[str, str], messages: int, devices: int) -> None:
    subprocess.run(
        [sys.executable, "-m", "tests.notifications.seed", str(messages), str(devices)], cwd=ROOT, env=env, check=True
    )


def start_worker(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "manage.py", "run_notifications", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stats(output: str) -> dict[str, int]:
    match = re.search(r"stopped; (.*)$", output, re.MULTILINE)
    assert match, output
    return {key: int(value) for key, value in (pair.split("=") for pair in match.group(1).split())}


def deliveries(database: Path) -> list[tuple[int, str, str, int]]:
    with sqlite3.connect(database) as db:
        return db.execute("SELECT id, status, claimed_by, attempts FROM notifications_delivery ORDER BY id").fetchall()


def lease_expiry(database: Path) -> float:
    with sqlite3.connect(database) as db:
        [(claimed_until,)] = db.execute("SELECT claimed_until FROM notifications_delivery").fetchall()
    return datetime.fromisoformat(claimed_until).replace(tzinfo=timezone.utc).timestamp()


def delivery_ids(receiver: Receiver) -> list[str]:
    return [request.headers["x-chat-delivery"] for request in receiver.received]


def test_two_workers_never_deliver_one_job_twice(environment, receiver):
    database, env = environment
    seed(env, messages=40, devices=1)
    receiver.delay = 0.05  # deliveries overlap in time, so the workers really compete

    workers = [start_worker(env, "--max-idle", "1") for _ in range(2)]
    outputs = [worker.communicate(timeout=60)[0] for worker in workers]

    assert [worker.returncode for worker in workers] == [0, 0], outputs
    ids = delivery_ids(receiver)
    assert len(ids) == 40 and Counter(ids).most_common(1)[0][1] == 1
    assert {status for _, status, _, _ in deliveries(database)} == {"done"}
    sent = [stats(output)["sent"] for output in outputs]
    assert sum(sent) == 40 and min(sent) > 0, sent  # both took part
    for request in receiver.received:
        assert json.loads(request.body)["delivery_id"] == request.headers["x-chat-delivery"]


def test_sigterm_finishes_the_delivery_in_flight_and_hands_back_the_rest(environment, receiver):
    database, env = environment
    seed(env, messages=1, devices=2)  # one outbox entry -> two deliveries, claimed together
    receiver.delay = 1.5
    # One attempt at a time to the receiver's host, so one is in flight and one waits when the
    # signal comes (with the default limit both would be in flight together).
    worker = start_worker({**env, "CHAT_NOTIFICATION_PER_HOST_CONCURRENCY": "1"})

    receiver.wait_for(1, timeout=20)
    signalled = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    output = worker.communicate(timeout=20)[0]
    stopped_after = time.monotonic() - signalled

    assert worker.returncode == 0, output
    # It waited for the receiver's answer to the request in flight, and started no other (the
    # receiver saw one request; the other delivery was handed back). No upper bound on the time:
    # on a loaded machine the exit itself can take seconds, and the count already says it all.
    assert stopped_after > 1.0, stopped_after
    assert len(receiver.received) == 1
    assert stats(output) == {"expanded": 1, "sent": 1, "skipped": 0, "failed": 0, "dead": 0, "released": 1}
    rows = deliveries(database)
    assert [row[1:] for row in rows] == [("done", "", 1), ("pending", "", 0)]

    receiver.delay = 0
    rerun = start_worker(env, "--once")
    assert stats(rerun.communicate(timeout=20)[0])["sent"] == 1
    assert sorted(delivery_ids(receiver)) == sorted(str(row[0]) for row in rows)
    assert {row[1] for row in deliveries(database)} == {"done"}


def test_a_killed_worker_s_job_is_delivered_once_its_lease_expires(environment, receiver):
    database, env = environment
    seed(env, messages=1, devices=1)
    receiver.delay = 2
    worker = start_worker(env)
    receiver.wait_for(1, timeout=20)
    worker.kill()  # no chance to clean up: the claim stays behind
    worker.wait(10)
    [(delivery_id, status, claimed_by, attempts)] = deliveries(database)
    assert (status, attempts) == ("pending", 1) and claimed_by

    receiver.delay = 0
    too_early = start_worker(env, "--once")
    assert stats(too_early.communicate(timeout=20)[0])["sent"] == 0  # the lease still protects it

    time.sleep(max(0.0, lease_expiry(database) - time.time()) + 0.1)
    later = start_worker(env, "--once")
    assert stats(later.communicate(timeout=20)[0])["sent"] == 1
    assert deliveries(database) == [(delivery_id, "done", "", 2)]
    # At least once: the killed worker's request did reach the receiver, so it sees the same
    # delivery id twice and can drop the repeat.
    assert delivery_ids(receiver) == [str(delivery_id)] * 2
