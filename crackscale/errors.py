"""How an exception is named in a one-line error: every message the user reads goes through here."""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first non-blank line of ``e``'s message, or its type's name when it has none (a bare
    ``KeyError()``); tracebacks and multi-line library dumps stay in the logs."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__
