"""Cursor pagination whose bad cursors are the caller's fault (400), never a 500 or a 404."""
from __future__ import annotations

from django.core.exceptions import FieldDoesNotExist, ValidationError
from rest_framework.exceptions import NotFound, ParseError
from rest_framework.pagination import Cursor, CursorPagination


class StrictCursorPagination(CursorPagination):
    """DRF answers an undecodable cursor with 404, and hands a decodable one's position to the
    database unchecked: `p=not-a-date` on a datetime ordering was a 500. Here both are 400
    `invalid_cursor`, and the position is converted by the ordering field before any query."""

    def decode_cursor(self, request) -> Cursor | None:
        try:
            cursor = super().decode_cursor(request)
        except NotFound:
            raise self._invalid() from None
        if cursor is None or cursor.position is None:
            return cursor
        field_name = self.ordering.lstrip("-") if isinstance(self.ordering, str) else self.ordering[0].lstrip("-")
        try:
            field = self._model._meta.get_field(field_name)
        except (AttributeError, FieldDoesNotExist):
            return cursor
        try:
            if "\x00" in cursor.position:
                raise ValidationError("NUL")
            field.to_python(cursor.position)
        except (ValidationError, ValueError, TypeError, OverflowError):
            raise self._invalid() from None
        return cursor

    def paginate_queryset(self, queryset, request, view=None):
        self._model = queryset.model
        return super().paginate_queryset(queryset, request, view)

    def _invalid(self) -> ParseError:
        return ParseError(self.invalid_cursor_message, code="invalid_cursor")
