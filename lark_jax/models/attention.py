"""Causal grouped-query attention with segment masks and KV-cache slots.

Masking is by *index*, not position: query i may attend key j iff
``kv_idx[j] <= q_idx[i]`` (causal in row/cache coordinates),
``q_seg[i] == kv_seg[j]`` (packed rows: no attention across records) and
``kv_valid[j]`` (left padding, unwritten cache slots). Positions only feed RoPE,
so packed rows can restart positions per record.

Three implementations with identical results up to float rounding:

* ``dense``: materialises the [B, H, T, S] scores; fastest for short rows and decoding.
* ``blockwise``: flash-style online softmax over (query block × key block)
  tiles under ``lax.scan``; tiles that are entirely masked (above the causal
  diagonal, other segments) are skipped with ``lax.cond``. Memory is
  O(B·H·block²) instead of O(B·H·T·S), which is what lets a 32k-token
  trajectory be scored in a few GB.
* ``flash``: JAX's fused Pallas attention kernel (Triton on GPU) with segment ids,
  for uncached rows only (scoring, training); a GPU option. Elsewhere it runs in
  Pallas interpret mode, which is exact but slow: tests only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

NEG = -1e30  # finite "minus infinity": keeps fully masked rows free of inf - inf = NaN


def _mask(q_idx, kv_idx, q_seg, kv_seg, kv_valid):
    m = kv_idx[:, None, :] <= q_idx[:, :, None]
    m &= q_seg[:, :, None] == kv_seg[:, None, :]
    m &= kv_valid[:, None, :]
    return m  # [B, T, S]


def dense_attention(q, k, v, q_idx, kv_idx, q_seg, kv_seg, kv_valid, *,
                    kv_heads_first: bool = False):
    """k, v: [B, S, Hkv, D], or [B, Hkv, S, D] with ``kv_heads_first`` (the KV cache's
    layout, read without a transpose)."""
    b, t, h, d = q.shape
    kvh = k.shape[1 if kv_heads_first else 2]
    kv = "bksd" if kv_heads_first else "bskd"
    qg = q.reshape(b, t, kvh, h // kvh, d)
    s = jnp.einsum(f"btkgd,{kv}->bkgts", qg, k, preferred_element_type=jnp.float32)
    s = s * (d**-0.5)
    mask = _mask(q_idx, kv_idx, q_seg, kv_seg, kv_valid)[:, None, None]
    s = jnp.where(mask, s, NEG)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    if kv_heads_first and v.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        # XLA:CPU has no bf16 x bf16 -> f32 dot for this contraction (the KV cache's
        # layout): the same products in float32 (exact for bf16 inputs) instead.
        p, v = p.astype(jnp.float32), v.astype(jnp.float32)
    o = jnp.einsum(f"bkgts,{kv}->btkgd", p, v, preferred_element_type=jnp.float32)
    return o.reshape(b, t, h, d).astype(q.dtype)


def _pad_to(x, n, axis, value):
    pad = (-x.shape[axis]) % n
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def blockwise_attention(q, k, v, q_idx, kv_idx, q_seg, kv_seg, kv_valid, *,
                        q_block=512, kv_block=512):
    b, t, h, d = q.shape
    s_len, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    q_block, kv_block = min(q_block, t), min(kv_block, s_len)
    scale = d**-0.5

    # Pad to whole blocks; padded keys are invalid, padded queries are dropped.
    q = _pad_to(q, q_block, 1, 0)
    q_idx_p = _pad_to(q_idx, q_block, 1, -1)
    q_seg_p = _pad_to(q_seg, q_block, 1, -1)
    k = _pad_to(k, kv_block, 1, 0)
    v = _pad_to(v, kv_block, 1, 0)
    kv_idx = _pad_to(kv_idx, kv_block, 1, 0)
    kv_seg = _pad_to(kv_seg, kv_block, 1, -2)
    kv_valid = _pad_to(kv_valid, kv_block, 1, False)
    nq, nk = q.shape[1] // q_block, k.shape[1] // kv_block

    def blocks(x, n, size):  # [B, n*size, ...] -> [n, B, size, ...]
        return jnp.moveaxis(x.reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)

    qs = blocks(q.reshape(b, -1, kvh, g, d), nq, q_block)
    kv_xs = (blocks(k, nk, kv_block), blocks(v, nk, kv_block), blocks(kv_idx, nk, kv_block),
             blocks(kv_seg, nk, kv_block), blocks(kv_valid, nk, kv_block))

    def one_q_block(args):
        qb, qi, qsg = args

        def kv_step(state, xs):
            kb, vb, ki, ksg, kval = xs
            mask = _mask(qi, ki, qsg, ksg, kval)  # [B, bq, bk]

            def update(state):
                m, l_sum, acc = state
                s = jnp.einsum("bqkgd,bskd->bkgqs", qb, kb,
                               preferred_element_type=jnp.float32) * scale
                mk = mask[:, None, None]
                s = jnp.where(mk, s, NEG)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None]) * mk
                corr = jnp.exp(m - m_new)
                l_sum = l_sum * corr + p.sum(-1)
                acc = acc * corr[..., None] + jnp.einsum(
                    "bkgqs,bskd->bkgqd", p.astype(vb.dtype), vb,
                    preferred_element_type=jnp.float32)
                return m_new, l_sum, acc

            return lax.cond(mask.any(), update, lambda s: s, state), None

        init = (jnp.full((b, kvh, g, q_block), NEG, jnp.float32),
                jnp.zeros((b, kvh, g, q_block), jnp.float32),
                jnp.zeros((b, kvh, g, q_block, d), jnp.float32))
        # Checkpointed tiles: under autodiff the backward pass recomputes each tile's
        # scores instead of the scan saving all of them (which is the full [T, S]
        # attention matrix again: 27 GB for a 16k-token 4-layer 0.5B-shaped step).
        (_, l_sum, acc), _ = lax.scan(jax.checkpoint(kv_step), init, kv_xs)
        out = acc / jnp.where(l_sum > 0, l_sum, 1.0)[..., None]
        return jnp.moveaxis(out, 3, 1)  # [B, bq, K, G, D]

    # Checkpointed query blocks too: otherwise the backward pass keeps every (query block,
    # key block) scan carry, nq·nk·[B, H, bq, D] floats (7.5 GB per layer at 32k tokens
    # for the 0.5B shape); now it recomputes one query block's scan at a time.
    out = lax.map(jax.checkpoint(one_q_block),
                  (qs, blocks(q_idx_p, nq, q_block), blocks(q_seg_p, nq, q_block)))
    out = jnp.moveaxis(out, 0, 1).reshape(b, nq * q_block, h, d)[:, :t]
    return out.astype(q.dtype)


FLASH_BLOCK = 128


def flash_attention(q, k, v, seg, *, mesh=None):
    """Causal attention within segments for uncached rows: q [B, T, H, D], k, v [B, T, Hkv, D].

    Query i attends key j iff j <= i (row index) and seg[i] == seg[j]: the
    ``blockwise`` mask when ``q_idx == kv_idx == arange(T)`` and every key is valid.
    Runs ``jax.experimental.pallas.ops.gpu.attention.mha`` (a fused flash kernel
    with its own backward pass). T is padded to whole 128-blocks with a segment no
    token has, D to a power of two with zeros (no effect on q·k; sliced off the
    output), and K/V heads are repeated to H (the kernel has no grouped heads).
    With a mesh, each device runs the kernel on its own rows (and heads, when
    they split over "model"), since XLA cannot partition a custom kernel itself.

    Costs to know: the kernel skips tiles above the diagonal but not tiles of other
    segments (``blockwise`` skips both), and the repeated K/V are H/Hkv times larger.
    On a GPU, float32 inputs multiply in TF32, as XLA's default float32 matmuls do.
    """
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    b, t, h, d = q.shape
    g = h // k.shape[2]
    if g > 1:
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    dp = 1 << max(d - 1, 1).bit_length()
    q, k, v = (_pad_to(x, dp, 3, 0) for x in (q, k, v))
    q, k, v = (_pad_to(x, FLASH_BLOCK, 1, 0) for x in (q, k, v))
    seg = _pad_to(seg, FLASH_BLOCK, 1, -2)  # padding queries/keys see only each other
    devices = mesh.devices.flat if mesh is not None else jax.devices()
    interpret = next(iter(devices)).platform != "gpu"
    # float32 tiles of 128 x 128 with head size >= 128 would not fit in shared memory.
    blk = 64 if q.dtype.itemsize >= 4 and dp >= 128 else FLASH_BLOCK
    sizes = pallas_attention.BlockSizes(block_q=blk, block_k=blk, block_q_dkv=32,
                                        block_kv_dkv=32, block_q_dq=32, block_kv_dq=32)

    def run(q, k, v, seg):
        return pallas_attention.mha(q, k, v, seg, sm_scale=d**-0.5, causal=True,
                                    block_sizes=sizes, interpret=interpret)

    if mesh is not None and mesh.size > 1:
        n_data, n_model = mesh.shape.get("data", 1), mesh.shape.get("model", 1)
        rows = "data" if b % n_data == 0 else None
        heads = "model" if h % n_model == 0 else None
        spec = P(rows, None, heads, None)
        run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, P(rows, None)),
                            out_specs=spec, check_vma=False)
    return run(q, k, v, seg)[:, :t, :, :d]


class AttentionMask(NamedTuple):
    """Who may attend to whom: query i of row b sees key j when
    ``kv_valid[b, j]``, ``kv_idx[b, j] <= q_idx[b, i]`` and ``kv_seg[b, j] == q_seg[b, i]``.
    """

    q_idx: jax.Array  # int [B, T] each query's position in the key sequence
    kv_idx: jax.Array  # int [B, S]
    q_seg: jax.Array  # int [B, T] segment (packed record) of each query
    kv_seg: jax.Array  # int [B, S]
    kv_valid: jax.Array  # bool [B, S] keys that exist (cache slots written)

    @classmethod
    def packed(cls, segment_ids) -> AttentionMask:
        """Rows of packed records attending to themselves: causal within each segment."""
        b, t = segment_ids.shape
        idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        return cls(idx, idx, segment_ids, segment_ids, jnp.ones((b, t), bool))

    @classmethod
    def cached(cls, cache_index, t: int, valid) -> AttentionMask:
        """T new queries per row at slots cache_index.. (scalar, or [B] per row) of a cache
        whose written slots are ``valid`` [B, S]."""
        b, s_len = valid.shape
        start = cache_index[:, None] if cache_index.ndim else cache_index
        q_idx = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        kv_idx = jnp.broadcast_to(jnp.arange(s_len, dtype=jnp.int32), (b, s_len))
        return cls(q_idx, kv_idx, jnp.zeros((b, t), jnp.int32),
                   jnp.zeros((b, s_len), jnp.int32), valid)


def choose_impl(impl: str, *, cached: bool, platform: str) -> str:
    """The kernel a layer runs: ``impl`` as asked, except that

    - ``flash`` becomes ``auto`` for cached (decoding) calls, which the fused kernel has
      no mode for;
    - ``auto`` becomes ``flash`` for uncached rows on a GPU. Measured on an H200
      (bf16, 1.5B shape, ``benchmarks/results/gpu/h200``): scoring 2.6x faster than
      blockwise at median 4k tokens and 1.35x at 512, SFT 1.9x, forward+backward
      1.8-3.4x faster than dense even at T = 384.
    Elsewhere ``auto`` stays, resolved by size in :func:`attention`.
    """
    if cached:
        return "auto" if impl == "flash" else impl
    if impl == "auto" and platform == "gpu":
        return "flash"
    return impl


def attention(q, k, v, q_idx, kv_idx, q_seg, kv_seg, kv_valid, *, impl="auto",
              dense_limit=1 << 26, dense_tile=1 << 18, mesh=None, kv_heads_first=False):
    """q: [B, T, H, D]; k, v: [B, S, Hkv, D] (or [B, Hkv, S, D] with ``kv_heads_first``,
    the KV cache's layout); index/segment arrays [B, T] / [B, S].

    ``auto`` is dense only for small score matrices (T·S ≤ ``dense_tile``, e.g. 512²,
    and B·H·T·S ≤ ``dense_limit``): decoding steps and short rows. Longer rows go
    blockwise, which skips masked tiles and never leaves cache-sized temporaries
    (measured on CPU at T = 2048: 1.0 vs 1.6 ms/token for a 4-layer 0.5B-shaped body).
    ``flash`` assumes uncached rows (``q_idx == kv_idx == arange``, all keys valid;
    the caller guarantees it) and uses ``q_seg`` as the segment ids.
    """
    b, t, h, _ = q.shape
    s_len = k.shape[2 if kv_heads_first else 1]
    if impl == "auto":
        small = t * s_len <= dense_tile and b * h * t * s_len <= dense_limit
        impl = "dense" if small else "blockwise"
    if impl == "dense":
        return dense_attention(q, k, v, q_idx, kv_idx, q_seg, kv_seg, kv_valid,
                               kv_heads_first=kv_heads_first)
    if kv_heads_first:  # the other kernels take [B, S, Hkv, D] (long prefills: once a call)
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, q_idx, kv_idx, q_seg, kv_seg, kv_valid)
    if impl == "flash":
        if t != s_len:
            raise ValueError("flash attention is for uncached rows (T == S)")
        return flash_attention(q, k, v, q_seg, mesh=mesh)
    raise ValueError(f"unknown attention impl {impl!r}")
