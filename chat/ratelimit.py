"""Send rate limit: CHAT_SEND_RATE per user, across REST and WebSocket and across processes.

Fixed windows counted atomically in Redis (one Lua call: INCR, and PEXPIRE on the first hit) when
REDIS_URL is set; counted in this process otherwise, and also when Redis fails, so an outage
loosens the limit to per-process but never removes it and never fails a send.
"""
from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from django.conf import settings

from chat import metrics

logger = logging.getLogger(__name__)

_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}


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

    def headers(self) -> dict[str, str]:
        """The IETF RateLimit header fields (draft-ietf-httpapi-ratelimit-headers)."""
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(max(1, math.ceil(self.reset))),
        }


def parse_rate(text: str) -> Rate:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*", text.lower())
    if not match or match.group(3) not in _UNITS or int(match.group(1)) < 1:
        raise ValueError(f"invalid rate {text!r}; expected e.g. '100/min'")
    return Rate(int(match.group(1)), int(match.group(2) or 1) * _UNITS[match.group(3)])


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


REDIS_RETRY_SECONDS = 1.0

_LUA_HIT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('PTTL', KEYS[1])}
"""


class SendRateLimiter:
    def __init__(self, rate: Rate, redis_url: str = "", clock: Callable[[], float] = time.time) -> None:
        self.rate = rate
        # Wall-clock seconds: windows are numbered from it, and every process must agree on them.
        self.clock = clock
        self._local = LocalWindowCounter()
        self._redis_hit = None
        # After a Redis failure, count locally for a moment instead of paying a timeout per send.
        self._redis_retry_at = 0.0
        if redis_url:
            import redis

            client = redis.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
            self._redis_hit = client.register_script(_LUA_HIT)

    def check(self, user_id: object) -> Decision:
        """Count a send by `user_id` and say whether it may go ahead."""
        now = self.clock()
        key = f"chat:rate:send:{user_id}"
        count, remaining = None, 0.0
        if self._redis_hit is not None and now >= self._redis_retry_at:
            window = int(now // self.rate.period)
            try:
                count, ttl_ms = self._redis_hit(keys=[f"{key}:{window}"], args=[self.rate.period * 1000])
                remaining = max(ttl_ms, 0) / 1000
            except Exception as exc:  # any Redis failure: degrade, never fail the send
                self._redis_retry_at = now + REDIS_RETRY_SECONDS
                logger.warning("rate limit: Redis unavailable (%s); counting per process", exc)
        if count is None:
            if self._redis_hit is not None:
                metrics.rate_limit_degraded.inc()
            count, remaining = self._local.hit(key, self.rate.period, now)
        return Decision(
            allowed=count <= self.rate.limit,
            limit=self.rate.limit,
            remaining=max(self.rate.limit - count, 0),
            reset=max(remaining, 0.001),
        )


@cache
def get_send_rate_limiter() -> SendRateLimiter:
    return SendRateLimiter(parse_rate(settings.CHAT_SEND_RATE), settings.REDIS_URL)
