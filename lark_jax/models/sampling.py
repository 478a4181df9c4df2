"""Next-token choice without sorting the vocabulary: repetition penalty, exact top-p, sampling.

Order of operations (as in transformers' ``generate``): the repetition penalty
acts on the raw logits, then temperature, then the top-p filter, then a draw.

Repetition penalty (HF semantics, Keskar et al. 2019): for every token id that
occurs in the prompt or in what was generated so far,

    z_v ← z_v / r   if z_v > 0,      z_v ← z_v · r   otherwise.

Top-p (nucleus), the sort-based definition: order the tokens by probability,
descending, ties by lower token id (a stable sort); keep token v iff the mass of
the tokens ordered strictly before it is < top_p. Computed here without a sort:
let S(τ) = Σ_{u: z_u > τ} π_u, the mass strictly above a logit value τ, a
non-increasing step function. The kept set is

    {v : z_v > τ*}  ∪  {v : z_v = τ*, S(τ*) + r_v · π(τ*) < top_p}

where τ* is the smallest logit value with S(τ*) < top_p and r_v the rank of v
among the tokens tied at τ* (by token id). τ* is found exactly by bisection on
the 32-bit order-preserving integer image of the float32 logits: 32 masked sums
over the vocabulary instead of a sort of it (a sort is ~7x the cost of a whole
decoding step of a 4-layer 0.5B-shaped model on a CPU).

Draw: by inverse CDF in token-id order, one uniform per row, u ~ U[0, Σ kept π):
the first token whose cumulative kept mass exceeds u. Every token's probability
is its renormalised π, so this is an exact draw (up to float32 rounding), and a
row's draw depends only on its own key (no [B, V] Gumbel noise).

Per decoding step (``sample``), when the nucleus of every row lies among its top
``PREFILTER_K`` tokens, the kept set and the draw are computed on those candidates:
the same float values as the full-vocabulary path (the CDF's two-level sums are
formed over the same blocks, laid out only where a kept token lies), so the same
ids, at the cost of one max, one Σ exp and one ``top_k`` over the vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lark_jax.numerics import sum_block, vocab_blocks


def apply_repetition_penalty(z, seen, penalty):
    """z [B, V] float; seen [B, V] bool (ids in prompt + generated); penalty > 0."""
    return jnp.where(seen, jnp.where(z > 0, z / penalty, z * penalty), z)


def _row_sum(x):
    """Σ over the last axis of non-negative terms in two levels (float32 stays accurate
    over 1.5e5 terms)."""
    return vocab_blocks(x, 0.0).sum(-1).sum(-1)


def _sortable(z):
    """float32 -> uint32 whose unsigned order is the float order (-0.0 and +0.0 equal)."""
    z = z.astype(jnp.float32)
    z = jnp.where(z == 0, jnp.float32(0), z)  # -0.0 == 0.0: one key for both zeros
    bits = lax.bitcast_convert_type(z, jnp.uint32)
    sign = bits >> 31
    return jnp.where(sign == 1, ~bits, bits | jnp.uint32(0x80000000))


PREFILTER_K = 256
DRAW_BLOCKS = 32  # vocabulary blocks of a kept set that the candidate draw lays out


class _Nucleus(NamedTuple):
    """What top-p needs of scaled logits z [B, V]: z with one zero (zn), e = exp(zn − m)
    for the row max m, total = Σ e, the top k logits and ids, the mass strictly before
    each of them in that order (before), and fits: the nucleus lies in the top k."""

    zn: jax.Array
    e: jax.Array
    total: jax.Array
    top_z: jax.Array
    top_i: jax.Array
    before: jax.Array
    fits: jax.Array


def _nucleus(z, top_p) -> _Nucleus:
    """The ``_Nucleus`` of z for ``top_p``."""
    z = z.astype(jnp.float32)
    z = jnp.where(z == 0, jnp.float32(0), z)  # -0.0 and +0.0 are one value
    m = z.max(-1, keepdims=True)
    e = jnp.exp(z - m)
    total = _row_sum(e)[:, None]
    k = min(PREFILTER_K, z.shape[-1])
    top_z, top_i = lax.top_k(z, k)
    top_p_mass = jnp.exp(top_z - m) / total
    before = jnp.cumsum(top_p_mass, -1) - top_p_mass
    fits = before[:, -1] + top_p_mass[:, -1] >= top_p  # [B]: the nucleus is in the top k
    return _Nucleus(z, e, total, top_z, top_i, before, fits)


def top_p_keep(z, top_p):
    """The kept set of top-p over scaled logits z [B, V] (module docstring), bool [B, V].

    ``top_p`` is a scalar in (0, 1]; at 1 every token with non-zero probability stays.
    Fast path: when the ``PREFILTER_K`` most likely tokens of every row hold at least
    ``top_p`` of its mass, the nucleus lies among them, and ``lax.top_k`` (descending,
    ties by lower id: the stable sort's order) gives it directly. Otherwise (flat rows)
    the bisection below, also exact.
    """
    return _keep(_nucleus(z, top_p), top_p)


def _keep(nu: _Nucleus, top_p):
    """``top_p_keep`` from a computed ``_Nucleus``."""
    z, p = nu.zn, nu.e / nu.total
    rows = jnp.arange(z.shape[0])[:, None]
    from_top = jnp.zeros(z.shape, bool).at[rows, nu.top_i].set(nu.before < top_p)
    # Each row's path depends on that row alone (batch composition never changes a
    # sample); the bisection runs only when some row needs it, and never at top_p = 1.
    branch = jnp.where(top_p >= 1.0, 0, jnp.where(jnp.all(nu.fits), 1, 2))
    return lax.switch(branch, [
        lambda: p > 0,
        lambda: from_top,
        lambda: jnp.where(nu.fits[:, None], from_top, _bisect_keep(z, p, top_p)),
    ])


def _bisect_keep(z, p, top_p):
    """Exact kept set by bisection on the order-preserving keys (module docstring)."""
    key = _sortable(z)
    lo = key.min(-1)
    hi = key.max(-1)  # S(hi) = 0 < top_p

    def mass_above(k):
        return _row_sum(jnp.where(key > k[:, None], p, 0.0))

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        below = mass_above(mid) < top_p  # the answer is <= mid
        return jnp.where(below, lo, mid + 1), jnp.where(below, mid, hi)

    lo, _ = lax.fori_loop(0, 32, step, (lo, hi))
    tau = lo[:, None]
    s_tau = mass_above(lo)[:, None]
    tied = key == tau
    p_tau = jnp.max(jnp.where(tied, p, 0.0), -1, keepdims=True)
    rank = jnp.cumsum(tied, axis=-1, dtype=jnp.int32) - 1
    return (key > tau) | (tied & (s_tau + rank.astype(jnp.float32) * p_tau < top_p))


def draw(z, keep, u):
    """Token ids [B]: inverse-CDF draw from softmax(z) restricted to ``keep``; u [B] in [0, 1)."""
    z = jnp.where(keep, z.astype(jnp.float32), -jnp.inf)
    e = jnp.exp(z - z.max(-1, keepdims=True))
    blk = vocab_blocks(e, 0.0)  # [B, nb, bs], two-level cumulative sums
    inner = jnp.cumsum(blk, -1)
    offsets = jnp.cumsum(inner[..., -1], -1) - inner[..., -1]
    cdf = (inner + offsets[..., None]).reshape(e.shape[0], -1)[:, :e.shape[1]]
    target = u * cdf[:, -1]
    # The first index whose CDF exceeds the target has non-zero mass, so it is kept.
    idx = jnp.argmax(cdf > target[:, None], axis=-1)
    return idx.astype(jnp.int32)


def _candidate_draw(z, top_z, top_i, keep_c, u):
    """``draw(z, keep, u)`` for a kept set given as candidates of the top k, computed on
    the vocabulary blocks that hold a kept token only.

    ``draw``'s CDF is two-level over the vocabulary's blocks of ``sum_block(V)`` tokens:
    cdf(v) = inner_b(v) + offset_b, with inner_b the cumulative sum within v's block b
    and offset_b = Σ_{b' ≤ b} t_b' − t_b (t: block totals). A block without a kept token
    has inner = 0 and t = 0, so its CDF is the constant offset_b. Here the blocks with
    kept tokens (at most ``DRAW_BLOCKS``, else ``ok`` is False) are laid out in block order
    as [B, R, block] with the kept masses at their offsets and zeros elsewhere, exactly as
    in ``draw``'s array, so the same cumulative sums give the same float values; the
    offsets come from the [B, nb] totals. The token is the first position in id order,
    over those blocks and the empty ones, whose CDF exceeds u · cdf(V − 1), as in ``draw``.

    Returns (token ids [B], ok [B]).
    """
    b, v = z.shape
    bs = sum_block(v)
    nb = -(-v // bs)
    r_max = min(DRAW_BLOCKS, nb)
    rows = jnp.arange(b)[:, None]
    e = jnp.where(keep_c, jnp.exp(top_z - top_z[:, :1]), 0.0)  # top_z[:, 0]: the kept max
    ids = jnp.where(keep_c, top_i, v)  # v: not kept, sorts last
    ids, e = lax.sort_key_val(ids, e)
    valid = ids < v
    blk = ids // bs
    prev = jnp.concatenate([jnp.full((b, 1), -1, blk.dtype), blk[:, :-1]], -1)
    new = valid & (blk != prev)
    rank = jnp.cumsum(new, -1, dtype=jnp.int32) - 1
    ok = rank[:, -1] < r_max  # the kept set spans at most r_max blocks
    rank = jnp.where(valid, rank, r_max)  # out of range: dropped
    grid = jnp.zeros((b, r_max, bs), jnp.float32).at[rows, rank, ids % bs].set(e, mode="drop")
    block_of = jnp.full((b, r_max), nb, jnp.int32).at[rows, rank].set(blk, mode="drop")
    inner = jnp.cumsum(grid, -1)
    totals = jnp.zeros((b, nb), jnp.float32).at[rows, block_of].set(inner[..., -1],
                                                                    mode="drop")
    offsets = jnp.cumsum(totals, -1) - totals
    cdf = inner + jnp.take_along_axis(offsets, jnp.minimum(block_of, nb - 1), -1)[..., None]
    # cdf(V - 1): the last block's inner value at V - 1 (0 when it holds no kept token)
    last = (block_of == nb - 1)[..., None] & (jnp.arange(bs) == (v - 1) % bs)
    total = jnp.sum(jnp.where(last, inner, 0.0), (1, 2)) + offsets[:, -1]
    target = u * total
    pos = block_of[..., None] * bs + jnp.arange(bs)  # token id of each grid cell
    over = (cdf > target[:, None, None]) & (block_of[..., None] < nb) & (pos < v)
    first_kept = jnp.min(jnp.where(over, pos, v), (1, 2))
    has_kept = jnp.zeros((b, nb), bool).at[rows, block_of].set(True, mode="drop")
    over_empty = ~has_kept & (offsets > target[:, None])
    first_empty = jnp.min(jnp.where(over_empty, jnp.arange(nb) * bs, v), -1)
    tok = jnp.minimum(first_kept, first_empty)
    # draw's argmax of an all-false row is 0
    return jnp.where(tok < v, tok, 0).astype(jnp.int32), ok


def sample(z, top_p, u):
    """Token ids [B]: a draw from top-p of softmax(z) (z [B, V], already penalised and
    scaled), u [B] in [0, 1); the same ids as ``draw(z, top_p_keep(z, top_p), u)``.

    When every row's nucleus lies in its ``PREFILTER_K`` most likely tokens and spans at
    most ``DRAW_BLOCKS`` vocabulary blocks (peaked rows: a trained model's usual case),
    the draw is computed from those candidates (``_candidate_draw``): the full vocabulary
    is read for its max, its mass and ``lax.top_k`` only. Otherwise, and at top_p = 1,
    the full-vocabulary kept set and draw.
    """
    z = z.astype(jnp.float32)
    nu = _nucleus(z, top_p)
    # The barrier keeps XLA:CPU from fusing the vocabulary-wide sums into the candidate
    # draw's small arrays, where they were recomputed per element (~80x slower).
    top_z, top_i, keep_c = lax.optimization_barrier((nu.top_z, nu.top_i, nu.before < top_p))
    tok, ok = _candidate_draw(z, top_z, top_i, keep_c, u)
    fast = (top_p < 1.0) & jnp.all(nu.fits & ok)
    return lax.cond(fast, lambda: tok, lambda: draw(z, _keep(nu, top_p), u))


def choose(logits, keys, *, temperature, top_p, greedy: bool, penalty=None, seen=None):
    """Next tokens [B] from logits [B, V]; ``keys`` [B] are per-row PRNG keys.

    ``penalty``/``seen`` apply the repetition penalty first when given.
    """
    z = logits.astype(jnp.float32)
    if penalty is not None:
        z = apply_repetition_penalty(z, seen, penalty)
    if greedy:
        return jnp.argmax(z, axis=-1).astype(jnp.int32)
    z = z / temperature
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
    return sample(z, top_p, u)
