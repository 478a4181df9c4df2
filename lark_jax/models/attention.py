"""Causal grouped-query attention with segment masks and KV-cache slots.

Masking is by *index*, not position: query i may attend key j iff
``kv_idx[j] <= q_idx[i]`` (causal in row/cache coordinates),
``q_seg[i] == kv_seg[j]`` (packed rows: no attention across records) and
``kv_valid[j]`` (left padding, unwritten cache slots). Positions only feed RoPE,
so packed rows can restart positions per record.

Two implementations with identical results up to float rounding:

* ``dense``: materialises the [B, H, T, S] scores; fastest for short rows and decoding.
* ``blockwise``: flash-style online softmax over (query block × key block)
  tiles under ``lax.scan``; tiles that are entirely masked (above the causal
  diagonal, other segments) are skipped with ``lax.cond``. Memory is
  O(B·H·block²) instead of O(B·H·T·S), which is what lets a 32k-token
  trajectory be scored in a few GB.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

NEG = -1e30  # finite "minus infinity": keeps fully masked rows free of inf - inf = NaN


def _mask(q_idx, kv_idx, q_seg, kv_seg, kv_valid):
    m = kv_idx[:, None, :] <= q_idx[:, :, None]
    m &= q_seg[:, :, None] == kv_seg[:, None, :]
    m &= kv_valid[:, None, :]
    return m  # [B, T, S]


def dense_attention(q, k, v, q_idx, kv_idx, q_seg, kv_seg, kv_valid):
    b, t, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    s = s * (d**-0.5)
    mask = _mask(q_idx, kv_idx, q_seg, kv_seg, kv_valid)[:, None, None]
    s = jnp.where(mask, s, NEG)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v, preferred_element_type=jnp.float32)
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

    out = lax.map(one_q_block, (qs, blocks(q_idx_p, nq, q_block), blocks(q_seg_p, nq, q_block)))
    out = jnp.moveaxis(out, 0, 1).reshape(b, nq * q_block, h, d)[:, :t]
    return out.astype(q.dtype)


def attention(q, k, v, q_idx, kv_idx, q_seg, kv_seg, kv_valid, *, impl="auto",
              dense_limit=1 << 26, dense_tile=1 << 18):
    """q: [B, T, H, D]; k, v: [B, S, Hkv, D]; index/segment arrays [B, T] / [B, S].

    ``auto`` is dense only for small score matrices (T·S ≤ ``dense_tile``, e.g. 512²,
    and B·H·T·S ≤ ``dense_limit``): decoding steps and short rows. Longer rows go
    blockwise, which skips masked tiles and never leaves cache-sized temporaries
    (measured on CPU at T = 2048: 1.0 vs 1.6 ms/token for a 4-layer 0.5B-shaped body).
    """
    b, t, h, _ = q.shape
    s_len = k.shape[1]
    if impl == "auto":
        small = t * s_len <= dense_tile and b * h * t * s_len <= dense_limit
        impl = "dense" if small else "blockwise"
    if impl == "dense":
        return dense_attention(q, k, v, q_idx, kv_idx, q_seg, kv_seg, kv_valid)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, q_idx, kv_idx, q_seg, kv_seg, kv_valid)
    raise ValueError(f"unknown attention impl {impl!r}")
