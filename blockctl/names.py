"""Validation of user-chosen names: concepts, tokens, class words, owners."""

from __future__ import annotations

import re
import unicodedata

from blockctl.errors import InvalidInput

MAX_NAME = 64
_CONCEPT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _common(kind: str, value: str) -> str:
    if not value:
        raise InvalidInput(f"{kind} must not be empty")
    if len(value) > MAX_NAME:
        raise InvalidInput(f"{kind} {value[:20]!r}... is longer than {MAX_NAME} characters")
    for ch in value:
        if ch.isspace() or unicodedata.category(ch).startswith("C"):
            raise InvalidInput(f"{kind} {value!r} contains whitespace or a control character")
    if "/" in value or "\\" in value or ".." in value:
        raise InvalidInput(f"{kind} {value!r} must not contain '/', '\\' or '..'")
    return value


def check_concept(value: str) -> str:
    """A concept name doubles as a file name, so it is kept to a portable alphabet."""
    _common("concept name", value)
    if not _CONCEPT.match(value):
        raise InvalidInput(
            f"concept name {value!r} may use letters, digits, '_', '.', '-' "
            "and must start with a letter or digit"
        )
    return value


def check_token(value: str) -> str:
    """A trigger token such as ``<rex>``: one word, no whitespace, never split by a tokenizer."""
    _common("token", value)
    return value


def check_word(kind: str, value: str) -> str:
    """A class word or owner name: one printable word."""
    return _common(kind, value)


def default_token(concept: str) -> str:
    return f"<{concept}>"
