"""Load shedding (chat/overload.py): new WebSocket sends are refused while the process cannot keep up."""
import asyncio
import time

import pytest
from channels.db import database_sync_to_async

from chat import metrics
from chat.overload import PROBE_SECONDS, LoopLag, SendsInFlight, loop_lag, sends_in_flight
from chat.store import get_message_store
from tests.chat.test_consumer import open_socket, receive


def test_one_late_tick_does_not_shed_but_a_sustained_lag_does(settings):
    settings.CHAT_MAX_LOOP_LAG = 0.5
    lag = LoopLag()
    lag.observe(2.0)  # a GC pause, one big frame
    assert not lag.overloaded()
    for _ in range(60):  # six seconds of ticks, each a second late
        lag.observe(1.0)
    assert lag.overloaded()
    for _ in range(60):
        lag.observe(0.0)
    assert not lag.overloaded()


def test_zero_turns_shedding_off(settings):
    settings.CHAT_MAX_LOOP_LAG = 0
    lag = LoopLag()
    for _ in range(100):
        lag.observe(10.0)
    assert not lag.overloaded()


async def test_the_probe_measures_a_blocked_loop(settings):
    settings.CHAT_MAX_LOOP_LAG = 0.05
    lag = LoopLag()
    lag.start()
    await asyncio.sleep(3 * PROBE_SECONDS)
    assert not lag.overloaded()
    for _ in range(20):  # the loop blocked for 0.2 s at a time, as by CPU-bound work
        time.sleep(0.2)
        await asyncio.sleep(0)
    assert lag.lag > 0.05 and lag.overloaded()


def test_sends_in_flight_are_counted_until_they_finish_or_fail(settings):
    settings.CHAT_MAX_SENDS_IN_FLIGHT = 2
    in_flight = SendsInFlight()
    with in_flight.held():
        assert not in_flight.overloaded()
        with pytest.raises(RuntimeError), in_flight.held():
            assert in_flight.overloaded()
            raise RuntimeError("the send failed")
        assert in_flight.count == 1
    assert in_flight.count == 0 and not in_flight.overloaded()


@pytest.fixture
def pair(make_user, make_group):
    alice, bob = make_user("alice"), make_user("bob")
    return alice, make_group(alice, bob)


@pytest.mark.django_db(transaction=True)
class TestConsumer:
    async def test_an_overloaded_process_refuses_new_sends_and_keeps_serving(self, pair, monkeypatch, settings):
        alice, conversation = pair
        socket, connected = await open_socket(alice, conversation)
        assert connected and (await receive(socket))["type"] == "ready"
        monkeypatch.setattr(loop_lag, "lag", 10.0)
        shed_before = metrics.message_shed._value.get()

        await socket.send_json_to({"type": "message.send", "client_message_id": "k-1", "content": "hi"})
        frame = await receive(socket)
        assert (frame["type"], frame["code"], frame["client_message_id"]) == ("error", "unavailable", "k-1")
        assert metrics.message_shed._value.get() == shed_before + 1
        assert (await database_sync_to_async(get_message_store().history)(conversation.id)).messages == []
        await socket.send_json_to({"type": "ping"})
        assert await receive(socket) == {"type": "pong"}

        monkeypatch.setattr(loop_lag, "lag", 0.0)
        monkeypatch.setattr(sends_in_flight, "count", settings.CHAT_MAX_SENDS_IN_FLIGHT)
        await socket.send_json_to({"type": "message.send", "client_message_id": "k-1", "content": "hi"})
        frame = await receive(socket)
        assert (frame["type"], frame["code"], frame["client_message_id"]) == ("error", "unavailable", "k-1")
        assert metrics.message_shed._value.get() == shed_before + 2

        monkeypatch.setattr(sends_in_flight, "count", 0)
        await socket.send_json_to({"type": "message.send", "client_message_id": "k-1", "content": "hi"})
        ack = await receive(socket, skip=("presence", "message.new"))
        assert (ack["type"], ack["client_message_id"], ack["message"]["seq"]) == ("message.ack", "k-1", 1)
        await socket.disconnect()
