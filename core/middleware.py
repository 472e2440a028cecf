"""Django middleware shared by every endpoint."""
from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote_plus

from django.http import HttpRequest, HttpResponse, JsonResponse


class RefuseNulInQueryMiddleware:
    """NUL anywhere in the query string (names or values, as `%00`) is a 400 for every endpoint:
    PostgreSQL refuses NUL in text, so `users/?search=%00` was a 500 there (SPEC 4.1). One check
    here instead of one per query parameter; user search and any later filter get it for free."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        query = request.META.get("QUERY_STRING", "")
        if "%00" in query or "\x00" in unquote_plus(query):
            return JsonResponse(
                {"detail": "Query parameters must not contain NUL characters.", "code": "bad_request"}, status=400
            )
        return self.get_response(request)
