"""Brute-force throttles (SPEC 4.1): failed logins per username and per client address, and
registrations per address. Counted by core.ratelimit: in Redis when REDIS_URL is set (shared by
every process), per process otherwise.

A login attempt is counted *before* its password is hashed and refunded when it succeeds, so only
failures spend the budget, and concurrent attempts cannot all slip past a count nobody has raised
yet. A success does not reset the count: an attacker who owns one account must not be able to
wipe an address's record with their own logins. Windows are fixed; a locked username or address
is free again when its window ends (Retry-After says when).

The client address is REMOTE_ADDR. Behind a reverse proxy the operator must make REMOTE_ADDR the
client's address (e.g. the proxy's PROXY protocol or daphne's --proxy-headers); X-Forwarded-For is
never read here, since any client can send one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from django.conf import settings

from accounts.usernames import throttle_subject
from core.errors import RateLimited
from core.ratelimit import Decision, RateLimiter, limiter_for


class LoginThrottled(RateLimited):
    def __init__(self, decision: Decision, what: str = "failed logins") -> None:
        super().__init__(decision)
        self.detail = f"Too many {what}; retry in {math.ceil(decision.reset)} s."
        self.args = (self.detail,)


def client_address(request) -> str:
    return (getattr(request, "META", None) or {}).get("REMOTE_ADDR") or "unknown"


@dataclass
class LoginAttempt:
    """The hits one login attempt counted, to refund if it succeeds."""

    counted: list[tuple[RateLimiter, str, Decision]]

    def succeeded(self) -> None:
        for limiter, subject, decision in self.counted:
            limiter.refund(subject, decision)


def login_attempt_begin(*, username: str, request) -> LoginAttempt:
    """Count the attempt against both budgets; LoginThrottled (nothing counted) when either is spent."""
    budgets = [
        (limiter_for("login-user", settings.CHAT_LOGIN_FAIL_RATE_USER), throttle_subject(username)),
        (limiter_for("login-addr", settings.CHAT_LOGIN_FAIL_RATE_ADDR), client_address(request)),
    ]
    attempt = LoginAttempt([(limiter, subject, limiter.check(subject)) for limiter, subject in budgets])
    refused = [decision for _, _, decision in attempt.counted if not decision.allowed]
    if refused:
        # A refused attempt checked no password: it is not a failure, so it does not count.
        attempt.succeeded()
        raise LoginThrottled(max(refused, key=lambda d: d.reset))
    return attempt


def registration_check(*, request) -> None:
    """Count a registration attempt by the caller's address; LoginThrottled when over."""
    decision = limiter_for("register", settings.CHAT_REGISTER_RATE).check(client_address(request))
    if not decision.allowed:
        raise LoginThrottled(decision, "registrations from this address")
