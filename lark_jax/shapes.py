"""How lengths and batch sizes are rounded before they reach a jitted function.

XLA compiles one program per distinct input shape, and a compile costs seconds
to minutes, so every stage pads its arrays to a small set of shapes. The rules,
and why each stage uses the one it does:

* :func:`pow2_at_least` — powers of two: at most log2(max) shapes, up to 2× padding.
  Used where the count is small or the padding is cheap: decoding admissions
  (prompts prefetched at once), the demo's evaluation rows, training row length
  (rows are packed full, so only the longest record decides it).
* :func:`octave_bucket` — eight steps per octave: ≤ 12.5 % padding, ≈ 8 shapes per
  doubling. Used for scoring row lengths, where a pool's long tail of lengths
  would waste up to half of every long row under powers of two.
* :func:`padded_rows` — rows of a partial batch: the next power of two times the
  data-parallel width (so every device gets whole rows), capped at a full batch.
  Used by scoring and training for the last batch of a window or step.
* :func:`round_up` — a multiple of a fixed block: prompt lengths in generation
  (multiples of 64), so a cache capacity is a prompt bucket plus the new tokens.
* :func:`pow2_divisor` — the largest power-of-two chunk that divides a length,
  for scans over chunks of a sequence (cross-entropy, MLP, the kernel).
"""

from __future__ import annotations


def pow2_at_least(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1)."""
    return 1 << max(0, (n - 1).bit_length())


def round_up(n: int, m: int) -> int:
    """The smallest multiple of m ≥ n."""
    return -(-n // m) * m


def octave_bucket(n: int, minimum: int = 16) -> int:
    """n rounded up to one of 8 steps per octave (step ≥ 16), at least ``minimum``."""
    step = max(16, 1 << max(0, n.bit_length() - 4))
    return max(minimum, round_up(n, step))


def padded_rows(n: int, multiple: int, cap: int) -> int:
    """Rows for a batch holding n rows: multiple · 2^k ≥ n, at most ``cap``."""
    return min(cap, multiple * pow2_at_least(-(-n // multiple)))


def pow2_length(n: int, minimum: int = 64, maximum: int | None = None) -> int:
    """A row length for a longest item of n tokens: a power of two in [minimum, maximum]."""
    length = max(minimum, pow2_at_least(n))
    return length if maximum is None else min(length, max(minimum, maximum))


def pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides n and is at most max(cap, 1)."""
    c = 1 << (max(cap, 1).bit_length() - 1)
    while n % c:
        c //= 2
    return c
