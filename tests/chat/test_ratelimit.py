"""The send rate limit: parsing, per-process windows, and the atomic Redis counter (real Redis)."""
import threading
import uuid

import pytest

from core import ratelimit
from core.ratelimit import Rate, RateLimiter, parse_rate
from tests.services import REDIS_URL, redis_available, require


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


def test_local_window_allows_exactly_the_limit_and_then_refuses():
    limiter = RateLimiter(Rate(3, 60))
    decisions = [limiter.check("u1") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert 0 < decisions[-1].reset <= 60
    assert limiter.check("u2").allowed  # per user


@pytest.fixture
def redis_limiter():
    require("Redis", redis_available())
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()

    def make(rate: Rate) -> RateLimiter:
        return RateLimiter(rate, REDIS_URL)

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


def test_redis_window_expires(redis_limiter):
    import redis

    limiter = redis_limiter(Rate(1, 60))
    user = uuid.uuid4()
    assert limiter.check(user).allowed and not limiter.check(user).allowed
    keys = redis.Redis.from_url(REDIS_URL).keys(f"chat:rate:send:{user}:*")
    assert len(keys) == 1 and 0 < redis.Redis.from_url(REDIS_URL).pttl(keys[0]) <= 60_000


def test_redis_down_degrades_to_a_per_process_limit():
    """An unreachable Redis never fails a check and never removes the limit."""
    limiter = RateLimiter(Rate(2, 60), "redis://127.0.0.1:1/0")
    before = ratelimit.rate_limit_degraded._value.get()
    decisions = [limiter.check("u").allowed for _ in range(3)]
    assert decisions == [True, True, False]
    assert ratelimit.rate_limit_degraded._value.get() == before + 3
