"""Domain errors. Each carries the HTTP status and the WebSocket error code it maps to, so the
REST exception handler and the consumer translate them the same way."""
from __future__ import annotations

import math


class ChatError(Exception):
    status = 400
    code = "bad_request"
    default_detail = "Bad request."

    def __init__(self, detail: object = None):
        self.detail = detail if detail is not None else self.default_detail
        super().__init__(str(self.detail))


class ValidationFailed(ChatError):
    """`detail` is a dict of field name -> list of messages, as DRF reports field errors."""

    status = 400
    code = "validation_error"


class AccessDenied(ChatError):
    # One error for "no such conversation" and "not yours": existence must not leak.
    status = 403
    code = "forbidden"
    default_detail = "You are not a participant of this conversation."


class NotAllowed(ChatError):
    """The caller is a participant but their role does not allow the action."""

    status = 403
    code = "forbidden"
    default_detail = "You do not have permission to perform this action."


class NotFound(ChatError):
    status = 404
    code = "not_found"
    default_detail = "Not found."


class RateLimited(ChatError):
    status = 429
    code = "rate_limited"
    default_detail = "Too many messages; slow down."

    def __init__(self, decision, *, what: str = "messages"):
        self.decision = decision  # core.ratelimit.Decision
        self.retry_after = decision.reset
        super().__init__(f"Too many {what}; retry in {math.ceil(decision.reset)} s.")


class IdempotencyMismatch(ChatError):
    status = 422
    code = "conflict"
    default_detail = "This idempotency key was already used with a different request body."


class StoreUnavailable(ChatError):
    status = 503
    code = "unavailable"
    default_detail = "The message store is unavailable; nothing was changed. Retry later."


class TooLarge(ChatError):
    """A body or file over a size limit, or over what the caller may still store."""

    status = 413
    code = "request_too_large"
    default_detail = "Too large."


class QuotaExceeded(TooLarge):
    code = "quota_exceeded"
