"""Device registration over REST."""
import base64
import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02
from rest_framework.test import APIClient

from notifications.backends.webpush import vapid_public_key
from notifications.models import Device

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.notifications.urls")]
DEVICES = "/api/v1/push/devices/"
# The uncompressed-point prefix, but (0, 0) is not a point of P-256.
NOT_ON_THE_CURVE = base64.urlsafe_b64encode(b"\x04" + bytes(64)).rstrip(b"=").decode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def subscription(endpoint: str = "https://push.example.net/send/abc123") -> dict:
    """A browser's PushSubscription.toJSON(), as a client posts it."""
    point = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return {"kind": "webpush", "endpoint": endpoint, "keys": {"p256dh": b64url(point), "auth": b64url(os.urandom(16))}}


def test_register_list_and_delete_your_devices(make_user, client_for):
    alice, bob = make_user(), make_user()
    api = client_for(alice)

    created = api.post(DEVICES, {**subscription(), "name": "laptop"}, format="json")
    token = api.post(DEVICES, {"kind": "apns", "token": "a" * 64, "name": "phone"}, format="json")
    client_for(bob).post(DEVICES, {"kind": "fcm", "token": "bobs"}, format="json")

    assert created.status_code == 201 and token.status_code == 201
    assert set(created.data) == {"id", "kind", "name", "endpoint", "token", "created_at", "updated_at"}
    listed = api.get(DEVICES)
    assert listed.status_code == 200
    assert [(d["kind"], d["name"]) for d in listed.data["results"]] == [("webpush", "laptop"), ("apns", "phone")]

    assert api.delete(f"{DEVICES}{created.data['id']}/").status_code == 204
    assert [d["kind"] for d in api.get(DEVICES).data["results"]] == ["apns"]


def test_registering_the_same_subscription_again_updates_it(make_user, client_for):
    alice = make_user()
    api = client_for(alice)
    body = subscription()
    first = api.post(DEVICES, {**body, "name": "old"}, format="json")
    body["keys"] = subscription()["keys"]  # the browser rotated its keys
    again = api.post(DEVICES, {**body, "name": "new"}, format="json")

    assert (first.status_code, again.status_code) == (201, 200)
    assert again.data["id"] == first.data["id"] and again.data["name"] == "new"
    device = Device.objects.get()
    assert device.p256dh == body["keys"]["p256dh"]


def test_a_subscription_registered_by_another_user_stays_with_its_owner(make_user, client_for):
    # It used to move to the caller: anyone who learnt an endpoint or token took the device and the
    # owner's notifications with it (issue 13, item 17). Now the owner has to unregister it first.
    alice, bob = make_user(), make_user()
    body = subscription()
    client_for(alice).post(DEVICES, body, format="json")

    response = client_for(bob).post(DEVICES, body, format="json")

    assert response.status_code == 400 and "endpoint" in response.data
    assert Device.objects.get().user == alice
    assert len(client_for(alice).get(DEVICES).data["results"]) == 1


def test_you_cannot_delete_someone_elses_device(make_user, client_for):
    alice, bob = make_user(), make_user()
    device = client_for(bob).post(DEVICES, {"kind": "fcm", "token": "t"}, format="json").data

    response = client_for(alice).delete(f"{DEVICES}{device['id']}/")

    assert response.status_code == 404
    assert Device.objects.filter(pk=device["id"]).exists()


@pytest.mark.parametrize(
    "body, field",
    [
        ({"kind": "fcm"}, "token"),
        ({"kind": "pager", "token": "t"}, "kind"),
        ({**subscription("http://push.example.net/x")}, "endpoint"),
        ({**subscription("not a url")}, "endpoint"),
        ({**subscription(), "keys": {"p256dh": NOT_ON_THE_CURVE, "auth": b64url(os.urandom(16))}}, "keys.p256dh"),
        ({**subscription(), "keys": {"p256dh": subscription()["keys"]["p256dh"], "auth": "c2hvcnQ"}}, "keys.auth"),
        ({**subscription(), "token": "t"}, "token"),
        ({"kind": "fcm", "token": "t", "endpoint": "https://x.example/"}, "endpoint"),
    ],
)
def test_invalid_registrations_are_refused_with_field_errors(make_user, client_for, body, field):
    response = client_for(make_user()).post(DEVICES, body, format="json")
    assert response.status_code == 400
    assert field in response.data
    assert not Device.objects.exists()


def test_plain_http_endpoints_only_when_allowed(make_user, client_for, settings):
    settings.CHAT_WEBPUSH_ALLOW_HTTP = True
    response = client_for(make_user()).post(DEVICES, subscription("http://127.0.0.1:8080/push"), format="json")
    assert response.status_code == 201


def test_devices_per_user_are_capped(make_user, client_for, settings):
    settings.CHAT_MAX_DEVICES_PER_USER = 2
    api = client_for(make_user())
    statuses = [api.post(DEVICES, {"kind": "fcm", "token": f"t{i}"}, format="json").status_code for i in range(3)]
    assert statuses == [201, 201, 400]
    # Re-registering one you have is not a new device.
    assert api.post(DEVICES, {"kind": "fcm", "token": "t0"}, format="json").status_code == 200


def test_unauthenticated_requests_are_refused(make_user):
    api = APIClient()
    assert api.get(DEVICES).status_code == 401
    assert api.post(DEVICES, {"kind": "fcm", "token": "t"}, format="json").status_code == 401


def test_the_vapid_public_key_is_published_when_web_push_is_configured(make_user, client_for, settings):
    api = client_for(make_user())
    assert api.get("/api/v1/push/vapid-public-key/").status_code == 404

    vapid = Vapid02()
    vapid.generate_keys()
    settings.CHAT_VAPID_PRIVATE_KEY = vapid.private_pem().decode()
    response = api.get("/api/v1/push/vapid-public-key/")

    point = vapid.public_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    assert response.status_code == 200
    assert response.data == {"public_key": b64url(point)}
    assert vapid_public_key(vapid.private_pem().decode()) == b64url(point)
