"""The API's JSON parser: DRF's, with nesting bounded (core.jsonsafe) so that no body reaches a 500."""
from __future__ import annotations

import io
from typing import Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from core.jsonsafe import MAX_DEPTH, JSONTooDeep, check_depth


class BoundedJSONParser(JSONParser):
    max_depth = MAX_DEPTH

    def parse(self, stream: Any, media_type: str | None = None, parser_context: dict | None = None) -> Any:
        # The body is already capped (core.bodylimit), so holding it once here is bounded.
        raw = stream.read()
        try:
            value = super().parse(io.BytesIO(raw), media_type, parser_context)
        except RecursionError:
            raise ParseError(f"JSON parse error - {JSONTooDeep(self.max_depth)}") from None
        try:
            check_depth(raw, value, self.max_depth)
        except JSONTooDeep as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
        return value
