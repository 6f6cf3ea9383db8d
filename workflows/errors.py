"""Errors meant for the user: printed as one clear message, never as a stack trace."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Bad input or environment the user can fix; the message says what and how."""


MAX_SHOWN_VALUE = 200
"""Characters of an offending value a message shows; the rest is cut, with its length said."""

MAX_MESSAGE = 600
"""Characters of one message line; longer ones lose their middle, so the fix at the end stays."""


def shown(value: Any) -> str:
    """`repr(value)` for a message, cut after MAX_SHOWN_VALUE characters with its length said:
    a 100 KB string gives `'aaa'… (100000 characters)`, not a 100 KB line."""
    text = repr(value)
    if len(text) <= MAX_SHOWN_VALUE:
        return text
    if isinstance(value, str):
        return f"{value[:MAX_SHOWN_VALUE]!r}… ({len(value)} characters)"
    return f"{text[:MAX_SHOWN_VALUE]}… ({len(text)} characters)"


def clipped(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text`, or its beginning and end with the middle cut when it is longer than `limit`."""
    if len(text) <= limit:
        return text
    keep = (limit - 40) // 2
    cut = len(text) - 2 * keep
    return f"{text[:keep]} […{cut} characters cut…] {text[-keep:]}"
