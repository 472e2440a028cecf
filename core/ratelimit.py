"""Rate limits shared by processes: the send rate (CHAT_SEND_RATE per user, across REST and
WebSocket) and the authentication throttles use the same limiter under different scopes.

Fixed windows counted atomically in Redis (one Lua call: INCR, and PEXPIRE on the first hit) when
REDIS_URL is set; counted in this process otherwise, and also when Redis fails, so an outage
loosens the limit to per-process but never removes it and never fails a send.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

from django.conf import settings

from prometheus_client import Counter

from chatproject import environment

logger = logging.getLogger(__name__)

rate_limit_degraded = Counter(
    "chat_rate_limit_degraded_total", "Rate-limit checks answered per process because Redis failed."
)

@dataclass(frozen=True)
class Rate:
    limit: int
    period: int  # seconds


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset: float  # seconds until the window ends
    # Where the hit was counted, for refund(): the window's number, and whether Redis counted it.
    window: int | None = field(default=None, compare=False)
    shared: bool = field(default=False, compare=False)

    def headers(self) -> dict[str, str]:
        """The IETF RateLimit header fields (draft-ietf-httpapi-ratelimit-headers)."""
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(max(1, math.ceil(self.reset))),
        }


def parse_rate(text: str) -> Rate:
    """ValueError on a bad rate; the settings validate CHAT_SEND_RATE with the same grammar."""
    return Rate(*environment.parse_rate(text))


class LocalWindowCounter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, int]] = {}

    def hit(self, key: str, period: int, now: float) -> tuple[int, float]:
        """Count one hit; return (hits in the current window, seconds until it ends)."""
        window = int(now // period)
        with self._lock:
            start, count = self._counts.get(key, (window, 0))
            count = count + 1 if start == window else 1
            self._counts[key] = (window, count)
            if len(self._counts) > 100_000:
                self._counts = {k: v for k, v in self._counts.items() if v[0] == window}
        return count, (window + 1) * period - now

    def unhit(self, key: str, window: int) -> None:
        with self._lock:
            start, count = self._counts.get(key, (window, 0))
            if start == window and count > 0:
                self._counts[key] = (window, count - 1)


REDIS_RETRY_SECONDS = 1.0

# One hit per key (a key may repeat: each hit counts), answered as count, ttl pairs in order.
_LUA_HIT = """
local out = {}
for _, key in ipairs(KEYS) do
  local n = redis.call('INCR', key)
  if n == 1 then redis.call('PEXPIRE', key, ARGV[1]) end
  out[#out + 1] = n
  out[#out + 1] = redis.call('PTTL', key)
end
return out
"""

# Only ever takes back a hit that was counted: never creates a key, never goes below zero.
_LUA_UNHIT = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n > 0 then return redis.call('DECR', KEYS[1]) end
return 0
"""


class RateLimiter:
    def __init__(
        self, rate: Rate, redis_url: str = "", *, scope: str = "send", clock: Callable[[], float] = time.time
    ) -> None:
        self.rate = rate
        self.scope = scope
        # Wall-clock seconds: windows are numbered from it, and every process must agree on them.
        self.clock = clock
        self._local = LocalWindowCounter()
        self._redis_hit = None
        self._redis_unhit = None
        # After a Redis failure, count locally for a moment instead of paying a timeout per send.
        self._redis_retry_at = 0.0
        if redis_url:
            import redis

            client = redis.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
            self._redis_hit = client.register_script(_LUA_HIT)
            self._redis_unhit = client.register_script(_LUA_UNHIT)

    def check(self, subject: object) -> Decision:
        """Count one hit by `subject` (a user id, an address) and say whether it may go ahead."""
        return self.check_many([subject])[0]

    def check_many(self, subjects: list[object]) -> list[Decision]:
        """`check` for each of `subjects` in order (one may appear more than once: each hit counts),
        in one round trip to Redis: a batch of sends pays one instead of one each."""
        if not subjects:  # (a batch whose every send was invalid: nothing to count)
            return []
        now = self.clock()
        window = int(now // self.rate.period)
        keys = [f"chat:rate:{self.scope}:{subject}" for subject in subjects]
        redis_counts: list[tuple[int, int]] | None = None
        if self._redis_hit is not None and now >= self._redis_retry_at:
            try:
                answer = self._redis_hit(keys=[f"{key}:{window}" for key in keys], args=[self.rate.period * 1000])
                redis_counts = list(zip(answer[0::2], answer[1::2]))
            except Exception as exc:  # any Redis failure: degrade, never fail the send
                self._redis_retry_at = now + REDIS_RETRY_SECONDS
                logger.warning("rate limit: Redis unavailable (%s); counting per process", exc)
        if redis_counts is None:
            if self._redis_hit is not None:
                rate_limit_degraded.inc(len(keys))
            counted = [self._local.hit(key, self.rate.period, now) for key in keys]
        else:
            counted = [(count, max(ttl_ms, 0) / 1000) for count, ttl_ms in redis_counts]
        return [
            Decision(
                allowed=count <= self.rate.limit,
                limit=self.rate.limit,
                remaining=max(self.rate.limit - count, 0),
                reset=max(remaining, 0.001),
                window=window,
                shared=redis_counts is not None,
            )
            for count, remaining in counted
        ]

    def refund(self, subject: object, decision: Decision) -> None:
        """Take back the hit `decision` counted (e.g. a login that turned out not to be a failure).
        Counting first and refunding after keeps the check atomic: concurrent attempts cannot all
        pass a look at the count before any of them is counted."""
        if decision.window is None:
            return
        key = f"chat:rate:{self.scope}:{subject}"
        if decision.shared and self._redis_unhit is not None:
            try:
                self._redis_unhit(keys=[f"{key}:{decision.window}"])
            except Exception as exc:  # a lost refund only makes the limit stricter until the window ends
                logger.warning("rate limit: Redis unavailable for a refund (%s)", exc)
            return
        self._local.unhit(key, decision.window)


@cache
def _limiter(scope: str, rate: str, redis_url: str) -> RateLimiter:
    return RateLimiter(parse_rate(rate), redis_url, scope=scope)


def limiter_for(scope: str, rate: str) -> RateLimiter:
    """The process's limiter for `scope` at `rate` (e.g. "100/min"), shared through REDIS_URL."""
    return _limiter(scope, rate, settings.REDIS_URL)


def get_send_rate_limiter() -> RateLimiter:
    return limiter_for("send", settings.CHAT_SEND_RATE)
