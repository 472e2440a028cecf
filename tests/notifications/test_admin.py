"""The operator's side: dead letters are visible in the admin and a re-queue delivers them."""
from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.utils import timezone

from chat.services import send as sending
from notifications.models import Delivery, Job, OutboxEntry
from tests.notifications.conftest import make_due

pytestmark = pytest.mark.django_db
Status = Job.Status


@pytest.fixture
def dead_delivery(webhook, make_user, make_group, make_device, make_worker, settings):
    """A delivery dead-lettered after two refused attempts."""
    settings.CHAT_NOTIFICATION_MAX_ATTEMPTS = 2
    alice, bob = make_user(), make_user()
    make_device(bob)
    sending.message_send(sending.SendRequest(sender=alice, conversation_id=make_group(alice, bob).pk, content="hi"))
    webhook.status = 500
    worker = make_worker()
    worker.run(once=True)
    make_due()
    worker.run(once=True)
    delivery = Delivery.objects.get()
    assert delivery.status == Status.DEAD
    return delivery


def test_dead_letters_and_the_outbox_are_listed_with_filters_and_errors(admin_client, dead_delivery):
    pages = {
        "/admin/notifications/deadletter/": 1,
        "/admin/notifications/delivery/?status__exact=dead": 1,
        "/admin/notifications/delivery/?status__exact=done": 0,
        "/admin/notifications/outboxentry/?status__exact=done": 0,
    }
    for url, errors in pages.items():
        response = admin_client.get(url)
        assert response.status_code == 200, url
        assert response.content.decode().count("webhook answered HTTP 500") == errors, url
    detail = admin_client.get(f"/admin/notifications/deadletter/{dead_delivery.pk}/change/")
    assert detail.status_code == 200 and "webhook answered HTTP 500" in detail.content.decode()
    outbox = admin_client.get(f"/admin/notifications/outboxentry/{dead_delivery.outbox_id}/change/")
    assert outbox.status_code == 200 and "webhook answered HTTP 500" in outbox.content.decode()
    assert admin_client.get("/admin/notifications/device/").status_code == 200


def test_a_dead_letter_requeued_from_the_admin_is_delivered(admin_client, dead_delivery, webhook, make_worker):
    webhook.status = 201  # the receiver is fixed

    response = admin_client.post(
        "/admin/notifications/deadletter/", {"action": "requeue", "_selected_action": [dead_delivery.pk]}, follow=True
    )

    assert response.status_code == 200 and "Re-queued 1 job(s)." in response.content.decode()
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.finished_at) == (Status.PENDING, 0, None)
    assert LogEntry.objects.filter(object_id=str(delivery.pk), change_message="Re-queued for delivery.").exists()

    make_worker().run(once=True)

    assert len(webhook.received) == 3  # two refused attempts, then the re-queued one
    assert Delivery.objects.get().status == Status.DONE


def test_a_job_being_delivered_right_now_is_not_requeued(admin_client, make_user, make_group):
    alice, bob = make_user(), make_user()
    sending.message_send(sending.SendRequest(sender=alice, conversation_id=make_group(alice, bob).pk, content="hi"))
    in_flight = timezone.now() + timedelta(seconds=30)
    OutboxEntry.objects.update(claimed_by="busy-worker", claimed_until=in_flight, attempts=1)

    response = admin_client.post(
        "/admin/notifications/outboxentry/",
        {"action": "requeue", "_selected_action": list(OutboxEntry.objects.values_list("pk", flat=True))},
        follow=True,
    )

    assert "Re-queued 0 job(s). 1 left alone" in response.content.decode()
    entry = OutboxEntry.objects.get()
    assert (entry.claimed_by, entry.attempts) == ("busy-worker", 1)


def test_a_dead_outbox_entry_can_be_requeued(admin_client, make_user, make_group, make_device, make_worker, webhook):
    alice, bob = make_user(), make_user()
    make_device(bob)
    sending.message_send(sending.SendRequest(sender=alice, conversation_id=make_group(alice, bob).pk, content="hi"))
    OutboxEntry.objects.update(status=Status.DEAD, attempts=10, last_error="boom")

    admin_client.post(
        "/admin/notifications/outboxentry/",
        {"action": "requeue", "_selected_action": list(OutboxEntry.objects.values_list("pk", flat=True))},
    )
    make_worker().run(once=True)

    assert OutboxEntry.objects.get().status == Status.DONE
    assert len(webhook.received) == 1
