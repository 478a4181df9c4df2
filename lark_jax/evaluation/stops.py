"""Stopping a completion at its first complete ``\\boxed{...}`` or at a stop string.

The reference's evaluation ends each sample as soon as its text holds a complete
``\\boxed{...}`` (nested braces balanced) and cuts the text right after the closing
brace; stop strings end it right after the string. Both are checked on the decoded
text, so a stop inside a token is cut inside that token's text.
"""

from __future__ import annotations

from lark_jax.errors import LarkError
from lark_jax.evaluation.answers import box_arguments


def boxed_end(text: str) -> int | None:
    """Index just past the closing brace of the first complete ``\\boxed{...}``, or None.

    The graders' own rules (``answers``): ``\\boxed`` or ``\\fbox``, optional spaces,
    a brace group with nested braces, escaped braces (``\\{``) being content. An
    unclosed first box is not complete (a later box would sit inside it); a box with
    no brace group (``\\boxed 5``) never ends generation (the next token might extend
    it), though the graders still read it.
    """
    for _, end, braced in box_arguments(text):
        if braced:
            return end
    return None


def stop_end(text: str, boxed: bool, strings) -> int | None:
    """Index just past the earliest stop in ``text`` (a complete box or a stop string)."""
    ends = []
    if boxed:
        e = boxed_end(text)
        if e is not None:
            ends.append(e)
    for s in strings:
        k = text.find(s)
        if k != -1:
            ends.append(k + len(s))
    return min(ends) if ends else None


class TextStop:
    """``stop(tokens)`` for ``generate_ids`` and the matching text cut."""

    def __init__(self, tokenizer, boxed: bool = False, strings=()):
        strings = tuple(strings)
        if any(not isinstance(s, str) or not s for s in strings):
            raise LarkError("stop strings must be non-empty strings")
        self.tok, self.boxed, self.strings = tokenizer, boxed, strings
        self.active = boxed or bool(strings)

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def __call__(self, ids: list[int]) -> int | None:
        """The fewest leading tokens whose text holds a stop, or None."""
        if stop_end(self._decode(ids), self.boxed, self.strings) is None:
            return None
        lo, hi = 1, len(ids)  # monotone: the stop stays once its tokens are there
        while lo < hi:
            mid = (lo + hi) // 2
            if stop_end(self._decode(ids[:mid]), self.boxed, self.strings) is None:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def text(self, ids: list[int]) -> str:
        """The decoded completion, cut right after its first stop."""
        t = self._decode(ids)
        e = stop_end(t, self.boxed, self.strings) if self.active else None
        return t if e is None else t[:e]
