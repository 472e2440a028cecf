"""Attacks on push notifications (issue 13, SPEC section 7), replayed.

Network rule: nothing here leaves loopback. Names resolve through the fake DNS of
tests/notifications/conftest.py (no DNS server is asked), "public" names resolve to an address
that is never connected to, and the outbound module's connections are recorded and limited to
loopback, so a refusal is shown by the absence of a connection.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import time
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from django.utils import timezone

from chat.services import conversations, send as sending
from notifications import outbound
from notifications.models import Delivery, Device
from notifications.services import device_register
from tests.notifications.conftest import PUBLIC_IP
from tests.notifications.receiver import Receiver, unused_port

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.notifications.urls")]
DEVICES = "/api/v1/push/devices/"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def subscription(endpoint: str) -> dict:
    point = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return {"kind": "webpush", "endpoint": endpoint, "keys": {"p256dh": b64url(point), "auth": b64url(os.urandom(16))}}


def subscribe(user, endpoint: str) -> Device:
    body = subscription(endpoint)
    return device_register(user=user, kind="webpush", endpoint=endpoint, **body["keys"])[0]


def send(sender, conversation, content="hello"):
    return sending.message_send(sending.SendRequest(sender=sender, conversation_id=conversation.pk, content=content))


@pytest.fixture
def webpush(settings):
    """The Web Push backend with a throwaway VAPID key; strict endpoint rules (production)."""
    from py_vapid import Vapid02

    key = Vapid02()
    key.generate_keys()
    settings.CHAT_PUSH_BACKEND = "webpush"
    settings.CHAT_VAPID_PRIVATE_KEY = b64url(key.private_key.private_numbers().private_value.to_bytes(32, "big"))
    settings.CHAT_VAPID_SUBJECT = "mailto:ops@example.com"


@pytest.fixture
def dev_webpush(settings, webpush):
    """CHAT_WEBPUSH_ALLOW_HTTP: plain http and loopback, for push-service stand-ins on loopback."""
    settings.CHAT_WEBPUSH_ALLOW_HTTP = True


# ---------------------------------------------------------------- item 1: SSRF at registration


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://169.254.169.254/latest/meta-data/",  # cloud metadata
        "https://10.0.0.5/push",
        "https://172.16.0.1/push",
        "https://192.168.1.1/push",
        "https://100.64.0.1/push",  # carrier-grade NAT
        "https://127.0.0.1/push",
        "https://localhost/push",
        "https://[::1]/push",
        "https://[::ffff:127.0.0.1]/push",  # IPv4-mapped IPv6
        "https://[::ffff:a9fe:a9fe]/push",  # 169.254.169.254, mapped
        "https://[64:ff9b::a9fe:a9fe]/push",  # 169.254.169.254 through NAT64
        "https://[2002:a9fe:a9fe::1]/push",  # 169.254.169.254 through 6to4
        "https://[fe80::1]/push",
        "https://[fc00::1]/push",
        "https://0.0.0.0/push",
        "https://224.0.0.1/push",
        "https://240.0.0.1/push",
        "https://192.0.2.10/push",  # documentation (reserved)
        "https://2130706433/push",  # 127.0.0.1 in decimal
        "https://0x7f000001/push",  # ... in hex
        "https://0177.0.0.1/push",  # ... in octal
        "https://127.1/push",  # ... shortened
        "https://user:pass@push.example.net/push",
        "https://push.example.net@169.254.169.254/push",
        "https://push.example.net:8443/push",  # only 443
        "https://push.example.net:22/push",
        "http://push.example.net/push",
        "https://internal.example.net/push",  # resolves to a public and a private address
        "https://metadata.example.net/push",  # a public-looking name for the metadata service
        "https://no-such-host.invalid/push",
        "https:///push",
        "https://[fe80::1%25eth0]/push",
    ],
)
def test_internal_or_malformed_endpoints_are_refused_at_registration(endpoint, fake_dns, make_user, client_for):
    fake_dns.names["localhost"] = ["127.0.0.1", "::1"]
    fake_dns.names["internal.example.net"] = [PUBLIC_IP, "10.1.2.3"]
    fake_dns.names["metadata.example.net"] = ["169.254.169.254"]

    response = client_for(make_user()).post(DEVICES, subscription(endpoint), format="json")

    assert response.status_code == 400, response.data
    assert list(response.data) == ["endpoint"]
    assert not Device.objects.exists()
    assert fake_dns.connections == []


def test_a_public_push_service_is_accepted(fake_dns, make_user, client_for):
    response = client_for(make_user()).post(DEVICES, subscription("https://push.example.net/send/abc"), format="json")
    assert response.status_code == 201
    assert fake_dns.lookups == ["push.example.net"] and fake_dns.connections == []


def test_allowed_hosts_narrow_endpoints_to_the_known_push_services(settings, fake_dns, make_user, client_for):
    settings.CHAT_PUSH_ALLOWED_HOSTS = ["fcm.googleapis.com", "*.notify.windows.com"]
    for name in ("fcm.googleapis.com", "notify.windows.com", "wns2-by3p.notify.windows.com", "fcm.googleapis.com.evil.example.net"):
        fake_dns.names[name] = [PUBLIC_IP]
    api = client_for(make_user())

    def status(endpoint: str) -> int:
        return api.post(DEVICES, subscription(endpoint), format="json").status_code

    assert status("https://fcm.googleapis.com/fcm/send/x") == 201
    assert status("https://wns2-by3p.notify.windows.com/w/?token=x") == 201
    assert status("https://notify.windows.com/w/") == 400  # `*.` means subdomains only
    assert status("https://fcm.googleapis.com.evil.example.net/x") == 400
    assert status("https://push.example.net/x") == 400
    assert status(f"https://{PUBLIC_IP}/x") == 400


# ---------------------------------------------------------- item 1: SSRF before each attempt


def test_a_name_that_turns_internal_after_registration_is_not_connected_to(
    webpush, fake_dns, make_user, make_group, make_worker
):
    alice, bob = make_user(), make_user()
    device = subscribe(bob, "https://rebind.example.net/push/1")  # public at registration
    fake_dns.names["rebind.example.net"] = ["127.0.0.1"]  # ...internal at delivery time
    send(alice, make_group(alice, bob))

    make_worker().run(once=True)

    assert fake_dns.connections == []
    delivery = Delivery.objects.get()
    assert delivery.status == "pending" and delivery.last_error.startswith("endpoint refused:")
    assert "127.0.0.1" not in delivery.last_error
    assert Device.objects.filter(pk=device.pk).exists()  # no 404/410 oracle: nothing was asked


def test_the_connection_goes_to_the_address_that_was_checked(dev_webpush, fake_dns, make_user, make_group, make_worker):
    """DNS rebinding: the name answers a checked address for the check, then another one. The
    request goes to the checked one, under the original Host name."""
    checked = Receiver("127.0.0.1").start()
    other = Receiver("127.0.0.2", checked.port).start()
    try:
        alice, bob = make_user(), make_user()
        subscribe(bob, f"http://pinned.example.net:{checked.port}/push/1")
        answers = iter([["127.0.0.1"]])
        fake_dns.names["pinned.example.net"] = lambda: next(answers, ["127.0.0.2"])
        fake_dns.lookups.clear()
        send(alice, make_group(alice, bob))

        make_worker().run(once=True)

        [request] = checked.received
        assert request.headers["host"] == f"pinned.example.net:{checked.port}"
        assert other.received == []
        assert fake_dns.lookups == ["pinned.example.net"]
        assert Delivery.objects.get().status == "done"
    finally:
        checked.stop()
        other.stop()


def test_a_redirect_is_not_followed_and_bodies_are_not_kept(
    dev_webpush, receiver, fake_dns, make_user, make_group, make_worker, caplog
):
    internal = Receiver().start()
    try:
        alice, bob = make_user(), make_user()
        subscribe(bob, receiver.url + "/push/1")
        receiver.status = 307
        receiver.headers = {"Location": internal.url + "/admin/delete-everything"}
        receiver.body = b"SECRET-INTERNAL-DATA"
        send(alice, make_group(alice, bob))

        with caplog.at_level(logging.DEBUG):
            make_worker().run(once=True)

        assert len(receiver.received) == 1 and internal.received == []
        delivery = Delivery.objects.get()
        assert delivery.last_error == "push service answered HTTP 307; redirects are not followed"
        assert "SECRET" not in caplog.text
    finally:
        internal.stop()


def test_an_error_body_is_neither_stored_nor_logged(dev_webpush, receiver, make_user, make_group, make_worker, caplog):
    alice, bob = make_user(), make_user()
    subscribe(bob, receiver.url + "/push/1")
    receiver.status = 500
    receiver.body = b"SECRET-INTERNAL-DATA"
    send(alice, make_group(alice, bob))

    with caplog.at_level(logging.DEBUG):
        make_worker().run(once=True)

    assert Delivery.objects.get().last_error == "push service answered HTTP 500"
    assert "SECRET" not in caplog.text


def test_dev_mode_allows_loopback_but_still_not_private_or_link_local(settings, fake_dns, make_user, client_for):
    settings.CHAT_WEBPUSH_ALLOW_HTTP = True
    api = client_for(make_user())
    assert api.post(DEVICES, subscription("http://127.0.0.1:8080/push"), format="json").status_code == 201
    for endpoint in ("http://169.254.169.254/latest", "http://10.0.0.1:8080/push", "http://user:pw@127.0.0.1/x"):
        assert api.post(DEVICES, subscription(endpoint), format="json").status_code == 400, endpoint
    assert fake_dns.connections == []


def test_the_webhook_keeps_no_body_and_follows_no_redirect(webhook, make_user, make_group, make_device, make_worker, caplog):
    internal = Receiver().start()
    try:
        alice, bob = make_user(), make_user()
        make_device(bob)
        webhook.status = 302
        webhook.headers = {"Location": internal.url + "/hook"}
        webhook.body = b"SECRET-INTERNAL-DATA"
        send(alice, make_group(alice, bob))
        with caplog.at_level(logging.DEBUG):
            make_worker().run(once=True)
        assert internal.received == []
        assert Delivery.objects.get().last_error == "webhook answered HTTP 302; redirects are not followed"

        webhook.status = 500
        Delivery.objects.update(next_attempt_at=timezone.now())
        with caplog.at_level(logging.DEBUG):
            make_worker().run(once=True)
        assert Delivery.objects.get().last_error == "webhook answered HTTP 500"
        assert "SECRET" not in caplog.text
    finally:
        internal.stop()


# ------------------------------------------------------------ item 3: banned users get nothing


def test_a_banned_member_gets_no_push(webhook, make_user, make_group, make_device, make_worker):
    owner, banned, member = make_user(), make_user(), make_user()
    conversation = make_group(owner, banned, member)
    make_device(banned, token="banned-phone")
    make_device(member, token="member-phone")
    conversations.ban_create(actor=owner, conversation=conversation, user=banned)
    send(owner, conversation, "for members only")

    make_worker().run(once=True)

    assert [json.loads(r.body)["device"]["token"] for r in webhook.received] == ["member-phone"]
    assert not any(b"for members only" in r.body and b"banned-phone" in r.body for r in webhook.received)


# ---------------------------------------------------------------------- item 4: worker stalls


class BlackHole:
    """Accepts connections and never answers; with `drip`, sends one byte every `drip` seconds
    (forever as far as a client is concerned: never a full response)."""

    def __init__(self, drip: float | None = None, lifetime: float = 8.0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.drip = drip
        self.lifetime = lifetime
        self.closed = threading.Event()
        self.clients: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        ends = time.monotonic() + self.lifetime
        while not self.closed.is_set() and time.monotonic() < ends:
            try:
                client, _ = self.sock.accept()
                self.clients.append(client)
            except OSError:
                pass
            if self.drip:
                for client in self.clients:
                    try:
                        client.send(b"H")
                    except OSError:
                        pass
                self.closed.wait(self.drip)

    def stop(self) -> None:
        self.closed.set()
        for client in self.clients:
            client.close()
        self.sock.close()


def test_unresponsive_endpoints_do_not_hold_up_an_honest_push(
    dev_webpush, settings, receiver, fake_dns, make_user, make_group, make_worker
):
    settings.CHAT_NOTIFICATION_TIMEOUT = 2.0
    # Four hosts (127.0.0.2-5): two never answer, two drip a byte every 0.3 s.
    holes = [BlackHole(host=f"127.0.0.{n}", drip=0.3 if n > 3 else None) for n in (2, 3, 4, 5)]
    try:
        alice, bob = make_user(), make_user()
        for hole in holes:
            subscribe(bob, f"http://{hole.host}:{hole.port}/push")
        subscribe(bob, f"{receiver.url}/push")
        send(alice, make_group(alice, bob))
        worker = make_worker()

        started = time.monotonic()
        worker.run_once()
        elapsed = time.monotonic() - started

        [arrived] = receiver.received
        # Sequential, it came after 4 x 2 s (and the drips never time out a read at all).
        assert arrived.at - started < 1.5, arrived.at - started
        # Each attempt was cut at its 2 s deadline, the drips too; the round took one deadline.
        assert elapsed < 2.0 + 1.5, elapsed
        statuses = sorted(Delivery.objects.values_list("status", "last_error"))
        assert statuses == [("done", "")] + [("pending", "push service unreachable: deadline exceeded")] * 4
    finally:
        for hole in holes:
            hole.stop()


def test_a_slow_drip_cannot_hold_an_attempt_past_its_deadline(fake_dns):
    hole = BlackHole(drip=0.2)
    try:
        target = outbound.check_url(
            f"http://127.0.0.1:{hole.port}/", policy=outbound.Policy(schemes=("http",), ports=None, public_only=False)
        )
        started = time.monotonic()
        with pytest.raises(outbound.DeadlineExceeded):
            outbound.post(target, body=b"{}", headers={}, deadline=started + 1.0)
        assert time.monotonic() - started < 1.5
    finally:
        hole.stop()


def test_a_failing_host_is_left_alone_without_using_up_attempts(
    dev_webpush, settings, receiver, fake_dns, make_user, make_group, make_worker
):
    settings.CHAT_NOTIFICATION_BREAKER_THRESHOLD = 2
    settings.CHAT_NOTIFICATION_BREAKER_COOLDOWN = 60.0
    settings.CHAT_NOTIFICATION_PER_HOST_CONCURRENCY = 1
    dead_port = unused_port()
    fake_dns.names["down.example.net"] = ["127.0.0.1"]
    fake_dns.names["up.example.net"] = ["127.0.0.1"]
    alice, bob = make_user(), make_user()
    for index in range(4):
        subscribe(bob, f"http://down.example.net:{dead_port}/push/{index}")
    subscribe(bob, f"http://up.example.net:{receiver.port}/push")
    send(alice, make_group(alice, bob))

    make_worker().run_once()

    assert len(receiver.received) == 1
    down = list(Delivery.objects.filter(device__endpoint__contains="down.").values_list("attempts", "next_attempt_at"))
    tried = [attempts for attempts, _ in down if attempts == 1]
    deferred = [at for attempts, at in down if attempts == 0]
    assert (len(tried), len(deferred)) == (2, 2)  # two failures opened the breaker
    for at in deferred:  # due again after the cool-down, not at once
        assert timedelta(seconds=50) < at - timezone.now() <= timedelta(seconds=61)
    assert [c for c in fake_dns.connections if c[1] == dead_port] == [("127.0.0.1", dead_port)] * 2


def test_at_most_the_per_host_limit_is_in_flight_to_one_host(
    dev_webpush, settings, receiver, fake_dns, make_user, make_group, make_worker
):
    settings.CHAT_NOTIFICATION_PER_HOST_CONCURRENCY = 2
    receiver.delay = 0.3
    fake_dns.names["busy.example.net"] = ["127.0.0.1"]
    alice, bob = make_user(), make_user()
    for index in range(6):
        subscribe(bob, f"http://busy.example.net:{receiver.port}/push/{index}")
    send(alice, make_group(alice, bob))

    make_worker().run_once()

    arrivals = sorted(request.at for request in receiver.received)
    assert len(arrivals) == 6
    # Never three within one answer's delay of each other: two at a time, three waves.
    assert all(arrivals[i + 2] - arrivals[i] >= 0.25 for i in range(4)), arrivals


# --------------------------------------------------------------- item 17: device takeover


@pytest.mark.parametrize("kind", ["webpush", "fcm"])
def test_another_user_cannot_take_over_a_device(
    kind, webhook, make_user, make_group, make_worker, client_for
):
    alice, mallory, carol = make_user(), make_user(), make_user()
    body = subscription("https://push.example.net/send/alices") if kind == "webpush" else {"kind": "fcm", "token": "alices"}
    assert client_for(alice).post(DEVICES, body, format="json").status_code == 201
    stolen = {**body}
    if kind == "webpush":
        stolen["keys"] = subscription("https://x.example.net/")["keys"]  # keys of the attacker's own

    response = client_for(mallory).post(DEVICES, stolen, format="json")

    field = "endpoint" if kind == "webpush" else "token"
    assert response.status_code == 400
    assert list(response.data) == [field]
    assert str(alice.pk) not in json.dumps(response.data) and alice.username not in json.dumps(response.data)
    device = Device.objects.get()
    assert device.user == alice and device.p256dh == body.get("keys", {}).get("p256dh", "")

    send(carol, make_group(carol, alice, mallory))
    make_worker().run(once=True)
    [request] = webhook.received
    assert json.loads(request.body)["recipient_id"] == str(alice.pk)

    # Alice unregisters it (signing out of a shared browser): now it may be registered again.
    client_for(alice).delete(f"{DEVICES}{device.pk}/")
    assert client_for(mallory).post(DEVICES, stolen, format="json").status_code == 201
