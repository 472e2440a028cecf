"""WebSocket attacks that need no real transport: through the whole ASGI stack, in process."""
import asyncio

import pytest
from channels.db import database_sync_to_async

from chat import consumers
from tests.chat.test_consumer import open_socket, receive, receive_messages, send_over_rest_path

pytestmark = pytest.mark.django_db(transaction=True)


async def test_a_write_that_fails_costs_that_frame_not_the_consumer(make_user, make_group, monkeypatch):
    alice, bob = await database_sync_to_async(make_user)("alice"), await database_sync_to_async(make_user)("bob")
    conversation = await database_sync_to_async(make_group)(alice, bob)
    socket, connected = await open_socket(bob, conversation)
    assert connected
    assert (await receive(socket))["type"] == "ready"
    real_send = consumers.ChatConsumer.send
    failed = []

    async def send_failing_once(self, text_data=None, bytes_data=None, close=False):
        if not failed and '"message.new"' in (text_data or ""):
            failed.append(text_data)
            raise RuntimeError("transport refused the frame")
        return await real_send(self, text_data=text_data, bytes_data=bytes_data, close=close)

    monkeypatch.setattr(consumers.ChatConsumer, "send", send_failing_once)
    await send_over_rest_path(alice, conversation, "lost on the way out")
    await send_over_rest_path(alice, conversation, "arrives")
    assert [m["content"] for m in await receive_messages(socket, 1)] == ["arrives"]
    assert len(failed) == 1
    await socket.send_json_to({"type": "ping"})
    assert await receive(socket) == {"type": "pong"}
    await socket.disconnect()


# --- a revocation that announces nothing still closes the socket (CHAT_MEMBERSHIP_RECHECK) -------

RECHECK = 0.3


@pytest.fixture
def quick_recheck(settings, monkeypatch):
    """The periodic round every RECHECK seconds, and no settle look after the handshake (its
    catch-up would otherwise do part of what these tests show the periodic round doing)."""
    from chat import recheck

    settings.CHAT_MEMBERSHIP_RECHECK = RECHECK
    monkeypatch.setattr(recheck, "settle", lambda socket: None)


def counted_queries(monkeypatch) -> list[set[int]]:
    """The participation ids of each query chat.recheck makes from now on."""
    from chat import recheck

    queries = []
    real = recheck.allowed_participations

    def counted(*, participant_ids):
        queries.append(set(participant_ids))
        return real(participant_ids=participant_ids)

    monkeypatch.setattr(recheck, "allowed_participations", counted)
    return queries


@pytest.fixture
async def pair(make_user, make_group):
    alice, bob = await database_sync_to_async(make_user)("alice"), await database_sync_to_async(make_user)("bob")
    return alice, bob, await database_sync_to_async(make_group)(alice, bob)


def ban_without_signals(conversation, user):
    """As a shell session or a cron job might: bulk_create sends no post_save, so nothing is published."""
    from chat.models import Ban

    Ban.objects.bulk_create([Ban(conversation=conversation, user=user)])


def deactivate_without_signals(user):
    from accounts.models import User

    User.objects.filter(pk=user.pk).update(is_active=False)


@pytest.mark.parametrize("revoke", ["ban", "deactivate"])
async def test_an_unannounced_revocation_closes_the_socket_within_the_recheck_interval(pair, quick_recheck, revoke):
    from tests.chat.test_consumer import expect_close, nothing_but_presence

    alice, bob, conversation = pair
    a, _ = await open_socket(alice, conversation)
    b, _ = await open_socket(bob, conversation)
    await receive(a), await receive(b)
    if revoke == "ban":
        await database_sync_to_async(ban_without_signals)(conversation, bob)
    else:
        await database_sync_to_async(deactivate_without_signals)(bob)
    await expect_close(b, 4403, timeout=2 * RECHECK + 0.5)
    await b.disconnect(code=4403)
    # Nothing sent after that reaches bob; alice's socket stays and gets it.
    await send_over_rest_path(alice, conversation, "after the ban")
    assert [m["content"] for m in await receive_messages(a, 1)] == ["after the ban"]
    assert await nothing_but_presence(a, RECHECK * 2)  # and it is not closed by the re-check
    assert not (await open_socket(bob, conversation))[1]
    await a.disconnect()


async def test_the_recheck_runs_one_query_per_batch_for_all_sockets_of_the_process(pair, monkeypatch):
    from chat import recheck
    from tests.chat.test_consumer import expect_close

    alice, bob, conversation = pair
    monkeypatch.setattr(recheck, "settle", lambda socket: None)  # only the round below queries
    sockets = [(await open_socket(user, conversation))[0] for user in (alice, alice, alice, bob, bob)]
    for socket in sockets:
        await receive(socket)
    batches = counted_queries(monkeypatch)
    monkeypatch.setattr(recheck, "BATCH_SIZE", 2)
    await database_sync_to_async(ban_without_signals)(conversation, bob)
    assert await recheck.recheck_once() == 2
    assert len(batches) == 3  # five sockets, two per query
    for socket in sockets[3:]:
        await expect_close(socket, 4403)
        await socket.disconnect(code=4403)
    for socket in sockets[:3]:
        await socket.disconnect()
    assert recheck._sockets == {}


def lose_every_message_new(monkeypatch) -> None:
    """From now on every message.new publish is lost; other events still go out."""
    from chat import events

    real = events._apublish_to

    async def lose_message_new(group, event):
        if event.get("type") == "message.new":
            return False
        return await real(group, event)

    monkeypatch.setattr(events, "_apublish_to", lose_message_new)


async def test_a_lost_publish_with_no_later_message_arrives_within_the_recheck_interval(pair, quick_recheck, monkeypatch):
    """The gate finds a gap only when a later message arrives; the re-check compares each socket
    with the committed last_seq, so the last message of a conversation is not lost with its
    publish either."""
    alice, bob, conversation = pair
    b, _ = await open_socket(bob, conversation)
    await receive(b)
    lose_every_message_new(monkeypatch)
    await send_over_rest_path(alice, conversation, "published into the void")
    assert [m["content"] for m in await receive_messages(b, 1, timeout=2 * RECHECK + 1)] == ["published into the void"]
    await b.disconnect()


async def test_a_publish_missed_right_after_the_handshake_is_caught_up_within_a_second(pair, monkeypatch):
    """A new subscription takes effect only once Redis has processed it; a message published in
    between whose commit came after the handshake's read is read from the store shortly after,
    without waiting for the periodic re-check (30 s by default)."""
    alice, bob, conversation = pair
    b, _ = await open_socket(bob, conversation)
    await receive(b)
    lose_every_message_new(monkeypatch)
    await send_over_rest_path(alice, conversation, "published before the subscription was live")
    assert [m["content"] for m in await receive_messages(b, 1, timeout=3)] == ["published before the subscription was live"]
    await b.disconnect()


async def test_sockets_that_subscribe_together_share_one_settle_look(pair, monkeypatch):
    """The settle look is one query for every socket that subscribed within a moment of the
    others (a reconnect storm's thousands), not a thread hop and a query per socket. It only
    catches up: a socket it finds without access is left to the revocation's event (on its way)
    and the periodic round."""
    from chat import recheck
    from tests.chat.test_consumer import nothing_but_presence

    alice, bob, conversation = pair
    looks = counted_queries(monkeypatch)
    monkeypatch.setattr(recheck, "SETTLE_GATHER_SECONDS", 1.0)  # three handshakes within it, however slow the machine
    sockets = [(await open_socket(user, conversation))[0] for user in (alice, alice, bob)]
    for socket in sockets:
        await receive(socket)
    await database_sync_to_async(ban_without_signals)(conversation, bob)
    for _ in range(60):
        if looks:
            break
        await asyncio.sleep(0.1)
    assert len(looks) == 1 and len(looks[0]) == 2, looks  # three sockets, one query (alice has one participation)
    assert await nothing_but_presence(sockets[2], 0.3)  # not closed by the look (the periodic round would)
    for socket in sockets:
        await socket.disconnect()


def test_a_failed_revocation_publish_is_retried_in_the_background(make_user, make_group, monkeypatch, transactional_db):
    import threading
    import time

    from chat import events
    from chat.services import conversations

    alice, bob = make_user("alice"), make_user("bob")
    conversation = make_group(alice, bob)
    monkeypatch.setattr(events, "RETRY_DELAYS_SECONDS", (0.2, 0.2, 0.2, 0.2))
    attempts, published = [], threading.Event()

    async def redis_down_twice(group, event):
        if event["type"] != "membership.revoked":
            return True
        attempts.append(time.monotonic())
        if len(attempts) <= 2:
            return False
        published.set()
        return True

    monkeypatch.setattr(events, "_apublish_to", redis_down_twice)
    started = time.monotonic()
    conversations.ban_create(actor=alice, conversation=conversation, user=bob)
    assert time.monotonic() - started < 0.2  # the caller does not wait for the retries
    assert published.wait(3)
    assert len(attempts) == 3 and attempts[1] - attempts[0] >= 0.2
