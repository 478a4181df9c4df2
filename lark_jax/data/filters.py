"""Filters a pool passes through before scoring: verified, complete, decontaminated.

- ``require``: keep a trajectory only if each named column is true for it — a per-row
  boolean, or (one problem a row) a list parallel to the generations, such as
  OpenR1-Math's ``correctness_math_verify`` or ``is_reasoning_complete``.
- ``complete``: keep a trajectory only if it finished: its finish reason is ``stop``
  (``finish_reasons`` list / ``finish_reason`` column, where the pool has one), else its
  last assistant turn holds a closed ``\\boxed{...}``.
- ``exclude``: drop every trajectory of a pool problem that matches a benchmark problem:
  the same text after normalisation (lower case, words of letters and digits), or a
  shared 13-gram of those words. Public pools often contain AIME/MATH problems, the sets
  LARK is evaluated on.

Each filter counts what it drops (``FilterCounts``), which the scores header and the
select manifest report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable

from lark_jax.errors import LarkError

NGRAM = 13
_WORD = re.compile(r"[0-9a-z]+")


def normalise(text: str) -> list[str]:
    """The words of ``text`` for matching: lower case, runs of letters and digits."""
    return _WORD.findall(text.lower())


def _ngrams(words: list[str]) -> Iterable[bytes]:
    for i in range(len(words) - NGRAM + 1):
        yield hashlib.blake2b(" ".join(words[i:i + NGRAM]).encode(), digest_size=8).digest()


class Decontaminator:
    """Matches problem texts against a benchmark's: normalised exact match or a shared
    13-gram (hashed to 8 bytes; a false match needs a 64-bit collision)."""

    def __init__(self, texts: Iterable[str]):
        self.exact: set[str] = set()
        self.grams: set[bytes] = set()
        for t in texts:
            words = normalise(t)
            self.exact.add(" ".join(words))
            self.grams.update(_ngrams(words))

    def matches(self, text: str) -> bool:
        words = normalise(text)
        return " ".join(words) in self.exact or any(g in self.grams for g in _ngrams(words))


def has_closed_boxed(text: str) -> bool:
    """Whether ``text`` holds ``\\boxed{`` followed by its balanced closing brace."""
    start = text.rfind("\\boxed{")
    while start >= 0:
        depth = 0
        for ch in text[start + len("\\boxed"):]:
            depth += (ch == "{") - (ch == "}")
            if depth == 0:
                return True
        start = text.rfind("\\boxed{", 0, start)
    return False


@dataclasses.dataclass
class FilterCounts:
    """Trajectories (and problems, for decontamination) each filter dropped."""

    required: dict = dataclasses.field(default_factory=dict)  # column -> trajectories
    incomplete: int = 0
    contaminated_problems: int = 0
    contaminated_trajectories: int = 0
    too_long: int = 0  # over --max-tokens (counted where tokens are known: score)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def flag(value, where: str, column: str) -> bool:
    """A boolean cell of a --require column (None counts as false: not verified)."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    raise LarkError(f"column {column!r} must be true/false (--require), got {value!r}",
                    where=where)


FINISH_COLUMNS = ("finish_reasons", "finish_reason")


__all__ = ["NGRAM", "Decontaminator", "FilterCounts", "flag", "has_closed_boxed", "normalise"]
