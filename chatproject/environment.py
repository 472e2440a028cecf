"""Typed readers of environment variables; chatproject/settings.py is their only caller.

A reader never raises on a bad value: it records a `Problem` and returns the default, so importing
the settings cannot crash with a traceback. chatproject/checks.py reports the recorded problems as
system check errors, which stop `manage.py` commands and the ASGI server (chatproject/application.py) with
a message naming the variable. Every variable read is also recorded with its default, which is how
tests/test_configuration.py holds docs/configuration.md to the code.

An empty value counts as unset; surrounding whitespace is ignored.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})

RATE_UNITS = {
    "s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400
}
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*")


def parse_rate(text: str) -> tuple[int, int]:
    """`N/unit` or `N/<k><unit>` (e.g. `100/min`, `5/10s`) as (limit, period in seconds)."""
    match = _RATE.fullmatch(text.lower())
    if not match or match.group(3) not in RATE_UNITS or int(match.group(1)) < 1:
        raise ValueError(f"invalid rate {text!r}; expected e.g. '100/min'")
    return int(match.group(1)), int(match.group(2) or 1) * RATE_UNITS[match.group(3)]


@dataclass(frozen=True)
class Problem:
    """A variable whose value cannot be used; the process must not serve with it."""

    name: str
    value: str
    expected: str

    def __str__(self) -> str:
        return f"{self.name}={self.value!r} is invalid: expected {self.expected}"


class EnvReader:
    """Reads variables from `environ`, recording each name with its default and each bad value."""

    HIDDEN = "<hidden>"

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self.defaults: dict[str, Any] = {}
        self.problems: list[Problem] = []

    def invalid(self, name: str, value: str, expected: str, *, secret: bool = False) -> None:
        """Record a bad value found by the caller (for values only the settings can judge)."""
        self.problems.append(Problem(name, self.HIDDEN if secret else value, expected))

    def _read(
        self, name: str, default: T, parse: Callable[[str], T], expected: str, *,
        secret: bool = False, strip: bool = True,
    ) -> T:
        self.defaults[name] = default
        raw = self._environ.get(name, "")
        if not raw.strip():
            return default
        try:
            return parse(raw.strip() if strip else raw)
        except ValueError:
            self.invalid(name, raw, expected, secret=secret)
            return default

    def str(
        self, name: str, default: str = "", *, choices: Collection[str] = (), secret: bool = False, strip: bool = True
    ) -> str:
        """Text; with `choices`, one of them matched case-insensitively and returned as spelled there."""
        if not choices:
            return self._read(name, default, lambda value: value, "text", secret=secret, strip=strip)
        canonical = {choice.lower(): choice for choice in choices}

        def choose(value: str) -> str:
            return canonical[value.lower()] if value.lower() in canonical else _fail()

        return self._read(name, default, choose, "one of " + ", ".join(choices), secret=secret)

    def int(
        self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None,
        choices: Collection[int] = (),
    ) -> int:
        def parse(value: str) -> int:
            number = int(value)
            if choices and number not in choices:
                _fail()
            return _in_range(number, minimum, maximum)

        if choices:
            expected = "one of " + ", ".join(map(repr, choices))
        else:
            expected = "an integer" + _range_text(minimum, maximum)
        return self._read(name, default, parse, expected)

    def float(
        self, name: str, default: float, *, minimum: float | None = None, maximum: float | None = None,
        positive: bool = False,
    ) -> float:
        def parse(value: str) -> float:
            number = float(value)
            if not math.isfinite(number) or (positive and number <= 0):
                _fail()
            return _in_range(number, minimum, maximum)

        expected = "a number" + (" > 0" if positive else "") + _range_text(minimum, maximum)
        return self._read(name, default, parse, expected)

    def bool(self, name: str, default: bool) -> bool:
        def parse(value: str) -> bool:
            value = value.lower()
            return True if value in TRUE else False if value in FALSE else _fail()

        return self._read(name, default, parse, "true or false (1/0, yes/no, on/off)")

    def list(self, name: str, default: str) -> list[str]:
        """Comma-separated; `default` is written the same way."""
        split = lambda value: [item.strip() for item in value.split(",") if item.strip()]  # noqa: E731
        return self._read(name, split(default), split, "a comma-separated list")

    def rate(self, name: str, default: str) -> str:
        """A rate such as `100/min`, validated here and kept as text (chat.ratelimit parses it)."""

        def parse(value: str) -> str:
            parse_rate(value)
            return value

        return self._read(name, default, parse, "a rate such as 100/min (N/s, N/min, N/h or N/day)")


def _fail() -> Any:
    raise ValueError


def _in_range(number: T, minimum: Any, maximum: Any) -> T:
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        _fail()
    return number


def _range_text(minimum: Any, maximum: Any) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""
