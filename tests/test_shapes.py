"""The one shape-rounding module: its rules' guarantees, and how few programs a
long-tailed pool compiles to."""

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from lark_jax.data.chat import Tokenized
from lark_jax.learnability.runner import ScoreConfig, _batches
from lark_jax.shapes import (
    octave_bucket,
    padded_rows,
    pow2_at_least,
    pow2_divisor,
    pow2_length,
    round_up,
)

N = st.integers(1, 1 << 20)


@given(N)
def test_pow2_and_octave_buckets(n):
    p = pow2_at_least(n)
    assert p >= n and p & (p - 1) == 0 and p < 2 * n
    b = octave_bucket(n)
    assert b >= n and b % 16 == 0
    if n >= 128:  # eight steps per octave: under 12.5 % padding
        assert b - n < n / 8
    assert pow2_length(n, 64, 4096) in {64 << k for k in range(7)}
    assert pow2_length(n, 64, 4096) >= min(n, 4096)


@given(N, st.sampled_from([1, 2, 3, 4, 8]), st.integers(1, 64))
def test_padded_rows_and_round_up(n, multiple, units):
    cap = multiple * units
    r = padded_rows(n, multiple, cap)
    assert r == cap or (r >= n and r % multiple == 0 and pow2_at_least(r // multiple) ==
                        r // multiple)
    assert r <= cap and round_up(n, multiple) % multiple == 0 >= round_up(n, multiple) - n - \
        multiple + 1


@given(N, st.integers(1, 1 << 12))
def test_pow2_divisor(n, cap):
    c = pow2_divisor(n, cap)
    assert n % c == 0 and c <= max(cap, 1) and c & (c - 1) == 0
    assert n % (2 * c) or 2 * c > max(cap, 1)  # the largest such


def test_a_long_tailed_pool_compiles_to_few_shapes():
    """3,000 trajectories with lognormal lengths of 40 to 14,000 tokens (1,607 distinct
    lengths): the scorer's batches take 23 shapes, each one compiled program."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.5, 1.0, 3000).astype(int), 40, 30000)
    items = [Tokenized(np.zeros(n, np.int32), 5, int(n)) for n in lengths]
    cfg = ScoreConfig(row_length=2048, batch_tokens=16384)
    shapes = set()
    padded = 0
    for b in _batches(items, cfg, n_data=8):
        shapes.add(b.ids.shape)
        padded += b.ids.size
    assert len(set(lengths)) == 1607 and lengths.max() == 14271
    # Trajectories longer than a row get rows of their own bucketed length: eight per octave
    # above 2,048 up to 14,336, i.e. 2.8 octaves -> 22 lengths, plus the packed 2,048 rows.
    octaves = math.log2(14336 / 2048)
    assert len(shapes) <= 1 + math.ceil(8 * octaves) and len(shapes) == 23, sorted(shapes)
    assert padded / lengths.sum() < 1.3  # the padding they cost stays bounded
