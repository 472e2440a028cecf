"""JSON that cannot cost a 500: bounded nesting, and a walk that finds what no store can keep.

`json.loads` recurses once per container: `[` * 100000 raises RecursionError (not ValueError), which
slipped past every `except ValueError` as a 500 or a WebSocket close 1011. SPEC 4.1: bodies nested
deeper than 32 levels get a 400; NUL anywhere in metadata keys and values gets a 400 (PostgreSQL's
jsonb refuses it, and `json.dumps` escapes it, so a check of the serialized text never sees it).
"""
from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32


class JSONTooDeep(ValueError):
    """A ValueError, so code that already turns invalid JSON into a 400 covers this too."""

    def __init__(self, max_depth: int) -> None:
        super().__init__(f"JSON nested deeper than {max_depth} levels.")


def json_problem(value: Any, *, max_depth: int = MAX_DEPTH, refuse_nul: bool = False) -> str | None:
    """Why `value` (parsed JSON) is unacceptable, or None. Depth counts containers: `{}` is 1,
    `{"a": []}` is 2. Iterative, so no input can exhaust the stack here."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            if depth > max_depth:
                return f"Nested deeper than {max_depth} levels."
            for key, item in node.items():
                if refuse_nul and "\x00" in key:
                    return "Must not contain NUL characters."
                stack.append((item, depth + 1))
        elif isinstance(node, list):
            if depth > max_depth:
                return f"Nested deeper than {max_depth} levels."
            stack.extend((item, depth + 1) for item in node)
        elif refuse_nul and isinstance(node, str) and "\x00" in node:
            return "Must not contain NUL characters."
    return None


def check_depth(text: str | bytes, value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise JSONTooDeep if `value`, parsed from `text`, nests deeper than `max_depth`. A text with
    no more than `max_depth` opening brackets cannot, and most bodies are that: they skip the walk."""
    opening = (b"[", b"{") if isinstance(text, bytes) else ("[", "{")
    if text.count(opening[0]) + text.count(opening[1]) > max_depth and json_problem(value, max_depth=max_depth):
        raise JSONTooDeep(max_depth)


def loads_bounded(text: str | bytes, max_depth: int = MAX_DEPTH, **kwargs: Any) -> Any:
    """`json.loads`, raising ValueError (JSONTooDeep) for nesting deeper than `max_depth` instead of
    RecursionError or success."""
    try:
        value = json.loads(text, **kwargs)
    except RecursionError:
        raise JSONTooDeep(max_depth) from None
    check_depth(text, value, max_depth)
    return value
