"""Login throttles for the views that are not DRF's (the admin and session login forms): their
LoginThrottled, raised by the authentication backend, becomes a 429 with Retry-After. DRF views
get the same answer from chat.api_errors."""
from __future__ import annotations

import math

from django.http import JsonResponse

from accounts.throttles import LoginThrottled


class LoginThrottleMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, LoginThrottled):
            return None
        response = JsonResponse({"detail": str(exception.detail), "code": exception.code}, status=429)
        response["Retry-After"] = str(max(1, math.ceil(exception.retry_after)))
        for name, value in exception.decision.headers().items():
            response[name] = value
        return response
