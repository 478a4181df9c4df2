"""User-facing errors.

Anything the user can fix (bad file, bad option, unsupported model) raises
:class:`LarkError`; the CLI prints its message on one line and exits non-zero
without a traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LarkError(Exception):
    """An error caused by user input, reported as one clear line."""

    def __init__(self, message: str, *, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


def json_msg(e) -> str:
    """A JSONDecodeError's message without the dangling "at" some messages end with
    (the caller adds the position)."""
    return e.msg.removesuffix(" at")
