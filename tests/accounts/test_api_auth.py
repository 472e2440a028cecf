import pytest
from rest_framework.test import APIClient

from accounts.models import User

pytestmark = pytest.mark.django_db


def test_register_then_token_then_me():
    client = APIClient()
    response = client.post("/api/v1/auth/register/", {"username": "dora", "password": "long-enough-pass-42"}, format="json")
    assert response.status_code == 201
    assert set(response.data) == {"id", "username"} and response.data["username"] == "dora"
    token = client.post("/api/v1/auth/token/", {"username": "dora", "password": "long-enough-pass-42"}, format="json")
    assert token.status_code == 200
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.data['token']}")
    me = client.get("/api/v1/users/me/")
    assert me.status_code == 200 and me.data["id"] == response.data["id"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"username": "dora", "password": "123"}, "password"),
        ({"username": "", "password": "long-enough-pass-42"}, "username"),
        ({"username": "has space", "password": "long-enough-pass-42"}, "username"),
        ({"password": "long-enough-pass-42"}, "username"),
    ],
)
def test_register_rejects_bad_input_with_field_errors(body, field):
    response = APIClient().post("/api/v1/auth/register/", body, format="json")
    assert response.status_code == 400 and field in response.data


def test_register_duplicate_username(make_user):
    make_user("dora")
    response = APIClient().post("/api/v1/auth/register/", {"username": "dora", "password": "long-enough-pass-42"}, format="json")
    assert response.status_code == 400 and "username" in response.data


def test_registration_can_be_closed(settings):
    settings.CHAT_ALLOW_REGISTRATION = False
    response = APIClient().post("/api/v1/auth/register/", {"username": "x", "password": "long-enough-pass-42"}, format="json")
    assert response.status_code == 404


def test_wrong_password_gets_no_token(make_user):
    make_user("dora")
    response = APIClient().post("/api/v1/auth/token/", {"username": "dora", "password": "wrong"}, format="json")
    assert response.status_code == 400


@pytest.mark.parametrize(
    "method, path",
    [
        ("get", "/api/v1/users/me/"),
        ("get", "/api/v1/users/"),
        ("post", "/api/v1/auth/ws-ticket/"),
        ("get", "/api/v1/conversations/"),
        ("post", "/api/v1/conversations/"),
        ("post", "/api/v1/messages/"),
        ("get", "/api/v1/conversations/00000000-0000-0000-0000-000000000000/"),
        ("get", "/api/v1/conversations/00000000-0000-0000-0000-000000000000/messages/"),
        ("post", "/api/v1/conversations/00000000-0000-0000-0000-000000000000/read/"),
        ("get", "/api/v1/conversations/00000000-0000-0000-0000-000000000000/participants/"),
    ],
)
def test_unauthenticated_requests_get_401(method, path):
    response = getattr(APIClient(), method)(path)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"


def test_deactivated_users_token_stops_working(make_user, client_for):
    user = make_user()
    client = client_for(user)
    user.is_active = False
    user.save()
    assert client.get("/api/v1/users/me/").status_code == 401


def test_user_search_is_a_paginated_prefix_search(make_user, client_for):
    me = make_user("searcher")
    for name in ["anna", "annabel", "ann", "bob", "hanna"]:
        make_user(name)
    make_user("annette", is_active=False)
    response = client_for(me).get("/api/v1/users/", {"search": "ANN"})
    assert response.status_code == 200
    assert [u["username"] for u in response.data["results"]] == ["ann", "anna", "annabel"]
    assert response.data["count"] == 3


def test_ws_ticket(make_user, client_for):
    response = client_for(make_user()).post("/api/v1/auth/ws-ticket/")
    assert response.status_code == 201
    assert response.data["expires_in"] == 60 and len(response.data["ticket"]) >= 32


def test_ws_ticket_is_one_time_and_expires(make_user, settings):
    from datetime import timedelta

    from django.utils import timezone

    from accounts.models import WebSocketTicket
    from accounts.services import ws_ticket_issue, ws_ticket_redeem

    user = make_user()
    ticket = ws_ticket_issue(user=user)
    assert ws_ticket_redeem(ticket=ticket) == user
    assert ws_ticket_redeem(ticket=ticket) is None
    stale = ws_ticket_issue(user=user)
    WebSocketTicket.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert ws_ticket_redeem(ticket=stale) is None
    assert ws_ticket_redeem(ticket="never-issued") is None
