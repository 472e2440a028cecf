"""The send rate limit: parsing, per-process windows, and the atomic Redis counter (real Redis).

Windows are numbered from an injected clock, so the tests pin it (a burst can no longer straddle a
window boundary and pass by luck) and move it to the next window instead of waiting. The reset
time the Redis counter reports comes from the key's real TTL on Redis: that stays real time.
"""
import threading
import uuid

import pytest

from core import ratelimit
from core.ratelimit import REDIS_RETRY_SECONDS, Rate, RateLimiter, parse_rate
from tests.services import REDIS_URL, redis_available, require

WINDOW_START = 1_800_000_000.0  # a multiple of 60, 3600 and 86400: the start of every window


class Clock:
    def __init__(self, now: float = WINDOW_START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.mark.parametrize(
    "text, rate",
    [("100/min", Rate(100, 60)), ("5/s", Rate(5, 1)), ("10/2h", Rate(10, 7200)), (" 1 / day ", Rate(1, 86400))],
)
def test_parse_rate(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "100", "0/min", "ten/min", "5/fortnight", "-1/s"])
def test_parse_rate_rejects_nonsense(text):
    with pytest.raises(ValueError):
        parse_rate(text)


def test_local_window_allows_exactly_the_limit_and_then_refuses(clock):
    limiter = RateLimiter(Rate(3, 60), clock=clock)
    clock.now += 15
    decisions = [limiter.check("u1") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert decisions[-1].reset == 45 and decisions[-1].headers()["RateLimit-Reset"] == "45"
    assert limiter.check("u2").allowed  # per user


def test_local_window_is_fixed_and_the_next_one_starts_afresh(clock):
    limiter = RateLimiter(Rate(1, 60), clock=clock)
    assert limiter.check("u").allowed
    clock.now += 59.9
    assert not limiter.check("u").allowed  # still the same window
    clock.now += 0.1
    decision = limiter.check("u")
    assert decision.allowed and decision.reset == 60


@pytest.fixture
def redis_limiter():
    require("Redis", redis_available())
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()

    def make(rate: Rate, clock=None) -> RateLimiter:
        return RateLimiter(rate, REDIS_URL, clock=clock or Clock())

    return make


def test_redis_counts_across_limiters_atomically(redis_limiter):
    """Four limiters (as four processes would) hammer one user from 8 threads: exactly the limit passes."""
    limiters = [redis_limiter(Rate(50, 60)) for _ in range(4)]
    user = uuid.uuid4()
    allowed = []

    def burst(limiter):
        for _ in range(40):
            allowed.append(limiter.check(user).allowed)

    threads = [threading.Thread(target=burst, args=(limiters[i % 4],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(allowed) == 320 and allowed.count(True) == 50


def test_redis_window_key_expires_with_its_window(redis_limiter):
    """The key's lifetime is Redis's real TTL: checked, not waited for."""
    import redis

    limiter = redis_limiter(Rate(1, 60))
    user = uuid.uuid4()
    assert limiter.check(user).allowed
    refused = limiter.check(user)
    assert not refused.allowed and 0 < refused.reset <= 60
    keys = redis.Redis.from_url(REDIS_URL).keys(f"chat:rate:send:{user}:*")
    assert len(keys) == 1 and 0 < redis.Redis.from_url(REDIS_URL).pttl(keys[0]) <= 60_000


def test_redis_next_window_starts_afresh(redis_limiter, clock):
    first, second = redis_limiter(Rate(1, 60), clock), redis_limiter(Rate(1, 60), clock)
    user = uuid.uuid4()
    assert first.check(user).allowed
    clock.now += 59.9
    assert not second.check(user).allowed  # one window, across processes
    clock.now += 0.1
    assert second.check(user).allowed and not first.check(user).allowed


def test_redis_check_many_counts_every_hit_in_one_call(redis_limiter, clock):
    """A batch of sends is one script call: each subject's hits count in order, repeats included,
    and the counts are the ones a check per send would have seen."""
    limiter = redis_limiter(Rate(2, 60), clock)
    calls = []
    real_hit = limiter._redis_hit

    def counting_hit(**kwargs):
        calls.append(kwargs["keys"])
        return real_hit(**kwargs)

    limiter._redis_hit = counting_hit
    alice, bob = uuid.uuid4(), uuid.uuid4()
    decisions = limiter.check_many([alice, bob, alice, alice, bob])
    assert len(calls) == 1 and len(calls[0]) == 5
    assert [d.allowed for d in decisions] == [True, True, True, False, True]
    assert [d.remaining for d in decisions] == [1, 1, 0, 0, 0]
    assert all(d.shared and 0 < d.reset <= 60 for d in decisions)
    assert not limiter.check(bob).allowed  # the batch's hits stay counted
    calls.clear()
    assert limiter.check_many([]) == [] and calls == []  # nothing to count: no call to Redis


def test_check_many_without_redis_counts_per_process(clock):
    limiter = RateLimiter(Rate(2, 60), "redis://127.0.0.1:1/0", clock=clock)
    before = ratelimit.rate_limit_degraded._value.get()
    decisions = limiter.check_many(["u", "v", "u", "u"])
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert not any(d.shared for d in decisions)
    assert ratelimit.rate_limit_degraded._value.get() == before + 4


def test_redis_down_degrades_to_a_per_process_limit(clock):
    """An unreachable Redis never fails a check and never removes the limit."""
    limiter = RateLimiter(Rate(2, 60), "redis://127.0.0.1:1/0", clock=clock)
    before = ratelimit.rate_limit_degraded._value.get()
    decisions = [limiter.check("u").allowed for _ in range(3)]
    assert decisions == [True, True, False]
    assert ratelimit.rate_limit_degraded._value.get() == before + 3


def test_after_a_redis_failure_redis_is_tried_again_only_after_a_pause(clock):
    limiter = RateLimiter(Rate(100, 60), "redis://127.0.0.1:1/0", clock=clock)
    attempts = []
    real_hit = limiter._redis_hit

    def counting_hit(**kwargs):
        attempts.append(clock.now)
        return real_hit(**kwargs)

    limiter._redis_hit = counting_hit
    limiter.check("u")
    clock.now += REDIS_RETRY_SECONDS * 0.9
    limiter.check("u")
    assert len(attempts) == 1  # no timeout paid per send while Redis is down
    clock.now += REDIS_RETRY_SECONDS * 0.2
    limiter.check("u")
    assert len(attempts) == 2


def test_local_refund_takes_back_one_hit_of_its_own_window(clock):
    limiter = RateLimiter(Rate(2, 60), clock=clock)
    first = limiter.check("u")
    limiter.refund("u", first)
    assert [limiter.check("u").allowed for _ in range(3)] == [True, True, False]
    stale = limiter.check("v")
    clock.now += 60
    limiter.check("v")
    limiter.refund("v", stale)  # a refund of the previous window leaves the new one alone
    assert limiter.check("v").allowed and not limiter.check("v").allowed


def test_redis_refund_is_shared_and_never_goes_below_zero(redis_limiter, clock):
    import redis

    first, second = redis_limiter(Rate(2, 60), clock), redis_limiter(Rate(2, 60), clock)
    user = uuid.uuid4()
    decision = first.check(user)
    assert decision.shared
    second.refund(user, decision)
    second.refund(user, decision)  # refunded twice: still zero, not minus one
    [key] = redis.Redis.from_url(REDIS_URL).keys(f"chat:rate:send:{user}:*")
    assert int(redis.Redis.from_url(REDIS_URL).get(key)) == 0
    assert [first.check(user).allowed for _ in range(3)] == [True, True, False]
    clock.now += 60
    second.refund(user, decision)  # the old window's refund creates no key in the new one
    assert redis.Redis.from_url(REDIS_URL).keys(f"chat:rate:send:{user}:{int(clock.now // 60)}") == []
