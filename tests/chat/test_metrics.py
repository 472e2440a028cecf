"""Each Prometheus series an operator's dashboards use moves when its event happens."""
import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from prometheus_client import REGISTRY

from chat import consumers, events

from chat.services import send as sending
from core.errors import AccessDenied, StoreUnavailable
from chat.store import StoreError, get_message_store
from tests.chat.test_consumer import expect_close, open_socket, receive, receive_messages


def value(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Delta:
    """Snapshot of series values, to assert what one action changed."""

    def __init__(self, *series):
        self.series = series
        self.before = {s: value(s[0], **dict(s[1])) for s in series}

    def __getitem__(self, series):
        return value(series[0], **dict(series[1])) - self.before[series]



def S(name, **labels):
    return (name, tuple(sorted(labels.items())))


@pytest.fixture
def pair(make_user, make_group):
    alice, bob = make_user(), make_user()
    return alice, bob, make_group(alice, bob)


@pytest.mark.django_db(transaction=True)  # the publish happens on commit
def test_send_path_series(pair, make_user):
    alice, bob, conversation = pair
    names = [
        S("chat_message_created_total", message_type="image", is_encrypted="true"),
        S("chat_message_persisted_total", status="success"),
        S("chat_message_published_total", status="success"),
        S("chat_message_idempotency_miss_total"),
        S("chat_message_idempotency_hit_total"),
        S("chat_message_send_unauthorized_total"),
    ] + [S("chat_message_delivery_duration_seconds_count", step=step) for step in ("authorize", "persist", "publish", "notify")]
    delta = Delta(*names)
    sending.message_send(sending.SendRequest(
        sender=alice, conversation_id=conversation.id, content="x", message_type="image", is_encrypted=True, idempotency_key="k"
    ))
    sending.message_send(sending.SendRequest(
        sender=alice, conversation_id=conversation.id, content="x", message_type="image", is_encrypted=True, idempotency_key="k"
    ))
    with pytest.raises(AccessDenied):
        sending.message_send(sending.SendRequest(sender=make_user(), conversation_id=conversation.id, content="x"))
    assert {n: delta[(n, l)] for n, l in names if not n.endswith("_count")} == {
        "chat_message_created_total": 1,
        "chat_message_persisted_total": 1,
        "chat_message_published_total": 1,
        "chat_message_idempotency_miss_total": 1,
        "chat_message_idempotency_hit_total": 1,
        "chat_message_send_unauthorized_total": 1,
    }
    assert delta[S("chat_message_delivery_duration_seconds_count", step="authorize")] == 2
    for step in ("persist", "publish", "notify"):
        assert delta[S("chat_message_delivery_duration_seconds_count", step=step)] == 1


@pytest.mark.django_db(transaction=True)  # the publish happens on commit
def test_failure_series(pair, monkeypatch):
    alice, _, conversation = pair
    persisted_error = S("chat_message_persisted_total", status="error")
    published_error = S("chat_message_published_total", status="error")
    delta = Delta(persisted_error, published_error)

    def store_down(*args, **kwargs):
        raise StoreError("down")

    monkeypatch.setattr(get_message_store(), "insert", store_down)
    with pytest.raises(StoreUnavailable):
        sending.message_send(sending.SendRequest(sender=alice, conversation_id=conversation.id, content="x"))
    monkeypatch.undo()

    async def layer_down(*args, **kwargs):
        raise ConnectionError("down")

    monkeypatch.setattr(get_channel_layer(), "group_send", layer_down)
    sending.message_send(sending.SendRequest(sender=alice, conversation_id=conversation.id, content="x"))
    assert (delta[persisted_error], delta[published_error]) == (1, 1)


@pytest.mark.django_db(transaction=True)
async def test_connection_and_delivery_series(pair, monkeypatch):
    alice, bob, conversation = pair
    subscriptions = S("chat_redis_subscription_active")
    connections = S("chat_websocket_connections")
    dropped = S("chat_broadcast_dropped_total")
    buffered = S("chat_broadcast_channel_length")
    delivered = S("chat_message_delivery_duration_seconds_count", step="deliver")
    refused = S("chat_websocket_connection_unauthorized_total")
    delta = Delta(subscriptions, connections, dropped, buffered, delivered, refused)

    socket, _ = await open_socket(bob, conversation)
    await receive(socket)
    # The process subscribes once per group: the conversation's, and the one of account revocations.
    assert (delta[subscriptions], delta[connections]) == (2, 1)
    second_socket, _ = await open_socket(bob, conversation)
    await receive(second_socket)
    assert (delta[subscriptions], delta[connections]) == (2, 2)
    await second_socket.disconnect()

    first = await database_sync_to_async(sending.message_send)(sending.SendRequest(sender=alice, conversation_id=conversation.id, content="1"))
    await receive_messages(socket, 1)
    assert delta[delivered] == 1

    async def publish_lost(group, event):
        return False

    # A duplicate is dropped; an early arrival is buffered until the gap is filled from the store.
    group = events.conversation_group(conversation.id)
    publish = events._apublish_to
    await publish(group, {"type": "message.new", "message": first.message.as_dict()})
    monkeypatch.setattr(events, "_apublish_to", publish_lost)
    await database_sync_to_async(sending.message_send)(sending.SendRequest(sender=alice, conversation_id=conversation.id, content="2"))
    third = await database_sync_to_async(sending.message_send)(sending.SendRequest(sender=alice, conversation_id=conversation.id, content="3"))
    await publish(group, {"type": "message.new", "message": third.message.as_dict()})
    await socket.receive_nothing(0.05)
    assert delta[buffered] == 1
    assert [m["seq"] for m in await receive_messages(socket, 2)] == [2, 3]
    assert (delta[dropped], delta[buffered]) == (1, 0)

    await socket.disconnect()
    assert (delta[subscriptions], delta[connections]) == (0, 0)
    await open_socket(None, conversation, headers=[])
    assert delta[refused] == 1


@pytest.mark.django_db(transaction=True)
async def test_broadcast_panic_is_counted_and_costs_only_that_socket(pair, monkeypatch):
    alice, bob, conversation = pair
    panics = S("chat_broadcast_panic_total")
    delta = Delta(panics)
    socket, _ = await open_socket(bob, conversation)
    await receive(socket)
    healthy, _ = await open_socket(alice, conversation)
    await receive(healthy)
    real_emit = consumers.ChatConsumer._emit

    async def explode_for_bob(self, message):
        if self.user.pk == bob.pk:
            raise RuntimeError("bug while delivering")
        await real_emit(self, message)

    monkeypatch.setattr(consumers.ChatConsumer, "_emit", explode_for_bob)
    await database_sync_to_async(sending.message_send)(sending.SendRequest(sender=alice, conversation_id=conversation.id, content="x"))
    await expect_close(socket, 1011, timeout=2)
    assert delta[panics] == 1
    assert [m["content"] for m in await receive_messages(healthy, 1)] == ["x"]
    await healthy.disconnect()
