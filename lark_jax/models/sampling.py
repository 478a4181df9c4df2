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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lark_jax.numerics import vocab_blocks


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


def top_p_keep(z, top_p):
    """The kept set of top-p over scaled logits z [B, V] (module docstring), bool [B, V].

    ``top_p`` is a scalar in (0, 1]; at 1 every token with non-zero probability stays.
    Fast path: when the ``PREFILTER_K`` most likely tokens of every row hold at least
    ``top_p`` of its mass, the nucleus lies among them, and ``lax.top_k`` (descending,
    ties by lower id: the stable sort's order) gives it directly. Otherwise (flat rows)
    the bisection below, also exact.
    """
    z = z.astype(jnp.float32)
    z = jnp.where(z == 0, jnp.float32(0), z)  # -0.0 and +0.0 are one value
    m = z.max(-1, keepdims=True)
    e = jnp.exp(z - m)
    total = _row_sum(e)[:, None]
    p = e / total
    k = min(PREFILTER_K, z.shape[-1])
    top_z, top_i = lax.top_k(z, k)
    top_p_mass = jnp.exp(top_z - m) / total
    before = jnp.cumsum(top_p_mass, -1) - top_p_mass
    fits = before[:, -1] + top_p_mass[:, -1] >= top_p  # [B]: the nucleus is in the top k
    rows = jnp.arange(z.shape[0])[:, None]
    from_top = jnp.zeros(z.shape, bool).at[rows, top_i].set(before < top_p)
    # Each row's path depends on that row alone (batch composition never changes a
    # sample); the bisection runs only when some row needs it, and never at top_p = 1.
    branch = jnp.where(top_p >= 1.0, 0, jnp.where(jnp.all(fits), 1, 2))
    return lax.switch(branch, [
        lambda: p > 0,
        lambda: from_top,
        lambda: jnp.where(fits[:, None], from_top, _bisect_keep(z, p, top_p)),
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
    keep = top_p_keep(z, top_p)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
    return draw(z, keep, u)
