"""The scoring kernel: per-token statistics from logits, reduced per trajectory under jit.

For token t with logits z (float32) and target y, π = softmax(z):

    ce_t          = logsumexp(z) - z_y                              (exact, full vocabulary)
    brier_full_t  = 1 - 2 π_y + Σ_v π_v²                           (= ‖onehot(y) - π‖²)
    brier_topk_t  = 1 - 2 p_y + Σ_{v∈topK} p_v²,  p = softmax(z restricted to the top K),
                    p_y = 0 when y is not among the top K          (the reference's default)
    rank_t        = min(1 + #{v : z_v > z_y}, 100)                 (for RSR)

``score_batch`` runs the student on a packed batch, then scans over sequence
chunks so that float32 logits exist for only ``chunk`` positions at a time,
and sums each statistic per (row, segment) with a one-hot contraction.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

RANK_CLIP = 100
STATS = ("ce", "brier_topk", "brier_full", "rank", "tokens")


def token_stats(z, y, top_k: int):
    """z: logits [..., V]; y: int targets [...] -> (ce, brier_topk, brier_full, rank)."""
    z = z.astype(jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    z_y = jnp.take_along_axis(z, y[..., None], axis=-1)[..., 0]
    ce = lse - z_y
    logp = z - lse[..., None]
    p_y = jnp.exp(-ce)
    brier_full = 1.0 - 2.0 * p_y + jnp.exp(2.0 * logp).sum(-1)
    top_v, top_i = lax.top_k(z, top_k)
    p = jax.nn.softmax(top_v, axis=-1)
    p_true = jnp.where(top_i == y[..., None], p, 0.0).sum(-1)
    brier_topk = 1.0 - 2.0 * p_true + (p * p).sum(-1)
    rank = jnp.minimum(1 + (z > z_y[..., None]).sum(-1), RANK_CLIP).astype(jnp.float32)
    return ce, brier_topk, brier_full, rank


def _chunk_size(batch: int, length: int, chunk_tokens: int) -> int:
    c = max(1, chunk_tokens // batch)
    c = 1 << (c.bit_length() - 1)  # power of two
    while length % c:
        c //= 2
    return c


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k", "max_segments", "chunk_tokens"))
def score_batch(graphdef, state, ids, positions, segments, targets, weights, *, top_k: int,
                max_segments: int, chunk_tokens: int = 1024):
    """Per-(row, segment) sums of the statistics: float32 [B, max_segments, 5].

    The last channel counts scored tokens. Padding (segment -1) and unscored
    positions (weight 0) contribute nothing.
    """
    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(ids, positions, segments)
    b, length, d = hidden.shape
    c = _chunk_size(b, length, chunk_tokens)
    n = length // c
    w_head = model.head_weight()

    def chunks(x):
        return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

    def body(acc, xs):
        h, y, w, seg = xs
        z = jnp.einsum("bcd,vd->bcv", h, w_head, preferred_element_type=jnp.float32)
        stats = jnp.stack([*token_stats(z, y, top_k), jnp.ones_like(w)], axis=-1) * w[..., None]
        onehot = (seg[..., None] == jnp.arange(max_segments)).astype(jnp.float32)
        return acc + jnp.einsum("bcs,bck->bsk", onehot, stats,
                                precision=lax.Precision.HIGHEST), None

    acc0 = jnp.zeros((b, max_segments, len(STATS)), jnp.float32)
    # Remat keeps the scan from saving per-chunk logits (only matters under autodiff,
    # but also stops XLA from hoisting the [B, L, V] head matmul out of the loop).
    acc, _ = lax.scan(jax.checkpoint(body), acc0,
                      (chunks(hidden), chunks(targets), chunks(weights), chunks(segments)))
    return acc
