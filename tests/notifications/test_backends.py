"""Each backend against a real local HTTP server: what arrives there, and that it is authentic."""
import base64
import hashlib
import hmac
import json
import logging
import os

import http_ece
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from py_vapid import Vapid02
from py_vapid import jwt as vapid_jwt

from chat.services import conversations, send as sending
from notifications import conf
from notifications.backends import get_backend
from notifications.backends.webpush import vapid_public_key
from notifications.models import Delivery, Device
from notifications.services import device_register
from tests.notifications.conftest import WEBHOOK_SECRET, sample

pytestmark = pytest.mark.django_db


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def send(sender, conversation, **fields):
    fields.setdefault("content", "see you at 6")
    return sending.message_send(sending.SendRequest(sender=sender, conversation_id=conversation.pk, **fields)).message


class TestWebhook:
    def test_the_body_is_signed_and_carries_the_notification(
        self, webhook, make_user, make_group, make_device, make_worker
    ):
        alice, bob = make_user("alice"), make_user("bob")
        device = make_device(bob, token="bob-token")
        message = send(alice, make_group(alice, bob, title="climbing"))

        make_worker().run(once=True)

        [request] = webhook.received
        expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), request.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(request.headers["x-chat-signature"], expected)
        assert request.path == "/hook" and request.headers["content-type"] == "application/json"
        body = json.loads(request.body)
        delivery = Delivery.objects.get()
        assert request.headers["x-chat-delivery"] == body["delivery_id"] == str(delivery.pk)
        assert body["attempt"] == 1 and body["recipient_id"] == str(bob.pk)
        assert body["device"] == {"id": str(device.pk), "kind": "fcm", "token": "bob-token"}
        assert body["notification"] == {
            "type": "message.new",
            "title": "climbing",
            "body": "alice: see you at 6",
            "conversation_id": str(message.conversation_id),
            "message_id": str(message.message_id),
            "seq": message.seq,
            "reply_to": None,
            "sender_id": str(alice.pk),
            "sender_name": "alice",
            "message_type": "text",
            "is_encrypted": False,
            "sent_at": message.sent_at.isoformat().replace("+00:00", "Z"),
            "attachments": [],
            "attachment_count": 0,
        }

    def test_a_tampered_body_does_not_verify(self, webhook, make_user, make_group, make_device, make_worker):
        alice, bob = make_user(), make_user()
        make_device(bob)
        send(alice, make_group(alice, bob))
        make_worker().run(once=True)
        [request] = webhook.received
        tampered = request.body.replace(b"see you at 6", b"see you at 7")
        forged = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), tampered, hashlib.sha256).hexdigest()
        assert request.headers["x-chat-signature"] != forged

    def test_an_encrypted_message_is_announced_without_its_content(
        self, webhook, make_user, make_device, make_worker
    ):
        alice, bob = make_user("alice"), make_user("bob")
        make_device(bob)
        direct, _ = conversations.conversation_create(creator=alice, kind="direct", participant_ids=[bob.pk])
        send(alice, direct, content="b64:c2VjcmV0LWNpcGhlcnRleHQ=", is_encrypted=True)

        make_worker().run(once=True)

        [request] = webhook.received
        assert b"c2VjcmV0LWNpcGhlcnRleHQ" not in request.body
        notification = json.loads(request.body)["notification"]
        assert (notification["title"], notification["body"]) == ("alice", "New message")
        assert notification["is_encrypted"] is True

    def test_long_text_is_cut_and_media_is_named(self, webhook, make_user, make_group, make_device, make_worker):
        alice, bob = make_user("alice"), make_user()
        make_device(bob)
        conversation = make_group(alice, bob, title="t")
        send(alice, conversation, content="x" * 5000)
        send(alice, conversation, content="aGVsbG8=", message_type="image")

        make_worker().run(once=True)

        bodies = sorted((json.loads(r.body)["notification"]["body"] for r in webhook.received), key=len)
        assert bodies == ["alice: Sent a photo", "alice: " + "x" * 139 + "…"]

    def test_the_worker_refuses_to_start_without_url_or_secret(self, settings):
        settings.CHAT_PUSH_BACKEND = "webhook"
        settings.CHAT_WEBHOOK_URL = "http://127.0.0.1:9/hook"
        with pytest.raises(ImproperlyConfigured, match="CHAT_WEBHOOK_SECRET"):
            get_backend(conf.load())
        settings.CHAT_WEBHOOK_SECRET = "s"
        settings.CHAT_WEBHOOK_URL = ""
        with pytest.raises(CommandError, match="CHAT_WEBHOOK_URL"):
            call_command("run_notifications", "--once")


@pytest.fixture
def vapid():
    key = Vapid02()
    key.generate_keys()
    return key


@pytest.fixture
def webpush(settings, receiver, vapid):
    settings.CHAT_PUSH_BACKEND = "webpush"
    raw = vapid.private_key.private_numbers().private_value.to_bytes(32, "big")
    settings.CHAT_VAPID_PRIVATE_KEY = b64url(raw)
    settings.CHAT_VAPID_SUBJECT = "mailto:ops@example.com"
    settings.CHAT_WEBPUSH_TTL = 600
    settings.CHAT_WEBPUSH_ALLOW_HTTP = True
    return receiver


class Subscriber:
    """What a browser holds: a P-256 key pair and an auth secret; it shares the public half."""

    def __init__(self) -> None:
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        self.auth_secret = os.urandom(16)
        point = self.private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        self.p256dh = b64url(point)
        self.auth = b64url(self.auth_secret)

    def decrypt(self, body: bytes) -> dict:
        return json.loads(
            http_ece.decrypt(body, private_key=self.private_key, auth_secret=self.auth_secret, version="aes128gcm")
        )


def subscribe(user, endpoint: str, subscriber: Subscriber) -> tuple[Device, bool]:
    return device_register(user=user, kind="webpush", endpoint=endpoint, p256dh=subscriber.p256dh, auth=subscriber.auth)


class TestWebPush:
    def test_the_push_service_receives_an_encrypted_vapid_signed_notification(
        self, webpush, vapid, make_user, make_group, make_device, make_worker
    ):
        alice, bob = make_user("alice"), make_user("bob")
        subscriber = Subscriber()
        subscribe(bob, webpush.url + "/push/sub-1", subscriber)
        make_device(bob, kind=Device.Kind.FCM)  # not reachable by Web Push: no delivery for it
        message = send(alice, make_group(alice, bob, title="climbing"))

        make_worker().run(once=True)

        [request] = webpush.received
        assert request.path == "/push/sub-1"
        assert request.headers["content-encoding"] == "aes128gcm"
        assert request.headers["ttl"] == "600"
        assert b"see you at 6" not in request.body
        payload = subscriber.decrypt(request.body)
        assert (payload["title"], payload["body"]) == ("climbing", "alice: see you at 6")
        assert (payload["message_id"], payload["seq"]) == (str(message.message_id), message.seq)

        scheme, params = request.headers["authorization"].split(" ", 1)
        fields = dict(part.split("=", 1) for part in params.split(","))
        assert scheme == "vapid"
        public_key = vapid_public_key(settings.CHAT_VAPID_PRIVATE_KEY)
        assert fields["k"] == public_key
        claims = vapid_jwt.decode(fields["t"], public_key)  # raises unless signed by our key
        assert claims["aud"] == webpush.url and claims["sub"] == "mailto:ops@example.com"
        assert Delivery.objects.get().status == "done"

    def test_another_subscriber_cannot_decrypt_it(self, webpush, make_user, make_group, make_worker):
        alice, bob = make_user(), make_user()
        subscriber = Subscriber()
        subscribe(bob, webpush.url + "/push/x", subscriber)
        send(alice, make_group(alice, bob))
        make_worker().run(once=True)
        [request] = webpush.received
        with pytest.raises(http_ece.ECEException):
            Subscriber().decrypt(request.body)

    def test_an_expired_subscription_is_removed_not_retried(self, webpush, make_user, make_group, make_worker):
        alice, bob = make_user(), make_user()
        subscriber = Subscriber()
        device, _ = subscribe(bob, webpush.url + "/push/gone", subscriber)
        send(alice, make_group(alice, bob))
        webpush.status = 410
        before = sample("chat_notification_skipped_total", reason="device_gone")

        make_worker().run(once=True)

        assert not Device.objects.filter(pk=device.pk).exists()
        assert not Delivery.objects.exists()
        assert sample("chat_notification_skipped_total", reason="device_gone") == before + 1

    def test_a_refusal_is_retried(self, webpush, make_user, make_group, make_worker):
        alice, bob = make_user(), make_user()
        subscriber = Subscriber()
        subscribe(bob, webpush.url + "/push/busy", subscriber)
        send(alice, make_group(alice, bob))
        webpush.status = 429

        make_worker().run(once=True)

        delivery = Delivery.objects.get()
        assert (delivery.status, delivery.attempts) == ("pending", 1)
        assert "429" in delivery.last_error

    def test_the_worker_refuses_to_start_without_a_vapid_key(self, settings):
        settings.CHAT_PUSH_BACKEND = "webpush"
        with pytest.raises(CommandError, match="CHAT_VAPID_PRIVATE_KEY"):
            call_command("run_notifications", "--once")


def test_the_log_backend_logs_ids_but_not_content(make_user, make_group, make_device, make_worker, caplog):
    alice, bob = make_user(), make_user()
    make_device(bob)
    send(alice, make_group(alice, bob), content="my secret plans")
    with caplog.at_level(logging.INFO, logger="notifications.push"):
        make_worker().run(once=True)
    delivery = Delivery.objects.get()
    assert delivery.status == "done"
    [line] = [record.getMessage() for record in caplog.records if record.name == "notifications.push"]
    assert f"delivery={delivery.pk}" in line and "secret" not in line


# A value that is no number at all never reaches a setting: tests/test_configuration.py covers that.
@pytest.mark.parametrize(
    "name, value, error",
    [
        ("CHAT_NOTIFICATION_LEASE_SECONDS", 2.0, "CHAT_NOTIFICATION_LEASE_SECONDS"),
        ("CHAT_NOTIFICATION_MAX_ATTEMPTS", 0, "CHAT_NOTIFICATION_MAX_ATTEMPTS"),
        ("CHAT_NOTIFICATION_BACKOFF_JITTER", 1.5, "CHAT_NOTIFICATION_BACKOFF_JITTER"),
        ("CHAT_NOTIFICATION_BATCH_SIZE", 0, "CHAT_NOTIFICATION_BATCH_SIZE"),
    ],
)
def test_bad_configuration_is_refused(settings, name, value, error):
    setattr(settings, name, value)
    with pytest.raises(ImproperlyConfigured, match=error):
        conf.load()


def test_an_unknown_backend_is_refused(settings):
    settings.CHAT_PUSH_BACKEND = "carrier-pigeon"
    with pytest.raises(ImproperlyConfigured, match="CHAT_PUSH_BACKEND"):
        conf.load()
