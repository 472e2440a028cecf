"""Attacks on accounts (issue 13, SPEC 4.1): tokens that never die, brute-forced logins,
look-alike usernames, and a user search that lists everyone."""
from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import IntegrityError, transaction
from django.test import Client
from django.utils import timezone
from knox.models import AuthToken
from rest_framework.test import APIClient

from accounts import services
from accounts.models import User
from core import ratelimit
from tests.services import REDIS_URL, redis_available, require

pytestmark = pytest.mark.django_db

PASSWORD = "s3cret-pass!"  # tests/conftest.py make_user's
API = "/api/v1"


def login(username: str, password: str = PASSWORD, *, addr: str = "127.0.0.1", client=None):
    return (client or APIClient()).post(
        f"{API}/auth/token/", {"username": username, "password": password}, format="json", REMOTE_ADDR=addr
    )


def with_token(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


@pytest.fixture
def fresh_limiters():
    """Limiters are cached per process; each throttle test starts from empty counters."""
    ratelimit._limiter.cache_clear()
    yield
    ratelimit._limiter.cache_clear()


# ======================================================================= 6. tokens


class TestTokens:
    def test_each_login_is_a_device_of_its_own_and_logout_revokes_only_it(self, make_user):
        make_user("dora")
        phone, laptop = login("dora"), login("dora")
        assert phone.status_code == laptop.status_code == 200
        assert set(phone.data) == {"token", "expiry"} and phone.data["token"] != laptop.data["token"]
        assert with_token(phone.data["token"]).post(f"{API}/auth/logout/").status_code == 204
        assert with_token(phone.data["token"]).get(f"{API}/users/me/").status_code == 401
        assert with_token(laptop.data["token"]).get(f"{API}/users/me/").status_code == 200

    def test_tokens_are_stored_hashed(self, make_user):
        make_user("dora")
        key = login("dora").data["token"]
        [row] = AuthToken.objects.values()
        assert key not in [str(value) for value in row.values()]
        assert row["digest"] != key and len(row["digest"]) == 128

    def test_a_token_is_read_with_its_user_as_the_orm_reads_them_without_compiling_a_query(self, make_user, monkeypatch):
        from django.db.models.sql.compiler import SQLCompiler

        from accounts.auth import tokens_with_users, users_for_tokens

        make_user("dora", email="dora@example.com")
        key = login("dora").data["token"]
        [read] = tokens_with_users(key[:15])
        expected = AuthToken.objects.select_related("user").get()
        for model_fields, mine, orm in ((AuthToken._meta.concrete_fields, read, expected),
                                        (User._meta.concrete_fields, read.user, expected.user)):
            assert [(f.attname, getattr(mine, f.attname)) for f in model_fields] == [
                (f.attname, getattr(orm, f.attname)) for f in model_fields
            ]
        assert read.expiry.tzinfo is not None and not read._state.adding
        assert tokens_with_users("no such key") == []
        compiled = []
        monkeypatch.setattr(SQLCompiler, "as_sql", lambda *args, **kwargs: compiled.append(1) or 1 / 0)
        assert users_for_tokens([key])[0].username == "dora"  # fresh: no expiry to slide, nothing written
        assert compiled == []

    def test_many_tokens_are_checked_with_one_read_and_their_writes_set_wise(self, make_user, settings, django_assert_num_queries):
        """The WebSocket handshakes that arrive together (chat.ws_auth): each key gets what REST's
        check would answer, for one read, one delete of the expired and one update of the
        expiries that slide."""
        from accounts.auth import users_for_tokens

        make_user("dora")
        eve, fay = make_user("eve"), make_user("fay")
        fresh = login("dora").data["token"]
        stale = login("eve").data["token"]
        expired = login("fay").data["token"]
        inactive = login("dora").data["token"]
        now = timezone.now()
        ttl = timedelta(seconds=settings.CHAT_TOKEN_TTL)
        # eve's last use was two hours ago: her expiry slides; fay's token has run out.
        AuthToken.objects.filter(user=eve).update(expiry=now + ttl - timedelta(hours=2))
        AuthToken.objects.filter(user=fay).update(expiry=now - timedelta(seconds=1))
        AuthToken.objects.filter(token_key=inactive[:15]).update(user=make_user("gil", is_active=False))
        keys = [fresh, stale, expired, inactive, fresh[:-1] + "x", "not a token", "", fresh, fresh[:-1] + "\udcff"]
        with django_assert_num_queries(3):
            users = users_for_tokens(keys)
        assert [user.username if user else None for user in users] == ["dora", "eve", None, None, None, None, None, "dora", None]
        assert abs(AuthToken.objects.get(user=eve).expiry - (now + ttl)) < timedelta(seconds=5)
        assert not AuthToken.objects.filter(user=fay).exists()
        # Nothing to write: one read.
        with django_assert_num_queries(1):
            assert [user.username for user in users_for_tokens([fresh, stale])] == ["dora", "eve"]

    def test_a_token_revoked_while_its_expiry_slides_is_refused(self, make_user, settings, monkeypatch):
        from accounts import auth

        make_user("eve")
        key = login("eve").data["token"]
        AuthToken.objects.update(expiry=timezone.now() + timedelta(seconds=settings.CHAT_TOKEN_TTL) - timedelta(hours=2))
        read = auth.tokens_with_users

        def revoked_right_after(*token_keys):
            tokens = read(*token_keys)
            AuthToken.objects.all().delete()  # a logout, between the read and the write
            return tokens

        monkeypatch.setattr(auth, "tokens_with_users", revoked_right_after)
        assert auth.users_for_tokens([key]) == [None]

    def test_a_write_the_database_refuses_fails_no_check(self, make_user, settings, monkeypatch):
        """The writes come after every check of a batch: a busy writer leaves the expiry where it
        was and answers every handshake that shared the read."""
        from django.db import OperationalError
        from django.db.models import QuerySet

        from accounts import auth

        make_user("eve")
        key = login("eve").data["token"]
        stale = timezone.now() + timedelta(seconds=settings.CHAT_TOKEN_TTL) - timedelta(hours=2)
        AuthToken.objects.update(expiry=stale)

        def locked(*args, **kwargs):
            raise OperationalError("database is locked")

        monkeypatch.setattr(QuerySet, "update", locked)
        assert [user.username for user in auth.users_for_tokens([key, key])] == ["eve", "eve"]
        monkeypatch.undo()
        assert AuthToken.objects.get().expiry == stale

    def test_an_expired_token_is_refused_and_deleted(self, make_user):
        make_user("dora")
        key = login("dora").data["token"]
        AuthToken.objects.update(expiry=timezone.now() - timedelta(seconds=1))
        assert with_token(key).get(f"{API}/users/me/").status_code == 401
        assert not AuthToken.objects.exists()

    def test_expiry_is_chat_token_ttl_and_slides_with_use(self, make_user, settings):
        make_user("dora")
        response = login("dora")
        token = AuthToken.objects.get()
        ttl = timedelta(seconds=settings.CHAT_TOKEN_TTL)
        assert ttl == timedelta(days=30)
        assert abs(token.expiry - (timezone.now() + ttl)) < timedelta(seconds=5)
        AuthToken.objects.update(expiry=timezone.now() + timedelta(hours=1))  # nearly worn out
        assert with_token(response.data["token"]).get(f"{API}/users/me/").status_code == 200
        assert AuthToken.objects.get().expiry > timezone.now() + ttl - timedelta(seconds=5)

    def test_password_change_kills_every_token_and_hands_the_caller_a_fresh_one(self, make_user):
        make_user("dora")
        phone, laptop = login("dora").data["token"], login("dora").data["token"]
        response = with_token(phone).post(
            f"{API}/auth/password/", {"old_password": PASSWORD, "new_password": "a-new-long-pass-77"}, format="json"
        )
        assert response.status_code == 200 and set(response.data) == {"token", "expiry"}
        assert with_token(phone).get(f"{API}/users/me/").status_code == 401
        assert with_token(laptop).get(f"{API}/users/me/").status_code == 401
        assert with_token(response.data["token"]).get(f"{API}/users/me/").status_code == 200
        assert login("dora").status_code == 400
        assert login("dora", "a-new-long-pass-77").status_code == 200

    @pytest.mark.parametrize(
        "body, field",
        [
            ({"old_password": "wrong", "new_password": "a-new-long-pass-77"}, "old_password"),
            ({"old_password": PASSWORD, "new_password": "123"}, "new_password"),
            ({"old_password": PASSWORD, "new_password": "dora"}, "new_password"),
            ({"new_password": "a-new-long-pass-77"}, "old_password"),
        ],
    )
    def test_password_change_refuses_bad_input_and_keeps_the_tokens(self, make_user, body, field):
        make_user("dora")
        key = login("dora").data["token"]
        response = with_token(key).post(f"{API}/auth/password/", body, format="json")
        assert response.status_code == 400 and field in response.data
        assert with_token(key).get(f"{API}/users/me/").status_code == 200

    def test_password_change_needs_authentication(self):
        response = APIClient().post(f"{API}/auth/password/", {"old_password": "x", "new_password": "y"}, format="json")
        assert response.status_code == 401

    @pytest.mark.parametrize("how", ["service", "save"])
    def test_deactivation_kills_tokens_and_reactivation_does_not_revive_them(self, make_user, how):
        user = make_user("dora")
        key = login("dora").data["token"]
        ticket = services.ws_ticket_issue(user=user)
        if how == "service":
            services.user_deactivate(user=user)
        else:
            user.is_active = False
            user.save()
        User.objects.filter(pk=user.pk).update(is_active=True)
        assert with_token(key).get(f"{API}/users/me/").status_code == 401
        assert services.ws_ticket_redeem(ticket=ticket) is None

    @pytest.mark.parametrize(
        "header",
        ["Token \xff\xfe", "Token abc\x00def", "Token " + "a" * 10_000, "Token", "Token a b", "Token é" + "0" * 63],
    )
    def test_malformed_tokens_are_401_never_500(self, header):
        response = APIClient().get(f"{API}/users/me/", HTTP_AUTHORIZATION=header)
        assert response.status_code == 401

    def test_a_login_past_the_cap_revokes_the_oldest_token(self, make_user, settings):
        settings.CHAT_MAX_TOKENS_PER_USER = 2
        make_user("dora")
        first, second, third = (login("dora").data["token"] for _ in range(3))
        assert AuthToken.objects.count() == 2
        assert with_token(first).get(f"{API}/users/me/").status_code == 401
        assert with_token(third).get(f"{API}/users/me/").status_code == 200


@pytest.mark.django_db(transaction=True)
class TestWebSocketToken:
    """The handshake's `Authorization: Token` checks the same hashed, expiring token as REST."""

    async def handshake(self, key: str) -> bool:
        from channels.testing import WebsocketCommunicator

        from chatproject.asgi import application

        communicator = WebsocketCommunicator(
            application, f"/ws/chat/?conversation_id={self.conversation.id}",
            headers=[(b"authorization", f"Token {key}".encode())],
        )
        connected, _ = await communicator.connect()
        if connected:
            await communicator.disconnect()
        return connected

    async def test_live_expired_and_revoked_tokens(self, make_user):
        from channels.db import database_sync_to_async

        @database_sync_to_async
        def setup():
            from chat.services.conversations import conversation_create

            user = make_user("dora")
            self.conversation, _ = conversation_create(creator=user, kind="group", title="t", participant_ids=[])
            return user, services.token_issue(user=user)[1], services.token_issue(user=user)

        user, live, (expiring, expired) = await setup()
        assert await self.handshake(live)
        await database_sync_to_async(AuthToken.objects.filter(pk=expiring.pk).update)(
            expiry=timezone.now() - timedelta(seconds=1)
        )
        assert not await self.handshake(expired)
        await database_sync_to_async(services.user_deactivate)(user=user)
        await database_sync_to_async(User.objects.filter(pk=user.pk).update)(is_active=True)
        assert not await self.handshake(live)
        assert not await self.handshake("\x00" + "a" * 63)

    @pytest.mark.parametrize("revoke", ["password change", "deactivated by a plain save"])
    async def test_revoking_the_credentials_closes_the_open_sockets(self, make_user, revoke):
        """A socket opened with a stolen token must not outlive a password change (nor a
        deactivation made outside the service, e.g. the admin's form or a shell)."""
        from channels.db import database_sync_to_async
        from channels.testing import WebsocketCommunicator

        from chatproject.asgi import application
        from tests.chat.test_consumer import expect_close

        @database_sync_to_async
        def setup():
            from chat.services.conversations import conversation_create

            user = make_user("erin")
            self.conversation, _ = conversation_create(creator=user, kind="group", title="t", participant_ids=[])
            return user, services.token_issue(user=user)[1]

        user, key = await setup()
        communicator = WebsocketCommunicator(
            application, f"/ws/chat/?conversation_id={self.conversation.id}",
            headers=[(b"authorization", f"Token {key}".encode())],
        )
        connected, _ = await communicator.connect()
        assert connected
        await communicator.receive_json_from()  # ready

        @database_sync_to_async
        def revoke_now():
            fresh = User.objects.get(pk=user.pk)
            if revoke == "password change":
                services.password_change(user=fresh, new_password="another-horse-43")
            else:
                fresh.is_active = False
                fresh.save()

        await revoke_now()
        await expect_close(communicator, 4403, timeout=2)
        await communicator.disconnect(code=4403)


# ======================================================================= 7. brute-force throttles


@pytest.fixture
def count_hashes(monkeypatch):
    """How many times a password was hashed (checked or set) since the fixture started."""
    calls = []
    real_check, real_set = User.check_password, User.set_password

    def check(self, raw):
        calls.append("check")
        return real_check(self, raw)

    def set_(self, raw):
        calls.append("set")
        return real_set(self, raw)

    monkeypatch.setattr(User, "check_password", check)
    monkeypatch.setattr(User, "set_password", set_)
    return calls


def assert_throttled(response):
    assert response.status_code == 429, response.content
    assert int(response["Retry-After"]) >= 1


class TestLoginThrottles:
    def test_failed_logins_per_username_then_429_before_any_hash(self, make_user, settings, fresh_limiters, count_hashes):
        settings.CHAT_LOGIN_FAIL_RATE_USER = "3/15min"
        make_user("admin")
        for addr in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
            assert login("admin", "wrong", addr=addr).status_code == 400
        hashed = len(count_hashes)
        response = login("admin", addr="10.0.0.4")  # the right password, too late
        assert_throttled(response)
        assert int(response["Retry-After"]) <= 900  # the end of the fixed 15-minute window
        assert len(count_hashes) == hashed, "a password was hashed for a throttled attempt"
        assert login("someone-else", "wrong", addr="10.0.0.4").status_code == 400

    def test_look_alike_spellings_share_the_username_budget(self, make_user, settings, fresh_limiters):
        settings.CHAT_LOGIN_FAIL_RATE_USER = "3/15min"
        make_user("admin")
        for name in ("Admin", "ADMIN", "ａｄｍｉｎ"):
            assert login(name, "wrong").status_code == 400
        assert_throttled(login("admin"))

    def test_successful_logins_do_not_spend_the_failure_budget(self, make_user, settings, fresh_limiters):
        settings.CHAT_LOGIN_FAIL_RATE_USER = "3/15min"
        settings.CHAT_LOGIN_FAIL_RATE_ADDR = "3/15min"
        make_user("dora")
        assert login("dora", "wrong").status_code == 400
        assert [login("dora").status_code for _ in range(5)] == [200] * 5
        assert login("dora", "wrong").status_code == 400
        assert login("dora", "wrong").status_code == 400
        assert_throttled(login("dora"))

    def test_failed_logins_per_address(self, make_user, settings, fresh_limiters):
        settings.CHAT_LOGIN_FAIL_RATE_ADDR = "3/15min"
        make_user("dora")
        for name in ("anna", "bert", "carl"):  # spraying usernames does not escape it
            assert login(name, "wrong", addr="10.0.0.9").status_code == 400
        assert_throttled(login("dora", addr="10.0.0.9"))
        assert login("dora", addr="10.0.0.10").status_code == 200

    def test_x_forwarded_for_does_not_pick_the_address(self, make_user, settings, fresh_limiters):
        settings.CHAT_LOGIN_FAIL_RATE_ADDR = "2/15min"
        client = APIClient()
        for n in range(2):
            client.post(f"{API}/auth/token/", {"username": "x", "password": "y"}, format="json",
                        HTTP_X_FORWARDED_FOR=f"192.0.2.{n}")
        response = client.post(f"{API}/auth/token/", {"username": "x", "password": "y"}, format="json",
                               HTTP_X_FORWARDED_FOR="192.0.2.99")
        assert_throttled(response)

    @pytest.mark.parametrize("path", ["/api/auth/login/", "/admin/login/"])
    def test_session_and_admin_logins_are_throttled_too(self, make_user, settings, fresh_limiters, count_hashes, path):
        settings.CHAT_LOGIN_FAIL_RATE_USER = "2/15min"
        make_user("admin", is_staff=True)
        client = Client()
        for _ in range(2):
            response = client.post(path, {"username": "admin", "password": "wrong"})
            assert response.status_code == 200  # the form again, with its error
        hashed = len(count_hashes)
        response = client.post(path, {"username": "ADMIN", "password": PASSWORD})
        assert_throttled(response)
        assert len(count_hashes) == hashed
        # ... and they share the budget with the API token endpoint.
        assert_throttled(login("admin"))

    def test_password_change_old_password_is_throttled(self, make_user, settings, fresh_limiters):
        settings.CHAT_LOGIN_FAIL_RATE_USER = "2/15min"
        make_user("dora")
        key = login("dora").data["token"]
        for _ in range(2):
            response = with_token(key).post(
                f"{API}/auth/password/", {"old_password": "guess", "new_password": "a-new-long-pass-77"}, format="json"
            )
            assert response.status_code == 400
        assert_throttled(with_token(key).post(
            f"{API}/auth/password/", {"old_password": PASSWORD, "new_password": "a-new-long-pass-77"}, format="json"
        ))

    def test_registrations_per_address(self, settings, fresh_limiters, count_hashes):
        settings.CHAT_REGISTER_RATE = "2/hour"

        def register(name, addr="10.0.1.1"):
            return APIClient().post(f"{API}/auth/register/", {"username": name, "password": "long-enough-pass-42"},
                                    format="json", REMOTE_ADDR=addr)

        assert register("one").status_code == 201
        assert register("o n e").status_code == 400  # a refused attempt counts as well
        hashed = len(count_hashes)
        response = register("three")
        assert_throttled(response)
        assert int(response["Retry-After"]) <= 3600
        assert len(count_hashes) == hashed and not User.objects.filter(username="three").exists()
        assert register("three", addr="10.0.1.2").status_code == 201

    def test_the_budget_is_shared_across_processes_through_redis(self, make_user, settings, fresh_limiters):
        require("Redis", redis_available())
        settings.REDIS_URL = REDIS_URL
        settings.CHAT_LOGIN_FAIL_RATE_USER = "2/15min"
        name, addr = f"u{uuid.uuid4().hex[:12]}", f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.7"
        make_user(name)
        for _ in range(2):
            assert login(name, "wrong", addr=addr).status_code == 400
            ratelimit._limiter.cache_clear()  # the next request comes to another process
        assert_throttled(login(name, addr=addr))


# ======================================================================= 9. look-alike usernames


class TestUsernames:
    def register(self, username):
        return APIClient().post(
            f"{API}/auth/register/", {"username": username, "password": "long-enough-pass-42"}, format="json"
        )

    @pytest.mark.parametrize("look_alike", ["Admin", "ADMIN", "\u0430dmin", "\uff41\uff44\uff4d\uff49\uff4e"])
    def test_look_alikes_of_an_existing_name_are_refused(self, look_alike):
        assert self.register("admin").status_code == 201
        response = self.register(look_alike)
        assert response.status_code == 400 and "username" in response.data
        assert User.objects.count() == 1

    def test_fullwidth_is_stored_normalized_and_any_spelling_logs_in(self):
        assert self.register("\uff42\uff4f\uff42").data["username"] == "bob"
        for spelling in ("bob", "BOB", "\uff22\uff2f\uff22"):
            assert login(spelling, "long-enough-pass-42").status_code == 200

    def test_the_database_refuses_a_case_variant(self, make_user):
        make_user("admin")
        with pytest.raises(IntegrityError), transaction.atomic():
            User.objects.create(username="ADMIN")

    @pytest.mark.parametrize("username", ["\u0430dmin", "\u0391lice", "emoji\U0001f600", "a\x00b", "x" * 151])
    def test_non_ascii_or_odd_usernames_are_field_errors(self, username):
        response = self.register(username)
        assert response.status_code == 400 and "username" in response.data

    @pytest.mark.parametrize("username", ["a\\u0000b", "\\ud800", "x" * 10_000, "\\u0430dmin"])
    def test_odd_login_names_are_400_never_500(self, username):
        body = '{"username": "%s", "password": "whatever"}' % username  # raw JSON: escapes as sent
        response = APIClient().post(f"{API}/auth/token/", body, content_type="application/json")
        assert response.status_code == 400


# ======================================================================= 14. user search


class TestUserSearch:
    @pytest.mark.parametrize("query", [{}, {"search": ""}, {"search": "a"}, {"search": "  a "}, {"search": "a\x00"}])
    def test_a_prefix_shorter_than_two_characters_is_a_field_error(self, make_user, client_for, query):
        make_user("anna")
        response = client_for(make_user("searcher")).get(f"{API}/users/", query)
        assert response.status_code == 400 and "search" in response.json()

    def test_staff_and_inactive_accounts_are_never_listed(self, make_user, client_for):
        make_user("anna")
        make_user("annadmin", is_staff=True)
        make_user("annroot", is_staff=True, is_superuser=True)
        make_user("annette", is_active=False)
        response = client_for(make_user("searcher")).get(f"{API}/users/", {"search": "an"})
        assert response.status_code == 200
        assert [u["username"] for u in response.data["results"]] == ["anna"]
