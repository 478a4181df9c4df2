"""Stopping a completion at its first complete ``\\boxed{...}`` or at a stop string.

The reference's evaluation ends each sample as soon as its text holds a complete
``\\boxed{...}`` (nested braces balanced) and cuts the text right after the closing
brace; stop strings end it right after the string. Both are checked on the decoded
text, so a stop inside a token is cut inside that token's text.

While decoding, the exact check (decode every token, then the fewest tokens that hold
a stop) runs only when a stop may have appeared: after a token that can complete one
(``TextStop.triggers``: it holds ``}`` or a stop string's last character) and when the
text grown since the last look, read incrementally (``TextStop.scanner``), shows one.
The cost per sequence is then O(L) plus one exact check, not O(L) per look.
"""

from __future__ import annotations

import numpy as np

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
        self._triggers: dict[int, np.ndarray] = {}

    def triggers(self, vocab_size: int) -> np.ndarray:
        """bool [vocab_size]: the tokens after which a stop can first hold.

        A stop first holds when the character that ends it arrives: a box's closing
        ``}`` or a stop string's last character, both in the new token's own text. A
        character of several UTF-8 bytes can arrive split over tokens, so with such a
        last character the tokens whose own text is incomplete (U+FFFD) count too; ids
        the tokenizer does not know count as well. A stop that a token's context
        completes otherwise (rare decoder rules) is still found, when its row ends.
        """
        if vocab_size not in self._triggers:
            ends = {s[-1] for s in self.strings} | ({"}"} if self.boxed else set())
            if any(ord(c) > 127 for c in ends):
                ends.add("\ufffd")
            known = min(vocab_size, len(self.tok))
            texts = self.tok.batch_decode([[i] for i in range(known)],
                                          skip_special_tokens=True)
            flags = np.ones(vocab_size, bool)
            flags[:known] = [any(c in t for c in ends) for t in texts]
            self._triggers[vocab_size] = flags
        return self._triggers[vocab_size]

    def scanner(self) -> _Scan:
        """A per-sequence incremental test (``maybe``) run before the exact check."""
        return _Scan(self)

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


class _Scan:
    """One sequence's text, read incrementally, and where its stops could be.

    ``maybe(ids)`` decodes only the tokens added since the last call (plus a few before
    them, so a character split over tokens is read whole: the text of ids[a:] minus
    that of ids[a:b] is what ids[b:] adds), then looks for a stop string in the new
    text's tail and for a complete box from the first box command on. It answers True
    whenever a stop may be there; the exact ``TextStop.__call__`` decides.
    """

    def __init__(self, stop: TextStop):
        self.stop = stop
        self.text = ""
        self.prefix = self.read = 0  # text holds decode(ids[:read]); ids[prefix:read] re-read
        self.box_from: int | None = None  # where the first box command starts in text
        self.longest = max((len(s) for s in stop.strings), default=0)

    def maybe(self, ids: list[int]) -> bool:
        start = len(self.text)
        before = self.stop._decode(ids[self.prefix:self.read])
        after = self.stop._decode(ids[self.prefix:])
        if after.startswith(before):
            view = self.text + after[len(before):]
        else:  # the window reads differently alone (a decoder rule): read all once
            view, start, self.box_from = self.stop._decode(ids), 0, None
        if not view.endswith("\ufffd"):  # an incomplete character: read it again later
            self.text, self.prefix, self.read = view, max(len(ids) - 4, 0), len(ids)
        tail = view[max(start - self.longest, 0):]
        if any(s in tail for s in self.stop.strings):
            return True
        if not self.stop.boxed:
            return False
        box_from = self.box_from
        if box_from is None:
            at = [k for k in (view.find("\\boxed", max(start - 6, 0)),
                              view.find("\\fbox", max(start - 5, 0))) if k != -1]
            if not at:
                return False
            box_from = min(at)
            if view is self.text:
                self.box_from = box_from
        return boxed_end(view[box_from:]) is not None
