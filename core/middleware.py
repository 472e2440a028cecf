"""Django middleware shared by every endpoint."""
from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl

from django.http import HttpRequest, HttpResponse, JsonResponse


class RefuseNulInQueryMiddleware:
    """NUL anywhere in the query string (names or values, as `%00`) is a 400 for every endpoint:
    PostgreSQL refuses NUL in text, so `users/?search=%00` was a 500 there (SPEC 4.1). One check
    here instead of one per query parameter; user search and any later filter get it for free.
    The answer is a field error per offending parameter, as DRF reports a bad query field."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        query = request.META.get("QUERY_STRING", "")
        if "%00" not in query and "\x00" not in query:
            return self.get_response(request)
        errors: dict[str, list[str]] = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            if "\x00" in name:
                errors["non_field_errors"] = ["Query parameter names must not contain NUL characters."]
            elif "\x00" in value:
                errors[name] = ["Must not contain NUL characters."]
        return JsonResponse(errors or {"non_field_errors": ["The query must not contain NUL characters."]}, status=400)
