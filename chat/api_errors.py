"""The one place domain errors become HTTP responses."""
from __future__ import annotations

import math

from rest_framework.exceptions import ErrorDetail
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from core.errors import ChatError, RateLimited, StoreUnavailable, ValidationFailed
from chat.store import StoreError


def exception_handler(exc, context):
    if isinstance(exc, StoreError):
        exc = StoreUnavailable()
    if isinstance(exc, ChatError):
        body = exc.detail if isinstance(exc, ValidationFailed) else {"detail": str(exc.detail), "code": exc.code}
        response = Response(body, status=exc.status)
        if isinstance(exc, RateLimited):
            response["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
            for name, value in exc.decision.headers().items():
                response[name] = value
        return response
    response = drf_exception_handler(exc, context)
    detail = getattr(exc, "detail", None)
    if response is not None and isinstance(response.data, dict) and isinstance(detail, ErrorDetail):
        # One shape for every error that is not about fields: {"detail", "code"}.
        response.data["code"] = detail.code
    return response
