"""The scoring kernel: per-token statistics from logits, reduced per trajectory under jit.

For token t with logits z (float32) and target y, π = softmax(z):

    ce_t          = logsumexp(z) - z_y                              (exact, full vocabulary)
    brier_full_t  = 1 - 2 π_y + Σ_v π_v²                           (= ‖onehot(y) - π‖²)
    brier_topk_t  = 1 - 2 p_y + Σ_{v∈topK} p_v²,  p = softmax(z restricted to the top K),
                    p_y = 0 when y is not among the top K          (the reference's default)
    rank_t        = min(1 + #{v : z_v > z_y}, 100)                 (for RSR)

``score_batch`` runs the student on a packed batch; then, per device, it moves
the scored positions to the front and loops over chunks of them, so float32
logits exist for only ``chunk`` positions at a time and prompt or padding
positions never reach the head. Statistics are summed per (row, segment).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from lark_jax.learnability.conventions import RANK_CLIP
from lark_jax.numerics import blocks, vocab_blocks
from lark_jax.shapes import pow2_divisor

STATS = ("ce", "brier_topk", "brier_full", "rank", "tokens")


def blocked_top_k(z, k: int, block: int = 128):
    """``lax.top_k(z, k)`` over the last axis, in two small top-k's instead of one wide one.

    Split the V logits into blocks of ``block``. The k largest values lie in the k
    blocks with the largest maxima: any other block's maximum is at most the k-th
    largest block maximum, below or tied with k values from distinct blocks.
    So: block maxima (one cheap reduction), top-k of the V/block maxima, gather
    those k blocks in vocabulary order, top-k of their k·block values. Values
    and indices equal ``lax.top_k``'s, ties included (both prefer the lower
    index; a tied block maximum also selects the lower block). A wide top-k is a
    sort on some backends; this is ~3x faster on CPU at V = 151,936.
    """
    v = z.shape[-1]
    nb = -(-v // block)
    if nb <= 2 * k:  # a small vocabulary: one top-k is cheaper
        return lax.top_k(z, k)
    lead = z.shape[:-1]
    zb = blocks(z, block)
    # Blocks in vocabulary order: the candidates are then in index order and the stable
    # second top-k breaks ties by lower index, exactly as lax.top_k does.
    chosen = jnp.sort(lax.top_k(zb.max(-1), k)[1], axis=-1)
    cand = jnp.take_along_axis(zb, chosen[..., None], axis=-2)  # [..., k, block]
    vals, pos = lax.top_k(cand.reshape(*lead, k * block), k)
    return vals, jnp.take_along_axis(chosen, pos // block, axis=-1) * block + pos % block


def token_stats(z, y, top_k: int):
    """z: logits [..., V]; y: int targets [...] -> (ce, brier_topk, brier_full, rank).

    One pass over the vocabulary computes Σ e, Σ e² (e = exp(z - max z)) and
    #{z_v > z_y} together (a variadic reduction: XLA would otherwise evaluate
    the exponential once per sum), then ce = log Σe + (max - z_y) and
    Σ π² = Σe² / (Σe)².

    The sums are two-level (within blocks of the vocabulary, then across blocks;
    see ``lark_jax.numerics``): a float32 running sum over 151,936 terms would
    shift every CE by ~5e-4 nats.
    """
    z = z.astype(jnp.float32)
    z_y = jnp.take_along_axis(z, y[..., None], axis=-1)[..., 0]
    m = jax.lax.stop_gradient(z.max(-1))
    zb = vocab_blocks(z)
    e = jnp.exp(zb - m[..., None, None])
    gt = (zb > z_y[..., None, None]).astype(jnp.float32)
    sums = lax.reduce((e, e * e, gt), (0.0, 0.0, 0.0),
                      lambda a, b: (a[0] + b[0], a[1] + b[1], a[2] + b[2]), (zb.ndim - 1,))
    s1, s2, n_gt = (x.sum(-1) for x in sums)
    # log Σe + (max - z_y), not (max + log Σe) - z_y: with logits in the thousands the
    # latter rounds log Σe to the float32 spacing of max (~1e-3 at 1e4).
    ce = jnp.log(s1) + (m - z_y)
    p_y = jnp.exp(-ce)
    brier_full = 1.0 - 2.0 * p_y + s2 / (s1 * s1)
    top_v, top_i = blocked_top_k(z, top_k)
    p = jax.nn.softmax(top_v, axis=-1)
    p_true = jnp.where(top_i == y[..., None], p, 0.0).sum(-1)
    brier_topk = 1.0 - 2.0 * p_true + (p * p).sum(-1)
    rank = jnp.minimum(1.0 + n_gt, float(RANK_CLIP))
    return ce, brier_topk, brier_full, rank


def _head_stats_local(hidden, targets, weights, segments, w_head, *, top_k, max_segments,
                      chunk_tokens, round_logits=None):
    """Per-device body: compact scored positions to the front, then loop over chunks.

    Only ceil(#scored / chunk) chunks run, so prompt tokens and row padding never
    reach the [chunk, V] head matmul or the vocabulary reductions. With
    ``round_logits`` (a dtype name, e.g. "bfloat16") the float32-accumulated logits
    are rounded to that dtype before the float32 statistics: what a bf16 forward
    followed by ``.float()`` computes (the reference's scorer).
    """
    b, length, d = hidden.shape
    n = b * length
    c = pow2_divisor(n, chunk_tokens)
    w = weights.reshape(n)
    order = jnp.argsort(w <= 0, stable=True)
    count = (w > 0).sum()
    h = hidden.reshape(n, d)[order]
    y = targets.reshape(n)[order]
    w = w[order]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, length))
    slot = jnp.where(segments >= 0, rows * max_segments + segments, 0).reshape(n)[order]

    def body(i, acc):
        hs = lax.dynamic_slice_in_dim(h, i * c, c)
        ys, ws, ss = (lax.dynamic_slice_in_dim(x, i * c, c) for x in (y, w, slot))
        z = jnp.einsum("cd,vd->cv", hs, w_head, preferred_element_type=jnp.float32)
        if round_logits is not None:
            z = z.astype(round_logits).astype(jnp.float32)
        stats = jnp.stack([*token_stats(z, ys, top_k), jnp.ones_like(ws)], axis=-1)
        return acc + jax.ops.segment_sum(stats * ws[:, None], ss, num_segments=b * max_segments)

    acc = lax.fori_loop(0, (count + c - 1) // c, body,
                        jnp.zeros((b * max_segments, len(STATS)), jnp.float32))
    return acc.reshape(b, max_segments, len(STATS))


VOCAB_KERNELS = ("xla", "pallas")


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k", "max_segments", "chunk_tokens",
                                             "mesh", "round_logits", "vocab_kernel"))
def score_batch(graphdef, state, ids, positions, segments, targets, weights, *, top_k: int,
                max_segments: int, chunk_tokens: int = 1024, mesh=None,
                round_logits: str | None = None, vocab_kernel: str = "xla"):
    """Per-(row, segment) sums of the statistics: float32 [B, max_segments, 5].

    The last channel counts scored tokens. Padding (segment -1) and unscored
    positions (weight 0) contribute nothing. The model runs under the mesh's
    shardings; the head and statistics run per device (``shard_map`` over
    "data"), each on its own rows. ``vocab_kernel="pallas"``: the head and statistics as
    the fused Pallas kernel (``pallas_vocab``: no [chunk, V] logits in memory; interpreted
    on a CPU, where it is slow and only a check), instead of chunked XLA.
    """
    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(ids, positions, segments)
    if vocab_kernel == "pallas":
        from lark_jax.learnability.pallas_vocab import segment_stats

        local = functools.partial(segment_stats, top_k=top_k, max_segments=max_segments,
                                  round_logits=round_logits,
                                  interpret=jax.default_backend() == "cpu")
    else:
        local = functools.partial(_head_stats_local, top_k=top_k, max_segments=max_segments,
                                  chunk_tokens=chunk_tokens, round_logits=round_logits)
    if mesh is None:
        return local(hidden, targets, weights, segments, model.head_weight())
    data = P("data")
    return jax.shard_map(local, mesh=mesh, in_specs=(data, data, data, data, P()),
                         out_specs=data, check_vma=False)(
        hidden, targets, weights, segments, model.head_weight())
