"""The process's fan-out (chat.fanout) after its channel-layer subscription came back: what was
published while it was away is lost, so deliveries wait until the membership rule has been re-run
for the process's sockets (the channel layer's side, on a real Redis: test_channel_layer_redis)."""
import asyncio

import pytest

from chat import fanout as fanout_module
from chat import recheck
from chat.channel_layer import RESUBSCRIBED
from chat.fanout import Fanout

GROUP = "conversation.fanout-test"


class Collecting:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def feed(self, event: dict) -> None:
        self.events.append(event)


@pytest.fixture
async def fanout():
    fanout = Fanout()
    listener = Collecting()
    await fanout.subscribe(GROUP, listener)
    fanout.listener = listener
    yield fanout
    await fanout.unsubscribe(GROUP, listener)
    for task in (fanout._task, fanout._rechecking_later):
        if task is not None:
            task.cancel()


@pytest.fixture(autouse=True)
def second_round_soon(monkeypatch):
    """The second re-check after resubscribing comes soon (test_a_second_recheck_follows...)."""
    monkeypatch.setattr(recheck, "SETTLE_SECONDS", 0.05)


async def until(predicate, timeout=2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def publish(fanout, n: int) -> None:
    await fanout.layer.group_send(GROUP, {"type": "message.new", "group": GROUP, "n": n})


async def test_events_after_a_resubscription_wait_for_the_recheck(fanout, monkeypatch):
    started, release = asyncio.Event(), asyncio.Event()

    async def recheck_once() -> int:
        started.set()
        await release.wait()
        return 0

    monkeypatch.setattr(recheck, "recheck_once", recheck_once)
    await publish(fanout, 1)
    await fanout.layer.send(fanout.channel, {"type": RESUBSCRIBED})
    await publish(fanout, 2)
    await asyncio.wait_for(started.wait(), 2)
    await asyncio.sleep(0.1)
    # What came before the resubscription went out; what came after waits for the re-check.
    assert [e["n"] for e in fanout.listener.events] == [1]
    release.set()
    await until(lambda: len(fanout.listener.events) == 2)
    assert [e["n"] for e in fanout.listener.events] == [1, 2]


async def test_a_failing_recheck_is_tried_again_before_deliveries_go_on(fanout, monkeypatch):
    monkeypatch.setattr(fanout_module, "RECEIVE_RETRY_SECONDS", 0.01)
    attempts = []

    async def recheck_once() -> int:
        attempts.append(len(fanout.listener.events))
        if len(attempts) < 2:
            raise ConnectionError("database away")
        return 0

    monkeypatch.setattr(recheck, "recheck_once", recheck_once)
    await fanout.layer.send(fanout.channel, {"type": RESUBSCRIBED})
    await publish(fanout, 1)
    await until(lambda: len(fanout.listener.events) == 1)
    assert attempts == [0, 0]  # the second attempt succeeded, and nothing went out before it


async def test_deliveries_go_on_when_the_recheck_keeps_failing(fanout, monkeypatch, caplog):
    """The database is away too: after a few attempts the periodic re-check is the backstop
    (SPEC section 5), and live events are not held for ever."""
    monkeypatch.setattr(fanout_module, "RECEIVE_RETRY_SECONDS", 0.01)
    attempts = []

    async def recheck_once() -> int:
        attempts.append(1)
        raise ConnectionError("database away")

    monkeypatch.setattr(recheck, "recheck_once", recheck_once)
    await fanout.layer.send(fanout.channel, {"type": RESUBSCRIBED})
    await publish(fanout, 1)
    await until(lambda: len(fanout.listener.events) == 1)
    assert len(attempts) == fanout_module.RESUBSCRIBED_RECHECK_ATTEMPTS
    assert "resubscribed without a re-check" in caplog.text


async def test_a_second_recheck_follows_once_the_subscriptions_surely_hold(fanout, monkeypatch):
    """Redis takes a subscription a moment after it is asked for: a revocation published in that
    moment is found by a second round SETTLE_SECONDS later, not 30 s later."""
    rounds = []

    async def recheck_once() -> int:
        rounds.append(asyncio.get_running_loop().time())
        return 0

    monkeypatch.setattr(recheck, "recheck_once", recheck_once)
    await fanout.layer.send(fanout.channel, {"type": RESUBSCRIBED})
    await until(lambda: len(rounds) == 2)
    assert rounds[1] - rounds[0] >= recheck.SETTLE_SECONDS
