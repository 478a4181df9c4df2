"""Per-token statistics straight from hidden states and the LM head, in a Pallas kernel
that never writes the [T, V] logits to memory.

For token t with hidden state h_t [d], head W [V, d] (the model's ``head_weight()``),
logits z = W h_t in float32 and target y, π = softmax(z) (as ``kernel.token_stats``):

    ce_t          = log Σ_v e^{z_v - m} + (m - z_y),   m = max_v z_v
    brier_full_t  = 1 - 2 π_y + Σ_v π_v²
                  = 1 - 2 e^{-ce_t} + Σ_v e^{2(z_v - m)} / (Σ_v e^{z_v - m})²
    brier_topk_t  = 1 - 2 p_y + Σ_{v∈topK} p_v²,   p = softmax of the K largest logits, ties
                    taken by lower index (``lax.top_k``'s order); p_y = 0 if y is not among them
    rank_t        = min(1 + #{v : z_v > z_y}, 100)

How: the grid is (row blocks of ``block_t`` tokens) × (``splits`` vocabulary ranges). Each
program walks its range in tiles of ``block_v`` columns: z = h·Wᵀ for the tile (in chunks of
``block_d`` along d), then it updates, per token, a running maximum m with
Σe^{z-m} and Σe^{2(z-m)} rescaled by e^{m_old - m_new} (the online log-sum-exp), the target's
logit z_y (taken from the very tile value, so ties with it are exact), and a running set of
the M = next_pow2(max(K, 99)) best (value, index) pairs, best meaning larger value, then
lower index. The set suffices for everything order-based:

- #{z_v > z_y} < 99 implies that all those v are in the set, so the clipped rank is exact;
- the position of y in (value desc, index asc) order is #{z_v > z_y} + #{v < y : z_v = z_y};
  when it is below K ≤ M, every v before y is in the set, so "y in the top K" is exact;
- the top K of the whole vocabulary is the top K of the set.

A tile merges into the set by repeated insertion of its best remaining candidate over the
set's worst member (lowest value, then highest index); only candidates above the worst can
enter (tiles come in index order, so a tie never displaces an earlier index), so after the
first tiles a real model's tile needs a few insertions, not M. Each program writes its
partial (m, Σe, Σe², z_y, set); plain JAX then merges the ``splits`` partials: rescaled sums,
and one sort of the [T, splits·M] set by (value desc, index asc).

Masked tokens give 0 for every statistic; a block of masked tokens skips its tiles (so
scored tokens first, as ``segment_stats`` orders them, leave padding free).
Runs with ``interpret=True`` on any backend; compiled, it targets GPU (Triton), untested on a
card so far: it is not the default scoring path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lark_jax.errors import LarkError
from lark_jax.learnability.conventions import RANK_CLIP
from lark_jax.shapes import pow2_divisor

_BIG = jnp.iinfo(jnp.int32).max


def set_size(top_k: int) -> int:
    """M, the running set's size: a power of two (GPU block shapes) ≥ max(K, RANK_CLIP - 1)."""
    return pl.next_power_of_2(max(top_k, RANK_CLIP - 1))


def _merge_tile(z, col, tv, ti):
    """The set (tv, ti) [bt, M] after offering the tile's logits z with column ids col [bt, bv].

    Candidates go in (value desc, index asc) order; each replaces the set's worst member
    (lowest value, then highest index) when strictly larger: an equal value from this tile
    always has the higher index, so it never wins.
    """
    worst = tv.min(-1)
    trips = jnp.minimum((z > worst[:, None]).sum(-1).max(), tv.shape[-1])

    def insert(_, carry):
        cand, tv, ti = carry
        v = cand.max(-1)
        i = jnp.where(cand == v[:, None], col, _BIG).min(-1)
        cand = jnp.where(col == i[:, None], -jnp.inf, cand)
        w = tv.min(-1)
        wi = jnp.where(tv == w[:, None], ti, -_BIG).max(-1)
        slot = (ti == wi[:, None]) & (v > w)[:, None]
        return cand, jnp.where(slot, v[:, None], tv), jnp.where(slot, i[:, None], ti)

    _, tv, ti = lax.fori_loop(0, trips, insert, (z, tv, ti))
    return tv, ti


def _kernel(h_ref, y_ref, mask_ref, w_ref, m_ref, s1_ref, s2_ref, zy_ref, tv_ref, ti_ref, *,
            vocab, split_len, block_v, block_d, round_logits):
    bt, d = h_ref.shape
    top_m = tv_ref.shape[-1]
    y = y_ref[...]
    lo = pl.program_id(1) * split_len
    hi = jnp.minimum(lo + split_len, vocab)
    n_tiles = jnp.maximum(hi - lo + block_v - 1, 0) // block_v  # 0 for a range past V
    n_tiles = jnp.where(mask_ref[...].max() > 0, n_tiles, 0)
    lane = lax.broadcasted_iota(jnp.int32, (bt, block_v), 1)

    def tile(t, carry):
        m, s1, s2, zy, tv, ti = carry
        nominal = lo + t * block_v
        # The last tile of the vocabulary is read in bounds (shifted left); its columns
        # before ``nominal`` were counted by the previous tile and are masked out.
        start = jnp.minimum(nominal, vocab - block_v)
        z = jnp.zeros((bt, block_v), jnp.float32)
        for k in range(0, d, block_d):
            z += lax.dot_general(h_ref[:, pl.ds(k, block_d)],
                                 w_ref[pl.ds(start, block_v), pl.ds(k, block_d)],
                                 (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if round_logits is not None:
            z = z.astype(round_logits).astype(jnp.float32)
        col = start + lane
        valid = (col >= nominal) & (col < hi)
        zy = zy + jnp.where(valid & (col == y[:, None]), z, 0.0).sum(-1)
        z = jnp.where(valid, z, -jnp.inf)
        m_new = jnp.maximum(m, z.max(-1))
        scale = jnp.exp(m - m_new)
        e = jnp.exp(z - m_new[:, None])
        s1 = s1 * scale + e.sum(-1)
        s2 = s2 * (scale * scale) + (e * e).sum(-1)
        tv, ti = _merge_tile(z, col, tv, ti)
        return m_new, s1, s2, zy, tv, ti

    zeros = jnp.zeros((bt,), jnp.float32)
    init = (jnp.full((bt,), -jnp.inf, jnp.float32), zeros, zeros, zeros,
            jnp.full((bt, top_m), -jnp.inf, jnp.float32),
            # Empty slots: distinct negative ids, so exactly one is "the worst" at a time.
            -1 - lax.broadcasted_iota(jnp.int32, (bt, top_m), 1))
    m, s1, s2, zy, tv, ti = lax.fori_loop(0, n_tiles, tile, init)
    m_ref[...], s1_ref[...], s2_ref[...], zy_ref[...] = m, s1, s2, zy
    tv_ref[...], ti_ref[...] = tv, ti


def _check(hidden, head, targets, mask, top_k):
    if hidden.ndim != 2 or head.ndim != 2 or hidden.shape[1] != head.shape[1]:
        raise LarkError(f"vocab_stats: hidden [T, d] and head [V, d] expected, got "
                        f"{tuple(hidden.shape)} and {tuple(head.shape)}")
    if targets.shape != hidden.shape[:1] or mask.shape != hidden.shape[:1]:
        raise LarkError(f"vocab_stats: targets and mask must be [T] = [{hidden.shape[0]}], got "
                        f"{tuple(targets.shape)} and {tuple(mask.shape)}")
    if not 1 <= top_k <= head.shape[0]:
        raise LarkError(f"vocab_stats: top_k must be in [1, V = {head.shape[0]}], got {top_k}")


@functools.partial(jax.jit, static_argnames=("top_k", "block_t", "block_v", "block_d", "splits",
                                             "round_logits", "interpret"))
def vocab_stats(hidden, head, targets, mask, *, top_k: int = 50, block_t: int = 32,
                block_v: int = 128, block_d: int | None = None, splits: int = 8,
                round_logits: str | None = None, interpret: bool = False):
    """(ce, brier_topk, brier_full, rank), float32 [T] each, 0 where ``mask`` is false.

    hidden [T, d], head [V, d] (any float dtype; products accumulate in float32), targets
    int [T] (in [0, V) where scored), mask bool [T]. ``round_logits`` (e.g. "bfloat16")
    rounds the float32 logits to that dtype first, as a bf16 forward followed by
    ``.float()`` does. ``block_d`` (default: the largest power of two ≤ 512 dividing d, else d)
    bounds the slice of d in one product.
    """
    _check(hidden, head, targets, mask, top_k)
    t, d = hidden.shape
    v = head.shape[0]
    block_v = min(block_v, v)
    if block_d is None:
        block_d = pow2_divisor(d, 512)
        block_d = block_d if block_d >= 16 else d  # one product beats many thin ones
    if d % block_d:
        raise LarkError(f"vocab_stats: block_d = {block_d} does not divide d = {d}")
    split_len = -(-v // (splits * block_v)) * block_v
    top_m = set_size(top_k)
    tp = -(-t // block_t) * block_t
    pad = tp - t
    h = jnp.pad(hidden, ((0, pad), (0, 0)))
    y = jnp.pad(targets.astype(jnp.int32), (0, pad))
    live = jnp.pad(mask.astype(jnp.int32), (0, pad))

    row = pl.BlockSpec((None, block_t), lambda i, s: (s, i))
    part = jax.ShapeDtypeStruct((splits, tp), jnp.float32)
    kernel = functools.partial(_kernel, vocab=v, split_len=split_len, block_v=block_v,
                               block_d=block_d, round_logits=round_logits)
    m, s1, s2, zy, tv, ti = pl.pallas_call(
        kernel,
        grid=(tp // block_t, splits),
        in_specs=[pl.BlockSpec((block_t, d), lambda i, s: (i, 0)),
                  pl.BlockSpec((block_t,), lambda i, s: (i,)),
                  pl.BlockSpec((block_t,), lambda i, s: (i,)),
                  pl.BlockSpec((v, d), lambda i, s: (0, 0))],
        out_specs=[row, row, row, row,
                   pl.BlockSpec((None, block_t, top_m), lambda i, s: (s, i, 0)),
                   pl.BlockSpec((None, block_t, top_m), lambda i, s: (s, i, 0))],
        out_shape=[part, part, part, part,
                   jax.ShapeDtypeStruct((splits, tp, top_m), jnp.float32),
                   jax.ShapeDtypeStruct((splits, tp, top_m), jnp.int32)],
        interpret=interpret,
    )(h, y, live, head)
    return _finish(m, s1, s2, zy, tv, ti, y, live > 0, top_k)[:, :t]


def _finish(m, s1, s2, zy, tv, ti, y, live, top_k):
    """Merge the splits' partials into the statistics: [4, Tp]."""
    mx = m.max(0)
    scale = jnp.where(live, jnp.exp(m - mx), 0.0)  # a masked row's m is -inf everywhere
    s1, s2, zy = (s1 * scale).sum(0), (s2 * scale * scale).sum(0), zy.sum(0)
    ce = jnp.log(s1) + (mx - zy)
    brier_full = 1.0 - 2.0 * jnp.exp(-ce) + s2 / (s1 * s1)
    vals = jnp.moveaxis(tv, 0, 1).reshape(tv.shape[1], -1)  # [Tp, splits·M]
    ids = jnp.moveaxis(ti, 0, 1).reshape(vals.shape)
    rank = jnp.minimum(1.0 + (vals > zy[:, None]).sum(-1), float(RANK_CLIP))
    neg, ids = lax.sort((-vals, ids), dimension=-1, num_keys=2)  # value desc, then index asc
    top_v, top_i = -neg[:, :top_k], ids[:, :top_k]
    p = jax.nn.softmax(top_v, axis=-1)
    p_true = jnp.where(top_i == y[:, None], p, 0.0).sum(-1)
    brier_topk = 1.0 - 2.0 * p_true + (p * p).sum(-1)
    out = jnp.stack([ce, brier_topk, brier_full, rank])
    return jnp.where(live[None], out, 0.0)


def segment_stats(hidden, targets, weights, segments, w_head, *, top_k, max_segments,
                  **kernel_options):
    """``kernel._head_stats_local``'s result, [B, max_segments, 5], from ``vocab_stats``.

    The per-(row, segment) weighted sums of (ce, brier_topk, brier_full, rank, 1) over
    scored tokens (weight > 0). Scored tokens go first so whole blocks of unscored ones
    skip the vocabulary. Meant as a drop-in for the scorer's head once measured on a card.
    """
    b, length, d = hidden.shape
    n = b * length
    w = weights.reshape(n)
    order = jnp.argsort(w <= 0, stable=True)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, length))
    slot = jnp.where(segments >= 0, rows * max_segments + segments, 0).reshape(n)[order]
    w = w[order]
    stats = vocab_stats(hidden.reshape(n, d)[order], w_head, targets.reshape(n)[order], w > 0,
                        top_k=top_k, **kernel_options)
    stats = jnp.concatenate([stats.T, jnp.ones((n, 1), jnp.float32)], axis=-1)
    acc = jax.ops.segment_sum(stats * w[:, None], slot, num_segments=b * max_segments)
    return acc.reshape(b, max_segments, 5)
