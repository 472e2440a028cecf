"""The worker in process, against a real local webhook receiver."""
import dataclasses
import json
import random
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from chat.services import conversations, send as sending
from accounts.models import User
from chat.models import Participant
from chat.store import get_message_store
from notifications import queue
from notifications.models import Delivery, Device, Job, OutboxEntry
from notifications.worker import Worker
from tests.notifications.conftest import make_due, sample

pytestmark = pytest.mark.django_db
Status = Job.Status


def send(sender, conversation, content="hello"):
    return sending.message_send(sending.SendRequest(sender=sender, conversation_id=conversation.pk, content=content)).message


def tokens_received(receiver) -> list[str]:
    return [json.loads(request.body)["device"]["token"] for request in receiver.received]


def test_each_recipient_device_is_notified_but_not_the_sender_the_muted_or_those_who_read(
    webhook, make_user, make_group, make_device, make_worker
):
    alice, bob, carol, dave, erin = (make_user() for _ in range(5))
    conversation = make_group(alice, bob, carol, dave, erin)
    make_device(alice, token="alice-phone")
    make_device(bob, token="bob-phone")
    make_device(bob, token="bob-tablet")
    make_device(carol, token="carol-phone")
    make_device(dave, token="dave-phone")
    Participant.objects.filter(conversation=conversation, user=carol).update(muted=True)
    message = send(alice, conversation)
    # Dave reads it before the worker gets to it.
    Participant.objects.filter(conversation=conversation, user=dave).update(last_read_seq=message.seq)

    make_worker().run(once=True)

    assert sorted(tokens_received(webhook)) == ["bob-phone", "bob-tablet"]
    assert list(Delivery.objects.values_list("status", flat=True)) == [Status.DONE, Status.DONE]
    assert OutboxEntry.objects.get().status == Status.DONE


def test_a_recipient_who_reads_before_the_retry_is_not_notified_again(
    webhook, make_user, make_group, make_device, make_worker
):
    alice, bob = make_user(), make_user()
    conversation = make_group(alice, bob)
    make_device(bob)
    message = send(alice, conversation)
    webhook.status = 503
    worker = make_worker()
    worker.run(once=True)
    conversations.read_marker_set(user=bob, conversation_id=conversation.pk, seq=message.seq)
    before = sample("chat_notification_skipped_total", reason="read")

    make_due()
    worker.run(once=True)

    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.last_error) == (Status.SKIPPED, "skipped: read")
    assert len(webhook.received) == 1
    assert sample("chat_notification_skipped_total", reason="read") == before + 1


def test_only_the_failed_device_is_retried(webhook, make_user, make_group, make_device, make_worker):
    alice, bob = make_user(), make_user()
    conversation = make_group(alice, bob)
    make_device(bob, token="good")
    make_device(bob, token="flaky")
    send(alice, conversation)
    webhook.status = lambda request: 500 if b'"flaky"' in request.body else 201
    worker = make_worker()

    worker.run(once=True)
    outcome = dict(Delivery.objects.values_list("device__token", "status"))
    assert outcome == {"good": Status.DONE, "flaky": Status.PENDING}

    webhook.status = 201
    make_due()
    worker.run(once=True)

    assert sorted(tokens_received(webhook)) == ["flaky", "flaky", "good"]
    assert set(Delivery.objects.values_list("status", flat=True)) == {Status.DONE}


def test_retries_follow_exponential_backoff_then_dead_letter(
    webhook, make_user, make_group, make_device, make_worker, settings
):
    settings.CHAT_NOTIFICATION_MAX_ATTEMPTS = 4
    settings.CHAT_NOTIFICATION_BACKOFF_BASE = 10.0
    settings.CHAT_NOTIFICATION_BACKOFF_MAX = 25.0
    settings.CHAT_NOTIFICATION_BACKOFF_JITTER = 0.5
    alice, bob = make_user(), make_user()
    make_device(bob)
    send(alice, make_group(alice, bob))
    webhook.status = 503
    worker = make_worker()
    counters = ("failed", "retried", "dead_lettered")
    before = {name: sample(f"chat_notification_{name}_total", queue="delivery") for name in counters}

    # Nominal waits after failures 1, 2, 3: 10 s, 20 s, then 40 s capped to 25 s; jitter takes
    # each down to no less than half.
    for attempt, nominal in enumerate([10, 20, 25], start=1):
        started = timezone.now()
        worker.run(once=True)
        finished = timezone.now()
        delivery = Delivery.objects.get()
        assert (delivery.status, delivery.attempts) == (Status.PENDING, attempt)
        earliest, latest = started + timedelta(seconds=nominal / 2), finished + timedelta(seconds=nominal)
        assert earliest <= delivery.next_attempt_at <= latest
        # Not due yet: another round does nothing.
        worker.run(once=True)
        assert len(webhook.received) == attempt
        make_due()

    worker.run(once=True)

    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts) == (Status.DEAD, 4)
    assert "HTTP 503" in delivery.last_error and delivery.finished_at is not None
    assert len(webhook.received) == 4
    after = {name: sample(f"chat_notification_{name}_total", queue="delivery") for name in counters}
    assert {name: after[name] - before[name] for name in counters} == {"failed": 4, "retried": 3, "dead_lettered": 1}


def test_backoff_delay_is_exponential_capped_and_jittered_downwards():
    rng = random.Random(7)
    for attempts, nominal in [(1, 2), (2, 4), (3, 8), (4, 16), (10, 60), (50, 60)]:
        delays = [queue.backoff_delay(attempts, base=2, cap=60, jitter=0.25, rng=rng) for _ in range(200)]
        assert all(nominal * 0.75 <= delay <= nominal for delay in delays)
        # Jittered: not all the same.
        assert max(delays) - min(delays) > nominal * 0.1
    assert queue.backoff_delay(3, base=2, cap=60, jitter=0) == 8


@pytest.mark.parametrize("crashed_after", ["claiming the outbox entry", "expanding it into deliveries"])
def test_a_crash_between_claim_and_delivery_does_not_lose_the_job(
    crashed_after, webhook, make_user, make_group, make_device, make_worker
):
    alice, bob = make_user(), make_user()
    make_device(bob)
    send(alice, make_group(alice, bob))
    crashed = make_worker("crashed")
    [entry] = queue.claim(OutboxEntry.objects.all(), worker_id="crashed", limit=10, lease_seconds=30)
    if crashed_after == "expanding it into deliveries":
        assert len(crashed._expand(entry)) == 1
    # ...and the process dies here, holding its claims.

    survivor = make_worker("survivor")
    survivor.run(once=True)
    assert webhook.received == []  # the lease is still live: nobody else touches the job yet

    # The lease runs out.
    for model in (OutboxEntry, Delivery):
        model.objects.filter(claimed_by="crashed").update(claimed_until=timezone.now() - timedelta(seconds=1))
    survivor.run(once=True)

    assert len(webhook.received) == 1
    delivery = Delivery.objects.get()
    assert delivery.status == Status.DONE
    assert OutboxEntry.objects.get().status == Status.DONE


def test_a_worker_that_lost_its_claim_cannot_overwrite_the_new_owner(make_user, make_group, make_device):
    alice, bob = make_user(), make_user()
    send(alice, make_group(alice, bob))
    [slow] = queue.claim(OutboxEntry.objects.all(), worker_id="slow", limit=1, lease_seconds=30)
    OutboxEntry.objects.update(claimed_until=timezone.now() - timedelta(seconds=1))
    [fast] = queue.claim(OutboxEntry.objects.all(), worker_id="fast", limit=1, lease_seconds=30)

    assert queue.finish(slow, worker_id="slow", status=Status.DONE) is False
    assert queue.fail(slow, worker_id="slow", error="x", max_attempts=1, base=1, cap=1, jitter=0) is None
    assert queue.release([slow], worker_id="slow") == 0
    entry = OutboxEntry.objects.get()
    assert (entry.status, entry.claimed_by, entry.attempts) == (Status.PENDING, "fast", 2)
    assert queue.finish(fast, worker_id="fast", status=Status.DONE) is True


def test_claims_of_two_workers_never_overlap(make_user, make_group):
    alice, bob = make_user(), make_user()
    conversation = make_group(alice, bob)
    for _ in range(6):
        send(alice, conversation)
    first = queue.claim(OutboxEntry.objects.all(), worker_id="a", limit=4, lease_seconds=30)
    second = queue.claim(OutboxEntry.objects.all(), worker_id="b", limit=4, lease_seconds=30)
    third = queue.claim(OutboxEntry.objects.all(), worker_id="c", limit=4, lease_seconds=30)

    assert (len(first), len(second), third) == (4, 2, [])
    assert not {job.pk for job in first} & {job.pk for job in second}


def test_claimed_deliveries_are_released_unattempted_when_the_lease_runs_low(
    webhook, make_user, make_group, make_device, make_worker
):
    alice, bob = make_user(), make_user()
    make_device(bob)
    make_device(bob)
    send(alice, make_group(alice, bob))
    worker = make_worker()
    [entry] = queue.claim(OutboxEntry.objects.all(), worker_id=worker.worker_id, limit=1, lease_seconds=30)
    deliveries = worker._expand(entry)
    # Less lease left than one attempt may take (timeout 2 s + 1 s margin).
    for delivery in deliveries:
        delivery.claimed_until = timezone.now() + timedelta(seconds=2.5)

    worker._deliver_all(deliveries)

    assert webhook.received == []
    assert list(Delivery.objects.values_list("status", "attempts", "claimed_by")) == [(Status.PENDING, 0, "")] * 2
    assert worker.stats["released"] == 2


def test_a_deleted_message_is_not_pushed(webhook, make_user, make_group, make_device, make_worker, monkeypatch):
    alice, bob = make_user(), make_user()
    make_device(bob)
    message = send(alice, make_group(alice, bob))
    store = get_message_store()
    monkeypatch.setattr(store, "get", lambda conversation_id, seq: dataclasses.replace(message, content="", deleted=True))

    make_worker().run(once=True)

    assert webhook.received == []
    assert Delivery.objects.get().last_error == "skipped: deleted"


def test_a_message_missing_from_the_store_is_retried(
    webhook, make_user, make_group, make_device, make_worker, monkeypatch
):
    alice, bob = make_user(), make_user()
    make_device(bob)
    message = send(alice, make_group(alice, bob))
    store = get_message_store()
    monkeypatch.setattr(store, "get", lambda conversation_id, seq: None)
    worker = make_worker()
    worker.run(once=True)
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts) == (Status.PENDING, 1)
    assert "not found in the message store" in delivery.last_error

    monkeypatch.setattr(store, "get", lambda conversation_id, seq: message)
    make_due()
    worker.run(once=True)

    assert Delivery.objects.get().status == Status.DONE
    assert len(webhook.received) == 1


def test_a_device_taken_over_by_someone_else_does_not_get_the_old_owners_notification(
    webhook, make_user, make_group, make_device, make_worker
):
    alice, bob, mallory = make_user(), make_user(), make_user()
    device = make_device(bob, token="shared-browser")
    send(alice, make_group(alice, bob))
    webhook.status = 503
    worker = make_worker()
    worker.run(once=True)
    # Mallory signs in on the same install, which registers the token for her.
    Device.objects.filter(pk=device.pk).update(user=mallory)

    make_due()
    worker.run(once=True)

    assert len(webhook.received) == 1  # only the failed attempt, when it was still Bob's
    assert Delivery.objects.get().last_error == "skipped: device_reassigned"


def test_an_unexpected_error_is_recorded_and_retried_not_lost(
    make_user, make_group, make_device, make_worker, monkeypatch
):
    alice, bob = make_user(), make_user()
    make_device(bob)
    send(alice, make_group(alice, bob))
    worker = make_worker()

    def broken(delivery, payload):
        raise RuntimeError("bug in a backend")

    monkeypatch.setattr(worker.backend, "send", broken)
    worker.run(once=True)

    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts) == (Status.PENDING, 1)
    assert delivery.last_error == "RuntimeError: bug in a backend"


def test_gauges_report_queue_depth_dead_letters_and_age(make_user, make_group, make_device, make_worker):
    alice, bob = make_user(), make_user()
    conversation = make_group(alice, bob)
    for _ in range(3):
        send(alice, conversation)
    OutboxEntry.objects.filter(pk=OutboxEntry.objects.order_by("pk").first().pk).update(
        status=Status.DEAD, created_at=timezone.now() - timedelta(minutes=5)
    )
    OutboxEntry.objects.filter(status=Status.PENDING).update(created_at=timezone.now() - timedelta(seconds=90))

    make_worker().update_gauges()

    assert sample("chat_notification_queue_depth", queue="outbox") == 2
    assert sample("chat_notification_dead_letters", queue="outbox") == 1
    assert 90 <= sample("chat_notification_oldest_pending_age_seconds", queue="outbox") < 120
    assert sample("chat_notification_queue_depth", queue="delivery") == 0


def test_purge_removes_old_finished_jobs_but_never_dead_or_pending_ones(
    make_user, make_group, make_device, make_worker
):
    alice, bob = make_user(), make_user()
    conversation = make_group(alice, bob)
    make_device(bob)
    worker = make_worker()
    for _ in range(3):
        send(alice, conversation)
    worker.run(once=True)
    sent_long_ago, dead_long_ago, sent_recently = Delivery.objects.order_by("pk")
    long_ago = timezone.now() - timedelta(days=8)
    Delivery.objects.filter(pk=dead_long_ago.pk).update(status=Status.DEAD)
    Delivery.objects.filter(pk__in=[sent_long_ago.pk, dead_long_ago.pk]).update(finished_at=long_ago)
    OutboxEntry.objects.update(finished_at=long_ago)

    deleted = worker.purge_finished()

    # The sent delivery and its now empty outbox entry; the dead one and its entry stay.
    assert deleted == 2
    assert set(Delivery.objects.values_list("pk", flat=True)) == {dead_long_ago.pk, sent_recently.pk}
    assert set(OutboxEntry.objects.values_list("pk", flat=True)) == {dead_long_ago.outbox_id, sent_recently.outbox_id}


def test_sent_and_latency_metrics(webhook, make_user, make_group, make_device, make_worker):
    alice, bob = make_user(), make_user()
    make_device(bob)
    send(alice, make_group(alice, bob))
    sent = sample("chat_notification_sent_total", backend="webhook")
    latencies = sample("chat_notification_delivery_latency_seconds_count", backend="webhook")

    make_worker().run(once=True)

    assert sample("chat_notification_sent_total", backend="webhook") == sent + 1
    assert sample("chat_notification_delivery_latency_seconds_count", backend="webhook") == latencies + 1


@pytest.mark.django_db(transaction=True)  # the worker thread needs the database unlocked
def test_worker_stops_when_asked_and_after_max_idle(make_worker):
    polling: Worker = make_worker()

    def run_in_thread() -> None:
        try:
            polling.run()
        finally:
            connection.close()

    thread = threading.Thread(target=run_in_thread)
    thread.start()
    time.sleep(0.2)
    assert thread.is_alive()  # idle, it keeps polling...
    polling.stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()  # ...until told to stop, which wakes it at once

    started = time.monotonic()
    make_worker().run(max_idle=0.3)
    assert 0.3 <= time.monotonic() - started < 3


def test_a_banned_participant_gets_no_push(webhook, make_user, make_group, make_device, make_worker):
    """A ban keeps the participant row; the worker's recipients come from the membership rule,
    so the banned member's devices get nothing (the excerpt of the message included)."""
    alice, bob, carol = make_user(), make_user(), make_user()
    conversation = make_group(alice, bob, carol)
    make_device(bob, token="bob-phone")
    make_device(carol, token="carol-phone")
    conversations.ban_create(actor=None, conversation=conversation, user=bob)
    send(alice, conversation, "for members only")

    make_worker().run(once=True)

    assert tokens_received(webhook) == ["carol-phone"]


@pytest.mark.parametrize("loses_access", ["banned", "removed", "deactivated"])
def test_losing_access_before_a_retry_stops_the_push(
    loses_access, webhook, make_user, make_group, make_device, make_worker
):
    alice, bob = make_user(), make_user()
    conversation = make_group(alice, bob)
    make_device(bob)
    send(alice, conversation)
    webhook.status = 503
    worker = make_worker()
    worker.run(once=True)
    if loses_access == "banned":
        conversations.ban_create(actor=None, conversation=conversation, user=bob)
    elif loses_access == "removed":
        conversations.participant_remove(actor=bob, conversation_id=conversation.pk, user_id=bob.pk)
    else:
        User.objects.filter(pk=bob.pk).update(is_active=False)
    before = sample("chat_notification_skipped_total", reason="no_access")

    webhook.status = 201
    make_due()
    worker.run(once=True)

    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.last_error) == (Status.SKIPPED, "skipped: no_access")
    assert len(webhook.received) == 1  # only the refused first attempt
    assert sample("chat_notification_skipped_total", reason="no_access") == before + 1
