"""The send pipeline: limits, authorization, idempotency, seq allocation, failure isolation."""
import threading
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from accounts.models import User
from chat import events
from tests.conftest import nothing_published
from chat.services import send as sending
from core.errors import (
    AccessDenied,
    IdempotencyMismatch,
    RateLimited,
    StoreUnavailable,
    ValidationFailed,
)
from chat.models import Ban, Conversation, IdempotencyKey, Participant
from chat.store import StoreError, get_message_store
from notifications.models import OutboxEntry


@pytest.fixture
def pair(make_user, make_group):
    alice, bob = make_user("alice"), make_user("bob")
    return alice, bob, make_group(alice, bob)


def send(sender, conversation, **body):
    body.setdefault("content", "hello")
    return sending.message_send(sending.SendRequest(sender=sender, conversation_id=conversation.id, **body))


@pytest.mark.django_db
class TestSend:
    @pytest.mark.django_db(transaction=True)  # its events go out on commit
    def test_member_send_persists_publishes_and_queues_a_notification(self, pair, published):
        alice, bob, conversation = pair
        result = send(alice, conversation, content="hi bob", metadata={"k": "v"})
        message = result.message
        assert (message.seq, message.content, message.sender_id, result.replayed) == (1, "hi bob", alice.pk, False)
        assert get_message_store().get(conversation.id, 1) == message
        assert published == [{"type": "message.new", "message": message.as_dict()}]
        assert OutboxEntry.objects.filter(message_id=message.message_id, seq=1).count() == 1
        conversation.refresh_from_db()
        assert conversation.last_seq == 1

    def test_seqs_increase_by_one(self, pair, published):
        alice, bob, conversation = pair
        seqs = [send(sender, conversation).message.seq for sender in (alice, bob, alice, bob)]
        assert seqs == [1, 2, 3, 4]

    def test_sender_has_read_own_message(self, pair, published):
        alice, bob, conversation = pair
        send(alice, conversation)
        assert Participant.objects.get(conversation=conversation, user=alice).last_read_seq == 1
        assert Participant.objects.get(conversation=conversation, user=bob).last_read_seq == 0

    def test_non_member_is_denied_and_counted(self, pair, make_user, published):
        from chat import metrics

        before = metrics.message_send_unauthorized._value.get()
        with pytest.raises(AccessDenied):
            send(make_user("mallory"), pair[2])
        assert metrics.message_send_unauthorized._value.get() == before + 1
        assert published == []

    def test_unknown_conversation_is_the_same_denial(self, pair, published):
        with pytest.raises(AccessDenied):
            sending.message_send(sending.SendRequest(sender=pair[0], conversation_id=uuid.uuid4(), content="x"))

    def test_banned_participant_is_denied(self, pair, published):
        alice, bob, conversation = pair
        Ban.objects.create(conversation=conversation, user=bob)
        with pytest.raises(AccessDenied):
            send(bob, conversation)

    def test_inactive_user_is_denied(self, pair, published):
        alice, bob, conversation = pair
        bob.is_active = False
        bob.save()
        with pytest.raises(AccessDenied):
            send(bob, conversation)

    def test_a_stale_user_object_of_a_deactivated_account_is_denied(self, pair, published):
        # A socket keeps the User it authenticated with; the account may be deactivated since.
        alice, bob, conversation = pair
        User.objects.filter(pk=bob.pk).update(is_active=False)
        assert bob.is_active
        with pytest.raises(AccessDenied):
            send(bob, conversation)
        assert published == []

    def test_a_removed_participant_is_denied(self, pair, published):
        alice, bob, conversation = pair
        Participant.objects.filter(conversation=conversation, user=bob).delete()
        with pytest.raises(AccessDenied):
            send(bob, conversation)
        assert published == []


@pytest.mark.django_db
class TestLimits:
    @pytest.mark.parametrize(
        "body, field",
        [
            ({"content": "a" * 10_000}, None),
            ({"content": "a" * 10_001}, "content"),
            ({"content": "é" * 5_000}, None),  # 10,000 bytes in UTF-8
            ({"content": "é" * 5_000 + "a"}, "content"),
            ({"content": "€" * 3_334}, "content"),  # 10,002 bytes, under 10,000 characters
            ({"content": "x" * (10 * 1024 * 1024), "message_type": "file"}, None),
            ({"content": "x" * (10 * 1024 * 1024 + 1), "message_type": "image"}, "content"),
            ({"content": ""}, "content"),
            ({"content": None}, "content"),
            ({"content": 5}, "content"),
            ({"content": "x", "message_type": "sticker"}, "message_type"),
            ({"content": "x", "is_encrypted": "yes"}, "is_encrypted"),
            ({"content": "x", "metadata": ["not", "an", "object"]}, "metadata"),
            ({"content": "x", "metadata": {"k": "v" * (16 * 1024 - 8)}}, None),  # exactly 16 KiB serialized
            ({"content": "x", "metadata": {"k": "v" * (16 * 1024 - 7)}}, "metadata"),
            # JSON lets these through; no store can keep them
            ({"content": "\ud800"}, "content"),
            ({"content": "\ud800" * 3000}, "content"),
            ({"content": "a\x00b"}, "content"),
            ({"content": "x", "metadata": {"k": "\udfff"}}, "metadata"),
        ],
    )
    def test_body_limits(self, pair, published, body, field):
        alice, _, conversation = pair
        if field is None:
            assert send(alice, conversation, **body).message.seq == 1
        else:
            with pytest.raises(ValidationFailed) as error:
                send(alice, conversation, **body)
            assert list(error.value.detail) == [field]
            assert published == []

    @pytest.mark.parametrize(
        "key, valid",
        [("k", True), ("k" * 255, True), (" ~printable~ ", True), ("", False), ("k" * 256, False), ("tab\t", False), ("é", False)],
    )
    def test_idempotency_key_format(self, pair, published, key, valid):
        alice, _, conversation = pair
        if valid:
            assert send(alice, conversation, idempotency_key=key).message.seq == 1
        else:
            with pytest.raises(ValidationFailed) as error:
                send(alice, conversation, idempotency_key=key)
            assert list(error.value.detail) == ["Idempotency-Key"]

    def test_rate_limit(self, pair, published, settings):
        settings.CHAT_SEND_RATE = "3/min"
        alice, bob, conversation = pair
        for _ in range(3):
            send(alice, conversation)
        with pytest.raises(RateLimited) as error:
            send(alice, conversation)
        assert 0 < error.value.retry_after <= 60
        assert send(bob, conversation).message.seq == 4  # per user


@pytest.mark.django_db
class TestIdempotency:
    @pytest.mark.django_db(transaction=True)  # its events go out on commit
    def test_same_key_same_body_replays(self, pair, published):
        alice, _, conversation = pair
        first = send(alice, conversation, idempotency_key="k1")
        again = send(alice, conversation, idempotency_key="k1")
        assert again.replayed and again.message == first.message
        assert len(published) == 1
        assert Conversation.objects.get(pk=conversation.pk).last_seq == 1

    def test_same_key_other_body_is_refused(self, pair, published):
        alice, _, conversation = pair
        send(alice, conversation, idempotency_key="k1")
        with pytest.raises(IdempotencyMismatch):
            send(alice, conversation, idempotency_key="k1", content="changed")

    def test_keys_are_per_sender(self, pair, published):
        alice, bob, conversation = pair
        assert send(alice, conversation, idempotency_key="k1").message.seq == 1
        assert send(bob, conversation, idempotency_key="k1").message.seq == 2

    def test_the_record_commits_with_the_message_and_names_it(self, pair, published):
        alice, _, conversation = pair
        sent = send(alice, conversation, idempotency_key="k1").message
        record = IdempotencyKey.objects.get(sender_id=alice.pk, key="k1")
        assert (record.conversation_id, record.seq, record.message_id) == (conversation.id, 1, sent.message_id)

    def test_a_key_past_its_lifetime_is_a_new_send(self, pair, published):
        alice, _, conversation = pair
        first = send(alice, conversation, idempotency_key="k1").message
        IdempotencyKey.objects.update(created_at=timezone.now() - sending.IDEMPOTENCY_TTL - timedelta(seconds=1))
        second = send(alice, conversation, idempotency_key="k1")
        assert not second.replayed and second.message.seq == first.seq + 1
        assert IdempotencyKey.objects.get(sender_id=alice.pk, key="k1").message_id == second.message.message_id

    def test_purge_deletes_expired_records_only(self, pair, published):
        alice, _, conversation = pair
        send(alice, conversation, idempotency_key="old")
        send(alice, conversation, idempotency_key="fresh")
        IdempotencyKey.objects.filter(key="old").update(created_at=timezone.now() - sending.IDEMPOTENCY_TTL - timedelta(seconds=1))
        assert sending.idempotency_keys_purge() == 1
        assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["fresh"]


@pytest.mark.django_db
class TestFailureIsolation:
    def test_store_down_fails_with_503_and_nothing_leaks(self, pair, published, monkeypatch):
        alice, _, conversation = pair
        store = get_message_store()

        def broken(*args, **kwargs):
            raise StoreError("store down")

        monkeypatch.setattr(store, "insert", broken)
        with pytest.raises(StoreUnavailable):
            send(alice, conversation, idempotency_key="retry-me")
        assert published == []
        assert OutboxEntry.objects.count() == 0
        assert Conversation.objects.get(pk=conversation.pk).last_seq == 0  # no seq burned
        monkeypatch.undo()
        # The failed attempt left no record: the retry goes through.
        assert send(alice, conversation, idempotency_key="retry-me").message.seq == 1

    def test_publish_failure_does_not_fail_the_send(self, pair, monkeypatch):
        alice, _, conversation = pair

        async def layer_down(*args, **kwargs):
            raise ConnectionError("layer down")

        from channels.layers import get_channel_layer

        monkeypatch.setattr(get_channel_layer(), "group_send", layer_down)
        result = send(alice, conversation)
        assert get_message_store().get(conversation.id, result.message.seq) == result.message

    @pytest.mark.django_db(transaction=True)  # its events go out on commit
    def test_notification_failure_does_not_fail_the_send(self, pair, published, monkeypatch):
        alice, _, conversation = pair

        def broken(**kwargs):
            raise RuntimeError("outbox down")

        monkeypatch.setattr("notifications.services.notification_enqueue", broken)
        assert send(alice, conversation).message.seq == 1
        assert len(published) == 1


@pytest.mark.django_db(transaction=True)
def test_concurrent_senders_get_distinct_consecutive_seqs(make_user, make_group, monkeypatch):
    monkeypatch.setattr(events, "_apublish_to", nothing_published)
    senders = [make_user() for _ in range(4)]
    conversation = make_group(senders[0], *senders[1:])
    seqs, errors = [], []

    def worker(user):
        try:
            for _ in range(10):
                seqs.append(sending.message_send(sending.SendRequest(sender=user, conversation_id=conversation.id, content="x")).message.seq)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(user,)) for user in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(seqs) == list(range(1, 41))
    stored = get_message_store().history(conversation.id, after_seq=0, limit=100).messages
    assert [m.seq for m in stored] == list(range(1, 41))

