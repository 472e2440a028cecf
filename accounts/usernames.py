"""What a username may be, and the one way it is normalized (register, login, throttle keys).

Usernames are NFKC-normalized (fullwidth `ａｄｍｉｎ` becomes `admin`), then must be ASCII letters,
digits and `. _ @ + -`, and are unique case-insensitively (a database constraint on their lower
case). ASCII only, because NFKC does not fold look-alikes from other scripts (Cyrillic `а` in
`аdmin`), and a per-script confusables check would still let whole-script look-alikes through;
names in any script belong in a display name, not in the handle people are addressed by.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

MAX_LENGTH = 150
PATTERN = re.compile(r"[A-Za-z0-9.@+_-]+", re.ASCII)
INVALID_MESSAGE = "Enter a username of ASCII letters, digits and . _ @ + - only."


def normalize_username(raw: str) -> str:
    return unicodedata.normalize("NFKC", raw)


def is_valid_username(name: str) -> bool:
    """`name` already normalized."""
    return len(name) <= MAX_LENGTH and PATTERN.fullmatch(name) is not None


def username_key(raw: str) -> str:
    """The case-insensitive identity of a username as typed: equal for `Admin`, `ADMIN`, `ａｄｍｉｎ`."""
    return normalize_username(raw).lower()


def throttle_subject(raw: str) -> str:
    """A bounded, opaque key for the per-username login throttle (any input, however long or odd)."""
    return hashlib.sha256(username_key(raw).encode("utf-8", "surrogatepass")).hexdigest()[:32]
